//! A session's deadlines as one table. The session computes it from its state and the
//! configuration whenever the driver asks (`Session::poll_timeout`), so a deadline that moved
//! (traffic, a reload) costs nothing until it is looked at; `Session::handle_timeout` fires
//! the first expired timer in the table's order.

/// Every per-connection deadline, in the order they are fired when several are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Our close (or last response) was sent, or we wait for the relay's fence or the
    /// client's FIN: past this, TCP is dropped.
    CloseLinger,
    /// Draining: an open client that has not answered our 1001 is kept until the drain
    /// deadline (then the driver closes everything).
    Drain,
    /// The upgrade request did not complete in time: 408.
    Handshake,
    /// The backend did not accept or reject a held handshake in time: 503.
    Authorize,
    /// Paused over its send queue for too long: 1008 "slow consumer".
    SlowConsumer,
    /// Its JWT expired: 1008 "token expired".
    TokenExpiry,
    /// Our ping got no pong in time: 1001 "no pong received".
    Pong,
    /// No message for too long: 1001 "idle timeout".
    Idle,
    /// Nothing received for a while: send a ping.
    Ping,
}

const COUNT: usize = 9;

impl Timer {
    pub const ALL: [Timer; COUNT] = [
        Timer::CloseLinger,
        Timer::Drain,
        Timer::Handshake,
        Timer::Authorize,
        Timer::SlowConsumer,
        Timer::TokenExpiry,
        Timer::Pong,
        Timer::Idle,
        Timer::Ping,
    ];
}

/// When each armed timer is due, in ms on the core's clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerTable {
    at: [Option<u64>; COUNT],
}

impl TimerTable {
    pub fn set(&mut self, timer: Timer, at_ms: u64) {
        self.at[timer as usize] = Some(at_ms);
    }

    pub fn get(&self, timer: Timer) -> Option<u64> {
        self.at[timer as usize]
    }

    /// The earliest deadline armed.
    pub fn next(&self) -> Option<u64> {
        self.at.iter().flatten().copied().min()
    }

    /// The first timer (in the table's order) due at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> Option<Timer> {
        Timer::ALL
            .into_iter()
            .find(|&t| self.get(t).is_some_and(|at| at <= now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_the_earliest_and_order_breaks_ties() {
        let mut t = TimerTable::default();
        assert_eq!((t.next(), t.expired(u64::MAX)), (None, None));
        t.set(Timer::Ping, 100);
        t.set(Timer::Idle, 100);
        t.set(Timer::TokenExpiry, 300);
        assert_eq!(t.next(), Some(100));
        assert_eq!(t.expired(99), None);
        assert_eq!(t.expired(100), Some(Timer::Idle), "idle fires before ping");
        assert_eq!(t.expired(300), Some(Timer::TokenExpiry));
    }
}
