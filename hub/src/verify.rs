//! Face verification at the hub: identify a face in the hot set (asking the cloud on a miss),
//! confirm a code's owner by face, ask for the second factor when a match is not conclusive,
//! lock face payment after repeated wrong answers, and issue single-use payment tokens.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    time::{Duration, Instant},
};

use actix::prelude::*;
use paycode::SignedCode;
use protocol::{
    AccountId, CloudIdentify, CloudReplyBody, CodeNonce, DeclineReason, FactorReport, HotEntry,
    HubRequestBody, Lockout, LockoutBatch, PayerEvidence, PaymentId, SecondFactorAnswer,
    SecondFactorKind, TemplateBatch, TemplateChange, TerminalId, VerifyBody, VerifyReply,
    VerifyRequest,
};

use crate::{
    config::IdentifyConfig,
    credentials::{
        make_room, CheckCode, CredentialsActor, ForgetAccounts, IssueToken, TokenNotIssued,
    },
    error::HubError,
    hotset::{HotSet, HotSetWorker, LockoutPolicy, Scored},
    journal::{JournalWorker, Reservation},
    uplink::{CallCloud, UplinkActor, UplinkEvent},
};

/// Deadline of template syncs.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired challenges are dropped.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// Mailbox bound.
pub const VERIFY_MAILBOX: usize = 256;
/// Second-factor results the cloud did not take (unreachable, busy) kept to report again; beyond,
/// the oldest is dropped (this hub's own count still holds it).
pub const MAX_UNREPORTED: usize = 1_024;
/// Kept second-factor results reported again per reconnect, and per prune tick while connected.
pub const RESEND_BATCH: usize = 8;

/// Most second-factor challenges open at once (terminals open them, one per verification of a
/// look-alike); expired ones are dropped first, and a terminal holds at most
/// [`crate::credentials::MAX_OPEN_PER_TERMINAL`] of them.
pub const MAX_OPEN_CHALLENGES: usize = 4_096;

#[derive(Debug, Clone)]
struct Challenge {
    terminal_id: TerminalId,
    /// Accounts the answer may belong to, the likeliest first; a wrong answer counts against it.
    candidates: Vec<AccountId>,
    kind: SecondFactorKind,
    expires_at_ms: u64,
    /// Asked after a code and face: the code's nonce, which the token will carry.
    spent_code: Option<CodeNonce>,
    /// The face (and code) shown, which the token will carry to the cloud.
    evidence: PayerEvidence,
}

impl crate::credentials::OpenVerification for Challenge {
    fn terminal(&self) -> &str {
        &self.terminal_id
    }

    fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }
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
    /// Verifications by outcome, declines by reason.
    pub verifications: telemetry::VerificationMetrics,
    /// Templates in the hot set.
    pub hot_templates: prometheus::IntGauge,
    /// Identification latency (hot set search), seconds.
    pub identify_seconds: prometheus::Histogram,
}

impl VerifyMetrics {
    /// Registers on a registry.
    pub fn register(registry: &prometheus::Registry) -> Self {
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
            verifications: telemetry::VerificationMetrics::register(registry, "hub"),
            hot_templates: telemetry::register_gauge(
                registry,
                "facepay_hub_hot_templates",
                "face templates in the store's hot set",
            ),
            identify_seconds,
        }
    }

    fn count(&self, reply: &VerifyReply) {
        self.verifications.reply(reply);
    }
}

/// What the identification rule concluded from the scores.
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    /// Nobody close enough.
    Unknown,
    /// This account, conclusively.
    Accept(AccountId),
    /// Probably these accounts (likeliest first): ask the second factor.
    Ask(Vec<AccountId>),
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

/// Owns the identification rule, the challenges and the lockout policy. The hot set (templates,
/// lockouts, the exact index) lives on its own thread ([`HotSetWorker`]): the top-2 scan and sled
/// writes never run on the actix thread. Tokens are the credentials actor's.
pub struct VerifyActor {
    settings: VerifySettings,
    hot: HotSetWorker,
    challenges: HashMap<String, Challenge>,
    /// Accounts whose second factor is being checked: another answer for one of them waits for
    /// no check (each guess is counted before the next is checked).
    checking: HashSet<AccountId>,
    policy: LockoutPolicy,
    credentials: Addr<CredentialsActor>,
    clock: clock::SharedClock,
    journal: JournalWorker,
    uplink: Option<Addr<UplinkActor>>,
    metrics: VerifyMetrics,
    syncing: bool,
    /// Second-factor results the cloud did not take yet, oldest first: reported again when it
    /// is back, so that wrong answers given while the store was cut off count across the fleet.
    unreported: std::collections::VecDeque<FactorReport>,
}

/// Whom the verify actor asks.
pub struct VerifyPeers {
    /// The hot set's thread.
    pub hot: HotSetWorker,
    /// Keys (to check a code) and tokens (to issue one).
    pub credentials: Addr<CredentialsActor>,
    /// The journal (a code shown with a face is spent there).
    pub journal: JournalWorker,
    /// The cloud (1:N search on a miss, template sync).
    pub uplink: Option<Addr<UplinkActor>>,
}

/// What a verification leads to, decided on the hot set's thread.
#[derive(Debug, Clone, PartialEq)]
enum Next {
    /// Answer this.
    Reply(VerifyReply),
    /// Issue a payment token for this account.
    Token(AccountId),
    /// Ask the second factor of these accounts (likeliest first).
    Challenge {
        candidates: Vec<AccountId>,
        kind: SecondFactorKind,
    },
}

fn not_recognized() -> Next {
    Next::Reply(VerifyReply::refused(
        DeclineReason::FaceNotRecognized,
        "this face matches no enrolled customer; pay with a code or enroll",
    ))
}

/// The refusal for an account whose face payment is locked at `now`.
fn locked(hot: &HotSet, account_id: &str, now: u64) -> Option<VerifyReply> {
    let state = hot.lockout(account_id);
    (state.locked_until_ms > now).then(|| {
        VerifyReply::refused(
            DeclineReason::FacePaymentLocked,
            format!(
                "face payment is locked after {} wrong second factors; retry in {} s or pay with \
                 a code",
                state.failures,
                (state.locked_until_ms - now).div_ceil(1000)
            ),
        )
    })
}

/// The second-factor hashes a challenge's answer is checked against (hot set thread): those of
/// the candidates not locked. Every candidate locked: the refusal. A locked account is never
/// unlocked by a right answer given for a challenge it shares with another.
fn answerable(
    hot: &HotSet,
    candidates: &[AccountId],
    kind: SecondFactorKind,
    now: u64,
) -> Result<Vec<(AccountId, String)>, VerifyReply> {
    let open: Vec<&AccountId> = candidates
        .iter()
        .filter(|account| locked(hot, account, now).is_none())
        .collect();
    if open.is_empty() {
        let first = candidates.first().map_or("", |a| a.as_str());
        return Err(locked(hot, first, now).unwrap_or_else(|| {
            VerifyReply::refused(DeclineReason::FacePaymentLocked, "face payment is locked")
        }));
    }
    Ok(open
        .into_iter()
        .filter_map(|account| {
            hot.get(account)
                .filter(|e| e.second_factor == kind)
                .map(|e| (account.clone(), e.second_factor_hash.clone()))
        })
        .collect())
}

/// What an answer to a challenge leads to (hot set thread): the account it matched gets its
/// token and its lockout cleared; a wrong answer counts against every candidate of the challenge
/// (one wrong guess must not leave the second candidate free to be guessed next).
fn settle_answer(
    hot: &mut HotSet,
    candidates: &[AccountId],
    kind: SecondFactorKind,
    matched: Option<AccountId>,
    policy: LockoutPolicy,
    now: u64,
) -> (Next, FactorReport) {
    if let Some(account) = matched {
        let held = hot.lockout(&account);
        let cleared = Lockout {
            version: held.version,
            resets: held.resets,
            ..Lockout::default()
        };
        if let Err(error) = hot.set_lockout(&account, cleared) {
            tracing::error!(%error, "clearing the lockout failed");
        }
        hot.seen(&account, now);
        let report = FactorReport {
            failed: Vec::new(),
            passed: Some(account.clone()),
        };
        return (Next::Token(account), report);
    }
    let mut first_state = None;
    for account in candidates {
        let state = policy.fail(hot.lockout(account), now);
        if let Err(error) = hot.set_lockout(account, state) {
            tracing::error!(%error, "recording the lockout failed");
        }
        first_state.get_or_insert(state);
    }
    let state = first_state.unwrap_or_default();
    let detail = if state.locked_until_ms > 0 {
        format!(
            "wrong {}; face payment is now locked for {} s",
            kind.as_str(),
            (state.locked_until_ms - now).div_ceil(1000)
        )
    } else {
        format!(
            "wrong {}; face payment locks after {} more wrong answers",
            kind.as_str(),
            (policy.free + 1).saturating_sub(state.failures)
        )
    };
    let report = FactorReport {
        failed: candidates.to_vec(),
        passed: None,
    };
    (
        Next::Reply(VerifyReply::refused(
            DeclineReason::SecondFactorWrong,
            detail,
        )),
        report,
    )
}

/// What a conclusion of the rule leads to (hot set thread).
fn next_for(hot: &mut HotSet, conclusion: Conclusion, now: u64) -> Next {
    match conclusion {
        Conclusion::Unknown => not_recognized(),
        Conclusion::Accept(account) => match locked(hot, &account, now) {
            Some(refused) => Next::Reply(refused),
            None => {
                hot.seen(&account, now);
                Next::Token(account)
            }
        },
        Conclusion::Ask(candidates) => match locked(hot, &candidates[0], now) {
            Some(refused) => Next::Reply(refused),
            None => {
                let kind = hot
                    .get(&candidates[0])
                    .map(|e| e.second_factor)
                    .unwrap_or(SecondFactorKind::Pin);
                Next::Challenge { candidates, kind }
            }
        },
    }
}

/// 1:N in the hot set (hot set thread): none when nobody is close enough.
fn identify(
    hot: &mut HotSet,
    embedding: &[f32],
    rule: &IdentifyConfig,
    now: u64,
    metrics: &VerifyMetrics,
) -> Option<Next> {
    let started = Instant::now();
    let top = hot.index().top2(embedding);
    metrics
        .identify_seconds
        .observe(started.elapsed().as_secs_f64());
    match conclude(&top, rule) {
        Conclusion::Unknown => None,
        conclusion => Some(next_for(hot, conclusion, now)),
    }
}

/// 1:1 against the account a code named (hot set thread): none when the hot set holds no face
/// of it.
fn one_to_one(
    hot: &mut HotSet,
    account: &str,
    embedding: &[f32],
    rule: &IdentifyConfig,
    now: u64,
) -> Option<Next> {
    let score = hot.index().score_account(account, embedding)?;
    Some(if score < rule.match_threshold {
        Next::Reply(VerifyReply::refused(
            DeclineReason::FaceMismatch,
            format!("the face does not match the owner of this payment code (cosine {score:.2})"),
        ))
    } else if score < rule.accept_threshold {
        next_for(hot, Conclusion::Ask(vec![account.into()]), now)
    } else {
        next_for(hot, Conclusion::Accept(account.into()), now)
    })
}

/// Takes the cloud's lockout states (hot set thread), each only when newer than the one held.
fn apply_lockouts(hot: &mut HotSet, batch: LockoutBatch) {
    for (account, state) in batch.entries {
        if let Err(error) = hot.take_cloud_lockout(&account, state) {
            tracing::error!(%error, "recording a lockout failed");
        }
    }
}

/// Caches templates the cloud sent (hot set thread), except those an erasure or a newer change
/// that reached this hub meanwhile replaced.
fn cache(hot: &mut HotSet, entries: Vec<HotEntry>, now: u64, metrics: &VerifyMetrics) {
    let entries: Vec<HotEntry> = entries
        .into_iter()
        .filter(|e| match hot.admit_answer(&e.account_id, e.version) {
            Ok(admitted) => admitted,
            Err(error) => {
                tracing::warn!(%error, "reading template versions failed");
                false
            }
        })
        .collect();
    if entries.is_empty() {
        return;
    }
    if let Err(error) = hot.upsert(entries, now) {
        tracing::warn!(%error, "caching templates from the cloud failed");
    }
    metrics.hot_templates.set(hot.template_count() as i64);
}

/// Applies a batch of template changes in order (hot set thread); returns the accounts revoked.
fn apply_batch(
    hot: &mut HotSet,
    batch: TemplateBatch,
    now: u64,
    metrics: &VerifyMetrics,
) -> Vec<AccountId> {
    let mut upserts = Vec::new();
    let mut revoked = Vec::new();
    for update in batch.updates {
        let account_id = match &update.change {
            TemplateChange::Upsert(entry) => &entry.account_id,
            TemplateChange::Revoke { account_id } => account_id,
        };
        // An erasure is always applied (it is final, and harmless again); an upsert only when it
        // is newer than the last change applied to the account. Versions that cannot be read
        // do not hold a change back.
        let is_revoke = matches!(update.change, TemplateChange::Revoke { .. });
        match hot.take_change(account_id, update.version) {
            Ok(true) => {}
            Ok(false) if is_revoke => {}
            Ok(false) => {
                tracing::debug!(%account_id, version = update.version, "older template change ignored");
                continue;
            }
            Err(error) => {
                tracing::error!(%error, %account_id, "reading template versions failed");
            }
        }
        match update.change {
            TemplateChange::Upsert(entry) => upserts.push(entry),
            TemplateChange::Revoke { account_id } => {
                upserts.retain(|e: &HotEntry| e.account_id != account_id);
                match hot.revoke(&account_id) {
                    Ok(true) => tracing::info!(%account_id, "templates revoked"),
                    Ok(false) => {}
                    Err(error) => tracing::error!(%error, %account_id, "revoking failed"),
                }
                revoked.push(account_id);
            }
        }
    }
    cache(hot, upserts, now, metrics);
    metrics.hot_templates.set(hot.template_count() as i64);
    revoked
}

/// Asks the cloud's 1:N search (or 1:1 for `account_id`); the candidates it sent, or none when
/// it is unreachable.
async fn ask_cloud(
    uplink: Option<Addr<UplinkActor>>,
    timeout: Duration,
    embedding: Vec<f32>,
    account_id: Option<AccountId>,
) -> Vec<HotEntry> {
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

/// Spends a code shown with a face: checked with the account's key, its nonce reserved in the
/// journal (single use).
async fn spend_code(
    code: String,
    credentials: Addr<CredentialsActor>,
    journal: JournalWorker,
) -> Result<SignedCode, VerifyReply> {
    let code: SignedCode = match credentials.send(CheckCode(code)).await {
        Ok(Ok(code)) => code,
        Ok(Err(refused)) => {
            let (reason, detail) = match refused.decision {
                protocol::Decision::Declined { reason, detail } => (reason, detail),
                protocol::Decision::Approved { .. } => (DeclineReason::Internal, String::new()),
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
    let (account_id, nonce, issued_at_ms) = (
        AccountId::from(&code.account_id),
        CodeNonce::from(code.nonce_hex()),
        code.issued_at_ms,
    );
    let reservation = journal
        .run(move |j| {
            let payment_id = PaymentId::from(format!("verify:{nonce}"));
            j.reserve_nonce(&account_id, &nonce, &payment_id, issued_at_ms)
        })
        .await;
    match reservation {
        Reservation::Fresh => Ok(code),
        Reservation::Expired => Err(VerifyReply::refused(
            DeclineReason::CodeExpired,
            "this payment code is too old; show a fresh code",
        )),
        Reservation::SamePayment | Reservation::Replayed { .. } | Reservation::Voided => {
            Err(VerifyReply::refused(
                DeclineReason::CodeReplayed,
                "this payment code was already used; show a fresh code",
            ))
        }
    }
}

/// Whether the face is the code owner's (`account`): from the hot set, or from the cloud's 1:1
/// answer when the hot set does not hold the account.
async fn confirm_owner(
    hot: HotSetWorker,
    clock: clock::SharedClock,
    metrics: VerifyMetrics,
    rule: IdentifyConfig,
    (uplink, timeout): (Option<Addr<UplinkActor>>, Duration),
    account: AccountId,
    embedding: Vec<f32>,
) -> Next {
    let (probe, first_rule, held) = (embedding.clone(), rule.clone(), account.clone());
    let now = clock.now_ms();
    if let Some(next) = hot
        .call(move |h| one_to_one(h, &held, &probe, &first_rule, now))
        .await
    {
        return next;
    }
    let found = ask_cloud(uplink, timeout, embedding.clone(), Some(account.clone())).await;
    hot.call(move |h| {
        let now = clock.now_ms();
        cache(h, found, now, &metrics);
        one_to_one(h, &account, &embedding, &rule, now).unwrap_or_else(|| {
            Next::Reply(VerifyReply::refused(
                DeclineReason::FaceNotRecognized,
                format!("account {account} has no enrolled face here or the cloud is unreachable"),
            ))
        })
    })
    .await
}

type Answer = Pin<Box<dyn ActorFuture<VerifyActor, Output = VerifyReply>>>;

impl VerifyActor {
    /// A verify actor over a hot set on its own thread.
    pub fn new(
        settings: VerifySettings,
        peers: VerifyPeers,
        metrics: VerifyMetrics,
        clock: clock::SharedClock,
    ) -> Self {
        let policy = LockoutPolicy {
            free: settings.identify.free_failures,
            base_ms: settings.identify.lockout_base_seconds * 1000,
            max_ms: settings.identify.lockout_max_seconds * 1000,
        };
        VerifyActor {
            settings,
            hot: peers.hot,
            challenges: HashMap::new(),
            checking: HashSet::new(),
            policy,
            credentials: peers.credentials,
            journal: peers.journal,
            clock,
            uplink: peers.uplink,
            metrics,
            syncing: false,
            unreported: Default::default(),
        }
    }

    fn challenge(
        &mut self,
        candidates: Vec<AccountId>,
        kind: SecondFactorKind,
        terminal_id: TerminalId,
        spent_code: Option<CodeNonce>,
        evidence: PayerEvidence,
    ) -> VerifyReply {
        let now = self.clock.now_ms();
        if !make_room(&mut self.challenges, MAX_OPEN_CHALLENGES, &terminal_id, now) {
            return VerifyReply::refused(
                DeclineReason::HubBusy,
                "the hub holds as many open second-factor challenges as it may; verify again in \
                 a moment",
            );
        }
        let expires_at_ms = now + self.settings.identify.challenge_ttl_seconds * 1000;
        let challenge_id = crate::credentials::random_id("chl_");
        self.challenges.insert(
            challenge_id.clone(),
            Challenge {
                terminal_id,
                candidates,
                kind,
                expires_at_ms,
                spent_code,
                evidence,
            },
        );
        VerifyReply::SecondFactorRequired {
            challenge_id,
            kind,
            expires_at_ms,
        }
    }

    /// Turns what the hot set decided into the answer: a token from the credentials actor, a
    /// challenge held here, or the reply as is. `spent_code`: the code a code-and-face
    /// verification spent, carried by its token (or its challenge) to the payment.
    fn answer(
        &mut self,
        next: Next,
        terminal_id: TerminalId,
        spent_code: Option<CodeNonce>,
        evidence: PayerEvidence,
    ) -> Answer {
        match next {
            Next::Reply(reply) => Box::pin(fut::ready(reply)),
            Next::Challenge { candidates, kind } => Box::pin(fut::ready(self.challenge(
                candidates,
                kind,
                terminal_id,
                spent_code,
                evidence,
            ))),
            Next::Token(account_id) => {
                let issue = self.credentials.send(IssueToken {
                    account_id: account_id.clone(),
                    terminal_id,
                    ttl_ms: self.settings.identify.token_ttl_seconds * 1000,
                    spent_code,
                    evidence,
                });
                Box::pin(
                    async move {
                        match issue.await {
                            Ok(Ok(issued)) => VerifyReply::Verified {
                                token: issued.token,
                                account_id,
                                expires_at_ms: issued.issued.expires_at_ms,
                            },
                            Ok(Err(why @ TokenNotIssued::Erased)) => VerifyReply::refused(
                                DeclineReason::FaceNotRecognized,
                                why.to_string(),
                            ),
                            Ok(Err(why @ TokenNotIssued::Full)) => {
                                VerifyReply::refused(DeclineReason::HubBusy, why.to_string())
                            }
                            Err(e) => VerifyReply::refused(
                                DeclineReason::Internal,
                                format!("token issue unavailable: {e}"),
                            ),
                        }
                    }
                    .into_actor(self),
                )
            }
        }
    }

    /// Template changes, pushed or synced, applied in order. The revoked accounts' challenges and
    /// tokens go first, at once (the credentials actor then refuses any token for them, even to a
    /// verification already under way); then the actor waits for the hot set's thread (changes
    /// are rare).
    fn apply_templates(
        &mut self,
        batch: TemplateBatch,
        cursor: Option<u64>,
        ctx: &mut Context<Self>,
    ) {
        let revoked: Vec<AccountId> = batch
            .updates
            .iter()
            .filter_map(|u| match &u.change {
                TemplateChange::Revoke { account_id } => Some(account_id.clone()),
                TemplateChange::Upsert(_) => None,
            })
            .collect();
        if !revoked.is_empty() {
            self.challenges
                .retain(|_, c| !c.candidates.iter().any(|a| revoked.contains(a)));
            self.credentials.do_send(ForgetAccounts(revoked));
        }
        let (clock, metrics) = (self.clock.clone(), self.metrics.clone());
        let hot = self.hot.clone();
        let apply = async move {
            hot.call(move |h| {
                let revoked = apply_batch(h, batch, clock.now_ms(), &metrics);
                if let Some(cursor) = cursor {
                    if let Err(error) = h.set_sync_cursor(cursor) {
                        tracing::error!(%error, "saving the template cursor failed");
                    }
                }
                revoked
            })
            .await
        };
        ctx.wait(
            apply
                .into_actor(self)
                .map(|revoked: Vec<AccountId>, actor, _| {
                    // A challenge issued while the hot set was still revoking.
                    actor
                        .challenges
                        .retain(|_, c| !c.candidates.iter().any(|a| revoked.contains(a)));
                }),
        );
    }

    fn start_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.syncing {
            return;
        }
        self.syncing = true;
        let hot = self.hot.clone();
        let sync = async move {
            let after_version = hot.call(|h| h.sync_cursor()).await;
            uplink
                .send(CallCloud {
                    body: HubRequestBody::TemplateSync { after_version },
                    timeout: SYNC_TIMEOUT,
                })
                .await
        };
        ctx.spawn(sync.into_actor(self).map(|result, actor, ctx| {
            actor.syncing = false;
            match result {
                Ok(Ok(CloudReplyBody::Templates(batch))) => {
                    let (more, cursor) = (batch.more, batch.up_to_version);
                    actor.apply_templates(batch, Some(cursor), ctx);
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

    /// Identifies a face: the hot set first, the cloud's 1:N search on a miss (a hit is cached).
    fn face(&mut self, embedding: Vec<f32>, terminal: TerminalId) -> Answer {
        let (hot, clock, metrics) = (self.hot.clone(), self.clock.clone(), self.metrics.clone());
        let rule = self.settings.identify.clone();
        let ask = (self.uplink.clone(), self.settings.identify_timeout);
        let evidence = PayerEvidence {
            second_factor: None,
            attestation: None,
            payment_code: None,
            face_probe: Some(protocol::FaceProbe::new(&embedding)),
        };
        let find = async move {
            let (probe, first_rule, first) = (embedding.clone(), rule.clone(), metrics.clone());
            let now = clock.now_ms();
            if let Some(next) = hot
                .call(move |h| identify(h, &probe, &first_rule, now, &first))
                .await
            {
                return next;
            }
            // Not in the hot set: the cloud searches everyone; a hit is cached here.
            let found = ask_cloud(ask.0, ask.1, embedding.clone(), None).await;
            hot.call(move |h| {
                let now = clock.now_ms();
                cache(h, found, now, &metrics);
                identify(h, &embedding, &rule, now, &metrics).unwrap_or_else(not_recognized)
            })
            .await
        };
        Box::pin(
            find.into_actor(self)
                .then(move |next, actor, _| actor.answer(next, terminal, None, evidence)),
        )
    }

    /// Confirms by face the owner of a code (which is spent on it).
    fn code_and_face(&mut self, code: String, embedding: Vec<f32>, terminal: TerminalId) -> Answer {
        let (hot, clock, metrics) = (self.hot.clone(), self.clock.clone(), self.metrics.clone());
        let rule = self.settings.identify.clone();
        let ask = (self.uplink.clone(), self.settings.identify_timeout);
        let evidence = PayerEvidence {
            second_factor: None,
            attestation: None,
            payment_code: Some(code.clone()),
            face_probe: Some(protocol::FaceProbe::new(&embedding)),
        };
        let spend = spend_code(code, self.credentials.clone(), self.journal.clone());
        let step = async move {
            let (account, spent) = match spend.await {
                Ok(code) => (
                    AccountId::from(&code.account_id),
                    CodeNonce::from(code.nonce_hex()),
                ),
                Err(refused) => return (Next::Reply(refused), None),
            };
            let next = confirm_owner(hot, clock, metrics, rule, ask, account, embedding).await;
            (next, Some(spent))
        };
        Box::pin(
            step.into_actor(self)
                .then(move |(next, spent), actor, _| actor.answer(next, terminal, spent, evidence)),
        )
    }

    /// Checks a second-factor answer: one answer per challenge; a right one for any candidate not
    /// locked issues its token, a wrong one counts against every candidate.
    fn second_factor(&mut self, answer: SecondFactorAnswer, terminal: TerminalId) -> Answer {
        let unknown = || {
            Box::pin(fut::ready(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                "unknown or expired second-factor challenge; verify the customer again",
            ))) as Answer
        };
        // One answer per challenge: a wrong one needs a new look at the camera.
        let Some(challenge) = self.challenges.remove(&answer.challenge_id) else {
            return unknown();
        };
        if challenge.terminal_id != terminal || challenge.expires_at_ms <= self.clock.now_ms() {
            return unknown();
        }
        // One answer at a time per customer: answers given at the same moment would each be
        // checked before any recorded its failure.
        if challenge
            .candidates
            .iter()
            .any(|a| self.checking.contains(a))
        {
            return Box::pin(fut::ready(VerifyReply::refused(
                DeclineReason::InvalidRequest,
                "another answer for this customer is being checked; verify the customer again",
            )));
        }
        self.checking.extend(challenge.candidates.iter().cloned());
        let checked: Vec<AccountId> = challenge.candidates.clone();
        let (hot, clock, policy) = (self.hot.clone(), self.clock.clone(), self.policy);
        let value = answer.value;
        let spent = challenge.spent_code.clone();
        let evidence = challenge.evidence.clone();
        let step = async move {
            let Challenge {
                candidates, kind, ..
            } = challenge;
            let lookup = candidates.clone();
            let now = clock.now_ms();
            let hashes = match hot.call(move |h| answerable(h, &lookup, kind, now)).await {
                Ok(hashes) => hashes,
                Err(refused) => return (Next::Reply(refused), None),
            };
            // Argon2 takes tens of milliseconds: on a blocking thread.
            let matched = tokio::task::spawn_blocking(move || {
                let well_formed =
                    (4..=8).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit());
                hashes
                    .into_iter()
                    .find(|(_, hash)| well_formed && hash_matches(&value, hash))
                    .map(|(account, _)| account)
            })
            .await;
            match matched {
                Ok(matched) => {
                    let (next, report) = hot
                        .call(move |h| {
                            settle_answer(h, &candidates, kind, matched, policy, clock.now_ms())
                        })
                        .await;
                    (next, Some(report))
                }
                Err(e) => (
                    Next::Reply(VerifyReply::refused(DeclineReason::Internal, e.to_string())),
                    None,
                ),
            }
        };
        Box::pin(
            step.into_actor(self)
                .then(move |(next, report), actor, ctx| {
                    for account in &checked {
                        actor.checking.remove(account);
                    }
                    if let Some(report) = report {
                        actor.report_factor(report, ctx);
                    }
                    actor.answer(next, terminal, spent, evidence)
                }),
        )
    }

    /// Tells the cloud what a second-factor answer did, so that the count is the fleet's; its
    /// answer (the accounts' states across the fleet) is applied here at once (every hub also
    /// hears it broadcast). Without the cloud, this hub's own count stands.
    fn report_factor(&mut self, report: FactorReport, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        let call = CallCloud {
            body: HubRequestBody::SecondFactor(report.clone()),
            timeout: self.settings.identify_timeout,
        };
        let hot = self.hot.clone();
        ctx.spawn(
            async move {
                match uplink.send(call).await {
                    Ok(Ok(CloudReplyBody::Lockouts(batch))) => {
                        hot.call(move |h| apply_lockouts(h, batch)).await;
                        true
                    }
                    // Never sent (no broker, breaker open, queue full) or refused unserved: it
                    // is reported again when the cloud is back.
                    Ok(Err(
                        HubError::CloudDisconnected
                        | HubError::CircuitOpen(_)
                        | HubError::UplinkSaturated
                        | HubError::CloudBusy(_),
                    )) => {
                        tracing::info!(
                            "the cloud did not take a second-factor result; counted here, \
                             reported again when it is back"
                        );
                        false
                    }
                    // Sent without an answer: the broker may still deliver it (a persistent
                    // session), so it is not sent twice.
                    other => {
                        tracing::info!(?other, "no answer to a second-factor result; counted here");
                        true
                    }
                }
            }
            .into_actor(self)
            .map(move |taken, actor, _| {
                if !taken {
                    actor.keep_unreported(report);
                }
            }),
        );
    }

    /// Keeps a result the cloud did not take, to report again.
    fn keep_unreported(&mut self, report: FactorReport) {
        self.unreported.push_back(report);
        if self.unreported.len() > MAX_UNREPORTED {
            self.unreported.pop_front();
            tracing::warn!(
                "second-factor results the cloud has not taken exceed the cap; oldest dropped"
            );
        }
    }

    /// Reports again up to [`RESEND_BATCH`] results the cloud did not take.
    fn report_unreported(&mut self, ctx: &mut Context<Self>) {
        for _ in 0..RESEND_BATCH {
            let Some(report) = self.unreported.pop_front() else {
                return;
            };
            self.report_factor(report, ctx);
        }
    }
}

impl Actor for VerifyActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(VERIFY_MAILBOX);
        ctx.run_interval(PRUNE_INTERVAL, |actor, ctx| {
            let now = actor.clock.now_ms();
            actor.challenges.retain(|_, c| c.expires_at_ms > now);
            actor.report_unreported(ctx);
        });
    }
}

impl Handler<UplinkEvent> for VerifyActor {
    type Result = ();
    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        match msg {
            UplinkEvent::CloudConnected => {
                self.start_sync(ctx);
                self.report_unreported(ctx);
            }
            UplinkEvent::TemplatesPushed(batch) => self.apply_templates(batch, None, ctx),
            UplinkEvent::LockoutsPushed(batch) => {
                let hot = self.hot.clone();
                ctx.spawn(
                    async move { hot.call(move |h| apply_lockouts(h, batch)).await }
                        .into_actor(self),
                );
            }
            UplinkEvent::KeysBroadcast(_)
            | UplinkEvent::AllowancesPushed(_)
            | UplinkEvent::RevocationListPushed(_) => {}
        }
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
        let terminal = request.terminal_id;
        let answer = match request.body {
            VerifyBody::Face { embedding } => {
                if let Err(e) = protocol::validate_embedding(&embedding) {
                    return refuse(VerifyReply::refused(DeclineReason::InvalidRequest, e));
                }
                self.face(embedding, terminal)
            }
            VerifyBody::CodeAndFace { code, embedding } => {
                if let Err(e) = protocol::validate_embedding(&embedding) {
                    return refuse(VerifyReply::refused(DeclineReason::InvalidRequest, e));
                }
                self.code_and_face(code, embedding, terminal)
            }
            VerifyBody::SecondFactor(answer) => self.second_factor(answer, terminal),
        };
        Box::pin(answer.map(|reply, actor, _| {
            actor.metrics.count(&reply);
            reply
        }))
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
                account_id: (*a).into(),
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

    fn hot_set_with(accounts: &[&str]) -> (tempfile::TempDir, HotSet) {
        let dir = tempfile::tempdir().unwrap();
        let mut hot =
            HotSet::open(&dir.path().join("hot"), &dir.path().join("k.key"), 8, "s1").unwrap();
        let entries = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| HotEntry {
                account_id: (*a).into(),
                home_store_id: "s1".into(),
                templates: vec![(i as u64, {
                    let mut unit = vec![0.0; protocol::EMBEDDING_LEN];
                    unit[i] = 1.0;
                    unit
                })],
                second_factor: SecondFactorKind::Pin,
                second_factor_hash: format!("$argon2id$hash-of-{a}"),
                version: 0,
            })
            .collect();
        hot.upsert(entries, 0).unwrap();
        (dir, hot)
    }

    const POLICY: LockoutPolicy = LockoutPolicy {
        free: 0,
        base_ms: 60_000,
        max_ms: 600_000,
    };

    #[test]
    fn a_wrong_second_factor_counts_against_every_candidate_and_a_locked_one_never_answers() {
        let (_dir, mut hot) = hot_set_with(&["ann", "bob"]);
        let both: Vec<AccountId> = vec!["ann".into(), "bob".into()];
        let now = 1_000;
        // Both may answer at first.
        let hashes = answerable(&hot, &both, SecondFactorKind::Pin, now).unwrap();
        assert_eq!(hashes.len(), 2);
        // A wrong answer locks both, not only the likeliest: a second guess cannot go to bob.
        let (next, report) =
            settle_answer(&mut hot, &both, SecondFactorKind::Pin, None, POLICY, now);
        assert_eq!((report.failed, report.passed), (both.clone(), None));
        assert!(matches!(
            next,
            Next::Reply(VerifyReply::Refused {
                reason: DeclineReason::SecondFactorWrong,
                ..
            })
        ));
        for account in &both {
            assert!(hot.lockout(account).locked_until_ms > now, "{account}");
        }
        let refused = answerable(&hot, &both, SecondFactorKind::Pin, now).unwrap_err();
        assert!(matches!(
            refused,
            VerifyReply::Refused {
                reason: DeclineReason::FacePaymentLocked,
                ..
            }
        ));
        // Only ann locked: only bob's hash is checked, so a right answer for ann does not pass.
        let later = now + 600_001;
        hot.set_lockout(&both[1], Default::default()).unwrap();
        hot.set_lockout(
            &both[0],
            crate::hotset::Lockout {
                failures: 1,
                locked_until_ms: later + 60_000,
                version: 0,
                resets: 0,
            },
        )
        .unwrap();
        let hashes = answerable(&hot, &both, SecondFactorKind::Pin, later).unwrap();
        assert_eq!(
            hashes,
            vec![(both[1].clone(), "$argon2id$hash-of-bob".into())]
        );
        // A right answer clears that account's lockout and issues its token.
        let (next, report) = settle_answer(
            &mut hot,
            &both,
            SecondFactorKind::Pin,
            Some(both[1].clone()),
            POLICY,
            later,
        );
        assert!(matches!(next, Next::Token(ref a) if a == &both[1]));
        assert_eq!(
            (report.failed, report.passed),
            (vec![], Some(both[1].clone()))
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
