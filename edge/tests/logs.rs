//! `kubectl logs` end to end: real kubectl against the cloud (CloudStream over the node's QUIC
//! link) and against the node's MetaServer (its own files, also with the cloud gone).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo one; echo two >&2; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: short}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo a; sleep 3; echo b"]
---
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo run at $(date +%s%N); exit 1"]
---
apiVersion: v1
kind: Pod
metadata: {name: pair}
spec:
  containers:
  - name: first
    image: busybox
    command: ["sh", "-c", "echo from-first; exec sleep 1000"]
  - name: second
    image: busybox
    command: ["sh", "-c", "echo from-second; exec sleep 1000"]
"#;

fn logs(server: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    let out = common::kubectl(server, &all, None);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn phase(cloud: &CloudProcess, pod: &str) -> String {
    cloud.ok(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"])
}

#[test]
fn kubectl_logs_from_the_cloud_and_from_the_node_with_tail_follow_previous_and_limits() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    eventually("edge-1 Ready", Duration::from_secs(30), || {
        cloud.ok(&[
            "get",
            "node",
            "edge-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ]) == "True"
    });
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], PODS)
        .status
        .success());
    eventually("talker and pair Running", Duration::from_secs(30), || {
        phase(&cloud, "talker") == "Running" && phase(&cloud, "pair") == "Running"
    });
    let api = cloud.api.clone();

    // Everything so far, stdout and stderr.
    eventually("ticks in the log", Duration::from_secs(20), || {
        let (ok, out, _) = logs(&api, &["talker"]);
        // stdout and stderr are two pipes: their first lines may come in either order.
        ok && out.contains("one\n") && out.contains("two\n") && out.contains("tick 3\n")
    });
    // --tail, --timestamps, --limit-bytes.
    let (ok, out, err) = logs(&api, &["talker", "--tail=1"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("tick "), "{out}");
    let (ok, out, err) = logs(&api, &["talker", "--tail=2", "--timestamps"]);
    assert!(ok, "{err}");
    for line in out.lines() {
        let (stamp, text) = line.split_once(' ').expect("a timestamp");
        assert!(stamp.starts_with("20") && stamp.ends_with('Z'), "{line}");
        assert!(text.starts_with("tick "), "{line}");
    }
    let (ok, out, _) = logs(&api, &["pair", "-c", "second", "--limit-bytes=6"]);
    assert!(ok);
    assert_eq!(out, "from-s");
    let (ok, out, _) = logs(&api, &["talker", "--since=1h"]);
    assert!(
        ok && out.contains("one\n") && out.contains("tick 1\n"),
        "{out}"
    );

    // -f streams new lines as they come; the client leaving ends it.
    let mut follow = Command::new("kubectl")
        .args(["--server", &api, "logs", "-f", "talker", "--tail=1"])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(follow.stdout.take().unwrap());
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 10 && started.elapsed() < Duration::from_secs(20) {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push(line.trim().to_owned());
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
    let numbers: Vec<u64> = seen
        .iter()
        .map(|l| l.trim_start_matches("tick ").parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let _ = follow.kill();
    let _ = follow.wait();

    // -f of a container that ends: everything, then kubectl exits by itself.
    let started = Instant::now();
    eventually("short started", Duration::from_secs(20), || {
        phase(&cloud, "short") != "Pending"
    });
    let (ok, out, err) = logs(&api, &["-f", "short"]);
    assert!(ok, "{err}");
    assert_eq!(out, "a\nb\n");
    assert!(started.elapsed() < Duration::from_secs(25));

    // --previous: the instance before the last restart.
    eventually("crasher restarted twice", Duration::from_secs(40), || {
        cloud
            .ok(&[
                "get",
                "pod",
                "crasher",
                "-o",
                "jsonpath={.status.containerStatuses[0].restartCount}",
            ])
            .parse::<u32>()
            .is_ok_and(|n| n >= 2)
    });
    let (ok, previous, err) = logs(&api, &["crasher", "--previous"]);
    assert!(ok, "{err}");
    assert!(previous.starts_with("run at "), "{previous}");
    assert_eq!(previous.lines().count(), 1);

    // Several containers: -c picks one; without it the API says which exist.
    let (ok, out, err) = logs(&api, &["pair", "-c", "second"]);
    assert!(ok, "{err}");
    assert_eq!(out, "from-second\n");
    let (ok, _, err) = logs(&api, &["pair", "-c", "third"]);
    assert!(!ok && err.contains("is not valid for pod pair"), "{err}");
    let status = common::http_get(
        &api.replace("http://", ""),
        "/api/v1/namespaces/default/pods/pair/log",
    )
    .unwrap_or_default();
    assert!(
        status.contains(
            "a container name must be specified for pod pair, choose one of: [first second]"
        ),
        "{status}"
    );
    let (ok, _, err) = logs(&api, &["nope"]);
    assert!(
        !ok && err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    // The node serves its logs itself, also with the cloud gone.
    cloud.kill9();
    let (ok, out, err) = logs(&edge.metaserver, &["talker", "--tail=1"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("tick "), "{out}");
    let (ok, out, err) = logs(&edge.metaserver, &["pair", "-c", "first"]);
    assert!(ok, "{err}");
    assert_eq!(out, "from-first\n");
}
