//! What goes wrong in the terminal's library: its frame and code sources.

/// Why a camera or a code scanner gave nothing: the device or stream cannot be used. The
/// checkout answers `camera_unavailable` or `scanner_unavailable` with this text; the metric
/// `facepay_edge_source_errors_total` counts it by [`SourceError::kind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The device or stream cannot be opened: missing, not permitted, refused, unreachable.
    #[error("{what} cannot be opened: {detail}")]
    Unavailable {
        /// The source, with its path or URL (`camera /dev/video0`).
        what: String,
        /// What the system said.
        detail: String,
    },
    /// It worked, then stopped: unplugged, a read failed, the connection was lost and not
    /// regained.
    #[error("{what} stopped: {detail}")]
    Stopped {
        /// The source, with its path or URL.
        what: String,
        /// What the system said.
        detail: String,
    },
    /// Open, but no frame came for the stall timeout.
    #[error("{what} stalled: no frame for {after_ms} ms")]
    Stalled {
        /// The source, with its path or URL.
        what: String,
        /// The stall timeout that ran out.
        after_ms: u64,
    },
    /// It answers, but not with what it was configured for (not a terminal, a pixel format it
    /// refused, an HTTP error or a response that is no MJPEG stream, a part over the limit).
    #[error("{what} is not usable: {detail}")]
    Unusable {
        /// The source, with its path or URL.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

impl SourceError {
    /// Every [`SourceError::kind`], for the metric's closed label set.
    pub const KINDS: [&'static str; 4] = ["unavailable", "stopped", "stalled", "unusable"];

    /// The error's kind, a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Unavailable { .. } => "unavailable",
            SourceError::Stopped { .. } => "stopped",
            SourceError::Stalled { .. } => "stalled",
            SourceError::Unusable { .. } => "unusable",
        }
    }

    /// A source that cannot be opened.
    pub fn unavailable(what: &str, detail: impl std::fmt::Display) -> Self {
        SourceError::Unavailable {
            what: what.to_owned(),
            detail: detail.to_string(),
        }
    }

    /// A source that stopped.
    pub fn stopped(what: &str, detail: impl std::fmt::Display) -> Self {
        SourceError::Stopped {
            what: what.to_owned(),
            detail: detail.to_string(),
        }
    }

    /// A source that gives something else than it should.
    pub fn unusable(what: &str, detail: impl std::fmt::Display) -> Self {
        SourceError::Unusable {
            what: what.to_owned(),
            detail: detail.to_string(),
        }
    }
}
