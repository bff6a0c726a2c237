//! Topic publishes and broadcasts on one core: encoded once, the same bytes queued to every
//! local recipient's session; and the core's topic table (topic -> subscriber slots).

use std::collections::HashMap;

use crate::relay::{ToEdge, ToUpstream, Topic};
use crate::session::{self, compression};

use super::super::panic;
use super::Worker;

impl Worker {
    /// A publish or broadcast: encoded once, the same bytes queued to every recipient here.
    pub(super) fn on_fanout(&mut self, msg: ToEdge) {
        let (recipients, kind, payload): (Vec<u32>, _, _) = match msg {
            ToEdge::Publish {
                topic,
                kind,
                payload,
            } => match self.topics.get(&topic) {
                Some(slots) => (slots.clone(), kind, payload),
                None => return,
            },
            ToEdge::Broadcast { kind, payload } => {
                let open = (0..self.slots.len() as u32)
                    .filter(|&s| {
                        self.slots[s as usize]
                            .conn
                            .as_ref()
                            .is_some_and(|c| c.session.is_open())
                    })
                    .collect();
                (open, kind, payload)
            }
            _ => return,
        };
        let opcode = session::opcode_for(kind);
        let frame = session::encode(opcode, &payload);
        // Compressed once per core and window size, for the subscribers that negotiated it.
        let mut compressed: [Option<bytes::Bytes>; 7] = Default::default();
        let min = self.core.config.compression_min_bytes;
        let level = self.core.config.compression_level;
        for slot in recipients {
            let Some(conn) = self.slots[slot as usize].conn.as_mut() else {
                continue;
            };
            if conn.shut || !conn.session.accepts_fanout() {
                continue;
            }
            let core = &mut self.core;
            let session = &mut conn.session;
            let frame = match session.deflate_bits() {
                // `dedicated`: its own context, so its own compression.
                _ if session.compresses_alone() => {
                    match panic::contain(|| {
                        session.encode_message(&mut core.cx(), opcode, &payload)
                    }) {
                        Ok(frame) => frame,
                        Err(location) => {
                            self.contained_panic(slot, &location);
                            self.after_event(slot);
                            continue;
                        }
                    }
                }
                Some(bits) if payload.len() >= min => {
                    let i = usize::from(bits.saturating_sub(9)).min(6);
                    let frame = compressed[i]
                        .get_or_insert_with(|| {
                            core.codec.encode(
                                &*core.meter.stats,
                                level,
                                Some(bits),
                                0,
                                opcode,
                                &payload,
                            )
                        })
                        .clone();
                    // Compressed once per core, but counted for each recipient's route.
                    let z = compression::payload_len(frame.len());
                    core.codec
                        .count_route(session.route(), true, payload.len(), z);
                    frame
                }
                _ => frame.clone(),
            };
            let queued = panic::contain(|| session.queue_fanout(&mut core.cx(), frame));
            if let Err(location) = queued {
                self.contained_panic(slot, &location);
            }
            self.after_event(slot);
        }
    }
}

impl Worker {
    /// Tell the relay when `topic`'s local subscriber list went from empty to not or back
    /// (`had` is what [`watch_interest`] saw), so the node subscribes to the topic
    /// on the cluster bus only while some core has subscribers.
    pub(super) fn report_interest(&mut self, watched: Option<(Topic, bool)>) {
        let Some((topic, had)) = watched else { return };
        let has = self.topics.contains_key(&topic);
        if had != has {
            self.core
                .send_to_relay(ToUpstream::Interest { topic, on: has });
        }
    }
}

/// With `[cluster]`, for a subscribe or unsubscribe: its topic and whether this core has
/// subscribers for it before the change.
pub(super) fn watch_interest(
    topics: &HashMap<Topic, Vec<u32>>,
    cluster: bool,
    msg: &ToEdge,
) -> Option<(Topic, bool)> {
    match msg {
        ToEdge::Subscribe { topic, .. } | ToEdge::Unsubscribe { topic, .. } if cluster => {
            Some((topic.clone(), topics.contains_key(topic)))
        }
        _ => None,
    }
}

/// Take `slot` off `topic`'s subscribers (and the topic off the table once it has none);
/// true when it had and now has none.
pub(super) fn unsubscribe(topics: &mut HashMap<Topic, Vec<u32>>, topic: &Topic, slot: u32) -> bool {
    if let Some(slots) = topics.get_mut(topic) {
        if let Some(i) = slots.iter().position(|&s| s == slot) {
            slots.swap_remove(i);
        }
        if slots.is_empty() {
            topics.remove(topic);
            return true;
        }
    }
    false
}
