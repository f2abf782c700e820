//! The code scanner: pulls frames from its source and decodes QR codes, on its own thread.

use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::frames::FrameSource;

/// Reads frames and decodes QR codes. A `SyncArbiter` actor: frame capture and decoding block.
pub struct ScannerActor {
    source: Box<dyn FrameSource>,
}

impl ScannerActor {
    /// A scanner over a frame source.
    pub fn new(source: Box<dyn FrameSource>) -> Self {
        ScannerActor { source }
    }
}

impl Actor for ScannerActor {
    type Context = SyncContext<Self>;
}

/// Wait up to `timeout` for a frame with a QR code and return its text.
#[derive(Message)]
#[rtype(result = "Option<String>")]
pub struct ScanForCode {
    /// How long to wait.
    pub timeout: Duration,
}

impl Handler<ScanForCode> for ScannerActor {
    type Result = Option<String>;

    fn handle(&mut self, msg: ScanForCode, _: &mut Self::Context) -> Option<String> {
        // One customer's session: nothing from before it, nothing left after it.
        self.source.begin_session();
        let code = self.scan(msg.timeout);
        self.source.end_session();
        code
    }
}

impl ScannerActor {
    fn scan(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(frame) = self.source.next_frame(deadline) {
            // A frame may show several codes (a phone and a poster); the facepay one wins.
            let codes = paycode::qr::decode(&image::DynamicImage::ImageRgb8(frame).to_luma8());
            if let Some(code) = codes
                .iter()
                .find(|c| c.starts_with(paycode::CODE_PREFIX))
                .or(codes.first())
            {
                return Some(code.clone());
            }
        }
        None
    }
}
