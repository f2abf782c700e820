//! Which cloud instance serves each store, when several share one PostgreSQL database.
//!
//! Every instance hears every store's requests; only the holder of a store's lease serves them,
//! so one store's requests are applied in order by one instance (voids after their attempts,
//! posts after their authorizations). A lease is taken when nobody holds it or its holder let it
//! lapse (it is renewed well before it ends), and every take writes a new epoch: the store's
//! **holder** (`<instance>/<process>#<epoch>`, tree [`HOLDERS_TREE`]). Each of the holder's
//! ledger writes for the store is held to that value ([`storage::kv::Fence`]), read in the same
//! serializable transaction; so an instance that lost the lease while paused, cut off or slow
//! commits nothing more for the store, whatever its clock says: a transaction it began before
//! the takeover either serializes before it, as if it had finished first, or fails (as it does
//! once the new holder has read what it writes). Time only decides when a lapsed
//! lease may be taken (liveness), never whether a write lands (safety).
//!
//! A restarted instance (same instance id, new process) takes its own stores back at once.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use storage::kv::{ConflictableTransactionError, Fence, TransactionError, Transactional};

use crate::error::LedgerError;

/// The tree of lease records (store id -> [`LeaseRecord`], JSON).
pub const LEASES_TREE: &str = "store_leases";
/// The tree of lease holders (store id -> holder): what fenced writes read.
pub const HOLDERS_TREE: &str = "store_lease_holders";

/// A store's lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseRecord {
    /// The instance id holding it.
    instance: String,
    /// The holding process (a random id per start).
    process: String,
    /// Taken this many times, this take included.
    epoch: u64,
    /// When it lapses unless renewed (the holder's clock, ms since the epoch).
    expires_at_ms: u64,
    /// When the holding process started: of two processes of one instance id, the newer one
    /// takes the lease at once, never the older one.
    #[serde(default)]
    started_at_ms: u64,
}

/// A lease this process holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The store.
    pub store_id: String,
    /// The take it is.
    pub epoch: u64,
    /// When it lapses unless renewed (ms since the epoch).
    pub expires_at_ms: u64,
    /// What every ledger write for the store is held to.
    pub fence: Arc<Fence>,
}

/// The leases of one process, in the database it shares with the other instances.
#[derive(Clone)]
pub struct Leases {
    leases: storage::kv::Tree,
    holders: storage::kv::Tree,
    instance: String,
    process: String,
    started_at_ms: u64,
    ttl_ms: u64,
}

fn storage_error(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

impl Leases {
    /// The leases of `db` as instance `instance` (a process started at `started_at_ms`), each
    /// lasting `ttl_ms` from its last renewal.
    pub fn open(
        db: &storage::kv::Db,
        instance: &str,
        started_at_ms: u64,
        ttl_ms: u64,
    ) -> Result<Self, LedgerError> {
        let process = format!("{:016x}", rand::random::<u64>());
        Ok(Leases {
            leases: db.open_tree(LEASES_TREE).map_err(storage_error)?,
            holders: db.open_tree(HOLDERS_TREE).map_err(storage_error)?,
            instance: instance.to_owned(),
            process,
            started_at_ms,
            ttl_ms,
        })
    }

    /// Takes `store_id`'s lease, or renews it if this process holds it, at `now_ms`. `None`:
    /// another instance holds it and has not let it lapse.
    pub fn acquire(&self, store_id: &str, now_ms: u64) -> Result<Option<Held>, LedgerError> {
        Ok(self.acquire_or_wait(store_id, now_ms)?.ok())
    }

    /// [`Leases::acquire`], telling, when another instance holds the lease, until when it runs
    /// unless renewed: no need to ask again before then.
    pub fn acquire_or_wait(
        &self,
        store_id: &str,
        now_ms: u64,
    ) -> Result<Result<Held, u64>, LedgerError> {
        let taken = (&self.leases, &self.holders).transaction(|(leases, holders)| {
            let current: Option<LeaseRecord> = leases
                .get(store_id.as_bytes())?
                .and_then(|v| serde_json::from_slice(&v).ok());
            let epoch = match &current {
                Some(c) if c.instance == self.instance && c.process == self.process => c.epoch,
                // Another instance's, still running: not ours to take. A restart of this
                // instance (same id, a newer process) takes its own leases back at once; an
                // older process of it (still running beside its restart, or a duplicated id)
                // never takes them back from a newer one, so the two do not fight.
                Some(c)
                    if c.expires_at_ms > now_ms
                        && (c.instance != self.instance
                            || (c.started_at_ms, &c.process)
                                > (self.started_at_ms, &self.process)) =>
                {
                    return Ok(Err(c.expires_at_ms))
                }
                Some(c) => c.epoch + 1,
                None => 1,
            };
            let record = LeaseRecord {
                instance: self.instance.clone(),
                process: self.process.clone(),
                epoch,
                expires_at_ms: now_ms + self.ttl_ms,
                started_at_ms: self.started_at_ms,
            };
            leases.insert(
                store_id.as_bytes(),
                serde_json::to_vec(&record).expect("serialises"),
            )?;
            let holder = self.holder(epoch);
            if current.as_ref().map(|c| c.epoch) != Some(epoch) {
                holders.insert(store_id.as_bytes(), holder.as_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<LedgerError>>(Ok(Held {
                store_id: store_id.to_owned(),
                epoch,
                expires_at_ms: record.expires_at_ms,
                fence: Arc::new(Fence {
                    tree: HOLDERS_TREE.into(),
                    key: store_id.as_bytes().to_vec(),
                    holder: holder.into_bytes(),
                }),
            }))
        });
        taken.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => storage_error(e),
        })
    }

    /// Gives up a lease this process holds (a clean stop), so another instance takes the store
    /// at once rather than after the lease lapses.
    pub fn release(&self, held: &Held) -> Result<(), LedgerError> {
        let released = (&self.leases, &self.holders).transaction(|(leases, _)| {
            let current: Option<LeaseRecord> = leases
                .get(held.store_id.as_bytes())?
                .and_then(|v| serde_json::from_slice(&v).ok());
            if let Some(mut record) = current {
                if record.process == self.process && record.epoch == held.epoch {
                    record.expires_at_ms = 0;
                    leases.insert(
                        held.store_id.as_bytes(),
                        serde_json::to_vec(&record).expect("serialises"),
                    )?;
                }
            }
            Ok::<_, ConflictableTransactionError<LedgerError>>(())
        });
        released.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => storage_error(e),
        })
    }

    /// How long a lease lasts from its last renewal.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    fn holder(&self, epoch: u64) -> String {
        format!("{}/{}#{epoch}", self.instance, self.process)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dir: &std::path::Path) -> storage::kv::Db {
        storage::kv::Db::open_at(&crate::engines::location(dir)).unwrap()
    }

    /// Two instances and a restart: one holder at a time, each take a new epoch, the loser of a
    /// lease commits nothing under it.
    fn one_holder_at_a_time_and_a_lost_lease_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let shared = db(dir.path());
        let one = Leases::open(&shared, "1", 0, 10_000).unwrap();
        let two = Leases::open(&shared, "2", 0, 10_000).unwrap();
        let held = one.acquire("store-1", 1_000).unwrap().unwrap();
        assert_eq!(held.epoch, 1);
        // Held and running: not the other's; renewing keeps the epoch and moves the expiry.
        assert_eq!(two.acquire("store-1", 5_000).unwrap(), None);
        let renewed = one.acquire("store-1", 5_000).unwrap().unwrap();
        assert_eq!((renewed.epoch, renewed.expires_at_ms), (1, 15_000));
        assert_eq!(two.acquire("store-1", 14_999).unwrap(), None);
        // Lapsed: the other takes it, with a new epoch.
        let taken = two.acquire("store-1", 15_001).unwrap().unwrap();
        assert_eq!(taken.epoch, 2);
        assert_eq!(one.acquire("store-1", 15_002).unwrap(), None);
        // The holding instance restarted (a new process under the same id) takes its stores
        // back at once.
        let restarted = Leases::open(&shared, "2", 15_000, 10_000).unwrap();
        assert_eq!(
            restarted.acquire("store-1", 15_003).unwrap().unwrap().epoch,
            3
        );
        // The older process, still running beside it, does not take it back.
        assert_eq!(two.acquire("store-1", 15_003).unwrap(), None);
        // A clean stop hands the store over at once.
        let held = restarted.acquire("store-1", 15_004).unwrap().unwrap();
        restarted.release(&held).unwrap();
        assert_eq!(one.acquire("store-1", 15_005).unwrap().unwrap().epoch, 4);

        // Writes held to a lost lease are refused (PostgreSQL; sled has one writer).
        let tree = shared.open_tree("data").unwrap();
        let stale = tree.fenced(&taken.fence);
        let current = tree.fenced(&one.acquire("store-1", 15_006).unwrap().unwrap().fence);
        current.insert("a", "by the holder").unwrap();
        let refused = stale.insert("b", "by an instance that lost the lease");
        if matches!(
            crate::engines::location(dir.path()),
            storage::kv::Location::Postgres { .. }
        ) {
            let error = refused.unwrap_err();
            assert!(storage::kv::is_fenced(&error), "{error}");
            assert_eq!(tree.get("b").unwrap(), None);
        }
    }

    crate::engines::on_each_engine!(one_holder_at_a_time_and_a_lost_lease_writes_nothing);
}
