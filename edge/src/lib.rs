//! The facepay edge: the checkout terminal.
//!
//! A scanner actor waits for payment codes from a [`codes::CodeSource`] (QR codes decoded from a
//! [`frames::FrameSource`], or lines from a serial or HID scanner); a camera actor reads frames
//! from another frame source (a spool directory, a V4L2 or MJPEG-over-HTTP camera) and runs the
//! face pipeline; a checkout actor runs
//! one sensor session at a time for the cash register's local HTTP API (charge, verify, second
//! factor) and asks the store hub over Zenoh. See `README.md` in this folder for the actors.

mod api;
pub mod camera;
pub mod checkout;
pub mod codes;
pub mod config;
pub mod error;
pub mod frames;
pub mod health;
pub mod hub_client;
pub mod keyboard;
pub mod mjpeg;
pub mod refund;
pub mod scanner;
pub mod serial;
pub mod v4l2;

use std::{net::SocketAddr, time::Duration};

use actix::prelude::*;
use anyhow::Context as _;
use prometheus::Registry;

pub use api::{status_of, status_of_refund, status_of_verify};
pub use config::EdgeConfig;

use crate::{
    camera::CameraActor,
    checkout::{CheckoutActor, CheckoutSettings},
    codes::{ByteDevice, CodeSource, LineCodes, QrCodes},
    config::{CameraConfig, CameraSource, ScannerSource},
    frames::{DirectorySource, FrameSource},
    health::SourceMetrics,
    hub_client::HubClient,
    scanner::ScannerActor,
};

/// A frame source as configured: `spool_dir` for a spool, else the camera `camera` names.
fn frame_source(
    camera: &CameraConfig,
    spool_key: &str,
    spool_dir: &std::path::Path,
    poll_interval: Duration,
) -> anyhow::Result<Box<dyn FrameSource>> {
    let stall_timeout = Duration::from_millis(camera.stall_timeout_ms);
    Ok(match camera.source {
        CameraSource::Spool => Box::new(
            DirectorySource::new(spool_dir, poll_interval)
                .with_context(|| format!("opening {spool_key} {}", spool_dir.display()))?,
        ),
        CameraSource::V4l2 => Box::new(v4l2::V4l2Source::new(v4l2::V4l2Settings {
            device: camera.device_path(),
            format: camera.format,
            width: camera.width,
            height: camera.height,
            fps: camera.fps,
            stall_timeout,
        })),
        CameraSource::MjpegHttp => Box::new(mjpeg::MjpegHttpSource::new(mjpeg::MjpegSettings {
            url: mjpeg::HttpUrl::parse(camera.url.as_deref().unwrap_or_default())
                .map_err(|e| anyhow::anyhow!("url: {e}"))?,
            stall_timeout,
            reconnect: Duration::from_millis(camera.reconnect_ms),
        })),
    })
}

/// The scanner's code source as configured.
fn code_source(config: &EdgeConfig) -> anyhow::Result<Box<dyn CodeSource>> {
    let poll_interval = Duration::from_millis(config.frame_poll_interval_ms);
    let scanner = &config.scanner;
    if let Some(camera) = scanner.as_camera() {
        let frames = frame_source(&camera, "frames_dir", &config.frames_dir, poll_interval)?;
        return Ok(Box::new(match camera.source {
            CameraSource::Spool => QrCodes::new(frames),
            CameraSource::V4l2 | CameraSource::MjpegHttp => QrCodes::new(frames).facepay_only(),
        }));
    }
    let device = scanner
        .device
        .clone()
        .context("scanner.device is validated")?;
    let what = format!("scanner {}", device.display());
    let baud = scanner.baud;
    let open: codes::OpenDevice = match scanner.source {
        ScannerSource::Serial => Box::new(move || {
            Ok(Box::new(serial::SerialScanner::open(&device, baud)?) as Box<dyn ByteDevice>)
        }),
        _ => Box::new(move || {
            Ok(Box::new(keyboard::EvdevScanner::open(&device)?) as Box<dyn ByteDevice>)
        }),
    };
    Ok(Box::new(LineCodes::new(&what, open)))
}

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

    // The spools in use are checked (the terminal's alone, in memory) before anything starts.
    let in_memory = !config.frames_on_persistent_disk;
    if config.scanner.source == ScannerSource::Spool {
        crate::frames::check_spool("frames_dir", &config.frames_dir, in_memory)?;
    }
    if config.camera.source == CameraSource::Spool {
        crate::frames::check_spool("camera_dir", &config.camera_path(), in_memory)?;
    }
    let source_metrics = SourceMetrics::register(&registry);
    let source = code_source(&config).context("the scanner's source ([scanner])")?;
    let source = std::sync::Mutex::new(Some((source, source_metrics.health("scanner"))));
    let scanner = SyncArbiter::start(1, move || {
        let (source, health) = source
            .lock()
            .expect("not poisoned")
            .take()
            .expect("one scanner thread");
        ScannerActor::new(source, health)
    });

    let camera_source = frame_source(
        &config.camera,
        "camera_dir",
        &config.camera_path(),
        Duration::from_millis(config.frame_poll_interval_ms),
    )
    .context("the camera's source ([camera])")?;
    let face_config = config.face.clone();
    let engine = tokio::task::spawn_blocking(move || face::FaceEngine::load_default(face_config))
        .await
        .expect("loading does not panic")
        .context("loading the face models")?;
    let engine = std::sync::Arc::new(engine);
    let camera_source =
        std::sync::Mutex::new(Some((camera_source, source_metrics.health("camera"))));
    let camera = SyncArbiter::start(1, move || {
        let (source, health) = camera_source
            .lock()
            .expect("not poisoned")
            .take()
            .expect("one camera thread");
        CameraActor::new(source, engine.clone(), health)
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
    let refunds = refund::RefundDesk::new(
        (config.store_id.clone(), config.terminal_id.clone()),
        hub.clone(),
        signer.clone(),
        refund::RefundMetrics::register(&registry),
    );
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
        move |cfg| api::configure(cfg, api_checkout.clone(), refunds.clone()),
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
