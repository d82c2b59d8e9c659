//! The message model of KubeEdge's beehive, kept: a header, a route and opaque content.
//!
//! Content is `Bytes`: for object messages it is the object's JSON exactly as the cloud stored
//! it, encoded once and never re-encoded on the way. [`Message::to_kubeedge_json`] and
//! [`Message::from_kubeedge_json`] give KubeEdge's own JSON wire shape, for interop and as the
//! baseline the benchmarks compare against.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Message metadata. Field names follow KubeEdge's `model.MessageHeader`.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Header {
    /// Unique id of this message (a UUID string, as KubeEdge uses).
    pub id: String,
    /// For a response: the id of the request it answers; empty otherwise.
    pub parent_id: String,
    /// Milliseconds since the Unix epoch when the message was made.
    pub timestamp: i64,
    /// The resourceVersion of the object the content carries, if any.
    pub resource_version: String,
    /// Whether the sender waits for a response.
    pub sync: bool,
}

/// Where a message comes from and what it does. Field names follow KubeEdge's `model.MessageRoute`.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Route {
    /// The module that sent it (`edgecontroller`, `edged`, `metaManager`, ...).
    pub source: String,
    /// The module group it is for (`resource`, `meta`, `twin`, `bus`, ...).
    pub group: String,
    /// `insert`, `update`, `patch`, `delete`, `query`, `response`, `keepalive`, ...
    pub operation: String,
    /// The resource the operation is about, `namespace/kind/name` as KubeEdge writes it.
    pub resource: String,
}

/// One message: header, route and content bytes.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Message {
    /// Id, time, parent and resourceVersion.
    pub header: Header,
    /// Source, group, operation and resource.
    pub route: Route,
    /// The payload, opaque to the transport (an object's JSON, a ServiceBus request, ...).
    pub content: Bytes,
}

/// The content could not be represented in, or read from, KubeEdge's JSON form.
#[derive(Debug, thiserror::Error)]
pub enum JsonFormError {
    /// The content is not UTF-8 JSON, so it cannot be embedded in the JSON form.
    #[error("message content is not JSON, so it has no KubeEdge JSON form: {0}")]
    ContentNotJson(serde_json::Error),
    /// The bytes are not a KubeEdge JSON message.
    #[error("malformed KubeEdge JSON message: {0}")]
    Malformed(serde_json::Error),
}

impl Message {
    /// A new message with a fresh id and the current time.
    pub fn new(route: Route, content: impl Into<Bytes>) -> Self {
        Message {
            header: Header {
                id: uuid::Uuid::new_v4().to_string(),
                timestamp: now_millis(),
                ..Header::default()
            },
            route,
            content: content.into(),
        }
    }

    /// A response to `request`: same route, operation `response`, `parent_id` set.
    pub fn response_to(request: &Header, route: Route, content: impl Into<Bytes>) -> Self {
        let mut message = Message::new(route, content);
        message.header.parent_id = request.id.clone();
        message
    }

    /// KubeEdge's JSON wire shape. Content must be JSON; it is embedded as-is, not re-encoded.
    ///
    /// The shape KubeEdge's `model.Message` marshals to: `{"header": {"msg_id", "parent_msg_id",
    /// "timestamp", "resourceversion", "sync"}, "route": {"source", "group", "operation",
    /// "resource"}, "content": …}`, with `parent_msg_id`, `resourceversion` and `sync` only
    /// when set.
    ///
    /// # Errors
    /// [`JsonFormError::ContentNotJson`] when the content is not UTF-8 or not JSON.
    pub fn to_kubeedge_json(&self) -> Result<Vec<u8>, JsonFormError> {
        let text = std::str::from_utf8(&self.content).map_err(|_| {
            JsonFormError::ContentNotJson(serde::de::Error::custom("content is not UTF-8"))
        })?;
        let content: &RawValue =
            serde_json::from_str(text).map_err(JsonFormError::ContentNotJson)?;
        let json = JsonMessage {
            header: JsonHeader {
                id: &self.header.id,
                parent_id: &self.header.parent_id,
                timestamp: self.header.timestamp,
                resource_version: &self.header.resource_version,
                sync: self.header.sync,
            },
            route: JsonRoute {
                source: &self.route.source,
                group: &self.route.group,
                operation: &self.route.operation,
                resource: &self.route.resource,
            },
            content,
        };
        // Serializing borrowed strings and a raw value into a Vec cannot fail.
        serde_json::to_vec(&json).map_err(JsonFormError::Malformed)
    }

    /// Parses KubeEdge's JSON wire shape; the content keeps its JSON text exactly.
    ///
    /// # Errors
    /// [`JsonFormError::Malformed`] when `bytes` are not JSON of that shape (the header's `msg_id`
    /// and `timestamp`, and the content, are required).
    pub fn from_kubeedge_json(bytes: &[u8]) -> Result<Self, JsonFormError> {
        let json: JsonMessage<'_> =
            serde_json::from_slice(bytes).map_err(JsonFormError::Malformed)?;
        Ok(Message {
            header: Header {
                id: json.header.id.to_owned(),
                parent_id: json.header.parent_id.to_owned(),
                timestamp: json.header.timestamp,
                resource_version: json.header.resource_version.to_owned(),
                sync: json.header.sync,
            },
            route: Route {
                source: json.route.source.to_owned(),
                group: json.route.group.to_owned(),
                operation: json.route.operation.to_owned(),
                resource: json.route.resource.to_owned(),
            },
            content: Bytes::copy_from_slice(json.content.get().as_bytes()),
        })
    }
}

impl Route {
    /// A route from its four parts.
    pub fn new(source: &str, group: &str, operation: &str, resource: &str) -> Self {
        Route {
            source: source.to_owned(),
            group: group.to_owned(),
            operation: operation.to_owned(),
            resource: resource.to_owned(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Serialize, Deserialize)]
struct JsonMessage<'a> {
    #[serde(borrow)]
    header: JsonHeader<'a>,
    #[serde(borrow)]
    route: JsonRoute<'a>,
    #[serde(borrow)]
    content: &'a RawValue,
}

#[derive(Serialize, Deserialize)]
struct JsonHeader<'a> {
    #[serde(rename = "msg_id", borrow)]
    id: &'a str,
    #[serde(
        rename = "parent_msg_id",
        default,
        skip_serializing_if = "str::is_empty",
        borrow
    )]
    parent_id: &'a str,
    timestamp: i64,
    #[serde(
        rename = "resourceversion",
        default,
        skip_serializing_if = "str::is_empty",
        borrow
    )]
    resource_version: &'a str,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    sync: bool,
}

#[derive(Serialize, Deserialize)]
struct JsonRoute<'a> {
    #[serde(default, borrow)]
    source: &'a str,
    #[serde(default, borrow)]
    group: &'a str,
    #[serde(default, borrow)]
    operation: &'a str,
    #[serde(default, borrow)]
    resource: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeedge_json_round_trip_keeps_content_bytes() {
        let content = br#"{"kind":"Pod","metadata":{"name":"nginx"}}"#;
        let mut msg = Message::new(
            Route::new("edgecontroller", "resource", "update", "default/pod/nginx"),
            &content[..],
        );
        msg.header.resource_version = "42".into();
        let json = msg.to_kubeedge_json().unwrap();
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.contains(r#""msg_id":""#), "{text}");
        assert!(text.contains(r#""resourceversion":"42""#), "{text}");
        assert!(text.contains(r#""content":{"kind":"Pod""#), "{text}");
        let back = Message::from_kubeedge_json(&json).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn non_json_content_has_no_json_form() {
        let msg = Message::new(Route::default(), &b"\xff\x00binary"[..]);
        assert!(matches!(
            msg.to_kubeedge_json(),
            Err(JsonFormError::ContentNotJson(_))
        ));
    }

    #[test]
    fn malformed_json_is_an_error() {
        assert!(matches!(
            Message::from_kubeedge_json(b"{\"header\":"),
            Err(JsonFormError::Malformed(_))
        ));
    }
}
