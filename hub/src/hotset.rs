//! The store's hot set: the face templates of customers enrolled here and of those recently seen
//! here, capped, persisted sealed in `sled`, and searched exactly in memory.
//!
//! At 50,000 templates the in-memory matrix is 25 MB and an exact top-2 scan takes a few
//! milliseconds on one core (see `facepay-hub-bench`), so the hub needs no approximate index.

use std::{collections::HashMap, path::Path};

use protocol::{AccountId, HotEntry, StoreId, EMBEDDING_LEN};
use serde::{Deserialize, Serialize};
use storage::Sealer;

/// What went wrong in the hot set store.
#[derive(Debug, thiserror::Error)]
#[error("hot set store: {0}")]
pub struct HotSetError(pub String);

fn err<E: std::fmt::Display>(e: E) -> HotSetError {
    HotSetError(e.to_string())
}

/// One account's best score.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The account.
    pub account_id: AccountId,
    /// Its best template's cosine with the probe.
    pub score: f32,
}

/// The in-memory exact index: one row per template.
#[derive(Default)]
pub struct HotIndex {
    matrix: Vec<f32>,
    owners: Vec<u32>,
    accounts: Vec<AccountId>,
    slot_of: HashMap<AccountId, u32>,
}

impl HotIndex {
    /// Builds from entries.
    pub fn build<'a>(entries: impl IntoIterator<Item = &'a HotEntry>) -> Self {
        let mut index = HotIndex::default();
        for entry in entries {
            index.push(entry);
        }
        index
    }

    /// Appends an account that is not in the index yet.
    fn push(&mut self, entry: &HotEntry) {
        debug_assert!(!self.slot_of.contains_key(&entry.account_id));
        let slot = self.accounts.len() as u32;
        self.accounts.push(entry.account_id.clone());
        self.slot_of.insert(entry.account_id.clone(), slot);
        for (_, embedding) in &entry.templates {
            if embedding.len() == EMBEDDING_LEN {
                self.matrix.extend_from_slice(embedding);
                self.owners.push(slot);
            }
        }
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// The best two distinct accounts for `probe`, best first.
    pub fn top2(&self, probe: &[f32]) -> Vec<Scored> {
        let mut best: [(f32, u32); 2] = [(f32::NEG_INFINITY, u32::MAX); 2];
        for (row, owner) in self.matrix.chunks_exact(EMBEDDING_LEN).zip(&self.owners) {
            let score = dot(row, probe);
            if *owner == best[0].1 {
                best[0].0 = best[0].0.max(score);
            } else if *owner == best[1].1 {
                if score > best[1].0 {
                    best[1].0 = score;
                    if best[1].0 > best[0].0 {
                        best.swap(0, 1);
                    }
                }
            } else if score > best[0].0 {
                best[1] = best[0];
                best[0] = (score, *owner);
            } else if score > best[1].0 {
                best[1] = (score, *owner);
            }
        }
        best.iter()
            .filter(|(_, owner)| *owner != u32::MAX)
            .map(|(score, owner)| Scored {
                account_id: self.accounts[*owner as usize].clone(),
                score: *score,
            })
            .collect()
    }

    /// The best score of one account's templates, if it is held.
    pub fn score_account(&self, account_id: &str, probe: &[f32]) -> Option<f32> {
        let slot = *self.slot_of.get(account_id)?;
        self.matrix
            .chunks_exact(EMBEDDING_LEN)
            .zip(&self.owners)
            .filter(|(_, owner)| **owner == slot)
            .map(|(row, _)| dot(row, probe))
            .reduce(f32::max)
    }
}

/// Inner product; with L2-normalised vectors, the cosine. Written so the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum()
}

/// An entry with its bookkeeping, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldEntry {
    /// The entry.
    pub entry: HotEntry,
    /// Last time the customer was identified here (or enrolled), ms since the epoch.
    pub last_seen_ms: u64,
}

pub use protocol::{Lockout, LockoutPolicy};

/// Most hot-set operations waiting for its thread.
pub const HOT_SET_QUEUE: usize = 256;

/// The hot set on its own thread ([`storage::Worker`]): the top-2 scan and sled writes never run
/// on an async thread.
pub type HotSetWorker = storage::Worker<HotSet>;

/// Starts the hot set's thread.
pub fn start_worker(hot: HotSet) -> HotSetWorker {
    storage::Worker::start("hub-hot-set", HOT_SET_QUEUE, hot)
}

/// The hot set: entries in memory, sealed in sled, and the exact index over them.
pub struct HotSet {
    entries: HashMap<AccountId, HeldEntry>,
    index: HotIndex,
    cap: usize,
    db: sled::Db,
    tree: sled::Tree,
    meta: sled::Tree,
    lockouts: sled::Tree,
    /// The version of the last template change applied per account (an erasure's too): a
    /// replayed older change is ignored, so an erased customer's templates never come back.
    versions: sled::Tree,
    sealer: Sealer,
    home_store_id: StoreId,
}

const SYNC_CURSOR: &[u8] = b"template_version";

impl HotSet {
    /// Opens the store at `path` (sealed with `key_file`, created while the store is empty) and
    /// rebuilds the in-memory index from it.
    pub fn open(
        path: &Path,
        key_file: &Path,
        cap: usize,
        home_store_id: &str,
    ) -> Result<Self, HotSetError> {
        let db = storage::open_sled(path).map_err(err)?;
        let tree = db.open_tree("entries").map_err(err)?;
        let meta = db.open_tree("meta").map_err(err)?;
        let lockouts = db.open_tree("lockouts").map_err(err)?;
        let versions = db.open_tree("versions").map_err(err)?;
        let sealer = Sealer::from_key_file(key_file, tree.is_empty()).map_err(err)?;
        let mut entries = HashMap::new();
        for item in tree.iter() {
            let (key, sealed) = item.map_err(err)?;
            let plain = sealer.open(&key, &sealed).map_err(|_| {
                HotSetError(format!(
                    "the key in {} does not open the stored templates",
                    key_file.display()
                ))
            })?;
            let held: HeldEntry = serde_json::from_slice(&plain).map_err(err)?;
            entries.insert(held.entry.account_id.clone(), held);
        }
        let index = HotIndex::build(entries.values().map(|h| &h.entry));
        Ok(HotSet {
            entries,
            index,
            cap,
            db,
            tree,
            meta,
            lockouts,
            versions,
            sealer,
            home_store_id: home_store_id.into(),
        })
    }

    /// Templates held.
    pub fn template_count(&self) -> usize {
        self.index.len()
    }

    /// The index.
    pub fn index(&self) -> &HotIndex {
        &self.index
    }

    /// An account's entry.
    pub fn get(&self, account_id: &str) -> Option<&HotEntry> {
        self.entries.get(account_id).map(|h| &h.entry)
    }

    fn persist(&self, held: &HeldEntry) -> Result<(), HotSetError> {
        let key = held.entry.account_id.as_bytes();
        let plain = serde_json::to_vec(held).expect("entries serialise");
        self.tree
            .insert(key, self.sealer.seal(key, &plain))
            .map_err(err)?;
        Ok(())
    }

    /// Adds or replaces entries (pushed by the cloud, or fetched on a miss), evicts the least
    /// recently seen beyond the cap, rebuilds the index and flushes.
    pub fn upsert(&mut self, entries: Vec<HotEntry>, now_ms: u64) -> Result<(), HotSetError> {
        // New accounts are appended to the index; a replaced or evicted one needs a rebuild. (A
        // first sync of 50,000 customers thus costs one pass, not one rebuild per batch.)
        let mut appended = Vec::new();
        let mut rebuild = false;
        for entry in entries {
            if entry
                .templates
                .iter()
                .any(|(_, e)| protocol::validate_embedding(e).is_err())
            {
                tracing::warn!(
                    account_id = %entry.account_id,
                    "entry with a bad template ignored"
                );
                continue;
            }
            let last_seen_ms = self
                .entries
                .get(&entry.account_id)
                .map(|h| h.last_seen_ms)
                .unwrap_or(now_ms);
            let held = HeldEntry {
                entry,
                last_seen_ms,
            };
            self.persist(&held)?;
            let account_id = held.entry.account_id.clone();
            if self.entries.insert(account_id.clone(), held).is_some() {
                rebuild = true;
            } else {
                appended.push(account_id);
            }
        }
        rebuild |= self.evict_over_cap()?;
        if rebuild {
            self.index = HotIndex::build(self.entries.values().map(|h| &h.entry));
        } else {
            for account_id in appended {
                self.index.push(&self.entries[&account_id].entry);
            }
        }
        self.db.flush().map_err(err)?;
        Ok(())
    }

    /// Evicts beyond the cap; returns whether any entry left.
    fn evict_over_cap(&mut self) -> Result<bool, HotSetError> {
        let mut total: usize = self.entries.values().map(|h| h.entry.templates.len()).sum();
        if total <= self.cap {
            return Ok(false);
        }
        // Visitors from other stores go first, then the least recently seen.
        let mut order: Vec<(bool, u64, AccountId)> = self
            .entries
            .values()
            .map(|h| {
                (
                    h.entry.home_store_id == self.home_store_id,
                    h.last_seen_ms,
                    h.entry.account_id.clone(),
                )
            })
            .collect();
        order.sort();
        for (_, _, account_id) in order {
            if total <= self.cap {
                break;
            }
            if let Some(held) = self.entries.remove(&account_id) {
                total -= held.entry.templates.len();
                self.tree.remove(account_id.as_bytes()).map_err(err)?;
            }
        }
        Ok(true)
    }

    /// Drops an account's templates (erasure). Returns whether it was held.
    pub fn revoke(&mut self, account_id: &str) -> Result<bool, HotSetError> {
        let held = self.entries.remove(account_id).is_some();
        self.tree.remove(account_id.as_bytes()).map_err(err)?;
        self.lockouts.remove(account_id.as_bytes()).map_err(err)?;
        if held {
            self.index = HotIndex::build(self.entries.values().map(|h| &h.entry));
        }
        self.db.flush().map_err(err)?;
        Ok(held)
    }

    /// Records that an account was just identified here.
    pub fn seen(&mut self, account_id: &str, now_ms: u64) {
        if let Some(held) = self.entries.get_mut(account_id) {
            held.last_seen_ms = now_ms;
            let held = held.clone();
            if let Err(error) = self.persist(&held) {
                tracing::warn!(%error, "recording last seen failed");
            }
        }
    }

    /// The version of the last template change applied (or search answer admitted) for an
    /// account.
    fn applied_version(&self, account_id: &str) -> Result<Option<u64>, HotSetError> {
        Ok(self
            .versions
            .get(account_id.as_bytes())
            .map_err(err)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    fn record_version(&self, account_id: &str, version: u64) -> Result<(), HotSetError> {
        self.versions
            .insert(account_id.as_bytes(), &version.to_be_bytes())
            .map_err(err)?;
        Ok(())
    }

    /// Takes the template change `version` for an account when it is newer than the last one
    /// applied (and records it); false for a change no newer, which is to be ignored.
    pub fn take_change(&self, account_id: &str, version: u64) -> Result<bool, HotSetError> {
        if self
            .applied_version(account_id)?
            .is_some_and(|held| held >= version)
        {
            return Ok(false);
        }
        self.record_version(account_id, version)?;
        Ok(true)
    }

    /// Whether an entry from a search answer, of the account's change `version`, may be cached:
    /// no newer change of the account (an erasure, a replaced template) was applied here. An
    /// admitted version is recorded, so that an older change arriving later is ignored.
    pub fn admit_answer(&self, account_id: &str, version: u64) -> Result<bool, HotSetError> {
        match self.applied_version(account_id)? {
            Some(held) if held > version => Ok(false),
            Some(held) if held == version => Ok(true),
            _ => self.record_version(account_id, version).map(|()| true),
        }
    }

    /// The template sync cursor.
    pub fn sync_cursor(&self) -> u64 {
        self.meta
            .get(SYNC_CURSOR)
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0)
    }

    /// Moves the template sync cursor.
    pub fn set_sync_cursor(&self, version: u64) -> Result<(), HotSetError> {
        self.meta
            .insert(SYNC_CURSOR, &version.to_be_bytes())
            .map_err(err)?;
        self.db.flush().map_err(err)?;
        Ok(())
    }

    /// An account's lockout state.
    pub fn lockout(&self, account_id: &str) -> Lockout {
        self.lockouts
            .get(account_id.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    }

    /// Takes the cloud's lockout state of an account when newer than the one held. A count the
    /// cloud started again since (a right answer somewhere: `resets` grew) replaces what is held;
    /// any other keeps the larger count and the later lock, so failures this hub counted while
    /// the cloud could not hear of them are not undone by a smaller count from elsewhere.
    pub fn take_cloud_lockout(
        &self,
        account_id: &str,
        state: Lockout,
    ) -> Result<bool, HotSetError> {
        let held = self.lockout(account_id);
        if state.version <= held.version {
            return Ok(false);
        }
        let state = if state.resets > held.resets {
            state
        } else {
            Lockout {
                failures: state.failures.max(held.failures),
                locked_until_ms: state.locked_until_ms.max(held.locked_until_ms),
                ..state
            }
        };
        // Kept even when it clears the count (its version is not 0): it orders later changes.
        self.set_lockout(account_id, state)?;
        Ok(true)
    }

    /// Stores an account's lockout state (durably: a restart must not reset it).
    pub fn set_lockout(&self, account_id: &str, state: Lockout) -> Result<(), HotSetError> {
        if state == Lockout::default() {
            self.lockouts.remove(account_id.as_bytes()).map_err(err)?;
        } else {
            self.lockouts
                .insert(
                    account_id.as_bytes(),
                    serde_json::to_vec(&state).expect("serialises"),
                )
                .map_err(err)?;
        }
        self.db.flush().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::SecondFactorKind;

    pub(crate) fn unit(seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1);
        let v: Vec<f32> = (0..EMBEDDING_LEN)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 20_000) as f32 / 10_000.0 - 1.0
            })
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn entry(account: &str, store: &str, seeds: &[u64]) -> HotEntry {
        HotEntry {
            account_id: account.into(),
            home_store_id: store.into(),
            templates: seeds.iter().map(|s| (*s, unit(*s))).collect(),
            second_factor: SecondFactorKind::Pin,
            second_factor_hash: "$argon2id$x".into(),
            version: 0,
        }
    }

    #[test]
    fn top2_returns_best_two_distinct_accounts() {
        let entries = [
            entry("a", "s1", &[1, 2]),
            entry("b", "s1", &[3]),
            entry("c", "s1", &[4]),
        ];
        let index = HotIndex::build(&entries);
        assert_eq!(index.len(), 4);
        let top = index.top2(&unit(2));
        assert_eq!(top[0].account_id, "a");
        assert!((top[0].score - 1.0).abs() < 1e-5);
        assert_ne!(top[1].account_id, "a", "runner-up is another account");
        // Against a brute-force reference.
        for probe in 10..40 {
            let p = unit(probe);
            let mut per_account: Vec<(f32, &str)> = entries
                .iter()
                .map(|e| {
                    let best = e
                        .templates
                        .iter()
                        .map(|(_, t)| dot(t, &p))
                        .fold(f32::MIN, f32::max);
                    (best, e.account_id.as_str())
                })
                .collect();
            per_account.sort_by(|x, y| y.0.total_cmp(&x.0));
            let got = index.top2(&p);
            assert_eq!(got[0].account_id, per_account[0].1);
            assert_eq!(got[1].account_id, per_account[1].1);
            assert!((got[1].score - per_account[1].0).abs() < 1e-5);
        }
        assert!(index.score_account("b", &unit(3)).unwrap() > 0.999);
        assert!(index.score_account("zz", &unit(3)).is_none());
        assert!(HotIndex::default().top2(&unit(1)).is_empty());
    }

    #[test]
    fn lockout_backs_off_exponentially_after_free_failures() {
        let policy = LockoutPolicy {
            free: 3,
            base_ms: 30_000,
            max_ms: 100_000,
        };
        let mut state = Lockout::default();
        for _ in 0..3 {
            state = policy.fail(state, 1_000);
            assert_eq!(state.locked_until_ms, 0);
        }
        state = policy.fail(state, 1_000);
        assert_eq!(state.locked_until_ms, 31_000);
        state = policy.fail(state, 1_000);
        assert_eq!(state.locked_until_ms, 61_000);
        state = policy.fail(state, 1_000);
        assert_eq!(state.locked_until_ms, 101_000, "capped");
    }

    #[test]
    fn a_template_change_no_newer_than_the_last_applied_is_refused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (key, path) = (dir.path().join("hub.key"), dir.path().join("hot"));
        {
            let set = HotSet::open(&path, &key, 4, "s1").unwrap();
            assert!(set.take_change("alice", 3).unwrap(), "first change");
            assert!(set.take_change("alice", 7).unwrap(), "newer (the erasure)");
            assert!(
                !set.take_change("alice", 3).unwrap(),
                "the old upsert replayed"
            );
            assert!(
                !set.take_change("alice", 7).unwrap(),
                "the same change again"
            );
            assert!(set.take_change("bob", 1).unwrap(), "per account");
        }
        let set = HotSet::open(&path, &key, 4, "s1").unwrap();
        assert!(
            !set.take_change("alice", 5).unwrap(),
            "remembered across a restart"
        );
        assert!(set.take_change("alice", 8).unwrap());
        // A search answer computed before the account's latest change here is not cached; one
        // of that change or newer is, and an older change arriving after it is ignored.
        assert!(
            !set.admit_answer("alice", 5).unwrap(),
            "answered before the erasure"
        );
        assert!(set.admit_answer("alice", 8).unwrap());
        assert!(
            set.admit_answer("carol", 2).unwrap(),
            "not seen here before"
        );
        assert!(!set.take_change("carol", 2).unwrap());
        assert!(!set.admit_answer("carol", 1).unwrap());
    }

    #[test]
    fn the_clouds_lockout_replaces_an_older_one_and_local_counts_build_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let set =
            HotSet::open(&dir.path().join("hot"), &dir.path().join("k.key"), 4, "s1").unwrap();
        let policy = LockoutPolicy {
            free: 1,
            base_ms: 10_000,
            max_ms: 60_000,
        };
        let cloud = |failures, locked_until_ms, version, resets| Lockout {
            failures,
            locked_until_ms,
            version,
            resets,
        };
        assert!(set
            .take_cloud_lockout("ada", cloud(2, 50_000, 7, 0))
            .unwrap());
        assert_eq!(set.lockout("ada"), cloud(2, 50_000, 7, 0));
        // An older (or replayed) state is ignored.
        assert!(!set.take_cloud_lockout("ada", cloud(0, 0, 6, 1)).unwrap());
        assert!(!set.take_cloud_lockout("ada", cloud(0, 0, 7, 1)).unwrap());
        // A failure here counts on top of it and keeps its version; the cloud's next count
        // keeps the larger of the two.
        let local = policy.fail(set.lockout("ada"), 60_000);
        set.set_lockout("ada", local).unwrap();
        assert_eq!(set.lockout("ada").failures, 3);
        assert!(set
            .take_cloud_lockout("ada", cloud(3, 70_000, 8, 0))
            .unwrap());
        assert_eq!(set.lockout("ada"), cloud(3, local.locked_until_ms, 8, 0));
        assert!(local.locked_until_ms > 70_000, "the later lock");
        // Counted here while the cloud could not hear (locked), then a smaller count from
        // elsewhere: the larger count and the later lock stand.
        let mut state = set.lockout("ada");
        for _ in 0..3 {
            state = policy.fail(state, 100_000);
        }
        set.set_lockout("ada", state).unwrap();
        assert!(set.take_cloud_lockout("ada", cloud(1, 0, 9, 0)).unwrap());
        assert_eq!(
            set.lockout("ada"),
            cloud(6, state.locked_until_ms, 9, 0),
            "not unlocked by a smaller count"
        );
        // A right answer anywhere started the count again (even if a wrong one came after it,
        // and this hub hears only the later state): it replaces what is held.
        assert!(set.take_cloud_lockout("ada", cloud(1, 0, 11, 1)).unwrap());
        assert_eq!(set.lockout("ada"), cloud(1, 0, 11, 1));
    }

    #[test]
    fn persisted_sealed_capped_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("hub.key");
        let path = dir.path().join("hot");
        {
            let mut set = HotSet::open(&path, &key, 4, "s1").unwrap();
            set.upsert(vec![entry("home-old", "s1", &[1, 2])], 10)
                .unwrap();
            set.upsert(vec![entry("visitor", "s2", &[3])], 20).unwrap();
            set.upsert(vec![entry("home-new", "s1", &[4])], 30).unwrap();
            assert_eq!(set.template_count(), 4);
            // Over the cap: the visitor goes first, although seen later than home-old.
            set.upsert(vec![entry("home-3", "s1", &[5])], 40).unwrap();
            assert!(set.get("visitor").is_none());
            assert_eq!(set.template_count(), 4);
            set.set_sync_cursor(17).unwrap();
            set.set_lockout(
                "home-new",
                Lockout {
                    failures: 2,
                    locked_until_ms: 0,
                    version: 0,
                    resets: 0,
                },
            )
            .unwrap();
        }
        let raw: Vec<u8> = std::fs::read_dir(&path)
            .unwrap()
            .flat_map(|e| std::fs::read(e.unwrap().path()).unwrap_or_default())
            .collect();
        let needle: Vec<u8> = unit(1)[0].to_string().into_bytes();
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_slice()),
            "templates sealed"
        );

        let mut set = HotSet::open(&path, &key, 4, "s1").unwrap();
        assert_eq!(set.template_count(), 4, "rebuilt on restart");
        assert_eq!(set.index().top2(&unit(4))[0].account_id, "home-new");
        assert_eq!(set.sync_cursor(), 17);
        assert_eq!(set.lockout("home-new").failures, 2);
        // Replacing an account's templates replaces them in the index, too.
        set.upsert(vec![entry("home-new", "s1", &[6])], 50).unwrap();
        assert!(set.index().score_account("home-new", &unit(6)).unwrap() > 0.999);
        assert!(set.index().score_account("home-new", &unit(4)).unwrap() < 0.9);
        assert_eq!(set.template_count(), 4);
        assert!(set.revoke("home-new").unwrap());
        assert!(set.index().score_account("home-new", &unit(4)).is_none());
        assert_eq!(set.lockout("home-new"), Lockout::default());
        drop(set);
        assert!(HotSet::open(&path, &dir.path().join("other.key"), 4, "s1").is_err());
    }
}
