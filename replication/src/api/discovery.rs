//! Discovery (`/version`, `/api`, `/apis`, resource lists) and the OpenAPI v3 documents kubectl
//! reads before `apply`.
//!
//! The OpenAPI documents are deliberately small: for each resource, the paths with their
//! operations, the `x-kubernetes-group-version-kind` extension and the `fieldValidation` query
//! parameter. That is what kubectl checks to decide that the server validates fields itself (so it
//! does no client-side schema validation). Built-in kinds carry no schemas: kubectl then builds
//! strategic-merge patches for them from its compiled-in types. Custom resources carry their
//! CRD version's schema (`kubectl explain`), and kubectl sends them JSON merge patches.

use serde_json::{json, Value};

use super::resources::{Registry, Resource};

/// The Kubernetes version the API reports at `/version` (the API it mimics).
pub const KUBERNETES_VERSION: &str = "v1.32.0";

/// `/version`: a `version.Info` for [`KUBERNETES_VERSION`], `gitVersion` suffixed with
/// `+kedge-{crate version}`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": format!("{KUBERNETES_VERSION}+kedge-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

/// `/api`: the `APIVersions` of the core group (`v1`).
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_json(registry: &Registry, group: &str) -> Value {
    let versions: Vec<Value> = registry
        .group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`: the `APIGroupList` of the named groups served (core excluded, as the apiserver),
/// the Metrics API last.
pub fn groups(registry: &Registry) -> Value {
    let mut names: Vec<&str> = Vec::new();
    for (g, _) in registry.group_versions() {
        if !g.is_empty() && !names.contains(&g) {
            names.push(g);
        }
    }
    let mut groups: Vec<Value> = names.into_iter().map(|g| group_json(registry, g)).collect();
    groups.push(metrics_group());
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The Metrics API (`metrics.k8s.io/v1beta1`, `kubectl top`): served from the nodes' usage, not
/// from the store (cloudcore and MetaServer route its paths themselves), so it is listed here
/// and not among [`resources::all`].
pub const METRICS_GROUP: &str = "metrics.k8s.io";
const METRICS_VERSION: &str = "v1beta1";

fn metrics_group() -> Value {
    let version = json!({
        "groupVersion": format!("{METRICS_GROUP}/{METRICS_VERSION}"),
        "version": METRICS_VERSION,
    });
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": METRICS_GROUP,
        "versions": [version],
        "preferredVersion": version,
    })
}

fn metrics_resources() -> Value {
    let resource = |name: &str, kind: &str, namespaced: bool| {
        json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
               "verbs": ["get", "list"]})
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{METRICS_GROUP}/{METRICS_VERSION}"),
        "resources": [resource("nodes", "NodeMetrics", false), resource("pods", "PodMetrics", true)],
    })
}

/// `/apis/{group}`: its `APIGroup`; `None` for a group not served.
pub fn group(registry: &Registry, group: &str) -> Option<Value> {
    if group == METRICS_GROUP {
        return Some(metrics_group());
    }
    registry
        .all()
        .iter()
        .any(|r| r.group == group && !group.is_empty())
        .then(|| group_json(registry, group))
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `/api/v1` or `/apis/{group}/{version}`: the `APIResourceList` of that group-version
/// (subresources included); `None` when it is not served.
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    if (group, version) == (METRICS_GROUP, METRICS_VERSION) {
        return Some(metrics_resources());
    }
    let served: Vec<&Resource> = registry
        .all()
        .into_iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut list = Vec::new();
    for r in &served {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        list.push(entry);
        if r.status {
            list.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if r.scale {
            list.push(json!({
                "name": format!("{}/scale", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let group_version = served[0].api_version();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": list,
    }))
}

/// The media type of OpenAPI v2 in protobuf (gnostic's `openapi_v2.Document`), what client-go
/// asks `/openapi/v2` for.
pub const OPENAPI_V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

/// `/openapi/v2`: a Swagger 2.0 document without definitions, in protobuf when asked (client-go
/// asks nothing else) or JSON. kubectl validates a `kind: List` file against v2 on the client
/// (the server cannot validate a List); with no definition for an item's kind it skips that
/// item, as it does for any kind the server does not describe, and leaves validation to the
/// server, which validates every item it creates. Without a v2 document, `kubectl create -f`
/// of a List fails outright.
pub fn openapi_v2(headers: &axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let protobuf = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("protobuf"));
    if !protobuf {
        let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes",
                         "version": KUBERNETES_VERSION}, "paths": {}});
        return (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            doc.to_string(),
        )
            .into_response();
    }
    // gnostic's OpenAPIv2.proto: Document { swagger = 1; info = 2; paths = 8 },
    // Info { title = 1; version = 2 }.
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        let mut len = bytes.len();
        while len >= 0x80 {
            out.push((len as u8) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 0x0a, b"Kubernetes");
    field(&mut info, 0x12, KUBERNETES_VERSION.as_bytes());
    let mut doc = Vec::new();
    field(&mut doc, 0x0a, b"2.0");
    field(&mut doc, 0x12, &info);
    field(&mut doc, 0x42, &[]);
    (
        [(axum::http::header::CONTENT_TYPE, OPENAPI_V2_PROTOBUF)],
        doc,
    )
        .into_response()
}

/// Schemas of the built-in kinds, by group-version path (`api/v1`, `apis/apps/v1`): OpenAPI v3
/// components (`io.k8s.api.core.v1.Pod` ...), the kinds' own carrying
/// `x-kubernetes-group-version-kind`. Set once by the process that has them (cloudcore builds
/// them from k8s-openapi); without them the documents describe custom resources only.
static BUILTIN_SCHEMAS: std::sync::OnceLock<
    std::collections::HashMap<String, serde_json::Map<String, Value>>,
> = std::sync::OnceLock::new();

/// Publishes the built-in kinds' schemas in the OpenAPI v3 documents (`kubectl explain pod`);
/// the first call wins.
pub fn set_builtin_schemas(
    schemas: std::collections::HashMap<String, serde_json::Map<String, Value>>,
) {
    let _ = BUILTIN_SCHEMAS.set(schemas);
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_index(registry: &Registry) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in registry.group_versions() {
        let path = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        let url = format!("/openapi/v3/{path}?hash={}", openapi_hash(registry, g, v));
        paths.insert(path, json!({"serverRelativeURL": url}));
    }
    json!({"paths": paths})
}

/// The document's version for clients' caches: the crate version, and for a custom group the
/// fingerprint of what its CRDs serve (a changed schema is a new URL).
fn openapi_hash(registry: &Registry, group: &str, version: &str) -> String {
    let mut hash = format!("kedge{}", env!("CARGO_PKG_VERSION").replace('.', ""));
    if BUILTIN_SCHEMAS.get().is_some() {
        hash.push('s');
    }
    let custom: Vec<&Resource> = registry
        .custom()
        .iter()
        .copied()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if !custom.is_empty() {
        let schemas: Vec<&Value> = custom
            .iter()
            .filter_map(|r| r.custom.map(|c| &c.schema))
            .collect();
        let text = serde_json::to_string(&schemas).unwrap_or_default();
        hash.push_str(&format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(text.as_bytes())
        ));
    }
    hash
}

/// `/openapi/v3/{api/v1 | apis/group/version}`.
pub fn openapi_document(registry: &Registry, path: &str) -> Option<Value> {
    let (group, version) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let served: Vec<&Resource> = registry
        .all()
        .into_iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = BUILTIN_SCHEMAS
        .get()
        .and_then(|all| all.get(path))
        .cloned()
        .unwrap_or_default();
    for r in served {
        if let Some(custom) = r.custom {
            // Named as apiextensions names them: the reversed group, version, kind.
            let reversed: Vec<&str> = r.group.split('.').rev().collect();
            schemas.insert(
                format!("{}.{}.{}", reversed.join("."), r.version, r.kind),
                super::schema::openapi_component(&custom.schema, r.group, r.version, r.kind),
            );
        }
        let operations = Operations::new(r, component_of(&schemas, r.group, r.version, r.kind));
        let base = r.group_version_path();
        let (collection, item) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (
                format!("{base}/{}", r.plural),
                format!("{base}/{}/{{name}}", r.plural),
            )
        };
        paths.insert(collection, operations.collection());
        paths.insert(item.clone(), operations.item(""));
        if r.status {
            paths.insert(format!("{item}/status"), operations.item("Status"));
        }
        if r.scale {
            // The ids name the owner (`readAppsV1NamespacedDeploymentScale`), the body is a Scale.
            let scale = Operations {
                gvk: json!({"group": "autoscaling", "version": "v1", "kind": "Scale"}),
                component: component_of(&schemas, "autoscaling", "v1", "Scale"),
                ..operations
            };
            paths.insert(format!("{item}/scale"), scale.item("Scale"));
        }
    }
    unique_operation_ids(&mut paths);
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The `#/components/schemas/` name of the kind's schema (the component whose
/// `x-kubernetes-group-version-kind` names it), if the document has one.
fn component_of(
    schemas: &serde_json::Map<String, Value>,
    group: &str,
    version: &str,
    kind: &str,
) -> Option<String> {
    let gvk = json!({"group": group, "version": version, "kind": kind});
    schemas
        .iter()
        .find(|(_, schema)| {
            schema["x-kubernetes-group-version-kind"]
                .as_array()
                .is_some_and(|all| all.contains(&gvk))
        })
        .map(|(name, _)| name.clone())
}

/// A parameter as kube-apiserver's OpenAPI v3 documents declare one.
fn parameter(name: &str, location: &str, ty: &str, description: &str) -> Value {
    let mut p = json!({
        "name": name,
        "in": location,
        "description": description,
        "schema": {"type": ty, "uniqueItems": true},
    });
    if location == "path" {
        p["required"] = json!(true);
    }
    p
}

/// Makes every operationId of a document unique: a subresource's id can be another kind's
/// (`Device` + `Status` and the kind `DeviceStatus` in `devices.kubeedge.io/v1beta1`); the
/// subresource's operations then end in `Subresource` (`read…NamespacedDeviceStatusSubresource`).
/// Kinds keep kube-apiserver's ids.
fn unique_operation_ids(paths: &mut serde_json::Map<String, Value>) {
    let mut kinds = std::collections::HashSet::new();
    for (url, item) in paths.iter() {
        if url.ends_with("/status") || url.ends_with("/scale") {
            continue;
        }
        for op in item.as_object().into_iter().flat_map(|o| o.values()) {
            if let Some(id) = op.get("operationId").and_then(Value::as_str) {
                kinds.insert(id.to_owned());
            }
        }
    }
    for (url, item) in paths.iter_mut() {
        if !(url.ends_with("/status") || url.ends_with("/scale")) {
            continue;
        }
        for op in item
            .as_object_mut()
            .into_iter()
            .flat_map(|o| o.values_mut())
        {
            let Some(id) = op.get("operationId").and_then(Value::as_str) else {
                continue;
            };
            if kinds.contains(id) {
                op["operationId"] = json!(format!("{id}Subresource"));
            }
        }
    }
}

/// The operations of one served kind, in the shape of kube-apiserver's OpenAPI v3 documents:
/// operation ids `{verb}{GroupVersion}{Namespaced}{Kind}{Subresource}` (`listCoreV1NamespacedPod`),
/// path parameters at path level, query parameters per verb, request bodies (a PATCH declares
/// JSON patch, merge patch and apply, not the strategic-merge type: kubectl would build its
/// strategic-merge patches from these schemas, which carry no patch merge keys).
#[derive(Clone)]
struct Operations {
    /// `CoreV1`, `AppsV1`, `DevicesKubeedgeIoV1beta1`.
    group_version: String,
    namespaced: bool,
    kind: &'static str,
    gvk: Value,
    /// The kind's component, when the document has it.
    component: Option<String>,
}

impl Operations {
    fn new(r: &Resource, component: Option<String>) -> Self {
        let group = if r.group.is_empty() {
            "core"
        } else {
            r.group.strip_suffix(".k8s.io").unwrap_or(r.group)
        };
        let mut group_version = String::new();
        for word in group.split(['.', '-']).chain([r.version]) {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                group_version.extend(first.to_uppercase());
                group_version.push_str(chars.as_str());
            }
        }
        Operations {
            group_version,
            namespaced: r.namespaced,
            kind: r.kind,
            gvk: json!({"group": r.group, "version": r.version, "kind": r.kind}),
            component,
        }
    }

    fn schema(&self) -> Value {
        match &self.component {
            Some(name) => json!({"$ref": format!("#/components/schemas/{name}")}),
            None => json!({"type": "object"}),
        }
    }

    fn operation(&self, verb: &str, action: &str, subresource: &str, query: Vec<Value>) -> Value {
        let scope = if self.namespaced { "Namespaced" } else { "" };
        let answer = json!({"application/json": {"schema": self.schema()}});
        let mut responses = json!({
            "200": {"description": "OK", "content": answer},
            "401": {"description": "Unauthorized"},
        });
        if matches!(action, "post" | "put") {
            responses["201"] = json!({"description": "Created", "content": answer});
        }
        if action == "list" {
            responses["200"] = json!({"description": "OK",
                "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        let mut op = json!({
            "operationId": format!("{verb}{}{scope}{}{subresource}", self.group_version, self.kind),
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": self.gvk,
            "parameters": query,
            "responses": responses,
        });
        match action {
            "post" | "put" => {
                op["requestBody"] = json!({"required": true,
                    "content": {"application/json": {"schema": self.schema()}}});
            }
            "patch" => {
                let object = json!({"schema": {"type": "object"}});
                op["requestBody"] = json!({"required": true, "content": {
                    "application/json-patch+json": {"schema": {"type": "array",
                        "items": {"type": "object"}}},
                    "application/merge-patch+json": object,
                    "application/apply-patch+yaml": object,
                }});
            }
            _ => {}
        }
        op
    }

    fn write_query(patch: bool) -> Vec<Value> {
        let mut query = vec![
            parameter(
                "dryRun",
                "query",
                "string",
                "All: process the request without persisting it",
            ),
            parameter(
                "fieldManager",
                "query",
                "string",
                "the name of the actor making the change (managedFields)",
            ),
            parameter(
                "fieldValidation",
                "query",
                "string",
                "Ignore, Warn (default) or Strict: applied to custom resources (fields \
                 their schema does not declare); built-in kinds accept unknown fields",
            ),
        ];
        if patch {
            query.push(parameter(
                "force",
                "query",
                "boolean",
                "server-side apply: take over fields other managers own",
            ));
        }
        query
    }

    fn path_parameters(&self, item: bool) -> Vec<Value> {
        let mut params = Vec::new();
        if item {
            params.push(parameter(
                "name",
                "path",
                "string",
                &format!("name of the {}", self.kind),
            ));
        }
        if self.namespaced {
            params.push(parameter(
                "namespace",
                "path",
                "string",
                "object name and auth scope, such as for teams and projects",
            ));
        }
        params
    }

    /// The collection's path item: list (and watch) and create.
    fn collection(&self) -> Value {
        let list_query = [
            ("labelSelector", "string", "only objects whose labels match"),
            ("fieldSelector", "string", "only objects whose fields match"),
            ("limit", "integer", "at most this many objects per page"),
            ("continue", "string", "the token of the next page"),
            ("resourceVersion", "string", "list at or after this version"),
            ("resourceVersionMatch", "string", "NotOlderThan or Exact"),
            ("watch", "boolean", "watch for changes instead of listing"),
            ("allowWatchBookmarks", "boolean", "send BOOKMARK events"),
            (
                "sendInitialEvents",
                "boolean",
                "a watch starts with the current objects",
            ),
            (
                "timeoutSeconds",
                "integer",
                "end the list or watch after this long",
            ),
        ]
        .map(|(name, ty, what)| parameter(name, "query", ty, what))
        .to_vec();
        json!({
            "parameters": self.path_parameters(false),
            "get": self.operation("list", "list", "", list_query),
            "post": self.operation("create", "post", "", Self::write_query(false)),
        })
    }

    /// An object's path item (`subresource` "" for the object, `Status` or `Scale`).
    fn item(&self, subresource: &str) -> Value {
        let mut item = json!({
            "parameters": self.path_parameters(true),
            "get": self.operation("read", "get", subresource, Vec::new()),
            "put": self.operation("replace", "put", subresource, Self::write_query(false)),
            "patch": self.operation("patch", "patch", subresource, Self::write_query(true)),
        });
        if subresource.is_empty() {
            let delete_query = vec![
                parameter(
                    "gracePeriodSeconds",
                    "query",
                    "integer",
                    "seconds before the object is deleted",
                ),
                parameter(
                    "propagationPolicy",
                    "query",
                    "string",
                    "Orphan, Background or Foreground: what happens to dependents",
                ),
                parameter(
                    "dryRun",
                    "query",
                    "string",
                    "All: process the request without persisting it",
                ),
            ];
            item["delete"] = self.operation("delete", "delete", "", delete_query);
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_version_has_documents() {
        let registry = Registry::builtin();
        for (g, v) in registry.group_versions() {
            assert!(resource_list(&registry, g, v).is_some());
            let path = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            assert!(openapi_index(&registry)["paths"][&path].is_object());
            let doc = openapi_document(&registry, &path).unwrap();
            assert!(!doc["paths"].as_object().unwrap().is_empty());
        }
        assert!(resource_list(&registry, "nope", "v1").is_none());
        assert!(group(&registry, "devices.kubeedge.io").is_some());
    }

    #[test]
    fn operations_declare_their_path_parameters_and_have_unique_ids() {
        let registry = Registry::builtin();
        let mut ids = std::collections::BTreeSet::new();
        for (g, v) in registry.group_versions() {
            let path = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            let doc = openapi_document(&registry, &path).unwrap();
            for (url, item) in doc["paths"].as_object().unwrap() {
                let declared: Vec<&str> = item["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["name"].as_str().unwrap())
                    .collect();
                for name in ["namespace", "name"] {
                    assert_eq!(
                        url.contains(&format!("{{{name}}}")),
                        declared.contains(&name),
                        "{url}: {declared:?}"
                    );
                }
                for (method, op) in item.as_object().unwrap() {
                    if method == "parameters" {
                        continue;
                    }
                    let id = op["operationId"].as_str().unwrap().to_owned();
                    assert!(ids.insert(id.clone()), "{id} twice");
                    if method == "patch" {
                        // No strategic-merge type: kubectl would build such patches from
                        // these schemas, which have no patch merge keys.
                        let types = op["requestBody"]["content"].as_object().unwrap();
                        assert!(!types.contains_key("application/strategic-merge-patch+json"));
                    }
                }
            }
        }
        assert!(ids.contains("listCoreV1NamespacedPod"), "{ids:?}");
        assert!(ids.contains("readAppsV1NamespacedDeploymentScale"));
        assert!(ids.contains("replaceCoreV1NodeStatus"));
        assert!(ids.contains("createCoordinationV1NamespacedLease"));
    }
}
