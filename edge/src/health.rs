//! Whether the camera and the code scanner work: a gauge per source, errors counted by kind,
//! and one log line per change of state (never one per frame or per session).

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::error::SourceError;

/// The sources watched, a metric label.
pub const SOURCES: [&str; 2] = ["scanner", "camera"];

/// The terminal's source metrics, every series created at start.
#[derive(Clone)]
pub struct SourceMetrics {
    up: IntGaugeVec,
    errors: IntCounterVec,
}

impl SourceMetrics {
    /// Registers `facepay_edge_source_up{source}` and
    /// `facepay_edge_source_errors_total{source,kind}` on the terminal's registry.
    pub fn register(registry: &Registry) -> Self {
        let up = telemetry::register_gauge_vec(
            registry,
            "facepay_edge_source_up",
            "1 while the source (scanner, camera) last opened and read without error; set at \
             start and by every session",
            &["source"],
        );
        let errors = IntCounterVec::new(
            Opts::new(
                "facepay_edge_source_errors_total",
                "sessions a source failed, by kind (unavailable, stopped, stalled, unusable)",
            ),
            &["source", "kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(errors.clone()))
            .expect("registered once per registry");
        for source in SOURCES {
            up.with_label_values(&[source]).set(0);
            for kind in SourceError::KINDS {
                errors.with_label_values(&[source, kind]);
            }
        }
        SourceMetrics { up, errors }
    }

    /// The health of one source (`"scanner"` or `"camera"`).
    pub fn health(&self, source: &'static str) -> SourceHealth {
        assert!(SOURCES.contains(&source), "a source of the closed set");
        SourceHealth {
            source,
            metrics: self.clone(),
            last: State::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Unknown,
    Up,
    Down(String),
}

/// One source's state: what the last session (or the check at start) found.
pub struct SourceHealth {
    source: &'static str,
    metrics: SourceMetrics,
    last: State,
}

impl SourceHealth {
    /// Records what a source answered: the gauge follows it, an error is counted, and a change
    /// of state (working, or another error than the last) is logged once.
    pub fn observe<T>(&mut self, result: &Result<T, SourceError>) {
        let source = self.source;
        let state = match result {
            Ok(_) => State::Up,
            Err(error) => {
                self.metrics
                    .errors
                    .with_label_values(&[source, error.kind()])
                    .inc();
                State::Down(error.to_string())
            }
        };
        self.metrics
            .up
            .with_label_values(&[source])
            .set(i64::from(state == State::Up));
        if state == self.last {
            return;
        }
        match (&self.last, result) {
            (_, Err(error)) => {
                tracing::error!(%error, source, kind = error.kind(), "{source} unavailable")
            }
            (State::Down(_), Ok(_)) => tracing::info!(source, "{source} works again"),
            (_, Ok(_)) => tracing::info!(source, "{source} works"),
        }
        self.last = state;
    }

    /// Whether the last session found the source working.
    pub fn is_up(&self) -> bool {
        self.last == State::Up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(registry: &Registry) -> String {
        telemetry::render(registry)
            .lines()
            .filter(|l| l.starts_with("facepay_edge_source"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn every_series_exists_from_the_start_and_follows_the_sessions() {
        let registry = Registry::new();
        let metrics = SourceMetrics::register(&registry);
        let text = series(&registry);
        for source in SOURCES {
            assert!(text.contains(&format!("facepay_edge_source_up{{source=\"{source}\"}} 0")));
            for kind in SourceError::KINDS {
                assert!(
                    text.contains(&format!(
                        "facepay_edge_source_errors_total{{kind=\"{kind}\",source=\"{source}\"}} 0"
                    )),
                    "{text}"
                );
            }
        }
        let mut camera = metrics.health("camera");
        camera.observe(&Ok::<(), SourceError>(()));
        assert!(camera.is_up());
        let stalled = SourceError::Stalled {
            what: "camera http://127.0.0.1:1/".into(),
            after_ms: 2000,
        };
        camera.observe(&Err::<(), _>(stalled.clone()));
        camera.observe(&Err::<(), _>(stalled));
        assert!(!camera.is_up());
        let text = series(&registry);
        assert!(text.contains("facepay_edge_source_up{source=\"camera\"} 0"));
        assert!(
            text.contains("facepay_edge_source_errors_total{kind=\"stalled\",source=\"camera\"} 2")
        );
        // The scanner's series are its own.
        assert!(text.contains("facepay_edge_source_up{source=\"scanner\"} 0"));
        camera.observe(&Ok::<(), SourceError>(()));
        assert!(series(&registry).contains("facepay_edge_source_up{source=\"camera\"} 1"));
    }
}
