//! The facepay wire protocol: every message that crosses a process boundary, the MQTT topics and
//! Zenoh key expressions that carry them, and the validation of the identifiers and money amounts
//! inside them.
//!
//! Everything on the wire is JSON wrapped in an [`Envelope`] carrying [`PROTOCOL_VERSION`]; a peer
//! that receives another version refuses the message with [`WireError::UnsupportedVersion`] instead
//! of guessing. Topic and key-expression strings are built only by the functions in [`topics`] and
//! [`keyexpr`].

mod checks;
mod error;
mod identity;
mod ids;
pub mod keyexpr;
mod messages;
mod money;
mod offline;
mod refund;
mod settlement;
pub mod topics;

pub use checks::{check_amount, check_payment_id, check_store_payment};
pub use error::{ValidationError, WireError};
pub use identity::*;
pub use ids::{AccountId, CodeNonce, OrderId, PaymentId, StoreId, TerminalId};
pub use messages::*;
pub use money::{validate_amount, Currency, MAX_AMOUNT_MINOR};
pub use offline::*;
pub use refund::*;
pub use settlement::*;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The version of every message type in this crate. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;

/// Longest identifier (store, terminal, account, order) accepted anywhere.
pub const MAX_ID_LEN: usize = 64;

/// The versioned wrapper around every message on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Protocol version of `body`.
    pub v: u16,
    /// The message itself.
    pub body: T,
}

/// Serialises `body` in an envelope of the current version.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Borrowed<'a, T> {
        v: u16,
        body: &'a T,
    }
    serde_json::to_vec(&Borrowed {
        v: PROTOCOL_VERSION,
        body,
    })
    .expect("wire messages always serialise")
}

/// Parses an envelope and refuses any version but the current one.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u16,
    }
    let version: VersionOnly =
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if version.v != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion {
            got: version.v,
            supported: PROTOCOL_VERSION,
        });
    }
    let envelope: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok(envelope.body)
}

/// Checks that an identifier is 1..=64 characters of `[A-Za-z0-9_.-]`, so that it can be embedded
/// in MQTT topics, Zenoh key expressions, file names and payment ids without escaping.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ValidationError::IdLength {
            kind,
            len: id.len(),
            max: MAX_ID_LEN,
        });
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(ValidationError::IdCharacter {
            kind,
            id: id.to_owned(),
            character: bad,
        });
    }
    Ok(())
}

/// The payment id of an order at a store: the idempotency key of its transfer in the ledger.
/// The same order charged twice is the same payment and never moves money twice.
pub fn payment_id(store_id: &str, order_id: &str) -> PaymentId {
    PaymentId::from(format!("{store_id}:{order_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request a hub can send goes over the wire and back (an internally tagged enum
    /// cannot carry every shape: a newtype variant of a sequence fails only when encoded).
    #[test]
    fn every_hub_request_encodes_and_decodes() {
        let attempt = VoidPayment {
            payment_id: "s:o1".into(),
            account_id: "a".into(),
            code_nonce: "n".into(),
        };
        let bodies = vec![
            HubRequestBody::Authorize(CloudAuthorize {
                evidence: Default::default(),
                payment_id: "s:o1".into(),
                account_id: "a".into(),
                code_nonce: "n".into(),
                amount_minor: 5,
                currency: Currency::parse("EUR").unwrap(),
                terminal_id: "t".into(),
                order_id: "o1".into(),
                offline_reservation: Default::default(),
                spent_code: None,
            }),
            HubRequestBody::Void(attempt.clone()),
            HubRequestBody::Post(PostBatch {
                posts: vec![attempt.clone(), attempt],
            }),
            HubRequestBody::KeySync { after_version: 3 },
            HubRequestBody::TemplateSync { after_version: 3 },
            HubRequestBody::Identify(CloudIdentify {
                embedding: vec![0.5; 4],
                account_id: None,
            }),
            HubRequestBody::Reconcile(OfflineBatch { entries: vec![] }),
            HubRequestBody::AllowanceSync {
                after_account: Some("a".into()),
            },
        ];
        for body in bodies {
            let request = HubRequest {
                request_id: 7,
                store_id: "s".into(),
                body,
            };
            let back: HubRequest = decode(&encode(&request)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{request:?}"));
        }
        let posted = CloudReply {
            request_id: 7,
            body: CloudReplyBody::Posted {
                payment_ids: vec!["s:o1".into()],
                posted: vec![true],
            },
        };
        let back: CloudReply = decode(&encode(&posted)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{posted:?}"));
    }

    #[test]
    fn envelope_round_trips_and_refuses_other_versions() {
        let reply = AuthorizeReply {
            payment_id: "s1:o1".into(),
            decision: Decision::Declined {
                reason: DeclineReason::CodeExpired,
                detail: "expired 3 s ago".into(),
            },
            offline: false,
        };
        let bytes = encode(&reply);
        let back: AuthorizeReply = decode(&bytes).unwrap();
        assert_eq!(back, reply);

        let future = String::from_utf8(bytes)
            .unwrap()
            .replace("\"v\":1", "\"v\":2");
        let err = decode::<AuthorizeReply>(future.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            WireError::UnsupportedVersion {
                got: 2,
                supported: 1
            }
        );
        assert!(matches!(
            decode::<AuthorizeReply>(b"{nope"),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn ids_are_checked() {
        fn check(id: &str, ok: bool) {
            assert_eq!(validate_id("store_id", id).is_ok(), ok, "{id:?}");
        }
        check("store-1", true);
        check("a.b_c-9", true);
        check("", false);
        check("a/b", false);
        check("a+b", false);
        check("#", false);
        check("with space", false);
        check(&"x".repeat(64), true);
        check(&"x".repeat(65), false);
    }

    #[test]
    fn decline_reasons_have_stable_snake_case_names() {
        let json = serde_json::to_string(&DeclineReason::InsufficientFunds).unwrap();
        assert_eq!(json, "\"insufficient_funds\"");
        assert_eq!(DeclineReason::CodeReplayed.as_str(), "code_replayed");
        for reason in DeclineReason::ALL {
            let json = serde_json::to_string(reason).unwrap();
            assert_eq!(json.trim_matches('"'), reason.as_str());
        }
    }
}
