//! Every link authenticated: the refusals an attacker on the store network meets, each against
//! real processes — Mosquitto started from `ops/mosquitto`, the cloud's admin API, a hub's and a
//! terminal's Zenoh — with a positive control beside each, so that a refusal cannot pass by
//! accident.

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tests::{
    charge, ensure_identity, free_port, present_code, test_pki, tls_identity, CloudApi, Mosquitto,
    Service,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An MQTT client of the broker on `port` with `tls` (none: plain TCP).
fn mqtt_client(
    port: u16,
    client_id: &str,
    tls: Option<rustls::ClientConfig>,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    AsyncClient::new(options, 64)
}

/// TLS that trusts the test PKI's CA and shows no certificate.
fn anonymous_tls() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for der in tests::read_pem_certs(&test_pki().join("ca.pem")) {
        roots.add(der).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A client with the certificate `<name>` of the test PKI.
fn client_as(port: u16, name: &str, client_id: &str) -> (AsyncClient, EventLoop) {
    let tls = tls_identity(name).unwrap().client_config().unwrap();
    mqtt_client(port, client_id, Some(tls))
}

/// Polls until the broker accepts the connection (true) or the link fails or `timeout` passes.
async fn connected(eventloop: &mut EventLoop, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return ack.code == rumqttc::ConnectReturnCode::Success
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

/// Drives a subscriber and collects the topics of what it receives for `window`; also reports
/// whether its connection dropped.
async fn collect(eventloop: &mut EventLoop, window: Duration) -> (Vec<String>, bool) {
    let deadline = tokio::time::Instant::now() + window;
    let mut topics = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => topics.push(p.topic),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return (topics, true),
            Err(_) => return (topics, false),
        }
    }
}

/// Connects, subscribes to `filters`, and waits for the broker's acknowledgement; returns the
/// return codes of the subscription.
async fn subscribed(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    filters: &[&str],
) -> Vec<rumqttc::SubscribeReasonCode> {
    assert!(connected(eventloop, Duration::from_secs(10)).await);
    for filter in filters {
        client.subscribe(*filter, QoS::AtLeastOnce).await.unwrap();
    }
    let mut codes = Vec::new();
    while codes.len() < filters.len() {
        if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await.unwrap() {
            codes.extend(ack.return_codes);
        }
    }
    codes
}

/// Publishes and drives the publisher until the broker acknowledged every message.
async fn publish_all(port: u16, name: &str, client_id: &str, messages: &[&str]) {
    let (client, mut eventloop) = client_as(port, name, client_id);
    assert!(connected(&mut eventloop, Duration::from_secs(10)).await);
    for topic in messages {
        client
            .publish(*topic, QoS::AtLeastOnce, false, b"{}".to_vec())
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < messages.len() {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
            acked += 1;
        }
    }
    let _ = client.disconnect().await;
}

fn hub_identity(store: &str) -> String {
    let identity = pki::Identity::hub(store).unwrap();
    ensure_identity(&identity).unwrap();
    identity.name
}

#[test]
fn broker_refuses_clients_without_a_fleet_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let hub = hub_identity("store-1");
    runtime().block_on(async {
        // Plain MQTT on the broker's port: no session.
        let (_c, mut plain) = mqtt_client(broker.port, "plain", None);
        assert!(!connected(&mut plain, Duration::from_secs(3)).await);
        // TLS that trusts the CA but shows no certificate: refused in the handshake.
        let (_c, mut anon) = mqtt_client(broker.port, "anonymous", Some(anonymous_tls()));
        assert!(!connected(&mut anon, Duration::from_secs(3)).await);
        // A certificate of another CA: refused too.
        let other = tempfile::tempdir().unwrap();
        tests::make_pki(other.path()).unwrap();
        let foreign = pki::TlsIdentity::load(
            &pki::TlsConfig {
                pki_dir: other.path().to_owned(),
                ..Default::default()
            }
            .files("cloud"),
        )
        .unwrap();
        let (_c, mut stranger) =
            mqtt_client(broker.port, "cloud", Some(foreign.client_config().unwrap()));
        assert!(!connected(&mut stranger, Duration::from_secs(3)).await);
        // The control: the fleet's hub certificate is let in.
        let (_c, mut ok) = client_as(broker.port, &hub, "store-1");
        assert!(connected(&mut ok, Duration::from_secs(10)).await);
    });
}

#[test]
fn a_hub_publishes_only_on_its_own_store_request_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let hub = hub_identity("store-1");
    runtime().block_on(async {
        let (cloud, mut inbox) = client_as(broker.port, "cloud", "cloud");
        let codes = subscribed(&cloud, &mut inbox, &["facepay/v1/cloud/requests/+"]).await;
        assert!(codes
            .iter()
            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))));
        publish_all(
            broker.port,
            &hub,
            "store-1",
            &[
                "facepay/v1/cloud/requests/store-2",
                "facepay/v1/cloud/requests/store-1",
            ],
        )
        .await;
        let (topics, _) = collect(&mut inbox, Duration::from_secs(2)).await;
        assert_eq!(
            topics,
            vec!["facepay/v1/cloud/requests/store-1".to_string()]
        );
    });
}

#[test]
fn only_the_cloud_publishes_replies_keys_and_grants() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let (one, two) = (hub_identity("store-1"), hub_identity("store-2"));
    let broadcasts = [
        "facepay/v1/stores/store-2/replies",
        "facepay/v1/stores/store-2/templates",
        "facepay/v1/keys",
        "facepay/v1/templates/revocations",
        "facepay/v1/allowances",
        "facepay/v1/lockouts",
    ];
    runtime().block_on(async {
        let (victim, mut inbox) = client_as(broker.port, &two, "store-2");
        let codes = subscribed(&victim, &mut inbox, &broadcasts).await;
        assert!(codes
            .iter()
            .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))));
        // Store 1's hub forges every kind of cloud message: none arrives.
        publish_all(broker.port, &one, "store-1", &broadcasts).await;
        let (forged, _) = collect(&mut inbox, Duration::from_secs(2)).await;
        assert!(forged.is_empty(), "forged messages arrived: {forged:?}");
        // A hub that subscribes to another store's replies and templates hears nothing of them
        // (Mosquitto acknowledges the subscription but delivers only what the ACL lets it read).
        let (snoop, mut snoop_loop) = client_as(broker.port, &one, "store-1");
        subscribed(
            &snoop,
            &mut snoop_loop,
            &[
                "facepay/v1/stores/store-2/replies",
                "facepay/v1/stores/store-2/templates",
            ],
        )
        .await;
        // The cloud's identity publishes the same: every one arrives, at its store only.
        publish_all(broker.port, "cloud", "cloud", &broadcasts).await;
        let (genuine, _) = collect(&mut inbox, Duration::from_secs(2)).await;
        assert_eq!(genuine.len(), broadcasts.len(), "{genuine:?}");
        let (snooped, _) = collect(&mut snoop_loop, Duration::from_secs(1)).await;
        assert!(snooped.is_empty(), "store-1 read {snooped:?}");
    });
}

#[test]
fn a_client_id_cannot_be_taken_over_without_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let hub = hub_identity("store-1");
    runtime().block_on(async {
        let (cloud, mut inbox) = client_as(broker.port, "cloud", "cloud");
        subscribed(&cloud, &mut inbox, &["facepay/v1/cloud/requests/+"]).await;
        // A hub's certificate asking for the cloud's client id gets a session of its own: the
        // cloud stays connected and keeps its requests.
        let (_thief, mut thief_loop) = client_as(broker.port, &hub, "cloud");
        assert!(connected(&mut thief_loop, Duration::from_secs(10)).await);
        let driver = tokio::spawn(async move {
            let _ = collect(&mut thief_loop, Duration::from_secs(3)).await;
        });
        publish_all(
            broker.port,
            &hub,
            "store-1",
            &["facepay/v1/cloud/requests/store-1"],
        )
        .await;
        let (topics, dropped) = collect(&mut inbox, Duration::from_secs(2)).await;
        assert!(!dropped, "the cloud's session was taken over");
        assert_eq!(
            topics,
            vec!["facepay/v1/cloud/requests/store-1".to_string()]
        );
        driver.await.unwrap();
        // The control: the cloud's own certificate does take the session over (a restarted
        // cloud resumes its session), and the first connection is dropped.
        let (_again, mut again_loop) = client_as(broker.port, "cloud", "anything");
        assert!(connected(&mut again_loop, Duration::from_secs(10)).await);
        let (_, dropped) = collect(&mut inbox, Duration::from_secs(3)).await;
        assert!(
            dropped,
            "a second connection of the cloud's identity replaces the first"
        );
    });
}

/// Runs a binary to its end; its exit status and standard error.
fn run_to_exit(binary: &str, overrides: &[String]) -> (Option<i32>, String) {
    let mut command = Command::new(tests::binary_path(binary));
    for o in overrides {
        command.arg("--set").arg(o);
    }
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read as _;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.code(), stderr);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{binary} kept running with {overrides:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_tier_refuses_to_start_on_a_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    tests::make_pki(&pki_dir).unwrap();
    let pki = pki::Pki::open(&pki_dir).unwrap();
    pki.issue(&pki::Identity::hub("store-1").unwrap(), &Default::default())
        .unwrap();
    let key = pki_dir.join("hub-store-1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, stderr) = run_to_exit(
        "facepay-hub",
        &[
            format!("tls.pki_dir={pki_dir:?}"),
            format!("data_dir={:?}", dir.path().join("hub")),
            "metrics.listen=127.0.0.1:0".into(),
            format!("zenoh.listen=[\"tls/127.0.0.1:{}\"]", free_port()),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("readable by others"),
        "{stderr}"
    );
    // Nothing was opened: the journal was never created.
    assert!(!dir.path().join("hub").exists());
    // The cloud and the terminal refuse the same way.
    pki.issue(
        &pki::Identity::edge("store-1", "till-1").unwrap(),
        &Default::default(),
    )
    .unwrap();
    let key = pki_dir.join("edge-store-1-till-1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, stderr) = run_to_exit(
        "facepay-edge",
        &[
            format!("tls.pki_dir={pki_dir:?}"),
            format!("frames_dir={:?}", tests::spool("frames")),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("readable by others"),
        "{stderr}"
    );
    let key = pki_dir.join("cloud.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let (code, stderr) = run_to_exit(
        "facepay-cloud",
        &[
            format!("tls.pki_dir={pki_dir:?}"),
            format!("data_dir={:?}", dir.path().join("cloud")),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("readable by others"),
        "{stderr}"
    );
}

/// A terminal keeps raw frames in memory: it refuses to start on a spool directory on a
/// persistent disk, naming it, unless told that is what the machine has.
#[test]
fn a_terminal_refuses_frame_spools_on_a_persistent_disk() {
    let edge_identity = pki::Identity::edge("store-1", "till-1").unwrap();
    tests::ensure_identity(&edge_identity).unwrap();
    // In the package directory: on the repository's disk.
    let on_disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let frames = on_disk.path().join("frames");
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&frames)
        .unwrap();
    let fs_type = edge::frames::file_system_of(&frames).unwrap_or_default();
    let args = |extra: &[&str]| {
        let mut args = vec![
            format!("tls.pki_dir={:?}", tests::test_pki()),
            format!("frames_dir={frames:?}"),
            format!("camera_dir={:?}", tests::spool("camera")),
            "register_listen=127.0.0.1:0".to_owned(),
            "metrics.listen=127.0.0.1:0".to_owned(),
            format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", tests::free_port()),
        ];
        args.extend(extra.iter().map(|e| e.to_string()));
        args
    };
    if matches!(fs_type.as_str(), "tmpfs" | "ramfs") {
        // The repository itself is in memory here: nothing on disk to refuse.
        let edge = tests::Service::start("facepay-edge", &args(&[])).unwrap();
        drop(edge);
        return;
    }
    let (code, stderr) = run_to_exit("facepay-edge", &args(&[]));
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&frames.display().to_string())
            && stderr.contains("not in memory")
            && stderr.contains(&fs_type),
        "{stderr}"
    );
    // Allowed on purpose, it starts.
    let edge =
        tests::Service::start("facepay-edge", &args(&["frames_on_persistent_disk=true"])).unwrap();
    drop(edge);
    // In memory but in a directory anyone may change, or a link to elsewhere: refused too.
    use std::os::unix::fs::PermissionsExt as _;
    let open_parent = tests::spool("shared");
    std::fs::set_permissions(&open_parent, std::fs::Permissions::from_mode(0o777)).unwrap();
    let shared = open_parent.join("frames");
    let overrides = |dir: &std::path::Path| {
        vec![
            format!("tls.pki_dir={:?}", tests::test_pki()),
            format!("frames_dir={dir:?}"),
            format!("camera_dir={:?}", tests::spool("camera")),
            "register_listen=127.0.0.1:0".to_owned(),
            "metrics.listen=127.0.0.1:0".to_owned(),
            format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", tests::free_port()),
        ]
    };
    let (code, stderr) = run_to_exit("facepay-edge", &overrides(&shared));
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("lets others read") && stderr.contains(&open_parent.display().to_string()),
        "{stderr}"
    );
    // Its own spool left readable by others is narrowed to the terminal alone.
    let loose = tests::spool("loose");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
    let edge = tests::Service::start("facepay-edge", &overrides(&loose)).unwrap();
    let mode = std::fs::metadata(&loose).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(edge);
    let link = tests::spool("links").join("frames");
    std::os::unix::fs::symlink(tests::spool("target"), &link).unwrap();
    let (code, stderr) = run_to_exit("facepay-edge", &overrides(&link));
    assert_ne!(code, Some(0));
    assert!(stderr.contains("symbolic link"), "{stderr}");
}

#[test]
fn the_register_api_beyond_loopback_needs_a_token_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    ensure_identity(&pki::Identity::edge("store-1", "till-5").unwrap()).unwrap();
    // Bound beyond loopback without a token: refused before anything is bound.
    let (code, stderr) = run_to_exit(
        "facepay-edge",
        &[
            format!("tls.pki_dir={:?}", test_pki()),
            "terminal_id=till-5".into(),
            "register_listen=0.0.0.0:0".into(),
            format!("frames_dir={:?}", tests::spool("frames")),
        ],
    );
    assert_eq!(code, Some(settings::EXIT_CONFIG), "{stderr}");
    assert!(stderr.contains("register_token_file"), "{stderr}");

    // With a token: HTTPS with the terminal's certificate, and the token on every request.
    let token_file = dir.path().join("register-token");
    let edge = Service::start(
        "facepay-edge",
        &[
            "terminal_id=till-5".into(),
            "register_listen=127.0.0.1:0".into(),
            "scan_timeout_ms=200".into(),
            format!("register_token_file={token_file:?}"),
            format!("frames_dir={:?}", tests::spool("frames")),
            format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", free_port()),
        ],
    )
    .unwrap();
    assert!(
        edge.ready["register"].starts_with("https://"),
        "{:?}",
        edge.ready
    );
    let url = format!("https://{}/v1/charge", edge.http_addr);
    let body = serde_json::json!({"order_id": "1", "amount_minor": 1, "currency": "EUR"});
    assert!(
        ureq::post(&format!("http://{}/v1/charge", edge.http_addr))
            .send_json(body.clone())
            .is_err(),
        "no plain HTTP"
    );
    let agent = tests::https_agent(test_pki(), "operator").unwrap();
    let status = |request: ureq::Request| match request.send_json(body.clone()) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status(agent.post(&url)), 401);
    assert_eq!(
        status(agent.post(&url).set("Authorization", "Bearer wrong")),
        401
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    // The right token reaches the checkout, which waits for a code that never comes.
    let reached = agent
        .post(&url)
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .send_json(body.clone())
        .unwrap()
        .into_json::<protocol::ChargeResult>()
        .unwrap();
    assert_eq!(
        reached.reason,
        Some(protocol::DeclineReason::NoCodePresented),
        "{reached:?}"
    );
}

#[test]
fn the_admin_api_answers_operators_only_and_records_who_moved_money() {
    let dir = tempfile::tempdir().unwrap();
    // Certificates the cloud must refuse: revoked, expired.
    {
        let _ = tests::ensure_identity(
            &pki::Identity::operator(Some("gone"), pki::Role::Operator).unwrap(),
        );
        tests::revoke_in_test_pki("operator-gone").unwrap();
        tests::issue_in_test_pki(
            &pki::Identity::operator(Some("expired"), pki::Role::Operator).unwrap(),
            &pki::IssueOptions {
                not_before: time::OffsetDateTime::now_utc() - time::Duration::days(30),
                validity_days: 1,
                ..Default::default()
            },
        )
        .unwrap();
    }
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = tests::start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let admin = cloud.http_addr;
    let operator = CloudApi::new(admin);
    let eur = protocol::Currency::parse("EUR").unwrap();
    operator
        .open(&protocol::OpenAccount {
            account_id: "mallory".into(),
            kind: protocol::AccountKind::Customer,
            currency: eur,
            initial_balance_minor: 100,
            public_key: None,
        })
        .unwrap();

    // Plain HTTP, and TLS without a client certificate: refused, nothing moved.
    let deposit = serde_json::json!({"deposit_id": "d-1", "amount_minor": 99_999});
    assert!(
        ureq::post(&format!("http://{admin}/v1/accounts/mallory/deposits"))
            .send_json(deposit.clone())
            .is_err()
    );
    let anonymous = ureq::AgentBuilder::new()
        .tls_config(Arc::new(anonymous_tls()))
        .build();
    assert!(anonymous
        .post(&format!("https://{admin}/v1/accounts/mallory/deposits"))
        .send_json(deposit.clone())
        .is_err());
    // Revoked and expired operator certificates: refused in the handshake.
    for name in ["operator-gone", "operator-expired"] {
        let api = CloudApi::as_operator_unchecked(admin, test_pki(), name).unwrap();
        assert!(
            api.post("/v1/accounts/mallory/deposits", &deposit).is_err(),
            "{name} was let in"
        );
    }
    // A valid certificate that is not an operator's (a hub's): forbidden.
    let hub = CloudApi::as_operator(admin, test_pki(), &hub_identity("store-1")).unwrap();
    let (status, _) = hub.post("/v1/accounts/mallory/deposits", &deposit).unwrap();
    assert_eq!(status, 403);
    assert_eq!(hub.get("/v1/accounts").unwrap().0, 403);
    // A viewer reads but cannot deposit.
    let viewer = CloudApi::as_operator(admin, test_pki(), "operator-viewer").unwrap();
    assert_eq!(viewer.balance("mallory").unwrap(), 100);
    let (status, body) = viewer
        .post("/v1/accounts/mallory/deposits", &deposit)
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(operator.balance("mallory").unwrap(), 100, "nothing moved");

    // The operator deposits; the audit trail names who.
    let (status, body) = operator.deposit("mallory", "d-2", 250).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(operator.balance("mallory").unwrap(), 350);
    let audit = viewer.audit().unwrap();
    let actions: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|e| (e.operator.as_str(), e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("operator", "open_account", "mallory"),
            ("operator", "deposit", "mallory"),
        ]
    );
    assert!(audit[1].detail.contains("amount_minor=250"), "{audit:?}");
    assert_eq!(audit[1].outcome, "applied");
}

/// What a terminal or hub hears over Zenoh: a query from a session with the certificate `name`
/// to `key`, retried for `patience` while no reply comes.
fn zenoh_query(
    connect: u16,
    name: &str,
    allowed_peers: Vec<String>,
    key: String,
    patience: Duration,
) -> Option<Vec<u8>> {
    let files = pki::TlsConfig {
        pki_dir: test_pki().to_owned(),
        ..Default::default()
    }
    .files(name);
    zenoh_query_with(connect, files, allowed_peers, key, patience)
}

/// [`zenoh_query`] with these files.
fn zenoh_query_with(
    connect: u16,
    files: pki::TlsFiles,
    allowed_peers: Vec<String>,
    key: String,
    patience: Duration,
) -> Option<Vec<u8>> {
    zenoh_queries_with(connect, files, allowed_peers, key, 1, patience).pop()
}

/// Sends `count` junk queries on `key` from one session with these files, the first once the
/// link is up (within `patience`), the rest right after each answer; the answers heard.
fn zenoh_queries_with(
    connect: u16,
    files: pki::TlsFiles,
    allowed_peers: Vec<String>,
    key: String,
    count: usize,
    patience: Duration,
) -> Vec<Vec<u8>> {
    let config = zlink::ZenohConfig {
        connect: vec![format!("tls/127.0.0.1:{connect}")],
        ..Default::default()
    };
    let security = zlink::ZenohSecurity {
        files,
        grants: vec![zlink::ZenohGrant {
            common_names: allowed_peers,
            key_exprs: vec!["facepay/**".into()],
            role: zlink::GrantRole::Ask,
        }],
    };
    let link = zlink::ZenohLink::open(&config, &security).unwrap();
    let session = link.session().clone();
    let replies = runtime().block_on(link.spawn(async move {
        let deadline = tokio::time::Instant::now() + patience;
        let mut heard = Vec::new();
        while heard.len() < count && tokio::time::Instant::now() < deadline {
            let replies = session
                .get(&key)
                .payload(b"not a request".to_vec())
                .timeout(Duration::from_millis(500))
                .await
                .unwrap();
            if let Ok(reply) = replies.recv_async().await {
                if let Ok(sample) = reply.result() {
                    heard.push(sample.payload().to_bytes().into_owned());
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        heard
    }));
    replies.unwrap()
}

/// The reason of a signed hub answer to an authorize query.
fn authorize_reason(signed: &[u8]) -> Option<protocol::DeclineReason> {
    let signed: protocol::SignedHubReply = protocol::decode(signed).unwrap();
    let reply: protocol::AuthorizeReply = protocol::decode(signed.reply.as_bytes()).unwrap();
    reply.decision.reason()
}

#[test]
fn each_terminal_is_rate_limited_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    for till in ["till-1", "till-2"] {
        ensure_identity(&pki::Identity::edge("store-12", till).unwrap()).unwrap();
    }
    let zenoh_port = free_port();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-12".into(),
            format!("data_dir={:?}", dir.path().join("hub")),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            format!("mqtt.port={}", free_port()),
            "terminals.requests_burst=3".into(),
            "terminals.requests_per_second=1".into(),
        ],
    )
    .unwrap();
    let files = |name: &str| {
        pki::TlsConfig {
            pki_dir: test_pki().to_owned(),
            ..Default::default()
        }
        .files(name)
    };
    let peers = vec!["store-12".to_string()];
    let started = std::time::Instant::now();
    let answers = zenoh_queries_with(
        zenoh_port,
        files("edge-store-12-till-1"),
        peers.clone(),
        protocol::keyexpr::hub_authorize("store-12", "till-1"),
        10,
        Duration::from_secs(15),
    );
    let elapsed = started.elapsed().as_secs();
    assert_eq!(answers.len(), 10, "every query is answered");
    let reasons: Vec<_> = answers.iter().map(|a| authorize_reason(a)).collect();
    let read = reasons
        .iter()
        .filter(|r| **r == Some(protocol::DeclineReason::InvalidRequest))
        .count();
    let limited = reasons
        .iter()
        .filter(|r| **r == Some(protocol::DeclineReason::RateLimited))
        .count();
    assert_eq!(read + limited, 10, "{reasons:?}");
    assert!(read >= 3, "the burst is read: {reasons:?}");
    assert!(
        read as u64 <= 3 + elapsed + 1,
        "at most the burst and the refill were read ({elapsed} s): {reasons:?}"
    );
    assert!(limited >= 1, "{reasons:?}");
    // The other terminal has its own rate.
    let other = zenoh_query(
        zenoh_port,
        "edge-store-12-till-2",
        peers,
        protocol::keyexpr::hub_authorize("store-12", "till-2"),
        Duration::from_secs(10),
    )
    .expect("till-2 is answered");
    assert_eq!(
        authorize_reason(&other),
        Some(protocol::DeclineReason::InvalidRequest)
    );
    drop(hub);
}

#[test]
fn a_hub_answers_only_its_own_stores_valid_terminals() {
    let dir = tempfile::tempdir().unwrap();
    for (store, till) in [
        ("store-3", "till-1"),
        ("store-3", "till-2"),
        ("store-4", "till-1"),
    ] {
        ensure_identity(&pki::Identity::edge(store, till).unwrap()).unwrap();
    }
    tests::revoke_in_test_pki("edge-store-3-till-2").unwrap();
    // A terminal whose certificate was replaced (the device was stolen): its old files still
    // chain to the CA, but the replacement revoked them and carries another name.
    ensure_identity(&pki::Identity::edge("store-3", "till-3").unwrap()).unwrap();
    let stolen = dir.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for file in ["edge-store-3-till-3.pem", "edge-store-3-till-3.key"] {
        std::fs::copy(test_pki().join(file), stolen.join(file)).unwrap();
    }
    tests::issue_in_test_pki(
        &pki::Identity::edge("store-3", "till-3").unwrap(),
        &Default::default(),
    )
    .unwrap();
    let zenoh_port = free_port();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-3".into(),
            format!("data_dir={:?}", dir.path().join("hub")),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            format!("mqtt.port={}", free_port()),
        ],
    )
    .unwrap();
    let key = protocol::keyexpr::hub_authorize("store-3", "till-3");
    let peers = vec!["store-3".to_string()];
    // Its own terminal gets an answer (a refusal of the junk it sent): the control.
    let own = protocol::keyexpr::hub_authorize("store-3", "till-1");
    let answer = zenoh_query(
        zenoh_port,
        "edge-store-3-till-1",
        peers.clone(),
        own.clone(),
        Duration::from_secs(10),
    );
    assert!(answer.is_some(), "the store's own terminal got no answer");
    // A valid terminal of the store asking on another terminal's key expression (to be counted
    // as it, or to spend its rate and open verifications): the hub's access control drops it.
    for other in [
        key.clone(),
        protocol::keyexpr::hub_verify("store-3", "till-3"),
        protocol::keyexpr::hub_authorize("store-3", "till-9"),
    ] {
        let answer = zenoh_query(
            zenoh_port,
            "edge-store-3-till-1",
            peers.clone(),
            other.clone(),
            Duration::from_secs(3),
        );
        assert!(answer.is_none(), "till-1 was answered on {other}");
    }
    // The replaced certificate: no answer; its replacement: answered.
    let mut stolen_files = pki::TlsConfig {
        pki_dir: test_pki().to_owned(),
        ..Default::default()
    }
    .files("edge-store-3-till-3");
    stolen_files.cert = stolen.join("edge-store-3-till-3.pem");
    stolen_files.key = stolen.join("edge-store-3-till-3.key");
    let answer = zenoh_query_with(
        zenoh_port,
        stolen_files,
        peers.clone(),
        key.clone(),
        Duration::from_secs(3),
    );
    assert!(
        answer.is_none(),
        "a replaced terminal certificate got an answer"
    );
    let answer = zenoh_query(
        zenoh_port,
        "edge-store-3-till-3",
        peers.clone(),
        key.clone(),
        Duration::from_secs(10),
    );
    assert!(answer.is_some(), "the replacement got no answer");
    // Another store's terminal, and a revoked terminal of this store: no answer at all.
    for (name, till) in [
        ("edge-store-4-till-1", "till-1"),
        ("edge-store-3-till-2", "till-2"),
    ] {
        let answer = zenoh_query(
            zenoh_port,
            name,
            peers.clone(),
            protocol::keyexpr::hub_authorize("store-3", till),
            Duration::from_secs(3),
        );
        assert!(answer.is_none(), "{name} got an answer");
    }
    drop(hub);
}

/// A rogue that listens where a terminal looks for its hub with the certificate and key `cert`
/// and `key` (a hub's, maybe stolen), and approves every payment of store-5.
/// Its answers are signed with `signing` (certificate, key), or not at all.
fn rogue_hub(
    cert: &std::path::Path,
    key: &std::path::Path,
    signing: Option<(&std::path::Path, &std::path::Path)>,
    port: u16,
) -> zlink::ZenohLink {
    let mut files = pki::TlsConfig {
        pki_dir: test_pki().to_owned(),
        ..Default::default()
    }
    .files("unused");
    files.cert = cert.to_owned();
    files.key = key.to_owned();
    let signer = signing.map(|(cert, key)| {
        pki::ReplySigner::from_pem(
            &std::fs::read(key).unwrap(),
            std::fs::read_to_string(cert).unwrap(),
        )
        .unwrap()
    });
    let config = zlink::ZenohConfig {
        listen: vec![format!("tls/127.0.0.1:{port}")],
        ..Default::default()
    };
    let tills = ["till-1", "till-2", "till-3"];
    let security = zlink::ZenohSecurity {
        files,
        grants: vec![zlink::ZenohGrant {
            common_names: tills
                .iter()
                .map(|till| {
                    tls_identity(&format!("edge-store-5-{till}"))
                        .unwrap()
                        .identity
                        .common_name
                })
                .collect(),
            key_exprs: vec!["facepay/**".into()],
            role: zlink::GrantRole::Answer,
        }],
    };
    let link = zlink::ZenohLink::open(&config, &security).unwrap();
    let (queries, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    for till in tills {
        let (session, queries) = (link.session().clone(), queries.clone());
        let queryable = runtime()
            .block_on(link.spawn(async move {
                session
                    .declare_queryable(protocol::keyexpr::hub_authorize("store-5", till))
                    .await
                    .unwrap()
            }))
            .unwrap();
        link.spawn(async move {
            while let Ok(query) = queryable.recv_async().await {
                if queries.send(query).is_err() {
                    break;
                }
            }
        });
    }
    link.spawn(async move {
        while let Some(query) = incoming.recv().await {
            let payload = query
                .payload()
                .map(|p| p.to_bytes().into_owned())
                .unwrap_or_default();
            let Ok(request) = protocol::decode::<protocol::AuthorizeRequest>(&payload) else {
                continue;
            };
            let reply = protocol::AuthorizeReply {
                payment_id: request.payment_id,
                decision: protocol::Decision::Approved {
                    account_id: "victim".into(),
                    already_paid: false,
                },
                offline: false,
            };
            let answer = match &signer {
                Some(signer) => {
                    let reply = String::from_utf8(protocol::encode(&reply)).unwrap();
                    protocol::encode(&protocol::SignedHubReply {
                        signature: signer.sign(&payload, &reply).unwrap(),
                        reply,
                        certificate_pem: signer.certificate_pem().to_owned(),
                    })
                }
                // An answer as hubs sent them before they signed.
                None => protocol::encode(&reply),
            };
            let _ = query.reply(query.key_expr().clone(), answer).await;
        }
    });
    link
}

#[test]
fn a_terminal_ignores_a_rogue_hub_of_another_store_or_with_a_revoked_key() {
    let dir = tempfile::tempdir().unwrap();
    let wallet = paycode::Wallet::generate("victim").unwrap();
    for till in ["till-1", "till-2", "till-3"] {
        ensure_identity(&pki::Identity::edge("store-5", till).unwrap()).unwrap();
    }
    let other = hub_identity("store-6");
    // Store 5's hub key is stolen; the hub gets a new certificate, which revokes the old one.
    let stolen = dir.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    let five = hub_identity("store-5");
    for ext in ["pem", "key"] {
        std::fs::copy(
            test_pki().join(format!("{five}.{ext}")),
            stolen.join(format!("{five}.{ext}")),
        )
        .unwrap();
    }
    tests::issue_in_test_pki(&pki::Identity::hub("store-5").unwrap(), &Default::default()).unwrap();
    let pem = |dir: &std::path::Path, name: &str| {
        (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        )
    };
    let mut answers = Vec::new();
    let (current, foreign) = (pem(test_pki(), &five), pem(test_pki(), &other));
    for (till, (cert, key), signing) in [
        ("till-1", foreign.clone(), Some(foreign.clone())),
        ("till-2", current.clone(), Some(current.clone())),
        ("till-3", pem(&stolen, &five), Some(pem(&stolen, &five))),
        // This store's certificate on the link, but answers unsigned or signed by another hub.
        ("till-1", current.clone(), None),
        ("till-2", current.clone(), Some(foreign.clone())),
    ] {
        let port = free_port();
        let _rogue = rogue_hub(
            &cert,
            &key,
            signing.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            port,
        );
        let frames = tests::spool(till);
        let edge = Service::start(
            "facepay-edge",
            &[
                "store_id=store-5".into(),
                format!("terminal_id={till}"),
                "register_listen=127.0.0.1:0".into(),
                "scan_timeout_ms=3000".into(),
                format!("frames_dir={frames:?}"),
                format!("zenoh.connect=[\"tls/127.0.0.1:{port}\"]"),
            ],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        present_code(&frames, &wallet).unwrap();
        answers.push(charge(edge.http_addr, "o-1", 100, "EUR").unwrap());
    }
    // A rogue with another store's hub certificate is not heard: the store system is
    // unreachable, nothing approved (the query went out, so the terminal cannot say more than
    // "unknown": a hub it could trust may have received it).
    let (status, refused) = &answers[0];
    assert_eq!(*status, 503, "{refused:?}");
    assert_eq!(refused.status, protocol::ChargeStatus::Unknown);
    // The control: this store's current hub certificate would be believed.
    let (status, fooled) = &answers[1];
    assert_eq!(
        (*status, fooled.status),
        (200, protocol::ChargeStatus::Approved)
    );
    // The stolen, revoked key of this store's hub: its signed approval is refused.
    let (status, refused) = &answers[2];
    assert_eq!(*status, 503, "{refused:?}");
    assert!(
        refused.detail.contains("revoked") || refused.detail.contains("Revoked"),
        "{refused:?}"
    );
    // Unsigned answers, and answers another store's hub signed: refused.
    for (n, why) in [(3, "unsigned"), (4, "hub answer refused")] {
        let (status, refused) = &answers[n];
        assert_eq!(*status, 503, "{refused:?}");
        assert!(refused.detail.contains(why), "{refused:?}");
    }
}

#[test]
fn key_files_in_a_new_pki_are_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(tests::binary_path("facepay-pki"))
        .args(["--dir"])
        .arg(dir.path())
        .args([
            "fleet",
            "--stores",
            "store-1,store-2",
            "--terminals",
            "till-1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut keys = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "key") {
            keys += 1;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }
    // CA, cloud, broker, database, operator, viewer, two hubs, two terminals.
    assert_eq!(keys, 10);
    for name in [
        "ca.pem",
        "crl.pem",
        "hub-store-2.pem",
        "edge-store-1-till-1.pem",
        "operator.pem",
    ] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    let listed = Command::new(tests::binary_path("facepay-pki"))
        .arg("--dir")
        .arg(dir.path())
        .arg("list")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("hub-store-2") && text.contains("expires="),
        "{text}"
    );
}

#[test]
fn metrics_can_require_tls_and_basic_auth() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("metrics-users");
    let digest: String = sha2::Sha256::digest(b"scrape-secret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&users, format!("# Prometheus\nprometheus:{digest}\n")).unwrap();
    // Basic auth over plain HTTP is refused before anything is bound.
    let (code, stderr) = run_to_exit(
        "facepay-edge",
        &[
            format!("tls.pki_dir={:?}", test_pki()),
            format!("metrics.basic_auth_file={users:?}"),
            format!("frames_dir={:?}", tests::spool("frames")),
        ],
    );
    assert_eq!(code, Some(settings::EXIT_CONFIG), "{stderr}");
    assert!(stderr.contains("metrics.tls"), "{stderr}");
    // A password file others can read is refused like a key.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let edge = Service::start(
        "facepay-edge",
        &[
            "register_listen=127.0.0.1:0".into(),
            "metrics.tls=true".into(),
            format!("metrics.basic_auth_file={users:?}"),
            format!("frames_dir={:?}", tests::spool("frames")),
            format!("zenoh.connect=[\"tls/127.0.0.1:{}\"]", free_port()),
        ],
    )
    .unwrap();
    let url = format!("https://{}/metrics", edge.metrics_addr);
    assert!(
        ureq::get(&format!("http://{}/metrics", edge.metrics_addr))
            .call()
            .is_err(),
        "no plain HTTP"
    );
    // Prometheus trusts the fleet's CA; it needs no client certificate.
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(anonymous_tls()))
        .build();
    let status = |request: ureq::Request| match request.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    };
    use base64::Engine as _;
    let basic = |user_password: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    };
    assert_eq!(status(agent.get(&url)).0, 401);
    assert_eq!(
        status(
            agent
                .get(&url)
                .set("Authorization", &basic("prometheus:wrong"))
        )
        .0,
        401
    );
    let (code, page) = status(
        agent
            .get(&url)
            .set("Authorization", &basic("prometheus:scrape-secret")),
    );
    assert_eq!(code, 200);
    assert!(
        page.contains("facepay_edge_tls_certificate_expiry_timestamp_seconds"),
        "{page}"
    );
}

#[test]
fn a_revocation_reaches_the_admin_api_and_the_hubs_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    for till in ["till-1", "till-2"] {
        ensure_identity(&pki::Identity::edge("store-8", till).unwrap()).unwrap();
    }
    let hub_name = hub_identity("store-8");
    ensure_identity(&pki::Identity::operator(Some("late"), pki::Role::Operator).unwrap()).unwrap();
    // The hub has a PKI directory of its own, as in a store: only the cloud can tell it of a
    // revocation.
    let hub_pki = dir.path().join("hub-pki");
    std::fs::create_dir_all(&hub_pki).unwrap();
    for file in [
        "ca.pem".to_string(),
        "crl.pem".to_string(),
        format!("{hub_name}.pem"),
        format!("{hub_name}.key"),
        "edge-store-8-till-1.pem".to_string(),
        "edge-store-8-till-2.pem".to_string(),
    ] {
        std::fs::copy(test_pki().join(&file), hub_pki.join(&file)).unwrap();
    }
    let first_list = std::fs::read(hub_pki.join("crl.pem")).unwrap();
    // A terminal of the store with its own directory too: it hears of revocations from its hub.
    let edge_pki = dir.path().join("edge-pki");
    std::fs::create_dir_all(&edge_pki).unwrap();
    for file in [
        "ca.pem",
        "crl.pem",
        "edge-store-8-till-1.pem",
        "edge-store-8-till-1.key",
    ] {
        std::fs::copy(test_pki().join(file), edge_pki.join(file)).unwrap();
    }
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = tests::start_cloud_with(
        &dir.path().join("cloud"),
        broker.port,
        &["crl_poll_interval_ms=200".into()],
    )
    .unwrap();
    let zenoh_port = free_port();
    let hub = Service::start(
        "facepay-hub",
        &[
            "store_id=store-8".into(),
            format!("tls.pki_dir={hub_pki:?}"),
            format!("data_dir={:?}", dir.path().join("hub")),
            format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
            format!("mqtt.port={}", broker.port),
        ],
    )
    .unwrap();
    tests::wait_for_metric(
        hub.metrics_addr,
        "facepay_hub_broker_connected",
        1.0,
        Duration::from_secs(20),
    )
    .unwrap();
    tests::wait_for_metric(
        hub.metrics_addr,
        "facepay_hub_allowed_terminals",
        2.0,
        Duration::from_secs(5),
    )
    .unwrap();
    let edge = Service::start(
        "facepay-edge",
        &[
            "store_id=store-8".into(),
            "terminal_id=till-1".into(),
            format!("tls.pki_dir={edge_pki:?}"),
            "register_listen=127.0.0.1:0".into(),
            "revocation_poll_interval_ms=200".into(),
            format!("frames_dir={:?}", tests::spool("frames")),
            format!("zenoh.connect=[\"tls/127.0.0.1:{zenoh_port}\"]"),
        ],
    )
    .unwrap();
    let revoked_at_edge = || {
        tests::metric_value(
            &tests::get_text(&format!("http://{}/metrics", edge.metrics_addr)).unwrap(),
            "facepay_edge_revoked_certificates",
        )
        .unwrap()
    };
    let before = revoked_at_edge();
    let peers = vec!["store-8".to_string()];
    let asks = |name: &str, patience: u64| {
        let till = name.strip_prefix("edge-store-8-").unwrap();
        zenoh_query(
            zenoh_port,
            name,
            peers.clone(),
            protocol::keyexpr::hub_authorize("store-8", till),
            Duration::from_secs(patience),
        )
    };
    assert!(
        asks("edge-store-8-till-2", 10).is_some(),
        "the control: till-2 is answered"
    );
    let late =
        CloudApi::as_operator_unchecked(cloud.http_addr, test_pki(), "operator-late").unwrap();
    assert_eq!(late.get("/v1/accounts").unwrap().0, 200);

    // Revoked at the CA: the cloud reads the list, refuses the operator at once, and pushes it to
    // the hub, which drops the terminal.
    tests::revoke_in_test_pki("edge-store-8-till-2").unwrap();
    tests::revoke_in_test_pki("operator-late").unwrap();
    tests::wait_for_metric(
        hub.metrics_addr,
        "facepay_hub_allowed_terminals",
        1.0,
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        asks("edge-store-8-till-2", 3).is_none(),
        "a revoked terminal is still answered"
    );
    assert!(
        asks("edge-store-8-till-1", 10).is_some(),
        "the other terminal is answered again"
    );
    let late =
        CloudApi::as_operator_unchecked(cloud.http_addr, test_pki(), "operator-late").unwrap();
    assert!(
        late.get("/v1/accounts").is_err(),
        "a revoked operator is let in"
    );
    // The hub kept the newer list for its next start.
    assert_ne!(std::fs::read(hub_pki.join("crl.pem")).unwrap(), first_list);
    // The terminal fetched it from its hub, checked the CA's signature, and keeps it too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while revoked_at_edge() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the terminal did not get the newer list"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(std::fs::read(edge_pki.join("crl.pem")).unwrap(), first_list);

    // The hub's own certificate revoked: its terminals would refuse its answers, so it takes no
    // request at all (nothing moves unheard).
    tests::revoke_in_test_pki(&hub_name).unwrap();
    tests::wait_for_metric(
        hub.metrics_addr,
        "facepay_hub_allowed_terminals",
        0.0,
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(asks("edge-store-8-till-1", 3).is_none());
}

#[test]
fn identities_that_are_no_stores_hub_get_nothing_from_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = tests::start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let operator = CloudApi::new(cloud.http_addr);
    operator
        .open(&protocol::OpenAccount {
            account_id: "store-9".into(),
            kind: protocol::AccountKind::Merchant,
            currency: protocol::Currency::parse("EUR").unwrap(),
            initial_balance_minor: 0,
            public_key: None,
        })
        .unwrap();
    let hub = hub_identity("store-9");
    ensure_identity(&pki::Identity::edge("store-9", "till-1").unwrap()).unwrap();
    let edge = "edge-store-9-till-1".to_string();
    // Asks for the key log as `name`, sealing the request with that certificate's own key; the
    // cloud's reply, opened against the CA, or none within a few seconds.
    let ask = |name: String| {
        runtime().block_on(async move {
            let tls = tls_identity(&name).unwrap();
            let cn = tls.identity.common_name.clone();
            let (client, mut eventloop) = client_as(broker.port, &name, &cn);
            let replies = format!("facepay/v1/stores/{cn}/replies");
            subscribed(&client, &mut eventloop, &[&replies]).await;
            let request = protocol::HubRequest {
                request_id: 1,
                store_id: cn.clone().into(),
                body: protocol::HubRequestBody::KeySync { after_version: 0 },
            };
            let topic = format!("facepay/v1/cloud/requests/{cn}");
            let sealed = tls
                .reply_signer()
                .unwrap()
                .seal(&topic, protocol::encode(&request))
                .unwrap();
            client
                .publish(topic, QoS::AtLeastOnce, false, sealed)
                .await
                .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let opened = tls
                            .sealed_verifier()
                            .open(&replies, &p.payload, &pki::Signer::cloud())
                            .unwrap();
                        return Some(
                            protocol::decode::<protocol::CloudReply>(&opened)
                                .unwrap()
                                .body,
                        );
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => panic!("the link failed: {error}"),
                    Err(_) => return None,
                }
            }
        })
    };
    // The store's hub is answered: the control.
    let answer = ask(hub);
    assert!(
        matches!(answer, Some(protocol::CloudReplyBody::Keys(_))),
        "{answer:?}"
    );
    // A terminal's certificate, an operator's: the broker lets them publish on the topic named
    // after them, but what they seal is not a store's hub's: the cloud drops it unread, and
    // counts it.
    for name in [edge, "operator".to_string(), "operator-viewer".to_string()] {
        let answer = ask(name.clone());
        assert!(answer.is_none(), "{name}: {answer:?}");
    }
    tests::wait_for_metric(
        cloud.metrics_addr,
        "facepay_cloud_link_messages_refused_total",
        3.0,
        Duration::from_secs(10),
    )
    .unwrap();
}
