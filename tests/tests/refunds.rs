//! Refunds and the store's statement with real processes: Mosquitto, the cloud, a hub behind a
//! fault proxy, a terminal. A refund is made once per refund id, never for more than was paid,
//! only online, and not for an offline payment before it is reconciled; the day's statement adds
//! up to the ledger's transfers.

use std::time::{Duration, Instant};

use paycode::Wallet;
use protocol::{
    AccountKind, ChargeStatus, DeclineReason, RefundResult, RefundStatus, Settlement,
    SettlementKind,
};
use tests::{charge, present_code, start_cloud, store::StoreSite, CloudApi, Mosquitto};

fn pay(site: &StoreSite, wallet: &Wallet, order: &str, amount: i64) -> protocol::ChargeResult {
    let (edge, frames) = &site.edges[0];
    present_code(frames, wallet).unwrap();
    charge(edge.http_addr, order, amount, "EUR").unwrap().1
}

fn refund(site: &StoreSite, refund_id: &str, order: &str, amount: i64) -> (u16, RefundResult) {
    tests::refund(site.edges[0].0.http_addr, refund_id, order, amount, "EUR").unwrap()
}

/// Refunds, asked again with the same refund id (for up to 20 s) while `again` says of the
/// answer.
fn refund_until(
    site: &StoreSite,
    (refund_id, order, amount): (&str, &str, i64),
    again: impl Fn(&RefundResult) -> bool,
) -> (u16, RefundResult) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = refund(site, refund_id, order, amount);
        if !again(&answer.1) || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Refunds once the payment is final (the hub's confirmation reaches the cloud a moment after
/// the approval): asked again while the answer is `payment_not_settled`.
fn refund_when_final(
    site: &StoreSite,
    refund_id: &str,
    order: &str,
    amount: i64,
) -> (u16, RefundResult) {
    refund_until(site, (refund_id, order, amount), |r| {
        r.reason == Some(DeclineReason::PaymentNotSettled)
    })
}

/// Refunds once the terminal reaches its (restarted) hub.
fn refund_once_reachable(
    site: &StoreSite,
    refund_id: &str,
    order: &str,
    amount: i64,
) -> (u16, RefundResult) {
    refund_until(site, (refund_id, order, amount), |r| {
        r.reason == Some(DeclineReason::StoreSystemUnreachable)
    })
}

/// Mosquitto, the cloud, store-1 (its hub key registered) with one terminal, and alice with
/// 10,000 minor units.
struct Store {
    _dir: tempfile::TempDir,
    _broker: Mosquitto,
    cloud: tests::Service,
    api: CloudApi,
    alice: Wallet,
    site: StoreSite,
}

fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    tests::open_account(&api, "store-1", AccountKind::Merchant, 0);
    let alice = tests::open_account(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let site = StoreSite::start(dir.path(), "store-1", broker.port, 1, &[]).unwrap();
    api.set_hub_key("store-1", &site.hub_key()).unwrap();
    tests::wait_for_keys(site.hub_http(), 1, Duration::from_secs(20)).unwrap();
    Store {
        _dir: dir,
        _broker: broker,
        cloud,
        api,
        alice,
        site,
    }
}

#[test]
fn refunds_are_made_once_online_within_what_was_paid_and_the_day_settles_to_the_ledger() {
    let Store {
        _dir,
        _broker,
        cloud,
        api,
        alice,
        mut site,
    } = store();

    let paid = pay(&site, &alice, "o-1", 1_000);
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");
    let (status, first) = refund_when_final(&site, "r-1", "o-1", 400);
    assert_eq!(
        (status, first.status),
        (200, RefundStatus::Refunded),
        "{first:?}"
    );
    assert_eq!(
        (
            first.refunded_total_minor,
            first.paid_minor,
            first.account_id.as_deref()
        ),
        (Some(400), Some(1_000), Some("alice"))
    );
    assert_eq!(api.balance("alice").unwrap(), 9_400);
    assert_eq!(api.balance("store-1").unwrap(), 600);
    // The register sends it again (its answer was lost): nothing moves twice.
    let (_, again) = refund(&site, "r-1", "o-1", 400);
    assert_eq!(
        (again.status, again.already_refunded),
        (RefundStatus::Refunded, true),
        "{again:?}"
    );
    assert_eq!(api.balance("alice").unwrap(), 9_400);
    // Bad input: a clear answer, nothing moved.
    let cases: [(&str, &str, i64, u16, DeclineReason); 5] = [
        ("r-1", "o-1", 500, 200, DeclineReason::DuplicateRefundId),
        ("r-2", "o-1", 601, 200, DeclineReason::RefundExceedsPayment),
        (
            "r-3",
            "nobody-paid",
            100,
            200,
            DeclineReason::PaymentNotFound,
        ),
        ("bad/id", "o-1", 100, 400, DeclineReason::InvalidRequest),
        ("r-4", "o-1", 0, 400, DeclineReason::InvalidAmount),
    ];
    for (refund_id, order, amount, http, reason) in cases {
        let (status, refused) = refund(&site, refund_id, order, amount);
        assert_eq!(
            (status, refused.status, refused.reason),
            (http, RefundStatus::Declined, Some(reason)),
            "{refund_id} {order} {amount}: {refused:?}"
        );
    }
    let edge = site.edges[0].0.http_addr;
    let (status, body) = tests::post_raw(
        &format!("http://{edge}/v1/refund"),
        r#"{"refund_id":"r-5","order_id":"o-1","amount_minor":100,"currency":"XXQ"}"#,
    )
    .unwrap();
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("unknown_currency"))
    );
    let (status, body) = tests::post_raw(
        &format!("http://{edge}/v1/refund"),
        r#"{"refund_id":"r-5","order_id":"o-1"}"#,
    )
    .unwrap();
    assert_eq!(
        (status, body["reason"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(api.balance("alice").unwrap(), 9_400);

    // Cut from the cloud: the store keeps selling offline, but refunds need the cloud.
    site.uplink.cut();
    site.wait_connected(false, Duration::from_secs(20)).unwrap();
    let offline = pay(&site, &alice, "off-1", 300);
    assert_eq!(
        (offline.status, offline.offline),
        (ChargeStatus::Approved, true)
    );
    let (_, cut) = refund(&site, "r-6", "o-1", 100);
    assert_eq!(
        (cut.status, cut.reason),
        (
            RefundStatus::Declined,
            Some(DeclineReason::CloudUnreachable)
        ),
        "{cut:?}"
    );
    assert!(cut.detail.contains("nothing was refunded"), "{cut:?}");

    // Reachable again, with the backlog held back: the offline payment is not reconciled yet.
    site.restart_hub_with_env(&[("FAILPOINTS".into(), "hub-reconcile-hold=return".into())])
        .unwrap();
    site.uplink.heal();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    let (status, waits) = refund_once_reachable(&site, "r-7", "off-1", 100);
    assert_eq!(
        (status, waits.status, waits.reason),
        (
            409,
            RefundStatus::Declined,
            Some(DeclineReason::PaymentNotReconciled)
        ),
        "{waits:?}"
    );
    assert_eq!(site.hub_metric("facepay_hub_offline_backlog"), Some(1.0));
    // Reconciled: the same refund id now goes through.
    site.restart_hub().unwrap();
    tests::wait_for_metric(
        site.hub_http(),
        "facepay_hub_offline_backlog",
        0.0,
        Duration::from_secs(30),
    )
    .unwrap();
    let (_, after) = refund_once_reachable(&site, "r-7", "off-1", 100);
    assert_eq!(after.status, RefundStatus::Refunded, "{after:?}");
    assert_eq!(
        api.balance("alice").unwrap(),
        10_000 - 1_000 + 400 - 300 + 100
    );
    api.assert_books_balance().unwrap();
    // Counted where they were decided and where they were asked for.
    let cloud_page = tests::get_text(&format!("http://{}/metrics", cloud.metrics_addr)).unwrap();
    assert_eq!(
        tests::metric_value(
            &cloud_page,
            "facepay_cloud_refunds_total{outcome=\"refunded\"}"
        ),
        Some(3.0),
        "r-1, its repeat, r-7"
    );
    let edge_page =
        tests::get_text(&format!("http://{}/metrics", site.edges[0].0.metrics_addr)).unwrap();
    assert_eq!(
        tests::metric_value(
            &edge_page,
            "facepay_edge_refund_declines_total{reason=\"payment_not_reconciled\"}"
        ),
        Some(1.0)
    );

    // The day's statement, as JSON and CSV, adds up to the store's transfers.
    let transfers = api.transfers().unwrap();
    let paid_at = transfers
        .iter()
        .find(|t| t.transfer_id == "store-1:o-1")
        .unwrap()
        .applied_at_ms;
    let today = time::OffsetDateTime::from_unix_timestamp((paid_at / 1000) as i64)
        .unwrap()
        .date();
    let date = format!(
        "{:04}-{:02}-{:02}",
        today.year(),
        u8::from(today.month()),
        today.day()
    );
    let (status, body) = api
        .get(&format!("/v1/stores/store-1/settlement?date={date}"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let statement: Settlement = serde_json::from_value(body).unwrap();
    let from_transfers: i64 = transfers
        .iter()
        .filter(|t| (statement.from_ms..statement.to_ms).contains(&t.applied_at_ms))
        .map(|t| {
            if t.credit_account_id == "store-1" {
                t.amount_minor
            } else if t.debit_account_id == "store-1" {
                -t.amount_minor
            } else {
                0
            }
        })
        .sum();
    assert_eq!(statement.net_minor, from_transfers);
    // Unless the test ran across midnight UTC, that is everything the store was paid.
    if transfers.iter().all(|t| t.applied_at_ms < statement.to_ms) {
        assert_eq!(statement.net_minor, api.balance("store-1").unwrap());
        assert_eq!(statement.payments.amount_minor, 1_000);
        assert_eq!(statement.offline_payments.amount_minor, 300);
        assert_eq!(
            statement.refunds,
            protocol::SettlementTotal {
                count: 2,
                amount_minor: -500
            }
        );
    }
    assert!(statement
        .lines
        .iter()
        .any(|l| l.kind == SettlementKind::Refund && l.transfer_id == "store-1:o-1#refund:r-1"));
    let (status, kind, csv) = api
        .get_text(&format!(
            "/v1/stores/store-1/settlement?date={date}&format=csv"
        ))
        .unwrap();
    assert_eq!((status, kind.as_str()), (200, "text/csv"));
    let rows: Vec<&str> = csv.lines().collect();
    assert!(
        rows[0].starts_with("store_id,date,transfer_id,kind"),
        "{csv}"
    );
    assert_eq!(rows.len(), statement.lines.len() + 1);
    let csv_net: i64 = rows[1..]
        .iter()
        .map(|r| r.split(',').nth(9).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(csv_net, statement.net_minor);
    for bad in [
        "/v1/stores/store-1/settlement?date=2026-02-30",
        "/v1/stores/store-1/settlement?date=yesterday",
        "/v1/stores/store-1/settlement",
        "/v1/stores/store-1/settlement?date=2026-12-06&format=xml",
        "/v1/stores/store-1/settlement?date=2026-12-06&utc_offset_minutes=5000",
        "/v1/stores/alice/settlement?date=2026-12-06",
    ] {
        let (status, body) = api.get(bad).unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {body}"
        );
    }
}

#[test]
fn a_refund_whose_answer_was_lost_is_never_told_declined_and_is_made_once() {
    let Store {
        _dir,
        _broker,
        cloud: _cloud,
        api,
        alice,
        site,
    } = store();
    let paid = pay(&site, &alice, "o-1", 1_000);
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");
    // Final once the hub's confirmation reached the cloud.
    let deadline = Instant::now() + Duration::from_secs(20);
    while api
        .transfers()
        .unwrap()
        .iter()
        .any(|t| t.transfer_id == "store-1:o-1" && t.pending)
    {
        assert!(Instant::now() < deadline, "the payment was never confirmed");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The refund goes out and no answer comes back: unknown, never declined.
    site.uplink.blackhole();
    let (_, lost) = refund(&site, "r-1", "o-1", 400);
    assert_eq!(lost.status, RefundStatus::Unknown, "{lost:?}");
    // Asked again while the store is cut off: the earlier request may have been made, so this
    // one, which cannot be sent, is no decline either.
    site.wait_connected(false, Duration::from_secs(20)).unwrap();
    let (_, again) = refund(&site, "r-1", "o-1", 400);
    assert_eq!(
        (again.status, again.reason),
        (RefundStatus::Unknown, Some(DeclineReason::OutcomeUnknown)),
        "{again:?}"
    );
    // Healed: the same refund id learns the outcome, and the money moved once.
    site.uplink.heal();
    site.wait_connected(true, Duration::from_secs(20)).unwrap();
    let (_, made) = refund_until(&site, ("r-1", "o-1", 400), |r| {
        r.status == RefundStatus::Unknown
    });
    assert_eq!(made.status, RefundStatus::Refunded, "{made:?}");
    assert_eq!(made.refunded_total_minor, Some(400));
    assert_eq!(api.balance("alice").unwrap(), 10_000 - 1_000 + 400);
    let refunds = api
        .transfers()
        .unwrap()
        .into_iter()
        .filter(|t| t.transfer_id.starts_with("store-1:o-1#refund:"))
        .count();
    assert_eq!(refunds, 1);
    // Decided: a new refund id while cut off again is a plain decline (nothing was sent).
    site.uplink.cut();
    site.wait_connected(false, Duration::from_secs(20)).unwrap();
    let (_, cut) = refund(&site, "r-2", "o-1", 100);
    assert_eq!(
        (cut.status, cut.reason),
        (
            RefundStatus::Declined,
            Some(DeclineReason::CloudUnreachable)
        ),
        "{cut:?}"
    );
    api.assert_books_balance().unwrap();
}
