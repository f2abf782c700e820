//! The face pipeline the edge (and cloud enrollment) runs, on tract-onnx:
//! decode -> detect (YuNet) -> pick the payer's face -> quality gates -> align (5-point similarity
//! to 112x112) -> liveness (two MiniFASNet models, fused) -> embed (SFace, L2-normalised).
//!
//! Models load once into a [`FaceEngine`], which is `Send + Sync`: share it in an `Arc` and call
//! it from as many threads as you like. Every call blocks for tens of milliseconds, so callers run
//! it on dedicated threads (the edge's face actor is a `SyncArbiter`), never on async handlers.

pub mod decode;
pub mod detect;
mod error;
pub mod geometry;
pub mod lfw;
pub mod models;
mod prelu;
pub mod worker;

use std::{path::Path, time::Instant};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

pub use detect::Detection;
pub use error::{FaceError, Refusal};

use crate::{
    detect::DetectorSettings,
    geometry::{crop_resize_nchw, Channels, Rect},
    models::{Plan, SizedPlans},
};

/// Environment variable prefix of `facepay-face`: `FACEPAY_FACE_MATCH_THRESHOLD=0.4`.
pub const ENV_PREFIX: &str = "FACEPAY_FACE_";

/// Every threshold of the pipeline; `configs/face.toml`, and the `[face]` section of a tier's
/// configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaceConfig {
    /// Cosine similarity at or above which two faces are the same person (OpenCV's SFace value).
    pub match_threshold: f32,
    /// Longest side of the detector's input in pixels; larger frames are scaled down.
    pub detector_input_max_side: u32,
    /// Minimum detector confidence, 0-1.
    pub detector_score_threshold: f32,
    /// Non-maximum suppression IoU.
    pub detector_nms_iou: f32,
    /// A second face at least this prominent (area x centrality) relative to the first makes the
    /// payer ambiguous.
    pub competing_face_ratio: f32,
    /// Smallest accepted face, shorter box side in pixels.
    pub min_face_px: f32,
    /// How far (fraction of the box side) a face box may extend past the frame border. A face
    /// cut by the border is found with a box that reaches the edge, so keep this small.
    pub border_tolerance: f32,
    /// Minimum variance of the Laplacian of the aligned face.
    pub min_sharpness: f32,
    /// Minimum mean luminance (0-255) of the aligned face.
    pub min_luminance: f32,
    /// Maximum mean luminance (0-255) of the aligned face.
    pub max_luminance: f32,
    /// Largest |nose offset from the eye midpoint| / eye distance (left-right turn).
    pub max_yaw_ratio: f32,
    /// Largest eye-line tilt in degrees.
    pub max_roll_degrees: f32,
    /// Accepted range of (nose - eyes) / (mouth - eyes) vertical ratio (up-down nod).
    pub pitch_ratio_range: [f32; 2],
    /// Fused probability of a live face at or above which the face counts as live.
    pub liveness_threshold: f32,
    /// The directory of the pinned model files; unset: the source tree's `shared/face/models`
    /// (a package installs them in `/usr/share/facepay-<tier>/models` and sets this).
    pub models_dir: Option<std::path::PathBuf>,
}

impl Default for FaceConfig {
    fn default() -> Self {
        FaceConfig {
            match_threshold: 0.363,
            detector_input_max_side: 320,
            detector_score_threshold: 0.6,
            detector_nms_iou: 0.3,
            competing_face_ratio: 0.6,
            min_face_px: 48.0,
            border_tolerance: 0.0,
            min_sharpness: 15.0,
            min_luminance: 40.0,
            max_luminance: 220.0,
            max_yaw_ratio: 0.45,
            max_roll_degrees: 30.0,
            pitch_ratio_range: [0.2, 0.85],
            liveness_threshold: 0.6,
            models_dir: None,
        }
    }
}

impl settings::Validate for FaceConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        FaceConfig::validate(self, "").map_err(|(k, v)| (k.trim_start_matches('.').to_owned(), v))
    }
}

impl FaceConfig {
    /// Checks ranges; the error names the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        let unit = |key: &str, v: f32| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err((
                    format!("{prefix}.{key}"),
                    format!("must be from 0 to 1, got {v}"),
                ))
            }
        };
        unit("detector_score_threshold", self.detector_score_threshold)?;
        unit("detector_nms_iou", self.detector_nms_iou)?;
        unit("competing_face_ratio", self.competing_face_ratio)?;
        unit("liveness_threshold", self.liveness_threshold)?;
        unit("border_tolerance", self.border_tolerance)?;
        if !(-1.0..=1.0).contains(&self.match_threshold) {
            return Err((
                format!("{prefix}.match_threshold"),
                "must be a cosine from -1 to 1".into(),
            ));
        }
        if !(64..=2048).contains(&self.detector_input_max_side) {
            return Err((
                format!("{prefix}.detector_input_max_side"),
                "must be from 64 to 2048 pixels".into(),
            ));
        }
        for (key, value, max) in [
            ("min_face_px", self.min_face_px, 4096.0),
            ("min_sharpness", self.min_sharpness, 1e6),
            ("max_yaw_ratio", self.max_yaw_ratio, 10.0),
            ("max_roll_degrees", self.max_roll_degrees, 180.0),
            ("min_luminance", self.min_luminance, 255.0),
            ("max_luminance", self.max_luminance, 255.0),
        ] {
            if !(0.0..=max).contains(&value) {
                return Err((
                    format!("{prefix}.{key}"),
                    format!("must be from 0 to {max}, got {value}"),
                ));
            }
        }
        if self.min_luminance >= self.max_luminance {
            return Err((
                format!("{prefix}.min_luminance"),
                "must be below max_luminance".into(),
            ));
        }
        if self.pitch_ratio_range[0] >= self.pitch_ratio_range[1] {
            return Err((
                format!("{prefix}.pitch_ratio_range"),
                "must be [low, high] with low < high".into(),
            ));
        }
        Ok(())
    }
}

/// What a call should check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gates {
    /// Everything: ambiguity, quality and liveness gates (payment, enrollment).
    All,
    /// Only find the most prominent face and embed it (benchmarks, comparing photos).
    EmbedOnly,
}

/// The quality measurements of the chosen face.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quality {
    /// Shorter side of the face box, pixels.
    pub face_px: f32,
    /// Mean luminance of the aligned face, 0-255.
    pub luminance: f32,
    /// Laplacian variance of the aligned face.
    pub sharpness: f32,
    /// Nose offset from the eye midpoint over the eye distance.
    pub yaw_ratio: f32,
    /// Eye-line tilt, degrees.
    pub roll_degrees: f32,
    /// (nose - eyes) / (mouth - eyes), vertically.
    pub pitch_ratio: f32,
}

/// Liveness scores: probability of a live face from each model and fused.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Liveness {
    /// MiniFASNetV2 (crop x2.7).
    pub v2: f32,
    /// MiniFASNetV1SE (crop x4.0).
    pub v1se: f32,
    /// Their mean.
    pub fused: f32,
}

/// Time spent in each stage, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Decoding the file.
    pub decode_ms: f64,
    /// Detection.
    pub detect_ms: f64,
    /// Alignment and quality measures.
    pub align_ms: f64,
    /// Both liveness models.
    pub liveness_ms: f64,
    /// Embedding.
    pub embed_ms: f64,
}

/// Everything the pipeline found out about one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaceAnalysis {
    /// Image width after orientation.
    pub width: u32,
    /// Image height after orientation.
    pub height: u32,
    /// How many faces the detector found.
    pub faces_found: usize,
    /// The chosen face.
    pub face: Option<Detection>,
    /// Its quality measurements.
    pub quality: Option<Quality>,
    /// Its liveness scores.
    pub liveness: Option<Liveness>,
    /// The L2-normalised 128-d embedding, when no gate refused the face.
    pub embedding: Option<Vec<f32>>,
    /// Why the face was refused, if it was.
    pub refusal: Option<Refusal>,
    /// Stage timings.
    pub timings: Timings,
}

/// The loaded models and the thresholds; share it in an `Arc`.
pub struct FaceEngine {
    config: FaceConfig,
    yunet: SizedPlans,
    sface: Plan,
    fas_v2: Plan,
    fas_v1se: Plan,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn run_single(
    plan: &Plan,
    shape: [usize; 4],
    data: &[f32],
    what: &str,
) -> Result<Vec<f32>, FaceError> {
    let input = Tensor::from_shape(&shape, data).map_err(|e| FaceError::Model(e.to_string()))?;
    let out = plan
        .run(tvec!(input.into()))
        .map_err(|e| FaceError::Model(format!("{what}: {e:#}")))?;
    Ok(out[0]
        .to_plain_array_view::<f32>()
        .map_err(|e| FaceError::Model(e.to_string()))?
        .iter()
        .copied()
        .collect())
}

fn softmax_real(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
    exp[1] / exp.iter().sum::<f32>()
}

/// Cosine similarity of two L2-normalised embeddings.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The liveness crop of Silent-Face-Anti-Spoofing: the face box scaled by `scale` around its
/// centre, shrunk to fit the image, then shifted inside it.
fn liveness_crop(width: u32, height: u32, face: &Detection, scale: f32) -> Rect {
    let (src_w, src_h) = (width as f32, height as f32);
    let (bw, bh) = (face.w.max(1.0), face.h.max(1.0));
    let scale = scale.min((src_h - 1.0) / bh).min((src_w - 1.0) / bw);
    let (nw, nh) = (bw * scale, bh * scale);
    let (cx, cy) = (face.x + bw / 2.0, face.y + bh / 2.0);
    let (mut x1, mut y1, mut x2, mut y2) =
        (cx - nw / 2.0, cy - nh / 2.0, cx + nw / 2.0, cy + nh / 2.0);
    if x1 < 0.0 {
        x2 -= x1;
        x1 = 0.0;
    }
    if y1 < 0.0 {
        y2 -= y1;
        y1 = 0.0;
    }
    if x2 > src_w - 1.0 {
        x1 -= x2 - src_w + 1.0;
        x2 = src_w - 1.0;
    }
    if y2 > src_h - 1.0 {
        y1 -= y2 - src_h + 1.0;
        y2 = src_h - 1.0;
    }
    let (x1, y1, x2, y2) = (
        x1.max(0.0).floor(),
        y1.max(0.0).floor(),
        x2.floor(),
        y2.floor(),
    );
    Rect {
        x: x1,
        y: y1,
        w: x2 - x1 + 1.0,
        h: y2 - y1 + 1.0,
    }
}

/// Prominence of a face for picking the payer: its area weighted by how central it is.
fn prominence(face: &Detection, width: u32, height: u32) -> f32 {
    let (cx, cy) = (face.x + face.w / 2.0, face.y + face.h / 2.0);
    let (mx, my) = (width as f32 / 2.0, height as f32 / 2.0);
    let half_diagonal = (mx * mx + my * my).sqrt().max(1.0);
    let off = ((cx - mx).powi(2) + (cy - my).powi(2)).sqrt() / half_diagonal;
    face.w.max(0.0) * face.h.max(0.0) * (1.0 - off.min(1.0))
}

fn pose(face: &Detection) -> (f32, f32, f32) {
    let [e0, e1, nose, m0, m1] = face.landmarks;
    let eye_mid = [(e0[0] + e1[0]) / 2.0, (e0[1] + e1[1]) / 2.0];
    let mouth_mid = [(m0[0] + m1[0]) / 2.0, (m0[1] + m1[1]) / 2.0];
    let eye_dist = ((e1[0] - e0[0]).powi(2) + (e1[1] - e0[1]).powi(2))
        .sqrt()
        .max(1e-3);
    let roll = (e1[1] - e0[1]).atan2(e1[0] - e0[0]).to_degrees();
    // Measure yaw along the eye line and pitch across it, so that a tilted head is not a turned one.
    let (ux, uy) = ((e1[0] - e0[0]) / eye_dist, (e1[1] - e0[1]) / eye_dist);
    let yaw = ((nose[0] - eye_mid[0]) * ux + (nose[1] - eye_mid[1]) * uy) / eye_dist;
    let across = |p: [f32; 2]| (p[0] - eye_mid[0]) * -uy + (p[1] - eye_mid[1]) * ux;
    let pitch = across(nose) / across(mouth_mid).abs().max(1e-3);
    (yaw, roll, pitch)
}

fn plausible(face: &Detection) -> bool {
    let [e0, e1, nose, m0, m1] = face.landmarks;
    let margin_x = face.w * 0.25;
    let margin_y = face.h * 0.25;
    let inside = face.landmarks.iter().all(|p| {
        p[0] >= face.x - margin_x
            && p[0] <= face.x + face.w + margin_x
            && p[1] >= face.y - margin_y
            && p[1] <= face.y + face.h + margin_y
    });
    let eye_dist = ((e1[0] - e0[0]).powi(2) + (e1[1] - e0[1]).powi(2)).sqrt();
    let eyes_y = (e0[1] + e1[1]) / 2.0;
    let mouth_y = (m0[1] + m1[1]) / 2.0;
    inside
        && e0[0] < e1[0]
        && m0[0] < m1[0]
        && eyes_y < nose[1]
        && nose[1] < mouth_y
        && (0.15..=0.8).contains(&(eye_dist / face.w.max(1.0)))
}

impl FaceEngine {
    /// Loads the models from `dir`, checking each file's SHA-256.
    pub fn load(dir: &Path, config: FaceConfig) -> Result<Self, FaceError> {
        let yunet = SizedPlans::new(&models::read_checked(dir, models::YUNET)?)?;
        let sface =
            models::load_plan(&models::read_checked(dir, models::SFACE)?, [1, 3, 112, 112])?;
        let fas_v2 =
            models::load_plan(&models::read_checked(dir, models::FAS_V2)?, [1, 3, 80, 80])?;
        let fas_v1se = models::load_plan(
            &models::read_checked(dir, models::FAS_V1SE)?,
            [1, 3, 80, 80],
        )?;
        Ok(FaceEngine {
            config,
            yunet,
            sface,
            fas_v2,
            fas_v1se,
        })
    }

    /// Loads the pinned models from `config.models_dir`, or the ones vendored in this crate.
    pub fn load_default(config: FaceConfig) -> Result<Self, FaceError> {
        let dir = config
            .models_dir
            .clone()
            .unwrap_or_else(models::default_models_dir);
        Self::load(&dir, config)
    }

    /// The thresholds in use.
    pub fn config(&self) -> &FaceConfig {
        &self.config
    }

    /// Whether a cosine similarity means "same person".
    pub fn is_match(&self, cosine: f32) -> bool {
        cosine >= self.config.match_threshold
    }

    /// Decodes image bytes and analyses them.
    pub fn analyze(&self, bytes: &[u8], gates: Gates) -> Result<FaceAnalysis, FaceError> {
        let started = Instant::now();
        let img = decode::decode_rgb(bytes)?;
        let mut analysis = self.analyze_image(&img, gates)?;
        analysis.timings.decode_ms = ms(started)
            - analysis.timings.detect_ms
            - analysis.timings.align_ms
            - analysis.timings.liveness_ms
            - analysis.timings.embed_ms;
        Ok(analysis)
    }

    /// All detections in an image, best first.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<Detection>, FaceError> {
        detect::detect(
            &self.yunet,
            img,
            DetectorSettings {
                input_max_side: self.config.detector_input_max_side,
                score_threshold: self.config.detector_score_threshold,
                nms_iou: self.config.detector_nms_iou,
            },
        )
    }

    /// Liveness scores of a face in an image.
    pub fn liveness(&self, img: &RgbImage, face: &Detection) -> Result<Liveness, FaceError> {
        let mut scores = [0f32; 2];
        for (i, (plan, scale)) in [(&self.fas_v2, 2.7), (&self.fas_v1se, 4.0)]
            .into_iter()
            .enumerate()
        {
            let crop = liveness_crop(img.width(), img.height(), face, scale);
            let data = crop_resize_nchw(img, crop, 80, 80, 80, 80, Channels::Bgr);
            scores[i] = softmax_real(&run_single(plan, [1, 3, 80, 80], &data, "minifasnet")?);
        }
        Ok(Liveness {
            v2: scores[0],
            v1se: scores[1],
            fused: (scores[0] + scores[1]) / 2.0,
        })
    }

    /// The L2-normalised embedding of an aligned 112x112 face.
    pub fn embed_aligned(&self, aligned: &RgbImage) -> Result<Vec<f32>, FaceError> {
        let data = geometry::image_nchw(aligned, Channels::Rgb);
        let mut v = run_single(&self.sface, [1, 3, 112, 112], &data, "sface")?;
        let norm = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::EPSILON);
        v.iter_mut().for_each(|x| *x /= norm);
        Ok(v)
    }

    /// Runs the pipeline on a decoded image.
    pub fn analyze_image(&self, img: &RgbImage, gates: Gates) -> Result<FaceAnalysis, FaceError> {
        let c = &self.config;
        let mut a = FaceAnalysis {
            width: img.width(),
            height: img.height(),
            faces_found: 0,
            face: None,
            quality: None,
            liveness: None,
            embedding: None,
            refusal: None,
            timings: Timings::default(),
        };
        let t = Instant::now();
        let mut faces = self.detect(img)?;
        a.timings.detect_ms = ms(t);
        a.faces_found = faces.len();
        faces.sort_by(|x, y| {
            prominence(y, img.width(), img.height()).total_cmp(&prominence(
                x,
                img.width(),
                img.height(),
            ))
        });
        let Some(face) = faces.first().cloned() else {
            a.refusal = Some(Refusal::NoFace);
            return Ok(a);
        };
        a.face = Some(face.clone());
        let refuse = |mut a: FaceAnalysis, r: Refusal| {
            a.refusal = Some(r);
            Ok(a)
        };
        let all = gates == Gates::All;
        if all {
            if let Some(second) = faces.get(1) {
                let (p1, p2) = (
                    prominence(&face, img.width(), img.height()),
                    prominence(second, img.width(), img.height()),
                );
                if p2 >= c.competing_face_ratio * p1 {
                    return refuse(a, Refusal::MultipleFaces);
                }
            }
        }
        let t = Instant::now();
        let aligned = geometry::align(img, &face.landmarks);
        let (luminance, sharpness) = geometry::luminance_and_sharpness(&aligned);
        let (yaw, roll, pitch) = pose(&face);
        a.quality = Some(Quality {
            face_px: face.w.min(face.h),
            luminance,
            sharpness,
            yaw_ratio: yaw,
            roll_degrees: roll,
            pitch_ratio: pitch,
        });
        a.timings.align_ms = ms(t);
        if all {
            let tol_x = face.w * c.border_tolerance;
            let tol_y = face.h * c.border_tolerance;
            let refusal = if face.w.min(face.h) < c.min_face_px {
                Some(Refusal::FaceTooSmall)
            } else if face.x < -tol_x
                || face.y < -tol_y
                || face.x + face.w > img.width() as f32 + tol_x
                || face.y + face.h > img.height() as f32 + tol_y
            {
                Some(Refusal::FaceCutByBorder)
            } else if !plausible(&face) {
                Some(Refusal::ImplausibleLandmarks)
            } else if yaw.abs() > c.max_yaw_ratio
                || roll.abs() > c.max_roll_degrees
                || !(c.pitch_ratio_range[0]..=c.pitch_ratio_range[1]).contains(&pitch)
            {
                Some(Refusal::HeadTurned)
            } else if luminance < c.min_luminance {
                Some(Refusal::TooDark)
            } else if luminance > c.max_luminance {
                Some(Refusal::TooBright)
            } else if sharpness < c.min_sharpness {
                Some(Refusal::TooBlurred)
            } else {
                None
            };
            if let Some(r) = refusal {
                return refuse(a, r);
            }
            let t = Instant::now();
            let liveness = self.liveness(img, &face)?;
            a.timings.liveness_ms = ms(t);
            let live = liveness.fused >= c.liveness_threshold;
            a.liveness = Some(liveness);
            if !live {
                return refuse(a, Refusal::NotLive);
            }
        }
        let t = Instant::now();
        a.embedding = Some(self.embed_aligned(&aligned)?);
        a.timings.embed_ms = ms(t);
        Ok(a)
    }
}

// The engine is shared across threads; keep that a compile-time fact.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<FaceEngine>();
};
