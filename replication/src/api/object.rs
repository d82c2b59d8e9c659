//! Objects as the API handles them: metadata access, the stored form, defaults on create and
//! validation.
//!
//! The stored form is the object's JSON without `metadata.resourceVersion`: the store keeps the
//! version beside the bytes (it is assigned at commit), and [`with_resource_version`] puts it
//! back when the object is served.

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::resources::Resource;
use super::status::{ApiError, Cause};
use crate::version::Revision;

/// A Kubernetes object as a JSON map (`apiVersion`, `kind`, `metadata`, ...).
pub type Object = Map<String, Value>;

/// Parses a request body into a JSON object.
///
/// # Errors
/// 400 `BadRequest` when `body` is not JSON, or not a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Object, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "the request body is not a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

/// `metadata`, if it is an object.
pub fn meta(object: &Object) -> Option<&Object> {
    object.get("metadata").and_then(Value::as_object)
}

/// `metadata`, made an empty object first when absent or not an object.
pub fn meta_mut(object: &mut Object) -> &mut Object {
    let entry = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("metadata is an object")
}

/// A string field of `metadata`.
pub fn meta_str<'a>(object: &'a Object, field: &str) -> Option<&'a str> {
    meta(object)?.get(field)?.as_str()
}

/// `metadata.name`; empty when absent.
pub fn name(object: &Object) -> &str {
    meta_str(object, "name").unwrap_or_default()
}

/// `metadata.namespace`; empty when absent (and for cluster-scoped objects).
pub fn namespace(object: &Object) -> &str {
    meta_str(object, "namespace").unwrap_or_default()
}

/// `metadata.resourceVersion` as a number; `Err` when present and not a number.
///
/// `None` when absent or empty. What the API serves as an object's resourceVersion is its store
/// [`Revision`] (see [`crate::version`]), so that is what a client's value names.
///
/// # Errors
/// 400 `BadRequest` when it is not a decimal `u64`.
pub fn resource_version(object: &Object) -> Result<Option<Revision>, ApiError> {
    match meta_str(object, "resourceVersion") {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!("metadata.resourceVersion {text:?} is not valid"))
        }),
    }
}

/// `metadata.labels`, if it is an object.
pub fn labels(object: &Object) -> Option<&Object> {
    meta(object)?.get("labels")?.as_object()
}

/// The stored form: the object's bytes without `metadata.resourceVersion`.
pub fn to_stored(mut object: Object) -> Vec<u8> {
    meta_mut(&mut object).remove("resourceVersion");
    serde_json::to_vec(&object).expect("a JSON map serializes")
}

/// Stored bytes with `metadata.resourceVersion` set, ready to serve. Re-reads only the top level
/// and `metadata`; the rest is copied through as raw JSON.
///
/// # Errors
/// 500 `InternalError` when `stored` is not a JSON object or its `metadata` is not one.
pub fn with_resource_version(stored: &[u8], rv: Revision) -> Result<Vec<u8>, ApiError> {
    with_resource_version_as(stored, rv, None)
}

/// [`with_resource_version`], with `apiVersion` replaced by `api_version` when given (a custom
/// resource read at a version other than its storage version: conversion `None`).
///
/// # Errors
/// As [`with_resource_version`].
pub fn with_resource_version_as(
    stored: &[u8],
    rv: Revision,
    api_version: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    let corrupt = |e: serde_json::Error| ApiError::internal(format!("stored object: {e}"));
    let raw: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(stored).map_err(corrupt)?;
    let mut metadata: Map<String, Value> = match raw.get("metadata") {
        Some(m) => serde_json::from_str(m.get()).map_err(corrupt)?,
        None => Map::new(),
    };
    metadata.insert("resourceVersion".into(), Value::String(rv.to_string()));
    // Serialize in key order, with `metadata` rebuilt and everything else raw.
    let mut out = Vec::with_capacity(stored.len() + 32);
    out.push(b'{');
    let mut first = true;
    let mut push_key = |out: &mut Vec<u8>, key: &str| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).expect("a string serializes");
        out.push(b':');
    };
    let mut wrote_meta = false;
    for (key, value) in &raw {
        if key == "metadata" {
            push_key(&mut out, key);
            serde_json::to_writer(&mut out, &metadata).expect("a map serializes");
            wrote_meta = true;
        } else if let (Some(version), "apiVersion") = (api_version, key.as_str()) {
            push_key(&mut out, key);
            serde_json::to_writer(&mut out, version).expect("a string serializes");
        } else {
            push_key(&mut out, key);
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    if !wrote_meta {
        push_key(&mut out, "metadata");
        serde_json::to_writer(&mut out, &metadata).expect("a map serializes");
    }
    out.push(b'}');
    Ok(out)
}

/// Stored bytes as a JSON object with its resourceVersion.
///
/// # Errors
/// 500 `InternalError` when `stored` is not a JSON object.
pub fn decode_stored(stored: &[u8], rv: Revision) -> Result<Object, ApiError> {
    let mut object: Object = serde_json::from_slice(stored)
        .map_err(|e| ApiError::internal(format!("stored object: {e}")))?;
    meta_mut(&mut object).insert("resourceVersion".into(), Value::String(rv.to_string()));
    Ok(object)
}

/// RFC 3339 UTC timestamp with second precision, as Kubernetes writes them.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Now, as [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// Now, with microseconds: a Kubernetes `MicroTime` (a Lease's `renewTime`).
pub fn now_micro_rfc3339() -> String {
    micro_rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` as a Kubernetes `MicroTime`: RFC 3339 UTC with six fractional digits.
pub fn micro_rfc3339(t: time::OffsetDateTime) -> String {
    format!(
        "{}.{:06}Z",
        rfc3339(t).trim_end_matches('Z'),
        t.microsecond()
    )
}

/// Seconds since the Unix epoch of an RFC 3339 timestamp.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

const GENERATE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Checks the request's apiVersion/kind and namespace against the URL and fills in what the
/// apiserver fills in on create: name from generateName, namespace, uid, creationTimestamp,
/// generation and kind-specific defaults.
///
/// # Errors
/// 400 `BadRequest` when the body's `apiVersion`, `kind` or `metadata.namespace` contradicts the
/// URL; 422 `Invalid` without `metadata.name` and `metadata.generateName`, or when
/// [`validate`] refuses the result.
pub fn prepare_create(
    resource: &Resource,
    url_namespace: &str,
    object: &mut Object,
) -> Result<(), ApiError> {
    check_type(resource, object)?;
    check_namespace(resource, url_namespace, object)?;
    let metadata = meta_mut(object);
    let has_name = metadata
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !has_name {
        let Some(prefix) = metadata.get("generateName").and_then(Value::as_str) else {
            return Err(ApiError::invalid(
                resource.kind,
                "",
                vec![Cause::new(
                    "metadata.name",
                    "Required value: name or generateName is required",
                )],
            ));
        };
        let suffix: String = (0..5)
            .map(|_| GENERATE_ALPHABET[rand::random_range(0..GENERATE_ALPHABET.len())] as char)
            .collect();
        let name = format!("{prefix}{suffix}");
        metadata.insert("name".into(), Value::String(name));
    }
    metadata.insert(
        "uid".into(),
        Value::String(uuid::Uuid::new_v4().hyphenated().to_string()),
    );
    metadata.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    metadata.insert("generation".into(), json!(1));
    metadata.remove("resourceVersion");
    metadata.remove("deletionTimestamp");
    metadata.remove("deletionGracePeriodSeconds");
    super::strategy::of(resource).prepare_create(resource, object)?;
    admit_custom(resource, object)?;
    validate(resource, object)
}

/// A custom resource's schema work (prune, default, validate), then its `apiVersion` set to the
/// storage version: stored objects are all at one version, whatever version wrote them.
fn admit_custom(resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
    let Some(custom) = resource.custom else {
        return Ok(());
    };
    if let Err(causes) = super::schema::admit(&custom.schema, object) {
        return Err(ApiError::invalid(
            &super::crd::qualified_kind(resource),
            name(object),
            causes,
        ));
    }
    object.insert(
        "apiVersion".into(),
        Value::String(format!("{}/{}", resource.group, custom.storage_version)),
    );
    Ok(())
}

/// Update/patch: the URL decides namespace and name; identity fields are carried over from the
/// current object; status is kept unless this is a `/status` write (and vice versa).
///
/// # Errors
/// 400 `BadRequest` when the body's `apiVersion`, `kind`, namespace or name contradicts the URL;
/// 422 `Invalid` for a pod whose `spec.nodeName` (once set), containers or commands change, a
/// workload whose selector changes, or when [`validate`] refuses the result.
pub fn prepare_update(
    resource: &Resource,
    url_namespace: &str,
    url_name: &str,
    current: &Object,
    object: &mut Object,
    status_subresource: bool,
) -> Result<(), ApiError> {
    check_type(resource, object)?;
    check_namespace(resource, url_namespace, object)?;
    let body_name = name(object);
    if body_name.is_empty() {
        meta_mut(object).insert("name".into(), Value::String(url_name.to_owned()));
    } else if body_name != url_name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
        )));
    }
    if resource.status {
        if status_subresource {
            // A status write may not change anything else, labels included.
            let merged = with_status_of(current, object);
            let rv = meta(object).and_then(|m| m.get("resourceVersion")).cloned();
            *object = merged;
            if let Some(rv) = rv {
                meta_mut(object).insert("resourceVersion".into(), rv);
            }
        } else {
            match current.get("status") {
                Some(status) => object.insert("status".into(), status.clone()),
                None => object.remove("status"),
            };
        }
    }
    let strategy = super::strategy::of(resource);
    // Defaulted before the spec is compared, so a client omitting defaults changes nothing.
    strategy.default_update(resource, object, status_subresource);
    let current_meta = meta(current).cloned().unwrap_or_default();
    let metadata = meta_mut(object);
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match current_meta.get(field) {
            Some(value) => metadata.insert(field.into(), value.clone()),
            None => metadata.remove(field),
        };
    }
    if !status_subresource && current.get("spec") != object.get("spec") {
        let generation = current_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        meta_mut(object).insert("generation".into(), json!(generation + 1));
    } else if let Some(generation) = current_meta.get("generation") {
        meta_mut(object).insert("generation".into(), generation.clone());
    }
    strategy.validate_update(resource, current, object, status_subresource)?;
    admit_custom(resource, object)?;
    validate(resource, object)
}

/// `current` with its status replaced by `source`'s (removed if `source` has none): what a
/// `/status` write, or a node's status report, makes of an object.
pub fn with_status_of(current: &Object, source: &Object) -> Object {
    let mut merged = current.clone();
    match source.get("status") {
        Some(status) => merged.insert("status".into(), status.clone()),
        None => merged.remove("status"),
    };
    merged
}

fn check_type(resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
    let api_version = resource.api_version();
    match object.get("apiVersion").and_then(Value::as_str) {
        None => {
            object.insert("apiVersion".into(), Value::String(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version \
                 ({api_version})"
            )))
        }
    }
    match object.get("kind").and_then(Value::as_str) {
        None => {
            object.insert("kind".into(), Value::String(resource.kind.to_owned()));
        }
        Some(k) if k == resource.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                resource.kind
            )))
        }
    }
    Ok(())
}

fn check_namespace(
    resource: &Resource,
    url_namespace: &str,
    object: &mut Object,
) -> Result<(), ApiError> {
    let metadata = meta_mut(object);
    if !resource.namespaced {
        metadata.remove("namespace");
        return Ok(());
    }
    match metadata.get("namespace").and_then(Value::as_str) {
        None | Some("") => {
            metadata.insert("namespace".into(), Value::String(url_namespace.to_owned()));
            Ok(())
        }
        Some(ns) if ns == url_namespace => Ok(()),
        Some(ns) => Err(ApiError::bad_request(format!(
            "the namespace of the provided object ({ns}) does not match the namespace sent on \
             the request ({url_namespace})"
        ))),
    }
}

/// The defaults of a pod's spec (a pod's, or a workload's pod template's).
pub fn default_pod_spec(spec: &mut Object) {
    for list in ["containers", "initContainers"] {
        let containers = spec.get_mut(list).and_then(Value::as_array_mut);
        for container in containers.into_iter().flatten() {
            let ports = container.get_mut("ports").and_then(Value::as_array_mut);
            for port in ports.into_iter().flatten().filter_map(Value::as_object_mut) {
                port.entry("protocol").or_insert(json!("TCP"));
            }
        }
    }
    spec.entry("restartPolicy").or_insert(json!("Always"));
    spec.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    spec.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    spec.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
}

/// DNS-1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A qualified name (a label key): an optional DNS subdomain prefix and `/`, then at most 63
/// alphanumerics, `-`, `_` or `.`, starting and ending alphanumeric.
pub fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    name_ok && prefix.is_none_or(is_dns1123_subdomain)
}

/// A label value: empty, or at most 63 alphanumerics, `-`, `_` or `.`, starting and ending
/// alphanumeric.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

/// Field checks: names, labels, and the required fields of the kinds edged acts on.
///
/// # Errors
/// 422 `Invalid` with one [`Cause`] per problem: a name that is not an RFC 1123 subdomain (a
/// label for Namespaces and Services), a label key or value that is not valid, a pod or
/// workload without its required fields, a ConfigMap's or Secret's data that is not a map of
/// strings with valid keys.
pub fn validate(resource: &Resource, object: &Object) -> Result<(), ApiError> {
    let strategy = super::strategy::of(resource);
    let mut causes = Vec::new();
    let mut cause = |field: &str, message: String| causes.push(Cause::new(field, message));
    let object_name = name(object);
    let label_names = strategy.name_is_label();
    let name_ok = if label_names {
        is_dns1123_label(object_name)
    } else {
        is_dns1123_subdomain(object_name)
    };
    if !name_ok {
        let rule = if label_names {
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character"
        } else {
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character"
        };
        cause(
            "metadata.name",
            format!("Invalid value: {object_name:?}: {rule}"),
        );
    }
    if let Some(labels) = labels(object) {
        for (key, value) in labels {
            if !is_qualified_name(key) {
                cause("metadata.labels", format!("Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.'"));
            }
            match value.as_str() {
                Some(v) if is_label_value(v) => {}
                _ => cause(
                    "metadata.labels",
                    format!("Invalid value: {value}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'"),
                ),
            }
        }
    }
    strategy.validate(resource, object, &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &super::crd::qualified_kind(resource),
            object_name,
            causes,
        ))
    }
}

/// Checks a pod (or a pod template: the same `spec.containers`), reporting through `cause`.
pub fn validate_pod(object: &Object, cause: &mut impl FnMut(&str, String)) {
    let containers = object
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        cause("spec.containers", "Required value".into());
        return;
    };
    let mut seen = std::collections::HashSet::new();
    for (i, c) in containers.iter().enumerate() {
        let c_name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        if !is_dns1123_label(c_name) {
            cause(
                &format!("spec.containers[{i}].name"),
                format!("Invalid value: {c_name:?}: must be a lowercase RFC 1123 label"),
            );
        } else if !seen.insert(c_name) {
            cause(
                &format!("spec.containers[{i}].name"),
                format!("Duplicate value: {c_name:?}"),
            );
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            cause(
                &format!("spec.containers[{i}].image"),
                "Required value".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_version_is_spliced_into_metadata() {
        let stored =
            br#"{"apiVersion":"v1","data":{"a":"b"},"kind":"ConfigMap","metadata":{"name":"x"}}"#;
        let out = with_resource_version(stored, Revision(42)).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "42");
        assert_eq!(v["data"]["a"], "b");
        let no_meta = with_resource_version(br#"{"kind":"X"}"#, Revision(7)).unwrap();
        let v: Value = serde_json::from_slice(&no_meta).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn a_secrets_string_data_is_merged_into_data_and_not_stored() {
        let secrets = super::super::resources::find("", "v1", "secrets").unwrap();
        let mut secret: Object = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "d"},
            "data": {"kept": "a2VwdA==", "token": "b2xk"},
            "stringData": {"token": "s3cret"},
        }))
        .unwrap();
        prepare_create(secrets, "d", &mut secret).unwrap();
        assert_eq!(
            secret["data"]["token"], "czNjcmV0",
            "stringData wins over data"
        );
        assert_eq!(secret["data"]["kept"], "a2VwdA==");
        assert!(secret.get("stringData").is_none());
        assert_eq!(secret["type"], "Opaque");

        let current = secret.clone();
        let mut update = secret.clone();
        update.insert("stringData".into(), json!({"extra": "x"}));
        prepare_update(secrets, "d", "s", &current, &mut update, false).unwrap();
        assert_eq!(update["data"]["extra"], "eA==");
        assert!(update.get("stringData").is_none());
        assert_eq!(update["type"], "Opaque");
    }

    #[test]
    fn dns_names() {
        assert!(is_dns1123_subdomain("a.b-c"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(!is_qualified_name("bad key"));
    }
}
