//! Authorization at the hub: verify the payment code offline with the account's key (or redeem
//! the payment token a face verification issued), refuse a replay, ask the cloud to move the
//! money, journal the decision, answer the edge.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use actix::prelude::*;
use ed25519_dalek::VerifyingKey;
use paycode::{SignedCode, Validity};
use protocol::{
    AuthorizeReply, AuthorizeRequest, CloudAuthorize, CloudReplyBody, Decision, DeclineReason,
    HubRequestBody, KeyBatch, KeyEntry, PaymentProof, VoidPayment,
};
use telemetry::PaymentMetrics;

use crate::{
    error::HubError,
    journal::{JournalActor, JournalAnswer, JournalCmd, JournalEntry, Reservation},
    uplink::{CallCloud, UplinkActor, UplinkEvent},
    verify::{RedeemToken, VerifyActor},
};

/// Mailbox bound of the authorization actor; a full mailbox makes the edge's query wait.
pub const AUTH_MAILBOX: usize = 256;
/// How often expired code nonces are pruned from the journal.
pub const NONCE_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Deadline of key-sync and void requests to the cloud.
pub const MAINTENANCE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the authorization actor needs to know.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// The hub's store.
    pub store_id: String,
    /// Code validity window and clock-skew tolerance.
    pub validity: Validity,
    /// How long to wait for the cloud.
    pub cloud_timeout: Duration,
}

/// Decides payments. Holds the account keys in memory (loaded from the journal at start).
pub struct AuthActor {
    settings: AuthSettings,
    keys: HashMap<String, VerifyingKey>,
    key_version: u64,
    journal: Addr<JournalActor>,
    uplink: Option<Addr<UplinkActor>>,
    metrics: PaymentMetrics,
    keys_gauge: prometheus::IntGauge,
    syncing: bool,
    verifier: Option<Addr<VerifyActor>>,
}

impl AuthActor {
    /// A new actor with the keys the journal holds.
    pub fn new(
        settings: AuthSettings,
        stored_keys: Vec<KeyEntry>,
        key_version: u64,
        journal: Addr<JournalActor>,
        metrics: PaymentMetrics,
        keys_gauge: prometheus::IntGauge,
    ) -> Self {
        let mut actor = AuthActor {
            settings,
            keys: HashMap::new(),
            key_version,
            journal,
            uplink: None,
            metrics,
            keys_gauge,
            syncing: false,
            verifier: None,
        };
        actor.apply_keys(&stored_keys);
        actor
    }

    fn apply_keys(&mut self, entries: &[KeyEntry]) {
        for entry in entries {
            match entry.public_key.as_deref().map(paycode::parse_public_key) {
                Some(Ok(key)) => {
                    self.keys.insert(entry.account_id.clone(), key);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, account_id = entry.account_id, "unusable key from the cloud ignored")
                }
                None => {
                    self.keys.remove(&entry.account_id);
                }
            }
        }
        self.keys_gauge.set(self.keys.len() as i64);
    }

    /// The checks of a request's shape that need no I/O.
    fn check_request(&self, request: &AuthorizeRequest) -> Result<(), Decision> {
        for (kind, id) in [
            ("store_id", &request.store_id),
            ("terminal_id", &request.terminal_id),
            ("order_id", &request.order_id),
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
        if request.payment_id != protocol::payment_id(&request.store_id, &request.order_id) {
            return Err(Decision::declined(
                DeclineReason::InvalidRequest,
                "payment_id does not match store and order",
            ));
        }
        protocol::validate_amount(&request.amount_minor.into())
            .map_err(|e| Decision::declined(DeclineReason::InvalidAmount, e.to_string()))?;
        Ok(())
    }

    /// A payment code's form, signature (with the account's key) and validity window.
    fn check_code(&self, code: &str) -> Result<SignedCode, Decision> {
        let code = SignedCode::parse(code)
            .map_err(|e| Decision::declined(e.decline_reason(), e.to_string()))?;
        let key = self.keys.get(&code.account_id).ok_or_else(|| {
            Decision::declined(
                DeclineReason::UnknownAccount,
                format!("account {} is unknown to this store", code.account_id),
            )
        })?;
        code.verify(key, paycode::now_ms(), self.settings.validity)
            .map_err(|e| Decision::declined(e.decline_reason(), e.to_string()))?;
        Ok(code)
    }

    fn start_key_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.syncing {
            return;
        }
        self.syncing = true;
        let after_version = self.key_version;
        let call = uplink.send(CallCloud {
            body: HubRequestBody::KeySync { after_version },
            timeout: MAINTENANCE_TIMEOUT,
        });
        ctx.spawn(call.into_actor(self).map(|result, actor, ctx| {
            actor.syncing = false;
            match result {
                Ok(Ok(CloudReplyBody::Keys(batch))) => {
                    let more = batch.more && !batch.entries.is_empty();
                    ctx.notify(KeysArrived(batch));
                    if more {
                        ctx.notify(SyncKeys);
                    }
                }
                Ok(Ok(other)) => tracing::warn!(?other, "unexpected answer to key sync"),
                Ok(Err(error)) => tracing::warn!(%error, "key sync failed; retried on reconnect"),
                Err(error) => tracing::warn!(%error, "uplink unavailable for key sync"),
            }
        }));
    }

    fn resend_voids(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        let journal = self.journal.clone();
        ctx.spawn(
            async move {
                let voids = match journal.send(JournalCmd::PendingVoids).await {
                    Ok(Ok(JournalAnswer::Voids(v))) => v,
                    _ => return,
                };
                for void in voids {
                    deliver_void(&uplink, &journal, void).await;
                }
            }
            .into_actor(self),
        );
    }
}

async fn deliver_void(uplink: &Addr<UplinkActor>, journal: &Addr<JournalActor>, void: VoidPayment) {
    let call = CallCloud {
        body: HubRequestBody::Void(void.clone()),
        timeout: MAINTENANCE_TIMEOUT,
    };
    match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Voided { reversed, .. })) => {
            tracing::info!(payment_id = void.payment_id, reversed, "void delivered");
            let _ = journal.send(JournalCmd::RetireVoid(void)).await;
        }
        other => tracing::info!(
            payment_id = void.payment_id,
            ?other,
            "void not delivered yet; kept for reconnect"
        ),
    }
}

impl Actor for AuthActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(AUTH_MAILBOX);
        ctx.run_interval(NONCE_PRUNE_INTERVAL, |actor, _| {
            let horizon =
                actor.settings.validity.window_ms + 2 * actor.settings.validity.clock_skew_ms;
            let cutoff_ms = paycode::now_ms().saturating_sub(horizon);
            actor.journal.do_send(JournalCmd::PruneNonces { cutoff_ms });
        });
    }
}

/// Give the actor its uplink (which is created after it, because it reports back to it).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachUplink(pub Addr<UplinkActor>);

impl Handler<AttachUplink> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: AttachUplink, _: &mut Self::Context) {
        self.uplink = Some(msg.0);
    }
}

/// Give the actor the verify actor, which redeems payment tokens.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachVerifier(pub Addr<VerifyActor>);

impl Handler<AttachVerifier> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: AttachVerifier, _: &mut Self::Context) {
        self.verifier = Some(msg.0);
    }
}

/// Check a payment code (form, key, signature, window) without spending it.
#[derive(Message)]
#[rtype(result = "Result<SignedCode, Decision>")]
pub struct CheckCode(pub String);

impl Handler<CheckCode> for AuthActor {
    type Result = Result<SignedCode, Decision>;
    fn handle(&mut self, msg: CheckCode, _: &mut Self::Context) -> Self::Result {
        self.check_code(&msg.0)
    }
}

/// Who a proof says pays, and the single-use nonce that spends it.
#[derive(Debug, Clone)]
struct Proven {
    account_id: String,
    nonce: String,
    /// For nonce pruning: the code's issue time, or the token's expiry.
    keep_from_ms: u64,
    token: bool,
}

#[derive(Message)]
#[rtype(result = "()")]
struct KeysArrived(KeyBatch);

impl Handler<KeysArrived> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: KeysArrived, ctx: &mut Self::Context) {
        if msg.0.entries.is_empty() {
            return;
        }
        self.apply_keys(&msg.0.entries);
        let newest = msg.0.entries.iter().map(|e| e.version).max().unwrap_or(0);
        // A broadcast that skips versions means some were missed: fetch them.
        let gap = msg.0.entries.iter().map(|e| e.version).min().unwrap_or(0) > self.key_version + 1;
        self.key_version = self.key_version.max(newest);
        self.journal.do_send(JournalCmd::StoreKeys(msg.0.entries));
        if gap {
            ctx.notify(SyncKeys);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SyncKeys;

impl Handler<SyncKeys> for AuthActor {
    type Result = ();
    fn handle(&mut self, _: SyncKeys, ctx: &mut Self::Context) {
        self.start_key_sync(ctx);
    }
}

impl Handler<UplinkEvent> for AuthActor {
    type Result = ();
    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        match msg {
            UplinkEvent::CloudConnected => {
                self.start_key_sync(ctx);
                self.resend_voids(ctx);
            }
            UplinkEvent::KeysBroadcast(batch) => ctx.notify(KeysArrived(batch)),
            UplinkEvent::TemplatesPushed(_) => {}
        }
    }
}

/// Authorize a payment an edge presents.
#[derive(Message)]
#[rtype(result = "AuthorizeReply")]
pub struct Authorize(pub AuthorizeRequest);

impl Handler<Authorize> for AuthActor {
    type Result = ResponseFuture<AuthorizeReply>;

    fn handle(&mut self, msg: Authorize, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        self.metrics.request();
        let request = msg.0;
        let checked = self.check_request(&request);
        let code_checked = match (&checked, &request.proof) {
            (Ok(()), PaymentProof::Code(code)) => Some(self.check_code(code)),
            _ => None,
        };
        let journal = self.journal.clone();
        let uplink = self.uplink.clone();
        let verifier = self.verifier.clone();
        let metrics = self.metrics.clone();
        let cloud_timeout = self.settings.cloud_timeout;
        Box::pin(async move {
            let mut entry = JournalEntry::for_request(
                &request,
                Decision::declined(DeclineReason::Internal, ""),
            );
            let proven = match (checked, code_checked, &request.proof) {
                (Err(decision), _, _) => Err(decision),
                (Ok(()), Some(Err(decision)), _) => Err(decision),
                (Ok(()), Some(Ok(code)), _) => Ok(Proven {
                    account_id: code.account_id.clone(),
                    nonce: code.nonce_hex(),
                    keep_from_ms: code.issued_at_ms,
                    token: false,
                }),
                (Ok(()), None, PaymentProof::Token(token)) => {
                    redeem(verifier.as_ref(), token, &request.terminal_id).await
                }
                (Ok(()), None, PaymentProof::Code(_)) => unreachable!("codes are checked above"),
            };
            let decision = match &proven {
                Err(decision) => decision.clone(),
                Ok(proven) => {
                    entry.account_id = Some(proven.account_id.clone());
                    entry.code_nonce = Some(proven.nonce.clone());
                    authorize_verified(&request, proven, &journal, uplink.as_ref(), cloud_timeout)
                        .await
                }
            };
            entry.decision = decision.clone();
            let decision = match journal.send(JournalCmd::Record(Box::new(entry))).await {
                Ok(Ok(_)) => decision,
                failure => {
                    tracing::error!(
                        ?failure,
                        payment_id = request.payment_id,
                        "journal write failed"
                    );
                    // The hub cannot prove what it answered; refuse, and undo at the cloud if needed.
                    if let (Decision::Approved { account_id, .. }, Ok(proven), Some(uplink)) =
                        (&decision, &proven, uplink.as_ref())
                    {
                        let void = VoidPayment {
                            payment_id: request.payment_id.clone(),
                            account_id: account_id.clone(),
                            code_nonce: proven.nonce.clone(),
                        };
                        deliver_void(uplink, &journal, void).await;
                    }
                    Decision::declined(
                        DeclineReason::Internal,
                        "the store system could not record the payment",
                    )
                }
            };
            metrics.outcome(decision.reason(), started.elapsed());
            AuthorizeReply {
                payment_id: request.payment_id,
                decision,
            }
        })
    }
}

async fn redeem(
    verifier: Option<&Addr<VerifyActor>>,
    token: &str,
    terminal_id: &str,
) -> Result<Proven, Decision> {
    let Some(verifier) = verifier else {
        return Err(Decision::declined(
            DeclineReason::TokenInvalid,
            "this hub issues no payment tokens",
        ));
    };
    let redeem = RedeemToken {
        token: token.to_owned(),
        terminal_id: terminal_id.to_owned(),
    };
    match verifier.send(redeem).await {
        Ok(Ok(t)) => Ok(Proven {
            account_id: t.account_id,
            nonce: token.to_owned(),
            keep_from_ms: t.expires_at_ms,
            token: true,
        }),
        Ok(Err(detail)) => Err(Decision::declined(DeclineReason::TokenInvalid, detail)),
        Err(e) => Err(Decision::declined(
            DeclineReason::Internal,
            format!("token check unavailable: {e}"),
        )),
    }
}

async fn authorize_verified(
    request: &AuthorizeRequest,
    proven: &Proven,
    journal: &Addr<JournalActor>,
    uplink: Option<&Addr<UplinkActor>>,
    cloud_timeout: Duration,
) -> Decision {
    let nonce = proven.nonce.clone();
    let reserve = JournalCmd::ReserveNonce {
        account_id: proven.account_id.clone(),
        nonce: nonce.clone(),
        payment_id: request.payment_id.clone(),
        issued_at_ms: proven.keep_from_ms,
    };
    match journal.send(reserve).await {
        Ok(Ok(JournalAnswer::Reservation(Reservation::Fresh | Reservation::SamePayment))) => {}
        Ok(Ok(JournalAnswer::Reservation(Reservation::Replayed { first_payment_id })))
            if proven.token =>
        {
            return Decision::declined(
                DeclineReason::TokenInvalid,
                format!(
                    "this payment token was already spent on {first_payment_id}; verify the \
                     customer again"
                ),
            )
        }
        Ok(Ok(JournalAnswer::Reservation(Reservation::Replayed { first_payment_id }))) => {
            return Decision::declined(
                DeclineReason::CodeReplayed,
                format!(
                    "this payment code was already used for {first_payment_id}; show a fresh code"
                ),
            )
        }
        other => {
            tracing::error!(?other, "nonce reservation failed");
            return Decision::declined(
                DeclineReason::Internal,
                "the store system could not record the code",
            );
        }
    }
    let Some(uplink) = uplink else {
        return Decision::declined(DeclineReason::CloudUnreachable, "the hub is still starting");
    };
    let call = CallCloud {
        body: HubRequestBody::Authorize(CloudAuthorize {
            payment_id: request.payment_id.clone(),
            account_id: proven.account_id.clone(),
            code_nonce: nonce.clone(),
            amount_minor: request.amount_minor,
            currency: request.currency,
            terminal_id: request.terminal_id.clone(),
            order_id: request.order_id.clone(),
        }),
        timeout: cloud_timeout,
    };
    let failure = match uplink.send(call).await {
        Ok(Ok(CloudReplyBody::Authorized { decision, .. })) => return decision,
        // Not sent: nothing can have been applied, so there is nothing to void.
        Ok(Err(error @ (HubError::CircuitOpen(_) | HubError::UplinkSaturated))) => {
            return Decision::declined(
                DeclineReason::CloudUnreachable,
                format!("{error}; nothing was charged"),
            )
        }
        Ok(Ok(CloudReplyBody::Error { detail })) => {
            // The cloud aborted the transaction: nothing was applied.
            return Decision::declined(
                DeclineReason::Internal,
                format!("the cloud failed: {detail}"),
            );
        }
        Ok(Ok(other)) => format!("unexpected cloud answer {other:?}"),
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    // No answer: the cloud may or may not have applied it. Void the attempt so that the cloud
    // either moves the money back or refuses it when it arrives late; the edge hears a decline.
    let void = VoidPayment {
        payment_id: request.payment_id.clone(),
        account_id: proven.account_id.clone(),
        code_nonce: nonce,
    };
    match journal.send(JournalCmd::QueueVoid(void.clone())).await {
        Ok(Ok(_)) => {
            let (uplink, journal) = (uplink.clone(), journal.clone());
            actix::spawn(async move { deliver_void(&uplink, &journal, void).await });
        }
        other => tracing::error!(
            ?other,
            payment_id = request.payment_id,
            "queueing a void failed"
        ),
    }
    Decision::declined(
        DeclineReason::CloudUnreachable,
        format!("{failure}; nothing was charged"),
    )
}
