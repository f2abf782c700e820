//! The hub's durable journal in `sled`: every decision, the nonces of the codes it has seen, the
//! account keys the cloud distributed, and the voids still to deliver. Every write is flushed
//! before the caller goes on, so that what the hub answered survives a crash.

use std::path::Path;

use actix::prelude::*;
use protocol::{Allowance, AuthorizeRequest, Decision, KeyEntry, OfflinePayment, VoidPayment};
use serde::{Deserialize, Serialize};
use sled::transaction::Transactional;

use crate::error::HubError;

/// One decision the hub answered an edge with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// When it was decided, ms since the Unix epoch.
    pub decided_at_ms: u64,
    /// The payment.
    pub payment_id: String,
    /// The terminal that asked.
    pub terminal_id: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency code.
    pub currency: String,
    /// The account the code named, once known.
    pub account_id: Option<String>,
    /// The code's nonce, once known. The code text itself is a bearer token and is not kept.
    pub code_nonce: Option<String>,
    /// What the edge was told.
    pub decision: Decision,
}

impl JournalEntry {
    /// An entry for a request, before its code was read.
    pub fn for_request(request: &AuthorizeRequest, decision: Decision) -> Self {
        JournalEntry {
            decided_at_ms: paycode::now_ms(),
            payment_id: request.payment_id.clone(),
            terminal_id: request.terminal_id.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency.to_string(),
            account_id: None,
            code_nonce: None,
            decision,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NonceUse {
    payment_id: String,
    issued_at_ms: u64,
}

/// The outcome of reserving a code's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// First time this code is seen.
    Fresh,
    /// The code was seen before for this same payment: a retry.
    SamePayment,
    /// The code was already used for another payment.
    Replayed {
        /// The payment it was used for.
        first_payment_id: String,
    },
}

/// The journal database. Clones share it.
#[derive(Clone)]
pub struct Journal {
    db: sled::Db,
    decisions: sled::Tree,
    nonces: sled::Tree,
    keys: sled::Tree,
    voids: sled::Tree,
    /// Offline approvals not yet acknowledged by the cloud, by sequence number.
    offline: sled::Tree,
    /// The offline allowances the cloud granted this store, by account.
    allowances: sled::Tree,
    /// Payment ids this hub answered "approved", with what was approved.
    paid: sled::Tree,
}

/// What the hub approved under a payment id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paid {
    /// The paying account.
    pub account_id: String,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency code.
    pub currency: String,
}

fn storage_error(e: impl std::fmt::Display) -> HubError {
    HubError::Storage(e.to_string())
}

const KEY_VERSION: &[u8] = b"key_version";

impl Journal {
    /// Opens (or creates) the journal in a directory.
    pub fn open(path: &Path) -> Result<Self, HubError> {
        let db = storage::open_sled(path).map_err(storage_error)?;
        Ok(Journal {
            decisions: db.open_tree("decisions").map_err(storage_error)?,
            nonces: db.open_tree("nonces").map_err(storage_error)?,
            keys: db.open_tree("keys").map_err(storage_error)?,
            voids: db.open_tree("voids").map_err(storage_error)?,
            offline: db.open_tree("offline").map_err(storage_error)?,
            allowances: db.open_tree("allowances").map_err(storage_error)?,
            paid: db.open_tree("paid").map_err(storage_error)?,
            db,
        })
    }

    fn flush(&self) -> Result<(), HubError> {
        self.db.flush().map(|_| ()).map_err(storage_error)
    }

    /// Records that a code's nonce is being used for a payment, unless it was used before.
    pub fn reserve_nonce(
        &self,
        account_id: &str,
        nonce: &str,
        payment_id: &str,
        issued_at_ms: u64,
    ) -> Result<Reservation, HubError> {
        let key = format!("{account_id}/{nonce}");
        let value = serde_json::to_vec(&NonceUse {
            payment_id: payment_id.to_owned(),
            issued_at_ms,
        })
        .expect("serialises");
        let previous = self
            .nonces
            .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(value))
            .map_err(storage_error)?;
        let reservation = match previous {
            Ok(()) => Reservation::Fresh,
            Err(cas) => {
                let used: NonceUse =
                    serde_json::from_slice(&cas.current.expect("present on conflict"))
                        .expect("journal nonce records are readable");
                if used.payment_id == payment_id {
                    Reservation::SamePayment
                } else {
                    Reservation::Replayed {
                        first_payment_id: used.payment_id,
                    }
                }
            }
        };
        self.flush()?;
        Ok(reservation)
    }

    /// Forgets nonces of codes issued before `cutoff_ms`: such codes are refused as expired anyway.
    pub fn prune_nonces(&self, cutoff_ms: u64) -> Result<usize, HubError> {
        let mut removed = 0;
        for item in self.nonces.iter() {
            let (key, value) = item.map_err(storage_error)?;
            let used: NonceUse =
                serde_json::from_slice(&value).expect("journal nonce records are readable");
            if used.issued_at_ms < cutoff_ms {
                self.nonces.remove(key).map_err(storage_error)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Appends a decision (and, for an approval, what was paid under its id) and flushes it.
    pub fn record(&self, entry: &JournalEntry) -> Result<(), HubError> {
        let id = self.db.generate_id().map_err(storage_error)?;
        self.decisions
            .insert(
                id.to_be_bytes(),
                serde_json::to_vec(entry).expect("serialises"),
            )
            .map_err(storage_error)?;
        if let (Decision::Approved { account_id, .. }, false) = (
            &entry.decision,
            self.paid
                .contains_key(entry.payment_id.as_bytes())
                .map_err(storage_error)?,
        ) {
            let paid = Paid {
                account_id: account_id.clone(),
                amount_minor: entry.amount_minor,
                currency: entry.currency.clone(),
            };
            self.paid
                .insert(
                    entry.payment_id.as_bytes(),
                    serde_json::to_vec(&paid).expect("serialises"),
                )
                .map_err(storage_error)?;
        }
        self.flush()
    }

    /// What was approved under a payment id, if anything.
    pub fn paid(&self, payment_id: &str) -> Result<Option<Paid>, HubError> {
        Ok(self
            .paid
            .get(payment_id.as_bytes())
            .map_err(storage_error)?
            .map(|v| serde_json::from_slice(&v).expect("journal paid records are readable")))
    }

    /// A fresh sequence number for an offline approval (increasing, also across restarts).
    pub fn next_seq(&self) -> Result<u64, HubError> {
        self.db.generate_id().map_err(storage_error)
    }

    /// Stores an offline approval (and what it paid) atomically, and flushes it.
    pub fn record_offline(&self, entry: &OfflinePayment) -> Result<(), HubError> {
        let paid = Paid {
            account_id: entry.account_id.clone(),
            amount_minor: entry.amount_minor,
            currency: entry.currency.to_string(),
        };
        let value = serde_json::to_vec(entry).expect("serialises");
        let paid = serde_json::to_vec(&paid).expect("serialises");
        (&self.offline, &self.paid)
            .transaction(|(offline, paid_tree)| {
                offline.insert(&entry.seq.to_be_bytes(), value.clone())?;
                paid_tree.insert(entry.payment_id.as_bytes(), paid.clone())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| storage_error(format!("{e:?}")))?;
        self.flush()
    }

    /// Stores many offline approvals with one flush (importing a backlog, benchmarks).
    pub fn record_offline_many(&self, entries: &[OfflinePayment]) -> Result<(), HubError> {
        for entry in entries {
            self.offline
                .insert(
                    entry.seq.to_be_bytes(),
                    serde_json::to_vec(entry).expect("serialises"),
                )
                .map_err(storage_error)?;
        }
        self.flush()
    }

    /// The oldest `max` offline approvals not yet acknowledged.
    pub fn offline_batch(&self, max: usize) -> Result<Vec<OfflinePayment>, HubError> {
        self.offline
            .iter()
            .values()
            .take(max)
            .map(|v| {
                Ok(serde_json::from_slice(&v.map_err(storage_error)?)
                    .expect("journal offline entries are readable"))
            })
            .collect()
    }

    /// Every offline approval not yet acknowledged.
    pub fn offline_entries(&self) -> Result<Vec<OfflinePayment>, HubError> {
        self.offline_batch(usize::MAX)
    }

    /// Removes acknowledged offline approvals; returns those that were still there.
    pub fn retire_offline(&self, seqs: &[u64]) -> Result<Vec<OfflinePayment>, HubError> {
        let mut retired = Vec::new();
        for seq in seqs {
            if let Some(v) = self
                .offline
                .remove(seq.to_be_bytes())
                .map_err(storage_error)?
            {
                retired.push(
                    serde_json::from_slice(&v).expect("journal offline entries are readable"),
                );
            }
        }
        self.flush()?;
        Ok(retired)
    }

    /// Stores allowances, each only if newer than the one held; returns those kept.
    pub fn store_allowances(&self, allowances: &[Allowance]) -> Result<Vec<Allowance>, HubError> {
        let mut kept = Vec::new();
        for allowance in allowances {
            let newer = match self
                .allowances
                .get(allowance.account_id.as_bytes())
                .map_err(storage_error)?
            {
                Some(v) => {
                    serde_json::from_slice::<Allowance>(&v)
                        .expect("readable")
                        .version
                        < allowance.version
                }
                None => true,
            };
            if newer {
                self.allowances
                    .insert(
                        allowance.account_id.as_bytes(),
                        serde_json::to_vec(allowance).expect("serialises"),
                    )
                    .map_err(storage_error)?;
                kept.push(allowance.clone());
            }
        }
        self.flush()?;
        Ok(kept)
    }

    /// Drops allowances of accounts the cloud no longer lists for this store (a full sync);
    /// returns the accounts dropped.
    pub fn keep_only_allowances(
        &self,
        listed: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>, HubError> {
        let mut dropped = Vec::new();
        for key in self.allowances.iter().keys() {
            let key = key.map_err(storage_error)?;
            let account = String::from_utf8_lossy(&key).into_owned();
            if !listed.contains(&account) {
                self.allowances.remove(&key).map_err(storage_error)?;
                dropped.push(account);
            }
        }
        self.flush()?;
        Ok(dropped)
    }

    /// Every allowance held.
    pub fn allowances(&self) -> Result<Vec<Allowance>, HubError> {
        self.allowances
            .iter()
            .values()
            .map(|v| {
                Ok(serde_json::from_slice(&v.map_err(storage_error)?)
                    .expect("journal allowances are readable"))
            })
            .collect()
    }

    /// Every decision, oldest first.
    pub fn decisions(&self) -> Result<Vec<JournalEntry>, HubError> {
        self.decisions
            .iter()
            .values()
            .map(|v| {
                Ok(serde_json::from_slice(&v.map_err(storage_error)?)
                    .expect("journal entries are readable"))
            })
            .collect()
    }

    /// Stores key changes and the highest version seen; returns the new highest version.
    pub fn store_keys(&self, entries: &[KeyEntry]) -> Result<u64, HubError> {
        let mut version = self.key_version()?;
        for entry in entries {
            match &entry.public_key {
                Some(_) => self
                    .keys
                    .insert(
                        entry.account_id.as_bytes(),
                        serde_json::to_vec(entry).expect("serialises"),
                    )
                    .map(|_| ())
                    .map_err(storage_error)?,
                None => self
                    .keys
                    .remove(entry.account_id.as_bytes())
                    .map(|_| ())
                    .map_err(storage_error)?,
            }
            version = version.max(entry.version);
        }
        self.db
            .insert(KEY_VERSION, &version.to_be_bytes())
            .map_err(storage_error)?;
        self.flush()?;
        Ok(version)
    }

    /// The highest key version stored.
    pub fn key_version(&self) -> Result<u64, HubError> {
        Ok(self
            .db
            .get(KEY_VERSION)
            .map_err(storage_error)?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")))
            .unwrap_or(0))
    }

    /// Every stored key.
    pub fn keys(&self) -> Result<Vec<KeyEntry>, HubError> {
        self.keys
            .iter()
            .values()
            .map(|v| {
                Ok(serde_json::from_slice(&v.map_err(storage_error)?)
                    .expect("journal keys are readable"))
            })
            .collect()
    }

    /// Queues a void for delivery to the cloud.
    pub fn queue_void(&self, void: &VoidPayment) -> Result<(), HubError> {
        let key = format!("{}#{}", void.payment_id, void.code_nonce);
        self.voids
            .insert(
                key.as_bytes(),
                serde_json::to_vec(void).expect("serialises"),
            )
            .map_err(storage_error)?;
        self.flush()
    }

    /// Voids still to deliver.
    pub fn pending_voids(&self) -> Result<Vec<VoidPayment>, HubError> {
        self.voids
            .iter()
            .values()
            .map(|v| {
                Ok(serde_json::from_slice(&v.map_err(storage_error)?)
                    .expect("journal voids are readable"))
            })
            .collect()
    }

    /// Drops a void the cloud acknowledged.
    pub fn retire_void(&self, void: &VoidPayment) -> Result<(), HubError> {
        let key = format!("{}#{}", void.payment_id, void.code_nonce);
        self.voids.remove(key.as_bytes()).map_err(storage_error)?;
        self.flush()
    }
}

/// Owns the journal on a dedicated thread: every operation ends in a disk flush.
pub struct JournalActor {
    journal: Journal,
}

impl JournalActor {
    /// Wraps an opened journal.
    pub fn new(journal: Journal) -> Self {
        JournalActor { journal }
    }
}

impl Actor for JournalActor {
    type Context = SyncContext<Self>;
}

/// Journal commands, one closed set.
#[derive(Message)]
#[rtype(result = "Result<JournalAnswer, HubError>")]
pub enum JournalCmd {
    /// See [`Journal::reserve_nonce`].
    ReserveNonce {
        /// Account.
        account_id: String,
        /// Code nonce.
        nonce: String,
        /// Payment.
        payment_id: String,
        /// When the code was issued.
        issued_at_ms: u64,
    },
    /// See [`Journal::record`].
    Record(Box<JournalEntry>),
    /// See [`Journal::store_keys`].
    StoreKeys(Vec<KeyEntry>),
    /// See [`Journal::queue_void`].
    QueueVoid(VoidPayment),
    /// See [`Journal::pending_voids`].
    PendingVoids,
    /// See [`Journal::retire_void`].
    RetireVoid(VoidPayment),
    /// See [`Journal::prune_nonces`].
    PruneNonces {
        /// Codes issued before this are forgotten.
        cutoff_ms: u64,
    },
    /// See [`Journal::paid`].
    Paid(String),
    /// See [`Journal::record_offline`].
    RecordOffline(Box<OfflinePayment>),
    /// See [`Journal::offline_batch`].
    OfflineBatch(usize),
    /// See [`Journal::retire_offline`].
    RetireOffline(Vec<u64>),
    /// See [`Journal::store_allowances`].
    StoreAllowances(Vec<Allowance>),
    /// See [`Journal::keep_only_allowances`].
    KeepOnlyAllowances(std::collections::HashSet<String>),
}

/// Answers to [`JournalCmd`].
#[derive(Debug)]
pub enum JournalAnswer {
    /// Nothing to report.
    Done,
    /// Result of a reservation.
    Reservation(Reservation),
    /// New highest key version.
    KeyVersion(u64),
    /// Pending voids.
    Voids(Vec<VoidPayment>),
    /// What was approved under a payment id.
    Paid(Option<Paid>),
    /// Offline approvals (a batch, or those retired).
    Offline(Vec<OfflinePayment>),
    /// Allowances kept.
    Allowances(Vec<Allowance>),
    /// Accounts whose allowances were dropped.
    Dropped(Vec<String>),
}

impl Handler<JournalCmd> for JournalActor {
    type Result = Result<JournalAnswer, HubError>;

    fn handle(&mut self, msg: JournalCmd, _: &mut Self::Context) -> Self::Result {
        let j = &self.journal;
        Ok(match msg {
            JournalCmd::ReserveNonce {
                account_id,
                nonce,
                payment_id,
                issued_at_ms,
            } => JournalAnswer::Reservation(j.reserve_nonce(
                &account_id,
                &nonce,
                &payment_id,
                issued_at_ms,
            )?),
            JournalCmd::Record(entry) => {
                j.record(&entry)?;
                JournalAnswer::Done
            }
            JournalCmd::StoreKeys(entries) => JournalAnswer::KeyVersion(j.store_keys(&entries)?),
            JournalCmd::QueueVoid(void) => {
                j.queue_void(&void)?;
                JournalAnswer::Done
            }
            JournalCmd::PendingVoids => JournalAnswer::Voids(j.pending_voids()?),
            JournalCmd::RetireVoid(void) => {
                j.retire_void(&void)?;
                JournalAnswer::Done
            }
            JournalCmd::Paid(payment_id) => JournalAnswer::Paid(j.paid(&payment_id)?),
            JournalCmd::RecordOffline(entry) => {
                j.record_offline(&entry)?;
                JournalAnswer::Done
            }
            JournalCmd::OfflineBatch(max) => JournalAnswer::Offline(j.offline_batch(max)?),
            JournalCmd::RetireOffline(seqs) => JournalAnswer::Offline(j.retire_offline(&seqs)?),
            JournalCmd::StoreAllowances(a) => JournalAnswer::Allowances(j.store_allowances(&a)?),
            JournalCmd::KeepOnlyAllowances(listed) => {
                JournalAnswer::Dropped(j.keep_only_allowances(&listed)?)
            }
            JournalCmd::PruneNonces { cutoff_ms } => {
                let removed = j.prune_nonces(cutoff_ms)?;
                tracing::debug!(removed, "pruned expired code nonces");
                JournalAnswer::Done
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j")).unwrap();
        (dir, j)
    }

    #[test]
    fn nonce_reservation() {
        let (_d, j) = journal();
        assert_eq!(
            j.reserve_nonce("a", "n1", "s:o1", 10).unwrap(),
            Reservation::Fresh
        );
        assert_eq!(
            j.reserve_nonce("a", "n1", "s:o1", 10).unwrap(),
            Reservation::SamePayment
        );
        assert_eq!(
            j.reserve_nonce("a", "n1", "s:o2", 10).unwrap(),
            Reservation::Replayed {
                first_payment_id: "s:o1".into()
            }
        );
        assert_eq!(
            j.reserve_nonce("b", "n1", "s:o2", 10).unwrap(),
            Reservation::Fresh
        );
        assert_eq!(j.prune_nonces(11).unwrap(), 2);
        assert_eq!(
            j.reserve_nonce("a", "n1", "s:o3", 20).unwrap(),
            Reservation::Fresh
        );
    }

    #[test]
    fn keys_and_revocation_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let j = Journal::open(&path).unwrap();
            let entry = |id: &str, v: u64, key: Option<&str>| KeyEntry {
                account_id: id.into(),
                version: v,
                public_key: key.map(str::to_owned),
            };
            assert_eq!(
                j.store_keys(&[entry("a", 1, Some("ka")), entry("b", 2, Some("kb"))])
                    .unwrap(),
                2
            );
            assert_eq!(j.store_keys(&[entry("a", 3, None)]).unwrap(), 3);
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.key_version().unwrap(), 3);
        let keys = j.keys().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].account_id, "b");
    }

    #[test]
    fn voids_queue_until_retired() {
        let (_d, j) = journal();
        let v = VoidPayment {
            payment_id: "s:o1".into(),
            account_id: "a".into(),
            code_nonce: "n".into(),
        };
        j.queue_void(&v).unwrap();
        j.queue_void(&v).unwrap();
        assert_eq!(j.pending_voids().unwrap(), vec![v.clone()]);
        j.retire_void(&v).unwrap();
        assert!(j.pending_voids().unwrap().is_empty());
    }
}

#[cfg(test)]
mod offline_tests {
    use protocol::{Allowance, Currency, OfflinePayment};

    use super::*;

    fn entry(seq: u64, order: &str, amount: i64) -> OfflinePayment {
        OfflinePayment {
            seq,
            payment_id: format!("s:{order}"),
            store_id: "s".into(),
            terminal_id: "t".into(),
            order_id: order.into(),
            account_id: "a".into(),
            nonce: format!("n{seq}"),
            amount_minor: amount,
            currency: Currency::parse("EUR").unwrap(),
            approved_at_ms: 0,
            signature: "sig".into(),
        }
    }

    #[test]
    fn offline_approvals_stay_until_retired_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let j = Journal::open(&path).unwrap();
            let (s1, s2, s3) = (
                j.next_seq().unwrap(),
                j.next_seq().unwrap(),
                j.next_seq().unwrap(),
            );
            assert!(s1 < s2 && s2 < s3);
            for (seq, order) in [(s1, "o1"), (s2, "o2"), (s3, "o3")] {
                j.record_offline(&entry(seq, order, 100)).unwrap();
            }
            assert_eq!(j.paid("s:o2").unwrap().unwrap().amount_minor, 100);
            assert!(j.paid("s:o9").unwrap().is_none());
            let batch = j.offline_batch(2).unwrap();
            assert_eq!(
                batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
                vec![s1, s2]
            );
            // Retiring twice returns the entry once.
            assert_eq!(j.retire_offline(&[s1]).unwrap().len(), 1);
            assert!(j.retire_offline(&[s1]).unwrap().is_empty());
        }
        let j = Journal::open(&path).unwrap();
        let left = j.offline_entries().unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].order_id, "o2");
        // Sequence numbers keep increasing after a restart.
        assert!(j.next_seq().unwrap() > left[1].seq);
    }

    #[test]
    fn only_newer_allowances_replace_held_ones() {
        let (_d, j) = {
            let dir = tempfile::tempdir().unwrap();
            let j = Journal::open(&dir.path().join("j")).unwrap();
            (dir, j)
        };
        let grant = |account: &str, amount, version| Allowance {
            account_id: account.into(),
            amount_minor: amount,
            currency: Currency::parse("EUR").unwrap(),
            blocked: false,
            version,
        };
        assert_eq!(
            j.store_allowances(&[grant("a", 500, 2), grant("b", 100, 1)])
                .unwrap()
                .len(),
            2
        );
        assert!(j
            .store_allowances(&[grant("a", 900, 1)])
            .unwrap()
            .is_empty());
        assert_eq!(j.store_allowances(&[grant("a", 50, 3)]).unwrap().len(), 1);
        let listed = ["a".to_owned()].into_iter().collect();
        assert_eq!(
            j.keep_only_allowances(&listed).unwrap(),
            vec!["b".to_owned()]
        );
        let held = j.allowances().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].amount_minor, 50);
    }

    #[test]
    fn an_approval_is_remembered_under_its_payment_id() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j")).unwrap();
        let request = AuthorizeRequest {
            payment_id: "s:o1".into(),
            store_id: "s".into(),
            terminal_id: "t".into(),
            order_id: "o1".into(),
            amount_minor: 700,
            currency: Currency::parse("EUR").unwrap(),
            proof: protocol::PaymentProof::Code("x".into()),
        };
        let declined = JournalEntry::for_request(
            &request,
            Decision::declined(protocol::DeclineReason::CodeExpired, ""),
        );
        j.record(&declined).unwrap();
        assert!(j.paid("s:o1").unwrap().is_none());
        let approved = JournalEntry::for_request(
            &request,
            Decision::Approved {
                account_id: "a".into(),
                already_paid: false,
            },
        );
        j.record(&approved).unwrap();
        assert_eq!(
            j.paid("s:o1").unwrap(),
            Some(Paid {
                account_id: "a".into(),
                amount_minor: 700,
                currency: "EUR".into()
            })
        );
    }
}
