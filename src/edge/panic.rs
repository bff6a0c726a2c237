//! Panics in one connection's handling: contained to that connection, and never logged with
//! their message (a panic message can quote input, e.g. an `Authorization` header).

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};

thread_local! {
    /// Where this thread last panicked (`file:line`), recorded by the hook.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Inside `contain`: the worker logs the panic itself, the hook stays quiet.
    static CONTAINING: Cell<bool> = const { Cell::new(false) };
}

/// Replace the default panic hook with one that prints the thread name and the location
/// only, never the payload. Called once at start by the binary.
pub fn install_hook() {
    panic::set_hook(Box::new(|info| {
        let location = info.location().map_or_else(
            || "unknown".to_string(),
            |l| format!("{}:{}", l.file(), l.line()),
        );
        if CONTAINING.with(Cell::get) {
            LOCATION.with(|l| *l.borrow_mut() = Some(location));
        } else {
            let thread = std::thread::current();
            eprintln!(
                "thread '{}' panicked at {location} (message withheld)",
                thread.name().unwrap_or("<unnamed>")
            );
        }
    }));
}

/// Run `f`; if it panics, return where (`file:line`, "unknown" without the hook). The
/// payload is dropped unread.
pub fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    result.map_err(|payload| {
        drop(payload);
        LOCATION
            .with(|l| l.borrow_mut().take())
            .unwrap_or_else(|| "unknown".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contained_panic_reports_its_location_not_its_payload() {
        install_hook();
        let r = contain(|| -> u32 { panic!("Authorization: secret") });
        let location = r.unwrap_err();
        assert!(location.contains("panic.rs:"), "{location}");
        assert!(!location.contains("secret"));
        assert_eq!(contain(|| 7), Ok(7));
        let _ = panic::take_hook();
    }
}
