//! Opening the `sled` databases of the hub and the cloud, and sealing the personal data they
//! hold ([`seal`]).
//!
//! sled's background flusher keeps the directory's file lock for a moment after the last handle is
//! dropped, so a database closed and reopened in the same process (a tier restarted in place, a
//! test) can find it still locked. Opening retries that one error for a bounded time; any other
//! error, or a lock still held after [`LOCK_WAIT`] (another process owns the database), is returned.

pub mod seal;

use std::{path::Path, time::Duration};

pub use seal::{key_file, SealError, Sealer};

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
