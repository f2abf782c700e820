//! The cloud's own check of who pays an online payment: the evidence the hub forwards
//! ([`protocol::PayerEvidence`]) against the account's key and enrolled face, so that a hub's
//! word (or a stolen hub key's) is not enough to charge an account.
//!
//! Run by the ledger, in its transaction, where an attempt would move money: a new attempt at an
//! order not paid (a repeat hears what the first was answered, and an attempt at a paid order
//! that it is paid, whatever the evidence). Its refusal is recorded like any decline. The face is
//! matched before the transaction ([`PayerCheck::match_face`]: it reads the customer store, and
//! no store is read inside a ledger transaction), the rest inside it ([`PayerCheck::check`]).
//!
//! - By code: the code's signature checks against the account's key, it names the account, its
//!   nonce is the payment's, and it is within its window (plus [`TRANSIT_MS`]).
//! - By face (a payment token): the live face matches one of the account's enrolled templates at
//!   `identity.one_to_one_threshold` (the hubs' match threshold); for code and face, the code the
//!   face confirmed checks as above with its nonce the payment's `spent_code`.

use paycode::{SignedCode, Validity};
use protocol::{CloudAuthorize, Decision, DeclineReason};

use crate::{customers::CustomerStore, ledger::PayerRefusal};

/// How much longer than its window a code is accepted at the cloud: the time a payment the hub
/// checked in its window may take to reach the cloud (queued behind a probing breaker, resent).
pub const TRANSIT_MS: u64 = 30_000;

/// Checks the evidence of a new online payment.
#[derive(Clone)]
pub struct PayerCheck {
    customers: CustomerStore,
    one_to_one_threshold: f32,
    validity: Validity,
    clock: clock::SharedClock,
}

impl PayerCheck {
    /// A check reading templates from `customers`; codes are valid for `validity` (the hubs'),
    /// plus [`TRANSIT_MS`], and may be ahead of the cloud's clock by twice its skew (the phone's
    /// clock against the hub's, the hub's against the cloud's).
    pub fn new(
        customers: CustomerStore,
        one_to_one_threshold: f32,
        validity: Validity,
        clock: clock::SharedClock,
    ) -> Self {
        PayerCheck {
            customers,
            one_to_one_threshold,
            validity: Validity {
                window_ms: validity.window_ms.saturating_add(TRANSIT_MS),
                clock_skew_ms: validity.clock_skew_ms.saturating_mul(2),
            },
            clock,
        }
    }

    /// `Ok` when the evidence proves the payer, whose account's payment key is `account_key` and
    /// whose face matched as `face` says ([`PayerCheck::match_face`] of the same request); else
    /// why not (a decline, or a check that could not run). Reads nothing.
    pub fn check(
        &self,
        request: &CloudAuthorize,
        account_key: Option<&str>,
        face: &Result<(), PayerRefusal>,
    ) -> Result<(), PayerRefusal> {
        let evidence = &request.evidence;
        match &evidence.face_probe {
            None => {
                if request.spent_code.is_some() {
                    return Err(refuse(
                        DeclineReason::InvalidRequest,
                        "a payment by code names no other code to spend",
                    ));
                }
                let code = evidence.payment_code.as_deref();
                self.code(request, account_key, code, &request.code_nonce)
            }
            Some(_) => {
                face.clone()?;
                match (&request.spent_code, evidence.payment_code.as_deref()) {
                    (None, None) => Ok(()),
                    (Some(spent), code) => self.code(request, account_key, code, spent),
                    (None, Some(_)) => Err(refuse(
                        DeclineReason::InvalidRequest,
                        "a code shown with a face must be the payment's spent code",
                    )),
                }
            }
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
                "no payment code reached the cloud with this payment; it checks the code itself",
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

    /// Whether the face the request shows, if any, matches one of the account's enrolled
    /// templates (`Ok` for a request with no face).
    pub fn match_face(&self, request: &CloudAuthorize) -> Result<(), PayerRefusal> {
        let Some(probe) = &request.evidence.face_probe else {
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
        if best >= self.one_to_one_threshold {
            Ok(())
        } else {
            Err(refuse(
                DeclineReason::FaceNotRecognized,
                "the face shown does not match this account's enrolled face",
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

/// A check for tests: no customers enrolled by face (a store in `dir`), the system clock and the
/// default window.
#[cfg(test)]
pub(crate) fn for_tests(dir: &std::path::Path) -> PayerCheck {
    let customers = CustomerStore::open(
        &dir.join("payer-customers"),
        &dir.join("payer-customers.key"),
    )
    .unwrap();
    PayerCheck::new(customers, 0.363, Validity::default(), clock::system())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clock::Clock as _;
    use paycode::Wallet;
    use protocol::{Currency, FaceProbe, PayerEvidence};

    struct Fixture {
        _dir: tempfile::TempDir,
        check: PayerCheck,
        key: String,
        wallet: Wallet,
        clock: std::sync::Arc<clock::ManualClock>,
        face: Vec<f32>,
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
        let clock = clock::ManualClock::new(1_700_000_000_000);
        let check = PayerCheck::new(customers, 0.363, Validity::default(), clock.clone());
        Fixture {
            _dir: dir,
            check,
            key: wallet.public_key_b64(),
            wallet,
            clock,
            face,
        }
    }

    impl Fixture {
        /// The check, with alice's payment key.
        fn check(&self, request: &CloudAuthorize) -> Result<(), PayerRefusal> {
            let face = self.check.match_face(request);
            self.check.check(request, Some(&self.key), &face)
        }
    }

    fn payment(nonce: &str, evidence: PayerEvidence) -> CloudAuthorize {
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
            evidence,
        }
    }

    fn by_code(text: &str) -> PayerEvidence {
        PayerEvidence {
            payment_code: Some(text.into()),
            face_probe: None,
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
    fn a_code_payment_needs_the_accounts_own_fresh_code_naming_its_nonce() {
        let f = fixture();
        let now = f.clock.now_ms();
        let code = f.wallet.issue_code(now);
        assert_eq!(f.check(&payment(&nonce_of(&code), by_code(&code))), Ok(()));
        // A hub's word alone: no code, or a made-up nonce.
        assert_eq!(
            reason(f.check(&payment(&nonce_of(&code), PayerEvidence::default()))),
            Some(DeclineReason::BadSignature)
        );
        assert_eq!(
            reason(f.check(&payment("00ff", by_code(&code)))),
            Some(DeclineReason::BadSignature),
            "the code must be the payment's"
        );
        // Another phone's code for alice's account.
        let mallory = Wallet::generate("alice").unwrap().issue_code(now);
        assert_eq!(
            reason(f.check(&payment(&nonce_of(&mallory), by_code(&mallory)))),
            Some(DeclineReason::BadSignature)
        );
        // Another account's code.
        let bob = Wallet::generate("bob").unwrap().issue_code(now);
        assert_eq!(
            reason(f.check(&payment(&nonce_of(&bob), by_code(&bob)))),
            Some(DeclineReason::BadSignature)
        );
        assert_eq!(
            reason(f.check(&payment("00ff", by_code("FPAY1.junk")))),
            Some(DeclineReason::MalformedCode)
        );
        // An account without a payment key pays by no code.
        assert_eq!(
            reason(
                f.check
                    .check(&payment(&nonce_of(&code), by_code(&code)), None, &Ok(()))
            ),
            Some(DeclineReason::UnknownAccount)
        );
        // A code held back past its window, the transit allowance and the skew (twice the
        // hubs': phone against hub, hub against cloud).
        let old = f.wallet.issue_code(now - 60_000 - 10_000 - TRANSIT_MS - 1);
        assert_eq!(
            reason(f.check(&payment(&nonce_of(&old), by_code(&old)))),
            Some(DeclineReason::CodeExpired)
        );
        let late = f.wallet.issue_code(now - 60_000 - TRANSIT_MS);
        assert_eq!(
            f.check(&payment(&nonce_of(&late), by_code(&late))),
            Ok(()),
            "within its window and the time to reach the cloud"
        );
        let ahead = f.wallet.issue_code(now + 10_000);
        assert_eq!(
            f.check(&payment(&nonce_of(&ahead), by_code(&ahead))),
            Ok(())
        );
        let too_far = f.wallet.issue_code(now + 10_001);
        assert_eq!(
            reason(f.check(&payment(&nonce_of(&too_far), by_code(&too_far)))),
            Some(DeclineReason::CodeNotYetValid)
        );
        // A payment by code naming a code to spend beside it.
        let mut spends = payment(&nonce_of(&code), by_code(&code));
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
            payment_code: code.map(str::to_owned),
            face_probe: Some(FaceProbe::new(embedding)),
        };
        assert_eq!(f.check(&payment("tok_1", face(&f.face, None))), Ok(()));
        assert_eq!(
            reason(f.check(&payment("tok_1", face(&unit(2), None)))),
            Some(DeclineReason::FaceNotRecognized),
            "another face"
        );
        let mut bob = payment("tok_1", face(&f.face, None));
        bob.account_id = "bob".into();
        assert_eq!(
            reason(f.check(&bob)),
            Some(DeclineReason::FaceNotRecognized),
            "an account not enrolled by face"
        );
        assert_eq!(
            reason(f.check(&payment("tok_1", face(&[0.5; 3], None)))),
            Some(DeclineReason::InvalidRequest)
        );
        // Code and face: the code the face confirmed is the spent code, and checks.
        let code = f.wallet.issue_code(f.clock.now_ms());
        let mut both = payment("tok_1", face(&f.face, Some(&code)));
        both.spent_code = Some(nonce_of(&code).into());
        assert_eq!(f.check(&both), Ok(()));
        both.spent_code = Some("00ff".into());
        assert_eq!(reason(f.check(&both)), Some(DeclineReason::BadSignature));
        both.evidence.payment_code = None;
        assert_eq!(
            reason(f.check(&both)),
            Some(DeclineReason::BadSignature),
            "a spent code with no code shown"
        );
        let stray = payment("tok_1", face(&f.face, Some(&code)));
        assert_eq!(
            reason(f.check(&stray)),
            Some(DeclineReason::InvalidRequest),
            "a code shown that the payment does not spend"
        );
    }
}
