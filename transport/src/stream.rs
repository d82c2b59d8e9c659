//! CloudStream ↔ EdgeStream messages: what `kubectl logs` (and later exec, attach and
//! port-forward) asks of a node, carried on a request stream of the node's own link
//! ([`LinkHandle::request_stream`](crate::LinkHandle::request_stream)) instead of KubeEdge's
//! extra tunnel port.
//!
//! A log request: route group `stream`, operation `log`, resource `namespace/pod`, content the
//! query string of kube-apiserver's `pods/{name}/log` subresource. The answer is a stream of
//! messages: first a head ([`StreamHead`]: operation `response` and empty content when the log
//! follows, or operation `error` with a Kubernetes `Status` JSON as content), then the log's
//! bytes as the content of `data` messages, in order, until the node finishes the stream.

use bytes::Bytes;

use crate::frame::ReceivedMessage;
use crate::message::{Message, Route};

/// Route group of stream requests.
pub const GROUP: &str = "stream";

/// A malformed stream message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream message: {0}")]
pub struct StreamError(pub String);

/// `GET /api/v1/namespaces/{namespace}/pods/{pod}/log?{query}`, asked of the pod's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequest {
    pub namespace: String,
    pub pod: String,
    /// The subresource's query string, as the client sent it.
    pub query: String,
}

impl LogRequest {
    pub fn to_message(&self) -> Message {
        Message::new(
            Route::new(
                "cloudstream",
                GROUP,
                "log",
                &format!("{}/{}", self.namespace, self.pod),
            ),
            self.query.clone(),
        )
    }

    /// Reads a request; `Ok(None)` if the message is some other stream operation.
    pub fn from_message(message: &ReceivedMessage) -> Result<Option<LogRequest>, StreamError> {
        let route = message.route();
        if route.group.as_str() != GROUP || route.operation.as_str() != "log" {
            return Ok(None);
        }
        let (namespace, pod) = route
            .resource
            .as_str()
            .split_once('/')
            .ok_or_else(|| StreamError("a log request names namespace/pod".into()))?;
        let query = String::from_utf8(message.content().to_vec())
            .map_err(|_| StreamError("the query is not UTF-8".into()))?;
        Ok(Some(LogRequest {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            query,
        }))
    }
}

/// The first message of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamHead {
    /// The data follows.
    Ok,
    /// Refused: the HTTP status code and a Kubernetes `Status` object (JSON) for the client.
    Error { code: u16, status: Bytes },
}

impl StreamHead {
    pub fn to_message(&self) -> Message {
        match self {
            StreamHead::Ok => Message::new(
                Route::new("edgestream", GROUP, "response", ""),
                Bytes::new(),
            ),
            StreamHead::Error { code, status } => Message::new(
                Route::new("edgestream", GROUP, "error", &code.to_string()),
                status.clone(),
            ),
        }
    }

    pub fn from_message(message: &ReceivedMessage) -> Result<StreamHead, StreamError> {
        let route = message.route();
        match route.operation.as_str() {
            "response" => Ok(StreamHead::Ok),
            "error" => Ok(StreamHead::Error {
                code: route
                    .resource
                    .as_str()
                    .parse()
                    .map_err(|_| StreamError("an error head carries its code".into()))?,
                status: message.content(),
            }),
            other => Err(StreamError(format!("{other:?} is not a stream head"))),
        }
    }
}

/// One piece of the data after the head.
pub fn data(bytes: Vec<u8>) -> Message {
    Message::new(Route::new("edgestream", GROUP, "data", ""), bytes)
}
