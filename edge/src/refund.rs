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
    /// Refund ids whose outcome the register heard as unknown: until the hub answers for one, a
    /// refusal decided here (no hub reachable) is no decline, since an earlier request may have
    /// been made.
    unsettled: std::sync::Arc<std::sync::Mutex<Unsettled>>,
}

/// Most refund ids of unknown outcome a terminal remembers: far more than a register leaves open.
pub const MAX_UNSETTLED_REFUNDS: usize = 1024;

/// Refund ids whose outcome the register heard as unknown, oldest first.
#[derive(Debug, Default)]
pub struct Unsettled(std::collections::VecDeque<String>);

impl Unsettled {
    /// Whether `refund_id`'s outcome is still unknown to its register.
    pub fn contains(&self, refund_id: &str) -> bool {
        self.0.iter().any(|r| r == refund_id)
    }

    /// Notes what the register heard of `refund_id`: unknown (kept), or the hub's answer
    /// (forgotten).
    pub fn heard(&mut self, refund_id: &str, status: RefundStatus, from_hub: bool) {
        match status {
            RefundStatus::Unknown if !self.contains(refund_id) => {
                if self.0.len() == MAX_UNSETTLED_REFUNDS {
                    self.0.pop_front();
                }
                self.0.push_back(refund_id.to_owned());
            }
            RefundStatus::Refunded | RefundStatus::Declined if from_hub => {
                self.0.retain(|r| r != refund_id)
            }
            _ => {}
        }
    }
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
            unsettled: Default::default(),
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
        // Attested afresh by every request: the cloud takes an attestation for a minute.
        let attested = refund.attested(paycode::now_ms());
        refund.attestation = match self.signer.seal(&topic, protocol::encode(&attested)) {
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
        let mut from_hub = false;
        let (decision, known) = match self.hub.refund(&refund).await {
            Ok(reply) if reply.refund_id == refund.refund_id && reply.payment_id == payment_id => {
                from_hub = true;
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
            // Not sent: nothing was refunded by this request. An earlier one for the same refund
            // id whose outcome is unknown may have been: then still unknown.
            Err(error @ (HubUnreachable::NoHub | HubUnreachable::ListExpired)) => {
                let earlier = self.unsettled().contains(&refund.refund_id);
                (
                    RefundDecision::declined(
                        DeclineReason::StoreSystemUnreachable,
                        if earlier {
                            format!(
                                "{error}; an earlier request for this refund may have been \
                                 made: send the same refund id again to learn it"
                            )
                        } else {
                            format!("{error}; nothing was refunded")
                        },
                    ),
                    !earlier,
                )
            }
            Err(error) => (
                RefundDecision::declined(
                    DeclineReason::StoreSystemUnreachable,
                    format!("{error}; send the same refund id again to learn whether it was made"),
                ),
                false,
            ),
        };
        // "Not sent, nothing was refunded" speaks of this request only: after an earlier one of
        // unknown outcome (its hub may have lost what it sent with its disk), still unknown.
        let earlier = self.unsettled().contains(&refund.refund_id);
        let (decision, known, from_hub) = match decision.reason() {
            Some(DeclineReason::CloudUnreachable) if earlier => (
                RefundDecision::declined(
                    DeclineReason::CloudUnreachable,
                    "the store cannot reach the cloud now; an earlier request for this refund \
                     may have been made: send the same refund id again once the store is back \
                     online",
                ),
                false,
                false,
            ),
            _ => (decision, known, from_hub),
        };
        let result = Self::result(&request, payment_id, decision, known);
        self.unsettled()
            .heard(&result.refund_id, result.status, from_hub);
        result
    }

    fn unsettled(&self) -> std::sync::MutexGuard<'_, Unsettled> {
        self.unsettled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the register hears of `decision` (`known`: whether it is this refund's outcome).
    fn result(
        request: &RefundRequest,
        payment_id: PaymentId,
        decision: RefundDecision,
        known: bool,
    ) -> RefundResult {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refund_of_unknown_outcome_stays_so_until_the_hub_answers_for_it() {
        let mut unsettled = Unsettled::default();
        unsettled.heard("r-1", RefundStatus::Unknown, true);
        assert!(unsettled.contains("r-1"));
        // Refused here (no hub reachable): still unknown.
        unsettled.heard("r-1", RefundStatus::Declined, false);
        assert!(unsettled.contains("r-1"));
        unsettled.heard("r-1", RefundStatus::Refunded, true);
        assert!(!unsettled.contains("r-1"), "the hub answered for it");
        for n in 0..=MAX_UNSETTLED_REFUNDS {
            unsettled.heard(&format!("r-{n}"), RefundStatus::Unknown, true);
        }
        assert!(!unsettled.contains("r-0"), "bounded: the oldest is dropped");
        assert!(unsettled.contains(&format!("r-{MAX_UNSETTLED_REFUNDS}")));
    }

    #[test]
    fn a_refund_request_is_checked_before_anything_is_sent() {
        let request = |refund_id: &str, amount: serde_json::Value, currency: &str| RefundRequest {
            refund_id: refund_id.into(),
            order_id: "o-1".into(),
            amount_minor: amount,
            currency: currency.into(),
        };
        let ok = validate_refund("store-1", &request("r-1", 250.into(), "EUR")).unwrap();
        assert_eq!((ok.0.as_str(), ok.1), ("store-1:o-1", 250));
        for (bad, reason) in [
            (
                request("r/1", 250.into(), "EUR"),
                DeclineReason::InvalidRequest,
            ),
            (
                request("", 250.into(), "EUR"),
                DeclineReason::InvalidRequest,
            ),
            (
                request("r-1", 0.into(), "EUR"),
                DeclineReason::InvalidAmount,
            ),
            (
                request("r-1", (-3).into(), "EUR"),
                DeclineReason::InvalidAmount,
            ),
            (
                request("r-1", 2.5.into(), "EUR"),
                DeclineReason::InvalidAmount,
            ),
            (
                request("r-1", 250.into(), "EURO"),
                DeclineReason::UnknownCurrency,
            ),
        ] {
            assert_eq!(
                validate_refund("store-1", &bad).unwrap_err().0,
                reason,
                "{bad:?}"
            );
        }
    }
}
