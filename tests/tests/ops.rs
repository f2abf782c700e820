//! The operators' files in `ops/`: Prometheus's configuration and rules pass `promtool check`,
//! the rules pass their unit tests (`promtool test rules`), every alert is tested there and has
//! an entry in the runbook. promtool is Debian's `prometheus` package (`tests/install-deps.sh`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .join("ops")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(ops())
        .output()
        .expect("promtool runs (Debian's prometheus package: bash tests/install-deps.sh)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn alerts() -> Vec<String> {
    std::fs::read_to_string(ops().join("prometheus/facepay-rules.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: ").map(str::to_owned))
        .collect()
}

#[test]
fn the_prometheus_configuration_and_its_rules_check() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "prometheus/facepay-rules.yml"]);
}

#[test]
fn the_rules_pass_their_unit_tests() {
    promtool(&["test", "rules", "prometheus/facepay-rules.test.yml"]);
}

#[test]
fn every_alert_is_tested_and_has_a_runbook_entry() {
    let alerts = alerts();
    assert!(alerts.len() >= 10, "{alerts:?}");
    let tests = std::fs::read_to_string(ops().join("prometheus/facepay-rules.test.yml")).unwrap();
    let runbook = std::fs::read_to_string(ops().join("RUNBOOK.md")).unwrap();
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no unit test"
        );
        assert!(
            runbook.contains(&format!("\n## {alert}\n")),
            "{alert} has no runbook entry"
        );
    }
    for entry in runbook.lines().filter_map(|l| l.strip_prefix("## ")) {
        assert!(alerts.iter().any(|a| a == entry), "{entry} is no alert");
    }
}

#[test]
fn the_central_web_configuration_checks() {
    // Its certificate paths are the central machine's: here the test PKI's stand in.
    let pki = tests::test_pki();
    tests::ensure_identity(&pki::Identity::cloud()).unwrap();
    let text = std::fs::read_to_string(ops().join("prometheus/web-config.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/central.pem",
            &pki.join("cloud.pem").display().to_string(),
        )
        .replace(
            "/etc/prometheus/central.key",
            &pki.join("cloud.key").display().to_string(),
        )
        .replace(
            "/etc/prometheus/agents-ca.pem",
            &pki.join("ca.pem").display().to_string(),
        );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web-config.yml");
    std::fs::write(&file, text).unwrap();
    promtool(&["check", "web-config", file.to_str().unwrap()]);
}
