//! Every message a tier reads off a link, from bytes: decoding never panics, and what decodes is
//! checked as the tiers check it (store namespaces, amounts) without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{
    AuthorizeRequest, CloudReply, HubRequest, HubRequestBody, KeyBatch, OfflineBatch,
    SignedHubReply, TemplateBatch, VerifyReply, VerifyRequest,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = protocol::decode::<HubRequest>(data) {
        let store = request.store_id.as_str();
        match &request.body {
            HubRequestBody::Authorize(a) => {
                let _ = a.check_from(store);
            }
            HubRequestBody::Void(v) => {
                let _ = v.check_from(store);
            }
            HubRequestBody::Post(batch) => {
                for p in &batch.posts {
                    let _ = p.check_from(store);
                }
            }
            HubRequestBody::Reconcile(batch) => {
                for entry in &batch.entries {
                    let _ = entry.check_from(store);
                }
            }
            HubRequestBody::PaymentStatus { payment_id } => {
                let _ = protocol::check_store_payment(store, payment_id);
            }
            _ => {}
        }
        // What decodes encodes again (not always decodably: an f32 overflow becomes null).
        let _ = protocol::encode(&request);
    }
    let _ = protocol::decode::<CloudReply>(data);
    let _ = protocol::decode::<KeyBatch>(data);
    let _ = protocol::decode::<TemplateBatch>(data);
    let _ = protocol::decode::<OfflineBatch>(data);
    let _ = protocol::decode::<AuthorizeRequest>(data);
    let _ = protocol::decode::<VerifyRequest>(data);
    let _ = protocol::decode::<VerifyReply>(data);
    let _ = protocol::decode::<SignedHubReply>(data);
    let _ = protocol::decode::<protocol::AllowanceBatch>(data);
    let _ = serde_json::from_slice::<pki::Sealed>(data);
});
