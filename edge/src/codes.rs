//! Where the scanner gets payment codes: QR codes decoded from a frame source (a spool
//! directory or a camera), or lines typed by a code scanner (serial or HID keyboard wedge). Both
//! answer the same [`CodeSource::next_code`], so a scanned code and a code seen by a camera take
//! the same path through the checkout.

use std::time::Instant;

use crate::{error::SourceError, frames::FrameSource};

/// Longest line a code scanner may send; longer lines are dropped with a warning (a payment
/// code is about 200 bytes).
pub const MAX_LINE_BYTES: usize = 4096;

/// The most a session start or end discards from a device before giving up on draining it (a
/// device that never stops sending is read again by the next session).
const MAX_DISCARD_BYTES: usize = 1024 * 1024;

/// How long after a session starts the rest of a code cut by it may still arrive (a scanner
/// sends a code of a few hundred bytes in one burst: about 0.2 s at 9600 baud).
pub const LINE_TAIL: std::time::Duration = std::time::Duration::from_millis(500);

/// A source of payment codes. Implementations block, so they are only ever called from the
/// scanner's dedicated thread.
pub trait CodeSource: Send {
    /// Opens the source outside any session, to tell at start whether it works.
    fn check(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// A session (one customer) starts: codes from before it are dropped unread. A device that
    /// cannot be opened says so here.
    fn begin_session(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// The next code, waiting until `deadline` at most; `None` when none came in time, an error
    /// when the source stopped.
    fn next_code(&mut self, deadline: Instant) -> Result<Option<String>, SourceError>;

    /// The session ended: what it did not read is dropped unread.
    fn end_session(&mut self) {}
}

/// QR codes decoded from a frame source.
pub struct QrCodes {
    frames: Box<dyn FrameSource>,
    facepay_only: bool,
}

impl QrCodes {
    /// Codes from the frames of `frames`: the first code a frame shows, a facepay one first.
    pub fn new(frames: Box<dyn FrameSource>) -> Self {
        QrCodes {
            frames,
            facepay_only: false,
        }
    }

    /// Only facepay codes: for a live camera, which may have a poster or a product label in
    /// view; the scan goes on past them until a facepay code or its deadline. A spool's frames
    /// are each presented on purpose, so there any code is answered (and a foreign one declined
    /// `not_facepay_code`).
    pub fn facepay_only(mut self) -> Self {
        self.facepay_only = true;
        self
    }
}

impl CodeSource for QrCodes {
    fn check(&mut self) -> Result<(), SourceError> {
        self.frames.check()
    }

    fn begin_session(&mut self) -> Result<(), SourceError> {
        self.frames.begin_session()
    }

    fn next_code(&mut self, deadline: Instant) -> Result<Option<String>, SourceError> {
        while let Some(frame) = self.frames.next_frame(deadline)? {
            // A frame may show several codes (a phone and a poster); the facepay one wins.
            let codes = paycode::qr::decode(&image::DynamicImage::ImageRgb8(frame).to_luma8());
            let facepay = codes
                .iter()
                .find(|c| c.trim_start().starts_with(paycode::CODE_PREFIX));
            if let Some(code) = facepay.or(codes.first().filter(|_| !self.facepay_only)) {
                return Ok(Some(code.clone()));
            }
        }
        Ok(None)
    }

    fn end_session(&mut self) {
        self.frames.end_session()
    }
}

/// A line that came in, or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line of text, without its end and surrounding white space.
    Text(String),
    /// Longer than [`MAX_LINE_BYTES`]: dropped.
    TooLong,
    /// Not UTF-8: refused.
    NotUtf8,
}

/// Cuts bytes into lines (ended by `\n` or `\r`; empty lines skipped), each at most
/// [`MAX_LINE_BYTES`]. A plain state machine, fed byte by byte.
#[derive(Debug, Default)]
pub struct LineAssembler {
    line: Vec<u8>,
    too_long: bool,
}

impl LineAssembler {
    /// Takes one byte; a line when it ends one.
    pub fn push(&mut self, byte: u8) -> Option<Line> {
        if byte != b'\n' && byte != b'\r' {
            if self.line.len() < MAX_LINE_BYTES {
                self.line.push(byte);
            } else {
                self.too_long = true;
            }
            return None;
        }
        let line = std::mem::take(&mut self.line);
        if std::mem::take(&mut self.too_long) {
            return Some(Line::TooLong);
        }
        match String::from_utf8(line) {
            Ok(text) if text.trim().is_empty() => None,
            Ok(text) => Some(Line::Text(text.trim().to_owned())),
            Err(_) => Some(Line::NotUtf8),
        }
    }

    /// Whether a line has begun and not ended.
    pub fn is_mid_line(&self) -> bool {
        !self.line.is_empty() || self.too_long
    }

    /// Forgets a line begun (a session ended in its middle).
    pub fn clear(&mut self) {
        self.line.clear();
        self.too_long = false;
    }
}

/// A device that sends bytes: a serial scanner's tty, or a keyboard-wedge scanner's key events
/// turned into characters.
pub trait ByteDevice: Send {
    /// Appends what arrived to `out`, waiting until `deadline` at most for something; appends
    /// nothing when nothing came in time.
    fn read(&mut self, deadline: Instant, out: &mut Vec<u8>) -> Result<(), SourceError>;
}

/// Opens a byte device (again, after it was unplugged).
pub type OpenDevice = Box<dyn FnMut() -> Result<Box<dyn ByteDevice>, SourceError> + Send>;

/// Payment codes from a scanner that types one code per line. The device is opened at the first
/// session and again after it failed; codes sent outside a session are dropped unread.
pub struct LineCodes {
    open: OpenDevice,
    device: Option<Box<dyn ByteDevice>>,
    lines: LineAssembler,
    pending: std::collections::VecDeque<u8>,
    /// What was dropped unread ended in the middle of a line: the rest of that line, still on
    /// its way, is dropped too before a line is taken, if it comes before this time (a scanner
    /// sends a code in one burst: a stray byte without a line end must not eat a later code).
    skip_to_line_end: Option<Instant>,
    what: String,
}

impl LineCodes {
    /// Codes from the device `open` opens; `what` names it in logs (`scanner /dev/ttyACM0`).
    pub fn new(what: &str, open: OpenDevice) -> Self {
        LineCodes {
            open,
            device: None,
            lines: LineAssembler::default(),
            pending: Default::default(),
            skip_to_line_end: None,
            what: what.to_owned(),
        }
    }

    /// Reads and drops whatever the device holds now. When that ends in the middle of a line
    /// (a code still being sent), the rest of the line is dropped when it comes: it is no code
    /// of the next session.
    fn discard(&mut self) -> Result<(), SourceError> {
        let read_before = self.pending.back().copied();
        let mid_line = self.lines.is_mid_line();
        self.pending.clear();
        self.lines.clear();
        let mut dropped = Vec::new();
        let result = self.drain_device(&mut dropped);
        let tail_until = Instant::now() + LINE_TAIL;
        match dropped.last().copied().or(read_before) {
            Some(byte) => {
                self.skip_to_line_end = (!matches!(byte, b'\n' | b'\r')).then_some(tail_until)
            }
            // Nothing read: a line begun stays begun; a skip still waits for its line end.
            None if mid_line && self.skip_to_line_end.is_none() => {
                self.skip_to_line_end = Some(tail_until)
            }
            None => {}
        }
        result
    }

    /// Reads what the device holds now into `dropped`.
    fn drain_device(&mut self, dropped: &mut Vec<u8>) -> Result<(), SourceError> {
        let Some(device) = self.device.as_mut() else {
            return Ok(());
        };
        loop {
            let before = dropped.len();
            device.read(Instant::now(), dropped)?;
            if dropped.len() == before || dropped.len() > MAX_DISCARD_BYTES {
                break;
            }
        }
        if !dropped.is_empty() {
            tracing::info!(
                source = %self.what,
                bytes = dropped.len(),
                "code scanner input from outside the session dropped unread"
            );
        }
        Ok(())
    }

    fn failed(&mut self, error: SourceError) -> SourceError {
        // Opened again by the next session (a scanner plugged back in).
        self.device = None;
        error
    }
}

impl CodeSource for LineCodes {
    fn check(&mut self) -> Result<(), SourceError> {
        if self.device.is_none() {
            self.device = Some((self.open)()?);
            // A device opened again: what the old one was sending is gone with it.
            self.skip_to_line_end = None;
        }
        Ok(())
    }

    fn begin_session(&mut self) -> Result<(), SourceError> {
        self.check()?;
        self.discard().map_err(|e| self.failed(e))
    }

    fn next_code(&mut self, deadline: Instant) -> Result<Option<String>, SourceError> {
        let mut chunk = Vec::new();
        loop {
            if self
                .skip_to_line_end
                .is_some_and(|until| Instant::now() > until)
            {
                // No line end came in time: what follows is a new code.
                self.skip_to_line_end = None;
            }
            while let Some(byte) = self.pending.pop_front() {
                if self.skip_to_line_end.is_some() {
                    if matches!(byte, b'\n' | b'\r') {
                        self.skip_to_line_end = None;
                    }
                    continue;
                }
                match self.lines.push(byte) {
                    Some(Line::Text(code)) => return Ok(Some(code)),
                    Some(Line::TooLong) => tracing::warn!(
                        source = %self.what,
                        max_bytes = MAX_LINE_BYTES,
                        "code scanner line over the limit dropped"
                    ),
                    Some(Line::NotUtf8) => tracing::warn!(
                        source = %self.what,
                        "code scanner line that is not UTF-8 refused"
                    ),
                    None => {}
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let Some(device) = self.device.as_mut() else {
                // A session that did not begin (its error was answered): nothing to read.
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                return Ok(None);
            };
            chunk.clear();
            if let Err(error) = device.read(deadline, &mut chunk) {
                return Err(self.failed(error));
            }
            self.pending.extend(chunk.iter().copied());
        }
    }

    fn end_session(&mut self) {
        if let Err(error) = self.discard() {
            // The next session opens it again and reports what it finds then.
            tracing::debug!(%error, "code scanner failed at the end of a session");
            self.failed(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(input: &[u8], expected: &[Line]) {
        let mut lines = LineAssembler::default();
        let got: Vec<Line> = input.iter().filter_map(|b| lines.push(*b)).collect();
        assert_eq!(got, expected, "input {:?}", String::from_utf8_lossy(input));
    }

    #[test]
    fn lines_are_cut_bounded_and_checked() {
        let text = |s: &str| Line::Text(s.into());
        check(b"FPAY1.abc.def\n", &[text("FPAY1.abc.def")]);
        check(b"one\r\ntwo\r\n", &[text("one"), text("two")]);
        check(b"one\rtwo\r", &[text("one"), text("two")]);
        check(b"\n\n  \r\nx\n", &[text("x")]);
        check(b"  padded \n", &[text("padded")]);
        check(b"no end yet", &[]);
        check(b"caf\xc3\xa9\n", &[text("caf\u{e9}")]);
        check(b"bad \xff byte\nnext\n", &[Line::NotUtf8, text("next")]);
        let mut long = vec![b'a'; MAX_LINE_BYTES + 1];
        long.extend_from_slice(b"\nafter\n");
        check(&long, &[Line::TooLong, text("after")]);
        let mut exact = vec![b'a'; MAX_LINE_BYTES];
        exact.push(b'\n');
        check(&exact, &[Line::Text("a".repeat(MAX_LINE_BYTES))]);
    }

    /// Bytes handed out as the test says, and a failure once they run out when asked to.
    struct Scripted {
        arrivals: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        fail_when_empty: bool,
    }

    impl ByteDevice for Scripted {
        fn read(&mut self, deadline: Instant, out: &mut Vec<u8>) -> Result<(), SourceError> {
            let mut arrivals = self.arrivals.lock().unwrap();
            if arrivals.is_empty() && self.fail_when_empty {
                return Err(SourceError::stopped("scanner test", "unplugged"));
            }
            // One byte at a time: lines cross reads.
            if arrivals.is_empty() {
                drop(arrivals);
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                return Ok(());
            }
            out.push(arrivals.remove(0));
            Ok(())
        }
    }

    #[test]
    fn codes_from_before_or_after_a_session_are_dropped_unread() {
        let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = arrivals.clone();
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = opened.clone();
        let mut codes = LineCodes::new(
            "scanner test",
            Box::new(move || {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(Box::new(Scripted {
                    arrivals: shared.clone(),
                    fail_when_empty: false,
                }) as Box<dyn ByteDevice>)
            }),
        );
        let soon = || Instant::now() + Duration::from_millis(30);
        codes.begin_session().unwrap();
        codes.end_session();
        // Scanned between sessions (a previous customer's code, half a line): never read.
        arrivals
            .lock()
            .unwrap()
            .extend_from_slice(b"old-code\nhalf-li");
        codes.begin_session().unwrap();
        assert_eq!(codes.next_code(soon()).unwrap(), None);
        // The rest of the half line comes after the session began: dropped too.
        arrivals
            .lock()
            .unwrap()
            .extend_from_slice(b"ne\nthis-code\nsecond-read\n");
        assert_eq!(
            codes.next_code(soon()).unwrap().as_deref(),
            Some("this-code")
        );
        // The scanner read twice; the session took one code and the rest ends with it.
        codes.end_session();
        codes.begin_session().unwrap();
        assert_eq!(codes.next_code(soon()).unwrap(), None);
        assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_device_that_fails_is_reported_and_opened_again_by_the_next_session() {
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = attempts.clone();
        let mut codes = LineCodes::new(
            "scanner test",
            Box::new(move || {
                match count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    // First opened, then unplugged, then missing.
                    0 => Ok(Box::new(Scripted {
                        arrivals: Default::default(),
                        fail_when_empty: true,
                    }) as Box<dyn ByteDevice>),
                    _ => Err(SourceError::unavailable(
                        "scanner /dev/ttyACM0",
                        "No such file or directory (os error 2)",
                    )),
                }
            }),
        );
        let error = codes.begin_session().unwrap_err();
        assert_eq!(error.kind(), "stopped");
        let error = codes.begin_session().unwrap_err();
        assert_eq!(
            error.to_string(),
            "scanner /dev/ttyACM0 cannot be opened: No such file or directory (os error 2)"
        );
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
