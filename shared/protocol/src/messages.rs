use serde::{Deserialize, Serialize};

use crate::{AccountId, CodeNonce, OrderId, PaymentId, StoreId, TerminalId};

use crate::Currency;

/// Why a payment was refused. The snake_case name is the stable code on every API and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// A QR code was read but it is not a well-formed facepay payment code.
    MalformedCode,
    /// A QR code from something else (a URL, a product label).
    NotFacepayCode,
    /// The signature does not match the account's public key.
    BadSignature,
    /// The code's validity window has passed.
    CodeExpired,
    /// The code claims to be issued further in the future than the clock-skew tolerance.
    CodeNotYetValid,
    /// The code was already used for another payment.
    CodeReplayed,
    /// No such account, or its key is unknown to the store.
    UnknownAccount,
    /// Amount zero, negative, fractional or too large.
    InvalidAmount,
    /// Not an ISO 4217 currency this system knows.
    UnknownCurrency,
    /// The account holds another currency.
    CurrencyMismatch,
    /// The balance does not cover the amount.
    InsufficientFunds,
    /// The order id was already used with other fields (amount, currency or account).
    DuplicateOrderId,
    /// No payment code was presented before the scan deadline.
    NoCodePresented,
    /// The terminal is running another checkout session; nothing was done for this order.
    TerminalBusy,
    /// The store's hub holds as many open verifications (payment tokens, second-factor
    /// challenges) as it may; nothing was done: verify the customer again in a moment.
    HubBusy,
    /// This terminal sent the hub more requests than its rate allows; the hub did not look at
    /// this one. For a charge, never a decline: charge the same order id again in a moment to
    /// learn its outcome (an earlier request for it may have been decided).
    RateLimited,
    /// This order is being charged right now (by another request for it): its outcome is not
    /// known yet. Never a decline: charge the same order id again to learn it.
    PaymentInProgress,
    /// The store system failed while it handled this payment (its payment actor stopped): the
    /// outcome is not known yet. Never a decline: charge the same order id again to learn it (a
    /// restarted hub voids what it left undecided).
    OutcomeUnknown,
    /// The edge could not reach its store hub.
    StoreSystemUnreachable,
    /// The hub could not reach the cloud in time; nothing was charged.
    CloudUnreachable,
    /// A peer spoke another protocol version.
    UnsupportedVersion,
    /// The request was not understood (missing field, bad identifier).
    InvalidRequest,
    /// A fault inside facepay; nothing was charged.
    Internal,
    /// No usable face was seen before the capture deadline (none, too small, turned, blurred...).
    NoFacePresented,
    /// The face shown is a photo, a screen or a mask, not a live person.
    SpoofSuspected,
    /// The face matches no enrolled customer closely enough.
    FaceNotRecognized,
    /// The face does not match the account named by the payment code.
    FaceMismatch,
    /// The second factor (PIN or phone digits) was wrong.
    SecondFactorWrong,
    /// Too many wrong second factors: face payment is locked for this account for a while.
    FacePaymentLocked,
    /// The payment token is unknown, expired, already spent, or bound to another terminal.
    TokenInvalid,
    /// Offline: the amount is above the per-payment ceiling for offline approval.
    OfflineAmountOverLimit,
    /// Offline: the account has no allowance at this store, or it is spent.
    OfflineAllowanceExceeded,
    /// Offline: the store's total unreconciled offline exposure would pass its ceiling.
    OfflineStoreLimitReached,
    /// The account is in debt or closed: no offline payment until it is settled (for a refund:
    /// the customer's account is closed).
    AccountBlocked,
    /// The terminal's camera is missing, stopped or stalled: no face can be seen; code payments
    /// still work.
    CameraUnavailable,
    /// The terminal's code scanner is missing, stopped or stalled: no code can be read.
    ScannerUnavailable,
    /// Refund: the store has no payment for this order (never paid, declined, or moved back).
    PaymentNotFound,
    /// Refund: the payment is not final yet (its confirmation has not reached the cloud); try
    /// again in a moment.
    PaymentNotSettled,
    /// Refund: the payment was approved offline and the store has not reconciled it with the
    /// cloud yet; refund it once the store is reconnected and its backlog applied.
    PaymentNotReconciled,
    /// Refund: the amount is more than what was paid minus earlier refunds.
    RefundExceedsPayment,
    /// Refund: the refund id was already used with other fields (order, amount or currency).
    DuplicateRefundId,
}

impl DeclineReason {
    /// Every reason, for metric pre-registration and tests.
    pub const ALL: &'static [DeclineReason] = &[
        Self::MalformedCode,
        Self::NotFacepayCode,
        Self::BadSignature,
        Self::CodeExpired,
        Self::CodeNotYetValid,
        Self::CodeReplayed,
        Self::UnknownAccount,
        Self::InvalidAmount,
        Self::UnknownCurrency,
        Self::CurrencyMismatch,
        Self::InsufficientFunds,
        Self::DuplicateOrderId,
        Self::NoCodePresented,
        Self::TerminalBusy,
        Self::HubBusy,
        Self::RateLimited,
        Self::PaymentInProgress,
        Self::OutcomeUnknown,
        Self::StoreSystemUnreachable,
        Self::CloudUnreachable,
        Self::UnsupportedVersion,
        Self::InvalidRequest,
        Self::Internal,
        Self::NoFacePresented,
        Self::SpoofSuspected,
        Self::FaceNotRecognized,
        Self::FaceMismatch,
        Self::SecondFactorWrong,
        Self::FacePaymentLocked,
        Self::TokenInvalid,
        Self::OfflineAmountOverLimit,
        Self::OfflineAllowanceExceeded,
        Self::OfflineStoreLimitReached,
        Self::AccountBlocked,
        Self::CameraUnavailable,
        Self::ScannerUnavailable,
        Self::PaymentNotFound,
        Self::PaymentNotSettled,
        Self::PaymentNotReconciled,
        Self::RefundExceedsPayment,
        Self::DuplicateRefundId,
    ];

    /// Whether the reason says the outcome is not known yet (a hub's answer with it is no
    /// decline: the register hears `unknown`).
    pub fn is_unknown_outcome(&self) -> bool {
        matches!(
            self,
            Self::PaymentInProgress | Self::OutcomeUnknown | Self::RateLimited
        )
    }

    /// The reason's wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MalformedCode => "malformed_code",
            Self::NotFacepayCode => "not_facepay_code",
            Self::BadSignature => "bad_signature",
            Self::CodeExpired => "code_expired",
            Self::CodeNotYetValid => "code_not_yet_valid",
            Self::CodeReplayed => "code_replayed",
            Self::UnknownAccount => "unknown_account",
            Self::InvalidAmount => "invalid_amount",
            Self::UnknownCurrency => "unknown_currency",
            Self::CurrencyMismatch => "currency_mismatch",
            Self::InsufficientFunds => "insufficient_funds",
            Self::DuplicateOrderId => "duplicate_order_id",
            Self::NoCodePresented => "no_code_presented",
            Self::TerminalBusy => "terminal_busy",
            Self::HubBusy => "hub_busy",
            Self::RateLimited => "rate_limited",
            Self::PaymentInProgress => "payment_in_progress",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::StoreSystemUnreachable => "store_system_unreachable",
            Self::CloudUnreachable => "cloud_unreachable",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InvalidRequest => "invalid_request",
            Self::Internal => "internal",
            Self::NoFacePresented => "no_face_presented",
            Self::SpoofSuspected => "spoof_suspected",
            Self::FaceNotRecognized => "face_not_recognized",
            Self::FaceMismatch => "face_mismatch",
            Self::SecondFactorWrong => "second_factor_wrong",
            Self::FacePaymentLocked => "face_payment_locked",
            Self::TokenInvalid => "token_invalid",
            Self::OfflineAmountOverLimit => "offline_amount_over_limit",
            Self::OfflineAllowanceExceeded => "offline_allowance_exceeded",
            Self::OfflineStoreLimitReached => "offline_store_limit_reached",
            Self::AccountBlocked => "account_blocked",
            Self::CameraUnavailable => "camera_unavailable",
            Self::ScannerUnavailable => "scanner_unavailable",
            Self::PaymentNotFound => "payment_not_found",
            Self::PaymentNotSettled => "payment_not_settled",
            Self::PaymentNotReconciled => "payment_not_reconciled",
            Self::RefundExceedsPayment => "refund_exceeds_payment",
            Self::DuplicateRefundId => "duplicate_refund_id",
        }
    }
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of an authorization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Decision {
    /// Money moved (or had already moved for this payment id).
    Approved {
        /// The account charged.
        account_id: AccountId,
        /// True when this payment id had already been approved before: nothing moved this time.
        already_paid: bool,
    },
    /// Nothing moved.
    Declined {
        /// Machine-readable reason.
        reason: DeclineReason,
        /// Human-readable detail.
        detail: String,
    },
}

impl Decision {
    /// A decline with a reason and detail.
    pub fn declined(reason: DeclineReason, detail: impl Into<String>) -> Self {
        Decision::Declined {
            reason,
            detail: detail.into(),
        }
    }

    /// The decline reason, or `None` when approved.
    pub fn reason(&self) -> Option<DeclineReason> {
        match self {
            Decision::Approved { .. } => None,
            Decision::Declined { reason, .. } => Some(*reason),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cash register -> edge (local HTTP JSON API)
// ---------------------------------------------------------------------------------------------

/// `POST /v1/charge`: charge an order with the payment code the customer presents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargeRequest {
    /// The merchant's order id, unique per store; the idempotency key of the payment.
    pub order_id: OrderId,
    /// Amount in minor units. Kept as raw JSON so that zero, negative, fractional and overflowing
    /// amounts get a precise refusal instead of a generic parse error.
    pub amount_minor: serde_json::Value,
    /// ISO 4217 code.
    pub currency: String,
    /// A payment token from `POST /v1/verify`: the charge spends it instead of scanning a code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Whether a charge was approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeStatus {
    /// Paid.
    Approved,
    /// Not paid by this request; see the reason.
    Declined,
    /// The terminal cannot tell whether the order was paid: the store's systems may have acted
    /// on the request without answering (`store_system_unreachable`), or the order is being
    /// charged by another request right now (`payment_in_progress`). Never a decline: charge
    /// the same order id again to learn the outcome.
    Unknown,
}

/// The answer to `POST /v1/charge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeResult {
    /// Echo of the request's order id.
    pub order_id: OrderId,
    /// The payment id, once the request was valid enough to have one.
    pub payment_id: Option<PaymentId>,
    /// Approved, declined, or unknown.
    pub status: ChargeStatus,
    /// Why it was declined.
    pub reason: Option<DeclineReason>,
    /// Human-readable detail for the cashier.
    pub detail: String,
    /// The account charged, when approved.
    pub account_id: Option<AccountId>,
    /// True when the order had already been paid: this call moved no money.
    pub already_paid: bool,
    /// Approved by the store's hub alone while the cloud was unreachable; the ledger applies it
    /// when the store reconnects.
    #[serde(default)]
    pub offline: bool,
}

impl ChargeResult {
    /// A decline of an order before any payment was attempted.
    pub fn declined(order_id: &str, reason: DeclineReason, detail: impl Into<String>) -> Self {
        ChargeResult {
            order_id: order_id.into(),
            payment_id: None,
            status: ChargeStatus::Declined,
            reason: Some(reason),
            detail: detail.into(),
            account_id: None,
            already_paid: false,
            offline: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Edge -> hub (Zenoh query/reply)
// ---------------------------------------------------------------------------------------------

/// An edge asks its hub to authorize a payment presented with a payment code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeRequest {
    /// `store_id:order_id`, see [`crate::payment_id`].
    pub payment_id: PaymentId,
    /// The store the terminal belongs to.
    pub store_id: StoreId,
    /// The terminal asking.
    pub terminal_id: TerminalId,
    /// The merchant's order id.
    pub order_id: OrderId,
    /// Validated amount in minor units.
    pub amount_minor: i64,
    /// Validated currency.
    pub currency: Currency,
    /// What proves the payer: a payment code or a payment token.
    pub proof: PaymentProof,
    /// The terminal's attestation of this payment ([`Attested`], sealed with its certificate
    /// key), which the hub forwards to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
}

/// What an edge presents as proof of the payer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum PaymentProof {
    /// The payment code text exactly as decoded from the QR code.
    Code(String),
    /// A single-use payment token the hub issued on a verified face (see [`crate::VerifyReply`]).
    Token(String),
}

/// The hub's answer to an [`AuthorizeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeReply {
    /// Echo of the request's payment id.
    pub payment_id: PaymentId,
    /// The decision.
    pub decision: Decision,
    /// Approved by the hub alone while the cloud was unreachable; reconciled later.
    #[serde(default)]
    pub offline: bool,
}

// ---------------------------------------------------------------------------------------------
// Hub <-> cloud (MQTT request/reply and broadcasts)
// ---------------------------------------------------------------------------------------------

/// A request from a store hub to the cloud, correlated with its reply by `request_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubRequest {
    /// Unique per hub process and request; echoed in the reply.
    pub request_id: u64,
    /// The hub's store.
    pub store_id: StoreId,
    /// What is asked.
    pub body: HubRequestBody,
}

/// What a hub asks of the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubRequestBody {
    /// Move money for a verified payment code.
    Authorize(CloudAuthorize),
    /// Undo, or pre-empt, a payment whose answer the hub did not get in time.
    Void(VoidPayment),
    /// Confirm payments the cloud approved and the hub journaled: their pending transfers are
    /// posted, and can no longer be voided or expire.
    Post(PostBatch),
    /// Send the account keys changed after `after_version`.
    KeySync {
        /// Highest key version the hub holds; 0 for none.
        after_version: u64,
    },
    /// Send the template changes for this store after `after_version`.
    TemplateSync {
        /// Highest template version the hub has synced; 0 for none.
        after_version: u64,
    },
    /// A face the hub's hot set does not know: search every enrolled customer (1:N), or fetch one
    /// account's templates for a 1:1 check.
    Identify(crate::CloudIdentify),
    /// Apply payments the hub approved offline (store-and-forward), once each.
    Reconcile(crate::OfflineBatch),
    /// The store's offline allowances, one page after this account id.
    AllowanceSync {
        /// Continue after this account id (`None`: from the start).
        after_account: Option<AccountId>,
    },
    /// A second-factor answer was checked at the hub: counted across the fleet (answered with
    /// `Lockouts`, and broadcast to every hub).
    SecondFactor(crate::FactorReport),
    /// What the ledger holds for one of the store's payments. Asked by a hub whose journal cannot
    /// tell whether it sent a payment before: a code issued before the journal began (its disk was
    /// lost) or before the nonces it pruned, presented again for an order it has no record of.
    PaymentStatus {
        /// The payment, in the store's namespace.
        payment_id: PaymentId,
    },
    /// Give back some or all of a payment to the account it charged, once per refund id (online
    /// only: the ledger decides).
    Refund(crate::Refund),
}

impl HubRequestBody {
    /// Served on the cloud's identity lane (1:N search, template sync), apart from the store's
    /// payments: a refusal there (`Busy`) says nothing about the payment path.
    pub fn is_identity(&self) -> bool {
        matches!(
            self,
            HubRequestBody::Identify(_)
                | HubRequestBody::TemplateSync { .. }
                | HubRequestBody::SecondFactor(_)
        )
    }
}

/// A verified payment for the cloud to apply to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudAuthorize {
    /// Idempotency key.
    pub payment_id: PaymentId,
    /// The customer account named by the code.
    pub account_id: AccountId,
    /// The single-use nonce of the proof (hex): the payment code's nonce, or the payment token's
    /// id. Single-use across the whole fleet.
    pub code_nonce: CodeNonce,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: Currency,
    /// Terminal that took the payment.
    pub terminal_id: TerminalId,
    /// Merchant order id.
    pub order_id: OrderId,
    /// What the store may still hold unreconciled for the account (see [`crate::OfflineReservation`]).
    #[serde(default)]
    pub offline_reservation: crate::OfflineReservation,
    /// For a token issued by code and face: the nonce of the payment code the face confirmed.
    /// The cloud burns it with this payment, so the code cannot pay again as a plain code at
    /// another store within its window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_code: Option<CodeNonce>,
    /// What proves the payer to the cloud itself, not only to the hub: a hub (or whoever holds
    /// its link key) cannot charge an account without its phone's code or its face.
    #[serde(default)]
    pub evidence: Box<PayerEvidence>,
}

/// Longest payment code text carried as evidence (a code is about 215 characters).
pub const MAX_CODE_TEXT: usize = 512;
/// Longest sealed attestation (a certificate, a signature, a face embedding and a code: about
/// 3 KB).
pub const MAX_ATTESTATION: usize = 16 * 1024;

/// What a terminal attests of a payment it takes, sealed with its certificate key for
/// [`crate::topics::attestation`]: the payment, the amount, and what the customer showed it (the
/// code scanned, the live face of the verification the payment's token came from). The cloud
/// takes the payer's evidence from here, not from the hub, so a hub (or whoever holds its keys)
/// can neither make evidence up nor move a terminal's to another payment or amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attested {
    /// The payment.
    pub payment_id: PaymentId,
    /// The account the terminal charges: the one the code names, or the one its verification
    /// found.
    pub account_id: AccountId,
    /// Its amount, minor units.
    pub amount_minor: i64,
    /// Its currency.
    pub currency: Currency,
    /// For a payment by face: the payment token charged (the attempt's nonce at the cloud), so
    /// the attestation is spent with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// What the customer showed.
    pub shown: PayerEvidence,
}

impl Attested {
    /// What a terminal attests for `request` when the customer showed `shown` (for a face
    /// payment, the request's nonce is the token charged).
    pub fn of(request: &CloudAuthorize, shown: PayerEvidence) -> Self {
        Attested {
            payment_id: request.payment_id.clone(),
            account_id: request.account_id.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency,
            token: shown
                .face_probe
                .is_some()
                .then(|| request.code_nonce.to_string()),
            shown,
        }
    }
}

/// What the payer showed at the terminal, carried to the cloud with an online payment, which
/// checks it when the payment is new: for a payment by code, the code (its signature against the
/// account's key, its window, its nonce the payment's); for a payment by face, the live face
/// (against the account's enrolled templates), and for code and face also the code the face
/// confirmed (its nonce the payment's `spent_code`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayerEvidence {
    /// The payment code text as the terminal decoded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_code: Option<String>,
    /// The live face's embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face_probe: Option<FaceProbe>,
    /// The second-factor answer the customer typed at the terminal, when the verification asked
    /// for one (attested, so a hub cannot skip the question it had to ask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_factor: Option<String>,
    /// The terminal's sealed [`Attested`] (the cloud takes the code and the face from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<String>,
}

/// A face embedding as the bits of its values (so that messages carrying it compare exactly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FaceProbe(Vec<u32>);

impl FaceProbe {
    /// The probe of an embedding.
    pub fn new(embedding: &[f32]) -> Self {
        FaceProbe(embedding.iter().map(|v| v.to_bits()).collect())
    }

    /// The embedding.
    pub fn embedding(&self) -> Vec<f32> {
        self.0.iter().map(|b| f32::from_bits(*b)).collect()
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A void: if the payment was applied, reverse it; if not, burn its code so it never applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoidPayment {
    /// The payment to void.
    pub payment_id: PaymentId,
    /// The customer account.
    pub account_id: AccountId,
    /// The code nonce of the attempt being voided.
    pub code_nonce: CodeNonce,
}

/// A post: the attempt the cloud approved, confirmed by the hub that journaled the approval.
pub type PostPayment = VoidPayment;

/// Most posts in one [`PostBatch`]; the cloud refuses larger batches.
pub const POST_BATCH_MAX: usize = 1_000;

/// Posts sent together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostBatch {
    /// The posts, in order.
    pub posts: Vec<PostPayment>,
}

/// The cloud's answer to a [`HubRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudReply {
    /// Echo of the request id.
    pub request_id: u64,
    /// The answer.
    pub body: CloudReplyBody,
}

/// What the cloud answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CloudReplyBody {
    /// Outcome of an authorization.
    Authorized {
        /// The payment.
        payment_id: PaymentId,
        /// The decision.
        decision: Decision,
        /// The account's offline allowance at this store, refreshed with every approval.
        #[serde(default)]
        allowance: Option<crate::Allowance>,
    },
    /// Answer to `Reconcile`: one result per entry.
    Reconciled {
        /// The results, in the batch's order.
        results: Vec<crate::ReconcileResult>,
    },
    /// Answer to `AllowanceSync`.
    Allowances(crate::AllowanceBatch),
    /// A void was recorded.
    Voided {
        /// The payment.
        payment_id: PaymentId,
        /// True when money had moved and was moved back.
        reversed: bool,
    },
    /// Posts were recorded, one result per post in order: false when the transfer was no longer
    /// pending for that attempt (it expired or was voided first), kept for the operator.
    Posted {
        /// The payments, in the request's order.
        payment_ids: Vec<PaymentId>,
        /// Whether each was posted.
        posted: Vec<bool>,
    },
    /// Account keys, oldest change first.
    Keys(KeyBatch),
    /// Template changes, oldest first.
    Templates(crate::TemplateBatch),
    /// The answer to an identify request.
    Identified(crate::CloudIdentified),
    /// Answer to `SecondFactor`: the accounts' lockout states after it.
    Lockouts(crate::LockoutBatch),
    /// Answer to `PaymentStatus`.
    PaymentStatus {
        /// The payment.
        payment_id: PaymentId,
        /// What the ledger holds for it.
        status: PaymentStatus,
    },
    /// Answer to `Refund`.
    Refunded {
        /// The refund.
        refund_id: String,
        /// The payment.
        payment_id: PaymentId,
        /// The decision.
        decision: crate::RefundDecision,
    },
    /// The request could not be processed.
    Error {
        /// Why.
        detail: String,
    },
    /// The cloud had no room for the request (its queue for the store, or for all stores, was
    /// full) and did not serve it. Another copy of the same request may still have been served,
    /// so for money it is as unknown as no answer; for the hub's circuit breaker it counts as a
    /// request the cloud did not answer.
    Busy {
        /// Why.
        detail: String,
    },
}

/// What the ledger holds for a payment, as a hub asking after it sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Charged for good: posted, or applied from an offline approval.
    Paid {
        /// The account charged.
        account_id: AccountId,
        /// The amount charged.
        amount_minor: i64,
        /// Its currency.
        currency: Currency,
    },
    /// Charged, not final: an attempt told "approved" may still be voided, or expire.
    Pending,
    /// Not charged: never seen, declined, or moved back (voided, expired).
    NotPaid,
}

/// A batch of account key changes, sent on request and broadcast on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBatch {
    /// The changes, in version order.
    pub entries: Vec<KeyEntry>,
    /// True when more changes follow after the last entry's version.
    pub more: bool,
}

/// The current public key of an account, or its revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Account.
    pub account_id: AccountId,
    /// Cloud-wide monotone version of this change.
    pub version: u64,
    /// Ed25519 public key (base64url, no padding); `None` when revoked.
    pub public_key: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Operator -> cloud (admin HTTP JSON API)
// ---------------------------------------------------------------------------------------------

/// Whose money an account holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// A shopper who pays.
    Customer,
    /// A store that is paid.
    Merchant,
    /// The cloud's own account per currency that opening balances are issued from; its balance is
    /// minus everything issued, so that all balances sum to zero.
    Issuance,
}

/// `POST /v1/accounts`: open an account, funded from the cloud's issuance account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccount {
    /// New account id.
    pub account_id: AccountId,
    /// Customer or merchant.
    pub kind: AccountKind,
    /// The account's currency.
    pub currency: Currency,
    /// Opening balance in minor units, moved from the issuance account.
    #[serde(default)]
    pub initial_balance_minor: i64,
    /// The customer's wallet public key (base64url): customers who pay with codes need one.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// An account as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    /// Account id.
    pub account_id: AccountId,
    /// Customer, merchant.
    pub kind: AccountKind,
    /// Currency.
    pub currency: Currency,
    /// Balance in minor units.
    pub balance_minor: i64,
    /// Wallet public key, for customers.
    pub public_key: Option<String>,
    /// True once the customer was erased: the account takes no more payments.
    #[serde(default)]
    pub closed: bool,
    /// The balance went below zero through offline payments: no offline allowance anywhere
    /// until a deposit settles it.
    #[serde(default)]
    pub in_debt: bool,
}

/// Registers (or rotates) the public key a store's hub signs offline approvals with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubKey {
    /// Ed25519 public key, URL-safe base64 without padding.
    pub public_key: String,
}

/// Money paid into a customer account (settling a debt, topping up), once per deposit id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deposit {
    /// Idempotency key: the same deposit again moves nothing.
    pub deposit_id: String,
    /// Amount in minor units, positive.
    pub amount_minor: i64,
}

/// A hub's answer to a terminal's query, signed with the key of the hub's certificate (see
/// `pki::signed_message`): a terminal acts only on answers whose signature checks against a hub
/// certificate of its store that is valid and not revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedHubReply {
    /// The encoded answer ([`AuthorizeReply`] or [`VerifyReply`] in its envelope), as text.
    pub reply: String,
    /// The hub's certificate, PEM.
    pub certificate_pem: String,
    /// Base64 ECDSA P-256 SHA-256 signature of the domain, the request's SHA-256 and `reply`.
    pub signature: String,
}

/// The fleet's certificate revocation list, as the cloud distributes it to the hubs. Receivers
/// check the CA's signature on it and keep it only when it is newer than theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationListPush {
    /// The CRL in PEM, as `facepay-pki` wrote it.
    pub crl_pem: String,
}

/// One money-moving operator action on the cloud's admin API, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who: the common name of the operator's certificate (or `enrollment-token` for the
    /// enrollment API's bearer token).
    pub operator: String,
    /// What: `open_account`, `deposit`, `set_hub_key`.
    pub action: String,
    /// On what: the account or store.
    pub target: String,
    /// The request's details (amount, deposit id, key).
    pub detail: String,
    /// `applied`, or why it was refused.
    pub outcome: String,
}

/// A ledger transfer as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferView {
    /// Transfer id: a payment id, `open:<account>` for funding, `<payment id>#void` for reversals.
    pub transfer_id: String,
    /// Account debited.
    pub debit_account_id: AccountId,
    /// Account credited.
    pub credit_account_id: AccountId,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: Currency,
    /// Milliseconds since the Unix epoch when applied.
    pub applied_at_ms: u64,
    /// An online payment its hub has not confirmed yet: a void or its expiry still moves it back.
    #[serde(default)]
    pub pending: bool,
}

/// A store hub's presence on the broker ([`crate::topics::store_presence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Connected (published by the hub), or gone (its last will, published by the broker).
    pub online: bool,
}

/// The stores whose leases a stopping cloud instance released
/// ([`crate::topics::lease_releases`]), sealed by that instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasesReleased {
    /// The stores.
    pub store_ids: Vec<StoreId>,
}

/// Totals over the whole ledger, per currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerTotals {
    /// Currency.
    pub currency: Currency,
    /// Sum of all transfer amounts, counted on their debit side.
    pub total_debits_minor: i64,
    /// Sum of all transfer amounts, counted on their credit side.
    pub total_credits_minor: i64,
    /// Sum of every account's balance, the issuance account included: zero when the books balance.
    pub sum_of_balances_minor: i64,
    /// Money issued into customer and merchant accounts.
    pub issued_minor: i64,
    /// Number of transfers.
    pub transfers: u64,
}
