//! The one time source of facepay's logic.
//!
//! Payment logic never reads the system clock itself: it is handed a [`SharedClock`]. Production
//! passes [`system`]; tests and the deterministic simulation pass a [`ManualClock`] they move by
//! hand, and the chaos suite steps a process's clock: from its start with the
//! `FACEPAY_CLOCK_OFFSET_MS` environment variable, and while it runs through the file named by
//! `FACEPAY_CLOCK_OFFSET_FILE` (debug builds only, both).

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

    /// Steps the clock by `delta_ms` (negative: backwards). Debug builds only: a release build
    /// has no way to step its clock.
    #[cfg(debug_assertions)]
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

/// Environment variable naming a file whose number (milliseconds, negative: in the past) is the
/// clock's offset while the process runs: the chaos suite steps a live process's clock by
/// writing it. Read every [`OFFSET_FILE_POLL`]; debug builds only, never set in production.
pub const OFFSET_FILE_ENV: &str = "FACEPAY_CLOCK_OFFSET_FILE";

/// How often the offset file is read.
pub const OFFSET_FILE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

// Debug builds only: a release build has no code that steps its clock.
#[cfg(debug_assertions)]
impl SystemClock {
    /// Sets the offset to `offset_ms` (a step from wherever the clock is now).
    pub fn set_offset(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
    }

    /// Follows the offset written in `path` from now on, on a thread of its own: a missing or
    /// unreadable file leaves the offset as it is. The thread ends with the last other holder
    /// of the clock.
    pub fn follow_offset_file(self: &Arc<Self>, path: std::path::PathBuf) {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
        };
        // Read once before returning: a process started during a jump starts jumped.
        if let Some(offset) = read(&path) {
            self.set_offset(offset);
        }
        let clock = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("clock-offset".into())
            .spawn(move || {
                while let Some(clock) = clock.upgrade() {
                    if let Some(offset) = read(&path) {
                        clock.set_offset(offset);
                    }
                    drop(clock);
                    std::thread::sleep(OFFSET_FILE_POLL);
                }
            })
            .expect("spawning the clock offset thread");
    }
}

/// The process's system clock ([`SystemClock::from_env`]); in debug builds it follows the
/// offset file named by [`OFFSET_FILE_ENV`], when set.
pub fn system() -> SharedClock {
    let clock = Arc::new(SystemClock::from_env());
    if let Some(path) = std::env::var_os(OFFSET_FILE_ENV) {
        #[cfg(debug_assertions)]
        clock.follow_offset_file(path.into());
        #[cfg(not(debug_assertions))]
        {
            let _ = path;
            eprintln!("{OFFSET_FILE_ENV} is ignored: release builds keep the system clock");
        }
    }
    clock
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

/// A token bucket: `burst` requests at once, then `per_second`. Measured on the monotonic clock
/// (a rate is about how often, not what time it is), with the instant passed in by the caller.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(burst: f64, per_second: f64, now: std::time::Instant) -> Self {
        TokenBucket {
            burst,
            per_second,
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token at `now` if there is one.
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now.max(self.at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
    fn a_system_clock_follows_its_offset_file_while_it_runs() {
        let dir = std::env::temp_dir().join(format!("facepay-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("offset");
        let clock = Arc::new(SystemClock::default());
        clock.follow_offset_file(file.clone());
        let wait_for = |wanted: &dyn Fn(u64, u64) -> bool| {
            for _ in 0..200 {
                let (wall, now) = (SystemClock::default().now_ms(), clock.now_ms());
                if wanted(wall, now) {
                    return;
                }
                std::thread::sleep(OFFSET_FILE_POLL);
            }
            panic!("the clock did not follow its offset file");
        };
        std::fs::write(&file, "-3600000\n").unwrap();
        wait_for(&|wall, now| now + 3_500_000 < wall);
        // Unreadable: the offset stays.
        std::fs::write(&file, "soon").unwrap();
        std::thread::sleep(OFFSET_FILE_POLL * 3);
        assert!(clock.now_ms() + 3_500_000 < SystemClock::default().now_ms());
        std::fs::write(&file, "0").unwrap();
        wait_for(&|wall, now| now.abs_diff(wall) < 1_000);
        std::fs::remove_dir_all(&dir).unwrap();
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

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let start = std::time::Instant::now();
        let mut bucket = TokenBucket::full(3.0, 2.0, start);
        assert_eq!((0..5).filter(|_| bucket.take(start)).count(), 3);
        let later = start + std::time::Duration::from_millis(500);
        assert!(bucket.take(later), "one token back after half a second");
        assert!(!bucket.take(later));
        let much_later = later + std::time::Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(much_later)).count(), 3);
    }
}
