//! Encryption of personal data at rest (face templates, names, phone numbers, second-factor
//! hashes): ChaCha20-Poly1305 with a 256-bit key read from a file named in configuration.
//!
//! Each record is sealed with a fresh random 96-bit nonce and its storage key as associated data,
//! so a sealed value copied under another key (another customer) fails to open. A database opened
//! with the wrong key file fails loudly instead of reading garbage.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305, Key, Nonce,
};
use rand::RngCore;

const NONCE_LEN: usize = 12;
/// Length of a key file: 32 random bytes.
pub const KEY_LEN: usize = 32;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or created.
    #[error("key file {path}: {detail}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The data was altered, belongs to another record, or was sealed with another key.
    #[error("sealed record cannot be opened: wrong key, or altered data")]
    Open,
}

/// Seals and opens records with one key.
#[derive(Clone)]
pub struct Sealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

/// Reads a 32-byte secret key file or, when it is missing and `create_if_missing`, creates it
/// with fresh random bytes, readable by its owner only.
pub fn key_file(path: &Path, create_if_missing: bool) -> Result<[u8; KEY_LEN], SealError> {
    let fail = |detail: String| SealError::KeyFile {
        path: path.to_owned(),
        detail,
    };
    match std::fs::read(path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            fail(format!(
                "holds {} bytes; a key file is exactly {KEY_LEN} random bytes",
                bytes.len()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create_if_missing => {
            let mut key = [0u8; KEY_LEN];
            rand::rngs::OsRng.fill_bytes(&mut key);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
            }
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(|e| fail(e.to_string()))?;
            file.write_all(&key)
                .and_then(|_| file.sync_all())
                .map_err(|e| fail(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

impl Sealer {
    /// A sealer over a raw key.
    pub fn from_key(key: &[u8; KEY_LEN]) -> Self {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// Reads the key file (exactly 32 bytes). With `create_if_missing`, a missing file is created
    /// with a fresh random key, readable by its owner only; the caller decides when that is safe
    /// (never when sealed data already exists: it could not be opened with a new key).
    pub fn from_key_file(path: &Path, create_if_missing: bool) -> Result<Self, SealError> {
        key_file(path, create_if_missing).map(|key| Self::from_key(&key))
    }

    /// Encrypts `plain`, bound to `record_key`: nonce || ciphertext || tag.
    pub fn seal(&self, record_key: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: record_key,
                },
            )
            .expect("encryption of in-memory data does not fail");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`Sealer::seal`] produced for the same `record_key`.
    pub fn open(&self, record_key: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: record_key,
                },
            )
            .map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_tampering_other_records_and_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/templates.key");
        let sealer = Sealer::from_key_file(&path, true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_LEN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let plain = b"template of alice";
        let sealed = sealer.seal(b"alice", plain);
        assert!(!sealed.windows(plain.len()).any(|w| w == plain));
        assert_eq!(sealer.open(b"alice", &sealed).unwrap(), plain);
        assert!(sealer.open(b"bob", &sealed).is_err(), "bound to its record");
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(sealer.open(b"alice", &altered).is_err());
        assert!(sealer.open(b"alice", b"short").is_err());

        // The same file gives the same key; another file does not.
        let again = Sealer::from_key_file(&path, false).unwrap();
        assert_eq!(again.open(b"alice", &sealed).unwrap(), plain);
        let other = Sealer::from_key_file(&dir.path().join("other.key"), true).unwrap();
        assert!(other.open(b"alice", &sealed).is_err());
    }

    #[test]
    fn key_file_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let err = Sealer::from_key_file(&missing, false).unwrap_err();
        assert!(err.to_string().contains("missing.key"), "{err}");
        let short = dir.path().join("short.key");
        std::fs::write(&short, b"abc").unwrap();
        let err = Sealer::from_key_file(&short, true).unwrap_err();
        assert!(err.to_string().contains("exactly 32"), "{err}");
    }
}
