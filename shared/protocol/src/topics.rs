//! MQTT topics between the store hubs and the cloud. The only place topic strings are built.
//!
//! Identifiers are checked by [`crate::validate_id`] before they reach here, so they never contain
//! `/`, `+` or `#`.

const ROOT: &str = "facepay/v1";

/// Where a hub publishes its requests to the cloud.
pub fn cloud_requests(store_id: &str) -> String {
    format!("{ROOT}/cloud/requests/{store_id}")
}

/// What the cloud subscribes to: the requests of every store.
pub fn cloud_requests_filter() -> String {
    format!("{ROOT}/cloud/requests/+")
}

/// The store id at the end of a request topic, if the topic is one.
pub fn store_of_request_topic(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(ROOT)?
        .strip_prefix("/cloud/requests/")
        .filter(|s| !s.contains('/'))
}

/// Where a store's hub says whether it is connected: retained, "online" when it connects and,
/// as its last will, "offline" from the broker when it goes without a goodbye.
pub fn store_presence(store_id: &str) -> String {
    format!("{ROOT}/stores/{store_id}/presence")
}

/// Where a stopping cloud instance tells the others which stores' leases it released, so that
/// they take those stores at once instead of when their view of the lease runs out.
pub fn lease_releases() -> String {
    format!("{ROOT}/cloud/leases")
}

/// What the cloud subscribes to: every store's presence.
pub fn presence_filter() -> String {
    format!("{ROOT}/stores/+/presence")
}

/// The store id of a presence topic, if the topic is one.
pub fn store_of_presence_topic(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(ROOT)?
        .strip_prefix("/stores/")?
        .strip_suffix("/presence")
        .filter(|s| !s.is_empty() && !s.contains('/'))
}

/// The topics (and filters) a store's hub may publish on: the broker's ACL, in one place.
pub fn hub_may_publish(store_id: &str) -> Vec<String> {
    vec![cloud_requests(store_id), store_presence(store_id)]
}

/// The topics (and filters) a store's hub may subscribe to.
pub fn hub_may_read(store_id: &str) -> Vec<String> {
    vec![
        store_replies(store_id),
        store_templates(store_id),
        key_updates(),
        template_revocations(),
        allowance_updates(),
        lockouts(),
        revocation_list(),
    ]
}

/// The topics (and filters) the cloud may publish on.
pub fn cloud_may_publish() -> Vec<String> {
    vec![
        format!("{ROOT}/stores/+/replies"),
        format!("{ROOT}/stores/+/templates"),
        key_updates(),
        template_revocations(),
        allowance_updates(),
        lockouts(),
        revocation_list(),
        lease_releases(),
    ]
}

/// The topics (and filters) the cloud may subscribe to.
pub fn cloud_may_read() -> Vec<String> {
    vec![cloud_requests_filter(), presence_filter(), lease_releases()]
}

/// The NATS subject an MQTT topic or filter is carried on by a NATS broker's MQTT gateway:
/// levels joined by `.` instead of `/`, a `.` within a level written `//`, `+` as `*`, `#` as
/// `>`.
pub fn nats_subject(topic: &str) -> String {
    topic
        .split('/')
        .map(|level| match level {
            "+" => "*".to_string(),
            "#" => ">".to_string(),
            level => level.replace('.', "//"),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Where the cloud answers one store's hub.
pub fn store_replies(store_id: &str) -> String {
    format!("{ROOT}/stores/{store_id}/replies")
}

/// Broadcast of account key changes to every hub.
pub fn key_updates() -> String {
    format!("{ROOT}/keys")
}

/// Template changes for one store's hot set (customers enrolled there).
pub fn store_templates(store_id: &str) -> String {
    format!("{ROOT}/stores/{store_id}/templates")
}

/// Template revocations (erasures), for every hub.
pub fn template_revocations() -> String {
    format!("{ROOT}/templates/revocations")
}

/// Broadcast of offline allowance revocations (accounts in debt or closed) to every hub.
pub fn allowance_updates() -> String {
    format!("{ROOT}/allowances")
}

/// Broadcast of second-factor lockout changes to every hub.
pub fn lockouts() -> String {
    format!("{ROOT}/lockouts")
}

/// The fleet's certificate revocation list, published retained by the cloud for every hub.
pub fn revocation_list() -> String {
    format!("{ROOT}/revocations")
}

/// Not a topic anything is published on: what a terminal's attestation of a payment is sealed
/// for (see [`crate::Attested`]), so that it cannot pass for any message on the link.
pub fn attestation(payment_id: &str) -> String {
    format!("{ROOT}/attest/{payment_id}")
}

/// The domain a terminal seals its attestation of refund `refund_id` of `payment_id` for (a
/// payment id always holds a `:`, so no payment's attestation is a refund's).
pub fn refund_attestation(payment_id: &str, refund_id: &str) -> String {
    format!("{ROOT}/attest/refund/{payment_id}/{refund_id}")
}

#[cfg(test)]
mod tests {

    #[test]
    fn nats_subjects_follow_the_gateways_mapping() {
        assert_eq!(
            nats_subject("facepay/v1/cloud/requests/+"),
            "facepay.v1.cloud.requests.*"
        );
        assert_eq!(
            nats_subject("facepay/v1/stores/store.1/replies"),
            "facepay.v1.stores.store//1.replies"
        );
        assert_eq!(nats_subject("facepay/v1/#"), "facepay.v1.>");
    }

    use super::*;

    #[test]
    fn request_topic_round_trips() {
        let t = cloud_requests("store-7");
        assert_eq!(t, "facepay/v1/cloud/requests/store-7");
        assert_eq!(store_of_request_topic(&t), Some("store-7"));
        assert_eq!(store_of_request_topic("facepay/v1/keys"), None);
        assert_eq!(
            store_of_request_topic("facepay/v1/cloud/requests/a/b"),
            None
        );
        assert!(cloud_requests_filter().ends_with("/+"));
        assert_eq!(store_replies("s"), "facepay/v1/stores/s/replies");
    }
}
