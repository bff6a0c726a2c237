//! Unit tests of one backend link: what it queues, carries over a reconnect and replays,
//! and its backoff.

use super::*;

fn info(path: &str) -> OpenInfo {
    OpenInfo {
        path: path.into(),
        query: Some("room=1".into()),
        headers: vec![("x-user".into(), "ann".into())],
        peer: Some("127.0.0.1:4000".parse().unwrap()),
        authorize: true,
    }
}

fn open(conn: u64, path: &str, replay: bool) -> Record {
    Record::Open {
        conn,
        path: path.into(),
        query: Some("room=1".into()),
        headers: vec![("x-user".into(), "ann".into())],
        peer: Some("127.0.0.1:4000".into()),
        authorize: true,
        replay,
    }
}

fn decode_all(mut buf: BytesMut) -> Vec<Record> {
    let mut decoder = Decoder::new(1 << 20);
    let mut records = Vec::new();
    while let Some(f) = decoder.decode(&mut buf).expect("a valid record") {
        records.push(f);
    }
    assert!(buf.is_empty(), "trailing bytes: {buf:?}");
    records
}

fn link() -> Link {
    Link::new(
        0,
        "b".into(),
        Address::Tcp("127.0.0.1:9".into()),
        None,
        Arc::default(),
        1 << 20,
        Instant::now(),
    )
}

/// docs/relay-protocol.md "Reconnects": opens go out unflagged; once written, each is
/// replayed on every reconnect with the replay flag, otherwise as it was first sent; a
/// connection closed meanwhile is not replayed, and its close is released once.
#[test]
fn opens_go_out_unflagged_and_replay_flagged_with_the_same_fields() {
    let gauges = RelayGauges::default();
    let mut l = link();
    l.push_open(7, info("/a"), &gauges);
    l.push_open(9, info("/b"), &gauges);
    let held = gauges.held();
    assert_eq!(held, 2 * (info("/a").held_bytes() + ENTRY_OVERHEAD) as u64);
    assert_eq!(
        decode_all(l.outbox_bytes()),
        vec![open(7, "/a", false), open(9, "/b", false)]
    );
    // Not written yet: a lost link carries them as they are, unreplayed.
    l.out.carry();
    assert_eq!(
        decode_all(l.outbox_bytes()),
        vec![open(7, "/a", false), open(9, "/b", false)]
    );
    // Written: the next link replays them (and the carry keeps no replay).
    let len = l.out.buf.len();
    l.out.written = len;
    for s in l.opens.values_mut() {
        s.sent = true;
    }
    l.out = Outbox::default();
    for _ in 0..2 {
        for stored in l.opens.values() {
            l.out.push(Kind::Replay, &stored.replay);
        }
        let mut replayed = decode_all(l.outbox_bytes());
        replayed.sort_by_key(|f| match f {
            Record::Open { conn, .. } => *conn,
            _ => u64::MAX,
        });
        assert_eq!(replayed, vec![open(7, "/a", true), open(9, "/b", true)]);
        l.out.carry();
        assert!(l.out.is_empty(), "replays are not carried");
    }
    l.push_close(7, 1000, &gauges);
    l.push_close(7, 1000, &gauges);
    assert_eq!(gauges.held(), held / 2, "a close releases its open once");
}

/// A lost link carries messages and closes (a partly written one whole) but not its
/// pongs; a full buffer refuses messages without queueing them.
#[test]
fn a_lost_link_carries_data_not_control() {
    let gauges = RelayGauges::default();
    let mut l = link();
    l.push_message(1, MessageKind::Text, Bytes::from_static(b"a"), 2, &gauges)
        .unwrap();
    l.out.push(Kind::Control, &Record::Pong(3));
    l.push_message(1, MessageKind::Text, Bytes::from_static(b"b"), 2, &gauges)
        .unwrap();
    assert!(l
        .push_message(1, MessageKind::Text, Bytes::from_static(b"c"), 2, &gauges)
        .is_err());
    l.push_close(1, 1001, &gauges);
    l.out.written = 3;
    l.out.carry();
    let msg = |p: &'static [u8]| Record::Message {
        conn: 1,
        kind: MessageKind::Text,
        payload: Bytes::from_static(p),
    };
    assert_eq!(
        decode_all(l.outbox_bytes()),
        vec![
            msg(b"a"),
            msg(b"b"),
            Record::Close {
                conn: 1,
                code: 1001,
                reason: String::new()
            }
        ]
    );
    assert_eq!(l.out.control, 0);
    assert_eq!(l.state.queued.load(Ordering::Relaxed), 2);
}

/// Two links that start together draw different backoff sequences (their seeds mix the
/// link index and address, not a shared clock reading).
#[test]
fn two_links_get_different_backoff_sequences() {
    let addr = Address::Tcp("127.0.0.1:9".into());
    let mut a = jitter_seed(0, &addr);
    let mut b = jitter_seed(1, &addr);
    let mut c = jitter_seed(0, &Address::Tcp("127.0.0.1:10".into()));
    let seq = |seed: &mut u64| {
        let mut backoff = BACKOFF_MIN;
        (0..6)
            .map(|_| {
                let d = jittered(backoff, seed);
                assert!(d >= backoff / 2 && d < backoff, "{d:?}");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                d
            })
            .collect::<Vec<_>>()
    };
    let (sa, sb, sc) = (seq(&mut a), seq(&mut b), seq(&mut c));
    assert_ne!(sa, sb);
    assert_ne!(sa, sc);
    assert_ne!(sa[0], sb[0]);
}
