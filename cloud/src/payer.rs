//! The cloud's own check of who pays an online payment, so that a hub's word (or a stolen hub
//! key's) is not enough to charge an account.
//!
//! The evidence is the terminal's: what it attests of the payment ([`protocol::Attested`],
//! sealed with its certificate key and forwarded by the hub): the payment id, the amount, and
//! what the customer showed it. The attestation must be sealed by a certificate of the terminal
//! the payment names, of the payment's store, that the CA issued and the revocation list in
//! force does not name, for this payment and amount. Then:
//!
//! - by code: the code's signature checks against the account's key, it names the account, its
//!   nonce is the payment's, and it is within its window (plus [`TRANSIT_MS`]);
//! - by face (a payment token): the live face matches one of the account's enrolled templates at
//!   `identity.one_to_one_threshold` (the hubs' match threshold); for code and face, the code the
//!   face confirmed checks as above with its nonce the payment's `spent_code`.
//!
//! The attestation and the face are checked before the ledger's transaction
//! ([`PayerCheck::precheck`]: the customer store is read, and no store is read inside a ledger
//! transaction), the rest inside it ([`PayerCheck::check`]), where an attempt would move money:
//! a refusal is recorded like any decline.

use std::sync::Arc;

use paycode::{SignedCode, Validity};
use protocol::{Attested, CloudAuthorize, Decision, DeclineReason, PayerEvidence};

use crate::{customers::CustomerStore, ledger::PayerRefusal};

/// How much longer than its window a code is accepted at the cloud: the time a payment the hub
/// checked in its window may take to reach the cloud (queued behind a probing breaker, resent).
pub const TRANSIT_MS: u64 = 30_000;

/// Checks the evidence of a new online payment.
#[derive(Clone)]
pub struct PayerCheck {
    customers: CustomerStore,
    attestations: Arc<pki::SealedVerifier>,
    one_to_one_threshold: f32,
    accept_threshold: f32,
    validity: Validity,
    clock: clock::SharedClock,
}

impl PayerCheck {
    /// A check opening attestations with `attestations` (the cloud's CA and revocation list in
    /// force) and reading templates from `customers`; codes are valid for `validity` (the
    /// hubs'), plus [`TRANSIT_MS`], and may be ahead of the cloud's clock by twice its skew (the
    /// phone's clock against the hub's, the hub's against the cloud's).
    pub fn new(
        customers: CustomerStore,
        attestations: Arc<pki::SealedVerifier>,
        (one_to_one_threshold, accept_threshold): (f32, f32),
        validity: Validity,
        clock: clock::SharedClock,
    ) -> Self {
        PayerCheck {
            customers,
            attestations,
            one_to_one_threshold,
            accept_threshold,
            validity: Validity {
                window_ms: validity.window_ms.saturating_add(TRANSIT_MS),
                clock_skew_ms: validity.clock_skew_ms.saturating_mul(2),
            },
            clock,
        }
    }

    /// What the terminal named by `request` attests the customer showed for it (store
    /// `store_id`), its face matched against the account's templates; or why not.
    pub fn precheck(
        &self,
        store_id: &str,
        request: &CloudAuthorize,
    ) -> Result<PayerEvidence, PayerRefusal> {
        // A request the store may not send costs nothing more (the ledger refuses it).
        request
            .check_from(store_id)
            .map_err(|e| refuse(DeclineReason::InvalidRequest, e.to_string()))?;
        let Some(sealed) = &request.evidence.attestation else {
            return Err(refuse(
                DeclineReason::BadSignature,
                "no terminal attested this payment",
            ));
        };
        let signer = pki::Signer::terminal(store_id, &request.terminal_id);
        let topic = protocol::topics::attestation(&request.payment_id);
        let payload = self
            .attestations
            .open(&topic, sealed.as_bytes(), &signer)
            .map_err(|e| refuse(DeclineReason::BadSignature, e.to_string()))?;
        let attested: Attested = protocol::decode(&payload).map_err(|e| {
            refuse(
                DeclineReason::BadSignature,
                format!("unreadable attestation: {e}"),
            )
        })?;
        // A face payment's attempt is the token the terminal charged with: the attestation is
        // spent with it (a hub cannot use it again under a nonce of its choosing).
        let nonce_attested = match (&attested.shown.face_probe, &attested.token) {
            (None, _) => true,
            (Some(_), Some(token)) => *token == request.code_nonce.as_str(),
            (Some(_), None) => false,
        };
        if attested.payment_id != request.payment_id
            || attested.account_id != request.account_id
            || attested.amount_minor != request.amount_minor
            || attested.currency != request.currency
            || !nonce_attested
        {
            return Err(refuse(
                DeclineReason::BadSignature,
                "the terminal attested another payment, account or amount",
            ));
        }
        self.match_face(request, &attested.shown)?;
        Ok(attested.shown)
    }

    /// `Ok` when the terminal `refund` names attested it, with this payment, amount and
    /// currency, sealed by a certificate of that terminal of `store_id` the CA issued and the
    /// revocation list in force does not name, within
    /// [`protocol::REFUND_ATTESTATION_MAX_AGE_MS`]; else the decline (`bad_signature`). A refund
    /// moves the store's money: a hub's word (or a stolen hub key's) is not enough. Reads no
    /// store: the ledger decides on it inside its transaction ([`crate::ledger::Ledger::refund`]).
    pub fn refund_attested(
        &self,
        store_id: &str,
        refund: &protocol::Refund,
    ) -> Result<(), protocol::RefundDecision> {
        let declined = |detail: String| {
            protocol::RefundDecision::declined(
                DeclineReason::BadSignature,
                format!("cloud: {detail}"),
            )
        };
        refund.check_from(store_id).map_err(|e| {
            protocol::RefundDecision::declined(DeclineReason::InvalidRequest, e.to_string())
        })?;
        let signer = pki::Signer::terminal(store_id, &refund.terminal_id);
        let topic = protocol::topics::refund_attestation(&refund.payment_id, &refund.refund_id);
        let payload = self
            .attestations
            .open(&topic, refund.attestation.as_bytes(), &signer)
            .map_err(|e| declined(e.to_string()))?;
        let attested: protocol::AttestedRefund = protocol::decode(&payload)
            .map_err(|e| declined(format!("unreadable refund attestation: {e}")))?;
        if !attested.attests(refund) {
            return Err(declined(
                "the terminal attested another refund, payment or amount".into(),
            ));
        }
        let now_ms = self.clock.now_ms();
        if now_ms.saturating_sub(attested.issued_at_ms) > protocol::REFUND_ATTESTATION_MAX_AGE_MS
            || attested.issued_at_ms.saturating_sub(now_ms)
                > protocol::REFUND_ATTESTATION_MAX_AHEAD_MS
        {
            return Err(declined(format!(
                "the terminal attested this refund at {} ms, the cloud's clock says {now_ms} ms: \
                 too old or too far ahead; send the same refund id again",
                attested.issued_at_ms
            )));
        }
        Ok(())
    }

    /// `Ok` when what the terminal attests (`shown`, from [`PayerCheck::precheck`] of the same
    /// request) proves the payer, whose account's payment key is `account_key`; else why not (a
    /// decline, or a check that could not run). Reads nothing.
    pub fn check(
        &self,
        request: &CloudAuthorize,
        account_key: Option<&str>,
        shown: &Result<PayerEvidence, PayerRefusal>,
    ) -> Result<(), PayerRefusal> {
        let shown = shown.as_ref().map_err(Clone::clone)?;
        match &shown.face_probe {
            None => {
                if request.spent_code.is_some() {
                    return Err(refuse(
                        DeclineReason::InvalidRequest,
                        "a payment by code names no other code to spend",
                    ));
                }
                let code = shown.payment_code.as_deref();
                self.code(request, account_key, code, &request.code_nonce)
            }
            // The face matched in the precheck.
            Some(_) => match (&request.spent_code, shown.payment_code.as_deref()) {
                (None, None) => Ok(()),
                (Some(spent), code) => self.code(request, account_key, code, spent),
                (None, Some(_)) => Err(refuse(
                    DeclineReason::InvalidRequest,
                    "a code shown with a face must be the payment's spent code",
                )),
            },
        }
    }

    /// The code `text` proves the account (whose key is `account_key`) and carries `nonce`.
    fn code(
        &self,
        request: &CloudAuthorize,
        account_key: Option<&str>,
        text: Option<&str>,
        nonce: &str,
    ) -> Result<(), PayerRefusal> {
        let Some(text) = text else {
            return Err(refuse(
                DeclineReason::BadSignature,
                "the terminal attests no payment code for this payment",
            ));
        };
        let code = SignedCode::parse(text)
            .map_err(|e| refuse(DeclineReason::MalformedCode, e.to_string()))?;
        if code.account_id != request.account_id.as_str() || code.nonce_hex() != nonce {
            return Err(refuse(
                DeclineReason::BadSignature,
                "the payment code is not the one this payment names",
            ));
        }
        let key = account_key.ok_or_else(|| {
            refuse(
                DeclineReason::UnknownAccount,
                "the account has no payment key",
            )
        })?;
        let key = paycode::parse_public_key(key).map_err(|e| {
            PayerRefusal::Unavailable(format!("the account's stored key is unreadable: {e}"))
        })?;
        code.verify(&key, self.clock.now_ms(), self.validity)
            .map_err(|e| refuse(code_reason(&e), e.to_string()))
    }

    /// Whether the face `shown`, if any, matches one of the account's enrolled templates.
    fn match_face(
        &self,
        request: &CloudAuthorize,
        shown: &PayerEvidence,
    ) -> Result<(), PayerRefusal> {
        let Some(probe) = &shown.face_probe else {
            return Ok(());
        };
        let probe = probe.embedding();
        protocol::validate_embedding(&probe)
            .map_err(|e| refuse(DeclineReason::InvalidRequest, e))?;
        let record = self
            .customers
            .get(&request.account_id)
            .map_err(|e| PayerRefusal::Unavailable(e.to_string()))?;
        let best = record
            .iter()
            .flat_map(|r| r.templates.iter())
            .map(|(_, template)| face::cosine(template, &probe))
            .fold(f32::MIN, f32::max);
        if best < self.one_to_one_threshold {
            return Err(refuse(
                DeclineReason::FaceNotRecognized,
                "the face shown does not match this account's enrolled face",
            ));
        }
        if best >= self.accept_threshold {
            return Ok(());
        }
        // A face this close is a look-alike's as much as the customer's: the hubs ask the
        // second factor, and the terminal attests the answer typed (Argon2: on this thread, for
        // these payments only).
        let answered = shown.second_factor.as_deref().is_some_and(|answer| {
            record
                .as_ref()
                .is_some_and(|r| crate::customers::verify_secret(answer, &r.second_factor_hash))
        });
        if answered {
            Ok(())
        } else {
            Err(refuse(
                DeclineReason::SecondFactorWrong,
                "a face this close to the account's needs its second factor, answered at the \
                 terminal",
            ))
        }
    }
}

fn refuse(reason: DeclineReason, detail: impl Into<String>) -> PayerRefusal {
    PayerRefusal::Declined(Decision::declined(
        reason,
        format!("cloud: {}", detail.into()),
    ))
}

fn code_reason(error: &paycode::CodeError) -> DeclineReason {
    match error {
        paycode::CodeError::Expired { .. } => DeclineReason::CodeExpired,
        paycode::CodeError::NotYetValid { .. } => DeclineReason::CodeNotYetValid,
        paycode::CodeError::NotFacepay | paycode::CodeError::Malformed(_) => {
            DeclineReason::MalformedCode
        }
        _ => DeclineReason::BadSignature,
    }
}

/// A check for tests: no customers enrolled by face (a store in `dir`), a fleet CA of its own
/// (in `dir`), the system clock and the default window.
#[cfg(test)]
pub(crate) fn for_tests(dir: &std::path::Path) -> PayerCheck {
    let customers = CustomerStore::open(
        &dir.join("payer-customers"),
        &dir.join("payer-customers.key"),
    )
    .unwrap();
    let cloud = tests::fleet(&dir.join("payer-pki"), &[]);
    PayerCheck::new(
        customers,
        Arc::new(cloud.sealed_verifier()),
        (0.363, 0.45),
        Validity::default(),
        clock::system(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clock::Clock as _;
    use paycode::Wallet;
    use protocol::{Currency, FaceProbe};

    /// A CA in `dir` with the cloud's identity and `edges` (store, terminal); the cloud's.
    pub(super) fn fleet(dir: &std::path::Path, edges: &[(&str, &str)]) -> pki::TlsIdentity {
        let authority = pki::Pki::init(dir).unwrap();
        authority
            .issue(&pki::Identity::cloud(), &pki::IssueOptions::default())
            .unwrap();
        for (store, terminal) in edges {
            authority
                .issue(
                    &pki::Identity::edge(store, terminal).unwrap(),
                    &pki::IssueOptions::default(),
                )
                .unwrap();
        }
        identity(dir, "cloud")
    }

    fn identity(dir: &std::path::Path, name: &str) -> pki::TlsIdentity {
        let files = pki::TlsConfig {
            pki_dir: dir.to_owned(),
            ..Default::default()
        }
        .files(name);
        pki::TlsIdentity::load(&files).unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        check: PayerCheck,
        key: String,
        wallet: Wallet,
        clock: std::sync::Arc<clock::ManualClock>,
        face: Vec<f32>,
        pki: std::path::PathBuf,
    }

    fn unit(seed: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..protocol::EMBEDDING_LEN)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32) - 500.0)
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let wallet = Wallet::generate("alice").unwrap();
        let customers =
            CustomerStore::open(&dir.path().join("customers"), &dir.path().join("t.key")).unwrap();
        customers
            .create(&protocol::CreateCustomer {
                customer_id: "alice".into(),
                name: "Alice".into(),
                phone: "+441234567890".into(),
                pin: "4821".into(),
                second_factor: protocol::SecondFactorKind::Pin,
                home_store_id: "store-1".into(),
                currency: "EUR".into(),
                initial_balance_minor: 0,
                public_key: None,
            })
            .unwrap();
        let face = unit(1);
        customers.add_template("alice", face.clone()).unwrap();
        let pki = dir.path().join("pki");
        let cloud = fleet(
            &pki,
            &[("store-1", "t1"), ("store-1", "t2"), ("store-2", "t1")],
        );
        let clock = clock::ManualClock::new(1_700_000_000_000);
        let check = PayerCheck::new(
            customers,
            Arc::new(cloud.sealed_verifier()),
            (0.363, 0.45),
            Validity::default(),
            clock.clone(),
        );
        Fixture {
            _dir: dir,
            check,
            key: wallet.public_key_b64(),
            wallet,
            clock,
            face,
            pki,
        }
    }

    impl Fixture {
        /// The whole check (store-1), with alice's payment key.
        fn check(&self, request: &CloudAuthorize) -> Result<(), PayerRefusal> {
            let shown = self.check.precheck("store-1", request);
            self.check.check(request, Some(&self.key), &shown)
        }

        /// `request` with `shown` attested by terminal `name` (a certificate of the fleet).
        fn attested_by(
            &self,
            name: &str,
            mut request: CloudAuthorize,
            shown: PayerEvidence,
        ) -> CloudAuthorize {
            let attested = Attested::of(&request, shown);
            let sealed = identity(&self.pki, name)
                .reply_signer()
                .unwrap()
                .seal(
                    &protocol::topics::attestation(&request.payment_id),
                    protocol::encode(&attested),
                )
                .unwrap();
            request.evidence.attestation = Some(String::from_utf8(sealed).unwrap());
            request
        }

        /// A payment at store-1's terminal t1 with what it attests was `shown`.
        fn at_t1(&self, nonce: &str, shown: PayerEvidence) -> CloudAuthorize {
            self.attested_by("edge-store-1-t1", payment(nonce), shown)
        }
    }

    fn payment(nonce: &str) -> CloudAuthorize {
        CloudAuthorize {
            payment_id: "store-1:o-1".into(),
            account_id: "alice".into(),
            code_nonce: nonce.into(),
            amount_minor: 100,
            currency: Currency::parse("EUR").unwrap(),
            terminal_id: "t1".into(),
            order_id: "o-1".into(),
            offline_reservation: Default::default(),
            spent_code: None,
            evidence: Default::default(),
        }
    }

    fn by_code(text: &str) -> PayerEvidence {
        PayerEvidence {
            payment_code: Some(text.into()),
            ..Default::default()
        }
    }

    fn nonce_of(text: &str) -> String {
        SignedCode::parse(text).unwrap().nonce_hex()
    }

    fn reason(result: Result<(), PayerRefusal>) -> Option<DeclineReason> {
        match result {
            Err(PayerRefusal::Declined(decision)) => decision.reason(),
            _ => None,
        }
    }

    #[test]
    fn a_refund_is_taken_only_as_its_own_terminal_attested_it_and_only_fresh() {
        let f = fixture();
        let now = f.clock.now_ms();
        let refund = |attestation: String| protocol::Refund {
            refund_id: "r-1".into(),
            payment_id: "store-1:o-1".into(),
            terminal_id: "t1".into(),
            amount_minor: 100,
            currency: Currency::parse("EUR").unwrap(),
            attestation,
        };
        let sealed_by = |name: &str, attested: &protocol::AttestedRefund| {
            let sealed = identity(&f.pki, name)
                .reply_signer()
                .unwrap()
                .seal(
                    &protocol::topics::refund_attestation("store-1:o-1", "r-1"),
                    protocol::encode(attested),
                )
                .unwrap();
            String::from_utf8(sealed).unwrap()
        };
        let good = refund(String::new()).attested(now);
        let reason = |r: &protocol::Refund| {
            f.check
                .refund_attested("store-1", r)
                .err()
                .and_then(|d| d.reason())
        };
        assert_eq!(reason(&refund(sealed_by("edge-store-1-t1", &good))), None);
        let refused = Some(DeclineReason::BadSignature);
        // Another terminal's seal, another store's, the hub's word alone.
        assert_eq!(
            reason(&refund(sealed_by("edge-store-1-t2", &good))),
            refused
        );
        assert_eq!(
            reason(&refund(sealed_by("edge-store-2-t1", &good))),
            refused
        );
        assert_eq!(reason(&refund("{}".into())), refused);
        // Another amount than the one attested.
        let more = protocol::AttestedRefund {
            amount_minor: 200,
            ..good.clone()
        };
        assert_eq!(
            reason(&refund(sealed_by("edge-store-1-t1", &more))),
            refused
        );
        // Too old (a hub that kept it), or too far ahead.
        let old = refund(String::new()).attested(now - protocol::REFUND_ATTESTATION_MAX_AGE_MS - 1);
        assert_eq!(reason(&refund(sealed_by("edge-store-1-t1", &old))), refused);
        let ahead =
            refund(String::new()).attested(now + protocol::REFUND_ATTESTATION_MAX_AHEAD_MS + 1);
        assert_eq!(
            reason(&refund(sealed_by("edge-store-1-t1", &ahead))),
            refused
        );
        let edge_of_time =
            refund(String::new()).attested(now - protocol::REFUND_ATTESTATION_MAX_AGE_MS);
        assert_eq!(
            reason(&refund(sealed_by("edge-store-1-t1", &edge_of_time))),
            None
        );
    }

    #[test]
    fn only_the_payments_own_terminal_attests_it_for_its_amount() {
        let f = fixture();
        let code = f.wallet.issue_code(f.clock.now_ms());
        let nonce = nonce_of(&code);
        assert_eq!(f.check(&f.at_t1(&nonce, by_code(&code))), Ok(()));
        // The hub's word alone: the code it forwards, with no attestation.
        let mut unattested = payment(&nonce);
        *unattested.evidence = by_code(&code);
        assert_eq!(
            reason(f.check(&unattested)),
            Some(DeclineReason::BadSignature)
        );
        // Another terminal of the store, a terminal of another store, the cloud itself.
        for name in ["edge-store-1-t2", "edge-store-2-t1", "cloud"] {
            let other = f.attested_by(name, payment(&nonce), by_code(&code));
            assert_eq!(
                reason(f.check(&other)),
                Some(DeclineReason::BadSignature),
                "{name} attested t1's payment"
            );
        }
        // A terminal's attestation moved to a larger amount, or another payment.
        let mut more = f.at_t1(&nonce, by_code(&code));
        more.amount_minor = 40_000;
        assert_eq!(reason(f.check(&more)), Some(DeclineReason::BadSignature));
        let mut moved = f.at_t1(&nonce, by_code(&code));
        moved.payment_id = "store-1:o-2".into();
        moved.order_id = "o-2".into();
        assert_eq!(reason(f.check(&moved)), Some(DeclineReason::BadSignature));
        // A face attested for alice's payment, charged to another account (a look-alike).
        let face = PayerEvidence {
            face_probe: Some(FaceProbe::new(&f.face)),
            ..Default::default()
        };
        let mut other_account = f.at_t1("tok_1", face);
        assert_eq!(f.check(&other_account), Ok(()));
        // The same attestation under another attempt (a nonce the hub chose).
        let mut again = other_account.clone();
        again.code_nonce = "tok_2".into();
        assert_eq!(reason(f.check(&again)), Some(DeclineReason::BadSignature));
        other_account.account_id = "bob".into();
        assert_eq!(
            reason(f.check(&other_account)),
            Some(DeclineReason::BadSignature)
        );
        // Evidence the hub adds beside an attestation is not taken.
        let mut added = f.at_t1(&nonce, PayerEvidence::default());
        added.evidence.payment_code = Some(code.clone());
        assert_eq!(reason(f.check(&added)), Some(DeclineReason::BadSignature));
    }

    #[test]
    fn a_code_payment_needs_the_accounts_own_fresh_code_naming_its_nonce() {
        let f = fixture();
        let now = f.clock.now_ms();
        let code = f.wallet.issue_code(now);
        assert_eq!(
            reason(f.check(&f.at_t1("00ff", by_code(&code)))),
            Some(DeclineReason::BadSignature),
            "the code must be the payment's"
        );
        // Another phone's code for alice's account; another account's code; a damaged one.
        for other in [
            Wallet::generate("alice").unwrap().issue_code(now),
            Wallet::generate("bob").unwrap().issue_code(now),
        ] {
            assert_eq!(
                reason(f.check(&f.at_t1(&nonce_of(&other), by_code(&other)))),
                Some(DeclineReason::BadSignature)
            );
        }
        assert_eq!(
            reason(f.check(&f.at_t1("00ff", by_code("FPAY1.junk")))),
            Some(DeclineReason::MalformedCode)
        );
        // An account without a payment key pays by no code.
        let no_key = f.at_t1(&nonce_of(&code), by_code(&code));
        let shown = f.check.precheck("store-1", &no_key);
        assert_eq!(
            reason(f.check.check(&no_key, None, &shown)),
            Some(DeclineReason::UnknownAccount)
        );
        // A code held back past its window, the transit allowance and the skew (twice the
        // hubs': phone against hub, hub against cloud).
        let old = f.wallet.issue_code(now - 60_000 - 10_000 - TRANSIT_MS - 1);
        assert_eq!(
            reason(f.check(&f.at_t1(&nonce_of(&old), by_code(&old)))),
            Some(DeclineReason::CodeExpired)
        );
        let late = f.wallet.issue_code(now - 60_000 - TRANSIT_MS);
        assert_eq!(f.check(&f.at_t1(&nonce_of(&late), by_code(&late))), Ok(()));
        let ahead = f.wallet.issue_code(now + 10_000);
        assert_eq!(
            f.check(&f.at_t1(&nonce_of(&ahead), by_code(&ahead))),
            Ok(())
        );
        let too_far = f.wallet.issue_code(now + 10_001);
        assert_eq!(
            reason(f.check(&f.at_t1(&nonce_of(&too_far), by_code(&too_far)))),
            Some(DeclineReason::CodeNotYetValid)
        );
        // A payment by code naming a code to spend beside it.
        let mut spends = f.at_t1(&nonce_of(&code), by_code(&code));
        spends.spent_code = Some("00ff".into());
        assert_eq!(
            reason(f.check(&spends)),
            Some(DeclineReason::InvalidRequest)
        );
    }

    #[test]
    fn a_face_payment_needs_a_face_that_matches_the_account() {
        let f = fixture();
        let face = |embedding: &[f32], code: Option<&str>| PayerEvidence {
            second_factor: None,
            payment_code: code.map(str::to_owned),
            face_probe: Some(FaceProbe::new(embedding)),
            attestation: None,
        };
        assert_eq!(f.check(&f.at_t1("tok_1", face(&f.face, None))), Ok(()));
        assert_eq!(
            reason(f.check(&f.at_t1("tok_1", face(&unit(2), None)))),
            Some(DeclineReason::FaceNotRecognized),
            "another face"
        );
        let mut bob = payment("tok_1");
        bob.account_id = "bob".into();
        let bob = f.attested_by("edge-store-1-t1", bob, face(&f.face, None));
        assert_eq!(
            reason(f.check(&bob)),
            Some(DeclineReason::FaceNotRecognized),
            "an account not enrolled by face"
        );
        assert_eq!(
            reason(f.check(&f.at_t1("tok_1", face(&[0.5; 3], None)))),
            Some(DeclineReason::InvalidRequest)
        );
        // A face in the grey zone (a look-alike's as much as hers) pays only with her second
        // factor, answered at the terminal.
        let template = &f.face;
        let other = unit(2);
        let along: f32 = other.iter().zip(template).map(|(a, b)| a * b).sum();
        let mut orthogonal: Vec<f32> = other
            .iter()
            .zip(template)
            .map(|(o, t)| o - along * t)
            .collect();
        let norm = orthogonal.iter().map(|x| x * x).sum::<f32>().sqrt();
        orthogonal.iter_mut().for_each(|x| *x /= norm);
        let grey: Vec<f32> = template
            .iter()
            .zip(&orthogonal)
            .map(|(t, o)| 0.4 * t + (1.0f32 - 0.16).sqrt() * o)
            .collect();
        let answered = |answer: Option<&str>| PayerEvidence {
            second_factor: answer.map(str::to_owned),
            ..face(&grey, None)
        };
        for wrong in [None, Some("0000")] {
            assert_eq!(
                reason(f.check(&f.at_t1("tok_1", answered(wrong)))),
                Some(DeclineReason::SecondFactorWrong),
                "{wrong:?}"
            );
        }
        assert_eq!(f.check(&f.at_t1("tok_1", answered(Some("4821")))), Ok(()));
        // Code and face: the code the face confirmed is the spent code, and checks.
        let code = f.wallet.issue_code(f.clock.now_ms());
        let mut both = f.at_t1("tok_1", face(&f.face, Some(&code)));
        both.spent_code = Some(nonce_of(&code).into());
        assert_eq!(f.check(&both), Ok(()));
        both.spent_code = Some("00ff".into());
        assert_eq!(reason(f.check(&both)), Some(DeclineReason::BadSignature));
        let mut no_code = f.at_t1("tok_1", face(&f.face, None));
        no_code.spent_code = Some(nonce_of(&code).into());
        assert_eq!(
            reason(f.check(&no_code)),
            Some(DeclineReason::BadSignature),
            "a spent code with no code shown"
        );
        let stray = f.at_t1("tok_1", face(&f.face, Some(&code)));
        assert_eq!(
            reason(f.check(&stray)),
            Some(DeclineReason::InvalidRequest),
            "a code shown that the payment does not spend"
        );
    }
}
