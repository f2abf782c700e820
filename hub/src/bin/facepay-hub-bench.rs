//! `facepay-hub-bench`: hub identification latency — an exact top-2 search of the store's hot set
//! and the accept / second-factor rule — at the hot-set sizes of the issue (10k and 50k templates),
//! on synthetic embeddings. Build with `--release`.

use std::time::Instant;

use clap::Parser;
use hub::{
    config::IdentifyConfig,
    hotset::HotIndex,
    verify::{conclude, Conclusion},
};
use protocol::{synthetic, HotEntry, SecondFactorKind};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-hub-bench",
    about = "Hub hot-set identification latency"
)]
struct Cli {
    /// Hot-set sizes (templates, one per customer).
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    sizes: Vec<usize>,
    /// Probes per size.
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let cli = Cli::parse();
    let rule = IdentifyConfig::default();
    println!("| hot templates | p50 ms | p99 ms | accepted right | asked 2nd factor | wrong |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &n in &cli.sizes {
        let mut rng = synthetic::Rng::new(cli.seed);
        let entries: Vec<HotEntry> = (0..n)
            .map(|i| HotEntry {
                account_id: format!("c{i}").into(),
                home_store_id: "store-1".into(),
                templates: vec![(i as u64, synthetic::template(&mut rng))],
                second_factor: SecondFactorKind::Pin,
                second_factor_hash: String::new(),
                version: 0,
            })
            .collect();
        let index = HotIndex::build(&entries);
        let mut times = Vec::with_capacity(cli.queries);
        let (mut right, mut asked, mut wrong) = (0, 0, 0);
        for q in 0..cli.queries {
            let who = (q * 7919) % n;
            let probe = synthetic::probe(&mut rng, &entries[who].templates[0].1, 0.7);
            let started = Instant::now();
            let top = index.top2(&probe);
            let conclusion = conclude(&top, &rule);
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            match conclusion {
                Conclusion::Accept(a) if a == entries[who].account_id => right += 1,
                Conclusion::Ask(_) => asked += 1,
                _ => wrong += 1,
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {n} | {:.3} | {:.3} | {right} | {asked} | {wrong} |",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
}
