//! The OpenAPI v3 schemas of the built-in kinds, from k8s-openapi's types (their upstream
//! descriptions included), for `kubectl explain` on the embedded API.
//!
//! Generated with schemars' OpenAPI 3.0 settings: definitions under `#/components/schemas/`
//! named as kube-apiserver names them (`io.k8s.api.core.v1.Pod`), a `$ref` with a description
//! turned into `allOf: [{$ref}]` as kube-apiserver publishes it. Each served kind's component
//! carries `x-kubernetes-group-version-kind`, which is how kubectl finds it.
//!
//! The schemas carry no `x-kubernetes-patch-merge-key`/`-strategy`. kubectl builds its
//! strategic-merge patches from OpenAPI v3 only for kinds whose PATCH operation declares the
//! strategic-merge content type; the documents here declare no request bodies, so client-side
//! `kubectl apply` keeps using its compiled-in types (tested by the kubectl suite).

use std::collections::HashMap;

use k8s_openapi::api::{apps, batch, coordination, core, discovery, rbac};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
use replication::api::resources;
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

/// One served kind's schema entry point: `(group, version, kind, add-to-generator)`.
type Entry = (
    &'static str,
    &'static str,
    &'static str,
    fn(&mut schemars::SchemaGenerator),
);

fn add<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) {
    generator.subschema_for::<T>();
}

/// The built-in kinds kedge serves, with their k8s-openapi types.
const KINDS: &[Entry] = &[
    ("", "v1", "Namespace", add::<core::v1::Namespace>),
    ("", "v1", "Pod", add::<core::v1::Pod>),
    ("", "v1", "ConfigMap", add::<core::v1::ConfigMap>),
    ("", "v1", "Secret", add::<core::v1::Secret>),
    ("", "v1", "Service", add::<core::v1::Service>),
    ("", "v1", "Endpoints", add::<core::v1::Endpoints>),
    ("", "v1", "Node", add::<core::v1::Node>),
    ("", "v1", "ServiceAccount", add::<core::v1::ServiceAccount>),
    ("", "v1", "Event", add::<core::v1::Event>),
    (
        "",
        "v1",
        "PersistentVolumeClaim",
        add::<core::v1::PersistentVolumeClaim>,
    ),
    (
        "coordination.k8s.io",
        "v1",
        "Lease",
        add::<coordination::v1::Lease>,
    ),
    (
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        add::<discovery::v1::EndpointSlice>,
    ),
    ("apps", "v1", "Deployment", add::<apps::v1::Deployment>),
    ("apps", "v1", "ReplicaSet", add::<apps::v1::ReplicaSet>),
    ("apps", "v1", "DaemonSet", add::<apps::v1::DaemonSet>),
    ("apps", "v1", "StatefulSet", add::<apps::v1::StatefulSet>),
    ("batch", "v1", "Job", add::<batch::v1::Job>),
    ("batch", "v1", "CronJob", add::<batch::v1::CronJob>),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        add::<rbac::v1::ClusterRole>,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        add::<rbac::v1::ClusterRoleBinding>,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        add::<apiextensions::v1::CustomResourceDefinition>,
    ),
];

/// The components of each served group-version document, keyed by its path (`api/v1`,
/// `apis/apps/v1`); every kind in [`KINDS`] that the API serves.
pub fn builtin_schemas() -> HashMap<String, Map<String, Value>> {
    let mut out = HashMap::new();
    let mut paths: Vec<(&str, &str)> = KINDS.iter().map(|(g, v, _, _)| (*g, *v)).collect();
    paths.dedup();
    for (group, version) in paths {
        let mut generator = SchemaSettings::openapi3().into_generator();
        let kinds: Vec<&Entry> = KINDS
            .iter()
            .filter(|(g, v, kind, _)| {
                (*g, *v) == (group, version)
                    && resources::all()
                        .iter()
                        .any(|r| r.group == *g && r.version == *v && r.kind == *kind)
            })
            .collect();
        for (_, _, _, register) in &kinds {
            register(&mut generator);
        }
        let mut schemas = generator.take_definitions(true);
        for (g, v, kind, _) in &kinds {
            let prefix = if g.is_empty() {
                format!("io.k8s.api.core.{v}.")
            } else {
                String::new()
            };
            let name = schemas
                .keys()
                .find(|n| {
                    n.rsplit('.').next() == Some(*kind)
                        && (prefix.is_empty() || n.starts_with(&prefix))
                        && n.contains(&format!(".{v}."))
                })
                .cloned();
            if let Some(schema) = name.and_then(|n| schemas.get_mut(&n)) {
                schema["x-kubernetes-group-version-kind"] =
                    json!([{"group": g, "version": v, "kind": kind}]);
            }
        }
        let path = if group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{group}/{version}")
        };
        out.insert(path, schemas);
    }
    out.insert(
        format!("apis/{}/v1beta1", resources::DEVICES_GROUP),
        device_schemas(),
    );
    out
}

/// KubeEdge's device kinds (Device, DeviceModel, DeviceStatus), written here from KubeEdge's
/// `devices.kubeedge.io/v1beta1` CRDs (the fields nodes and mappers use; free-form parts left
/// open), with the Kubernetes ObjectMeta they reference.
fn device_schemas() -> Map<String, Value> {
    let mut generator = SchemaSettings::openapi3().into_generator();
    generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>();
    let mut schemas = generator.take_definitions(true);
    let meta = json!({"allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}],
                      "description": "Standard object's metadata."});
    let open = |description: &str| {
        json!({"type": "object", "description": description,
               "x-kubernetes-preserve-unknown-fields": true})
    };
    let string = |description: &str| json!({"type": "string", "description": description});
    let twin_property = json!({"type": "object", "properties": {
        "value": string("The value, as a string."),
        "metadata": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "Metadata of the value: timestamp (ms), type."}}});
    let kind = |kind: &str, description: &str, spec: Value, status: Value| {
        json!({
            "type": "object",
            "description": description,
            "properties": {
                "apiVersion": string("APIVersion: devices.kubeedge.io/v1beta1."),
                "kind": string("Kind of the object."),
                "metadata": meta.clone(),
                "spec": spec,
                "status": status,
            },
            "x-kubernetes-group-version-kind": [
                {"group": resources::DEVICES_GROUP, "version": "v1beta1", "kind": kind}],
        })
    };
    let device_property = json!({"type": "object", "properties": {
        "name": string("The property, as its DeviceModel names it."),
        "desired": {"allOf": [twin_property.clone()], "description": "The value set in the cloud; reaches the mapper (MQTT delta, DMI UpdateDevice)."},
        "visitors": open("How the mapper reaches the property (protocol-specific)."),
        "reportCycle": {"type": "integer", "format": "int64", "description": "Milliseconds: the node sends the property's changes to the cloud at most once per cycle."},
        "collectCycle": {"type": "integer", "format": "int64", "description": "Milliseconds: how often the mapper reads the device."},
        "reportToCloud": {"type": "boolean", "description": "If any property sets it, only those that do go to the cloud."},
        "pushMethod": open("Where the mapper pushes values besides the node (http, mqtt, dbMethod, otel)."),
    }});
    let twins = json!({"type": "array", "description": "Per property: reported (from the device) and observedDesired (the desired value the node holds).",
        "items": {"type": "object", "properties": {
            "propertyName": string("The property."),
            "reported": twin_property.clone(),
            "observedDesired": twin_property.clone()}}});
    schemas.insert(
        "io.kubeedge.api.devices.v1beta1.Device".into(),
        kind(
            "Device",
            "A device bound to an edge node, served by a mapper of its protocol.",
            json!({"type": "object", "properties": {
                "nodeName": string("The edge node that serves the device."),
                "deviceModelRef": {"type": "object", "properties": {"name": string("The DeviceModel, in the device's namespace.")}},
                "protocol": {"type": "object", "properties": {
                    "protocolName": string("Which mapper serves the device (DMI MapperRegister's protocol)."),
                    "configData": open("Protocol configuration for the mapper.")}},
                "properties": {"type": "array", "items": device_property},
                "methods": {"type": "array", "items": open("A method: name, description, propertyNames.")},
            }}),
            json!({"type": "object", "description": "Reported state lives in the DeviceStatus of the same name (KubeEdge v1.23); copied here only with cloudcore --device-status-in-device.", "properties": {"twins": twins.clone()}}),
        ),
    );
    schemas.insert(
        "io.kubeedge.api.devices.v1beta1.DeviceModel".into(),
        kind(
            "DeviceModel",
            "The properties a kind of device has, with their types.",
            json!({"type": "object", "properties": {
                "protocol": string("The protocol of the devices of this model."),
                "properties": {"type": "array", "items": {"type": "object", "properties": {
                    "name": string("The property."),
                    "description": string("What it is."),
                    "type": string("INT, FLOAT, DOUBLE, STRING, BOOLEAN, BYTES or STREAM: reported values are checked against it."),
                    "accessMode": string("ReadOnly or ReadWrite."),
                    "minimum": string("The smallest value accepted (numbers)."),
                    "maximum": string("The largest value accepted (numbers)."),
                    "unit": string("The unit of the value.")}}},
            }}),
            json!({"type": "object"}),
        ),
    );
    schemas.insert(
        "io.kubeedge.api.devices.v1beta1.DeviceStatus".into(),
        kind(
            "DeviceStatus",
            "A device's reported state (one per Device, same namespace and name, owned by it): where twin reports from DMI and MQTT mappers land.",
            json!({"type": "object"}),
            json!({"type": "object", "properties": {
                "twins": twins,
                "state": string("ok, online, offline, disconnected, unhealthy or unknown, as the mapper reports it."),
                "lastOnlineTime": string("When the device was last reported online (RFC 3339)."),
                "extensions": open("Extension data (e.g. anomaly detection results)."),
            }}),
        ),
    );
    schemas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_described_with_their_kind_and_upstream_words() {
        let all = builtin_schemas();
        let core = &all["api/v1"];
        let pod = &core["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        assert!(pod["description"]
            .as_str()
            .unwrap()
            .contains("collection of containers"));
        // References resolve inside the document.
        assert!(core.contains_key("io.k8s.api.core.v1.PodSpec"));
        let devices = &all["apis/devices.kubeedge.io/v1beta1"];
        let status = &devices["io.kubeedge.api.devices.v1beta1.DeviceStatus"];
        assert_eq!(
            status["x-kubernetes-group-version-kind"][0]["kind"],
            "DeviceStatus"
        );
        assert!(devices.contains_key("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"));
        let apps = &all["apis/apps/v1"];
        assert_eq!(
            apps["io.k8s.api.apps.v1.StatefulSet"]["x-kubernetes-group-version-kind"][0]["kind"],
            "StatefulSet"
        );
    }
}
