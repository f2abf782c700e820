//! The operators' view of a live fleet, set up as the README says: `facepay-sd` writes the targets
//! from the fleet's inventory; a store's Prometheus agent (Debian's package, in agent mode)
//! scrapes its hub and terminal and remote-writes to a central Prometheus, which scrapes the cloud
//! and node_exporter and loads the alerting and recording rules. Then every Grafana panel's query
//! (`ops/grafana/dashboards`) and every rule's expression (`ops/prometheus/facepay-rules.yml`) is
//! evaluated at the central Prometheus: each must parse and return data, and every metric an
//! alert reads must exist. Every `facepay_` metric the tiers serve is in the catalogue,
//! `ops/METRICS.md`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use protocol::{AccountKind, ChargeStatus};
use tests::{
    charge_until_reachable, free_port, open_account, present_code, start_cloud, store::StoreSite,
    wait_for_port, CloudApi, Mosquitto,
};

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .join("ops")
}

/// A process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(program: &str, args: &[String], log: &Path) -> Running {
    let log = std::fs::File::create(log).unwrap();
    Running(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} starts (Debian's prometheus packages: bash tests/install-deps.sh): {e}")
            }),
    )
}

/// Prometheus's HTTP API.
struct Prometheus {
    addr: SocketAddr,
    _process: Running,
}

impl Prometheus {
    /// The instant query's answer: `Err` with Prometheus's error when it does not parse.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let answer = ureq::get(&format!("http://{}/api/v1/query", self.addr))
            .query("query", expr)
            .call();
        let body: serde_json::Value = match answer {
            Ok(response) => response.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(_, response)) => {
                response.into_json().map_err(|e| e.to_string())?
            }
            Err(error) => return Err(error.to_string()),
        };
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        match &body["data"]["result"] {
            serde_json::Value::Array(series) => Ok(series.clone()),
            // A scalar or a string: one value.
            other => Ok(vec![other.clone()]),
        }
    }

    fn wait_for(&self, expr: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.query(expr).is_ok_and(|r| !r.is_empty()) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {expr} stays empty");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Every panel's queries of every dashboard: (dashboard, panel title, expr).
fn panel_queries() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let dir = ops().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "fleet, store, terminal, cloud: {files:?}");
    for file in files {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = dashboard["uid"].as_str().unwrap().to_owned();
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{name} has no panels");
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("").to_owned();
            let targets = panel["targets"].as_array();
            // Rows group panels; every other panel shows a query.
            if panel["type"] == "row" {
                continue;
            }
            let targets = targets.unwrap_or_else(|| panic!("{name}/{title} has no targets"));
            assert!(!targets.is_empty(), "{name}/{title} has no targets");
            for target in targets {
                let expr = target["expr"].as_str().unwrap().to_owned();
                out.push((name.clone(), title.clone(), expr));
            }
        }
    }
    out
}

/// Every rule of the rules file: (name, expr, is a recording rule).
fn rules() -> Vec<(String, String, bool)> {
    let text = std::fs::read_to_string(ops().join("prometheus/facepay-rules.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap().trim().to_owned();
            match (rule["record"].as_str(), rule["alert"].as_str()) {
                (Some(record), None) => out.push((record.to_owned(), expr, true)),
                (None, Some(alert)) => out.push((alert.to_owned(), expr, false)),
                _ => panic!("a rule records or alerts: {rule:?}"),
            }
        }
    }
    out
}

/// The metric names an expression reads (quoted strings and regular-expression names aside).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) => unquoted.push(c),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    let chars: Vec<char> = unquoted.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' || chars[i] == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let token: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let is_metric =
                (token.contains("facepay_") || token.starts_with("node_") || token == "up")
                    && next != Some(&'(');
            if is_metric {
                names.insert(token);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metric_names(
            "sum by (store_id) (rate(facepay_hub_payment_decisions_total{outcome=\"declined\"}[15m])) \
             / store:facepay_hub_payments:rate15m and {__name__=~\"facepay_.+_x\"} \
             and on (instance) up{job=\"x\"} == 1"
        ),
        BTreeSet::from([
            "facepay_hub_payment_decisions_total".to_owned(),
            "store:facepay_hub_payments:rate15m".to_owned(),
            "up".to_owned()
        ])
    );
}

/// The catalogue's metric names, with `<tier>` for any tier.
fn catalogue_names() -> Vec<String> {
    let text = std::fs::read_to_string(ops().join("METRICS.md")).unwrap();
    let mut names = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let first = line.split('|').nth(1).unwrap();
        for part in first.split('`').skip(1).step_by(2) {
            names.push(part.to_owned());
        }
    }
    names
}

fn documented(name: &str, catalogue: &[String]) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    [name, base].iter().any(|n| {
        let generic = ["edge", "hub", "cloud"]
            .iter()
            .fold(n.to_string(), |n, tier| {
                n.replacen(&format!("facepay_{tier}_"), "facepay_<tier>_", 1)
            });
        catalogue.iter().any(|c| c == n || *c == generic)
    })
}

#[test]
fn every_panel_and_rule_returns_data_from_a_live_fleet() {
    let dir = tempfile::tempdir().unwrap();
    // The fleet: a broker, a cloud, a store with one terminal, one payment made.
    let broker = Mosquitto::start(dir.path()).unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), broker.port).unwrap();
    let api = CloudApi::new(cloud.http_addr);
    open_account(&api, "store-1", AccountKind::Merchant, 0);
    let alice = open_account(&api, "alice", AccountKind::Customer, 10_000).unwrap();
    let site = StoreSite::start(dir.path(), "store-1", broker.port, 1, &[]).unwrap();
    api.set_hub_key("store-1", &site.hub_key()).unwrap();
    tests::wait_for_keys(site.hub_http(), 1, Duration::from_secs(20)).unwrap();
    let (edge, frames) = (&site.edges[0].0, site.edges[0].1.clone());
    let paid = charge_until_reachable(
        edge.http_addr,
        || {
            present_code(&frames, &alice).unwrap();
        },
        "ops-1",
        250,
        || false,
    );
    assert_eq!(paid.status, ChargeStatus::Approved, "{paid:?}");

    // node_exporter for the machine (its disks), scraped by the central Prometheus.
    let node_port = free_port();
    let _node = start(
        "prometheus-node-exporter",
        &[
            format!("--web.listen-address=127.0.0.1:{node_port}"),
            "--collector.disable-defaults".into(),
            "--collector.filesystem".into(),
        ],
        &dir.path().join("node-exporter.log"),
    );
    wait_for_port(node_port, Duration::from_secs(20)).unwrap();

    // The fleet's Prometheus as an operator sets it up: facepay-sd writes the targets from the
    // inventory; the store's agent scrapes its hub and terminal and writes to the central
    // Prometheus, which scrapes the cloud and evaluates the rules.
    let central_port = free_port();
    let sd = dir.path().join("sd");
    let inventory = dir.path().join("fleet.toml");
    std::fs::write(
        &inventory,
        format!(
            r#"[central]
remote_write_url = "http://127.0.0.1:{central_port}/api/v1/write"
[[cloud]]
instance = "cloud-1"
metrics = "{cloud}"
[[stores]]
store_id = "store-1"
hub_metrics = "{hub}"
terminals = [{{ terminal_id = "till-1", metrics = "{edge}" }}]
"#,
            cloud = cloud.metrics_addr,
            hub = site.hub.metrics_addr,
            edge = edge.metrics_addr,
        ),
    )
    .unwrap();
    let generated = Command::new(tests::binary_path("facepay-sd"))
        .arg("--inventory")
        .arg(&inventory)
        .arg("--out")
        .arg(&sd)
        .arg(format!(
            "--store-dir={}",
            sd.join("stores/store-1").display()
        ))
        .arg(format!("--central-dir={}", sd.join("central").display()))
        .arg(format!(
            "--rules={}",
            ops().join("prometheus/facepay-rules.yml").display()
        ))
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");
    // Scraped every second here (15 s as generated), so that rates have samples soon.
    let fast = |path: &Path, extra: &str| {
        let text = std::fs::read_to_string(path)
            .unwrap()
            .replace("scrape_interval: 15s", "scrape_interval: 1s")
            .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
        let fast = path.with_extension("fast.yml");
        std::fs::write(&fast, format!("{text}{extra}")).unwrap();
        fast
    };
    let central_config = fast(
        &sd.join("central/prometheus.yml"),
        &format!(
            "  - job_name: node\n    static_configs:\n      - targets: [\"127.0.0.1:{node_port}\"]\n"
        ),
    );
    let agent_config = fast(&sd.join("stores/store-1/prometheus-agent.yml"), "");
    for config in [&central_config, &agent_config] {
        let checked = Command::new("promtool")
            .args(["check", "config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(checked.status.success(), "{config:?}: {checked:?}");
    }
    let prometheus = Prometheus {
        addr: ([127, 0, 0, 1], central_port).into(),
        _process: start(
            "prometheus",
            &[
                format!("--config.file={}", central_config.display()),
                format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
                format!("--web.listen-address=127.0.0.1:{central_port}"),
                "--web.enable-remote-write-receiver".into(),
            ],
            &dir.path().join("prometheus.log"),
        ),
    };
    wait_for_port(central_port, Duration::from_secs(30)).unwrap();
    let agent_port = free_port();
    let _agent = start(
        "prometheus",
        &[
            "--enable-feature=agent".into(),
            format!("--config.file={}", agent_config.display()),
            format!(
                "--storage.agent.path={}",
                dir.path().join("agent").display()
            ),
            format!("--web.listen-address=127.0.0.1:{agent_port}"),
        ],
        &dir.path().join("agent.log"),
    );
    // Every target up (the store's through its agent), scraped a few times (rates need two
    // samples), the rules evaluated.
    prometheus.wait_for("count(up == 1) == 4", "every target scraped");
    prometheus.wait_for(
        "up{job=\"facepay-edge\",store_id=\"store-1\",terminal_id=\"till-1\"} == 1",
        "the terminal's metrics through the store's agent",
    );
    prometheus.wait_for(
        "min(count_over_time(up[1m])) >= 5",
        "five scrapes of each target",
    );
    prometheus.wait_for(
        "fleet:facepay_cloud_stores_online:count",
        "the rules evaluated",
    );

    let mut failures = Vec::new();
    // Every panel: parses and shows data.
    let panels = panel_queries();
    assert!(panels.len() >= 40, "{} panel queries", panels.len());
    for (dashboard, title, expr) in &panels {
        let expr = expr
            .replace("$store_id", "store-1")
            .replace("$terminal_id", "till-1")
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m");
        assert!(!expr.contains('$'), "{dashboard}/{title}: {expr}");
        match prometheus.query(&expr) {
            Err(error) => failures.push(format!("{dashboard}/{title}: {expr}: {error}")),
            Ok(series) if series.is_empty() => {
                failures.push(format!("{dashboard}/{title}: {expr}: no data"))
            }
            Ok(_) => {}
        }
    }
    // Every rule: parses; a recording rule records data; every metric an alert reads exists
    // (a healthy fleet fires no alert, so an alert's whole expression is rightly empty).
    let rules = rules();
    assert!(rules.len() >= 20, "{} rules", rules.len());
    for (name, expr, recording) in &rules {
        match prometheus.query(expr) {
            Err(error) => failures.push(format!("{name}: {expr}: {error}")),
            Ok(series) if *recording && series.is_empty() => {
                failures.push(format!("{name}: {expr}: no data"))
            }
            Ok(_) => {}
        }
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{name} reads no metric: {expr}");
        for metric in names {
            match prometheus.query(&metric) {
                Ok(series) if !series.is_empty() => {}
                other => failures.push(format!("{name}: {metric} has no data: {other:?}")),
            }
        }
    }
    // Every facepay metric the tiers serve is in the catalogue.
    let catalogue = catalogue_names();
    let served = prometheus.query("count by (__name__) ({__name__=~\"facepay_.+\"})");
    let served: Vec<String> = served
        .unwrap()
        .iter()
        .map(|s| s["metric"]["__name__"].as_str().unwrap().to_owned())
        .collect();
    assert!(served.len() >= 40, "{served:?}");
    for name in &served {
        if !documented(name, &catalogue) {
            failures.push(format!("{name} is served but not in ops/METRICS.md"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} panel queries and {} rules failed:\n{}",
        failures.len(),
        panels.len(),
        rules.len(),
        failures.join("\n")
    );
}
