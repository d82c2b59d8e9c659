//! Edged, a light kubelet: runs the pods in the node's cache through a [`Runtime`] and reports
//! their status upward.
//!
//! Each pass (on every cache change, and every second for status) compares the pods the cache
//! holds with those the runtime runs: new pods start, pods marked for deletion stop and are
//! confirmed deleted once stopped, pods gone from the cache (deleted in the cloud, or moved away)
//! stop. A pod's status is reported when it differs from what the cache holds, so a restart
//! does not re-report what was already said.
//!
//! A pod the runtime does not know (edgecore restarted, with or without the cloud) is taken
//! up from the status the node last recorded for it: its latest report still in the outbox,
//! or else the status in the cache (the node's reports are written there too). A pod recorded
//! Succeeded or Failed is never run again, and a running one goes on with the restart counts
//! it had. The status reported never leaves a terminal phase and never lowers a restart count.

pub mod cri;
pub mod cri_stream;
pub mod events;
pub mod hollow;
pub mod image_gc;
pub mod logs;
pub mod probe;
pub mod process;
pub mod procs;
pub mod runtime;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::watcher::ResumableWatcher;
use replication::{KeyRange, ObjectKey};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::meta::MetaManager;
pub use runtime::Runtime;
use runtime::{ContainerState, ContainerStatus, RestartPolicy, Terminated};

/// Runs the node's pods (see the module documentation).
pub struct Edged {
    meta: Arc<MetaManager>,
    runtime: Arc<dyn Runtime>,
    pods_dir: PathBuf,
    /// Pods being stopped because they left the cache (nothing to confirm to the cloud).
    orphans: HashSet<String>,
    /// Pods as the node last reported them, from the outbox at start (reports the cloud had
    /// not acknowledged): newer than the cache when the cloud overwrote the local copy before
    /// applying the report. Dropped once the pod is running or gone.
    reported: HashMap<ObjectKey, Object>,
    /// Pods (by uid) whose deletion was confirmed to the cloud: the cache keeps them (marked
    /// for deletion) until the cloud's delete arrives, and they are confirmed only once.
    confirmed: HashSet<String>,
    /// kubelet's Events about the node's pods.
    events: Arc<std::sync::Mutex<events::Recorder>>,
    /// The containers' probes.
    prober: probe::Prober,
    /// Pods (by uid) whose `Killing` events were recorded.
    killing: HashSet<String>,
    /// When container logs are rotated by size.
    log_rotation: logs::LogRotation,
    /// When the logs' sizes were last looked at.
    rotation_checked: Option<std::time::Instant>,
}

/// How often container logs' sizes are looked at (kubelet: 10 s).
pub const LOG_ROTATION_PERIOD: Duration = Duration::from_secs(10);

fn grace_of(pod: &Object) -> Duration {
    let seconds = object::meta(pod)
        .and_then(|m| m.get("deletionGracePeriodSeconds"))
        .or_else(|| pod.get("spec")?.get("terminationGracePeriodSeconds"))
        .and_then(Value::as_u64)
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

/// The latest report of each pod in the node's outbox (an unreadable outbox: none).
fn outbox_pods(meta: &MetaManager) -> HashMap<ObjectKey, Object> {
    let outbox = match replication::sync::persist::load_edge(meta.store()) {
        Ok(recovered) => recovered.outbox,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the outbox; pods resume from the cache");
            return HashMap::new();
        }
    };
    let mut latest: HashMap<ObjectKey, (u64, Object)> = HashMap::new();
    for report in outbox {
        if report.key.kind() != "pods" || report.object.is_empty() {
            continue;
        }
        let Ok(pod) = serde_json::from_slice::<Object>(&report.object) else {
            continue;
        };
        if latest
            .get(&report.key)
            .is_none_or(|(id, _)| *id < report.id)
        {
            latest.insert(report.key, (report.id, pod));
        }
    }
    latest.into_iter().map(|(k, (_, pod))| (k, pod)).collect()
}

/// Whether a pod status is Succeeded or Failed (a pod never leaves either).
pub fn is_terminal(status: &Value) -> bool {
    matches!(
        status.get("phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

impl Edged {
    /// Edged over the node's cache; reads the outbox once for the pods' last reports.
    pub fn new(meta: Arc<MetaManager>, runtime: Arc<dyn Runtime>, pods_dir: PathBuf) -> Self {
        let reported = outbox_pods(&meta);
        let events = Arc::new(std::sync::Mutex::new(events::Recorder::new(meta.node())));
        let prober = probe::Prober::new(meta.clone(), events.clone());
        Edged {
            prober,
            meta,
            runtime,
            pods_dir,
            log_rotation: logs::LogRotation::default(),
            rotation_checked: None,
            orphans: HashSet::new(),
            reported,
            confirmed: HashSet::new(),
            events,
            killing: HashSet::new(),
        }
    }

    /// The status the node last recorded for `pod`: its report in the outbox if that is of
    /// the same pod (same uid), else what the cache holds.
    fn recorded_status(&self, key: &ObjectKey, pod: &Object) -> Value {
        let uid = object::meta_str(pod, "uid");
        self.reported
            .get(key)
            .filter(|reported| object::meta_str(reported, "uid") == uid)
            .and_then(|reported| reported.get("status"))
            .or_else(|| pod.get("status"))
            .cloned()
            .unwrap_or(Value::Null)
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

    /// Rotates container logs by size (kubelet's `--container-log-max-size` and
    /// `--container-log-max-files`).
    pub fn with_log_rotation(mut self, rotation: logs::LogRotation) -> Self {
        self.log_rotation = rotation;
        self
    }

    /// Every [`LOG_ROTATION_PERIOD`] (kubelet's container log manager looks every 10 s):
    /// each cached pod's current container logs larger than the limit are rotated and the
    /// runtime told to write a new file.
    fn rotate_logs(&mut self, pods: &[(ObjectKey, Object)]) {
        if self
            .rotation_checked
            .is_some_and(|t: std::time::Instant| t.elapsed() < LOG_ROTATION_PERIOD)
        {
            return;
        }
        self.rotation_checked = Some(std::time::Instant::now());
        for (key, pod) in pods {
            let id = format!("{}/{}", key.namespace(), key.name());
            let dir = self
                .pods_dir
                .join(format!("{}_{}", key.namespace(), key.name()));
            let spec = pod.get("spec");
            let names = ["initContainers", "containers"]
                .iter()
                .filter_map(|l| spec.and_then(|s| s.get(*l)).and_then(Value::as_array))
                .flatten()
                .filter_map(|c| c.get("name").and_then(Value::as_str));
            for name in names {
                let path = logs::path(&dir, name, false);
                match logs::rotate_if_large(&path, &self.log_rotation) {
                    Ok(true) => {
                        tracing::debug!(pod = %id, container = name, "container log rotated");
                        self.runtime.reopen_log(&id, name);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(pod = %id, container = name, error = %e, "cannot rotate the log")
                    }
                }
            }
        }
    }

    /// One reconciliation pass.
    pub fn sync_once(&mut self) {
        let pods = self.cached_pods();
        self.rotate_logs(&pods);
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
                if self.killing.insert(uid.clone()) {
                    self.record_killing(pod);
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
            let known = self.runtime.status(&id).is_some();
            let mut recorded = Value::Null;
            if !known {
                recorded = self.recorded_status(key, pod);
                if is_terminal(&recorded) {
                    // Finished before edgecore (re)started: it stays finished.
                    continue;
                }
            }
            let mut run = spec::pod_run(self.meta.store(), pod, &self.pods_dir);
            if !known {
                // As kubelet: nothing is created while the pod's configuration cannot be met
                // (a missing ConfigMap, an unsupported volume); it says why and is tried again
                // at every change of the cache.
                if let Some(message) = spec::config_error(self.meta.store(), pod) {
                    let waiting: Vec<ContainerStatus> = run
                        .containers
                        .iter()
                        .map(|c| ContainerStatus {
                            name: c.name.clone(),
                            image: c.image.clone(),
                            state: ContainerState::Waiting {
                                reason: "CreateContainerConfigError".into(),
                                message: message.clone(),
                            },
                            last_termination: None,
                            restart_count: 0,
                        })
                        .collect();
                    let none = HashMap::new();
                    self.report_status(&id, key, pod, run.restart_policy, &waiting, &none);
                    continue;
                }
                run.recorded = recorded_containers(&recorded);
                self.reported.remove(key);
            }
            self.runtime.ensure(&run);
            self.record_runtime_events(&id, pod);
            if let Some(containers) = self.runtime.status(&id) {
                let probed = self.probe(&id, key, pod, &containers);
                self.report_status(&id, key, pod, run.restart_policy, &containers, &probed);
            }
        }
        let live: HashSet<String> = pods
            .iter()
            .filter_map(|(_, pod)| object::meta_str(pod, "uid").map(str::to_owned))
            .collect();
        self.prober.retain(&live);
        if !self.reported.is_empty() {
            let cached: HashSet<&ObjectKey> = pods.iter().map(|(k, _)| k).collect();
            self.reported.retain(|k, _| cached.contains(k));
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
        self.killing.retain(|uid| cached.contains(uid.as_str()));
    }

    /// The runtime's own events about the pod (`Pulling`, `Pulled`, `Created`), recorded as
    /// kubelet records them.
    fn record_runtime_events(&self, id: &str, pod: &Object) {
        let taken = self.runtime.take_events(id);
        if taken.is_empty() {
            return;
        }
        let reports: Vec<(ObjectKey, Bytes)> = {
            let mut recorder = self.events.lock().unwrap_or_else(|p| p.into_inner());
            taken
                .iter()
                .filter_map(|t| recorder.event(pod, t))
                .collect()
        };
        if let Err(e) = self.meta.report_batch(reports, Default::default()) {
            tracing::warn!(pod = %id, error = %e, "cannot queue events");
        }
    }

    /// kubelet's `Killing` events for a pod being deleted: one per running container.
    fn record_killing(&self, pod: &Object) {
        let held = pod.get("status").cloned().unwrap_or(Value::Null);
        let running: Vec<String> = held
            .get("containerStatuses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| c.get("state").and_then(|s| s.get("running")).is_some())
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let mut recorder = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let reports: Vec<(ObjectKey, Bytes)> = running
            .into_iter()
            .filter_map(|name| {
                let message = format!("Stopping container {name}");
                recorder.event(pod, &(name, "Normal", "Killing", message))
            })
            .collect();
        recorder.forget(object::name(pod));
        drop(recorder);
        if !reports.is_empty() {
            if let Err(e) = self.meta.report_batch(reports, Default::default()) {
                tracing::warn!(pod = %object::name(pod), error = %e, "cannot queue events");
            }
        }
    }

    /// Keeps the probes of the pod's running containers going; what they say, by container.
    fn probe(
        &mut self,
        id: &str,
        key: &ObjectKey,
        pod: &Object,
        containers: &[ContainerStatus],
    ) -> HashMap<String, probe::Probed> {
        let running: Vec<(String, String)> = containers
            .iter()
            .filter_map(|c| match &c.state {
                ContainerState::Running { started_at } => {
                    Some((c.name.clone(), started_at.clone()))
                }
                _ => None,
            })
            .collect();
        let host_network = pod
            .get("spec")
            .and_then(|s| s.get("hostNetwork"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let address = self
            .runtime
            .pod_ip(id)
            .filter(|_| !host_network)
            .and_then(|ip| ip.parse().ok())
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let pod_dir = self
            .pods_dir
            .join(format!("{}_{}", key.namespace(), key.name()));
        let grace = grace_of(pod);
        self.prober
            .sync(pod, &running, |container| probe::ProbeTarget {
                pod_dir: pod_dir.clone(),
                container: container.to_owned(),
                address,
                grace,
            })
    }

    fn report_status(
        &self,
        id: &str,
        key: &ObjectKey,
        pod: &Object,
        policy: RestartPolicy,
        containers: &[ContainerStatus],
        probed: &HashMap<String, probe::Probed>,
    ) {
        let held = pod.get("status").cloned().unwrap_or(Value::Null);
        let mut status = pod_status(&held, policy, containers);
        with_probes(&mut status, &held, probed);
        with_runtime_details(
            &mut status,
            self.runtime.pod_ip(id),
            &self.runtime.container_ids(id),
        );
        let init = self.runtime.init_status(id);
        if !init.is_empty() {
            with_init_containers(&mut status, &held, policy, &init);
        }
        if status == held {
            return;
        }
        // kubelet's Events for what changed, in the same commit as the status.
        let mut reports = {
            let mut recorder = self.events.lock().unwrap_or_else(|p| p.into_inner());
            events::transitions(object::name(pod), &held, &status)
                .iter()
                .filter_map(|t| recorder.event(pod, t))
                .collect::<Vec<_>>()
        };
        let mut updated = pod.clone();
        updated.insert("status".into(), status);
        reports.push((key.clone(), Bytes::from(object::to_stored(updated))));
        if let Err(e) = self.meta.report_batch(reports, Default::default()) {
            tracing::warn!(pod = %key, error = %e, "cannot queue the pod status");
        }
    }

    /// Reconciles on every cache change and every second until `shutdown`, then stops all
    /// pods (waiting at most `stop_grace`).
    pub async fn run(mut self, shutdown: CancellationToken, stop_grace: Duration) {
        // Any change (or a restart of the watch) means one more pass; a pass reads the cache.
        let mut watcher = ResumableWatcher::all(self.meta.store().clone());
        let mut watching = true;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let runtime_changed = self.runtime.changed();
        let probes_changed = self.prober.changed();
        loop {
            self.sync_once();
            tokio::select! {
                _ = tick.tick() => {}
                // A probe changed a container's readiness: reported now.
                _ = probes_changed.notified() => {}
                // A container's state changed: reported now, not at the next tick.
                _ = async {
                    match &runtime_changed {
                        Some(changed) => changed.notified().await,
                        None => std::future::pending().await,
                    }
                } => {}
                event = watcher.next(), if watching => {
                    if event.is_err() {
                        tracing::warn!("the cache's watch closed; polling only");
                        watching = false;
                    }
                }
                _ = shutdown.cancelled() => break,
            }
            // Drain what is queued: one pass covers it all.
            while let Ok(Some(_)) = watcher.try_next() {}
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

/// What the probes say: a container with a startup probe is `started` once it passed, one
/// with a readiness probe `ready` once that passed (and while it does); the pod's
/// `ContainersReady` and `Ready` follow all of its containers.
fn with_probes(status: &mut Value, held: &Value, probed: &HashMap<String, probe::Probed>) {
    if probed.is_empty() {
        return;
    }
    let Some(list) = status
        .get_mut("containerStatuses")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for c in list.iter_mut() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        let Some(p) = probed.get(name) else {
            continue;
        };
        let running = c.get("state").and_then(|s| s.get("running")).is_some();
        c["started"] = json!(running && p.started);
        c["ready"] = json!(running && p.started && p.ready.unwrap_or(true));
    }
    let all_ready = !list.is_empty() && list.iter().all(|c| c.get("ready") == Some(&json!(true)));
    let wanted = if all_ready { "True" } else { "False" };
    let held_conditions = held.get("conditions").and_then(Value::as_array);
    let Some(conditions) = status.get_mut("conditions").and_then(Value::as_array_mut) else {
        return;
    };
    for condition in conditions.iter_mut() {
        let kind = condition
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if !matches!(kind.as_str(), "ContainersReady" | "Ready")
            || condition.get("status").and_then(Value::as_str) == Some(wanted)
        {
            continue;
        }
        let transition = held_conditions
            .and_then(|list| {
                list.iter().find(|c| {
                    c.get("type").and_then(Value::as_str) == Some(&kind)
                        && c.get("status").and_then(Value::as_str) == Some(wanted)
                })
            })
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(object::now_rfc3339()));
        condition["status"] = json!(wanted);
        condition["lastTransitionTime"] = transition;
    }
}

/// Fills in what only some runtimes know: the pod's own IP (`podIP`, `podIPs`) and each
/// container's `containerID` and `imageID`.
fn with_runtime_details(
    status: &mut Value,
    pod_ip: Option<String>,
    ids: &[(String, String, String)],
) {
    if let Some(ip) = pod_ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{ "ip": ip }]);
    }
    let Some(list) = status
        .get_mut("containerStatuses")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for (name, container_id, image_id) in ids {
        if let Some(entry) = list
            .iter_mut()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(name.as_str()))
        {
            if !container_id.is_empty() {
                entry["containerID"] = json!(container_id);
            }
            if !image_id.is_empty() {
                entry["imageID"] = json!(image_id);
            }
        }
    }
}

/// Adds `initContainerStatuses` and what they mean for the pod: until every init container
/// completed (exit 0) the pod is not `Initialized` (and `Pending`), and one that failed for
/// good (restartPolicy Never) makes it `Failed`, as kubelet reports it. A terminal phase in
/// `held` is kept; condition times are kept from `held` when the condition did not change.
fn with_init_containers(
    status: &mut Value,
    held: &Value,
    policy: RestartPolicy,
    init: &[ContainerStatus],
) {
    let completed =
        |c: &ContainerStatus| matches!(&c.state, ContainerState::Terminated(t) if t.exit_code == 0);
    status["initContainerStatuses"] = init
        .iter()
        .map(|c| {
            let mut json = container_json(c);
            json["ready"] = json!(completed(c));
            json
        })
        .collect();
    if init.iter().all(completed) {
        return;
    }
    let failed = policy == RestartPolicy::Never
        && init
            .iter()
            .any(|c| matches!(&c.state, ContainerState::Terminated(t) if t.exit_code != 0));
    if !is_terminal(held) {
        status["phase"] = json!(if failed { "Failed" } else { "Pending" });
    }
    let held_transition = held
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter().find(|c| {
                c.get("type").and_then(Value::as_str) == Some("Initialized")
                    && c.get("status").and_then(Value::as_str) == Some("False")
            })
        })
        .and_then(|c| c.get("lastTransitionTime").cloned());
    if let Some(list) = status.get_mut("conditions").and_then(Value::as_array_mut) {
        for condition in list {
            if condition.get("type").and_then(Value::as_str) == Some("Initialized") {
                condition["status"] = json!("False");
                condition["reason"] = json!("ContainersNotInitialized");
                if let Some(t) = &held_transition {
                    condition["lastTransitionTime"] = t.clone();
                }
            }
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

fn terminated_of(value: &Value) -> Option<Terminated> {
    let text = |field: &str| {
        value
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    Some(Terminated {
        exit_code: i32::try_from(value.get("exitCode")?.as_i64()?).ok()?,
        reason: text("reason"),
        started_at: text("startedAt"),
        finished_at: text("finishedAt"),
    })
}

/// The container statuses held in a pod status (the inverse of what [`pod_status`] writes):
/// what a runtime resumes from after a restart. Entries without a name are skipped.
pub fn recorded_containers(status: &Value) -> Vec<ContainerStatus> {
    let entries = status.get("containerStatuses").and_then(Value::as_array);
    entries
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let text = |field: &str| c.get(field).and_then(Value::as_str).map(str::to_owned);
            let state = c.get("state");
            let terminated = state.and_then(|s| s.get("terminated"));
            let state = if let Some(t) = terminated {
                ContainerState::Terminated(terminated_of(t)?)
            } else if let Some(r) = state.and_then(|s| s.get("running")) {
                ContainerState::Running {
                    started_at: r.get("startedAt").and_then(Value::as_str)?.to_owned(),
                }
            } else {
                let waiting = state.and_then(|s| s.get("waiting"));
                let field = |f: &str| {
                    waiting
                        .and_then(|w| w.get(f))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                ContainerState::Waiting {
                    reason: field("reason"),
                    message: field("message"),
                }
            };
            let last_termination = c
                .pointer("/lastState/terminated")
                .and_then(terminated_of)
                .or_else(|| match &state {
                    ContainerState::Terminated(t) => Some(t.clone()),
                    _ => None,
                });
            Some(ContainerStatus {
                name: text("name").filter(|n| !n.is_empty())?,
                image: text("image").unwrap_or_default(),
                state,
                last_termination,
                restart_count: c
                    .get("restartCount")
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(0),
            })
        })
        .collect()
}

/// The pod status for these container states. Times that already exist in `held` are kept,
/// so an unchanged pod yields exactly `held`. Nothing goes backwards from `held`: a
/// Succeeded or Failed phase stays, and no container's restart count is lowered.
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
    let phase = if is_terminal(held) {
        held.get("phase").and_then(Value::as_str).unwrap_or(phase)
    } else {
        phase
    };
    let held_containers = recorded_containers(held);
    let held_restarts = |name: &str| {
        held_containers
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.restart_count)
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
        "containerStatuses": containers
            .iter()
            .map(|c| {
                let held = held_restarts(&c.name);
                if c.restart_count < held {
                    container_json(&ContainerStatus {
                        restart_count: held,
                        ..c.clone()
                    })
                } else {
                    container_json(c)
                }
            })
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminated(code: i32) -> Terminated {
        Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at: "2025-01-01T00:00:00Z".into(),
            finished_at: "2025-01-01T00:00:01Z".into(),
        }
    }

    fn status(name: &str, state: ContainerState, restarts: u32) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            image: "busybox".into(),
            state,
            last_termination: None,
            restart_count: restarts,
        }
    }

    #[test]
    fn recorded_containers_read_back_what_pod_status_wrote() {
        let mut backoff = status(
            "a",
            ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: "back-off 2s".into(),
            },
            3,
        );
        backoff.last_termination = Some(terminated(1));
        let mut done = status("b", ContainerState::Terminated(terminated(0)), 1);
        done.last_termination = Some(terminated(0));
        let mut running = status(
            "c",
            ContainerState::Running {
                started_at: "2025-01-01T00:00:02Z".into(),
            },
            0,
        );
        running.last_termination = None;
        let containers = vec![backoff, done, running];
        let written = pod_status(&Value::Null, RestartPolicy::OnFailure, &containers);
        assert_eq!(recorded_containers(&written), containers);
        assert!(recorded_containers(&Value::Null).is_empty());
        assert!(
            recorded_containers(&json!({"containerStatuses": [{"restartCount": 1}]})).is_empty()
        );
    }

    #[test]
    fn a_terminal_phase_is_kept_and_restart_counts_never_drop() {
        let failed = pod_status(
            &Value::Null,
            RestartPolicy::Never,
            &[status("main", ContainerState::Terminated(terminated(1)), 0)],
        );
        assert_eq!(failed["phase"], "Failed");
        assert!(is_terminal(&failed));
        // Whatever a runtime says later, the pod stays Failed.
        let later = pod_status(
            &failed,
            RestartPolicy::Never,
            &[status(
                "main",
                ContainerState::Running {
                    started_at: "2025-01-01T00:00:05Z".into(),
                },
                0,
            )],
        );
        assert_eq!(later["phase"], "Failed");

        let six = pod_status(
            &Value::Null,
            RestartPolicy::Always,
            &[status("main", ContainerState::Terminated(terminated(1)), 6)],
        );
        assert_eq!(six["containerStatuses"][0]["restartCount"], 6);
        assert!(!is_terminal(&six));
        let lower = pod_status(
            &six,
            RestartPolicy::Always,
            &[status("main", ContainerState::Terminated(terminated(1)), 5)],
        );
        assert_eq!(lower["containerStatuses"][0]["restartCount"], 6);
        let higher = pod_status(
            &six,
            RestartPolicy::Always,
            &[status("main", ContainerState::Terminated(terminated(1)), 7)],
        );
        assert_eq!(higher["containerStatuses"][0]["restartCount"], 7);
    }
}
