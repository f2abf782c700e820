//! USB (UVC) cameras through V4L2: MJPEG or YUYV frames at a set resolution and rate, streamed
//! through memory-mapped buffers. The stream runs from the first session on; a session drops
//! the frames the driver holds from before it. An unplugged camera is reported, and opened
//! again by the next session.

use std::{
    os::fd::AsFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use image::RgbImage;
use linuxvideo::{
    format::{PixFormat, PixelFormat},
    stream::ReadStream,
    CapabilityFlags, Device, Fract,
};
use serde::{Deserialize, Serialize};

use crate::{
    error::SourceError,
    frames::{wait_readable, FrameSource, Next, StallWatch, MAX_FRAME_BYTES},
};

/// The pixel formats asked of a camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CameraFormat {
    /// Motion JPEG: each frame a JPEG (what USB cameras send at high resolutions).
    Mjpeg,
    /// YUYV 4:2:2, uncompressed.
    Yuyv,
}

impl CameraFormat {
    fn fourcc(self) -> PixelFormat {
        match self {
            CameraFormat::Mjpeg => PixelFormat::MJPG,
            CameraFormat::Yuyv => PixelFormat::YUYV,
        }
    }
}

/// What a V4L2 source asks of its camera.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V4l2Settings {
    /// The device (`/dev/video0`, or a stable `/dev/v4l/by-id/...` link).
    pub device: PathBuf,
    /// The pixel format.
    pub format: CameraFormat,
    /// Frame width, pixels.
    pub width: u32,
    /// Frame height, pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// No frame for this long: the camera stalled.
    pub stall_timeout: Duration,
}

struct Stream {
    stream: ReadStream,
    format: CameraFormat,
    width: u32,
    height: u32,
    bytes_per_line: u32,
    /// Whether a frame of this stream could not be read (warned once per stream).
    bad_frame_warned: bool,
}

/// A V4L2 capture device as a [`FrameSource`].
pub struct V4l2Source {
    settings: V4l2Settings,
    what: String,
    stream: Option<Stream>,
    watch: StallWatch,
}

impl V4l2Source {
    /// A source over the camera `settings` names; opened by the first session.
    pub fn new(settings: V4l2Settings) -> Self {
        let what = format!("camera {}", settings.device.display());
        V4l2Source {
            watch: StallWatch::new(&what, settings.stall_timeout, Instant::now()),
            settings,
            what,
            stream: None,
        }
    }

    fn open(&self) -> Result<Stream, SourceError> {
        let s = &self.settings;
        let what = &self.what;
        let device = Device::open(&s.device).map_err(|e| SourceError::unavailable(what, e))?;
        let capabilities = device
            .capabilities()
            .map_err(|e| SourceError::unusable(what, e))?
            .device_capabilities();
        if !capabilities.contains(CapabilityFlags::VIDEO_CAPTURE | CapabilityFlags::STREAMING) {
            return Err(SourceError::unusable(
                what,
                "not a video capture device with streaming",
            ));
        }
        let capture = device
            .video_capture(PixFormat::new(s.width, s.height, s.format.fourcc()))
            .map_err(|e| SourceError::unusable(what, format!("setting the format: {e}")))?;
        let negotiated = capture.format();
        // The driver may substitute what it has: refuse another pixel format (it would be
        // misread), accept another size (and say so).
        if negotiated.pixel_format() != s.format.fourcc() {
            return Err(SourceError::unusable(
                what,
                format!(
                    "it offers {} instead of {:?}; set camera.format to what it has",
                    negotiated.pixel_format(),
                    s.format
                ),
            ));
        }
        if (negotiated.width(), negotiated.height()) != (s.width, s.height) {
            tracing::warn!(
                source = %what,
                asked = %format!("{}x{}", s.width, s.height),
                got = %format!("{}x{}", negotiated.width(), negotiated.height()),
                "camera chose another resolution"
            );
        }
        let (width, height, bytes_per_line) = (
            negotiated.width(),
            negotiated.height(),
            negotiated.bytes_per_line(),
        );
        match capture.set_frame_interval(Fract::new(1, s.fps)) {
            Ok(interval) => tracing::info!(source = %what, %interval, "camera frame interval"),
            // Some cameras have one rate only.
            Err(error) => tracing::warn!(source = %what, %error, "camera frame rate not set"),
        }
        let stream = capture
            .into_stream()
            .map_err(|e| SourceError::unusable(what, format!("starting the stream: {e}")))?;
        Ok(Stream {
            stream,
            format: s.format,
            width,
            height,
            bytes_per_line,
            bad_frame_warned: false,
        })
    }

    fn stopped(&mut self, error: impl std::fmt::Display) -> SourceError {
        self.stream = None;
        SourceError::stopped(&self.what, error)
    }
}

impl FrameSource for V4l2Source {
    fn check(&mut self) -> Result<(), SourceError> {
        if self.stream.is_none() {
            self.stream = Some(self.open()?);
        }
        Ok(())
    }

    fn begin_session(&mut self) -> Result<(), SourceError> {
        self.check()?;
        // Drop what the driver filled before this session: the buffers hold old frames (a few
        // at most, bounded by the buffer count).
        for _ in 0..16 {
            let stream = &mut self.stream.as_mut().expect("opened").stream;
            match stream.will_block() {
                Ok(true) => break,
                Ok(false) => {
                    if let Err(error) = stream.dequeue(|_| Ok(())) {
                        return Err(self.stopped(error));
                    }
                }
                Err(error) => return Err(self.stopped(error)),
            }
        }
        self.watch.restart(Instant::now());
        Ok(())
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Option<RgbImage>, SourceError> {
        self.watch.reading(Instant::now());
        loop {
            let until = match self.watch.next(Instant::now(), deadline) {
                Next::Read { until } => until,
                Next::TimeUp => return Ok(None),
                Next::Failed(error) => {
                    // Opened again by the next session (a camera plugged back in).
                    self.stream = None;
                    return Err(error);
                }
            };
            let Some(stream) = self.stream.as_mut() else {
                return Err(SourceError::stopped(&self.what, "not open"));
            };
            match wait_readable(stream.stream.as_fd(), until) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => return Err(self.stopped(error)),
            }
            let (format, width, height, bytes_per_line) = (
                stream.format,
                stream.width,
                stream.height,
                stream.bytes_per_line,
            );
            let frame = stream.stream.dequeue(|buffer| {
                Ok(match buffer.is_error() {
                    true => Err("the driver flagged the buffer as corrupt".to_owned()),
                    false => convert(format, &buffer, width, height, bytes_per_line),
                })
            });
            match frame {
                Ok(Ok(frame)) => {
                    self.watch.handed_out(Instant::now());
                    return Ok(Some(frame));
                }
                // One bad frame (a USB hiccup): the next one may be whole. Only bad frames for
                // the stall timeout fail the session (the watch).
                Ok(Err(error)) => {
                    if !std::mem::replace(&mut stream.bad_frame_warned, true) {
                        tracing::warn!(source = %self.what, %error, "camera frame skipped");
                    } else {
                        tracing::debug!(source = %self.what, %error, "camera frame skipped");
                    }
                    self.watch.bad_frame(error);
                }
                Err(error) => return Err(self.stopped(error)),
            }
        }
    }
}

/// One captured buffer as an RGB frame.
pub fn convert(
    format: CameraFormat,
    bytes: &[u8],
    width: u32,
    height: u32,
    bytes_per_line: u32,
) -> Result<RgbImage, String> {
    match format {
        CameraFormat::Mjpeg => decode_mjpeg(bytes),
        CameraFormat::Yuyv => yuyv_to_rgb(bytes, width, height, bytes_per_line),
    }
}

/// Converts a YUYV 4:2:2 frame (`Y0 U Y1 V` per two pixels, rows `bytes_per_line` apart) to
/// RGB by ITU-R BT.601 with video range (Y 16-235), what UVC cameras send.
pub fn yuyv_to_rgb(
    bytes: &[u8],
    width: u32,
    height: u32,
    bytes_per_line: u32,
) -> Result<RgbImage, String> {
    let row = width as usize * 2;
    let stride = (bytes_per_line as usize).max(row);
    if width == 0 || height == 0 || !width.is_multiple_of(2) {
        return Err(format!("a {width}x{height} YUYV frame cannot be read"));
    }
    let needed = stride * (height as usize - 1) + row;
    if bytes.len() < needed {
        return Err(format!(
            "a {width}x{height} YUYV frame needs {needed} bytes, got {}",
            bytes.len()
        ));
    }
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height as usize {
        for pair in bytes[y * stride..y * stride + row].chunks_exact(4) {
            let (u, v) = (i32::from(pair[1]) - 128, i32::from(pair[3]) - 128);
            for luma in [pair[0], pair[2]] {
                let c = 298 * (i32::from(luma) - 16);
                let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
                rgb.extend_from_slice(&[
                    clamp(c + 409 * v),
                    clamp(c - 100 * u - 208 * v),
                    clamp(c + 516 * u),
                ]);
            }
        }
    }
    Ok(RgbImage::from_raw(width, height, rgb).expect("sized to the frame"))
}

/// The standard Huffman tables (ITU T.81 Annex K.3) as one DHT segment: many USB cameras leave
/// them out of their MJPEG frames, which decoders then refuse.
const STANDARD_HUFFMAN_TABLES: [u8; 420] = [
    0xFF, 0xC4, 0x01, 0xA2, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A,
    0x0B, 0x01, 0x00, 0x03, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x10, 0x00,
    0x02, 0x01, 0x03, 0x03, 0x02, 0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7D, 0x01,
    0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22,
    0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0, 0x24,
    0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28, 0x29,
    0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4A,
    0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6A,
    0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A,
    0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8,
    0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6,
    0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2, 0xE3,
    0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9,
    0xFA, 0x11, 0x00, 0x02, 0x01, 0x02, 0x04, 0x04, 0x03, 0x04, 0x07, 0x05, 0x04, 0x04, 0x00, 0x01,
    0x02, 0x77, 0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07,
    0x61, 0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33,
    0x52, 0xF0, 0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19,
    0x1A, 0x26, 0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46,
    0x47, 0x48, 0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66,
    0x67, 0x68, 0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85,
    0x86, 0x87, 0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3,
    0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA,
    0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8,
    0xD9, 0xDA, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6,
    0xF7, 0xF8, 0xF9, 0xFA,
];

/// Decodes one MJPEG frame: a JPEG, its Huffman tables added when the camera left them out.
pub fn decode_mjpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.len() as u64 > MAX_FRAME_BYTES {
        return Err(format!(
            "{} bytes is over the {MAX_FRAME_BYTES}-byte frame limit",
            bytes.len()
        ));
    }
    let whole = with_huffman_tables(bytes);
    face::decode::decode_rgb(&whole).map_err(|e| e.to_string())
}

/// The JPEG with the standard DHT segment before its first scan when it has none of its own.
fn with_huffman_tables(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    // Walk the marker segments from SOI to the first SOS.
    let mut at = 2;
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return bytes.into();
    }
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        let marker = bytes[at + 1];
        match marker {
            0xC4 => return bytes.into(),
            0xDA => {
                let mut whole = Vec::with_capacity(bytes.len() + STANDARD_HUFFMAN_TABLES.len());
                whole.extend_from_slice(&bytes[..at]);
                whole.extend_from_slice(&STANDARD_HUFFMAN_TABLES);
                whole.extend_from_slice(&bytes[at..]);
                return whole.into();
            }
            // Fill bytes before a marker.
            0xFF => at += 1,
            _ => {
                let length = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
                at += 2 + length;
            }
        }
    }
    bytes.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yuyv: [u8; 4], expected: [[u8; 3]; 2]) {
        let frame = yuyv_to_rgb(&yuyv, 2, 1, 4).unwrap();
        assert_eq!(
            [frame.get_pixel(0, 0).0, frame.get_pixel(1, 0).0],
            expected,
            "YUYV {yuyv:?}"
        );
    }

    #[test]
    fn yuyv_becomes_rgb_by_bt601() {
        // Black, white and grey: no chroma.
        check([16, 128, 16, 128], [[0, 0, 0], [0, 0, 0]]);
        check([235, 128, 235, 128], [[255, 255, 255], [255, 255, 255]]);
        check([126, 128, 126, 128], [[128, 128, 128], [128, 128, 128]]);
        // BT.601's red, green and blue (green one step off in blue: its rounding).
        check([81, 90, 81, 240], [[255, 0, 0], [255, 0, 0]]);
        check([145, 54, 145, 34], [[0, 255, 1], [0, 255, 1]]);
        check([41, 240, 41, 110], [[0, 0, 255], [0, 0, 255]]);
        // Two pixels share chroma, each keeps its luma.
        check([16, 128, 235, 128], [[0, 0, 0], [255, 255, 255]]);
    }

    #[test]
    fn yuyv_rows_skip_their_padding_and_short_buffers_are_refused() {
        // 2x2, rows of 4 bytes padded to 8.
        let bytes = [
            235, 128, 235, 128, 9, 9, 9, 9, //
            16, 128, 16, 128,
        ];
        let frame = yuyv_to_rgb(&bytes, 2, 2, 8).unwrap();
        assert_eq!(frame.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(frame.get_pixel(0, 1).0, [0, 0, 0]);
        assert!(yuyv_to_rgb(&bytes[..11], 2, 2, 8)
            .unwrap_err()
            .contains("needs 12 bytes, got 11"));
        assert!(yuyv_to_rgb(&bytes, 3, 1, 6).is_err(), "odd width");
    }

    /// The JPEG without its DHT segments, as many USB cameras send MJPEG frames.
    fn strip_huffman_tables(jpeg: &[u8]) -> Vec<u8> {
        let mut out = jpeg[..2].to_vec();
        let mut at = 2;
        loop {
            let marker = jpeg[at + 1];
            if marker == 0xDA {
                out.extend_from_slice(&jpeg[at..]);
                return out;
            }
            let length = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
            if marker != 0xC4 {
                out.extend_from_slice(&jpeg[at..at + 2 + length]);
            }
            at += 2 + length;
        }
    }

    #[test]
    fn mjpeg_frames_decode_with_or_without_their_huffman_tables() {
        let photo = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/faces/carla-1.jpg"
        ))
        .unwrap();
        // Re-encoded with the standard tables (image's encoder uses them), as a camera would.
        let original = face::decode::decode_rgb(&photo).unwrap();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
            .encode_image(&original)
            .unwrap();
        let with_tables = decode_mjpeg(&jpeg).unwrap();
        let stripped = strip_huffman_tables(&jpeg);
        assert!(stripped.len() < jpeg.len());
        assert!(
            face::decode::decode_rgb(&stripped).is_err(),
            "a decoder alone refuses a frame without tables"
        );
        let frame = convert(CameraFormat::Mjpeg, &stripped, 0, 0, 0).unwrap();
        assert_eq!(frame.dimensions(), original.dimensions());
        assert_eq!(frame, with_tables, "the same pixels as with its own tables");
        assert!(decode_mjpeg(b"\xff\xd8 not a jpeg").is_err());
    }

    #[test]
    fn a_missing_camera_is_named_and_reported_by_the_session() {
        let mut camera = V4l2Source::new(V4l2Settings {
            device: "/dev/video-missing".into(),
            format: CameraFormat::Mjpeg,
            width: 640,
            height: 480,
            fps: 15,
            stall_timeout: Duration::from_secs(2),
        });
        let error = camera.begin_session().unwrap_err();
        assert_eq!(
            error.to_string(),
            "camera /dev/video-missing cannot be opened: No such file or directory (os error 2)"
        );
        assert_eq!(error.kind(), "unavailable");
        // Not a camera at all: refused by what the driver answers.
        let mut not_a_camera = V4l2Source::new(V4l2Settings {
            device: "/dev/null".into(),
            ..camera.settings.clone()
        });
        let error = not_a_camera.begin_session().unwrap_err();
        assert!(
            error.to_string().starts_with("camera /dev/null "),
            "{error}"
        );
    }
}
