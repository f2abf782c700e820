//! A NATS cluster as the fleet's broker (Debian's `nats-server`: MQTT 3.1.1 on JetStream, so
//! persistent sessions, retained messages and last wills live in the cluster and survive a
//! node): the configuration of one node, with the fleet's access rules.
//!
//! Clients are known by their certificate alone (`verify_and_map`: the subject
//! `CN=<common name>,OU=<role>,O=facepay` is the user), and each may publish and subscribe only
//! where the broker ACL of `protocol::topics` lets it (`hub_may_publish`, ...), on the NATS
//! subjects those topics are carried on. Routes between nodes are mutually authenticated with
//! the broker's certificate. NATS 2.9 reads no revocation list: a revoked hub certificate still
//! connects, but every message it seals is dropped by the cloud, which checks the list.

use std::path::PathBuf;

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct NatsNode {
    /// Its name in the cluster (`server_name`).
    pub name: String,
    /// Where it takes MQTT clients (TLS): `host:port`.
    pub mqtt_listen: String,
    /// Where it takes the other nodes' routes: `host:port`.
    pub cluster_listen: String,
    /// Where it takes NATS clients (none here: loopback, for the server's own tools).
    pub client_listen: String,
    /// Its JetStream directory (sessions, retained messages, queued QoS 1 messages).
    pub store_dir: PathBuf,
}

/// The broker's certificate files (of the fleet's PKI: `broker.pem`, `broker.key`, `ca.pem`).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// The CA every client and node certificate must chain to.
    pub ca: PathBuf,
    /// The broker's certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// Who may connect: every store's hub, and the cloud (`None`: the single-instance `cloud`
/// certificate) or its instances.
#[derive(Debug, Clone, Default)]
pub struct Clients {
    /// Store ids.
    pub stores: Vec<String>,
    /// Cloud instance ids (`fleet.instance`); empty: the one `cloud`.
    pub cloud_instances: Vec<String>,
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The subjects of `topics`, plus the inbox every MQTT subscriber's JetStream consumer
/// delivers to (`$MQTT.sub.>`, reachable by the gateway only: clients speak MQTT alone).
fn subscribe_subjects(topics: Vec<String>) -> Vec<String> {
    let mut subjects: Vec<String> = topics
        .iter()
        .map(|t| protocol::topics::nats_subject(t))
        .collect();
    subjects.push("$MQTT.sub.>".into());
    subjects
}

/// A user known by its certificate, on MQTT connections only: certificate-mapped users have no
/// password, so on the NATS client port a bare user name would log in as them.
fn user(
    common_name: &str,
    role: pki::Role,
    publish: Vec<String>,
    subscribe: Vec<String>,
) -> String {
    let publish: Vec<String> = publish
        .iter()
        .map(|t| protocol::topics::nats_subject(t))
        .collect();
    format!(
        "    {{ user: \"CN={common_name},OU={role},O=facepay\", allowed_connection_types: [\"MQTT\"], permissions: {{ publish: [{}], subscribe: [{}] }} }}\n",
        quoted(&publish),
        quoted(&subscribe_subjects(subscribe)),
        role = role.as_str(),
    )
}

/// The `authorization` block: one user per hub and per cloud instance.
pub fn authorization(clients: &Clients) -> Result<String, pki::PkiError> {
    let mut users = String::new();
    let clouds = match clients.cloud_instances.is_empty() {
        true => vec![pki::Identity::cloud()],
        false => clients
            .cloud_instances
            .iter()
            .map(|i| pki::Identity::cloud_instance(i))
            .collect::<Result<_, _>>()?,
    };
    for cloud in clouds {
        users.push_str(&user(
            &cloud.common_name,
            pki::Role::Cloud,
            protocol::topics::cloud_may_publish(),
            protocol::topics::cloud_may_read(),
        ));
    }
    for store in &clients.stores {
        let hub = pki::Identity::hub(store)?;
        users.push_str(&user(
            &hub.common_name,
            pki::Role::Hub,
            protocol::topics::hub_may_publish(store),
            protocol::topics::hub_may_read(store),
        ));
    }
    Ok(format!("authorization {{\n  users = [\n{users}  ]\n}}\n"))
}

/// The whole configuration of `node`, routed to every node of `cluster` (itself included is
/// fine: NATS skips its own route). Nodes take each other's routes only with `route_password`
/// besides a certificate of the fleet's CA: any fleet certificate (a stolen terminal's) would
/// otherwise join the cluster and read everything.
pub fn node_config(
    node: &NatsNode,
    cluster: &[NatsNode],
    tls: &BrokerTls,
    clients: &Clients,
    route_password: &str,
) -> Result<String, pki::PkiError> {
    if route_password.len() < 32
        || !route_password
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(pki::PkiError::Invalid(
            "the route password must be at least 32 letters, digits, '-' or '_'".into(),
        ));
    }
    let routes: Vec<String> = cluster
        .iter()
        .map(|n| format!("nats-route://route:{route_password}@{}", n.cluster_listen))
        .collect();
    let tls_block = |extra: &str| {
        format!(
            "tls {{\n    cert_file: {:?}\n    key_file: {:?}\n    ca_file: {:?}\n    {extra}\n    timeout: 5\n  }}",
            tls.cert.display().to_string(),
            tls.key.display().to_string(),
            tls.ca.display().to_string(),
        )
    };
    Ok(format!(
        "# facepay broker node {name}: generated (mqtt::nats); MQTT over TLS for hubs and cloud\n\
         # instances, known by their certificates; routes to the other nodes over mutual TLS.\n\
         server_name: {name:?}\n\
         listen: {client:?}\n\
         jetstream {{\n  store_dir: {store:?}\n}}\n\
         cluster {{\n  name: \"facepay\"\n  listen: {cluster_listen:?}\n  authorization {{\n    user: \"route\"\n    password: {route_password:?}\n  }}\n  routes: [{routes}]\n  {route_tls}\n}}\n\
         mqtt {{\n  listen: {mqtt:?}\n  {mqtt_tls}\n  # A QoS 1 message unacknowledged this long is delivered again.\n  ack_wait: \"30s\"\n}}\n\
         {authorization}",
        name = node.name,
        client = node.client_listen,
        store = node.store_dir.display().to_string(),
        cluster_listen = node.cluster_listen,
        routes = quoted(&routes),
        route_tls = tls_block("verify: true"),
        mqtt = node.mqtt_listen,
        mqtt_tls = tls_block("verify_and_map: true"),
        authorization = authorization(clients)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_may_use_only_its_own_subjects() {
        let clients = Clients {
            stores: vec!["store-1".into(), "s.2".into()],
            cloud_instances: vec!["1".into(), "2".into()],
        };
        let text = authorization(&clients).unwrap();
        let line = |cn: &str| {
            text.lines()
                .find(|l| l.contains(&format!("\"CN={cn},")))
                .unwrap_or_else(|| panic!("{cn} in {text}"))
                .to_owned()
        };
        let hub = line("store-1");
        assert!(hub.contains("OU=hub"));
        assert!(hub.contains("publish: [\"facepay.v1.cloud.requests.store-1\", \"facepay.v1.stores.store-1.presence\"]"), "{hub}");
        assert!(hub.contains("\"facepay.v1.stores.store-1.replies\""));
        assert!(
            !hub.contains("store-2") && !hub.contains("requests.*"),
            "{hub}"
        );
        // A `.` in an id is carried as `//`.
        assert!(line("s.2").contains("facepay.v1.cloud.requests.s//2"));
        for cloud in ["cloud:1", "cloud:2"] {
            let cloud = line(cloud);
            assert!(
                cloud.contains("subscribe: [\"facepay.v1.cloud.requests.*\""),
                "{cloud}"
            );
            assert!(cloud.contains("\"facepay.v1.stores.*.replies\""));
        }
        assert!(!text.contains("\"CN=cloud,"));
        assert_eq!(
            text.matches("allowed_connection_types: [\"MQTT\"]").count(),
            4,
            "every user on MQTT only"
        );
        let node = NatsNode {
            name: "n1".into(),
            mqtt_listen: "127.0.0.1:8883".into(),
            cluster_listen: "127.0.0.1:6222".into(),
            client_listen: "127.0.0.1:4222".into(),
            store_dir: "/var/lib/nats".into(),
        };
        let tls = BrokerTls {
            ca: "ca.pem".into(),
            cert: "broker.pem".into(),
            key: "broker.key".into(),
        };
        let password = "r".repeat(32);
        let config = node_config(
            &node,
            std::slice::from_ref(&node),
            &tls,
            &clients,
            &password,
        )
        .unwrap();
        assert!(config.contains(&format!("nats-route://route:{password}@127.0.0.1:6222")));
        assert!(config.contains("verify_and_map: true"));
        assert!(node_config(&node, &[], &tls, &clients, "short").is_err());
        assert!(Clients {
            stores: vec!["a/b".into()],
            ..Clients::default()
        }
        .stores
        .iter()
        .all(|s| pki::Identity::hub(s).is_err()));
    }
}
