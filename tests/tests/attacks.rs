//! The attack suite: attacks on the money path performed as an attacker would, against real
//! processes, each answered by its precise refusal, with the ledger read back to show that
//! nothing moved.

use std::time::{Duration, Instant};

use paycode::Wallet;
use protocol::{
    AccountKind, ChargeStatus, CloudReply, CloudReplyBody, Currency, Decision, DeclineReason,
    HubRequest, HubRequestBody, KeyBatch, KeyEntry,
};
use tests::{
    attacker::Attacker, ensure_identity, present_code, start_cloud, store::StoreSite, tls_identity,
    wait_for_keys, wait_for_metric, CloudApi, Mosquitto,
};

use tests::open_account as open;

/// Shows `wallet`'s code at the store's first terminal and charges `order`.
fn pay(site: &StoreSite, wallet: &Wallet, order: &str, amount: i64) -> protocol::ChargeResult {
    pay_showing(site, wallet, order, amount).0
}

/// [`pay`], and the last code shown (the one the answer is about).
fn pay_showing(
    site: &StoreSite,
    wallet: &Wallet,
    order: &str,
    amount: i64,
) -> (protocol::ChargeResult, String) {
    let (edge, frames) = &site.edges[0];
    let shown = std::cell::RefCell::new(String::new());
    let show = || {
        *shown.borrow_mut() = present_code(frames, wallet).unwrap();
    };
    let heard = tests::charge_until_reachable(edge.http_addr, show, order, amount, || false);
    (heard, shown.into_inner())
}

/// A compromised broker (here one that enforces no ACL, so any certificate of the fleet publishes
/// anywhere) relays forged cloud messages to a hub: a key update giving the victim's account the
/// attacker's key, unsealed and sealed with another store's hub certificate, and "approved"
/// replies to a payment the cloud never answered; and forged store requests to the cloud (an
/// authorization, and the void a customer would send to get back what she paid for goods she
/// took, with her own code's nonce). Neither side opens any of them: the attacker's code does not
/// pay from the victim's account, the victim's own code still does, the cloud applies no forged
/// authorization and moves nothing back, and the register hears the hub's own offline decline,
/// not the forged approval.
#[test]
fn forged_link_messages_through_a_compromised_broker_move_no_money() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_without_acl(dir.path()).unwrap();
    let mut cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open(&api, "store-1", AccountKind::Merchant, 0);
    let alice = open(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let site = StoreSite::start(
        dir.path(),
        "store-1",
        broker.port,
        1,
        &["offline.payment_ceiling_minor=1500".into()],
    )
    .unwrap();
    wait_for_keys(site.hub_http(), 1, Duration::from_secs(20)).unwrap();
    let refused = |count: f64| {
        wait_for_metric(
            site.hub_http(),
            "facepay_hub_link_messages_refused_total",
            count,
            Duration::from_secs(10),
        )
        .unwrap()
    };

    // Mallory holds store-2's hub certificate and a wallet of her own that claims alice's account.
    let rogue = pki::Identity::hub("store-2").unwrap();
    ensure_identity(&rogue).unwrap();
    let rogue_signer = tls_identity(&rogue.name).unwrap().reply_signer().unwrap();
    let mallory = Wallet::generate("alice").unwrap();
    let attacker = Attacker::connect(broker.port, &rogue.name, "mallory").unwrap();
    let keys = protocol::topics::key_updates();
    let forged_keys = protocol::encode(&KeyBatch {
        entries: vec![KeyEntry {
            account_id: "alice".into(),
            version: 1_000,
            public_key: Some(mallory.public_key_b64()),
        }],
        more: false,
    });
    attacker.publish(&keys, forged_keys.clone()).unwrap();
    attacker
        .publish(&keys, rogue_signer.seal(&keys, forged_keys).unwrap())
        .unwrap();
    refused(2.0);
    let heard = pay(&site, &mallory, "o1", 700);
    assert_eq!(
        (heard.status, heard.reason),
        (ChargeStatus::Declined, Some(DeclineReason::BadSignature)),
        "{heard:?}"
    );
    let (heard, code) = pay_showing(&site, &alice, "o2", 700);
    assert_eq!(heard.status, ChargeStatus::Approved, "{heard:?}");
    assert_eq!(api.account("alice").unwrap().balance_minor, 9_300);

    // Mallory speaks for store-1 to the cloud: an authorization the cloud would apply (it checks
    // codes through the hub that sends them), unsealed and sealed with her certificate.
    let requests = protocol::topics::cloud_requests("store-1");
    let forged_request = protocol::encode(&HubRequest {
        request_id: 7,
        store_id: "store-1".into(),
        body: HubRequestBody::Authorize(protocol::CloudAuthorize {
            evidence: Default::default(),
            payment_id: "store-1:loot".into(),
            account_id: "alice".into(),
            code_nonce: "00112233445566778899aabbccddeeff".into(),
            amount_minor: 5_000,
            currency: Currency::parse("EUR").unwrap(),
            terminal_id: "till-1".into(),
            order_id: "loot".into(),
            offline_reservation: Default::default(),
            spent_code: None,
        }),
    });
    attacker.publish(&requests, forged_request.clone()).unwrap();
    attacker
        .publish(
            &requests,
            rogue_signer.seal(&requests, forged_request).unwrap(),
        )
        .unwrap();
    let nonce = paycode::SignedCode::parse(&code).unwrap().nonce_hex();
    let forged_void = protocol::encode(&HubRequest {
        request_id: 8,
        store_id: "store-1".into(),
        body: HubRequestBody::Void(protocol::VoidPayment {
            payment_id: "store-1:o2".into(),
            account_id: "alice".into(),
            code_nonce: nonce.into(),
        }),
    });
    attacker.publish(&requests, forged_void.clone()).unwrap();
    attacker
        .publish(
            &requests,
            rogue_signer.seal(&requests, forged_void).unwrap(),
        )
        .unwrap();
    wait_for_metric(
        cloud.metrics_addr,
        "facepay_cloud_link_messages_refused_total",
        4.0,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(api.account("alice").unwrap().balance_minor, 9_300);
    assert!(api
        .transfers()
        .unwrap()
        .iter()
        .all(|t| !t.transfer_id.contains("loot")));
    api.assert_books_balance().unwrap();

    // The cloud goes down; Mallory reads the hub's request off the broker and answers it
    // "approved" herself, unsealed and sealed with her hub certificate.
    cloud.kill();
    attacker
        .subscribe(&protocol::topics::cloud_requests("store-1"))
        .unwrap();
    let forger = std::thread::spawn(move || {
        let replies = protocol::topics::store_replies("store-1");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let Some((_, payload)) = attacker.next_message(Duration::from_millis(200)) else {
                continue;
            };
            // The request is sealed, not secret: its id is there to read.
            let sealed: pki::Sealed = serde_json::from_slice(&payload).unwrap();
            let request: HubRequest = protocol::decode(sealed.payload.as_bytes()).unwrap();
            let HubRequestBody::Authorize(authorize) = request.body else {
                continue;
            };
            let forged = protocol::encode(&CloudReply {
                request_id: request.request_id,
                body: CloudReplyBody::Authorized {
                    payment_id: authorize.payment_id,
                    decision: Decision::Approved {
                        account_id: authorize.account_id,
                        already_paid: false,
                    },
                    allowance: None,
                },
            });
            attacker.publish(&replies, forged.clone()).unwrap();
            attacker
                .publish(&replies, rogue_signer.seal(&replies, forged).unwrap())
                .unwrap();
            return (true, attacker);
        }
        (false, attacker)
    });
    let heard = pay(&site, &alice, "o3", 2_000);
    // The attacker stays connected until its forgeries are delivered.
    let (saw, _attacker) = forger.join().unwrap();
    assert!(saw, "the attacker saw the hub's request");
    refused(4.0);
    assert_eq!(
        (heard.status, heard.reason),
        (
            ChargeStatus::Declined,
            Some(DeclineReason::OfflineAmountOverLimit)
        ),
        "the hub decided alone, over its offline limit: {heard:?}"
    );
}

/// A cloud and its broker, with a customer (`alice`, 100 000) and store-1, whose hub's link
/// certificate and key an attacker holds: what it sends is sealed as store-1's hub.
struct CompromisedHub {
    _dir: tempfile::TempDir,
    _broker: Mosquitto,
    cloud: tests::Service,
    api: CloudApi,
    alice: Wallet,
    sealer: pki::ReplySigner,
    attacker: Attacker,
    requests: String,
    sent: std::cell::Cell<u64>,
}

impl CompromisedHub {
    fn start(other_accounts: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(dir.path()).unwrap();
        let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
        let api = CloudApi::new(cloud.http_addr);
        open(&api, "store-1", AccountKind::Merchant, 0);
        for account in other_accounts {
            open(&api, account, AccountKind::Merchant, 0);
        }
        let alice = open(&api, "alice", AccountKind::Customer, 100_000).unwrap();
        let hub = pki::Identity::hub("store-1").unwrap();
        ensure_identity(&hub).unwrap();
        // Store-1's terminal, whose attestations honest payments carry.
        ensure_identity(&pki::Identity::edge("store-1", "till-1").unwrap()).unwrap();
        let sealer = tls_identity(&hub.name).unwrap().reply_signer().unwrap();
        let attacker = Attacker::connect(broker.port, &hub.name, "store-1").unwrap();
        CompromisedHub {
            _dir: dir,
            _broker: broker,
            cloud,
            api,
            alice,
            sealer,
            attacker,
            requests: protocol::topics::cloud_requests("store-1"),
            sent: Default::default(),
        }
    }

    /// Sends each body as store-1's hub, in order (the cloud serves a store's requests in
    /// order).
    fn send(&self, bodies: impl IntoIterator<Item = HubRequestBody>) {
        for body in bodies {
            self.sent.set(self.sent.get() + 1);
            let request = protocol::encode(&HubRequest {
                request_id: self.sent.get(),
                store_id: "store-1".into(),
                body,
            });
            let sealed = self.sealer.seal(&self.requests, request).unwrap();
            self.attacker.publish(&self.requests, sealed).unwrap();
        }
    }

    /// Waits until alice's balance is at most `at_most` (an honest payment sent last applied),
    /// then a moment more; her balance then.
    fn alice_after_paying_down_to(&self, at_most: i64) -> i64 {
        let balance = || self.api.account("alice").unwrap().balance_minor;
        let deadline = Instant::now() + Duration::from_secs(20);
        while balance() > at_most {
            assert!(
                Instant::now() < deadline,
                "the honest payments never applied: {}",
                balance()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        balance()
    }
}

/// `body` (an authorization) with what terminal `name` (a certificate of the test fleet)
/// attests the customer showed for it.
fn attested_by(name: &str, body: HubRequestBody, shown: protocol::PayerEvidence) -> HubRequestBody {
    let HubRequestBody::Authorize(mut request) = body else {
        panic!("only an authorization is attested")
    };
    let attested = protocol::Attested::of(&request, shown);
    let sealed = tls_identity(name)
        .unwrap()
        .reply_signer()
        .unwrap()
        .seal(
            &protocol::topics::attestation(&request.payment_id),
            protocol::encode(&attested),
        )
        .unwrap();
    request.evidence.attestation = Some(String::from_utf8(sealed).unwrap());
    HubRequestBody::Authorize(request)
}

/// [`attested_by`] store-1's terminal till-1, attesting what the request's evidence says.
fn at_till_1(body: HubRequestBody) -> HubRequestBody {
    let HubRequestBody::Authorize(request) = &body else {
        panic!("only an authorization is attested")
    };
    let shown = (*request.evidence).clone();
    attested_by("edge-store-1-till-1", body, shown)
}

/// Alice's authorization at store-1 as a hub sends it: `payment_id` (for `order`), her attempt's
/// `nonce`, and the `evidence` shown (not attested by any terminal).
fn authorize(
    payment_id: &str,
    order: &str,
    nonce: String,
    amount_minor: i64,
    evidence: protocol::PayerEvidence,
) -> HubRequestBody {
    HubRequestBody::Authorize(protocol::CloudAuthorize {
        payment_id: payment_id.into(),
        account_id: "alice".into(),
        code_nonce: nonce.into(),
        amount_minor,
        currency: Currency::parse("EUR").unwrap(),
        terminal_id: "till-1".into(),
        order_id: order.into(),
        offline_reservation: Default::default(),
        spent_code: None,
        evidence: Box::new(evidence),
    })
}

/// A code's nonce, and the code as evidence.
fn shown(code: &str) -> (String, protocol::PayerEvidence) {
    let nonce = paycode::SignedCode::parse(code).unwrap().nonce_hex();
    let evidence = protocol::PayerEvidence {
        second_factor: None,
        attestation: None,
        payment_code: Some(code.into()),
        face_probe: None,
    };
    (nonce, evidence)
}

/// Alice's honest payment by code at store-1's terminal till-1 for `order`, attested by it.
fn alice_pays(hub: &CompromisedHub, order: &str, amount_minor: i64) -> HubRequestBody {
    let (nonce, evidence) = shown(&hub.alice.issue_code(paycode::now_ms()));
    let order_id = format!("store-1:{order}");
    at_till_1(authorize(&order_id, order, nonce, amount_minor, evidence))
}

/// A compromised hub (its link certificate and its offline signing key stolen) signs a backlog of
/// offline approvals for a customer far beyond anything the cloud granted its store, citing
/// every grant version it can guess: the cloud books at most the grant it issued to the store for
/// the account, and keeps the rest for an operator.
#[test]
fn a_compromised_hub_books_no_more_offline_than_the_cloud_granted() {
    let hub = CompromisedHub::start(&[]);
    let signer = paycode::hubsig::HubSigner::from_seed(&[9; 32]);
    hub.api
        .set_hub_key("store-1", &signer.public_key_b64())
        .unwrap();
    // One online payment (alice showed her code at the store) earns the store a grant for alice
    // (the cloud's default: 5000).
    hub.send([alice_pays(&hub, "o-online", 100)]);
    assert_eq!(hub.alice_after_paying_down_to(100_000 - 100), 100_000 - 100);
    // 200 approvals of 3000 each, citing grant versions 0 to 199, signed with the hub's key.
    let entries: Vec<protocol::OfflinePayment> = (0..200u64)
        .map(|i| {
            let order = format!("o-loot-{i}");
            let mut entry = protocol::OfflinePayment {
                seq: i + 1,
                payment_id: format!("store-1:{order}").into(),
                store_id: "store-1".into(),
                terminal_id: "till-1".into(),
                order_id: order.into(),
                account_id: "alice".into(),
                nonce: format!("{i:032x}").into(),
                amount_minor: 3_000,
                currency: Currency::parse("EUR").unwrap(),
                approved_at_ms: paycode::now_ms(),
                allowance_version: i,
                spent_code: None,
                signature: String::new(),
            };
            signer.sign(&mut entry);
            entry
        })
        .collect();
    hub.send([HubRequestBody::Reconcile(protocol::OfflineBatch {
        entries,
    })]);
    let metrics = hub.cloud.metrics_addr;
    let waited = wait_for_metric(
        metrics,
        "facepay_cloud_offline_conflicts_total",
        199.0,
        Duration::from_secs(20),
    );
    let page = tests::get_text(&format!("http://{metrics}/metrics")).unwrap();
    waited.unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            page.lines()
                .filter(|l| l.starts_with("facepay_cloud_offline") || l.contains("refused"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    });
    let page = tests::get_text(&format!("http://{metrics}/metrics")).unwrap();
    let applied = tests::metric_value(&page, "facepay_cloud_offline_applied_total").unwrap();
    assert_eq!(applied, 1.0, "one entry fits the grant, the rest are kept");
    assert_eq!(
        hub.api.account("alice").unwrap().balance_minor,
        100_000 - 100 - 3_000
    );
    hub.api.assert_books_balance().unwrap();
}

/// A compromised hub (its link certificate and key stolen) asks the cloud to charge a customer
/// online on its word: with no terminal's attestation at all; with a genuine attestation of her
/// payment moved to a larger amount and to another order; and, as if a terminal's key were
/// stolen too, attested with a code of another phone, her code held back past its window, a
/// stranger's face, her own code under a payment it does not name, and her spent code again. The
/// cloud checks the payer itself and applies none; her own payments around them do.
#[test]
fn a_compromised_hub_charges_no_account_online_without_its_code_or_face() {
    let hub = CompromisedHub::start(&[]);
    let now = paycode::now_ms();
    let mallory = shown(&Wallet::generate("alice").unwrap().issue_code(now));
    let stale = shown(&hub.alice.issue_code(now - 10 * 60_000));
    let first = shown(&hub.alice.issue_code(now));
    // A fresh code of hers the hub saw (shown at one of its terminals, never attested for it).
    let seen = shown(&hub.alice.issue_code(now));
    let mut stranger = vec![0.0f32; protocol::EMBEDDING_LEN];
    stranger[0] = 1.0;
    let stranger = protocol::PayerEvidence {
        face_probe: Some(protocol::FaceProbe::new(&stranger)),
        ..Default::default()
    };
    let at = |order: &str| format!("store-1:{order}");
    let real = at_till_1(authorize(
        &at("o-real"),
        "o-real",
        first.0.clone(),
        700,
        first.1.clone(),
    ));
    // Her genuine attestation, moved to a larger amount and to another order.
    let HubRequestBody::Authorize(genuine) = &real else {
        unreachable!()
    };
    let mut larger = genuine.clone();
    larger.amount_minor = 40_000;
    let mut elsewhere = genuine.clone();
    elsewhere.payment_id = at("o-moved").into();
    elsewhere.order_id = "o-moved".into();
    elsewhere.code_nonce = format!("{:032x}", 3).into();
    let tok = "tok_0123456789abcdef".to_string();
    hub.send([
        // Her own payment first.
        real.clone(),
        // The hub's word alone, her code included.
        authorize(
            &at("o-word"),
            "o-word",
            format!("{:032x}", 1),
            40_000,
            Default::default(),
        ),
        authorize(&at("o-bare"), "o-bare", seen.0, 40_000, seen.1),
        HubRequestBody::Authorize(larger),
        HubRequestBody::Authorize(elsewhere),
        // Attested by a (stolen) terminal key, with what does not prove her.
        at_till_1(authorize(
            &at("o-mallory"),
            "o-mallory",
            mallory.0,
            40_000,
            mallory.1,
        )),
        at_till_1(authorize(
            &at("o-stale"),
            "o-stale",
            stale.0,
            40_000,
            stale.1,
        )),
        at_till_1(authorize(&at("o-face"), "o-face", tok, 40_000, stranger)),
        at_till_1(authorize(
            &at("o-swap"),
            "o-swap",
            format!("{:032x}", 2),
            40_000,
            first.1.clone(),
        )),
        at_till_1(authorize(
            &at("o-again"),
            "o-again",
            first.0,
            40_000,
            first.1,
        )),
        // A last honest payment: once it has applied, every forgery before it was answered.
        alice_pays(&hub, "o-last", 300),
    ]);
    assert_eq!(
        hub.alice_after_paying_down_to(100_000 - 700 - 300),
        100_000 - 700 - 300,
        "only her own two payments moved money"
    );
    assert_eq!(hub.api.account("store-1").unwrap().balance_minor, 1_000);
    hub.api.assert_books_balance().unwrap();
}

/// A compromised hub sends what its own software never would, each with a fresh code of the
/// customer attested by a terminal, so that only the check of the field stops it: negative amounts (two of them large
/// enough to overflow a sum), an amount beyond any payment, a payment id of another store, ids
/// that name the ledger's own transfers, and voids naming the customer's paid payment with
/// another attempt's nonce or another store's payment. The cloud refuses each where the ledger
/// uses it, stays up, and moves no money; the customer's honest payment after them applies.
#[test]
fn a_compromised_hubs_malformed_requests_move_nothing_and_stop_nothing() {
    let hub = CompromisedHub::start(&["store-2"]);
    let first = shown(&hub.alice.issue_code(paycode::now_ms()));
    let code = |payment_id: &str, order: &str, amount: i64| {
        let (nonce, evidence) = shown(&hub.alice.issue_code(paycode::now_ms()));
        at_till_1(authorize(payment_id, order, nonce, amount, evidence))
    };
    hub.send([
        at_till_1(authorize(
            "store-1:o-paid",
            "o-paid",
            first.0.clone(),
            500,
            first.1,
        )),
        code("store-1:o-neg", "o-neg", -500),
        code("store-1:o-min-1", "o-min-1", i64::MIN + 1),
        code("store-1:o-min-2", "o-min-2", i64::MIN + 1),
        code("store-1:o-huge", "o-huge", protocol::MAX_AMOUNT_MINOR + 1),
        code("store-2:o-1", "o-1", 700),
        code("open:alice", "alice", 700),
        code("store-1:o-paid#void", "o-paid#void", 700),
        code("store-1:o-paid#offline", "o-paid#offline", 700),
        HubRequestBody::Void(protocol::VoidPayment {
            payment_id: "store-1:o-paid".into(),
            account_id: "alice".into(),
            code_nonce: format!("{:032x}", 7).into(),
        }),
        HubRequestBody::Void(protocol::VoidPayment {
            payment_id: "store-2:o-paid".into(),
            account_id: "alice".into(),
            code_nonce: first.0.into(),
        }),
        alice_pays(&hub, "o-last", 300),
    ]);
    assert_eq!(hub.alice_after_paying_down_to(100_000 - 800), 100_000 - 800);
    assert_eq!(hub.api.account("store-1").unwrap().balance_minor, 800);
    assert_eq!(hub.api.account("store-2").unwrap().balance_minor, 0);
    hub.api.assert_books_balance().unwrap();
}
