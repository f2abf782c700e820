//! Hub signatures on offline approvals: the hub signs each payment it approved without the cloud
//! with its own Ed25519 key, and the cloud applies only entries signed by the key registered for
//! that store.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use protocol::OfflinePayment;

use crate::{parse_public_key, CodeError};

/// A hub's signing key.
pub struct HubSigner {
    key: SigningKey,
}

impl HubSigner {
    /// A signer from a 32-byte secret seed (the hub's key file).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        HubSigner {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The public key to register at the cloud, URL-safe base64 without padding.
    pub fn public_key_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.verifying_key().as_bytes())
    }

    /// Fills in `entry.signature`.
    pub fn sign(&self, entry: &mut OfflinePayment) {
        let signature = self.key.sign(&entry.signed_bytes());
        entry.signature = URL_SAFE_NO_PAD.encode(signature.to_bytes());
    }
}

/// Checks an offline approval's signature against the store's registered public key.
pub fn verify_hub_signature(public_key: &str, entry: &OfflinePayment) -> Result<(), CodeError> {
    let key = parse_public_key(public_key)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(&entry.signature)
        .map_err(|_| CodeError::BadSignature)?;
    let signature = Signature::from_slice(&bytes).map_err(|_| CodeError::BadSignature)?;
    key.verify(&entry.signed_bytes(), &signature)
        .map_err(|_| CodeError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> OfflinePayment {
        OfflinePayment {
            seq: 7,
            payment_id: "s1:o1".into(),
            store_id: "s1".into(),
            terminal_id: "t1".into(),
            order_id: "o1".into(),
            account_id: "alice".into(),
            nonce: "n".into(),
            amount_minor: 1250,
            currency: protocol::Currency::parse("EUR").unwrap(),
            approved_at_ms: 1,
            allowance_version: 0,
            spent_code: None,
            signature: String::new(),
        }
    }

    #[test]
    fn a_signed_entry_verifies_and_any_change_breaks_it() {
        let signer = HubSigner::from_seed(&[3; 32]);
        let mut e = entry();
        signer.sign(&mut e);
        verify_hub_signature(&signer.public_key_b64(), &e).unwrap();

        // Every signed field, changed alone, breaks the signature.
        type Change = fn(&mut OfflinePayment);
        let changes: [(&str, Change); 10] = [
            ("seq", |e| e.seq += 1),
            ("payment_id", |e| e.payment_id = "s1:o2".into()),
            ("store_id", |e| e.store_id = "s2".into()),
            ("terminal_id", |e| e.terminal_id = "t2".into()),
            ("order_id", |e| e.order_id = "o2".into()),
            ("account_id", |e| e.account_id = "mallory".into()),
            ("nonce", |e| e.nonce = "m".into()),
            ("amount_minor", |e| e.amount_minor += 1),
            ("currency", |e| {
                e.currency = protocol::Currency::parse("USD").unwrap()
            }),
            ("approved_at_ms", |e| e.approved_at_ms += 1),
        ];
        for (field, change) in changes {
            let mut changed = e.clone();
            change(&mut changed);
            assert_ne!(changed, e, "{field} changed");
            assert!(
                verify_hub_signature(&signer.public_key_b64(), &changed).is_err(),
                "{field} is not covered by the signature"
            );
        }

        let stranger = HubSigner::from_seed(&[4; 32]);
        assert!(verify_hub_signature(&stranger.public_key_b64(), &e).is_err());
        let mut garbage = e.clone();
        garbage.signature = "not base64!".into();
        assert!(verify_hub_signature(&signer.public_key_b64(), &garbage).is_err());
    }
}
