//! The camera: pulls colour frames from its source and runs the face pipeline (detection, quality
//! gates, liveness, embedding) on its own thread, until one frame shows a usable live face.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use face::{FaceEngine, Gates, Refusal};
use protocol::DeclineReason;

use crate::{error::SourceError, frames::FrameSource, health::SourceHealth};

/// Looks at the customer. A `SyncArbiter` actor: capture and inference block.
pub struct CameraActor {
    source: Box<dyn FrameSource>,
    engine: Arc<FaceEngine>,
    health: SourceHealth,
}

impl CameraActor {
    /// A camera over a frame source and a loaded face engine; `health` follows whether the
    /// source works.
    pub fn new(
        source: Box<dyn FrameSource>,
        engine: Arc<FaceEngine>,
        health: SourceHealth,
    ) -> Self {
        CameraActor {
            source,
            engine,
            health,
        }
    }
}

impl Actor for CameraActor {
    type Context = SyncContext<Self>;

    /// Opens the source once at start, so a missing camera is logged and shown by
    /// `facepay_edge_source_up` before the first customer.
    fn started(&mut self, _: &mut Self::Context) {
        let checked = self.source.check();
        self.health.observe(&checked);
    }
}

/// Why no face was captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoFace {
    /// The decline reason for the cash register.
    pub reason: DeclineReason,
    /// What the camera saw.
    pub detail: String,
}

/// Wait up to `timeout` for a frame with a usable live face; its embedding.
#[derive(Message)]
#[rtype(result = "Result<Vec<f32>, NoFace>")]
pub struct CaptureFace {
    /// How long to look.
    pub timeout: Duration,
}

impl Handler<CaptureFace> for CameraActor {
    type Result = Result<Vec<f32>, NoFace>;

    fn handle(&mut self, msg: CaptureFace, _: &mut Self::Context) -> Self::Result {
        // One customer's session: nothing from before it, nothing left after it.
        let captured = self.source.begin_session().and_then(|()| self.capture(msg));
        self.source.end_session();
        self.health.observe(&captured);
        captured.unwrap_or_else(|error| Err(unavailable(&error)))
    }
}

/// The answer when the camera does not work: the terminal keeps taking code payments.
fn unavailable(error: &SourceError) -> NoFace {
    NoFace {
        reason: DeclineReason::CameraUnavailable,
        detail: format!("camera unavailable: {error}; nothing was charged"),
    }
}

impl CameraActor {
    /// A face's embedding, or why none; an error when the source failed.
    fn capture(&mut self, msg: CaptureFace) -> Result<Result<Vec<f32>, NoFace>, SourceError> {
        let deadline = Instant::now() + msg.timeout;
        let mut last_refusal: Option<Refusal> = None;
        while let Some(frame) = self.source.next_frame(deadline)? {
            match self.engine.analyze_image(&frame, Gates::All) {
                Ok(analysis) => match (analysis.embedding, analysis.refusal) {
                    (Some(embedding), None) => return Ok(Ok(embedding)),
                    // A presentation attack ends the session at once: no second try on it.
                    (_, Some(Refusal::NotLive)) => {
                        return Ok(Err(NoFace {
                            reason: DeclineReason::SpoofSuspected,
                            detail: "the face shown is not a live person (photo, screen or \
                                     mask); nothing was charged"
                                .into(),
                        }))
                    }
                    // Turned head, blur, two faces...: the next frame may be better.
                    (_, refusal) => last_refusal = refusal.or(Some(Refusal::NoFace)),
                },
                Err(error) => tracing::warn!(%error, "camera frame could not be analysed"),
            }
        }
        Ok(Err(NoFace {
            reason: DeclineReason::NoFacePresented,
            detail: match last_refusal {
                Some(refusal) => format!(
                    "no usable face within {} ms (last frame: {refusal})",
                    msg.timeout.as_millis()
                ),
                None => format!("no face seen within {} ms", msg.timeout.as_millis()),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::SourceMetrics;

    #[actix::test]
    async fn a_camera_that_does_not_work_answers_camera_unavailable() {
        let engine = Arc::new(FaceEngine::load_default(face::FaceConfig::default()).unwrap());
        let registry = prometheus::Registry::new();
        let metrics = SourceMetrics::register(&registry);
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/video.mjpg", closed.local_addr().unwrap());
        drop(closed);
        let sources: Vec<Box<dyn FrameSource>> = vec![
            Box::new(crate::mjpeg::MjpegHttpSource::new(
                crate::mjpeg::MjpegSettings {
                    url: crate::mjpeg::HttpUrl::parse(&url).unwrap(),
                    stall_timeout: Duration::from_secs(1),
                    reconnect: Duration::from_millis(100),
                },
            )),
            Box::new(crate::v4l2::V4l2Source::new(crate::v4l2::V4l2Settings {
                device: "/dev/video-missing".into(),
                format: crate::v4l2::CameraFormat::Mjpeg,
                width: 640,
                height: 480,
                fps: 15,
                stall_timeout: Duration::from_secs(1),
            })),
        ];
        for (source, named) in sources
            .into_iter()
            .zip([url.as_str(), "/dev/video-missing"])
        {
            let source = std::sync::Mutex::new(Some(source));
            let health = metrics.health("camera");
            let health = std::sync::Mutex::new(Some(health));
            let engine = engine.clone();
            let camera = SyncArbiter::start(1, move || {
                CameraActor::new(
                    source.lock().unwrap().take().unwrap(),
                    engine.clone(),
                    health.lock().unwrap().take().unwrap(),
                )
            });
            let refused = camera
                .send(CaptureFace {
                    timeout: Duration::from_secs(10),
                })
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(refused.reason, DeclineReason::CameraUnavailable);
            assert!(
                refused.detail.starts_with(&format!(
                    "camera unavailable: camera {named} cannot be opened"
                )),
                "{}",
                refused.detail
            );
        }
        let text = telemetry::render(&registry);
        assert!(
            text.contains("facepay_edge_source_up{source=\"camera\"} 0"),
            "{text}"
        );
        // Each camera once at start and once for its session.
        assert!(
            text.contains(
                "facepay_edge_source_errors_total{kind=\"unavailable\",source=\"camera\"} 4"
            ),
            "{text}"
        );
    }
}
