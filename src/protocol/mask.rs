//! Unmasking client payloads in place (RFC 6455 §5.3), as fast as the memory bus allows.
//!
//! Every byte a client sends passes through here once: the frame decoder calls [`unmask`] on
//! the payload while it still sits in the kernel-registered receive buffer, before UTF-8
//! validation and relay. The kernel is picked once, at first use, by CPU feature detection
//! (AVX-512BW, AVX2 or the portable u64 path on x86-64; NEON on aarch64), so the hot path is
//! one indirect call. This is the only module of the protocol core that uses `unsafe`.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::sync::OnceLock;

/// The shape shared by every implementation: `(buf, mask, phase) -> next phase`.
pub type UnmaskFn = fn(&mut [u8], [u8; 4], usize) -> usize;

/// Environment variable that forces one implementation (for benchmarking); ignored when the
/// named one is unknown or unsupported on this CPU.
pub const FORCE_ENV: &str = "RINGWAY_UNMASK";

static SELECTED: OnceLock<(&'static str, UnmaskFn)> = OnceLock::new();

/// XOR `buf` in place with `mask`, starting at byte `phase` (0..=3) of the mask, so a payload
/// split across buffers is unmasked correctly piece by piece. Returns the phase for the byte
/// after `buf`: `(phase + buf.len()) % 4`. A `phase` above 3 is taken modulo 4.
#[inline]
pub fn unmask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    (selected().1)(buf, mask, phase)
}

/// Which implementation [`unmask`] dispatches to ("avx512", "avx2", "neon" or "portable").
pub fn implementation_name() -> &'static str {
    selected().0
}

/// Every implementation usable on this CPU, slowest first, as safe function pointers (for
/// tests and benches that compare them side by side).
pub fn implementations() -> Vec<(&'static str, UnmaskFn)> {
    #[cfg_attr(
        not(any(
            target_arch = "x86_64",
            all(target_arch = "aarch64", target_feature = "neon")
        )),
        allow(unused_mut)
    )]
    let mut v: Vec<(&'static str, UnmaskFn)> = vec![("portable", unmask_portable)];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            v.push(("avx2", x86::unmask_avx2));
        }
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            v.push(("avx512", x86::unmask_avx512));
        }
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    v.push(("neon", neon::unmask_neon));
    v
}

/// The byte-at-a-time definition from RFC 6455 §5.3, kept as the reference for tests and
/// benches. Never used on the data path.
#[doc(hidden)]
pub fn unmask_bytewise(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let phase = phase & 3;
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(phase + i) & 3];
    }
    next_phase(phase, buf.len())
}

fn selected() -> &'static (&'static str, UnmaskFn) {
    SELECTED.get_or_init(|| select(std::env::var(FORCE_ENV).ok().as_deref()))
}

/// The fastest available implementation, unless `forced` names another available one.
fn select(forced: Option<&str>) -> (&'static str, UnmaskFn) {
    let available = implementations();
    forced
        .and_then(|want| available.iter().find(|(name, _)| *name == want))
        .or(available.last())
        .copied()
        .unwrap_or(("portable", unmask_portable))
}

#[inline(always)]
fn next_phase(phase: usize, len: usize) -> usize {
    // phase <= 3 and a slice is at most isize::MAX bytes long: no overflow.
    (phase + len) & 3
}

/// The mask rotated to start at `phase`, as the native-endian word whose bytes in memory are
/// `mask[phase], mask[phase + 1], ...`; XOR with it at any 4-byte-multiple offset of `buf`.
#[inline(always)]
fn mask_word(mask: [u8; 4], phase: usize) -> u32 {
    advance(u32::from_ne_bytes(mask), phase)
}

/// The word for the byte `n` bytes further on.
#[inline(always)]
fn advance(word: u32, n: usize) -> u32 {
    let bits = 8 * (n as u32 & 3);
    if cfg!(target_endian = "little") {
        word.rotate_right(bits)
    } else {
        word.rotate_left(bits)
    }
}

#[inline(always)]
fn splat64(word: u32) -> u64 {
    // Both halves hold `word`, so the bytes in memory repeat it on either endianness.
    u64::from(word) << 32 | u64::from(word)
}

/// Fewer than 8 bytes, as at most one u32, one u16 and one u8 step. Returns the word for the
/// byte after `buf`.
#[inline(always)]
fn xor_lt8(mut buf: &mut [u8], mut word: u32) -> u32 {
    debug_assert!(buf.len() < 8);
    if buf.len() >= 4 {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(4);
        let head: &mut [u8; 4] = head.try_into().expect("split at 4");
        *head = (u32::from_ne_bytes(*head) ^ word).to_ne_bytes();
        buf = rest;
    }
    if buf.len() >= 2 {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(2);
        let w = word.to_ne_bytes();
        head[0] ^= w[0];
        head[1] ^= w[1];
        word = advance(word, 2);
        buf = rest;
    }
    if let Some(b) = buf.first_mut() {
        *b ^= word.to_ne_bytes()[0];
        word = advance(word, 1);
    }
    word
}

/// Short buffers: unaligned u64 words, no alignment prologue. Also the tail of the SIMD paths.
#[inline(always)]
fn xor_short(buf: &mut [u8], word: u32) {
    let w64 = splat64(word);
    let (words, rest) = buf.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_ne_bytes(*w) ^ w64).to_ne_bytes();
    }
    xor_lt8(rest, word);
}

/// The portable kernel: aligned u64 words, with the unaligned head and tail done by
/// [`xor_lt8`] so targets without fast unaligned access stay fast too.
fn xor_portable(buf: &mut [u8], word: u32) {
    if buf.len() < 32 {
        return xor_short(buf, word);
    }
    // SAFETY: every bit pattern is a valid u64, and align_to_mut only puts in the middle
    // slice the u64s that lie wholly inside `buf` at u64 alignment.
    let (head, body, tail) = unsafe { buf.align_to_mut::<u64>() };
    let word = xor_lt8(head, word);
    let w64 = splat64(word);
    for w in body.iter_mut() {
        *w ^= w64;
    }
    // The body is a multiple of 8 bytes long, so the tail starts at the same mask phase.
    xor_lt8(tail, word);
}

fn unmask_portable(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    xor_portable(buf, mask_word(mask, phase));
    next_phase(phase & 3, buf.len())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{advance, mask_word, next_phase, xor_short};
    use std::arch::x86_64::*;

    /// Safe entry point; only handed out by `implementations()` after AVX2 was detected.
    pub(super) fn unmask_avx2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
        debug_assert!(std::is_x86_feature_detected!("avx2"));
        // SAFETY: this function is reachable only through `implementations()`, which lists
        // it only when the CPU supports AVX2.
        unsafe { xor_avx2(buf, mask_word(mask, phase)) };
        next_phase(phase & 3, buf.len())
    }

    /// Safe entry point; only handed out by `implementations()` after AVX-512F/BW was detected.
    pub(super) fn unmask_avx512(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
        debug_assert!(std::is_x86_feature_detected!("avx512bw"));
        // SAFETY: this function is reachable only through `implementations()`, which lists
        // it only when the CPU supports AVX-512F and AVX-512BW.
        unsafe { xor_avx512(buf, mask_word(mask, phase)) };
        next_phase(phase & 3, buf.len())
    }

    /// Above this, aligning the body to 32 bytes pays for the scalar head.
    const AVX2_ALIGN_MIN: usize = 256;

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn xor_avx2(buf: &mut [u8], word: u32) {
        if buf.len() < 32 {
            return xor_short(buf, word);
        }
        let m = _mm256_set1_epi32(word as i32);
        if buf.len() < AVX2_ALIGN_MIN {
            let (vectors, tail) = buf.as_chunks_mut::<32>();
            for v in vectors {
                let p = v.as_mut_ptr().cast::<__m256i>();
                // SAFETY: `v` is 32 bytes we own; the loads and stores are unaligned.
                unsafe { _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), m)) };
            }
            // Vectors are a multiple of 4 bytes, so the tail starts at the same mask phase.
            // SAFETY: AVX2 is enabled for this function, as `xor_tail_lt32` requires.
            return unsafe { xor_tail_lt32(tail, word) };
        }

        // Align the body to 32 bytes so no load or store splits a cache line.
        let head_len = (buf.as_ptr() as usize).wrapping_neg() & 31;
        let (head, body) = buf.split_at_mut(head_len);
        // SAFETY: AVX2 is enabled for this function, as `xor_tail_lt32` requires.
        unsafe { xor_tail_lt32(head, word) };
        let word = advance(word, head_len);
        let m = _mm256_set1_epi32(word as i32);

        let (blocks, rest) = body.as_chunks_mut::<128>();
        for block in blocks {
            let p = block.as_mut_ptr().cast::<__m256i>();
            // SAFETY: `block` is 128 bytes we own; `body` starts 32-byte aligned and every
            // block is a multiple of 32 bytes into it, so all four aligned accesses are in
            // bounds and aligned. AVX2 is enabled for this function.
            unsafe {
                let a = _mm256_load_si256(p);
                let b = _mm256_load_si256(p.add(1));
                let c = _mm256_load_si256(p.add(2));
                let d = _mm256_load_si256(p.add(3));
                _mm256_store_si256(p, _mm256_xor_si256(a, m));
                _mm256_store_si256(p.add(1), _mm256_xor_si256(b, m));
                _mm256_store_si256(p.add(2), _mm256_xor_si256(c, m));
                _mm256_store_si256(p.add(3), _mm256_xor_si256(d, m));
            }
        }
        let (vectors, tail) = rest.as_chunks_mut::<32>();
        for v in vectors {
            let p = v.as_mut_ptr().cast::<__m256i>();
            // SAFETY: `v` is 32 bytes we own at a 32-byte aligned address (as above).
            unsafe { _mm256_store_si256(p, _mm256_xor_si256(_mm256_load_si256(p), m)) };
        }
        // SAFETY: AVX2 is enabled for this function, as `xor_tail_lt32` requires.
        unsafe { xor_tail_lt32(tail, word) };
    }

    /// Fewer than 32 bytes: one 16-byte step if it fits, then u64 steps.
    ///
    /// # Safety
    /// The CPU must support AVX2: it is compiled for that feature set so it inlines into
    /// `xor_avx2` (it only needs SSE2 itself).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn xor_tail_lt32(buf: &mut [u8], word: u32) {
        debug_assert!(buf.len() < 32);
        match buf.split_first_chunk_mut::<16>() {
            Some((v, rest)) => {
                let p = v.as_mut_ptr().cast::<__m128i>();
                // SAFETY: `v` is 16 bytes we own; the load and store are unaligned.
                unsafe {
                    let m = _mm_set1_epi32(word as i32);
                    _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), m));
                }
                // 16 is a multiple of 4: the rest starts at the same mask phase.
                xor_short(rest, word);
            }
            None => xor_short(buf, word),
        }
    }

    /// Bit i set for i < n, n in 0..=64: the lanes of a partial 64-byte vector.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask64 {
        u64::MAX.checked_shr(64 - n as u32).unwrap_or(0)
    }

    /// XOR the first `n` (<= 64) bytes at `p` with a masked load and store.
    ///
    /// # Safety
    /// `p..p + n` must be valid for reads and writes; the CPU must support AVX-512F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn xor_partial(p: *mut u8, n: usize, m: __m512i) {
        let k = lanes(n);
        // SAFETY: the caller guarantees `n` bytes at `p` are ours. Lanes outside `k` are
        // neither read nor written and cannot fault (AVX-512 masked memory operations
        // suppress faults on masked-off elements, Intel SDM vol. 1 §15.4.1).
        unsafe {
            let a = _mm512_maskz_loadu_epi8(k, p.cast::<i8>());
            _mm512_mask_storeu_epi8(p.cast::<i8>(), k, _mm512_xor_si512(a, m));
        }
    }

    /// Below this, a masked 64-byte load and store (which split a cache line whenever the
    /// payload is not aligned) cost more than two to four u64 steps (measured at 16 B).
    const AVX512_MIN: usize = 32;

    /// Above this, aligning the body to 64 bytes pays for the extra masked head.
    const AVX512_ALIGN_MIN: usize = 256;

    /// # Safety
    /// The CPU must support AVX-512F and AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn xor_avx512(buf: &mut [u8], word: u32) {
        let len = buf.len();
        let ptr = buf.as_mut_ptr();
        let m = _mm512_set1_epi32(word as i32);
        if len < AVX512_MIN {
            return xor_short(buf, word);
        }
        if len <= 64 {
            // SAFETY: `buf` is `len` bytes we own; AVX-512F/BW is enabled for this function.
            return unsafe { xor_partial(ptr, len, m) };
        }
        if len < AVX512_ALIGN_MIN {
            let (vectors, tail) = buf.as_chunks_mut::<64>();
            for v in vectors {
                let p = v.as_mut_ptr().cast::<__m512i>();
                // SAFETY: `v` is 64 bytes we own; the loads and stores are unaligned.
                unsafe { _mm512_storeu_si512(p, _mm512_xor_si512(_mm512_loadu_si512(p), m)) };
            }
            // SAFETY: `tail` is `tail.len()` (< 64) bytes we own.
            return unsafe { xor_partial(tail.as_mut_ptr(), tail.len(), m) };
        }

        // Align the body to 64 bytes (a cache line) with one masked head.
        let head_len = (ptr as usize).wrapping_neg() & 63;
        let (head, body) = buf.split_at_mut(head_len);
        // SAFETY: `head` is `head_len` (< 64) bytes we own.
        unsafe { xor_partial(head.as_mut_ptr(), head_len, m) };
        let m = _mm512_set1_epi32(advance(word, head_len) as i32);

        let (blocks, rest) = body.as_chunks_mut::<256>();
        for block in blocks {
            let p = block.as_mut_ptr().cast::<__m512i>();
            // SAFETY: `block` is 256 bytes we own; `body` starts 64-byte aligned and every
            // block is a multiple of 64 bytes into it, so all accesses are in bounds and
            // aligned. AVX-512F is enabled for this function.
            unsafe {
                let a = _mm512_load_si512(p);
                let b = _mm512_load_si512(p.add(1));
                let c = _mm512_load_si512(p.add(2));
                let d = _mm512_load_si512(p.add(3));
                _mm512_store_si512(p, _mm512_xor_si512(a, m));
                _mm512_store_si512(p.add(1), _mm512_xor_si512(b, m));
                _mm512_store_si512(p.add(2), _mm512_xor_si512(c, m));
                _mm512_store_si512(p.add(3), _mm512_xor_si512(d, m));
            }
        }
        let (vectors, tail) = rest.as_chunks_mut::<64>();
        for v in vectors {
            let p = v.as_mut_ptr().cast::<__m512i>();
            // SAFETY: `v` is 64 bytes we own at a 64-byte aligned address (as above).
            unsafe { _mm512_store_si512(p, _mm512_xor_si512(_mm512_load_si512(p), m)) };
        }
        // Vectors are a multiple of 4 bytes, so the tail starts at the same mask phase.
        // SAFETY: `tail` is `tail.len()` (< 64) bytes we own.
        unsafe { xor_partial(tail.as_mut_ptr(), tail.len(), m) };
    }
}

/// NEON is part of the aarch64 baseline, so this needs no run-time detection.
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon {
    use super::{mask_word, next_phase, xor_short};
    use std::arch::aarch64::*;

    pub(super) fn unmask_neon(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
        xor_neon(buf, mask_word(mask, phase));
        next_phase(phase & 3, buf.len())
    }

    fn xor_neon(buf: &mut [u8], word: u32) {
        if buf.len() < 16 {
            return xor_short(buf, word);
        }
        // Built byte by byte and loaded with vld1q_u8 so lane order is memory order on
        // either endianness.
        let w = word.to_ne_bytes();
        let pattern: [u8; 16] = std::array::from_fn(|i| w[i & 3]);
        // SAFETY: `pattern` is 16 readable bytes; vld1q_u8 has no alignment requirement;
        // NEON is enabled for the whole target (checked by the cfg above).
        let m = unsafe { vld1q_u8(pattern.as_ptr()) };

        let (blocks, rest) = buf.as_chunks_mut::<64>();
        for block in blocks {
            let p = block.as_mut_ptr();
            // SAFETY: `block` is 64 bytes we own; vld1q_u8/vst1q_u8 are unaligned accesses
            // of 16 bytes at offsets 0, 16, 32, 48.
            unsafe {
                let a = vld1q_u8(p);
                let b = vld1q_u8(p.add(16));
                let c = vld1q_u8(p.add(32));
                let d = vld1q_u8(p.add(48));
                vst1q_u8(p, veorq_u8(a, m));
                vst1q_u8(p.add(16), veorq_u8(b, m));
                vst1q_u8(p.add(32), veorq_u8(c, m));
                vst1q_u8(p.add(48), veorq_u8(d, m));
            }
        }
        let (vectors, tail) = rest.as_chunks_mut::<16>();
        for v in vectors {
            let p = v.as_mut_ptr();
            // SAFETY: `v` is 16 bytes we own; unaligned access.
            unsafe { vst1q_u8(p, veorq_u8(vld1q_u8(p), m)) };
        }
        // Vectors are a multiple of 4 bytes, so the tail starts at the same mask phase.
        xor_short(tail, word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic filler so failures reproduce.
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// A buffer with room to place a slice at any offset from a 64-byte boundary, plus guard
    /// bytes after it; returns (storage, index of the 64-byte aligned base).
    fn aligned_storage(len: usize, seed: u64) -> (Vec<u8>, usize) {
        let v = pseudo_random(len + 192, seed);
        let base = v.as_ptr().align_offset(64);
        assert!(base < 64);
        (v, base)
    }

    /// Runs `f` on `len` bytes at `start` of `storage` (a copy of `original`), checks the
    /// result against `expected` (the reference output) and that none of the 64 bytes either
    /// side of the slice changed, then restores `storage`.
    #[allow(clippy::too_many_arguments)]
    fn check(
        name: &str,
        f: UnmaskFn,
        storage: &mut [u8],
        original: &[u8],
        start: usize,
        expected: &[u8],
        mask: [u8; 4],
        phase: usize,
    ) {
        let len = expected.len();
        let end = start + len;
        let next = f(&mut storage[start..end], mask, phase);
        assert_eq!(
            next,
            (phase + len) % 4,
            "{name}: returned phase, len {len} phase {phase}"
        );
        if storage[start..end] != *expected {
            let at = (0..len)
                .find(|&i| storage[start + i] != expected[i])
                .unwrap_or(0);
            panic!(
                "{name}: len {len} align {} phase {phase}: first wrong byte at {at}",
                storage[start..].as_ptr() as usize % 64
            );
        }
        let guard = start.saturating_sub(64)..start;
        assert_eq!(
            storage[guard.clone()],
            original[guard],
            "{name}: wrote before the slice"
        );
        assert_eq!(
            storage[end..end + 64],
            original[end..end + 64],
            "{name}: wrote past the slice"
        );
        storage[start..end].copy_from_slice(&original[start..end]);
    }

    #[test]
    fn rfc_6455_5_7_example_unmasks_to_hello() {
        // RFC 6455 §5.7: a masked text frame carrying "Hello".
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for (name, f) in implementations() {
            let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
            assert_eq!(f(&mut payload, mask, 0), 1, "{name}");
            assert_eq!(&payload, b"Hello", "{name}");
        }
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        unmask(&mut payload, mask, 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn reference_follows_rfc_definition() {
        // RFC 6455 §5.3: octet i is XORed with mask octet (i MOD 4), offset here by `phase`.
        let mask = [1, 2, 4, 8];
        let mut buf = [0u8; 7];
        assert_eq!(unmask_bytewise(&mut buf, mask, 3), 2);
        assert_eq!(buf, [8, 1, 2, 4, 8, 1, 2]);
    }

    #[test]
    fn every_implementation_matches_reference_for_every_length_alignment_and_phase() {
        const MAX: usize = 4096;
        let mask = [0xa5, 0x3c, 0x0f, 0xd2];
        let (original, base) = aligned_storage(MAX + 64, 7);
        let mut storage = original.clone();
        let impls = implementations();
        for phase in 0..4 {
            for align in 0..64 {
                let start = base + align;
                let mut reference = original[start..start + MAX].to_vec();
                unmask_bytewise(&mut reference, mask, phase);
                for len in 0..=MAX {
                    for &(name, f) in &impls {
                        let expected = &reference[..len];
                        check(
                            name,
                            f,
                            &mut storage,
                            &original,
                            start,
                            expected,
                            mask,
                            phase,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn selected_implementation_is_listed_and_matches_reference() {
        let names: Vec<_> = implementations().iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&implementation_name()), "{names:?}");
        let mask = [9, 8, 7, 6];
        let data = pseudo_random(1000, 3);
        for phase in 0..4 {
            let (mut a, mut b) = (data.clone(), data.clone());
            assert_eq!(
                unmask(&mut a, mask, phase),
                unmask_bytewise(&mut b, mask, phase)
            );
            assert_eq!(a, b);
        }
    }

    #[test]
    fn selection_prefers_fastest_and_honours_a_supported_override() {
        let available = implementations();
        let best = available.last().unwrap().0;
        assert_eq!(select(None).0, best);
        assert_eq!(select(Some("portable")).0, "portable");
        assert_eq!(select(Some("no-such-kernel")).0, best);
        for (name, _) in &available {
            assert_eq!(select(Some(name)).0, *name);
        }
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("avx512bw") {
            assert_eq!(select(Some("avx512")).0, best);
        }
    }

    #[test]
    fn phase_above_three_is_taken_modulo_four() {
        let mask = [0x11, 0x22, 0x33, 0x44];
        for (name, f) in implementations() {
            for len in [0, 3, 100, 1000] {
                let mut a = pseudo_random(len, 11);
                let mut b = a.clone();
                assert_eq!(
                    f(&mut a, mask, 6),
                    unmask_bytewise(&mut b, mask, 2),
                    "{name}"
                );
                assert_eq!(a, b, "{name} len {len}");
            }
        }
    }

    #[test]
    fn unmasking_twice_restores_the_payload() {
        // RFC 6455 §5.3: the same transform masks and unmasks.
        let data = pseudo_random(70_000, 5);
        for (name, f) in implementations() {
            let mut buf = data.clone();
            f(&mut buf[3..], [1, 2, 3, 4], 1);
            assert_ne!(buf, data, "{name} changed nothing");
            f(&mut buf[3..], [1, 2, 3, 4], 1);
            assert_eq!(buf, data, "{name}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn large_buffers_match_reference(
            len in 4097usize..=(1 << 20),
            align in 0usize..64,
            phase in 0usize..4,
            mask in any::<[u8; 4]>(),
            seed in any::<u64>(),
        ) {
            let (original, base) = aligned_storage(len + 64, seed);
            let start = base + align;
            let mut reference = original[start..start + len].to_vec();
            unmask_bytewise(&mut reference, mask, phase);
            let mut storage = original.clone();
            for (name, f) in implementations() {
                check(name, f, &mut storage, &original, start, &reference, mask, phase);
            }
        }

        #[test]
        fn pieces_unmasked_in_turn_equal_the_whole(
            len in 0usize..20_000,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            align in 0usize..64,
            phase in 0usize..4,
            mask in any::<[u8; 4]>(),
            seed in any::<u64>(),
        ) {
            let (original, base) = aligned_storage(len + 64, seed);
            let start = base + align;
            let mut whole = original[start..start + len].to_vec();
            let end_phase = unmask_bytewise(&mut whole, mask, phase);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
            cuts.push(len);
            cuts.sort_unstable();
            for (name, f) in implementations() {
                let mut storage = original.clone();
                let buf = &mut storage[start..start + len];
                let (mut at, mut p) = (0, phase);
                for &cut in &cuts {
                    p = f(&mut buf[at..cut], mask, p);
                    at = cut;
                }
                prop_assert_eq!(p, end_phase, "{}", name);
                prop_assert!(*buf == whole[..], "{} with cuts {:?}", name, cuts);
            }
        }
    }
}
