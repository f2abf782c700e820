//! The offline book: the rules a hub applies alone while the cloud is unreachable, and what it
//! holds unreconciled (plain data, owned by the `OfflineActor`).
//!
//! A payment is approved offline only if every rule passes, checked in this order, and the
//! decline names the rule that refused:
//! 1. offline payment is enabled and the amount is at most `payment_ceiling_minor`
//!    (`offline_amount_over_limit`);
//! 2. the account is not blocked by the cloud (in debt, closed: `account_blocked`);
//! 3. the cloud granted the account an allowance at this store, in the payment's currency, and what
//!    the store holds unreconciled for it plus this amount stays within it, and so does what
//!    approvals under that grant booked (reconciled or not: the cloud books each against the
//!    grant it cites and keeps what goes beyond for an operator) (`offline_allowance_exceeded`);
//! 4. the store's unreconciled total plus this amount stays within `store_ceiling_minor`
//!    (`offline_store_limit_reached`).
//!
//! Only accounts the hub already knows can get this far: a code needs the account's key, a token
//! a face matched in the hot set.

use std::collections::HashMap;

use protocol::{
    AccountId, Allowance, Currency, Decision, DeclineReason, OfflinePayment, OfflineReservation,
};

use crate::config::OfflineConfig;

/// What the store holds unreconciled, and the allowances it may spend. Owned by the offline
/// actor, rebuilt from the journal at start.
#[derive(Debug, Default)]
pub struct OfflineBook {
    enabled: bool,
    payment_ceiling_minor: i64,
    store_ceiling_minor: i64,
    allowances: HashMap<AccountId, Allowance>,
    outstanding: HashMap<String, i64>,
    /// The allowance versions unreconciled entries were approved under, per account, counted.
    pending_versions: HashMap<String, std::collections::BTreeMap<u64, usize>>,
    store_total: i64,
    entries: usize,
}

impl OfflineBook {
    /// A book under `config`'s bounds, with the allowances and unreconciled entries the journal
    /// holds.
    pub fn new(
        config: &OfflineConfig,
        allowances: Vec<Allowance>,
        pending: &[OfflinePayment],
    ) -> Self {
        let mut book = OfflineBook {
            enabled: config.enabled,
            payment_ceiling_minor: config.payment_ceiling_minor,
            store_ceiling_minor: config.store_ceiling_minor,
            ..OfflineBook::default()
        };
        for allowance in allowances {
            book.allowances
                .insert(allowance.account_id.clone(), allowance);
        }
        for entry in pending {
            book.hold(
                &entry.account_id,
                entry.allowance_version,
                entry.amount_minor,
            );
        }
        book
    }

    /// Checks every rule for a payment; `Ok` means it may be approved offline.
    pub fn check(
        &self,
        account_id: &str,
        amount_minor: i64,
        currency: Currency,
    ) -> Result<(), Decision> {
        if !self.enabled {
            return Err(Decision::declined(
                DeclineReason::CloudUnreachable,
                "the cloud is unreachable and this store does not approve payments offline",
            ));
        }
        if amount_minor > self.payment_ceiling_minor {
            return Err(Decision::declined(
                DeclineReason::OfflineAmountOverLimit,
                format!(
                    "the cloud is unreachable; offline, payments up to {} are approved",
                    currency.format(self.payment_ceiling_minor)
                ),
            ));
        }
        let Some(allowance) = self.allowances.get(account_id) else {
            return Err(Decision::declined(
                DeclineReason::OfflineAllowanceExceeded,
                format!("the cloud is unreachable and account {account_id} has no offline allowance at this store"),
            ));
        };
        if allowance.blocked {
            return Err(Decision::declined(
                DeclineReason::AccountBlocked,
                format!("account {account_id} is blocked until its debt is settled"),
            ));
        }
        let held = self.outstanding(account_id);
        if allowance.currency != currency
            || held + amount_minor > allowance.amount_minor
            || allowance.booked_minor.saturating_add(amount_minor) > allowance.amount_minor
        {
            return Err(Decision::declined(
                DeclineReason::OfflineAllowanceExceeded,
                format!(
                    "the cloud is unreachable; account {account_id} may spend {} offline here and {} is pending",
                    allowance.currency.format(allowance.amount_minor),
                    allowance.currency.format(held)
                ),
            ));
        }
        if self.store_total + amount_minor > self.store_ceiling_minor {
            return Err(Decision::declined(
                DeclineReason::OfflineStoreLimitReached,
                "the cloud is unreachable and this store has reached its offline limit",
            ));
        }
        Ok(())
    }

    /// The version of the account's allowance, which an offline approval cites (0: none).
    pub fn grant_version(&self, account_id: &str) -> u64 {
        self.allowances.get(account_id).map_or(0, |a| a.version)
    }

    /// Counts an approval just made: held until the cloud acknowledges it, and booked against
    /// the allowance it cites.
    pub fn approved(&mut self, entry: &OfflinePayment) {
        let (account, version) = (entry.account_id.as_str(), entry.allowance_version);
        self.hold(account, version, entry.amount_minor);
        self.spend(account, version, entry.amount_minor);
    }

    /// Books an approval against the allowance it was approved under (`version`): a grant is a
    /// budget, spent by approvals whether reconciled or not, until the cloud grants anew.
    fn spend(&mut self, account_id: &str, version: u64, amount_minor: i64) {
        if let Some(allowance) = self
            .allowances
            .get_mut(account_id)
            .filter(|a| a.version == version)
        {
            allowance.booked_minor = allowance.booked_minor.saturating_add(amount_minor);
        }
    }

    /// Counts an approved payment (approved under allowance `version`) as held until the cloud
    /// acknowledges it.
    fn hold(&mut self, account_id: &str, version: u64, amount_minor: i64) {
        *self
            .pending_versions
            .entry(account_id.to_owned())
            .or_default()
            .entry(version)
            .or_default() += 1;
        *self.outstanding.entry(account_id.to_owned()).or_default() += amount_minor;
        self.store_total += amount_minor;
        self.entries += 1;
    }

    /// Releases a payment the cloud acknowledged (or one that was never journaled).
    pub fn release(&mut self, account_id: &str, version: u64, amount_minor: i64) {
        if let Some(versions) = self.pending_versions.get_mut(account_id) {
            if let Some(n) = versions.get_mut(&version) {
                *n -= 1;
                if *n == 0 {
                    versions.remove(&version);
                }
            }
            if versions.is_empty() {
                self.pending_versions.remove(account_id);
            }
        }
        if let Some(held) = self.outstanding.get_mut(account_id) {
            *held -= amount_minor;
            if *held <= 0 {
                self.outstanding.remove(account_id);
            }
        }
        self.store_total -= amount_minor;
        self.entries = self.entries.saturating_sub(1);
    }

    /// Takes a newer grant or revocation; older versions are ignored, and the same version only
    /// raises what is booked under it (the cloud's count after a restart or a lost disk).
    pub fn set_allowance(&mut self, allowance: Allowance) {
        match self.allowances.get_mut(&allowance.account_id) {
            Some(held) if held.version == allowance.version => {
                held.booked_minor = held.booked_minor.max(allowance.booked_minor);
            }
            Some(held) if held.version > allowance.version => {}
            _ => {
                self.allowances
                    .insert(allowance.account_id.clone(), allowance);
            }
        }
    }

    /// Forgets the allowances of accounts the cloud no longer lists for this store.
    pub fn keep_only(&mut self, listed: &std::collections::HashSet<AccountId>) {
        self.allowances
            .retain(|account, _| listed.contains(account));
    }

    /// What the store may still hold unreconciled for an account under the allowance it holds,
    /// reported to the cloud with each online payment so that a refreshed grant keeps it counted.
    pub fn reservation(&self, account_id: &str) -> OfflineReservation {
        let allowance = self.allowances.get(account_id);
        let granted = allowance
            .filter(|a| !a.blocked)
            .map_or(0, |a| a.amount_minor);
        let version = allowance.map_or(0, |a| a.version);
        let oldest_pending = self
            .pending_versions
            .get(account_id)
            .and_then(|v| v.keys().next().copied());
        OfflineReservation {
            amount_minor: self.outstanding(account_id).max(granted),
            allowance_version: version,
            oldest_version: oldest_pending.map_or(version, |oldest| oldest.min(version)),
        }
    }

    /// What the store holds unreconciled for an account.
    pub fn outstanding(&self, account_id: &str) -> i64 {
        self.outstanding.get(account_id).copied().unwrap_or(0)
    }

    /// What the store holds unreconciled in all.
    pub fn store_total(&self) -> i64 {
        self.store_total
    }

    /// Unreconciled entries.
    pub fn entries(&self) -> usize {
        self.entries
    }
}

/// What the cloud made of a reconciliation batch, sorted for the journal: entries applied (now or
/// before) are retired, conflicts are kept for an operator, refused entries stay in the backlog.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SortedResults {
    /// Sequence numbers to retire.
    pub settled: Vec<u64>,
    /// Sequence numbers to keep for an operator, with what conflicts.
    pub conflicts: Vec<(u64, String)>,
    /// Entries refused (they stay in the backlog and stop the drain).
    pub refused: usize,
}

/// Sorts a batch's results ([`SortedResults`]).
pub fn sort_results(results: &[protocol::ReconcileResult]) -> SortedResults {
    let mut sorted = SortedResults::default();
    for result in results {
        match &result.outcome {
            protocol::ReconcileOutcome::Applied { .. }
            | protocol::ReconcileOutcome::AlreadyApplied => sorted.settled.push(result.seq),
            protocol::ReconcileOutcome::Conflict { detail } => {
                sorted.conflicts.push((result.seq, detail.clone()))
            }
            protocol::ReconcileOutcome::Rejected { .. } => sorted.refused += 1,
        }
    }
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        Currency::parse("EUR").unwrap()
    }

    fn grant(account: &str, amount: i64, version: u64) -> Allowance {
        Allowance {
            account_id: account.into(),
            amount_minor: amount,
            currency: eur(),
            blocked: false,
            version,
            booked_minor: 0,
        }
    }

    fn book() -> OfflineBook {
        let config = OfflineConfig {
            payment_ceiling_minor: 2_000,
            store_ceiling_minor: 4_000,
            ..OfflineConfig::default()
        };
        OfflineBook::new(
            &config,
            vec![grant("a", 3_000, 1), grant("b", 3_000, 1)],
            &[],
        )
    }

    fn reason(r: Result<(), Decision>) -> Option<DeclineReason> {
        r.err().and_then(|d| d.reason())
    }

    #[test]
    fn a_grant_is_a_budget_that_reconciliation_does_not_refill() {
        let mut b = book();
        assert_eq!(b.grant_version("a"), 1);
        let mut entry = OfflinePayment {
            seq: 1,
            payment_id: "s:o1".into(),
            store_id: "s".into(),
            terminal_id: "t".into(),
            order_id: "o1".into(),
            account_id: "a".into(),
            nonce: "n1".into(),
            amount_minor: 2_000,
            currency: eur(),
            approved_at_ms: 0,
            allowance_version: 1,
            spent_code: None,
            signature: String::new(),
        };
        b.approved(&entry);
        assert_eq!(b.outstanding("a"), 2_000);
        // Reconciled: nothing held, but the grant has booked 2000 of its 3000.
        b.release("a", 1, 2_000);
        assert_eq!(
            reason(b.check("a", 1_500, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        assert!(b.check("a", 1_000, eur()).is_ok());
        // The cloud's count of the same grant only ever raises it; a new grant is a new budget.
        b.set_allowance(Allowance {
            booked_minor: 2_500,
            ..grant("a", 3_000, 1)
        });
        assert_eq!(
            reason(b.check("a", 1_000, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        b.set_allowance(Allowance {
            booked_minor: 100,
            ..grant("a", 3_000, 1)
        });
        assert!(b.check("a", 500, eur()).is_ok());
        assert_eq!(
            reason(b.check("a", 501, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        b.set_allowance(grant("a", 3_000, 2));
        assert_eq!(b.grant_version("a"), 2);
        assert!(b.check("a", 2_000, eur()).is_ok());
        // Spending under an older version (an entry approved under it) leaves the new budget
        // alone; the cloud hears the oldest grant an unreconciled entry cites, or the one held.
        assert_eq!(b.reservation("a").oldest_version, 2);
        entry.amount_minor = 400;
        b.approved(&entry);
        assert_eq!(
            (
                b.reservation("a").allowance_version,
                b.reservation("a").oldest_version
            ),
            (2, 1)
        );
        b.release("a", 1, 400);
        assert_eq!(b.reservation("a").oldest_version, 2);
        entry.allowance_version = 2;
        entry.amount_minor = 2_000;
        b.approved(&entry);
        b.release("a", 2, 2_000);
        // The new grant booked 2000 of its 3000, nothing of the 400 under the old one.
        assert!(b.check("a", 1_000, eur()).is_ok());
        assert_eq!(
            reason(b.check("a", 1_001, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
    }

    #[test]
    fn each_rule_refuses_with_its_own_reason() {
        let mut b = book();
        assert_eq!(
            reason(b.check("a", 2_001, eur())),
            Some(DeclineReason::OfflineAmountOverLimit)
        );
        assert_eq!(
            reason(b.check("stranger", 100, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        assert_eq!(
            reason(b.check("a", 100, Currency::parse("USD").unwrap())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        assert!(b.check("a", 2_000, eur()).is_ok());
        b.hold("a", 1, 2_000);
        // 2000 held + 1500 > 3000 allowance.
        assert_eq!(
            reason(b.check("a", 1_500, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        assert!(b.check("a", 1_000, eur()).is_ok());
        b.hold("b", 1, 1_500);
        // Store: 3500 held + 1000 > 4000.
        assert_eq!(
            reason(b.check("b", 1_000, eur())),
            Some(DeclineReason::OfflineStoreLimitReached)
        );
        assert_eq!(b.store_total(), 3_500);
        b.release("a", 1, 2_000);
        assert_eq!(b.outstanding("a"), 0);
        assert!(b.check("b", 1_000, eur()).is_ok());
        b.set_allowance(Allowance {
            blocked: true,
            amount_minor: 0,
            ..grant("b", 0, 2)
        });
        assert_eq!(
            reason(b.check("b", 10, eur())),
            Some(DeclineReason::AccountBlocked)
        );
        // An older grant arriving late does not unblock.
        b.set_allowance(grant("b", 3_000, 1));
        assert_eq!(
            reason(b.check("b", 10, eur())),
            Some(DeclineReason::AccountBlocked)
        );
        b.set_allowance(grant("b", 3_000, 3));
        assert!(b.check("b", 10, eur()).is_ok());
    }

    #[test]
    fn the_reservation_reported_is_the_larger_of_held_and_granted() {
        let mut b = book();
        let none = b.reservation("stranger");
        assert_eq!((none.amount_minor, none.allowance_version), (0, 0));
        assert_eq!(b.reservation("a").amount_minor, 3_000);
        b.hold("a", 1, 2_000);
        // A smaller grant arrives while 2000 is held: the store may still hold 2000.
        b.set_allowance(grant("a", 1_000, 2));
        let r = b.reservation("a");
        assert_eq!((r.amount_minor, r.allowance_version), (2_000, 2));
        b.release("a", 1, 2_000);
        assert_eq!(b.reservation("a").amount_minor, 1_000);
        // Blocked: only what is held counts.
        b.hold("a", 1, 500);
        b.set_allowance(Allowance {
            blocked: true,
            amount_minor: 0,
            ..grant("a", 0, 3)
        });
        let r = b.reservation("a");
        assert_eq!((r.amount_minor, r.allowance_version), (500, 3));
    }

    #[test]
    fn a_restarted_hub_counts_what_its_journal_still_holds() {
        let entry = |seq, account: &str, amount| OfflinePayment {
            seq,
            payment_id: format!("s:{seq}").into(),
            store_id: "s".into(),
            terminal_id: "t".into(),
            order_id: format!("{seq}").into(),
            account_id: account.into(),
            nonce: format!("n{seq}").into(),
            amount_minor: amount,
            currency: eur(),
            approved_at_ms: 0,
            allowance_version: 0,
            spent_code: None,
            signature: String::new(),
        };
        let config = OfflineConfig::default();
        let b = OfflineBook::new(
            &config,
            vec![grant("a", 3_000, 1)],
            &[entry(1, "a", 1_000), entry(2, "a", 1_500)],
        );
        assert_eq!(b.outstanding("a"), 2_500);
        assert_eq!(b.entries(), 2);
        assert_eq!(
            reason(b.check("a", 600, eur())),
            Some(DeclineReason::OfflineAllowanceExceeded)
        );
        let off = OfflineBook::new(
            &OfflineConfig {
                enabled: false,
                ..config
            },
            vec![grant("a", 3_000, 1)],
            &[],
        );
        assert_eq!(
            reason(off.check("a", 1, eur())),
            Some(DeclineReason::CloudUnreachable)
        );
    }
}
