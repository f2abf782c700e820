//! Offline allowances: what the cloud grants each store in advance, per account.
//!
//! An allowance bounds what one store may hold *unreconciled* for one account; the cloud keeps the
//! sum of an account's allowances over all stores at or below `account_cap_minor`, so the money an
//! account can spend offline across every partitioned store at once is bounded and known. A grant
//! is refreshed with each online approval at a store (never above the balance then), and revoked
//! at every hub when the account goes into debt or is closed.

use protocol::{AccountId, AccountKind, Allowance, OfflineReservation};
use serde::{Deserialize, Serialize};
use storage::kv::{Transactional, TransactionalTree};

use super::{decode, encode, unwrap_tx, AccountRecord, Ledger, TxResult};
use crate::error::LedgerError;

/// How much the cloud lets hubs approve offline: the `[offline]` section of its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OfflinePolicy {
    /// Most one store may hold unreconciled for one account (0: no offline payment).
    pub store_allowance_minor: i64,
    /// Most all stores together may hold unreconciled for one account.
    pub account_cap_minor: i64,
}

impl Default for OfflinePolicy {
    fn default() -> Self {
        OfflinePolicy {
            store_allowance_minor: 5_000,
            account_cap_minor: 10_000,
        }
    }
}

impl OfflinePolicy {
    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (key, value) in [
            ("offline.store_allowance_minor", self.store_allowance_minor),
            ("offline.account_cap_minor", self.account_cap_minor),
        ] {
            if !(0..=protocol::MAX_AMOUNT_MINOR).contains(&value) {
                return Err((
                    key.into(),
                    format!("must be from 0 to {}", protocol::MAX_AMOUNT_MINOR),
                ));
            }
        }
        if self.store_allowance_minor > self.account_cap_minor {
            return Err((
                "offline.store_allowance_minor".into(),
                "must not be above offline.account_cap_minor".into(),
            ));
        }
        Ok(())
    }
}

/// An account's allowance at one store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GrantRecord {
    /// What the store was last granted (0 once revoked).
    amount_minor: i64,
    /// Version of that grant or revocation.
    version: u64,
    /// What this store counts against the account cap: the most it may hold unreconciled under
    /// any grant it may still act on. Above `amount_minor` while the store may still hold more
    /// than its last grant (entries approved under a larger one, or a larger grant still on its
    /// way to it); lowered only when the store reports what it holds. (Absent in records written
    /// before it existed: [`GrantRecord::counted`] then counts the grant.)
    #[serde(default)]
    reserved_minor: i64,
    /// The grants issued to the store for the account, the newest last (at most
    /// [`GRANT_HISTORY`]), with what offline payments booked under each.
    #[serde(default)]
    issued: Vec<Issued>,
}

/// One grant as issued: a budget for offline payments approved under it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Issued {
    version: u64,
    amount_minor: i64,
    /// What reconciled offline payments approved under it booked.
    booked_minor: i64,
}

/// Most grants remembered per store and account. An offline payment cites the grant it was
/// approved under; a hub reports with each online payment the oldest grant its unreconciled
/// entries for the account cite, and older ones are forgotten (no entry can cite them). This cap
/// bounds the record for a hub that does not report: an entry citing a grant older than the last
/// 1024 is kept for the operator.
pub const GRANT_HISTORY: usize = 1024;

impl GrantRecord {
    /// A record as stored; one written before grants were kept as budgets holds its current
    /// grant only, and is read as a history of that one grant.
    fn read(bytes: &[u8]) -> Self {
        let mut record: GrantRecord = decode(bytes);
        if record.issued.is_empty() && record.amount_minor > 0 {
            record.issued.push(Issued {
                version: record.version,
                amount_minor: record.amount_minor,
                booked_minor: 0,
            });
        }
        record
    }

    /// What the store counts against the account cap.
    fn counted(&self) -> i64 {
        self.reserved_minor.max(self.amount_minor)
    }

    /// Makes `version` (of `amount_minor`) the store's grant.
    fn issue(&mut self, version: u64, amount_minor: i64) {
        self.amount_minor = amount_minor;
        self.version = version;
        // A revocation (or an empty grant) is no budget: nothing to remember, and repeated
        // revocations never push a store's grants out of the history.
        if amount_minor <= 0 {
            return;
        }
        self.issued.push(Issued {
            version,
            amount_minor,
            booked_minor: 0,
        });
        if self.issued.len() > GRANT_HISTORY {
            self.issued.remove(0);
        }
    }

    /// What offline payments booked under the current grant.
    fn booked(&self) -> i64 {
        self.issued
            .last()
            .filter(|g| g.version == self.version)
            .map_or(0, |g| g.booked_minor)
    }
}

/// Books a reconciled offline payment against the grant it was approved under (`version`), in
/// the ledger's transaction: `Err` (why) when the cloud issued no such grant to the store for
/// the account, or when the payment would take the grant's bookings beyond its amount. A store
/// thus never books more than it was granted, whatever its hub signs or reports.
pub(super) fn book_offline(
    grants: &TransactionalTree,
    (store_id, account_id): (&str, &str),
    version: u64,
    amount_minor: i64,
) -> TxResult<Result<(), String>> {
    let key = store_key(store_id, account_id);
    let Some(bytes) = grants.get(&key)? else {
        return Ok(Err(format!(
            "the cloud granted store {store_id} no offline allowance for {account_id}"
        )));
    };
    let mut record = GrantRecord::read(&bytes);
    let Some(grant) = record.issued.iter_mut().find(|g| g.version == version) else {
        return Ok(Err(format!(
            "approved under allowance version {version}, which the cloud did not grant store \
             {store_id} for {account_id} (or no longer remembers)"
        )));
    };
    let booked = grant.booked_minor.saturating_add(amount_minor);
    if booked > grant.amount_minor {
        return Ok(Err(format!(
            "beyond its allowance: {amount_minor} with {} already booked under version {version} \
             of {}",
            grant.booked_minor, grant.amount_minor
        )));
    }
    grant.booked_minor = booked;
    grants.insert(key, encode(&record))?;
    Ok(Ok(()))
}

/// Most allowances in one sync page.
pub const ALLOWANCE_PAGE: usize = 500;

pub(super) fn store_key(store_id: &str, account_id: &str) -> Vec<u8> {
    format!("{store_id}/{account_id}").into_bytes()
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// Refreshes the account's allowance at `store_id` after an online approval there: the most the
/// policy allows beside what the account's other stores reserve, never above its balance. `None`
/// when the account is not a customer in good standing.
///
/// The store keeps counting against the account cap what it may still hold: what it `reported`
/// (the larger of its unreconciled total and the grant it holds) and, unless it reported holding
/// the newest grant, everything it was granted since (a reply can be on its way to it). So the
/// sum over stores of what each may hold unreconciled never exceeds `account_cap_minor`, even
/// when a grant shrinks under entries a store has not reconciled yet.
pub(super) fn grant(
    policy: OfflinePolicy,
    accounts: &TransactionalTree,
    grants: &TransactionalTree,
    by_account: &TransactionalTree,
    store_id: &str,
    account_id: &str,
    reported: OfflineReservation,
) -> TxResult<Option<Allowance>> {
    let Some(bytes) = accounts.get(account_id.as_bytes())? else {
        return Ok(None);
    };
    let account: AccountRecord = decode(&bytes);
    if account.kind != AccountKind::Customer || account.closed || account.in_debt {
        return Ok(None);
    }
    // An account has grants at a handful of stores: the scan is short.
    let mut elsewhere = 0i64;
    for other in known_stores(by_account, account_id)? {
        if other != store_id {
            if let Some(g) = grants.get(store_key(&other, account_id))? {
                elsewhere += decode::<GrantRecord>(&g).counted();
            }
        }
    }
    let previous = grants
        .get(store_key(store_id, account_id))?
        .map(|g| GrantRecord::read(&g));
    let held = reported
        .amount_minor
        .clamp(0, policy.account_cap_minor.max(0));
    let still_reserved = match &previous {
        Some(p) if p.version != reported.allowance_version => p.counted().max(held),
        _ => held,
    };
    let amount = policy
        .store_allowance_minor
        .min(policy.account_cap_minor - elsewhere)
        .min(account.balance_minor)
        .max(0);
    let version = grants.generate_id()? + 1;
    let mut record = GrantRecord {
        amount_minor: amount,
        version,
        reserved_minor: amount.max(still_reserved),
        issued: previous.map(|p| p.issued).unwrap_or_default(),
    };
    if reported.oldest_version > 0 {
        record
            .issued
            .retain(|g| g.version >= reported.oldest_version);
    }
    record.issue(version, amount);
    grants.insert(store_key(store_id, account_id), encode(&record))?;
    remember_store(by_account, account_id, store_id)?;
    Ok(Some(Allowance {
        account_id: account_id.into(),
        amount_minor: amount,
        currency: account.currency,
        blocked: false,
        version,
        booked_minor: 0,
    }))
}

/// The stores holding a grant for an account. sled's transactional trees cannot scan, so the
/// list lives under one key per account in `by_account` (`<account>/` -> stores).
fn known_stores(by_account: &TransactionalTree, account_id: &str) -> TxResult<Vec<String>> {
    let list_key = format!("{account_id}/");
    Ok(by_account
        .get(list_key.as_bytes())?
        .map(|b| decode::<Vec<String>>(&b))
        .unwrap_or_default())
}

fn remember_store(
    by_account: &TransactionalTree,
    account_id: &str,
    store_id: &str,
) -> TxResult<()> {
    let list_key = format!("{account_id}/");
    let mut stores = known_stores(by_account, account_id)?;
    if !stores.iter().any(|s| s == store_id) {
        stores.push(store_id.to_owned());
        by_account.insert(list_key.as_bytes(), encode(&stores))?;
    }
    Ok(())
}

/// Revokes every grant of an account and returns the revocation to broadcast. An account in debt
/// may earn grants again once settled: its stores keep counting what they reserved until they
/// report what they hold (a partitioned hub does not hear the revocation until it reconnects). A
/// closed account never will (`forget`): its stores stop counting against its cap, and no store
/// is granted anything for it again.
pub(super) fn revoke_all(
    accounts_currency: protocol::Currency,
    grants: &TransactionalTree,
    by_account: &TransactionalTree,
    account_id: &str,
    forget: bool,
) -> TxResult<Allowance> {
    let version = grants.generate_id()? + 1;
    for store in known_stores(by_account, account_id)? {
        let key = store_key(&store, account_id);
        if let Some(g) = grants.get(&key)? {
            let mut record = GrantRecord::read(&g);
            // A closed account's stores count nothing against a cap it will never use again;
            // the grants they were issued stay, for the offline payments approved under them.
            record.reserved_minor = if forget { 0 } else { record.counted() };
            record.issue(version, 0);
            grants.insert(key, encode(&record))?;
        }
    }
    if forget {
        by_account.remove(format!("{account_id}/").as_bytes())?;
    }
    Ok(Allowance {
        account_id: account_id.into(),
        amount_minor: 0,
        currency: accounts_currency,
        blocked: true,
        version,
        booked_minor: 0,
    })
}

impl Ledger {
    /// One page of a store's allowances, by account id after `after_account`.
    pub fn allowances(
        &self,
        store_id: &str,
        after_account: Option<&str>,
    ) -> Result<(Vec<Allowance>, Option<AccountId>), LedgerError> {
        let prefix = format!("{store_id}/");
        let start = match after_account {
            Some(after) => {
                let mut k = store_key(store_id, after);
                k.push(0);
                k
            }
            None => prefix.clone().into_bytes(),
        };
        let mut page = Vec::new();
        for item in self.grants.range(start..) {
            let (key, value) = item.map_err(storage)?;
            let Some(account_id) = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
            else {
                break;
            };
            if page.len() == ALLOWANCE_PAGE {
                let last = page.last().map(|a: &Allowance| a.account_id.clone());
                return Ok((page, last));
            }
            let grant: GrantRecord = decode(&value);
            // A closed account is listed nowhere: hubs forget its allowance on their next sync.
            let Some(account) = self.account(account_id)?.filter(|a| !a.closed) else {
                continue;
            };
            page.push(Allowance {
                account_id: account_id.into(),
                amount_minor: grant.amount_minor,
                currency: account.currency,
                blocked: account.in_debt || account.closed,
                version: grant.version,
                booked_minor: grant.booked(),
            });
        }
        Ok((page, None))
    }

    /// Revokes an account's allowances everywhere (it was closed); the revocation to broadcast.
    pub fn revoke_allowances(&self, account_id: &str) -> Result<Option<Allowance>, LedgerError> {
        let Some(account) = self.account(account_id)? else {
            return Ok(None);
        };
        let revoked = unwrap_tx((&self.grants, &self.grants_by_account).transaction(
            |(grants, by_account)| {
                revoke_all(account.currency, grants, by_account, account_id, true)
            },
        ))?;
        self.flush()?;
        Ok(Some(revoked))
    }
}

#[cfg(test)]
impl Ledger {
    /// The version of the store's grant for the account, granted now (as an online approval
    /// there would) when it holds none: for tests that reconcile offline entries.
    pub(crate) fn current_grant(&self, store_id: &str, account_id: &str) -> u64 {
        if let Some(held) = self.grants.get(store_key(store_id, account_id)).unwrap() {
            return decode::<GrantRecord>(&held).version;
        }
        let policy = self.policy;
        let granted = unwrap_tx(
            (&self.accounts, &self.grants, &self.grants_by_account).transaction(
                |(accounts, grants, by_account)| {
                    grant(
                        policy,
                        accounts,
                        grants,
                        by_account,
                        store_id,
                        account_id,
                        OfflineReservation::default(),
                    )
                },
            ),
        )
        .unwrap();
        granted.map_or(0, |g| g.version)
    }
}
