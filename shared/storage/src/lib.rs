//! Opening the `sled` databases of the hub and the cloud, the key-value API the journal and the
//! ledger are written against ([`kv`]: sled, or in memory for the simulation), and sealing the
//! personal data they hold ([`seal`]).
//!
//! sled's background flusher keeps the directory's file lock for a moment after the last handle is
//! dropped, so a database closed and reopened in the same process (a tier restarted in place, a
//! test) can find it still locked. Opening retries that one error for a bounded time; any other
//! error, or a lock still held after [`LOCK_WAIT`] (another process owns the database), is returned.

pub mod kv;
mod pg;

pub use pg::valid_schema;
pub mod seal;
pub mod worker;

pub use fail;

use std::{path::Path, time::Duration};

pub use seal::{adopt_legacy_key, default_keys_dir, key_file, place_keys, SealError, Sealer};
pub use worker::Worker;

/// How long to wait for a lock left by handles of this process that are closing.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Opens (or creates) a sled database, waiting up to [`LOCK_WAIT`] for its lock.
pub fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::open(path) {
            // sled wraps the flock failure in an `Other` error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(RETRY_INTERVAL);
            }
            other => return other,
        }
    }
}

/// Stops the process after a storage error. After a failed write or flush nobody knows what is on
/// disk, so answering "nothing was written" (or carrying on) is how money moves after "declined"
/// (PostgreSQL's fsync lesson): the process stops, and its restart recovers from what the disk
/// holds. `abort` rather than `exit`: nothing may be flushed on the way out.
pub fn fail_stop(what: &str, error: &dyn std::fmt::Display) -> ! {
    eprintln!("fatal: {what} failed: {error}; stopping (the restart recovers from the disk)");
    std::process::abort()
}

/// Flushes a database to disk; on failure the process stops ([`fail_stop`]). `failpoint` names
/// the failpoint that can inject the failure (the chaos suite's disk faults).
pub fn flush_or_stop(db: &kv::Db, failpoint: &str) {
    let injected = || -> sled::Result<usize> {
        fail::fail_point!(failpoint, |_| Err(sled::Error::Io(std::io::Error::other(
            format!("injected by the failpoint {failpoint}")
        ))));
        Ok(0)
    };
    if let Err(error) = injected().and_then(|_| db.flush()) {
        fail_stop(&format!("flushing the database ({failpoint})"), &error);
    }
}

/// Reads the failpoints set in the `FAILPOINTS` environment variable (`name=action;...`, the
/// `fail` crate's syntax); call once at the start of a binary. Only debug builds with the
/// `failpoints` feature (the test builds) honour it: a release build ignores the variable, so no
/// environment can make a deployed tier fail on purpose.
pub fn failpoints_from_env() {
    if fail::has_failpoints() && cfg!(debug_assertions) {
        std::mem::forget(fail::FailScenario::setup());
    } else if std::env::var_os("FAILPOINTS").is_some() {
        eprintln!("FAILPOINTS is ignored: this build honours no failpoints");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_right_after_close_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        for round in 0u8..20 {
            let db = open_sled(&path).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            db.insert([round], &[round]).unwrap();
            db.flush().unwrap();
        }
        let db = open_sled(&path).unwrap();
        assert_eq!(db.len(), 20);
    }

    #[test]
    fn a_database_held_open_is_reported_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _held = open_sled(&path).unwrap();
        // Same process, still open: sled refuses a second open of the same directory.
        let started = std::time::Instant::now();
        let err = open_sled(&path).unwrap_err();
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
        assert!(started.elapsed() >= LOCK_WAIT);
    }
}
