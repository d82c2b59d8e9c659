//! EdgeStream: the node's side of `kubectl logs` and `kubectl exec` ([`crate::exec`]), for
//! the cloud (over the link, see
//! `transport::stream`) and for local clients (MetaServer's `pods/{name}/log`, which works
//! offline too: the logs are on this node).
//!
//! The pod and its containers come from the node's cache; the log files from Edged
//! ([`crate::edged::logs`]). Errors are the `Status` kube-apiserver answers: 404 for a pod the
//! node does not hold, 400 for a missing or unknown container name or a bad parameter.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use replication::api::object::Object;
use replication::api::remote::ApiReply;
use replication::api::ApiError;
use replication::ObjectKey;
use serde_json::Value;
use transport::stream::{PodStreamRequest, StreamHead, Subresource, REMOTE_COMMAND_PROTOCOLS};
use transport::{IncomingRequest, StreamWriter};

use crate::attach::{self, AttachOptions, AttachTarget};
use crate::edged::logs::{self, LogOptions, LogSink};
use crate::exec::{self, ExecOptions};
use crate::meta::MetaManager;

/// Serves container logs from this node's files.
pub struct EdgeStream {
    meta: Arc<MetaManager>,
    /// `DATA_DIR/pods`.
    pods_dir: PathBuf,
    /// The node's and its pods' resource usage (`kubectl top`).
    pub usage: Arc<crate::usage::Sampler>,
}

/// A log request checked against the pod: what to read and how.
pub struct PreparedLog {
    file: PathBuf,
    options: LogOptions,
    key: ObjectKey,
    container: String,
}

fn container_names(pod: &Object) -> Vec<String> {
    let spec = pod.get("spec");
    ["initContainers", "containers"]
        .iter()
        .filter_map(|field| spec?.get(*field)?.as_array())
        .flatten()
        .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
        .collect()
}

fn regular_containers(pod: &Object) -> Vec<String> {
    pod.get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
        .collect()
}

/// Whether the pod's status says `container` runs.
fn running(pod: &Object, container: &str) -> bool {
    let status = pod.get("status");
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|field| status?.get(*field)?.as_array())
        .flatten()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(container))
        .and_then(|c| c.get("state")?.get("running"))
        .is_some()
}

impl EdgeStream {
    pub fn new(meta: Arc<MetaManager>, pods_dir: PathBuf) -> Self {
        let usage = Arc::new(crate::usage::Sampler::new(pods_dir.clone()));
        EdgeStream {
            meta,
            pods_dir,
            usage,
        }
    }

    fn pod(&self, key: &ObjectKey) -> Result<Option<Object>, ApiError> {
        let held = self
            .meta
            .store()
            .get(key)
            .map_err(|e| ApiError::internal(format!("reading the node's cache: {e}")))?;
        Ok(held.and_then(|v| serde_json::from_slice(&v.object).ok()))
    }

    /// Checks a log request against the pod as the node holds it.
    pub fn prepare_log(
        &self,
        namespace: &str,
        pod_name: &str,
        query: &str,
    ) -> Result<PreparedLog, ApiError> {
        let mut options = LogOptions::from_query(query).map_err(ApiError::bad_request)?;
        let (key, container) = self.pod_container(namespace, pod_name, &options.container)?;
        options.container = container;
        let dir = self.pods_dir.join(format!("{namespace}_{pod_name}"));
        let file = logs::path(&dir, &options.container, options.previous);
        if options.previous && !file.exists() {
            return Err(ApiError::bad_request(format!(
                "previous terminated container \"{}\" in pod \"{pod_name}\" not found",
                options.container
            )));
        }
        let container = options.container.clone();
        Ok(PreparedLog {
            file,
            options,
            key,
            container,
        })
    }

    /// Sends the log into `sink` (all of it, or followed while the container runs).
    pub async fn stream_log(
        &self,
        log: &PreparedLog,
        sink: &mut impl LogSink,
    ) -> std::io::Result<()> {
        if !log.options.follow || log.options.previous {
            let bytes = logs::read(&log.file, &log.options)?;
            // In pieces well under the link's frame limit.
            for piece in bytes.chunks(256 * 1024) {
                if !sink.send(piece.to_vec()).await {
                    break;
                }
            }
            return Ok(());
        }
        let running = || {
            self.pod(&log.key)
                .ok()
                .flatten()
                .is_some_and(|pod| running(&pod, &log.container))
        };
        logs::follow(&log.file, &log.options, running, sink).await
    }

    /// Answers a stream request from the cloud (a log, or an exec) on its own stream of the
    /// link.
    pub async fn serve(self: Arc<Self>, request: IncomingRequest, call: PodStreamRequest) {
        match call.subresource {
            Subresource::Log => self.serve_log(request, call).await,
            Subresource::Exec => self.serve_exec(request, call).await,
            Subresource::Attach => self.serve_attach(request, call).await,
            Subresource::PortForward => self.serve_portforward(request, call).await,
        }
    }

    async fn serve_log(&self, request: IncomingRequest, call: PodStreamRequest) {
        let prepared = self.prepare_log(&call.namespace, &call.pod, &call.query);
        let mut writer = request.into_stream();
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                let head = StreamHead::Error {
                    code: e.code,
                    status: ApiReply::error(&e).body,
                };
                let _ = writer.send(&head.to_message()).await;
                let _ = writer.finish();
                return;
            }
        };
        if writer.send(&StreamHead::Ok.to_message()).await.is_err() {
            return;
        }
        let result = self.stream_log(&prepared, &mut LinkSink(&mut writer)).await;
        if let Err(e) = result {
            tracing::warn!(pod = %prepared.key, error = %e, "reading a container log failed");
        }
        let _ = writer.finish();
    }

    /// Checks an exec request against the pod: its options, and the running container the
    /// command runs in.
    pub fn prepare_exec(
        &self,
        namespace: &str,
        pod_name: &str,
        query: &str,
    ) -> Result<(ExecOptions, exec::ExecContext), ApiError> {
        let mut options = ExecOptions::from_query(query).map_err(ApiError::bad_request)?;
        options.container = self
            .pod_container(namespace, pod_name, &options.container)?
            .1;
        let dir = self.pods_dir.join(format!("{namespace}_{pod_name}"));
        let target = exec::context(&dir, &options.container).ok_or_else(|| {
            ApiError::bad_request(format!(
                "container {} in pod {pod_name} is not running on this node's process runtime",
                options.container
            ))
        })?;
        Ok((options, target))
    }

    async fn serve_exec(&self, request: IncomingRequest, call: PodStreamRequest) {
        let prepared = self.prepare_exec(&call.namespace, &call.pod, &call.query);
        let (input, mut output) = request.into_duplex();
        match prepared {
            Ok((options, target)) => exec::over_link(options, target, input, output).await,
            Err(e) => {
                let head = StreamHead::Error {
                    code: e.code,
                    status: ApiReply::error(&e).body,
                };
                let _ = output.send(&head.to_message()).await;
                let _ = output.finish();
            }
        }
    }

    /// Checks an attach request against the pod: its options, and the running container.
    pub fn prepare_attach(
        &self,
        namespace: &str,
        pod_name: &str,
        query: &str,
    ) -> Result<(AttachOptions, AttachTarget), ApiError> {
        let mut options = AttachOptions::from_query(query).map_err(ApiError::bad_request)?;
        options.container = self
            .pod_container(namespace, pod_name, &options.container)?
            .1;
        let dir = self.pods_dir.join(format!("{namespace}_{pod_name}"));
        let running = exec::context(&dir, &options.container).ok_or_else(|| {
            ApiError::bad_request(format!(
                "container {} in pod {pod_name} is not running on this node's process runtime",
                options.container
            ))
        })?;
        let log = logs::path(&dir, &options.container, false);
        let stdin = crate::edged::process::container_stdin(&log);
        let terminal = crate::edged::process::container_terminal(&log);
        Ok((
            options,
            AttachTarget {
                log,
                group: running.group,
                stdin,
                terminal,
                cri: running.cri,
            },
        ))
    }

    async fn serve_attach(&self, request: IncomingRequest, call: PodStreamRequest) {
        let prepared = self.prepare_attach(&call.namespace, &call.pod, &call.query);
        let (input, mut output) = request.into_duplex();
        match prepared {
            Ok((options, target)) => {
                exec::session_over_link(input, output, move |session| {
                    attach::run(options, target, session)
                })
                .await
            }
            Err(e) => {
                let head = StreamHead::Error {
                    code: e.code,
                    status: ApiReply::error(&e).body,
                };
                let _ = output.send(&head.to_message()).await;
                let _ = output.finish();
            }
        }
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        self.meta.node()
    }

    /// The labels of a pod this node holds (for `PodMetrics`).
    pub fn pod_labels(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = ObjectKey::new("pods", namespace, name).ok()?;
        self.pod(&key)
            .ok()
            .flatten()?
            .get("metadata")?
            .get("labels")
            .cloned()
    }

    /// Answers the cloud's usage request (`transport::usage`) with a report measured now.
    pub async fn serve_usage(&self, request: IncomingRequest) {
        let report = self.usage.report().await;
        if let Err(e) = request.respond(&transport::usage::answer(&report)).await {
            tracing::debug!(error = %e, "the cloud went away before the usage report");
        }
    }

    /// Where the pod's ports are reached from the node: its own IP when it has a network
    /// namespace of its own (a CRI runtime pod on a CNI network), else the node's loopback
    /// (hostNetwork pods, and the process runtime's, which share the host's network).
    pub fn pod_address(&self, namespace: &str, pod: &Object) -> std::net::IpAddr {
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        let spec = pod.get("spec");
        if spec
            .and_then(|s| s.get("hostNetwork"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return loopback;
        }
        let dir = self.pods_dir.join(format!(
            "{namespace}_{}",
            replication::api::object::name(pod)
        ));
        let runs_in_cri = spec
            .and_then(|s| s.get("containers"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .any(|name| crate::edged::cri::exec_target(&dir, name).is_some());
        let ip = pod
            .get("status")
            .and_then(|s| s.get("podIP"))
            .and_then(Value::as_str)
            .and_then(|ip| ip.parse().ok());
        match ip {
            Some(ip) if runs_in_cri => ip,
            _ => loopback,
        }
    }

    /// A pod this node holds and runs (bound to this node): 404 otherwise.
    pub fn own_pod(&self, namespace: &str, pod_name: &str) -> Result<Object, ApiError> {
        let key = ObjectKey::new("pods", namespace, pod_name)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let pod = self
            .pod(&key)?
            .ok_or_else(|| ApiError::not_found("pods", pod_name))?;
        let node = pod
            .get("spec")
            .and_then(|s| s.get("nodeName"))
            .and_then(Value::as_str);
        if node != Some(self.meta.node()) {
            return Err(ApiError::not_found("pods", pod_name));
        }
        Ok(pod)
    }

    /// One forwarded connection for the cloud: the pod must be this node's, the query names
    /// the port (`port=N`); nothing listening there is an error head whose message kubectl
    /// shows.
    async fn serve_portforward(&self, request: IncomingRequest, call: PodStreamRequest) {
        let (input, mut output) = request.into_duplex();
        let port = logs::query_pairs(&call.query).and_then(|pairs| {
            pairs
                .iter()
                .find(|(k, _)| k == "port")
                .and_then(|(_, v)| v.parse::<u16>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| "a port-forward names its port (port=N)".to_owned())
        });
        let connected = match (self.own_pod(&call.namespace, &call.pod), port) {
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(ApiError::bad_request(e)),
            (Ok(pod), Ok(port)) => {
                let address = self.pod_address(&call.namespace, &pod);
                crate::portforward::connect(&call.pod, address, port)
                    .await
                    .map_err(ApiError::internal)
            }
        };
        match connected {
            Ok(tcp) => crate::portforward::over_link(tcp, input, output).await,
            Err(e) => {
                let head = StreamHead::Error {
                    code: e.code,
                    status: ApiReply::error(&e).body,
                };
                let _ = output.send(&head.to_message()).await;
                let _ = output.finish();
            }
        }
    }

    /// The pod's key and the container a request names (or the pod's only one): 404 for a pod
    /// the node does not hold, 400 for a container it does not have.
    fn pod_container(
        &self,
        namespace: &str,
        pod_name: &str,
        asked: &str,
    ) -> Result<(ObjectKey, String), ApiError> {
        let key = ObjectKey::new("pods", namespace, pod_name)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let pod = self
            .pod(&key)?
            .ok_or_else(|| ApiError::not_found("pods", pod_name))?;
        let container = self.container_of(&pod, pod_name, asked)?;
        Ok((key, container))
    }

    /// The container a request names, or the pod's only one; the errors kube-apiserver gives.
    fn container_of(&self, pod: &Object, pod_name: &str, asked: &str) -> Result<String, ApiError> {
        let names = container_names(pod);
        let container = if asked.is_empty() {
            match regular_containers(pod).as_slice() {
                [only] => only.clone(),
                _ => {
                    return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                    names.join(" ")
                )))
                }
            }
        } else {
            asked.to_owned()
        };
        if !names.contains(&container) {
            return Err(ApiError::bad_request(format!(
                "container {container} is not valid for pod {pod_name}"
            )));
        }
        Ok(container)
    }
}

/// Log bytes into a link's response stream, as `data` messages.
struct LinkSink<'a>(&'a mut StreamWriter);

impl LogSink for LinkSink<'_> {
    async fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.0.send(&transport::stream::data(bytes)).await.is_ok()
    }
}

/// Log bytes into an HTTP body.
struct BodySink(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl LogSink for BodySink {
    async fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.0.send(Ok(Bytes::from(bytes))).await.is_ok()
    }
}

/// MetaServer's `GET /api/v1/namespaces/{namespace}/pods/{name}/log`: served from this node's
/// files, online or offline. A followed log streams as a chunked `text/plain` body.
pub async fn http_log(
    State(stream): State<Arc<EdgeStream>>,
    Path((namespace, pod)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    let prepared = match stream.prepare_log(&namespace, &pod, query.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return ApiReply::error(&e).into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut sink = BodySink(tx);
        if let Err(e) = stream.stream_log(&prepared, &mut sink).await {
            let _ = sink.0.send(Err(e)).await;
        }
    });
    let body = Body::from_stream(tokio_stream_of(rx));
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// A receiver as a `Stream` (without pulling in tokio-stream for one adapter).
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// MetaServer's `GET .../pods/{name}/exec`: `kubectl exec` on the node itself (someone at the
/// device, with or without the cloud), over WebSocket as kube-apiserver serves it.
pub async fn http_exec(
    State(stream): State<Arc<EdgeStream>>,
    Path((namespace, pod)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Response {
    let (options, target) =
        match stream.prepare_exec(&namespace, &pod, query.as_deref().unwrap_or("")) {
            Ok(prepared) => prepared,
            Err(e) => return ApiReply::error(&e).into_response(),
        };
    let Ok(upgrade) = upgrade else {
        return ApiReply::error(&ApiError::bad_request(format!(
            "exec is served over WebSocket with the {} subprotocols (kubectl 1.30 and later use \
             them by default); SPDY is not served",
            REMOTE_COMMAND_PROTOCOLS.join(" or ")
        )))
        .into_response();
    };
    let upgrade = upgrade.protocols(REMOTE_COMMAND_PROTOCOLS);
    let v5 = upgrade
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == REMOTE_COMMAND_PROTOCOLS[0].as_bytes());
    upgrade.on_upgrade(move |socket| {
        ws_session(socket, v5, move |session| {
            exec::run(options, target, session)
        })
    })
}

/// Runs a remote-command session (exec, attach) for a WebSocket client of MetaServer: the
/// client's channels into the session `runner` runs, its output back, until it ends or the
/// client goes away (which cancels it).
pub async fn ws_session<F, Fut>(socket: axum::extract::ws::WebSocket, v5: bool, runner: F)
where
    F: FnOnce(exec::Session) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    {
        use axum::extract::ws::Message as WsMessage;
        use futures_util::{SinkExt, StreamExt};
        let (session, in_tx, mut out_rx) = exec::Session::new();
        let cancel = session.cancelled.clone();
        let runner = tokio::spawn(runner(session));
        let (mut ws_tx, mut ws_rx) = socket.split();
        let mut in_tx = Some(in_tx);
        loop {
            tokio::select! {
                message = out_rx.recv() => match message {
                    Some(message) => {
                        let Some(frame) = message.to_ws_frame() else { continue };
                        if ws_tx.send(WsMessage::Binary(frame.into())).await.is_err() {
                            cancel.cancel();
                            break;
                        }
                    }
                    None => {
                        let _ = ws_tx.send(WsMessage::Close(Some(axum::extract::ws::CloseFrame {
                            code: 1000,
                            reason: "".into(),
                        }))).await;
                        break;
                    }
                },
                message = ws_rx.next() => match message {
                    Some(Ok(WsMessage::Binary(data))) => {
                        let Some(message) = transport::stream::StreamMessage::from_ws_frame(&data, v5) else {
                            continue;
                        };
                        if let Some(tx) = &in_tx {
                            if matches!(message, transport::stream::StreamMessage::StdinClose) {
                                let _ = tx.send(message).await;
                                in_tx = None;
                            } else {
                                let _ = tx.send(message).await;
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    // The client went away: the command goes with it.
                    Some(Err(_)) | None => {
                        cancel.cancel();
                        break;
                    }
                },
            }
        }
        let _ = runner.await;
    }
}

/// MetaServer's `GET|POST .../pods/{name}/attach`: `kubectl attach` on the node itself.
pub async fn http_attach(
    State(stream): State<Arc<EdgeStream>>,
    Path((namespace, pod)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    upgrade: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Response {
    let (options, target) =
        match stream.prepare_attach(&namespace, &pod, query.as_deref().unwrap_or("")) {
            Ok(prepared) => prepared,
            Err(e) => return ApiReply::error(&e).into_response(),
        };
    let Ok(upgrade) = upgrade else {
        return ApiReply::error(&ApiError::bad_request(format!(
            "attach is served over WebSocket with the {} subprotocols (kubectl 1.30 and later \
             use them by default); SPDY is not served",
            REMOTE_COMMAND_PROTOCOLS.join(" or ")
        )))
        .into_response();
    };
    let upgrade = upgrade.protocols(REMOTE_COMMAND_PROTOCOLS);
    let v5 = upgrade
        .selected_protocol()
        .is_some_and(|p| p.as_bytes() == REMOTE_COMMAND_PROTOCOLS[0].as_bytes());
    upgrade.on_upgrade(move |socket| {
        ws_session(socket, v5, move |session| {
            attach::run(options, target, session)
        })
    })
}
