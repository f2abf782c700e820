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
    KeyEntry, TemplateBatch, TemplateChange, TemplateUpdate,
};
use telemetry::PaymentMetrics;
use tokio::sync::mpsc;

use crate::{
    bounded::Bounded,
    enroll::{IdentifyCmd, IdentityActor, TemplateSyncCmd},
    ledger_actor::{ApplyHubRequest, ExpirePending, LedgerActor, ReadLedger},
};

/// Mailbox bound of the hub link: link events wait in the MQTT client beyond this.
pub const HUB_LINK_MAILBOX: usize = 64;
/// Requests one store may have waiting on its lane; beyond it the MQTT driver waits (for every
/// store: a store that floods the cloud slows the link, it never makes it drop a request).
pub const STORE_LANE_QUEUE: usize = 256;
/// Identity requests (1:N searches, template syncs) waiting for the identity lane.
pub const IDENTITY_LANE_QUEUE: usize = 256;
/// Most store lanes at once (the broker's ACL lets only certificate holders publish, each on the
/// topic of its own name; requests for stores beyond this are dropped, unanswered).
pub const MAX_STORE_LANES: usize = 100_000;
/// How often the ledger moves back pending payments whose hub never confirmed them.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(5);

/// What every lane needs to serve a request.
struct Serving {
    client: mqtt::Client,
    ledger: Bounded<LedgerActor>,
    identity: Bounded<IdentityActor>,
    metrics: PaymentMetrics,
    /// Stores with a merchant account: the only request topics served.
    known_stores: Mutex<HashSet<String>>,
}

/// Serves the hubs.
pub struct HubLinkActor {
    serving: Arc<Serving>,
    connected: prometheus::IntGauge,
    lanes: HashMap<String, mpsc::Sender<HubRequest>>,
    identity_lane: Option<mpsc::Sender<HubRequest>>,
}

impl HubLinkActor {
    /// A link over `client`, serving from the ledger and identity threads.
    pub fn new(
        client: mqtt::Client,
        ledger: Bounded<LedgerActor>,
        identity: Bounded<IdentityActor>,
        metrics: PaymentMetrics,
        connected: prometheus::IntGauge,
    ) -> Self {
        HubLinkActor {
            serving: Arc::new(Serving {
                client,
                ledger,
                identity,
                metrics,
                known_stores: Mutex::default(),
            }),
            connected,
            lanes: HashMap::new(),
            identity_lane: None,
        }
    }

    /// The lane a request goes to: the identity lane, or its store's (created on first use).
    fn lane_for(&mut self, request: &HubRequest) -> Option<mpsc::Sender<HubRequest>> {
        if matches!(
            request.body,
            HubRequestBody::Identify(_) | HubRequestBody::TemplateSync { .. }
        ) {
            return self.identity_lane.clone();
        }
        if let Some(lane) = self.lanes.get(&request.store_id) {
            return Some(lane.clone());
        }
        if self.lanes.len() >= MAX_STORE_LANES {
            return None;
        }
        let lane = start_lane(STORE_LANE_QUEUE, serve_with(self.serving.clone()));
        self.lanes.insert(request.store_id.clone(), lane.clone());
        Some(lane)
    }
}

/// A lane: one task serving its requests one after the other, in arrival order, at most `queue`
/// of them waiting.
fn start_lane<F, Fut>(queue: usize, serve: F) -> mpsc::Sender<HubRequest>
where
    F: Fn(HubRequest) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (lane, mut waiting) = mpsc::channel::<HubRequest>(queue);
    actix::spawn(async move {
        while let Some(request) = waiting.recv().await {
            serve(request).await;
        }
    });
    lane
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
        self.identity_lane = Some(start_lane(
            IDENTITY_LANE_QUEUE,
            serve_with(self.serving.clone()),
        ));
        ctx.run_interval(EXPIRY_INTERVAL, |actor, _| {
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
            store_id,
            "request from an identity that is no store's hub refused"
        );
    }
    let body = match request.body {
        _ if !known => CloudReplyBody::Error {
            detail: format!("{store_id:?} is not a store with a merchant account"),
        },
        HubRequestBody::Identify(identify) => {
            match serving.identity.send(IdentifyCmd(identify)).await {
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
        _ => match serving.ledger.send(ApplyHubRequest(request)).await {
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
        serving
            .metrics
            .outcome(decision.reason(), started.elapsed());
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
        tracing::warn!(%error, store_id, request_id, "publishing reply failed");
    }
}

/// Something happened on the MQTT link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkEventMsg(pub LinkEvent);

impl Handler<LinkEventMsg> for HubLinkActor {
    type Result = ResponseFuture<()>;

    /// Answers as soon as the request is on its lane (the MQTT driver waits only when that lane
    /// is full), never when it has been served.
    fn handle(&mut self, msg: LinkEventMsg, _: &mut Self::Context) -> Self::Result {
        let client = self.serving.client.clone();
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
                let Some(lane) = self.lane_for(&request) else {
                    tracing::error!(store_id, "too many store lanes; request dropped");
                    return Box::pin(async {});
                };
                Box::pin(async move {
                    if lane.send(request).await.is_err() {
                        tracing::error!(store_id, "a store lane stopped; request dropped");
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
            if let Err(error) = client.publish(topic, QoS::AtLeastOnce, false, batch).await {
                tracing::warn!(%error, "pushing a template change failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            start_lane(4, move |r: HubRequest| {
                let (done, gate) = (done.clone(), gate.clone());
                async move {
                    if held {
                        gate.acquire().await.unwrap().forget();
                    }
                    done.send((r.store_id, r.request_id)).unwrap();
                }
            })
        };
        let (held, free) = (lane(true), lane(false));
        for id in 1..=3 {
            held.send(request("held-store", id)).await.unwrap();
            free.send(request("free-store", id)).await.unwrap();
        }
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
        gate.add_permits(3);
        for id in 1..=3 {
            assert_eq!(next(&mut finished).await, ("held-store".to_string(), id));
        }
    }
}
