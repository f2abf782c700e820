//! What a hub's money messages must hold before anything uses them, checked against the store that
//! sent them (the identity its link authenticated, never a field of the message): every id well
//! formed, every payment in that store's namespace (`<store>:<order>`), every amount in range. The
//! cloud checks each message where it uses it; the hub checks the terminal's request the same way.

use crate::{
    validate_id, CloudAuthorize, OfflinePayment, ValidationError, VoidPayment, MAX_AMOUNT_MINOR,
};

/// The payment id of `order_id` at `store_id`, or why `payment_id` is not it.
pub fn check_payment_id(
    store_id: &str,
    order_id: &str,
    payment_id: &str,
) -> Result<(), ValidationError> {
    validate_id("store_id", store_id)?;
    validate_id("order_id", order_id)?;
    if crate::payment_id(store_id, order_id) != payment_id {
        return Err(foreign(store_id, payment_id));
    }
    Ok(())
}

/// Whether `payment_id` is a payment of `store_id` (`<store>:<order>`, both well formed).
pub fn check_store_payment(store_id: &str, payment_id: &str) -> Result<(), ValidationError> {
    validate_id("store_id", store_id)?;
    let order = payment_id
        .strip_prefix(store_id)
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or_else(|| foreign(store_id, payment_id))?;
    validate_id("order_id", order).map_err(|_| foreign(store_id, payment_id))
}

/// An amount of a payment: 1 to [`MAX_AMOUNT_MINOR`] minor units.
pub fn check_amount(amount_minor: i64) -> Result<(), ValidationError> {
    if !(1..=MAX_AMOUNT_MINOR).contains(&amount_minor) {
        return Err(ValidationError::Amount {
            got: amount_minor.to_string(),
            max: MAX_AMOUNT_MINOR,
        });
    }
    Ok(())
}

fn foreign(store_id: &str, payment_id: &str) -> ValidationError {
    ValidationError::ForeignPayment {
        store_id: store_id.to_owned(),
        payment_id: payment_id.chars().take(2 * crate::MAX_ID_LEN + 1).collect(),
    }
}

impl CloudAuthorize {
    /// Whether the store `store_id` may ask for this payment.
    pub fn check_from(&self, store_id: &str) -> Result<(), ValidationError> {
        check_payment_id(store_id, &self.order_id, &self.payment_id)?;
        validate_id("terminal_id", &self.terminal_id)?;
        validate_id("account_id", &self.account_id)?;
        validate_id("code_nonce", &self.code_nonce)?;
        if let Some(code) = &self.spent_code {
            validate_id("spent_code", code)?;
        }
        if let Some(code) = &self.evidence.payment_code {
            if code.is_empty() || code.len() > crate::MAX_CODE_TEXT {
                return Err(ValidationError::Evidence {
                    kind: "evidence.payment_code",
                    len: code.len(),
                    expected: crate::MAX_CODE_TEXT,
                });
            }
        }
        if let Some(attestation) = &self.evidence.attestation {
            if attestation.len() > crate::MAX_ATTESTATION {
                return Err(ValidationError::Evidence {
                    kind: "evidence.attestation",
                    len: attestation.len(),
                    expected: crate::MAX_ATTESTATION,
                });
            }
        }
        if let Some(probe) = &self.evidence.face_probe {
            if probe.len() != crate::EMBEDDING_LEN {
                return Err(ValidationError::Evidence {
                    kind: "evidence.face_probe",
                    len: probe.len(),
                    expected: crate::EMBEDDING_LEN,
                });
            }
        }
        check_amount(self.amount_minor)
    }
}

impl VoidPayment {
    /// Whether the store `store_id` may void (or post) this attempt: its payment is in the
    /// store's namespace.
    pub fn check_from(&self, store_id: &str) -> Result<(), ValidationError> {
        check_store_payment(store_id, &self.payment_id)?;
        validate_id("account_id", &self.account_id)?;
        validate_id("code_nonce", &self.code_nonce)
    }
}

impl OfflinePayment {
    /// Whether the store `store_id` may report this offline approval: its own, for a payment in
    /// its namespace.
    pub fn check_from(&self, store_id: &str) -> Result<(), ValidationError> {
        if self.store_id != store_id {
            return Err(foreign(store_id, &self.payment_id));
        }
        self.as_request().check_from(store_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Currency;

    fn request(payment: &str, order: &str, amount: i64) -> CloudAuthorize {
        CloudAuthorize {
            evidence: Default::default(),
            payment_id: payment.into(),
            account_id: "alice".into(),
            code_nonce: "00ff".into(),
            amount_minor: amount,
            currency: Currency::parse("EUR").unwrap(),
            terminal_id: "till-1".into(),
            order_id: order.into(),
            offline_reservation: Default::default(),
            spent_code: None,
        }
    }

    #[test]
    fn evidence_is_bounded() {
        let with = |evidence: crate::PayerEvidence| CloudAuthorize {
            evidence: Box::new(evidence),
            ..request("store-1:o-1", "o-1", 100)
        };
        let ok = crate::PayerEvidence {
            second_factor: None,
            payment_code: Some("FPAY1.x.y".into()),
            face_probe: Some(crate::FaceProbe::new(&[0.0; crate::EMBEDDING_LEN])),
            attestation: Some("{}".into()),
        };
        assert_eq!(with(ok.clone()).check_from("store-1"), Ok(()));
        for (bad, kind) in [
            (
                crate::PayerEvidence {
                    payment_code: Some("x".repeat(crate::MAX_CODE_TEXT + 1)),
                    ..ok.clone()
                },
                "evidence.payment_code",
            ),
            (
                crate::PayerEvidence {
                    payment_code: Some(String::new()),
                    ..ok.clone()
                },
                "evidence.payment_code",
            ),
            (
                crate::PayerEvidence {
                    face_probe: Some(crate::FaceProbe::new(&[0.0; 3])),
                    ..ok.clone()
                },
                "evidence.face_probe",
            ),
            (
                crate::PayerEvidence {
                    attestation: Some("x".repeat(crate::MAX_ATTESTATION + 1)),
                    ..ok.clone()
                },
                "evidence.attestation",
            ),
        ] {
            assert!(
                matches!(with(bad).check_from("store-1"), Err(ValidationError::Evidence { kind: k, .. }) if k == kind),
                "{kind}"
            );
        }
    }

    #[test]
    fn a_store_may_ask_only_for_payments_in_its_own_namespace() {
        assert_eq!(
            request("store-1:o-1", "o-1", 100).check_from("store-1"),
            Ok(())
        );
        for (payment, order, why) in [
            ("store-2:o-1", "o-1", "another store's payment"),
            ("store-1:o-2", "o-1", "another order's payment id"),
            ("open:alice", "alice", "an internal transfer id"),
            (
                "store-1:o-1#void",
                "o-1#void",
                "an order id with a separator",
            ),
            ("store-1:o-1", "o-1:x", "an order id that is no id"),
        ] {
            let refused = request(payment, order, 100).check_from("store-1");
            assert!(refused.is_err(), "{why}: {refused:?}");
        }
        let mut bad_account = request("store-1:o-1", "o-1", 100);
        bad_account.account_id = "alice/../bob".into();
        assert!(matches!(
            bad_account.check_from("store-1"),
            Err(ValidationError::IdCharacter {
                kind: "account_id",
                ..
            })
        ));
    }

    #[test]
    fn amounts_out_of_range_are_refused() {
        for amount in [
            0,
            -1,
            -MAX_AMOUNT_MINOR,
            MAX_AMOUNT_MINOR + 1,
            i64::MIN,
            i64::MAX,
        ] {
            assert!(
                matches!(
                    request("store-1:o-1", "o-1", amount).check_from("store-1"),
                    Err(ValidationError::Amount { .. })
                ),
                "{amount}"
            );
        }
        assert_eq!(
            request("store-1:o-1", "o-1", MAX_AMOUNT_MINOR).check_from("store-1"),
            Ok(())
        );
    }

    #[test]
    fn a_void_names_an_attempt_of_the_store_that_sends_it() {
        let void = |payment: &str| VoidPayment {
            payment_id: payment.into(),
            account_id: "alice".into(),
            code_nonce: "00ff".into(),
        };
        assert_eq!(void("store-1:o-1").check_from("store-1"), Ok(()));
        for payment in [
            "store-2:o-1",
            "store-10:o-1",
            "store-1:",
            "store-1",
            "store-1:o-1#void",
            "deposit:d-1",
        ] {
            assert!(
                matches!(
                    void(payment).check_from("store-1"),
                    Err(ValidationError::ForeignPayment { .. })
                ),
                "{payment}"
            );
        }
        // "store-1" is a prefix of "store-10": the separator is part of the namespace.
        assert!(void("store-10:o-1").check_from("store-1").is_err());
    }

    #[test]
    fn an_offline_approval_is_reported_by_its_own_store() {
        let mut entry = OfflinePayment {
            seq: 1,
            payment_id: "store-1:o-1".into(),
            store_id: "store-1".into(),
            terminal_id: "till-1".into(),
            order_id: "o-1".into(),
            account_id: "alice".into(),
            nonce: "00ff".into(),
            amount_minor: 700,
            currency: Currency::parse("EUR").unwrap(),
            approved_at_ms: 0,
            allowance_version: 0,
            spent_code: None,
            signature: String::new(),
        };
        assert_eq!(entry.check_from("store-1"), Ok(()));
        assert!(
            entry.check_from("store-2").is_err(),
            "another store's entry"
        );
        entry.amount_minor = -700;
        assert!(entry.check_from("store-1").is_err(), "a negative amount");
    }
}
