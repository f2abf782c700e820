//! The hub's configuration; `configs/hub.toml` documents every key.

use std::path::PathBuf;

use mqtt::MqttConfig;
use serde::{Deserialize, Serialize};
use settings::{check_range, Validate};
use zlink::ZenohConfig;

/// Environment variable prefix: `FACEPAY_HUB_STORE_ID=store-2`.
pub const ENV_PREFIX: &str = "FACEPAY_HUB_";

/// The whole hub configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// The store this hub serves; also its merchant account at the cloud.
    pub store_id: String,
    /// Directory of the hub's journal database.
    pub data_dir: PathBuf,
    /// `/metrics` and `/healthz`, on a listener of their own.
    pub metrics: telemetry::MetricsConfig,
    /// The hub's certificate (`hub-<store_id>`), the CA, the revocation list; the certificates of
    /// this store's terminals (`edge-<store_id>-*.pem`) in `tls.pki_dir` name the only peers
    /// that may query the hub over Zenoh.
    pub tls: pki::TlsConfig,
    /// How long to wait for the cloud's answer before declining and voiding the attempt.
    pub cloud_timeout_ms: u64,
    /// How long after issue a payment code is accepted.
    pub code_validity_seconds: u64,
    /// Tolerated difference between the phone's clock and the hub's.
    pub clock_skew_seconds: u64,
    /// 32-byte key file sealing the hot set's templates at rest; unset:
    /// `<data_dir>-keys/templates.key` (never inside `data_dir`: refused at start). Created on first
    /// run only while the hot set is empty.
    pub template_key_file: Option<PathBuf>,
    /// Most face templates held in the hot set.
    pub hot_set_cap: usize,
    /// How long the cloud may take to answer a face the hot set does not know.
    pub identify_timeout_ms: u64,
    /// Face identification rules.
    pub identify: IdentifyConfig,
    /// Authorization while the cloud is unreachable, and reconciliation afterwards.
    pub offline: OfflineConfig,
    /// What each terminal may ask of the hub.
    pub terminals: TerminalsConfig,
    /// Edges reach the hub here.
    pub zenoh: ZenohConfig,
    /// The broker where the cloud listens.
    pub mqtt: MqttConfig,
}

/// The `[identify]` section: when a face is enough, when to ask for the second factor, and what
/// wrong answers cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentifyConfig {
    /// Cosine below which a face is nobody enrolled.
    pub match_threshold: f32,
    /// Cosine below which a match is in the grey zone: the second factor is asked.
    pub accept_threshold: f32,
    /// When the runner-up (another account) also matches and is within this margin of the best,
    /// the faces are too alike to tell apart: the second factor is asked.
    pub margin: f32,
    /// Lifetime of a payment token.
    pub token_ttl_seconds: u64,
    /// Lifetime of a second-factor challenge.
    pub challenge_ttl_seconds: u64,
    /// Wrong second factors allowed before face payment locks.
    pub free_failures: u32,
    /// First lock; each further failure doubles it.
    pub lockout_base_seconds: u64,
    /// Longest lock.
    pub lockout_max_seconds: u64,
}

impl Default for IdentifyConfig {
    fn default() -> Self {
        IdentifyConfig {
            match_threshold: 0.363,
            accept_threshold: 0.45,
            margin: 0.08,
            token_ttl_seconds: 120,
            challenge_ttl_seconds: 60,
            free_failures: 3,
            lockout_base_seconds: 30,
            lockout_max_seconds: 3600,
        }
    }
}

impl IdentifyConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, v) in [
            ("identify.match_threshold", self.match_threshold),
            ("identify.accept_threshold", self.accept_threshold),
        ] {
            if !(-1.0..=1.0).contains(&v) {
                return Err((
                    key.into(),
                    format!("must be a cosine from -1 to 1, got {v}"),
                ));
            }
        }
        if self.accept_threshold < self.match_threshold {
            return Err((
                "identify.accept_threshold".into(),
                "must not be below identify.match_threshold".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.margin) {
            return Err(("identify.margin".into(), "must be from 0 to 1".into()));
        }
        check_range(
            "identify.token_ttl_seconds",
            self.token_ttl_seconds,
            5..=3600,
            "seconds",
        )?;
        check_range(
            "identify.challenge_ttl_seconds",
            self.challenge_ttl_seconds,
            5..=600,
            "seconds",
        )?;
        check_range(
            "identify.free_failures",
            self.free_failures as u64,
            0..=10,
            "failures",
        )?;
        check_range(
            "identify.lockout_base_seconds",
            self.lockout_base_seconds,
            1..=86_400,
            "seconds",
        )?;
        check_range(
            "identify.lockout_max_seconds",
            self.lockout_max_seconds,
            self.lockout_base_seconds..=30 * 86_400,
            "seconds",
        )
    }
}

/// The `[terminals]` section: each terminal's requests (verifications and charges together) are
/// rate limited by a token bucket of its own (its id is its certificate's). Beyond, the hub
/// answers `rate_limited` without looking at the request (for a charge: outcome unknown, charge
/// again in a moment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerminalsConfig {
    /// Requests one terminal may send at once.
    pub requests_burst: u32,
    /// Requests one terminal may send per second after its burst.
    pub requests_per_second: u32,
}

impl Default for TerminalsConfig {
    fn default() -> Self {
        // A checkout is a verification or two and a charge every few seconds at the busiest
        // till; retries after an unknown outcome come one at a time.
        TerminalsConfig {
            requests_burst: 30,
            requests_per_second: 5,
        }
    }
}

impl TerminalsConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        check_range(
            "terminals.requests_burst",
            u64::from(self.requests_burst),
            1..=100_000,
            "requests",
        )?;
        check_range(
            "terminals.requests_per_second",
            u64::from(self.requests_per_second),
            1..=100_000,
            "requests",
        )
    }
}

/// The `[offline]` section: what the hub may approve alone while the cloud is unreachable, and how
/// its journal drains afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OfflineConfig {
    /// Approve payments offline at all.
    pub enabled: bool,
    /// Largest single payment approved offline, minor units.
    pub payment_ceiling_minor: i64,
    /// Most this store may hold unreconciled over all accounts, minor units.
    pub store_ceiling_minor: i64,
    /// 32-byte secret key file the hub signs offline approvals with; unset:
    /// `<data_dir>-keys/hub-signing.key`, created on first run. Its public key is printed at
    /// start and must be registered at the cloud.
    pub signing_key_file: Option<PathBuf>,
    /// Journal entries per reconciliation batch (one batch in flight).
    pub drain_batch: usize,
    /// How often the hub tries to drain a backlog when no reconnect prompts it.
    pub drain_interval_ms: u64,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        OfflineConfig {
            enabled: true,
            payment_ceiling_minor: 2_500,
            store_ceiling_minor: 200_000,
            signing_key_file: None,
            drain_batch: 200,
            drain_interval_ms: 2_000,
        }
    }
}

impl OfflineConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, value) in [
            ("offline.payment_ceiling_minor", self.payment_ceiling_minor),
            ("offline.store_ceiling_minor", self.store_ceiling_minor),
        ] {
            if !(0..=protocol::MAX_AMOUNT_MINOR).contains(&value) {
                return Err((
                    key.into(),
                    format!("must be from 0 to {}", protocol::MAX_AMOUNT_MINOR),
                ));
            }
        }
        if self
            .signing_key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err((
                "offline.signing_key_file".into(),
                "must not be empty".into(),
            ));
        }
        check_range(
            "offline.drain_batch",
            self.drain_batch as u64,
            1..=1000,
            "entries",
        )?;
        check_range(
            "offline.drain_interval_ms",
            self.drain_interval_ms,
            50..=600_000,
            "ms",
        )
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            store_id: "store-1".into(),
            data_dir: "data/hub".into(),
            metrics: telemetry::MetricsConfig::on("127.0.0.1:9200"),
            tls: pki::TlsConfig::default(),
            cloud_timeout_ms: 3_000,
            code_validity_seconds: 60,
            clock_skew_seconds: 5,
            template_key_file: None,
            hot_set_cap: 50_000,
            identify_timeout_ms: 2_000,
            identify: IdentifyConfig::default(),
            offline: OfflineConfig::default(),
            terminals: TerminalsConfig::default(),
            zenoh: ZenohConfig {
                listen: vec!["tls/127.0.0.1:7447".into()],
                ..ZenohConfig::default()
            },
            mqtt: MqttConfig::default(),
        }
    }
}

impl HubConfig {
    /// The template key file in effect.
    pub fn template_key_path(&self) -> PathBuf {
        self.template_key_file
            .clone()
            .unwrap_or_else(|| storage::default_keys_dir(&self.data_dir).join("templates.key"))
    }

    /// The hub's signing key file in effect.
    pub fn signing_key_path(&self) -> PathBuf {
        self.offline
            .signing_key_file
            .clone()
            .unwrap_or_else(|| storage::default_keys_dir(&self.data_dir).join("hub-signing.key"))
    }

    /// Each key file in effect, with where an earlier version kept it by default (inside the
    /// data directory), and its configuration key.
    pub fn key_files(&self) -> [(&'static str, PathBuf, PathBuf); 2] {
        let legacy = self.data_dir.join("keys");
        [
            (
                "template_key_file",
                self.template_key_path(),
                legacy.join("templates.key"),
            ),
            (
                "offline.signing_key_file",
                self.signing_key_path(),
                legacy.join("hub-signing.key"),
            ),
        ]
    }

    /// The hub's certificate identity.
    pub fn identity(&self) -> Result<pki::Identity, pki::PkiError> {
        pki::Identity::hub(&self.store_id)
    }
}

impl Validate for HubConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        protocol::validate_id("store_id", &self.store_id)
            .map_err(|e| ("store_id".into(), e.to_string()))?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(("data_dir".into(), "must not be empty".into()));
        }
        if pki::RESERVED_STORE_IDS.contains(&self.store_id.as_str()) {
            return Err((
                "store_id".into(),
                "is reserved for another identity of the fleet".into(),
            ));
        }
        self.metrics.validate("metrics")?;
        self.tls.validate("tls")?;
        check_range("cloud_timeout_ms", self.cloud_timeout_ms, 50..=60_000, "ms")?;
        check_range(
            "code_validity_seconds",
            self.code_validity_seconds,
            5..=600,
            "seconds",
        )?;
        check_range(
            "clock_skew_seconds",
            self.clock_skew_seconds,
            0..=300,
            "seconds",
        )?;
        if self
            .template_key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("template_key_file".into(), "must not be empty".into()));
        }
        check_range(
            "hot_set_cap",
            self.hot_set_cap as u64,
            1..=10_000_000,
            "templates",
        )?;
        check_range(
            "identify_timeout_ms",
            self.identify_timeout_ms,
            50..=60_000,
            "ms",
        )?;
        self.identify.validate()?;
        self.offline.validate()?;
        self.terminals.validate()?;
        self.zenoh.validate("zenoh")?;
        if self.zenoh.listen.is_empty() {
            return Err((
                "zenoh.listen".into(),
                "the hub needs an endpoint for its edges".into(),
            ));
        }
        self.mqtt.validate("mqtt")
    }
}
