//! Unmasking client payloads in place (RFC 6455 §5.3), as fast as the memory bus allows.
//!
//! STUB: to be replaced by the SIMD implementation (AVX-512BW, AVX2, NEON, portable u64),
//! chosen once at start-up by CPU feature detection.

/// XOR `buf` in place with `mask`, starting at byte `phase` (0..=3) of the mask, so a payload
/// split across buffers is unmasked correctly piece by piece. Returns the phase for the byte
/// after `buf`: `(phase + buf.len()) % 4`.
pub fn unmask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(phase + i) & 3];
    }
    (phase + buf.len()) & 3
}
