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

#[cfg(test)]
mod tests {
    use super::*;

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
