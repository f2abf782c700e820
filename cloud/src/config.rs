//! The cloud's configuration; `configs/cloud.toml` documents every key.

use std::path::PathBuf;

use face::FaceConfig;
use mqtt::MqttConfig;
use serde::{Deserialize, Serialize};
use settings::{check_range, check_socket_addr, Validate};

use crate::{enroll::IdentityConfig, ledger::OfflinePolicy};

/// Environment variable prefix: `FACEPAY_CLOUD_MQTT__PORT=1884`.
pub const ENV_PREFIX: &str = "FACEPAY_CLOUD_";

/// The whole cloud configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Directory of the ledger database.
    pub data_dir: PathBuf,
    /// The admin API (accounts, deposits, hub keys, ledger listings): HTTPS on this address, for
    /// operators' client certificates only (role `operator` moves money, `viewer` reads).
    pub admin_listen: String,
    /// The enrollment API, HTTPS on this address (operator bearer token).
    pub api_listen: String,
    /// `/metrics` and `/healthz`, on a listener of their own.
    pub metrics: telemetry::MetricsConfig,
    /// How often the revocation list file is read; a newer one applies to the admin API at once
    /// and is published to every hub.
    pub crl_poll_interval_ms: u64,
    /// How long an online payment stays pending without its hub's confirmation (post) before the
    /// cloud moves it back itself: the hub died or lost its disk with the attempt.
    pub pending_transfer_ttl_seconds: u64,
    /// How often every account is added up per currency to check that the books balance
    /// (`facepay_cloud_ledger_imbalance_minor_units`): a read of every account, so minutes apart
    /// for millions of them. The first check runs at start.
    pub books_check_seconds: u64,
    /// The cloud's certificate (`cloud`), the CA and the revocation list: MQTT client identity
    /// (its client id is the certificate's common name) and the HTTPS APIs' server certificate.
    pub tls: pki::TlsConfig,
    /// 32-byte key file sealing customers' personal data and templates at rest; unset:
    /// `<data_dir>-keys/templates.key` (never inside `data_dir`: refused at start). Created on first
    /// run only while no customer is enrolled.
    pub template_key_file: Option<PathBuf>,
    /// File holding the enrollment API's operator bearer token; unset: `<data_dir>-keys/api-token`,
    /// generated on first run (readable by its owner only).
    pub api_token_file: Option<PathBuf>,
    /// Face threads for enrollment photos.
    pub face_threads: usize,
    /// The identity index and its thresholds.
    pub identity: IdentityConfig,
    /// How long after issue a payment code is accepted: the cloud checks the code of every new
    /// online payment by code itself, with the hubs' rules (set them alike), and a further
    /// [`crate::payer::TRANSIT_MS`] for the time a payment takes to reach it.
    pub code_validity_seconds: u64,
    /// Tolerated difference between a phone's clock and the cloud's.
    pub clock_skew_seconds: u64,
    /// The face pipeline's gates for enrollment photos.
    pub face: FaceConfig,
    /// What hubs may approve while they cannot reach the cloud.
    pub offline: OfflinePolicy,
    /// The broker the hubs and the cloud meet at.
    pub mqtt: MqttConfig,
    /// Where the ledger and the customers are kept.
    pub database: DatabaseConfig,
    /// Several cloud instances on one database.
    pub fleet: FleetConfig,
}

/// Several cloud instances sharing one PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// This instance's id, unique in the fleet: its certificate is `cloud-<instance>` (common
    /// name `cloud:<instance>`, its own broker session). Unset: the certificate `cloud`.
    pub instance: Option<String>,
    /// How long a store's lease lasts without renewal: a dead instance's stores are taken by
    /// the others within about this (postgres only).
    pub lease_seconds: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            instance: None,
            lease_seconds: 10,
        }
    }
}

/// Which engine keeps the ledger and the customers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseBackend {
    /// Embedded, in `data_dir`: one cloud instance (the demo, a single store).
    Sled,
    /// A PostgreSQL database that several cloud instances share (a fleet).
    Postgres,
}

/// Where the ledger and the customers are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// The engine.
    pub backend: DatabaseBackend,
    /// The PostgreSQL connection string (`postgres` only).
    pub url: Option<String>,
    /// The PostgreSQL schema holding the cloud's tables (`postgres` only).
    pub schema: String,
    /// Reach PostgreSQL over TLS, presenting this instance's certificate and trusting only a
    /// `database` certificate of the fleet's CA (`postgres` only).
    pub tls: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            backend: DatabaseBackend::Sled,
            url: None,
            schema: "facepay".into(),
            tls: true,
        }
    }
}

impl CloudConfig {
    /// This instance's identity: `cloud`, or `cloud-<instance>` in a fleet.
    pub fn identity(&self) -> pki::Identity {
        match &self.fleet.instance {
            Some(instance) => pki::Identity::cloud_instance(instance)
                .expect("validated: an instance id is a valid id"),
            None => pki::Identity::cloud(),
        }
    }

    /// Where the ledger is kept.
    pub fn ledger_location(&self) -> storage::kv::Location {
        self.location("ledger")
    }

    /// Where the customers are kept (the ledger's database in PostgreSQL).
    pub fn customers_location(&self) -> storage::kv::Location {
        self.location("customers")
    }

    fn location(&self, sled_dir: &str) -> storage::kv::Location {
        match self.database.backend {
            DatabaseBackend::Sled => storage::kv::Location::Sled(self.data_dir.join(sled_dir)),
            DatabaseBackend::Postgres => storage::kv::Location::Postgres {
                url: self.database.url.clone().unwrap_or_default(),
                schema: self.database.schema.clone(),
                // Set from the instance's TLS identity at start (`database.tls`).
                tls: None,
            },
        }
    }
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            data_dir: "data/cloud".into(),
            admin_listen: "127.0.0.1:9300".into(),
            api_listen: "127.0.0.1:9443".into(),
            metrics: telemetry::MetricsConfig::on("127.0.0.1:9301"),
            crl_poll_interval_ms: 10_000,
            pending_transfer_ttl_seconds: 86_400,
            books_check_seconds: 300,
            tls: pki::TlsConfig::default(),
            template_key_file: None,
            api_token_file: None,
            face_threads: 1,
            identity: IdentityConfig::default(),
            code_validity_seconds: 60,
            clock_skew_seconds: 5,
            face: FaceConfig::default(),
            offline: OfflinePolicy::default(),
            mqtt: MqttConfig::default(),
            database: DatabaseConfig::default(),
            fleet: FleetConfig::default(),
        }
    }
}

impl CloudConfig {
    /// The template key file in effect.
    pub fn template_key_path(&self) -> PathBuf {
        self.template_key_file
            .clone()
            .unwrap_or_else(|| storage::default_keys_dir(&self.data_dir).join("templates.key"))
    }

    /// The API token file in effect.
    pub fn api_token_path(&self) -> PathBuf {
        self.api_token_file
            .clone()
            .unwrap_or_else(|| storage::default_keys_dir(&self.data_dir).join("api-token"))
    }

    /// Each secret file in effect, with where an earlier version kept it by default (inside the
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
                "api_token_file",
                self.api_token_path(),
                legacy.join("api-token"),
            ),
        ]
    }
}

impl Validate for CloudConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(("data_dir".into(), "must not be empty".into()));
        }
        check_socket_addr("admin_listen", &self.admin_listen)?;
        check_socket_addr("api_listen", &self.api_listen)?;
        self.metrics.validate("metrics")?;
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
        check_range(
            "crl_poll_interval_ms",
            self.crl_poll_interval_ms,
            100..=3_600_000,
            "ms",
        )?;
        check_range(
            "pending_transfer_ttl_seconds",
            self.pending_transfer_ttl_seconds,
            10..=30 * 86_400,
            "seconds",
        )?;
        check_range(
            "books_check_seconds",
            self.books_check_seconds,
            1..=86_400,
            "seconds",
        )?;
        self.tls.validate("tls")?;
        if self
            .template_key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("template_key_file".into(), "must not be empty".into()));
        }
        check_range("face_threads", self.face_threads as u64, 1..=64, "threads")?;
        self.identity.validate()?;
        self.face.validate("face")?;
        self.offline.validate()?;
        if self.database.backend == DatabaseBackend::Postgres {
            match &self.database.url {
                None => return Err(("database.url".into(), "is required for postgres".into())),
                Some(url)
                    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) =>
                {
                    return Err((
                        "database.url".into(),
                        "must be a postgresql:// connection string".into(),
                    ))
                }
                Some(_) => {}
            }
            if !storage::valid_schema(&self.database.schema) {
                return Err((
                    "database.schema".into(),
                    "must be a lowercase identifier (a-z, 0-9, _; at most 63 characters)".into(),
                ));
            }
        }
        if self.database.backend == DatabaseBackend::Postgres && self.fleet.instance.is_none() {
            return Err((
                "fleet.instance".into(),
                "is required with database.backend = \"postgres\" (each instance its own id)"
                    .into(),
            ));
        }
        if let Some(instance) = &self.fleet.instance {
            if pki::Identity::cloud_instance(instance).is_err() {
                return Err((
                    "fleet.instance".into(),
                    "must be 1-64 letters, digits, '_', '-' or '.'".into(),
                ));
            }
            if self.database.backend != DatabaseBackend::Postgres {
                return Err((
                    "fleet.instance".into(),
                    "several instances share a postgres database: set database.backend".into(),
                ));
            }
        }
        check_range(
            "fleet.lease_seconds",
            self.fleet.lease_seconds,
            2..=300,
            "seconds",
        )?;
        self.mqtt.validate("mqtt")
    }
}
