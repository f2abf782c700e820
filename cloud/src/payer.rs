//! The cloud's own check of who pays an online payment: the evidence the hub forwards
//! ([`protocol::PayerEvidence`]) against the account's key and enrolled face, so that a hub's
//! word (or a stolen hub key's) is not enough to charge an account.
//!
//! Run by the ledger's thread on a payment whose nonce it has not seen (a repeat hears what the
//! first was answered, whatever the evidence).
//!
//! - By code: the code's signature checks against the account's key, it names the account, its
//!   nonce is the payment's, and it is within its window (plus [`TRANSIT_MS`]).
//! - By face (a payment token): the live face matches one of the account's enrolled templates at
//!   `identity.one_to_one_threshold` (the hubs' match threshold); for code and face, the code the
//!   face confirmed checks as above with its nonce the payment's `spent_code`.

use paycode::{SignedCode, Validity};
use protocol::{CloudAuthorize, Decision, DeclineReason};

use crate::{customers::CustomerStore, ledger::Ledger};

/// How much longer than its window a code is accepted at the cloud: the time a payment the hub
/// checked in its window may take to reach the cloud (queued behind a probing breaker, resent).
pub const TRANSIT_MS: u64 = 30_000;

/// Checks the evidence of a new online payment.
#[derive(Clone)]
pub struct PayerCheck {
    ledger: Ledger,
    customers: CustomerStore,
    one_to_one_threshold: f32,
    validity: Validity,
    clock: clock::SharedClock,
}

impl PayerCheck {
    /// A check reading account keys from `ledger` and templates from `customers`; codes are
    /// valid for `validity` (the hubs'), plus [`TRANSIT_MS`].
    pub fn new(
        ledger: Ledger,
        customers: CustomerStore,
        one_to_one_threshold: f32,
        validity: Validity,
        clock: clock::SharedClock,
    ) -> Self {
        PayerCheck {
            ledger,
            customers,
            one_to_one_threshold,
            validity: Validity {
                window_ms: validity.window_ms.saturating_add(TRANSIT_MS),
                clock_skew_ms: validity.clock_skew_ms,
            },
            clock,
        }
    }

    /// `Ok` when the evidence proves the payer; else the decline to answer (nothing recorded).
    pub fn check(&self, request: &CloudAuthorize) -> Result<(), Decision> {
        let evidence = &request.evidence;
        match &evidence.face_probe {
            None => {
                if request.spent_code.is_some() {
                    return Err(refuse(
                        DeclineReason::InvalidRequest,
                        "a payment by code names no other code to spend",
                    ));
                }
                self.code(
                    request,
                    evidence.payment_code.as_deref(),
                    &request.code_nonce,
                )
            }
            Some(probe) => {
                self.face(request, &probe.embedding())?;
                match (&request.spent_code, evidence.payment_code.as_deref()) {
                    (None, None) => Ok(()),
                    (Some(spent), code) => self.code(request, code, spent),
                    (None, Some(_)) => Err(refuse(
                        DeclineReason::InvalidRequest,
                        "a code shown with a face must be the payment's spent code",
                    )),
                }
            }
        }
    }

    /// The code `text` proves the account and carries `nonce`.
    fn code(
        &self,
        request: &CloudAuthorize,
        text: Option<&str>,
        nonce: &str,
    ) -> Result<(), Decision> {
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
        let key = self
            .ledger
            .account(&request.account_id)
            .map_err(|e| refuse(DeclineReason::Internal, e.to_string()))?
            .and_then(|account| account.public_key)
            .ok_or_else(|| {
                refuse(
                    DeclineReason::UnknownAccount,
                    "the account has no payment key",
                )
            })?;
        let key = paycode::parse_public_key(&key)
            .map_err(|e| refuse(DeclineReason::Internal, e.to_string()))?;
        code.verify(&key, self.clock.now_ms(), self.validity)
            .map_err(|e| refuse(code_reason(&e), e.to_string()))
    }

    /// The face `probe` matches one of the account's enrolled templates.
    fn face(&self, request: &CloudAuthorize, probe: &[f32]) -> Result<(), Decision> {
        protocol::validate_embedding(probe)
            .map_err(|e| refuse(DeclineReason::InvalidRequest, e))?;
        let record = self
            .customers
            .get(&request.account_id)
            .map_err(|e| refuse(DeclineReason::Internal, e.to_string()))?;
        let best = record
            .iter()
            .flat_map(|r| r.templates.iter())
            .map(|(_, template)| face::cosine(template, probe))
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

fn refuse(reason: DeclineReason, detail: impl Into<String>) -> Decision {
    Decision::declined(reason, format!("cloud: {}", detail.into()))
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

/// A check for tests: `ledger` with no customers enrolled by face (a store beside it), the
/// system clock and the default window.
#[cfg(test)]
pub(crate) fn for_tests(ledger: Ledger, dir: &std::path::Path) -> PayerCheck {
    let customers = CustomerStore::open(
        &dir.join("payer-customers"),
        &dir.join("payer-customers.key"),
    )
    .unwrap();
    PayerCheck::new(
        ledger,
        customers,
        0.363,
        Validity::default(),
        clock::system(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clock::Clock as _;
    use paycode::Wallet;
    use protocol::{AccountKind, Currency, FaceProbe, OpenAccount, PayerEvidence};

    struct Fixture {
        _dir: tempfile::TempDir,
        check: PayerCheck,
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
        let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
        let wallet = Wallet::generate("alice").unwrap();
        ledger
            .open_account(&OpenAccount {
                account_id: "alice".into(),
                kind: AccountKind::Customer,
                currency: Currency::parse("EUR").unwrap(),
                initial_balance_minor: 10_000,
                public_key: Some(wallet.public_key_b64()),
            })
            .unwrap();
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
        let check = PayerCheck::new(ledger, customers, 0.363, Validity::default(), clock.clone());
        Fixture {
            _dir: dir,
            check,
            wallet,
            clock,
            face,
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

    fn reason(result: Result<(), Decision>) -> Option<DeclineReason> {
        result.err().and_then(|d| d.reason())
    }

    #[test]
    fn a_code_payment_needs_the_accounts_own_fresh_code_naming_its_nonce() {
        let f = fixture();
        let now = f.clock.now_ms();
        let code = f.wallet.issue_code(now);
        assert_eq!(
            f.check.check(&payment(&nonce_of(&code), by_code(&code))),
            Ok(())
        );
        // A hub's word alone: no code, or a made-up nonce.
        assert_eq!(
            reason(
                f.check
                    .check(&payment(&nonce_of(&code), PayerEvidence::default()))
            ),
            Some(DeclineReason::BadSignature)
        );
        assert_eq!(
            reason(f.check.check(&payment("00ff", by_code(&code)))),
            Some(DeclineReason::BadSignature),
            "the code must be the payment's"
        );
        // Another phone's code for alice's account.
        let mallory = Wallet::generate("alice").unwrap().issue_code(now);
        assert_eq!(
            reason(
                f.check
                    .check(&payment(&nonce_of(&mallory), by_code(&mallory)))
            ),
            Some(DeclineReason::BadSignature)
        );
        // Another account's code.
        let bob = Wallet::generate("bob").unwrap().issue_code(now);
        assert_eq!(
            reason(f.check.check(&payment(&nonce_of(&bob), by_code(&bob)))),
            Some(DeclineReason::BadSignature)
        );
        assert_eq!(
            reason(f.check.check(&payment("00ff", by_code("FPAY1.junk")))),
            Some(DeclineReason::MalformedCode)
        );
        // A code held back past its window and the transit allowance.
        let old = f.wallet.issue_code(now - 60_000 - 5_000 - TRANSIT_MS - 1);
        assert_eq!(
            reason(f.check.check(&payment(&nonce_of(&old), by_code(&old)))),
            Some(DeclineReason::CodeExpired)
        );
        let late = f.wallet.issue_code(now - 60_000 - TRANSIT_MS);
        assert_eq!(
            f.check.check(&payment(&nonce_of(&late), by_code(&late))),
            Ok(()),
            "within its window and the time to reach the cloud"
        );
        // A payment by code naming a code to spend beside it.
        let mut spends = payment(&nonce_of(&code), by_code(&code));
        spends.spent_code = Some("00ff".into());
        assert_eq!(
            reason(f.check.check(&spends)),
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
        assert_eq!(
            f.check.check(&payment("tok_1", face(&f.face, None))),
            Ok(())
        );
        assert_eq!(
            reason(f.check.check(&payment("tok_1", face(&unit(2), None)))),
            Some(DeclineReason::FaceNotRecognized),
            "another face"
        );
        let mut bob = payment("tok_1", face(&f.face, None));
        bob.account_id = "bob".into();
        assert_eq!(
            reason(f.check.check(&bob)),
            Some(DeclineReason::FaceNotRecognized),
            "an account not enrolled by face"
        );
        assert_eq!(
            reason(f.check.check(&payment("tok_1", face(&[0.5; 3], None)))),
            Some(DeclineReason::InvalidRequest)
        );
        // Code and face: the code the face confirmed is the spent code, and checks.
        let code = f.wallet.issue_code(f.clock.now_ms());
        let mut both = payment("tok_1", face(&f.face, Some(&code)));
        both.spent_code = Some(nonce_of(&code).into());
        assert_eq!(f.check.check(&both), Ok(()));
        both.spent_code = Some("00ff".into());
        assert_eq!(
            reason(f.check.check(&both)),
            Some(DeclineReason::BadSignature)
        );
        both.evidence.payment_code = None;
        assert_eq!(
            reason(f.check.check(&both)),
            Some(DeclineReason::BadSignature),
            "a spent code with no code shown"
        );
        let stray = payment("tok_1", face(&f.face, Some(&code)));
        assert_eq!(
            reason(f.check.check(&stray)),
            Some(DeclineReason::InvalidRequest),
            "a code shown that the payment does not spend"
        );
    }
}
