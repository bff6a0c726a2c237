//! permessage-deflate (RFC 7692), sans-IO: which offer to accept and what to answer, and the
//! per-message compressor and capped inflater a core lends to its connections.
//!
//! Sits between the frame decoder and the message router on the receive path (a message
//! whose first frame has RSV1 is inflated here before it is routed), and after the relay on
//! the send path (a message at or over `compression_min_bytes` is compressed before framing).
//! In `shared` mode the gateway always answers with `server_no_context_takeover` and
//! `client_no_context_takeover` (§7.1.1.1, §7.1.1.2 allow it whatever the offer said), so every
//! message starts from a fresh state and one [`Deflater`] and one [`Inflater`] per core serve
//! every connection: a connection holds no compression state at all. In `dedicated` mode
//! (`Mode::Dedicated`) windows carry over between messages, capped at the configured bits,
//! with one context per connection and direction ([`takeover`]).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::handshake::ExtensionOffer;

pub mod takeover;

pub const EXTENSION_NAME: &str = "permessage-deflate";

/// zlib cannot produce a raw deflate stream with an 8-bit window (it silently uses 9), so an
/// offer that limits our window to 8 is declined (RFC 7692 §7.1.2.1).
pub const MIN_WINDOW_BITS: u8 = 9;
pub const MAX_WINDOW_BITS: u8 = 15;

/// The tail a sender strips from each compressed message and the receiver puts back (§7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Output is produced this many bytes at a time, each chunk checked against the limit before
/// it is appended: a bomb costs at most the limit plus one chunk.
const INFLATE_CHUNK: usize = 16 * 1024;

/// Why an offer was passed over (§7: "decline" the offer rather than fail the handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Decline {
    #[error("not permessage-deflate")]
    OtherExtension,
    #[error("unknown parameter")]
    UnknownParameter,
    #[error("parameter given twice")]
    DuplicateParameter,
    #[error("invalid parameter value")]
    InvalidValue,
    #[error("server_max_window_bits below what zlib can do")]
    WindowTooSmall,
}

/// One permessage-deflate offer's parameters (§7.1), validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    /// The most window bits the client lets us use.
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: the client can take a limit but named none; `Some(Some(n))`: a hint.
    pub client_max_window_bits: Option<Option<u8>>,
}

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The window our compressor uses.
    pub server_window_bits: u8,
    /// The answer names `server_max_window_bits` (the offer had it, or `dedicated` caps it).
    pub name_server_window: bool,
    /// Our compressor keeps its window between messages (`dedicated`, unless the offer had
    /// `server_no_context_takeover`).
    pub server_takeover: bool,
    /// The client's compressor keeps its window: our inflater for it must too.
    pub client_takeover: bool,
    /// The `client_max_window_bits` we answer (`dedicated`, when the offer had it): the
    /// client's window, and so our inflater's.
    pub client_window_bits: Option<u8>,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101. `shared` never sends
    /// `client_max_window_bits`: one inflater with a 15-bit window reads every smaller one.
    pub fn response_value(&self) -> String {
        let mut v = String::from(EXTENSION_NAME);
        if !self.server_takeover {
            v.push_str("; server_no_context_takeover");
        }
        if !self.client_takeover {
            v.push_str("; client_no_context_takeover");
        }
        if self.name_server_window {
            v.push_str("; server_max_window_bits=");
            v.push_str(&self.server_window_bits.to_string());
        }
        if let Some(bits) = self.client_window_bits {
            v.push_str("; client_max_window_bits=");
            v.push_str(&bits.to_string());
        }
        v
    }

    /// The window the client compresses with, so the one our inflater needs (§7.1.2.2).
    pub fn inflate_window_bits(&self) -> u8 {
        self.client_window_bits.unwrap_or(MAX_WINDOW_BITS)
    }

    /// Whether either direction keeps a context between messages (per-connection state).
    pub fn takes_over(&self) -> bool {
        self.server_takeover || self.client_takeover
    }
}

/// What the server is willing to agree to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both `no_context_takeover` parameters, whatever the offer (one codec per core).
    Shared,
    /// Context takeover both ways, our window capped at `window_bits` (9..=15) and the
    /// client's too when its offer lets us name one.
    Dedicated { window_bits: u8 },
}

/// A window-bits value: a decimal integer 8..=15 without leading zeros (§7.1.2.1, §7.1.2.2).
fn window_bits(value: Option<&str>) -> Result<u8, Decline> {
    let v = value.ok_or(Decline::InvalidValue)?;
    let ok = !v.is_empty() && v.len() <= 2 && v.bytes().all(|b| b.is_ascii_digit());
    if !ok || v.starts_with('0') {
        return Err(Decline::InvalidValue);
    }
    match v.parse::<u8>() {
        Ok(n @ 8..=15) => Ok(n),
        _ => Err(Decline::InvalidValue),
    }
}

/// Validate one offer (§7.1): unknown or repeated parameters and bad values decline it.
pub fn parse_offer(offer: &ExtensionOffer) -> Result<Offer, Decline> {
    if !offer.name.eq_ignore_ascii_case(EXTENSION_NAME) {
        return Err(Decline::OtherExtension);
    }
    let mut o = Offer::default();
    let mut seen = [false; 4];
    for (name, value) in &offer.params {
        let i = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return Err(Decline::UnknownParameter),
        };
        if std::mem::replace(&mut seen[i], true) {
            return Err(Decline::DuplicateParameter);
        }
        match i {
            // The two takeover parameters have no value (§7.1.1.1, §7.1.1.2).
            0 | 1 if value.is_some() => return Err(Decline::InvalidValue),
            0 => o.server_no_context_takeover = true,
            1 => o.client_no_context_takeover = true,
            2 => o.server_max_window_bits = Some(window_bits(value.as_deref())?),
            _ => {
                o.client_max_window_bits = Some(match value {
                    None => None,
                    Some(v) => Some(window_bits(Some(v.as_str()))?),
                })
            }
        }
    }
    Ok(o)
}

/// Pick the first acceptable permessage-deflate offer (the client's order of preference,
/// RFC 6455 §9.1), or none: then the connection runs uncompressed.
pub fn negotiate(offers: &[ExtensionOffer], mode: Mode) -> Option<Agreed> {
    offers.iter().find_map(|offer| {
        let o = parse_offer(offer).ok()?;
        match o.server_max_window_bits {
            Some(n) if n < MIN_WINDOW_BITS => return None,
            _ => {}
        }
        match mode {
            Mode::Shared => Some(Agreed {
                server_window_bits: o.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
                name_server_window: o.server_max_window_bits.is_some(),
                server_takeover: false,
                client_takeover: false,
                client_window_bits: None,
            }),
            Mode::Dedicated { window_bits } => {
                let ours = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
                // §7.1.2.2: we may only limit the client's window when it offered to be
                // limited; a hint below 9 (zlib cannot honour 8) declines the offer.
                let client_window_bits = match o.client_max_window_bits {
                    None => None,
                    Some(None) => Some(ours),
                    Some(Some(n)) if n < MIN_WINDOW_BITS => return None,
                    Some(Some(n)) => Some(n.min(ours)),
                };
                Some(Agreed {
                    server_window_bits: o.server_max_window_bits.map_or(ours, |n| n.min(ours)),
                    // §7.1.2.1: the server may name its window even when not asked to.
                    name_server_window: true,
                    server_takeover: !o.server_no_context_takeover,
                    client_takeover: !o.client_no_context_takeover,
                    client_window_bits,
                })
            }
        }
    })
}

/// Why an inbound compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// More than the message limit once inflated (close 1009).
    #[error("message exceeds {limit} bytes once inflated")]
    TooLarge { limit: usize },
    /// Not a valid deflate stream (close 1007).
    #[error("invalid compressed data")]
    Corrupt,
}

/// zlib level of our compressors unless `compression_level` says otherwise. Measured on
/// JSON-like text (benches/deflate.rs, compress + inflate): level 2 takes 28% (4 KiB) to
/// 59% (64 KiB) less time than zlib's default 6 for 2-5% more bytes; zlib-rs' level 1 is
/// faster still but sends 38-56% more bytes.
pub const DEFAULT_LEVEL: u8 = 2;

/// The per-core compressor: one zlib state per window size in use, made on first use and
/// reset before every message (no context takeover).
pub struct Deflater {
    by_bits: [Option<Box<Compress>>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
    /// zlib level (1..=9) of the states in `by_bits`.
    level: u8,
    /// Messages compressed, for metrics and the once-per-core fan-out test.
    pub messages: u64,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("messages", &self.messages)
            .finish()
    }
}

impl Default for Deflater {
    fn default() -> Self {
        Deflater {
            by_bits: Default::default(),
            level: DEFAULT_LEVEL,
            messages: 0,
        }
    }
}

impl Deflater {
    /// Compress at zlib `level` (1..=9) from now on (a reload may change it): the states
    /// made at another level are let go.
    pub fn set_level(&mut self, level: u8) {
        let level = level.clamp(1, 9);
        if level != self.level {
            self.level = level;
            self.by_bits = Default::default();
        }
    }

    /// Compress one whole message into `out` (cleared first), without the 4-byte tail (§7.2.1).
    pub fn compress(&mut self, window_bits: u8, input: &[u8], out: &mut Vec<u8>) {
        let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        let level = u32::from(self.level);
        let c = self.by_bits[(bits - MIN_WINDOW_BITS) as usize].get_or_insert_with(|| {
            Box::new(Compress::new_with_window_bits(
                Compression::new(level),
                false,
                bits,
            ))
        });
        c.reset();
        out.clear();
        let mut pos = 0;
        loop {
            out.reserve((input.len() - pos) / 2 + 64);
            let before = c.total_in();
            // Errors are only possible on a misused stream (never here); treat as done.
            if c.compress_vec(&input[pos..], out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            pos += (c.total_in() - before) as usize;
            // A sync flush is complete once it left room in the output.
            if pos == input.len() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        self.messages += 1;
    }
}

/// The per-core inflater (15-bit window reads any client window), reset per message.
#[derive(Default)]
pub struct Inflater {
    state: Option<Box<Decompress>>,
    chunk: Vec<u8>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

impl Inflater {
    /// Inflate one whole message (its frames' payloads joined) into a buffer of its own,
    /// never holding more than `limit` bytes of output (plus one chunk being checked).
    pub fn inflate(&mut self, input: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let d = self
            .state
            .get_or_insert_with(|| Box::new(Decompress::new_with_window_bits(false, 15)));
        d.reset(false);
        inflate_capped(d, &mut self.chunk, input, limit)
    }

    /// The core's 16 KiB output chunk, lent to the connections' own inflaters too.
    pub fn chunk(&mut self) -> &mut Vec<u8> {
        &mut self.chunk
    }
}

/// Inflate one message with `d` as it stands (fresh, or holding a connection's window),
/// `INFLATE_CHUNK` bytes at a time through `chunk`, refusing output past `limit`.
/// A message that ends the stream with a final block (BFINAL, which §7.2.1 allows) leaves
/// `d` reset for a new stream: a takeover inflater then starts with an empty window.
pub(crate) fn inflate_capped(
    d: &mut Decompress,
    chunk: &mut Vec<u8>,
    input: &[u8],
    limit: usize,
) -> Result<Vec<u8>, InflateError> {
    if chunk.len() != INFLATE_CHUNK {
        *chunk = vec![0; INFLATE_CHUNK];
    }
    let mut out: Vec<u8> = Vec::with_capacity(limit.min(input.len().saturating_mul(4)));
    for part in [input, &TAIL[..]] {
        let mut pos = 0;
        loop {
            let (in0, out0) = (d.total_in(), d.total_out());
            let status = d
                .decompress(&part[pos..], chunk, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let used = (d.total_in() - in0) as usize;
            let made = (d.total_out() - out0) as usize;
            pos += used;
            if made > 0 {
                if out.len() + made > limit {
                    return Err(InflateError::TooLarge { limit });
                }
                if out.capacity() - out.len() < made {
                    // Grow by doubling, but never past the limit.
                    let want = (out.len() + made).max(out.len() * 2).min(limit);
                    out.reserve_exact(want - out.len());
                }
                out.extend_from_slice(&chunk[..made]);
            }
            match status {
                // A final block ends the message; the tail after it is not needed.
                Status::StreamEnd => {
                    d.reset(false);
                    return Ok(out);
                }
                _ if used == 0 && made == 0 => break,
                _ if pos == part.len() && made < chunk.len() => break,
                _ => {}
            }
        }
        if pos < part.len() {
            // No progress with input left: a stream zlib cannot continue.
            return Err(InflateError::Corrupt);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(name: &str, params: &[(&str, Option<&str>)]) -> ExtensionOffer {
        ExtensionOffer {
            name: name.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
        }
    }

    const PMD: &str = "permessage-deflate";

    fn negotiate_shared(offers: &[ExtensionOffer]) -> Option<Agreed> {
        negotiate(offers, Mode::Shared)
    }

    #[test]
    fn bare_offer_is_answered_with_both_no_context_takeover() {
        // RFC 7692 §7.1.1.1 / §7.1.1.2: a server may add both whatever the offer.
        let a = negotiate_shared(&[offer(PMD, &[])]).unwrap();
        assert_eq!(a.server_window_bits, 15);
        assert_eq!(
            a.response_value(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn rfc_examples() {
        // §7.1.3 example offers.
        let chrome = offer(PMD, &[("client_max_window_bits", None)]);
        let a = negotiate_shared(&[chrome]).unwrap();
        assert!(!a.name_server_window);
        // "permessage-deflate; client_max_window_bits; server_max_window_bits=10"
        let two = [
            offer(
                PMD,
                &[
                    ("client_max_window_bits", None),
                    ("server_max_window_bits", Some("10")),
                ],
            ),
            offer(PMD, &[("client_max_window_bits", None)]),
        ];
        let a = negotiate_shared(&two).unwrap();
        assert_eq!(a.server_window_bits, 10);
        assert!(a.response_value().ends_with("; server_max_window_bits=10"));
        // Quoted values arrive unescaped from the handshake parser.
        let q = offer(PMD, &[("server_max_window_bits", Some("12"))]);
        assert_eq!(negotiate_shared(&[q]).unwrap().server_window_bits, 12);
    }

    #[test]
    fn hostile_offers_are_declined_and_the_next_one_taken() {
        let bad = [
            (
                offer(PMD, &[("x-unknown", None)]),
                Decline::UnknownParameter,
            ),
            (
                offer(
                    PMD,
                    &[
                        ("server_no_context_takeover", None),
                        ("server_no_context_takeover", None),
                    ],
                ),
                Decline::DuplicateParameter,
            ),
            (
                offer(
                    PMD,
                    &[
                        ("client_max_window_bits", None),
                        ("CLIENT_MAX_WINDOW_BITS", Some("10")),
                    ],
                ),
                Decline::DuplicateParameter,
            ),
            (
                offer(PMD, &[("server_max_window_bits", None)]),
                Decline::InvalidValue,
            ),
            (
                offer(PMD, &[("server_max_window_bits", Some("16"))]),
                Decline::InvalidValue,
            ),
            (
                offer(PMD, &[("server_max_window_bits", Some("7"))]),
                Decline::InvalidValue,
            ),
            (
                offer(PMD, &[("server_max_window_bits", Some("010"))]),
                Decline::InvalidValue,
            ),
            (
                offer(PMD, &[("client_max_window_bits", Some("09"))]),
                Decline::InvalidValue,
            ),
            (
                offer(PMD, &[("client_max_window_bits", Some("abc"))]),
                Decline::InvalidValue,
            ),
            (
                offer(PMD, &[("server_no_context_takeover", Some("1"))]),
                Decline::InvalidValue,
            ),
            (
                offer("x-webkit-deflate-frame", &[]),
                Decline::OtherExtension,
            ),
        ];
        for (o, why) in &bad {
            assert_eq!(parse_offer(o), Err(*why), "{o:?}");
            assert_eq!(negotiate_shared(std::slice::from_ref(o)), None, "{o:?}");
            // Declining one offer does not fail the negotiation: the next one is taken.
            let good = offer(PMD, &[("server_max_window_bits", Some("11"))]);
            let a = negotiate_shared(&[o.clone(), good]).unwrap();
            assert_eq!(a.server_window_bits, 11, "{o:?}");
        }
        // 8 is valid syntax but zlib cannot honour it: declined, next offer taken.
        let eight = offer(PMD, &[("server_max_window_bits", Some("8"))]);
        assert_eq!(parse_offer(&eight).unwrap().server_max_window_bits, Some(8));
        assert_eq!(negotiate_shared(std::slice::from_ref(&eight)), None);
        let a = negotiate_shared(&[eight, offer(PMD, &[])]).unwrap();
        assert_eq!(a.server_window_bits, 15);
        assert_eq!(negotiate_shared(&[]), None);
    }

    #[test]
    fn dedicated_keeps_context_and_caps_both_windows() {
        let dedicated = |offers: &[ExtensionOffer]| {
            negotiate(offers, Mode::Dedicated { window_bits: 12 }).map(|a| a.response_value())
        };
        // Firefox's bare offer: takeover both ways, our window named; the client's window
        // cannot be limited (it did not offer client_max_window_bits).
        let bare = negotiate(&[offer(PMD, &[])], Mode::Dedicated { window_bits: 12 }).unwrap();
        assert!(bare.server_takeover && bare.client_takeover);
        assert_eq!(bare.inflate_window_bits(), 15);
        assert_eq!(
            bare.response_value(),
            "permessage-deflate; server_max_window_bits=12"
        );
        // Chrome's: the client's window is capped at ours.
        let chrome = offer(PMD, &[("client_max_window_bits", None)]);
        assert_eq!(
            dedicated(&[chrome]).unwrap(),
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"
        );
        // Smaller asks are honoured, larger ones capped; 9 is the floor.
        let ask = offer(
            PMD,
            &[
                ("server_max_window_bits", Some("10")),
                ("client_max_window_bits", Some("9")),
            ],
        );
        assert_eq!(
            dedicated(&[ask]).unwrap(),
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9"
        );
        let big = offer(PMD, &[("client_max_window_bits", Some("15"))]);
        assert!(dedicated(&[big])
            .unwrap()
            .ends_with("client_max_window_bits=12"));
        // The takeover parameters are answered only when the client asked for them.
        let no_ctx = offer(
            PMD,
            &[
                ("server_no_context_takeover", None),
                ("client_no_context_takeover", None),
            ],
        );
        let a = negotiate(&[no_ctx], Mode::Dedicated { window_bits: 12 }).unwrap();
        assert!(!a.takes_over());
        assert_eq!(
            a.response_value(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=12"
        );
        // A client window of 8, or a malformed one, declines that offer: the next is taken.
        for bad in [Some("8"), Some("x"), Some("16")] {
            let o = offer(PMD, &[("client_max_window_bits", bad)]);
            assert_eq!(dedicated(std::slice::from_ref(&o)), None, "{bad:?}");
            let next = dedicated(&[o, offer(PMD, &[])]).unwrap();
            assert_eq!(next, "permessage-deflate; server_max_window_bits=12");
        }
        // Our window is never answered as 8.
        let eight = offer(PMD, &[("server_max_window_bits", Some("8"))]);
        assert_eq!(dedicated(&[eight]), None);
        let a = negotiate(&[offer(PMD, &[])], Mode::Dedicated { window_bits: 9 }).unwrap();
        assert_eq!(a.server_window_bits, 9);
    }

    fn roundtrip(bits: u8, data: &[u8]) {
        let mut d = Deflater::default();
        let mut i = Inflater::default();
        let mut out = Vec::new();
        for _ in 0..3 {
            // Each message starts fresh: the same input gives the same bytes every time.
            d.compress(bits, data, &mut out);
            assert!(!out.ends_with(&TAIL) || data.is_empty());
            let back = i.inflate(&out, data.len()).unwrap();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn the_level_is_applied_and_every_level_round_trips() {
        let json: Vec<u8> = (0..2000)
            .flat_map(|i| {
                format!("{{\"id\":{i},\"name\":\"user{}\"}},", i * 7919 % 101).into_bytes()
            })
            .collect();
        let (mut d, mut i, mut out) = (Deflater::default(), Inflater::default(), Vec::new());
        let mut sizes = Vec::new();
        for level in [1, DEFAULT_LEVEL, 9] {
            d.set_level(level);
            d.compress(15, &json, &mut out);
            assert_eq!(i.inflate(&out, json.len()).unwrap(), json);
            sizes.push(out.len());
        }
        // Level 1 (zlib-rs' quick strategy) is larger than the default, and 9 no larger.
        assert!(sizes[0] > sizes[1] && sizes[2] <= sizes[1], "{sizes:?}");
        // Out of range is clamped, never a zlib error.
        d.set_level(0);
        d.compress(15, &json, &mut out);
        assert_eq!(out.len(), sizes[0]);
    }

    #[test]
    fn compress_then_inflate() {
        let json: Vec<u8> = (0..2000)
            .flat_map(|i| format!("{{\"id\":{i},\"name\":\"user{i}\",\"ok\":true}},").into_bytes())
            .collect();
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            roundtrip(bits, &json);
        }
        roundtrip(15, b"");
        roundtrip(15, b"Hello");
        let noise: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        roundtrip(12, &noise);
    }

    #[test]
    fn rfc_7692_hello_example() {
        // §7.2.3.1: "Hello" compressed, and §7.2.3.2 the same as a stored block.
        let mut i = Inflater::default();
        let hello = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(i.inflate(&hello, 100).unwrap(), b"Hello");
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(i.inflate(&stored, 100).unwrap(), b"Hello");
        // BFINAL set: the message ends at the final block.
        let fin = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(i.inflate(&fin, 100).unwrap(), b"Hello");
    }

    #[test]
    fn inflate_refuses_a_bomb_and_garbage() {
        let zeros = vec![0u8; 64 << 20];
        let mut d = Deflater::default();
        let mut bomb = Vec::new();
        d.compress(15, &zeros, &mut bomb);
        assert!(bomb.len() < 128 * 1024, "{}", bomb.len());
        let mut i = Inflater::default();
        assert_eq!(
            i.inflate(&bomb, 64 * 1024),
            Err(InflateError::TooLarge { limit: 64 * 1024 })
        );
        // Exactly the limit passes.
        d.compress(15, &zeros[..1000], &mut bomb);
        assert_eq!(i.inflate(&bomb, 1000).unwrap().len(), 1000);
        assert_eq!(
            i.inflate(&bomb, 999),
            Err(InflateError::TooLarge { limit: 999 })
        );
        assert_eq!(
            i.inflate(&[0xff, 0xff, 0xff, 0xff], 1000),
            Err(InflateError::Corrupt)
        );
        // The inflater is usable again after an error.
        assert_eq!(i.inflate(&bomb, 1000).unwrap().len(), 1000);
    }
}
