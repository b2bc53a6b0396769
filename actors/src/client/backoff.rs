//! Reconnection backoff: exponential delays with jitter, flap control and an attempt
//! limit, as a small deterministic state machine (no clock, no RNG: the caller passes
//! how long the connection lived and a random sample in `[0, 1)`), so every rule is unit
//! tested here and the connection actor only sleeps what it is told.
//!
//! The rules are the stock clients' (spec rpc-protocol.md §1.6; hypha-rpc 0.21.47):
//!
//! * A connection that lived less than [`BackoffConfig::flap_window`] after its handshake
//!   is a *flap*. Consecutive flaps are counted; a connection that lived longer resets
//!   the count.
//! * After a loss the attempt counter starts at `max(0, flaps - 1)`: the first flap is
//!   free (a genuine one-off drop reconnects at once), repeated flaps start further up the
//!   exponential curve and wait at least [`BackoffConfig::flap_min_delay`] before the
//!   first attempt. Because the seeded counter counts toward
//!   [`BackoffConfig::max_attempts`], a server that accepts and then drops us over and
//!   over makes the client give up instead of reconnecting forever (a restart storm).
//! * After a failed attempt `n` (0-based) the next one waits
//!   `min(base * 2^n, max) ± jitter`, at least [`BackoffConfig::min_delay`].
//! * Jitter is a fraction of the delay, uniform in `±jitter`, so that clients dropped
//!   together by a restarting server do not come back in lockstep.

use std::time::Duration;

/// The backoff policy. Every delay is a `Duration`; defaults are the Python client's.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffConfig {
    /// The delay after the first failed attempt; it doubles with each further one
    /// (Python: 1 s).
    pub base_delay: Duration,
    /// The delay never grows beyond this (Python: 60 s).
    pub max_delay: Duration,
    /// Jitter as a fraction of the delay, `0.0..=1.0` (Python: 0.1, i.e. ±10 %).
    pub jitter: f64,
    /// No retry waits less than this, whatever the jitter (Python: 0.1 s).
    pub min_delay: Duration,
    /// A connection that lived less than this after its handshake is a flap (Python: 5 s).
    pub flap_window: Duration,
    /// When flapping, the first attempt waits at least this long (Python: 1 s).
    pub flap_min_delay: Duration,
    /// Attempts (counting the flap-seeded ones) before giving up; `0` disables
    /// reconnection: a lost connection is final (Python: 1,000,000).
    pub max_attempts: u32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter: 0.1,
            min_delay: Duration::from_millis(100),
            flap_window: Duration::from_secs(5),
            flap_min_delay: Duration::from_secs(1),
            max_attempts: 1_000_000,
        }
    }
}

impl BackoffConfig {
    /// A policy that never reconnects.
    pub fn disabled() -> Self {
        Self { max_attempts: 0, ..Self::default() }
    }

    /// Whether losses are retried at all.
    pub fn enabled(&self) -> bool {
        self.max_attempts > 0
    }
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Attempt after this delay (zero: at once).
    RetryAfter(Duration),
    /// Stop: the attempt limit is reached (or reconnection is disabled).
    GiveUp,
}

/// The state of one client's reconnection. See the module documentation.
#[derive(Clone, Debug)]
pub struct Backoff {
    config: BackoffConfig,
    /// Consecutive connections that died within the flap window.
    flaps: u32,
    /// The attempt about to be made (0-based, seeded from `flaps` after a loss).
    attempt: u32,
}

impl Backoff {
    /// A fresh state for `config`.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, flaps: 0, attempt: 0 }
    }

    /// The policy.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// Consecutive flaps so far.
    pub fn flaps(&self) -> u32 {
        self.flaps
    }

    /// The number of the attempt about to be made (0-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A connection was lost after living `lived` since its handshake. Returns the delay
    /// before the first reconnection attempt, or `GiveUp`. `sample` is uniform in `[0, 1)`.
    pub fn lost(&mut self, lived: Duration, sample: f64) -> Next {
        if !self.config.enabled() {
            return Next::GiveUp;
        }
        if lived < self.config.flap_window {
            self.flaps = self.flaps.saturating_add(1);
        } else {
            self.flaps = 0;
        }
        self.attempt = self.flaps.saturating_sub(1);
        if self.attempt >= self.config.max_attempts {
            return Next::GiveUp;
        }
        if self.attempt == 0 {
            return Next::RetryAfter(Duration::ZERO);
        }
        let delay = self.jittered(self.exponential(self.attempt - 1), sample);
        Next::RetryAfter(delay.max(self.config.flap_min_delay))
    }

    /// The current attempt failed (the socket or handshake failed, or the services could
    /// not be registered again). Returns the delay before the next one, or `GiveUp`.
    pub fn failed(&mut self, sample: f64) -> Next {
        let delay = self.jittered(self.exponential(self.attempt), sample).max(self.config.min_delay);
        self.attempt = self.attempt.saturating_add(1);
        if self.attempt >= self.config.max_attempts {
            return Next::GiveUp;
        }
        Next::RetryAfter(delay)
    }

    /// `min(base * 2^n, max)`, without overflowing for large `n`.
    fn exponential(&self, n: u32) -> Duration {
        let factor = 2f64.powi(n.min(64) as i32);
        let secs = (self.config.base_delay.as_secs_f64() * factor).min(self.config.max_delay.as_secs_f64());
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// `delay ± jitter * delay`, for `sample` in `[0, 1)` (clamped if outside).
    fn jittered(&self, delay: Duration, sample: f64) -> Duration {
        let jitter = if self.config.jitter.is_finite() { self.config.jitter.clamp(0.0, 1.0) } else { 0.0 };
        let sample = if sample.is_finite() { sample.clamp(0.0, 1.0) } else { 0.5 };
        let offset = (2.0 * sample - 1.0) * jitter;
        Duration::from_secs_f64((delay.as_secs_f64() * (1.0 + offset)).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MID: f64 = 0.5; // no jitter
    const LONG: Duration = Duration::from_secs(3600);
    const SHORT: Duration = Duration::from_secs(1);

    fn secs(n: Next) -> f64 {
        match n {
            Next::RetryAfter(d) => d.as_secs_f64(),
            Next::GiveUp => f64::NAN,
        }
    }

    #[test]
    fn a_long_lived_connection_reconnects_at_once_then_backs_off_exponentially() {
        let mut b = Backoff::new(BackoffConfig::default());
        assert_eq!(b.lost(LONG, MID), Next::RetryAfter(Duration::ZERO));
        let delays: Vec<f64> = (0..8).map(|_| secs(b.failed(MID))).collect();
        assert_eq!(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]);
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_min_delay_holds() {
        let mut b = Backoff::new(BackoffConfig::default());
        b.lost(LONG, MID);
        let mut low = b.clone();
        let mut high = b.clone();
        assert!((secs(low.failed(0.0)) - 0.9).abs() < 1e-9);
        assert!((secs(high.failed(0.999_999)) - 1.1).abs() < 1e-5);
        let tiny = BackoffConfig { base_delay: Duration::from_millis(1), ..BackoffConfig::default() };
        let mut t = Backoff::new(tiny);
        t.lost(LONG, MID);
        assert_eq!(t.failed(0.0), Next::RetryAfter(Duration::from_millis(100)), "min_delay floor");
        // Bad samples do not panic or produce negative delays.
        assert!(secs(b.failed(f64::NAN)) > 0.0);
        assert!(secs(b.failed(-5.0)) > 0.0);
    }

    #[test]
    fn the_first_flap_is_free_and_repeated_flaps_escalate() {
        let mut b = Backoff::new(BackoffConfig::default());
        assert_eq!(b.lost(SHORT, MID), Next::RetryAfter(Duration::ZERO), "first flap: at once");
        assert_eq!(b.flaps(), 1);
        // Reconnected, died quickly again: attempt 1, waits max(1 s, base * 2^0).
        assert_eq!(secs(b.lost(SHORT, MID)), 1.0);
        assert_eq!(b.attempt(), 1);
        assert_eq!(secs(b.lost(SHORT, MID)), 2.0);
        assert_eq!(secs(b.lost(SHORT, MID)), 4.0);
        // The flap floor holds even with a tiny base delay.
        let tiny = BackoffConfig { base_delay: Duration::from_millis(10), ..BackoffConfig::default() };
        let mut t = Backoff::new(tiny);
        t.lost(SHORT, MID);
        assert_eq!(t.lost(SHORT, 0.0), Next::RetryAfter(Duration::from_secs(1)));
        // A healthy connection resets the count.
        assert_eq!(b.lost(LONG, MID), Next::RetryAfter(Duration::ZERO));
        assert_eq!((b.flaps(), b.attempt()), (0, 0));
    }

    #[test]
    fn failures_after_a_flap_continue_from_the_seeded_attempt() {
        let mut b = Backoff::new(BackoffConfig::default());
        b.lost(SHORT, MID);
        b.lost(SHORT, MID);
        b.lost(SHORT, MID); // attempt 2
        assert_eq!(secs(b.failed(MID)), 4.0);
        assert_eq!(b.attempt(), 3);
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let config = BackoffConfig { max_attempts: 3, ..BackoffConfig::default() };
        let mut b = Backoff::new(config);
        assert_eq!(b.lost(LONG, MID), Next::RetryAfter(Duration::ZERO)); // attempt 0
        assert!(matches!(b.failed(MID), Next::RetryAfter(_))); // attempt 1
        assert!(matches!(b.failed(MID), Next::RetryAfter(_))); // attempt 2
        assert_eq!(b.failed(MID), Next::GiveUp, "three attempts made");
    }

    #[test]
    fn flapping_counts_toward_giving_up() {
        let config = BackoffConfig { max_attempts: 3, ..BackoffConfig::default() };
        let mut b = Backoff::new(config);
        assert!(matches!(b.lost(SHORT, MID), Next::RetryAfter(_))); // attempt 0
        assert!(matches!(b.lost(SHORT, MID), Next::RetryAfter(_))); // attempt 1
        assert!(matches!(b.lost(SHORT, MID), Next::RetryAfter(_))); // attempt 2
        assert_eq!(b.lost(SHORT, MID), Next::GiveUp, "a connection that keeps dying quickly gives up");
    }

    #[test]
    fn disabled_gives_up_at_once() {
        let mut b = Backoff::new(BackoffConfig::disabled());
        assert!(!b.config().enabled());
        assert_eq!(b.lost(LONG, MID), Next::GiveUp);
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let mut b = Backoff::new(BackoffConfig::default());
        b.lost(LONG, MID);
        for _ in 0..200 {
            assert!(secs(b.failed(MID)) <= 60.0);
        }
    }
}
