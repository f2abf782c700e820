//! Refunds: money back from a store's account to the account a payment charged, once per refund
//! id, never more than the payment minus its earlier refunds, only from a final payment; and the
//! store's statement for a day, from the transfers of its account.

use protocol::{Refund, RefundDecision, Settlement, SettlementKind, SettlementLine};

use super::*;

/// A refund made, by `<store>/<refund id>`: what a repeat of the refund id is checked against.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefundRecord {
    payment_id: PaymentId,
    /// The payment's transfer refunded (`<payment id>`, or `#offline` / `#posted` beside it).
    paid_transfer_id: String,
    amount_minor: i64,
    currency: Currency,
    terminal_id: protocol::TerminalId,
    refunded_at_ms: u64,
}

fn refund_key(store_id: &str, refund_id: &str) -> Vec<u8> {
    format!("{store_id}/{refund_id}").into_bytes()
}

/// The transfer id of refund `refund_id` of `payment_id`.
fn refund_transfer_id(payment_id: &str, refund_id: &str) -> String {
    format!("{payment_id}#refund:{refund_id}")
}

/// What a payment's transfers say about refunding it.
enum Refundable {
    /// Final: the transfer id charged and its record.
    Final(String, Box<TransferRecord>),
    /// Charged, not final: a void or its expiry may still move it back.
    NotFinal,
    /// Not charged (never seen, declined, moved back).
    Nothing,
}

/// The transfer that charged `payment_id` for good, as [`Ledger::payment_status`] reads it: an
/// offline approval or a late post beside a voided attempt, else the payment's own transfer once
/// posted or applied offline.
fn refundable(
    transfers: &storage::kv::TransactionalTree,
    payment_id: &str,
) -> TxResult<Refundable> {
    for suffix in ["offline", "posted"] {
        let id = format!("{payment_id}#{suffix}");
        if let Some(t) = transfers.get(id.as_bytes())? {
            return Ok(Refundable::Final(id, Box::new(decode(&t))));
        }
    }
    Ok(match transfers.get(payment_id.as_bytes())? {
        None => Refundable::Nothing,
        Some(t) => {
            let t: TransferRecord = decode(&t);
            match t {
                // Expired with attempts that may still confirm it: charged again then.
                t if t.voided && !t.expired_holders.is_empty() => Refundable::NotFinal,
                t if t.voided => Refundable::Nothing,
                t if t.posted || t.offline => Refundable::Final(payment_id.to_owned(), Box::new(t)),
                _ => Refundable::NotFinal,
            }
        }
    })
}

impl Ledger {
    /// Refunds `refund.amount_minor` of a payment of `store_id` to the account it charged: a
    /// transfer `<payment id>#refund:<refund id>` from the store's account, in one transaction
    /// with the payment's refunded total and the refund id's record. The same refund id again
    /// refunds nothing more and answers as the first time; with another payment, amount or
    /// currency it is declined (`duplicate_refund_id`). Declined, with nothing written: a payment
    /// not final yet (`payment_not_settled`: its hub has not confirmed it), one the ledger does
    /// not hold (`payment_not_found`: never paid, or moved back; an offline approval not
    /// reconciled yet is not here either), more than the payment minus its earlier refunds
    /// (`refund_exceeds_payment`), another currency, a closed customer account
    /// (`account_blocked`), a store account holding less than the refund
    /// (`insufficient_funds`). `attested` is the caller's check of the terminal's attestation
    /// ([`crate::payer::PayerCheck::refund_attested`]): a refund id already made answers from its
    /// record whatever it says (the register asking again after its answer was lost, the
    /// terminal's certificate since rotated), a new one moves money only when it is `Ok`, and its
    /// decline is decided in the transaction too (held to the store's lease like any write).
    pub fn refund(
        &self,
        store_id: &str,
        refund: &Refund,
        attested: &Result<(), RefundDecision>,
    ) -> Result<RefundDecision, LedgerError> {
        refund.check_from(store_id).map_err(invalid)?;
        let now_ms = self.clock.now_ms();
        let key = refund_key(store_id, &refund.refund_id);
        let trees = (&self.accounts, &self.transfers, &self.refunds, &self.debts);
        let decision = unwrap_tx(trees.transaction(
            |(accounts, transfers, refunds, debts)| -> TxResult<RefundDecision> {
                if let Some(done) = refunds.get(&key)? {
                    let done: RefundRecord = decode(&done);
                    if done.payment_id != refund.payment_id
                        || done.amount_minor != refund.amount_minor
                        || done.currency != refund.currency
                    {
                        return Ok(RefundDecision::declined(
                            DeclineReason::DuplicateRefundId,
                            format!(
                                "refund id {} was already used to refund {} of {}",
                                refund.refund_id,
                                done.currency.format(done.amount_minor),
                                done.payment_id
                            ),
                        ));
                    }
                    let paid: TransferRecord = decode(
                        &transfers
                            .get(done.paid_transfer_id.as_bytes())?
                            .expect("a refunded payment's transfer is never removed"),
                    );
                    return Ok(RefundDecision::Refunded {
                        account_id: paid.debit_account_id,
                        amount_minor: done.amount_minor,
                        refunded_total_minor: paid.refunded_minor,
                        paid_minor: paid.amount_minor,
                        already_refunded: true,
                    });
                }
                if let Err(declined) = attested {
                    return Ok(declined.clone());
                }
                let (paid_id, mut paid) = match refundable(transfers, &refund.payment_id)? {
                    Refundable::Final(id, t) => (id, *t),
                    Refundable::NotFinal => {
                        return Ok(RefundDecision::declined(
                            DeclineReason::PaymentNotSettled,
                            format!(
                                "{} is not final yet (the store's confirmation has not reached \
                                 the cloud); nothing was refunded: try again in a moment",
                                refund.payment_id
                            ),
                        ))
                    }
                    Refundable::Nothing => {
                        return Ok(RefundDecision::declined(
                            DeclineReason::PaymentNotFound,
                            format!(
                                "the ledger holds no payment {} (never paid, declined or moved \
                                 back); nothing was refunded",
                                refund.payment_id
                            ),
                        ))
                    }
                };
                if paid.credit_account_id != store_id {
                    // Not the store's money (a payment id is the store's namespace: never).
                    return Ok(RefundDecision::declined(
                        DeclineReason::PaymentNotFound,
                        format!("{} did not pay {store_id}", refund.payment_id),
                    ));
                }
                if paid.currency != refund.currency {
                    return Ok(RefundDecision::declined(
                        DeclineReason::CurrencyMismatch,
                        format!(
                            "{} was paid in {}, not {}",
                            refund.payment_id, paid.currency, refund.currency
                        ),
                    ));
                }
                let left = paid.amount_minor - paid.refunded_minor;
                if refund.amount_minor > left {
                    return Ok(RefundDecision::declined(
                        DeclineReason::RefundExceedsPayment,
                        format!(
                            "{} paid {} and {} of it was refunded already: at most {} more",
                            refund.payment_id,
                            paid.currency.format(paid.amount_minor),
                            paid.currency.format(paid.refunded_minor),
                            paid.currency.format(left)
                        ),
                    ));
                }
                let customer_id = paid.debit_account_id.clone();
                let mut customer: AccountRecord = decode(
                    &accounts
                        .get(customer_id.as_bytes())?
                        .expect("a charged account exists"),
                );
                if customer.closed {
                    return Ok(RefundDecision::declined(
                        DeclineReason::AccountBlocked,
                        format!("the customer's account {customer_id} is closed; refund otherwise"),
                    ));
                }
                let mut merchant: AccountRecord = decode(
                    &accounts
                        .get(store_id.as_bytes())?
                        .expect("a store's account exists"),
                );
                if merchant.balance_minor < refund.amount_minor {
                    return Ok(RefundDecision::declined(
                        DeclineReason::InsufficientFunds,
                        format!(
                            "the store's account holds {}, less than the refund",
                            merchant.currency.format(merchant.balance_minor)
                        ),
                    ));
                }
                apply_transfer(
                    accounts,
                    (store_id, &mut merchant),
                    (&customer_id, &mut customer),
                    refund.amount_minor,
                )?;
                // Money back settles a debt as a deposit does.
                if customer.in_debt && customer.balance_minor >= 0 {
                    customer.in_debt = false;
                    debts.remove(customer_id.as_bytes())?;
                    accounts.insert(customer_id.as_bytes(), encode(&customer))?;
                }
                paid.refunded_minor += refund.amount_minor;
                transfers.insert(paid_id.as_bytes(), encode(&paid))?;
                let transfer = TransferRecord {
                    debit_account_id: store_id.into(),
                    credit_account_id: customer_id.clone(),
                    amount_minor: refund.amount_minor,
                    currency: refund.currency,
                    // Never before its payment, whatever this instance's clock says.
                    applied_at_ms: now_ms.max(paid.applied_at_ms),
                    code_nonce: None,
                    store_id: Some(store_id.into()),
                    terminal_id: Some(refund.terminal_id.clone()),
                    order_id: paid.order_id.clone(),
                    voided: false,
                    offline: false,
                    approved_nonces: Vec::new(),
                    posted: true,
                    pending_until_ms: None,
                    expired_holders: Vec::new(),
                    refunded_minor: 0,
                };
                transfers.insert(
                    refund_transfer_id(&refund.payment_id, &refund.refund_id).as_bytes(),
                    encode(&transfer),
                )?;
                let record = RefundRecord {
                    payment_id: refund.payment_id.clone(),
                    paid_transfer_id: paid_id,
                    amount_minor: refund.amount_minor,
                    currency: refund.currency,
                    terminal_id: refund.terminal_id.clone(),
                    refunded_at_ms: now_ms,
                };
                refunds.insert(key.as_slice(), encode(&record))?;
                Ok(RefundDecision::Refunded {
                    account_id: customer_id,
                    amount_minor: refund.amount_minor,
                    refunded_total_minor: paid.refunded_minor,
                    paid_minor: paid.amount_minor,
                    already_refunded: false,
                })
            },
        ))?;
        if matches!(
            decision,
            RefundDecision::Refunded {
                already_refunded: false,
                ..
            }
        ) {
            self.flush()?;
        }
        Ok(decision)
    }

    /// The statement of store `store_id` for the day `date` (`YYYY-MM-DD`) in the store's time,
    /// `utc_offset_minutes` from UTC (-720 to 840): every transfer of its account applied that
    /// day. The lines add up to the account's balance at the end of the day minus its balance
    /// at the start. Reads the store's transfers (every day's) once.
    pub fn settlement(
        &self,
        store_id: &str,
        date: &str,
        utc_offset_minutes: i32,
    ) -> Result<Settlement, LedgerError> {
        protocol::validate_id("store_id", store_id).map_err(invalid)?;
        let (from_ms, to_ms) = day_bounds(date, utc_offset_minutes)?;
        let Some(account) = self
            .accounts
            .get(store_id.as_bytes())
            .map_err(|e| LedgerError::Storage(e.to_string()))?
        else {
            return Err(LedgerError::Invalid(format!("no store account {store_id}")));
        };
        let account: AccountRecord = decode(&account);
        if account.kind != AccountKind::Merchant {
            return Err(LedgerError::Invalid(format!("{store_id} is not a store")));
        }
        let on_the_day = |t: &TransferRecord| (from_ms..to_ms).contains(&t.applied_at_ms);
        let mut lines = Vec::new();
        let opening = format!("open:{store_id}");
        if let Some(t) = self
            .transfers
            .get(opening.as_bytes())
            .map_err(|e| LedgerError::Storage(e.to_string()))?
        {
            let t: TransferRecord = decode(&t);
            if on_the_day(&t) {
                lines.push(line(store_id, opening, SettlementKind::Opening, t));
            }
        }
        for item in self
            .transfers
            .scan_prefix(format!("{store_id}:").as_bytes())
        {
            let (key, value) = item.map_err(|e| LedgerError::Storage(e.to_string()))?;
            let t: TransferRecord = decode(&value);
            if !on_the_day(&t) {
                continue;
            }
            let id = String::from_utf8(key.to_vec()).expect("ids are UTF-8");
            let kind = match id.split_once('#').map(|(_, kind)| kind) {
                None | Some("offline") if t.offline => SettlementKind::OfflinePayment,
                None | Some("posted") => SettlementKind::Payment,
                Some("void") => SettlementKind::Reversal,
                Some(kind) if kind.starts_with("refund:") => SettlementKind::Refund,
                Some(kind) => {
                    return Err(LedgerError::Broken(format!(
                        "transfer {id} is of no kind the ledger writes ({kind})"
                    )))
                }
            };
            lines.push(line(store_id, id, kind, t));
        }
        Settlement::of(
            (store_id.into(), account.currency),
            (date.to_owned(), utc_offset_minutes),
            (from_ms, to_ms),
            lines,
        )
        .ok_or_else(|| {
            LedgerError::Broken(format!("the totals of {store_id}'s day {date} overflow"))
        })
    }
}

/// A statement line of `transfer_id` for the store `store_id`.
fn line(
    store_id: &str,
    transfer_id: String,
    kind: SettlementKind,
    t: TransferRecord,
) -> SettlementLine {
    let into_store = t.credit_account_id == store_id;
    let pending = !t.posted && !t.offline && !t.voided;
    SettlementLine {
        transfer_id,
        kind,
        order_id: t.order_id,
        account_id: Some(if into_store {
            t.debit_account_id
        } else {
            t.credit_account_id
        })
        .filter(|_| kind != SettlementKind::Opening),
        terminal_id: t.terminal_id,
        amount_minor: if into_store {
            t.amount_minor
        } else {
            -t.amount_minor
        },
        applied_at_ms: t.applied_at_ms,
        pending,
    }
}

/// The first millisecond of `date` (`YYYY-MM-DD`) at `utc_offset_minutes` from UTC, and of the
/// day after.
fn day_bounds(date: &str, utc_offset_minutes: i32) -> Result<(u64, u64), LedgerError> {
    let refuse = |why: &str| LedgerError::Invalid(format!("date {date:?}: {why}"));
    if !(-720..=840).contains(&utc_offset_minutes) {
        return Err(LedgerError::Invalid(format!(
            "utc_offset_minutes {utc_offset_minutes} is not from -720 to 840"
        )));
    }
    let parts: Vec<&str> = date.split('-').collect();
    let [year, month, day] = parts[..] else {
        return Err(refuse("expected YYYY-MM-DD"));
    };
    if year.len() != 4 || month.len() != 2 || day.len() != 2 {
        return Err(refuse("expected YYYY-MM-DD"));
    }
    let number = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| refuse("expected YYYY-MM-DD in digits"))
    };
    let month = time::Month::try_from(number(month)? as u8).map_err(|e| refuse(&e.to_string()))?;
    let day = time::Date::from_calendar_date(i32::from(number(year)?), month, number(day)? as u8)
        .map_err(|e| refuse(&e.to_string()))?;
    let start_s = day.midnight().assume_utc().unix_timestamp() - i64::from(utc_offset_minutes) * 60;
    if start_s < 0 {
        return Err(refuse("before 1970"));
    }
    let start_ms = start_s as u64 * 1000;
    Ok((start_ms, start_ms + 86_400_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_runs_from_its_local_midnight_to_the_next() {
        assert_eq!(
            day_bounds("2026-12-06", 0).unwrap(),
            (1_796_515_200_000, 1_796_601_600_000)
        );
        // Paris in winter: the day starts an hour before UTC's.
        assert_eq!(
            day_bounds("2026-12-06", 60).unwrap().0,
            1_796_515_200_000 - 3_600_000
        );
        for bad in [
            "2026-13-01",
            "2026-02-30",
            "26-12-06",
            "2026-12-6",
            "today",
            "1969-12-31",
        ] {
            assert!(day_bounds(bad, 0).is_err(), "{bad}");
        }
        assert!(day_bounds("2026-12-06", 900).is_err());
    }
}
