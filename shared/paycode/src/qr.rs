//! QR rendering (the phone's screen) and decoding (the terminal's scanner) of payment codes.

use std::path::Path;

use image::{GrayImage, Luma};
use qrcode::{render::unicode, EcLevel, QrCode};

/// Pixels per QR module in rendered PNGs.
const MODULE_PIXELS: u32 = 8;
/// Quiet-zone modules around the code, as the QR standard asks.
const QUIET_ZONE_MODULES: u32 = 4;

fn encode(text: &str) -> anyhow::Result<QrCode> {
    Ok(QrCode::with_error_correction_level(
        text.as_bytes(),
        EcLevel::M,
    )?)
}

/// Renders text as a black-on-white QR image.
pub fn render_image(text: &str) -> anyhow::Result<GrayImage> {
    let code = encode(text)?;
    let width = code.width() as u32;
    let side = (width + 2 * QUIET_ZONE_MODULES) * MODULE_PIXELS;
    let colors = code.to_colors();
    Ok(GrayImage::from_fn(side, side, |x, y| {
        let mx = (x / MODULE_PIXELS).checked_sub(QUIET_ZONE_MODULES);
        let my = (y / MODULE_PIXELS).checked_sub(QUIET_ZONE_MODULES);
        let dark = match (mx, my) {
            (Some(mx), Some(my)) if mx < width && my < width => {
                colors[(my * width + mx) as usize] == qrcode::Color::Dark
            }
            _ => false,
        };
        Luma([if dark { 0 } else { 255 }])
    }))
}

/// Renders text as a QR code PNG file.
pub fn render_png(text: &str, path: &Path) -> anyhow::Result<()> {
    render_image(text)?.save_with_format(path, image::ImageFormat::Png)?;
    Ok(())
}

/// Renders text as a QR code in Unicode half blocks for a terminal.
pub fn render_terminal(text: &str) -> anyhow::Result<String> {
    Ok(encode(text)?
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .build())
}

/// Finds and decodes every QR code in a grayscale frame. Grids that are found but cannot be read
/// are skipped: a frame that shows half a code is simply a frame without a code.
pub fn decode(frame: &GrayImage) -> Vec<String> {
    let mut prepared = rqrr::PreparedImage::prepare_from_greyscale(
        frame.width() as usize,
        frame.height() as usize,
        |x, y| frame.get_pixel(x as u32, y as u32).0[0],
    );
    prepared
        .detect_grids()
        .into_iter()
        .filter_map(|grid| grid.decode().ok().map(|(_, content)| content))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SignedCode, Wallet};

    #[test]
    fn rendered_code_decodes_back() {
        let w = Wallet::generate("carol").unwrap();
        let text = w.issue_code(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("code.png");
        render_png(&text, &path).unwrap();
        let frame = image::open(&path).unwrap().to_luma8();
        assert_eq!(decode(&frame), vec![text.clone()]);
        assert_eq!(
            SignedCode::parse(&decode(&frame)[0]).unwrap().account_id,
            "carol"
        );
        assert!(render_terminal(&text).unwrap().lines().count() > 10);
    }

    #[test]
    fn blank_frame_has_no_code() {
        let frame = GrayImage::from_pixel(200, 200, Luma([255]));
        assert!(decode(&frame).is_empty());
    }
}
