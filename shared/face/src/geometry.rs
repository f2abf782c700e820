//! Pixel geometry: bilinear sampling (OpenCV's INTER_LINEAR conventions), crop-and-resize into
//! model input tensors, and the 5-point similarity alignment.

use image::{Rgb, RgbImage};

/// The ArcFace 112x112 landmark template: eyes, nose tip, mouth corners.
pub const ARCFACE_TEMPLATE: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Side of the aligned face.
pub const ALIGNED_SIDE: u32 = 112;

/// Channel order of a model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (OpenCV's order).
    Bgr,
}

/// Samples with clamped coordinates (replicated border), as `cv2.resize` does.
fn sample_clamped(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let max_x = (img.width() - 1) as f32;
    let max_y = (img.height() - 1) as f32;
    let x = x.clamp(0.0, max_x);
    let y = y.clamp(0.0, max_y);
    let x0 = x.floor();
    let y0 = y.floor();
    let (fx, fy) = (x - x0, y - y0);
    let (x0, y0) = (x0 as u32, y0 as u32);
    let x1 = (x0 + 1).min(img.width() - 1);
    let y1 = (y0 + 1).min(img.height() - 1);
    let p = |x: u32, y: u32| img.get_pixel(x, y).0;
    let (a, b, c, d) = (p(x0, y0), p(x1, y0), p(x0, y1), p(x1, y1));
    let mut out = [0f32; 3];
    for ch in 0..3 {
        let top = a[ch] as f32 * (1.0 - fx) + b[ch] as f32 * fx;
        let bottom = c[ch] as f32 * (1.0 - fx) + d[ch] as f32 * fx;
        out[ch] = top * (1.0 - fy) + bottom * fy;
    }
    out
}

/// Samples with a black border outside the image, as `cv2.warpAffine` does by default.
fn sample_black_border(img: &RgbImage, x: f32, y: f32) -> [f32; 3] {
    let x0 = x.floor();
    let y0 = y.floor();
    let (fx, fy) = (x - x0, y - y0);
    let (w, h) = (img.width() as i64, img.height() as i64);
    let p = |x: i64, y: i64| -> [f32; 3] {
        if x < 0 || y < 0 || x >= w || y >= h {
            [0.0; 3]
        } else {
            let px = img.get_pixel(x as u32, y as u32).0;
            [px[0] as f32, px[1] as f32, px[2] as f32]
        }
    };
    let (x0, y0) = (x0 as i64, y0 as i64);
    let (a, b, c, d) = (p(x0, y0), p(x0 + 1, y0), p(x0, y0 + 1), p(x0 + 1, y0 + 1));
    let mut out = [0f32; 3];
    for ch in 0..3 {
        let top = a[ch] * (1.0 - fx) + b[ch] * fx;
        let bottom = c[ch] * (1.0 - fx) + d[ch] * fx;
        out[ch] = top * (1.0 - fy) + bottom * fy;
    }
    out
}

/// A rectangle in pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    /// Left.
    pub x: f32,
    /// Top.
    pub y: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
}

/// Resizes the region `src` of `img` to `out_w` x `out_h` into an NCHW float tensor (0-255),
/// writing the region's pixels at the top-left of a `pad_w` x `pad_h` canvas (zeros elsewhere).
pub fn crop_resize_nchw(
    img: &RgbImage,
    src: Rect,
    out_w: usize,
    out_h: usize,
    pad_w: usize,
    pad_h: usize,
    channels: Channels,
) -> Vec<f32> {
    let plane = pad_w * pad_h;
    let mut data = vec![0f32; 3 * plane];
    let sx = src.w / out_w as f32;
    let sy = src.h / out_h as f32;
    for oy in 0..out_h {
        let y = src.y + (oy as f32 + 0.5) * sy - 0.5;
        for ox in 0..out_w {
            let x = src.x + (ox as f32 + 0.5) * sx - 0.5;
            let px = sample_clamped(img, x, y);
            let i = oy * pad_w + ox;
            match channels {
                Channels::Rgb => {
                    data[i] = px[0];
                    data[plane + i] = px[1];
                    data[2 * plane + i] = px[2];
                }
                Channels::Bgr => {
                    data[i] = px[2];
                    data[plane + i] = px[1];
                    data[2 * plane + i] = px[0];
                }
            }
        }
    }
    data
}

/// An RGB image as an NCHW float tensor (0-255).
pub fn image_nchw(img: &RgbImage, channels: Channels) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    crop_resize_nchw(
        img,
        Rect {
            x: 0.0,
            y: 0.0,
            w: w as f32,
            h: h as f32,
        },
        w,
        h,
        w,
        h,
        channels,
    )
}

/// The least-squares similarity transform (rotation, uniform scale, translation, no reflection)
/// taking `src` points onto `dst`, as `[a, -b, tx; b, a, ty]` in row-major `[a, b, tx, ty]` form.
pub fn similarity(src: &[[f32; 2]; 5], dst: &[[f32; 2]; 5]) -> [f32; 4] {
    let mean = |p: &[[f32; 2]; 5]| {
        let (sx, sy) = p.iter().fold((0.0, 0.0), |(x, y), q| (x + q[0], y + q[1]));
        [sx / 5.0, sy / 5.0]
    };
    let (ms, md) = (mean(src), mean(dst));
    let (mut dot, mut cross, mut norm) = (0f32, 0f32, 0f32);
    for (s, d) in src.iter().zip(dst) {
        let (sx, sy) = (s[0] - ms[0], s[1] - ms[1]);
        let (dx, dy) = (d[0] - md[0], d[1] - md[1]);
        dot += sx * dx + sy * dy;
        cross += sx * dy - sy * dx;
        norm += sx * sx + sy * sy;
    }
    let norm = norm.max(f32::EPSILON);
    let (a, b) = (dot / norm, cross / norm);
    let tx = md[0] - (a * ms[0] - b * ms[1]);
    let ty = md[1] - (b * ms[0] + a * ms[1]);
    [a, b, tx, ty]
}

/// Warps `img` so that `landmarks` land on the ArcFace template, into a 112x112 face.
pub fn align(img: &RgbImage, landmarks: &[[f32; 2]; 5]) -> RgbImage {
    let [a, b, tx, ty] = similarity(landmarks, &ARCFACE_TEMPLATE);
    // Invert [a -b; b a] for the destination -> source mapping.
    let det = (a * a + b * b).max(f32::EPSILON);
    let (ia, ib) = (a / det, -b / det);
    RgbImage::from_fn(ALIGNED_SIDE, ALIGNED_SIDE, |u, v| {
        let (du, dv) = (u as f32 - tx, v as f32 - ty);
        let x = ia * du - ib * dv;
        let y = ib * du + ia * dv;
        let p = sample_black_border(img, x, y);
        Rgb([p[0].round() as u8, p[1].round() as u8, p[2].round() as u8])
    })
}

/// Mean luminance (0-255) and variance of the 4-neighbour Laplacian of an image's gray levels:
/// the classic focus measure, low when blurred.
pub fn luminance_and_sharpness(img: &RgbImage) -> (f32, f32) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let gray: Vec<f32> = img
        .pixels()
        .map(|p| 0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32)
        .collect();
    let mean = gray.iter().sum::<f32>() / gray.len().max(1) as f32;
    let mut lap = Vec::with_capacity(w * h);
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let c = gray[y * w + x];
            lap.push(
                gray[y * w + x - 1]
                    + gray[y * w + x + 1]
                    + gray[(y - 1) * w + x]
                    + gray[(y + 1) * w + x]
                    - 4.0 * c,
            );
        }
    }
    let n = lap.len().max(1) as f32;
    let lap_mean = lap.iter().sum::<f32>() / n;
    let var = lap
        .iter()
        .map(|v| (v - lap_mean) * (v - lap_mean))
        .sum::<f32>()
        / n;
    (mean, var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_recovers_a_known_transform() {
        // Scale 2, rotate 90 degrees, shift (5, -3).
        let src = ARCFACE_TEMPLATE;
        let dst = src.map(|[x, y]| [-2.0 * y + 5.0, 2.0 * x - 3.0]);
        let [a, b, tx, ty] = similarity(&src, &dst);
        assert!((a - 0.0).abs() < 1e-3 && (b - 2.0).abs() < 1e-3, "{a} {b}");
        assert!(
            (tx - 5.0).abs() < 1e-2 && (ty + 3.0).abs() < 1e-2,
            "{tx} {ty}"
        );
    }

    #[test]
    fn align_puts_landmarks_on_the_template() {
        // A synthetic image with bright dots at "landmarks" twice the template's scale.
        let landmarks = ARCFACE_TEMPLATE.map(|[x, y]| [x * 2.0 + 10.0, y * 2.0 + 20.0]);
        let mut img = RgbImage::new(300, 300);
        for [x, y] in landmarks {
            for dy in -2i32..=2 {
                for dx in -2i32..=2 {
                    img.put_pixel(
                        (x as i32 + dx) as u32,
                        (y as i32 + dy) as u32,
                        Rgb([255, 255, 255]),
                    );
                }
            }
        }
        let face = align(&img, &landmarks);
        for [x, y] in ARCFACE_TEMPLATE {
            assert!(
                face.get_pixel(x.round() as u32, y.round() as u32).0[0] > 200,
                "dot at {x},{y}"
            );
        }
    }

    #[test]
    fn blur_lowers_sharpness() {
        let sharp = RgbImage::from_fn(64, 64, |x, y| {
            if (x / 4 + y / 4) % 2 == 0 {
                Rgb([255; 3])
            } else {
                Rgb([0; 3])
            }
        });
        let flat = RgbImage::from_pixel(64, 64, Rgb([128; 3]));
        let (mean, s) = luminance_and_sharpness(&sharp);
        assert!((mean - 127.5).abs() < 5.0);
        assert!(s > 1000.0);
        assert_eq!(luminance_and_sharpness(&flat).1, 0.0);
    }
}
