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
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut decoder = {
        let mut reader = reader;
        reader.no_limits();
        reader.into_decoder().map_err(|e| FaceError::Corrupt(e.to_string()))?
    };
    let (width, height) = decoder.dimensions();
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(FaceError::TooLarge { width, height, max: MAX_IMAGE_SIDE });
    }
    if width == 0 || height == 0 {
        return Err(FaceError::Corrupt("image has no pixels".into()));
    }
    decoder.set_limits(limits).map_err(|e| FaceError::Corrupt(e.to_string()))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| FaceError::Corrupt(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}
