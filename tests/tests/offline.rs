//! Offline authorization and reconciliation with real processes: Mosquitto, the cloud, hubs
//! behind fault proxies, terminals. A partitioned hub approves within its bounds, journals and
//! signs, survives kill -9, and its journal drains exactly once when the link heals; an offline
//! payment the balance no longer covers puts the account in debt and blocks it everywhere.

use std::time::{Duration, Instant};

use paycode::Wallet;
use protocol::{AccountKind, ChargeStatus, Currency, DeclineReason};
use tests::{charge, present_code, start_cloud, store::StoreSite, CloudApi, Mosquitto};

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

use tests::open_account as open;

fn pay(site: &StoreSite, wallet: &Wallet, order: &str, amount: i64) -> protocol::ChargeResult {
    let (edge, frames) = &site.edges[0];
    present_code(frames, wallet).unwrap();
    charge(edge.http_addr, order, amount, "EUR").unwrap().1
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cuts a store's hub from the broker (and so the cloud) and waits until the hub knows.
fn cut_off(site: &StoreSite) {
    site.uplink.cut();
    site.wait_connected(false, Duration::from_secs(20)).unwrap();
}

/// Heals a store's uplink and waits until its hub is connected again.
fn reconnect(site: &StoreSite) {
    site.uplink.heal();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
}

/// Waits until a store's hub has reconciled everything it approved offline.
fn wait_drained(site: &StoreSite) {
    tests::wait_for_metric(
        site.hub_http(),
        "facepay_hub_offline_backlog",
        0.0,
        Duration::from_secs(30),
    )
    .unwrap();
}

/// Pays once the terminal reaches the (restarted) hub: retried while the terminal says the
/// store system is unreachable and the hub is still running.
fn pay_once_reachable(
    site: &mut StoreSite,
    wallet: &Wallet,
    order: &str,
    amount: i64,
) -> protocol::ChargeResult {
    let (edge, frames) = (site.edges[0].0.http_addr, site.edges[0].1.clone());
    tests::charge_until_reachable(
        edge,
        || {
            present_code(&frames, wallet).unwrap();
        },
        order,
        amount,
        || site.hub.exited().is_some(),
    )
}

fn wait_keys(site: &StoreSite, count: usize) {
    tests::wait_for_keys(site.hub_http(), count, Duration::from_secs(20)).unwrap();
}

#[test]
fn a_partitioned_hub_approves_within_its_bounds_and_reconciles_once_when_healed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open(&api, "store-1", AccountKind::Merchant, 0);
    let alice = open(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let bob = open(&api, "bob", AccountKind::Customer, 10_000).unwrap();
    let mut site = StoreSite::start(
        dir.path(),
        "store-1",
        broker.port,
        1,
        &[
            "offline.payment_ceiling_minor=1500".into(),
            "offline.store_ceiling_minor=4000".into(),
        ],
    )
    .unwrap();
    api.set_hub_key("store-1", &site.hub_key()).unwrap();
    wait_keys(&site, 2);

    // Online, alice earns an allowance at this store (the cloud's default: 5000); bob has none.
    let online = pay(&site, &alice, "on-1", 100);
    assert_eq!(
        (online.status, online.offline),
        (ChargeStatus::Approved, false),
        "{online:?}"
    );
    assert_eq!(
        site.hub_metric("facepay_hub_authorization_mode{mode=\"offline\"}"),
        Some(0.0)
    );

    cut_off(&site);
    assert_eq!(
        site.hub_metric("facepay_hub_authorization_mode{mode=\"offline\"}"),
        Some(1.0)
    );
    let started = Instant::now();
    let first = pay(&site, &alice, "off-1", 1_000);
    assert_eq!(
        (first.status, first.offline),
        (ChargeStatus::Approved, true),
        "{first:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no cloud deadline is waited out"
    );
    let cases = [
        (
            &alice,
            "off-big",
            1_600,
            DeclineReason::OfflineAmountOverLimit,
        ),
        (
            &bob,
            "off-bob",
            100,
            DeclineReason::OfflineAllowanceExceeded,
        ),
    ];
    for (wallet, order, amount, reason) in cases {
        let refused = pay(&site, wallet, order, amount);
        assert_eq!(refused.reason, Some(reason), "{refused:?}");
        assert!(
            refused.detail.contains("nothing was charged"),
            "{refused:?}"
        );
    }
    for order in ["off-2", "off-3"] {
        let ok = pay(&site, &alice, order, 1_500);
        assert_eq!(ok.status, ChargeStatus::Approved, "{ok:?}");
    }
    // 4000 held: the store's ceiling refuses 1000 more (alice's allowance would allow it).
    let full = pay(&site, &alice, "off-4", 1_000);
    assert_eq!(
        full.reason,
        Some(DeclineReason::OfflineStoreLimitReached),
        "{full:?}"
    );
    // The register retries an approved order with a fresh code: already paid, not twice.
    let retry = pay(&site, &alice, "off-1", 1_000);
    assert_eq!(
        (retry.status, retry.already_paid),
        (ChargeStatus::Approved, true),
        "{retry:?}"
    );
    assert_eq!(site.hub_metric("facepay_hub_offline_backlog"), Some(3.0));
    assert_eq!(
        site.hub_metric("facepay_hub_offline_exposure_minor_units{currency=\"EUR\"}"),
        Some(4_000.0)
    );
    assert_eq!(
        site.hub_metric("facepay_hub_offline_exposure_minor_units{currency=\"USD\"}"),
        Some(0.0)
    );
    // The oldest unreconciled approval: this test's first offline payment, a moment ago.
    let oldest = site
        .hub_metric("facepay_hub_offline_oldest_unreconciled_timestamp_seconds")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(oldest > now - 600.0 && oldest <= now, "{oldest} vs {now}");
    assert_eq!(
        api.balance("alice").unwrap(),
        9_900,
        "nothing reached the cloud"
    );

    // kill -9 in the middle of the partition: the journal keeps what was approved.
    site.restart_hub().unwrap();
    assert_eq!(site.hub_metric("facepay_hub_offline_backlog"), Some(3.0));
    // Rebuilt from the journal: the same exposure, the same oldest approval.
    assert_eq!(
        site.hub_metric("facepay_hub_offline_exposure_minor_units{currency=\"EUR\"}"),
        Some(4_000.0)
    );
    assert_eq!(
        site.hub_metric("facepay_hub_offline_oldest_unreconciled_timestamp_seconds"),
        Some(oldest)
    );
    // The terminal reconnects to the restarted hub (until then: "store system unreachable").
    let mut still_full = pay(&site, &alice, "off-5", 1_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while still_full.reason == Some(DeclineReason::StoreSystemUnreachable)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
        still_full = pay(&site, &alice, "off-5", 1_000);
    }
    assert_eq!(
        still_full.reason,
        Some(DeclineReason::OfflineStoreLimitReached),
        "{still_full:?}"
    );

    reconnect(&site);
    wait_drained(&site);
    // Reconciled: nothing held, no oldest.
    assert_eq!(
        site.hub_metric("facepay_hub_offline_exposure_minor_units{currency=\"EUR\"}"),
        Some(0.0)
    );
    assert_eq!(
        site.hub_metric("facepay_hub_offline_oldest_unreconciled_timestamp_seconds"),
        Some(0.0)
    );
    assert_eq!(api.balance("alice").unwrap(), 10_000 - 100 - 4_000);
    assert_eq!(api.balance("bob").unwrap(), 10_000);
    assert_eq!(api.balance("store-1").unwrap(), 4_100);
    let transfers = api.transfers().unwrap();
    for order in ["off-1", "off-2", "off-3"] {
        let id = format!("store-1:{order}");
        assert_eq!(
            transfers.iter().filter(|t| t.transfer_id == id).count(),
            1,
            "{id} applied once"
        );
    }
    for order in ["off-big", "off-bob", "off-4", "off-5"] {
        let id = format!("store-1:{order}");
        assert!(
            transfers.iter().all(|t| t.transfer_id != id),
            "{id} declined"
        );
    }
    let cloud_page = tests::get_text(&format!("http://{}/metrics", cloud.metrics_addr)).unwrap();
    assert_eq!(
        tests::metric_value(&cloud_page, "facepay_cloud_offline_applied_total"),
        Some(3.0)
    );
    api.assert_books_balance().unwrap();
    // Online again: payments go to the cloud.
    let back = pay(&site, &alice, "on-2", 100);
    assert_eq!(back.status, ChargeStatus::Approved, "{back:?}");
    assert_eq!(
        site.hub_metric("facepay_hub_authorization_mode{mode=\"offline\"}"),
        Some(0.0)
    );
}

#[test]
fn an_offline_payment_the_balance_cannot_cover_puts_the_account_in_debt_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open(&api, "store-1", AccountKind::Merchant, 0);
    open(&api, "store-2", AccountKind::Merchant, 0);
    let alice = open(&api, "alice", AccountKind::Customer, 3_000).unwrap();
    let one = StoreSite::start(dir.path(), "store-1", broker.port, 1, &[]).unwrap();
    let two = StoreSite::start(dir.path(), "store-2", broker.port, 1, &[]).unwrap();
    for site in [&one, &two] {
        api.set_hub_key(&site.store_id, &site.hub_key()).unwrap();
        wait_keys(site, 1);
        let ok = pay(site, &alice, "first", 100);
        assert_eq!(ok.status, ChargeStatus::Approved, "{ok:?}");
    }

    // Store 1 is cut off and approves 1400 offline; meanwhile alice spends online at store 2,
    // showing the same code there.
    cut_off(&one);
    let code = present_code(&one.edges[0].1, &alice).unwrap();
    let offline = charge(one.edges[0].0.http_addr, "offline", 1_400, "EUR")
        .unwrap()
        .1;
    assert_eq!(offline.status, ChargeStatus::Approved, "{offline:?}");
    tests::present_qr(&two.edges[0].1, &code).unwrap();
    let online = charge(two.edges[0].0.http_addr, "online", 2_700, "EUR")
        .unwrap()
        .1;
    assert_eq!(online.status, ChargeStatus::Approved, "{online:?}");
    assert!(api.code_reuses().unwrap().is_empty());
    assert_eq!(api.balance("alice").unwrap(), 100);

    // Healed: the store was promised the money, so it is applied, and alice is in debt.
    one.uplink.heal();
    wait_drained(&one);
    assert_eq!(api.balance("alice").unwrap(), -1_300);
    let alice_view = api.account("alice").unwrap();
    assert!(alice_view.in_debt);
    let debts = api.debts().unwrap();
    assert_eq!(debts.len(), 1);
    assert_eq!(debts[0].account_id, "alice");
    // The code paid twice: both stores were promised the money; the operator hears of it.
    let reuses = api.code_reuses().unwrap();
    assert_eq!(reuses.len(), 1, "{reuses:?}");
    assert_eq!(reuses[0]["entry"]["payment_id"], "store-1:offline");
    assert_eq!(reuses[0]["first_payment_id"], "store-2:online");
    tests::wait_for_metric(
        cloud.metrics_addr,
        "facepay_cloud_offline_code_reuse_total",
        1.0,
        Duration::from_secs(5),
    )
    .unwrap();
    tests::wait_for_metric(
        cloud.metrics_addr,
        "facepay_cloud_accounts_in_debt",
        1.0,
        Duration::from_secs(5),
    )
    .unwrap();
    api.assert_books_balance().unwrap();

    // Store 2 heard the revocation: cut off now, it refuses alice offline.
    cut_off(&two);
    let blocked = pay(&two, &alice, "blocked", 100);
    assert_eq!(
        blocked.reason,
        Some(DeclineReason::AccountBlocked),
        "{blocked:?}"
    );
    reconnect(&two);

    // A deposit settles the debt; the same deposit id again moves nothing.
    let (status, settled) = api.deposit("alice", "top-up-1", 2_000).unwrap();
    assert_eq!(status, 200, "{settled}");
    assert_eq!(settled["in_debt"], false);
    let (_, again) = api.deposit("alice", "top-up-1", 2_000).unwrap();
    assert_eq!(again["balance_minor"], 700);
    let (status, bad) = api.deposit("alice", "top-up-2", -5).unwrap();
    assert_eq!(status, 400, "{bad}");
    assert!(api.debts().unwrap().is_empty());
    tests::wait_for_metric(
        cloud.metrics_addr,
        "facepay_cloud_accounts_in_debt",
        0.0,
        Duration::from_secs(5),
    )
    .unwrap();
    wait_until(
        "store 2 answers online again",
        Duration::from_secs(20),
        || {
            pay(&two, &alice, &format!("after-{}", fastrand_order()), 100).status
                == ChargeStatus::Approved
        },
    );
    api.assert_books_balance().unwrap();
}

#[test]
fn a_grant_that_shrinks_under_unreconciled_payments_keeps_them_counted_against_the_cap() {
    // Cap 6000 over all stores, 5000 at one store.
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = tests::start_cloud_with(
        &dir.path().join("cloud"),
        broker.port,
        &["offline.account_cap_minor=6000".into()],
    )
    .unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open(&api, "store-1", AccountKind::Merchant, 0);
    open(&api, "store-2", AccountKind::Merchant, 0);
    let alice = open(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let one = StoreSite::start(dir.path(), "store-1", broker.port, 1, &[]).unwrap();
    let two = StoreSite::start(dir.path(), "store-2", broker.port, 1, &[]).unwrap();
    // Store 1's hub key is not registered yet: what it approves offline stays unreconciled.
    api.set_hub_key("store-2", &two.hub_key()).unwrap();
    wait_keys(&one, 1);
    wait_keys(&two, 1);
    let approved = |site: &StoreSite, order: &str, amount: i64, offline: bool| {
        let r = pay(site, &alice, order, amount);
        assert_eq!(
            (r.status, r.offline),
            (ChargeStatus::Approved, offline),
            "{order}: {r:?}"
        );
    };

    // Store 1 earns 5000 and spends it offline.
    approved(&one, "on-1", 100, false);
    cut_off(&one);
    approved(&one, "off-1", 2_500, true);
    approved(&one, "off-2", 2_500, true);
    reconnect(&one);
    assert_eq!(one.hub_metric("facepay_hub_offline_backlog"), Some(2.0));

    // Store 2 gets what is left of the cap (1000). Alice spends at store 1 online: its grant
    // shrinks to her balance (800), but it still holds 5000 unreconciled.
    approved(&two, "on-1", 100, false);
    approved(&one, "on-2", 9_000, false);
    let (status, body) = api.deposit("alice", "top-up", 10_000).unwrap();
    assert_eq!(status, 200, "{body}");
    // Money is back; store 2's refreshed grant still leaves store 1 its 5000.
    approved(&two, "on-2", 100, false);
    cut_off(&two);
    let refused = pay(&two, &alice, "off-1", 2_000);
    assert_eq!(
        refused.reason,
        Some(DeclineReason::OfflineAllowanceExceeded),
        "{refused:?}"
    );
    approved(&two, "off-2", 1_000, true);

    // Both drain once their links and keys are in place; every approved payment applies once.
    api.set_hub_key("store-1", &one.hub_key()).unwrap();
    two.uplink.heal();
    for site in [&one, &two] {
        wait_drained(site);
    }
    assert_eq!(
        api.balance("alice").unwrap(),
        10_000 - 100 - 5_000 - 100 - 9_000 + 10_000 - 100 - 1_000
    );
    assert_eq!(api.balance("store-1").unwrap(), 100 + 5_000 + 9_000);
    assert_eq!(api.balance("store-2").unwrap(), 100 + 100 + 1_000);
    api.assert_books_balance().unwrap();
}

fn fastrand_order() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Storage errors are fail-stop: a hub that cannot journal the cloud's answer stops instead of
/// answering "declined" (the money moved), and its restart voids the attempt it never recorded,
/// so the money moves back. A hub that cannot reserve a code stops before anything is sent.
#[test]
fn a_hub_that_cannot_journal_stops_and_its_restart_voids_what_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open(&api, "store-1", AccountKind::Merchant, 0);
    let alice = open(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let bob = open(&api, "bob", AccountKind::Customer, 10_000).unwrap();
    let mut site = StoreSite::start(dir.path(), "store-1", broker.port, 1, &[]).unwrap();
    wait_keys(&site, 2);
    let failpoint = |name: &str| vec![("FAILPOINTS".to_owned(), format!("{name}=return"))];

    // The cloud approves o1; the hub's journal write of that answer fails.
    site.restart_hub_with_env(&failpoint("hub-journal-record"))
        .unwrap();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    wait_keys(&site, 2);
    let heard = pay_once_reachable(&mut site, &alice, "o1", 700);
    assert_eq!(
        (heard.status, heard.reason),
        (
            ChargeStatus::Unknown,
            Some(DeclineReason::StoreSystemUnreachable)
        ),
        "the register hears no decline from a hub that cannot record: {heard:?}"
    );
    wait_until("the hub stops", Duration::from_secs(10), || {
        site.hub.exited().is_some()
    });
    let applied = |id: &str| api.transfers().unwrap().iter().any(|t| t.transfer_id == id);
    assert!(applied("store-1:o1"), "the cloud applied the attempt");

    // The restart voids the attempt it never recorded: the money moves back.
    site.restart_hub_with_env(&[]).unwrap();
    wait_until("the attempt is voided", Duration::from_secs(30), || {
        applied("store-1:o1#void")
    });
    let balance = |id: &str| api.account(id).unwrap().balance_minor;
    assert_eq!(balance("alice"), 10_000);
    assert_eq!(balance("store-1"), 0);

    // A hub that cannot reserve the code stops before it sends anything.
    site.restart_hub_with_env(&failpoint("hub-journal-reserve"))
        .unwrap();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    wait_keys(&site, 2);
    let heard = pay_once_reachable(&mut site, &alice, "o2", 300);
    assert_eq!(
        (heard.status, heard.reason),
        (
            ChargeStatus::Unknown,
            Some(DeclineReason::StoreSystemUnreachable)
        ),
        "{heard:?}"
    );
    wait_until("the hub stops", Duration::from_secs(10), || {
        site.hub.exited().is_some()
    });
    assert!(!applied("store-1:o2"));
    site.restart_hub_with_env(&[]).unwrap();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    let heard = pay_once_reachable(&mut site, &alice, "o2", 300);
    assert_eq!(heard.status, ChargeStatus::Approved, "{heard:?}");
    assert_eq!(balance("alice"), 9_700);

    // Found by the chaos suite: a retry of a paid order whose code no longer passes (here the
    // hub's clock is 90 s ahead, so every code looks expired) hears "already paid", never
    // "declined"; a new order with such a code is declined.
    let ahead = [(clock::OFFSET_ENV.to_owned(), "90000".to_owned())];
    site.restart_hub_with_env(&ahead).unwrap();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    let heard = pay_once_reachable(&mut site, &alice, "o2", 300);
    assert_eq!(heard.status, ChargeStatus::Approved, "{heard:?}");
    assert!(heard.already_paid, "{heard:?}");
    let heard = pay_once_reachable(&mut site, &alice, "o3", 300);
    assert_eq!(heard.reason, Some(DeclineReason::CodeExpired), "{heard:?}");
    // Only the account that paid: another customer's (expired) code hears the order was paid
    // with other details, as a valid one would.
    let heard = pay_once_reachable(&mut site, &bob, "o2", 300);
    assert_eq!(heard.status, ChargeStatus::Declined, "{heard:?}");
    assert_eq!(
        heard.reason,
        Some(DeclineReason::DuplicateOrderId),
        "{heard:?}"
    );
    assert_eq!(balance("alice"), 9_700);
    api.assert_books_balance().unwrap();
}

/// Found by the chaos suite: a register that did not hear the answer charges the same order again
/// after its hub lost its disk. The new journal cannot tell whether the code paid that order, so
/// the cloud's ledger answers: "already paid" when it did, the code's refusal when it did not,
/// never a decline for money that moved.
#[test]
fn a_charge_repeated_after_the_hub_lost_its_disk_hears_what_the_ledger_holds() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open(&api, "store-1", AccountKind::Merchant, 0);
    let alice = open(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let mut site = StoreSite::start(dir.path(), "store-1", broker.port, 1, &[]).unwrap();
    wait_keys(&site, 1);
    let code = alice.issue_code(paycode::now_ms());
    // The code shown again until a hub is reachable (an unreachable hub charged nothing).
    let pay_with = |site: &StoreSite, order: &str| {
        let (edge, frames) = &site.edges[0];
        let show = || tests::present_qr(frames, &code).unwrap();
        tests::charge_until_reachable(edge.http_addr, show, order, 700, || false)
    };
    let heard = pay_with(&site, "o1");
    assert_eq!(heard.status, ChargeStatus::Approved, "{heard:?}");
    let posted = |id: &str| {
        api.transfers()
            .unwrap()
            .iter()
            .any(|t| t.transfer_id == id && !t.pending)
    };
    wait_until("the payment is posted", Duration::from_secs(20), || {
        posted("store-1:o1")
    });

    // The hub loses its disk; the register charges o1 again with the same code.
    site.hub.kill();
    std::fs::remove_dir_all(site.hub_data_dir().join("journal")).unwrap();
    site.restart_hub().unwrap();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    wait_keys(&site, 1);
    let heard = pay_with(&site, "o1");
    assert_eq!(
        (heard.status, heard.already_paid),
        (ChargeStatus::Approved, true),
        "{heard:?}"
    );
    // The same code for an order it never paid: refused, and nothing moves.
    let heard = pay_with(&site, "o2");
    assert_eq!(
        (heard.status, heard.reason),
        (ChargeStatus::Declined, Some(DeclineReason::CodeExpired)),
        "{heard:?}"
    );
    assert_eq!(api.account("alice").unwrap().balance_minor, 9_300);
    api.assert_books_balance().unwrap();
}

/// An operator lists the conflicts a stopped hub holds and resolves one with `facepay-hub
/// conflicts`; a running hub's journal is refused with a clear error, and resolving one that is
/// not held fails.
#[test]
fn an_operator_lists_and_resolves_the_conflicts_a_hub_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("hub");
    {
        let journal = hub::journal::Journal::open(&data_dir.join("journal")).unwrap();
        for (seq, order) in [(1u64, "o-1"), (2, "o-2")] {
            let entry = protocol::OfflinePayment {
                seq,
                payment_id: format!("store-1:{order}").into(),
                store_id: "store-1".into(),
                terminal_id: "till-1".into(),
                order_id: order.into(),
                account_id: "alice".into(),
                nonce: format!("n-{seq}").into(),
                amount_minor: 700,
                currency: eur(),
                approved_at_ms: 1,
                allowance_version: 0,
                spent_code: None,
                signature: "sig".into(),
            };
            journal.record_offline(&entry).unwrap();
            assert!(journal
                .keep_conflict(seq, "the order was paid online with another amount")
                .unwrap()
                .is_some());
        }
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(tests::binary_path("facepay-hub"))
            .arg("--set")
            .arg(format!("data_dir={data_dir:?}"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, listed, _) = run(&["conflicts"]);
    assert_eq!(code, Some(0));
    let held: Vec<hub::journal::HeldConflict> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(held.len(), 2, "{listed}");
    assert_eq!(held[0].entry.payment_id, "store-1:o-1");
    assert!(held[0].detail.contains("another amount"));

    let (code, out, _) = run(&["conflicts", "--resolve", "1"]);
    assert_eq!((code, out.trim()), (Some(0), "resolved 1"));
    let (code, _, err) = run(&["conflicts", "--resolve", "1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no conflict 1 is held"), "{err}");
    let (_, listed, _) = run(&["conflicts"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains("store-1:o-2"));

    // While something holds the journal (a running hub), the command refuses, naming why.
    let _held = hub::journal::Journal::open(&data_dir.join("journal")).unwrap();
    let (code, _, err) = run(&["conflicts"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("is the hub still running"), "{err}");
}
