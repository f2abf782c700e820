//! TLS for the cloud's HTTPS API: the configured certificate, or a development certificate
//! generated on first run.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Context as _};
use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The `[tls]` configuration: both files, or neither for a development certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// Both or neither.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(("tls.key_file".into(), "set it with tls.cert_file".into())),
            (None, Some(_)) => Err(("tls.cert_file".into(), "set it with tls.key_file".into())),
            _ => Ok(()),
        }
    }
}

/// Where the development certificate of a cloud with this data directory lives.
pub fn dev_cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("dev-cert.pem")
}

/// Builds the server configuration. Without configured files, a self-signed development
/// certificate for `localhost` and `127.0.0.1` is generated under `data_dir/tls/` the first time
/// and reused after; its path is returned so it can be printed and trusted by clients.
pub fn server_config(files: &TlsFiles, data_dir: &Path) -> anyhow::Result<(ServerConfig, PathBuf)> {
    let (cert_path, key_path) = match (&files.cert_file, &files.key_file) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => {
            let cert = dev_cert_path(data_dir);
            let key = data_dir.join("tls").join("dev-key.pem");
            if !cert.exists() || !key.exists() {
                generate_dev_cert(&cert, &key)?;
                tracing::warn!(cert = %cert.display(), "generated a development TLS certificate; configure tls.cert_file and tls.key_file in production");
            }
            (cert, key)
        }
        _ => bail!("tls.cert_file and tls.key_file must be set together"),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading the private key {}", key_path.display()))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("certificate and key do not form a usable pair")?;
    Ok((config, cert_path))
}

fn generate_dev_cert(cert: &Path, key: &Path) -> anyhow::Result<()> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated =
        rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    let dir = cert.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write;
    options
        .open(key)
        .and_then(|mut f| f.write_all(generated.key_pair.serialize_pem().as_bytes()))
        .with_context(|| format!("writing {}", key.display()))?;
    std::fs::write(cert, generated.cert.pem())
        .with_context(|| format!("writing {}", cert.display()))?;
    Ok(())
}

/// The enrollment API's operator token: read from `path`, or generated there (64 hex characters,
/// owner-only) on first run. Returns its SHA-256, which is all the server keeps.
pub fn operator_token_digest(path: &Path) -> anyhow::Result<[u8; 32]> {
    use sha2::Digest as _;
    let token = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore as _;
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            use std::io::Write as _;
            options
                .open(path)
                .and_then(|mut f| f.write_all(token.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            token
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if token.len() < 32 {
        bail!(
            "{} holds a token of {} characters; use at least 32",
            path.display(),
            token.len()
        );
    }
    Ok(sha2::Sha256::digest(token.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificate_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, path) = server_config(&TlsFiles::default(), dir.path()).unwrap();
        assert_eq!(path, dev_cert_path(dir.path()));
        let first = std::fs::read(&path).unwrap();
        server_config(&TlsFiles::default(), dir.path()).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            first,
            "reused, not regenerated"
        );
        // Configured files are used as given; a missing one is a clear error.
        let files = TlsFiles {
            cert_file: Some(path.clone()),
            key_file: Some(dir.path().join("tls/dev-key.pem")),
        };
        server_config(&files, Path::new("/nonexistent")).unwrap();
        let missing = TlsFiles {
            cert_file: Some(dir.path().join("nope.pem")),
            ..files
        };
        let err = server_config(&missing, dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("nope.pem"), "{err:#}");
        assert!(TlsFiles {
            cert_file: Some("a".into()),
            key_file: None
        }
        .validate()
        .is_err());
    }
}
