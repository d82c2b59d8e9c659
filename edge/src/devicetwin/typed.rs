//! Device property values typed by their DeviceModel (`devices.kubeedge.io/v1beta1`
//! `DeviceModel.spec.properties[]`: `type`, `minimum`, `maximum`), checked when a mapper reports
//! them over MQTT or DMI. Values travel as strings, as in KubeEdge's twins; a value that does not
//! parse as its property's type, or lies outside its bounds, is refused with a reason for the
//! mapper.

use serde_json::Value;

/// A property as its model declares it. `kind` is the type in lower case (`int`, `float`,
/// `double`, `boolean`, `string`, `bytes`, `stream`, …); types kedge does not know are not
/// checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PropertyType {
    pub kind: String,
    /// Inclusive bounds of a numeric property, if the model sets them.
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
}

impl PropertyType {
    /// A property the model does not type (one only the Device lists): a string.
    pub fn string() -> Self {
        PropertyType {
            kind: "string".into(),
            ..PropertyType::default()
        }
    }

    /// Reads a model's property (`type`, and `minimum`/`maximum` as strings, as KubeEdge's
    /// CRD has them, or as numbers).
    pub fn from_model(property: &Value) -> Self {
        let bound = |name: &str| match property.get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().parse().ok(),
            Some(Value::Number(n)) => n.as_f64(),
            _ => None,
        };
        PropertyType {
            kind: property
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("string")
                .to_ascii_lowercase(),
            minimum: bound("minimum"),
            maximum: bound("maximum"),
        }
    }

    /// Checks a reported value.
    ///
    /// # Errors
    /// Why the value is not one of this type (for the mapper: the type, the value, the bound).
    pub fn check(&self, value: &str) -> Result<(), String> {
        let number = match self.kind.as_str() {
            "int" | "integer" | "int32" | "int64" => match value.parse::<i64>() {
                Ok(n) => n as f64,
                Err(e)
                    if *e.kind() == std::num::IntErrorKind::PosOverflow
                        || *e.kind() == std::num::IntErrorKind::NegOverflow =>
                {
                    return Err(format!("{value} is out of range for a 64-bit int"))
                }
                Err(_) => return Err(format!("{value:?} is not an int")),
            },
            "float" | "double" => {
                let n = value
                    .parse::<f64>()
                    .map_err(|_| format!("{value:?} is not a {}", self.kind))?;
                if !n.is_finite() {
                    return Err(format!("{value:?} is not a finite {}", self.kind));
                }
                n
            }
            "boolean" | "bool" => {
                return match value {
                    "true" | "false" => Ok(()),
                    _ => Err(format!("{value:?} is not a boolean (true or false)")),
                }
            }
            _ => return Ok(()),
        };
        if let Some(min) = self.minimum.filter(|m| number < *m) {
            return Err(format!("{value} is below the minimum {min}"));
        }
        if let Some(max) = self.maximum.filter(|m| number > *m) {
            return Err(format!("{value} is above the maximum {max}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked_against_their_model_type_and_bounds() {
        let int =
            PropertyType::from_model(&json!({"type": "INT", "minimum": "0", "maximum": "100"}));
        assert_eq!(int.kind, "int");
        assert!(int.check("42").is_ok());
        assert!(int.check("4.2").unwrap_err().contains("not an int"));
        assert!(int.check(" 21").unwrap_err().contains("not an int"));
        let unbounded = PropertyType::from_model(&json!({"type": "INT"}));
        assert!(unbounded
            .check("99999999999999999999")
            .unwrap_err()
            .contains("out of range"));
        assert!(int.check("101").unwrap_err().contains("maximum 100"));
        assert!(int.check("-1").unwrap_err().contains("minimum 0"));
        let double = PropertyType::from_model(&json!({"type": "double"}));
        assert!(double.check("-3.5e2").is_ok());
        assert!(double.check("warm").is_err());
        assert!(double.check("NaN").is_err());
        let boolean = PropertyType::from_model(&json!({"type": "boolean"}));
        assert!(boolean.check("true").is_ok());
        assert!(boolean.check("yes").is_err());
        assert!(PropertyType::string().check("anything at all").is_ok());
        assert!(PropertyType::from_model(&json!({"type": "bytes"}))
            .check("AAEC")
            .is_ok());
    }
}
