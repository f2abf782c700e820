//! An attacker on the MQTT link between hubs and the cloud: a client with a certificate of the
//! fleet (stolen from a store, or the broker itself relaying what it likes), publishing what it
//! wants and reading what it may. Blocking, for tests.

use std::{
    sync::{mpsc, Arc},
    time::Duration,
};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

/// A connected attacker.
pub struct Attacker {
    runtime: tokio::runtime::Runtime,
    client: AsyncClient,
    heard: mpsc::Receiver<(String, Vec<u8>)>,
}

impl Attacker {
    /// Connects to the broker on `port` with the test PKI's certificate `name`, as `client_id`,
    /// and waits until the broker accepted it.
    pub fn connect(port: u16, name: &str, client_id: &str) -> anyhow::Result<Self> {
        let tls = crate::tls_identity(name)?.client_config()?;
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(mqtt::MAX_PACKET_BYTES, mqtt::MAX_PACKET_BYTES)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (heard_tx, heard) = mpsc::channel();
        let (up_tx, up) = mpsc::channel();
        runtime.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = up_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = heard_tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        up.recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow::anyhow!("the broker did not accept {name}"))?;
        Ok(Attacker {
            runtime,
            client,
            heard,
        })
    }

    /// Subscribes to `filter` (the broker may accept and deliver nothing).
    pub fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.client.subscribe(filter, QoS::AtLeastOnce))?;
        // The subscription is in place once the broker acknowledged it; a moment covers it.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// Publishes `payload` on `topic` (QoS 1).
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.runtime
            .block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload))?;
        Ok(())
    }

    /// The next message heard on a subscribed topic, within `timeout`.
    pub fn next_message(&self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        self.heard.recv_timeout(timeout).ok()
    }
}
