//! The Deployment controller: one ReplicaSet per pod template, rolled from old to new.
//!
//! As upstream (`pkg/controller/deployment`): the ReplicaSet of the current template is named
//! `<deployment>-<hash>` and carries `pod-template-hash=<hash>` in its labels, selector and
//! template; it holds the newest `deployment.kubernetes.io/revision`, which the Deployment
//! mirrors (what `kubectl rollout history|undo` read). `RollingUpdate` scales the new
//! ReplicaSet up within `maxSurge` and the old ones down within `maxUnavailable`, counting
//! only available pods; `Recreate` scales the old ones to zero and waits for their pods to be
//! gone first. A paused Deployment is only scaled, never rolled. Old ReplicaSets at zero beyond
//! `revisionHistoryLimit` are deleted. The status carries what `kubectl rollout status` reads
//! (observedGeneration, replicas, updatedReplicas, availableReplicas and the `Progressing`
//! condition, `NewReplicaSetAvailable` once complete).
//!
//! A rollout that makes no progress (more updated, ready or available pods, fewer old ones)
//! for `progressDeadlineSeconds` gets `Progressing=False` with reason `ProgressDeadlineExceeded`
//! (`kubectl rollout status` then fails), until it progresses again.
//!
//! A scale in the middle of a rollout (or while paused) with several live ReplicaSets is
//! proportional, as upstream's `sync`: every ReplicaSet carries the Deployment's size and
//! maximum it was last scaled for (`deployment.kubernetes.io/desired-replicas` and
//! `max-replicas`); when the Deployment's size differs from them, the replicas added or
//! removed are spread over the live ReplicaSets in proportion to their sizes, the largest first
//! and the rounding leftover to the first ([`proportional`]).
//!
//! The ReplicaSet's hash covers the template and `status.collisionCount`: when a ReplicaSet of
//! the Deployment has the hash of its template but another template (a collision), the count
//! goes up and the next pass uses a new hash, as upstream. Orphaned ReplicaSets matching the
//! selector are adopted (a Deployment deleted with `--cascade=orphan` and applied again takes
//! its ReplicaSets back).

use replication::api::object::{self, Object};
use serde_json::{json, Value};

use super::{
    annotation, claim, controller_reference, generation, int_or_percent, is_controlled_by,
    is_terminating, label, replicas, rfc3339, set_condition, spec_i64, status_i64, template_hash,
    with_label, Action, World, POD_TEMPLATE_HASH, REVISION,
};

/// Annotations of a Deployment that are not copied to its ReplicaSets.
const NOT_COPIED: &[&str] = &[
    REVISION,
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
];

/// Every Deployment's actions.
pub fn reconcile(world: &World, now: i64) -> Vec<Action> {
    world
        .deployments
        .iter()
        .filter(|d| !is_terminating(d))
        .flat_map(|d| {
            let claims = claim(
                d,
                "apps/v1",
                "Deployment",
                "replicasets",
                world.replicasets.iter(),
            );
            if !claims.is_empty() {
                return claims;
            }
            let owned: Vec<&Object> = world
                .replicasets
                .iter()
                .filter(|rs| object::namespace(rs) == object::namespace(d))
                .filter(|rs| is_controlled_by(rs, d))
                .collect();
            // Recreate waits for every old pod to be gone, terminating ones included.
            let hash = template_hash(&template(d));
            let old_pods = world
                .pods_in(object::namespace(d))
                .filter(|p| {
                    let phase = p
                        .get("status")
                        .and_then(|s| s.get("phase"))
                        .and_then(Value::as_str);
                    !matches!(phase, Some("Succeeded" | "Failed"))
                })
                .filter(|p| {
                    owned.iter().any(|rs| {
                        is_controlled_by(p, rs) && label(rs, POD_TEMPLATE_HASH) != Some(&hash)
                    })
                })
                .count();
            reconcile_with(d, &owned, old_pods, now)
        })
        .collect()
}

fn revision(o: &Object) -> i64 {
    annotation(o, REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn template(d: &Object) -> Value {
    d.get("spec")
        .and_then(|s| s.get("template"))
        .cloned()
        .unwrap_or_else(|| json!({}))
}

/// `maxSurge` and `maxUnavailable` resolved against `replicas` (surge rounds up, unavailable
/// down; both zero means one unavailable), as upstream's `ResolveFenceposts`.
fn fenceposts(d: &Object) -> (i64, i64) {
    let rolling = d
        .get("spec")
        .and_then(|s| s.get("strategy"))
        .and_then(|s| s.get("rollingUpdate"));
    let want = replicas(d);
    let surge = int_or_percent(rolling.and_then(|r| r.get("maxSurge")), 1, want, true);
    let unavailable = int_or_percent(
        rolling.and_then(|r| r.get("maxUnavailable")),
        0,
        want,
        false,
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

fn is_recreate(d: &Object) -> bool {
    d.get("spec")
        .and_then(|s| s.get("strategy"))
        .and_then(|s| s.get("type"))
        .and_then(Value::as_str)
        == Some("Recreate")
}

fn paused(d: &Object) -> bool {
    d.get("spec")
        .and_then(|s| s.get("paused"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// The ReplicaSet `d` wants for its current template (named `<d>-<hash>`), at `replicas`.
fn new_replicaset(d: &Object, hash: &str, revision: i64, replicas: i64) -> Value {
    let mut template = template(d);
    let labels = with_label(
        template.pointer("/metadata/labels"),
        POD_TEMPLATE_HASH,
        hash,
    );
    template["metadata"]["labels"] = labels.clone();
    let mut selector = d
        .get("spec")
        .and_then(|s| s.get("selector"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    selector["matchLabels"] = with_label(selector.get("matchLabels"), POD_TEMPLATE_HASH, hash);
    let mut annotations: serde_json::Map<String, Value> = object::meta(d)
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    annotations.insert(REVISION.into(), json!(revision.to_string()));
    let (surge, _) = fenceposts(d);
    annotations.insert(
        "deployment.kubernetes.io/desired-replicas".into(),
        json!(super::replicas(d).to_string()),
    );
    annotations.insert(
        "deployment.kubernetes.io/max-replicas".into(),
        json!((super::replicas(d) + surge).to_string()),
    );
    let mut spec = json!({
        "replicas": replicas,
        "selector": selector,
        "template": template,
    });
    if let Some(min_ready) = spec_i64(d, "minReadySeconds") {
        spec["minReadySeconds"] = json!(min_ready);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": format!("{}-{hash}", object::name(d)),
            "namespace": object::namespace(d),
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [controller_reference(d, "apps/v1", "Deployment")],
        },
        "spec": spec,
    })
}

/// The hash of `d`'s pod template and collision count (`pod-template-hash`).
fn pod_template_hash(d: &Object) -> String {
    let mut hashed = template(d);
    let collisions = status_i64(d, "collisionCount");
    if collisions > 0 {
        // Only a non-zero count changes the hash, so that Deployments without collisions keep
        // their ReplicaSets' names.
        hashed = json!({"template": hashed, "collisionCount": collisions});
    }
    template_hash(&hashed)
}

/// Whether `rs` (found by `hash`) holds `d`'s template: its own template without the hash
/// label is the Deployment's.
fn same_template(d: &Object, rs: &Object, hash: &str) -> bool {
    let mut held = rs
        .get("spec")
        .and_then(|s| s.get("template"))
        .cloned()
        .unwrap_or_default();
    if let Some(labels) = held
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        if labels.get(POD_TEMPLATE_HASH).and_then(Value::as_str) == Some(hash) {
            labels.remove(POD_TEMPLATE_HASH);
        }
        if labels.is_empty() {
            held["metadata"].as_object_mut().map(|m| m.remove("labels"));
        }
    }
    template_hash(&held) == template_hash(&template(d))
}

const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// `rs` scaled to `to`, noting `d`'s size and maximum it was scaled for (upstream's
/// `SetReplicasAnnotations`).
fn scale_for(d: &Object, rs: &Object, to: i64) -> Action {
    let (surge, _) = fenceposts(d);
    let mut updated = rs.clone();
    updated["spec"]["replicas"] = json!(to);
    let annotations = object::meta_mut(&mut updated)
        .entry("annotations")
        .or_insert_with(|| json!({}));
    annotations[DESIRED_REPLICAS] = json!(replicas(d).to_string());
    annotations[MAX_REPLICAS] = json!((replicas(d) + surge).to_string());
    Action::Update {
        resource: "replicasets",
        object: Value::Object(updated),
    }
}

/// An annotation's integer value.
fn annotation_i64(o: &Object, key: &str) -> Option<i64> {
    annotation(o, key).and_then(|v| v.parse().ok())
}

/// Whether `d` was scaled since its live ReplicaSets were (upstream's `isScalingEvent`): one of
/// them notes another desired size.
fn scaling_event(d: &Object, all: &[&Object]) -> bool {
    let live: Vec<&&Object> = all.iter().filter(|rs| replicas(rs) > 0).collect();
    live.len() > 1
        && live
            .iter()
            .any(|rs| annotation_i64(rs, DESIRED_REPLICAS).is_some_and(|n| n != replicas(d)))
}

/// Upstream's proportional scaling (`sync`'s `scale`): the replicas to add (or remove) to
/// reach `replicas + maxSurge` are spread over the live ReplicaSets in proportion to their
/// sizes against the maximum they were scaled for; largest first (ties: newest first when
/// adding, oldest when removing), the rounding leftover to the first. Every live ReplicaSet
/// then notes the new size and maximum.
fn proportional(d: &Object, all: &[&Object]) -> Vec<Action> {
    let want = replicas(d);
    let (surge, _) = fenceposts(d);
    let allowed = if want > 0 { want + surge } else { 0 };
    let mut live: Vec<&Object> = all.iter().copied().filter(|rs| replicas(rs) > 0).collect();
    let total: i64 = live.iter().map(|rs| replicas(rs)).sum();
    let to_add = allowed - total;
    if to_add > 0 {
        live.sort_by_key(|rs| {
            (
                std::cmp::Reverse(replicas(rs)),
                std::cmp::Reverse(revision(rs)),
            )
        });
    } else {
        live.sort_by_key(|rs| (std::cmp::Reverse(replicas(rs)), revision(rs)));
    }
    let mut sizes: Vec<i64> = live.iter().map(|rs| replicas(rs)).collect();
    let mut added = 0;
    for (rs, size) in live.iter().zip(sizes.iter_mut()) {
        if to_add == 0 || to_add == added {
            break;
        }
        let fraction = if want == 0 {
            -replicas(rs)
        } else {
            let annotated = annotation_i64(rs, MAX_REPLICAS)
                .filter(|n| *n > 0)
                .unwrap_or(total.max(1));
            let scaled = (replicas(rs) * allowed) as f64 / annotated as f64;
            scaled.round() as i64 - replicas(rs)
        };
        let left = to_add - added;
        let proportion = if to_add > 0 {
            fraction.min(left)
        } else {
            fraction.max(left)
        };
        *size += proportion;
        added += proportion;
    }
    if let Some(first) = sizes.first_mut() {
        *first = (*first + to_add - added).max(0);
    }
    live.iter()
        .zip(sizes)
        .map(|(rs, size)| scale_for(d, rs, size))
        .collect()
}

/// One Deployment's actions, given the ReplicaSets it controls.
pub fn reconcile_one(d: &Object, owned: &[&Object], now: i64) -> Vec<Action> {
    reconcile_with(d, owned, 0, now)
}

/// [`reconcile_one`] knowing how many pods of old ReplicaSets still exist (terminating ones
/// included), which `Recreate` waits for.
pub fn reconcile_with(d: &Object, owned: &[&Object], old_pods: usize, now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let hash = pod_template_hash(d);
    let new_rs = owned
        .iter()
        .copied()
        .find(|rs| label(rs, POD_TEMPLATE_HASH) == Some(hash.as_str()));
    if let Some(rs) = new_rs {
        if !same_template(d, rs, &hash) {
            // A hash collision: count it, so that the next pass hashes differently.
            let mut updated = d.clone();
            let status = updated.entry("status").or_insert_with(|| json!({}));
            status["collisionCount"] = json!(status_i64(d, "collisionCount") + 1);
            return vec![Action::UpdateStatus {
                resource: "deployments",
                object: Value::Object(updated),
            }];
        }
    }
    let mut old: Vec<&Object> = owned
        .iter()
        .copied()
        .filter(|rs| label(rs, POD_TEMPLATE_HASH) != Some(hash.as_str()))
        .collect();
    old.sort_by_key(|rs| revision(rs));
    let max_old_revision = old.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let want = replicas(d);
    let mut deployment_update: Option<Object> = None;

    match new_rs {
        None if !paused(d) => {
            // A new template: its ReplicaSet, at the size the strategy allows right now.
            let initial = if is_recreate(d) {
                0
            } else {
                let (surge, _) = fenceposts(d);
                let all: i64 = old.iter().map(|rs| replicas(rs)).sum();
                (want + surge - all).clamp(0, want)
            };
            actions.push(Action::Create {
                resource: "replicasets",
                namespace: object::namespace(d).to_owned(),
                object: new_replicaset(d, &hash, max_old_revision + 1, initial),
            });
        }
        None => {
            // Paused with a template not rolled out yet: a scale still applies, to the one live
            // ReplicaSet or proportionally over several.
            let live: Vec<&&Object> = old.iter().filter(|rs| replicas(rs) > 0).collect();
            if let [only] = live[..] {
                if replicas(only) != want {
                    actions.push(scale_for(d, only, want));
                }
            } else if scaling_event(d, &old) {
                actions.extend(proportional(d, &old));
            }
        }
        Some(new_rs) => {
            // The current template's ReplicaSet holds the newest revision (after an undo it
            // was an old one).
            let new_revision = if revision(new_rs) > max_old_revision {
                revision(new_rs)
            } else {
                max_old_revision + 1
            };
            if revision(new_rs) != new_revision {
                let mut updated = new_rs.clone();
                let annotations = object::meta_mut(&mut updated)
                    .entry("annotations")
                    .or_insert_with(|| json!({}));
                annotations[REVISION] = json!(new_revision.to_string());
                actions.push(Action::Update {
                    resource: "replicasets",
                    object: Value::Object(updated),
                });
                return actions;
            }
            if annotation(d, REVISION) != Some(new_revision.to_string().as_str()) {
                let mut updated = d.clone();
                let annotations = object::meta_mut(&mut updated)
                    .entry("annotations")
                    .or_insert_with(|| json!({}));
                annotations[REVISION] = json!(new_revision.to_string());
                deployment_update = Some(updated);
            }
            let mut all = old.clone();
            all.push(new_rs);
            if !is_recreate(d) && scaling_event(d, &all) {
                actions.extend(proportional(d, &all));
            } else {
                actions.extend(rollout(d, new_rs, &old, old_pods));
            }
        }
    }
    if actions.is_empty() {
        actions.extend(cleanup(d, &old));
    }
    match deployment_update {
        Some(updated) => actions.push(Action::Update {
            resource: "deployments",
            object: Value::Object(updated),
        }),
        None => {
            if let Some(status) = status(d, new_rs, owned, now) {
                actions.push(status);
            }
        }
    }
    actions
}

/// The scaling steps of a rollout (or, paused or complete, of a plain scale).
fn rollout(d: &Object, new_rs: &Object, old: &[&Object], old_pods: usize) -> Vec<Action> {
    let want = replicas(d);
    let old_live: Vec<&Object> = old
        .iter()
        .copied()
        .filter(|rs| replicas(rs) > 0 || status_i64(rs, "replicas") > 0)
        .collect();
    if is_recreate(d) && old_live.is_empty() && old_pods > 0 && replicas(new_rs) < want {
        // Scaled down, but old pods are still terminating.
        return Vec::new();
    }
    if old_live.is_empty() {
        // Nothing to roll: the new ReplicaSet is the Deployment's size.
        return if replicas(new_rs) != want {
            vec![scale_for(d, new_rs, want)]
        } else {
            Vec::new()
        };
    }
    if paused(d) {
        // Paused in the middle of a rollout: sizes wait for the resume (upstream would scale
        // the live ReplicaSets proportionally).
        return Vec::new();
    }
    if is_recreate(d) {
        let scaled_down: Vec<Action> = old_live
            .iter()
            .filter(|rs| replicas(rs) > 0)
            .map(|rs| scale_for(d, rs, 0))
            .collect();
        // Wait for the old pods to be gone before any new one starts.
        return scaled_down;
    }
    let (surge, max_unavailable) = fenceposts(d);
    let all_pods: i64 = replicas(new_rs) + old.iter().map(|rs| replicas(rs)).sum::<i64>();
    // Scale up the new ReplicaSet within the surge.
    if replicas(new_rs) < want {
        let max_total = want + surge;
        if all_pods < max_total {
            let up = (max_total - all_pods).min(want - replicas(new_rs));
            return vec![scale_for(d, new_rs, replicas(new_rs) + up)];
        }
    } else if replicas(new_rs) > want {
        return vec![scale_for(d, new_rs, want)];
    }
    // Scale down the old ones, never below `want - maxUnavailable` available pods.
    let min_available = want - max_unavailable;
    let new_unavailable = replicas(new_rs) - status_i64(new_rs, "availableReplicas");
    let mut budget = all_pods - min_available - new_unavailable;
    let mut actions = Vec::new();
    let mut targets: Vec<(&Object, i64)> = old_live.iter().map(|rs| (*rs, replicas(rs))).collect();
    // First the old pods that are not available anyway (they cost no availability).
    for (rs, size) in targets.iter_mut() {
        if budget <= 0 {
            break;
        }
        let unhealthy = *size - status_i64(rs, "availableReplicas");
        let down = unhealthy.min(budget).max(0);
        *size -= down;
        budget -= down;
    }
    // Then available ones, oldest first, while enough remain available.
    let available: i64 = status_i64(new_rs, "availableReplicas")
        + old_live
            .iter()
            .map(|rs| status_i64(rs, "availableReplicas"))
            .sum::<i64>();
    let mut removable = (available - min_available).min(budget.max(0));
    for (_, size) in targets.iter_mut() {
        if removable <= 0 {
            break;
        }
        let down = (*size).min(removable);
        *size -= down;
        removable -= down;
    }
    for (rs, size) in targets {
        if size != replicas(rs) {
            actions.push(scale_for(d, rs, size));
        }
    }
    actions
}

/// Old ReplicaSets at zero beyond `revisionHistoryLimit`, oldest first.
fn cleanup(d: &Object, old: &[&Object]) -> Vec<Action> {
    let limit = spec_i64(d, "revisionHistoryLimit").unwrap_or(10).max(0) as usize;
    let idle: Vec<&&Object> = old
        .iter()
        .filter(|rs| replicas(rs) == 0 && status_i64(rs, "replicas") == 0 && !is_terminating(rs))
        .collect();
    let excess = idle.len().saturating_sub(limit);
    idle.iter()
        .take(excess)
        .map(|rs| Action::Delete {
            resource: "replicasets",
            namespace: object::namespace(rs).to_owned(),
            name: object::name(rs).to_owned(),
            uid: super::uid(rs).to_owned(),
        })
        .collect()
}

/// The status update, if the status changes.
fn status(d: &Object, new_rs: Option<&Object>, owned: &[&Object], now: i64) -> Option<Action> {
    let want = replicas(d);
    let sum = |field: &str| owned.iter().map(|rs| status_i64(rs, field)).sum::<i64>();
    let total = sum("replicas");
    let updated = new_rs.map_or(0, |rs| status_i64(rs, "replicas"));
    let ready = sum("readyReplicas");
    let available = sum("availableReplicas");
    let (_, max_unavailable) = fenceposts(d);
    let now_text = rfc3339(now);
    let mut conditions: Vec<Value> = d
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (available_status, available_reason, available_message) =
        if available >= want - max_unavailable {
            (
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        } else {
            (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        };
    set_condition(
        &mut conditions,
        json!({"type": "Available", "status": available_status, "reason": available_reason,
               "message": available_message}),
        &now_text,
    );
    let rs_name = new_rs.map(object::name).unwrap_or_default();
    let complete = new_rs.is_some()
        && updated == want
        && total == want
        && available == want
        && new_rs.is_some_and(|rs| replicas(rs) == want);
    let previous = conditions
        .iter()
        .find(|c| c["type"] == "Progressing")
        .cloned();
    let previous_reason = previous
        .as_ref()
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default();
    // Progress since the last status (upstream's `DeploymentProgressing`): more updated, ready
    // or available pods, or fewer old ones.
    let was = |field: &str| status_i64(d, field);
    let progressed = updated > was("updatedReplicas")
        || ready > was("readyReplicas")
        || available > was("availableReplicas")
        || total - updated < was("replicas") - was("updatedReplicas");
    let mut fresh_update = false;
    let progressing = if paused(d) {
        json!({"type": "Progressing", "status": "Unknown", "reason": "DeploymentPaused",
               "message": "Deployment is paused"})
    } else if complete {
        json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
               "message": format!("ReplicaSet \"{rs_name}\" has successfully progressed.")})
    } else if new_rs.is_some() {
        let last_update = previous
            .as_ref()
            .and_then(|c| c["lastUpdateTime"].as_str())
            .and_then(object::parse_rfc3339)
            .unwrap_or(now);
        let deadline = spec_i64(d, "progressDeadlineSeconds");
        let timed_out = previous_reason == "ProgressDeadlineExceeded"
            || (previous_reason == "ReplicaSetUpdated"
                && deadline.is_some_and(|s| last_update + s < now));
        if progressed {
            fresh_update = true;
        }
        if timed_out && !progressed {
            json!({"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                   "message": format!("ReplicaSet \"{rs_name}\" has timed out progressing.")})
        } else {
            json!({"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
                   "message": format!("ReplicaSet \"{rs_name}\" is progressing.")})
        }
    } else {
        json!({"type": "Progressing", "status": "True", "reason": "NewReplicaSetCreated",
               "message": "Created new replica set"})
    };
    set_condition(&mut conditions, progressing, &now_text);
    if fresh_update {
        // The deadline counts from the last progress.
        if let Some(c) = conditions.iter_mut().find(|c| c["type"] == "Progressing") {
            c["lastUpdateTime"] = json!(now_text);
        }
    }
    // Kubernetes lists Available before Progressing.
    conditions.sort_by_key(|c| c["type"] != "Available");
    let mut status = json!({
        "observedGeneration": generation(d),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (want - available).max(0),
        "conditions": conditions,
        // Kept: the ReplicaSets' hash depends on it.
        "collisionCount": status_i64(d, "collisionCount"),
    });
    // Zero counts are omitted, as in Go's JSON (`kubectl rollout status` reads them as 0).
    if let Some(map) = status.as_object_mut() {
        map.retain(|_, v| v.as_i64() != Some(0));
    }
    if d.get("status") == Some(&status) {
        return None;
    }
    let mut updated_d = d.clone();
    updated_d.insert("status".into(), status);
    Some(Action::UpdateStatus {
        resource: "deployments",
        object: Value::Object(updated_d),
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn deployment(replicas: i64, image: &str) -> Object {
        obj(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "uid": "d-uid",
                         "generation": 1, "resourceVersion": "3"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "revisionHistoryLimit": 10,
                     "strategy": {"type": "RollingUpdate",
                                  "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": image}]}}}}))
    }

    /// A ReplicaSet as the API would hold it after `action` created it, with `available`
    /// pods at `size` (the ReplicaSet controller's doing).
    fn created(action: &Action, uid: &str) -> Object {
        let Action::Create { object, .. } = action else {
            panic!("not a create: {action:?}")
        };
        let mut rs = obj(object.clone());
        let meta = object::meta_mut(&mut rs);
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!("1"));
        rs
    }

    fn with_pods(rs: &Object, size: i64, available: i64) -> Object {
        let mut rs = rs.clone();
        rs["spec"]["replicas"] = json!(size);
        rs.insert(
            "status".into(),
            json!({"replicas": size, "readyReplicas": available, "availableReplicas": available}),
        );
        rs
    }

    fn sizes(actions: &[Action]) -> Vec<(String, i64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Update {
                    resource: "replicasets",
                    object,
                } => Some((
                    object["metadata"]["name"].as_str().unwrap().to_owned(),
                    object["spec"]["replicas"].as_i64().unwrap(),
                )),
                _ => None,
            })
            .collect()
    }

    fn status_of(actions: &[Action]) -> Value {
        actions
            .iter()
            .find_map(|a| match a {
                Action::UpdateStatus { object, .. } => Some(object["status"].clone()),
                _ => None,
            })
            .expect("a status update")
    }

    #[test]
    fn first_rollout_creates_a_hashed_replicaset_at_revision_1_and_completes() {
        let d = deployment(4, "nginx:1");
        let actions = reconcile_one(&d, &[], T0);
        let Action::Create { object, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        let hash = object["metadata"]["labels"][POD_TEMPLATE_HASH]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(object["metadata"]["name"], format!("web-{hash}"));
        assert_eq!(
            object["spec"]["selector"]["matchLabels"][POD_TEMPLATE_HASH],
            hash
        );
        assert_eq!(
            object["spec"]["template"]["metadata"]["labels"][POD_TEMPLATE_HASH],
            hash
        );
        assert_eq!(object["metadata"]["annotations"][REVISION], "1");
        assert_eq!(object["spec"]["replicas"], 4);
        assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "d-uid");
        assert_eq!(
            status_of(&actions)["conditions"][1]["reason"],
            "NewReplicaSetCreated"
        );

        let rs = with_pods(&created(&actions[0], "rs1"), 4, 4);
        let actions = reconcile_one(&d, &[&rs], T0 + 5);
        // The Deployment takes the revision first, then the status.
        let Action::Update {
            resource: "deployments",
            object,
        } = &actions[0]
        else {
            panic!("{actions:?}")
        };
        assert_eq!(object["metadata"]["annotations"][REVISION], "1");
        let mut d = obj(object.clone());
        let status = status_of(&reconcile_one(&d, &[&rs], T0 + 5));
        assert_eq!(status["updatedReplicas"], 4);
        assert_eq!(status["availableReplicas"], 4);
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(status["conditions"][0]["type"], "Available");
        assert_eq!(status["conditions"][0]["status"], "True");
        assert_eq!(status["conditions"][1]["reason"], "NewReplicaSetAvailable");
        d.insert("status".into(), status);
        assert!(reconcile_one(&d, &[&rs], T0 + 6).is_empty());
    }

    #[test]
    fn rolling_update_honours_max_surge_and_max_unavailable() {
        // 4 replicas, 25%/25%: at most 5 pods, at least 3 available.
        let mut d = deployment(4, "nginx:1");
        let first = reconcile_one(&d, &[], T0);
        let old = with_pods(&created(&first[0], "rs1"), 4, 4);
        object::meta_mut(&mut d)
            .entry("annotations")
            .or_insert(json!({REVISION: "1"}));
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        d["metadata"]["generation"] = json!(2);

        let actions = reconcile_one(&d, &[&old], T0 + 10);
        let Action::Create { object, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(object["spec"]["replicas"], 1, "one surge pod");
        assert_eq!(object["metadata"]["annotations"][REVISION], "2");
        let new_name = object["metadata"]["name"].as_str().unwrap().to_owned();

        // The new pod is not available yet: the old one may lose one pod (3 available left).
        let new = with_pods(&created(&actions[0], "rs2"), 1, 0);
        let actions = reconcile_one(&d, &[&old, &new], T0 + 11);
        assert_eq!(
            sizes(&actions),
            [(old["metadata"]["name"].as_str().unwrap().to_owned(), 3)]
        );

        // Simulate convergence step by step: never more than 5 pods, never fewer than 3
        // available.
        let mut old = with_pods(&old, 3, 3);
        let mut new = new;
        for step in 0..20 {
            let actions = reconcile_one(&d, &[&old, &new], T0 + 12 + step);
            for (name, size) in sizes(&actions) {
                if name == new_name {
                    new = with_pods(&new, size, replicas(&new));
                } else {
                    old = with_pods(&old, size, size);
                }
            }
            // The new pods become available one pass later.
            new = with_pods(&new, replicas(&new), replicas(&new));
            let total = replicas(&old) + replicas(&new);
            let available =
                status_i64(&old, "availableReplicas") + status_i64(&new, "availableReplicas");
            assert!(total <= 5, "step {step}: {total} pods");
            assert!(available >= 3, "step {step}: {available} available");
            if replicas(&old) == 0 && replicas(&new) == 4 {
                let old_done = with_pods(&old, 0, 0);
                let mut d2 = d.clone();
                d2["metadata"]["annotations"][REVISION] = json!("2");
                let status = status_of(&reconcile_one(&d2, &[&old_done, &new], T0 + 40));
                assert_eq!(status["conditions"][1]["reason"], "NewReplicaSetAvailable");
                assert_eq!(status["updatedReplicas"], 4);
                return;
            }
        }
        panic!("the rollout did not converge: old {old:?} new {new:?}");
    }

    #[test]
    fn a_rollout_without_progress_exceeds_its_deadline() {
        let mut d = deployment(2, "nginx:1");
        d["spec"]["progressDeadlineSeconds"] = json!(60);
        d["metadata"]["annotations"] = json!({REVISION: "1"});
        let rs = with_pods(&created(&reconcile_one(&d, &[], T0)[0], "rs1"), 2, 0);
        let progressing = |d: &Object| d["status"]["conditions"][1].clone();
        let mut d1 = d.clone();
        d1.insert("status".into(), status_of(&reconcile_one(&d, &[&rs], T0)));
        assert_eq!(progressing(&d1)["reason"], "ReplicaSetUpdated");
        // No progress for 60 s: still within the deadline; past it, exceeded.
        assert!(reconcile_one(&d1, &[&rs], T0 + 60).is_empty());
        let mut d2 = d1.clone();
        d2.insert(
            "status".into(),
            status_of(&reconcile_one(&d1, &[&rs], T0 + 61)),
        );
        assert_eq!(progressing(&d2)["reason"], "ProgressDeadlineExceeded");
        assert_eq!(progressing(&d2)["status"], "False");
        // A pod becoming available is progress again.
        let better = with_pods(&rs, 2, 1);
        let mut d3 = d2.clone();
        d3.insert(
            "status".into(),
            status_of(&reconcile_one(&d2, &[&better], T0 + 70)),
        );
        assert_eq!(progressing(&d3)["reason"], "ReplicaSetUpdated");
        assert_eq!(progressing(&d3)["lastUpdateTime"], rfc3339(T0 + 70));
    }

    #[test]
    fn undo_makes_the_old_replicaset_the_newest_revision() {
        let d1 = deployment(2, "nginx:1");
        let rs1 = with_pods(&created(&reconcile_one(&d1, &[], T0)[0], "rs1"), 0, 0);
        let mut d2 = deployment(2, "nginx:2");
        d2["metadata"]["annotations"] = json!({REVISION: "1"});
        let mut rs2 = created(&reconcile_one(&d2, &[&rs1], T0)[0], "rs2");
        rs2 = with_pods(&rs2, 2, 2);
        assert_eq!(rs2["metadata"]["annotations"][REVISION], "2");
        // `kubectl rollout undo`: the template of revision 1 again.
        let mut back = deployment(2, "nginx:1");
        back["metadata"]["annotations"] = json!({REVISION: "2"});
        let actions = reconcile_one(&back, &[&rs1, &rs2], T0 + 1);
        let Action::Update {
            resource: "replicasets",
            object,
        } = &actions[0]
        else {
            panic!("{actions:?}")
        };
        assert_eq!(object["metadata"]["name"], rs1["metadata"]["name"]);
        assert_eq!(object["metadata"]["annotations"][REVISION], "3");
    }

    #[test]
    fn recreate_scales_old_to_zero_and_waits_for_their_pods() {
        let mut d = deployment(2, "nginx:1");
        d["spec"]["strategy"] = json!({"type": "Recreate"});
        let old = with_pods(&created(&reconcile_one(&d, &[], T0)[0], "rs1"), 2, 2);
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        d["metadata"]["annotations"] = json!({REVISION: "1"});
        let create = reconcile_one(&d, &[&old], T0);
        let Action::Create { object, .. } = &create[0] else {
            panic!()
        };
        assert_eq!(object["spec"]["replicas"], 0);
        let mut new = with_pods(&created(&create[0], "rs2"), 0, 0);
        d["metadata"]["annotations"] = json!({REVISION: "2"});
        assert_eq!(sizes(&reconcile_one(&d, &[&old, &new], T0))[0].1, 0);
        // Old scaled to 0 but its pods still terminating: the new one waits.
        let mut old = old.clone();
        old["spec"]["replicas"] = json!(0);
        assert!(sizes(&reconcile_one(&d, &[&old, &new], T0)).is_empty());
        old = with_pods(&old, 0, 0);
        new = with_pods(&new, 0, 0);
        // One old pod still terminating on its node: still waiting.
        assert!(sizes(&reconcile_with(&d, &[&old, &new], 1, T0)).is_empty());
        assert_eq!(
            sizes(&reconcile_one(&d, &[&old, &new], T0)),
            [(object::name(&new).to_owned(), 2)]
        );
    }

    #[test]
    fn paused_only_scales_and_history_is_trimmed() {
        let mut d = deployment(2, "nginx:1");
        d["metadata"]["annotations"] = json!({REVISION: "1"});
        let rs = with_pods(&created(&reconcile_one(&d, &[], T0)[0], "rs1"), 2, 2);
        d["spec"]["paused"] = json!(true);
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:2");
        let actions = reconcile_one(&d, &[&rs], T0);
        assert!(!actions.iter().any(|a| matches!(a, Action::Create { .. })));
        assert_eq!(
            status_of(&actions)["conditions"][1]["reason"],
            "DeploymentPaused"
        );

        let mut d = deployment(2, "nginx:9");
        d["spec"]["revisionHistoryLimit"] = json!(1);
        d["metadata"]["annotations"] = json!({REVISION: "3"});
        let mut olds = Vec::new();
        for (i, image) in ["nginx:1", "nginx:2"].iter().enumerate() {
            let di = deployment(2, image);
            let mut rs = with_pods(
                &created(&reconcile_one(&di, &[], T0)[0], &format!("o{i}")),
                0,
                0,
            );
            rs["metadata"]["annotations"][REVISION] = json!((i + 1).to_string());
            olds.push(rs);
        }
        let current = with_pods(&created(&reconcile_one(&d, &[], T0)[0], "cur"), 2, 2);
        let mut current = current;
        current["metadata"]["annotations"][REVISION] = json!("3");
        let actions = reconcile_one(&d, &[&olds[0], &olds[1], &current], T0);
        let deleted: Vec<String> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, [object::name(&olds[0]).to_owned()]);
    }

    /// A ReplicaSet of `d`'s template `image` at `size`, scaled last for `desired`/`max`.
    fn replicaset_of(
        d: &Object,
        image: &str,
        revision: i64,
        size: i64,
        desired: i64,
        max: i64,
    ) -> Object {
        let mut d = d.clone();
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
        let hash = pod_template_hash(&d);
        let mut rs = obj(new_replicaset(&d, &hash, revision, size));
        let meta = object::meta_mut(&mut rs);
        meta.insert("uid".into(), json!(format!("rs-{revision}")));
        meta["annotations"][DESIRED_REPLICAS] = json!(desired.to_string());
        meta["annotations"][MAX_REPLICAS] = json!(max.to_string());
        with_pods(&rs, size, size)
    }

    #[test]
    fn a_scale_in_the_middle_of_a_rollout_is_spread_proportionally() {
        // Kubernetes' documented example: 10 replicas, maxSurge 3, maxUnavailable 2, a rollout
        // under way with 8 old and 5 new; scaled to 15, the 5 more go 3 to the old ReplicaSet
        // and 2 to the new one.
        let mut d = deployment(10, "nginx:2");
        d["spec"]["strategy"]["rollingUpdate"] = json!({"maxSurge": 3, "maxUnavailable": 2});
        object::meta_mut(&mut d).insert("annotations".into(), json!({REVISION: "2"}));
        let old = replicaset_of(&d, "nginx:1", 1, 8, 10, 13);
        let new = replicaset_of(&d, "nginx:2", 2, 5, 10, 13);
        assert!(!scaling_event(&d, &[&old, &new]));
        d["spec"]["replicas"] = json!(15);
        assert!(scaling_event(&d, &[&old, &new]));
        let actions = reconcile_one(&d, &[&old, &new], T0);
        let mut got = sizes(&actions);
        got.sort();
        let mut want = vec![
            (object::name(&old).to_owned(), 11),
            (object::name(&new).to_owned(), 7),
        ];
        want.sort();
        assert_eq!(got, want, "{actions:?}");
        // Each notes the size it was scaled for: the next pass rolls on instead.
        for action in &actions {
            if let Action::Update {
                resource: "replicasets",
                object,
            } = action
            {
                assert_eq!(object["metadata"]["annotations"][DESIRED_REPLICAS], "15");
                assert_eq!(object["metadata"]["annotations"][MAX_REPLICAS], "18");
            }
        }
        // Scaled down to 5 (maximum 8): 11 and 7 of 18 shrink in proportion, to 5 and 3.
        let old = replicaset_of(&d, "nginx:1", 1, 11, 15, 18);
        let new = replicaset_of(&d, "nginx:2", 2, 7, 15, 18);
        d["spec"]["replicas"] = json!(5);
        let mut got = sizes(&reconcile_one(&d, &[&old, &new], T0));
        got.sort();
        let mut want = vec![
            (object::name(&old).to_owned(), 5),
            (object::name(&new).to_owned(), 3),
        ];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_hash_collision_is_counted_and_the_next_pass_hashes_again() {
        let d = deployment(2, "nginx:1");
        let hash = pod_template_hash(&d);
        // A ReplicaSet of the Deployment with that hash but another template.
        let mut other = d.clone();
        other["spec"]["template"]["spec"]["containers"][0]["image"] = json!("other:1");
        let mut impostor = obj(new_replicaset(&other, &hash, 1, 2));
        object::meta_mut(&mut impostor).insert("uid".into(), json!("rs-x"));
        let actions = reconcile_one(&d, &[&impostor], T0);
        assert_eq!(status_of(&actions)["collisionCount"], 1, "{actions:?}");
        let mut d = d.clone();
        d.insert("status".into(), json!({"collisionCount": 1}));
        let next = pod_template_hash(&d);
        assert_ne!(next, hash);
        let actions = reconcile_one(&d, &[&impostor], T0);
        let Action::Create { object, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(
            object["metadata"]["labels"][POD_TEMPLATE_HASH],
            next.as_str()
        );
        // Without collisions the hash is the template's alone (ReplicaSet names are stable).
        assert_eq!(hash, template_hash(&template(&deployment(2, "nginx:1"))));
    }
}
