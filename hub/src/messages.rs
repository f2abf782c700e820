//! Requests between the hub's actors that neither owner's module may own: the payment actor
//! redeems tokens the verify actor issued, and the verify actor checks codes with the keys the
//! payment actor holds. Each side holds the other only as a `Recipient` of these messages, so no
//! two hub modules import each other.

use actix::prelude::*;
use paycode::SignedCode;
use protocol::Decision;

/// Check a payment code (form, key, signature, window) without spending it.
#[derive(Message)]
#[rtype(result = "Result<SignedCode, Decision>")]
pub struct CheckCode(pub String);

/// Check a payment token presented with a charge: the account it charges, or why not.
#[derive(Message)]
#[rtype(result = "Result<Token, String>")]
pub struct RedeemToken {
    /// The token.
    pub token: String,
    /// The terminal presenting it.
    pub terminal_id: String,
}

/// A payment token the hub issued.
#[derive(Debug, Clone)]
pub struct Token {
    /// The account it charges.
    pub account_id: String,
    /// The terminal it is bound to.
    pub terminal_id: String,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: u64,
}
