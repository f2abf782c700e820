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
    /// Where the cash-register API listens.
    pub register_addr: SocketAddr,
    /// Whether the register API is HTTPS (a token file is configured).
    pub register_https: bool,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    /// When the terminal's certificate expires (RFC 3339).
    pub cert_expires: String,
    /// The checkout actor.
    pub checkout: Addr<CheckoutActor>,
    server: actix_web::dev::ServerHandle,
    metrics_server: actix_web::dev::ServerHandle,
    readiness: telemetry::Readiness,
}

impl EdgeHandle {
    /// Stops gracefully: not ready any more; the register API takes no new request and answers
    /// those in flight (a charge being decided gets its answer); then the metrics listener. The
    /// hub's session closes with the process.
    pub async fn stop(self) {
        self.readiness.stopping();
        self.server.stop(true).await;
        self.metrics_server.stop(true).await;
        tracing::info!("edge stopped");
    }

    /// The HTTP servers' handles, to stop them from elsewhere.
    pub fn server_handles(&self) -> Vec<actix_web::dev::ServerHandle> {
        vec![self.server.clone(), self.metrics_server.clone()]
    }
}

/// Starts an edge terminal inside the current actix system.
pub async fn start(config: EdgeConfig) -> anyhow::Result<EdgeHandle> {
    pki::install_crypto_provider();
    let identity = config.identity()?;
    let tls_files = config.tls.files(&identity.name);
    let tls = pki::TlsIdentity::load(&tls_files)
        .with_context(|| format!("loading the terminal's TLS identity {}", identity.name))?;
    if !identity.owns_common_name(&tls.identity.common_name)
        || tls.identity.role != Some(pki::Role::Edge)
    {
        anyhow::bail!(
            "{} is the certificate of {:?}, not of terminal {} of {}",
            tls_files.cert.display(),
            tls.identity.common_name,
            config.terminal_id,
            config.store_id
        );
    }
    tracing::info!(expires = tls.expires(), "terminal certificate loaded");
    let register_token = match &config.register_token_file {
        Some(path) => Some(pki::token_digest(path)?),
        None => None,
    };
    let registry = Registry::new();
    telemetry::register_process_metrics(&registry, "edge");
    pki::register_expiry_gauge(&registry, "edge", &tls);
    let metrics = checkout::CheckoutMetrics::register(&registry);

    let in_memory = !config.frames_on_persistent_disk;
    crate::frames::check_spool("frames_dir", &config.frames_dir, in_memory)?;
    crate::frames::check_spool("camera_dir", &config.camera_path(), in_memory)?;
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
    // The terminal hears only its own store's hub (whose certificate's common name is the store
    // id), and only on this terminal's own key expressions: a queryable declared by any other
    // peer is dropped.
    let security = zlink::ZenohSecurity {
        files: tls_files.clone(),
        grants: vec![zlink::ZenohGrant {
            common_names: vec![config.store_id.clone()],
            key_exprs: protocol::keyexpr::terminal_keys(&config.store_id, &config.terminal_id),
            role: zlink::GrantRole::Ask,
        }],
    };
    let zenoh =
        tokio::task::spawn_blocking(move || zlink::ZenohLink::open(&zenoh_config, &security))
            .await
            .expect("zenoh open does not panic")?;
    // Ready while the store's hub answers (the face models are loaded before anything is
    // served): heard on each revocation poll, the first at once.
    let hub_reachable = telemetry::register_gauge(
        &registry,
        "facepay_edge_hub_reachable",
        "1 while the last revocation poll heard the store's hub (its list verified)",
    );
    let readiness = telemetry::Readiness::new();
    readiness.require_gauge("hub", &hub_reachable);
    let hub = HubClient::new(
        zenoh,
        &config.store_id,
        &config.terminal_id,
        Duration::from_millis(config.hub_timeout_ms),
        tls.hub_verifier(&config.store_id)?,
        Duration::from_millis(config.revocation_poll_interval_ms),
        (
            telemetry::register_gauge(
                &registry,
                "facepay_edge_revoked_certificates",
                "certificates the revocation list in force at this terminal revokes",
            ),
            hub_reachable.clone(),
        ),
    );
    let settings = CheckoutSettings {
        store_id: config.store_id.clone(),
        terminal_id: config.terminal_id.clone(),
        scan_timeout: Duration::from_millis(config.scan_timeout_ms),
        face_timeout: Duration::from_millis(config.face_timeout_ms),
    };
    // The terminal attests each payment it takes with its certificate key (the cloud takes the
    // customer's evidence from there, not from the hub).
    let signer = tls.reply_signer()?;
    let checkout = CheckoutActor::new(settings, scanner, camera, hub, metrics, signer).start();

    let api_checkout = checkout.clone();
    let (register_tls, gate) = match register_token {
        Some(digest) => (
            Some(tls.server_config(pki::ClientAuth::None)?),
            Some(api::bearer_gate(digest)),
        ),
        None => (None, None),
    };
    let register_https = register_tls.is_some();
    let (register_addr, handle) = telemetry::serve_api(
        &config.register_listen,
        register_tls,
        gate,
        // A charge waits for the customer, then for the hub: it is answered before the
        // terminal stops.
        std::time::Duration::from_millis(
            config.scan_timeout_ms.max(config.face_timeout_ms) + config.hub_timeout_ms + 1_000,
        ),
        move |cfg| api::configure(cfg, api_checkout.clone()),
    )
    .with_context(|| format!("binding register_listen {}", config.register_listen))?;
    let metrics_tls = match config.metrics.tls {
        true => Some(tls.server_config(pki::ClientAuth::None)?),
        false => None,
    };
    let (metrics_addr, metrics_server) =
        telemetry::serve_metrics(&config.metrics, registry, metrics_tls, readiness.clone())?;
    tracing::info!(store_id = config.store_id, terminal_id = config.terminal_id, %register_addr, %metrics_addr, "edge started");
    Ok(EdgeHandle {
        register_addr,
        register_https,
        metrics_addr,
        cert_expires: tls.expires(),
        checkout,
        server: handle,
        metrics_server,
        readiness,
    })
}
