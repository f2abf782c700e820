//! The edge's side of the Zenoh query/reply with its store hub.

use std::time::{Duration, Instant};

use protocol::{AuthorizeReply, AuthorizeRequest, Refund, RefundReply, VerifyReply, VerifyRequest};
use serde::de::DeserializeOwned;

/// Pause between attempts while no hub queryable is reachable.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// How long a query waits for a Zenoh link to appear before the hub counts as unreachable.
pub const NO_LINK_GRACE: Duration = Duration::from_millis(500);

/// Why the hub gave no decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubUnreachable {
    /// No hub answered: the request never reached one, nothing was recorded.
    #[error("no store hub reachable")]
    NoHub,
    /// The terminal's revocation list is past its next update: it could check no hub's answer,
    /// so nothing was sent.
    #[error("the terminal's revocation list has expired; nothing was sent")]
    ListExpired,
    /// The hub got the request but did not answer in time.
    #[error("the store hub did not answer within {0} ms")]
    Timeout(u64),
    /// The hub answered something unreadable.
    #[error("unreadable answer from the store hub: {0}")]
    BadReply(String),
}

/// How long a relayed revocation list may take to arrive.
pub const REVOCATION_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// How soon a terminal asks for the revocation list again while its hub is not heard.
const HUB_UNHEARD_RETRY: Duration = Duration::from_secs(1);

/// Asks the store's hub to authorize payments and verify customers, and acts only on answers
/// its store's hub certificate signed (valid, not revoked).
#[derive(Clone)]
pub struct HubClient {
    zenoh: zlink::ZenohLink,
    key: String,
    verify_key: String,
    refund_key: String,
    timeout: Duration,
    verifier: std::sync::Arc<pki::HubVerifier>,
}

/// The answer inside a signed hub reply, if the signature checks.
fn open_signed(
    verifier: &pki::HubVerifier,
    request: &[u8],
    bytes: &[u8],
) -> Result<String, String> {
    let signed: protocol::SignedHubReply =
        protocol::decode(bytes).map_err(|e| format!("unsigned or unreadable answer: {e}"))?;
    verifier
        .verify(
            request,
            &signed.reply,
            &signed.certificate_pem,
            &signed.signature,
        )
        .map_err(|e| e.to_string())?;
    Ok(signed.reply)
}

impl HubClient {
    /// A client for a store's hub, asking as `terminal_id` (the hub lets this terminal's
    /// certificate use only that terminal's key expressions); `verifier` checks its answers. Every `revocation_poll` it
    /// fetches the revocation list the hub relays and keeps a newer one the CA signed
    /// (`revoked_gauge` shows how many certificates it revokes; `reachable_gauge` is 1 while the
    /// last poll was answered with a list the CA signed, as the store's hub relays it, and 0
    /// otherwise).
    pub fn new(
        zenoh: zlink::ZenohLink,
        store_id: &str,
        terminal_id: &str,
        timeout: Duration,
        verifier: pki::HubVerifier,
        revocation_poll: Duration,
        (revoked_gauge, reachable_gauge): (prometheus::IntGauge, prometheus::IntGauge),
    ) -> Self {
        let verifier = std::sync::Arc::new(verifier);
        revoked_gauge.set(verifier.revoked_count() as i64);
        let session = zenoh.session().clone();
        let key = protocol::keyexpr::hub_revocations(store_id);
        let poller = verifier.clone();
        zenoh.spawn(async move {
            let mut last_refusal = String::new();
            let mut pause = Duration::ZERO;
            // Ends with the session (the terminal stopping).
            while !session.is_closed() {
                tokio::time::sleep(pause).await;
                // While the hub is not heard, asked again within a second: readiness follows.
                pause = HUB_UNHEARD_RETRY.min(revocation_poll);
                // Every peer's answer is looked at (no consolidation): a rogue cannot hide the
                // hub's newer list behind an older one.
                let Ok(replies) = session
                    .get(&key)
                    .consolidation(zlink::zenoh::query::ConsolidationMode::None)
                    .timeout(REVOCATION_FETCH_TIMEOUT.min(revocation_poll))
                    .await
                else {
                    reachable_gauge.set(0);
                    continue;
                };
                let mut heard = false;
                while let Ok(reply) = replies.recv_async().await {
                    let Ok(sample) = reply.result() else { continue };
                    let pem = sample.payload().to_bytes().into_owned();
                    let verifier = poller.clone();
                    let taken = tokio::task::spawn_blocking(move || verifier.update(&pem))
                        .await
                        .expect("updating does not panic");
                    heard |= taken.is_ok();
                    match taken {
                        Ok(true) => {
                            tracing::info!(
                                revoked = poller.revoked_count(),
                                "newer revocation list relayed by the hub"
                            );
                            revoked_gauge.set(poller.revoked_count() as i64);
                        }
                        Ok(false) => {}
                        Err(error) => {
                            let text = error.to_string();
                            if text != last_refusal {
                                tracing::warn!(error = text, "relayed revocation list refused");
                                last_refusal = text;
                            }
                        }
                    }
                }
                reachable_gauge.set(i64::from(heard));
                if heard {
                    pause = revocation_poll;
                }
            }
        });
        HubClient {
            zenoh,
            key: protocol::keyexpr::hub_authorize(store_id, terminal_id),
            verify_key: protocol::keyexpr::hub_verify(store_id, terminal_id),
            refund_key: protocol::keyexpr::hub_refund(store_id, terminal_id),
            timeout,
            verifier,
        }
    }

    /// Sends the payment and waits for the decision.
    pub async fn authorize(
        &self,
        request: &AuthorizeRequest,
    ) -> Result<AuthorizeReply, HubUnreachable> {
        self.query(self.key.clone(), protocol::encode(request))
            .await
    }

    /// Sends a refund and waits for the decision.
    pub async fn refund(&self, refund: &Refund) -> Result<RefundReply, HubUnreachable> {
        self.query(self.refund_key.clone(), protocol::encode(refund))
            .await
    }

    /// Sends a verification and waits for its outcome.
    pub async fn verify(&self, request: &VerifyRequest) -> Result<VerifyReply, HubUnreachable> {
        self.query(self.verify_key.clone(), protocol::encode(request))
            .await
    }

    /// Sends a query and waits for the answer. While no hub is reachable at all the query is
    /// retried (it reached nobody, so repeating it is safe) until the deadline.
    async fn query<T: DeserializeOwned + Send + 'static>(
        &self,
        key: String,
        payload: Vec<u8>,
    ) -> Result<T, HubUnreachable> {
        if self.verifier.list_expired() {
            return Err(HubUnreachable::ListExpired);
        }
        let session = self.zenoh.session().clone();
        let timeout = self.timeout;
        let verifier = self.verifier.clone();
        self.zenoh
            .spawn(async move {
                let deadline = Instant::now() + timeout;
                // With no Zenoh link to any peer (the hub is down or the link is cut), fail
                // fast: the register hears "unreachable" now, not after the whole deadline. A
                // short grace covers a link being (re)established.
                let grace = Instant::now() + NO_LINK_GRACE.min(timeout);
                loop {
                    let linked = session.info().peers_zid().await.next().is_some()
                        || session.info().routers_zid().await.next().is_some();
                    if linked {
                        break;
                    }
                    if Instant::now() >= grace {
                        return Err(HubUnreachable::NoHub);
                    }
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                loop {
                    // Past the deadline, a query sent before may have reached a hub whose
                    // answer was lost: the outcome is not known (cautious when none was sent).
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        return Err(HubUnreachable::Timeout(timeout.as_millis() as u64));
                    }
                    // Every peer's answer is looked at (no consolidation, which would keep one
                    // answer per key and let a rogue's hide the hub's).
                    let replies = session
                        .get(&key)
                        .payload(payload.clone())
                        .consolidation(zlink::zenoh::query::ConsolidationMode::None)
                        .timeout(remaining)
                        .await
                        .map_err(|e| HubUnreachable::BadReply(e.to_string()))?;
                    let started = Instant::now();
                    // The first answer the store's hub signed counts; any other (a peer with a
                    // revoked or foreign certificate) is passed over.
                    let mut refused = None;
                    while let Ok(reply) = replies.recv_async().await {
                        match reply.result() {
                            Ok(sample) => {
                                match open_signed(&verifier, &payload, &sample.payload().to_bytes())
                                {
                                    Ok(answer) => {
                                        return protocol::decode(answer.as_bytes())
                                            .map_err(|e| HubUnreachable::BadReply(e.to_string()))
                                    }
                                    Err(why) => {
                                        tracing::warn!(
                                            why,
                                            "an answer not signed by this store's hub was ignored"
                                        );
                                        refused = Some(why);
                                    }
                                }
                            }
                            // An error answer is unsigned: noted, and a signed answer awaited.
                            Err(error) => {
                                let text = String::from_utf8_lossy(&error.payload().to_bytes())
                                    .into_owned();
                                refused = Some(text);
                            }
                        }
                    }
                    if let Some(why) = refused {
                        return if why.to_lowercase().contains("timeout") {
                            Err(HubUnreachable::Timeout(timeout.as_millis() as u64))
                        } else {
                            Err(HubUnreachable::BadReply(why))
                        };
                    }
                    // The reply channel closed without a reply. Immediately: no queryable
                    // matched, or the link dropped while the hub had it (then the hub sees the
                    // retry as a second request for an open payment and answers
                    // `payment_in_progress`); after the timeout: the hub got it but did not
                    // answer.
                    if started.elapsed() + RETRY_INTERVAL < remaining {
                        tokio::time::sleep(RETRY_INTERVAL).await;
                    } else {
                        return Err(HubUnreachable::Timeout(timeout.as_millis() as u64));
                    }
                }
            })
            .await
            .expect("hub query task does not panic")
    }
}
