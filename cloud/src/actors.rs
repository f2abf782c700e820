//! The cloud's actors: the ledger on its own thread, and the link that serves the hubs over MQTT.

use std::time::Instant;

use actix::prelude::*;
use mqtt::{LinkEvent, QoS};
use protocol::{
    AccountView, Allowance, AllowanceBatch, CloudReply, CloudReplyBody, Deposit, HubRequest,
    HubRequestBody, KeyBatch, KeyEntry, LedgerTotals, OpenAccount, ReconcileOutcome,
    ReconcileResult, TemplateBatch, TemplateChange, TemplateUpdate, TransferView,
};
use telemetry::PaymentMetrics;

use crate::{
    enroll::{IdentifyCmd, IdentityActor, TemplateSyncCmd},
    error::LedgerError,
    ledger::Ledger,
};

/// Owns the ledger database. Runs on a dedicated thread (a `SyncArbiter` of one) because every
/// operation ends in a disk flush; one thread also serialises all writes.
pub struct LedgerActor {
    ledger: Ledger,
    offline: Option<OfflineMetrics>,
}

impl LedgerActor {
    /// Wraps an opened ledger.
    pub fn new(ledger: Ledger) -> Self {
        LedgerActor {
            ledger,
            offline: None,
        }
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

/// The cloud's reconciliation metrics.
#[derive(Clone)]
pub struct OfflineMetrics {
    applied: prometheus::IntCounter,
    conflicts: prometheus::IntCounter,
    rejected: prometheus::IntCounter,
    code_reuses: prometheus::IntCounter,
    in_debt: prometheus::IntGauge,
}

impl OfflineMetrics {
    /// Registers `facepay_cloud_offline_{applied,conflicts,rejected,code_reuse}_total` and
    /// `facepay_cloud_accounts_in_debt`.
    pub fn register(registry: &prometheus::Registry) -> Self {
        OfflineMetrics {
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

/// What the ledger answers a hub, and the allowance revocations to broadcast to every hub.
pub struct HubAnswer {
    /// The reply.
    pub body: CloudReplyBody,
    /// Accounts that lost their offline allowances (they went into debt).
    pub revocations: Vec<Allowance>,
}

/// Carry out a hub's request against the ledger.
#[derive(Message)]
#[rtype(result = "HubAnswer")]
pub struct ApplyHubRequest(pub HubRequest);

impl Handler<ApplyHubRequest> for LedgerActor {
    type Result = MessageResult<ApplyHubRequest>;

    fn handle(&mut self, msg: ApplyHubRequest, _: &mut Self::Context) -> Self::Result {
        let HubRequest { store_id, body, .. } = msg.0;
        let mut revocations = Vec::new();
        let reply = match body {
            HubRequestBody::Authorize(request) => self
                .ledger
                .authorize_with_allowance(&store_id, &request)
                .map(|(decision, allowance)| CloudReplyBody::Authorized {
                    payment_id: request.payment_id,
                    decision,
                    allowance,
                }),
            HubRequestBody::Reconcile(batch) => {
                let applied = self.ledger.reconcile(&store_id, &batch.entries);
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
            HubRequestBody::AllowanceSync { after_account } => self
                .ledger
                .allowances(&store_id, after_account.as_deref())
                .map(|(allowances, next_after)| {
                    CloudReplyBody::Allowances(AllowanceBatch {
                        allowances,
                        next_after,
                    })
                }),
            HubRequestBody::Void(request) => {
                self.ledger
                    .void(&store_id, &request)
                    .map(|reversed| CloudReplyBody::Voided {
                        payment_id: request.payment_id,
                        reversed,
                    })
            }
            HubRequestBody::Post(protocol::PostBatch { posts }) => self
                .ledger
                .post_batch(&store_id, &posts)
                .map(|posted| CloudReplyBody::Posted {
                    payment_ids: posts.into_iter().map(|p| p.payment_id).collect(),
                    posted,
                }),
            HubRequestBody::KeySync { after_version } => self
                .ledger
                .keys_after(after_version)
                .map(|(entries, more)| CloudReplyBody::Keys(KeyBatch { entries, more })),
            HubRequestBody::TemplateSync { .. } | HubRequestBody::Identify(_) => Err(
                LedgerError::Invalid("identity requests are served by the identity actor".into()),
            ),
        };
        let body = reply.unwrap_or_else(|error| {
            if let LedgerError::Storage(_) = error {
                // Nobody knows what the ledger holds after a storage error: stop, and let the
                // restart read it (the hub hears nothing, and voids or resends).
                storage::fail_stop("a ledger operation", &error);
            }
            tracing::error!(%error, store_id, "ledger operation failed");
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

/// Operator changes to the ledger beside accounts.
#[derive(Message)]
#[rtype(result = "Result<Option<AccountView>, LedgerError>")]
pub enum AdminCmd {
    /// Register a store hub's signing key.
    SetHubKey {
        /// The store.
        store_id: String,
        /// Its hub's public key.
        public_key: String,
    },
    /// Pay money into a customer account.
    Deposit {
        /// The account.
        account_id: String,
        /// The deposit.
        deposit: Deposit,
    },
}

impl Handler<AdminCmd> for LedgerActor {
    type Result = Result<Option<AccountView>, LedgerError>;
    fn handle(&mut self, msg: AdminCmd, _: &mut Self::Context) -> Self::Result {
        match msg {
            AdminCmd::SetHubKey {
                store_id,
                public_key,
            } => self
                .ledger
                .set_hub_key(&store_id, &public_key)
                .map(|_| None),
            AdminCmd::Deposit {
                account_id,
                deposit,
            } => {
                let account = self.ledger.deposit(&account_id, &deposit)?;
                self.count_debts();
                Ok(Some(account))
            }
        }
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

/// Read-only questions about the ledger.
#[derive(Message, Clone)]
#[rtype(result = "Result<LedgerAnswer, LedgerError>")]
pub enum LedgerQuery {
    /// One account.
    Account(String),
    /// All accounts.
    Accounts,
    /// All transfers.
    Transfers,
    /// Totals per currency.
    Totals,
    /// Accounts in debt.
    Debts,
    /// Offline payments that could not be applied as approved.
    Conflicts,
    /// Offline payments applied although their code had already paid another payment.
    CodeReuses,
    /// The operators' money-moving actions.
    Audit,
}

/// Answers to [`LedgerQuery`]; as JSON, just what each holds.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum LedgerAnswer {
    /// One account, if it exists.
    Account(Option<AccountView>),
    /// All accounts.
    Accounts(Vec<AccountView>),
    /// All transfers.
    Transfers(Vec<TransferView>),
    /// Totals per currency.
    Totals(Vec<LedgerTotals>),
    /// Accounts in debt.
    Debts(Vec<AccountView>),
    /// Reconciliation conflicts.
    Conflicts(Vec<crate::ledger::Conflict>),
    /// Codes that paid twice.
    CodeReuses(Vec<crate::ledger::CodeReuse>),
    /// The audit trail.
    Audit(Vec<protocol::AuditEntry>),
}

impl Handler<LedgerQuery> for LedgerActor {
    type Result = Result<LedgerAnswer, LedgerError>;
    fn handle(&mut self, msg: LedgerQuery, _: &mut Self::Context) -> Self::Result {
        Ok(match msg {
            LedgerQuery::Account(id) => LedgerAnswer::Account(self.ledger.account(&id)?),
            LedgerQuery::Accounts => LedgerAnswer::Accounts(self.ledger.accounts()?),
            LedgerQuery::Transfers => LedgerAnswer::Transfers(self.ledger.transfers()?),
            LedgerQuery::Totals => LedgerAnswer::Totals(self.ledger.totals()?),
            LedgerQuery::Debts => LedgerAnswer::Debts(self.ledger.debts()?),
            LedgerQuery::Conflicts => LedgerAnswer::Conflicts(self.ledger.conflicts()?),
            LedgerQuery::CodeReuses => LedgerAnswer::CodeReuses(self.ledger.code_reuses()?),
            LedgerQuery::Audit => LedgerAnswer::Audit(self.ledger.audit_trail()?),
        })
    }
}

/// Mailbox bound of the hub link: link events wait in the MQTT client beyond this.
pub const HUB_LINK_MAILBOX: usize = 64;

/// Serves the hubs: takes their requests off MQTT, applies them to the ledger, publishes replies,
/// and broadcasts account key changes.
pub struct HubLinkActor {
    client: mqtt::Client,
    ledger: crate::bounded::Bounded<LedgerActor>,
    identity: crate::bounded::Bounded<IdentityActor>,
    metrics: PaymentMetrics,
    connected: prometheus::IntGauge,
    /// Stores with a merchant account: the only request topics served.
    known_stores: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Whether `store_id` is a store the cloud serves: a valid id with a merchant account. Any
/// certificate of the fleet may publish on the request topic named after its common name (the
/// broker's ACL pattern); only hubs of real stores are answered.
async fn is_store(
    ledger: &crate::bounded::Bounded<LedgerActor>,
    known: &std::sync::Mutex<std::collections::HashSet<String>>,
    store_id: &str,
) -> bool {
    if protocol::validate_id("store_id", store_id).is_err() {
        return false;
    }
    if known.lock().expect("not poisoned").contains(store_id) {
        return true;
    }
    let merchant = matches!(
        ledger.send(LedgerQuery::Account(store_id.to_owned())).await,
        Ok(Ok(LedgerAnswer::Account(Some(view))))
            if view.kind == protocol::AccountKind::Merchant && !view.closed
    );
    if merchant {
        known
            .lock()
            .expect("not poisoned")
            .insert(store_id.to_owned());
    }
    merchant
}

impl HubLinkActor {
    /// A link over an MQTT client whose event loop the caller drives into this actor.
    pub fn new(
        client: mqtt::Client,
        ledger: crate::bounded::Bounded<LedgerActor>,
        identity: crate::bounded::Bounded<IdentityActor>,
        metrics: PaymentMetrics,
        connected: prometheus::IntGauge,
    ) -> Self {
        HubLinkActor {
            client,
            ledger,
            identity,
            metrics,
            connected,
            known_stores: Default::default(),
        }
    }
}

/// How often the ledger moves back pending payments whose hub never confirmed them.
pub const EXPIRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl Actor for HubLinkActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(HUB_LINK_MAILBOX);
        ctx.run_interval(EXPIRY_INTERVAL, |actor, _| {
            let ledger = actor.ledger.clone();
            actix::spawn(async move {
                match ledger.send(ExpirePending).await {
                    Ok(Ok(0)) | Err(_) => {}
                    Ok(Ok(expired)) => {
                        tracing::warn!(expired, "pending payments expired unconfirmed")
                    }
                    Ok(Err(error)) => storage::fail_stop("expiring pending payments", &error),
                }
            });
        });
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

/// Something happened on the MQTT link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkEventMsg(pub LinkEvent);

impl Handler<LinkEventMsg> for HubLinkActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: LinkEventMsg, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        match msg.0 {
            LinkEvent::Connected => {
                self.connected.set(1);
                tracing::info!("cloud connected to broker");
                Box::pin(async move {
                    if let Err(error) = client
                        .subscribe(protocol::topics::cloud_requests_filter(), QoS::AtLeastOnce)
                        .await
                    {
                        tracing::warn!(%error, "subscribing to hub requests failed");
                    }
                })
            }
            LinkEvent::Disconnected(_) => {
                self.connected.set(0);
                Box::pin(async {})
            }
            LinkEvent::Message { topic, payload } => {
                let Some(store_id) =
                    protocol::topics::store_of_request_topic(&topic).map(str::to_owned)
                else {
                    return Box::pin(async {});
                };
                let request: HubRequest = match protocol::decode(&payload) {
                    Ok(r) => r,
                    Err(error) => {
                        tracing::warn!(%error, store_id, "unreadable hub request dropped");
                        return Box::pin(async {});
                    }
                };
                if request.store_id != store_id {
                    tracing::warn!(
                        store_id,
                        claimed = request.store_id,
                        "hub request on another store's topic dropped"
                    );
                    return Box::pin(async {});
                }
                let ledger = self.ledger.clone();
                let identity = self.identity.clone();
                let metrics = self.metrics.clone();
                let known_stores = self.known_stores.clone();
                Box::pin(async move {
                    let started = Instant::now();
                    let request_id = request.request_id;
                    let is_payment = matches!(request.body, HubRequestBody::Authorize(_));
                    if is_payment {
                        metrics.request();
                    }
                    let known = is_store(&ledger, &known_stores, &store_id).await;
                    if !known {
                        tracing::warn!(
                            store_id,
                            "request from an identity that is no store's hub refused"
                        );
                    }
                    let body = match request.body {
                        _ if !known => CloudReplyBody::Error {
                            detail: format!("{store_id:?} is not a store with a merchant account"),
                        },
                        HubRequestBody::Identify(identify) => {
                            match identity.send(IdentifyCmd(identify)).await {
                                Ok(Ok(found)) => CloudReplyBody::Identified(found),
                                Ok(Err(e)) => CloudReplyBody::Error {
                                    detail: e.to_string(),
                                },
                                Err(e) => CloudReplyBody::Error {
                                    detail: format!("identity unavailable: {e}"),
                                },
                            }
                        }
                        HubRequestBody::TemplateSync { after_version } => {
                            let sync = TemplateSyncCmd {
                                store_id: store_id.clone(),
                                after_version,
                            };
                            match identity.send(sync).await {
                                Ok(Ok(batch)) => CloudReplyBody::Templates(batch),
                                Ok(Err(e)) => CloudReplyBody::Error {
                                    detail: e.to_string(),
                                },
                                Err(e) => CloudReplyBody::Error {
                                    detail: format!("identity unavailable: {e}"),
                                },
                            }
                        }
                        _ => match ledger.send(ApplyHubRequest(request)).await {
                            Ok(answer) => {
                                if !answer.revocations.is_empty() {
                                    publish_allowances(&client, answer.revocations).await;
                                }
                                answer.body
                            }
                            Err(error) => CloudReplyBody::Error {
                                detail: format!("ledger unavailable: {error}"),
                            },
                        },
                    };
                    if let CloudReplyBody::Authorized { decision, .. } = &body {
                        metrics.outcome(decision.reason(), started.elapsed());
                    }
                    let reply = protocol::encode(&CloudReply { request_id, body });
                    if let Err(error) = client
                        .publish(
                            protocol::topics::store_replies(&store_id),
                            QoS::AtLeastOnce,
                            false,
                            reply,
                        )
                        .await
                    {
                        // The hub will time out, void the attempt and be told the truth on retry.
                        tracing::warn!(%error, store_id, request_id, "publishing reply failed");
                    }
                })
            }
        }
    }
}

/// Tells every hub that accounts lost their offline allowances. A hub that misses it (away, broker
/// restarted) learns it from its allowance sync on reconnect.
async fn publish_allowances(client: &mqtt::Client, allowances: Vec<Allowance>) {
    let batch = protocol::encode(&AllowanceBatch {
        allowances,
        next_after: None,
    });
    if let Err(error) = client
        .publish(
            protocol::topics::allowance_updates(),
            QoS::AtLeastOnce,
            false,
            batch,
        )
        .await
    {
        tracing::warn!(%error, "broadcasting allowance revocations failed");
    }
}

/// Broadcast allowance revocations to every hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BroadcastAllowances(pub Vec<Allowance>);

impl Handler<BroadcastAllowances> for HubLinkActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: BroadcastAllowances, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        Box::pin(async move { publish_allowances(&client, msg.0).await })
    }
}

/// Broadcast account key changes to every hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BroadcastKeys(pub Vec<KeyEntry>);

impl Handler<BroadcastKeys> for HubLinkActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: BroadcastKeys, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        Box::pin(async move {
            let batch = protocol::encode(&KeyBatch {
                entries: msg.0,
                more: false,
            });
            // Hubs that miss this (offline, broker down) catch up with a key sync on reconnect.
            if let Err(error) = client
                .publish(
                    protocol::topics::key_updates(),
                    QoS::AtLeastOnce,
                    false,
                    batch,
                )
                .await
            {
                tracing::warn!(%error, "broadcasting key change failed");
            }
        })
    }
}

/// Push a template change to the hubs that need it: an entry to its home store's hub, a
/// revocation to every hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BroadcastTemplates(pub TemplateUpdate);

impl Handler<BroadcastTemplates> for HubLinkActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: BroadcastTemplates, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        let topic = match &msg.0.change {
            TemplateChange::Upsert(entry) => {
                protocol::topics::store_templates(&entry.home_store_id)
            }
            TemplateChange::Revoke { .. } => protocol::topics::template_revocations(),
        };
        Box::pin(async move {
            let batch = protocol::encode(&TemplateBatch {
                up_to_version: msg.0.version,
                updates: vec![msg.0],
                more: false,
            });
            // Hubs that miss this catch up with a template sync on reconnect.
            if let Err(error) = client.publish(topic, QoS::AtLeastOnce, false, batch).await {
                tracing::warn!(%error, "pushing a template change failed");
            }
        })
    }
}
