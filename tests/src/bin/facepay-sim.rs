//! The deterministic simulation of hub, ledger and network (`tests::sim`), from the command line.
//!
//! `facepay-sim --seed 42` replays one seed exactly; `facepay-sim --seeds 1000` runs a thousand
//! seeds from a printed first seed (on every core) and reports seeds per minute.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    name = "facepay-sim",
    about = "Runs the deterministic simulation of hub, ledger and network"
)]
struct Cli {
    /// First seed (default: FACEPAY_SIM_SEED, else the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let first = cli.seed.unwrap_or_else(tests::sim::default_seed);
    println!("facepay-sim: seeds {first}..{}", first + cli.seeds);
    let started = std::time::Instant::now();
    let mut totals = tests::sim::SimReport::default();
    for report in tests::sim::run_seeds(first, cli.seeds)? {
        if cli.seeds == 1 {
            println!("{report:#?}");
        }
        totals.attempts += report.attempts;
        totals.approved += report.approved;
        totals.approved_offline += report.approved_offline;
        totals.declined += report.declined;
        totals.unknown += report.unknown;
        totals.lost_with_disk += report.lost_with_disk;
        totals.conflicts_with_disk_lost += report.conflicts_with_disk_lost;
        totals.reversed_after_approval_with_disk_lost +=
            report.reversed_after_approval_with_disk_lost;
        totals.declined_after_approval_with_disk_lost +=
            report.declined_after_approval_with_disk_lost;
        totals.lost_with_disk_after_another_charge += report.lost_with_disk_after_another_charge;
        for (kind, n) in report.faults {
            *totals.faults.entry(kind).or_default() += n;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "facepay-sim: {} seeds passed in {secs:.1} s ({:.0} seeds/min); attempts {} approved {} \
         (offline {}) declined {} unknown {}; faults {:?}; lost with a wiped disk: {} offline \
         approvals, {} online approvals expired unconfirmed, {} conflicts for the operator, {} \
         orders paid before the wipe declined after it, {} approved offline again with other \
         details and lost",
        cli.seeds,
        cli.seeds as f64 * 60.0 / secs,
        totals.attempts,
        totals.approved,
        totals.approved_offline,
        totals.declined,
        totals.unknown,
        totals.faults,
        totals.lost_with_disk,
        totals.reversed_after_approval_with_disk_lost,
        totals.conflicts_with_disk_lost,
        totals.declined_after_approval_with_disk_lost,
        totals.lost_with_disk_after_another_charge,
    );
    Ok(())
}
