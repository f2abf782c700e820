//! The MQTT link between store hubs and the cloud: its configuration section, a client that
//! seals every message it publishes with the tier's certificate key, and the loop that drives a
//! `rumqttc` event loop, opening every message it receives (see `pki::sealed`), turning it into a
//! small set of link events. Nothing unsealed crosses the link either way.

pub mod nats;

use std::{future::Future, sync::Arc, time::Duration};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};

pub use pki::Signer;
pub use rumqttc::QoS;

/// Capacity of the client's outgoing request channel: a publish waits when this many are queued.
pub const REQUEST_CHANNEL_CAPACITY: usize = 256;
/// Largest MQTT packet accepted or sent.
pub const MAX_PACKET_BYTES: usize = 1 << 20;

/// The `[mqtt]` section of the hub and cloud configurations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker host name or address; the broker's certificate must name it.
    pub host: String,
    /// Broker TLS port.
    pub port: u16,
    /// MQTT keep-alive; a dead broker is noticed within about 1.5 times this.
    pub keep_alive_seconds: u64,
    /// Pause before the first reconnection attempt; each further failed attempt doubles it, up
    /// to `reconnect_max_delay_ms`, and the pause taken is drawn at random below that (full
    /// jitter), so that a fleet cut off together does not come back together.
    pub reconnect_delay_ms: u64,
    /// Longest pause between reconnection attempts.
    pub reconnect_max_delay_ms: u64,
    /// More brokers of the same cluster (`host:port`), tried in turn after `host`:`port` when
    /// the one in use is lost; the persistent session lives in the cluster, so what was queued
    /// follows the client.
    pub failover: Vec<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 8883,
            keep_alive_seconds: 5,
            reconnect_delay_ms: 500,
            reconnect_max_delay_ms: 30_000,
            failover: Vec::new(),
        }
    }
}

impl MqttConfig {
    /// Checks ranges; the error names the key under `prefix` (e.g. `mqtt`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        if self.host.trim().is_empty() {
            return Err((format!("{prefix}.host"), "must not be empty".into()));
        }
        if self.port == 0 {
            return Err((
                format!("{prefix}.port"),
                "must be a port from 1 to 65535".into(),
            ));
        }
        if !(1..=3600).contains(&self.keep_alive_seconds) {
            return Err((
                format!("{prefix}.keep_alive_seconds"),
                "must be from 1 to 3600".into(),
            ));
        }
        if !(10..=60_000).contains(&self.reconnect_delay_ms) {
            return Err((
                format!("{prefix}.reconnect_delay_ms"),
                "must be from 10 to 60000".into(),
            ));
        }
        if !(self.reconnect_delay_ms..=600_000).contains(&self.reconnect_max_delay_ms) {
            return Err((
                format!("{prefix}.reconnect_max_delay_ms"),
                "must be from reconnect_delay_ms to 600000".into(),
            ));
        }
        for address in &self.failover {
            if parse_address(address).is_none() {
                return Err((
                    format!("{prefix}.failover"),
                    format!("{address:?} is not host:port"),
                ));
            }
        }
        Ok(())
    }

    /// Every broker address, the first one first.
    fn brokers(&self) -> Vec<(String, u16)> {
        std::iter::once((self.host.clone(), self.port))
            .chain(self.failover.iter().filter_map(|a| parse_address(a)))
            .collect()
    }

    /// How long to wait before reconnection attempt `attempt` (0 for the first after a loss):
    /// drawn at random between the base delay and twice it, doubled with each attempt (the first
    /// attempt after a broker restart is the one a whole fleet makes at once).
    pub fn reconnect_pause(&self, attempt: u32) -> Duration {
        let ceiling = self
            .reconnect_delay_ms
            .saturating_mul(1u64 << (attempt.min(20) + 1))
            .min(self.reconnect_max_delay_ms);
        let drawn = rand::random::<u64>() % (ceiling - self.reconnect_delay_ms + 1);
        Duration::from_millis(self.reconnect_delay_ms + drawn)
    }

    /// A client over TLS with a persistent session (`clean_session = false`), so that QoS 1
    /// messages sent while it was away are delivered when it returns. `tls` presents the tier's
    /// certificate and trusts only a broker's certificate (role `broker`) of the fleet's CA. The client id is the
    /// certificate's common name: a broker configured with `use_identity_as_username` and
    /// `use_username_as_clientid` (ops/mosquitto) gives each certificate its own session, so no
    /// other client can take it over.
    ///
    /// Every message published through the client is sealed with the identity's key; every
    /// message the link hears is opened against its CA and revocation list, and taken only when
    /// `expected` (given the topic) signed it.
    ///
    /// With `will` (topic, payload), the broker publishes the payload, sealed, retained, on the
    /// topic when the client goes without saying goodbye (its last will).
    pub fn connect(
        &self,
        identity: &pki::TlsIdentity,
        expected: impl Fn(&str) -> Option<Signer> + Send + 'static,
        will: Option<(String, Vec<u8>)>,
    ) -> Result<(Client, Link), pki::PkiError> {
        let signer = Arc::new(identity.reply_signer()?);
        let tls = Arc::new(identity.client_config_for(pki::Role::Broker)?);
        let client_id = identity.identity.common_name.clone();
        let will = match will {
            Some((topic, payload)) => {
                let sealed = signer.seal(&topic, payload)?;
                Some(rumqttc::LastWill::new(
                    topic,
                    sealed,
                    QoS::AtLeastOnce,
                    true,
                ))
            }
            None => None,
        };
        let keep_alive = Duration::from_secs(self.keep_alive_seconds);
        let make_options: MakeOptions = Box::new(move |host: &str, port: u16| {
            let mut options = MqttOptions::new(client_id.clone(), host, port);
            options
                .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    tls.clone(),
                )))
                .set_keep_alive(keep_alive)
                .set_clean_session(false)
                .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
            if let Some(will) = &will {
                options.set_last_will(will.clone());
            }
            options
        });
        let brokers = self.brokers();
        let options = make_options(&brokers[0].0, brokers[0].1);
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        // Requests and answers are small and wait on each other: Nagle's algorithm beside the
        // peer's delayed acknowledgements would hold each one back by tens of milliseconds.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let acks = Acks::default();
        let link = Link {
            eventloop,
            verifier: identity.sealed_verifier(),
            expected: Box::new(expected),
            brokers,
            current: 0,
            make_options,
            config: self.clone(),
            acks: acks.clone(),
        };
        Ok((
            Client {
                inner: client,
                signer,
                acks,
            },
            link,
        ))
    }
}

/// The MQTT client of a tier: publishes sealed messages. Clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: AsyncClient,
    signer: Arc<pki::ReplySigner>,
    acks: Acks,
}

/// QoS 1 publishes queued by a client and acknowledged by the broker, counted: a goodbye waits
/// for the ones before it (a broker may drop a publish still unacknowledged at a DISCONNECT).
#[derive(Clone, Default)]
struct Acks {
    queued: Arc<std::sync::atomic::AtomicU64>,
    acknowledged: Arc<std::sync::atomic::AtomicU64>,
}

impl Acks {
    /// Counts a publish queued at `qos`: only QoS 1 is answered by a PUBACK (nothing here
    /// publishes at QoS 2).
    fn queued(&self, qos: QoS) {
        if qos == QoS::AtLeastOnce {
            self.queued
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn all_acknowledged(&self) -> bool {
        self.acknowledged.load(std::sync::atomic::Ordering::SeqCst)
            >= self.queued.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Why a publish failed.
#[derive(Debug)]
pub enum PublishError {
    /// The message could not be sealed.
    Seal(pki::PkiError),
    /// The client's queue refused it (full, or the link is gone).
    Client(rumqttc::ClientError),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Seal(e) => write!(f, "sealing the message failed: {e}"),
            PublishError::Client(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PublishError {}

impl Client {
    /// Says goodbye to the broker (MQTT DISCONNECT) once what was published before it is
    /// acknowledged (at most [`GOODBYE_WAIT`]): the broker then publishes no last will, and
    /// [`drive`] returns once the DISCONNECT is sent.
    pub async fn goodbye(&self) -> Result<(), PublishError> {
        let deadline = tokio::time::Instant::now() + GOODBYE_WAIT;
        while !self.acks.all_acknowledged() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.disconnect().await.map_err(PublishError::Client)
    }

    /// A client that seals with `signer`, on no link of [`MqttConfig::connect`]'s (tests): no
    /// link counts its acknowledgements, so a goodbye after a QoS 1 publish waits the whole
    /// [`GOODBYE_WAIT`].
    pub fn new(inner: AsyncClient, signer: Arc<pki::ReplySigner>) -> Self {
        Client {
            inner,
            signer,
            acks: Acks::default(),
        }
    }

    /// Queues `payload` (JSON text), sealed for `topic`, without waiting for room in the queue.
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        let (topic, sealed) = self.seal(topic, payload)?;
        self.inner
            .try_publish(topic, qos, retain, sealed)
            .map_err(PublishError::Client)?;
        self.acks.queued(qos);
        Ok(())
    }

    /// Queues `payload` (JSON text), sealed for `topic`, waiting for room in the queue.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        let (topic, sealed) = self.seal(topic, payload)?;
        self.inner
            .publish(topic, qos, retain, sealed)
            .await
            .map_err(PublishError::Client)?;
        self.acks.queued(qos);
        Ok(())
    }

    fn seal(
        &self,
        topic: impl Into<String>,
        payload: Vec<u8>,
    ) -> Result<(String, Vec<u8>), PublishError> {
        let topic = topic.into();
        let sealed = self
            .signer
            .seal(&topic, payload)
            .map_err(PublishError::Seal)?;
        Ok((topic, sealed))
    }

    /// Subscribes to `topic`.
    pub async fn subscribe(
        &self,
        topic: impl Into<String>,
        qos: QoS,
    ) -> Result<(), rumqttc::ClientError> {
        self.inner.subscribe(topic, qos).await
    }
}

/// The receiving side of a tier's link: its event loop, and how its messages are opened.
pub struct Link {
    eventloop: EventLoop,
    verifier: pki::SealedVerifier,
    expected: ExpectedSigner,
    /// Every broker of the cluster; `current` is the one in use.
    brokers: Vec<(String, u16)>,
    current: usize,
    make_options: MakeOptions,
    config: MqttConfig,
    acks: Acks,
}

/// How long a goodbye waits for the broker to acknowledge what was published before it.
pub const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// The client's options for one broker address (everything else alike).
type MakeOptions = Box<dyn Fn(&str, u16) -> MqttOptions + Send>;

/// Who must have sealed a message heard on a topic (`None`: nobody speaks there to this tier).
type ExpectedSigner = Box<dyn Fn(&str) -> Option<Signer> + Send>;

impl Link {
    /// Moves to the next broker of the cluster (the same one when there is only one); the
    /// session state (messages in flight) carries over.
    fn fail_over(&mut self) {
        if self.brokers.len() < 2 {
            return;
        }
        self.current = (self.current + 1) % self.brokers.len();
        let (host, port) = &self.brokers[self.current];
        tracing::info!(%host, port, "trying the next broker of the cluster");
        self.eventloop.mqtt_options = (self.make_options)(host, *port);
    }

    /// The payload of a message heard on `topic`, or why it is refused: not sealed, sealed by
    /// someone other than who speaks on that topic, or for another topic.
    fn open(&self, topic: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let expected = (self.expected)(topic)
            .ok_or_else(|| format!("nobody speaks on {topic} to this tier"))?;
        self.verifier
            .open(topic, sealed, &expected)
            .map_err(|e| e.to_string())
    }
}

/// What the link reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Connected (again): subscribe and resend what waits.
    Connected,
    /// The connection dropped; the loop keeps trying.
    Disconnected(String),
    /// A message arrived, sealed by who speaks on its topic: its payload, opened.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
        /// Kept by the broker and handed over on subscribing (old news), not published now.
        retained: bool,
    },
    /// A message arrived that is not sealed by who speaks on its topic: dropped unread.
    Refused {
        /// Its topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// Drives the event loop until a goodbye ([`Client::goodbye`]), reconnecting after a pause that
/// grows with each failed attempt ([`MqttConfig::reconnect_pause`]), to the next broker of the
/// cluster each time, and hands every link event to `handler`. The handler is awaited before the next poll, so a slow owner
/// slows the link down instead of queueing without bound.
pub async fn drive<F, Fut>(mut link: Link, mut handler: F)
where
    F: FnMut(LinkEvent) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut connected = false;
    let mut attempt = 0;
    // Refused subscriptions in a row: a connection that succeeds does not reset them (a broker
    // refusing for good would otherwise be asked again at the shortest pause forever).
    let mut refusals = 0;
    loop {
        match link.eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                attempt = 0;
                handler(LinkEvent::Connected).await;
            }
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                // A broker that could not take a subscription (a clustered broker still electing
                // the leader of its session store) would leave this client deaf: connect again,
                // which subscribes again.
                tracing::warn!("the broker refused a subscription; connecting again");
                link.eventloop.clean();
                connected = false;
                handler(LinkEvent::Disconnected("subscription refused".into())).await;
                tokio::time::sleep(link.config.reconnect_pause(refusals)).await;
                refusals = refusals.saturating_add(1);
                link.fail_over();
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => refusals = 0,
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                link.acks
                    .acknowledged
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            // A goodbye ([`Client::goodbye`]): the link is closed for good.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                handler(LinkEvent::Disconnected("said goodbye".into())).await;
                return;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let topic = publish.topic.clone();
                let event = match link.open(&topic, &publish.payload) {
                    Ok(payload) => LinkEvent::Message {
                        topic,
                        payload,
                        retained: publish.retain,
                    },
                    Err(reason) => LinkEvent::Refused { topic, reason },
                };
                handler(event).await;
            }
            Ok(_) => {}
            Err(error) => {
                if connected {
                    tracing::warn!(%error, "mqtt connection lost");
                }
                connected = false;
                handler(LinkEvent::Disconnected(error.to_string())).await;
                tokio::time::sleep(link.config.reconnect_pause(attempt)).await;
                attempt = attempt.saturating_add(1);
                link.fail_over();
            }
        }
    }
}

/// `host:port`, split.
fn parse_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (!host.trim().is_empty() && port != 0).then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_pauses_grow_to_their_cap_drawn_at_random() {
        let config = MqttConfig {
            reconnect_delay_ms: 100,
            reconnect_max_delay_ms: 1_000,
            ..MqttConfig::default()
        };
        for attempt in [0, 1, 3, 10, 40] {
            let ceiling = (100u64 << (attempt.min(20) + 1)).min(1_000);
            let pauses: Vec<u64> = (0..500)
                .map(|_| config.reconnect_pause(attempt).as_millis() as u64)
                .collect();
            assert!(
                pauses.iter().all(|p| (100..=ceiling).contains(p)),
                "{attempt}"
            );
            // Drawn, not fixed: a fleet cut off together spreads its returns.
            let distinct: std::collections::BTreeSet<_> = pauses.iter().collect();
            assert!(distinct.len() > 20, "{attempt}: {distinct:?}");
        }
    }

    #[test]
    fn brokers_are_the_first_then_the_failover_list() {
        let config = MqttConfig {
            host: "a".into(),
            port: 1,
            failover: vec!["b:2".into(), "[::1]:3".into()],
            ..MqttConfig::default()
        };
        assert!(config.validate("mqtt").is_ok());
        assert_eq!(
            config.brokers(),
            [("a".into(), 1), ("b".into(), 2), ("[::1]".into(), 3)]
        );
        for bad in ["b", "b:0", ":2", "b:x"] {
            let config = MqttConfig {
                failover: vec![bad.into()],
                ..MqttConfig::default()
            };
            assert_eq!(
                config.validate("mqtt").unwrap_err().0,
                "mqtt.failover",
                "{bad}"
            );
        }
    }

    #[test]
    fn validation_names_keys() {
        assert!(MqttConfig::default().validate("mqtt").is_ok());
        let bad = MqttConfig {
            port: 0,
            ..MqttConfig::default()
        };
        assert_eq!(bad.validate("mqtt").unwrap_err().0, "mqtt.port");
        let bad = MqttConfig {
            keep_alive_seconds: 0,
            ..MqttConfig::default()
        };
        assert_eq!(
            bad.validate("mqtt").unwrap_err().0,
            "mqtt.keep_alive_seconds"
        );
    }
}
