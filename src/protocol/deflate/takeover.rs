//! `dedicated` permessage-deflate (RFC 7692 context takeover): one connection's own
//! compressor and inflater, whose LZ77 windows carry over from message to message, so a
//! message like an earlier one compresses to a few bytes. The session makes them on first
//! use and drops them when the connection is shut; what each holds is a fixed, measured
//! size ([`deflater_bytes`], [`inflater_bytes`]) that the session charges to the memory
//! budget (tests/deflate_memory.rs measures it with a counting allocator).

use flate2::Decompress;
use zlib_rs::{Deflate, DeflateConfig, DeflateFlush};

use super::{inflate_capped, InflateError, MAX_WINDOW_BITS, MIN_WINDOW_BITS, TAIL};

/// zlib's memLevel for our compressors: its literal buffers are `7 << (mem_level + 6)`
/// bytes. zlib-rs' 128 KiB hash table does not shrink with it (HASH_BITS is fixed at 16),
/// so at 8 (flate2's fixed value) the buffers are 112 KiB more per connection; at 4 they
/// are 7 KiB, and messages of up to ~1,000 literals still fit one block.
pub const MEM_LEVEL: i32 = 4;

/// Bytes one [`TakeoverDeflater`] holds for `window_bits` 9..=15: the zlib-rs state and its
/// one buffer allocation (window, prev and head tables, pending and symbol buffers, 64-byte
/// alignment) plus our box. Measured, not computed: tests/deflate_memory.rs checks each.
pub fn deflater_bytes(window_bits: u8) -> usize {
    DEFLATER_BYTES[index(window_bits)]
}

/// Bytes one [`TakeoverInflater`] holds once it has inflated a message (zlib allocates the
/// window on first use), for `window_bits` 9..=15. Measured like [`deflater_bytes`].
pub fn inflater_bytes(window_bits: u8) -> usize {
    INFLATER_BYTES[index(window_bits)]
}

fn index(window_bits: u8) -> usize {
    usize::from(window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS) - MIN_WINDOW_BITS)
}

/// Window 9..=15 at `MEM_LEVEL` 4: 2 x 2^w (window) + 2 x 2^w (prev) + 128 KiB (head) +
/// 7 KiB (buffers) + state; so ~154 KiB at the default 12, ~266 KiB at 15.
const DEFLATER_BYTES: [usize; 7] = [
    143_616, 145_664, 149_760, 157_952, 174_336, 207_104, 272_640,
];
/// zlib-rs sizes an inflater's window at 32 KiB whatever the agreed bits.
const INFLATER_BYTES: [usize; 7] = [47_704; 7];

/// A connection's own compressor (our side's context takeover).
pub struct TakeoverDeflater {
    z: Deflate,
}

impl std::fmt::Debug for TakeoverDeflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakeoverDeflater")
            .field("total_in", &self.z.total_in())
            .finish()
    }
}

impl TakeoverDeflater {
    /// A raw-deflate compressor with a `window_bits` window (9..=15) at zlib `level`
    /// (1..=9).
    pub fn new(window_bits: u8, level: u8) -> Box<TakeoverDeflater> {
        let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        Box::new(TakeoverDeflater {
            z: Deflate::new_with_config(DeflateConfig {
                level: i32::from(level.clamp(1, 9)),
                // Negative: raw deflate, no zlib header (§7.2.1).
                window_bits: -i32::from(bits),
                mem_level: MEM_LEVEL,
                ..DeflateConfig::default()
            }),
        })
    }

    /// Compress one whole message into `out` (cleared first), ending with a sync flush and
    /// without its 4-byte tail (§7.2.1); the window is kept for the next message.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.clear();
        let mut pos = 0;
        loop {
            let len = out.len();
            let room = (input.len() - pos) / 2 + 64;
            out.resize(len + room, 0);
            let (in0, out0) = (self.z.total_in(), self.z.total_out());
            let r = self
                .z
                .compress(&input[pos..], &mut out[len..], DeflateFlush::SyncFlush);
            let made = (self.z.total_out() - out0) as usize;
            out.truncate(len + made);
            pos += (self.z.total_in() - in0) as usize;
            // Errors are only possible on a misused stream (never here); treat as done.
            // A sync flush is complete once it left room in the output.
            if r.is_err() || (pos == input.len() && made < room) {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
    }
}

/// A connection's own inflater (the client's context takeover), with the window it agreed.
pub struct TakeoverInflater {
    d: Decompress,
}

impl std::fmt::Debug for TakeoverInflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakeoverInflater")
            .field("total_in", &self.d.total_in())
            .finish()
    }
}

impl TakeoverInflater {
    pub fn new(window_bits: u8) -> Box<TakeoverInflater> {
        let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        Box::new(TakeoverInflater {
            d: Decompress::new_with_window_bits(false, bits),
        })
    }

    /// Inflate one message, continuing the client's stream, through the core's `chunk`;
    /// never more than `limit` bytes of output (the same cap as the shared inflater).
    pub fn inflate(
        &mut self,
        chunk: &mut Vec<u8>,
        input: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        inflate_capped(&mut self.d, chunk, input, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Inflater;
    use super::*;

    #[test]
    fn context_takeover_makes_a_repeated_message_smaller() {
        // Text that does not compress by itself, shorter than the reach of the smallest
        // window (zlib reaches 2^9 - 262 bytes back), so every window can refer to all of it.
        let msg: Vec<u8> = (0..200u32)
            .map(|i| b'a' + ((i.wrapping_mul(2_654_435_761) >> 11) % 26) as u8)
            .collect();
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            let mut d = TakeoverDeflater::new(bits, crate::protocol::deflate::DEFAULT_LEVEL);
            let mut i = TakeoverInflater::new(bits);
            let mut chunk = Vec::new();
            let (mut first, mut second) = (Vec::new(), Vec::new());
            d.compress(&msg, &mut first);
            d.compress(&msg, &mut second);
            // The second refers back to the first through the kept window.
            assert!(
                second.len() * 4 < first.len(),
                "{bits}: {} vs {}",
                second.len(),
                first.len()
            );
            assert_eq!(i.inflate(&mut chunk, &first, 1 << 20).unwrap(), msg);
            assert_eq!(i.inflate(&mut chunk, &second, 1 << 20).unwrap(), msg);
            // A fresh inflater cannot read the second alone: it needs the first's window.
            assert_eq!(
                Inflater::default().inflate(&second, 1 << 20),
                Err(InflateError::Corrupt)
            );
        }
    }

    #[test]
    fn takeover_inflate_is_capped_like_shared() {
        let zeros = vec![0u8; 8 << 20];
        let mut d = TakeoverDeflater::new(15, crate::protocol::deflate::DEFAULT_LEVEL);
        let mut bomb = Vec::new();
        d.compress(&zeros, &mut bomb);
        let mut i = TakeoverInflater::new(15);
        let mut chunk = Vec::new();
        assert_eq!(
            i.inflate(&mut chunk, &bomb, 64 * 1024),
            Err(InflateError::TooLarge { limit: 64 * 1024 })
        );
        let mut i = TakeoverInflater::new(12);
        assert_eq!(
            i.inflate(&mut chunk, &[0xff, 0xff, 0xff, 0xff], 1000),
            Err(InflateError::Corrupt)
        );
        // A message ending in a final block: the next one starts a new stream.
        let mut i = TakeoverInflater::new(12);
        let fin = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(i.inflate(&mut chunk, &fin, 100).unwrap(), b"Hello");
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(i.inflate(&mut chunk, &hello, 100).unwrap(), b"Hello");
    }
}
