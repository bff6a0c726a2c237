//! The codec's tests: round trips (proptest), exact bytes, and every malformed input.

use super::*;
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = MessageKind> {
    prop_oneof![Just(MessageKind::Text), Just(MessageKind::Binary)]
}

/// A payload valid for `kind`: any bytes for binary, UTF-8 for text.
fn message() -> impl Strategy<Value = (MessageKind, Bytes)> {
    (
        kind(),
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(k, s, b)| match k {
            MessageKind::Text => (k, Bytes::from(s)),
            MessageKind::Binary => (k, Bytes::from(b)),
        })
}

fn topic() -> impl Strategy<Value = Topic> {
    any::<String>().prop_map(Topic::from)
}

fn frame() -> impl Strategy<Value = Record> {
    let s = any::<String>;
    prop_oneof![
        s().prop_map(|name| Record::Hello {
            version: VERSION,
            name
        }),
        any::<u64>().prop_map(Record::Ping),
        any::<u64>().prop_map(Record::Pong),
        s().prop_map(|reason| Record::Error { reason }),
        (any::<u64>(), any::<u16>(), s()).prop_map(|(conn, code, reason)| Record::Close {
            conn,
            code,
            reason
        }),
        (
            any::<u64>(),
            s(),
            proptest::option::of(s()),
            proptest::collection::vec((s(), s()), 0..4),
            proptest::option::of(s()),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(conn, path, query, headers, peer, authorize, replay)| {
                Record::Open {
                    conn,
                    path,
                    query,
                    headers,
                    peer,
                    authorize,
                    replay,
                }
            }),
        (any::<u64>(), message()).prop_map(|(conn, (kind, payload))| Record::Message {
            conn,
            kind,
            payload
        }),
        any::<u64>().prop_map(|conn| Record::Gone { conn }),
        any::<u64>().prop_map(|conn| Record::Accept { conn }),
        (any::<u64>(), any::<u16>(), s()).prop_map(|(conn, status, reason)| {
            Record::Reject {
                conn,
                status,
                reason,
            }
        }),
        (any::<u64>(), message()).prop_map(|(conn, (kind, payload))| Record::Send {
            conn,
            kind,
            payload
        }),
        (any::<u64>(), topic()).prop_map(|(conn, topic)| Record::Subscribe { conn, topic }),
        (any::<u64>(), topic()).prop_map(|(conn, topic)| Record::Unsubscribe { conn, topic }),
        (topic(), message()).prop_map(|(topic, (kind, payload))| Record::Publish {
            topic,
            kind,
            payload
        }),
        message().prop_map(|(kind, payload)| Record::Broadcast { kind, payload }),
    ]
}

/// One frame of every type, with non-trivial field values.
fn every_frame() -> Vec<Record> {
    let t = || Topic::from("room:lobby");
    vec![
        Record::Hello {
            version: VERSION,
            name: "ringway".into(),
        },
        Record::Ping(7),
        Record::Pong(u64::MAX),
        Record::Error {
            reason: "unsupported protocol version 2".into(),
        },
        Record::Close {
            conn: 1,
            code: 1006,
            reason: String::new(),
        },
        Record::Open {
            conn: 0x0100_0000_0002_0003,
            path: "/chat".into(),
            query: Some("room=é".into()),
            headers: vec![("origin".into(), "https://example.com".into())],
            peer: Some("127.0.0.1:5000".into()),
            authorize: true,
            replay: false,
        },
        Record::Open {
            conn: 2,
            path: "/".into(),
            query: None,
            headers: vec![],
            peer: None,
            authorize: false,
            replay: true,
        },
        Record::Message {
            conn: 3,
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"{\"action\":\"join\"}"),
        },
        Record::Gone { conn: 4 },
        Record::Accept { conn: 5 },
        Record::Reject {
            conn: 6,
            status: 403,
            reason: "no token".into(),
        },
        Record::Send {
            conn: 7,
            kind: MessageKind::Binary,
            payload: Bytes::from_static(&[0, 0xff, 0x80]),
        },
        Record::Subscribe {
            conn: 8,
            topic: t(),
        },
        Record::Unsubscribe {
            conn: 9,
            topic: t(),
        },
        Record::Publish {
            topic: t(),
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"hi"),
        },
        Record::Broadcast {
            kind: MessageKind::Binary,
            payload: Bytes::new(),
        },
    ]
}

fn encoded(frames: &[Record]) -> BytesMut {
    let mut out = BytesMut::new();
    for f in frames {
        encode(f, &mut out);
    }
    out
}

fn decode_all(dec: &mut Decoder, buf: &mut BytesMut) -> Vec<Record> {
    let mut v = Vec::new();
    while let Some(f) = dec.decode(buf).unwrap() {
        v.push(f);
    }
    v
}

#[test]
fn every_type_round_trips_and_has_its_documented_code() {
    let frames = every_frame();
    let mut seen: Vec<u8> = frames.iter().map(Record::type_code).collect();
    seen.dedup();
    assert_eq!(seen.len(), 15, "one frame of each type");
    for f in &frames {
        let mut buf = encoded(std::slice::from_ref(f));
        assert_eq!(buf.len(), encoded_len(f));
        assert_eq!(buf[LEN_PREFIX], f.type_code());
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - LEN_PREFIX);
        assert_eq!(
            Decoder::default().decode(&mut buf).unwrap().as_ref(),
            Some(f)
        );
        assert!(buf.is_empty());
    }
}

#[test]
fn wire_layout_matches_the_document() {
    // docs/relay-protocol.md, "send" example: conn 7, binary, 3 bytes.
    let mut buf = BytesMut::new();
    encode(
        &Record::Send {
            conn: 7,
            kind: MessageKind::Binary,
            payload: Bytes::from_static(&[0xaa, 0xbb, 0xcc]),
        },
        &mut buf,
    );
    assert_eq!(
        &buf[..],
        &[0, 0, 0, 17, 0x22, 0, 0, 0, 0, 0, 0, 0, 7, 2, 0, 0, 0, 3, 0xaa, 0xbb, 0xcc]
    );
    // hello "gw", version 1.
    let mut buf = BytesMut::new();
    encode(
        &Record::Hello {
            version: 1,
            name: "gw".into(),
        },
        &mut buf,
    );
    assert_eq!(&buf[..], b"\0\0\0\x0b\x01RWAY\0\x01\0\x02gw");
}

#[test]
fn a_stream_split_at_every_byte_decodes_the_same() {
    let frames = every_frame();
    let whole = encoded(&frames);
    for cut in 0..=whole.len() {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&whole[..cut]);
        let mut got = decode_all(&mut dec, &mut buf);
        buf.extend_from_slice(&whole[cut..]);
        got.extend(decode_all(&mut dec, &mut buf));
        assert_eq!(got, frames, "cut at {cut}");
        assert!(buf.is_empty());
    }
}

#[test]
fn byte_at_a_time_decodes_the_same() {
    let frames = every_frame();
    let whole = encoded(&frames);
    let mut dec = Decoder::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in whole.iter() {
        buf.extend_from_slice(&[*b]);
        got.extend(decode_all(&mut dec, &mut buf));
    }
    assert_eq!(got, frames);
}

#[test]
fn payloads_are_taken_without_a_copy() {
    let mut buf = encoded(&[Record::Send {
        conn: 1,
        kind: MessageKind::Binary,
        payload: Bytes::from(vec![9u8; 1000]),
    }]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Record::Send { payload, .. }) = Decoder::default().decode(&mut buf).unwrap() else {
        panic!("not a send");
    };
    assert!(range.contains(&(payload.as_ptr() as usize)));
}

#[test]
fn oversized_length_prefix_is_rejected_before_reserving() {
    for len in [1025u32, u32::MAX] {
        let mut buf = BytesMut::with_capacity(8);
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&[ty::SEND]);
        let cap = buf.capacity();
        let err = Decoder::new(1024).decode(&mut buf).unwrap_err();
        assert_eq!(
            err,
            RelayError::FrameTooLarge {
                len: len as usize,
                max: 1024
            }
        );
        assert_eq!(buf.capacity(), cap, "nothing reserved for a rejected frame");
    }
    // At the limit it is fine, and the decoder reserves just what the frame needs.
    let f = Record::Broadcast {
        kind: MessageKind::Binary,
        payload: Bytes::from(vec![1u8; 1024 - 6]),
    };
    let whole = encoded(std::slice::from_ref(&f));
    assert_eq!(whole.len(), LEN_PREFIX + 1024);
    let mut buf = BytesMut::from(&whole[..10]);
    let mut dec = Decoder::new(1024);
    assert_eq!(dec.decode(&mut buf).unwrap(), None);
    assert!(buf.capacity() >= whole.len());
    assert!(buf.capacity() < 2 * whole.len());
    buf.extend_from_slice(&whole[10..]);
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(f));
}

/// `u32 len` + `body` (type byte first).
fn raw(body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32(body.len() as u32);
    b.put_slice(body);
    b
}

#[test]
fn garbage_is_rejected_with_the_right_error() {
    use RelayError::*;
    let conn = [0u8, 0, 0, 0, 0, 0, 0, 1];
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases: Vec<(Vec<u8>, RelayError)> = vec![
        (vec![], EmptyFrame),
        (vec![0x7f], UnknownType(0x7f)),
        (vec![0x00, 1, 2], UnknownType(0)),
        (b"\x01RWAX\0\x01\0\0".to_vec(), BadMagic(*b"RWAX")),
        (
            b"\x01RWAY\0\x02\0\0".to_vec(),
            BadVersion { got: 2, want: 1 },
        ),
        (
            b"\x01RWAY\0\x01\0\x05ab".to_vec(),
            Truncated {
                frame: "hello",
                field: "name",
            },
        ),
        (
            b"\x01RWAY\0\x01\0\x01\xff".to_vec(),
            InvalidUtf8 {
                frame: "hello",
                field: "name",
            },
        ),
        (
            vec![ty::PING, 1, 2, 3],
            Truncated {
                frame: "ping",
                field: "nonce",
            },
        ),
        (
            vec![ty::PONG, 0, 0, 0, 0, 0, 0, 0, 1, 0xee],
            TrailingBytes {
                frame: "pong",
                extra: 1,
            },
        ),
        (
            cat(&[&[ty::SEND], &conn, &[3, 0, 0, 0, 0]]),
            BadKind {
                frame: "send",
                kind: 3,
            },
        ),
        (
            cat(&[&[ty::SEND], &conn, &[1, 0, 0, 0, 2, 0xc3, 0x28]]),
            InvalidUtf8 {
                frame: "send",
                field: "payload",
            },
        ),
        (
            cat(&[&[ty::SEND], &conn, &[2, 0xff, 0xff, 0xff, 0xff, 1]]),
            Truncated {
                frame: "send",
                field: "payload",
            },
        ),
        (
            cat(&[&[ty::OPEN], &conn, &[0x04]]),
            BadFlag {
                frame: "open",
                field: "flags",
                value: 4,
            },
        ),
        (
            cat(&[&[ty::OPEN], &conn, &[0, 0, 1, b'/', 2]]),
            BadFlag {
                frame: "open",
                field: "query",
                value: 2,
            },
        ),
        (
            // 65535 headers claimed, none present.
            cat(&[&[ty::OPEN], &conn, &[0, 0, 1, b'/', 0, 0, 0xff, 0xff]]),
            Truncated {
                frame: "open",
                field: "headers",
            },
        ),
        (
            cat(&[&[ty::SUBSCRIBE], &conn, &[0, 2, 0xff, 0xfe]]),
            InvalidUtf8 {
                frame: "subscribe",
                field: "topic",
            },
        ),
    ];
    for (body, want) in cases {
        let mut buf = raw(&body);
        assert_eq!(
            Decoder::default().decode(&mut buf),
            Err(want.clone()),
            "body {body:02x?}"
        );
    }
}

#[test]
fn unknown_type_is_reported_before_the_body_arrives() {
    // Only the prefix and type byte: no need to wait for (or reserve) 1 MiB of garbage.
    let mut buf = BytesMut::from(&[0u8, 0x10, 0, 0, 0x99][..]);
    assert_eq!(
        Decoder::default().decode(&mut buf),
        Err(RelayError::UnknownType(0x99))
    );
}

#[test]
fn only_from_rejects_frames_of_the_other_side() {
    let gw = Decoder::default().only_from(Side::Backend);
    let be = Decoder::default().only_from(Side::Gateway);
    for f in every_frame() {
        let mut a = encoded(std::slice::from_ref(&f));
        let mut b = a.clone();
        let (ra, rb) = (gw.clone().decode(&mut a), be.clone().decode(&mut b));
        let wrong = Err(RelayError::WrongDirection { frame: f.name() });
        match f.sender() {
            None => assert!(ra.is_ok() && rb.is_ok(), "{}", f.name()),
            Some(Side::Gateway) => assert!(ra == wrong && rb.is_ok(), "{}", f.name()),
            Some(Side::Backend) => assert!(ra.is_ok() && rb == wrong, "{}", f.name()),
        }
    }
}

#[test]
fn over_long_strings_are_cut_on_a_character_boundary() {
    // 'é' is two bytes: 40000 of them cannot be cut at exactly 65535.
    let long = "é".repeat(40_000);
    let mut buf = encoded(&[Record::Error { reason: long }]);
    let Some(Record::Error { reason }) = Decoder::default().decode(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(reason.len(), 65_534);
    assert!(reason.chars().all(|c| c == 'é'));
}

// Issue 11 item 1: multi-byte characters in every string field, cut at the u16 limit
// and at every byte of the stream, decode to the same text (or wait), never a panic.
#[test]
fn non_ascii_strings_in_every_field_survive_the_wire() {
    let long = "\u{1F600}".repeat(MAX_STRING / 4 + 1); // 4-byte chars across the limit
    let frames = [
        Record::Hello {
            version: VERSION,
            name: "gw-\u{e9}".into(),
        },
        Record::Open {
            conn: u64::MAX,
            path: "/caf\u{e9}/\u{1F600}".into(),
            query: Some(long.clone()),
            headers: vec![
                ("x-\u{e9}".into(), long.clone()),
                (String::new(), "\u{0}".into()),
            ],
            peer: Some("[::1]:1".into()),
            authorize: true,
            replay: true,
        },
        Record::Close {
            conn: 0,
            code: u16::MAX,
            reason: long.clone(),
        },
        Record::Subscribe {
            conn: 1,
            topic: Topic::from(long.as_str()),
        },
        Record::Reject {
            conn: 2,
            status: 0,
            reason: "\u{e9}".repeat(MAX_STRING),
        },
    ];
    let whole = encoded(&frames);
    for cut in [0, 1, 3, 4, 5, whole.len() / 2, whole.len() - 1, whole.len()] {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&whole[..cut]);
        let mut got = decode_all(&mut dec, &mut buf);
        buf.extend_from_slice(&whole[cut..]);
        got.extend(decode_all(&mut dec, &mut buf));
        assert_eq!(got.len(), frames.len(), "cut at {cut}");
        for f in &got {
            if let Record::Open {
                query,
                headers,
                path,
                ..
            } = f
            {
                assert_eq!(path, "/caf\u{e9}/\u{1F600}");
                let q = query.as_deref().unwrap();
                assert!(
                    q.len() <= MAX_STRING && long.starts_with(q),
                    "clipped on a boundary"
                );
                assert_eq!(headers[0].0, "x-\u{e9}");
            }
        }
    }
    // A string whose bytes stop in the middle of a character is invalid UTF-8: an error.
    let conn = [0u8; 8];
    let body = [
        &[ty::SUBSCRIBE][..],
        &conn,
        &[0, 3],
        "\u{e9}".as_bytes(),
        &[0xc3],
    ]
    .concat();
    assert_eq!(
        Decoder::default().decode(&mut raw(&body)),
        Err(RelayError::InvalidUtf8 {
            frame: "subscribe",
            field: "topic"
        })
    );
}

/// Writes the fuzz seed corpus (fuzz/corpus/relay/) when RINGWAY_WRITE_RELAY_CORPUS is
/// set: each seed is the fuzz target's piece-size byte followed by encoded frames.
#[test]
fn write_fuzz_corpus() {
    if std::env::var_os("RINGWAY_WRITE_RELAY_CORPUS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/relay");
    std::fs::create_dir_all(&dir).unwrap();
    let frames = every_frame();
    for (i, f) in frames.iter().enumerate() {
        let mut seed = vec![0xff];
        seed.extend_from_slice(&encoded(std::slice::from_ref(f)));
        std::fs::write(dir.join(format!("{i:02}-{}", f.name())), seed).unwrap();
    }
    let mut all = vec![6];
    all.extend_from_slice(&encoded(&frames));
    std::fs::write(dir.join("session-in-pieces-of-7"), all).unwrap();
}

proptest! {
    #[test]
    fn round_trip(frames in proptest::collection::vec(frame(), 1..6), cut in any::<prop::sample::Index>()) {
        let whole = encoded(&frames);
        prop_assert_eq!(whole.len(), frames.iter().map(encoded_len).sum::<usize>());
        let cut = cut.index(whole.len() + 1);
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&whole[..cut]);
        let mut got = decode_all(&mut dec, &mut buf);
        buf.extend_from_slice(&whole[cut..]);
        got.extend(decode_all(&mut dec, &mut buf));
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut dec = Decoder::new(200);
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
        // At most one frame of the limit (growth may double it), never what a prefix claims.
        prop_assert!(buf.capacity() <= 2 * bytes.len().max(LEN_PREFIX + 200));
    }
}
