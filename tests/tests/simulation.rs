//! The deterministic simulation of hub, ledger and network (`tests::sim`) in CI: a run of seeds
//! from a printed first seed, every fault kind in every seed. `FACEPAY_SIM_SEED=<seed>` replays a
//! run; `facepay-sim --seed <seed>` replays one seed with its report.

#[test]
fn seeded_runs_of_faults_never_move_money_after_declined_nor_lose_an_approval() {
    let first = tests::sim::default_seed();
    let seeds = std::env::var("FACEPAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    eprintln!(
        "simulation: seeds {first}..{} (FACEPAY_SIM_SEED={first} replays)",
        first + seeds
    );
    let started = std::time::Instant::now();
    let reports = match tests::sim::run_seeds(first, seeds) {
        Ok(reports) => reports,
        Err(e) => {
            panic!("{e:#}\nreplay one seed: cargo run -p tests --bin facepay-sim -- --seed <seed>")
        }
    };
    let approved: usize = reports.iter().map(|r| r.approved).sum();
    let declined: usize = reports.iter().map(|r| r.declined).sum();
    let offline: usize = reports.iter().map(|r| r.approved_offline).sum();
    eprintln!(
        "simulation: {seeds} seeds in {:.1} s; approved {approved} (offline {offline}), declined {declined}",
        started.elapsed().as_secs_f64()
    );
    // The runs exercised what they claim: approvals online and offline, declines, every fault.
    assert!(approved > 0 && offline > 0 && declined > 0);
    for report in &reports {
        for kind in [
            "cut",
            "crash_hub",
            "wipe_hub",
            "clock_back",
            "clock_forward",
        ] {
            assert!(
                report.faults.get(kind).copied().unwrap_or(0) > 0,
                "{report:?}"
            );
        }
    }
}
