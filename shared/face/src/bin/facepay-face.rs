//! `facepay-face`: the face pipeline for people — embed, compare, liveness, and the benchmarks.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use face::{cosine, lfw, FaceConfig, FaceEngine, Gates};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    version,
    name = "facepay-face",
    about = "facepay face pipeline: embed, compare, liveness, benchmarks"
)]
struct Cli {
    /// Directory of the model files (default: the ones vendored with facepay).
    #[arg(long, global = true)]
    models: Option<PathBuf>,
    #[command(flatten)]
    config: settings::ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every gate and print the embedding and all scores as JSON.
    Embed {
        /// Image file (JPEG, PNG, WebP; recognised by content).
        image: PathBuf,
    },
    /// Cosine similarity of the main faces of two images, and same/different at the threshold.
    Compare {
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
    },
    /// Liveness scores of the main face of an image, and live/spoof at the threshold.
    Liveness {
        /// Image file.
        image: PathBuf,
    },
    /// The official 10-fold LFW protocol.
    BenchLfw {
        /// LFW image root (Name/Name_NNNN.jpg).
        #[arg(long)]
        lfw: PathBuf,
        /// pairs.txt of View 2.
        #[arg(long)]
        pairs: PathBuf,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The embedding of every image of an LFW tree, one line per image (for the cloud's search
    /// benchmark: real faces as enrolled identities and probes). An unreadable image stops it;
    /// images without a detectable face are left out and counted.
    EmbedLfw {
        /// LFW image root (Name/Name_NNNN.jpg).
        #[arg(long)]
        lfw: PathBuf,
        /// Where to write the embeddings (keep it outside the repository: derived from LFW).
        #[arg(long)]
        out: PathBuf,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Per-stage latency, one thread, median and p99 — beside onnxruntime running the same models
    /// on the same images (`shared/face/bench/ort_stages.py`, needs `pip install onnxruntime onnx
    /// numpy pillow`). Build with `--release` for meaningful numbers.
    BenchStages {
        /// Images to run (each is one frame).
        images: Vec<PathBuf>,
        /// Passes over the images.
        #[arg(long, default_value_t = 20)]
        repeat: usize,
        /// Skip the onnxruntime comparison.
        #[arg(long)]
        no_ort: bool,
    },
    /// Decide labelled pairs (`file_x,file_y,Decision` CSV) at the default threshold.
    BenchPairs {
        /// The CSV (e.g. ../shared/faces/labelled/master.csv); images are read beside it.
        #[arg(long)]
        csv: PathBuf,
    },
}

/// The thresholds, loaded once in `main` (defaults < --config file < FACEPAY_FACE_* < --set).
static CONFIG: std::sync::OnceLock<FaceConfig> = std::sync::OnceLock::new();

fn engine(models: &Option<PathBuf>) -> anyhow::Result<FaceEngine> {
    let started = Instant::now();
    let config = CONFIG.get().cloned().unwrap_or_default();
    let engine = match models {
        Some(dir) => FaceEngine::load(dir, config),
        None => FaceEngine::load_default(config),
    }
    .context("loading face models")?;
    eprintln!(
        "models loaded in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(engine)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: FaceConfig = settings::load_or_exit("facepay-face", face::ENV_PREFIX, &cli.config);
    CONFIG.set(config).expect("set once");
    match cli.command {
        Command::Embed { image } => {
            let engine = engine(&cli.models)?;
            let analysis = engine.analyze(&read(&image)?, Gates::All)?;
            println!("{}", serde_json::to_string_pretty(&analysis)?);
            if let Some(refusal) = analysis.refusal {
                eprintln!("refused: {refusal}");
                std::process::exit(2);
            }
        }
        Command::Compare { a, b } => {
            let engine = engine(&cli.models)?;
            let embed = |p: &Path| -> anyhow::Result<Vec<f32>> {
                let analysis = engine.analyze(&read(p)?, Gates::EmbedOnly)?;
                analysis
                    .embedding
                    .with_context(|| format!("{}: no face found", p.display()))
            };
            let score = cosine(&embed(&a)?, &embed(&b)?);
            let same = engine.is_match(score);
            println!(
                "{}",
                serde_json::json!({ "cosine": score, "threshold": engine.config().match_threshold, "same_person": same })
            );
        }
        Command::Liveness { image } => {
            let engine = engine(&cli.models)?;
            let img = face::decode::decode_rgb(&read(&image)?)?;
            let faces = engine.detect(&img)?;
            let Some(main) = faces.first() else {
                bail!("{}: no face found", image.display())
            };
            let scores = engine.liveness(&img, main)?;
            let live = scores.fused >= engine.config().liveness_threshold;
            println!(
                "{}",
                serde_json::json!({ "liveness": scores, "threshold": engine.config().liveness_threshold, "live": live })
            );
        }
        Command::BenchLfw {
            lfw: root,
            pairs,
            threads,
            json,
        } => bench_lfw(&cli.models, &root, &pairs, threads, json)?,
        Command::BenchPairs { csv } => bench_pairs(&cli.models, &csv)?,
        Command::EmbedLfw { lfw, out, threads } => embed_lfw(&cli.models, &lfw, &out, threads)?,
        Command::BenchStages {
            images,
            repeat,
            no_ort,
        } => bench_stages(&cli.models, &images, repeat, no_ort)?,
    }
    Ok(())
}

/// The embedding of the main face of each image (None: no face found), on `threads` workers with
/// a progress bar. An image that cannot be read or decoded is an error naming it: a wrong path
/// must not pass for a failed detection.
fn embed_images(
    engine: &FaceEngine,
    images: &[PathBuf],
    threads: usize,
) -> anyhow::Result<Vec<(PathBuf, Option<Vec<f32>>)>> {
    let bar = ProgressBar::new(images.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}")
            .expect("valid template"),
    );
    let chunk = images.len().div_ceil(threads.max(1)).max(1);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = images
            .chunks(chunk)
            .map(|part| {
                let bar = bar.clone();
                s.spawn(move || {
                    part.iter()
                        .map(|path| {
                            let bytes = read(path)?;
                            let decoded = face::decode::decode_rgb(&bytes)
                                .with_context(|| format!("decoding {}", path.display()))?;
                            let analysis = engine
                                .analyze_image(&decoded, Gates::EmbedOnly)
                                .with_context(|| format!("analysing {}", path.display()))?;
                            bar.inc(1);
                            Ok((path.clone(), analysis.embedding))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker does not panic"))
            .collect::<anyhow::Result<Vec<Vec<_>>>>()
    });
    bar.finish_and_clear();
    Ok(results?.into_iter().flatten().collect())
}

fn embed_lfw(
    models: &Option<PathBuf>,
    root: &Path,
    out: &Path,
    threads: usize,
) -> anyhow::Result<()> {
    let listed = lfw::list_images(root).with_context(|| format!("listing {}", root.display()))?;
    if listed.is_empty() {
        bail!("{}: no Name/Name_NNNN.jpg images there", root.display());
    }
    let engine = engine(models)?;
    let paths: Vec<PathBuf> = listed.iter().map(|(_, p)| p.clone()).collect();
    let started = Instant::now();
    let results = embed_images(&engine, &paths, threads)?;
    let mut rows = Vec::new();
    let mut no_face = 0;
    for ((person, path), (_, embedding)) in listed.iter().zip(results) {
        match embedding {
            Some(embedding) => rows.push(lfw::EmbeddedImage {
                person: person.clone(),
                image: path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                embedding,
            }),
            None => no_face += 1,
        }
    }
    std::fs::write(out, lfw::format_embeddings(&rows))
        .with_context(|| format!("writing {}", out.display()))?;
    let people = rows
        .iter()
        .map(|r| &r.person)
        .collect::<std::collections::HashSet<_>>()
        .len();
    eprintln!(
        "{} images of {people} people embedded in {:.0} s; {no_face} without a detectable face left out; written to {}",
        rows.len(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

fn bench_lfw(
    models: &Option<PathBuf>,
    root: &Path,
    pairs: &Path,
    threads: usize,
    json: bool,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(pairs).with_context(|| format!("reading {}", pairs.display()))?;
    let pairs = lfw::parse_pairs(&text, root).map_err(anyhow::Error::msg)?;
    let mut images: Vec<PathBuf> = pairs
        .iter()
        .flat_map(|p| [p.a.clone(), p.b.clone()])
        .collect();
    images.sort();
    images.dedup();
    let engine = engine(models)?;
    let started = Instant::now();
    let results = embed_images(&engine, &images, threads)?;
    let elapsed = started.elapsed();
    let failed_images: Vec<&PathBuf> = results
        .iter()
        .filter(|(_, e)| e.is_none())
        .map(|(p, _)| p)
        .collect();
    let embeddings: HashMap<PathBuf, Vec<f32>> = results
        .iter()
        .filter_map(|(p, e)| e.clone().map(|e| (p.clone(), e)))
        .collect();
    let scored: Vec<lfw::Scored> = pairs
        .iter()
        .map(|p| lfw::Scored {
            score: embeddings
                .get(&p.a)
                .zip(embeddings.get(&p.b))
                .map(|(a, b)| cosine(a, b)),
            same: p.same,
            fold: p.fold,
        })
        .collect();
    let report = lfw::evaluate(&scored);
    let per_image_ms =
        elapsed.as_secs_f64() * 1000.0 * threads.max(1) as f64 / images.len().max(1) as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({ "report": report, "images": images.len(), "failed_images": failed_images,
                                "threads": threads, "ms_per_image_per_thread": per_image_ms })
        );
        return Ok(());
    }
    println!(
        "LFW deep-funneled, View 2, 10-fold ({} pairs, {} images)",
        pairs.len(),
        images.len()
    );
    println!(
        "accuracy          {:.2}% +- {:.2}%",
        report.mean_accuracy * 100.0,
        report.std_accuracy * 100.0
    );
    println!(
        "folds             {}",
        report
            .fold_accuracies
            .iter()
            .map(|a| format!("{:.2}", a * 100.0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "threshold         {:.3} (mean of the folds' choices)",
        report.mean_threshold
    );
    println!(
        "TAR @ FAR 1e-3    {:.2}% (threshold {:.3})",
        report.tar_at_far_1e3 * 100.0,
        report.far_1e3_threshold
    );
    println!(
        "failed detection  {} images, {} pairs counted as errors",
        failed_images.len(),
        report.failed_pairs
    );
    for path in &failed_images {
        println!("  {}", path.display());
    }
    println!("time              {per_image_ms:.1} ms per image per thread ({threads} threads, detect + align + embed)");
    Ok(())
}

fn bench_pairs(models: &Option<PathBuf>, csv: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let dir = csv.parent().unwrap_or(Path::new("."));
    let engine = engine(models)?;
    let mut cache: HashMap<String, Vec<f32>> = HashMap::new();
    let (mut right, mut wrong) = (0, 0);
    let (mut min_same, mut max_diff) = (f32::MAX, f32::MIN);
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [x, y, decision] = f[..] else {
            bail!("bad line {line:?}")
        };
        for name in [x, y] {
            if !cache.contains_key(name) {
                let analysis = engine.analyze(&read(&dir.join(name))?, Gates::EmbedOnly)?;
                let embedding = analysis
                    .embedding
                    .with_context(|| format!("{name}: no face found"))?;
                cache.insert(name.to_owned(), embedding);
            }
        }
        let score = cosine(&cache[x], &cache[y]);
        let same = decision.eq_ignore_ascii_case("yes");
        if same {
            min_same = min_same.min(score);
        } else {
            max_diff = max_diff.max(score);
        }
        if engine.is_match(score) == same {
            right += 1;
        } else {
            wrong += 1;
            println!("wrong: {x} {y} {decision} cosine {score:.3}");
        }
    }
    println!(
        "{right}/{} pairs decided correctly at threshold {:.3}; same-person min cosine {min_same:.3}, different-person max {max_diff:.3}",
        right + wrong,
        engine.config().match_threshold
    );
    if wrong > 0 {
        std::process::exit(1);
    }
    Ok(())
}

const STAGES: [&str; 6] = ["decode", "detect", "align", "liveness", "embed", "total"];

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return f64::NAN;
    }
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn bench_stages(
    models: &Option<PathBuf>,
    images: &[PathBuf],
    repeat: usize,
    no_ort: bool,
) -> anyhow::Result<()> {
    if images.is_empty() {
        bail!("give at least one image");
    }
    let engine = engine(models)?;
    let files: Vec<Vec<u8>> = images.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
    // Warm-up: builds the detector plan for each input size.
    for bytes in &files {
        engine.analyze(bytes, Gates::EmbedOnly)?;
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
    for _ in 0..repeat {
        for bytes in &files {
            let t0 = Instant::now();
            let img = face::decode::decode_rgb(bytes)?;
            let t1 = Instant::now();
            let faces = engine.detect(&img)?;
            let t2 = Instant::now();
            let Some(main) = faces.first() else { continue };
            let aligned = face::geometry::align(&img, &main.landmarks);
            let _ = face::geometry::luminance_and_sharpness(&aligned);
            let t3 = Instant::now();
            engine.liveness(&img, main)?;
            let t4 = Instant::now();
            engine.embed_aligned(&aligned)?;
            let t5 = Instant::now();
            for (i, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t0, t5)]
                .into_iter()
                .enumerate()
            {
                samples[i].push((b - a).as_secs_f64() * 1000.0);
            }
        }
    }
    let ort: Option<HashMap<String, Vec<f64>>> = if no_ort {
        None
    } else {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/ort_stages.py");
        let dir = models
            .clone()
            .unwrap_or_else(face::models::default_models_dir);
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(&dir)
            .arg(repeat.to_string())
            .args(images)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .context("running python3 for the onnxruntime comparison")?;
        if !out.status.success() {
            bail!(
                "onnxruntime comparison failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some(serde_json::from_slice(&out.stdout).context("reading the onnxruntime timings")?)
    };
    println!(
        "per-stage latency, one thread, {} frames x {repeat} passes (ms)",
        files.len()
    );
    println!(
        "{:<10} {:>12} {:>12} {:>14} {:>14}",
        "stage", "tract p50", "tract p99", "onnxrt p50", "onnxrt p99"
    );
    for (i, stage) in STAGES.iter().enumerate() {
        let (p50, p99) = (
            percentile(&mut samples[i], 0.5),
            percentile(&mut samples[i], 0.99),
        );
        let (o50, o99) = match ort.as_ref().and_then(|o| o.get(*stage)) {
            Some(v) => {
                let mut v = v.clone();
                (percentile(&mut v, 0.5), percentile(&mut v, 0.99))
            }
            None => (f64::NAN, f64::NAN),
        };
        println!("{stage:<10} {p50:>12.2} {p99:>12.2} {o50:>14.2} {o99:>14.2}");
    }
    Ok(())
}
