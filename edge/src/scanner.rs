//! The code scanner: waits for a payment code from its source (QR codes decoded from frames, or
//! lines from a serial or keyboard-wedge scanner), on its own thread.

use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::{codes::CodeSource, error::SourceError, health::SourceHealth};

/// Waits for payment codes. A `SyncArbiter` actor: reading a device or decoding frames blocks.
pub struct ScannerActor {
    source: Box<dyn CodeSource>,
    health: SourceHealth,
}

impl ScannerActor {
    /// A scanner over a code source; `health` follows whether the source works.
    pub fn new(source: Box<dyn CodeSource>, health: SourceHealth) -> Self {
        ScannerActor { source, health }
    }
}

impl Actor for ScannerActor {
    type Context = SyncContext<Self>;

    /// Opens the source once at start, so a missing device is logged and shown by
    /// `facepay_edge_source_up` before the first customer.
    fn started(&mut self, _: &mut Self::Context) {
        let checked = self.source.check();
        self.health.observe(&checked);
    }
}

/// Wait up to `timeout` for a payment code and return its text: `None` when none came, an error
/// when the scanner's source does not work (the checkout declines `scanner_unavailable`).
#[derive(Message)]
#[rtype(result = "Result<Option<String>, SourceError>")]
pub struct ScanForCode {
    /// How long to wait.
    pub timeout: Duration,
}

impl Handler<ScanForCode> for ScannerActor {
    type Result = Result<Option<String>, SourceError>;

    fn handle(&mut self, msg: ScanForCode, _: &mut Self::Context) -> Self::Result {
        let deadline = Instant::now() + msg.timeout;
        // One customer's session: nothing from before it, nothing left after it.
        let scanned = self
            .source
            .begin_session()
            .and_then(|()| self.source.next_code(deadline));
        self.source.end_session();
        self.health.observe(&scanned);
        scanned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        codes::{ByteDevice, LineCodes},
        health::SourceMetrics,
        serial::SerialScanner,
    };

    #[actix::test]
    async fn a_scanned_line_is_a_code_and_a_missing_scanner_an_error() {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        use std::io::Write as _;
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let tty = std::path::PathBuf::from(ptsname(&master, Vec::new()).unwrap().to_str().unwrap());
        let mut scanner_end = std::fs::File::from(master);
        let registry = prometheus::Registry::new();
        let metrics = SourceMetrics::register(&registry);
        let serial = |path: std::path::PathBuf| {
            LineCodes::new(
                &format!("scanner {}", path.display()),
                Box::new(move || {
                    Ok(Box::new(SerialScanner::open(&path, 115200)?) as Box<dyn ByteDevice>)
                }),
            )
        };
        let health = metrics.health("scanner");
        let scanner = SyncArbiter::start(1, {
            let tty = tty.clone();
            let source = std::sync::Mutex::new(Some(serial(tty)));
            let health = std::sync::Mutex::new(Some(health));
            move || {
                ScannerActor::new(
                    Box::new(source.lock().unwrap().take().unwrap()),
                    health.lock().unwrap().take().unwrap(),
                )
            }
        });
        let scan = scanner.send(ScanForCode {
            timeout: Duration::from_secs(10),
        });
        // The scanner types once the session has begun (input from before it is dropped).
        let typist = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            scanner_end.write_all(b"FPAY1.from.serial\r\n").unwrap();
            scanner_end
        });
        assert_eq!(
            scan.await.unwrap().unwrap().as_deref(),
            Some("FPAY1.from.serial")
        );
        let _scanner_end = typist.join().unwrap();
        let text = telemetry::render(&registry);
        assert!(
            text.contains("facepay_edge_source_up{source=\"scanner\"} 1"),
            "{text}"
        );

        // A scanner that is not plugged in: the error names the path, the gauge drops.
        let missing = SyncArbiter::start(1, {
            let source = std::sync::Mutex::new(Some(serial("/dev/ttyACM-missing".into())));
            let health = std::sync::Mutex::new(Some(metrics.health("scanner")));
            move || {
                ScannerActor::new(
                    Box::new(source.lock().unwrap().take().unwrap()),
                    health.lock().unwrap().take().unwrap(),
                )
            }
        });
        let error = missing
            .send(ScanForCode {
                timeout: Duration::from_secs(10),
            })
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "scanner /dev/ttyACM-missing cannot be opened: No such file or directory (os error 2)"
        );
        let text = telemetry::render(&registry);
        assert!(
            text.contains("facepay_edge_source_up{source=\"scanner\"} 0"),
            "{text}"
        );
        // Once at start, once for the session.
        assert!(
            text.contains(
                "facepay_edge_source_errors_total{kind=\"unavailable\",source=\"scanner\"} 2"
            ),
            "{text}"
        );
    }
}
