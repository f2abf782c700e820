//! Zenoh key expressions between the edge terminals and their store hub. The only place they are
//! built.

/// The queryable a store's hub declares to authorize payments; edges send `get`s to it.
pub fn hub_authorize(store_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/authorize")
}

/// The queryable a store's hub declares to verify customers (face, code and face, second factor).
pub fn hub_verify(store_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/verify")
}

/// The queryable a store's hub declares to relay the fleet's revocation list to its terminals.
pub fn hub_revocations(store_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/revocations")
}

/// Every key expression of a store's hub: what its terminals and the hub may exchange.
pub fn hub_all(store_id: &str) -> String {
    format!("facepay/v1/stores/{store_id}/hub/**")
}

#[cfg(test)]
mod tests {
    #[test]
    fn authorize_key() {
        assert_eq!(
            super::hub_authorize("s1"),
            "facepay/v1/stores/s1/hub/authorize"
        );
    }
}
