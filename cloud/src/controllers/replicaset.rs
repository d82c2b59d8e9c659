//! The ReplicaSet controller: keeps `spec.replicas` active pods controlled by each ReplicaSet.
//!
//! Pods are made from `spec.template` with `generateName: <replicaset>-` (the API adds five
//! random characters) and a controller ownerReference. Extras are deleted most expendable first
//! (unscheduled, then Pending, then not ready, then the most recently ready, then the newest),
//! as upstream ranks them.
//!
//! Pods without a controller that match the selector are adopted, controlled pods that no
//! longer match it (relabelled to be debugged) are released and replaced.
//!
//! Edge autonomy: a pod bound to a NotReady edge node is still active (the node keeps running
//! it while the cloud cannot see it, kubeedge#4659), so it counts toward `replicas` and is not
//! replaced; only a pod that is deleted or finished (Succeeded/Failed) is.

use std::cmp::Reverse;

use replication::api::object::{self, Object};
use replication::api::selector::LabelSelector;
use serde_json::{json, Value};

use super::{
    claim, generation, is_controlled_by, is_terminating, node_name, pod_active, pod_available,
    pod_from_template, pod_ready, replicas, spec_i64, Action, World,
};

/// Most pods one ReplicaSet creates in a pass (the next pass creates the rest).
const CREATE_BURST: usize = 100;

/// Every ReplicaSet's actions.
pub fn reconcile(world: &World, now: i64) -> Vec<Action> {
    world
        .replicasets
        .iter()
        .filter(|rs| !is_terminating(rs))
        .flat_map(|rs| {
            let claims = claim(
                rs,
                "apps/v1",
                "ReplicaSet",
                "pods",
                world.pods_in(object::namespace(rs)),
            );
            if !claims.is_empty() {
                // Count the pods again once the ownership changes are written.
                return claims;
            }
            let pods: Vec<&Object> = world
                .pods_in(object::namespace(rs))
                .filter(|p| is_controlled_by(p, rs))
                .collect();
            reconcile_one(rs, &pods, now)
        })
        .collect()
}

/// The deletion rank of a pod: lower goes first.
fn deletion_rank(pod: &Object) -> impl Ord {
    let phase = pod
        .get("status")
        .and_then(|s| s.get("phase"))
        .and_then(Value::as_str);
    let phase_rank = match phase {
        Some("Pending") => 0,
        Some("Unknown") => 1,
        _ => 2,
    };
    let created = object::meta_str(pod, "creationTimestamp")
        .and_then(object::parse_rfc3339)
        .unwrap_or(0);
    (
        node_name(pod).is_some(),
        phase_rank,
        pod_ready(pod),
        Reverse(created),
        object::name(pod).to_owned(),
    )
}

/// One ReplicaSet's actions, given the pods it controls.
pub fn reconcile_one(rs: &Object, pods: &[&Object], now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    // An invalid selector (the API refuses those) selects nothing: no action.
    let Some(_selector) = rs
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(|s| LabelSelector::from_label_selector(s).ok())
    else {
        return actions;
    };
    let active: Vec<&Object> = pods.iter().copied().filter(|p| pod_active(p)).collect();
    let want = replicas(rs).max(0) as usize;
    if active.len() < want {
        let missing = (want - active.len()).min(CREATE_BURST);
        for _ in 0..missing {
            actions.push(Action::Create {
                resource: "pods",
                namespace: object::namespace(rs).to_owned(),
                object: pod_from_template(rs, "apps/v1", "ReplicaSet"),
            });
        }
    } else if active.len() > want {
        let mut ranked = active.clone();
        ranked.sort_by_key(|p| deletion_rank(p));
        for pod in ranked.iter().take(active.len() - want) {
            actions.push(Action::Delete {
                resource: "pods",
                namespace: object::namespace(pod).to_owned(),
                name: object::name(pod).to_owned(),
                uid: super::uid(pod).to_owned(),
            });
        }
    }
    let min_ready = spec_i64(rs, "minReadySeconds").unwrap_or(0);
    let template_labels = rs
        .get("spec")
        .and_then(|s| s.get("template"))
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(LabelSelector::from_map)
        .unwrap_or_default();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.iter().filter(|p| template_labels.matches(p)).count(),
        "readyReplicas": active.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": active.iter().filter(|p| pod_available(p, min_ready, now)).count(),
        "observedGeneration": generation(rs),
    });
    if rs.get("status") != Some(&status) {
        let mut updated = rs.clone();
        updated.insert("status".into(), status);
        actions.push(Action::UpdateStatus {
            resource: "replicasets",
            object: Value::Object(updated),
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn rs(replicas: i64) -> Object {
        obj(json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "web-abc", "namespace": "default", "uid": "rs-uid",
                         "generation": 1, "resourceVersion": "5"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}))
    }

    fn creates(actions: &[Action]) -> Vec<&Action> {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Create { .. }))
            .collect()
    }

    fn deletes(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn creates_missing_pods_from_the_template_with_an_owner() {
        let rs = rs(3);
        let actions = reconcile_one(&rs, &[], T0);
        let made = creates(&actions);
        assert_eq!(made.len(), 3);
        let Action::Create { object, .. } = made[0] else {
            unreachable!()
        };
        assert_eq!(object["metadata"]["generateName"], "web-abc-");
        assert_eq!(object["metadata"]["labels"]["app"], "web");
        assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "rs-uid");
        assert_eq!(object["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(object["spec"]["containers"][0]["image"], "busybox");
        // Status so far: nothing observed yet.
        let status = applied(actions.last().unwrap());
        assert_eq!(status["status"]["replicas"], 0);
        assert_eq!(status["status"]["observedGeneration"], 1);
    }

    #[test]
    fn status_counts_ready_and_available_with_min_ready_seconds() {
        let mut rs = rs(2);
        rs["spec"]["minReadySeconds"] = json!(10);
        let create = &reconcile_one(&rs, &[], T0)[0];
        let a = pod_from(create, "web-abc-aaaaa", Some("n1"), Some(T0));
        let b = pod_from(create, "web-abc-bbbbb", Some("n1"), None);
        let pods = [&a, &b];
        let status = applied(reconcile_one(&rs, &pods, T0 + 5).last().unwrap());
        assert_eq!(status["status"]["readyReplicas"], 1);
        assert_eq!(status["status"]["availableReplicas"], 0);
        assert_eq!(status["status"]["fullyLabeledReplicas"], 2);
        let status = applied(reconcile_one(&rs, &pods, T0 + 10).last().unwrap());
        assert_eq!(status["status"]["availableReplicas"], 1);
        // Once written, the same observation writes nothing.
        let mut rs = rs.clone();
        rs.insert("status".into(), status["status"].clone());
        assert!(reconcile_one(&rs, &pods, T0 + 10).is_empty());
    }

    #[test]
    fn deletes_extras_unscheduled_then_not_ready_then_newest() {
        let rs = rs(1);
        let create = &reconcile_one(&rs, &[], T0)[0];
        let ready_old = pod_from(create, "ready-old", Some("n1"), Some(T0));
        let mut ready_new = pod_from(create, "ready-new", Some("n1"), Some(T0));
        object::meta_mut(&mut ready_new).insert(
            "creationTimestamp".into(),
            json!(super::super::rfc3339(T0 + 60)),
        );
        let not_ready = pod_from(create, "not-ready", Some("n1"), None);
        let unscheduled = pod_from(create, "unscheduled", None, None);
        let pods = [&ready_old, &ready_new, &not_ready, &unscheduled];
        assert_eq!(
            deletes(&reconcile_one(&rs, &pods, T0 + 100)),
            ["unscheduled", "not-ready", "ready-new"]
        );
    }

    #[test]
    fn a_pod_on_a_not_ready_node_is_not_replaced_but_a_deleted_or_failed_one_is() {
        // Edge autonomy: the node keeps running its pod while it cannot reach the cloud.
        let rs = rs(2);
        let create = &reconcile_one(&rs, &[], T0)[0];
        let on_ready = pod_from(create, "a", Some("ready-node"), Some(T0));
        // Its node went NotReady: edged cannot report, the last status stays Running/Ready.
        let on_offline = pod_from(create, "b", Some("offline-node"), Some(T0));
        let pods = [&on_ready, &on_offline];
        assert!(creates(&reconcile_one(&rs, &pods, T0 + 3600)).is_empty());

        let mut failed = on_offline.clone();
        failed["status"]["phase"] = json!("Failed");
        assert_eq!(
            creates(&reconcile_one(&rs, &[&on_ready, &failed], T0)).len(),
            1
        );
        let mut deleting = on_offline.clone();
        object::meta_mut(&mut deleting).insert("deletionTimestamp".into(), json!("x"));
        assert_eq!(
            creates(&reconcile_one(&rs, &[&on_ready, &deleting], T0)).len(),
            1
        );
    }

    #[test]
    fn only_controlled_pods_count_and_orphans_are_adopted_first() {
        let rs = rs(1);
        let create = &reconcile_one(&rs, &[], T0)[0];
        let mut foreign = pod_from(create, "foreign", Some("n1"), Some(T0));
        object::meta_mut(&mut foreign).insert(
            "ownerReferences".into(),
            json!([{"uid": "another", "controller": true}]),
        );
        let world = World {
            replicasets: vec![rs.clone()],
            pods: vec![foreign.clone()],
            ..World::default()
        };
        assert_eq!(creates(&reconcile(&world, T0)).len(), 1);
        let mut orphan = foreign;
        object::meta_mut(&mut orphan).insert("ownerReferences".into(), json!([]));
        let world = World {
            pods: vec![orphan],
            ..world
        };
        let actions = reconcile(&world, T0);
        assert_eq!(actions.len(), 1);
        assert_eq!(
            applied(&actions[0])["metadata"]["ownerReferences"][0]["uid"],
            "rs-uid"
        );
    }
}
