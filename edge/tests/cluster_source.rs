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

/// A kubeconfig in `dir` for the API at `server`.
fn kubeconfig_for(dir: &std::path::Path, server: &str) -> std::path::PathBuf {
    let kubeconfig = dir.join("kubeconfig");
    let mut file = std::fs::File::create(&kubeconfig).unwrap();
    write!(
        file,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {{server: \"{server}\"}}\n\
         contexts:\n- name: a\n  context: {{cluster: a, user: a}}\nusers:\n- name: a\n  user: {{}}\n\
         current-context: a\n"
    )
    .unwrap();
    kubeconfig
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
    let kubeconfig = kubeconfig_for(dir.path(), &cluster.api);
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

/// `cloudcore token ARGS --kubeconfig F` (no data dir): its output.
fn cluster_token(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(binary("cloudcore"))
        .arg("token")
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .unwrap()
}

#[test]
fn two_cloudcores_on_one_cluster_share_the_ca_and_tokens_and_a_node_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let (x_dir, b_dir, c_dir, edge_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cluster = CloudProcess::start(x_dir.path());
    let kubeconfig = kubeconfig_for(dir.path(), &cluster.api);
    let flags = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--link-keepalive",
        "1s",
    ];
    let start = |dir: &std::path::Path| {
        CloudProcess::start_with(dir, free_port(), free_port(), free_port(), &flags)
    };
    let mut b = start(b_dir.path());
    let c = start(c_dir.path());
    // One CA for both, kept in the cluster's Secret.
    let ca = |dir: &std::path::Path| std::fs::read(dir.join("pki/ca.crt")).unwrap();
    assert_eq!(ca(b_dir.path()), ca(c_dir.path()));
    let secret = text(&cluster.kubectl(&[
        "get",
        "secret",
        "-n",
        "kube-system",
        "kedge-ca",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ]));
    assert!(!secret.is_empty(), "the CA's Secret in the cluster");

    // A one-use token in the cluster (no data dir): listed, joins through either replica.
    let made = cluster_token(&kubeconfig, &["create", "--once"]);
    assert!(made.status.success(), "{}", stderr_of(&made));
    let token = text(&made).lines().last().unwrap().to_owned();
    let listed = cluster_token(&kubeconfig, &["list"]);
    assert!(text(&listed).contains("valid"), "{}", text(&listed));
    let clouds = format!("127.0.0.1:{},127.0.0.1:{}", b.quic_port, c.quic_port);
    let metaserver = free_port();
    let _edge = EdgeGuard(
        Command::new(binary("edgecore"))
            .args(["--node-name", "edge-ha", "--data-dir"])
            .arg(edge_dir.path())
            .args([
                "--cloud",
                &clouds,
                "--token",
                &token,
                "--link-keepalive",
                "1s",
            ])
            .args(["--metaserver-listen", &format!("127.0.0.1:{metaserver}")])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready = || {
        text(&cluster.kubectl(&[
            "get",
            "node",
            "edge-ha",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])) == "True"
    };
    eventually(
        "edge-ha Ready in the cluster",
        Duration::from_secs(30),
        ready,
    );
    assert!(text(&cluster_token(&kubeconfig, &["list"])).contains("used"));
    // The replica holding the node says so in the cluster, with its API's URL.
    let claim = || {
        text(&cluster.kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kedge-link-edge-ha",
            "-o",
            "jsonpath={.spec.holderIdentity} {.metadata.annotations.kedge\\.io/api-url}",
        ]))
    };
    eventually(
        "B's claim of the node in the cluster",
        Duration::from_secs(20),
        || claim().ends_with(&b.api),
    );
    let b_claim = claim();

    // B dies: the node moves to C, which claims it, and work still reaches the node.
    b.kill9();
    eventually("C claims the node", Duration::from_secs(30), || {
        let now = claim();
        now.ends_with(&c.api) && now != b_claim
    });
    let out = cluster.kubectl(&[
        "create",
        "configmap",
        "after-failover",
        "--from-literal=k=v",
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let meta = format!("http://127.0.0.1:{metaserver}");
    eventually(
        "the cluster's write reaches the node through C",
        Duration::from_secs(30),
        || {
            kubectl(&meta, &["get", "configmap", "after-failover"], None)
                .status
                .success()
        },
    );
    // The node's Lease is renewed through C.
    let renew = || {
        text(&cluster.kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-node-lease",
            "edge-ha",
            "-o",
            "jsonpath={.spec.renewTime}",
        ]))
    };
    let before = renew();
    eventually(
        "the node's Lease renewed through C",
        Duration::from_secs(30),
        || renew() != before,
    );
    assert!(ready());

    // A cloudcore whose data dir holds another CA refuses to join the cluster's fleet.
    let other = tempfile::tempdir().unwrap();
    let made = Command::new(binary("cloudcore"))
        .args(["token", "create", "--data-dir"])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = Command::new(binary("cloudcore"))
        .arg("--data-dir")
        .arg(other.path())
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--quic-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("is not the cluster's CA"),
        "{}",
        stderr_of(&out)
    );

    // The CA's rollover runs on the cluster's Secret (each replica takes it at its restart).
    let ca_cli = |step: &str| {
        Command::new(binary("cloudcore"))
            .args(["ca", step, "--kubeconfig", kubeconfig.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let status = ca_cli("status");
    assert!(
        text(&status).contains("rollover: None"),
        "{}",
        stderr_of(&status)
    );
    let added = ca_cli("add");
    assert!(
        text(&added).contains("rollover: Added"),
        "{}",
        stderr_of(&added)
    );
    let next = text(&cluster.kubectl(&[
        "get",
        "secret",
        "-n",
        "kube-system",
        "kedge-ca",
        "-o",
        "jsonpath={.data.ca-next\\.crt}",
    ]));
    assert!(!next.is_empty(), "the next CA in the cluster's Secret");
    let refused = ca_cli("finish");
    assert!(!refused.status.success());
}

/// The ha.rs sequence in cluster mode: a node joins through B, moves to C when B dies and
/// renews its certificate there, then moves back to B (restarted) when C dies. B issued only
/// the first certificate; it must accept the one C issued, from the node's list the replicas
/// keep in the cluster (Secret `kube-system/kedge-node-NODE`).
#[test]
fn a_certificate_renewed_on_one_cluster_replica_is_accepted_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let (x_dir, b_dir, c_dir, edge_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cluster = CloudProcess::start(x_dir.path());
    let kubeconfig = kubeconfig_for(dir.path(), &cluster.api);
    let flags = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--link-keepalive",
        "1s",
        "--node-cert-lifetime",
        "15s",
    ];
    let start = |dir: &std::path::Path| {
        CloudProcess::start_with(dir, free_port(), free_port(), free_port(), &flags)
    };
    let mut b = start(b_dir.path());
    let mut c = start(c_dir.path());
    let made = cluster_token(&kubeconfig, &["create"]);
    assert!(made.status.success(), "{}", stderr_of(&made));
    let token = text(&made).lines().last().unwrap().to_owned();
    let clouds = format!("127.0.0.1:{},127.0.0.1:{}", b.quic_port, c.quic_port);
    let _edge = EdgeGuard(
        Command::new(binary("edgecore"))
            .args(["--node-name", "edge-renew", "--data-dir"])
            .arg(edge_dir.path())
            .args([
                "--cloud",
                &clouds,
                "--token",
                &token,
                "--link-keepalive",
                "1s",
            ])
            .args(["--metaserver-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let connected = |cloud: &CloudProcess| common::metric(cloud, "kedge_connected_nodes");
    eventually("the node on B", Duration::from_secs(30), || {
        connected(&b) == 1.0
    });
    // The node's list is in the cluster, not in B's data dir.
    let listed = text(&cluster.kubectl(&[
        "get",
        "secret",
        "-n",
        "kube-system",
        "kedge-node-edge-renew",
        "-o",
        "jsonpath={.type}",
    ]));
    assert_eq!(listed, "kedge.io/node-credentials");
    assert!(!b_dir.path().join("pki/nodes/edge-renew.json").exists());
    let joined = std::fs::read(edge_dir.path().join("pki/node.crt")).unwrap();

    // B goes: the node moves to C and renews its certificate there.
    b.kill9();
    eventually("the node on C", Duration::from_secs(30), || {
        connected(&c) == 1.0
    });
    b.restart_after_kill9(&flags);
    eventually(
        "the node renewed its certificate on C",
        Duration::from_secs(40),
        || std::fs::read(edge_dir.path().join("pki/node.crt")).unwrap() != joined,
    );
    assert_eq!(connected(&c), 1.0, "the renewal was C's");
    // C goes: B, which issued only the first certificate, accepts the one C renewed.
    c.kill9();
    eventually(
        "the node connects to B with the certificate C renewed",
        Duration::from_secs(30),
        || connected(&b) == 1.0,
    );
    assert_eq!(
        common::metric(
            &b,
            "kedge_node_certificates_total{event=\"refused_revoked\"}"
        ),
        0.0
    );
}

/// An edgecore killed when the test ends.
struct EdgeGuard(std::process::Child);

impl Drop for EdgeGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
