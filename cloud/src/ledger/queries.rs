//! Read-only views of the ledger: accounts, transfers, per-currency totals.

use super::*;

impl Ledger {
    /// One account.
    pub fn account(&self, account_id: &str) -> Result<Option<AccountView>, LedgerError> {
        let record = self
            .accounts
            .get(account_id.as_bytes())
            .map_err(|e| LedgerError::Storage(e.to_string()))?;
        Ok(record.map(|b| view(account_id, decode(&b))))
    }

    /// Every account, issuance accounts included, ordered by id.
    pub fn accounts(&self) -> Result<Vec<AccountView>, LedgerError> {
        self.accounts
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| LedgerError::Storage(e.to_string()))?;
                Ok(view(
                    std::str::from_utf8(&k).expect("ids are UTF-8"),
                    decode(&v),
                ))
            })
            .collect()
    }

    /// Every transfer, ordered by id.
    pub fn transfers(&self) -> Result<Vec<TransferView>, LedgerError> {
        self.transfers
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| LedgerError::Storage(e.to_string()))?;
                let t: TransferRecord = decode(&v);
                let pending = !t.posted && !t.offline && !t.voided;
                Ok(TransferView {
                    transfer_id: String::from_utf8(k.to_vec()).expect("ids are UTF-8"),
                    debit_account_id: t.debit_account_id,
                    credit_account_id: t.credit_account_id,
                    amount_minor: t.amount_minor,
                    currency: t.currency,
                    applied_at_ms: t.applied_at_ms,
                    pending,
                })
            })
            .collect()
    }

    /// What every account of each currency adds up to, read at once (one snapshot of the
    /// accounts on PostgreSQL; on sled this instance's ledger thread, its only writer, reads
    /// between its writes). Double entry keeps each sum at 0: anything else is a broken ledger.
    pub fn balance_sums(
        &self,
    ) -> Result<std::collections::HashMap<protocol::Currency, i64>, LedgerError> {
        let mut sums = std::collections::HashMap::new();
        for account in self.accounts()? {
            *sums.entry(account.currency).or_default() += account.balance_minor;
        }
        Ok(sums)
    }

    /// Totals per currency. Balances are recomputed from the transfers and checked against the
    /// stored balances: a difference is a broken invariant, answered [`LedgerError::Broken`]
    /// rather than wrong books. The accounts and the transfers are two reads: on PostgreSQL
    /// another instance's payment may land between them, so a difference is read again (up to
    /// three times) before it is called broken.
    pub fn totals(&self) -> Result<Vec<LedgerTotals>, LedgerError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.totals_once() {
                Err(LedgerError::Broken(detail)) if tries < 3 => {
                    tracing::warn!(detail, "the books disagreed; read again");
                }
                Err(LedgerError::Broken(detail)) => {
                    tracing::error!(detail, "the books are broken");
                    return Err(LedgerError::Broken(detail));
                }
                answer => return answer,
            }
        }
    }

    fn totals_once(&self) -> Result<Vec<LedgerTotals>, LedgerError> {
        use std::collections::BTreeMap;
        let accounts = self.accounts()?;
        let mut from_transfers: BTreeMap<protocol::AccountId, i64> = BTreeMap::new();
        let mut totals: BTreeMap<String, LedgerTotals> = BTreeMap::new();
        for t in self.transfers()? {
            *from_transfers
                .entry(t.debit_account_id.clone())
                .or_default() -= t.amount_minor;
            *from_transfers
                .entry(t.credit_account_id.clone())
                .or_default() += t.amount_minor;
            let entry = totals
                .entry(t.currency.to_string())
                .or_insert_with(|| empty_totals(t.currency));
            entry.total_debits_minor += t.amount_minor;
            entry.total_credits_minor += t.amount_minor;
            entry.transfers += 1;
        }
        for a in &accounts {
            let derived = from_transfers.get(&a.account_id).copied().unwrap_or(0);
            if derived != a.balance_minor {
                return Err(LedgerError::Broken(format!(
                    "the stored balance of {} is {}, its transfers make {derived}",
                    a.account_id, a.balance_minor
                )));
            }
            let entry = totals
                .entry(a.currency.to_string())
                .or_insert_with(|| empty_totals(a.currency));
            entry.sum_of_balances_minor += a.balance_minor;
            if a.kind == AccountKind::Issuance {
                entry.issued_minor -= a.balance_minor;
            }
        }
        Ok(totals.into_values().collect())
    }
}
