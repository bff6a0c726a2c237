//! The NATS subjects and headers of the cluster bus (docs/cluster.md states them for other
//! NATS clients). A topic name is arbitrary UTF-8 (spaces, dots, `*`, `>`), so its subject
//! token is the base64url (no padding) of its bytes: only `A-Z a-z 0-9 - _`, one token, and
//! distinct names give distinct tokens. The empty name, whose encoding is empty, is `_`
//! (never the encoding of a non-empty name: those have at least two characters).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::protocol::message::MessageKind;

pub const TOPIC_PREFIX: &str = "ringway.topic.";
pub const BROADCAST: &str = "ringway.broadcast";
pub const NODE_PREFIX: &str = "ringway.node.";
pub const HEARTBEAT: &str = "ringway.heartbeat";
pub const PING_PREFIX: &str = "ringway.ping.";

/// Header names (NATS headers are case-sensitive on the wire; these are sent as written).
pub const H_ORIGIN: &str = "Ringway-Origin";
pub const H_KIND: &str = "Ringway-Kind";
pub const H_OP: &str = "Ringway-Op";
pub const H_CONN: &str = "Ringway-Conn";
pub const H_CODE: &str = "Ringway-Code";
pub const H_TOPIC: &str = "Ringway-Topic";
pub const H_LINK: &str = "Ringway-Link";
pub const H_NAME: &str = "Ringway-Node-Name";

pub fn topic_subject(topic: &str) -> String {
    if topic.is_empty() {
        return format!("{TOPIC_PREFIX}_");
    }
    format!("{TOPIC_PREFIX}{}", URL_SAFE_NO_PAD.encode(topic.as_bytes()))
}

/// The topic a subject names; None when it is not a topic subject or not UTF-8.
pub fn subject_topic(subject: &str) -> Option<String> {
    let token = subject.strip_prefix(TOPIC_PREFIX)?;
    if token == "_" {
        return Some(String::new());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    String::from_utf8(bytes).ok()
}

pub fn node_subject(node: u8) -> String {
    format!("{NODE_PREFIX}{node}")
}

pub fn kind_name(kind: MessageKind) -> &'static str {
    match kind {
        MessageKind::Binary => "binary",
        _ => "text",
    }
}

/// `text` (also when absent) or `binary`; None for anything else.
pub fn kind_of(value: Option<&str>) -> Option<MessageKind> {
    match value {
        None | Some("text") => Some(MessageKind::Text),
        Some("binary") => Some(MessageKind::Binary),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_one_valid_token_without_collisions() {
        let names = [
            "",
            "a",
            "room:lobby",
            "a.b",
            "a b",
            "*",
            ">",
            "a.*.>",
            "ünï",
            "_",
            "-",
            "a\u{0}b",
        ];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let s = topic_subject(n);
            let token = s.strip_prefix(TOPIC_PREFIX).unwrap();
            assert!(
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{n:?} -> {s}"
            );
            assert_eq!(subject_topic(&s).as_deref(), Some(n));
            assert!(seen.insert(s), "{n:?} collides");
        }
        assert_eq!(topic_subject("room:lobby"), "ringway.topic.cm9vbTpsb2JieQ");
        assert_eq!(subject_topic("ringway.topic.!!"), None);
        assert_eq!(subject_topic("ringway.broadcast"), None);
    }

    #[test]
    fn kinds_round_trip() {
        for k in [MessageKind::Text, MessageKind::Binary] {
            assert_eq!(kind_of(Some(kind_name(k))), Some(k));
        }
        assert_eq!(kind_of(None), Some(MessageKind::Text));
        assert_eq!(kind_of(Some("TEXT")), None);
    }
}
