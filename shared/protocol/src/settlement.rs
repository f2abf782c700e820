//! A store's statement for one day: what it was paid, what went back, and the net, from the
//! ledger's transfers (the admin API's `GET /v1/stores/{id}/settlement`).

use serde::{Deserialize, Serialize};

use crate::{AccountId, Currency, OrderId, StoreId, TerminalId};

/// What a statement line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementKind {
    /// A payment approved online (pending until its hub confirms it), or one charged again after
    /// its expiry when its confirmation came late.
    Payment,
    /// A payment the store's hub approved offline, applied when the store reconciled.
    OfflinePayment,
    /// An online payment moved back (voided by its hub, or expired unconfirmed).
    Reversal,
    /// Money refunded to the customer.
    Refund,
    /// The store account's opening balance.
    Opening,
}

impl SettlementKind {
    /// The kind's name, as in JSON and CSV.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Payment => "payment",
            Self::OfflinePayment => "offline_payment",
            Self::Reversal => "reversal",
            Self::Refund => "refund",
            Self::Opening => "opening",
        }
    }
}

/// One transfer of the store's account on the day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementLine {
    /// The ledger's transfer id.
    pub transfer_id: String,
    /// What it is.
    pub kind: SettlementKind,
    /// The order, for payments, reversals and refunds.
    pub order_id: Option<OrderId>,
    /// The customer account on the other side.
    pub account_id: Option<AccountId>,
    /// The terminal that took it, when known.
    pub terminal_id: Option<TerminalId>,
    /// Minor units, signed for the store: positive paid in, negative paid out.
    pub amount_minor: i64,
    /// When the ledger applied it, milliseconds since the Unix epoch.
    pub applied_at_ms: u64,
    /// An online payment its hub has not confirmed yet: a void or its expiry may still move it
    /// back (then a reversal line follows, on the day it happens).
    pub pending: bool,
}

/// How many lines of a kind, and their sum (signed for the store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementTotal {
    /// Lines.
    pub count: u64,
    /// Their sum in minor units, signed for the store.
    pub amount_minor: i64,
}

impl SettlementTotal {
    /// Adds a line; `None` on an overflow (no real day comes near: each amount is at most
    /// [`crate::MAX_AMOUNT_MINOR`]).
    fn add(&mut self, amount_minor: i64) -> Option<()> {
        self.count += 1;
        self.amount_minor = self.amount_minor.checked_add(amount_minor)?;
        Some(())
    }
}

/// A store's statement for one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// The store (its merchant account).
    pub store_id: StoreId,
    /// The day, `YYYY-MM-DD`, in the store's time (`utc_offset_minutes`).
    pub date: String,
    /// The store's offset from UTC the day is taken in, minutes.
    pub utc_offset_minutes: i32,
    /// The day's first millisecond (inclusive), since the Unix epoch.
    pub from_ms: u64,
    /// The next day's first millisecond (exclusive).
    pub to_ms: u64,
    /// The store account's currency.
    pub currency: Currency,
    /// Payments approved online that day.
    pub payments: SettlementTotal,
    /// Payments approved offline and reconciled that day.
    pub offline_payments: SettlementTotal,
    /// Online payments moved back that day.
    pub reversals: SettlementTotal,
    /// Refunds that day (negative).
    pub refunds: SettlementTotal,
    /// The opening balance, on the day the account was opened.
    pub openings: SettlementTotal,
    /// Of the day's payments, those not confirmed yet.
    pub pending: SettlementTotal,
    /// Everything the store's account gained that day (all lines added): its balance at the end
    /// of the day minus its balance at the start.
    pub net_minor: i64,
    /// Every line, in the order applied.
    pub lines: Vec<SettlementLine>,
}

impl Settlement {
    /// The statement of `lines` (the store account's transfers applied from `from_ms` until
    /// `to_ms`), totalled; `None` when a total would overflow.
    pub fn of(
        (store_id, currency): (StoreId, Currency),
        (date, utc_offset_minutes): (String, i32),
        (from_ms, to_ms): (u64, u64),
        mut lines: Vec<SettlementLine>,
    ) -> Option<Self> {
        lines.sort_by(|a, b| {
            (a.applied_at_ms, &a.transfer_id).cmp(&(b.applied_at_ms, &b.transfer_id))
        });
        let mut settlement = Settlement {
            store_id,
            date,
            utc_offset_minutes,
            from_ms,
            to_ms,
            currency,
            payments: SettlementTotal::default(),
            offline_payments: SettlementTotal::default(),
            reversals: SettlementTotal::default(),
            refunds: SettlementTotal::default(),
            openings: SettlementTotal::default(),
            pending: SettlementTotal::default(),
            net_minor: 0,
            lines: Vec::new(),
        };
        for line in &lines {
            let total = match line.kind {
                SettlementKind::Payment => &mut settlement.payments,
                SettlementKind::OfflinePayment => &mut settlement.offline_payments,
                SettlementKind::Reversal => &mut settlement.reversals,
                SettlementKind::Refund => &mut settlement.refunds,
                SettlementKind::Opening => &mut settlement.openings,
            };
            total.add(line.amount_minor)?;
            if line.pending {
                settlement.pending.add(line.amount_minor)?;
            }
            settlement.net_minor = settlement.net_minor.checked_add(line.amount_minor)?;
        }
        settlement.lines = lines;
        Some(settlement)
    }

    /// The lines as CSV (RFC 4180, a header row first): every field is an id of `[A-Za-z0-9_.-]`,
    /// a number, a kind or a time, so none needs quoting. The `amount_minor` column adds up to
    /// `net_minor`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "store_id,date,transfer_id,kind,applied_at_ms,order_id,account_id,terminal_id,\
             currency,amount_minor,pending\r\n",
        );
        for line in &self.lines {
            let or_empty = |v: Option<&str>| v.unwrap_or("").to_string();
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{}\r\n",
                self.store_id,
                self.date,
                line.transfer_id,
                line.kind.as_str(),
                line.applied_at_ms,
                or_empty(line.order_id.as_deref()),
                or_empty(line.account_id.as_deref()),
                or_empty(line.terminal_id.as_deref()),
                self.currency,
                line.amount_minor,
                line.pending,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, kind: SettlementKind, amount: i64, at: u64, pending: bool) -> SettlementLine {
        SettlementLine {
            transfer_id: id.into(),
            kind,
            order_id: Some("o-1".into()),
            account_id: Some("alice".into()),
            terminal_id: None,
            amount_minor: amount,
            applied_at_ms: at,
            pending,
        }
    }

    #[test]
    fn totals_add_up_by_kind_and_to_the_net() {
        let s = Settlement::of(
            ("store-1".into(), Currency::parse("EUR").unwrap()),
            ("2026-12-06".into(), 0),
            (0, 86_400_000),
            vec![
                line("s:o2", SettlementKind::Payment, 500, 20, true),
                line("s:o1", SettlementKind::Payment, 1_000, 10, false),
                line("s:o3", SettlementKind::OfflinePayment, 300, 30, false),
                line("s:o1#refund:r1", SettlementKind::Refund, -400, 40, false),
                line("s:o2#void", SettlementKind::Reversal, -500, 50, false),
            ],
        )
        .unwrap();
        assert_eq!(
            s.payments,
            SettlementTotal {
                count: 2,
                amount_minor: 1_500
            }
        );
        assert_eq!(
            s.pending,
            SettlementTotal {
                count: 1,
                amount_minor: 500
            }
        );
        assert_eq!(s.offline_payments.amount_minor, 300);
        assert_eq!(
            s.refunds,
            SettlementTotal {
                count: 1,
                amount_minor: -400
            }
        );
        assert_eq!(s.reversals.amount_minor, -500);
        assert_eq!(s.net_minor, 900);
        assert_eq!(s.lines[0].transfer_id, "s:o1", "in the order applied");
        let csv = s.to_csv();
        let rows: Vec<&str> = csv.trim_end().split("\r\n").collect();
        assert_eq!(rows.len(), 6);
        let sum: i64 = rows[1..]
            .iter()
            .map(|r| r.split(',').nth(9).unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(sum, s.net_minor);
        assert!(rows[4].contains(",refund,"), "{}", rows[4]);
        let huge = Settlement::of(
            ("store-1".into(), Currency::parse("EUR").unwrap()),
            ("2026-12-06".into(), 0),
            (0, 86_400_000),
            vec![
                line("s:o1", SettlementKind::Payment, i64::MAX, 10, false),
                line("s:o2", SettlementKind::Payment, 1, 20, false),
            ],
        );
        assert!(huge.is_none(), "an overflow is refused, never wrapped");
    }
}
