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

/// Where a tier keeps its keys unless told otherwise: beside its data directory
/// (`<data_dir>-keys`), never inside it, so a copy or a backup of the data carries no key.
pub fn default_keys_dir(data_dir: &Path) -> std::path::PathBuf {
    // Absolute first: `data_dir = "."` has a name to put `-keys` after.
    let data_dir = &normalized(data_dir);
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "data".into());
    name.push("-keys");
    data_dir.with_file_name(name)
}

/// Moves a key from where an earlier version kept it by default (`legacy`, inside the data
/// directory) to where it is kept now (`path`), when only the old one exists; true if it moved.
pub fn adopt_legacy_key(path: &Path, legacy: &Path) -> std::io::Result<bool> {
    if path.exists() || !legacy.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::rename(legacy, path).is_err() {
        // Another file system (the data directory is a mount of its own): copied, made durable,
        // then removed from the data.
        let staged = path.with_extension("moving");
        std::fs::copy(legacy, &staged)?;
        std::fs::File::open(&staged)?.sync_all()?;
        std::fs::rename(&staged, path)?;
        std::fs::remove_file(legacy)?;
    }
    Ok(true)
}

/// `path` made absolute against the working directory, with `.` and `..` taken out lexically.
fn normalized(path: &Path) -> std::path::PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut clean = std::path::PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    clean
}

/// Checks, before a tier opens anything, that each of its key files (`(configuration key, path,
/// legacy path)`) lies outside `data_dir`, and moves one that an earlier version kept inside it
/// by default to where it is kept now. Returns the moves made, for the log; the error names the
/// configuration key and the file.
pub fn place_keys(
    data_dir: &Path,
    files: &[(&str, std::path::PathBuf, std::path::PathBuf)],
) -> Result<Vec<(std::path::PathBuf, std::path::PathBuf)>, String> {
    // Compared absolute and normalized and, where they exist, resolved (links).
    let resolved = |p: &Path| -> std::path::PathBuf {
        p.canonicalize()
            .ok()
            .or_else(|| {
                let parent = p.parent()?.canonicalize().ok()?;
                Some(parent.join(p.file_name()?))
            })
            .unwrap_or_else(|| normalized(p))
    };
    let (data, data_resolved) = (normalized(data_dir), resolved(data_dir));
    let mut moved = Vec::new();
    for (key, path, legacy) in files {
        let inside = normalized(path).starts_with(&data)
            || resolved(path).starts_with(&data_resolved)
            || resolved(path).starts_with(&data);
        if inside {
            return Err(format!(
                "{key} {} is inside data_dir {}: keep keys outside it (a copy or a backup of the \
                 data would carry them)",
                path.display(),
                data_dir.display()
            ));
        }
        if adopt_legacy_key(path, legacy)
            .map_err(|e| format!("moving {} to {}: {e}", legacy.display(), path.display()))?
        {
            moved.push((legacy.clone(), path.clone()));
        }
    }
    Ok(moved)
}

/// Reads a 32-byte secret key file or, when it is missing and `create_if_missing`, creates it
/// with fresh random bytes, readable by its owner only. A key file others may read is refused,
/// naming it.
pub fn key_file(path: &Path, create_if_missing: bool) -> Result<[u8; KEY_LEN], SealError> {
    let fail = |detail: String| SealError::KeyFile {
        path: path.to_owned(),
        detail,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(path)
                    .map_err(|e| fail(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(fail(format!(
                        "is readable by others (mode {:o}); make it owner-only (chmod 600)",
                        mode & 0o777
                    )));
                }
            }
            bytes.as_slice().try_into().map_err(|_| {
                fail(format!(
                    "holds {} bytes; a key file is exactly {KEY_LEN} random bytes",
                    bytes.len()
                ))
            })
        }
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
    fn keys_live_beside_the_data_never_in_it_and_only_their_owner_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("hub");
        assert_eq!(default_keys_dir(&data), dir.path().join("hub-keys"));
        // A key file readable by others is refused, naming it.
        let key = dir.path().join("hub-keys/signing.key");
        key_file(&key, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
            let refused = key_file(&key, false).unwrap_err().to_string();
            assert!(
                refused.contains("signing.key") && refused.contains("640"),
                "{refused}"
            );
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(key_file(&key, false).is_ok());
        }
        // Configured inside the data directory: refused, naming the key.
        let inside = [(
            "template_key_file",
            data.join("k/t.key"),
            data.join("keys/t.key"),
        )];
        let refused = place_keys(&data, &inside).unwrap_err();
        assert!(refused.contains("template_key_file"), "{refused}");
        std::fs::create_dir_all(&data).unwrap();
        let sneaky = [(
            "template_key_file",
            dir.path().join("hub/../hub/t.key"),
            data.join("keys/t.key"),
        )];
        assert!(
            place_keys(&data, &sneaky).is_err(),
            "resolved, it is inside"
        );
        // A data directory named "." has its keys beside it, not in it.
        let here = default_keys_dir(Path::new("."));
        let cwd = std::env::current_dir().unwrap();
        assert!(!here.starts_with(&cwd), "{here:?}");
        // Where an earlier version kept it by default, it is moved out once.
        let legacy = data.join("keys/templates.key");
        key_file(&legacy, true).unwrap();
        let before = std::fs::read(&legacy).unwrap();
        let outside = dir.path().join("hub-keys/templates.key");
        let files = [("template_key_file", outside.clone(), legacy.clone())];
        assert_eq!(
            place_keys(&data, &files).unwrap(),
            vec![(legacy.clone(), outside.clone())]
        );
        assert_eq!(std::fs::read(&outside).unwrap(), before);
        assert!(!legacy.exists());
        assert!(place_keys(&data, &files).unwrap().is_empty());
    }

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
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let err = Sealer::from_key_file(&short, true).unwrap_err();
        assert!(err.to_string().contains("exactly 32"), "{err}");
    }
}
