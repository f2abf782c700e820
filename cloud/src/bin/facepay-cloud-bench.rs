//! `facepay-cloud-bench`: the cloud's 1:N search at fleet sizes, on templates that look like real
//! ones. Real SFace embeddings of LFW images (`facepay-face embed-lfw`) are the enrolled identities
//! (one image per person) and the probes (their other images); the rest of each size is
//! distractors drawn from a Gaussian fitted to the real identities (`synthetic::FaceModel`).
//! For each index: build time, single-query latency p50/p99, recall@1 against exact search, how
//! often the probe's own person came first, and memory. Build with `--release`.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::Context;
use clap::Parser;
use cloud::identity::{IdentityIndex, IndexKind, EMBEDDING_DIM};
use protocol::synthetic::{self, FaceModel};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-cloud-bench",
    about = "Cloud 1:N identity index benchmark on LFW embeddings and distractors like them"
)]
struct Cli {
    /// Embeddings written by `facepay-face embed-lfw` (real faces: identities and probes).
    #[arg(long)]
    embeddings: PathBuf,
    /// Numbers of enrolled templates (the LFW identities plus distractors).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    sizes: Vec<usize>,
    /// Probes per size and index (other images of enrolled people), at most all of them.
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Indexes: `flat`, `ivf:<nlist>:<nprobe>`, `ivf_sq8:<nlist>:<nprobe>`,
    /// `hnsw:<m>:<ef_search>`, `pq_refine:<m>:<k_factor>`. `flat` is always run first: it is the reference for recall.
    #[arg(long, value_delimiter = ',', default_value = "ivf:4096:32,ivf:4096:64")]
    kinds: Vec<String>,
    /// Seed of the distractors.
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

fn parse_kind(spec: &str) -> anyhow::Result<IndexKind> {
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |i: usize| -> anyhow::Result<usize> {
        parts
            .get(i)
            .with_context(|| format!("{spec}: missing a number"))?
            .parse()
            .with_context(|| format!("{spec}: not a number"))
    };
    Ok(match parts[0] {
        "flat" => IndexKind::Flat,
        "ivf" => IndexKind::Ivf {
            nlist: num(1)?,
            nprobe: num(2)?,
        },
        "ivf_sq8" => IndexKind::IvfSq8 {
            nlist: num(1)?,
            nprobe: num(2)?,
        },
        "hnsw" => IndexKind::Hnsw {
            m: num(1)?,
            ef_search: num(2)?,
        },
        "pq_refine" => IndexKind::PqRefine {
            m: num(1)?,
            k_factor: num(2)?,
        },
        other => anyhow::bail!("unknown index type {other}"),
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut kinds = vec![("flat".to_string(), IndexKind::Flat)];
    for spec in &cli.kinds {
        if spec != "flat" {
            kinds.push((spec.clone(), parse_kind(spec)?));
        }
    }
    let text = std::fs::read_to_string(&cli.embeddings)
        .with_context(|| format!("reading {}", cli.embeddings.display()))?;
    let rows = face::lfw::parse_embeddings(&text, EMBEDDING_DIM as usize)
        .map_err(anyhow::Error::msg)
        .with_context(|| cli.embeddings.display().to_string())?;
    let mut people: BTreeMap<&str, Vec<&[f32]>> = BTreeMap::new();
    for row in &rows {
        people.entry(&row.person).or_default().push(&row.embedding);
    }
    // Person i (1-based) is enrolled as template id i with its first image; its other images
    // are probes whose right answer is id i.
    let enrolled: Vec<(u64, Vec<f32>)> = people
        .values()
        .enumerate()
        .map(|(i, images)| (i as u64 + 1, images[0].to_vec()))
        .collect();
    let all_probes: Vec<(u64, &[f32])> = people
        .values()
        .enumerate()
        .flat_map(|(i, images)| images[1..].iter().map(move |p| (i as u64 + 1, *p)))
        .collect();
    let step = (all_probes.len() / cli.queries.max(1)).max(1);
    let probes: Vec<(u64, &[f32])> = all_probes
        .iter()
        .step_by(step)
        .take(cli.queries)
        .copied()
        .collect();
    let model = FaceModel::fit(&enrolled.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>())
        .map_err(anyhow::Error::msg)?;
    eprintln!(
        "{} images of {} people: {} enrolled, {} probes; distractors from a Gaussian fitted to the enrolled",
        rows.len(),
        people.len(),
        enrolled.len(),
        probes.len()
    );

    // How alike distractors and real faces look to the matcher: cosine of different people.
    let mut rng = synthetic::Rng::new(cli.seed);
    let mut real_pairs = Vec::new();
    let mut distractor_pairs = Vec::new();
    for _ in 0..20_000 {
        let a = &enrolled[rng.below(enrolled.len() as u64) as usize].1;
        let b = &enrolled[rng.below(enrolled.len() as u64) as usize].1;
        if a != b {
            real_pairs.push(dot(a, b) as f64);
        }
        distractor_pairs.push(dot(a, &model.sample(&mut rng)) as f64);
    }
    real_pairs.sort_by(f64::total_cmp);
    distractor_pairs.sort_by(f64::total_cmp);
    let mut uniform_pairs: Vec<f64> = (0..20_000)
        .map(|_| {
            let a = &enrolled[rng.below(enrolled.len() as u64) as usize].1;
            dot(a, &synthetic::template(&mut rng)) as f64
        })
        .collect();
    uniform_pairs.sort_by(f64::total_cmp);
    println!("Cosine of two different people, p50 / p99 / p99.99:");
    for (name, set) in [
        ("real vs real", &real_pairs),
        ("real vs distractor", &distractor_pairs),
        ("real vs uniform random", &uniform_pairs),
    ] {
        println!(
            "  {name:24} {:.3} / {:.3} / {:.3}",
            percentile(set, 0.5),
            percentile(set, 0.99),
            percentile(set, 0.9999)
        );
    }
    println!();
    println!(
        "| templates | index | build s | p50 ms | p99 ms | recall@1 vs exact | own person first | index file MB | RSS growth MB |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    // Progress on stderr (drawn only on a terminal); the table goes to stdout.
    let bar = indicatif::ProgressBar::new((cli.sizes.len() * kinds.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rows, {elapsed}: {msg}")
            .expect("valid template"),
    );
    for &n in &cli.sizes {
        anyhow::ensure!(
            n >= enrolled.len(),
            "size {n} is below the {} LFW identities",
            enrolled.len()
        );
        let mut rng = synthetic::Rng::new(cli.seed ^ n as u64);
        let mut templates = enrolled.clone();
        templates.extend((enrolled.len()..n).map(|i| (i as u64 + 1, model.sample(&mut rng))));
        let mut exact_top: Vec<u64> = Vec::new();
        for (name, kind) in &kinds {
            bar.set_message(format!("{n} templates, {name}: building"));
            let before = rss_bytes();
            let started = Instant::now();
            let index = IdentityIndex::build(*kind, &templates)?;
            bar.set_message(format!("{n} templates, {name}: searching"));
            let build_s = started.elapsed().as_secs_f64();
            let grown = rss_bytes().saturating_sub(before);
            let file =
                std::env::temp_dir().join(format!("facepay-bench-{}.faiss", std::process::id()));
            index.save(&file, &storage::Sealer::from_key(&[7; 32]), 0)?;
            // None: an index kind that is never written (built again at each start).
            let file_bytes = std::fs::metadata(&file).ok().map(|m| m.len());
            let _ = std::fs::remove_file(&file);
            let mut times = Vec::with_capacity(probes.len());
            let mut tops = Vec::with_capacity(probes.len());
            for (_, probe) in &probes {
                let started = Instant::now();
                // As many as the cloud asks for (the re-rank of `pq_refine` scales with it).
                let hits = index.search(probe, cloud::enroll::SEARCH_K)?;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                tops.push(hits.first().map(|h| h.template_id).unwrap_or(0));
            }
            if matches!(kind, IndexKind::Flat) {
                exact_top = tops.clone();
            }
            let recall = tops.iter().zip(&exact_top).filter(|(a, b)| a == b).count() as f64
                / tops.len() as f64;
            let own = tops
                .iter()
                .zip(&probes)
                .filter(|(top, (person, _))| *top == person)
                .count() as f64
                / tops.len() as f64;
            times.sort_by(f64::total_cmp);
            let mb = |b: u64| b as f64 / 1e6;
            bar.suspend(|| {
                println!(
                    "| {n} | {name} | {build_s:.1} | {:.3} | {:.3} | {recall:.4} | {own:.4} | {} | {:.0} |",
                    percentile(&times, 0.5),
                    percentile(&times, 0.99),
                    file_bytes.map_or("-".to_string(), |b| format!("{:.0}", mb(b))),
                    mb(grown),
                )
            });
            bar.inc(1);
            drop(index);
        }
    }
    bar.finish_and_clear();
    Ok(())
}
