//! Zenoh key expressions between the edge terminals and their store hub. The only place they are
//! built.
//!
//! Each terminal asks on key expressions that end with its own id, and the hub's access control
//! lets a terminal's certificate use only its own (its common name names the terminal, see
//! `pki`): the terminal id the hub reads from the key a query arrived on is the certificate's,
//! not a field the terminal could choose.

/// The queryable a store's hub declares for one terminal to authorize payments; that terminal
/// sends `get`s to it.
pub fn hub_authorize(store_id: &str, terminal_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/authorize/{terminal_id}")
}

/// The queryable a store's hub declares for one terminal to verify customers (face, code and
/// face, second factor).
pub fn hub_verify(store_id: &str, terminal_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/verify/{terminal_id}")
}

/// The queryable a store's hub declares for one terminal to refund payments.
pub fn hub_refund(store_id: &str, terminal_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/refund/{terminal_id}")
}

/// The queryable a store's hub declares to relay the fleet's revocation list to its terminals.
pub fn hub_revocations(store_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/revocations")
}

/// Every key expression of a store's hub: what the hub may say to its terminals.
pub fn hub_all(store_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/**")
}

/// The key expressions one terminal may use: its own authorize, verify and refund queryables and the
/// store's revocation list.
pub fn terminal_keys(store_id: &str, terminal_id: &str) -> Vec<String> {
    vec![
        hub_authorize(store_id, terminal_id),
        hub_verify(store_id, terminal_id),
        hub_refund(store_id, terminal_id),
        hub_revocations(store_id),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_terminals_keys_end_with_its_id() {
        assert_eq!(
            super::hub_authorize("s1", "till-1"),
            "facepay/v1/stores/s1/hub/authorize/till-1"
        );
        assert_eq!(
            super::terminal_keys("s1", "till-1"),
            [
                "facepay/v1/stores/s1/hub/authorize/till-1",
                "facepay/v1/stores/s1/hub/verify/till-1",
                "facepay/v1/stores/s1/hub/refund/till-1",
                "facepay/v1/stores/s1/hub/revocations",
            ]
        );
    }
}
