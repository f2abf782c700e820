//! The tiers' side: loading their identity, checking key files, building rustls configurations
//! that verify peers against the CA and the revocation list.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    client::WebPkiServerVerifier,
    server::{danger::ClientCertVerifier, WebPkiClientVerifier},
    ClientConfig, RootCertStore, ServerConfig,
};
use rustls_pki_types::{
    pem::PemObject, CertificateDer, CertificateRevocationListDer, PrivateKeyDer,
};

use crate::{PkiError, Role};

/// The files one tier's TLS identity is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) peers must chain to.
    pub ca: PathBuf,
    /// This tier's certificate chain, leaf first.
    pub cert: PathBuf,
    /// This tier's private key (owner-only).
    pub key: PathBuf,
    /// The revocation list.
    pub crl: PathBuf,
}

/// Whether a server asks its clients for certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate of the CA that is not revoked.
    Required,
    /// No client certificate is asked for.
    None,
}

/// A client-certificate verifier whose revocation list can be replaced while servers built on it
/// keep running (the cloud's admin API hears of a revocation without a restart).
#[derive(Debug)]
pub struct LiveClientVerifier {
    roots: Arc<RootCertStore>,
    hints: Vec<rustls::DistinguishedName>,
    inner: std::sync::RwLock<Arc<dyn ClientCertVerifier>>,
    /// Refuse every certificate once the list in force is past its next update.
    enforce_expiry: bool,
    /// The serials of the list in force: connections made before a revocation are checked
    /// against it request by request.
    revoked: std::sync::RwLock<HashSet<String>>,
}

impl LiveClientVerifier {
    fn build(
        roots: &Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        enforce_expiry: bool,
    ) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
        let builder = WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .with_crls(crls)
        .only_check_end_entity_revocation();
        let builder = if enforce_expiry {
            builder.enforce_revocation_expiration()
        } else {
            builder
        };
        builder.build().map_err(|e| PkiError::Tls(e.to_string()))
    }

    pub(crate) fn new(
        roots: Arc<RootCertStore>,
        crls: Vec<CertificateRevocationListDer<'static>>,
        revoked: HashSet<String>,
        enforce_expiry: bool,
    ) -> Result<Self, PkiError> {
        let inner = Self::build(&roots, crls, enforce_expiry)?;
        Ok(LiveClientVerifier {
            hints: roots.subjects(),
            roots,
            inner: std::sync::RwLock::new(inner),
            enforce_expiry,
            revoked: std::sync::RwLock::new(revoked),
        })
    }

    /// How many certificates the list in force revokes.
    pub fn revoked_count(&self) -> usize {
        self.revoked.read().expect("not poisoned").len()
    }

    /// Whether the list in force names this serial.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.read().expect("not poisoned").contains(serial)
    }

    /// Verifies from now on against `list`.
    pub fn update(&self, list: &RevocationList) -> Result<(), PkiError> {
        let crls = CertificateRevocationListDer::pem_slice_iter(&list.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Tls(format!("revocation list: {e}")))?;
        let fresh = Self::build(&self.roots, crls, self.enforce_expiry)?;
        *self.inner.write().expect("not poisoned") = fresh;
        *self.revoked.write().expect("not poisoned") = list.serials.clone();
        Ok(())
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().expect("not poisoned").clone()
    }
}

impl ClientCertVerifier for LiveClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The CA's server verification, and the server's certificate must have one role.
#[derive(Debug)]
struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: Role,
}

impl rustls::client::danger::ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match peer_identity(end_entity).and_then(|peer| peer.role) {
            Some(role) if role == self.role => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A tier's loaded TLS identity.
pub struct TlsIdentity {
    /// Where it came from.
    pub files: TlsFiles,
    /// Its certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    pub(crate) live: Arc<LiveClientVerifier>,
    /// Its certificate's subject.
    pub identity: PeerIdentity,
    /// When its certificate expires, Unix seconds.
    pub not_after_unix: i64,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("files", &self.files)
            .field("identity", &self.identity)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

/// Refuses a private key file that anyone but its owner can read or write.
pub fn check_key_permissions(path: &Path) -> Result<(), PkiError> {
    let meta = std::fs::metadata(path).map_err(PkiError::io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyReadableByOthers {
                path: path.to_owned(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    Ok(())
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = std::fs::read(path).map_err(PkiError::io(path))?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::bad(path, format!("not a PEM certificate file: {e}")))
}

pub(crate) fn serial_of(der: &CertificateDer<'_>, path: &Path) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::bad(path, format!("unreadable certificate: {e}")))?;
    Ok(trimmed_hex(cert.raw_serial()))
}

/// Serials compare as hex of their bytes without leading zero bytes.
fn trimmed_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject of a peer's certificate: who is on the other end of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject common name.
    pub common_name: String,
    /// Role, from the organizational unit; `None` for a certificate this PKI did not issue.
    pub role: Option<Role>,
    /// Serial, lowercase hex.
    pub serial: String,
}

/// Reads the subject of a (verified) peer certificate.
pub fn peer_identity(der: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let common_name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let role = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .and_then(Role::parse);
    Some(PeerIdentity {
        common_name,
        role,
        serial: trimmed_hex(cert.raw_serial()),
    })
}

/// The serials a revocation list names (it is checked against the CA in `ca`).
pub fn revoked_serials(crl: &Path, ca: &Path) -> Result<HashSet<String>, PkiError> {
    let bytes = std::fs::read(crl).map_err(PkiError::io(crl))?;
    Ok(RevocationList::parse(&bytes, crl, ca)?.serials)
}

/// A revocation list checked against the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationList {
    /// Its CRL number: a newer list has a larger one.
    pub number: Vec<u8>,
    /// The revoked serials, lowercase hex.
    pub serials: HashSet<String>,
    /// The verified list as PEM (re-encoded from what was checked).
    pub pem: Vec<u8>,
    /// When a newer list is due (Unix seconds): past it, the list is stale.
    pub next_update_unix: Option<i64>,
}

impl RevocationList {
    /// Parses a PEM revocation list and checks that the CA in `ca` signed it; `origin` names
    /// where it came from in errors.
    pub fn parse(pem: &[u8], origin: &Path, ca: &Path) -> Result<Self, PkiError> {
        let crl = origin;
        let der = CertificateRevocationListDer::from_pem_slice(pem)
            .map_err(|e| PkiError::bad(crl, format!("not a PEM revocation list: {e}")))?;
        let (_, list) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| PkiError::bad(crl, format!("unreadable revocation list: {e}")))?;
        // Only a list the CA signed counts: anyone can write a file of serials.
        let ca_der = read_certs(ca)?
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::bad(ca, "holds no certificate"))?;
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| PkiError::bad(ca, format!("unreadable certificate: {e}")))?;
        list.verify_signature(ca_cert.public_key())
            .map_err(|e| PkiError::bad(crl, format!("not signed by the CA: {e}")))?;
        let number = list
            .crl_number()
            .map(|n| n.to_bytes_be())
            .unwrap_or_default();
        // Kept as the verified list alone, re-encoded: whatever else the bytes held is dropped.
        let pem = {
            use base64::Engine as _;
            let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            let lines: Vec<&str> = body
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
                .collect();
            format!(
                "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
                lines.join("\n")
            )
            .into_bytes()
        };
        let next_update_unix = list.next_update().map(|t| t.timestamp());
        Ok(RevocationList {
            next_update_unix,
            number,
            serials: list
                .iter_revoked_certificates()
                .map(|r| trimmed_hex(r.raw_serial()))
                .collect(),
            pem,
        })
    }

    /// Whether this list is newer than one numbered `other`.
    pub fn newer_than(&self, other: &[u8]) -> bool {
        let trim = |n: &[u8]| {
            n.iter()
                .position(|b| *b != 0)
                .map_or(Vec::new(), |i| n[i..].to_vec())
        };
        let (a, b) = (trim(&self.number), trim(other));
        (a.len(), a) > (b.len(), b)
    }
}

/// The common names of `store_id`'s terminals whose certificates (`edge-<store>-*.pem`) sit in
/// `dir`, valid now and not revoked: the only peers a hub lets query it over Zenoh, whose TLS
/// checks the CA but not revocation lists.
pub fn terminal_common_names(
    dir: &Path,
    store_id: &str,
    revoked: &HashSet<String>,
) -> Result<Vec<String>, PkiError> {
    let prefix = format!("edge-{store_id}-");
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(PkiError::io(dir))?;
    let now = x509_parser::time::ASN1Time::now();
    for entry in entries {
        let path = entry.map_err(PkiError::io(dir))?.path();
        let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        if !(file.starts_with(&prefix) && file.ends_with(".pem")) {
            continue;
        }
        // An unreadable or half-copied file allows nobody.
        let Some(der) = read_certs(&path).ok().and_then(|c| c.into_iter().next()) else {
            tracing::warn!(file = %path.display(), "unreadable terminal certificate ignored");
            continue;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        let Some(peer) = peer_identity(&der) else {
            continue;
        };
        let own_store = peer
            .common_name
            .strip_prefix("edge:")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(store, _)| store == store_id);
        if own_store
            && peer.role == Some(Role::Edge)
            && cert.validity().is_valid_at(now)
            && !revoked.contains(&peer.serial)
        {
            names.push(peer.common_name);
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

impl TlsIdentity {
    /// Loads and checks a tier's files: the key must be owner-only, the certificate must chain to
    /// the CA and be valid now, the revocation list must be the CA's and must not name it.
    pub fn load(files: &TlsFiles) -> Result<Self, PkiError> {
        check_key_permissions(&files.key)?;
        let chain = read_certs(&files.cert)?;
        let leaf = chain
            .first()
            .cloned()
            .ok_or_else(|| PkiError::bad(&files.cert, "holds no certificate"))?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| PkiError::bad(&files.key, format!("not a PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for der in read_certs(&files.ca)? {
            roots
                .add(der)
                .map_err(|e| PkiError::bad(&files.ca, format!("not a usable CA: {e}")))?;
        }
        if roots.is_empty() {
            return Err(PkiError::bad(&files.ca, "holds no certificate"));
        }
        let crl_bytes = std::fs::read(&files.crl).map_err(PkiError::io(&files.crl))?;
        let crls = CertificateRevocationListDer::pem_slice_iter(&crl_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::bad(&files.crl, format!("not a PEM revocation list: {e}")))?;
        let revoked = revoked_serials(&files.crl, &files.ca)?;
        let identity = peer_identity(&leaf)
            .ok_or_else(|| PkiError::bad(&files.cert, "certificate without a common name"))?;
        if revoked.contains(&identity.serial) {
            return Err(PkiError::bad(
                &files.cert,
                "this certificate is revoked (crl.pem names it)",
            ));
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
            .map_err(|e| PkiError::bad(&files.cert, format!("unreadable certificate: {e}")))?;
        if !cert.validity().is_valid() {
            return Err(PkiError::bad(
                &files.cert,
                format!(
                    "certificate is not valid now (valid {} to {})",
                    cert.validity().not_before,
                    cert.validity().not_after
                ),
            ));
        }
        let not_after_unix = cert.validity().not_after.timestamp();
        let roots = Arc::new(roots);
        let live = Arc::new(LiveClientVerifier::new(
            roots.clone(),
            crls.clone(),
            revoked.clone(),
            false,
        )?);
        let this = TlsIdentity {
            files: files.clone(),
            chain,
            key,
            roots,
            crls,
            live,
            identity,
            not_after_unix,
        };
        // The certificate must chain to the configured CA: a tier configured with another
        // fleet's files would otherwise fail only at its first handshake.
        let verifier = this.client_verifier()?;
        verifier
            .verify_client_cert(&leaf, &this.chain[1..], rustls_pki_types::UnixTime::now())
            .map_err(|e| {
                PkiError::bad(
                    &files.cert,
                    format!("not issued by {}: {e}", files.ca.display()),
                )
            })?;
        Ok(this)
    }

    /// Its certificate's expiry as RFC 3339 text.
    pub fn expires(&self) -> String {
        crate::rfc3339(self.not_after_unix)
    }

    pub(crate) fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub(crate) fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
        Ok(self.live.clone())
    }

    /// Servers built by [`TlsIdentity::server_config`] with client authentication verify
    /// against `list` from now on.
    pub fn update_revocations(&self, list: &RevocationList) -> Result<(), PkiError> {
        self.live.update(list)
    }

    /// The certificate checks this identity's servers and sealed-message checks share: a list
    /// given to it applies to all of them.
    pub fn live_verifier(&self) -> Arc<LiveClientVerifier> {
        self.live.clone()
    }

    /// Whether the revocation list in force names this serial (for connections that were made
    /// before it came).
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.live.is_revoked(serial)
    }

    /// A server configuration presenting this identity; with [`ClientAuth::Required`] a client
    /// without a valid, unrevoked certificate of the CA fails the handshake, before any request.
    pub fn server_config(&self, client_auth: ClientAuth) -> Result<ServerConfig, PkiError> {
        let builder = ServerConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        let builder = match client_auth {
            ClientAuth::Required => builder.with_client_cert_verifier(self.client_verifier()?),
            ClientAuth::None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        if client_auth == ClientAuth::Required {
            // A resumed session is not verified again: with revocation in force mid-run, every
            // connection must present its certificate afresh.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(config)
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, PkiError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), Self::provider())
            .with_crls(self.crls.clone())
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))
    }

    fn client_config_with(
        &self,
        verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    ) -> Result<ClientConfig, PkiError> {
        ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| PkiError::Tls(e.to_string()))
    }

    /// Like [`TlsIdentity::client_config`], and the server's certificate must also have the
    /// role `server_role` (the MQTT broker's, say): another identity of the fleet that got hold
    /// of the broker's address is not taken for it.
    pub fn client_config_for(&self, server_role: Role) -> Result<ClientConfig, PkiError> {
        self.client_config_with(Arc::new(RoleServerVerifier {
            inner: self.server_verifier()?,
            role: server_role,
        }))
    }

    /// A client configuration presenting this identity and trusting only servers with a valid,
    /// unrevoked certificate of the CA.
    pub fn client_config(&self) -> Result<ClientConfig, PkiError> {
        self.client_config_with(self.server_verifier()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Identity, IssueOptions, Pki, TlsConfig};

    fn files(dir: &Path, name: &str) -> TlsFiles {
        TlsConfig {
            pki_dir: dir.to_owned(),
            ..TlsConfig::default()
        }
        .files(name)
    }

    #[test]
    fn issue_load_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path()).unwrap();
        assert!(Pki::init(dir.path()).is_err(), "an existing CA is kept");
        let hub = Identity::hub("store-1").unwrap();
        pki.issue(&hub, &IssueOptions::default()).unwrap();
        let loaded = TlsIdentity::load(&files(dir.path(), "hub-store-1")).unwrap();
        assert_eq!(loaded.identity.common_name, "store-1");
        assert_eq!(loaded.identity.role, Some(Role::Hub));
        loaded.server_config(ClientAuth::Required).unwrap();
        loaded.client_config().unwrap();

        // A reopened CA issues certificates that chain to the same ca.pem.
        let reopened = Pki::open(dir.path()).unwrap();
        let edge = Identity::edge("store-1", "till-1").unwrap();
        let issued = reopened.issue(&edge, &IssueOptions::default()).unwrap();
        TlsIdentity::load(&files(dir.path(), "edge-store-1-till-1")).unwrap();
        let none = HashSet::new();
        assert_eq!(
            terminal_common_names(dir.path(), "store-1", &none).unwrap(),
            vec![issued.common_name]
        );
        assert!(terminal_common_names(dir.path(), "store-2", &none)
            .unwrap()
            .is_empty());

        // Revoked: the list names it, the tier refuses to start on it, the hub drops it.
        let before = std::fs::read(dir.path().join("crl.pem")).unwrap();
        let before =
            RevocationList::parse(&before, Path::new("before"), &dir.path().join("ca.pem"))
                .unwrap();
        let serial = reopened.revoke("edge-store-1-till-1").unwrap();
        let after = std::fs::read(dir.path().join("crl.pem")).unwrap();
        let after =
            RevocationList::parse(&after, Path::new("after"), &dir.path().join("ca.pem")).unwrap();
        assert!(after.newer_than(&before.number) && !before.newer_than(&after.number));
        let revoked =
            revoked_serials(&dir.path().join("crl.pem"), &dir.path().join("ca.pem")).unwrap();
        assert!(revoked.contains(&serial), "{revoked:?} {serial}");
        let err = TlsIdentity::load(&files(dir.path(), "edge-store-1-till-1")).unwrap_err();
        assert!(err.to_string().contains("revoked"), "{err}");
        assert!(terminal_common_names(dir.path(), "store-1", &revoked)
            .unwrap()
            .is_empty());
        assert_eq!(reopened.list().unwrap().len(), 2);

        // Reissued: the earlier certificate is revoked, and the hub allows only the new name.
        let first = reopened.issue(&edge, &IssueOptions::default()).unwrap();
        let second = reopened.issue(&edge, &IssueOptions::default()).unwrap();
        assert_ne!(first.common_name, second.common_name);
        assert!(edge.owns_common_name(&second.common_name));
        let revoked =
            revoked_serials(&dir.path().join("crl.pem"), &dir.path().join("ca.pem")).unwrap();
        assert!(
            revoked.contains(&first.serial),
            "the replaced certificate is revoked"
        );
        assert!(!revoked.contains(&second.serial));
        assert_eq!(
            terminal_common_names(dir.path(), "store-1", &revoked).unwrap(),
            vec![second.common_name]
        );
        // A name that would stand for two identities is refused.
        reopened
            .issue(
                &Identity::edge("a", "b-c").unwrap(),
                &IssueOptions::default(),
            )
            .unwrap();
        let clash = reopened.issue(
            &Identity::edge("a-b", "c").unwrap(),
            &IssueOptions::default(),
        );
        assert!(clash.is_err());
    }

    #[test]
    fn expired_and_foreign_certificates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path()).unwrap();
        let expired = IssueOptions {
            not_before: time::OffsetDateTime::now_utc() - time::Duration::days(10),
            validity_days: 1,
            ..IssueOptions::default()
        };
        pki.issue(&Identity::cloud(), &expired).unwrap();
        let err = TlsIdentity::load(&files(dir.path(), "cloud")).unwrap_err();
        assert!(err.to_string().contains("not valid now"), "{err}");

        // A certificate of another CA does not chain to this one.
        let other = tempfile::tempdir().unwrap();
        Pki::init(other.path())
            .unwrap()
            .issue(&Identity::broker(), &IssueOptions::default())
            .unwrap();
        let mut mixed = files(dir.path(), "broker");
        mixed.cert = other.path().join("broker.pem");
        mixed.key = other.path().join("broker.key");
        let err = TlsIdentity::load(&mixed).unwrap_err();
        assert!(err.to_string().contains("not issued by"), "{err}");
    }

    #[test]
    fn a_key_others_can_read_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path()).unwrap();
        pki.issue(&Identity::cloud(), &IssueOptions::default())
            .unwrap();
        let key = dir.path().join("cloud.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = TlsIdentity::load(&files(dir.path(), "cloud")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cloud.key") && text.contains("readable by others"),
            "{text}"
        );
    }

    #[test]
    fn a_forged_revocation_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(dir.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        Pki::init(other.path()).unwrap();
        let err =
            revoked_serials(&other.path().join("crl.pem"), &dir.path().join("ca.pem")).unwrap_err();
        assert!(err.to_string().contains("not signed by the CA"), "{err}");
    }
}
