//! Where the terminal's scanner and camera get their frames: the [`FrameSource`] seam and its
//! spool directory; `v4l2` and `mjpeg` hold the camera devices behind it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use image::RgbImage;

use crate::error::SourceError;

/// Largest image file accepted as a frame; bigger files are skipped unread.
pub const MAX_FRAME_BYTES: u64 = 16 * 1024 * 1024;

/// A spooled frame older than this when a session starts belongs to no one at the till now: it
/// is dropped unread (`DirectorySource::begin_session`).
pub const MAX_FRAME_AGE: Duration = Duration::from_secs(10);

/// A source of colour frames: a spool directory, a V4L2 camera, an MJPEG-over-HTTP camera.
/// Implementations block, so they are only ever called from the scanner's or the camera's
/// dedicated thread.
pub trait FrameSource: Send {
    /// Opens the source outside any session, to tell at start whether it works (a spool always
    /// does; a device is opened, a stream connected once).
    fn check(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// A session (one customer) starts: frames left from before it must not be read in it. A
    /// source that cannot be opened (a missing device, an unreachable camera) says so here.
    fn begin_session(&mut self) -> Result<(), SourceError> {
        Ok(())
    }

    /// The next frame, waiting until `deadline` at most; `None` when none came in time, an
    /// error when the source stopped or stalled.
    fn next_frame(&mut self, deadline: Instant) -> Result<Option<RgbImage>, SourceError>;

    /// The session ended: frames it did not read are nobody's, dropped unread, so the next
    /// session (the next customer) never sees them.
    fn end_session(&mut self) {}
}

/// What a live camera's session does next, as [`StallWatch::next`] decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Wait for a frame until this instant at most, then ask again.
    Read {
        /// The deadline or the stall, whichever comes first.
        until: Instant,
    },
    /// The session's deadline passed: no frame, however many are ready.
    TimeUp,
    /// The stall timeout passed without a good frame: the session fails.
    Failed(SourceError),
}

/// When a live camera's session ends: at its deadline with no frame, or with an error once the
/// stall timeout passes without a good frame, silent or sending only frames that cannot be
/// read (then the error is the last of them). A plain state machine: time is an input.
#[derive(Debug, Clone)]
pub struct StallWatch {
    what: String,
    stall_timeout: Duration,
    last_good: Instant,
    last_error: Option<String>,
    /// A good frame was handed out: the time its caller spends on it is no stall.
    handed_out: bool,
}

impl StallWatch {
    /// A watch over the source `what` names, its stall timeout running from `now`.
    pub fn new(what: &str, stall_timeout: Duration, now: Instant) -> Self {
        StallWatch {
            what: what.to_owned(),
            stall_timeout,
            last_good: now,
            last_error: None,
            handed_out: false,
        }
    }

    /// A good frame is handed out at `now`; the stall timeout runs again from the source's next
    /// read ([`StallWatch::reading`]), not while its caller looks at the frame.
    pub fn handed_out(&mut self, now: Instant) {
        self.restart(now);
        self.handed_out = true;
    }

    /// The source is asked for a frame at `now`: after a frame handed out, the stall timeout
    /// runs from here.
    pub fn reading(&mut self, now: Instant) {
        if std::mem::take(&mut self.handed_out) {
            self.restart(now);
        }
    }

    /// A session starts, or a good frame came: the stall timeout runs from `now` again.
    pub fn restart(&mut self, now: Instant) {
        self.last_good = now;
        self.last_error = None;
    }

    /// A frame that could not be read: it does not hold off the stall.
    pub fn bad_frame(&mut self, error: String) {
        self.last_error = Some(error);
    }

    /// What to do at `now` in a session ending at `deadline`. Asked before every read, so a
    /// camera that always has a frame ready cannot keep a session past either.
    pub fn next(&self, now: Instant, deadline: Instant) -> Next {
        let stall_at = self.last_good + self.stall_timeout;
        if now >= stall_at {
            let after_ms = self.stall_timeout.as_millis() as u64;
            return Next::Failed(match &self.last_error {
                Some(error) => SourceError::unusable(
                    &self.what,
                    format!("no good frame for {after_ms} ms; the last one: {error}"),
                ),
                None => SourceError::Stalled {
                    what: self.what.clone(),
                    after_ms,
                },
            });
        }
        if now >= deadline {
            return Next::TimeUp;
        }
        Next::Read {
            until: deadline.min(stall_at),
        }
    }
}

/// Waits until `fd` can be read (or has hung up) or `deadline` passes; whether it can.
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    deadline: Instant,
) -> std::io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// The file system type a path lives on, from the longest mount point containing it in
/// `/proc/self/mountinfo` (Linux); `None` where that cannot be read.
pub fn file_system_of(path: &std::path::Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        // `id parent major:minor root mount-point options [optional...] - fstype source opts`
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?.replace("\\040", " ");
        let fs_type = right.split(' ').next()?.to_owned();
        let inside = path.starts_with(&mount_point);
        if inside
            && best
                .as_ref()
                .is_none_or(|(len, _)| mount_point.len() >= *len)
        {
            best = Some((mount_point.len(), fs_type));
        }
    }
    best.map(|(_, fs_type)| fs_type)
}

/// Checks that a spool directory is the terminal's alone and, with `in_memory`, that it keeps
/// frames in memory (tmpfs or ramfs): raw face frames and the codes in them never reach a
/// persistent disk, and nobody else reads them, adds frames, or swaps the directory. It is
/// created (mode 700) when missing, and narrowed to 700 when this user owns it; the error names
/// the directory and what is wrong.
pub fn check_spool(key: &str, dir: &std::path::Path, in_memory: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| anyhow::anyhow!("creating {key} {}: {e}", dir.display()))?;
    let me = std::fs::metadata("/proc/self")
        .map_err(|e| anyhow::anyhow!("reading who this process runs as: {e}"))?
        .uid();
    let refuse = |step: &std::path::Path, meta: &std::fs::Metadata| {
        anyhow::anyhow!(
            "{key} {}: {} (owner {}, mode {:o}) lets others read, add or swap frames; the spool \
             must be this user's alone (mode 700, in directories only it or root may change)",
            dir.display(),
            step.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )
    };
    // Every link on the way as written belongs to this user or root (only they can re-point it).
    let written = std::path::absolute(dir)
        .map_err(|e| anyhow::anyhow!("resolving {key} {}: {e}", dir.display()))?;
    for step in written.ancestors() {
        let meta = std::fs::symlink_metadata(step)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", step.display()))?;
        if meta.file_type().is_symlink() {
            if step == written {
                anyhow::bail!(
                    "{key} {} is a symbolic link; name the directory itself",
                    dir.display()
                );
            }
            if meta.uid() != me && meta.uid() != 0 {
                return Err(refuse(step, &meta));
            }
        }
    }
    // Every directory it resolves to, and above, belongs to this user or root, and only they may
    // write there (a shared one such as /dev/shm only with its sticky bit, owned by root).
    let resolved = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("resolving {key} {}: {e}", dir.display()))?;
    for (n, step) in resolved.ancestors().enumerate() {
        let meta = std::fs::metadata(step)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", step.display()))?;
        let mode = meta.mode();
        if n == 0 && meta.uid() == me && mode & 0o077 != 0 {
            std::fs::set_permissions(step, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| anyhow::anyhow!("narrowing {key} {} to 700: {e}", dir.display()))?;
            continue;
        }
        let shared = mode & 0o022 != 0;
        let sticky_root = mode & 0o1000 != 0 && meta.uid() == 0;
        let others_read = n == 0 && mode & 0o077 != 0;
        if (meta.uid() != me && meta.uid() != 0) || (shared && !sticky_root) || others_read {
            return Err(refuse(step, &meta));
        }
    }
    if !in_memory {
        return Ok(());
    }
    match file_system_of(dir).as_deref() {
        Some("tmpfs" | "ramfs") => Ok(()),
        other => anyhow::bail!(
            "{key} {} is on {}, not in memory: raw frames would sit on a persistent disk; put it \
             on tmpfs (a systemd RuntimeDirectory, /dev/shm/...) or set \
             frames_on_persistent_disk = true",
            dir.display(),
            other.unwrap_or("a file system that cannot be told")
        ),
    }
}

/// A spool directory: each image file that appears is one frame, read once and then removed,
/// oldest name first. Files whose names start with `.` are ignored, so a writer can create
/// `.name.tmp` and rename it into place.
pub struct DirectorySource {
    dir: PathBuf,
    poll_interval: Duration,
    skipped: BTreeSet<PathBuf>,
}

impl DirectorySource {
    /// A source over `dir`, created if missing.
    pub fn new(dir: &Path, poll_interval: Duration) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(DirectorySource {
            dir: dir.to_owned(),
            poll_interval,
            skipped: BTreeSet::new(),
        })
    }

    /// The frames waiting (hidden and unremovable files aside).
    fn frames(&self) -> Vec<std::fs::DirEntry> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
            .filter(|e| !e.file_name().to_str().unwrap_or(".").starts_with('.'))
            .filter(|e| !self.skipped.contains(&e.path()))
            .collect()
    }

    fn oldest_file(&self) -> Option<PathBuf> {
        self.frames().into_iter().map(|e| e.path()).min()
    }

    /// Removes frames unread: those `stale` says are, all when it says so of each.
    fn drop_frames(&mut self, stale: impl Fn(&std::fs::DirEntry) -> bool) {
        for entry in self.frames().into_iter().filter(|e| stale(e)) {
            let path = entry.path();
            if std::fs::remove_file(&path).is_err() {
                self.skipped.insert(path.clone());
            }
            tracing::info!(path = %path.display(), "frame from outside the session dropped unread");
        }
    }

    fn read(path: &Path) -> Result<RgbImage, String> {
        let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        if size > MAX_FRAME_BYTES {
            return Err(format!(
                "{size} bytes is over the {MAX_FRAME_BYTES}-byte frame limit"
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        // By content, with the size checked from the header and EXIF orientation applied.
        face::decode::decode_rgb(&bytes).map_err(|e| e.to_string())
    }
}

impl FrameSource for DirectorySource {
    fn next_frame(&mut self, deadline: Instant) -> Result<Option<RgbImage>, SourceError> {
        loop {
            if let Some(path) = self.oldest_file() {
                let frame = Self::read(&path);
                if std::fs::remove_file(&path).is_err() {
                    // Cannot consume it (permissions): never look at it again.
                    self.skipped.insert(path.clone());
                }
                match frame {
                    Ok(frame) => return Ok(Some(frame)),
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "unreadable frame skipped");
                        continue;
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(self.poll_interval.min(deadline - now));
        }
    }

    fn begin_session(&mut self) -> Result<(), SourceError> {
        let cutoff = std::time::SystemTime::now() - MAX_FRAME_AGE;
        self.drop_frames(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .map_or(true, |written| written < cutoff)
        });
        Ok(())
    }

    fn end_session(&mut self) {
        self.drop_frames(|_| true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_session_ends_at_its_deadline_or_fails_at_the_stall() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = StallWatch::new("camera /dev/video0", Duration::from_millis(1_000), start);
        // Before both: read until the first of them.
        assert_eq!(watch.next(at(0), at(400)), Next::Read { until: at(400) });
        assert_eq!(
            watch.next(at(0), at(5_000)),
            Next::Read { until: at(1_000) }
        );
        // Past the deadline: no more frames, even with one ready.
        assert_eq!(watch.next(at(400), at(400)), Next::TimeUp);
        // Good frames hold off the stall.
        watch.restart(at(900));
        assert_eq!(
            watch.next(at(1_500), at(5_000)),
            Next::Read { until: at(1_900) }
        );
        // Silent: stalled.
        assert_eq!(
            watch.next(at(1_900), at(5_000)),
            Next::Failed(SourceError::Stalled {
                what: "camera /dev/video0".into(),
                after_ms: 1_000
            })
        );
        // Only bad frames (flagged buffers, short YUYV, JPEGs that do not decode): unusable,
        // with the last error, once the stall timeout passes without a good frame.
        watch.bad_frame("the driver flagged the buffer as corrupt".into());
        watch.bad_frame("a 640x480 YUYV frame needs 614400 bytes, got 12".into());
        assert_eq!(
            watch.next(at(1_800), at(5_000)),
            Next::Read { until: at(1_900) }
        );
        let Next::Failed(error) = watch.next(at(1_900), at(5_000)) else {
            panic!("fails at the stall");
        };
        assert_eq!(
            error.to_string(),
            "camera /dev/video0 is not usable: no good frame for 1000 ms; the last one: a \
             640x480 YUYV frame needs 614400 bytes, got 12"
        );
        // The stall wins over a deadline passed with it; a good frame forgets the bad ones.
        assert!(matches!(watch.next(at(2_000), at(2_000)), Next::Failed(_)));
        watch.restart(at(2_000));
        assert_eq!(watch.next(at(2_100), at(2_100)), Next::TimeUp);
        assert!(matches!(
            watch.next(at(3_000), at(9_000)),
            Next::Failed(SourceError::Stalled { .. })
        ));
    }

    #[test]
    fn the_time_a_caller_spends_on_a_frame_is_no_stall() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = StallWatch::new("camera /dev/video0", Duration::from_millis(200), start);
        // A frame handed out at 100 ms, analysed for 500 ms (longer than the stall timeout):
        // the next read starts a fresh stall timeout.
        watch.handed_out(at(100));
        watch.reading(at(600));
        assert_eq!(
            watch.next(at(600), at(5_000)),
            Next::Read { until: at(800) }
        );
        // Without a frame handed out, reading does not hold off the stall.
        watch.reading(at(900));
        assert!(matches!(
            watch.next(at(900), at(5_000)),
            Next::Failed(SourceError::Stalled { .. })
        ));
    }

    #[test]
    fn frames_come_oldest_name_first_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_pixel(8, 8, image::Rgb([7, 7, 7]));
        img.save(dir.path().join("b.png")).unwrap();
        RgbImage::from_pixel(4, 4, image::Rgb([1, 1, 1]))
            .save(dir.path().join("a.png"))
            .unwrap();
        std::fs::write(dir.path().join("broken.png"), b"not an image").unwrap();
        // A header claiming 30000x30000: refused from the header, never decoded.
        let huge = include_bytes!("../../shared/face/tests/fixtures/huge-30000.png");
        std::fs::write(dir.path().join("huge.png"), huge).unwrap();
        std::fs::write(dir.path().join(".partial.png"), b"x").unwrap();
        let mut source = DirectorySource::new(dir.path(), Duration::from_millis(1)).unwrap();
        let soon = || Instant::now() + Duration::from_millis(50);
        assert_eq!(source.next_frame(soon()).unwrap().unwrap().width(), 4);
        assert_eq!(source.next_frame(soon()).unwrap().unwrap().width(), 8);
        assert!(
            source.next_frame(soon()).unwrap().is_none(),
            "broken file skipped, hidden file ignored"
        );
        assert!(dir.path().join(".partial.png").exists());
        assert!(!dir.path().join("broken.png").exists());
        assert!(!dir.path().join("huge.png").exists());
    }

    #[test]
    fn a_session_never_reads_frames_left_from_before_it_or_after_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let frame = |name: &str| {
            RgbImage::from_pixel(4, 4, image::Rgb([1, 1, 1]))
                .save(dir.path().join(name))
                .unwrap();
        };
        let mut source = DirectorySource::new(dir.path(), Duration::from_millis(1)).unwrap();
        let soon = || Instant::now() + Duration::from_millis(20);
        // A frame left long ago (the previous customer's): dropped when a session starts.
        frame("a-old.png");
        let old = std::fs::File::options()
            .write(true)
            .open(dir.path().join("a-old.png"))
            .unwrap();
        old.set_modified(std::time::SystemTime::now() - 2 * MAX_FRAME_AGE)
            .unwrap();
        // One just written for this session: read.
        frame("b-now.png");
        source.begin_session().unwrap();
        assert!(!dir.path().join("a-old.png").exists());
        assert!(source.next_frame(soon()).unwrap().is_some());
        // Frames the session did not read are dropped when it ends: the next customer's
        // session starts empty.
        frame("c-left.png");
        frame("d-left.png");
        source.end_session();
        source.begin_session().unwrap();
        assert!(source.next_frame(soon()).unwrap().is_none());
        assert!(!dir.path().join("c-left.png").exists());
    }
}
