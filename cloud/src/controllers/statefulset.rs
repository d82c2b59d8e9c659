//! The StatefulSet controller: pods with stable names (`<set>-0` … `<set>-(N-1)`) and stable
//! claims, as upstream's.
//!
//! - **Identity**: pod `i` is named `<set>-i`, labelled `statefulset.kubernetes.io/pod-name`
//!   and `apps.kubernetes.io/pod-index`, with `hostname` = its name and `subdomain` =
//!   `spec.serviceName`.
//! - **Storage**: each `volumeClaimTemplates` entry `t` becomes a PersistentVolumeClaim
//!   `t-<set>-i`, created before the pod and mounted as volume `t`; claims are kept when the
//!   set scales down or is deleted (`persistentVolumeClaimRetentionPolicy` Retain, the default).
//!   `whenScaled: Delete` deletes the claims of ordinals scaled away once their pod is gone;
//!   `whenDeleted: Delete` gives the claims an ownerReference to the set, so the garbage
//!   collector deletes them with it (as upstream; switching back to Retain takes it off).
//! - **Ordering** (`podManagementPolicy`): `OrderedReady` creates pod `i` only once pods
//!   `0..i` are Running and Ready, and removes the highest ordinal first, one at a time;
//!   `Parallel` creates and removes all at once.
//! - **Updates** (`updateStrategy`): `RollingUpdate` replaces the pods whose
//!   `controller-revision-hash` is not the template's, highest ordinal first, one at a time,
//!   only while every pod is Ready, and never below `rollingUpdate.partition`; `OnDelete`
//!   leaves them for the user to delete.
//! - A Failed or Succeeded pod is deleted and made again.
//!
//! Edge autonomy: a pod on a NotReady node keeps its identity (it is not recreated elsewhere:
//! two pods with one identity is what a StatefulSet exists to prevent).
//!
//! Each template is kept as a ControllerRevision `<set>-<hash>` ([`super::history`]), so
//! `kubectl rollout history|undo statefulset` work.
//!
//! - **Ordinals** start at `spec.ordinals.start` (0 by default): pods `<set>-start` …
//!   `<set>-(start+N-1)`; pods of ordinals outside that range are removed as a scale-down
//!   removes them, highest first. `partition` counts from the start (upstream's indexing).
//! - **`rollingUpdate.maxUnavailable`** (a number or a percentage of the replicas, rounded up,
//!   at least 1; 1 by default): a rolling update replaces up to that many pods at once,
//!   counting the pods of the set that are already unavailable (upstream's
//!   `MaxUnavailableStatefulSet`).

use std::collections::BTreeMap;

use replication::api::object::{self, Object};
use serde_json::{json, Value};

use super::{
    claim, generation, history, int_or_percent, is_controlled_by, is_terminating, label,
    pod_available, pod_from_template, pod_ready, replicas, spec_i64, template_hash, uid, Action,
    World, CONTROLLER_REVISION_HASH,
};

/// The label naming a StatefulSet pod (Kubernetes' name).
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// The label holding a StatefulSet pod's ordinal (Kubernetes' name).
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// Every StatefulSet's actions.
pub fn reconcile(world: &World, now: i64) -> Vec<Action> {
    world
        .statefulsets
        .iter()
        .filter(|s| !is_terminating(s))
        .flat_map(|set| {
            let namespace = object::namespace(set);
            let claims = claim(
                set,
                "apps/v1",
                "StatefulSet",
                "pods",
                world.pods_in(namespace),
            );
            if !claims.is_empty() {
                return claims;
            }
            let pods: Vec<&Object> = world
                .pods_in(namespace)
                .filter(|p| is_controlled_by(p, set))
                .collect();
            let claims: Vec<&str> = world
                .persistentvolumeclaims
                .iter()
                .filter(|c| object::namespace(c) == namespace)
                .map(object::name)
                .collect();
            // The pods carry the revision's name (`<set>-<hash>`), the revision the hash.
            let prefix = format!("{}-", object::name(set));
            let in_use = pods
                .iter()
                .filter_map(|p| label(p, CONTROLLER_REVISION_HASH))
                .filter_map(|r| r.strip_prefix(&prefix))
                .map(str::to_owned)
                .collect();
            let hash = update_revision(set)[prefix.len()..].to_owned();
            let mut actions = history::reconcile(
                set,
                "StatefulSet",
                &hash,
                &world.controllerrevisions,
                &in_use,
            );
            actions.extend(reconcile_one(set, &pods, &claims, now));
            let claim_objects: Vec<&Object> = world
                .persistentvolumeclaims
                .iter()
                .filter(|c| object::namespace(c) == namespace)
                .collect();
            actions.extend(claim_retention(set, &pods, &claim_objects));
            actions
        })
        .collect()
}

fn spec_str<'a>(set: &'a Object, pointer: &str) -> Option<&'a str> {
    set.get("spec")?.pointer(pointer)?.as_str()
}

/// The revision of the set's current template (`<set>-<hash>`, as the pods' label).
pub fn update_revision(set: &Object) -> String {
    let template = set
        .get("spec")
        .and_then(|s| s.get("template"))
        .cloned()
        .unwrap_or(Value::Null);
    format!("{}-{}", object::name(set), template_hash(&template))
}

fn claim_templates(set: &Object) -> Vec<Value> {
    set.get("spec")
        .and_then(|s| s.get("volumeClaimTemplates"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn claim_name(template: &Value, set: &Object, ordinal: usize) -> String {
    let t = template
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    format!("{t}-{}-{ordinal}", object::name(set))
}

/// What `persistentVolumeClaimRetentionPolicy` asks of the set's claims (see the module docs):
/// deletes for claims of ordinals scaled away (`whenScaled: Delete`, once no pod has the
/// ordinal), and ownerReference updates (`whenDeleted`).
pub fn claim_retention(set: &Object, pods: &[&Object], claims: &[&Object]) -> Vec<Action> {
    let policy = |field: &str| {
        spec_str(
            set,
            &format!("/persistentVolumeClaimRetentionPolicy/{field}"),
        ) == Some("Delete")
    };
    let (when_deleted, when_scaled) = (policy("whenDeleted"), policy("whenScaled"));
    let range = ordinals(set);
    let set_uid = uid(set);
    let mut actions = Vec::new();
    for template in claim_templates(set) {
        let prefix = claim_name(&template, set, 0);
        let prefix = &prefix[..prefix.len() - 1];
        for claim in claims {
            let Some(ordinal) = object::name(claim)
                .strip_prefix(prefix)
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let pod_name = format!("{}-{ordinal}", object::name(set));
            let pod_left = pods.iter().any(|p| object::name(p) == pod_name);
            if when_scaled && !range.contains(&ordinal) && !pod_left && !is_terminating(claim) {
                actions.push(Action::Delete {
                    resource: "persistentvolumeclaims",
                    namespace: object::namespace(claim).to_owned(),
                    name: object::name(claim).to_owned(),
                    uid: uid(claim).to_owned(),
                });
                continue;
            }
            let refs: Vec<Value> = object::meta(claim)
                .and_then(|m| m.get("ownerReferences"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let owned = refs.iter().any(|r| r["uid"] == set_uid);
            if when_deleted == owned {
                continue;
            }
            let refs: Vec<Value> = if when_deleted {
                let mut reference = super::controller_reference(set, "apps/v1", "StatefulSet");
                reference["controller"] = json!(false);
                refs.into_iter().chain([reference]).collect()
            } else {
                refs.into_iter().filter(|r| r["uid"] != set_uid).collect()
            };
            let mut updated = (*claim).clone();
            object::meta_mut(&mut updated).insert("ownerReferences".into(), json!(refs));
            actions.push(Action::Update {
                resource: "persistentvolumeclaims",
                object: Value::Object(updated),
            });
        }
    }
    actions
}

/// Pod `ordinal` of `set`, from its template at `revision`.
fn pod(set: &Object, ordinal: usize, revision: &str) -> Value {
    let name = format!("{}-{ordinal}", object::name(set));
    let mut pod = pod_from_template(set, "apps/v1", "StatefulSet");
    if let Some(metadata) = pod["metadata"].as_object_mut() {
        metadata.remove("generateName");
        metadata.insert("name".into(), json!(name));
        let labels = metadata.entry("labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        if let Some(labels) = labels.as_object_mut() {
            labels.insert(POD_NAME_LABEL.into(), json!(name));
            labels.insert(POD_INDEX_LABEL.into(), json!(ordinal.to_string()));
            labels.insert(CONTROLLER_REVISION_HASH.into(), json!(revision));
        }
    }
    if !pod["spec"].is_object() {
        pod["spec"] = json!({});
    }
    let Some(spec) = pod["spec"].as_object_mut() else {
        return pod;
    };
    spec.insert("hostname".into(), json!(name));
    if let Some(service) = spec_str(set, "/serviceName").filter(|s| !s.is_empty()) {
        spec.insert("subdomain".into(), json!(service));
    }
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(volumes) = volumes.as_array_mut() {
        for template in claim_templates(set) {
            let volume = template
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if !volumes.iter().any(|v| v["name"] == volume.as_str()) {
                volumes.push(json!({"name": volume,
                    "persistentVolumeClaim": {"claimName": claim_name(&template, set, ordinal)}}));
            }
        }
    }
    pod
}

fn claim_object(set: &Object, template: &Value, ordinal: usize) -> Value {
    let mut labels = set
        .get("spec")
        .and_then(|s| s.pointer("/selector/matchLabels"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(own) = template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
    {
        labels.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name(template, set, ordinal),
            "namespace": object::namespace(set),
            "labels": labels,
        },
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

fn revision_of(pod: &Object) -> &str {
    object::meta(pod)
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get(CONTROLLER_REVISION_HASH))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn finished(pod: &Object) -> bool {
    matches!(
        pod.get("status")
            .and_then(|s| s.get("phase"))
            .and_then(Value::as_str),
        Some("Failed" | "Succeeded")
    )
}

fn delete(pod: &Object) -> Action {
    Action::Delete {
        resource: "pods",
        namespace: object::namespace(pod).to_owned(),
        name: object::name(pod).to_owned(),
        uid: uid(pod).to_owned(),
    }
}

/// A non-negative count at `pointer` under the set's `spec` (0 when absent).
fn spec_count(set: &Object, pointer: &str) -> usize {
    set.get("spec")
        .and_then(|s| s.pointer(pointer))
        .and_then(Value::as_i64)
        .unwrap_or(0)
        .max(0) as usize
}

/// The set's ordinals: `spec.ordinals.start` onwards, `replicas` of them.
fn ordinals(set: &Object) -> std::ops::Range<usize> {
    let start = spec_count(set, "/ordinals/start");
    start..start + replicas(set).max(0) as usize
}

/// One StatefulSet's actions, given the pods it controls and the names of the claims of its
/// namespace.
pub fn reconcile_one(set: &Object, pods: &[&Object], claims: &[&str], now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let set_name = object::name(set);
    let namespace = object::namespace(set).to_owned();
    let range = ordinals(set);
    let want = range.len();
    let ordered = spec_str(set, "/podManagementPolicy") != Some("Parallel");
    let rolling = spec_str(set, "/updateStrategy/type") != Some("OnDelete");
    let partition = spec_count(set, "/updateStrategy/rollingUpdate/partition");
    let revision = update_revision(set);
    // Pods by ordinal; a controlled pod without one of the set's names is removed.
    let mut by_ordinal: BTreeMap<usize, &Object> = BTreeMap::new();
    for pod in pods {
        let ordinal = object::name(pod)
            .strip_prefix(set_name)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        match ordinal {
            Some(i) => {
                by_ordinal.insert(i, pod);
            }
            None if !is_terminating(pod) => actions.push(delete(pod)),
            None => {}
        }
    }
    let any_terminating = by_ordinal.values().any(|p| is_terminating(p));
    // Finished pods go, to be made again (upstream restarts them the same way).
    for pod in by_ordinal.values() {
        if finished(pod) && !is_terminating(pod) {
            actions.push(delete(pod));
        }
    }
    let healthy = |p: &&Object| pod_ready(p) && !is_terminating(p) && !finished(p);
    // Creation, lowest ordinal first.
    let mut blocked = ordered && any_terminating;
    for ordinal in range.clone() {
        match by_ordinal.get(&ordinal) {
            Some(pod) => {
                if ordered && !healthy(pod) {
                    blocked = true;
                }
            }
            None if blocked => break,
            None => {
                for template in claim_templates(set) {
                    let name = claim_name(&template, set, ordinal);
                    if !claims.contains(&name.as_str()) {
                        actions.push(Action::Create {
                            resource: "persistentvolumeclaims",
                            namespace: namespace.clone(),
                            object: claim_object(set, &template, ordinal),
                        });
                    }
                }
                actions.push(Action::Create {
                    resource: "pods",
                    namespace: namespace.clone(),
                    object: pod(set, ordinal, &revision),
                });
                if ordered {
                    blocked = true;
                }
            }
        }
    }
    // Scale down (and ordinals outside the range), highest ordinal first.
    let extra: Vec<&Object> = by_ordinal
        .iter()
        .rev()
        .filter(|(i, p)| !range.contains(i) && !is_terminating(p))
        .map(|(_, p)| *p)
        .collect();
    let lower_healthy = by_ordinal.range(range.clone()).all(|(_, p)| healthy(p));
    if ordered {
        if !any_terminating && lower_healthy {
            actions.extend(extra.first().map(|p| delete(p)));
        }
    } else {
        actions.extend(extra.iter().map(|p| delete(p)));
    }
    // Rolling update: highest ordinal first, at most maxUnavailable pods unavailable at once
    // (1 by default: one at a time, while all are Ready), never below the partition.
    let max_unavailable = int_or_percent(
        set.get("spec")
            .and_then(|s| s.pointer("/updateStrategy/rollingUpdate/maxUnavailable")),
        1,
        want as i64,
        true,
    )
    .max(1) as usize;
    let unavailable = range
        .clone()
        .filter(|i| !by_ordinal.get(i).is_some_and(healthy))
        .count()
        + by_ordinal
            .iter()
            .filter(|(i, p)| !range.contains(i) && is_terminating(p))
            .count();
    if rolling && unavailable < max_unavailable && actions.is_empty() {
        let outdated = range
            .clone()
            .skip(partition)
            .rev()
            .filter_map(|i| by_ordinal.get(&i))
            .filter(|p| revision_of(p) != revision && !is_terminating(p))
            .take(max_unavailable - unavailable);
        actions.extend(outdated.map(|p| delete(p)));
    }
    actions.extend(status(set, &by_ordinal, want, &revision, now));
    actions
}

/// The set's status, if it changed: counts, and the current and update revisions (`kubectl
/// rollout status` reads them).
fn status(
    set: &Object,
    pods: &BTreeMap<usize, &Object>,
    want: usize,
    revision: &str,
    now: i64,
) -> Option<Action> {
    {
        let live: Vec<&Object> = pods
            .values()
            .copied()
            .filter(|p| !is_terminating(p))
            .collect();
        let min_ready = spec_i64(set, "minReadySeconds").unwrap_or(0);
        let updated = live.iter().filter(|p| revision_of(p) == revision).count();
        let previous = set
            .get("status")
            .and_then(|s| s.get("currentRevision"))
            .and_then(Value::as_str)
            .unwrap_or(revision)
            .to_owned();
        // The roll-out is done when every wanted pod runs the update revision and is Ready.
        let done = updated == want && live.len() == want && live.iter().all(|p| pod_ready(p));
        let current = if done || live.is_empty() {
            revision.to_owned()
        } else {
            previous
        };
        let status = json!({
            "replicas": live.len(),
            "readyReplicas": live.iter().filter(|p| pod_ready(p)).count(),
            "availableReplicas": live.iter().filter(|p| pod_available(p, min_ready, now)).count(),
            "currentReplicas": live.iter().filter(|p| revision_of(p) == current).count(),
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": revision,
            "observedGeneration": generation(set),
            "collisionCount": 0,
        });
        if set.get("status") == Some(&status) {
            return None;
        }
        let mut updated = set.clone();
        updated.insert("status".into(), status);
        Some(Action::UpdateStatus {
            resource: "statefulsets",
            object: Value::Object(updated),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn set(replicas: i64, policy: &str) -> Object {
        obj(json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "default", "uid": "sts-uid",
                         "generation": 1, "resourceVersion": "5"},
            "spec": {"replicas": replicas, "serviceName": "db", "podManagementPolicy": policy,
                     "selector": {"matchLabels": {"app": "db"}},
                     "updateStrategy": {"type": "RollingUpdate"},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": "1Gi"}}}}],
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}))
    }

    fn created(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { resource, .. } => Some(format!("{resource}/{}", a.name())),
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

    fn made(set: &Object, ordinal: usize, ready: bool) -> Object {
        let p = pod(set, ordinal, &update_revision(set));
        let mut p = p.as_object().cloned().unwrap();
        let m = object::meta_mut(&mut p);
        m.insert("uid".into(), json!(format!("uid-{ordinal}")));
        p.insert("spec".into(), json!({"nodeName": "n1"}));
        let status = if ready {
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True",
                   "lastTransitionTime": super::super::rfc3339(T0)}]})
        } else {
            json!({"phase": "Pending"})
        };
        p.insert("status".into(), status);
        p
    }

    #[test]
    fn ordered_ready_makes_one_pod_at_a_time_with_its_claim() {
        let s = set(3, "OrderedReady");
        let actions = reconcile_one(&s, &[], &[], T0);
        assert_eq!(
            created(&actions),
            ["persistentvolumeclaims/data-db-0", "pods/db-0"]
        );
        let Action::Create { object, .. } = &actions[1] else {
            panic!()
        };
        assert_eq!(object["spec"]["hostname"], "db-0");
        assert_eq!(object["spec"]["subdomain"], "db");
        assert_eq!(
            object["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "data-db-0"
        );
        assert_eq!(object["metadata"]["labels"][POD_INDEX_LABEL], "0");
        // db-0 not Ready yet: nothing more.
        let p0 = made(&s, 0, false);
        assert!(created(&reconcile_one(&s, &[&p0], &["data-db-0"], T0)).is_empty());
        // Ready: db-1 next, and only db-1.
        let p0 = made(&s, 0, true);
        assert_eq!(
            created(&reconcile_one(&s, &[&p0], &["data-db-0"], T0)),
            ["persistentvolumeclaims/data-db-1", "pods/db-1"]
        );
    }

    #[test]
    fn parallel_makes_all_and_scale_down_goes_highest_first() {
        let s = set(3, "Parallel");
        let all = created(&reconcile_one(&s, &[], &[], T0));
        assert_eq!(all.iter().filter(|c| c.starts_with("pods/")).count(), 3);
        let s = set(1, "OrderedReady");
        let pods: Vec<Object> = (0..3).map(|i| made(&s, i, true)).collect();
        let refs: Vec<&Object> = pods.iter().collect();
        assert_eq!(deleted(&reconcile_one(&s, &refs, &[], T0)), ["db-2"]);
    }

    #[test]
    fn rolling_update_replaces_the_highest_outdated_pod_above_the_partition() {
        let s = set(3, "OrderedReady");
        let pods: Vec<Object> = (0..3).map(|i| made(&s, i, true)).collect();
        let refs: Vec<&Object> = pods.iter().collect();
        // Nothing to do at the same revision; status says the roll-out is complete.
        let actions = reconcile_one(&s, &refs, &[], T0);
        assert!(deleted(&actions).is_empty());
        let status = applied(actions.last().unwrap());
        assert_eq!(
            status["status"]["currentRevision"],
            status["status"]["updateRevision"]
        );
        let mut changed = s.clone();
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("busybox:2");
        assert_eq!(deleted(&reconcile_one(&changed, &refs, &[], T0)), ["db-2"]);
        changed["spec"]["updateStrategy"]["rollingUpdate"] = json!({"partition": 3});
        assert!(deleted(&reconcile_one(&changed, &refs, &[], T0)).is_empty());
        changed["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        assert!(deleted(&reconcile_one(&changed, &refs, &[], T0)).is_empty());
    }

    #[test]
    fn claim_retention_delete_removes_scaled_claims_and_owns_the_rest() {
        let claim = |ordinal: usize, owned: bool| {
            let mut c = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": format!("data-db-{ordinal}"), "namespace": "default",
                             "uid": format!("c{ordinal}")}});
            if owned {
                c["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db",
                            "uid": "sts-uid", "controller": false}]);
            }
            obj(c)
        };
        let claims = [
            claim(0, false),
            claim(1, false),
            claim(2, true),
            claim(9, false),
        ];
        let refs: Vec<&Object> = claims.iter().collect();
        let s = set(1, "OrderedReady");
        let p0 = made(&s, 0, true);
        let p1 = made(&s, 1, true);
        // Retain (the default): nothing, except taking off an ownerReference the set gave.
        let actions = claim_retention(&s, &[&p0], &refs);
        assert!(deleted(&actions).is_empty());
        assert_eq!(
            actions.iter().map(Action::name).collect::<Vec<_>>(),
            ["data-db-2"]
        );

        let mut delete = s.clone();
        delete["spec"]["persistentVolumeClaimRetentionPolicy"] =
            json!({"whenDeleted": "Delete", "whenScaled": "Delete"});
        // Ordinal 1's pod is still there: its claim waits; 2 and 9 go; 0 and 1 get the set as
        // owner (2 has it already, and goes anyway).
        let actions = claim_retention(&delete, &[&p0, &p1], &refs);
        assert_eq!(deleted(&actions), ["data-db-2", "data-db-9"]);
        let updated: Vec<&Value> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Update { object, .. } => Some(object),
                _ => None,
            })
            .collect();
        assert_eq!(updated.len(), 2);
        for object in updated {
            assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "sts-uid");
            assert_eq!(
                object["metadata"]["ownerReferences"][0]["controller"],
                false
            );
        }
        // Pod 1 gone: its claim goes too.
        assert_eq!(
            deleted(&claim_retention(&delete, &[&p0], &refs)),
            ["data-db-1", "data-db-2", "data-db-9"]
        );
    }

    #[test]
    fn ordinals_start_where_the_set_says_and_those_outside_go() {
        let mut s = set(2, "Parallel");
        s["spec"]["ordinals"] = json!({"start": 5});
        let made_now = created(&reconcile_one(&s, &[], &[], T0));
        assert_eq!(
            made_now,
            [
                "persistentvolumeclaims/data-db-5",
                "pods/db-5",
                "persistentvolumeclaims/data-db-6",
                "pods/db-6"
            ]
        );
        // Pods of the old range (0 and 1) go, highest first; 5 and 6 are kept.
        let pods: Vec<Object> = [0, 1, 5, 6].iter().map(|i| made(&s, *i, true)).collect();
        let refs: Vec<&Object> = pods.iter().collect();
        assert_eq!(
            deleted(&reconcile_one(&s, &refs, &[], T0)),
            ["db-1", "db-0"]
        );
        // partition counts from the start: partition 1 leaves db-5 alone.
        let mut changed = s.clone();
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("busybox:2");
        changed["spec"]["updateStrategy"]["rollingUpdate"] = json!({"partition": 1});
        assert_eq!(
            deleted(&reconcile_one(&changed, &refs[2..], &[], T0)),
            ["db-6"]
        );
    }

    #[test]
    fn max_unavailable_replaces_several_pods_at_once_counting_the_unavailable() {
        let s = set(5, "Parallel");
        let mut changed = s.clone();
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("busybox:2");
        changed["spec"]["updateStrategy"]["rollingUpdate"] = json!({"maxUnavailable": "40%"});
        let pods: Vec<Object> = (0..5).map(|i| made(&s, i, true)).collect();
        let refs: Vec<&Object> = pods.iter().collect();
        // 40% of 5, rounded up: 2 at once, highest first.
        assert_eq!(
            deleted(&reconcile_one(&changed, &refs, &[], T0)),
            ["db-4", "db-3"]
        );
        // One pod already unavailable: one more may go.
        let mut pods = pods.clone();
        pods[0] = made(&s, 0, false);
        let refs: Vec<&Object> = pods.iter().collect();
        assert_eq!(deleted(&reconcile_one(&changed, &refs, &[], T0)), ["db-4"]);
        // The default is one at a time, and only while all are Ready.
        changed["spec"]["updateStrategy"] = json!({"type": "RollingUpdate"});
        assert!(deleted(&reconcile_one(&changed, &refs, &[], T0)).is_empty());
    }
}
