//! The embedded `echo` upstream: every message goes back to the connection that sent it.
//! It is the default upstream, so the gateway serves real traffic with no configuration.

use crossbeam_channel::Receiver;

use super::{EdgeSink, ToEdge, ToUpstream};

/// Run until every core has dropped its sender. Drains what is queued before waking cores,
/// so a burst of messages costs one wake-up per core, not one per message.
pub fn run(rx: Receiver<ToUpstream>, mut sink: impl EdgeSink) {
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut batch = 0;
        while let Some(msg) = next {
            match msg {
                ToUpstream::Message {
                    conn,
                    kind,
                    payload,
                    ..
                } => sink.send(ToEdge::Send {
                    conn,
                    kind,
                    payload,
                }),
                ToUpstream::Fence { conn, code, reason } => {
                    sink.send(ToEdge::Close { conn, code, reason })
                }
                ToUpstream::Open { .. } | ToUpstream::Closed { .. } => {}
            }
            batch += 1;
            next = if batch < 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        sink.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::ConnId;
    use crate::protocol::message::MessageKind;
    use bytes::Bytes;

    #[derive(Default)]
    struct Collect {
        sent: Vec<ToEdge>,
        flushes: usize,
    }
    impl EdgeSink for &mut Collect {
        fn send(&mut self, msg: ToEdge) {
            self.sent.push(msg);
        }
        fn flush(&mut self) {
            self.flushes += 1;
        }
    }

    #[test]
    fn messages_go_back_to_their_sender_and_lifecycle_events_do_not() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let a = ConnId::new(0, 1, 1);
        let b = ConnId::new(1, 7, 3);
        tx.send(ToUpstream::Open {
            conn: a,
            upstream: 0,
            info: Box::new(crate::relay::OpenInfo {
                path: "/".into(),
                query: None,
                headers: vec![],
                peer: None,
                authorize: false,
            }),
        })
        .unwrap();
        tx.send(ToUpstream::Message {
            upstream: 0,
            conn: a,
            kind: MessageKind::Text,
            payload: Bytes::from_static(b"hi"),
        })
        .unwrap();
        tx.send(ToUpstream::Message {
            upstream: 0,
            conn: b,
            kind: MessageKind::Binary,
            payload: Bytes::from_static(b"\x00"),
        })
        .unwrap();
        tx.send(ToUpstream::Closed {
            conn: a,
            code: 1000,
        })
        .unwrap();
        drop(tx);
        let mut out = Collect::default();
        run(rx, &mut out);
        assert_eq!(out.sent.len(), 2);
        match &out.sent[0] {
            ToEdge::Send {
                conn,
                kind,
                payload,
            } => {
                assert_eq!(
                    (*conn, *kind, &payload[..]),
                    (a, MessageKind::Text, &b"hi"[..])
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(out.sent[1].conn(), Some(b));
        assert!(out.flushes >= 1);
    }
}
