//! Node status and heartbeat.
//! - Every 10 s, and at once on each new connection, a heartbeat frame on the link (~20 bytes
//!   of stream data); the cloud renews the node's Lease in `kube-node-lease` from it. Nothing
//!   is queued while offline: a renewal is about now, and the first one after a reconnect goes
//!   immediately.
//! - The Node's status (capacity, addresses, nodeInfo, conditions) is reported through the
//!   outbox when it changes and at least every 5 minutes (a status patch of what changed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::ObjectKey;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use transport::LinkHandle;

use crate::meta::MetaManager;

#[derive(Debug, Clone)]
pub struct NodeStatusConfig {
    pub lease_period: Duration,
    pub status_period: Duration,
    /// `containerRuntimeVersion` in nodeInfo (which runtime runs pods).
    pub runtime: String,
    /// `status.images` as the runtime's image GC publishes it (CRI only; none: no list).
    pub images: Option<tokio::sync::watch::Receiver<Value>>,
    /// The filesystem whose size is the node's `ephemeral-storage` (the data dir's).
    pub storage_path: Option<std::path::PathBuf>,
}

impl Default for NodeStatusConfig {
    fn default() -> Self {
        NodeStatusConfig {
            lease_period: Duration::from_millis(12_500),
            status_period: Duration::from_secs(300),
            runtime: "kedge-process://0.1".into(),
            images: None,
            storage_path: None,
        }
    }
}

fn held(meta: &MetaManager, key: &ObjectKey) -> Option<Object> {
    let versioned = meta.store().get(key).ok()??;
    serde_json::from_slice(&versioned.object).ok()
}

/// `MemTotal` from `/proc/meminfo`, in KiB (0 where it cannot be read).
pub(crate) fn meminfo_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The node's status as this node sees it, without heartbeat times (for change detection):
/// capacity (CPUs, `MemTotal`, 110 pods as kubelet's default `--max-pods`) equal to
/// allocatable (nothing reserved), nodeInfo, the Ready condition.
pub fn observed_status(node: &str, runtime: &str) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = format!("{}Ki", meminfo_total_kib());
    let resources = json!({"cpu": cpus.to_string(), "memory": memory, "pods": "110"});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": node},
        ],
        "nodeInfo": {
            "kubeletVersion": concat!("v1.33.0-kedge-", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "operatingSystem": std::env::consts::OS,
            "architecture": match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", other => other },
            "kernelVersion": kernel_version(),
            "osImage": "kedge edgecore",
            "containerRuntimeVersion": runtime,
            "machineID": "", "systemUUID": "", "bootID": "",
        },
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "EdgeReady",
             "message": "edgecore is running"},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
    })
}

/// Adds `ephemeral-storage` (the size of the data dir's filesystem, in whole Ki so that the
/// status changes only when the filesystem does) and the runtime's `images`, where known.
fn add_storage_and_images(status: &mut Value, config: &NodeStatusConfig) {
    if let Some(path) = &config.storage_path {
        if let Ok(usage) = crate::edged::image_gc::fs_usage(path) {
            let storage = json!(format!("{}Ki", usage.capacity_bytes / 1024));
            for part in ["capacity", "allocatable"] {
                if let Some(map) = status.get_mut(part).and_then(Value::as_object_mut) {
                    map.insert("ephemeral-storage".into(), storage.clone());
                }
            }
        }
    }
    if let Some(images) = &config.images {
        let images = images.borrow().clone();
        if images.as_array().is_some_and(|a| !a.is_empty()) {
            status["images"] = images;
        }
    }
}

/// Sets the conditions' heartbeat and transition times to now (a status about to be reported).
pub fn stamp_conditions(status: &mut Value) {
    let now = object::now_rfc3339();
    if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions.iter_mut().filter_map(Value::as_object_mut) {
            c.insert("lastHeartbeatTime".into(), json!(now));
            c.insert("lastTransitionTime".into(), json!(now));
        }
    }
}

fn without_times(status: &Value) -> Value {
    let mut status = status.clone();
    if let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastHeartbeatTime");
                c.remove("lastTransitionTime");
            }
        }
    }
    status
}

/// Reports the node's status if the held Node differs from what is observed, or `force`.
fn report_status(meta: &MetaManager, config: &NodeStatusConfig, force: bool) -> bool {
    let key = match ObjectKey::new("nodes", "", meta.node()) {
        Ok(key) => key,
        Err(_) => return false,
    };
    // The Node object was made at join and is routed here; until it arrives there is nothing
    // to report on top of.
    let Some(mut node) = held(meta, &key) else {
        return false;
    };
    let mut status = observed_status(meta.node(), &config.runtime);
    add_storage_and_images(&mut status, config);
    let current = node.get("status").map(without_times).unwrap_or(Value::Null);
    if !force && current == status {
        return false;
    }
    stamp_conditions(&mut status);
    node.insert("status".into(), status);
    let bytes = Bytes::from(object::to_stored(node));
    if let Err(e) = meta.report(key, bytes) {
        tracing::warn!(error = %e, "cannot queue the node status");
        return false;
    }
    true
}

/// Sends heartbeats and reports the node status until `shutdown`.
pub async fn run(
    meta: Arc<MetaManager>,
    link: LinkHandle,
    config: NodeStatusConfig,
    shutdown: CancellationToken,
) {
    // Heartbeats on their own period; the one-second check sends the first heartbeat of each
    // new connection at once, and the first status as soon as the Node arrives.
    let period = config.lease_period.max(Duration::from_millis(100));
    let mut heartbeat = tokio::time::interval(period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The connection (by its number) the last heartbeat went on.
    let mut beat_on: Option<u64> = None;
    let mut last_status: Option<Instant> = None;
    loop {
        let connection = link.counters().connections;
        tokio::select! {
            _ = heartbeat.tick() => {
                // Offline: nothing is queued, the next connection's first heartbeat renews.
                if link.heartbeat(period).is_ok() {
                    beat_on = Some(connection);
                }
                continue;
            }
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if beat_on != Some(connection) && link.heartbeat(period).is_ok() {
            beat_on = Some(connection);
            heartbeat.reset();
        }
        let due = last_status.is_none_or(|t| t.elapsed() >= config.status_period);
        if report_status(&meta, &config, due) {
            last_status = Some(Instant::now());
        }
    }
}
