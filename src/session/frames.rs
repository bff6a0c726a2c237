//! The receive path of an open connection: frames decoded where they lie (unmasked in
//! place), compressed messages inflated through the core's shared inflater, and each event
//! acted on (route to the relay, echo, pong, close).

use crate::admission::{MessageRefusal, PolicyRefusal};
use crate::config::Upstream;
use crate::protocol::close;
use crate::protocol::frame::OpCode;
use crate::protocol::message::{Event, MessageKind, Payload};
use crate::protocol::ProtocolError;

use super::{
    compression, encode, encode_owned, in_process, opcode_for, Action, Context, Count, Output,
    Session, PONG_COALESCE_PAST,
};

impl Session {
    /// Decode frames where they lie, unmasking in place, and act on each event.
    pub(super) fn on_frames(&mut self, cx: &mut Context<'_>, data: &mut [u8]) {
        let mut off = 0;
        while off < data.len() && !self.reading_done {
            let accepts_data = self.close.accepts_data();
            let close_sent = self.close.close_sent();
            let (n, event) = match self.decoder.decode(&mut data[off..]) {
                Ok(r) => r,
                Err(e) => {
                    cx.meter.count(Count::ProtocolError);
                    if let ProtocolError::TooManyFragments { .. } = e {
                        cx.meter.count(Count::Refused(PolicyRefusal::Fragments));
                    }
                    tracing::debug!(conn = %self.id, "protocol error: {e}");
                    let reason = e.to_string();
                    self.close_for_error(cx, e.close_code(), &reason);
                    return;
                }
            };
            off += n;
            let Some(event) = event else { break };
            // RFC 7692 §6.2: a compressed message is inflated (capped) before anything else.
            let event = match event {
                Event::Compressed { kind, payload } => {
                    let limit = cx.config.message_limits().max_message;
                    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                    let (own, agreed) = (&mut self.contexts, self.deflate);
                    let p = payload.as_slice();
                    match compression::inflate_message(own, agreed, self.route, cx, kind, p, limit)
                    {
                        Ok(bytes) => Ok(Event::Message {
                            kind,
                            payload: Payload::Owned(bytes),
                        }),
                        Err(e) => Err(e),
                    }
                }
                other => Ok(other),
            };
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    cx.meter.count(Count::ProtocolError);
                    tracing::debug!(conn = %self.id, "compressed message refused: {e}");
                    self.close_for_error(cx, e.close_code(), &e.to_string());
                    return;
                }
            };
            let action = match event {
                Event::Message {
                    kind: MessageKind::Text,
                    payload,
                } if cx.panic_on == Some(payload.as_slice()) => {
                    panic!("test hook: message {:?}", payload.as_slice())
                }
                Event::Message { .. }
                    if self.rate.as_mut().is_some_and(|r| !r.on_message(cx.now_ms)) =>
                {
                    Action::Refuse(MessageRefusal::Rate)
                }
                Event::Message { kind, payload } => {
                    cx.meter.count(Count::MessageIn { route: self.route });
                    self.traffic.messages_in += 1;
                    if !accepts_data {
                        Action::None
                    } else if cx.config.upstream == Upstream::LocalEcho {
                        let op = opcode_for(kind);
                        match payload {
                            // Assembled for this message alone: echoed without a copy.
                            Payload::Owned(bytes) if self.deflate.is_none() => {
                                Action::Data(encode_owned(op, bytes))
                            }
                            payload => {
                                let (own, agreed) = (&mut self.contexts, self.deflate);
                                let p = payload.as_slice();
                                Action::Data(
                                    compression::encode_message(own, agreed, self.route, cx, op, p)
                                        .into(),
                                )
                            }
                        }
                    } else {
                        let route = cx.routes.route(self.route);
                        match cx
                            .routes
                            .select(route, kind, payload.as_slice(), cx.scratch)
                        {
                            Ok(upstream) => {
                                self.uses_backend |= !in_process(cx.routes, upstream);
                                Action::Relay(upstream, kind, payload.into_bytes())
                            }
                            Err(e) => Action::Refuse(e.into()),
                        }
                    }
                }
                // Inflated into a Message above.
                Event::Compressed { .. } => Action::None,
                Event::Ping(p) if !close_sent => Action::Pong(encode(OpCode::Pong, p)),
                Event::Ping(_) => Action::None,
                Event::Pong(_) => Action::PongReceived,
                Event::Close(c) => {
                    let (code, reason) = c.map_or((close::NO_STATUS, String::new()), |(c, r)| {
                        (c, r.to_string())
                    });
                    Action::Close(code, reason)
                }
            };
            match action {
                Action::None => {}
                Action::Data(frame) => {
                    self.last_message_ms = cx.now_ms;
                    // Answered while it is read: the queue shows it at once, so no slack.
                    self.queue_data(cx, frame, 1);
                }
                Action::Relay(upstream, kind, payload) => {
                    self.last_message_ms = cx.now_ms;
                    cx.meter.count(Count::Relayed {
                        route: self.route,
                        upstream,
                    });
                    cx.out.push(Output::Message {
                        upstream,
                        kind,
                        payload,
                    });
                }
                Action::Refuse(refusal) => {
                    cx.meter.count(Count::ProtocolError);
                    if let Some(metric) = refusal.metric() {
                        cx.meter.count(Count::Refused(metric));
                    }
                    tracing::debug!(conn = %self.id, "message refused: {refusal}");
                    self.close_for_error(cx, refusal.close_code(), &refusal.to_string());
                    return;
                }
                Action::Pong(frame) => {
                    // Only the newest unanswered pong is kept (RFC 6455 §5.5.3) once the
                    // client stops reading; a queue over `send_queue_bytes` stops reading.
                    self.out.push_pong(frame, PONG_COALESCE_PAST);
                }
                Action::PongReceived => self.ping_sent_ms = None,
                Action::Close(code, reason) => {
                    tracing::debug!(conn = %self.id, code, reason = %reason, "client sent close");
                    self.close.receive();
                    self.close_code = code;
                    // RFC 6455 §5.5.1: answer with a close echoing the status code, after the
                    // replies to what the client sent before it.
                    self.close_after_replies(cx, code, "");
                }
            }
        }
    }
}
