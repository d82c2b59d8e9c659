//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): the strategy of the CRD objects
//! themselves (validation, the status kube-apiserver's apiextensions controllers would write)
//! and their compilation into served [`Resource`]s.
//!
//! What is served, as apiextensions-apiserver serves it:
//! - every `served` version at `/apis/{group}/{version}/...`, one store key space per CRD (the
//!   CRD's name), conversion `None`: an object read at another version only has its
//!   `apiVersion` rewritten;
//! - the `status` and `scale` subresources, `additionalPrinterColumns` in Tables;
//! - the structural schema: unknown fields pruned, `default`s applied, then validated
//!   ([`super::schema`]).
//!
//! Not served: conversion webhooks (`Webhook` strategy is refused), CEL rules
//! (`x-kubernetes-validations` are accepted and not evaluated), `selectableFields`.

use serde_json::{json, Map, Value};

use super::object::{self, Object};
use super::resources::{self, Resource};
use super::status::{ApiError, Cause};

/// What a CustomResourceDefinition says of one served version of a custom resource.
#[derive(Debug)]
pub struct Custom {
    /// The CRD's name (`{plural}.{group}`), which is also the store kind.
    pub crd_name: String,
    /// The version objects are stored at (`spec.versions[].storage`).
    pub storage_version: String,
    /// This version's `schema.openAPIV3Schema`.
    pub schema: Value,
    /// This version's `additionalPrinterColumns` (with kube-apiserver's default `Age` column
    /// when there are none).
    pub columns: Vec<PrinterColumn>,
    /// The `scale` subresource's paths, when it has one.
    pub scale: Option<ScalePaths>,
}

/// One `additionalPrinterColumns` entry.
#[derive(Debug, Clone)]
pub struct PrinterColumn {
    /// The header (`Replicas`).
    pub name: String,
    /// The OpenAPI type: `integer`, `number`, `string`, `boolean` or `date`.
    pub kind: String,
    /// The OpenAPI format (`int32`, ...), possibly empty.
    pub format: String,
    /// Shown in `kubectl get -o wide` only when above 0.
    pub priority: i64,
    /// The column's description.
    pub description: String,
    /// A Kubernetes JSONPath into the object, without braces (`.spec.replicas`).
    pub json_path: String,
}

/// The `scale` subresource's JSON paths (`.spec.replicas`).
#[derive(Debug, Clone)]
pub struct ScalePaths {
    /// Where the desired replicas live (`specReplicasPath`).
    pub spec_replicas: String,
    /// Where the observed replicas live (`statusReplicasPath`).
    pub status_replicas: String,
    /// Where a label selector string lives (`labelSelectorPath`), when there is one.
    pub label_selector: Option<String>,
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}

fn leak_list(value: Option<&Value>) -> &'static [&'static str] {
    let list: Vec<&'static str> = value
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(leak).collect())
        .unwrap_or_default();
    Box::leak(list.into_boxed_slice())
}

/// Kubernetes' version priority: GA before beta before alpha, higher numbers first, then any
/// other version name alphabetically (apimachinery's `CompareKubeAwareVersionStrings`).
pub fn version_priority(version: &str) -> (u8, i64, i64, String) {
    let parse = || -> Option<(u8, i64, i64)> {
        let rest = version.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: i64 = digits.parse().ok()?;
        let rest = &rest[digits.len()..];
        if rest.is_empty() {
            return Some((0, -major, 0));
        }
        let (stage, minor) = if let Some(m) = rest.strip_prefix("beta") {
            (1, m)
        } else if let Some(m) = rest.strip_prefix("alpha") {
            (2, m)
        } else {
            return None;
        };
        let minor: i64 = if minor.is_empty() {
            0
        } else {
            minor.parse().ok()?
        };
        Some((stage, -major, -minor))
    };
    match parse() {
        Some((stage, major, minor)) => (stage, major, minor, String::new()),
        None => (3, 0, 0, version.to_owned()),
    }
}

/// The served resources of one stored CRD, one per served version in version-priority order,
/// each with a fingerprint of what it was compiled from (equal fingerprints, equal resources).
/// A definition that does not validate serves nothing.
pub fn compile(crd: &Value) -> Vec<(String, Resource)> {
    let Value::Object(map) = crd else {
        return Vec::new();
    };
    if validate_spec(map).is_err() {
        return Vec::new();
    }
    let spec = &crd["spec"];
    let crd_name = object::name(map);
    let names = &spec["names"];
    let storage_version = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == true)
        .map(|v| text(v, "/name"))
        .unwrap_or_default();
    let mut versions: Vec<&Value> = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] == true)
        .collect();
    versions.sort_by_key(|v| version_priority(text(v, "/name")));
    let kind = text(names, "/kind");
    let mut out = Vec::new();
    for version in versions {
        let fingerprint = serde_json::to_string(&json!([
            crd_name,
            spec["group"],
            spec["scope"],
            names,
            storage_version,
            version
        ]))
        .unwrap_or_default();
        let subresources = &version["subresources"];
        let scale = subresources.get("scale").map(|s| ScalePaths {
            spec_replicas: text(s, "/specReplicasPath").to_owned(),
            status_replicas: text(s, "/statusReplicasPath").to_owned(),
            label_selector: s
                .get("labelSelectorPath")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
        let mut columns: Vec<PrinterColumn> = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| PrinterColumn {
                name: text(c, "/name").to_owned(),
                kind: text(c, "/type").to_owned(),
                format: text(c, "/format").to_owned(),
                priority: c["priority"].as_i64().unwrap_or(0),
                description: text(c, "/description").to_owned(),
                json_path: text(c, "/jsonPath").to_owned(),
            })
            .collect();
        if columns.is_empty() {
            columns.push(PrinterColumn {
                name: "Age".into(),
                kind: "date".into(),
                format: String::new(),
                priority: 0,
                description: "CreationTimestamp is a timestamp representing the server time \
                              when this object was created."
                    .into(),
                json_path: ".metadata.creationTimestamp".into(),
            });
        }
        let custom = Custom {
            crd_name: crd_name.to_owned(),
            storage_version: storage_version.to_owned(),
            schema: version
                .pointer("/schema/openAPIV3Schema")
                .cloned()
                .unwrap_or(Value::Null),
            columns,
            scale,
        };
        let list_kind = match text(names, "/listKind") {
            "" => format!("{kind}List"),
            list => list.to_owned(),
        };
        let singular = match text(names, "/singular") {
            "" => kind.to_lowercase(),
            s => s.to_owned(),
        };
        let resource = Resource {
            group: leak(text(spec, "/group")),
            version: leak(text(version, "/name")),
            kind: leak(kind),
            list_kind: leak(&list_kind),
            plural: leak(text(names, "/plural")),
            singular: leak(&singular),
            namespaced: spec["scope"] == "Namespaced",
            short_names: leak_list(names.get("shortNames")),
            status: subresources.get("status").is_some(),
            categories: leak_list(names.get("categories")),
            builtin: false,
            scale: subresources.get("scale").is_some(),
            store_kind: leak(crd_name),
            custom: Some(Box::leak(Box::new(custom))),
        };
        out.push((fingerprint, resource));
    }
    out
}

fn is_dns_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// Checks a CRD's spec as apiextensions' validation does, for the subset served here.
fn validate_spec(crd: &Object) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    let mut cause = |field: &str, message: String| causes.push(Cause::new(field, message));
    let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
    let group = text(&spec, "/group");
    let plural = text(&spec, "/names/plural");
    if group.is_empty() {
        cause("spec.group", "Required value".into());
    } else if !group.contains('.') || group.split('.').any(|part| !is_dns_label(part)) {
        cause(
            "spec.group",
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        );
    } else if resources::is_builtin_group(group) || group == "metrics.k8s.io" {
        cause(
            "spec.group",
            format!("Invalid value: {group:?}: is served by a built-in API"),
        );
    }
    if !is_dns_label(plural) {
        cause(
            "spec.names.plural",
            format!("Invalid value: {plural:?}: a lowercase RFC 1123 label is required"),
        );
    }
    let singular = text(&spec, "/names/singular");
    if !singular.is_empty() && !is_dns_label(singular) {
        cause(
            "spec.names.singular",
            format!("Invalid value: {singular:?}: a lowercase RFC 1123 label is required"),
        );
    }
    let kind = text(&spec, "/names/kind");
    if kind.is_empty() {
        cause("spec.names.kind", "Required value".into());
    } else if !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
        cause(
            "spec.names.kind",
            format!("Invalid value: {kind:?}: must be an alphanumeric CamelCase name"),
        );
    }
    let name = object::name(crd);
    if !group.is_empty() && name != format!("{plural}.{group}") {
        cause(
            "metadata.name",
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        );
    }
    match text(&spec, "/scope") {
        "Namespaced" | "Cluster" => {}
        "" => cause("spec.scope", "Required value".into()),
        other => cause(
            "spec.scope",
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
        ),
    }
    match text(&spec, "/conversion/strategy") {
        "" | "None" => {}
        other => cause(
            "spec.conversion.strategy",
            format!("Unsupported value: {other:?}: supported values: \"None\" (kedge serves no conversion webhooks)"),
        ),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        cause(
            "spec.versions",
            "Required value: must have at least one version".into(),
        );
    }
    let storage = versions.iter().filter(|v| v["storage"] == true).count();
    if !versions.is_empty() && storage != 1 {
        cause(
            "spec.versions",
            format!(
                "Invalid value: {storage}: must have exactly one version marked as storage version"
            ),
        );
    }
    let mut seen = Vec::new();
    for (i, version) in versions.iter().enumerate() {
        let v = text(version, "/name");
        if !is_dns_label(v) {
            cause(
                &format!("spec.versions[{i}].name"),
                format!("Invalid value: {v:?}: a DNS-1035 label is required"),
            );
        } else if seen.contains(&v) {
            cause(
                &format!("spec.versions[{i}].name"),
                format!("Duplicate value: {v:?}"),
            );
        }
        seen.push(v);
        match version.pointer("/schema/openAPIV3Schema") {
            None => cause(
                &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                "Required value: schemas are required".into(),
            ),
            Some(schema) => {
                if schema["type"] != "object" {
                    cause(
                        &format!("spec.versions[{i}].schema.openAPIV3Schema.type"),
                        "Unsupported value: must be object at the root".into(),
                    );
                }
                for problem in super::schema::check_structural(schema) {
                    cause(
                        &format!("spec.versions[{i}].schema.openAPIV3Schema{}", problem.0),
                        problem.1,
                    );
                }
            }
        }
        if let Some(scale) = version.pointer("/subresources/scale") {
            for field in ["specReplicasPath", "statusReplicasPath"] {
                let path = text(scale, &format!("/{field}"));
                if !path.starts_with('.') || path.len() < 2 {
                    cause(
                        &format!("spec.versions[{i}].subresources.scale.{field}"),
                        format!(
                            "Invalid value: {path:?}: should be a JSON path under .spec or .status"
                        ),
                    );
                }
            }
        }
        for (j, column) in version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("spec.versions[{i}].additionalPrinterColumns[{j}]");
            if text(column, "/name").is_empty() {
                cause(&format!("{field}.name"), "Required value".into());
            }
            match text(column, "/type") {
                "integer" | "number" | "string" | "boolean" | "date" => {}
                other => cause(
                    &format!("{field}.type"),
                    format!("Unsupported value: {other:?}: supported values: \"boolean\", \"date\", \"integer\", \"number\", \"string\""),
                ),
            }
            if !text(column, "/jsonPath").starts_with('.') {
                cause(
                    &format!("{field}.jsonPath"),
                    "Invalid value: must be a simple json path starting with .".into(),
                );
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

/// Validates a CustomResourceDefinition being created or updated (`current`: the stored one).
///
/// # Errors
/// 422 `Invalid` with one cause per problem (see [`validate_spec`]); changing `spec.scope` is
/// refused as kube-apiserver refuses it once objects may exist.
pub fn validate(object: &Object, current: Option<&Object>) -> Result<(), ApiError> {
    let mut causes = validate_spec(object).err().unwrap_or_default();
    if let Some(current) = current {
        let scope = |o: &Object| o.get("spec").map(|s| s["scope"].clone());
        if scope(current) != scope(object) {
            causes.push(Cause::new(
                "spec.scope",
                "Invalid value: field is immutable",
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "CustomResourceDefinition",
            object::name(object),
            causes,
        ))
    }
}

/// Writes the status apiextensions' controllers keep on a CRD: `acceptedNames`, the
/// `NamesAccepted` and `Established` conditions (kept with their first transition time) and
/// `storedVersions` (every storage version ever used, which kube-apiserver never forgets).
pub fn set_status(object: &mut Object, current: Option<&Object>) {
    let spec = object.get("spec").cloned().unwrap_or(Value::Null);
    let names = spec.get("names").cloned().unwrap_or_else(|| json!({}));
    let mut accepted: Map<String, Value> = names.as_object().cloned().unwrap_or_default();
    let kind = text(&names, "/kind").to_owned();
    accepted
        .entry("listKind")
        .or_insert_with(|| json!(format!("{kind}List")));
    accepted
        .entry("singular")
        .or_insert_with(|| json!(kind.to_lowercase()));
    let previous = current.and_then(|c| c.get("status")).cloned();
    let since = |kind: &str| {
        previous
            .as_ref()
            .and_then(|s| s["conditions"].as_array().cloned())
            .and_then(|c| c.into_iter().find(|c| c["type"] == kind))
            .and_then(|c| c.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(object::now_rfc3339()))
    };
    let mut stored: Vec<Value> = previous
        .as_ref()
        .and_then(|s| s["storedVersions"].as_array().cloned())
        .unwrap_or_default();
    if let Some(storage) = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == true)
    {
        if !stored.contains(&storage["name"]) {
            stored.push(storage["name"].clone());
        }
    }
    object.insert(
        "status".into(),
        json!({
            "acceptedNames": accepted,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": since("NamesAccepted")},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted",
                 "lastTransitionTime": since("Established")},
            ],
            "storedVersions": stored,
        }),
    );
}

/// Defaults of a CRD's spec the API fills in: `conversion.strategy: None`, `names.singular`
/// and `names.listKind`.
pub fn apply_defaults(object: &mut Object) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("conversion")
        .or_insert_with(|| json!({"strategy": "None"}));
    if let Some(names) = spec.get_mut("names").and_then(Value::as_object_mut) {
        let kind = names
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        names
            .entry("singular")
            .or_insert_with(|| json!(kind.to_lowercase()));
        names
            .entry("listKind")
            .or_insert_with(|| json!(format!("{kind}List")));
    }
}

/// The kind as kube-apiserver names a custom resource in messages (`Widget.example.com`); the
/// plain kind for built-in resources.
pub fn qualified_kind(resource: &Resource) -> String {
    if resource.custom.is_some() {
        format!("{}.{}", resource.kind, resource.group)
    } else {
        resource.kind.to_owned()
    }
}

/// Evaluates a Kubernetes JSONPath as printer columns and the scale subresource use them
/// (`.spec.replicas`, `.status.conditions[?(@.type=="Ready")].status`): the first match.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    use jsonpath_rust::JsonPath;
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let query = format!("${path}");
    object.query(&query).ok()?.into_iter().next()
}

/// The Table cell kube-apiserver makes of a printer column's value: dates as an age, numbers
/// and booleans as themselves, anything else as its JSON text; `None` when absent.
pub fn cell(column: &PrinterColumn, object: &Value) -> Value {
    let Some(value) = json_path(object, &column.json_path) else {
        return Value::Null;
    };
    match (column.kind.as_str(), value) {
        ("date", Value::String(s)) => match object::parse_rfc3339(s) {
            Some(t) => json!(super::table::human_age(
                time::OffsetDateTime::now_utc().unix_timestamp() - t
            )),
            None => json!("<invalid>"),
        },
        ("integer", Value::Number(n)) => json!(n.as_i64()),
        ("number", Value::Number(n)) => json!(n.as_f64()),
        ("boolean", Value::Bool(b)) => json!(b),
        ("string", Value::String(s)) => json!(s),
        (_, Value::String(s)) => json!(s),
        (_, other) => json!(other.to_string()),
    }
}

/// Reads the desired replicas at `paths.spec_replicas` (a missing value is 0, as
/// apiextensions' scale subresource reads it).
pub fn scale_replicas(object: &Value, paths: &ScalePaths) -> (i64, i64, String) {
    let spec = json_path(object, &paths.spec_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let status = json_path(object, &paths.status_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let selector = paths
        .label_selector
        .as_deref()
        .and_then(|p| json_path(object, p))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    (spec, status, selector)
}

/// Sets the value at a simple dotted path (`.spec.replicas`), creating objects on the way.
pub fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut at = object;
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !at.is_object() {
            *at = json!({});
        }
        let map = at.as_object_mut().expect("an object");
        if i + 1 == parts.len() {
            map.insert((*part).to_owned(), value);
            return;
        }
        at = map.entry(*part).or_insert_with(|| json!({}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn widget_crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                    {"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                         "spec": {"type": "object", "properties": {
                             "replicas": {"type": "integer"}}}}}},
                     "subresources": {"status": {}, "scale": {
                         "specReplicasPath": ".spec.replicas",
                         "statusReplicasPath": ".status.replicas"}},
                     "additionalPrinterColumns": [
                         {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}]},
                ],
            },
        })
    }

    #[test]
    fn compiles_served_versions_in_priority_order() {
        let compiled = compile(&widget_crd());
        let versions: Vec<&str> = compiled.iter().map(|(_, r)| r.version).collect();
        assert_eq!(versions, ["v1", "v1beta1"]);
        let v1 = &compiled[0].1;
        assert_eq!(v1.store_kind, "widgets.example.com");
        assert_eq!((v1.status, v1.scale, v1.namespaced), (true, true, true));
        assert_eq!(v1.list_kind, "WidgetList");
        assert_eq!(v1.short_names, ["wd"]);
        let custom = v1.custom.unwrap();
        assert_eq!(custom.storage_version, "v1");
        assert_eq!(custom.columns[0].name, "Replicas");
        // No columns: kube-apiserver's default Age column.
        assert_eq!(compiled[1].1.custom.unwrap().columns[0].name, "Age");
        assert_ne!(compiled[0].0, compiled[1].0);
    }

    #[test]
    fn refuses_bad_definitions() {
        let mut crd = widget_crd();
        crd["metadata"]["name"] = json!("gadgets.example.com");
        crd["spec"]["versions"][0]["storage"] = json!(true);
        crd["spec"]["group"] = json!("apps");
        let Value::Object(map) = crd else { panic!() };
        let e = validate(&map, None).unwrap_err();
        let fields: Vec<&str> = e.causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"metadata.name"), "{fields:?}");
        assert!(fields.contains(&"spec.versions"), "{fields:?}");
        assert!(fields.contains(&"spec.group"), "{fields:?}");
        assert!(compile(&Value::Object(map)).is_empty());
    }

    #[test]
    fn version_priority_is_kube_aware() {
        let mut v = vec!["v1alpha1", "foo", "v2", "v1beta2", "v1", "v1beta1", "v10"];
        v.sort_by_key(|v| version_priority(v));
        assert_eq!(
            v,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }

    #[test]
    fn json_paths_and_cells() {
        let object = json!({"status": {"conditions": [
            {"type": "Synced", "status": "False"}, {"type": "Ready", "status": "True"}]},
            "spec": {"replicas": 3}});
        assert_eq!(
            json_path(&object, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(&json!("True"))
        );
        let column = PrinterColumn {
            name: "R".into(),
            kind: "integer".into(),
            format: String::new(),
            priority: 0,
            description: String::new(),
            json_path: ".spec.replicas".into(),
        };
        assert_eq!(cell(&column, &object), json!(3));
        let mut o = json!({});
        set_path(&mut o, ".spec.replicas", json!(5));
        assert_eq!(o, json!({"spec": {"replicas": 5}}));
    }

    #[test]
    fn status_records_stored_versions() {
        let Value::Object(mut crd) = widget_crd() else {
            panic!()
        };
        set_status(&mut crd, None);
        assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));
        assert_eq!(crd["status"]["conditions"][1]["type"], "Established");
        let current = crd.clone();
        crd["spec"]["versions"][0]["storage"] = json!(true);
        crd["spec"]["versions"][1]["storage"] = json!(false);
        set_status(&mut crd, Some(&current));
        assert_eq!(crd["status"]["storedVersions"], json!(["v1", "v1beta1"]));
    }
}
