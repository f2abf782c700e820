//! Face verification at the hub: identify a face in the hot set (asking the cloud on a miss),
//! confirm a code's owner by face, ask for the second factor when a match is not conclusive,
//! lock face payment after repeated wrong answers, and issue single-use payment tokens.

use std::{
    collections::HashMap,
    pin::Pin,
    time::{Duration, Instant},
};

use actix::prelude::*;
use paycode::SignedCode;
use protocol::{
    CloudIdentify, CloudReplyBody, DeclineReason, HotEntry, HubRequestBody, SecondFactorAnswer,
    SecondFactorKind, TemplateBatch, TemplateChange, VerifyBody, VerifyReply, VerifyRequest,
};
use rand::RngCore;

use crate::{
    config::IdentifyConfig,
    hotset::{HotSet, LockoutPolicy, Scored},
    journal::{JournalWorker, Reservation},
    messages::{CheckCode, RedeemToken, Token},
    uplink::{CallCloud, UplinkActor, UplinkEvent},
};

/// Deadline of template syncs.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired tokens and challenges are dropped.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// Mailbox bound.
pub const VERIFY_MAILBOX: usize = 256;

#[derive(Debug, Clone)]
struct Challenge {
    terminal_id: String,
    /// Accounts the answer may belong to, the likeliest first; a wrong answer counts against it.
    candidates: Vec<String>,
    kind: SecondFactorKind,
    expires_at_ms: u64,
}

/// What the verify actor needs to know.
#[derive(Debug, Clone)]
pub struct VerifySettings {
    /// The store.
    pub store_id: String,
    /// Thresholds, lifetimes, lockout.
    pub identify: IdentifyConfig,
    /// Deadline of a cloud 1:N search.
    pub identify_timeout: Duration,
}

/// Metrics of the verify actor.
#[derive(Clone)]
pub struct VerifyMetrics {
    /// Verifications by outcome.
    pub outcomes: prometheus::IntCounterVec,
    /// Templates in the hot set.
    pub hot_templates: prometheus::IntGauge,
    /// Identification latency (hot set search), seconds.
    pub identify_seconds: prometheus::Histogram,
}

impl VerifyMetrics {
    /// Registers on a registry.
    pub fn register(registry: &prometheus::Registry) -> Self {
        let outcomes = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "facepay_hub_verifications_total",
                "face verifications by outcome: verified, second_factor_required, or a decline reason",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(outcomes.clone()))
            .expect("registered once");
        let identify_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "facepay_hub_identify_seconds",
                "time to search the hot set for one face",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(identify_seconds.clone()))
            .expect("registered once");
        VerifyMetrics {
            outcomes,
            hot_templates: telemetry::register_gauge(
                registry,
                "facepay_hub_hot_templates",
                "face templates in the store's hot set",
            ),
            identify_seconds,
        }
    }

    fn count(&self, reply: &VerifyReply) {
        let outcome = match reply {
            VerifyReply::Verified { .. } => "verified",
            VerifyReply::SecondFactorRequired { .. } => "second_factor_required",
            VerifyReply::Refused { reason, .. } => reason.as_str(),
        };
        self.outcomes.with_label_values(&[outcome]).inc();
    }
}

/// Owns the hot set, the tokens, the challenges and the lockouts.
pub struct VerifyActor {
    settings: VerifySettings,
    hot: HotSet,
    tokens: HashMap<String, Token>,
    challenges: HashMap<String, Challenge>,
    policy: LockoutPolicy,
    auth: Recipient<CheckCode>,
    clock: clock::SharedClock,
    journal: JournalWorker,
    uplink: Option<Addr<UplinkActor>>,
    metrics: VerifyMetrics,
    syncing: bool,
}

fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// What the identification rule concluded from the scores.
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    /// Nobody close enough.
    Unknown,
    /// This account, conclusively.
    Accept(String),
    /// Probably these accounts (likeliest first): ask the second factor.
    Ask(Vec<String>),
}

/// The identification rule: accept when the best score clears the accept threshold and beats any
/// matching runner-up by the margin; ask for the second factor when the best two are close or the
/// best is in the grey zone between the match and accept thresholds.
pub fn conclude(top: &[Scored], rule: &IdentifyConfig) -> Conclusion {
    let Some(best) = top.first().filter(|b| b.score >= rule.match_threshold) else {
        return Conclusion::Unknown;
    };
    let close = top
        .get(1)
        .filter(|second| {
            second.score >= rule.match_threshold && best.score - second.score < rule.margin
        })
        .map(|s| s.account_id.clone());
    match close {
        Some(second) => Conclusion::Ask(vec![best.account_id.clone(), second]),
        None if best.score < rule.accept_threshold => {
            Conclusion::Ask(vec![best.account_id.clone()])
        }
        None => Conclusion::Accept(best.account_id.clone()),
    }
}

impl VerifyActor {
    /// A verify actor over an opened hot set.
    pub fn new(
        settings: VerifySettings,
        hot: HotSet,
        auth: Recipient<CheckCode>,
        journal: JournalWorker,
        metrics: VerifyMetrics,
        clock: clock::SharedClock,
    ) -> Self {
        let policy = LockoutPolicy {
            free: settings.identify.free_failures,
            base_ms: settings.identify.lockout_base_seconds * 1000,
            max_ms: settings.identify.lockout_max_seconds * 1000,
        };
        metrics.hot_templates.set(hot.template_count() as i64);
        VerifyActor {
            settings,
            hot,
            tokens: HashMap::new(),
            challenges: HashMap::new(),
            policy,
            auth,
            journal,
            clock,
            uplink: None,
            metrics,
            syncing: false,
        }
    }

    fn top2(&self, embedding: &[f32]) -> Vec<Scored> {
        let started = Instant::now();
        let top = self.hot.index().top2(embedding);
        self.metrics
            .identify_seconds
            .observe(started.elapsed().as_secs_f64());
        top
    }

    fn cache(&mut self, entries: Vec<HotEntry>) {
        if entries.is_empty() {
            return;
        }
        if let Err(error) = self.hot.upsert(entries, self.clock.now_ms()) {
            tracing::warn!(%error, "caching templates from the cloud failed");
        }
        self.metrics
            .hot_templates
            .set(self.hot.template_count() as i64);
    }

    fn locked(&self, account_id: &str) -> Option<VerifyReply> {
        let state = self.hot.lockout(account_id);
        let now = self.clock.now_ms();
        (state.locked_until_ms > now).then(|| {
            VerifyReply::refused(
                DeclineReason::FacePaymentLocked,
                format!(
                    "face payment is locked after {} wrong second factors; retry in {} s or pay \
                     with a code",
                    state.failures,
                    (state.locked_until_ms - now).div_ceil(1000)
                ),
            )
        })
    }

    fn issue_token(&mut self, account_id: &str, terminal_id: &str) -> VerifyReply {
        if let Some(locked) = self.locked(account_id) {
            return locked;
        }
        let expires_at_ms = self.clock.now_ms() + self.settings.identify.token_ttl_seconds * 1000;
        let token = random_id("tok_");
        self.tokens.insert(
            token.clone(),
            Token {
                account_id: account_id.to_owned(),
                terminal_id: terminal_id.to_owned(),
                expires_at_ms,
            },
        );
        self.hot.seen(account_id, self.clock.now_ms());
        VerifyReply::Verified {
            token,
            account_id: account_id.to_owned(),
            expires_at_ms,
        }
    }

    fn challenge(&mut self, candidates: Vec<String>, terminal_id: &str) -> VerifyReply {
        if let Some(locked) = self.locked(&candidates[0]) {
            return locked;
        }
        let kind = self
            .hot
            .get(&candidates[0])
            .map(|e| e.second_factor)
            .unwrap_or(SecondFactorKind::Pin);
        let expires_at_ms =
            self.clock.now_ms() + self.settings.identify.challenge_ttl_seconds * 1000;
        let challenge_id = random_id("chl_");
        self.challenges.insert(
            challenge_id.clone(),
            Challenge {
                terminal_id: terminal_id.to_owned(),
                candidates,
                kind,
                expires_at_ms,
            },
        );
        VerifyReply::SecondFactorRequired {
            challenge_id,
            kind,
            expires_at_ms,
        }
    }

    fn act_on(&mut self, conclusion: Conclusion, terminal_id: &str) -> VerifyReply {
        match conclusion {
            Conclusion::Unknown => VerifyReply::refused(
                DeclineReason::FaceNotRecognized,
                "this face matches no enrolled customer; pay with a code or enroll",
            ),
            Conclusion::Accept(account) => self.issue_token(&account, terminal_id),
            Conclusion::Ask(candidates) => self.challenge(candidates, terminal_id),
        }
    }

    fn apply_batch(&mut self, batch: TemplateBatch) {
        let mut upserts = Vec::new();
        for update in batch.updates {
            match update.change {
                TemplateChange::Upsert(entry) => upserts.push(entry),
                TemplateChange::Revoke { account_id } => {
                    upserts.retain(|e: &HotEntry| e.account_id != account_id);
                    self.tokens.retain(|_, t| t.account_id != account_id);
                    self.challenges
                        .retain(|_, c| !c.candidates.contains(&account_id));
                    match self.hot.revoke(&account_id) {
                        Ok(true) => tracing::info!(account_id, "templates revoked"),
                        Ok(false) => {}
                        Err(error) => tracing::error!(%error, account_id, "revoking failed"),
                    }
                }
            }
        }
        self.cache(upserts);
        self.metrics
            .hot_templates
            .set(self.hot.template_count() as i64);
    }

    fn start_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.syncing {
            return;
        }
        self.syncing = true;
        let call = uplink.send(CallCloud {
            body: HubRequestBody::TemplateSync {
                after_version: self.hot.sync_cursor(),
            },
            timeout: SYNC_TIMEOUT,
        });
        ctx.spawn(call.into_actor(self).map(|result, actor, ctx| {
            actor.syncing = false;
            match result {
                Ok(Ok(CloudReplyBody::Templates(batch))) => {
                    let (more, cursor) = (batch.more, batch.up_to_version);
                    actor.apply_batch(batch);
                    if let Err(error) = actor.hot.set_sync_cursor(cursor) {
                        tracing::error!(%error, "saving the template cursor failed");
                    }
                    if more {
                        actor.start_sync(ctx);
                    }
                }
                Ok(Ok(other)) => tracing::warn!(?other, "unexpected answer to template sync"),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "template sync failed; retried on reconnect")
                }
                Err(error) => tracing::warn!(%error, "uplink unavailable for template sync"),
            }
        }));
    }

    /// Asks the cloud; returns the candidates it sent (already cached), or none when it is
    /// unreachable.
    fn ask_cloud(
        &self,
        embedding: Vec<f32>,
        account_id: Option<String>,
    ) -> impl std::future::Future<Output = Vec<HotEntry>> {
        let uplink = self.uplink.clone();
        let timeout = self.settings.identify_timeout;
        async move {
            let Some(uplink) = uplink else {
                return Vec::new();
            };
            let call = CallCloud {
                body: HubRequestBody::Identify(CloudIdentify {
                    embedding,
                    account_id,
                }),
                timeout,
            };
            match uplink.send(call).await {
                Ok(Ok(CloudReplyBody::Identified(found))) => found.candidates,
                other => {
                    tracing::info!(
                        ?other,
                        "cloud identify unavailable; deciding on the hot set"
                    );
                    Vec::new()
                }
            }
        }
    }
}

impl Actor for VerifyActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(VERIFY_MAILBOX);
        ctx.run_interval(PRUNE_INTERVAL, |actor, _| {
            let now = actor.clock.now_ms();
            actor.tokens.retain(|_, t| t.expires_at_ms > now);
            actor.challenges.retain(|_, c| c.expires_at_ms > now);
        });
    }
}

/// Give the actor its uplink.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachUplink(pub Addr<UplinkActor>);

impl Handler<AttachUplink> for VerifyActor {
    type Result = ();
    fn handle(&mut self, msg: AttachUplink, _: &mut Self::Context) {
        self.uplink = Some(msg.0);
    }
}

impl Handler<UplinkEvent> for VerifyActor {
    type Result = ();
    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        match msg {
            UplinkEvent::CloudConnected => self.start_sync(ctx),
            UplinkEvent::TemplatesPushed(batch) => self.apply_batch(batch),
            UplinkEvent::KeysBroadcast(_)
            | UplinkEvent::AllowancesPushed(_)
            | UplinkEvent::RevocationListPushed(_) => {}
        }
    }
}

impl Handler<RedeemToken> for VerifyActor {
    type Result = Result<Token, String>;
    fn handle(&mut self, msg: RedeemToken, _: &mut Self::Context) -> Self::Result {
        let token = self
            .tokens
            .get(&msg.token)
            .ok_or("unknown or expired payment token; verify the customer again")?;
        if token.expires_at_ms <= self.clock.now_ms() {
            return Err("the payment token expired; verify the customer again".into());
        }
        if token.terminal_id != msg.terminal_id {
            return Err("the payment token was issued to another terminal".into());
        }
        Ok(token.clone())
    }
}

/// Verify a customer for an edge.
#[derive(Message)]
#[rtype(result = "VerifyReply")]
pub struct Verify(pub VerifyRequest);

impl Handler<Verify> for VerifyActor {
    type Result = ResponseActFuture<Self, VerifyReply>;

    fn handle(&mut self, msg: Verify, _: &mut Self::Context) -> Self::Result {
        let request = msg.0;
        let refuse = |reply: VerifyReply| Box::pin(fut::ready(reply)) as Self::Result;
        if request.store_id != self.settings.store_id {
            return refuse(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                format!("this hub serves store {}", self.settings.store_id),
            ));
        }
        if let Err(e) = protocol::validate_id("terminal_id", &request.terminal_id) {
            return refuse(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                e.to_string(),
            ));
        }
        let terminal = request.terminal_id.clone();
        let fut: Self::Result = match request.body {
            VerifyBody::Face { embedding } => {
                if let Err(e) = protocol::validate_embedding(&embedding) {
                    return refuse(VerifyReply::refused(DeclineReason::InvalidRequest, e));
                }
                let top = self.top2(&embedding);
                let conclusion = conclude(&top, &self.settings.identify);
                if conclusion != Conclusion::Unknown {
                    refuse(self.act_on(conclusion, &terminal))
                } else {
                    // Not in the hot set: the cloud searches everyone; a hit is cached here.
                    let ask = self.ask_cloud(embedding.clone(), None);
                    Box::pin(ask.into_actor(self).map(move |found, actor, _| {
                        actor.cache(found);
                        let top = actor.top2(&embedding);
                        let conclusion = conclude(&top, &actor.settings.identify);
                        actor.act_on(conclusion, &terminal)
                    }))
                }
            }
            VerifyBody::CodeAndFace { code, embedding } => {
                if let Err(e) = protocol::validate_embedding(&embedding) {
                    return refuse(VerifyReply::refused(DeclineReason::InvalidRequest, e));
                }
                let auth = self.auth.clone();
                let journal = self.journal.clone();
                let checked = async move {
                    let code: SignedCode = match auth.send(CheckCode(code)).await {
                        Ok(Ok(code)) => code,
                        Ok(Err(decision)) => {
                            let (reason, detail) = match decision {
                                protocol::Decision::Declined { reason, detail } => (reason, detail),
                                protocol::Decision::Approved { .. } => {
                                    (DeclineReason::Internal, String::new())
                                }
                            };
                            return Err(VerifyReply::refused(reason, detail));
                        }
                        Err(e) => {
                            return Err(VerifyReply::refused(
                                DeclineReason::Internal,
                                format!("code check unavailable: {e}"),
                            ))
                        }
                    };
                    // The code is single-use: spent on this verification.
                    let (account_id, nonce, issued_at_ms) =
                        (code.account_id.clone(), code.nonce_hex(), code.issued_at_ms);
                    let reservation = journal
                        .run(move |j| {
                            let payment_id = format!("verify:{nonce}");
                            j.reserve_nonce(&account_id, &nonce, &payment_id, issued_at_ms)
                        })
                        .await;
                    match reservation {
                        Reservation::Fresh => Ok(code),
                        Reservation::Expired => Err(VerifyReply::refused(
                            DeclineReason::CodeExpired,
                            "this payment code is too old; show a fresh code",
                        )),
                        Reservation::SamePayment
                        | Reservation::Replayed { .. }
                        | Reservation::Voided => Err(VerifyReply::refused(
                            DeclineReason::CodeReplayed,
                            "this payment code was already used; show a fresh code",
                        )),
                    }
                };
                Box::pin(checked.into_actor(self).then(move |checked, actor, _| {
                    let code = match checked {
                        Ok(code) => code,
                        Err(reply) => {
                            return Box::pin(fut::ready(reply))
                                as Pin<Box<dyn ActorFuture<Self, Output = VerifyReply>>>
                        }
                    };
                    let account = code.account_id.clone();
                    let held = actor.hot.index().score_account(&account, &embedding);
                    let fetch = if held.is_none() {
                        Some(actor.ask_cloud(embedding.clone(), Some(account.clone())))
                    } else {
                        None
                    };
                    Box::pin(
                        async move {
                            match fetch {
                                Some(f) => f.await,
                                None => Vec::new(),
                            }
                        }
                        .into_actor(actor)
                        .map(move |found, actor, _| {
                            actor.cache(found);
                            actor.one_to_one(&account, &embedding, &terminal)
                        }),
                    )
                }))
            }
            VerifyBody::SecondFactor(answer) => self.second_factor(answer, terminal),
        };
        Box::pin(fut.map(|reply, actor, _| {
            actor.metrics.count(&reply);
            reply
        }))
    }
}

impl VerifyActor {
    fn one_to_one(&mut self, account: &str, embedding: &[f32], terminal: &str) -> VerifyReply {
        let Some(score) = self.hot.index().score_account(account, embedding) else {
            return VerifyReply::refused(
                DeclineReason::FaceNotRecognized,
                format!("account {account} has no enrolled face here or the cloud is unreachable"),
            );
        };
        if score < self.settings.identify.match_threshold {
            return VerifyReply::refused(
                DeclineReason::FaceMismatch,
                format!(
                    "the face does not match the owner of this payment code (cosine {score:.2})"
                ),
            );
        }
        if score < self.settings.identify.accept_threshold {
            return self.challenge(vec![account.to_owned()], terminal);
        }
        self.issue_token(account, terminal)
    }

    fn second_factor(
        &mut self,
        answer: SecondFactorAnswer,
        terminal: String,
    ) -> <Self as Handler<Verify>>::Result {
        let refuse =
            |reply: VerifyReply| Box::pin(fut::ready(reply)) as <Self as Handler<Verify>>::Result;
        // One answer per challenge: a wrong one needs a new look at the camera.
        let Some(challenge) = self.challenges.remove(&answer.challenge_id) else {
            return refuse(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                "unknown or expired second-factor challenge; verify the customer again",
            ));
        };
        if challenge.terminal_id != terminal || challenge.expires_at_ms <= self.clock.now_ms() {
            return refuse(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                "unknown or expired second-factor challenge; verify the customer again",
            ));
        }
        if let Some(locked) = self.locked(&challenge.candidates[0]) {
            return refuse(locked);
        }
        let hashes: Vec<(String, String)> = challenge
            .candidates
            .iter()
            .filter_map(|account| {
                self.hot
                    .get(account)
                    .filter(|e| e.second_factor == challenge.kind)
                    .map(|e| (account.clone(), e.second_factor_hash.clone()))
            })
            .collect();
        let value = answer.value;
        // Argon2 takes tens of milliseconds: off the actor's thread.
        let check = tokio::task::spawn_blocking(move || {
            let well_formed =
                (4..=8).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
            hashes
                .into_iter()
                .find(|(_, hash)| well_formed && hash_matches(&value, hash))
                .map(|(account, _)| account)
        });
        Box::pin(
            check
                .into_actor(self)
                .map(move |matched, actor, _| match matched {
                    Ok(Some(account)) => {
                        if let Err(error) = actor.hot.set_lockout(&account, Default::default()) {
                            tracing::error!(%error, "clearing the lockout failed");
                        }
                        actor.issue_token(&account, &terminal)
                    }
                    Ok(None) => {
                        let account = &challenge.candidates[0];
                        let state = actor
                            .policy
                            .fail(actor.hot.lockout(account), actor.clock.now_ms());
                        if let Err(error) = actor.hot.set_lockout(account, state) {
                            tracing::error!(%error, "recording the lockout failed");
                        }
                        let detail = if state.locked_until_ms > 0 {
                            format!(
                                "wrong {}; face payment is now locked for {} s",
                                challenge.kind.as_str(),
                                (state.locked_until_ms - actor.clock.now_ms()).div_ceil(1000)
                            )
                        } else {
                            format!(
                                "wrong {}; face payment locks after {} more wrong answers",
                                challenge.kind.as_str(),
                                actor.policy.free + 1 - state.failures
                            )
                        };
                        VerifyReply::refused(DeclineReason::SecondFactorWrong, detail)
                    }
                    Err(e) => VerifyReply::refused(DeclineReason::Internal, e.to_string()),
                }),
        )
    }
}

/// Checks a second factor against its Argon2id PHC string.
pub fn hash_matches(value: &str, phc: &str) -> bool {
    use argon2::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc)
        .map(|hash| {
            argon2::Argon2::default()
                .verify_password(value.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(pairs: &[(&str, f32)]) -> Vec<Scored> {
        pairs
            .iter()
            .map(|(a, s)| Scored {
                account_id: a.to_string(),
                score: *s,
            })
            .collect()
    }

    #[test]
    fn the_rule_accepts_asks_or_refuses() {
        let rule = IdentifyConfig::default();
        assert_eq!(conclude(&[], &rule), Conclusion::Unknown);
        assert_eq!(
            conclude(&scored(&[("a", 0.30)]), &rule),
            Conclusion::Unknown
        );
        assert_eq!(
            conclude(&scored(&[("a", 0.80), ("b", 0.20)]), &rule),
            Conclusion::Accept("a".into())
        );
        // Grey zone.
        assert_eq!(
            conclude(&scored(&[("a", 0.40), ("b", 0.10)]), &rule),
            Conclusion::Ask(vec!["a".into()])
        );
        // Look-alikes: both match, within the margin.
        assert_eq!(
            conclude(&scored(&[("a", 0.80), ("b", 0.75)]), &rule),
            Conclusion::Ask(vec!["a".into(), "b".into()])
        );
        // Both match but far apart: the best wins.
        assert_eq!(
            conclude(&scored(&[("a", 0.80), ("b", 0.50)]), &rule),
            Conclusion::Accept("a".into())
        );
        // Close, but the runner-up does not match at all.
        assert_eq!(
            conclude(&scored(&[("a", 0.46), ("b", 0.35)]), &rule),
            Conclusion::Accept("a".into())
        );
    }

    #[test]
    fn second_factor_hashes_verify() {
        use argon2::{password_hash::SaltString, PasswordHasher};
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let phc = argon2::Argon2::default()
            .hash_password(b"4821", &salt)
            .unwrap()
            .to_string();
        assert!(hash_matches("4821", &phc));
        assert!(!hash_matches("4822", &phc));
        assert!(!hash_matches("4821", "garbage"));
    }
}
