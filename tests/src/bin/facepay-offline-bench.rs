//! `facepay-offline-bench`: the numbers for offline payment, and what the links cost.
//!
//! 1. The hub's offline authorization latency: the `PaymentActor` with its credentials and
//!    offline actors, a real journal on disk and no cloud, authorizing payment codes one at a time
//!    (code check, nonce reservation, rules, signature, journal writes flushed), p50/p99.
//! 2. Reconciliation, for each database (sled, PostgreSQL): first the ledger alone applying a
//!    backlog of signed offline approvals (default 100,000) in batches, as the cloud's ledger
//!    thread does (signatures checked, one transaction and one flush per batch); then end to end,
//!    a hub process whose journal holds the backlog starts beside Mosquitto and the cloud: time
//!    until its journal is empty, and payments applied per second at the cloud.
//! 3. Online code payments at the edge: Mosquitto, the cloud, a hub and a terminal as processes
//!    (every link TLS, mutually authenticated), the register charging one order at a time with a
//!    fresh payment code already in front of the scanner; time from the register's request to
//!    its answer, p50/p99.
//!
//! Run it in release: `cargo run --release --bin facepay-offline-bench`.

use std::time::{Duration, Instant};

use actix::prelude::*;
use clap::Parser;
use hub::{
    book::OfflineBook,
    credentials::CredentialsActor,
    journal::Journal,
    offline::{OfflineActor, OfflineMetrics, OfflineSetup},
    payment::{Authorize, PaymentActor, PaymentPeers, PaymentSettings},
};
use paycode::{hubsig::HubSigner, Validity, Wallet};
use protocol::{
    AccountKind, Allowance, AuthorizeRequest, Currency, KeyEntry, OfflinePayment, OpenAccount,
    PaymentProof,
};
use tests::{start_cloud, CloudApi, Mosquitto, Service};

#[derive(Parser)]
#[command(version, name = "facepay-offline-bench")]
struct Cli {
    /// Offline authorizations to time.
    #[arg(long, default_value_t = 2000)]
    authorizations: usize,
    /// Offline approvals in the backlog to reconcile.
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Customer accounts the backlog spreads over.
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Entries per reconciliation batch.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Online code payments to time at the edge.
    #[arg(long, default_value_t = 500)]
    edge_payments: usize,
    /// The cloud's databases to reconcile into, one run each: sled, postgres (a server of the
    /// bench's own, every commit flushed to disk).
    #[arg(long, value_delimiter = ',', default_value = "sled,postgres")]
    databases: Vec<String>,
    /// Offline entries the ledger applies per transaction (a batch is split into as many).
    #[arg(long, default_value_t = 50)]
    entries_per_transaction: usize,
    /// Stores the ledger-alone backlog is spread over (each with customers of its own). On
    /// PostgreSQL each store's backlog is applied by a ledger of its own on a thread of its own,
    /// in one process and without leases (cloud instances owning the stores would also hold
    /// them to their fences); on sled (one process's database) one ledger applies them one
    /// store after another. The end-to-end run always has one store.
    #[arg(long, default_value_t = 1)]
    stores: usize,
    /// Of the reconciliation runs, only the ledger alone (no hub, no broker).
    #[arg(long)]
    ledger_only: bool,
    /// Only the reconciliation runs (skip the latency measurements).
    #[arg(long)]
    reconciliation_only: bool,
}

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = tempfile::tempdir()?;
    if !cli.reconciliation_only && !cli.ledger_only {
        authorization_latency(&cli, dir.path())?;
        edge_payment_latency(&cli, &dir.path().join("online"))?;
    }
    for database in &cli.databases {
        let postgres = match database.as_str() {
            "sled" => None,
            "postgres" => Some(pgtest::Postgres::start_durable().map_err(anyhow::Error::msg)?),
            other => anyhow::bail!("--databases {other:?}: sled or postgres"),
        };
        let alone = match &postgres {
            Some(server) => storage::kv::Location::Postgres {
                url: server.url(),
                schema: "alone".into(),
                tls: None,
            },
            None => storage::kv::Location::Sled(dir.path().join("alone").join(database)),
        };
        ledger_apply(&cli, &alone, database)?;
        if cli.ledger_only {
            continue;
        }
        reconciliation(
            &cli,
            &dir.path().join(database),
            postgres.as_ref().map(|p| p.url()),
        )?;
    }
    Ok(())
}

fn edge_payment_latency(cli: &Cli, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let broker = Mosquitto::start(dir)?;
    let cloud = start_cloud(&dir.join("cloud"), broker.port)?;
    let api = CloudApi::new(cloud.http_addr);
    let wallet = Wallet::generate("alice")?;
    for (id, kind, balance, key) in [
        ("store-1", AccountKind::Merchant, 0, None),
        (
            "alice",
            AccountKind::Customer,
            1_000_000_000,
            Some(wallet.public_key_b64()),
        ),
    ] {
        api.open(&OpenAccount {
            account_id: id.into(),
            kind,
            currency: eur(),
            initial_balance_minor: balance,
            public_key: key,
        })?;
    }
    let zenoh_port = tests::free_port();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-1".into(),
            format!("data_dir={:?}", dir.join("hub")),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            format!("mqtt.port={}", broker.port),
        ],
    )?;
    tests::wait_for_keys(hub.http_addr, 1, Duration::from_secs(30))?;
    let frames = tests::spool("frames");
    let edge = Service::start(
        "facepay-edge",
        &[
            "store_id=store-1".into(),
            "terminal_id=till-1".into(),
            "register_listen=127.0.0.1:0".into(),
            format!("frames_dir={frames:?}"),
            format!("zenoh.connect=[\"tls/127.0.0.1:{zenoh_port}\"]"),
        ],
    )?;
    let mut latencies = Vec::with_capacity(cli.edge_payments);
    // A few untimed payments first: links established, queryables declared.
    for n in 0..cli.edge_payments + 20 {
        tests::present_code(&frames, &wallet)?;
        let started = Instant::now();
        let (_, result) = tests::charge(edge.http_addr, &format!("o-{n}"), 100, "EUR")?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(
            result.status == protocol::ChargeStatus::Approved && !result.offline,
            "payment {n} was not approved online: {result:?}"
        );
        if n >= 20 {
            latencies.push(took);
        }
    }
    let mut sorted = latencies;
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "online code payments at the edge ({} one at a time; register -> edge -> Zenoh -> hub -> \
         MQTT -> cloud ledger and back): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1]
    );
    Ok(())
}

fn authorization_latency(cli: &Cli, dir: &std::path::Path) -> anyhow::Result<()> {
    let wallets: Vec<Wallet> = (0..50)
        .map(|n| Wallet::from_seed(&format!("c{n}"), [n as u8 + 1; 32]).unwrap())
        .collect();
    let journal = Journal::open(&dir.join("latency-journal"))?;
    let keys: Vec<KeyEntry> = wallets
        .iter()
        .enumerate()
        .map(|(n, w)| KeyEntry {
            account_id: w.account_id().into(),
            version: n as u64 + 1,
            public_key: Some(w.public_key_b64()),
        })
        .collect();
    let allowances: Vec<Allowance> = wallets
        .iter()
        .map(|w| Allowance {
            account_id: w.account_id().into(),
            amount_minor: i64::MAX / 4,
            currency: eur(),
            blocked: false,
            version: 1,
            booked_minor: 0,
        })
        .collect();
    let config = hub::config::OfflineConfig {
        payment_ceiling_minor: 1_000_000,
        store_ceiling_minor: i64::MAX / 4,
        ..Default::default()
    };
    let n = cli.authorizations;
    let latencies = actix::System::new().block_on(async move {
        let registry = prometheus::Registry::new();
        let journal_worker = hub::journal::start_worker(journal.clone());
        let setup = OfflineSetup {
            store_id: "store-1".into(),
            book: OfflineBook::new(&config, allowances, &[]),
            signer: std::sync::Arc::new(HubSigner::from_seed(&[9; 32])),
            journal: journal.clone(),
            drain_batch: 200,
            drain_interval: Duration::from_secs(3600),
            metrics: OfflineMetrics::register(&registry, config.store_ceiling_minor, &[]),
        };
        let clock = clock::system();
        let validity = Validity {
            window_ms: 60_000,
            clock_skew_ms: 5_000,
        };
        // No cloud link: every payment is decided offline.
        let credentials = CredentialsActor::new(
            clock.clone(),
            validity,
            &keys,
            50,
            journal_worker.clone(),
            None,
            telemetry::register_gauge(&registry, "keys", "keys"),
        )
        .start();
        let offline = OfflineActor::new(clock.clone(), setup, journal_worker.clone(), None).start();
        let auth = PaymentActor::new(
            PaymentSettings {
                clock,
                store_id: "store-1".into(),
                validity,
                cloud_timeout: Duration::from_secs(1),
            },
            PaymentPeers {
                journal: journal_worker,
                credentials,
                offline,
                uplink: None,
            },
            telemetry::PaymentMetrics::register(&registry, "hub", &telemetry::DecisionPath::BOTH),
        )
        .start();
        let mut latencies = Vec::with_capacity(n);
        for i in 0..n {
            let wallet = &wallets[i % wallets.len()];
            let order = format!("o{i}");
            let request = AuthorizeRequest {
                attestation: None,
                payment_id: format!("store-1:{order}").into(),
                store_id: "store-1".into(),
                terminal_id: "t1".into(),
                order_id: order.into(),
                amount_minor: 500,
                currency: eur(),
                proof: PaymentProof::Code(wallet.issue_code(paycode::now_ms())),
            };
            let started = Instant::now();
            let reply = auth.send(Authorize(request)).await.expect("actor alive");
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(reply.offline, "{reply:?}");
        }
        latencies
    });
    let mut sorted = latencies;
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "hub offline authorization ({} payment codes, journal flushed on disk): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        sorted.len(),
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99),
        sorted[sorted.len() - 1]
    );
    Ok(())
}

/// Reconciliation into the cloud's sled ledger, or (`postgres`: its URL) PostgreSQL.
fn reconciliation(
    cli: &Cli,
    dir: &std::path::Path,
    postgres: Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let location = match &postgres {
        Some(url) => storage::kv::Location::Postgres {
            url: url.clone(),
            schema: "facepay".into(),
            tls: None,
        },
        None => storage::kv::Location::Sled(dir.join("cloud").join("ledger")),
    };
    let database = match &postgres {
        Some(url) => {
            // One instance of a fleet, on the bench's own server on loopback (plain).
            tests::ensure_identity(&pki::Identity::cloud_instance("1")?)?;
            vec![
                "database.backend=\"postgres\"".to_string(),
                format!("database.url={url:?}"),
                "database.tls=false".into(),
                "fleet.instance=\"1\"".into(),
            ]
        }
        None => Vec::new(),
    };
    let versions = prepare_ledger(cli, &location, 1)?;
    let broker = Mosquitto::start(dir)?;
    let cloud = tests::start_cloud_with(&dir.join("cloud"), broker.port, &database)?;
    let api = CloudApi::new(cloud.http_addr);
    // The backlog, signed with the hub's key, written into its journal before it starts.
    let hub_dir = dir.join("hub");
    let key_path = storage::default_keys_dir(&hub_dir).join("hub-signing.key");
    let seed = storage::key_file(&key_path, true)?;
    let signer = HubSigner::from_seed(&seed);
    {
        let journal = Journal::open(&hub_dir.join("journal"))?;
        let first = journal.next_seq()?;
        for chunk in backlog(cli, &versions, &signer, first, (0, 1)).chunks(10_000) {
            journal.record_offline_many(chunk)?;
        }
    }
    api.set_hub_key("store-1", &signer.public_key_b64())?;
    let started = Instant::now();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-1".into(),
            format!("data_dir={hub_dir:?}"),
            format!("zenoh.listen=[\"tls/127.0.0.1:{}\"]", tests::free_port()),
            format!("mqtt.port={}", broker.port),
            format!("offline.drain_batch={}", cli.batch),
        ],
    )?;
    let ready = started.elapsed();
    tests::wait_for_metric(
        hub.http_addr,
        "facepay_hub_offline_backlog",
        0.0,
        Duration::from_secs(3600),
    )?;
    let took = started.elapsed();
    let draining = took - ready;
    let page = tests::get_text(&format!("http://{}/metrics", cloud.metrics_addr))?;
    let applied = tests::metric_value(&page, "facepay_cloud_offline_applied_total").unwrap_or(0.0);
    anyhow::ensure!(
        applied as usize == cli.backlog,
        "the cloud applied {applied} of {} entries",
        cli.backlog
    );
    api.assert_books_balance()?;
    println!(
        "reconciliation of {} offline payments over MQTT in batches of {} into {}: hub ready in \
         {:.1} s, journal empty {:.1} s later ({:.1} s in all); {} applied at the cloud, {:.0} \
         payments/s",
        cli.backlog,
        cli.batch,
        if postgres.is_some() {
            "PostgreSQL"
        } else {
            "sled"
        },
        ready.as_secs_f64(),
        draining.as_secs_f64(),
        took.as_secs_f64(),
        applied,
        applied / draining.as_secs_f64()
    );
    Ok(())
}

/// The accounts, and the grants the backlog was approved under (the cloud books each entry
/// against its grant): made in the cloud's ledger before the cloud starts, as online payments at
/// the stores would have made them, under a policy that grants each account its share. Account
/// `a` shops at store `a % stores` ([`store`]). Returns each account's grant version.
fn prepare_ledger(
    cli: &Cli,
    location: &storage::kv::Location,
    stores: usize,
) -> anyhow::Result<Vec<u64>> {
    anyhow::ensure!(
        (1..=cli.accounts).contains(&stores),
        "--stores {stores}: from 1 to --accounts"
    );
    let ledger = cloud::ledger::Ledger::open_at(location)?.with_offline_policy(BENCH_POLICY);
    let open = |id: &str, kind, balance| {
        ledger.open_account(&OpenAccount {
            account_id: id.into(),
            kind,
            currency: eur(),
            initial_balance_minor: balance,
            public_key: None,
        })
    };
    for s in 0..stores {
        open(&store(s), AccountKind::Merchant, 0)?;
    }
    let mut versions = Vec::with_capacity(cli.accounts);
    for a in 0..cli.accounts {
        let account = format!("c{a}");
        open(&account, AccountKind::Customer, 1_000_000_000)?;
        let (store, order) = (store(a % stores), format!("grant-{a}"));
        let (_, granted) = ledger.authorize_with_allowance(
            &store,
            &protocol::CloudAuthorize {
                evidence: Default::default(),
                payment_id: format!("{store}:{order}").into(),
                account_id: account.clone().into(),
                code_nonce: format!("grant-{a}").into(),
                amount_minor: 1,
                currency: eur(),
                terminal_id: "t1".into(),
                order_id: order.into(),
                offline_reservation: Default::default(),
                spent_code: None,
            },
        )?;
        versions.push(granted.map_or(0, |g| g.version));
    }
    Ok(versions)
}

/// The id of the bench's store `s` (counted from 0; the first is `store-1`).
fn store(s: usize) -> String {
    format!("store-{}", s + 1)
}

/// Every account may hold its whole balance offline: the backlog is all within its grants.
const BENCH_POLICY: cloud::ledger::OfflinePolicy = cloud::ledger::OfflinePolicy {
    store_allowance_minor: protocol::MAX_AMOUNT_MINOR,
    account_cap_minor: protocol::MAX_AMOUNT_MINOR,
};

/// Store `s`'s share of the backlog (`cli.backlog` offline approvals over `stores` stores),
/// spread over its own customers (those of [`prepare_ledger`]), signed by its hub, numbered
/// from `first`.
fn backlog(
    cli: &Cli,
    versions: &[u64],
    signer: &HubSigner,
    first: u64,
    (s, stores): (usize, usize),
) -> Vec<OfflinePayment> {
    let share = cli.backlog / stores + usize::from(s < cli.backlog % stores);
    let customers = (cli.accounts - s).div_ceil(stores);
    let store_id = store(s);
    (0..share)
        .map(|i| {
            let order = format!("b{i}");
            let account = s + (i % customers) * stores;
            let mut entry = OfflinePayment {
                seq: first + i as u64,
                payment_id: format!("{store_id}:{order}").into(),
                store_id: store_id.clone().into(),
                terminal_id: "t1".into(),
                order_id: order.into(),
                account_id: format!("c{account}").into(),
                allowance_version: versions[account],
                nonce: format!("n{i}").into(),
                amount_minor: 100 + (i % 900) as i64,
                currency: eur(),
                approved_at_ms: paycode::now_ms(),
                spent_code: None,
                signature: String::new(),
            };
            signer.sign(&mut entry);
            entry
        })
        .collect()
}

/// The ledger alone: the backlog applied in batches of `cli.batch` as the cloud's ledger thread
/// applies a hub's reconcile requests (signatures checked, one transaction and one flush per
/// batch). Each store's batches in order; on PostgreSQL the stores at once, a ledger each.
fn ledger_apply(cli: &Cli, location: &storage::kv::Location, name: &str) -> anyhow::Result<()> {
    let stores = cli.stores;
    let versions = prepare_ledger(cli, location, stores)?;
    let open = || -> anyhow::Result<cloud::ledger::Ledger> {
        Ok(cloud::ledger::Ledger::open_at(location)?
            .with_offline_policy(BENCH_POLICY)
            .with_entries_per_transaction(cli.entries_per_transaction))
    };
    let ledger = open()?;
    let mut backlogs = Vec::with_capacity(stores);
    for s in 0..stores {
        let mut seed = [9; 32];
        seed[..8].copy_from_slice(&(s as u64).to_be_bytes());
        let signer = HubSigner::from_seed(&seed);
        ledger.set_hub_key(&store(s), &signer.public_key_b64())?;
        backlogs.push((store(s), backlog(cli, &versions, &signer, 1, (s, stores))));
    }
    // Progress on stderr (drawn only on a terminal), over every store's entries.
    let bar = indicatif::ProgressBar::new(cli.backlog as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} entries into {msg}, {per_sec}, eta {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(name.to_owned());
    let apply = |ledger: &cloud::ledger::Ledger,
                 (store_id, entries): &(String, Vec<OfflinePayment>)|
     -> anyhow::Result<usize> {
        let mut applied = 0;
        for batch in entries.chunks(cli.batch) {
            let done = ledger.reconcile(store_id, batch)?;
            bar.inc(batch.len() as u64);
            applied += done
                .outcomes
                .iter()
                .filter(|o| matches!(o, protocol::ReconcileOutcome::Applied { .. }))
                .count();
        }
        Ok(applied)
    };
    let parallel = matches!(location, storage::kv::Location::Postgres { .. }) && stores > 1;
    let ledgers = if parallel {
        (0..stores)
            .map(|_| open())
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let started = Instant::now();
    let applied: usize = if parallel {
        std::thread::scope(|scope| {
            let apply = &apply;
            let running: Vec<_> = ledgers
                .iter()
                .zip(&backlogs)
                .map(|(ledger, backlog)| scope.spawn(move || apply(ledger, backlog)))
                .collect();
            running
                .into_iter()
                .map(|r| r.join().expect("a store's reconciliation does not panic"))
                .sum::<anyhow::Result<usize>>()
        })?
    } else {
        backlogs
            .iter()
            .map(|backlog| apply(&ledger, backlog))
            .sum::<anyhow::Result<usize>>()?
    };
    let took = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    anyhow::ensure!(
        applied == cli.backlog,
        "the ledger applied {applied} of {} entries",
        cli.backlog
    );
    for total in ledger.totals()? {
        anyhow::ensure!(
            total.sum_of_balances_minor == 0,
            "books out of balance: {total:?}"
        );
    }
    println!(
        "reconciliation of {} offline payments by the ledger alone in batches of {} ({} per \
         transaction) from {stores} store(s){} into {name}: {took:.1} s, {:.0} payments/s",
        cli.backlog,
        cli.batch,
        cli.entries_per_transaction,
        if parallel { " at once" } else { "" },
        applied as f64 / took
    );
    Ok(())
}
