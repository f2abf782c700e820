//! Bearer tokens kept in files: the enrollment API's operator token, a cash register's token.

use std::path::Path;

use sha2::Digest as _;

use crate::PkiError;

/// Shortest token accepted.
pub const MIN_TOKEN_CHARS: usize = 32;

/// The token in `path`, or a new random one written there (64 hex characters, owner-only) when
/// the file does not exist. Returns its SHA-256, which is all a server keeps. A token file others
/// can read is refused, like a private key.
pub fn token_digest(path: &Path) -> Result<[u8; 32], PkiError> {
    let token = match std::fs::read_to_string(path) {
        Ok(text) => {
            crate::check_key_permissions(path)?;
            text.trim().to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore as _;
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(PkiError::io(dir))?;
            }
            crate::issue::write_private(path, token.as_bytes())?;
            token
        }
        Err(e) => return Err(PkiError::io(path)(e)),
    };
    if token.len() < MIN_TOKEN_CHARS {
        return Err(PkiError::bad(
            path,
            format!(
                "holds a token of {} characters; use at least {MIN_TOKEN_CHARS}",
                token.len()
            ),
        ));
    }
    Ok(sha2::Sha256::digest(token.as_bytes()).into())
}

/// Whether an `Authorization` header value is `Bearer <token>` for the token of `digest`.
/// Digests are compared, so timing tells nothing about the token.
pub fn bearer_matches(header: Option<&str>, digest: &[u8; 32]) -> bool {
    let given = header.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    sha2::Sha256::digest(given.trim().as_bytes()).as_slice() == digest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_checked_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/token");
        let digest = token_digest(&path).unwrap();
        assert_eq!(
            token_digest(&path).unwrap(),
            digest,
            "kept, not regenerated"
        );
        let token = std::fs::read_to_string(&path).unwrap();
        assert!(bearer_matches(Some(&format!("Bearer {token}")), &digest));
        assert!(!bearer_matches(Some("Bearer nope"), &digest));
        assert!(!bearer_matches(None, &digest));
        std::fs::write(dir.path().join("short"), "abc").unwrap();
        crate::issue::write_private(&dir.path().join("short"), b"abc").unwrap();
        assert!(token_digest(&dir.path().join("short")).is_err());
    }
}
