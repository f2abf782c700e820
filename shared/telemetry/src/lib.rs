//! Logging and Prometheus metrics shared by every tier.
//!
//! Each tier instance owns its own [`prometheus::Registry`] rather than the process-global one, so
//! that the fleet demo can run several hubs and edges in one process without name clashes.

use actix_web::{web, HttpResponse};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use protocol::DeclineReason;

/// Starts structured logging to standard error; `RUST_LOG` selects levels (default `info`).
pub fn init_tracing() {
    init_logs(false);
}

/// [`init_tracing`], with `json` one JSON object per line (timestamp, level, target, fields)
/// for a log pipeline instead of lines for people.
pub fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests, the fleet demo) keeps the first subscriber.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        logs.json().try_init()
    } else {
        logs.try_init()
    };
}

/// Registers `GET /metrics` for a registry on an actix-web app.
pub fn configure_metrics(cfg: &mut web::ServiceConfig, registry: Registry) {
    cfg.app_data(web::Data::new(registry))
        .route("/metrics", web::get().to(metrics_handler));
}

async fn metrics_handler(registry: web::Data<Registry>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(render(&registry))
}

/// The `[metrics]` section every tier shares: `/metrics` and `/healthz` on a listener of their
/// own, so that Prometheus can scrape a fleet without reaching any API that moves money.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// address:port; port 0 picks a free one.
    pub listen: String,
    /// Serve over TLS with the tier's own certificate (Prometheus then scrapes with
    /// `scheme: https` and the fleet's `ca.pem`).
    pub tls: bool,
    /// File of `user:sha256-hex` lines; when set, every scrape needs HTTP basic auth with one of
    /// these users (a SHA-256 of the password is all the tier keeps).
    pub basic_auth_file: Option<std::path::PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig::on("127.0.0.1:0")
    }
}

impl MetricsConfig {
    /// A metrics listener on `listen`, plain HTTP, no auth.
    pub fn on(listen: &str) -> Self {
        MetricsConfig {
            listen: listen.into(),
            tls: false,
            basic_auth_file: None,
        }
    }

    /// Checks the address; the error names the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                format!("{prefix}.listen"),
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:9100",
                    self.listen
                ),
            ));
        }
        let loopback = self
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        // No plaintext link leaves the machine: beyond loopback, metrics are HTTPS.
        if !loopback && !self.tls {
            return Err((
                format!("{prefix}.tls"),
                format!(
                    "must be true when metrics listen beyond loopback ({})",
                    self.listen
                ),
            ));
        }
        if let Some(path) = &self.basic_auth_file {
            if path.as_os_str().is_empty() {
                return Err((
                    format!("{prefix}.basic_auth_file"),
                    "must not be empty".into(),
                ));
            }
            // Basic auth over plain HTTP would show the password to the store network.
            if !self.tls {
                return Err((
                    format!("{prefix}.tls"),
                    "must be true when basic_auth_file is set".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Who is on the other end of an HTTPS connection with a client certificate: its verified
/// subject, in the request's connection data.
#[derive(Debug, Clone)]
pub struct Peer(pub Option<pki::PeerIdentity>);

/// A check run on every request before its body is read: `Some(response)` refuses it.
pub type Gate =
    std::sync::Arc<dyn Fn(&actix_web::dev::ServiceRequest) -> Option<HttpResponse> + Send + Sync>;

/// A gate that refuses, with `refuse()`, every request without `Authorization: Bearer <token>`
/// for the token whose SHA-256 is `digest`.
pub fn bearer_gate(digest: [u8; 32], refuse: fn() -> HttpResponse) -> Gate {
    std::sync::Arc::new(move |request: &actix_web::dev::ServiceRequest| {
        let header = request
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if pki::bearer_matches(header, &digest) {
            None
        } else {
            Some(refuse())
        }
    })
}

/// What `/readyz` answers: named conditions a tier needs before it can serve (the broker
/// connected, the keys synced, ...), each read on every request. Ready when all hold.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: std::sync::Arc<std::sync::Mutex<Vec<ReadyCheck>>>,
}

type ReadyCheck = (&'static str, Box<dyn Fn() -> bool + Send + Sync>);

impl Readiness {
    /// No conditions yet: ready.
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Adds a condition, named in `/readyz`'s answer while it does not hold.
    pub fn require(&self, name: &'static str, holds: impl Fn() -> bool + Send + Sync + 'static) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, Box::new(holds)));
    }

    /// Adds a condition that holds while `gauge` reads 1 (a connected or synced flag).
    pub fn require_gauge(&self, name: &'static str, gauge: &prometheus::IntGauge) {
        let gauge = gauge.clone();
        self.require(name, move || gauge.get() == 1);
    }

    /// Not ready from now on: the process is stopping (`/readyz` says `stopping`), so that a
    /// load balancer or an orchestrator sends it nothing more.
    pub fn stopping(&self) {
        self.require("stopping", || false);
    }

    /// The conditions that do not hold now, in the order they were added.
    pub fn missing(&self) -> Vec<&'static str> {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, holds)| !holds())
            .map(|(name, _)| *name)
            .collect()
    }
}

/// How long a graceful stop lets a scrape in flight finish.
pub const METRICS_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `/metrics`, `/healthz` (alive: answers while the process serves) and `/readyz` (ready:
/// 200 while every condition of `readiness` holds, 503 naming those that do not) for a registry
/// on one worker thread of the current actix system; with `tls`, over HTTPS with that
/// configuration. Returns the bound address and the server's handle.
pub fn serve_metrics(
    config: &MetricsConfig,
    registry: Registry,
    tls: Option<rustls::ServerConfig>,
    readiness: Readiness,
) -> anyhow::Result<(std::net::SocketAddr, actix_web::dev::ServerHandle)> {
    use anyhow::Context as _;
    let users = match &config.basic_auth_file {
        None => None,
        Some(path) => {
            pki::check_key_permissions(path)?;
            Some(read_basic_auth_file(path)?)
        }
    };
    let gate: Option<Gate> = users.map(|users| {
        let users = std::sync::Arc::new(users);
        let gate: Gate = std::sync::Arc::new(move |request: &actix_web::dev::ServiceRequest| {
            if basic_auth_ok(request, &users) {
                None
            } else {
                Some(
                    HttpResponse::Unauthorized()
                        .insert_header(("WWW-Authenticate", "Basic realm=\"metrics\""))
                        .finish(),
                )
            }
        });
        gate
    });
    serve_api(&config.listen, tls, gate, METRICS_DRAIN, move |cfg| {
        configure_metrics(cfg, registry.clone());
        cfg.route("/healthz", web::get().to(|| async { "ok" }));
        let readiness = readiness.clone();
        cfg.route(
            "/readyz",
            web::get().to(move || {
                let missing = readiness.missing();
                async move {
                    if missing.is_empty() {
                        HttpResponse::Ok().body("ready\n")
                    } else {
                        HttpResponse::ServiceUnavailable()
                            .body(format!("not ready: {}\n", missing.join(", ")))
                    }
                }
            }),
        );
    })
    .with_context(|| format!("binding metrics.listen {}", config.listen))
}

fn read_basic_auth_file(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::HashMap<String, [u8; 32]>> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading metrics.basic_auth_file {}", path.display()))?;
    let mut users = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line.split_once(':').and_then(|(user, digest)| {
            let bytes: Vec<u8> = (0..digest.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(digest.get(i..i + 2)?, 16).ok())
                .collect::<Option<_>>()?;
            Some((user.to_owned(), <[u8; 32]>::try_from(bytes).ok()?))
        });
        match parsed {
            Some((user, digest)) => {
                users.insert(user, digest);
            }
            None => anyhow::bail!(
                "{} line {}: expected user:<64 hex digits of the password's SHA-256>",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(users)
}

fn basic_auth_ok(
    request: &actix_web::dev::ServiceRequest,
    users: &std::collections::HashMap<String, [u8; 32]>,
) -> bool {
    use base64::Engine as _;
    use sha2::Digest as _;
    let Some(encoded) = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    let Some(decoded) = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    else {
        return false;
    };
    let Some((user, password)) = decoded.split_once(':') else {
        return false;
    };
    let digest: [u8; 32] = sha2::Sha256::digest(password.as_bytes()).into();
    users.get(user).is_some_and(|expected| *expected == digest)
}

/// Serves a tier's API on one worker thread of the current actix system: over HTTPS with `tls`
/// (the peer's verified certificate subject, if it presented one, is in the connection data as a
/// [`Peer`]), with `gate` run on every request before its body is read. A graceful stop lets the
/// requests in flight finish for up to `drain` (the longest a request may take). Returns the
/// bound address (port 0 picks one) and the server's handle.
pub fn serve_api<F>(
    listen: &str,
    tls: Option<rustls::ServerConfig>,
    gate: Option<Gate>,
    drain: std::time::Duration,
    routes: F,
) -> std::io::Result<(std::net::SocketAddr, actix_web::dev::ServerHandle)>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    use actix_web::dev::Service as _;
    let server = actix_web::HttpServer::new(move || {
        let gate = gate.clone();
        actix_web::App::new()
            .wrap_fn(move |request, service| {
                let refusal = gate.as_ref().and_then(|gate| gate(&request));
                let call = match refusal {
                    Some(refusal) => Err(request.into_response(refusal)),
                    None => Ok(service.call(request)),
                };
                async move {
                    match call {
                        Err(refused) => Ok(refused),
                        Ok(future) => future.await.map(|r| r.map_into_boxed_body()),
                    }
                }
            })
            .configure(routes.clone())
    })
    .on_connect(|connection, data| {
        use actix_tls::accept::rustls_0_23::TlsStream;
        if let Some(stream) = connection.downcast_ref::<TlsStream<actix_web::rt::net::TcpStream>>()
        {
            let (_, session) = stream.get_ref();
            let peer = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(pki::peer_identity);
            data.insert(Peer(peer));
        }
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(drain.as_millis().div_ceil(1_000).max(1) as u64);
    let server = match tls {
        Some(config) => server.bind_rustls_0_23(listen, config)?,
        None => server.bind(listen)?,
    };
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok((addr, handle))
}

/// The registry in Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}

/// Registers what a tier's `/metrics` tells of the process itself: `process_*` (CPU seconds,
/// resident memory, open and most file descriptors, start time; read from `/proc`) and
/// `facepay_<tier>_build_info{version}`, always 1.
pub fn register_process_metrics(registry: &Registry, tier: &str) {
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("registered once per registry");
    register_gauge_vec(
        registry,
        &format!("facepay_{tier}_build_info"),
        "1, labelled with the version of the running build",
        &["version"],
    )
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1);
}

/// Creates and registers an integer gauge on a tier's registry.
pub fn register_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::IntGauge {
    let gauge = prometheus::IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("registered once per registry");
    gauge
}

/// Creates and registers an integer gauge with labels on a tier's registry.
pub fn register_gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::IntGaugeVec {
    let gauge = prometheus::IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("registered once per registry");
    gauge
}

/// Creates and registers an integer counter with labels on a tier's registry.
pub fn register_counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("registered once per registry");
    counter
}

/// Creates and registers a histogram with `buckets` (seconds) on a tier's registry.
pub fn register_histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Histogram {
    let histogram =
        prometheus::Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid metric");
    registry
        .register(Box::new(histogram.clone()))
        .expect("registered once per registry");
    histogram
}

/// Now, in whole seconds since the Unix epoch: what `*_timestamp_seconds` gauges show.
pub fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// Creates and registers an integer counter on a tier's registry.
pub fn register_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("registered once per registry");
    counter
}

/// Latency buckets in seconds, from 100 microseconds to 10 seconds.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Where a payment was decided: with the cloud, or by the store's hub alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionPath {
    /// With the cloud's answer, or refused before the cloud was asked.
    Online,
    /// By the hub alone, the cloud unreachable (within its offline bounds).
    Offline,
}

impl DecisionPath {
    /// Both paths: a terminal's and a hub's decisions take either.
    pub const BOTH: [DecisionPath; 2] = [DecisionPath::Online, DecisionPath::Offline];

    /// The `path` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionPath::Online => "online",
            DecisionPath::Offline => "offline",
        }
    }

    /// `Offline` when `offline`.
    pub fn of(offline: bool) -> Self {
        if offline {
            DecisionPath::Offline
        } else {
            DecisionPath::Online
        }
    }
}

/// The metrics every tier keeps about the payments it handles, every series created up front:
/// `facepay_<tier>_payment_requests_total`,
/// `facepay_<tier>_payment_decisions_total{outcome,path}`,
/// `facepay_<tier>_payment_declines_total{reason}` and
/// `facepay_<tier>_payment_decision_seconds{path}`.
#[derive(Clone)]
pub struct PaymentMetrics {
    requests_total: IntCounter,
    decisions_total: IntCounterVec,
    declines_total: IntCounterVec,
    decision_seconds: HistogramVec,
}

impl PaymentMetrics {
    /// Registers the payment metrics of `tier` (`edge`, `hub`, `cloud`), with the paths its
    /// decisions take (the cloud's are all online).
    pub fn register(registry: &Registry, tier: &str, paths: &[DecisionPath]) -> Self {
        let requests_total = IntCounter::new(
            format!("facepay_{tier}_payment_requests_total"),
            "payment requests received",
        )
        .expect("valid metric");
        let decisions_total = IntCounterVec::new(
            Opts::new(
                format!("facepay_{tier}_payment_decisions_total"),
                "payments decided, by outcome (approved, declined) and path (online: with the \
                 cloud; offline: by the hub alone)",
            ),
            &["outcome", "path"],
        )
        .expect("valid metric");
        let declines_total = IntCounterVec::new(
            Opts::new(
                format!("facepay_{tier}_payment_declines_total"),
                "payments declined, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let decision_seconds = HistogramVec::new(
            HistogramOpts::new(
                format!("facepay_{tier}_payment_decision_seconds"),
                "time to decide a payment, by path (the customer's time to show a code apart)",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["path"],
        )
        .expect("valid metric");
        for metric in [
            Box::new(requests_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(decisions_total.clone()),
            Box::new(declines_total.clone()),
            Box::new(decision_seconds.clone()),
        ] {
            registry
                .register(metric)
                .expect("registered once per registry");
        }
        for path in paths {
            for outcome in ["approved", "declined"] {
                decisions_total.with_label_values(&[outcome, path.as_str()]);
            }
            decision_seconds.with_label_values(&[path.as_str()]);
        }
        for reason in DeclineReason::ALL {
            declines_total.with_label_values(&[reason.as_str()]);
        }
        PaymentMetrics {
            requests_total,
            decisions_total,
            declines_total,
            decision_seconds,
        }
    }

    /// Counts a request as it arrives.
    pub fn request(&self) {
        self.requests_total.inc();
    }

    /// Counts a decision (`reason`: `None` when approved), its path and the time it took.
    pub fn outcome(
        &self,
        reason: Option<DeclineReason>,
        path: DecisionPath,
        elapsed: std::time::Duration,
    ) {
        let outcome = match reason {
            None => "approved",
            Some(reason) => {
                self.declines_total
                    .with_label_values(&[reason.as_str()])
                    .inc();
                "declined"
            }
        };
        self.decisions_total
            .with_label_values(&[outcome, path.as_str()])
            .inc();
        self.decision_seconds
            .with_label_values(&[path.as_str()])
            .observe(elapsed.as_secs_f64());
    }
}

/// What a face verification answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationOutcome {
    /// The face matched an account.
    Verified,
    /// The face matched, and the account asks for a second factor.
    SecondFactorRequired,
    /// Refused, with the reason.
    Declined(DeclineReason),
}

/// The face verifications a tier answered, every series created up front:
/// `facepay_<tier>_verifications_total{outcome}` (`verified`, `second_factor_required`,
/// `declined`) and `facepay_<tier>_verification_declines_total{reason}`.
#[derive(Clone)]
pub struct VerificationMetrics {
    outcomes: IntCounterVec,
    declines: IntCounterVec,
}

impl VerificationMetrics {
    /// Registers the verification metrics of `tier`.
    pub fn register(registry: &Registry, tier: &str) -> Self {
        let outcomes = IntCounterVec::new(
            Opts::new(
                format!("facepay_{tier}_verifications_total"),
                "face verifications, by outcome (verified, second_factor_required, declined)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let declines = IntCounterVec::new(
            Opts::new(
                format!("facepay_{tier}_verification_declines_total"),
                "face verifications declined, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(outcomes.clone()))
            .expect("registered once per registry");
        registry
            .register(Box::new(declines.clone()))
            .expect("registered once per registry");
        for outcome in ["verified", "second_factor_required", "declined"] {
            outcomes.with_label_values(&[outcome]);
        }
        for reason in DeclineReason::ALL {
            declines.with_label_values(&[reason.as_str()]);
        }
        VerificationMetrics { outcomes, declines }
    }

    /// Counts one answer to a terminal or a register.
    pub fn reply(&self, reply: &protocol::VerifyReply) {
        self.count(match reply {
            protocol::VerifyReply::Verified { .. } => VerificationOutcome::Verified,
            protocol::VerifyReply::SecondFactorRequired { .. } => {
                VerificationOutcome::SecondFactorRequired
            }
            protocol::VerifyReply::Refused { reason, .. } => VerificationOutcome::Declined(*reason),
        });
    }

    /// Counts one answer.
    pub fn count(&self, outcome: VerificationOutcome) {
        let label = match outcome {
            VerificationOutcome::Verified => "verified",
            VerificationOutcome::SecondFactorRequired => "second_factor_required",
            VerificationOutcome::Declined(reason) => {
                self.declines.with_label_values(&[reason.as_str()]).inc();
                "declined"
            }
        };
        self.outcomes.with_label_values(&[label]).inc();
    }
}

/// A state set (OpenMetrics): one series per state of `label`, 1 for the state in force and 0
/// for the others, every series created up front.
#[derive(Clone)]
pub struct StateSet {
    gauge: prometheus::IntGaugeVec,
    states: &'static [&'static str],
}

impl StateSet {
    /// Registers `name` with a series per state; `states[0]` is in force until [`StateSet::set`].
    pub fn register(
        registry: &Registry,
        name: &str,
        help: &str,
        label: &str,
        states: &'static [&'static str],
    ) -> Self {
        let gauge = register_gauge_vec(registry, name, help, &[label]);
        let set = StateSet { gauge, states };
        set.set(states[0]);
        set
    }

    /// Puts `state` in force (one of the registered states).
    pub fn set(&self, state: &str) {
        debug_assert!(self.states.contains(&state), "{state} is not a state");
        for known in self.states {
            self.gauge
                .with_label_values(&[known])
                .set(i64::from(*known == state));
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tier_tells_its_version_and_its_process() {
        let registry = Registry::new();
        register_process_metrics(&registry, "hub");
        let page = render(&registry);
        assert!(
            page.contains(&format!(
                "facepay_hub_build_info{{version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{page}"
        );
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(page.contains(name), "{name} missing from {page}");
        }
    }

    #[test]
    fn readiness_names_each_condition_that_does_not_hold() {
        let ready = Readiness::new();
        assert!(ready.missing().is_empty());
        let broker = prometheus::IntGauge::new("connected", "connected").unwrap();
        let keys = prometheus::IntGauge::new("synced", "synced").unwrap();
        ready.require_gauge("broker", &broker);
        ready.require_gauge("keys", &keys);
        ready.require("models", || true);
        assert_eq!(ready.missing(), ["broker", "keys"]);
        broker.set(1);
        assert_eq!(ready.missing(), ["keys"]);
        keys.set(1);
        assert!(ready.clone().missing().is_empty());
        broker.set(0);
        assert_eq!(ready.missing(), ["broker"]);
    }

    #[test]
    fn metrics_beyond_loopback_or_with_passwords_need_tls() {
        assert!(MetricsConfig::on("127.0.0.1:9100")
            .validate("metrics")
            .is_ok());
        let open = MetricsConfig::on("0.0.0.0:9100");
        assert_eq!(open.validate("metrics").unwrap_err().0, "metrics.tls");
        let tls = MetricsConfig { tls: true, ..open };
        assert!(tls.validate("metrics").is_ok());
        let clear_password = MetricsConfig {
            basic_auth_file: Some("users".into()),
            ..MetricsConfig::on("127.0.0.1:9100")
        };
        assert_eq!(
            clear_password.validate("metrics").unwrap_err().0,
            "metrics.tls"
        );
    }

    #[test]
    fn payment_metrics_render_with_labels_every_series_up_front() {
        let registry = Registry::new();
        let m = PaymentMetrics::register(&registry, "hub", &DecisionPath::BOTH);
        let text = render(&registry);
        for series in [
            "facepay_hub_payment_requests_total 0",
            "facepay_hub_payment_decisions_total{outcome=\"approved\",path=\"offline\"} 0",
            "facepay_hub_payment_decisions_total{outcome=\"declined\",path=\"online\"} 0",
            "facepay_hub_payment_declines_total{reason=\"spoof_suspected\"} 0",
            "facepay_hub_payment_decision_seconds_count{path=\"offline\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing up front:\n{text}");
        }
        assert!(!text.contains("reason=\"none\""), "{text}");
        m.request();
        m.outcome(
            None,
            DecisionPath::Offline,
            std::time::Duration::from_millis(2),
        );
        m.outcome(
            Some(DeclineReason::CodeExpired),
            DecisionPath::Online,
            std::time::Duration::from_millis(1),
        );
        let text = render(&registry);
        for series in [
            "facepay_hub_payment_requests_total 1",
            "facepay_hub_payment_decisions_total{outcome=\"approved\",path=\"offline\"} 1",
            "facepay_hub_payment_decisions_total{outcome=\"declined\",path=\"online\"} 1",
            "facepay_hub_payment_decisions_total{outcome=\"approved\",path=\"online\"} 0",
            "facepay_hub_payment_declines_total{reason=\"code_expired\"} 1",
            "facepay_hub_payment_decision_seconds_count{path=\"offline\"} 1",
            "facepay_hub_payment_decision_seconds_count{path=\"online\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        // The cloud decides online only: no offline series.
        let cloud = Registry::new();
        PaymentMetrics::register(&cloud, "cloud", &[DecisionPath::Online]);
        assert!(!render(&cloud).contains("path=\"offline\""));
    }

    #[test]
    fn verification_metrics_split_outcomes_from_reasons() {
        let registry = Registry::new();
        let m = VerificationMetrics::register(&registry, "edge");
        assert!(render(&registry)
            .contains("facepay_edge_verification_declines_total{reason=\"spoof_suspected\"} 0"));
        m.count(VerificationOutcome::Verified);
        m.count(VerificationOutcome::Declined(DeclineReason::SpoofSuspected));
        let text = render(&registry);
        for series in [
            "facepay_edge_verifications_total{outcome=\"verified\"} 1",
            "facepay_edge_verifications_total{outcome=\"declined\"} 1",
            "facepay_edge_verifications_total{outcome=\"second_factor_required\"} 0",
            "facepay_edge_verification_declines_total{reason=\"spoof_suspected\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn a_state_set_holds_one_state_at_a_time() {
        let registry = Registry::new();
        let set = StateSet::register(
            &registry,
            "facepay_hub_cloud_breaker_state",
            "breaker",
            "state",
            &["closed", "half_open", "open"],
        );
        let text = render(&registry);
        assert!(text.contains("facepay_hub_cloud_breaker_state{state=\"closed\"} 1"));
        assert!(text.contains("facepay_hub_cloud_breaker_state{state=\"open\"} 0"));
        set.set("open");
        let text = render(&registry);
        assert!(text.contains("facepay_hub_cloud_breaker_state{state=\"closed\"} 0"));
        assert!(text.contains("facepay_hub_cloud_breaker_state{state=\"half_open\"} 0"));
        assert!(text.contains("facepay_hub_cloud_breaker_state{state=\"open\"} 1"));
    }
}
