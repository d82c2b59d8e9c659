//! Server-side apply (`PATCH` with `application/apply-patch+yaml`) and the `managedFields` it
//! keeps, after Kubernetes' structured-merge-diff, for the subset kubectl, Helm and Flux use.
//!
//! - An apply names its manager (`?fieldManager=`, required) and sends the fields it wants to
//!   own (its *configuration*). The object is created if absent; otherwise the configuration
//!   is merged into it: maps field by field, associative lists element by element (by their
//!   keys: `name` for containers, env, volumes...; `containerPort` for container ports; a
//!   CRD's `x-kubernetes-list-type: map` keys), anything else replaced whole.
//! - Fields the manager applied before and no longer applies are removed, unless another
//!   manager owns them too.
//! - A field the configuration sets to a value other than the live one, owned by another
//!   manager, is a conflict: 409 with one `FieldManagerConflict` cause per field, unless
//!   `?force=true`, which takes the field over.
//! - Other writes (update, patch) to an object that has `managedFields` are recorded as
//!   `Update` operations of their manager (`?fieldManager=`, else the client's User-Agent
//!   product, as kube-apiserver derives it): the fields they change move to that manager.
//! - An object without `managedFields` applied for the first time: its existing fields are
//!   owned by `before-first-apply` (kube-apiserver's name for that case).
//!
//! Not done (honest limits): objects written without apply get no `managedFields` (kube-apiserver
//! records an `Update` entry on every write; kedge keeps those bytes off the wire until an object
//! is first applied); `status` is not tracked; lists of scalars are atomic (no `set` type);
//! `apply-patch+cbor` is refused.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::object::{self, Object};
use super::resources::Resource;
use super::status::StatusReason;
use super::status::{ApiError, Cause};

/// The manager kube-apiserver assigns the fields of an object applied for the first time.
pub const BEFORE_FIRST_APPLY: &str = "before-first-apply";

/// A set of field paths, in the shape of `managedFields[].fieldsV1`: children keyed `f:name`
/// (a field) or `k:{"name":"main"}` (an element of an associative list); `member` is the
/// path itself being owned (`{}` for a leaf, `".": {}` beside children).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldSet {
    member: bool,
    children: BTreeMap<String, FieldSet>,
}

impl FieldSet {
    /// Reads `fieldsV1` (an empty object is the empty set).
    pub fn from_fields_v1(value: &Value) -> FieldSet {
        Self::read(value, true)
    }

    fn read(value: &Value, root: bool) -> FieldSet {
        let mut set = FieldSet::default();
        let Some(map) = value.as_object() else {
            return set;
        };
        // Below the root, `{}` is a path owned as a whole.
        set.member = map.is_empty() && !root;
        for (key, child) in map {
            if key == "." {
                set.member = true;
            } else {
                set.children
                    .insert(key.clone(), FieldSet::read(child, false));
            }
        }
        set
    }

    /// Writes `fieldsV1`.
    pub fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    /// Whether it holds no path.
    pub fn is_empty(&self) -> bool {
        !self.member && self.children.values().all(FieldSet::is_empty)
    }

    /// The paths of `self` not in `other`.
    pub fn difference(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            member: self.member && !other.member,
            children: BTreeMap::new(),
        };
        for (key, child) in &self.children {
            let rest = match other.children.get(key) {
                Some(o) => child.difference(o),
                None => child.clone(),
            };
            if !rest.is_empty() {
                out.children.insert(key.clone(), rest);
            }
        }
        out
    }

    /// The paths of either.
    pub fn union(&self, other: &FieldSet) -> FieldSet {
        let mut out = self.clone();
        out.member |= other.member;
        for (key, child) in &other.children {
            let merged = match out.children.get(key) {
                Some(mine) => mine.union(child),
                None => child.clone(),
            };
            out.children.insert(key.clone(), merged);
        }
        out
    }
}

/// Where list keys come from: built-in kinds by field name (Kubernetes' `patchMergeKey`s), a
/// custom resource from its schema.
#[derive(Clone, Copy)]
enum Keys<'a> {
    Builtin,
    Schema(Option<&'a Value>),
}

impl<'a> Keys<'a> {
    fn child(self, field: &str) -> Keys<'a> {
        match self {
            Keys::Builtin => Keys::Builtin,
            Keys::Schema(schema) => Keys::Schema(schema.and_then(|s| {
                s.get("properties")
                    .and_then(|p| p.get(field))
                    .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
            })),
        }
    }

    fn items(self) -> Keys<'a> {
        match self {
            Keys::Builtin => Keys::Builtin,
            Keys::Schema(schema) => Keys::Schema(schema.and_then(|s| s.get("items"))),
        }
    }

    /// The keys of the list in `field` (this is the list's parent's context), if associative.
    fn list_keys(self, field: &str, items: &[Value]) -> Option<Vec<String>> {
        let keys = match self {
            Keys::Builtin => {
                let elements: Vec<&Value> = items.iter().collect();
                vec![super::patch::merge_key(field, &elements)?.to_owned()]
            }
            Keys::Schema(schema) => {
                let list = schema?.get("properties")?.get(field)?;
                if list.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
                    return None;
                }
                list.get("x-kubernetes-list-map-keys")?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            }
        };
        let keyed = items
            .iter()
            .all(|e| e.is_object() && keys.iter().any(|k| e.get(k).is_some()));
        keyed.then_some(keys)
    }
}

fn element_key(element: &Value, keys: &[String]) -> String {
    let mut map = Map::new();
    for k in keys {
        if let Some(v) = element.get(k) {
            map.insert(k.clone(), v.clone());
        }
    }
    format!("k:{}", Value::Object(map))
}

/// The paths a value sets (each leaf, each associative list element).
fn collect(value: &Map<String, Value>, keys: Keys<'_>, out: &mut FieldSet) {
    for (field, child_value) in value {
        let mut child = FieldSet::default();
        match child_value {
            Value::Object(map) if !map.is_empty() => {
                collect(map, keys.child(field), &mut child);
            }
            Value::Array(items) if !items.is_empty() => match keys.list_keys(field, items) {
                Some(list_keys) => {
                    let item_keys = keys.child(field).items();
                    for item in items {
                        let mut element = FieldSet {
                            member: true,
                            children: BTreeMap::new(),
                        };
                        if let Some(map) = item.as_object() {
                            collect(map, item_keys, &mut element);
                        }
                        child
                            .children
                            .insert(element_key(item, &list_keys), element);
                    }
                }
                None => child.member = true,
            },
            _ => child.member = true,
        }
        if child.children.is_empty() {
            child.member = true;
        }
        out.children.insert(format!("f:{field}"), child);
    }
}

/// Metadata fields a manager can own (the rest are the server's).
const OWNED_METADATA: &[&str] = &["labels", "annotations", "finalizers", "ownerReferences"];

fn keys_for(resource: &Resource) -> Keys<'_> {
    match resource.custom {
        Some(custom) => Keys::Schema(Some(&custom.schema)),
        None => Keys::Builtin,
    }
}

/// The fields `object` sets that a manager can own: everything but `apiVersion`, `kind`, the
/// server's metadata, and `status` where it has its own subresource.
pub fn field_set(resource: &Resource, object: &Object) -> FieldSet {
    let mut view = Map::new();
    for (field, value) in object {
        match field.as_str() {
            "apiVersion" | "kind" => {}
            "status" if resource.status => {}
            "metadata" => {
                let owned: Map<String, Value> = value
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| OWNED_METADATA.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !owned.is_empty() {
                    view.insert(field.clone(), Value::Object(owned));
                }
            }
            _ => {
                view.insert(field.clone(), value.clone());
            }
        }
    }
    let mut set = FieldSet::default();
    collect(&view, keys_for(resource), &mut set);
    set
}

/// The key fields of an associative-list path element (`k:{"name":"main"}`).
fn key_fields(key: &str) -> Option<Map<String, Value>> {
    serde_json::from_str(key.strip_prefix("k:")?).ok()
}

/// Whether list element `e` has the key fields `wanted`.
fn has_key(e: &Value, wanted: &Map<String, Value>) -> bool {
    wanted
        .iter()
        .all(|(k, v)| e.get(k).is_some_and(|ev| ev == v))
}

/// The value at one path element under `value`.
fn child_value<'v>(value: &'v Value, key: &str) -> Option<&'v Value> {
    if let Some(field) = key.strip_prefix("f:") {
        return value.get(field);
    }
    let wanted = key_fields(key)?;
    value.as_array()?.iter().find(|e| has_key(e, &wanted))
}

fn display(path: &str, key: &str) -> String {
    match key.strip_prefix("f:") {
        Some(field) => format!("{path}.{field}"),
        None => {
            let fields = key_fields(key).unwrap_or_default();
            let parts: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{path}[{}]", parts.join(","))
        }
    }
}

/// Leaves in both `mine` and `theirs` where `applied` differs from `live`.
fn conflicts(
    mine: &FieldSet,
    theirs: &FieldSet,
    applied: Option<&Value>,
    live: Option<&Value>,
    path: &str,
    out: &mut Vec<String>,
) {
    if mine.member && theirs.member && mine.children.is_empty() && applied != live && live.is_some()
    {
        out.push(path.to_owned());
        return;
    }
    for (key, child) in &mine.children {
        let Some(other) = theirs.children.get(key) else {
            continue;
        };
        conflicts(
            child,
            other,
            applied.and_then(|a| child_value(a, key)),
            live.and_then(|l| child_value(l, key)),
            &display(path, key),
            out,
        );
    }
}

/// Removes every path of `removed` from `value`.
fn remove(value: &mut Value, removed: &FieldSet) {
    for (key, child) in &removed.children {
        if let Some(field) = key.strip_prefix("f:") {
            let Some(map) = value.as_object_mut() else {
                continue;
            };
            if child.member {
                map.remove(field);
            } else if let Some(inner) = map.get_mut(field) {
                remove(inner, child);
            }
        } else if let (Some(items), Some(wanted)) = (value.as_array_mut(), key_fields(key)) {
            if child.member {
                items.retain(|e| !has_key(e, &wanted));
            } else if let Some(e) = items.iter_mut().find(|e| has_key(e, &wanted)) {
                remove(e, child);
            }
        }
    }
}

/// Merges `applied` into `live`: maps by field, associative lists by key, the rest replaced.
fn merge(live: &mut Value, applied: &Value, keys: Keys<'_>) {
    let (Some(live_map), Some(applied_map)) = (live.as_object_mut(), applied.as_object()) else {
        *live = applied.clone();
        return;
    };
    for (field, value) in applied_map {
        let child_keys = keys.child(field);
        match (live_map.get_mut(field), value) {
            (Some(current @ Value::Object(_)), Value::Object(_)) => {
                merge(current, value, child_keys)
            }
            (Some(Value::Array(current)), Value::Array(items)) => {
                match keys.list_keys(field, items) {
                    Some(list_keys) => {
                        let item_keys = child_keys.items();
                        for item in items {
                            let key = element_key(item, &list_keys);
                            match current
                                .iter_mut()
                                .find(|e| element_key(e, &list_keys) == key)
                            {
                                Some(existing) => merge(existing, item, item_keys),
                                None => current.push(item.clone()),
                            }
                        }
                    }
                    None => *current = items.clone(),
                }
            }
            _ => {
                live_map.insert(field.clone(), value.clone());
            }
        }
    }
}

fn entries(object: &Object) -> Vec<Value> {
    object::meta(object)
        .and_then(|m| m.get("managedFields"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn entry(manager: &str, operation: &str, api_version: &str, set: &FieldSet) -> Value {
    json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": object::now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": set.to_fields_v1(),
    })
}

fn set_of(entry: &Value) -> FieldSet {
    FieldSet::from_fields_v1(entry.get("fieldsV1").unwrap_or(&Value::Null))
}

fn write_entries(object: &mut Object, list: Vec<Value>) {
    let list: Vec<Value> = list.into_iter().filter(|e| !set_of(e).is_empty()).collect();
    let metadata = object::meta_mut(object);
    if list.is_empty() {
        metadata.remove("managedFields");
    } else {
        metadata.insert("managedFields".into(), Value::Array(list));
    }
}

/// The object an apply by `manager` of `applied` makes of `live` (`None`: it is created),
/// with its `managedFields`.
///
/// # Errors
/// 409 `Conflict` with a `FieldManagerConflict` cause per field another manager owns with a
/// different value (unless `force`).
pub fn apply(
    resource: &Resource,
    live: Option<&Object>,
    applied: &Object,
    manager: &str,
    force: bool,
) -> Result<Object, ApiError> {
    let api_version = resource.api_version();
    let mine = field_set(resource, applied);
    let Some(live) = live else {
        let mut created = applied.clone();
        write_entries(
            &mut created,
            vec![entry(manager, "Apply", &api_version, &mine)],
        );
        return Ok(created);
    };
    let mut managed = entries(live);
    if managed.is_empty() {
        managed.push(entry(
            BEFORE_FIRST_APPLY,
            "Update",
            &api_version,
            &field_set(resource, live),
        ));
    }
    let is_mine = |e: &Value| e["manager"] == manager && e["operation"] == "Apply";
    let previous = managed
        .iter()
        .find(|e| is_mine(e))
        .map(set_of)
        .unwrap_or_default();
    let applied_value = Value::Object(applied.clone());
    let live_value = Value::Object(live.clone());
    let mut found: Vec<(String, String, String)> = Vec::new();
    for other in managed.iter().filter(|e| !is_mine(e)) {
        let mut paths = Vec::new();
        conflicts(
            &mine,
            &set_of(other),
            Some(&applied_value),
            Some(&live_value),
            "",
            &mut paths,
        );
        let name = other["manager"].as_str().unwrap_or_default().to_owned();
        let version = other["apiVersion"].as_str().unwrap_or_default().to_owned();
        found.extend(
            paths
                .into_iter()
                .map(|p| (name.clone(), version.clone(), p)),
        );
    }
    if !found.is_empty() && !force {
        return Err(conflict_error(&api_version, &found));
    }
    // Others keep what they own, less what this apply takes over (forced conflicts).
    let others_union = managed
        .iter()
        .filter(|e| !is_mine(e))
        .map(set_of)
        .fold(FieldSet::default(), |acc, s| acc.union(&s));
    let mut next: Vec<Value> = Vec::new();
    for e in &managed {
        if is_mine(e) {
            continue;
        }
        let mut e = e.clone();
        if force {
            let owned = set_of(&e);
            let kept = owned.difference(&leaves_in_conflict(&owned, &found, &e));
            e["fieldsV1"] = kept.to_fields_v1();
        }
        next.push(e);
    }
    let mut merged = live_value;
    merge(&mut merged, &applied_value, keys_for(resource));
    let removed = previous.difference(&mine).difference(&others_union);
    remove(&mut merged, &removed);
    let Value::Object(mut merged) = merged else {
        return Err(ApiError::internal("the applied object is not a map"));
    };
    next.push(entry(manager, "Apply", &api_version, &mine));
    write_entries(&mut merged, next);
    Ok(merged)
}

/// The paths of `owned` (what `owner` owns) that were reported as conflicts with `owner`: a
/// forced apply takes only those; fields shared with equal values stay shared.
fn leaves_in_conflict(
    owned: &FieldSet,
    found: &[(String, String, String)],
    owner: &Value,
) -> FieldSet {
    let name = owner["manager"].as_str().unwrap_or_default();
    let mut out = FieldSet::default();
    collect_conflicting(owned, "", found, name, &mut out);
    out
}

fn collect_conflicting(
    set: &FieldSet,
    path: &str,
    found: &[(String, String, String)],
    owner: &str,
    out: &mut FieldSet,
) {
    if set.member && found.iter().any(|(m, _, p)| m == owner && p == path) {
        out.member = true;
    }
    for (key, child) in &set.children {
        let mut sub = FieldSet::default();
        collect_conflicting(child, &display(path, key), found, owner, &mut sub);
        if !sub.is_empty() {
            out.children.insert(key.clone(), sub);
        }
    }
}

fn conflict_error(api_version: &str, found: &[(String, String, String)]) -> ApiError {
    let count = found.len();
    let plural = if count == 1 { "conflict" } else { "conflicts" };
    let lines: Vec<String> = found
        .iter()
        .map(|(manager, version, path)| {
            if version == api_version || version.is_empty() {
                format!("conflict with \"{manager}\": {path}")
            } else {
                format!("conflict with \"{manager}\" using {version}: {path}")
            }
        })
        .collect();
    let mut error = ApiError::new(
        409,
        StatusReason::Conflict,
        format!("Apply failed with {count} {plural}: {}", lines.join("\n")),
    );
    error.causes = found
        .iter()
        .map(|(manager, version, path)| Cause {
            reason: "FieldManagerConflict",
            field: path.clone(),
            message: format!("conflict with \"{manager}\" using {version}"),
        })
        .collect();
    error
}

/// Records a non-apply write by `manager` on an object that has `managedFields`: the fields it
/// changed move to `manager`'s `Update` entry, fields it removed leave every entry. An explicit
/// `managedFields: []` in the written object clears them (as kube-apiserver); an object that
/// has none gets none.
pub fn track_update(
    resource: &Resource,
    current: &Object,
    written: &mut Object,
    manager: &str,
    body_cleared: bool,
) {
    let managed = entries(current);
    if managed.is_empty() || body_cleared {
        object::meta_mut(written).remove("managedFields");
        return;
    }
    let before = field_set(resource, current);
    let after = field_set(resource, written);
    let mut changed = FieldSet::default();
    changed_leaves(
        &after,
        Some(&Value::Object(written.clone())),
        Some(&Value::Object(current.clone())),
        &mut changed,
    );
    let gone = before.difference(&after);
    let mut next = Vec::new();
    let mut mine = FieldSet::default();
    for e in managed {
        let set = set_of(&e).difference(&changed).difference(&gone);
        if e["manager"] == manager && e["operation"] == "Update" {
            mine = set;
            continue;
        }
        let mut e = e;
        e["fieldsV1"] = set.to_fields_v1();
        next.push(e);
    }
    let mine = mine.union(&changed);
    if !mine.is_empty() {
        next.push(entry(manager, "Update", &resource.api_version(), &mine));
    }
    write_entries(written, next);
}

fn changed_leaves(set: &FieldSet, new: Option<&Value>, old: Option<&Value>, out: &mut FieldSet) {
    if set.member && set.children.is_empty() {
        out.member = new != old;
        return;
    }
    if set.member && old.is_none() {
        // A new list element: it and all under it.
        *out = set.clone();
        return;
    }
    for (key, child) in &set.children {
        let mut sub = FieldSet::default();
        changed_leaves(
            child,
            new.and_then(|n| child_value(n, key)),
            old.and_then(|o| child_value(o, key)),
            &mut sub,
        );
        if !sub.is_empty() {
            out.children.insert(key.clone(), sub);
        }
    }
}

/// The manager of a non-apply write: `?fieldManager=`, else the User-Agent's product (the part
/// before the first `/`), as kube-apiserver derives it.
pub fn manager_of(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    if let Some(m) = field_manager.filter(|m| !m.is_empty()) {
        return m.to_owned();
    }
    user_agent
        .and_then(|ua| ua.split('/').next())
        .filter(|p| !p.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments() -> &'static Resource {
        super::super::resources::find("apps", "v1", "deployments").unwrap()
    }

    fn obj(v: Value) -> Object {
        let Value::Object(m) = v else { panic!() };
        m
    }

    fn config(replicas: Option<i64>, image: &str) -> Object {
        let mut spec = json!({"template": {"spec": {"containers": [
            {"name": "main", "image": image}]}}});
        if let Some(r) = replicas {
            spec["replicas"] = json!(r);
        }
        obj(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "web", "labels": {"app": "web"}}, "spec": spec}))
    }

    #[test]
    fn apply_creates_then_conflicts_then_forces() {
        let r = deployments();
        let created = apply(r, None, &config(Some(2), "a"), "kubectl", false).unwrap();
        let fields = &created["metadata"]["managedFields"][0];
        assert_eq!(fields["manager"], "kubectl");
        assert_eq!(
            fields["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
                ["k:{\"name\":\"main\"}"]["f:image"],
            json!({})
        );
        // The same configuration again: no conflict, nothing changes but the entry's time.
        let again = apply(r, Some(&created), &config(Some(2), "a"), "kubectl", false).unwrap();
        assert_eq!(again["spec"], created["spec"]);
        // Another manager setting replicas differently: a conflict naming the field.
        let e = apply(r, Some(&again), &config(Some(3), "a"), "other", false).unwrap_err();
        assert_eq!(e.code, 409);
        assert!(
            e.message
                .contains("conflict with \"kubectl\": .spec.replicas"),
            "{}",
            e.message
        );
        assert_eq!(
            e.causes.len(),
            1,
            "image is shared with an equal value: {e:?}"
        );
        // Forced: other owns replicas now, kubectl keeps the image (shared, equal).
        let forced = apply(r, Some(&again), &config(Some(3), "a"), "other", true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let kubectl = forced["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["manager"] == "kubectl")
            .unwrap();
        assert!(kubectl["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        assert!(kubectl["fieldsV1"]["f:spec"]["f:template"].is_object());
    }

    #[test]
    fn fields_dropped_from_a_configuration_are_removed_unless_shared() {
        let r = deployments();
        let mut first = config(Some(2), "a");
        first["metadata"]["labels"]["tier"] = json!("front");
        let created = apply(r, None, &first, "kubectl", false).unwrap();
        // The configuration no longer sets the tier label nor replicas: both go.
        let next = apply(r, Some(&created), &config(None, "a"), "kubectl", false).unwrap();
        assert!(next["metadata"]["labels"].get("tier").is_none());
        assert!(next["spec"].get("replicas").is_none());
        assert_eq!(next["metadata"]["labels"]["app"], "web");
    }

    #[test]
    fn updates_move_ownership_and_first_applies_meet_before_first_apply() {
        let r = deployments();
        let created = apply(r, None, &config(Some(2), "a"), "kubectl", false).unwrap();
        let mut edited = created.clone();
        edited["spec"]["replicas"] = json!(5);
        track_update(r, &created, &mut edited, "kubectl-edit", false);
        let e = apply(r, Some(&edited), &config(Some(2), "a"), "kubectl", false).unwrap_err();
        assert!(
            e.message
                .contains("conflict with \"kubectl-edit\": .spec.replicas"),
            "{}",
            e.message
        );
        // Never applied: its fields belong to before-first-apply.
        let mut plain = config(Some(1), "a");
        plain["spec"]["paused"] = json!(false);
        let e = apply(r, Some(&plain), &config(Some(4), "a"), "kubectl", false).unwrap_err();
        assert!(e.message.contains(BEFORE_FIRST_APPLY), "{}", e.message);
        assert_eq!(
            manager_of(None, Some("kubectl/v1.32.0 (linux/amd64)")),
            "kubectl"
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let v = json!({"f:metadata": {"f:labels": {".": {}, "f:app": {}}},
                       "f:spec": {"f:replicas": {}}});
        assert_eq!(FieldSet::from_fields_v1(&v).to_fields_v1(), v);
        assert!(FieldSet::from_fields_v1(&json!({})).is_empty());
    }
}
