//! YuNet face detection: resize to the detector's input, run, decode the three strides as
//! OpenCV's FaceDetectorYN does, and suppress overlapping boxes.

use image::RgbImage;
use serde::Serialize;
use tract_onnx::prelude::*;

use crate::{
    geometry::{crop_resize_nchw, Channels, Rect},
    models::SizedPlans,
    FaceError,
};

/// A detected face in the original image's pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// Bounding box left.
    pub x: f32,
    /// Bounding box top.
    pub y: f32,
    /// Bounding box width.
    pub w: f32,
    /// Bounding box height.
    pub h: f32,
    /// Right eye, left eye, nose tip, right and left mouth corners (as YuNet orders them).
    pub landmarks: [[f32; 2]; 5],
    /// Detector confidence, 0-1.
    pub score: f32,
}

impl Detection {
    fn area(&self) -> f32 {
        self.w.max(0.0) * self.h.max(0.0)
    }

    fn iou(&self, other: &Detection) -> f32 {
        let x1 = self.x.max(other.x);
        let y1 = self.y.max(other.y);
        let x2 = (self.x + self.w).min(other.x + other.w);
        let y2 = (self.y + self.h).min(other.y + other.h);
        let inter = (x2 - x1).max(0.0) * (y2 - y1).max(0.0);
        inter / (self.area() + other.area() - inter).max(f32::EPSILON)
    }
}

/// Detector settings.
#[derive(Debug, Clone, Copy)]
pub struct DetectorSettings {
    /// Longest side of the detector's input; larger frames are scaled down (never up).
    pub input_max_side: u32,
    /// Minimum confidence.
    pub score_threshold: f32,
    /// Boxes overlapping a better one by more than this IoU are dropped.
    pub nms_iou: f32,
}

const STRIDES: [usize; 3] = [8, 16, 32];

/// The detector's input for a frame: the frame scaled to `in_w` x `in_h`, then padded with zeros
/// (right and bottom) to `pad_w` x `pad_h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSize {
    /// The scaled frame's width.
    pub in_w: usize,
    /// The scaled frame's height.
    pub in_h: usize,
    /// The input's width.
    pub pad_w: usize,
    /// The input's height.
    pub pad_h: usize,
}

/// The frame's longest side scaled to `max_side` (never up), padded to a multiple of 32 (the
/// largest stride). A portrait frame is also padded as wide as it is tall: tract walks a
/// depthwise convolution along its longest axis, and only along the rows is that walk
/// vectorised, so YuNet ran 1.9x slower on a portrait input than on the same frame's landscape
/// one (20 depthwise convolutions: 5.2 ms against 1.4). The square input costs a quarter more
/// arithmetic and runs faster.
pub fn input_size(width: u32, height: u32, max_side: u32) -> InputSize {
    let (w, h) = (width as f32, height as f32);
    let scale = (max_side as f32 / w.max(h)).min(1.0);
    let in_w = ((w * scale).round() as usize).max(1);
    let in_h = ((h * scale).round() as usize).max(1);
    let pad_h = in_h.div_ceil(32) * 32;
    let pad_w = (in_w.div_ceil(32) * 32).max(pad_h);
    InputSize {
        in_w,
        in_h,
        pad_w,
        pad_h,
    }
}

/// Runs YuNet on an image and returns faces, best first.
pub fn detect(
    plans: &SizedPlans,
    img: &RgbImage,
    settings: DetectorSettings,
) -> Result<Vec<Detection>, FaceError> {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let InputSize {
        in_w,
        in_h,
        pad_w,
        pad_h,
    } = input_size(img.width(), img.height(), settings.input_max_side);
    let data = crop_resize_nchw(
        img,
        Rect {
            x: 0.0,
            y: 0.0,
            w,
            h,
        },
        in_w,
        in_h,
        pad_w,
        pad_h,
        Channels::Bgr,
    );
    let input = Tensor::from_shape(&[1, 3, pad_h, pad_w], &data)
        .map_err(|e| FaceError::Model(e.to_string()))?;
    let plan = plans.plan([1, 3, pad_h, pad_w])?;
    let outputs = plan
        .run(tvec!(input.into()))
        .map_err(|e| FaceError::Model(format!("yunet: {e:#}")))?;
    let view = |i: usize| -> Result<Vec<f32>, FaceError> {
        Ok(outputs[i]
            .to_plain_array_view::<f32>()
            .map_err(|e| FaceError::Model(e.to_string()))?
            .iter()
            .copied()
            .collect())
    };
    // Sx = (x_in + 0.5) * sx... the input was resized by `scale` in each axis.
    let (sx, sy) = (w / in_w as f32, h / in_h as f32);
    let mut faces = Vec::new();
    for (k, stride) in STRIDES.iter().enumerate() {
        let cols = pad_w / stride;
        let rows = pad_h / stride;
        let (cls, obj, bbox, kps) = (view(k)?, view(3 + k)?, view(6 + k)?, view(9 + k)?);
        for r in 0..rows {
            for c in 0..cols {
                let i = r * cols + c;
                let score = (cls[i].clamp(0.0, 1.0) * obj[i].clamp(0.0, 1.0)).sqrt();
                if score < settings.score_threshold {
                    continue;
                }
                let s = *stride as f32;
                let cx = (c as f32 + bbox[i * 4]) * s;
                let cy = (r as f32 + bbox[i * 4 + 1]) * s;
                let bw = bbox[i * 4 + 2].exp() * s;
                let bh = bbox[i * 4 + 3].exp() * s;
                let mut landmarks = [[0f32; 2]; 5];
                for (n, point) in landmarks.iter_mut().enumerate() {
                    point[0] = (kps[i * 10 + 2 * n] + c as f32) * s * sx;
                    point[1] = (kps[i * 10 + 2 * n + 1] + r as f32) * s * sy;
                }
                faces.push(Detection {
                    x: (cx - bw / 2.0) * sx,
                    y: (cy - bh / 2.0) * sy,
                    w: bw * sx,
                    h: bh * sy,
                    landmarks,
                    score,
                });
            }
        }
    }
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for face in faces {
        if kept.iter().all(|k| k.iou(&face) <= settings.nms_iou) {
            kept.push(face);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detector_input_is_never_taller_than_wide() {
        // Landscape: the longest side at 320, each side padded to a multiple of 32.
        let landscape = input_size(640, 480, 320);
        assert_eq!((landscape.in_w, landscape.in_h), (320, 240));
        assert_eq!((landscape.pad_w, landscape.pad_h), (320, 256));
        // Portrait: the same scaling, padded as wide as tall.
        let portrait = input_size(480, 640, 320);
        assert_eq!((portrait.in_w, portrait.in_h), (240, 320));
        assert_eq!((portrait.pad_w, portrait.pad_h), (320, 320));
        // Small frames are not scaled up.
        let small = input_size(100, 60, 320);
        assert_eq!(
            (small.in_w, small.in_h, small.pad_w, small.pad_h),
            (100, 60, 128, 64)
        );
    }
}
