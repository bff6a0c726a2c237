//! Decoding: whole records taken off the front of a read buffer, payloads without a copy.

use bytes::{Buf, Bytes, BytesMut};

use super::*;

/// Takes whole frames off the front of a read buffer.
///
/// Holds no state between frames beyond its settings: feed it the same buffer after every
/// read. After an error the link must be dropped; the stream cannot be resynchronised.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_frame: usize,
    from: Option<Side>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder accepting frames whose length prefix is at most `max_frame`, of any type.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder {
            max_frame,
            from: None,
        }
    }

    /// Accept only frames `side` may send (plus those sent either way): the gateway decodes
    /// with `only_from(Side::Backend)`, a backend with `only_from(Side::Gateway)`.
    pub fn only_from(mut self, side: Side) -> Decoder {
        self.from = Some(side);
        self
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Take the next whole frame off the front of `buf`; `Ok(None)` when `buf` does not yet
    /// hold one, after reserving room for the rest of it (never more than `max_frame`).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Record>, RelayError> {
        if buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        // Checked before reserving anything: a hostile prefix costs nothing.
        if len > self.max_frame {
            return Err(RelayError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len == 0 {
            return Err(RelayError::EmptyFrame);
        }
        // Cannot overflow on 64-bit (len fits in u32); saturates on smaller targets, where a
        // frame that large could never be buffered anyway.
        let total = LEN_PREFIX.saturating_add(len);
        let Some(&code) = buf.get(LEN_PREFIX) else {
            buf.reserve(total - buf.len());
            return Ok(None);
        };
        let name = type_name(code).ok_or(RelayError::UnknownType(code))?;
        if let (Some(want), Some(sent_by)) = (self.from, sender_of(code)) {
            if want != sent_by {
                return Err(RelayError::WrongDirection { frame: name });
            }
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut body = buf.split_to(total);
        body.advance(LEN_PREFIX + 1);
        let mut r = Reader { body, frame: name };
        let frame = r.frame(code)?;
        if !r.body.is_empty() {
            return Err(RelayError::TrailingBytes {
                frame: name,
                extra: r.body.len(),
            });
        }
        Ok(Some(frame))
    }
}

/// A cursor over one frame's body that names the field it failed on.
struct Reader {
    body: BytesMut,
    frame: &'static str,
}

impl Reader {
    fn frame(&mut self, code: u8) -> Result<Record, RelayError> {
        Ok(match code {
            ty::HELLO => {
                let magic: [u8; 4] = self.take(4, "magic")?[..].try_into().unwrap_or_default();
                if magic != MAGIC {
                    return Err(RelayError::BadMagic(magic));
                }
                let version = self.u16("version")?;
                // Checked before the rest: a later version may lay out its hello differently
                // after the version field.
                if version != VERSION {
                    return Err(RelayError::BadVersion {
                        got: version,
                        want: VERSION,
                    });
                }
                Record::Hello {
                    version,
                    name: self.string("name")?,
                }
            }
            ty::PING => Record::Ping(self.u64("nonce")?),
            ty::PONG => Record::Pong(self.u64("nonce")?),
            ty::ERROR => Record::Error {
                reason: self.string("reason")?,
            },
            ty::CLOSE => Record::Close {
                conn: self.u64("conn")?,
                code: self.u16("code")?,
                reason: self.string("reason")?,
            },
            ty::OPEN => {
                let conn = self.u64("conn")?;
                let flags = self.u8("flags")?;
                if flags & !(FLAG_AUTHORIZE | FLAG_REPLAY) != 0 {
                    return Err(RelayError::BadFlag {
                        frame: self.frame,
                        field: "flags",
                        value: flags,
                    });
                }
                let path = self.string("path")?;
                let query = self.opt_string("query")?;
                let peer = self.opt_string("peer")?;
                let n = self.u16("header count")?;
                // Each header takes at least 4 bytes, so a bogus count is caught here
                // instead of reserving room for it.
                if self.body.len() < n as usize * 4 {
                    return Err(self.truncated("headers"));
                }
                let mut headers = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let name = self.string("header name")?;
                    let value = self.string("header value")?;
                    headers.push((name, value));
                }
                Record::Open {
                    conn,
                    path,
                    query,
                    headers,
                    peer,
                    authorize: flags & FLAG_AUTHORIZE != 0,
                    replay: flags & FLAG_REPLAY != 0,
                }
            }
            ty::MESSAGE => {
                let conn = self.u64("conn")?;
                let (kind, payload) = self.message()?;
                Record::Message {
                    conn,
                    kind,
                    payload,
                }
            }
            ty::GONE => Record::Gone {
                conn: self.u64("conn")?,
            },
            ty::ACCEPT => Record::Accept {
                conn: self.u64("conn")?,
            },
            ty::REJECT => Record::Reject {
                conn: self.u64("conn")?,
                status: self.u16("status")?,
                reason: self.string("reason")?,
            },
            ty::SEND => {
                let conn = self.u64("conn")?;
                let (kind, payload) = self.message()?;
                Record::Send {
                    conn,
                    kind,
                    payload,
                }
            }
            ty::SUBSCRIBE => Record::Subscribe {
                conn: self.u64("conn")?,
                topic: self.topic()?,
            },
            ty::UNSUBSCRIBE => Record::Unsubscribe {
                conn: self.u64("conn")?,
                topic: self.topic()?,
            },
            ty::PUBLISH => {
                let topic = self.topic()?;
                let (kind, payload) = self.message()?;
                Record::Publish {
                    topic,
                    kind,
                    payload,
                }
            }
            ty::BROADCAST => {
                let (kind, payload) = self.message()?;
                Record::Broadcast { kind, payload }
            }
            other => return Err(RelayError::UnknownType(other)),
        })
    }

    fn truncated(&self, field: &'static str) -> RelayError {
        RelayError::Truncated {
            frame: self.frame,
            field,
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<BytesMut, RelayError> {
        if self.body.len() < n {
            return Err(self.truncated(field));
        }
        Ok(self.body.split_to(n))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, RelayError> {
        if self.body.is_empty() {
            return Err(self.truncated(field));
        }
        Ok(self.body.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, RelayError> {
        if self.body.len() < 2 {
            return Err(self.truncated(field));
        }
        Ok(self.body.get_u16())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, RelayError> {
        if self.body.len() < 8 {
            return Err(self.truncated(field));
        }
        Ok(self.body.get_u64())
    }

    fn str_bytes(&mut self, field: &'static str) -> Result<BytesMut, RelayError> {
        let n = self.u16(field)? as usize;
        self.take(n, field)
    }

    fn string(&mut self, field: &'static str) -> Result<String, RelayError> {
        let b = self.str_bytes(field)?;
        match std::str::from_utf8(&b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.bad_utf8(field)),
        }
    }

    fn topic(&mut self) -> Result<Topic, RelayError> {
        let b = self.str_bytes("topic")?;
        match std::str::from_utf8(&b) {
            Ok(s) => Ok(Topic::from(s)),
            Err(_) => Err(self.bad_utf8("topic")),
        }
    }

    fn bad_utf8(&self, field: &'static str) -> RelayError {
        RelayError::InvalidUtf8 {
            frame: self.frame,
            field,
        }
    }

    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>, RelayError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => self.string(field).map(Some),
            value => Err(RelayError::BadFlag {
                frame: self.frame,
                field,
                value,
            }),
        }
    }

    /// `u8 kind` + `u32 length` + payload, taken without a copy. Text must be UTF-8: the
    /// gateway hands it to clients as a text frame (RFC 6455 §8.1).
    fn message(&mut self) -> Result<(MessageKind, Bytes), RelayError> {
        let kind = match self.u8("kind")? {
            KIND_TEXT => MessageKind::Text,
            KIND_BINARY => MessageKind::Binary,
            kind => {
                return Err(RelayError::BadKind {
                    frame: self.frame,
                    kind,
                })
            }
        };
        if self.body.len() < 4 {
            return Err(self.truncated("payload"));
        }
        let n = self.body.get_u32() as usize;
        let payload = self.take(n, "payload")?.freeze();
        if kind == MessageKind::Text && simdutf8::basic::from_utf8(&payload).is_err() {
            return Err(self.bad_utf8("payload"));
        }
        Ok((kind, payload))
    }
}
