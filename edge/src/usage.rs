//! Resource usage of this node and of its pods, for `kubectl top` (the cloud asks for it over
//! the link, see `transport::usage`; MetaServer serves it locally).
//!
//! Measured from `/proc`, as metrics-server's numbers are from cgroups:
//! - a container's CPU is the CPU time (`utime + stime + cutime + cstime`) of the processes in
//!   its process group (the group the runtime records in `<pod dir>/<container>.pgroup`), as a
//!   rate over the window between two samples; its memory is their resident set size summed
//!   (shared pages count once per process, so it can exceed what a cgroup would say);
//! - a CRI container's CPU and memory are the runtime's (CRI `ListContainerStats`: cumulative
//!   CPU time and the cgroup's working set, what kubelet's summary reports);
//! - the node's CPU is the busy time of `/proc/stat` over the window; its memory is
//!   `MemTotal - MemAvailable` (`/proc/meminfo`), close to a cgroup's working set.
//!
//! A report takes a fresh sample and measures against the last one at least a second older
//! (waiting a second when there is none). While reports are asked for (within
//! [`WARM_FOR`] of the last one), a sample is also taken every [`SAMPLE_PERIOD`] in the
//! background (a scan of `/proc`, nothing on the network), so that the next report needs no
//! wait; an idle node that nobody asks does not sample at all.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use replication::api::remote::ApiReply;
use replication::api::ApiError;
use std::sync::Arc;
use transport::usage::{ContainerUsage, PodUsage, Usage, UsageReport};

use crate::edged::procs::{self, GroupRecord};
use crate::edgestream::EdgeStream;

/// How often the background sampler looks at `/proc` (while warm).
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(15);
/// How long after a report the background sampler keeps sampling.
pub const WARM_FOR: Duration = Duration::from_secs(600);
/// The shortest window a rate is measured over.
const MIN_WINDOW: Duration = Duration::from_secs(1);

/// (pod directory name `namespace_name`, container) → (CPU ticks, resident bytes).
/// Per (pod directory, container): cumulative CPU time in nanoseconds, memory in bytes.
type Containers = HashMap<(String, String), (u64, u64)>;

/// The CRI runtime's containers, measured now (none without a CRI runtime, or when it does
/// not answer: those pods are then missing from the report rather than wrong).
async fn cri_containers() -> Containers {
    let running = crate::edged::cri::running_containers();
    let Some((_, first)) = running.first() else {
        return Containers::new();
    };
    let stats = match first.client.container_stats().await {
        Ok(stats) => stats,
        Err(e) => {
            tracing::debug!(error = %e, "no container stats from the CRI runtime");
            return Containers::new();
        }
    };
    let mut containers = Containers::new();
    for (log, target) in running {
        let pod = log
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str());
        let container = log.file_stem().and_then(|n| n.to_str());
        if let (Some(pod), Some(container), Some(usage)) =
            (pod, container, stats.get(&target.container_id))
        {
            containers.insert((pod.to_owned(), container.to_owned()), *usage);
        }
    }
    containers
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    /// Busy CPU ticks of the node since boot.
    node_busy: u64,
    node_memory: u64,
    containers: Containers,
}

/// Samples usage and reports it as rates.
pub struct Sampler {
    /// `DATA_DIR/pods`.
    pods_dir: PathBuf,
    samples: Mutex<Vec<Sample>>,
    /// When a report was last asked for.
    asked: Mutex<Option<Instant>>,
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Busy ticks of `/proc/stat`'s `cpu` line (user, nice, system, irq, softirq, steal).
fn node_busy() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|i| fields.get(*i).copied().unwrap_or(0))
        .sum()
}

/// `MemTotal - MemAvailable`, in bytes.
fn node_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:")) * 1024
}

/// Per process group: (CPU ticks of its processes and their reaped children, resident pages).
fn groups() -> HashMap<i32, (u64, u64)> {
    let mut groups: HashMap<i32, (u64, u64)> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = text.rfind(')').map(|at| &text[at + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: pgrp is field 5 of proc(5), utime..cstime 14..17, rss 24.
        let number = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
        let Some(pgid) = fields.get(2).and_then(|f| f.parse::<i32>().ok()) else {
            continue;
        };
        let ticks = number(11) + number(12) + number(13) + number(14);
        let group = groups.entry(pgid).or_default();
        group.0 += ticks;
        group.1 += number(21);
    }
    groups
}

impl Sampler {
    /// A sampler of the process runtime's pods under `pods_dir` (`DATA_DIR/pods`), with no
    /// sample yet.
    pub fn new(pods_dir: PathBuf) -> Sampler {
        Sampler {
            pods_dir,
            samples: Mutex::new(Vec::new()),
            asked: Mutex::new(None),
        }
    }

    /// The running containers of this node's pods, measured now (`cri`: the CRI runtime's,
    /// measured by it).
    fn take(&self, cri: Containers) -> Sample {
        let boot = procs::boot_id();
        let page = page_size();
        let hz = ticks_per_second().max(1);
        let groups = groups();
        let mut containers = cri;
        for pod in std::fs::read_dir(&self.pods_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some(pod_name) = pod.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            for file in std::fs::read_dir(pod.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = file.file_name();
                let Some(container) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(procs::RECORD_SUFFIX))
                else {
                    continue;
                };
                let record = std::fs::read_to_string(file.path())
                    .ok()
                    .and_then(|t| GroupRecord::decode(&t));
                let Some(record) = record.filter(|r| r.leader_alive(&boot)) else {
                    continue;
                };
                let (ticks, pages) = groups.get(&record.pgid).copied().unwrap_or_default();
                containers.insert(
                    (pod_name.clone(), container.to_owned()),
                    (ticks * 1_000_000_000 / hz, pages * page),
                );
            }
        }
        Sample {
            at: Instant::now(),
            node_busy: node_busy(),
            node_memory: node_memory(),
            containers,
        }
    }

    /// Takes a background sample (keeps the last two).
    pub fn sample(&self, cri: Containers) {
        let sample = self.take(cri);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push(sample);
        let excess = samples.len().saturating_sub(2);
        samples.drain(..excess);
    }

    /// Samples every [`SAMPLE_PERIOD`] while warm (a report within [`WARM_FOR`]), until
    /// `stop`.
    pub async fn run(self: std::sync::Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let warm = self
                .asked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|at| at.elapsed() < WARM_FOR);
            if warm {
                let cri = cri_containers().await;
                let sampler = self.clone();
                let _ = tokio::task::spawn_blocking(move || sampler.sample(cri)).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_PERIOD) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The node's and its pods' usage now, as rates over the window since an earlier sample
    /// that saw every running container (else over a second from now).
    pub async fn report(&self) -> UsageReport {
        *self.asked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let first = self.take(cri_containers().await);
        let baseline = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|s| {
                first.at.duration_since(s.at) >= MIN_WINDOW
                    && first
                        .containers
                        .keys()
                        .all(|k| s.containers.contains_key(k))
            })
            .cloned();
        let (earlier, now) = match baseline {
            Some(earlier) => (earlier, first),
            None => {
                tokio::time::sleep(MIN_WINDOW).await;
                let now = self.take(cri_containers().await);
                (first, now)
            }
        };
        {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            samples.push(now.clone());
            let excess = samples.len().saturating_sub(2);
            samples.drain(..excess);
        }
        let window = now.at.duration_since(earlier.at).max(MIN_WINDOW);
        let hz = ticks_per_second() as f64;
        let rate = |before: u64, after: u64| -> u64 {
            (after.saturating_sub(before) as f64 / hz / window.as_secs_f64() * 1e9) as u64
        };
        let rate_ns = |before: u64, after: u64| -> u64 {
            (after.saturating_sub(before) as f64 / window.as_secs_f64()) as u64
        };
        let mut pods: HashMap<String, PodUsage> = HashMap::new();
        for ((pod_dir, container), (cpu_ns, memory)) in &now.containers {
            let before = earlier
                .containers
                .get(&(pod_dir.clone(), container.clone()))
                .map_or(*cpu_ns, |(t, _)| *t);
            let Some((namespace, name)) = pod_dir.split_once('_') else {
                continue;
            };
            pods.entry(pod_dir.clone())
                .or_insert_with(|| PodUsage {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    containers: Vec::new(),
                })
                .containers
                .push(ContainerUsage {
                    name: container.clone(),
                    usage: Usage {
                        cpu_nanocores: rate_ns(before, *cpu_ns),
                        memory_bytes: *memory,
                        cpu_core_nanoseconds: *cpu_ns,
                    },
                });
        }
        let mut pods: Vec<PodUsage> = pods.into_values().collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for pod in &mut pods {
            pod.containers.sort_by(|a, b| a.name.cmp(&b.name));
        }
        UsageReport {
            timestamp: replication::api::object::now_rfc3339(),
            window_seconds: window.as_secs().max(1),
            node: Usage {
                cpu_nanocores: rate(earlier.node_busy, now.node_busy),
                memory_bytes: now.node_memory,
                cpu_core_nanoseconds: (now.node_busy as f64 / hz * 1e9) as u64,
            },
            pods,
        }
    }
}

/// The Metrics API's paths (`/apis/metrics.k8s.io/v1beta1/...`), for the cloud's and
/// MetaServer's routers.
pub mod paths {
    pub const NODES: &str = "/apis/metrics.k8s.io/v1beta1/nodes";
    pub const NODE: &str = "/apis/metrics.k8s.io/v1beta1/nodes/{name}";
    pub const PODS: &str = "/apis/metrics.k8s.io/v1beta1/pods";
    pub const NAMESPACE_PODS: &str = "/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods";
    pub const POD: &str = "/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods/{name}";
}

/// The `labelSelector` of a query, parsed (400 if malformed).
pub fn label_selector(
    query: Option<&str>,
) -> Result<Option<replication::api::selector::LabelSelector>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query is malformed: {e}")))?;
    pairs
        .into_iter()
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| replication::api::selector::LabelSelector::parse(&v))
        .transpose()
}

/// MetaServer's Metrics API: this node and its own pods, measured here (online or offline).
pub fn routes() -> Router<Arc<EdgeStream>> {
    Router::new()
        .route(paths::NODES, get(nodes))
        .route(paths::NODE, get(node))
        .route(paths::PODS, get(all_pods))
        .route(paths::NAMESPACE_PODS, get(namespace_pods))
        .route(paths::POD, get(pod))
}

fn json(value: serde_json::Value) -> Response {
    (
        axum::http::StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    ApiReply::error(&e).into_response()
}

async fn nodes(State(stream): State<Arc<EdgeStream>>) -> Response {
    let report = stream.usage.report().await;
    let item = transport::usage::node_metrics(stream.node(), &report);
    json(transport::usage::list("NodeMetricsList", vec![item]))
}

async fn node(State(stream): State<Arc<EdgeStream>>, Path(name): Path<String>) -> Response {
    if name != stream.node() {
        return error(ApiError::not_found("nodes.metrics.k8s.io", &name));
    }
    let report = stream.usage.report().await;
    json(transport::usage::node_metrics(stream.node(), &report))
}

async fn pod_list(stream: &EdgeStream, namespace: Option<&str>, query: Option<&str>) -> Response {
    let selector = match label_selector(query) {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let report = stream.usage.report().await;
    let items = report
        .pods
        .iter()
        .filter(|p| namespace.is_none_or(|ns| p.namespace == ns))
        .filter_map(|p| {
            let labels = stream.pod_labels(&p.namespace, &p.name);
            let keep = selector
                .as_ref()
                .is_none_or(|s| s.matches_labels(labels.as_ref().and_then(|l| l.as_object())));
            keep.then(|| transport::usage::pod_metrics(p, &report, labels.as_ref()))
        })
        .collect();
    json(transport::usage::list("PodMetricsList", items))
}

async fn all_pods(State(stream): State<Arc<EdgeStream>>, RawQuery(query): RawQuery) -> Response {
    pod_list(&stream, None, query.as_deref()).await
}

async fn namespace_pods(
    State(stream): State<Arc<EdgeStream>>,
    Path(namespace): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    pod_list(&stream, Some(&namespace), query.as_deref()).await
}

async fn pod(
    State(stream): State<Arc<EdgeStream>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let report = stream.usage.report().await;
    match report
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.name == name)
    {
        Some(p) => {
            let labels = stream.pod_labels(&p.namespace, &p.name);
            json(transport::usage::pod_metrics(p, &report, labels.as_ref()))
        }
        None => error(ApiError::not_found("pods.metrics.k8s.io", &name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_node_and_a_busy_group_are_measured() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("default_busy");
        std::fs::create_dir_all(&pod).unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .process_group(0)
            .spawn()
            .unwrap();
        let record = GroupRecord::of(child.id() as i32).unwrap();
        std::fs::write(
            pod.join(format!("main{}", procs::RECORD_SUFFIX)),
            record.encode(),
        )
        .unwrap();
        let sampler = Sampler::new(dir.path().to_owned());
        let report = sampler.report().await;
        let _ = child.kill();
        let _ = child.wait();
        assert!(report.node.memory_bytes > 0);
        assert!(report.node.cpu_nanocores > 0, "{report:?}");
        let busy = &report.pods[0];
        assert_eq!(
            (busy.namespace.as_str(), busy.name.as_str()),
            ("default", "busy")
        );
        let usage = busy.containers[0].usage;
        // A spinning shell uses most of a core (the machine may be shared: at least a tenth).
        assert!(usage.cpu_nanocores > 100_000_000, "{usage:?}");
        assert!(usage.memory_bytes > 0, "{usage:?}");
    }
}
