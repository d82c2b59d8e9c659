//! Resource usage of a node and its pods (`kubectl top`), and the Kubernetes Metrics API
//! objects made of it (`metrics.k8s.io/v1beta1` `NodeMetrics` and `PodMetrics`, the shapes
//! metrics-server serves).
//!
//! The cloud asks a node for its usage when a client asks for it (a request on the node's
//! link, route group [`GROUP`], operation `get`); the answer's content is a [`UsageReport`]
//! as JSON. Nothing is sent while nobody runs `kubectl top`: pushing a report every 30–60 s
//! would cost more than 10% of an idle node's traffic (BENCHMARKS.md), an answer on demand
//! costs one request stream per node per query.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::message::{Message, Route};

/// Route group of usage requests.
pub const GROUP: &str = "usage";
/// The Metrics API group kubectl top looks for (metrics-server's).
pub const API_GROUP: &str = "metrics.k8s.io";
/// The Metrics API version kubectl top asks for.
pub const API_VERSION: &str = "v1beta1";

/// Usage of one thing (a node, a container) over the report's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU in use, in billionths of a core (the rate of CPU time over the window).
    pub cpu_nanocores: u64,
    /// Memory in use, in bytes (resident set size; the node: total minus available).
    pub memory_bytes: u64,
    /// CPU time used so far, in core-nanoseconds (a counter: the node's since boot, a
    /// container's by its live processes and their reaped children, or CRI's), what
    /// kubelet's `/metrics/resource` and `/stats/summary` report as cumulative; 0 when the
    /// node did not say (before this field).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cpu_core_nanoseconds: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One container's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerUsage {
    /// The container's name in the pod spec.
    pub name: String,
    /// Its usage (flattened into the container's JSON object).
    #[serde(flatten)]
    pub usage: Usage,
}

/// One pod's usage, per running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodUsage {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its running containers, by name.
    pub containers: Vec<ContainerUsage>,
}

impl PodUsage {
    /// The sum of its containers' usage (what kubelet reports for the pod).
    pub fn total(&self) -> Usage {
        self.containers.iter().fold(Usage::default(), |t, c| Usage {
            cpu_nanocores: t.cpu_nanocores.saturating_add(c.usage.cpu_nanocores),
            memory_bytes: t.memory_bytes.saturating_add(c.usage.memory_bytes),
            cpu_core_nanoseconds: t
                .cpu_core_nanoseconds
                .saturating_add(c.usage.cpu_core_nanoseconds),
        })
    }
}

/// What a node answers: its own usage and its running pods', measured over `window_seconds`
/// ending at `timestamp` (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// When the window ended (RFC 3339, UTC).
    pub timestamp: String,
    /// The window's length, in whole seconds (at least 1).
    pub window_seconds: u64,
    /// The node's own usage.
    pub node: Usage,
    /// Its running pods', by namespace and name.
    pub pods: Vec<PodUsage>,
}

/// The request a cloud sends a node for its [`UsageReport`].
pub fn request() -> Message {
    Message::new(Route::new("cloudusage", GROUP, "get", ""), "")
}

/// The answer carrying a report.
pub fn answer(report: &UsageReport) -> Message {
    Message::new(
        Route::new("edgeusage", GROUP, "response", ""),
        serde_json::to_vec(report).unwrap_or_default(),
    )
}

fn cpu(nanocores: u64) -> String {
    format!("{nanocores}n")
}

fn memory(bytes: u64) -> String {
    format!("{}Ki", bytes / 1024)
}

/// `NodeMetrics` of `node` (metrics-server's shape: usage `cpu` in nanocores `n`, `memory` in
/// `Ki`).
pub fn node_metrics(node: &str, report: &UsageReport) -> Value {
    json!({
        "kind": "NodeMetrics",
        "apiVersion": format!("{API_GROUP}/{API_VERSION}"),
        "metadata": {"name": node, "creationTimestamp": report.timestamp},
        "timestamp": report.timestamp,
        "window": format!("{}s", report.window_seconds),
        "usage": {"cpu": cpu(report.node.cpu_nanocores), "memory": memory(report.node.memory_bytes)},
    })
}

/// `PodMetrics` of one pod of a report, with the pod's `labels` (as metrics-server copies them,
/// so that label selectors work).
pub fn pod_metrics(pod: &PodUsage, report: &UsageReport, labels: Option<&Value>) -> Value {
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "usage": {"cpu": cpu(c.usage.cpu_nanocores), "memory": memory(c.usage.memory_bytes)},
            })
        })
        .collect();
    let mut metadata = json!({
        "name": pod.name,
        "namespace": pod.namespace,
        "creationTimestamp": report.timestamp,
    });
    if let Some(labels) = labels {
        metadata["labels"] = labels.clone();
    }
    json!({
        "kind": "PodMetrics",
        "apiVersion": format!("{API_GROUP}/{API_VERSION}"),
        "metadata": metadata,
        "timestamp": report.timestamp,
        "window": format!("{}s", report.window_seconds),
        "containers": containers,
    })
}

/// A `NodeMetricsList` or `PodMetricsList` of `items`.
pub fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({
        "kind": kind,
        "apiVersion": format!("{API_GROUP}/{API_VERSION}"),
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_have_metrics_servers_shape() {
        let report = UsageReport {
            timestamp: "2026-12-01T00:00:00Z".into(),
            window_seconds: 10,
            node: Usage {
                cpu_nanocores: 250_000_000,
                memory_bytes: 3 << 30,
                cpu_core_nanoseconds: 7_000_000_000,
            },
            pods: vec![PodUsage {
                namespace: "default".into(),
                name: "web".into(),
                containers: vec![ContainerUsage {
                    name: "main".into(),
                    usage: Usage {
                        cpu_nanocores: 1_000_000,
                        memory_bytes: 10 << 20,
                        cpu_core_nanoseconds: 7_000_000_000,
                    },
                }],
            }],
        };
        let node = node_metrics("edge-1", &report);
        assert_eq!(node["usage"]["cpu"], "250000000n");
        assert_eq!(node["usage"]["memory"], "3145728Ki");
        assert_eq!(node["window"], "10s");
        let pod = pod_metrics(&report.pods[0], &report, Some(&json!({"app": "web"})));
        assert_eq!(pod["metadata"]["labels"]["app"], "web");
        assert_eq!(pod["containers"][0]["usage"]["memory"], "10240Ki");
        let wire = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<UsageReport>(&wire).unwrap(), report);
    }

    /// What one `kubectl top` costs on a node's link: the request and the answer as framed
    /// (a node of 10 pods), QUIC's packet overhead aside (BENCHMARKS.md "Streams").
    #[test]
    fn a_query_is_small_on_the_wire() {
        let container = |name: &str| ContainerUsage {
            name: name.into(),
            usage: Usage {
                cpu_nanocores: 123_456_789,
                memory_bytes: 45 << 20,
                cpu_core_nanoseconds: 7_000_000_000,
            },
        };
        let report = UsageReport {
            timestamp: "2026-12-01T00:00:00Z".into(),
            window_seconds: 15,
            node: Usage {
                cpu_nanocores: 1_234_567_890,
                memory_bytes: 3 << 30,
                cpu_core_nanoseconds: 7_000_000_000,
            },
            pods: (0..10)
                .map(|i| PodUsage {
                    namespace: "default".into(),
                    name: format!("greeter-7d9f8c6b5-{i:05}"),
                    containers: vec![container("main")],
                })
                .collect(),
        };
        let request = crate::EncodedMessage::encode(&request()).body().len();
        let answer = crate::EncodedMessage::encode(&answer(&report)).body().len();
        eprintln!("usage request {request} B, answer for 10 pods {answer} B");
        assert!(request < 200, "{request}");
        assert!(answer < 2400, "{answer}");
    }
}
