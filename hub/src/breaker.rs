//! The hub's circuit breaker on the cloud link: after a few requests in a row get no answer in
//! time, requests fail at once (not sent) for a cool-down instead of each making a cashier wait out
//! the full deadline; then one request probes the cloud, and an answer closes the circuit.

use std::time::{Duration, Instant};

/// Where the breaker is; `facepay_hub_cloud_breaker_state{state}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go to the cloud.
    Closed = 0,
    /// One probe is allowed through; the others fail at once.
    HalfOpen = 1,
    /// Requests fail at once until the cool-down ends.
    Open = 2,
}

/// Whether a request may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Send,
    /// Do not send it; the cloud is considered unreachable for this long still.
    Refuse {
        /// Time left before a probe is allowed.
        retry_in: Duration,
    },
}

/// A consecutive-timeout circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    cool_down: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl CircuitBreaker {
    /// Opens after `threshold` timeouts in a row, for `cool_down`.
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        CircuitBreaker {
            threshold: threshold.max(1),
            cool_down,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Asks to send a request at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state(now) {
            BreakerState::Closed => Admission::Send,
            BreakerState::Open => Admission::Refuse {
                retry_in: self.open_until.expect("open") - now,
            },
            BreakerState::HalfOpen if self.probing => Admission::Refuse {
                retry_in: Duration::ZERO,
            },
            BreakerState::HalfOpen => {
                self.probing = true;
                Admission::Send
            }
        }
    }

    /// The cloud answered: close. Returns true when this closed an open circuit.
    pub fn answered(&mut self) -> bool {
        let was_open = self.open_until.is_some();
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
        was_open
    }

    /// A request got no answer in time.
    pub fn timed_out(&mut self, now: Instant) {
        self.failures += 1;
        if self.probing || self.failures >= self.threshold {
            self.open_until = Some(now + self.cool_down);
            self.probing = false;
        }
    }

    /// The broker link dropped: whatever was in flight proves nothing about the cloud.
    pub fn link_lost(&mut self) {
        self.probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_timeouts_probes_then_closes() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut b = CircuitBreaker::new(3, 5 * s);
        assert_eq!(b.admit(t0), Admission::Send);
        b.timed_out(t0);
        b.timed_out(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        // An answer in between resets the count.
        assert!(!b.answered());
        b.timed_out(t0);
        b.timed_out(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        b.timed_out(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.admit(t0 + s), Admission::Refuse { retry_in: 4 * s });
        // After the cool-down one probe goes, the rest wait for it.
        let later = t0 + 6 * s;
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert_eq!(b.admit(later), Admission::Send);
        assert!(matches!(b.admit(later), Admission::Refuse { .. }));
        // A probe that times out opens again at once.
        b.timed_out(later);
        assert_eq!(b.state(later), BreakerState::Open);
        let again = later + 6 * s;
        assert_eq!(b.admit(again), Admission::Send);
        assert!(b.answered(), "an answer closes the circuit");
        assert_eq!(b.state(again), BreakerState::Closed);
        assert_eq!(b.admit(again), Admission::Send);
    }

    #[test]
    fn a_lost_link_frees_the_probe() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(1, Duration::from_millis(10));
        b.timed_out(t0);
        let later = t0 + Duration::from_millis(20);
        assert_eq!(b.admit(later), Admission::Send);
        b.link_lost();
        assert_eq!(b.admit(later), Admission::Send, "another probe may go");
    }
}
