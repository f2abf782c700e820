//! The camera: pulls colour frames from its source and runs the face pipeline (detection, quality
//! gates, liveness, embedding) on its own thread, until one frame shows a usable live face.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use face::{FaceEngine, Gates, Refusal};
use protocol::DeclineReason;

use crate::frames::FrameSource;

/// Looks at the customer. A `SyncArbiter` actor: capture and inference block.
pub struct CameraActor {
    source: Box<dyn FrameSource>,
    engine: Arc<FaceEngine>,
}

impl CameraActor {
    /// A camera over a frame source and a loaded face engine.
    pub fn new(source: Box<dyn FrameSource>, engine: Arc<FaceEngine>) -> Self {
        CameraActor { source, engine }
    }
}

impl Actor for CameraActor {
    type Context = SyncContext<Self>;
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
        self.source.begin_session();
        let captured = self.capture(msg);
        self.source.end_session();
        captured
    }
}

impl CameraActor {
    fn capture(&mut self, msg: CaptureFace) -> Result<Vec<f32>, NoFace> {
        let deadline = Instant::now() + msg.timeout;
        let mut last_refusal: Option<Refusal> = None;
        while let Some(frame) = self.source.next_frame(deadline) {
            match self.engine.analyze_image(&frame, Gates::All) {
                Ok(analysis) => match (analysis.embedding, analysis.refusal) {
                    (Some(embedding), None) => return Ok(embedding),
                    // A presentation attack ends the session at once: no second try on it.
                    (_, Some(Refusal::NotLive)) => {
                        return Err(NoFace {
                            reason: DeclineReason::SpoofSuspected,
                            detail: "the face shown is not a live person (photo, screen or \
                                     mask); nothing was charged"
                                .into(),
                        })
                    }
                    // Turned head, blur, two faces...: the next frame may be better.
                    (_, refusal) => last_refusal = refusal.or(Some(Refusal::NoFace)),
                },
                Err(error) => tracing::warn!(%error, "camera frame could not be analysed"),
            }
        }
        Err(NoFace {
            reason: DeclineReason::NoFacePresented,
            detail: match last_refusal {
                Some(refusal) => format!(
                    "no usable face within {} ms (last frame: {refusal})",
                    msg.timeout.as_millis()
                ),
                None => format!("no face seen within {} ms", msg.timeout.as_millis()),
            },
        })
    }
}
