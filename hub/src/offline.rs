//! Offline payment at the hub: the book of what the store holds unreconciled ([`OfflineBook`]),
//! the allowances the cloud grants (pushed and synced), offline approvals signed with the hub's
//! key, and the drain that delivers what the journal queued for the cloud: voids first, then
//! confirmations (posts), then the offline backlog in batches.

use std::{collections::HashSet, sync::Arc, time::Duration};

use actix::prelude::*;
use paycode::hubsig::HubSigner;
use protocol::{
    AccountId, Allowance, AuthorizeRequest, CloudReplyBody, CodeNonce, Decision, HubRequestBody,
    OfflineBatch, OfflinePayment, OfflineReservation, PaymentId, StoreId, VoidPayment,
};

use crate::{
    book::OfflineBook,
    journal::{Journal, JournalWorker},
    uplink::{CallCloud, UplinkActor, UplinkEvent},
};

/// Mailbox bound.
pub const OFFLINE_MAILBOX: usize = 256;
/// Deadline of void, post and allowance-sync requests.
pub const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one reconciliation batch.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// What the offline actor starts with.
pub struct OfflineSetup {
    /// The hub's store: what it voids and posts must be payments of it.
    pub store_id: StoreId,
    /// Rules and what the journal holds unreconciled.
    pub book: OfflineBook,
    /// The hub's signing key.
    pub signer: Arc<HubSigner>,
    /// The journal (sequence numbers only; writes go through the journal thread).
    pub journal: Journal,
    /// Entries per reconciliation batch.
    pub drain_batch: usize,
    /// How often the drain runs even with no reconnect.
    pub drain_interval: Duration,
    /// Metrics.
    pub metrics: OfflineMetrics,
}

/// The hub's offline metrics, with what they are computed from: the unreconciled approvals'
/// amounts per currency and approval times.
#[derive(Clone)]
pub struct OfflineMetrics {
    backlog: prometheus::IntGauge,
    exposure: prometheus::IntGaugeVec,
    oldest: prometheus::IntGauge,
    approved: prometheus::IntCounter,
    reconciled: prometheus::IntCounter,
    held: Held,
}

/// What the unreconciled approvals add up to, per currency, and when each was approved.
#[derive(Debug, Clone, Default)]
struct Held {
    by_currency: std::collections::HashMap<protocol::Currency, i64>,
    /// (approved at, ms; sequence number) of each.
    by_time: std::collections::BTreeSet<(u64, u64)>,
}

impl Held {
    fn add(&mut self, entry: &OfflinePayment) {
        *self.by_currency.entry(entry.currency).or_default() += entry.amount_minor;
        self.by_time.insert((entry.approved_at_ms, entry.seq));
    }

    fn remove(&mut self, entry: &OfflinePayment) {
        if self.by_time.remove(&(entry.approved_at_ms, entry.seq)) {
            *self.by_currency.entry(entry.currency).or_default() -= entry.amount_minor;
        }
    }
}

impl OfflineMetrics {
    /// Registers `facepay_hub_offline_backlog`,
    /// `facepay_hub_offline_oldest_unreconciled_timestamp_seconds`,
    /// `facepay_hub_offline_exposure_minor_units{currency}` (every accepted currency),
    /// `facepay_hub_offline_store_ceiling_minor_units`, `facepay_hub_offline_approved_total` and
    /// `facepay_hub_offline_reconciled_total`, from the approvals the journal holds unreconciled.
    pub fn register(
        registry: &prometheus::Registry,
        store_ceiling_minor: i64,
        pending: &[OfflinePayment],
    ) -> Self {
        let exposure = telemetry::register_gauge_vec(
            registry,
            "facepay_hub_offline_exposure_minor_units",
            "what the offline approvals not yet acknowledged by the cloud add up to, in \
             minor units of the currency",
            &["currency"],
        );
        telemetry::register_gauge(
            registry,
            "facepay_hub_offline_store_ceiling_minor_units",
            "the most the store may hold unreconciled over all accounts ([offline] \
             store_ceiling_minor), counted in minor units whatever the currency",
        )
        .set(store_ceiling_minor);
        let mut held = Held::default();
        for entry in pending {
            held.add(entry);
        }
        let metrics = OfflineMetrics {
            backlog: telemetry::register_gauge(
                registry,
                "facepay_hub_offline_backlog",
                "offline approvals journaled and not yet acknowledged by the cloud",
            ),
            exposure,
            oldest: telemetry::register_gauge(
                registry,
                "facepay_hub_offline_oldest_unreconciled_timestamp_seconds",
                "when the oldest offline approval not yet acknowledged by the cloud was \
                 approved (0: none)",
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
            held,
        };
        metrics.show();
        metrics
    }

    fn show(&self) {
        self.backlog.set(self.held.by_time.len() as i64);
        for currency in protocol::Currency::all() {
            let held = self.held.by_currency.get(&currency).copied().unwrap_or(0);
            self.exposure
                .with_label_values(&[currency.as_str()])
                .set(held);
        }
        self.oldest.set(
            self.held
                .by_time
                .first()
                .map_or(0, |(at_ms, _)| (at_ms / 1_000) as i64),
        );
    }
}

/// Owns the offline book, the hub's signing key, the allowances and the drain.
pub struct OfflineActor {
    clock: clock::SharedClock,
    book: OfflineBook,
    store_id: StoreId,
    signer: Arc<HubSigner>,
    seqs: Journal,
    journal: JournalWorker,
    uplink: Option<Addr<UplinkActor>>,
    drain_batch: usize,
    drain_interval: Duration,
    draining: bool,
    /// Asked to drain while a drain ran: run it again when it ends.
    again: bool,
    /// Voids and posts being delivered at once (apart from the drain, so that they never wait
    /// behind a reconciliation batch).
    delivering: bool,
    /// Something was queued while they were being delivered: deliver again.
    deliver_again: bool,
    syncing_allowances: bool,
    metrics: OfflineMetrics,
}

impl OfflineActor {
    /// An actor over the book the journal's entries and allowances rebuilt.
    pub fn new(
        clock: clock::SharedClock,
        setup: OfflineSetup,
        journal: JournalWorker,
        uplink: Option<Addr<UplinkActor>>,
    ) -> Self {
        OfflineActor {
            clock,
            store_id: setup.store_id,
            book: setup.book,
            signer: setup.signer,
            seqs: setup.journal,
            journal,
            uplink,
            drain_batch: setup.drain_batch,
            drain_interval: setup.drain_interval,
            draining: false,
            again: false,
            delivering: false,
            deliver_again: false,
            syncing_allowances: false,
            metrics: setup.metrics,
        }
    }

    /// Starts the drain, or asks the running one to go round again.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.uplink.is_none() {
            return;
        }
        if self.draining {
            self.again = true;
            return;
        }
        self.draining = true;
        self.again = false;
        self.drain_step(ctx);
    }

    /// One round of the drain ([`drain_once`]); goes on while batches settle, and once more when
    /// something was queued meanwhile.
    fn drain_step(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            self.draining = false;
            return;
        };
        let (journal, batch_size) = (self.journal.clone(), self.drain_batch);
        let store = self.store_id.clone();
        let step = async move { drain_once(&uplink, &journal, &store, batch_size).await };
        ctx.spawn(step.into_actor(self).map(|step, actor, ctx| {
            for entry in &step.retired {
                actor.book.release(
                    &entry.account_id,
                    entry.allowance_version,
                    entry.amount_minor,
                );
                actor.metrics.held.remove(entry);
            }
            actor.metrics.reconciled.inc_by(step.retired.len() as u64);
            actor.metrics.show();
            if step.more || std::mem::take(&mut actor.again) {
                actor.drain_step(ctx);
            } else {
                actor.draining = false;
            }
        }));
    }

    /// Delivers the queued voids and posts now, one delivery at a time, again if more were
    /// queued meanwhile. (The drain delivers them too, before every batch; a void or post sent
    /// twice is answered the same.)
    fn deliver(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.delivering {
            self.deliver_again = true;
            return;
        }
        self.delivering = true;
        self.deliver_again = false;
        let (journal, batch_size) = (self.journal.clone(), self.drain_batch);
        let store = self.store_id.clone();
        let delivery = async move { deliver_queued(&uplink, &journal, &store, batch_size).await };
        ctx.spawn(delivery.into_actor(self).map(|_, actor, ctx| {
            actor.delivering = false;
            if std::mem::take(&mut actor.deliver_again) {
                actor.deliver(ctx);
            }
        }));
    }

    /// Fetches this store's allowances page by page; a complete sync replaces what is held.
    fn sync_allowances(&mut self, ctx: &mut Context<Self>) {
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
                actor.allowances_synced(all, ctx);
            }
        }));
    }

    /// Grants and revocations the cloud sent: durable in the journal first, then in the book. A
    /// grant approvals cite is one a restarted hub still holds (the cloud forgets older ones once
    /// this hub reports the new one, which it reads from the book).
    fn allowances_arrived(&mut self, allowances: Vec<Allowance>, ctx: &mut Context<Self>) {
        let (journal, stored) = (self.journal.clone(), allowances.clone());
        ctx.spawn(
            async move { journal.run(move |j| j.store_allowances(&stored)).await }
                .into_actor(self)
                .map(move |_, actor, _| {
                    for allowance in allowances {
                        actor.book.set_allowance(allowance);
                    }
                }),
        );
    }

    /// A complete allowance sync: what the cloud lists replaces what is held (durably first).
    fn allowances_synced(&mut self, allowances: Vec<Allowance>, ctx: &mut Context<Self>) {
        let listed: HashSet<AccountId> = allowances.iter().map(|a| a.account_id.clone()).collect();
        let (journal, stored, kept) = (self.journal.clone(), allowances.clone(), listed.clone());
        ctx.spawn(
            async move {
                journal
                    .run(move |j| {
                        j.store_allowances(&stored)?;
                        j.keep_only_allowances(&kept)
                    })
                    .await
            }
            .into_actor(self)
            .map(move |_, actor, _| {
                for allowance in allowances {
                    actor.book.set_allowance(allowance);
                }
                actor.book.keep_only(&listed);
            }),
        );
    }
}

impl Actor for OfflineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(OFFLINE_MAILBOX);
        // Voids and the backlog are retried on a timer as well as on reconnect: a void that
        // failed once must not wait for the next outage to be delivered.
        ctx.run_interval(self.drain_interval, |actor, ctx| actor.drain(ctx));
    }
}

impl Handler<UplinkEvent> for OfflineActor {
    type Result = ();
    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        match msg {
            UplinkEvent::CloudConnected => {
                self.sync_allowances(ctx);
                self.drain(ctx);
            }
            UplinkEvent::AllowancesPushed(batch) => self.allowances_arrived(batch.allowances, ctx),
            UplinkEvent::KeysBroadcast(_)
            | UplinkEvent::TemplatesPushed(_)
            | UplinkEvent::RevocationListPushed(_)
            | UplinkEvent::LockoutsPushed(_) => {}
        }
    }
}

/// Deliver what the journal queued (a void, a post) now rather than on the next tick.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliverQueued;

impl Handler<DeliverQueued> for OfflineActor {
    type Result = ();
    fn handle(&mut self, _: DeliverQueued, ctx: &mut Self::Context) {
        self.deliver(ctx);
    }
}

/// Check the offline rules for a payment and, if they pass, sign it and count it as held. The
/// caller journals the signed entry before anyone hears "approved".
#[derive(Message)]
#[rtype(result = "Result<OfflinePayment, Decision>")]
pub struct ApproveOffline {
    /// The payment.
    pub request: AuthorizeRequest,
    /// The account its proof names.
    pub account_id: AccountId,
    /// The proof's single-use nonce (a code's, or the token).
    pub nonce: CodeNonce,
    /// The code a code-and-face token's face confirmed.
    pub spent_code: Option<CodeNonce>,
}

impl Handler<ApproveOffline> for OfflineActor {
    type Result = Result<OfflinePayment, Decision>;
    fn handle(&mut self, msg: ApproveOffline, _: &mut Self::Context) -> Self::Result {
        let request = &msg.request;
        self.book
            .check(&msg.account_id, request.amount_minor, request.currency)?;
        let seq = self
            .seqs
            .next_seq()
            .unwrap_or_else(|e| storage::fail_stop("numbering an offline approval", &e));
        let allowance_version = self.book.grant_version(&msg.account_id);
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
            allowance_version,
            spent_code: msg.spent_code,
            signature: String::new(),
        };
        self.signer.sign(&mut entry);
        self.book.approved(&entry);
        self.metrics.approved.inc();
        self.metrics.held.add(&entry);
        self.metrics.show();
        Ok(entry)
    }
}

/// What the store may still hold unreconciled for an account, for the cloud to count.
#[derive(Message)]
#[rtype(result = "OfflineReservation")]
pub struct ReservationOf(pub AccountId);

impl Handler<ReservationOf> for OfflineActor {
    type Result = MessageResult<ReservationOf>;
    fn handle(&mut self, msg: ReservationOf, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.book.reservation(&msg.0))
    }
}

/// A grant the cloud sent with its answer to a payment.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AllowanceGranted(pub Allowance);

impl Handler<AllowanceGranted> for OfflineActor {
    type Result = ();
    fn handle(&mut self, msg: AllowanceGranted, ctx: &mut Self::Context) {
        self.allowances_arrived(vec![msg.0], ctx);
    }
}

/// What one round of the drain did.
struct DrainStep {
    /// Offline entries the cloud acknowledged (applied, or kept as conflicts) and the journal
    /// retired from the backlog.
    retired: Vec<OfflinePayment>,
    /// A whole batch settled: there may be more.
    more: bool,
}

/// One round of the drain: queued voids first (read again every round, so that a void queued
/// while the backlog drains goes before the next batch, never after it), then posts (before their
/// pending payments expire), then one batch of offline approvals, each retired only once the
/// cloud acknowledged it in an answer about exactly what was sent. Stops at the first failure;
/// the next tick or reconnect resumes where it stopped.
async fn drain_once(
    uplink: &Addr<UplinkActor>,
    journal: &JournalWorker,
    store: &StoreId,
    batch_size: usize,
) -> DrainStep {
    let stopped = DrainStep {
        retired: Vec::new(),
        more: false,
    };
    if !deliver_queued(uplink, journal, store, batch_size).await {
        return stopped;
    }
    // Tests hold the backlog here (unreconciled while the cloud is reachable).
    storage::fail::fail_point!("hub-reconcile-hold", |_| DrainStep {
        retired: Vec::new(),
        more: false,
    });
    let batch = journal.run(move |j| j.offline_batch(batch_size)).await;
    if batch.is_empty() {
        return stopped;
    }
    let sent: Vec<(u64, PaymentId)> = batch
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
            return stopped;
        }
    };
    let sorted = crate::book::sort_results(&results);
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
            Ok::<_, crate::HubError>(retired)
        })
        .await;
    if stuck > 0 {
        tracing::warn!(
            stuck,
            first = ?results.iter().find(|r| !r.settled()),
            "the cloud refused offline entries; kept in the journal"
        );
    }
    DrainStep {
        retired,
        more: stuck == 0,
    }
}

/// Delivers the queued voids, then the queued posts in batches; true once every one was
/// acknowledged and retired, false at the first failure.
async fn deliver_queued(
    uplink: &Addr<UplinkActor>,
    journal: &JournalWorker,
    store: &StoreId,
    batch_size: usize,
) -> bool {
    let voids = journal.run(|j| j.pending_voids()).await;
    for void in set_aside_foreign(journal, store, voids).await {
        if !deliver_void(uplink, journal, void).await {
            return false;
        }
    }
    let posts = journal.run(|j| j.pending_posts()).await;
    let posts = set_aside_foreign(journal, store, posts).await;
    for batch in posts.chunks(batch_size.clamp(1, protocol::POST_BATCH_MAX)) {
        if !deliver_posts(uplink, journal, batch.to_vec()).await {
            return false;
        }
    }
    true
}

/// The voids (or posts) the cloud can take from this store; the others are retired with an error
/// for the operator. The cloud refuses them for good (a payment outside the store's namespace, an
/// id no request of this hub could have had: a damaged or foreign journal), so retrying one would
/// hold every void, post and offline batch behind it forever.
async fn set_aside_foreign(
    journal: &JournalWorker,
    store: &StoreId,
    queued: Vec<VoidPayment>,
) -> Vec<VoidPayment> {
    let (deliverable, foreign): (Vec<_>, Vec<_>) = queued
        .into_iter()
        .partition(|v| v.check_from(store).is_ok());
    for attempt in foreign {
        let why = attempt.check_from(store).expect_err("partitioned");
        tracing::error!(
            payment_id = %attempt.payment_id,
            %why,
            "queued void or post the cloud can never take; set aside"
        );
        journal
            .run(move |j| {
                j.retire_void(&attempt)?;
                j.retire_post(&attempt)
            })
            .await;
    }
    deliverable
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
            tracing::info!(payment_id = %void.payment_id, reversed, "void delivered");
            journal.run(move |j| j.retire_void(&void)).await;
            true
        }
        other => {
            tracing::info!(
                payment_id = %void.payment_id,
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
    let expected: Vec<PaymentId> = posts.iter().map(|p| p.payment_id.clone()).collect();
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Posted {
            payment_ids,
            posted,
        })) if payment_ids == expected && posted.len() == expected.len() => {
            for (payment_id, posted) in payment_ids.iter().zip(&posted) {
                if !posted {
                    tracing::error!(
                        %payment_id,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[actix::test]
    async fn a_queued_void_the_cloud_can_never_take_is_set_aside_not_retried_forever() {
        let dir = tempfile::tempdir().unwrap();
        let journal = crate::journal::Journal::open(&dir.path().join("j")).unwrap();
        let attempt = |payment: &str| VoidPayment {
            payment_id: payment.into(),
            account_id: "alice".into(),
            code_nonce: "00ff".into(),
        };
        // Queued in an order that puts the foreign one first: it would hold the other back.
        journal.queue_void(&attempt("store-10:o-1")).unwrap();
        journal.queue_void(&attempt("store-1:o-2")).unwrap();
        let worker = crate::journal::start_worker(journal);
        let store = StoreId::from("store-1");
        let queued = worker.run(|j| j.pending_voids()).await;
        assert_eq!(queued.len(), 2);
        let deliverable = set_aside_foreign(&worker, &store, queued).await;
        assert_eq!(deliverable, vec![attempt("store-1:o-2")]);
        // Retired from the journal: the next drain does not meet it again.
        assert_eq!(
            worker.run(|j| j.pending_voids()).await,
            vec![attempt("store-1:o-2")]
        );
    }
}
