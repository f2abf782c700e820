//! The facepay edge: the checkout terminal.
//!
//! A scanner actor reads frames from a [`frames::FrameSource`] and decodes QR payment codes; a
//! camera actor reads frames from another source and runs the face pipeline; a checkout actor runs
//! one sensor session at a time for the cash register's local HTTP API (charge, verify, second
//! factor) and asks the store hub over Zenoh. See `README.md` in this folder for the actors.

mod api;
pub mod camera;
pub mod checkout;
pub mod config;
pub mod frames;
pub mod hub_client;
pub mod scanner;

use std::{net::SocketAddr, time::Duration};

use actix::prelude::*;
use anyhow::Context as _;
use prometheus::Registry;

pub use api::{status_of, status_of_verify};
pub use config::EdgeConfig;

use crate::{
    camera::CameraActor,
    checkout::{CheckoutActor, CheckoutSettings},
    frames::DirectorySource,
    hub_client::HubClient,
    scanner::ScannerActor,
};

/// A running edge terminal.
pub struct EdgeHandle {
    /// Where the cash-register API and `/metrics` listen.
    pub http_addr: SocketAddr,
    /// The checkout actor.
    pub checkout: Addr<CheckoutActor>,
    server: actix_web::dev::ServerHandle,
}

impl EdgeHandle {
    /// Stops the HTTP server; the actors stop with the actix system.
    pub async fn stop(&self) {
        self.server.stop(true).await;
    }

    /// The HTTP server's handle, to stop it from elsewhere.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.clone()
    }
}

/// Starts an edge terminal inside the current actix system.
pub async fn start(config: EdgeConfig) -> anyhow::Result<EdgeHandle> {
    let registry = Registry::new();
    let metrics = telemetry::PaymentMetrics::register(&registry, "edge");

    let source = DirectorySource::new(
        &config.frames_dir,
        Duration::from_millis(config.frame_poll_interval_ms),
    )
    .with_context(|| format!("opening frames_dir {}", config.frames_dir.display()))?;
    let source = std::sync::Mutex::new(Some(source));
    let scanner = SyncArbiter::start(1, move || {
        let source = source
            .lock()
            .expect("not poisoned")
            .take()
            .expect("one scanner thread");
        ScannerActor::new(Box::new(source))
    });

    let camera_dir = config.camera_path();
    let camera_source = DirectorySource::new(
        &camera_dir,
        Duration::from_millis(config.frame_poll_interval_ms),
    )
    .with_context(|| format!("opening camera_dir {}", camera_dir.display()))?;
    let face_config = config.face.clone();
    let engine = tokio::task::spawn_blocking(move || face::FaceEngine::load_default(face_config))
        .await
        .expect("loading does not panic")
        .context("loading the face models")?;
    let engine = std::sync::Arc::new(engine);
    let camera_source = std::sync::Mutex::new(Some(camera_source));
    let camera = SyncArbiter::start(1, move || {
        let source = camera_source
            .lock()
            .expect("not poisoned")
            .take()
            .expect("one camera thread");
        CameraActor::new(Box::new(source), engine.clone())
    });

    let zenoh_config = config.zenoh.clone();
    let zenoh = tokio::task::spawn_blocking(move || zlink::ZenohLink::open(&zenoh_config))
        .await
        .expect("zenoh open does not panic")?;
    let hub = HubClient::new(
        zenoh,
        &config.store_id,
        Duration::from_millis(config.hub_timeout_ms),
    );
    let settings = CheckoutSettings {
        store_id: config.store_id.clone(),
        terminal_id: config.terminal_id.clone(),
        scan_timeout: Duration::from_millis(config.scan_timeout_ms),
        face_timeout: Duration::from_millis(config.face_timeout_ms),
    };
    let checkout = CheckoutActor::new(settings, scanner, camera, hub, metrics).start();

    let api_checkout = checkout.clone();
    let (http_addr, handle) = telemetry::serve_http(&config.http_listen, registry, move |cfg| {
        api::configure(cfg, api_checkout.clone())
    })
    .with_context(|| format!("binding http_listen {}", config.http_listen))?;
    tracing::info!(store_id = config.store_id, terminal_id = config.terminal_id, %http_addr, "edge started");
    Ok(EdgeHandle {
        http_addr,
        checkout,
        server: handle,
    })
}
