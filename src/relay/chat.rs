//! The embedded default upstream's logic, in-process behind the relay thread: the chat
//! contract (`join` a room, `say` to it) for text JSON objects with an `action`, and a plain
//! echo for everything else, so the gateway stays an echo server for Autobahn and load
//! tests. The echo path costs one look at the first non-whitespace byte.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{ToEdge, ToUpstream, Topic};
use crate::edge::ConnId;
use crate::protocol::message::MessageKind;

/// Rooms one connection may be in unless [`ChatEcho::with_max_rooms`] says otherwise; it
/// bounds this upstream's memory per connection.
pub const DEFAULT_MAX_ROOMS: usize = 100;

/// Which rooms each connection joined; the edge holds the topic subscriptions themselves.
#[derive(Debug)]
pub struct ChatEcho {
    rooms: HashMap<ConnId, HashSet<Box<str>>>,
    max_rooms: usize,
}

impl Default for ChatEcho {
    fn default() -> Self {
        ChatEcho::with_max_rooms(DEFAULT_MAX_ROOMS)
    }
}

#[derive(Serialize)]
struct Joined<'a> {
    event: &'static str,
    room: &'a str,
}

#[derive(Serialize)]
struct Said<'a> {
    event: &'static str,
    room: &'a str,
    text: &'a str,
    from: String,
}

#[derive(Serialize)]
struct Failed<'a> {
    event: &'static str,
    reason: &'a str,
}

impl ChatEcho {
    pub fn new() -> ChatEcho {
        ChatEcho::default()
    }

    pub fn with_max_rooms(max_rooms: usize) -> ChatEcho {
        ChatEcho {
            rooms: HashMap::new(),
            max_rooms,
        }
    }

    /// Handle one message from a core; replies go to `out` in the order the client must
    /// see them (`Subscribe` before `joined`, so the client is a member when told so).
    pub fn handle(&mut self, msg: ToUpstream, out: &mut impl FnMut(ToEdge)) {
        match msg {
            ToUpstream::Message {
                conn,
                kind,
                payload,
                ..
            } => {
                if kind == MessageKind::Text && starts_with_brace(&payload) {
                    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&payload) {
                        if let Some(action) = fields.get("action") {
                            self.chat(conn, action, &fields, out);
                            return;
                        }
                    }
                }
                out(ToEdge::Send {
                    conn,
                    kind,
                    payload,
                });
            }
            ToUpstream::Fence { conn, code, reason } => out(ToEdge::Close { conn, code, reason }),
            ToUpstream::Open { .. } => {}
            ToUpstream::Closed { conn, .. } => {
                self.rooms.remove(&conn);
            }
        }
    }

    /// Rooms `conn` is in (for tests and introspection).
    pub fn rooms_of(&self, conn: ConnId) -> impl Iterator<Item = &str> {
        self.rooms.get(&conn).into_iter().flatten().map(|r| &**r)
    }

    fn chat(
        &mut self,
        conn: ConnId,
        action: &Value,
        fields: &Map<String, Value>,
        out: &mut impl FnMut(ToEdge),
    ) {
        let str_field = |name| fields.get(name).and_then(Value::as_str);
        match action.as_str() {
            Some("join") => {
                let Some(room) = str_field("room").filter(|r| !r.is_empty()) else {
                    return error(conn, "join needs a non-empty string \"room\"", out);
                };
                let rooms = self.rooms.entry(conn).or_default();
                if !rooms.contains(room) {
                    if rooms.len() >= self.max_rooms {
                        return error(conn, "too many rooms", out);
                    }
                    rooms.insert(room.into());
                }
                out(ToEdge::Subscribe {
                    conn,
                    topic: topic(room),
                });
                send_json(
                    conn,
                    &Joined {
                        event: "joined",
                        room,
                    },
                    out,
                );
            }
            Some("say") => {
                let (Some(room), Some(text)) = (str_field("room"), str_field("text")) else {
                    return error(conn, "say needs string \"room\" and \"text\"", out);
                };
                if !self.rooms.get(&conn).is_some_and(|r| r.contains(room)) {
                    return error(conn, "not in that room: join it first", out);
                }
                let said = Said {
                    event: "said",
                    room,
                    text,
                    from: conn.as_u64().to_string(),
                };
                out(ToEdge::Publish {
                    topic: topic(room),
                    kind: MessageKind::Text,
                    payload: to_bytes(&said),
                });
            }
            Some(_) => error(conn, "unknown action: expected join or say", out),
            None => error(conn, "action must be a string", out),
        }
    }
}

fn topic(room: &str) -> Topic {
    Arc::from(format!("room:{room}"))
}

fn to_bytes(v: &impl Serialize) -> Bytes {
    // Serializing these structs of strings cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn send_json(conn: ConnId, v: &impl Serialize, out: &mut impl FnMut(ToEdge)) {
    out(ToEdge::Send {
        conn,
        kind: MessageKind::Text,
        payload: to_bytes(v),
    });
}

fn error(conn: ConnId, reason: &str, out: &mut impl FnMut(ToEdge)) {
    send_json(
        conn,
        &Failed {
            event: "error",
            reason,
        },
        out,
    );
}

/// JSON whitespace (RFC 8259 §2) then `{`: the only text worth parsing.
fn starts_with_brace(payload: &[u8]) -> bool {
    payload
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        == Some(&b'{')
}
