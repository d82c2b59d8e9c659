//! `kubectl port-forward` end to end: real kubectl (the WebSocket tunnel of
//! `SPDY/3.1+portforward.k8s.io`) against the cloud, each connection carried over the node's
//! QUIC link to a process-runtime pod's port; and against the node's MetaServer, offline.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// An echo server on each port of its arguments, printing `open PORT` and `closed PORT` for
/// each connection (so the test sees the pod's side of the connections in the pod's log).
const ECHO: &str = r#"
import socket, sys, threading
def handle(c, port):
    print("open", port, flush=True)
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
    print("closed", port, flush=True)
def serve(s, port):
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c, port), daemon=True).start()
for p in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(p)))
    s.listen(64)
    threading.Thread(target=serve, args=(s, int(p)), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"#;

struct PortForward {
    child: Child,
}

impl PortForward {
    /// `kubectl port-forward pod/echo PAIRS…` against `server`, once every local port accepts.
    fn start(server: &str, pairs: &[(u16, u16)]) -> PortForward {
        Self::start_with(server, pairs, true)
    }

    /// [`PortForward::start`] over the WebSocket tunnel (kubectl's default) or over a plain
    /// SPDY upgrade (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`, as kubectl before 1.30).
    fn start_with(server: &str, pairs: &[(u16, u16)], websocket: bool) -> PortForward {
        let child = Command::new("kubectl")
            .args(["--server", server, "port-forward", "pod/echo"])
            .args(pairs.iter().map(|(l, r)| format!("{l}:{r}")))
            .env("KUBECONFIG", "/dev/null")
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websocket.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut forward = PortForward { child };
        for (local, _) in pairs {
            let started = Instant::now();
            while TcpStream::connect(("127.0.0.1", *local)).is_err() {
                if forward.child.try_wait().unwrap().is_some() {
                    let mut err = String::new();
                    let _ = forward
                        .child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err);
                    panic!("kubectl port-forward {pairs:?} (websocket {websocket}) exited: {err}");
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "kubectl does not listen on {local} after 20 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        forward
    }

    /// Waits (bounded) for kubectl to exit and returns its stderr.
    fn exited(mut self, within: Duration) -> String {
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < within, "kubectl still runs");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        err
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket of kubelet's channel protocol to `pod/echo`'s `port` through `server`: the
/// messages it receives until `until` says stop (or the socket ends).
fn channel_session(
    server: &str,
    port: u16,
    send: &[u8],
    until: impl Fn(&[Vec<u8>]) -> bool,
) -> Vec<Vec<u8>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::Message;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = format!(
            "{}/api/v1/namespaces/default/pods/echo/portforward?ports={port}",
            server.replace("http://", "ws://")
        );
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut data = vec![0u8];
        data.extend_from_slice(send);
        ws.send(Message::Binary(data.into())).await.unwrap();
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !until(&received) {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Binary(bytes)))) => received.push(bytes.to_vec()),
                Ok(Some(Ok(_))) => {}
                Ok(_) => break,
                Err(_) => panic!("no answer within 20 s: {received:?}"),
            }
        }
        let _ = ws.close(None).await;
        received
    })
}

/// One echo through the channel protocol: the port on both channels first, then the echo.
fn channel_round(server: &str, port: u16, text: &str) {
    let received = channel_session(server, port, text.as_bytes(), |got| {
        got.iter()
            .skip(2)
            .any(|m| m.first() == Some(&0) && m[1..] == *text.as_bytes())
    });
    let [lo, hi] = port.to_le_bytes();
    assert_eq!(received[0], [0, lo, hi], "{received:?}");
    assert_eq!(received[1], [1, lo, hi], "{received:?}");
}

/// The error channel's text for a port nothing listens on (then the socket closes).
fn channel_round_refused(server: &str, port: u16) -> String {
    let received = channel_session(server, port, b"x", |got| {
        got.iter().skip(2).any(|m| m.first() == Some(&1))
    });
    let error = received
        .iter()
        .skip(2)
        .find(|m| m.first() == Some(&1))
        .unwrap();
    String::from_utf8_lossy(&error[1..]).into_owned()
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Sends `size` bytes (a pattern of `seed`) through the forwarded port while reading the echo,
/// checks it, then half-closes and expects the pod's close (EOF) after it.
fn echo_round(port: u16, seed: u8, size: usize) {
    let stream = connect(port);
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let writing = std::thread::spawn(move || {
        for piece in sent.chunks(16 * 1024) {
            writer.write_all(piece).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(size);
    let mut reader = stream;
    reader.read_to_end(&mut back).unwrap();
    writing.join().unwrap();
    assert_eq!(back.len(), size, "port {port}, seed {seed}");
    assert!(back == data, "port {port}, seed {seed}: the echo differs");
}

/// Lines of the echo pod's log that are exactly `line`.
fn log_count(kubectl_server: &str, line: &str) -> usize {
    let out = kubectl(kubectl_server, &["logs", "echo"], None);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| *l == line)
        .count()
}

#[test]
fn kubectl_port_forward_carries_several_ports_and_connections_and_cancels_both_ways() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    let (p1, p2) = (free_port(), free_port());
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"},
        "spec": {"containers": [{
            "name": "main", "image": "python",
            "command": ["python3", "-c", ECHO, p1.to_string(), p2.to_string()],
        }]},
    });
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &pod.to_string())
        .status
        .success());
    let api = cloud.api.clone();
    // kubectl port-forward refuses a pod whose status is not Running yet.
    eventually("the echo pod listens", Duration::from_secs(40), || {
        log_count(&api, "listening") == 1
            && cloud.ok(&["get", "pod", "echo", "-o", "jsonpath={.status.phase}"]) == "Running"
    });

    // Two ports, four connections on each at once, a megabyte each way on each.
    let (l1, l2) = (free_port(), free_port());
    let forward = PortForward::start(&api, &[(l1, p1), (l2, p2)]);
    let started = Instant::now();
    let rounds: Vec<_> = (0..8u8)
        .map(|i| {
            let port = if i % 2 == 0 { l1 } else { l2 };
            std::thread::spawn(move || echo_round(port, i, 1 << 20))
        })
        .collect();
    for round in rounds {
        round.join().unwrap();
    }
    eprintln!(
        "8 connections x 1 MiB each way through the cloud: {:?}",
        started.elapsed()
    );
    // Every connection the pod saw (the readiness probes' too) is closed on its side.
    eventually(
        "the pod closed every connection",
        Duration::from_secs(20),
        || {
            let opened =
                log_count(&api, &format!("open {p1}")) + log_count(&api, &format!("open {p2}"));
            let closed =
                log_count(&api, &format!("closed {p1}")) + log_count(&api, &format!("closed {p2}"));
            opened >= 8 && opened == closed
        },
    );

    // Many connections open at once (more than a link's default of 16 request streams): each
    // is its own stream, and all of them work.
    let mut many: Vec<TcpStream> = (0..40).map(|_| connect(l2)).collect();
    for (i, conn) in many.iter_mut().enumerate() {
        conn.write_all(format!("hello {i:02}").as_bytes()).unwrap();
    }
    for (i, conn) in many.iter_mut().enumerate() {
        let mut back = [0u8; 8];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(back, format!("hello {i:02}").as_bytes());
    }
    drop(many);

    // kubectl killed mid-connection: the pod's end of the connection closes.
    let mut open = connect(l1);
    open.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    open.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");
    let closed_before = log_count(&api, &format!("closed {p1}"));
    drop(forward); // SIGKILL
    let killed = Instant::now();
    eventually(
        "the pod's side of the connection closed after kubectl",
        Duration::from_secs(20),
        || log_count(&api, &format!("closed {p1}")) == closed_before + 1,
    );
    eprintln!("closed {:?} after kubectl was killed", killed.elapsed());
    drop(open);

    // The same over a plain SPDY upgrade (older kubectl, client-go's SPDY dialer).
    let l5 = free_port();
    let spdy = PortForward::start_with(&api, &[(l5, p1)], false);
    let rounds: Vec<_> = (0..3u8)
        .map(|i| std::thread::spawn(move || echo_round(l5, 50 + i, 256 * 1024)))
        .collect();
    for round in rounds {
        round.join().unwrap();
    }
    drop(spdy);

    // kubelet's channel protocol (v4.channel.k8s.io, `?ports=`), as other clients speak it.
    channel_round(&api, p1, &format!("hello on {p1}"));
    let refused = channel_round_refused(&api, free_port());
    assert!(
        refused.contains("failed to connect to localhost:"),
        "{refused}"
    );

    // Nothing listens on the port: kubectl is told why (kubelet's wording), and gives up.
    let nothing = free_port();
    let l3 = free_port();
    let failing = PortForward::start(&api, &[(l3, nothing)]);
    let mut probe = connect(l3);
    let mut buf = [0u8; 1];
    assert!(matches!(probe.read(&mut buf), Ok(0) | Err(_)));
    let err = failing.exited(Duration::from_secs(20));
    assert!(
        err.contains(&format!("failed to connect to localhost:{nothing}")),
        "{err}"
    );

    // A pod that does not exist: the API's 404 before any upgrade.
    let out = Command::new("kubectl")
        .args(["--server", &api, "port-forward", "pod/nope", "1:1"])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // On the node itself, with the cloud gone: MetaServer forwards too.
    cloud.kill9();
    let l4 = free_port();
    let local = PortForward::start(&edge.metaserver, &[(l4, p2)]);
    let rounds: Vec<_> = (0..4u8)
        .map(|i| std::thread::spawn(move || echo_round(l4, 100 + i, 256 * 1024)))
        .collect();
    for round in rounds {
        round.join().unwrap();
    }
    channel_round(&edge.metaserver, p2, &format!("hello on {p2} at the node"));
    let l6 = free_port();
    let local_spdy = PortForward::start_with(&edge.metaserver, &[(l6, p2)], false);
    echo_round(l6, 200, 256 * 1024);
    drop(local_spdy);
    let mut open = connect(l4);
    open.write_all(b"ping").unwrap();
    open.read_exact(&mut pong).unwrap();
    let meta = edge.metaserver.clone();
    let closed_before = log_count(&meta, &format!("closed {p2}"));
    drop(local);
    eventually(
        "the pod's side closed after a MetaServer kubectl",
        Duration::from_secs(20),
        || log_count(&meta, &format!("closed {p2}")) == closed_before + 1,
    );
}

#[test]
fn streams_past_the_per_node_limit_are_refused_with_429() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start_with(
        cloud_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &["--streams-per-node", "1"],
    );
    let token = token(&cloud);
    let _edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    let pod = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"},
        "spec": {"containers": [{"name": "main", "image": "busybox",
        "command": ["sh", "-c", "echo started; exec sleep 100000"]}]}}"#;
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], pod)
        .status
        .success());
    let api = cloud.api.clone();
    // Running as the node sees it too (a followed log of a container the node does not yet
    // know runs ends at once).
    eventually("the pod started", Duration::from_secs(40), || {
        log_count(&api, "started") == 1
            && cloud.ok(&["get", "pod", "echo", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    // A followed log holds the node's only stream.
    let mut follow = Command::new("kubectl")
        .args(["--server", &api, "logs", "-f", "echo"])
        .env("KUBECONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    follow
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"started\n");
    let exec = kubectl(&api, &["exec", "echo", "--", "true"], None);
    let err = String::from_utf8_lossy(&exec.stderr);
    assert!(!exec.status.success());
    assert!(err.contains("has 1 streams open"), "{err}");
    // Once the log's client is gone, the stream is free again.
    let _ = follow.kill();
    let _ = follow.wait();
    eventually("exec works again", Duration::from_secs(20), || {
        kubectl(&api, &["exec", "echo", "--", "true"], None)
            .status
            .success()
    });
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A pod that writes without end to whoever connects, and a client that stops reading: the
/// flow stops at the client (QUIC flow control end to end), cloudcore and edgecore buffer
/// nothing more; once the client reads again, the bytes flow again.
#[test]
fn a_client_that_stops_reading_grows_no_buffer_in_cloudcore_or_edgecore() {
    let cloud_dir = tempfile::tempdir().unwrap();
    let edge_dir = tempfile::tempdir().unwrap();
    let cloud = CloudProcess::start(cloud_dir.path());
    let token = token(&cloud);
    let edge = EdgeProcess::start(&cloud, "edge-1", edge_dir.path(), free_port(), Some(&token));
    let port = free_port();
    let flood = format!(
        "import socket, threading\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', {port})); s.listen(4)\n\
         chunk = bytes(1 << 20)\n\
         def send(c):\n    try:\n        while True: c.sendall(chunk)\n    except OSError: pass\n\
         print('listening', flush=True)\n\
         while True:\n    c, _ = s.accept(); threading.Thread(target=send, args=(c,), daemon=True).start()\n"
    );
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"},
        "spec": {"containers": [{"name": "main", "image": "python",
            "command": ["python3", "-c", flood]}]},
    });
    assert!(cloud
        .kubectl_stdin(&["apply", "-f", "-"], &pod.to_string())
        .status
        .success());
    let api = cloud.api.clone();
    eventually("the flood pod listens", Duration::from_secs(40), || {
        log_count(&api, "listening") == 1
            && cloud.ok(&["get", "pod", "echo", "-o", "jsonpath={.status.phase}"]) == "Running"
    });
    let local = free_port();
    let _forward = PortForward::start(&api, &[(local, port)]);
    let mut client = connect(local);
    let mut buf = vec![0u8; 1 << 20];
    client.read_exact(&mut buf).unwrap();
    // Everything in flight settles into its (bounded) buffers.
    std::thread::sleep(Duration::from_secs(2));
    let (cloud_pid, edge_pid) = (cloud.child.id(), edge.child.id());
    let before = (rss_kib(cloud_pid), rss_kib(edge_pid));
    std::thread::sleep(Duration::from_secs(3));
    let after = (rss_kib(cloud_pid), rss_kib(edge_pid));
    eprintln!(
        "RSS KiB (cloudcore, edgecore) while the client does not read: {before:?} → {after:?}"
    );
    // The pod writes about a gigabyte a second when it can: any unbounded buffer would show.
    assert!(
        after.0 < before.0 + 32 * 1024,
        "cloudcore grew {before:?} → {after:?}"
    );
    assert!(
        after.1 < before.1 + 32 * 1024,
        "edgecore grew {before:?} → {after:?}"
    );
    // And it flows again.
    for _ in 0..64 {
        client.read_exact(&mut buf).unwrap();
    }
}
