//! CloudHub end to end: the real cloudcore binary, an edge node on a real QUIC link (this
//! test's small EdgeHub loop over replication's `EdgeReplica`; edgecore proper is issue 6).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{metric, CloudProcess};
use replication::sync::wire::{self, Parts};
use replication::sync::{Down, EdgeReplica};
use replication::{ObjectKey, StoreConfig};
use transport::{CertificateAuthority, ClientConfig, LinkEvent};

struct Edge {
    replica: Arc<Mutex<EdgeReplica>>,
    received: Arc<Mutex<HashMap<&'static str, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

fn kind(down: &Down) -> &'static str {
    match down {
        Down::Session(_) => "session",
        Down::Upsert(_) => "upsert",
        Down::Delete { .. } => "delete",
        Down::Bump { .. } => "bump",
        Down::DigestRequest => "digest-request",
        Down::HelloRequest => "hello-request",
        Down::ReportAck { .. } => "report-ack",
    }
}

/// Starts an edge node named `name` against cloudcore's QUIC port, with its store in `dir`.
fn start_edge(cloud: &CloudProcess, name: &str, dir: &std::path::Path) -> Edge {
    let pki = cloud.data_dir.join("pki");
    let ca = CertificateAuthority::from_pem(
        &std::fs::read_to_string(pki.join("ca.crt")).unwrap(),
        &std::fs::read_to_string(pki.join("ca.key")).unwrap(),
    )
    .unwrap();
    let identity = ca.issue_node(name, Duration::from_secs(3600)).unwrap();
    let addr = format!("127.0.0.1:{}", cloud.quic_port).parse().unwrap();
    let mut link =
        transport::connect(ClientConfig::new(addr, "cloudcore"), ca.cert(), &identity).unwrap();
    let replica = Arc::new(Mutex::new(
        EdgeReplica::open(dir, StoreConfig::edge()).unwrap(),
    ));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let (r, counts) = (replica.clone(), received.clone());
    let task = tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                e = link.next_event() => e,
                // Reports made by the test are picked up here.
                _ = tokio::time::sleep(Duration::from_millis(20)) => Some(LinkEvent::Disconnected { reason: "tick".into() }),
            };
            let Some(event) = event else { return };
            let mut to_ack = None;
            {
                let mut replica = r.lock().unwrap();
                match event {
                    LinkEvent::Connected { .. } => {
                        replica
                            .on_connected(event.starts_new_session().unwrap_or(true))
                            .unwrap();
                    }
                    // (A `Disconnected` here is this loop's own tick, not the link's.)
                    LinkEvent::Message(delivery) => {
                        let down = wire::decode_down(Parts::of(&delivery.message)).unwrap();
                        *counts.lock().unwrap().entry(kind(&down)).or_insert(0) += 1;
                        replica.receive(down).unwrap();
                        to_ack = Some(delivery.seq);
                    }
                    _ => {}
                }
                replica.flush().unwrap();
            }
            if let Some(seq) = to_ack {
                link.handle().ack(seq);
            }
            loop {
                let up = r.lock().unwrap().poll_transmit();
                let Some(up) = up else { break };
                if link
                    .handle()
                    .send_encoded(wire::encode_up(&up))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    Edge {
        replica,
        received,
        task,
    }
}

fn holds(edge: &Edge, key: &str) -> Option<String> {
    let replica = edge.replica.lock().unwrap();
    replica
        .store()
        .get(&ObjectKey::parse(key).unwrap())
        .unwrap()
        .map(|v| String::from_utf8_lossy(&v.object).into_owned())
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    // After a cloudcore kill -9 the node learns of it at its next packet (a keepalive within
    // 15 s), answered by a stateless reset.
    let deadline = start + Duration::from_secs(40);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{what}: {:?}", start.elapsed());
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: edge-1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
data: {greeting: hello}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
data: {a: b}
---
apiVersion: v1
kind: Pod
metadata: {name: p1}
spec:
  nodeName: edge-1
  containers:
  - name: c
    image: busybox
    env:
    - name: G
      valueFrom: {configMapKeyRef: {name: cm, key: greeting}}
---
apiVersion: v1
kind: Pod
metadata: {name: p2}
spec:
  nodeName: edge-2
  containers: [{name: c, image: busybox}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_objects_reach_the_node_reports_come_back_and_restarts_resend_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(dir.path());
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], OBJECTS)
        .status
        .success());
    let edge = start_edge(&cloud, "edge-1", edge_dir.path());

    // Exactly what is routed: its pod and the ConfigMap that pod references.
    eventually("p1 and cm on edge-1", || {
        holds(&edge, "pods/default/p1").is_some() && holds(&edge, "configmaps/default/cm").is_some()
    })
    .await;
    assert!(
        holds(&edge, "pods/default/p2").is_none(),
        "another node's pod"
    );
    eventually("acks timed in the ack-latency histogram", || {
        metric(&cloud, "kedge_ack_latency_seconds_count") >= 2.0
    })
    .await;
    assert!(
        holds(&edge, "configmaps/default/unrelated").is_none(),
        "an unreferenced ConfigMap"
    );

    // A change of the ConfigMap follows.
    cloud.ok(&[
        "patch",
        "cm",
        "cm",
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"bonjour"}}"#,
    ]);
    eventually("the new greeting on edge-1", || {
        holds(&edge, "configmaps/default/cm").is_some_and(|c| c.contains("bonjour"))
    })
    .await;

    // The node reports its pod's status: it reaches the cloud API.
    let pod = holds(&edge, "pods/default/p1").unwrap();
    let mut running: serde_json::Value = serde_json::from_str(&pod).unwrap();
    running["status"]["phase"] = "Running".into();
    let report = Bytes::from(serde_json::to_vec(&running).unwrap());
    edge.replica
        .lock()
        .unwrap()
        .report(ObjectKey::parse("pods/default/p1").unwrap(), report)
        .unwrap();
    eventually("Running in the API", || {
        cloud.ok(&["get", "pod", "p1", "-o", "jsonpath={.status.phase}"]) == "Running"
    })
    .await;

    // Node authorization: edge-1 may not write edge-2's pod.
    let mut forged: serde_json::Value =
        serde_json::from_str(&cloud.ok(&["get", "pod", "p2", "-o", "json"])).unwrap();
    forged["status"]["phase"] = "Failed".into();
    edge.replica
        .lock()
        .unwrap()
        .report(
            ObjectKey::parse("pods/default/p2").unwrap(),
            Bytes::from(serde_json::to_vec(&forged).unwrap()),
        )
        .unwrap();
    eventually("the refusal counted", || {
        metric(&cloud, "kedge_reports_refused_total") >= 1.0
    })
    .await;
    assert_eq!(
        cloud.ok(&["get", "pod", "p2", "-o", "jsonpath={.status.phase}"]),
        "Pending"
    );

    // Everything acked; then cloudcore is killed and restarted on the same data dir.
    eventually("acks persisted", || {
        metric(&cloud, "kedge_send_queue_depth") == 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = edge.received.lock().unwrap().clone();
    cloud.restart_after_kill9(&[]);
    eventually("edge-1 reconnected", || {
        metric(&cloud, "kedge_connected_nodes") >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = edge.received.lock().unwrap().clone();
    let resent_upserts = after.get("upsert").unwrap_or(&0) - before.get("upsert").unwrap_or(&0);
    assert_eq!(
        resent_upserts, 0,
        "a restart resends nothing the node acked ({before:?} → {after:?})"
    );
    assert!(
        metric(&cloud, "kedge_frames_total{direction=\"down\"}") <= 2.0,
        "only the new session's start"
    );

    // Deleting the pod in the cloud: deletionTimestamp first (the node is connected), the node
    // confirms, the pod is gone from the API and from the node.
    let deleting = cloud.kubectl(&["delete", "pod", "p1", "--wait=false"]);
    assert!(deleting.status.success());
    eventually("deletionTimestamp on edge-1", || {
        holds(&edge, "pods/default/p1").is_some_and(|p| p.contains("deletionTimestamp"))
    })
    .await;
    edge.replica
        .lock()
        .unwrap()
        .report(ObjectKey::parse("pods/default/p1").unwrap(), Bytes::new())
        .unwrap();
    eventually("p1 gone from the API", || {
        !cloud.kubectl(&["get", "pod", "p1"]).status.success()
    })
    .await;
    eventually("p1 and its ConfigMap gone from edge-1", || {
        holds(&edge, "pods/default/p1").is_none() && holds(&edge, "configmaps/default/cm").is_none()
    })
    .await;
    edge.task.abort();
}
