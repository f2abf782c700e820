//! What proves who pays: the account keys the cloud replicates to the hub (to check payment codes
//! offline) and the payment tokens a face verification issues. The payment and verify actors ask
//! this one; it asks nobody but the journal (to keep keys) and the uplink (to sync them).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use actix::prelude::*;
use ed25519_dalek::VerifyingKey;
use paycode::{SignedCode, Validity};
use protocol::{
    AccountId, CloudReplyBody, CodeNonce, Decision, DeclineReason, HubRequestBody, KeyBatch,
    KeyEntry, TerminalId,
};
use rand::RngCore;

use crate::{
    journal::JournalWorker,
    uplink::{CallCloud, UplinkActor, UplinkEvent},
};

/// Mailbox bound.
pub const CREDENTIALS_MAILBOX: usize = 256;
/// Deadline of a key-sync request.
pub const KEY_SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause before a failed key sync is tried again: an answer lost (a cloud instance not
/// subscribed yet, a broker failing over) must not leave the hub without keys until it
/// reconnects.
pub const KEY_SYNC_RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest pause between tries of a failing key sync.
pub const KEY_SYNC_RETRY_MAX: Duration = Duration::from_secs(60);
/// How often expired tokens are dropped.
pub const TOKEN_PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// A payment token the hub issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The account it charges.
    pub account_id: AccountId,
    /// The terminal it is bound to.
    pub terminal_id: TerminalId,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: u64,
    /// Issued by code and face: the nonce of the code the face confirmed.
    pub spent_code: Option<CodeNonce>,
    /// The face (and code) shown, for the cloud to check.
    pub evidence: protocol::PayerEvidence,
    /// A charge was made with it: kept until it expires, whatever its terminal opens since.
    pub redeemed: bool,
}

impl OpenVerification for Token {
    fn terminal(&self) -> &str {
        &self.terminal_id
    }

    fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }

    fn evictable(&self) -> bool {
        !self.redeemed
    }
}

/// Owns the replicated account keys and the payment tokens.
pub struct CredentialsActor {
    clock: clock::SharedClock,
    validity: Validity,
    keys: HashMap<AccountId, VerifyingKey>,
    /// The version of each account's key (or revocation) held: an entry no newer is ignored, so
    /// a replayed old key cannot come back.
    key_versions: HashMap<AccountId, u64>,
    key_version: u64,
    tokens: HashMap<String, Token>,
    /// Accounts whose templates were revoked (erased customers): no token is ever issued for
    /// them again, even by a verification that matched their face just before.
    erased: HashSet<AccountId>,
    journal: JournalWorker,
    uplink: Option<Addr<UplinkActor>>,
    syncing: bool,
    /// The pause before a failed key sync is tried again (doubling to [`KEY_SYNC_RETRY_MAX`]).
    sync_retry: Duration,
    keys_gauge: prometheus::IntGauge,
    /// Set to 1 once a key sync has run to its last page (the hub's `/readyz` waits for it).
    synced_gauge: Option<prometheus::IntGauge>,
}

impl CredentialsActor {
    /// An actor with the keys the journal holds (`stored`, up to `key_version`).
    pub fn new(
        clock: clock::SharedClock,
        validity: Validity,
        stored: &[KeyEntry],
        key_version: u64,
        journal: JournalWorker,
        uplink: Option<Addr<UplinkActor>>,
        keys_gauge: prometheus::IntGauge,
    ) -> Self {
        let mut actor = CredentialsActor {
            clock,
            validity,
            keys: HashMap::new(),
            key_versions: HashMap::new(),
            key_version,
            tokens: HashMap::new(),
            erased: HashSet::new(),
            journal,
            uplink,
            syncing: false,
            sync_retry: KEY_SYNC_RETRY_MIN,
            keys_gauge,
            synced_gauge: None,
        };
        actor.apply_keys(stored);
        actor
    }

    /// Sets `gauge` to 1 once a key sync with the cloud has run to its last page.
    pub fn with_synced_gauge(mut self, gauge: prometheus::IntGauge) -> Self {
        self.synced_gauge = Some(gauge);
        self
    }

    fn apply_keys(&mut self, entries: &[KeyEntry]) {
        for entry in entries {
            let held = self.key_versions.get(&entry.account_id).copied();
            if held.is_some_and(|held| held >= entry.version) {
                continue;
            }
            self.key_versions
                .insert(entry.account_id.clone(), entry.version);
            match entry.public_key.as_deref().map(paycode::parse_public_key) {
                Some(Ok(key)) => {
                    self.keys.insert(entry.account_id.clone(), key);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, account_id = %entry.account_id, "unusable key from the cloud ignored")
                }
                None => {
                    self.keys.remove(&entry.account_id);
                }
            }
        }
        self.keys_gauge.set(self.keys.len() as i64);
    }

    /// Applies a batch of key changes, keeps it in the journal, and fetches what a gap in the
    /// versions says was missed.
    fn keys_arrived(&mut self, batch: KeyBatch, ctx: &mut Context<Self>) {
        if batch.entries.is_empty() {
            return;
        }
        self.apply_keys(&batch.entries);
        let newest = batch.entries.iter().map(|e| e.version).max().unwrap_or(0);
        let oldest = batch.entries.iter().map(|e| e.version).min().unwrap_or(0);
        let gap = oldest > self.key_version.saturating_add(1);
        self.key_version = self.key_version.max(newest);
        let entries = batch.entries;
        self.journal
            .spawn(move |j| j.store_keys(&entries).map(|_| ()));
        if gap {
            self.sync_keys(ctx);
        }
    }

    fn sync_keys(&mut self, ctx: &mut Context<Self>) {
        let Some(uplink) = self.uplink.clone() else {
            return;
        };
        if self.syncing {
            return;
        }
        self.syncing = true;
        let call = uplink.send(CallCloud {
            body: HubRequestBody::KeySync {
                after_version: self.key_version,
            },
            timeout: KEY_SYNC_TIMEOUT,
        });
        ctx.spawn(call.into_actor(self).map(|result, actor, ctx| {
            actor.syncing = false;
            match result {
                Ok(Ok(CloudReplyBody::Keys(batch))) => {
                    actor.sync_retry = KEY_SYNC_RETRY_MIN;
                    let more = batch.more && !batch.entries.is_empty();
                    actor.keys_arrived(batch, ctx);
                    if more {
                        actor.sync_keys(ctx);
                    } else if let Some(synced) = &actor.synced_gauge {
                        synced.set(1);
                    }
                }
                Ok(Ok(other)) => actor.retry_sync(format!("unexpected answer {other:?}"), ctx),
                Ok(Err(error)) => actor.retry_sync(error.to_string(), ctx),
                Err(error) => actor.retry_sync(format!("uplink unavailable: {error}"), ctx),
            }
        }));
    }

    /// Tries a failed key sync again after a pause (drawn between half and all of the current
    /// one, so hubs that failed together do not retry together), doubling it for next time.
    fn retry_sync(&mut self, why: String, ctx: &mut Context<Self>) {
        let pause = self.sync_retry.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tracing::warn!(why, ?pause, "key sync failed; tried again after a pause");
        self.sync_retry = (self.sync_retry * 2).min(KEY_SYNC_RETRY_MAX);
        ctx.run_later(pause, |actor, ctx| actor.sync_keys(ctx));
    }

    /// A payment code's form, signature (with the account's key) and validity window.
    fn check_code(&self, code: &str) -> Result<SignedCode, RefusedCode> {
        let now_ms = self.clock.now_ms();
        let refused = |decision| RefusedCode {
            decision,
            signed: None,
        };
        let code = SignedCode::parse(code)
            .map_err(|e| refused(Decision::declined(e.decline_reason(), e.to_string())))?;
        let Some(key) = self.keys.get(code.account_id.as_str()) else {
            return Err(refused(Decision::declined(
                DeclineReason::UnknownAccount,
                format!("account {} is unknown to this store", code.account_id),
            )));
        };
        code.verify(key, now_ms, self.validity).map_err(|e| {
            let decision = Decision::declined(e.decline_reason(), e.to_string());
            // A code refused only for its time window still proves who shows it: checked at its
            // own issue time, the signature, not the window.
            let window_only = matches!(
                decision.reason(),
                Some(DeclineReason::CodeExpired | DeclineReason::CodeNotYetValid)
            ) && code.verify(key, code.issued_at_ms, self.validity).is_ok();
            RefusedCode {
                decision,
                signed: window_only.then(|| Box::new(code.clone())),
            }
        })?;
        Ok(code)
    }
}

impl Actor for CredentialsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(CREDENTIALS_MAILBOX);
        ctx.run_interval(TOKEN_PRUNE_INTERVAL, |actor, _| {
            let now = actor.clock.now_ms();
            actor.tokens.retain(|_, t| t.expires_at_ms > now);
        });
    }
}

impl Handler<UplinkEvent> for CredentialsActor {
    type Result = ();
    fn handle(&mut self, msg: UplinkEvent, ctx: &mut Self::Context) {
        match msg {
            UplinkEvent::CloudConnected => self.sync_keys(ctx),
            UplinkEvent::KeysBroadcast(batch) => self.keys_arrived(batch, ctx),
            UplinkEvent::TemplatesPushed(_)
            | UplinkEvent::AllowancesPushed(_)
            | UplinkEvent::RevocationListPushed(_)
            | UplinkEvent::LockoutsPushed(_) => {}
        }
    }
}

/// Why a payment code was refused.
#[derive(Debug, Clone)]
pub struct RefusedCode {
    /// The decline to answer.
    pub decision: Decision,
    /// The code, when it was refused only for its time window (expired, or not yet valid by
    /// this hub's clock): its signature proves its account, and a retry of an order it paid
    /// hears "already paid" (or "in progress" while that is not known), never this decline.
    pub signed: Option<Box<SignedCode>>,
}

/// Check a payment code (form, key, signature, window) without spending it.
#[derive(Message)]
#[rtype(result = "Result<SignedCode, RefusedCode>")]
pub struct CheckCode(pub String);

impl Handler<CheckCode> for CredentialsActor {
    type Result = Result<SignedCode, RefusedCode>;
    fn handle(&mut self, msg: CheckCode, _: &mut Self::Context) -> Self::Result {
        self.check_code(&msg.0)
    }
}

/// Issue a payment token: `ttl_ms` for `account_id` at `terminal_id`; none for an erased account.
#[derive(Message)]
#[rtype(result = "Result<IssuedToken, TokenNotIssued>")]
pub struct IssueToken {
    /// The account it charges.
    pub account_id: AccountId,
    /// The terminal it is bound to.
    pub terminal_id: TerminalId,
    /// How long it stays valid.
    pub ttl_ms: u64,
    /// Issued by code and face: the nonce of the code the face confirmed (the cloud burns it
    /// with the token's payment).
    pub spent_code: Option<CodeNonce>,
    /// The face (and code) shown, carried to the cloud with the token's payment.
    pub evidence: protocol::PayerEvidence,
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token (`tok_` and 32 hex digits of randomness).
    pub token: String,
    /// What it stands for.
    pub issued: Token,
}

/// Most payment tokens, and most second-factor challenges, one terminal holds open: its share of
/// the hub's caps. The terminal id is its certificate's (it asks on its own key expressions, see
/// `edges`), so a terminal past its share gives up its own oldest (in a checkout, long since
/// charged or abandoned), never another terminal's.
pub const MAX_OPEN_PER_TERMINAL: usize = 64;

/// An open verification (a payment token, a second-factor challenge) as the caps see it.
pub trait OpenVerification {
    /// The terminal it was opened for.
    fn terminal(&self) -> &str;
    /// When it expires, ms since the epoch.
    fn expires_at_ms(&self) -> u64;
    /// Whether its terminal may give it up for a new one: never a token a charge was made with
    /// (a register that did not hear the charge's answer asks again with it).
    fn evictable(&self) -> bool {
        true
    }
}

/// Makes room in a map of open verifications, capped at `cap` entries and
/// [`MAX_OPEN_PER_TERMINAL`] per terminal, for one more of `terminal`'s: expired entries are
/// dropped when a cap is reached, then `terminal`'s own evictable ones, soonest to expire first,
/// while it is past its share. Whether there is room (a terminal whose share is all in use, or
/// a hub whose terminals each hold their share, has none).
pub fn make_room<K, V>(map: &mut HashMap<K, V>, cap: usize, terminal: &str, now_ms: u64) -> bool
where
    K: Clone + Eq + std::hash::Hash,
    V: OpenVerification,
{
    let own = |map: &HashMap<K, V>| map.values().filter(|v| v.terminal() == terminal).count();
    if map.len() >= cap || own(map) >= MAX_OPEN_PER_TERMINAL {
        map.retain(|_, v| v.expires_at_ms() > now_ms);
    }
    let mut own_count = own(map);
    while own_count >= MAX_OPEN_PER_TERMINAL {
        let Some(oldest) = map
            .iter()
            .filter(|(_, v)| v.terminal() == terminal && v.evictable())
            .min_by_key(|(_, v)| v.expires_at_ms())
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        map.remove(&oldest);
        own_count -= 1;
    }
    map.len() < cap
}

/// Most payment tokens open at once: terminals ask for them (one per verification), so the map
/// is capped; expired ones are dropped first.
pub const MAX_OPEN_TOKENS: usize = 4_096;

/// Why no token was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenNotIssued {
    /// The account's templates were erased.
    #[error("this customer's face is no longer enrolled")]
    Erased,
    /// [`MAX_OPEN_TOKENS`] are open.
    #[error("the hub holds as many open payment tokens as it may; verify again in a moment")]
    Full,
}

impl Handler<IssueToken> for CredentialsActor {
    type Result = Result<IssuedToken, TokenNotIssued>;
    fn handle(&mut self, msg: IssueToken, _: &mut Self::Context) -> Self::Result {
        if self.erased.contains(&msg.account_id) {
            return Err(TokenNotIssued::Erased);
        }
        let now = self.clock.now_ms();
        if !make_room(&mut self.tokens, MAX_OPEN_TOKENS, &msg.terminal_id, now) {
            return Err(TokenNotIssued::Full);
        }
        let issued = Token {
            account_id: msg.account_id,
            terminal_id: msg.terminal_id,
            expires_at_ms: self.clock.now_ms().saturating_add(msg.ttl_ms),
            spent_code: msg.spent_code,
            evidence: msg.evidence,
            redeemed: false,
        };
        let token = random_id("tok_");
        self.tokens.insert(token.clone(), issued.clone());
        Ok(IssuedToken { token, issued })
    }
}

/// Why a payment token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    /// Never issued here, or dropped (expired and pruned, or its account erased).
    #[error("unknown or expired payment token; verify the customer again")]
    Unknown,
    /// Past its lifetime.
    #[error("the payment token expired; verify the customer again")]
    Expired,
    /// Presented by another terminal than the one it was issued to.
    #[error("the payment token was issued to another terminal")]
    OtherTerminal,
}

/// Check a payment token presented with a charge: what it stands for, or why not. (Single use is
/// the journal's: the token is reserved there like a code's nonce.)
#[derive(Message)]
#[rtype(result = "Result<Token, TokenRefused>")]
pub struct RedeemToken {
    /// The token.
    pub token: String,
    /// The terminal presenting it.
    pub terminal_id: TerminalId,
}

impl Handler<RedeemToken> for CredentialsActor {
    type Result = Result<Token, TokenRefused>;
    fn handle(&mut self, msg: RedeemToken, _: &mut Self::Context) -> Self::Result {
        let now = self.clock.now_ms();
        let token = self
            .tokens
            .get_mut(&msg.token)
            .ok_or(TokenRefused::Unknown)?;
        if token.expires_at_ms <= now {
            return Err(TokenRefused::Expired);
        }
        if token.terminal_id != msg.terminal_id {
            return Err(TokenRefused::OtherTerminal);
        }
        token.redeemed = true;
        Ok(token.clone())
    }
}

/// Drop every token of these accounts and never issue one for them again (their templates were
/// revoked: erasure).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetAccounts(pub Vec<AccountId>);

impl Handler<ForgetAccounts> for CredentialsActor {
    type Result = ();
    fn handle(&mut self, msg: ForgetAccounts, _: &mut Self::Context) {
        self.tokens.retain(|_, t| !msg.0.contains(&t.account_id));
        self.erased.extend(msg.0);
    }
}

/// A random identifier: `prefix` and 32 hex digits.
pub fn random_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(clock: clock::SharedClock, wallet: &paycode::Wallet) -> Addr<CredentialsActor> {
        actor_holding(clock, &[key_entry(wallet, 1, true)])
    }

    /// An actor started as a hub starts: from the key entries its journal holds.
    fn actor_holding(clock: clock::SharedClock, stored: &[KeyEntry]) -> Addr<CredentialsActor> {
        let dir = tempfile::tempdir().unwrap();
        let journal = crate::journal::Journal::open(&dir.path().join("j")).unwrap();
        std::mem::forget(dir);
        journal.store_keys(stored).unwrap();
        let gauge = prometheus::IntGauge::new("keys", "keys").unwrap();
        CredentialsActor::new(
            clock,
            Validity {
                window_ms: 60_000,
                clock_skew_ms: 5_000,
            },
            &journal.keys().unwrap(),
            journal.key_version().unwrap(),
            crate::journal::start_worker(journal),
            None,
            gauge,
        )
        .start()
    }

    /// The wallet's account key at `version`, or (not `held`) its revocation.
    fn key_entry(wallet: &paycode::Wallet, version: u64, held: bool) -> KeyEntry {
        KeyEntry {
            account_id: wallet.account_id().into(),
            version,
            public_key: held.then(|| wallet.public_key_b64()),
        }
    }

    /// What the actor says of a code it must refuse.
    async fn refusal(credentials: &Addr<CredentialsActor>, code: String) -> RefusedCode {
        credentials
            .send(CheckCode(code))
            .await
            .unwrap()
            .expect_err("the code is refused")
    }

    /// The hub holds no key for the wallet's account: its fresh code is refused as unknown.
    async fn refuses_as_unknown(credentials: &Addr<CredentialsActor>, wallet: &paycode::Wallet) {
        let refused = refusal(credentials, wallet.issue_code(1_000_000)).await;
        assert_eq!(
            refused.decision.reason(),
            Some(DeclineReason::UnknownAccount)
        );
    }

    fn broadcast(entry: KeyEntry) -> UplinkEvent {
        UplinkEvent::KeysBroadcast(KeyBatch {
            entries: vec![entry],
            more: false,
        })
    }

    #[actix::test]
    async fn codes_are_checked_with_the_replicated_key_and_an_expired_one_still_names_its_signer() {
        let clock = clock::ManualClock::new(1_000_000);
        let wallet = paycode::Wallet::generate("acct-1").unwrap();
        let credentials = actor(clock.clone(), &wallet);
        let code = wallet.issue_code(1_000_000);
        let checked = credentials.send(CheckCode(code.clone())).await.unwrap();
        assert_eq!(checked.unwrap().account_id, "acct-1");
        // Past its window: refused, but its signature still names the account.
        clock.advance(120_000);
        let refused = refusal(&credentials, code).await;
        assert_eq!(refused.decision.reason(), Some(DeclineReason::CodeExpired));
        assert_eq!(
            refused.signed.map(|c| c.account_id),
            Some("acct-1".to_owned())
        );
        // Signed by a key this store does not hold: no signer named.
        let stranger = paycode::Wallet::generate("acct-2").unwrap();
        let refused = refusal(&credentials, stranger.issue_code(1_120_000)).await;
        assert_eq!(
            refused.decision.reason(),
            Some(DeclineReason::UnknownAccount)
        );
        assert!(refused.signed.is_none());
    }

    #[actix::test]
    async fn a_replayed_older_key_never_replaces_a_newer_one() {
        let clock = clock::ManualClock::new(1_000_000);
        let wallet = paycode::Wallet::generate("acct-1").unwrap();
        let credentials = actor(clock.clone(), &wallet);
        // The account is closed (version 2); its opening key (version 1) is replayed.
        credentials.do_send(broadcast(key_entry(&wallet, 2, false)));
        credentials.do_send(broadcast(key_entry(&wallet, 1, true)));
        refuses_as_unknown(&credentials, &wallet).await;
    }

    #[actix::test]
    async fn a_restarted_hub_still_refuses_a_replayed_key_of_a_closed_account() {
        // What the journal hands a starting hub: the opening key and the closure after it.
        let wallet = paycode::Wallet::generate("acct-1").unwrap();
        let stored = [key_entry(&wallet, 1, true), key_entry(&wallet, 2, false)];
        let credentials = actor_holding(clock::ManualClock::new(1_000_000), &stored);
        credentials.do_send(broadcast(key_entry(&wallet, 1, true)));
        refuses_as_unknown(&credentials, &wallet).await;
    }

    #[actix::test]
    async fn a_token_is_bound_to_its_terminal_expires_and_is_forgotten_with_its_account() {
        let clock = clock::ManualClock::new(1_000_000);
        let wallet = paycode::Wallet::generate("acct-1").unwrap();
        let credentials = actor(clock.clone(), &wallet);
        let issue = |account: &str| IssueToken {
            evidence: Default::default(),
            account_id: account.into(),
            terminal_id: "till-1".into(),
            ttl_ms: 30_000,
            spent_code: None,
        };
        let redeem = |token: &str, terminal: &str| RedeemToken {
            token: token.into(),
            terminal_id: terminal.into(),
        };
        let a = credentials.send(issue("acct-1")).await.unwrap().unwrap();
        assert_eq!(a.issued.expires_at_ms, 1_030_000);
        assert_eq!(
            credentials.send(redeem(&a.token, "till-1")).await.unwrap(),
            Ok(Token {
                redeemed: true,
                ..a.issued.clone()
            })
        );
        let other_terminal = credentials.send(redeem(&a.token, "till-2")).await.unwrap();
        assert_eq!(other_terminal, Err(TokenRefused::OtherTerminal));
        let b = credentials.send(issue("acct-2")).await.unwrap().unwrap();
        credentials
            .send(ForgetAccounts(vec!["acct-2".into()]))
            .await
            .unwrap();
        assert_eq!(
            credentials.send(redeem(&b.token, "till-1")).await.unwrap(),
            Err(TokenRefused::Unknown)
        );
        // A verification that matched the erased face just before gets no token for it.
        assert_eq!(
            credentials.send(issue("acct-2")).await.unwrap().err(),
            Some(TokenNotIssued::Erased)
        );
        assert!(credentials
            .send(redeem(&a.token, "till-1"))
            .await
            .unwrap()
            .is_ok());
        clock.advance(30_000);
        let expired = credentials.send(redeem(&a.token, "till-1")).await.unwrap();
        assert_eq!(expired, Err(TokenRefused::Expired));
    }

    #[actix::test]
    async fn open_tokens_are_capped_per_terminal_and_per_hub() {
        let clock = clock::ManualClock::new(1_000_000);
        let wallet = paycode::Wallet::generate("acct-1").unwrap();
        let credentials = actor(clock.clone(), &wallet);
        let issue = |terminal: usize, ttl_ms| IssueToken {
            evidence: Default::default(),
            account_id: "acct-1".into(),
            terminal_id: format!("till-{terminal}").as_str().into(),
            ttl_ms,
            spent_code: None,
        };
        let redeem = |token: &str, terminal: usize| RedeemToken {
            token: token.into(),
            terminal_id: format!("till-{terminal}").as_str().into(),
        };
        let terminals = MAX_OPEN_TOKENS / MAX_OPEN_PER_TERMINAL;
        let mut held = vec![Vec::new(); terminals];
        for n in 0..MAX_OPEN_TOKENS {
            let issued = credentials
                .send(issue(n % terminals, 10_000 + n as u64))
                .await
                .unwrap()
                .unwrap();
            held[n % terminals].push(issued.token);
        }
        // Every terminal holds its share: one more terminal finds the hub full.
        assert_eq!(
            credentials
                .send(issue(terminals, 10_000))
                .await
                .unwrap()
                .err(),
            Some(TokenNotIssued::Full)
        );
        // A terminal past its share gives up its own oldest tokens, nobody else's.
        for _ in 0..MAX_OPEN_PER_TERMINAL {
            credentials.send(issue(0, 20_000)).await.unwrap().unwrap();
        }
        assert_eq!(
            credentials
                .send(redeem(&held[0][0], 0))
                .await
                .unwrap()
                .err(),
            Some(TokenRefused::Unknown),
            "its own share moved on"
        );
        assert!(credentials
            .send(redeem(&held[1][0], 1))
            .await
            .unwrap()
            .is_ok());
        // A token a charge was made with is never given up: a terminal whose share is all
        // charged with gets no new one until they expire.
        for token in &held[2] {
            credentials.send(redeem(token, 2)).await.unwrap().unwrap();
        }
        assert_eq!(
            credentials.send(issue(2, 10_000)).await.unwrap().err(),
            Some(TokenNotIssued::Full)
        );
        assert!(credentials
            .send(redeem(&held[2][0], 2))
            .await
            .unwrap()
            .is_ok());
        // Expired tokens make room for a new terminal.
        clock.advance(20_000);
        assert!(credentials
            .send(issue(terminals, 10_000))
            .await
            .unwrap()
            .is_ok());
    }
}
