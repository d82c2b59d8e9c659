//! Many streams to one node at once: 100 followed logs (`GET .../log?follow=true`, as
//! `kubectl logs -f` asks) through the cloud, each its own QUIC stream on the node's link (more
//! than a link's default of 16 request streams), with cloudcore's and edgecore's memory
//! bounded, and all of them ending when their clients leave.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.5; done"]
"#;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A followed log over plain HTTP/1.1, read until its body shows a `tick` line.
fn follow(api: &str) -> TcpStream {
    let mut stream = TcpStream::connect(api.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(
            b"GET /api/v1/namespaces/default/pods/talker/log?follow=true&tailLines=1 HTTP/1.1\r\n\
              Host: kedge\r\n\r\n",
        )
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("tick ") {
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the followed log ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream
}

#[test]
fn a_hundred_followed_logs_on_one_node_keep_memory_bounded() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], POD)
        .status
        .success());
    eventually("talker Running", Duration::from_secs(40), || {
        cloud.ok(&["get", "pod", "talker", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    let api = cloud.api.clone();
    let (cloud_pid, edge_pid) = (cloud.child.id(), edge.child.id());
    // One follower first, so that both processes have their steady allocations.
    let warm = follow(&api);
    let before = (rss_kib(cloud_pid), rss_kib(edge_pid));
    let followers: Vec<TcpStream> = (0..100).map(|_| follow(&api)).collect();
    // All of them keep receiving new lines.
    for mut f in followers.iter().take(5) {
        let mut buf = [0u8; 4096];
        assert!(f.read(&mut buf).unwrap() > 0);
    }
    let during = (rss_kib(cloud_pid), rss_kib(edge_pid));
    eprintln!("RSS KiB (cloudcore, edgecore): 1 follower {before:?}, 101 followers {during:?}");
    // Each stream costs a few tens of KiB on either side, not megabytes.
    assert!(during.0 < before.0 + 40 * 1024, "{before:?} → {during:?}");
    assert!(during.1 < before.1 + 40 * 1024, "{before:?} → {during:?}");
    drop(followers);
    drop(warm);
    // Their streams end with their clients: an exec (one more stream) still works, at once.
    eventually(
        "an exec after the followers left",
        Duration::from_secs(20),
        || {
            kubectl(&api, &["exec", "talker", "--", "true"], None)
                .status
                .success()
        },
    );
}
