//! The chaos harness: real processes (Mosquitto, the cloud, two hubs, their terminals), a payment
//! workload on every terminal, and faults injected on a schedule derived from a seed — a hub cut
//! from the broker, terminals cut from their hub, both, kill -9 of a hub or of the cloud and a
//! restart, a broker restart — then every link healed and the whole history checked against the
//! ledger.
//!
//! The same seed gives the same schedule and the same workload choices (the interleaving with real
//! time still differs from run to run); a failing run names its seed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use paycode::Wallet;
use protocol::{synthetic::Rng, AccountKind, ChargeStatus, Currency, DeclineReason, OpenAccount};

use crate::{charge, present_code, start_cloud, store::StoreSite, CloudApi, Mosquitto, Service};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Seed of the schedule and the workload.
    pub seed: u64,
    /// How long payments flow while faults are injected.
    pub duration: Duration,
    /// Customers paying by code.
    pub customers: usize,
    /// Terminals per store (two stores).
    pub terminals: usize,
    /// Opening balance of each customer.
    pub balance_minor: i64,
    /// Offline ceilings given to the hubs: per payment, per store.
    pub payment_ceiling_minor: i64,
    /// Per-store offline ceiling.
    pub store_ceiling_minor: i64,
    /// The cloud's per-account cap (its default).
    pub account_cap_minor: i64,
}

impl ChaosConfig {
    /// The CI run: a minute of faults.
    pub fn ci(seed: u64) -> Self {
        ChaosConfig {
            seed,
            duration: Duration::from_secs(60),
            customers: 4,
            terminals: 2,
            balance_minor: 1_000_000,
            payment_ceiling_minor: 1_500,
            store_ceiling_minor: 6_000,
            account_cap_minor: 10_000,
        }
    }

    /// A soak of `minutes`: the CI mix, with the CI balance for every minute, about what the
    /// workload spends in a release build (funds run low near the end, so debts and blocked
    /// accounts occur as well).
    pub fn soak(seed: u64, minutes: u64) -> Self {
        let ci = Self::ci(seed);
        ChaosConfig {
            duration: Duration::from_secs(minutes * 60),
            balance_minor: ci.balance_minor * minutes.max(1) as i64,
            ..ci
        }
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Cut a hub from the broker (and so from the cloud).
    PartitionHub(usize),
    /// Cut a store's terminals from its hub.
    PartitionTerminals(usize),
    /// Both at once.
    PartitionBoth(usize),
    /// kill -9 a hub, then start it again.
    KillHub(usize),
    /// kill -9 the cloud, then start it again.
    KillCloud,
    /// Restart the broker (it keeps nothing).
    RestartBroker,
}

/// A fault, when it starts (after the workload starts) and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Start, from the beginning of the workload.
    pub at: Duration,
    /// The fault.
    pub fault: Fault,
    /// How long until it is healed.
    pub hold: Duration,
}

/// The fault schedule a seed gives for a run of `duration`.
pub fn schedule(seed: u64, duration: Duration) -> Vec<Step> {
    let mut rng = Rng::new(seed ^ 0x00c4_a05e);
    let mut steps = Vec::new();
    let mut at = Duration::from_millis(1_000 + rng.below(1_000));
    while at + Duration::from_secs(4) < duration {
        let store = rng.below(2) as usize;
        let fault = match rng.below(6) {
            0 => Fault::PartitionHub(store),
            1 => Fault::PartitionTerminals(store),
            2 => Fault::PartitionBoth(store),
            3 => Fault::KillHub(store),
            4 => Fault::KillCloud,
            _ => Fault::RestartBroker,
        };
        let hold = Duration::from_millis(1_500 + rng.below(3_000));
        steps.push(Step { at, fault, hold });
        at += hold + Duration::from_millis(1_000 + rng.below(2_000));
    }
    steps
}

/// What a terminal reported for one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Approved (online or offline).
    Ok {
        /// Approved by the hub alone.
        offline: bool,
    },
    /// Declined with a reason: nothing may have moved.
    Failed(DeclineReason),
    /// No definite answer (no hub reachable, HTTP failure): it may or may not have been paid.
    Unknown(String),
}

/// One payment of the workload.
#[derive(Debug, Clone)]
pub struct Op {
    /// The store.
    pub store: String,
    /// Payment id (`<store>:<order>`).
    pub payment_id: String,
    /// The customer.
    pub account: String,
    /// Amount.
    pub amount_minor: i64,
    /// When the answer came, ms since the epoch.
    pub answered_ms: u64,
    /// What the terminal said.
    pub outcome: Outcome,
}

/// The numbers of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Faults injected.
    pub faults: usize,
    /// Payments invoked.
    pub invoked: usize,
    /// Approved (of which offline).
    pub ok: usize,
    /// Approved offline.
    pub ok_offline: usize,
    /// Declined.
    pub failed: usize,
    /// Unknown.
    pub unknown: usize,
    /// The longest time, after a fault was healed, until both hubs' journals were empty.
    pub drain: Duration,
    /// Declines by reason.
    pub declines: std::collections::BTreeMap<String, usize>,
    /// Highest unreconciled offline amount of one account over all stores, from the history.
    pub max_account_exposure: i64,
    /// Highest unreconciled offline amount of one store seen on its hub's metric.
    pub max_store_exposure: i64,
}

struct World {
    dir: PathBuf,
    broker: Mosquitto,
    cloud: Service,
    sites: Vec<StoreSite>,
}

impl World {
    fn hub_addrs(&self) -> Vec<SocketAddr> {
        self.sites.iter().map(|s| s.hub_http()).collect()
    }
}

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn now_ms() -> u64 {
    paycode::now_ms()
}

/// Runs the harness under `dir` and checks the history; the error names the seed.
pub fn run(dir: &Path, config: &ChaosConfig) -> anyhow::Result<Report> {
    let steps = schedule(config.seed, config.duration);
    eprintln!("chaos: seed {} ({} faults)", config.seed, steps.len());
    for s in &steps {
        eprintln!(
            "chaos:   at {:>6.1} s {:?} for {:.1} s",
            s.at.as_secs_f32(),
            s.fault,
            s.hold.as_secs_f32()
        );
    }
    run_steps(dir, config, &steps).with_context(|| {
        format!(
            "chaos run failed; replay it with FACEPAY_CHAOS_SEED={}",
            config.seed
        )
    })
}

fn run_steps(dir: &Path, config: &ChaosConfig, steps: &[Step]) -> anyhow::Result<Report> {
    let broker = Mosquitto::start(dir)?;
    let cloud = start_cloud(&dir.join("cloud"), broker.port)?;
    let api = CloudApi::new(cloud.http_addr);
    let open = |id: &str, kind, balance, key: Option<String>| {
        api.open(&OpenAccount {
            account_id: id.into(),
            kind,
            currency: eur(),
            initial_balance_minor: balance,
            public_key: key,
        })
    };
    let stores = ["store-1", "store-2"];
    for store in stores {
        open(store, AccountKind::Merchant, 0, None)?;
    }
    let mut wallets = Vec::new();
    for n in 0..config.customers {
        let wallet = Wallet::from_seed(&format!("cust-{n}"), [n as u8 + 1; 32])?;
        open(
            wallet.account_id(),
            AccountKind::Customer,
            config.balance_minor,
            Some(wallet.public_key_b64()),
        )?;
        wallets.push(Arc::new(wallet));
    }
    let hub_extra = [
        format!(
            "offline.payment_ceiling_minor={}",
            config.payment_ceiling_minor
        ),
        format!("offline.store_ceiling_minor={}", config.store_ceiling_minor),
    ];
    let mut sites = Vec::new();
    for store in stores {
        let site = StoreSite::start(dir, store, broker.port, config.terminals, &hub_extra)?;
        api.set_hub_key(store, &site.hub_key())?;
        crate::wait_for_keys(site.hub_http(), config.customers, Duration::from_secs(30))?;
        sites.push(site);
    }
    // Every customer pays once online at every store: the cloud grants the allowances.
    for site in &sites {
        for wallet in &wallets {
            let (edge, frames) = &site.edges[0];
            present_code(frames, wallet)?;
            let order = format!("prime-{}", wallet.account_id());
            let (_, r) = charge(edge.http_addr, &order, 1, "EUR")?;
            if r.status != ChargeStatus::Approved {
                bail!("priming {order} at {}: {r:?}", site.store_id);
            }
        }
    }
    let issued: i64 = config.balance_minor * config.customers as i64;

    let world = Arc::new(Mutex::new(World {
        dir: dir.to_owned(),
        broker,
        cloud,
        sites,
    }));
    let history = Arc::new(Mutex::new(Vec::<Op>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let max_store_exposure = Arc::new(Mutex::new(0i64));

    // The terminals: each pays in a loop with its own generator.
    let terminals: Vec<(String, SocketAddr, PathBuf)> = {
        let w = world.lock().unwrap();
        w.sites
            .iter()
            .flat_map(|s| {
                s.edges
                    .iter()
                    .map(|(e, f)| (s.store_id.clone(), e.http_addr, f.clone()))
            })
            .collect()
    };
    let mut workers = Vec::new();
    for (t, (store, edge, frames)) in terminals.into_iter().enumerate() {
        let (history, stop, wallets) = (history.clone(), stop.clone(), wallets.clone());
        let seed = config.seed.wrapping_add(1 + t as u64);
        workers.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let wallet = &wallets[rng.below(wallets.len() as u64) as usize];
                let amount = 50 + rng.below(1_200) as i64;
                let order = format!("t{t}-{n}");
                let outcome = match present_code(&frames, wallet)
                    .and_then(|_| charge(edge, &order, amount, "EUR"))
                {
                    Ok((_, r)) if r.status == ChargeStatus::Approved => {
                        Outcome::Ok { offline: r.offline }
                    }
                    Ok((_, r)) => match r.reason {
                        // The terminal could not tell whether the hub acted on it.
                        Some(DeclineReason::StoreSystemUnreachable) | None => {
                            Outcome::Unknown(r.detail)
                        }
                        Some(reason) => Outcome::Failed(reason),
                    },
                    Err(e) => Outcome::Unknown(e.to_string()),
                };
                history.lock().unwrap().push(Op {
                    store: store.clone(),
                    payment_id: format!("{store}:{order}"),
                    account: wallet.account_id().to_owned(),
                    amount_minor: amount,
                    answered_ms: now_ms(),
                    outcome,
                });
            }
        }));
    }
    // The exposure monitor: each hub's unreconciled offline total, while it is up.
    let monitor = {
        let (world, stop, max) = (world.clone(), stop.clone(), max_store_exposure.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let addrs: Vec<SocketAddr> = world.lock().unwrap().hub_addrs();
                for addr in addrs {
                    if let Ok(page) = crate::get_text(&format!("http://{addr}/metrics")) {
                        if let Some(v) =
                            crate::metric_value(&page, "facepay_hub_offline_exposure_minor")
                        {
                            let mut m = max.lock().unwrap();
                            *m = (*m).max(v as i64);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // The faults, on schedule.
    let started = Instant::now();
    let mut fault_error = None;
    let mut drain = Duration::ZERO;
    for step in steps {
        if let Some(wait) = step.at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        match inject(&world, step).and_then(|_| drained(&world)) {
            Ok(took) => drain = drain.max(took),
            Err(e) => {
                fault_error = Some(e);
                break;
            }
        }
    }
    if let Some(wait) = config.duration.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let _ = monitor.join();
    if let Some(e) = fault_error {
        return Err(e.context("injecting a fault"));
    }

    // Heal everything (every fault was healed after its hold) and wait for the journals.
    let (cloud_http, hubs) = {
        let w = world.lock().unwrap();
        for s in &w.sites {
            s.uplink.heal();
            s.downlink.heal();
        }
        (w.cloud.http_addr, w.hub_addrs())
    };
    for hub in &hubs {
        crate::wait_for_metric(
            *hub,
            "facepay_hub_offline_backlog",
            0.0,
            Duration::from_secs(120),
        )
        .context("a hub's journal did not drain")?;
    }
    let api = CloudApi::new(cloud_http);
    let history = history.lock().unwrap().clone();
    // Voids of timed-out attempts go on reconnect: give them a moment to land.
    let deadline = Instant::now() + Duration::from_secs(30);
    let checked = loop {
        match check(&api, &history, issued) {
            Ok(max) => break Ok(max),
            Err(e) if Instant::now() > deadline => break Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let max_account_exposure = checked?;
    let max_store = *max_store_exposure.lock().unwrap();
    if max_store > config.store_ceiling_minor {
        bail!(
            "a hub held {max_store} unreconciled, above its ceiling {}",
            config.store_ceiling_minor
        );
    }
    if max_account_exposure > config.account_cap_minor {
        bail!(
            "an account had {max_account_exposure} unreconciled offline, above the cap {}",
            config.account_cap_minor
        );
    }
    let mut declines = std::collections::BTreeMap::new();
    for op in &history {
        if let Outcome::Failed(reason) = &op.outcome {
            *declines.entry(reason.to_string()).or_default() += 1;
        }
    }
    let count = |f: fn(&Outcome) -> bool| history.iter().filter(|o| f(&o.outcome)).count();
    Ok(Report {
        seed: config.seed,
        faults: steps.len(),
        invoked: history.len(),
        ok: count(|o| matches!(o, Outcome::Ok { .. })),
        ok_offline: count(|o| matches!(o, Outcome::Ok { offline: true })),
        failed: count(|o| matches!(o, Outcome::Failed(_))),
        unknown: count(|o| matches!(o, Outcome::Unknown(_))),
        drain,
        declines,
        max_account_exposure,
        max_store_exposure: max_store,
    })
}

/// Longest a healed hub may take to empty its journal before the run fails.
pub const DRAIN_BOUND: Duration = Duration::from_secs(60);

/// After a fault is healed: how long until both hubs' journals are empty (payments keep flowing,
/// so new offline approvals can only come from a fault still being noticed).
fn drained(world: &Arc<Mutex<World>>) -> anyhow::Result<Duration> {
    let healed = Instant::now();
    let hubs: Vec<SocketAddr> = world.lock().unwrap().hub_addrs();
    for hub in hubs {
        crate::wait_for_metric(hub, "facepay_hub_offline_backlog", 0.0, DRAIN_BOUND)
            .context("a healed hub's journal did not drain")?;
    }
    Ok(healed.elapsed())
}

fn inject(world: &Arc<Mutex<World>>, step: &Step) -> anyhow::Result<()> {
    let mut w = world.lock().unwrap();
    match step.fault {
        Fault::PartitionHub(i) => w.sites[i].uplink.cut(),
        Fault::PartitionTerminals(i) => w.sites[i].downlink.cut(),
        Fault::PartitionBoth(i) => {
            w.sites[i].uplink.cut();
            w.sites[i].downlink.cut();
        }
        Fault::KillHub(i) => w.sites[i].hub.kill(),
        Fault::KillCloud => w.cloud.kill(),
        Fault::RestartBroker => {
            let dir = w.dir.clone();
            let port = w.broker.port;
            w.broker
                .restart(&dir)
                .with_context(|| format!("restarting the broker on {port}"))?;
        }
    }
    drop(w);
    std::thread::sleep(step.hold);
    let mut w = world.lock().unwrap();
    match step.fault {
        Fault::PartitionHub(i) => w.sites[i].uplink.heal(),
        Fault::PartitionTerminals(i) => w.sites[i].downlink.heal(),
        Fault::PartitionBoth(i) => {
            w.sites[i].uplink.heal();
            w.sites[i].downlink.heal();
        }
        Fault::KillHub(i) => w.sites[i].restart_hub()?,
        Fault::KillCloud => {
            let dir = w.dir.join("cloud");
            w.cloud = start_cloud(&dir, w.broker.port)?;
        }
        Fault::RestartBroker => {}
    }
    Ok(())
}

/// Checks the history against the ledger; returns the highest unreconciled offline amount one
/// account had over all stores at once.
pub fn check(api: &CloudApi, history: &[Op], issued: i64) -> anyhow::Result<i64> {
    let transfers = api.transfers()?;
    let by_id: HashMap<&str, &protocol::TransferView> = transfers
        .iter()
        .map(|t| (t.transfer_id.as_str(), t))
        .collect();
    // A payment's live transfers: under its id or `#offline`, not reversed by `#void`.
    let live = |id: &str| -> Vec<&protocol::TransferView> {
        let reversed = by_id.contains_key(format!("{id}#void").as_str());
        let mut found = Vec::new();
        if let (Some(t), false) = (by_id.get(id), reversed) {
            found.push(*t);
        }
        if let Some(t) = by_id.get(format!("{id}#offline").as_str()) {
            found.push(*t);
        }
        found
    };
    let mut problems = Vec::new();
    let mut intervals: HashMap<&str, Vec<(u64, u64, i64)>> = HashMap::new();
    for op in history {
        let found = live(&op.payment_id);
        match &op.outcome {
            Outcome::Ok { offline } => {
                if found.len() != 1 {
                    problems.push(format!(
                        "{} approved but {} times in the ledger",
                        op.payment_id,
                        found.len()
                    ));
                } else if found[0].amount_minor != op.amount_minor
                    || found[0].debit_account_id != op.account
                {
                    problems.push(format!(
                        "{} approved as {} from {}, ledger has {:?}",
                        op.payment_id, op.amount_minor, op.account, found[0]
                    ));
                } else if *offline {
                    intervals.entry(op.account.as_str()).or_default().push((
                        op.answered_ms,
                        found[0].applied_at_ms,
                        op.amount_minor,
                    ));
                }
            }
            Outcome::Failed(reason) => {
                if !found.is_empty() {
                    problems.push(format!(
                        "{} declined ({reason}) but in the ledger",
                        op.payment_id
                    ));
                }
            }
            Outcome::Unknown(_) => {
                if found.len() > 1 {
                    problems.push(format!(
                        "{} in the ledger {} times",
                        op.payment_id,
                        found.len()
                    ));
                }
            }
        }
    }
    // Every store payment in the ledger was invoked by the workload (or priming).
    let invoked: std::collections::HashSet<&str> =
        history.iter().map(|o| o.payment_id.as_str()).collect();
    for t in &transfers {
        let base = t
            .transfer_id
            .trim_end_matches("#offline")
            .trim_end_matches("#void");
        if base.starts_with("store-") && !base.contains(":prime-") && !invoked.contains(base) {
            problems.push(format!("{} in the ledger was never invoked", t.transfer_id));
        }
    }
    // Money is conserved: customers and stores hold exactly what was issued.
    let accounts = api.accounts()?;
    let held: i64 = accounts
        .iter()
        .filter(|a| a.kind != AccountKind::Issuance)
        .map(|a| a.balance_minor)
        .sum();
    if held != issued {
        problems.push(format!("accounts hold {held}, {issued} was issued"));
    }
    api.assert_books_balance()?;
    if !problems.is_empty() {
        bail!("{} problems:\n  {}", problems.len(), problems.join("\n  "));
    }
    // Offline exposure per account over time: approved (answered) until applied at the cloud.
    let mut max = 0;
    for spans in intervals.values() {
        let mut events: Vec<(u64, i64)> = spans
            .iter()
            .flat_map(|&(from, to, amount)| [(from, amount), (to.max(from), -amount)])
            .collect();
        events.sort_by_key(|&(t, delta)| (t, delta));
        let mut level = 0;
        for (_, delta) in events {
            level += delta;
            max = max.max(level);
        }
    }
    Ok(max)
}
