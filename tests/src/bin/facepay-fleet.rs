//! `facepay-fleet`: the whole fleet on loopback — a fleet PKI of its own, Mosquitto configured
//! as `ops/mosquitto` ships it (TLS with client certificates, ACL), the cloud, two store hubs and
//! two edge terminals per store in one process — customers enrolled with their faces over the
//! HTTPS enrollment API, and a scripted cash register that charges a series of orders paid with
//! QR payment codes, faces, or both, declines included. Then it cuts store-2 from the cloud: its
//! registers keep charging (offline approvals within their limits, declines past them, refunds
//! refused: they need the cloud), heals the link and shows the backlog reconciled exactly once, a
//! refund, and each store's statement for the day. Prints a summary; with `--serve` the fleet
//! keeps running until Ctrl-C and prints where everything listens.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use paycode::Wallet;
use protocol::{
    AccountKind, ChargeStatus, CreateCustomer, Currency, OpenAccount, SecondFactorKind, VerifyReply,
};
use serde::Serialize;
use tests::{
    charge, charge_with_token, face_fixture, free_port, present_code, present_face, present_qr,
    second_factor, verify, wait_for_keys, wait_for_metric, CloudApi, EnrollApi,
};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-fleet",
    about = "run the facepay fleet demo on loopback"
)]
struct Cli {
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Keep the fleet's data here instead of a temporary directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// After the scripted orders, keep the fleet running until Ctrl-C and print one line
    /// `{"serving": {...}}` naming every listening address and the PKI directory.
    #[arg(long)]
    serve: bool,
}

const STORES: [&str; 2] = ["store-1", "store-2"];
/// The store the demo cuts from the cloud (its hub reaches the broker through a proxy).
const OUTAGE_STORE: &str = "store-2";
/// Steps the demo shows on stderr.
const STEPS: usize = 7;
const TILLS: [&str; 2] = ["till-1", "till-2"];
const CURRENCY: &str = "EUR";

/// Customers and their opening balances in minor units.
const CUSTOMERS: [(&str, i64); 3] = [("alice", 10_000), ("bob", 5_000), ("carol", 500)];

#[derive(Serialize)]
struct OrderLine {
    order_id: String,
    store_id: String,
    terminal_id: String,
    customer: String,
    scenario: String,
    amount_minor: i64,
    status: ChargeStatus,
    already_paid: bool,
    /// Approved by the store's hub alone, the cloud unreachable.
    offline: bool,
    reason: Option<String>,
    detail: String,
}

/// A refund the demo's register asked for.
#[derive(Serialize)]
struct RefundLine {
    store_id: String,
    scenario: String,
    #[serde(flatten)]
    result: protocol::RefundResult,
}

/// Store-2 cut from the cloud, and healed.
#[derive(Serialize)]
struct Outage {
    store_id: String,
    /// Orders charged while cut off.
    orders: Vec<OrderLine>,
    /// Approved offline.
    offline_approved: usize,
    /// Unreconciled approvals the hub held when the link healed.
    backlog_when_healed: u64,
    /// From healing the link until the backlog was applied at the cloud.
    reconciled_in_ms: u128,
    /// Each approval offline is in the ledger exactly once, and no decline is.
    applied_exactly_once: bool,
}

/// A store's statement for the day, and whether it adds up to the ledger's transfers.
#[derive(Serialize)]
struct StoreDay {
    /// The statement.
    #[serde(flatten)]
    settlement: protocol::Settlement,
    /// Its net is what the ledger's transfers of the store's account that day add up to.
    matches_ledger: bool,
}

#[derive(Serialize)]
struct Summary {
    orders: Vec<OrderLine>,
    approved: usize,
    declined_by_reason: BTreeMap<String, usize>,
    balances_before: BTreeMap<String, i64>,
    balances_after: BTreeMap<String, i64>,
    outage: Outage,
    refunds: Vec<RefundLine>,
    settlements: Vec<StoreDay>,
    ledger: Vec<protocol::LedgerTotals>,
    books_balance: bool,
    elapsed_ms: u128,
}

struct Fleet {
    cloud: SocketAddr,
    pki_dir: PathBuf,
    /// The outage store's hub <-> broker link.
    uplink: tests::proxy::FaultProxy,
    /// Each hub's `/metrics`.
    hub_metrics: BTreeMap<String, SocketAddr>,
    edges: BTreeMap<(String, String), (SocketAddr, PathBuf)>,
    /// Where everything listens, for `--serve`.
    serving: serde_json::Value,
}

/// Customers enrolled by face: id, home store, PIN, enrollment photo, confirmed look-alike of.
/// `carol` already has an account and a wallet: enrolling adds her face to it.
const FACE_CUSTOMERS: [(&str, &str, &str, &str, Option<&str>); 5] = [
    ("bruno", "store-1", "4821", "bruno-1.jpg", None),
    ("dora", "store-2", "3141", "dora-1.jpg", None),
    ("carol", "store-2", "2718", "carla-1.jpg", None),
    ("twin-a", "store-1", "1111", "twin-1.jpg", None),
    (
        "twin-b",
        "store-1",
        "2222",
        "twin-1-mirrored.jpg",
        Some("twin-a"),
    ),
];

fn step(n: usize, total: usize, what: &str) {
    eprintln!("[{n}/{total}] {what}");
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "error");
    }
    telemetry::init_tracing();
    let temp = tempfile::tempdir()?;
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let started = Instant::now();

    step(
        1,
        STEPS,
        "making the fleet's PKI, starting Mosquitto (TLS, client certificates, ACL)",
    );
    let pki_dir = data_dir.join("pki");
    tests::make_pki(&pki_dir)?;
    {
        let pki = pki::Pki::open(&pki_dir)?;
        for store_id in STORES {
            pki.ensure(&pki::Identity::hub(store_id)?, &Default::default())?;
            for terminal_id in TILLS {
                pki.ensure(
                    &pki::Identity::edge(store_id, terminal_id)?,
                    &Default::default(),
                )?;
            }
        }
    }
    let broker_port = free_port();
    let broker_dir = data_dir.join("broker");
    std::fs::create_dir_all(&broker_dir)?;
    let _broker = tests::Mosquitto::start_with_pki(&broker_dir, broker_port, &pki_dir)?;

    // The actors run on an actix system on their own thread; the cash register and the customers'
    // phones block, so they run here.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let data = data_dir.clone();
    let actors = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            match start_fleet(broker_port, &data, &data.join("pki")).await {
                Ok((fleet, servers, hubs)) => {
                    let _ = ready_tx.send(Ok(fleet));
                    let _ = stop_rx.await;
                    drop(hubs);
                    for server in servers {
                        server.stop(true).await;
                    }
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                }
            }
        })
    });
    let fleet = ready_rx.recv().context("the fleet thread died")??;
    let summary = run_script(&fleet, started);
    if let (true, Ok(summary)) = (cli.serve, &summary) {
        print_summary(summary, cli.json)?;
        let line = serde_json::json!({ "serving": fleet.serving });
        if cli.json {
            println!("{line}");
        } else {
            println!();
            println!("serving until Ctrl-C: {line}");
        }
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(telemetry::wait_for_shutdown());
    }
    let _ = stop_tx.send(());
    let _ = actors.join();
    let summary = summary?;
    if !cli.serve {
        print_summary(&summary, cli.json)?;
    }
    if !summary.books_balance {
        bail!("the ledger does not balance");
    }
    if !summary.outage.applied_exactly_once {
        bail!("the outage's backlog was not applied exactly once");
    }
    if !summary.settlements.iter().all(|d| d.matches_ledger) {
        bail!("a store's statement does not match the ledger");
    }
    Ok(())
}

async fn start_fleet(
    broker_port: u16,
    data_dir: &std::path::Path,
    pki_dir: &std::path::Path,
) -> anyhow::Result<(
    Fleet,
    Vec<actix_web::dev::ServerHandle>,
    Vec<hub::HubHandle>,
)> {
    let mut servers = Vec::new();
    step(
        2,
        STEPS,
        "starting the cloud, opening demo accounts, enrolling faces over HTTPS",
    );
    let tls = pki::TlsConfig {
        pki_dir: pki_dir.to_owned(),
        ..Default::default()
    };
    let metrics = telemetry::MetricsConfig::on("127.0.0.1:0");
    let mut cloud_config = cloud::CloudConfig {
        data_dir: data_dir.join("cloud"),
        admin_listen: "127.0.0.1:0".into(),
        api_listen: "127.0.0.1:0".into(),
        metrics: metrics.clone(),
        tls: tls.clone(),
        ..Default::default()
    };
    cloud_config.mqtt.port = broker_port;
    let cloud = cloud::start(cloud_config).await?;
    servers.extend(cloud.server_handles());
    let api_addr = cloud.admin_addr;
    let operator_pki = pki_dir.to_owned();
    let customers =
        tokio::task::spawn_blocking(move || open_accounts(api_addr, &operator_pki)).await??;
    let (enroll_addr, cert, token) = (
        cloud.api_addr,
        cloud.ca_cert.clone(),
        cloud.api_token.clone(),
    );
    let enrolled =
        tokio::task::spawn_blocking(move || enroll_faces(&enroll_addr.to_string(), &cert, &token))
            .await??;

    step(3, STEPS, "starting two store hubs");
    let mut hubs = Vec::new();
    // The outage store's hub reaches the broker through a proxy the script cuts.
    let uplink = tests::proxy::FaultProxy::start(([127, 0, 0, 1], broker_port).into())?;
    let mut hub_metrics = BTreeMap::new();
    for store_id in STORES {
        let zenoh_port = free_port();
        let mut config = hub::HubConfig {
            store_id: store_id.into(),
            data_dir: data_dir.join(store_id).join("hub"),
            metrics: metrics.clone(),
            tls: tls.clone(),
            ..Default::default()
        };
        config.mqtt.port = broker_port;
        if store_id == OUTAGE_STORE {
            config.mqtt.port = uplink.port;
            config.mqtt.reconnect_delay_ms = 100;
            config.mqtt.reconnect_max_delay_ms = 500;
        }
        config.zenoh.listen = vec![format!("tls/127.0.0.1:{zenoh_port}")];
        let hub = hub::start(config).await?;
        let hub_http = hub.metrics_addr;
        hub_metrics.insert(store_id.to_string(), hub_http);
        // The cloud checks the hub's signature on what it approves offline.
        let (operator_pki, key) = (pki_dir.to_owned(), hub.hub_public_key.clone());
        tokio::task::spawn_blocking(move || {
            CloudApi::as_operator(api_addr, &operator_pki, "operator")?.set_hub_key(store_id, &key)
        })
        .await??;
        let home_templates = enrolled.get(store_id).copied().unwrap_or(0);
        tokio::task::spawn_blocking(move || {
            wait_for_keys(hub_http, customers, Duration::from_secs(20))?;
            wait_for_metric(
                hub_http,
                "facepay_hub_hot_templates",
                home_templates as f64,
                Duration::from_secs(20),
            )
        })
        .await??;
        servers.push(hub.server_handle());
        hubs.push((store_id, zenoh_port, hub));
    }

    step(4, STEPS, "starting two edge terminals per store");
    let mut edges = BTreeMap::new();
    let mut serving_edges = Vec::new();
    for (store_id, zenoh_port, _) in &hubs {
        for terminal_id in TILLS {
            let frames_dir = tests::spool(&format!("{store_id}-{terminal_id}"));
            let mut config = edge::EdgeConfig {
                store_id: store_id.to_string(),
                terminal_id: terminal_id.into(),
                register_listen: "127.0.0.1:0".into(),
                metrics: metrics.clone(),
                tls: tls.clone(),
                scan_timeout_ms: 3_000,
                frames_dir: frames_dir.clone(),
                ..Default::default()
            };
            config.zenoh.connect = vec![format!("tls/127.0.0.1:{zenoh_port}")];
            let edge = edge::start(config).await?;
            servers.extend(edge.server_handles());
            serving_edges.push(serde_json::json!({
                "store_id": store_id,
                "terminal_id": terminal_id,
                "register": format!("http://{}", edge.register_addr),
                "metrics": format!("http://{}/metrics", edge.metrics_addr),
            }));
            edges.insert(
                (store_id.to_string(), terminal_id.to_string()),
                (edge.register_addr, frames_dir),
            );
        }
    }
    let serving_hubs: Vec<serde_json::Value> = hubs
        .iter()
        .map(|(store_id, zenoh_port, hub)| {
            serde_json::json!({
                "store_id": store_id,
                "zenoh": format!("tls/127.0.0.1:{zenoh_port}"),
                "metrics": format!("http://{}/metrics", hub.metrics_addr),
            })
        })
        .collect();
    let serving = serde_json::json!({
        "broker": format!("mqtts://127.0.0.1:{broker_port}"),
        "cloud_admin": format!("https://{}", cloud.admin_addr),
        "cloud_enrollment": format!("https://{}", cloud.api_addr),
        "metrics": format!("http://{}/metrics", cloud.metrics_addr),
        "pki_dir": pki_dir,
        "hubs": serving_hubs,
        "edges": serving_edges,
    });
    let hub_handles = hubs.into_iter().map(|(_, _, hub)| hub).collect();
    Ok((
        Fleet {
            cloud: api_addr,
            pki_dir: pki_dir.to_owned(),
            uplink,
            hub_metrics,
            edges,
            serving,
        },
        servers,
        hub_handles,
    ))
}

fn wallet(account_id: &str) -> Wallet {
    // Demo wallets are derived from the account id so that the script can recreate them.
    let mut seed = [0u8; 32];
    for (i, b) in account_id.bytes().enumerate() {
        seed[i % 32] ^= b;
    }
    seed[31] ^= 0x5a;
    Wallet::from_seed(account_id, seed).expect("demo ids are valid")
}

/// Enrolls the face customers over HTTPS; returns how many templates each store's hub should get.
fn enroll_faces(
    api_addr: &str,
    cert: &std::path::Path,
    token: &std::path::Path,
) -> anyhow::Result<BTreeMap<&'static str, usize>> {
    let api = EnrollApi::new(api_addr, cert, token)?;
    let mut per_store = BTreeMap::new();
    for (id, store, pin, photo, look_alike) in FACE_CUSTOMERS {
        let (balance, key) = match CUSTOMERS.iter().find(|(c, _)| *c == id) {
            Some((_, balance)) => (*balance, Some(wallet(id).public_key_b64())),
            None => (8_000, None),
        };
        let (status, body) = api.create(&CreateCustomer {
            customer_id: id.into(),
            name: format!("Demo customer {id}"),
            phone: "+49 30 1234 5678".into(),
            pin: pin.into(),
            second_factor: SecondFactorKind::Pin,
            home_store_id: store.into(),
            currency: CURRENCY.into(),
            initial_balance_minor: balance,
            public_key: key,
        })?;
        if status != 201 {
            bail!("enrolling {id}: {status} {body}");
        }
        let (status, body) = api.add_face(id, &face_fixture(photo), look_alike.as_slice())?;
        if status != 201 {
            bail!("adding {id}'s face: {status} {body}");
        }
        *per_store.entry(store).or_insert(0) += 1;
    }
    Ok(per_store)
}

fn open_accounts(cloud: SocketAddr, pki_dir: &std::path::Path) -> anyhow::Result<usize> {
    let api = CloudApi::as_operator(cloud, pki_dir, "operator")?;
    let eur = Currency::parse(CURRENCY)?;
    for store_id in STORES {
        api.open(&OpenAccount {
            account_id: store_id.into(),
            kind: AccountKind::Merchant,
            currency: eur,
            initial_balance_minor: 0,
            public_key: None,
        })?;
    }
    for (customer, balance) in CUSTOMERS {
        api.open(&OpenAccount {
            account_id: customer.into(),
            kind: AccountKind::Customer,
            currency: eur,
            initial_balance_minor: balance,
            public_key: Some(wallet(customer).public_key_b64()),
        })?;
    }
    Ok(CUSTOMERS.len())
}

/// How the customer presents payment in one scripted order.
enum Presents {
    FreshCode(&'static str),
    ExpiredCode(&'static str),
    ReplayOfOrder(&'static str),
    NotAFacepayCode,
    /// Looks at the camera (a photo from the test fixtures).
    Face(&'static str),
    /// Looks at the camera, and types this PIN if the terminal asks.
    FaceAndPin(&'static str, &'static str),
    /// Shows a fresh code from this wallet while looking at the camera.
    CodeAndFace(&'static str, &'static str),
    /// Holds a printed photo to the camera.
    Spoof,
}

struct Order {
    order_id: &'static str,
    store: usize,
    till: usize,
    amount_minor: i64,
    presents: Presents,
    scenario: &'static str,
}

const ORDERS: &[Order] = &[
    Order {
        order_id: "1001",
        store: 0,
        till: 0,
        amount_minor: 1_250,
        presents: Presents::FreshCode("alice"),
        scenario: "groceries",
    },
    Order {
        order_id: "1002",
        store: 0,
        till: 1,
        amount_minor: 799,
        presents: Presents::FreshCode("bob"),
        scenario: "coffee and a paper",
    },
    Order {
        order_id: "2001",
        store: 1,
        till: 0,
        amount_minor: 2_000,
        presents: Presents::FreshCode("carol"),
        scenario: "more than carol holds",
    },
    Order {
        order_id: "2002",
        store: 1,
        till: 1,
        amount_minor: 300,
        presents: Presents::FreshCode("alice"),
        scenario: "alice at the other store",
    },
    Order {
        order_id: "1003",
        store: 0,
        till: 0,
        amount_minor: 450,
        presents: Presents::ExpiredCode("bob"),
        scenario: "a screenshot of an old code",
    },
    Order {
        order_id: "1004",
        store: 0,
        till: 1,
        amount_minor: 999,
        presents: Presents::ReplayOfOrder("1001"),
        scenario: "alice's code from order 1001 shown again",
    },
    Order {
        order_id: "2003",
        store: 1,
        till: 0,
        amount_minor: 100,
        presents: Presents::FreshCode("mallory"),
        scenario: "a wallet with no account",
    },
    Order {
        order_id: "2004",
        store: 1,
        till: 1,
        amount_minor: 1_500,
        presents: Presents::FreshCode("bob"),
        scenario: "bob at the other store",
    },
    Order {
        order_id: "1005",
        store: 0,
        till: 0,
        amount_minor: 120,
        presents: Presents::NotAFacepayCode,
        scenario: "a product label's QR code",
    },
    Order {
        order_id: "1001",
        store: 0,
        till: 1,
        amount_minor: 1_250,
        presents: Presents::FreshCode("alice"),
        scenario: "the register retries order 1001",
    },
    Order {
        order_id: "1001",
        store: 0,
        till: 0,
        amount_minor: 5_000,
        presents: Presents::FreshCode("alice"),
        scenario: "order id 1001 reused for another amount",
    },
    Order {
        order_id: "2005",
        store: 1,
        till: 0,
        amount_minor: 450,
        presents: Presents::FreshCode("carol"),
        scenario: "carol within her balance",
    },
    Order {
        order_id: "1006",
        store: 0,
        till: 0,
        amount_minor: 2_390,
        presents: Presents::Face("bruno-2.jpg"),
        scenario: "bruno pays by face at his store",
    },
    Order {
        order_id: "2006",
        store: 1,
        till: 1,
        amount_minor: 560,
        presents: Presents::Face("bruno-2.jpg"),
        scenario: "bruno by face at another store (the cloud finds him)",
    },
    Order {
        order_id: "1007",
        store: 0,
        till: 1,
        amount_minor: 1_000,
        presents: Presents::FaceAndPin("twin-2.jpg", "2222"),
        scenario: "a twin: the terminal asks for the PIN",
    },
    Order {
        order_id: "1008",
        store: 0,
        till: 0,
        amount_minor: 300,
        presents: Presents::Face("stranger.jpg"),
        scenario: "someone who never enrolled",
    },
    Order {
        order_id: "1009",
        store: 0,
        till: 1,
        amount_minor: 300,
        presents: Presents::Spoof,
        scenario: "a printed photo held to the camera",
    },
    Order {
        order_id: "2007",
        store: 1,
        till: 0,
        amount_minor: 1_999,
        presents: Presents::Face("dora-2.jpg"),
        scenario: "dora pays by face",
    },
    Order {
        order_id: "2008",
        store: 1,
        till: 1,
        amount_minor: 40,
        presents: Presents::CodeAndFace("carol", "carla-2.jpg"),
        scenario: "carol's code, confirmed by her face",
    },
];

/// Runs a face verification at a terminal; the payment token, or the refusal as a result.
fn verify_face(
    edge: SocketAddr,
    frames: &std::path::Path,
    method: &str,
    photo: &std::path::Path,
    pin: Option<&str>,
) -> anyhow::Result<Result<(String, String), (protocol::DeclineReason, String)>> {
    present_face(&frames.join("camera"), photo)?;
    let (_, mut reply) = verify(edge, method)?;
    if let (VerifyReply::SecondFactorRequired { challenge_id, .. }, Some(pin)) = (&reply, pin) {
        reply = second_factor(edge, challenge_id, pin)?.1;
    }
    Ok(match reply {
        VerifyReply::Verified {
            token, account_id, ..
        } => Ok((token, account_id.into_string())),
        VerifyReply::Refused { reason, detail } => Err((reason, detail)),
        VerifyReply::SecondFactorRequired { .. } => Err((
            protocol::DeclineReason::SecondFactorWrong,
            "the customer did not answer the second factor".into(),
        )),
    })
}

fn run_script(fleet: &Fleet, started: Instant) -> anyhow::Result<Summary> {
    let api = CloudApi::as_operator(fleet.cloud, &fleet.pki_dir, "operator")?;
    let balances = |api: &CloudApi| -> anyhow::Result<BTreeMap<String, i64>> {
        Ok(api
            .accounts()?
            .into_iter()
            .map(|a| (a.account_id.into_string(), a.balance_minor))
            .collect())
    };
    let balances_before = balances(&api)?;
    step(
        5,
        STEPS,
        &format!("the cash registers charge {} orders", ORDERS.len()),
    );
    let mut codes_used: BTreeMap<&str, String> = BTreeMap::new();
    let mut lines = Vec::new();
    for (n, order) in ORDERS.iter().enumerate() {
        let store_id = STORES[order.store];
        let terminal_id = TILLS[order.till];
        let (edge, frames) = &fleet.edges[&(store_id.to_string(), terminal_id.to_string())];
        let customer = match &order.presents {
            Presents::FreshCode(who) => {
                let code = present_code(frames, &wallet(who))?;
                codes_used.entry(order.order_id).or_insert(code);
                who.to_string()
            }
            Presents::ExpiredCode(who) => {
                let code = wallet(who).issue_code(paycode::now_ms() - 10 * 60 * 1000);
                present_qr(frames, &code)?;
                who.to_string()
            }
            Presents::ReplayOfOrder(earlier) => {
                let code = codes_used
                    .get(earlier)
                    .context("replayed order ran first")?;
                present_qr(frames, code)?;
                "alice".to_string()
            }
            Presents::NotAFacepayCode => {
                present_qr(frames, "https://example.com/product/4006381333931")?;
                "-".to_string()
            }
            Presents::Face(photo) | Presents::FaceAndPin(photo, _) => photo.to_string(),
            Presents::CodeAndFace(who, _) => who.to_string(),
            Presents::Spoof => "-".to_string(),
        };
        let face = match &order.presents {
            Presents::Face(photo) => Some(("face", face_fixture(photo), None)),
            Presents::FaceAndPin(photo, pin) => Some(("face", face_fixture(photo), Some(*pin))),
            Presents::CodeAndFace(who, photo) => {
                present_code(frames, &wallet(who))?;
                Some(("code_and_face", face_fixture(photo), None))
            }
            Presents::Spoof => Some((
                "face",
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../shared/face/tests/fixtures/spoof-photo.jpg"),
                None,
            )),
            _ => None,
        };
        let (customer, result) = match face {
            None => (
                customer,
                charge(*edge, order.order_id, order.amount_minor, CURRENCY)?.1,
            ),
            Some((method, photo, pin)) => match verify_face(*edge, frames, method, &photo, pin)? {
                Ok((token, account_id)) => (
                    account_id,
                    charge_with_token(*edge, order.order_id, order.amount_minor, CURRENCY, &token)?
                        .1,
                ),
                Err((reason, detail)) => (
                    customer,
                    protocol::ChargeResult::declined(order.order_id, reason, detail),
                ),
            },
        };
        eprintln!(
            "      order {:>2}/{}: {store_id}/{terminal_id} #{} {} -> {:?}{}",
            n + 1,
            ORDERS.len(),
            order.order_id,
            Currency::parse(CURRENCY)?.format(order.amount_minor),
            result.status,
            result.reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
        lines.push(OrderLine {
            order_id: order.order_id.into(),
            store_id: store_id.into(),
            terminal_id: terminal_id.into(),
            customer,
            scenario: order.scenario.into(),
            amount_minor: order.amount_minor,
            status: result.status,
            already_paid: result.already_paid,
            offline: result.offline,
            reason: result.reason.map(|r| r.to_string()),
            detail: result.detail,
        });
    }
    let (outage, mut refunds) = run_outage(fleet, &api)?;
    refunds.extend(run_refunds(fleet)?);
    let settlements = settle_the_day(&api)?;
    let balances_after = balances(&api)?;
    let ledger = api.totals()?;
    let books_balance = ledger
        .iter()
        .all(|t| t.sum_of_balances_minor == 0 && t.total_debits_minor == t.total_credits_minor);
    let approved = lines
        .iter()
        .filter(|l| l.status == ChargeStatus::Approved)
        .count();
    let mut declined_by_reason = BTreeMap::new();
    for line in &lines {
        if let Some(reason) = &line.reason {
            *declined_by_reason.entry(reason.clone()).or_insert(0) += 1;
        }
    }
    Ok(Summary {
        orders: lines,
        approved,
        declined_by_reason,
        balances_before,
        balances_after,
        outage,
        refunds,
        settlements,
        ledger,
        books_balance,
        elapsed_ms: started.elapsed().as_millis(),
    })
}

/// Orders charged at the outage store while it is cut from the cloud: till, customer, amount,
/// scenario.
const OUTAGE_ORDERS: [(&str, usize, &str, i64, &str); 4] = [
    (
        "2101",
        0,
        "alice",
        1_200,
        "alice pays while the cloud is down",
    ),
    ("2102", 1, "bob", 600, "bob pays while the cloud is down"),
    (
        "2103",
        0,
        "alice",
        3_000,
        "over the offline per-payment ceiling (25.00)",
    ),
    (
        "2104",
        1,
        "carol",
        100,
        "more than carol's offline allowance",
    ),
];

/// Cuts the outage store from the cloud, charges there, tries a refund, heals, and checks the
/// backlog landed exactly once. Returns the outage and the refund tried while cut off.
fn run_outage(fleet: &Fleet, api: &CloudApi) -> anyhow::Result<(Outage, Vec<RefundLine>)> {
    let store_id = OUTAGE_STORE;
    let hub = fleet.hub_metrics[store_id];
    step(
        6,
        STEPS,
        &format!("cutting {store_id} from the cloud: its registers keep charging"),
    );
    fleet.uplink.cut();
    wait_for_metric(
        hub,
        "facepay_hub_broker_connected",
        0.0,
        Duration::from_secs(20),
    )?;
    let mut orders = Vec::new();
    for (order_id, till, customer, amount_minor, scenario) in OUTAGE_ORDERS {
        let (edge, frames) = &fleet.edges[&(store_id.to_string(), TILLS[till].to_string())];
        present_code(frames, &wallet(customer))?;
        let result = charge(*edge, order_id, amount_minor, CURRENCY)?.1;
        eprintln!(
            "      cut off: {store_id}/{} #{order_id} {} -> {:?}{}{}",
            TILLS[till],
            Currency::parse(CURRENCY)?.format(amount_minor),
            result.status,
            if result.offline { " offline" } else { "" },
            result.reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
        orders.push(OrderLine {
            order_id: order_id.into(),
            store_id: store_id.into(),
            terminal_id: TILLS[till].into(),
            customer: customer.into(),
            scenario: scenario.into(),
            amount_minor,
            status: result.status,
            already_paid: result.already_paid,
            offline: result.offline,
            reason: result.reason.map(|r| r.to_string()),
            detail: result.detail,
        });
    }
    // Refunds need the cloud: refused, nothing moved.
    let (edge, _) = &fleet.edges[&(store_id.to_string(), TILLS[0].to_string())];
    let refused = tests::refund(*edge, "r-2101", "2101", 200, CURRENCY)?.1;
    eprintln!(
        "      cut off: refund of #2101 -> {:?} ({})",
        refused.status,
        refused.reason.map(|r| r.to_string()).unwrap_or_default()
    );
    let refunds = vec![RefundLine {
        store_id: store_id.into(),
        scenario: "a refund while the store is cut off".into(),
        result: refused,
    }];
    let page = tests::get_text(&format!("http://{hub}/metrics"))?;
    let backlog = tests::metric_value(&page, "facepay_hub_offline_backlog").unwrap_or(0.0) as u64;

    step(
        7,
        STEPS,
        &format!("healing {store_id}'s link: reconciliation, refunds, the day's statements"),
    );
    fleet.uplink.heal();
    let healed = Instant::now();
    wait_for_metric(
        hub,
        "facepay_hub_broker_connected",
        1.0,
        Duration::from_secs(30),
    )?;
    wait_for_metric(
        hub,
        "facepay_hub_offline_backlog",
        0.0,
        Duration::from_secs(60),
    )?;
    let reconciled_in_ms = healed.elapsed().as_millis();
    let transfers = api.transfers()?;
    let applied_exactly_once = orders.iter().all(|order| {
        let id = format!("{store_id}:{}", order.order_id);
        let applied = transfers
            .iter()
            .filter(|t| t.transfer_id == id || t.transfer_id == format!("{id}#offline"))
            .count();
        applied == usize::from(order.status == ChargeStatus::Approved)
    });
    let offline_approved = orders.iter().filter(|o| o.offline).count();
    Ok((
        Outage {
            store_id: store_id.into(),
            orders,
            offline_approved,
            backlog_when_healed: backlog,
            reconciled_in_ms,
            applied_exactly_once,
        },
        refunds,
    ))
}

/// Refunds once the stores are online: part of an online payment, and the refund refused
/// during the outage again (now reconciled, it is made).
fn run_refunds(fleet: &Fleet) -> anyhow::Result<Vec<RefundLine>> {
    let asks = [
        (
            "store-1",
            "r-1001",
            "1001",
            250,
            "part of alice's groceries back",
        ),
        (
            OUTAGE_STORE,
            "r-2101",
            "2101",
            200,
            "the refund refused during the outage, asked again",
        ),
    ];
    let mut refunds = Vec::new();
    for (store_id, refund_id, order_id, amount, scenario) in asks {
        let (edge, _) = &fleet.edges[&(store_id.to_string(), TILLS[0].to_string())];
        // A payment is final once its hub's confirmation reached the cloud: a moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        let result = loop {
            let result = tests::refund(*edge, refund_id, order_id, amount, CURRENCY)?.1;
            let later = matches!(
                result.reason,
                Some(
                    protocol::DeclineReason::PaymentNotSettled
                        | protocol::DeclineReason::PaymentNotReconciled
                )
            );
            if !later || Instant::now() > deadline {
                break result;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!(
            "      refund {store_id} #{order_id} {} -> {:?}{}",
            Currency::parse(CURRENCY)?.format(amount),
            result.status,
            result.reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
        refunds.push(RefundLine {
            store_id: store_id.into(),
            scenario: scenario.into(),
            result,
        });
    }
    Ok(refunds)
}

/// Each store's statement for today (UTC), checked against the ledger's transfers.
fn settle_the_day(api: &CloudApi) -> anyhow::Result<Vec<StoreDay>> {
    let today = time::OffsetDateTime::now_utc().date();
    let date = format!(
        "{:04}-{:02}-{:02}",
        today.year(),
        u8::from(today.month()),
        today.day()
    );
    let transfers = api.transfers()?;
    let mut days = Vec::new();
    for store_id in STORES {
        let (status, body) = api.get(&format!("/v1/stores/{store_id}/settlement?date={date}"))?;
        if status != 200 {
            bail!("the statement of {store_id}: {status} {body}");
        }
        let settlement: protocol::Settlement = serde_json::from_value(body)?;
        let from_transfers: i64 = transfers
            .iter()
            .filter(|t| (settlement.from_ms..settlement.to_ms).contains(&t.applied_at_ms))
            .map(|t| {
                if t.credit_account_id == store_id {
                    t.amount_minor
                } else if t.debit_account_id == store_id {
                    -t.amount_minor
                } else {
                    0
                }
            })
            .sum();
        days.push(StoreDay {
            matches_ledger: settlement.net_minor == from_transfers,
            settlement,
        });
    }
    Ok(days)
}

fn print_summary(summary: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
        return Ok(());
    }
    let eur = Currency::parse(CURRENCY)?;
    println!(
        "facepay fleet demo: 2 stores x 2 terminals, {} orders in {} ms",
        summary.orders.len(),
        summary.elapsed_ms
    );
    println!();
    println!(
        "{:<6} {:<8} {:<7} {:>10}  {:<9} {:<20} scenario",
        "order", "store", "till", "amount", "status", "reason"
    );
    for l in &summary.orders {
        println!(
            "{:<6} {:<8} {:<7} {:>10}  {:<9} {:<20} {}",
            l.order_id,
            l.store_id,
            l.terminal_id,
            eur.format(l.amount_minor),
            format!("{:?}", l.status).to_lowercase(),
            l.reason.as_deref().unwrap_or(if l.already_paid {
                "(already paid)"
            } else {
                "-"
            }),
            l.scenario
        );
    }
    let outage = &summary.outage;
    println!();
    println!(
        "{} cut from the cloud: {} of {} orders approved offline",
        outage.store_id,
        outage.offline_approved,
        outage.orders.len()
    );
    for l in &outage.orders {
        println!(
            "{:<6} {:<8} {:<7} {:>10}  {:<9} {:<26} {}",
            l.order_id,
            l.store_id,
            l.terminal_id,
            eur.format(l.amount_minor),
            format!("{:?}", l.status).to_lowercase(),
            l.reason
                .as_deref()
                .unwrap_or(if l.offline { "(offline)" } else { "-" }),
            l.scenario
        );
    }
    println!(
        "healed: {} held offline, reconciled in {} ms, {}",
        outage.backlog_when_healed,
        outage.reconciled_in_ms,
        if outage.applied_exactly_once {
            "each applied exactly once"
        } else {
            "NOT APPLIED EXACTLY ONCE"
        }
    );
    println!();
    for r in &summary.refunds {
        println!(
            "refund {:<8} #{:<5} {:>10}  {:<9} {:<24} {}",
            r.store_id,
            r.result.order_id,
            r.result
                .amount_minor
                .map(|a| eur.format(a))
                .unwrap_or_default(),
            format!("{:?}", r.result.status).to_lowercase(),
            r.result.reason.map(|r| r.to_string()).unwrap_or_default(),
            r.scenario
        );
    }
    println!();
    for day in &summary.settlements {
        let s = &day.settlement;
        println!(
            "statement {} {}: payments {} ({}), offline {} ({}), reversals {}, refunds {} ({}), \
             net {} -> {}",
            s.store_id,
            s.date,
            eur.format(s.payments.amount_minor),
            s.payments.count,
            eur.format(s.offline_payments.amount_minor),
            s.offline_payments.count,
            eur.format(s.reversals.amount_minor),
            eur.format(s.refunds.amount_minor),
            s.refunds.count,
            eur.format(s.net_minor),
            if day.matches_ledger {
                "matches the ledger"
            } else {
                "DOES NOT MATCH THE LEDGER"
            }
        );
    }
    println!();
    println!("approved: {}", summary.approved);
    for (reason, count) in &summary.declined_by_reason {
        println!("declined, {reason}: {count}");
    }
    println!();
    println!("{:<16} {:>14} {:>14}", "account", "before", "after");
    for (account, after) in &summary.balances_after {
        let before = summary.balances_before.get(account).copied().unwrap_or(0);
        println!(
            "{account:<16} {:>14} {:>14}",
            eur.format(before),
            eur.format(*after)
        );
    }
    println!();
    for t in &summary.ledger {
        println!(
            "ledger {}: {} transfers, debits {} = credits {}, issued {}, sum of all balances {} -> {}",
            t.currency,
            t.transfers,
            t.currency.format(t.total_debits_minor),
            t.currency.format(t.total_credits_minor),
            t.currency.format(t.issued_minor),
            t.currency.format(t.sum_of_balances_minor),
            if summary.books_balance { "the books balance" } else { "THE BOOKS DO NOT BALANCE" }
        );
    }
    Ok(())
}
