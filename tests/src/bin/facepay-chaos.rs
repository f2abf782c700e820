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
    // The soak's progress on standard error (hidden when it is not a terminal): the payments
    // under faults run for the set minutes, then the history is checked.
    let bar = indicatif::ProgressBar::new(config.duration.as_secs());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} s of faults, elapsed {elapsed}, eta {eta}",
        )
        .expect("valid template"),
    );
    let started = std::time::Instant::now();
    let ticking = bar.clone();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let ticker = std::thread::spawn(move || {
        // Until the run ends (the sender dropped).
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            finished.recv_timeout(std::time::Duration::from_secs(1))
        {
            let length = ticking.length().unwrap_or(0);
            ticking.set_position(started.elapsed().as_secs().min(length));
        }
    });
    let report = tests::chaos::run(dir.path(), &config);
    drop(done);
    let _ = ticker.join();
    bar.finish_and_clear();
    println!("{}", report?);
    Ok(())
}
