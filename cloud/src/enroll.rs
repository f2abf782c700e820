//! The identity actor: owns the customer store and the FAISS identity index, on one dedicated
//! thread (every change ends in a disk flush). Hubs' 1:N searches run on a pool of their own
//! ([`Searcher`]), reading the same index at once; a change takes it for itself only while it is
//! applied, and a rebuild is built aside and swapped in.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::{Duration, Instant},
};

use actix::prelude::*;
use protocol::{
    CloudIdentified, CloudIdentify, CreateCustomer, CustomerView, FaceAdded, HotEntry,
    TemplateBatch, TemplateChange, TemplateUpdate,
};
use serde::{Deserialize, Serialize};

use crate::{
    customers::{CustomerError, CustomerStore},
    identity::{IdentityError, IdentityIndex, IndexKind, EMBEDDING_DIM},
};

/// How many nearest templates a search looks at, to find the best two distinct customers.
pub const SEARCH_K: usize = 10;
/// The index file is rewritten at most this often (a crash in between is repaired at start: the
/// count no longer matches the store and the index is rebuilt).
pub const SAVE_INTERVAL: Duration = Duration::from_secs(30);

/// The `[identity]` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// FAISS index type.
    pub index: IndexKind,
    /// Cosine at or above which an enrollment photo matching another customer is refused as a
    /// probable duplicate.
    pub duplicate_threshold: f32,
    /// Cosine below which a cloud 1:N search reports no candidate at all.
    pub candidate_threshold: f32,
    /// Cosine below which a 1:1 identify (a code names the account) returns nothing of the
    /// account: its templates and second-factor hash go out only for a face the hub could match
    /// (the hubs' `identify.match_threshold`), so naming an account is no way to read them. A
    /// payment by face needs a face at this cosine to the account's templates too
    /// ([`crate::payer`]).
    pub one_to_one_threshold: f32,
    /// Cosine at or above which a payment by face needs no second factor at the cloud (the hubs'
    /// `identify.accept_threshold`); below it, down to `one_to_one_threshold`, the terminal must
    /// attest the customer's right second-factor answer ([`crate::payer`]).
    pub face_accept_threshold: f32,
    /// Threads answering hubs' 1:N searches, all reading one index at once (1 to 64).
    pub search_threads: usize,
    /// Wrong second-factor answers, anywhere in the fleet, before face payment locks.
    pub free_failures: u32,
    /// The first lock, in seconds; it doubles with each further wrong answer.
    pub lockout_base_seconds: u64,
    /// The longest lock, in seconds.
    pub lockout_max_seconds: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            index: IndexKind::Flat,
            duplicate_threshold: 0.45,
            candidate_threshold: 0.3,
            one_to_one_threshold: 0.363,
            face_accept_threshold: 0.45,
            search_threads: 2,
            free_failures: 3,
            lockout_base_seconds: 30,
            lockout_max_seconds: 3600,
        }
    }
}

impl IdentityConfig {
    /// The fleet's lockout rule.
    pub fn lockout_policy(&self) -> protocol::LockoutPolicy {
        protocol::LockoutPolicy {
            free: self.free_failures,
            base_ms: self.lockout_base_seconds * 1000,
            max_ms: self.lockout_max_seconds * 1000,
        }
    }

    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(1..=64).contains(&self.search_threads) {
            return Err((
                "identity.search_threads".into(),
                "must be from 1 to 64".into(),
            ));
        }
        if self.free_failures > 100 {
            return Err((
                "identity.free_failures".into(),
                "must be from 0 to 100".into(),
            ));
        }
        if !(1..=86_400).contains(&self.lockout_base_seconds)
            || !(self.lockout_base_seconds..=604_800).contains(&self.lockout_max_seconds)
        {
            return Err((
                "identity.lockout_base_seconds".into(),
                "must be from 1 to 86400, and identity.lockout_max_seconds from it to 604800"
                    .into(),
            ));
        }
        for (key, v) in [
            ("identity.duplicate_threshold", self.duplicate_threshold),
            ("identity.candidate_threshold", self.candidate_threshold),
            ("identity.one_to_one_threshold", self.one_to_one_threshold),
            ("identity.face_accept_threshold", self.face_accept_threshold),
        ] {
            if !(-1.0..=1.0).contains(&v) {
                return Err((
                    key.into(),
                    format!("must be a cosine from -1 to 1, got {v}"),
                ));
            }
        }
        match self.index {
            IndexKind::Flat => Ok(()),
            IndexKind::Ivf { nlist, nprobe } | IndexKind::IvfSq8 { nlist, nprobe } => {
                if nlist == 0 || nprobe == 0 || nprobe > nlist {
                    Err((
                        "identity.index".into(),
                        "ivf needs 1 <= nprobe <= nlist".into(),
                    ))
                } else {
                    Ok(())
                }
            }
            IndexKind::Hnsw { m, ef_search } => {
                if !(4..=128).contains(&m) || ef_search == 0 {
                    Err((
                        "identity.index".into(),
                        "hnsw needs m from 4 to 128 and ef_search >= 1".into(),
                    ))
                } else {
                    Ok(())
                }
            }
            IndexKind::PqRefine { m, k_factor } => {
                if m == 0
                    || !(EMBEDDING_DIM as usize).is_multiple_of(m)
                    || !(1..=4096).contains(&k_factor)
                {
                    Err((
                        "identity.index".into(),
                        format!(
                            "pq_refine needs m dividing {EMBEDDING_DIM} and k_factor from 1 to \
                             4096"
                        ),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Why an enrollment step failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// From the customer store.
    #[error(transparent)]
    Customer(#[from] CustomerError),
    /// From FAISS.
    #[error(transparent)]
    Index(#[from] IdentityError),
}

/// The index, shared by the identity thread (its one writer) and the search threads.
pub type SharedIndex = Arc<RwLock<IdentityIndex>>;

fn read(index: &SharedIndex) -> RwLockReadGuard<'_, IdentityIndex> {
    // A panic while holding the lock leaves the index as FAISS left it: still an index.
    index.read().unwrap_or_else(|p| p.into_inner())
}

fn write(index: &SharedIndex) -> RwLockWriteGuard<'_, IdentityIndex> {
    index.write().unwrap_or_else(|p| p.into_inner())
}

/// Owns the store of record and the index.
pub struct IdentityActor {
    store: CustomerStore,
    index: SharedIndex,
    index_path: PathBuf,
    sealer: storage::Sealer,
    config: IdentityConfig,
    dirty: bool,
    saved_at: Instant,
    gauge: prometheus::IntGauge,
    clock: clock::SharedClock,
    /// The change log's version this index holds everything up to ([`SyncIndex`]).
    synced_version: u64,
}

impl IdentityActor {
    /// Opens the index at `index_path` (rebuilding it from `store` if needed).
    pub fn open(
        store: CustomerStore,
        index_path: PathBuf,
        config: IdentityConfig,
        gauge: prometheus::IntGauge,
    ) -> Result<Self, EnrollError> {
        // Read before the templates: whatever changes after it is applied again by the first
        // sync, which is harmless (applying a change twice leaves the same index).
        let latest = store.latest_version()?;
        let expected = store.template_count();
        let sealer = store.sealer();
        let mut failure = None;
        let (index, rebuilt) = IdentityIndex::open_or_rebuild(
            &index_path,
            config.index,
            expected,
            latest,
            &sealer,
            || {
                store.all_templates().unwrap_or_else(|e| {
                    failure = Some(e);
                    Vec::new()
                })
            },
        )?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        if rebuilt {
            tracing::info!(templates = index.len(), path = %index_path.display(), "identity index rebuilt from the customer store");
        }
        // A file read back holds the changes up to the version it was saved at: the log is
        // replayed from there (changes other instances made while this one was down, with equal
        // template counts, would otherwise be missed).
        let synced_version = if rebuilt {
            latest
        } else {
            index.file_version().unwrap_or(0)
        };
        gauge.set(index.len() as i64);
        Ok(IdentityActor {
            store,
            index: Arc::new(RwLock::new(index)),
            index_path,
            sealer,
            config,
            dirty: false,
            saved_at: Instant::now(),
            gauge,
            clock: clock::system(),
            synced_version,
        })
    }

    /// A searcher over this actor's index and store, for the search pool.
    pub fn searcher(&self) -> Searcher {
        Searcher {
            index: self.index.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
            search_seconds: None,
        }
    }

    /// Templates in the index.
    pub fn index_len(&self) -> u64 {
        read(&self.index).len()
    }

    /// Builds the index again from the store, aside (searches go on meanwhile on the old one),
    /// then swaps it in.
    fn rebuild(&mut self) -> Result<(), EnrollError> {
        let templates = self.store.all_templates()?;
        let rebuilt = IdentityIndex::build(self.config.index, &templates)?;
        let old = std::mem::replace(&mut *write(&self.index), rebuilt);
        // Freed after the lock is let go: searches wait only for the swap.
        drop(old);
        self.dirty = true;
        Ok(())
    }

    fn changed(&mut self) {
        self.dirty = true;
        if read(&self.index).outgrown() {
            // An IVF trained while the fleet was small: its lists grow long, so searches slow
            // down until it is trained again on what it holds now.
            tracing::info!(
                templates = self.index_len(),
                "identity index outgrew its lists; rebuilding"
            );
            if let Err(error) = self.rebuild() {
                tracing::warn!(%error, "rebuilding the outgrown identity index failed");
            }
        }
        self.gauge.set(self.index_len() as i64);
        if self.saved_at.elapsed() >= SAVE_INTERVAL {
            self.save();
        }
    }

    fn save(&mut self) {
        if !self.dirty {
            return;
        }
        match read(&self.index).save(&self.index_path, &self.sealer, self.synced_version) {
            Ok(()) => {
                self.dirty = false;
                self.saved_at = Instant::now();
            }
            Err(error) => {
                tracing::warn!(%error, "saving the identity index failed; rebuilt at next start")
            }
        }
    }
}

/// The best distinct customers for an embedding, best first, with their best score.
fn best_customers(
    index: &SharedIndex,
    store: &CustomerStore,
    embedding: &[f32],
    k: usize,
) -> Result<Vec<(String, f32)>, EnrollError> {
    // The read lock is held only for the search itself.
    let hits = read(index).search(embedding, k)?;
    let mut best: Vec<(String, f32)> = Vec::new();
    for hit in hits {
        let Some(owner) = store.owner_of(hit.template_id)? else {
            continue; // removed since (HNSW and product codes keep erased ids until rebuilt)
        };
        if !best.iter().any(|(id, _)| *id == owner) {
            best.push((owner, hit.score));
        }
    }
    Ok(best)
}

impl Actor for IdentityActor {
    type Context = SyncContext<Self>;

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.save();
        Running::Stop
    }
}

/// How often an instance sharing its database with others brings its index up to the change
/// log: a customer enrolled at another instance is found by 1:N search within about this.
pub const INDEX_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Bring the index up to the customer store's change log: enrollments and erasures another
/// instance made (several instances share one PostgreSQL). Returns how many changes were
/// applied.
#[derive(Message)]
#[rtype(result = "Result<usize, EnrollError>")]
pub struct SyncIndex;

impl Handler<SyncIndex> for IdentityActor {
    type Result = Result<usize, EnrollError>;
    fn handle(&mut self, _: SyncIndex, _: &mut Self::Context) -> Self::Result {
        self.sync_index()
    }
}

use crate::customers::IndexChange;

impl IdentityActor {
    /// See [`SyncIndex`]. Each change is applied so that applying it twice leaves the same
    /// index: a customer's templates are removed, then added as they are now.
    pub fn sync_index(&mut self) -> Result<usize, EnrollError> {
        let mut applied = 0;
        let mut erased = false;
        loop {
            let (changes, up_to) = self.store.index_changes_after(self.synced_version)?;
            if up_to == self.synced_version {
                break;
            }
            let mut rebuild = false;
            for change in &changes {
                applied += 1;
                let mut index = write(&self.index);
                let added = match change {
                    // A kind that cannot remove: a template id always names the same embedding,
                    // so what it holds stays and what it lacks is added.
                    IndexChange::Templates(templates) if index.cannot_remove() => {
                        let missing: Vec<&(u64, Vec<f32>)> = templates
                            .iter()
                            .filter(|(id, _)| index.holds(*id) == Some(false))
                            .collect();
                        missing
                            .into_iter()
                            .try_for_each(|(id, embedding)| index.add(*id, embedding))
                    }
                    IndexChange::Templates(templates) => {
                        let ids: Vec<u64> = templates.iter().map(|(id, _)| *id).collect();
                        index.remove(&ids).and_then(|_| {
                            templates
                                .iter()
                                .try_for_each(|(id, embedding)| index.add(*id, embedding))
                        })
                    }
                    IndexChange::Erased(ids) => {
                        erased = true;
                        index.remove(ids).map(|_| ())
                    }
                };
                match added {
                    Ok(()) => {}
                    // HNSW and product codes cannot remove (only asked when they hold one of
                    // the ids), and an add FAISS refused may have left a change half applied:
                    // built again below from the store, which holds the change.
                    Err(error) => {
                        if !matches!(error, IdentityError::RemoveUnsupported) {
                            tracing::warn!(%error, "applying an index change failed; rebuilding");
                        }
                        rebuild = true;
                    }
                }
            }
            if rebuild {
                self.rebuild()?;
            }
            self.synced_version = up_to;
        }
        if applied > 0 {
            self.changed();
        }
        if erased {
            // As for an erasure made here: the index file must not keep the face.
            self.save();
        }
        Ok(applied)
    }
}

/// Enroll a customer (the ledger account is opened by the caller first).
#[derive(Message)]
#[rtype(result = "Result<CustomerView, EnrollError>")]
pub struct CreateCustomerCmd(pub CreateCustomer);

impl Handler<CreateCustomerCmd> for IdentityActor {
    type Result = Result<CustomerView, EnrollError>;
    fn handle(&mut self, msg: CreateCustomerCmd, _: &mut Self::Context) -> Self::Result {
        Ok(self.store.create(&msg.0)?)
    }
}

/// Read a customer.
#[derive(Message)]
#[rtype(result = "Result<Option<CustomerView>, EnrollError>")]
pub struct GetCustomer(pub String);

impl Handler<GetCustomer> for IdentityActor {
    type Result = Result<Option<CustomerView>, EnrollError>;
    fn handle(&mut self, msg: GetCustomer, _: &mut Self::Context) -> Self::Result {
        Ok(self.store.view(&msg.0)?)
    }
}

/// Add a live, quality-checked face to a customer, unless it is someone else's.
#[derive(Message)]
#[rtype(result = "Result<(FaceAdded, TemplateUpdate), EnrollError>")]
pub struct AddTemplateCmd {
    /// The customer.
    pub customer_id: String,
    /// The face's embedding.
    pub embedding: Vec<f32>,
    /// Its liveness score, reported back.
    pub liveness: f32,
    /// Accounts confirmed to be other people who look alike.
    pub look_alikes: Vec<String>,
}

impl Handler<AddTemplateCmd> for IdentityActor {
    type Result = Result<(FaceAdded, TemplateUpdate), EnrollError>;
    fn handle(&mut self, msg: AddTemplateCmd, _: &mut Self::Context) -> Self::Result {
        self.add_template(msg)
    }
}

impl IdentityActor {
    /// See [`AddTemplateCmd`].
    pub fn add_template(
        &mut self,
        msg: AddTemplateCmd,
    ) -> Result<(FaceAdded, TemplateUpdate), EnrollError> {
        if self.store.get(&msg.customer_id)?.is_none() {
            return Err(CustomerError::NotFound(msg.customer_id).into());
        }
        // Search before insert: the same face under another account is a probable duplicate.
        if self.index_len() > 0 {
            for (owner, score) in
                best_customers(&self.index, &self.store, &msg.embedding, SEARCH_K)?
            {
                if owner != msg.customer_id
                    && score >= self.config.duplicate_threshold
                    && !msg.look_alikes.contains(&owner)
                {
                    return Err(CustomerError::Conflict(format!(
                        "probable duplicate: this face matches another enrolled customer \
                         (cosine {score:.3}); if they are different people (twins), confirm \
                         with confirmed_look_alike_of"
                    ))
                    .into());
                }
            }
        }
        let (template_id, record) = self
            .store
            .add_template(&msg.customer_id, msg.embedding.clone())?;
        let added = write(&self.index).add(template_id, &msg.embedding);
        if let Err(error) = added {
            // The store holds the template now: the index is built again from it.
            tracing::warn!(%error, "adding to the identity index failed; rebuilding it");
            self.rebuild()?;
        }
        self.changed();
        let added = FaceAdded {
            template_id,
            liveness: msg.liveness,
            faces: record.templates.len(),
        };
        let update = TemplateUpdate {
            version: record.version,
            change: TemplateChange::Upsert(record.hot_entry(&msg.customer_id)),
        };
        Ok((added, update))
    }
}

/// Erase a customer's personal data and templates.
#[derive(Message)]
#[rtype(result = "Result<(usize, TemplateUpdate), EnrollError>")]
pub struct EraseCustomer(pub String);

impl Handler<EraseCustomer> for IdentityActor {
    type Result = Result<(usize, TemplateUpdate), EnrollError>;
    fn handle(&mut self, msg: EraseCustomer, _: &mut Self::Context) -> Self::Result {
        self.erase(msg)
    }
}

impl IdentityActor {
    /// See [`EraseCustomer`].
    pub fn erase(&mut self, msg: EraseCustomer) -> Result<(usize, TemplateUpdate), EnrollError> {
        let (ids, version) = self.store.erase(&msg.0)?;
        let removed = write(&self.index).remove(&ids);
        match removed {
            Ok(_) => {}
            Err(IdentityError::RemoveUnsupported) => self.rebuild()?,
            Err(e) => return Err(e.into()),
        }
        self.changed();
        // Erasure must not wait for the timer: the index file would still hold the face.
        self.save();
        Ok((
            ids.len(),
            TemplateUpdate {
                version,
                change: TemplateChange::Revoke {
                    account_id: msg.0.into(),
                },
            },
        ))
    }
}

/// A hub's identify request.
#[derive(Message)]
#[rtype(result = "Result<CloudIdentified, EnrollError>")]
pub struct IdentifyCmd(pub CloudIdentify);

/// Answers hubs' identify requests; several run at once on one index (a `SyncArbiter` of
/// `identity.search_threads`), apart from enrollment and from the ledger.
#[derive(Clone)]
pub struct Searcher {
    index: SharedIndex,
    store: CustomerStore,
    config: IdentityConfig,
    /// Each 1:N search's time, when shown.
    search_seconds: Option<prometheus::Histogram>,
}

impl Actor for Searcher {
    type Context = SyncContext<Self>;
}

impl Handler<IdentifyCmd> for Searcher {
    type Result = Result<CloudIdentified, EnrollError>;
    fn handle(&mut self, msg: IdentifyCmd, _: &mut Self::Context) -> Self::Result {
        self.identify(msg)
    }
}

impl IdentityActor {
    /// See [`IdentifyCmd`]; what a [`Searcher`] of this actor answers.
    pub fn identify(&self, msg: IdentifyCmd) -> Result<CloudIdentified, EnrollError> {
        self.searcher().identify(msg)
    }
}

impl Searcher {
    /// Shows each 1:N search's time on `histogram`.
    pub fn with_search_seconds(mut self, histogram: prometheus::Histogram) -> Self {
        self.search_seconds = Some(histogram);
        self
    }

    /// See [`IdentifyCmd`].
    pub fn identify(&self, msg: IdentifyCmd) -> Result<CloudIdentified, EnrollError> {
        protocol::validate_embedding(&msg.0.embedding).map_err(CustomerError::Invalid)?;
        let entry = |store: &CustomerStore, id: &str| -> Result<Option<HotEntry>, EnrollError> {
            Ok(store.get(id)?.map(|r| r.hot_entry(id)))
        };
        let mut candidates = Vec::new();
        match &msg.0.account_id {
            // 1:1 (a code names the account): its templates and second factor go out only for a
            // face the hub could match. Naming an account is no way to read its templates or its
            // factor's hash.
            Some(account_id) => candidates.extend(entry(&self.store, account_id)?.filter(|e| {
                e.templates
                    .iter()
                    .map(|(_, t)| face::cosine(t, &msg.0.embedding))
                    .fold(f32::MIN, f32::max)
                    >= self.config.one_to_one_threshold
            })),
            None => {
                let started = std::time::Instant::now();
                let best = best_customers(&self.index, &self.store, &msg.0.embedding, SEARCH_K)?;
                if let Some(histogram) = &self.search_seconds {
                    histogram.observe(started.elapsed().as_secs_f64());
                }
                for (owner, score) in best.into_iter().take(2) {
                    if score >= self.config.candidate_threshold {
                        candidates.extend(entry(&self.store, &owner)?);
                    }
                }
            }
        }
        Ok(CloudIdentified { candidates })
    }
}

/// A hub's second-factor result, counted across the fleet.
#[derive(Message)]
#[rtype(result = "Result<protocol::LockoutBatch, EnrollError>")]
pub struct FactorReportCmd(pub protocol::FactorReport);

/// Most accounts one report may name (a challenge asks a handful of look-alikes).
pub const MAX_REPORTED_ACCOUNTS: usize = 8;

impl Handler<FactorReportCmd> for IdentityActor {
    type Result = Result<protocol::LockoutBatch, EnrollError>;
    fn handle(&mut self, msg: FactorReportCmd, _: &mut Self::Context) -> Self::Result {
        let mut report = msg.0;
        report.failed.sort();
        report.failed.dedup();
        if report.failed.len() > MAX_REPORTED_ACCOUNTS
            || (report.failed.is_empty() == report.passed.is_none())
        {
            return Err(CustomerError::Invalid(format!(
                "a second-factor report names 1 to {MAX_REPORTED_ACCOUNTS} failed accounts or \
                 the one that passed"
            ))
            .into());
        }
        for account in report.failed.iter().chain(report.passed.iter()) {
            protocol::validate_id("account_id", account)
                .map_err(|e| CustomerError::Invalid(e.to_string()))?;
        }
        let entries =
            self.store
                .report_factor(&report, self.config.lockout_policy(), self.clock.now_ms())?;
        Ok(protocol::LockoutBatch { entries })
    }
}

/// A hub's template sync.
#[derive(Message)]
#[rtype(result = "Result<TemplateBatch, EnrollError>")]
pub struct TemplateSyncCmd {
    /// The hub's store.
    pub store_id: String,
    /// Its cursor.
    pub after_version: u64,
}

impl Handler<TemplateSyncCmd> for IdentityActor {
    type Result = Result<TemplateBatch, EnrollError>;
    fn handle(&mut self, msg: TemplateSyncCmd, _: &mut Self::Context) -> Self::Result {
        Ok(self.store.changes_after(&msg.store_id, msg.after_version)?)
    }
}

/// Refuse an id that is enrolled or was erased, before anything is opened for it.
#[derive(Message)]
#[rtype(result = "Result<(), EnrollError>")]
pub struct CheckNewCustomer(pub String);

impl Handler<CheckNewCustomer> for IdentityActor {
    type Result = Result<(), EnrollError>;
    fn handle(&mut self, msg: CheckNewCustomer, _: &mut Self::Context) -> Self::Result {
        Ok(self.store.check_new(&msg.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{synthetic, CreateCustomer, SecondFactorKind};

    fn customer(id: &str) -> CreateCustomer {
        CreateCustomer {
            customer_id: id.into(),
            name: "N".into(),
            phone: "0612345678".into(),
            pin: "1234".into(),
            second_factor: SecondFactorKind::Pin,
            home_store_id: "s1".into(),
            currency: "EUR".into(),
            initial_balance_minor: 0,
            public_key: None,
        }
    }

    fn add(
        actor: &mut IdentityActor,
        id: &str,
        embedding: &[f32],
        look_alikes: &[&str],
    ) -> Result<(FaceAdded, TemplateUpdate), EnrollError> {
        actor.add_template(AddTemplateCmd {
            customer_id: id.into(),
            embedding: embedding.to_vec(),
            liveness: 1.0,
            look_alikes: look_alikes.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// One small index of each kind.
    fn every_index_kind() -> [IndexKind; 5] {
        [
            IndexKind::Flat,
            IndexKind::Ivf {
                nlist: 4,
                nprobe: 4,
            },
            IndexKind::IvfSq8 {
                nlist: 4,
                nprobe: 4,
            },
            IndexKind::Hnsw {
                m: 16,
                ef_search: 32,
            },
            IndexKind::PqRefine {
                m: 16,
                k_factor: 64,
            },
        ]
    }

    #[test]
    fn duplicates_look_alikes_identify_and_erasure_for_every_index_type() {
        for kind in every_index_kind() {
            let dir = tempfile::tempdir().unwrap();
            let store =
                CustomerStore::open(&dir.path().join("db"), &dir.path().join("k.key")).unwrap();
            let gauge = prometheus::IntGauge::new("g", "g").unwrap();
            let path = dir.path().join("identity.faiss");
            let config = IdentityConfig {
                index: kind,
                ..IdentityConfig::default()
            };
            let mut actor =
                IdentityActor::open(store.clone(), path.clone(), config.clone(), gauge.clone())
                    .unwrap();
            let mut rng = synthetic::Rng::new(3);
            let faces: Vec<Vec<f32>> = (0..30).map(|_| synthetic::template(&mut rng)).collect();
            for (i, face) in faces.iter().enumerate() {
                let id = format!("c{i}");
                store.create(&customer(&id)).unwrap();
                add(&mut actor, &id, face, &[]).unwrap();
            }
            // The same face under another account is refused, unless confirmed as a look-alike.
            store.create(&customer("twin")).unwrap();
            let twin_face = synthetic::probe(&mut rng, &faces[3], 0.9);
            let err = add(&mut actor, "twin", &twin_face, &[]).unwrap_err();
            assert!(
                err.to_string().contains("probable duplicate"),
                "{kind:?}: {err}"
            );
            add(&mut actor, "twin", &twin_face, &["c3"]).unwrap();

            let probe = synthetic::probe(&mut rng, &faces[7], 0.7);
            let found = actor
                .identify(IdentifyCmd(CloudIdentify {
                    embedding: probe.clone(),
                    account_id: None,
                }))
                .unwrap();
            assert_eq!(found.candidates[0].account_id, "c7", "{kind:?}");
            let one = actor
                .identify(IdentifyCmd(CloudIdentify {
                    embedding: probe.clone(),
                    account_id: Some("c7".into()),
                }))
                .unwrap();
            assert_eq!(one.candidates.len(), 1);
            assert_eq!(one.candidates[0].account_id, "c7");
            // Another account's face, or none at all, reads nothing of the account named.
            let stranger = synthetic::template(&mut rng);
            for (embedding, who) in [(probe.clone(), "c9"), (stranger, "c7")] {
                let none = actor
                    .identify(IdentifyCmd(CloudIdentify {
                        embedding,
                        account_id: Some(who.into()),
                    }))
                    .unwrap();
                assert!(none.candidates.is_empty(), "{kind:?}: {who}");
            }

            // Erasure: gone from the index (HNSW is rebuilt), and from the index file at once.
            let (removed, update) = actor.erase(EraseCustomer("c7".into())).unwrap();
            assert_eq!(removed, 1);
            assert_eq!(
                update.change,
                TemplateChange::Revoke {
                    account_id: "c7".into()
                }
            );
            let after = actor
                .identify(IdentifyCmd(CloudIdentify {
                    embedding: probe,
                    account_id: None,
                }))
                .unwrap();
            assert!(
                after.candidates.iter().all(|c| c.account_id != "c7"),
                "{kind:?}"
            );
            assert_eq!(gauge.get(), 30);
            drop(actor);
            if matches!(kind, IndexKind::IvfSq8 { .. }) {
                assert!(!path.exists(), "an 8-bit IVF is never written to disk");
                continue;
            }
            let (reopened, rebuilt) =
                IdentityIndex::open_or_rebuild(&path, kind, 30, 0, &store.sealer(), Vec::new)
                    .unwrap();
            assert!(
                !rebuilt,
                "{kind:?}: the saved file already lacks the erased face"
            );
            assert_eq!(reopened.len(), 30);
        }
    }

    /// Two instances on one store: the enrollments and erasures one makes reach the other's
    /// index through the change log, and applying the log again changes nothing.
    fn an_instances_index_follows_what_another_enrolls_and_erases() {
        for kind in every_index_kind() {
            let dir = tempfile::tempdir().unwrap();
            let location = crate::engines::location(&dir.path().join("db"));
            let store = CustomerStore::open_at(&location, &dir.path().join("k.key")).unwrap();
            let config = IdentityConfig {
                index: kind,
                ..IdentityConfig::default()
            };
            let open = |name: &str| {
                let gauge = prometheus::IntGauge::new("g", "g").unwrap();
                IdentityActor::open(store.clone(), dir.path().join(name), config.clone(), gauge)
                    .unwrap()
            };
            let (mut one, mut two) = (open("one.faiss"), open("two.faiss"));
            let mut rng = synthetic::Rng::new(5);
            let faces: Vec<Vec<f32>> = (0..20).map(|_| synthetic::template(&mut rng)).collect();
            for (i, face) in faces.iter().enumerate() {
                let id = format!("c{i}");
                store.create(&customer(&id)).unwrap();
                add(&mut one, &id, face, &[]).unwrap();
            }
            let search = |actor: &mut IdentityActor, face: &[f32]| {
                actor
                    .identify(IdentifyCmd(CloudIdentify {
                        embedding: face.to_vec(),
                        account_id: None,
                    }))
                    .unwrap()
                    .candidates
                    .into_iter()
                    .map(|c| c.account_id.to_string())
                    .collect::<Vec<_>>()
            };
            let probe = synthetic::probe(&mut rng, &faces[3], 0.7);
            assert!(search(&mut two, &probe).is_empty(), "{kind:?}");
            assert!(two.sync_index().unwrap() > 0);
            assert_eq!(
                search(&mut two, &probe).first().map(String::as_str),
                Some("c3")
            );
            assert_eq!(two.index_len(), 20, "{kind:?}");
            // Nothing new: nothing applied; the log applied again: the same index.
            assert_eq!(two.sync_index().unwrap(), 0);
            two.synced_version = 0;
            two.sync_index().unwrap();
            assert_eq!(two.index_len(), 20, "{kind:?}: applying twice adds nothing");

            one.erase(EraseCustomer("c3".into())).unwrap();
            assert_eq!(two.sync_index().unwrap(), 1, "{kind:?}");
            assert!(
                !search(&mut two, &probe).contains(&"c3".to_string()),
                "{kind:?}"
            );
            assert_eq!(two.index_len(), 19, "{kind:?}");

            // Instance two stops (an erasure it applied was saved at once); meanwhile one
            // erases a customer and enrolls another: the same count of templates. Reopened, two
            // reads its file back and replays the log from the version the file was saved at.
            drop(two);
            one.erase(EraseCustomer("c4".into())).unwrap();
            let newcomer = synthetic::template(&mut rng);
            store.create(&customer("c20")).unwrap();
            add(&mut one, "c20", &newcomer, &[]).unwrap();
            let mut two = open("two.faiss");
            assert_eq!(two.index_len(), 19, "{kind:?}: the file was reused");
            let replayed = two.sync_index().unwrap();
            if !matches!(kind, IndexKind::IvfSq8 { .. }) {
                // (An 8-bit IVF is never written: built again from the store at each start.)
                assert!(
                    replayed >= 2,
                    "{kind:?}: the log replayed from the file's version"
                );
            }
            let probe = synthetic::probe(&mut rng, &newcomer, 0.7);
            assert_eq!(
                search(&mut two, &probe).first().map(String::as_str),
                Some("c20"),
                "{kind:?}"
            );
            assert_eq!(two.index_len(), 19, "{kind:?}");
        }
    }

    crate::engines::on_each_engine!(an_instances_index_follows_what_another_enrolls_and_erases);
}
