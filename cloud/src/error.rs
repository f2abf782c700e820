use thiserror::Error;

/// A ledger operation that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LedgerError {
    /// The store under the ledger failed; nothing was applied.
    #[error("ledger storage: {0}")]
    Storage(String),
    /// The request is not acceptable.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Something the ledger needs besides its own store could not be read (the customer store,
    /// for a payer's face); nothing was applied, and the ledger carries on.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This instance no longer holds the store's lease (another instance took it): nothing was
    /// written; the holder serves the store.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The request contradicts what the ledger already holds.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The ledger's books disagree with themselves (a stored balance is not what its transfers
    /// make): a broken invariant, reported, never papered over.
    #[error("the books are broken: {0}")]
    Broken(String),
}
