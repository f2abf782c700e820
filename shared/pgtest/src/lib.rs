//! A PostgreSQL server of a test's own, from Debian's package: `initdb` in a temporary directory,
//! started on a free loopback port, so that a test can stop, kill and restart it (the machine's
//! own PostgreSQL service is never used).
//!
//! [`Postgres::start`] gives a server the caller owns (stopped when dropped); [`shared`] one server
//! per test process, each test taking a fresh schema on it ([`fresh_schema`]), stopped by a
//! watchdog when the process exits (statics are never dropped).
//!
//! `initdb` refuses to run as root: as root, the server's directory is handed to the `postgres`
//! user and every PostgreSQL command runs as that user (`runuser`).

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

/// The role every test server is made with (trust authentication on loopback).
pub const USER: &str = "facepay";

/// The database every test server is made with.
pub const DATABASE: &str = "facepay";

/// How long a server may take to start before the start is an error.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A PostgreSQL server in a temporary directory.
pub struct Postgres {
    port: u16,
    /// Holds the data directory (`data`), the socket and the log; removed when dropped.
    dir: tempfile::TempDir,
    bin: PathBuf,
    durable: bool,
}

/// What went wrong starting or stopping a server: the command and what it said.
pub type Error = String;

/// A TLS server's certificate files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The CA client certificates must chain to.
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

fn append(path: &Path, text: &str) -> Result<(), Error> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("appending to {}: {e}", path.display()))
}

impl Postgres {
    /// Makes and starts a server with `fsync` off: a killed server loses nothing (the kernel
    /// keeps what it wrote), only a machine crash would, and tests never crash the machine.
    pub fn start() -> Result<Self, Error> {
        Self::start_with(false)
    }

    /// Makes and starts a server that flushes every commit to disk, as deployed: for
    /// benchmarks whose figures must hold in production.
    pub fn start_durable() -> Result<Self, Error> {
        Self::start_with(true)
    }

    /// Makes and starts a server that takes TCP clients only over TLS with a client certificate
    /// (`hostssl ... cert`), as a fleet's database: its certificate is `tls`'s, and a client
    /// certificate named `cloud` or `cloud:<instance>` logs in as [`USER`]. Local tools reach it
    /// over its Unix socket ([`Postgres::socket_url`]).
    pub fn start_tls(tls: &ServerTls) -> Result<Self, Error> {
        Self::start_tls_with(tls, false)
    }

    /// [`Postgres::start_tls`] flushing every commit to disk, as deployed: for benchmarks.
    pub fn start_tls_durable(tls: &ServerTls) -> Result<Self, Error> {
        Self::start_tls_with(tls, true)
    }

    fn start_tls_with(tls: &ServerTls, durable: bool) -> Result<Self, Error> {
        let mut server = Self::make(durable)?;
        let data = server.dir.path().join("data");
        for (from, to) in [
            (&tls.cert, "server.crt"),
            (&tls.key, "server.key"),
            (&tls.ca, "ca.crt"),
        ] {
            std::fs::copy(from, data.join(to)).map_err(|e| format!("copying {from:?}: {e}"))?;
        }
        let settings = "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                        ssl_ca_file = 'ca.crt'\n";
        append(&data.join("postgresql.conf"), settings)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 cert map=fleet\n",
        )
        .map_err(|e| format!("writing pg_hba.conf: {e}"))?;
        std::fs::write(
            data.join("pg_ident.conf"),
            format!("fleet /^cloud(:[A-Za-z0-9._-]+)?$ {USER}\n"),
        )
        .map_err(|e| format!("writing pg_ident.conf: {e}"))?;
        if as_root() {
            run(Command::new("chown").args(["-R", "postgres"]).arg(&data))?;
        }
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")))?;
        server.launch()?;
        Ok(server)
    }

    fn start_with(durable: bool) -> Result<Self, Error> {
        let mut server = Self::make(durable)?;
        server.launch()?;
        Ok(server)
    }

    /// initdb in a new directory.
    fn make(durable: bool) -> Result<Self, Error> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("facepay-pg-")
            .tempdir()
            .map_err(|e| format!("making a directory for PostgreSQL: {e}"))?;
        if as_root() {
            run(Command::new("chown").arg("postgres").arg(dir.path()))?;
        }
        run(postgres_command(&bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync"]))?;
        Ok(Postgres {
            port: 0,
            dir,
            bin,
            durable,
        })
    }

    /// Starts the server made, on a free port, and creates [`DATABASE`].
    fn launch(&mut self) -> Result<(), Error> {
        // A port free a moment ago may be taken by the time the server binds it: try others.
        let mut last = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.start_server() {
                Ok(()) => return self.create_database(),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn start_server(&self) -> Result<(), Error> {
        let fsync = if self.durable { "on" } else { "off" };
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={fsync} -c max_connections=200",
            self.port,
            self.dir.path().display(),
        );
        run(postgres_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-o", &options, "-l"])
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"]))?;
        wait_for_port(self.port)
    }

    fn create_database(&self) -> Result<(), Error> {
        run(postgres_command(&self.bin.join("createdb"))
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", USER])
            .arg(DATABASE))
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for [`DATABASE`] as [`USER`].
    pub fn url(&self) -> String {
        format!(
            "postgresql://{USER}@127.0.0.1:{}/{DATABASE}?connect_timeout=10",
            self.port
        )
    }

    /// A connection string for [`DATABASE`] as [`USER`] over the server's Unix socket (local
    /// tools; a TLS-only server takes no plain TCP client).
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user={USER} dbname={DATABASE} connect_timeout=10",
            self.dir.path().display(),
            self.port
        )
    }

    /// Where the server's log is.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// Kills the server at once (SIGKILL to every PostgreSQL process of it): what a machine
    /// losing power does to the database, bar the page cache.
    pub fn kill(&mut self) -> Result<(), Error> {
        self.stop_mode("immediate")
    }

    /// Stops the server cleanly.
    pub fn stop(&mut self) -> Result<(), Error> {
        self.stop_mode("fast")
    }

    fn stop_mode(&mut self, mode: &str) -> Result<(), Error> {
        run(postgres_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", mode, "-w", "stop"]))
    }

    /// Starts the server again on the same port, with what it had.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.start_server()
    }

    /// The server's main process (its postmaster; every backend is a child of it), from its
    /// `postmaster.pid`.
    pub fn pid(&self) -> Result<u32, Error> {
        let path = self.dir.path().join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .ok_or_else(|| format!("{} names no process", path.display()))
    }

    /// Whether something answers on its port.
    pub fn is_up(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.is_up() {
            let _ = self.stop_mode("immediate");
        }
    }
}

/// One server for the whole test process, started on first use and stopped when the process
/// exits. Tests sharing it each take their own schema ([`fresh_schema`]).
pub fn shared() -> &'static Postgres {
    static SERVER: OnceLock<Postgres> = OnceLock::new();
    SERVER.get_or_init(|| {
        let server = Postgres::start().unwrap_or_else(|e| panic!("a test PostgreSQL: {e}"));
        watch_parent(&server);
        server
    })
}

/// A schema name no other test of this process (or another process on the same server) has
/// taken.
pub fn fresh_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A small shell process that stops the server once this process is gone: a static is never
/// dropped, and a server left running would outlive the test run.
fn watch_parent(server: &Postgres) {
    // The watchdog runs as this process's user (it removes the directory); pg_ctl must run as
    // the server's owner.
    let pg_ctl = server.bin.join("pg_ctl").display().to_string();
    let pg_ctl = match as_root() {
        true => format!("runuser -u postgres -- {pg_ctl}"),
        false => pg_ctl,
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         {pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        data = server.dir.path().join("data").display(),
        dir = server.dir.path().display(),
    );
    // Never waited for: it is meant to outlive this process.
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the PostgreSQL watchdog starts");
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL command, run as `postgres` when this process is root.
fn postgres_command(program: &Path) -> Command {
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Where Debian keeps the server's programs (the newest version installed), else the `PATH`.
fn bin_dir() -> Result<PathBuf, Error> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .map_err(|e| format!("looking for initdb: {e}"))?;
    let path = String::from_utf8_lossy(&on_path.stdout).trim().to_owned();
    match Path::new(&path).parent() {
        Some(dir) if !path.is_empty() => Ok(dir.to_path_buf()),
        _ => Err("PostgreSQL is not installed (tests/install-deps.sh installs it)".into()),
    }
}

fn run(command: &mut Command) -> Result<(), Error> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for_port(port: u16) -> Result<(), Error> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("PostgreSQL does not listen on {port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_is_killed_and_comes_back_on_its_port() {
        let mut server = Postgres::start().unwrap();
        assert!(server.is_up());
        let port = server.port();
        server.kill().unwrap();
        assert!(!server.is_up());
        server.restart().unwrap();
        assert_eq!(server.port(), port);
        assert!(server.is_up());
        assert!(server.url().contains(&port.to_string()));
    }
}
