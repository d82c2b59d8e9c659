//! cloudcore's kubelet-compatible endpoint in cluster mode (`--kubeconfig`): the cluster's
//! kube-apiserver reaches edge pods for `kubectl logs|exec|port-forward` by calling the "kubelet"
//! a Node's status names, which cloudcore points at itself.
//!
//! No kube-apiserver runs here, so the cluster is another cloudcore's embedded API (A), and a
//! small proxy in this test plays kube-apiserver's part of those verbs as kube-apiserver does
//! it: a pod's `log`, `exec`, `attach` and `portforward` become a call to
//! `https://ADDRESS:PORT/containerLogs|exec|attach|portForward/…` of the Node's
//! `InternalIP` and `daemonEndpoints.kubeletEndpoint.Port`, with a client certificate of the
//! cluster's CA, and upgrades (SPDY) pass through; everything else goes to A. kubectl talks to
//! the proxy as to its cluster.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn workload(http_port: u16) -> String {
    format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{mode: mirrored}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: python
    command: ["sh", "-c", "echo mode=$MODE; exec python3 -m http.server {http_port} --bind 127.0.0.1"]
    env:
    - name: MODE
      valueFrom: {{configMapKeyRef: {{name: settings, key: mode}}}}
"#
    )
}

/// kube-apiserver's part of logs, exec, attach and port-forward, in front of cluster A.
struct ApiServerProxy {
    url: String,
    _runtime: tokio::runtime::Runtime,
}

impl ApiServerProxy {
    fn start(cluster: &str, kubelet: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cluster = cluster.trim_start_matches("http://").to_owned();
        let connector = tokio_rustls::TlsConnector::from(tls);
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (cluster, connector) = (cluster.clone(), connector.clone());
                tokio::spawn(async move {
                    if let Err(e) = proxy(client, &cluster, kubelet, connector).await {
                        eprintln!("proxy: {e}");
                    }
                });
            }
        });
        ApiServerProxy {
            url,
            _runtime: runtime,
        }
    }

    /// kubectl with this "kube-apiserver" as its server, speaking SPDY for exec and
    /// port-forward (what kube-apiserver passes through to a kubelet as it is).
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command
            .args(["--server", &self.url])
            .args(args)
            .env("KUBECONFIG", "/dev/null")
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
        command
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        let mut command = self.command(&["--request-timeout=20s"]);
        command.args(args).output().expect("kubectl")
    }
}

/// The kubelet path of an API request for a pod's `log`, `exec`, `attach` or `portforward`,
/// with the query in kubelet's names (`stdin` → `input`, …, the container in the path).
fn kubelet_target(target: &str) -> Option<String> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", namespace, "pods", pod, subresource] = parts[..] else {
        return None;
    };
    let mut container = String::new();
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = match key {
            "container" => {
                container = value.to_owned();
                continue;
            }
            "stdin" => "input",
            "stdout" => "output",
            "stderr" => "error",
            other => other,
        };
        pairs.push(format!("{key}={value}"));
    }
    let query = pairs.join("&");
    let path = match subresource {
        "log" => format!("/containerLogs/{namespace}/{pod}/{container}"),
        "exec" => format!("/exec/{namespace}/{pod}/{container}"),
        "attach" => format!("/attach/{namespace}/{pod}/{container}"),
        "portforward" => format!("/portForward/{namespace}/{pod}"),
        _ => return None,
    };
    Some(format!("{path}?{query}"))
}

/// One client connection: its first request decides where it goes. Plain requests get
/// `Connection: close`, so that each connection carries one request; upgrades pass through.
async fn proxy(
    mut client: TcpStream,
    cluster: &str,
    kubelet: SocketAddr,
    connector: tokio_rustls::TlsConnector,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 1 << 16 {
            return Ok(());
        }
    };
    let body = head.split_off(end);
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split(' ');
    let (method, target, version) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let headers: Vec<&str> = lines.collect();
    let named = |h: &str, name: &str| {
        h.split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
    };
    let upgrade = headers.iter().any(|h| named(h, "upgrade"));
    let kubelet_target = kubelet_target(target);
    let mut out = format!(
        "{method} {} {version}\r\n",
        kubelet_target.as_deref().unwrap_or(target)
    );
    for header in &headers {
        if (!upgrade && named(header, "connection")) || named(header, "host") {
            continue;
        }
        out.push_str(header);
        out.push_str("\r\n");
    }
    if !upgrade {
        out.push_str("Connection: close\r\n");
    }
    match kubelet_target {
        Some(_) => {
            out.push_str(&format!("Host: {kubelet}\r\n\r\n"));
            let tcp = TcpStream::connect(kubelet).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut server = connector.connect(name, tcp).await?;
            server.write_all(out.as_bytes()).await?;
            server.write_all(&body).await?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        }
        None => {
            out.push_str(&format!("Host: {cluster}\r\n\r\n"));
            let mut server = TcpStream::connect(cluster).await?;
            server.write_all(out.as_bytes()).await?;
            server.write_all(&body).await?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await?;
        }
    }
    Ok(())
}

/// A TLS client of the kubelet endpoint: trusts `server_ca`, presents `name.crt`.
fn client_tls(server_ca: &Path, dir: &Path, name: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(server_ca).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// `curl` against the kubelet endpoint with `name`'s certificate (none if `None`).
fn curl(server_ca: &Path, dir: &Path, name: Option<&str>, url: &str, extra: &[&str]) -> Output {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--fail-with-body", "--max-time", "20", "--cacert"])
        .arg(server_ca);
    if let Some(name) = name {
        command
            .arg("--cert")
            .arg(dir.join(format!("{name}.crt")))
            .arg("--key")
            .arg(dir.join(format!("{name}.key")));
    }
    command.args(extra).arg(url).output().expect("curl")
}

#[test]
fn the_clusters_apiserver_reaches_edge_pods_through_the_kubelet_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    // The cluster's CA, kube-apiserver's kubelet client certificate and a node's certificate.
    test_certificates(
        certs,
        &[
            (
                "apiserver-kubelet-client",
                "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client",
                "extendedKeyUsage=clientAuth\n",
            ),
            (
                "node",
                "/O=system:nodes/CN=system:node:edge-2",
                "extendedKeyUsage=clientAuth\n",
            ),
        ],
    );
    let (a_dir, b_dir, edge_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cluster = CloudProcess::start(a_dir.path());
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {{server: \"{}\"}}\n\
             contexts:\n- name: a\n  context: {{cluster: a, user: a}}\nusers:\n- name: a\n  \
             user: {{}}\ncurrent-context: a\n",
            cluster.api
        ),
    )
    .unwrap();
    let kubelet_port = free_port();
    let mirror = CloudProcess::start_with(
        b_dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--kubelet-listen",
            &format!("127.0.0.1:{kubelet_port}"),
            "--kubelet-client-ca",
            certs.join("ca.crt").to_str().unwrap(),
        ],
    );
    let server_ca = b_dir.path().join("pki/ca.crt");
    let token = token(&mirror);
    let _edge = EdgeProcess::start_with(
        &mirror,
        "edge-1",
        edge_dir.path(),
        free_port(),
        Some(&token),
        &[],
    );

    // The Node in the cluster names cloudcore's kubelet endpoint.
    eventually(
        "edge-1 in the cluster with cloudcore's kubelet endpoint",
        Duration::from_secs(30),
        || {
            let out = cluster.kubectl(&[
                "get",
                "node",
                "edge-1",
                "-o",
                "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}|{.status.daemonEndpoints.kubeletEndpoint.Port}",
            ]);
            text(&out) == format!("127.0.0.1|{kubelet_port}")
        },
    );
    let http_port = free_port();
    let out = cluster.kubectl_stdin(&["apply", "-f", "-"], &workload(http_port));
    assert!(out.status.success(), "{}", stderr_of(&out));
    eventually(
        "the pod Running in the cluster",
        Duration::from_secs(30),
        || {
            text(&cluster.kubectl(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]))
                == "Running"
        },
    );

    // kube-apiserver's client certificate is taken; none, or a node's, is refused.
    let kubelet = format!("https://127.0.0.1:{kubelet_port}");
    let client = Some("apiserver-kubelet-client");
    let logs_url = format!("{kubelet}/containerLogs/default/web/main");
    eventually(
        "the container's log through the kubelet endpoint",
        Duration::from_secs(20),
        || stdout(&curl(&server_ca, certs, client, &logs_url, &[])).contains("mode=mirrored"),
    );
    for (who, name) in [("no certificate", None), ("a node's", Some("node"))] {
        let out = curl(&server_ca, certs, name, &logs_url, &[]);
        assert!(!out.status.success(), "{who} was let in: {}", stdout(&out));
        assert!(
            !stdout(&out).contains("mode=mirrored"),
            "{who} read the log"
        );
    }

    // Resource metrics and the Summary API, for the node the Host header names.
    eventually(
        "the pod's resource metrics",
        Duration::from_secs(30),
        || {
            let out = curl(
                &server_ca,
                certs,
                client,
                &format!("{kubelet}/metrics/resource"),
                &["-H", "Host: edge-1"],
            );
            let metrics = stdout(&out);
            metrics.contains("node_cpu_usage_seconds_total ")
                && metrics.contains(
                    "container_memory_working_set_bytes{container=\"main\",namespace=\"default\",pod=\"web\"}",
                )
        },
    );
    let out = curl(
        &server_ca,
        certs,
        client,
        &format!("{kubelet}/stats/summary?node=edge-1"),
        &[],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(summary["node"]["nodeName"], "edge-1", "{summary}");
    assert!(
        summary["node"]["cpu"]["usageCoreNanoSeconds"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{summary}"
    );
    let out = curl(
        &server_ca,
        certs,
        client,
        &format!("{kubelet}/stats/summary"),
        &["-H", "Host: nowhere"],
    );
    assert!(
        stdout(&out).contains("?node=NAME"),
        "an unknown host is explained: {}",
        stdout(&out)
    );

    // kubectl through "kube-apiserver": logs, exec (SPDY, as kube-apiserver speaks to
    // kubelets), port-forward.
    let apiserver = ApiServerProxy::start(
        &cluster.api,
        format!("127.0.0.1:{kubelet_port}").parse().unwrap(),
        client_tls(&server_ca, certs, "apiserver-kubelet-client"),
    );
    let out = apiserver.kubectl(&["logs", "web"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(text(&out).contains("mode=mirrored"), "{}", text(&out));
    let out = apiserver.kubectl(&["exec", "web", "--", "sh", "-c", "echo in-$MODE; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert_eq!(text(&out), "in-mirrored");
    let out = Command::new("kubectl")
        .args([
            "--server",
            &apiserver.url,
            "exec",
            "-i",
            "web",
            "--",
            "wc",
            "-c",
        ])
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&[b'x'; 100_000])?;
            child.wait_with_output()
        })
        .expect("kubectl exec -i");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(text(&out), "100000", "stdin through the kubelet endpoint");

    let local = free_port();
    let mut forward = apiserver
        .command(&["port-forward", "pod/web", &format!("{local}:{http_port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kubectl port-forward");
    eventually(
        "the pod's HTTP server through port-forward",
        Duration::from_secs(20),
        || {
            Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(format!("http://127.0.0.1:{local}/"))
                .output()
                .is_ok_and(|o| stdout(&o) == "200")
        },
    );
    let _ = forward.kill();
    let _ = forward.wait();
}
