//! edgecore's MetaServer bounded like the cloud's API (oversized bodies get 413 and it keeps
//! serving), and the writes a node forwards to the cloud recorded in the cloud's audit log
//! under the node's name. (MQTT's packet limit is in mqtt_auth.rs.)

mod support;

use std::time::Duration;

use support::common::send_body;
use support::*;

#[test]
fn metaserver_refuses_oversized_bodies_and_forwarded_writes_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let cloud_dir = dir.path().join("cloud");
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start_with(
        &cloud_dir,
        free_port(),
        free_port(),
        free_port(),
        &["--audit-log", audit.to_str().expect("utf-8")],
    );
    let token = token(&cloud);
    let port = free_port();
    let mut edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), port, Some(&token));
    let addr = format!("127.0.0.1:{port}");

    for (what, head, size, chunked) in [
        (
            "a create by length",
            "POST /api/v1/namespaces/default/configmaps HTTP/1.1",
            5 << 20,
            false,
        ),
        (
            "a status update by length",
            "PUT /api/v1/nodes/edge-1/status HTTP/1.1",
            5 << 20,
            false,
        ),
        (
            "an exec by length",
            "POST /api/v1/namespaces/default/pods/p/exec?command=ls HTTP/1.1",
            5 << 20,
            false,
        ),
        (
            "a create, chunked",
            "POST /api/v1/namespaces/default/configmaps HTTP/1.1",
            3_500_000,
            true,
        ),
    ] {
        let (status, body) = send_body(&addr, head, size, chunked);
        assert_eq!(status, 413, "{what}: {body}");
        assert_eq!(
            common::http_get(&addr, "/healthz").as_deref(),
            Some("ok"),
            "MetaServer stopped answering after {what}"
        );
        assert!(
            matches!(edge.child.try_wait(), Ok(None)),
            "edgecore exited after {what}"
        );
    }

    // A write the node cannot make locally goes to the cloud, under node authorization, and
    // is audited there as the node's, whatever its outcome.
    let out = edge.kubectl(&["label", "node", "edge-1", "audited=yes"]);
    let out2 = edge.kubectl(&["create", "configmap", "from-edge"]);
    let mut lines = Vec::new();
    eventually(
        "the node's forwarded writes in the cloud's audit log",
        Duration::from_secs(20),
        || {
            lines = std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["user"]["username"] == "system:node:edge-1")
                .collect();
            lines.len() >= 2
        },
    );
    let node_patch = lines
        .iter()
        .find(|l| l["objectRef"]["resource"] == "nodes")
        .unwrap_or_else(|| panic!("no audited node write: {lines:#?}"));
    assert_eq!(node_patch["verb"], "patch");
    assert_eq!(node_patch["objectRef"]["name"], "edge-1");
    let expected = if out.status.success() { 200 } else { 403 };
    assert_eq!(
        node_patch["responseStatus"]["code"],
        expected,
        "{}",
        stderr_of(&out)
    );
    let create = lines
        .iter()
        .find(|l| l["objectRef"]["resource"] == "configmaps")
        .unwrap_or_else(|| panic!("no audited configmap create: {lines:#?}"));
    assert_eq!(create["verb"], "create");
    let code = create["responseStatus"]["code"]
        .as_u64()
        .unwrap_or_default();
    assert_eq!(
        code >= 400,
        !out2.status.success(),
        "{code}: {}",
        stderr_of(&out2)
    );

    // Exec through the cloud (kubectl's WebSocket upgrade) works with the audit log on, and
    // is recorded as a create of pods/exec.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: box}\nspec:\n  containers:\n  \
               - {name: main, image: busybox, command: [sleep, \"1000\"]}\n";
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], pod);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually("box Running", Duration::from_secs(40), || {
        cloud.ok(&["get", "pod", "box", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    let out = cloud.kubectl(&["exec", "box", "--", "echo", "audited exec"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(stdout(&out).trim(), "audited exec");
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    let exec = audited
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["objectRef"]["subresource"] == "exec")
        .unwrap_or_else(|| panic!("no audited exec: {audited}"));
    assert_eq!(exec["verb"], "create");
    assert_eq!(exec["objectRef"]["name"], "box");
    assert_eq!(exec["user"]["username"], "kedge-admin");
    edge.kill9();
}
