//! The double-entry ledger of record, in `sled`.
//!
//! Every movement of money is one transfer from a debit account to a credit account; balances are
//! the sum of the transfers touching an account. Money enters the system only through an
//! issuance account per currency (whose balance is minus everything issued), so the sum of all
//! balances is always zero. A payment's id is its transfer's idempotency key: applying the same
//! payment again moves nothing and answers as the first time; the same id with other fields is
//! refused (TigerBeetle's rule). Declined payments write no transfer.
//!
//! All writes of one operation happen in one sled transaction and are flushed to disk before the
//! caller hears the result.

use std::path::Path;

use protocol::{
    AccountId, AccountKind, AccountView, Allowance, CloudAuthorize, CodeNonce, Currency, Decision,
    DeclineReason, KeyEntry, LedgerTotals, OpenAccount, PaymentId, PaymentStatus, StoreId,
    TransferView, VoidPayment,
};
use serde::{Deserialize, Serialize};
use storage::kv::{ConflictableTransactionError, TransactionError, Transactional};

use crate::error::LedgerError;

mod accounts;
mod allowances;
mod offline;
mod payments;
mod queries;
mod refunds;

pub use allowances::{OfflinePolicy, ALLOWANCE_PAGE};
pub use offline::{CodeReuse, Conflict, Reconciliation};

/// How long an online payment waits for its post before the cloud moves it back: a day, so that
/// a hub cut off for hours still confirms what it approved.
pub const DEFAULT_PENDING_TTL_MS: u64 = 24 * 3600 * 1000;

fn pending_key(deadline_ms: u64, payment_id: &str) -> Vec<u8> {
    let mut key = deadline_ms.to_be_bytes().to_vec();
    key.extend_from_slice(payment_id.as_bytes());
    key
}

/// A post that came after its payment expired or was voided: the register heard "approved" and
/// the money is not in the store's account. For the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatePost {
    /// The store.
    pub store_id: StoreId,
    /// The post.
    pub post: protocol::PostPayment,
    /// When it came.
    pub recorded_at_ms: u64,
}

/// Most key changes returned by one [`Ledger::keys_after`] call.
pub const KEY_BATCH_MAX: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct AccountRecord {
    kind: AccountKind,
    currency: Currency,
    balance_minor: i64,
    public_key: Option<String>,
    /// Set when the customer is erased: no more payments.
    #[serde(default)]
    closed: bool,
    /// Offline payments took the balance below zero; cleared by a deposit that settles it.
    #[serde(default)]
    in_debt: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct TransferRecord {
    debit_account_id: AccountId,
    credit_account_id: AccountId,
    amount_minor: i64,
    currency: Currency,
    applied_at_ms: u64,
    code_nonce: Option<CodeNonce>,
    store_id: Option<StoreId>,
    terminal_id: Option<protocol::TerminalId>,
    order_id: Option<protocol::OrderId>,
    voided: bool,
    /// Approved by a hub offline and applied at reconciliation: only that hub's journal owns it,
    /// so a void of an earlier online attempt no longer reverses it.
    #[serde(default)]
    offline: bool,
    /// The nonces of the online attempts told "approved" for this payment and not voided since
    /// (empty in records written before it was kept: then `code_nonce` alone). The money moves
    /// back only when the last of them is voided: any one of them may be the answer the
    /// register heard.
    #[serde(default)]
    approved_nonces: Vec<CodeNonce>,
    /// Final: the hub confirmed it (or it was issued, or applied from an offline approval). A
    /// payment not posted is pending: a void moves it back, and so does its expiry.
    #[serde(default)]
    posted: bool,
    /// When a pending payment expires (the cloud moves it back itself: the hub that asked for it
    /// died or lost its disk before confirming it). Absent in records written before it existed.
    #[serde(default)]
    pending_until_ms: Option<u64>,
    /// Moved back by its expiry (not by a void): the attempts that held it then. A post from one
    /// of them still charges it, as `<payment id>#posted`.
    #[serde(default)]
    expired_holders: Vec<CodeNonce>,
    /// What refunds gave back of this payment so far (never more than `amount_minor`).
    #[serde(default)]
    refunded_minor: i64,
}

impl TransferRecord {
    /// The attempts told "approved" for this payment and not voided.
    fn holders(&self) -> Vec<CodeNonce> {
        if self.approved_nonces.is_empty() {
            self.code_nonce.iter().cloned().collect()
        } else {
            self.approved_nonces.clone()
        }
    }
}

impl TransferRecord {
    /// Money issued into an account: its opening balance, a deposit.
    fn issuance(
        issuer: &str,
        account_id: &str,
        amount_minor: i64,
        currency: Currency,
        at_ms: u64,
    ) -> Self {
        TransferRecord {
            debit_account_id: issuer.into(),
            credit_account_id: account_id.into(),
            amount_minor,
            currency,
            applied_at_ms: at_ms,
            code_nonce: None,
            store_id: None,
            terminal_id: None,
            order_id: None,
            voided: false,
            offline: false,
            approved_nonces: Vec::new(),
            posted: true,
            pending_until_ms: None,
            expired_holders: Vec::new(),
            refunded_minor: 0,
        }
    }

    /// A customer's payment to a store, approved online or (`offline`) by the store's hub alone.
    fn payment(store_id: &str, request: &CloudAuthorize, offline: bool, at_ms: u64) -> Self {
        TransferRecord {
            debit_account_id: request.account_id.clone(),
            credit_account_id: store_id.into(),
            amount_minor: request.amount_minor,
            currency: request.currency,
            applied_at_ms: at_ms,
            code_nonce: Some(request.code_nonce.clone()),
            store_id: Some(store_id.into()),
            terminal_id: Some(request.terminal_id.clone()),
            order_id: Some(request.order_id.clone()),
            voided: false,
            offline,
            approved_nonces: vec![request.code_nonce.clone()],
            // An offline approval is final when applied; an online one waits for its post.
            posted: offline,
            pending_until_ms: None,
            expired_holders: Vec::new(),
            refunded_minor: 0,
        }
    }
}

/// What became of a code nonce: the payment it was presented for, and the decision then.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct NonceRecord {
    payment_id: PaymentId,
    decision: Decision,
    /// The amount and currency the nonce was presented with (absent in records written before
    /// they were kept): a repeat with other details is not the same request.
    #[serde(default)]
    amount: Option<(i64, Currency)>,
}

/// Why the payer of an attempt that would move money was not proven (see
/// [`Ledger::authorize_proving`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PayerRefusal {
    /// The evidence does not prove the payer: the attempt is declined so, and recorded.
    Declined(Decision),
    /// The proof could not be checked (storage): nothing is recorded, the request fails (the
    /// hub voids the attempt).
    Unavailable(String),
}

/// Checks the payer of an attempt that would move money, given the account's payment key (see
/// [`Ledger::authorize_proving`]).
pub type ProvePayer<'a> = dyn Fn(&CloudAuthorize, Option<&str>) -> Result<(), PayerRefusal> + 'a;

/// The ledger database. Clones share the same database.
#[derive(Clone)]
pub struct Ledger {
    db: storage::kv::Db,
    accounts: storage::kv::Tree,
    transfers: storage::kv::Tree,
    nonces: storage::kv::Tree,
    keys: storage::kv::Tree,
    /// Offline allowances by `<store>/<account>` (for a store's sync).
    grants: storage::kv::Tree,
    /// The stores holding a grant, by `<account>/` (for an account's total).
    grants_by_account: storage::kv::Tree,
    /// Accounts in debt.
    debts: storage::kv::Tree,
    /// Offline payments that could not be applied as approved, for the operator.
    conflicts: storage::kv::Tree,
    /// Offline payments whose code or token had already paid another payment, for the operator.
    code_reuse: storage::kv::Tree,
    /// Each store's hub signing key.
    hub_keys: storage::kv::Tree,
    /// Pending payments by `<deadline, big-endian ms><payment id>`, for their expiry.
    pending: storage::kv::Tree,
    /// Posts that came after their payment expired or was voided, for the operator.
    late_posts: storage::kv::Tree,
    /// Refunds made, by `<store>/<refund id>`.
    refunds: storage::kv::Tree,
    /// How long an online payment stays pending without its post before the cloud expires it.
    pending_ttl_ms: u64,
    /// Money-moving operator actions, by a sequence number.
    audit: storage::kv::Tree,
    policy: OfflinePolicy,
    /// The one time source: when transfers were applied, conflicts recorded.
    clock: clock::SharedClock,
    /// Offline entries of a reconciliation batch applied per transaction.
    entries_per_transaction: usize,
}

fn issuance_account(currency: Currency) -> String {
    format!("issuance.{currency}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("ledger records serialise")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> T {
    // The ledger writes every record it reads; one it cannot read means the store is corrupt,
    // and carrying on would risk a wrong balance.
    serde_json::from_slice(bytes).expect("ledger record is readable")
}

type TxResult<T> = Result<T, ConflictableTransactionError<LedgerError>>;

/// Every record of a tree, in key order.
fn read_all<T: for<'de> Deserialize<'de>>(tree: &storage::kv::Tree) -> Result<Vec<T>, LedgerError> {
    tree.iter()
        .values()
        .map(|v| {
            v.map(|bytes| decode(&bytes))
                .map_err(|e| LedgerError::Storage(e.to_string()))
        })
        .collect()
}

/// A hub's message that does not hold ([`protocol::ValidationError`]): refused, nothing read.
fn invalid(error: protocol::ValidationError) -> LedgerError {
    LedgerError::Invalid(error.to_string())
}

fn abort<T>(error: LedgerError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(error))
}

fn unwrap_tx<T>(result: Result<T, TransactionError<LedgerError>>) -> Result<T, LedgerError> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) if storage::kv::is_fenced(&e) => {
            LedgerError::Fenced(e.to_string())
        }
        TransactionError::Storage(e) => LedgerError::Storage(e.to_string()),
    })
}

fn nonce_key(account_id: &str, nonce: &str) -> Vec<u8> {
    format!("{account_id}/{nonce}").into_bytes()
}

/// The payment charged again after its online transfer was moved back: an offline approval
/// (`#offline`) or a confirmation after the expiry (`#posted`).
fn charged_again(
    transfers: &storage::kv::TransactionalTree,
    payment_id: &str,
) -> TxResult<Option<TransferRecord>> {
    for suffix in ["offline", "posted"] {
        if let Some(t) = transfers.get(format!("{payment_id}#{suffix}").as_bytes())? {
            return Ok(Some(decode(&t)));
        }
    }
    Ok(None)
}

/// What a voided (or expired) attempt's nonce answers from then on.
fn voided_nonce(payment_id: &str) -> NonceRecord {
    NonceRecord {
        payment_id: payment_id.into(),
        decision: Decision::declined(
            DeclineReason::CloudUnreachable,
            "the store voided this attempt after its deadline passed",
        ),
        amount: None,
    }
}

/// Moves `amount_minor` from `debit` to `credit` and writes both accounts: the one place a
/// balance changes, for online and offline payments, their reversals, deposits and openings.
/// Whether the debit may go below zero is the caller's rule; an overflow aborts the transaction
/// (no input can make a balance wrap).
fn apply_transfer(
    accounts: &storage::kv::TransactionalTree,
    (debit_id, debit): (&str, &mut AccountRecord),
    (credit_id, credit): (&str, &mut AccountRecord),
    amount_minor: i64,
) -> TxResult<()> {
    let (Some(debited), Some(credited)) = (
        debit.balance_minor.checked_sub(amount_minor),
        credit.balance_minor.checked_add(amount_minor),
    ) else {
        return abort(LedgerError::Invalid(format!(
            "moving {amount_minor} from {debit_id} to {credit_id} would overflow a balance"
        )));
    };
    debit.balance_minor = debited;
    credit.balance_minor = credited;
    accounts.insert(debit_id.as_bytes(), encode(&*debit))?;
    accounts.insert(credit_id.as_bytes(), encode(&*credit))?;
    Ok(())
}

/// Moves a pending payment back with a reversing transfer `<payment id>#void`; every attempt
/// that held it now answers "voided".
fn reverse_tx(
    accounts: &storage::kv::TransactionalTree,
    transfers: &storage::kv::TransactionalTree,
    nonces: &storage::kv::TransactionalTree,
    pending: &storage::kv::TransactionalTree,
    payment_id: &str,
    mut existing: TransferRecord,
    now_ms: u64,
) -> TxResult<()> {
    let mut customer: AccountRecord = decode(
        &accounts
            .get(existing.debit_account_id.as_bytes())?
            .expect("debited account exists"),
    );
    let mut merchant: AccountRecord = decode(
        &accounts
            .get(existing.credit_account_id.as_bytes())?
            .expect("credited account exists"),
    );
    apply_transfer(
        accounts,
        (&existing.credit_account_id, &mut merchant),
        (&existing.debit_account_id, &mut customer),
        existing.amount_minor,
    )?;
    let reversal = TransferRecord {
        debit_account_id: existing.credit_account_id.clone(),
        credit_account_id: existing.debit_account_id.clone(),
        applied_at_ms: now_ms,
        voided: false,
        offline: false,
        approved_nonces: Vec::new(),
        posted: true,
        pending_until_ms: None,
        expired_holders: Vec::new(),
        refunded_minor: 0,
        ..existing.clone()
    };
    transfers.insert(format!("{payment_id}#void").as_bytes(), encode(&reversal))?;
    for holder in existing.holders() {
        nonces.insert(
            nonce_key(&existing.debit_account_id, &holder),
            encode(&voided_nonce(payment_id)),
        )?;
    }
    if let Some(deadline) = existing.pending_until_ms.take() {
        pending.remove(pending_key(deadline, payment_id))?;
    }
    existing.voided = true;
    existing.approved_nonces.clear();
    transfers.insert(payment_id.as_bytes(), encode(&existing))?;
    Ok(())
}

impl Ledger {
    /// Opens (or creates) the ledger in a directory.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_at(&storage::kv::Location::Sled(path.to_path_buf()))
    }

    /// Opens (or creates) the ledger at `location`: sled in a directory, or a PostgreSQL schema
    /// several cloud instances share (every operation one serializable transaction).
    pub fn open_at(location: &storage::kv::Location) -> Result<Self, LedgerError> {
        Self::on(
            storage::kv::Db::open_at(location).map_err(|e| LedgerError::Storage(e.to_string()))?,
        )
    }

    /// A ledger in memory, for the deterministic simulation only (its cloud never restarts, and
    /// nothing waits for a real disk). Never in a cloud: only builds with the `sim` feature (the
    /// tests crate's) have it.
    #[cfg(feature = "sim")]
    pub fn in_memory() -> Result<Self, LedgerError> {
        Self::on(storage::kv::Db::memory(&storage::kv::MemoryDb::new()))
    }

    fn on(db: storage::kv::Db) -> Result<Self, LedgerError> {
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| LedgerError::Storage(e.to_string()))
        };
        Ok(Ledger {
            accounts: tree("accounts")?,
            transfers: tree("transfers")?,
            nonces: tree("nonces")?,
            keys: tree("keys")?,
            grants: tree("grants")?,
            grants_by_account: tree("grants_by_account")?,
            debts: tree("debts")?,
            conflicts: tree("conflicts")?,
            code_reuse: tree("code_reuse")?,
            hub_keys: tree("hub_keys")?,
            pending: tree("pending")?,
            late_posts: tree("late_posts")?,
            refunds: tree("refunds")?,
            pending_ttl_ms: DEFAULT_PENDING_TTL_MS,
            audit: tree("audit")?,
            policy: OfflinePolicy::default(),
            clock: clock::system(),
            entries_per_transaction: offline::ENTRIES_PER_TRANSACTION,
            db,
        })
    }

    /// This ledger with every write held to `fence` (a store's lease, [`crate::leases`]): a
    /// write after the lease was taken by another instance fails ([`LedgerError::Fenced`]) and
    /// changes nothing.
    pub fn fenced(&self, fence: &std::sync::Arc<storage::kv::Fence>) -> Ledger {
        let mut fenced = self.clone();
        for tree in [
            &mut fenced.accounts,
            &mut fenced.transfers,
            &mut fenced.nonces,
            &mut fenced.keys,
            &mut fenced.grants,
            &mut fenced.grants_by_account,
            &mut fenced.debts,
            &mut fenced.conflicts,
            &mut fenced.code_reuse,
            &mut fenced.hub_keys,
            &mut fenced.pending,
            &mut fenced.late_posts,
            &mut fenced.refunds,
            &mut fenced.audit,
        ] {
            *tree = tree.fenced(fence);
        }
        fenced
    }

    /// The stores' leases in the ledger's database, as instance `instance` of a process started
    /// now ([`crate::leases`]).
    pub fn leases(
        &self,
        instance: &str,
        ttl_ms: u64,
    ) -> Result<crate::leases::Leases, LedgerError> {
        crate::leases::Leases::open(&self.db, instance, self.clock.now_ms(), ttl_ms)
    }

    /// Expires pending payments `ttl_ms` after they were applied.
    pub fn with_pending_ttl(mut self, ttl_ms: u64) -> Self {
        self.pending_ttl_ms = ttl_ms;
        self
    }

    /// The clock the ledger reads.
    pub fn clock(&self) -> clock::SharedClock {
        self.clock.clone()
    }

    /// Reads time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: clock::SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets how much the cloud grants hubs for offline payment.
    pub fn with_offline_policy(mut self, policy: OfflinePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Applies a reconciliation batch's entries `n` per transaction (at least 1): fewer
    /// conflict less with other writers, more commit less often.
    pub fn with_entries_per_transaction(mut self, n: usize) -> Self {
        self.entries_per_transaction = n.max(1);
        self
    }

    /// Appends an operator action to the audit trail, flushed.
    pub fn record_audit(&self, entry: &protocol::AuditEntry) -> Result<(), LedgerError> {
        let id = self
            .db
            .generate_id()
            .map_err(|e| LedgerError::Storage(e.to_string()))?;
        self.audit
            .insert(id.to_be_bytes(), encode(entry))
            .map_err(|e| LedgerError::Storage(e.to_string()))?;
        self.flush()
    }

    /// The audit trail, oldest first.
    pub fn audit_trail(&self) -> Result<Vec<protocol::AuditEntry>, LedgerError> {
        read_all(&self.audit)
    }

    /// Flushes to disk, or stops the process ([`storage::flush_or_stop`]): after a failed flush
    /// nobody knows what the ledger holds.
    fn flush(&self) -> Result<(), LedgerError> {
        storage::flush_or_stop(&self.db, "cloud-ledger-flush");
        Ok(())
    }
}

fn empty_totals(currency: Currency) -> LedgerTotals {
    LedgerTotals {
        currency,
        total_debits_minor: 0,
        total_credits_minor: 0,
        sum_of_balances_minor: 0,
        issued_minor: 0,
        transfers: 0,
    }
}

fn view(account_id: &str, r: AccountRecord) -> AccountView {
    AccountView {
        account_id: account_id.into(),
        kind: r.kind,
        currency: r.currency,
        balance_minor: r.balance_minor,
        public_key: r.public_key,
        closed: r.closed,
        in_debt: r.in_debt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paycode::Wallet;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger =
            Ledger::open_at(&crate::engines::location(&dir.path().join("ledger"))).unwrap();
        ledger
            .open_account(&OpenAccount {
                account_id: "store-1".into(),
                kind: AccountKind::Merchant,
                currency: eur(),
                initial_balance_minor: 0,
                public_key: None,
            })
            .unwrap();
        let key = Wallet::generate("alice").unwrap().public_key_b64();
        let entry = ledger
            .open_account(&OpenAccount {
                account_id: "alice".into(),
                kind: AccountKind::Customer,
                currency: eur(),
                initial_balance_minor: 10_000,
                public_key: Some(key),
            })
            .unwrap();
        assert_eq!(entry.unwrap().version, 1);
        (dir, ledger)
    }

    fn pay(payment: &str, nonce: &str, amount: i64) -> CloudAuthorize {
        CloudAuthorize {
            evidence: Default::default(),
            payment_id: format!("store-1:{payment}").into(),
            account_id: "alice".into(),
            code_nonce: nonce.into(),
            amount_minor: amount,
            currency: eur(),
            terminal_id: "t1".into(),
            order_id: payment.into(),
            offline_reservation: Default::default(),
            spent_code: None,
        }
    }

    /// Where an attempt would move money the payer is proven, or the attempt is declined and the
    /// decline recorded: a redelivery of the same request hears it again even when the proof
    /// would pass now (an enrollment since), and only a proven payer joins an order's open
    /// transfer.
    fn a_payer_refused_stays_refused_and_only_a_proven_payer_joins_an_open_payment() {
        let (_d, l) = ledger();
        let refuse = |_: &CloudAuthorize, _: Option<&str>| {
            Err(PayerRefusal::Declined(Decision::declined(
                DeclineReason::BadSignature,
                "not proven",
            )))
        };
        let accept = |_: &CloudAuthorize, key: Option<&str>| {
            assert!(key.is_some(), "alice's payment key is given");
            Ok(())
        };
        let first = l
            .authorize_proving("store-1", &pay("o-1", "n-1", 100), &refuse)
            .unwrap()
            .0;
        assert_eq!(first.reason(), Some(DeclineReason::BadSignature));
        assert!(
            l.nonce_seen(&pay("o-1", "n-1", 100)).unwrap(),
            "a refusal is on record"
        );
        assert!(!l.nonce_seen(&pay("o-1", "n-9", 100)).unwrap());
        let again = l
            .authorize_proving("store-1", &pay("o-1", "n-1", 100), &accept)
            .unwrap()
            .0;
        assert_eq!(again, first, "a redelivery hears the first answer");
        assert_eq!(balance(&l, "alice"), 10_000);
        let paid = l
            .authorize_proving("store-1", &pay("o-2", "n-2", 100), &accept)
            .unwrap()
            .0;
        assert!(matches!(
            paid,
            Decision::Approved {
                already_paid: false,
                ..
            }
        ));
        // Joining the order's open transfer keeps its money moved (a void of the first attempt
        // then moves nothing back): only a proven payer joins. An unproven one hears that the
        // outcome is not known yet (never "declined" for an order that may be paid), and nothing
        // is recorded: asked again once the open attempt is posted, it hears "paid".
        let unproven = l
            .authorize_proving("store-1", &pay("o-2", "n-3", 100), &refuse)
            .unwrap()
            .0;
        assert_eq!(unproven.reason(), Some(DeclineReason::PaymentInProgress));
        assert!(unproven.reason().unwrap().is_unknown_outcome());
        let joined = l
            .authorize_proving("store-1", &pay("o-2", "n-6", 100), &accept)
            .unwrap()
            .0;
        assert!(
            matches!(
                joined,
                Decision::Approved {
                    already_paid: true,
                    ..
                }
            ),
            "{joined:?}"
        );
        l.post("store-1", &attempt("o-2", "n-2")).unwrap();
        let after_post = l
            .authorize_proving("store-1", &pay("o-2", "n-3", 100), &refuse)
            .unwrap()
            .0;
        assert!(
            matches!(
                after_post,
                Decision::Approved {
                    already_paid: true,
                    ..
                }
            ),
            "{after_post:?}"
        );
        let other = l
            .authorize_proving("store-1", &pay("o-2", "n-7", 999), &refuse)
            .unwrap()
            .0;
        assert_eq!(other.reason(), Some(DeclineReason::DuplicateOrderId));
        assert!(
            !format!("{other:?}").contains("alice"),
            "who paid stays out of it: {other:?}"
        );
        assert_eq!(balance(&l, "alice"), 9_900);
        // A proof that could not be checked records nothing: the request fails (the hub voids).
        let broken =
            |_: &CloudAuthorize, _: Option<&str>| Err(PayerRefusal::Unavailable("disk".into()));
        assert!(l
            .authorize_proving("store-1", &pay("o-3", "n-4", 100), &broken)
            .is_err());
        let later = l
            .authorize_proving("store-1", &pay("o-3", "n-4", 100), &accept)
            .unwrap()
            .0;
        assert!(matches!(
            later,
            Decision::Approved {
                already_paid: false,
                ..
            }
        ));
        // A grant is earned by the payment that moved money, not by its repeats.
        let (_, granted) = l
            .authorize_proving("store-1", &pay("o-5", "n-5", 100), &accept)
            .unwrap();
        assert!(granted.is_some());
        let (again, regranted) = l
            .authorize_proving("store-1", &pay("o-5", "n-5", 100), &accept)
            .unwrap();
        assert!(matches!(again, Decision::Approved { .. }));
        assert_eq!(regranted, None, "a repeat earns no grant");
        assert_eq!(balance(&l, "alice"), 9_700);
        books_balance(&l);
    }

    /// Alice's attempt at `store-1:<order>` with `nonce`, as a void or a post names it.
    fn attempt(order: &str, nonce: &str) -> VoidPayment {
        VoidPayment {
            payment_id: format!("store-1:{order}").into(),
            account_id: "alice".into(),
            code_nonce: nonce.into(),
        }
    }

    fn balance(l: &Ledger, id: &str) -> i64 {
        l.account(id).unwrap().unwrap().balance_minor
    }

    fn books_balance(l: &Ledger) {
        for t in l.totals().unwrap() {
            assert_eq!(t.sum_of_balances_minor, 0);
            assert_eq!(t.total_debits_minor, t.total_credits_minor);
        }
    }

    fn a_store_cannot_name_another_stores_payment_nor_an_internal_transfer() {
        let (_d, l) = ledger();
        l.open_account(&OpenAccount {
            account_id: "store-2".into(),
            kind: AccountKind::Merchant,
            currency: eur(),
            initial_balance_minor: 0,
            public_key: None,
        })
        .unwrap();
        l.authorize("store-1", &pay("o1", "n1", 2_500)).unwrap();
        let before = (l.transfers().unwrap(), l.accounts().unwrap());
        // Store 2 asks for, voids and confirms store 1's payment: each refused, nothing moves.
        let mut theirs = pay("o1", "n2", 100);
        theirs.order_id = "o1".into();
        assert!(matches!(
            l.authorize("store-2", &theirs),
            Err(LedgerError::Invalid(_))
        ));
        assert!(matches!(
            l.void("store-2", &attempt("o1", "n1")),
            Err(LedgerError::Invalid(_))
        ));
        assert!(matches!(
            l.post("store-2", &attempt("o1", "n1")),
            Err(LedgerError::Invalid(_))
        ));
        // Internal transfer ids are no payment of any store: alice's opening, a reversal.
        for internal in ["open:alice", "store-1:o1#void"] {
            let mut crafted = pay("o9", "n9", 100);
            crafted.payment_id = internal.into();
            assert!(
                matches!(
                    l.authorize("store-1", &crafted),
                    Err(LedgerError::Invalid(_))
                ),
                "{internal}"
            );
            let void = VoidPayment {
                payment_id: internal.into(),
                account_id: "alice".into(),
                code_nonce: "n9".into(),
            };
            assert!(
                matches!(l.void("store-1", &void), Err(LedgerError::Invalid(_))),
                "{internal}"
            );
        }
        // Amounts out of range, two large negative ones included: refused, no panic.
        for amount in [0, -1, -protocol::MAX_AMOUNT_MINOR, i64::MIN, i64::MAX] {
            assert!(
                matches!(
                    l.authorize("store-1", &pay(&format!("neg{amount}"), "n7", amount)),
                    Err(LedgerError::Invalid(_))
                ),
                "{amount}"
            );
        }
        assert_eq!((l.transfers().unwrap(), l.accounts().unwrap()), before);
        assert_eq!(balance(&l, "alice"), 7_500);
        books_balance(&l);
        // No store may be named after an internal prefix.
        for reserved in ["open", "deposit"] {
            let opened = l.open_account(&OpenAccount {
                account_id: reserved.into(),
                kind: AccountKind::Merchant,
                currency: eur(),
                initial_balance_minor: 0,
                public_key: None,
            });
            assert!(matches!(opened, Err(LedgerError::Invalid(_))), "{reserved}");
        }
        // The store's own void still works.
        assert!(l.void("store-1", &attempt("o1", "n1")).unwrap());
        assert_eq!(balance(&l, "alice"), 10_000);
    }

    fn payment_moves_money_once() {
        let (_d, l) = ledger();
        let d = l.authorize("store-1", &pay("o1", "n1", 2_500)).unwrap();
        assert_eq!(
            d,
            Decision::Approved {
                account_id: "alice".into(),
                already_paid: false
            }
        );
        assert_eq!(balance(&l, "alice"), 7_500);
        assert_eq!(balance(&l, "store-1"), 2_500);
        // The same payment again, even with a fresh code: nothing moves.
        let d = l.authorize("store-1", &pay("o1", "n2", 2_500)).unwrap();
        assert_eq!(
            d,
            Decision::Approved {
                account_id: "alice".into(),
                already_paid: true
            }
        );
        assert_eq!(balance(&l, "alice"), 7_500);
        books_balance(&l);
    }

    fn same_order_other_amount_is_refused() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 2_500)).unwrap();
        let d = l.authorize("store-1", &pay("o1", "n2", 9_00)).unwrap();
        assert_eq!(d.reason(), Some(DeclineReason::DuplicateOrderId));
        assert_eq!(balance(&l, "alice"), 7_500);
    }

    fn replayed_nonce_is_refused_but_a_retry_hears_the_first_answer() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 100)).unwrap();
        let d = l.authorize("store-1", &pay("o2", "n1", 100)).unwrap();
        assert_eq!(d.reason(), Some(DeclineReason::CodeReplayed));
        let d = l.authorize("store-1", &pay("o3", "n3", 1_000_000)).unwrap();
        assert_eq!(d.reason(), Some(DeclineReason::InsufficientFunds));
        let again = l.authorize("store-1", &pay("o3", "n3", 1_000_000)).unwrap();
        assert_eq!(again, d);
        assert_eq!(balance(&l, "alice"), 9_900);
        books_balance(&l);
    }

    fn declines() {
        let (_d, l) = ledger();
        let mut unknown = pay("o1", "n1", 100);
        unknown.account_id = "nobody".into();
        assert_eq!(
            l.authorize("store-1", &unknown).unwrap().reason(),
            Some(DeclineReason::UnknownAccount)
        );
        // A store with no merchant account.
        let mut elsewhere = pay("o2", "n2", 100);
        elsewhere.payment_id = "store-9:o2".into();
        assert_eq!(
            l.authorize("store-9", &elsewhere).unwrap().reason(),
            Some(DeclineReason::UnknownAccount)
        );
        let mut usd = pay("o3", "n3", 100);
        usd.currency = Currency::parse("USD").unwrap();
        assert_eq!(
            l.authorize("store-1", &usd).unwrap().reason(),
            Some(DeclineReason::CurrencyMismatch)
        );
        assert_eq!(
            l.authorize("store-1", &pay("o4", "n4", 10_001))
                .unwrap()
                .reason(),
            Some(DeclineReason::InsufficientFunds)
        );
        assert_eq!(
            l.authorize("store-1", &pay("o5", "n5", 10_000))
                .unwrap()
                .reason(),
            None
        );
        assert_eq!(balance(&l, "alice"), 0);
        books_balance(&l);
    }

    fn void_reverses_an_applied_attempt_and_burns_an_unseen_one() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        let void = attempt("o1", "n1");
        assert!(l.void("store-1", &void).unwrap());
        assert!(
            !l.void("store-1", &void).unwrap(),
            "voiding twice moves nothing"
        );
        assert_eq!(balance(&l, "alice"), 10_000);
        assert_eq!(balance(&l, "store-1"), 0);

        let early = attempt("o2", "n2");
        assert!(!l.void("store-1", &early).unwrap());
        let late = l.authorize("store-1", &pay("o2", "n2", 100)).unwrap();
        assert!(matches!(late, Decision::Declined { .. }), "{late:?}");
        assert_eq!(balance(&l, "alice"), 10_000);
        books_balance(&l);
    }

    fn void_of_a_timed_out_attempt_spares_a_later_confirmed_one() {
        let (_d, l) = ledger();
        // Attempt 1 applied, but its answer was lost: the hub will void it.
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        // The register retries the order with a fresh code and hears "approved, already paid".
        let retry = l.authorize("store-1", &pay("o1", "n2", 700)).unwrap();
        assert_eq!(
            retry,
            Decision::Approved {
                account_id: "alice".into(),
                already_paid: true
            }
        );
        // The late void of attempt 1 must not take back money the retry reported as paid.
        let void = attempt("o1", "n1");
        assert!(!l.void("store-1", &void).unwrap());
        assert_eq!(balance(&l, "store-1"), 700);
        books_balance(&l);
    }

    fn a_nonce_a_void_burnt_never_takes_over_the_order_transfer() {
        let (_d, l) = ledger();
        // Attempt 1 paid; its answer was lost, the hub will void it.
        assert!(matches!(
            l.authorize("store-1", &pay("o1", "n1", 700)).unwrap(),
            Decision::Approved { .. }
        ));
        // The cashier's retry (attempt 2) timed out too: its void overtook the request itself.
        let void = |nonce: &str| attempt("o1", nonce);
        assert!(!l.void("store-1", &void("n2")).unwrap());
        // The late attempt 2 must not take the transfer over (the register heard "declined").
        let late = l.authorize("store-1", &pay("o1", "n2", 700)).unwrap();
        assert!(matches!(late, Decision::Declined { .. }), "{late:?}");
        // So the void of attempt 1 still moves the money back.
        assert!(l.void("store-1", &void("n1")).unwrap());
        assert_eq!(balance(&l, "alice"), 10_000);
        assert_eq!(balance(&l, "store-1"), 0);
        books_balance(&l);
    }

    fn a_code_repeated_for_its_order_with_another_amount_is_not_told_approved() {
        // Found by the simulation (seed 16): the attempt paid 700, its answer was lost; the
        // cashier retried the order for 900 showing the same code.
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        let again = l.authorize("store-1", &pay("o1", "n1", 900)).unwrap();
        assert_eq!(
            again.reason(),
            Some(DeclineReason::DuplicateOrderId),
            "{again:?}"
        );
        let same = l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert!(matches!(same, Decision::Approved { .. }), "{same:?}");
        assert_eq!(balance(&l, "alice"), 9_300);
        books_balance(&l);
    }

    fn a_late_attempt_voided_does_not_take_back_what_an_earlier_one_told_approved() {
        // Found by the simulation (seed 106): attempt 1 timed out (the hub restarted and voids
        // it), attempt 2 paid and the register heard "approved"; attempt 1 then arrived late
        // and was told "already paid", and its void arrived after it.
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n2", 700)).unwrap();
        let late = l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert!(matches!(late, Decision::Approved { .. }), "{late:?}");
        let void = attempt("o1", "n1");
        assert!(!l.void("store-1", &void).unwrap());
        assert_eq!(balance(&l, "alice"), 9_300);
        assert_eq!(balance(&l, "store-1"), 700);
        books_balance(&l);
    }

    fn a_repeat_of_an_attempt_whose_payment_moved_back_hears_declined() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        // Attempt 2 is told "already paid"; both attempts go unanswered and are voided: the
        // money moves back with the last void.
        l.authorize("store-1", &pay("o1", "n2", 700)).unwrap();
        let void = |nonce: &str| attempt("o1", nonce);
        assert!(!l.void("store-1", &void("n2")).unwrap());
        assert!(l.void("store-1", &void("n1")).unwrap());
        for nonce in ["n1", "n2"] {
            let again = l.authorize("store-1", &pay("o1", nonce, 700)).unwrap();
            assert!(
                matches!(again, Decision::Declined { .. }),
                "{nonce}: {again:?}"
            );
        }
        assert_eq!(balance(&l, "alice"), 10_000);
        books_balance(&l);
    }

    fn a_payment_never_confirmed_expires_and_moves_back() {
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        // The cloud applies it; the hub that asked for it loses its disk before it confirms.
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert_eq!(balance(&l, "alice"), 9_300);
        clock.advance(59_999);
        assert_eq!(l.expire_pending().unwrap(), 0, "not before its deadline");
        clock.advance(1);
        assert_eq!(l.expire_pending().unwrap(), 1);
        assert_eq!(l.expire_pending().unwrap(), 0, "once");
        assert_eq!(balance(&l, "alice"), 10_000);
        assert_eq!(balance(&l, "store-1"), 0);
        // A repeat of the attempt is not told "approved".
        let again = l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert!(matches!(again, Decision::Declined { .. }), "{again:?}");
        books_balance(&l);
    }

    fn a_confirmation_after_the_expiry_charges_the_payment_once_into_debt_if_need_be() {
        // Both reviews: a hub cut off longer than the deadline confirms an approval the register
        // heard; the store was promised the money.
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        clock.advance(60_000);
        assert_eq!(l.expire_pending().unwrap(), 1);
        // Meanwhile the customer spent nearly everything elsewhere.
        l.authorize("store-1", &pay("o2", "n2", 9_900)).unwrap();
        assert_eq!(balance(&l, "alice"), 100);
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap());
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap(), "once");
        assert_eq!(balance(&l, "alice"), -600);
        assert!(l.account("alice").unwrap().unwrap().in_debt);
        assert_eq!(balance(&l, "store-1"), 10_600);
        assert!(l.late_posts().unwrap().is_empty());
        // A retry of the order hears it is paid; a post from an attempt that never held it is
        // kept for the operator.
        let retry = l.authorize("store-1", &pay("o1", "n3", 700)).unwrap();
        assert!(
            matches!(
                retry,
                Decision::Approved {
                    already_paid: true,
                    ..
                }
            ),
            "{retry:?}"
        );
        // So does a repeat of the posting attempt's own code.
        let repeat = l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert!(matches!(repeat, Decision::Approved { .. }), "{repeat:?}");
        assert!(!l.post("store-1", &attempt("o1", "n9")).unwrap());
        assert_eq!(balance(&l, "alice"), -600);
        books_balance(&l);
    }

    fn a_voided_attempt_cannot_confirm_an_expired_payment() {
        // Review: a void arriving after the expiry must take that attempt out of the holders.
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        clock.advance(60_000);
        assert_eq!(l.expire_pending().unwrap(), 1);
        assert!(!l.void("store-1", &attempt("o1", "n1")).unwrap());
        assert!(!l.post("store-1", &attempt("o1", "n1")).unwrap());
        assert_eq!(balance(&l, "alice"), 10_000);
        books_balance(&l);
    }

    fn a_payments_status_follows_its_transfer_and_asking_moves_nothing() {
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        let status = |order: &str| l.payment_status("store-1", &format!("store-1:{order}"));
        let paid = |amount_minor| PaymentStatus::Paid {
            account_id: "alice".into(),
            amount_minor,
            currency: eur(),
        };
        assert_eq!(status("o1").unwrap(), PaymentStatus::NotPaid, "never seen");
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert_eq!(status("o1").unwrap(), PaymentStatus::Pending);
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap());
        assert_eq!(status("o1").unwrap(), paid(700));
        // Voided, expired, declined: not paid.
        l.authorize("store-1", &pay("o2", "n2", 500)).unwrap();
        assert!(l.void("store-1", &attempt("o2", "n2")).unwrap());
        assert_eq!(status("o2").unwrap(), PaymentStatus::NotPaid);
        l.authorize("store-1", &pay("o3", "n3", 400)).unwrap();
        l.authorize("store-1", &pay("o6", "n6", 300)).unwrap();
        clock.advance(60_000);
        assert_eq!(l.expire_pending().unwrap(), 2);
        // Expired, yet its attempt may still confirm it: not final. Voided after: not paid.
        assert_eq!(status("o3").unwrap(), PaymentStatus::Pending);
        assert!(!l.void("store-1", &attempt("o6", "n6")).unwrap());
        assert_eq!(status("o6").unwrap(), PaymentStatus::NotPaid);
        l.authorize("store-1", &pay("o4", "n4", 1_000_000)).unwrap();
        assert_eq!(status("o4").unwrap(), PaymentStatus::NotPaid);
        // Charged again after its expiry by a late post: paid.
        assert!(l.post("store-1", &attempt("o3", "n3")).unwrap());
        assert_eq!(status("o3").unwrap(), paid(400));
        // Asking neither burns a nonce nor joins a transfer: the code still pays its order.
        assert_eq!(status("o5").unwrap(), PaymentStatus::NotPaid);
        let fresh = l.authorize("store-1", &pay("o5", "n5", 100)).unwrap();
        assert!(
            matches!(
                fresh,
                Decision::Approved {
                    already_paid: false,
                    ..
                }
            ),
            "{fresh:?}"
        );
        // A store asks only after its own payments.
        for foreign in ["store-2:o1", "store-1", "store-1:", "store-1:o1#void"] {
            let refused = l.payment_status("store-1", foreign);
            assert!(
                matches!(refused, Err(LedgerError::Invalid(_))),
                "{foreign}: {refused:?}"
            );
        }
        assert_eq!(balance(&l, "alice"), 10_000 - 700 - 400 - 100);
        books_balance(&l);
    }

    fn a_posted_payment_is_final_no_void_or_expiry_moves_it_back() {
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        let attempt = |nonce: &str| attempt("o1", nonce);
        assert!(l.post("store-1", &attempt("n1")).unwrap());
        assert!(l.post("store-1", &attempt("n1")).unwrap(), "idempotent");
        assert!(!l.void("store-1", &attempt("n1")).unwrap());
        clock.advance(120_000);
        assert_eq!(l.expire_pending().unwrap(), 0);
        assert_eq!(balance(&l, "alice"), 9_300);
        assert_eq!(balance(&l, "store-1"), 700);
        assert!(l.late_posts().unwrap().is_empty());
        books_balance(&l);
    }

    fn an_amount_out_of_range_never_reaches_the_balances() {
        let (_d, l) = ledger();
        for amount in [-500, i64::MIN, protocol::MAX_AMOUNT_MINOR + 1] {
            assert!(matches!(
                l.authorize("store-1", &pay("o1", "n1", amount)),
                Err(LedgerError::Invalid(_))
            ));
        }
        assert_eq!(balance(&l, "alice"), 10_000);
        books_balance(&l);
    }

    fn a_code_confirmed_by_face_pays_once_across_the_fleet() {
        let (_d, l) = ledger();
        let by_face = |order: &str, token: &str, code: &str, amount: i64| CloudAuthorize {
            spent_code: Some(code.into()),
            ..pay(order, token, amount)
        };
        // Paid by code and face at one store: the code cannot pay again as a plain code.
        let first = l
            .authorize("store-1", &by_face("o1", "tok1", "c1", 500))
            .unwrap();
        assert!(matches!(first, Decision::Approved { .. }), "{first:?}");
        let replay = l.authorize("store-1", &pay("o2", "c1", 500)).unwrap();
        assert_eq!(replay.reason(), Some(DeclineReason::CodeReplayed));
        // A repeat of the token's request hears its first answer.
        let repeat = l
            .authorize("store-1", &by_face("o1", "tok1", "c1", 500))
            .unwrap();
        assert_eq!(repeat, first);
        // A code that paid as a plain code cannot be confirmed by face for another payment.
        l.authorize("store-1", &pay("o3", "c2", 300)).unwrap();
        let late = l
            .authorize("store-1", &by_face("o4", "tok2", "c2", 300))
            .unwrap();
        assert_eq!(late.reason(), Some(DeclineReason::CodeReplayed));
        let again = l
            .authorize("store-1", &by_face("o4", "tok2", "c2", 300))
            .unwrap();
        assert_eq!(again, late);
        // Approved offline by code and face: reconciled, the code is spent too.
        let signer = paycode::hubsig::HubSigner::from_seed(&[5; 32]);
        l.set_hub_key("store-1", &signer.public_key_b64()).unwrap();
        let mut entry = protocol::OfflinePayment {
            seq: 1,
            payment_id: "store-1:o5".into(),
            store_id: "store-1".into(),
            terminal_id: "t1".into(),
            order_id: "o5".into(),
            account_id: "alice".into(),
            nonce: "tok3".into(),
            amount_minor: 200,
            currency: eur(),
            approved_at_ms: 1,
            allowance_version: l.current_grant("store-1", "alice"),
            spent_code: Some("c3".into()),
            signature: String::new(),
        };
        signer.sign(&mut entry);
        let done = l.reconcile("store-1", &[entry]).unwrap();
        assert!(
            matches!(done.outcomes[0], protocol::ReconcileOutcome::Applied { .. }),
            "{:?}",
            done.outcomes
        );
        let after = l.authorize("store-1", &pay("o6", "c3", 200)).unwrap();
        assert_eq!(after.reason(), Some(DeclineReason::CodeReplayed));
        assert_eq!(balance(&l, "alice"), 10_000 - 500 - 300 - 200);
        books_balance(&l);
    }

    fn a_retry_of_an_order_paid_offline_hears_it_was_paid() {
        // Found by review: after the hub lost its disk, a retry of an order whose online attempt
        // was voided and whose offline approval was applied as `#offline`.
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        let void = attempt("o1", "n1");
        assert!(l.void("store-1", &void).unwrap());
        let entry = offline_entry(&l, "o1", "n1", 700);
        l.reconcile("store-1", &[entry]).unwrap();
        let retry = l.authorize("store-1", &pay("o1", "n2", 700)).unwrap();
        assert_eq!(
            retry,
            Decision::Approved {
                account_id: "alice".into(),
                already_paid: true
            }
        );
        let other = l.authorize("store-1", &pay("o1", "n3", 900)).unwrap();
        assert_eq!(other.reason(), Some(DeclineReason::DuplicateOrderId));
        assert_eq!(balance(&l, "alice"), 9_300);
        books_balance(&l);
    }

    fn accounts_open_once_and_keys_are_versioned() {
        let (_d, l) = ledger();
        let same = OpenAccount {
            account_id: "store-1".into(),
            kind: AccountKind::Merchant,
            currency: eur(),
            initial_balance_minor: 0,
            public_key: None,
        };
        assert_eq!(l.open_account(&same).unwrap(), None);
        let other = OpenAccount {
            initial_balance_minor: 5,
            ..same.clone()
        };
        assert!(matches!(
            l.open_account(&other),
            Err(LedgerError::Conflict(_))
        ));
        // A face-only customer has no wallet key: nothing to distribute.
        let no_key = OpenAccount {
            account_id: "carol".into(),
            kind: AccountKind::Customer,
            ..same.clone()
        };
        assert_eq!(l.open_account(&no_key).unwrap(), None);
        let bad_key = OpenAccount {
            public_key: Some("not-a-key".into()),
            account_id: "dave".into(),
            ..no_key.clone()
        };
        assert!(matches!(
            l.open_account(&bad_key),
            Err(LedgerError::Invalid(_))
        ));
        let bob = OpenAccount {
            account_id: "bob".into(),
            public_key: Some(Wallet::generate("bob").unwrap().public_key_b64()),
            ..no_key
        };
        assert_eq!(l.open_account(&bob).unwrap().unwrap().version, 2);
        let (all, more) = l.keys_after(0).unwrap();
        assert_eq!((all.len(), more), (2, false));
        let (after_one, _) = l.keys_after(1).unwrap();
        assert_eq!(after_one[0].account_id, "bob");
        books_balance(&l);
    }

    fn a_closed_account_takes_no_payment_and_its_key_is_revoked() {
        let (_d, l) = ledger();
        let revoked = l.close_account("alice").unwrap().unwrap();
        assert_eq!(revoked.public_key, None);
        assert_eq!(l.keys_after(revoked.version - 1).unwrap().0, vec![revoked]);
        assert_eq!(
            l.close_account("alice").unwrap(),
            None,
            "closing twice is a no-op"
        );
        assert_eq!(l.close_account("nobody").unwrap(), None);
        let view = l.account("alice").unwrap().unwrap();
        assert!(view.closed && view.public_key.is_none());
        let decision = l
            .authorize("store-1", &pay("o-closed", "n-closed", 100))
            .unwrap();
        assert_eq!(decision.reason(), Some(DeclineReason::UnknownAccount));
        books_balance(&l);
    }

    /// The one place balances change refuses to wrap one: the transaction aborts, nothing moves.
    fn a_transfer_that_would_overflow_a_balance_aborts_and_moves_nothing() {
        let (_dir, l) = ledger();
        let record = |balance_minor| AccountRecord {
            kind: AccountKind::Customer,
            currency: eur(),
            balance_minor,
            public_key: None,
            closed: false,
            in_debt: false,
        };
        let moved = unwrap_tx(l.accounts.transaction(|accounts| {
            let (mut from, mut to) = (record(10), record(i64::MAX - 5));
            apply_transfer(accounts, ("from", &mut from), ("to", &mut to), 6)
        }));
        assert!(matches!(moved, Err(LedgerError::Invalid(_))), "{moved:?}");
        assert!(l.accounts.get("to").unwrap().is_none());
        let moved = unwrap_tx(l.accounts.transaction(|accounts| {
            let (mut from, mut to) = (record(i64::MIN + 5), record(0));
            apply_transfer(accounts, ("from", &mut from), ("to", &mut to), 6)
        }));
        assert!(matches!(moved, Err(LedgerError::Invalid(_))), "{moved:?}");
        // Within range: both written.
        unwrap_tx(l.accounts.transaction(|accounts| {
            let (mut from, mut to) = (record(10), record(i64::MAX - 6));
            apply_transfer(accounts, ("from", &mut from), ("to", &mut to), 6)
        }))
        .unwrap();
        let to: AccountRecord = decode(&l.accounts.get("to").unwrap().unwrap());
        let from: AccountRecord = decode(&l.accounts.get("from").unwrap().unwrap());
        assert_eq!((from.balance_minor, to.balance_minor), (4, i64::MAX));
    }

    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger");
        let l = Ledger::open_at(&crate::engines::location(&path)).unwrap();
        l.open_account(&OpenAccount {
            account_id: "store-1".into(),
            kind: AccountKind::Merchant,
            currency: eur(),
            initial_balance_minor: 0,
            public_key: None,
        })
        .unwrap();
        l.open_account(&OpenAccount {
            account_id: "alice".into(),
            kind: AccountKind::Customer,
            currency: eur(),
            initial_balance_minor: 10_000,
            public_key: None,
        })
        .unwrap();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        l.authorize("store-1", &pay("o2", "n2", 300)).unwrap();
        let void = attempt("o2", "n2");
        assert!(l.void("store-1", &void).unwrap());
        let transfers_before = l.transfers().unwrap();
        drop(l);
        let l = Ledger::open_at(&crate::engines::location(&path)).unwrap();
        // Balances, transfers and spent codes are all still there.
        assert_eq!(balance(&l, "alice"), 9_300);
        assert_eq!(balance(&l, "store-1"), 700);
        assert_eq!(l.transfers().unwrap(), transfers_before);
        assert_eq!(
            l.authorize("store-1", &pay("o3", "n1", 100))
                .unwrap()
                .reason(),
            Some(DeclineReason::CodeReplayed)
        );
        assert!(!l.void("store-1", &void).unwrap(), "the void is remembered");
        books_balance(&l);
    }

    fn broken_books_are_reported_not_papered_over() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        books_balance(&l);
        // A stored balance that is not what its transfers make (written behind the ledger's
        // back): the totals say so, naming the account, and the ledger goes on answering.
        let mut alice: AccountRecord = decode(&l.accounts.get(b"alice").unwrap().unwrap());
        alice.balance_minor += 1;
        l.accounts.insert(b"alice", encode(&alice)).unwrap();
        match l.totals() {
            Err(LedgerError::Broken(detail)) => assert!(detail.contains("alice"), "{detail}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(balance(&l, "store-1"), 700);
    }

    fn refund(order: &str, refund_id: &str, amount: i64) -> protocol::Refund {
        protocol::Refund {
            refund_id: refund_id.into(),
            payment_id: format!("store-1:{order}").into(),
            terminal_id: "t1".into(),
            amount_minor: amount,
            currency: eur(),
            attestation: "checked by the caller".into(),
        }
    }

    fn refunded_total(decision: &protocol::RefundDecision) -> Option<(i64, bool)> {
        match decision {
            protocol::RefundDecision::Refunded {
                refunded_total_minor,
                already_refunded,
                ..
            } => Some((*refunded_total_minor, *already_refunded)),
            protocol::RefundDecision::Declined { .. } => None,
        }
    }

    fn offline_entry(
        l: &Ledger,
        order: &str,
        nonce: &str,
        amount: i64,
    ) -> protocol::OfflinePayment {
        let signer = paycode::hubsig::HubSigner::from_seed(&[5; 32]);
        l.set_hub_key("store-1", &signer.public_key_b64()).unwrap();
        let mut entry = protocol::OfflinePayment {
            seq: 1,
            payment_id: format!("store-1:{order}").into(),
            store_id: "store-1".into(),
            terminal_id: "t1".into(),
            order_id: order.into(),
            account_id: "alice".into(),
            nonce: nonce.into(),
            amount_minor: amount,
            currency: eur(),
            approved_at_ms: 1,
            allowance_version: l.current_grant("store-1", "alice"),
            spent_code: None,
            signature: String::new(),
        };
        signer.sign(&mut entry);
        entry
    }

    fn a_refund_gives_back_once_and_never_more_than_was_paid() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap());
        let first = l
            .refund("store-1", &refund("o1", "r1", 300), &Ok(()))
            .unwrap();
        assert_eq!(refunded_total(&first), Some((300, false)), "{first:?}");
        assert_eq!(balance(&l, "alice"), 9_600);
        assert_eq!(balance(&l, "store-1"), 400);
        // The same refund id again: answered as before, nothing moves.
        let again = l
            .refund("store-1", &refund("o1", "r1", 300), &Ok(()))
            .unwrap();
        assert_eq!(refunded_total(&again), Some((300, true)), "{again:?}");
        assert_eq!(balance(&l, "alice"), 9_600);
        // The same refund id with another amount or payment: refused.
        for other in [refund("o1", "r1", 200), refund("o2", "r1", 300)] {
            let refused = l.refund("store-1", &other, &Ok(())).unwrap();
            assert_eq!(refused.reason(), Some(DeclineReason::DuplicateRefundId));
        }
        // Never more than what was paid minus earlier refunds.
        let over = l
            .refund("store-1", &refund("o1", "r2", 401), &Ok(()))
            .unwrap();
        assert_eq!(over.reason(), Some(DeclineReason::RefundExceedsPayment));
        let rest = l
            .refund("store-1", &refund("o1", "r2", 400), &Ok(()))
            .unwrap();
        assert_eq!(refunded_total(&rest), Some((700, false)));
        let more = l
            .refund("store-1", &refund("o1", "r3", 1), &Ok(()))
            .unwrap();
        assert_eq!(more.reason(), Some(DeclineReason::RefundExceedsPayment));
        assert_eq!(balance(&l, "alice"), 10_000);
        assert_eq!(balance(&l, "store-1"), 0);
        let ids: Vec<String> = l
            .transfers()
            .unwrap()
            .into_iter()
            .map(|t| t.transfer_id)
            .collect();
        assert!(ids.contains(&"store-1:o1#refund:r1".to_string()), "{ids:?}");
        assert!(ids.contains(&"store-1:o1#refund:r2".to_string()), "{ids:?}");
        // The order stays paid: a retry of its charge hears so and moves nothing.
        let retry = l.authorize("store-1", &pay("o1", "n9", 700)).unwrap();
        assert!(
            matches!(
                retry,
                Decision::Approved {
                    already_paid: true,
                    ..
                }
            ),
            "{retry:?}"
        );
        assert_eq!(balance(&l, "alice"), 10_000);
        books_balance(&l);
    }

    fn a_refund_not_attested_moves_nothing_but_a_made_one_still_answers() {
        let (_d, l) = ledger();
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap());
        let forged = Err(protocol::RefundDecision::declined(
            DeclineReason::BadSignature,
            "no terminal sealed it",
        ));
        let refused = l
            .refund("store-1", &refund("o1", "r1", 300), &forged)
            .unwrap();
        assert_eq!(refused.reason(), Some(DeclineReason::BadSignature));
        assert_eq!(balance(&l, "alice"), 9_300, "nothing moved");
        // Made with a good attestation; asked again with one that no longer checks (the
        // terminal's certificate rotated since): answered from the record, nothing moves again.
        l.refund("store-1", &refund("o1", "r1", 300), &Ok(()))
            .unwrap();
        let again = l
            .refund("store-1", &refund("o1", "r1", 300), &forged)
            .unwrap();
        assert_eq!(refunded_total(&again), Some((300, true)), "{again:?}");
        // Another amount under it is still refused, and a new refund id needs a good one.
        let other = l
            .refund("store-1", &refund("o1", "r1", 200), &forged)
            .unwrap();
        assert_eq!(other.reason(), Some(DeclineReason::DuplicateRefundId));
        let new = l
            .refund("store-1", &refund("o1", "r2", 100), &forged)
            .unwrap();
        assert_eq!(new.reason(), Some(DeclineReason::BadSignature));
        assert_eq!(balance(&l, "alice"), 9_600);
        books_balance(&l);
    }

    fn only_a_final_payment_of_the_store_is_refunded() {
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        let reason = |order: &str, amount| {
            l.refund(
                "store-1",
                &refund(order, &format!("r-{order}"), amount),
                &Ok(()),
            )
            .unwrap()
            .reason()
        };
        assert_eq!(
            reason("o0", 100),
            Some(DeclineReason::PaymentNotFound),
            "never paid"
        );
        // Pending: its hub has not confirmed it, a void may still move it back.
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        assert_eq!(reason("o1", 100), Some(DeclineReason::PaymentNotSettled));
        // Voided: nothing to refund.
        assert!(l.void("store-1", &attempt("o1", "n1")).unwrap());
        assert_eq!(reason("o1", 100), Some(DeclineReason::PaymentNotFound));
        // Expired, with its attempt's confirmation possibly on its way: not final either.
        l.authorize("store-1", &pay("o2", "n2", 500)).unwrap();
        clock.advance(60_000);
        assert_eq!(l.expire_pending().unwrap(), 1);
        assert_eq!(reason("o2", 100), Some(DeclineReason::PaymentNotSettled));
        // Confirmed late, it is charged again (`#posted`) and that charge is refunded.
        assert!(l.post("store-1", &attempt("o2", "n2")).unwrap());
        assert_eq!(reason("o2", 100), None);
        // An offline approval applied beside the voided attempt (`#offline`) is refunded too.
        let entry = offline_entry(&l, "o1", "n1", 700);
        l.reconcile("store-1", &[entry]).unwrap();
        assert_eq!(reason("o1", 700), None);
        assert_eq!(balance(&l, "alice"), 10_000 - 500 + 100);
        // Another currency, another store's payment: refused.
        l.authorize("store-1", &pay("o3", "n3", 300)).unwrap();
        assert!(l.post("store-1", &attempt("o3", "n3")).unwrap());
        let usd = protocol::Refund {
            currency: Currency::parse("USD").unwrap(),
            ..refund("o3", "r-usd", 100)
        };
        let refused = l.refund("store-1", &usd, &Ok(())).unwrap();
        assert_eq!(refused.reason(), Some(DeclineReason::CurrencyMismatch));
        assert!(
            l.refund("store-2", &refund("o3", "r-x", 100), &Ok(()))
                .is_err(),
            "not store-2's"
        );
        // A closed customer account takes no refund.
        l.close_account("alice").unwrap();
        assert_eq!(reason("o3", 100), Some(DeclineReason::AccountBlocked));
        books_balance(&l);
    }

    fn a_refund_settles_a_debt_as_a_deposit_does() {
        let (_d, l) = ledger();
        let clock = clock::ManualClock::new(1_000_000);
        let l = l.with_clock(clock.clone()).with_pending_ttl(60_000);
        l.authorize("store-1", &pay("o1", "n1", 700)).unwrap();
        clock.advance(60_000);
        assert_eq!(l.expire_pending().unwrap(), 1);
        l.authorize("store-1", &pay("o2", "n2", 9_900)).unwrap();
        assert!(l.post("store-1", &attempt("o2", "n2")).unwrap());
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap());
        assert!(l.account("alice").unwrap().unwrap().in_debt);
        assert!(l
            .refund("store-1", &refund("o1", "r1", 600), &Ok(()))
            .unwrap()
            .reason()
            .is_none());
        let alice = l.account("alice").unwrap().unwrap();
        assert_eq!((alice.balance_minor, alice.in_debt), (0, false));
        assert!(l.debts().unwrap().is_empty());
        books_balance(&l);
    }

    fn a_stores_statement_adds_up_to_its_balance_change_on_the_day() {
        let dir = tempfile::tempdir().unwrap();
        // 2026-12-06 09:00 UTC.
        let day = 1_796_515_200_000;
        let clock = clock::ManualClock::new(day + 9 * 3_600_000);
        let l = Ledger::open_at(&crate::engines::location(&dir.path().join("ledger")))
            .unwrap()
            .with_clock(clock.clone())
            .with_pending_ttl(3_600_000);
        for (id, kind, amount, key) in [
            ("store-1", AccountKind::Merchant, 50, None),
            (
                "alice",
                AccountKind::Customer,
                10_000,
                Some(Wallet::generate("alice").unwrap().public_key_b64()),
            ),
        ] {
            l.open_account(&OpenAccount {
                account_id: id.into(),
                kind,
                currency: eur(),
                initial_balance_minor: amount,
                public_key: key,
            })
            .unwrap();
        }
        let start = balance(&l, "store-1") - 50;
        l.authorize("store-1", &pay("o1", "n1", 1_000)).unwrap();
        assert!(l.post("store-1", &attempt("o1", "n1")).unwrap());
        clock.advance(60_000);
        l.authorize("store-1", &pay("o2", "n2", 500)).unwrap();
        l.authorize("store-1", &pay("o5", "n5", 40)).unwrap();
        clock.advance(60_000);
        let entry = offline_entry(&l, "o3", "n3", 300);
        l.reconcile("store-1", &[entry]).unwrap();
        l.refund("store-1", &refund("o1", "r1", 400), &Ok(()))
            .unwrap();
        assert!(l.void("store-1", &attempt("o2", "n2")).unwrap());
        let end_of_day = balance(&l, "store-1");
        // The next day.
        clock.advance(24 * 3_600_000);
        l.authorize("store-1", &pay("o4", "n4", 70)).unwrap();
        let s = l.settlement("store-1", "2026-12-06", 0).unwrap();
        assert_eq!((s.from_ms, s.to_ms), (day, day + 86_400_000));
        assert_eq!(s.payments.count, 3, "o1, o2 and o5: {:?}", s.lines);
        assert_eq!(s.payments.amount_minor, 1_540);
        assert_eq!(s.pending.amount_minor, 40, "o5, not confirmed");
        assert_eq!(s.offline_payments.amount_minor, 300);
        assert_eq!(s.refunds.amount_minor, -400);
        assert_eq!(s.reversals.amount_minor, -500);
        assert_eq!(s.openings.amount_minor, 50);
        assert_eq!(s.net_minor, 1_540 + 300 - 400 - 500 + 50);
        assert_eq!(
            s.net_minor,
            end_of_day - start,
            "the balance's change over the day"
        );
        // Against the ledger's transfers of the store's account that day.
        let from_transfers: i64 = l
            .transfers()
            .unwrap()
            .iter()
            .filter(|t| (s.from_ms..s.to_ms).contains(&t.applied_at_ms))
            .map(
                |t| match (t.credit_account_id.as_str(), t.debit_account_id.as_str()) {
                    ("store-1", _) => t.amount_minor,
                    (_, "store-1") => -t.amount_minor,
                    _ => 0,
                },
            )
            .sum();
        assert_eq!(s.net_minor, from_transfers);
        let csv_sum: i64 = s
            .to_csv()
            .lines()
            .skip(1)
            .map(|row| row.split(',').nth(9).unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(csv_sum, s.net_minor);
        let next = l.settlement("store-1", "2026-12-07", 0).unwrap();
        assert_eq!((next.payments.count, next.net_minor), (1, 70));
        // In a store an hour ahead of UTC, the next day starts at 23:00 UTC: o4 still falls on it.
        let ahead = l.settlement("store-1", "2026-12-07", 60).unwrap();
        assert_eq!(ahead.net_minor, 70);
        assert!(l.settlement("store-1", "2026-12-32", 0).is_err());
        assert!(
            l.settlement("alice", "2026-12-06", 0).is_err(),
            "not a store"
        );
        assert!(l.settlement("nobody", "2026-12-06", 0).is_err());
        books_balance(&l);
    }

    crate::engines::on_each_engine!(
        broken_books_are_reported_not_papered_over,
        a_payer_refused_stays_refused_and_only_a_proven_payer_joins_an_open_payment,
        a_store_cannot_name_another_stores_payment_nor_an_internal_transfer,
        payment_moves_money_once,
        same_order_other_amount_is_refused,
        replayed_nonce_is_refused_but_a_retry_hears_the_first_answer,
        declines,
        void_reverses_an_applied_attempt_and_burns_an_unseen_one,
        void_of_a_timed_out_attempt_spares_a_later_confirmed_one,
        a_nonce_a_void_burnt_never_takes_over_the_order_transfer,
        a_code_repeated_for_its_order_with_another_amount_is_not_told_approved,
        a_late_attempt_voided_does_not_take_back_what_an_earlier_one_told_approved,
        a_repeat_of_an_attempt_whose_payment_moved_back_hears_declined,
        a_payment_never_confirmed_expires_and_moves_back,
        a_confirmation_after_the_expiry_charges_the_payment_once_into_debt_if_need_be,
        a_voided_attempt_cannot_confirm_an_expired_payment,
        a_payments_status_follows_its_transfer_and_asking_moves_nothing,
        a_posted_payment_is_final_no_void_or_expiry_moves_it_back,
        an_amount_out_of_range_never_reaches_the_balances,
        a_code_confirmed_by_face_pays_once_across_the_fleet,
        a_retry_of_an_order_paid_offline_hears_it_was_paid,
        accounts_open_once_and_keys_are_versioned,
        a_closed_account_takes_no_payment_and_its_key_is_revoked,
        a_transfer_that_would_overflow_a_balance_aborts_and_moves_nothing,
        survives_reopen,
        a_refund_gives_back_once_and_never_more_than_was_paid,
        a_refund_not_attested_moves_nothing_but_a_made_one_still_answers,
        only_a_final_payment_of_the_store_is_refunded,
        a_refund_settles_a_debt_as_a_deposit_does,
        a_stores_statement_adds_up_to_its_balance_change_on_the_day,
    );
}
