//! The facepay cloud: the account system of record.
//!
//! It keeps the double-entry ledger ([`ledger`]), serves store hubs over MQTT (authorize, void,
//! key sync) and distributes account public keys to them, and offers an admin HTTP API with
//! Prometheus metrics. See `README.md` in this folder for the actors and their messages.

pub mod actors;
mod api;
pub mod config;
pub mod customers;
pub mod enroll;
mod error;
pub mod identity;
pub mod ledger;
pub mod tls;

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
    /// Where the HTTPS enrollment API listens.
    pub api_addr: SocketAddr,
    /// The certificate clients of the HTTPS API must trust (the development one unless
    /// configured).
    pub api_cert: std::path::PathBuf,
    /// The file holding the enrollment API's operator token.
    pub api_token: std::path::PathBuf,
    /// The ledger actor, for in-process callers (the fleet demo).
    pub ledger: Addr<LedgerActor>,
    server: actix_web::dev::ServerHandle,
    api_server: actix_web::dev::ServerHandle,
}

impl CloudHandle {
    /// Stops the HTTP servers; the actors stop with the actix system.
    pub async fn stop(&self) {
        self.api_server.stop(true).await;
        self.server.stop(true).await;
    }

    /// The HTTP server's handle, to stop it from elsewhere.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.clone()
    }

    /// The HTTPS API server's handle.
    pub fn api_server_handle(&self) -> actix_web::dev::ServerHandle {
        self.api_server.clone()
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
        .with_context(|| format!("opening ledger at {}", ledger_path.display()))?
        .with_offline_policy(config.offline);
    let offline_metrics = actors::OfflineMetrics::register(&registry);
    let ledger = SyncArbiter::start(1, move || {
        // One thread: the ledger has a single writer.
        LedgerActor::new(ledger.clone()).with_metrics(offline_metrics.clone())
    });

    let templates_gauge = telemetry::register_gauge(
        &registry,
        "facepay_cloud_identity_templates",
        "face templates in the identity index",
    );
    let customers_path = config.data_dir.join("customers");
    let store = customers::CustomerStore::open(&customers_path, &config.template_key_path())
        .with_context(|| format!("opening the customer store at {}", customers_path.display()))?;
    let index_path = config.data_dir.join("identity.faiss");
    let identity_config = config.identity.clone();
    let actor = tokio::task::spawn_blocking(move || {
        enroll::IdentityActor::open(store, index_path, identity_config, templates_gauge)
    })
    .await
    .expect("opening does not panic")
    .context("opening the identity index")?;
    let slot = std::sync::Mutex::new(Some(actor));
    // One thread: the store and the index have a single writer.
    let identity = SyncArbiter::start(1, move || {
        slot.lock()
            .expect("not poisoned")
            .take()
            .expect("one identity thread")
    });
    let engine =
        face::FaceEngine::load_default(config.face.clone()).context("loading the face models")?;
    let faces = face::worker::start_workers(std::sync::Arc::new(engine), config.face_threads);

    let (client, eventloop) = config.mqtt.connect(&config.client_id);
    let link =
        HubLinkActor::new(client, ledger.clone(), identity.clone(), metrics, connected).start();
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
        link: link.clone(),
    };
    let (http_addr, handle) =
        telemetry::serve_http(&config.http_listen, registry.clone(), move |cfg| {
            api::configure(cfg, state.clone())
        })
        .with_context(|| format!("binding http_listen {}", config.http_listen))?;
    let (tls, api_cert) = tls::server_config(&config.tls, &config.data_dir)?;
    let token_digest = tls::operator_token_digest(&config.api_token_path())?;
    let enroll_state = api::EnrollState {
        token_digest,
        ledger: ledger.clone(),
        link,
        identity,
        faces,
    };
    let (api_addr, api_server) =
        telemetry::serve_https(&config.api_listen, registry, tls, move |cfg| {
            api::configure_enroll(cfg, enroll_state.clone())
        })
        .with_context(|| format!("binding api_listen {}", config.api_listen))?;
    tracing::info!(%http_addr, %api_addr, cert = %api_cert.display(), "cloud started");
    Ok(CloudHandle {
        http_addr,
        api_addr,
        api_cert,
        api_token: config.api_token_path(),
        ledger,
        server: handle,
        api_server,
    })
}
