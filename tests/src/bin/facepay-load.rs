//! `facepay-load`: the fleet under load on loopback — PostgreSQL (its own server, every commit
//! flushed, mutual TLS), a three-node NATS cluster (or one Mosquitto), several cloud instances
//! sharing the database, and stores x terminals as real processes, every link TLS and mutually
//! authenticated. Each terminal's register charges orders paid with fresh payment codes as fast
//! as it hears answers, every terminal at once; the bench reports payments/s and p50/p99 from
//! the register's request to its answer, where that time goes (each tier's mean decision time,
//! from its own histograms: the terminal's, the hub's, the cloud's), what each tier spent in CPU
//! per payment (the figures a fleet is sized by), then checks the books: every payment heard
//! approved moved once, none heard declined moved, and the ledger balances. With `--offline`
//! every store is cut from the cloud once warmed up: the hubs approve alone, and reconcile
//! when the run ends.
//!
//! Run it in release: `cargo run --release --bin facepay-load -- --stores 4 --terminals 4`.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use paycode::Wallet;
use protocol::{
    AccountKind, ChargeResult, ChargeStatus, CreateCustomer, SecondFactorKind, VerifyReply,
};
use serde::Serialize;
use tests::{
    charge, charge_with_token, ensure_identity, open_account, present_code, present_face,
    start_cloud_with, store::StoreSite, Broker, CloudApi, EnrollApi, Mosquitto, NatsCluster,
    Service,
};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-load",
    about = "stores x terminals paying at once against a fleet on loopback"
)]
struct Cli {
    /// Stores, each a hub process.
    #[arg(long, default_value_t = 4)]
    stores: usize,
    /// Terminals per store, each an edge process with its own register.
    #[arg(long, default_value_t = 2)]
    terminals: usize,
    /// Cloud instances sharing the database.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// The broker: a three-node NATS cluster (MQTT on JetStream) or one Mosquitto.
    #[arg(long, value_enum, default_value_t = BrokerKind::Nats)]
    broker: BrokerKind,
    /// Seconds every register keeps charging once every store is served online.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Each register starts a payment every this many milliseconds (the registers' starts spread
    /// evenly over the interval), or at once when the last one took longer; 0: each starts the
    /// next payment as soon as the last is answered, as fast as the fleet allows.
    #[arg(long, default_value_t = 0)]
    every_ms: u64,
    /// For the paper model: stores in the fleet to size.
    #[arg(long, default_value_t = 2000)]
    model_stores: usize,
    /// For the paper model: terminals per store.
    #[arg(long, default_value_t = 10)]
    model_terminals: usize,
    /// For the paper model: at the busiest hour, a terminal takes one payment every this many
    /// seconds.
    #[arg(long, default_value_t = 30.0)]
    model_seconds_per_payment: f64,
    /// Cut every store from the cloud once every terminal was served online: the hubs approve
    /// alone (the offline path), and reconcile once the link heals after the run.
    #[arg(long)]
    offline: bool,
    /// How the customers pay: a fresh payment code before the scanner (`code`), the face at the
    /// camera (`face`: a verification, then a charge with its token), or both (`code-and-face`).
    #[arg(long, value_enum, default_value_t = Pay::Code)]
    pay: Pay,
    /// For `--pay face` and `code-and-face`: Labeled Faces in the Wild (one directory per
    /// person). Each terminal's customer is enrolled with the first photo of a person of their
    /// own (people whose photo the enrollment refuses are skipped) and shows that photo.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/lfw/lfw-deepfunneled"))]
    faces: std::path::PathBuf,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Pay {
    Code,
    Face,
    CodeAndFace,
}

/// A terminal's customer: the wallet its codes come from, and the photo its face is shown by.
struct Customer {
    wallet: Wallet,
    photo: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum BrokerKind {
    Nats,
    Mosquitto,
}

/// One order a register charged.
struct Heard {
    store: usize,
    terminal: usize,
    order: String,
    amount: i64,
    /// The first answer (what the customer waited for).
    first: ChargeStatus,
    /// The final answer, once an unknown outcome was asked again.
    status: ChargeStatus,
    /// Approved offline (final answer).
    offline: bool,
    /// From the register's first request (the verification's, when there is one) to the
    /// charge's first answer.
    latency: Duration,
    /// Of `latency`, the verification's (face paths).
    verification: Option<Duration>,
    /// Why the first answer declined (the verification's refusal, or the charge's decline).
    reason: Option<String>,
    /// Charged while warming up (not counted in the figures, checked in the books).
    warming: bool,
}

/// Charges `order` at a terminal once its customer has shown what `pay` asks (a fresh code
/// before the scanner, the face at the camera, or both, then a verification for the token),
/// and asks again with the same order (and token) while the outcome is unknown, as a register
/// must. A verification refused is heard as a declined payment.
fn charge_order(
    (store, terminal): (usize, usize),
    (edge, frames): (&Service, &Path),
    (pay, customer): (Pay, &Customer),
    order: String,
    amount: i64,
    warming: bool,
) -> anyhow::Result<Heard> {
    let heard = |(first, reason): (ChargeStatus, Option<String>),
                 (status, offline),
                 latency,
                 verification| Heard {
        store,
        terminal,
        order: order.clone(),
        amount,
        first,
        status,
        offline,
        latency,
        verification,
        reason,
        warming,
    };
    let reason_of = |reason: &Option<protocol::DeclineReason>| {
        reason.as_ref().map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{r:?}"))
        })
    };
    // What the customer shows is before the scanner or camera when the register asks (as a
    // fresh code always was): the time starts at the register's first request.
    if pay != Pay::Face {
        present_code(frames, &customer.wallet)?;
    }
    if pay != Pay::Code {
        let photo = customer
            .photo
            .as_deref()
            .context("a face customer has a photo")?;
        present_face(&frames.join("camera"), photo)?;
    }
    let asked = Instant::now();
    let (token, verification) = match pay {
        Pay::Code => (None, None),
        Pay::Face | Pay::CodeAndFace => {
            let method = if pay == Pay::Face {
                "face"
            } else {
                "code_and_face"
            };
            match tests::verify(edge.http_addr, method)?.1 {
                VerifyReply::Verified { token, .. } => (Some(token), Some(asked.elapsed())),
                refused => {
                    if warming {
                        eprintln!(
                            "store {store} till-{terminal}: verification refused: {refused:?}"
                        );
                    }
                    let latency = asked.elapsed();
                    let reason = match &refused {
                        VerifyReply::Refused { reason, .. } => reason_of(&Some(*reason)),
                        _ => Some("second_factor_required".into()),
                    };
                    let declined = (ChargeStatus::Declined, false);
                    return Ok(heard(
                        (ChargeStatus::Declined, reason),
                        declined,
                        latency,
                        Some(latency),
                    ));
                }
            }
        }
    };
    let pay_now = || -> anyhow::Result<ChargeResult> {
        Ok(match &token {
            None => charge(edge.http_addr, &order, amount, "EUR")?.1,
            Some(token) => charge_with_token(edge.http_addr, &order, amount, "EUR", token)?.1,
        })
    };
    let first = pay_now()?;
    let latency = asked.elapsed();
    let mut last = first.clone();
    let give_up = Instant::now() + Duration::from_secs(30);
    while last.status == ChargeStatus::Unknown {
        if Instant::now() > give_up {
            bail!("{order} at store {store} till-{terminal} still unknown after 30 s: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
        if token.is_none() {
            present_code(frames, &customer.wallet)?;
        }
        last = pay_now()?;
    }
    Ok(heard(
        (first.status, reason_of(&first.reason)),
        (last.status, last.offline),
        latency,
        verification,
    ))
}

/// Each store's customers, one per terminal (`<store>-customer-<t>`), with `opening` in their
/// accounts: opened with a wallet for code payments, or enrolled over the cloud's HTTPS
/// enrollment API with a wallet and a face for the face paths (the next person of `--faces`
/// whose photo the enrollment takes).
fn customers(
    cli: &Cli,
    cloud: &Service,
    api: &CloudApi,
    stores: &[String],
    opening: i64,
) -> anyhow::Result<Vec<Vec<Customer>>> {
    if cli.pay == Pay::Code {
        return Ok(stores
            .iter()
            .map(|store| {
                (0..cli.terminals)
                    .map(|t| Customer {
                        wallet: open_account(
                            api,
                            &format!("{store}-customer-{t}"),
                            AccountKind::Customer,
                            opening,
                        )
                        .expect("a customer gets a wallet"),
                        photo: None,
                    })
                    .collect()
            })
            .collect());
    }
    let enroll = EnrollApi::new(
        &cloud.ready["api"],
        Path::new(&cloud.ready["ca"]),
        Path::new(&cloud.ready["token"]),
    )?;
    let mut people = std::fs::read_dir(&cli.faces)
        .with_context(|| format!("--faces {}", cli.faces.display()))?
        .map(|e| Ok(e?.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    people.sort();
    let mut photos = people.into_iter().filter_map(|dir| {
        let name = dir.file_name()?.to_str()?.to_owned();
        Some(dir.join(format!("{name}_0001.jpg"))).filter(|p| p.is_file())
    });
    let mut all = Vec::new();
    for store in stores {
        let mut here = Vec::new();
        for t in 0..cli.terminals {
            let id = format!("{store}-customer-{t}");
            let wallet = Wallet::generate(&id)?;
            let (status, body) = enroll.create(&CreateCustomer {
                customer_id: id.clone(),
                name: format!("Load customer {id}"),
                phone: "+49 30 1234 5678".into(),
                pin: "4711".into(),
                second_factor: SecondFactorKind::Pin,
                home_store_id: store.as_str().into(),
                currency: "EUR".into(),
                initial_balance_minor: opening,
                public_key: Some(wallet.public_key_b64()),
            })?;
            if status != 201 {
                bail!("enrolling {id}: {status} {body}");
            }
            let photo = loop {
                let photo = photos
                    .next()
                    .with_context(|| format!("--faces {}: out of people", cli.faces.display()))?;
                // A photo the enrollment refuses (no single live face, a look-alike of
                // someone enrolled) is skipped; a failing cloud stops the run.
                let (status, body) = enroll.add_face(&id, &photo, &[])?;
                match status {
                    201 => break photo,
                    400..=499 => continue,
                    _ => bail!("enrolling {id}'s face {}: {status} {body}", photo.display()),
                }
            };
            here.push(Customer {
                wallet,
                photo: Some(photo),
            });
        }
        all.push(here);
    }
    Ok(all)
}

/// CPU a tier's processes spent, in clock ticks (user + system, every thread).
#[derive(Default, Clone)]
struct Ticks(BTreeMap<&'static str, u64>);

/// Ticks of `pid` (every thread), or 0 once it is gone.
fn process_ticks(pid: u32) -> u64 {
    stat_fields(pid, &[11, 12])
}

/// Ticks of `pid` and of its children that have ended (PostgreSQL's postmaster: a backend that
/// exits during the run leaves its time there).
fn process_and_ended_children_ticks(pid: u32) -> u64 {
    stat_fields(pid, &[11, 12, 13, 14])
}

/// The sum of fields of `/proc/<pid>/stat`, counted from the state after the command name.
fn stat_fields(pid: u32, wanted: &[usize]) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the command name (which may hold spaces): state, ppid, ..., utime (14th), stime.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    wanted
        .iter()
        .filter_map(|&n| fields.get(n).and_then(|f| f.parse::<u64>().ok()))
        .sum()
}

/// The children of `parent` (PostgreSQL's backends are children of its postmaster).
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// The process ids of each tier.
struct Tiers {
    groups: Vec<(&'static str, Vec<u32>)>,
    postgres: u32,
}

impl Tiers {
    fn ticks(&self) -> Ticks {
        let mut out = Ticks::default();
        for (tier, pids) in &self.groups {
            *out.0.entry(tier).or_default() += pids.iter().map(|&p| process_ticks(p)).sum::<u64>();
        }
        let mut pg = process_and_ended_children_ticks(self.postgres);
        pg += children(self.postgres)
            .into_iter()
            .map(process_ticks)
            .sum::<u64>();
        out.0.insert("postgres", pg);
        out
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

#[derive(Serialize)]
struct TierCost {
    tier: &'static str,
    processes: usize,
    /// CPU spent during the run, seconds.
    cpu_seconds: f64,
    /// CPU per payment, milliseconds.
    cpu_ms_per_payment: f64,
}

#[derive(Serialize)]
struct ModelLine {
    tier: &'static str,
    cores_at_peak: f64,
}

/// Where a payment's time goes, from each tier's decision histogram.
#[derive(Serialize)]
struct Stage {
    stage: &'static str,
    /// Mean over the run, milliseconds.
    mean_ms: f64,
}

/// A histogram's sum and count over some processes, read from their `/metrics`.
#[derive(Default, Clone, Copy)]
struct Observed {
    sum: f64,
    count: f64,
}

impl Observed {
    /// Each histogram of `names` (every label value) added up over the processes at `addrs`,
    /// each process's page fetched once.
    fn read<const N: usize>(addrs: &[std::net::SocketAddr], names: [&str; N]) -> [Self; N] {
        let mut totals = [Observed::default(); N];
        for addr in addrs {
            if let Ok(page) = tests::get_text(&format!("http://{addr}/metrics")) {
                for (total, name) in totals.iter_mut().zip(names) {
                    total.sum += tests::metric_sum(&page, &format!("{name}_sum")).unwrap_or(0.0);
                    total.count +=
                        tests::metric_sum(&page, &format!("{name}_count")).unwrap_or(0.0);
                }
            }
        }
        totals
    }

    /// The mean of what was observed after `before`, milliseconds.
    fn mean_ms_since(&self, before: &Observed) -> f64 {
        let count = self.count - before.count;
        if count <= 0.0 {
            return 0.0;
        }
        (self.sum - before.sum) * 1000.0 / count
    }
}

/// The processes whose decision histograms make the stages.
struct StageSources {
    edges: Vec<std::net::SocketAddr>,
    hubs: Vec<std::net::SocketAddr>,
    clouds: Vec<std::net::SocketAddr>,
}

impl StageSources {
    /// The terminals', hubs' and cloud's decision histograms, and the hubs' 1:N search.
    fn read(&self) -> [Observed; 4] {
        let [edge] = Observed::read(&self.edges, ["facepay_edge_payment_decision_seconds"]);
        let [hub, search] = Observed::read(
            &self.hubs,
            [
                "facepay_hub_payment_decision_seconds",
                "facepay_hub_identify_seconds",
            ],
        );
        let [cloud] = Observed::read(&self.clouds, ["facepay_cloud_payment_decision_seconds"]);
        [edge, hub, cloud, search]
    }
}

/// The stages, from the histograms read before and after the run and the register's mean.
fn stages(before: &[Observed; 4], after: &[Observed; 4], register_mean_ms: f64) -> Vec<Stage> {
    let [edge, hub, cloud] = [0, 1, 2].map(|i| after[i].mean_ms_since(&before[i]));
    let mut out = vec![
        Stage {
            stage: "register HTTP and the scan (register's time less the terminal's decision)",
            mean_ms: register_mean_ms - edge,
        },
        Stage {
            stage: "terminal and Zenoh (the terminal's decision less the hub's)",
            mean_ms: edge - hub,
        },
    ];
    if cloud > 0.0 {
        out.push(Stage {
            stage: "hub, MQTT and broker (the hub's decision less the cloud's)",
            mean_ms: hub - cloud,
        });
        out.push(Stage {
            stage: "cloud: lane, payer check, ledger transaction and flush",
            mean_ms: cloud,
        });
    } else {
        out.push(Stage {
            stage: "hub alone: offline rules, signing, journal flush",
            mean_ms: hub,
        });
    }
    out
}

#[derive(Serialize)]
struct Report {
    stores: usize,
    terminals_per_store: usize,
    cloud_instances: usize,
    broker: BrokerKind,
    offline: bool,
    pay: Pay,
    /// Each register's pace (0: as fast as answered).
    every_ms: u64,
    seconds: f64,
    payments: usize,
    payments_per_second: f64,
    approved_online: usize,
    approved_offline: usize,
    declined: usize,
    /// The first answers declined, by reason.
    declines: BTreeMap<String, usize>,
    unknown: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    /// Of the register's time, the verification's (face paths; 0 for codes).
    verification_p50_ms: f64,
    verification_p99_ms: f64,
    verification_mean_ms: f64,
    stages: Vec<Stage>,
    tiers: Vec<TierCost>,
    model_payments_per_second: f64,
    model: Vec<ModelLine>,
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.stores == 0 || cli.terminals == 0 || cli.instances == 0 {
        bail!("--stores, --terminals and --instances must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let stores: Vec<String> = (1..=cli.stores).map(|n| format!("store-{n}")).collect();
    eprintln!(
        "starting: PostgreSQL, {}, {} cloud instances, {} stores x {} terminals",
        match cli.broker {
            BrokerKind::Nats => "a three-node NATS cluster",
            BrokerKind::Mosquitto => "Mosquitto",
        },
        cli.instances,
        cli.stores,
        cli.terminals
    );
    // Every certificate first: a hub reads its terminals' when it starts.
    ensure_identity(&pki::Identity::database())?;
    for n in 1..=cli.instances {
        ensure_identity(&pki::Identity::cloud_instance(&n.to_string())?)?;
    }
    for store in &stores {
        ensure_identity(&pki::Identity::hub(store)?)?;
        for t in 0..cli.terminals {
            ensure_identity(&pki::Identity::edge(store, &format!("till-{t}"))?)?;
        }
    }
    let pki_dir = tests::test_pki();
    let postgres = pgtest::Postgres::start_tls_durable(&pgtest::ServerTls {
        ca: pki_dir.join("ca.pem"),
        cert: pki_dir.join("database.pem"),
        key: pki_dir.join("database.key"),
    })
    .map_err(anyhow::Error::msg)?;
    let url = postgres.url();
    let broker = match cli.broker {
        BrokerKind::Mosquitto => Broker::Single(Mosquitto::start(dir.path())?),
        BrokerKind::Nats => Broker::Cluster(NatsCluster::start(
            dir.path(),
            3,
            &mqtt::nats::Clients {
                stores: stores.clone(),
                cloud_instances: (1..=cli.instances).map(|n| n.to_string()).collect(),
            },
        )?),
    };
    let mut clouds: Vec<Service> = Vec::new();
    for n in 1..=cli.instances {
        let (port, failover) = broker.for_client(n - 1);
        let mut extra = vec![
            // Allowances large enough for a whole offline run (`--offline`).
            "offline.store_allowance_minor=100000000".into(),
            "offline.account_cap_minor=100000000".into(),
            "database.backend=\"postgres\"".into(),
            format!("database.url={url:?}"),
            format!("fleet.instance=\"{n}\""),
            format!("template_key_file={:?}", dir.path().join("templates.key")),
        ];
        extra.extend(failover);
        clouds.push(
            start_cloud_with(&dir.path().join(format!("cloud-{n}")), port, &extra)
                .with_context(|| format!("cloud instance {n} starts"))?,
        );
    }
    let api = CloudApi::new(clouds[0].http_addr);
    for store in &stores {
        open_account(&api, store, AccountKind::Merchant, 0);
    }
    // One customer per terminal, so that terminals do not queue on one account.
    let opening = 1_000_000_000;
    let shoppers = customers(&cli, &clouds[0], &api, &stores, opening)?;
    let customers = cli.stores * cli.terminals;
    let mut sites = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        let (port, mut extra) = broker.for_client(i);
        extra.extend([
            "offline.payment_ceiling_minor=100000".to_string(),
            "offline.store_ceiling_minor=100000000".to_string(),
            // A terminal holds at most 64 payment tokens open, and a token a charge was made
            // with stays open until it expires (a register that missed the answer asks again
            // with it): one terminal paying by face as fast as it can takes more than 64 in
            // the default 120 s.
            "identify.token_ttl_seconds=5".to_string(),
        ]);
        let site = StoreSite::start(dir.path(), store, port, cli.terminals, &extra)
            .with_context(|| format!("{store} starts"))?;
        api.set_hub_key(store, &site.hub_key())?;
        tests::wait_for_keys(site.hub_http(), customers, Duration::from_secs(60))?;
        sites.push(site);
    }
    // Until every terminal is approved online once (a cluster just started may still be
    // electing its leaders).
    let warming = Instant::now();
    let mut heard: Vec<Heard> = Vec::new();
    for (i, site) in sites.iter().enumerate() {
        for (t, (edge, frames)) in site.edges.iter().enumerate() {
            for n in 0.. {
                let order = format!("warm-{t}-{n}");
                let answer = charge_order(
                    (i, t),
                    (edge, frames),
                    (cli.pay, &shoppers[i][t]),
                    order,
                    100,
                    true,
                )?;
                let served = answer.status == ChargeStatus::Approved && !answer.offline;
                heard.push(answer);
                if served {
                    break;
                }
                if warming.elapsed() > Duration::from_secs(120) {
                    bail!("{} till-{t} not approved online in 120 s", site.store_id);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    eprintln!(
        "every terminal served online after {:.1} s; charging for {} s",
        warming.elapsed().as_secs_f64(),
        cli.seconds
    );

    let mut groups: Vec<(&'static str, Vec<u32>)> = vec![
        ("cloud", clouds.iter().map(Service::pid).collect()),
        ("broker", broker.pids()),
        ("hub", sites.iter().map(|s| s.hub.pid()).collect()),
        (
            "edge",
            sites
                .iter()
                .flat_map(|s| s.edges.iter().map(|(e, _)| e.pid()))
                .collect(),
        ),
    ];
    groups.push(("load", vec![std::process::id()]));
    let tiers = Tiers {
        groups,
        postgres: postgres.pid().map_err(anyhow::Error::msg)?,
    };
    if cli.offline {
        for site in &sites {
            site.uplink.cut();
            site.wait_connected(false, Duration::from_secs(30))?;
        }
        eprintln!("every store cut from the cloud: the hubs approve alone");
    }
    let sources = StageSources {
        edges: sites
            .iter()
            .flat_map(|s| s.edges.iter().map(|(e, _)| e.metrics_addr))
            .collect(),
        hubs: sites.iter().map(|s| s.hub.metrics_addr).collect(),
        clouds: clouds.iter().map(|c| c.metrics_addr).collect(),
    };
    let observed_before = sources.read();
    let before = tiers.ticks();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cli.seconds);
    let charged: Mutex<Vec<Heard>> = Mutex::default();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let every = Duration::from_millis(cli.every_ms);
        let count = sites.iter().map(|site| site.edges.len()).sum::<usize>() as u32;
        let registers: Vec<_> = sites
            .iter()
            .enumerate()
            .flat_map(|(i, site)| site.edges.iter().enumerate().map(move |(t, e)| (i, t, e)))
            .enumerate()
            .map(|(k, (i, t, (edge, frames)))| {
                let customer = (cli.pay, &shoppers[i][t]);
                let charged = &charged;
                s.spawn(move || -> anyhow::Result<()> {
                    let mut n = 0u64;
                    // Paced: this register's first payment a k-th of the interval in.
                    let mut next = started + every * k as u32 / count;
                    while Instant::now() < deadline {
                        if !every.is_zero() {
                            std::thread::sleep(
                                next.min(deadline).saturating_duration_since(Instant::now()),
                            );
                            // The next one an interval later, or at once if this one is late.
                            next = (next + every).max(Instant::now());
                            if Instant::now() >= deadline {
                                break;
                            }
                        }
                        n += 1;
                        let amount = 100 + (n % 900) as i64;
                        let order = format!("load-{t}-{n}");
                        let answer =
                            charge_order((i, t), (edge, frames), customer, order, amount, false)?;
                        charged.lock().expect("not poisoned").push(answer);
                    }
                    Ok(())
                })
            })
            .collect();
        for register in registers {
            register.join().expect("a register does not panic")?;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed();
    let after = tiers.ticks();
    let observed_after = sources.read();
    heard.extend(charged.into_inner().expect("not poisoned"));
    let mut report = report(&cli, &heard, elapsed, &before, &after, &tiers);
    report.stages = stages(
        &observed_before,
        &observed_after,
        report.mean_ms - report.verification_mean_ms,
    );
    match cli.pay {
        Pay::Code => {}
        // The verification: the hub's 1:N search of its hot set, and the rest (the camera
        // spool, the terminal's face pipeline, Zenoh, the hub's checks).
        Pay::Face => {
            let search_ms = observed_after[3].mean_ms_since(&observed_before[3]);
            report.stages.splice(
                0..0,
                [
                    Stage {
                        stage: "verification: camera, the terminal's face pipeline, Zenoh, hub \
                                checks (the register's verify time less the hub's search)",
                        mean_ms: report.verification_mean_ms - search_ms,
                    },
                    Stage {
                        stage: "verification: the hub's 1:N search of its hot set",
                        mean_ms: search_ms,
                    },
                ],
            );
        }
        // The code names the account: the hub compares the face with its templates (1:1).
        Pay::CodeAndFace => report.stages.insert(
            0,
            Stage {
                stage: "verification: camera and scan, the terminal's face pipeline, Zenoh, the \
                        hub's code check and 1:1 comparison (the register's verify time)",
                mean_ms: report.verification_mean_ms,
            },
        ),
    }
    if cli.offline {
        for site in &sites {
            site.uplink.heal();
        }
    }
    print_report(&cli, &report)?;
    check_books(&api, &stores, &heard, &shoppers, opening)?;
    eprintln!(
        "books: every payment heard approved moved once, none heard declined moved; balanced"
    );
    drop(sites);
    drop(clouds);
    drop(broker);
    drop(postgres);
    Ok(())
}

/// The figures of a run.
fn report(
    cli: &Cli,
    heard: &[Heard],
    elapsed: Duration,
    before: &Ticks,
    after: &Ticks,
    tiers: &Tiers,
) -> Report {
    let counted: Vec<&Heard> = heard.iter().filter(|h| !h.warming).collect();
    let payments = counted.len();
    let mut latencies: Vec<Duration> = counted.iter().map(|h| h.latency).collect();
    latencies.sort();
    let mean = |sorted: &[Duration]| {
        sorted.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / sorted.len().max(1) as f64
    };
    let mean_ms = mean(&latencies);
    let mut verifications: Vec<Duration> = counted.iter().filter_map(|h| h.verification).collect();
    verifications.sort();
    let count = |f: &dyn Fn(&Heard) -> bool| counted.iter().filter(|h| f(h)).count();
    let per_second = ticks_per_second();
    let processes = |tier: &str| match tier {
        "postgres" => 1 + children(tiers.postgres).len(),
        _ => tiers
            .groups
            .iter()
            .find(|(name, _)| *name == tier)
            .map_or(0, |(_, pids)| pids.len()),
    };
    let costs: Vec<TierCost> = after
        .0
        .iter()
        .map(|(tier, &ticks)| {
            let spent = ticks.saturating_sub(before.0.get(tier).copied().unwrap_or(0));
            let cpu_seconds = spent as f64 / per_second;
            TierCost {
                tier,
                processes: processes(tier),
                cpu_seconds,
                cpu_ms_per_payment: cpu_seconds * 1000.0 / payments.max(1) as f64,
            }
        })
        .collect();
    let model_rate =
        (cli.model_stores * cli.model_terminals) as f64 / cli.model_seconds_per_payment;
    let model = costs
        .iter()
        .filter(|c| c.tier != "load")
        .map(|c| ModelLine {
            tier: c.tier,
            cores_at_peak: model_rate * c.cpu_ms_per_payment / 1000.0,
        })
        .collect();
    Report {
        stores: cli.stores,
        terminals_per_store: cli.terminals,
        cloud_instances: cli.instances,
        broker: cli.broker,
        offline: cli.offline,
        pay: cli.pay,
        every_ms: cli.every_ms,
        seconds: elapsed.as_secs_f64(),
        payments,
        payments_per_second: payments as f64 / elapsed.as_secs_f64(),
        approved_online: count(&|h| h.first == ChargeStatus::Approved && !h.offline),
        approved_offline: count(&|h| h.first == ChargeStatus::Approved && h.offline),
        declined: count(&|h| h.first == ChargeStatus::Declined),
        declines: counted
            .iter()
            .filter(|h| h.first == ChargeStatus::Declined)
            .fold(BTreeMap::new(), |mut by, h| {
                *by.entry(h.reason.clone().unwrap_or_else(|| "none given".into()))
                    .or_default() += 1;
                by
            }),
        unknown: count(&|h| h.first == ChargeStatus::Unknown),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: percentile(&latencies, 1.0),
        mean_ms,
        verification_p50_ms: percentile(&verifications, 0.50),
        verification_p99_ms: percentile(&verifications, 0.99),
        verification_mean_ms: mean(&verifications),
        stages: Vec::new(),
        tiers: costs,
        model_payments_per_second: model_rate,
        model,
    }
}

fn print_report(cli: &Cli, report: &Report) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!(
        "{} stores x {} terminals, {} cloud instances, broker {}{}, paid by {}{}: {} payments in \
         {:.1} s = {:.1} payments/s",
        report.stores,
        report.terminals_per_store,
        report.cloud_instances,
        match report.broker {
            BrokerKind::Nats => "NATS x3",
            BrokerKind::Mosquitto => "Mosquitto",
        },
        if report.offline {
            ", every store cut from the cloud"
        } else {
            ""
        },
        match report.pay {
            Pay::Code => "code",
            Pay::Face => "face",
            Pay::CodeAndFace => "code and face",
        },
        match report.every_ms {
            0 => String::new(),
            ms => format!(", each register paying every {ms} ms"),
        },
        report.payments,
        report.seconds,
        report.payments_per_second
    );
    println!(
        "at the register: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; approved online {}, offline {}, \
         declined {}, unknown first {}",
        report.p50_ms,
        report.p99_ms,
        report.max_ms,
        report.approved_online,
        report.approved_offline,
        report.declined,
        report.unknown
    );
    if !report.declines.is_empty() {
        println!("declined by reason: {:?}", report.declines);
    }
    if report.pay != Pay::Code {
        println!(
            "of which the verification: p50 {:.1} ms, p99 {:.1} ms",
            report.verification_p50_ms, report.verification_p99_ms
        );
    }
    println!(
        "where the time goes (means; register {:.1} ms):",
        report.mean_ms
    );
    for stage in &report.stages {
        println!("  {:>7.2} ms  {}", stage.mean_ms, stage.stage);
    }
    println!("| tier | processes | CPU s | CPU ms per payment |");
    println!("|---|---:|---:|---:|");
    for tier in &report.tiers {
        println!(
            "| {} | {} | {:.1} | {:.2} |",
            tier.tier, tier.processes, tier.cpu_seconds, tier.cpu_ms_per_payment
        );
    }
    println!(
        "paper model: {} stores x {} terminals, one payment per terminal every {} s at the peak = \
         {:.0} payments/s:",
        cli.model_stores,
        cli.model_terminals,
        cli.model_seconds_per_payment,
        report.model_payments_per_second
    );
    for line in &report.model {
        println!("  {}: {:.1} cores", line.tier, line.cores_at_peak);
    }
    Ok(())
}

/// The books after the run: every order heard approved moved its amount once, every other
/// moved nothing, each store and customer holds what its registers heard, the ledger balances.
/// Offline approvals are waited for until reconciled (120 s at most).
fn check_books(
    api: &CloudApi,
    stores: &[String],
    heard: &[Heard],
    shoppers: &[Vec<Customer>],
    opening: i64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match books_hold(api, stores, heard, shoppers, opening) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn books_hold(
    api: &CloudApi,
    stores: &[String],
    heard: &[Heard],
    shoppers: &[Vec<Customer>],
    opening: i64,
) -> anyhow::Result<()> {
    let mut moved: BTreeMap<String, i64> = BTreeMap::new();
    for t in api.transfers()? {
        // A payment's transfers: `<payment>`, `<payment>#offline`, `<payment>#posted`, less
        // its reversals (`<payment>#void`, from the store back).
        let payment = t
            .transfer_id
            .split_once('#')
            .map_or(t.transfer_id.as_str(), |(p, _)| p);
        let Some((store, _)) = payment.split_once(':') else {
            continue;
        };
        let delta = if t.credit_account_id == store {
            t.amount_minor
        } else if t.debit_account_id == store {
            -t.amount_minor
        } else {
            0
        };
        *moved.entry(payment.to_owned()).or_default() += delta;
    }
    let mut per_store = vec![0i64; stores.len()];
    let mut per_customer = vec![vec![0i64; shoppers.first().map_or(0, Vec::len)]; stores.len()];
    for h in heard {
        let payment = format!("{}:{}", stores[h.store], h.order);
        let got = moved.get(&payment).copied().unwrap_or(0);
        let want = if h.status == ChargeStatus::Approved {
            h.amount
        } else {
            0
        };
        if got != want {
            bail!("{payment} heard {:?}: moved {got}, not {want}", h.status);
        }
        per_store[h.store] += want;
        per_customer[h.store][h.terminal] += want;
    }
    for (i, store) in stores.iter().enumerate() {
        let balance = api.balance(store)?;
        if balance != per_store[i] {
            bail!(
                "{store} holds {balance}, its registers heard {}",
                per_store[i]
            );
        }
        for (t, paid) in per_customer[i].iter().enumerate() {
            let customer = format!("{store}-customer-{t}");
            let balance = api.balance(&customer)?;
            if balance != opening - paid {
                bail!("{customer} holds {balance}, not {}", opening - paid);
            }
        }
    }
    for totals in api.totals()? {
        if totals.sum_of_balances_minor != 0
            || totals.total_debits_minor != totals.total_credits_minor
        {
            bail!("the ledger does not balance: {totals:?}");
        }
    }
    Ok(())
}
