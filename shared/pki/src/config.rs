//! The `[tls]` section every tier's configuration shares.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::TlsFiles;

/// Where a tier finds its certificate, key, CA and revocation list. By default all of them come
/// from one PKI directory laid out by `facepay-pki` (`<pki_dir>/ca.pem`, `<pki_dir>/<name>.pem`,
/// `<pki_dir>/<name>.key`, `<pki_dir>/crl.pem`, where `<name>` follows from the tier's identity);
/// each file can be named on its own instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The PKI directory.
    pub pki_dir: PathBuf,
    /// The CA certificate; unset: `<pki_dir>/ca.pem`.
    pub ca_file: Option<PathBuf>,
    /// This tier's certificate; unset: `<pki_dir>/<name>.pem`.
    pub cert_file: Option<PathBuf>,
    /// This tier's private key (owner-only); unset: `<pki_dir>/<name>.key`.
    pub key_file: Option<PathBuf>,
    /// The revocation list; unset: `<pki_dir>/crl.pem`.
    pub crl_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            pki_dir: "pki".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            crl_file: None,
        }
    }
}

impl TlsConfig {
    /// The files in effect for the identity whose file stem is `name`.
    pub fn files(&self, name: &str) -> TlsFiles {
        let or = |set: &Option<PathBuf>, default: String| {
            set.clone().unwrap_or_else(|| self.pki_dir.join(default))
        };
        TlsFiles {
            ca: or(&self.ca_file, "ca.pem".into()),
            cert: or(&self.cert_file, format!("{name}.pem")),
            key: or(&self.key_file, format!("{name}.key")),
            crl: or(&self.crl_file, "crl.pem".into()),
        }
    }

    /// Checks that no path is empty; the error names the key under `prefix` (e.g. `tls`).
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        if self.pki_dir.as_os_str().is_empty() {
            return Err((format!("{prefix}.pki_dir"), "must not be empty".into()));
        }
        for (key, value) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("crl_file", &self.crl_file),
        ] {
            if value.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err((format!("{prefix}.{key}"), "must not be empty".into()));
            }
        }
        Ok(())
    }
}
