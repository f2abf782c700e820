//! Face payment messages: the cash register's verify API, edge -> hub verification, hub <-> cloud
//! identification and template distribution, and the enrollment API.

use serde::{Deserialize, Serialize};

use crate::DeclineReason;

/// Length of an SFace embedding.
pub const EMBEDDING_LEN: usize = 128;

/// Which second factor a customer chose at enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecondFactorKind {
    /// The customer's PIN (4 to 8 digits).
    Pin,
    /// The last four digits of the customer's phone number.
    PhoneLast4,
}

impl SecondFactorKind {
    /// The stable snake_case code.
    pub fn as_str(&self) -> &'static str {
        match self {
            SecondFactorKind::Pin => "pin",
            SecondFactorKind::PhoneLast4 => "phone_last4",
        }
    }
}

/// Checks that an embedding has the right length, finite values and unit norm (within rounding).
pub fn validate_embedding(embedding: &[f32]) -> Result<(), String> {
    if embedding.len() != EMBEDDING_LEN {
        return Err(format!(
            "embedding has {} values, expected {EMBEDDING_LEN}",
            embedding.len()
        ));
    }
    if embedding.iter().any(|v| !v.is_finite()) {
        return Err("embedding has a non-finite value".into());
    }
    let norm: f32 = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
    if !(0.99..=1.01).contains(&norm) {
        return Err(format!("embedding is not L2-normalised (norm {norm:.3})"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cash register -> edge
// ---------------------------------------------------------------------------------------------

/// How the customer proves who they are at `POST /v1/verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMethod {
    /// The camera identifies the customer among the enrolled (1:N).
    Face,
    /// The QR code names the account; the camera confirms the payer is its owner (1:1).
    CodeAndFace,
}

/// `POST /v1/verify`: identify the customer at the terminal and get a payment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyStart {
    /// Face only, or code and face.
    pub method: VerifyMethod,
}

/// `POST /v1/verify/second-factor`: answer the challenge a verification asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondFactorAnswer {
    /// The challenge id from the `second_factor_required` answer.
    pub challenge_id: String,
    /// The digits the customer typed.
    pub value: String,
}

// ---------------------------------------------------------------------------------------------
// Edge -> hub (Zenoh query/reply on the verify key)
// ---------------------------------------------------------------------------------------------

/// An edge asks its hub to verify a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// The store.
    pub store_id: String,
    /// The terminal; the token is bound to it.
    pub terminal_id: String,
    /// What is verified.
    pub body: VerifyBody,
}

/// What an edge asks to verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VerifyBody {
    /// Identify this face among the enrolled.
    Face {
        /// The live face's embedding.
        embedding: Vec<f32>,
    },
    /// Confirm this face belongs to the account the payment code names.
    CodeAndFace {
        /// The payment code text.
        code: String,
        /// The live face's embedding.
        embedding: Vec<f32>,
    },
    /// The customer's answer to a second-factor challenge.
    SecondFactor(SecondFactorAnswer),
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum VerifyReply {
    /// The payer is known: a single-use token to charge with.
    Verified {
        /// The payment token: spend it with `POST /v1/charge`.
        token: String,
        /// The account it charges.
        account_id: String,
        /// When the token stops being accepted (milliseconds since the Unix epoch).
        expires_at_ms: u64,
    },
    /// Two enrolled faces are close, or the match is in the grey zone: ask the customer.
    SecondFactorRequired {
        /// Answer with this id.
        challenge_id: String,
        /// What to ask for.
        kind: SecondFactorKind,
        /// When the challenge stops being accepted.
        expires_at_ms: u64,
    },
    /// Not verified.
    Refused {
        /// Why.
        reason: DeclineReason,
        /// Human-readable detail.
        detail: String,
    },
}

impl VerifyReply {
    /// A refusal.
    pub fn refused(reason: DeclineReason, detail: impl Into<String>) -> Self {
        VerifyReply::Refused {
            reason,
            detail: detail.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hub <-> cloud
// ---------------------------------------------------------------------------------------------

/// A hub asks the cloud about a face its hot set does not hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudIdentify {
    /// The live face's embedding.
    pub embedding: Vec<f32>,
    /// For a 1:1 check: the account whose templates to return. `None` searches everyone (1:N).
    pub account_id: Option<String>,
}

/// The cloud's answer to a [`CloudIdentify`]: the best-scoring accounts' hot-set entries, so the
/// hub decides with its own rule and caches them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudIdentified {
    /// Up to two accounts, best first (1:N), or the named account (1:1); empty when none.
    pub candidates: Vec<HotEntry>,
}

/// One customer's face templates and second factor, as a hub keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HotEntry {
    /// The customer's account.
    pub account_id: String,
    /// The store the customer enrolled at.
    pub home_store_id: String,
    /// Template id and L2-normalised embedding of each enrolled photo.
    pub templates: Vec<(u64, Vec<f32>)>,
    /// Which second factor to ask.
    pub second_factor: SecondFactorKind,
    /// Argon2id PHC string of the second factor.
    pub second_factor_hash: String,
}

/// One change of the template distribution log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TemplateChange {
    /// A customer's current entry (added or changed).
    Upsert(HotEntry),
    /// The customer was erased: drop every template of the account.
    Revoke {
        /// The erased account.
        account_id: String,
    },
}

/// A versioned template change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateUpdate {
    /// Cloud-wide monotone version.
    pub version: u64,
    /// The change.
    pub change: TemplateChange,
}

/// A batch of template changes, sent on request and pushed on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateBatch {
    /// Changes in version order.
    pub updates: Vec<TemplateUpdate>,
    /// Highest version the batch covers (also when it skips other stores' changes).
    pub up_to_version: u64,
    /// True when more changes follow.
    pub more: bool,
}

// ---------------------------------------------------------------------------------------------
// Enrollment API (cloud, HTTPS)
// ---------------------------------------------------------------------------------------------

/// `POST /v1/customers`: enroll a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCustomer {
    /// The customer's account id.
    pub customer_id: String,
    /// Full name.
    pub name: String,
    /// Phone number, digits with an optional leading `+`, spaces allowed.
    pub phone: String,
    /// PIN, 4 to 8 digits; stored only as a salted Argon2id hash.
    pub pin: String,
    /// Which second factor to ask when a face match is not conclusive.
    pub second_factor: SecondFactorKind,
    /// The store the customer enrolls at: its hub holds the templates.
    pub home_store_id: String,
    /// Account currency.
    pub currency: String,
    /// Opening balance in minor units.
    #[serde(default)]
    pub initial_balance_minor: i64,
    /// Wallet public key for code payments (base64url), optional.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// `POST /v1/customers/{id}/faces`: add an enrollment photo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddFace {
    /// The photo (JPEG, PNG or WebP), base64.
    pub image_base64: String,
    /// Accounts an operator has confirmed are other people who look alike (twins): a close match
    /// to them is not a duplicate. Payments then ask those accounts for the second factor.
    #[serde(default)]
    pub confirmed_look_alike_of: Vec<String>,
}

/// A customer as the enrollment API reports them (no secrets, no templates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    /// Account id.
    pub customer_id: String,
    /// Name.
    pub name: String,
    /// Phone, masked but for the last four digits.
    pub phone_masked: String,
    /// The second factor asked.
    pub second_factor: SecondFactorKind,
    /// Home store.
    pub home_store_id: String,
    /// Number of enrolled face templates.
    pub faces: usize,
}

/// The answer to adding a face.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceAdded {
    /// The new template's id.
    pub template_id: u64,
    /// Liveness score of the photo.
    pub liveness: f32,
    /// Templates the customer now has.
    pub faces: usize,
}
