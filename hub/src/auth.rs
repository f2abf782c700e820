//! Authorization at the hub: verify the payment code offline with the account's key (or redeem
//! the payment token a face verification issued), refuse a replay, ask the cloud to move the
//! money, journal the decision, answer the edge.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use ed25519_dalek::VerifyingKey;
use paycode::hubsig::HubSigner;
use paycode::{SignedCode, Validity};
use protocol::{
    Allowance, AuthorizeReply, AuthorizeRequest, CloudReplyBody, Decision, DeclineReason,
    HubRequestBody, KeyBatch, KeyEntry, OfflineBatch, OfflinePayment, OfflineReservation,
    PaymentProof, VoidPayment,
};
use telemetry::PaymentMetrics;

use crate::{
    attempt::{Attempt, CloudResult, Effect, Event, Outcome, Payer},
    error::HubError,
    journal::{Journal, JournalEntry, JournalWorker},
    messages::{CheckCode, RedeemToken},
    offline::OfflineBook,
    uplink::{CallCloud, UplinkActor, UplinkEvent},
};

/// Mailbox bound of the authorization actor; a full mailbox makes the edge's query wait.
pub const AUTH_MAILBOX: usize = 256;
/// How often expired code nonces are pruned from the journal.
pub const NONCE_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Deadline of key-sync and void requests to the cloud.
pub const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one reconciliation batch.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// What offline authorization needs: the rules' book, the signing key, the journal for sequence
/// numbers, how to drain, and the metrics.
pub struct OfflineSetup {
    /// Rules and what the journal holds unreconciled.
    pub book: OfflineBook,
    /// The hub's signing key.
    pub signer: Arc<HubSigner>,
    /// The journal (sequence numbers only; writes go through the journal actor).
    pub journal: Journal,
    /// Entries per reconciliation batch.
    pub drain_batch: usize,
    /// How often a backlog is retried.
    pub drain_interval: Duration,
    /// Metrics.
    pub metrics: OfflineMetrics,
}

/// The hub's offline metrics.
#[derive(Clone)]
pub struct OfflineMetrics {
    backlog: prometheus::IntGauge,
    exposure: prometheus::IntGauge,
    approved: prometheus::IntCounter,
    reconciled: prometheus::IntCounter,
}

impl OfflineMetrics {
    /// Registers `facepay_hub_offline_backlog`, `facepay_hub_offline_exposure_minor`,
    /// `facepay_hub_offline_approved_total` and `facepay_hub_offline_reconciled_total`.
    pub fn register(registry: &prometheus::Registry) -> Self {
        OfflineMetrics {
            backlog: telemetry::register_gauge(
                registry,
                "facepay_hub_offline_backlog",
                "offline approvals journaled and not yet acknowledged by the cloud",
            ),
            exposure: telemetry::register_gauge(
                registry,
                "facepay_hub_offline_exposure_minor",
                "total amount of offline approvals not yet acknowledged, minor units",
            ),
            approved: telemetry::register_counter(
                registry,
                "facepay_hub_offline_approved_total",
                "payments approved offline",
            ),
            reconciled: telemetry::register_counter(
                registry,
                "facepay_hub_offline_reconciled_total",
                "offline approvals the cloud acknowledged (and the journal retired)",
            ),
        }
    }
}

/// What the authorization actor needs to know.
#[derive(Clone)]
pub struct AuthSettings {
    /// The one time source (code windows, offline approvals, nonce pruning).
    pub clock: clock::SharedClock,
    /// The hub's store.
    pub store_id: String,
    /// Code validity window and clock-skew tolerance.
    pub validity: Validity,
    /// How long to wait for the cloud.
    pub cloud_timeout: Duration,
}

/// Decides payments. Holds the account keys in memory (loaded from the journal at start).
pub struct AuthActor {
    settings: AuthSettings,
    keys: HashMap<String, VerifyingKey>,
    key_version: u64,
    journal: JournalWorker,
    clock: clock::SharedClock,
    uplink: Option<Addr<UplinkActor>>,
    metrics: PaymentMetrics,
    keys_gauge: prometheus::IntGauge,
    syncing: bool,
    verifier: Option<Recipient<RedeemToken>>,
    offline: OfflineBook,
    signer: Arc<HubSigner>,
    seqs: Journal,
    drain_batch: usize,
    drain_interval: Duration,
    draining: bool,
    syncing_allowances: bool,
    offline_metrics: OfflineMetrics,
}

impl AuthActor {
    /// A new actor with the keys the journal holds.
    pub fn new(
        settings: AuthSettings,
        stored_keys: Vec<KeyEntry>,
        key_version: u64,
        journal: JournalWorker,
        metrics: PaymentMetrics,
        keys_gauge: prometheus::IntGauge,
        offline: OfflineSetup,
    ) -> Self {
        let mut actor = AuthActor {
            clock: settings.clock.clone(),
            settings,
            keys: HashMap::new(),
            key_version,
            journal,
            uplink: None,
            metrics,
            keys_gauge,
            syncing: false,
            verifier: None,
            offline: offline.book,
            signer: offline.signer,
            seqs: offline.journal,
            drain_batch: offline.drain_batch,
            drain_interval: offline.drain_interval,
            draining: false,
            syncing_allowances: false,
            offline_metrics: offline.metrics,
        };
        actor.apply_keys(&stored_keys);
        actor.show_offline();
        actor
    }

    fn show_offline(&self) {
        self.offline_metrics
            .backlog
            .set(self.offline.entries() as i64);
        self.offline_metrics
            .exposure
            .set(self.offline.store_total());
    }

    /// Drains the journal to the cloud: queued voids first (read again before every batch), then
    /// posts, then offline approvals in batches, one request in flight, each retired only once the
    /// cloud acknowledged it, in answers about exactly what was sent. Stops at the first failure;
    /// the next tick or reconnect resumes where it stopped.
    fn start_drain(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.draining {
            return;
        }
        self.draining = true;
        let journal = self.journal.clone();
        let batch_size = self.drain_batch;
        let me = ctx.address();
        let drain = async move {
            loop {
                // Voids first, read again before every batch: a void queued while the backlog
                // drains goes before the next batch, never after it.
                let voids = journal.run(|j| j.pending_voids()).await;
                for void in voids {
                    if !deliver_void(&uplink, &journal, void).await {
                        return;
                    }
                }
                // Then the approvals to confirm, before their pending payments expire.
                let posts = journal.run(|j| j.pending_posts()).await;
                for batch in posts.chunks(batch_size.clamp(1, protocol::POST_BATCH_MAX)) {
                    if !deliver_posts(&uplink, &journal, batch.to_vec()).await {
                        return;
                    }
                }
                let batch = journal.run(move |j| j.offline_batch(batch_size)).await;
                if batch.is_empty() {
                    return;
                }
                let sent: Vec<(u64, String)> = batch
                    .iter()
                    .map(|e| (e.seq, e.payment_id.clone()))
                    .collect();
                let call = CallCloud {
                    body: HubRequestBody::Reconcile(OfflineBatch { entries: batch }),
                    timeout: DRAIN_TIMEOUT,
                };
                let results = match uplink.send(call).await {
                    // An answer about other entries retires nothing.
                    Ok(Ok(CloudReplyBody::Reconciled { results }))
                        if results
                            .iter()
                            .map(|r| (r.seq, r.payment_id.clone()))
                            .eq(sent.iter().cloned()) =>
                    {
                        results
                    }
                    other => {
                        tracing::info!(?other, "reconciliation paused; resumed on reconnect");
                        return;
                    }
                };
                let sorted = crate::offline::sort_results(&results);
                let stuck = sorted.refused;
                let (settled, conflicts) = (sorted.settled, sorted.conflicts);
                let retired = journal
                    .run(move |j| {
                        let mut retired = j.retire_offline(&settled)?;
                        for (seq, detail) in &conflicts {
                            if let Some(entry) = j.keep_conflict(*seq, detail)? {
                                retired.push(entry);
                            }
                        }
                        Ok(retired)
                    })
                    .await;
                me.do_send(OfflineRetired(retired));
                if stuck > 0 {
                    tracing::warn!(
                        stuck,
                        first = ?results.iter().find(|r| !r.settled()),
                        "the cloud refused offline entries; kept in the journal"
                    );
                    return;
                }
            }
        };
        ctx.spawn(drain.into_actor(self).map(|_, actor, _| {
            actor.draining = false;
        }));
    }

    /// Fetches this store's allowances page by page; a complete sync replaces what is held.
    fn start_allowance_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.syncing_allowances {
            return;
        }
        self.syncing_allowances = true;
        let sync = async move {
            let mut all = Vec::new();
            let mut after_account = None;
            loop {
                let call = CallCloud {
                    body: HubRequestBody::AllowanceSync { after_account },
                    timeout: MAINTENANCE_TIMEOUT,
                };
                match uplink.send(call).await {
                    Ok(Ok(CloudReplyBody::Allowances(batch))) => {
                        all.extend(batch.allowances);
                        match batch.next_after {
                            Some(next) => after_account = Some(next),
                            None => return Some(all),
                        }
                    }
                    other => {
                        tracing::info!(?other, "allowance sync failed; retried on reconnect");
                        return None;
                    }
                }
            }
        };
        ctx.spawn(sync.into_actor(self).map(|all, actor, ctx| {
            actor.syncing_allowances = false;
            if let Some(all) = all {
                ctx.notify(AllowancesSynced(all));
            }
        }));
    }

    fn apply_keys(&mut self, entries: &[KeyEntry]) {
        for entry in entries {
            match entry.public_key.as_deref().map(paycode::parse_public_key) {
                Some(Ok(key)) => {
                    self.keys.insert(entry.account_id.clone(), key);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, account_id = entry.account_id, "unusable key from the cloud ignored")
                }
                None => {
                    self.keys.remove(&entry.account_id);
                }
            }
        }
        self.keys_gauge.set(self.keys.len() as i64);
    }

    /// The checks of a request's shape that need no I/O.
    fn check_request(&self, request: &AuthorizeRequest) -> Result<(), Decision> {
        for (kind, id) in [
            ("store_id", &request.store_id),
            ("terminal_id", &request.terminal_id),
            ("order_id", &request.order_id),
        ] {
            protocol::validate_id(kind, id)
                .map_err(|e| Decision::declined(DeclineReason::InvalidRequest, e.to_string()))?;
        }
        if request.store_id != self.settings.store_id {
            return Err(Decision::declined(
                DeclineReason::InvalidRequest,
                format!(
                    "this hub serves store {}, not {}",
                    self.settings.store_id, request.store_id
                ),
            ));
        }
        if request.payment_id != protocol::payment_id(&request.store_id, &request.order_id) {
            return Err(Decision::declined(
                DeclineReason::InvalidRequest,
                "payment_id does not match store and order",
            ));
        }
        protocol::validate_amount(&request.amount_minor.into())
            .map_err(|e| Decision::declined(DeclineReason::InvalidAmount, e.to_string()))?;
        Ok(())
    }

    /// A payment code's form, signature (with the account's key) and validity window.
    fn check_code(&self, code: &str) -> Result<SignedCode, Decision> {
        let now_ms = self.clock.now_ms();
        let code = SignedCode::parse(code)
            .map_err(|e| Decision::declined(e.decline_reason(), e.to_string()))?;
        let key = self.keys.get(&code.account_id).ok_or_else(|| {
            Decision::declined(
                DeclineReason::UnknownAccount,
                format!("account {} is unknown to this store", code.account_id),
            )
        })?;
        code.verify(key, now_ms, self.settings.validity)
            .map_err(|e| Decision::declined(e.decline_reason(), e.to_string()))?;
        Ok(code)
    }

    /// The account a code's signature proves, when the code was refused only because it is
    /// outside its time window (expired, or not yet valid by this hub's clock).
    fn expired_code_account(&self, code: &str, refused: &Decision) -> Option<String> {
        if !matches!(
            refused.reason(),
            Some(DeclineReason::CodeExpired | DeclineReason::CodeNotYetValid)
        ) {
            return None;
        }
        let code = SignedCode::parse(code).ok()?;
        let key = self.keys.get(&code.account_id)?;
        // Checked at its own issue time: the signature, not the window.
        code.verify(key, code.issued_at_ms, self.settings.validity)
            .ok()
            .map(|()| code.account_id)
    }

    fn start_key_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.syncing {
            return;
        }
        self.syncing = true;
        let after_version = self.key_version;
        let call = uplink.send(CallCloud {
            body: HubRequestBody::KeySync { after_version },
            timeout: MAINTENANCE_TIMEOUT,
        });
        ctx.spawn(call.into_actor(self).map(|result, actor, ctx| {
            actor.syncing = false;
            match result {
                Ok(Ok(CloudReplyBody::Keys(batch))) => {
                    let more = batch.more && !batch.entries.is_empty();
                    ctx.notify(KeysArrived(batch));
                    if more {
                        ctx.notify(SyncKeys);
                    }
                }
                Ok(Ok(other)) => tracing::warn!(?other, "unexpected answer to key sync"),
                Ok(Err(error)) => tracing::warn!(%error, "key sync failed; retried on reconnect"),
                Err(error) => tracing::warn!(%error, "uplink unavailable for key sync"),
            }
        }));
    }
}

/// Delivers a void; true once the cloud acknowledged it (about this very payment) and the journal
/// retired it.
async fn deliver_void(
    uplink: &Addr<UplinkActor>,
    journal: &JournalWorker,
    void: VoidPayment,
) -> bool {
    let call = CallCloud {
        body: HubRequestBody::Void(void.clone()),
        timeout: MAINTENANCE_TIMEOUT,
    };
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Voided {
            payment_id,
            reversed,
        })) if payment_id == void.payment_id => {
            tracing::info!(payment_id = void.payment_id, reversed, "void delivered");
            journal.run(move |j| j.retire_void(&void)).await;
            true
        }
        other => {
            tracing::info!(
                payment_id = void.payment_id,
                ?other,
                "void not delivered yet; retried on the drain timer and on reconnect"
            );
            false
        }
    }
}

/// Delivers a batch of posts; true once the cloud acknowledged them (about these very payments)
/// and the journal retired them.
async fn deliver_posts(
    uplink: &Addr<UplinkActor>,
    journal: &JournalWorker,
    posts: Vec<protocol::PostPayment>,
) -> bool {
    let call = CallCloud {
        body: HubRequestBody::Post(protocol::PostBatch {
            posts: posts.clone(),
        }),
        timeout: MAINTENANCE_TIMEOUT,
    };
    let expected: Vec<String> = posts.iter().map(|p| p.payment_id.clone()).collect();
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Posted {
            payment_ids,
            posted,
        })) if payment_ids == expected && posted.len() == expected.len() => {
            for (payment_id, posted) in payment_ids.iter().zip(&posted) {
                if !posted {
                    tracing::error!(
                        payment_id,
                        "the cloud moved this approved payment back before its post; an operator settles it"
                    );
                }
            }
            journal
                .run(move |j| posts.iter().try_for_each(|p| j.retire_post(p)))
                .await;
            true
        }
        other => {
            tracing::info!(
                posts = expected.len(),
                ?other,
                "posts not delivered yet; retried on the drain timer and on reconnect"
            );
            false
        }
    }
}

impl Actor for AuthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(AUTH_MAILBOX);
        // Voids and the backlog are retried on a timer as well as on reconnect: a void that
        // failed once must not wait for the next outage to be delivered.
        ctx.run_interval(self.drain_interval, |actor, ctx| actor.start_drain(ctx));
        ctx.run_interval(NONCE_PRUNE_INTERVAL, |actor, _| {
            let horizon =
                actor.settings.validity.window_ms + 2 * actor.settings.validity.clock_skew_ms;
            let cutoff_ms = actor.clock.now_ms().saturating_sub(horizon);
            actor.journal.spawn(move |j| {
                let removed = j.prune_nonces(cutoff_ms)?;
                tracing::debug!(removed, "pruned expired code nonces");
                Ok(())
            });
        });
    }
}

/// Give the actor its uplink (which is created after it, because it reports back to it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachUplink(pub Addr<UplinkActor>);

impl Handler<AttachUplink> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: AttachUplink, _: &mut Self::Context) {
        self.uplink = Some(msg.0);
    }
}

/// Give the actor the verify actor, which redeems payment tokens.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachVerifier(pub Recipient<RedeemToken>);

impl Handler<AttachVerifier> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: AttachVerifier, _: &mut Self::Context) {
        self.verifier = Some(msg.0);
    }
}

impl Handler<CheckCode> for AuthActor {
    type Result = Result<SignedCode, Decision>;
    fn handle(&mut self, msg: CheckCode, _: &mut Self::Context) -> Self::Result {
        self.check_code(&msg.0)
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct KeysArrived(KeyBatch);

impl Handler<KeysArrived> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: KeysArrived, ctx: &mut Self::Context) {
        if msg.0.entries.is_empty() {
            return;
        }
        self.apply_keys(&msg.0.entries);
        let newest = msg.0.entries.iter().map(|e| e.version).max().unwrap_or(0);
        // A broadcast that skips versions means some were missed: fetch them.
        let gap = msg.0.entries.iter().map(|e| e.version).min().unwrap_or(0) > self.key_version + 1;
        self.key_version = self.key_version.max(newest);
        let entries = msg.0.entries;
        self.journal
            .spawn(move |j| j.store_keys(&entries).map(|_| ()));
        if gap {
            ctx.notify(SyncKeys);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SyncKeys;

impl Handler<SyncKeys> for AuthActor {
    type Result = ();
    fn handle(&mut self, _: SyncKeys, ctx: &mut Self::Context) {
        self.start_key_sync(ctx);
    }
}

impl Handler<UplinkEvent> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        match msg {
            UplinkEvent::CloudConnected => {
                self.start_key_sync(ctx);
                self.start_allowance_sync(ctx);
                self.start_drain(ctx);
            }
            UplinkEvent::KeysBroadcast(batch) => ctx.notify(KeysArrived(batch)),
            UplinkEvent::AllowancesPushed(batch) => ctx.notify(AllowancesArrived(batch.allowances)),
            UplinkEvent::TemplatesPushed(_) | UplinkEvent::RevocationListPushed(_) => {}
        }
    }
}

/// Authorize a payment an edge presents.
#[derive(Message)]
#[rtype(result = "AuthorizeReply")]
pub struct Authorize(pub AuthorizeRequest);

impl Handler<Authorize> for AuthActor {
    type Result = ResponseFuture<AuthorizeReply>;

    fn handle(&mut self, msg: Authorize, ctx: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        self.metrics.request();
        let request = msg.0;
        let checked = self.check_request(&request);
        let code_checked = match (&checked, &request.proof) {
            (Ok(()), PaymentProof::Code(code)) => Some(self.check_code(code)),
            _ => None,
        };
        // A code refused only for its time window still proves who shows it.
        let window_only = match (&code_checked, &request.proof) {
            (Some(Err(refused)), PaymentProof::Code(code)) => {
                self.expired_code_account(code, refused)
            }
            _ => None,
        };
        let hub = HubParts {
            me: ctx.address(),
            journal: self.journal.clone(),
            uplink: self.uplink.clone(),
            cloud_timeout: self.settings.cloud_timeout,
            approved_offline: self.offline_metrics.approved.clone(),
        };
        let verifier = self.verifier.clone();
        let metrics = self.metrics.clone();
        let now_ms = self.clock.now_ms();
        Box::pin(async move {
            let mut entry = JournalEntry::for_request(
                &request,
                Decision::declined(DeclineReason::Internal, ""),
                now_ms,
            );
            let proven = match (checked, code_checked, &request.proof) {
                (Err(decision), _, _) => Err(decision),
                (Ok(()), Some(Err(decision)), _) => Err(decision),
                (Ok(()), Some(Ok(code)), _) => Ok(Payer {
                    account_id: code.account_id.clone(),
                    nonce: code.nonce_hex(),
                    keep_from_ms: code.issued_at_ms,
                    token: false,
                }),
                (Ok(()), None, PaymentProof::Token(token)) => {
                    redeem(verifier.as_ref(), token, &request.terminal_id).await
                }
                (Ok(()), None, PaymentProof::Code(_)) => unreachable!("codes are checked above"),
            };
            let outcome = match &proven {
                // A retry of an order this hub already approved hears so even when its proof no
                // longer passes (the code expired meanwhile, a clock stepped): "declined" would
                // be a lie about money that moved. Found by the chaos suite.
                Err(decision) => Outcome {
                    decision: paid_despite_expiry(&request, window_only, &hub.journal)
                        .await
                        .unwrap_or_else(|| decision.clone()),
                    offline: false,
                    answered_attempt: None,
                },
                Ok(proven) => {
                    entry.account_id = Some(proven.account_id.clone());
                    entry.code_nonce = Some(proven.nonce.clone());
                    authorize_verified(&request, proven, &hub).await
                }
            };
            entry.decision = outcome.decision.clone();
            // The decision and the closing of the attempt it answers are journaled together
            // before the edge hears it; a failure here stops the hub (the restart voids the
            // attempt), it never answers "declined" for money that moved.
            let attempt = outcome.answered_attempt.clone();
            hub.journal
                .run(move |j| j.record(&entry, attempt.as_ref()))
                .await;
            // Confirm an approval at once (the drain retries it): until posted, the cloud's
            // payment is pending, and a lost disk would let it expire.
            if let (Decision::Approved { .. }, Some(post), Some(uplink)) = (
                &outcome.decision,
                outcome.answered_attempt.clone(),
                hub.uplink.clone(),
            ) {
                let journal = hub.journal.clone();
                actix::spawn(async move {
                    deliver_posts(&uplink, &journal, vec![post]).await;
                });
            }
            metrics.outcome(outcome.decision.reason(), started.elapsed());
            AuthorizeReply {
                payment_id: request.payment_id,
                decision: outcome.decision,
                offline: outcome.offline,
            }
        })
    }
}

/// The answer for a request whose code was refused only for its time window (`account`: the
/// account its signature proves) when its order is paid here by that account with the same
/// amount: "approved, already paid". Any other refused proof never reaches the journal.
async fn paid_despite_expiry(
    request: &AuthorizeRequest,
    account: Option<String>,
    journal: &JournalWorker,
) -> Option<Decision> {
    let account = account?;
    let payment_id = request.payment_id.clone();
    let paid = journal.run(move |j| j.paid(&payment_id)).await?;
    (paid.account_id == account
        && paid.amount_minor == request.amount_minor
        && paid.currency == request.currency.as_str())
    .then_some(Decision::Approved {
        account_id: paid.account_id,
        already_paid: true,
    })
}

/// What an authorization in flight needs from the hub.
struct HubParts {
    me: Addr<AuthActor>,
    journal: JournalWorker,
    uplink: Option<Addr<UplinkActor>>,
    cloud_timeout: Duration,
    approved_offline: prometheus::IntCounter,
}

async fn redeem(
    verifier: Option<&Recipient<RedeemToken>>,
    token: &str,
    terminal_id: &str,
) -> Result<Payer, Decision> {
    let Some(verifier) = verifier else {
        return Err(Decision::declined(
            DeclineReason::TokenInvalid,
            "this hub issues no payment tokens",
        ));
    };
    let redeem = RedeemToken {
        token: token.to_owned(),
        terminal_id: terminal_id.to_owned(),
    };
    match verifier.send(redeem).await {
        Ok(Ok(t)) => Ok(Payer {
            account_id: t.account_id,
            nonce: token.to_owned(),
            keep_from_ms: t.expires_at_ms,
            token: true,
        }),
        Ok(Err(detail)) => Err(Decision::declined(DeclineReason::TokenInvalid, detail)),
        Err(e) => Err(Decision::declined(
            DeclineReason::Internal,
            format!("token check unavailable: {e}"),
        )),
    }
}

/// Carries one attempt's state machine ([`crate::attempt`]): performs each effect it asks for
/// and feeds back what came of it, until it finishes.
async fn authorize_verified(request: &AuthorizeRequest, payer: &Payer, hub: &HubParts) -> Outcome {
    let (mut attempt, mut effect) = Attempt::start(request, payer.clone(), hub.uplink.is_some());
    loop {
        let event = match effect {
            Effect::LookUpOrder => {
                let payment_id = request.payment_id.clone();
                Event::Order(hub.journal.run(move |j| j.paid(&payment_id)).await)
            }
            Effect::ReserveNonce => {
                let (account_id, nonce, payment_id, issued_at_ms) = (
                    payer.account_id.clone(),
                    payer.nonce.clone(),
                    request.payment_id.clone(),
                    payer.keep_from_ms,
                );
                Event::Reserved(
                    hub.journal
                        .run(move |j| {
                            j.reserve_nonce(&account_id, &nonce, &payment_id, issued_at_ms)
                        })
                        .await,
                )
            }
            Effect::RecordAttempt(record) => {
                match hub.journal.run(move |j| j.begin_attempt(&record)).await {
                    true => Event::AttemptRecorded,
                    false => Event::AttemptRefused,
                }
            }
            Effect::Send(_) => Event::Cloud(send_attempt(request, payer, hub).await),
            Effect::DropAttempt(record) => {
                hub.journal.run(move |j| j.drop_attempt(&record)).await;
                Event::AttemptDropped
            }
            Effect::DecideOffline { failure } => {
                Event::Offline(decide_offline(request, payer, hub, &failure).await)
            }
            Effect::Void(record) => {
                void_attempt(record, hub).await;
                Event::Voided
            }
            Effect::Finish(outcome) => return outcome,
        };
        effect = attempt.on(event);
    }
}

/// Sends a recorded attempt to the cloud and reports what the link did with it.
async fn send_attempt(request: &AuthorizeRequest, payer: &Payer, hub: &HubParts) -> CloudResult {
    let Some(uplink) = hub.uplink.as_ref() else {
        return CloudResult::NotSent("the hub has no cloud link yet".into());
    };
    let Ok(offline_reservation) = hub.me.send(ReservationOf(payer.account_id.clone())).await else {
        return CloudResult::NotSent("the store system is stopping".into());
    };
    let call = CallCloud {
        body: HubRequestBody::Authorize(Attempt::cloud_request(
            request,
            payer,
            offline_reservation,
        )),
        timeout: hub.cloud_timeout,
    };
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Authorized {
            payment_id,
            decision,
            allowance,
        })) => {
            if let (Some(allowance), true) = (allowance, payment_id == request.payment_id) {
                hub.me.do_send(AllowancesArrived(vec![allowance]));
            }
            CloudResult::Answered {
                payment_id,
                decision,
            }
        }
        // Not sent: nothing can have been applied.
        Ok(Err(
            error @ (HubError::CircuitOpen(_)
            | HubError::UplinkSaturated
            | HubError::CloudDisconnected),
        )) => CloudResult::NotSent(error.to_string()),
        // The cloud failed while it handled the request: it may or may not have applied it.
        Ok(Ok(CloudReplyBody::Error { detail })) => {
            CloudResult::Unanswered(format!("the cloud failed: {detail}"))
        }
        Ok(Ok(other)) => CloudResult::Unanswered(format!("unexpected cloud answer {other:?}")),
        Ok(Err(error)) => CloudResult::Unanswered(error.to_string()),
        Err(error) => CloudResult::Unanswered(error.to_string()),
    }
}

/// Decides without the cloud. Approved: the entry is signed, journaled and flushed before the
/// edge hears it, and reconciled later. (An attempt the cloud may have received is voided by the
/// state machine after this, whatever is decided.)
async fn decide_offline(
    request: &AuthorizeRequest,
    payer: &Payer,
    hub: &HubParts,
    failure: &str,
) -> Decision {
    let approve = ApproveOffline {
        request: request.clone(),
        account_id: payer.account_id.clone(),
        nonce: payer.nonce.clone(),
    };
    match hub.me.send(approve).await {
        Ok(Ok(entry)) => {
            let recorded = entry.clone();
            hub.journal.run(move |j| j.record_offline(&recorded)).await;
            hub.approved_offline.inc();
            tracing::info!(
                payment_id = request.payment_id,
                seq = entry.seq,
                failure,
                "approved offline"
            );
            Decision::Approved {
                account_id: payer.account_id.clone(),
                already_paid: false,
            }
        }
        Ok(Err(Decision::Declined { reason, detail })) => {
            Decision::declined(reason, format!("{detail} ({failure}); nothing was charged"))
        }
        Ok(Err(approved)) => approved,
        Err(error) => {
            Decision::declined(DeclineReason::Internal, format!("hub unavailable: {error}"))
        }
    }
}

/// Voids an attempt whose outcome is unknown: closed and queued durably, then delivered.
async fn void_attempt(attempt: VoidPayment, hub: &HubParts) {
    let voided = attempt.clone();
    hub.journal.run(move |j| j.void_attempt(&voided)).await;
    if let Some(uplink) = hub.uplink.clone() {
        let journal = hub.journal.clone();
        actix::spawn(async move {
            deliver_void(&uplink, &journal, attempt).await;
        });
    }
}

/// Check the offline rules for a payment and, if they pass, sign it and count it as held.
#[derive(Message)]
#[rtype(result = "Result<OfflinePayment, Decision>")]
struct ApproveOffline {
    request: AuthorizeRequest,
    account_id: String,
    nonce: String,
}

impl Handler<ApproveOffline> for AuthActor {
    type Result = Result<OfflinePayment, Decision>;
    fn handle(&mut self, msg: ApproveOffline, _: &mut Self::Context) -> Self::Result {
        let request = &msg.request;
        self.offline
            .check(&msg.account_id, request.amount_minor, request.currency)?;
        let seq = self
            .seqs
            .next_seq()
            .unwrap_or_else(|e| storage::fail_stop("numbering an offline approval", &e));
        let mut entry = OfflinePayment {
            seq,
            payment_id: request.payment_id.clone(),
            store_id: request.store_id.clone(),
            terminal_id: request.terminal_id.clone(),
            order_id: request.order_id.clone(),
            account_id: msg.account_id,
            nonce: msg.nonce,
            amount_minor: request.amount_minor,
            currency: request.currency,
            approved_at_ms: self.clock.now_ms(),
            signature: String::new(),
        };
        self.signer.sign(&mut entry);
        self.offline.hold(&entry.account_id, entry.amount_minor);
        self.show_offline();
        Ok(entry)
    }
}

/// What the store may still hold unreconciled for an account, for the cloud to count.
#[derive(Message)]
#[rtype(result = "OfflineReservation")]
struct ReservationOf(String);

impl Handler<ReservationOf> for AuthActor {
    type Result = MessageResult<ReservationOf>;
    fn handle(&mut self, msg: ReservationOf, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.offline.reservation(&msg.0))
    }
}

/// The cloud acknowledged these entries and the journal retired them.
#[derive(Message)]
#[rtype(result = "()")]
struct OfflineRetired(Vec<OfflinePayment>);

impl Handler<OfflineRetired> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: OfflineRetired, _: &mut Self::Context) {
        for entry in &msg.0 {
            self.offline.release(&entry.account_id, entry.amount_minor);
        }
        self.offline_metrics.reconciled.inc_by(msg.0.len() as u64);
        self.show_offline();
    }
}

/// Grants or revocations from the cloud.
#[derive(Message)]
#[rtype(result = "()")]
struct AllowancesArrived(Vec<Allowance>);

impl Handler<AllowancesArrived> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: AllowancesArrived, _: &mut Self::Context) {
        for allowance in &msg.0 {
            self.offline.set_allowance(allowance.clone());
        }
        let allowances = msg.0;
        self.journal
            .spawn(move |j| j.store_allowances(&allowances).map(|_| ()));
    }
}

/// A complete allowance sync: what the cloud lists replaces what is held.
#[derive(Message)]
#[rtype(result = "()")]
struct AllowancesSynced(Vec<Allowance>);

impl Handler<AllowancesSynced> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: AllowancesSynced, _: &mut Self::Context) {
        let listed: HashSet<String> = msg.0.iter().map(|a| a.account_id.clone()).collect();
        for allowance in &msg.0 {
            self.offline.set_allowance(allowance.clone());
        }
        self.offline.keep_only(&listed);
        let allowances = msg.0;
        self.journal.spawn(move |j| {
            j.store_allowances(&allowances)?;
            j.keep_only_allowances(&listed).map(|_| ())
        });
    }
}
