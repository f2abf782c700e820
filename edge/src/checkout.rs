//! The checkout session: one at a time per terminal. The cash register asks to charge an order;
//! the scanner waits for the customer's code; the hub decides.

use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::{
    AccountId, AuthorizeRequest, ChargeRequest, ChargeResult, ChargeStatus, Currency, Decision,
    DeclineReason, OrderId, PaymentId, PaymentProof, SecondFactorAnswer, VerifyBody, VerifyMethod,
    VerifyReply, VerifyRequest, VerifyStart,
};
use telemetry::PaymentMetrics;

use crate::{
    camera::{CameraActor, CaptureFace},
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
    /// How long the camera looks for a usable live face.
    pub face_timeout: Duration,
}

/// What a terminal counts of its checkouts, every series up front.
#[derive(Clone)]
pub struct CheckoutMetrics {
    /// Charges: requests, decisions by outcome and path, declines by reason, decision time.
    payments: PaymentMetrics,
    /// `/v1/verify` and second-factor answers, declines by reason.
    verifications: telemetry::VerificationMetrics,
    /// `facepay_edge_customer_wait_seconds`: from the charge to a code seen.
    customer_wait: prometheus::Histogram,
}

impl CheckoutMetrics {
    /// Registers on a terminal's registry.
    pub fn register(registry: &prometheus::Registry) -> Self {
        let customer_wait = telemetry::register_histogram(
            registry,
            "facepay_edge_customer_wait_seconds",
            "from the register's charge to a payment code seen: the customer's time, apart \
             from the decision",
            &[0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0],
        );
        CheckoutMetrics {
            payments: PaymentMetrics::register(registry, "edge", &telemetry::DecisionPath::BOTH),
            verifications: telemetry::VerificationMetrics::register(registry, "edge"),
            customer_wait,
        }
    }

    fn verification(&self, reply: &VerifyReply) {
        self.verifications.reply(reply);
    }
}

/// Runs one checkout session at a time.
pub struct CheckoutActor {
    settings: CheckoutSettings,
    scanner: Addr<ScannerActor>,
    camera: Addr<CameraActor>,
    hub: HubClient,
    metrics: CheckoutMetrics,
    busy: bool,
    /// The order the running code charge is for: a second request for it hears
    /// `payment_in_progress` (its outcome is not known yet), not "declined".
    charging: Option<OrderId>,
    /// Signs what this terminal attests of each payment (with its certificate key).
    signer: pki::ReplySigner,
    /// What customers showed in the verifications of open tokens and challenges, newest last:
    /// a token's charge attests it.
    shown: Shown,
    /// Orders whose charge reached the hub without an outcome the register heard (it heard
    /// "unknown"): until the hub answers for one, a refusal decided here (no hub reachable, no
    /// code shown, the terminal busy) is no decline of the order, which may be paid.
    unsettled: Unsettled,
}

/// Most orders with an unknown outcome a terminal remembers ([`CheckoutActor`]): far more than a
/// register leaves open at once.
pub const MAX_UNSETTLED: usize = 1024;

/// Orders whose outcome the register heard as unknown, oldest first, at most [`MAX_UNSETTLED`].
#[derive(Debug, Default)]
pub struct Unsettled(std::collections::VecDeque<OrderId>);

impl Unsettled {
    /// Whether `order_id`'s outcome is still unknown to its register.
    pub fn contains(&self, order_id: &str) -> bool {
        self.0.iter().any(|o| o.as_str() == order_id)
    }

    /// Notes what the register heard of `order_id`: unknown (kept), or an outcome from the hub
    /// (forgotten).
    pub fn heard(&mut self, order_id: &str, status: ChargeStatus, from_hub: bool) {
        match status {
            ChargeStatus::Unknown if !self.contains(order_id) => {
                if self.0.len() == MAX_UNSETTLED {
                    self.0.pop_front();
                }
                self.0.push_back(order_id.into());
            }
            ChargeStatus::Approved | ChargeStatus::Declined if from_hub => {
                self.0.retain(|o| o.as_str() != order_id)
            }
            _ => {}
        }
    }
}

/// Most verifications whose evidence a terminal keeps for their charge.
pub const MAX_SHOWN: usize = 64;

/// What customers showed, by the payment token (or second-factor challenge) of their
/// verification, with the account it found (a token's); at most [`MAX_SHOWN`], the oldest
/// dropped first.
#[derive(Debug, Default)]
pub struct Shown(std::collections::VecDeque<ShownEntry>);

/// One verification's: its key (a token or a challenge id), the account found, what was shown,
/// and the payment it was first attested for (a token pays one payment).
type ShownEntry = (
    String,
    Option<AccountId>,
    protocol::PayerEvidence,
    Option<PaymentId>,
);

impl Shown {
    /// Keeps `evidence` for `key` (a token or a challenge id), of `account` if known.
    pub fn keep(
        &mut self,
        key: String,
        account: Option<AccountId>,
        evidence: protocol::PayerEvidence,
    ) {
        self.0.retain(|(k, _, _, _)| *k != key);
        self.0.push_back((key, account, evidence, None));
        while self.0.len() > MAX_SHOWN {
            self.0.pop_front();
        }
    }

    /// The account and what was shown for `key`, if kept.
    pub fn get(&self, key: &str) -> Option<(Option<&AccountId>, &protocol::PayerEvidence)> {
        self.0
            .iter()
            .rev()
            .find(|(k, _, _, _)| k == key)
            .map(|(_, a, e, _)| (a.as_ref(), e))
    }

    /// The account and what was shown for token `token`, to attest for `payment_id`: the first
    /// payment it is attested for is the only one (asked again for it, the same).
    pub fn attest_for(
        &mut self,
        token: &str,
        payment_id: &PaymentId,
    ) -> Option<(AccountId, protocol::PayerEvidence)> {
        let (_, account, evidence, attested) =
            self.0.iter_mut().rev().find(|(k, _, _, _)| k == token)?;
        if attested.get_or_insert_with(|| payment_id.clone()) != payment_id {
            return None;
        }
        Some((account.clone()?, evidence.clone()))
    }

    /// Keeps under `to`, of `account`, what was shown for `from` (a challenge answered with
    /// `answer`: its token).
    pub fn carry(&mut self, from: &str, to: String, account: AccountId, answer: String) {
        if let Some((_, evidence)) = self.get(from) {
            let evidence = protocol::PayerEvidence {
                second_factor: Some(answer),
                ..evidence.clone()
            };
            self.keep(to, Some(account), evidence);
        }
    }

    /// Keeps what the verification showed when its answer gives a token or a challenge.
    fn after(&mut self, reply: &VerifyReply, evidence: protocol::PayerEvidence) {
        match reply {
            VerifyReply::Verified {
                token, account_id, ..
            } => self.keep(token.clone(), Some(account_id.clone()), evidence),
            VerifyReply::SecondFactorRequired { challenge_id, .. } => {
                self.keep(challenge_id.clone(), None, evidence)
            }
            _ => {}
        }
    }
}

/// The terminal's attestation of `payment_id` for `amount_minor` in `currency`, with what the
/// customer showed: sealed with the terminal's certificate key.
pub fn attest(
    signer: &pki::ReplySigner,
    payment_id: &protocol::PaymentId,
    account_id: AccountId,
    (amount_minor, currency): (i64, Currency),
    token: Option<String>,
    shown: protocol::PayerEvidence,
) -> Result<String, pki::PkiError> {
    let attested = protocol::Attested {
        payment_id: payment_id.clone(),
        account_id,
        amount_minor,
        currency,
        token,
        shown,
    };
    let sealed = signer.seal(
        &protocol::topics::attestation(payment_id),
        protocol::encode(&attested),
    )?;
    Ok(String::from_utf8(sealed).expect("sealed messages are JSON text"))
}

impl CheckoutActor {
    /// A checkout over a scanner, a camera and a hub client.
    pub fn new(
        settings: CheckoutSettings,
        scanner: Addr<ScannerActor>,
        camera: Addr<CameraActor>,
        hub: HubClient,
        metrics: CheckoutMetrics,
        signer: pki::ReplySigner,
    ) -> Self {
        CheckoutActor {
            settings,
            scanner,
            camera,
            hub,
            metrics,
            busy: false,
            charging: None,
            signer,
            shown: Shown::default(),
            unsettled: Unsettled::default(),
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

/// What the register hears. `known` is false when the terminal cannot tell whether the hub
/// acted on the request; an order being charged by another request is never known yet.
fn result(
    order_id: &str,
    payment_id: Option<PaymentId>,
    decision: Decision,
    known: bool,
) -> ChargeResult {
    match decision {
        Decision::Approved {
            account_id,
            already_paid,
        } => ChargeResult {
            order_id: order_id.into(),
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
            offline: false,
        },
        Decision::Declined { reason, detail } => ChargeResult {
            order_id: order_id.into(),
            payment_id,
            status: if known && !reason.is_unknown_outcome() {
                ChargeStatus::Declined
            } else {
                ChargeStatus::Unknown
            },
            reason: Some(reason),
            detail,
            account_id: None,
            already_paid: false,
            offline: false,
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
    if let Some(token) = &request.token {
        protocol::validate_id("token", token)
            .map_err(|e| Decision::declined(DeclineReason::TokenInvalid, e.to_string()))?;
    }
    Ok((amount, currency))
}

/// The answer when no hub decision came, and whether it is known: nothing was sent (no hub
/// linked, the revocation list expired), or the hub may have acted on the request.
fn unreachable_decision(error: HubUnreachable) -> (Decision, bool) {
    match error {
        HubUnreachable::NoHub | HubUnreachable::ListExpired => (
            Decision::declined(
                DeclineReason::StoreSystemUnreachable,
                format!("{error}; nothing was charged"),
            ),
            true,
        ),
        error => (
            Decision::declined(
                DeclineReason::StoreSystemUnreachable,
                format!("{error}; charge the same order id again to learn whether it was paid"),
            ),
            false,
        ),
    }
}

impl Handler<Charge> for CheckoutActor {
    type Result = ResponseActFuture<Self, ChargeResult>;

    fn handle(&mut self, msg: Charge, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        self.metrics.payments.request();
        let request = msg.0;
        let order_id = request.order_id.clone();
        let refuse = |actor: &mut Self, decision: Decision| {
            actor.metrics.payments.outcome(
                decision.reason(),
                telemetry::DecisionPath::Online,
                started.elapsed(),
            );
            // Refused here, before the hub: no outcome of an order that may already be paid.
            let known = !actor.unsettled.contains(&order_id);
            Box::pin(fut::ready(result(&order_id, None, decision, known))) as Self::Result
        };
        let (amount_minor, currency) = match validate_charge(&request) {
            Ok(v) => v,
            Err(decision) => return refuse(self, decision),
        };
        // A token charge needs no sensor, so it runs beside a verification; a code charge needs
        // the scanner to itself.
        let with_token = request.token.is_some();
        if self.busy && !with_token && self.charging.as_ref() == Some(&request.order_id) {
            return refuse(
                self,
                Decision::declined(
                    DeclineReason::PaymentInProgress,
                    "this order is being charged on this terminal right now; charge the same \
                     order id again to learn its outcome",
                ),
            );
        }
        if self.busy && !with_token {
            return refuse(
                self,
                Decision::declined(
                    DeclineReason::TerminalBusy,
                    "another checkout is running on this terminal",
                ),
            );
        }
        if !with_token {
            self.busy = true;
            self.charging = Some(request.order_id.clone());
        }
        let payment_id = protocol::payment_id(&self.settings.store_id, &request.order_id);
        let scan = match &request.token {
            Some(_) => None,
            None => Some(self.scanner.send(ScanForCode {
                timeout: self.settings.scan_timeout,
            })),
        };
        let hub = self.hub.clone();
        let settings = self.settings.clone();
        let pid = payment_id.clone();
        let signer = self.signer.clone();
        // A token's charge attests what its verification showed (nothing when this terminal no
        // longer holds it: the cloud then declines, and the customer verifies again).
        let token_shown = request
            .token
            .as_deref()
            .and_then(|token| self.shown.attest_for(token, &payment_id));
        // Whether the hub approved alone (the cloud unreachable): reported to the register.
        let offline = std::rc::Rc::new(std::cell::Cell::new(false));
        let offline_seen = offline.clone();
        // Whether the hub answered for this order (else the outcome was decided here).
        let answered = std::rc::Rc::new(std::cell::Cell::new(false));
        let answered_seen = answered.clone();
        // When the code was seen: the decision's time runs from there, the customer's before.
        let deciding_from = std::rc::Rc::new(std::cell::Cell::new(started));
        let code_seen = deciding_from.clone();
        let customer_wait = self.metrics.customer_wait.clone();
        let session = async move {
            let token = request.token.clone();
            let proof = match (scan, request.token.clone()) {
                (_, Some(token)) => PaymentProof::Token(token),
                (None, None) => unreachable!("a scan is started when no token is given"),
                (Some(scan), None) => match scan.await {
                    Ok(Ok(Some(code))) => {
                        let seen = Instant::now();
                        customer_wait.observe(seen.duration_since(started).as_secs_f64());
                        code_seen.set(seen);
                        PaymentProof::Code(code)
                    }
                    Ok(Ok(None)) => {
                        // No customer time to count, nor any decision time before this.
                        code_seen.set(Instant::now());
                        return (
                            Decision::declined(
                                DeclineReason::NoCodePresented,
                                format!(
                                    "no payment code seen within {} ms",
                                    settings.scan_timeout.as_millis()
                                ),
                            ),
                            true,
                        );
                    }
                    Ok(Err(error)) => {
                        code_seen.set(Instant::now());
                        return (
                            Decision::declined(
                                DeclineReason::ScannerUnavailable,
                                format!("scanner unavailable: {error}"),
                            ),
                            true,
                        );
                    }
                    Err(error) => {
                        return (
                            Decision::declined(
                                DeclineReason::Internal,
                                format!("scanner unavailable: {error}"),
                            ),
                            true,
                        )
                    }
                },
            };
            // The account the code names (a code that is none is refused at the hub).
            let shown = match &proof {
                PaymentProof::Code(code) => paycode::SignedCode::parse(code).ok().map(|c| {
                    let shown = protocol::PayerEvidence {
                        payment_code: Some(code.clone()),
                        ..Default::default()
                    };
                    (AccountId::from(c.account_id.as_str()), shown)
                }),
                PaymentProof::Token(_) => token_shown,
            };
            let attestation = match shown {
                Some((account, shown)) => {
                    let amount = (amount_minor, currency);
                    match attest(&signer, &pid, account, amount, token.clone(), shown) {
                        Ok(sealed) => Some(sealed),
                        Err(error) => {
                            return (
                                Decision::declined(
                                    DeclineReason::Internal,
                                    format!("the terminal could not sign the payment: {error}"),
                                ),
                                true,
                            )
                        }
                    }
                }
                None => None,
            };
            let request = AuthorizeRequest {
                payment_id: pid.clone(),
                store_id: settings.store_id.into(),
                terminal_id: settings.terminal_id.into(),
                order_id: request.order_id,
                amount_minor,
                currency,
                proof,
                attestation,
            };
            match hub.authorize(&request).await {
                Ok(reply) if reply.payment_id == pid => {
                    offline_seen.set(reply.offline);
                    answered_seen.set(true);
                    (reply.decision, true)
                }
                Ok(reply) => match reply.decision {
                    // A refusal of an unreadable request carries no payment id.
                    declined @ Decision::Declined { .. } => (declined, true),
                    // Whatever the hub did with this request is not known.
                    Decision::Approved { .. } => {
                        tracing::error!(
                            expected = %pid,
                            got = %reply.payment_id,
                            "hub approved another payment"
                        );
                        (
                            Decision::declined(
                                DeclineReason::Internal,
                                "the store hub answered for another payment; charge the same \
                                 order id again to learn whether it was paid",
                            ),
                            false,
                        )
                    }
                },
                Err(error) => unreachable_decision(error),
            }
        };
        Box::pin(
            session
                .into_actor(self)
                .map(move |(decision, known), actor, _| {
                    if !with_token {
                        actor.busy = false;
                        actor.charging = None;
                    }
                    actor.metrics.payments.outcome(
                        decision.reason(),
                        telemetry::DecisionPath::of(offline.get()),
                        deciding_from.get().elapsed(),
                    );
                    // A refusal decided here (no hub reachable, no code seen) of an order whose
                    // earlier charge may have been paid tells nothing of that charge.
                    let known = known && (answered.get() || !actor.unsettled.contains(&order_id));
                    let heard = ChargeResult {
                        offline: offline.get(),
                        ..result(&order_id, Some(payment_id), decision, known)
                    };
                    actor
                        .unsettled
                        .heard(&order_id, heard.status, answered.get());
                    heard
                }),
        )
    }
}

/// Verify the customer in front of the terminal: face only, or code and face.
#[derive(Message)]
#[rtype(result = "VerifyReply")]
pub struct VerifyCustomer(pub VerifyStart);

impl Handler<VerifyCustomer> for CheckoutActor {
    type Result = ResponseActFuture<Self, VerifyReply>;

    fn handle(&mut self, msg: VerifyCustomer, _: &mut Self::Context) -> Self::Result {
        counted(self.verify_customer(msg))
    }
}

/// A verification's answer, counted as it goes to the register.
fn counted(
    answer: ResponseActFuture<CheckoutActor, VerifyReply>,
) -> ResponseActFuture<CheckoutActor, VerifyReply> {
    Box::pin(answer.map(|reply, actor: &mut CheckoutActor, _| {
        actor.metrics.verification(&reply);
        reply
    }))
}

impl CheckoutActor {
    fn verify_customer(&mut self, msg: VerifyCustomer) -> ResponseActFuture<Self, VerifyReply> {
        if self.busy {
            return Box::pin(fut::ready(VerifyReply::refused(
                DeclineReason::TerminalBusy,
                "another checkout is running on this terminal",
            )));
        }
        self.busy = true;
        let capture = self.camera.send(CaptureFace {
            timeout: self.settings.face_timeout,
        });
        // Code and face: the code scanner and the camera look at the same time.
        let scan = (msg.0.method == VerifyMethod::CodeAndFace).then(|| {
            self.scanner.send(ScanForCode {
                timeout: self.settings.scan_timeout,
            })
        });
        let hub = self.hub.clone();
        let settings = self.settings.clone();
        // What the customer showed, kept for the charge of the token this verification gets.
        let shown_seen = std::rc::Rc::new(std::cell::RefCell::new(None));
        let shown_here = shown_seen.clone();
        let session = async move {
            let (face, code) = match scan {
                Some(scan) => {
                    let (face, code) = tokio::join!(capture, scan);
                    (face, Some(code))
                }
                None => (capture.await, None),
            };
            let embedding = match face {
                Ok(Ok(embedding)) => embedding,
                Ok(Err(no_face)) => return VerifyReply::refused(no_face.reason, no_face.detail),
                Err(e) => {
                    return VerifyReply::refused(
                        DeclineReason::Internal,
                        format!("camera unavailable: {e}"),
                    )
                }
            };
            let shown = protocol::PayerEvidence {
                second_factor: None,
                payment_code: code
                    .as_ref()
                    .and_then(|c| c.as_ref().ok()?.as_ref().ok().cloned().flatten()),
                face_probe: Some(protocol::FaceProbe::new(&embedding)),
                attestation: None,
            };
            let body = match code {
                None => VerifyBody::Face { embedding },
                Some(Ok(Ok(Some(code)))) => VerifyBody::CodeAndFace { code, embedding },
                Some(Ok(Ok(None))) => {
                    return VerifyReply::refused(
                        DeclineReason::NoCodePresented,
                        format!(
                            "no payment code seen within {} ms",
                            settings.scan_timeout.as_millis()
                        ),
                    )
                }
                Some(Ok(Err(e))) => {
                    return VerifyReply::refused(
                        DeclineReason::ScannerUnavailable,
                        format!("scanner unavailable: {e}"),
                    )
                }
                Some(Err(e)) => {
                    return VerifyReply::refused(
                        DeclineReason::Internal,
                        format!("scanner unavailable: {e}"),
                    )
                }
            };
            shown_here.replace(Some(shown));
            ask_hub(&hub, &settings, body).await
        };
        Box::pin(session.into_actor(self).map(move |reply, actor, _| {
            actor.busy = false;
            if let Some(shown) = shown_seen.take() {
                actor.shown.after(&reply, shown);
            }
            reply
        }))
    }
}

async fn ask_hub(hub: &HubClient, settings: &CheckoutSettings, body: VerifyBody) -> VerifyReply {
    let request = VerifyRequest {
        store_id: settings.store_id.as_str().into(),
        terminal_id: settings.terminal_id.as_str().into(),
        body,
    };
    match hub.verify(&request).await {
        Ok(reply) => reply,
        Err(error) => VerifyReply::refused(
            DeclineReason::StoreSystemUnreachable,
            format!("{error}; verify again or pay another way"),
        ),
    }
}

/// Answer a second-factor challenge.
#[derive(Message)]
#[rtype(result = "VerifyReply")]
pub struct AnswerSecondFactor(pub SecondFactorAnswer);

impl Handler<AnswerSecondFactor> for CheckoutActor {
    type Result = ResponseActFuture<Self, VerifyReply>;

    fn handle(&mut self, msg: AnswerSecondFactor, _: &mut Self::Context) -> Self::Result {
        counted(self.answer_second_factor(msg))
    }
}

impl CheckoutActor {
    fn answer_second_factor(
        &mut self,
        msg: AnswerSecondFactor,
    ) -> ResponseActFuture<Self, VerifyReply> {
        if let Err(e) = protocol::validate_id("challenge_id", &msg.0.challenge_id) {
            return Box::pin(fut::ready(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                e.to_string(),
            )));
        }
        if msg.0.value.len() > 16 {
            return Box::pin(fut::ready(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                "value is at most 16 digits",
            )));
        }
        let hub = self.hub.clone();
        let settings = self.settings.clone();
        let (challenge_id, answer) = (msg.0.challenge_id.clone(), msg.0.value.clone());
        let ask = async move { ask_hub(&hub, &settings, VerifyBody::SecondFactor(msg.0)).await };
        Box::pin(ask.into_actor(self).map(move |reply, actor, _| {
            if let VerifyReply::Verified {
                token, account_id, ..
            } = &reply
            {
                actor
                    .shown
                    .carry(&challenge_id, token.clone(), account_id.clone(), answer);
            }
            reply
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An order the register heard "unknown" for stays unknown until the hub answers for it: a
    /// refusal decided at the terminal (no hub, no code) settles nothing.
    #[test]
    fn an_order_heard_unknown_stays_unknown_until_the_hub_answers_for_it() {
        let mut unsettled = Unsettled::default();
        unsettled.heard("o1", ChargeStatus::Unknown, false);
        unsettled.heard("o1", ChargeStatus::Unknown, true);
        assert!(unsettled.contains("o1"));
        assert_eq!(unsettled.0.len(), 1);
        unsettled.heard("o1", ChargeStatus::Declined, false);
        assert!(unsettled.contains("o1"), "a local refusal settles nothing");
        unsettled.heard("o1", ChargeStatus::Approved, true);
        assert!(!unsettled.contains("o1"));
        for n in 0..=MAX_UNSETTLED {
            unsettled.heard(&format!("o{n}"), ChargeStatus::Unknown, false);
        }
        assert_eq!(unsettled.0.len(), MAX_UNSETTLED);
        assert!(!unsettled.contains("o0") && unsettled.contains("o1"));
    }
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
            token: None,
        };
        assert_eq!(
            validate_charge(&req).err().and_then(|d| d.reason()),
            expected,
            "{req:?}"
        );
    }

    #[test]
    fn a_hub_answer_that_the_outcome_is_not_known_is_never_a_decline() {
        let pid = Some(PaymentId::from("store-1:o-1"));
        for reason in DeclineReason::ALL {
            let decision = Decision::declined(*reason, "from the hub");
            let heard = result("o-1", pid.clone(), decision, true);
            let expected = match reason {
                DeclineReason::PaymentInProgress
                | DeclineReason::OutcomeUnknown
                | DeclineReason::RateLimited => ChargeStatus::Unknown,
                _ => ChargeStatus::Declined,
            };
            assert_eq!(heard.status, expected, "{reason:?}");
            assert_eq!(heard.reason, Some(*reason));
        }
        // An answer the edge cannot trust is unknown whatever it says.
        let unknown = result(
            "o-1",
            pid,
            Decision::declined(DeclineReason::InsufficientFunds, "x"),
            false,
        );
        assert_eq!(unknown.status, ChargeStatus::Unknown);
    }

    #[test]
    fn a_tokens_evidence_is_attested_for_one_payment_and_the_oldest_go_first() {
        let mut shown = Shown::default();
        let face = protocol::PayerEvidence {
            face_probe: Some(protocol::FaceProbe::new(&[0.5; 4])),
            ..Default::default()
        };
        shown.keep("chl_1".into(), None, face.clone());
        assert_eq!(
            shown.attest_for("chl_1", &PaymentId::from("s:o-1")),
            None,
            "a challenge pays nothing until answered"
        );
        shown.carry(
            "chl_1",
            "tok_1".into(),
            AccountId::from("alice"),
            "4821".into(),
        );
        let first = shown.attest_for("tok_1", &PaymentId::from("s:o-1"));
        let answered = protocol::PayerEvidence {
            second_factor: Some("4821".into()),
            ..face.clone()
        };
        assert_eq!(first, Some((AccountId::from("alice"), answered)));
        assert_eq!(
            shown.attest_for("tok_1", &PaymentId::from("s:o-1")),
            first,
            "asked again for the same payment"
        );
        assert_eq!(shown.attest_for("tok_1", &PaymentId::from("s:o-2")), None);
        for n in 0..MAX_SHOWN {
            shown.keep(format!("tok_x{n}"), Some("bob".into()), face.clone());
        }
        assert_eq!(shown.get("tok_1"), None, "the oldest dropped");
        assert!(shown.get("tok_x0").is_some());
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
