//! Compression throughput of one core in `shared` mode: the core's one compressor, reset per
//! message (no context takeover), over a stream of 64 distinct JSON-like messages per size,
//! and its capped inflater over their compressed forms. One iteration is the whole stream,
//! so criterion's throughput is MB/s of raw text in (compress) or out (inflate); the sizes
//! printed at start (`raw=` and `compressed=` per stream) give the other side and the ratio.
//! benches/deflate-compare.sh runs this pinned to one CPU and prints MB/s in and out.
//!
//! Measured in the thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: on a
//! machine shared with other jobs, time the bench spends descheduled is not compression work.

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringway::protocol::deflate::{Deflater, Inflater};

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to a local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Criterion measurement: the bench thread's CPU time, in ns.
struct ThreadCpu;

impl Measurement for ThreadCpu {
    type Intermediate = Duration;
    type Value = Duration;
    fn start(&self) -> Duration {
        thread_cpu()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// Shows CPU time in us and throughput in MB/s (10^6 bytes, or elements, per CPU second).
struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, _typical: f64, values: &mut [f64]) -> &'static str {
        values.iter_mut().for_each(|v| *v /= 1e3);
        "us CPU"
    }
    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let units = match *t {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) | Throughput::Elements(n) => n,
        } as f64;
        values.iter_mut().for_each(|v| *v = units * 1e3 / *v);
        "MB/s CPU"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

/// Distinct messages per stream, so the figures are not of one cache-hot message.
const STREAM: usize = 64;

/// JSON-like text of `n` bytes: chat or ticker events with varying ids, names and numbers.
fn json(n: usize, seed: u64) -> Vec<u8> {
    let mut s = String::new();
    let mut i = seed;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user-{}\",\"room\":\"lobby\",\"ts\":{},\"text\":\"message {}\",\"online\":{}}},",
            i % 97,
            1_700_000_000_000u64 + i * 37,
            i * 7919 % 10007,
            i.is_multiple_of(3)
        ));
        i += 1;
    }
    s.truncate(n);
    s.into_bytes()
}

fn bench(c: &mut Criterion<ThreadCpu>) {
    let mut g = c.benchmark_group("deflate_throughput");
    for size in [256usize, 4096, 65536] {
        let stream: Vec<Vec<u8>> = (0..STREAM as u64).map(|k| json(size, k * 1000)).collect();
        let mut d = Deflater::default();
        let mut inf = Inflater::default();
        let mut z = Vec::new();
        let compressed: Vec<Vec<u8>> = stream
            .iter()
            .map(|m| {
                d.compress(15, m, &mut z);
                z.clone()
            })
            .collect();
        let raw: usize = stream.iter().map(Vec::len).sum();
        let packed: usize = compressed.iter().map(Vec::len).sum();
        for (m, z) in stream.iter().zip(&compressed) {
            assert_eq!(&inf.inflate(z, 1 << 20).unwrap()[..], &m[..]);
        }
        eprintln!("deflate_throughput {size} raw={raw} compressed={packed}");
        g.throughput(Throughput::Bytes(raw as u64));
        g.bench_with_input(BenchmarkId::new("compress", size), &stream, |b, s| {
            b.iter(|| {
                for m in s {
                    d.compress(15, black_box(m), &mut z);
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("inflate", size), &compressed, |b, s| {
            b.iter(|| {
                for z in s {
                    black_box(inf.inflate(black_box(z), 1 << 20).unwrap());
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench
}
criterion_main!(benches);
