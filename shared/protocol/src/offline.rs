//! Offline authorization and reconciliation: what a hub approves while the cloud is unreachable,
//! the allowances the cloud grants each hub in advance, and the store-and-forward batches that
//! reconcile a hub's journal with the ledger.

use serde::{Deserialize, Serialize};

use crate::{AccountId, CodeNonce, Currency, OrderId, PaymentId, StoreId, TerminalId};

/// A payment a hub approved without the cloud, signed with the hub's Ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflinePayment {
    /// The hub's journal sequence number (its drain order).
    pub seq: u64,
    /// The payment id (`<store>:<order>`): the ledger applies it once.
    pub payment_id: PaymentId,
    /// The store whose hub approved it.
    pub store_id: StoreId,
    /// The terminal that asked.
    pub terminal_id: TerminalId,
    /// The cash register's order id.
    pub order_id: OrderId,
    /// The paying account.
    pub account_id: AccountId,
    /// The code's nonce or the payment token's id.
    pub nonce: CodeNonce,
    /// Amount in minor units.
    pub amount_minor: i64,
    /// Currency.
    pub currency: Currency,
    /// When the hub approved it, ms since the Unix epoch.
    pub approved_at_ms: u64,
    /// For a token issued by code and face: the nonce of the code the face confirmed (burnt
    /// with this payment at the cloud).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_code: Option<CodeNonce>,
    /// The version of the allowance it was approved under: the cloud books it against that
    /// grant, never beyond it (0: none, which the cloud refuses).
    #[serde(default)]
    pub allowance_version: u64,
    /// Ed25519 signature (URL-safe base64, no padding) of [`OfflinePayment::signed_bytes`].
    pub signature: String,
}

impl OfflinePayment {
    /// The online request this approval stands for: the same payment, code and details.
    pub fn as_request(&self) -> crate::CloudAuthorize {
        crate::CloudAuthorize {
            evidence: Default::default(),
            payment_id: self.payment_id.clone(),
            account_id: self.account_id.clone(),
            code_nonce: self.nonce.clone(),
            amount_minor: self.amount_minor,
            currency: self.currency,
            terminal_id: self.terminal_id.clone(),
            order_id: self.order_id.clone(),
            offline_reservation: crate::OfflineReservation::default(),
            spent_code: self.spent_code.clone(),
        }
    }

    /// The bytes the hub signs: every field but the signature, in a fixed order.
    pub fn signed_bytes(&self) -> Vec<u8> {
        // Entries without a grant or a confirmed code sign what they always signed; others sign
        // both too, under their own domain.
        let v1 = self.spent_code.is_none() && self.allowance_version == 0;
        let domain = if v1 {
            "facepay-offline-v1"
        } else {
            "facepay-offline-v2"
        };
        let mut fields = vec![
            serde_json::json!(domain),
            serde_json::json!(self.seq),
            serde_json::json!(self.payment_id),
            serde_json::json!(self.store_id),
            serde_json::json!(self.terminal_id),
            serde_json::json!(self.order_id),
            serde_json::json!(self.account_id),
            serde_json::json!(self.nonce),
            serde_json::json!(self.amount_minor),
            serde_json::json!(self.currency),
            serde_json::json!(self.approved_at_ms),
        ];
        if !v1 {
            fields.push(serde_json::json!(self.allowance_version));
            fields.push(serde_json::json!(self.spent_code));
        }
        serde_json::to_vec(&fields).expect("serialises")
    }
}

/// A batch of a hub's journal, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineBatch {
    /// The entries.
    pub entries: Vec<OfflinePayment>,
}

/// What the cloud made of one journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReconcileOutcome {
    /// Applied now. `in_debt`: the balance did not cover it and the account is now in debt.
    Applied {
        /// The account went (or stays) below zero.
        in_debt: bool,
    },
    /// Applied before (a resend): nothing moved.
    AlreadyApplied,
    /// The payment id was already used for other details: recorded for the operator, nothing
    /// moved. The entry is retired; the conflict is kept at the cloud.
    Conflict {
        /// What conflicts.
        detail: String,
    },
    /// Not applied and not retired: the hub keeps the entry (unknown hub key, bad signature).
    Rejected {
        /// Why.
        detail: String,
    },
}

/// The cloud's answer for one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileResult {
    /// The entry's sequence number.
    pub seq: u64,
    /// The payment.
    pub payment_id: PaymentId,
    /// What happened.
    pub outcome: ReconcileOutcome,
}

impl ReconcileResult {
    /// Whether the hub may retire the entry: the cloud has recorded it for good.
    pub fn settled(&self) -> bool {
        !matches!(self.outcome, ReconcileOutcome::Rejected { .. })
    }
}

/// How much an account may spend offline at one store, as granted by the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    /// The account.
    pub account_id: AccountId,
    /// The most the store may hold unreconciled for this account, minor units.
    pub amount_minor: i64,
    /// Its currency.
    pub currency: Currency,
    /// The account is in debt or closed: no offline payment anywhere until settled.
    pub blocked: bool,
    /// Grants and revocations are ordered by this; a hub keeps the newest.
    pub version: u64,
    /// What offline payments have already booked under this version (the cloud's count in a
    /// sync; the hub adds its own): a grant is a budget, and offline approvals under it never
    /// book more than `amount_minor` in all, reconciled or not.
    #[serde(default)]
    pub booked_minor: i64,
}

/// What a store may still hold unreconciled for an account, reported with each online payment so
/// that the cloud can refresh the account's allowance there without losing count of it: the
/// larger of what the store holds unreconciled and the allowance it holds, and that allowance's
/// version (0: none). A hub that reports nothing (an older hub) is counted at the most the cloud
/// ever granted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineReservation {
    /// Most the store may hold unreconciled for the account under what it holds now, minor units.
    pub amount_minor: i64,
    /// Version of the allowance the store holds (0: none).
    pub allowance_version: u64,
    /// The oldest allowance version the store's unreconciled entries for the account were
    /// approved under (the held version when there are none; 0: not reported): the cloud stops
    /// remembering older grants of the store for the account, since no entry can cite them.
    #[serde(default)]
    pub oldest_version: u64,
}

/// Allowances for one store (a sync page), or a broadcast of revocations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowanceBatch {
    /// The allowances.
    pub allowances: Vec<Allowance>,
    /// For a sync page: the account id to continue after, if there is more.
    pub next_after: Option<AccountId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> OfflinePayment {
        OfflinePayment {
            seq: 7,
            payment_id: "store-1:o1".into(),
            store_id: "store-1".into(),
            terminal_id: "t1".into(),
            order_id: "o1".into(),
            account_id: "alice".into(),
            nonce: "n1".into(),
            amount_minor: 1_250,
            currency: Currency::parse("EUR").unwrap(),
            approved_at_ms: 1,
            allowance_version: 0,
            spent_code: None,
            signature: "sig".into(),
        }
    }

    #[test]
    fn an_offline_approval_stands_for_the_same_online_request() {
        let entry = entry();
        let request = entry.as_request();
        assert_eq!(
            (
                request.payment_id.as_str(),
                request.account_id.as_str(),
                request.code_nonce.as_str(),
                request.amount_minor,
                request.currency,
                request.terminal_id.as_str(),
                request.order_id.as_str(),
            ),
            (
                "store-1:o1",
                "alice",
                "n1",
                1_250,
                entry.currency,
                "t1",
                "o1"
            )
        );
        assert_eq!(request.offline_reservation, OfflineReservation::default());
        assert_eq!(request.spent_code, None);
    }

    #[test]
    fn an_entry_signs_its_grant_and_confirmed_code_and_without_them_what_it_always_signed() {
        let mut entry = entry();
        let v1 = br#"["facepay-offline-v1",7,"store-1:o1","store-1","t1","o1","alice","n1",1250,"EUR",1]"#;
        assert_eq!(entry.signed_bytes(), v1.to_vec());
        entry.allowance_version = 3;
        assert_eq!(
            String::from_utf8(entry.signed_bytes()).unwrap(),
            r#"["facepay-offline-v2",7,"store-1:o1","store-1","t1","o1","alice","n1",1250,"EUR",1,3,null]"#
        );
        entry.spent_code = Some("c0de".into());
        assert_eq!(
            String::from_utf8(entry.signed_bytes()).unwrap(),
            r#"["facepay-offline-v2",7,"store-1:o1","store-1","t1","o1","alice","n1",1250,"EUR",1,3,"c0de"]"#
        );
        assert_eq!(entry.as_request().spent_code, Some("c0de".into()));
    }
}
