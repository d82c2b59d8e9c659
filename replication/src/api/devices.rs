//! Validation of KubeEdge's device kinds (`devices.kubeedge.io/v1beta1` Device, DeviceModel,
//! DeviceStatus): the field types KubeEdge's CRD schemas declare for the fields nodes and
//! mappers read, in kube-apiserver's wording for schema errors (`… in body must be of type
//! string: "boolean"`). Free-form parts (`configData`, push methods) are not checked.

use serde_json::Value;

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `value` at `field` must be of JSON type `expected` (absent and null pass).
fn expect(
    value: Option<&Value>,
    field: &str,
    expected: &str,
    cause: &mut impl FnMut(&str, String),
) {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return;
    };
    let actual = type_name(value);
    let ok = actual == expected || (expected == "integer" && value.is_i64());
    if !ok {
        cause(
            field,
            format!("Invalid value: \"{actual}\": {field} in body must be of type {expected}: \"{actual}\""),
        );
    }
}

/// Each item of the array at `field` (an array of objects) given to `each` with its path.
fn items<'a>(
    value: Option<&'a Value>,
    field: &str,
    cause: &mut impl FnMut(&str, String),
    mut each: impl FnMut(&str, &'a Value, &mut dyn FnMut(&str, String)),
) {
    expect(value, field, "array", cause);
    for (i, item) in value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{field}[{i}]");
        expect(Some(item), &at, "object", cause);
        if item.is_object() {
            each(&at, item, &mut |f: &str, m: String| cause(f, m));
        }
    }
}

/// A property's `name`: a non-empty string.
fn named(at: &str, item: &Value, key: &str, cause: &mut dyn FnMut(&str, String)) {
    let field = format!("{at}.{key}");
    match item.get(key) {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) | None => cause(&field, "Required value".into()),
        Some(other) => {
            let actual = type_name(other);
            cause(
                &field,
                format!("Invalid value: \"{actual}\": {field} in body must be of type string: \"{actual}\""),
            );
        }
    }
}

/// The model property types KubeEdge's mappers know.
const MODEL_TYPES: &[&str] = &[
    "int", "float", "double", "string", "boolean", "bytes", "stream",
];

/// Checks a Device, DeviceModel or DeviceStatus (`store_kind`), reporting through `cause`.
pub fn validate(
    store_kind: &str,
    object: &serde_json::Map<String, Value>,
    cause: &mut impl FnMut(&str, String),
) {
    let spec = object.get("spec");
    match store_kind {
        "devices" => {
            expect(spec, "spec", "object", cause);
            let field = |name: &str| spec.and_then(|s| s.get(name));
            expect(field("nodeName"), "spec.nodeName", "string", cause);
            expect(
                field("deviceModelRef"),
                "spec.deviceModelRef",
                "object",
                cause,
            );
            expect(
                field("deviceModelRef").and_then(|r| r.get("name")),
                "spec.deviceModelRef.name",
                "string",
                cause,
            );
            expect(field("protocol"), "spec.protocol", "object", cause);
            expect(
                field("protocol").and_then(|p| p.get("protocolName")),
                "spec.protocol.protocolName",
                "string",
                cause,
            );
            items(
                field("properties"),
                "spec.properties",
                cause,
                |at, item, cause| {
                    named(at, item, "name", cause);
                    let mut each = |f: &str, m: String| cause(f, m);
                    expect(
                        item.get("desired"),
                        &format!("{at}.desired"),
                        "object",
                        &mut each,
                    );
                    expect(
                        item.get("desired").and_then(|d| d.get("value")),
                        &format!("{at}.desired.value"),
                        "string",
                        &mut each,
                    );
                    expect(
                        item.get("reportCycle"),
                        &format!("{at}.reportCycle"),
                        "integer",
                        &mut each,
                    );
                    expect(
                        item.get("collectCycle"),
                        &format!("{at}.collectCycle"),
                        "integer",
                        &mut each,
                    );
                    expect(
                        item.get("reportToCloud"),
                        &format!("{at}.reportToCloud"),
                        "boolean",
                        &mut each,
                    );
                },
            );
        }
        "devicemodels" => {
            expect(spec, "spec", "object", cause);
            let properties = spec.and_then(|s| s.get("properties"));
            items(properties, "spec.properties", cause, |at, item, cause| {
                named(at, item, "name", cause);
                let field = format!("{at}.type");
                match item.get("type") {
                    None => {}
                    Some(Value::String(t)) if MODEL_TYPES.contains(&t.to_ascii_lowercase().as_str()) => {}
                    Some(other) => cause(
                        &field,
                        format!(
                            "Unsupported value: {other}: supported values: \"INT\", \"FLOAT\", \"DOUBLE\", \"STRING\", \"BOOLEAN\", \"BYTES\", \"STREAM\""
                        ),
                    ),
                }
            });
        }
        "devicestatuses" => {
            let twins = object.get("status").and_then(|s| s.get("twins"));
            items(twins, "status.twins", cause, |at, item, cause| {
                named(at, item, "propertyName", cause);
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn causes(kind: &str, object: Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        validate(
            kind,
            object.as_object().unwrap(),
            &mut |f: &str, m: String| out.push((f.to_owned(), m)),
        );
        out
    }

    #[test]
    fn device_kinds_are_checked_field_by_field() {
        let good = json!({"spec": {"nodeName": "edge-1", "deviceModelRef": {"name": "m"},
            "protocol": {"protocolName": "modbus", "configData": {"data": {"port": 502}}},
            "properties": [{"name": "t", "desired": {"value": "1"}, "reportCycle": 1000, "reportToCloud": true}]}});
        assert!(causes("devices", good).is_empty());
        let bad = causes(
            "devices",
            json!({"spec": {"nodeName": 12, "properties": "x"}}),
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!(bad[0].0, "spec.nodeName");
        assert!(bad[0].1.contains("must be of type string: \"number\""));
        assert_eq!(bad[1].0, "spec.properties");
        // YAML 1.1 reads `on` as a boolean: caught, not sent to a mapper as "true".
        let yaml_slip = causes("devices", json!({"spec": {"properties": [{"name": true}]}}));
        assert_eq!(yaml_slip[0].0, "spec.properties[0].name");
        let model = causes(
            "devicemodels",
            json!({"spec": {"properties": [{"name": "t", "type": "INT"}, {"name": "u", "type": "kelvin"}, {"type": "INT"}]}}),
        );
        assert_eq!(model.len(), 2, "{model:?}");
        assert!(model[0].1.starts_with("Unsupported value"));
        assert_eq!(
            model[1],
            ("spec.properties[2].name".into(), "Required value".into())
        );
    }
}
