//! The store of record of enrolled customers: profile, second-factor hashes and face templates,
//! sealed at rest ([`storage::Sealer`]), plus the versioned change log hubs sync their hot sets
//! from.
//!
//! Trees of the `customers` sled database:
//! - `customers`: customer id -> sealed [`CustomerRecord`] (JSON);
//! - `templates`: template id (u64 BE) -> customer id, to resolve FAISS hits;
//! - `changes`: version (u64 BE) -> [`ChangeRef`]: the latest change of each customer, so a sync
//!   reads each customer at most once. An erased customer leaves only a revocation here: its
//!   account id, no personal data;
//! - `lockouts`: customer id -> [`protocol::Lockout`] (JSON): wrong second factors counted across
//!   the fleet (removed with the customer).

use std::path::Path;

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use protocol::{
    CreateCustomer, CustomerView, HotEntry, SecondFactorKind, TemplateBatch, TemplateChange,
    TemplateUpdate,
};
use serde::{Deserialize, Serialize};
use storage::{
    kv::{ConflictableTransactionError, TransactionError, Transactional, TransactionalTree},
    Sealer,
};

/// Most changes in one template batch (a batch of full entries stays well under 1 MB).
pub const TEMPLATE_BATCH_MAX: usize = 64;
/// Most face templates per customer.
pub const MAX_FACES_PER_CUSTOMER: usize = 10;

/// What went wrong with a customer.
#[derive(Debug, thiserror::Error)]
pub enum CustomerError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such customer.
    #[error("no customer {0}")]
    NotFound(String),
    /// Already exists, or a probable duplicate.
    #[error("{0}")]
    Conflict(String),
    /// The database failed, or a record could not be opened.
    #[error("customer store: {0}")]
    Storage(String),
}

fn storage<E: std::fmt::Display>(e: E) -> CustomerError {
    CustomerError::Storage(e.to_string())
}

/// A customer as stored (sealed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    /// Name.
    pub name: String,
    /// Phone number as given.
    pub phone: String,
    /// Argon2id PHC string of the PIN.
    pub pin_hash: String,
    /// The second factor asked.
    pub second_factor: SecondFactorKind,
    /// Argon2id PHC string of the second factor (the PIN, or the phone's last four digits).
    pub second_factor_hash: String,
    /// Home store.
    pub home_store_id: protocol::StoreId,
    /// Templates: id and embedding.
    pub templates: Vec<(u64, Vec<f32>)>,
    /// Version of the latest change.
    pub version: u64,
}

/// A phone number as a view shows it: its first two digits (the country, to tell numbers apart)
/// and a star for each other digit. Never its last four: they are a second factor.
fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(char::is_ascii_digit).collect();
    let shown = if digits.len() > 6 { 2 } else { 0 };
    digits[..shown]
        .iter()
        .chain(std::iter::repeat_n(&'*', digits.len() - shown))
        .collect()
}

impl CustomerRecord {
    /// The entry a hub keeps.
    pub fn hot_entry(&self, customer_id: &str) -> HotEntry {
        HotEntry {
            account_id: customer_id.into(),
            home_store_id: self.home_store_id.clone(),
            templates: self.templates.clone(),
            second_factor: self.second_factor,
            second_factor_hash: self.second_factor_hash.clone(),
            version: self.version,
        }
    }

    fn view(&self, customer_id: &str) -> CustomerView {
        CustomerView {
            customer_id: customer_id.to_owned(),
            name: self.name.clone(),
            phone_masked: mask_phone(&self.phone),
            second_factor: self.second_factor,
            home_store_id: self.home_store_id.clone(),
            faces: self.templates.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ChangeRef {
    account_id: String,
    erased: bool,
    /// An erasure's template ids (random numbers, no personal data): what every instance's
    /// index drops ([`CustomerStore::index_changes_after`]).
    #[serde(default)]
    template_ids: Vec<u64>,
}

/// A change to what the identity index holds, from the change log.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexChange {
    /// A customer's templates as they are now.
    Templates(Vec<(u64, Vec<f32>)>),
    /// An erased customer's template ids.
    Erased(Vec<u64>),
}

/// The key of the sealed record every template key of a database must open.
const KEY_CHECK: &[u8] = b"template-key-check";

/// Most changes one [`CustomerStore::index_changes_after`] call returns.
pub const INDEX_CHANGE_BATCH: usize = 1000;

/// Hashes a secret (PIN, phone digits) with Argon2id and a random salt, as a PHC string.
pub fn hash_secret(secret: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("argon2 with default parameters does not fail")
        .to_string()
}

/// Checks a secret against a PHC string; a malformed hash never verifies.
pub fn verify_secret(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Checks an enrollment request's fields; returns the phone's digits.
pub fn validate_customer(request: &CreateCustomer) -> Result<String, CustomerError> {
    let invalid = |s: String| CustomerError::Invalid(s);
    protocol::validate_id("customer_id", &request.customer_id)
        .map_err(|e| invalid(e.to_string()))?;
    protocol::validate_id("home_store_id", &request.home_store_id)
        .map_err(|e| invalid(e.to_string()))?;
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(invalid("name must be 1 to 200 printable characters".into()));
    }
    let phone = request.phone.trim();
    let digits: String = phone.chars().filter(|c| c.is_ascii_digit()).collect();
    let shape_ok = phone
        .chars()
        .enumerate()
        .all(|(i, c)| c.is_ascii_digit() || c == ' ' || (c == '+' && i == 0));
    if !shape_ok || !(6..=15).contains(&digits.len()) {
        return Err(invalid(
            "phone must be 6 to 15 digits, with an optional leading + and spaces".into(),
        ));
    }
    if !(4..=8).contains(&request.pin.len()) || !request.pin.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid("pin must be 4 to 8 digits".into()));
    }
    Ok(digits)
}

/// The customer store.
#[derive(Clone)]
pub struct CustomerStore {
    db: storage::kv::Db,
    customers: storage::kv::Tree,
    templates: storage::kv::Tree,
    changes: storage::kv::Tree,
    erased: storage::kv::Tree,
    lockouts: storage::kv::Tree,
    sealer: Sealer,
}

impl CustomerStore {
    /// Opens (or creates) the store at `path`, sealing with the key in `key_file`. A missing key
    /// file is created only while the store holds no customer; otherwise it is an error, because
    /// the sealed records could not be opened with a new key.
    pub fn open(path: &Path, key_file: &Path) -> Result<Self, CustomerError> {
        Self::open_at(&storage::kv::Location::Sled(path.to_path_buf()), key_file)
    }

    /// Opens (or creates) the store at `location` (sled or PostgreSQL), sealing with the key in
    /// `key_file`, as [`CustomerStore::open`].
    pub fn open_at(
        location: &storage::kv::Location,
        key_file: &Path,
    ) -> Result<Self, CustomerError> {
        let db = storage::kv::Db::open_at(location).map_err(storage)?;
        let customers = db.open_tree("customers").map_err(storage)?;
        let templates = db.open_tree("templates").map_err(storage)?;
        let changes = db.open_tree("changes").map_err(storage)?;
        let erased = db.open_tree("erased").map_err(storage)?;
        let lockouts = db.open_tree("lockouts").map_err(storage)?;
        // Several instances may share the database: each must seal with the same key. A sealed
        // check record, written by whichever instance comes first, is what every key must open;
        // a key is made only for a database without customers and without that record.
        let meta = db.open_tree("customers_meta").map_err(storage)?;
        let check = meta.get(KEY_CHECK).map_err(storage)?;
        let empty = customers.first().map_err(storage)?.is_none();
        let sealer = Sealer::from_key_file(key_file, empty && check.is_none()).map_err(storage)?;
        let wrong_key = || {
            CustomerError::Storage(format!(
                "the key in {} does not open the stored customers (every cloud instance of a \
                 database needs the same template key)",
                key_file.display()
            ))
        };
        let check = match check {
            Some(check) => check,
            None => {
                let ours = sealer.seal(KEY_CHECK, KEY_CHECK);
                // Written only if still absent: two instances starting at once with two new
                // keys, one key wins and the other instance stops below.
                meta.transaction(|t| {
                    Ok::<_, ConflictableTransactionError<()>>(match t.get(KEY_CHECK)? {
                        Some(theirs) => theirs,
                        None => {
                            t.insert(KEY_CHECK, ours.clone())?;
                            ours.clone().into()
                        }
                    })
                })
                .map_err(|e| storage(format!("{e:?}")))?
            }
        };
        if sealer.open(KEY_CHECK, &check).is_err() {
            return Err(wrong_key());
        }
        let store = CustomerStore {
            db,
            customers,
            templates,
            changes,
            erased,
            lockouts,
            sealer,
        };
        // Prove the key opens what is stored, now rather than at the first payment.
        if let Some(first) = store.customers.iter().next() {
            let (id, _) = first.map_err(storage)?;
            store
                .get(&String::from_utf8_lossy(&id))
                .map_err(|_| wrong_key())?;
        }
        Ok(store)
    }

    /// Counts a checked second-factor answer across the fleet: a failure against each enrolled
    /// account of `report.failed` (by `policy`, at `now_ms`), a fresh start for the one it
    /// passed. Returns the new states, each under a new version, for every hub. One transaction:
    /// reports from several cloud instances about one customer are counted one after the other.
    pub fn report_factor(
        &self,
        report: &protocol::FactorReport,
        policy: protocol::LockoutPolicy,
        now_ms: u64,
    ) -> Result<Vec<(protocol::AccountId, protocol::Lockout)>, CustomerError> {
        self.write(|t| {
            let mut changed = Vec::new();
            let passed = report.passed.iter().map(|a| (a, true));
            for (account, passed) in report.failed.iter().map(|a| (a, false)).chain(passed) {
                // Only enrolled customers are counted: a report cannot grow this tree at will.
                if t.customers.get(account.as_bytes())?.is_none() {
                    continue;
                }
                let held: protocol::Lockout = t
                    .lockouts
                    .get(account.as_bytes())?
                    .and_then(|v| serde_json::from_slice(&v).ok())
                    .unwrap_or_default();
                let mut state = if passed {
                    protocol::Lockout {
                        resets: held.resets + 1,
                        ..protocol::Lockout::default()
                    }
                } else {
                    policy.fail(held, now_ms)
                };
                state.version = t.lockouts.generate_id()? + 1;
                t.lockouts.insert(
                    account.as_bytes(),
                    serde_json::to_vec(&state).expect("serialises"),
                )?;
                changed.push((account.clone(), state));
            }
            Ok(changed)
        })
    }

    /// Runs `f` as one transaction over the store's trees, flushed before it returns.
    fn write<A>(
        &self,
        f: impl Fn(&StoreTx<'_>) -> Result<A, ConflictableTransactionError<CustomerError>>,
    ) -> Result<A, CustomerError> {
        let trees = (
            &self.customers,
            &self.templates,
            &self.changes,
            &self.erased,
            &self.lockouts,
        );
        let answer = trees
            .transaction(|(customers, templates, changes, erased, lockouts)| {
                f(&StoreTx {
                    customers,
                    templates,
                    changes,
                    erased,
                    lockouts,
                    sealer: &self.sealer,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => storage(e),
            })?;
        self.flush()?;
        Ok(answer)
    }

    /// The sealer of this store's key, for the identity index file.
    pub fn sealer(&self) -> Sealer {
        self.sealer.clone()
    }

    /// A customer's record.
    pub fn get(&self, customer_id: &str) -> Result<Option<CustomerRecord>, CustomerError> {
        let Some(sealed) = self
            .customers
            .get(customer_id.as_bytes())
            .map_err(storage)?
        else {
            return Ok(None);
        };
        let plain = self
            .sealer
            .open(customer_id.as_bytes(), &sealed)
            .map_err(storage)?;
        serde_json::from_slice(&plain).map(Some).map_err(storage)
    }

    /// A customer as the API shows them.
    pub fn view(&self, customer_id: &str) -> Result<Option<CustomerView>, CustomerError> {
        Ok(self.get(customer_id)?.map(|r| r.view(customer_id)))
    }

    fn flush(&self) -> Result<(), CustomerError> {
        self.db.flush().map(|_| ()).map_err(storage)
    }

    /// Enrolls a customer (no faces yet). Refused if the id exists.
    pub fn create(&self, request: &CreateCustomer) -> Result<CustomerView, CustomerError> {
        let digits = validate_customer(request)?;
        self.check_new(&request.customer_id)?;
        // Hashed once, outside the transaction (Argon2 takes tens of milliseconds).
        let pin_hash = hash_secret(&request.pin);
        let second_factor_hash = match request.second_factor {
            SecondFactorKind::Pin => pin_hash.clone(),
            SecondFactorKind::PhoneLast4 => hash_secret(&digits[digits.len() - 4..]),
        };
        let id = &request.customer_id;
        self.write(|t| {
            // Checked again within the transaction: another instance may have enrolled it since.
            if t.customers.get(id.as_bytes())?.is_some() || t.erased.get(id.as_bytes())?.is_some() {
                return abort(CustomerError::Conflict(format!(
                    "customer {id} is already enrolled or was erased"
                )));
            }
            let record = CustomerRecord {
                name: request.name.trim().to_owned(),
                phone: request.phone.trim().to_owned(),
                pin_hash: pin_hash.clone(),
                second_factor: request.second_factor,
                second_factor_hash: second_factor_hash.clone(),
                home_store_id: request.home_store_id.clone(),
                templates: Vec::new(),
                version: t.changes.generate_id()? + 1,
            };
            t.put(id, &record, None)?;
            Ok(record.view(id))
        })
    }

    /// Adds a template to a customer; returns its id and the change to push to hubs.
    pub fn add_template(
        &self,
        customer_id: &str,
        embedding: Vec<f32>,
    ) -> Result<(u64, CustomerRecord), CustomerError> {
        self.write(|t| {
            let Some(mut record) = t.get(customer_id)? else {
                return abort(CustomerError::NotFound(customer_id.to_owned()));
            };
            if record.templates.len() >= MAX_FACES_PER_CUSTOMER {
                return abort(CustomerError::Invalid(format!(
                    "a customer has at most {MAX_FACES_PER_CUSTOMER} faces"
                )));
            }
            let template_id = t.changes.generate_id()? + 1;
            let previous = record.version;
            record.templates.push((template_id, embedding.clone()));
            record.version = t.changes.generate_id()? + 1;
            t.templates
                .insert(&template_id.to_be_bytes(), customer_id.as_bytes())?;
            t.put(customer_id, &record, Some(previous))?;
            Ok((template_id, record))
        })
    }

    /// Erases a customer: profile, secrets and templates. Returns the erased template ids and the
    /// revocation's version.
    pub fn erase(&self, customer_id: &str) -> Result<(Vec<u64>, u64), CustomerError> {
        self.write(|t| {
            let Some(record) = t.get(customer_id)? else {
                // Erased already (a retry after an answer that was lost): the same erasure
                // again, so the caller goes on to close the account.
                if let Some(version) = t.erased.get(customer_id.as_bytes())? {
                    let version = version.as_ref().try_into().map(u64::from_be_bytes);
                    return match version {
                        Ok(version) => Ok((Vec::new(), version)),
                        Err(e) => abort(storage(e)),
                    };
                }
                return abort(CustomerError::NotFound(customer_id.to_owned()));
            };
            let ids: Vec<u64> = record.templates.iter().map(|(id, _)| *id).collect();
            for id in &ids {
                t.templates.remove(&id.to_be_bytes())?;
            }
            t.customers.remove(customer_id.as_bytes())?;
            t.lockouts.remove(customer_id.as_bytes())?;
            t.changes.remove(&record.version.to_be_bytes())?;
            let version = t.changes.generate_id()? + 1;
            let change = ChangeRef {
                account_id: customer_id.to_owned(),
                erased: true,
                template_ids: ids.clone(),
            };
            t.changes.insert(
                &version.to_be_bytes(),
                serde_json::to_vec(&change).expect("serialises"),
            )?;
            t.erased
                .insert(customer_id.as_bytes(), &version.to_be_bytes())?;
            Ok((ids, version))
        })
    }

    /// Refuses an id that is enrolled, or was erased (its account is closed for good; the money
    /// record stays): a new enrollment takes a new id.
    pub fn check_new(&self, customer_id: &str) -> Result<(), CustomerError> {
        if self
            .customers
            .contains_key(customer_id.as_bytes())
            .map_err(storage)?
        {
            return Err(CustomerError::Conflict(format!(
                "customer {customer_id} is already enrolled"
            )));
        }
        if self.is_erased(customer_id)? {
            return Err(CustomerError::Conflict(format!(
                "customer {customer_id} was erased; enroll under a new customer id"
            )));
        }
        Ok(())
    }

    /// Whether an account was erased.
    pub fn is_erased(&self, customer_id: &str) -> Result<bool, CustomerError> {
        self.erased
            .contains_key(customer_id.as_bytes())
            .map_err(storage)
    }

    /// The customer a template belongs to.
    pub fn owner_of(&self, template_id: u64) -> Result<Option<String>, CustomerError> {
        Ok(self
            .templates
            .get(template_id.to_be_bytes())
            .map_err(storage)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Number of templates of every customer.
    pub fn template_count(&self) -> u64 {
        self.templates.len() as u64
    }

    /// Every template (id, embedding), to rebuild the identity index.
    pub fn all_templates(&self) -> Result<Vec<(u64, Vec<f32>)>, CustomerError> {
        let mut all = Vec::with_capacity(self.templates.len());
        for item in self.customers.iter() {
            let (id, _) = item.map_err(storage)?;
            let id = String::from_utf8_lossy(&id).into_owned();
            if let Some(record) = self.get(&id)? {
                all.extend(record.templates);
            }
        }
        Ok(all)
    }

    /// The newest change's version (0: none yet).
    pub fn latest_version(&self) -> Result<u64, CustomerError> {
        match self.changes.last().map_err(storage)? {
            Some((key, _)) => Ok(u64::from_be_bytes(
                key.as_ref().try_into().map_err(storage)?,
            )),
            None => Ok(0),
        }
    }

    /// Changes to the identity index after `after_version`, oldest first, at most
    /// [`INDEX_CHANGE_BATCH`], with the version they reach: how an instance keeps its index
    /// replica in step with enrollments and erasures made by the others.
    pub fn index_changes_after(
        &self,
        after_version: u64,
    ) -> Result<(Vec<IndexChange>, u64), CustomerError> {
        let start = after_version.saturating_add(1).to_be_bytes();
        let mut changes = Vec::new();
        let mut up_to = after_version;
        for item in self.changes.range(start..).take(INDEX_CHANGE_BATCH) {
            let (key, value) = item.map_err(storage)?;
            up_to = u64::from_be_bytes(key.as_ref().try_into().map_err(storage)?);
            let change: ChangeRef = serde_json::from_slice(&value).map_err(storage)?;
            if change.erased {
                changes.push(IndexChange::Erased(change.template_ids));
            } else if let Some(record) = self.get(&change.account_id)? {
                changes.push(IndexChange::Templates(record.templates));
            }
        }
        Ok((changes, up_to))
    }

    /// Changes after `after_version` that concern `store_id`'s hub: its own customers' entries
    /// and every revocation.
    pub fn changes_after(
        &self,
        store_id: &str,
        after_version: u64,
    ) -> Result<TemplateBatch, CustomerError> {
        let start = after_version.saturating_add(1).to_be_bytes();
        let mut updates = Vec::new();
        let mut up_to_version = after_version;
        for item in self.changes.range(start..) {
            let (key, value) = item.map_err(storage)?;
            let version = u64::from_be_bytes(key.as_ref().try_into().map_err(storage)?);
            if updates.len() == TEMPLATE_BATCH_MAX {
                return Ok(TemplateBatch {
                    updates,
                    up_to_version,
                    more: true,
                });
            }
            up_to_version = version;
            let change: ChangeRef = serde_json::from_slice(&value).map_err(storage)?;
            if change.erased {
                updates.push(TemplateUpdate {
                    version,
                    change: TemplateChange::Revoke {
                        account_id: change.account_id.into(),
                    },
                });
                continue;
            }
            if let Some(record) = self.get(&change.account_id)? {
                if record.home_store_id == store_id && !record.templates.is_empty() {
                    updates.push(TemplateUpdate {
                        version,
                        change: TemplateChange::Upsert(record.hot_entry(&change.account_id)),
                    });
                }
            }
        }
        Ok(TemplateBatch {
            updates,
            up_to_version,
            more: false,
        })
    }
}

/// The store's trees within one transaction ([`CustomerStore::write`]).
struct StoreTx<'a> {
    customers: &'a TransactionalTree,
    templates: &'a TransactionalTree,
    changes: &'a TransactionalTree,
    erased: &'a TransactionalTree,
    lockouts: &'a TransactionalTree,
    sealer: &'a Sealer,
}

type TxResult<T> = Result<T, ConflictableTransactionError<CustomerError>>;

fn abort<T>(error: CustomerError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(error))
}

impl StoreTx<'_> {
    /// A customer's record, opened.
    fn get(&self, customer_id: &str) -> TxResult<Option<CustomerRecord>> {
        let Some(sealed) = self.customers.get(customer_id.as_bytes())? else {
            return Ok(None);
        };
        let plain = match self.sealer.open(customer_id.as_bytes(), &sealed) {
            Ok(plain) => plain,
            Err(e) => return abort(storage(e)),
        };
        match serde_json::from_slice(&plain) {
            Ok(record) => Ok(Some(record)),
            Err(e) => abort(storage(e)),
        }
    }

    /// Stores a record, sealed, as the customer's latest change (replacing the change at
    /// `previous_version`).
    fn put(
        &self,
        customer_id: &str,
        record: &CustomerRecord,
        previous_version: Option<u64>,
    ) -> TxResult<()> {
        let plain = serde_json::to_vec(record).expect("records serialise");
        let sealed = self.sealer.seal(customer_id.as_bytes(), &plain);
        self.customers.insert(customer_id.as_bytes(), sealed)?;
        if let Some(v) = previous_version {
            self.changes.remove(&v.to_be_bytes())?;
        }
        let change = ChangeRef {
            account_id: customer_id.to_owned(),
            erased: false,
            template_ids: Vec::new(),
        };
        self.changes.insert(
            &record.version.to_be_bytes(),
            serde_json::to_vec(&change).expect("serialises"),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, store: &str) -> CreateCustomer {
        CreateCustomer {
            customer_id: id.into(),
            name: "Ada Lovelace".into(),
            phone: "+44 20 7946 0958".into(),
            pin: "4821".into(),
            second_factor: SecondFactorKind::PhoneLast4,
            home_store_id: store.into(),
            currency: "EUR".into(),
            initial_balance_minor: 0,
            public_key: None,
        }
    }

    fn unit(seed: f32) -> Vec<f32> {
        let v: Vec<f32> = (0..128).map(|i| (i as f32 * seed).sin()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn wrong_second_factors_are_counted_for_the_fleet_and_a_right_one_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = CustomerStore::open_at(
            &crate::engines::location(&dir.path().join("db")),
            &dir.path().join("templates.key"),
        )
        .unwrap();
        store.create(&request("ada", "s1")).unwrap();
        store.create(&request("bea", "s2")).unwrap();
        let policy = protocol::LockoutPolicy {
            free: 2,
            base_ms: 30_000,
            max_ms: 3_600_000,
        };
        let failed = |accounts: &[&str]| protocol::FactorReport {
            failed: accounts.iter().map(|a| (*a).into()).collect(),
            passed: None,
        };
        // Two stores' wrong answers add up; an unknown account is not counted.
        let first = store
            .report_factor(&failed(&["ada", "bea", "nobody"]), policy, 1_000)
            .unwrap();
        assert_eq!(first.len(), 2);
        store
            .report_factor(&failed(&["ada"]), policy, 2_000)
            .unwrap();
        let third = store
            .report_factor(&failed(&["ada"]), policy, 3_000)
            .unwrap();
        let (account, state) = &third[0];
        assert_eq!(account.as_str(), "ada");
        assert_eq!((state.failures, state.locked_until_ms), (3, 33_000));
        assert!(state.version > first[0].1.version, "each change is newer");
        // A right answer starts the count again, under a newer version still.
        let passed = protocol::FactorReport {
            failed: Vec::new(),
            passed: Some("ada".into()),
        };
        let cleared = store.report_factor(&passed, policy, 4_000).unwrap();
        assert_eq!(
            (cleared[0].1.failures, cleared[0].1.locked_until_ms),
            (0, 0)
        );
        assert!(cleared[0].1.version > state.version);
        assert_eq!(
            cleared[0].1.resets,
            state.resets + 1,
            "hubs replace their count"
        );
        // Erased with the customer.
        store.erase("bea").unwrap();
        assert!(store.lockouts.get(b"bea").unwrap().is_none());
    }

    fn secrets_are_hashed_and_personal_data_is_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("templates.key");
        let store = CustomerStore::open_at(&crate::engines::location(&dir.path().join("db")), &key)
            .unwrap();
        let view = store.create(&request("ada", "s1")).unwrap();
        // The last four digits are a second factor: never shown.
        assert_eq!(view.phone_masked, "44**********");
        let record = store.get("ada").unwrap().unwrap();
        assert!(record.pin_hash.starts_with("$argon2id$"));
        assert!(verify_secret("4821", &record.pin_hash));
        assert!(!verify_secret("4822", &record.pin_hash));
        assert!(verify_secret("0958", &record.second_factor_hash));
        assert!(!verify_secret("4821", &record.second_factor_hash));
        assert!(!verify_secret("0958", "not a hash"));
        store.add_template("ada", unit(0.1)).unwrap();
        drop(store);

        // Nothing readable on disk: not the name, not the phone, not the PIN.
        let mut raw = Vec::new();
        for entry in walk(dir.path()) {
            raw.extend(std::fs::read(entry).unwrap());
        }
        for needle in [&b"Lovelace"[..], b"7946", b"4821"] {
            assert!(
                !raw.windows(needle.len()).any(|w| w == needle),
                "{needle:?} on disk"
            );
        }
        // The same key reopens it; another key is refused at open.
        let store = CustomerStore::open_at(&crate::engines::location(&dir.path().join("db")), &key)
            .unwrap();
        assert_eq!(store.get("ada").unwrap().unwrap().templates.len(), 1);
        drop(store);
        let err = CustomerStore::open_at(
            &crate::engines::location(&dir.path().join("db")),
            &dir.path().join("new.key"),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("new.key"), "{err}");
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else if path.extension().is_none_or(|e| e != "key") {
                files.push(path);
            }
        }
        files
    }

    fn bad_enrollment_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = CustomerStore::open_at(
            &crate::engines::location(&dir.path().join("db")),
            &dir.path().join("k.key"),
        )
        .unwrap();
        for (field, change) in [
            (
                "pin",
                Box::new(|r: &mut CreateCustomer| r.pin = "12".into())
                    as Box<dyn Fn(&mut CreateCustomer)>,
            ),
            (
                "pin",
                Box::new(|r: &mut CreateCustomer| r.pin = "12a4".into()),
            ),
            (
                "phone",
                Box::new(|r: &mut CreateCustomer| r.phone = "12-34".into()),
            ),
            (
                "phone",
                Box::new(|r: &mut CreateCustomer| r.phone = "123".into()),
            ),
            (
                "name",
                Box::new(|r: &mut CreateCustomer| r.name = "  ".into()),
            ),
            (
                "customer_id",
                Box::new(|r: &mut CreateCustomer| r.customer_id = "a/b".into()),
            ),
        ] {
            let mut r = request("x", "s1");
            change(&mut r);
            let err = store.create(&r).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        store.create(&request("x", "s1")).unwrap();
        assert!(matches!(
            store.create(&request("x", "s1")),
            Err(CustomerError::Conflict(_))
        ));
    }

    fn change_log_serves_each_store_its_customers_and_everyone_the_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let store = CustomerStore::open_at(
            &crate::engines::location(&dir.path().join("db")),
            &dir.path().join("k.key"),
        )
        .unwrap();
        store.create(&request("a", "s1")).unwrap();
        store.create(&request("b", "s2")).unwrap();
        let (ta, _) = store.add_template("a", unit(0.1)).unwrap();
        store.add_template("b", unit(0.2)).unwrap();
        store.add_template("a", unit(0.3)).unwrap();
        assert_eq!(store.owner_of(ta).unwrap().as_deref(), Some("a"));
        assert_eq!(store.template_count(), 3);

        let s1 = store.changes_after("s1", 0).unwrap();
        assert_eq!(s1.updates.len(), 1, "only a's latest entry");
        match &s1.updates[0].change {
            TemplateChange::Upsert(e) => {
                assert_eq!((e.account_id.as_str(), e.templates.len()), ("a", 2))
            }
            other => panic!("{other:?}"),
        }
        let s2 = store.changes_after("s2", 0).unwrap();
        assert_eq!(s2.updates.len(), 1);
        let cursor = s1.up_to_version;

        let (ids, _) = store.erase("a").unwrap();
        assert_eq!(ids.len(), 2);
        assert!(store.get("a").unwrap().is_none());
        assert!(store.owner_of(ta).unwrap().is_none());
        assert!(store.is_erased("a").unwrap());
        assert!(matches!(
            store.create(&request("a", "s1")),
            Err(CustomerError::Conflict(_))
        ));
        assert!(!store.is_erased("b").unwrap());
        for s in ["s1", "s2"] {
            let later = store.changes_after(s, cursor).unwrap();
            assert!(
                later.updates.iter().any(|u| u.change
                    == TemplateChange::Revoke {
                        account_id: "a".into()
                    }),
                "{s}"
            );
        }
        assert_eq!(store.all_templates().unwrap().len(), 1);
    }

    /// Every instance of a database must seal with the same key, even before any customer is
    /// enrolled: a second instance that made a key of its own is refused at start.
    fn a_database_takes_only_the_key_it_was_first_opened_with() {
        let dir = tempfile::tempdir().unwrap();
        let location = crate::engines::location(&dir.path().join("db"));
        let first = dir.path().join("first.key");
        drop(CustomerStore::open_at(&location, &first).unwrap());
        let second = dir.path().join("second.key");
        Sealer::from_key_file(&second, true).unwrap();
        let error = CustomerStore::open_at(&location, &second)
            .err()
            .expect("another key is refused");
        assert!(error.to_string().contains("same template key"), "{error}");
        assert!(CustomerStore::open_at(&location, &first).is_ok());
    }

    crate::engines::on_each_engine!(
        a_database_takes_only_the_key_it_was_first_opened_with,
        wrong_second_factors_are_counted_for_the_fleet_and_a_right_one_starts_again,
        secrets_are_hashed_and_personal_data_is_sealed,
        bad_enrollment_fields_are_refused,
        change_log_serves_each_store_its_customers_and_everyone_the_revocations,
    );
}
