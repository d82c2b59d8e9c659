//! The CI-sized fleet: the real `loadtest` binary starts a real cloudcore and 200 hollow nodes
//! and runs every scenario; any convergence difference fails it.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// `cloudcore` from the same build (cargo puts the workspace's binaries in one directory).
fn cloudcore() -> PathBuf {
    let loadtest = PathBuf::from(env!("CARGO_BIN_EXE_loadtest"));
    let path = loadtest.with_file_name("cloudcore");
    assert!(
        path.exists(),
        "{} is missing: build the workspace (cargo test --workspace builds it)",
        path.display()
    );
    path
}

fn metric<'a>(report: &'a Value, scenario: &str, name: &str) -> &'a Value {
    report["outcomes"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["scenario"] == scenario))
        .map(|o| &o["metrics"][name])
        .unwrap_or_else(|| panic!("no {scenario} in {report}"))
}

/// Runs `loadtest` with `args` and this build's cloudcore; its JSON report, which must say
/// every scenario converged.
fn run_loadtest(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--cloudcore")
        .arg(cloudcore())
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "loadtest failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    report
}

#[test]
fn a_small_fleet_runs_every_scenario_and_converges() {
    let report = run_loadtest(&[
        "--nodes",
        "200",
        "--pods-per-node",
        "5",
        "--churn-rate",
        "100",
        "--deployment-replicas",
        "200",
        "--duration",
        "6s",
        "--idle-window",
        "12s",
        "--converge-timeout",
        "90s",
    ]);
    let scenarios: Vec<&str> = report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["scenario"].as_str().unwrap())
        .collect();
    assert_eq!(
        scenarios,
        [
            "connect-storm",
            "initial-sync",
            "churn",
            "status-flood",
            "pod-lifecycle",
            "partition",
            "cloud-restart",
            "replica-failover",
            "deployment",
            "idle"
        ]
    );
    assert_eq!(metric(&report, "connect-storm", "ready"), 200);
    assert_eq!(
        metric(&report, "initial-sync", "pod_startup")["count"],
        1000
    );
    // Every pod converged (checked above). A probe a node did not see within the window is
    // latency accounting, not loss; a handful under CI load is tolerated (issue note: one or
    // two of 600 seen in two rehearsals of 2026-12-02, cause not found yet).
    let not_seen = metric(&report, "churn", "changes_not_seen")
        .as_u64()
        .unwrap();
    assert!(
        not_seen <= 6,
        "{not_seen} of the churn's changes never reached their node"
    );
    // Paced creates (200/s by default, one pod per node): every pod ran, every delete
    // reached its node, and a lifecycle has a cost on the links.
    assert_eq!(
        metric(&report, "pod-lifecycle", "pod_startup")["count"],
        200
    );
    assert_eq!(metric(&report, "pod-lifecycle", "deletes_not_seen"), 0);
    assert!(
        metric(&report, "pod-lifecycle", "link_bytes_per_pod_lifecycle")
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(metric(&report, "partition", "partitioned_nodes"), 20);
    assert_eq!(metric(&report, "cloud-restart", "reconnected"), 200);
    assert_eq!(metric(&report, "deployment", "available"), 200);
    assert!(
        metric(&report, "deployment", "nodes_used")
            .as_u64()
            .unwrap()
            > 1
    );
    assert!(
        metric(&report, "deployment", "label_list_matched")
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(
        metric(&report, "idle", "kbit_per_second_per_node")
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn a_fleet_on_three_replicas_moves_off_a_killed_one_and_converges() {
    let report = run_loadtest(&[
        "--nodes",
        "60",
        "--pods-per-node",
        "20",
        "--churn-rate",
        "50",
        "--duration",
        "4s",
        "--converge-timeout",
        "90s",
        "--link-keepalive",
        "2s",
        "--cloud-replicas",
        "3",
        "--scenario",
        "replica-failover",
    ]);
    // The killed replica's nodes (its link claims; about a third), every one of them back.
    let moved = metric(&report, "replica-failover", "moved_nodes")
        .as_u64()
        .unwrap();
    assert!(
        (10..=30).contains(&moved),
        "{moved} nodes on the killed replica"
    );
    assert_eq!(
        metric(&report, "replica-failover", "reconnected").as_u64(),
        Some(moved)
    );
    // A moved node gets what it lacks (the handshake and the digest exchange: about 8 KB),
    // not the 20 pods it holds again (about 30 KB of JSON).
    let ratio = metric(&report, "replica-failover", "moved_over_full_resend")
        .as_f64()
        .unwrap();
    assert!(ratio < 0.5, "moved nodes received {ratio}× a full resend");
}
