//! Rate and concurrency limits, checked by a core before it spends anything on a connection
//! (at accept, before the handshake is parsed) and on each message after the handshake.
//!
//! Sans-IO: time comes in as `now_ms` (the core's loop clock, any monotonic origin), nothing
//! here reads a clock, locks or allocates per call beyond the bounded IP table.
//!
//! One limiter is owned by ONE core, without locks. Limits are therefore per core: the
//! kernel spreads one client's connections over the cores (SO_REUSEPORT hashes the 4-tuple,
//! and the source port differs), so give each core `IpLimits::per_core(workers)` of the
//! configured total. The effective total is then approximate: at most the configured total
//! plus `workers - 1` (rounding up), and lower for an IP whose connections happen to land
//! unevenly.

use std::collections::HashMap;
use std::net::IpAddr;

/// Tokens are counted in thousandths: a bucket refilling `rate` tokens per second gains
/// exactly `rate` milli-tokens per millisecond, so integer time steps never drift.
const MILLI: u64 = 1000;

/// A token bucket in integer milli-tokens: `burst` tokens at most, refilled at
/// `rate_per_sec`. Starts full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate_per_sec: u32,
    burst: u32,
    /// Milli-tokens available at `last_ms`; never above `burst * MILLI`.
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket. `rate_per_sec == 0` never refills (only the burst is ever allowed);
    /// `burst == 0` allows nothing.
    pub fn new(rate_per_sec: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate_per_sec,
            burst,
            milli_tokens: u64::from(burst) * MILLI,
            last_ms: 0,
        }
    }

    pub fn rate_per_sec(&self) -> u32 {
        self.rate_per_sec
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn capacity(&self) -> u64 {
        u64::from(self.burst) * MILLI
    }

    /// Bring the bucket up to `now_ms`. A clock that goes backwards adds nothing (and does
    /// not move `last_ms` back, so the same interval is never credited twice); a huge gap
    /// saturates at a full bucket instead of overflowing.
    fn refill(&mut self, now_ms: u64) {
        if now_ms <= self.last_ms {
            return;
        }
        let gained = (now_ms - self.last_ms).saturating_mul(u64::from(self.rate_per_sec));
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(gained)
            .min(self.capacity());
        self.last_ms = now_ms;
    }

    /// Take one token if there is one.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.milli_tokens >= MILLI {
            self.milli_tokens -= MILLI;
            true
        } else {
            false
        }
    }

    /// Whole tokens available at `now_ms`.
    pub fn available(&mut self, now_ms: u64) -> u32 {
        self.refill(now_ms);
        // At most `burst`, so it fits.
        (self.milli_tokens / MILLI) as u32
    }

    /// Whether the bucket is full at `now_ms`: it then holds no history, and dropping it
    /// loses nothing (a fresh bucket is full too).
    pub fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.milli_tokens >= self.capacity()
    }

    /// Milliseconds until the next token, for a `Retry-After`; `None` if it never comes.
    pub fn wait_ms(&mut self, now_ms: u64) -> Option<u64> {
        self.refill(now_ms);
        if self.milli_tokens >= MILLI {
            return Some(0);
        }
        if self.rate_per_sec == 0 || self.burst == 0 {
            return None;
        }
        let missing = MILLI - self.milli_tokens;
        Some(missing.div_ceil(u64::from(self.rate_per_sec)))
    }
}

/// Messages per second on one open connection: a bucket the edge keeps per connection and
/// takes from for each complete message. Going over closes with 1008 (RFC 6455 §7.4.1,
/// policy violation).
///
/// A fragments-per-message limit needs no type: the edge counts continuation frames of the
/// message in progress (RFC 6455 §5.4), resets the counter on the final frame, and closes
/// with 1008 when it passes the limit, before buffering more of that message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRate {
    bucket: TokenBucket,
}

impl MessageRate {
    /// The close code for a client over its message rate (RFC 6455 §7.4.1).
    pub const CLOSE_CODE: u16 = 1008;
    pub const CLOSE_REASON: &'static str = "message rate exceeded";

    /// `None` when `per_sec == 0`, meaning no limit. The burst is at least 1.
    pub fn new(per_sec: u32, burst: u32) -> Option<MessageRate> {
        (per_sec > 0).then(|| MessageRate {
            bucket: TokenBucket::new(per_sec, burst.max(1)),
        })
    }

    /// Count one message; `false` means close the connection with [`Self::CLOSE_CODE`].
    pub fn on_message(&mut self, now_ms: u64) -> bool {
        self.bucket.try_take(now_ms)
    }
}

/// Per-IP limits, one core's share. Zero turns a limit off.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpLimits {
    /// Open connections (handshaking or open) per IP; 0 = no limit.
    pub max_concurrent: u32,
    /// New connections per second per IP; 0 = no limit.
    pub connects_per_sec: u32,
    /// New connections an idle IP may open at once (at least 1 when `connects_per_sec` is set).
    pub connect_burst: u32,
    /// IPs tracked at once. A full table refuses new IPs (503) rather than grow.
    pub max_tracked_ips: usize,
}

impl Default for IpLimits {
    fn default() -> Self {
        IpLimits {
            max_concurrent: 0,
            connects_per_sec: 0,
            connect_burst: 0,
            max_tracked_ips: 65_536,
        }
    }
}

impl IpLimits {
    /// One core's share of limits meant for the whole process: each count divided by
    /// `workers`, rounded up, and never below 1 where a limit is set.
    pub fn per_core(&self, workers: usize) -> IpLimits {
        let workers = workers.max(1);
        let share = |v: u32| -> u32 {
            if v == 0 {
                0
            } else {
                (v as usize).div_ceil(workers).max(1) as u32
            }
        };
        IpLimits {
            max_concurrent: share(self.max_concurrent),
            connects_per_sec: share(self.connects_per_sec),
            connect_burst: share(self.connect_burst),
            max_tracked_ips: self.max_tracked_ips.div_ceil(workers).max(1),
        }
    }

    fn enabled(&self) -> bool {
        self.max_concurrent > 0 || self.connects_per_sec > 0
    }
}

/// Why a connection was refused: the HTTP status and a short reason for the response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many new connections from this address")]
    RateLimited {
        /// Until the next connection would be allowed, for `Retry-After` (rounded up to seconds).
        retry_after_ms: u64,
    },
    #[error("too many connections from this address")]
    TooManyConcurrent,
    #[error("too many client addresses; try again later")]
    TableFull,
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::RateLimited { .. } => 429,
            Refusal::TooManyConcurrent | Refusal::TableFull => 503,
        }
    }

    /// Short reason for the response body.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::RateLimited { .. } => "too many new connections from this address",
            Refusal::TooManyConcurrent => "too many connections from this address",
            Refusal::TableFull => "too many client addresses; try again later",
        }
    }

    /// Seconds for a `Retry-After` header (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Refusal::RateLimited { retry_after_ms } => retry_after_ms.div_ceil(1000).max(1),
            Refusal::TooManyConcurrent | Refusal::TableFull => 1,
        }
    }
}

/// The unit a limit applies to: an IPv4 address, or an IPv6 /64 (one subscriber's usual
/// allocation, so rotating through its 2^64 addresses gains nothing). IPv4-mapped IPv6
/// addresses (from dual-stack sockets) count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    V4(u32),
    V6Net64(u64),
}

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(u32::from(v4)),
                None => IpKey::V6Net64((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug)]
struct Entry {
    open: u32,
    bucket: Option<TokenBucket>,
}

impl Entry {
    /// An entry with nothing open and a full bucket says nothing a missing entry does not.
    fn is_idle(&mut self, now_ms: u64) -> bool {
        self.open == 0 && self.bucket.as_mut().is_none_or(|b| b.is_full(now_ms))
    }
}

/// How often a full table is swept for idle entries while it stays full, so a flood of new
/// addresses costs one O(n) sweep per interval, not one per connection.
const FULL_SWEEP_INTERVAL_MS: u64 = 1000;

/// Per-IP concurrency and new-connection rate for one core. Call [`PerIpLimiter::try_open`]
/// at accept and [`PerIpLimiter::closed`] exactly once for each accepted `Ok`, when that
/// connection's socket is closed. Memory is bounded by `max_tracked_ips` entries.
#[derive(Debug)]
pub struct PerIpLimiter {
    limits: IpLimits,
    table: HashMap<IpKey, Entry>,
    /// While the table is full, don't sweep again before this.
    next_full_sweep_ms: u64,
}

impl PerIpLimiter {
    pub fn new(limits: IpLimits) -> PerIpLimiter {
        PerIpLimiter {
            limits,
            table: HashMap::new(),
            next_full_sweep_ms: 0,
        }
    }

    pub fn limits(&self) -> &IpLimits {
        &self.limits
    }

    /// Take new limits (config reload). Open counts are kept; buckets restart full at the
    /// new rate; entries over a smaller table bound stay until they go idle.
    pub fn set_limits(&mut self, limits: IpLimits) {
        for entry in self.table.values_mut() {
            entry.bucket = Self::new_bucket(&limits);
        }
        self.limits = limits;
        self.next_full_sweep_ms = 0;
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }

    fn new_bucket(limits: &IpLimits) -> Option<TokenBucket> {
        (limits.connects_per_sec > 0)
            .then(|| TokenBucket::new(limits.connects_per_sec, limits.connect_burst.max(1)))
    }

    /// A new connection from `ip`: `Ok` counts it as open (pair it with [`Self::closed`]).
    pub fn try_open(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), Refusal> {
        if !self.limits.enabled() {
            return Ok(());
        }
        let key = IpKey::of(ip);
        if !self.table.contains_key(&key) && self.table.len() >= self.limits.max_tracked_ips {
            if now_ms >= self.next_full_sweep_ms {
                self.sweep(now_ms);
                self.next_full_sweep_ms = now_ms.saturating_add(FULL_SWEEP_INTERVAL_MS);
            }
            if self.table.len() >= self.limits.max_tracked_ips {
                return Err(Refusal::TableFull);
            }
        }
        let limits = &self.limits;
        let entry = self.table.entry(key).or_insert_with(|| Entry {
            open: 0,
            bucket: Self::new_bucket(limits),
        });
        let verdict = if limits.max_concurrent > 0 && entry.open >= limits.max_concurrent {
            Err(Refusal::TooManyConcurrent)
        } else if let Some(bucket) = entry.bucket.as_mut() {
            if bucket.try_take(now_ms) {
                Ok(())
            } else {
                Err(Refusal::RateLimited {
                    retry_after_ms: bucket.wait_ms(now_ms).unwrap_or(1000),
                })
            }
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => entry.open = entry.open.saturating_add(1),
            Err(_) => {
                if entry.is_idle(now_ms) {
                    self.table.remove(&key);
                }
            }
        }
        verdict
    }

    /// A connection that `try_open` accepted is gone. Unknown addresses are ignored (a
    /// reload may have turned limits on after it was accepted).
    pub fn closed(&mut self, ip: IpAddr, now_ms: u64) {
        let key = IpKey::of(ip);
        if let Some(entry) = self.table.get_mut(&key) {
            entry.open = entry.open.saturating_sub(1);
            if entry.is_idle(now_ms) {
                self.table.remove(&key);
            }
        }
    }

    /// Drop entries that hold no information (nothing open, bucket refilled). Call it from
    /// a periodic timer (e.g. each second) to keep the table small; a full table also
    /// sweeps itself, at most once per second.
    pub fn sweep(&mut self, now_ms: u64) {
        self.table.retain(|_, entry| !entry.is_idle(now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let mut b = TokenBucket::new(10, 3);
        for _ in 0..3 {
            assert!(b.try_take(1_000));
        }
        assert!(!b.try_take(1_000));
        // 10/s: one token per 100 ms, none before.
        assert!(!b.try_take(1_099));
        assert!(b.try_take(1_100));
        assert!(!b.try_take(1_100));
        assert_eq!(b.wait_ms(1_150), Some(50));
    }

    #[test]
    fn bucket_has_no_drift_for_rates_that_do_not_divide_a_second() {
        // 3/s = one token per 333.33 ms. Refilled in 10 000 steps of 1 ms, the bucket holds
        // exactly what one 10 s step gives: no rounding lost per step.
        let mut b = TokenBucket::new(3, 100);
        for _ in 0..100 {
            assert!(b.try_take(0));
        }
        let mut seen = 0;
        for t in 1..=9_999u64 {
            seen = b.available(t);
        }
        assert_eq!(seen, 29, "29 997 milli-tokens at 9 999 ms");
        assert_eq!(b.available(10_000), 30);
        let mut once = TokenBucket::new(3, 100);
        for _ in 0..100 {
            assert!(once.try_take(0));
        }
        assert_eq!(once.available(10_000), 30);
        assert_eq!(
            once, b,
            "stepped and single refills agree to the milli-token"
        );
    }

    #[test]
    fn bucket_huge_gap_and_backwards_clock_are_safe() {
        let mut b = TokenBucket::new(u32::MAX, u32::MAX);
        assert!(b.try_take(0));
        assert_eq!(b.available(0), u32::MAX - 1);
        // (u64::MAX ms) * (u32::MAX /s) overflows u64: saturates to a full bucket.
        assert!(b.is_full(u64::MAX));
        assert!(b.try_take(u64::MAX));
        assert_eq!(b.available(u64::MAX), u32::MAX - 1);

        let mut b = TokenBucket::new(1, 1);
        assert!(b.try_take(10_000));
        // Clock goes back: no credit, and the later interval is not credited twice.
        assert!(!b.try_take(5_000));
        assert!(!b.try_take(10_999));
        assert!(b.try_take(11_000));
    }

    #[test]
    fn bucket_zero_rate_or_burst() {
        let mut b = TokenBucket::new(0, 2);
        assert!(b.try_take(0));
        assert!(b.try_take(1));
        assert!(!b.try_take(u64::MAX));
        assert_eq!(b.wait_ms(u64::MAX), None);
        let mut b = TokenBucket::new(5, 0);
        assert!(!b.try_take(1_000_000));
    }

    #[test]
    fn message_rate_closes_with_policy_violation() {
        assert!(MessageRate::new(0, 10).is_none());
        let mut m = MessageRate::new(2, 2).unwrap();
        assert!(m.on_message(0));
        assert!(m.on_message(0));
        assert!(!m.on_message(0));
        assert!(m.on_message(500));
        assert_eq!(MessageRate::CLOSE_CODE, 1008);
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn concurrency_limit_is_per_ip_and_released_on_close() {
        let mut l = PerIpLimiter::new(IpLimits {
            max_concurrent: 2,
            ..IpLimits::default()
        });
        assert_eq!(l.try_open(v4(1), 0), Ok(()));
        assert_eq!(l.try_open(v4(1), 0), Ok(()));
        let refused = l.try_open(v4(1), 0).unwrap_err();
        assert_eq!(refused, Refusal::TooManyConcurrent);
        assert_eq!(refused.status(), 503);
        // Another address is unaffected.
        assert_eq!(l.try_open(v4(2), 0), Ok(()));
        l.closed(v4(1), 1);
        assert_eq!(l.try_open(v4(1), 1), Ok(()));
        l.closed(v4(1), 2);
        l.closed(v4(1), 2);
        l.closed(v4(2), 2);
        // Nothing open, no bucket: nothing tracked.
        assert_eq!(l.tracked(), 0);
        // A close for an address never seen is ignored.
        l.closed(v4(9), 3);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn connect_rate_gives_429_with_retry_after() {
        let mut l = PerIpLimiter::new(IpLimits {
            connects_per_sec: 2,
            connect_burst: 2,
            ..IpLimits::default()
        });
        assert_eq!(l.try_open(v4(1), 0), Ok(()));
        assert_eq!(l.try_open(v4(1), 0), Ok(()));
        let refused = l.try_open(v4(1), 100).unwrap_err();
        assert_eq!(
            refused,
            Refusal::RateLimited {
                retry_after_ms: 400
            }
        );
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(l.try_open(v4(1), 500), Ok(()));
        // Closing does not give rate tokens back.
        l.closed(v4(1), 500);
        assert!(l.try_open(v4(1), 500).is_err());
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_v4_is_v4() {
        let mut l = PerIpLimiter::new(IpLimits {
            max_concurrent: 1,
            ..IpLimits::default()
        });
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other_net: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.try_open(a, 0), Ok(()));
        assert_eq!(l.try_open(b, 0), Err(Refusal::TooManyConcurrent));
        assert_eq!(l.try_open(other_net, 0), Ok(()));

        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(l.try_open(v4(7), 0), Ok(()));
        assert_eq!(l.try_open(mapped, 0), Err(Refusal::TooManyConcurrent));
        assert_eq!(
            IpKey::of(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            IpKey::V6Net64(0)
        );
    }

    #[test]
    fn full_table_refuses_new_ips_and_evicts_idle_ones() {
        let mut l = PerIpLimiter::new(IpLimits {
            max_concurrent: 10,
            connects_per_sec: 1,
            connect_burst: 1,
            max_tracked_ips: 2,
        });
        assert_eq!(l.try_open(v4(1), 0), Ok(()));
        assert_eq!(l.try_open(v4(2), 0), Ok(()));
        assert_eq!(l.try_open(v4(3), 0), Err(Refusal::TableFull));
        assert_eq!(Refusal::TableFull.status(), 503);
        assert_eq!(l.tracked(), 2);
        // Known addresses still get through the full table.
        l.closed(v4(1), 0);
        assert_eq!(l.tracked(), 2, "bucket not refilled: the entry is kept");
        // Address 1's bucket is not refilled yet: nothing to evict.
        assert_eq!(l.try_open(v4(3), 999), Err(Refusal::TableFull));
        // Address 1 is idle (nothing open, bucket full again) and swept for address 3.
        assert_eq!(l.try_open(v4(3), 1_000), Ok(()));
        assert_eq!(l.tracked(), 2);
        // Address 2 still has a connection open: never evicted.
        l.sweep(u64::MAX);
        assert_eq!(l.tracked(), 2);
        l.closed(v4(2), u64::MAX);
        l.closed(v4(3), u64::MAX);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let mut l = PerIpLimiter::new(IpLimits {
            connects_per_sec: 1,
            connect_burst: 1,
            max_tracked_ips: 100,
            ..IpLimits::default()
        });
        let mut refused = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            if l.try_open(ip, u64::from(i / 100)) == Err(Refusal::TableFull) {
                refused += 1;
            }
            assert!(l.tracked() <= 100);
        }
        assert_eq!(refused, 10_000 - 100);
    }

    #[test]
    fn no_limits_tracks_nothing() {
        let mut l = PerIpLimiter::new(IpLimits::default());
        for _ in 0..1000 {
            assert_eq!(l.try_open(v4(1), 0), Ok(()));
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn per_core_divides_rounding_up() {
        let total = IpLimits {
            max_concurrent: 10,
            connects_per_sec: 5,
            connect_burst: 1,
            max_tracked_ips: 1000,
        };
        let share = total.per_core(4);
        assert_eq!(share.max_concurrent, 3);
        assert_eq!(share.connects_per_sec, 2);
        assert_eq!(share.connect_burst, 1);
        assert_eq!(share.max_tracked_ips, 250);
        assert_eq!(IpLimits::default().per_core(4).max_concurrent, 0);
        assert_eq!(total.per_core(0), total);
    }

    #[test]
    fn extreme_rates_times_and_counts_never_overflow() {
        let mut b = TokenBucket::new(u32::MAX, u32::MAX);
        assert!(b.try_take(0));
        assert!(b.try_take(u64::MAX));
        assert_eq!(b.available(u64::MAX), u32::MAX - 1);
        // The clock going backwards adds nothing and does not panic.
        assert!(b.try_take(0));
        assert_eq!(b.wait_ms(0), Some(0));

        let mut slow = TokenBucket::new(1, 1);
        assert!(slow.try_take(u64::MAX - 1));
        assert_eq!(slow.wait_ms(u64::MAX - 1), Some(1000));
        assert!(
            !slow.try_take(u64::MAX),
            "1 milli-token gained, not a whole one"
        );
        assert_eq!(TokenBucket::new(0, 0).wait_ms(u64::MAX), None);

        let mut m = MessageRate::new(u32::MAX, 0).unwrap();
        assert!(m.on_message(u64::MAX));
        assert!(MessageRate::new(0, u32::MAX).is_none());

        let limits = IpLimits {
            max_concurrent: u32::MAX,
            connects_per_sec: u32::MAX,
            connect_burst: u32::MAX,
            max_tracked_ips: usize::MAX,
        };
        assert_eq!(limits.per_core(0).max_concurrent, u32::MAX);
        assert_eq!(limits.per_core(usize::MAX).max_concurrent, 1);
        assert_eq!(limits.per_core(usize::MAX).max_tracked_ips, 1);
        let mut l = PerIpLimiter::new(limits);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(l.try_open(ip, u64::MAX).is_ok());
        l.closed(ip, 0);
        l.closed(ip, u64::MAX);
        l.sweep(u64::MAX);
        assert_eq!(
            Refusal::RateLimited {
                retry_after_ms: u64::MAX
            }
            .retry_after_secs(),
            u64::MAX.div_ceil(1000)
        );
        let v6 = IpAddr::V6(Ipv6Addr::new(0xffff, 0xffff, 0xffff, 0xffff, 1, 2, 3, 4));
        assert_eq!(IpKey::of(v6), IpKey::V6Net64(u64::MAX));
    }
}
