//! Liveness from heartbeats: every core's event loop and the relay thread beat once per loop
//! turn ([`Heartbeat`]); a loop that has not turned for [`STALL_AFTER`] is stuck, and then
//! `/healthz` and `/readyz` answer 503 naming it and the systemd watchdog is no longer fed.
//! A core turns at least every 50 ms (its tick) and the relay at least every
//! [`RELAY_TURN`], so a healthy gateway is far from the limit even on a busy machine.

use std::sync::Arc;
use std::time::Duration;

use crate::edge::CoreStats;
use crate::telemetry::Heartbeat;

/// A loop that has not turned for this long is reported as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(2);

pub use crate::telemetry::RELAY_TURN;

/// Every loop a health check looks at, by name (`core0`, `core1`, ..., `relay`), with its
/// heartbeat: the labels of `ringway_loop_heartbeat_age_seconds`.
pub fn loops<'a>(
    cores: &'a [Arc<CoreStats>],
    relay: Option<&'a Heartbeat>,
) -> Vec<(String, &'a Heartbeat)> {
    let mut all: Vec<(String, &Heartbeat)> = cores
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("core{i}"), &c.heartbeat))
        .collect();
    if let Some(r) = relay {
        all.push(("relay".into(), r));
    }
    all
}

/// Ok while every core (and the relay, when there is one) turned within [`STALL_AFTER`];
/// otherwise which ones are stuck, e.g. `core 1 stalled for 3.2 s`.
pub fn liveness(cores: &[Arc<CoreStats>], relay: Option<&Heartbeat>) -> Result<(), String> {
    let limit = STALL_AFTER.as_millis() as u64;
    let mut stuck = Vec::new();
    for (i, core) in cores.iter().enumerate() {
        let age = core.heartbeat.age_ms();
        if age > limit {
            stuck.push(format!("core {i} stalled for {:.1} s", age as f64 / 1000.0));
        }
    }
    if let Some(r) = relay {
        let age = r.age_ms();
        if age > limit {
            stuck.push(format!("relay stalled for {:.1} s", age as f64 / 1000.0));
        }
    }
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(stuck.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_stuck_loop() {
        let cores = vec![
            Arc::new(CoreStats::default()),
            Arc::new(CoreStats::default()),
        ];
        let relay = Heartbeat::default();
        assert_eq!(liveness(&cores, Some(&relay)), Ok(()));
        assert_eq!(loops(&cores, Some(&relay)).len(), 3);
        assert_eq!(loops(&cores, None)[1].0, "core1");
        std::thread::sleep(STALL_AFTER + Duration::from_millis(150));
        cores[0].heartbeat.beat();
        let why = liveness(&cores, Some(&relay)).unwrap_err();
        assert!(why.starts_with("core 1 stalled for 2."), "{why}");
        assert!(why.contains("; relay stalled for 2."), "{why}");
        assert!(!why.contains("core 0"), "{why}");
        cores[1].heartbeat.beat();
        relay.beat();
        assert_eq!(liveness(&cores, Some(&relay)), Ok(()));
    }
}
