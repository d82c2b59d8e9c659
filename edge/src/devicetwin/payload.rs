//! KubeEdge's DeviceTwin JSON shapes, as mappers send and expect them on MQTT (KubeEdge's
//! `edge/pkg/devicetwin/dttype`): a twin is an attribute's `expected` (desired, from the cloud)
//! and `actual` (reported, from the device) values, each `{value, metadata: {timestamp}}`, with
//! `metadata.type` and per-side versions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueMetadata {
    /// Milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timestamp: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ValueMetadata>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeMetadata {
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TwinVersion {
    #[serde(default)]
    pub cloud: i64,
    #[serde(default)]
    pub edge: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<TwinVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<TwinVersion>,
}

impl MsgTwin {
    pub fn expected_value(&self) -> Option<&str> {
        self.expected.as_ref()?.value.as_deref()
    }

    pub fn actual_value(&self) -> Option<&str> {
        self.actual.as_ref()?.value.as_deref()
    }

    /// The twin without its versions (what `get`, `delta` and `membership` show).
    pub fn without_versions(mut self) -> Self {
        self.expected_version = None;
        self.actual_version = None;
        self
    }
}

/// What every message carries: the sender's event id and a timestamp in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BaseMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
}

impl BaseMessage {
    /// A message answering `event_id`, stamped now.
    pub fn reply(event_id: &str) -> Self {
        BaseMessage {
            event_id: event_id.to_owned(),
            timestamp: now_millis(),
        }
    }
}

pub fn now_millis() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `$hw/events/device/{id}/twin/update` from a device (its `actual` values).
#[derive(Debug, Clone, Deserialize)]
pub struct TwinUpdate {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: Option<BTreeMap<String, Option<MsgTwin>>>,
}

/// `.../twin/update/result`, `.../twin/get/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinResult {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, MsgTwin>,
}

/// One attribute's twin before and after a change (`null` before its first value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinDoc {
    pub last: Option<MsgTwin>,
    pub current: Option<MsgTwin>,
}

/// `.../twin/update/document`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinDocument {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, TwinDoc>,
}

/// `.../twin/update/delta`: the twins with an expected value, and `delta` the attributes whose
/// expected value differs from the actual one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TwinDelta {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub twin: BTreeMap<String, MsgTwin>,
    pub delta: BTreeMap<String, String>,
}

/// An error on a result topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResult {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub code: u16,
    pub reason: String,
}

/// `$hw/events/device/{id}/state/update`.
#[derive(Debug, Clone, Deserialize)]
pub struct StateUpdate {
    #[serde(flatten)]
    pub base: BaseMessage,
    #[serde(default)]
    pub state: String,
}

/// A device as membership and state messages show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<BTreeMap<String, MsgTwin>>,
}

/// `.../state/update/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub device: DeviceInfo,
}

/// `$hw/events/node/{node}/membership/get/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipDetail {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub devices: Vec<DeviceInfo>,
}

/// `$hw/events/node/{node}/membership/updated`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembershipUpdate {
    #[serde(flatten)]
    pub base: BaseMessage,
    pub added_devices: Vec<DeviceInfo>,
    pub removed_devices: Vec<DeviceInfo>,
}

/// The device states KubeEdge accepts: MQTT mappers' three, and the mapper-framework's
/// (`ok`, `disconnected`, `unhealthy`) that DMI mappers report.
pub const STATES: [&str; 6] = [
    "online",
    "offline",
    "unknown",
    "ok",
    "disconnected",
    "unhealthy",
];

/// Whether a device in `state` is reachable (its `lastOnlineTime` moves on).
pub fn is_online(state: &str) -> bool {
    matches!(state, "online" | "ok")
}

fn twin_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.,:/@#".contains(c))
}

/// An attribute name: letters, digits and `-_.,:/@#`, 1 to 128 bytes (as KubeEdge checks).
pub fn valid_twin_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 128 && twin_chars(key)
}

/// A value: the same characters (plus spaces), at most 512 bytes; empty clears it.
pub fn valid_twin_value(value: &str) -> bool {
    value.len() <= 512
        && value
            .chars()
            .all(|c| c == ' ' || twin_chars(&c.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapper_update_parses_and_a_result_serializes_like_kubeedge() {
        let update: TwinUpdate = serde_json::from_str(
            r#"{"event_id":"e1","timestamp":5,"twin":{"temperature":{"actual":{"value":"21"},"metadata":{"type":"Updated"}}}}"#,
        )
        .expect("parses");
        assert_eq!(update.base.event_id, "e1");
        let twin = update.twin.expect("twin")["temperature"]
            .clone()
            .expect("set");
        assert_eq!(twin.actual_value(), Some("21"));
        assert_eq!(twin.metadata.expect("type").kind, "Updated");

        let doc = TwinDocument {
            base: BaseMessage {
                event_id: "e".into(),
                timestamp: 1,
            },
            twin: BTreeMap::from([(
                "t".to_owned(),
                TwinDoc {
                    last: None,
                    current: Some(MsgTwin::default()),
                },
            )]),
        };
        assert_eq!(
            serde_json::to_string(&doc).expect("json"),
            r#"{"event_id":"e","timestamp":1,"twin":{"t":{"last":null,"current":{}}}}"#
        );
    }

    #[test]
    fn twin_keys_and_values_are_checked() {
        assert!(valid_twin_key("temperature-1"));
        assert!(!valid_twin_key(""));
        assert!(!valid_twin_key("a b"));
        assert!(!valid_twin_key(&"k".repeat(129)));
        assert!(valid_twin_value("21.5"));
        assert!(valid_twin_value(""));
        assert!(!valid_twin_value("{\"x\":1}"));
        assert!(!valid_twin_value(&"v".repeat(513)));
    }
}
