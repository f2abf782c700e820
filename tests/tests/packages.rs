//! The Debian packages: `cargo deb` packs each tier (from the binaries this test run built, so as
//! not to build them again in release); each package holds what the README says, its
//! maintainer script makes the tier's user, its packaged binary runs and accepts its packaged
//! configuration, its face models are the pinned ones, and its systemd unit passes
//! `systemd-analyze verify`. cargo-deb is installed by `tests/install-deps.sh`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(output: Output) -> String {
    String::from_utf8(output.stdout).unwrap()
}

/// Packs `tier` from the dev binaries into `out`; the path of the package.
fn package(tier: &str, out: &Path) -> PathBuf {
    // The binaries it packs, built by this run (`cargo build --workspace --all-targets`).
    let mut bins = vec![format!("facepay-{tier}")];
    if tier == "cloud" {
        bins.push("facepay-sd".into());
    }
    for bin in &bins {
        tests::binary_path(bin);
    }
    run(Command::new("cargo")
        .current_dir(workspace())
        .args([
            "deb",
            "--no-build",
            "--fast",
            "--profile",
            "dev",
            "-p",
            tier,
            "-o",
        ])
        .arg(out));
    let found: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("facepay-{tier}_"))
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

#[test]
fn every_tier_packs_with_its_user_config_and_hardened_unit() {
    let dir = tempfile::tempdir().unwrap();
    for tier in ["edge", "hub", "cloud"] {
        let deb = package(tier, dir.path());
        let name = format!("facepay-{tier}");

        // Control: the package, what it needs, its conffile.
        let fields = text(run(Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .args(["Package", "Version", "Depends", "Section"])));
        assert!(fields.contains(&format!("Package: {name}\n")), "{fields}");
        assert!(
            fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
            "{fields}"
        );
        assert!(fields.contains("adduser"), "{fields}");
        assert!(fields.contains("libc6"), "shared libraries found: {fields}");
        let control = dir.path().join(format!("{tier}-control"));
        run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
        assert_eq!(conffiles.trim(), format!("/etc/facepay/{tier}.toml"));
        let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
        assert!(
            postinst.contains(&format!(
                "adduser --system --group --home /var/lib/facepay/{tier}"
            )),
            "{postinst}"
        );
        assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
        run(Command::new("sh").arg("-n").arg(control.join("postinst")));

        // Contents.
        let root = dir.path().join(format!("{tier}-root"));
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        let binary = root.join(format!("usr/bin/{name}"));
        let unit = root.join(format!("usr/lib/systemd/system/{name}.service"));
        let config = root.join(format!("etc/facepay/{tier}.toml"));
        for path in [
            &binary,
            &unit,
            &config,
            &root.join(format!("usr/share/doc/{name}/examples/{tier}.toml")),
            &root.join(format!("usr/share/doc/{name}/README.md")),
            &root.join(format!("usr/share/doc/{name}/RUNBOOK.md")),
            &root.join(format!("usr/share/doc/{name}/METRICS.md")),
        ] {
            assert!(path.is_file(), "{} is not in {name}", path.display());
        }

        // The packaged binary runs and takes the packaged configuration as it is.
        let version = text(run(Command::new(&binary).arg("--version")));
        assert!(
            version.contains(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
        run(Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .arg("--check-config"));

        // The face models where the packaged configuration says, the pinned ones.
        if tier != "hub" {
            let models = root.join(format!("usr/share/{name}/models"));
            let settings = std::fs::read_to_string(&config).unwrap();
            assert!(
                settings.contains(&format!("models_dir = \"/usr/share/{name}/models\"")),
                "{settings}"
            );
            face::FaceEngine::load(&models, face::FaceConfig::default())
                .unwrap_or_else(|e| panic!("{name}'s models: {e}"));
        }
        if tier == "cloud" {
            let sd = root.join("usr/bin/facepay-sd");
            let example = root.join("usr/share/doc/facepay-cloud/examples/fleet.toml");
            let out = dir.path().join("sd");
            run(Command::new(&sd)
                .arg("--inventory")
                .arg(&example)
                .arg("--out")
                .arg(&out));
            assert!(out.join("stores/store-2/prometheus-agent.yml").is_file());
            for file in [
                "usr/share/facepay/prometheus/facepay-rules.yml",
                "usr/share/facepay/grafana/dashboards/facepay-fleet.json",
                "usr/share/facepay/grafana/provisioning/datasources/facepay.yml",
            ] {
                assert!(root.join(file).is_file(), "{file} is not in {name}");
            }
        }

        // The unit: hardened, and systemd takes every line of it (checked against the packaged
        // binary: the unit's own path is where the package installs it).
        let unit_text = std::fs::read_to_string(&unit).unwrap();
        for line in [
            format!("User={name}"),
            format!("StateDirectory=facepay/{tier}"),
            "ProtectSystem=strict".to_owned(),
            "NoNewPrivileges=yes".to_owned(),
            "CapabilityBoundingSet=".to_owned(),
            format!("ExecStart=/usr/bin/{name} --config /etc/facepay/{tier}.toml"),
        ] {
            assert!(
                unit_text.lines().any(|l| l.starts_with(&line)),
                "{line} missing from {name}.service"
            );
        }
        let checked_unit = dir.path().join(format!("{name}.service"));
        std::fs::write(
            &checked_unit,
            unit_text.replace(&format!("/usr/bin/{name}"), &binary.display().to_string()),
        )
        .unwrap();
        let verified = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&checked_unit)
            .output()
            .unwrap();
        let complaints = String::from_utf8_lossy(&verified.stderr);
        assert!(
            verified.status.success() && complaints.trim().is_empty(),
            "{name}.service: {complaints}"
        );
    }
}
