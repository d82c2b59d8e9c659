//! The CI-sized twin benchmark: the real `twinbench` binary starts a real cloudcore and
//! edgecore, reports twin updates over MQTT and then over DMI, paced and in a burst, and fails
//! unless the cloud's API ends up showing every device's last value.

use std::path::PathBuf;
use std::process::Command;

fn sibling(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_twinbench")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        path.display()
    );
    path
}

#[test]
fn twin_updates_reported_on_mqtt_and_dmi_all_reach_the_cloud_api() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("twins.json");
    let out = Command::new(env!("CARGO_BIN_EXE_twinbench"))
        .args(["--devices", "20", "--rate", "400", "--duration", "3s"])
        .args([
            "--burst",
            "100",
            "--converge-timeout",
            "60s",
            "--via",
            "both",
        ])
        .arg("--cloudcore")
        .arg(sibling("cloudcore"))
        .arg("--edgecore")
        .arg(sibling("edgecore"))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run twinbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "twinbench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(runs[0]["via"], "mqtt", "{runs}");
    assert_eq!(runs[1]["via"], "dmi", "{runs}");
    for report in runs.as_array().unwrap() {
        for phase in ["paced", "burst"] {
            assert!(report[phase]["converged_s"].is_number(), "{report}");
            assert_eq!(
                report[phase]["updates"],
                if phase == "paced" { 1200 } else { 2000 }
            );
            // The link carried the reports (coalesced: fewer bytes than one status each).
            assert!(
                report[phase]["link_bytes_up"].as_f64().unwrap_or_default() > 0.0,
                "{report}"
            );
        }
    }
}
