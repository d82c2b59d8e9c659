//! ServiceBus in the cloud: an HTTP request to an application on an edge node, carried over the
//! node's link (`transport::bus`) and performed by the node against the application's local
//! address. In Rust: [`ServiceBus::call`]; over HTTP, on the API's address:
//! `ANY /servicebus/{node}/{app}/{path…}?{query}` → the application's response (status,
//! headers, body). A node that is not connected is a 503, a timeout a 504.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use transport::bus::{is_end_to_end, BusRequest, BusResponse};
use transport::{LinkError, LinkHandle};

/// The largest request body sent to a node.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("node {0} has never connected")]
    UnknownNode(String),
    #[error("node {0} is not connected")]
    NotConnected(String),
    #[error("node {node} did not answer within {after:?}")]
    Timeout {
        node: String,
        after: std::time::Duration,
    },
    #[error("the call to node {node} failed: {reason}")]
    Failed { node: String, reason: String },
}

impl CallError {
    fn status(&self) -> StatusCode {
        match self {
            CallError::UnknownNode(_) => StatusCode::NOT_FOUND,
            CallError::NotConnected(_) => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            CallError::Failed { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}

/// How long a ServiceBus call waits for the node by default (a hung or unreachable node is a
/// 504 after this; `cloudcore --service-bus-timeout`).
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The nodes' links, as CloudHub accepts them.
pub struct ServiceBus {
    links: RwLock<HashMap<String, LinkHandle>>,
    /// How long a call waits for the node's answer before a 504.
    timeout: std::time::Duration,
}

impl Default for ServiceBus {
    fn default() -> Self {
        ServiceBus::new(DEFAULT_TIMEOUT)
    }
}

impl ServiceBus {
    /// A bus whose calls wait at most `timeout` for a node (then 504; a node whose link is
    /// down is a 503 at once).
    pub fn new(timeout: std::time::Duration) -> Self {
        ServiceBus {
            links: RwLock::new(HashMap::new()),
            timeout,
        }
    }

    pub fn attach(&self, node: &str, link: LinkHandle) {
        self.links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_owned(), link);
    }

    /// The link of `node`, if it ever connected (CloudStream uses it too).
    pub fn link(&self, node: &str) -> Option<LinkHandle> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// Sends `request` to `node` and waits for the application's response.
    pub async fn call(&self, node: &str, request: &BusRequest) -> Result<BusResponse, CallError> {
        let link = self
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
            .ok_or_else(|| CallError::UnknownNode(node.to_owned()))?;
        let failed = |reason: String| CallError::Failed {
            node: node.to_owned(),
            reason,
        };
        match link
            .request_within(&request.to_message(), self.timeout)
            .await
        {
            Ok(response) => BusResponse::from_message(&response).map_err(|e| failed(e.to_string())),
            Err(LinkError::NotConnected) => Err(CallError::NotConnected(node.to_owned())),
            // The connection died under the call: the link is down now.
            Err(LinkError::Connection(_)) => Err(CallError::NotConnected(node.to_owned())),
            Err(LinkError::Timeout(after)) => Err(CallError::Timeout {
                node: node.to_owned(),
                after,
            }),
            Err(e) => Err(failed(e.to_string())),
        }
    }
}

#[derive(Clone)]
struct HttpState {
    bus: Arc<ServiceBus>,
    bearer_token: Option<Arc<str>>,
}

/// The HTTP face of ServiceBus (same bearer token as the API, when it has one).
pub fn router(bus: Arc<ServiceBus>, bearer_token: Option<Arc<str>>) -> Router {
    let state = HttpState { bus, bearer_token };
    Router::new()
        .route("/servicebus/{node}/{app}", any(handle_root))
        .route("/servicebus/{node}/{app}/", any(handle_root))
        .route("/servicebus/{node}/{app}/{*path}", any(handle))
        .with_state(state)
}

async fn handle_root(
    State(state): State<HttpState>,
    Path((node, app)): Path<(String, String)>,
    request: Request,
) -> Response {
    serve(state, node, app, String::new(), request).await
}

async fn handle(
    State(state): State<HttpState>,
    Path((node, app, path)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    serve(state, node, app, path, request).await
}

fn authorized(state: &HttpState, request: &Request) -> bool {
    state
        .bearer_token
        .as_deref()
        .is_none_or(|token| replication::api::bearer_matches(request.headers(), token))
}

fn text(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn serve(
    state: HttpState,
    node: String,
    app: String,
    path: String,
    request: Request,
) -> Response {
    if !authorized(&state, &request) {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized".into());
    }
    let (parts, body) = request.into_parts();
    let mut target = format!("/{path}");
    if let Some(query) = parts.uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let headers = parts
        .headers
        .iter()
        // The cloud's credential stays in the cloud.
        .filter(|(name, _)| is_end_to_end(name.as_str()) && *name != header::AUTHORIZATION)
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect();
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BYTES).await else {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"),
        );
    };
    let call = BusRequest {
        app,
        method: parts.method.to_string(),
        path: target,
        headers,
        body,
    };
    match state.bus.call(&node, &call).await {
        Ok(response) => {
            let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = Response::new(Body::from(response.body));
            *out.status_mut() = status;
            for (name, value) in response.headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::from_str(&value),
                ) {
                    out.headers_mut().append(name, value);
                }
            }
            out
        }
        Err(e) => text(e.status(), e.to_string()),
    }
}
