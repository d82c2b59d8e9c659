//! The DaemonSet controller: one pod per eligible node.
//!
//! A node is eligible when its labels match the template's `nodeSelector` and its required
//! node affinity (`nodeSelectorTerms`, any term; `matchExpressions` with `In`, `NotIn`,
//! `Exists`, `DoesNotExist`), and the template tolerates its `NoSchedule`/`NoExecute` taints.
//! Readiness does not matter: as upstream, a DaemonSet keeps (and makes) its pod on a NotReady
//! node, which at the edge keeps running it offline.
//!
//! Pods are created with `spec.nodeName` set (bound directly, as kube-scheduler-less DaemonSets
//! did before Kubernetes 1.12; upstream now uses node affinity and the scheduler) and the
//! label `controller-revision-hash` = the hash of the template they were made from. A pod on a
//! node that is no longer eligible (or gone) is deleted. `RollingUpdate` replaces pods of an old
//! template at most `maxUnavailable` nodes at a time (old pods that are not available anyway
//! go first and cost nothing); `OnDelete` leaves them. Matching pods without a controller are
//! adopted (and, lacking the current hash, replaced as old ones). Each template is kept as a
//! ControllerRevision ([`super::history`]), so `kubectl rollout history|undo daemonset` work.

use std::collections::BTreeMap;

use replication::api::object::{self, Object};
use serde_json::{json, Value};

use super::{
    claim, controller_reference, generation, history, int_or_percent, is_controlled_by,
    is_terminating, label, node_name, pod_active, pod_available, pod_ready, spec_i64,
    template_hash, with_label, Action, World, CONTROLLER_REVISION_HASH,
};

/// Every DaemonSet's actions.
pub fn reconcile(world: &World, now: i64) -> Vec<Action> {
    world
        .daemonsets
        .iter()
        .filter(|ds| !is_terminating(ds))
        .flat_map(|ds| {
            let claims = claim(
                ds,
                "apps/v1",
                "DaemonSet",
                "pods",
                world.pods_in(object::namespace(ds)),
            );
            if !claims.is_empty() {
                return claims;
            }
            let pods: Vec<&Object> = world
                .pods_in(object::namespace(ds))
                .filter(|p| is_controlled_by(p, ds))
                .collect();
            let in_use = pods
                .iter()
                .filter_map(|p| label(p, CONTROLLER_REVISION_HASH))
                .map(str::to_owned)
                .collect();
            let hash = template_hash(&template(ds));
            let mut actions =
                history::reconcile(ds, "DaemonSet", &hash, &world.controllerrevisions, &in_use);
            actions.extend(reconcile_one(ds, &world.nodes, &pods, now));
            actions
        })
        .collect()
}

fn pod_spec(ds: &Object) -> Option<&Value> {
    ds.get("spec")?.get("template")?.get("spec")
}

/// Whether a pod of `ds` should run on `node` (its nodeSelector, required node affinity and
/// tolerations; DaemonSet pods tolerate the node-condition taints by themselves, as upstream's).
pub fn eligible(ds: &Object, node: &Object) -> bool {
    let taints = node
        .get("spec")
        .and_then(|s| s.get("taints"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    crate::scheduler::fits(pod_spec(ds), object::labels(node), taints, true)
}

fn template(ds: &Object) -> Value {
    ds.get("spec")
        .and_then(|s| s.get("template"))
        .cloned()
        .unwrap_or_else(|| json!({}))
}

fn new_pod(ds: &Object, node: &str, hash: &str) -> Value {
    let template = template(ds);
    let mut metadata = json!({
        "generateName": format!("{}-", object::name(ds)),
        "namespace": object::namespace(ds),
        "labels": with_label(template.pointer("/metadata/labels"), CONTROLLER_REVISION_HASH, hash),
        "ownerReferences": [controller_reference(ds, "apps/v1", "DaemonSet")],
    });
    if let Some(a) = template.pointer("/metadata/annotations") {
        metadata["annotations"] = a.clone();
    }
    let mut spec = template.get("spec").cloned().unwrap_or_else(|| json!({}));
    spec["nodeName"] = json!(node);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

fn delete(pod: &Object) -> Action {
    Action::Delete {
        resource: "pods",
        namespace: object::namespace(pod).to_owned(),
        name: object::name(pod).to_owned(),
        uid: super::uid(pod).to_owned(),
    }
}

/// One DaemonSet's actions, given all nodes and the pods it controls.
pub fn reconcile_one(ds: &Object, nodes: &[Object], pods: &[&Object], now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let hash = template_hash(&template(ds));
    let min_ready = spec_i64(ds, "minReadySeconds").unwrap_or(0);
    let eligible_nodes: Vec<&str> = nodes
        .iter()
        .filter(|n| eligible(ds, n))
        .map(object::name)
        .collect();
    // Active pods by node, oldest first.
    let mut by_node: BTreeMap<&str, Vec<&Object>> = BTreeMap::new();
    for pod in pods.iter().copied().filter(|p| pod_active(p)) {
        by_node
            .entry(node_name(pod).unwrap_or_default())
            .or_default()
            .push(pod);
    }
    for list in by_node.values_mut() {
        list.sort_by_key(|p| {
            (
                object::meta_str(p, "creationTimestamp").map(str::to_owned),
                object::name(p).to_owned(),
            )
        });
    }
    let mut misscheduled = 0;
    for (node, list) in &by_node {
        if !eligible_nodes.contains(node) {
            misscheduled += 1;
            actions.extend(list.iter().map(|p| delete(p)));
        } else if list.len() > 1 {
            actions.extend(list[1..].iter().map(|p| delete(p)));
        }
    }
    let current = |node: &str| by_node.get(node).and_then(|l| l.first().copied());
    let mut available_nodes = 0;
    let mut ready_nodes = 0;
    let mut updated_nodes = 0;
    let mut scheduled_nodes = 0;
    let mut old_available = Vec::new();
    let mut unavailable = 0;
    for node in &eligible_nodes {
        match current(node) {
            None => {
                unavailable += 1;
                actions.push(Action::Create {
                    resource: "pods",
                    namespace: object::namespace(ds).to_owned(),
                    object: new_pod(ds, node, &hash),
                });
            }
            Some(pod) => {
                scheduled_nodes += 1;
                let is_new = label(pod, CONTROLLER_REVISION_HASH) == Some(hash.as_str());
                let available = pod_available(pod, min_ready, now);
                updated_nodes += usize::from(is_new);
                ready_nodes += usize::from(pod_ready(pod));
                available_nodes += usize::from(available);
                if !available {
                    unavailable += 1;
                }
                if !is_new {
                    if available {
                        old_available.push(pod);
                    } else if rolling(ds) {
                        // Costs no availability: replace it now.
                        actions.push(delete(pod));
                    }
                }
            }
        }
    }
    if rolling(ds) {
        let max_unavailable = int_or_percent(
            ds.get("spec")
                .and_then(|s| s.pointer("/updateStrategy/rollingUpdate/maxUnavailable")),
            1,
            eligible_nodes.len() as i64,
            true,
        )
        .max(1);
        let budget = (max_unavailable - unavailable as i64).max(0) as usize;
        actions.extend(old_available.iter().take(budget).map(|p| delete(p)));
    }
    let desired = eligible_nodes.len();
    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": scheduled_nodes,
        "numberMisscheduled": misscheduled,
        "numberReady": ready_nodes,
        "updatedNumberScheduled": updated_nodes,
        "numberAvailable": available_nodes,
        "numberUnavailable": desired - available_nodes,
        "observedGeneration": generation(ds),
    });
    let mut status = status;
    if let Some(map) = status.as_object_mut() {
        // Go's JSON omits these when zero; the others it always writes.
        for f in [
            "updatedNumberScheduled",
            "numberAvailable",
            "numberUnavailable",
            "observedGeneration",
        ] {
            if map.get(f).and_then(Value::as_i64) == Some(0) {
                map.remove(f);
            }
        }
    }
    if ds.get("status") != Some(&status) {
        let mut updated = ds.clone();
        updated.insert("status".into(), status);
        actions.push(Action::UpdateStatus {
            resource: "daemonsets",
            object: Value::Object(updated),
        });
    }
    actions
}

fn rolling(ds: &Object) -> bool {
    ds.get("spec")
        .and_then(|s| s.pointer("/updateStrategy/type"))
        .and_then(Value::as_str)
        != Some("OnDelete")
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn ds(node_selector: Value, image: &str) -> Object {
        obj(json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "default", "uid": "ds-uid",
                         "generation": 1, "resourceVersion": "2"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"nodeSelector": node_selector,
                                           "containers": [{"name": "c", "image": image}]}}}}))
    }

    fn created_on(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { object, .. } => {
                    Some(object["spec"]["nodeName"].as_str().unwrap().to_owned())
                }
                _ => None,
            })
            .collect()
    }

    fn deleted(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_pod_per_matching_node_including_not_ready_and_late_joiners() {
        let ds = ds(json!({"zone": "a"}), "agent:1");
        let mut nodes = vec![
            node("n1", true, json!({"zone": "a"})),
            node("n2", false, json!({"zone": "a"})),
            node("n3", true, json!({"zone": "b"})),
        ];
        let actions = reconcile_one(&ds, &nodes, &[], T0);
        assert_eq!(created_on(&actions), ["n1", "n2"]);
        let p1 = pod_from(&actions[0], "agent-1", None, Some(T0));
        let p2 = pod_from(&actions[1], "agent-2", None, Some(T0));
        assert_eq!(
            p1["metadata"]["labels"][CONTROLLER_REVISION_HASH],
            template_hash(&template(&ds))
        );
        assert_eq!(p1["metadata"]["labels"]["app"], "agent");
        // A node joining later gets its pod; the others keep theirs.
        nodes.push(node("n4", true, json!({"zone": "a"})));
        let actions = reconcile_one(&ds, &nodes, &[&p1, &p2], T0);
        assert_eq!(created_on(&actions), ["n4"]);
        // A node losing the label loses its pod.
        nodes[0] = node("n1", true, json!({"zone": "c"}));
        let actions = reconcile_one(&ds, &nodes, &[&p1, &p2], T0);
        assert_eq!(deleted(&actions), ["agent-1"]);
        let status = applied(actions.last().unwrap());
        assert_eq!(status["status"]["desiredNumberScheduled"], 2);
        assert_eq!(status["status"]["numberMisscheduled"], 1);
    }

    #[test]
    fn taints_affinity_and_tolerations() {
        let mut ds = ds(json!({}), "agent:1");
        let mut tainted = node("t", true, json!({"zone": "a"}));
        tainted.insert(
            "spec".into(),
            json!({"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}),
        );
        assert!(!eligible(&ds, &tainted));
        ds["spec"]["template"]["spec"]["tolerations"] =
            json!([{"key": "dedicated", "operator": "Equal", "value": "gpu"}]);
        assert!(eligible(&ds, &tainted));
        ds["spec"]["template"]["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
                                  {"matchExpressions": [{"key": "arch", "operator": "Exists"}]}]}}});
        assert!(!eligible(&ds, &tainted));
        assert!(eligible(&ds, &node("x", true, json!({"arch": "arm64"}))));
    }

    #[test]
    fn rolling_update_replaces_at_most_max_unavailable_at_a_time() {
        let old_ds = ds(json!({}), "agent:1");
        let nodes: Vec<Object> = (1..=3)
            .map(|i| node(&format!("n{i}"), true, json!({})))
            .collect();
        let creates = reconcile_one(&old_ds, &nodes, &[], T0);
        let pods: Vec<Object> = (0..3)
            .map(|i| pod_from(&creates[i], &format!("old-{i}"), None, Some(T0)))
            .collect();
        let refs: Vec<&Object> = pods.iter().collect();
        let mut new_ds = ds(json!({}), "agent:2");
        new_ds["metadata"]["generation"] = json!(2);
        let actions = reconcile_one(&new_ds, &nodes, &refs, T0 + 1);
        assert_eq!(deleted(&actions), ["old-0"]);
        // old-0 is gone: n1 gets a new pod, and nothing else goes while n1 is unavailable.
        let actions = reconcile_one(&new_ds, &nodes, &refs[1..], T0 + 2);
        assert_eq!(created_on(&actions), ["n1"]);
        assert!(deleted(&actions).is_empty());
        let fresh = pod_from(&actions[0], "new-0", None, None);
        let actions = reconcile_one(&new_ds, &nodes, &[&fresh, refs[1], refs[2]], T0 + 3);
        assert!(deleted(&actions).is_empty());
        let status = applied(actions.last().unwrap());
        assert_eq!(status["status"]["updatedNumberScheduled"], 1);
        assert_eq!(status["status"]["numberAvailable"], 2);
        // Ready: the next old one goes.
        let fresh = pod_from(
            &actions_create(&new_ds, &nodes),
            "new-0",
            Some("n1"),
            Some(T0 + 4),
        );
        let actions = reconcile_one(&new_ds, &nodes, &[&fresh, refs[1], refs[2]], T0 + 5);
        assert_eq!(deleted(&actions), ["old-1"]);
    }

    fn actions_create(ds: &Object, nodes: &[Object]) -> Action {
        reconcile_one(ds, &nodes[..1], &[], T0).remove(0)
    }
}
