//! The garbage collector: dependents follow their owners by `metadata.ownerReferences`.
//!
//! - Background (the default of `kubectl delete`): the owner is deleted at once; a dependent
//!   none of whose owners exists any more is then deleted (a pod bound to a connected node
//!   gracefully, as the API deletes it).
//! - Orphan (`kubectl delete --cascade=orphan`): the API marked the owner deleted with the
//!   `orphan` finalizer; the collector removes the ownerReferences to it from its dependents,
//!   then the finalizer, which lets the API remove the owner.
//! - Foreground (`--cascade=foreground`): the owner is marked with `foregroundDeletion`; the
//!   collector deletes its dependents and removes the finalizer once none is left.
//!
//! Owners and dependents are the workload kinds the controllers read ([`World`]): Deployments,
//! ReplicaSets and DaemonSets owning ReplicaSets and pods.

use std::collections::{HashMap, HashSet};

use replication::api::object::{self, Object};
use replication::api::rest::{FOREGROUND_FINALIZER, ORPHAN_FINALIZER};
use serde_json::{json, Value};

use super::{is_terminating, owner_references, uid, Action, World};

fn finalizers(o: &Object) -> Vec<&str> {
    object::meta(o)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The collector's actions over the snapshot.
pub fn reconcile(world: &World, _now: i64) -> Vec<Action> {
    let dependents: Vec<(&'static str, &Object)> = world
        .pods
        .iter()
        .map(|p| ("pods", p))
        .chain(world.replicasets.iter().map(|r| ("replicasets", r)))
        .chain(world.jobs.iter().map(|j| ("jobs", j)))
        .chain(
            world
                .persistentvolumeclaims
                .iter()
                .map(|c| ("persistentvolumeclaims", c)),
        )
        .chain(
            world
                .controllerrevisions
                .iter()
                .map(|r| ("controllerrevisions", r)),
        )
        .collect();
    let owners: HashMap<&str, (&'static str, &Object)> = world
        .replicasets
        .iter()
        .map(|o| ("replicasets", o))
        .chain(world.deployments.iter().map(|o| ("deployments", o)))
        .chain(world.daemonsets.iter().map(|o| ("daemonsets", o)))
        .chain(world.statefulsets.iter().map(|o| ("statefulsets", o)))
        .chain(world.jobs.iter().map(|o| ("jobs", o)))
        .chain(world.cronjobs.iter().map(|o| ("cronjobs", o)))
        .map(|(r, o)| (uid(o), (r, o)))
        .collect();
    let mut actions = Vec::new();
    // Owners with a dependent left, per finalizer handling below.
    let mut has_dependents: HashSet<&str> = HashSet::new();
    for (resource, dependent) in &dependents {
        let refs = owner_references(dependent);
        if refs.is_empty() {
            continue;
        }
        let owner_uids: Vec<&str> = refs.iter().filter_map(|r| r.get("uid")?.as_str()).collect();
        let present: Vec<&(&str, &Object)> =
            owner_uids.iter().filter_map(|u| owners.get(u)).collect();
        for (_, owner) in &present {
            has_dependents.insert(uid(owner));
        }
        if present.is_empty() {
            // Every owner is gone: background deletion.
            if !is_terminating(dependent) && owner_kinds_known(refs) {
                actions.push(Action::Delete {
                    resource,
                    namespace: object::namespace(dependent).to_owned(),
                    name: object::name(dependent).to_owned(),
                    uid: uid(dependent).to_owned(),
                });
            }
            continue;
        }
        let orphaning: Vec<&str> = present
            .iter()
            .filter(|(_, o)| is_terminating(o) && finalizers(o).contains(&ORPHAN_FINALIZER))
            .map(|(_, o)| uid(o))
            .collect();
        if !orphaning.is_empty() {
            let mut updated = (*dependent).clone();
            let kept: Vec<Value> = refs
                .iter()
                .filter(|r| {
                    !r.get("uid")
                        .and_then(Value::as_str)
                        .is_some_and(|u| orphaning.contains(&u))
                })
                .cloned()
                .collect();
            // No owner left: no field (as upstream's collector leaves it, not `[]`).
            if kept.is_empty() {
                object::meta_mut(&mut updated).remove("ownerReferences");
            } else {
                object::meta_mut(&mut updated).insert("ownerReferences".into(), json!(kept));
            }
            actions.push(Action::Update {
                resource,
                object: Value::Object(updated),
            });
            continue;
        }
        let foreground = present
            .iter()
            .any(|(_, o)| is_terminating(o) && finalizers(o).contains(&FOREGROUND_FINALIZER));
        if foreground && !is_terminating(dependent) {
            actions.push(Action::Delete {
                resource,
                namespace: object::namespace(dependent).to_owned(),
                name: object::name(dependent).to_owned(),
                uid: uid(dependent).to_owned(),
            });
        }
    }
    // Owners being deleted whose dependents are all handled: drop the finalizer.
    for (resource, owner) in owners.values() {
        if !is_terminating(owner) || has_dependents.contains(uid(owner)) {
            continue;
        }
        let ours = [ORPHAN_FINALIZER, FOREGROUND_FINALIZER];
        let list = finalizers(owner);
        if !list.iter().any(|f| ours.contains(f)) {
            continue;
        }
        let kept: Vec<&str> = list.into_iter().filter(|f| !ours.contains(f)).collect();
        let mut updated = (*owner).clone();
        object::meta_mut(&mut updated).insert("finalizers".into(), json!(kept));
        actions.push(Action::Update {
            resource,
            object: Value::Object(updated),
        });
    }
    actions
}

/// Only references to kinds the collector sees are judged (a pod owned by a kind kedge does not
/// serve is left alone rather than collected).
fn owner_kinds_known(refs: &[Value]) -> bool {
    refs.iter().all(|r| {
        matches!(
            r.get("kind").and_then(Value::as_str),
            Some("Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet" | "Job" | "CronJob")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn owned(kind: &str, name: &str, owner_kind: &str, owner_uid: &str) -> Object {
        obj(
            json!({"kind": kind, "metadata": {"name": name, "namespace": "default",
            "uid": format!("uid-{name}"), "resourceVersion": "1",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner_kind, "name": "x",
                                 "uid": owner_uid, "controller": true}]}}),
        )
    }

    fn owner(name: &str, finalizer: Option<&str>) -> Object {
        let mut o = obj(json!({"metadata": {"name": name, "namespace": "default",
            "uid": format!("uid-{name}"), "resourceVersion": "1"}}));
        if let Some(f) = finalizer {
            let m = object::meta_mut(&mut o);
            m.insert("deletionTimestamp".into(), json!("2027-01-01T00:00:00Z"));
            m.insert("finalizers".into(), json!([f]));
        }
        o
    }

    #[test]
    fn background_deletes_dependents_of_a_gone_owner_only() {
        let world = World {
            deployments: vec![owner("web", None)],
            replicasets: vec![
                owned("ReplicaSet", "kept", "Deployment", "uid-web"),
                owned("ReplicaSet", "orphaned", "Deployment", "uid-gone"),
            ],
            pods: vec![
                owned("Pod", "p1", "ReplicaSet", "uid-kept"),
                owned("Pod", "p2", "ReplicaSet", "uid-orphaned"),
                owned("Pod", "rc-pod", "ReplicationController", "uid-rc"),
            ],
            ..World::default()
        };
        let names: Vec<String> = reconcile(&world, T0).iter().map(Action::name).collect();
        assert_eq!(names, ["orphaned"]);
        // Once the ReplicaSet is gone, its pod goes.
        let world = World {
            replicasets: vec![world.replicasets[0].clone()],
            ..world
        };
        let names: Vec<String> = reconcile(&world, T0).iter().map(Action::name).collect();
        assert_eq!(names, ["p2"]);
    }

    #[test]
    fn orphan_removes_the_references_then_the_finalizer() {
        let world = World {
            deployments: vec![owner("web", Some(ORPHAN_FINALIZER))],
            replicasets: vec![owned("ReplicaSet", "rs", "Deployment", "uid-web")],
            ..World::default()
        };
        let actions = reconcile(&world, T0);
        assert_eq!(actions.len(), 1);
        let updated = applied(&actions[0]);
        assert!(updated["metadata"].get("ownerReferences").is_none());
        let world = World {
            replicasets: vec![updated],
            ..world
        };
        let actions = reconcile(&world, T0);
        let done = applied(&actions[0]);
        assert_eq!(done["metadata"]["name"], "web");
        assert_eq!(done["metadata"]["finalizers"], json!([]));
    }

    #[test]
    fn foreground_deletes_dependents_first() {
        let world = World {
            deployments: vec![owner("web", Some(FOREGROUND_FINALIZER))],
            replicasets: vec![owned("ReplicaSet", "rs", "Deployment", "uid-web")],
            ..World::default()
        };
        let actions = reconcile(&world, T0);
        assert!(matches!(&actions[..], [Action::Delete { name, .. }] if name == "rs"));
        let world = World {
            replicasets: vec![],
            ..world
        };
        assert_eq!(
            applied(&reconcile(&world, T0)[0])["metadata"]["finalizers"],
            json!([])
        );
    }
}
