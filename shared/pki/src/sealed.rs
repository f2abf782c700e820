//! Messages between hubs and the cloud, signed end to end with the sender's certificate key and
//! checked by the receiver, whatever relays them. Mutual TLS to the broker decides who may
//! connect; it does not make a message true: the broker itself, or any client it lets publish on
//! a topic, could otherwise forge a key update, a template, an "approved" reply or a hub's void.
//! A sealed message names its signer's certificate; the receiver takes it only when the CA
//! issued that certificate, it is valid now, the revocation list in force does not name it, its
//! role and common name are the ones the topic belongs to (the cloud for everything a hub hears,
//! the store's own hub for a store's requests), and the signature covers the topic and the
//! payload (a message cannot be moved to another topic, another store's replies included).

use std::{collections::HashMap, sync::Arc, time::Instant};

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{
    load::LiveClientVerifier,
    reply::{verify_ecdsa, CERTIFICATE_RECHECK},
    PkiError, ReplySigner, Role,
};

/// Separates these signatures from any other use of the tiers' keys.
pub const LINK_DOMAIN: &[u8] = b"facepay-link-v2\n";

/// Most certificates remembered as checked; beyond it the memory starts over. Only a certificate
/// whose key signed the message is remembered, so filling it takes as many genuine keys.
const CHECKED_CAPACITY: usize = 4_096;
/// Largest certificate a sealed message may carry (the fleet's are under 1 KiB).
pub const MAX_CERTIFICATE_PEM: usize = 4_096;
/// Largest signature (a DER ECDSA P-256 signature is at most 72 bytes; base64).
const MAX_SIGNATURE: usize = 128;

/// A message as it crosses the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The message itself (JSON text).
    pub payload: String,
    /// The signer's certificate, PEM.
    pub certificate_pem: String,
    /// Base64 ECDSA P-256 SHA-256 signature of [`link_message`].
    pub signature: String,
}

/// What is signed: the domain, the topic's length (8 bytes, big-endian), the topic, and the
/// payload.
pub fn link_message(topic: &str, payload: &str) -> Vec<u8> {
    let mut message = LINK_DOMAIN.to_vec();
    message.extend_from_slice(&(topic.len() as u64).to_be_bytes());
    message.extend_from_slice(topic.as_bytes());
    message.extend_from_slice(payload.as_bytes());
    message
}

impl ReplySigner {
    /// `payload` (JSON text) sealed for `topic`.
    pub fn seal(&self, topic: &str, payload: Vec<u8>) -> Result<Vec<u8>, PkiError> {
        let payload = String::from_utf8(payload)
            .map_err(|_| PkiError::Tls("only text payloads are sealed".into()))?;
        let signature = self.sign_message(&link_message(topic, &payload))?;
        Ok(serde_json::to_vec(&Sealed {
            payload,
            certificate_pem: self.certificate_pem().to_owned(),
            signature,
        })
        .expect("serialises"))
    }
}

/// Who must have signed a message on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The signer's role.
    pub role: Role,
    /// The signer's certificate common name.
    pub common_name: String,
}

impl Signer {
    /// The cloud (everything a hub hears on the link).
    pub fn cloud() -> Self {
        Signer {
            role: Role::Cloud,
            common_name: crate::Identity::cloud().common_name,
        }
    }

    /// The hub of `store_id` (that store's requests).
    pub fn hub(store_id: &str) -> Self {
        Signer {
            role: Role::Hub,
            common_name: store_id.to_owned(),
        }
    }

    /// Terminal `terminal_id` of `store_id`, by any of its certificates (what it attests).
    pub fn terminal(store_id: &str, terminal_id: &str) -> Self {
        Signer {
            role: Role::Edge,
            common_name: crate::edge_common_name(store_id, terminal_id),
        }
    }

    /// Whether a certificate's common name is this signer's (a terminal's carries its
    /// generation after its name).
    fn named(&self, common_name: &str) -> bool {
        crate::names(self.role, &self.common_name, common_name)
    }
}

/// Opens sealed messages: checks the signer's certificate against the tier's CA and the
/// revocation list in force (shared with the tier's TLS servers, so a revocation the tier takes
/// applies here at once), then the signature.
#[derive(Debug)]
pub struct SealedVerifier {
    live: Arc<LiveClientVerifier>,
    /// Certificates that passed their checks, by the SHA-256 of their DER: (signer, serial,
    /// when). The chain and expiry are checked again after [`CERTIFICATE_RECHECK`]; the serial
    /// against the list in force on every message.
    checked: std::sync::Mutex<HashMap<[u8; 32], (Signer, String, Instant)>>,
}

impl SealedVerifier {
    pub(crate) fn new(live: Arc<LiveClientVerifier>) -> Self {
        SealedVerifier {
            live,
            checked: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The payload of `sealed`, received on `topic`, when `expected` signed it for that topic.
    pub fn open(&self, topic: &str, sealed: &[u8], expected: &Signer) -> Result<Vec<u8>, PkiError> {
        let refused = |why: String| PkiError::Tls(format!("message on {topic} refused: {why}"));
        let sealed: Sealed = serde_json::from_slice(sealed)
            .map_err(|e| refused(format!("not a sealed message: {e}")))?;
        if sealed.certificate_pem.len() > MAX_CERTIFICATE_PEM
            || sealed.signature.len() > MAX_SIGNATURE
        {
            return Err(refused("certificate or signature too large".into()));
        }
        let der = CertificateDer::from_pem_slice(sealed.certificate_pem.as_bytes())
            .map_err(|e| refused(format!("unreadable certificate: {e}")))?;
        // The signature first: it costs one verification and needs no chain, so a forgery with
        // a genuine certificate (they travel in every message) is refused before the chain is
        // walked or anything is remembered.
        verify_ecdsa(
            &der,
            &link_message(topic, &sealed.payload),
            &sealed.signature,
        )
        .map_err(refused)?;
        self.check_certificate(&der, expected).map_err(refused)?;
        Ok(sealed.payload.into_bytes())
    }

    fn check_certificate(&self, der: &CertificateDer<'_>, expected: &Signer) -> Result<(), String> {
        let digest: [u8; 32] = sha2::Sha256::digest(der.as_ref()).into();
        {
            let checked = self.checked.lock().expect("not poisoned");
            if let Some((signer, serial, at)) = checked.get(&digest) {
                if signer == expected && at.elapsed() < CERTIFICATE_RECHECK {
                    return match self.live.is_revoked(serial) {
                        true => Err("the certificate is revoked".into()),
                        false => Ok(()),
                    };
                }
            }
        }
        self.live
            .verify_client_cert(der, &[], rustls_pki_types::UnixTime::now())
            .map_err(|e| format!("certificate: {e}"))?;
        let peer = crate::peer_identity(der).ok_or("certificate without a subject")?;
        if peer.role != Some(expected.role) || !expected.named(&peer.common_name) {
            return Err(format!(
                "signed by {:?} ({:?}), not {:?} ({})",
                peer.common_name,
                peer.role,
                expected.common_name,
                expected.role.as_str()
            ));
        }
        let mut checked = self.checked.lock().expect("not poisoned");
        if checked.len() >= CHECKED_CAPACITY {
            checked.clear();
        }
        checked.insert(digest, (expected.clone(), peer.serial, Instant::now()));
        Ok(())
    }
}

impl crate::TlsIdentity {
    /// Opens sealed messages against this identity's CA and the revocation list in force.
    pub fn sealed_verifier(&self) -> SealedVerifier {
        SealedVerifier::new(self.live.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        test_support::{fleet, identity},
        Identity, IssueOptions, Pki,
    };

    #[test]
    fn only_the_expected_signer_opens_a_message_and_only_on_its_topic() {
        let (dir, pki) = fleet(&[
            Identity::cloud(),
            Identity::hub("store-1").unwrap(),
            Identity::hub("store-2").unwrap(),
        ]);
        let hub = identity(dir.path(), "hub-store-1");
        let cloud = identity(dir.path(), "cloud");
        let cloud_signer = cloud.reply_signer().unwrap();
        let hub_verifier = hub.sealed_verifier();
        let topic = "facepay/v1/stores/store-1/replies";
        let sealed = cloud_signer.seal(topic, b"{\"ok\":1}".to_vec()).unwrap();
        assert_eq!(
            hub_verifier.open(topic, &sealed, &Signer::cloud()).unwrap(),
            b"{\"ok\":1}"
        );
        // Moved to another topic (another store's replies): refused.
        let other_topic = "facepay/v1/stores/store-2/replies";
        assert!(hub_verifier
            .open(other_topic, &sealed, &Signer::cloud())
            .is_err());
        // The payload changed under the signature: refused.
        let mut forged: Sealed = serde_json::from_slice(&sealed).unwrap();
        forged.payload = "{\"ok\":2}".into();
        let forged = serde_json::to_vec(&forged).unwrap();
        assert!(hub_verifier.open(topic, &forged, &Signer::cloud()).is_err());
        // A hub's certificate signs nothing the cloud says, and a store's hub speaks only for
        // its store.
        let rogue = identity(dir.path(), "hub-store-2").reply_signer().unwrap();
        let forged = rogue.seal(topic, b"{}".to_vec()).unwrap();
        assert!(hub_verifier.open(topic, &forged, &Signer::cloud()).is_err());
        let cloud_verifier = cloud.sealed_verifier();
        let requests = "facepay/v1/cloud/requests/store-1";
        assert!(cloud_verifier
            .open(requests, &forged, &Signer::hub("store-1"))
            .is_err());
        let own = hub
            .reply_signer()
            .unwrap()
            .seal(requests, b"{}".to_vec())
            .unwrap();
        cloud_verifier
            .open(requests, &own, &Signer::hub("store-1"))
            .unwrap();
        // Not sealed at all, or sealed by another fleet's cloud: refused.
        assert!(hub_verifier.open(topic, b"{}", &Signer::cloud()).is_err());
        let stranger = tempfile::tempdir().unwrap();
        let other_pki = Pki::init(stranger.path()).unwrap();
        other_pki
            .issue(&Identity::cloud(), &IssueOptions::default())
            .unwrap();
        let impostor = identity(stranger.path(), "cloud").reply_signer().unwrap();
        let forged = impostor.seal(topic, b"{\"ok\":1}".to_vec()).unwrap();
        assert!(hub_verifier.open(topic, &forged, &Signer::cloud()).is_err());

        // The cloud's certificate revoked: its messages are refused from the list's arrival on,
        // even though it passed before.
        pki.revoke("cloud").unwrap();
        let newer = std::fs::read(dir.path().join("crl.pem")).unwrap();
        let list = crate::RevocationList::parse(&newer, &dir.path().join("crl.pem"), &hub.files.ca)
            .unwrap();
        hub.update_revocations(&list).unwrap();
        assert!(hub_verifier.open(topic, &sealed, &Signer::cloud()).is_err());
    }

    #[test]
    fn a_terminal_signs_as_itself_with_any_of_its_certificates_only() {
        let (_dir, _pki) = fleet(&[
            Identity::cloud(),
            Identity::edge("store-1", "till-1").unwrap(),
            Identity::edge("store-1", "till-2").unwrap(),
            Identity::edge("store-10", "till-1").unwrap(),
        ]);
        let dir = _dir.path();
        let cloud = identity(dir, "cloud").sealed_verifier();
        let topic = "facepay/v1/attest/store-1:o-1";
        let seal = |name: &str| {
            identity(dir, name)
                .reply_signer()
                .unwrap()
                .seal(topic, b"{}".to_vec())
                .unwrap()
        };
        let till_1 = Signer::terminal("store-1", "till-1");
        cloud
            .open(topic, &seal("edge-store-1-till-1"), &till_1)
            .unwrap();
        for other in ["edge-store-1-till-2", "edge-store-10-till-1", "cloud"] {
            assert!(
                cloud.open(topic, &seal(other), &till_1).is_err(),
                "{other} signed as till-1"
            );
        }
        assert!(!till_1.named("edge:store-1:till-1"), "no generation");
        assert!(!till_1.named("edge:store-1:till-1:ab:cd"));
        assert!(!till_1.named("edge:store-1:till-10:ab"));
    }
}
