//! The kubelet-compatible endpoint of cloudcore in cluster mode (`--kubeconfig`): a real
//! kube-apiserver reaches edge pods through cloudcore, with no iptables rule and no tunnel
//! port of its own (KubeEdge's CloudStream needs both).
//!
//! kube-apiserver serves `kubectl logs|exec|attach|port-forward` by calling the pod's kubelet
//! at `https://ADDRESS:PORT`, `ADDRESS` from the Node's `status.addresses` and `PORT` from its
//! `status.daemonEndpoints.kubeletEndpoint.Port`. In cluster mode cloudcore writes its own
//! address (`--kubelet-address`) and this endpoint's port there for each edge node
//! ([`NodeEndpoint::rewrite`]), so those calls land here and go on over the node's QUIC link,
//! as CloudStream's ([`crate::cloudstream`]):
//! - `GET /containerLogs/{namespace}/{pod}/{container}?follow&tailLines&sinceSeconds&sinceTime&timestamps&previous&limitBytes`;
//! - `GET|POST /exec/{namespace}/{pod}/{container}?command=…&input=1&output=1&error=1&tty=1`
//!   and `/attach/…`: the remote-command protocol over `Upgrade: SPDY/3.1` (what
//!   kube-apiserver ≥ 1.30 speaks to kubelets, also for kubectl's WebSocket) or WebSocket;
//! - `GET|POST /portForward/{namespace}/{pod}`: port-forward over SPDY or WebSocket;
//! - `GET /metrics/resource` (Prometheus text, kubelet's resource metrics, what metrics-server
//!   scrapes) and `GET /stats/summary` (the Summary API's node and pods CPU and memory), for
//!   the node the request's `Host` names: every edge node shares this address, so these need
//!   the node's name as host (metrics-server with `--kubelet-preferred-address-types=Hostname`
//!   and edge node names resolving to cloudcore), or `?node=NAME`;
//! - `GET /healthz`.
//!
//! Clients authenticate with a certificate of the cluster's CA (kube-apiserver's
//! `--kubelet-client-certificate`; the CA is the kubeconfig's, or `--kubelet-client-ca`):
//! no certificate, no TLS session. Certificates of nodes (`CN=system:node:…`, kubelets'
//! own) are refused: a node's kubelet must not reach another node's pods.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use replication::api::remote::ApiReply;
use replication::api::ApiError;
use replication::ObjectKey;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use transport::stream::Subresource;
use transport::usage::UsageReport;

use crate::cloudstream::{self, StreamState};

/// kubelet's default port is 10250; KubeEdge's stream tunnel listens on 10350. This one is
/// neither, so that it runs beside both on a test machine.
pub const DEFAULT_PORT: u16 = 10351;

/// Where kube-apiserver reaches edge nodes' "kubelet": written into each edge Node's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeEndpoint {
    /// cloudcore's address as the cluster reaches it (the Node's `InternalIP`).
    pub address: IpAddr,
    /// This endpoint's port (`daemonEndpoints.kubeletEndpoint.Port`).
    pub port: u16,
}

impl NodeEndpoint {
    /// Puts this endpoint into a Node's `status` (a JSON object): `InternalIP` becomes
    /// `address` (other address types are kept) and the kubelet port becomes `port`.
    pub fn rewrite(&self, status: &mut Value) {
        let Some(status) = status.as_object_mut() else {
            return;
        };
        let mut addresses: Vec<Value> = status
            .get("addresses")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|a| a.get("type").and_then(Value::as_str) != Some("InternalIP"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        addresses.insert(
            0,
            json!({"type": "InternalIP", "address": self.address.to_string()}),
        );
        status.insert("addresses".into(), Value::Array(addresses));
        status.insert(
            "daemonEndpoints".into(),
            json!({"kubeletEndpoint": {"Port": self.port}}),
        );
    }
}

/// The endpoint's TLS: a server certificate of kedge's CA for `names`, client certificates
/// required and verified against `client_cas`, node certificates refused.
///
/// # Errors
/// A CA rustls does not accept, or none at all.
pub fn tls_config(
    identity: &transport::Identity,
    client_cas: &[CertificateDer<'static>],
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    anyhow::ensure!(
        !client_cas.is_empty(),
        "no CA for the kubelet endpoint's clients"
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in client_cas {
        roots.add(ca.clone())?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(NotANode(verifier)))
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    // Upgrades (exec, attach, port-forward) are HTTP/1.1's.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads the certificates of a PEM file (a CA bundle).
///
/// # Errors
/// The file cannot be read or holds no certificate.
pub fn read_cas(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let text = std::fs::read(path)?;
    let cas: Vec<_> = CertificateDer::pem_slice_iter(&text).collect::<Result<_, _>>()?;
    anyhow::ensure!(!cas.is_empty(), "{} holds no certificate", path.display());
    Ok(cas)
}

/// A client verifier that refuses certificates of nodes (`CN=system:node:…`).
#[derive(Debug)]
struct NotANode(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for NotANode {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        let node = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .ok()
            .and_then(|(_, cert)| {
                cert.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok().map(str::to_owned))
            })
            .is_some_and(|cn| cn.starts_with("system:node:"));
        if node {
            return Err(rustls::Error::General(
                "a node's certificate may not use the kubelet endpoint".into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The endpoint's routes; `streams` is CloudStream's state (its per-node stream limit is
/// shared with the API's streams), without the API's bearer token.
pub fn router(streams: StreamState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
        .route(
            "/attach/{namespace}/{pod}/{container}",
            get(attach).post(attach),
        )
        .route(
            "/portForward/{namespace}/{pod}",
            get(cloudstream::portforward).post(cloudstream::portforward_spdy),
        )
        .route("/metrics/resource", get(metrics_resource))
        .route("/stats/summary", get(stats_summary))
        .with_state(streams.without_token())
}

fn error(e: ApiError) -> Response {
    ApiReply::error(&e).into_response()
}

/// kubelet's query (`input`, `output`, `error`, `tty`, `command`, log options) in the API's
/// names, with the container from the path.
fn api_query(query: Option<&str>, container: &str) -> String {
    let mut pairs: Vec<String> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = match key {
                "input" => "stdin",
                "output" => "stdout",
                "error" => "stderr",
                "container" => return None,
                other => other,
            };
            Some(format!("{key}={value}"))
        })
        .collect();
    pairs.push(format!(
        "container={}",
        form_urlencoded_byte_serialize(container)
    ));
    pairs.join("&")
}

fn form_urlencoded_byte_serialize(value: &str) -> String {
    serde_urlencoded::to_string([("v", value)])
        .map(|s| s[2..].to_owned())
        .unwrap_or_default()
}

async fn container_logs(
    State(streams): State<StreamState>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let query = api_query(query.as_deref(), &container);
    cloudstream::log_stream(&streams, namespace, pod, query).await
}

async fn exec(
    State(streams): State<StreamState>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let query = api_query(query.as_deref(), &container);
    cloudstream::remote_command(Subresource::Exec, &streams, namespace, pod, query, request).await
}

async fn attach(
    State(streams): State<StreamState>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let query = api_query(query.as_deref(), &container);
    cloudstream::remote_command(
        Subresource::Attach,
        &streams,
        namespace,
        pod,
        query,
        request,
    )
    .await
}

/// The node a metrics request is for: `?node=` or the `Host` header (without its port), which
/// must name a Node the store holds.
fn node_of(
    streams: &StreamState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<String, ApiError> {
    let asked = query
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("node="))
        .map(str::to_owned);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            // `name:port`, `[v6]:port` or a bare host.
            let h = h
                .rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map_or(h, |(h, _)| h);
            h.trim_start_matches('[').trim_end_matches(']').to_owned()
        });
    let name = asked.or(host).unwrap_or_default();
    let known = ObjectKey::new("nodes", "", &name)
        .ok()
        .and_then(|key| streams.store().get(&key).ok().flatten())
        .is_some();
    if known {
        return Ok(name);
    }
    Err(ApiError::new(
        404,
        replication::api::StatusReason::NotFound,
        format!(
            "this endpoint serves every edge node of cloudcore; {name:?} is not one: ask with \
             the node's name as host (metrics-server: --kubelet-preferred-address-types=Hostname, \
             edge node names resolving to cloudcore) or ?node=NAME"
        ),
    ))
}

/// The node's usage report, or 503 when it is not connected or did not answer.
async fn report(streams: &StreamState, node: &str) -> Result<UsageReport, ApiError> {
    crate::top::ask(streams.bus(), node).await.ok_or_else(|| {
        ApiError::unavailable(format!(
            "node {node} is not connected or did not answer within {:?}",
            crate::top::ASK_TIMEOUT
        ))
    })
}

/// Milliseconds since the Unix epoch of a report's RFC 3339 timestamp (now if unreadable).
fn report_millis(report: &UsageReport) -> i128 {
    time::OffsetDateTime::parse(
        &report.timestamp,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
    .unix_timestamp_nanos()
        / 1_000_000
}

/// kubelet's `/metrics/resource` (Prometheus text format 0.0.4) for one node: the node's,
/// each pod's and each container's cumulative CPU seconds and working-set bytes, stamped
/// with the report's time.
pub fn resource_metrics(report: &UsageReport) -> String {
    use std::fmt::Write;
    let at = report_millis(report);
    let seconds = |ns: u64| ns as f64 / 1e9;
    let mut text = String::new();
    let mut section = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(text, "# HELP {name} [STABLE] {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(text, "{name}{labels} {value} {at}");
        }
    };
    section(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
        vec![(String::new(), seconds(report.node.cpu_core_nanoseconds))],
    );
    section(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
        vec![(String::new(), report.node.memory_bytes as f64)],
    );
    let pod_labels = |ns: &str, pod: &str| format!("{{namespace=\"{ns}\",pod=\"{pod}\"}}");
    let container_labels = |c: &str, ns: &str, pod: &str| {
        format!("{{container=\"{c}\",namespace=\"{ns}\",pod=\"{pod}\"}}")
    };
    let containers = || {
        report.pods.iter().flat_map(|p| {
            p.containers
                .iter()
                .map(move |c| (container_labels(&c.name, &p.namespace, &p.name), c.usage))
        })
    };
    section(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
        containers()
            .map(|(l, u)| (l, seconds(u.cpu_core_nanoseconds)))
            .collect(),
    );
    section(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
        containers()
            .map(|(l, u)| (l, u.memory_bytes as f64))
            .collect(),
    );
    let pods = || {
        report.pods.iter().map(|p| {
            let total = p.total();
            (
                pod_labels(&p.namespace, &p.name),
                total.cpu_core_nanoseconds,
                total.memory_bytes,
            )
        })
    };
    section(
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
        pods().map(|(l, cpu, _)| (l, seconds(cpu))).collect(),
    );
    section(
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
        pods().map(|(l, _, memory)| (l, memory as f64)).collect(),
    );
    let _ = writeln!(
        text,
        "# HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise\n# TYPE scrape_error gauge\nscrape_error 0"
    );
    text
}

/// kubelet's `/stats/summary` (`stats/v1alpha1` Summary) for one node: CPU (`usageNanoCores`,
/// `usageCoreNanoSeconds`) and memory (`workingSetBytes`) of the node, its pods and their
/// containers.
pub fn summary(node: &str, report: &UsageReport) -> Value {
    let usage = |u: &transport::usage::Usage| {
        json!({
            "cpu": {"time": report.timestamp, "usageNanoCores": u.cpu_nanocores,
                    "usageCoreNanoSeconds": u.cpu_core_nanoseconds},
            "memory": {"time": report.timestamp, "workingSetBytes": u.memory_bytes},
        })
    };
    let pods: Vec<Value> = report
        .pods
        .iter()
        .map(|p| {
            let mut pod = usage(&p.total());
            pod["podRef"] = json!({"name": p.name, "namespace": p.namespace});
            pod["containers"] = p
                .containers
                .iter()
                .map(|c| {
                    let mut container = usage(&c.usage);
                    container["name"] = json!(c.name);
                    container
                })
                .collect();
            pod
        })
        .collect();
    let mut node_stats = usage(&report.node);
    node_stats["nodeName"] = json!(node);
    json!({"node": node_stats, "pods": pods})
}

async fn metrics_resource(
    State(streams): State<StreamState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    answer_for_node(&streams, &headers, query, |_, report| {
        ("text/plain; version=0.0.4", resource_metrics(report))
    })
    .await
}

async fn stats_summary(
    State(streams): State<StreamState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    answer_for_node(&streams, &headers, query, |node, report| {
        ("application/json", summary(node, report).to_string())
    })
    .await
}

/// 200 with what `render` makes of the usage report of the node the request names
/// (`(content type, body)`), or the error of finding the node or its report.
async fn answer_for_node(
    streams: &StreamState,
    headers: &HeaderMap,
    query: Option<String>,
    render: impl FnOnce(&str, &UsageReport) -> (&'static str, String),
) -> Response {
    let node = match node_of(streams, headers, query.as_deref()) {
        Ok(node) => node,
        Err(e) => return error(e),
    };
    match report(streams, &node).await {
        Ok(report) => {
            let (content_type, body) = render(&node, &report);
            (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Err(e) => error(e),
    }
}

/// What a listen address means for the Node's `InternalIP` when `--kubelet-address` is not
/// given: the address itself, or loopback for an unspecified one.
pub fn default_address(listen: SocketAddr) -> IpAddr {
    if listen.ip().is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::usage::{ContainerUsage, PodUsage, Usage};

    #[test]
    fn a_node_status_points_at_the_endpoint_and_keeps_other_addresses() {
        let mut status = json!({
            "addresses": [
                {"type": "InternalIP", "address": "10.0.0.7"},
                {"type": "Hostname", "address": "edge-1"},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        });
        NodeEndpoint {
            address: "192.0.2.1".parse().unwrap(),
            port: 10351,
        }
        .rewrite(&mut status);
        assert_eq!(
            status,
            json!({
                "addresses": [
                    {"type": "InternalIP", "address": "192.0.2.1"},
                    {"type": "Hostname", "address": "edge-1"},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10351}},
            })
        );
    }

    #[test]
    fn kubelet_queries_become_the_apis() {
        assert_eq!(
            api_query(
                Some("command=ls&command=-l&input=1&output=1&error=1"),
                "main c"
            ),
            "command=ls&command=-l&stdin=1&stdout=1&stderr=1&container=main+c"
        );
        assert_eq!(
            api_query(Some("follow=true&tailLines=5&container=x"), "main"),
            "follow=true&tailLines=5&container=main"
        );
        assert_eq!(api_query(None, "main"), "container=main");
    }

    #[test]
    fn resource_metrics_and_summary_carry_every_level() {
        let usage = |ns: u64, bytes: u64, total: u64| Usage {
            cpu_nanocores: ns,
            memory_bytes: bytes,
            cpu_core_nanoseconds: total,
        };
        let report = UsageReport {
            timestamp: "2026-12-02T00:00:00Z".into(),
            window_seconds: 15,
            node: usage(500_000_000, 1 << 30, 3_000_000_000_000),
            pods: vec![PodUsage {
                namespace: "default".into(),
                name: "web".into(),
                containers: vec![
                    ContainerUsage {
                        name: "a".into(),
                        usage: usage(1_000_000, 1000, 2_500_000_000),
                    },
                    ContainerUsage {
                        name: "b".into(),
                        usage: usage(2_000_000, 2000, 500_000_000),
                    },
                ],
            }],
        };
        let text = resource_metrics(&report);
        let at = 1_796_169_600_000i64; // 2026-12-02T00:00:00Z in ms
        for line in [
            format!("node_cpu_usage_seconds_total 3000 {at}"),
            format!("node_memory_working_set_bytes 1073741824 {at}"),
            format!(
                "container_cpu_usage_seconds_total{{container=\"a\",namespace=\"default\",pod=\"web\"}} 2.5 {at}"
            ),
            format!("pod_cpu_usage_seconds_total{{namespace=\"default\",pod=\"web\"}} 3 {at}"),
            format!("pod_memory_working_set_bytes{{namespace=\"default\",pod=\"web\"}} 3000 {at}"),
            "scrape_error 0".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let summary = summary("edge-1", &report);
        assert_eq!(summary["node"]["nodeName"], "edge-1");
        assert_eq!(summary["node"]["cpu"]["usageNanoCores"], 500_000_000);
        assert_eq!(summary["pods"][0]["cpu"]["usageNanoCores"], 3_000_000);
        assert_eq!(summary["pods"][0]["memory"]["workingSetBytes"], 3000);
        assert_eq!(summary["pods"][0]["containers"][1]["name"], "b");
    }
}
