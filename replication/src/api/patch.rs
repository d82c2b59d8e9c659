//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and Kubernetes' strategic
//! merge patch for the fields kubectl touches.

use serde_json::{Map, Value};

use super::status::ApiError;
use super::status::StatusReason;

/// The PATCH body formats, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/json-patch+json`: a JSON patch (RFC 6902).
    Json,
    /// `application/merge-patch+json`: a JSON merge patch (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`: Kubernetes' strategic merge patch (lists merged
    /// by their `patchMergeKey`).
    StrategicMerge,
    /// `application/apply-patch+yaml`: server-side apply ([`super::apply`]); the body is the
    /// manager's configuration (JSON, which is YAML, as kubectl sends it; or YAML).
    Apply,
}

impl PatchKind {
    /// The patch format a `Content-Type` names (parameters ignored).
    ///
    /// # Errors
    /// 415 `UnsupportedMediaType` for any other media type (CBOR included).
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchKind::StrategicMerge),
            "application/apply-patch+yaml" => Ok(PatchKind::Apply),
            "application/apply-patch+cbor" => Err(ApiError::unsupported_media_type(
                "server-side apply in CBOR is not supported; send application/apply-patch+yaml",
            )),
            other => Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types \
                 include: application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json (got {other:?})"
            ))),
        }
    }
}

/// Applies `patch` of `kind` to `target`.
///
/// # Errors
/// 400 `BadRequest` when `patch` is not JSON of the kind's shape (a strategic merge patch must
/// be an object); 422 `Invalid` when a JSON patch operation cannot be applied (a missing path,
/// a failed `test`).
pub fn apply(kind: PatchKind, target: &mut Value, patch: &[u8]) -> Result<(), ApiError> {
    let bad = |e: &dyn std::fmt::Display| ApiError::bad_request(format!("invalid patch: {e}"));
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(patch).map_err(|e| bad(&e))?;
            json_patch::patch(target, &ops).map_err(|e| {
                ApiError::new(
                    422,
                    StatusReason::Invalid,
                    format!("the JSON patch could not be applied: {e}"),
                )
            })
        }
        PatchKind::Merge => {
            let patch: Value = serde_json::from_slice(patch).map_err(|e| bad(&e))?;
            json_patch::merge(target, &patch);
            Ok(())
        }
        PatchKind::Apply => Err(ApiError::internal(
            "server-side apply is served by the apply module, not as a patch",
        )),
        PatchKind::StrategicMerge => {
            let patch: Value = serde_json::from_slice(patch).map_err(|e| bad(&e))?;
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be an object",
                ));
            }
            strategic_merge(target, &patch, None);
            Ok(())
        }
    }
}

/// The merge key of a list field, by field name (and, for `ports`, by what the elements hold):
/// the subset of Kubernetes' `patchMergeKey` tags on the kinds served here.
pub(crate) fn merge_key(field: &str, elements: &[&Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "topologySpreadConstraints" => "topologyKey",
        "ports" => {
            let container_ports = elements.iter().any(|e| e.get("containerPort").is_some());
            if container_ports {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Primitive lists with strategy `merge` (union) rather than replace.
fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|v| v.get("$patch").is_none())
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn strategic_merge(target: &mut Value, patch: &Value, _field: Option<&str>) {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    match patch_map.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target_map = target.as_object_mut().expect("made an object");
    if let Some(Value::Array(keep)) = patch_map.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        target_map.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) =
                (target_map.get_mut(field), value)
            {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(_) => {
                let entry = target_map.entry(key.clone()).or_insert(Value::Null);
                strategic_merge(entry, value, Some(key));
                if entry.is_null() {
                    target_map.remove(key);
                }
            }
            Value::Array(items) => {
                let order = patch_map
                    .get(&format!("$setElementOrder/{key}"))
                    .and_then(Value::as_array);
                let current = target_map.remove(key);
                let merged = merge_list(key, current, items, order);
                target_map.insert(key.clone(), merged);
            }
            other => {
                target_map.insert(key.clone(), other.clone());
            }
        }
    }
    // `$setElementOrder` for lists the patch did not otherwise touch.
    for (key, order) in patch_map {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            if patch_map.contains_key(field) {
                continue;
            }
            if let (Some(Value::Array(list)), Value::Array(order)) =
                (target_map.get_mut(field), order)
            {
                let elements: Vec<&Value> = list.iter().collect();
                if let Some(mk) = merge_key(field, &elements) {
                    reorder(list, order, mk);
                }
            }
        }
    }
}

fn merge_list(
    field: &str,
    current: Option<Value>,
    patch: &[Value],
    order: Option<&Vec<Value>>,
) -> Value {
    let mut list = match current {
        Some(Value::Array(list)) => list,
        _ => Vec::new(),
    };
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return strip_directives(&Value::Array(patch.to_vec()));
    }
    let elements: Vec<&Value> = patch.iter().chain(list.iter()).collect();
    let Some(mk) = merge_key(field, &elements) else {
        if merges_primitives(field) {
            for item in patch {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
            return Value::Array(list);
        }
        return strip_directives(&Value::Array(patch.to_vec()));
    };
    for item in patch {
        let Some(key_value) = item.get(mk) else {
            // No merge key: cannot be matched, append as is.
            list.push(strip_directives(item));
            continue;
        };
        let position = list.iter().position(|e| e.get(mk) == Some(key_value));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                list.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut list[i], item, Some(field)),
            (None, false) => list.push(strip_directives(item)),
        }
    }
    if let Some(order) = order {
        reorder(&mut list, order, mk);
    }
    Value::Array(list)
}

/// Orders `list` as `order` names its merge keys; unnamed elements keep their place at the end.
fn reorder(list: &mut [Value], order: &[Value], mk: &str) {
    let rank = |v: &Value| {
        v.get(mk)
            .and_then(|k| order.iter().position(|o| o.get(mk) == Some(k)))
            .unwrap_or(usize::MAX)
    };
    list.sort_by_key(rank);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        let mut t = target;
        apply(
            PatchKind::StrategicMerge,
            &mut t,
            patch.to_string().as_bytes(),
        )
        .unwrap();
        t
    }

    #[test]
    fn containers_merge_by_name() {
        let pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x", "env": [{"name": "E", "value": "1"}]},
            {"name": "b", "image": "y"}]}});
        let out = smp(
            pod,
            json!({"spec": {"containers": [
            {"name": "a", "image": "x2", "env": [{"name": "F", "value": "2"}]}]}}),
        );
        let c = &out["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[0]["image"], "x2");
        assert_eq!(c[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(c[1]["name"], "b");
    }

    #[test]
    fn directives() {
        let pod = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x"]},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "tolerations": [{"key": "t"}]}});
        let out = smp(
            pod,
            json!({
            "metadata": {"labels": {"a": null}, "finalizers": ["y"]},
            "spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
                     "containers": [{"name": "a", "$patch": "delete"}],
                     "tolerations": [{"key": "u"}]}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["x", "y"]));
        assert_eq!(out["spec"]["containers"], json!([{"name": "b"}]));
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "u"}]));
    }

    #[test]
    fn service_ports_merge_by_port() {
        let svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443}]}});
        let out = smp(
            svc,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}),
        );
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(out["spec"]["ports"][0]["targetPort"], 8080);
    }

    #[test]
    fn merge_and_json_patch() {
        let mut t = json!({"a": {"b": 1, "c": 2}});
        apply(PatchKind::Merge, &mut t, br#"{"a":{"b":null,"d":3}}"#).unwrap();
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}}));
        apply(
            PatchKind::Json,
            &mut t,
            br#"[{"op":"replace","path":"/a/c","value":5}]"#,
        )
        .unwrap();
        assert_eq!(t["a"]["c"], 5);
        let err = apply(
            PatchKind::Json,
            &mut t,
            br#"[{"op":"remove","path":"/zz"}]"#,
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            apply(PatchKind::Merge, &mut t, b"{nope").unwrap_err().code,
            400
        );
    }
}
