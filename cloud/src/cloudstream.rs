//! CloudStream: `kubectl logs` for pods on edge nodes, on the embedded API's address, carried
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

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use replication::api::object::Object;
use replication::api::remote::ApiReply;
use replication::api::ApiError;
use replication::{ObjectKey, Store};
use transport::stream::{LogRequest, StreamHead};
use transport::LinkError;

use crate::servicebus::ServiceBus;

/// How long the node may take to start answering (the data may then take as long as it takes).
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct StreamState {
    store: Arc<Store>,
    bus: Arc<ServiceBus>,
    bearer_token: Option<Arc<str>>,
}

/// The routes of CloudStream (same bearer token as the API, when it has one).
pub fn router(store: Arc<Store>, bus: Arc<ServiceBus>, bearer_token: Option<Arc<str>>) -> Router {
    Router::new()
        .route("/api/v1/namespaces/{namespace}/pods/{name}/log", get(log))
        .with_state(StreamState {
            store,
            bus,
            bearer_token,
        })
}

fn error(e: ApiError) -> Response {
    ApiReply::error(&e).into_response()
}

async fn log(
    State(state): State<StreamState>,
    Path((namespace, name)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    if let Some(token) = state.bearer_token.as_deref() {
        if !replication::api::bearer_matches(request.headers(), token) {
            return error(ApiError::unauthorized());
        }
    }
    let key = match ObjectKey::new("pods", &namespace, &name) {
        Ok(key) => key,
        Err(e) => return error(ApiError::bad_request(e.to_string())),
    };
    let pod: Option<Object> = match state.store.get(&key) {
        Ok(held) => held.and_then(|v| serde_json::from_slice(&v.object).ok()),
        Err(e) => return error(ApiError::internal(format!("reading the pod: {e}"))),
    };
    let Some(pod) = pod else {
        return error(ApiError::not_found("pods", &name));
    };
    let node = pod
        .get("spec")
        .and_then(|s| s.get("nodeName"))
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned();
    if node.is_empty() {
        return error(ApiError::bad_request(format!(
            "pod {name} is not bound to a node yet: it has no logs"
        )));
    }
    let Some(link) = state.bus.link(&node) else {
        return error(ApiError::unavailable(format!(
            "node {node} has never connected: the logs of pod {name} are on it"
        )));
    };
    let call = LogRequest {
        namespace,
        pod: name.clone(),
        query: query.unwrap_or_default(),
    };
    let (head, stream) = match link
        .request_stream(&call.to_message(), FIRST_BYTE_TIMEOUT)
        .await
    {
        Ok(answer) => answer,
        Err(LinkError::NotConnected) => {
            return error(ApiError::unavailable(format!(
                "node {node} is not connected: the logs of pod {name} are on it (its MetaServer \
                 serves them locally)"
            )))
        }
        Err(LinkError::Timeout(after)) => {
            return error(ApiError::new(
                504,
                "Timeout",
                format!("node {node} did not answer within {after:?}"),
            ))
        }
        Err(e) => {
            return error(ApiError::unavailable(format!(
                "node {node}: the log stream failed: {e}"
            )))
        }
    };
    match StreamHead::from_message(&head) {
        Ok(StreamHead::Ok) => {}
        Ok(StreamHead::Error { code, status }) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            return (code, [(header::CONTENT_TYPE, "application/json")], status).into_response();
        }
        Err(e) => {
            return error(ApiError::new(502, "BadGateway", e.to_string()));
        }
    }
    // Each data message's content as a chunk of the body; an error ends the body (the client
    // sees a cut response, as when a kubelet goes away mid-stream).
    let chunks = futures_util::stream::unfold(Some(stream), |stream| async move {
        let mut stream = stream?;
        match stream.next().await {
            Ok(Some(message)) => Some((Ok(message.content()), Some(stream))),
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
