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
}

impl GrantRecord {
    /// What the store counts against the account cap.
    fn counted(&self) -> i64 {
        self.reserved_minor.max(self.amount_minor)
    }
}

/// Most allowances in one sync page.
pub const ALLOWANCE_PAGE: usize = 500;

fn store_key(store_id: &str, account_id: &str) -> Vec<u8> {
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
        .map(|g| decode::<GrantRecord>(&g));
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
    let record = GrantRecord {
        amount_minor: amount,
        version,
        reserved_minor: amount.max(still_reserved),
    };
    grants.insert(store_key(store_id, account_id), encode(&record))?;
    remember_store(by_account, account_id, store_id)?;
    Ok(Some(Allowance {
        account_id: account_id.into(),
        amount_minor: amount,
        currency: account.currency,
        blocked: false,
        version,
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
/// closed account never will (`forget`): its grants are removed.
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
        if forget {
            grants.remove(key)?;
        } else if let Some(g) = grants.get(&key)? {
            let mut record: GrantRecord = decode(&g);
            record.reserved_minor = record.counted();
            record.amount_minor = 0;
            record.version = version;
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
            let Some(account) = self.account(account_id)? else {
                continue;
            };
            page.push(Allowance {
                account_id: account_id.into(),
                amount_minor: grant.amount_minor,
                currency: account.currency,
                blocked: account.in_debt || account.closed,
                version: grant.version,
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
