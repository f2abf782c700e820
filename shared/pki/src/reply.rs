//! What a hub answers its terminals, signed with the key of its certificate: a terminal acts
//! only on an answer whose signature checks against a hub certificate of its own store that the
//! CA issued and the revocation list in force does not name. Zenoh's TLS reads no revocation
//! list and does not show the application the peer's certificate; this is how a terminal refuses
//! a revoked (stolen) hub key.

use std::{path::PathBuf, sync::Arc};

use rustls::{server::danger::ClientCertVerifier, SignatureScheme};
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateRevocationListDer};
use sha2::Digest as _;

use crate::{load::LiveClientVerifier, PkiError, RevocationList, Role, TlsIdentity};

/// Separates these signatures from any other use of the hub's key.
pub const REPLY_DOMAIN: &[u8] = b"facepay-hub-reply-v1\n";

/// What is signed: the domain, the SHA-256 of the request the terminal sent (an answer cannot be
/// replayed for another request), and the answer.
pub fn signed_message(request: &[u8], reply: &str) -> Vec<u8> {
    let mut message = REPLY_DOMAIN.to_vec();
    message.extend_from_slice(&sha2::Sha256::digest(request));
    message.extend_from_slice(reply.as_bytes());
    message
}

/// Signs answers with a hub's certificate key.
#[derive(Debug, Clone)]
pub struct ReplySigner {
    key: Arc<dyn rustls::sign::SigningKey>,
    certificate_pem: String,
}

impl ReplySigner {
    /// The base64 signature of `reply` to `request`.
    pub fn sign(&self, request: &[u8], reply: &str) -> Result<String, PkiError> {
        self.sign_message(&signed_message(request, reply))
    }

    /// The base64 ECDSA P-256 SHA-256 signature of `message` (which starts with its domain).
    pub(crate) fn sign_message(&self, message: &[u8]) -> Result<String, PkiError> {
        use base64::Engine as _;
        let signer = self
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .ok_or_else(|| PkiError::Tls("the key cannot sign ECDSA P-256 SHA-256".into()))?;
        let signature = signer
            .sign(message)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(signature))
    }

    /// The certificate that verifies the signatures, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// A signer over a PEM key and certificate as they are (tests forge rogue hubs with it).
    pub fn from_pem(key_pem: &[u8], certificate_pem: String) -> Result<Self, PkiError> {
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| PkiError::Tls(format!("not a PEM private key: {e}")))?;
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&key)
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        Ok(ReplySigner {
            key,
            certificate_pem,
        })
    }
}

impl TlsIdentity {
    /// Signs answers with this identity's key.
    pub fn reply_signer(&self) -> Result<ReplySigner, PkiError> {
        let key = rustls::crypto::ring::sign::any_ecdsa_type(self.private_key())
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        // Terminals check P-256 signatures: another key would sign nothing, found only when the
        // first payment's answer could not be sent. Refused at start instead.
        if key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .is_none()
        {
            return Err(PkiError::bad(
                &self.files.key,
                "the hub's key must be ECDSA P-256 (facepay-pki issues such keys)",
            ));
        }
        let leaf = self
            .chain
            .first()
            .expect("a loaded identity has a certificate");
        let certificate_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(leaf.as_ref())
            }
        );
        Ok(ReplySigner {
            key,
            certificate_pem,
        })
    }

    /// Checks answers signed by `store_id`'s hub, against this identity's CA and revocation list.
    pub fn hub_verifier(&self, store_id: &str) -> Result<HubVerifier, PkiError> {
        let pem = std::fs::read(&self.files.crl).map_err(PkiError::io(&self.files.crl))?;
        let list = RevocationList::parse(&pem, &self.files.crl, &self.files.ca)?;
        let crls = crls_of(&list)?;
        Ok(HubVerifier {
            store_id: store_id.to_owned(),
            ca: self.files.ca.clone(),
            crl_file: self.files.crl.clone(),
            // A list past its next update refuses every hub: a terminal cut off with a rogue that
            // withholds newer lists trusts a stolen key at most until the list expires.
            verifier: LiveClientVerifier::new(self.roots(), crls, list.serials.clone(), true)?,
            next_update_unix: std::sync::Mutex::new(list.next_update_unix),
            number: std::sync::Mutex::new(list.number),
            checked: std::sync::Mutex::new(None),
        })
    }
}

/// Checks that `signature` (base64 ECDSA P-256 SHA-256) signs `message` with the key of `der`.
pub(crate) fn verify_ecdsa(
    der: &CertificateDer<'_>,
    message: &[u8],
    signature: &str,
) -> Result<(), String> {
    use base64::Engine as _;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|e| format!("signature: {e}"))?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &cert.public_key().subject_public_key.data,
    )
    .verify(message, &signature)
    .map_err(|_| "the signature does not match".to_owned())
}

fn crls_of(list: &RevocationList) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    CertificateRevocationListDer::pem_slice_iter(&list.pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Tls(format!("revocation list: {e}")))
}

/// A terminal's check of its hub's answers.
#[derive(Debug)]
pub struct HubVerifier {
    store_id: String,
    ca: PathBuf,
    crl_file: PathBuf,
    verifier: LiveClientVerifier,
    number: std::sync::Mutex<Vec<u8>>,
    next_update_unix: std::sync::Mutex<Option<i64>>,
    /// The last certificate that passed, under which list, and when.
    checked: std::sync::Mutex<Option<(String, Vec<u8>, std::time::Instant)>>,
}

/// How long a hub certificate that passed its checks is taken without checking it again.
pub const CERTIFICATE_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

impl HubVerifier {
    /// Checks that `signature` signs `reply` to `request` with the key of `certificate_pem`, a
    /// certificate of this store's hub that the CA issued, valid now and not revoked.
    pub fn verify(
        &self,
        request: &[u8],
        reply: &str,
        certificate_pem: &str,
        signature: &str,
    ) -> Result<(), PkiError> {
        let refused = |why: String| PkiError::Tls(format!("hub answer refused: {why}"));
        let der = CertificateDer::from_pem_slice(certificate_pem.as_bytes())
            .map_err(|e| refused(format!("unreadable certificate: {e}")))?;
        // The certificate's chain, revocation and identity are checked once per certificate and
        // list, and again at least every `CERTIFICATE_RECHECK` (expiry of the certificate and of
        // the list); the signature on every answer.
        let number = self.number.lock().expect("not poisoned").clone();
        let fresh = self
            .checked
            .lock()
            .expect("not poisoned")
            .as_ref()
            .is_some_and(|(pem, checked_number, at)| {
                pem == certificate_pem
                    && *checked_number == number
                    && at.elapsed() < CERTIFICATE_RECHECK
            });
        if !fresh {
            self.verifier
                .verify_client_cert(&der, &[], rustls_pki_types::UnixTime::now())
                .map_err(|e| refused(format!("certificate: {e}")))?;
            let peer = crate::peer_identity(&der).ok_or_else(|| refused("no subject".into()))?;
            if peer.role != Some(Role::Hub) || peer.common_name != self.store_id {
                return Err(refused(format!(
                    "{:?} is not the hub of {}",
                    peer.common_name, self.store_id
                )));
            }
            *self.checked.lock().expect("not poisoned") = Some((
                certificate_pem.to_owned(),
                number,
                std::time::Instant::now(),
            ));
        }
        verify_ecdsa(&der, &signed_message(request, reply), signature).map_err(refused)
    }

    /// Takes a revocation list relayed by the hub when the CA signed it and it is newer than the
    /// one in force, and keeps it in the terminal's `crl.pem` (unless that file already holds a
    /// list at least as new). Whether it was taken. Blocking: file I/O.
    pub fn update(&self, pem: &[u8]) -> Result<bool, PkiError> {
        let origin = std::path::Path::new("revocation list relayed by the hub");
        let list = RevocationList::parse(pem, origin, &self.ca)?;
        let mut number = self.number.lock().expect("not poisoned");
        if !list.newer_than(&number) {
            return Ok(false);
        }
        self.verifier.update(&list)?;
        *number = list.number.clone();
        *self.next_update_unix.lock().expect("not poisoned") = list.next_update_unix;
        drop(number);
        if let Err(error) = self.keep(&list) {
            tracing::error!(%error, "keeping the relayed revocation list failed; in force in memory");
        }
        Ok(true)
    }

    fn keep(&self, list: &RevocationList) -> Result<(), PkiError> {
        let on_disk = std::fs::read(&self.crl_file)
            .ok()
            .and_then(|pem| RevocationList::parse(&pem, &self.crl_file, &self.ca).ok());
        if on_disk.is_some_and(|kept| !list.newer_than(&kept.number)) {
            return Ok(());
        }
        let dir = self
            .crl_file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(PkiError::io(dir))?;
        use std::io::Write as _;
        tmp.write_all(&list.pem)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(PkiError::io(tmp.path()))?;
        tmp.persist(&self.crl_file)
            .map_err(|e| PkiError::io(&self.crl_file)(e.error))?;
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Whether the list in force is past its next update. Every hub answer is then refused, so a
    /// terminal must not send a request at all (the hub would act on it, unheard).
    pub fn list_expired(&self) -> bool {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.next_update_unix
            .lock()
            .expect("not poisoned")
            .is_some_and(|next| next < now)
    }

    /// How many certificates the list in force revokes.
    pub fn revoked_count(&self) -> usize {
        self.verifier.revoked_count()
    }
}

#[cfg(test)]
mod tests {
    use crate::{
        test_support::{fleet, identity},
        Identity, Pki,
    };

    #[test]
    fn a_terminal_takes_only_its_hubs_signed_answers() {
        let (dir, pki) = fleet(&[
            Identity::hub("store-1").unwrap(),
            Identity::hub("store-2").unwrap(),
            Identity::edge("store-1", "till-1").unwrap(),
        ]);
        let terminal = identity(dir.path(), "edge-store-1-till-1");
        let verifier = terminal.hub_verifier("store-1").unwrap();
        let hub = identity(dir.path(), "hub-store-1").reply_signer().unwrap();
        let signature = hub.sign(b"request", "answer").unwrap();
        verifier
            .verify(b"request", "answer", hub.certificate_pem(), &signature)
            .unwrap();
        // Another answer, another request: the signature does not carry over.
        assert!(verifier
            .verify(b"request", "approved", hub.certificate_pem(), &signature)
            .is_err());
        assert!(verifier
            .verify(
                b"other request",
                "answer",
                hub.certificate_pem(),
                &signature
            )
            .is_err());
        // Another store's hub, and a terminal's certificate, sign nothing for store-1.
        let other = identity(dir.path(), "hub-store-2").reply_signer().unwrap();
        let forged = other.sign(b"request", "answer").unwrap();
        assert!(verifier
            .verify(b"request", "answer", other.certificate_pem(), &forged)
            .is_err());
        let till = terminal.reply_signer().unwrap();
        let forged = till.sign(b"request", "answer").unwrap();
        assert!(verifier
            .verify(b"request", "answer", till.certificate_pem(), &forged)
            .is_err());
        // store-1's certificate with store-2's signature: refused.
        assert!(verifier
            .verify(
                b"request",
                "answer",
                hub.certificate_pem(),
                &other.sign(b"request", "answer").unwrap()
            )
            .is_err());

        // A newer list revoking the hub: taken, kept on disk, and the hub refused; an older one
        // (the first) and a forged one are not taken.
        let first = std::fs::read(dir.path().join("crl.pem")).unwrap();
        pki.revoke("hub-store-1").unwrap();
        let newer = std::fs::read(dir.path().join("crl.pem")).unwrap();
        // The terminal's own file still holds the first list.
        std::fs::write(dir.path().join("crl.pem"), &first).unwrap();
        assert!(verifier.update(&newer).unwrap());
        assert!(verifier
            .verify(b"request", "answer", hub.certificate_pem(), &signature)
            .is_err());
        assert_eq!(verifier.revoked_count(), 1);
        let kept = std::fs::read(dir.path().join("crl.pem")).unwrap();
        assert_ne!(kept, first, "the newer list is kept on disk");
        assert!(
            !verifier.update(&first).unwrap(),
            "an older list is not taken"
        );
        assert!(!verifier.update(&newer).unwrap(), "nor the same one again");
        let stranger = tempfile::tempdir().unwrap();
        Pki::init(stranger.path()).unwrap();
        let forged = std::fs::read(stranger.path().join("crl.pem")).unwrap();
        assert!(
            verifier.update(&forged).is_err(),
            "a list the CA did not sign"
        );
        assert_eq!(verifier.revoked_count(), 1);

        // A list past its next update: the terminal knows before it sends anything.
        assert!(!verifier.list_expired());
        pki.write_crl_valid_for(&pki.list().unwrap(), time::Duration::minutes(-1))
            .unwrap();
        let stale = std::fs::read(dir.path().join("crl.pem")).unwrap();
        assert!(verifier.update(&stale).unwrap());
        assert!(verifier.list_expired());
    }
}
