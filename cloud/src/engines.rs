//! Runs a test once per database engine (sled, PostgreSQL): the ledger and customer store
//! tests are written once and must pass on both ([`on_each_engine!`]). A test opens its
//! database through [`location`], which names the engine of the run in progress.

use std::{
    cell::Cell,
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use storage::kv::Location;

/// A database engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// sled, in a temporary directory.
    Sled,
    /// A schema of its own on the test process's PostgreSQL ([`pgtest::shared`]).
    Postgres,
}

thread_local! {
    static ENGINE: Cell<Engine> = const { Cell::new(Engine::Sled) };
}

/// Runs `test` with `engine` as the engine [`location`] answers with.
pub fn run(engine: Engine, test: fn()) {
    ENGINE.with(|e| e.set(engine));
    test();
}

/// Where a test's database at `dir` is on the engine of the run: `dir` itself for sled; for
/// PostgreSQL a schema of its own, the same one each time `dir` is opened again (a restart).
pub fn location(dir: &Path) -> Location {
    match ENGINE.with(Cell::get) {
        Engine::Sled => Location::Sled(dir.to_path_buf()),
        Engine::Postgres => {
            static SCHEMAS: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
            let schema = SCHEMAS
                .get_or_init(Mutex::default)
                .lock()
                .expect("not poisoned")
                .entry(dir.to_path_buf())
                .or_insert_with(pgtest::fresh_schema)
                .clone();
            Location::Postgres {
                url: pgtest::shared().url(),
                schema,
                tls: None,
            }
        }
    }
}

/// Declares, for each named test function (`fn name()`, not itself a `#[test]`), one test per
/// engine: `on_sled::name` and `on_postgres::name`.
macro_rules! on_each_engine {
    ($($name:ident),+ $(,)?) => {
        mod on_sled {
            $(
                #[test]
                fn $name() {
                    $crate::engines::run($crate::engines::Engine::Sled, super::$name)
                }
            )+
        }
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    $crate::engines::run($crate::engines::Engine::Postgres, super::$name)
                }
            )+
        }
    };
}
pub(crate) use on_each_engine;
