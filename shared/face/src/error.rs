use serde::Serialize;
use thiserror::Error;

/// Input that cannot be analysed at all, or a model that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FaceError {
    /// Zero bytes.
    #[error("empty image file")]
    Empty,
    /// Not an image format this system decodes (JPEG, PNG, WebP).
    #[error("not a JPEG, PNG or WebP image")]
    NotAnImage,
    /// Larger than the limit; refused from its header, before decoding into memory.
    #[error("image is {width}x{height}, over the {max}x{max} limit")]
    TooLarge {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit per side.
        max: u32,
    },
    /// The file is damaged (truncated, corrupt).
    #[error("image cannot be decoded: {0}")]
    Corrupt(String),
    /// A model file is missing, altered, or cannot run.
    #[error("face model: {0}")]
    Model(String),
}

/// Why a usable image was still refused for payment or enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// No face found.
    NoFace,
    /// Two faces of similar size and centrality: the payer is ambiguous.
    MultipleFaces,
    /// The face is smaller than the configured minimum.
    FaceTooSmall,
    /// The face extends past the frame border.
    FaceCutByBorder,
    /// The face is too blurred (low Laplacian variance).
    TooBlurred,
    /// The face is too dark.
    TooDark,
    /// The face is over-exposed.
    TooBright,
    /// The head is turned or tilted too far (from the landmarks).
    HeadTurned,
    /// Eye, nose and mouth landmarks are not in a plausible arrangement.
    ImplausibleLandmarks,
    /// A photo or a screen held to the camera, not a live face.
    NotLive,
}

impl Refusal {
    /// The stable snake_case code.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::NoFace => "no_face",
            Refusal::MultipleFaces => "multiple_faces",
            Refusal::FaceTooSmall => "face_too_small",
            Refusal::FaceCutByBorder => "face_cut_by_border",
            Refusal::TooBlurred => "too_blurred",
            Refusal::TooDark => "too_dark",
            Refusal::TooBright => "too_bright",
            Refusal::HeadTurned => "head_turned",
            Refusal::ImplausibleLandmarks => "implausible_landmarks",
            Refusal::NotLive => "not_live",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
