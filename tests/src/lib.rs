//! Harness for facepay's cross-process tests and the fleet demo: free ports, brokers, the real
//! binaries as child processes, the customer's phone and the cash register.

pub mod attacker;
pub mod chaos;
pub mod proxy;
pub mod sim;
pub mod store;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use paycode::{qr, Wallet};
use protocol::{
    AccountView, ChargeResult, CreateCustomer, LedgerTotals, OpenAccount, TransferView, VerifyReply,
};

/// A TCP port that was free a moment ago. Brokers and Zenoh cannot report the port they bound,
/// so the harness picks one; callers retry on the rare collision.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after {timeout:?}")
}

/// The fleet PKI of this test process: a root CA with certificates for the cloud, the broker,
/// the default operator and a read-only operator `viewer`, made once in a directory kept for
/// the process's life. Hubs' and terminals' certificates are issued on demand
/// ([`ensure_identity`]).
pub fn test_pki() -> &'static Path {
    static PKI: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("facepay-pki-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        make_pki(&dir).expect("the test PKI is made");
        dir
    })
}

/// Makes a PKI in `dir` (CA, cloud, broker, operator, viewer), as the demo does.
pub fn make_pki(dir: &Path) -> anyhow::Result<()> {
    let pki = pki::Pki::open_or_init(dir)?;
    for identity in [
        pki::Identity::cloud(),
        pki::Identity::broker(),
        pki::Identity::operator(None, pki::Role::Operator)?,
        pki::Identity::operator(Some("viewer"), pki::Role::Viewer)?,
    ] {
        pki.ensure(&identity, &pki::IssueOptions::default())?;
    }
    Ok(())
}

/// One writer at a time in the test PKI: issuing and revoking both rewrite `index.json`.
static PKI_WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Issues a certificate for `identity` in the test PKI unless it has one.
pub fn ensure_identity(identity: &pki::Identity) -> anyhow::Result<()> {
    let _guard = PKI_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    let pki = pki::Pki::open(test_pki())?;
    pki.ensure(identity, &pki::IssueOptions::default())?;
    Ok(())
}

/// Issues a certificate in the test PKI with these options (an expired one, say).
pub fn issue_in_test_pki(
    identity: &pki::Identity,
    options: &pki::IssueOptions,
) -> anyhow::Result<()> {
    let _guard = PKI_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    pki::Pki::open(test_pki())?.issue(identity, options)?;
    Ok(())
}

/// Revokes the certificate `<name>` of the test PKI (services started afterwards refuse it).
pub fn revoke_in_test_pki(name: &str) -> anyhow::Result<()> {
    let _guard = PKI_WRITER.lock().unwrap_or_else(|e| e.into_inner());
    pki::Pki::open(test_pki())?.revoke(name)?;
    Ok(())
}

/// The certificates of a PEM file.
pub fn read_pem_certs(path: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_file_iter(path)
        .expect("readable PEM")
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

/// A client configuration presenting `<name>` of `pki_dir` as it is, without the checks a tier
/// makes of its own certificate: what a client with a revoked or expired certificate sends.
pub fn raw_client_config(pki_dir: &Path, name: &str) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::{pem::PemObject as _, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for der in read_pem_certs(&pki_dir.join("ca.pem")) {
        roots.add(der)?;
    }
    let chain = read_pem_certs(&pki_dir.join(format!("{name}.pem")));
    let key = PrivateKeyDer::from_pem_file(pki_dir.join(format!("{name}.key")))?;
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?,
    )
}

/// The loaded TLS identity whose files are `<name>.pem`/`.key` in the test PKI.
pub fn tls_identity(name: &str) -> anyhow::Result<pki::TlsIdentity> {
    pki::install_crypto_provider();
    let files = pki::TlsConfig {
        pki_dir: test_pki().to_owned(),
        ..Default::default()
    }
    .files(name);
    Ok(pki::TlsIdentity::load(&files)?)
}

/// The shipped Mosquitto configuration (`ops/mosquitto/mosquitto.conf`) with its paths pointing
/// at `pki_dir` and the shipped ACL file, listening on `127.0.0.1:port`, as root, and with
/// persistence in `persistence` (as shipped) or none (a restart loses sessions, as with a broker
/// that lost its disk).
pub fn mosquitto_config(
    pki_dir: &Path,
    port: u16,
    persistence: Option<&Path>,
) -> anyhow::Result<String> {
    let ops = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/mosquitto");
    let shipped = std::fs::read_to_string(ops.join("mosquitto.conf"))
        .context("reading ops/mosquitto/mosquitto.conf")?;
    let acl = ops.join("acl").canonicalize()?;
    let mut out = String::new();
    for line in shipped.lines() {
        let line = line
            .replace("/etc/facepay/pki", &pki_dir.display().to_string())
            .replace("/etc/facepay/mosquitto/acl", &acl.display().to_string());
        if line.starts_with("listener ") {
            out.push_str(&format!("listener {port} 127.0.0.1\n"));
        } else if line.starts_with("persistence") {
            continue;
        } else {
            out.push_str(&line);
            out.push('\n');
        }
    }
    match persistence {
        Some(dir) => out.push_str(&format!(
            "persistence true\npersistence_location {}/\n",
            dir.display()
        )),
        None => out.push_str("persistence false\n"),
    }
    out.push_str("user root\n");
    Ok(out)
}

/// A Mosquitto broker process on its own port, killed on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    persistence: Option<PathBuf>,
}

impl Mosquitto {
    /// Starts Debian's `mosquitto` on a free port.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(dir, free_port())
    }

    /// Starts Debian's `mosquitto` on `port` (a restart keeps its port), configured as
    /// `ops/mosquitto` ships it, with the test PKI.
    pub fn start_on(dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with_pki(dir, port, test_pki())
    }

    /// Starts Debian's `mosquitto` on `port` with the certificates of `pki_dir`.
    pub fn start_with_pki(dir: &Path, port: u16, pki_dir: &Path) -> anyhow::Result<Self> {
        Self::launch(dir, port, pki_dir, None)
    }

    /// Starts Debian's `mosquitto` on a free port with persistence in `dir/mosquitto-db` (as
    /// `ops/mosquitto` ships it): a graceful restart ([`Mosquitto::restart_gracefully`]) keeps
    /// persistent sessions and the QoS 1 messages queued for them.
    pub fn start_persistent(dir: &Path) -> anyhow::Result<Self> {
        let db = dir.join("mosquitto-db");
        std::fs::create_dir_all(&db)?;
        Self::launch(dir, free_port(), test_pki(), Some(db))
    }

    /// Starts Debian's `mosquitto` on a free port as `ops/mosquitto` ships it but without its ACL:
    /// any certificate of the fleet may publish and read anywhere. What a compromised broker
    /// (or a stolen broker configuration) lets through, for the attack suite.
    pub fn start_without_acl(dir: &Path) -> anyhow::Result<Self> {
        let port = free_port();
        let config: String = mosquitto_config(test_pki(), port, None)?
            .lines()
            .filter(|line| !line.starts_with("acl_file"))
            .map(|line| format!("{line}\n"))
            .collect();
        Self::run(dir, port, &config, None)
    }

    fn launch(
        dir: &Path,
        port: u16,
        pki_dir: &Path,
        persistence: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let config = mosquitto_config(pki_dir, port, persistence.as_deref())?;
        Self::run(dir, port, &config, persistence)
    }

    fn run(
        dir: &Path,
        port: u16,
        config: &str,
        persistence: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        let broker = Mosquitto {
            child,
            port,
            persistence,
        };
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(broker)
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker (SIGKILL) and starts a new one on the same port. It keeps nothing:
    /// sessions and queued messages are lost, as with a broker without persistence.
    pub fn restart(&mut self, dir: &Path) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(db) = &self.persistence {
            // A broker that lost its disk.
            let _ = std::fs::remove_dir_all(db);
            std::fs::create_dir_all(db)?;
        }
        self.start_again(dir)
    }

    /// Stops the broker as an operator would (SIGTERM: it saves its persistence file) and starts
    /// it again on the same port with the same persistence: persistent sessions and their queued
    /// QoS 1 messages survive.
    pub fn restart_gracefully(&mut self, dir: &Path) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.start_again(dir)
    }

    fn start_again(&mut self, dir: &Path) -> anyhow::Result<()> {
        let port = self.port;
        // The old process's socket may linger for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::launch(dir, port, test_pki(), self.persistence.clone()) {
                Ok(mut fresh) => {
                    std::mem::swap(&mut self.child, &mut fresh.child);
                    // `fresh` now holds the dead child; dropping it is harmless.
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster of Debian's `nats-server` nodes on free loopback ports, configured as
/// `mqtt::nats` generates it with the test PKI: the fleet's clustered broker, whose nodes a test
/// can kill and restart.
pub struct NatsCluster {
    nodes: Vec<mqtt::nats::NatsNode>,
    children: Vec<Option<Child>>,
    configs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    /// Each node's MQTT (TLS) port.
    pub mqtt_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other, for `clients`. Ports free a moment ago may be
    /// taken by the time a node binds them: a cluster that does not come up is started again on
    /// other ports (three times at most), the last failure naming what the node logged.
    pub fn start(dir: &Path, size: usize, clients: &mqtt::nats::Clients) -> anyhow::Result<Self> {
        let mut last = None;
        for attempt in 0..3 {
            let attempt_dir = dir.join(format!("nats-attempt-{attempt}"));
            std::fs::create_dir_all(&attempt_dir)?;
            match Self::start_once(&attempt_dir, size, clients) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    fn start_once(dir: &Path, size: usize, clients: &mqtt::nats::Clients) -> anyhow::Result<Self> {
        let binary = nats_binary()?;
        let pki = test_pki();
        let tls = mqtt::nats::BrokerTls {
            ca: pki.join("ca.pem"),
            cert: pki.join("broker.pem"),
            key: pki.join("broker.key"),
        };
        let nodes: Vec<mqtt::nats::NatsNode> = (0..size)
            .map(|n| mqtt::nats::NatsNode {
                name: format!("n{n}"),
                mqtt_listen: format!("127.0.0.1:{}", free_port()),
                cluster_listen: format!("127.0.0.1:{}", free_port()),
                client_listen: format!("127.0.0.1:{}", free_port()),
                store_dir: dir.join(format!("nats-{n}")),
            })
            .collect();
        let mut cluster = NatsCluster {
            mqtt_ports: nodes
                .iter()
                .map(|n| n.mqtt_listen.rsplit(':').next().unwrap().parse().unwrap())
                .collect(),
            children: Vec::new(),
            configs: Vec::new(),
            logs: Vec::new(),
            nodes: nodes.clone(),
        };
        let route_password: String = (0..40)
            .map(|_| char::from(b'a' + rand::random::<u8>() % 26))
            .collect();
        for node in &nodes {
            let config = dir.join(format!("{}.conf", node.name));
            let text = mqtt::nats::node_config(node, &nodes, &tls, clients, &route_password)?;
            std::fs::write(&config, text)?;
            cluster.configs.push(config);
            cluster.logs.push(dir.join(format!("{}.log", node.name)));
            cluster.children.push(None);
        }
        for n in 0..size {
            cluster.spawn(binary, n)?;
        }
        for n in 0..size {
            if let Err(e) = wait_for_port(cluster.mqtt_ports[n], Duration::from_secs(20)) {
                let log = std::fs::read_to_string(&cluster.logs[n]).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                bail!("{e}: nats node {n} logged {tail:?}");
            }
        }
        // Sessions live in JetStream: clients are served once the cluster has elected the
        // leader of its metadata (before, a session cannot be made).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.logs.iter().any(|log| {
            std::fs::read_to_string(log).is_ok_and(|text| {
                text.contains("JetStream cluster new metadata leader")
                    || text.contains("Self is new JetStream cluster metadata leader")
            })
        }) {
            if Instant::now() > deadline {
                bail!("the nats cluster elected no metadata leader in 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    fn spawn(&mut self, binary: &str, n: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.logs[n])?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.configs[n])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.children[n] = Some(child);
        Ok(())
    }

    /// Kills node `n` at once (SIGKILL).
    pub fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.children[n].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `n` again with what it had on disk.
    pub fn restart(&mut self, n: usize) -> anyhow::Result<()> {
        self.kill(n);
        let binary = nats_binary()?;
        self.spawn(binary, n)?;
        wait_for_port(self.mqtt_ports[n], Duration::from_secs(20))
    }

    /// The running nodes' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(Child::id).collect()
    }

    /// The `--set`s that point a hub or cloud at node `first`, failing over to the others.
    pub fn client_overrides(&self, first: usize) -> Vec<String> {
        let others: Vec<String> = (1..self.nodes.len())
            .map(|k| {
                format!(
                    "\"127.0.0.1:{}\"",
                    self.mqtt_ports[(first + k) % self.nodes.len()]
                )
            })
            .collect();
        vec![
            format!("mqtt.port={}", self.mqtt_ports[first]),
            format!("mqtt.failover=[{}]", others.join(",")),
        ]
    }

    /// The `--set` that adds the nodes but `first` as failover brokers (the first is given
    /// apart, e.g. through a proxy).
    pub fn failover_override(&self, first: usize) -> String {
        self.client_overrides(first).pop().expect("two overrides")
    }
}

/// The broker a fleet meets at: one Mosquitto or a NATS cluster.
pub enum Broker {
    /// One Mosquitto.
    Single(Mosquitto),
    /// A NATS cluster (MQTT on JetStream).
    Cluster(NatsCluster),
}

impl Broker {
    /// The port a client numbered `n` connects to first, and the `--set`s of its failover (on a
    /// cluster, clients are spread over the nodes).
    pub fn for_client(&self, n: usize) -> (u16, Vec<String>) {
        match self {
            Broker::Single(broker) => (broker.port, Vec::new()),
            Broker::Cluster(cluster) => {
                let first = n % cluster.mqtt_ports.len();
                (
                    cluster.mqtt_ports[first],
                    vec![cluster.failover_override(first)],
                )
            }
        }
    }

    /// The broker's processes.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Broker::Single(broker) => vec![broker.pid()],
            Broker::Cluster(cluster) => cluster.pids(),
        }
    }
}

/// Debian's `nats-server`.
fn nats_binary() -> anyhow::Result<&'static str> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nats-server is not installed (tests/install-deps.sh installs it)")
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in 0..self.children.len() {
            self.kill(n);
        }
    }
}

/// Where the workspace's binaries are, found from the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/`).
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    let path = dir.join(name);
    assert_fresh(&path);
    path
}

/// Panics when a tier binary is missing or older than a source file of the workspace: `cargo
/// test -p tests` alone builds the test binaries, not the tiers', and a cross-process test must
/// not pass or fail on yesterday's code. `cargo build --workspace --all-targets` (what
/// `tests/run.sh` does first) makes them fresh.
fn assert_fresh(binary: &Path) {
    fn newest(dir: &Path, newest_seen: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                newest(&path, newest_seen);
            } else if path.extension().is_some_and(|e| e == "rs" || e == "toml") {
                if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                    if newest_seen.as_ref().is_none_or(|(t, _)| modified > *t) {
                        *newest_seen = Some((modified, path));
                    }
                }
            }
        }
    }
    static CHECKED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<PathBuf>>> =
        std::sync::OnceLock::new();
    let checked = CHECKED.get_or_init(Default::default);
    if checked.lock().expect("not poisoned").contains(binary) {
        return;
    }
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `cargo build --workspace --all-targets` first",
                binary.display()
            )
        });
    // The binary's own crate and every workspace crate it depends on (cargo relinks it when one
    // of those changes, and only then).
    fn crate_dirs(root: &Path, dir: &Path, seen: &mut std::collections::BTreeSet<PathBuf>) {
        if !seen.insert(dir.to_owned()) {
            return;
        }
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
        // What the binary is built from: dev-dependencies (the tests' own) are not.
        let mut dev = false;
        for line in manifest.lines() {
            if line.starts_with('[') {
                dev = line.trim() == "[dev-dependencies]";
                continue;
            }
            if dev {
                continue;
            }
            let name = line.split(['.', ' ', '=']).next().unwrap_or_default();
            for candidate in [root.join("shared").join(name), root.join(name)] {
                if !name.is_empty() && candidate.join("Cargo.toml").exists() {
                    crate_dirs(root, &candidate, seen);
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    // The crate whose manifest declares the binary.
    let mut candidates = vec![
        root.join("edge"),
        root.join("hub"),
        root.join("cloud"),
        root.join("tests"),
    ];
    if let Ok(shared) = std::fs::read_dir(root.join("shared")) {
        candidates.extend(shared.flatten().map(|e| e.path()));
    }
    let declared = format!("name = \"{name}\"");
    let Some(own) = candidates.into_iter().find(|dir| {
        std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|m| m.contains(&declared))
            || dir.join("src/bin").join(format!("{name}.rs")).exists()
    }) else {
        panic!("no workspace crate declares the binary {name}");
    };
    let mut dirs = std::collections::BTreeSet::new();
    crate_dirs(&root, &own, &mut dirs);
    let mut newest_seen = None;
    for dir in &dirs {
        newest(&dir.join("src"), &mut newest_seen);
    }
    if let Some((modified, source)) = newest_seen {
        assert!(
            modified <= built,
            "{} is older than {}: run `cargo build --workspace --all-targets` first",
            binary.display(),
            source.display()
        );
    }
    checked
        .lock()
        .expect("not poisoned")
        .insert(binary.to_owned());
}

/// A facepay binary running as a child process, killed on drop.
pub struct Service {
    child: Child,
    /// Its main API: the cloud's admin API, a terminal's register API (a hub has none: its
    /// metrics listener).
    pub http_addr: SocketAddr,
    /// Where its `/metrics` listens.
    pub metrics_addr: SocketAddr,
    /// Every `key=value` of its ready line (`api=`, `ca=`, `token=` for the cloud).
    pub ready: std::collections::HashMap<String, String>,
    /// What it printed on standard output after its ready line.
    printed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The value of `key=` among `--set` overrides, if given.
fn override_value<'a>(overrides: &'a [String], key: &str) -> Option<&'a str> {
    overrides
        .iter()
        .rev()
        .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
}

/// The certificate identity a facepay binary will load, from its overrides (the built-in
/// defaults otherwise: store-1, till-1).
fn identity_of(binary: &str, overrides: &[String]) -> anyhow::Result<Option<pki::Identity>> {
    let store = override_value(overrides, "store_id").unwrap_or("store-1");
    Ok(match binary {
        "facepay-hub" => Some(pki::Identity::hub(store)?),
        "facepay-edge" => Some(pki::Identity::edge(
            store,
            override_value(overrides, "terminal_id").unwrap_or("till-1"),
        )?),
        "facepay-cloud" => Some(pki::Identity::cloud()),
        _ => None,
    })
}

impl Service {
    /// Runs `binary --set k=v ...` with the test PKI (its certificate issued if needed) and
    /// waits for its ready line.
    pub fn start(binary: &str, overrides: &[String]) -> anyhow::Result<Self> {
        Self::start_with_env(binary, overrides, &[])
    }

    /// [`Service::start`] with more environment variables (`FAILPOINTS` for injected storage
    /// faults, `FACEPAY_CLOCK_OFFSET_MS` for a clock stepped away).
    pub fn start_with_env(
        binary: &str,
        overrides: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        if override_value(overrides, "tls.pki_dir").is_none() {
            if let Some(identity) = identity_of(binary, overrides)? {
                ensure_identity(&identity)?;
            }
            // A hub reads its terminals' certificates when it starts: the tests' terminals
            // (till-0 to till-3) get theirs first.
            if binary == "facepay-hub" {
                let store = override_value(overrides, "store_id").unwrap_or("store-1");
                for n in 0..4 {
                    ensure_identity(&pki::Identity::edge(store, &format!("till-{n}"))?)?;
                }
            }
        }
        let path = binary_path(binary);
        let mut command = Command::new(&path);
        command
            .arg("--set")
            .arg(format!("tls.pki_dir={:?}", test_pki()))
            .arg("--set")
            .arg("metrics.listen=127.0.0.1:0");
        if binary == "facepay-hub" {
            // The tests' terminals pay as fast as they can; the per-terminal rate is tested
            // where it is set (a test's own overrides come after these).
            for key in ["terminals.requests_burst", "terminals.requests_per_second"] {
                command.arg("--set").arg(format!("{key}=100000"));
            }
        }
        for o in overrides {
            command.arg("--set").arg(o);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            // FACEPAY_TEST_LOG=info shows the services' own logs when a test needs a look.
            .env(
                "RUST_LOG",
                std::env::var("FACEPAY_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let later = printed.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for line in lines.map_while(Result::ok) {
                later.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                bail!("{binary} did not report ready");
            }
        };
        let ready: std::collections::HashMap<String, String> = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let address = |key: &str| -> anyhow::Result<SocketAddr> {
            let value = ready
                .get(key)
                .with_context(|| format!("{binary} printed {line:?}"))?;
            let value = value
                .strip_prefix("http://")
                .or_else(|| value.strip_prefix("https://"))
                .unwrap_or(value);
            Ok(value.parse()?)
        };
        let metrics_addr = address("metrics")?;
        let http_addr = match binary {
            "facepay-cloud" => address("admin")?,
            "facepay-edge" => address("register")?,
            _ => metrics_addr,
        };
        Ok(Service {
            child,
            http_addr,
            metrics_addr,
            ready,
            printed,
        })
    }

    /// The process id (to pause it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has ended, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the process to stop (SIGTERM, what systemd sends) and waits up to `timeout` for
    /// it to end; its exit status, `None` if it did not end in time.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The lines it printed on standard output after its ready line, so far.
    pub fn printed(&self) -> Vec<String> {
        self.printed.lock().unwrap().clone()
    }

    /// Kills the process at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `facepay-cloud` with its data in `data_dir`, every listener on a free port, and the
/// broker at `mqtt_port`.
pub fn start_cloud(data_dir: &Path, mqtt_port: u16) -> anyhow::Result<Service> {
    start_cloud_with(data_dir, mqtt_port, &[])
}

/// [`start_cloud`] with more configuration overrides (`key=value`).
pub fn start_cloud_with(
    data_dir: &Path,
    mqtt_port: u16,
    extra: &[String],
) -> anyhow::Result<Service> {
    start_cloud_with_env(data_dir, mqtt_port, extra, &[])
}

/// [`start_cloud_with`] with environment variables (the chaos suite's failpoints).
pub fn start_cloud_with_env(
    data_dir: &Path,
    mqtt_port: u16,
    extra: &[String],
    env: &[(String, String)],
) -> anyhow::Result<Service> {
    let mut overrides = vec![
        format!("data_dir={data_dir:?}"),
        "admin_listen=127.0.0.1:0".into(),
        "api_listen=127.0.0.1:0".into(),
        format!("mqtt.port={mqtt_port}"),
    ];
    overrides.extend_from_slice(extra);
    Service::start_with_env("facepay-cloud", &overrides, env)
}

/// Sends a JSON body and returns the status and the JSON answer, whatever the status.
pub fn post_json(url: &str, body: &serde_json::Value) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = match ureq::post(url)
        .timeout(Duration::from_secs(60))
        .send_json(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    Ok((response.status(), response.into_json()?))
}

/// Sends a raw body (for malformed-JSON tests).
pub fn post_raw(url: &str, body: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = match ureq::post(url)
        .set("Content-Type", "application/json")
        .send_string(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    Ok((response.status(), response.into_json()?))
}

/// GETs a JSON document.
pub fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> anyhow::Result<T> {
    Ok(ureq::get(url)
        .timeout(Duration::from_secs(30))
        .call()?
        .into_json()?)
}

/// GETs a text document (metrics).
pub fn get_text(url: &str) -> anyhow::Result<String> {
    Ok(ureq::get(url)
        .timeout(Duration::from_secs(30))
        .call()?
        .into_string()?)
}

/// A tier's `/readyz` on its metrics listener: the status and the body.
pub fn readyz(metrics: SocketAddr) -> anyhow::Result<(u16, String)> {
    match ureq::get(&format!("http://{metrics}/readyz"))
        .timeout(Duration::from_secs(30))
        .call()
    {
        Ok(answer) => Ok((answer.status(), answer.into_string()?)),
        Err(ureq::Error::Status(status, answer)) => Ok((status, answer.into_string()?)),
        Err(error) => Err(error.into()),
    }
}

/// Waits until a tier's `/readyz` answers `status`; returns its body then.
pub fn wait_for_readyz(
    metrics: SocketAddr,
    status: u16,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (now, body) = readyz(metrics)?;
        if now == status {
            return Ok(body);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "/readyz at {metrics} still answers {now} {body:?}, not {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads one sample's value from a Prometheus text page.
pub fn metric_value(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every series of a metric on a `/metrics` page (all its label values), `None` when
/// the page has none.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Waits until a hub holds `count` account keys (synced from the cloud).
pub fn wait_for_keys(hub_http: SocketAddr, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let page = get_text(&format!("http://{hub_http}/metrics"))?;
        if metric_value(&page, "facepay_hub_account_keys") == Some(count as f64) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("hub at {hub_http} did not get {count} account keys in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTPS client presenting the certificate `<name>` of the PKI in `pki_dir` and trusting
/// its CA.
pub fn https_agent(pki_dir: &Path, name: &str) -> anyhow::Result<ureq::Agent> {
    pki::install_crypto_provider();
    let files = pki::TlsConfig {
        pki_dir: pki_dir.to_owned(),
        ..Default::default()
    }
    .files(name);
    let identity = pki::TlsIdentity::load(&files)?;
    Ok(ureq::AgentBuilder::new()
        .tls_config(std::sync::Arc::new(identity.client_config()?))
        .timeout(Duration::from_secs(60))
        .build())
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.into()),
    };
    let status = response.status();
    let text = response.into_string()?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    ))
}

/// The cloud's admin API, over HTTPS with an operator's client certificate.
pub struct CloudApi {
    base: String,
    agent: ureq::Agent,
}

impl CloudApi {
    /// A client for the cloud at `addr`, as the test PKI's default operator.
    pub fn new(addr: SocketAddr) -> Self {
        Self::as_operator(addr, test_pki(), "operator").expect("the operator certificate loads")
    }

    /// A client for the cloud at `addr` presenting the certificate `name` of `pki_dir`.
    pub fn as_operator(addr: SocketAddr, pki_dir: &Path, name: &str) -> anyhow::Result<Self> {
        Ok(CloudApi {
            base: format!("https://{addr}"),
            agent: https_agent(pki_dir, name)?,
        })
    }

    /// A client presenting `name` of `pki_dir` without checking it first (revoked, expired).
    pub fn as_operator_unchecked(
        addr: SocketAddr,
        pki_dir: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        Ok(CloudApi {
            base: format!("https://{addr}"),
            agent: ureq::AgentBuilder::new()
                .tls_config(std::sync::Arc::new(raw_client_config(pki_dir, name)?))
                .timeout(Duration::from_secs(60))
                .build(),
        })
    }

    /// POSTs a JSON body; the status and the JSON answer, whatever the status.
    pub fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        answer(
            self.agent
                .post(&format!("{}{path}", self.base))
                .send_json(body),
        )
    }

    /// GETs a JSON document; the status and the JSON answer, whatever the status.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        answer(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    /// A GET's status, content type and body as text (CSV answers).
    pub fn get_text(&self, path: &str) -> anyhow::Result<(u16, String, String)> {
        let response = match self.agent.get(&format!("{}{path}", self.base)).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.into()),
        };
        let (status, kind) = (response.status(), response.content_type().to_owned());
        Ok((status, kind, response.into_string()?))
    }

    fn get_ok<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.get(path)?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(serde_json::from_value(body)?)
    }

    /// Opens an account, failing on any refusal.
    pub fn open(&self, request: &OpenAccount) -> anyhow::Result<AccountView> {
        let (status, body) = self.post("/v1/accounts", &serde_json::to_value(request)?)?;
        if !(200..300).contains(&status) {
            bail!("opening {} failed: {status} {body}", request.account_id);
        }
        Ok(serde_json::from_value(body)?)
    }

    /// One account's balance.
    pub fn balance(&self, account_id: &str) -> anyhow::Result<i64> {
        Ok(self.account(account_id)?.balance_minor)
    }

    /// Every account.
    pub fn accounts(&self) -> anyhow::Result<Vec<AccountView>> {
        self.get_ok("/v1/accounts")
    }

    /// Every transfer.
    pub fn transfers(&self) -> anyhow::Result<Vec<TransferView>> {
        self.get_ok("/v1/transfers")
    }

    /// Ledger totals.
    pub fn totals(&self) -> anyhow::Result<Vec<LedgerTotals>> {
        self.get_ok("/v1/ledger/totals")
    }

    /// One account.
    pub fn account(&self, account_id: &str) -> anyhow::Result<AccountView> {
        self.get_ok(&format!("/v1/accounts/{account_id}"))
    }

    /// The operators' money-moving actions.
    pub fn audit(&self) -> anyhow::Result<Vec<protocol::AuditEntry>> {
        self.get_ok("/v1/audit")
    }

    /// Registers a store hub's signing key (from its ready line, `hub_key=`).
    pub fn set_hub_key(&self, store_id: &str, public_key: &str) -> anyhow::Result<()> {
        let (status, body) = answer(
            self.agent
                .put(&format!("{}/v1/stores/{store_id}/hub-key", self.base))
                .send_json(serde_json::json!({ "public_key": public_key })),
        )?;
        if status != 200 {
            bail!("registering the hub key of {store_id}: {status} {body}");
        }
        Ok(())
    }

    /// Pays money into an account, once per deposit id.
    pub fn deposit(
        &self,
        account_id: &str,
        deposit_id: &str,
        amount_minor: i64,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        self.post(
            &format!("/v1/accounts/{account_id}/deposits"),
            &serde_json::json!({ "deposit_id": deposit_id, "amount_minor": amount_minor }),
        )
    }

    /// Accounts in debt.
    pub fn debts(&self) -> anyhow::Result<Vec<AccountView>> {
        self.get_ok("/v1/debts")
    }

    /// Offline payments applied although their code had already paid another payment.
    pub fn code_reuses(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.get_ok("/v1/reconciliation/code-reuse")
    }

    /// Checks that the books balance: per currency, all balances sum to zero.
    pub fn assert_books_balance(&self) -> anyhow::Result<()> {
        for t in self.totals()? {
            if t.sum_of_balances_minor != 0 || t.total_debits_minor != t.total_credits_minor {
                bail!("books do not balance: {t:?}");
            }
        }
        Ok(())
    }
}

/// A fresh spool directory for a terminal's frames, in memory (`/dev/shm`): terminals refuse
/// spools on a persistent disk. Under one directory per test process; those of processes that
/// have ended are removed when the next one starts.
pub fn spool(name: &str) -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let root = ROOT.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        if let Ok(entries) = std::fs::read_dir(shm) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("facepay-spool-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        shm.join(format!("facepay-spool-{}", std::process::id()))
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("{name}-{n}"));
    // The terminal's own, as it insists.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&dir)
        .expect("/dev/shm takes a spool directory");
    dir
}

/// A customer standing at a terminal: puts a QR image where the terminal's scanner reads frames.
pub fn present_qr(frames_dir: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(frames_dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let tmp = frames_dir.join(format!(".{stamp}.png.tmp"));
    qr::render_png(text, &tmp)?;
    std::fs::rename(&tmp, frames_dir.join(format!("{stamp}.png")))?;
    Ok(())
}

/// A customer showing a fresh code from their wallet.
pub fn present_code(frames_dir: &Path, wallet: &Wallet) -> anyhow::Result<String> {
    let code = wallet.issue_code(paycode::now_ms());
    present_qr(frames_dir, &code)?;
    Ok(code)
}

/// The cash register charging `order` in euros once `show` has put a code before the terminal's
/// camera, again (showing again) while the terminal answers that no hub is reachable (nothing was
/// charged then), for up to 20 s or until `stop` says to give up.
pub fn charge_until_reachable(
    edge: SocketAddr,
    mut show: impl FnMut(),
    order: &str,
    amount_minor: i64,
    mut stop: impl FnMut() -> bool,
) -> ChargeResult {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        show();
        let heard = charge(edge, order, amount_minor, "EUR").unwrap().1;
        if heard.reason != Some(protocol::DeclineReason::StoreSystemUnreachable)
            || stop()
            || Instant::now() > deadline
        {
            return heard;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Opens an account in euros with `balance`; a customer's comes with a fresh wallet whose key
/// the account holds.
pub fn open_account(
    api: &CloudApi,
    id: &str,
    kind: protocol::AccountKind,
    balance: i64,
) -> Option<Wallet> {
    let wallet = (kind == protocol::AccountKind::Customer).then(|| Wallet::generate(id).unwrap());
    api.open(&OpenAccount {
        account_id: id.into(),
        kind,
        currency: protocol::Currency::parse("EUR").unwrap(),
        initial_balance_minor: balance,
        public_key: wallet.as_ref().map(|w| w.public_key_b64()),
    })
    .unwrap();
    wallet
}

/// The cash register: charges an order at a terminal's local API.
pub fn charge(
    edge: SocketAddr,
    order_id: &str,
    amount_minor: i64,
    currency: &str,
) -> anyhow::Result<(u16, ChargeResult)> {
    let body = serde_json::json!({ "order_id": order_id, "amount_minor": amount_minor, "currency": currency });
    let (status, body) = post_json(&format!("http://{edge}/v1/charge"), &body)?;
    Ok((status, serde_json::from_value(body)?))
}

/// The cash register: refunds `amount_minor` of an order's payment under `refund_id`.
pub fn refund(
    edge: SocketAddr,
    refund_id: &str,
    order_id: &str,
    amount_minor: i64,
    currency: &str,
) -> anyhow::Result<(u16, protocol::RefundResult)> {
    let body = serde_json::json!({
        "refund_id": refund_id, "order_id": order_id, "amount_minor": amount_minor,
        "currency": currency
    });
    let (status, body) = post_json(&format!("http://{edge}/v1/refund"), &body)?;
    Ok((status, serde_json::from_value(body)?))
}

/// The cash register: charges an order with a payment token from a verification.
pub fn charge_with_token(
    edge: SocketAddr,
    order_id: &str,
    amount_minor: i64,
    currency: &str,
    token: &str,
) -> anyhow::Result<(u16, ChargeResult)> {
    let body = serde_json::json!({
        "order_id": order_id, "amount_minor": amount_minor, "currency": currency, "token": token
    });
    let (status, body) = post_json(&format!("http://{edge}/v1/charge"), &body)?;
    Ok((status, serde_json::from_value(body)?))
}

/// The cash register asks the terminal to verify the customer (`face` or `code_and_face`).
pub fn verify(edge: SocketAddr, method: &str) -> anyhow::Result<(u16, VerifyReply)> {
    let body = serde_json::json!({ "method": method });
    let (status, body) = post_json(&format!("http://{edge}/v1/verify"), &body)?;
    Ok((status, serde_json::from_value(body)?))
}

/// The customer types the second factor on the terminal.
pub fn second_factor(
    edge: SocketAddr,
    challenge_id: &str,
    value: &str,
) -> anyhow::Result<(u16, VerifyReply)> {
    let body = serde_json::json!({ "challenge_id": challenge_id, "value": value });
    let (status, body) = post_json(&format!("http://{edge}/v1/verify/second-factor"), &body)?;
    Ok((status, serde_json::from_value(body)?))
}

/// A customer looking at the terminal's camera: puts a photo where the camera reads frames.
pub fn present_face(camera_dir: &Path, photo: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(camera_dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let ext = photo.extension().and_then(|e| e.to_str()).unwrap_or("jpg");
    let tmp = camera_dir.join(format!(".{stamp}.{ext}.tmp"));
    std::fs::copy(photo, &tmp).with_context(|| format!("reading {}", photo.display()))?;
    std::fs::rename(&tmp, camera_dir.join(format!("{stamp}.{ext}")))?;
    Ok(())
}

/// The face photos committed for tests.
pub fn face_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/faces")
        .join(name)
}

/// The cloud's enrollment API, over HTTPS, trusting the fleet's CA.
pub struct EnrollApi {
    base: String,
    agent: ureq::Agent,
    bearer: String,
}

impl EnrollApi {
    /// A client for the API at `addr` trusting the CA in the PEM file `cert`, presenting the
    /// operator's certificate beside it (a PKI directory's layout), and authenticated with the
    /// operator token in the file `token`.
    pub fn new(addr: &str, cert: &Path, token: &Path) -> anyhow::Result<Self> {
        let pki_dir = cert.parent().context("the CA file's directory")?;
        let tls = raw_client_config(pki_dir, "operator")?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(std::sync::Arc::new(tls))
            .timeout(Duration::from_secs(60))
            .build();
        // The cloud's certificate names localhost and 127.0.0.1.
        let token = std::fs::read_to_string(token)
            .with_context(|| format!("reading {}", token.display()))?;
        Ok(EnrollApi {
            base: format!("https://{addr}"),
            agent,
            bearer: format!("Bearer {}", token.trim()),
        })
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let request = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &self.bearer);
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.into()),
        };
        Ok((response.status(), response.into_json()?))
    }

    /// `POST /v1/customers`.
    pub fn create(&self, customer: &CreateCustomer) -> anyhow::Result<(u16, serde_json::Value)> {
        self.send(
            "POST",
            "/v1/customers",
            Some(serde_json::to_value(customer)?),
        )
    }

    /// `POST /v1/customers/{id}/faces` with a photo file.
    pub fn add_face(
        &self,
        customer_id: &str,
        photo: &Path,
        look_alike_of: &[&str],
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        use base64::Engine as _;
        let bytes = std::fs::read(photo).with_context(|| format!("reading {}", photo.display()))?;
        let body = serde_json::json!({
            "image_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
            "confirmed_look_alike_of": look_alike_of,
        });
        self.send(
            "POST",
            &format!("/v1/customers/{customer_id}/faces"),
            Some(body),
        )
    }

    /// `DELETE /v1/customers/{id}`.
    pub fn erase(&self, customer_id: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        self.send("DELETE", &format!("/v1/customers/{customer_id}"), None)
    }

    /// The same request without the operator token.
    pub fn unauthenticated_get(&self, customer_id: &str) -> anyhow::Result<u16> {
        match self
            .agent
            .get(&format!("{}/v1/customers/{customer_id}", self.base))
            .call()
        {
            Ok(r) => Ok(r.status()),
            Err(ureq::Error::Status(status, _)) => Ok(status),
            Err(e) => Err(e.into()),
        }
    }

    /// `GET /v1/customers/{id}`.
    pub fn get(&self, customer_id: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        self.send("GET", &format!("/v1/customers/{customer_id}"), None)
    }
}

/// Waits until a hub's metric reaches `value`.
pub fn wait_for_metric(
    http: SocketAddr,
    name: &str,
    value: f64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let page = get_text(&format!("http://{http}/metrics"))?;
        if metric_value(&page, name) == Some(value) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} at {http} is {:?}, not {value}, after {timeout:?}",
                metric_value(&page, name)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
