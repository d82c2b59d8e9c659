//! schemathesis (PyPI; installed by scripts/setup.sh), a property-based API tester nobody here
//! wrote, against a real cloudcore: for every group-version document in `/openapi/v3` it
//! generates requests from the declared paths, parameters and bodies (valid and invalid ones) and
//! fails on any 5xx. Afterwards the process must still be serving and its store must still hold
//! what was there before.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Examples per operation: CI-sized (a few thousand requests in all). `SCHEMATHESIS_EXAMPLES`
/// runs more.
fn examples() -> String {
    std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "6".into())
}

#[test]
fn generated_requests_from_every_openapi_document_get_no_server_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(dir.path());
    let api = cloud.api.replace("http://", "");
    cloud.ok(&["create", "namespace", "kept"]);
    cloud.ok(&[
        "create",
        "configmap",
        "kept",
        "-n",
        "kept",
        "--from-literal=k=v",
    ]);

    let index: serde_json::Value =
        serde_json::from_str(&http_get(&api, "/openapi/v3").expect("the OpenAPI v3 index"))
            .expect("JSON");
    let documents: Vec<String> = index["paths"]
        .as_object()
        .expect("paths")
        .values()
        .filter_map(|p| p["serverRelativeURL"].as_str().map(str::to_owned))
        .collect();
    assert!(documents.len() >= 6, "{documents:?}");

    let started = Instant::now();
    let mut failures = Vec::new();
    for url in &documents {
        // Every operation's path parameters are declared: schemathesis tests them all (it
        // reports operations it could not test as errors, which fail the run).
        let out = Command::new("schemathesis")
            .args(["run", &format!("{}{url}", cloud.api), "--url", &cloud.api])
            .args(["--checks", "not_a_server_error"])
            .args(["--max-examples", &examples()])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--workers", "2", "--seed", "1", "--no-shrink", "--no-color"])
            .args(["--request-timeout", "10", "--generation-database", "none"])
            .args(["--suppress-health-check", "all"])
            .current_dir(dir.path())
            .output()
            .expect("run schemathesis (scripts/setup.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("passed") || l.contains("failed") || l.contains("error"))
            .collect();
        eprintln!(
            "{url}: exit {:?}; {}",
            out.status.code(),
            summary.join(" | ")
        );
        if !out.status.success() {
            failures.push(format!(
                "{url}:\n{}\n{}",
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        assert!(
            matches!(cloud.child.try_wait(), Ok(None)),
            "cloudcore exited during {url}"
        );
    }
    eprintln!(
        "schemathesis: {} documents in {:.0} s",
        documents.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // Still serving, and what was there before is still there.
    assert_eq!(http_get(&api, "/healthz").as_deref(), Some("ok"));
    let kept = cloud.ok(&[
        "get",
        "configmap",
        "kept",
        "-n",
        "kept",
        "-o",
        "jsonpath={.data.k}",
    ]);
    assert_eq!(kept.trim(), "v");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !cloud.ok(&["get", "ns", "-o", "name"]).contains("kept") {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cloud
        .ok(&["get", "ns", "-o", "name"])
        .contains("namespace/kept"));
}
