//! Client libraries nobody here wrote, against the cloud's API and a node's MetaServer: the
//! official Kubernetes Python client's watch-list (`sendInitialEvents`, the informers' default
//! from client-go 1.35), online and offline.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

/// Runs `edge/tests/clients/watch_list.py` against `server`; its one JSON line.
fn python_watch_list(server: &str, namespace: &str, extra: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/watch_list.py");
    let out = Command::new("timeout")
        .arg("60")
        .arg("python3")
        .arg(script)
        .arg(server)
        .arg(namespace)
        .args(extra)
        .output()
        .expect("python3 (scripts/setup.sh installs the kubernetes client)");
    assert!(
        out.status.success(),
        "watch_list.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn python_watch_list_on_the_cloud_and_on_metaserver_offline_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(&dir.path().join("cloud"));
    let edge = EdgeProcess::start(
        &cloud,
        "edge-1",
        &dir.path().join("edge"),
        free_port(),
        Some(&token(&cloud)),
    );
    cloud.ok(&["create", "namespace", "lib"]);
    for name in ["x", "y"] {
        cloud.ok(&[
            "-n",
            "lib",
            "create",
            "configmap",
            name,
            "--from-literal=k=v",
        ]);
    }
    let expected = serde_json::json!(["x", "y"]);

    let on_cloud = python_watch_list(&cloud.api, "lib", &[]);
    assert_eq!(on_cloud["added"], expected, "{on_cloud}");
    assert_eq!(on_cloud["initial_events_end"], true, "{on_cloud}");

    // MetaServer: the first watch-list subscribes the node to the namespace's ConfigMaps.
    let on_edge = python_watch_list(&edge.metaserver, "lib", &[]);
    assert_eq!(on_edge["added"], expected, "{on_edge}");
    assert_eq!(on_edge["initial_events_end"], true, "{on_edge}");

    // Parameters kube-apiserver refuses are refused with its 422, on both.
    for server in [&cloud.api, &edge.metaserver] {
        let invalid = python_watch_list(server, "lib", &["invalid"]);
        assert_eq!(invalid["code"], 422, "{invalid}");
        let message = invalid["body"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("resourceVersionMatch"), "{invalid}");
    }

    // Offline, the node's MetaServer still answers the informer in full.
    cloud.kill9();
    let offline = python_watch_list(&edge.metaserver, "lib", &[]);
    assert_eq!(offline["added"], expected, "{offline}");
    assert_eq!(offline["initial_events_end"], true, "{offline}");
}
