//! One timer wheel per core. Connections do not touch it on every message: each keeps its own
//! deadlines, and a wheel entry only says "look at this connection then". A connection whose
//! deadline moved later is simply looked at and scheduled again, so traffic costs nothing here.

/// Wheel entries name a connection slot, its generation, and when they were meant to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    pub generation: u32,
    pub at_ms: u64,
}

pub struct TimerWheel {
    buckets: Vec<Vec<Entry>>,
    tick_ms: u64,
    /// The last tick whose bucket was drained.
    current: u64,
}

impl TimerWheel {
    /// `now_ms` is the clock reading the wheel starts from; ticks are `tick_ms` long and the
    /// wheel spans `buckets` ticks (entries further away come round early and are rescheduled).
    pub fn new(now_ms: u64, tick_ms: u64, buckets: usize) -> TimerWheel {
        assert!(tick_ms > 0 && buckets > 0);
        TimerWheel {
            buckets: vec![Vec::new(); buckets],
            tick_ms,
            current: now_ms / tick_ms,
        }
    }

    /// Schedule a look at `entry.slot` at `entry.at_ms` (rounded up to the next tick, and never
    /// into a tick already drained).
    pub fn schedule(&mut self, entry: Entry) {
        let tick = entry.at_ms.div_ceil(self.tick_ms).max(self.current + 1);
        let n = self.buckets.len() as u64;
        self.buckets[(tick % n) as usize].push(entry);
    }

    /// Move the wheel to `now_ms`, appending to `due` every entry of every tick passed. Entries
    /// whose `at_ms` is still in the future (they wrapped round) are appended too: the caller
    /// checks the connection's real deadline and schedules it again.
    pub fn advance(&mut self, now_ms: u64, due: &mut Vec<Entry>) {
        let target = now_ms / self.tick_ms;
        let n = self.buckets.len() as u64;
        // Never loop more than once round the wheel, however long the core slept.
        let first = self.current + 1;
        let last = target.min(self.current + n);
        for tick in first..=last {
            due.append(&mut self.buckets[(tick % n) as usize]);
        }
        self.current = self.current.max(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(slot: u32, at_ms: u64) -> Entry {
        Entry {
            slot,
            generation: 0,
            at_ms,
        }
    }

    #[test]
    fn fires_at_the_tick_and_not_before() {
        let mut w = TimerWheel::new(1_000, 100, 64);
        w.schedule(e(1, 1_250));
        let mut due = Vec::new();
        w.advance(1_200, &mut due);
        assert!(due.is_empty(), "not due before its tick");
        w.advance(1_300, &mut due);
        assert_eq!(due, vec![e(1, 1_250)]);
        w.advance(5_000, &mut due);
        assert_eq!(due.len(), 1, "fires once");
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick() {
        let mut w = TimerWheel::new(10_000, 100, 8);
        w.schedule(e(2, 0));
        let mut due = Vec::new();
        w.advance(10_100, &mut due);
        assert_eq!(due, vec![e(2, 0)]);
    }

    #[test]
    fn far_deadlines_come_round_early_for_rescheduling() {
        let mut w = TimerWheel::new(0, 100, 4);
        w.schedule(e(3, 1_000));
        let mut due = Vec::new();
        w.advance(400, &mut due);
        assert_eq!(due.len(), 1, "came round after one turn");
        assert!(due[0].at_ms > 400, "the caller sees it is not due yet");
    }

    /// A deadline at the end of time (a saturated `now + timeout`) neither overflows nor
    /// fires: it comes round at most once per turn, the caller sees it is not due and
    /// schedules it again, while a near deadline beside it fires once, on time.
    #[test]
    fn a_far_future_deadline_never_fires_and_never_overflows() {
        let mut w = TimerWheel::new(1_000, 100, 8);
        let far = e(1, u64::MAX);
        w.schedule(far);
        w.schedule(e(2, 1_250));
        let mut near_fired = 0;
        let mut far_seen = 0;
        let mut due = Vec::new();
        // 40 ticks (5 turns), then a clock at the end of time, twice.
        let clocks = (1..=40)
            .map(|t| 1_000 + t * 100)
            .chain([u64::MAX, u64::MAX]);
        for now in clocks {
            w.advance(now, &mut due);
            for entry in due.drain(..) {
                if entry.slot == 2 {
                    assert!(now >= 1_250, "the near one fired early at {now}");
                    near_fired += 1;
                } else {
                    assert_eq!(entry, far);
                    assert!(entry.at_ms > now || now == u64::MAX);
                    far_seen += 1;
                    w.schedule(far);
                }
            }
        }
        assert_eq!(near_fired, 1);
        assert!(
            (5..=7).contains(&far_seen),
            "once per turn, not per tick: {far_seen}"
        );
    }

    #[test]
    fn a_long_sleep_drains_each_bucket_once() {
        let mut w = TimerWheel::new(0, 10, 16);
        for i in 0..16 {
            w.schedule(e(i, u64::from(i) * 10 + 10));
        }
        let mut due = Vec::new();
        w.advance(1_000_000, &mut due);
        assert_eq!(due.len(), 16);
        w.schedule(e(99, 1_000_005));
        due.clear();
        w.advance(1_000_010, &mut due);
        assert_eq!(due, vec![e(99, 1_000_005)]);
    }
}
