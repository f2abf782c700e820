//! The checkout session: one at a time per terminal. The cash register asks to charge an order;
//! the scanner waits for the customer's code; the hub decides.

use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::{
    AuthorizeRequest, ChargeRequest, ChargeResult, ChargeStatus, Currency, Decision, DeclineReason,
};
use telemetry::PaymentMetrics;

use crate::{
    hub_client::{HubClient, HubUnreachable},
    scanner::{ScanForCode, ScannerActor},
};

/// Mailbox bound of the checkout actor. Requests beyond the one running are answered at once with
/// `terminal_busy`, so the mailbox only ever holds a few.
pub const CHECKOUT_MAILBOX: usize = 16;

/// Identity and deadlines of the terminal.
#[derive(Debug, Clone)]
pub struct CheckoutSettings {
    /// Store.
    pub store_id: String,
    /// Terminal.
    pub terminal_id: String,
    /// How long to wait for a code.
    pub scan_timeout: Duration,
}

/// Runs one checkout session at a time.
pub struct CheckoutActor {
    settings: CheckoutSettings,
    scanner: Addr<ScannerActor>,
    hub: HubClient,
    metrics: PaymentMetrics,
    busy: bool,
}

impl CheckoutActor {
    /// A checkout over a scanner and a hub client.
    pub fn new(
        settings: CheckoutSettings,
        scanner: Addr<ScannerActor>,
        hub: HubClient,
        metrics: PaymentMetrics,
    ) -> Self {
        CheckoutActor {
            settings,
            scanner,
            hub,
            metrics,
            busy: false,
        }
    }
}

impl Actor for CheckoutActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(CHECKOUT_MAILBOX);
    }
}

/// Charge an order with the code the customer presents.
#[derive(Message)]
#[rtype(result = "ChargeResult")]
pub struct Charge(pub ChargeRequest);

fn result(order_id: &str, payment_id: Option<String>, decision: Decision) -> ChargeResult {
    match decision {
        Decision::Approved {
            account_id,
            already_paid,
        } => ChargeResult {
            order_id: order_id.to_owned(),
            payment_id,
            status: ChargeStatus::Approved,
            reason: None,
            detail: if already_paid {
                "order was already paid; nothing charged again".into()
            } else {
                "paid".into()
            },
            account_id: Some(account_id),
            already_paid,
        },
        Decision::Declined { reason, detail } => ChargeResult {
            order_id: order_id.to_owned(),
            payment_id,
            status: ChargeStatus::Declined,
            reason: Some(reason),
            detail,
            account_id: None,
            already_paid: false,
        },
    }
}

/// Checks a charge request and builds the hub request fields, or the refusal.
pub fn validate_charge(request: &ChargeRequest) -> Result<(i64, Currency), Decision> {
    protocol::validate_id("order_id", &request.order_id)
        .map_err(|e| Decision::declined(DeclineReason::InvalidRequest, e.to_string()))?;
    let amount = protocol::validate_amount(&request.amount_minor)
        .map_err(|e| Decision::declined(DeclineReason::InvalidAmount, e.to_string()))?;
    let currency = Currency::parse(&request.currency)
        .map_err(|e| Decision::declined(DeclineReason::UnknownCurrency, e.to_string()))?;
    Ok((amount, currency))
}

impl Handler<Charge> for CheckoutActor {
    type Result = ResponseActFuture<Self, ChargeResult>;

    fn handle(&mut self, msg: Charge, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        self.metrics.request();
        let request = msg.0;
        let order_id = request.order_id.clone();
        let refuse = |actor: &mut Self, decision: Decision| {
            actor.metrics.outcome(decision.reason(), started.elapsed());
            Box::pin(fut::ready(result(&order_id, None, decision))) as Self::Result
        };
        let (amount_minor, currency) = match validate_charge(&request) {
            Ok(v) => v,
            Err(decision) => return refuse(self, decision),
        };
        if self.busy {
            return refuse(
                self,
                Decision::declined(
                    DeclineReason::TerminalBusy,
                    "another checkout is running on this terminal",
                ),
            );
        }
        self.busy = true;
        let payment_id = protocol::payment_id(&self.settings.store_id, &request.order_id);
        let scan = self.scanner.send(ScanForCode {
            timeout: self.settings.scan_timeout,
        });
        let hub = self.hub.clone();
        let settings = self.settings.clone();
        let pid = payment_id.clone();
        let session = async move {
            let code = match scan.await {
                Ok(Some(code)) => code,
                Ok(None) => {
                    return Decision::declined(
                        DeclineReason::NoCodePresented,
                        format!(
                            "no payment code seen within {} ms",
                            settings.scan_timeout.as_millis()
                        ),
                    )
                }
                Err(error) => {
                    return Decision::declined(
                        DeclineReason::Internal,
                        format!("scanner unavailable: {error}"),
                    )
                }
            };
            let request = AuthorizeRequest {
                payment_id: pid.clone(),
                store_id: settings.store_id,
                terminal_id: settings.terminal_id,
                order_id: request.order_id,
                amount_minor,
                currency,
                code,
            };
            match hub.authorize(&request).await {
                Ok(reply) if reply.payment_id == pid => reply.decision,
                Ok(reply) => match reply.decision {
                    // A refusal of an unreadable request carries no payment id.
                    declined @ Decision::Declined { .. } => declined,
                    Decision::Approved { .. } => {
                        tracing::error!(
                            expected = pid,
                            got = reply.payment_id,
                            "hub approved another payment"
                        );
                        Decision::declined(
                            DeclineReason::Internal,
                            "the store hub answered for another payment",
                        )
                    }
                },
                Err(error @ HubUnreachable::NoHub) => Decision::declined(
                    DeclineReason::StoreSystemUnreachable,
                    format!("{error}; nothing was charged"),
                ),
                Err(error) => Decision::declined(
                    DeclineReason::StoreSystemUnreachable,
                    format!("{error}; retry the same order id to learn whether it was paid"),
                ),
            }
        };
        Box::pin(session.into_actor(self).map(move |decision, actor, _| {
            actor.busy = false;
            actor.metrics.outcome(decision.reason(), started.elapsed());
            result(&order_id, Some(payment_id), decision)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(
        order: &str,
        amount: serde_json::Value,
        currency: &str,
        expected: Option<DeclineReason>,
    ) {
        let req = ChargeRequest {
            order_id: order.into(),
            amount_minor: amount,
            currency: currency.into(),
        };
        assert_eq!(
            validate_charge(&req).err().and_then(|d| d.reason()),
            expected,
            "{req:?}"
        );
    }

    #[test]
    fn charge_validation() {
        check("o-1", json!(100), "EUR", None);
        check("o-1", json!(0), "EUR", Some(DeclineReason::InvalidAmount));
        check("o-1", json!(-1), "EUR", Some(DeclineReason::InvalidAmount));
        check(
            "o-1",
            json!(9_223_372_036_854_775_807i64),
            "EUR",
            Some(DeclineReason::InvalidAmount),
        );
        check("o-1", json!(1.5), "EUR", Some(DeclineReason::InvalidAmount));
        check(
            "o-1",
            json!(100),
            "XYZ",
            Some(DeclineReason::UnknownCurrency),
        );
        check(
            "o/1",
            json!(100),
            "EUR",
            Some(DeclineReason::InvalidRequest),
        );
        check("", json!(100), "EUR", Some(DeclineReason::InvalidRequest));
    }
}
