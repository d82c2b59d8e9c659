//! edgecore end to end: the real cloudcore and edgecore binaries on loopback, real processes
//! for pods, real kubectl against both APIs.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::common;
use support::*;
const WORKLOAD: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: greeter}
data: {greeting: hello}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo $$ > pid; echo \"$GREETING\" > env.txt; exec sleep 1000"]
    env:
    - name: GREETING
      valueFrom: {configMapKeyRef: {name: greeter, key: greeting}}
    volumeMounts:
    - {name: config, mountPath: /etc/config}
  volumes:
  - name: config
    configMap: {name: greeter}
"#;

#[test]
fn a_pod_runs_on_the_edge_and_survives_cloud_and_edge_restarts() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let mut edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), port, Some(&token));

    // The node joined and is Ready; the scheduler binds the pod to it; the process runs.
    eventually("edge-1 Ready in the cloud", Duration::from_secs(30), || {
        cloud.ok(&[
            "get",
            "node",
            "edge-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ]) == "True"
    });
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], WORKLOAD)
        .status
        .success());
    let root = edge_dir.path().join("pods/default_web/root");
    eventually(
        "the pod Running in the cloud API",
        Duration::from_secs(30),
        || cloud.ok(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]) == "Running",
    );
    assert_eq!(
        std::fs::read_to_string(root.join("env.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/config/greeting")).unwrap(),
        "hello"
    );
    let first_pid = pid_alive(&root.join("pid")).expect("the container process runs");
    assert_eq!(
        cloud.ok(&["get", "pod", "web", "-o", "jsonpath={.spec.nodeName}"]),
        "edge-1"
    );

    // kubectl against MetaServer sees the node's slice.
    let pods = stdout(&edge.kubectl(&["get", "pods"]));
    assert!(pods.contains("web") && pods.contains("Running"), "{pods}");
    let cm = stdout(&edge.kubectl(&[
        "get",
        "configmap",
        "greeter",
        "-o",
        "jsonpath={.data.greeting}",
    ]));
    assert_eq!(cm, "hello");

    // A ConfigMap change reaches the volume file.
    cloud.ok(&[
        "patch",
        "configmap",
        "greeter",
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"bonjour"}}"#,
    ]);
    eventually("the volume file updated", Duration::from_secs(20), || {
        std::fs::read_to_string(root.join("etc/config/greeting")).is_ok_and(|g| g == "bonjour")
    });

    let online_started = cloud.ok(&[
        "get",
        "pod",
        "web",
        "-o",
        "jsonpath={.status.containerStatuses[0].state.running.startedAt}",
    ]);

    // The cloud goes away: the pod keeps running and MetaServer keeps serving; other writes
    // get a clear 503.
    cloud.kill9();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pid_alive(&root.join("pid")), Some(first_pid));
    let pods = stdout(&edge.kubectl(&["get", "pods"]));
    assert!(pods.contains("web"), "{pods}");
    eventually(
        "MetaServer knows it is offline",
        Duration::from_secs(60),
        || {
            let out = edge.kubectl(&["create", "configmap", "offline-test", "--from-literal=a=b"]);
            String::from_utf8_lossy(&out.stderr).contains("offline")
        },
    );

    // edgecore killed and restarted with no cloud: the pod runs again, MetaServer answers fast.
    edge.kill9();
    eventually(
        "the container died with edgecore",
        Duration::from_secs(5),
        || pid_alive(&root.join("pid")) != Some(first_pid),
    );
    let restarted = Instant::now();
    edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), port, None);
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "MetaServer answered after {:?}",
        restarted.elapsed()
    );
    eventually(
        "the pod running again offline",
        Duration::from_secs(10),
        || pid_alive(&root.join("pid")).is_some_and(|p| p != first_pid),
    );
    let started_at = |edge: &EdgeProcess| {
        stdout(&edge.kubectl(&[
            "get",
            "pod",
            "web",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.running.startedAt}",
        ]))
    };
    let mut offline_started = String::new();
    eventually(
        "the new start in MetaServer",
        Duration::from_secs(10),
        || {
            offline_started = started_at(&edge);
            !offline_started.is_empty() && offline_started != online_started
        },
    );

    // The cloud returns: the status made offline arrives.
    cloud.restart_after_kill9(&[]);
    eventually(
        "the offline status in the cloud",
        Duration::from_secs(40),
        || {
            cloud.ok(&[
                "get",
                "pod",
                "web",
                "-o",
                "jsonpath={.status.containerStatuses[0].state.running.startedAt}",
            ]) == offline_started
        },
    );

    // Deleting the pod stops the process; the node confirms and the pod goes away.
    let pid = pid_alive(&root.join("pid")).unwrap();
    cloud.ok(&["delete", "pod", "web", "--wait=false"]);
    eventually("the process stopped", Duration::from_secs(20), || {
        pid_alive(&root.join("pid")) != Some(pid)
    });
    eventually(
        "the pod gone from the cloud",
        Duration::from_secs(20),
        || !cloud.kubectl(&["get", "pod", "web"]).status.success(),
    );
}

#[test]
fn heartbeats_renew_the_lease_in_the_cloud_and_a_silent_node_goes_not_ready() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &["--node-grace", "4s"],
    );
    let token = token(&cloud);
    let port = free_port();
    let flags = ["--no-mqtt", "--lease-period", "1s"].map(String::from);
    let mut edge = EdgeProcess::start_with(
        &cloud,
        "edge-hb",
        edge_dir.path(),
        port,
        Some(&token),
        &flags,
    );
    let ready = || {
        cloud.ok(&[
            "get",
            "node",
            "edge-hb",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ])
    };
    eventually("edge-hb Ready", Duration::from_secs(30), || {
        ready() == "True"
    });

    // The cloud writes the Lease from the node's heartbeats, with its own clock.
    let lease = || {
        let out = cloud.kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-node-lease",
            "edge-hb",
            "-o",
            "jsonpath={.spec.holderIdentity} {.spec.leaseDurationSeconds} {.spec.renewTime}",
        ]);
        stdout(&out)
    };
    // The Lease holds four of the node's heartbeats (it beats every second).
    eventually("the Lease in the cloud", Duration::from_secs(15), || {
        lease().starts_with("edge-hb 4 ")
    });
    let first = lease();
    let beats = common::metric(&cloud, "kedge_heartbeats_total");
    std::thread::sleep(Duration::from_millis(2500));
    let second = lease();
    assert!(
        second > first,
        "renewTime advances with heartbeats: {first:?} then {second:?}"
    );
    assert!(
        common::metric(&cloud, "kedge_heartbeats_total") >= beats + 2.0,
        "about one heartbeat a second"
    );
    // The Lease is not routed back to its node (a renewal sends nothing down): the node's
    // cache has no copy, and reading it through MetaServer is refused by the cloud.
    let local = edge.kubectl(&["get", "lease", "-n", "kube-node-lease", "edge-hb"]);
    assert!(
        !local.status.success() && stderr_of(&local).contains("heartbeats"),
        "the node holds no copy of its Lease, and the refusal says why: {}",
        stderr_of(&local)
    );

    // A node that stops sending heartbeats goes NotReady (its pods are left alone); back with
    // its stored certificate (no token), its first heartbeat makes it Ready again.
    edge.kill9();
    eventually("edge-hb NotReady", Duration::from_secs(30), || {
        ready() == "Unknown"
    });
    let mut edge = EdgeProcess::start_with(&cloud, "edge-hb", edge_dir.path(), port, None, &flags);
    eventually("edge-hb Ready again", Duration::from_secs(30), || {
        ready() == "True"
    });

    // A node that beats less often than the cloud's grace (5 s against 4 s) is judged by its
    // own Lease (20 s), so it does not flap NotReady between its heartbeats.
    edge.kill9();
    let slow = ["--no-mqtt", "--lease-period", "5s"].map(String::from);
    let _edge = EdgeProcess::start_with(&cloud, "edge-hb", edge_dir.path(), port, None, &slow);
    eventually(
        "the Lease follows the period",
        Duration::from_secs(30),
        || lease().starts_with("edge-hb 20 ") && ready() == "True",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < deadline {
        assert_eq!(ready(), "True", "a node beating every 5 s stays Ready");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn bad_tokens_other_nodes_data_and_garbage_get_clear_errors() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let good = token(&cloud);
    let run = |node: &str, dir: &Path, token: Option<&str>| -> Output {
        let mut command = edge_command_with_mqtt(&cloud, node, dir, free_port(), &[]);
        if let Some(token) = token {
            command.arg("--token").arg(token);
        }
        command.output().unwrap()
    };
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // A token with the right CA pin and a wrong secret: refused by the cloud.
    let dir = tempfile::tempdir().unwrap();
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[3] = "wrongsecret";
    let out = run("edge-1", dir.path(), Some(&parts.join(".")));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refused") && stderr(&out).contains("unknown token"),
        "{}",
        stderr(&out)
    );

    // A token pinning another CA: the node does not trust this cloud.
    let other = format!("kedge1.{}.abc123.secret", "00".repeat(32));
    let out = run("edge-1", dir.path(), Some(&other));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not present the CA the token pins"),
        "{}",
        stderr(&out)
    );

    // No token on a first start.
    let out = run("edge-1", dir.path(), None);
    assert!(stderr(&out).contains("pass --token"), "{}", stderr(&out));

    // edge-1 joins; another machine claiming to be edge-1 is refused.
    let port = free_port();
    let _edge = EdgeProcess::start(&cloud, "edge-1", dir.path(), port, Some(&good));
    let impostor = tempfile::tempdir().unwrap();
    let out = run("edge-1", impostor.path(), Some(&good));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already joined"), "{}", stderr(&out));

    // A data dir of another node.
    let out = run("edge-2", dir.path(), Some(&good));
    assert!(
        stderr(&out).contains("belongs to node \"edge-1\""),
        "{}",
        stderr(&out)
    );

    // Garbage on MetaServer's port: an HTTP 400, and it keeps serving.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    assert!(
        response.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    assert!(common::http_get(&format!("127.0.0.1:{port}"), "/healthz").is_some_and(|b| b == "ok"));
}

#[test]
fn edgecore_killed_in_the_middle_of_a_large_sync_loses_nothing() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    const PODS: usize = 300;
    let workload: String = (0..PODS)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}}}\nspec:\n  nodeName: edge-1\n  containers: [{{name: c, image: busybox, command: [sleep, '1000']}}]\n"
            )
        })
        .collect();
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &workload)
        .status
        .success());

    let port = free_port();
    let cached = |port: u16| {
        let out = kubectl(
            &format!("http://127.0.0.1:{port}"),
            &["get", "pods", "-o", "name"],
            None,
        );
        stdout(&out).lines().count()
    };
    let spawn = |token: Option<&str>| {
        let mut command = edge_command_with_mqtt(&cloud, "edge-1", edge_dir.path(), port, &[]);
        command.args(["--runtime", "hollow"]);
        if let Some(token) = token {
            command.arg("--token").arg(token);
        }
        command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let mut child = spawn(Some(&token));
    // Kill it as soon as part of the sync is cached.
    eventually("part of the sync cached", Duration::from_secs(30), || {
        common::http_get(&format!("127.0.0.1:{port}"), "/api/v1/pods")
            .is_some_and(|b| b.contains("\"name\":\"p"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn(None);
    eventually(
        "every pod cached after the restart",
        Duration::from_secs(60),
        || cached(port) == PODS,
    );
    eventually(
        "every pod Running in the cloud",
        Duration::from_secs(60),
        || {
            let out = cloud.ok(&[
                "get",
                "pods",
                "--field-selector",
                "status.phase=Running",
                "-o",
                "name",
            ]);
            out.lines().count() == PODS
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

const EVENT: &str = r#"
apiVersion: v1
kind: Event
metadata: {name: edge-1.rebooted, namespace: default}
involvedObject: {kind: Node, name: edge-1}
reason: Rebooted
message: edge-1 came back
type: Normal
source: {component: local-agent, host: edge-1}
"#;

#[test]
fn metaserver_forwards_writes_and_cache_misses_to_the_cloud_under_node_authorization() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    eventually(
        "edge-1's Node in its cache",
        Duration::from_secs(30),
        || edge.kubectl(&["get", "node", "edge-1"]).status.success(),
    );
    cloud.ok(&["create", "configmap", "extra", "--from-literal=k=v1"]);
    cloud.ok(&[
        "create",
        "secret",
        "generic",
        "hidden",
        "--from-literal=p=s",
    ]);
    // No pod references it, so it is not routed here. (A list of ConfigMaps through MetaServer
    // would subscribe the node to all of them: edge/tests/collections.rs.)
    // A miss goes to the cloud, and from then on the ConfigMap is routed here and kept current.
    let value = |edge: &EdgeProcess| {
        stdout(&edge.kubectl(&["get", "cm", "extra", "-o", "jsonpath={.data.k}"]))
    };
    assert_eq!(value(&edge), "v1");
    cloud.ok(&[
        "patch",
        "cm",
        "extra",
        "--type=merge",
        "-p",
        r#"{"data":{"k":"v2"}}"#,
    ]);
    eventually(
        "the cached copy follows the cloud",
        Duration::from_secs(10),
        || value(&edge) == "v2",
    );

    // A Secret no pod of this node references: refused, like Kubernetes' node authorizer.
    let out = edge.kubectl(&["get", "secret", "hidden"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("only when it is routed"),
        "{}",
        stderr_of(&out)
    );

    // Writes are forwarded and judged by node authorization.
    let out = edge.kubectl(&["create", "configmap", "mine", "--from-literal=a=b"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("node edge-1 may not write configmaps/default/mine"),
        "{}",
        stderr_of(&out)
    );
    let out = edge.kubectl(&["delete", "cm", "extra"]);
    assert!(
        stderr_of(&out).contains("may not delete configmaps"),
        "{}",
        stderr_of(&out)
    );
    let out = kubectl(&edge.metaserver, &["create", "-f", "-"], Some(EVENT));
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(cloud
        .ok(&["get", "events", "-o", "name"])
        .contains("edge-1.rebooted"));
    let out = edge.kubectl(&["label", "node", "edge-1", "site=lab"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        cloud.ok(&[
            "get",
            "node",
            "edge-1",
            "-o",
            "jsonpath={.metadata.labels.site}"
        ]),
        "lab"
    );
    eventually(
        "the label back in the edge's cache",
        Duration::from_secs(10),
        || {
            stdout(&edge.kubectl(&[
                "get",
                "node",
                "edge-1",
                "-o",
                "jsonpath={.metadata.labels.site}",
            ])) == "lab"
        },
    );
    let out = edge.kubectl(&["label", "node", "edge-1", "node-role.kubernetes.io/edge-"]);
    assert!(
        stderr_of(&out).contains("may not remove its edge role label"),
        "{}",
        stderr_of(&out)
    );

    // The interest survives a cloudcore crash: the copy keeps following after the restart.
    // (Read through a list, which only the cache serves: a get would be forwarded on a miss.)
    let cached_value = |edge: &EdgeProcess| {
        stdout(&edge.kubectl(&[
            "get",
            "configmaps",
            "-o",
            r#"jsonpath={.items[?(@.metadata.name=="extra")].data.k}"#,
        ]))
    };
    assert_eq!(cached_value(&edge), "v2");
    cloud.restart_after_kill9(&[]);
    cloud.ok(&[
        "patch",
        "cm",
        "extra",
        "--type=merge",
        "-p",
        r#"{"data":{"k":"v3"}}"#,
    ]);
    eventually(
        "the cached copy follows the restarted cloud",
        Duration::from_secs(40),
        || cached_value(&edge) == "v3",
    );
    // And stays: a new session after the restart does not drop it.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cached_value(&edge), "v3");
}

/// The next watcher event for a ConfigMap named `want` (others skipped), within `within`.
async fn next_apply_of<S>(stream: &mut S, want: &str, value: &str, within: Duration) -> bool
where
    S: futures_util::Stream<
            Item = Result<
                kube::runtime::watcher::Event<k8s_openapi::api::core::v1::ConfigMap>,
                kube::runtime::watcher::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    use kube::runtime::watcher::Event;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let Ok(Some(item)) = tokio::time::timeout_at(deadline, stream.next()).await else {
            return false;
        };
        match item {
            Ok(Event::Apply(cm)) | Ok(Event::InitApply(cm)) => {
                let name = cm.metadata.name.clone().unwrap_or_default();
                let v = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get("v").cloned())
                    .unwrap_or_default();
                if name == want && v == value {
                    return true;
                }
            }
            Ok(_) => {}
            // The edge restarting: the watcher retries on its next poll.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_watcher_on_metaserver_follows_the_cloud_and_resumes_after_disconnects() {
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, WatchEvent, WatchParams};
    use kube::runtime::watcher;

    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let mut edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), port, Some(&token));
    eventually(
        "edge-1's Node in its cache",
        Duration::from_secs(30),
        || edge.kubectl(&["get", "node", "edge-1"]).status.success(),
    );
    for i in 0..3 {
        cloud.ok(&[
            "create",
            "configmap",
            &format!("w-{i}"),
            "--from-literal=v=0",
        ]);
        // A get through MetaServer makes the node follow the ConfigMap from then on.
        assert!(edge
            .kubectl(&["get", "configmap", &format!("w-{i}")])
            .status
            .success());
    }
    let config = kube::Config::new(edge.metaserver.parse().unwrap());
    let api: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).unwrap(), "default");

    // The watcher's initial list holds the three; a cloud change arrives as a live event.
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    for i in 0..3 {
        assert!(
            next_apply_of(&mut stream, &format!("w-{i}"), "0", Duration::from_secs(20)).await,
            "w-{i} in the initial list"
        );
    }
    cloud.ok(&[
        "patch",
        "cm",
        "w-1",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"1"}}"#,
    ]);
    assert!(next_apply_of(&mut stream, "w-1", "1", Duration::from_secs(20)).await);

    // A plain watch that ends (timeoutSeconds) and resumes from the last version it saw gets
    // exactly what came after.
    let rv = api
        .get("w-1")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    cloud.ok(&[
        "patch",
        "cm",
        "w-2",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"2"}}"#,
    ]);
    let mut resumed = api
        .watch(&WatchParams::default().timeout(3), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(10), resumed.next()).await
    {
        match event.unwrap() {
            WatchEvent::Modified(cm) | WatchEvent::Added(cm) => {
                seen.push(cm.metadata.name.unwrap_or_default())
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["w-2"]);

    // edgecore killed and restarted: the long-lived watcher reconnects (re-listing if its
    // version is gone) and keeps following the cloud.
    edge.kill9();
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), port, None);
    cloud.ok(&[
        "patch",
        "cm",
        "w-0",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"3"}}"#,
    ]);
    assert!(
        next_apply_of(&mut stream, "w-0", "3", Duration::from_secs(40)).await,
        "the watcher follows the restarted MetaServer"
    );
    drop(edge);
}

/// A small HTTP application: answers `201` with `METHOD PATH BODY`; `/slow` waits 3 s first.
fn tiny_app() -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20) {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                if path.starts_with("/slow") {
                    std::thread::sleep(Duration::from_secs(3));
                }
                let text = format!("{method} {path} {}", String::from_utf8_lossy(&body));
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 201 Created\r\nX-App: tiny\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    port
}

/// One HTTP/1.1 request to `addr`; the whole response as text.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn servicebus_carries_an_http_request_from_the_cloud_to_an_application_on_the_node() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let app = tiny_app();
    let mut command = edge_command_with_mqtt(&cloud, "edge-1", edge_dir.path(), free_port(), &[]);
    command
        .arg("--token")
        .arg(token(&cloud))
        .arg("--service-bus-app")
        .arg(format!("tiny=127.0.0.1:{app}"))
        .args(["--service-bus-timeout", "1s"]);
    // Wrapped so that the process is killed however the test ends.
    let _edge = EdgeProcess {
        child: command.stdout(Stdio::null()).spawn().unwrap(),
        metaserver: String::new(),
    };
    let api = cloud.api.trim_start_matches("http://").to_owned();
    let mut response = String::new();
    eventually("a ServiceBus round trip", Duration::from_secs(30), || {
        response = http(&api, "POST", "/servicebus/edge-1/tiny/greet?x=1", "hi");
        response.starts_with("HTTP/1.1 201")
    });
    assert!(
        response.to_ascii_lowercase().contains("x-app: tiny"),
        "{response}"
    );
    assert!(response.ends_with("POST /greet?x=1 hi"), "{response}");

    let response = http(&api, "GET", "/servicebus/edge-1/nope/", "");
    assert!(
        response.starts_with("HTTP/1.1 404") && response.contains("no application \"nope\""),
        "{response}"
    );
    let response = http(&api, "GET", "/servicebus/edge-9/tiny/", "");
    assert!(
        response.starts_with("HTTP/1.1 404") && response.contains("never connected"),
        "{response}"
    );
    let response = http(&api, "GET", "/servicebus/edge-1/tiny/slow", "");
    assert!(
        response.starts_with("HTTP/1.1 504") && response.contains("did not answer within 1s"),
        "{response}"
    );
}

const DEVICE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: thermometer}
spec:
  properties:
  - name: temperature
    type: int
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1}
spec:
  nodeName: edge-1
  deviceModelRef: {name: thermometer}
"#;

#[test]
fn a_device_bound_to_the_node_reaches_it_with_its_model() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    let out = cloud.kubectl_stdin(&["apply", "-f", "-"], DEVICE);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let listed =
        |edge: &EdgeProcess, kind: &str| stdout(&edge.kubectl(&["get", kind, "-o", "name"]));
    eventually(
        "the device and its model on edge-1",
        Duration::from_secs(20),
        || {
            listed(&edge, "devices").contains("thermo-1")
                && listed(&edge, "devicemodels").contains("thermometer")
        },
    );
    cloud.ok(&["delete", "device", "thermo-1"]);
    eventually("both gone from edge-1", Duration::from_secs(20), || {
        !listed(&edge, "devices").contains("thermo-1")
            && !listed(&edge, "devicemodels").contains("thermometer")
    });
}

/// A pod for edge-1 in namespace `zz` with label `tier`, stopped fast.
fn zz_pod(name: &str, tier: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: zz, labels: {{tier: \
         {tier}}}}}\nspec:\n  nodeName: edge-1\n  terminationGracePeriodSeconds: 1\n  \
         containers:\n  - {{name: main, image: busybox, command: [sleep, \"1000\"]}}\n"
    )
}

#[test]
fn metaserver_watches_send_deletes_selector_changes_and_watch_lists() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let m1 = format!("127.0.0.1:{port}");
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), port, Some(&token));
    eventually(
        "edge-1's Node in its cache",
        Duration::from_secs(30),
        || edge.kubectl(&["get", "node", "edge-1"]).status.success(),
    );
    cloud.ok(&["create", "namespace", "zz"]);
    let pods = "/api/v1/namespaces/zz/pods";

    // Item 4: a pod created on edge-1 and deleted ends with DELETED on the edge's watches.
    let mut all = common::RawWatch::open(&m1, &format!("{pods}?watch=1"));
    let mut on_node = common::RawWatch::open(
        &m1,
        &format!("{pods}?watch=1&fieldSelector=spec.nodeName%3Dedge-1"),
    );
    assert_eq!(all.status, 200);
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &zz_pod("gone", "a"))
        .status
        .success());
    eventually(
        "the pod Running in the cloud",
        Duration::from_secs(30),
        || {
            cloud.ok(&[
                "get",
                "pod",
                "gone",
                "-n",
                "zz",
                "-o",
                "jsonpath={.status.phase}",
            ]) == "Running"
        },
    );
    cloud.ok(&["delete", "pod", "gone", "-n", "zz", "--wait=false"]);
    for watch in [&mut all, &mut on_node] {
        let events = watch.until("DELETED", "gone", Duration::from_secs(30));
        let last = events.last().expect("events");
        assert_eq!(
            (
                last["type"].as_str(),
                last["object"]["metadata"]["name"].as_str()
            ),
            (Some("DELETED"), Some("gone")),
            "{:?}",
            common::event_summary(&events)
        );
        assert!(last["object"]["metadata"]["deletionTimestamp"].is_string());
    }
    eventually(
        "the pod gone from the cloud",
        Duration::from_secs(10),
        || {
            !cloud
                .kubectl(&["get", "pod", "gone", "-n", "zz"])
                .status
                .success()
        },
    );

    // Item 5: a pod relabelled out of and back into a label selector.
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &zz_pod("p", "a"))
        .status
        .success());
    let mut tier_a = common::RawWatch::open(&m1, &format!("{pods}?watch=1&labelSelector=tier%3Da"));
    eventually(
        "the pod p on edge-1's MetaServer",
        Duration::from_secs(30),
        || {
            edge.kubectl(&["get", "pod", "p", "-n", "zz"])
                .status
                .success()
        },
    );
    cloud.ok(&["label", "pod", "p", "-n", "zz", "tier=b", "--overwrite"]);
    let left = tier_a.until("DELETED", "p", Duration::from_secs(20));
    let deleted = left.last().expect("events");
    assert_eq!(
        deleted["type"],
        "DELETED",
        "{:?}",
        common::event_summary(&left)
    );
    assert_eq!(deleted["object"]["metadata"]["labels"]["tier"], "a");
    cloud.ok(&["label", "pod", "p", "-n", "zz", "tier=a", "--overwrite"]);
    let back = tier_a.until("ADDED", "p", Duration::from_secs(20));
    let added = back.last().expect("events");
    assert_eq!(added["type"], "ADDED", "{:?}", common::event_summary(&back));
    assert_eq!(added["object"]["metadata"]["labels"]["tier"], "a");

    // Item 9: a watch-list from a list's version sends every pod, then the end bookmark.
    let (status, list) = common::http_call(&m1, "GET", pods, "");
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap();
    let mut watch_list = common::RawWatch::open(
        &m1,
        &format!(
            "{pods}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan\
             &allowWatchBookmarks=true&resourceVersion={rv}"
        ),
    );
    let events = watch_list.until("BOOKMARK", "", Duration::from_secs(10));
    let summary = common::event_summary(&events);
    assert_eq!(
        summary,
        [("ADDED", "p"), ("BOOKMARK", "")].map(|(t, n)| (t.to_owned(), n.to_owned()))
    );
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    for query in [
        "watch=1&sendInitialEvents=true",
        "watch=1&resourceVersionMatch=NotOlderThan&resourceVersion=1",
        "sendInitialEvents=true",
    ] {
        let (status, body) = common::http_call(&m1, "GET", &format!("{pods}?{query}"), "");
        assert_eq!(status, 422, "{query}: {body}");
        assert!(body.contains("ListOptions.meta.k8s.io"), "{body}");
    }
}

#[test]
fn a_pod_whose_configuration_the_node_lacks_waits_and_says_why() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let _edge = EdgeProcess::start(&cloud, "edge-cfg", edge_dir.path(), port, Some(&token));
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: needs-config}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo \"$MODE\" > mode.txt; exec sleep 1000"]
    env:
    - name: MODE
      valueFrom: {configMapKeyRef: {name: later, key: mode}}
---
apiVersion: v1
kind: Pod
metadata: {name: old-volume}
spec:
  containers:
  - {name: main, image: busybox, command: ["sleep", "1000"]}
  volumes:
  - {name: src, gitRepo: {repository: "https://example.invalid/r.git"}}
"#;
    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], pods);
    assert!(applied.status.success(), "{}", stderr_of(&applied));
    let waiting = |pod: &str| {
        cloud.ok(&[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        ])
    };
    eventually("needs-config says why", Duration::from_secs(30), || {
        waiting("needs-config") == "CreateContainerConfigError: configmap \"later\" not found"
    });
    eventually("old-volume says why", Duration::from_secs(30), || {
        waiting("old-volume").starts_with(
            "CreateContainerConfigError: volume \"src\": unsupported volume type [\"gitRepo\"]",
        )
    });
    assert_eq!(
        cloud.ok(&[
            "get",
            "pod",
            "needs-config",
            "-o",
            "jsonpath={.status.phase}"
        ]),
        "Pending"
    );
    let root = edge_dir.path().join("pods/default_needs-config/root");
    assert!(!root.join("mode.txt").exists(), "nothing ran");
    eventually(
        "a Failed event, as kubelet's",
        Duration::from_secs(20),
        || {
            cloud
                .ok(&["get", "events", "--field-selector", "reason=Failed"])
                .contains("configmap \"later\" not found")
        },
    );

    // The ConfigMap, with the wrong key first, then the right one: the pod runs.
    cloud.ok(&["create", "configmap", "later", "--from-literal=other=x"]);
    eventually("the missing key named", Duration::from_secs(30), || {
        waiting("needs-config").ends_with("couldn't find key mode in ConfigMap default/later")
    });
    cloud.ok(&[
        "patch",
        "configmap",
        "later",
        "--type=merge",
        "-p",
        r#"{"data":{"mode":"fast"}}"#,
    ]);
    eventually("needs-config Running", Duration::from_secs(30), || {
        cloud.ok(&[
            "get",
            "pod",
            "needs-config",
            "-o",
            "jsonpath={.status.phase}",
        ]) == "Running"
    });
    eventually("it saw the value", Duration::from_secs(10), || {
        std::fs::read_to_string(root.join("mode.txt")).is_ok_and(|m| m == "fast\n")
    });
}

#[test]
fn container_logs_rotate_by_size_and_kubectl_logs_follows_across_rotations() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let flags: Vec<String> = [
        "--mqtt-listen",
        "127.0.0.1:0",
        "--container-log-max-size",
        "2Ki",
        "--container-log-max-files",
        "3",
    ]
    .map(String::from)
    .to_vec();
    let _edge = EdgeProcess::start_with(
        &cloud,
        "edge-logs",
        edge_dir.path(),
        port,
        Some(&token),
        &flags,
    );
    // ~60 bytes per line in the CRI format, 20 lines a second: past 2 KiB every ~2 s.
    let pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: chatty}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.05; done"]
"#;
    let applied = cloud.kubectl_stdin(&["apply", "-f", "-"], pod);
    assert!(applied.status.success(), "{}", stderr_of(&applied));
    eventually("chatty Running", Duration::from_secs(30), || {
        cloud.ok(&["get", "pod", "chatty", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    // A follower started now keeps receiving across the rotations to come.
    let mut follower = std::process::Command::new("kubectl")
        .args(["--server", &cloud.api, "logs", "-f", "chatty"])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl logs -f");
    let pod_dir = edge_dir.path().join("pods/default_chatty");
    let rotated = || {
        std::fs::read_dir(&pod_dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("main.log."))
            .count()
    };
    eventually("two rotations kept", Duration::from_secs(60), || {
        rotated() == 2
    });
    // Rotation looks every 10 s: by now more than the kept files were made; never more kept.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(
        rotated(),
        2,
        "max-files 3: the current file and two rotated"
    );
    // Right after a rotation the writer may not have made the new file yet (it looks at its
    // path once a second; until then its lines go to the rotated file).
    let mut current = 0;
    eventually("the current log", Duration::from_secs(5), || {
        std::fs::metadata(pod_dir.join("main.log")).is_ok_and(|m| {
            current = m.len();
            true
        })
    });
    assert!(
        current < 64 * 1024,
        "the current log stays small: {current}"
    );
    let _ = follower.kill();
    let out = follower.wait_with_output().unwrap();
    let followed = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<u64> = followed
        .lines()
        .filter_map(|l| l.strip_prefix("line-")?.parse().ok())
        .collect();
    assert!(numbers.len() > 300, "followed {} lines", numbers.len());
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "no line lost or repeated across rotations"
    );
}
