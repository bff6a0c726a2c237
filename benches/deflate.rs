//! permessage-deflate per message, as the `shared` mode does it: the core's one compressor
//! (reset per message, no context takeover) and its capped inflater, on JSON-like text of
//! 256 B, 4 KiB and 64 KiB. Backend: flate2 on zlib-rs (the one the gateway builds with).
//! `compress` and `inflate` alone, and the round trip; throughput is of uncompressed bytes.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringway::protocol::deflate::{Deflater, Inflater};

fn json(n: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user-{}\",\"room\":\"lobby\",\"ts\":{},\"text\":\"message {}\"}},",
            i % 97,
            1_700_000_000_000u64 + i * 37,
            i * 7919 % 10007
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("deflate");
    for size in [256usize, 4096, 65536] {
        let msg = json(size);
        let mut d = Deflater::default();
        let mut i = Inflater::default();
        let mut z = Vec::new();
        d.compress(15, &msg, &mut z);
        eprintln!(
            "deflate {size} B -> {} B (ratio {:.2})",
            z.len(),
            size as f64 / z.len() as f64
        );
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("compress", size), &msg, |b, m| {
            b.iter(|| d.compress(15, black_box(m), &mut z))
        });
        d.compress(15, &msg, &mut z);
        g.bench_with_input(BenchmarkId::new("inflate", size), &z, |b, z| {
            b.iter(|| i.inflate(black_box(z), 1 << 20).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("roundtrip", size), &msg, |b, m| {
            b.iter(|| {
                d.compress(15, black_box(m), &mut z);
                i.inflate(&z, 1 << 20).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
