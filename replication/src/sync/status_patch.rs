//! Reports as patches of the part of an object the node owns: a pod's, its Node's and its
//! devices' `status`,
//! its Lease's `spec` (the renewal). The cloud takes only that part from such a report, so the
//! report needs to carry only the fields of it that changed: a JSON merge patch (RFC 7386)
//! `{"status": {field: new value, gone: null}}` of the part's top-level fields (`phase`,
//! `conditions`, `renewTime`, …), each field whole. Applied to any version of the object in the
//! cloud it gives the node's part, as long as the cloud's part equals the node's before the
//! change, which holds when no other report on the object is unacknowledged (the node is the
//! only writer of that part).

use serde_json::{Map, Value};

/// The part of an object of `kind` that its node owns and may send as a patch.
pub fn owned_part(kind: &str) -> Option<&'static str> {
    match kind {
        "pods" | "nodes" | "devices" | "devicestatuses" => Some("status"),
        "leases" => Some("spec"),
        _ => None,
    }
}

fn part_of(object: &Value, part: &str) -> Option<Map<String, Value>> {
    match object.get(part) {
        Some(Value::Object(fields)) => Some(fields.clone()),
        None | Some(Value::Null) => Some(Map::new()),
        Some(_) => None,
    }
}

/// The patch from `before` to `after` when only `part` differs and the patch is smaller
/// than `after`; `None` otherwise (the report goes whole).
pub fn diff(part: &str, before: &[u8], after: &[u8]) -> Option<bytes::Bytes> {
    let mut old: Value = serde_json::from_slice(before).ok()?;
    let mut new: Value = serde_json::from_slice(after).ok()?;
    let old_status = part_of(&old, part)?;
    let new_status = part_of(&new, part)?;
    // Anything but the owned part changed: not a report of that part alone.
    old.as_object_mut()?.remove(part);
    new.as_object_mut()?.remove(part);
    if old != new {
        return None;
    }
    let mut changed = Map::new();
    for (field, value) in &new_status {
        if old_status.get(field) != Some(value) {
            changed.insert(field.clone(), value.clone());
        }
    }
    for field in old_status.keys() {
        if !new_status.contains_key(field) {
            changed.insert(field.clone(), Value::Null);
        }
    }
    let mut patch = Map::new();
    patch.insert(part.to_owned(), Value::Object(changed));
    let patch = serde_json::to_vec(&patch).ok()?;
    (patch.len() < after.len()).then(|| bytes::Bytes::from(patch))
}

/// Applies a patch of `part` to the cloud's object (a JSON merge patch, RFC 7386).
///
/// # Errors
/// A readable reason when `patch` is not JSON, not a JSON object, or has a top-level field
/// other than `part`; `object` is unchanged then.
pub fn apply(part: &str, object: &mut Map<String, Value>, patch: &[u8]) -> Result<(), String> {
    let patch: Value =
        serde_json::from_slice(patch).map_err(|e| format!("the patch is not JSON: {e}"))?;
    let Value::Object(fields) = &patch else {
        return Err("the patch is not an object".into());
    };
    if fields.keys().any(|k| k != part) {
        return Err(format!("this patch may change only {part}"));
    }
    let mut value = Value::Object(std::mem::take(object));
    json_patch::merge(&mut value, &patch);
    if let Value::Object(map) = value {
        *object = map;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bytes(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_status_change_is_a_small_patch_that_reproduces_the_status() {
        let before = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Running", "message": "a", "podIP": "10.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        let after = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Running", "message": "b",
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        let patch = diff("status", &bytes(before.clone()), &bytes(after.clone())).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&patch).unwrap(),
            json!({"status": {"message": "b", "podIP": null}})
        );
        // The cloud's copy may be newer in spec/metadata: the status still comes out right.
        let mut cloud = before.as_object().unwrap().clone();
        cloud.insert(
            "metadata".into(),
            json!({"name": "p", "labels": {"new": "1"}}),
        );
        apply("status", &mut cloud, &patch).unwrap();
        assert_eq!(cloud["status"], after["status"]);
        assert_eq!(cloud["metadata"]["labels"]["new"], "1");
    }

    #[test]
    fn anything_but_status_goes_whole() {
        let before = json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}});
        let after = json!({"metadata": {"name": "p", "labels": {"x": "y"}},
                           "status": {"phase": "Running"}});
        assert!(diff("status", &bytes(before), &bytes(after)).is_none());
        assert!(diff("status", b"not json", b"{}").is_none());
        let mut object = Map::new();
        assert!(apply("status", &mut object, br#"{"metadata": {"name": "x"}}"#).is_err());
        assert!(apply("status", &mut object, b"[1]").is_err());
    }

    #[test]
    fn a_lease_renewal_is_its_renew_time() {
        let lease = |t: &str| {
            bytes(
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "n1", "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40, "renewTime": t}}),
            )
        };
        let patch = diff(
            "spec",
            &lease("2026-11-23T10:00:00.000000Z"),
            &lease("2026-11-23T10:00:10.000000Z"),
        )
        .unwrap();
        assert_eq!(
            &patch[..],
            br#"{"spec":{"renewTime":"2026-11-23T10:00:10.000000Z"}}"#
        );
        assert_eq!(owned_part("leases"), Some("spec"));
        assert_eq!(owned_part("configmaps"), None);
    }
}
