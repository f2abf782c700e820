//! The facepay cloud: the account system of record.
//!
//! It keeps the double-entry ledger ([`ledger`]), serves store hubs over MQTT (authorize, void,
//! key sync) and distributes account public keys to them, and offers an admin HTTP API with
//! Prometheus metrics. See `README.md` in this folder for the actors and their messages.

pub mod actors;
mod api;
pub mod config;
mod error;
pub mod identity;
pub mod ledger;

use std::net::SocketAddr;

use actix::prelude::*;
use anyhow::Context as _;
use prometheus::Registry;

pub use config::CloudConfig;
pub use error::LedgerError;

use crate::actors::{HubLinkActor, LedgerActor, LinkEventMsg};

/// A running cloud.
pub struct CloudHandle {
    /// Where the admin API and `/metrics` listen.
    pub http_addr: SocketAddr,
    /// The ledger actor, for in-process callers (the fleet demo).
    pub ledger: Addr<LedgerActor>,
    server: actix_web::dev::ServerHandle,
}

impl CloudHandle {
    /// Stops the HTTP server; the actors stop with the actix system.
    pub async fn stop(&self) {
        self.server.stop(true).await;
    }

    /// The HTTP server's handle, to stop it from elsewhere.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.clone()
    }
}

/// Starts the cloud inside the current actix system.
pub async fn start(config: CloudConfig) -> anyhow::Result<CloudHandle> {
    let registry = Registry::new();
    let metrics = telemetry::PaymentMetrics::register(&registry, "cloud");
    let connected = telemetry::register_gauge(
        &registry,
        "facepay_cloud_mqtt_connected",
        "1 while connected to the broker",
    );

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let ledger_path = config.data_dir.join("ledger");
    let ledger = ledger::Ledger::open(&ledger_path)
        .with_context(|| format!("opening ledger at {}", ledger_path.display()))?;
    let ledger = SyncArbiter::start(1, move || {
        // One thread: the ledger has a single writer.
        LedgerActor::new(ledger.clone())
    });

    let (client, eventloop) = config.mqtt.connect(&config.client_id);
    let link = HubLinkActor::new(client, ledger.clone(), metrics, connected).start();
    let link_events = link.clone();
    let reconnect = std::time::Duration::from_millis(config.mqtt.reconnect_delay_ms);
    actix::spawn(mqtt::drive(eventloop, reconnect, move |event| {
        let link = link_events.clone();
        async move {
            let _ = link.send(LinkEventMsg(event)).await;
        }
    }));

    let state = api::ApiState {
        ledger: ledger.clone(),
        link,
    };
    let (http_addr, handle) = telemetry::serve_http(&config.http_listen, registry, move |cfg| {
        api::configure(cfg, state.clone())
    })
    .with_context(|| format!("binding http_listen {}", config.http_listen))?;
    tracing::info!(%http_addr, "cloud started");
    Ok(CloudHandle {
        http_addr,
        ledger,
        server: handle,
    })
}
