//! `facepay-chaos`: the chaos harness as a soak, longer than CI's minute.
//! `cargo run --release --bin facepay-chaos -- --minutes 30 [--seed N]`

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    name = "facepay-chaos",
    about = "seeded faults over real facepay processes; checks the history"
)]
struct Cli {
    /// Minutes of payments under faults.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Seed of the schedule and workload (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Terminals per store.
    #[arg(long, default_value_t = 2)]
    terminals: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(paycode::now_ms);
    let mut config = tests::chaos::ChaosConfig::soak(seed, cli.minutes);
    config.terminals = cli.terminals;
    let dir = tempfile::tempdir()?;
    let report = tests::chaos::run(dir.path(), &config)?;
    println!("{report}");
    Ok(())
}
