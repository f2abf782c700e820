//! The hub's configuration; `configs/hub.toml` documents every key.

use std::path::PathBuf;

use mqtt::MqttConfig;
use serde::{Deserialize, Serialize};
use settings::{check_range, check_socket_addr, Validate};
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
    /// `/metrics` over plain HTTP on this address.
    pub http_listen: String,
    /// How long to wait for the cloud's answer before declining and voiding the attempt.
    pub cloud_timeout_ms: u64,
    /// How long after issue a payment code is accepted.
    pub code_validity_seconds: u64,
    /// Tolerated difference between the phone's clock and the hub's.
    pub clock_skew_seconds: u64,
    /// Edges reach the hub here.
    pub zenoh: ZenohConfig,
    /// The broker where the cloud listens.
    pub mqtt: MqttConfig,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            store_id: "store-1".into(),
            data_dir: "data/hub".into(),
            http_listen: "127.0.0.1:9200".into(),
            cloud_timeout_ms: 3_000,
            code_validity_seconds: 60,
            clock_skew_seconds: 5,
            zenoh: ZenohConfig {
                listen: vec!["tcp/127.0.0.1:7447".into()],
                ..ZenohConfig::default()
            },
            mqtt: MqttConfig::default(),
        }
    }
}

impl HubConfig {
    /// The hub's MQTT client id: stable per store, because its broker session is persistent.
    pub fn mqtt_client_id(&self) -> String {
        format!("facepay-hub-{}", self.store_id)
    }
}

impl Validate for HubConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        protocol::validate_id("store_id", &self.store_id)
            .map_err(|e| ("store_id".into(), e.to_string()))?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(("data_dir".into(), "must not be empty".into()));
        }
        check_socket_addr("http_listen", &self.http_listen)?;
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
