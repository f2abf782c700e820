//! The three real binaries and a real Mosquitto broker, on free loopback ports: payments through
//! edge -> hub -> cloud, every kind of bad input, and the ledger read back.

use std::{path::Path, process::Command, time::Duration};

use paycode::Wallet;
use protocol::{AccountKind, ChargeStatus, Currency, DeclineReason, OpenAccount};
use serde_json::json;
use tests::{
    binary_path, charge, free_port, get_text, metric_value, post_json, post_raw, present_code,
    present_qr, start_cloud, wait_for_keys, wait_for_metric, CloudApi, Mosquitto, Service,
};

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

struct Stack {
    _broker: Mosquitto,
    cloud: Service,
    hub: Service,
    edge: Service,
    frames: std::path::PathBuf,
    alice: Wallet,
    hub_zenoh_port: u16,
}

/// Opens the merchant account of store-1 and alice's account (10,000 minor units) with a fresh
/// wallet, which it returns.
fn open_store_and_alice(api: &CloudApi) -> Wallet {
    api.open(&OpenAccount {
        account_id: "store-1".into(),
        kind: AccountKind::Merchant,
        currency: eur(),
        initial_balance_minor: 0,
        public_key: None,
    })
    .unwrap();
    let alice = Wallet::generate("alice").unwrap();
    api.open(&OpenAccount {
        account_id: "alice".into(),
        kind: AccountKind::Customer,
        currency: eur(),
        initial_balance_minor: 10_000,
        public_key: Some(alice.public_key_b64()),
    })
    .unwrap();
    alice
}

fn start_stack(dir: &Path) -> Stack {
    start_stack_with(dir, &[])
}

/// [`start_stack`] with more `--set`s for the terminal.
fn start_stack_with(dir: &Path, edge_extra: &[String]) -> Stack {
    let broker = Mosquitto::start(dir).expect("mosquitto starts");
    let mqtt_port = format!("mqtt.port={}", broker.port);
    let cloud = start_cloud(&dir.join("cloud"), broker.port).expect("cloud starts");
    let alice = open_store_and_alice(&CloudApi::new(cloud.http_addr));
    let zenoh_port = free_port();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-1".into(),
            format!("data_dir={:?}", dir.join("hub")),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            mqtt_port,
            // These tests are about the online path; offline authorization has its own.
            "offline.enabled=false".into(),
        ],
    )
    .expect("hub starts");
    wait_for_keys(hub.http_addr, 1, Duration::from_secs(20)).expect("hub gets alice's key");
    let frames = tests::spool("frames");
    let mut edge_args = vec![
        "store_id=store-1".into(),
        "terminal_id=till-1".into(),
        "register_listen=127.0.0.1:0".into(),
        "scan_timeout_ms=1500".into(),
        format!("frames_dir={:?}", frames),
        format!("zenoh.connect=[\"tls/127.0.0.1:{zenoh_port}\"]"),
    ];
    edge_args.extend(edge_extra.iter().cloned());
    let edge = Service::start("facepay-edge", &edge_args).expect("edge starts");
    Stack {
        _broker: broker,
        cloud,
        hub,
        edge,
        frames,
        alice,
        hub_zenoh_port: zenoh_port,
    }
}

#[test]
fn payments_and_bad_input_through_real_processes() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_stack(dir.path());
    let api = CloudApi::new(s.cloud.http_addr);
    let edge = s.edge.http_addr;
    let url = format!("http://{edge}/v1/charge");

    // A good payment lands in the ledger.
    present_code(&s.frames, &s.alice).unwrap();
    let (status, paid) = charge(edge, "o-1", 1_250, "EUR").unwrap();
    assert_eq!(
        (status, paid.status),
        (200, ChargeStatus::Approved),
        "{paid:?}"
    );
    assert_eq!(paid.account_id.as_deref(), Some("alice"));
    assert_eq!(paid.payment_id.as_deref(), Some("store-1:o-1"));
    assert_eq!(api.balance("alice").unwrap(), 8_750);
    assert_eq!(api.balance("store-1").unwrap(), 1_250);

    // Requests the edge refuses before any code is read: 400, nothing recorded.
    let refused = |status: u16, body: serde_json::Value, reason: DeclineReason| {
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["reason"], reason.as_str(), "{body}");
        assert!(!body["detail"].as_str().unwrap().is_empty());
    };
    let (st, b) = post_raw(&url, "{not json").unwrap();
    refused(st, b, DeclineReason::InvalidRequest);
    let (st, b) = post_json(
        &url,
        &json!({"order_id": "o-2", "amount_minor": 5, "currency": "EUR", "tip": 1}),
    )
    .unwrap();
    refused(st, b, DeclineReason::InvalidRequest);
    let (st, b) = post_json(&url, &json!({"order_id": "o-2", "currency": "EUR"})).unwrap();
    refused(st, b, DeclineReason::InvalidRequest);
    for amount in [
        json!(0),
        json!(-500),
        json!(12.5),
        json!(1e20),
        json!(u64::MAX),
        json!("100"),
    ] {
        let (st, b) = post_json(
            &url,
            &json!({"order_id": "o-2", "amount_minor": amount, "currency": "EUR"}),
        )
        .unwrap();
        refused(st, b, DeclineReason::InvalidAmount);
    }
    let (st, b) = post_json(
        &url,
        &json!({"order_id": "o-2", "amount_minor": 5, "currency": "XXX"}),
    )
    .unwrap();
    refused(st, b, DeclineReason::UnknownCurrency);
    let (st, b) = post_json(
        &url,
        &json!({"order_id": "o/2", "amount_minor": 5, "currency": "EUR"}),
    )
    .unwrap();
    refused(st, b, DeclineReason::InvalidRequest);

    // Codes the hub refuses, each with its reason.
    let declined = |order: &str, amount: i64, reason: DeclineReason| {
        let (status, r) = charge(edge, order, amount, "EUR").unwrap();
        assert_eq!(r.status, ChargeStatus::Declined, "{order}: {r:?}");
        assert_eq!(r.reason, Some(reason), "{order}: {r:?}");
        assert_eq!(
            status,
            if reason == DeclineReason::StoreSystemUnreachable {
                503
            } else {
                200
            }
        );
    };
    present_qr(&s.frames, "https://example.com/not-a-payment").unwrap();
    declined("o-3", 100, DeclineReason::NotFacepayCode);
    present_qr(&s.frames, "FPAY1.bm9wZQ.AAAA").unwrap();
    declined("o-4", 100, DeclineReason::MalformedCode);
    let impostor = Wallet::generate("alice").unwrap();
    present_code(&s.frames, &impostor).unwrap();
    declined("o-5", 100, DeclineReason::BadSignature);
    present_qr(
        &s.frames,
        &s.alice.issue_code(paycode::now_ms() - 5 * 60 * 1000),
    )
    .unwrap();
    declined("o-6", 100, DeclineReason::CodeExpired);
    let code = s.alice.issue_code(paycode::now_ms());
    present_qr(&s.frames, &code).unwrap();
    assert_eq!(
        charge(edge, "o-7", 100, "EUR").unwrap().1.status,
        ChargeStatus::Approved
    );
    present_qr(&s.frames, &code).unwrap();
    declined("o-8", 100, DeclineReason::CodeReplayed);
    present_code(&s.frames, &Wallet::generate("mallory").unwrap()).unwrap();
    declined("o-9", 100, DeclineReason::UnknownAccount);
    present_code(&s.frames, &s.alice).unwrap();
    declined("o-10", 1_000_000, DeclineReason::InsufficientFunds);
    present_code(&s.frames, &s.alice).unwrap();
    declined("o-1", 999, DeclineReason::DuplicateOrderId);
    declined("o-11", 100, DeclineReason::NoCodePresented);

    // A second request for the order the terminal is charging hears that it is in progress (its
    // outcome is not known yet), never "declined"; a request for another order hears "busy".
    let first = std::thread::spawn(move || charge(edge, "o-12", 100, "EUR").unwrap());
    std::thread::sleep(Duration::from_millis(400));
    let (status, again) = charge(edge, "o-12", 100, "EUR").unwrap();
    assert_eq!(
        (status, again.status, again.reason),
        (
            409,
            ChargeStatus::Unknown,
            Some(DeclineReason::PaymentInProgress)
        ),
        "{again:?}"
    );
    let (status, other) = charge(edge, "o-13", 100, "EUR").unwrap();
    assert_eq!(
        (status, other.status, other.reason),
        (
            409,
            ChargeStatus::Declined,
            Some(DeclineReason::TerminalBusy)
        ),
        "{other:?}"
    );
    let (_, first) = first.join().unwrap();
    assert_eq!(
        first.reason,
        Some(DeclineReason::NoCodePresented),
        "{first:?}"
    );

    // The register retrying a paid order hears "approved" and nothing moves again.
    present_code(&s.frames, &s.alice).unwrap();
    let (_, again) = charge(edge, "o-1", 1_250, "EUR").unwrap();
    assert_eq!(again.status, ChargeStatus::Approved);
    assert!(again.already_paid, "{again:?}");

    // The ledger holds exactly the two approved payments, once each, and balances.
    let payments: Vec<_> = api
        .transfers()
        .unwrap()
        .into_iter()
        .filter(|t| t.transfer_id.starts_with("store-1:"))
        .map(|t| (t.transfer_id, t.amount_minor))
        .collect();
    assert_eq!(
        payments,
        vec![
            ("store-1:o-1".to_string(), 1_250),
            ("store-1:o-7".to_string(), 100)
        ]
    );
    assert_eq!(api.balance("alice").unwrap(), 10_000 - 1_250 - 100);
    for totals in api.totals().unwrap() {
        assert_eq!(totals.sum_of_balances_minor, 0);
        assert_eq!(totals.total_debits_minor, totals.total_credits_minor);
    }

    // Every tier counts outcomes on /metrics.
    let edge_metrics = get_text(&format!("http://{}/metrics", s.edge.metrics_addr)).unwrap();
    let approved = "facepay_edge_payment_decisions_total{outcome=\"approved\",path=\"online\"}";
    assert_eq!(metric_value(&edge_metrics, approved), Some(3.0));
    let offline = "facepay_edge_payment_decisions_total{outcome=\"approved\",path=\"offline\"}";
    assert_eq!(metric_value(&edge_metrics, offline), Some(0.0));
    // Every request decided once, its time apart from the customer's: the approved code
    // charges waited for their codes.
    assert_eq!(
        metric_value(
            &edge_metrics,
            "facepay_edge_payment_decision_seconds_count{path=\"online\"}"
        ),
        metric_value(&edge_metrics, "facepay_edge_payment_requests_total"),
        "{edge_metrics}"
    );
    assert!(
        metric_value(&edge_metrics, "facepay_edge_customer_wait_seconds_count").unwrap() >= 3.0,
        "{edge_metrics}"
    );
    let hub_metrics = get_text(&format!("http://{}/metrics", s.hub.metrics_addr)).unwrap();
    let replayed = "facepay_hub_payment_declines_total{reason=\"code_replayed\"}";
    assert_eq!(metric_value(&hub_metrics, replayed), Some(1.0));
    let cloud_metrics = get_text(&format!("http://{}/metrics", s.cloud.metrics_addr)).unwrap();
    let funds = "facepay_cloud_payment_declines_total{reason=\"insufficient_funds\"}";
    assert_eq!(metric_value(&cloud_metrics, funds), Some(1.0));
    // The cloud heard the store, checked its books at start (they balance), and decides online.
    let heard = "facepay_cloud_store_last_heard_timestamp_seconds{store_id=\"store-1\"}";
    assert!(
        metric_value(&cloud_metrics, heard).unwrap() > 0.0,
        "{cloud_metrics}"
    );
    for series in [
        "facepay_cloud_ledger_imbalance_minor_units{currency=\"EUR\"} 0",
        "facepay_cloud_ledger_imbalance_minor_units{currency=\"JPY\"} 0",
        "facepay_cloud_broker_connected 1",
    ] {
        assert!(cloud_metrics.contains(series), "{series}: {cloud_metrics}");
    }
    assert!(
        metric_value(
            &cloud_metrics,
            "facepay_cloud_ledger_balance_checked_timestamp_seconds"
        )
        .unwrap()
            > 0.0
    );
    assert!(
        !cloud_metrics.contains("path=\"offline\""),
        "{cloud_metrics}"
    );
}

#[test]
fn a_broken_camera_declines_face_verifications_and_code_payments_go_on() {
    let dir = tempfile::tempdir().unwrap();
    // An IP camera that is not there: nothing listens on its port.
    let camera = format!("http://127.0.0.1:{}/video.mjpg", free_port());
    let s = start_stack_with(
        dir.path(),
        &[
            "camera.source=mjpeg_http".into(),
            format!("camera.url={camera:?}"),
            "camera.stall_timeout_ms=500".into(),
        ],
    );
    let edge = s.edge.http_addr;
    let (status, reply) = tests::verify(edge, "face").unwrap();
    match &reply {
        protocol::VerifyReply::Refused { reason, detail } => {
            assert_eq!(*reason, DeclineReason::CameraUnavailable, "{detail}");
            assert!(
                detail.contains("127.0.0.1"),
                "the source is named: {detail}"
            );
        }
        other => panic!("expected a refusal, got {other:?} ({status})"),
    }
    // The scanner has a source of its own: code payments go on.
    present_code(&s.frames, &s.alice).unwrap();
    let (_, paid) = charge(edge, "o-1", 250, "EUR").unwrap();
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");
    let page = get_text(&format!("http://{}/metrics", s.edge.metrics_addr)).unwrap();
    assert_eq!(
        metric_value(&page, "facepay_edge_source_up{source=\"camera\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&page, "facepay_edge_source_up{source=\"scanner\"}"),
        Some(1.0)
    );
    assert!(
        metric_value(
            &page,
            "facepay_edge_source_errors_total{kind=\"unavailable\",source=\"camera\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        metric_value(
            &page,
            "facepay_edge_verification_declines_total{reason=\"camera_unavailable\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn edge_without_its_hub_says_store_system_unreachable() {
    let frames = tests::spool("frames");
    let edge = Service::start(
        "facepay-edge",
        &[
            "register_listen=127.0.0.1:0".into(),
            "hub_timeout_ms=500".into(),
            format!("frames_dir={:?}", frames),
            format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", free_port()),
        ],
    )
    .unwrap();
    // Alive, and not ready: it has no hub.
    assert_eq!(
        get_text(&format!("http://{}/healthz", edge.metrics_addr)).unwrap(),
        "ok"
    );
    assert_eq!(
        tests::readyz(edge.metrics_addr).unwrap(),
        (503, "not ready: hub\n".into())
    );
    present_code(&frames, &Wallet::generate("alice").unwrap()).unwrap();
    let (status, r) = charge(edge.http_addr, "o-1", 100, "EUR").unwrap();
    // Nothing was sent: a decline the register can trust.
    assert_eq!(
        (status, r.status, r.reason),
        (
            503,
            ChargeStatus::Declined,
            Some(DeclineReason::StoreSystemUnreachable)
        ),
        "{r:?}"
    );
}

#[test]
fn a_config_typo_fails_before_binding_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for (binary, text, key) in [
        (
            "facepay-cloud",
            "admin_listen = \"127.0.0.1:0\"\ndata_dri = \"x\"\n",
            "data_dri",
        ),
        (
            "facepay-hub",
            "store_id = \"s\"\n[mqtt]\nprot = 1\n",
            "prot",
        ),
        (
            "facepay-edge",
            "scan_timeout_ms = \"soon\"\n",
            "scan_timeout_ms",
        ),
        ("facepay-hub", "cloud_timeout_ms = 0\n", "cloud_timeout_ms"),
        (
            "facepay-face",
            "liveness_treshold = 0.5\n",
            "liveness_treshold",
        ),
        (
            "facepay-face",
            "liveness_threshold = 7\n",
            "liveness_threshold",
        ),
    ] {
        let file = dir.path().join(format!("{binary}.toml"));
        std::fs::write(&file, text).unwrap();
        let mut command = Command::new(binary_path(binary));
        command.arg("--config").arg(&file);
        if binary == "facepay-face" {
            command.args(["liveness", "unused.jpg"]);
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{binary}: {stderr}");
        assert!(stderr.contains(key), "{binary} should name {key}: {stderr}");
        assert!(
            stderr.contains(&file.display().to_string()),
            "{binary} should name the file: {stderr}"
        );
    }
}

#[test]
fn shipped_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("configs");
    let sources = |name: &str| settings::Sources {
        file: Some(root.join(name)),
        overrides: vec![],
    };
    let cloud: cloud::CloudConfig =
        settings::load("FACEPAY_TEST_UNSET_", &sources("cloud.toml")).unwrap();
    assert_eq!(cloud, cloud::CloudConfig::default());
    let hub: hub::HubConfig = settings::load("FACEPAY_TEST_UNSET_", &sources("hub.toml")).unwrap();
    assert_eq!(hub, hub::HubConfig::default());
    let edge: edge::EdgeConfig =
        settings::load("FACEPAY_TEST_UNSET_", &sources("edge.toml")).unwrap();
    assert_eq!(edge, edge::EdgeConfig::default());
}

#[test]
fn fleet_demo_prints_a_balanced_json_summary_and_serves_over_tls() {
    use std::io::BufRead as _;
    let mut demo = Command::new(env!("CARGO_BIN_EXE_facepay-fleet"))
        .args(["--json", "--serve"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut next_json = || -> serde_json::Value {
        let line = lines.next().expect("a line on stdout").unwrap();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{e}: stdout carries only JSON, not {line:?}"))
    };
    let summary = next_json();
    let serving = next_json()["serving"].clone();

    // The running fleet: every address named, every link TLS, the admin API for operators only.
    let pki_dir = std::path::PathBuf::from(serving["pki_dir"].as_str().unwrap());
    assert!(
        serving["broker"].as_str().unwrap().starts_with("mqtts://"),
        "{serving}"
    );
    assert_eq!(serving["hubs"].as_array().unwrap().len(), 2, "{serving}");
    assert_eq!(serving["edges"].as_array().unwrap().len(), 4, "{serving}");
    assert!(serving["hubs"][0]["zenoh"]
        .as_str()
        .unwrap()
        .starts_with("tls/"));
    let admin: std::net::SocketAddr = serving["cloud_admin"]
        .as_str()
        .unwrap()
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    assert!(
        ureq::get(&format!("http://{admin}/v1/accounts"))
            .call()
            .is_err(),
        "no plain HTTP on the admin API"
    );
    let operator = tests::CloudApi::as_operator(admin, &pki_dir, "operator").unwrap();
    // Alice paid 1001 and 2002, 2101 offline during the outage, and got two refunds.
    let alice = 10_000 - 1_250 - 300 - 1_200 + 250 + 200;
    assert_eq!(operator.balance("alice").unwrap(), alice);
    let metrics = serving["edges"][0]["metrics"].as_str().unwrap();
    assert!(get_text(metrics)
        .unwrap()
        .contains("facepay_edge_payment_requests_total"));
    assert!(get_text(serving["metrics"].as_str().unwrap())
        .unwrap()
        .contains("facepay_cloud_tls_certificate_expiry_timestamp_seconds"));
    // Ctrl-C (here SIGTERM) stops it cleanly.
    Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    let out = demo.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary["approved"], 11, "{summary}");
    let declined = &summary["declined_by_reason"];
    for reason in [
        "code_expired",
        "code_replayed",
        "duplicate_order_id",
        "insufficient_funds",
        "not_facepay_code",
        "unknown_account",
        "face_not_recognized",
        "spoof_suspected",
    ] {
        assert_eq!(declined[reason], 1, "{reason}: {summary}");
    }
    assert_eq!(summary["books_balance"], true);
    let before: i64 = summary["balances_before"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    let after: i64 = summary["balances_after"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!((before, after), (0, 0), "money is conserved");
    let after = &summary["balances_after"];
    assert_eq!(after["alice"], alice);
    assert_eq!(after["bob"], 5_000 - 799 - 1_500 - 600);
    // Face payments: at home, at another store (found by the cloud), a twin with the PIN, and
    // carol's code confirmed by her face.
    assert_eq!(after["bruno"], 8_000 - 2_390 - 560);
    assert_eq!(after["twin-b"], 8_000 - 1_000);
    assert_eq!(after["twin-a"], 8_000);
    assert_eq!(after["dora"], 8_000 - 1_999);
    assert_eq!(after["carol"], 500 - 450 - 40);
    // The outage: store-2 cut from the cloud keeps selling within its limits, refuses past them
    // and refuses refunds; healed, its backlog is applied exactly once.
    let outage = &summary["outage"];
    assert_eq!(outage["store_id"], "store-2", "{outage}");
    let statuses: Vec<(&str, bool, Option<&str>)> = outage["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["status"].as_str().unwrap(),
                o["offline"].as_bool().unwrap(),
                o["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("approved", true, None),
            ("approved", true, None),
            ("declined", false, Some("offline_amount_over_limit")),
            ("declined", false, Some("offline_allowance_exceeded")),
        ],
        "{outage}"
    );
    assert_eq!(outage["backlog_when_healed"], 2, "{outage}");
    assert_eq!(outage["applied_exactly_once"], true, "{outage}");
    let refunds = summary["refunds"].as_array().unwrap();
    let refund_outcomes: Vec<(&str, Option<&str>)> = refunds
        .iter()
        .map(|r| (r["status"].as_str().unwrap(), r["reason"].as_str()))
        .collect();
    assert_eq!(
        refund_outcomes,
        [
            ("declined", Some("cloud_unreachable")),
            ("refunded", None),
            ("refunded", None),
        ],
        "{refunds:?}"
    );
    for day in summary["settlements"].as_array().unwrap() {
        assert_eq!(day["matches_ledger"], true, "{day}");
    }
    let store_2 = &summary["settlements"][1];
    assert_eq!(store_2["store_id"], "store-2");
    assert_eq!(
        store_2["offline_payments"]["amount_minor"], 1_800,
        "{store_2}"
    );
    assert_eq!(store_2["refunds"]["amount_minor"], -200, "{store_2}");
    assert_eq!(
        summary["settlements"][0]["refunds"]["amount_minor"], -250,
        "{summary}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[7/7]"),
        "progress is shown"
    );
}

#[test]
fn a_dead_cloud_opens_the_breaker_and_a_live_one_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start_stack(dir.path());
    let edge = s.edge.http_addr;
    // The breaker's state in force (its state set), and the authorization mode it puts the hub in.
    let breaker = |hub: std::net::SocketAddr| {
        let page = get_text(&format!("http://{hub}/metrics")).unwrap();
        let states: Vec<&str> = ["closed", "half_open", "open"]
            .into_iter()
            .filter(|state| {
                metric_value(
                    &page,
                    &format!("facepay_hub_cloud_breaker_state{{state=\"{state}\"}}"),
                ) == Some(1.0)
            })
            .collect();
        let offline = metric_value(&page, "facepay_hub_authorization_mode{mode=\"offline\"}");
        (states, offline)
    };
    assert_eq!(breaker(s.hub.http_addr), (vec!["closed"], Some(0.0)));

    // The cloud dies; the broker stays, so the hub is still connected and only deadlines tell.
    s.cloud.kill();
    for order in ["dead-1", "dead-2", "dead-3"] {
        present_code(&s.frames, &s.alice).unwrap();
        let (_, result) = charge(edge, order, 100, "EUR").unwrap();
        assert_eq!(
            result.reason,
            Some(DeclineReason::CloudUnreachable),
            "{result:?}"
        );
    }
    assert_eq!(
        breaker(s.hub.http_addr),
        (vec!["open"], Some(1.0)),
        "open after three timeouts"
    );
    // Now the hub does not send, so the cashier does not wait out the deadline.
    present_code(&s.frames, &s.alice).unwrap();
    let (_, result) = charge(edge, "dead-4", 100, "EUR").unwrap();
    assert_eq!(result.reason, Some(DeclineReason::CloudUnreachable));
    assert!(result.detail.contains("went unanswered"), "{result:?}");

    // The cloud comes back (same data, same broker session); after the cool-down a probe closes
    // the circuit and payments flow again. The three timed-out attempts were voided, so nothing
    // of them stays charged.
    s.cloud = start_cloud(&dir.path().join("cloud"), s._broker.port).expect("cloud restarts");
    let api = CloudApi::new(s.cloud.http_addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        present_code(&s.frames, &s.alice).unwrap();
        let (_, result) = charge(edge, &format!("back-{n}"), 100, "EUR").unwrap();
        if result.status == ChargeStatus::Approved {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{result:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(breaker(s.hub.http_addr), (vec!["closed"], Some(0.0)));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api.balance("alice").unwrap() != 10_000 - 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "voids settle the dead attempts"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for t in api.totals().unwrap() {
        assert_eq!(t.sum_of_balances_minor, 0);
    }
}

#[test]
fn a_hub_cut_from_the_broker_declines_fast_and_recovers_when_healed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).expect("mosquitto starts");
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).expect("cloud starts");
    let api = CloudApi::new(cloud.http_addr);
    let alice = open_store_and_alice(&api);
    // The hub reaches the broker only through a proxy the test controls.
    let link = tests::proxy::FaultProxy::start(([127, 0, 0, 1], broker.port).into()).unwrap();
    let zenoh_port = free_port();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-1".into(),
            format!("data_dir={:?}", dir.path().join("hub")),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            format!("mqtt.port={}", link.port),
            "mqtt.keep_alive_seconds=1".into(),
            "mqtt.reconnect_delay_ms=100".into(),
            "offline.enabled=false".into(),
        ],
    )
    .expect("hub starts");
    wait_for_keys(hub.http_addr, 1, Duration::from_secs(20)).unwrap();
    let frames = tests::spool("frames");
    let edge = Service::start(
        "facepay-edge",
        &[
            "store_id=store-1".into(),
            "register_listen=127.0.0.1:0".into(),
            "scan_timeout_ms=3000".into(),
            format!("frames_dir={frames:?}"),
            format!("zenoh.connect=[\"tls/127.0.0.1:{zenoh_port}\"]"),
        ],
    )
    .expect("edge starts");
    let connected = |value: f64| {
        tests::wait_for_metric(
            hub.http_addr,
            "facepay_hub_broker_connected",
            value,
            Duration::from_secs(20),
        )
    };
    // Every tier ready: the cloud and the hub on the broker, the hub's keys synced, the
    // terminal hearing its hub.
    let ready = Duration::from_secs(20);
    for (tier, metrics) in [
        ("cloud", cloud.metrics_addr),
        ("hub", hub.http_addr),
        ("edge", edge.metrics_addr),
    ] {
        assert_eq!(
            tests::wait_for_readyz(metrics, 200, ready).unwrap(),
            "ready\n"
        );
        // Each tells its version and its process.
        let page = get_text(&format!("http://{metrics}/metrics")).unwrap();
        let info = format!(
            "facepay_{tier}_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(metric_value(&page, &info), Some(1.0), "{tier}");
        assert!(
            metric_value(&page, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0,
            "{tier}"
        );
    }
    present_code(&frames, &alice).unwrap();
    let (_, paid) = charge(edge.http_addr, "p-1", 100, "EUR").unwrap();
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");

    link.cut();
    connected(0.0).expect("the hub notices the cut");
    // Cut from the broker, the hub is alive and not ready, and says why.
    assert_eq!(
        tests::readyz(hub.http_addr).unwrap(),
        (503, "not ready: broker\n".into())
    );
    assert_eq!(
        get_text(&format!("http://{}/healthz", hub.http_addr)).unwrap(),
        "ok"
    );
    present_code(&frames, &alice).unwrap();
    let (status, cut) = charge(edge.http_addr, "p-2", 100, "EUR").unwrap();
    assert_eq!(
        (status, cut.reason),
        (200, Some(DeclineReason::CloudUnreachable)),
        "{cut:?}"
    );

    link.heal();
    connected(1.0).expect("the hub reconnects");
    tests::wait_for_readyz(hub.http_addr, 200, ready).expect("ready again");
    present_code(&frames, &alice).unwrap();
    let (_, healed) = charge(edge.http_addr, "p-3", 100, "EUR").unwrap();
    assert_eq!(healed.status, ChargeStatus::Approved, "{healed:?}");
    // Exactly the two approved payments moved money.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.balance("alice").unwrap() != 10_000 - 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "only approved payments count"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(api.balance("store-1").unwrap(), 200);
}

#[test]
fn an_edge_cut_from_its_hub_fails_fast_and_recovers_when_healed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_stack(dir.path());
    // A second terminal reaches the same hub only through a proxy the test controls.
    let hub_zenoh: u16 = s.hub_zenoh_port;
    let link = tests::proxy::FaultProxy::start(([127, 0, 0, 1], hub_zenoh).into()).unwrap();
    let frames = tests::spool("frames-2");
    let edge = Service::start(
        "facepay-edge",
        &[
            "store_id=store-1".into(),
            "terminal_id=till-2".into(),
            "register_listen=127.0.0.1:0".into(),
            "scan_timeout_ms=3000".into(),
            format!("frames_dir={frames:?}"),
            format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", link.port),
        ],
    )
    .expect("edge starts");
    let api = CloudApi::new(s.cloud.http_addr);
    let pay = |order: &str| {
        present_code(&frames, &s.alice).unwrap();
        charge(edge.http_addr, order, 100, "EUR").unwrap()
    };
    let (_, paid) = pay("e-1");
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");

    link.cut();
    let (status, cut) = pay("e-2");
    assert_eq!(
        (status, cut.status, cut.reason),
        (
            503,
            ChargeStatus::Declined,
            Some(DeclineReason::StoreSystemUnreachable)
        ),
        "{cut:?}"
    );
    assert!(cut.detail.contains("nothing was charged"), "{cut:?}");

    link.heal();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let (_, again) = pay(&format!("e-3-{n}"));
        if again.status == ChargeStatus::Approved {
            break;
        }
        assert_eq!(
            again.reason,
            Some(DeclineReason::StoreSystemUnreachable),
            "{again:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the terminal reconnects"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Nothing half-recorded: only the approved payments moved money.
    assert_eq!(api.balance("alice").unwrap(), 10_000 - 200);
}

/// Every binary names its version; the tiers check a configuration and exit without opening,
/// binding or writing anything: 0 when it is valid, 64 and the key at fault when it is not.
#[test]
fn every_binary_names_its_version_and_the_tiers_check_a_configuration() {
    for binary in [
        "facepay-edge",
        "facepay-hub",
        "facepay-cloud",
        "facepay-pki",
        "facepay-wallet",
        "facepay-face",
        "facepay-broker-config",
        "facepay-hub-bench",
        "facepay-cloud-bench",
        "facepay-fleet",
        "facepay-chaos",
        "facepay-load",
        "facepay-sim",
        "facepay-offline-bench",
        "facepay-sd",
    ] {
        let out = Command::new(binary_path(binary))
            .arg("--version")
            .output()
            .unwrap();
        assert!(out.status.success(), "{binary}: {out:?}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("{binary} {}", env!("CARGO_PKG_VERSION"))
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for binary in ["facepay-edge", "facepay-hub", "facepay-cloud"] {
        let data = dir.path().join(binary);
        let key = if binary == "facepay-edge" {
            "frames_dir"
        } else {
            "data_dir"
        };
        let check = |extra: &[&str]| {
            let mut command = Command::new(binary_path(binary));
            command
                .arg("--check-config")
                .arg("--set")
                .arg(format!("{key}={data:?}"));
            for set in extra {
                command.arg("--set").arg(set);
            }
            command.output().unwrap()
        };
        let valid = check(&[]);
        assert_eq!(valid.status.code(), Some(0), "{binary}: {valid:?}");
        assert!(
            String::from_utf8_lossy(&valid.stdout).contains("configuration is valid"),
            "{binary}: {valid:?}"
        );
        let invalid = check(&["metrics.listen=\"nowhere\""]);
        assert_eq!(
            invalid.status.code(),
            Some(settings::EXIT_CONFIG),
            "{binary}: {invalid:?}"
        );
        assert!(
            String::from_utf8_lossy(&invalid.stderr).contains("metrics.listen"),
            "{binary}: {invalid:?}"
        );
        assert!(!data.exists(), "{binary} wrote {}", data.display());
    }
}

/// `--log-format json`: every line a tier writes to stderr is one JSON object.
#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead as _, Read as _};
    tests::ensure_identity(&pki::Identity::edge("store-1", "till-1").unwrap()).unwrap();
    let frames = tests::spool("frames");
    let mut edge = Command::new(binary_path("facepay-edge"))
        .args(["--log-format", "json"])
        .args(["--set", &format!("tls.pki_dir={:?}", tests::test_pki())])
        .args(["--set", "metrics.listen=\"127.0.0.1:0\""])
        .args(["--set", "register_listen=\"127.0.0.1:0\""])
        .args(["--set", &format!("frames_dir={frames:?}")])
        .args([
            "--set",
            &format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", free_port()),
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(edge.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("facepay-edge ready"), "{ready:?}");
    edge.kill().unwrap();
    edge.wait().unwrap();
    let mut logs = String::new();
    edge.stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("edge started"), "{logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line).expect(line);
        assert!(
            entry["level"].is_string() && entry["fields"].is_object(),
            "{line}"
        );
    }
}

#[test]
fn sigterm_stops_every_tier_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start_stack(dir.path());
    let api = CloudApi::new(s.cloud.http_addr);
    wait_for_metric(
        s.cloud.metrics_addr,
        "facepay_cloud_store_online{store_id=\"store-1\"}",
        1.0,
        Duration::from_secs(20),
    )
    .unwrap();
    present_code(&s.frames, &s.alice).unwrap();
    let (_, paid) = charge(s.edge.http_addr, "before-stop", 300, "EUR").unwrap();
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");

    // The terminal is told to stop while a charge waits for the customer's code: the charge
    // still gets its answer (no code seen: nothing moved), then the terminal ends cleanly.
    let edge = s.edge.http_addr;
    let waiting = std::thread::spawn(move || charge(edge, "during-stop", 300, "EUR").unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let status = s.edge.terminate(Duration::from_secs(20));
    let (_, heard) = waiting.join().unwrap();
    assert_eq!(
        (heard.status, heard.reason),
        (ChargeStatus::Declined, Some(DeclineReason::NoCodePresented)),
        "{heard:?}"
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(s.edge.printed(), vec!["facepay-edge stopped".to_owned()]);

    // The hub says goodbye: the cloud hears the store go offline, the hub ends cleanly.
    let status = s.hub.terminate(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(s.hub.printed(), vec!["facepay-hub stopped".to_owned()]);
    wait_for_metric(
        s.cloud.metrics_addr,
        "facepay_cloud_store_online{store_id=\"store-1\"}",
        0.0,
        Duration::from_secs(10),
    )
    .unwrap();

    // The cloud: its books as they were, then a clean end.
    assert_eq!(api.balance("alice").unwrap(), 10_000 - 300);
    let status = s.cloud.terminate(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(s.cloud.printed(), vec!["facepay-cloud stopped".to_owned()]);
}

#[test]
fn bench_lfw_stops_loudly_on_a_wrong_path_or_an_unreadable_image() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.txt");
    std::fs::write(&pairs, "1\t1\nAlice\t1\t2\nAlice\t1\tBob\t1\n").unwrap();
    let bench = |root: &Path| {
        Command::new(binary_path("facepay-face"))
            .arg("bench-lfw")
            .arg("--lfw")
            .arg(root)
            .arg("--pairs")
            .arg(&pairs)
            .output()
            .unwrap()
    };
    // A wrong --lfw: the first image named is not there; no accuracy is reported.
    let missing = dir.path().join("no-such-lfw");
    let out = bench(&missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no-such-lfw"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("accuracy"));
    // An image that is no image: named, not counted as a failed detection.
    let root = dir.path().join("lfw");
    for (name, n) in [("Alice", 1), ("Alice", 2), ("Bob", 1)] {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(
            root.join(name).join(format!("{name}_{n:04}.jpg")),
            b"not a jpeg",
        )
        .unwrap();
    }
    let out = bench(&root);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("_0001.jpg"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed detection"));
}
