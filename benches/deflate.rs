//! permessage-deflate per message on JSON-like text of 256 B, 4 KiB and 64 KiB, compress +
//! inflate (the round trip a message makes through a sender and a receiver), for the
//! backends and modes the gateway could use:
//! - `shared/zlib-rs`: the gateway's `shared` mode: flate2 on zlib-rs, window 15, both
//!   sides reset per message (no context takeover), at the default `compression_level` (2);
//!   `shared/zlib-rs-level6` the same at zlib's own default level, 6;
//! - `dedicated/zlib-rs-w12-ml4`: the gateway's `dedicated` mode: zlib-rs directly, window 12,
//!   memLevel 4, context takeover both ways;
//! - `dedicated/zlib-w12-ml8` and `-ml4`: stock zlib (libz-sys) with context takeover, at
//!   memLevel 8 (flate2's fixed value) and 4;
//! - `shared/zlib-w15-ml8`: stock zlib reset per message, the `shared` counterpart.
//!
//! Each round trip takes the next of 8 different messages of the size (the same message
//! over and over would flatter takeover). Before the benches it prints the compression ratio
//! of each and the memory one context holds (stock zlib: counted through its zalloc hook;
//! zlib-rs: the figures tests/deflate_memory.rs checks). Stock zlib is here only to measure:
//! reaching its memLevel takes FFI (`unsafe`), which the gateway's src/ does not allow.

use std::alloc::{alloc, dealloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use libz_sys as z;
use ringway::protocol::deflate::takeover::{self, TakeoverDeflater, TakeoverInflater};
use ringway::protocol::deflate::{Deflater, Inflater};

fn json(n: usize, seed: u64) -> Vec<u8> {
    let mut s = String::new();
    let mut i = seed * 1000;
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

const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Bytes stock zlib holds through its allocation hook.
static ZLIB_LIVE: AtomicIsize = AtomicIsize::new(0);
const HEADER: usize = 16;

unsafe extern "C" fn zalloc(_: z::voidpf, items: z::uInt, size: z::uInt) -> z::voidpf {
    let n = items as usize * size as usize;
    let layout = Layout::from_size_align(n + HEADER, HEADER).unwrap();
    // SAFETY: a non-zero size; the size is kept in the header for `zfree`.
    unsafe {
        let p = alloc(layout);
        if p.is_null() {
            return std::ptr::null_mut();
        }
        (p as *mut usize).write(n);
        ZLIB_LIVE.fetch_add(n as isize, Ordering::Relaxed);
        p.add(HEADER) as z::voidpf
    }
}

unsafe extern "C" fn zfree(_: z::voidpf, p: z::voidpf) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` came from `zalloc`, whose header holds the size.
    unsafe {
        let base = (p as *mut u8).sub(HEADER);
        let n = (base as *mut usize).read();
        ZLIB_LIVE.fetch_sub(n as isize, Ordering::Relaxed);
        dealloc(base, Layout::from_size_align(n + HEADER, HEADER).unwrap());
    }
}

/// One stock zlib stream (raw deflate), compressor or inflater.
struct Zlib {
    strm: Box<z::z_stream>,
    deflate: bool,
    buf: Vec<u8>,
}

impl Zlib {
    fn stream() -> Box<z::z_stream> {
        Box::new(z::z_stream {
            next_in: std::ptr::null_mut(),
            avail_in: 0,
            total_in: 0,
            next_out: std::ptr::null_mut(),
            avail_out: 0,
            total_out: 0,
            msg: std::ptr::null_mut(),
            state: std::ptr::null_mut(),
            zalloc,
            zfree,
            opaque: std::ptr::null_mut(),
            data_type: 0,
            adler: 0,
            reserved: 0,
        })
    }

    fn deflater(bits: i32, mem_level: i32) -> Zlib {
        let mut strm = Self::stream();
        // SAFETY: a fresh stream with our allocator; version and size as zlib.h passes them.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *strm,
                6,
                z::Z_DEFLATED,
                -bits,
                mem_level,
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        assert_eq!(rc, z::Z_OK);
        Zlib {
            strm,
            deflate: true,
            buf: Vec::new(),
        }
    }

    fn inflater(bits: i32) -> Zlib {
        let mut strm = Self::stream();
        // SAFETY: as in `deflater`.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                -bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        assert_eq!(rc, z::Z_OK);
        Zlib {
            strm,
            deflate: false,
            buf: Vec::new(),
        }
    }

    fn reset(&mut self) {
        // SAFETY: an initialised stream of the matching kind.
        unsafe {
            if self.deflate {
                z::deflateReset(&mut *self.strm);
            } else {
                z::inflateReset(&mut *self.strm);
            }
        }
    }

    /// Run `input` through with a sync flush into `out` (cleared first).
    fn run(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.clear();
        self.strm.next_in = input.as_ptr() as *mut u8;
        self.strm.avail_in = input.len() as u32;
        loop {
            out.reserve(input.len().max(1024));
            let len = out.len();
            let room = out.capacity() - len;
            // SAFETY: next_out points at `room` bytes of spare capacity of `out`; zlib writes
            // only there and says how much through avail_out, so set_len covers initialised
            // bytes only.
            unsafe {
                self.strm.next_out = out.as_mut_ptr().add(len);
                self.strm.avail_out = room as u32;
                let rc = if self.deflate {
                    z::deflate(&mut *self.strm, z::Z_SYNC_FLUSH)
                } else {
                    z::inflate(&mut *self.strm, z::Z_SYNC_FLUSH)
                };
                assert!(rc == z::Z_OK || rc == z::Z_BUF_ERROR, "zlib {rc}");
                out.set_len(len + room - self.strm.avail_out as usize);
            }
            if self.strm.avail_in == 0 && self.strm.avail_out > 0 {
                break;
            }
        }
    }

    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.run(input, out);
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - 4);
        }
    }

    fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.extend_from_slice(input);
        buf.extend_from_slice(&TAIL);
        self.run(&buf, out);
        self.buf = buf;
    }
}

impl Drop for Zlib {
    fn drop(&mut self) {
        // SAFETY: an initialised stream of the matching kind, ended once.
        unsafe {
            if self.deflate {
                z::deflateEnd(&mut *self.strm);
            } else {
                z::inflateEnd(&mut *self.strm);
            }
        }
    }
}

/// A sender and a receiver: one message's compress + inflate.
trait Pair {
    fn roundtrip(&mut self, msg: &[u8]) -> usize;
}

struct SharedZlibRs(Deflater, Inflater, Vec<u8>);
impl Pair for SharedZlibRs {
    fn roundtrip(&mut self, msg: &[u8]) -> usize {
        self.0.compress(15, msg, &mut self.2);
        let back = self.1.inflate(&self.2, 1 << 20).unwrap();
        assert_eq!(back.len(), msg.len());
        self.2.len()
    }
}

struct DedicatedZlibRs(
    Box<TakeoverDeflater>,
    Box<TakeoverInflater>,
    Vec<u8>,
    Vec<u8>,
);
impl Pair for DedicatedZlibRs {
    fn roundtrip(&mut self, msg: &[u8]) -> usize {
        self.0.compress(msg, &mut self.2);
        let back = self.1.inflate(&mut self.3, &self.2, 1 << 20).unwrap();
        assert_eq!(back.len(), msg.len());
        self.2.len()
    }
}

struct StockZlib {
    c: Zlib,
    d: Zlib,
    takeover: bool,
    z: Vec<u8>,
    out: Vec<u8>,
}
impl Pair for StockZlib {
    fn roundtrip(&mut self, msg: &[u8]) -> usize {
        if !self.takeover {
            self.c.reset();
            self.d.reset();
        }
        self.c.compress(msg, &mut self.z);
        self.d.inflate(&self.z, &mut self.out);
        assert_eq!(self.out.len(), msg.len());
        self.z.len()
    }
}

fn candidates() -> Vec<(&'static str, Box<dyn Pair>)> {
    let stock = |bits, ml, takeover| -> Box<dyn Pair> {
        Box::new(StockZlib {
            c: Zlib::deflater(bits, ml),
            d: Zlib::inflater(bits),
            takeover,
            z: Vec::new(),
            out: Vec::new(),
        })
    };
    vec![
        (
            "shared/zlib-rs",
            Box::new(SharedZlibRs(
                Deflater::default(),
                Inflater::default(),
                Vec::new(),
            )),
        ),
        ("shared/zlib-rs-level6", {
            let mut d = Deflater::default();
            d.set_level(6);
            Box::new(SharedZlibRs(d, Inflater::default(), Vec::new()))
        }),
        (
            "dedicated/zlib-rs-w12-ml4",
            Box::new(DedicatedZlibRs(
                TakeoverDeflater::new(12, ringway::protocol::deflate::DEFAULT_LEVEL),
                TakeoverInflater::new(12),
                Vec::new(),
                Vec::new(),
            )),
        ),
        ("dedicated/zlib-w12-ml8", stock(12, 8, true)),
        ("dedicated/zlib-w12-ml4", stock(12, 4, true)),
        ("shared/zlib-w15-ml8", stock(15, 8, false)),
    ]
}

/// Memory one stock zlib context holds after use, through the zalloc hook.
fn stock_memory(bits: i32, ml: i32) -> (isize, isize) {
    let msg = json(4096, 1);
    let base = ZLIB_LIVE.load(Ordering::Relaxed);
    let mut c = Zlib::deflater(bits, ml);
    let mut zbuf = Vec::new();
    c.compress(&msg, &mut zbuf);
    let comp = ZLIB_LIVE.load(Ordering::Relaxed) - base;
    let mut d = Zlib::inflater(bits);
    let mut out = Vec::new();
    d.inflate(&zbuf, &mut out);
    let inf = ZLIB_LIVE.load(Ordering::Relaxed) - base - comp;
    (comp, inf)
}

fn bench(c: &mut Criterion) {
    for (bits, ml) in [(12, 8), (12, 4), (15, 8), (15, 4)] {
        let (comp, inf) = stock_memory(bits, ml);
        eprintln!(
            "memory: stock zlib window {bits} memLevel {ml}: compressor {comp} B, inflater {inf} B"
        );
    }
    for bits in [12, 15] {
        eprintln!(
            "memory: zlib-rs window {bits} memLevel {}: compressor {} B, inflater {} B",
            takeover::MEM_LEVEL,
            takeover::deflater_bytes(bits),
            takeover::inflater_bytes(bits)
        );
    }
    let mut g = c.benchmark_group("deflate");
    for size in [256usize, 4096, 65536] {
        let msgs: Vec<Vec<u8>> = (0..8).map(|seed| json(size, seed)).collect();
        g.throughput(Throughput::Bytes(size as u64));
        for (name, mut pair) in candidates() {
            // Ratio over the 8 messages, after one pass to warm any kept window.
            for m in &msgs {
                pair.roundtrip(m);
            }
            let z: usize = msgs.iter().map(|m| pair.roundtrip(m)).sum();
            eprintln!(
                "ratio: {name} {size} B: {:.2}",
                (8 * size) as f64 / z as f64
            );
            let mut i = 0;
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    i = (i + 1) % msgs.len();
                    pair.roundtrip(black_box(&msgs[i]))
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
