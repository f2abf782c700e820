//! The cloud's configuration; `configs/cloud.toml` documents every key.

use std::path::PathBuf;

use mqtt::MqttConfig;
use serde::{Deserialize, Serialize};
use settings::{check_socket_addr, Validate};

/// Environment variable prefix: `FACEPAY_CLOUD_MQTT__PORT=1884`.
pub const ENV_PREFIX: &str = "FACEPAY_CLOUD_";

/// The whole cloud configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Directory of the ledger database.
    pub data_dir: PathBuf,
    /// MQTT client id of the cloud; stable, because its broker session is persistent.
    pub client_id: String,
    /// Admin API and `/metrics`, plain HTTP on this address.
    pub http_listen: String,
    /// The broker the hubs and the cloud meet at.
    pub mqtt: MqttConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            data_dir: "data/cloud".into(),
            client_id: "facepay-cloud".into(),
            http_listen: "127.0.0.1:9300".into(),
            mqtt: MqttConfig::default(),
        }
    }
}

impl Validate for CloudConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(("data_dir".into(), "must not be empty".into()));
        }
        protocol::validate_id("client_id", &self.client_id)
            .map_err(|e| ("client_id".into(), e.to_string()))?;
        check_socket_addr("http_listen", &self.http_listen)?;
        self.mqtt.validate("mqtt")
    }
}
