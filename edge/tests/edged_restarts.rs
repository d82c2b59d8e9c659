//! Edged's `process` runtime across edgecore restarts, end to end (real cloudcore and
//! edgecore binaries, real processes): a pod's forked processes die with the pod and are never
//! duplicated by a restart after `kill -9`; finished pods stay finished and restart counts
//! never go backwards, with the cloud up or down while edgecore restarts.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use support::*;

/// Live (non-zombie) processes whose argv is exactly `argv`.
fn processes(argv: &[&str]) -> BTreeSet<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')))
        })
        .collect()
}

fn start_edge(cloud: &CloudProcess, dir: &Path, port: u16, token: Option<&str>) -> EdgeProcess {
    EdgeProcess::start_with(cloud, "edge-1", dir, port, token, &["--no-mqtt".to_owned()])
}

fn wait_ready(cloud: &CloudProcess) {
    eventually("edge-1 Ready in the cloud", Duration::from_secs(30), || {
        cloud.ok(&[
            "get",
            "node",
            "edge-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ]) == "True"
    });
}

/// Checks `check` every 100 ms for `period` (a bounded watch for something that must not
/// happen).
fn throughout(period: Duration, mut check: impl FnMut()) {
    let samples = (period.as_millis() / 100).max(1);
    for _ in 0..samples {
        check();
        std::thread::sleep(Duration::from_millis(100));
    }
}

const FORKER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: forker}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "sleep 575757"]
"#;

const STUBBORN: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: stubborn}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "trap '' TERM; sleep 575758 & wait"]
---
apiVersion: v1
kind: Pod
metadata: {name: leaver}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "sleep 575759 & echo forked"]
"#;

#[test]
fn a_pods_forked_processes_die_with_it_and_edgecore_restarts_never_duplicate_them() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let mut edge = start_edge(&cloud, edge_dir.path(), port, Some(&token));
    wait_ready(&cloud);

    let sleeper = ["sleep", "575757"];
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], FORKER)
        .status
        .success());
    let mut running = BTreeSet::new();
    eventually("the pod's sleep running", Duration::from_secs(30), || {
        running = processes(&sleeper);
        running.len() == 1
    });

    // kill -9 of edgecore, twice over: each time, once edgecore is back, exactly one sleep of
    // the pod runs, and it is a new one (the pod was started again, not left to an orphan).
    for round in 1..=2 {
        edge.kill9();
        std::thread::sleep(Duration::from_millis(500));
        eprintln!(
            "round {round}: after kill -9 of edgecore, {:?} of {running:?} still run",
            processes(&sleeper)
        );
        edge = start_edge(&cloud, edge_dir.path(), port, None);
        let before = running.clone();
        eventually(
            "one new sleep of the pod after the restart",
            Duration::from_secs(30),
            || {
                running = processes(&sleeper);
                running.len() == 1 && running.is_disjoint(&before)
            },
        );
        throughout(Duration::from_secs(3), || {
            let now = processes(&sleeper);
            assert!(now.len() <= 1, "round {round}: duplicated: {now:?}");
        });
    }

    // Deleting the pod ends every process of it, and the deletion is confirmed.
    cloud.ok(&["delete", "pod", "forker", "--wait=false"]);
    eventually("no sleep of the pod left", Duration::from_secs(20), || {
        processes(&sleeper).is_empty()
    });
    eventually(
        "the pod gone from the cloud",
        Duration::from_secs(20),
        || !cloud.kubectl(&["get", "pod", "forker"]).status.success(),
    );

    // A group member that ignores SIGTERM is killed after the grace period; a process the
    // container left behind when it exited by itself dies with it.
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], STUBBORN)
        .status
        .success());
    let stubborn = ["sleep", "575758"];
    let left = ["sleep", "575759"];
    eventually(
        "the stubborn pod's sleep running",
        Duration::from_secs(30),
        || processes(&stubborn).len() == 1,
    );
    eventually("the leaver pod Succeeded", Duration::from_secs(30), || {
        cloud.ok(&["get", "pod", "leaver", "-o", "jsonpath={.status.phase}"]) == "Succeeded"
    });
    eventually(
        "nothing of the finished pod left",
        Duration::from_secs(10),
        || processes(&left).is_empty(),
    );
    cloud.ok(&["delete", "pod", "stubborn", "--wait=false"]);
    eventually(
        "the stubborn sleep killed after the grace period",
        Duration::from_secs(20),
        || processes(&stubborn).is_empty(),
    );
    eventually(
        "the stubborn pod gone from the cloud",
        Duration::from_secs(20),
        || !cloud.kubectl(&["get", "pod", "stubborn"]).status.success(),
    );
    drop(edge);
}

const FINISHERS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: fails}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo start; exit 1"]
---
apiVersion: v1
kind: Pod
metadata: {name: succeeds}
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo start; exit 0"]
---
apiVersion: v1
kind: Pod
metadata: {name: crashes}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo start; exit 1"]
"#;

fn field(out: String) -> String {
    out.trim().to_owned()
}

fn phase_via(server: impl Fn(&[&str]) -> String, pod: &str) -> String {
    field(server(&[
        "get",
        "pod",
        pod,
        "-o",
        "jsonpath={.status.phase}",
    ]))
}

fn restarts_via(server: impl Fn(&[&str]) -> String, pod: &str) -> Option<u32> {
    field(server(&[
        "get",
        "pod",
        pod,
        "-o",
        "jsonpath={.status.containerStatuses[0].restartCount}",
    ]))
    .parse()
    .ok()
}

/// Lines "start" in the pod's logs, this instance's and the previous one's (CRI format:
/// `<time> <stream> <F|P> <content>`).
fn starts(edge_dir: &Path, pod: &str) -> usize {
    ["main.log", "main.previous.log"]
        .iter()
        .map(|file| {
            std::fs::read_to_string(edge_dir.join(format!("pods/default_{pod}/{file}")))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.splitn(4, ' ').nth(3) == Some("start"))
                .count()
        })
        .sum()
}

#[test]
fn finished_pods_stay_finished_and_restart_counts_never_drop_across_edgecore_restarts() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let dir = edge_dir.path();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let port = free_port();
    let mut edge = start_edge(&cloud, dir, port, Some(&token));
    wait_ready(&cloud);
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], FINISHERS)
        .status
        .success());

    let in_cloud = |args: &[&str]| stdout(&cloud.kubectl(args));
    eventually("fails Failed", Duration::from_secs(30), || {
        phase_via(in_cloud, "fails") == "Failed"
    });
    eventually("succeeds Succeeded", Duration::from_secs(30), || {
        phase_via(in_cloud, "succeeds") == "Succeeded"
    });
    eventually("crashes restarted twice", Duration::from_secs(30), || {
        restarts_via(in_cloud, "crashes").is_some_and(|n| n >= 2)
    });
    assert_eq!(starts(dir, "fails"), 1);
    assert_eq!(starts(dir, "succeeds"), 1);

    // The highest restart count anyone has seen so far; no later reading may be lower.
    let highest = std::cell::Cell::new(0);
    let seen = |n: Option<u32>, what: &str| {
        if let Some(n) = n {
            let high = highest.get();
            assert!(
                n >= high,
                "{what}: restartCount went back from {high} to {n}"
            );
            highest.set(n);
        }
    };

    // 1. edgecore killed and restarted with the cloud up.
    let at_node = |edge: &EdgeProcess, args: &[&str]| stdout(&edge.kubectl(args));
    seen(
        restarts_via(|a| at_node(&edge, a), "crashes"),
        "node before",
    );
    edge.kill9();
    edge = start_edge(&cloud, dir, port, None);
    let before = highest.get();
    eventually(
        "crashes restarted by the new edgecore",
        Duration::from_secs(30),
        || {
            let node = restarts_via(|a| at_node(&edge, a), "crashes");
            seen(node, "node after a restart");
            seen(restarts_via(in_cloud, "crashes"), "cloud after a restart");
            node.is_some_and(|n| n > before)
        },
    );
    throughout(Duration::from_secs(2), || {
        seen(restarts_via(|a| at_node(&edge, a), "crashes"), "node");
        assert_eq!(phase_via(|a| at_node(&edge, a), "fails"), "Failed");
        assert_eq!(phase_via(|a| at_node(&edge, a), "succeeds"), "Succeeded");
    });
    assert_eq!(starts(dir, "fails"), 1, "the Failed pod ran again");
    assert_eq!(starts(dir, "succeeds"), 1, "the Succeeded pod ran again");
    assert_eq!(phase_via(in_cloud, "fails"), "Failed");
    assert_eq!(phase_via(in_cloud, "succeeds"), "Succeeded");

    // 2. The cloud down while edgecore is killed and restarted: the same, from the node's own
    // records alone.
    eventually(
        "the node's restart count in the cloud",
        Duration::from_secs(30),
        || restarts_via(in_cloud, "crashes").is_some_and(|n| n >= before),
    );
    let highest_in_cloud = restarts_via(in_cloud, "crashes").unwrap_or(0);
    seen(restarts_via(|a| at_node(&edge, a), "crashes"), "node");
    cloud.kill9();
    edge.kill9();
    edge = start_edge(&cloud, dir, port, None);
    let before = highest.get();
    eventually(
        "crashes restarted by the new edgecore, offline",
        Duration::from_secs(30),
        || {
            let node = restarts_via(|a| at_node(&edge, a), "crashes");
            seen(node, "node after an offline restart");
            node.is_some_and(|n| n > before)
        },
    );
    throughout(Duration::from_secs(2), || {
        seen(
            restarts_via(|a| at_node(&edge, a), "crashes"),
            "node offline",
        );
        assert_eq!(phase_via(|a| at_node(&edge, a), "fails"), "Failed");
        assert_eq!(phase_via(|a| at_node(&edge, a), "succeeds"), "Succeeded");
    });
    assert_eq!(starts(dir, "fails"), 1, "the Failed pod ran again offline");
    assert_eq!(
        starts(dir, "succeeds"),
        1,
        "the Succeeded pod ran again offline"
    );

    // The cloud returns: it keeps the terminal phases and gets counts no lower than before.
    cloud.restart_after_kill9(&[]);
    let in_cloud = |args: &[&str]| stdout(&cloud.kubectl(args));
    eventually(
        "the offline restart count reaches the cloud",
        Duration::from_secs(40),
        || restarts_via(in_cloud, "crashes").is_some_and(|n| n > before),
    );
    let cloud_count = restarts_via(in_cloud, "crashes").unwrap_or(0);
    assert!(cloud_count >= highest_in_cloud);
    assert_eq!(phase_via(in_cloud, "fails"), "Failed");
    assert_eq!(phase_via(in_cloud, "succeeds"), "Succeeded");
    assert_eq!(starts(dir, "fails"), 1);
    assert_eq!(starts(dir, "succeeds"), 1);
    drop(edge);
}
