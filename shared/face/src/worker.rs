//! The face pipeline as an actor on dedicated threads, for tiers built of actix actors: async
//! handlers send [`AnalyzeFace`] and await the answer, and inference never runs on their threads.

use std::sync::Arc;

use actix::prelude::*;

use crate::{FaceAnalysis, FaceEngine, FaceError, Gates};

/// Runs the pipeline on a `SyncArbiter` thread; every worker shares the one loaded engine.
pub struct FaceWorker {
    engine: Arc<FaceEngine>,
}

impl Actor for FaceWorker {
    type Context = SyncContext<Self>;
}

/// Analyse one image (file bytes).
#[derive(Message)]
#[rtype(result = "Result<FaceAnalysis, FaceError>")]
pub struct AnalyzeFace {
    /// The encoded image.
    pub image: Vec<u8>,
    /// Which gates apply.
    pub gates: Gates,
}

impl Handler<AnalyzeFace> for FaceWorker {
    type Result = Result<FaceAnalysis, FaceError>;
    fn handle(&mut self, msg: AnalyzeFace, _: &mut Self::Context) -> Self::Result {
        self.engine.analyze(&msg.image, msg.gates)
    }
}

/// Starts `threads` workers sharing `engine`; call from inside an actix system.
pub fn start_workers(engine: Arc<FaceEngine>, threads: usize) -> Addr<FaceWorker> {
    SyncArbiter::start(threads.max(1), move || FaceWorker {
        engine: engine.clone(),
    })
}
