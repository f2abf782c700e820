//! Prometheus service discovery for a fleet (`facepay-sd`): from the fleet's inventory (a TOML
//! file listing the cloud instances and the stores with their hubs and terminals) it writes
//!
//! - for the central Prometheus: `central/cloud.json` (the cloud instances, a `file_sd` target
//!   file) and `central/prometheus.yml` (scrapes them, loads the rules, and takes the stores'
//!   metrics by remote write);
//! - for each store: `stores/<store_id>/targets-hub.json`, `targets-edge.json` (the hub and the
//!   terminals, labelled `store_id`, `terminal_id`) and `prometheus-agent.yml`, a Prometheus in
//!   agent mode at the store that scrapes them and remote-writes to the central Prometheus: the
//!   store's metrics leave the store, nothing outside reaches into it.
//!
//! Every id and address is checked; a bad inventory writes nothing.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The fleet's inventory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Where the stores' agents send their metrics.
    pub central: Central,
    /// The cloud instances, scraped by the central Prometheus.
    #[serde(default)]
    pub cloud: Vec<CloudInstance>,
    /// The stores.
    #[serde(default)]
    pub stores: Vec<Store>,
}

/// The central Prometheus, as the stores' agents reach it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Central {
    /// Its remote-write endpoint, `https://host:port/api/v1/write` (`http://` only on a
    /// private network).
    pub remote_write_url: String,
    /// The agent's client certificate for it, as paths on the store's machine.
    pub tls: Option<AgentTls>,
}

/// Paths on the store's machine of what its agent presents to the central Prometheus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTls {
    /// The CA that signed the central Prometheus's certificate.
    pub ca_file: String,
    /// The agent's certificate.
    pub cert_file: String,
    /// Its key.
    pub key_file: String,
}

/// A cloud instance.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInstance {
    /// Its name (the `instance` label).
    pub instance: String,
    /// Its metrics listener, `host:port`.
    pub metrics: String,
}

/// A store: its hub and terminals, as its agent reaches them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// The store id.
    pub store_id: String,
    /// The hub's metrics listener, `host:port`.
    pub hub_metrics: String,
    /// The terminals.
    #[serde(default)]
    pub terminals: Vec<Terminal>,
}

/// A checkout terminal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminal {
    /// Its id within the store.
    pub terminal_id: String,
    /// Its metrics listener, `host:port`.
    pub metrics: String,
}

/// Where the generated files are read from on the machines that use them.
#[derive(Debug, Clone)]
pub struct Places {
    /// The directory of a store's target files on its machine.
    pub store_dir: String,
    /// The directory of the central target file on the central machine.
    pub central_dir: String,
    /// The rules file on the central machine.
    pub rules: String,
}

impl Default for Places {
    fn default() -> Self {
        Places {
            store_dir: "/etc/prometheus/facepay".into(),
            central_dir: "/etc/prometheus/facepay".into(),
            rules: "/etc/prometheus/facepay-rules.yml".into(),
        }
    }
}

/// Reads an inventory file.
pub fn read(path: &Path) -> Result<Inventory, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn check_address(what: &str, address: &str) -> Result<(), String> {
    let ok = address.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c))
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: {address:?} is not host:port"))
    }
}

/// An id that names a directory of the output: no "." or ".." (validate_id allows dots).
fn check_id(what: &'static str, id: &str) -> Result<(), String> {
    protocol::validate_id(what, id).map_err(|e| e.to_string())?;
    if id.starts_with('.') {
        return Err(format!("{what}: {id:?} starts with a dot"));
    }
    Ok(())
}

fn check_path(what: &str, path: &str) -> Result<(), String> {
    if path.starts_with('/') && !path.contains(['"', '\\']) && !path.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!("{what}: {path:?} is not an absolute path"))
    }
}

impl Inventory {
    /// Every id unique and well formed, every address `host:port`, every path absolute.
    pub fn check(&self) -> Result<(), String> {
        let url = &self.central.remote_write_url;
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| format!("central.remote_write_url: {url:?} is not http(s)://"))?;
        let host_port = rest.split('/').next().unwrap_or("");
        check_address("central.remote_write_url", host_port)?;
        if url.contains(['"', '\\', ' ']) || url.chars().any(char::is_control) {
            return Err(format!("central.remote_write_url: {url:?}"));
        }
        if let Some(tls) = &self.central.tls {
            check_path("central.tls.ca_file", &tls.ca_file)?;
            check_path("central.tls.cert_file", &tls.cert_file)?;
            check_path("central.tls.key_file", &tls.key_file)?;
        }
        let mut instances = HashSet::new();
        for cloud in &self.cloud {
            check_id("cloud.instance", &cloud.instance)?;
            check_address(&format!("cloud {}", cloud.instance), &cloud.metrics)?;
            if !instances.insert(&cloud.instance) {
                return Err(format!("cloud instance {} is listed twice", cloud.instance));
            }
        }
        let mut stores = HashSet::new();
        for store in &self.stores {
            check_id("stores.store_id", &store.store_id)?;
            if !stores.insert(&store.store_id) {
                return Err(format!("store {} is listed twice", store.store_id));
            }
            check_address(
                &format!("store {} hub_metrics", store.store_id),
                &store.hub_metrics,
            )?;
            let mut terminals = HashSet::new();
            for terminal in &store.terminals {
                check_id("terminal_id", &terminal.terminal_id)?;
                if !terminals.insert(&terminal.terminal_id) {
                    return Err(format!(
                        "terminal {} of store {} is listed twice",
                        terminal.terminal_id, store.store_id
                    ));
                }
                check_address(
                    &format!(
                        "terminal {} of store {}",
                        terminal.terminal_id, store.store_id
                    ),
                    &terminal.metrics,
                )?;
            }
        }
        Ok(())
    }

    /// The files to write, relative to the output directory, with their contents.
    pub fn files(&self, places: &Places) -> Result<Vec<(PathBuf, String)>, String> {
        self.check()?;
        for (what, path) in [
            ("--store-dir", &places.store_dir),
            ("--central-dir", &places.central_dir),
            ("--rules", &places.rules),
        ] {
            check_path(what, path)?;
        }
        let mut files = Vec::new();
        let cloud: Vec<serde_json::Value> = self
            .cloud
            .iter()
            .map(|c| {
                serde_json::json!({ "targets": [c.metrics], "labels": { "instance": c.instance } })
            })
            .collect();
        files.push((PathBuf::from("central/cloud.json"), json(&cloud)));
        files.push((
            PathBuf::from("central/prometheus.yml"),
            format!(
                "# The central Prometheus of a facepay fleet, generated by facepay-sd. Run it with\n\
                 # --web.enable-remote-write-receiver (and --web.config.file for TLS with client\n\
                 # certificates): the stores' agents write their hubs' and terminals' metrics here.\n\
                 global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n\
                 rule_files: [\"{rules}\"]\n\
                 scrape_configs:\n  - job_name: facepay-cloud\n    file_sd_configs:\n      \
                 - files: [\"{dir}/cloud.json\"]\n",
                rules = places.rules,
                dir = places.central_dir,
            ),
        ));
        for store in &self.stores {
            let dir = PathBuf::from("stores").join(&store.store_id);
            let hub = vec![serde_json::json!({
                "targets": [store.hub_metrics],
                "labels": { "store_id": store.store_id },
            })];
            let edges: Vec<serde_json::Value> = store
                .terminals
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "targets": [t.metrics],
                        "labels": { "store_id": store.store_id, "terminal_id": t.terminal_id },
                    })
                })
                .collect();
            files.push((dir.join("targets-hub.json"), json(&hub)));
            files.push((dir.join("targets-edge.json"), json(&edges)));
            let tls = match &self.central.tls {
                None => String::new(),
                Some(tls) => format!(
                    "    tls_config:\n      ca_file: \"{}\"\n      cert_file: \"{}\"\n      \
                     key_file: \"{}\"\n",
                    tls.ca_file, tls.cert_file, tls.key_file
                ),
            };
            files.push((
                dir.join("prometheus-agent.yml"),
                format!(
                    "# Store {store}'s Prometheus agent, generated by facepay-sd. Run it with\n\
                     # --enable-feature=agent: it scrapes the store's hub and terminals and writes\n\
                     # their metrics to the central Prometheus; nothing outside reaches into the store.\n\
                     global:\n  scrape_interval: 15s\n  external_labels:\n    store_id: \"{store}\"\n\
                     scrape_configs:\n  - job_name: facepay-hub\n    file_sd_configs:\n      \
                     - files: [\"{dir}/targets-hub.json\"]\n  - job_name: facepay-edge\n    \
                     file_sd_configs:\n      - files: [\"{dir}/targets-edge.json\"]\n\
                     remote_write:\n  - url: \"{url}\"\n{tls}",
                    store = store.store_id,
                    dir = places.store_dir,
                    url = self.central.remote_write_url,
                ),
            ));
        }
        Ok(files)
    }
}

fn json(value: &impl serde::Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("serialises");
    text.push('\n');
    text
}

/// Writes the files under `out`, each through a temporary file renamed into place (Prometheus
/// rereads target files as they change: it never sees half of one).
pub fn write(out: &Path, files: &[(PathBuf, String)]) -> Result<(), String> {
    for (path, text) in files {
        let path = out.join(path);
        let dir = path.parent().expect("files are in directories");
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVENTORY: &str = r#"
        [central]
        remote_write_url = "https://metrics.example.internal:9090/api/v1/write"
        tls = { ca_file = "/etc/facepay/pki/ca.pem", cert_file = "/etc/prometheus/agent.pem", key_file = "/etc/prometheus/agent.key" }

        [[cloud]]
        instance = "cloud-1"
        metrics = "10.0.0.11:9301"

        [[stores]]
        store_id = "store-1"
        hub_metrics = "10.1.0.2:9200"
        terminals = [
            { terminal_id = "till-1", metrics = "10.1.0.11:9100" },
            { terminal_id = "till-2", metrics = "10.1.0.12:9100" },
        ]
    "#;

    #[test]
    fn an_inventory_makes_every_target_file_and_agent() {
        let inventory: Inventory = toml::from_str(INVENTORY).unwrap();
        let files = inventory.files(&Places::default()).unwrap();
        let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "central/cloud.json",
                "central/prometheus.yml",
                "stores/store-1/targets-hub.json",
                "stores/store-1/targets-edge.json",
                "stores/store-1/prometheus-agent.yml"
            ]
        );
        let edges: serde_json::Value = serde_json::from_str(&files[3].1).unwrap();
        assert_eq!(edges[1]["targets"][0], "10.1.0.12:9100");
        assert_eq!(edges[1]["labels"]["terminal_id"], "till-2");
        assert_eq!(edges[1]["labels"]["store_id"], "store-1");
        let agent = &files[4].1;
        assert!(agent.contains("store_id: \"store-1\""), "{agent}");
        assert!(
            agent.contains("url: \"https://metrics.example.internal:9090/api/v1/write\""),
            "{agent}"
        );
        assert!(
            agent.contains("cert_file: \"/etc/prometheus/agent.pem\""),
            "{agent}"
        );
        assert!(
            agent.contains("/etc/prometheus/facepay/targets-edge.json"),
            "{agent}"
        );
    }

    #[test]
    fn a_bad_inventory_is_refused_by_what_is_wrong() {
        let bad = |from: &str, to: &str| {
            let inventory: Inventory = toml::from_str(&INVENTORY.replace(from, to)).unwrap();
            inventory.files(&Places::default()).unwrap_err()
        };
        assert!(bad("10.1.0.12:9100", "10.1.0.12").contains("till-2"));
        assert!(bad("till-2", "till-1").contains("listed twice"));
        assert!(bad("\"store-1\"", "\"store 1\"").contains("store_id"));
        assert!(bad("\"store-1\"", "\"..\"").contains("dot"));
        assert!(
            bad("/etc/prometheus/agent.key", "/etc/prometheus/agent\\tkey").contains("key_file")
        );
        assert!(bad("https://metrics", "ftp://metrics").contains("remote_write_url"));
        assert!(bad("\"/etc/prometheus/agent.key\"", "\"agent.key\"").contains("key_file"));
        assert!(bad("10.0.0.11:9301", "10.0.0.11:0").contains("cloud-1"));
        // A key no inventory has.
        assert!(toml::from_str::<Inventory>(&format!("{INVENTORY}\nextra = 1")).is_err());
    }

    #[test]
    fn files_are_written_whole() {
        let inventory: Inventory = toml::from_str(INVENTORY).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &inventory.files(&Places::default()).unwrap()).unwrap();
        let hub: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("stores/store-1/targets-hub.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(hub[0]["targets"][0], "10.1.0.2:9200");
        assert!(!dir.path().join("stores/store-1/targets-hub.tmp").exists());
    }
}
