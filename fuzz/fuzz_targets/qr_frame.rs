//! A camera frame as the terminal reads it: any file in its spool, decoded by content (JPEG, PNG
//! or WebP, size checked from the header), then searched for QR payment codes, each parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = face::decode::decode_rgb(data) else {
        return;
    };
    let gray = image::DynamicImage::ImageRgb8(frame).to_luma8();
    for text in paycode::qr::decode(&gray) {
        let _ = paycode::SignedCode::parse(&text);
    }
});
