//! Edged, a light kubelet: runs the pods in the node's cache through a [`Runtime`] and reports
//! their status upward.
//!
//! Each pass (on every cache change, and every second for status) compares the pods the cache
//! holds with those the runtime runs: new pods start, pods marked for deletion stop and are
//! confirmed deleted once stopped, pods gone from the cache (deleted in the cloud, or moved away)
//! stop. A pod's status is reported when it differs from what the cache holds, so a restart
//! does not re-report what was already said.

pub mod hollow;
pub mod process;
pub mod runtime;
pub mod spec;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::{KeyRange, ObjectKey};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::meta::MetaManager;
pub use runtime::Runtime;
use runtime::{ContainerState, ContainerStatus, RestartPolicy};

pub struct Edged {
    meta: Arc<MetaManager>,
    runtime: Arc<dyn Runtime>,
    pods_dir: PathBuf,
    /// Pods being stopped because they left the cache (nothing to confirm to the cloud).
    orphans: HashSet<String>,
    /// Pods (by uid) whose deletion was confirmed to the cloud: the cache keeps them (marked
    /// for deletion) until the cloud's delete arrives, and they are confirmed only once.
    confirmed: HashSet<String>,
}

fn grace_of(pod: &Object) -> Duration {
    let seconds = object::meta(pod)
        .and_then(|m| m.get("deletionGracePeriodSeconds"))
        .or_else(|| pod.get("spec")?.get("terminationGracePeriodSeconds"))
        .and_then(Value::as_u64)
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

impl Edged {
    pub fn new(meta: Arc<MetaManager>, runtime: Arc<dyn Runtime>, pods_dir: PathBuf) -> Self {
        Edged {
            meta,
            runtime,
            pods_dir,
            orphans: HashSet::new(),
            confirmed: HashSet::new(),
        }
    }

    fn cached_pods(&self) -> Vec<(ObjectKey, Object)> {
        let Ok(range) = KeyRange::kind("pods") else {
            return Vec::new();
        };
        self.meta
            .store()
            .scan(&range)
            .flatten()
            .filter_map(|(key, v)| Some((key, serde_json::from_slice(&v.object).ok()?)))
            .filter(|(_, pod): &(ObjectKey, Object)| {
                pod.get("spec")
                    .and_then(|s| s.get("nodeName"))
                    .and_then(Value::as_str)
                    == Some(self.meta.node())
            })
            .collect()
    }

    /// One reconciliation pass.
    pub fn sync_once(&mut self) {
        let pods = self.cached_pods();
        let mut wanted = HashSet::new();
        for (key, pod) in &pods {
            let id = format!("{}/{}", key.namespace(), key.name());
            wanted.insert(id.clone());
            let deleting = object::meta(pod).is_some_and(|m| m.contains_key("deletionTimestamp"));
            if deleting {
                let uid = object::meta_str(pod, "uid").unwrap_or_default().to_owned();
                if self.confirmed.contains(&uid) {
                    continue;
                }
                self.runtime.stop(&id, grace_of(pod));
                if self.runtime.reap(&id) {
                    tracing::info!(pod = %id, "pod stopped; confirming its deletion");
                    match self.meta.confirm_deleted(key.clone()) {
                        Ok(()) => {
                            self.confirmed.insert(uid);
                        }
                        Err(e) => {
                            tracing::warn!(pod = %id, error = %e, "cannot queue the deletion")
                        }
                    }
                }
                continue;
            }
            let run = spec::pod_run(self.meta.store(), pod, &self.pods_dir);
            self.runtime.ensure(&run);
            if let Some(containers) = self.runtime.status(&id) {
                self.report_status(key, pod, run.restart_policy, &containers);
            }
        }
        for id in self.runtime.pods() {
            if !wanted.contains(&id) && self.orphans.insert(id.clone()) {
                tracing::info!(pod = %id, "pod no longer on this node; stopping it");
                self.runtime.stop(&id, Duration::from_secs(30));
            }
        }
        let runtime = &self.runtime;
        self.orphans.retain(|id| !runtime.reap(id));
        // A confirmed pod is forgotten once the cloud's delete removed it from the cache.
        let cached: HashSet<&str> = pods
            .iter()
            .filter_map(|(_, pod)| object::meta_str(pod, "uid"))
            .collect();
        self.confirmed.retain(|uid| cached.contains(uid.as_str()));
    }

    fn report_status(
        &self,
        key: &ObjectKey,
        pod: &Object,
        policy: RestartPolicy,
        containers: &[ContainerStatus],
    ) {
        let held = pod.get("status").cloned().unwrap_or(Value::Null);
        let status = pod_status(&held, policy, containers);
        if status == held {
            return;
        }
        let mut updated = pod.clone();
        updated.insert("status".into(), status);
        if let Err(e) = self
            .meta
            .report(key.clone(), Bytes::from(object::to_stored(updated)))
        {
            tracing::warn!(pod = %key, error = %e, "cannot queue the pod status");
        }
    }

    /// Reconciles on every cache change and every second until `shutdown`, then stops all
    /// pods (waiting at most `stop_grace`).
    pub async fn run(mut self, shutdown: CancellationToken, stop_grace: Duration) {
        let mut watcher = match self.meta.store().watch().subscribe(KeyRange::all(), None) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no cache watch; polling only");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            self.sync_once();
            tokio::select! {
                _ = tick.tick() => {}
                changed = async {
                    match watcher.as_mut() {
                        Some(w) => w.next().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !changed {
                        // Fell behind the change history: the next pass reads the cache anyway.
                        watcher = self.meta.store().watch().subscribe(KeyRange::all(), None).ok();
                    }
                }
                _ = shutdown.cancelled() => break,
            }
            // Drain what is queued: one pass covers it all.
            if let Some(w) = watcher.as_mut() {
                while let Ok(Some(_)) = w.try_next() {}
            }
        }
        self.runtime.shutdown(stop_grace);
        let deadline = tokio::time::Instant::now() + stop_grace + Duration::from_secs(1);
        while !self.runtime.pods().iter().all(|id| self.runtime.reap(id)) {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn terminated_json(t: &runtime::Terminated) -> Value {
    json!({"exitCode": t.exit_code, "reason": t.reason, "startedAt": t.started_at,
           "finishedAt": t.finished_at})
}

fn container_json(c: &ContainerStatus) -> Value {
    let state = match &c.state {
        ContainerState::Waiting { reason, message } => {
            json!({"waiting": {"reason": reason, "message": message}})
        }
        ContainerState::Running { started_at } => json!({"running": {"startedAt": started_at}}),
        ContainerState::Terminated(t) => json!({"terminated": terminated_json(t)}),
    };
    let running = matches!(c.state, ContainerState::Running { .. });
    let mut status = json!({
        "name": c.name,
        "image": c.image,
        "imageID": "",
        "ready": running,
        "started": running,
        "restartCount": c.restart_count,
        "state": state,
    });
    if let Some(last) = &c.last_termination {
        if !matches!(c.state, ContainerState::Terminated(_)) {
            status["lastState"] = json!({"terminated": terminated_json(last)});
        }
    }
    status
}

/// The pod status for these container states. Times that already exist in `held` are kept,
/// so an unchanged pod yields exactly `held`.
pub fn pod_status(held: &Value, policy: RestartPolicy, containers: &[ContainerStatus]) -> Value {
    let all_running = containers
        .iter()
        .all(|c| matches!(c.state, ContainerState::Running { .. }));
    let exits: Vec<i32> = containers
        .iter()
        .filter_map(|c| match &c.state {
            ContainerState::Terminated(t) => Some(t.exit_code),
            _ => None,
        })
        .collect();
    let all_done = !containers.is_empty() && exits.len() == containers.len();
    let phase = if all_done && policy != RestartPolicy::Always {
        if exits.iter().all(|c| *c == 0) {
            "Succeeded"
        } else if policy == RestartPolicy::Never || exits.iter().all(|c| *c != 0) {
            "Failed"
        } else {
            "Running"
        }
    } else if containers
        .iter()
        .any(|c| matches!(c.state, ContainerState::Running { .. }) || c.restart_count > 0)
    {
        "Running"
    } else {
        "Pending"
    };
    let ready = all_running && !containers.is_empty();
    let now = object::now_rfc3339();
    let start_time = held
        .get("startTime")
        .and_then(Value::as_str)
        .map_or(now.clone(), str::to_owned);
    let held_conditions = held.get("conditions").and_then(Value::as_array);
    let condition = |kind: &str, ok: bool| {
        let status = if ok { "True" } else { "False" };
        let previous = held_conditions.and_then(|list| {
            list.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        });
        let transition = previous
            .filter(|p| p.get("status").and_then(Value::as_str) == Some(status))
            .and_then(|p| p.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now));
        json!({"type": kind, "status": status, "lastProbeTime": null,
               "lastTransitionTime": transition})
    };
    json!({
        "phase": phase,
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": start_time,
        "qosClass": held.get("qosClass").cloned().unwrap_or_else(|| json!("BestEffort")),
        "containerStatuses": containers.iter().map(container_json).collect::<Vec<_>>(),
    })
}
