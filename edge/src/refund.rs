//! Refunds at the terminal: the register's `POST /v1/refund` is checked, attested with the
//! terminal's certificate key (so that no hub can make one up or change it), and sent to the
//! store's hub, which relays it to the cloud. Refunds need no sensor: they run beside a checkout.

use protocol::{
    Currency, DeclineReason, PaymentId, Refund, RefundDecision, RefundRequest, RefundResult,
    RefundStatus,
};

use crate::hub_client::{HubClient, HubUnreachable};

/// What the terminal counts of its refunds, every series up front.
#[derive(Clone)]
pub struct RefundMetrics {
    /// `facepay_edge_refunds_total{outcome}`.
    outcomes: prometheus::IntCounterVec,
    /// `facepay_edge_refund_declines_total{reason}`.
    declines: prometheus::IntCounterVec,
}

impl RefundMetrics {
    /// Registers on a terminal's registry.
    pub fn register(registry: &prometheus::Registry) -> Self {
        let outcomes = telemetry::register_counter_vec(
            registry,
            "facepay_edge_refunds_total",
            "refunds the register asked for, by outcome (refunded, declined, unknown)",
            &["outcome"],
        );
        for outcome in ["refunded", "declined", "unknown"] {
            outcomes.with_label_values(&[outcome]);
        }
        let declines = telemetry::register_counter_vec(
            registry,
            "facepay_edge_refund_declines_total",
            "refunds declined (or of unknown outcome), by reason",
            &["reason"],
        );
        for reason in DeclineReason::ALL {
            declines.with_label_values(&[reason.as_str()]);
        }
        RefundMetrics { outcomes, declines }
    }

    fn count(&self, result: &RefundResult) {
        let outcome = match result.status {
            RefundStatus::Refunded => "refunded",
            RefundStatus::Declined => "declined",
            RefundStatus::Unknown => "unknown",
        };
        self.outcomes.with_label_values(&[outcome]).inc();
        if let Some(reason) = result.reason {
            self.declines.with_label_values(&[reason.as_str()]).inc();
        }
    }
}

/// Takes the register's refunds.
#[derive(Clone)]
pub struct RefundDesk {
    store_id: String,
    terminal_id: String,
    hub: HubClient,
    signer: pki::ReplySigner,
    metrics: RefundMetrics,
}

/// A refund request's checked fields: the refund id, the payment, the amount and currency; or
/// the refusal.
pub fn validate_refund(
    store_id: &str,
    request: &RefundRequest,
) -> Result<(PaymentId, i64, Currency), (DeclineReason, String)> {
    protocol::validate_id("refund_id", &request.refund_id)
        .map_err(|e| (DeclineReason::InvalidRequest, e.to_string()))?;
    protocol::validate_id("order_id", &request.order_id)
        .map_err(|e| (DeclineReason::InvalidRequest, e.to_string()))?;
    let amount = protocol::validate_amount(&request.amount_minor)
        .map_err(|e| (DeclineReason::InvalidAmount, e.to_string()))?;
    let currency = Currency::parse(&request.currency)
        .map_err(|e| (DeclineReason::UnknownCurrency, e.to_string()))?;
    Ok((
        protocol::payment_id(store_id, &request.order_id),
        amount,
        currency,
    ))
}

impl RefundDesk {
    /// A desk for terminal `terminal_id` of `store_id`, asking `hub`, attesting with `signer`.
    pub fn new(
        (store_id, terminal_id): (String, String),
        hub: HubClient,
        signer: pki::ReplySigner,
        metrics: RefundMetrics,
    ) -> Self {
        RefundDesk {
            store_id,
            terminal_id,
            hub,
            signer,
            metrics,
        }
    }

    /// Refunds as the register asks, and counts the outcome.
    pub async fn refund(&self, request: RefundRequest) -> RefundResult {
        let result = self.decide(request).await;
        self.metrics.count(&result);
        result
    }

    async fn decide(&self, request: RefundRequest) -> RefundResult {
        let declined = |reason, detail: String| {
            RefundResult::declined(&request.refund_id, &request.order_id, reason, detail)
        };
        let (payment_id, amount_minor, currency) = match validate_refund(&self.store_id, &request) {
            Ok(checked) => checked,
            Err((reason, detail)) => return declined(reason, detail),
        };
        let mut refund = Refund {
            refund_id: request.refund_id.clone(),
            payment_id: payment_id.clone(),
            terminal_id: self.terminal_id.as_str().into(),
            amount_minor,
            currency,
            attestation: String::new(),
        };
        let topic = protocol::topics::refund_attestation(&payment_id, &refund.refund_id);
        refund.attestation = match self
            .signer
            .seal(&topic, protocol::encode(&refund.attested()))
        {
            Ok(sealed) => String::from_utf8(sealed).expect("sealed messages are JSON text"),
            Err(error) => {
                return declined(
                    DeclineReason::Internal,
                    format!(
                        "the terminal could not sign the refund: {error}; nothing was refunded"
                    ),
                )
            }
        };
        let (decision, known) = match self.hub.refund(&refund).await {
            Ok(reply) if reply.refund_id == refund.refund_id && reply.payment_id == payment_id => {
                (reply.decision, true)
            }
            // A refusal of a request the hub could not read names no refund.
            Ok(reply) if reply.decision.reason().is_some() && reply.refund_id.is_empty() => {
                (reply.decision, true)
            }
            Ok(reply) => {
                tracing::error!(
                    expected = refund.refund_id,
                    got = reply.refund_id,
                    "the hub answered for another refund"
                );
                (
                    RefundDecision::declined(
                        DeclineReason::Internal,
                        "the store hub answered for another refund; send the same refund id \
                         again to learn whether it was made",
                    ),
                    false,
                )
            }
            Err(error @ (HubUnreachable::NoHub | HubUnreachable::ListExpired)) => (
                RefundDecision::declined(
                    DeclineReason::StoreSystemUnreachable,
                    format!("{error}; nothing was refunded"),
                ),
                true,
            ),
            Err(error) => (
                RefundDecision::declined(
                    DeclineReason::StoreSystemUnreachable,
                    format!("{error}; send the same refund id again to learn whether it was made"),
                ),
                false,
            ),
        };
        let base = RefundResult {
            payment_id: Some(payment_id),
            ..RefundResult::declined(
                &request.refund_id,
                &request.order_id,
                DeclineReason::Internal,
                "",
            )
        };
        match decision {
            RefundDecision::Refunded {
                account_id,
                amount_minor,
                refunded_total_minor,
                paid_minor,
                already_refunded,
            } => RefundResult {
                status: RefundStatus::Refunded,
                reason: None,
                detail: if already_refunded {
                    "this refund was made before; nothing refunded again".into()
                } else {
                    "refunded".into()
                },
                account_id: Some(account_id),
                amount_minor: Some(amount_minor),
                refunded_total_minor: Some(refunded_total_minor),
                paid_minor: Some(paid_minor),
                already_refunded,
                ..base
            },
            RefundDecision::Declined { reason, detail } => RefundResult {
                status: if known && !reason.is_unknown_outcome() {
                    RefundStatus::Declined
                } else {
                    RefundStatus::Unknown
                },
                reason: Some(reason),
                detail,
                ..base
            },
        }
    }
}
