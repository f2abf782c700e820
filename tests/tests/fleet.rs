//! A fleet's cloud with real processes: three cloud instances sharing one PostgreSQL (the test's
//! own server), Mosquitto, two stores with a hub and a terminal each. Each store is served by the
//! one instance holding its lease; the instance serving a store is killed (SIGKILL) mid-run and
//! another takes the store over; every payment the registers heard approved is in the ledger
//! exactly once, none they heard declined is, and the books balance. Then the instance serving
//! another store is stopped cleanly (SIGTERM): it releases the store's lease and tells the
//! others, and another instance serves the store's next charge. A hub killed at the end is reported offline by every instance (its
//! last will).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use paycode::Wallet;
use protocol::{AccountKind, ChargeStatus};
use tests::{
    charge, ensure_identity, open_account, present_code, start_cloud_with, store::StoreSite,
    Broker, CloudApi, Mosquitto, NatsCluster, Service,
};

/// Seconds a store's lease lasts in this test: a dead instance's stores move within about this.
const LEASE_SECONDS: u64 = 3;

/// `store_id`'s lease record, read from the database.
fn lease_record(url: &str, store_id: &str) -> Option<serde_json::Value> {
    let db = storage::kv::Db::postgres(url, "facepay").ok()?;
    let leases = db.open_tree(cloud::leases::LEASES_TREE).ok()?;
    serde_json::from_slice(&leases.get(store_id).ok()??).ok()
}

/// The cloud instance (`cloud:<n>`) holding `store_id`'s lease, read from the database.
fn lease_holder(url: &str, store_id: &str) -> Option<String> {
    lease_record(url, store_id)?["instance"]
        .as_str()
        .map(str::to_owned)
}

/// Charges `order` until the register hears a final answer (an unknown outcome is asked again
/// with the same order id, as a register must), presenting the customer's code each time.
fn settle(site: &StoreSite, wallet: &Wallet, order: &str, amount: i64) -> protocol::ChargeResult {
    let (edge, frames) = &site.edges[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        present_code(frames, wallet).unwrap();
        let heard = charge(edge.http_addr, order, amount, "EUR").unwrap().1;
        if heard.status != ChargeStatus::Unknown || Instant::now() > deadline {
            return heard;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn each_store_is_served_by_one_instance_and_taken_over_when_that_instance_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::Single(Mosquitto::start(dir.path()).unwrap());
    run_fleet(dir.path(), broker);
}

/// The same on a three-node NATS cluster, one of whose nodes (the one store-1's hub and the
/// instance serving store-1 are connected to) is killed with the instance.
#[test]
fn a_fleet_on_a_broker_cluster_survives_losing_a_node_and_an_instance() {
    let dir = tempfile::tempdir().unwrap();
    let clients = mqtt::nats::Clients {
        stores: vec!["store-1".into(), "store-2".into()],
        cloud_instances: (1..=3).map(|n| n.to_string()).collect(),
    };
    for n in 1..=3 {
        ensure_identity(&pki::Identity::cloud_instance(&n.to_string()).unwrap()).unwrap();
    }
    let broker = Broker::Cluster(NatsCluster::start(dir.path(), 3, &clients).unwrap());
    run_fleet(dir.path(), broker);
}

fn run_fleet(dir: &std::path::Path, mut broker: Broker) {
    // The fleet's database takes TCP clients only over TLS, with a cloud certificate.
    ensure_identity(&pki::Identity::database()).unwrap();
    let pki_dir = tests::test_pki();
    let postgres = pgtest::Postgres::start_tls(&pgtest::ServerTls {
        ca: pki_dir.join("ca.pem"),
        cert: pki_dir.join("database.pem"),
        key: pki_dir.join("database.key"),
    })
    .unwrap();
    let url = postgres.url();
    let local = postgres.socket_url();
    let plain = storage::kv::Db::postgres(&url, "facepay");
    assert!(plain.is_err(), "a plain connection over TCP is refused");
    ensure_identity(&pki::Identity::hub("store-1").unwrap()).unwrap();
    let as_hub = tests::tls_identity("hub-store-1")
        .and_then(|hub| Ok(hub.client_config_for(pki::Role::Database)?))
        .unwrap();
    let hub = storage::kv::Db::postgres_over(&url, "facepay", Some(std::sync::Arc::new(as_hub)));
    assert!(hub.is_err(), "a hub's certificate does not log in");
    let mut clouds: BTreeMap<String, Service> = BTreeMap::new();
    for n in 1..=3 {
        ensure_identity(&pki::Identity::cloud_instance(&n.to_string()).unwrap()).unwrap();
        let (port, failover) = broker.for_client(n - 1);
        let mut extra = vec![
            "database.backend=\"postgres\"".into(),
            format!("database.url={url:?}"),
            format!("fleet.instance=\"{n}\""),
            format!("fleet.lease_seconds={LEASE_SECONDS}"),
            // One key seals the customers of the database for every instance: the first
            // instance makes it, the others are given it.
            format!("template_key_file={:?}", dir.join("templates.key")),
            "mqtt.reconnect_delay_ms=100".into(),
            "mqtt.reconnect_max_delay_ms=2000".into(),
        ];
        extra.extend(failover);
        let cloud = start_cloud_with(&dir.join(format!("cloud-{n}")), port, &extra).unwrap();
        clouds.insert(format!("cloud:{n}"), cloud);
    }
    let api = |clouds: &BTreeMap<String, Service>| {
        CloudApi::new(
            clouds
                .values()
                .next()
                .expect("an instance is left")
                .http_addr,
        )
    };
    open_account(&api(&clouds), "store-1", AccountKind::Merchant, 0);
    open_account(&api(&clouds), "store-2", AccountKind::Merchant, 0);
    let alice = open_account(&api(&clouds), "alice", AccountKind::Customer, 100_000).unwrap();
    let bob = open_account(&api(&clouds), "bob", AccountKind::Customer, 100_000).unwrap();
    let sites: Vec<StoreSite> = ["store-1", "store-2"]
        .into_iter()
        .enumerate()
        .map(|(i, store)| {
            let (port, mut extra) = broker.for_client(i);
            extra.push("mqtt.reconnect_max_delay_ms=2000".into());
            let site = StoreSite::start(dir, store, port, 1, &extra).unwrap();
            // Another instance than the first answers the API: any instance serves it.
            CloudApi::new(clouds.values().last().unwrap().http_addr)
                .set_hub_key(store, &site.hub_key())
                .unwrap();
            tests::wait_for_keys(site.hub_http(), 2, Duration::from_secs(30)).unwrap();
            site
        })
        .collect();
    let payers = [&alice, &bob];
    // Every instance sees each store's hub online (its retained presence).
    for cloud in clouds.values() {
        for store in ["store-1", "store-2"] {
            tests::wait_for_metric(
                cloud.metrics_addr,
                &format!("facepay_cloud_store_online{{store_id=\"{store}\"}}"),
                1.0,
                Duration::from_secs(20),
            )
            .unwrap();
        }
    }

    // What each register heard, per store: order -> (amount, status).
    let mut heard: Vec<BTreeMap<String, (i64, ChargeStatus)>> = vec![BTreeMap::new(); 2];
    // One order at each store; store-1's answer, returned.
    let round = |label: &str, n: usize, heard: &mut Vec<BTreeMap<String, (i64, ChargeStatus)>>| {
        let mut first = None;
        for (i, site) in sites.iter().enumerate() {
            let order = format!("{label}-{n}");
            let amount = 100 + n as i64;
            let answer = settle(site, payers[i], &order, amount);
            heard[i].insert(order, (amount, answer.status));
            first.get_or_insert(answer);
        }
        first.expect("two stores")
    };
    // Until both stores are approved online (a cluster just started may still be electing the
    // leaders of its session store: the first charges may be declined offline, which the books
    // check below covers too), then two more rounds.
    let warming = Instant::now();
    let mut n = 0;
    loop {
        let mut online = 0;
        for (i, site) in sites.iter().enumerate() {
            let order = format!("before-{n}");
            let amount = 100 + n as i64;
            let answer = settle(site, payers[i], &order, amount);
            if answer.status != ChargeStatus::Approved {
                eprintln!("{order} at {}: {answer:?}", site.store_id);
            }
            online += usize::from(answer.status == ChargeStatus::Approved && !answer.offline);
            heard[i].insert(order, (amount, answer.status));
        }
        n += 1;
        if online == sites.len() {
            break;
        }
        assert!(
            warming.elapsed() < Duration::from_secs(90),
            "the stores are not approved online: {heard:?}"
        );
    }
    for more in n..n + 2 {
        round("before", more, &mut heard);
    }
    let holders: Vec<String> = ["store-1", "store-2"]
        .iter()
        .map(|store| lease_holder(&local, store).expect("a store is leased once served"))
        .collect();

    // The instance serving store-1 dies at once; store-1's payments go on through another.
    let killed = holders[0].clone();
    clouds.get_mut(&killed).unwrap().kill();
    clouds.remove(&killed);
    // On a cluster, the node store-1's hub is connected to dies with it.
    if let Broker::Cluster(cluster) = &mut broker {
        cluster.kill(0);
    }
    let killed_at = Instant::now();
    // Until store-1 is approved online again (offline approvals while it has no instance, or
    // no broker, are fine and reconciled below), then a few more.
    let mut served_again = None;
    let mut n = 0;
    while served_again.is_none() {
        assert!(
            killed_at.elapsed() < Duration::from_secs(120),
            "store-1 not served online again: {heard:?}"
        );
        let answer = round("after", n, &mut heard);
        if answer.status == ChargeStatus::Approved && !answer.offline {
            served_again = Some(killed_at.elapsed());
        }
        n += 1;
    }
    for more in n..n + 3 {
        round("after", more, &mut heard);
    }
    let served_again = served_again.expect("loop ends once served");
    let new_holder = lease_holder(&local, "store-1").expect("store-1 is leased");
    assert_ne!(new_holder, killed);
    assert!(clouds.contains_key(&new_holder), "{new_holder}");
    eprintln!(
        "store-1 moved from {killed} to {new_holder}: approved online again {:.1} s after the kill \
         (lease {LEASE_SECONDS} s)",
        served_again.as_secs_f64()
    );

    // The instance serving store-2 is stopped cleanly (SIGTERM, as systemd does): it serves
    // what it took, hands the store's lease back at once and ends; store-2 goes on through
    // another instance.
    // First store-2 is served online (the instance killed above may have been its holder),
    // so that a live instance holds its lease when it is stopped.
    let mut n = 0;
    let stopped = loop {
        assert!(n < 200, "store-2 not served online: {heard:?}");
        let order = format!("before-stop-{n}");
        let amount = 200 + n as i64;
        let answer = settle(&sites[1], payers[1], &order, amount);
        heard[1].insert(order, (amount, answer.status));
        n += 1;
        let holder = lease_holder(&local, "store-2").filter(|h| clouds.contains_key(h));
        match holder {
            Some(holder) if answer.status == ChargeStatus::Approved && !answer.offline => {
                break holder
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    // The instances that stay are connected to the broker: after the node's loss above one may
    // still be reconnecting, and a store no connected instance hears is decided offline
    // whatever the release says. The handover below is about the release.
    for (name, cloud) in clouds.iter().filter(|(name, _)| **name != stopped) {
        tests::wait_for_metric(
            cloud.metrics_addr,
            "facepay_cloud_broker_connected",
            1.0,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{name} connected again: {e:#}"));
    }
    let status = clouds
        .get_mut(&stopped)
        .unwrap()
        .terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{stopped}: {status:?}");
    assert_eq!(clouds[&stopped].printed(), ["facepay-cloud stopped"]);
    clouds.remove(&stopped);
    let lease = lease_record(&local, "store-2").expect("store-2 is leased");
    assert!(
        lease["instance"] != stopped.as_str() || lease["expires_at_ms"] == 0,
        "{stopped} stopped without releasing store-2's lease: {lease}"
    );
    let stopped_at = Instant::now();
    let mut n = 0;
    loop {
        assert!(
            stopped_at.elapsed() < Duration::from_secs(120),
            "store-2 not served online again: {heard:?}"
        );
        let order = format!("after-stop-{n}");
        let amount = 300 + n as i64;
        let answer = settle(&sites[1], payers[1], &order, amount);
        heard[1].insert(order, (amount, answer.status));
        if answer.status == ChargeStatus::Approved && !answer.offline {
            break;
        }
        n += 1;
    }
    // It told the others: the first charge after the stop was served online, not decided
    // offline while they waited for their view of the lease to run out.
    assert_eq!(n, 0, "store-2 waited for the released lease: {heard:?}");
    let taken_by = lease_holder(&local, "store-2").expect("store-2 is leased");
    assert!(clouds.contains_key(&taken_by), "{taken_by}");
    eprintln!(
        "store-2 moved from {stopped} (stopped) to {taken_by}: approved online again {:.1} s later",
        stopped_at.elapsed().as_secs_f64()
    );
    eprintln!("what the registers heard: {heard:?}");

    // Everything approved offline while the store had no instance reaches the ledger.
    for site in &sites {
        tests::wait_for_metric(
            site.hub_http(),
            "facepay_hub_offline_backlog",
            0.0,
            Duration::from_secs(60),
        )
        .unwrap();
    }
    // The books: every approved payment once, nothing declined, money neither made nor lost.
    let api = api(&clouds);
    let transfers = api.transfers().unwrap();
    for (i, store) in ["store-1", "store-2"].iter().enumerate() {
        let mut charged = 0;
        for (order, (amount, status)) in &heard[i] {
            let payment = format!("{store}:{order}");
            // What moved for the payment: its transfer (`<payment>`, `<payment>#offline`,
            // `<payment>#posted`) less its reversals (`<payment>#void`, from the store back).
            let moved: i64 = transfers
                .iter()
                .filter(|t| {
                    t.transfer_id == payment || t.transfer_id.starts_with(&format!("{payment}#"))
                })
                .map(|t| match (&t.credit_account_id, &t.debit_account_id) {
                    (credit, _) if credit == store => t.amount_minor,
                    (_, debit) if debit == store => -t.amount_minor,
                    _ => 0,
                })
                .sum();
            match status {
                ChargeStatus::Approved => {
                    assert_eq!(moved, *amount, "{payment} heard approved: moved once");
                    charged += amount;
                }
                _ => assert_eq!(moved, 0, "{payment} heard {status:?}: nothing moved"),
            }
        }
        assert_eq!(api.balance(store).unwrap(), charged, "{store}");
        assert_eq!(
            api.balance(["alice", "bob"][i]).unwrap(),
            100_000 - charged,
            "{store}'s customer"
        );
    }
    for totals in api.totals().unwrap() {
        assert_eq!(totals.sum_of_balances_minor, 0, "{totals:?}");
        assert_eq!(totals.total_debits_minor, totals.total_credits_minor);
    }

    // A hub gone without a goodbye: its last will tells every instance the store is offline.
    let mut sites = sites;
    sites[1].hub.kill();
    for cloud in clouds.values() {
        tests::wait_for_metric(
            cloud.metrics_addr,
            "facepay_cloud_store_online{store_id=\"store-2\"}",
            0.0,
            Duration::from_secs(30),
        )
        .unwrap();
    }
}
