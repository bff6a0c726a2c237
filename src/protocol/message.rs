//! Message assembly (RFC 6455 §5.4, §5.5, §8.1): frames in, whole messages and control
//! frames out, unmasked in place, UTF-8 checked as early as the bytes arrive.
//!
//! Second step of the receive path, right after `frame::decode_header`. The common case — a
//! whole unfragmented frame inside the buffer the kernel filled — is unmasked in place and
//! handed out borrowed, with no copy and no allocation. Only frames that span buffers and
//! fragmented messages are copied, into one per-message `BytesMut` that is handed over
//! (not cloned) when the message completes, so an idle decoder owns no heap memory.

use super::close;
use super::frame::{
    decode_header, FrameHeader, HeaderRules, OpCode, Role, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN,
};
use super::mask;
use super::ProtocolError;
use bytes::{Bytes, BytesMut};

/// RSV1 in `FrameHeader::rsv`: permessage-deflate's "compressed" bit (RFC 7692 §6).
pub const RSV1: u8 = 0b100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload (1009 beyond it).
    pub max_frame: u64,
    /// Largest message, all fragments together (1009 beyond it).
    pub max_message: u64,
    /// Most data frames one message may span (1008 beyond it); 0 means no limit. Without it
    /// a peer can stream empty continuation frames forever: no message ever completes, so
    /// neither the message size nor the message rate limit sees them.
    pub max_fragments: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 64 * 1024,
            max_message: 64 * 1024,
            max_fragments: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

/// A message's bytes: borrowed where a whole message sat in one input buffer (unmasked in
/// place, no copy), owned where it was assembled from several frames or buffers.
#[derive(Debug)]
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Bytes),
}

impl Payload<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(b) => b,
        }
    }
    /// The payload as `Bytes`: free when owned, one copy when borrowed.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Payload::Borrowed(b) => Bytes::copy_from_slice(b),
            Payload::Owned(b) => b,
        }
    }
}

#[derive(Debug)]
pub enum Event<'a> {
    Message {
        kind: MessageKind,
        payload: Payload<'a>,
    },
    /// A permessage-deflate message (RSV1 on its first frame, RFC 7692 §6.1): the payload is
    /// still compressed and, for text, not yet UTF-8 checked. Only once RSV1 is allowed.
    Compressed {
        kind: MessageKind,
        payload: Payload<'a>,
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A valid close frame: None when it carried no status code (then 1005 applies locally).
    Close(Option<(u16, &'a str)>),
}

/// A frame whose header has been decoded but whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct FrameInProgress {
    opcode: OpCode,
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes still to come.
    remaining: u64,
    /// Mask phase of the next payload byte (§5.3: byte i uses key byte i mod 4).
    phase: u8,
}

/// Incremental UTF-8 check (§8.1) over the pieces of one text message: the up-to-3 bytes of
/// a code point cut by a piece boundary wait here for the rest.
#[derive(Debug, Clone, Copy, Default)]
struct Utf8State {
    pending: [u8; 4],
    len: u8,
}

impl Utf8State {
    /// Check the next piece; fails at the first byte that can never be valid.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), ProtocolError> {
        if self.len > 0 {
            let have = self.len as usize;
            // The lead byte was accepted as the start of an incomplete sequence, so it is one
            // of C2..=F4 and announces the sequence length.
            let want = match self.pending[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (want - have).min(data.len());
            self.pending[have..have + take].copy_from_slice(&data[..take]);
            data = &data[take..];
            match simdutf8::compat::from_utf8(&self.pending[..have + take]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() => return Err(ProtocolError::InvalidUtf8),
                // Still a valid prefix, and `data` is used up.
                Err(_) => {
                    self.len = (have + take) as u8;
                    return Ok(());
                }
            }
        }
        if let Err(e) = simdutf8::compat::from_utf8(data) {
            if e.error_len().is_some() {
                return Err(ProtocolError::InvalidUtf8);
            }
            let tail = &data[e.valid_up_to()..];
            self.pending[..tail.len()].copy_from_slice(tail);
            self.len = tail.len() as u8;
        }
        Ok(())
    }

    /// At the end of the message nothing may be left half-done.
    fn finish(&mut self) -> Result<(), ProtocolError> {
        if std::mem::take(&mut self.len) != 0 {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(())
    }
}

/// Streaming decoder for one connection. Small (a few hundred bytes) and holds no heap
/// buffer between messages, so an idle connection costs almost nothing.
#[derive(Debug)]
pub struct MessageDecoder {
    rules: HeaderRules,
    limits: Limits,
    assembly: BytesMut,
    /// The data message being assembled (first frame seen, final fragment not yet).
    message: Option<MessageKind>,
    /// `message` had RSV1 (permessage-deflate): its bytes are checked once inflated.
    compressed: bool,
    /// Declared payload bytes of `message` so far, checked against `max_message` at each
    /// header, before its payload is read.
    message_len: u64,
    /// Data frames of `message` so far.
    fragments: u32,
    utf8: Utf8State,
    frame: Option<FrameInProgress>,
    /// A header cut by the end of an input.
    header: [u8; MAX_HEADER_LEN],
    header_len: u8,
    /// A control frame payload cut by the end of an input: boxed when one is (the only
    /// allocation a control frame can cost, and only when a read splits it), let go when
    /// the next data frame starts, so an idle connection does not carry 125 bytes.
    control: Option<Box<[u8; MAX_CONTROL_PAYLOAD]>>,
    control_len: u8,
}

impl MessageDecoder {
    pub fn new(role: Role, limits: Limits) -> Self {
        MessageDecoder {
            rules: HeaderRules {
                role,
                max_frame: limits.max_frame,
                allowed_rsv: 0,
            },
            limits,
            assembly: BytesMut::new(),
            message: None,
            compressed: false,
            message_len: 0,
            fragments: 0,
            utf8: Utf8State::default(),
            frame: None,
            header: [0; MAX_HEADER_LEN],
            header_len: 0,
            control: None,
            control_len: 0,
        }
    }

    /// Change the limits, e.g. on config reload; applies from the next frame.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.rules.max_frame = limits.max_frame;
    }

    /// Allow RSV bits (RSV1<<2|RSV2<<1|RSV3) once an extension that defines them has been
    /// negotiated; applies from the next frame. With RSV1 allowed, a message whose first
    /// frame has it comes out as [`Event::Compressed`] (RFC 7692 §6.1).
    pub fn set_allowed_rsv(&mut self, rsv: u8) {
        self.rules.allowed_rsv = rsv & 0x7;
    }

    /// Whether the decoder holds no partial header, frame or message (the tests' check that
    /// a stream ended on a message boundary).
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.header_len == 0 && self.frame.is_none() && self.message.is_none()
    }

    /// Heap bytes held right now (the assembly buffer's capacity): 0 when idle, at most
    /// about twice `max_message` while a message is assembled. For metrics and the fuzzer.
    pub fn heap_bytes(&self) -> usize {
        self.assembly.capacity() + self.control.as_ref().map_or(0, |_| MAX_CONTROL_PAYLOAD)
    }

    /// Decode the next event from `input`, unmasking in place. Returns the bytes consumed
    /// and the event; with `None` the whole input was consumed (kept as needed) and more
    /// bytes are wanted. After an error the decoder must not be used again.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), ProtocolError> {
        let mut pos = 0;
        loop {
            let mut f = if let Some(f) = self.frame {
                f
            } else {
                let h = if self.header_len == 0 {
                    match decode_header(&input[pos..], &self.rules)? {
                        Some(h) => {
                            pos += h.header_len;
                            h
                        }
                        None => {
                            self.stash_header(&input[pos..]);
                            return Ok((input.len(), None));
                        }
                    }
                } else {
                    match self.resume_header(&input[pos..])? {
                        Some((h, used)) => {
                            pos += used;
                            h
                        }
                        None => return Ok((input.len(), None)),
                    }
                };
                self.check_header(&h)?;
                if self.control.is_some() && !h.opcode.is_control() {
                    // Control frames split by reads are over for now: let their buffer go.
                    self.control = None;
                }

                // Fast path: the whole payload is here and needs no assembly.
                if (input.len() - pos) as u64 >= h.payload_len {
                    let end = pos + h.payload_len as usize;
                    if h.opcode.is_control() {
                        let payload = &mut input[pos..end];
                        if let Some(m) = h.mask {
                            mask::unmask(payload, m, 0);
                        }
                        return Ok((end, Some(control_event(h.opcode, payload)?)));
                    }
                    if h.fin && h.opcode != OpCode::Continuation {
                        let payload = &mut input[pos..end];
                        if let Some(m) = h.mask {
                            mask::unmask(payload, m, 0);
                        }
                        if h.rsv & RSV1 != 0 {
                            let kind = if h.opcode == OpCode::Text {
                                MessageKind::Text
                            } else {
                                MessageKind::Binary
                            };
                            let payload = Payload::Borrowed(payload);
                            return Ok((end, Some(Event::Compressed { kind, payload })));
                        }
                        let kind = if h.opcode == OpCode::Text {
                            // §8.1: whole message at once, so the fast (non-locating) check.
                            if simdutf8::basic::from_utf8(payload).is_err() {
                                return Err(ProtocolError::InvalidUtf8);
                            }
                            MessageKind::Text
                        } else {
                            MessageKind::Binary
                        };
                        return Ok((
                            end,
                            Some(Event::Message {
                                kind,
                                payload: Payload::Borrowed(payload),
                            }),
                        ));
                    }
                }
                self.start_frame(&h)
            };

            // Slow path: take what this input holds of the current frame.
            let avail = (input.len() - pos).min(f.remaining.min(usize::MAX as u64) as usize);
            let piece = &mut input[pos..pos + avail];
            if let Some(m) = f.mask {
                f.phase = mask::unmask(piece, m, f.phase as usize) as u8;
            }
            if f.opcode.is_control() {
                let at = self.control_len as usize;
                let control = self
                    .control
                    .get_or_insert_with(|| Box::new([0; MAX_CONTROL_PAYLOAD]));
                control[at..at + avail].copy_from_slice(piece);
                self.control_len += avail as u8;
            } else {
                if self.message == Some(MessageKind::Text) && !self.compressed {
                    self.utf8.feed(piece)?;
                }
                self.append(piece, f.remaining);
            }
            pos += avail;
            f.remaining -= avail as u64;
            if f.remaining > 0 {
                self.frame = Some(f);
                return Ok((input.len(), None));
            }
            self.frame = None;

            if f.opcode.is_control() {
                let len = std::mem::take(&mut self.control_len) as usize;
                let payload = self.control.as_deref().map_or(&[][..], |c| &c[..len]);
                return Ok((pos, Some(control_event(f.opcode, payload)?)));
            }
            if f.fin {
                // check_header guarantees a message for every data frame; never panic anyway.
                let Some(kind) = self.message.take() else {
                    return Err(ProtocolError::UnexpectedContinuation);
                };
                let compressed = std::mem::take(&mut self.compressed);
                if kind == MessageKind::Text && !compressed {
                    self.utf8.finish()?;
                }
                self.message_len = 0;
                // Hand the buffer over whole: the idle decoder keeps no heap memory.
                let payload = Payload::Owned(std::mem::take(&mut self.assembly).freeze());
                if compressed {
                    return Ok((pos, Some(Event::Compressed { kind, payload })));
                }
                return Ok((pos, Some(Event::Message { kind, payload })));
            }
            // A non-final fragment is done; the next header may already be in `input`.
        }
    }

    /// Keep the start of a header that the input cut short.
    fn stash_header(&mut self, bytes: &[u8]) {
        // decode_header answers from at most MAX_HEADER_LEN bytes, so this always fits.
        self.header[..bytes.len()].copy_from_slice(bytes);
        self.header_len = bytes.len() as u8;
    }

    /// Complete a stashed header with the start of `input`: the header and how many bytes
    /// of `input` it used, or None when `input` was used up and still more is needed.
    fn resume_header(
        &mut self,
        input: &[u8],
    ) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let old = self.header_len as usize;
        let take = (MAX_HEADER_LEN - old).min(input.len());
        self.header[old..old + take].copy_from_slice(&input[..take]);
        match decode_header(&self.header[..old + take], &self.rules)? {
            Some(h) => {
                self.header_len = 0;
                Ok(Some((h, h.header_len - old)))
            }
            None => {
                // MAX_HEADER_LEN bytes always decide, so `take` was all of `input`.
                self.header_len = (old + take) as u8;
                Ok(None)
            }
        }
    }

    /// The rules that need the decoder's state (§5.4 fragmentation, message size), all
    /// judged from the header before any payload byte is read.
    fn check_header(&self, h: &FrameHeader) -> Result<(), ProtocolError> {
        let limit = self.limits.max_message;
        // RFC 7692 §6.1: RSV1 marks a message's first frame only, never a control frame.
        if h.rsv & RSV1 != 0 && (h.opcode.is_control() || h.opcode == OpCode::Continuation) {
            return Err(ProtocolError::ReservedBits(h.rsv));
        }
        match h.opcode {
            OpCode::Continuation => {
                if self.message.is_none() {
                    return Err(ProtocolError::UnexpectedContinuation);
                }
                let len = self.message_len.saturating_add(h.payload_len);
                if len > limit {
                    return Err(ProtocolError::MessageTooLarge { len, limit });
                }
                let max = self.limits.max_fragments;
                if max != 0 && self.fragments >= max {
                    return Err(ProtocolError::TooManyFragments { limit: max });
                }
            }
            OpCode::Text | OpCode::Binary => {
                if self.message.is_some() {
                    return Err(ProtocolError::ExpectedContinuation);
                }
                if h.payload_len > limit {
                    return Err(ProtocolError::MessageTooLarge {
                        len: h.payload_len,
                        limit,
                    });
                }
            }
            // Control frames stand apart from messages (§5.5) and were bounded by decode_header.
            OpCode::Close | OpCode::Ping | OpCode::Pong => {}
        }
        Ok(())
    }

    /// Set up the slow path for a frame whose payload is not all in this input, or that
    /// belongs to a fragmented message.
    fn start_frame(&mut self, h: &FrameHeader) -> FrameInProgress {
        match h.opcode {
            OpCode::Text => self.begin_message(MessageKind::Text, h),
            OpCode::Binary => self.begin_message(MessageKind::Binary, h),
            OpCode::Continuation => {
                self.message_len += h.payload_len;
                self.fragments += 1;
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => self.control_len = 0,
        }
        FrameInProgress {
            opcode: h.opcode,
            fin: h.fin,
            mask: h.mask,
            remaining: h.payload_len,
            phase: 0,
        }
    }

    fn begin_message(&mut self, kind: MessageKind, h: &FrameHeader) {
        self.message = Some(kind);
        self.compressed = h.rsv & RSV1 != 0;
        self.message_len = h.payload_len;
        self.fragments = 1;
        self.utf8 = Utf8State::default();
    }

    /// Append a piece of a data frame, `left` being what the frame still lacked before it.
    fn append(&mut self, piece: &[u8], left: u64) {
        // Reserve the rest of the frame once a fair share of it is here: one allocation in
        // the common case of a frame cut by a buffer boundary, while a peer that claims
        // 64 KiB and then trickles bytes holds memory in proportion to what it sent.
        if left <= 8 * piece.len() as u64 {
            self.assembly.reserve(left as usize);
        }
        self.assembly.extend_from_slice(piece);
    }
}

/// A complete, unmasked control frame payload as its event (§5.5).
fn control_event(opcode: OpCode, payload: &[u8]) -> Result<Event<'_>, ProtocolError> {
    match opcode {
        OpCode::Ping => Ok(Event::Ping(payload)),
        OpCode::Pong => Ok(Event::Pong(payload)),
        _ => close_event(payload),
    }
}

/// §5.5.1: empty, or a 2-byte status code and a UTF-8 reason; §7.4: only codes a peer may send.
fn close_event(payload: &[u8]) -> Result<Event<'_>, ProtocolError> {
    match payload {
        [] => Ok(Event::Close(None)),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::is_valid_wire_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = simdutf8::basic::from_utf8(reason)
                .map_err(|_| ProtocolError::InvalidCloseReason)?;
            Ok(Event::Close(Some((code, reason))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{write_client_frame, write_server_frame};

    /// An event with its bytes copied out, and whether the payload was borrowed.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Msg(MessageKind, Vec<u8>, bool),
        Compressed(MessageKind, Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn own(ev: Event<'_>) -> Ev {
        match ev {
            Event::Message { kind, payload } => {
                let borrowed = matches!(payload, Payload::Borrowed(_));
                Ev::Msg(kind, payload.as_slice().to_vec(), borrowed)
            }
            Event::Compressed { kind, payload } => {
                Ev::Compressed(kind, payload.as_slice().to_vec())
            }
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close(c) => Ev::Close(c.map(|(code, r)| (code, r.to_string()))),
        }
    }

    /// Feed `input` the way the edge does, collecting every event.
    fn feed(dec: &mut MessageDecoder, input: &[u8]) -> Result<Vec<Ev>, ProtocolError> {
        let mut buf = input.to_vec();
        let mut off = 0;
        let mut out = Vec::new();
        loop {
            let (n, ev) = dec.decode(&mut buf[off..])?;
            off += n;
            match ev {
                Some(ev) => out.push(own(ev)),
                None => {
                    assert_eq!(off, buf.len(), "None means all input was consumed");
                    return Ok(out);
                }
            }
        }
    }

    fn server() -> MessageDecoder {
        MessageDecoder::new(Role::Server, Limits::default())
    }
    fn client() -> MessageDecoder {
        MessageDecoder::new(Role::Client, Limits::default())
    }
    fn text(s: &str, borrowed: bool) -> Ev {
        Ev::Msg(MessageKind::Text, s.as_bytes().to_vec(), borrowed)
    }
    fn masked(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        write_client_frame(&mut b, fin, op, [0xA1, 0xB2, 0xC3, 0xD4], payload);
        b.to_vec()
    }
    fn first_error(dec: &mut MessageDecoder, input: &[u8]) -> ProtocolError {
        feed(dec, input).expect_err("input must be rejected")
    }

    #[test]
    fn rfc_5_7_single_frame_unmasked_borrowed() {
        let mut buf = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let mut dec = client();
        let (n, ev) = dec.decode(&mut buf).unwrap();
        assert_eq!(n, 7);
        assert_eq!(own(ev.unwrap()), text("Hello", true));
        assert!(dec.is_idle());
    }

    #[test]
    fn rfc_5_7_single_frame_masked_unmasked_in_place() {
        let mut buf = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut dec = server();
        let (n, ev) = dec.decode(&mut buf).unwrap();
        assert_eq!(n, 11);
        match ev.unwrap() {
            Event::Message {
                kind: MessageKind::Text,
                payload: Payload::Borrowed(p),
            } => assert_eq!(p, b"Hello"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            &buf[6..],
            b"Hello",
            "payload is unmasked in the input buffer itself"
        );
        // The same frame from a client decoder is a protocol error (§5.1).
        let e = first_error(
            &mut client(),
            &[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
            ],
        );
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::MaskedFrame, 1002)
        );
    }

    #[test]
    fn rfc_5_7_fragmented_unmasked_text() {
        let input = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        let mut dec = client();
        let mut buf = input;
        let (n, ev) = dec.decode(&mut buf).unwrap();
        assert_eq!(n, 9);
        assert_eq!(own(ev.unwrap()), text("Hello", false));
        assert!(dec.is_idle());
        assert_eq!(
            dec.assembly.capacity(),
            0,
            "the assembled buffer was handed over"
        );
    }

    #[test]
    fn rfc_5_7_ping_and_masked_pong() {
        let got = feed(&mut client(), &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]).unwrap();
        assert_eq!(got, vec![Ev::Ping(b"Hello".to_vec())]);
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(
            feed(&mut server(), &pong).unwrap(),
            vec![Ev::Pong(b"Hello".to_vec())]
        );
    }

    #[test]
    fn rfc_5_7_256_and_65536_byte_binary() {
        let limits = Limits {
            max_frame: 1 << 20,
            max_message: 1 << 20,
            ..Limits::default()
        };
        let mut dec = MessageDecoder::new(Role::Client, limits);
        let body: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        let mut input = vec![0x82, 0x7E, 0x01, 0x00];
        input.extend_from_slice(&body[..256]);
        input.extend_from_slice(&[0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
        input.extend_from_slice(&body);
        let got = feed(&mut dec, &input).unwrap();
        assert_eq!(
            got,
            vec![
                Ev::Msg(MessageKind::Binary, body[..256].to_vec(), true),
                Ev::Msg(MessageKind::Binary, body.clone(), true)
            ]
        );
        // Masked and cut in the middle of the payload: assembled, same bytes.
        let mut dec = MessageDecoder::new(Role::Server, limits);
        let wire = masked(true, OpCode::Binary, &body);
        let mut a = feed(&mut dec, &wire[..30_001]).unwrap();
        assert!(a.is_empty());
        a = feed(&mut dec, &wire[30_001..]).unwrap();
        assert_eq!(a, vec![Ev::Msg(MessageKind::Binary, body, false)]);
    }

    #[test]
    fn several_frames_in_one_input_one_event_per_call() {
        let mut wire = masked(true, OpCode::Text, b"one");
        wire.extend(masked(true, OpCode::Ping, b"p"));
        wire.extend(masked(true, OpCode::Binary, b"\x00\x01"));
        let mut dec = server();
        let mut buf = wire.clone();
        let (n1, ev) = dec.decode(&mut buf).unwrap();
        assert_eq!((n1, own(ev.unwrap())), (9, text("one", true)));
        let (n2, ev) = dec.decode(&mut buf[n1..]).unwrap();
        assert_eq!((n2, own(ev.unwrap())), (7, Ev::Ping(b"p".to_vec())));
        let (n3, ev) = dec.decode(&mut buf[n1 + n2..]).unwrap();
        assert_eq!(
            (n3, own(ev.unwrap())),
            (8, Ev::Msg(MessageKind::Binary, vec![0, 1], true))
        );
        let (n4, ev) = dec.decode(&mut buf[n1 + n2 + n3..]).unwrap();
        assert_eq!(n4, 0);
        assert!(ev.is_none());
    }

    #[test]
    fn encoders_round_trip_through_the_decoder() {
        let long = "ü".repeat(40_000);
        for payload in [
            "",
            "x",
            "Hello",
            &"a".repeat(125),
            &"b".repeat(126),
            &long[..65534],
        ] {
            let wire = masked(true, OpCode::Text, payload.as_bytes());
            assert_eq!(
                feed(&mut server(), &wire).unwrap(),
                vec![text(payload, true)]
            );
            let mut b = BytesMut::new();
            write_server_frame(&mut b, true, OpCode::Text, payload.as_bytes());
            assert_eq!(feed(&mut client(), &b).unwrap(), vec![text(payload, true)]);
        }
        let mut b = BytesMut::new();
        let (p, n) = crate::protocol::frame::close_payload(1001, "going");
        write_server_frame(&mut b, true, OpCode::Close, &p[..n]);
        assert_eq!(
            feed(&mut client(), &b).unwrap(),
            vec![Ev::Close(Some((1001, "going".into())))]
        );
    }

    #[test]
    fn control_frames_between_fragments_keep_the_assembly() {
        // §5.4: control frames may be injected in the middle of a fragmented message.
        let mut wire = masked(false, OpCode::Text, "Grü".as_bytes());
        wire.extend(masked(true, OpCode::Ping, b"ping"));
        wire.extend(masked(false, OpCode::Continuation, b"\xc3"));
        wire.extend(masked(true, OpCode::Pong, b""));
        wire.extend(masked(true, OpCode::Continuation, b"\x9fe"));
        let mut dec = server();
        let got = feed(&mut dec, &wire).unwrap();
        assert_eq!(
            got,
            vec![
                Ev::Ping(b"ping".to_vec()),
                Ev::Pong(vec![]),
                text("Grüße", false)
            ]
        );
    }

    #[test]
    fn code_point_split_across_fragments_is_valid() {
        // "€" = E2 82 AC cut after each byte, as two and as three fragments.
        let euro = "€".as_bytes();
        for cut in 1..3 {
            let mut wire = masked(false, OpCode::Text, &euro[..cut]);
            wire.extend(masked(true, OpCode::Continuation, &euro[cut..]));
            assert_eq!(feed(&mut server(), &wire).unwrap(), vec![text("€", false)]);
        }
        let mut wire = masked(false, OpCode::Text, &euro[..1]);
        wire.extend(masked(false, OpCode::Continuation, &euro[1..2]));
        wire.extend(masked(true, OpCode::Continuation, &euro[2..]));
        assert_eq!(feed(&mut server(), &wire).unwrap(), vec![text("€", false)]);
    }

    #[test]
    fn empty_fragments_and_empty_messages() {
        let mut wire = masked(false, OpCode::Binary, b"");
        wire.extend(masked(false, OpCode::Continuation, b""));
        wire.extend(masked(true, OpCode::Continuation, b""));
        wire.extend(masked(true, OpCode::Text, b""));
        let got = feed(&mut server(), &wire).unwrap();
        assert_eq!(
            got,
            vec![Ev::Msg(MessageKind::Binary, vec![], false), text("", true)]
        );
    }

    #[test]
    fn fragmentation_errors() {
        // §5.4: a continuation needs a message in progress...
        let e = first_error(&mut server(), &masked(true, OpCode::Continuation, b"x"));
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::UnexpectedContinuation, 1002)
        );
        // ...and a new data frame must not start while one is in progress.
        let mut wire = masked(false, OpCode::Text, b"a");
        wire.extend(masked(true, OpCode::Binary, b"b"));
        let e = first_error(&mut server(), &wire);
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::ExpectedContinuation, 1002)
        );
    }

    #[test]
    fn fragments_per_message_limit() {
        let limits = Limits {
            max_fragments: 3,
            ..Limits::default()
        };
        // Three frames are allowed, with control frames between them not counted (§5.4).
        let mut wire = masked(false, OpCode::Text, b"a");
        wire.extend(masked(false, OpCode::Continuation, b"b"));
        wire.extend(masked(true, OpCode::Ping, b"p"));
        wire.extend(masked(true, OpCode::Continuation, b"c"));
        let mut dec = MessageDecoder::new(Role::Server, limits);
        let evs = feed(&mut dec, &wire).unwrap();
        assert_eq!(
            evs,
            vec![Ev::Ping(b"p".to_vec()), text("abc", false)],
            "three frames pass"
        );
        // The count starts again with the next message.
        let evs = feed(&mut dec, &wire).unwrap();
        assert_eq!(evs.len(), 2);
        // A fourth frame, even empty, is refused from its header: 1008.
        let mut wire = masked(false, OpCode::Binary, b"");
        for _ in 0..2 {
            wire.extend(masked(false, OpCode::Continuation, b""));
        }
        wire.extend(masked(true, OpCode::Continuation, b""));
        let e = first_error(&mut MessageDecoder::new(Role::Server, limits), &wire);
        assert_eq!(e, ProtocolError::TooManyFragments { limit: 3 });
        assert_eq!(e.close_code(), 1008);
        // 0 means no limit.
        let mut wire = masked(false, OpCode::Binary, b"x");
        for _ in 0..10_000 {
            wire.extend(masked(false, OpCode::Continuation, b""));
        }
        wire.extend(masked(true, OpCode::Continuation, b"y"));
        let evs = feed(&mut server(), &wire).unwrap();
        assert_eq!(
            evs,
            vec![Ev::Msg(MessageKind::Binary, b"xy".to_vec(), false)]
        );
    }

    #[test]
    fn message_too_large_at_the_header() {
        let limits = Limits {
            max_frame: 100,
            max_message: 150,
            ..Limits::default()
        };
        let mut dec = MessageDecoder::new(Role::Server, limits);
        let mut wire = masked(false, OpCode::Binary, &[1; 100]);
        wire.extend(masked(true, OpCode::Continuation, &[2; 51]));
        // Header of the second fragment alone is enough: 6 header bytes, no payload sent.
        let second_header = 106 + 6;
        let e = first_error(&mut dec, &wire[..second_header]);
        assert_eq!(
            e,
            ProtocolError::MessageTooLarge {
                len: 151,
                limit: 150
            }
        );
        assert_eq!(e.close_code(), 1009);
        assert!(
            dec.assembly.len() <= 100,
            "nothing appended for the rejected fragment"
        );
        // A single frame over max_message (but within max_frame).
        let mut dec = MessageDecoder::new(
            Role::Server,
            Limits {
                max_frame: 100,
                max_message: 50,
                ..Limits::default()
            },
        );
        let e = first_error(&mut dec, &masked(true, OpCode::Text, &[b'a'; 51])[..6]);
        assert_eq!(e, ProtocolError::MessageTooLarge { len: 51, limit: 50 });
        // Frame over max_frame: 1009 too, from the header alone.
        let e = first_error(&mut server(), &[0x82, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            e,
            ProtocolError::FrameTooLarge {
                len: 1 << 32,
                limit: 64 * 1024
            }
        );
        assert_eq!(e.close_code(), 1009);
    }

    #[test]
    fn set_limits_applies_to_the_next_frame() {
        let mut dec = server();
        let wire = masked(true, OpCode::Binary, &[0; 200]);
        assert_eq!(feed(&mut dec, &wire).unwrap().len(), 1);
        dec.set_limits(Limits {
            max_frame: 100,
            max_message: 100,
            ..Limits::default()
        });
        let e = first_error(&mut dec, &wire);
        assert_eq!(
            e,
            ProtocolError::FrameTooLarge {
                len: 200,
                limit: 100
            }
        );
    }

    #[test]
    fn header_errors_surface_through_the_decoder() {
        let cases: [(&[u8], ProtocolError); 6] = [
            (&[0xC1], ProtocolError::ReservedBits(0b100)),
            (&[0x83], ProtocolError::UnknownOpcode(3)),
            (&[0x09], ProtocolError::FragmentedControlFrame),
            (&[0x89, 0xFE], ProtocolError::ControlFrameTooLong(126)),
            (&[0x81, 0x05], ProtocolError::UnmaskedFrame),
            (&[0x82, 0xFF, 0x80], ProtocolError::InvalidLength),
        ];
        for (wire, want) in cases {
            let e = first_error(&mut server(), wire);
            assert_eq!(e, want);
            assert_eq!(e.close_code(), 1002);
        }
    }

    #[test]
    fn invalid_utf8_whole_frame_and_at_message_end() {
        let e = first_error(&mut server(), &masked(true, OpCode::Text, b"ok\xffok"));
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::InvalidUtf8, 1007)
        );
        // A message that ends in the middle of a code point.
        let mut wire = masked(false, OpCode::Text, b"ok");
        wire.extend(masked(true, OpCode::Continuation, &"€".as_bytes()[..2]));
        assert_eq!(
            first_error(&mut server(), &wire),
            ProtocolError::InvalidUtf8
        );
        // A complete frame that ends mid code point is fine only when not final.
        let wire = masked(true, OpCode::Text, &"€".as_bytes()[..2]);
        assert_eq!(
            first_error(&mut server(), &wire),
            ProtocolError::InvalidUtf8
        );
        // Binary is never checked.
        let got = feed(&mut server(), &masked(true, OpCode::Binary, b"\xff")).unwrap();
        assert_eq!(got, vec![Ev::Msg(MessageKind::Binary, vec![0xff], true)]);
    }

    #[test]
    fn invalid_utf8_fails_fast_mid_frame() {
        // Autobahn 6.4.x: the invalid byte arrives in a piece long before the frame ends; the
        // error must come with that piece, not at the end of the frame.
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(b"\xf4\x90\x80\x80"); // beyond U+10FFFF
        payload.extend_from_slice(&[b'x'; 100]);
        let wire = masked(true, OpCode::Text, &payload);
        let mut dec = server();
        let bad_at = 6 + "κόσμε".len() + 1; // the F4 90 prefix is already impossible
        assert!(feed(&mut dec, &wire[..bad_at]).unwrap().is_empty());
        assert_eq!(
            first_error(&mut dec, &wire[bad_at..bad_at + 1]),
            ProtocolError::InvalidUtf8
        );
        // Same with a fragment boundary inside a bad sequence: E0 80 is never valid.
        let mut wire = masked(false, OpCode::Text, b"a\xe0");
        wire.extend(masked(false, OpCode::Continuation, b"\x80"));
        assert_eq!(
            first_error(&mut server(), &wire),
            ProtocolError::InvalidUtf8
        );
    }

    #[test]
    fn close_frames() {
        // §5.5.1 and §7.4.
        assert_eq!(
            feed(&mut server(), &masked(true, OpCode::Close, b"")).unwrap(),
            vec![Ev::Close(None)]
        );
        let (p, n) = crate::protocol::frame::close_payload(1000, "done ✓");
        let got = feed(&mut server(), &masked(true, OpCode::Close, &p[..n])).unwrap();
        assert_eq!(got, vec![Ev::Close(Some((1000, "done ✓".into())))]);
        let got = feed(&mut server(), &masked(true, OpCode::Close, &[0x0F, 0xA0])).unwrap();
        assert_eq!(got, vec![Ev::Close(Some((4000, String::new())))]);

        let e = first_error(&mut server(), &masked(true, OpCode::Close, &[0x03]));
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::InvalidClosePayload, 1002)
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            let e = first_error(
                &mut server(),
                &masked(true, OpCode::Close, &code.to_be_bytes()),
            );
            assert_eq!(
                (e.clone(), e.close_code()),
                (ProtocolError::InvalidCloseCode(code), 1002)
            );
        }
        let e = first_error(
            &mut server(),
            &masked(true, OpCode::Close, b"\x03\xe8bad\xc0\xafutf8"),
        );
        assert_eq!(
            (e.clone(), e.close_code()),
            (ProtocolError::InvalidCloseReason, 1007)
        );
    }

    #[test]
    fn control_frame_split_across_inputs_is_held_apart_from_the_message() {
        let (p, n) = crate::protocol::frame::close_payload(1000, &"r".repeat(123));
        let wire = masked(true, OpCode::Close, &p[..n]);
        let mut dec = server();
        for cut in [1, 2, 7, 50, wire.len() - 1] {
            let mut dec2 = server();
            assert!(feed(&mut dec2, &wire[..cut]).unwrap().is_empty());
            assert_eq!(
                dec2.assembly.capacity(),
                0,
                "a control payload is not assembled with the message"
            );
            if cut > 6 {
                // Past the 6-byte header: the payload has begun arriving.
                assert_eq!(dec2.heap_bytes(), MAX_CONTROL_PAYLOAD, "but charged");
            }
            let got = feed(&mut dec2, &wire[cut..]).unwrap();
            assert_eq!(got, vec![Ev::Close(Some((1000, "r".repeat(123))))]);
        }
        // Byte by byte, a ping in the middle of a fragmented message.
        let mut wire = masked(false, OpCode::Binary, b"abc");
        wire.extend(masked(true, OpCode::Ping, b"12345"));
        wire.extend(masked(true, OpCode::Continuation, b"def"));
        let mut got = Vec::new();
        for b in &wire {
            got.extend(feed(&mut dec, &[*b]).unwrap());
        }
        assert_eq!(
            got,
            vec![
                Ev::Ping(b"12345".to_vec()),
                Ev::Msg(MessageKind::Binary, b"abcdef".to_vec(), false)
            ]
        );
        assert!(dec.is_idle());
        assert_eq!(dec.assembly.capacity(), 0);
    }

    #[test]
    fn rsv_bits_allowed_after_negotiation() {
        let mut wire = masked(true, OpCode::Binary, b"z");
        wire[0] |= 0x40;
        assert_eq!(
            first_error(&mut server(), &wire),
            ProtocolError::ReservedBits(0b100)
        );
        let mut dec = server();
        dec.set_allowed_rsv(0b100);
        assert_eq!(
            feed(&mut dec, &wire).unwrap(),
            vec![Ev::Compressed(MessageKind::Binary, b"z".to_vec())]
        );
    }

    #[test]
    fn rsv1_marks_a_compressed_message_and_only_its_first_frame() {
        let rsv1 = |mut w: Vec<u8>| {
            w[0] |= 0x40;
            w
        };
        let deflate = || {
            let mut d = server();
            d.set_allowed_rsv(RSV1);
            d
        };
        // Fragmented: RSV1 on the first frame; the bytes (not UTF-8) are not checked yet.
        let mut wire = rsv1(masked(false, OpCode::Text, &[0xff, 0xfe]));
        wire.extend(masked(true, OpCode::Continuation, &[0xc3]));
        assert_eq!(
            feed(&mut deflate(), &wire).unwrap(),
            vec![Ev::Compressed(MessageKind::Text, vec![0xff, 0xfe, 0xc3])]
        );
        // A plain message after it is checked again.
        let mut dec = deflate();
        let mut wire = rsv1(masked(true, OpCode::Text, &[0xff]));
        wire.extend(masked(true, OpCode::Text, &[0xff]));
        assert_eq!(
            feed(&mut dec, &wire).unwrap_err(),
            ProtocolError::InvalidUtf8
        );
        // RFC 7692 §6.1: RSV1 on a continuation or a control frame is a protocol error.
        let mut wire = masked(false, OpCode::Binary, b"a");
        wire.extend(rsv1(masked(true, OpCode::Continuation, b"b")));
        let e = feed(&mut deflate(), &wire).unwrap_err();
        assert_eq!(e.close_code(), close::PROTOCOL_ERROR);
        for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
            let e = feed(&mut deflate(), &rsv1(masked(true, op, b""))).unwrap_err();
            assert_eq!(e, ProtocolError::ReservedBits(RSV1), "{op:?}");
        }
    }

    #[test]
    fn memory_follows_received_bytes() {
        // A header claiming 60000 bytes and 10 bytes of payload: no 60000-byte reservation.
        let wire = masked(true, OpCode::Binary, &[5; 60_000]);
        let mut dec = server();
        assert!(feed(&mut dec, &wire[..8 + 10]).unwrap().is_empty());
        assert!(dec.heap_bytes() < 1000, "{}", dec.heap_bytes());
        // Cut in half: the rest of the frame is reserved at once, no regrowth later.
        let mut dec = server();
        assert!(feed(&mut dec, &wire[..30_000]).unwrap().is_empty());
        let cap = dec.heap_bytes();
        assert!(cap >= 60_000, "{cap}");
        let got = feed(&mut dec, &wire[30_000..]).unwrap();
        assert_eq!(
            got,
            vec![Ev::Msg(MessageKind::Binary, vec![5; 60_000], false)]
        );
        assert_eq!(dec.heap_bytes(), 0);
    }

    #[test]
    fn decoder_is_small() {
        // Per-connection state, idle or not: the inline header buffer, the limits and the
        // UTF-8 state; the split control frame buffer is boxed.
        let size = std::mem::size_of::<MessageDecoder>();
        println!("MessageDecoder: {size} bytes");
        assert!(size <= 136, "{size}");
    }
}
