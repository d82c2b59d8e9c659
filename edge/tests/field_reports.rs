//! Field reports replayed against the real binaries (cloudcore, edgecore, kubectl on loopback):
//! each test reproduces a report's input and asserts the right value. Link timeouts are
//! shortened with `--link-keepalive 1s` (QUIC idle timeout 2 s) so that outages around each
//! timeout take seconds, not minutes; the code paths are those of the defaults.

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::common;
use support::*;

/// cloudcore with short link timeouts: keepalive 1 s (idle 2 s), node grace 6 s.
const CLOUD_FAST: &[&str] = &["--link-keepalive", "1s", "--node-grace", "6s"];
/// edgecore with short link timeouts: keepalive 1 s, a Lease renewal every second.
const EDGE_FAST: &[&str] = &["--link-keepalive", "1s", "--lease-period", "1s"];

fn start_cloud(dir: &Path, extra: &[&str]) -> CloudProcess {
    CloudProcess::start_with(dir, free_port(), free_port(), free_port(), extra)
}

/// edgecore without MQTT, with `extra` flags, joined with `token` if given.
fn start_edge(
    cloud: &CloudProcess,
    node: &str,
    dir: &Path,
    token: Option<&str>,
    extra: &[&str],
) -> EdgeProcess {
    // Non-empty MQTT flags are passed as they are: `--no-mqtt` and the test's own.
    let flags: Vec<String> = std::iter::once("--no-mqtt")
        .chain(extra.iter().copied())
        .map(str::to_owned)
        .collect();
    EdgeProcess::start_with(cloud, node, dir, free_port(), token, &flags)
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{signal} {}", child.id());
}

fn ready(cloud: &CloudProcess, node: &str) -> String {
    let out = cloud.kubectl(&[
        "get",
        "node",
        node,
        "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
    ]);
    stdout(&out)
}

fn wait_ready(cloud: &CloudProcess, node: &str) {
    eventually(
        &format!("{node} Ready in the cloud"),
        Duration::from_secs(30),
        || ready(cloud, node) == "True",
    );
}

/// A raw HTTP/1.1 request on loopback: (status code, body), or `None` if nothing came back
/// within `timeout`.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn pod_yaml(name: &str, node: &str, configmap: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sleep", "1000"]
    volumeMounts:
    - {{name: settings, mountPath: /etc/settings}}
  volumes:
  - name: settings
    configMap: {{name: {configmap}}}
"#
    )
}

/// Field report 1: after an outage longer than the QUIC idle timeout the cloud stopped sending
/// to the node for good (the node resumed its link without resuming its sync session). After
/// outages shorter than the keepalive, between keepalive and idle timeout, past the idle
/// timeout and past the node grace, a new pod runs and a ConfigMap edit arrives in seconds.
#[test]
fn after_outages_around_each_link_timeout_the_node_gets_new_pods_and_edits() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(cloud_dir.path(), CLOUD_FAST);
    let token = token(&cloud);
    let edge = start_edge(&cloud, "edge-1", edge_dir.path(), Some(&token), EDGE_FAST);
    wait_ready(&cloud, "edge-1");
    cloud.ok(&["create", "configmap", "settings", "--from-literal=round=0"]);
    assert!(cloud
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &pod_yaml("before", "edge-1", "settings")
        )
        .status
        .success());
    eventually("the first pod Running", Duration::from_secs(30), || {
        cloud.ok(&["get", "pod", "before", "-o", "jsonpath={.status.phase}"]) == "Running"
    });

    // Keepalive 1 s, idle timeout 2 s, node grace 6 s.
    for (round, outage_ms) in [(1, 500u64), (2, 1_500), (3, 3_500), (4, 8_000)] {
        signal(&edge.child, "STOP");
        std::thread::sleep(Duration::from_millis(outage_ms));
        signal(&edge.child, "CONT");
        let pod = format!("after-{round}");
        assert!(cloud
            .kubectl_stdin(&["apply", "-f", "-"], &pod_yaml(&pod, "edge-1", "settings"))
            .status
            .success());
        cloud.ok(&[
            "patch",
            "configmap",
            "settings",
            "--type=merge",
            "-p",
            &format!(r#"{{"data":{{"round":"{round}"}}}}"#),
        ]);
        eventually(
            &format!("{pod} Running after a {outage_ms} ms outage"),
            Duration::from_secs(20),
            || cloud.ok(&["get", "pod", &pod, "-o", "jsonpath={.status.phase}"]) == "Running",
        );
        eventually(
            &format!("the ConfigMap edit of round {round} at the edge"),
            Duration::from_secs(20),
            || {
                stdout(&edge.kubectl(&[
                    "get",
                    "configmap",
                    "settings",
                    "-o",
                    "jsonpath={.data.round}",
                ])) == round.to_string()
            },
        );
        eventually(
            "nothing left in the node's send queue",
            Duration::from_secs(10),
            || common::metric(&cloud, "kedge_send_queue_depth") == 0.0,
        );
    }
    wait_ready(&cloud, "edge-1");
}

/// Field report 6: a read MetaServer forwards to a hung cloud waited 30 s, then answered 502,
/// and the next one a false 404. Right: a bounded wait, then 504 with a reason; once the link
/// is declared dead, 503, never 404 for an object the node could not ask about; and the object
/// once the cloud answers again.
#[test]
fn a_read_forwarded_to_a_hung_cloud_is_a_bounded_504_then_503_never_a_false_404() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    // Keepalive 4 s: the link is declared dead 8 s after the cloud stops answering, after
    // MetaServer's 5 s bound on a forwarded call.
    let cloud = start_cloud(cloud_dir.path(), &["--link-keepalive", "4s"]);
    let token = token(&cloud);
    let edge = start_edge(
        &cloud,
        "edge-1",
        edge_dir.path(),
        Some(&token),
        &["--link-keepalive", "4s"],
    );
    wait_ready(&cloud, "edge-1");
    cloud.ok(&["create", "namespace", "ns1"]);
    cloud.ok(&[
        "create",
        "configmap",
        "not-cached",
        "-n",
        "ns1",
        "--from-literal=a=b",
    ]);
    let m1 = edge.metaserver.replace("http://", "");
    let path = "/api/v1/namespaces/ns1/configmaps/not-cached";
    let missing = "/api/v1/namespaces/ns1/configmaps/never-created";

    // The cloud hangs while the link is still up (until its idle timeout): a bounded wait.
    signal(&cloud.child, "STOP");
    let started = Instant::now();
    let (code, body) = http(&m1, "GET", path, "", Duration::from_secs(20)).expect("an answer");
    let waited = started.elapsed();
    assert_eq!(code, 504, "{body}");
    assert!(
        body.contains("\"kind\":\"Status\"") && body.contains("did not answer"),
        "{body}"
    );
    assert!(waited < Duration::from_secs(8), "answered after {waited:?}");

    // Once the link is declared dead: 503 at once, with a reason, however often one asks.
    eventually("503 once the link is dead", Duration::from_secs(15), || {
        http(&m1, "GET", path, "", Duration::from_secs(10)).is_some_and(|(code, _)| code == 503)
    });
    for _ in 0..3 {
        let (code, body) = http(&m1, "GET", path, "", Duration::from_secs(10)).expect("an answer");
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("offline") && body.contains("ServiceUnavailable"),
            "{body}"
        );
    }

    // The cloud is back: the object is served, and a truly missing one is a real 404.
    signal(&cloud.child, "CONT");
    eventually("the object served again", Duration::from_secs(20), || {
        http(&m1, "GET", path, "", Duration::from_secs(10))
            .is_some_and(|(code, body)| code == 200 && body.contains("not-cached"))
    });
    let (code, _) = http(&m1, "GET", missing, "", Duration::from_secs(10)).expect("an answer");
    assert_eq!(code, 404);
}

/// A small HTTP application on loopback that answers every request with "hello".
fn tiny_app() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            );
        }
    });
    port
}

/// Field report 7: a ServiceBus call to a hung node hung. Right: 504 within the configured
/// timeout, 503 once the link is declared dead.
#[test]
fn a_servicebus_call_to_a_hung_node_is_a_504_within_the_timeout_then_503() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    // Keepalive 3 s: the link outlives the 2 s ServiceBus timeout by a few seconds.
    let cloud = start_cloud(
        cloud_dir.path(),
        &["--link-keepalive", "3s", "--service-bus-timeout", "2s"],
    );
    let token = token(&cloud);
    let app = format!("app=127.0.0.1:{}", tiny_app());
    let edge = start_edge(
        &cloud,
        "edge-2",
        edge_dir.path(),
        Some(&token),
        &["--link-keepalive", "3s", "--service-bus-app", &app],
    );
    wait_ready(&cloud, "edge-2");
    let api = cloud.api.replace("http://", "");
    let (code, body) = http(
        &api,
        "GET",
        "/servicebus/edge-2/app/",
        "",
        Duration::from_secs(10),
    )
    .expect("an answer");
    assert_eq!((code, body.as_str()), (200, "hello"));

    signal(&edge.child, "STOP");
    let started = Instant::now();
    let (code, body) = http(
        &api,
        "GET",
        "/servicebus/edge-2/app/",
        "",
        Duration::from_secs(30),
    )
    .expect("an answer within 30 s");
    let waited = started.elapsed();
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("did not answer within"), "{body}");
    // After the 2 s timeout, well before the link's 6 s idle timeout would make it a 503.
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "504 after {waited:?}"
    );
    // Past the idle timeout (6 s) the link is dead: 503 at once.
    eventually("503 once the link is dead", Duration::from_secs(15), || {
        http(
            &api,
            "GET",
            "/servicebus/edge-2/app/",
            "",
            Duration::from_secs(10),
        )
        .is_some_and(|(code, body)| code == 503 && body.contains("not connected"))
    });
    signal(&edge.child, "CONT");
    eventually("the call works again", Duration::from_secs(20), || {
        http(
            &api,
            "GET",
            "/servicebus/edge-2/app/",
            "",
            Duration::from_secs(10),
        )
        .is_some_and(|(code, _)| code == 200)
    });
}

/// Field report 8: a restarted cloud marked every node Unknown at once, and nodes took ~15 s
/// to reconnect. Right: a whole grace period from the cloud's own start before a node is
/// judged, and nodes back within seconds of the cloud's return.
#[test]
fn a_restarted_cloud_does_not_mark_nodes_unknown_and_nodes_return_within_seconds() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // A grace long enough for a reconnect on a loaded machine (backoff ceiling 5 s, an
    // attempt up to 5 s), so that only the bug can make a node Unknown here.
    const CLOUD: &[&str] = &["--link-keepalive", "1s", "--node-grace", "15s"];
    let mut cloud = start_cloud(cloud_dir.path(), CLOUD);
    let token = token(&cloud);
    let _edges: Vec<_> = ["edge-1", "edge-2"]
        .iter()
        .zip(&dirs)
        .map(|(node, dir)| start_edge(&cloud, node, dir.path(), Some(&token), EDGE_FAST))
        .collect();
    wait_ready(&cloud, "edge-1");
    wait_ready(&cloud, "edge-2");

    // Down for longer than the node grace: every Lease is stale when the cloud returns.
    cloud.kill9();
    std::thread::sleep(Duration::from_secs(17));
    cloud.restart_after_kill9(CLOUD);
    let back = Instant::now();
    let mut reconnected = None;
    // Poll the Ready condition for most of the grace: never Unknown.
    while back.elapsed() < Duration::from_secs(12) {
        for node in ["edge-1", "edge-2"] {
            let status = ready(&cloud, node);
            assert_eq!(status, "True", "{node} after {:?}", back.elapsed());
        }
        if reconnected.is_none() && common::metric(&cloud, "kedge_connected_nodes") == 2.0 {
            reconnected = Some(back.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reconnected =
        reconnected.expect("both nodes reconnected within 12 s of the cloud's return");
    eprintln!("both nodes reconnected {reconnected:?} after the cloud's return");
}

/// Field report 10: a node writing the status of another node's pod got 404; Kubernetes' Node
/// authorizer answers 403, online and offline alike.
#[test]
fn a_status_write_to_another_nodes_pod_is_forbidden() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let cloud = start_cloud(cloud_dir.path(), &[]);
    let token = token(&cloud);
    let edge1 = start_edge(&cloud, "edge-1", dirs[0].path(), Some(&token), &[]);
    let _edge2 = start_edge(&cloud, "edge-2", dirs[1].path(), Some(&token), &[]);
    wait_ready(&cloud, "edge-1");
    wait_ready(&cloud, "edge-2");
    cloud.ok(&["create", "namespace", "zz"]);
    let pod = pod_yaml("p2", "edge-2", "p2-settings");
    cloud.ok(&[
        "create",
        "configmap",
        "p2-settings",
        "-n",
        "zz",
        "--from-literal=a=b",
    ]);
    assert!(cloud
        .kubectl_stdin(&["apply", "-n", "zz", "-f", "-"], &pod)
        .status
        .success());
    eventually("p2 Running on edge-2", Duration::from_secs(30), || {
        cloud.ok(&[
            "get",
            "pod",
            "p2",
            "-n",
            "zz",
            "-o",
            "jsonpath={.status.phase}",
        ]) == "Running"
    });
    let m1 = edge1.metaserver.replace("http://", "");
    let patch = r#"{"status":{"message":"from edge-1"}}"#;
    let (code, body) = http(
        &m1,
        "PATCH",
        "/api/v1/namespaces/zz/pods/p2/status",
        patch,
        Duration::from_secs(10),
    )
    .expect("an answer");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("\"reason\":\"Forbidden\""), "{body}");
    // kubectl says the same.
    let out = edge1.kubectl(&[
        "patch",
        "pod",
        "p2",
        "-n",
        "zz",
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
    ]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("(Forbidden)"),
        "{}",
        stderr_of(&out)
    );
    // The pod in the cloud is untouched.
    assert_eq!(
        cloud.ok(&[
            "get",
            "pod",
            "p2",
            "-n",
            "zz",
            "-o",
            "jsonpath={.status.message}"
        ]),
        ""
    );
}
