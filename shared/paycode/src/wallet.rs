use std::path::Path;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::{rngs::OsRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::{payload_bytes, signed_message, CodeError, CODE_PREFIX, NONCE_LEN};

/// The phone side: an account's signing key, which issues payment codes.
pub struct Wallet {
    account_id: String,
    signing_key: SigningKey,
}

/// On-disk form of a wallet. The secret never leaves the phone in a real deployment.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WalletFile {
    account_id: String,
    secret_key: String,
}

impl Wallet {
    /// A new wallet with a fresh key pair from the operating system's random source.
    pub fn generate(account_id: &str) -> Result<Self, CodeError> {
        protocol::validate_id("account_id", account_id)
            .map_err(|e| CodeError::Wallet(e.to_string()))?;
        Ok(Wallet {
            account_id: account_id.to_owned(),
            signing_key: SigningKey::generate(&mut OsRng),
        })
    }

    /// A wallet with a key derived from a 32-byte seed, for reproducible demos and tests.
    pub fn from_seed(account_id: &str, seed: [u8; 32]) -> Result<Self, CodeError> {
        protocol::validate_id("account_id", account_id)
            .map_err(|e| CodeError::Wallet(e.to_string()))?;
        Ok(Wallet {
            account_id: account_id.to_owned(),
            signing_key: SigningKey::from_bytes(&seed),
        })
    }

    /// The account this wallet pays from.
    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    /// The public key, as the cloud stores and distributes it.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing_key.verifying_key()
    }

    /// The public key in base64url without padding.
    pub fn public_key_b64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.verifying_key().as_bytes())
    }

    /// Signs a new single-use code issued at `now_ms`.
    pub fn issue_code(&self, now_ms: u64) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        self.issue_code_with_nonce(now_ms, nonce)
    }

    /// Signs a code with a given nonce. Verifiers refuse a nonce twice, so this is for tests that
    /// need to build a replay on purpose.
    pub fn issue_code_with_nonce(&self, now_ms: u64, nonce: [u8; NONCE_LEN]) -> String {
        let payload = payload_bytes(&self.account_id, now_ms, &nonce);
        let signature = self.signing_key.sign(&signed_message(&payload));
        format!(
            "{CODE_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }

    /// Writes the wallet as JSON, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), CodeError> {
        let file = WalletFile {
            account_id: self.account_id.clone(),
            secret_key: URL_SAFE_NO_PAD.encode(self.signing_key.to_bytes()),
        };
        let json = serde_json::to_vec_pretty(&file).expect("wallet serialises");
        let io = |e: std::io::Error| CodeError::Wallet(format!("{}: {e}", path.display()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut out = options.open(path).map_err(io)?;
        std::io::Write::write_all(&mut out, &json).map_err(io)
    }

    /// Reads a wallet written by [`Wallet::save`].
    pub fn load(path: &Path) -> Result<Self, CodeError> {
        let bad = |detail: String| CodeError::Wallet(format!("{}: {detail}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let file: WalletFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let secret = URL_SAFE_NO_PAD
            .decode(&file.secret_key)
            .map_err(|_| bad("secret_key is not base64url".into()))?;
        let secret: [u8; 32] = secret
            .try_into()
            .map_err(|_| bad("secret_key must be 32 bytes".into()))?;
        Wallet::from_seed(&file.account_id, secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_keep_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.json");
        let w = Wallet::generate("bob").unwrap();
        w.save(&path).unwrap();
        let back = Wallet::load(&path).unwrap();
        assert_eq!(back.account_id(), "bob");
        assert_eq!(back.public_key_b64(), w.public_key_b64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, b"{}").unwrap();
        assert!(matches!(Wallet::load(&path), Err(CodeError::Wallet(_))));
    }

    #[test]
    fn bad_account_ids_are_refused() {
        assert!(Wallet::generate("a b").is_err());
        assert!(Wallet::generate("").is_err());
    }
}
