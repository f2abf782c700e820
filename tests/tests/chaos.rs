//! The chaos suite in CI: one minute of payments under a seeded fault schedule, then every check
//! of `tests::chaos::check`. The seed is printed; `FACEPAY_CHAOS_SEED=<seed>` replays a schedule.
//! The longer soak is `cargo run --release --bin facepay-chaos -- --minutes 30`.

use tests::chaos::{run, schedule, ChaosConfig, Fault};

fn seed() -> u64 {
    match std::env::var("FACEPAY_CHAOS_SEED") {
        Ok(s) => s.parse().expect("FACEPAY_CHAOS_SEED is a number"),
        Err(_) => paycode::now_ms(),
    }
}

#[test]
fn a_seed_always_gives_the_same_schedule_and_it_covers_every_fault() {
    let d = std::time::Duration::from_secs(600);
    assert_eq!(schedule(7, d), schedule(7, d));
    assert_ne!(schedule(7, d), schedule(8, d));
    let steps = schedule(7, d);
    for kind in [
        |f: &Fault| matches!(f, Fault::PartitionHub(_)),
        |f: &Fault| matches!(f, Fault::PartitionTerminals(_)),
        |f: &Fault| matches!(f, Fault::PartitionBoth(_)),
        |f: &Fault| matches!(f, Fault::KillHub(_)),
        |f: &Fault| matches!(f, Fault::KillCloud),
        |f: &Fault| matches!(f, Fault::RestartBroker),
    ] {
        assert!(steps.iter().any(|s| kind(&s.fault)), "{steps:?}");
    }
}

#[test]
fn payments_under_partitions_kills_and_restarts_reconcile_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed();
    let report = match run(dir.path(), &ChaosConfig::ci(seed)) {
        Ok(report) => report,
        Err(e) => panic!("{e:#}"),
    };
    eprintln!("chaos: {report:?}");
    assert!(report.ok > 0, "some payments were approved: {report:?}");
    assert!(
        report.failed + report.unknown > 0,
        "the faults were felt: {report:?}"
    );
}
