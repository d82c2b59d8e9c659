//! ServiceBus messages: an HTTP request from the cloud to an application on an edge node, and
//! its response, each carried as one transport request/response (KubeEdge's `bus` group).
//!
//! Request: route group `bus`, operation = the HTTP method, resource = `app` + path and query
//! (`/app/path?query`); response: operation = the status code. Content: the headers as a JSON
//! array of `[name, value]` pairs, `\n`, then the body as-is.

use bytes::Bytes;

use crate::frame::ReceivedMessage;
use crate::message::{Header, Message, Route};

pub const GROUP: &str = "bus";

/// Hop-by-hop headers belong to one HTTP connection, not to the request (RFC 9110 §7.6.1):
/// neither side carries them over the link.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
];

/// Whether a header travels with a ServiceBus request or response.
pub fn is_end_to_end(name: &str) -> bool {
    !HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed ServiceBus message: {0}")]
pub struct BusError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusRequest {
    /// The application's name on the node.
    pub app: String,
    pub method: String,
    /// Path and query on the application, starting with `/`.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

fn pack(headers: &[(String, String)], body: &[u8]) -> Bytes {
    let mut out = serde_json::to_vec(headers).unwrap_or_else(|_| b"[]".to_vec());
    out.push(b'\n');
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn unpack(content: Bytes) -> Result<(Vec<(String, String)>, Bytes), BusError> {
    let split = content
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BusError("no header line".into()))?;
    let headers =
        serde_json::from_slice(&content[..split]).map_err(|e| BusError(format!("headers: {e}")))?;
    Ok((headers, content.slice(split + 1..)))
}

impl BusRequest {
    pub fn to_message(&self) -> Message {
        let resource = format!("/{}{}", self.app, self.path);
        Message::new(
            Route::new("servicebus", GROUP, &self.method, &resource),
            pack(&self.headers, &self.body),
        )
    }

    pub fn from_message(message: &ReceivedMessage) -> Result<Self, BusError> {
        let route = message.route();
        if route.group.as_str() != GROUP {
            return Err(BusError(format!("group {:?}", route.group.as_str())));
        }
        let resource = route.resource.as_str();
        let rest = resource
            .strip_prefix('/')
            .ok_or_else(|| BusError("resource does not start with /".into()))?;
        let (app, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if app.is_empty() {
            return Err(BusError("no application name".into()));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path
        };
        let (headers, body) = unpack(message.content())?;
        Ok(BusRequest {
            app: app.to_owned(),
            method: route.operation.as_str().to_owned(),
            path,
            headers,
            body,
        })
    }
}

impl BusResponse {
    pub fn to_message(&self, request: &Header) -> Message {
        Message::response_to(
            request,
            Route::new("servicebus", GROUP, &self.status.to_string(), ""),
            pack(&self.headers, &self.body),
        )
    }

    pub fn from_message(message: &ReceivedMessage) -> Result<Self, BusError> {
        let route = message.route();
        if route.group.as_str() != GROUP {
            return Err(BusError(format!("group {:?}", route.group.as_str())));
        }
        let status = route
            .operation
            .as_str()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| BusError("bad status code".into()))?;
        let (headers, body) = unpack(message.content())?;
        Ok(BusResponse {
            status,
            headers,
            body,
        })
    }

    /// A response made on the node (the application could not be reached, ...).
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        BusResponse {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: Bytes::from(message.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{EncodedMessage, Frame};

    fn received(message: &Message) -> ReceivedMessage {
        Frame::validate(EncodedMessage::encode(message).body().clone())
            .unwrap()
            .into_message()
            .unwrap()
    }

    #[test]
    fn requests_and_responses_survive_the_link() {
        let request = BusRequest {
            app: "shop".into(),
            method: "POST".into(),
            path: "/orders?id=7".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Bytes::from_static(b"line 1\nline 2"),
        };
        let message = request.to_message();
        assert_eq!(
            BusRequest::from_message(&received(&message)).unwrap(),
            request
        );
        let response = BusResponse {
            status: 201,
            headers: vec![("x-a".into(), "b".into())],
            body: Bytes::from_static(b"ok"),
        };
        let back = received(&response.to_message(&message.header));
        assert_eq!(BusResponse::from_message(&back).unwrap(), response);

        let root = BusRequest {
            path: "/".into(),
            ..request.clone()
        };
        assert_eq!(
            BusRequest::from_message(&received(&root.to_message())).unwrap(),
            root
        );
        let bad = Message::new(Route::new("x", GROUP, "GET", "/app"), "no header line");
        assert!(BusRequest::from_message(&received(&bad)).is_err());
    }
}
