//! The embedded default upstream's logic, in-process behind the relay thread: the chat
//! contract of docs/relay-protocol.md (`join`, `leave`, `say`; the same answers as
//! examples/chat_backend.py) for text JSON objects with an `action` field, and a plain echo
//! for everything else, so the gateway stays an echo server for Autobahn and load tests.
//! The echo path costs one look at the first non-whitespace byte.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{RelayGauges, ToEdge, ToUpstream, Topic, ENTRY_OVERHEAD, MAX_TOPIC_BYTES};
use crate::ids::ConnId;
use crate::protocol::message::MessageKind;

/// Rooms one connection may be in unless [`ChatEcho::with_max_rooms`] says otherwise (the
/// relay passes the largest `max_subscriptions` of any route); a join past it is answered
/// with the error "too many rooms". Each route's `max_subscriptions` also bounds the
/// subscriptions the core holds.
pub const DEFAULT_MAX_ROOMS: usize = 100;

/// Longest room name: its topic `room:NAME` must fit in [`MAX_TOPIC_BYTES`].
pub const MAX_ROOM_BYTES: usize = MAX_TOPIC_BYTES - ROOM_PREFIX.len();
const ROOM_PREFIX: &str = "room:";

/// The error reasons of the chat contract, checked in this order (the doc's table; a
/// binary or non-JSON message never gets here: it is echoed).
const UNKNOWN_ACTION: &str = "unknown action";
const MISSING_ROOM: &str = "missing room";
const MISSING_TEXT: &str = "missing text";
const ROOM_TOO_LONG: &str = "room name too long";
const TOO_MANY_ROOMS: &str = "too many rooms";

/// Which rooms each connection joined, for introspection only: the chat contract keeps no
/// state (a sender need not have joined to `say`); the edge holds the subscriptions.
#[derive(Debug)]
pub struct ChatEcho {
    rooms: HashMap<ConnId, HashSet<Box<str>>>,
    max_rooms: usize,
    /// The rooms' bytes are charged here.
    gauges: Arc<RelayGauges>,
}

impl Default for ChatEcho {
    fn default() -> Self {
        ChatEcho::with_max_rooms(DEFAULT_MAX_ROOMS)
    }
}

/// `joined` and `left`.
#[derive(Serialize)]
struct RoomEvent<'a> {
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

#[derive(Clone, Copy)]
enum Action {
    Join,
    Leave,
    Say,
}

impl ChatEcho {
    pub fn new() -> ChatEcho {
        ChatEcho::default()
    }

    pub fn with_max_rooms(max_rooms: usize) -> ChatEcho {
        ChatEcho::with_limits(max_rooms, Arc::default())
    }

    /// At most `max_rooms` rooms per connection, their bytes charged to `gauges`.
    pub fn with_limits(max_rooms: usize, gauges: Arc<RelayGauges>) -> ChatEcho {
        ChatEcho {
            rooms: HashMap::new(),
            max_rooms,
            gauges,
        }
    }

    fn room_bytes(room: &str) -> usize {
        room.len() + ENTRY_OVERHEAD
    }

    /// Handle one message from a core; replies go to `out` in the order the client must
    /// see them (`Subscribe` before `joined`, `Unsubscribe` before `left`, so the client's
    /// membership has changed when it is told so).
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
            ToUpstream::Open { .. } | ToUpstream::Interest { .. } => {}
            ToUpstream::Closed { conn, .. } => {
                if let Some(rooms) = self.rooms.remove(&conn) {
                    let held: usize = rooms.iter().map(|r| Self::room_bytes(r)).sum();
                    self.gauges.release(held);
                }
            }
        }
    }

    /// Rooms `conn` joined and has not left (at most `max_rooms`).
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
        let action = match action.as_str() {
            Some("join") => Action::Join,
            Some("leave") => Action::Leave,
            Some("say") => Action::Say,
            _ => return error(conn, UNKNOWN_ACTION, out),
        };
        let Some(room) = fields
            .get("room")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
        else {
            return error(conn, MISSING_ROOM, out);
        };
        if room.len() > MAX_ROOM_BYTES {
            self.gauges.topic_refused.fetch_add(1, Ordering::Relaxed);
            return error(conn, ROOM_TOO_LONG, out);
        }
        match action {
            Action::Join => {
                let rooms = self.rooms.entry(conn).or_default();
                if !rooms.contains(room) {
                    if rooms.len() >= self.max_rooms {
                        self.gauges.rooms_refused.fetch_add(1, Ordering::Relaxed);
                        return error(conn, TOO_MANY_ROOMS, out);
                    }
                    self.gauges.charge(Self::room_bytes(room));
                    rooms.insert(room.into());
                }
                out(ToEdge::Subscribe {
                    conn,
                    topic: topic(room),
                });
                room_event(conn, "joined", room, out);
            }
            Action::Leave => {
                if let Some(rooms) = self.rooms.get_mut(&conn) {
                    if rooms.remove(room) {
                        self.gauges.release(Self::room_bytes(room));
                    }
                    if rooms.is_empty() {
                        self.rooms.remove(&conn);
                    }
                }
                out(ToEdge::Unsubscribe {
                    conn,
                    topic: topic(room),
                });
                room_event(conn, "left", room, out);
            }
            Action::Say => {
                let Some(text) = fields.get("text").and_then(Value::as_str) else {
                    return error(conn, MISSING_TEXT, out);
                };
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
        }
    }
}

fn topic(room: &str) -> Topic {
    Arc::from(format!("{ROOM_PREFIX}{room}"))
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

fn room_event(conn: ConnId, event: &'static str, room: &str, out: &mut impl FnMut(ToEdge)) {
    send_json(conn, &RoomEvent { event, room }, out);
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
            guard: crate::in_flight::InFlight::none(),
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

    fn reason(out: &[ToEdge], conn: ConnId) -> String {
        let v = reply_to(out, conn);
        assert_eq!(v["event"], "error", "{v}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        v["reason"].as_str().unwrap().to_owned()
    }

    fn said_payload(out: &[ToEdge], room: &str) -> Value {
        match out {
            [ToEdge::Publish {
                topic,
                kind: MessageKind::Text,
                payload,
            }] if **topic == *format!("room:{room}") => json(payload),
            other => panic!("expected one publish to room:{room}, got {other:?}"),
        }
    }

    #[test]
    fn join_subscribes_to_the_room_topic_then_confirms() {
        let mut chat = ChatEcho::new();
        let out = say_text(&mut chat, a(), r#"{"action":"join","room":"lobby"}"#);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            matches!(&out[0], ToEdge::Subscribe { conn, topic } if *conn == a() && &**topic == "room:lobby"),
            "{out:?}"
        );
        assert_eq!(
            reply_to(&out[1..], a()),
            serde_json::json!({"event":"joined","room":"lobby"})
        );
        assert_eq!(chat.rooms_of(a()).collect::<Vec<_>>(), ["lobby"]);
    }

    #[test]
    fn leave_unsubscribes_then_confirms_even_if_never_joined() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"x"}"#);
        say_text(&mut chat, a(), r#"{"action":"join","room":"y"}"#);
        for _ in 0..2 {
            // Idempotent, like `unsubscribe`: the second leave answers the same.
            let out = say_text(&mut chat, a(), r#"{"action":"leave","room":"x"}"#);
            assert_eq!(out.len(), 2, "{out:?}");
            assert!(
                matches!(&out[0], ToEdge::Unsubscribe { conn, topic } if *conn == a() && &**topic == "room:x"),
                "{out:?}"
            );
            assert_eq!(
                reply_to(&out[1..], a()),
                serde_json::json!({"event":"left","room":"x"})
            );
            assert_eq!(chat.rooms_of(a()).collect::<Vec<_>>(), ["y"]);
        }
        let out = say_text(&mut chat, b(), r#"{"action":"leave","room":"never"}"#);
        assert!(
            matches!(&out[0], ToEdge::Unsubscribe { conn, topic } if *conn == b() && &**topic == "room:never"),
            "{out:?}"
        );
        assert_eq!(reply_to(&out[1..], b())["event"], "left");
    }

    #[test]
    fn say_publishes_to_the_room_with_the_sender_id_as_a_decimal_string() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"r\"1"}"#);
        let out = say_text(
            &mut chat,
            a(),
            r#"{"text":"hi \"there\"\n\u00e9</script>","room":"r\"1","action":"say"}"#,
        );
        let v = said_payload(&out, "r\"1");
        assert_eq!(
            v,
            serde_json::json!({
                "event": "said",
                "room": "r\"1",
                "text": "hi \"there\"\n\u{e9}</script>",
                "from": a().as_u64().to_string(),
            })
        );
        let from: u64 = v["from"].as_str().unwrap().parse().unwrap();
        assert_eq!(ConnId::from_u64(from), a());
    }

    #[test]
    fn say_needs_no_join() {
        let mut chat = ChatEcho::new();
        say_text(&mut chat, a(), r#"{"action":"join","room":"x"}"#);
        let out = say_text(&mut chat, b(), r#"{"action":"say","room":"x","text":"t"}"#);
        assert_eq!(said_payload(&out, "x")["from"], b().as_u64().to_string());
        assert_eq!(chat.rooms_of(b()).count(), 0);
    }

    #[test]
    fn other_fields_are_ignored() {
        let mut chat = ChatEcho::new();
        let out = say_text(
            &mut chat,
            a(),
            r#"{"action":"say","room":"x","text":"t","from":"999","event":"x","extra":[1]}"#,
        );
        assert_eq!(
            said_payload(&out, "x"),
            serde_json::json!({"event":"said","room":"x","text":"t","from":a().as_u64().to_string()})
        );
        let out = say_text(&mut chat, a(), r#"{"room":"x","action":"join","n":null}"#);
        assert_eq!(
            reply_to(&out[1..], a()),
            serde_json::json!({"event":"joined","room":"x"})
        );
    }

    #[test]
    fn unknown_action_is_checked_first() {
        let mut chat = ChatEcho::new();
        for m in [
            r#"{"action":"shout","room":"x","text":"t"}"#,
            r#"{"action":"Join","room":"x"}"#,
            r#"{"action":7}"#,
            r#"{"action":null}"#,
            r#"{"action":["join"],"room":"x"}"#,
            r#"{"action":""}"#,
        ] {
            let out = say_text(&mut chat, a(), m);
            assert_eq!(reason(&out, a()), "unknown action", "{m}");
        }
        assert_eq!(chat.rooms_of(a()).count(), 0);
    }

    #[test]
    fn missing_room_is_checked_before_text() {
        let mut chat = ChatEcho::new();
        for action in ["join", "leave", "say"] {
            for room in ["", r#","room":"""#, r#","room":5"#, r#","room":null"#] {
                let m = format!(r#"{{"action":"{action}"{room}}}"#);
                let out = say_text(&mut chat, a(), &m);
                assert_eq!(reason(&out, a()), "missing room", "{m}");
            }
        }
        assert_eq!(chat.rooms_of(a()).count(), 0);
    }

    #[test]
    fn say_without_string_text_is_missing_text() {
        let mut chat = ChatEcho::new();
        for text in ["", r#","text":1"#, r#","text":null"#, r#","text":{}"#] {
            let m = format!(r#"{{"action":"say","room":"x"{text}}}"#);
            let out = say_text(&mut chat, a(), &m);
            assert_eq!(reason(&out, a()), "missing text", "{m}");
        }
        // Empty text is a string: it is said.
        let out = say_text(&mut chat, a(), r#"{"action":"say","room":"x","text":""}"#);
        assert_eq!(said_payload(&out, "x")["text"], "");
    }

    #[test]
    fn rooms_per_connection_are_bounded_with_an_error() {
        let gauges = Arc::new(RelayGauges::default());
        let mut chat = ChatEcho::with_limits(2, gauges.clone());
        for r in ["a", "b", "a"] {
            let out = say_text(
                &mut chat,
                a(),
                &format!(r#"{{"action":"join","room":"{r}"}}"#),
            );
            assert!(
                matches!(&out[0], ToEdge::Subscribe { topic, .. } if **topic == *format!("room:{r}")),
                "{r}: {out:?}"
            );
            assert_eq!(reply_to(&out[1..], a())["event"], "joined", "{r}");
        }
        let out = say_text(&mut chat, a(), r#"{"action":"join","room":"c"}"#);
        assert_eq!(reason(&out, a()), "too many rooms");
        assert_eq!(gauges.rooms_refused.load(Ordering::Relaxed), 1);
        let mut rooms: Vec<_> = chat.rooms_of(a()).collect();
        rooms.sort_unstable();
        assert_eq!(rooms, ["a", "b"]);
        assert_eq!(gauges.held(), 2 * (1 + ENTRY_OVERHEAD) as u64);
        // Leaving makes room again; closing releases everything.
        say_text(&mut chat, a(), r#"{"action":"leave","room":"a"}"#);
        let out = say_text(&mut chat, a(), r#"{"action":"join","room":"c"}"#);
        assert_eq!(reply_to(&out[1..], a())["event"], "joined");
        run(
            &mut chat,
            ToUpstream::Closed {
                conn: a(),
                code: 1000,
            },
        );
        assert_eq!(gauges.held(), 0);
    }

    #[test]
    fn over_long_room_names_are_refused_with_an_error() {
        let gauges = Arc::new(RelayGauges::default());
        let mut chat = ChatEcho::with_limits(100, gauges.clone());
        let fits = "r".repeat(MAX_ROOM_BYTES);
        let out = say_text(&mut chat, a(), &join_json(&fits));
        assert!(
            matches!(&out[0], ToEdge::Subscribe { topic, .. } if topic.len() == MAX_TOPIC_BYTES),
            "{out:?}"
        );
        for action in ["join", "leave", "say"] {
            let m = serde_json::json!({"action": action, "room": "r".repeat(MAX_ROOM_BYTES + 1), "text": "t"});
            let out = say_text(&mut chat, a(), &m.to_string());
            assert_eq!(reason(&out, a()), "room name too long", "{action}");
        }
        assert_eq!(gauges.topic_refused.load(Ordering::Relaxed), 3);
        assert_eq!(chat.rooms_of(a()).count(), 1);
    }

    fn join_json(room: &str) -> String {
        serde_json::json!({"action": "join", "room": room}).to_string()
    }

    #[test]
    fn everything_else_is_echoed_unchanged() {
        let mut chat = ChatEcho::new();
        let cases: [(MessageKind, &[u8]); 10] = [
            (MessageKind::Text, b"hello"),
            (MessageKind::Text, b""),
            (MessageKind::Text, b"{not json"),
            (
                MessageKind::Text,
                b" {\"action\":\"join\",\"room\":\"x\"} trailing",
            ),
            (MessageKind::Text, br#"{"room":"x","text":"no action"}"#),
            (MessageKind::Text, br#"[{"action":"join","room":"x"}]"#),
            (MessageKind::Text, br#""{\"action\":\"join\"}""#),
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
    fn leading_json_whitespace_still_reaches_the_chat() {
        let mut chat = ChatEcho::new();
        let out = say_text(
            &mut chat,
            a(),
            "\r\n\t {\"action\":\"join\",\"room\":\"x\"}\n",
        );
        assert_eq!(reply_to(&out[1..], a())["event"], "joined");
    }

    // Issue 11 item 1: the chat parses client JSON; hostile or odd input gets an answer
    // (a reply, an error or the echo), never a panic.
    #[test]
    fn hostile_json_gets_an_answer_not_a_panic() {
        let mut chat = ChatEcho::with_max_rooms(1);
        let deep = format!(
            "{{\"action\":{}1{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let long_room = "\u{e9}".repeat(40_000);
        let cases: Vec<String> = vec![
            deep,
            r#"{"action":"join","room":"\ud800"}"#.into(), // lone surrogate: not JSON
            r#"{"action":"join","room":"\u00e9\u0000\n"}"#.into(),
            r#"{"action":"say","room":"\u{1F600}","text":"\udbff\udfff"}"#.into(),
            format!(r#"{{"action":"join","room":"{long_room}"}}"#),
            r#"{"action":"join","room":"x","room":"y"}"#.into(),
            r#"{"action":1e999}"#.into(),
            r#"{"action":"say","room":"x","text":18446744073709551616}"#.into(),
            "{\"action\":\"say\",\"room\":\"\u{e9}\",\"text\":\"\u{1F600}\"}".into(),
            "{\"action\":\"jo".into(),
            "{".into(),
        ];
        for m in &cases {
            let out = say_text(&mut chat, a(), m);
            assert!(!out.is_empty(), "{:.60}: no answer", m);
        }
        // A non-ASCII room is a room like any other, named exactly.
        let out = say_text(
            &mut chat,
            b(),
            "{\"action\":\"join\",\"room\":\"caf\u{e9}\"}",
        );
        assert!(
            matches!(&out[0], ToEdge::Subscribe { topic, .. } if &**topic == "room:caf\u{e9}"),
            "{out:?}"
        );
        assert_eq!(reply_to(&out[1..], b())["room"], "caf\u{e9}");
        assert!(chat.rooms_of(a()).count() <= 1, "max_rooms holds");
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
    fn closed_forgets_the_rooms_and_answers_nothing() {
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
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(chat.rooms_of(a()).count(), 0);
        assert_eq!(chat.rooms_of(b()).collect::<Vec<_>>(), ["x"]);
    }
}
