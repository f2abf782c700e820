//! Pay by face through real processes: Mosquitto, the cloud (HTTPS enrollment API, FAISS), two
//! store hubs and one terminal per store, with the committed face photos.

use std::{net::SocketAddr, path::Path, time::Duration};

use paycode::Wallet;
use protocol::{
    AccountKind, ChargeStatus, CreateCustomer, Currency, DeclineReason, OpenAccount,
    SecondFactorKind, VerifyReply,
};
use tests::{
    charge_with_token, face_fixture, free_port, get_text, metric_value, present_face, present_qr,
    second_factor, verify, wait_for_keys, wait_for_metric, CloudApi, EnrollApi, Mosquitto, Service,
};

struct Store {
    hub: Service,
    uplink: tests::proxy::FaultProxy,
    edge: Service,
    frames: std::path::PathBuf,
    camera: std::path::PathBuf,
}

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn start_store(dir: &Path, store_id: &str, mqtt_port: u16, hub_extra: &[&str]) -> Store {
    let zenoh_port = free_port();
    // The hub reaches the broker through a proxy the test can cut.
    let uplink = tests::proxy::FaultProxy::start(([127, 0, 0, 1], mqtt_port).into()).unwrap();
    let mut hub_args = vec![
        format!("store_id={store_id}"),
        format!("data_dir={:?}", dir.join(store_id).join("hub")),
        format!("zenoh.listen=[\"tls/127.0.0.1:{zenoh_port}\"]"),
        format!("mqtt.port={}", uplink.port),
        "mqtt.keep_alive_seconds=1".into(),
        "mqtt.reconnect_delay_ms=100".into(),
        "identify.free_failures=2".into(),
        "identify.lockout_base_seconds=600".into(),
    ];
    hub_args.extend(hub_extra.iter().map(|a| a.to_string()));
    let hub = Service::start("facepay-hub", &hub_args).expect("hub starts");
    let frames = tests::spool(&format!("{store_id}-frames"));
    let camera = tests::spool(&format!("{store_id}-camera"));
    let edge = Service::start(
        "facepay-edge",
        &[
            format!("store_id={store_id}"),
            "terminal_id=till-1".into(),
            "register_listen=127.0.0.1:0".into(),
            "scan_timeout_ms=3000".into(),
            "face_timeout_ms=3000".into(),
            format!("frames_dir={frames:?}"),
            format!("camera_dir={camera:?}"),
            format!("zenoh.connect=[\"tls/127.0.0.1:{zenoh_port}\"]"),
        ],
    )
    .expect("edge starts");
    Store {
        hub,
        uplink,
        edge,
        frames,
        camera,
    }
}

fn customer(id: &str, store: &str, pin: &str, factor: SecondFactorKind) -> CreateCustomer {
    CreateCustomer {
        customer_id: id.into(),
        name: format!("Customer {id}"),
        phone: "+33 6 12 34 56 78".into(),
        pin: pin.into(),
        second_factor: factor,
        home_store_id: store.into(),
        currency: "EUR".into(),
        initial_balance_minor: 10_000,
        public_key: None,
    }
}

fn enroll(api: &EnrollApi, c: &CreateCustomer, photo: &str, look_alike_of: &[&str]) {
    let (status, body) = api.create(c).unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .add_face(&c.customer_id, &face_fixture(photo), look_alike_of)
        .unwrap();
    assert_eq!(status, 201, "{} {photo}: {body}", c.customer_id);
}

/// Looks at the camera and asks the terminal to verify.
fn look(store: &Store, photo: &Path, method: &str) -> VerifyReply {
    present_face(&store.camera, photo).unwrap();
    let (_, reply) = verify(store.edge.http_addr, method).unwrap();
    reply
}

fn token_of(reply: &VerifyReply, account: &str) -> String {
    match reply {
        VerifyReply::Verified {
            token, account_id, ..
        } => {
            assert_eq!(account_id, account, "{reply:?}");
            token.clone()
        }
        other => panic!("expected {account} verified, got {other:?}"),
    }
}

fn refusal(reply: &VerifyReply) -> DeclineReason {
    match reply {
        VerifyReply::Refused { reason, .. } => *reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn pay(edge: SocketAddr, order: &str, amount: i64, token: &str) -> protocol::ChargeResult {
    charge_with_token(edge, order, amount, "EUR", token)
        .unwrap()
        .1
}

#[test]
fn pay_by_face_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).expect("mosquitto starts");
    // The fleet's lockout rule, as the hubs'.
    let cloud = tests::start_cloud_with(
        &dir.path().join("cloud"),
        broker.port,
        &[
            "identity.free_failures=2".into(),
            "identity.lockout_base_seconds=600".into(),
        ],
    )
    .expect("cloud starts");
    let admin = CloudApi::new(cloud.http_addr);
    for store in ["store-1", "store-2"] {
        admin
            .open(&OpenAccount {
                account_id: store.into(),
                kind: AccountKind::Merchant,
                currency: eur(),
                initial_balance_minor: 0,
                public_key: None,
            })
            .unwrap();
    }
    // The enrollment API is HTTPS only, with the cloud's certificate of the fleet's CA.
    let cert = Path::new(&cloud.ready["ca"]).to_owned();
    assert!(cert.exists(), "{cert:?}");
    let api_token = Path::new(&cloud.ready["token"]).to_owned();
    let api = EnrollApi::new(&cloud.ready["api"], &cert, &api_token).unwrap();
    assert!(
        ureq::get(&format!("http://{}/v1/customers/x", cloud.ready["api"]))
            .call()
            .is_err(),
        "no plain HTTP on the enrollment API"
    );

    // --- Enrollment, and what it refuses -------------------------------------------------------
    enroll(
        &api,
        &customer("bruno", "store-1", "4821", SecondFactorKind::Pin),
        "bruno-1.jpg",
        &[],
    );
    let carla_wallet = Wallet::generate("carla").unwrap();
    let carla = CreateCustomer {
        public_key: Some(carla_wallet.public_key_b64()),
        ..customer("carla", "store-1", "9999", SecondFactorKind::PhoneLast4)
    };
    enroll(&api, &carla, "carla-1.jpg", &[]);
    enroll(
        &api,
        &customer("dora", "store-2", "3141", SecondFactorKind::Pin),
        "dora-1.jpg",
        &[],
    );

    let (status, body) = api
        .create(&customer("bruno", "store-1", "4821", SecondFactorKind::Pin))
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let (status, body) = api
        .create(&customer("eve", "store-1", "12", SecondFactorKind::Pin))
        .unwrap();
    assert_eq!(status, 400, "short pin: {body}");
    assert!(body["detail"].as_str().unwrap().contains("pin"), "{body}");
    let (status, _) = api
        .create(&CreateCustomer {
            currency: "XYZ".into(),
            ..customer("eve", "store-1", "1234", SecondFactorKind::Pin)
        })
        .unwrap();
    assert_eq!(status, 400, "unknown currency");
    let (status, _) = api
        .create(&customer("eve", "store-1", "5555", SecondFactorKind::Pin))
        .unwrap();
    assert_eq!(status, 201);
    let spoof =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/face/tests/fixtures/spoof-photo.jpg");
    let (status, body) = api.add_face("eve", &spoof, &[]).unwrap();
    assert_eq!(
        (status, body["reason"].as_str()),
        (422, Some("not_live")),
        "{body}"
    );
    let two =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/face/tests/fixtures/two-faces.jpg");
    let (status, body) = api.add_face("eve", &two, &[]).unwrap();
    assert_eq!(
        (status, body["reason"].as_str()),
        (422, Some("multiple_faces")),
        "{body}"
    );
    let not_image = dir.path().join("notes.jpg");
    std::fs::write(&not_image, b"just text").unwrap();
    let (status, body) = api.add_face("eve", &not_image, &[]).unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_image")),
        "{body}"
    );
    let (status, _) = api
        .add_face("nobody", &face_fixture("stranger.jpg"), &[])
        .unwrap();
    assert_eq!(status, 404);
    // Bruno again under another account: search before insert finds him.
    let (status, body) = api
        .add_face("eve", &face_fixture("bruno-2.jpg"), &[])
        .unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("probable_duplicate")),
        "{body}"
    );
    let (status, body) = api.get("bruno").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        api.unauthenticated_get("bruno").unwrap(),
        401,
        "operators only"
    );
    assert_eq!(body["faces"], 1);
    // The phone's last four digits are a second factor: the view never shows them.
    assert_eq!(body["phone_masked"], "33*********");
    assert!(body.get("pin").is_none() && body.get("pin_hash").is_none());

    // Twins: the second is a probable duplicate until an operator confirms they are two people.
    enroll(
        &api,
        &customer("twin-a", "store-1", "1111", SecondFactorKind::Pin),
        "twin-1.jpg",
        &[],
    );
    let (status, body) = api
        .create(&customer(
            "twin-b",
            "store-1",
            "2222",
            SecondFactorKind::Pin,
        ))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let mirrored = face_fixture("twin-1-mirrored.jpg");
    let (status, _) = api.add_face("twin-b", &mirrored, &[]).unwrap();
    assert_eq!(status, 409);
    let (status, body) = api.add_face("twin-b", &mirrored, &["twin-a"]).unwrap();
    assert_eq!(status, 201, "{body}");

    // --- Stores: the hubs receive their customers' templates ------------------------------------
    let s1 = start_store(dir.path(), "store-1", broker.port, &[]);
    // Store 2's tokens live 5 s: a charge asked again after its token expired hears what the
    // journal holds.
    let s2 = start_store(
        dir.path(),
        "store-2",
        broker.port,
        &["identify.token_ttl_seconds=5"],
    );
    let hot = "facepay_hub_hot_templates";
    wait_for_metric(s1.hub.http_addr, hot, 4.0, Duration::from_secs(30)).unwrap();
    wait_for_metric(s2.hub.http_addr, hot, 1.0, Duration::from_secs(30)).unwrap();
    wait_for_keys(s1.hub.http_addr, 1, Duration::from_secs(30)).unwrap();

    // --- Face only: identify -> token -> charge --------------------------------------------------
    let token = token_of(&look(&s1, &face_fixture("bruno-2.jpg"), "face"), "bruno");
    let paid = pay(s1.edge.http_addr, "f-1", 1_234, &token);
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");
    assert_eq!(paid.account_id.as_deref(), Some("bruno"));
    assert_eq!(admin.balance("bruno").unwrap(), 10_000 - 1_234);
    // The register retries the same order: nothing moves again.
    let retry = pay(s1.edge.http_addr, "f-1", 1_234, &token);
    assert!(retry.already_paid, "{retry:?}");
    // The token is single-use: another order is refused.
    let again = pay(s1.edge.http_addr, "f-2", 100, &token);
    assert_eq!(again.reason, Some(DeclineReason::TokenInvalid), "{again:?}");
    // And bound to its store: a fresh, unspent token shown at another store's terminal (with
    // the same terminal name) is refused there, and still pays at its own.
    let fresh = token_of(&look(&s1, &face_fixture("bruno-2.jpg"), "face"), "bruno");
    let elsewhere = pay(s2.edge.http_addr, "f-3", 100, &fresh);
    assert_eq!(
        elsewhere.reason,
        Some(DeclineReason::TokenInvalid),
        "{elsewhere:?}"
    );
    let home = pay(s1.edge.http_addr, "f-3", 100, &fresh);
    assert_eq!(home.status, ChargeStatus::Approved, "{home:?}");
    let (status, made_up) =
        charge_with_token(s1.edge.http_addr, "f-4", 100, "EUR", "tok_nope").unwrap();
    assert_eq!(
        (status, made_up.reason),
        (200, Some(DeclineReason::TokenInvalid))
    );
    assert_eq!(admin.balance("bruno").unwrap(), 10_000 - 1_234 - 100);

    // --- Unenrolled person, spoof --------------------------------------------------------------
    let transfers_before = admin.transfers().unwrap().len();
    let stranger = look(&s1, &face_fixture("stranger.jpg"), "face");
    assert_eq!(refusal(&stranger), DeclineReason::FaceNotRecognized);
    let attack = look(&s1, &spoof, "face");
    assert_eq!(refusal(&attack), DeclineReason::SpoofSuspected);
    let (status, bad) = tests::post_json(
        &format!("http://{}/v1/verify", s1.edge.http_addr),
        &serde_json::json!({ "method": "retina" }),
    )
    .unwrap();
    assert_eq!(
        (status, bad["status"].as_str()),
        (400, Some("refused")),
        "{bad}"
    );
    assert_eq!(bad["reason"], "invalid_request");
    let (status, nobody) = verify(s1.edge.http_addr, "face").unwrap();
    assert_eq!(
        (status, refusal(&nobody)),
        (200, DeclineReason::NoFacePresented)
    );
    assert_eq!(
        admin.transfers().unwrap().len(),
        transfers_before,
        "nothing charged"
    );

    // --- Code and face: the code names the account, the face must be its owner ----------------
    let code = carla_wallet.issue_code(paycode::now_ms());
    present_qr(&s1.frames, &code).unwrap();
    let token = token_of(
        &look(&s1, &face_fixture("carla-2.jpg"), "code_and_face"),
        "carla",
    );
    let paid = pay(s1.edge.http_addr, "cf-1", 500, &token);
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");
    // The code the face confirmed is spent at the cloud with that payment: shown (or copied)
    // at another store within its window, as a plain code, it pays nothing.
    present_qr(&s2.frames, &code).unwrap();
    let (status, copied) = tests::charge(s2.edge.http_addr, "cf-copy", 500, "EUR").unwrap();
    assert_eq!(
        (status, copied.reason),
        (200, Some(DeclineReason::CodeReplayed)),
        "{copied:?}"
    );
    present_qr(&s1.frames, &carla_wallet.issue_code(paycode::now_ms())).unwrap();
    let mismatch = look(&s1, &face_fixture("bruno-2.jpg"), "code_and_face");
    assert_eq!(
        refusal(&mismatch),
        DeclineReason::FaceMismatch,
        "{mismatch:?}"
    );
    assert_eq!(admin.balance("carla").unwrap(), 10_000 - 500);

    // --- Look-alikes: the second factor decides ------------------------------------------------
    let twin_photo = face_fixture("twin-2.jpg");
    let VerifyReply::SecondFactorRequired {
        challenge_id, kind, ..
    } = look(&s1, &twin_photo, "face")
    else {
        panic!("look-alikes must be asked for the second factor");
    };
    assert_eq!(kind, SecondFactorKind::Pin);
    let (_, answered) = second_factor(s1.edge.http_addr, &challenge_id, "2222").unwrap();
    let token = token_of(&answered, "twin-b");
    assert_eq!(
        pay(s1.edge.http_addr, "tw-1", 700, &token).status,
        ChargeStatus::Approved
    );
    assert_eq!(admin.balance("twin-b").unwrap(), 10_000 - 700);
    assert_eq!(admin.balance("twin-a").unwrap(), 10_000);
    // A challenge takes one answer.
    let (_, reused) = second_factor(s1.edge.http_addr, &challenge_id, "2222").unwrap();
    assert_eq!(refusal(&reused), DeclineReason::InvalidRequest);

    // --- Wrong PIN while the store is cut off: declined, then locked here ------------------------
    s1.uplink.cut();
    wait_for_metric(
        s1.hub.http_addr,
        "facepay_hub_broker_connected",
        0.0,
        Duration::from_secs(10),
    )
    .unwrap();
    for attempt in 0..3 {
        let VerifyReply::SecondFactorRequired { challenge_id, .. } = look(&s1, &twin_photo, "face")
        else {
            panic!("attempt {attempt}: second factor expected");
        };
        let (_, wrong) = second_factor(s1.edge.http_addr, &challenge_id, "0000").unwrap();
        assert_eq!(
            refusal(&wrong),
            DeclineReason::SecondFactorWrong,
            "attempt {attempt}: {wrong:?}"
        );
    }
    let locked = look(&s1, &twin_photo, "face");
    assert_eq!(
        refusal(&locked),
        DeclineReason::FacePaymentLocked,
        "{locked:?}"
    );
    // Counted across the fleet once the store is back: the hub reports again what it could not
    // send, and the look-alikes are locked at the other store too, which never saw a wrong
    // answer (the cloud broadcast the count).
    s1.uplink.heal();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let elsewhere = look(&s2, &twin_photo, "face");
        if matches!(
            &elsewhere,
            VerifyReply::Refused { reason, .. } if *reason == DeclineReason::FacePaymentLocked
        ) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not locked at the other store: {elsewhere:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // --- Another store: not in its hot set, the cloud finds him, the hub caches him ------------
    let held = |site: &Store| {
        let page = tests::get_text(&format!("http://{}/metrics", site.hub.http_addr)).unwrap();
        tests::metric_value(&page, hot).unwrap()
    };
    let before = held(&s2);
    let token = token_of(&look(&s2, &face_fixture("bruno-2.jpg"), "face"), "bruno");
    assert_eq!(
        pay(s2.edge.http_addr, "v-1", 300, &token).status,
        ChargeStatus::Approved
    );
    wait_for_metric(s2.hub.http_addr, hot, before + 1.0, Duration::from_secs(5)).unwrap();
    // The register did not hear that answer and asks again once the token has expired: paid,
    // not "declined" (nor charged twice); another order with it is refused.
    std::thread::sleep(Duration::from_millis(5_500));
    let again = pay(s2.edge.http_addr, "v-1", 300, &token);
    assert_eq!(
        (again.status, again.already_paid),
        (ChargeStatus::Approved, true),
        "{again:?}"
    );
    let other = pay(s2.edge.http_addr, "v-2", 300, &token);
    assert_eq!(other.reason, Some(DeclineReason::TokenInvalid), "{other:?}");

    // --- Erasure: gone from the cloud, from every hub, and from the ledger's payers -------------
    let (status, body) = api.erase("bruno").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["templates_removed"], 1);
    let (status, _) = api.get("bruno").unwrap();
    assert_eq!(status, 404);
    wait_for_metric(s1.hub.http_addr, hot, 3.0, Duration::from_secs(10)).unwrap();
    wait_for_metric(s2.hub.http_addr, hot, before, Duration::from_secs(10)).unwrap();
    for store in [&s1, &s2] {
        let after = look(store, &face_fixture("bruno-2.jpg"), "face");
        assert_eq!(
            refusal(&after),
            DeclineReason::FaceNotRecognized,
            "{after:?}"
        );
    }
    // Erasing again (a retry after a lost answer) erases nothing more and closes the account
    // if the first did not get that far; an id never enrolled is not found.
    let (status, body) = api.erase("bruno").unwrap();
    assert_eq!(
        (status, &body["templates_removed"]),
        (200, &serde_json::json!(0)),
        "{body}"
    );
    let (status, _) = api.erase("nobody-ever").unwrap();
    assert_eq!(status, 404, "erasing an id never enrolled finds nobody");
    let (status, body) = api
        .create(&customer("bruno", "store-1", "4821", SecondFactorKind::Pin))
        .unwrap();
    assert_eq!(status, 409, "an erased id is not reused: {body}");
    let bruno = admin
        .accounts()
        .unwrap()
        .into_iter()
        .find(|a| a.account_id == "bruno")
        .unwrap();
    assert!(
        bruno.closed,
        "the ledger keeps the money record but takes no payment"
    );
    // Erasure reaches a hub that holds the customer as home, too.
    let (status, _) = api.erase("dora").unwrap();
    assert_eq!(status, 200);
    wait_for_metric(s2.hub.http_addr, hot, before - 1.0, Duration::from_secs(10)).unwrap();
    let gone = look(&s2, &face_fixture("dora-2.jpg"), "face");
    assert_eq!(refusal(&gone), DeclineReason::FaceNotRecognized);

    // --- Books and metrics ----------------------------------------------------------------------
    for totals in admin.totals().unwrap() {
        assert_eq!(totals.sum_of_balances_minor, 0);
    }
    let page = get_text(&format!("http://{}/metrics", s1.hub.metrics_addr)).unwrap();
    assert!(
        metric_value(
            &page,
            "facepay_hub_verifications_total{outcome=\"verified\"}"
        )
        .unwrap()
            >= 3.0,
        "{page}"
    );
    assert!(
        metric_value(
            &page,
            "facepay_hub_verification_declines_total{reason=\"second_factor_wrong\"}"
        )
        .unwrap()
            >= 3.0
    );
    // The terminal counts what /v1/verify answered: the spoof it refused itself among them.
    let page = get_text(&format!("http://{}/metrics", s1.edge.metrics_addr)).unwrap();
    for (series, at_least) in [
        (
            "facepay_edge_verifications_total{outcome=\"verified\"}",
            3.0,
        ),
        (
            "facepay_edge_verifications_total{outcome=\"declined\"}",
            2.0,
        ),
        (
            "facepay_edge_verification_declines_total{reason=\"spoof_suspected\"}",
            1.0,
        ),
        (
            "facepay_edge_verification_declines_total{reason=\"face_not_recognized\"}",
            1.0,
        ),
    ] {
        assert!(
            metric_value(&page, series).unwrap() >= at_least,
            "{series}: {page}"
        );
    }
}
