//! The ledger's actor: the ledger on its own thread (a `SyncArbiter` of one, reached only through
//! [`crate::bounded::Bounded`]), with one message per operation and one reply type per message.

use actix::prelude::*;
use protocol::{
    AccountView, Allowance, AllowanceBatch, CloudReplyBody, Deposit, HubRequest, HubRequestBody,
    KeyBatch, KeyEntry, OpenAccount, ReconcileOutcome, ReconcileResult,
};

use crate::{
    error::LedgerError,
    ledger::{Ledger, PayerRefusal},
    payer::PayerCheck,
};

/// Owns the ledger database. Runs on a dedicated thread (a `SyncArbiter` of one) because every
/// operation ends in a disk flush; one thread also serialises all writes.
pub struct LedgerActor {
    ledger: Ledger,
    payer: PayerCheck,
    offline: Option<OfflineMetrics>,
    /// The stores' leases, when several instances share the database.
    leases: Option<crate::leases::Leases>,
}

impl LedgerActor {
    /// Wraps an opened ledger.
    pub fn new(ledger: Ledger, payer: PayerCheck) -> Self {
        LedgerActor {
            ledger,
            payer,
            offline: None,
            leases: None,
        }
    }

    /// Serves only the stores whose lease it holds in `leases` ([`crate::leases`]).
    pub fn with_leases(mut self, leases: crate::leases::Leases) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Counts reconciliation outcomes and accounts in debt on `metrics`.
    pub fn with_metrics(mut self, metrics: OfflineMetrics) -> Self {
        if let Ok(debts) = self.ledger.debts() {
            metrics.in_debt.set(debts.len() as i64);
        }
        self.offline = Some(metrics);
        self
    }

    fn count_debts(&self) {
        if let (Some(m), Ok(debts)) = (&self.offline, self.ledger.debts()) {
            m.in_debt.set(debts.len() as i64);
        }
    }
}

/// The cloud's metrics of what hubs ask of the ledger beside payments: reconciliation and refunds.
#[derive(Clone)]
pub struct OfflineMetrics {
    /// `facepay_cloud_refunds_total{outcome}`: refunds decided, by outcome.
    refunds: prometheus::IntCounterVec,
    applied: prometheus::IntCounter,
    conflicts: prometheus::IntCounter,
    rejected: prometheus::IntCounter,
    code_reuses: prometheus::IntCounter,
    in_debt: prometheus::IntGauge,
}

impl OfflineMetrics {
    /// Registers `facepay_cloud_offline_{applied,conflicts,rejected,code_reuse}_total`,
    /// `facepay_cloud_accounts_in_debt` and `facepay_cloud_refunds_total{outcome}`.
    pub fn register(registry: &prometheus::Registry) -> Self {
        let refunds = telemetry::register_counter_vec(
            registry,
            "facepay_cloud_refunds_total",
            "refunds decided by the ledger: refunded (repeats of a refund id included), declined",
            &["outcome"],
        );
        for outcome in ["refunded", "declined"] {
            refunds.with_label_values(&[outcome]);
        }
        OfflineMetrics {
            refunds,
            applied: telemetry::register_counter(
                registry,
                "facepay_cloud_offline_applied_total",
                "offline payments applied at reconciliation (resends not counted)",
            ),
            conflicts: telemetry::register_counter(
                registry,
                "facepay_cloud_offline_conflicts_total",
                "offline payments that could not be applied as approved (kept for the operator)",
            ),
            rejected: telemetry::register_counter(
                registry,
                "facepay_cloud_offline_rejected_total",
                "offline entries refused (unknown hub key, bad signature); the hub keeps them",
            ),
            code_reuses: telemetry::register_counter(
                registry,
                "facepay_cloud_offline_code_reuse_total",
                "offline payments applied although their code or token had already paid another",
            ),
            in_debt: telemetry::register_gauge(
                registry,
                "facepay_cloud_accounts_in_debt",
                "customer accounts whose balance offline payments took below zero",
            ),
        }
    }
}

impl Actor for LedgerActor {
    type Context = SyncContext<Self>;
}

/// The books' check: `facepay_cloud_ledger_imbalance_minor_units{currency}` (every accepted
/// currency) and `facepay_cloud_ledger_balance_checked_timestamp_seconds`.
#[derive(Clone)]
pub struct BooksMetrics {
    imbalance: prometheus::IntGaugeVec,
    checked: prometheus::IntGauge,
}

impl BooksMetrics {
    /// Registers on the cloud's registry; nothing is checked yet (0 everywhere).
    pub fn register(registry: &prometheus::Registry) -> Self {
        let imbalance = telemetry::register_gauge_vec(
            registry,
            "facepay_cloud_ledger_imbalance_minor_units",
            "what every account of the currency adds up to at the last check, minor units: \
             0 always (double entry); anything else is a broken ledger",
            &["currency"],
        );
        for currency in protocol::Currency::all() {
            imbalance.with_label_values(&[currency.as_str()]);
        }
        BooksMetrics {
            imbalance,
            checked: telemetry::register_gauge(
                registry,
                "facepay_cloud_ledger_balance_checked_timestamp_seconds",
                "when the books were last checked (0: not yet)",
            ),
        }
    }
}

/// The stores with a registered hub key.
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, LedgerError>")]
pub struct HubKeyStores;

impl Handler<HubKeyStores> for LedgerActor {
    type Result = Result<Vec<String>, LedgerError>;

    fn handle(&mut self, _: HubKeyStores, _: &mut Self::Context) -> Self::Result {
        self.ledger.hub_key_stores()
    }
}

impl BooksMetrics {
    /// Adds up every account of `ledger` per currency and shows the sums. On sled only on the
    /// ledger's thread (its one writer); on PostgreSQL anywhere (one read is one snapshot).
    pub fn check(&self, ledger: &Ledger) -> Result<(), LedgerError> {
        let sums = ledger.balance_sums()?;
        for currency in protocol::Currency::all() {
            let sum = sums.get(&currency).copied().unwrap_or(0);
            if sum != 0 {
                tracing::error!(%currency, sum, "the books do not balance");
            }
            self.imbalance
                .with_label_values(&[currency.as_str()])
                .set(sum);
        }
        self.checked.set(telemetry::unix_seconds());
        Ok(())
    }
}

/// Add up every account per currency and show the sums on the books' metrics.
#[derive(Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct CheckBooks(pub BooksMetrics);

impl Handler<CheckBooks> for LedgerActor {
    type Result = Result<(), LedgerError>;

    fn handle(&mut self, msg: CheckBooks, _: &mut Self::Context) -> Self::Result {
        msg.0.check(&self.ledger)
    }
}

/// What the ledger answers a hub, and the allowance revocations to broadcast to every hub.
pub struct HubAnswer {
    /// The reply.
    pub body: CloudReplyBody,
    /// Accounts that lost their offline allowances (they went into debt).
    pub revocations: Vec<Allowance>,
}

/// Carry out a hub's request against the ledger; with the store's lease, every write held to it
/// (several instances share the database).
#[derive(Message)]
#[rtype(result = "HubAnswer")]
pub struct ApplyHubRequest(pub HubRequest, pub Option<crate::leases::Held>);

impl Handler<ApplyHubRequest> for LedgerActor {
    type Result = MessageResult<ApplyHubRequest>;

    fn handle(&mut self, msg: ApplyHubRequest, _: &mut Self::Context) -> Self::Result {
        let HubRequest { store_id, body, .. } = msg.0;
        // Held to the store's lease: an instance that lost it writes nothing more for the store.
        let fenced = msg.1.map(|held| self.ledger.fenced(&held.fence));
        let ledger = fenced.as_ref().unwrap_or(&self.ledger);
        let mut revocations = Vec::new();
        let reply = match body {
            // The payer of an attempt that would move money is checked by the cloud itself (its
            // code, its face), not taken from the hub.
            HubRequestBody::Authorize(request) => {
                let payer = &self.payer;
                // The terminal's attestation and the face, before the ledger's transaction: no
                // store is read inside one. A replay of an attempt already answered is answered
                // from the record and proves nothing: its evidence is not read again.
                let shown = match ledger.nonce_seen(&request) {
                    Ok(true) => Err(PayerRefusal::Unavailable(
                        "an attempt already answered is not proven again".into(),
                    )),
                    Ok(false) => payer.precheck(&store_id, &request),
                    Err(error) => Err(PayerRefusal::Unavailable(error.to_string())),
                };
                let prove = |r: &protocol::CloudAuthorize, key: Option<&str>| {
                    payer.check(r, key, &shown).inspect_err(|decision| {
                        tracing::warn!(
                            %store_id,
                            payment_id = %r.payment_id,
                            ?decision,
                            "payer not proven to the cloud; declined"
                        )
                    })
                };
                ledger.authorize_proving(&store_id, &request, &prove).map(
                    |(decision, allowance)| CloudReplyBody::Authorized {
                        payment_id: request.payment_id,
                        decision,
                        allowance,
                    },
                )
            }
            HubRequestBody::Reconcile(batch) => {
                let applied = ledger.reconcile(&store_id, &batch.entries);
                applied.map(|done| {
                    let outcomes = done.outcomes;
                    revocations = done.revocations;
                    let results: Vec<ReconcileResult> = batch
                        .entries
                        .iter()
                        .zip(outcomes)
                        .map(|(entry, outcome)| ReconcileResult {
                            seq: entry.seq,
                            payment_id: entry.payment_id.clone(),
                            outcome,
                        })
                        .collect();
                    if let Some(m) = &self.offline {
                        for r in &results {
                            match r.outcome {
                                ReconcileOutcome::Applied { .. } => m.applied.inc(),
                                ReconcileOutcome::Conflict { .. } => m.conflicts.inc(),
                                ReconcileOutcome::Rejected { .. } => m.rejected.inc(),
                                ReconcileOutcome::AlreadyApplied => {}
                            }
                        }
                        m.code_reuses.inc_by(done.code_reuses as u64);
                    }
                    if !revocations.is_empty() {
                        self.count_debts();
                    }
                    CloudReplyBody::Reconciled { results }
                })
            }
            HubRequestBody::AllowanceSync { after_account } => ledger
                .allowances(&store_id, after_account.as_deref())
                .map(|(allowances, next_after)| {
                    CloudReplyBody::Allowances(AllowanceBatch {
                        allowances,
                        next_after,
                    })
                }),
            HubRequestBody::Void(request) => {
                ledger
                    .void(&store_id, &request)
                    .map(|reversed| CloudReplyBody::Voided {
                        payment_id: request.payment_id,
                        reversed,
                    })
            }
            HubRequestBody::Post(protocol::PostBatch { posts }) => ledger
                .post_batch(&store_id, &posts)
                .map(|posted| CloudReplyBody::Posted {
                    payment_ids: posts.into_iter().map(|p| p.payment_id).collect(),
                    posted,
                }),
            // A refund moves the store's money: the terminal's attestation is checked by the
            // cloud itself, before the ledger's transaction.
            HubRequestBody::Refund(refund) => {
                let attested = self.payer.refund_attested(&store_id, &refund);
                if let Err(declined) = &attested {
                    tracing::warn!(
                        %store_id,
                        payment_id = %refund.payment_id,
                        refund_id = refund.refund_id,
                        ?declined,
                        "refund not attested by its terminal: moves nothing"
                    );
                }
                let decision = ledger.refund(&store_id, &refund, &attested);
                decision.map(|decision| {
                    let refunded = matches!(decision, protocol::RefundDecision::Refunded { .. });
                    if let Some(m) = &self.offline {
                        let outcome = if refunded { "refunded" } else { "declined" };
                        m.refunds.with_label_values(&[outcome]).inc();
                    }
                    if refunded {
                        self.count_debts();
                    }
                    CloudReplyBody::Refunded {
                        refund_id: refund.refund_id,
                        payment_id: refund.payment_id,
                        decision,
                    }
                })
            }
            HubRequestBody::PaymentStatus { payment_id } => ledger
                .payment_status(&store_id, &payment_id)
                .map(|status| CloudReplyBody::PaymentStatus { payment_id, status }),
            HubRequestBody::KeySync { after_version } => ledger
                .keys_after(after_version)
                .map(|(entries, more)| CloudReplyBody::Keys(KeyBatch { entries, more })),
            HubRequestBody::TemplateSync { .. }
            | HubRequestBody::Identify(_)
            | HubRequestBody::SecondFactor(_) => Err(LedgerError::Invalid(
                "identity requests are served by the identity actor".into(),
            )),
        };
        let body = reply.unwrap_or_else(|error| {
            if let LedgerError::Fenced(_) = error {
                // Another instance took the store: nothing was written here; its holder serves
                // the store, and the hub hears "busy" (it voids or retries).
                tracing::warn!(%error, %store_id, "store's lease lost; request not served");
                return CloudReplyBody::Busy {
                    detail: "another cloud instance serves this store now; retry".into(),
                };
            }
            if let LedgerError::Storage(_) = error {
                // Nobody knows what the ledger holds after a storage error: stop, and let the
                // restart read it (the hub hears nothing, and voids or resends).
                storage::fail_stop("a ledger operation", &error);
            }
            tracing::error!(%error, %store_id, "ledger operation failed");
            CloudReplyBody::Error {
                detail: error.to_string(),
            }
        });
        MessageResult(HubAnswer { body, revocations })
    }
}

/// Open an account.
#[derive(Message)]
#[rtype(result = "Result<Option<KeyEntry>, LedgerError>")]
pub struct OpenAccountCmd(pub OpenAccount);

impl Handler<OpenAccountCmd> for LedgerActor {
    type Result = Result<Option<KeyEntry>, LedgerError>;
    fn handle(&mut self, msg: OpenAccountCmd, _: &mut Self::Context) -> Self::Result {
        self.ledger.open_account(&msg.0)
    }
}

/// Close a customer's account (erasure): the key revocation and the allowance revocation to
/// broadcast.
#[derive(Message)]
#[rtype(result = "Result<(Option<KeyEntry>, Option<Allowance>), LedgerError>")]
pub struct CloseAccountCmd(pub String);

impl Handler<CloseAccountCmd> for LedgerActor {
    type Result = Result<(Option<KeyEntry>, Option<Allowance>), LedgerError>;
    fn handle(&mut self, msg: CloseAccountCmd, _: &mut Self::Context) -> Self::Result {
        let key = self.ledger.close_account(&msg.0)?;
        let allowance = self.ledger.revoke_allowances(&msg.0)?;
        Ok((key, allowance))
    }
}

/// Credit a deposit to an account (idempotent by deposit id): the account after it.
#[derive(Message)]
#[rtype(result = "Result<AccountView, LedgerError>")]
pub struct DepositCmd {
    /// The account.
    pub account_id: String,
    /// The deposit.
    pub deposit: Deposit,
}

impl Handler<DepositCmd> for LedgerActor {
    type Result = Result<AccountView, LedgerError>;
    fn handle(&mut self, msg: DepositCmd, _: &mut Self::Context) -> Self::Result {
        let account = self.ledger.deposit(&msg.account_id, &msg.deposit)?;
        self.count_debts();
        Ok(account)
    }
}

/// Register the public key a store's hub signs offline approvals with.
#[derive(Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct SetHubKeyCmd {
    /// The store.
    pub store_id: String,
    /// Its hub's Ed25519 public key, base64.
    pub public_key: String,
}

impl Handler<SetHubKeyCmd> for LedgerActor {
    type Result = Result<(), LedgerError>;
    fn handle(&mut self, msg: SetHubKeyCmd, _: &mut Self::Context) -> Self::Result {
        self.ledger.set_hub_key(&msg.store_id, &msg.public_key)
    }
}

/// Record an operator's money-moving action in the audit trail.
#[derive(Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct RecordAudit(pub protocol::AuditEntry);

impl Handler<RecordAudit> for LedgerActor {
    type Result = Result<(), LedgerError>;
    fn handle(&mut self, msg: RecordAudit, _: &mut Self::Context) -> Self::Result {
        self.ledger.record_audit(&msg.0)
    }
}

/// A read-only question about the ledger, answered with its own type: `ReadLedger::new(|l|
/// l.accounts())` is answered with `Result<Vec<AccountView>, LedgerError>`.
pub struct ReadLedger<T>(Box<Read<T>>);

/// A read of the ledger on its thread.
type Read<T> = dyn FnOnce(&Ledger) -> Result<T, LedgerError> + Send;

impl<T> ReadLedger<T> {
    /// A question.
    pub fn new(read: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static) -> Self {
        ReadLedger(Box::new(read))
    }
}

impl<T: Send + 'static> Message for ReadLedger<T> {
    type Result = Result<T, LedgerError>;
}

impl<T: Send + 'static> Handler<ReadLedger<T>> for LedgerActor {
    type Result = Result<T, LedgerError>;
    fn handle(&mut self, msg: ReadLedger<T>, _: &mut Self::Context) -> Self::Result {
        (msg.0)(&self.ledger)
    }
}

/// Move back pending payments whose deadline passed; returns how many.
#[derive(Message)]
#[rtype(result = "Result<usize, LedgerError>")]
pub struct ExpirePending;

impl Handler<ExpirePending> for LedgerActor {
    type Result = Result<usize, LedgerError>;
    fn handle(&mut self, _: ExpirePending, _: &mut Self::Context) -> Self::Result {
        self.ledger.expire_pending()
    }
}

/// Take a store's lease, or renew it if this process holds it: `Err(until)` when another
/// instance holds it, until when unless renewed. Answered `Err` only by a storage failure.
#[derive(Message)]
#[rtype(result = "Result<Result<crate::leases::Held, u64>, LedgerError>")]
pub struct AcquireLease(pub String);

impl Handler<AcquireLease> for LedgerActor {
    type Result = Result<Result<crate::leases::Held, u64>, LedgerError>;
    fn handle(&mut self, msg: AcquireLease, _: &mut Self::Context) -> Self::Result {
        let Some(leases) = &self.leases else {
            return Err(LedgerError::Invalid(
                "this cloud has no leases: it is the only instance".into(),
            ));
        };
        leases.acquire_or_wait(&msg.0, self.ledger.clock().now_ms())
    }
}

/// Give up every lease this process holds (a clean stop): other instances take the stores at
/// once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseLeases(pub Vec<crate::leases::Held>);

impl Handler<ReleaseLeases> for LedgerActor {
    type Result = ();
    fn handle(&mut self, msg: ReleaseLeases, _: &mut Self::Context) {
        if let Some(leases) = &self.leases {
            for held in &msg.0 {
                if let Err(error) = leases.release(held) {
                    tracing::warn!(%error, store_id = held.store_id, "releasing a lease failed");
                }
            }
        }
    }
}
