//! A configuration as an operator writes it: a TOML file and `key=value` overrides, loaded into
//! the shared sections every tier has (its MQTT link, its TLS files). Loading never panics; what
//! it refuses it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    store_id: String,
    mqtt: mqtt::MqttConfig,
    tls: pki::TlsConfig,
}

impl settings::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        self.mqtt.validate("mqtt")?;
        self.tls.validate("tls")
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line is an override, the rest the file.
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let dir = std::env::temp_dir().join(format!("facepay-fuzz-config-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("config.toml");
    if std::fs::write(&file, rest).is_err() {
        return;
    }
    // A first line that is no override is left out, so the file is still read.
    let overrides = match first.contains('=') {
        true => vec![first.to_owned()],
        false => Vec::new(),
    };
    let sources = settings::Sources {
        file: Some(file),
        overrides,
    };
    if let Err(error) = settings::load::<Config>("FACEPAY_FUZZ_", &sources) {
        assert!(!error.to_string().is_empty());
    }
});
