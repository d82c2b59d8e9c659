//! The minimal scheduler of the embedded mode: a pod without `spec.nodeName` is bound to a Ready,
//! uncordoned edge node that [`fits`] it (its `nodeSelector`, required node affinity, and
//! tolerations of the node's `NoSchedule`/`NoExecute` taints), fewest pods first.
//!
//! It follows the store's watch (nodes and pods), keeps pod counts per node and the unbound pods
//! incrementally, and retries unbound pods when a node changes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::api::selector::LabelSelector;
use replication::watcher::{Event, ResumableWatcher};

use crate::events::{EventType, Involved};

/// The component the scheduler's Events name (Kubernetes' scheduler name).
const SCHEDULER: &str = "default-scheduler";
use replication::{ChangeKind, KeyRange, ObjectKey, Precondition, Store, WriteSet};
use serde_json::{json, Value};

/// The label every edge node carries.
pub const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";

#[derive(Default)]
struct NodeInfo {
    labels: Object,
    /// `spec.taints` (`kubectl taint`).
    taints: Vec<Value>,
    ready: bool,
    /// Cordoned (`spec.unschedulable`, `kubectl cordon`/`drain`): no new pods.
    unschedulable: bool,
    pods: usize,
}

#[derive(Default)]
pub struct Scheduler {
    nodes: HashMap<String, NodeInfo>,
    /// Which node each bound pod is on (for counts when pods go away).
    bound: HashMap<ObjectKey, String>,
    unbound: BTreeSet<ObjectKey>,
    /// Unbound pods already marked Unschedulable (marked once, not on every retry).
    marked: BTreeSet<ObjectKey>,
}

/// Whether `tolerations` (a pod's) tolerate `taint` (a node's), as Kubernetes matches them:
/// same key (or an empty key with `Exists`), same value unless `Exists`, same effect unless the
/// toleration names none.
pub fn tolerates(tolerations: &[Value], taint: &Value) -> bool {
    let field = |v: &Value, f: &str| {
        v.get(f)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    tolerations.iter().any(|t| {
        let key = field(t, "key");
        let operator = t.get("operator").and_then(Value::as_str).unwrap_or("Equal");
        let effect = field(t, "effect");
        let key_ok = key.is_empty() && operator == "Exists" || key == field(taint, "key");
        let value_ok = operator == "Exists" || field(t, "value") == field(taint, "value");
        let effect_ok = effect.is_empty() || effect == field(taint, "effect");
        key_ok && value_ok && effect_ok
    })
}

/// Whether a pod with `spec` may go to a node with `labels` and `taints`: its `nodeSelector`,
/// its required node affinity (`nodeSelectorTerms`, any term), and every `NoSchedule` or
/// `NoExecute` taint tolerated (`PreferNoSchedule` does not bind). With
/// `condition_taints_tolerated` (DaemonSet pods), the node-condition taints
/// (`node.kubernetes.io/not-ready`, `unreachable`, `unschedulable`) are tolerated by default.
pub fn fits(
    spec: Option<&Value>,
    labels: Option<&Object>,
    taints: &[Value],
    condition_taints_tolerated: bool,
) -> bool {
    let selector_ok = spec
        .and_then(|s| s.get("nodeSelector"))
        .and_then(Value::as_object)
        .is_none_or(|m| LabelSelector::from_map(m).matches_labels(labels));
    let terms = spec
        .and_then(|s| {
            s.pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        })
        .and_then(Value::as_array);
    let affinity_ok = terms.is_none_or(|terms| {
        terms.iter().any(|term| {
            let expressions = json!({"matchExpressions": term.get("matchExpressions").cloned().unwrap_or(json!([]))});
            LabelSelector::from_label_selector(&expressions).is_ok_and(|s| s.matches_labels(labels))
        })
    });
    let tolerations = spec
        .and_then(|s| s.get("tolerations"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let taints_ok = taints
        .iter()
        .filter(|t| {
            matches!(
                t.get("effect").and_then(Value::as_str),
                Some("NoSchedule" | "NoExecute")
            )
        })
        .filter(|t| {
            !condition_taints_tolerated
                || !t.get("key").and_then(Value::as_str).is_some_and(|k| {
                    matches!(
                        k,
                        "node.kubernetes.io/not-ready"
                            | "node.kubernetes.io/unreachable"
                            | "node.kubernetes.io/unschedulable"
                    )
                })
        })
        .all(|t| tolerates(tolerations, t));
    selector_ok && affinity_ok && taints_ok
}

/// The node's `Ready` condition, if it has one.
pub fn ready_condition(node: &Object) -> Option<&Value> {
    node.get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
}

pub fn node_is_ready(node: &Object) -> bool {
    ready_condition(node).and_then(|c| c.get("status")?.as_str()) == Some("True")
}

fn node_name_of(pod: &Object) -> Option<&str> {
    pod.get("spec")
        .and_then(|s| s.get("nodeName"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

impl Scheduler {
    /// Folds one object change into the scheduler's view.
    pub fn observe(&mut self, key: &ObjectKey, deleted: bool, object: &[u8]) {
        let parsed: Option<Object> = serde_json::from_slice(object).ok();
        match key.kind() {
            "nodes" => {
                if deleted {
                    self.nodes.remove(key.name());
                    return;
                }
                let Some(node) = parsed else { return };
                let info = self.nodes.entry(key.name().to_owned()).or_default();
                info.labels = object::labels(&node).cloned().unwrap_or_default();
                info.ready = node_is_ready(&node);
                info.unschedulable = node
                    .get("spec")
                    .and_then(|s| s.get("unschedulable"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                info.taints = node
                    .get("spec")
                    .and_then(|s| s.get("taints"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
            }
            "pods" => {
                if let Some(old) = self.bound.remove(key) {
                    if let Some(info) = self.nodes.get_mut(&old) {
                        info.pods = info.pods.saturating_sub(1);
                    }
                }
                self.unbound.remove(key);
                if deleted {
                    self.marked.remove(key);
                    return;
                }
                let Some(pod) = parsed else { return };
                match node_name_of(&pod) {
                    Some(node) => {
                        self.marked.remove(key);
                        self.nodes.entry(node.to_owned()).or_default().pods += 1;
                        self.bound.insert(key.clone(), node.to_owned());
                    }
                    None if object::meta(&pod)
                        .is_some_and(|m| m.contains_key("deletionTimestamp")) => {}
                    None => {
                        self.unbound.insert(key.clone());
                    }
                }
            }
            _ => {}
        }
    }

    /// The node for `pod`: Ready, an edge node, not cordoned, one it [`fits`], fewest pods,
    /// then name.
    pub fn pick(&self, pod: &Object) -> Option<String> {
        let spec = pod.get("spec");
        self.nodes
            .iter()
            .filter(|(_, n)| n.ready && !n.unschedulable && n.labels.contains_key(EDGE_ROLE_LABEL))
            .filter(|(_, n)| fits(spec, Some(&n.labels), &n.taints, false))
            .min_by(|a, b| a.1.pods.cmp(&b.1.pods).then(a.0.cmp(b.0)))
            .map(|(name, _)| name.clone())
    }

    /// Tries to bind every unbound pod; returns how many were bound.
    pub fn schedule(&mut self, store: &Store) -> usize {
        let mut bound = 0;
        let pending: Vec<ObjectKey> = self.unbound.iter().cloned().collect();
        for key in pending {
            let current = match store.get(&key) {
                Ok(Some(current)) => current,
                Ok(None) => {
                    self.unbound.remove(&key);
                    continue;
                }
                // Not taken for absence: the pod stays pending and is tried again.
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "cannot read the pod; retrying");
                    continue;
                }
            };
            let Ok(mut pod) = serde_json::from_slice::<Object>(&current.object) else {
                continue;
            };
            if node_name_of(&pod).is_some() {
                continue;
            }
            let choice = self.pick(&pod);
            let condition = match &choice {
                Some(_) => json!({"type": "PodScheduled", "status": "True",
                                   "lastTransitionTime": object::now_rfc3339()}),
                None if self.marked.contains(&key) => continue,
                None => {
                    json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                "message": "no Ready edge node matches the pod's nodeSelector",
                                "lastTransitionTime": object::now_rfc3339()})
                }
            };
            if let Some(node) = &choice {
                if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.insert("nodeName".into(), json!(node));
                }
            }
            let status = pod.entry("status").or_insert_with(|| json!({}));
            if let Some(status) = status.as_object_mut() {
                let conditions = status.entry("conditions").or_insert_with(|| json!([]));
                if let Some(list) = conditions.as_array_mut() {
                    list.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
                    list.push(condition);
                }
            }
            let mut set = WriteSet::new();
            set.put(
                key.clone(),
                Bytes::from(serde_json::to_vec(&pod).expect("json")),
                Precondition::Version(current.rv),
            );
            match store.commit(set) {
                Ok(_) if choice.is_some() => {
                    tracing::info!(pod = %key, node = ?choice, "scheduled");
                    let message = format!(
                        "Successfully assigned {}/{} to {}",
                        key.namespace(),
                        key.name(),
                        choice.as_deref().unwrap_or_default()
                    );
                    crate::events::emit(
                        store,
                        &Involved::of(&pod),
                        EventType::Normal,
                        "Scheduled",
                        &message,
                        SCHEDULER,
                    );
                    bound += 1;
                }
                Ok(_) => {
                    self.marked.insert(key.clone());
                    let message = format!(
                        "0/{} nodes are available: no Ready, schedulable edge node matches the pod's nodeSelector",
                        self.nodes.len()
                    );
                    crate::events::emit(
                        store,
                        &Involved::of(&pod),
                        EventType::Warning,
                        "FailedScheduling",
                        &message,
                        SCHEDULER,
                    );
                }
                // A racing write: the watch brings the new version and we try again.
                Err(e) => tracing::debug!(pod = %key, error = %e, "bind raced a write"),
            }
        }
        bound
    }
}

/// A scheduler that knows every node and pod in the store.
fn from_store(store: &Store) -> Scheduler {
    let mut scheduler = Scheduler::default();
    for kind in ["nodes", "pods"] {
        let Ok(range) = KeyRange::kind(kind) else {
            continue;
        };
        for (key, v) in store.scan(&range).flatten() {
            scheduler.observe(&key, false, &v.object);
        }
    }
    scheduler
}

/// Runs the scheduler until the store's watch closes.
pub async fn run(store: Arc<Store>) {
    let mut watcher = ResumableWatcher::all(store.clone());
    let mut scheduler = Scheduler::default();
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        scheduler.schedule(&store);
        tokio::select! {
            event = watcher.next() => {
                let mut event = event;
                // Everything already queued before scheduling again.
                loop {
                    match event {
                        Ok(Event::Change(change)) => scheduler.observe(
                            &change.key,
                            change.kind == ChangeKind::Deleted,
                            &change.object,
                        ),
                        // (Re)started: the pods and nodes are read from the store.
                        Ok(Event::Restart { .. }) => scheduler = from_store(&store),
                        Err(_) => return,
                    }
                    event = match watcher.try_next() {
                        Ok(Some(next)) => Ok(next),
                        Ok(None) => break,
                        Err(e) => Err(e),
                    };
                }
            }
            _ = retry.tick() => {
                scheduler.marked.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    fn node(ready: bool, labels: Value) -> Vec<u8> {
        let status = if ready { "True" } else { "Unknown" };
        serde_json::to_vec(&json!({"metadata": {"labels": labels},
            "status": {"conditions": [{"type": "Ready", "status": status}]}}))
        .unwrap()
    }

    #[test]
    fn picks_ready_matching_least_loaded_edge_node() {
        let mut s = Scheduler::default();
        let edge = |zone: &str| json!({EDGE_ROLE_LABEL: "", "zone": zone});
        s.observe(&key("nodes//a"), false, &node(true, edge("x")));
        s.observe(&key("nodes//b"), false, &node(true, edge("y")));
        s.observe(&key("nodes//c"), false, &node(false, edge("x")));
        s.observe(&key("nodes//d"), false, &node(true, json!({})));
        let pod_on = |n: &str| serde_json::to_vec(&json!({"spec": {"nodeName": n}})).unwrap();
        s.observe(&key("pods/default/p1"), false, &pod_on("a"));
        let pod: Object = serde_json::from_value(json!({"spec": {}})).unwrap();
        assert_eq!(s.pick(&pod).as_deref(), Some("b"));
        let zoned: Object =
            serde_json::from_value(json!({"spec": {"nodeSelector": {"zone": "x"}}})).unwrap();
        assert_eq!(s.pick(&zoned).as_deref(), Some("a"));
        s.observe(&key("pods/default/p1"), true, b"{}");
        assert_eq!(s.pick(&pod).as_deref(), Some("a"));
        let nowhere: Object =
            serde_json::from_value(json!({"spec": {"nodeSelector": {"zone": "z"}}})).unwrap();
        assert_eq!(s.pick(&nowhere), None);
        // Cordoned (kubectl cordon / drain): no new pods.
        let cordoned = serde_json::to_vec(&json!({"metadata": {"labels": edge("x")},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
        .unwrap();
        s.observe(&key("nodes//a"), false, &cordoned);
        assert_eq!(s.pick(&zoned), None);
        assert_eq!(s.pick(&pod).as_deref(), Some("b"));
    }

    #[test]
    fn taints_keep_pods_off_unless_tolerated_and_required_affinity_binds() {
        let mut s = Scheduler::default();
        let tainted = serde_json::to_vec(
            &json!({"metadata": {"labels": {EDGE_ROLE_LABEL: "", "zone": "x"}},
            "spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                                {"key": "soft", "effect": "PreferNoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        )
        .unwrap();
        s.observe(&key("nodes//gpu"), false, &tainted);
        let plain: Object = serde_json::from_value(json!({"spec": {}})).unwrap();
        assert_eq!(s.pick(&plain), None, "an untolerated NoSchedule taint");
        let tolerant: Object = serde_json::from_value(json!({"spec": {"tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}}))
        .unwrap();
        assert_eq!(s.pick(&tolerant).as_deref(), Some("gpu"));
        let everything: Object = serde_json::from_value(json!({"spec": {"tolerations": [
            {"operator": "Exists"}]}}))
        .unwrap();
        assert_eq!(s.pick(&everything).as_deref(), Some("gpu"));
        let elsewhere: Object = serde_json::from_value(json!({"spec": {
            "tolerations": [{"operator": "Exists"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["y"]}]}]}}}}}))
        .unwrap();
        assert_eq!(s.pick(&elsewhere), None, "required node affinity");
    }
}
