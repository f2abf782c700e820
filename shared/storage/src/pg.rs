//! The PostgreSQL backend of [`crate::kv`]: every tree of a database is one table's rows
//! (`<schema>.kv`, keyed by tree and key), so the ledger and the customer store run unchanged
//! on it and several processes can share one database.
//!
//! A transaction is a PostgreSQL transaction at `SERIALIZABLE`: reads go to the server (the
//! transaction's own writes and what it already read are answered from memory), writes are
//! buffered and sent in two statements at commit. A serialization failure or a deadlock, on any
//! statement or the commit, runs the closure again on a new transaction, as sled does on a
//! conflict; the closure already may run more than once. Any other error (the server gone,
//! the connection cut) is a storage error: nobody knows whether a failed commit landed, so the
//! caller stops rather than answering "nothing was written".
//!
//! Connections are pooled per database: a transaction holds one for its life; single reads and
//! scans take any idle one.

use std::{
    cell::RefCell,
    collections::HashMap,
    ops::Bound,
    rc::Rc,
    sync::{Arc, Mutex},
};

use postgres::{error::SqlState, Client, NoTls, Statement};

use crate::kv::{Fence, FENCED};
use sled::{
    transaction::{
        ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
        TransactionResult, UnabortableTransactionError,
    },
    IVec,
};

/// The tree holding each tree's id counter ([`PgTx::generate_id`]).
const IDS_TREE: &str = "__ids";

/// Most idle connections a database keeps open for later use.
const IDLE_CONNECTIONS_MAX: usize = 8;

/// A database in PostgreSQL: a schema holding the `kv` table and the id sequence.
#[derive(Clone)]
pub(crate) struct PgDb {
    shared: Arc<Shared>,
}

struct Shared {
    url: String,
    schema: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    idle: Mutex<Vec<Conn>>,
}

/// One connection with the statements every operation uses, prepared once.
struct Conn {
    client: Client,
    get: Statement,
    get_pairs: Statement,
    upsert: Statement,
    delete: Statement,
    next_id: Statement,
}

/// A connection taken from the pool, given back when dropped unless it broke or is still in a
/// transaction (a panic unwound through one): reused, it would answer from that transaction.
struct Pooled {
    conn: Option<Conn>,
    shared: Arc<Shared>,
    in_transaction: bool,
}

impl std::ops::Deref for Pooled {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if conn.client.is_closed() || self.in_transaction {
                return;
            }
            let mut idle = self.shared.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_CONNECTIONS_MAX {
                idle.push(conn);
            }
        }
    }
}

/// A connection to the server at `url`: over `tls` when given, TLS then required whatever the
/// connection string says (no plain fallback); plain otherwise.
fn connect(url: &str, tls: &Option<Arc<rustls::ClientConfig>>) -> sled::Result<Client> {
    let mut config: postgres::Config = url.parse().map_err(storage)?;
    match tls {
        Some(tls) => {
            config.ssl_mode(postgres::config::SslMode::Require);
            config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                    (**tls).clone(),
                ))
                .map_err(storage)
        }
        None => config.connect(NoTls).map_err(storage),
    }
}

/// A storage error from PostgreSQL's, as sled's error type carries it.
fn storage(error: impl std::fmt::Display) -> sled::Error {
    sled::Error::Io(std::io::Error::other(format!("postgresql: {error}")))
}

/// Whether a PostgreSQL error means "run the transaction again": a serialization failure or a
/// deadlock, both of which roll the transaction back whole.
fn is_conflict(error: &postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(&SqlState::T_R_SERIALIZATION_FAILURE) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

fn unabortable(error: postgres::Error) -> UnabortableTransactionError {
    if is_conflict(&error) {
        UnabortableTransactionError::Conflict
    } else {
        UnabortableTransactionError::Storage(storage(error))
    }
}

/// Whether a schema name is a plain lowercase identifier: it is written into statements.
pub fn valid_schema(schema: &str) -> bool {
    !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl PgDb {
    /// Connects to the database at `url` and makes `schema`'s table and sequence if they are
    /// not there yet (several processes may do so at once: a lock in the server orders them).
    /// Tree names compare byte by byte (`COLLATE "C"`: the server's locale would make every
    /// index compare a locale-aware one); a table made before is converted once.
    pub(crate) fn open(
        url: &str,
        schema: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> sled::Result<PgDb> {
        if !valid_schema(schema) {
            return Err(sled::Error::Unsupported(format!(
                "postgresql schema {schema:?} is not a lowercase identifier"
            )));
        }
        let mut client = connect(url, &tls)?;
        // A fixed lock key, held to the end of the transaction: schema creation is rare and
        // brief, one at a time is enough. The collation of a table made before is changed only
        // if its lock comes within seconds (the change rebuilds the key index while every
        // instance waits) and the role owns the table; otherwise it keeps its collation, which
        // answers the same, a little slower.
        client
            .batch_execute(&format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(7461636570617931);
                 CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.kv (
                     tree text COLLATE \"C\" NOT NULL,
                     key bytea NOT NULL,
                     value bytea NOT NULL,
                     PRIMARY KEY (tree, key)
                 );
                 DO $$ BEGIN
                     IF EXISTS (SELECT 1 FROM information_schema.columns
                                WHERE table_schema = '{schema}' AND table_name = 'kv'
                                  AND column_name = 'tree'
                                  AND collation_name IS DISTINCT FROM 'C') THEN
                         BEGIN
                             SET LOCAL lock_timeout = '5s';
                             ALTER TABLE {schema}.kv ALTER COLUMN tree TYPE text COLLATE \"C\";
                         EXCEPTION WHEN lock_not_available OR insufficient_privilege THEN
                             RAISE WARNING 'facepay: {schema}.kv.tree keeps its collation: %',
                                 SQLERRM;
                         END;
                     END IF;
                 END $$;
                 CREATE SEQUENCE IF NOT EXISTS {schema}.ids;
                 COMMIT;"
            ))
            .map_err(storage)?;
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            schema: schema.to_owned(),
            tls,
            idle: Mutex::new(Vec::new()),
        });
        let conn = Conn::prepare(client, schema)?;
        shared.idle.lock().expect("not poisoned").push(conn);
        Ok(PgDb { shared })
    }

    fn conn(&self) -> sled::Result<Pooled> {
        let idle = self
            .shared
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let client = connect(&self.shared.url, &self.shared.tls)?;
                Conn::prepare(client, &self.shared.schema)?
            }
        };
        Ok(Pooled {
            conn: Some(conn),
            shared: Arc::clone(&self.shared),
            in_transaction: false,
        })
    }

    /// Whether two handles are the same database.
    pub(crate) fn same(&self, other: &PgDb) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The value of a key, read on its own.
    pub(crate) fn get(&self, tree: &str, key: &[u8]) -> sled::Result<Option<IVec>> {
        let mut conn = self.conn()?;
        let get = conn.get.clone();
        let row = conn
            .client
            .query_opt(&get, &[&tree, &key])
            .map_err(storage)?;
        Ok(row.map(|r| IVec::from(r.get::<_, Vec<u8>>(0))))
    }

    /// The pairs of a tree within bounds, in key order, read at once.
    pub(crate) fn range(
        &self,
        tree: &str,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
    ) -> sled::Result<Vec<(IVec, IVec)>> {
        let mut sql = format!(
            "SELECT key, value FROM {}.kv WHERE tree = $1",
            self.shared.schema
        );
        let mut params: Vec<Vec<u8>> = Vec::new();
        for (bound, inclusive, exclusive) in [(&start, ">=", ">"), (&end, "<=", "<")] {
            let (op, key) = match bound {
                Bound::Included(k) => (inclusive, k),
                Bound::Excluded(k) => (exclusive, k),
                Bound::Unbounded => continue,
            };
            params.push(key.clone());
            sql.push_str(&format!(" AND key {op} ${}", params.len() + 1));
        }
        sql.push_str(" ORDER BY key");
        let mut args: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&tree];
        args.extend(
            params
                .iter()
                .map(|p| p as &(dyn postgres::types::ToSql + Sync)),
        );
        let mut conn = self.conn()?;
        let rows = conn.client.query(&sql, &args).map_err(storage)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    IVec::from(r.get::<_, Vec<u8>>(0)),
                    IVec::from(r.get::<_, Vec<u8>>(1)),
                )
            })
            .collect())
    }

    /// How many keys of a tree have values.
    pub(crate) fn len(&self, tree: &str) -> sled::Result<usize> {
        let sql = format!(
            "SELECT count(*) FROM {}.kv WHERE tree = $1",
            self.shared.schema
        );
        let mut conn = self.conn()?;
        let row = conn.client.query_one(&sql, &[&tree]).map_err(storage)?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    /// An id never returned before by this database, across every process sharing it.
    pub(crate) fn generate_id(&self) -> sled::Result<u64> {
        let mut conn = self.conn()?;
        let next_id = conn.next_id.clone();
        let row = conn.client.query_one(&next_id, &[]).map_err(storage)?;
        // Sequences start at 1; sled's ids start at 0.
        Ok(row.get::<_, i64>(0) as u64 - 1)
    }

    /// Runs `f` as one serializable transaction, again on a conflict.
    pub(crate) fn transaction<A, E>(
        &self,
        fence: Option<&Fence>,
        f: impl Fn(&Rc<PgTx>) -> ConflictableTransactionResult<A, E>,
    ) -> TransactionResult<A, E> {
        loop {
            let mut conn = self.conn().map_err(TransactionError::Storage)?;
            conn.client
                .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                .map_err(|e| TransactionError::Storage(storage(e)))?;
            conn.in_transaction = true;
            let tx = Rc::new(PgTx {
                conn: RefCell::new(conn),
                seen: RefCell::default(),
                writes: RefCell::default(),
                fence: fence.map(|f| (f.tree.as_str().into(), f.key.clone())),
            });
            let outcome = f(&tx);
            let tx = Rc::try_unwrap(tx).unwrap_or_else(|_| {
                panic!("a transactional tree outlived its transaction's closure")
            });
            match outcome {
                Ok(answer) => match tx.commit(fence) {
                    Ok(()) => return Ok(answer),
                    Err(UnabortableTransactionError::Conflict) => continue,
                    Err(UnabortableTransactionError::Storage(e)) => {
                        return Err(TransactionError::Storage(e))
                    }
                },
                Err(ConflictableTransactionError::Conflict) => {
                    tx.rollback().map_err(TransactionError::Storage)?;
                }
                Err(ConflictableTransactionError::Abort(e)) => {
                    tx.rollback().map_err(TransactionError::Storage)?;
                    return Err(TransactionError::Abort(e));
                }
                Err(ConflictableTransactionError::Storage(e)) => {
                    let _ = tx.rollback();
                    return Err(TransactionError::Storage(e));
                }
            }
        }
    }
}

impl Conn {
    fn prepare(mut client: Client, schema: &str) -> sled::Result<Conn> {
        let get = client
            .prepare(&format!(
                "SELECT value FROM {schema}.kv WHERE tree = $1 AND key = $2"
            ))
            .map_err(storage)?;
        let get_pairs = client
            .prepare(&format!(
                "SELECT tree, key, value FROM {schema}.kv WHERE (tree, key) IN
                 (SELECT * FROM unnest($1::text[], $2::bytea[]))"
            ))
            .map_err(storage)?;
        let upsert = client
            .prepare(&format!(
                "INSERT INTO {schema}.kv (tree, key, value)
                 SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[])
                 ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value"
            ))
            .map_err(storage)?;
        let delete = client
            .prepare(&format!(
                "DELETE FROM {schema}.kv WHERE (tree, key) IN
                 (SELECT * FROM unnest($1::text[], $2::bytea[]))"
            ))
            .map_err(storage)?;
        let next_id = client
            .prepare(&format!("SELECT nextval('{schema}.ids')"))
            .map_err(storage)?;
        Ok(Conn {
            client,
            get,
            get_pairs,
            upsert,
            delete,
            next_id,
        })
    }
}

type Slot = (Arc<str>, Vec<u8>);

/// One open serializable transaction, shared by the transactional trees of one closure run.
pub(crate) struct PgTx {
    conn: RefCell<Pooled>,
    /// What this transaction read from the server (a second read answers the same under
    /// `SERIALIZABLE`, so it is not asked again).
    seen: RefCell<HashMap<Slot, Option<IVec>>>,
    /// What it wrote, applied at commit (`None`: removed).
    writes: RefCell<HashMap<Slot, Option<IVec>>>,
    /// The row of the fence it commits under, if any: read with the first keys read ahead, so
    /// that checking it at commit takes no round trip of its own.
    fence: Option<Slot>,
}

impl PgTx {
    /// The value of a key, as this transaction has left it.
    pub(crate) fn get(
        &self,
        tree: &Arc<str>,
        key: &[u8],
    ) -> Result<Option<IVec>, UnabortableTransactionError> {
        let slot = (Arc::clone(tree), key.to_vec());
        if let Some(written) = self.writes.borrow().get(&slot) {
            return Ok(written.clone());
        }
        if let Some(read) = self.seen.borrow().get(&slot) {
            return Ok(read.clone());
        }
        let mut conn = self.conn.borrow_mut();
        let get = conn.get.clone();
        let row = conn
            .client
            .query_opt(&get, &[&&**tree, &key])
            .map_err(unabortable)?;
        let value = row.map(|r| IVec::from(r.get::<_, Vec<u8>>(0)));
        self.seen.borrow_mut().insert(slot, value.clone());
        Ok(value)
    }

    /// Reads the keys of several trees in one round trip (with the fence's row, the first time),
    /// so that the transaction's gets of them are answered from memory. Keys it has already read
    /// or written are not asked again.
    pub(crate) fn prefetch_together(
        &self,
        reads: &[(Arc<str>, Vec<&[u8]>)],
    ) -> Result<(), UnabortableTransactionError> {
        let wanted: Vec<Slot> = {
            let (writes, seen) = (self.writes.borrow(), self.seen.borrow());
            let mut wanted: Vec<Slot> = reads
                .iter()
                .flat_map(|(tree, keys)| keys.iter().map(|key| (Arc::clone(tree), key.to_vec())))
                .chain(self.fence.clone())
                .filter(|slot| !writes.contains_key(slot) && !seen.contains_key(slot))
                .collect();
            wanted.sort_unstable();
            wanted.dedup();
            wanted
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let trees: Vec<&str> = wanted.iter().map(|(tree, _)| &**tree).collect();
        let keys: Vec<&[u8]> = wanted.iter().map(|(_, key)| key.as_slice()).collect();
        let rows = {
            let mut conn = self.conn.borrow_mut();
            let get_pairs = conn.get_pairs.clone();
            conn.client
                .query(&get_pairs, &[&trees, &keys])
                .map_err(unabortable)?
        };
        let names: HashMap<&str, &Arc<str>> =
            wanted.iter().map(|(tree, _)| (&**tree, tree)).collect();
        let mut seen = self.seen.borrow_mut();
        for row in rows {
            let (tree, key, value): (&str, Vec<u8>, Vec<u8>) = (row.get(0), row.get(1), row.get(2));
            if let Some(tree) = names.get(tree) {
                seen.insert((Arc::clone(tree), key), Some(IVec::from(value)));
            }
        }
        for slot in wanted {
            seen.entry(slot).or_insert(None);
        }
        Ok(())
    }

    /// Sets (`Some`) or removes (`None`) a key at commit; returns the value it had.
    pub(crate) fn put(
        &self,
        tree: &Arc<str>,
        key: &[u8],
        value: Option<IVec>,
    ) -> Result<Option<IVec>, UnabortableTransactionError> {
        let previous = self.get(tree, key)?;
        self.writes
            .borrow_mut()
            .insert((Arc::clone(tree), key.to_vec()), value);
        Ok(previous)
    }

    /// The next of `tree`'s ids, counted in the transaction itself (a row of the `__ids`
    /// tree): two transactions taking ids of one tree conflict, so ids are handed out in commit
    /// order. A reader that has seen id N has seen every id below N that will ever commit, which
    /// is what versioned change feeds (key, template and grant versions hubs sync by) need when
    /// several processes write. Returns what sled's would: the first is 0.
    pub(crate) fn generate_id(&self, tree: &Arc<str>) -> Result<u64, UnabortableTransactionError> {
        let ids: Arc<str> = IDS_TREE.into();
        let next = match self.get(&ids, tree.as_bytes())? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                UnabortableTransactionError::Storage(storage(format!(
                    "id counter of {tree} is not 8 bytes"
                )))
            })?),
            None => 0,
        };
        self.writes.borrow_mut().insert(
            (ids, tree.as_bytes().to_vec()),
            Some(IVec::from(&(next + 1).to_be_bytes()[..])),
        );
        Ok(next)
    }

    /// Commits, once the fence (if any) is found holding: read in this transaction (with its
    /// first keys read ahead, or here), so it serializes before any takeover that committed
    /// meanwhile (as if it had finished first) or fails, as it does once the new holder has read
    /// what it writes; it never commits after the takeover in the serial order.
    fn commit(self, fence: Option<&Fence>) -> Result<(), UnabortableTransactionError> {
        if let Some(fence) = fence {
            let tree: Arc<str> = fence.tree.as_str().into();
            let held = self.get(&tree, &fence.key);
            let refused = match held {
                Ok(Some(value)) if value.as_ref() == fence.holder.as_slice() => None,
                Ok(_) => Some(UnabortableTransactionError::Storage(
                    sled::Error::Unsupported(format!(
                        "{FENCED} {} is no longer held by {}",
                        String::from_utf8_lossy(&fence.key),
                        String::from_utf8_lossy(&fence.holder)
                    )),
                )),
                Err(e) => Some(e),
            };
            if let Some(refused) = refused {
                let _ = self.rollback();
                return Err(refused);
            }
        }
        let writes = self.writes.into_inner();
        let mut conn = self.conn.into_inner();
        let outcome = (|| {
            let (mut put_trees, mut put_keys, mut put_values) =
                (Vec::new(), Vec::new(), Vec::new());
            let (mut del_trees, mut del_keys) = (Vec::new(), Vec::new());
            for ((tree, key), value) in writes {
                match value {
                    Some(value) => {
                        put_trees.push(tree.to_string());
                        put_keys.push(key);
                        put_values.push(value.to_vec());
                    }
                    None => {
                        del_trees.push(tree.to_string());
                        del_keys.push(key);
                    }
                }
            }
            let (upsert, delete) = (conn.upsert.clone(), conn.delete.clone());
            if !put_keys.is_empty() {
                conn.client
                    .execute(&upsert, &[&put_trees, &put_keys, &put_values])?;
            }
            if !del_keys.is_empty() {
                conn.client.execute(&delete, &[&del_trees, &del_keys])?;
            }
            conn.client.batch_execute("COMMIT")
        })();
        match outcome {
            Ok(()) => {
                conn.in_transaction = false;
                Ok(())
            }
            Err(error) => {
                // A failed statement leaves the transaction aborted: end it before the
                // connection is reused. A failed COMMIT has already ended it.
                if conn.client.batch_execute("ROLLBACK").is_ok() {
                    conn.in_transaction = false;
                }
                Err(unabortable(error))
            }
        }
    }

    fn rollback(self) -> sled::Result<()> {
        let mut conn = self.conn.into_inner();
        conn.client.batch_execute("ROLLBACK").map_err(storage)?;
        conn.in_transaction = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table made before tree names compared byte by byte is converted when opened, and
    /// keeps every row.
    #[test]
    fn a_table_of_the_server_collation_is_converted_and_keeps_its_rows() {
        let (url, schema) = (pgtest::shared().url(), pgtest::fresh_schema());
        let mut client = connect(&url, &None).unwrap();
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.kv (tree text NOT NULL, key bytea NOT NULL,
                     value bytea NOT NULL, PRIMARY KEY (tree, key));
                 INSERT INTO {schema}.kv VALUES ('t', 'a', 'kept');"
            ))
            .unwrap();
        let collation = |client: &mut Client| -> Option<String> {
            client
                .query_one(
                    "SELECT collation_name::text FROM information_schema.columns
                     WHERE table_schema = $1 AND table_name = 'kv' AND column_name = 'tree'",
                    &[&schema],
                )
                .unwrap()
                .get(0)
        };
        assert_eq!(collation(&mut client), None);
        let db = PgDb::open(&url, &schema, None).unwrap();
        assert_eq!(collation(&mut client).as_deref(), Some("C"));
        assert_eq!(db.get("t", b"a").unwrap(), Some(IVec::from("kept")));
        // Opened again, nothing changes.
        PgDb::open(&url, &schema, None).unwrap();
        assert_eq!(collation(&mut client).as_deref(), Some("C"));
    }

    #[test]
    fn only_plain_lowercase_identifiers_are_schemas() {
        for (schema, valid) in [
            ("facepay", true),
            ("test_12_3", true),
            ("_private", true),
            ("", false),
            ("Facepay", false),
            ("1st", false),
            ("a; DROP TABLE kv", false),
            ("a.b", false),
            (&"x".repeat(64), false),
        ] {
            assert_eq!(valid_schema(schema), valid, "{schema:?}");
        }
    }
}
