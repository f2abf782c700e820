//! Refunds: the register's request, the terminal's attestation, the refund as the hub forwards it
//! to the cloud, and the answers. A refund is online only: the cloud's ledger decides it, once
//! per refund id.

use serde::{Deserialize, Serialize};

use crate::{
    checks::check_store_payment, validate_id, AccountId, Currency, DeclineReason, OrderId,
    PaymentId, TerminalId, ValidationError,
};

/// `POST /v1/refund`: give back some or all of what an order paid, to the account that paid it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// The register's id of this refund, unique per store: the idempotency key (the same refund
    /// id again refunds nothing more and answers as the first time).
    pub refund_id: String,
    /// The order whose payment is refunded (at this terminal's store).
    pub order_id: OrderId,
    /// Amount in minor units, at most what the order paid minus its earlier refunds. Raw JSON
    /// for the same precise refusals as a charge's.
    pub amount_minor: serde_json::Value,
    /// ISO 4217 code: the payment's.
    pub currency: String,
}

/// Whether a refund was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    /// The money went back to the customer (now, or by an earlier request with this refund id).
    Refunded,
    /// Nothing was refunded by this request; see the reason.
    Declined,
    /// The terminal cannot tell whether the refund was made (the request may have reached the
    /// cloud without an answer coming back). Never a decline: send the same refund id again to
    /// learn it; it is never applied twice.
    Unknown,
}

/// The answer to `POST /v1/refund`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundResult {
    /// Echo of the request's refund id.
    pub refund_id: String,
    /// Echo of the request's order id.
    pub order_id: OrderId,
    /// The payment refunded, once the request was valid enough to name one.
    pub payment_id: Option<PaymentId>,
    /// Refunded, declined, or unknown.
    pub status: RefundStatus,
    /// Why it was declined (or why the outcome is unknown).
    pub reason: Option<DeclineReason>,
    /// Human-readable detail for the cashier.
    pub detail: String,
    /// When refunded: the account the money went back to.
    pub account_id: Option<AccountId>,
    /// When refunded: the amount this refund id gave back.
    pub amount_minor: Option<i64>,
    /// When refunded: everything refunded of the payment so far, this refund included.
    pub refunded_total_minor: Option<i64>,
    /// When refunded: what the payment was.
    pub paid_minor: Option<i64>,
    /// True when this refund id had been made before: nothing moved this time.
    #[serde(default)]
    pub already_refunded: bool,
}

impl RefundResult {
    /// A refusal of `request` decided before anything was sent.
    pub fn declined(
        refund_id: &str,
        order_id: &str,
        reason: DeclineReason,
        detail: impl Into<String>,
    ) -> Self {
        RefundResult {
            refund_id: refund_id.into(),
            order_id: order_id.into(),
            payment_id: None,
            status: RefundStatus::Declined,
            reason: Some(reason),
            detail: detail.into(),
            account_id: None,
            amount_minor: None,
            refunded_total_minor: None,
            paid_minor: None,
            already_refunded: false,
        }
    }
}

/// A refund as the terminal sends it to its hub, and the hub to the cloud, which checks every
/// field against the terminal's attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refund {
    /// Idempotency key, unique per store.
    pub refund_id: String,
    /// The payment refunded, `<store>:<order>`.
    pub payment_id: PaymentId,
    /// The terminal that takes the refund.
    pub terminal_id: TerminalId,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Its currency.
    pub currency: Currency,
    /// The terminal's [`AttestedRefund`], sealed with its certificate key
    /// ([`crate::topics::refund_attestation`]): a hub (or whoever holds its keys) cannot make up
    /// a refund, nor change one's payment or amount.
    pub attestation: String,
}

impl Refund {
    /// Whether the store `store_id` may ask for this refund: a payment of its own, ids well
    /// formed, an amount in range, an attestation of bounded size.
    pub fn check_from(&self, store_id: &str) -> Result<(), ValidationError> {
        check_store_payment(store_id, &self.payment_id)?;
        validate_id("refund_id", &self.refund_id)?;
        validate_id("terminal_id", &self.terminal_id)?;
        crate::check_amount(self.amount_minor)?;
        if self.attestation.is_empty() || self.attestation.len() > crate::MAX_ATTESTATION {
            return Err(ValidationError::Evidence {
                kind: "attestation",
                len: self.attestation.len(),
                expected: crate::MAX_ATTESTATION,
            });
        }
        Ok(())
    }

    /// What a terminal attests of this refund at `issued_at_ms` (its clock).
    pub fn attested(&self, issued_at_ms: u64) -> AttestedRefund {
        AttestedRefund {
            refund_id: self.refund_id.clone(),
            payment_id: self.payment_id.clone(),
            amount_minor: self.amount_minor,
            currency: self.currency,
            issued_at_ms,
        }
    }
}

/// How long after a terminal attested a refund the cloud still takes it: a request, its relay
/// and its retries by the hub take seconds. The register's retry with the same refund id is
/// attested again. An older attestation is refused (a hub that kept a refund the register heard
/// declined cannot use it later).
pub const REFUND_ATTESTATION_MAX_AGE_MS: u64 = 60_000;
/// How far ahead of the cloud's clock a terminal's attestation may be.
pub const REFUND_ATTESTATION_MAX_AHEAD_MS: u64 = 10_000;

/// What a terminal attests of a refund it takes, sealed with its certificate key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestedRefund {
    /// The refund id.
    pub refund_id: String,
    /// The payment refunded.
    pub payment_id: PaymentId,
    /// The amount.
    pub amount_minor: i64,
    /// Its currency.
    pub currency: Currency,
    /// When the terminal attested it (its clock, ms since the Unix epoch): the cloud takes it
    /// for [`REFUND_ATTESTATION_MAX_AGE_MS`].
    pub issued_at_ms: u64,
}

impl AttestedRefund {
    /// Whether this attests `refund` (its id, payment, amount and currency).
    pub fn attests(&self, refund: &Refund) -> bool {
        self.refund_id == refund.refund_id
            && self.payment_id == refund.payment_id
            && self.amount_minor == refund.amount_minor
            && self.currency == refund.currency
    }
}

/// The ledger's decision on a refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RefundDecision {
    /// The money went back.
    Refunded {
        /// The account it went back to: the one the payment charged.
        account_id: AccountId,
        /// This refund's amount.
        amount_minor: i64,
        /// Everything refunded of the payment so far, this refund included.
        refunded_total_minor: i64,
        /// What the payment was.
        paid_minor: i64,
        /// True when this refund id had been made before: nothing moved this time.
        already_refunded: bool,
    },
    /// Nothing moved.
    Declined {
        /// Machine-readable reason.
        reason: DeclineReason,
        /// Human-readable detail.
        detail: String,
    },
}

impl RefundDecision {
    /// A decline with a reason and detail.
    pub fn declined(reason: DeclineReason, detail: impl Into<String>) -> Self {
        RefundDecision::Declined {
            reason,
            detail: detail.into(),
        }
    }

    /// The decline reason, or `None` when refunded.
    pub fn reason(&self) -> Option<DeclineReason> {
        match self {
            RefundDecision::Refunded { .. } => None,
            RefundDecision::Declined { reason, .. } => Some(*reason),
        }
    }
}

/// The hub's answer to a terminal's [`Refund`], signed like every hub answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundReply {
    /// Echo of the refund id.
    pub refund_id: String,
    /// Echo of the payment id.
    pub payment_id: PaymentId,
    /// The decision.
    pub decision: RefundDecision,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refund() -> Refund {
        Refund {
            refund_id: "r-1".into(),
            payment_id: "store-1:o-1".into(),
            terminal_id: "till-1".into(),
            amount_minor: 100,
            currency: Currency::parse("EUR").unwrap(),
            attestation: "sealed".into(),
        }
    }

    #[test]
    fn a_store_may_refund_only_its_own_payments_with_well_formed_fields() {
        assert!(refund().check_from("store-1").is_ok());
        assert!(refund().check_from("store-2").is_err(), "another store's");
        for bad in [
            Refund {
                refund_id: "r/1".into(),
                ..refund()
            },
            Refund {
                amount_minor: 0,
                ..refund()
            },
            Refund {
                amount_minor: -5,
                ..refund()
            },
            Refund {
                attestation: String::new(),
                ..refund()
            },
            Refund {
                attestation: "x".repeat(crate::MAX_ATTESTATION + 1),
                ..refund()
            },
        ] {
            assert!(bad.check_from("store-1").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refunds_and_answers_cross_the_wire() {
        let request = crate::HubRequest {
            request_id: 3,
            store_id: "store-1".into(),
            body: crate::HubRequestBody::Refund(refund()),
        };
        let back: crate::HubRequest = crate::decode(&crate::encode(&request)).unwrap();
        assert_eq!(back, request);
        let reply = crate::CloudReply {
            request_id: 3,
            body: crate::CloudReplyBody::Refunded {
                refund_id: "r-1".into(),
                payment_id: "store-1:o-1".into(),
                decision: RefundDecision::Refunded {
                    account_id: "alice".into(),
                    amount_minor: 100,
                    refunded_total_minor: 100,
                    paid_minor: 250,
                    already_refunded: false,
                },
            },
        };
        let back: crate::CloudReply = crate::decode(&crate::encode(&reply)).unwrap();
        assert_eq!(back, reply);
    }
}
