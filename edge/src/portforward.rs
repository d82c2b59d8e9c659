//! `kubectl port-forward` on this node: each forwarded connection is a TCP connection to the
//! pod's port, for the cloud (one duplex call on the link per connection,
//! `transport::stream::Subresource::PortForward`) and for a client of MetaServer (kubectl's
//! port-forward protocol, `transport::portforward`, served here; offline too).
//!
//! The process runtime runs pods in the host's network namespace, so a pod's port is the
//! node's: forwarding to port P of a pod means connecting to `127.0.0.1:P` on the node. A pod
//! of the CRI runtime on a CNI network is reached at its own IP (`status.podIP`, routed to the
//! node's bridge), a hostNetwork one at the node's loopback
//! ([`crate::edgestream::EdgeStream::pod_address`]). Only pods this node holds, bound to this
//! node, are forwarded to.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use replication::api::remote::ApiReply;
use replication::api::ApiError;
use tokio::net::TcpStream;
use transport::portforward::{
    self, tcp_halves, ClientInput, Ended, Forward, LinkSink, LinkSource, SPDY_TUNNEL_PROTOCOL,
};
use transport::stream::StreamHead;
use transport::{StreamReader, StreamWriter};

use crate::edgestream::EdgeStream;

/// How long connecting to a pod's port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Once the pod closed its side of a connection, how long the client has to close its own
/// before the connection is ended (containerd's port-forward waits 1 s the same way).
pub const LINGER: Duration = Duration::from_secs(1);

/// Connects to the pod's `port` at `address` (the node's loopback for pods sharing the host's
/// network, else the pod's IP). The error is the text the client is shown (kubelet's wording).
pub async fn connect(pod: &str, address: IpAddr, port: u16) -> Result<TcpStream, String> {
    let failed = |e: String| {
        let place = if address.is_loopback() {
            format!("localhost:{port} on the node (the pod shares the host's network)")
        } else {
            format!("{address}:{port} (the pod's IP)")
        };
        format!("error forwarding port {port} to pod {pod}: failed to connect to {place}: {e}")
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((address, port))).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}

/// Carries one connection for the cloud: the head (the call's answer), then the bytes both
/// ways until both sides closed or either aborted (a reset from the cloud, kubectl gone).
pub async fn over_link(stream: TcpStream, input: StreamReader, mut output: StreamWriter) {
    if output.send(&StreamHead::Ok.to_message()).await.is_err() {
        return;
    }
    let (mut pod_in, mut pod_out) = tcp_halves(stream);
    let mut client_in = LinkSource(input);
    let mut client_out = LinkSink(Some(output));
    let ended = portforward::pump(
        &mut client_in,
        &mut client_out,
        &mut pod_in,
        &mut pod_out,
        LINGER,
    )
    .await;
    if ended == Ended::Aborted {
        client_out.reset();
    }
}

/// Carries one connection of a MetaServer client to the pod's port.
async fn local(pod: String, address: IpAddr, mut forward: Forward) {
    let stream = tokio::select! {
        stream = connect(&pod, address, forward.port) => stream,
        _ = forward.cancelled.cancelled() => return,
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(message) => {
            forward.to_client.finish(Some(&message)).await;
            return;
        }
    };
    let (mut pod_in, mut pod_out) = tcp_halves(stream);
    let mut client_in = ClientInput {
        from_client: &mut forward.from_client,
        cancelled: &forward.cancelled,
    };
    let ended = portforward::pump(
        &mut client_in,
        &mut forward.to_client,
        &mut pod_in,
        &mut pod_out,
        LINGER,
    )
    .await;
    if ended == Ended::Clean {
        forward.to_client.finish(None).await;
    } // else dropped unfinished: both streams are reset
}

/// Runs a port-forward session on an upgraded WebSocket: the SPDY session in its binary
/// messages (or, given `channel_ports`, kubelet's channel protocol for those ports), one
/// `on_forward` per connection, until the client goes away (or, for the channel protocol,
/// every connection is over: the WebSocket is closed then).
pub async fn ws_session(
    socket: WebSocket,
    channel_ports: Option<Vec<u16>>,
    on_forward: impl FnMut(Forward),
) {
    use futures_util::{SinkExt, StreamExt};
    let (mut ws_tx, ws_rx) = socket.split();
    let (out_tx, mut out_rx) = portforward::output_channel();
    let input = ws_rx
        .take_while(|m| std::future::ready(matches!(m, Ok(m) if !matches!(m, WsMessage::Close(_)))))
        .filter_map(|m| {
            std::future::ready(match m {
                Ok(WsMessage::Binary(bytes)) => Some(bytes),
                _ => None,
            })
        });
    let writer = async {
        while let Some(frame) = out_rx.recv().await {
            if ws_tx.send(WsMessage::Binary(frame.into())).await.is_err() {
                return;
            }
        }
        let _ = ws_tx.send(WsMessage::Close(None)).await;
    };
    match channel_ports {
        Some(ports) => {
            let session = portforward::serve_channels(ports, Box::pin(input), out_tx, on_forward);
            tokio::join!(session, writer);
        }
        None => {
            tokio::select! {
                _ = portforward::serve(Box::pin(input), out_tx, on_forward) => {}
                _ = writer => {}
            }
        }
    }
}

/// MetaServer's `GET /api/v1/namespaces/{namespace}/pods/{name}/portforward`: kubectl
/// port-forward (the WebSocket tunnel) on the node itself, to a pod this node runs.
pub async fn http_portforward(
    State(stream): State<Arc<EdgeStream>>,
    Path((namespace, pod)): Path<(String, String)>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let address = match stream.own_pod(&namespace, &pod) {
        Ok(object) => stream.pod_address(&namespace, &object),
        Err(e) => return ApiReply::error(&e).into_response(),
    };
    let offered = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let not_tunnel = || {
        ApiReply::error(&ApiError::bad_request(portforward::unsupported(offered))).into_response()
    };
    let Ok(upgrade) = upgrade else {
        return not_tunnel();
    };
    let upgrade = upgrade.protocols([SPDY_TUNNEL_PROTOCOL, portforward::CHANNEL_PROTOCOL]);
    let Some(selected) = upgrade.selected_protocol() else {
        return not_tunnel();
    };
    let channel_ports = if selected.as_bytes() == portforward::CHANNEL_PROTOCOL.as_bytes() {
        match portforward::query_ports(query.as_deref().unwrap_or("")) {
            Ok(ports) => Some(ports),
            Err(e) => return ApiReply::error(&ApiError::bad_request(e)).into_response(),
        }
    } else {
        None
    };
    upgrade.on_upgrade(move |socket| {
        ws_session(socket, channel_ports, move |forward| {
            tokio::spawn(local(pod.clone(), address, forward));
        })
    })
}

/// MetaServer's `POST .../portforward` with `Upgrade: SPDY/3.1` (older kubectl, client-go's
/// SPDY dialer): the same session over the upgraded connection.
pub async fn http_portforward_spdy(
    State(stream): State<Arc<EdgeStream>>,
    Path((namespace, pod)): Path<(String, String)>,
    mut request: axum::extract::Request,
) -> Response {
    let address = match stream.own_pod(&namespace, &pod) {
        Ok(object) => stream.pod_address(&namespace, &object),
        Err(e) => return ApiReply::error(&e).into_response(),
    };
    let headers = request.headers();
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let offered = headers
        .get_all(portforward::PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if !portforward::is_spdy_upgrade(upgrade, offered) {
        let e = ApiError::bad_request(portforward::unsupported(upgrade));
        return ApiReply::error(&e).into_response();
    }
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(io) = upgraded.await {
            let io = hyper_util::rt::TokioIo::new(io);
            portforward::serve_io(io, move |forward| {
                tokio::spawn(local(pod.clone(), address, forward));
            })
            .await;
        }
    });
    axum::http::Response::builder()
        .status(axum::http::StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, portforward::SPDY_UPGRADE)
        .header(portforward::PROTOCOL_HEADER, portforward::PROTOCOL_V1)
        .body(axum::body::Body::empty())
        .unwrap_or_default()
}
