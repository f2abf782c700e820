//! Image decoding by content, never by file name, with the size checked from the header before
//! any pixel is decoded, and EXIF orientation applied.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use crate::FaceError;

/// Largest accepted width or height.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Most memory the decoder may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// Decodes JPEG, PNG or WebP bytes into 8-bit RGB: grayscale is expanded, 16-bit reduced, alpha
/// dropped, CMYK converted, and the EXIF orientation applied.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, FaceError> {
    if bytes.is_empty() {
        return Err(FaceError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FaceError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP) => {}
        _ => return Err(FaceError::NotAnImage),
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_is_complete(bytes) {
        // Lenient JPEG decoders fill a truncated scan with grey instead of failing.
        return Err(FaceError::Corrupt(
            "truncated JPEG: no end-of-image marker after the last scan".into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut decoder = {
        let mut reader = reader;
        reader.no_limits();
        reader
            .into_decoder()
            .map_err(|e| FaceError::Corrupt(e.to_string()))?
    };
    let (width, height) = decoder.dimensions();
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(FaceError::TooLarge {
            width,
            height,
            max: MAX_IMAGE_SIDE,
        });
    }
    if width == 0 || height == 0 {
        return Err(FaceError::Corrupt("image has no pixels".into()));
    }
    decoder
        .set_limits(limits)
        .map_err(|e| FaceError::Corrupt(e.to_string()))?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| FaceError::Corrupt(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

/// Whether a JPEG has an end-of-image marker after its last start-of-scan. (An EXIF thumbnail has
/// its own scan and end marker early in the file, so the order matters, not mere presence.)
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_completeness() {
        assert!(jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3, 0xFF, 0xD9
        ]));
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
        // A thumbnail's end marker before the main scan does not count.
        assert!(!jpeg_is_complete(&[
            0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2
        ]));
    }
}
