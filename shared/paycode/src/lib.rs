//! Dynamic payment codes, the phone side and the verifying side.
//!
//! Each customer account holds an Ed25519 key pair; the phone (the `facepay-wallet` command) signs
//! the tuple (account id, issued-at, nonce) and shows it as a QR code. Anyone holding the account's
//! public key can verify a code with no network at all: the store hub does so with the keys the
//! cloud distributes. A code is valid for a short window (60 s by default) with a tolerance for
//! clock skew, and the nonce makes it single-use: the verifier refuses a nonce it has seen.
//!
//! Text form: `FPAY1.<payload>.<signature>`, both parts base64url without padding. The payload is
//! `version (1) | account id length (1) | account id | issued-at ms (8, big-endian) | nonce (16)`,
//! and the signature covers a domain-separation prefix followed by the payload.

mod error;
pub mod hubsig;
pub mod qr;
mod wallet;

pub use error::CodeError;
pub use wallet::Wallet;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

/// Prefix of every facepay payment code.
pub const CODE_PREFIX: &str = "FPAY1.";
/// Bytes of randomness in each code.
pub const NONCE_LEN: usize = 16;
/// Default validity window of a code.
pub const DEFAULT_VALIDITY_MS: u64 = 60_000;
const PAYLOAD_VERSION: u8 = 1;
const SIGNING_DOMAIN: &[u8] = b"facepay payment code v1\0";

/// A parsed payment code whose signature has not been checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCode {
    /// The account the code names.
    pub account_id: String,
    /// When the phone issued it, milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// Random, single-use.
    pub nonce: [u8; NONCE_LEN],
    payload: Vec<u8>,
    signature: Signature,
}

/// How strictly the validity window is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// How long after issue a code is accepted.
    pub window_ms: u64,
    /// How far the phone's clock may be ahead of or behind the verifier's.
    pub clock_skew_ms: u64,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            window_ms: DEFAULT_VALIDITY_MS,
            clock_skew_ms: 5_000,
        }
    }
}

fn payload_bytes(account_id: &str, issued_at_ms: u64, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + account_id.len() + 8 + NONCE_LEN);
    out.push(PAYLOAD_VERSION);
    out.push(u8::try_from(account_id.len()).expect("account ids are at most 64 bytes"));
    out.extend_from_slice(account_id.as_bytes());
    out.extend_from_slice(&issued_at_ms.to_be_bytes());
    out.extend_from_slice(nonce);
    out
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, payload].concat()
}

impl SignedCode {
    /// Parses the text of a QR code. Text that is not a facepay code at all is
    /// [`CodeError::NotFacepay`]; a facepay code that is damaged is [`CodeError::Malformed`].
    pub fn parse(text: &str) -> Result<Self, CodeError> {
        let rest = text
            .trim()
            .strip_prefix(CODE_PREFIX)
            .ok_or(CodeError::NotFacepay)?;
        let (payload_b64, signature_b64) = rest
            .split_once('.')
            .ok_or_else(|| CodeError::malformed("missing signature part"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|e| CodeError::malformed(format!("payload is not base64url: {e}")))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|e| CodeError::malformed(format!("signature is not base64url: {e}")))?;
        let signature = Signature::from_slice(&signature)
            .map_err(|_| CodeError::malformed("signature must be 64 bytes"))?;

        let (&version, rest) = payload
            .split_first()
            .ok_or_else(|| CodeError::malformed("empty payload"))?;
        if version != PAYLOAD_VERSION {
            return Err(CodeError::malformed(format!(
                "unsupported payload version {version}"
            )));
        }
        let (&id_len, rest) = rest
            .split_first()
            .ok_or_else(|| CodeError::malformed("truncated payload"))?;
        let id_len = usize::from(id_len);
        if rest.len() != id_len + 8 + NONCE_LEN {
            return Err(CodeError::malformed("payload has the wrong length"));
        }
        let account_id = std::str::from_utf8(&rest[..id_len])
            .map_err(|_| CodeError::malformed("account id is not UTF-8"))?
            .to_owned();
        protocol::validate_id("account_id", &account_id)
            .map_err(|e| CodeError::malformed(e.to_string()))?;
        let issued_at_ms =
            u64::from_be_bytes(rest[id_len..id_len + 8].try_into().expect("length checked"));
        let nonce: [u8; NONCE_LEN] = rest[id_len + 8..].try_into().expect("length checked");
        Ok(SignedCode {
            account_id,
            issued_at_ms,
            nonce,
            payload,
            signature,
        })
    }

    /// Checks the signature against the account's key, then the validity window at `now_ms`.
    pub fn verify(
        &self,
        public_key: &VerifyingKey,
        now_ms: u64,
        validity: Validity,
    ) -> Result<(), CodeError> {
        public_key
            .verify(&signed_message(&self.payload), &self.signature)
            .map_err(|_| CodeError::BadSignature)?;
        if self.issued_at_ms > now_ms.saturating_add(validity.clock_skew_ms) {
            return Err(CodeError::NotYetValid {
                ahead_ms: self.issued_at_ms - now_ms,
            });
        }
        let expires_at_ms = self
            .issued_at_ms
            .saturating_add(validity.window_ms)
            .saturating_add(validity.clock_skew_ms);
        if now_ms > expires_at_ms {
            return Err(CodeError::Expired {
                expired_ms_ago: now_ms - expires_at_ms,
            });
        }
        Ok(())
    }

    /// The nonce as lower-case hex, the form it takes on the wire and in journals.
    pub fn nonce_hex(&self) -> String {
        self.nonce.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Parses a base64url (no padding) Ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, CodeError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| CodeError::BadPublicKey)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| CodeError::BadPublicKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| CodeError::BadPublicKey)
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000;

    fn wallet() -> Wallet {
        Wallet::generate("alice").unwrap()
    }

    #[test]
    fn issued_code_verifies_within_window() {
        let w = wallet();
        let text = w.issue_code(T0);
        assert!(text.starts_with(CODE_PREFIX));
        let code = SignedCode::parse(&text).unwrap();
        assert_eq!(code.account_id, "alice");
        assert_eq!(code.issued_at_ms, T0);
        let key = parse_public_key(&w.public_key_b64()).unwrap();
        code.verify(&key, T0 + 30_000, Validity::default()).unwrap();
        assert_eq!(code.nonce_hex().len(), 32);
    }

    #[test]
    fn window_and_skew() {
        let w = wallet();
        let key = w.verifying_key();
        let code = SignedCode::parse(&w.issue_code(T0)).unwrap();
        let v = Validity {
            window_ms: 60_000,
            clock_skew_ms: 5_000,
        };
        code.verify(&key, T0 + 65_000, v).unwrap();
        assert_eq!(
            code.verify(&key, T0 + 65_001, v),
            Err(CodeError::Expired { expired_ms_ago: 1 })
        );
        code.verify(&key, T0 - 5_000, v).unwrap();
        assert_eq!(
            code.verify(&key, T0 - 5_001, v),
            Err(CodeError::NotYetValid { ahead_ms: 5_001 })
        );
    }

    #[test]
    fn another_accounts_key_is_a_bad_signature() {
        let code = SignedCode::parse(&wallet().issue_code(T0)).unwrap();
        let other = wallet().verifying_key();
        assert_eq!(
            code.verify(&other, T0, Validity::default()),
            Err(CodeError::BadSignature)
        );
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let w = wallet();
        let text = w.issue_code(T0);
        let code = SignedCode::parse(&text).unwrap();
        // Re-sign nothing, but swap the payload for one naming another account.
        let forged_payload = payload_bytes("mallory", code.issued_at_ms, &code.nonce);
        let sig_part = text.rsplit_once('.').unwrap().1;
        let forged = format!(
            "{CODE_PREFIX}{}.{sig_part}",
            URL_SAFE_NO_PAD.encode(forged_payload)
        );
        let forged = SignedCode::parse(&forged).unwrap();
        assert_eq!(forged.account_id, "mallory");
        assert_eq!(
            forged.verify(&w.verifying_key(), T0, Validity::default()),
            Err(CodeError::BadSignature)
        );
    }

    #[test]
    fn parse_errors() {
        fn check(text: &str, expected: &str) {
            let err = SignedCode::parse(text).unwrap_err();
            assert!(err.to_string().contains(expected), "{text:?}: {err}");
        }
        check("https://example.com/", "not a facepay payment code");
        check("", "not a facepay payment code");
        check("FPAY1.", "missing signature part");
        check("FPAY1.!!!.AAAA", "payload is not base64url");
        check("FPAY1.AQ.AAAA", "signature must be 64 bytes");
        let sig = URL_SAFE_NO_PAD.encode([0u8; 64]);
        check(&format!("FPAY1..{sig}"), "empty payload");
        check(&format!("FPAY1.Ag.{sig}"), "unsupported payload version 2");
        check(&format!("FPAY1.AQU.{sig}"), "wrong length");
        let bad_id = payload_bytes("a/b", 1, &[0; NONCE_LEN]);
        check(
            &format!("FPAY1.{}.{sig}", URL_SAFE_NO_PAD.encode(bad_id)),
            "account_id",
        );
    }

    #[test]
    fn public_key_parsing() {
        assert!(parse_public_key(&wallet().public_key_b64()).is_ok());
        assert_eq!(parse_public_key("short"), Err(CodeError::BadPublicKey));
        assert_eq!(parse_public_key("***"), Err(CodeError::BadPublicKey));
    }
}
