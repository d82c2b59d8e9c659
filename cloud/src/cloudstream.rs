//! CloudStream: `kubectl logs` and `kubectl exec` for pods on edge nodes, on the embedded API's address, carried
//! over the node's own QUIC link (a request stream per call, `transport::stream`) instead of
//! KubeEdge's separate tunnel port: no extra port, no iptables rule, and nothing that breaks
//! when certificates rotate.
//!
//! `GET /api/v1/namespaces/{namespace}/pods/{name}/log?{PodLogOptions}`: the pod is looked up
//! here (404 if absent, 400 if not bound to a node yet), the node checks the container and
//! reads its files ([`edge::edgestream`] on the node), and the bytes are streamed to the
//! client as they come: a followed log (`-f`) stays open until the container stops or the
//! client leaves (dropping the stream stops the node's reader), with QUIC flow control end to
//! end, so a slow client grows no buffer here or on the node.
//!
//! `kubectl port-forward` (`GET .../pods/{name}/portforward`, the WebSocket tunnel of
//! `SPDY/3.1+portforward.k8s.io`, see `transport::portforward`): each connection kubectl
//! accepts becomes one duplex call on the node's link, so connections (and ports) are
//! independent QUIC streams with their own flow control; kubectl going away resets them all,
//! and the node closes the pod-side connections.
//!
//! An exec, attach or port-forward session with no bytes in either direction for
//! `--stream-idle-timeout` (kubelet's `--streaming-connection-idle-timeout`, 4 h by default) is
//! closed ([`Activity`]), so forgotten sessions do not hold streams and node limits forever.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use replication::api::object::Object;
use replication::api::remote::ApiReply;
use replication::api::ApiError;
use replication::{ObjectKey, Store};
use transport::portforward::{
    self as pf, ClientInput, Ended, Forward, LinkSink, LinkSource, SPDY_TUNNEL_PROTOCOL,
};
use transport::remotecommand;
use transport::stream::{
    PodStreamRequest, StreamHead, StreamMessage, Subresource, REMOTE_COMMAND_PROTOCOLS,
};
use transport::{LinkError, LinkHandle, StreamReader, StreamWriter};

use crate::servicebus::ServiceBus;

/// kubelet's default `--streaming-connection-idle-timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// When a streaming connection last carried bytes (either way).
#[derive(Clone)]
struct Activity {
    start: tokio::time::Instant,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: tokio::time::Instant::now(),
            last_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Completes once nothing was carried for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let last =
                Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
            let due = self.start + last + timeout;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// An upgraded connection that records its traffic in an [`Activity`].
struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How long the node may take to start answering (the data may then take as long as it takes).
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams open at once per node by default (see [`StreamLimit`]); below the 512 an edgecore
/// lets the cloud open (`edge::STREAMS_FROM_CLOUD`), leaving room for ServiceBus calls and
/// usage queries.
pub const DEFAULT_STREAMS_PER_NODE: usize = 256;

/// How many streams (a log, an exec or attach session, a port-forward connection) are open
/// through the cloud to each node, against a limit: one more is refused with 429
/// `TooManyRequests` (before any upgrade; for a port-forward connection, on its error stream).
/// Bounds what one node's streams cost here, whatever clients do.
pub struct StreamLimit {
    per_node: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// One open stream counted against its node's limit, until dropped.
pub struct StreamPermit {
    limit: Arc<StreamLimit>,
    node: String,
}

impl StreamLimit {
    pub fn new(per_node: usize) -> Arc<StreamLimit> {
        Arc::new(StreamLimit {
            per_node,
            open: Default::default(),
        })
    }

    /// Counts one more stream to `node`, or the 429 error if it has its limit open.
    pub fn acquire(self: &Arc<Self>, node: &str) -> Result<StreamPermit, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(node.to_owned()).or_default();
        if *count >= self.per_node {
            return Err(ApiError::new(
                429,
                replication::api::StatusReason::TooManyRequests,
                format!(
                    "node {node} has {count} streams open through the cloud (logs, exec, attach, \
                     port-forward connections), its limit (cloudcore --streams-per-node); try \
                     again when one ends"
                ),
            ));
        }
        *count += 1;
        Ok(StreamPermit {
            limit: self.clone(),
            node: node.to_owned(),
        })
    }

    /// Streams open to `node` now.
    pub fn open(&self, node: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.node);
            }
        }
    }
}

/// What CloudStream's handlers share (the API's routes and the kubelet endpoint's,
/// [`crate::kubelet_server`]): one stream limit per node for both.
#[derive(Clone)]
pub struct StreamState {
    store: Arc<Store>,
    bus: Arc<ServiceBus>,
    bearer_token: Option<Arc<str>>,
    limit: Arc<StreamLimit>,
    /// Sessions idle this long are closed.
    idle_timeout: Duration,
}

/// The routes of CloudStream on the API's address (`state`: see [`StreamState::new`]).
pub fn router(state: StreamState) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{namespace}/pods/{name}/log", get(log))
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/exec",
            get(exec).post(exec),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/attach",
            get(attach).post(attach),
        )
        .route(
            "/api/v1/namespaces/{namespace}/pods/{name}/portforward",
            get(portforward).post(portforward_spdy),
        )
        .with_state(state)
}

impl StreamState {
    /// The state of CloudStream's routes: the API's bearer token (if it has one), at most
    /// `streams_per_node` streams open to each node at once, and sessions idle for
    /// `idle_timeout` closed.
    pub fn new(
        store: Arc<Store>,
        bus: Arc<ServiceBus>,
        bearer_token: Option<Arc<str>>,
        streams_per_node: usize,
        idle_timeout: Duration,
    ) -> StreamState {
        StreamState {
            store,
            bus,
            bearer_token,
            limit: StreamLimit::new(streams_per_node),
            idle_timeout,
        }
    }

    /// The same state without the bearer token (the kubelet endpoint authenticates its
    /// clients by certificate instead).
    pub fn without_token(&self) -> StreamState {
        StreamState {
            bearer_token: None,
            ..self.clone()
        }
    }

    /// 401 unless the request carries the API's bearer token (when it has one).
    fn check_token(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        match self.bearer_token.as_deref() {
            Some(token) if !replication::api::bearer_matches(headers, token) => {
                Err(ApiError::unauthorized())
            }
            _ => Ok(()),
        }
    }

    /// The pod store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The node links.
    pub fn bus(&self) -> &Arc<ServiceBus> {
        &self.bus
    }
}

fn error(e: ApiError) -> Response {
    ApiReply::error(&e).into_response()
}

/// The link to the node a pod is bound to.
struct PodLink {
    handle: LinkHandle,
    node: String,
    pod: String,
    /// The pod's spec.
    spec: serde_json::Value,
}

/// The `container` a query names must be one of the pod's (or the pod has only one): the
/// errors kube-apiserver gives.
fn check_container(spec: &serde_json::Value, pod: &str, query: &str) -> Result<(), ApiError> {
    let asked = query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "container")
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let names = |field: &str| -> Vec<String> {
        spec.get(field)
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
            .collect()
    };
    let regular = names("containers");
    let mut all = names("initContainers");
    all.extend(regular.iter().cloned());
    if asked.is_empty() {
        return match regular.len() {
            1 => Ok(()),
            _ => Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {pod}, choose one of: [{}]",
                all.join(" ")
            ))),
        };
    }
    if all.contains(&asked) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "container {asked} is not valid for pod {pod}"
        )))
    }
}

impl PodLink {
    /// What a link failure means to the client.
    fn failed(&self, e: LinkError) -> ApiError {
        let (node, pod) = (&self.node, &self.pod);
        match e {
            LinkError::NotConnected => ApiError::unavailable(format!(
                "node {node} is not connected: pod {pod} runs there (its MetaServer serves the \
                 pod's logs locally)"
            )),
            LinkError::Timeout(after) => ApiError::new(
                504,
                replication::api::StatusReason::Timeout,
                format!("node {node} did not answer within {after:?}"),
            ),
            e => ApiError::unavailable(format!("node {node}: the stream failed: {e}")),
        }
    }
}

/// Finds the pod, the node it is bound to and that node's link: 404 without the pod, 400
/// before it is bound, 503 for a node that never connected.
fn pod_link(state: &StreamState, namespace: &str, name: &str) -> Result<PodLink, ApiError> {
    let key = ObjectKey::new("pods", namespace, name)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let pod: Option<Object> = match state.store.get(&key) {
        Ok(held) => held.and_then(|v| serde_json::from_slice(&v.object).ok()),
        Err(e) => return Err(ApiError::internal(format!("reading the pod: {e}"))),
    };
    let pod = pod.ok_or_else(|| ApiError::not_found("pods", name))?;
    let node = pod
        .get("spec")
        .and_then(|s| s.get("nodeName"))
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned();
    if node.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} is not bound to a node yet"
        )));
    }
    let handle = state.bus.link(&node).ok_or_else(|| {
        ApiError::unavailable(format!(
            "node {node} has never connected: pod {name} is bound to it"
        ))
    })?;
    Ok(PodLink {
        handle,
        node,
        pod: name.to_owned(),
        spec: pod.get("spec").cloned().unwrap_or_default(),
    })
}

/// The node's refusal as the HTTP answer, if the head is one.
fn refusal(head: &transport::ReceivedMessage) -> Option<Response> {
    match StreamHead::from_message(head) {
        Ok(StreamHead::Ok) => None,
        Ok(StreamHead::Error { code, status }) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            Some((code, [(header::CONTENT_TYPE, "application/json")], status).into_response())
        }
        Err(e) => Some(error(ApiError::new(
            502,
            replication::api::StatusReason::BadGateway,
            e.to_string(),
        ))),
    }
}

/// `kubectl exec`: the remote-command protocol over WebSocket (`v5.channel.k8s.io`, or v4),
/// each message a channel byte (0 stdin, 1 stdout, 2 stderr, 3 the final status, 4 terminal
/// size; v5's 255 + channel half-closes one), or over an HTTP `Upgrade: SPDY/3.1` (v4, one
/// SPDY stream per channel: `transport::remotecommand`), bridged to a duplex call on the
/// node's link. Errors before the upgrade are plain `Status` answers, as kube-apiserver's.
async fn exec(
    State(state): State<StreamState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    if let Err(e) = state.check_token(request.headers()) {
        return error(e);
    }
    let query = query.unwrap_or_default();
    remote_command(Subresource::Exec, &state, namespace, name, query, request).await
}

/// `kubectl attach`: the same protocol as exec, to the running container's own streams (the
/// node follows its output and writes to the stdin it keeps for `stdin: true` containers); it
/// ends with `Success` when the container stops.
async fn attach(
    State(state): State<StreamState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    if let Err(e) = state.check_token(request.headers()) {
        return error(e);
    }
    let query = query.unwrap_or_default();
    remote_command(Subresource::Attach, &state, namespace, name, query, request).await
}

/// Whether a request asks for an HTTP upgrade to SPDY/3.1.
fn is_spdy(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|u| u.eq_ignore_ascii_case(pf::SPDY_UPGRADE))
}

/// An exec or attach session for pod `namespace/name`, `query` in the API's names (`command`,
/// `container`, `stdin`, `stdout`, `stderr`, `tty`), over whichever upgrade `request` asks for.
pub(crate) async fn remote_command(
    subresource: Subresource,
    state: &StreamState,
    namespace: String,
    name: String,
    query: String,
    request: Request,
) -> Response {
    // The pod and the container first: kubectl falls back from a failed WebSocket upgrade to
    // SPDY, so these errors must be what either attempt is told.
    let link = match pod_link(state, &namespace, &name) {
        Ok(link) => link,
        Err(e) => return error(e),
    };
    if let Err(e) = check_container(&link.spec, &name, &query) {
        return error(e);
    }
    let permit = match state.limit.acquire(&link.node) {
        Ok(permit) => permit,
        Err(e) => return error(e),
    };
    let spdy = is_spdy(request.headers());
    let unsupported = |offered: &str| {
        error(ApiError::bad_request(format!(
            "{} is served over WebSocket with the {} subprotocols (kubectl 1.30 and later use \
             them by default) or as an HTTP upgrade to {} with {}: {}; this request asked to \
             upgrade to {offered}",
            subresource.as_str(),
            REMOTE_COMMAND_PROTOCOLS.join(" or "),
            pf::SPDY_UPGRADE,
            pf::PROTOCOL_HEADER,
            remotecommand::PROTOCOL_V4,
        )))
    };
    let (mut parts, body) = request.into_parts();
    let ws_upgrade = if spdy {
        let offered = parts
            .headers
            .get_all(pf::PROTOCOL_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok());
        if !remotecommand::offers_v4(offered) {
            return unsupported("SPDY/3.1 without v4.channel.k8s.io");
        }
        None
    } else {
        match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => Some(upgrade),
            Err(_) => {
                let offered = parts
                    .headers
                    .get(header::UPGRADE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("nothing");
                return unsupported(offered);
            }
        }
    };
    let expected = remotecommand::Expected::from_query(&query);
    let call = PodStreamRequest {
        subresource,
        namespace,
        pod: name,
        query,
    };
    let (head, input, output) = match link
        .handle
        .open_duplex(&call.to_message(), FIRST_BYTE_TIMEOUT)
        .await
    {
        Ok(answer) => answer,
        Err(e) => return error(link.failed(e)),
    };
    if let Some(refused) = refusal(&head) {
        return refused;
    }
    let idle_timeout = state.idle_timeout;
    let Some(upgrade) = ws_upgrade else {
        let mut request = Request::from_parts(parts, body);
        let upgraded = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            match upgraded.await {
                Ok(io) => {
                    let io = hyper_util::rt::TokioIo::new(io);
                    spdy_bridge(io, expected, input, output, idle_timeout).await;
                }
                Err(e) => tracing::debug!(error = %e, "a SPDY exec/attach upgrade failed"),
            }
            drop(permit);
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, pf::SPDY_UPGRADE)
            .header(pf::PROTOCOL_HEADER, remotecommand::PROTOCOL_V4)
            .body(Body::empty())
            .unwrap_or_default();
    };
    let upgrade = upgrade.protocols(REMOTE_COMMAND_PROTOCOLS);
    let v5 = upgrade
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == REMOTE_COMMAND_PROTOCOLS[0].as_bytes());
    upgrade.on_upgrade(move |socket| async move {
        bridge(socket, input, output, v5, idle_timeout).await;
        drop(permit);
    })
}

/// How long the client of a SPDY session may take to open its streams (kubelet's
/// `streamCreationTimeout`).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Carries one exec or attach session between a SPDY client (the upgraded connection `io`)
/// and the node's duplex call, as [`bridge`] does for WebSocket: the command's output waits
/// until the client opened the streams `expected`; the session ends after the final status,
/// when the client goes away (the node's side is then reset: it kills the command), or idle.
async fn spdy_bridge<IO>(
    io: IO,
    expected: remotecommand::Expected,
    mut to_node: StreamWriter,
    mut from_node: StreamReader,
    idle_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut read, mut write) = tokio::io::split(io);
    let activity = Activity::new();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let writer = {
        let activity = activity.clone();
        tokio::spawn(async move {
            while let Some(frames) = out_rx.recv().await {
                activity.touch();
                if write.write_all(&frames).await.is_err() {
                    return;
                }
            }
            let _ = write.shutdown().await;
        })
    };
    let session = std::sync::Mutex::new(remotecommand::Session::new(expected));
    let ready = tokio::sync::Notify::new();
    let lock = || session.lock().unwrap_or_else(|p| p.into_inner());
    let upward = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            activity.touch();
            let (events, is_ready) = {
                let mut session = lock();
                (session.receive(&buf[..n]), session.ready())
            };
            let events = match events {
                Ok(events) => events,
                Err(e) => {
                    tracing::debug!(error = %e, "a SPDY exec/attach session ended");
                    let _ = out_tx
                        .send(transport::spdy::goaway(
                            0,
                            transport::spdy::status::PROTOCOL_ERROR,
                        ))
                        .await;
                    return;
                }
            };
            if is_ready {
                ready.notify_one();
            }
            for event in events {
                match event {
                    remotecommand::Event::Send(frames) => {
                        if out_tx.send(frames).await.is_err() {
                            return;
                        }
                    }
                    remotecommand::Event::Command(message) => {
                        if to_node.send(&message.to_message()).await.is_err() {
                            return;
                        }
                    }
                    remotecommand::Event::Ended => return,
                }
            }
        }
    };
    let downward = async {
        if tokio::time::timeout(STREAM_CREATION_TIMEOUT, ready.notified())
            .await
            .is_err()
        {
            let frames = lock().fail("timed out waiting for the client to create its streams");
            let _ = out_tx.send(frames).await;
            return;
        }
        loop {
            let message = match from_node.next().await {
                Ok(Some(m)) => m,
                _ => break,
            };
            let Ok(message) = StreamMessage::from_message(&message) else {
                continue;
            };
            let frames = lock().output(&message);
            if !frames.is_empty() && out_tx.send(frames).await.is_err() {
                return;
            }
            if matches!(message, StreamMessage::Exit(_)) {
                return;
            }
        }
        let frames = lock().fail("the node ended the session without a status");
        let _ = out_tx.send(frames).await;
    };
    let client_gone = tokio::select! {
        _ = downward => false,
        _ = upward => true,
        _ = activity.idle(idle_timeout) => {
            tracing::info!(?idle_timeout, "closing an exec/attach session idle past --stream-idle-timeout");
            true
        }
    };
    drop(out_tx);
    if client_gone {
        to_node.reset();
    }
    // The frames queued go out, then the connection is shut (the client's reads end).
    let _ = writer.await;
}

/// Carries one exec session between kubectl's WebSocket and the node's duplex call until the
/// command's final status has gone to kubectl, or either side goes away (dropping the link's
/// streams makes the node kill the command).
async fn bridge(
    socket: WebSocket,
    mut to_node: StreamWriter,
    mut from_node: StreamReader,
    v5: bool,
    idle_timeout: Duration,
) {
    use futures_util::{SinkExt, StreamExt};
    let (mut ws_tx, mut ws_rx) = socket.split();
    let activity = Activity::new();
    let upward = async {
        while let Some(Ok(message)) = ws_rx.next().await {
            activity.touch();
            let data = match message {
                WsMessage::Binary(data) => data,
                WsMessage::Close(_) => break,
                _ => continue, // pings are answered by the WebSocket layer
            };
            let Some(message) = StreamMessage::from_ws_frame(&data, v5) else {
                continue;
            };
            if to_node.send(&message.to_message()).await.is_err() {
                break;
            }
        }
        // kubectl is gone (or closed): the node stops the command when the streams drop.
    };
    let downward = async {
        loop {
            let message = match from_node.next().await {
                Ok(Some(m)) => m,
                _ => break,
            };
            let Ok(message) = StreamMessage::from_message(&message) else {
                continue;
            };
            let Some(frame) = message.to_ws_frame() else {
                continue;
            };
            activity.touch();
            if ws_tx.send(WsMessage::Binary(frame.into())).await.is_err() {
                return;
            }
            if matches!(message, StreamMessage::Exit(_)) {
                break;
            }
        }
        let _ = ws_tx
            .send(WsMessage::Close(Some(CloseFrame {
                code: 1000,
                reason: "".into(),
            })))
            .await;
    };
    // The session ends with the command's status (or its stream); kubectl's side ending first
    // cancels it: the reset tells the node to kill the command.
    let client_gone = tokio::select! {
        _ = downward => false,
        _ = upward => true,
        _ = activity.idle(idle_timeout) => {
            tracing::info!(?idle_timeout, "closing an exec/attach session idle past --stream-idle-timeout");
            true
        }
    };
    if client_gone {
        to_node.reset();
    }
}

async fn log(
    State(state): State<StreamState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    if let Err(e) = state.check_token(request.headers()) {
        return error(e);
    }
    let query = query.unwrap_or_default();
    log_stream(&state, namespace, name, query).await
}

/// A pod's log (`query`: the API's `PodLogOptions`), streamed from its node.
pub(crate) async fn log_stream(
    state: &StreamState,
    namespace: String,
    name: String,
    query: String,
) -> Response {
    let link = match pod_link(state, &namespace, &name) {
        Ok(link) => link,
        Err(e) => return error(e),
    };
    let permit = match state.limit.acquire(&link.node) {
        Ok(permit) => permit,
        Err(e) => return error(e),
    };
    let call = PodStreamRequest {
        subresource: Subresource::Log,
        namespace,
        pod: name.clone(),
        query,
    };
    let (head, stream) = match link
        .handle
        .request_stream(&call.to_message(), FIRST_BYTE_TIMEOUT)
        .await
    {
        Ok(answer) => answer,
        Err(e) => return error(link.failed(e)),
    };
    if let Some(refused) = refusal(&head) {
        return refused;
    }
    // Each data message's content as a chunk of the body; an error ends the body (the client
    // sees a cut response, as when a kubelet goes away mid-stream).
    // The permit goes with the stream: the body holds both until the log ends or the client
    // leaves.
    let chunks = futures_util::stream::unfold(Some((stream, permit)), |held| async move {
        let (mut stream, permit) = held?;
        match stream.next().await {
            Ok(Some(message)) => Some((Ok(message.content()), Some((stream, permit)))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(chunks),
    )
        .into_response()
}

/// How long, once the node finished sending a forwarded connection's bytes, the client's side
/// may stay open before the connection is ended here (the node itself lingers 1 s and then
/// stops reading, which ends it sooner).
const PORT_FORWARD_LINGER: Duration = Duration::from_secs(5);

/// `kubectl port-forward`: kubectl's port-forward protocol over the WebSocket tunnel, each
/// connection carried to the pod's node on a duplex call of its own. Errors before the
/// upgrade are plain `Status` answers (404 pod, 400 not bound, 503 node never connected); a
/// client that offers only SPDY is told what is served.
pub(crate) async fn portforward(
    State(state): State<StreamState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let link = match portforward_link(&state, &namespace, &name, &headers) {
        Ok(link) => link,
        Err(e) => return error(e),
    };
    let offered = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let not_tunnel = || error(ApiError::bad_request(pf::unsupported(offered)));
    let Ok(upgrade) = upgrade else {
        return not_tunnel();
    };
    let upgrade = upgrade.protocols([SPDY_TUNNEL_PROTOCOL, pf::CHANNEL_PROTOCOL]);
    let Some(selected) = upgrade.selected_protocol() else {
        return not_tunnel();
    };
    // kubelet's channel protocol (other clients than kubectl): the ports are in the query.
    let channel_ports = if selected.as_bytes() == pf::CHANNEL_PROTOCOL.as_bytes() {
        match pf::query_ports(query.as_deref().unwrap_or("")) {
            Ok(ports) => Some(ports),
            Err(e) => return error(ApiError::bad_request(e)),
        }
    } else {
        None
    };
    let on_forward = forwarder(&state, link, namespace);
    let idle_timeout = state.idle_timeout;
    upgrade.on_upgrade(move |socket| async move {
        use futures_util::{SinkExt, StreamExt};
        let activity = Activity::new();
        let (mut ws_tx, ws_rx) = socket.split();
        let (out_tx, mut out_rx) = pf::output_channel();
        let input = ws_rx
            .take_while(|m| {
                std::future::ready(matches!(m, Ok(m) if !matches!(m, WsMessage::Close(_))))
            })
            .filter_map(|m| {
                std::future::ready(match m {
                    Ok(WsMessage::Binary(bytes)) => {
                        activity.touch();
                        Some(bytes)
                    }
                    _ => None,
                })
            });
        let writer = async {
            while let Some(frame) = out_rx.recv().await {
                activity.touch();
                if ws_tx.send(WsMessage::Binary(frame.into())).await.is_err() {
                    return;
                }
            }
            // Every connection is over (the channel protocol's end): close the WebSocket.
            let _ = ws_tx.send(WsMessage::Close(None)).await;
        };
        let session = async {
            match channel_ports {
                Some(ports) => {
                    let session = pf::serve_channels(ports, Box::pin(input), out_tx, on_forward);
                    tokio::join!(session, writer);
                }
                None => {
                    tokio::select! {
                        _ = pf::serve(Box::pin(input), out_tx, on_forward) => {}
                        _ = writer => {}
                    }
                }
            }
        };
        tokio::select! {
            _ = session => {}
            _ = activity.idle(idle_timeout) => {
                tracing::info!(?idle_timeout, "closing a port-forward session idle past --stream-idle-timeout");
            }
        }
    })
}

/// `POST .../portforward` with `Upgrade: SPDY/3.1`: the same protocol as a plain SPDY
/// session after `101 Switching Protocols` (kubectl before 1.30, or with
/// `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`, and tools built on client-go's SPDY dialer).
pub(crate) async fn portforward_spdy(
    State(state): State<StreamState>,
    Path((namespace, name)): Path<(String, String)>,
    mut request: Request,
) -> Response {
    let headers = request.headers().clone();
    let link = match portforward_link(&state, &namespace, &name, &headers) {
        Ok(link) => link,
        Err(e) => return error(e),
    };
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let offered = headers
        .get_all(pf::PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if !pf::is_spdy_upgrade(upgrade, offered) {
        return error(ApiError::bad_request(pf::unsupported(upgrade)));
    }
    let on_forward = forwarder(&state, link, namespace);
    let idle_timeout = state.idle_timeout;
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(io) => {
                let activity = Activity::new();
                let io = Watched {
                    io: hyper_util::rt::TokioIo::new(io),
                    activity: activity.clone(),
                };
                tokio::select! {
                    _ = pf::serve_io(io, on_forward) => {}
                    _ = activity.idle(idle_timeout) => {
                        tracing::info!(?idle_timeout, "closing a port-forward session idle past --stream-idle-timeout");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "a SPDY port-forward upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, pf::SPDY_UPGRADE)
        .header(pf::PROTOCOL_HEADER, pf::PROTOCOL_V1)
        .body(Body::empty())
        .unwrap_or_default()
}

/// The checks before a port-forward upgrade (token, pod, its node's link).
fn portforward_link(
    state: &StreamState,
    namespace: &str,
    name: &str,
    headers: &axum::http::HeaderMap,
) -> Result<Arc<PodLink>, ApiError> {
    state.check_token(headers)?;
    pod_link(state, namespace, name).map(Arc::new)
}

/// What a session does with each connection: counted against the node's stream limit, carried
/// to the node (or refused with the limit's error on its error stream).
fn forwarder(
    state: &StreamState,
    link: Arc<PodLink>,
    namespace: String,
) -> impl FnMut(Forward) + Send + 'static {
    let limit = state.limit.clone();
    move |forward: Forward| {
        let permit = limit.acquire(&link.node);
        let (link, namespace) = (link.clone(), namespace.clone());
        tokio::spawn(async move {
            match permit {
                Ok(permit) => {
                    carry(link, namespace, forward).await;
                    drop(permit);
                }
                Err(e) => forward.to_client.finish(Some(&e.message)).await,
            }
        });
    }
}

/// Carries one forwarded connection to the node and back. The node's refusal (nothing
/// listening, no such pod) is the text of the connection's error stream, as kubelet's.
async fn carry(link: Arc<PodLink>, namespace: String, mut forward: Forward) {
    let call = PodStreamRequest {
        subresource: Subresource::PortForward,
        namespace,
        pod: link.pod.clone(),
        query: format!("port={}", forward.port),
    };
    let request = call.to_message();
    let opened = tokio::select! {
        opened = link.handle.open_duplex(&request, FIRST_BYTE_TIMEOUT) => opened,
        _ = forward.cancelled.cancelled() => return,
    };
    let (head, writer, reader) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let message = link.failed(e).message;
            forward.to_client.finish(Some(&message)).await;
            return;
        }
    };
    match StreamHead::from_message(&head) {
        Ok(StreamHead::Ok) => {}
        Ok(StreamHead::Error { status, .. }) => {
            let message = serde_json::from_slice::<serde_json::Value>(&status)
                .ok()
                .and_then(|s| s.get("message")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&status).into_owned());
            forward.to_client.finish(Some(&message)).await;
            return;
        }
        Err(e) => {
            forward.to_client.finish(Some(&e.to_string())).await;
            return;
        }
    }
    let mut pod_in = LinkSource(reader);
    let mut pod_out = LinkSink(Some(writer));
    let mut client_in = ClientInput {
        from_client: &mut forward.from_client,
        cancelled: &forward.cancelled,
    };
    let ended = pf::pump(
        &mut client_in,
        &mut forward.to_client,
        &mut pod_in,
        &mut pod_out,
        PORT_FORWARD_LINGER,
    )
    .await;
    match ended {
        Ended::Clean => forward.to_client.finish(None).await,
        // kubectl reset the connection or went away: the node's side is reset too (it closes
        // the pod's connection); the client's streams are reset when dropped.
        Ended::Aborted => pod_out.reset(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_past_the_limit_are_refused_until_one_ends() {
        let limit = StreamLimit::new(2);
        let a = limit.acquire("n1").unwrap();
        let _b = limit.acquire("n1").unwrap();
        let refused = limit.acquire("n1").err().unwrap();
        assert_eq!(
            (refused.code, refused.reason),
            (429, replication::api::StatusReason::TooManyRequests)
        );
        assert!(refused.message.contains("node n1 has 2 streams open"));
        // Another node has its own count.
        let _c = limit.acquire("n2").unwrap();
        drop(a);
        assert_eq!(limit.open("n1"), 1);
        let _d = limit.acquire("n1").unwrap();
    }
}
