//! API calls carried over a node's link. MetaServer forwards what it cannot serve from the
//! node's cache (writes other than local status, a get of an object it does not hold) to the
//! cloud, which serves them with this same API code under node authorization.
//!
//! One call is one transport request (a stream of its own): route group `api`, operation = the
//! HTTP method, resource = path and query. The response's operation is the status code. Both
//! carry `content-type`, `\n`, `accept`, `\n`, then the body as content (a few bytes of framing,
//! and the body is never re-encoded).

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use transport::{Header, Message, ReceivedMessage, Route};

use super::{route, verb_of, ApiError, PathMatch, Query, Resource, Verb, MAX_BODY_BYTES};
use crate::key::ObjectKey;

/// The route group of forwarded API calls.
pub const GROUP: &str = "api";

/// The largest response carried back (a list of a whole kind is served locally, not forwarded).
pub const MAX_REPLY_BYTES: usize = 8 << 20;

/// A transport message that is not a well-formed API call or reply.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The route group is not [`GROUP`]; the group it has.
    #[error("not an API call (group {0:?})")]
    NotApi(String),
    /// A bad method, URI or status code, or content without its two header lines; what is wrong.
    #[error("malformed API call: {0}")]
    Malformed(String),
}

/// An HTTP request to the API, in transit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    /// The HTTP method, carried as the route's operation.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// The request's `Content-Type` (empty when absent).
    pub content_type: String,
    /// The request's `Accept` (empty when absent).
    pub accept: String,
    /// The request body, at most [`MAX_BODY_BYTES`].
    pub body: Bytes,
}

/// The API's answer, in transit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiReply {
    /// The HTTP status code (100–599), carried as the route's operation.
    pub code: u16,
    /// The response's `Content-Type`.
    pub content_type: String,
    /// The response body, at most [`MAX_REPLY_BYTES`].
    pub body: Bytes,
}

fn pack(content_type: &str, accept: &str, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(content_type.len() + accept.len() + 2 + body.len());
    out.extend_from_slice(content_type.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(accept.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(body);
    Bytes::from(out)
}

fn unpack(content: Bytes) -> Result<(String, String, Bytes), RemoteError> {
    let mut lines = content.splitn(3, |b| *b == b'\n');
    let mut text = |what: &str| {
        let line = lines
            .next()
            .ok_or_else(|| RemoteError::Malformed(format!("no {what} line")))?;
        String::from_utf8(line.to_vec())
            .map_err(|_| RemoteError::Malformed(format!("{what} is not UTF-8")))
    };
    let content_type = text("content type")?;
    let accept = text("accept")?;
    let offset = content_type.len() + accept.len() + 2;
    if offset > content.len() {
        return Err(RemoteError::Malformed("truncated header lines".into()));
    }
    Ok((content_type, accept, content.slice(offset..)))
}

fn header_text(request: &Request, name: header::HeaderName) -> String {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.contains('\n'))
        .unwrap_or_default()
        .to_owned()
}

impl ApiCall {
    /// Reads an incoming HTTP request (its body up to the API's limit).
    ///
    /// A `Content-Type` or `Accept` that is not text, or holds a newline, is dropped.
    ///
    /// # Errors
    /// 413 `RequestEntityTooLarge` when the body is over [`MAX_BODY_BYTES`] (or cannot be read).
    pub async fn from_request(request: Request) -> Result<Self, ApiError> {
        let method = request.method().clone();
        let uri = request.uri().path_and_query().map_or_else(
            || request.uri().path().to_owned(),
            |p| p.as_str().to_owned(),
        );
        let content_type = header_text(&request, header::CONTENT_TYPE);
        let accept = header_text(&request, header::ACCEPT);
        let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                ApiError::too_large(format!(
                    "the request body is larger than {MAX_BODY_BYTES} bytes"
                ))
            })?;
        Ok(ApiCall {
            method,
            uri,
            content_type,
            accept,
            body,
        })
    }

    /// The transport request: source `source`, group [`GROUP`], operation the method, resource
    /// the path and query, content as the [module docs](self) describe.
    pub fn to_message(&self, source: &str) -> Message {
        Message::new(
            Route::new(source, GROUP, self.method.as_str(), &self.uri),
            pack(&self.content_type, &self.accept, &self.body),
        )
    }

    /// Reads a call made by [`to_message`](Self::to_message).
    ///
    /// # Errors
    /// [`RemoteError::NotApi`] for another route group, [`RemoteError::Malformed`] for a method or
    /// URI that does not parse, or content without its two UTF-8 header lines.
    pub fn from_message(message: &ReceivedMessage) -> Result<Self, RemoteError> {
        let route = message.route();
        if route.group != GROUP {
            return Err(RemoteError::NotApi(route.group.to_owned()));
        }
        let method = Method::from_bytes(route.operation.as_bytes())
            .map_err(|_| RemoteError::Malformed("bad method".into()))?;
        let uri = route.resource.to_owned();
        uri.parse::<Uri>()
            .map_err(|e| RemoteError::Malformed(format!("bad uri {uri:?}: {e}")))?;
        let (content_type, accept, body) = unpack(message.content())?;
        Ok(ApiCall {
            method,
            uri,
            content_type,
            accept,
            body,
        })
    }

    /// The HTTP request to serve locally.
    pub fn into_request(self) -> Request {
        let mut request = Request::new(Body::from(self.body));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
        for (name, value) in [
            (header::CONTENT_TYPE, self.content_type),
            (header::ACCEPT, self.accept),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                if !value.is_empty() {
                    request.headers_mut().insert(name, value);
                }
            }
        }
        request
    }
}

impl ApiReply {
    /// Reads a served response (bounded; a stream, such as a watch, is not carried).
    pub async fn from_response(response: Response) -> Self {
        let code = response.status().as_u16();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        match axum::body::to_bytes(response.into_body(), MAX_REPLY_BYTES).await {
            Ok(body) => ApiReply {
                code,
                content_type,
                body,
            },
            Err(_) => ApiReply::error(&ApiError::too_large(format!(
                "the response is larger than {MAX_REPLY_BYTES} bytes, the most carried to a node"
            ))),
        }
    }

    /// A reply carrying `error` as a `Status` (JSON).
    pub fn error(error: &ApiError) -> Self {
        ApiReply {
            code: error.code,
            content_type: "application/json".into(),
            body: Bytes::from(serde_json::to_vec(&error.to_status()).unwrap_or_default()),
        }
    }

    /// The transport response to `request`: operation the status code, content the
    /// `Content-Type`, an empty `Accept` line and the body.
    pub fn to_message(&self, request: &Header, source: &str) -> Message {
        Message::response_to(
            request,
            Route::new(source, GROUP, &self.code.to_string(), ""),
            pack(&self.content_type, "", &self.body),
        )
    }

    /// Reads a reply made by [`to_message`](Self::to_message).
    ///
    /// # Errors
    /// [`RemoteError::NotApi`] for another route group, [`RemoteError::Malformed`] for an operation
    /// that is not a status code in 100–599, or content without its two UTF-8 header lines.
    pub fn from_message(message: &ReceivedMessage) -> Result<Self, RemoteError> {
        let route = message.route();
        if route.group != GROUP {
            return Err(RemoteError::NotApi(route.group.to_owned()));
        }
        let code = route
            .operation
            .parse::<u16>()
            .ok()
            .filter(|c| (100..600).contains(c))
            .ok_or_else(|| RemoteError::Malformed("bad status code".into()))?;
        let (content_type, _, body) = unpack(message.content())?;
        Ok(ApiReply {
            code,
            content_type,
            body,
        })
    }

    /// The HTTP response to give the client (502 for a code outside 100–999).
    pub fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = HeaderValue::from_str(&self.content_type)
            .unwrap_or(HeaderValue::from_static("application/json"));
        (code, [(header::CONTENT_TYPE, content_type)], self.body).into_response()
    }
}

/// What an API request is about: the resource, namespace and name it points at, and its verb.
#[derive(Debug, Clone)]
pub struct Classified {
    /// The resource the path names.
    pub resource: &'static Resource,
    /// The namespace on the path; `None` for all namespaces or a cluster-scoped resource.
    pub namespace: Option<String>,
    /// The object's name on the path; `None` for a collection.
    pub name: Option<String>,
    /// The `/status` subresource.
    pub status: bool,
    /// The verb (`watch` from `?watch=true` or a `/watch/` path).
    pub verb: Verb,
}

impl Classified {
    /// The store key of the one object the request names, if it names one.
    pub fn key(&self) -> Option<ObjectKey> {
        let name = self.name.as_deref()?;
        ObjectKey::new(
            self.resource.store_kind,
            self.namespace.as_deref().unwrap_or_default(),
            name,
        )
        .ok()
    }
}

/// Classifies a request the way the API routes it, for the built-in kinds; `None` for
/// discovery and unknown paths.
pub fn classify(method: &Method, uri: &Uri) -> Option<Classified> {
    static BUILTIN: std::sync::OnceLock<super::Registry> = std::sync::OnceLock::new();
    classify_with(BUILTIN.get_or_init(super::Registry::builtin), method, uri)
}

/// Classifies a request the way an API serving `registry`'s kinds routes it.
pub fn classify_with(registry: &super::Registry, method: &Method, uri: &Uri) -> Option<Classified> {
    let PathMatch::Resource(target) = route(uri.path(), registry) else {
        return None;
    };
    let query: Query = axum::extract::Query::<Query>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let verb = verb_of(method, &target, &query)?;
    Some(Classified {
        resource: target.resource,
        namespace: target.namespace,
        name: target.name,
        status: target.status,
        verb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::frame::Frame;
    use transport::EncodedMessage;

    fn received(message: &Message) -> ReceivedMessage {
        let encoded = EncodedMessage::encode(message);
        Frame::validate(encoded.body().clone())
            .unwrap()
            .into_message()
            .unwrap()
    }

    #[test]
    fn a_call_and_its_reply_survive_the_link_encoding() {
        let call = ApiCall {
            method: Method::PATCH,
            uri: "/api/v1/namespaces/d/configmaps/c?fieldManager=kubectl".into(),
            content_type: "application/merge-patch+json".into(),
            accept: "application/json".into(),
            body: Bytes::from_static(b"{\"data\":{\"a\":\"line\\nbreak\"}}"),
        };
        let message = received(&call.to_message("metaserver"));
        assert_eq!(ApiCall::from_message(&message).unwrap(), call);

        let reply = ApiReply {
            code: 409,
            content_type: "application/json".into(),
            body: Bytes::from_static(b"{}\n"),
        };
        let header = call.to_message("metaserver").header;
        let message = received(&reply.to_message(&header, "cloudhub"));
        assert_eq!(ApiReply::from_message(&message).unwrap(), reply);
    }

    #[test]
    fn malformed_calls_are_errors() {
        let bad = |route: Route, content: &'static [u8]| {
            ApiCall::from_message(&received(&Message::new(route, content)))
        };
        assert!(bad(Route::new("x", "sync", "GET", "/"), b"\n\n").is_err());
        assert!(bad(Route::new("x", GROUP, "G ET", "/"), b"\n\n").is_err());
        assert!(bad(Route::new("x", GROUP, "GET", "/"), b"no lines").is_err());
        assert!(bad(Route::new("x", GROUP, "GET", "/"), b"\n\n").is_ok());
    }

    #[test]
    fn classifies_like_the_router() {
        let c = classify(
            &Method::GET,
            &"/api/v1/namespaces/d/secrets/s".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(c.verb, Verb::Get);
        assert_eq!(c.key().unwrap().as_str(), "secrets/d/s");
        let c = classify(&Method::GET, &"/api/v1/pods?watch=1".parse().unwrap()).unwrap();
        assert_eq!(c.verb, Verb::Watch);
        assert!(c.key().is_none());
        let c = classify(
            &Method::PUT,
            &"/api/v1/namespaces/d/pods/p/status".parse().unwrap(),
        )
        .unwrap();
        assert!(c.status && c.verb == Verb::Update);
        assert!(classify(&Method::GET, &"/api/v1".parse().unwrap()).is_none());
    }
}
