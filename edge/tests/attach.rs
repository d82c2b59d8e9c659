//! `kubectl attach` end to end: real kubectl (WebSocket, v5.channel.k8s.io) against the cloud
//! (carried over the node's QUIC link) and against MetaServer, to process-runtime containers:
//! output followed as it is written, stdin of a `stdin: true` container, `stdinOnce`, the
//! terminal of a `tty: true` container.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "i=0; while true; do echo tick $i; echo tock $i >&2; i=$((i+1)); sleep 0.2; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: listener}
spec:
  containers:
  - name: main
    image: busybox
    stdin: true
    command: ["sh", "-c", "while read line; do echo \"got $line\"; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: once}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    stdin: true
    stdinOnce: true
    command: ["sh", "-c", "cat; echo stdin closed"]
---
apiVersion: v1
kind: Pod
metadata: {name: terminal}
spec:
  containers:
  - name: main
    image: busybox
    stdin: true
    tty: true
    command: ["sh", "-c", "while read line; do echo \"got $line on $(tty) size $(stty size)\"; done"]
"#;

/// Starts `kubectl attach ARGS…` against `server` and hands its stdout lines to a channel.
fn attach(
    server: &str,
    args: &[&str],
    stdin: bool,
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = Command::new("kubectl")
        .args(["--server", server, "attach"])
        .args(args)
        .env("KUBECONFIG", "/dev/null")
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits (at most 20 s) for a line that satisfies `want`.
fn expect_line(lines: &mpsc::Receiver<String>, want: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if want(&line) => return line,
            Ok(_) => {}
            Err(e) => panic!("no expected line from kubectl attach: {e}"),
        }
    }
}

#[test]
fn kubectl_attach_follows_output_and_writes_stdin() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], PODS)
        .status
        .success());
    for pod in ["talker", "listener", "once", "terminal"] {
        eventually(&format!("{pod} Running"), Duration::from_secs(40), || {
            cloud.ok(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]) == "Running"
        });
    }
    let api = cloud.api.clone();

    // Output as it is written (only what comes after attaching), stdout on stdout.
    let (mut talker, lines) = attach(&api, &["talker"], false);
    let first = expect_line(&lines, |l| l.starts_with("tick "));
    let n: u64 = first[5..].parse().unwrap();
    expect_line(&lines, |l| l == format!("tick {}", n + 2));
    let _ = talker.kill();
    let _ = talker.wait();
    // The container does not go with the client.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cloud.ok(&["get", "pod", "talker", "-o", "jsonpath={.status.phase}"]),
        "Running"
    );

    // stdin of a `stdin: true` container, through two sessions one after the other.
    for word in ["hello", "again"] {
        let (mut session, lines) = attach(&api, &["-i", "listener"], true);
        let mut input = session.stdin.take().unwrap();
        // The session may not be up yet when kubectl starts: repeat until the echo shows.
        let sender = std::thread::spawn(move || {
            for _ in 0..100 {
                if input.write_all(format!("{word}\n").as_bytes()).is_err() {
                    return;
                }
                let _ = input.flush();
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        expect_line(&lines, |l| l == format!("got {word}"));
        let _ = session.kill();
        let _ = session.wait();
        let _ = sender.join();
    }

    // stdinOnce: the end of the first session's input closes the container's stdin, and the
    // session ends with the container (kubectl exits 0 with its output).
    let mut once = Command::new("kubectl")
        .args(["--server", &api, "attach", "-i", "once"])
        .env("KUBECONFIG", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Input that ends before the session is up is still delivered (the link's stream queues
    // it until the node reads), then its end closes the container's stdin.
    let mut input = once.stdin.take().unwrap();
    input.write_all(b"bye\n").unwrap();
    drop(input);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(once.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("kubectl attach ends with the container")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("bye") && text.contains("stdin closed"),
        "{text} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("once Succeeded", Duration::from_secs(20), || {
        cloud.ok(&["get", "pod", "once", "-o", "jsonpath={.status.phase}"]) == "Succeeded"
    });

    // A `tty: true` container: kubectl attach -it (given a terminal of 111×33 by script(1))
    // reaches the container's terminal: input, raw output, the window size.
    let mut session = Command::new("script")
        .args([
            "-qec",
            &format!("stty cols 111 rows 33; kubectl --server {api} attach -it terminal"),
            "/dev/null",
        ])
        .env("KUBECONFIG", "/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..100 {
            if input.write_all(b"hello\n").is_err() {
                return;
            }
            let _ = input.flush();
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (tx, lines) = mpsc::channel();
    let out = session.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let line = expect_line(&lines, |l| l.contains("got hello on /dev/pts/"));
    // kubectl sends the window size on its own stream: a later line has it for sure.
    let sized = expect_line(&lines, |l| {
        l.contains("got hello") && l.contains("size 33 111")
    });
    assert!(!line.contains("not a tty"), "{line}");
    let _ = session.kill();
    let _ = session.wait();
    drop(lines);
    let _ = sender.join();
    assert!(sized.contains("/dev/pts/"), "{sized}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cloud.ok(&["get", "pod", "terminal", "-o", "jsonpath={.status.phase}"]),
        "Running",
        "the container does not go with the client"
    );
    let logged = cloud.ok(&["logs", "terminal", "--tail=1"]);
    assert!(logged.contains("got hello on /dev/pts/"), "{logged}");

    // On the node itself with the cloud gone: MetaServer attaches too.
    cloud.kill9();
    let (mut local, lines) = attach(&edge.metaserver, &["talker"], false);
    expect_line(&lines, |l| l.starts_with("tick "));
    let _ = local.kill();
    let _ = local.wait();
}
