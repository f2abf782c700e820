//! One payment attempt at the hub, as a plain state machine: no actor, no I/O, no clock.
//!
//! ```text
//! ProofChecked --LookUpOrder--> (order paid here before: answered from the journal) --> Done
//!      |
//!      v
//! OrderLookedUp --ReserveNonce--> (code spent or voided: declined) --> Done
//!      |        '-- (code from before the journal's memory) --AskStatus--> AskingCloud
//!      |              --> paid: approved / pending: in progress / not paid: declined /
//!      |                  no answer: unknown --> Done
//!      |
//!      '-- (a code refused for its time window) --InspectNonce--> Inspecting
//!              --> attempt open: in progress / use on record: the refusal /
//!                  otherwise AskStatus --> AskingCloud (not paid, or no answer about a code
//!                  issued after the journal began: the refusal) --> Done
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
//! about this payment; a code the journal cannot tell unused is never sent again, and never
//! declined while the cloud may hold its payment. An event that does not fit the state is a broken invariant and panics.

use protocol::{
    AccountId, AuthorizeRequest, CodeNonce, Decision, DeclineReason, OrderId, PaymentId,
    PaymentStatus, VoidPayment,
};

use crate::journal::{NonceSeen, Paid, Reservation};

/// What a request hears while another attempt at its order is being decided.
pub const IN_PROGRESS: &str =
    "this order is being charged right now; charge the same order id again to learn its outcome";

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
    /// For a token issued by code and face: the nonce of the code the face confirmed, burnt
    /// with the payment at the cloud.
    pub spent_code: Option<CodeNonce>,
    /// What the payer showed, for the cloud to check.
    pub evidence: protocol::PayerEvidence,
}

/// Where the attempt stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// The proof was checked; the journal is asked whether the order was paid here.
    ProofChecked,
    /// The order is not paid here; the nonce is being reserved.
    OrderLookedUp,
    /// The order is not paid here and the code was refused for its time window; what the
    /// journal knows of the code is being read.
    Inspecting,
    /// The journal cannot rule out that the code paid this order already (issued before what it
    /// remembers: its disk was lost, or it pruned the code's nonce; or refused for its window and
    /// not on record): the cloud is asked.
    AskingCloud {
        /// The journal cannot tell whether the code was used at all: without an answer, the
        /// outcome is unknown.
        forgotten: bool,
    },
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
    /// Ask the cloud what its ledger holds for the payment ([`Event::Status`]).
    AskStatus,
    /// Read what the journal knows of the refused code, reserving nothing
    /// ([`Event::NonceSeen`]).
    InspectNonce,
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
    /// What the cloud's ledger holds for the payment, or why the cloud could not say.
    Status(Result<PaymentStatus, String>),
    /// What the journal knows of the refused code.
    NonceSeen(NonceSeen),
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
    /// Why the proof was refused, when only its time window failed: the attempt then only finds
    /// out whether the code paid the order before, and answers that or this refusal.
    refusal: Option<Decision>,
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
            refusal: None,
        };
        (attempt, Effect::LookUpOrder)
    }

    /// An attempt for a request whose code was refused only for its time window (`refusal`): its
    /// signature proves `payer`, and the register may be asking again about an order that code
    /// paid (it did not hear the answer, the code expired meanwhile, or the hub's clock
    /// stepped). It never sends the code or reserves its nonce: it answers "approved" when the
    /// order was paid with it, "in progress" while that is unknown, and `refusal` otherwise.
    pub fn start_refused(
        request: &AuthorizeRequest,
        payer: Payer,
        refusal: Decision,
    ) -> (Self, Effect) {
        let (mut attempt, effect) = Self::start(request, payer, false);
        attempt.refusal = Some(refusal);
        (attempt, effect)
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
            spent_code: payer.spent_code.clone(),
            evidence: Box::new(payer.evidence.clone()),
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

    /// Another attempt at the order is open. Not a decline: it may yet be approved (a terminal
    /// that sent the same request again, a second till charging the same order).
    fn in_progress(&mut self) -> Effect {
        self.refuse(DeclineReason::PaymentInProgress, IN_PROGRESS.into())
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
            (State::ProofChecked, Event::Order(None)) if self.refusal.is_some() => {
                self.state = State::Inspecting;
                Effect::InspectNonce
            }
            (State::ProofChecked, Event::Order(None)) => {
                self.state = State::OrderLookedUp;
                Effect::ReserveNonce
            }
            (State::Inspecting, Event::NonceSeen(seen)) => self.inspected(seen),
            (State::OrderLookedUp, Event::Reserved(reservation)) => self.reserved(reservation),
            (State::AskingCloud { forgotten }, Event::Status(status)) => {
                let forgotten = *forgotten;
                self.asked(status, forgotten)
            }
            (State::NonceReserved, Event::AttemptRecorded) => {
                self.state = State::Sent;
                Effect::Send(self.record())
            }
            (State::NonceReserved, Event::AttemptRefused) => self.in_progress(),
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
            // A token lives only in this hub's memory, so one from before a restart is never
            // redeemed: too old is all it can be.
            Reservation::Expired if token => self.refuse(
                if token {
                    DeclineReason::TokenInvalid
                } else {
                    DeclineReason::CodeExpired
                },
                format!("this {what} is too old; show a fresh one"),
            ),
            // The journal does not know whether this code paid this order before (a register
            // that did not hear the answer sends the same charge again): "declined" could be a
            // lie, so the cloud's ledger decides. It is never sent as an attempt again: under
            // its nonce, an earlier attempt's void could move back what this one was told.
            Reservation::Expired => self.ask_cloud(true),
        }
    }

    /// The answer for a code refused for its time window, from what the journal knows of it.
    fn inspected(&mut self, seen: NonceSeen) -> Effect {
        let refusal = self
            .refusal
            .clone()
            .expect("only a refused code is inspected");
        match seen {
            NonceSeen::OpenAttempt => self.in_progress(),
            // What this hub decided for the code is on record, and an approval of the order
            // would have been found: the refusal is the truth.
            NonceSeen::Known => self.finish(Outcome::decided(refusal)),
            // Issued after the journal began by the hub's clock; but a hub whose disk was lost
            // and whose clock is behind started its journal after codes it had used: the cloud
            // is asked, and only when it cannot answer is the refusal taken as the truth.
            NonceSeen::Unused => self.ask_cloud(false),
            NonceSeen::Forgotten => self.ask_cloud(true),
        }
    }

    /// Asks the cloud what it holds for the payment; `forgotten`: the journal cannot tell
    /// whether the code was used, so no answer leaves the outcome unknown.
    fn ask_cloud(&mut self, forgotten: bool) -> Effect {
        self.state = State::AskingCloud { forgotten };
        Effect::AskStatus
    }

    /// The answer for a code the journal could not tell unused, from what the cloud holds.
    fn asked(&mut self, status: Result<PaymentStatus, String>, forgotten: bool) -> Effect {
        let decision = match status {
            Ok(PaymentStatus::Paid {
                account_id,
                amount_minor,
                currency,
            }) => self.answer_paid(&account_id, amount_minor, currency.as_str()),
            Ok(PaymentStatus::Pending) => Decision::declined(
                DeclineReason::PaymentInProgress,
                "an earlier attempt at this order is still open at the cloud; charge the same \
                 order id again to learn its outcome",
            ),
            Ok(PaymentStatus::NotPaid) => self.refusal.clone().unwrap_or_else(|| {
                Decision::declined(
                    DeclineReason::CodeExpired,
                    "this payment code is older than the store's records and did not pay this \
                     order; show a fresh one",
                )
            }),
            Err(_) if !forgotten => self.refusal.clone().expect("only a refused code is unused"),
            Err(why) => Decision::declined(
                DeclineReason::OutcomeUnknown,
                format!(
                    "this payment code is older than the store's records, and the cloud could \
                     not say whether it paid this order ({why}); charge the same order id again \
                     to learn its outcome"
                ),
            ),
        };
        self.finish(Outcome::decided(decision))
    }

    /// An order this hub already approved is answered from the journal: never sent to the cloud
    /// again (an order approved offline may not be in the ledger yet, and a second attempt under
    /// it could only confuse which attempt owns the transfer).
    fn answer_from_journal(&self, paid: &Paid) -> Decision {
        self.answer_paid(&paid.account_id, paid.amount_minor, &paid.currency)
    }

    /// The answer for an order paid by `account_id` with `amount_minor`: approved (already paid)
    /// when that is what this attempt asks, else a duplicate order id.
    fn answer_paid(&self, account_id: &AccountId, amount_minor: i64, currency: &str) -> Decision {
        let same = *account_id == self.payer.account_id
            && amount_minor == self.amount_minor
            && currency == self.currency;
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
            attestation: None,
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
            evidence: Default::default(),
            account_id: "alice".into(),
            nonce: "n1".into(),
            keep_from_ms: 0,
            token: false,
            spent_code: None,
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
    fn a_code_older_than_the_journal_is_answered_from_the_cloud_ledger_and_never_sent() {
        let paid = |amount_minor| PaymentStatus::Paid {
            account_id: "alice".into(),
            amount_minor,
            currency: Currency::parse("EUR").unwrap(),
        };
        let cases = [
            (Ok(paid(700)), None),
            (Ok(paid(900)), Some(DeclineReason::DuplicateOrderId)),
            (
                Ok(PaymentStatus::Pending),
                Some(DeclineReason::PaymentInProgress),
            ),
            (Ok(PaymentStatus::NotPaid), Some(DeclineReason::CodeExpired)),
            (
                Err("deadline passed".into()),
                Some(DeclineReason::OutcomeUnknown),
            ),
        ];
        for (status, reason) in cases {
            let effects = run(
                true,
                vec![
                    Event::Order(None),
                    Event::Reserved(Reservation::Expired),
                    Event::Status(status.clone()),
                ],
            );
            assert_eq!(effects[2], Effect::AskStatus);
            let outcome = outcome(&effects);
            match reason {
                None => assert_eq!(outcome.decision, approved(true)),
                Some(reason) => assert_eq!(outcome.decision.reason(), Some(reason), "{status:?}"),
            }
            // Only "not paid" is a decline the register may believe; the rest are never it.
            assert_eq!(
                outcome
                    .decision
                    .reason()
                    .is_some_and(|r| !r.is_unknown_outcome()),
                matches!(
                    status,
                    Ok(PaymentStatus::NotPaid)
                        | Ok(PaymentStatus::Paid {
                            amount_minor: 900,
                            ..
                        })
                )
            );
            assert!(!outcome.offline);
            assert_eq!(outcome.answered_attempt, None);
        }
    }

    #[test]
    fn a_code_refused_for_its_window_never_declines_an_order_it_may_have_paid() {
        let refusal = Decision::declined(DeclineReason::CodeExpired, "expired");
        let finish = |events: Vec<Event>| {
            let (mut attempt, mut effect) =
                Attempt::start_refused(&request("o1", 700), payer(), refusal.clone());
            let mut seen = vec![effect.clone()];
            for event in events {
                effect = attempt.on(event);
                seen.push(effect.clone());
            }
            assert!(
                !seen.iter().any(|e| matches!(
                    e,
                    Effect::ReserveNonce | Effect::RecordAttempt(_) | Effect::Send(_)
                )),
                "a refused code is never spent nor sent: {seen:?}"
            );
            match effect {
                Effect::Finish(outcome) => outcome.decision,
                other => panic!("not finished: {other:?}"),
            }
        };
        // Paid here: already paid.
        let paid = Paid {
            account_id: "alice".into(),
            amount_minor: 700,
            currency: "EUR".into(),
        };
        assert_eq!(finish(vec![Event::Order(Some(paid))]), approved(true));
        let inspected = |seen| vec![Event::Order(None), Event::NonceSeen(seen)];
        assert_eq!(
            finish(inspected(NonceSeen::OpenAttempt)).reason(),
            Some(DeclineReason::PaymentInProgress)
        );
        assert_eq!(finish(inspected(NonceSeen::Known)), refusal);
        // Not on record: the cloud decides. Not paid there is the refusal itself; pending is in
        // progress; paid is paid.
        let asked = |seen, status: Result<PaymentStatus, String>| {
            let mut events = inspected(seen);
            events.push(Event::Status(status));
            finish(events)
        };
        for seen in [NonceSeen::Unused, NonceSeen::Forgotten] {
            assert_eq!(asked(seen.clone(), Ok(PaymentStatus::NotPaid)), refusal);
            assert_eq!(
                asked(seen.clone(), Ok(PaymentStatus::Pending)).reason(),
                Some(DeclineReason::PaymentInProgress)
            );
            let paid = PaymentStatus::Paid {
                account_id: "alice".into(),
                amount_minor: 700,
                currency: Currency::parse("EUR").unwrap(),
            };
            assert_eq!(asked(seen, Ok(paid)), approved(true));
        }
        // No answer: a code issued after the journal began is taken as refused; one the journal
        // forgot leaves the outcome unknown.
        assert_eq!(asked(NonceSeen::Unused, Err("no link".into())), refusal);
        assert_eq!(
            asked(NonceSeen::Forgotten, Err("no link".into())).reason(),
            Some(DeclineReason::OutcomeUnknown)
        );
    }

    #[test]
    fn an_old_token_is_declined_without_asking_the_cloud() {
        let token = Payer {
            token: true,
            ..payer()
        };
        let (mut attempt, _) = Attempt::start(&request("o1", 700), token, true);
        attempt.on(Event::Order(None));
        let Effect::Finish(outcome) = attempt.on(Event::Reserved(Reservation::Expired)) else {
            panic!("an old token is refused at once");
        };
        assert_eq!(outcome.decision.reason(), Some(DeclineReason::TokenInvalid));
    }

    #[test]
    fn a_spent_or_voided_code_is_declined_before_anything_is_sent() {
        for (reservation, reason) in [
            (
                Reservation::Replayed {
                    first_payment_id: "s:o0".into(),
                },
                DeclineReason::CodeReplayed,
            ),
            (Reservation::Voided, DeclineReason::CodeReplayed),
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
