//! The chaos suite in CI: a minute of payments under a seeded fault schedule, then every check
//! of `tests::chaos::check`. The seed is printed; `FACEPAY_CHAOS_SEED=<seed>` replays the
//! schedule. The longer soak is `cargo run --release --bin facepay-chaos -- --minutes 30`.

use std::time::Duration;

use tests::chaos::{run, schedule, ChaosConfig};

fn seed() -> u64 {
    match std::env::var("FACEPAY_CHAOS_SEED") {
        Ok(s) => s.parse().expect("FACEPAY_CHAOS_SEED is a number"),
        Err(_) => paycode::now_ms(),
    }
}

const EVERY_KIND: [&str; 14] = [
    "partition_hub",
    "partition_terminals",
    "partition_both",
    "kill_hub",
    "kill_cloud",
    "restart_broker",
    "restart_broker_keep",
    "blackhole_hub",
    "partition_cloud",
    "pause_cloud",
    "disk_fault_hub",
    "disk_fault_cloud",
    "clock_jump_hub",
    "wipe_hub",
];

#[test]
fn a_seed_always_gives_the_same_schedule_and_every_ci_run_covers_every_fault() {
    let ci = ChaosConfig::ci(0).duration;
    assert_eq!(schedule(7, ci), schedule(7, ci));
    assert_ne!(schedule(7, ci), schedule(8, ci));
    // Every seed, at the CI run's own length (not a longer one).
    for seed in 0..500 {
        let steps = schedule(seed, ci);
        for kind in EVERY_KIND {
            assert!(
                steps.iter().any(|s| s.fault.kind() == kind),
                "seed {seed} misses {kind}: {steps:?}"
            );
        }
    }
}

#[test]
fn payments_under_overlapping_faults_are_never_charged_after_declined_nor_lost() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed();
    let report = match run(dir.path(), &ChaosConfig::ci(seed)) {
        Ok(report) => report,
        Err(e) => panic!("{e:#}"),
    };
    eprintln!("chaos: {report:?}");
    assert!(report.ok > 0, "some payments were approved: {report:?}");
    assert!(report.ok_offline > 0, "some offline: {report:?}");
    assert!(report.refunds.0 > 0, "some refunds were made: {report:?}");
    assert!(
        report.failed + report.unknown > 0,
        "the faults were felt: {report:?}"
    );
    for kind in EVERY_KIND {
        assert!(report.fault_kinds.contains(kind), "{kind}: {report:?}");
    }
    assert!(report.drain < Duration::from_secs(60));
}
