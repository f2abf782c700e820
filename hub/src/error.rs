use thiserror::Error;

/// What can go wrong inside the hub.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HubError {
    /// The journal's store failed.
    #[error("journal storage: {0}")]
    Storage(String),
    /// The cloud is not connected; the request was not sent.
    #[error("cloud unreachable: not connected to the broker")]
    CloudDisconnected,
    /// The cloud did not answer before the deadline.
    #[error("cloud did not answer within {0} ms")]
    CloudTimeout(u64),
    /// The link to the broker dropped after the request was sent, before an answer came: the
    /// cloud may or may not have acted on it.
    #[error("cloud link lost while waiting for the answer")]
    LinkLost,
    /// Too many requests already wait for the cloud.
    #[error("too many requests waiting for the cloud")]
    UplinkSaturated,
    /// The cloud had no room for the request and did not serve it (a copy of it may still have
    /// been served: unknown, like no answer).
    #[error("cloud busy: {0}")]
    CloudBusy(String),
    /// The circuit breaker is open: recent requests got no answer; this one was not sent.
    #[error("cloud unreachable: recent requests went unanswered; next try in {0} ms")]
    CircuitOpen(u64),
}
