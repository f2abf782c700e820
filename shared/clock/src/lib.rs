//! The one time source of facepay's logic.
//!
//! Payment logic never reads the system clock itself: it is handed a [`SharedClock`]. Production
//! passes [`system`]; tests and the deterministic simulation pass a [`ManualClock`] they move by
//! hand, and the chaos suite steps a process's clock with [`SystemClock::jump`] (through the
//! `FACEPAY_CLOCK_OFFSET_MS` environment variable at start).

use std::sync::{
    atomic::{AtomicI64, AtomicU64, Ordering},
    Arc,
};

/// Wall-clock time, in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch. May step backwards (an NTP correction, an
    /// operator): logic that must not go back keeps its own high-water mark.
    fn now_ms(&self) -> u64;
}

/// A clock shared by every part of one process.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock, moved by an offset (zero unless a test or the chaos suite steps it).
#[derive(Debug, Default)]
pub struct SystemClock {
    offset_ms: AtomicI64,
}

/// Environment variable that starts a process's clock this many milliseconds off (negative: in
/// the past). For the chaos suite's clock jumps; never set in production.
pub const OFFSET_ENV: &str = "FACEPAY_CLOCK_OFFSET_MS";

impl SystemClock {
    /// The system clock, offset by [`OFFSET_ENV`] when it is set to a number, in debug builds
    /// (the test builds) only: a release build ignores it, so no environment can step a deployed
    /// tier's clock.
    pub fn from_env() -> Self {
        let offset_ms = match std::env::var(OFFSET_ENV) {
            Ok(v) if cfg!(debug_assertions) => v.trim().parse::<i64>().unwrap_or(0),
            Ok(_) => {
                eprintln!("{OFFSET_ENV} is ignored: release builds keep the system clock");
                0
            }
            Err(_) => 0,
        };
        SystemClock {
            offset_ms: AtomicI64::new(offset_ms),
        }
    }

    /// Steps the clock by `delta_ms` (negative: backwards).
    pub fn jump(&self, delta_ms: i64) {
        self.offset_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        wall.saturating_add(self.offset_ms.load(Ordering::SeqCst))
            .max(0) as u64
    }
}

/// The process's system clock ([`SystemClock::from_env`]).
pub fn system() -> SharedClock {
    Arc::new(SystemClock::from_env())
}

/// A clock that moves only when told to: for tests and the deterministic simulation.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: u64) -> Arc<Self> {
        Arc::new(ManualClock {
            now_ms: AtomicU64::new(now_ms),
        })
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock, backwards too.
    pub fn set(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(500);
        assert_eq!(clock.now_ms(), 1_500);
        clock.set(10);
        assert_eq!(clock.now_ms(), 10);
    }

    #[test]
    fn a_system_clock_jumps_by_its_offset() {
        let clock = SystemClock::default();
        let before = clock.now_ms();
        clock.jump(-3_600_000);
        let after = clock.now_ms();
        assert!(after + 3_500_000 < before, "{before} {after}");
        clock.jump(7_200_000);
        assert!(clock.now_ms() > before + 3_500_000);
    }
}
