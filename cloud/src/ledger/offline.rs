//! Offline payments at the ledger: reconciliation of what hubs approved while partitioned (exactly
//! once per payment id), debt, deposits, and the hub signing keys that prove where an offline
//! approval came from. The allowances that bound them are in [`super::allowances`].

use protocol::{
    AccountKind, AccountView, Allowance, Decision, Deposit, OfflinePayment, ReconcileOutcome,
};
use serde::{Deserialize, Serialize};
use storage::kv::{Transactional, TransactionalTree};

use super::{
    abort, allowances::revoke_all, apply_transfer, decode, encode, issuance_account, nonce_key,
    read_all, unwrap_tx, view, AccountRecord, Ledger, NonceRecord, TransferRecord, TxResult,
};
use crate::error::LedgerError;

/// An offline payment the ledger could not apply as approved, kept for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The entry as the hub signed it.
    pub entry: OfflinePayment,
    /// What conflicts.
    pub detail: String,
    /// When it was recorded.
    pub recorded_at_ms: u64,
}

/// An offline payment whose code or token had already paid another payment (shown at two stores
/// while one was partitioned, or copied and replayed there): applied, since the store was promised
/// the money, and kept for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeReuse {
    /// The entry as the hub signed it.
    pub entry: OfflinePayment,
    /// The payment the code or token paid first.
    pub first_payment_id: String,
    /// When it was recorded.
    pub recorded_at_ms: u64,
}

/// What one reconciliation batch did.
#[derive(Debug, Default)]
pub struct Reconciliation {
    /// One outcome per entry, in order.
    pub outcomes: Vec<ReconcileOutcome>,
    /// Allowance revocations to broadcast (accounts that went into debt).
    pub revocations: Vec<Allowance>,
    /// Entries applied although their code or token had paid another payment.
    pub code_reuses: usize,
}

/// An entry's outcome, the revocation to broadcast, the payment its code had already paid.
type Applied = (ReconcileOutcome, Option<Allowance>, Option<String>);

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// Moves a payment the store was promised from the customer to the store: even when the balance
/// no longer covers it (online spending elsewhere meanwhile), and then the account goes into debt
/// and its allowances are revoked everywhere. Shared by offline approvals at reconciliation and
/// by confirmations (posts) of online payments that expired before they came. Returns whether the
/// account is in debt, and the revocation to broadcast.
pub(super) fn apply_promised(
    (accounts, grants, by_account, debts): (
        &TransactionalTree,
        &TransactionalTree,
        &TransactionalTree,
        &TransactionalTree,
    ),
    (account_id, customer): (&str, &mut AccountRecord),
    (store_id, merchant): (&str, &mut AccountRecord),
    amount_minor: i64,
) -> TxResult<(bool, Option<Allowance>)> {
    apply_transfer(
        accounts,
        (account_id, customer),
        (store_id, merchant),
        amount_minor,
    )?;
    let mut revoked = None;
    if customer.balance_minor < 0 {
        if !customer.in_debt {
            customer.in_debt = true;
            debts.insert(account_id.as_bytes(), &[])?;
        }
        revoked = Some(revoke_all(
            customer.currency,
            grants,
            by_account,
            account_id,
            false,
        )?);
    }
    accounts.insert(account_id.as_bytes(), encode(&*customer))?;
    Ok((customer.in_debt, revoked))
}

impl Ledger {
    /// Registers (or replaces) the public key a store's hub signs offline approvals with.
    pub fn set_hub_key(&self, store_id: &str, public_key: &str) -> Result<(), LedgerError> {
        paycode::parse_public_key(public_key).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        let merchant = self
            .accounts
            .get(store_id.as_bytes())
            .map_err(storage)?
            .map(|b| decode::<AccountRecord>(&b));
        if !matches!(
            merchant,
            Some(AccountRecord {
                kind: AccountKind::Merchant,
                ..
            })
        ) {
            return Err(LedgerError::Invalid(format!(
                "store {store_id} has no merchant account"
            )));
        }
        self.hub_keys
            .insert(store_id.as_bytes(), public_key.as_bytes())
            .map_err(storage)?;
        self.flush()
    }

    /// The stores with a key registered for their hub.
    pub fn hub_key_stores(&self) -> Result<Vec<String>, LedgerError> {
        self.hub_keys
            .iter()
            .keys()
            .map(|key| {
                key.map(|k| String::from_utf8_lossy(&k).into_owned())
                    .map_err(storage)
            })
            .collect()
    }

    /// The key registered for a store's hub.
    pub fn hub_key(&self, store_id: &str) -> Result<Option<String>, LedgerError> {
        Ok(self
            .hub_keys
            .get(store_id.as_bytes())
            .map_err(storage)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Applies a batch of a store's offline approvals, each exactly once by payment id, in
    /// transactions of [`ENTRIES_PER_TRANSACTION`] (what each reads is read ahead together), and
    /// flushes once. The signatures of the next transaction's entries are checked on another
    /// core while one transaction applies. A batch that fails is sent again by the hub; what was
    /// applied answers `already_applied`.
    pub fn reconcile(
        &self,
        store_id: &str,
        entries: &[OfflinePayment],
    ) -> Result<Reconciliation, LedgerError> {
        if entries.is_empty() {
            return Ok(Reconciliation::default());
        }
        let key = self.hub_key(store_id)?;
        let key = key.as_deref();
        // A few dozen entries per transaction: a serializable transaction that reads too many
        // rows locks whole pages or the table, and would then conflict with every other writer.
        let per_transaction = self.entries_per_transaction;
        let now_ms = self.clock.now_ms();
        let apply = |part: &[OfflinePayment], checked: Vec<Result<(), String>>| {
            for (entry, check) in part.iter().zip(&checked) {
                if let Err(detail) = check {
                    tracing::warn!(
                        store_id,
                        payment_id = %entry.payment_id,
                        detail,
                        "offline entry rejected"
                    );
                }
            }
            let applied = self.apply_offline(store_id, part, &checked, now_ms)?;
            Ok::<_, LedgerError>(checked.into_iter().zip(applied))
        };
        let mut results = Vec::with_capacity(entries.len());
        if entries.len() <= per_transaction {
            results.extend(apply(entries, check_entries(key, store_id, entries))?);
        } else {
            std::thread::scope(|s| {
                // One transaction's checks ahead: sent in order, dropped unread if one fails.
                let (checks, checked) = std::sync::mpsc::sync_channel(1);
                s.spawn(move || {
                    for part in entries.chunks(per_transaction) {
                        if checks.send(check_entries(key, store_id, part)).is_err() {
                            break;
                        }
                    }
                });
                for part in entries.chunks(per_transaction) {
                    let part_checked = checked
                        .recv()
                        .expect("the checks of every part are sent, in order");
                    results.extend(apply(part, part_checked)?);
                }
                Ok::<_, LedgerError>(())
            })?;
        }
        let mut done = Reconciliation {
            outcomes: Vec::with_capacity(entries.len()),
            ..Reconciliation::default()
        };
        for (entry, (check, applied)) in entries.iter().zip(results) {
            let (outcome, revoked, first_payment) = match (check, applied) {
                (Err(detail), _) => (ReconcileOutcome::Rejected { detail }, None, None),
                (Ok(()), Some(applied)) => applied,
                (Ok(()), None) => unreachable!("every checked entry is applied"),
            };
            if let ReconcileOutcome::Conflict { detail } = &outcome {
                tracing::error!(
                    store_id,
                    payment_id = %entry.payment_id,
                    detail,
                    "offline payment conflict"
                );
            }
            if let Some(first_payment_id) = first_payment {
                tracing::warn!(
                    store_id,
                    payment_id = %entry.payment_id,
                    first_payment_id,
                    "offline payment with a code that had already paid"
                );
                done.code_reuses += 1;
            }
            done.outcomes.push(outcome);
            done.revocations.extend(revoked);
        }
        self.flush()?;
        Ok(done)
    }

    /// Offline payments applied although their code or token had already paid another payment.
    pub fn code_reuses(&self) -> Result<Vec<CodeReuse>, LedgerError> {
        read_all(&self.code_reuse)
    }

    /// Applies the entries that passed their checks in one transaction; for each its outcome,
    /// the revocation to broadcast if the account went into debt, and the payment its code or
    /// token had already paid, if any (`None` for an entry that did not pass).
    fn apply_offline(
        &self,
        store_id: &str,
        entries: &[OfflinePayment],
        checked: &[Result<(), String>],
        now_ms: u64,
    ) -> Result<Vec<Option<Applied>>, LedgerError> {
        let most_owed = self.policy.account_cap_minor;
        let trees = (
            &self.accounts,
            &self.transfers,
            &self.nonces,
            &self.grants,
            &self.grants_by_account,
            &self.debts,
            &self.conflicts,
            &self.code_reuse,
        );
        let valid: Vec<&OfflinePayment> = entries
            .iter()
            .zip(checked)
            .filter(|(_, check)| check.is_ok())
            .map(|(entry, _)| entry)
            .collect();
        let ahead = ReadAhead::of(store_id, &valid);
        unwrap_tx(trees.transaction(|views| {
            let (accounts, transfers, nonces, grants, ..) = views;
            // What the entries read, read together: one round trip on PostgreSQL. Debts,
            // conflicts and code reuses are read only when an entry makes one (rare).
            storage::kv::prefetch_together(&[
                (transfers, &ahead.transfers[..]),
                (accounts, &ahead.accounts[..]),
                (grants, &ahead.grants[..]),
                (nonces, &ahead.nonces[..]),
            ])?;
            let mut results = Vec::with_capacity(entries.len());
            for (entry, check) in entries.iter().zip(checked) {
                results.push(match check {
                    Ok(()) => Some(apply_one(views, store_id, entry, now_ms, most_owed)?),
                    Err(_) => None,
                });
            }
            Ok(results)
        }))
    }

    /// Pays money into a customer account from the issuance account of its currency, once per
    /// deposit id. A deposit that brings an account in debt back to zero or above settles it (it
    /// earns offline allowances again with its next online payment).
    pub fn deposit(&self, account_id: &str, deposit: &Deposit) -> Result<AccountView, LedgerError> {
        protocol::validate_id("deposit_id", &deposit.deposit_id)
            .map_err(|e| LedgerError::Invalid(e.to_string()))?;
        if !(1..=protocol::MAX_AMOUNT_MINOR).contains(&deposit.amount_minor) {
            return Err(LedgerError::Invalid(format!(
                "amount_minor must be from 1 to {}",
                protocol::MAX_AMOUNT_MINOR
            )));
        }
        let transfer_id = format!("deposit:{}", deposit.deposit_id);
        let now_ms = self.clock.now_ms();
        let account = unwrap_tx((&self.accounts, &self.transfers, &self.debts).transaction(
            |(accounts, transfers, debts)| -> TxResult<AccountRecord> {
                let Some(bytes) = accounts.get(account_id.as_bytes())? else {
                    return abort(LedgerError::Invalid(format!("no account {account_id}")));
                };
                let mut account: AccountRecord = decode(&bytes);
                if let Some(done) = transfers.get(transfer_id.as_bytes())? {
                    let done: TransferRecord = decode(&done);
                    return if done.credit_account_id == account_id
                        && done.amount_minor == deposit.amount_minor
                    {
                        Ok(account)
                    } else {
                        abort(LedgerError::Conflict(format!(
                            "deposit {} was already made with other details",
                            deposit.deposit_id
                        )))
                    };
                }
                if account.kind != AccountKind::Customer {
                    return abort(LedgerError::Invalid(format!(
                        "{account_id} is not a customer account"
                    )));
                }
                let issuance = issuance_account(account.currency);
                let mut issuer: AccountRecord = decode(
                    &accounts
                        .get(issuance.as_bytes())?
                        .expect("an account's currency has an issuance account"),
                );
                apply_transfer(
                    accounts,
                    (&issuance, &mut issuer),
                    (account_id, &mut account),
                    deposit.amount_minor,
                )?;
                if account.in_debt && account.balance_minor >= 0 {
                    account.in_debt = false;
                    debts.remove(account_id.as_bytes())?;
                    accounts.insert(account_id.as_bytes(), encode(&account))?;
                }
                let transfer = TransferRecord::issuance(
                    &issuance,
                    account_id,
                    deposit.amount_minor,
                    account.currency,
                    now_ms,
                );
                transfers.insert(transfer_id.as_bytes(), encode(&transfer))?;
                Ok(account)
            },
        ))?;
        self.flush()?;
        Ok(view(account_id, account))
    }

    /// Accounts in debt.
    pub fn debts(&self) -> Result<Vec<AccountView>, LedgerError> {
        let mut out = Vec::new();
        for item in self.debts.iter().keys() {
            let id = item.map_err(storage)?;
            let id = String::from_utf8_lossy(&id).into_owned();
            if let Some(account) = self.account(&id)? {
                out.push(account);
            }
        }
        Ok(out)
    }

    /// Offline payments that could not be applied as approved.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, LedgerError> {
        read_all(&self.conflicts)
    }
}

/// The ledger's trees an offline entry touches, in one transaction.
type OfflineViews = (
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
    TransactionalTree,
);

/// The keys a batch of entries reads, gathered to be read ahead.
struct ReadAhead {
    transfers: Vec<Vec<u8>>,
    accounts: Vec<Vec<u8>>,
    grants: Vec<Vec<u8>>,
    nonces: Vec<Vec<u8>>,
}

impl ReadAhead {
    fn of(store_id: &str, entries: &[&OfflinePayment]) -> Self {
        let mut ahead = ReadAhead {
            transfers: Vec::with_capacity(entries.len()),
            accounts: vec![store_id.as_bytes().to_vec()],
            grants: Vec::with_capacity(entries.len()),
            nonces: Vec::with_capacity(entries.len()),
        };
        for entry in entries {
            let id = &entry.payment_id;
            // `<id>#offline` and `<id>#posted` are not read ahead: they exist only beside a
            // voided transfer under the id itself, and are read when one is found (rare).
            ahead.transfers.push(id.as_bytes().to_vec());
            ahead.accounts.push(entry.account_id.as_bytes().to_vec());
            ahead
                .grants
                .push(super::allowances::store_key(store_id, &entry.account_id));
            for nonce in std::iter::once(&entry.nonce).chain(entry.spent_code.as_ref()) {
                ahead.nonces.push(nonce_key(&entry.account_id, nonce));
            }
        }
        ahead
    }
}

/// Each entry's checks before anything is applied: a hub key registered, the entry of the
/// sending store, its fields, and the hub's signature over it (the entries' signatures checked
/// together: they are most of the CPU a batch costs).
fn check_entries(
    key: Option<&str>,
    store_id: &str,
    entries: &[OfflinePayment],
) -> Vec<Result<(), String>> {
    let Some(key) = key else {
        let missing = format!("no hub key is registered for store {store_id}; kept until one is");
        return entries.iter().map(|_| Err(missing.clone())).collect();
    };
    let mut checked: Vec<Result<(), String>> = entries
        .iter()
        .map(|entry| {
            if entry.store_id != store_id {
                return Err(format!(
                    "entry of store {} sent by store {store_id}",
                    entry.store_id
                ));
            }
            entry.check_from(store_id).map_err(|e| e.to_string())
        })
        .collect();
    let (signed, at): (Vec<&OfflinePayment>, Vec<usize>) = entries
        .iter()
        .zip(&checked)
        .enumerate()
        .filter(|(_, (_, check))| check.is_ok())
        .map(|(i, (entry, _))| (entry, i))
        .unzip();
    for (answer, i) in paycode::hubsig::verify_hub_signatures(key, &signed)
        .into_iter()
        .zip(at)
    {
        if answer.is_err() {
            checked[i] = Err("the hub's signature does not verify".to_owned());
        }
    }
    checked
}

/// Offline entries applied per ledger transaction (a hub's batch is split into as many as it
/// needs; each entry is applied once by its payment id whichever transaction it is in).
pub(super) const ENTRIES_PER_TRANSACTION: usize = 50;

/// Applies one checked entry inside the batch's transaction.
fn apply_one(
    (accounts, transfers, nonces, grants, by_account, debts, conflicts, code_reuse): &OfflineViews,
    store_id: &str,
    entry: &OfflinePayment,
    now_ms: u64,
    most_owed: i64,
) -> TxResult<Applied> {
    let conflict = |detail: String| -> TxResult<Applied> {
        let record = Conflict {
            entry: entry.clone(),
            detail: detail.clone(),
            recorded_at_ms: now_ms,
        };
        conflicts.insert(entry.payment_id.as_bytes(), encode(&record))?;
        Ok((ReconcileOutcome::Conflict { detail }, None, None))
    };
    let same = |t: &TransferRecord| {
        t.debit_account_id == entry.account_id
            && t.credit_account_id == store_id
            && t.amount_minor == entry.amount_minor
            && t.currency == entry.currency
    };
    // The payment id owns one transfer. If an online attempt under it was voided, the
    // offline approval is applied under `<id>#offline`.
    let mut transfer_id = entry.payment_id.to_string();
    if let Some(existing) = transfers.get(transfer_id.as_bytes())? {
        let mut existing: TransferRecord = decode(&existing);
        if existing.voided {
            transfer_id = format!("{}#offline", entry.payment_id);
        } else if same(&existing) {
            // The online attempt reached the ledger after all: the hub's offline
            // approval takes it over, so a void of that attempt cannot reverse it.
            if !existing.offline {
                existing.offline = true;
                existing.posted = true;
                existing.code_nonce = Some(entry.nonce.clone());
                // Final now: its expiry entry is left to find it posted.
                transfers.insert(transfer_id.as_bytes(), encode(&existing))?;
            }
            return Ok((ReconcileOutcome::AlreadyApplied, None, None));
        } else if !existing.posted && !existing.offline {
            // An online attempt with other details is still pending: its void or its
            // expiry may yet move it back. Not a conflict yet: the entry stays in the
            // hub's backlog and is tried again (voids go first).
            return Ok((
                ReconcileOutcome::Rejected {
                    detail: "an online payment with other details is still pending \
                             under this id; tried again later"
                        .into(),
                },
                None,
                None,
            ));
        } else {
            return conflict(format!(
                "payment id already paid with other details ({} from {})",
                existing.currency.format(existing.amount_minor),
                existing.debit_account_id
            ));
        }
        // Charged again already, offline or by a late confirmation: never twice. Such a
        // transfer (`<id>#offline`, `<id>#posted`) is only ever written beside a voided one
        // under the id itself, and no transfer is ever removed: with none under the id,
        // there is none to look for.
        if let Some(again) = super::charged_again(transfers, &entry.payment_id)? {
            return if same(&again) {
                Ok((ReconcileOutcome::AlreadyApplied, None, None))
            } else {
                conflict("payment id already paid offline with other details".into())
            };
        }
    }
    let Some(customer) = accounts.get(entry.account_id.as_bytes())? else {
        return conflict(format!("no account {}", entry.account_id));
    };
    let mut customer: AccountRecord = decode(&customer);
    let Some(merchant) = accounts.get(store_id.as_bytes())? else {
        return conflict(format!("store {store_id} has no merchant account"));
    };
    let mut merchant: AccountRecord = decode(&merchant);
    if customer.kind != AccountKind::Customer {
        return conflict(format!("{} is not a customer account", entry.account_id));
    }
    if customer.currency != entry.currency || merchant.currency != entry.currency {
        return conflict(format!(
            "payment in {} but the account holds {} and the store {}",
            entry.currency, customer.currency, merchant.currency
        ));
    }
    // Whatever grants a store cites, offline payments never take an account further
    // into debt than the account cap: what the grants of every store together may
    // hold unreconciled for it, and so the most honest hubs can owe it.
    if customer.balance_minor.saturating_sub(entry.amount_minor) < -most_owed {
        return conflict(format!(
            "would take {} below -{most_owed}, the most offline payments may owe",
            entry.account_id
        ));
    }
    // Never beyond the grant the cloud issued for it, whatever the hub signed.
    if let Err(detail) = super::allowances::book_offline(
        grants,
        (store_id, &entry.account_id),
        entry.allowance_version,
        entry.amount_minor,
    )? {
        return conflict(detail);
    }
    let (in_debt, revoked) = apply_promised(
        (accounts, grants, by_account, debts),
        (&entry.account_id, &mut customer),
        (store_id, &mut merchant),
        entry.amount_minor,
    )?;
    let transfer = TransferRecord::payment(store_id, &entry.as_request(), true, now_ms);
    transfers.insert(transfer_id.as_bytes(), encode(&transfer))?;
    // The code or token is spent (and the code a code-and-face token's face
    // confirmed, with it): a later online replay of either is refused. If one had
    // already paid another payment, the operator hears of it.
    let mut first_payment = None;
    for nonce in std::iter::once(&entry.nonce).chain(entry.spent_code.as_ref()) {
        let key = nonce_key(&entry.account_id, nonce);
        match nonces.get(&key)? {
            None => {
                let record = NonceRecord {
                    payment_id: entry.payment_id.clone(),
                    decision: Decision::Approved {
                        account_id: entry.account_id.clone(),
                        already_paid: false,
                    },
                    amount: Some((entry.amount_minor, entry.currency)),
                };
                nonces.insert(key, encode(&record))?;
            }
            Some(first) if first_payment.is_none() => {
                let first: NonceRecord = decode(&first);
                if first.payment_id != entry.payment_id
                    && matches!(first.decision, Decision::Approved { .. })
                {
                    let record = CodeReuse {
                        entry: entry.clone(),
                        first_payment_id: first.payment_id.to_string(),
                        recorded_at_ms: now_ms,
                    };
                    code_reuse.insert(entry.payment_id.as_bytes(), encode(&record))?;
                    first_payment = Some(first.payment_id.into_string());
                }
            }
            Some(_) => {}
        }
    }
    Ok((
        ReconcileOutcome::Applied { in_debt },
        revoked,
        first_payment,
    ))
}

#[cfg(test)]
mod tests {
    use paycode::hubsig::HubSigner;

    use crate::ledger::OfflinePolicy;
    use protocol::{
        CloudAuthorize, Currency, DeclineReason, OfflineReservation, OpenAccount, VoidPayment,
    };

    use super::*;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn signer(store: &str) -> HubSigner {
        HubSigner::from_seed(&[store.len() as u8; 32])
    }

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_at(&crate::engines::location(&dir.path().join("ledger")))
            .unwrap()
            .with_offline_policy(OfflinePolicy {
                store_allowance_minor: 5_000,
                account_cap_minor: 8_000,
            });
        for (id, kind, balance) in [
            ("store-1", AccountKind::Merchant, 0),
            ("store-22", AccountKind::Merchant, 0),
            ("alice", AccountKind::Customer, 10_000),
        ] {
            ledger
                .open_account(&OpenAccount {
                    account_id: id.into(),
                    kind,
                    currency: eur(),
                    initial_balance_minor: balance,
                    public_key: None,
                })
                .unwrap();
        }
        for store in ["store-1", "store-22"] {
            ledger
                .set_hub_key(store, &signer(store).public_key_b64())
                .unwrap();
        }
        (dir, ledger)
    }

    fn online(store: &str, order: &str, nonce: &str, amount: i64) -> CloudAuthorize {
        CloudAuthorize {
            evidence: Default::default(),
            payment_id: format!("{store}:{order}").into(),
            account_id: "alice".into(),
            code_nonce: nonce.into(),
            amount_minor: amount,
            currency: eur(),
            terminal_id: "t1".into(),
            order_id: order.into(),
            offline_reservation: Default::default(),
            spent_code: None,
        }
    }

    fn offline(store: &str, seq: u64, order: &str, nonce: &str, amount: i64) -> OfflinePayment {
        let mut entry = OfflinePayment {
            seq,
            payment_id: format!("{store}:{order}").into(),
            store_id: store.into(),
            terminal_id: "t1".into(),
            order_id: order.into(),
            account_id: "alice".into(),
            nonce: nonce.into(),
            amount_minor: amount,
            currency: eur(),
            approved_at_ms: 1,
            allowance_version: 0,
            spent_code: None,
            signature: String::new(),
        };
        signer(store).sign(&mut entry);
        entry
    }

    /// Reconciles entries as their hub would have approved them: under the store's grant for
    /// the account (granted now if it holds none) unless they name one, signed again.
    fn reconcile(l: &Ledger, store: &str, entries: &[OfflinePayment]) -> Reconciliation {
        let granted: Vec<OfflinePayment> = entries
            .iter()
            .map(|entry| {
                let mut entry = entry.clone();
                if entry.allowance_version == 0 {
                    entry.allowance_version = l.current_grant(store, &entry.account_id);
                }
                signer(store).sign(&mut entry);
                entry
            })
            .collect();
        l.reconcile(store, &granted).unwrap()
    }

    fn balance(l: &Ledger, id: &str) -> i64 {
        l.account(id).unwrap().unwrap().balance_minor
    }

    fn books_balance(l: &Ledger) {
        for t in l.totals().unwrap() {
            assert_eq!(t.sum_of_balances_minor, 0);
        }
    }

    fn allowances_follow_online_approvals_within_the_account_cap() {
        let (_d, l) = ledger();
        let (_, a1) = l
            .authorize_with_allowance("store-1", &online("store-1", "o1", "n1", 1_000))
            .unwrap();
        let a1 = a1.unwrap();
        assert_eq!(a1.amount_minor, 5_000);
        assert!(!a1.blocked);
        // The second store gets what the cap leaves: 8000 - 5000.
        let (_, a2) = l
            .authorize_with_allowance("store-22", &online("store-22", "o1", "n2", 1_000))
            .unwrap();
        let a2 = a2.unwrap();
        assert_eq!(a2.amount_minor, 3_000);
        assert!(a2.version > a1.version);
        // A declined payment grants nothing.
        let (d, none) = l
            .authorize_with_allowance("store-1", &online("store-1", "big", "n3", 1_000_000))
            .unwrap();
        assert_eq!(d.reason(), Some(DeclineReason::InsufficientFunds));
        assert!(none.is_none());
        // Never above the balance: spend down to 2000, the next grant is 2000.
        l.authorize("store-1", &online("store-1", "o2", "n4", 5_999))
            .unwrap();
        let (_, a3) = l
            .authorize_with_allowance("store-1", &online("store-1", "o3", "n5", 1))
            .unwrap();
        assert_eq!(a3.unwrap().amount_minor, 2_000);
        let (page, more) = l.allowances("store-1", None).unwrap();
        assert!(more.is_none());
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].amount_minor, 2_000);
        assert!(l.allowances("store-9", None).unwrap().0.is_empty());
    }

    fn an_offline_payment_is_applied_once_and_a_resend_moves_nothing() {
        let (_d, l) = ledger();
        let batch = vec![
            offline("store-1", 1, "o1", "n1", 1_200),
            offline("store-1", 2, "o2", "n2", 300),
        ];
        let Reconciliation {
            outcomes,
            revocations: revoked,
            ..
        } = reconcile(&l, "store-1", &batch);
        assert_eq!(
            outcomes,
            vec![ReconcileOutcome::Applied { in_debt: false }; 2]
        );
        assert!(revoked.is_empty());
        assert_eq!(balance(&l, "alice"), 8_500);
        assert_eq!(balance(&l, "store-1"), 1_500);
        // The hub restarted before retiring them: it sends them again.
        let Reconciliation {
            outcomes: again, ..
        } = reconcile(&l, "store-1", &batch);
        assert_eq!(again, vec![ReconcileOutcome::AlreadyApplied; 2]);
        assert_eq!(balance(&l, "alice"), 8_500);
        // The code is spent: an online replay is refused.
        let replay = l
            .authorize("store-22", &online("store-22", "x", "n1", 100))
            .unwrap();
        assert_eq!(replay.reason(), Some(DeclineReason::CodeReplayed));
        books_balance(&l);
    }

    /// A batch is one transaction on every engine: its entries are applied in order, each
    /// seeing those before it (a copy of an entry already in the batch moves nothing, another
    /// entry under its payment id conflicts), and the one whose signature fails is left out.
    fn one_batch_applies_its_entries_in_order_each_once() {
        let (_d, l) = ledger();
        let version = l.current_grant("store-1", "alice");
        let entry = |seq: u64, order: &str, nonce: &str, amount: i64| {
            let mut entry = offline("store-1", seq, order, nonce, amount);
            entry.allowance_version = version;
            signer("store-1").sign(&mut entry);
            entry
        };
        let first = entry(1, "o1", "n1", 1_000);
        let mut forged = entry(2, "o2", "n2", 500);
        forged.amount_minor = 5;
        let batch = [
            first.clone(),
            forged,
            first,
            entry(3, "o1", "n3", 999),
            entry(4, "o4", "n4", 200),
        ];
        let Reconciliation { outcomes, .. } = l.reconcile("store-1", &batch).unwrap();
        assert!(
            matches!(
                outcomes.as_slice(),
                [
                    ReconcileOutcome::Applied { in_debt: false },
                    ReconcileOutcome::Rejected { .. },
                    ReconcileOutcome::AlreadyApplied,
                    ReconcileOutcome::Conflict { .. },
                    ReconcileOutcome::Applied { in_debt: false },
                ]
            ),
            "{outcomes:?}"
        );
        assert_eq!(balance(&l, "alice"), 10_000 - 1_200);
        assert_eq!(balance(&l, "store-1"), 1_200);
        assert_eq!(l.conflicts().unwrap().len(), 1);
        // The whole batch again: nothing moves, the conflict is not recorded twice.
        let Reconciliation { outcomes, .. } = l.reconcile("store-1", &batch).unwrap();
        assert_eq!(outcomes[0], ReconcileOutcome::AlreadyApplied);
        assert_eq!(outcomes[4], ReconcileOutcome::AlreadyApplied);
        assert_eq!(balance(&l, "alice"), 10_000 - 1_200);
        assert_eq!(l.conflicts().unwrap().len(), 1);
        books_balance(&l);
    }

    /// A batch large enough to have its signatures checked on several threads keeps each
    /// outcome at its entry's place.
    fn a_large_batch_keeps_each_outcome_at_its_entry() {
        let (_d, l) = ledger();
        let version = l.current_grant("store-1", "alice");
        let batch: Vec<OfflinePayment> = (0..150u64)
            .map(|i| {
                let mut entry = offline("store-1", i + 1, &format!("o{i}"), &format!("n{i}"), 10);
                entry.allowance_version = version;
                signer("store-1").sign(&mut entry);
                if i % 7 == 3 {
                    entry.amount_minor = 11; // altered after signing
                }
                entry
            })
            .collect();
        let Reconciliation { outcomes, .. } = l.reconcile("store-1", &batch).unwrap();
        assert_eq!(outcomes.len(), 150);
        for (i, outcome) in outcomes.iter().enumerate() {
            if i % 7 == 3 {
                assert!(
                    matches!(outcome, ReconcileOutcome::Rejected { .. }),
                    "{i}: {outcome:?}"
                );
            } else {
                assert_eq!(
                    *outcome,
                    ReconcileOutcome::Applied { in_debt: false },
                    "{i}"
                );
            }
        }
        let applied = (0..150).filter(|i| i % 7 != 3).count() as i64;
        assert_eq!(balance(&l, "store-1"), applied * 10);
        books_balance(&l);
    }

    fn a_store_never_books_more_offline_than_the_cloud_granted_it() {
        let (_d, l) = ledger();
        let signed = |seq: u64, order: &str, amount: i64, version: u64| {
            let mut entry = offline("store-1", seq, order, &format!("n-{order}"), amount);
            entry.allowance_version = version;
            signer("store-1").sign(&mut entry);
            entry
        };
        let outcome = |entry: OfflinePayment| {
            let done = l.reconcile("store-1", &[entry]).unwrap();
            done.outcomes[0].clone()
        };
        // No grant at all, or one the cloud never issued: kept for the operator, nothing moves.
        assert!(matches!(
            outcome(signed(1, "o1", 100, 0)),
            ReconcileOutcome::Conflict { .. }
        ));
        let (_, first) = l
            .authorize_with_allowance("store-1", &online("store-1", "p1", "pn1", 100))
            .unwrap();
        let first = first.unwrap();
        assert_eq!(first.amount_minor, 5_000);
        assert!(matches!(
            outcome(signed(2, "o2", 100, first.version + 1_000)),
            ReconcileOutcome::Conflict { .. }
        ));
        // Under the grant: 3000 fits, a second 3000 does not (whatever the hub held or reported
        // between them), 2000 still does.
        assert!(matches!(
            outcome(signed(3, "o3", 3_000, first.version)),
            ReconcileOutcome::Applied { .. }
        ));
        let resend = signed(3, "o3", 3_000, first.version);
        assert_eq!(outcome(resend), ReconcileOutcome::AlreadyApplied);
        let ReconcileOutcome::Conflict { detail } = outcome(signed(4, "o4", 3_000, first.version))
        else {
            panic!("beyond the grant must be a conflict");
        };
        assert!(detail.contains("beyond its allowance"), "{detail}");
        // A newer grant does not void the older one for what was approved under it.
        let (_, second) = l
            .authorize_with_allowance("store-1", &online("store-1", "p2", "pn2", 100))
            .unwrap();
        assert!(second.unwrap().version > first.version);
        assert!(matches!(
            outcome(signed(5, "o5", 2_000, first.version)),
            ReconcileOutcome::Applied { .. }
        ));
        assert_eq!(balance(&l, "alice"), 10_000 - 200 - 3_000 - 2_000);
        // The sync tells the hub what its grant has booked already.
        let (page, _) = l.allowances("store-1", None).unwrap();
        assert_eq!(page[0].booked_minor, 0);
        let current = page[0].version;
        assert!(matches!(
            outcome(signed(6, "o6", 700, current)),
            ReconcileOutcome::Applied { .. }
        ));
        let (page, _) = l.allowances("store-1", None).unwrap();
        assert_eq!((page[0].version, page[0].booked_minor), (current, 700));
        // The hub reports that no unreconciled entry cites a grant older than the current one:
        // the older ones are forgotten, and an entry citing one is kept for the operator.
        let mut report = online("store-1", "p3", "pn3", 100);
        report.offline_reservation = OfflineReservation {
            amount_minor: 0,
            allowance_version: current,
            oldest_version: current,
        };
        l.authorize_with_allowance("store-1", &report).unwrap();
        assert!(matches!(
            outcome(signed(7, "o7", 100, first.version)),
            ReconcileOutcome::Conflict { .. }
        ));
        assert!(matches!(
            outcome(signed(8, "o8", 100, current)),
            ReconcileOutcome::Applied { .. }
        ));
        assert_eq!(l.conflicts().unwrap().len(), 4);
        assert_eq!(
            balance(&l, "alice"),
            10_000 - 300 - 3_000 - 2_000 - 700 - 100
        );
        books_balance(&l);
    }

    fn offline_payments_never_take_an_account_below_minus_the_account_cap() {
        // A store holding several grants at once (a hub that stole them all, say) books each
        // within its own budget, but never past what the account may owe: the cap (8000).
        let (_d, l) = ledger();
        let grant = |order: &str, amount: i64| {
            let (_, granted) = l
                .authorize_with_allowance(
                    "store-1",
                    &online("store-1", order, &format!("n-{order}"), amount),
                )
                .unwrap();
            granted.unwrap()
        };
        let (v1, v2) = (grant("p1", 100), grant("p2", 100));
        assert_eq!((v1.amount_minor, v2.amount_minor), (5_000, 5_000));
        grant("p3", 9_700);
        assert_eq!(balance(&l, "alice"), 100);
        let entry = |seq: u64, amount: i64, version: u64| {
            let mut e = offline(
                "store-1",
                seq,
                &format!("o{seq}"),
                &format!("x{seq}"),
                amount,
            );
            e.allowance_version = version;
            signer("store-1").sign(&mut e);
            e
        };
        let outcomes = l
            .reconcile(
                "store-1",
                &[
                    entry(1, 5_000, v1.version),
                    entry(2, 5_000, v2.version),
                    entry(3, 3_000, v2.version),
                ],
            )
            .unwrap()
            .outcomes;
        assert!(matches!(
            outcomes[0],
            ReconcileOutcome::Applied { in_debt: true }
        ));
        let ReconcileOutcome::Conflict { detail } = &outcomes[1] else {
            panic!("past the cap: {outcomes:?}");
        };
        assert!(detail.contains("-8000"), "{detail}");
        assert!(matches!(outcomes[2], ReconcileOutcome::Applied { .. }));
        assert_eq!(balance(&l, "alice"), 100 - 5_000 - 3_000);
        books_balance(&l);
    }

    fn entries_without_a_valid_hub_signature_are_kept_out() {
        let (_d, l) = ledger();
        let mut forged = offline("store-1", 1, "o1", "n1", 1_000);
        forged.amount_minor = 1;
        let Reconciliation { outcomes, .. } = l.reconcile("store-1", &[forged]).unwrap();
        assert!(matches!(outcomes[0], ReconcileOutcome::Rejected { .. }));
        // Signed by store-22's hub, sent by store-1.
        let other = offline("store-22", 1, "o1", "n1", 1_000);
        let Reconciliation { outcomes, .. } = l.reconcile("store-1", &[other]).unwrap();
        assert!(matches!(outcomes[0], ReconcileOutcome::Rejected { .. }));
        // No key registered for the store.
        l.open_account(&OpenAccount {
            account_id: "store-3".into(),
            kind: AccountKind::Merchant,
            currency: eur(),
            initial_balance_minor: 0,
            public_key: None,
        })
        .unwrap();
        let Reconciliation { outcomes, .. } = l
            .reconcile("store-3", &[offline("store-3", 1, "o1", "n1", 1)])
            .unwrap();
        assert!(matches!(outcomes[0], ReconcileOutcome::Rejected { .. }));
        assert_eq!(balance(&l, "alice"), 10_000);
        assert!(l
            .set_hub_key("nobody", &signer("x").public_key_b64())
            .is_err());
        assert!(l.set_hub_key("store-1", "not a key").is_err());
    }

    fn an_online_attempt_and_its_offline_approval_move_the_money_once_in_any_order() {
        // The online attempt reached the ledger, then the hub (which got no answer) approved the
        // same payment offline; the void of the online attempt comes last and reverses nothing.
        let (_d, l) = ledger();
        l.authorize("store-1", &online("store-1", "o1", "n1", 1_000))
            .unwrap();
        let Reconciliation { outcomes, .. } =
            reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n1", 1_000)]);
        assert_eq!(outcomes, vec![ReconcileOutcome::AlreadyApplied]);
        let void = VoidPayment {
            payment_id: "store-1:o1".into(),
            account_id: "alice".into(),
            code_nonce: "n1".into(),
        };
        assert!(!l.void("store-1", &void).unwrap());
        assert_eq!(balance(&l, "alice"), 9_000);
        // One payment's attempts share its code: no reuse.
        assert!(l.code_reuses().unwrap().is_empty());

        // The offline approval first, the late online attempt after: already paid.
        let (_d2, l) = ledger();
        reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n1", 1_000)]);
        let late = l
            .authorize("store-1", &online("store-1", "o1", "n0", 1_000))
            .unwrap();
        assert!(matches!(
            late,
            Decision::Approved {
                already_paid: true,
                ..
            }
        ));
        let void = VoidPayment {
            code_nonce: "n0".into(),
            ..void.clone()
        };
        assert!(!l.void("store-1", &void).unwrap());
        assert_eq!(balance(&l, "alice"), 9_000);

        // An earlier attempt was voided (money moved back); the offline approval of the same
        // order is applied under its own id.
        let (_d3, l) = ledger();
        l.authorize("store-1", &online("store-1", "o1", "n0", 1_000))
            .unwrap();
        assert!(l.void("store-1", &void).unwrap());
        let Reconciliation { outcomes, .. } =
            reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n1", 1_000)]);
        assert_eq!(outcomes, vec![ReconcileOutcome::Applied { in_debt: false }]);
        let Reconciliation {
            outcomes: again, ..
        } = reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n1", 1_000)]);
        assert_eq!(again, vec![ReconcileOutcome::AlreadyApplied]);
        assert_eq!(balance(&l, "alice"), 9_000);
        books_balance(&l);
    }

    fn a_code_that_already_paid_elsewhere_is_applied_and_kept_for_the_operator() {
        let (_d, l) = ledger();
        // The same code paid online at store-22, then offline at partitioned store-1.
        l.authorize("store-22", &online("store-22", "o1", "n1", 1_000))
            .unwrap();
        // A code tried online and declined paid nothing: its offline use is no reuse.
        let declined = l
            .authorize("store-22", &online("store-22", "o2", "n2", 1_000_000))
            .unwrap();
        assert_eq!(declined.reason(), Some(DeclineReason::InsufficientFunds));
        let done = reconcile(
            &l,
            "store-1",
            &[
                offline("store-1", 1, "o1", "n1", 700),
                offline("store-1", 2, "o2", "n2", 300),
                offline("store-1", 3, "o3", "n3", 200),
            ],
        );
        assert_eq!(
            done.outcomes,
            vec![ReconcileOutcome::Applied { in_debt: false }; 3]
        );
        assert_eq!(done.code_reuses, 1);
        assert_eq!(balance(&l, "alice"), 10_000 - 1_000 - 700 - 300 - 200);
        let reuses = l.code_reuses().unwrap();
        assert_eq!(reuses.len(), 1);
        assert_eq!(reuses[0].entry.payment_id, "store-1:o1");
        assert_eq!(reuses[0].first_payment_id, "store-22:o1");
        // A resend of the batch is no new reuse.
        let again = reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n1", 700)]);
        assert_eq!(again.outcomes, vec![ReconcileOutcome::AlreadyApplied]);
        assert_eq!(again.code_reuses, 0);
        assert_eq!(l.code_reuses().unwrap().len(), 1);
        books_balance(&l);
    }

    fn the_same_order_with_other_details_is_a_conflict_kept_for_the_operator() {
        let (_d, l) = ledger();
        l.authorize("store-1", &online("store-1", "o1", "n1", 1_000))
            .unwrap();
        // While the online payment is pending (its void or expiry may still move it back) the
        // entry is refused for now and stays in the hub's backlog.
        let Reconciliation { outcomes, .. } =
            reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n2", 999)]);
        assert!(matches!(outcomes[0], ReconcileOutcome::Rejected { .. }));
        assert!(l.conflicts().unwrap().is_empty());
        // Once it is posted, it is final: a conflict for the operator.
        let post = VoidPayment {
            payment_id: "store-1:o1".into(),
            account_id: "alice".into(),
            code_nonce: "n1".into(),
        };
        assert!(l.post("store-1", &post).unwrap());
        let Reconciliation { outcomes, .. } =
            reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n2", 999)]);
        assert!(matches!(outcomes[0], ReconcileOutcome::Conflict { .. }));
        let conflicts = l.conflicts().unwrap();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].entry.amount_minor, 999);
        assert_eq!(balance(&l, "alice"), 9_000);
    }

    fn an_offline_entry_waits_out_a_pending_online_attempt_and_applies_once_it_is_voided() {
        // Found by review: a pending online attempt with other details made the offline approval
        // a permanent conflict, though its void moved the money back a moment later.
        let (_d, l) = ledger();
        l.authorize("store-1", &online("store-1", "o1", "n1", 1_000))
            .unwrap();
        let entry = offline("store-1", 1, "o1", "n2", 999);
        let first = reconcile(&l, "store-1", std::slice::from_ref(&entry));
        assert!(matches!(
            first.outcomes[0],
            ReconcileOutcome::Rejected { .. }
        ));
        let void = VoidPayment {
            payment_id: "store-1:o1".into(),
            account_id: "alice".into(),
            code_nonce: "n1".into(),
        };
        assert!(l.void("store-1", &void).unwrap());
        let second = reconcile(&l, "store-1", &[entry]);
        assert!(matches!(
            second.outcomes[0],
            ReconcileOutcome::Applied { .. }
        ));
        assert_eq!(balance(&l, "alice"), 10_000 - 999);
        assert!(l.conflicts().unwrap().is_empty());
        books_balance(&l);
    }

    fn an_uncovered_offline_payment_is_applied_into_debt_until_a_deposit_settles_it() {
        let (_d, l) = ledger();
        l.authorize("store-1", &online("store-1", "o0", "n0", 1))
            .unwrap();
        l.authorize("store-22", &online("store-22", "o0", "m0", 1))
            .unwrap();
        // Spent online elsewhere meanwhile: 9500 of 10000 (with the two payments of 1 above).
        l.authorize("store-22", &online("store-22", "big", "m1", 9_498))
            .unwrap();
        let Reconciliation {
            outcomes,
            revocations: revoked,
            ..
        } = reconcile(&l, "store-1", &[offline("store-1", 1, "o1", "n1", 2_000)]);
        assert_eq!(outcomes, vec![ReconcileOutcome::Applied { in_debt: true }]);
        assert_eq!(balance(&l, "alice"), -1_500);
        assert_eq!(revoked.len(), 1);
        assert!(revoked[0].blocked);
        let alice = l.account("alice").unwrap().unwrap();
        assert!(alice.in_debt);
        assert_eq!(l.debts().unwrap().len(), 1);
        // Every store lists it blocked (a hub that missed the broadcast learns it on its next
        // sync); online payments are refused.
        for store in ["store-1", "store-22"] {
            let (page, _) = l.allowances(store, None).unwrap();
            assert_eq!(page.len(), 1);
            assert!(page[0].blocked);
            assert_eq!(page[0].amount_minor, 0);
            assert_eq!(page[0].version, revoked[0].version);
        }
        let refused = l
            .authorize("store-1", &online("store-1", "o2", "n2", 1))
            .unwrap();
        assert_eq!(refused.reason(), Some(DeclineReason::InsufficientFunds));

        // A partial deposit leaves it in debt; settling it clears the flag, once per id.
        let d1 = Deposit {
            deposit_id: "d1".into(),
            amount_minor: 1_000,
        };
        assert!(l.deposit("alice", &d1).unwrap().in_debt);
        let d2 = Deposit {
            deposit_id: "d2".into(),
            amount_minor: 600,
        };
        let settled = l.deposit("alice", &d2).unwrap();
        assert!(!settled.in_debt);
        assert_eq!(settled.balance_minor, 100);
        assert_eq!(l.deposit("alice", &d2).unwrap().balance_minor, 100);
        let other = Deposit {
            amount_minor: 5,
            ..d2.clone()
        };
        assert!(matches!(
            l.deposit("alice", &other),
            Err(LedgerError::Conflict(_))
        ));
        assert!(l.debts().unwrap().is_empty());
        // Settled, it earns an allowance again with its next online payment.
        let (_, grant) = l
            .authorize_with_allowance("store-1", &online("store-1", "o3", "n3", 1))
            .unwrap();
        assert_eq!(grant.unwrap().amount_minor, 99);
        books_balance(&l);
    }

    fn closing_an_account_revokes_its_allowances() {
        let (_d, l) = ledger();
        l.authorize("store-1", &online("store-1", "o0", "n0", 1))
            .unwrap();
        l.close_account("alice").unwrap();
        let revoked = l.revoke_allowances("alice").unwrap().unwrap();
        assert!(revoked.blocked);
        // Closed for good: no store lists it (a hub that missed the broadcast forgets it on its
        // next sync; the account's key is revoked as well).
        assert!(l.allowances("store-1", None).unwrap().0.is_empty());
    }

    /// An online payment at `store` from a hub that holds `held` unreconciled for alice and the
    /// allowance `holds` (none: `None`); returns the refreshed allowance.
    fn refresh(
        l: &Ledger,
        store: &str,
        order: &str,
        amount: i64,
        held: i64,
        holds: Option<&Allowance>,
    ) -> Allowance {
        let mut request = online(store, order, &format!("{store}-{order}"), amount);
        request.offline_reservation = OfflineReservation {
            amount_minor: held.max(holds.map_or(0, |a| a.amount_minor)),
            allowance_version: holds.map_or(0, |a| a.version),
            oldest_version: 0,
        };
        let (decision, allowance) = l.authorize_with_allowance(store, &request).unwrap();
        assert!(
            matches!(decision, Decision::Approved { .. }),
            "{decision:?}"
        );
        allowance.unwrap()
    }

    fn deposit(l: &Ledger, id: &str, amount: i64) {
        let d = Deposit {
            deposit_id: id.into(),
            amount_minor: amount,
        };
        l.deposit("alice", &d).unwrap();
    }

    fn a_store_keeps_counting_what_it_holds_when_its_grant_shrinks() {
        // Cap 8000, 5000 a store, alice holds 10000.
        let (_d, l) = ledger();
        let a1 = refresh(&l, "store-1", "o1", 1, 0, None);
        assert_eq!(a1.amount_minor, 5_000);
        // Partitioned, store-1 approves its whole 5000 offline and cannot reconcile yet.
        let held_at_1 = 5_000;
        // Online spending at store-22 leaves 2000 (each refresh is a payment of 1).
        let b1 = refresh(&l, "store-22", "o1", 1, 0, None);
        assert_eq!(b1.amount_minor, 3_000);
        let b2 = refresh(&l, "store-22", "o2", 7_998, 0, Some(&b1));
        assert_eq!(b2.amount_minor, 2_000);
        // store-1 is back online before its drain finished: its grant shrinks to the balance
        // (2000 less its own payment of 1), but it still holds 5000.
        let a2 = refresh(&l, "store-1", "o2", 1, held_at_1, Some(&a1));
        assert_eq!(a2.amount_minor, 1_999);
        // Money comes in. store-22 gets only what store-1's 5000 leaves of the cap.
        deposit(&l, "d1", 10_000);
        let b3 = refresh(&l, "store-22", "o3", 1, 0, Some(&b2));
        assert_eq!(b3.amount_minor, 3_000);
        // store-1's entries are applied; it reports holding only its grant: the cap frees up.
        let entries = [offline("store-1", 1, "x1", "xn1", held_at_1)];
        reconcile(&l, "store-1", &entries);
        let a3 = refresh(&l, "store-1", "o3", 1, 0, Some(&a2));
        assert_eq!(a3.amount_minor, 5_000);
        // store-22 (holding 3000) now gets the rest only.
        let b4 = refresh(&l, "store-22", "o4", 1, 0, Some(&b3));
        assert_eq!(b4.amount_minor, 3_000);
        books_balance(&l);
    }

    fn a_grant_still_on_its_way_to_a_store_stays_counted() {
        let (_d, l) = ledger();
        // Spending leaves 2000: store-1's grant is 2000.
        let a1 = refresh(&l, "store-1", "o1", 8_000, 0, None);
        assert_eq!(a1.amount_minor, 2_000);
        // Money comes in. Two payments at store-1 in flight at once, both reporting a1: the first
        // answer grants 5000 and has not reached the hub when the second shrinks the grant to
        // the balance again.
        deposit(&l, "d1", 10_000);
        let a2 = refresh(&l, "store-1", "o2", 1, 0, Some(&a1));
        assert_eq!(a2.amount_minor, 5_000);
        let a3 = refresh(&l, "store-1", "o3", 9_999, 0, Some(&a1));
        assert_eq!(a3.amount_minor, 2_000);
        // Until a3 reaches the hub it may act on a2 (5000): store-22 gets 8000 - 5000.
        deposit(&l, "d2", 10_000);
        let b1 = refresh(&l, "store-22", "o1", 1, 0, None);
        assert_eq!(b1.amount_minor, 3_000);
        // store-1 reports holding a3: what store-22 holds leaves it 5000, the cap is full.
        let a4 = refresh(&l, "store-1", "o4", 1, 0, Some(&a3));
        assert_eq!(a4.amount_minor, 5_000);
        let b2 = refresh(&l, "store-22", "o2", 1, 0, Some(&b1));
        assert_eq!(b2.amount_minor, 3_000);
        books_balance(&l);
    }

    fn a_revoked_store_stays_counted_until_it_reports() {
        let (_d, l) = ledger();
        let a1 = refresh(&l, "store-1", "o1", 1, 0, None);
        let b1 = refresh(&l, "store-22", "o1", 1, 0, None);
        assert_eq!((a1.amount_minor, b1.amount_minor), (5_000, 3_000));
        // store-22 spends online, then reconciles an offline payment it can no longer cover:
        // debt, revocation everywhere. store-1 is partitioned and has not heard of it.
        refresh(&l, "store-22", "o2", 9_000, 0, Some(&b1));
        let mut entries = [offline("store-22", 1, "x1", "xn1", 3_000)];
        entries[0].allowance_version = b1.version;
        let Reconciliation {
            revocations: revoked,
            ..
        } = reconcile(&l, "store-22", &entries);
        let revoked = revoked[0].clone();
        deposit(&l, "d1", 10_000);
        // Settled. store-22 earns only what store-1 (still possibly spending 5000) leaves.
        let b2 = refresh(&l, "store-22", "o3", 1, 0, Some(&revoked));
        assert_eq!(b2.amount_minor, 3_000);
        // store-1 reconnects having spent nothing and heard the revocation: it counts its new
        // grant only, what store-22 holds (3000) leaves it 5000.
        let a2 = refresh(&l, "store-1", "o2", 1, 0, Some(&revoked));
        assert_eq!(a2.amount_minor, 5_000);
        books_balance(&l);
    }

    crate::engines::on_each_engine!(
        allowances_follow_online_approvals_within_the_account_cap,
        an_offline_payment_is_applied_once_and_a_resend_moves_nothing,
        one_batch_applies_its_entries_in_order_each_once,
        a_large_batch_keeps_each_outcome_at_its_entry,
        a_store_never_books_more_offline_than_the_cloud_granted_it,
        offline_payments_never_take_an_account_below_minus_the_account_cap,
        entries_without_a_valid_hub_signature_are_kept_out,
        an_online_attempt_and_its_offline_approval_move_the_money_once_in_any_order,
        a_code_that_already_paid_elsewhere_is_applied_and_kept_for_the_operator,
        the_same_order_with_other_details_is_a_conflict_kept_for_the_operator,
        an_offline_entry_waits_out_a_pending_online_attempt_and_applies_once_it_is_voided,
        an_uncovered_offline_payment_is_applied_into_debt_until_a_deposit_settles_it,
        closing_an_account_revokes_its_allowances,
        a_store_keeps_counting_what_it_holds_when_its_grant_shrinks,
        a_grant_still_on_its_way_to_a_store_stays_counted,
        a_revoked_store_stays_counted_until_it_reports,
    );
}
