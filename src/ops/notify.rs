//! sd_notify(3) without libsystemd: one datagram per state change to `$NOTIFY_SOCKET`. It
//! tells systemd when the gateway serves (`READY=1`), reloads, drains, and that it is alive
//! (`WATCHDOG=1`). A missing or broken socket is logged and ignored: the gateway must serve
//! the same with or without systemd.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`; `None` when not started by
    /// a service manager that wants notifications (or the socket is unusable: logged).
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::from_vars(socket.as_deref(), usec.as_deref(), pid.as_deref())
    }

    /// [`Notifier::from_env`] on given values, so tests need not touch the process environment.
    pub fn from_vars(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Option<Notifier> {
        let path = notify_socket.filter(|p| !p.is_empty())?;
        let addr = match parse_address(path) {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET {path:?} is not usable: {e}; not notifying systemd");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot create the sd_notify socket: {e}; not notifying systemd");
                return None;
            }
        };
        Some(Notifier {
            socket,
            addr,
            watchdog: watchdog_interval(watchdog_usec, watchdog_pid, std::process::id()),
        })
    }

    /// Send raw `KEY=VALUE` lines (newline-separated), as sd_notify(3) does.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        if sent != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "sd_notify datagram was truncated",
            ));
        }
        Ok(())
    }

    /// Serving: with `Type=notify`, `systemctl start` returns now, not at fork.
    pub fn ready(&self) {
        self.log("READY=1");
    }

    /// A reload began; send [`Notifier::ready`] when it is done. `MONOTONIC_USEC` is what
    /// `Type=notify-reload` (systemd 253+) needs to match this message to its SIGHUP.
    pub fn reloading(&self) {
        self.log(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// Draining: systemd shows "deactivating" and starts `TimeoutStopSec` from now.
    pub fn stopping(&self) {
        self.log("STOPPING=1");
    }

    /// A one-line status shown by `systemctl status`.
    pub fn status(&self, text: &str) {
        // A newline would start a new KEY=VALUE assignment.
        let line: String = text
            .chars()
            .map(|c| if c == '\n' { ' ' } else { c })
            .collect();
        self.log(&format!("STATUS={line}"));
    }

    /// "Still alive": must arrive within every `WatchdogSec`, or systemd kills and restarts us.
    pub fn watchdog(&self) {
        self.log("WATCHDOG=1");
    }

    /// The watchdog timeout systemd enforces on us, if any. Ping at half of it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    fn log(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::warn!(
                "sd_notify {:?} failed: {e}",
                state.lines().next().unwrap_or("")
            );
        }
    }
}

/// Ping the watchdog at half its interval while `alive()` says the gateway is healthy; when
/// it stops saying so, the pings stop and systemd restarts the service. `None` when systemd
/// set no watchdog. The thread runs until the process exits.
pub fn spawn_watchdog<F>(notifier: Arc<Notifier>, alive: F) -> Option<JoinHandle<()>>
where
    F: Fn() -> bool + Send + 'static,
{
    let every = notifier.watchdog_interval()? / 2;
    std::thread::Builder::new()
        .name("ringway-watchdog".into())
        .spawn(move || loop {
            if alive() {
                notifier.watchdog();
            }
            std::thread::sleep(every);
        })
        .map_err(|e| tracing::warn!("cannot start the watchdog thread: {e}"))
        .ok()
}

/// `/path` or `@abstract` (Linux abstract namespace), as systemd sets them.
fn parse_address(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        Some(b'/') => SocketAddr::from_pathname(value),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or @abstract-name",
        )),
    }
}

/// `WATCHDOG_USEC` applies to us only if `WATCHDOG_PID` is unset or our pid (it may have been
/// inherited from a parent that is the real main process).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            return None;
        }
    }
    match usec?.trim().parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(us) => Some(Duration::from_micros(us)),
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
/// std's `Instant` uses the same clock but does not expose its value.
fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A listening datagram socket in a fresh temp dir, removed on drop.
    struct Listener {
        dir: PathBuf,
        socket: UnixDatagram,
    }

    impl Listener {
        fn new(tag: &str) -> Listener {
            let dir =
                std::env::temp_dir().join(format!("ringway-notify-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let socket = UnixDatagram::bind(dir.join("notify")).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            Listener { dir, socket }
        }
        fn path(&self) -> PathBuf {
            self.dir.join("notify")
        }
        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn sends_each_state_to_a_path_socket() {
        let l = Listener::new("path");
        let n = Notifier::from_vars(Some(l.path().as_os_str()), None, None).unwrap();
        n.ready();
        assert_eq!(l.recv(), "READY=1");
        n.stopping();
        assert_eq!(l.recv(), "STOPPING=1");
        n.watchdog();
        assert_eq!(l.recv(), "WATCHDOG=1");
        n.status("serving 3 connections\non 2 cores");
        assert_eq!(l.recv(), "STATUS=serving 3 connections on 2 cores");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let l = Listener::new("reload");
        let n = Notifier::from_vars(Some(l.path().as_os_str()), None, None).unwrap();
        let before = monotonic_usec();
        n.reloading();
        let after = monotonic_usec();
        let msg = l.recv();
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("MONOTONIC_USEC line")
            .parse()
            .unwrap();
        assert!(
            before > 0 && before <= usec && usec <= after,
            "{before} {usec} {after}"
        );
        // CLOCK_MONOTONIC never runs ahead of CLOCK_BOOTTIME (/proc/uptime).
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (usec as f64) <= uptime * 1e6 + 1e6,
            "{usec} vs uptime {uptime}"
        );
    }

    #[test]
    fn abstract_socket_names_work() {
        let name = format!("ringway-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let var = format!("@{name}");
        let n = Notifier::from_vars(Some(OsStr::new(&var)), None, None).unwrap();
        n.ready();
        let mut buf = [0u8; 64];
        let got = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1");
    }

    #[test]
    fn no_or_bad_socket_means_no_notifier() {
        assert!(Notifier::from_vars(None, None, None).is_none());
        assert!(Notifier::from_vars(Some(OsStr::new("")), None, None).is_none());
        assert!(Notifier::from_vars(Some(OsStr::new("relative/path")), None, None).is_none());
    }

    #[test]
    fn a_vanished_socket_is_logged_not_fatal() {
        let l = Listener::new("gone");
        let n = Notifier::from_vars(Some(l.path().as_os_str()), None, None).unwrap();
        drop(l);
        assert!(n.send("READY=1").is_err());
        n.ready(); // logs, does not panic
    }

    #[test]
    fn watchdog_applies_only_to_our_pid() {
        let me = 4242;
        assert_eq!(
            watchdog_interval(Some("30000000"), None, me),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("4242"), me),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("1"), me), None);
        assert_eq!(watchdog_interval(Some("0"), None, me), None);
        assert_eq!(watchdog_interval(Some("soon"), None, me), None);
        assert_eq!(watchdog_interval(None, Some("4242"), me), None);
    }

    #[test]
    fn watchdog_thread_pings_while_alive() {
        let l = Listener::new("wd");
        let n = Notifier::from_vars(
            Some(l.path().as_os_str()),
            Some("200000"),
            Some(&std::process::id().to_string()),
        )
        .unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(200)));
        spawn_watchdog(Arc::new(n), || true).expect("watchdog thread");
        assert_eq!(l.recv(), "WATCHDOG=1");
        assert_eq!(l.recv(), "WATCHDOG=1");
        let silent = Notifier::from_vars(Some(l.path().as_os_str()), None, None).unwrap();
        assert!(spawn_watchdog(Arc::new(silent), || true).is_none());
    }
}
