//! Logging and Prometheus metrics shared by every tier.
//!
//! Each tier instance owns its own [`prometheus::Registry`] rather than the process-global one, so
//! that the fleet demo can run several hubs and edges in one process without name clashes.

use actix_web::{web, HttpResponse};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use protocol::DeclineReason;

/// Starts structured logging to standard error; `RUST_LOG` selects levels (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests, the fleet demo) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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

/// Serves a tier's HTTP API with `/metrics` and `/healthz` on one worker thread, on the current
/// actix system, and returns the bound address (port 0 picks one) and the server's handle.
pub fn serve_http<F>(
    listen: &str,
    registry: Registry,
    routes: F,
) -> std::io::Result<(std::net::SocketAddr, actix_web::dev::ServerHandle)>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    serve(listen, registry, None, routes)
}

/// Like [`serve_http`], over TLS (rustls): for APIs that carry personal data.
pub fn serve_https<F>(
    listen: &str,
    registry: Registry,
    tls: rustls::ServerConfig,
    routes: F,
) -> std::io::Result<(std::net::SocketAddr, actix_web::dev::ServerHandle)>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    serve(listen, registry, Some(tls), routes)
}

fn serve<F>(
    listen: &str,
    registry: Registry,
    tls: Option<rustls::ServerConfig>,
    routes: F,
) -> std::io::Result<(std::net::SocketAddr, actix_web::dev::ServerHandle)>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let server = actix_web::HttpServer::new(move || {
        let registry = registry.clone();
        actix_web::App::new()
            .configure(|cfg| configure_metrics(cfg, registry))
            .route("/healthz", web::get().to(|| async { "ok" }))
            .configure(routes.clone())
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
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

/// Creates and registers an integer gauge on a tier's registry.
pub fn register_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::IntGauge {
    let gauge = prometheus::IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("registered once per registry");
    gauge
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

/// The metrics every tier keeps about the payments it handles:
/// `facepay_<tier>_payment_requests_total`, `facepay_<tier>_payment_outcomes_total{outcome,reason}`
/// and `facepay_<tier>_payment_duration_seconds`.
#[derive(Clone)]
pub struct PaymentMetrics {
    requests_total: IntCounter,
    outcomes_total: IntCounterVec,
    duration_seconds: Histogram,
}

impl PaymentMetrics {
    /// Registers the payment metrics of `tier` (`edge`, `hub`, `cloud`).
    pub fn register(registry: &Registry, tier: &str) -> Self {
        let requests_total = IntCounter::new(
            format!("facepay_{tier}_payment_requests_total"),
            "payment requests received",
        )
        .expect("valid metric");
        let outcomes_total = IntCounterVec::new(
            Opts::new(
                format!("facepay_{tier}_payment_outcomes_total"),
                "payment decisions by outcome and decline reason",
            ),
            &["outcome", "reason"],
        )
        .expect("valid metric");
        let duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                format!("facepay_{tier}_payment_duration_seconds"),
                "time from request to decision",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(requests_total.clone()))
            .expect("registered once per registry");
        registry
            .register(Box::new(outcomes_total.clone()))
            .expect("registered once per registry");
        registry
            .register(Box::new(duration_seconds.clone()))
            .expect("registered once per registry");
        outcomes_total.with_label_values(&["approved", "none"]);
        for reason in DeclineReason::ALL {
            outcomes_total.with_label_values(&["declined", reason.as_str()]);
        }
        PaymentMetrics {
            requests_total,
            outcomes_total,
            duration_seconds,
        }
    }

    /// Counts a request as it arrives.
    pub fn request(&self) {
        self.requests_total.inc();
    }

    /// Counts a decision and its latency.
    pub fn outcome(&self, reason: Option<DeclineReason>, elapsed: std::time::Duration) {
        match reason {
            None => self
                .outcomes_total
                .with_label_values(&["approved", "none"])
                .inc(),
            Some(r) => self
                .outcomes_total
                .with_label_values(&["declined", r.as_str()])
                .inc(),
        }
        self.duration_seconds.observe(elapsed.as_secs_f64());
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
    fn payment_metrics_render_with_labels() {
        let registry = Registry::new();
        let m = PaymentMetrics::register(&registry, "hub");
        m.request();
        m.outcome(None, std::time::Duration::from_millis(2));
        m.outcome(
            Some(DeclineReason::CodeExpired),
            std::time::Duration::from_millis(1),
        );
        let text = render(&registry);
        assert!(
            text.contains("facepay_hub_payment_requests_total 1"),
            "{text}"
        );
        assert!(text.contains(
            "facepay_hub_payment_outcomes_total{outcome=\"declined\",reason=\"code_expired\"} 1"
        ));
        assert!(text.contains(
            "facepay_hub_payment_outcomes_total{outcome=\"approved\",reason=\"none\"} 1"
        ));
        assert!(text.contains("facepay_hub_payment_duration_seconds_count 2"));
    }
}
