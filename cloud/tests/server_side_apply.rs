//! `kubectl apply --server-side` against the real cloudcore: managedFields, removal of fields a
//! configuration drops, conflicts with another manager and `--force-conflicts`.

mod common;

use common::CloudProcess;

fn deployment(replicas: Option<u32>, labels: &str) -> String {
    let replicas = replicas.map_or(String::new(), |r| format!("  replicas: {r}\n"));
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {labels}\n\
         spec:\n{replicas}  selector: {{matchLabels: {{app: web}}}}\n  template:\n    \
         metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n      \
         - {{name: main, image: 'busybox:1', command: [sleep, '1000']}}\n"
    )
}

fn managers(cloud: &CloudProcess) -> Vec<(String, String)> {
    let out = cloud.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "json",
        "--show-managed-fields",
    ]);
    let object: serde_json::Value = serde_json::from_str(&out).unwrap();
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["manager"].as_str().unwrap_or_default().to_owned(),
                e["operation"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn server_side_apply_with_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(dir.path());
    let apply = |args: &[&str], config: &str| {
        let mut all = vec!["apply", "--server-side", "-f", "-"];
        all.extend_from_slice(args);
        cloud.kubectl_stdin(&all, config)
    };

    let out = apply(&[], &deployment(Some(2), "{app: web, tier: front}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("serverside-applied"));
    // kubectl's Apply entry (the Deployment controller may already have added its own Update
    // of the revision annotation, as kube-controller-manager).
    let listed = managers(&cloud);
    assert!(
        listed.contains(&("kubectl".into(), "Apply".into())),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .all(|(m, _)| m == "kubectl" || m == "kube-controller-manager"),
        "{listed:?}"
    );
    // Applying the same configuration again changes nothing.
    let rv = cloud.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    let out = apply(&[], &deployment(Some(2), "{app: web, tier: front}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = cloud.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(rv, again);

    // Another writer takes replicas (an Update by kubectl-patch)...
    cloud.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
    ]);
    assert!(managers(&cloud).contains(&("kubectl-patch".into(), "Update".into())));
    // ...so applying replicas 2 again is a conflict that names the field and its manager.
    let out = apply(&[], &deployment(Some(2), "{app: web, tier: front}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "Apply failed with 1 conflict: conflict with \"kubectl-patch\": .spec.replicas"
        ),
        "{err}"
    );
    let replicas = cloud.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "5", "a refused apply changed the object");
    // Forced, the apply wins and takes the field back.
    let out = apply(
        &["--force-conflicts"],
        &deployment(Some(2), "{app: web, tier: front}"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replicas = cloud.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "2");
    assert!(!managers(&cloud).iter().any(|(m, _)| m == "kubectl-patch"));

    // A second manager owns a label of its own; no conflict, both kept.
    let out = apply(
        &["--field-manager=team-b"],
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {owner: team-b}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // kubectl's configuration drops the tier label and replicas: they go; team-b's label stays.
    let out = apply(&[], &deployment(None, "{app: web}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let labels = cloud.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels, serde_json::json!({"app": "web", "owner": "team-b"}));

    // Without a field manager the API refuses an apply patch (kube-apiserver's 422).
    let addr = cloud.api.replace("http://", "");
    let body = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web"}}"#;
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "PATCH /apis/apps/v1/namespaces/default/deployments/web HTTP/1.0\r\nHost: {addr}\r\n\
         Content-Type: application/apply-patch+yaml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.0 422"), "{response}");
    assert!(
        response.contains("fieldManager: Required value: is required for apply patch"),
        "{response}"
    );
}
