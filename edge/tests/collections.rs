//! Any resource at the edge: a list or watch through MetaServer of a collection the node never
//! held (ConfigMaps of a namespace, a custom resource) subscribes the node to it, under node
//! authorization and RBAC grants; the node then follows every change and keeps serving the
//! collection while the cloud is down and across its own restart.

mod support;

use std::time::Duration;

use support::common::RawWatch;
use support::*;

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
"#;

fn names(out: &Output) -> Vec<String> {
    let mut names: Vec<String> = stdout(out).lines().map(str::to_owned).collect();
    names.sort();
    names
}

#[test]
fn collections_the_node_never_held_are_subscribed_and_kept_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start_with(
        &dir.path().join("cloud"),
        free_port(),
        free_port(),
        free_port(),
        &["--link-keepalive", "1s"],
    );
    let port = free_port();
    let mut edge = EdgeProcess::start(
        &cloud,
        "edge-1",
        &dir.path().join("edge"),
        port,
        Some(&token(&cloud)),
    );
    eventually("edge-1 registered", Duration::from_secs(30), || {
        cloud.kubectl(&["get", "node", "edge-1"]).status.success()
    });

    // ConfigMaps no pod of the node references: a list through MetaServer gets all of them.
    cloud.ok(&["create", "namespace", "apps"]);
    for (name, value) in [("a", "1"), ("b", "2")] {
        cloud.ok(&[
            "-n",
            "apps",
            "create",
            "configmap",
            name,
            &format!("--from-literal=v={value}"),
        ]);
    }
    let out = edge.kubectl(&["-n", "apps", "get", "configmaps", "-o", "name"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(names(&out), ["configmap/a", "configmap/b"]);

    // A watch from the list's version follows the cloud's changes.
    let rv = edge.kubectl(&[
        "-n",
        "apps",
        "get",
        "configmaps",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    let rv = stdout(&rv);
    let mut watch = RawWatch::open(
        &edge.metaserver.replace("http://", ""),
        &format!("/api/v1/namespaces/apps/configmaps?watch=1&resourceVersion={rv}"),
    );
    cloud.ok(&[
        "-n",
        "apps",
        "create",
        "configmap",
        "c",
        "--from-literal=v=3",
    ]);
    cloud.ok(&[
        "-n",
        "apps",
        "patch",
        "configmap",
        "a",
        "-p",
        r#"{"data":{"v":"10"}}"#,
    ]);
    cloud.ok(&["-n", "apps", "delete", "configmap", "b"]);
    let events = watch.until("DELETED", "b", Duration::from_secs(20));
    let summary = support::common::event_summary(&events);
    for expected in [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b")] {
        assert!(
            summary.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{summary:?}"
        );
    }

    // Secrets need an operator's grant; the refusal says how to give one.
    let out = edge.kubectl(&["-n", "apps", "get", "secrets"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("Forbidden") && err.contains("clusterrolebinding"),
        "{err}"
    );

    // A custom resource: refused until granted, then listed with its printer columns (the
    // CRD comes to the node with the collection).
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], CRD);
    assert!(out.status.success(), "{}", stderr_of(&out));
    cloud.ok(&[
        "wait",
        "--for=condition=established",
        "crd/widgets.example.com",
        "--timeout=10s",
    ]);
    let out = cloud.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1, namespace: apps}\nspec: {size: 3}\n",
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = edge.kubectl(&[
        "get",
        "--raw",
        "/apis/example.com/v1/namespaces/apps/widgets",
    ]);
    assert!(!out.status.success(), "listed without a grant");
    cloud.ok(&[
        "create",
        "clusterrole",
        "edge-read-widgets",
        "--verb=list,watch",
        "--resource=widgets.example.com",
    ]);
    cloud.ok(&[
        "create",
        "clusterrolebinding",
        "edge-read-widgets",
        "--clusterrole=edge-read-widgets",
        "--group=system:nodes",
    ]);
    let out = edge.kubectl(&["-n", "apps", "get", "widgets"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let table = stdout(&out);
    assert!(
        table.starts_with("NAME") && table.contains("SIZE"),
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row, ["w1", "3"], "{table}");
    cloud.ok(&[
        "-n",
        "apps",
        "patch",
        "widget",
        "w1",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":5}}"#,
    ]);
    eventually(
        "the node follows the widget",
        Duration::from_secs(20),
        || {
            stdout(&edge.kubectl(&[
                "-n",
                "apps",
                "get",
                "wd",
                "w1",
                "-o",
                "jsonpath={.spec.size}",
            ])) == "5"
        },
    );

    // The cloud goes away: the subscribed collections are still served, in full.
    cloud.kill9();
    let cm = edge.kubectl(&["-n", "apps", "get", "configmaps", "-o", "name"]);
    assert_eq!(
        names(&cm),
        ["configmap/a", "configmap/c"],
        "{}",
        stderr_of(&cm)
    );
    let out = edge.kubectl(&[
        "get",
        "--raw",
        "/apis/example.com/v1/namespaces/apps/widgets",
    ]);
    assert!(stdout(&out).contains("\"w1\""), "{}", stderr_of(&out));
    // A collection never listed is not answered with whatever the cache happens to hold.
    let out = edge.kubectl(&["-n", "other", "get", "configmaps"]);
    assert!(
        !out.status.success(),
        "served a collection it never subscribed to"
    );

    // The node restarts while the cloud is down: the subscriptions and the CRD are kept.
    edge.kill9();
    let mut edge = EdgeProcess::start(&cloud, "edge-1", &dir.path().join("edge"), port, None);
    let cm = edge.kubectl(&["-n", "apps", "get", "configmaps", "-o", "name"]);
    assert_eq!(
        names(&cm),
        ["configmap/a", "configmap/c"],
        "{}",
        stderr_of(&cm)
    );
    let out = edge.kubectl(&[
        "get",
        "--raw",
        "/apis/example.com/v1/namespaces/apps/widgets",
    ]);
    assert!(stdout(&out).contains("\"w1\""), "{}", stderr_of(&out));

    // The cloud comes back: the subscription was persisted there too, so new objects flow.
    cloud.restart_after_kill9(&["--link-keepalive", "1s"]);
    cloud.ok(&[
        "-n",
        "apps",
        "create",
        "configmap",
        "d",
        "--from-literal=v=4",
    ]);
    eventually(
        "the new ConfigMap reaches the node",
        Duration::from_secs(30),
        || {
            names(&edge.kubectl(&["-n", "apps", "get", "configmaps", "-o", "name"]))
                .contains(&"configmap/d".to_owned())
        },
    );
    edge.kill9();
}
