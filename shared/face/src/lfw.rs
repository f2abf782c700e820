//! The LFW verification protocol (View 2): 10 folds of 300 same-person and 300 different-person
//! pairs; the threshold is picked on nine folds and scored on the tenth. A pair whose image had no
//! detectable face counts as an error at every threshold: failures are never dropped.

use std::path::{Path, PathBuf};

/// One pair of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// First image.
    pub a: PathBuf,
    /// Second image.
    pub b: PathBuf,
    /// Same person?
    pub same: bool,
    /// Fold, 0-9.
    pub fold: usize,
}

/// Parses `pairs.txt` (first line: folds and pairs per class per fold).
pub fn parse_pairs(text: &str, images: &Path) -> Result<Vec<Pair>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or("empty pairs file")?;
    let nums: Vec<usize> = header
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let [folds, per_class] = nums[..] else {
        return Err(format!("bad header {header:?}"));
    };
    let path = |name: &str, n: &str| -> Result<PathBuf, String> {
        let n: usize = n.parse().map_err(|_| format!("bad image number {n:?}"))?;
        Ok(images.join(name).join(format!("{name}_{n:04}.jpg")))
    };
    let mut pairs = Vec::with_capacity(folds * per_class * 2);
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let fold = i / (2 * per_class);
        let pair = match f[..] {
            [name, n1, n2] => Pair {
                a: path(name, n1)?,
                b: path(name, n2)?,
                same: true,
                fold,
            },
            [name1, n1, name2, n2] => Pair {
                a: path(name1, n1)?,
                b: path(name2, n2)?,
                same: false,
                fold,
            },
            _ => return Err(format!("line {}: {line:?}", i + 2)),
        };
        pairs.push(pair);
    }
    if pairs.len() != folds * per_class * 2 {
        return Err(format!(
            "expected {} pairs, found {}",
            folds * per_class * 2,
            pairs.len()
        ));
    }
    Ok(pairs)
}

/// A scored pair: `score` is `None` when an image failed detection.
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    /// Cosine similarity.
    pub score: Option<f32>,
    /// Same person?
    pub same: bool,
    /// Fold.
    pub fold: usize,
}

fn accuracy(pairs: &[&Scored], threshold: f32) -> f64 {
    let correct = pairs
        .iter()
        .filter(|p| matches!(p.score, Some(s) if (s >= threshold) == p.same))
        .count();
    correct as f64 / pairs.len().max(1) as f64
}

fn best_threshold(pairs: &[&Scored]) -> f32 {
    let mut candidates: Vec<f32> = pairs.iter().filter_map(|p| p.score).collect();
    candidates.sort_by(f32::total_cmp);
    candidates.dedup();
    // Midpoints between neighbouring scores, so that the threshold separates them.
    let mids: Vec<f32> = candidates.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    mids.into_iter()
        .map(|t| (accuracy(pairs, t), t))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, t)| t)
        .unwrap_or(0.0)
}

/// The result of the 10-fold protocol.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Accuracy per fold.
    pub fold_accuracies: Vec<f64>,
    /// Mean accuracy.
    pub mean_accuracy: f64,
    /// Standard deviation of the fold accuracies.
    pub std_accuracy: f64,
    /// Threshold chosen per fold (on the other nine).
    pub fold_thresholds: Vec<f32>,
    /// Mean of the chosen thresholds.
    pub mean_threshold: f32,
    /// True accept rate at a false accept rate of 1e-3, over all pairs.
    pub tar_at_far_1e3: f64,
    /// The threshold giving that FAR.
    pub far_1e3_threshold: f32,
    /// Pairs with an image that failed detection (counted as errors).
    pub failed_pairs: usize,
}

/// Runs the 10-fold protocol over scored pairs.
pub fn evaluate(scored: &[Scored]) -> Report {
    let folds = scored
        .iter()
        .map(|p| p.fold)
        .max()
        .map(|m| m + 1)
        .unwrap_or(0);
    let mut fold_accuracies = Vec::new();
    let mut fold_thresholds = Vec::new();
    for fold in 0..folds {
        let train: Vec<&Scored> = scored.iter().filter(|p| p.fold != fold).collect();
        let test: Vec<&Scored> = scored.iter().filter(|p| p.fold == fold).collect();
        let t = best_threshold(&train);
        fold_thresholds.push(t);
        fold_accuracies.push(accuracy(&test, t));
    }
    let n = fold_accuracies.len().max(1) as f64;
    let mean = fold_accuracies.iter().sum::<f64>() / n;
    let std = (fold_accuracies
        .iter()
        .map(|a| (a - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let mut negatives: Vec<f32> = scored
        .iter()
        .filter(|p| !p.same)
        .filter_map(|p| p.score)
        .collect();
    negatives.sort_by(|a, b| b.total_cmp(a));
    let allowed = (negatives.len() as f64 * 1e-3).floor() as usize;
    let far_threshold = negatives.get(allowed).map(|s| s + 1e-6).unwrap_or(f32::MIN);
    let positives: Vec<&Scored> = scored.iter().filter(|p| p.same).collect();
    let tar = positives
        .iter()
        .filter(|p| matches!(p.score, Some(s) if s >= far_threshold))
        .count() as f64
        / positives.len().max(1) as f64;
    Report {
        mean_threshold: fold_thresholds.iter().sum::<f32>() / fold_thresholds.len().max(1) as f32,
        fold_accuracies,
        mean_accuracy: mean,
        std_accuracy: std,
        fold_thresholds,
        tar_at_far_1e3: tar,
        far_1e3_threshold: far_threshold,
        failed_pairs: scored.iter().filter(|p| p.score.is_none()).count(),
    }
}

/// Every image of an LFW tree (`root/Name/Name_NNNN.jpg`), as (person, path), in name order.
pub fn list_images(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut images = Vec::new();
    for person in std::fs::read_dir(root)? {
        let person = person?;
        if !person.file_type()?.is_dir() {
            continue;
        }
        let name = person.file_name().to_string_lossy().into_owned();
        for image in std::fs::read_dir(person.path())? {
            let path = image?.path();
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg"))
            {
                images.push((name.clone(), path));
            }
        }
    }
    images.sort();
    Ok(images)
}

/// One image's embedding, a line of the file `facepay-face embed-lfw` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedImage {
    /// The person (LFW's folder name).
    pub person: String,
    /// The image's file name.
    pub image: String,
    /// Its L2-normalised embedding.
    pub embedding: Vec<f32>,
}

/// First line of an embeddings file.
pub const EMBEDDINGS_HEADER: &str =
    "# facepay embeddings v1: person<TAB>image<TAB>comma-separated values";

/// The embeddings file: [`EMBEDDINGS_HEADER`], then one line per image. Floats are written in
/// their shortest exact form, so reading gives back the same values.
pub fn format_embeddings(rows: &[EmbeddedImage]) -> String {
    let mut out = String::from(EMBEDDINGS_HEADER);
    out.push('\n');
    for row in rows {
        let values: Vec<String> = row.embedding.iter().map(|v| v.to_string()).collect();
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            row.person,
            row.image,
            values.join(",")
        ));
    }
    out
}

/// Reads an embeddings file; every line must hold `dim` finite values.
pub fn parse_embeddings(text: &str, dim: usize) -> Result<Vec<EmbeddedImage>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header == EMBEDDINGS_HEADER => {}
        _ => {
            return Err(format!(
                "not an embeddings file: the first line is not {EMBEDDINGS_HEADER:?}"
            ))
        }
    }
    let mut rows = Vec::new();
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}", n + 1);
        let mut fields = line.split('\t');
        let (Some(person), Some(image), Some(values), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("expected person, image and values separated by tabs"));
        };
        let embedding = values
            .split(',')
            .map(|v| v.parse::<f32>().ok().filter(|v| v.is_finite()))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| bad("a value is not a finite number"))?;
        if embedding.len() != dim {
            return Err(bad(&format!("{} values, expected {dim}", embedding.len())));
        }
        rows.push(EmbeddedImage {
            person: person.to_string(),
            image: image.to_string(),
            embedding,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_files_read_back_exactly_and_bad_ones_are_named() {
        let rows = vec![
            EmbeddedImage {
                person: "Ada_Lovelace".into(),
                image: "Ada_Lovelace_0001.jpg".into(),
                embedding: vec![0.1, -0.25, 1.0 / 3.0],
            },
            EmbeddedImage {
                person: "Alan_Turing".into(),
                image: "Alan_Turing_0002.jpg".into(),
                embedding: vec![f32::MIN_POSITIVE, 0.0, -1.0],
            },
        ];
        let text = format_embeddings(&rows);
        assert_eq!(parse_embeddings(&text, 3).unwrap(), rows);
        assert!(parse_embeddings(&text, 4)
            .unwrap_err()
            .contains("3 values, expected 4"));
        assert!(parse_embeddings("person\timage\t1,2,3\n", 3)
            .unwrap_err()
            .contains("not an embeddings file"));
        let nan = format!("{EMBEDDINGS_HEADER}\na\tb\t1,NaN,3\n");
        assert!(parse_embeddings(&nan, 3).unwrap_err().contains("line 2"));
        let short = format!("{EMBEDDINGS_HEADER}\na\t1,2,3\n");
        assert!(parse_embeddings(&short, 3).unwrap_err().contains("tabs"));
    }

    #[test]
    fn lists_every_image_of_a_tree_by_person() {
        let dir = tempfile::tempdir().unwrap();
        for (person, image) in [
            ("B_b", "B_b_0001.jpg"),
            ("A_a", "A_a_0002.jpg"),
            ("A_a", "A_a_0001.jpg"),
        ] {
            std::fs::create_dir_all(dir.path().join(person)).unwrap();
            std::fs::write(dir.path().join(person).join(image), b"x").unwrap();
        }
        std::fs::write(dir.path().join("pairs.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("A_a").join("notes.txt"), b"x").unwrap();
        let listed: Vec<(String, String)> = list_images(dir.path())
            .unwrap()
            .into_iter()
            .map(|(p, path)| (p, path.file_name().unwrap().to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            listed,
            [
                ("A_a", "A_a_0001.jpg"),
                ("A_a", "A_a_0002.jpg"),
                ("B_b", "B_b_0001.jpg")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert!(list_images(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn parses_the_official_format() {
        let text = "1\t2\nA\t1\t2\nB\t1\t3\nA\t1\tC\t4\nB\t2\tD\t1\n";
        let pairs = parse_pairs(text, Path::new("/lfw")).unwrap();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[0].a, Path::new("/lfw/A/A_0001.jpg"));
        assert!(pairs[1].same && !pairs[2].same);
        assert_eq!(pairs[3].b, Path::new("/lfw/D/D_0001.jpg"));
        assert!(parse_pairs("1\t2\nA\t1\t2\n", Path::new("/")).is_err());
    }

    #[test]
    fn folds_pick_thresholds_and_failures_count_as_errors() {
        let mut scored = Vec::new();
        for fold in 0..10 {
            for i in 0..10 {
                scored.push(Scored {
                    score: Some(0.6 + i as f32 * 0.01),
                    same: true,
                    fold,
                });
                scored.push(Scored {
                    score: Some(0.1 + i as f32 * 0.01),
                    same: false,
                    fold,
                });
            }
        }
        let perfect = evaluate(&scored);
        assert_eq!(perfect.mean_accuracy, 1.0);
        assert!(perfect.mean_threshold > 0.19 && perfect.mean_threshold < 0.6);
        assert_eq!(perfect.tar_at_far_1e3, 1.0);
        scored[0].score = None;
        let one_failure = evaluate(&scored);
        assert_eq!(one_failure.failed_pairs, 1);
        assert!((one_failure.fold_accuracies[0] - 0.95).abs() < 1e-9);
    }
}
