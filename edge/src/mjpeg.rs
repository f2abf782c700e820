//! IP cameras that serve MJPEG over HTTP: one response of type `multipart/x-mixed-replace`, each
//! part a JPEG. Plain HTTP over `std::net::TcpStream` (cameras sit on the store's network; no
//! TLS), blocking, on the camera's own thread. A session connects, reads, and closes: frames
//! are never from before it. It connects at its first [`FrameSource::next_frame`], so that the
//! connection (name resolution included) waits no longer than the session's deadline or the
//! stall timeout, whichever comes first; the first attempt failing fails the session. A dropped
//! connection is opened again within the session; a camera that gives no frame for the stall
//! timeout, silent or unreachable, fails the session.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use base64::Engine as _;
use image::RgbImage;

use crate::{
    error::SourceError,
    frames::{FrameSource, MAX_FRAME_BYTES},
    v4l2::decode_mjpeg,
};

/// Largest response head or part header block accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Most bytes read from the socket at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// An `http://` URL, as far as a camera needs one. Shown (`Display`, `Debug`) without its
/// credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    host: String,
    port: u16,
    /// `host[:port]` for the Host header.
    authority: String,
    path: String,
    /// `Basic ...` from `user:password@` in the URL.
    authorization: Option<String>,
}

impl HttpUrl {
    /// Parses `http://[user:password@]host[:port][/path]`; https and other schemes are refused.
    pub fn parse(url: &str) -> Result<Self, String> {
        // Errors show the URL without its credentials: they reach logs and the config check.
        let shown = redacted(url);
        let Some(rest) = url
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case("http://"))
            .map(|_| &url[7..])
        else {
            if url
                .get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
            {
                return Err(
                    "https is not supported: the terminal reads cameras on the store's \
                            network over plain http"
                        .into(),
                );
            }
            return Err(format!("{shown:?} is not an http:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let (userinfo, authority) = match authority.rsplit_once('@') {
            Some((userinfo, authority)) => (Some(userinfo), authority),
            None => (None, authority),
        };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| format!("{shown:?}: an IPv6 host lacks its ']'"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                // Not echoed: in a URL whose credentials hold a '/', it is part of the password.
                .map_err(|_| format!("{shown:?}: the port is not a number from 0 to 65535"))?,
            None => 80,
        };
        if host.is_empty() {
            return Err(format!("{shown:?} names no host"));
        }
        if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(format!(
                "{shown:?}: the path holds spaces or control characters"
            ));
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path: path.to_owned(),
            authorization: userinfo.map(|userinfo| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(userinfo)
                )
            }),
        })
    }
}

impl std::fmt::Display for HttpUrl {
    /// The URL without its credentials, for logs and answers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

impl std::fmt::Debug for HttpUrl {
    /// As `Display`, and whether credentials are set: never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpUrl")
            .field("url", &self.to_string())
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A URL as written, for messages: whatever precedes the last `@` after the scheme (the
/// `user:password` of basic authentication, even when malformed) is replaced by `***`.
pub fn redacted(url: &str) -> String {
    let start = url.find("://").map_or(0, |at| at + 3);
    match url[start..].rfind('@') {
        Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
        None => url.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The response's status line and headers.
    Head,
    /// Looking for the next boundary line.
    Boundary,
    /// A part's headers.
    PartHeaders,
    /// A part's body, of a known length or up to the next boundary.
    Body(Option<usize>),
}

/// Cuts an HTTP `multipart/x-mixed-replace` response into its parts: a plain state machine fed
/// the bytes as they come. Every buffer is bounded: heads by [`MAX_HEADER_BYTES`], parts by
/// [`MAX_FRAME_BYTES`].
#[derive(Debug)]
pub struct MjpegParser {
    stage: Stage,
    buffer: Vec<u8>,
    /// `--` and the boundary.
    delimiter: Vec<u8>,
    /// How far a body without length was searched for the delimiter.
    searched: usize,
}

impl Default for MjpegParser {
    fn default() -> Self {
        MjpegParser {
            stage: Stage::Head,
            buffer: Vec::new(),
            delimiter: Vec::new(),
            searched: 0,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl MjpegParser {
    /// Takes bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole part's body, `None` until more bytes come; an error when the response is
    /// no MJPEG stream or breaks a bound.
    pub fn next_part(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            match self.stage {
                Stage::Head => {
                    let Some(end) = find(&self.buffer, b"\r\n\r\n") else {
                        return self.bounded_head("response head");
                    };
                    self.delimiter = Self::delimiter_of(&self.buffer[..end + 4])?;
                    self.buffer.drain(..end + 4);
                    self.stage = Stage::Boundary;
                }
                Stage::Boundary => {
                    let Some(at) = find(&self.buffer, &self.delimiter) else {
                        // Keep what could be the start of a delimiter; drop what precedes it.
                        let keep = self.delimiter.len().min(self.buffer.len());
                        self.buffer.drain(..self.buffer.len() - keep);
                        return Ok(None);
                    };
                    let Some(end) = self.buffer[at..].iter().position(|b| *b == b'\n') else {
                        self.buffer.drain(..at);
                        return self.bounded_head("boundary line");
                    };
                    self.buffer.drain(..at + end + 1);
                    self.stage = Stage::PartHeaders;
                }
                Stage::PartHeaders => {
                    let (headers_end, length) = if self.buffer.starts_with(b"\r\n") {
                        (2, None)
                    } else {
                        let Some(end) = find(&self.buffer, b"\r\n\r\n") else {
                            return self.bounded_head("part header");
                        };
                        (end + 4, Self::content_length(&self.buffer[..end + 4])?)
                    };
                    self.buffer.drain(..headers_end);
                    self.searched = 0;
                    self.stage = Stage::Body(length);
                }
                Stage::Body(Some(length)) => {
                    if self.buffer.len() < length {
                        return Ok(None);
                    }
                    let part: Vec<u8> = self.buffer.drain(..length).collect();
                    self.stage = Stage::Boundary;
                    return Ok(Some(part));
                }
                Stage::Body(None) => {
                    let from = self.searched.saturating_sub(self.delimiter.len());
                    let Some(at) = find(&self.buffer[from..], &self.delimiter).map(|at| at + from)
                    else {
                        self.searched = self.buffer.len();
                        if self.buffer.len() as u64 > MAX_FRAME_BYTES {
                            return Err(format!(
                                "a part runs over the {MAX_FRAME_BYTES}-byte frame limit"
                            ));
                        }
                        return Ok(None);
                    };
                    let mut part: Vec<u8> = self.buffer.drain(..at).collect();
                    // The line end (and any extra dashes) before the delimiter: not the body's.
                    while part
                        .last()
                        .is_some_and(|b| matches!(b, b'\r' | b'\n' | b'-'))
                    {
                        part.pop();
                    }
                    self.stage = Stage::Boundary;
                    return Ok(Some(part));
                }
            }
        }
    }

    /// Whether the response head was read and found to announce an MJPEG stream.
    pub fn has_head(&self) -> bool {
        self.stage != Stage::Head
    }

    fn bounded_head(&self, what: &str) -> Result<Option<Vec<u8>>, String> {
        match self.buffer.len() > MAX_HEADER_BYTES {
            true => Err(format!("the {what} runs over {MAX_HEADER_BYTES} bytes")),
            false => Ok(None),
        }
    }

    /// The delimiter a response head announces; an error for anything but a 200 multipart.
    fn delimiter_of(head: &[u8]) -> Result<Vec<u8>, String> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("a cut response head".into()),
            Err(error) => return Err(format!("not an HTTP response: {error}")),
        }
        let code = response.code.unwrap_or_default();
        if code != 200 {
            return Err(format!(
                "HTTP {code} {}",
                response.reason.unwrap_or_default()
            ));
        }
        let content_type = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-type"))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .unwrap_or_default();
        let mut params = content_type.split(';');
        let media = params.next().unwrap_or_default().trim();
        if !media.eq_ignore_ascii_case("multipart/x-mixed-replace") {
            return Err(format!(
                "not an MJPEG stream (Content-Type {content_type:?}, expected \
                 multipart/x-mixed-replace)"
            ));
        }
        let boundary = params
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| v.trim().trim_matches('"'))
            // Some cameras put the dashes into the parameter too.
            .map(|v| v.trim_start_matches('-'))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("Content-Type {content_type:?} names no boundary"))?;
        Ok(format!("--{boundary}").into_bytes())
    }

    fn content_length(block: &[u8]) -> Result<Option<usize>, String> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        match httparse::parse_headers(block, &mut headers) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("a cut part header".into()),
            Err(error) => return Err(format!("a part header that is no header: {error}")),
        }
        let Some(header) = headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        else {
            return Ok(None);
        };
        let length = std::str::from_utf8(header.value)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| "a part's Content-Length is not a number".to_owned())?;
        if length > MAX_FRAME_BYTES {
            return Err(format!(
                "a part of {length} bytes is over the {MAX_FRAME_BYTES}-byte frame limit"
            ));
        }
        Ok(Some(length as usize))
    }
}

/// What an MJPEG-over-HTTP source reads and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MjpegSettings {
    /// The stream's URL.
    pub url: HttpUrl,
    /// No frame for this long (the stream silent, or lost and not regained): the session fails.
    pub stall_timeout: Duration,
    /// Between two attempts to connect again after the stream was lost.
    pub reconnect: Duration,
}

struct Connection {
    stream: TcpStream,
    parser: MjpegParser,
    /// Whether a frame of this connection failed to decode (logged once per connection).
    bad_frame_logged: bool,
    /// Whether this connection gave a frame: lost after one, it is connected again at once.
    gave_frame: bool,
}

/// An MJPEG-over-HTTP camera as a [`FrameSource`].
pub struct MjpegHttpSource {
    settings: MjpegSettings,
    what: String,
    connection: Option<Connection>,
    last_frame: Instant,
    next_attempt: Instant,
    failure: Option<SourceError>,
    /// Whether this session tried to connect yet.
    attempted: bool,
    /// The last loss logged at info in this session: the same one again is logged at debug.
    last_loss_logged: Option<String>,
    /// The last call handed out a frame: the time the caller spent on it is no stall.
    handed_out: bool,
}

impl MjpegHttpSource {
    /// A source over the stream `settings` names; connected by each session.
    pub fn new(settings: MjpegSettings) -> Self {
        let what = format!("camera {}", settings.url);
        MjpegHttpSource {
            settings,
            what,
            connection: None,
            last_frame: Instant::now(),
            next_attempt: Instant::now(),
            failure: None,
            attempted: false,
            last_loss_logged: None,
            handed_out: false,
        }
    }

    /// The camera's addresses, resolved by `until` at most: a host name is resolved on a thread
    /// of its own, since the system's resolver cannot be given a deadline (the thread ends when
    /// the resolver gives up; its answer then goes nowhere).
    fn resolve(&self, until: Instant) -> Result<Vec<SocketAddr>, SourceError> {
        let url = &self.settings.url;
        if let Ok(ip) = url.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, url.port)]);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let target = (url.host.clone(), url.port);
        std::thread::Builder::new()
            .name("camera-resolve".into())
            .spawn(move || {
                let _ = sender.send(target.to_socket_addrs().map(Vec::from_iter));
            })
            .map_err(|e| SourceError::unavailable(&self.what, e))?;
        let left = until.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left) {
            Ok(Ok(addresses)) => Ok(addresses),
            Ok(Err(error)) => Err(SourceError::unavailable(&self.what, error)),
            Err(_) => Err(SourceError::unavailable(
                &self.what,
                format!("{} not resolved in time", url.host),
            )),
        }
    }

    /// Connects and sends the request, within `budget` in all: resolving the name, trying each
    /// address, writing.
    fn connect(&self, budget: Duration) -> Result<Connection, SourceError> {
        let url = &self.settings.url;
        let budget = budget.max(Duration::from_millis(1));
        let until = Instant::now() + budget;
        let addresses = self.resolve(until)?;
        let mut last_error = None;
        let mut stream = None;
        for address in addresses {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last_error = Some(format!("not connected within {} ms", budget.as_millis()));
                break;
            }
            match TcpStream::connect_timeout(&address, left) {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) => last_error = Some(error.to_string()),
            }
        }
        let mut stream = stream.ok_or_else(|| {
            SourceError::unavailable(
                &self.what,
                last_error.unwrap_or_else(|| "the host has no address".into()),
            )
        })?;
        let authorization = url
            .authorization
            .as_ref()
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        // HTTP/1.0: the camera answers without chunked transfer encoding, and closes at the end.
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: facepay-edge\r\nAccept: \
             multipart/x-mixed-replace, */*\r\n{authorization}\r\n",
            url.path, url.authority
        );
        let left = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream
            .set_write_timeout(Some(left))
            .and_then(|()| stream.write_all(request.as_bytes()))
            .map_err(|e| SourceError::unavailable(&self.what, e))?;
        Ok(Connection {
            stream,
            parser: MjpegParser::default(),
            bad_frame_logged: false,
            gave_frame: false,
        })
    }

    /// The connection was lost. One that gave a frame is tried again at once (a camera's
    /// hiccup); one that gave none waits `reconnect`, or a camera that accepts and hangs up at
    /// once would be connected to as fast as the round trip.
    fn lost(&mut self, error: SourceError, now: Instant) {
        let gave_frame = self.connection.take().is_some_and(|c| c.gave_frame);
        self.next_attempt = match gave_frame {
            true => now,
            false => now + self.settings.reconnect,
        };
        let text = error.to_string();
        if self.last_loss_logged.as_deref() == Some(text.as_str()) {
            tracing::debug!(source = %self.what, %error, "camera stream lost again; connecting again");
        } else {
            tracing::info!(source = %self.what, %error, "camera stream lost; connecting again");
            self.last_loss_logged = Some(text);
        }
        self.failure = Some(error);
    }

    /// No frame for the stall timeout: the last failure to connect, or the stall.
    fn stalled(&mut self) -> SourceError {
        let stalled = SourceError::Stalled {
            what: self.what.clone(),
            after_ms: self.settings.stall_timeout.as_millis() as u64,
        };
        match self.connection.take() {
            // Connected, yet silent.
            Some(_) => stalled,
            None => self.failure.take().unwrap_or(stalled),
        }
    }
}

/// Reads what `stream` has, waiting until `until` at most: `Ok(None)` when nothing came in time.
fn read_until(
    stream: &mut TcpStream,
    chunk: &mut [u8],
    until: Instant,
) -> std::io::Result<Option<usize>> {
    let wait = until
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(wait))?;
    match stream.read(chunk) {
        Ok(n) => Ok(Some(n)),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

impl FrameSource for MjpegHttpSource {
    /// Connects once, reads the response head and closes: an address that answers with an
    /// HTTP error or with no MJPEG stream shows at start, as an unreachable one does.
    fn check(&mut self) -> Result<(), SourceError> {
        let until = Instant::now() + self.settings.stall_timeout;
        let mut connection = self.connect(self.settings.stall_timeout)?;
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            connection
                .parser
                .next_part()
                .map_err(|detail| SourceError::unusable(&self.what, detail))?;
            if connection.parser.has_head() {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(SourceError::Stalled {
                    what: self.what.clone(),
                    after_ms: self.settings.stall_timeout.as_millis() as u64,
                });
            }
            match read_until(&mut connection.stream, &mut chunk, until) {
                Ok(Some(0)) => {
                    return Err(SourceError::stopped(
                        &self.what,
                        "the camera closed the connection without an answer",
                    ))
                }
                Ok(Some(n)) => connection.parser.feed(&chunk[..n]),
                Ok(None) => {}
                Err(error) => return Err(SourceError::stopped(&self.what, error)),
            }
        }
    }

    fn begin_session(&mut self) -> Result<(), SourceError> {
        // Connected by the session's first `next_frame`, which knows its deadline.
        let now = Instant::now();
        self.connection = None;
        self.failure = None;
        self.attempted = false;
        self.last_loss_logged = None;
        self.last_frame = now;
        self.next_attempt = now;
        Ok(())
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Option<RgbImage>, SourceError> {
        // The stall runs only while this source waits, not while the caller looked at the last
        // frame it handed out (a face analysed, a code searched).
        if std::mem::take(&mut self.handed_out) {
            self.last_frame = Instant::now();
        }
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let now = Instant::now();
            let stall_at = self.last_frame + self.settings.stall_timeout;
            // Checked before anything is read: a camera that always has a frame ready must not
            // keep a session past its deadline.
            if now >= stall_at {
                return Err(self.stalled());
            }
            if now >= deadline {
                return Ok(None);
            }
            let Some(connection) = self.connection.as_mut() else {
                if now < self.next_attempt {
                    std::thread::sleep(self.next_attempt.min(deadline).min(stall_at) - now);
                    continue;
                }
                let first = !std::mem::replace(&mut self.attempted, true);
                match self.connect(deadline.min(stall_at) - now) {
                    Ok(connection) => self.connection = Some(connection),
                    // A camera that is not there is answered at once, not after the stall.
                    Err(error) if first => return Err(error),
                    Err(error) => {
                        self.failure = Some(error);
                        self.next_attempt = now + self.settings.reconnect;
                    }
                }
                continue;
            };
            match connection.parser.next_part() {
                Err(detail) => {
                    self.connection = None;
                    return Err(SourceError::unusable(&self.what, detail));
                }
                Ok(Some(part)) => match decode_mjpeg(&part) {
                    Ok(frame) => {
                        connection.gave_frame = true;
                        self.last_frame = Instant::now();
                        self.handed_out = true;
                        self.failure = None;
                        return Ok(Some(frame));
                    }
                    Err(error) => {
                        if !std::mem::replace(&mut connection.bad_frame_logged, true) {
                            tracing::warn!(source = %self.what, %error, "camera frame that is no JPEG skipped");
                        }
                        continue;
                    }
                },
                Ok(None) => {}
            }
            match read_until(&mut connection.stream, &mut chunk, deadline.min(stall_at)) {
                Ok(Some(0)) => self.lost(
                    SourceError::stopped(&self.what, "the camera closed the stream"),
                    now,
                ),
                Ok(Some(n)) => connection.parser.feed(&chunk[..n]),
                Ok(None) => {}
                Err(error) => self.lost(SourceError::stopped(&self.what, error), now),
            }
        }
    }

    fn end_session(&mut self) {
        // Frames sent after the session are nobody's: the stream is closed, not left to queue.
        self.connection = None;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::TcpListener,
        path::Path,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
    };

    use super::*;
    use crate::codes::{CodeSource as _, QrCodes};

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
    }

    /// The committed QR frame, as the JPEG a camera would send, and the text it holds.
    fn qr_jpeg() -> (Vec<u8>, String) {
        let png = fixture("fuzz/corpus/qr_frame/code.png");
        let image = face::decode::decode_rgb(&png).unwrap();
        let text = paycode::qr::decode(&image::DynamicImage::ImageRgb8(image.clone()).to_luma8())
            .into_iter()
            .next()
            .expect("the fixture holds a QR code");
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&image)
            .unwrap();
        (jpeg, text)
    }

    fn part(jpeg: &[u8], with_length: bool) -> Vec<u8> {
        let mut out = b"--frame\r\nContent-Type: image/jpeg\r\n".to_vec();
        if with_length {
            out.extend_from_slice(format!("Content-Length: {}\r\n", jpeg.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(jpeg);
        out.extend_from_slice(b"\r\n");
        out
    }

    const HEAD: &[u8] = b"HTTP/1.0 200 OK\r\nServer: test-camera\r\n\
        Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n";

    /// A camera on loopback: each connection (after its request) gets what `serve` writes for
    /// its number, 0 first. At most `connections` are served.
    fn camera(
        connections: usize,
        serve: impl Fn(usize, &mut TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/video.mjpg", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let serve = Arc::new(serve);
        std::thread::spawn(move || {
            for n in 0..connections {
                let Ok((mut stream, _)) = listener.accept() else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let serve = serve.clone();
                // Each connection on its own thread: one still streaming never holds up the next.
                std::thread::spawn(move || {
                    let mut request = Vec::new();
                    let mut byte = [0u8; 1];
                    while !request.ends_with(b"\r\n\r\n") && request.len() < 4096 {
                        if stream.read(&mut byte).unwrap_or(0) == 0 {
                            break;
                        }
                        request.push(byte[0]);
                    }
                    assert!(request.starts_with(b"GET /video.mjpg HTTP/1.0\r\n"));
                    let _ = serve(n, &mut stream);
                });
            }
        });
        (url, accepted)
    }

    fn source(url: &str, stall_ms: u64) -> MjpegHttpSource {
        MjpegHttpSource::new(MjpegSettings {
            url: HttpUrl::parse(url).unwrap(),
            stall_timeout: Duration::from_millis(stall_ms),
            reconnect: Duration::from_millis(50),
        })
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    #[test]
    fn frames_arrive_and_decode_faces_and_codes_alike() {
        let faces = [
            "tests/fixtures/faces/bruno-1.jpg",
            "shared/face/tests/fixtures/live.jpg",
        ];
        let (qr, text) = qr_jpeg();
        let mut parts = faces.iter().map(|f| fixture(f)).collect::<Vec<_>>();
        parts.push(qr);
        let expected: Vec<RgbImage> = parts
            .iter()
            .map(|p| face::decode::decode_rgb(p).unwrap())
            .collect();
        let served = parts.clone();
        let (url, accepted) = camera(3, move |_, stream| {
            stream.write_all(HEAD)?;
            // With and without Content-Length, written in small pieces.
            for (n, jpeg) in served.iter().enumerate() {
                for piece in part(jpeg, n % 2 == 0).chunks(7_001) {
                    stream.write_all(piece)?;
                }
            }
            // The camera goes on streaming while it is read.
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        });
        let mut camera = source(&url, 5_000);
        camera.begin_session().unwrap();
        for frame in &expected {
            assert_eq!(&camera.next_frame(far()).unwrap().unwrap(), frame);
        }
        camera.end_session();
        // The same stream read by the code scanner: the QR code's text. Its check at start
        // connects once and reads the response head only.
        let mut codes = QrCodes::new(Box::new(source(&url, 5_000)));
        codes.check().unwrap();
        codes.begin_session().unwrap();
        assert_eq!(codes.next_code(far()).unwrap(), Some(text));
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_dropped_stream_is_connected_again_and_frames_resume() {
        let first = fixture("tests/fixtures/faces/carla-1.jpg");
        let second = fixture("tests/fixtures/faces/dora-1.jpg");
        let (a, b) = (first.clone(), second.clone());
        let (url, accepted) = camera(3, move |n, stream| {
            stream.write_all(HEAD)?;
            let jpeg = if n == 0 { &a } else { &b };
            stream.write_all(&part(jpeg, true))?;
            if n == 0 {
                // Dropped, as a camera rebooting or a flaky link does.
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        });
        let mut camera = source(&url, 5_000);
        camera.begin_session().unwrap();
        let frame = camera.next_frame(far()).unwrap().unwrap();
        assert_eq!(frame, face::decode::decode_rgb(&first).unwrap());
        let frame = camera.next_frame(far()).unwrap().unwrap();
        assert_eq!(frame, face::decode::decode_rgb(&second).unwrap());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_stalled_stream_fails_within_the_stall_timeout() {
        let (url, _) = camera_silent();
        let mut camera = source(&url, 300);
        camera.begin_session().unwrap();
        let started = Instant::now();
        let error = camera.next_frame(far()).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "bounded by the stall timeout"
        );
        assert_eq!(
            error.to_string(),
            format!("camera {url} stalled: no frame for 300 ms")
        );
        // A deadline before the stall timeout is only "no frame yet".
        let (url, _) = camera_silent();
        let mut camera = source(&url, 60_000);
        camera.begin_session().unwrap();
        let soon = Instant::now() + Duration::from_millis(100);
        assert_eq!(camera.next_frame(soon).unwrap(), None);
    }

    fn camera_silent() -> (String, Arc<AtomicUsize>) {
        camera(1, |_, stream| {
            stream.write_all(HEAD)?;
            std::thread::sleep(Duration::from_secs(30));
            Ok(())
        })
    }

    #[test]
    fn an_unreachable_camera_or_a_wrong_answer_is_a_clear_error() {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/video.mjpg", closed.local_addr().unwrap());
        drop(closed);
        let mut unreachable = source(&url, 1_000);
        // The session's first attempt to connect answers at once, not after the stall timeout.
        unreachable.begin_session().unwrap();
        let error = unreachable.next_frame(far()).unwrap_err();
        assert_eq!(error.kind(), "unavailable");
        assert!(
            error.to_string().starts_with(&format!(
                "camera {url} cannot be opened: Connection refused"
            )),
            "{error}"
        );
        let (url, _) = camera(1, |_, stream| {
            stream.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        });
        let mut camera = source(&url, 2_000);
        camera.begin_session().unwrap();
        assert_eq!(
            camera.next_frame(far()).unwrap_err().to_string(),
            format!("camera {url} is not usable: HTTP 404 Not Found")
        );
        // Lost mid-session and never back: the last failure, within the stall timeout.
        let (url, _) = camera_once_then_gone();
        let mut camera = source(&url, 300);
        camera.begin_session().unwrap();
        assert!(camera.next_frame(far()).unwrap().is_some());
        let error = camera.next_frame(far()).unwrap_err();
        assert!(matches!(error.kind(), "unavailable" | "stopped"), "{error}");
    }

    /// Serves one frame on one connection, then closes its listener.
    fn camera_once_then_gone() -> (String, ()) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/video.mjpg", listener.local_addr().unwrap());
        let jpeg = fixture("tests/fixtures/faces/stranger.jpg");
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            drop(listener);
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(HEAD);
            let _ = stream.write_all(&part(&jpeg, true));
        });
        (url, ())
    }

    fn parts_of(stream: &[u8], piece: usize) -> Result<Vec<Vec<u8>>, String> {
        let mut parser = MjpegParser::default();
        let mut parts = Vec::new();
        for chunk in stream.chunks(piece) {
            parser.feed(chunk);
            while let Some(part) = parser.next_part()? {
                parts.push(part);
            }
        }
        Ok(parts)
    }

    #[test]
    fn the_parser_cuts_parts_with_or_without_lengths_however_the_bytes_come() {
        let mut stream = b"HTTP/1.1 200 OK\r\nContent-Type: Multipart/X-Mixed-Replace; \
            boundary=\"--myboundary\"\r\n\r\npreamble\r\n"
            .to_vec();
        stream.extend_from_slice(
            b"--myboundary\r\nContent-Type: image/jpeg\r\nContent-Length: 5\r\n\r\nab--c\r\n",
        );
        stream.extend_from_slice(b"--myboundary\r\nContent-Type: image/jpeg\r\n\r\nx\r\n--my\r\n");
        stream.extend_from_slice(b"--myboundary\r\n\r\nthird\r\n--myboundary\r\n");
        let expected = vec![b"ab--c".to_vec(), b"x\r\n--my".to_vec(), b"third".to_vec()];
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(
                parts_of(&stream, piece).unwrap(),
                expected,
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn the_parser_refuses_what_is_no_mjpeg_stream_or_breaks_a_bound() {
        let check = |stream: &[u8], error: &str| {
            let got = parts_of(stream, 4096).unwrap_err();
            assert!(got.contains(error), "{got:?} lacks {error:?}");
        };
        check(
            b"HTTP/1.0 401 Unauthorized\r\n\r\n",
            "HTTP 401 Unauthorized",
        );
        check(
            b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n",
            "not an MJPEG stream",
        );
        check(
            b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace\r\n\r\n",
            "names no boundary",
        );
        check(b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response");
        let mut endless_head = b"HTTP/1.0 200 OK\r\n".to_vec();
        endless_head.extend(std::iter::repeat_n(b'x', MAX_HEADER_BYTES + 1));
        check(&endless_head, "response head runs over 16384 bytes");
        let mut big_header = HEAD.to_vec();
        big_header.extend_from_slice(b"--frame\r\nX: ");
        big_header.extend(std::iter::repeat_n(b'x', MAX_HEADER_BYTES + 1));
        check(&big_header, "part header runs over");
        let mut too_long = HEAD.to_vec();
        too_long.extend_from_slice(
            format!("--frame\r\nContent-Length: {}\r\n\r\n", MAX_FRAME_BYTES + 1).as_bytes(),
        );
        check(&too_long, "over the 16777216-byte frame limit");
        let mut endless_part = HEAD.to_vec();
        endless_part.extend_from_slice(b"--frame\r\n\r\n");
        endless_part.extend(std::iter::repeat_n(0u8, MAX_FRAME_BYTES as usize + 2));
        check(&endless_part, "runs over the 16777216-byte frame limit");
    }

    /// The smallest JPEG a camera could send: 8x8 grey.
    fn tiny_jpeg() -> Vec<u8> {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 50)
            .encode_image(&RgbImage::from_pixel(8, 8, image::Rgb([90, 90, 90])))
            .unwrap();
        jpeg
    }

    #[test]
    fn a_session_ends_at_its_deadline_however_many_frames_are_ready() {
        let batch: Vec<u8> = (0..200).flat_map(|_| part(&tiny_jpeg(), true)).collect();
        // A camera that floods: every read finds many frames waiting.
        let (url, _) = camera(1, move |_, stream| {
            stream.write_all(HEAD)?;
            loop {
                stream.write_all(&batch)?;
            }
        });
        let mut camera = source(&url, 10_000);
        camera.begin_session().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut frames = 0;
        loop {
            let called = Instant::now();
            if camera.next_frame(deadline).unwrap().is_none() {
                break;
            }
            // Frames are always waiting, read and buffered: none answers a call after the
            // deadline.
            assert!(
                called < deadline,
                "a frame after the deadline ({frames} before)"
            );
            frames += 1;
            assert!(Instant::now() < deadline + Duration::from_secs(5));
        }
        assert!(frames > 0);
        assert_eq!(camera.next_frame(deadline).unwrap(), None);
    }

    #[test]
    fn a_camera_that_hangs_up_at_once_is_connected_again_every_reconnect() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/video.mjpg", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        // Reconnecting every 50 ms for a session of 1 s: about 20 connections, not one per
        // round trip.
        let mut camera = source(&url, 10_000);
        camera.begin_session().unwrap();
        let deadline = Instant::now() + Duration::from_millis(1_000);
        assert_eq!(camera.next_frame(deadline).unwrap(), None);
        let connections = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=40).contains(&connections),
            "{connections} connections in a session of 1 s"
        );
    }

    /// A listener whose backlog is full: connecting to it hangs.
    fn camera_not_answering() -> (String, TcpListener, Vec<TcpStream>) {
        let fd = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .unwrap();
        rustix::net::bind(&fd, &std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        rustix::net::listen(&fd, 0).unwrap();
        let listener = TcpListener::from(fd);
        let address = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..16 {
            match TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                Ok(stream) => queued.push(stream),
                Err(_) => break,
            }
        }
        (format!("http://{address}/video.mjpg"), listener, queued)
    }

    #[test]
    fn connecting_waits_no_longer_than_the_session_deadline() {
        let (url, _listener, _queued) = camera_not_answering();
        let mut camera = source(&url, 30_000);
        camera.begin_session().unwrap();
        let started = Instant::now();
        let error = camera
            .next_frame(started + Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(error.kind(), "unavailable", "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "bounded by the deadline, not the stall timeout: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_check_at_start_reads_the_answer_not_only_the_connection() {
        let (url, _) = camera(1, |_, stream| {
            stream.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        });
        let error = source(&url, 2_000).check().unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("camera {url} is not usable: HTTP 404 Not Found")
        );
        let (url, _) = camera(1, |_, stream| {
            stream
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>login</html>")
        });
        let error = source(&url, 2_000).check().unwrap_err();
        assert_eq!(error.kind(), "unusable");
        assert!(error.to_string().contains("not an MJPEG stream"), "{error}");
        // Silent after the connection: no answer within the stall timeout.
        let (url, _) = camera(1, |_, _| {
            std::thread::sleep(Duration::from_secs(10));
            Ok(())
        });
        assert_eq!(source(&url, 300).check().unwrap_err().kind(), "stalled");
        let (url, _) = camera(1, |_, stream| stream.write_all(HEAD));
        source(&url, 2_000).check().unwrap();
    }

    #[test]
    fn credentials_are_never_shown() {
        for url in [
            "ftp://admin:s3cret@camera/",
            "http://admin:s3cret@[::1/",
            "http://admin:s3cret@camera:port/",
            "http://admin:s3cret@/video",
            "http://admin:s3cret@camera/a b",
            "http://admin:s3/cret@camera/",
        ] {
            let error = HttpUrl::parse(url).unwrap_err();
            assert!(!error.contains("s3"), "{url}: {error}");
            assert!(error.contains("***@"), "{url}: {error}");
        }
        let url = HttpUrl::parse("http://admin:s3cret@camera/video").unwrap();
        let settings = MjpegSettings {
            url,
            stall_timeout: Duration::from_secs(1),
            reconnect: Duration::from_secs(1),
        };
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("YWRtaW46czNjcmV0"),
            "{shown}"
        );
        assert!(shown.contains("http://camera/video"), "{shown}");
    }

    #[test]
    fn a_live_camera_scan_goes_on_past_a_code_that_is_not_facepay() {
        let jpeg_of = |text: &str| {
            let qr = paycode::qr::render_image(text).unwrap();
            let rgb = image::DynamicImage::ImageLuma8(qr).to_rgb8();
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                .encode_image(&rgb)
                .unwrap();
            jpeg
        };
        let poster = jpeg_of("https://example.com/summer-sale");
        let (phone, code) = qr_jpeg();
        assert!(code.starts_with(paycode::CODE_PREFIX));
        let serve = move |_: usize, stream: &mut TcpStream| {
            stream.write_all(HEAD)?;
            stream.write_all(&part(&poster, true))?;
            stream.write_all(&part(&phone, true))?;
            std::thread::sleep(Duration::from_secs(5));
            Ok(())
        };
        let (url, _) = camera(2, serve);
        // A live camera: the poster in view does not end the scan.
        let mut live = QrCodes::new(Box::new(source(&url, 5_000))).facepay_only();
        live.begin_session().unwrap();
        assert_eq!(live.next_code(far()).unwrap(), Some(code));
        // As a spool's frames are read: the first code, which the checkout declines.
        let mut any = QrCodes::new(Box::new(source(&url, 5_000)));
        any.begin_session().unwrap();
        assert_eq!(
            any.next_code(far()).unwrap().as_deref(),
            Some("https://example.com/summer-sale")
        );
    }

    #[test]
    fn urls_are_plain_http_with_optional_credentials() {
        let url =
            HttpUrl::parse("http://admin:s3cret@192.168.1.20:8080/axis-cgi/mjpg/video.cgi?fps=10")
                .unwrap();
        assert_eq!(url.host, "192.168.1.20");
        assert_eq!(url.port, 8080);
        assert_eq!(url.path, "/axis-cgi/mjpg/video.cgi?fps=10");
        assert_eq!(url.authorization.as_deref(), Some("Basic YWRtaW46czNjcmV0"));
        // Shown without the password.
        assert_eq!(
            url.to_string(),
            "http://192.168.1.20:8080/axis-cgi/mjpg/video.cgi?fps=10"
        );
        let url = HttpUrl::parse("HTTP://[::1]/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 80));
        assert_eq!(HttpUrl::parse("http://camera").unwrap().path, "/");
        assert!(HttpUrl::parse("https://camera/")
            .unwrap_err()
            .contains("https is not supported"));
        assert!(HttpUrl::parse("rtsp://camera/").is_err());
        assert!(HttpUrl::parse("http://:80/").is_err());
        assert!(HttpUrl::parse("http://camera:99999/").is_err());
        assert!(HttpUrl::parse("http://camera/a b").is_err());
    }
}
