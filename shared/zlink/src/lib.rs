//! The Zenoh link between edge terminals and their store hub: its configuration section and a
//! session that lives on its own multi-thread Tokio runtime.
//!
//! Every link is TLS with mutual authentication (certificates of the fleet's CA, see the `pki`
//! crate), and Zenoh's access control denies everything except the key expressions of the store
//! to the peers named in [`ZenohSecurity`]: a hub answers only its store's terminals, a terminal
//! hears only its store's hub.
//!
//! Zenoh refuses Tokio's current-thread scheduler, which is what actix runs actors on, so the
//! session is opened and driven on a dedicated runtime; actors reach it through [`ZenohLink::spawn`]
//! and await the join handle.

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub use zenoh;

/// Worker threads of the Zenoh runtime.
pub const ZENOH_WORKER_THREADS: usize = 2;

/// The `[zenoh]` section of the edge and hub configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZenohConfig {
    /// Endpoints to listen on, e.g. `tls/127.0.0.1:7447` (the hub listens).
    pub listen: Vec<String>,
    /// Endpoints to connect to (the edge connects to its hub).
    pub connect: Vec<String>,
    /// Multicast scouting finds peers on the LAN by itself; off by default so that a terminal only
    /// ever talks to the hub it is configured for.
    pub multicast_scouting: bool,
}

impl ZenohConfig {
    /// Checks endpoints; the error names the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        for (key, endpoints) in [("listen", &self.listen), ("connect", &self.connect)] {
            for endpoint in endpoints {
                let ok = endpoint
                    .split_once('/')
                    .map(|(proto, addr)| proto == "tls" && !addr.is_empty())
                    .unwrap_or(false);
                if !ok {
                    return Err((
                        format!("{prefix}.{key}"),
                        format!(
                            "{endpoint:?} is not a TLS endpoint such as \"tls/127.0.0.1:7447\""
                        ),
                    ));
                }
            }
        }
        if self.listen.is_empty() && self.connect.is_empty() {
            return Err((
                format!("{prefix}.listen"),
                "listen or connect needs at least one endpoint".into(),
            ));
        }
        Ok(())
    }

    fn to_zenoh(&self, security: &ZenohSecurity) -> anyhow::Result<zenoh::Config> {
        let mut config = zenoh::Config::default();
        let list = |v: &[String]| serde_json_list(v);
        let set = |config: &mut zenoh::Config, key: &str, value: String| {
            config
                .insert_json5(key, &value)
                .map_err(|e| anyhow::anyhow!("zenoh config {key}: {e}"))
        };
        set(&mut config, "mode", "\"peer\"".into())?;
        set(
            &mut config,
            "scouting/multicast/enabled",
            self.multicast_scouting.to_string(),
        )?;
        set(&mut config, "listen/endpoints", list(&self.listen))?;
        set(&mut config, "connect/endpoints", list(&self.connect))?;
        // Keep retrying the configured peers for ever: a hub restart must not strand its edges.
        set(&mut config, "connect/timeout_ms", "-1".into())?;
        set(&mut config, "connect/exit_on_failure", "false".into())?;
        set(&mut config, "listen/exit_on_failure", "true".into())?;
        // Peers are configured explicitly; none learns of others through gossip.
        set(&mut config, "scouting/gossip/enabled", "false".into())?;
        let path = |p: &std::path::Path| format!("{:?}", p.display().to_string());
        let files = &security.files;
        for (key, value) in [
            ("root_ca_certificate", path(&files.ca)),
            ("listen_certificate", path(&files.cert)),
            ("listen_private_key", path(&files.key)),
            ("connect_certificate", path(&files.cert)),
            ("connect_private_key", path(&files.key)),
            ("enable_mtls", "true".into()),
            ("verify_name_on_connect", "true".into()),
            ("close_link_on_expiration", "true".into()),
        ] {
            set(&mut config, &format!("transport/link/tls/{key}"), value)?;
        }
        set(&mut config, "access_control", security.access_control())?;
        Ok(config)
    }
}

/// Who may talk to this session, and about what.
#[derive(Debug, Clone)]
pub struct ZenohSecurity {
    /// This tier's certificate, key and the CA peers must chain to.
    pub files: pki::TlsFiles,
    /// The peers allowed, each on its own key expressions; every other peer is denied
    /// everything (its queries, replies and declarations are dropped), and an allowed peer
    /// everything outside its own key expressions.
    pub grants: Vec<ZenohGrant>,
}

/// Peers (by certificate common name), the key expressions they may use, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZenohGrant {
    /// Certificate common names.
    pub common_names: Vec<String>,
    /// Key expressions.
    pub key_exprs: Vec<String>,
    /// What this session does with those peers there.
    pub role: GrantRole,
}

/// What a session does with a grant's peers on its key expressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantRole {
    /// The peers ask (their queries come in) and this session answers (its queryables and replies
    /// go out): a hub with its terminals. Nothing else of theirs is taken.
    Answer,
    /// This session asks (its queries go out) and the peers answer (their queryables and replies
    /// come in): a terminal with its hub.
    Ask,
}

impl GrantRole {
    /// The message kinds allowed in, and out.
    fn messages(self) -> (&'static str, &'static str) {
        match self {
            GrantRole::Answer => (r#"["query"]"#, r#"["reply", "declare_queryable"]"#),
            GrantRole::Ask => (r#"["reply", "declare_queryable"]"#, r#"["query"]"#),
        }
    }
}

impl ZenohSecurity {
    /// Zenoh's `access_control` section: deny by default, allow each grant's peers on its key
    /// expressions the messages of its role, each way.
    fn access_control(&self) -> String {
        let list = serde_json_list;
        let grants: Vec<&ZenohGrant> = self
            .grants
            .iter()
            .filter(|g| !g.common_names.is_empty() && !g.key_exprs.is_empty())
            .collect();
        if grants.is_empty() {
            return r#"{"enabled": true, "default_permission": "deny"}"#.into();
        }
        let (mut rules, mut subjects, mut policies) = (Vec::new(), Vec::new(), Vec::new());
        for (i, grant) in grants.iter().enumerate() {
            let keys = list(&grant.key_exprs);
            let (ingress, egress) = grant.role.messages();
            for (flow, messages) in [("ingress", ingress), ("egress", egress)] {
                rules.push(format!(
                    r#"{{"id": "{flow}-{i}", "permission": "allow", "flows": ["{flow}"],
                        "messages": {messages}, "key_exprs": {keys}}}"#,
                ));
            }
            subjects.push(format!(
                r#"{{"id": "peers-{i}", "cert_common_names": {peers}}}"#,
                peers = list(&grant.common_names),
            ));
            policies.push(format!(
                r#"{{"rules": ["ingress-{i}", "egress-{i}"], "subjects": ["peers-{i}"]}}"#
            ));
        }
        format!(
            r#"{{"enabled": true, "default_permission": "deny", "rules": [{}], "subjects": [{}],
                "policies": [{}]}}"#,
            rules.join(","),
            subjects.join(","),
            policies.join(","),
        )
    }
}

fn serde_json_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(","))
}

/// An open Zenoh session and the runtime it lives on. Clones share both.
#[derive(Clone)]
pub struct ZenohLink {
    inner: Arc<Inner>,
}

struct Inner {
    session: Option<zenoh::Session>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ZenohLink {
    /// Builds the runtime and opens the session on it, with TLS and access control from
    /// `security`. Blocks the calling thread until open.
    pub fn open(config: &ZenohConfig, security: &ZenohSecurity) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(ZENOH_WORKER_THREADS)
            .thread_name("zenoh")
            .enable_all()
            .build()
            .context("starting the zenoh runtime")?;
        let zconfig = config.to_zenoh(security)?;
        // Opening from inside the runtime: zenoh must see a multi-thread scheduler.
        let session = std::thread::scope(|s| {
            s.spawn(|| runtime.block_on(async { zenoh::open(zconfig).await }))
                .join()
                .expect("zenoh open thread does not panic")
        })
        .map_err(|e| anyhow::anyhow!("opening zenoh session: {e}"))?;
        Ok(ZenohLink {
            inner: Arc::new(Inner {
                session: Some(session),
                runtime: Some(runtime),
            }),
        })
    }

    /// The session; use it only inside futures given to [`ZenohLink::spawn`].
    pub fn session(&self) -> &zenoh::Session {
        self.inner
            .session
            .as_ref()
            .expect("session lives until drop")
    }

    /// Runs a future on the Zenoh runtime; await the handle from any executor.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner
            .runtime
            .as_ref()
            .expect("runtime lives until drop")
            .spawn(future)
    }
}

impl Drop for Inner {
    /// Closing a session blocks, and the last handle may be dropped on an actix (current-thread)
    /// runtime where zenoh panics: close it and stop the runtime on a thread of their own.
    fn drop(&mut self) {
        let (Some(session), Some(runtime)) = (self.session.take(), self.runtime.take()) else {
            return;
        };
        let closer = std::thread::spawn(move || {
            runtime.block_on(async move { drop(session) });
            runtime.shutdown_background();
        });
        let _ = closer.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        let ok = ZenohConfig {
            listen: vec!["tls/127.0.0.1:7447".into()],
            ..Default::default()
        };
        assert!(ok.validate("zenoh").is_ok());
        let plaintext = ZenohConfig {
            listen: vec!["tcp/127.0.0.1:7447".into()],
            ..Default::default()
        };
        assert_eq!(plaintext.validate("zenoh").unwrap_err().0, "zenoh.listen");
        let bad = ZenohConfig {
            connect: vec!["127.0.0.1:7447".into()],
            ..Default::default()
        };
        assert_eq!(bad.validate("zenoh").unwrap_err().0, "zenoh.connect");
        assert_eq!(
            ZenohConfig::default().validate("zenoh").unwrap_err().0,
            "zenoh.listen"
        );
    }

    #[test]
    fn each_grant_becomes_its_own_rule_subject_and_policy_zenoh_accepts() {
        let files = pki::TlsFiles {
            ca: "ca.pem".into(),
            cert: "c.pem".into(),
            key: "c.key".into(),
            crl: "crl.pem".into(),
        };
        let grant = |cn: &str, key: &str| ZenohGrant {
            common_names: vec![cn.into()],
            key_exprs: vec![key.into()],
            role: GrantRole::Answer,
        };
        let security = ZenohSecurity {
            files,
            grants: vec![
                grant("edge:s:t1:aa", "facepay/v1/stores/s/hub/authorize/t1"),
                grant("edge:s:t2:bb", "facepay/v1/stores/s/hub/authorize/t2"),
                ZenohGrant {
                    common_names: vec![],
                    key_exprs: vec!["x".into()],
                    role: GrantRole::Ask,
                },
            ],
        };
        let text = security.access_control();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["rules"].as_array().unwrap().len(), 4, "{text}");
        assert_eq!(value["rules"][2]["flows"][0], "ingress", "{text}");
        assert_eq!(value["rules"][2]["messages"][0], "query", "{text}");
        assert_eq!(value["rules"][3]["messages"][0], "reply", "{text}");
        assert_eq!(
            value["subjects"][1]["cert_common_names"][0], "edge:s:t2:bb",
            "{text}"
        );
        assert_eq!(value["policies"][1]["rules"][1], "egress-1", "{text}");
        assert_eq!(
            value["rules"][3]["key_exprs"][0],
            "facepay/v1/stores/s/hub/authorize/t2"
        );
        let mut config = zenoh::Config::default();
        config.insert_json5("access_control", &text).unwrap();
        let none = ZenohSecurity {
            grants: vec![],
            ..security
        };
        assert!(none.access_control().contains("\"deny\""));
        config
            .insert_json5("access_control", &none.access_control())
            .unwrap();
    }
}
