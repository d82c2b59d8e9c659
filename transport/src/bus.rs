//! ServiceBus messages: an HTTP request from the cloud to an application on an edge node, and
//! its response, each carried as one transport request/response (KubeEdge's `bus` group).
//!
//! Request: route group `bus`, operation = the HTTP method, resource = `app` + path and query
//! (`/app/path?query`); response: operation = the status code. Content: the headers as a JSON
//! array of `[name, value]` pairs, `\n`, then the body as-is.

use bytes::Bytes;

use crate::frame::ReceivedMessage;
use crate::message::{Header, Message, Route};

/// The route group of ServiceBus messages, as KubeEdge's `modules.BusGroup`.
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

/// A message that is not a well-formed ServiceBus request or response; the string says what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed ServiceBus message: {0}")]
pub struct BusError(pub String);

/// An HTTP request for an application on a node, as the cloud's ServiceBus sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusRequest {
    /// The application's name on the node.
    pub app: String,
    /// The HTTP method (`GET`, `POST`, ...), carried as the route's operation.
    pub method: String,
    /// Path and query on the application, starting with `/`.
    pub path: String,
    /// End-to-end headers as `(name, value)` pairs, in order ([`is_end_to_end`]).
    pub headers: Vec<(String, String)>,
    /// The request body, as-is.
    pub body: Bytes,
}

/// The application's HTTP response, or one the node made when it could not reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusResponse {
    /// The HTTP status code (100–599), carried as the route's operation.
    pub status: u16,
    /// End-to-end headers as `(name, value)` pairs, in order ([`is_end_to_end`]).
    pub headers: Vec<(String, String)>,
    /// The response body, as-is.
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
    /// The transport message for this request: source `servicebus`, group [`GROUP`], operation
    /// the method, resource `/app/path?query`; content as the [module docs](self) describe.
    pub fn to_message(&self) -> Message {
        let resource = format!("/{}{}", self.app, self.path);
        Message::new(
            Route::new("servicebus", GROUP, &self.method, &resource),
            pack(&self.headers, &self.body),
        )
    }

    /// Reads a request made by [`to_message`](Self::to_message). A resource without a path
    /// (`/app`, `/app?q`) gets path `/`.
    ///
    /// # Errors
    /// [`BusError`] when the group is not [`GROUP`], the resource does not start with `/` or has
    /// no application name, or the content has no header line or its headers are not a JSON array
    /// of `[name, value]` pairs.
    pub fn from_message(message: &ReceivedMessage) -> Result<Self, BusError> {
        let route = message.route();
        if route.group != GROUP {
            return Err(BusError(format!("group {:?}", route.group)));
        }
        let resource = route.resource;
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
            method: route.operation.to_owned(),
            path,
            headers,
            body,
        })
    }
}

impl BusResponse {
    /// The transport message answering `request`: group [`GROUP`], operation the status code,
    /// `parent_id` the request's id.
    pub fn to_message(&self, request: &Header) -> Message {
        Message::response_to(
            request,
            Route::new("servicebus", GROUP, &self.status.to_string(), ""),
            pack(&self.headers, &self.body),
        )
    }

    /// Reads a response made by [`to_message`](Self::to_message).
    ///
    /// # Errors
    /// [`BusError`] when the group is not [`GROUP`], the operation is not a status code in
    /// 100–599, or the content has no header line or its headers are not a JSON array of
    /// `[name, value]` pairs.
    pub fn from_message(message: &ReceivedMessage) -> Result<Self, BusError> {
        let route = message.route();
        if route.group != GROUP {
            return Err(BusError(format!("group {:?}", route.group)));
        }
        let status = route
            .operation
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
