//! The fleet's public-key infrastructure: a root CA, certificates for every tier, a revocation
//! list, and the rustls configurations every link is built from.
//!
//! A PKI directory has one layout that scripts and operators can rely on:
//!
//! ```text
//! ca.pem  ca.key                      the chain's root CA (keep ca.key offline in production)
//! crl.pem                             the revocation list, signed by the CA
//! index.json                          every certificate issued: name, serial, expiry, revocation
//! cloud.pem  cloud.key                the cloud (MQTT client, HTTPS server)
//! broker.pem broker.key               the MQTT broker
//! hub-<store>.pem  .key               a store's hub (MQTT client, Zenoh server)
//! edge-<store>-<terminal>.pem  .key   a checkout terminal (Zenoh client)
//! operator.pem  operator.key          an operator of the admin API (money-moving role)
//! operator-<name>.pem  .key           more operators, each with its role
//! ```
//!
//! Private keys are written owner-only (0600) and a tier refuses to start on a key file that
//! others can read ([`check_key_permissions`]). Identities live in the certificate subject: the
//! common name is what brokers and Zenoh access control match on, the organizational unit is the
//! role ([`Role`]).

pub mod config;
mod error;
mod issue;
mod load;
mod reply;
mod sealed;
mod token;

/// A PKI in a temporary directory with certificates issued, and identities loaded from it.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::{Identity, IssueOptions, Pki, TlsConfig, TlsIdentity};

    /// A fresh PKI with a certificate for each of `identities`.
    pub fn fleet(identities: &[Identity]) -> (tempfile::TempDir, Pki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path()).unwrap();
        for id in identities {
            pki.issue(id, &IssueOptions::default()).unwrap();
        }
        (dir, pki)
    }

    /// The identity `name` of the PKI in `dir`, loaded as its tier loads it.
    pub fn identity(dir: &std::path::Path, name: &str) -> TlsIdentity {
        let files = TlsConfig {
            pki_dir: dir.to_owned(),
            ..TlsConfig::default()
        }
        .files(name);
        TlsIdentity::load(&files).unwrap()
    }
}

pub use config::TlsConfig;
pub use error::PkiError;
pub use issue::{IndexEntry, IssueOptions, Pki};
pub use load::{
    check_key_permissions, peer_identity, revoked_serials, terminal_common_names, ClientAuth,
    LiveClientVerifier, PeerIdentity, RevocationList, TlsFiles, TlsIdentity,
};
pub use reply::{signed_message, HubVerifier, ReplySigner, REPLY_DOMAIN};
pub use sealed::{link_message, Sealed, SealedVerifier, Signer, LINK_DOMAIN};
pub use token::{bearer_matches, token_digest};

/// What a certificate's holder is, carried in the subject's organizational unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The cloud: the only identity that may publish replies, keys, templates, allowances and
    /// revocations on the broker.
    Cloud,
    /// The MQTT broker.
    Broker,
    /// A store's hub; its common name is its store id.
    Hub,
    /// A checkout terminal of one store.
    Edge,
    /// An operator of the admin API who may move money (opening balances, deposits, hub keys).
    Operator,
    /// An operator of the admin API who may only read.
    Viewer,
    /// The fleet's PostgreSQL server (the cloud's database).
    Database,
}

impl Role {
    /// The organizational unit written in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cloud => "cloud",
            Role::Broker => "broker",
            Role::Hub => "hub",
            Role::Edge => "edge",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Database => "database",
        }
    }

    /// The role an organizational unit names.
    pub fn parse(text: &str) -> Option<Role> {
        [
            Role::Cloud,
            Role::Broker,
            Role::Hub,
            Role::Edge,
            Role::Operator,
            Role::Viewer,
            Role::Database,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// Names a hub certificate may not take as a store id: they are other identities' common names.
pub const RESERVED_STORE_IDS: [&str; 4] = ["cloud", "broker", "operator", "database"];

/// One certificate's holder: its file name in the PKI directory, its common name and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// File stem in the PKI directory (`hub-store-1` for `hub-store-1.pem`/`.key`).
    pub name: String,
    /// Subject common name: what the broker's ACL (`use_identity_as_username`) and Zenoh's access
    /// control see.
    pub common_name: String,
    /// Subject organizational unit.
    pub role: Role,
}

impl Identity {
    /// The cloud.
    pub fn cloud() -> Self {
        Identity {
            name: "cloud".into(),
            common_name: "cloud".into(),
            role: Role::Cloud,
        }
    }

    /// One of several cloud instances sharing a database (a fleet): `cloud-<instance>.pem`,
    /// common name `cloud:<instance>`, so that each has its own broker session; hubs take any
    /// cloud instance's word as the cloud's.
    pub fn cloud_instance(instance: &str) -> Result<Self, PkiError> {
        check_id("cloud instance", instance)?;
        Ok(Identity {
            name: format!("cloud-{instance}"),
            common_name: format!("cloud:{instance}"),
            role: Role::Cloud,
        })
    }

    /// The fleet's PostgreSQL server: cloud instances reach their database over TLS and trust
    /// only this certificate's role there.
    pub fn database() -> Self {
        Identity {
            name: "database".into(),
            common_name: "database".into(),
            role: Role::Database,
        }
    }

    /// The MQTT broker.
    pub fn broker() -> Self {
        Identity {
            name: "broker".into(),
            common_name: "broker".into(),
            role: Role::Broker,
        }
    }

    /// A store's hub: common name = store id, so that the broker's ACL pattern `%u` is the store.
    pub fn hub(store_id: &str) -> Result<Self, PkiError> {
        check_id("store id", store_id)?;
        if RESERVED_STORE_IDS.contains(&store_id) {
            return Err(PkiError::Invalid(format!(
                "store id {store_id:?} is reserved for another identity"
            )));
        }
        Ok(Identity {
            name: format!("hub-{store_id}"),
            common_name: store_id.into(),
            role: Role::Hub,
        })
    }

    /// A checkout terminal. Its common name `edge:<store>:<terminal>:<generation>` cannot be
    /// mistaken for another store's terminal (ids never contain `:`), and each certificate
    /// issued for the terminal has its own (the generation is the start of its serial), so that
    /// a hub allowing the current certificate by name does not allow a replaced one.
    pub fn edge(store_id: &str, terminal_id: &str) -> Result<Self, PkiError> {
        check_id("store id", store_id)?;
        check_id("terminal id", terminal_id)?;
        Ok(Identity {
            name: format!("edge-{store_id}-{terminal_id}"),
            common_name: edge_common_name(store_id, terminal_id),
            role: Role::Edge,
        })
    }

    /// An operator of the admin API: `operator` for the default one (money-moving), or
    /// `operator-<name>` with the given role.
    pub fn operator(name: Option<&str>, role: Role) -> Result<Self, PkiError> {
        if !matches!(role, Role::Operator | Role::Viewer) {
            return Err(PkiError::Invalid(
                "an operator's role is operator or viewer".into(),
            ));
        }
        let name = match name {
            None => "operator".to_string(),
            Some(n) => {
                check_id("operator name", n)?;
                format!("operator-{n}")
            }
        };
        Ok(Identity {
            common_name: match name.strip_prefix("operator-") {
                Some(n) => format!("operator:{n}"),
                None => "operator".into(),
            },
            name,
            role,
        })
    }
}

/// The common name of a store's terminal, without its generation.
pub fn edge_common_name(store_id: &str, terminal_id: &str) -> String {
    format!("edge:{store_id}:{terminal_id}")
}

/// The terminal a terminal certificate's common name (`edge:<store>:<terminal>:<generation>`)
/// names, if it is one of `store_id`'s.
pub fn edge_terminal_id<'a>(common_name: &'a str, store_id: &str) -> Option<&'a str> {
    let rest = common_name
        .strip_prefix("edge:")?
        .strip_prefix(store_id)?
        .strip_prefix(':')?;
    let (terminal, generation) = rest.split_once(':')?;
    let ok = check_id("terminal id", terminal).is_ok()
        && !generation.is_empty()
        && !generation.contains(':');
    ok.then_some(terminal)
}

impl Identity {
    /// Whether a certificate's common name is this identity's (for a terminal: of any
    /// generation).
    pub fn owns_common_name(&self, common_name: &str) -> bool {
        names(self.role, &self.common_name, common_name)
    }
}

/// Whether a certificate's `common_name` is the one `role` and `base` name: a terminal's carries
/// its generation after its name (`<base>:<generation>`), every other one is `base` itself.
pub(crate) fn names(role: Role, base: &str, common_name: &str) -> bool {
    match role {
        // A cloud instance of a fleet (`cloud:<instance>`) is the cloud.
        Role::Cloud if base == "cloud" && common_name != base => common_name
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|instance| check_id("cloud instance", instance).is_ok()),
        Role::Edge => common_name
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|generation| !generation.is_empty() && !generation.contains(':')),
        _ => common_name == base,
    }
}

/// Ids are what `protocol::validate_id` accepts: 1-64 of letters, digits, `_`, `-`, `.`.
fn check_id(what: &str, id: &str) -> Result<(), PkiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "{what} {id:?} must be 1-64 letters, digits, '_', '-' or '.'"
        )))
    }
}

/// Registers `facepay_<tier>_tls_certificate_expiry_timestamp_seconds`: when the tier's own
/// certificate expires, as a Unix time, so that an alert can fire weeks before.
pub fn register_expiry_gauge(
    registry: &prometheus::Registry,
    tier: &str,
    identity: &TlsIdentity,
) -> prometheus::IntGauge {
    let gauge = prometheus::IntGauge::new(
        format!("facepay_{tier}_tls_certificate_expiry_timestamp_seconds"),
        "when this tier's TLS certificate expires (Unix time)",
    )
    .expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("registered once per registry");
    gauge.set(identity.not_after_unix);
    gauge
}

/// A Unix time as RFC 3339 text (the number itself if it is out of range).
pub fn rfc3339(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_seconds.to_string())
}

/// Installs ring as the process's rustls provider (once; later calls are harmless).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_and_their_names() {
        let hub = Identity::hub("store-1").unwrap();
        assert_eq!(
            (hub.name.as_str(), hub.common_name.as_str()),
            ("hub-store-1", "store-1")
        );
        let edge = Identity::edge("store-1", "till-2").unwrap();
        assert_eq!(edge.name, "edge-store-1-till-2");
        assert_eq!(edge.common_name, "edge:store-1:till-2");
        assert!(Identity::hub("cloud").is_err(), "reserved");
        assert!(Identity::hub("a/b").is_err());
        assert!(Identity::edge("s", "").is_err());
        assert_eq!(
            Identity::operator(None, Role::Operator).unwrap().name,
            "operator"
        );
        let viewer = Identity::operator(Some("audit"), Role::Viewer).unwrap();
        assert_eq!(viewer.name, "operator-audit");
        assert_eq!(viewer.common_name, "operator:audit");
        assert!(Identity::operator(None, Role::Hub).is_err());
        let instance = Identity::cloud_instance("2").unwrap();
        assert_eq!(
            (instance.name.as_str(), instance.common_name.as_str()),
            ("cloud-2", "cloud:2")
        );
        assert!(Identity::cloud_instance("a:b").is_err());
        // Any instance's word is the cloud's; nothing else named like one is.
        let cloud = Identity::cloud();
        assert!(cloud.owns_common_name("cloud:2"));
        assert!(!cloud.owns_common_name("cloud:2:3"));
        assert!(!cloud.owns_common_name("cloud:"));
        assert!(!cloud.owns_common_name("cloudy"));
        assert!(!instance.owns_common_name("cloud:2:3"));
        assert!(!Identity::hub("store-1")
            .unwrap()
            .owns_common_name("store-1:2"));
        for role in [Role::Cloud, Role::Hub, Role::Edge, Role::Viewer] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }

    #[test]
    fn a_terminal_certificates_name_gives_its_terminal_only_for_its_store() {
        assert_eq!(
            edge_terminal_id("edge:store-1:till-2:0a1b2c3d4e5f", "store-1"),
            Some("till-2")
        );
        for (name, store) in [
            ("edge:store-1:till-2:0a1b2c3d4e5f", "store-10"),
            ("edge:store-1:till-2:0a1b2c3d4e5f", "store"),
            ("edge:store-1:till-2", "store-1"),
            ("edge:store-1:till-2:", "store-1"),
            ("edge:store-1:till/2:0a1b", "store-1"),
            ("edge:store-1:till-2:0a:1b", "store-1"),
            ("store-1", "store-1"),
        ] {
            assert_eq!(edge_terminal_id(name, store), None, "{name} for {store}");
        }
    }
}
