//! `facepay-cloud-bench`: the cloud's 1:N search over synthetic templates for each index type the
//! configuration offers — single-query latency p50/p99, recall@1 against exact search, build
//! time, and memory. Build with `--release`; run with `OMP_NUM_THREADS` at the cloud's setting.

use std::time::Instant;

use clap::Parser;
use cloud::identity::{IdentityIndex, IndexKind};
use protocol::synthetic;

#[derive(Parser)]
#[command(
    name = "facepay-cloud-bench",
    about = "Cloud 1:N identity index benchmark"
)]
struct Cli {
    /// Numbers of enrolled templates.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    sizes: Vec<usize>,
    /// Queries per size and index.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Index types: flat, ivf, hnsw.
    #[arg(long, value_delimiter = ',', default_value = "flat,ivf,hnsw")]
    kinds: Vec<String>,
    /// IVF probes.
    #[arg(long, default_value_t = 32)]
    nprobe: usize,
    /// HNSW links per node.
    #[arg(long, default_value_t = 32)]
    hnsw_m: usize,
    /// HNSW search breadth.
    #[arg(long, default_value_t = 64)]
    ef_search: usize,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    println!(
        "| templates | index | build s | p50 ms | p99 ms | recall@1 vs exact | index file MB | RSS growth MB | MB per million |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &cli.sizes {
        let mut rng = synthetic::Rng::new(cli.seed);
        let templates: Vec<(u64, Vec<f32>)> = (0..n)
            .map(|i| (i as u64 + 1, synthetic::template(&mut rng)))
            .collect();
        let queries: Vec<(u64, Vec<f32>)> = (0..cli.queries)
            .map(|q| {
                let who = (q * 7919) % n;
                (
                    templates[who].0,
                    synthetic::probe(&mut rng, &templates[who].1, 0.7),
                )
            })
            .collect();
        let mut exact_top: Vec<u64> = Vec::new();
        for name in &cli.kinds {
            let kind = match name.as_str() {
                "flat" => IndexKind::Flat,
                "ivf" => IndexKind::Ivf {
                    nlist: (4.0 * (n as f64).sqrt()) as usize,
                    nprobe: cli.nprobe,
                },
                "hnsw" => IndexKind::Hnsw {
                    m: cli.hnsw_m,
                    ef_search: cli.ef_search,
                },
                other => anyhow::bail!("unknown index type {other}"),
            };
            let before = rss_bytes();
            let started = Instant::now();
            let mut index = IdentityIndex::build(kind, &templates)?;
            let build_s = started.elapsed().as_secs_f64();
            let grown = rss_bytes().saturating_sub(before);
            let file =
                std::env::temp_dir().join(format!("facepay-bench-{}.faiss", std::process::id()));
            index.save(&file, &storage::Sealer::from_key(&[7; 32]))?;
            let file_bytes = std::fs::metadata(&file)?.len();
            let _ = std::fs::remove_file(&file);
            let mut times = Vec::with_capacity(queries.len());
            let mut tops = Vec::with_capacity(queries.len());
            for (_, probe) in &queries {
                let started = Instant::now();
                let hits = index.search(probe, 2)?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                tops.push(hits.first().map(|h| h.template_id).unwrap_or(0));
            }
            if matches!(kind, IndexKind::Flat) {
                exact_top = tops.clone();
            }
            let recall = if exact_top.is_empty() {
                f64::NAN
            } else {
                tops.iter().zip(&exact_top).filter(|(a, b)| a == b).count() as f64
                    / tops.len() as f64
            };
            times.sort_by(f64::total_cmp);
            let mb = |b: u64| b as f64 / 1e6;
            println!(
                "| {n} | {name} | {build_s:.1} | {:.3} | {:.3} | {recall:.4} | {:.0} | {:.0} | {:.0} |",
                percentile(&times, 0.5),
                percentile(&times, 0.99),
                mb(file_bytes),
                mb(grown),
                mb(file_bytes) * 1e6 / n as f64,
            );
            drop(index);
        }
    }
    Ok(())
}
