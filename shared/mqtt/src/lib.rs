//! The MQTT link between store hubs and the cloud: its configuration section and the loop that
//! drives a `rumqttc` event loop, turning it into a small set of link events.

use std::{future::Future, sync::Arc, time::Duration};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};

pub use rumqttc::{AsyncClient as Client, QoS};

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
    /// Pause between reconnection attempts.
    pub reconnect_delay_ms: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 8883,
            keep_alive_seconds: 5,
            reconnect_delay_ms: 500,
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
        Ok(())
    }

    /// A client over TLS with a persistent session (`clean_session = false`), so that QoS 1
    /// messages sent while it was away are delivered when it returns. `tls` presents the tier's
    /// certificate and trusts only a broker's certificate (role `broker`) of the fleet's CA. The client id is the
    /// certificate's common name: a broker configured with `use_identity_as_username` and
    /// `use_username_as_clientid` (ops/mosquitto) gives each certificate its own session, so no
    /// other client can take it over.
    pub fn connect(
        &self,
        identity: &pki::TlsIdentity,
    ) -> Result<(AsyncClient, EventLoop), pki::PkiError> {
        let tls = identity.client_config_for(pki::Role::Broker)?;
        let client_id = identity.identity.common_name.clone();
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        options
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )))
            .set_keep_alive(Duration::from_secs(self.keep_alive_seconds))
            .set_clean_session(false)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        // Requests and answers are small and wait on each other: Nagle's algorithm beside the
        // peer's delayed acknowledgements would hold each one back by tens of milliseconds.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        Ok((client, eventloop))
    }
}

/// What the link reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Connected (again): subscribe and resend what waits.
    Connected,
    /// The connection dropped; the loop keeps trying.
    Disconnected(String),
    /// A message arrived.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
}

/// Drives the event loop forever, reconnecting after `reconnect_delay`, and hands every link event
/// to `handler`. The handler is awaited before the next poll, so a slow owner slows the link down
/// instead of queueing without bound.
pub async fn drive<F, Fut>(mut eventloop: EventLoop, reconnect_delay: Duration, mut handler: F)
where
    F: FnMut(LinkEvent) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut connected = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                handler(LinkEvent::Connected).await;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                handler(LinkEvent::Message {
                    topic: publish.topic.clone(),
                    payload: publish.payload.to_vec(),
                })
                .await;
            }
            Ok(_) => {}
            Err(error) => {
                if connected {
                    tracing::warn!(%error, "mqtt connection lost");
                }
                connected = false;
                handler(LinkEvent::Disconnected(error.to_string())).await;
                tokio::time::sleep(reconnect_delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
