//! The hub's durable journal in `sled`: every decision, the nonces of the codes it has seen, the
//! attempts sent to the cloud and not yet decided, the account keys the cloud distributed, and the
//! voids still to deliver. Every write is flushed before the caller goes on, so that what the hub
//! answered survives a crash; a failed write or flush stops the process
//! ([`storage::fail_stop`]), since nobody knows what is on disk after it.

use std::path::Path;

use protocol::{
    AccountId, Allowance, AuthorizeRequest, CodeNonce, Decision, KeyEntry, OfflinePayment,
    PaymentId, TerminalId, VoidPayment,
};
use serde::{Deserialize, Serialize};
use storage::kv::Transactional;

use crate::error::HubError;

/// One decision the hub answered an edge with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// When it was decided, ms since the Unix epoch.
    pub decided_at_ms: u64,
    /// The payment.
    pub payment_id: PaymentId,
    /// The terminal that asked.
    pub terminal_id: TerminalId,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency code.
    pub currency: String,
    /// The account the code named, once known.
    pub account_id: Option<AccountId>,
    /// The code's nonce, once known. The code text itself is a bearer token and is not kept.
    pub code_nonce: Option<CodeNonce>,
    /// What the edge was told.
    pub decision: Decision,
}

impl JournalEntry {
    /// An entry for a request, before its code was read, decided at `now_ms`.
    pub fn for_request(request: &AuthorizeRequest, decision: Decision, now_ms: u64) -> Self {
        JournalEntry {
            decided_at_ms: now_ms,
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
    payment_id: PaymentId,
    issued_at_ms: u64,
    /// The attempt made with it was voided: the code may not be sent to the cloud again (a repeat
    /// could hear "approved" before the void lands, and the void would then take the money back).
    #[serde(default)]
    voided: bool,
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
        first_payment_id: PaymentId,
    },
    /// The code was used for this payment, and that attempt was voided: a fresh code is needed.
    Voided,
    /// The code was issued before the nonces this hub has forgotten: it may have been used, so it
    /// is refused whatever the clock says now (a clock stepped backwards cannot revive it).
    Expired,
}

/// What the journal knows of a code refused for its time window, shown again for a payment it
/// has not approved ([`Journal::inspect_nonce`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NonceSeen {
    /// An attempt at the payment is open: its outcome is not known yet.
    OpenAttempt,
    /// The code's use is on record (and the payment's approval would be): what this hub
    /// decided stands.
    Known,
    /// The code was issued before what the journal remembers (a lost disk, pruned nonces): it
    /// may have paid the payment, only the cloud knows.
    Forgotten,
    /// Never used here, and issued after what the journal forgot.
    Unused,
}

/// The journal database. Clones share it.
#[derive(Clone)]
pub struct Journal {
    db: storage::kv::Db,
    decisions: storage::kv::Tree,
    nonces: storage::kv::Tree,
    keys: storage::kv::Tree,
    voids: storage::kv::Tree,
    /// Offline approvals not yet acknowledged by the cloud, by sequence number.
    offline: storage::kv::Tree,
    /// The offline allowances the cloud granted this store, by account.
    allowances: storage::kv::Tree,
    /// Payment ids this hub answered "approved", with what was approved.
    paid: storage::kv::Tree,
    /// Attempts sent (or about to be sent) to the cloud whose answer is not journaled yet, by
    /// `<payment id>#<nonce>`: a restart voids each (see [`Journal::recover_attempts`]).
    attempts: storage::kv::Tree,
    /// Offline approvals the cloud could not apply as approved, kept for an operator by sequence.
    conflicts: storage::kv::Tree,
    /// Approvals the cloud answered and this hub journaled, to confirm (post) at the cloud, by
    /// `<payment id>#<nonce>`: until posted, the cloud's payment is pending and would expire.
    posts: storage::kv::Tree,
    /// Refunds sent to the cloud with no decision heard yet, by `<payment id>#<refund id>`:
    /// while one is here, a request for it that cannot be sent is no decline (the earlier one may
    /// have been made).
    refunds: storage::kv::Tree,
}

/// What the hub approved under a payment id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paid {
    /// The paying account.
    pub account_id: AccountId,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency code.
    pub currency: String,
}

fn storage_error(e: impl std::fmt::Display) -> HubError {
    HubError::Storage(e.to_string())
}

const KEY_VERSION: &[u8] = b"key_version";
/// Nonces of codes issued before this time (ms) were pruned: such codes are refused.
const NONCES_PRUNED_BEFORE: &[u8] = b"nonces_pruned_before_ms";

fn attempt_key(attempt: &VoidPayment) -> Vec<u8> {
    format!("{}#{}", attempt.payment_id, attempt.code_nonce).into_bytes()
}

fn nonce_key(account_id: &str, nonce: &str) -> Vec<u8> {
    format!("{account_id}/{nonce}").into_bytes()
}

type TxResult<T> = Result<T, storage::kv::ConflictableTransactionError<()>>;

/// Every record of a tree, in key order. A record the journal cannot read means it is corrupt:
/// carrying on could answer wrongly, so it panics with `what`.
fn read_all<T: serde::de::DeserializeOwned>(
    tree: &storage::kv::Tree,
    what: &str,
) -> Result<Vec<T>, HubError> {
    tree.iter()
        .values()
        .map(|v| Ok(serde_json::from_slice(&v.map_err(storage_error)?).expect(what)))
        .collect()
}

fn tx_error(e: storage::kv::TransactionError<()>) -> HubError {
    storage_error(format!("{e:?}"))
}

impl Journal {
    /// Opens (or creates) the journal in a directory.
    pub fn open(path: &Path) -> Result<Self, HubError> {
        Self::on(storage::kv::Db::open(path).map_err(storage_error)?)
    }

    /// A journal in memory, for the deterministic simulation only: `store` is its disk (a hub
    /// that restarts reopens it; a wiped disk is a new one), and nothing waits for a real disk.
    /// Never in a hub: only builds with the `sim` feature (the tests crate's) have it.
    #[cfg(feature = "sim")]
    pub fn in_memory(store: &storage::kv::MemoryDb) -> Result<Self, HubError> {
        Self::on(storage::kv::Db::memory(store))
    }

    fn on(db: storage::kv::Db) -> Result<Self, HubError> {
        Ok(Journal {
            decisions: db.open_tree("decisions").map_err(storage_error)?,
            nonces: db.open_tree("nonces").map_err(storage_error)?,
            keys: db.open_tree("keys").map_err(storage_error)?,
            voids: db.open_tree("voids").map_err(storage_error)?,
            offline: db.open_tree("offline").map_err(storage_error)?,
            allowances: db.open_tree("allowances").map_err(storage_error)?,
            paid: db.open_tree("paid").map_err(storage_error)?,
            attempts: db.open_tree("attempts").map_err(storage_error)?,
            conflicts: db.open_tree("conflicts").map_err(storage_error)?,
            posts: db.open_tree("posts").map_err(storage_error)?,
            refunds: db.open_tree("refunds").map_err(storage_error)?,
            db,
        })
    }

    /// Flushes to disk, or stops the process ([`storage::flush_or_stop`]).
    pub fn flush(&self) -> Result<(), HubError> {
        storage::flush_or_stop(&self.db, "hub-journal-flush");
        Ok(())
    }

    /// Codes issued before this time are refused: their nonces may have been pruned.
    pub fn nonces_pruned_before_ms(&self) -> Result<u64, HubError> {
        Ok(self
            .db
            .get(NONCES_PRUNED_BEFORE)
            .map_err(storage_error)?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")))
            .unwrap_or(0))
    }

    /// A journal that has never refused codes refuses, from now on, every code issued before
    /// `before_ms`; one that has (it pruned nonces, or was started before) keeps its cutoff.
    /// Called at every start with the clock's time: a journal created empty (a first start, or
    /// a hub whose disk was lost) knows no nonce its predecessor reserved, and a code presented
    /// before the loss and again after it would make two attempts with one nonce, which the
    /// cloud cannot tell apart (the first one's void would move back what the second was told
    /// "approved"). A code used before the loss was issued before the hub's clock then, plus at
    /// most the skew tolerance; so none passes the cutoff unless the hub came back within the
    /// skew of that use with a phone clock running ahead, or the hub's clock stepped back
    /// between the use and this start. (Adding the skew to the cutoff would close the first
    /// case and refuse every code for the skew's length after every first start.) Returns
    /// whether the cutoff was set.
    pub fn refuse_codes_issued_before(&self, before_ms: u64) -> Result<bool, HubError> {
        let set = self
            .db
            .compare_and_swap(
                NONCES_PRUNED_BEFORE,
                None as Option<&[u8]>,
                Some(&before_ms.to_be_bytes()[..]),
            )
            .map_err(storage_error)?
            .is_ok();
        self.flush()?;
        Ok(set)
    }

    /// Records that a code's nonce is being used for a payment, unless it was used before.
    pub fn reserve_nonce(
        &self,
        account_id: &AccountId,
        nonce: &CodeNonce,
        payment_id: &PaymentId,
        issued_at_ms: u64,
    ) -> Result<Reservation, HubError> {
        storage::fail::fail_point!("hub-journal-reserve", |_| Err(storage_error("injected")));
        if issued_at_ms < self.nonces_pruned_before_ms()? {
            return Ok(Reservation::Expired);
        }
        let key = nonce_key(account_id, nonce);
        let value = serde_json::to_vec(&NonceUse {
            payment_id: payment_id.clone(),
            issued_at_ms,
            voided: false,
        })
        .expect("serialises");
        let previous = self
            .nonces
            .compare_and_swap(&key, None as Option<&[u8]>, Some(value))
            .map_err(storage_error)?;
        let reservation = match previous {
            Ok(()) => Reservation::Fresh,
            Err(cas) => {
                let used: NonceUse =
                    serde_json::from_slice(&cas.current.expect("present on conflict"))
                        .expect("journal nonce records are readable");
                if used.payment_id != *payment_id {
                    Reservation::Replayed {
                        first_payment_id: used.payment_id,
                    }
                } else if used.voided {
                    Reservation::Voided
                } else {
                    Reservation::SamePayment
                }
            }
        };
        self.flush()?;
        Ok(reservation)
    }

    /// Forgets nonces of codes issued before `cutoff_ms`, and from then on refuses such codes
    /// ([`Reservation::Expired`]) whatever the clock says: the cutoff only moves forward.
    pub fn prune_nonces(&self, cutoff_ms: u64) -> Result<usize, HubError> {
        let mut pruned = Vec::new();
        let mut newest_pruned = None;
        for item in self.nonces.iter() {
            let (key, value) = item.map_err(storage_error)?;
            let used: NonceUse =
                serde_json::from_slice(&value).expect("journal nonce records are readable");
            if used.issued_at_ms < cutoff_ms {
                pruned.push(key);
                newest_pruned = newest_pruned.max(Some(used.issued_at_ms));
            }
        }
        let Some(newest_pruned) = newest_pruned else {
            return Ok(0);
        };
        // The cutoff covers exactly the codes whose nonces go (not the clock's cutoff: a clock
        // stepped far ahead must not refuse, once corrected, codes never used), and it is durable
        // before any nonce goes, so no pruned code is ever accepted again.
        let before_ms = (newest_pruned + 1).max(self.nonces_pruned_before_ms()?);
        self.db
            .insert(NONCES_PRUNED_BEFORE, &before_ms.to_be_bytes())
            .map_err(storage_error)?;
        self.flush()?;
        for key in &pruned {
            self.nonces.remove(key).map_err(storage_error)?;
        }
        Ok(pruned.len())
    }

    /// Records, durably, that an attempt is about to be sent to the cloud: until its answer is
    /// journaled ([`Journal::record`]) or it is voided, a restart voids it.
    /// Returns false, recording nothing, while another attempt for the same payment is open: one
    /// attempt per payment at a time (two at once, with the same code, could have one voided
    /// under the other's approval).
    pub fn begin_attempt(&self, attempt: &VoidPayment) -> Result<bool, HubError> {
        let prefix = format!("{}#", attempt.payment_id);
        if self
            .attempts
            .scan_prefix(prefix.as_bytes())
            .next()
            .is_some()
        {
            return Ok(false);
        }
        // Its code was voided since it was reserved (an earlier attempt with the same code, for
        // the same payment, ended unanswered): that void, still on its way, names this code too,
        // and would move back what this attempt could be told "approved" for (found by
        // simulation seed 1796457171001). Not now: the retry hears the code was voided.
        let nonce = nonce_key(&attempt.account_id, &attempt.code_nonce);
        if let Some(used) = self.nonces.get(&nonce).map_err(storage_error)? {
            let used: NonceUse =
                serde_json::from_slice(&used).expect("journal nonce records are readable");
            if used.voided {
                return Ok(false);
            }
        }
        self.attempts
            .insert(
                attempt_key(attempt),
                serde_json::to_vec(attempt).expect("serialises"),
            )
            .map_err(storage_error)?;
        self.flush()?;
        Ok(true)
    }

    /// What the journal knows of a code (`account_id`'s `nonce`, issued at `issued_at_ms`) shown
    /// for `payment_id` and refused for its time window: whether that payment has an attempt
    /// open, whether the code's use is on record, or whether the journal cannot know. Reserves
    /// nothing.
    pub fn inspect_nonce(
        &self,
        account_id: &AccountId,
        nonce: &CodeNonce,
        payment_id: &PaymentId,
        issued_at_ms: u64,
    ) -> Result<NonceSeen, HubError> {
        let prefix = format!("{payment_id}#");
        if let Some(open) = self.attempts.scan_prefix(prefix.as_bytes()).next() {
            open.map_err(storage_error)?;
            return Ok(NonceSeen::OpenAttempt);
        }
        let known = self
            .nonces
            .get(nonce_key(account_id, nonce))
            .map_err(storage_error)?
            .is_some();
        Ok(if known {
            NonceSeen::Known
        } else if issued_at_ms < self.nonces_pruned_before_ms()? {
            NonceSeen::Forgotten
        } else {
            NonceSeen::Unused
        })
    }

    /// Forgets an attempt that was never sent (the link refused it before publishing).
    pub fn drop_attempt(&self, attempt: &VoidPayment) -> Result<(), HubError> {
        self.attempts
            .remove(attempt_key(attempt))
            .map_err(storage_error)?;
        self.flush()
    }

    /// Attempts whose answer was never journaled.
    pub fn open_attempts(&self) -> Result<Vec<VoidPayment>, HubError> {
        read_all(&self.attempts, "journal attempts are readable")
    }

    /// Voids an attempt whose outcome is unknown, atomically: the attempt is closed, the void
    /// queued for delivery, and its code may not be sent again.
    pub fn void_attempt(&self, attempt: &VoidPayment) -> Result<(), HubError> {
        let key = nonce_key(&attempt.account_id, &attempt.code_nonce);
        let value = serde_json::to_vec(attempt).expect("serialises");
        (&self.attempts, &self.voids, &self.nonces, &self.posts)
            .transaction(|(attempts, voids, nonces, posts)| -> TxResult<()> {
                attempts.remove(attempt_key(attempt))?;
                if posts.get(attempt_key(attempt))?.is_some() {
                    // Its approval was journaled: it is confirmed, never voided.
                    return Ok(());
                }
                voids.insert(attempt_key(attempt), value.clone())?;
                let used = match nonces.get(&key)? {
                    Some(v) => NonceUse {
                        voided: true,
                        ..serde_json::from_slice(&v).expect("journal nonce records are readable")
                    },
                    None => NonceUse {
                        payment_id: attempt.payment_id.clone(),
                        issued_at_ms: u64::MAX,
                        voided: true,
                    },
                };
                if used.payment_id == attempt.payment_id {
                    nonces.insert(key.clone(), serde_json::to_vec(&used).expect("serialises"))?;
                }
                Ok(())
            })
            .map_err(tx_error)?;
        self.flush()
    }

    /// At start: voids every attempt whose answer was never journaled (the hub stopped while
    /// waiting for the cloud, or before it could journal the answer). Returns how many.
    pub fn recover_attempts(&self) -> Result<usize, HubError> {
        let open = self.open_attempts()?;
        for attempt in &open {
            self.void_attempt(attempt)?;
        }
        Ok(open.len())
    }

    /// Keeps an offline approval the cloud could not apply as approved, for an operator, and
    /// removes it from the backlog (atomically).
    /// Returns the entry moved, if it was still in the backlog.
    pub fn keep_conflict(
        &self,
        seq: u64,
        detail: &str,
    ) -> Result<Option<OfflinePayment>, HubError> {
        let moved = (&self.offline, &self.conflicts)
            .transaction(|(offline, conflicts)| -> TxResult<Option<OfflinePayment>> {
                let Some(entry) = offline.remove(&seq.to_be_bytes())? else {
                    return Ok(None);
                };
                let entry: OfflinePayment =
                    serde_json::from_slice(&entry).expect("journal offline entries are readable");
                let kept = HeldConflict {
                    entry: entry.clone(),
                    detail: detail.to_owned(),
                };
                conflicts.insert(
                    &seq.to_be_bytes(),
                    serde_json::to_vec(&kept).expect("serialises"),
                )?;
                Ok(Some(entry))
            })
            .map_err(tx_error)?;
        self.flush()?;
        Ok(moved)
    }

    /// Offline approvals the cloud could not apply as approved, waiting for an operator.
    pub fn conflicts(&self) -> Result<Vec<HeldConflict>, HubError> {
        read_all(&self.conflicts, "journal conflicts are readable")
    }

    /// An operator resolved a conflict (settled with the customer and the store): it is dropped.
    /// Returns whether it was held.
    pub fn resolve_conflict(&self, seq: u64) -> Result<bool, HubError> {
        let held = self
            .conflicts
            .remove(seq.to_be_bytes())
            .map_err(storage_error)?
            .is_some();
        self.flush()?;
        Ok(held)
    }

    /// Appends a decision (and, for an approval, what was paid under its id) and flushes it, in one
    /// transaction with closing the attempt it answers (`attempt`: sent to the cloud, answered):
    /// a crash leaves either both (the answer stands) or neither (the restart voids the attempt).
    pub fn record(
        &self,
        entry: &JournalEntry,
        attempt: Option<&VoidPayment>,
    ) -> Result<(), HubError> {
        storage::fail::fail_point!("hub-journal-record", |_| Err(storage_error("injected")));
        let id = self.db.generate_id().map_err(storage_error)?;
        let value = serde_json::to_vec(entry).expect("serialises");
        let paid = match &entry.decision {
            Decision::Approved { account_id, .. } => Some(
                serde_json::to_vec(&Paid {
                    account_id: account_id.clone(),
                    amount_minor: entry.amount_minor,
                    currency: entry.currency.clone(),
                })
                .expect("serialises"),
            ),
            Decision::Declined { .. } => None,
        };
        (&self.decisions, &self.paid, &self.attempts, &self.posts)
            .transaction(|(decisions, paid_tree, attempts, posts)| -> TxResult<()> {
                decisions.insert(&id.to_be_bytes(), value.clone())?;
                if let Some(paid) = &paid {
                    if paid_tree.get(entry.payment_id.as_bytes())?.is_none() {
                        paid_tree.insert(entry.payment_id.as_bytes(), paid.clone())?;
                    }
                }
                if let Some(attempt) = attempt {
                    attempts.remove(attempt_key(attempt))?;
                    // The cloud approved it: confirm it there, so that it no longer expires.
                    if paid.is_some() {
                        posts.insert(
                            attempt_key(attempt),
                            serde_json::to_vec(attempt).expect("serialises"),
                        )?;
                    }
                }
                Ok(())
            })
            .map_err(tx_error)?;
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
        (&self.offline, &self.paid, &self.allowances)
            .transaction(|(offline, paid_tree, allowances)| {
                offline.insert(&entry.seq.to_be_bytes(), value.clone())?;
                paid_tree.insert(entry.payment_id.as_bytes(), paid.clone())?;
                // What approvals booked under the grant survives a restart with the grant.
                let account = entry.account_id.as_bytes();
                if let Some(held) = allowances.get(account)? {
                    let mut held: Allowance =
                        serde_json::from_slice(&held).expect("journal allowances are readable");
                    if held.version == entry.allowance_version {
                        held.booked_minor = held.booked_minor.saturating_add(entry.amount_minor);
                        allowances
                            .insert(account, serde_json::to_vec(&held).expect("serialises"))?;
                    }
                }
                Ok::<_, storage::kv::ConflictableTransactionError<()>>(())
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

    /// Stores allowances, each only if newer than the one held (or, of the same version, when it
    /// counts more booked under it); returns those kept.
    pub fn store_allowances(&self, allowances: &[Allowance]) -> Result<Vec<Allowance>, HubError> {
        let mut kept = Vec::new();
        for allowance in allowances {
            let newer = match self
                .allowances
                .get(allowance.account_id.as_bytes())
                .map_err(storage_error)?
            {
                Some(v) => {
                    let held = serde_json::from_slice::<Allowance>(&v).expect("readable");
                    held.version < allowance.version
                        || (held.version == allowance.version
                            && held.booked_minor < allowance.booked_minor)
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
        listed: &std::collections::HashSet<AccountId>,
    ) -> Result<Vec<AccountId>, HubError> {
        let mut dropped = Vec::new();
        for key in self.allowances.iter().keys() {
            let key = key.map_err(storage_error)?;
            let account = AccountId::from(String::from_utf8_lossy(&key).into_owned());
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
        read_all(&self.allowances, "journal allowances are readable")
    }

    /// Every decision, oldest first.
    pub fn decisions(&self) -> Result<Vec<JournalEntry>, HubError> {
        read_all(&self.decisions, "journal entries are readable")
    }

    /// Stores key changes and the highest version seen; returns the new highest version.
    pub fn store_keys(&self, entries: &[KeyEntry]) -> Result<u64, HubError> {
        let mut version = self.key_version()?;
        for entry in entries {
            // Only a newer change replaces what is held, and a revocation is kept (a key without
            // its public key): batches written out of order never bring a revoked key back.
            let held = self
                .keys
                .get(entry.account_id.as_bytes())
                .map_err(storage_error)?
                .map(|v| {
                    serde_json::from_slice::<KeyEntry>(&v).expect("journal keys are readable")
                });
            if held.is_none_or(|held| held.version < entry.version) {
                self.keys
                    .insert(
                        entry.account_id.as_bytes(),
                        serde_json::to_vec(entry).expect("serialises"),
                    )
                    .map_err(storage_error)?;
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

    /// Every key entry held, revocations (no key) included: a hub starting from them knows the
    /// version of every account's key, so a replayed older key of a closed account stays out.
    pub fn keys(&self) -> Result<Vec<KeyEntry>, HubError> {
        read_all(&self.keys, "journal keys are readable")
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
        read_all(&self.voids, "journal voids are readable")
    }

    /// Posts still to deliver.
    pub fn pending_posts(&self) -> Result<Vec<protocol::PostPayment>, HubError> {
        read_all(&self.posts, "journal posts are readable")
    }

    /// Notes, flushed, that refund `key` (`<payment id>#<refund id>`) is about to be sent to the
    /// cloud; answers whether an earlier request for it was sent with no decision heard.
    pub fn open_refund(&self, key: &str) -> Result<bool, HubError> {
        let earlier = self
            .refunds
            .insert(key.as_bytes(), &b""[..])
            .map_err(storage_error)?
            .is_some();
        self.flush()?;
        Ok(earlier)
    }

    /// Forgets refund `key`: the cloud decided it, or neither this request nor an earlier one
    /// was sent.
    pub fn close_refund(&self, key: &str) -> Result<(), HubError> {
        self.refunds.remove(key.as_bytes()).map_err(storage_error)?;
        self.flush()
    }

    /// Drops a post the cloud acknowledged.
    pub fn retire_post(&self, post: &protocol::PostPayment) -> Result<(), HubError> {
        self.posts
            .remove(attempt_key(post))
            .map_err(storage_error)?;
        self.flush()
    }

    /// Drops a void the cloud acknowledged.
    pub fn retire_void(&self, void: &VoidPayment) -> Result<(), HubError> {
        let key = format!("{}#{}", void.payment_id, void.code_nonce);
        self.voids.remove(key.as_bytes()).map_err(storage_error)?;
        self.flush()
    }
}

/// An offline approval the cloud reported as a conflict, held for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldConflict {
    /// The entry as the hub signed it.
    pub entry: OfflinePayment,
    /// What the cloud said conflicts.
    pub detail: String,
}

/// Most journal operations waiting for the journal thread; a caller beyond it waits (without
/// holding an async thread) until there is room.
pub const JOURNAL_QUEUE: usize = 256;

/// Owns the journal on a dedicated thread fed by a bounded queue ([`storage::Worker`]): every
/// operation ends in a disk flush, which must not run on an async thread. A storage error stops
/// the process ([`storage::fail_stop`]).
pub type JournalWorker = storage::Worker<Journal>;

/// Starts the journal thread.
pub fn start_worker(journal: Journal) -> JournalWorker {
    storage::Worker::start("hub-journal", JOURNAL_QUEUE, journal)
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
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 10)
                .unwrap(),
            Reservation::Fresh
        );
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 10)
                .unwrap(),
            Reservation::SamePayment
        );
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o2".into(), 10)
                .unwrap(),
            Reservation::Replayed {
                first_payment_id: "s:o1".into()
            }
        );
        assert_eq!(
            j.reserve_nonce(&"b".into(), &"n1".into(), &"s:o2".into(), 10)
                .unwrap(),
            Reservation::Fresh
        );
        assert_eq!(j.prune_nonces(11).unwrap(), 2);
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o3".into(), 20)
                .unwrap(),
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
            // A batch written late (out of order) brings no revoked key back.
            assert_eq!(j.store_keys(&[entry("a", 1, Some("ka"))]).unwrap(), 3);
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.key_version().unwrap(), 3);
        let keys = j.keys().unwrap();
        assert_eq!(keys.len(), 2);
        let held: Vec<_> = keys.iter().filter(|k| k.public_key.is_some()).collect();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].account_id, "b");
        assert!(keys
            .iter()
            .any(|k| k.account_id == "a" && k.version == 3 && k.public_key.is_none()));
    }

    fn attempt(order: &str, nonce: &str) -> VoidPayment {
        VoidPayment {
            payment_id: format!("s:{order}").into(),
            account_id: "a".into(),
            code_nonce: nonce.into(),
        }
    }

    #[test]
    fn an_attempt_left_open_is_voided_at_restart_and_its_code_is_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let j = Journal::open(&path).unwrap();
            assert_eq!(
                j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 10)
                    .unwrap(),
                Reservation::Fresh
            );
            assert!(j.begin_attempt(&attempt("o1", "n1")).unwrap());
            // One attempt per payment at a time: a second one for o1 is refused.
            assert!(!j.begin_attempt(&attempt("o1", "n9")).unwrap());
            // o2 was answered: its attempt closes with the decision.
            assert!(j.begin_attempt(&attempt("o2", "n2")).unwrap());
            let request = AuthorizeRequest {
                attestation: None,
                payment_id: "s:o2".into(),
                store_id: "s".into(),
                terminal_id: "t".into(),
                order_id: "o2".into(),
                amount_minor: 5,
                currency: protocol::Currency::parse("EUR").unwrap(),
                proof: protocol::PaymentProof::Code("x".into()),
            };
            let entry = JournalEntry::for_request(
                &request,
                Decision::declined(protocol::DeclineReason::InsufficientFunds, ""),
                0,
            );
            j.record(&entry, Some(&attempt("o2", "n2"))).unwrap();
            assert_eq!(j.open_attempts().unwrap(), vec![attempt("o1", "n1")]);
            // The hub stops here, waiting for the cloud's answer to o1.
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.recover_attempts().unwrap(), 1);
        assert!(j.open_attempts().unwrap().is_empty());
        assert_eq!(j.pending_voids().unwrap(), vec![attempt("o1", "n1")]);
        // The cashier retries o1 with the same code: it must not go to the cloud again (it could
        // hear "approved" there before the void lands and takes the money back).
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 10)
                .unwrap(),
            Reservation::Voided
        );
        assert_eq!(j.recover_attempts().unwrap(), 0, "recovery is idempotent");
    }

    #[test]
    fn a_code_voided_between_its_reservation_and_its_attempt_starts_no_attempt() {
        let (_dir, j) = journal();
        let (account, nonce, payment) = ("a".into(), "n1".into(), "s:o1".into());
        // The first attempt with the code, then a retry with the same code reserving it again.
        assert_eq!(
            j.reserve_nonce(&account, &nonce, &payment, 1_000).unwrap(),
            Reservation::Fresh
        );
        assert!(j.begin_attempt(&attempt("o1", "n1")).unwrap());
        assert_eq!(
            j.reserve_nonce(&account, &nonce, &payment, 1_000).unwrap(),
            Reservation::SamePayment
        );
        // The first ends unanswered and is voided before the retry records its attempt.
        j.void_attempt(&attempt("o1", "n1")).unwrap();
        assert!(
            !j.begin_attempt(&attempt("o1", "n1")).unwrap(),
            "the void on its way names this code: no new attempt may be told approved"
        );
        // A retry from then on hears the code was voided.
        assert_eq!(
            j.reserve_nonce(&account, &nonce, &payment, 1_000).unwrap(),
            Reservation::Voided
        );
        // Another code for the same order may go.
        assert!(j.begin_attempt(&attempt("o1", "n2")).unwrap());
    }

    #[test]
    fn a_journal_created_empty_refuses_codes_issued_before_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let j = Journal::open(&path).unwrap();
            assert!(j.refuse_codes_issued_before(5_000).unwrap());
            assert_eq!(
                j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 4_999)
                    .unwrap(),
                Reservation::Expired
            );
            assert_eq!(
                j.reserve_nonce(&"a".into(), &"n2".into(), &"s:o2".into(), 5_000)
                    .unwrap(),
                Reservation::Fresh
            );
        }
        // A restart keeps the cutoff (its nonces are all there): a later start sets none.
        let j = Journal::open(&path).unwrap();
        assert!(!j.refuse_codes_issued_before(9_000).unwrap());
        assert_eq!(j.nonces_pruned_before_ms().unwrap(), 5_000);
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n3".into(), &"s:o3".into(), 6_000)
                .unwrap(),
            Reservation::Fresh
        );
        // The disk is lost: the new journal does not know n2 was used; it refuses the code.
        drop(j);
        std::fs::remove_dir_all(&path).unwrap();
        let j = Journal::open(&path).unwrap();
        assert!(j.refuse_codes_issued_before(9_000).unwrap());
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n2".into(), &"s:o2".into(), 5_000)
                .unwrap(),
            Reservation::Expired
        );
    }

    #[test]
    fn inspecting_a_refused_code_tells_open_attempts_known_forgotten_and_unused_codes() {
        let (_d, j) = journal();
        assert!(j.refuse_codes_issued_before(5_000).unwrap());
        let inspect = |nonce: &str, order: &str, issued_at_ms| {
            j.inspect_nonce(
                &"a".into(),
                &nonce.into(),
                &format!("s:{order}").into(),
                issued_at_ms,
            )
            .unwrap()
        };
        assert_eq!(inspect("n1", "o1", 4_999), NonceSeen::Forgotten);
        assert_eq!(inspect("n1", "o1", 5_000), NonceSeen::Unused);
        j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 6_000)
            .unwrap();
        assert_eq!(inspect("n1", "o1", 6_000), NonceSeen::Known);
        let attempt = VoidPayment {
            payment_id: "s:o1".into(),
            account_id: "a".into(),
            code_nonce: "n1".into(),
        };
        assert!(j.begin_attempt(&attempt).unwrap());
        // Any code shown for an order with an attempt open hears it is in progress.
        assert_eq!(inspect("n9", "o1", 4_000), NonceSeen::OpenAttempt);
        assert_eq!(inspect("n9", "o11", 4_000), NonceSeen::Forgotten);
        // Inspecting reserves nothing.
        assert_eq!(inspect("n2", "o2", 6_000), NonceSeen::Unused);
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n2".into(), &"s:o2".into(), 6_000)
                .unwrap(),
            Reservation::Fresh
        );
    }

    #[test]
    fn a_pruned_nonce_cannot_come_back_after_the_clock_steps_back() {
        let (_d, j) = journal();
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o1".into(), 1_000)
                .unwrap(),
            Reservation::Fresh
        );
        assert_eq!(j.prune_nonces(2_000).unwrap(), 1);
        // The clock stepped back: the code's window looks open again, its nonce is gone.
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o2".into(), 1_000)
                .unwrap(),
            Reservation::Expired
        );
        // A later prune by a clock that went back does not lower the cutoff; the cutoff covers
        // the codes pruned, not the clock's (a clock stepped ahead refuses no unused code later).
        j.prune_nonces(500).unwrap();
        assert_eq!(j.nonces_pruned_before_ms().unwrap(), 1_001);
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n2".into(), &"s:o5".into(), 1_500)
                .unwrap(),
            Reservation::Fresh
        );
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n1".into(), &"s:o3".into(), 1_000)
                .unwrap(),
            Reservation::Expired
        );
        assert_eq!(
            j.reserve_nonce(&"a".into(), &"n9".into(), &"s:o4".into(), 2_000)
                .unwrap(),
            Reservation::Fresh
        );
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
            payment_id: format!("s:{order}").into(),
            store_id: "s".into(),
            terminal_id: "t".into(),
            order_id: order.into(),
            account_id: "a".into(),
            nonce: format!("n{seq}").into(),
            amount_minor: amount,
            currency: Currency::parse("EUR").unwrap(),
            approved_at_ms: 0,
            allowance_version: 0,
            spent_code: None,
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
    fn a_conflict_leaves_the_backlog_and_stays_until_an_operator_resolves_it() {
        let (_d, j) = {
            let dir = tempfile::tempdir().unwrap();
            let j = Journal::open(&dir.path().join("j")).unwrap();
            (dir, j)
        };
        j.record_offline(&entry(7, "o1", 100)).unwrap();
        let moved = j.keep_conflict(7, "paid with other details").unwrap();
        assert_eq!(moved.map(|e| e.seq), Some(7));
        assert!(j.offline_entries().unwrap().is_empty());
        assert_eq!(j.keep_conflict(7, "again").unwrap(), None);
        let held = j.conflicts().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].detail, "paid with other details");
        assert!(j.resolve_conflict(7).unwrap());
        assert!(!j.resolve_conflict(7).unwrap());
        assert!(j.conflicts().unwrap().is_empty());
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
            booked_minor: 0,
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
        let listed = [AccountId::from("a")].into_iter().collect();
        assert_eq!(
            j.keep_only_allowances(&listed).unwrap(),
            vec![AccountId::from("b")]
        );
        let held = j.allowances().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].amount_minor, 50);
        // An approval under the grant books against it, durably; one under an older grant does
        // not; the cloud's larger count of the same grant replaces a smaller one.
        let mut under = entry(1, "o1", 20);
        under.account_id = "a".into();
        under.allowance_version = 3;
        j.record_offline(&under).unwrap();
        let mut older = entry(2, "o2", 7);
        older.allowance_version = 2;
        j.record_offline(&older).unwrap();
        assert_eq!(j.allowances().unwrap()[0].booked_minor, 20);
        let cloud_count = |booked| Allowance {
            booked_minor: booked,
            ..grant("a", 50, 3)
        };
        assert!(j.store_allowances(&[cloud_count(10)]).unwrap().is_empty());
        assert_eq!(j.store_allowances(&[cloud_count(30)]).unwrap().len(), 1);
        assert_eq!(j.allowances().unwrap()[0].booked_minor, 30);
    }

    #[test]
    fn an_approval_is_remembered_under_its_payment_id() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j")).unwrap();
        let request = AuthorizeRequest {
            attestation: None,
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
            0,
        );
        j.record(&declined, None).unwrap();
        assert!(j.paid("s:o1").unwrap().is_none());
        let approved = JournalEntry::for_request(
            &request,
            Decision::Approved {
                account_id: "a".into(),
                already_paid: false,
            },
            0,
        );
        j.record(&approved, None).unwrap();
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
