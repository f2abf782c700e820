//! The hub's side of its terminals' Zenoh queries: an authorize, a refund and a verify queryable per
//! terminal allowed (on key expressions that end with its id, which the hub's access control lets
//! only that terminal's certificate use), the revocation list relayed to all, and each terminal's
//! rate limit. Every answer is signed with the hub's certificate key.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use actix::prelude::*;
use protocol::{
    AuthorizeReply, AuthorizeRequest, DeclineReason, Refund, RefundDecision, RefundReply,
    TerminalId, VerifyReply, VerifyRequest, WireError,
};
use tokio::sync::Semaphore;

use crate::{
    config::TerminalsConfig,
    payment::{Authorize, PaymentActor, RefundPayment},
    trust::ListInForce,
    verify::{Verify, VerifyActor},
};

/// Most terminal queries in flight at once, over every terminal; more wait in Zenoh.
pub const MAX_CONCURRENT_QUERIES: usize = 64;
/// Most queries of one terminal in flight at once (refusals included); more of its queries wait
/// in Zenoh, and nobody else's: one terminal cannot take the hub's slots.
pub const MAX_IN_FLIGHT_PER_TERMINAL: usize = 4;

/// Why a terminal's query was answered without reaching an actor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a request the hub can read.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The request names another terminal than the one whose key expression it came on (whose
    /// certificate sent it).
    #[error("the request names terminal {named:?} but came from terminal {from:?}")]
    OtherTerminal {
        /// The terminal the request names.
        named: String,
        /// The terminal whose key expression it came on.
        from: String,
    },
    /// The terminal is past its rate.
    #[error("this terminal sent more requests than its rate allows; try again in a moment")]
    RateLimited,
}

impl Refused {
    /// The reason the terminal hears.
    pub fn reason(&self) -> DeclineReason {
        match self {
            Refused::Wire(WireError::UnsupportedVersion { .. }) => {
                DeclineReason::UnsupportedVersion
            }
            Refused::Wire(WireError::Malformed(_)) | Refused::OtherTerminal { .. } => {
                DeclineReason::InvalidRequest
            }
            Refused::RateLimited => DeclineReason::RateLimited,
        }
    }
}

/// A terminal's request: it names the terminal it comes from.
pub trait FromTerminal {
    /// The terminal the request names.
    fn terminal_id(&self) -> &TerminalId;
}

impl FromTerminal for AuthorizeRequest {
    fn terminal_id(&self) -> &TerminalId {
        &self.terminal_id
    }
}

impl FromTerminal for VerifyRequest {
    fn terminal_id(&self) -> &TerminalId {
        &self.terminal_id
    }
}

impl FromTerminal for Refund {
    fn terminal_id(&self) -> &TerminalId {
        &self.terminal_id
    }
}

/// Each terminal's token bucket. Terminals are only those the hub declared queryables for (its
/// allow-list), so the map is as large as the store.
pub struct TerminalRates {
    config: TerminalsConfig,
    buckets: Mutex<HashMap<String, clock::TokenBucket>>,
}

impl TerminalRates {
    /// Buckets as `config` sets them.
    pub fn new(config: TerminalsConfig) -> Self {
        TerminalRates {
            config,
            buckets: Mutex::default(),
        }
    }

    /// Whether `terminal` may send one more request at `now`.
    pub fn allow(&self, terminal: &str, now: Instant) -> bool {
        let (burst, rate) = (
            f64::from(self.config.requests_burst),
            f64::from(self.config.requests_per_second),
        );
        self.buckets
            .lock()
            .expect("not poisoned")
            .entry(terminal.to_string())
            .or_insert_with(|| clock::TokenBucket::full(burst, rate, now))
            .take(now)
    }
}

/// What a terminal's query is checked against before it reaches an actor: that its terminal was
/// `within_rate` (see [`TerminalRates`]), and that it came on its terminal's own key expression.
pub fn admit<Req: serde::de::DeserializeOwned + FromTerminal>(
    from: &str,
    payload: &[u8],
    within_rate: bool,
) -> Result<Req, Refused> {
    if !within_rate {
        return Err(Refused::RateLimited);
    }
    let request: Req = protocol::decode(payload)?;
    if request.terminal_id().as_str() != from {
        return Err(Refused::OtherTerminal {
            named: request.terminal_id().to_string(),
            from: from.to_string(),
        });
    }
    Ok(request)
}

/// Everything the queryables answer with.
#[derive(Clone)]
pub struct EdgeServices {
    /// The store.
    pub store_id: String,
    /// Charges.
    pub payment: Addr<PaymentActor>,
    /// Verifications.
    pub verify: Addr<VerifyActor>,
    /// Signs every answer.
    pub signer: pki::ReplySigner,
    /// The revocation list relayed.
    pub in_force: ListInForce,
    /// Each terminal's rate.
    pub rates: Arc<TerminalRates>,
    /// Set when the hub is stopping: a query that comes after it gets no answer (nothing is
    /// decided for it); those taken before are answered.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// The terminals of `store_id` that `common_names` (certificates allowed) name, each with the
/// common names of its certificates. Names that are no terminal of the store are left out.
pub fn terminals_of(store_id: &str, common_names: &[String]) -> Vec<(String, Vec<String>)> {
    let mut terminals: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for name in common_names {
        match pki::edge_terminal_id(name, store_id) {
            Some(terminal) => terminals
                .entry(terminal.to_string())
                .or_default()
                .push(name.clone()),
            None => tracing::warn!(common_name = name, "not a terminal of this store; ignored"),
        }
    }
    terminals.into_iter().collect()
}

/// The access control of the hub's session: each terminal's certificates on its own key
/// expressions only.
pub fn grants(store_id: &str, terminals: &[(String, Vec<String>)]) -> Vec<zlink::ZenohGrant> {
    terminals
        .iter()
        .map(|(terminal, names)| zlink::ZenohGrant {
            common_names: names.clone(),
            key_exprs: protocol::keyexpr::terminal_keys(store_id, terminal),
            role: zlink::GrantRole::Answer,
        })
        .collect()
}

/// Declares every queryable: authorize and verify for each terminal, and the revocation list.
pub async fn serve(
    zenoh: &zlink::ZenohLink,
    services: &EdgeServices,
    terminals: &[(String, Vec<String>)],
) -> anyhow::Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONCURRENT_QUERIES));
    for (terminal, _) in terminals {
        // One terminal's authorize and verify queries share its in-flight cap.
        let own = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_TERMINAL));
        let slots = Slots {
            own,
            shared: limit.clone(),
        };
        serve_authorize(zenoh, services, terminal, slots.clone()).await?;
        serve_refund(zenoh, services, terminal, slots.clone()).await?;
        serve_verify(zenoh, services, terminal, slots).await?;
    }
    serve_revocations(zenoh, &services.store_id, services.in_force.clone()).await
}

/// Where a terminal's queries wait: its own in-flight cap, then the hub's shared slots.
#[derive(Clone)]
struct Slots {
    own: Arc<Semaphore>,
    shared: Arc<Semaphore>,
}

/// Declares a queryable on `key`, on the Zenoh runtime.
async fn declare_queryable(
    zenoh: &zlink::ZenohLink,
    key: String,
) -> anyhow::Result<
    zlink::zenoh::query::Queryable<
        zlink::zenoh::handlers::FifoChannelHandler<zlink::zenoh::query::Query>,
    >,
> {
    let session = zenoh.session().clone();
    let declared = key.clone();
    zenoh
        .spawn(async move { session.declare_queryable(declared).await })
        .await
        .expect("declaring does not panic")
        .map_err(|e| anyhow::anyhow!("declaring the queryable {key}: {e}"))
}

/// Declares a queryable on `key` for `terminal` and answers each query with what `answer` makes
/// of it once admitted, signed by the hub: at most [`MAX_IN_FLIGHT_PER_TERMINAL`] of the
/// terminal's at once (`slots.own`), and those within its rate also within the hub's shared
/// slots (a refusal for the rate takes none).
async fn serve_queries<Req, F, Fut>(
    zenoh: &zlink::ZenohLink,
    key: String,
    terminal: &str,
    services: &EdgeServices,
    slots: Slots,
    answer: F,
) -> anyhow::Result<()>
where
    Req: serde::de::DeserializeOwned + FromTerminal + Send + 'static,
    F: Fn(Result<Req, Refused>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<u8>> + Send + 'static,
{
    let queryable = declare_queryable(zenoh, key).await?;
    let Slots { own, shared: limit } = slots;
    let answer = Arc::new(answer);
    let signer = Arc::new(services.signer.clone());
    let rates = services.rates.clone();
    let stopping = services.stopping.clone();
    let terminal = terminal.to_string();
    zenoh.spawn(async move {
        while let Ok(query) = queryable.recv_async().await {
            if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                // Not taken: the terminal hears no answer, and nothing was decided.
                drop(query);
                continue;
            }
            let own_permit = own
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closes");
            let within_rate = rates.allow(&terminal, Instant::now());
            let permit = match within_rate {
                true => Some(
                    limit
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore never closes"),
                ),
                false => None,
            };
            let (answer, signer) = (answer.clone(), signer.clone());
            let terminal = terminal.clone();
            tokio::spawn(async move {
                let _permits = (own_permit, permit);
                let payload = query
                    .payload()
                    .map(|p| p.to_bytes().into_owned())
                    .unwrap_or_default();
                let admitted = admit::<Req>(&terminal, &payload, within_rate);
                if let Err(refused) = &admitted {
                    tracing::warn!(%terminal, %refused, "terminal request refused");
                }
                let reply = answer(admitted).await;
                let reply = String::from_utf8(reply).expect("protocol messages are JSON text");
                let signature = match signer.sign(&payload, &reply) {
                    Ok(signature) => signature,
                    Err(error) => {
                        tracing::error!(%error, "signing an answer failed; not sent");
                        return;
                    }
                };
                let signed = protocol::encode(&protocol::SignedHubReply {
                    reply,
                    certificate_pem: signer.certificate_pem().to_owned(),
                    signature,
                });
                if let Err(error) = query.reply(query.key_expr().clone(), signed).await {
                    tracing::warn!(%error, "replying to edge failed");
                }
            });
        }
    });
    Ok(())
}

/// Declares `terminal`'s authorize queryable and answers each query through the payment actor.
async fn serve_authorize(
    zenoh: &zlink::ZenohLink,
    services: &EdgeServices,
    terminal: &str,
    slots: Slots,
) -> anyhow::Result<()> {
    let key = protocol::keyexpr::hub_authorize(&services.store_id, terminal);
    let payment = services.payment.clone();
    serve_queries(
        zenoh,
        key,
        terminal,
        services,
        slots,
        move |admitted: Result<AuthorizeRequest, Refused>| {
            let payment = payment.clone();
            async move {
                let reply = match admitted {
                    Ok(request) => {
                        let payment_id = request.payment_id.clone();
                        payment
                            .send(Authorize(request))
                            .await
                            // The payment actor stopped while it held the attempt (or before):
                            // the cloud may have it. Unknown, never declined; the restart voids
                            // or resolves it.
                            .unwrap_or_else(|error| AuthorizeReply {
                                payment_id,
                                decision: protocol::Decision::declined(
                                    DeclineReason::OutcomeUnknown,
                                    format!("hub payment path unavailable: {error}"),
                                ),
                                offline: false,
                            })
                    }
                    Err(refused) => AuthorizeReply {
                        payment_id: protocol::PaymentId::default(),
                        decision: protocol::Decision::declined(
                            refused.reason(),
                            refused.to_string(),
                        ),
                        offline: false,
                    },
                };
                protocol::encode(&reply)
            }
        },
    )
    .await
}

/// Declares `terminal`'s refund queryable and answers each query through the payment actor.
async fn serve_refund(
    zenoh: &zlink::ZenohLink,
    services: &EdgeServices,
    terminal: &str,
    slots: Slots,
) -> anyhow::Result<()> {
    let key = protocol::keyexpr::hub_refund(&services.store_id, terminal);
    let payment = services.payment.clone();
    serve_queries(
        zenoh,
        key,
        terminal,
        services,
        slots,
        move |admitted: Result<Refund, Refused>| {
            let payment = payment.clone();
            async move {
                let reply = match admitted {
                    Ok(refund) => {
                        let (refund_id, payment_id) =
                            (refund.refund_id.clone(), refund.payment_id.clone());
                        payment
                            .send(RefundPayment(refund))
                            .await
                            // The payment actor stopped while it held the refund: it may have
                            // reached the cloud. Unknown, never declined.
                            .unwrap_or_else(|error| RefundReply {
                                refund_id,
                                payment_id,
                                decision: RefundDecision::declined(
                                    DeclineReason::OutcomeUnknown,
                                    format!("hub payment path unavailable: {error}"),
                                ),
                            })
                    }
                    Err(refused) => RefundReply {
                        refund_id: String::new(),
                        payment_id: protocol::PaymentId::default(),
                        decision: RefundDecision::declined(refused.reason(), refused.to_string()),
                    },
                };
                protocol::encode(&reply)
            }
        },
    )
    .await
}

/// Declares `terminal`'s verify queryable and answers each query through the verify actor.
async fn serve_verify(
    zenoh: &zlink::ZenohLink,
    services: &EdgeServices,
    terminal: &str,
    slots: Slots,
) -> anyhow::Result<()> {
    let key = protocol::keyexpr::hub_verify(&services.store_id, terminal);
    let verify = services.verify.clone();
    serve_queries(
        zenoh,
        key,
        terminal,
        services,
        slots,
        move |admitted: Result<VerifyRequest, Refused>| {
            let verify = verify.clone();
            async move {
                let reply = match admitted {
                    Ok(request) => verify.send(Verify(request)).await.unwrap_or_else(|error| {
                        VerifyReply::refused(
                            DeclineReason::Internal,
                            format!("hub unavailable: {error}"),
                        )
                    }),
                    Err(refused) => VerifyReply::refused(refused.reason(), refused.to_string()),
                };
                protocol::encode(&reply)
            }
        },
    )
    .await
}

/// Declares the store's revocation-list queryable: terminals fetch the list the hub holds in force
/// (the CA signed it; they keep it only when it is newer than theirs).
async fn serve_revocations(
    zenoh: &zlink::ZenohLink,
    store_id: &str,
    in_force: ListInForce,
) -> anyhow::Result<()> {
    let queryable = declare_queryable(zenoh, protocol::keyexpr::hub_revocations(store_id)).await?;
    zenoh.spawn(async move {
        while let Ok(query) = queryable.recv_async().await {
            let pem = in_force.read().expect("not poisoned").clone();
            if let Err(error) = query.reply(query.key_expr().clone(), pem).await {
                tracing::warn!(%error, "relaying the revocation list failed");
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(terminal: &str) -> Vec<u8> {
        protocol::encode(&AuthorizeRequest {
            attestation: None,
            payment_id: "store-1:o-1".into(),
            store_id: "store-1".into(),
            terminal_id: terminal.into(),
            order_id: "o-1".into(),
            amount_minor: 100,
            currency: protocol::Currency::parse("EUR").unwrap(),
            proof: protocol::PaymentProof::Code("FPAY1.x.y".into()),
        })
    }

    #[test]
    fn a_request_is_admitted_only_from_the_terminal_it_names_and_within_its_rate() {
        let ok = admit::<AuthorizeRequest>("till-1", &request("till-1"), true);
        assert_eq!(ok.unwrap().terminal_id.as_str(), "till-1");
        let other = admit::<AuthorizeRequest>("till-1", &request("till-2"), true);
        assert_eq!(
            other.unwrap_err().reason(),
            DeclineReason::InvalidRequest,
            "till-1's certificate speaking for till-2"
        );
        let garbage = admit::<AuthorizeRequest>("till-1", b"{", true);
        assert_eq!(garbage.unwrap_err().reason(), DeclineReason::InvalidRequest);
        let limited = admit::<AuthorizeRequest>("till-1", &request("till-1"), false);
        assert_eq!(limited.unwrap_err(), Refused::RateLimited);
        assert!(
            DeclineReason::RateLimited.is_unknown_outcome(),
            "never a decline"
        );
    }

    #[test]
    fn each_terminal_has_its_own_rate() {
        let rates = TerminalRates::new(TerminalsConfig {
            requests_burst: 3,
            requests_per_second: 1,
        });
        let now = Instant::now();
        assert_eq!((0..5).filter(|_| rates.allow("till-1", now)).count(), 3);
        assert!(rates.allow("till-2", now), "till-2 has its own");
        let later = now + std::time::Duration::from_secs(1);
        assert!(rates.allow("till-1", later));
        assert!(!rates.allow("till-1", later));
    }

    #[test]
    fn each_terminal_gets_its_own_keys_and_foreign_names_none() {
        let names = vec![
            "edge:store-1:till-1:aaaa".to_string(),
            "edge:store-1:till-1:bbbb".to_string(),
            "edge:store-1:till-2:cccc".to_string(),
            "edge:store-10:till-3:dddd".to_string(),
            "store-1".to_string(),
        ];
        let terminals = terminals_of("store-1", &names);
        assert_eq!(
            terminals,
            vec![
                (
                    "till-1".to_string(),
                    vec![names[0].clone(), names[1].clone()]
                ),
                ("till-2".to_string(), vec![names[2].clone()]),
            ]
        );
        let grants = grants("store-1", &terminals);
        assert_eq!(
            grants[1].key_exprs,
            protocol::keyexpr::terminal_keys("store-1", "till-2")
        );
        assert_eq!(grants[1].common_names, vec![names[2].clone()]);
    }
}
