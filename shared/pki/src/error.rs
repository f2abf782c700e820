//! What can go wrong with certificates and keys.

use std::path::PathBuf;

/// A PKI operation or a tier's TLS set-up that failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A private key that users other than its owner can read.
    #[error("private key file {path} is readable by others (mode {mode:o}); run chmod 600 {path}")]
    KeyReadableByOthers {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file that does not hold what it should.
    #[error("{path}: {detail}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A request that cannot be carried out (bad id, existing CA...).
    #[error("{0}")]
    Invalid(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the material.
    #[error("tls: {0}")]
    Tls(String),
}

impl PkiError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
        move |source| PkiError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn bad(path: &std::path::Path, detail: impl Into<String>) -> PkiError {
        PkiError::BadFile {
            path: path.to_owned(),
            detail: detail.into(),
        }
    }
}
