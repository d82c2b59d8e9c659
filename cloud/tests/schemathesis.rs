//! schemathesis (PyPI; installed by scripts/setup.sh), a property-based API tester nobody here
//! wrote, against a real cloudcore: for every group-version document in `/openapi/v3` it
//! generates requests from the declared paths, parameters and bodies (valid and invalid ones) and
//! fails on any 5xx. Afterwards the process must still be serving and its store must still hold
//! what was there before.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// schemathesis' CLI, with Hypothesis' descriptions of lambdas made plain: describing a
/// strategy parses its source with `ast.parse`, which on CPython 3.11.7, deep in the stack of
/// drawing a nested request body (a Deployment's pod template, a Device), fails with
/// "SystemError: AST constructor recursion depth mismatch" (a CPython bug) and ends the
/// operation's test as an error of the tool, not a finding about the API.
const SCHEMATHESIS: &str = "import sys\n\
import hypothesis.internal.lambda_sources as sources\n\
sources.lambda_description = lambda f: 'lambda'\n\
from schemathesis.cli import schemathesis\n\
sys.argv[0] = 'schemathesis'\n\
sys.exit(schemathesis())\n";

/// Examples per operation: CI-sized (about 900 requests in all, 90 s). `SCHEMATHESIS_EXAMPLES`
/// runs more.
fn examples() -> String {
    std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "6".into())
}

/// schemathesis' phases: CI runs the documents' examples and random requests; its `coverage`
/// phase (every boundary of every parameter: ~47,000 requests for core/v1 alone, 3 minutes) is
/// for a longer run (`SCHEMATHESIS_PHASES=examples,coverage,fuzzing`).
fn phases() -> String {
    std::env::var("SCHEMATHESIS_PHASES").unwrap_or_else(|_| "examples,fuzzing".into())
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
    for (i, url) in documents.iter().enumerate() {
        // The document as served, less the list operations' `watch`: a watch answers for as long
        // as the client stays (kube-apiserver's do too), which a request generator takes for a
        // hung server. Watches are tested by kubectl -w and the client libraries' tests.
        let mut document: serde_json::Value =
            serde_json::from_str(&http_get(&api, url).expect("the document")).expect("JSON");
        for item in document["paths"]
            .as_object_mut()
            .expect("paths")
            .values_mut()
        {
            if let Some(get) = item.get_mut("get").and_then(|g| g.get_mut("parameters")) {
                if let Some(params) = get.as_array_mut() {
                    params.retain(|p| p["name"] != "watch");
                }
            }
        }
        let file = dir.path().join(format!("openapi-{i}.json"));
        std::fs::write(&file, document.to_string()).unwrap();
        // Every operation's path parameters are declared: schemathesis tests them all (it
        // reports operations it could not test as errors, which fail the run).
        let out = Command::new("python3")
            .args(["-c", SCHEMATHESIS, "run"])
            .arg(&file)
            .args(["--url", &cloud.api])
            .args(["--checks", "not_a_server_error"])
            .args(["--max-examples", &examples()])
            .args(["--phases", &phases()])
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
            .map(|l| l.get(..l.len().min(160)).unwrap_or(l))
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
