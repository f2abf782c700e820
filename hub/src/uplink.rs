//! The hub's link to the cloud: MQTT request/reply with deadlines, and key broadcasts.

use std::{collections::HashMap, time::Duration};

use actix::prelude::*;
use futures::channel::oneshot;
use mqtt::{LinkEvent, QoS};
use protocol::{
    AllowanceBatch, CloudReply, CloudReplyBody, HubRequest, HubRequestBody, KeyBatch, StoreId,
    TemplateBatch,
};

use crate::{
    breaker::{Admission, BreakerState, CircuitBreaker},
    error::HubError,
};

/// Timeouts in a row that open the circuit breaker.
pub const BREAKER_THRESHOLD: u32 = 3;
/// How long an open breaker refuses requests before it lets a probe through.
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(5);

/// Most requests waiting for the cloud at once; beyond it a request fails at once as saturated.
pub const MAX_PENDING_CLOUD_REQUESTS: usize = 1024;
/// Mailbox bound of the uplink actor.
pub const UPLINK_MAILBOX: usize = 256;

/// Told to the hub's listeners (keys and voids, templates) when the link changes or the cloud
/// pushes something.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub enum UplinkEvent {
    /// Connected to the broker (again): time to sync keys and resend voids.
    CloudConnected,
    /// The cloud broadcast key changes.
    KeysBroadcast(KeyBatch),
    /// The cloud pushed template changes (this store's customers, or revocations).
    TemplatesPushed(TemplateBatch),
    /// The cloud revoked offline allowances (accounts in debt or closed).
    AllowancesPushed(AllowanceBatch),
    /// The cloud pushed the fleet's certificate revocation list (PEM, not yet checked).
    RevocationListPushed(String),
    /// The cloud broadcast second-factor lockout changes.
    LockoutsPushed(protocol::LockoutBatch),
}

/// Owns the MQTT client and the table of requests waiting for replies.
pub struct UplinkActor {
    store_id: StoreId,
    client: mqtt::Client,
    connected: bool,
    next_request_id: u64,
    pending: HashMap<u64, oneshot::Sender<CloudReplyBody>>,
    listeners: Vec<Recipient<UplinkEvent>>,
    connected_gauge: prometheus::IntGauge,
    breaker: CircuitBreaker,
    metrics: Option<UplinkMetrics>,
    /// Said goodbye: nothing says "online" again. Held (as a lock) while a presence is being
    /// queued, so that an "online" queued on a reconnect never follows the goodbye's "offline".
    leaving: std::sync::Arc<tokio::sync::Mutex<bool>>,
}

/// What the uplink shows of the cloud link, every series up front.
#[derive(Clone)]
pub struct UplinkMetrics {
    /// `facepay_hub_cloud_breaker_state{state}`: closed, half_open, open.
    breaker: telemetry::StateSet,
    /// `facepay_hub_authorization_mode{mode}`: online, offline (no broker, or the breaker not
    /// closed).
    mode: telemetry::StateSet,
    /// `facepay_hub_uplink_pending_requests`: sent to the cloud, not yet answered.
    pending: prometheus::IntGauge,
}

impl UplinkMetrics {
    /// Registers on a hub's registry; the hub is offline until connected.
    pub fn register(registry: &prometheus::Registry) -> Self {
        UplinkMetrics {
            breaker: telemetry::StateSet::register(
                registry,
                "facepay_hub_cloud_breaker_state",
                "circuit breaker on the cloud link: closed, half_open (one probe goes), open \
                 (failing fast); 1 for the state in force",
                "state",
                &["closed", "half_open", "open"],
            ),
            mode: telemetry::StateSet::register(
                registry,
                "facepay_hub_authorization_mode",
                "how the hub authorizes: online (with the cloud) or offline (alone, within its \
                 bounds: the broker lost or the breaker not closed); 1 for the mode in force",
                "mode",
                &["offline", "online"],
            ),
            pending: telemetry::register_gauge(
                registry,
                "facepay_hub_uplink_pending_requests",
                "requests sent to the cloud and not yet answered",
            ),
        }
    }
}

impl UplinkActor {
    /// An uplink for a store; `listeners` hear connection events and pushes.
    pub fn new(
        store_id: StoreId,
        client: mqtt::Client,
        listeners: Vec<Recipient<UplinkEvent>>,
        connected_gauge: prometheus::IntGauge,
    ) -> Self {
        // Request ids only need to be unique among this process's requests, but a random start
        // keeps a restarted hub from matching a stale reply to a new request.
        let next_request_id = rand::random::<u64>() >> 1;
        UplinkActor {
            store_id,
            client,
            connected: false,
            next_request_id,
            pending: HashMap::new(),
            listeners,
            connected_gauge,
            breaker: CircuitBreaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN),
            metrics: None,
            leaving: Default::default(),
        }
    }

    /// Shows the breaker's state, the authorization mode and the requests in flight.
    pub fn with_metrics(mut self, metrics: UplinkMetrics) -> Self {
        self.metrics = Some(metrics);
        self.show_breaker();
        self
    }

    fn show_breaker(&self) {
        let state = self.breaker.state(std::time::Instant::now());
        if let Some(metrics) = &self.metrics {
            metrics.breaker.set(match state {
                BreakerState::Closed => "closed",
                BreakerState::HalfOpen => "half_open",
                BreakerState::Open => "open",
            });
            metrics
                .mode
                .set(if self.connected && state == BreakerState::Closed {
                    "online"
                } else {
                    "offline"
                });
        }
    }

    fn show_pending(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.pending.set(self.pending.len() as i64);
        }
    }
}

impl UplinkActor {
    fn tell(&self, event: UplinkEvent) {
        for listener in &self.listeners {
            listener.do_send(event.clone());
        }
    }
}

impl Actor for UplinkActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(UPLINK_MAILBOX);
        // The store's heartbeat: its presence again now and then while connected, so that the
        // cloud sees when it was last heard even in a quiet hour.
        // Not retained: the retained presence is the connection's "online" (or its will), and a
        // cloud that subscribes anew hears no stale heartbeat as news.
        ctx.run_interval(PRESENCE_HEARTBEAT, |actor, _| {
            let leaving = actor.leaving.try_lock().map_or(true, |leaving| *leaving);
            if !actor.connected || leaving {
                return;
            }
            let online = protocol::encode(&protocol::Presence { online: true });
            let topic = protocol::topics::store_presence(&actor.store_id);
            if let Err(error) = actor
                .client
                .try_publish(topic, QoS::AtMostOnce, false, online)
            {
                tracing::debug!(%error, "presence heartbeat not queued");
            }
        });
    }
}

/// Says goodbye to the cloud (the hub is stopping): the store's presence "offline", retained, then
/// MQTT DISCONNECT, so that the broker publishes no last will and the cloud hears a goodbye.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Goodbye;

impl Handler<Goodbye> for UplinkActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Goodbye, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        let presence = protocol::topics::store_presence(&self.store_id);
        let leaving = self.leaving.clone();
        Box::pin(async move {
            let mut leaving = leaving.lock().await;
            *leaving = true;
            let offline = protocol::encode(&protocol::Presence { online: false });
            if let Err(error) = client
                .publish(presence, QoS::AtLeastOnce, true, offline)
                .await
            {
                tracing::warn!(%error, "publishing the goodbye failed");
            }
            if let Err(error) = client.goodbye().await {
                tracing::warn!(%error, "disconnecting from the broker failed");
            }
        })
    }
}

/// How often a connected hub says again that it is online.
pub const PRESENCE_HEARTBEAT: Duration = Duration::from_secs(30);

/// Send a request to the cloud and wait for its reply until `timeout`.
#[derive(Message)]
#[rtype(result = "Result<CloudReplyBody, HubError>")]
pub struct CallCloud {
    /// What to ask.
    pub body: HubRequestBody,
    /// How long to wait.
    pub timeout: Duration,
}

impl Handler<CallCloud> for UplinkActor {
    type Result = ResponseActFuture<Self, Result<CloudReplyBody, HubError>>;

    fn handle(&mut self, msg: CallCloud, _: &mut Self::Context) -> Self::Result {
        if !self.connected {
            return Box::pin(fut::ready(Err(HubError::CloudDisconnected)));
        }
        if self.pending.len() >= MAX_PENDING_CLOUD_REQUESTS {
            return Box::pin(fut::ready(Err(HubError::UplinkSaturated)));
        }
        let admission = self.breaker.admit(std::time::Instant::now());
        self.show_breaker();
        if let Admission::Refuse { retry_in } = admission {
            return Box::pin(fut::ready(Err(HubError::CircuitOpen(
                retry_in.as_millis() as u64
            ))));
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let lane = if msg.body.is_identity() {
            Lane::Identity
        } else {
            Lane::Payments
        };
        let request = HubRequest {
            request_id,
            store_id: self.store_id.clone(),
            body: msg.body,
        };
        let payload = protocol::encode(&request);
        if let Err(error) = self.client.try_publish(
            protocol::topics::cloud_requests(&self.store_id),
            QoS::AtLeastOnce,
            false,
            payload,
        ) {
            tracing::warn!(%error, "publishing to the cloud failed");
            // Not sent: a probe it carried proves nothing.
            self.breaker.link_lost();
            return Box::pin(fut::ready(Err(HubError::UplinkSaturated)));
        }
        let (tx, rx) = oneshot::channel();
        self.pending.insert(request_id, tx);
        self.show_pending();
        let timeout = msg.timeout;
        Box::pin(
            async move {
                match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(reply)) => Ok(reply),
                    // The sender is dropped when the link goes down: fail now, not at the deadline.
                    Ok(Err(_)) => Err(HubError::LinkLost),
                    Err(_) => Err(HubError::CloudTimeout(timeout.as_millis() as u64)),
                }
            }
            .into_actor(self)
            .map(move |result, actor, _| {
                actor.pending.remove(&request_id);
                actor.show_pending();
                let now = std::time::Instant::now();
                let (result, settled) = settle(&mut actor.breaker, lane, result, now);
                match settled {
                    Settled::Reopened => {
                        tracing::info!(store_id = %actor.store_id, "the cloud answers again");
                        // Voids and syncs waiting for the cloud go now.
                        actor.tell(UplinkEvent::CloudConnected);
                    }
                    Settled::Opened => tracing::warn!(
                        store_id = %actor.store_id,
                        "cloud unanswering; failing fast"
                    ),
                    Settled::Unchanged => {}
                }
                actor.show_breaker();
                result
            }),
        )
    }
}

/// What a finished request did to the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// An answer closed an open circuit.
    Reopened,
    /// The circuit is open after this request.
    Opened,
    /// Neither.
    Unchanged,
}

/// The cloud lane a request is served on ([`HubRequestBody::is_identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// The store's payments, voids, syncs: what the breaker protects.
    Payments,
    /// 1:N search and template sync, apart from payments.
    Identity,
}

/// Accounts a finished request to the breaker: an answer closes it; no answer in time counts
/// against it, and so does a `Busy` refusal of the payment lane (the cloud did not serve it). A
/// busy identity lane says nothing about payments: it only frees a probe. A `Busy` reply becomes
/// [`HubError::CloudBusy`], so no caller mistakes it for an answer.
fn settle(
    breaker: &mut CircuitBreaker,
    lane: Lane,
    result: Result<CloudReplyBody, HubError>,
    now: std::time::Instant,
) -> (Result<CloudReplyBody, HubError>, Settled) {
    let result = match result {
        Ok(CloudReplyBody::Busy { detail }) => Err(HubError::CloudBusy(detail)),
        other => other,
    };
    let settled = match &result {
        Ok(_) if breaker.answered() => Settled::Reopened,
        Ok(_) => Settled::Unchanged,
        Err(HubError::CloudBusy(_)) if lane == Lane::Identity => {
            breaker.link_lost();
            Settled::Unchanged
        }
        Err(HubError::CloudTimeout(_) | HubError::CloudBusy(_)) => {
            breaker.timed_out(now);
            if breaker.state(now) == BreakerState::Open {
                Settled::Opened
            } else {
                Settled::Unchanged
            }
        }
        Err(_) => {
            breaker.link_lost();
            Settled::Unchanged
        }
    };
    (result, settled)
}

/// Something happened on the MQTT link.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkEventMsg(pub LinkEvent);

impl Handler<LinkEventMsg> for UplinkActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: LinkEventMsg, _: &mut Self::Context) -> Self::Result {
        match msg.0 {
            LinkEvent::Connected => {
                self.connected = true;
                self.connected_gauge.set(1);
                self.show_breaker();
                tracing::info!(store_id = %self.store_id, "hub connected to broker");
                let client = self.client.clone();
                let listeners = self.listeners.clone();
                let presence = protocol::topics::store_presence(&self.store_id);
                let leaving = self.leaving.clone();
                let topics = [
                    protocol::topics::store_replies(&self.store_id),
                    protocol::topics::key_updates(),
                    protocol::topics::store_templates(&self.store_id),
                    protocol::topics::template_revocations(),
                    protocol::topics::allowance_updates(),
                    protocol::topics::lockouts(),
                    protocol::topics::revocation_list(),
                ];
                // Not awaited by the driver: a subscribe waits for room in the client's queue,
                // which only the driver empties.
                actix::spawn(async move {
                    for topic in topics {
                        if let Err(error) = client.subscribe(topic, QoS::AtLeastOnce).await {
                            tracing::warn!(%error, "subscribing failed");
                        }
                    }
                    // Retained: the cloud learns the store is online, and replaces the last
                    // will's "offline" of an earlier connection. Never after a goodbye.
                    let leaving = leaving.lock().await;
                    if !*leaving {
                        let online = protocol::encode(&protocol::Presence { online: true });
                        if let Err(error) = client
                            .publish(presence, QoS::AtLeastOnce, true, online)
                            .await
                        {
                            tracing::warn!(%error, "publishing presence failed");
                        }
                    }
                    drop(leaving);
                    for listener in listeners {
                        listener.do_send(UplinkEvent::CloudConnected);
                    }
                });
            }
            LinkEvent::Disconnected(_) => {
                if self.connected {
                    tracing::warn!(store_id = %self.store_id, "hub lost the broker");
                }
                self.connected = false;
                self.connected_gauge.set(0);
                self.show_breaker();
                // Dropping the senders fails every waiting request now.
                self.pending.clear();
                self.show_pending();
            }
            // Counted and logged where the link is driven; nothing to act on.
            LinkEvent::Refused { .. } => {}
            LinkEvent::Message { topic, payload, .. } => {
                if topic == protocol::topics::key_updates() {
                    match protocol::decode::<KeyBatch>(&payload) {
                        Ok(batch) => self.tell(UplinkEvent::KeysBroadcast(batch)),
                        Err(error) => tracing::warn!(%error, "unreadable key broadcast dropped"),
                    }
                } else if topic == protocol::topics::allowance_updates() {
                    match protocol::decode::<AllowanceBatch>(&payload) {
                        Ok(batch) => self.tell(UplinkEvent::AllowancesPushed(batch)),
                        Err(error) => tracing::warn!(%error, "unreadable allowance update dropped"),
                    }
                } else if topic == protocol::topics::lockouts() {
                    match protocol::decode::<protocol::LockoutBatch>(&payload) {
                        Ok(batch) => self.tell(UplinkEvent::LockoutsPushed(batch)),
                        Err(error) => tracing::warn!(%error, "unreadable lockout update dropped"),
                    }
                } else if topic == protocol::topics::revocation_list() {
                    match protocol::decode::<protocol::RevocationListPush>(&payload) {
                        Ok(push) => self.tell(UplinkEvent::RevocationListPushed(push.crl_pem)),
                        Err(error) => tracing::warn!(%error, "unreadable revocation list dropped"),
                    }
                } else if topic == protocol::topics::store_templates(&self.store_id)
                    || topic == protocol::topics::template_revocations()
                {
                    match protocol::decode::<TemplateBatch>(&payload) {
                        Ok(batch) => self.tell(UplinkEvent::TemplatesPushed(batch)),
                        Err(error) => tracing::warn!(%error, "unreadable template push dropped"),
                    }
                } else {
                    match protocol::decode::<CloudReply>(&payload) {
                        Ok(reply) => {
                            if let Some(waiting) = self.pending.remove(&reply.request_id) {
                                self.show_pending();
                                let _ = waiting.send(reply.body);
                            } else {
                                tracing::debug!(
                                    request_id = reply.request_id,
                                    "late cloud reply dropped"
                                );
                            }
                        }
                        Err(error) => tracing::warn!(%error, "unreadable cloud reply dropped"),
                    }
                }
            }
        }
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> Result<CloudReplyBody, HubError> {
        Ok(CloudReplyBody::Busy {
            detail: "the cloud is busy with this store's requests; retry".into(),
        })
    }

    #[test]
    fn a_busy_refusal_is_no_answer_for_the_caller_nor_for_the_breaker() {
        let now = std::time::Instant::now();
        let mut breaker = CircuitBreaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN);
        for n in 1..=BREAKER_THRESHOLD {
            let (result, settled) = settle(&mut breaker, Lane::Payments, busy(), now);
            assert!(
                matches!(result, Err(HubError::CloudBusy(ref d)) if d.contains("busy")),
                "{result:?}"
            );
            let expected = if n == BREAKER_THRESHOLD {
                Settled::Opened
            } else {
                Settled::Unchanged
            };
            assert_eq!(settled, expected, "after {n} refusals");
        }
        assert_eq!(breaker.state(now), BreakerState::Open);
        // An answer after the cool-down closes it again.
        let later = now + BREAKER_COOL_DOWN;
        assert_eq!(breaker.admit(later), Admission::Send);
        let answer = Ok(CloudReplyBody::Error {
            detail: "the ledger failed".into(),
        });
        let (result, settled) = settle(&mut breaker, Lane::Payments, answer.clone(), later);
        assert_eq!(
            result, answer,
            "an error reply is an answer, passed on as is"
        );
        assert_eq!(settled, Settled::Reopened);
        assert_eq!(breaker.state(later), BreakerState::Closed);
    }

    #[test]
    fn a_busy_identity_lane_never_opens_the_breaker_for_payments() {
        let now = std::time::Instant::now();
        let mut breaker = CircuitBreaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN);
        for _ in 0..2 * BREAKER_THRESHOLD {
            let (result, settled) = settle(&mut breaker, Lane::Identity, busy(), now);
            assert!(matches!(result, Err(HubError::CloudBusy(_))), "{result:?}");
            assert_eq!(settled, Settled::Unchanged);
        }
        assert_eq!(breaker.state(now), BreakerState::Closed);
        // Nor does it count toward the payment lane's run of failures.
        for _ in 1..BREAKER_THRESHOLD {
            let (_, settled) = settle(&mut breaker, Lane::Payments, busy(), now);
            assert_eq!(settled, Settled::Unchanged);
        }
        assert_eq!(breaker.state(now), BreakerState::Closed);
    }

    #[test]
    fn a_lost_link_does_not_count_against_the_cloud() {
        let now = std::time::Instant::now();
        let mut breaker = CircuitBreaker::new(1, BREAKER_COOL_DOWN);
        let (result, settled) = settle(&mut breaker, Lane::Payments, Err(HubError::LinkLost), now);
        assert_eq!(result, Err(HubError::LinkLost));
        assert_eq!(settled, Settled::Unchanged);
        assert_eq!(breaker.state(now), BreakerState::Closed);
        let (_, settled) = settle(
            &mut breaker,
            Lane::Payments,
            Err(HubError::CloudTimeout(800)),
            now,
        );
        assert_eq!(settled, Settled::Opened);
    }
}
