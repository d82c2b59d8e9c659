//! CloudStream ↔ EdgeStream messages: what `kubectl logs` and `kubectl exec` (and later
//! attach and port-forward) ask of a node, carried on a request stream of the node's own link
//! ([`LinkHandle::request_stream`](crate::LinkHandle::request_stream)) instead of KubeEdge's
//! extra tunnel port.
//!
//! A log request: route group `stream`, operation `log`, resource `namespace/pod`, content the
//! query string of kube-apiserver's `pods/{name}/log` subresource. The answer is a stream of
//! messages: first a head ([`StreamHead`]: operation `response` and empty content when the log
//! follows, or operation `error` with a Kubernetes `Status` JSON as content), then the log's
//! bytes as the content of `data` messages, in order, until the node finishes the stream.
//!
//! An exec request (operation `exec`, the `PodExecOptions` query) is a duplex call: after it
//! the cloud sends `stdin`, `stdin-close` and `resize` messages; after the head the node sends
//! `stdout` and `stderr`, then `exit` with the remote-command protocol's final `Status`
//! ([`StreamMessage`]).
//!
//! A port-forward connection (operation `portforward`, query `port=N`) is a duplex call of
//! `data` messages both ways after the head, one call per forwarded TCP connection (see
//! [`Subresource::PortForward`]; the client side of the protocol is [`crate::portforward`]).

use bytes::Bytes;

use crate::frame::ReceivedMessage;
use crate::message::{Message, Route};

/// Route group of stream requests.
pub const GROUP: &str = "stream";

/// A malformed stream message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream message: {0}")]
pub struct StreamError(pub String);

/// The pod subresources a node serves as streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// `pods/{name}/log`: a streamed answer of `data` messages.
    Log,
    /// `pods/{name}/exec`: a duplex call (stdin up, stdout, stderr and the exit status down).
    Exec,
    /// `pods/{name}/attach`: a duplex call like exec's (`PodAttachOptions` query), to the
    /// running container's own streams; it ends with `Success` when the container stops.
    Attach,
    /// `pods/{name}/portforward`: one forwarded TCP connection as a duplex call, query
    /// `port=N` (the pod's port). After the head, `data` messages both ways carry the bytes; each
    /// side finishes its stream when its end closed (half close), and a reset is an abort. A
    /// refusal (no such pod, nothing listening on the port) is an error head whose `Status`
    /// message is the text for the client's error stream.
    PortForward,
}

impl Subresource {
    /// The route operation (and the URL's last segment).
    pub fn as_str(self) -> &'static str {
        match self {
            Subresource::Log => "log",
            Subresource::Exec => "exec",
            Subresource::Attach => "attach",
            Subresource::PortForward => "portforward",
        }
    }
}

/// `GET|POST /api/v1/namespaces/{namespace}/pods/{pod}/{subresource}?{query}`, asked of the
/// pod's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStreamRequest {
    /// Which subresource: `log` or `exec`.
    pub subresource: Subresource,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The subresource's query string, as the client sent it.
    pub query: String,
}

impl PodStreamRequest {
    /// The request message: source `cloudstream`, group [`GROUP`], operation the subresource,
    /// resource `namespace/pod`, content the query string.
    pub fn to_message(&self) -> Message {
        Message::new(
            Route::new(
                "cloudstream",
                GROUP,
                self.subresource.as_str(),
                &format!("{}/{}", self.namespace, self.pod),
            ),
            self.query.clone(),
        )
    }

    /// Reads a request of route group [`GROUP`].
    ///
    /// # Errors
    /// [`StreamError`] when the group is not [`GROUP`], the operation is not `log` or `exec`, the
    /// resource is not `namespace/pod`, or the query is not UTF-8.
    pub fn from_message(message: &ReceivedMessage) -> Result<PodStreamRequest, StreamError> {
        let route = message.route();
        if route.group != GROUP {
            return Err(StreamError(format!("group {:?}", route.group)));
        }
        let subresource = match route.operation {
            "log" => Subresource::Log,
            "exec" => Subresource::Exec,
            "attach" => Subresource::Attach,
            "portforward" => Subresource::PortForward,
            other => return Err(StreamError(format!("no stream {other:?} is served"))),
        };
        let (namespace, pod) = route
            .resource
            .split_once('/')
            .ok_or_else(|| StreamError("a stream request names namespace/pod".into()))?;
        let query = String::from_utf8(message.content().to_vec())
            .map_err(|_| StreamError("the query is not UTF-8".into()))?;
        Ok(PodStreamRequest {
            subresource,
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            query,
        })
    }
}

/// The first message of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamHead {
    /// The data follows.
    Ok,
    /// Refused: the HTTP status code and a Kubernetes `Status` object (JSON) for the client.
    Error {
        /// The HTTP status code (4xx, 5xx).
        code: u16,
        /// A `v1` `Status` object as JSON (Kubernetes API conventions, "Response Status Kind").
        status: Bytes,
    },
}

impl StreamHead {
    /// A refusal with a Kubernetes `Status` of `code` (reason from the code) and `message`.
    pub fn error(code: u16, message: &str) -> StreamHead {
        let reason = match code {
            400 => "BadRequest",
            403 => "Forbidden",
            404 => "NotFound",
            503 => "ServiceUnavailable",
            _ => "InternalError",
        };
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        });
        StreamHead::Error {
            code,
            status: Bytes::from(status.to_string()),
        }
    }

    /// The head message: source `edgestream`, operation `response` (empty content) or `error`
    /// (resource the status code, content the `Status` JSON).
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

    /// Reads a head made by [`to_message`](Self::to_message).
    ///
    /// # Errors
    /// [`StreamError`] when the operation is neither `response` nor `error`, or an error head's
    /// resource is not a status code.
    pub fn from_message(message: &ReceivedMessage) -> Result<StreamHead, StreamError> {
        let route = message.route();
        match route.operation {
            "response" => Ok(StreamHead::Ok),
            "error" => Ok(StreamHead::Error {
                code: route
                    .resource
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
    StreamMessage::Data(bytes).to_message()
}

/// The messages after the request and the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// A piece of a log.
    Data(Vec<u8>),
    /// Input for an exec'd command (cloud → node).
    Stdin(Vec<u8>),
    /// The end of the input (cloud → node).
    StdinClose,
    /// The client's terminal size changed (cloud → node), in characters.
    Resize {
        /// Columns.
        width: u16,
        /// Rows.
        height: u16,
    },
    /// Output of an exec'd command (node → cloud).
    Stdout(Vec<u8>),
    /// Error output of an exec'd command (node → cloud).
    Stderr(Vec<u8>),
    /// The command ended: the remote-command protocol's final `Status` (JSON).
    Exit(Bytes),
}

/// The WebSocket subprotocols of Kubernetes' remote-command protocol that kedge serves, newest
/// first (KEP-3396: v5 adds the close signal).
pub const REMOTE_COMMAND_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// Kubernetes' remote-command channels over WebSocket (`v4.channel.k8s.io`,
/// `v5.channel.k8s.io`): each binary WebSocket message is a channel byte and its payload.
pub mod channel {
    /// Client to server: input for the command.
    pub const STDIN: u8 = 0;
    /// Server to client: the command's standard output.
    pub const STDOUT: u8 = 1;
    /// Server to client: the command's standard error.
    pub const STDERR: u8 = 2;
    /// The final `Status` (JSON).
    pub const ERROR: u8 = 3;
    /// Terminal size, JSON `{"Width":…,"Height":…}`.
    pub const RESIZE: u8 = 4;
    /// v5 only: `[CLOSE, channel]` half-closes that channel (stdin's end).
    pub const CLOSE: u8 = 255;
}

impl StreamMessage {
    /// Reads a client's WebSocket message (stdin, resize, v5's close of stdin); `None` for
    /// what a server ignores.
    pub fn from_ws_frame(frame: &[u8], v5: bool) -> Option<StreamMessage> {
        let (&id, payload) = frame.split_first()?;
        match id {
            channel::STDIN => Some(StreamMessage::Stdin(payload.to_vec())),
            channel::RESIZE => {
                let size: serde_json::Value = serde_json::from_slice(payload).ok()?;
                let dimension = |k: &str| {
                    size.get(k)
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0)
                        .min(u16::MAX as u64) as u16
                };
                Some(StreamMessage::Resize {
                    width: dimension("Width"),
                    height: dimension("Height"),
                })
            }
            channel::CLOSE if v5 && payload.first() == Some(&channel::STDIN) => {
                Some(StreamMessage::StdinClose)
            }
            _ => None,
        }
    }

    /// The WebSocket message a server sends for this (stdout, stderr, the final status);
    /// `None` for what goes the other way.
    pub fn to_ws_frame(&self) -> Option<Vec<u8>> {
        let (id, payload): (u8, &[u8]) = match self {
            StreamMessage::Stdout(b) => (channel::STDOUT, b),
            StreamMessage::Stderr(b) => (channel::STDERR, b),
            StreamMessage::Exit(status) => (channel::ERROR, status),
            _ => return None,
        };
        let mut frame = Vec::with_capacity(payload.len() + 1);
        frame.push(id);
        frame.extend_from_slice(payload);
        Some(frame)
    }

    /// The final status message of an exec.
    pub fn exit(status: &serde_json::Value) -> StreamMessage {
        StreamMessage::Exit(Bytes::from(status.to_string()))
    }

    /// The message: group [`GROUP`], operation `data`, `stdin`, `stdin-close`, `resize` (content
    /// `"{width} {height}"`), `stdout`, `stderr` or `exit`, content the bytes.
    pub fn to_message(&self) -> Message {
        let (operation, content): (&str, Bytes) = match self {
            StreamMessage::Data(b) => ("data", Bytes::copy_from_slice(b)),
            StreamMessage::Stdin(b) => ("stdin", Bytes::copy_from_slice(b)),
            StreamMessage::StdinClose => ("stdin-close", Bytes::new()),
            StreamMessage::Resize { width, height } => {
                ("resize", Bytes::from(format!("{width} {height}")))
            }
            StreamMessage::Stdout(b) => ("stdout", Bytes::copy_from_slice(b)),
            StreamMessage::Stderr(b) => ("stderr", Bytes::copy_from_slice(b)),
            StreamMessage::Exit(status) => ("exit", status.clone()),
        };
        Message::new(Route::new("stream", GROUP, operation, ""), content)
    }

    /// Reads a message made by [`to_message`](Self::to_message).
    ///
    /// # Errors
    /// [`StreamError`] for an unknown operation, or a `resize` whose content is not two `u16`s.
    pub fn from_message(message: &ReceivedMessage) -> Result<StreamMessage, StreamError> {
        let content = message.content();
        Ok(match message.route().operation {
            "data" => StreamMessage::Data(content.to_vec()),
            "stdin" => StreamMessage::Stdin(content.to_vec()),
            "stdin-close" => StreamMessage::StdinClose,
            "resize" => {
                let text = std::str::from_utf8(&content).unwrap_or_default();
                let mut parts = text.split(' ').map(|p| p.parse::<u16>());
                match (parts.next(), parts.next()) {
                    (Some(Ok(width)), Some(Ok(height))) => StreamMessage::Resize { width, height },
                    _ => return Err(StreamError(format!("resize {text:?}"))),
                }
            }
            "stdout" => StreamMessage::Stdout(content.to_vec()),
            "stderr" => StreamMessage::Stderr(content.to_vec()),
            "exit" => StreamMessage::Exit(content),
            other => return Err(StreamError(format!("stream message {other:?}"))),
        })
    }
}
