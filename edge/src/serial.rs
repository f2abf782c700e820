//! Serial code scanners (USB CDC-ACM, `/dev/ttyACM0`; USB-serial adapters, `/dev/ttyUSB0`) that
//! send one code per line. The tty is put in raw mode at the configured speed: no echo, no line
//! editing, no translation; [`crate::codes::LineCodes`] cuts the lines.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    time::Instant,
};

use rustix::{
    fs::{Mode, OFlags},
    termios::{self, OptionalActions, QueueSelector},
};

use crate::{codes::ByteDevice, error::SourceError, frames::wait_readable};

/// Speeds a serial scanner may be set to (bits per second).
pub const BAUD_RATES: [u32; 8] = [1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200];

/// An open serial scanner.
pub struct SerialScanner {
    fd: OwnedFd,
    what: String,
}

impl SerialScanner {
    /// Opens the tty at `path` in raw mode at `baud` bits per second (ignored by CDC-ACM devices,
    /// whose data rate is the USB link's). Pending input is flushed.
    pub fn open(path: &Path, baud: u32) -> Result<Self, SourceError> {
        let what = format!("scanner {}", path.display());
        // O_NOCTTY: a scanner never becomes the terminal's controlling tty.
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SourceError::unavailable(&what, std::io::Error::from(e)))?;
        let mut settings = termios::tcgetattr(&fd).map_err(|e| {
            SourceError::unusable(
                &what,
                format!("not a serial device: {}", std::io::Error::from(e)),
            )
        })?;
        settings.make_raw();
        settings
            .set_speed(baud)
            .map_err(|e| SourceError::unusable(&what, format!("speed {baud}: {e}")))?;
        termios::tcsetattr(&fd, OptionalActions::Now, &settings)
            .map_err(|e| SourceError::unusable(&what, format!("raw mode: {e}")))?;
        termios::tcflush(&fd, QueueSelector::IFlush)
            .map_err(|e| SourceError::unusable(&what, format!("flushing input: {e}")))?;
        Ok(SerialScanner { fd, what })
    }
}

impl ByteDevice for SerialScanner {
    fn read(&mut self, deadline: Instant, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let readable = wait_readable(self.fd.as_fd(), deadline)
            .map_err(|e| SourceError::stopped(&self.what, e))?;
        if !readable {
            return Ok(());
        }
        let mut buffer = [0u8; 1024];
        match rustix::io::read(&self.fd, &mut buffer) {
            // Readable yet nothing: the other end hung up (the scanner was unplugged).
            Ok(0) => Err(SourceError::stopped(&self.what, "the device hung up")),
            Ok(n) => {
                out.extend_from_slice(&buffer[..n]);
                Ok(())
            }
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(()),
            Err(error) => Err(SourceError::stopped(
                &self.what,
                std::io::Error::from(error),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, time::Duration};

    use super::*;
    use crate::codes::{CodeSource as _, LineCodes};

    /// A pseudo-terminal pair: the master plays the scanner, the slave is the terminal's tty.
    fn pty() -> (std::fs::File, std::path::PathBuf) {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let path = std::path::PathBuf::from(name.to_str().unwrap());
        (std::fs::File::from(master), path)
    }

    fn scanner_codes(path: &Path) -> LineCodes {
        let path = path.to_owned();
        LineCodes::new(
            &format!("scanner {}", path.display()),
            Box::new(
                move || Ok(Box::new(SerialScanner::open(&path, 9600)?) as Box<dyn ByteDevice>),
            ),
        )
    }

    #[test]
    fn a_serial_scanner_sends_codes_line_by_line_in_raw_mode() {
        let (mut scanner, tty) = pty();
        let mut codes = scanner_codes(&tty);
        let soon = || Instant::now() + Duration::from_secs(5);
        codes.begin_session().unwrap();
        // Raw mode: the tty neither echoes nor edits: a code carrying what a cooked tty would
        // take as erase (DEL), kill (^U) or end of file (^D) arrives whole.
        let code = "FPAY1.a\u{7f}b\u{15}c\u{4}d.sig";
        scanner.write_all(format!("{code}\r\n").as_bytes()).unwrap();
        assert_eq!(codes.next_code(soon()).unwrap().as_deref(), Some(code));
        let settings = termios::tcgetattr(&scanner).unwrap();
        assert!(!settings
            .local_modes
            .intersects(termios::LocalModes::ECHO | termios::LocalModes::ICANON));
        // A line over the limit is dropped, the next one read; a code split across writes too.
        scanner
            .write_all(&vec![b'x'; crate::codes::MAX_LINE_BYTES + 10])
            .unwrap();
        scanner.write_all(b"\nFPAY1.sec").unwrap();
        scanner.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        scanner.write_all(b"ond.code\n").unwrap();
        assert_eq!(
            codes.next_code(soon()).unwrap().as_deref(),
            Some("FPAY1.second.code")
        );
        // Nothing more: the deadline answers None.
        let start = Instant::now();
        assert_eq!(
            codes.next_code(start + Duration::from_millis(50)).unwrap(),
            None
        );
        codes.end_session();
        // Scanned while no session runs: dropped when the next one begins.
        scanner.write_all(b"FPAY1.stale.code\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        codes.begin_session().unwrap();
        assert_eq!(
            codes
                .next_code(Instant::now() + Duration::from_millis(100))
                .unwrap(),
            None
        );
        // Unplugged (the master closes): a clear error, then the path is missing.
        drop(scanner);
        let error = codes.next_code(soon()).unwrap_err();
        assert_eq!(error.kind(), "stopped", "{error}");
        assert!(
            error.to_string().contains(&tty.display().to_string()),
            "{error}"
        );
        let error = codes.begin_session().unwrap_err();
        assert_eq!(error.kind(), "unavailable", "{error}");
    }

    #[test]
    fn the_rest_of_a_code_cut_by_a_session_start_is_no_code() {
        let (mut scanner, tty) = pty();
        let mut codes = scanner_codes(&tty);
        let soon = || Instant::now() + Duration::from_secs(5);
        codes.begin_session().unwrap();
        codes.end_session();
        // A code still being sent when the next session begins: its first half is dropped
        // with what came before the session, its tail arrives in the session.
        scanner.write_all(b"FPAY1.previous.cust").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        codes.begin_session().unwrap();
        scanner
            .write_all(b"omer.code\r\nFPAY1.this.customer\r\n")
            .unwrap();
        assert_eq!(
            codes.next_code(soon()).unwrap().as_deref(),
            Some("FPAY1.this.customer")
        );
        // Between sessions, whole codes only: nothing is skipped.
        codes.end_session();
        scanner.write_all(b"FPAY1.stale\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        codes.begin_session().unwrap();
        scanner.write_all(b"FPAY1.next\n").unwrap();
        assert_eq!(
            codes.next_code(soon()).unwrap().as_deref(),
            Some("FPAY1.next")
        );
    }

    #[test]
    fn a_stray_byte_without_a_line_end_never_eats_a_later_code() {
        let (mut scanner, tty) = pty();
        let mut codes = scanner_codes(&tty);
        codes.begin_session().unwrap();
        codes.end_session();
        // Line noise (a scanner powered up, a configuration reply) with no line end, dropped at
        // the session's start; the customer scans after the tail of a cut code could come.
        scanner.write_all(b"\x07").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        codes.begin_session().unwrap();
        std::thread::sleep(crate::codes::LINE_TAIL + Duration::from_millis(200));
        scanner.write_all(b"FPAY1.later\n").unwrap();
        assert_eq!(
            codes
                .next_code(Instant::now() + Duration::from_secs(5))
                .unwrap()
                .as_deref(),
            Some("FPAY1.later")
        );
    }

    #[test]
    fn a_missing_or_wrong_device_is_named() {
        let error = SerialScanner::open(Path::new("/dev/ttyACM-missing"), 9600)
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "scanner /dev/ttyACM-missing cannot be opened: No such file or directory (os error 2)"
        );
        let error = SerialScanner::open(Path::new("/dev/null"), 9600)
            .err()
            .unwrap();
        assert_eq!(error.kind(), "unusable");
        assert!(error
            .to_string()
            .starts_with("scanner /dev/null is not usable: not a serial device"));
    }
}
