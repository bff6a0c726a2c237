//! Unmasking throughput (RFC 6455 §5.3) beside a memcpy of the same size, per implementation.
//!
//! Payloads sit where they would in a receive buffer: frames back to back, each payload right
//! after its header (2 + 4 bytes for <= 125 B, 4 + 4 up to 64 KiB - 1, 10 + 4 above), so
//! payloads are not 64-byte aligned. Sizes up to 1 KiB cycle through 16 such frames, as a
//! decoder walks a buffer of small frames (so no call waits on the previous call's stores to
//! the same bytes); memcpy cycles through 16 slots the same way (both stay in L1). "unmask()"
//! is the public entry point (dispatch included); the named lines call each implementation
//! directly. Compare ratios within one run: the machine is shared.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringway::protocol::mask;

const SIZES: [usize; 6] = [16, 125, 1024, 16 * 1024, 64 * 1024, 1024 * 1024];
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Header + masking key length in front of a payload of `len` bytes (RFC 6455 §5.2).
fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2 + 4,
        126..=65535 => 4 + 4,
        _ => 10 + 4,
    }
}

/// A 64-byte aligned region of `len` bytes inside a fresh vector; returns (vec, start).
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v: Vec<u8> = (0..len + 64).map(|i| (i * 31 + 7) as u8).collect();
    let start = v.as_ptr().align_offset(64);
    (v, start)
}

fn bench(c: &mut Criterion) {
    let selected = mask::implementation_name();
    let impls = mask::implementations();
    for size in SIZES {
        let mut group = c.benchmark_group(format!("unmask/{size}"));
        group.throughput(Throughput::Bytes(size as u64));
        // A power of two, so the slot index wraps with a mask, not a division.
        let slots: usize = if size <= 1024 { 16 } else { 1 };

        let (src, s) = aligned(size * slots);
        let (mut dst, d) = aligned(size * slots);
        let mut i = 0;
        group.bench_function("memcpy", |b| {
            b.iter(|| {
                let at = i * size;
                i = (i + 1) & (slots - 1);
                dst[d + at..d + at + size].copy_from_slice(black_box(&src[s + at..s + at + size]))
            })
        });

        let off = header_len(size);
        let stride = off + size;
        let (mut buf, base) = aligned(stride * slots);
        let mut run = |name: BenchmarkId, f: mask::UnmaskFn| {
            let mut i = 0;
            group.bench_function(name, |b| {
                b.iter(|| {
                    let at = base + i * stride + off;
                    i = (i + 1) & (slots - 1);
                    f(black_box(&mut buf[at..at + size]), black_box(MASK), 0)
                })
            });
        };
        run(BenchmarkId::new("unmask()", selected), mask::unmask);
        for &(name, f) in &impls {
            run(BenchmarkId::from_parameter(name), f);
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
