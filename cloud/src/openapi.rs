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
    out
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
        let apps = &all["apis/apps/v1"];
        assert_eq!(
            apps["io.k8s.api.apps.v1.StatefulSet"]["x-kubernetes-group-version-kind"][0]["kind"],
            "StatefulSet"
        );
    }
}
