//! Per-kind strategies, as kube-apiserver's `pkg/registry/<group>/<kind>/strategy.go`: what a
//! kind does differently from the generic create, update and delete (defaulting, validation,
//! immutable fields, deletion rules). The generic code ([`super::object`] and
//! [`super::rest`]) asks [`of`] for the kind's strategy instead of testing its name, so a new
//! kind is one more implementation here and one more arm in [`of`].
//!
//! Table columns ([`super::table`]) are kept apart, as kube-apiserver keeps its printers apart
//! from its strategies.

use serde_json::{json, Value};

use super::object::{self, Object};
use super::resources::{self, Resource};
use super::status::{ApiError, Cause};
use crate::key::KeyRange;

/// Namespaces Kubernetes refuses to delete.
pub const PROTECTED_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// What differs for one kind. Every method has the generic behaviour as its default.
pub trait Strategy: Sync {
    /// Defaults of a new object (`PrepareForCreate` and the kind's defaulting), then checks
    /// that need the whole object before the generic validation.
    ///
    /// # Errors
    /// 422 `Invalid` when the kind refuses the object.
    fn prepare_create(&self, _resource: &Resource, _object: &mut Object) -> Result<(), ApiError> {
        Ok(())
    }

    /// Defaults applied to an update's body before it is compared with the current object
    /// (so a client that leaves defaults out changes nothing); `status`: a `/status` write.
    fn default_update(&self, _resource: &Resource, _object: &mut Object, _status: bool) {}

    /// Checks of an update against the current object (`ValidateUpdate`: immutable fields),
    /// after identity and status were carried over; `status`: a `/status` write.
    ///
    /// # Errors
    /// 422 `Invalid` naming the field that may not change.
    fn validate_update(
        &self,
        _resource: &Resource,
        _current: &Object,
        _object: &mut Object,
        _status: bool,
    ) -> Result<(), ApiError> {
        Ok(())
    }

    /// The kind's own field checks (`Validate`), one cause per problem through `cause`.
    fn validate(&self, _resource: &Resource, _object: &Object, _causes: &mut Vec<Cause>) {}

    /// Whether names are RFC 1123 labels (Namespaces, Services) rather than subdomains.
    fn name_is_label(&self) -> bool {
        false
    }

    /// Whether an object marked for deletion stays until another party deletes it for good
    /// once its finalizers are gone (a pod: its kubelet's final delete) instead of being
    /// removed by the update that drops the last finalizer.
    fn removed_by_its_owner(&self) -> bool {
        false
    }

    /// # Errors
    /// 403 `Forbidden` when the object named `name` may never be deleted.
    fn check_delete(&self, _name: &str) -> Result<(), ApiError> {
        Ok(())
    }

    /// What goes with the object named `name` in the same commit when it is deleted; `all`
    /// is every resource served.
    ///
    /// # Errors
    /// 400 `BadRequest` when a range cannot be made from the name.
    fn cascade(&self, _name: &str, _all: &[&Resource]) -> Result<Vec<KeyRange>, ApiError> {
        Ok(Vec::new())
    }
}

/// The strategy of `resource`'s kind.
pub fn of(resource: &Resource) -> &'static dyn Strategy {
    match resource.store_kind {
        "pods" => &Pods,
        "namespaces" => &Namespaces,
        "services" => &Services,
        "secrets" => &Secrets,
        "configmaps" => &ConfigMaps,
        "devices" | "devicemodels" | "devicestatuses" => &Devices,
        resources::CRD_STORE_KIND => &CustomResourceDefinitions,
        _ if super::workloads::is_workload(resource) => &Workloads,
        _ => &Generic,
    }
}

/// Every other kind: only the generic rules.
struct Generic;
impl Strategy for Generic {}

struct Pods;

impl Strategy for Pods {
    fn prepare_create(&self, _resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
        if let Some(spec) = object
            .entry("spec")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            object::default_pod_spec(spec);
        }
        if let Some(status) = object
            .entry("status")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            status.entry("phase").or_insert(json!("Pending"));
        }
        Ok(())
    }

    /// The fields edged acts on may not change: `spec.nodeName` once set, the containers and
    /// their commands.
    fn validate_update(
        &self,
        _resource: &Resource,
        current: &Object,
        object: &mut Object,
        _status: bool,
    ) -> Result<(), ApiError> {
        let spec = |o: &Object, f: &str| o.get("spec").and_then(|s| s.get(f)).cloned();
        let old_node = spec(current, "nodeName");
        if old_node.is_some() && old_node != spec(object, "nodeName") {
            return Err(ApiError::invalid(
                "Pod",
                object::name(object),
                vec![Cause::new(
                    "spec.nodeName",
                    "Forbidden: pod updates may not change nodeName once set",
                )],
            ));
        }
        let containers = |o: &Object| {
            o.get("spec")
                .and_then(|s| s.get("containers"))
                .and_then(Value::as_array)
                .map(|c| {
                    c.iter()
                        .map(|c| (c.get("name").cloned(), c.get("command").cloned()))
                        .collect::<Vec<_>>()
                })
        };
        if containers(current) != containers(object) {
            return Err(ApiError::invalid(
                "Pod",
                object::name(object),
                vec![Cause::new(
                    "spec",
                    "Forbidden: pod updates may not add or remove containers or change their \
                     commands",
                )],
            ));
        }
        Ok(())
    }

    fn validate(&self, _resource: &Resource, object: &Object, causes: &mut Vec<Cause>) {
        object::validate_pod(object, &mut |field: &str, message: String| {
            causes.push(Cause::new(field, message))
        });
    }

    fn removed_by_its_owner(&self) -> bool {
        true
    }
}

struct Namespaces;

impl Strategy for Namespaces {
    fn prepare_create(&self, _resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
        object.insert("status".into(), json!({"phase": "Active"}));
        Ok(())
    }

    fn name_is_label(&self) -> bool {
        true
    }

    fn check_delete(&self, name: &str) -> Result<(), ApiError> {
        if PROTECTED_NAMESPACES.contains(&name) {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        Ok(())
    }

    /// Everything in the namespace.
    fn cascade(&self, name: &str, all: &[&Resource]) -> Result<Vec<KeyRange>, ApiError> {
        let mut kinds: Vec<&str> = Vec::new();
        for r in all.iter().filter(|r| r.namespaced) {
            if !kinds.contains(&r.store_kind) {
                kinds.push(r.store_kind);
            }
        }
        kinds
            .into_iter()
            .map(|kind| {
                KeyRange::namespace(kind, name).map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .collect()
    }
}

struct Services;

impl Strategy for Services {
    /// `type` ClusterIP, each port's protocol TCP and targetPort its port, and a stable
    /// `clusterIP` in 10.96.0.0/12 derived from the uid (no allocator yet).
    fn prepare_create(&self, _resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
        let uid = object::meta_str(object, "uid")
            .unwrap_or_default()
            .to_owned();
        let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        spec.entry("type").or_insert(json!("ClusterIP"));
        let ports = spec.get_mut("ports").and_then(Value::as_array_mut);
        for port in ports.into_iter().flatten().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert(json!("TCP"));
            if let Some(number) = port.get("port").cloned() {
                port.entry("targetPort").or_insert(number);
            }
        }
        if !spec.contains_key("clusterIP") {
            let h = xxhash_rust::xxh3::xxh3_64(uid.as_bytes());
            let ip = format!(
                "10.{}.{}.{}",
                96 + (h >> 16) % 16,
                (h >> 8) & 0xff,
                1 + (h & 0xff) % 254
            );
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
        }
        Ok(())
    }

    fn name_is_label(&self) -> bool {
        true
    }
}

/// A Secret's `stringData` is write-only, as in Kubernetes: each entry is merged into `data`
/// (base64, overriding an entry of the same key) and `stringData` is not stored; `type`
/// defaults to `Opaque`.
fn secret_string_data(object: &mut Object) {
    use base64::Engine;
    if let Some(Value::Object(strings)) = object.remove("stringData") {
        let data = object.entry("data").or_insert_with(|| json!({}));
        if !data.is_object() {
            *data = json!({});
        }
        if let Some(data) = data.as_object_mut() {
            for (key, value) in strings {
                let text = value
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| value.to_string());
                let encoded = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
                data.insert(key, Value::String(encoded));
            }
        }
    }
    object.entry("type").or_insert(json!("Opaque"));
}

/// `data`, `binaryData` and `stringData` of a ConfigMap or Secret: maps of strings under
/// config keys (alphanumerics, `-`, `_`, `.`; at most 253).
fn validate_config_data(object: &Object, causes: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        match object.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (key, value) in map {
                    let key_ok = !key.is_empty()
                        && key.len() <= 253
                        && key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                    if !key_ok {
                        causes.push(Cause::new(
                            format!("{field}[{key}]"),
                            "Invalid value: a valid config key must consist of alphanumeric \
                             characters, '-', '_' or '.'",
                        ));
                    }
                    if !value.is_string() {
                        causes.push(Cause::new(
                            format!("{field}[{key}]"),
                            "Invalid value: must be a string",
                        ));
                    }
                }
            }
            Some(_) => causes.push(Cause::new(field, "Invalid value: must be a map of strings")),
        }
    }
}

struct Secrets;

impl Strategy for Secrets {
    fn prepare_create(&self, _resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
        secret_string_data(object);
        Ok(())
    }

    fn default_update(&self, _resource: &Resource, object: &mut Object, _status: bool) {
        secret_string_data(object);
    }

    fn validate(&self, _resource: &Resource, object: &Object, causes: &mut Vec<Cause>) {
        validate_config_data(object, causes);
    }
}

struct ConfigMaps;

impl Strategy for ConfigMaps {
    fn validate(&self, _resource: &Resource, object: &Object, causes: &mut Vec<Cause>) {
        validate_config_data(object, causes);
    }
}

/// KubeEdge's Device, DeviceModel and DeviceStatus.
struct Devices;

impl Strategy for Devices {
    fn validate(&self, resource: &Resource, object: &Object, causes: &mut Vec<Cause>) {
        super::devices::validate(
            resource.store_kind,
            object,
            &mut |field: &str, message: String| causes.push(Cause::new(field, message)),
        );
    }
}

/// apps/v1 and batch/v1 workloads.
struct Workloads;

impl Strategy for Workloads {
    fn prepare_create(&self, resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
        super::workloads::apply_defaults(resource, object);
        Ok(())
    }

    fn default_update(&self, resource: &Resource, object: &mut Object, status: bool) {
        if !status {
            super::workloads::apply_defaults(resource, object);
        }
    }

    fn validate_update(
        &self,
        resource: &Resource,
        current: &Object,
        object: &mut Object,
        status: bool,
    ) -> Result<(), ApiError> {
        if status {
            return Ok(());
        }
        super::workloads::validate_update(resource, current, object)
    }

    fn validate(&self, resource: &Resource, object: &Object, causes: &mut Vec<Cause>) {
        super::workloads::validate(resource, object, causes);
    }
}

/// apiextensions' CustomResourceDefinitions: defaults, the status the API server keeps
/// (accepted names, conditions), and their own validation.
struct CustomResourceDefinitions;

impl Strategy for CustomResourceDefinitions {
    fn prepare_create(&self, _resource: &Resource, object: &mut Object) -> Result<(), ApiError> {
        super::crd::apply_defaults(object);
        super::crd::set_status(object, None);
        super::crd::validate(object, None)
    }

    fn validate_update(
        &self,
        _resource: &Resource,
        current: &Object,
        object: &mut Object,
        _status: bool,
    ) -> Result<(), ApiError> {
        super::crd::apply_defaults(object);
        super::crd::set_status(object, Some(current));
        super::crd::validate(object, Some(current))
    }

    /// The CRD's objects (apiextensions' finalizer deletes them first).
    fn cascade(&self, name: &str, _all: &[&Resource]) -> Result<Vec<KeyRange>, ApiError> {
        Ok(vec![
            KeyRange::kind(name).map_err(|e| ApiError::bad_request(e.to_string()))?
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(store_kind: &str) -> &'static Resource {
        resources::by_store_kind(store_kind).expect("a built-in resource")
    }

    #[test]
    fn kinds_get_their_own_strategy_and_the_rest_the_generic_one() {
        assert!(of(resource("pods")).removed_by_its_owner());
        assert!(!of(resource("configmaps")).removed_by_its_owner());
        assert!(of(resource("namespaces")).name_is_label());
        assert!(of(resource("services")).name_is_label());
        assert!(!of(resource("secrets")).name_is_label());
        assert!(of(resource("namespaces"))
            .check_delete("kube-system")
            .is_err());
        assert!(of(resource("namespaces")).check_delete("team-a").is_ok());
        assert!(of(resource("leases")).check_delete("kube-system").is_ok());
        let mut causes = Vec::new();
        let bad = serde_json::json!({"data": {"ok": 1, "bad key": "x"}});
        of(resource("configmaps")).validate(
            resource("configmaps"),
            bad.as_object().unwrap(),
            &mut causes,
        );
        assert_eq!(causes.len(), 2, "{causes:?}");
        let mut secret = serde_json::json!({"stringData": {"k": "v"}});
        let secret = secret.as_object_mut().unwrap();
        of(resource("secrets"))
            .prepare_create(resource("secrets"), secret)
            .unwrap();
        assert_eq!(secret["data"]["k"], "dg==");
        assert_eq!(secret["type"], "Opaque");
        assert!(!secret.contains_key("stringData"));
    }
}
