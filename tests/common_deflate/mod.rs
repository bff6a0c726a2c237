//! A WebSocket client's side of permessage-deflate (RFC 7692) for the deflate tests, built
//! on flate2 rather than the gateway's codec, and the decompression-bomb exchange both
//! modes are checked with.

#![allow(dead_code)]

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use crate::common::{frame_bytes, RawWs, OP_BINARY, OP_CONT};

/// The masking key of every client frame here.
pub const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One compressor and one inflater for a connection; kept between messages (context
/// takeover), or made for one message only (`deflate`, `inflate`).
pub struct ClientCodec {
    c: Compress,
    d: Decompress,
}

impl ClientCodec {
    pub fn new(bits: u8) -> ClientCodec {
        ClientCodec {
            c: Compress::new_with_window_bits(Compression::default(), false, bits),
            d: Decompress::new_with_window_bits(false, 15),
        }
    }

    /// Compress one message, keeping the window (§7.2.1: sync flush, tail stripped).
    pub fn deflate(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            out.reserve(data.len() / 2 + 1024);
            let before = self.c.total_in();
            self.c
                .compress_vec(&data[pos..], &mut out, FlushCompress::Sync)
                .unwrap();
            pos += (self.c.total_in() - before) as usize;
            if pos == data.len() && out.len() < out.capacity() {
                break;
            }
        }
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    /// What a client does with a compressed server message (§7.2.2).
    pub fn inflate(&mut self, data: &[u8]) -> Vec<u8> {
        let mut input = data.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1 << 20);
        self.d
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }
}

/// A message compressed from a fresh state, as a `no_context_takeover` client does.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    ClientCodec::new(15).deflate(data)
}

/// A server message inflated from a fresh state.
pub fn inflate(data: &[u8]) -> Vec<u8> {
    ClientCodec::new(15).inflate(data)
}

/// 63 MiB of zeros, compressed to under 64 KiB: one frame within `max_frame_bytes`.
pub fn bomb() -> Vec<u8> {
    let bomb = deflate(&vec![0u8; 63 << 20]);
    assert!(bomb.len() <= 64 * 1024, "{}", bomb.len());
    bomb
}

/// Send `bomb` as one compressed binary frame: closed 1009 at the 64 KiB message limit.
pub async fn bomb_whole_closes_1009(ws: &mut RawWs, bomb: &[u8]) {
    ws.send(&frame_bytes(true, 4, OP_BINARY, Some(KEY), bomb))
        .await;
    let f = ws.expect_close(1009).await;
    assert!(
        f.close_reason().contains("limit of 65536"),
        "{}",
        f.close_reason()
    );
}

/// Send `bomb` as one compressed message in 16 fragments: closed 1009 all the same.
pub async fn bomb_in_fragments_closes_1009(ws: &mut RawWs, bomb: &[u8]) {
    let n = 16;
    let mut wire = Vec::new();
    for i in 0..n {
        let piece = &bomb[i * bomb.len() / n..(i + 1) * bomb.len() / n];
        let (rsv, op) = if i == 0 { (4, OP_BINARY) } else { (0, OP_CONT) };
        wire.extend(frame_bytes(i + 1 == n, rsv, op, Some(KEY), piece));
    }
    ws.send(&wire).await;
    ws.expect_close(1009).await;
}
