//! Encoding: one [`Record`] appended to an output buffer.

use bytes::{BufMut, BytesMut};

use super::*;

/// Append `frame` to `out`.
///
/// Never fails: a string longer than [`MAX_STRING`] bytes is cut at the last character
/// boundary before it and a payload beyond `u32::MAX` bytes at that length. Neither happens
/// for values the gateway produces (handshakes, reasons and decoded topics are far shorter,
/// messages are bounded by `max_message`); check [`encoded_len`] against the peer's limit
/// before sending a large payload.
pub fn encode(frame: &Record, out: &mut BytesMut) {
    let len = encoded_len(frame);
    out.reserve(len);
    out.put_u32((len - LEN_PREFIX) as u32);
    out.put_u8(frame.type_code());
    match frame {
        Record::Hello { version, name } => {
            out.put_slice(&MAGIC);
            out.put_u16(*version);
            put_str(out, name);
        }
        Record::Ping(n) | Record::Pong(n) => out.put_u64(*n),
        Record::Error { reason } => put_str(out, reason),
        Record::Close { conn, code, reason } => {
            out.put_u64(*conn);
            out.put_u16(*code);
            put_str(out, reason);
        }
        Record::Open {
            conn,
            path,
            query,
            headers,
            peer,
            authorize,
            replay,
        } => {
            out.put_u64(*conn);
            let mut flags = 0;
            if *authorize {
                flags |= FLAG_AUTHORIZE;
            }
            if *replay {
                flags |= FLAG_REPLAY;
            }
            out.put_u8(flags);
            put_str(out, path);
            put_opt_str(out, query.as_deref());
            put_opt_str(out, peer.as_deref());
            let n = headers.len().min(u16::MAX as usize);
            out.put_u16(n as u16);
            for (name, value) in &headers[..n] {
                put_str(out, name);
                put_str(out, value);
            }
        }
        Record::Message {
            conn,
            kind,
            payload,
        }
        | Record::Send {
            conn,
            kind,
            payload,
        } => {
            out.put_u64(*conn);
            out.put_u8(kind_code(*kind));
            put_payload(out, payload);
        }
        Record::Gone { conn } | Record::Accept { conn } => out.put_u64(*conn),
        Record::Reject {
            conn,
            status,
            reason,
        } => {
            out.put_u64(*conn);
            out.put_u16(*status);
            put_str(out, reason);
        }
        Record::Subscribe { conn, topic } | Record::Unsubscribe { conn, topic } => {
            out.put_u64(*conn);
            put_str(out, topic);
        }
        Record::Publish {
            topic,
            kind,
            payload,
        } => {
            put_str(out, topic);
            out.put_u8(kind_code(*kind));
            put_payload(out, payload);
        }
        Record::Broadcast { kind, payload } => {
            out.put_u8(kind_code(*kind));
            put_payload(out, payload);
        }
    }
}

/// Bytes [`encode`] appends for `frame`, length prefix included.
pub fn encoded_len(frame: &Record) -> usize {
    let body = match frame {
        Record::Hello { name, .. } => 4 + 2 + str_len(name),
        Record::Ping(_) | Record::Pong(_) => 8,
        Record::Error { reason } => str_len(reason),
        Record::Close { reason, .. } => 8 + 2 + str_len(reason),
        Record::Open {
            path,
            query,
            headers,
            peer,
            ..
        } => {
            let n = headers.len().min(u16::MAX as usize);
            8 + 1
                + str_len(path)
                + opt_str_len(query.as_deref())
                + opt_str_len(peer.as_deref())
                + 2
                + headers[..n]
                    .iter()
                    .map(|(k, v)| str_len(k) + str_len(v))
                    .sum::<usize>()
        }
        Record::Message { payload, .. } | Record::Send { payload, .. } => {
            8 + 1 + payload_len(payload)
        }
        Record::Gone { .. } | Record::Accept { .. } => 8,
        Record::Reject { reason, .. } => 8 + 2 + str_len(reason),
        Record::Subscribe { topic, .. } | Record::Unsubscribe { topic, .. } => 8 + str_len(topic),
        Record::Publish { topic, payload, .. } => str_len(topic) + 1 + payload_len(payload),
        Record::Broadcast { payload, .. } => 1 + payload_len(payload),
    };
    LEN_PREFIX + 1 + body
}

fn kind_code(kind: MessageKind) -> u8 {
    match kind {
        MessageKind::Text => KIND_TEXT,
        MessageKind::Binary => KIND_BINARY,
    }
}

/// `s` cut to at most [`MAX_STRING`] bytes on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn str_len(s: &str) -> usize {
    2 + clip(s).len()
}

fn opt_str_len(s: Option<&str>) -> usize {
    1 + s.map_or(0, str_len)
}

fn payload_len(p: &[u8]) -> usize {
    4 + p.len().min(u32::MAX as usize)
}

fn put_str(out: &mut BytesMut, s: &str) {
    let s = clip(s);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_opt_str(out: &mut BytesMut, s: Option<&str>) {
    match s {
        None => out.put_u8(0),
        Some(s) => {
            out.put_u8(1);
            put_str(out, s);
        }
    }
}

fn put_payload(out: &mut BytesMut, p: &[u8]) {
    let p = &p[..p.len().min(u32::MAX as usize)];
    out.put_u32(p.len() as u32);
    out.put_slice(p);
}
