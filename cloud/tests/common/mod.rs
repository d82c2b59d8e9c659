//! Helpers for tests that run the real `cloudcore` binary and the real `kubectl`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary: cargo's path when this test belongs to its package, otherwise next to
/// this test's executable's directory (`target/<profile>/`), where `cargo test --workspace`
/// builds every member's binaries.
pub fn binary(name: &str) -> PathBuf {
    let own = match name {
        "cloudcore" => option_env!("CARGO_BIN_EXE_cloudcore"),
        "edgecore" => option_env!("CARGO_BIN_EXE_edgecore"),
        _ => None,
    };
    if let Some(path) = own {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --bins` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A free loopback port, free for both TCP and UDP (QUIC) when asked, and never handed out
/// twice in one test process: tests of one binary run in parallel threads, and a port one
/// test got but has not bound yet (an etcd member being restarted, a cloudcore not started)
/// must not go to another.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::net::UdpSocket;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("a bound port").port();
        if given.contains(&port) || UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.insert(port);
        return port;
    }
    panic!("no free loopback port in 1000 tries");
}

pub struct CloudProcess {
    pub child: Child,
    pub api: String,
    pub metrics: String,
    pub data_dir: PathBuf,
    pub quic_port: u16,
}

impl CloudProcess {
    /// Starts cloudcore on `data_dir` with fresh loopback ports and waits until its API answers.
    pub fn start(data_dir: &Path) -> CloudProcess {
        Self::start_on(data_dir, free_port(), free_port(), free_port())
    }

    /// Kills this cloudcore (SIGKILL) and starts another on the same data dir and ports.
    pub fn restart_after_kill9(&mut self, extra: &[&str]) {
        self.kill9();
        let port = |url: &str| {
            url.rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port")
        };
        let next = Self::start_with(
            &self.data_dir,
            port(&self.api),
            port(&self.metrics),
            self.quic_port,
            extra,
        );
        let old = std::mem::replace(self, next);
        drop(old); // already killed and reaped
    }

    pub fn start_on(
        data_dir: &Path,
        api_port: u16,
        metrics_port: u16,
        quic_port: u16,
    ) -> CloudProcess {
        Self::start_with(data_dir, api_port, metrics_port, quic_port, &[])
    }

    pub fn start_with(
        data_dir: &Path,
        api_port: u16,
        metrics_port: u16,
        quic_port: u16,
        extra: &[&str],
    ) -> CloudProcess {
        let child = Command::new(binary("cloudcore"))
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--quic-listen")
            .arg(format!("127.0.0.1:{quic_port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cloudcore");
        let process = CloudProcess {
            child,
            api: format!("http://127.0.0.1:{api_port}"),
            metrics: format!("127.0.0.1:{metrics_port}"),
            data_dir: data_dir.to_owned(),
            quic_port,
        };
        process.wait_ready();
        process
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_get(&self.api.replace("http://", ""), "/healthz")
                .is_some_and(|b| b.contains("ok"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cloudcore did not answer on {} within 30 s", self.api);
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.api, args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        kubectl(&self.api, args, Some(stdin))
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn kubectl(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new("kubectl");
    command
        .arg("--server")
        .arg(server)
        .arg("--request-timeout=20s")
        .args(args)
        // No kubeconfig of the machine's user may leak in.
        .env("KUBECONFIG", "/dev/null")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("kubectl is installed");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("kubectl output")
}

/// A minimal HTTP/1.1 GET (the tests need no HTTP client crate): the body, or `None`.
/// The sum of the cloud's metric lines starting with `name` (0 if none).
pub fn metric(cloud: &CloudProcess, name: &str) -> f64 {
    let text = http_get(&cloud.metrics, "/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn http_get(addr: &str, path: &str) -> Option<String> {
    // A bounded connect: a SYN dropped on the way (a NAT rule half installed) would otherwise
    // hold one attempt for the kernel's two minutes of retransmissions, and a retry needs a
    // fresh connection (a fresh conntrack entry), not the same one.
    let socket = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .ok()?
        .next()?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
}

/// One HTTP/1.0 request (the answer ends when the server closes): status and body.
pub fn http_call(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    read_response(&mut stream)
}

/// Sends `head` (request line and headers, without the blank line) and a body of `size`
/// bytes, with a `Content-Length` or chunked; returns the status (0: none) and the body. The
/// server may answer and close before the body is all sent: write errors are expected.
pub fn send_body(addr: &str, head: &str, size: usize, chunked: bool) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {size}")
    };
    let _ = write!(
        stream,
        "{head}\r\nHost: {addr}\r\nContent-Type: application/json\r\nConnection: close\r\n{framing}\r\n\r\n"
    );
    let piece = vec![b' '; 64 << 10];
    let mut sent = 0;
    while sent < size {
        let n = piece.len().min(size - sent);
        let written = if chunked {
            write!(stream, "{n:x}\r\n")
                .and_then(|()| stream.write_all(&piece[..n]))
                .and_then(|()| stream.write_all(b"\r\n"))
        } else {
            stream.write_all(&piece[..n])
        };
        if written.is_err() {
            break;
        }
        sent += n;
    }
    if chunked && sent >= size {
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    read_response(&mut stream)
}

pub fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// A watch over plain HTTP/1.0 (no chunked framing: the body is the newline-delimited events
/// and ends when the server closes).
pub struct RawWatch {
    pub status: u16,
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl RawWatch {
    /// Opens `path` on `addr` (`127.0.0.1:port`) and reads the answer's head (within 10 s).
    pub fn open(addr: &str, path: &str) -> RawWatch {
        use std::io::BufRead;
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut reader = std::io::BufReader::new(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut status = 0;
        while Instant::now() < deadline {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) if line == "\r\n" => break,
                Ok(_) if status == 0 => {
                    status = line
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                }
                _ => {}
            }
        }
        RawWatch { status, reader }
    }

    /// The next event, or `None` if none comes within `within` (or the stream ended).
    pub fn next(&mut self, within: Duration) -> Option<serde_json::Value> {
        use std::io::BufRead;
        let deadline = Instant::now() + within;
        let mut line = String::new();
        while Instant::now() < deadline {
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) if line.ends_with('\n') => return serde_json::from_str(&line).ok(),
                _ => {}
            }
        }
        None
    }

    /// Events until none comes for `quiet` (at most 100).
    pub fn drain(&mut self, quiet: Duration) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        while events.len() < 100 {
            match self.next(quiet) {
                Some(event) => events.push(event),
                None => break,
            }
        }
        events
    }

    /// Events until one of type `kind` for `name` (included), within `within` in all.
    pub fn until(&mut self, kind: &str, name: &str, within: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        while Instant::now() < deadline && events.len() < 100 {
            let Some(event) = self.next(deadline.saturating_duration_since(Instant::now())) else {
                break;
            };
            let done = event["type"] == kind
                && event["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    == name;
            events.push(event);
            if done {
                break;
            }
        }
        events
    }
}

/// `(type, name)` of each event, for assertions.
pub fn event_summary(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}
