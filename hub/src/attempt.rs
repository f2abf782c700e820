//! One payment attempt at the hub, as a plain state machine: no actor, no I/O, no clock.
//!
//! ```text
//! ProofChecked --LookUpOrder--> (order paid here before: answered from the journal) --> Done
//!      |
//!      v
//! OrderLookedUp --ReserveNonce--> (code spent, voided or too old: declined) --> Done
//!      |
//!      v
//! NonceReserved --RecordAttempt--> Recorded --Send--> Sent
//!      |  (no link yet)                                 |-- answered about this payment --> Done
//!      |                                                |-- not sent --DropAttempt--> Offline
//!      |                                                '-- timeout, link lost, cloud error,
//!      |                                                    answer about another payment
//!      v                                                    --> Ambiguous --> Offline
//! Offline --DecideOffline--> (approved / declined) --(if ambiguous) Void--> Done
//! ```
//!
//! The carrier (the payment actor, or the deterministic simulation) performs each [`Effect`] and
//! feeds back what came of it as an [`Event`]; the machine answers with the next effect until
//! [`Effect::Finish`]. The rules it keeps: an order the hub approved is answered from the journal
//! and never sent again; the attempt is durable before it can be published; every attempt whose
//! outcome is unknown is voided, whatever is decided offline; an answer counts only when it is
//! about this payment. An event that does not fit the state is a broken invariant and panics.

use protocol::{
    AccountId, AuthorizeRequest, CodeNonce, Decision, DeclineReason, OrderId, PaymentId,
    VoidPayment,
};

use crate::journal::{Paid, Reservation};

/// Who pays, proven by a checked code or a redeemed token, and the single-use nonce that spends
/// the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payer {
    /// The paying account.
    pub account_id: AccountId,
    /// The code's nonce, or the token itself.
    pub nonce: CodeNonce,
    /// For nonce pruning: the code's issue time, or the token's expiry.
    pub keep_from_ms: u64,
    /// Proven by a payment token (a face verification), not a code.
    pub token: bool,
}

/// Where the attempt stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The proof was checked; the journal is asked whether the order was paid here.
    ProofChecked,
    /// The order is not paid here; the nonce is being reserved.
    OrderLookedUp,
    /// The nonce is spent on this payment; the attempt is being recorded.
    NonceReserved,
    /// The attempt is durable; it is being sent.
    Recorded,
    /// Sent; waiting for the cloud.
    Sent,
    /// The link refused it before publishing; the attempt record is being dropped.
    NotSent {
        /// Why it was not sent.
        failure: String,
    },
    /// Deciding without the cloud; `ambiguous` when the cloud may have applied the attempt.
    Offline {
        /// The cloud may have applied the attempt: it is voided after the decision.
        ambiguous: bool,
    },
    /// Decided offline after an ambiguous attempt; the void is being queued.
    Voiding,
    /// Finished.
    Done,
}

/// What the carrier is asked to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Read what the journal says was approved under the payment id ([`Event::Order`]).
    LookUpOrder,
    /// Reserve the payer's nonce for this payment ([`Event::Reserved`]).
    ReserveNonce,
    /// Record the attempt durably before it can be published ([`Event::AttemptRecorded`]).
    RecordAttempt(VoidPayment),
    /// Send the attempt to the cloud ([`Event::Cloud`]).
    Send(VoidPayment),
    /// Forget an attempt the link refused before publishing ([`Event::AttemptDropped`]).
    DropAttempt(VoidPayment),
    /// Decide by the offline rules, journaling an approval ([`Event::Offline`]).
    DecideOffline {
        /// Why the cloud could not decide, for the decline's detail and the log.
        failure: String,
    },
    /// Void the attempt durably and deliver the void ([`Event::Voided`]).
    Void(VoidPayment),
    /// Journal the decision (closing `answered_attempt` with it) and answer the edge.
    Finish(Outcome),
}

/// What came of an effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// What was approved under the payment id, if anything.
    Order(Option<Paid>),
    /// The nonce reservation.
    Reserved(Reservation),
    /// The attempt record is durable.
    AttemptRecorded,
    /// Another attempt for the same payment is open: this one was not recorded.
    AttemptRefused,
    /// What the cloud link did with the attempt.
    Cloud(CloudResult),
    /// The attempt record was dropped.
    AttemptDropped,
    /// The offline decision (an approval is journaled already).
    Offline(Decision),
    /// The void is queued durably.
    Voided,
}

/// What the cloud link did with a sent attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudResult {
    /// The cloud answered about `payment_id`.
    Answered {
        /// The payment the answer is about.
        payment_id: PaymentId,
        /// The cloud's decision.
        decision: Decision,
    },
    /// Refused before publishing (no broker, breaker open, queue full): nothing can have arrived.
    NotSent(String),
    /// Published, and no usable answer (deadline, link lost, the cloud failed handling it): the
    /// cloud may or may not have applied it.
    Unanswered(String),
}

/// The end of an attempt: what the edge hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// Decided by the hub alone.
    pub offline: bool,
    /// The attempt the cloud answered: closed in the journal with the decision.
    pub answered_attempt: Option<VoidPayment>,
}

impl Outcome {
    fn decided(decision: Decision) -> Self {
        Outcome {
            decision,
            offline: false,
            answered_attempt: None,
        }
    }
}

/// One attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    payment_id: PaymentId,
    order_id: OrderId,
    amount_minor: i64,
    currency: String,
    payer: Payer,
    can_send: bool,
    state: State,
    offline_decision: Option<Decision>,
}

impl Attempt {
    /// An attempt for a checked request; `can_send` is false while the hub has no cloud link at
    /// all (it is starting). Returns the first effect.
    pub fn start(request: &AuthorizeRequest, payer: Payer, can_send: bool) -> (Self, Effect) {
        let attempt = Attempt {
            payment_id: request.payment_id.clone(),
            order_id: request.order_id.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency.to_string(),
            payer,
            can_send,
            state: State::ProofChecked,
            offline_decision: None,
        };
        (attempt, Effect::LookUpOrder)
    }

    /// Where the attempt stands.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// What [`Effect::Send`] sends: the attempt as the cloud applies it, with what the store
    /// holds unreconciled for the account (`reservation`, from the offline book).
    pub fn cloud_request(
        request: &AuthorizeRequest,
        payer: &Payer,
        reservation: protocol::OfflineReservation,
    ) -> protocol::CloudAuthorize {
        protocol::CloudAuthorize {
            payment_id: request.payment_id.clone(),
            account_id: payer.account_id.clone(),
            code_nonce: payer.nonce.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency,
            terminal_id: request.terminal_id.clone(),
            order_id: request.order_id.clone(),
            offline_reservation: reservation,
        }
    }

    /// The attempt as the cloud and the journal know it.
    pub fn record(&self) -> VoidPayment {
        VoidPayment {
            payment_id: self.payment_id.clone(),
            account_id: self.payer.account_id.clone(),
            code_nonce: self.payer.nonce.clone(),
        }
    }

    fn finish(&mut self, outcome: Outcome) -> Effect {
        self.state = State::Done;
        Effect::Finish(outcome)
    }

    fn refuse(&mut self, reason: DeclineReason, detail: String) -> Effect {
        self.finish(Outcome::decided(Decision::declined(reason, detail)))
    }

    fn offline(&mut self, ambiguous: bool, failure: String) -> Effect {
        self.state = State::Offline { ambiguous };
        Effect::DecideOffline { failure }
    }

    /// Feeds what came of the last effect; returns the next one.
    pub fn on(&mut self, event: Event) -> Effect {
        match (&self.state, event) {
            (State::ProofChecked, Event::Order(Some(paid))) => {
                let decision = self.answer_from_journal(&paid);
                self.finish(Outcome::decided(decision))
            }
            (State::ProofChecked, Event::Order(None)) => {
                self.state = State::OrderLookedUp;
                Effect::ReserveNonce
            }
            (State::OrderLookedUp, Event::Reserved(reservation)) => self.reserved(reservation),
            (State::NonceReserved, Event::AttemptRecorded) => {
                self.state = State::Sent;
                Effect::Send(self.record())
            }
            // Not a decline: the open attempt may yet be approved (a terminal that sent the
            // same request again, a second till charging the same order).
            (State::NonceReserved, Event::AttemptRefused) => self.refuse(
                DeclineReason::PaymentInProgress,
                "this order is being charged right now; charge the same order id again to learn \
                 its outcome"
                    .into(),
            ),
            (
                State::Sent,
                Event::Cloud(CloudResult::Answered {
                    payment_id,
                    decision,
                }),
            ) if payment_id == self.payment_id => {
                let answered = self.record();
                self.finish(Outcome {
                    decision,
                    offline: false,
                    answered_attempt: Some(answered),
                })
            }
            (State::Sent, Event::Cloud(CloudResult::Answered { payment_id, .. })) => self.offline(
                true,
                format!("the cloud answered about {payment_id}, not this payment"),
            ),
            (State::Sent, Event::Cloud(CloudResult::NotSent(failure))) => {
                self.state = State::NotSent { failure };
                Effect::DropAttempt(self.record())
            }
            (State::Sent, Event::Cloud(CloudResult::Unanswered(failure))) => {
                self.offline(true, failure)
            }
            (State::NotSent { failure }, Event::AttemptDropped) => {
                let failure = failure.clone();
                self.offline(false, failure)
            }
            (State::Offline { ambiguous: false }, Event::Offline(decision)) => {
                let offline = matches!(decision, Decision::Approved { .. });
                self.finish(Outcome {
                    decision,
                    offline,
                    answered_attempt: None,
                })
            }
            (State::Offline { ambiguous: true }, Event::Offline(decision)) => {
                self.offline_decision = Some(decision);
                self.state = State::Voiding;
                Effect::Void(self.record())
            }
            (State::Voiding, Event::Voided) => {
                let decision = self
                    .offline_decision
                    .take()
                    .expect("an offline decision precedes the void");
                let offline = matches!(decision, Decision::Approved { .. });
                self.finish(Outcome {
                    decision,
                    offline,
                    answered_attempt: None,
                })
            }
            (state, event) => panic!(
                "payment {}: event {event:?} does not fit the attempt's state {state:?}",
                self.payment_id
            ),
        }
    }

    fn reserved(&mut self, reservation: Reservation) -> Effect {
        let token = self.payer.token;
        let what = if token {
            "payment token"
        } else {
            "payment code"
        };
        let spent = if token {
            DeclineReason::TokenInvalid
        } else {
            DeclineReason::CodeReplayed
        };
        match reservation {
            Reservation::Fresh | Reservation::SamePayment => {
                self.state = State::NonceReserved;
                if self.can_send {
                    Effect::RecordAttempt(self.record())
                } else {
                    self.offline(false, "the hub is still starting".into())
                }
            }
            Reservation::Replayed { first_payment_id } => self.refuse(
                spent,
                format!("this {what} was already used for {first_payment_id}; show a fresh one"),
            ),
            Reservation::Voided => self.refuse(
                spent,
                format!("this {what}'s earlier attempt was voided; show a fresh one"),
            ),
            Reservation::Expired => self.refuse(
                if token {
                    DeclineReason::TokenInvalid
                } else {
                    DeclineReason::CodeExpired
                },
                format!("this {what} is too old; show a fresh one"),
            ),
        }
    }

    /// An order this hub already approved is answered from the journal: never sent to the cloud
    /// again (an order approved offline may not be in the ledger yet, and a second attempt under
    /// it could only confuse which attempt owns the transfer).
    fn answer_from_journal(&self, paid: &Paid) -> Decision {
        let same = paid.account_id == self.payer.account_id
            && paid.amount_minor == self.amount_minor
            && paid.currency == self.currency;
        if same {
            Decision::Approved {
                account_id: self.payer.account_id.clone(),
                already_paid: true,
            }
        } else {
            Decision::declined(
                DeclineReason::DuplicateOrderId,
                format!(
                    "order {} was already paid with other details",
                    self.order_id
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::{Currency, PaymentProof};

    use super::*;

    fn request(order: &str, amount: i64) -> AuthorizeRequest {
        AuthorizeRequest {
            payment_id: format!("s:{order}").into(),
            store_id: "s".into(),
            terminal_id: "t".into(),
            order_id: order.into(),
            amount_minor: amount,
            currency: Currency::parse("EUR").unwrap(),
            proof: PaymentProof::Code("x".into()),
        }
    }

    fn payer() -> Payer {
        Payer {
            account_id: "alice".into(),
            nonce: "n1".into(),
            keep_from_ms: 0,
            token: false,
        }
    }

    fn approved(already_paid: bool) -> Decision {
        Decision::Approved {
            account_id: "alice".into(),
            already_paid,
        }
    }

    /// Runs an attempt, answering each effect from `script` in turn; returns the effects seen.
    fn run(can_send: bool, script: Vec<Event>) -> Vec<Effect> {
        let (mut attempt, mut effect) = Attempt::start(&request("o1", 700), payer(), can_send);
        let mut seen = vec![effect.clone()];
        for event in script {
            effect = attempt.on(event);
            seen.push(effect.clone());
        }
        assert_eq!(attempt.state(), &State::Done, "{seen:?}");
        seen
    }

    fn outcome(effects: &[Effect]) -> &Outcome {
        match effects.last() {
            Some(Effect::Finish(outcome)) => outcome,
            other => panic!("not finished: {other:?}"),
        }
    }

    #[test]
    fn an_answered_attempt_is_recorded_before_it_is_sent_and_closed_with_the_answer() {
        let effects = run(
            true,
            vec![
                Event::Order(None),
                Event::Reserved(Reservation::Fresh),
                Event::AttemptRecorded,
                Event::Cloud(CloudResult::Answered {
                    payment_id: "s:o1".into(),
                    decision: approved(false),
                }),
            ],
        );
        let record = Attempt::start(&request("o1", 700), payer(), true)
            .0
            .record();
        assert_eq!(effects[2], Effect::RecordAttempt(record.clone()));
        assert_eq!(effects[3], Effect::Send(record.clone()));
        let outcome = outcome(&effects);
        assert_eq!(outcome.decision, approved(false));
        assert_eq!(outcome.answered_attempt, Some(record));
    }

    #[test]
    fn an_order_paid_here_is_answered_from_the_journal_and_never_sent() {
        let paid = |amount| Paid {
            account_id: "alice".into(),
            amount_minor: amount,
            currency: "EUR".into(),
        };
        let effects = run(true, vec![Event::Order(Some(paid(700)))]);
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert_eq!(outcome(&effects).decision, approved(true));
        let effects = run(true, vec![Event::Order(Some(paid(900)))]);
        assert_eq!(
            outcome(&effects).decision.reason(),
            Some(DeclineReason::DuplicateOrderId)
        );
    }

    #[test]
    fn every_ambiguous_attempt_is_voided_whatever_is_decided_offline() {
        let unanswered = [
            CloudResult::Unanswered("deadline passed".into()),
            CloudResult::Unanswered("the cloud failed: ledger error".into()),
            CloudResult::Answered {
                payment_id: "s:other".into(),
                decision: approved(false),
            },
        ];
        let decisions = [
            approved(false),
            Decision::declined(DeclineReason::OfflineAmountOverLimit, "over"),
        ];
        for cloud in unanswered {
            for decided in &decisions {
                let effects = run(
                    true,
                    vec![
                        Event::Order(None),
                        Event::Reserved(Reservation::SamePayment),
                        Event::AttemptRecorded,
                        Event::Cloud(cloud.clone()),
                        Event::Offline(decided.clone()),
                        Event::Voided,
                    ],
                );
                assert!(
                    matches!(effects[4], Effect::DecideOffline { .. }),
                    "{effects:?}"
                );
                assert!(matches!(effects[5], Effect::Void(_)), "{effects:?}");
                let outcome = outcome(&effects);
                assert_eq!(&outcome.decision, decided);
                assert_eq!(outcome.answered_attempt, None);
            }
        }
    }

    #[test]
    fn a_second_attempt_while_one_is_open_hears_in_progress_never_declined() {
        // The same request sent again by a terminal whose first query lost its reply, or a
        // second till on the same order: the open attempt may yet be approved.
        let effects = run(
            true,
            vec![
                Event::Order(None),
                Event::Reserved(Reservation::SamePayment),
                Event::AttemptRefused,
            ],
        );
        assert_eq!(effects.len(), 4, "{effects:?}");
        let outcome = outcome(&effects);
        assert_eq!(
            outcome.decision.reason(),
            Some(DeclineReason::PaymentInProgress)
        );
        assert_eq!(outcome.answered_attempt, None);
        assert!(!effects
            .iter()
            .any(|e| matches!(e, Effect::Send(_) | Effect::Void(_))));
    }

    #[test]
    fn an_attempt_the_link_refused_is_dropped_and_decided_offline_without_a_void() {
        let effects = run(
            true,
            vec![
                Event::Order(None),
                Event::Reserved(Reservation::Fresh),
                Event::AttemptRecorded,
                Event::Cloud(CloudResult::NotSent("breaker open".into())),
                Event::AttemptDropped,
                Event::Offline(approved(false)),
            ],
        );
        assert!(matches!(effects[4], Effect::DropAttempt(_)));
        let outcome = outcome(&effects);
        assert!(outcome.offline);
        assert!(!effects.iter().any(|e| matches!(e, Effect::Void(_))));
    }

    #[test]
    fn a_spent_voided_or_old_code_is_declined_before_anything_is_sent() {
        for (reservation, reason) in [
            (
                Reservation::Replayed {
                    first_payment_id: "s:o0".into(),
                },
                DeclineReason::CodeReplayed,
            ),
            (Reservation::Voided, DeclineReason::CodeReplayed),
            (Reservation::Expired, DeclineReason::CodeExpired),
        ] {
            let effects = run(true, vec![Event::Order(None), Event::Reserved(reservation)]);
            assert_eq!(effects.len(), 3);
            assert_eq!(outcome(&effects).decision.reason(), Some(reason));
        }
    }

    #[test]
    fn a_hub_without_a_link_decides_offline_without_recording_an_attempt() {
        let effects = run(
            false,
            vec![
                Event::Order(None),
                Event::Reserved(Reservation::Fresh),
                Event::Offline(approved(false)),
            ],
        );
        assert!(matches!(effects[2], Effect::DecideOffline { .. }));
        assert!(outcome(&effects).offline);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn an_event_out_of_order_is_a_broken_invariant() {
        let (mut attempt, _) = Attempt::start(&request("o1", 700), payer(), true);
        attempt.on(Event::AttemptRecorded);
    }
}
