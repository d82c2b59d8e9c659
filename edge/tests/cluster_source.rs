//! cloudcore with `--kubeconfig`: a real cluster as the source, through kube-rs. No Kubernetes
//! apiserver runs here, so the "cluster" is another cloudcore's embedded API server (A), and
//! the cloudcore under test (B) mirrors it; an edgecore joins B. Everything a user does goes to
//! A; everything the node writes must come back to A.

mod support;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use support::*;

const WORKLOAD: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: mirrored}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sleep", "1000"]
    env:
    - name: MODE
      valueFrom: {configMapKeyRef: {name: settings, key: mode}}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: meter}
spec:
  properties:
  - {name: power, type: INT, accessMode: ReadOnly}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: meter-1}
spec:
  nodeName: edge-1
  deviceModelRef: {name: meter}
"#;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn cloudcore_mirrors_a_cluster_through_kube_rs_and_writes_node_state_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir, edge_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cluster = CloudProcess::start(a_dir.path());
    let kubeconfig = dir.path().join("kubeconfig");
    let mut file = std::fs::File::create(&kubeconfig).unwrap();
    write!(
        file,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {{server: \"{}\"}}\n\
         contexts:\n- name: a\n  context: {{cluster: a, user: a}}\nusers:\n- name: a\n  user: {{}}\n\
         current-context: a\n",
        cluster.api
    )
    .unwrap();
    let mut mirror = CloudProcess::start_with(
        b_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &["--kubeconfig", kubeconfig.to_str().unwrap()],
    );
    let token = token(&mirror);
    let mqtt = free_port();
    let edge = EdgeProcess::start_with(
        &mirror,
        "edge-1",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &["--mqtt-listen".into(), format!("127.0.0.1:{mqtt}")],
    );

    // The node registered with cloudcore B shows up in the cluster, Ready, as an edge node.
    eventually(
        "edge-1 Ready in the cluster",
        Duration::from_secs(30),
        || {
            let out = cluster.kubectl(&["get", "node", "edge-1", "-o",
            "jsonpath={.metadata.labels.node-role\\.kubernetes\\.io/edge}|{.status.conditions[?(@.type==\"Ready\")].status}"]);
            text(&out) == "|True"
        },
    );

    // Work given to the cluster reaches the node through B; the pod's status comes back.
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], WORKLOAD);
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually(
        "the pod Running in the cluster",
        Duration::from_secs(30),
        || {
            text(&cluster.kubectl(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]))
                == "Running"
        },
    );
    let mode_on_node = || {
        text(&edge.kubectl(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data.mode}",
        ]))
    };
    assert_eq!(
        mode_on_node(),
        "mirrored",
        "the referenced ConfigMap is on the node"
    );
    let lease = cluster.kubectl(&[
        "get",
        "lease",
        "-n",
        "kube-node-lease",
        "edge-1",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(
        text(&lease),
        "edge-1",
        "the node's Lease is written to the cluster"
    );

    // B's API is a read-only view of the cluster.
    let out = mirror.kubectl(&["label", "pod", "web", "x=y"]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("read-only"), "{}", stderr_of(&out));
    let listed = mirror.kubectl(&["get", "pods", "-o", "name"]);
    assert!(
        text(&listed).contains("pod/web"),
        "B serves what it mirrors"
    );

    // Devices: a twin reported on MQTT lands in the cluster's DeviceStatus.
    eventually(
        "the device answered on the node",
        Duration::from_secs(30),
        || {
            let payload = r#"{"event_id":"p1","twin":{"power":{"actual":{"value":"42"}}}}"#;
            let status = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-q", "1"])
                .args(["-t", "$hw/events/device/meter-1/twin/update", "-m", payload])
                .status()
                .expect("mosquitto_pub");
            assert!(status.success());
            std::thread::sleep(Duration::from_millis(300));
            let out = cluster.kubectl(&[
                "get",
                "devicestatus",
                "meter-1",
                "-o",
                "jsonpath={.status.twins[?(@.propertyName==\"power\")].reported.value}",
            ]);
            text(&out) == "42"
        },
    );

    // B killed and restarted on its data dir: it picks the cluster up again and keeps the
    // node in step.
    mirror.restart_after_kill9(&["--kubeconfig", kubeconfig.to_str().unwrap()]);
    cluster.ok(&[
        "patch",
        "configmap",
        "settings",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"again"}}"#,
    ]);
    eventually(
        "the change after B's restart on the node",
        Duration::from_secs(40),
        || mode_on_node() == "again",
    );

    // A delete in the cluster stops the pod on the node. (The cluster here deletes at once;
    // a real apiserver marks the pod, and B's write-back makes the node's confirmation the
    // final delete.)
    cluster.ok(&["delete", "pod", "web", "--wait=false"]);
    eventually(
        "the pod gone from the node and the cluster",
        Duration::from_secs(30),
        || {
            let on_edge = edge.kubectl(&["get", "pods", "-o", "name"]);
            let in_cluster = cluster.kubectl(&["get", "pods", "-o", "name"]);
            !text(&on_edge).contains("web") && !text(&in_cluster).contains("web")
        },
    );
}
