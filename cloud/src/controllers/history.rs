//! ControllerRevisions (`apps/v1`): the template history of DaemonSets and StatefulSets, kept as
//! upstream's controllers keep it, so `kubectl rollout history|undo daemonset|statefulset`
//! work.
//!
//! One ControllerRevision per distinct pod template, named `<owner>-<hash>` (the hash the pods
//! carry in `controller-revision-hash`), labelled with the template's labels and that hash,
//! controlled by its owner, with `data` = `{"spec":{"template":{…,"$patch":"replace"}}}` (the
//! strategic merge patch `kubectl rollout undo` applies) and `revision` = one more than the
//! owner's highest. A template that returns to an earlier revision's (an undo) gets that
//! revision renumbered to the highest, as upstream does. Revisions beyond the owner's
//! `spec.revisionHistoryLimit` (default 10) are deleted, oldest first, unless pods still run
//! their template.

use std::collections::BTreeSet;

use replication::api::object::{self, Object};
use serde_json::{json, Value};

use super::{controller_reference, is_controlled_by, Action, CONTROLLER_REVISION_HASH};

/// Upstream's default `revisionHistoryLimit` for DaemonSets and StatefulSets.
const DEFAULT_HISTORY_LIMIT: usize = 10;

fn revision_number(revision: &Object) -> i64 {
    revision
        .get("revision")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn hash_of(revision: &Object) -> Option<&str> {
    object::labels(revision)?
        .get(CONTROLLER_REVISION_HASH)?
        .as_str()
}

/// The actions keeping `owner`'s history (`owner_kind`: `DaemonSet` or `StatefulSet`) for its
/// current template with hash `hash`: `revisions` are the namespace's ControllerRevisions,
/// `hashes_in_use` the hashes of the owner's live pods.
pub fn reconcile(
    owner: &Object,
    owner_kind: &str,
    hash: &str,
    revisions: &[Object],
    hashes_in_use: &BTreeSet<String>,
) -> Vec<Action> {
    let mut owned: Vec<&Object> = revisions
        .iter()
        .filter(|r| object::namespace(r) == object::namespace(owner) && is_controlled_by(r, owner))
        .collect();
    owned.sort_by_key(|r| revision_number(r));
    let highest = owned.last().map_or(0, |r| revision_number(r));
    let mut actions = Vec::new();
    match owned.iter().find(|r| hash_of(r) == Some(hash)) {
        None => actions.push(Action::Create {
            resource: "controllerrevisions",
            namespace: object::namespace(owner).to_owned(),
            object: new_revision(owner, owner_kind, hash, highest + 1),
        }),
        Some(current) if revision_number(current) < highest => {
            let mut renumbered = (*current).clone();
            renumbered.insert("revision".into(), json!(highest + 1));
            actions.push(Action::Update {
                resource: "controllerrevisions",
                object: Value::Object(renumbered),
            });
        }
        Some(_) => {}
    }
    let limit = owner
        .get("spec")
        .and_then(|s| s.get("revisionHistoryLimit"))
        .and_then(Value::as_i64)
        .map_or(DEFAULT_HISTORY_LIMIT, |l| l.max(0) as usize);
    let old: Vec<&&Object> = owned
        .iter()
        .filter(|r| hash_of(r).is_some_and(|h| h != hash && !hashes_in_use.contains(h)))
        .collect();
    let excess = old.len().saturating_sub(limit);
    actions.extend(old.into_iter().take(excess).map(|r| Action::Delete {
        resource: "controllerrevisions",
        namespace: object::namespace(r).to_owned(),
        name: object::name(r).to_owned(),
        uid: super::uid(r).to_owned(),
    }));
    actions
}

fn new_revision(owner: &Object, owner_kind: &str, hash: &str, revision: i64) -> Value {
    let mut template = owner
        .get("spec")
        .and_then(|s| s.get("template"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut labels = template
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or_else(|| json!({}));
    labels[CONTROLLER_REVISION_HASH] = json!(hash);
    template["$patch"] = json!("replace");
    json!({
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": format!("{}-{hash}", object::name(owner)),
            "namespace": object::namespace(owner),
            "labels": labels,
            "ownerReferences": [controller_reference(owner, "apps/v1", owner_kind)],
        },
        "data": {"spec": {"template": template}},
        "revision": revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(image: &str, limit: Option<i64>) -> Object {
        let mut ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "agent", "namespace": "ns", "uid": "ds-uid"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                "template": {"metadata": {"labels": {"app": "agent"}},
                    "spec": {"containers": [{"name": "c", "image": image}]}}}});
        if let Some(limit) = limit {
            ds["spec"]["revisionHistoryLimit"] = json!(limit);
        }
        ds.as_object().cloned().unwrap()
    }

    /// What the API would store for a create (a uid and resourceVersion added).
    fn stored(action: &Action) -> Object {
        let Action::Create { object, .. } = action else {
            panic!("not a create: {action:?}")
        };
        let mut object = object.as_object().cloned().unwrap();
        let name = object::name(&object).to_owned();
        object::meta_mut(&mut object).insert("uid".into(), json!(format!("uid-{name}")));
        object
    }

    #[test]
    fn a_revision_per_template_renumbered_on_undo_and_trimmed_to_the_limit() {
        let none = BTreeSet::new();
        let v1 = ds("busybox:1", Some(1));
        let first = reconcile(&v1, "DaemonSet", "h1", &[], &none);
        assert_eq!(first.len(), 1);
        let r1 = stored(&first[0]);
        assert_eq!(r1["revision"], 1);
        assert_eq!(object::name(&r1), "agent-h1");
        assert_eq!(r1["metadata"]["labels"]["app"], "agent");
        assert_eq!(r1["metadata"]["labels"][CONTROLLER_REVISION_HASH], "h1");
        assert_eq!(r1["data"]["spec"]["template"]["$patch"], "replace");
        assert_eq!(
            r1["data"]["spec"]["template"]["spec"]["containers"][0]["image"],
            "busybox:1"
        );
        assert!(is_controlled_by(&r1, &v1));
        // Nothing more to do while the template stays.
        assert!(reconcile(&v1, "DaemonSet", "h1", std::slice::from_ref(&r1), &none).is_empty());

        // A new template: revision 2.
        let v2 = ds("busybox:2", Some(1));
        let second = reconcile(&v2, "DaemonSet", "h2", std::slice::from_ref(&r1), &none);
        let r2 = stored(&second[0]);
        assert_eq!(r2["revision"], 2);
        // Back to the first template (an undo): its revision becomes 3, nothing is created.
        let undo = reconcile(&v1, "DaemonSet", "h1", &[r1.clone(), r2.clone()], &none);
        assert_eq!(undo.len(), 1);
        let Action::Update { object, .. } = &undo[0] else {
            panic!("{undo:?}")
        };
        assert_eq!(object["revision"], 3);
        assert_eq!(object["metadata"]["name"], "agent-h1");

        // A third template with a limit of 1: the oldest old one goes, unless pods run it.
        let v3 = ds("busybox:3", Some(1));
        let r3 = stored(&reconcile(&v3, "DaemonSet", "h3", &[r1.clone(), r2.clone()], &none)[0]);
        let all = [r1.clone(), r2.clone(), r3];
        let trimmed = reconcile(&v3, "DaemonSet", "h3", &all, &none);
        assert_eq!(
            trimmed.iter().map(Action::name).collect::<Vec<_>>(),
            ["agent-h1"]
        );
        let in_use = BTreeSet::from(["h1".to_owned()]);
        let kept = reconcile(&v3, "DaemonSet", "h3", &all, &in_use);
        assert!(kept.is_empty(), "{kept:?}");
        // Another owner's revisions are not ours.
        let other = ds("busybox:1", None);
        let mut other = other;
        object::meta_mut(&mut other).insert("uid".into(), json!("other-uid"));
        assert_eq!(reconcile(&other, "DaemonSet", "h1", &all, &none).len(), 1);
    }
}
