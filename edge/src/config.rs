//! The edge terminal's configuration; `configs/edge.toml` documents every key.

use std::path::PathBuf;

use face::FaceConfig;
use serde::{Deserialize, Serialize};
use settings::{check_range, check_socket_addr, Validate};
use zlink::ZenohConfig;

use crate::v4l2::CameraFormat;

/// Environment variable prefix: `FACEPAY_EDGE_TERMINAL_ID=till-2`.
pub const ENV_PREFIX: &str = "FACEPAY_EDGE_";

/// The whole edge configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// The store this terminal belongs to.
    pub store_id: String,
    /// This terminal's id, unique in its store.
    pub terminal_id: String,
    /// The cash register's API. On loopback (the default) it is plain HTTP for the register on
    /// the same machine; anywhere else it needs `register_token_file`.
    pub register_listen: String,
    /// File holding the register's bearer token (at least 32 characters; generated owner-only
    /// on first run when missing). Set: the register API is HTTPS with the terminal's certificate
    /// and every request needs `Authorization: Bearer <token>`.
    pub register_token_file: Option<PathBuf>,
    /// `/metrics` and `/healthz`, on a listener of their own.
    pub metrics: telemetry::MetricsConfig,
    /// The terminal's certificate (`edge-<store_id>-<terminal_id>`), the CA and the revocation
    /// list.
    pub tls: pki::TlsConfig,
    /// How often the terminal fetches the revocation list its hub relays.
    pub revocation_poll_interval_ms: u64,
    /// How long a checkout waits for the customer to present a code.
    pub scan_timeout_ms: u64,
    /// How long to wait for the hub's decision; longer than the hub's own cloud deadline.
    pub hub_timeout_ms: u64,
    /// The frame source: a spool directory of images, each read once and then removed.
    pub frames_dir: PathBuf,
    /// How often the frame directory is polled for new images.
    pub frame_poll_interval_ms: u64,
    /// The camera's frame source, a spool directory like `frames_dir`; unset: `<frames_dir>/camera`.
    pub camera_dir: Option<PathBuf>,
    /// Lets the spool directories sit on a persistent file system (a machine without tmpfs).
    /// Off by default: the terminal refuses to start unless both are on tmpfs or ramfs, so raw
    /// face frames and codes never reach a disk.
    pub frames_on_persistent_disk: bool,
    /// How long the camera looks for a usable live face.
    pub face_timeout_ms: u64,
    /// Where payment codes come from: `frames_dir` (the default), a camera, a serial or an HID
    /// scanner.
    pub scanner: ScannerConfig,
    /// Where the camera's frames come from: `camera_dir` (the default), a USB (V4L2) camera or
    /// an MJPEG-over-HTTP camera.
    pub camera: CameraConfig,
    /// The face pipeline's thresholds.
    pub face: FaceConfig,
    /// The hub's Zenoh endpoint(s).
    pub zenoh: ZenohConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            store_id: "store-1".into(),
            terminal_id: "till-1".into(),
            register_listen: "127.0.0.1:8080".into(),
            register_token_file: None,
            metrics: telemetry::MetricsConfig::on("127.0.0.1:9100"),
            tls: pki::TlsConfig::default(),
            revocation_poll_interval_ms: 30_000,
            scan_timeout_ms: 10_000,
            hub_timeout_ms: 5_000,
            frames_dir: "/dev/shm/facepay/edge/frames".into(),
            frame_poll_interval_ms: 20,
            camera_dir: None,
            frames_on_persistent_disk: false,
            face_timeout_ms: 5_000,
            scanner: ScannerConfig::default(),
            camera: CameraConfig::default(),
            face: FaceConfig::default(),
            zenoh: ZenohConfig {
                connect: vec!["tls/127.0.0.1:7447".into()],
                ..ZenohConfig::default()
            },
        }
    }
}

impl EdgeConfig {
    /// The terminal's certificate identity.
    pub fn identity(&self) -> Result<pki::Identity, pki::PkiError> {
        pki::Identity::edge(&self.store_id, &self.terminal_id)
    }

    /// The camera spool directory in effect.
    pub fn camera_path(&self) -> PathBuf {
        self.camera_dir
            .clone()
            .unwrap_or_else(|| self.frames_dir.join("camera"))
    }
}

impl Validate for EdgeConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        protocol::validate_id("store_id", &self.store_id)
            .map_err(|e| ("store_id".into(), e.to_string()))?;
        protocol::validate_id("terminal_id", &self.terminal_id)
            .map_err(|e| ("terminal_id".into(), e.to_string()))?;
        check_socket_addr("register_listen", &self.register_listen)?;
        let loopback = self
            .register_listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !loopback && self.register_token_file.is_none() {
            return Err((
                "register_token_file".into(),
                format!(
                    "the register API listens beyond loopback ({}): set a token file, which also turns on HTTPS",
                    self.register_listen
                ),
            ));
        }
        if self
            .register_token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("register_token_file".into(), "must not be empty".into()));
        }
        self.metrics.validate("metrics")?;
        self.tls.validate("tls")?;
        check_range(
            "revocation_poll_interval_ms",
            self.revocation_poll_interval_ms,
            100..=3_600_000,
            "ms",
        )?;
        check_range("scan_timeout_ms", self.scan_timeout_ms, 100..=120_000, "ms")?;
        check_range("hub_timeout_ms", self.hub_timeout_ms, 100..=120_000, "ms")?;
        check_range(
            "frame_poll_interval_ms",
            self.frame_poll_interval_ms,
            1..=10_000,
            "ms",
        )?;
        self.scanner.validate()?;
        self.camera.validate()?;
        if self.frames_dir.as_os_str().is_empty() {
            return Err(("frames_dir".into(), "must not be empty".into()));
        }
        if self
            .camera_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(("camera_dir".into(), "must not be empty".into()));
        }
        check_range("face_timeout_ms", self.face_timeout_ms, 100..=120_000, "ms")?;
        self.check_sources_together()?;
        self.face.validate("face")?;
        self.zenoh.validate("zenoh")?;
        if self.zenoh.connect.is_empty() {
            return Err((
                "zenoh.connect".into(),
                "the edge needs its hub's endpoint".into(),
            ));
        }
        Ok(())
    }
}

impl EdgeConfig {
    /// What the camera and the scanner ask of each other and of the session timeouts.
    fn check_sources_together(&self) -> Result<(), (String, String)> {
        // A device that stops sending fails its session (camera_unavailable,
        // scanner_unavailable, with the device named) only if it stalls before the session's own
        // timeout answers that nobody presented anything.
        if self.camera.source != CameraSource::Spool
            && self.camera.stall_timeout_ms >= self.face_timeout_ms
        {
            return Err((
                "camera.stall_timeout_ms".into(),
                format!(
                    "must be below face_timeout_ms ({} ms), got {}: a camera that stops sending \
                     must fail the session (camera_unavailable) before it times out \
                     (no_face_presented)",
                    self.face_timeout_ms, self.camera.stall_timeout_ms
                ),
            ));
        }
        if matches!(
            self.scanner.source,
            ScannerSource::V4l2 | ScannerSource::MjpegHttp
        ) && self.scanner.stall_timeout_ms >= self.scan_timeout_ms
        {
            return Err((
                "scanner.stall_timeout_ms".into(),
                format!(
                    "must be below scan_timeout_ms ({} ms), got {}: a camera that stops sending \
                     must fail the scan (scanner_unavailable) before it times out",
                    self.scan_timeout_ms, self.scanner.stall_timeout_ms
                ),
            ));
        }
        // A V4L2 device streams to one reader: the second would fail every session.
        if self.camera.source == CameraSource::V4l2 && self.scanner.source == ScannerSource::V4l2 {
            let camera = self.camera.device_path();
            let scanner = self
                .scanner
                .as_camera()
                .expect("a camera source")
                .device_path();
            let same = camera == scanner
                || matches!(
                    (camera.canonicalize(), scanner.canonicalize()),
                    (Ok(a), Ok(b)) if a == b
                );
            if same {
                return Err((
                    "scanner.device".into(),
                    format!(
                        "the camera (camera.device) already uses {}: a V4L2 device streams to \
                         one reader; give the scanner a camera of its own or another source",
                        scanner.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Where the scanner's payment codes come from (`[scanner] source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScannerSource {
    /// QR codes in the image files of `frames_dir`.
    Spool,
    /// QR codes in the frames of a USB (V4L2) camera of its own.
    V4l2,
    /// QR codes in the frames of an MJPEG-over-HTTP camera of its own.
    MjpegHttp,
    /// A serial (USB CDC-ACM) scanner sending one code per line.
    Serial,
    /// An HID scanner in keyboard-wedge mode, read (and grabbed) through evdev.
    Evdev,
}

/// Where the camera's frames come from (`[camera] source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CameraSource {
    /// The image files of `camera_dir`.
    Spool,
    /// A USB (V4L2) camera.
    V4l2,
    /// An MJPEG-over-HTTP camera.
    MjpegHttp,
}

/// The code scanner's source (`[scanner]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScannerConfig {
    /// Where codes come from.
    pub source: ScannerSource,
    /// The device: a V4L2 camera, a serial tty or an evdev event device.
    pub device: Option<PathBuf>,
    /// A serial scanner's speed, bits per second.
    pub baud: u32,
    /// A V4L2 camera's pixel format.
    pub format: CameraFormat,
    /// A V4L2 camera's frame width, pixels.
    pub width: u32,
    /// A V4L2 camera's frame height, pixels.
    pub height: u32,
    /// A V4L2 camera's frames per second.
    pub fps: u32,
    /// An MJPEG-over-HTTP camera's stream URL.
    pub url: Option<String>,
    /// A camera that gives no frame for this long fails the session.
    pub stall_timeout_ms: u64,
    /// Between attempts to reconnect a lost MJPEG-over-HTTP stream.
    pub reconnect_ms: u64,
}

impl Default for ScannerConfig {
    fn default() -> Self {
        let camera = CameraConfig::default();
        ScannerConfig {
            source: ScannerSource::Spool,
            device: None,
            baud: 9600,
            format: camera.format,
            width: camera.width,
            height: camera.height,
            fps: camera.fps,
            url: None,
            stall_timeout_ms: camera.stall_timeout_ms,
            reconnect_ms: camera.reconnect_ms,
        }
    }
}

impl ScannerConfig {
    /// The camera settings a camera-based scanner source uses.
    pub fn as_camera(&self) -> Option<CameraConfig> {
        let source = match self.source {
            ScannerSource::Spool => CameraSource::Spool,
            ScannerSource::V4l2 => CameraSource::V4l2,
            ScannerSource::MjpegHttp => CameraSource::MjpegHttp,
            ScannerSource::Serial | ScannerSource::Evdev => return None,
        };
        Some(CameraConfig {
            source,
            device: self.device.clone(),
            format: self.format,
            width: self.width,
            height: self.height,
            fps: self.fps,
            url: self.url.clone(),
            stall_timeout_ms: self.stall_timeout_ms,
            reconnect_ms: self.reconnect_ms,
        })
    }

    fn validate(&self) -> Result<(), (String, String)> {
        match self.source {
            ScannerSource::Serial | ScannerSource::Evdev => {
                let example = match self.source {
                    ScannerSource::Serial => "/dev/ttyACM0",
                    _ => "/dev/input/by-id/usb-...-event-kbd",
                };
                if self
                    .device
                    .as_ref()
                    .is_none_or(|d| d.as_os_str().is_empty())
                {
                    return Err((
                        "scanner.device".into(),
                        format!(
                            "required when scanner.source = {:?} (such as {example})",
                            source_name(&self.source)
                        ),
                    ));
                }
                if !crate::serial::BAUD_RATES.contains(&self.baud) {
                    return Err((
                        "scanner.baud".into(),
                        format!(
                            "must be one of {:?} bits per second, got {}",
                            crate::serial::BAUD_RATES,
                            self.baud
                        ),
                    ));
                }
                Ok(())
            }
            _ => self
                .as_camera()
                .expect("a camera source")
                .validate_as("scanner"),
        }
    }
}

/// The camera's source (`[camera]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    /// Where frames come from.
    pub source: CameraSource,
    /// A V4L2 camera's device; unset: `/dev/video0`.
    pub device: Option<PathBuf>,
    /// A V4L2 camera's pixel format.
    pub format: CameraFormat,
    /// A V4L2 camera's frame width, pixels.
    pub width: u32,
    /// A V4L2 camera's frame height, pixels.
    pub height: u32,
    /// A V4L2 camera's frames per second.
    pub fps: u32,
    /// An MJPEG-over-HTTP camera's stream URL.
    pub url: Option<String>,
    /// A camera that gives no frame for this long fails the session.
    pub stall_timeout_ms: u64,
    /// Between attempts to reconnect a lost MJPEG-over-HTTP stream.
    pub reconnect_ms: u64,
}

impl Default for CameraConfig {
    fn default() -> Self {
        CameraConfig {
            source: CameraSource::Spool,
            device: None,
            format: CameraFormat::Mjpeg,
            width: 1280,
            height: 720,
            fps: 15,
            url: None,
            stall_timeout_ms: 3_000,
            reconnect_ms: 500,
        }
    }
}

/// A V4L2 device when none is named.
pub const DEFAULT_VIDEO_DEVICE: &str = "/dev/video0";

impl CameraConfig {
    /// The V4L2 device in effect.
    pub fn device_path(&self) -> PathBuf {
        self.device
            .clone()
            .unwrap_or_else(|| DEFAULT_VIDEO_DEVICE.into())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_as("camera")
    }

    fn validate_as(&self, table: &str) -> Result<(), (String, String)> {
        let key = |name: &str| format!("{table}.{name}");
        check_range(
            &key("stall_timeout_ms"),
            self.stall_timeout_ms,
            100..=60_000,
            "ms",
        )?;
        check_range(&key("reconnect_ms"), self.reconnect_ms, 10..=60_000, "ms")?;
        match self.source {
            CameraSource::Spool => Ok(()),
            CameraSource::V4l2 => {
                if self
                    .device
                    .as_ref()
                    .is_some_and(|d| d.as_os_str().is_empty())
                {
                    return Err((key("device"), "must not be empty".into()));
                }
                check_range(&key("width"), self.width.into(), 16..=7680, "pixels")?;
                check_range(&key("height"), self.height.into(), 16..=4320, "pixels")?;
                check_range(&key("fps"), self.fps.into(), 1..=120, "frames per second")?;
                if self.format == CameraFormat::Yuyv && !self.width.is_multiple_of(2) {
                    return Err((
                        key("width"),
                        format!("must be even for YUYV, got {}", self.width),
                    ));
                }
                // A stall is several frames missed, never one slow frame.
                let frame_interval_ms = 1_000 / u64::from(self.fps);
                if self.stall_timeout_ms < 3 * frame_interval_ms {
                    return Err((
                        key("stall_timeout_ms"),
                        format!(
                            "must be at least three frame intervals ({} ms at {} fps), got {}",
                            3 * frame_interval_ms,
                            self.fps,
                            self.stall_timeout_ms
                        ),
                    ));
                }
                Ok(())
            }
            CameraSource::MjpegHttp => {
                let url = self.url.as_deref().unwrap_or_default();
                if url.is_empty() {
                    return Err((
                        key("url"),
                        format!(
                            "required when {table}.source = \"mjpeg_http\" (such as \
                             http://192.168.1.20/video.mjpg)"
                        ),
                    ));
                }
                crate::mjpeg::HttpUrl::parse(url)
                    .map(|_| ())
                    .map_err(|e| (key("url"), e))
            }
        }
    }
}

fn source_name(source: &ScannerSource) -> &'static str {
    match source {
        ScannerSource::Spool => "spool",
        ScannerSource::V4l2 => "v4l2",
        ScannerSource::MjpegHttp => "mjpeg_http",
        ScannerSource::Serial => "serial",
        ScannerSource::Evdev => "evdev",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&std::path::Path>, overrides: &[&str]) -> Result<EdgeConfig, String> {
        settings::load(
            "FACEPAY_EDGE_TEST_UNSET_",
            &settings::Sources {
                file: file.map(|f| f.to_owned()),
                overrides: overrides.iter().map(|s| s.to_string()).collect(),
            },
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_shipped_file_loads_as_the_defaults() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/edge.toml");
        assert_eq!(load(Some(&file), &[]).unwrap(), EdgeConfig::default());
        let defaults = EdgeConfig::default();
        assert_eq!(defaults.scanner.source, ScannerSource::Spool);
        assert_eq!(defaults.camera.source, CameraSource::Spool);
    }

    #[test]
    fn camera_and_scanner_sources_are_chosen_and_checked() {
        let config = load(
            None,
            &[
                "camera.source=v4l2",
                "camera.device=/dev/v4l/by-id/usb-cam-video-index0",
                "camera.format=yuyv",
                "camera.width=640",
                "camera.height=480",
                "camera.fps=30",
                "scanner.source=serial",
                "scanner.device=/dev/ttyACM0",
                "scanner.baud=115200",
            ],
        )
        .unwrap();
        assert_eq!(config.camera.source, CameraSource::V4l2);
        assert_eq!(config.camera.format, CameraFormat::Yuyv);
        assert_eq!(config.scanner.baud, 115200);
        let config = load(
            None,
            &[
                "camera.source=mjpeg_http",
                "camera.url=http://10.0.0.7:8080/video",
                "scanner.source=mjpeg_http",
                "scanner.url=http://10.0.0.8/mjpg",
            ],
        )
        .unwrap();
        assert_eq!(
            config.scanner.as_camera().unwrap().url.as_deref(),
            Some("http://10.0.0.8/mjpg")
        );
        let check = |overrides: &[&str], expected: &str| {
            let error = load(None, overrides).unwrap_err();
            assert!(error.contains(expected), "{overrides:?}: {error}");
        };
        check(
            &["scanner.source=serial"],
            "`scanner.device`: required when scanner.source = \"serial\"",
        );
        check(
            &["scanner.source=evdev"],
            "`scanner.device`: required when scanner.source = \"evdev\"",
        );
        check(
            &[
                "scanner.source=serial",
                "scanner.device=/dev/ttyACM0",
                "scanner.baud=1234",
            ],
            "`scanner.baud`: must be one of",
        );
        check(&["scanner.source=barcode"], "scanner.source");
        check(&["camera.source=serial"], "camera.source");
        check(&["camera.source=mjpeg_http"], "`camera.url`: required");
        check(
            &["camera.source=mjpeg_http", "camera.url=https://cam/"],
            "https is not supported",
        );
        check(
            &["scanner.source=mjpeg_http", "scanner.url=rtsp://cam/"],
            "`scanner.url`",
        );
        check(
            &["camera.source=v4l2", "camera.fps=0"],
            "`camera.fps`: must be from 1 to 120",
        );
        check(&["camera.source=v4l2", "camera.width=8"], "`camera.width`");
        check(
            &[
                "camera.source=v4l2",
                "camera.format=yuyv",
                "camera.width=641",
            ],
            "must be even",
        );
        check(
            &["camera.source=v4l2", "camera.format=h264"],
            "camera.format",
        );
        check(
            &[
                "camera.source=v4l2",
                "camera.fps=1",
                "camera.stall_timeout_ms=1000",
            ],
            "at least three frame intervals",
        );
        check(&["camera.stall_timeout_ms=10"], "`camera.stall_timeout_ms`");
        check(&["scanner.reconnect_ms=0"], "`scanner.reconnect_ms`");
        check(&["camera.lens=wide"], "lens");
        // A dead camera must fail the session before it times out.
        check(
            &["camera.source=v4l2", "camera.stall_timeout_ms=5000"],
            "`camera.stall_timeout_ms`: must be below face_timeout_ms (5000 ms), got 5000",
        );
        check(
            &[
                "scanner.source=mjpeg_http",
                "scanner.url=http://10.0.0.8/mjpg",
                "scan_timeout_ms=2000",
            ],
            "`scanner.stall_timeout_ms`: must be below scan_timeout_ms (2000 ms), got 3000",
        );
        // Not for the spools, nor for scanners that type lines.
        load(None, &["camera.stall_timeout_ms=9000"]).unwrap();
        load(
            None,
            &[
                "scan_timeout_ms=200",
                "scanner.source=serial",
                "scanner.device=/dev/ttyACM0",
            ],
        )
        .unwrap();
        // One V4L2 device, two readers: both default to /dev/video0.
        check(
            &["camera.source=v4l2", "scanner.source=v4l2"],
            "`scanner.device`: the camera (camera.device) already uses /dev/video0",
        );
        check(
            &[
                "camera.source=v4l2",
                "camera.device=/dev/video2",
                "scanner.source=v4l2",
                "scanner.device=/dev/video2",
            ],
            "already uses /dev/video2",
        );
        load(
            None,
            &[
                "camera.source=v4l2",
                "scanner.source=v4l2",
                "scanner.device=/dev/video2",
            ],
        )
        .unwrap();
    }

    #[test]
    fn the_packaged_file_loads() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/debian/edge/edge.toml");
        let config = load(Some(&file), &[]).unwrap();
        assert_eq!(config.camera.source, CameraSource::Spool);
    }
}
