//! The cloud's link to the hubs: takes their requests off MQTT and serves each store's requests in
//! order on that store's own lane (stores are served concurrently: one store's backlog never
//! holds another's payment), with identity requests (1:N search, template sync) on a lane of
//! their own so that a search never delays a payment; publishes the replies, and broadcasts key,
//! template and allowance changes.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix::prelude::*;
use mqtt::{LinkEvent, QoS};
use protocol::{
    Allowance, AllowanceBatch, CloudReply, CloudReplyBody, HubRequest, HubRequestBody, KeyBatch,
    KeyEntry, StoreId, TemplateBatch, TemplateChange, TemplateUpdate,
};
use telemetry::PaymentMetrics;
use tokio::sync::mpsc;

use crate::{
    bounded::Bounded,
    enroll::{FactorReportCmd, IdentifyCmd, IdentityActor, Searcher, TemplateSyncCmd},
    leases::Held,
    ledger_actor::{AcquireLease, ApplyHubRequest, ExpirePending, LedgerActor, ReadLedger},
};

/// Mailbox bound of the hub link: link events wait in the MQTT client beyond this.
pub const HUB_LINK_MAILBOX: usize = 64;
/// Payment requests (authorize, void, post, reconcile, syncs) one store may have waiting on its
/// lane. Beyond it the request is answered at once with an error (the hub voids or retries): the
/// MQTT driver never waits for a lane, so one store can never stall another.
pub const STORE_LANE_QUEUE: usize = 256;
/// Identity requests (1:N searches, template syncs) one store may have waiting on its identity
/// lane; beyond it they are answered with an error at once (the hub decides on its hot set).
pub const IDENTITY_LANE_QUEUE: usize = 16;
/// A lane idle this long closes (what it took is still served); the next request opens a new
/// one, which starts only once the old one has finished, so a store's order holds across them.
pub const LANE_IDLE: Duration = Duration::from_secs(60);
/// Most lanes at once (the broker's ACL lets only certificate holders publish, each on the topic
/// of its own name); a request that would need another is answered with an error.
pub const MAX_LANES: usize = 100_000;
/// How often the ledger moves back pending payments whose hub never confirmed them.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

/// What every lane needs to serve a request.
struct Serving {
    client: mqtt::Client,
    ledger: Bounded<LedgerActor>,
    identity: Bounded<IdentityActor>,
    /// The 1:N search pool.
    searchers: Bounded<Searcher>,
    metrics: PaymentMetrics,
    /// Stores with a merchant account: the only request topics served.
    known_stores: Mutex<HashSet<String>>,
    /// What each store may still send now of the requests rated per store.
    rates: StoreRates,
    /// The stores' leases this instance holds, when several instances share the database.
    leases: Option<LeaseCache>,
}

/// The leases this instance holds, as last taken or renewed ([`crate::leases`]).
struct LeaseCache {
    held: Mutex<HashMap<String, Held>>,
    /// Stores another instance holds, until when (unless renewed): not asked about before then,
    /// so the instances that do not serve a store do not each run a transaction per request.
    elsewhere: Mutex<HashMap<String, Elsewhere>>,
    ttl_ms: u64,
    clock: clock::SharedClock,
    /// The instance is stopping: no lease is taken or renewed any more (one renewed after the
    /// release would hold the store here, unserved, until it lapsed).
    stopping: std::sync::atomic::AtomicBool,
    /// Releases heard from other instances so far: a lease asked for while one was heard may
    /// have been answered with the view from before it.
    releases: std::sync::atomic::AtomicU64,
}

/// How long an authorization left to another instance's lease is kept, to be served here if
/// that instance releases the lease meanwhile. A stopping instance's release and the requests its
/// hubs send next travel apart (other topics, maybe other broker nodes): one of them may arrive
/// first, and the payment would otherwise go unanswered until the hub's own timeout (3 s by
/// default), then be decided offline.
const PASSED_KEPT_MS: u64 = 2_000;
/// At most this many authorizations kept per store (the newest).
const PASSED_KEPT_PER_STORE: usize = 64;

/// A store another instance holds.
#[derive(Debug, Default)]
struct Elsewhere {
    /// Until when (that instance's last renewal plus the lease's time), unless renewed.
    until_ms: u64,
    /// Authorizations left to that instance lately, with when they were passed on (ms).
    passed: std::collections::VecDeque<(u64, HubRequest)>,
}

impl Elsewhere {
    fn forget_before(&mut self, now_ms: u64) {
        while self
            .passed
            .front()
            .is_some_and(|(at, _)| at + PASSED_KEPT_MS <= now_ms)
        {
            self.passed.pop_front();
        }
    }
}

impl LeaseCache {
    /// Leaves a request to the instance that holds its store's lease, keeping it a while if it
    /// is an authorization; unless the store is not another's any more (a release came in
    /// between): then it is given back, to be served here. Checked and kept under one lock
    /// with [`LeaseCache::released`].
    ///
    /// The other instance may have served a kept authorization before it stopped, a kept one
    /// may be served after the store's newer requests, and after the hub gave up on it: only
    /// authorizations are kept. The ledger decides a code's nonce once: a repeat hears the
    /// recorded decision, or joins the payment still being decided without moving money again;
    /// one that comes after its void is declined (the void burned the nonce). One served after
    /// the hub gave up moves money only until the hub's void reaches the ledger (the hub sends
    /// it until answered), as any late answer could before. A refund is not kept: a decline
    /// writes nothing, so a refund declined before the release could be made by its repeat
    /// after the register heard "declined". The hubs resend voids, posts and offline entries
    /// until answered, and a sync or a search can wait for the hub to ask again.
    ///
    /// Kept authorizations are served only on a release heard: when this instance takes the
    /// lease otherwise (its view ran out first, or the holder died), they are dropped, as they
    /// were before they were kept.
    fn pass(&self, request: HubRequest, now_ms: u64) -> Option<HubRequest> {
        let mut elsewhere = self.elsewhere.lock().expect("not poisoned");
        let Some(away) = elsewhere
            .get_mut(request.store_id.as_str())
            .filter(|away| away.until_ms > now_ms)
        else {
            return Some(request);
        };
        away.forget_before(now_ms);
        // Only a well-formed one (its evidence within its bounds): a hub's malformed request
        // would be refused by the holder anyway, and is not worth memory here.
        let keep = match &request.body {
            HubRequestBody::Authorize(authorize) => {
                authorize.check_from(request.store_id.as_str()).is_ok()
            }
            _ => false,
        };
        if keep {
            if away.passed.len() >= PASSED_KEPT_PER_STORE {
                away.passed.pop_front();
            }
            away.passed.push_back((now_ms, request));
        }
        None
    }

    /// Another instance released `store_id`'s lease: it is asked for at the next request, and
    /// the authorizations lately left to that instance are given back to be served here.
    fn released(&self, store_id: &str, now_ms: u64) -> Vec<HubRequest> {
        self.releases
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let away = self
            .elsewhere
            .lock()
            .expect("not poisoned")
            .remove(store_id);
        away.map(|away| away.passed)
            .unwrap_or_default()
            .into_iter()
            .filter(|(at, _)| at + PASSED_KEPT_MS > now_ms)
            .map(|(_, request)| request)
            .collect()
    }

    /// Forgets the authorizations kept too long, and the stores whose view ran out.
    fn forget_before(&self, now_ms: u64) {
        self.elsewhere
            .lock()
            .expect("not poisoned")
            .retain(|_, away| {
                away.forget_before(now_ms);
                away.until_ms > now_ms || !away.passed.is_empty()
            });
    }
}

/// Whether this instance serves a store's request.
enum Serve {
    /// The only instance: every store is its own.
    Alone,
    /// It holds the store's lease: served, every write held to it.
    Held(Held),
    /// Another instance holds the lease: that one answers.
    Elsewhere,
    /// Another instance released the lease while it was asked for: ask again.
    AskAgain,
}

/// Whether this instance serves `store_id` now: a lease with at least half its time left is
/// used as it is; otherwise it is taken or renewed first.
async fn lease_for(serving: &Serving, store_id: &str) -> Serve {
    let Some(cache) = &serving.leases else {
        return Serve::Alone;
    };
    let now_ms = cache.clock.now_ms();
    if cache
        .elsewhere
        .lock()
        .expect("not poisoned")
        .get(store_id)
        .is_some_and(|away| away.until_ms > now_ms)
    {
        return Serve::Elsewhere;
    }
    if let Some(held) = cache.held.lock().expect("not poisoned").get(store_id) {
        if held.expires_at_ms.saturating_sub(now_ms) > cache.ttl_ms / 2 {
            return Serve::Held(held.clone());
        }
    }
    renew(serving, cache, store_id).await
}

/// Takes or renews `store_id`'s lease and notes the outcome.
async fn renew(serving: &Serving, cache: &LeaseCache, store_id: &str) -> Serve {
    if cache.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return Serve::Elsewhere;
    }
    let releases = cache.releases.load(std::sync::atomic::Ordering::SeqCst);
    match serving.ledger.send(AcquireLease(store_id.to_owned())).await {
        Ok(Ok(Ok(held))) => {
            cache
                .elsewhere
                .lock()
                .expect("not poisoned")
                .remove(store_id);
            let mut all = cache.held.lock().expect("not poisoned");
            if all.get(store_id).is_none_or(|h| h.epoch != held.epoch) {
                tracing::info!(store_id, epoch = held.epoch, "store's lease taken");
            }
            all.insert(store_id.to_owned(), held.clone());
            Serve::Held(held)
        }
        Ok(Ok(Err(_))) if cache.releases.load(std::sync::atomic::Ordering::SeqCst) != releases => {
            Serve::AskAgain
        }
        Ok(Ok(Err(until_ms))) => {
            cache
                .elsewhere
                .lock()
                .expect("not poisoned")
                .entry(store_id.to_owned())
                .or_default()
                .until_ms = until_ms;
            if cache
                .held
                .lock()
                .expect("not poisoned")
                .remove(store_id)
                .is_some()
            {
                tracing::warn!(store_id, "store's lease lost to another instance");
            }
            Serve::Elsewhere
        }
        Ok(Err(error)) => storage::fail_stop("taking a store's lease", &error),
        // The ledger's queue is full or its thread gone: not served now; the hub retries.
        Err(_) => Serve::Elsewhere,
    }
}

/// Second-factor reports a store may send in a burst, and per second after it: far above what
/// its terminals' customers can answer, far below what would keep every hub flushing lockouts.
pub const FACTOR_REPORT_BURST: f64 = 50.0;
/// See [`FACTOR_REPORT_BURST`].
pub const FACTOR_REPORTS_PER_SECOND: f64 = 5.0;
/// Identity requests (1:N searches, template syncs) a store may send in a burst, and per second
/// after it: a store's customers are searched only when its hot set misses, and a sync follows a
/// reconnect; beyond, the store decides on its hot set while other stores' searches go on.
pub const IDENTITY_BURST: f64 = 100.0;
/// See [`IDENTITY_BURST`].
pub const IDENTITY_PER_SECOND: f64 = 20.0;

/// Requests rated per store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Rated {
    FactorReports,
    Identity,
}

impl Rated {
    fn bucket(self, now: Instant) -> clock::TokenBucket {
        match self {
            Rated::FactorReports => {
                clock::TokenBucket::full(FACTOR_REPORT_BURST, FACTOR_REPORTS_PER_SECOND, now)
            }
            Rated::Identity => clock::TokenBucket::full(IDENTITY_BURST, IDENTITY_PER_SECOND, now),
        }
    }
}

/// Per-store token buckets (only stores with a merchant account get one, so the map is as large
/// as the fleet).
#[derive(Default)]
struct StoreRates(Mutex<HashMap<(String, Rated), clock::TokenBucket>>);

impl StoreRates {
    /// Whether `store_id` may send one more `kind` request now.
    fn allow(&self, store_id: &str, kind: Rated) -> bool {
        let now = Instant::now();
        self.0
            .lock()
            .expect("not poisoned")
            .entry((store_id.to_string(), kind))
            .or_insert_with(|| kind.bucket(now))
            .take(now)
    }
}

/// Which of a store's two lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LaneKind {
    /// Everything that touches the ledger, in order.
    Payments,
    /// 1:N searches and template syncs: never in the way of a payment.
    Identity,
}

impl LaneKind {
    fn of(request: &HubRequest) -> Self {
        if request.body.is_identity() {
            LaneKind::Identity
        } else {
            LaneKind::Payments
        }
    }

    fn queue(self) -> usize {
        match self {
            LaneKind::Payments => STORE_LANE_QUEUE,
            LaneKind::Identity => IDENTITY_LANE_QUEUE,
        }
    }
}

/// Resolves when a lane's task has served everything it took.
type Finished = futures::future::Shared<tokio::sync::oneshot::Receiver<()>>;

/// A lane: where to send, and when it has finished.
#[derive(Clone)]
struct Lane {
    sender: mpsc::Sender<HubRequest>,
    finished: Finished,
    /// Set once it has served everything it took (what the map is pruned by: `finished` itself
    /// resolves only for whoever polls it).
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl Lane {
    fn is_done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `facepay_cloud_store_online{store_id}` (1 while the store's hub is connected, 0 once its last
/// will or goodbye says otherwise) and `facepay_cloud_store_last_heard_timestamp_seconds{store_id}`,
/// one series each per store heard from, or with a registered hub key at start.
#[derive(Clone)]
pub struct StorePresence {
    online: prometheus::IntGaugeVec,
    last_heard: prometheus::IntGaugeVec,
}

impl StorePresence {
    /// Registers on the cloud's registry, with a series for each of `stores` (not heard yet: 0).
    pub fn register(registry: &prometheus::Registry, stores: &[String]) -> Self {
        let online = telemetry::register_gauge_vec(
            registry,
            "facepay_cloud_store_online",
            "1 while the store's hub is connected to the broker, 0 once its last will says \
             it went without a goodbye (or it said so, or it was not heard yet)",
            &["store_id"],
        );
        let last_heard = telemetry::register_gauge_vec(
            registry,
            "facepay_cloud_store_last_heard_timestamp_seconds",
            "when the store's hub was last heard: its presence heartbeat or any request \
             (0: not heard since this instance started)",
            &["store_id"],
        );
        for store in stores {
            online.with_label_values(&[store]).set(0);
            last_heard.with_label_values(&[store]).set(0);
        }
        StorePresence { online, last_heard }
    }

    /// A store's hub was heard now (a request, or its presence published now).
    fn heard(&self, store_id: &str) {
        self.last_heard
            .with_label_values(&[store_id])
            .set(telemetry::unix_seconds());
    }

    /// A store's presence: online or not. One the broker kept (`retained`, handed over on
    /// subscribing, perhaps a dead hub's will) says nothing of when the hub was last heard.
    fn presence(&self, store_id: &str, online: bool, retained: bool) {
        self.online
            .with_label_values(&[store_id])
            .set(i64::from(online));
        if online && !retained {
            self.heard(store_id);
        }
    }
}

/// Serves the hubs.
pub struct HubLinkActor {
    serving: Arc<Serving>,
    connected: prometheus::IntGauge,
    /// Each store's presence and when its hub was last heard.
    presence: Option<StorePresence>,
    /// Stopping: no request is taken any more, no lease renewed.
    stopping: bool,
    lanes: HashMap<(StoreId, LaneKind), Lane>,
}

impl HubLinkActor {
    /// A link over `client`, serving from the ledger and identity threads and the search pool.
    pub fn new(
        client: mqtt::Client,
        ledger: Bounded<LedgerActor>,
        identity: Bounded<IdentityActor>,
        searchers: Bounded<Searcher>,
        metrics: PaymentMetrics,
        connected: prometheus::IntGauge,
    ) -> Self {
        HubLinkActor {
            serving: Arc::new(Serving {
                client,
                ledger,
                identity,
                searchers,
                metrics,
                known_stores: Mutex::default(),
                rates: StoreRates::default(),
                leases: None,
            }),
            connected,
            presence: None,
            stopping: false,
            lanes: HashMap::new(),
        }
    }

    /// Follows every store hub's presence (its retained "online" and heartbeats, its last will)
    /// and when each was last heard.
    pub fn with_presence(mut self, presence: StorePresence) -> Self {
        self.presence = Some(presence);
        self
    }

    /// Serves only the stores whose lease this instance holds (leases of `ttl_ms`, read on
    /// `clock`), renewing them before they lapse; the ledger actor must have the leases.
    pub fn with_leases(mut self, ttl_ms: u64, clock: clock::SharedClock) -> Self {
        Arc::get_mut(&mut self.serving)
            .expect("set before the link starts")
            .leases = Some(LeaseCache {
            held: Mutex::default(),
            elsewhere: Mutex::default(),
            ttl_ms,
            clock,
            stopping: Default::default(),
            releases: Default::default(),
        });
        self
    }

    /// Puts a request on its store's lane without waiting; why not, when there is no room.
    fn dispatch(&mut self, request: HubRequest) -> Result<(), &'static str> {
        if self.stopping {
            return Err("this cloud instance is stopping; retry");
        }
        let key = (request.store_id.clone(), LaneKind::of(&request));
        let mut request = request;
        // At most twice: a lane may close (idle) between the look-up and the send.
        for _ in 0..2 {
            let lane = match self.lanes.get(&key) {
                Some(lane) if !lane.sender.is_closed() => lane.clone(),
                previous => {
                    let after = previous.map(|l| l.finished.clone());
                    if after.is_none() && self.lanes.len() >= MAX_LANES {
                        self.lanes.retain(|_, l| !l.is_done());
                        if self.lanes.len() >= MAX_LANES {
                            return Err("the cloud serves too many stores at once");
                        }
                    }
                    let lane = start_lane(
                        key.1.queue(),
                        LANE_IDLE,
                        after,
                        serve_with(self.serving.clone()),
                    );
                    self.lanes.insert(key.clone(), lane.clone());
                    lane
                }
            };
            match lane.sender.try_send(request) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err("the cloud is busy with this store's requests; retry")
                }
                Err(mpsc::error::TrySendError::Closed(back)) => request = back,
            }
        }
        Err("the store's lane is closing; retry")
    }

    /// Answers a request the cloud could not take with `Busy`, without waiting for the publish
    /// (the MQTT driver must never wait on its own client).
    fn refuse(&self, store_id: String, request_id: u64, detail: &str) {
        tracing::warn!(store_id, detail, "hub request refused");
        let client = self.serving.client.clone();
        let reply = protocol::encode(&CloudReply {
            request_id,
            body: CloudReplyBody::Busy {
                detail: detail.to_owned(),
            },
        });
        // Never waits: with the client's queue full the refusal is dropped, and the hub hears
        // nothing, which it treats the same (unanswered).
        let topic = protocol::topics::store_replies(&store_id);
        if let Err(error) = client.try_publish(topic, QoS::AtLeastOnce, false, reply) {
            tracing::warn!(%error, "refusal dropped: the client's queue is full");
        }
    }
}

/// Stop taking hubs' requests (the instance is stopping): those already taken are served, then
/// the answer is the leases this instance held, to release (another instance takes the stores
/// at once). Requests heard from now on are not answered among several instances (the lease
/// holder answers; a stopping instance's stores go to another once released), and answered
/// `Busy` by the only instance.
#[derive(Message)]
#[rtype(result = "Vec<Held>")]
pub struct StopServing;

impl Handler<StopServing> for HubLinkActor {
    type Result = ResponseFuture<Vec<Held>>;

    fn handle(&mut self, _: StopServing, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        if let Some(cache) = &self.serving.leases {
            cache
                .stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // Dropping a lane's sender closes it: it serves what it queued, then finishes.
        let finished: Vec<Finished> = self
            .lanes
            .drain()
            .map(|(_, lane)| lane.finished.clone())
            .collect();
        let serving = self.serving.clone();
        Box::pin(async move {
            futures::future::join_all(finished).await;
            match &serving.leases {
                Some(cache) => cache
                    .held
                    .lock()
                    .expect("not poisoned")
                    .drain()
                    .map(|(_, held)| held)
                    .collect(),
                None => Vec::new(),
            }
        })
    }
}

/// A lane: one task serving its requests one after the other, in arrival order, at most `queue`
/// of them waiting; it starts once `after` (the store's previous lane) has finished, and closes
/// when idle for `idle`, serving what it took first.
fn start_lane<F, Fut>(queue: usize, idle: Duration, after: Option<Finished>, serve: F) -> Lane
where
    F: Fn(HubRequest) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    use futures::FutureExt as _;
    let (sender, mut waiting) = mpsc::channel::<HubRequest>(queue);
    let (done, finished) = tokio::sync::oneshot::channel();
    let done_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done_flag.clone();
    actix::spawn(async move {
        if let Some(previous) = after {
            let _ = previous.await;
        }
        loop {
            match tokio::time::timeout(idle, waiting.recv()).await {
                Ok(Some(request)) => serve(request).await,
                Ok(None) => break,
                Err(_) => {
                    // Closed to new requests; what was queued before is still served.
                    waiting.close();
                    while let Some(request) = waiting.recv().await {
                        serve(request).await;
                    }
                    break;
                }
            }
        }
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = done.send(());
    });
    Lane {
        sender,
        finished: finished.shared(),
        done: done_flag,
    }
}

/// Serves each request of a lane with the link's ledger, identity thread and client.
fn serve_with(
    serving: Arc<Serving>,
) -> impl Fn(HubRequest) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    move |request| {
        let serving = serving.clone();
        Box::pin(async move { serve(&serving, request).await })
    }
}

impl Actor for HubLinkActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(HUB_LINK_MAILBOX);
        if let Some(cache) = &self.serving.leases {
            // Every lease held is renewed three times in its life, traffic or not, so an idle
            // store stays with its instance.
            ctx.run_interval(Duration::from_millis(cache.ttl_ms / 3), |actor, _| {
                // Cut off from the broker, this instance hears no request of its stores: it
                // lets their leases lapse so that an instance that hears them takes them.
                if actor.connected.get() != 1 || actor.stopping {
                    return;
                }
                let serving = actor.serving.clone();
                actix::spawn(async move {
                    let Some(cache) = &serving.leases else { return };
                    let stores: Vec<String> = cache
                        .held
                        .lock()
                        .expect("not poisoned")
                        .keys()
                        .cloned()
                        .collect();
                    for store_id in stores {
                        renew(&serving, cache, &store_id).await;
                    }
                });
            });
        }
        ctx.run_interval(EXPIRY_INTERVAL, |actor, _| {
            // Lanes that closed and finished are forgotten, and so are the authorizations kept
            // for another instance's release.
            actor.lanes.retain(|_, l| !l.is_done());
            if let Some(cache) = &actor.serving.leases {
                cache.forget_before(cache.clock.now_ms());
            }
            let ledger = actor.serving.ledger.clone();
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

/// Whether `store_id` is a store the cloud serves: a valid id with a merchant account. Any
/// certificate of the fleet may publish on the request topic named after its common name (the
/// broker's ACL pattern); only hubs of real stores are answered.
async fn is_store(serving: &Serving, store_id: &str) -> bool {
    if protocol::validate_id("store_id", store_id).is_err() {
        return false;
    }
    if serving
        .known_stores
        .lock()
        .expect("not poisoned")
        .contains(store_id)
    {
        return true;
    }
    let id = store_id.to_owned();
    let merchant = matches!(
        serving.ledger.send(ReadLedger::new(move |l| l.account(&id))).await,
        Ok(Ok(Some(view))) if view.kind == protocol::AccountKind::Merchant && !view.closed
    );
    if merchant {
        serving
            .known_stores
            .lock()
            .expect("not poisoned")
            .insert(store_id.to_owned());
    }
    merchant
}

/// The lease `request` is served under (none when this is the only instance), or nothing when
/// another instance holds the store's lease and answers: the request is then kept a while, to
/// be served here if that instance releases the lease ([`LeaseCache::pass`]).
async fn leased(serving: &Serving, request: HubRequest) -> Option<(Option<Held>, HubRequest)> {
    let mut request = request;
    // At most three times: a release may come in between the look-up and the keeping, or
    // while the lease is asked for.
    for _ in 0..3 {
        match lease_for(serving, &request.store_id).await {
            Serve::Alone => return Some((None, request)),
            Serve::Held(held) => return Some((Some(held), request)),
            Serve::AskAgain => {}
            Serve::Elsewhere => {
                let cache = serving.leases.as_ref()?;
                match cache.pass(request, cache.clock.now_ms()) {
                    None => return None,
                    Some(back) => request = back,
                }
            }
        }
    }
    // Not served here (this instance is stopping, its ledger is busy, or the lease changed
    // hands again while asked for): unanswered, as when the cloud is unreachable; the hub's
    // timeout decides.
    tracing::debug!(store_id = %request.store_id, "request not served: no lease taken");
    None
}

/// Serves one request and publishes the reply.
async fn serve(serving: &Serving, request: HubRequest) {
    let started = Instant::now();
    let (store_id, request_id) = (request.store_id.clone(), request.request_id);

    let is_payment = matches!(request.body, HubRequestBody::Authorize(_));
    if is_payment {
        serving.metrics.request();
    }
    let known = is_store(serving, &store_id).await;
    if !known {
        tracing::warn!(
            %store_id,
            "request from an identity that is no store's hub refused"
        );
    }
    // Several instances hear every request; the holder of the store's lease answers it (a
    // lease is taken only for a real store).
    let (lease, request) = match known {
        false => (None, request),
        true => match leased(serving, request).await {
            Some(found) => found,
            None => return,
        },
    };
    let body = match request.body {
        _ if !known => CloudReplyBody::Error {
            detail: format!("{store_id:?} is not a store with a merchant account"),
        },
        HubRequestBody::Identify(_) | HubRequestBody::TemplateSync { .. }
            if !serving.rates.allow(&store_id, Rated::Identity) =>
        {
            tracing::warn!(%store_id, "identity requests beyond the store's rate refused");
            CloudReplyBody::Busy {
                detail: "too many identity requests from this store; decide on the hot set".into(),
            }
        }
        HubRequestBody::Identify(identify) => {
            match serving.searchers.send(IdentifyCmd(identify)).await {
                Ok(Ok(found)) => CloudReplyBody::Identified(found),
                Ok(Err(e)) => CloudReplyBody::Error {
                    detail: e.to_string(),
                },
                Err(e) => CloudReplyBody::Error {
                    detail: format!("identity unavailable: {e}"),
                },
            }
        }
        HubRequestBody::SecondFactor(_)
            if !serving.rates.allow(&store_id, Rated::FactorReports) =>
        {
            tracing::warn!(%store_id, "second-factor reports beyond the store's rate dropped");
            CloudReplyBody::Busy {
                detail: "too many second-factor reports from this store; counted here only".into(),
            }
        }
        HubRequestBody::SecondFactor(report) => {
            match serving.identity.send(FactorReportCmd(report)).await {
                Ok(Ok(batch)) => {
                    if !batch.entries.is_empty() {
                        publish(
                            &serving.client,
                            protocol::topics::lockouts(),
                            protocol::encode(&batch),
                            "broadcasting lockouts",
                        )
                        .await;
                    }
                    CloudReplyBody::Lockouts(batch)
                }
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
                store_id: store_id.to_string(),
                after_version,
            };
            match serving.identity.send(sync).await {
                Ok(Ok(batch)) => CloudReplyBody::Templates(batch),
                Ok(Err(e)) => CloudReplyBody::Error {
                    detail: e.to_string(),
                },
                Err(e) => CloudReplyBody::Error {
                    detail: format!("identity unavailable: {e}"),
                },
            }
        }
        _ => match serving.ledger.send(ApplyHubRequest(request, lease)).await {
            Ok(answer) => {
                if !answer.revocations.is_empty() {
                    publish_allowances(&serving.client, answer.revocations).await;
                }
                answer.body
            }
            Err(error) => CloudReplyBody::Error {
                detail: format!("ledger unavailable: {error}"),
            },
        },
    };
    if let CloudReplyBody::Authorized { decision, .. } = &body {
        serving.metrics.outcome(
            decision.reason(),
            telemetry::DecisionPath::Online,
            started.elapsed(),
        );
    }
    let reply = protocol::encode(&CloudReply { request_id, body });
    if let Err(error) = serving
        .client
        .publish(
            protocol::topics::store_replies(&store_id),
            QoS::AtLeastOnce,
            false,
            reply,
        )
        .await
    {
        // The hub will time out, void the attempt and be told the truth on retry.
        tracing::warn!(%error, %store_id, request_id, "publishing reply failed");
    }
}

/// Something happened on the MQTT link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkEventMsg(pub LinkEvent);

impl Handler<LinkEventMsg> for HubLinkActor {
    type Result = ResponseFuture<()>;

    /// Answers as soon as the request is on its lane, or refused: the MQTT driver never waits
    /// for a request to be served, nor for room on a lane.
    fn handle(&mut self, msg: LinkEventMsg, _: &mut Self::Context) -> Self::Result {
        let client = self.serving.client.clone();
        match msg.0 {
            LinkEvent::Connected => {
                self.connected.set(1);
                tracing::info!("cloud connected to broker");
                // Not awaited here: the subscribe waits for room in the client's queue, which
                // only the driver (waiting on this handler) empties.
                actix::spawn(async move {
                    for topic in [
                        protocol::topics::cloud_requests_filter(),
                        protocol::topics::presence_filter(),
                        protocol::topics::lease_releases(),
                    ] {
                        if let Err(error) = client.subscribe(topic, QoS::AtLeastOnce).await {
                            tracing::warn!(%error, "subscribing to the hubs failed");
                        }
                    }
                });
                Box::pin(async {})
            }
            LinkEvent::Disconnected(_) => {
                self.connected.set(0);
                Box::pin(async {})
            }
            // Counted and logged where the link is driven; nothing to act on.
            LinkEvent::Refused { .. } => Box::pin(async {}),
            LinkEvent::Message {
                topic,
                payload,
                retained,
            } => {
                if topic == protocol::topics::lease_releases() {
                    // Another instance stopped and released these stores' leases (sealed by a
                    // cloud certificate, checked by the link): ask for them at the next request.
                    match (
                        protocol::decode::<protocol::LeasesReleased>(&payload),
                        &self.serving.leases,
                    ) {
                        (Ok(released), Some(cache)) => {
                            let now_ms = cache.clock.now_ms();
                            let given_back: Vec<HubRequest> = released
                                .store_ids
                                .iter()
                                .flat_map(|store_id| cache.released(store_id.as_str(), now_ms))
                                .collect();
                            tracing::info!(
                                stores = released.store_ids.len(),
                                requests = given_back.len(),
                                "another instance released its stores' leases"
                            );
                            // Authorizations that came before the release and were left to
                            // that instance are served here now, if this instance takes the
                            // lease ([`LeaseCache::pass`]). Never answered `Busy`: another
                            // instance may take the lease and answer.
                            if !self.stopping {
                                for request in given_back {
                                    let store_id = request.store_id.to_string();
                                    if let Err(why) = self.dispatch(request) {
                                        tracing::warn!(
                                            store_id,
                                            why,
                                            "an authorization given back by a release dropped"
                                        );
                                    }
                                }
                            }
                        }
                        (Ok(_), None) => {}
                        (Err(error), _) => {
                            tracing::warn!(%error, "unreadable lease release dropped")
                        }
                    }
                    return Box::pin(async {});
                }
                if let Some(store_id) = protocol::topics::store_of_presence_topic(&topic) {
                    match (
                        protocol::decode::<protocol::Presence>(&payload),
                        &self.presence,
                    ) {
                        (Ok(presence), Some(shown)) => {
                            // Sealed by the store's hub (checked by the link): one series per
                            // store of the fleet's PKI.
                            tracing::debug!(store_id, online = presence.online, "store presence");
                            shown.presence(store_id, presence.online, retained);
                        }
                        (Ok(_), None) => {}
                        (Err(error), _) => {
                            tracing::warn!(%error, store_id, "unreadable presence dropped")
                        }
                    }
                    return Box::pin(async {});
                }
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
                        claimed = %request.store_id,
                        "hub request on another store's topic dropped"
                    );
                    return Box::pin(async {});
                }
                if let Some(presence) = &self.presence {
                    presence.heard(&store_id);
                }
                // A stopping instance among others stays silent: each store's request is the
                // lease holder's to answer (a "busy" from here would race its answer), and its
                // own stores go to another instance once their leases are released.
                if self.stopping && self.serving.leases.is_some() {
                    return Box::pin(async {});
                }
                let request_id = request.request_id;
                if let Err(why) = self.dispatch(request) {
                    self.refuse(store_id, request_id, why);
                }
                Box::pin(async {})
            }
        }
    }
}

/// Publishes `payload` on `topic` (QoS 1, not retained); a failure is logged as `what` failing.
async fn publish(client: &mqtt::Client, topic: String, payload: Vec<u8>, what: &str) {
    if let Err(error) = client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
    {
        tracing::warn!(%error, "{what} failed");
    }
}

/// Tells every hub that accounts lost their offline allowances. A hub that misses it (away, broker
/// restarted) learns it from its allowance sync on reconnect.
async fn publish_allowances(client: &mqtt::Client, allowances: Vec<Allowance>) {
    let batch = protocol::encode(&AllowanceBatch {
        allowances,
        next_after: None,
    });
    let topic = protocol::topics::allowance_updates();
    publish(client, topic, batch, "broadcasting allowance revocations").await;
}

/// Broadcast allowance revocations to every hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BroadcastAllowances(pub Vec<Allowance>);

impl Handler<BroadcastAllowances> for HubLinkActor {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: BroadcastAllowances, _: &mut Self::Context) -> Self::Result {
        let client = self.serving.client.clone();
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
        let client = self.serving.client.clone();
        Box::pin(async move {
            let batch = protocol::encode(&KeyBatch {
                entries: msg.0,
                more: false,
            });
            // Hubs that miss this (offline, broker down) catch up with a key sync on reconnect.
            let topic = protocol::topics::key_updates();
            publish(&client, topic, batch, "broadcasting a key change").await;
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
        let client = self.serving.client.clone();
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
            publish(&client, topic, batch, "pushing a template change").await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_store_has_its_own_rates_per_kind() {
        let rates = StoreRates::default();
        let burst = (0..100)
            .filter(|_| rates.allow("s1", Rated::FactorReports))
            .count();
        assert_eq!(burst, FACTOR_REPORT_BURST as usize);
        assert!(!rates.allow("s1", Rated::FactorReports));
        assert!(rates.allow("s2", Rated::FactorReports), "another store");
        let identity = (0..200)
            .filter(|_| rates.allow("s1", Rated::Identity))
            .count();
        assert_eq!(identity, IDENTITY_BURST as usize, "its own bucket");
    }

    fn lease_cache() -> LeaseCache {
        LeaseCache {
            held: Mutex::default(),
            elsewhere: Mutex::default(),
            ttl_ms: 10_000,
            clock: clock::ManualClock::new(0),
            stopping: Default::default(),
            releases: Default::default(),
        }
    }

    fn held_elsewhere(cache: &LeaseCache, store: &str, until_ms: u64) {
        cache
            .elsewhere
            .lock()
            .unwrap()
            .entry(store.into())
            .or_default()
            .until_ms = until_ms;
    }

    fn authorize(store: &str, request_id: u64) -> HubRequest {
        HubRequest {
            request_id,
            store_id: store.into(),
            body: HubRequestBody::Authorize(protocol::CloudAuthorize {
                evidence: Default::default(),
                payment_id: format!("{store}:o{request_id}").as_str().into(),
                account_id: "alice".into(),
                code_nonce: format!("{request_id:04x}").as_str().into(),
                amount_minor: 100,
                currency: protocol::Currency::parse("EUR").unwrap(),
                terminal_id: "till-1".into(),
                order_id: format!("o{request_id}").as_str().into(),
                offline_reservation: Default::default(),
                spent_code: None,
            }),
        }
    }

    /// Authorizations left to another instance come back when it releases the store's lease:
    /// those of the last two seconds, of that store; nothing else is kept.
    #[test]
    fn authorizations_left_to_another_instance_come_back_when_it_releases_the_lease() {
        let cache = lease_cache();
        // Nobody else holds s1: nothing to leave it to.
        assert_eq!(
            cache.pass(authorize("s1", 1), 1_000),
            Some(authorize("s1", 1))
        );
        held_elsewhere(&cache, "s1", 20_000);
        held_elsewhere(&cache, "s2", 20_000);
        assert_eq!(cache.pass(authorize("s1", 2), 1_000), None);
        assert_eq!(cache.pass(authorize("s1", 3), 4_000), None);
        assert_eq!(cache.pass(authorize("s2", 4), 4_000), None);
        // Left to the holder, not kept: an authorization not well formed (another store's
        // payment id), a sync, a refund, a second-factor report.
        let malformed = HubRequest {
            store_id: "s1".into(),
            ..authorize("s9", 10)
        };
        assert_eq!(cache.pass(malformed, 4_100), None);
        assert_eq!(cache.pass(request("s1", 5), 4_100), None);
        let refund = HubRequest {
            body: HubRequestBody::Refund(protocol::Refund {
                refund_id: "r1".into(),
                payment_id: "s1:o3".into(),
                amount_minor: 100,
                currency: protocol::Currency::parse("EUR").unwrap(),
                terminal_id: "till-1".into(),
                attestation: String::new(),
            }),
            ..request("s1", 6)
        };
        assert_eq!(cache.pass(refund, 4_100), None);
        let factor = HubRequest {
            body: HubRequestBody::SecondFactor(protocol::FactorReport {
                failed: vec!["alice".into()],
                passed: None,
            }),
            ..request("s1", 7)
        };
        assert_eq!(cache.pass(factor, 4_100), None);
        // s1 released at 4.5 s: authorization 2 is too old; s2's stay with s2.
        assert_eq!(cache.released("s1", 4_500), vec![authorize("s1", 3)]);
        // s1 is nobody else's now: its next request is served here.
        assert_eq!(
            cache.pass(authorize("s1", 8), 4_600),
            Some(authorize("s1", 8))
        );
        assert_eq!(cache.released("s1", 4_600), Vec::<HubRequest>::new());
        // A lease seen running out is not another's either.
        assert_eq!(
            cache.pass(authorize("s2", 9), 20_000),
            Some(authorize("s2", 9))
        );
        // At most PASSED_KEPT_PER_STORE, the newest.
        for id in 0..PASSED_KEPT_PER_STORE as u64 + 10 {
            assert_eq!(cache.pass(authorize("s2", 100 + id), 5_000), None);
        }
        let back = cache.released("s2", 5_000);
        assert_eq!(back.len(), PASSED_KEPT_PER_STORE);
        assert_eq!(back[0], authorize("s2", 110));
        // What is kept is forgotten after two seconds, with the views that ran out.
        held_elsewhere(&cache, "s3", 6_000);
        held_elsewhere(&cache, "s4", 6_000);
        assert_eq!(cache.pass(authorize("s3", 1), 5_000), None);
        cache.forget_before(6_500);
        assert!(cache.elsewhere.lock().unwrap().get("s4").is_none());
        assert_eq!(cache.elsewhere.lock().unwrap()["s3"].passed.len(), 1);
        cache.forget_before(7_000);
        assert!(cache.elsewhere.lock().unwrap().is_empty());
        // Every release heard is counted (a lease asked for meanwhile is asked again).
        assert_eq!(cache.releases.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    fn request(store: &str, request_id: u64) -> HubRequest {
        HubRequest {
            request_id,
            store_id: store.into(),
            body: HubRequestBody::KeySync { after_version: 0 },
        }
    }

    /// Each lane serves in arrival order; a request held on one store's lane (a 1:N search, a
    /// large batch) does not hold another lane's.
    #[actix::test]
    async fn a_lane_serves_in_order_and_a_held_lane_holds_no_other() {
        let (done, mut finished) = mpsc::unbounded_channel::<(String, u64)>();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let lane = |held: bool| {
            let (done, gate) = (done.clone(), gate.clone());
            start_lane(4, LANE_IDLE, None, move |r: HubRequest| {
                let (done, gate) = (done.clone(), gate.clone());
                async move {
                    if held {
                        gate.acquire().await.unwrap().forget();
                    }
                    done.send((r.store_id.into_string(), r.request_id)).unwrap();
                }
            })
        };
        let (held, free) = (lane(true), lane(false));
        for id in 1..=3 {
            held.sender.try_send(request("held-store", id)).unwrap();
            free.sender.try_send(request("free-store", id)).unwrap();
        }
        // Full: the request comes back at once (the MQTT driver never waits for a lane).
        held.sender.try_send(request("held-store", 4)).unwrap();
        assert!(matches!(
            held.sender.try_send(request("held-store", 5)),
            Err(mpsc::error::TrySendError::Full(_))
        ));
        async fn next(finished: &mut mpsc::UnboundedReceiver<(String, u64)>) -> (String, u64) {
            tokio::time::timeout(Duration::from_secs(30), finished.recv())
                .await
                .expect("a lane was held up by another")
                .unwrap()
        }
        // The free store is served in full while the held one waits on its first request.
        for id in 1..=3 {
            assert_eq!(next(&mut finished).await, ("free-store".to_string(), id));
        }
        gate.add_permits(4);
        for id in 1..=4 {
            assert_eq!(next(&mut finished).await, ("held-store".to_string(), id));
        }
    }

    /// An idle lane closes and finishes; the store's next lane serves only after the previous
    /// one has served everything it took, so a store's order holds across lanes.
    #[actix::test]
    async fn an_idle_lane_closes_and_the_next_one_waits_for_it() {
        let (done, mut finished) = mpsc::unbounded_channel::<u64>();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let serve = |held: bool| {
            let (done, gate) = (done.clone(), gate.clone());
            move |r: HubRequest| {
                let (done, gate) = (done.clone(), gate.clone());
                async move {
                    if held {
                        gate.acquire().await.unwrap().forget();
                    }
                    done.send(r.request_id).unwrap();
                }
            }
        };
        // The first lane takes request 1 and is held serving it.
        let first = start_lane(4, Duration::from_millis(20), None, serve(true));
        first.sender.try_send(request("s", 1)).unwrap();
        // A second lane for the same store (as after the first closed) takes request 2.
        let second = start_lane(4, LANE_IDLE, Some(first.finished.clone()), serve(false));
        second.sender.try_send(request("s", 2)).unwrap();
        drop(first.sender);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.add_permits(1);
        let order = [
            finished.recv().await.unwrap(),
            finished.recv().await.unwrap(),
        ];
        assert_eq!(order, [1, 2], "the second lane overtook the first");
        tokio::time::timeout(Duration::from_secs(30), first.finished.clone())
            .await
            .expect("the first lane finished")
            .unwrap();
        // Idle, a lane closes by itself and says it is done (what the map is pruned by), without
        // anyone polling its `finished`.
        let idle = start_lane(4, Duration::from_millis(20), None, serve(false));
        assert!(!idle.is_done());
        tokio::time::timeout(Duration::from_secs(30), async {
            while !idle.is_done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("an idle lane closes");
        assert!(idle.sender.is_closed());
    }
}
