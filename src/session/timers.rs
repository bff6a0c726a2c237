//! A session's deadlines as one table. The session computes it from its state and the
//! configuration whenever the driver asks (`Session::poll_timeout`), so a deadline that moved
//! (traffic, a reload) costs nothing until it is looked at; `Session::handle_timeout` fires
//! the first expired timer in the table's order.

use super::{close, handshake, Context, Count, Fence, Lifecycle, PolicyRefusal, Session};
use super::{encode, OpCode, SLOW_CONSUMER_GRACE_MS};
use crate::config::Config;

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

// ----- the session's timer rules -----

impl Session {
    /// Every armed deadline, from its state and the configuration. `draining` is the
    /// gateway's drain deadline, if it drains.
    pub fn timers(&self, config: &Config, draining: Option<u64>) -> TimerTable {
        let mut t = TimerTable::default();
        let fin_sent_ms = match self.state {
            Lifecycle::Closed => return t,
            Lifecycle::Draining { fin_sent_ms, .. } => fin_sent_ms,
            _ => None,
        };
        if let Some(since) = fin_sent_ms.or(self.fence.as_ref().map(|f| f.since_ms)) {
            t.set(
                Timer::CloseLinger,
                since.saturating_add(config.close_linger_ms),
            );
            return t;
        }
        if self.close_sent_ms.is_some() || self.is_draining() {
            let linger = self
                .close_sent_ms
                .unwrap_or(self.last_rx_ms)
                .saturating_add(config.close_linger_ms);
            match draining {
                Some(d) if self.is_open() && !self.close.close_received() => {
                    t.set(Timer::Drain, d.max(linger))
                }
                _ => t.set(Timer::CloseLinger, linger),
            }
            return t;
        }
        match self.state {
            Lifecycle::Handshaking(_) => t.set(
                Timer::Handshake,
                self.accepted_ms.saturating_add(config.handshake_timeout_ms),
            ),
            Lifecycle::Authorizing { until_ms, .. } => t.set(Timer::Authorize, until_ms),
            Lifecycle::Open => {
                if config.ping_interval_ms > 0 {
                    match self.ping_sent_ms {
                        Some(sent) if config.pong_timeout_ms > 0 => {
                            t.set(Timer::Pong, sent.saturating_add(config.pong_timeout_ms))
                        }
                        Some(_) => {}
                        None => t.set(
                            Timer::Ping,
                            self.last_rx_ms.saturating_add(config.ping_interval_ms),
                        ),
                    }
                }
                if config.idle_timeout_ms > 0 {
                    t.set(
                        Timer::Idle,
                        self.last_message_ms.saturating_add(config.idle_timeout_ms),
                    );
                }
                if let Some(at) = self.token_expiry_ms {
                    t.set(Timer::TokenExpiry, at);
                }
                if let (Some(since), false) = (self.over_queue_ms, self.eof) {
                    t.set(
                        Timer::SlowConsumer,
                        since.saturating_add(SLOW_CONSUMER_GRACE_MS),
                    );
                }
            }
            // Input stopped without a close frame or fence (a caught panic the driver ends
            // at once): bounded all the same.
            Lifecycle::Closing | Lifecycle::Draining { .. } | Lifecycle::Closed => t.set(
                Timer::CloseLinger,
                self.last_rx_ms.saturating_add(config.close_linger_ms),
            ),
        }
        t
    }

    /// When the driver must next call `handle_timeout`.
    pub fn poll_timeout(&self, config: &Config, draining: Option<u64>) -> Option<u64> {
        self.timers(config, draining).next()
    }

    /// Fire the first expired timer, if any; returns it.
    pub fn handle_timeout(&mut self, cx: &mut Context<'_>, draining: Option<u64>) -> Option<Timer> {
        let now = cx.now_ms;
        let timer = self.timers(cx.config, draining).expired(now)?;
        match timer {
            Timer::CloseLinger | Timer::Drain => {
                if let Some(Fence {
                    error: Some((code, reason)),
                    ..
                }) = self.fence.take().map(|f| *f)
                {
                    // The relay did not hand back the fence: the client gets its close now.
                    tracing::debug!(conn = %self.id, "fence timed out; closing {code}");
                    self.start_close(now, code, &reason);
                    self.drain();
                } else {
                    // The client did not answer our close, or will not read what we queued.
                    tracing::debug!(conn = %self.id, "close linger expired; dropping TCP");
                    self.abort();
                }
            }
            // Still in its TLS handshake: no 408 can be sent; dropped, counted by reason.
            Timer::Handshake if self.transport.handshaking() => self.tls_handshake_timed_out(cx),
            Timer::Handshake => {
                let reason = "handshake not completed in time";
                let response = handshake::error_response(408, reason, &[]);
                self.refuse(cx, response, &reason);
                // Give the 408 one linger period to leave, then drop regardless.
                self.close_sent_ms = Some(now);
            }
            Timer::Authorize => {
                tracing::debug!(conn = %self.id, "backend did not authorize in time");
                self.on_authorization(cx, Err((503, "authorization timed out".into())));
                self.close_sent_ms = Some(now);
            }
            Timer::SlowConsumer => {
                tracing::debug!(conn = %self.id, queued = self.out.bytes(), "slow consumer");
                cx.meter.count(Count::SlowConsumerClosed);
                self.start_close(now, close::POLICY_VIOLATION, "slow consumer");
                self.reading_done = true;
                self.closing_without_reply = true;
                self.drain();
            }
            Timer::TokenExpiry => {
                cx.meter.count(Count::Refused(PolicyRefusal::TokenExpired));
                self.start_close(now, close::POLICY_VIOLATION, "token expired");
            }
            Timer::Pong => self.start_close(now, close::GOING_AWAY, "no pong received"),
            Timer::Idle => self.start_close(now, close::GOING_AWAY, "idle timeout"),
            Timer::Ping => {
                self.out.push(encode(OpCode::Ping, b""));
                self.ping_sent_ms = Some(now);
            }
        }
        Some(timer)
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
