use thiserror::Error;

/// Why a payment code was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodeError {
    /// The QR code does not carry a facepay code at all.
    #[error("not a facepay payment code")]
    NotFacepay,
    /// A facepay code that is damaged or truncated.
    #[error("malformed payment code: {0}")]
    Malformed(String),
    /// The signature does not match the account's key.
    #[error("payment code signature does not match the account's key")]
    BadSignature,
    /// Past its validity window.
    #[error("payment code expired {expired_ms_ago} ms ago")]
    Expired {
        /// How long ago it expired.
        expired_ms_ago: u64,
    },
    /// Issued in the future beyond the clock-skew tolerance.
    #[error("payment code is issued {ahead_ms} ms in the future")]
    NotYetValid {
        /// How far ahead.
        ahead_ms: u64,
    },
    /// A public key that is not a valid Ed25519 key.
    #[error("public key is not a base64url Ed25519 key")]
    BadPublicKey,
    /// A wallet file that cannot be used.
    #[error("wallet file: {0}")]
    Wallet(String),
}

impl CodeError {
    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        CodeError::Malformed(detail.into())
    }

    /// The decline reason this error maps to on the wire.
    pub fn decline_reason(&self) -> protocol::DeclineReason {
        use protocol::DeclineReason as R;
        match self {
            CodeError::NotFacepay => R::NotFacepayCode,
            CodeError::Malformed(_) => R::MalformedCode,
            CodeError::BadSignature => R::BadSignature,
            CodeError::Expired { .. } => R::CodeExpired,
            CodeError::NotYetValid { .. } => R::CodeNotYetValid,
            CodeError::BadPublicKey | CodeError::Wallet(_) => R::Internal,
        }
    }
}
