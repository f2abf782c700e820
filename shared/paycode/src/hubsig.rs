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
    let signature = signature_of(entry)?;
    key.verify(&entry.signed_bytes(), &signature)
        .map_err(|_| CodeError::BadSignature)
}

/// Checks the signatures of many offline approvals of one store against its registered public
/// key; one answer per entry, as [`verify_hub_signature`] gives it. The key is read once and the
/// signatures are checked together (Ed25519 batch verification: about half the work per
/// signature); if the batch does not verify, each is checked alone to find which do not.
///
/// A batch accepts every signature that verifies alone, and nothing else that anyone without
/// the hub's key could make. It may also accept signatures the key's holder crafted to fail
/// alone (a non-canonical or small-order `R`): a hub that signs those could sign the entry
/// properly anyway, and at worst its resent entry is refused where it would have answered
/// "already applied".
pub fn verify_hub_signatures(
    public_key: &str,
    entries: &[&OfflinePayment],
) -> Vec<Result<(), CodeError>> {
    let key = match parse_public_key(public_key) {
        Ok(key) => key,
        Err(_) => {
            return entries
                .iter()
                .map(|_| Err(CodeError::BadPublicKey))
                .collect()
        }
    };
    let mut answers: Vec<Result<(), CodeError>> = Vec::with_capacity(entries.len());
    let (mut messages, mut signatures, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for (i, entry) in entries.iter().enumerate() {
        match signature_of(entry) {
            Ok(signature) => {
                messages.push(entry.signed_bytes());
                signatures.push(signature);
                at.push(i);
                answers.push(Ok(()));
            }
            Err(e) => answers.push(Err(e)),
        }
    }
    let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let keys = vec![key; signatures.len()];
    if !signatures.is_empty() && ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_err()
    {
        for ((message, signature), i) in messages.iter().zip(&signatures).zip(at) {
            if key.verify(message, signature).is_err() {
                answers[i] = Err(CodeError::BadSignature);
            }
        }
    }
    answers
}

/// An entry's signature, decoded.
fn signature_of(entry: &OfflinePayment) -> Result<Signature, CodeError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(&entry.signature)
        .map_err(|_| CodeError::BadSignature)?;
    Signature::from_slice(&bytes).map_err(|_| CodeError::BadSignature)
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
    fn a_batch_answers_for_each_entry_as_a_check_alone_does() {
        let signer = HubSigner::from_seed(&[3; 32]);
        let key = signer.public_key_b64();
        let mut entries: Vec<OfflinePayment> = (0..40)
            .map(|i| {
                let mut e = entry();
                e.seq = i;
                e.order_id = format!("o{i}").into();
                e.payment_id = format!("s1:o{i}").into();
                signer.sign(&mut e);
                e
            })
            .collect();
        let all: Vec<&OfflinePayment> = entries.iter().collect();
        assert!(verify_hub_signatures(&key, &all).iter().all(Result::is_ok));
        // One changed after signing, one with garbage, one signed by another key: only those
        // three fail, each where it is, and the rest still pass.
        entries[3].amount_minor += 1;
        entries[17].signature = "not base64!".into();
        HubSigner::from_seed(&[4; 32]).sign(&mut entries[39]);
        let all: Vec<&OfflinePayment> = entries.iter().collect();
        let answers = verify_hub_signatures(&key, &all);
        for (i, (answer, e)) in answers.iter().zip(&entries).enumerate() {
            assert_eq!(
                answer.is_ok(),
                verify_hub_signature(&key, e).is_ok(),
                "entry {i}"
            );
            assert_eq!(answer.is_err(), [3, 17, 39].contains(&i), "entry {i}");
        }
        // A key that is not a key fails every entry; no entries, no answers.
        assert!(verify_hub_signatures("nope", &all)
            .iter()
            .all(Result::is_err));
        assert!(verify_hub_signatures(&key, &[]).is_empty());
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
