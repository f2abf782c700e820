//! Authorization at the hub: check the request and its proof (a payment code checked with the
//! account's replicated key, or a payment token a face verification issued), then carry the
//! attempt's state machine ([`crate::attempt`]): reserve the nonce, record the attempt, ask the
//! cloud or decide offline, void what is ambiguous, journal the decision, answer the edge.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix::prelude::*;
use paycode::Validity;
use protocol::{
    AuthorizeReply, AuthorizeRequest, CloudReplyBody, Decision, DeclineReason, HubRequestBody,
    PaymentId, PaymentProof, PaymentStatus, Refund, RefundDecision, RefundReply, VoidPayment,
};
use telemetry::PaymentMetrics;

use crate::{
    attempt::{Attempt, CloudResult, Effect, Event, Outcome, Payer, IN_PROGRESS},
    credentials::{CheckCode, CredentialsActor, RedeemToken},
    error::HubError,
    journal::{JournalEntry, JournalWorker},
    offline::{AllowanceGranted, ApproveOffline, DeliverQueued, OfflineActor, ReservationOf},
    uplink::{CallCloud, UplinkActor},
};

/// Mailbox bound; a full mailbox makes the edge's query wait.
pub const PAYMENT_MAILBOX: usize = 256;
/// How often expired code nonces are pruned from the journal.
pub const NONCE_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// What the payment actor needs to know.
#[derive(Clone)]
pub struct PaymentSettings {
    /// The one time source (journal timestamps, nonce pruning).
    pub clock: clock::SharedClock,
    /// The hub's store.
    pub store_id: String,
    /// Code validity window and clock-skew tolerance (how long a nonce must be remembered).
    pub validity: Validity,
    /// How long to wait for the cloud.
    pub cloud_timeout: Duration,
}

/// Whom the payment actor asks.
#[derive(Clone)]
pub struct PaymentPeers {
    /// The journal thread.
    pub journal: JournalWorker,
    /// Keys and tokens.
    pub credentials: Addr<CredentialsActor>,
    /// Offline rules, signing, delivery of what the journal queued.
    pub offline: Addr<OfflineActor>,
    /// The cloud (none: every payment is decided offline).
    pub uplink: Option<Addr<UplinkActor>>,
}

/// Decides payments; owns no state of its own beyond its settings and the payments it is deciding
/// right now (the journal holds every attempt, the credentials actor the keys, the offline actor
/// the book).
pub struct PaymentActor {
    settings: PaymentSettings,
    peers: PaymentPeers,
    metrics: PaymentMetrics,
    deciding: Arc<Mutex<HashSet<PaymentId>>>,
}

/// A payment being decided; it leaves the set when the decision is made (or abandoned).
struct Deciding {
    set: Arc<Mutex<HashSet<PaymentId>>>,
    payment_id: PaymentId,
}

impl Deciding {
    /// Enters `payment_id`, unless it is being decided already.
    fn enter(set: &Arc<Mutex<HashSet<PaymentId>>>, payment_id: &PaymentId) -> Option<Self> {
        set.lock()
            .expect("not poisoned")
            .insert(payment_id.clone())
            .then(|| Deciding {
                set: set.clone(),
                payment_id: payment_id.clone(),
            })
    }
}

impl Drop for Deciding {
    fn drop(&mut self) {
        self.set
            .lock()
            .expect("not poisoned")
            .remove(&self.payment_id);
    }
}

impl PaymentActor {
    /// A payment actor.
    pub fn new(settings: PaymentSettings, peers: PaymentPeers, metrics: PaymentMetrics) -> Self {
        PaymentActor {
            settings,
            peers,
            metrics,
            deciding: Arc::default(),
        }
    }

    /// The checks of a request's shape that need no I/O.
    fn check_request(&self, request: &AuthorizeRequest) -> Result<(), Decision> {
        for (kind, id) in [
            ("store_id", request.store_id.as_str()),
            ("terminal_id", request.terminal_id.as_str()),
            ("order_id", request.order_id.as_str()),
        ] {
            protocol::validate_id(kind, id)
                .map_err(|e| Decision::declined(DeclineReason::InvalidRequest, e.to_string()))?;
        }
        if request.store_id != self.settings.store_id {
            return Err(Decision::declined(
                DeclineReason::InvalidRequest,
                format!(
                    "this hub serves store {}, not {}",
                    self.settings.store_id, request.store_id
                ),
            ));
        }
        protocol::check_payment_id(&request.store_id, &request.order_id, &request.payment_id)
            .map_err(|e| Decision::declined(DeclineReason::InvalidRequest, e.to_string()))?;
        protocol::validate_amount(&request.amount_minor.into())
            .map_err(|e| Decision::declined(DeclineReason::InvalidAmount, e.to_string()))?;
        // The cloud refuses larger ones: refused here before anything is recorded.
        if request
            .attestation
            .as_ref()
            .is_some_and(|a| a.len() > protocol::MAX_ATTESTATION)
        {
            return Err(Decision::declined(
                DeclineReason::InvalidRequest,
                format!(
                    "the terminal's attestation is over {} bytes",
                    protocol::MAX_ATTESTATION
                ),
            ));
        }
        Ok(())
    }
}

impl Actor for PaymentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(PAYMENT_MAILBOX);
        ctx.run_interval(NONCE_PRUNE_INTERVAL, |actor, _| {
            let validity = actor.settings.validity;
            let horizon = validity.window_ms + 2 * validity.clock_skew_ms;
            let cutoff_ms = actor.settings.clock.now_ms().saturating_sub(horizon);
            actor.peers.journal.spawn(move |j| {
                let removed = j.prune_nonces(cutoff_ms)?;
                tracing::debug!(removed, "pruned expired code nonces");
                Ok::<_, HubError>(())
            });
        });
    }
}

/// Authorize a payment an edge presents.
#[derive(Message)]
#[rtype(result = "AuthorizeReply")]
pub struct Authorize(pub AuthorizeRequest);

/// How many payments are being decided now (a stopping hub waits for them).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct InFlight;

impl Handler<InFlight> for PaymentActor {
    type Result = usize;

    fn handle(&mut self, _: InFlight, _: &mut Self::Context) -> usize {
        self.deciding
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Handler<Authorize> for PaymentActor {
    type Result = ResponseFuture<AuthorizeReply>;

    fn handle(&mut self, msg: Authorize, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        self.metrics.request();
        let request = msg.0;
        let checked = self.check_request(&request);
        // One decision per payment at a time. A terminal sends a request again when its link to
        // the hub dropped before the answer; while the first is still being decided, the second
        // reads a journal between the first's steps (its nonce reserved, no attempt open yet, its
        // approval not yet written) and could only guess. It hears "in progress", never a
        // decline for money the first may move.
        let deciding = match checked {
            Ok(()) => match Deciding::enter(&self.deciding, &request.payment_id) {
                Some(deciding) => Some(deciding),
                None => {
                    let decision =
                        Decision::declined(DeclineReason::PaymentInProgress, IN_PROGRESS);
                    self.metrics.outcome(
                        decision.reason(),
                        telemetry::DecisionPath::Online,
                        started.elapsed(),
                    );
                    return Box::pin(futures::future::ready(AuthorizeReply {
                        payment_id: request.payment_id,
                        decision,
                        offline: false,
                    }));
                }
            },
            Err(_) => None,
        };
        let peers = self.peers.clone();
        let cloud_timeout = self.settings.cloud_timeout;
        let metrics = self.metrics.clone();
        let now_ms = self.settings.clock.now_ms();
        Box::pin(async move {
            let mut entry = JournalEntry::for_request(
                &request,
                Decision::declined(DeclineReason::Internal, ""),
                now_ms,
            );
            let proven = match checked {
                Err(decision) => Err((decision, None)),
                // The terminal's attestation goes to the cloud with the payment, as it came.
                Ok(()) => prove(&request, &peers.credentials, &peers.journal)
                    .await
                    .map(|mut payer| {
                        payer.evidence.attestation = request.attestation.clone();
                        payer
                    }),
            };
            let can_send = peers.uplink.is_some();
            let outcome = match proven {
                Err((decision, None)) => Outcome {
                    decision,
                    offline: false,
                    answered_attempt: None,
                },
                // A retry of an order this code paid hears so even when the code no longer
                // passes its window (it expired meanwhile, a clock stepped): "declined" would
                // be a lie about money that moved. Found by the chaos suite.
                Err((decision, Some(signer))) => {
                    let start = Attempt::start_refused(&request, signer.clone(), decision);
                    carry(start, &request, &signer, &peers, cloud_timeout).await
                }
                Ok(proven) => {
                    entry.account_id = Some(proven.account_id.clone());
                    entry.code_nonce = Some(proven.nonce.clone());
                    let start = Attempt::start(&request, proven.clone(), can_send);
                    carry(start, &request, &proven, &peers, cloud_timeout).await
                }
            };
            entry.decision = outcome.decision.clone();
            // The decision and the closing of the attempt it answers are journaled together
            // before the edge hears it; a failure here stops the hub (the restart voids the
            // attempt), it never answers "declined" for money that moved.
            let attempt = outcome.answered_attempt.clone();
            peers
                .journal
                .run(move |j| j.record(&entry, attempt.as_ref()))
                .await;
            // An approval is confirmed at once (the journal queued its post; the drain retries
            // it): until posted, the cloud's payment is pending, and a lost disk would let it
            // expire.
            if let (Decision::Approved { .. }, Some(_)) =
                (&outcome.decision, &outcome.answered_attempt)
            {
                peers.offline.do_send(DeliverQueued);
            }
            metrics.outcome(
                outcome.decision.reason(),
                telemetry::DecisionPath::of(outcome.offline),
                started.elapsed(),
            );
            drop(deciding);
            AuthorizeReply {
                payment_id: request.payment_id,
                decision: outcome.decision,
                offline: outcome.offline,
            }
        })
    }
}

/// Who pays, from the request's proof; or the decline, with who signed a code refused only for
/// its time window.
async fn prove(
    request: &AuthorizeRequest,
    credentials: &Addr<CredentialsActor>,
    journal: &JournalWorker,
) -> Result<Payer, (Decision, Option<Payer>)> {
    let unavailable = |e: MailboxError| {
        (
            Decision::declined(DeclineReason::Internal, format!("hub unavailable: {e}")),
            None,
        )
    };
    match &request.proof {
        PaymentProof::Code(text) => {
            match credentials
                .send(CheckCode(text.clone()))
                .await
                .map_err(unavailable)?
            {
                Ok(code) => Ok(code_payer(&code, text)),
                Err(refused) => Err((
                    refused.decision,
                    refused.signed.as_deref().map(|code| code_payer(code, text)),
                )),
            }
        }
        PaymentProof::Token(token) => {
            let redeem = RedeemToken {
                token: token.clone(),
                terminal_id: request.terminal_id.clone(),
            };
            match credentials.send(redeem).await.map_err(unavailable)? {
                Ok(t) => Ok(Payer {
                    account_id: t.account_id,
                    nonce: token.clone().into(),
                    keep_from_ms: t.expires_at_ms,
                    token: true,
                    spent_code: t.spent_code,
                    evidence: t.evidence,
                }),
                Err(refused) => {
                    // A register that did not hear a token charge's answer asks again with the
                    // same token, which may be gone since (expired, the hub restarted): what the
                    // journal holds for the order answers, never a decline for money that moved.
                    let decision =
                        Decision::declined(DeclineReason::TokenInvalid, refused.to_string());
                    let payment_id = request.payment_id.clone();
                    let (paid, open) = journal
                        .run(move |j| {
                            let open = j
                                .open_attempts()?
                                .iter()
                                .any(|a| a.payment_id == payment_id);
                            Ok::<_, HubError>((j.paid(&payment_id)?, open))
                        })
                        .await;
                    Err(match (paid, open) {
                        // Answered from the journal: approved when paid as asked.
                        (Some(paid), _) => (
                            decision,
                            Some(Payer {
                                account_id: paid.account_id,
                                nonce: token.clone().into(),
                                keep_from_ms: 0,
                                token: true,
                                spent_code: None,
                                evidence: Default::default(),
                            }),
                        ),
                        (None, true) => (
                            Decision::declined(DeclineReason::PaymentInProgress, IN_PROGRESS),
                            None,
                        ),
                        (None, false) => (decision, None),
                    })
                }
            }
        }
    }
}

/// Who pays with a code whose signature checked (`text`, as the terminal decoded it).
fn code_payer(code: &paycode::SignedCode, text: &str) -> Payer {
    Payer {
        account_id: code.account_id.clone().into(),
        nonce: code.nonce_hex().into(),
        keep_from_ms: code.issued_at_ms,
        token: false,
        spent_code: None,
        evidence: protocol::PayerEvidence {
            second_factor: None,
            attestation: None,
            payment_code: Some(text.to_owned()),
            face_probe: None,
        },
    }
}

/// Carries one attempt's state machine ([`crate::attempt`]) from its start: performs each effect
/// it asks for and feeds back what came of it, until it finishes.
async fn carry(
    (mut attempt, mut effect): (Attempt, Effect),
    request: &AuthorizeRequest,
    payer: &Payer,
    peers: &PaymentPeers,
    cloud_timeout: Duration,
) -> Outcome {
    let journal = &peers.journal;
    loop {
        let event = match effect {
            Effect::LookUpOrder => {
                let payment_id = request.payment_id.clone();
                Event::Order(journal.run(move |j| j.paid(&payment_id)).await)
            }
            Effect::ReserveNonce => {
                let (account_id, nonce, payment_id, issued_at_ms) = (
                    payer.account_id.clone(),
                    payer.nonce.clone(),
                    request.payment_id.clone(),
                    payer.keep_from_ms,
                );
                Event::Reserved(
                    journal
                        .run(move |j| {
                            j.reserve_nonce(&account_id, &nonce, &payment_id, issued_at_ms)
                        })
                        .await,
                )
            }
            Effect::AskStatus => Event::Status(ask_status(request, peers, cloud_timeout).await),
            Effect::InspectNonce => {
                let (account_id, nonce, payment_id, issued_at_ms) = (
                    payer.account_id.clone(),
                    payer.nonce.clone(),
                    request.payment_id.clone(),
                    payer.keep_from_ms,
                );
                Event::NonceSeen(
                    journal
                        .run(move |j| {
                            j.inspect_nonce(&account_id, &nonce, &payment_id, issued_at_ms)
                        })
                        .await,
                )
            }
            Effect::RecordAttempt(record) => {
                match journal.run(move |j| j.begin_attempt(&record)).await {
                    true => Event::AttemptRecorded,
                    false => Event::AttemptRefused,
                }
            }
            Effect::Send(_) => {
                Event::Cloud(send_attempt(request, payer, peers, cloud_timeout).await)
            }
            Effect::DropAttempt(record) => {
                journal.run(move |j| j.drop_attempt(&record)).await;
                Event::AttemptDropped
            }
            Effect::DecideOffline { failure } => {
                Event::Offline(decide_offline(request, payer, peers, &failure).await)
            }
            Effect::Void(record) => {
                void_attempt(record, peers).await;
                Event::Voided
            }
            Effect::Finish(outcome) => return outcome,
        };
        effect = attempt.on(event);
    }
}

/// Sends a recorded attempt to the cloud and reports what the link did with it.
async fn send_attempt(
    request: &AuthorizeRequest,
    payer: &Payer,
    peers: &PaymentPeers,
    cloud_timeout: Duration,
) -> CloudResult {
    let Some(uplink) = peers.uplink.as_ref() else {
        return CloudResult::NotSent("the hub has no cloud link".into());
    };
    let Ok(offline_reservation) = peers
        .offline
        .send(ReservationOf(payer.account_id.clone()))
        .await
    else {
        return CloudResult::NotSent("the store system is stopping".into());
    };
    let call = CallCloud {
        body: HubRequestBody::Authorize(Attempt::cloud_request(
            request,
            payer,
            offline_reservation,
        )),
        timeout: cloud_timeout,
    };
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Authorized {
            payment_id,
            decision,
            allowance,
        })) => {
            if let (Some(allowance), true) = (allowance, payment_id == request.payment_id) {
                peers.offline.do_send(AllowanceGranted(allowance));
            }
            CloudResult::Answered {
                payment_id,
                decision,
            }
        }
        // Not sent: nothing can have been applied.
        Ok(Err(
            error @ (HubError::CircuitOpen(_)
            | HubError::UplinkSaturated
            | HubError::CloudDisconnected),
        )) => CloudResult::NotSent(error.to_string()),
        // The cloud failed while it handled the request: it may or may not have applied it.
        Ok(Ok(CloudReplyBody::Error { detail })) => {
            CloudResult::Unanswered(format!("the cloud failed: {detail}"))
        }
        Ok(Ok(other)) => CloudResult::Unanswered(format!("unexpected cloud answer {other:?}")),
        Ok(Err(error)) => CloudResult::Unanswered(error.to_string()),
        Err(error) => CloudResult::Unanswered(error.to_string()),
    }
}

/// Asks the cloud what its ledger holds for the payment, or says why it could not.
async fn ask_status(
    request: &AuthorizeRequest,
    peers: &PaymentPeers,
    cloud_timeout: Duration,
) -> Result<PaymentStatus, String> {
    let uplink = peers
        .uplink
        .as_ref()
        .ok_or_else(|| "the hub has no cloud link".to_owned())?;
    let call = CallCloud {
        body: HubRequestBody::PaymentStatus {
            payment_id: request.payment_id.clone(),
        },
        timeout: cloud_timeout,
    };
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::PaymentStatus { payment_id, status }))
            if payment_id == request.payment_id =>
        {
            Ok(status)
        }
        Ok(Ok(other)) => Err(format!("unexpected cloud answer {other:?}")),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Decides without the cloud. Approved: the entry is signed, journaled and flushed before the
/// edge hears it, and reconciled later. (An attempt the cloud may have received is voided by the
/// state machine after this, whatever is decided.)
async fn decide_offline(
    request: &AuthorizeRequest,
    payer: &Payer,
    peers: &PaymentPeers,
    failure: &str,
) -> Decision {
    let approve = ApproveOffline {
        request: request.clone(),
        account_id: payer.account_id.clone(),
        nonce: payer.nonce.clone(),
        spent_code: payer.spent_code.clone(),
    };
    match peers.offline.send(approve).await {
        Ok(Ok(entry)) => {
            let recorded = entry.clone();
            peers
                .journal
                .run(move |j| j.record_offline(&recorded))
                .await;
            tracing::info!(
                payment_id = %request.payment_id,
                seq = entry.seq,
                failure,
                "approved offline"
            );
            Decision::Approved {
                account_id: payer.account_id.clone(),
                already_paid: false,
            }
        }
        Ok(Err(Decision::Declined { reason, detail })) => {
            Decision::declined(reason, format!("{detail} ({failure}); nothing was charged"))
        }
        Ok(Err(approved)) => approved,
        Err(error) => {
            Decision::declined(DeclineReason::Internal, format!("hub unavailable: {error}"))
        }
    }
}

/// Voids an attempt whose outcome is unknown: closed and queued durably, then delivered by the
/// offline actor's drain (at once, and retried on its timer).
async fn void_attempt(attempt: VoidPayment, peers: &PaymentPeers) {
    peers.journal.run(move |j| j.void_attempt(&attempt)).await;
    peers.offline.do_send(DeliverQueued);
}

/// Refund a payment: relayed to the cloud, whose ledger decides (online only).
#[derive(Message)]
#[rtype(result = "RefundReply")]
pub struct RefundPayment(pub Refund);

impl Handler<RefundPayment> for PaymentActor {
    type Result = ResponseFuture<RefundReply>;

    fn handle(&mut self, msg: RefundPayment, _: &mut Self::Context) -> Self::Result {
        let refund = msg.0;
        let answer = |decision| {
            let reply = RefundReply {
                refund_id: refund.refund_id.clone(),
                payment_id: refund.payment_id.clone(),
                decision,
            };
            Box::pin(futures::future::ready(reply)) as Self::Result
        };
        if let Err(error) = refund.check_from(&self.settings.store_id) {
            return answer(RefundDecision::declined(
                DeclineReason::InvalidRequest,
                error.to_string(),
            ));
        }
        // One request per refund id at a time (a stopping hub waits for it like a payment).
        let key = PaymentId::from(format!("{}#refund:{}", refund.payment_id, refund.refund_id));
        let Some(deciding) = Deciding::enter(&self.deciding, &key) else {
            return answer(RefundDecision::declined(
                DeclineReason::PaymentInProgress,
                "this refund is being made right now; send the same refund id again to learn \
                 its outcome",
            ));
        };
        let peers = self.peers.clone();
        let timeout = self.settings.cloud_timeout;
        Box::pin(async move {
            let _deciding = deciding;
            let decision = refund_at_cloud(&peers, timeout, &refund).await;
            RefundReply {
                refund_id: refund.refund_id,
                payment_id: refund.payment_id,
                decision,
            }
        })
    }
}

/// The cloud's decision on `refund`, or what the terminal is told without one: declined when
/// neither this request nor an earlier one for the refund id was sent (refunds need the cloud),
/// unknown when one was sent and no decision heard (the same refund id again learns it, and is
/// never applied twice). The journal keeps each refund sent until its decision comes.
async fn refund_at_cloud(
    peers: &PaymentPeers,
    timeout: Duration,
    refund: &Refund,
) -> RefundDecision {
    let unknown = |why: String| {
        RefundDecision::declined(
            DeclineReason::OutcomeUnknown,
            format!(
                "{why}; the refund may have been made: send the same refund id again to learn it"
            ),
        )
    };
    let Some(uplink) = &peers.uplink else {
        return RefundDecision::declined(
            DeclineReason::CloudUnreachable,
            "refunds need the cloud (this hub runs without one); nothing was refunded",
        );
    };
    let key = format!("{}#{}", refund.payment_id, refund.refund_id);
    let open = key.clone();
    let earlier = peers.journal.run(move |j| j.open_refund(&open)).await;
    let call = CallCloud {
        body: HubRequestBody::Refund(refund.clone()),
        timeout,
    };
    let decided = match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Refunded {
            refund_id,
            payment_id,
            decision,
        })) if refund_id == refund.refund_id && payment_id == refund.payment_id => Ok(decision),
        Ok(Err(
            error @ (HubError::CloudDisconnected
            | HubError::CircuitOpen(_)
            | HubError::UplinkSaturated),
        )) if !earlier => Err((
            RefundDecision::declined(
                DeclineReason::CloudUnreachable,
                format!("refunds need the cloud ({error}); nothing was refunded"),
            ),
            true,
        )),
        Ok(Err(error)) => Err((unknown(error.to_string()), false)),
        // An error may come after the ledger acted (its thread stopping): not a decision.
        Ok(Ok(CloudReplyBody::Error { detail })) => {
            Err((unknown(format!("cloud: {detail}")), false))
        }
        Ok(Ok(other)) => Err((
            unknown(format!("the cloud answered something else: {other:?}")),
            false,
        )),
        Err(error) => Err((
            unknown(format!("the hub's uplink is unavailable: {error}")),
            false,
        )),
    };
    let decision = match decided {
        Ok(decision) => {
            peers.journal.run(move |j| j.close_refund(&key)).await;
            decision
        }
        // Neither this request nor an earlier one was sent.
        Err((not_sent, true)) => {
            peers.journal.run(move |j| j.close_refund(&key)).await;
            return not_sent;
        }
        Err((unknown, false)) => return unknown,
    };
    if decision.reason() != Some(DeclineReason::PaymentNotFound) {
        return decision;
    }
    // The ledger does not hold it, and this hub approved it: offline, not reconciled yet.
    let payment_id = refund.payment_id.to_string();
    match peers.journal.run(move |j| j.paid(&payment_id)).await {
        Some(_) => RefundDecision::declined(
            DeclineReason::PaymentNotReconciled,
            format!(
                "{} was approved by this store while the cloud was unreachable and is not \
                 reconciled yet (or its reconciliation waits for the operator); nothing was \
                 refunded: refund it once the store's backlog is applied",
                refund.payment_id
            ),
        ),
        None => decision,
    }
}
