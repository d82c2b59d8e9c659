//! Pod status reports as patches: a node owns its pods' `status`, and the cloud takes only the
//! status from a pod report, so a report needs to carry only the status fields that changed.
//! The patch is a JSON merge patch (RFC 7386) `{"status": {field: new value, gone: null}}` of
//! the top-level status fields (`phase`, `conditions`, `containerStatuses`, `message`, …),
//! each field whole. Applied to any version of the pod in the cloud it gives the node's status,
//! as long as the cloud's status equals the node's before the change, which holds when no
//! other report on the pod is unacknowledged (the only writer of a pod's status is its node).

use serde_json::{Map, Value};

fn status_of(object: &[u8]) -> Option<Map<String, Value>> {
    let value: Value = serde_json::from_slice(object).ok()?;
    match value.get("status") {
        Some(Value::Object(status)) => Some(status.clone()),
        None | Some(Value::Null) => Some(Map::new()),
        Some(_) => None,
    }
}

/// The patch from `before` to `after` when only the status differs and the patch is smaller
/// than `after`; `None` otherwise (the report goes whole).
pub fn diff(before: &[u8], after: &[u8]) -> Option<bytes::Bytes> {
    let mut old: Value = serde_json::from_slice(before).ok()?;
    let mut new: Value = serde_json::from_slice(after).ok()?;
    let old_status = status_of(before)?;
    let new_status = status_of(after)?;
    // Anything but the status changed: not a status report.
    old.as_object_mut()?.remove("status");
    new.as_object_mut()?.remove("status");
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
    let patch = serde_json::to_vec(&serde_json::json!({ "status": changed })).ok()?;
    (patch.len() < after.len()).then(|| bytes::Bytes::from(patch))
}

/// Applies a status patch to the cloud's object. Errors if the patch touches anything but
/// `status`.
pub fn apply(object: &mut Map<String, Value>, patch: &[u8]) -> Result<(), String> {
    let patch: Value =
        serde_json::from_slice(patch).map_err(|e| format!("the status patch is not JSON: {e}"))?;
    let Value::Object(fields) = &patch else {
        return Err("the status patch is not an object".into());
    };
    if fields.keys().any(|k| k != "status") {
        return Err("a status patch may change only status".into());
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
        let patch = diff(&bytes(before.clone()), &bytes(after.clone())).unwrap();
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
        apply(&mut cloud, &patch).unwrap();
        assert_eq!(cloud["status"], after["status"]);
        assert_eq!(cloud["metadata"]["labels"]["new"], "1");
    }

    #[test]
    fn anything_but_status_goes_whole() {
        let before = json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}});
        let after = json!({"metadata": {"name": "p", "labels": {"x": "y"}},
                           "status": {"phase": "Running"}});
        assert!(diff(&bytes(before), &bytes(after)).is_none());
        assert!(diff(b"not json", b"{}").is_none());
        let mut object = Map::new();
        assert!(apply(&mut object, br#"{"metadata": {"name": "x"}}"#).is_err());
        assert!(apply(&mut object, b"[1]").is_err());
    }
}
