//! Accounts: opening (funded from the issuance account), closing (erasure), and the versioned
//! log of account keys the hubs replicate.

use super::*;

/// The prefixes of the ledger's own transfer ids (`open:<account>`, `deposit:<id>`); the other
/// internal ids end in `#<kind>`, a character no payment id has.
const INTERNAL_TRANSFER_PREFIXES: [&str; 2] = ["open", "deposit"];

impl Ledger {
    /// Opens an account and funds it from the issuance account of its currency. Opening the same
    /// account again with the same fields is a no-op; with other fields it is refused. Returns the
    /// key change to distribute, for customers.
    pub fn open_account(&self, request: &OpenAccount) -> Result<Option<KeyEntry>, LedgerError> {
        protocol::validate_id("account_id", &request.account_id)
            .map_err(|e| LedgerError::Invalid(e.to_string()))?;
        if request.account_id.starts_with("issuance.") {
            return Err(LedgerError::Invalid(
                "account ids starting with issuance. are reserved".into(),
            ));
        }
        if request.initial_balance_minor < 0
            || request.initial_balance_minor > protocol::MAX_AMOUNT_MINOR
        {
            return Err(LedgerError::Invalid(format!(
                "initial_balance_minor must be from 0 to {}",
                protocol::MAX_AMOUNT_MINOR
            )));
        }
        match (&request.kind, &request.public_key) {
            // Customers who pay by face only have no wallet key.
            (AccountKind::Customer, None) => {}
            (AccountKind::Customer, Some(key)) => {
                paycode::parse_public_key(key).map_err(|e| LedgerError::Invalid(e.to_string()))?;
            }
            (AccountKind::Merchant, Some(_)) => {
                return Err(LedgerError::Invalid(
                    "a merchant account takes no public_key".into(),
                ))
            }
            // A store's payments are `<store>:<order>`: a store named after an internal transfer
            // prefix would name the ledger's own transfers (`open:<account>`, `deposit:<id>`).
            (AccountKind::Merchant, None)
                if INTERNAL_TRANSFER_PREFIXES.contains(&request.account_id.as_str()) =>
            {
                return Err(LedgerError::Invalid(format!(
                    "{:?} is reserved for the ledger's own transfers; name the store otherwise",
                    request.account_id
                )))
            }
            (AccountKind::Merchant, None) => {}
            (AccountKind::Issuance, _) => {
                return Err(LedgerError::Invalid(
                    "issuance accounts are opened by the ledger".into(),
                ))
            }
        }
        let issuance = issuance_account(request.currency);
        let transfer_id = format!("open:{}", request.account_id);
        let now_ms = self.clock.now_ms();
        let created = unwrap_tx((&self.accounts, &self.transfers, &self.keys).transaction(
            |(accounts, transfers, keys)| -> TxResult<Option<KeyEntry>> {
                if let Some(existing) = accounts.get(request.account_id.as_bytes())? {
                    let existing: AccountRecord = decode(&existing);
                    let opened: Option<TransferRecord> =
                        transfers.get(transfer_id.as_bytes())?.map(|b| decode(&b));
                    let same = existing.kind == request.kind
                        && existing.currency == request.currency
                        && existing.public_key == request.public_key
                        && opened.map(|t| t.amount_minor).unwrap_or(0)
                            == request.initial_balance_minor;
                    return if same {
                        Ok(None)
                    } else {
                        abort(LedgerError::Conflict(format!(
                            "account {} already exists with other fields",
                            request.account_id
                        )))
                    };
                }
                let mut issuer = match accounts.get(issuance.as_bytes())? {
                    Some(b) => decode::<AccountRecord>(&b),
                    None => AccountRecord {
                        kind: AccountKind::Issuance,
                        currency: request.currency,
                        balance_minor: 0,
                        public_key: None,
                        closed: false,
                        in_debt: false,
                    },
                };
                let mut account = AccountRecord {
                    kind: request.kind,
                    currency: request.currency,
                    balance_minor: 0,
                    public_key: request.public_key.clone(),
                    closed: false,
                    in_debt: false,
                };
                apply_transfer(
                    accounts,
                    (&issuance, &mut issuer),
                    (&request.account_id, &mut account),
                    request.initial_balance_minor,
                )?;
                if request.initial_balance_minor > 0 {
                    let transfer = TransferRecord::issuance(
                        &issuance,
                        &request.account_id,
                        request.initial_balance_minor,
                        request.currency,
                        now_ms,
                    );
                    transfers.insert(transfer_id.as_bytes(), encode(&transfer))?;
                }
                let Some(public_key) = &request.public_key else {
                    return Ok(None);
                };
                let version = keys.generate_id()? + 1;
                let entry = KeyEntry {
                    account_id: request.account_id.clone(),
                    version,
                    public_key: Some(public_key.clone()),
                };
                keys.insert(&version.to_be_bytes(), encode(&entry))?;
                Ok(Some(entry))
            },
        ))?;
        self.flush()?;
        Ok(created)
    }

    /// Closes a customer account (the customer was erased): it takes no more payments, and its
    /// wallet key, if any, is revoked at every hub. Returns the key revocation to distribute.
    /// Closing a closed or unknown account changes nothing.
    pub fn close_account(&self, account_id: &str) -> Result<Option<KeyEntry>, LedgerError> {
        let revoked = unwrap_tx((&self.accounts, &self.keys).transaction(
            |(accounts, keys)| -> TxResult<Option<KeyEntry>> {
                let Some(bytes) = accounts.get(account_id.as_bytes())? else {
                    return Ok(None);
                };
                let mut account: AccountRecord = decode(&bytes);
                if account.kind != AccountKind::Customer || account.closed {
                    return Ok(None);
                }
                account.closed = true;
                let had_key = account.public_key.take().is_some();
                accounts.insert(account_id.as_bytes(), encode(&account))?;
                if !had_key {
                    return Ok(None);
                }
                let version = keys.generate_id()? + 1;
                let entry = KeyEntry {
                    account_id: account_id.into(),
                    version,
                    public_key: None,
                };
                keys.insert(&version.to_be_bytes(), encode(&entry))?;
                Ok(Some(entry))
            },
        ))?;
        self.flush()?;
        Ok(revoked)
    }

    /// Key changes with a version above `after_version`, oldest first, at most [`KEY_BATCH_MAX`];
    /// the flag says whether more follow.
    pub fn keys_after(&self, after_version: u64) -> Result<(Vec<KeyEntry>, bool), LedgerError> {
        let start = after_version.saturating_add(1).to_be_bytes();
        let mut entries = Vec::new();
        for item in self.keys.range(start..) {
            let (_, value) = item.map_err(|e| LedgerError::Storage(e.to_string()))?;
            if entries.len() == KEY_BATCH_MAX {
                return Ok((entries, true));
            }
            entries.push(decode(&value));
        }
        Ok((entries, false))
    }
}
