//! TEST-ONLY fault injection for the health and supervision tests (tests/hardening_ops.rs):
//! make one event loop stall or panic, to prove that `/healthz`, `/readyz`, the systemd
//! watchdog and the loop supervisor notice. Read once, from the environment, at the first
//! loop turn; with none of these variables set (as in any real deployment) every hook is a
//! no-op costing one relaxed load per loop turn.
//!
//! - `RINGWAY_TEST_STALL_CORE=N`: core N stops turning (sleeps forever) once the process has
//!   run for `RINGWAY_TEST_HOOK_AFTER_MS` (default 500).
//! - `RINGWAY_TEST_PANIC_CORE=N`: core N's event loop panics at that time.
//! - `RINGWAY_TEST_STALL_RELAY=1` / `RINGWAY_TEST_PANIC_RELAY=1`: the same for the relay.
//!
//! Do not set them in production.

use std::sync::OnceLock;
use std::time::Duration;

#[derive(Debug, Default)]
struct Hooks {
    stall_core: Option<usize>,
    panic_core: Option<usize>,
    stall_relay: bool,
    panic_relay: bool,
    after_ms: u64,
}

/// Which loop is turning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Core(usize),
    Relay,
}

fn hooks() -> Option<&'static Hooks> {
    static HOOKS: OnceLock<Option<Hooks>> = OnceLock::new();
    HOOKS
        .get_or_init(|| {
            let var = |name: &str| std::env::var(name).ok();
            let num = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
            let flag = |name: &str| var(name).is_some_and(|v| v.trim() == "1");
            let hooks = Hooks {
                stall_core: num("RINGWAY_TEST_STALL_CORE"),
                panic_core: num("RINGWAY_TEST_PANIC_CORE"),
                stall_relay: flag("RINGWAY_TEST_STALL_RELAY"),
                panic_relay: flag("RINGWAY_TEST_PANIC_RELAY"),
                after_ms: var("RINGWAY_TEST_HOOK_AFTER_MS")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(500),
            };
            let any = hooks.stall_core.is_some()
                || hooks.panic_core.is_some()
                || hooks.stall_relay
                || hooks.panic_relay;
            if any {
                tracing::warn!("test-only fault injection is on: {hooks:?}");
            }
            any.then_some(hooks)
        })
        .as_ref()
}

/// Called once per turn of every event loop.
#[inline]
pub fn on_loop_turn(which: Loop) {
    let Some(h) = hooks() else { return };
    if crate::telemetry::uptime_ms() < h.after_ms {
        return;
    }
    let (stall, panic) = match which {
        Loop::Core(i) => (h.stall_core == Some(i), h.panic_core == Some(i)),
        Loop::Relay => (h.stall_relay, h.panic_relay),
    };
    if panic {
        panic!("test hook: {which:?} event loop panics on purpose");
    }
    if stall {
        tracing::warn!("test hook: {which:?} event loop stalls on purpose");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}
