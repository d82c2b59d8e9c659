//! Structural schemas (a CRD version's `openAPIV3Schema`) applied to custom resources as
//! apiextensions-apiserver applies them on every write: unknown fields are pruned, `default`s
//! filled in, then the object is validated.
//!
//! Validated: `type` (with `nullable`, `x-kubernetes-int-or-string`,
//! `x-kubernetes-preserve-unknown-fields`), `required`, `enum`, `minimum`/`maximum` (and their
//! `exclusive` forms), `multipleOf`, `minLength`/`maxLength`, `pattern`, `minItems`/`maxItems`,
//! `uniqueItems`, `minProperties`/`maxProperties`, `properties`/`additionalProperties`/`items`.
//! Not evaluated: `format`, `allOf`/`anyOf`/`oneOf`/`not`, CEL `x-kubernetes-validations`.
//! Messages follow kube-openapi's validate package (`spec.replicas in body must be of type
//! integer: "string"`).

use serde_json::{json, Map, Value};

use super::object::Object;
use super::status::Cause;

fn is_true(schema: &Value, field: &str) -> bool {
    schema.get(field).and_then(Value::as_bool) == Some(true)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Problems that make a schema non-structural, as `(path suffix, message)`: a node with neither
/// `type` nor one of the extensions standing for it, and `properties` beside a schema
/// `additionalProperties`.
pub fn check_structural(schema: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk_structural(schema, "", true, &mut out);
    out
}

fn walk_structural(schema: &Value, path: &str, root: bool, out: &mut Vec<(String, String)>) {
    let Some(map) = schema.as_object() else {
        out.push((
            path.to_owned(),
            "Invalid value: must be a schema object".into(),
        ));
        return;
    };
    let typed = map.get("type").and_then(Value::as_str).is_some();
    let exempt = is_true(schema, "x-kubernetes-int-or-string")
        || is_true(schema, "x-kubernetes-preserve-unknown-fields");
    if !typed && !exempt && !root {
        out.push((
            format!("{path}.type"),
            "Required value: must not be empty for specified object fields".into(),
        ));
    }
    if map.contains_key("properties")
        && map
            .get("additionalProperties")
            .is_some_and(Value::is_object)
    {
        out.push((
            format!("{path}.additionalProperties"),
            "Forbidden: additionalProperties and properties are mutual exclusive".into(),
        ));
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            walk_structural(child, &format!("{path}.properties[{name}]"), false, out);
        }
    }
    if let Some(items) = map.get("items") {
        walk_structural(items, &format!("{path}.items"), false, out);
    }
    if let Some(extra) = map.get("additionalProperties").filter(|v| v.is_object()) {
        walk_structural(extra, &format!("{path}.additionalProperties"), false, out);
    }
}

/// Prunes, defaults and validates a custom resource against its version's schema.
///
/// # Errors
/// One [`Cause`] per violation, with the field path (`spec.replicas`) and kube-openapi's wording.
pub fn admit(schema: &Value, object: &mut Object) -> Result<(), Vec<Cause>> {
    let mut root = Value::Object(std::mem::take(object));
    prune(schema, &mut root, true);
    apply_defaults(schema, &mut root);
    let mut causes = Vec::new();
    if let Value::Object(map) = &root {
        // apiVersion, kind and metadata are the API's, not the schema's.
        let props = schema.get("properties").and_then(Value::as_object);
        for (field, value) in map {
            if matches!(field.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(child) = props.and_then(|p| p.get(field)) {
                validate(child, value, field, &mut causes);
            }
        }
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for field in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(field) {
                    causes.push(Cause::new(field, "Required value"));
                }
            }
        }
    }
    if let Value::Object(map) = root {
        *object = map;
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(causes)
    }
}

/// Removes the fields the schema does not specify (apiextensions' pruning), except under
/// `x-kubernetes-preserve-unknown-fields: true`; at the root, and in an
/// `x-kubernetes-embedded-resource`, `apiVersion`, `kind` and `metadata` stay.
pub fn prune(schema: &Value, value: &mut Value, root: bool) {
    let keep_meta = root || is_true(schema, "x-kubernetes-embedded-resource");
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|v| v.is_object());
            let preserve = is_true(schema, "x-kubernetes-preserve-unknown-fields")
                || schema.get("additionalProperties") == Some(&Value::Bool(true));
            map.retain(|field, _| {
                preserve
                    || extra.is_some()
                    || props.is_some_and(|p| p.contains_key(field))
                    || (keep_meta && matches!(field.as_str(), "apiVersion" | "kind" | "metadata"))
            });
            for (field, child_value) in map.iter_mut() {
                if keep_meta && matches!(field.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(child) = props.and_then(|p| p.get(field)).or(extra) {
                    prune(child, child_value, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

/// The paths (`spec.extra`, `spec.items[0].x`) of the fields [`prune`] would remove: what
/// `fieldValidation=Strict` refuses and `Warn` warns about.
pub fn unknown_fields(schema: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_unknown(schema, value, "", true, &mut out);
    out
}

fn walk_unknown(schema: &Value, value: &Value, path: &str, root: bool, out: &mut Vec<String>) {
    let keep_meta = root || is_true(schema, "x-kubernetes-embedded-resource");
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|v| v.is_object());
            let preserve = is_true(schema, "x-kubernetes-preserve-unknown-fields")
                || schema.get("additionalProperties") == Some(&Value::Bool(true));
            for (field, child_value) in map {
                if keep_meta && matches!(field.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match props.and_then(|p| p.get(field)).or(extra) {
                    Some(child) => walk_unknown(child, child_value, &join(path, field), false, out),
                    None if !preserve => out.push(join(path, field)),
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk_unknown(item_schema, item, &format!("{path}[{i}]"), false, out);
                }
            }
        }
        _ => {}
    }
}

/// Fills in each absent property that has a `default`, depth first.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (field, child) in props {
                    if let Some(default) = child.get("default") {
                        if !map.contains_key(field) {
                            map.insert(field.clone(), default.clone());
                        }
                    }
                    if let Some(child_value) = map.get_mut(field) {
                        apply_defaults(child, child_value);
                    }
                }
            }
            if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                for child_value in map.values_mut() {
                    apply_defaults(extra, child_value);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn type_matches(expected: &str, value: &Value) -> bool {
    match expected {
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => type_name(value) == other,
    }
}

/// Validates `value` at `path` against `schema`, pushing one cause per violation.
pub fn validate(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let mut invalid = |message: String| {
        causes.push(Cause::new(
            path,
            format!("Invalid value: {}: {message}", shown(value)),
        ))
    };
    if value.is_null() {
        if !is_true(schema, "nullable") && schema.get("type").is_some() {
            let expected = schema["type"].as_str().unwrap_or_default();
            invalid(format!(
                "{path} in body must be of type {expected}: \"null\""
            ));
        }
        return;
    }
    if is_true(schema, "x-kubernetes-int-or-string") {
        if !(type_matches("integer", value) || value.is_string()) {
            invalid(format!(
                "{path} in body must be of type integer,string: \"{}\"",
                type_name(value)
            ));
            return;
        }
    } else if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        if !type_matches(expected, value) {
            invalid(format!(
                "{path} in body must be of type {expected}: \"{}\"",
                type_name(value)
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(shown).collect();
            causes.push(Cause::new(
                path,
                format!(
                    "Unsupported value: {}: supported values: {}",
                    shown(value),
                    list.join(", ")
                ),
            ));
            return;
        }
    }
    let mut invalid = |message: String| {
        causes.push(Cause::new(
            path,
            format!("Invalid value: {}: {message}", shown(value)),
        ))
    };
    if let Some(n) = value.as_f64() {
        let exclusive = |f: &str| is_true(schema, f);
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if exclusive("exclusiveMinimum") && n <= min {
                invalid(format!("{path} in body should be greater than {min}"));
            } else if n < min {
                invalid(format!(
                    "{path} in body should be greater than or equal to {min}"
                ));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if exclusive("exclusiveMaximum") && n >= max {
                invalid(format!("{path} in body should be less than {max}"));
            } else if n > max {
                invalid(format!(
                    "{path} in body should be less than or equal to {max}"
                ));
            }
        }
        if let Some(m) = schema.get("multipleOf").and_then(Value::as_f64) {
            if m > 0.0 && (n / m).fract() != 0.0 {
                invalid(format!("{path} in body should be a multiple of {m}"));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            if chars < min {
                invalid(format!(
                    "{path} in body should be at least {min} chars long"
                ));
            }
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            if chars > max {
                causes.push(Cause::new(
                    path,
                    format!("Too long: may not be more than {max} bytes"),
                ));
            }
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match regex::Regex::new(pattern) {
                Ok(re) if re.is_match(s) => {}
                Ok(_) => causes.push(Cause::new(
                    path,
                    format!(
                        "Invalid value: {}: {path} in body should match '{pattern}'",
                        shown(value)
                    ),
                )),
                Err(_) => causes.push(Cause::new(
                    path,
                    format!("Invalid value: the schema's pattern {pattern:?} is not supported"),
                )),
            }
        }
    }
    match value {
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if n < min {
                    causes.push(Cause::new(
                        path,
                        format!(
                            "Invalid value: {n}: {path} in body should have at least {min} items"
                        ),
                    ));
                }
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if n > max {
                    causes.push(Cause::new(
                        path,
                        format!("Too many: {n}: must have at most {max} items"),
                    ));
                }
            }
            if is_true(schema, "uniqueItems") {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        causes.push(Cause::new(
                            format!("{path}[{i}]"),
                            format!("Duplicate value: {}", shown(item)),
                        ));
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(map) => validate_object(schema, map, path, causes),
        _ => {}
    }
}

fn validate_object(schema: &Value, map: &Map<String, Value>, path: &str, causes: &mut Vec<Cause>) {
    let n = map.len() as u64;
    if let Some(min) = schema.get("minProperties").and_then(Value::as_u64) {
        if n < min {
            causes.push(Cause::new(
                path,
                format!("Invalid value: {n}: {path} in body should have at least {min} properties"),
            ));
        }
    }
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64) {
        if n > max {
            causes.push(Cause::new(
                path,
                format!("Too many: {n}: must have at most {max} items"),
            ));
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(field) {
                causes.push(Cause::new(join(path, field), "Required value"));
            }
        }
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let extra = schema.get("additionalProperties").filter(|v| v.is_object());
    for (field, child_value) in map {
        if let Some(child) = props.and_then(|p| p.get(field)).or(extra) {
            validate(child, child_value, &join(path, field), causes);
        }
    }
}

/// The schema of a CRD version as an OpenAPI v3 component: the CRD's schema with
/// `x-kubernetes-group-version-kind` and the standard `apiVersion`/`kind`/`metadata`
/// properties, as apiextensions publishes it (what `kubectl explain` reads).
pub fn openapi_component(schema: &Value, group: &str, version: &str, kind: &str) -> Value {
    let mut out = schema.clone();
    if !out.is_object() {
        out = json!({"type": "object"});
    }
    let props = out
        .as_object_mut()
        .expect("an object")
        .entry("properties")
        .or_insert_with(|| json!({}));
    if let Some(props) = props.as_object_mut() {
        props.entry("apiVersion").or_insert_with(|| {
            json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."})
        });
        props.entry("kind").or_insert_with(|| {
            json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."})
        });
        props.insert(
            "metadata".into(),
            json!({"type": "object", "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"}),
        );
    }
    out["x-kubernetes-group-version-kind"] =
        json!([{"group": group, "version": version, "kind": kind}]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["size"], "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": true},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            }},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        }})
    }

    fn object(value: Value) -> Object {
        let Value::Object(map) = value else { panic!() };
        map
    }

    #[test]
    fn prunes_defaults_and_accepts() {
        let mut o = object(json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 3, "unknown": 1, "free": {"anything": {"x": 1}}, "port": "http",
                     "labels": {"a": "b"}},
            "extra": true,
        }));
        admit(&schema(), &mut o).unwrap();
        assert_eq!(o.get("extra"), None);
        assert_eq!(o["spec"].get("unknown"), None);
        assert_eq!(o["spec"]["color"], "red");
        assert_eq!(o["spec"]["free"]["anything"]["x"], 1);
        assert_eq!(o["metadata"]["name"], "w");
    }

    #[test]
    fn reports_each_violation_with_its_path() {
        let mut o = object(json!({"spec": {"size": "big", "color": "green",
            "name": "ABCDEFG", "tags": ["a", "b", 3], "labels": {"a": 1}, "port": true}}));
        let causes = admit(&schema(), &mut o).unwrap_err();
        let text: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let all = text.join("\n");
        assert!(all.contains("spec.size: Invalid value: \"big\": spec.size in body must be of type integer: \"string\""), "{all}");
        assert!(
            all.contains(
                "spec.color: Unsupported value: \"green\": supported values: \"red\", \"blue\""
            ),
            "{all}"
        );
        assert!(all.contains("spec.name: Too long"), "{all}");
        assert!(
            all.contains("spec.name in body should match '^[a-z]+$'"),
            "{all}"
        );
        assert!(all.contains("spec.tags: Too many: 3"), "{all}");
        assert!(all.contains("spec.tags[2]: Invalid value: 3"), "{all}");
        assert!(all.contains("spec.labels.a: Invalid value: 1"), "{all}");
        assert!(all.contains("spec.port: Invalid value: true"), "{all}");
        let mut o = object(json!({"spec": {"size": 0}}));
        let causes = admit(&schema(), &mut o).unwrap_err();
        assert!(causes[0].message.contains("greater than or equal to 1"));
        let mut o = object(json!({"spec": {}}));
        let causes = admit(&schema(), &mut o).unwrap_err();
        assert_eq!(
            (causes[0].field.as_str(), causes[0].message.as_str()),
            ("spec.size", "Required value")
        );
    }

    #[test]
    fn unknown_fields_are_what_pruning_removes() {
        let o = json!({"apiVersion": "v", "kind": "K", "metadata": {"x": 1}, "extra": 1,
            "spec": {"size": 1, "bogus": 2, "free": {"kept": 3}, "labels": {"a": "b"},
                     "tags": ["x"]}});
        assert_eq!(unknown_fields(&schema(), &o), ["extra", "spec.bogus"]);
    }

    #[test]
    fn structural_checks() {
        assert!(check_structural(&schema()).is_empty());
        let bad = json!({"type": "object", "properties": {"spec": {"properties": {}}}});
        let problems = check_structural(&bad);
        assert_eq!(problems[0].0, ".properties[spec].type");
    }
}
