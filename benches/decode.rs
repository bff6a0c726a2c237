//! Decoding whole masked text messages (the edge's hot path): header, in-place unmask,
//! UTF-8 check, event out. Side by side with tungstenite 0.24 and fastwebsockets 0.10
//! decoding the very same wire bytes, as a server.
//!
//! Our decoder unmasks the caller's buffer in place, so a buffer can be decoded only once.
//! Three ways to feed it, to show what that costs:
//! - `ours/batched`: a fresh copy per iteration made by `iter_batched` outside the timing
//!   (pure decode cost; the copy does warm the cache, as the kernel's write would).
//! - `ours/copy+decode`: memcpy from a pristine copy inside the timing, then decode. This is
//!   what the other two do anyway (they copy from the stream into their own buffer), so it
//!   is the apples-to-apples line.
//! - `ours/decode+remask`: decode, then mask the payload again: decode plus one extra
//!   unmask pass.
//!
//! The other libraries read from an in-memory stream that serves the same masked frames over
//! and over (their reads copy, so the source stays masked).

use bytes::BytesMut;
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use ringway::protocol::frame::{self, OpCode, Role};
use ringway::protocol::mask;
use ringway::protocol::message::{Event, Limits, MessageDecoder, MessageKind};
use std::io::{Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const SIZES: [usize; 3] = [16, 1024, 64 * 1024];

/// Mixed ASCII and multi-byte text, exactly `len` bytes.
fn text(len: usize) -> Vec<u8> {
    let mut s = String::new();
    for c in "The quick brown fox — κόσμε — jumps over 😀 the lazy dog. "
        .chars()
        .cycle()
    {
        if s.len() + c.len_utf8() > len {
            break;
        }
        s.push(c);
    }
    while s.len() < len {
        s.push('.');
    }
    s.into_bytes()
}

fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    frame::write_client_frame(&mut b, true, OpCode::Text, MASK, payload);
    b.to_vec()
}

/// An in-memory socket that serves `data` (whole frames) in a loop and swallows writes.
struct Cycle {
    data: Vec<u8>,
    pos: usize,
}

impl Cycle {
    /// At least 64 KiB of back-to-back copies of `frame`, so reads return big chunks.
    fn new(frame: &[u8]) -> Self {
        let mut data = Vec::new();
        while data.len() < 64 * 1024 {
            data.extend_from_slice(frame);
        }
        Cycle { data, pos: 0 }
    }
    fn fill(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.data.len() - self.pos);
        out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % self.data.len();
        n
    }
}

impl Read for Cycle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(self.fill(buf))
    }
}

impl Write for Cycle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl tokio::io::AsyncRead for Cycle {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.fill(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Cycle {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn decoder() -> MessageDecoder {
    MessageDecoder::new(
        Role::Server,
        Limits {
            max_frame: 1 << 20,
            max_message: 1 << 20,
            max_fragments: 0,
        },
    )
}

/// Decode one whole text message from `buf`; returns its length so nothing is optimized out.
#[inline(always)]
fn ours(dec: &mut MessageDecoder, buf: &mut [u8]) -> usize {
    match dec.decode(buf) {
        Ok((
            _,
            Some(Event::Message {
                kind: MessageKind::Text,
                payload,
            }),
        )) => payload.as_slice().len(),
        other => panic!("unexpected {other:?}"),
    }
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_text");
    for len in SIZES {
        let payload = text(len);
        assert!(std::str::from_utf8(&payload).is_ok() && payload.len() == len);
        let wire = masked_frame(&payload);
        let header = wire.len() - len;
        group.throughput(Throughput::Bytes(len as u64));

        let mut dec = decoder();
        group.bench_with_input(BenchmarkId::new("ours/batched", len), &wire, |b, wire| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| ours(&mut dec, buf),
                BatchSize::SmallInput,
            )
        });

        let mut dec = decoder();
        let mut work = wire.clone();
        group.bench_with_input(
            BenchmarkId::new("ours/copy+decode", len),
            &wire,
            |b, wire| {
                b.iter(|| {
                    work.copy_from_slice(black_box(wire));
                    ours(&mut dec, &mut work)
                })
            },
        );

        let mut dec = decoder();
        let mut work = wire.clone();
        group.bench_function(BenchmarkId::new("ours/decode+remask", len), |b| {
            b.iter(|| {
                let n = ours(&mut dec, &mut work);
                mask::unmask(&mut work[header..], MASK, 0);
                n
            })
        });
        // The remask variant must leave the buffer as it found it, or it measured garbage.
        assert_eq!(work, wire);

        let mut ws = tungstenite::protocol::WebSocket::from_raw_socket(
            Cycle::new(&wire),
            tungstenite::protocol::Role::Server,
            None,
        );
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => assert_eq!(t.as_bytes(), &payload[..]),
            other => panic!("tungstenite read {other:?}"),
        }
        group.bench_function(BenchmarkId::new("tungstenite", len), |b| {
            b.iter(|| match ws.read() {
                Ok(tungstenite::Message::Text(t)) => t.len(),
                other => panic!("tungstenite read {other:?}"),
            })
        });

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut fws = fastwebsockets::WebSocket::after_handshake(
            Cycle::new(&wire),
            fastwebsockets::Role::Server,
        );
        fws.set_auto_close(false);
        fws.set_auto_pong(false);
        fws.set_max_message_size(1 << 20);
        rt.block_on(async {
            let f = fws.read_frame().await.unwrap();
            assert!(f.opcode == fastwebsockets::OpCode::Text && f.payload[..] == payload[..]);
        });
        // One block_on per batch, so the runtime's entry cost is not charged to each message.
        group.bench_function(BenchmarkId::new("fastwebsockets", len), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let f = fws.read_frame().await.unwrap();
                        black_box(f.payload.len());
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = bench_decode
}
criterion_main!(benches);
