//! The load benchmark stays runnable: a short run of `facepay-load`. A test binary of its own, so
//! that it does not run beside the fleet tests (each starts a fleet of processes on the same
//! cores; beside each other they starve the brokers' keep-alives).

/// One fleet at a time: the tests of this binary run on threads of their own, and two fleets
/// at once would starve each other.
static ONE_FLEET: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A short run of `facepay-load` with `more` arguments: its report, once its books check passed.
fn load(more: &[&str]) -> serde_json::Value {
    let _fleet = ONE_FLEET.lock().unwrap_or_else(|p| p.into_inner());
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
        .args(more)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("books: every payment heard approved moved once"));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The stages a report names, with their means.
fn stages(report: &serde_json::Value) -> Vec<(String, f64)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_owned(),
                s["mean_ms"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The load benchmark stays runnable: a short run of `facepay-load` (two stores, two instances,
/// Mosquitto) charges, reports where the time goes and every tier's CPU, and passes its own
/// books check (its exit code); so do a run with every store cut from the cloud and a paced run
/// (one after the other: two fleets at once would starve each other).
#[test]
fn the_load_benchmark_charges_reports_and_checks_its_books() {
    let report = load(&[]);
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
    let online = stages(&report);
    assert_eq!(online.len(), 4, "{report}");
    assert!(online.iter().all(|(_, ms)| *ms > 0.0), "{online:?}");
    assert!(online[3].0.starts_with("cloud"), "{online:?}");

    let offline = load(&["--offline"]);
    assert_eq!(offline["offline"], true);
    assert!(
        offline["approved_offline"].as_u64().unwrap() > 0,
        "{offline}"
    );
    assert_eq!(offline["approved_online"], 0, "{offline}");
    let alone = stages(&offline);
    assert_eq!(alone.len(), 3, "{offline}");
    assert!(alone[2].0.starts_with("hub alone"), "{alone:?}");
    assert!(alone.iter().all(|(_, ms)| *ms > 0.0), "{alone:?}");

    // Paced: each of the two registers starts a payment every second for 3 s, so at most
    // three each (unpaced, a code payment takes tens of milliseconds: about a hundred).
    let paced = load(&["--every-ms", "1000"]);
    assert_eq!(paced["every_ms"], 1000, "{paced}");
    let payments = paced["payments"].as_u64().unwrap();
    assert!((2..=6).contains(&payments), "{paced}");
    assert_eq!(paced["approved_online"], payments, "{paced}");
}

/// The face paths: customers enrolled over the cloud's enrollment API with photos of Labeled
/// Faces in the Wild (the shared copy beside the repository), a verification at the camera and
/// a charge with its token, every payment approved, the verification's time reported apart
/// (with the hub's 1:N search for a face alone), and the books checked.
#[test]
fn the_load_benchmark_pays_by_face_and_by_code_and_face() {
    for pay in ["face", "code-and-face"] {
        // Paced under the terminal's 64 open tokens per token life (5 s in the bench): one
        // terminal paying by face back to back can pass 12.8 per second on a fast machine and
        // be refused `hub_busy`.
        let report = load(&["--pay", pay, "--every-ms", "100"]);
        assert_eq!(report["pay"], pay.replace('-', "_"), "{report}");
        let payments = report["payments"].as_u64().unwrap();
        assert!(payments > 0, "{report}");
        assert_eq!(
            report["approved_online"].as_u64(),
            Some(payments),
            "{report}"
        );
        let verification = report["verification_p50_ms"].as_f64().unwrap();
        assert!(verification > 0.0, "{report}");
        assert!(
            report["p50_ms"].as_f64().unwrap() > verification,
            "the register waits for the verification, then the charge: {report}"
        );
        let stages = stages(&report);
        // A face alone is searched 1:N at the hub; a code names the account (1:1).
        let (verification_stages, searched) = if pay == "face" { (2, true) } else { (1, false) };
        assert_eq!(stages.len(), 4 + verification_stages, "{report}");
        assert_eq!(stages[1].0.contains("1:N search"), searched, "{stages:?}");
        assert!(stages.iter().all(|(_, ms)| *ms > 0.0), "{stages:?}");
    }
}
