use thiserror::Error;

/// A message that could not be read off the wire.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Not JSON, or not the expected message shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A peer speaking another protocol version.
    #[error("unsupported protocol version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version found in the envelope.
        got: u16,
        /// Version this build speaks.
        supported: u16,
    },
}

/// A field of a message that is well-formed JSON but not an acceptable value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// Identifier empty or too long.
    #[error("{kind} must be 1 to {max} characters long, got {len}")]
    IdLength {
        /// Which identifier.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// Identifier with a character that cannot go into a topic or key expression.
    #[error(
        "{kind} {id:?} contains {character:?}; only letters, digits, '_', '-' and '.' are allowed"
    )]
    IdCharacter {
        /// Which identifier.
        kind: &'static str,
        /// The identifier.
        id: String,
        /// The first offending character.
        character: char,
    },
    /// Amount not a positive integer in range.
    #[error("amount_minor must be an integer from 1 to {max}, got {got}")]
    Amount {
        /// What was received, as text.
        got: String,
        /// The largest accepted amount.
        max: i64,
    },
    /// A payment id outside the namespace of the store that sent it (`<store>:<order>`).
    #[error("payment id {payment_id:?} is not one of store {store_id:?} (<store>:<order>)")]
    ForeignPayment {
        /// The store that sent it.
        store_id: String,
        /// The payment id named (cut short when long).
        payment_id: String,
    },
    /// Evidence of the payer out of shape.
    #[error("{kind} has {len} items, expected {expected}")]
    Evidence {
        /// Which evidence.
        kind: &'static str,
        /// What it has.
        len: usize,
        /// What it should have (at most, for a code's characters).
        expected: usize,
    },
    /// Not an ISO 4217 currency this system knows.
    #[error("unknown currency {0:?}; expected an ISO 4217 code such as \"EUR\"")]
    UnknownCurrency(String),
}
