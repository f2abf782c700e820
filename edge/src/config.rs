//! The edge terminal's configuration; `configs/edge.toml` documents every key.

use std::path::PathBuf;

use face::FaceConfig;
use serde::{Deserialize, Serialize};
use settings::{check_range, check_socket_addr, Validate};
use zlink::ZenohConfig;

/// Environment variable prefix: `FACEPAY_EDGE_TERMINAL_ID=till-2`.
pub const ENV_PREFIX: &str = "FACEPAY_EDGE_";

/// The whole edge configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// The store this terminal belongs to.
    pub store_id: String,
    /// This terminal's id, unique in its store.
    pub terminal_id: String,
    /// The cash register's API. On loopback (the default) it is plain HTTP for the register on
    /// the same machine; anywhere else it needs `register_token_file`.
    pub register_listen: String,
    /// File holding the register's bearer token (at least 32 characters; generated owner-only
    /// on first run when missing). Set: the register API is HTTPS with the terminal's certificate
    /// and every request needs `Authorization: Bearer <token>`.
    pub register_token_file: Option<PathBuf>,
    /// `/metrics` and `/healthz`, on a listener of their own.
    pub metrics: telemetry::MetricsConfig,
    /// The terminal's certificate (`edge-<store_id>-<terminal_id>`), the CA and the revocation
    /// list.
    pub tls: pki::TlsConfig,
    /// How often the terminal fetches the revocation list its hub relays.
    pub revocation_poll_interval_ms: u64,
    /// How long a checkout waits for the customer to present a code.
    pub scan_timeout_ms: u64,
    /// How long to wait for the hub's decision; longer than the hub's own cloud deadline.
    pub hub_timeout_ms: u64,
    /// The frame source: a spool directory of images, each read once and then removed.
    pub frames_dir: PathBuf,
    /// How often the frame directory is polled for new images.
    pub frame_poll_interval_ms: u64,
    /// The camera's frame source, a spool directory like `frames_dir`; unset: `<frames_dir>/camera`.
    pub camera_dir: Option<PathBuf>,
    /// Lets the spool directories sit on a persistent file system (a machine without tmpfs).
    /// Off by default: the terminal refuses to start unless both are on tmpfs or ramfs, so raw
    /// face frames and codes never reach a disk.
    pub frames_on_persistent_disk: bool,
    /// How long the camera looks for a usable live face.
    pub face_timeout_ms: u64,
    /// The face pipeline's thresholds.
    pub face: FaceConfig,
    /// The hub's Zenoh endpoint(s).
    pub zenoh: ZenohConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            store_id: "store-1".into(),
            terminal_id: "till-1".into(),
            register_listen: "127.0.0.1:8080".into(),
            register_token_file: None,
            metrics: telemetry::MetricsConfig::on("127.0.0.1:9100"),
            tls: pki::TlsConfig::default(),
            revocation_poll_interval_ms: 30_000,
            scan_timeout_ms: 10_000,
            hub_timeout_ms: 5_000,
            frames_dir: "/dev/shm/facepay/edge/frames".into(),
            frame_poll_interval_ms: 20,
            camera_dir: None,
            frames_on_persistent_disk: false,
            face_timeout_ms: 5_000,
            face: FaceConfig::default(),
            zenoh: ZenohConfig {
                connect: vec!["tls/127.0.0.1:7447".into()],
                ..ZenohConfig::default()
            },
        }
    }
}

impl EdgeConfig {
    /// The terminal's certificate identity.
    pub fn identity(&self) -> Result<pki::Identity, pki::PkiError> {
        pki::Identity::edge(&self.store_id, &self.terminal_id)
    }

    /// The camera spool directory in effect.
    pub fn camera_path(&self) -> PathBuf {
        self.camera_dir
            .clone()
            .unwrap_or_else(|| self.frames_dir.join("camera"))
    }
}

impl Validate for EdgeConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        protocol::validate_id("store_id", &self.store_id)
            .map_err(|e| ("store_id".into(), e.to_string()))?;
        protocol::validate_id("terminal_id", &self.terminal_id)
            .map_err(|e| ("terminal_id".into(), e.to_string()))?;
        check_socket_addr("register_listen", &self.register_listen)?;
        let loopback = self
            .register_listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !loopback && self.register_token_file.is_none() {
            return Err((
                "register_token_file".into(),
                format!(
                    "the register API listens beyond loopback ({}): set a token file, which also turns on HTTPS",
                    self.register_listen
                ),
            ));
        }
        if self
            .register_token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("register_token_file".into(), "must not be empty".into()));
        }
        self.metrics.validate("metrics")?;
        self.tls.validate("tls")?;
        check_range(
            "revocation_poll_interval_ms",
            self.revocation_poll_interval_ms,
            100..=3_600_000,
            "ms",
        )?;
        check_range("scan_timeout_ms", self.scan_timeout_ms, 100..=120_000, "ms")?;
        check_range("hub_timeout_ms", self.hub_timeout_ms, 100..=120_000, "ms")?;
        check_range(
            "frame_poll_interval_ms",
            self.frame_poll_interval_ms,
            1..=10_000,
            "ms",
        )?;
        if self.frames_dir.as_os_str().is_empty() {
            return Err(("frames_dir".into(), "must not be empty".into()));
        }
        if self
            .camera_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("camera_dir".into(), "must not be empty".into()));
        }
        check_range("face_timeout_ms", self.face_timeout_ms, 100..=120_000, "ms")?;
        self.face.validate("face")?;
        self.zenoh.validate("zenoh")?;
        if self.zenoh.connect.is_empty() {
            return Err((
                "zenoh.connect".into(),
                "the edge needs its hub's endpoint".into(),
            ));
        }
        Ok(())
    }
}
