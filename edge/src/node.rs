//! Node status and heartbeat: the Lease in `kube-node-lease` is renewed every 10 s; the Node's
//! status (capacity, addresses, nodeInfo, conditions) is reported when it changes and at least
//! every 5 minutes. Both go upward through the outbox, so offline renewals coalesce into one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::ObjectKey;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::meta::MetaManager;

#[derive(Debug, Clone)]
pub struct NodeStatusConfig {
    pub lease_period: Duration,
    pub status_period: Duration,
    /// `containerRuntimeVersion` in nodeInfo (which runtime runs pods).
    pub runtime: String,
}

impl Default for NodeStatusConfig {
    fn default() -> Self {
        NodeStatusConfig {
            lease_period: Duration::from_secs(10),
            status_period: Duration::from_secs(300),
            runtime: "kedge-process://0.1".into(),
        }
    }
}

fn held(meta: &MetaManager, key: &ObjectKey) -> Option<Object> {
    let versioned = meta.store().get(key).ok()??;
    serde_json::from_slice(&versioned.object).ok()
}

/// The Lease as renewed now, built on the held one when there is one.
pub fn renewed_lease(meta: &MetaManager, key: &ObjectKey) -> Object {
    let node = meta.node();
    let mut lease = held(meta, key).unwrap_or_else(|| {
        let value = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
        });
        value.as_object().cloned().unwrap_or_default()
    });
    lease.insert(
        "spec".into(),
        json!({"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": micro_time()}),
    );
    lease
}

fn micro_time() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{}.{:06}Z",
        object::rfc3339(now).trim_end_matches('Z'),
        now.microsecond()
    )
}

fn meminfo_total_kib() -> u64 {
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

/// The node's status as this node sees it, without heartbeat times (for change detection).
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

/// Renews the lease and reports the node status until `shutdown`.
pub async fn run(meta: Arc<MetaManager>, config: NodeStatusConfig, shutdown: CancellationToken) {
    let Ok(lease_key) = ObjectKey::new("leases", "kube-node-lease", meta.node()) else {
        return;
    };
    // Checked every second so that the first status goes up as soon as the Node arrives.
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(config.lease_period));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_lease: Option<Instant> = None;
    let mut last_status: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if last_lease.is_none_or(|t| t.elapsed() >= config.lease_period) {
            let lease = Bytes::from(object::to_stored(renewed_lease(&meta, &lease_key)));
            match meta.report(lease_key.clone(), lease) {
                Ok(()) => last_lease = Some(Instant::now()),
                Err(e) => tracing::warn!(error = %e, "cannot queue the lease renewal"),
            }
        }
        let due = last_status.is_none_or(|t| t.elapsed() >= config.status_period);
        if report_status(&meta, &config, due) {
            last_status = Some(Instant::now());
        }
    }
}
