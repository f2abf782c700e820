//! The load benchmark stays runnable: a short run of `facepay-load`. A test binary of its own, so
//! that it does not run beside the fleet tests (each starts a fleet of processes on the same
//! cores; beside each other they starve the brokers' keep-alives).

/// The load benchmark stays runnable: a short run of `facepay-load` (two stores, two instances,
/// Mosquitto) charges, reports every tier's CPU, and passes its own books check (its exit code).
#[test]
fn the_load_benchmark_charges_reports_and_checks_its_books() {
    let output = std::process::Command::new(tests::binary_path("facepay-load"))
        .args([
            "--stores",
            "2",
            "--terminals",
            "1",
            "--instances",
            "2",
            "--broker",
            "mosquitto",
            "--seconds",
            "3",
            "--json",
        ])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("books: every payment heard approved moved once"));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["payments"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        report["payments"].as_u64(),
        ["approved_online", "approved_offline", "declined", "unknown"]
            .iter()
            .map(|k| report[k].as_u64())
            .sum::<Option<u64>>(),
        "every payment counted once: {report}"
    );
    assert!(report["p99_ms"].as_f64().unwrap() >= report["p50_ms"].as_f64().unwrap());
    let tiers: Vec<&str> = report["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["tier"].as_str().unwrap())
        .collect();
    for tier in ["broker", "cloud", "edge", "hub", "postgres"] {
        assert!(tiers.contains(&tier), "{tier} in {report}");
    }
    let cloud = report["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == "cloud")
        .unwrap();
    assert!(cloud["cpu_seconds"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(cloud["processes"], 2);
}
