//! The ordered key-value store the hub's journal and the cloud's ledger are written against:
//! `sled` on disk (what every tier runs), or [`MemoryDb`], an in-memory store with the same
//! semantics for the deterministic simulation, where sled's cost is in the way: each sled
//! transaction seals a log buffer and wakes sled's writer threads, which is most of a simulated
//! seed's time and none of what the simulation checks.
//!
//! The API is sled's own (the same method names, arguments, results and error types), so code
//! written against it reads as sled code: [`Db`] and [`Tree`] wrap `sled::Db` and `sled::Tree`,
//! [`Transactional`] runs a closure over one tree or a tuple of up to eight, all-or-nothing, and
//! [`TransactionalTree`] is what the closure reads and writes. Every sled call is passed through
//! as is.
//!
//! The in-memory store keeps sled's guarantees that the journal and ledger rely on: a
//! transaction's writes are applied all at once or not at all (an abort leaves nothing behind);
//! transactions and single writes are serialised (one writer at a time), so a transaction never
//! reads a value another writer changes before it commits; ids from `generate_id` never repeat
//! within a store, across reopenings too. It has no durability and no flushes: a [`MemoryDb`] is
//! the "disk", and a process that reopens a [`Db`] on the same [`MemoryDb`] finds what it wrote.

// Without the `sim` feature nothing can make a memory database (`Db::memory`), so its code is
// never reached.
#![cfg_attr(not(any(test, feature = "sim")), allow(dead_code))]

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    ops::{Bound, Deref, RangeBounds},
    path::Path,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use crate::pg::{PgDb, PgTx};

pub use sled::{
    transaction::{
        ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
        TransactionResult, UnabortableTransactionError,
    },
    CompareAndSwapError, IVec,
};

/// sled's result type.
pub type Result<T> = sled::Result<T>;

/// What a read or write within a transaction returns (sled's, which it keeps private).
pub type UnabortableTransactionResult<T> = std::result::Result<T, UnabortableTransactionError>;

/// The least key greater than every key starting with `prefix`; `None` when there is none
/// (the prefix is empty or all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The name of the tree a [`Db`] reads and writes itself (sled's default tree).
const DEFAULT_TREE: &str = "__sled__default";

/// An in-memory store: what a [`Db`] opened on it reads and writes, kept for as long as a handle
/// to it lives. Clones share it (a process that "restarts" reopens the same store; a wiped disk
/// is a new one).
#[derive(Clone, Default)]
pub struct MemoryDb {
    shared: Arc<MemoryShared>,
}

#[derive(Default)]
struct MemoryShared {
    trees: Mutex<HashMap<String, BTreeMap<Vec<u8>, IVec>>>,
    /// Held by every write, single or transactional: one writer at a time.
    writer: Mutex<()>,
    next_id: AtomicU64,
}

impl MemoryDb {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn trees(&self) -> MutexGuard<'_, HashMap<String, BTreeMap<Vec<u8>, IVec>>> {
        // A panic while the lock was held left no partial write (writes are applied under it
        // in one step), so the data is whole.
        self.shared
            .trees
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.shared
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read<T>(&self, tree: &str, f: impl FnOnce(Option<&BTreeMap<Vec<u8>, IVec>>) -> T) -> T {
        f(self.trees().get(tree))
    }

    fn write<T>(&self, tree: &str, f: impl FnOnce(&mut BTreeMap<Vec<u8>, IVec>) -> T) -> T {
        let _writer = self.writer();
        f(self.trees().entry(tree.to_owned()).or_default())
    }

    fn generate_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::SeqCst)
    }
}

/// What a write must find to commit ([`Tree::fenced`]): the `holder` value at `key` of `tree`.
/// A lease's holder and epoch are written there when it is taken; a process that lost the lease
/// (another took it, with a higher epoch) can no longer commit under the old one, whatever it
/// believes about time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The tree holding the lease's holder.
    pub tree: String,
    /// The lease's key.
    pub key: Vec<u8>,
    /// The value the key must hold.
    pub holder: Vec<u8>,
}

/// What the message of a storage error refused by its fence starts with.
pub const FENCED: &str = "fenced:";

/// Whether a storage error is a transaction refused by its fence (nothing was written).
pub fn is_fenced(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Unsupported(message) if message.starts_with(FENCED))
}

/// Where a database lives, as a tier's configuration names it. Shown (and debugged) without the
/// connection string's credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// sled, in this directory: one process at a time.
    Sled(std::path::PathBuf),
    /// PostgreSQL: the `schema` of the database at `url`, shared by any number of processes.
    Postgres {
        /// `postgresql://user@host:port/database`.
        url: String,
        /// The schema holding the tables (a lowercase identifier).
        schema: String,
        /// TLS to the server (required, the server's certificate checked, this process's
        /// presented); `None`: plain, for a server on this machine's loopback only.
        tls: Option<PgTls>,
    },
}

/// The TLS a PostgreSQL connection is made with.
#[derive(Clone)]
pub struct PgTls(pub Arc<rustls::ClientConfig>);

impl PartialEq for PgTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PgTls {}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgTls")
    }
}

impl Location {
    /// This location, reached over `tls` when it is PostgreSQL's.
    pub fn with_tls(self, tls: Option<PgTls>) -> Self {
        match self {
            Location::Postgres { url, schema, .. } => Location::Postgres { url, schema, tls },
            sled => sled,
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sled(path) => write!(f, "{}", path.display()),
            // The URL may carry a password (before the host, or as a parameter): only the
            // hosts and the database are shown.
            Location::Postgres { url, schema, tls } => match url.parse::<postgres::Config>() {
                Ok(config) => {
                    let hosts: Vec<String> = config
                        .get_hosts()
                        .iter()
                        .map(|host| match host {
                            postgres::config::Host::Tcp(name) => name.clone(),
                            postgres::config::Host::Unix(path) => path.display().to_string(),
                        })
                        .collect();
                    write!(
                        f,
                        "postgresql {} database {} schema {schema}{}",
                        hosts.join(","),
                        config.get_dbname().unwrap_or("(default)"),
                        if tls.is_some() { " over TLS" } else { "" }
                    )
                }
                Err(_) => write!(f, "postgresql (a connection string that does not parse)"),
            },
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

/// A database: sled's, or one over a [`MemoryDb`]. It reads and writes its default tree itself
/// (`Deref<Target = Tree>`), as `sled::Db` does.
#[derive(Clone)]
pub struct Db {
    backend: DbBackend,
    default: Tree,
}

#[derive(Clone)]
enum DbBackend {
    Sled(sled::Db),
    Memory(MemoryDb),
    Postgres(PgDb),
}

impl Db {
    /// Opens (or creates) a sled database in a directory, waiting for its lock
    /// ([`crate::open_sled`]).
    pub fn open(path: &Path) -> Result<Db> {
        let db = crate::open_sled(path)?;
        let default = Tree(TreeBackend::Sled(sled::Tree::clone(&db)));
        Ok(Db {
            backend: DbBackend::Sled(db),
            default,
        })
    }

    /// A database over an in-memory store: no durability, so only builds with the `sim`
    /// feature (the simulation's) have it, never a tier.
    #[cfg(any(test, feature = "sim"))]
    pub fn memory(store: &MemoryDb) -> Db {
        Db {
            backend: DbBackend::Memory(store.clone()),
            default: Tree::memory(store, DEFAULT_TREE),
        }
    }

    /// Opens (or creates) the database at `location`.
    pub fn open_at(location: &Location) -> Result<Db> {
        match location {
            Location::Sled(path) => Db::open(path),
            Location::Postgres { url, schema, tls } => {
                Db::postgres_over(url, schema, tls.as_ref().map(|t| Arc::clone(&t.0)))
            }
        }
    }

    /// Opens (or creates) a database in PostgreSQL: the `kv` table and `ids` sequence of
    /// `schema` in the database at `url` (see [`crate::pg`]). Several processes may open the same
    /// one at once; their transactions are serializable.
    pub fn postgres(url: &str, schema: &str) -> Result<Db> {
        Self::postgres_over(url, schema, None)
    }

    /// [`Db::postgres`] over TLS when `tls` is given (required: never plain, whatever the
    /// server offers).
    pub fn postgres_over(
        url: &str,
        schema: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Db> {
        let db = PgDb::open(url, schema, tls)?;
        Ok(Db {
            default: Tree(TreeBackend::Postgres {
                db: db.clone(),
                name: DEFAULT_TREE.into(),
                fence: None,
            }),
            backend: DbBackend::Postgres(db),
        })
    }

    /// Opens (or creates) a tree.
    pub fn open_tree(&self, name: &str) -> Result<Tree> {
        match &self.backend {
            DbBackend::Sled(db) => Ok(Tree(TreeBackend::Sled(db.open_tree(name)?))),
            DbBackend::Memory(store) => Ok(Tree::memory(store, name)),
            DbBackend::Postgres(db) => Ok(Tree(TreeBackend::Postgres {
                db: db.clone(),
                name: name.into(),
                fence: None,
            })),
        }
    }

    /// An id never returned before by this database.
    pub fn generate_id(&self) -> Result<u64> {
        match &self.backend {
            DbBackend::Sled(db) => db.generate_id(),
            DbBackend::Memory(store) => Ok(store.generate_id()),
            DbBackend::Postgres(db) => db.generate_id(),
        }
    }

    /// Writes everything to disk (sled); nothing to do in memory, nor in PostgreSQL (a commit
    /// is durable when it returns).
    pub fn flush(&self) -> Result<usize> {
        match &self.backend {
            DbBackend::Sled(db) => db.flush(),
            DbBackend::Memory(_) | DbBackend::Postgres(_) => Ok(0),
        }
    }
}

impl Deref for Db {
    type Target = Tree;
    fn deref(&self) -> &Tree {
        &self.default
    }
}

/// An ordered map of byte keys to byte values within a [`Db`].
#[derive(Clone)]
pub struct Tree(TreeBackend);

#[derive(Clone)]
enum TreeBackend {
    Sled(sled::Tree),
    Memory {
        store: MemoryDb,
        name: Arc<str>,
    },
    Postgres {
        db: PgDb,
        name: Arc<str>,
        fence: Option<Arc<Fence>>,
    },
}

impl Tree {
    fn memory(store: &MemoryDb, name: &str) -> Tree {
        Tree(TreeBackend::Memory {
            store: store.clone(),
            name: name.into(),
        })
    }

    /// This tree, with every transaction over it held to `fence`: it commits only while the
    /// fence's key holds the fence's value, read in the transaction itself. Only a PostgreSQL
    /// database is shared by several processes; sled and memory databases have one writer by
    /// construction, so their trees are returned as they are.
    pub fn fenced(&self, fence: &Arc<Fence>) -> Tree {
        match &self.0 {
            TreeBackend::Postgres { db, name, .. } => Tree(TreeBackend::Postgres {
                db: db.clone(),
                name: Arc::clone(name),
                fence: Some(Arc::clone(fence)),
            }),
            _ => self.clone(),
        }
    }

    /// The value of a key.
    pub fn get<K: AsRef<[u8]>>(&self, key: K) -> Result<Option<IVec>> {
        match &self.0 {
            TreeBackend::Sled(tree) => tree.get(key),
            TreeBackend::Memory { store, name } => {
                Ok(store.read(name, |t| t.and_then(|t| t.get(key.as_ref()).cloned())))
            }
            TreeBackend::Postgres { db, name, .. } => db.get(name, key.as_ref()),
        }
    }

    /// Whether a key has a value.
    pub fn contains_key<K: AsRef<[u8]>>(&self, key: K) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Sets a key's value; returns the value it replaced.
    pub fn insert<K: AsRef<[u8]>, V: Into<IVec>>(&self, key: K, value: V) -> Result<Option<IVec>> {
        match &self.0 {
            TreeBackend::Sled(tree) => tree.insert(key, value),
            TreeBackend::Memory { store, name } => {
                Ok(store.write(name, |t| t.insert(key.as_ref().to_vec(), value.into())))
            }
            TreeBackend::Postgres { .. } => {
                let value = value.into();
                self.single(|t| t.insert(key.as_ref(), value.clone()))
            }
        }
    }

    /// Removes a key; returns the value it had.
    pub fn remove<K: AsRef<[u8]>>(&self, key: K) -> Result<Option<IVec>> {
        match &self.0 {
            TreeBackend::Sled(tree) => tree.remove(key),
            TreeBackend::Memory { store, name } => {
                Ok(store.write(name, |t| t.remove(key.as_ref())))
            }
            TreeBackend::Postgres { .. } => self.single(|t| t.remove(key.as_ref())),
        }
    }

    /// Sets a key to `new` (`None`: removes it) only if its value is `old` (`None`: absent).
    pub fn compare_and_swap<K, OV, NV>(
        &self,
        key: K,
        old: Option<OV>,
        new: Option<NV>,
    ) -> Result<std::result::Result<(), CompareAndSwapError>>
    where
        K: AsRef<[u8]>,
        OV: AsRef<[u8]>,
        NV: Into<IVec>,
    {
        match &self.0 {
            TreeBackend::Sled(tree) => tree.compare_and_swap(key, old, new),
            TreeBackend::Memory { store, name } => Ok(store.write(name, |t| {
                let current = t.get(key.as_ref()).cloned();
                if current.as_deref() != old.as_ref().map(|o| o.as_ref()) {
                    return Err(CompareAndSwapError {
                        current,
                        proposed: new.map(Into::into),
                    });
                }
                match new {
                    Some(new) => t.insert(key.as_ref().to_vec(), new.into()),
                    None => t.remove(key.as_ref()),
                };
                Ok(())
            })),
            TreeBackend::Postgres { .. } => {
                let new: Option<IVec> = new.map(Into::into);
                self.single(|t| {
                    let current = t.get(key.as_ref())?;
                    if current.as_deref() != old.as_ref().map(|o| o.as_ref()) {
                        return Ok(Err(CompareAndSwapError {
                            current,
                            proposed: new.clone(),
                        }));
                    }
                    match &new {
                        Some(new) => t.insert(key.as_ref(), new.clone())?,
                        None => t.remove(key.as_ref())?,
                    };
                    Ok(Ok(()))
                })
            }
        }
    }

    /// One write on its own, as a transaction of its own (PostgreSQL).
    fn single<A>(
        &self,
        f: impl Fn(&TransactionalTree) -> UnabortableTransactionResult<A>,
    ) -> Result<A> {
        match Transactional::<()>::transaction(self, |t| Ok(f(t)?)) {
            Ok(answer) => Ok(answer),
            Err(TransactionError::Storage(e)) => Err(e),
            Err(TransactionError::Abort(())) => unreachable!("a single write never aborts"),
        }
    }

    /// Every pair, in key order.
    pub fn iter(&self) -> Iter {
        match &self.0 {
            TreeBackend::Sled(tree) => Iter(IterBackend::Sled(tree.iter())),
            TreeBackend::Memory { .. } | TreeBackend::Postgres { .. } => {
                self.snapshot(Bound::Unbounded, Bound::Unbounded)
            }
        }
    }

    /// The pairs whose keys are in `range`, in key order.
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        match &self.0 {
            TreeBackend::Sled(tree) => Iter(IterBackend::Sled(tree.range(range))),
            TreeBackend::Memory { .. } | TreeBackend::Postgres { .. } => self.snapshot(
                range.start_bound().map(|k| k.as_ref().to_vec()),
                range.end_bound().map(|k| k.as_ref().to_vec()),
            ),
        }
    }

    /// The pairs whose keys start with `prefix`, in key order.
    pub fn scan_prefix<P: AsRef<[u8]>>(&self, prefix: P) -> Iter {
        match &self.0 {
            TreeBackend::Sled(tree) => Iter(IterBackend::Sled(tree.scan_prefix(prefix))),
            TreeBackend::Memory { .. } | TreeBackend::Postgres { .. } => {
                let prefix = prefix.as_ref().to_vec();
                let end = match prefix_end(&prefix) {
                    Some(end) => Bound::Excluded(end),
                    None => Bound::Unbounded,
                };
                let Iter(IterBackend::Memory(pairs)) =
                    self.snapshot(Bound::Included(prefix.clone()), end)
                else {
                    unreachable!("a memory tree snapshots in memory")
                };
                let pairs: Vec<_> = pairs.take_while(|(k, _)| k.starts_with(&prefix)).collect();
                Iter(IterBackend::Memory(pairs.into_iter()))
            }
        }
    }

    /// The pair with the lowest key.
    pub fn first(&self) -> Result<Option<(IVec, IVec)>> {
        self.iter().next().transpose()
    }

    /// The pair with the highest key.
    pub fn last(&self) -> Result<Option<(IVec, IVec)>> {
        self.iter().next_back().transpose()
    }

    /// How many keys have values.
    pub fn len(&self) -> usize {
        match &self.0 {
            TreeBackend::Sled(tree) => tree.len(),
            TreeBackend::Memory { store, name } => store.read(name, |t| t.map_or(0, |t| t.len())),
            // sled's `len` cannot fail either; a database that cannot be read stops the caller
            // at its next transaction.
            TreeBackend::Postgres { db, name, .. } => db.len(name).unwrap_or(0),
        }
    }

    /// Whether no key has a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the tree's database to disk (sled); nothing to do in memory or PostgreSQL.
    pub fn flush(&self) -> Result<usize> {
        match &self.0 {
            TreeBackend::Sled(tree) => tree.flush(),
            TreeBackend::Memory { .. } | TreeBackend::Postgres { .. } => Ok(0),
        }
    }

    /// A copy of the pairs within bounds, taken at once (later writes do not show in it).
    fn snapshot(&self, start: Bound<Vec<u8>>, end: Bound<Vec<u8>>) -> Iter {
        // sled answers an empty or inverted range with nothing; BTreeMap::range panics on it.
        let empty = match (&start, &end) {
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e))
            | (Bound::Excluded(s), Bound::Included(e)) => s >= e,
            _ => false,
        };
        let pairs: Vec<(IVec, IVec)> = if empty {
            Vec::new()
        } else if let TreeBackend::Postgres { db, name, .. } = &self.0 {
            match db.range(name, start, end) {
                Ok(pairs) => pairs,
                // sled reports a failed scan through its iterator: so does this one.
                Err(e) => return Iter(IterBackend::Failed(Some(e))),
            }
        } else {
            let TreeBackend::Memory { store, name } = &self.0 else {
                unreachable!("only memory and postgres trees are snapshotted")
            };
            store.read(name, |t| {
                t.map(|t| {
                    t.range::<Vec<u8>, _>((start, end))
                        .map(|(k, v)| (IVec::from(k.as_slice()), v.clone()))
                        .collect()
                })
                .unwrap_or_default()
            })
        };
        Iter(IterBackend::Memory(pairs.into_iter()))
    }
}

/// Pairs of a tree in key order, from either end.
pub struct Iter(IterBackend);

// An iterator lives on its caller's stack for one scan: boxing sled's (the large one, the one
// every tier uses) would cost an allocation per scan to save stack the memory one never needs.
#[allow(clippy::large_enum_variant)]
enum IterBackend {
    Sled(sled::Iter),
    /// Pairs read at once (memory, PostgreSQL).
    Memory(std::vec::IntoIter<(IVec, IVec)>),
    /// A scan that failed: its error, then nothing.
    Failed(Option<sled::Error>),
}

impl Iter {
    /// The keys alone.
    pub fn keys(self) -> impl DoubleEndedIterator<Item = Result<IVec>> {
        self.map(|pair| pair.map(|(k, _)| k))
    }

    /// The values alone.
    pub fn values(self) -> impl DoubleEndedIterator<Item = Result<IVec>> {
        self.map(|pair| pair.map(|(_, v)| v))
    }
}

impl Iterator for Iter {
    type Item = Result<(IVec, IVec)>;
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            IterBackend::Sled(iter) => iter.next(),
            IterBackend::Memory(pairs) => pairs.next().map(Ok),
            IterBackend::Failed(error) => error.take().map(Err),
        }
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        match &mut self.0 {
            IterBackend::Sled(iter) => iter.next_back(),
            IterBackend::Memory(pairs) => pairs.next_back().map(Ok),
            IterBackend::Failed(error) => error.take().map(Err),
        }
    }
}

/// A tree within a transaction: reads see the transaction's own writes; writes apply when the
/// closure returns `Ok`, all of them with the other trees' writes, or none.
#[derive(Clone)]
pub struct TransactionalTree(TxBackend);

#[derive(Clone)]
enum TxBackend {
    Sled(sled::transaction::TransactionalTree),
    Memory {
        store: MemoryDb,
        name: Arc<str>,
        writes: Rc<RefCell<BTreeMap<Vec<u8>, Option<IVec>>>>,
    },
    Postgres {
        tx: Rc<PgTx>,
        name: Arc<str>,
    },
}

impl TransactionalTree {
    /// The value of a key, as this transaction has left it.
    pub fn get<K: AsRef<[u8]>>(&self, key: K) -> UnabortableTransactionResult<Option<IVec>> {
        match &self.0 {
            TxBackend::Sled(tree) => tree.get(key),
            TxBackend::Memory {
                store,
                name,
                writes,
            } => {
                if let Some(written) = writes.borrow().get(key.as_ref()) {
                    return Ok(written.clone());
                }
                Ok(store.read(name, |t| t.and_then(|t| t.get(key.as_ref()).cloned())))
            }
            TxBackend::Postgres { tx, name } => tx.get(name, key.as_ref()),
        }
    }

    /// Sets a key's value when the transaction commits; returns the value it replaces.
    pub fn insert<K, V>(&self, key: K, value: V) -> UnabortableTransactionResult<Option<IVec>>
    where
        K: AsRef<[u8]> + Into<IVec>,
        V: Into<IVec>,
    {
        match &self.0 {
            TxBackend::Sled(tree) => tree.insert(key, value),
            TxBackend::Memory { writes, .. } => {
                let previous = self.get(key.as_ref())?;
                writes
                    .borrow_mut()
                    .insert(key.as_ref().to_vec(), Some(value.into()));
                Ok(previous)
            }
            TxBackend::Postgres { tx, name } => tx.put(name, key.as_ref(), Some(value.into())),
        }
    }

    /// Removes a key when the transaction commits; returns the value it has.
    pub fn remove<K>(&self, key: K) -> UnabortableTransactionResult<Option<IVec>>
    where
        K: AsRef<[u8]> + Into<IVec>,
    {
        match &self.0 {
            TxBackend::Sled(tree) => tree.remove(key),
            TxBackend::Memory { writes, .. } => {
                let previous = self.get(key.as_ref())?;
                writes.borrow_mut().insert(key.as_ref().to_vec(), None);
                Ok(previous)
            }
            TxBackend::Postgres { tx, name } => tx.put(name, key.as_ref(), None),
        }
    }

    /// Reads `keys` ahead, together: on PostgreSQL one round trip instead of one per key, after
    /// which the transaction's gets of them are answered from memory. A hint only: sled and the
    /// memory store answer gets locally anyway, and a key not prefetched is still read.
    pub fn prefetch<K: AsRef<[u8]>>(&self, keys: &[K]) -> UnabortableTransactionResult<()> {
        prefetch_together(&[(self, keys)])
    }

    /// An id never returned before by the tree's database (whether or not this transaction
    /// commits: sled, memory), or by this tree, in commit order (PostgreSQL: an id taken by a
    /// transaction that does not commit is taken again).
    pub fn generate_id(&self) -> UnabortableTransactionResult<u64> {
        match &self.0 {
            TxBackend::Sled(tree) => tree
                .generate_id()
                .map_err(UnabortableTransactionError::Storage),
            TxBackend::Memory { store, .. } => Ok(store.generate_id()),
            TxBackend::Postgres { tx, name } => tx.generate_id(name),
        }
    }
}

/// A tree's name and keys to read ahead.
type TreeKeys<'a> = (Arc<str>, Vec<&'a [u8]>);

/// Reads keys of several trees of one transaction ahead, together: on PostgreSQL one round trip
/// for them all instead of one per tree ([`TransactionalTree::prefetch`]). A hint only, as that
/// is.
pub fn prefetch_together<K: AsRef<[u8]>>(
    reads: &[(&TransactionalTree, &[K])],
) -> UnabortableTransactionResult<()> {
    // Grouped by transaction: trees of one transaction share it, so this is one group.
    let mut groups: Vec<(&Rc<PgTx>, Vec<TreeKeys>)> = Vec::new();
    for (tree, keys) in reads {
        if let TxBackend::Postgres { tx, name } = &tree.0 {
            let keys = keys.iter().map(AsRef::as_ref).collect();
            match groups.iter_mut().find(|(t, _)| Rc::ptr_eq(t, tx)) {
                Some((_, trees)) => trees.push((Arc::clone(name), keys)),
                None => groups.push((tx, vec![(Arc::clone(name), keys)])),
            }
        }
    }
    for (tx, trees) in groups {
        tx.prefetch_together(&trees)?;
    }
    Ok(())
}

/// Runs a closure over one tree or a tuple of trees as one transaction: all its writes or none.
/// The closure may run more than once (sled retries on a conflict), so it must not act outside
/// the trees. All trees must belong to the same kind of database.
pub trait Transactional<E = ()> {
    /// What the closure is given: one [`TransactionalTree`] per tree, in the same shape.
    type View;

    /// Runs `f` as one transaction.
    fn transaction<F, A>(&self, f: F) -> TransactionResult<A, E>
    where
        F: Fn(&Self::View) -> ConflictableTransactionResult<A, E>;
}

/// The in-memory transaction over `trees` of `store`: `f` gets one transactional tree per
/// name; on `Ok` every write is applied in one step, under the writer lock held throughout.
fn memory_transaction<A, E>(
    store: &MemoryDb,
    names: &[&Arc<str>],
    f: impl Fn(&[TransactionalTree]) -> ConflictableTransactionResult<A, E>,
) -> TransactionResult<A, E> {
    let _writer = store.writer();
    loop {
        let trees: Vec<TransactionalTree> = names
            .iter()
            .map(|name| {
                TransactionalTree(TxBackend::Memory {
                    store: store.clone(),
                    name: Arc::clone(name),
                    writes: Rc::default(),
                })
            })
            .collect();
        match f(&trees) {
            Ok(answer) => {
                let mut all = store.trees();
                for tree in trees {
                    let TxBackend::Memory { name, writes, .. } = tree.0 else {
                        unreachable!("memory trees only")
                    };
                    let target = all.entry(name.to_string()).or_default();
                    for (key, value) in writes.take() {
                        match value {
                            Some(value) => target.insert(key, value),
                            None => target.remove(&key),
                        };
                    }
                }
                return Ok(answer);
            }
            Err(ConflictableTransactionError::Abort(e)) => return Err(TransactionError::Abort(e)),
            Err(ConflictableTransactionError::Storage(e)) => {
                return Err(TransactionError::Storage(e))
            }
            // Nothing else writes while the lock is held, so nothing conflicts; a closure that
            // reports a conflict anyway is run again, as sled does.
            Err(ConflictableTransactionError::Conflict) => continue,
        }
    }
}

/// The one kind of database a set of trees belongs to (with the trees' names, for memory and
/// PostgreSQL). Sets over two databases are a programming error.
enum Backing<'a> {
    Sled,
    Memory(&'a MemoryDb, Vec<&'a Arc<str>>),
    Postgres(&'a PgDb, Vec<&'a Arc<str>>, Option<Arc<Fence>>),
}

fn backing<'a>(trees: &[&'a Tree]) -> Backing<'a> {
    let (mut sled, mut memory, mut postgres) = (0, None::<&MemoryDb>, None::<&PgDb>);
    let mut fenced: Option<Arc<Fence>> = None;
    let mut names = Vec::with_capacity(trees.len());
    for tree in trees {
        match &tree.0 {
            TreeBackend::Sled(_) => sled += 1,
            TreeBackend::Memory { store, name } => {
                if let Some(first) = memory {
                    assert!(
                        Arc::ptr_eq(&store.shared, &first.shared),
                        "one transaction over trees of two memory databases"
                    );
                }
                memory = Some(store);
                names.push(name);
            }
            TreeBackend::Postgres { db, name, fence } => {
                if let Some(fence) = fence {
                    assert!(
                        fenced.as_ref().is_none_or(|f| f == fence),
                        "one transaction over trees held to two fences"
                    );
                    fenced = Some(Arc::clone(fence));
                }
                if let Some(first) = postgres {
                    assert!(
                        db.same(first),
                        "one transaction over trees of two postgres databases"
                    );
                }
                postgres = Some(db);
                names.push(name);
            }
        }
    }
    match (memory, postgres) {
        (Some(store), None) if sled == 0 => Backing::Memory(store, names),
        (None, Some(db)) if sled == 0 => Backing::Postgres(db, names, fenced),
        (None, None) => Backing::Sled,
        _ => panic!("one transaction over trees of different kinds of database"),
    }
}

/// The transactional trees of one PostgreSQL transaction, one per name.
fn postgres_views(tx: &Rc<PgTx>, names: &[&Arc<str>]) -> Vec<TransactionalTree> {
    names
        .iter()
        .map(|name| {
            TransactionalTree(TxBackend::Postgres {
                tx: Rc::clone(tx),
                name: Arc::clone(name),
            })
        })
        .collect()
}

fn sled_tree(tree: &Tree) -> &sled::Tree {
    match &tree.0 {
        TreeBackend::Sled(tree) => tree,
        _ => unreachable!("checked by backing"),
    }
}

impl<E> Transactional<E> for Tree {
    type View = TransactionalTree;

    fn transaction<F, A>(&self, f: F) -> TransactionResult<A, E>
    where
        F: Fn(&TransactionalTree) -> ConflictableTransactionResult<A, E>,
    {
        match backing(&[self]) {
            Backing::Memory(store, names) => {
                memory_transaction(store, &names, |trees| f(&trees[0]))
            }
            Backing::Postgres(db, names, fence) => {
                db.transaction(fence.as_deref(), |tx| f(&postgres_views(tx, &names)[0]))
            }
            Backing::Sled => {
                sled::transaction::Transactional::transaction(sled_tree(self), |tree| {
                    f(&TransactionalTree(TxBackend::Sled(tree.clone())))
                })
            }
        }
    }
}

macro_rules! transactional_tuple {
    ($($tree:ident $index:tt),+) => {
        impl<E> Transactional<E> for ($(transactional_tuple!(@tree $tree),)+) {
            type View = ($(transactional_tuple!(@view $tree),)+);

            fn transaction<F, A>(&self, f: F) -> TransactionResult<A, E>
            where
                F: Fn(&Self::View) -> ConflictableTransactionResult<A, E>,
            {
                match backing(&[$(self.$index),+]) {
                    Backing::Memory(store, names) => memory_transaction(store, &names, |trees| {
                        f(&($(trees[$index].clone(),)+))
                    }),
                    Backing::Postgres(db, names, fence) => db.transaction(fence.as_deref(), |tx| {
                        let trees = postgres_views(tx, &names);
                        f(&($(trees[$index].clone(),)+))
                    }),
                    Backing::Sled => {
                        let sled_trees = ($(sled_tree(self.$index),)+);
                        sled::transaction::Transactional::transaction(&sled_trees, |($($tree,)+)| {
                            f(&($(TransactionalTree(TxBackend::Sled($tree.clone())),)+))
                        })
                    }
                }
            }
        }
    };
    (@view $tree:ident) => { TransactionalTree };
    (@tree $tree:ident) => { &Tree };
}

transactional_tuple!(a 0, b 1);
transactional_tuple!(a 0, b 1, c 2);
transactional_tuple!(a 0, b 1, c 2, d 3);
transactional_tuple!(a 0, b 1, c 2, d 3, e 4);
transactional_tuple!(a 0, b 1, c 2, d 3, e 4, f 5);
transactional_tuple!(a 0, b 1, c 2, d 3, e 4, f 5, g 6);
transactional_tuple!(a 0, b 1, c 2, d 3, e 4, f 5, g 6, h 7);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of database, each fresh: every test below runs against all of them and must
    /// see the same answers.
    fn both() -> Vec<(&'static str, Db, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sled = Db::open(dir.path()).unwrap();
        let postgres = Db::postgres(&pgtest::shared().url(), &pgtest::fresh_schema()).unwrap();
        vec![
            ("sled", sled, Some(dir)),
            ("memory", Db::memory(&MemoryDb::new()), None),
            ("postgres", postgres, None),
        ]
    }

    fn keys(iter: impl Iterator<Item = Result<(IVec, IVec)>>) -> Vec<String> {
        iter.map(|pair| String::from_utf8(pair.unwrap().0.to_vec()).unwrap())
            .collect()
    }

    /// Two handles on one PostgreSQL database are what two cloud instances are: their
    /// read-modify-write transactions on the same key, from several threads each, all land once
    /// (a serialization failure runs the loser again).
    #[test]
    fn postgres_transactions_of_several_processes_serialize() {
        let (url, schema) = (pgtest::shared().url(), pgtest::fresh_schema());
        let dbs: Vec<Db> = (0..2)
            .map(|_| Db::postgres(&url, &schema).unwrap())
            .collect();
        let workers: Vec<_> = (0..4)
            .map(|worker| {
                let tree = dbs[worker % 2].open_tree("t").unwrap();
                std::thread::spawn(move || {
                    for n in 0..25 {
                        Transactional::<()>::transaction(&tree, |t| {
                            let count = t
                                .get("count")?
                                .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
                                .unwrap_or(0);
                            t.insert("count", &(count + 1).to_be_bytes())?;
                            t.insert(format!("w{worker}-{n}").as_bytes(), &[1u8][..])?;
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let tree = dbs[0].open_tree("t").unwrap();
        let count = tree.get("count").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(count.as_ref().try_into().unwrap()), 100);
        assert_eq!(tree.scan_prefix("w").count(), 100);
        assert_eq!(tree.len(), 101);
    }

    /// A process that lost its lease writes nothing under it: once another process wrote a
    /// new holder, a transaction held to the old one is refused whole, and says so.
    #[test]
    fn postgres_transactions_held_to_a_fence_commit_only_while_it_holds() {
        let (url, schema) = (pgtest::shared().url(), pgtest::fresh_schema());
        let (old_owner, new_owner) = (
            Db::postgres(&url, &schema).unwrap(),
            Db::postgres(&url, &schema).unwrap(),
        );
        let leases = new_owner.open_tree("leases").unwrap();
        leases.insert("store-1", "cloud:1#1").unwrap();
        let fence = Arc::new(Fence {
            tree: "leases".into(),
            key: b"store-1".to_vec(),
            holder: b"cloud:1#1".to_vec(),
        });
        let data = old_owner.open_tree("data").unwrap().fenced(&fence);
        data.insert("a", "written while held").unwrap();
        leases.insert("store-1", "cloud:2#2").unwrap();
        // Whether the fence is read with the transaction's first keys read ahead or at commit.
        for read_ahead in [false, true] {
            let refused = Transactional::<()>::transaction(&data, |t| {
                if read_ahead {
                    prefetch_together(&[(t, &["b"][..])])?;
                }
                t.insert("b", "written after the takeover")?;
                Ok(())
            })
            .unwrap_err();
            let TransactionError::Storage(error) = refused else {
                panic!("{refused:?}")
            };
            assert!(is_fenced(&error), "read ahead {read_ahead}: {error}");
        }
        assert!(data.insert("c", "a single write").is_err());
        let unfenced = new_owner.open_tree("data").unwrap();
        assert_eq!(keys(unfenced.iter()), ["a"]);
        // sled has one writer by construction: a fence there changes nothing.
        let dir = tempfile::tempdir().unwrap();
        let sled = Db::open(dir.path()).unwrap().open_tree("data").unwrap();
        sled.fenced(&fence).insert("a", "x").unwrap();
    }

    /// Prefetched keys answer as single reads do, missing ones included; a key written earlier in
    /// the transaction keeps its written value; and a prefetched read still conflicts with a
    /// concurrent writer (the read-modify-write lands once per worker).
    #[test]
    fn prefetched_reads_answer_alike_and_still_serialize() {
        for (kind, db, _dir) in both() {
            let t = db.open_tree("t").unwrap();
            t.insert("a", "1").unwrap();
            t.insert("b", "2").unwrap();
            let seen = Transactional::<()>::transaction(&t, |tx| {
                tx.insert("b", "written")?;
                tx.prefetch(&["a", "b", "missing", "a"])?;
                Ok((tx.get("a")?, tx.get("b")?, tx.get("missing")?))
            })
            .unwrap();
            assert_eq!(
                seen,
                (Some(IVec::from("1")), Some(IVec::from("written")), None),
                "{kind}"
            );
            let none: [&[u8]; 0] = [];
            Transactional::<()>::transaction(&t, |tx| tx.prefetch(&none).map_err(Into::into))
                .unwrap();
            // Several trees read ahead together: the same key in two trees is two keys.
            let u = db.open_tree("u").unwrap();
            u.insert("a", "in u").unwrap();
            let seen = Transactional::<()>::transaction(&(&t, &u), |(t, u)| {
                u.insert("b", "written in u")?;
                prefetch_together(&[(t, &["a", "b"][..]), (u, &["a", "b", "missing"][..])])?;
                prefetch_together::<&str>(&[])?;
                Ok((
                    t.get("a")?,
                    t.get("b")?,
                    u.get("a")?,
                    u.get("b")?,
                    u.get("missing")?,
                ))
            })
            .unwrap();
            assert_eq!(
                seen,
                (
                    Some(IVec::from("1")),
                    Some(IVec::from("written")),
                    Some(IVec::from("in u")),
                    Some(IVec::from("written in u")),
                    None
                ),
                "{kind}"
            );
        }
        let (url, schema) = (pgtest::shared().url(), pgtest::fresh_schema());
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let tree = Db::postgres(&url, &schema).unwrap().open_tree("t").unwrap();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        Transactional::<()>::transaction(&tree, |t| {
                            t.prefetch(&["count", "other"])?;
                            let count = t
                                .get("count")?
                                .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
                                .unwrap_or(0);
                            t.insert("count", &(count + 1).to_be_bytes())?;
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let tree = Db::postgres(&url, &schema).unwrap().open_tree("t").unwrap();
        let count = tree.get("count").unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(count.as_ref().try_into().unwrap()), 60);
    }

    #[test]
    fn a_postgres_location_is_shown_without_its_credentials() {
        for url in [
            "postgresql://facepay:s3cret@db.example:5432/ledger",
            "postgresql://db.example/ledger?user=facepay&password=s3cret",
        ] {
            let location = Location::Postgres {
                url: url.into(),
                schema: "facepay".into(),
                tls: None,
            };
            for shown in [location.to_string(), format!("{location:?}")] {
                assert!(!shown.contains("s3cret"), "{shown}");
                assert!(
                    shown.contains("db.example") && shown.contains("ledger"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn prefix_ends_are_the_least_key_past_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn single_writes_reads_and_scans_answer_alike() {
        for (kind, db, _dir) in both() {
            let t = db.open_tree("t").unwrap();
            assert!(t.is_empty(), "{kind}");
            for k in ["b", "a/2", "a/1", "c"] {
                assert_eq!(t.insert(k, k.as_bytes()).unwrap(), None, "{kind}");
            }
            assert_eq!(
                t.insert("c", "C").unwrap().as_deref(),
                Some(&b"c"[..]),
                "{kind}"
            );
            assert_eq!(t.get("c").unwrap().as_deref(), Some(&b"C"[..]), "{kind}");
            assert!(t.contains_key("b").unwrap() && !t.contains_key("z").unwrap());
            assert_eq!(t.len(), 4, "{kind}");
            assert_eq!(keys(t.iter()), ["a/1", "a/2", "b", "c"], "{kind}");
            assert_eq!(keys(t.iter().rev()), ["c", "b", "a/2", "a/1"], "{kind}");
            assert_eq!(keys(t.scan_prefix("a/")), ["a/1", "a/2"], "{kind}");
            assert_eq!(keys(t.range("a/2".."c")), ["a/2", "b"], "{kind}");
            assert_eq!(keys(t.range("b"..)), ["b", "c"], "{kind}");
            assert_eq!(keys(t.range(.."b")), ["a/1", "a/2"], "{kind}");
            assert!(keys(t.range("c".."a")).is_empty(), "{kind}: inverted");
            assert!(keys(t.range("b".."b")).is_empty(), "{kind}: empty");
            assert_eq!(t.first().unwrap().unwrap().0.as_ref(), b"a/1", "{kind}");
            assert_eq!(t.last().unwrap().unwrap().0.as_ref(), b"c", "{kind}");
            assert_eq!(t.remove("b").unwrap().as_deref(), Some(&b"b"[..]), "{kind}");
            assert_eq!(t.remove("b").unwrap(), None, "{kind}");
            // Trees are apart; the database reads and writes its own default tree.
            let other = db.open_tree("other").unwrap();
            assert!(other.get("a/1").unwrap().is_none(), "{kind}");
            db.insert("meta", "1").unwrap();
            assert!(t.get("meta").unwrap().is_none(), "{kind}");
            assert_eq!(db.get("meta").unwrap().as_deref(), Some(&b"1"[..]));
        }
    }

    #[test]
    fn compare_and_swap_sets_only_over_the_expected_value() {
        for (kind, db, _dir) in both() {
            let t = db.open_tree("t").unwrap();
            assert!(t
                .compare_and_swap("k", None as Option<&[u8]>, Some("1"))
                .unwrap()
                .is_ok());
            let refused = t
                .compare_and_swap("k", None as Option<&[u8]>, Some("2"))
                .unwrap()
                .unwrap_err();
            assert_eq!(refused.current.as_deref(), Some(&b"1"[..]), "{kind}");
            assert_eq!(refused.proposed.as_deref(), Some(&b"2"[..]), "{kind}");
            assert!(t
                .compare_and_swap("k", Some("1"), None as Option<&[u8]>)
                .unwrap()
                .is_ok());
            assert!(t.get("k").unwrap().is_none(), "{kind}");
        }
    }

    #[test]
    fn a_transaction_applies_all_its_writes_or_none() {
        for (kind, db, _dir) in both() {
            let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
            a.insert("x", "1").unwrap();
            // Aborted after writing both trees: nothing is left.
            let aborted: TransactionResult<(), &str> = (&a, &b).transaction(|(ta, tb)| {
                ta.insert("x", "2")?;
                tb.insert("y", "2")?;
                assert_eq!(ta.get("x")?.as_deref(), Some(&b"2"[..]), "reads its writes");
                Err(ConflictableTransactionError::Abort("no"))
            });
            assert!(
                matches!(aborted, Err(TransactionError::Abort("no"))),
                "{kind}"
            );
            assert_eq!(a.get("x").unwrap().as_deref(), Some(&b"1"[..]), "{kind}");
            assert!(b.get("y").unwrap().is_none(), "{kind}");
            // Committed: every write, removals included.
            let moved: TransactionResult<Option<IVec>, ()> = (&a, &b).transaction(|(ta, tb)| {
                let x = ta.remove("x")?;
                tb.insert("y", x.clone().unwrap())?;
                assert!(ta.get("x")?.is_none(), "reads its removal");
                Ok(x)
            });
            assert_eq!(moved.unwrap().as_deref(), Some(&b"1"[..]), "{kind}");
            assert!(a.get("x").unwrap().is_none(), "{kind}");
            assert_eq!(b.get("y").unwrap().as_deref(), Some(&b"1"[..]), "{kind}");
            // One tree alone.
            let one: TransactionResult<(), ()> = b.transaction(|tb| {
                tb.insert("z", "3")?;
                Ok(())
            });
            one.unwrap();
            assert_eq!(b.len(), 2, "{kind}");
        }
    }

    #[test]
    fn ids_never_repeat_and_a_reopened_memory_store_keeps_its_data() {
        let store = MemoryDb::new();
        let db = Db::memory(&store);
        let t = db.open_tree("t").unwrap();
        t.insert("k", "v").unwrap();
        let first = db.generate_id().unwrap();
        let in_tx: TransactionResult<u64, ()> = t.transaction(|tt| Ok(tt.generate_id()?));
        let second = in_tx.unwrap();
        drop((db, t));
        let again = Db::memory(&store);
        let third = again.generate_id().unwrap();
        assert!(first < second && second < third, "{first} {second} {third}");
        let t = again.open_tree("t").unwrap();
        assert_eq!(t.get("k").unwrap().as_deref(), Some(&b"v"[..]));
        // A new store is a wiped disk.
        let wiped = Db::memory(&MemoryDb::new());
        assert!(wiped.open_tree("t").unwrap().is_empty());
    }
}
