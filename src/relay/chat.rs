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

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> ConnId {
        ConnId::new(1, 3, 2)
    }

    fn b() -> ConnId {
        ConnId::new(1, 9, 4)
    }

    fn msg(conn: ConnId, kind: MessageKind, payload: &[u8]) -> ToUpstream {
        ToUpstream::Message {
            conn,
            upstream: 0,
            kind,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn run(chat: &mut ChatEcho, m: ToUpstream) -> Vec<ToEdge> {
        let mut out = Vec::new();
        chat.handle(m, &mut |e| out.push(e));
        out
    }

    fn say_text(chat: &mut ChatEcho, conn: ConnId, text: &str) -> Vec<ToEdge> {
        run(chat, msg(conn, MessageKind::Text, text.as_bytes()))
    }

    fn json(payload: &Bytes) -> Value {
        serde_json::from_slice(payload).unwrap()
    }

    /// The single reply to `conn`, parsed.
    fn reply_to(out: &[ToEdge], conn: ConnId) -> Value {
        match out {
            [ToEdge::Send {
                conn: c,
                kind: MessageKind::Text,
                payload,
            }] if *c == conn => json(payload),
            other => panic!("expected one text reply to {conn:?}, got {other:?}"),
        }
    }

    #[test]
    fn join_subscribes_then_confirms() {
        let mut chat = ChatEcho::new();
        let out = say_text(&mut chat, a(), r#"{"action":"join","room":"lobby"}"#);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            matches!(&out[0], ToEdge::Subscribe { conn, topic } if *conn == a() && &**topic == "room:lobby")
        );
        assert_eq!(
            reply_to(&out[1..], a()),
            serde_json::json!({"event":"joined","room":"lobby"})
        );
        assert_eq!(chat.rooms_of(a()).collect::<Vec<_>>(), ["lobby"]);
    }

    #[test]
    fn say_publishes_to_the_room_with_the_sender_id() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"r\"1"}"#);
        let out = say_text(
            &mut chat,
            a(),
            r#"{"text":"hi \"there\"\n\u00e9</script>","room":"r\"1","action":"say"}"#,
        );
        let [ToEdge::Publish {
            topic,
            kind: MessageKind::Text,
            payload,
        }] = &out[..]
        else {
            panic!("{out:?}");
        };
        assert_eq!(&**topic, "room:r\"1");
        assert_eq!(
            json(payload),
            serde_json::json!({
                "event": "said",
                "room": "r\"1",
                "text": "hi \"there\"\n\u{e9}</script>",
                "from": a().as_u64().to_string(),
            })
        );
        // Field order as documented: event first.
        assert!(
            payload.starts_with(br#"{"event":"said","room":"#),
            "{payload:?}"
        );
    }

    #[test]
    fn say_to_a_room_not_joined_is_an_error_to_the_sender_only() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"x"}"#);
        let out = say_text(&mut chat, b(), r#"{"action":"say","room":"x","text":"t"}"#);
        let v = reply_to(&out, b());
        assert_eq!(v["event"], "error");
        assert!(v["reason"].as_str().unwrap().contains("join"), "{v}");
    }

    #[test]
    fn bad_chat_messages_get_an_error_event() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"x"}"#);
        for m in [
            r#"{"action":"leave","room":"x"}"#,
            r#"{"action":7}"#,
            r#"{"action":null}"#,
            r#"{"action":"join"}"#,
            r#"{"action":"join","room":""}"#,
            r#"{"action":"join","room":5}"#,
            r#"{"action":"say","room":"x"}"#,
            r#"{"action":"say","text":"t"}"#,
            r#"{"action":"say","room":"x","text":1}"#,
        ] {
            let out = say_text(&mut chat, a(), m);
            let v = reply_to(&out, a());
            assert_eq!(v["event"], "error", "{m}");
            assert!(!v["reason"].as_str().unwrap().is_empty(), "{m}");
        }
    }

    #[test]
    fn rooms_per_connection_are_bounded() {
        let mut chat = ChatEcho::with_max_rooms(2);
        for r in ["a", "b", "a"] {
            let out = say_text(
                &mut chat,
                a(),
                &format!(r#"{{"action":"join","room":"{r}"}}"#),
            );
            assert!(matches!(out[0], ToEdge::Subscribe { .. }), "{r}: {out:?}");
        }
        let out = say_text(&mut chat, a(), r#"{"action":"join","room":"c"}"#);
        assert_eq!(reply_to(&out, a())["reason"], "too many rooms");
    }

    #[test]
    fn everything_else_is_echoed_unchanged() {
        let mut chat = ChatEcho::new();
        let cases: [(MessageKind, &[u8]); 8] = [
            (MessageKind::Text, b"hello"),
            (MessageKind::Text, b""),
            (MessageKind::Text, b"{not json"),
            (MessageKind::Text, br#"{"room":"x","text":"no action"}"#),
            (MessageKind::Text, br#"[{"action":"join","room":"x"}]"#),
            (
                MessageKind::Text,
                br#"{"data":{"action":"join","room":"x"}}"#,
            ),
            (MessageKind::Binary, br#"{"action":"join","room":"x"}"#),
            (MessageKind::Binary, &[0, 159, 146, 150]),
        ];
        for (kind, payload) in cases {
            let out = run(&mut chat, msg(a(), kind, payload));
            assert!(
                matches!(&out[..], [ToEdge::Send { conn, kind: k, payload: p }] if *conn == a() && *k == kind && &p[..] == payload),
                "{payload:?}: {out:?}"
            );
        }
        assert_eq!(chat.rooms_of(a()).count(), 0);
    }

    #[test]
    fn fence_closes_at_once() {
        let mut chat = ChatEcho::new();
        let out = run(
            &mut chat,
            ToUpstream::Fence {
                conn: a(),
                code: 1008,
                reason: "policy".into(),
            },
        );
        assert!(
            matches!(&out[..], [ToEdge::Close { conn, code: 1008, reason }] if *conn == a() && reason == "policy"),
            "{out:?}"
        );
    }

    #[test]
    fn closed_forgets_the_rooms() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"x"}"#);
        say_text(&mut chat, b(), r#"{"action":"join","room":"x"}"#);
        let out = run(
            &mut chat,
            ToUpstream::Closed {
                conn: a(),
                code: 1000,
            },
        );
        assert!(out.is_empty());
        assert_eq!(chat.rooms_of(a()).count(), 0);
        assert_eq!(chat.rooms_of(b()).collect::<Vec<_>>(), ["x"]);
        let out = say_text(&mut chat, a(), r#"{"action":"say","room":"x","text":"t"}"#);
        assert_eq!(reply_to(&out, a())["event"], "error");
        let out = say_text(&mut chat, b(), r#"{"action":"say","room":"x","text":"t"}"#);
        assert!(matches!(&out[..], [ToEdge::Publish { .. }]), "{out:?}");
    }
}
