//! Requests for a node held by another replica (several cloudcores on one etcd): `kubectl
//! logs|exec|attach|port-forward` of a pod, `kubectl top node NODE` and ServiceBus calls need
//! the node's link, which only the replica holding it has ([`crate::linkclaim`]). A replica
//! that does not hold the node forwards such a request, as is, to the holder's API (the URL in
//! the claim), upgrades (WebSocket, SPDY) included, and relays the answer. The client's
//! `Authorization` goes along: replicas share their API token (`--api-token-file`).
//!
//! Forwarded once at most (`X-Kedge-Forwarded`): a claim that names a replica which does not
//! hold the node either ends there with its own answer (503).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::TokioIo;
use replication::Store;
use serde_json::Value;

use crate::policy::ConnectedNodes;

/// The header a forwarded request carries.
pub const FORWARDED: &str = "x-kedge-forwarded";
/// The claim's annotation with its replica's API URL.
pub const API_URL_ANNOTATION: &str = "kedge.io/api-url";

/// What the middleware needs: the store (pods, claims), which nodes are connected here, and
/// this replica's name.
#[derive(Clone)]
pub struct Forwarder {
    /// The replica's store: pods (their node) and link claims (the node's holder).
    pub store: Arc<Store>,
    /// The nodes connected to this replica (served here, never forwarded).
    pub connected: Arc<ConnectedNodes>,
    /// This replica's identity, as its own claims name it.
    pub replica: String,
    /// TLS to replicas whose API is HTTPS (certificates of the cluster CA).
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// The node a node-affine request is for: a pod's (its streams), a node's metrics, a
/// ServiceBus call's.
fn node_of(store: &Store, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, "log" | "exec" | "attach" | "portforward"] => {
            let key = replication::ObjectKey::new("pods", ns, name).ok()?;
            let pod: Value = serde_json::from_slice(&store.get(&key).ok()??.object).ok()?;
            Some(pod.pointer("/spec/nodeName")?.as_str()?.to_owned())
        }
        ["apis", "metrics.k8s.io", "v1beta1", "nodes", name] => Some((*name).to_owned()),
        ["servicebus", node, ..] => Some((*node).to_owned()),
        _ => None,
    }
}

/// The API URL of the replica that holds `node`'s link, when that is another replica.
fn holder_url(store: &Store, node: &str, me: &str) -> Option<String> {
    let key = crate::linkclaim::key(node)?;
    let claim: Value = serde_json::from_slice(&store.get(&key).ok()??.object).ok()?;
    let holder = claim.pointer("/spec/holderIdentity")?.as_str()?;
    if holder == me {
        return None;
    }
    claim
        .pointer("/metadata/annotations")?
        .get(API_URL_ANNOTATION)?
        .as_str()
        .map(str::to_owned)
}

impl Forwarder {
    /// The API URLs of the other replicas that hold nodes not connected here (from the link
    /// claims), each once: where a list over every node (`kubectl top nodes`) must ask too.
    pub fn other_holders(&self) -> Vec<String> {
        let Ok(range) = replication::KeyRange::namespace("leases", crate::linkclaim::NAMESPACE)
        else {
            return Vec::new();
        };
        let mut urls = std::collections::BTreeSet::new();
        for (key, held) in self.store.scan(&range).filter_map(Result::ok) {
            let Some(node) = key.name().strip_prefix(crate::linkclaim::PREFIX) else {
                continue;
            };
            if self.connected.contains(node) {
                continue;
            }
            let Ok(claim) = serde_json::from_slice::<Value>(&held.object) else {
                continue;
            };
            let holder = claim
                .pointer("/spec/holderIdentity")
                .and_then(Value::as_str);
            if holder.is_none_or(|h| h.is_empty() || h == self.replica) {
                continue;
            }
            if let Some(url) = claim
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(API_URL_ANNOTATION))
                .and_then(Value::as_str)
            {
                urls.insert(url.to_owned());
            }
        }
        urls.into_iter().collect()
    }

    /// GETs `path_and_query` from the replica at `url` as a forwarded request (answered with
    /// what that replica holds itself), with the client's `authorization`; its JSON body.
    ///
    /// # Errors
    /// The replica cannot be reached within `timeout`, answers other than 200, or not JSON.
    pub async fn get_json(
        &self,
        url: &str,
        path_and_query: &str,
        authorization: Option<&HeaderValue>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Value> {
        let mut request = Request::builder().uri(path_and_query);
        if let Some(authorization) = authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let request = request.body(Body::empty())?;
        let response = tokio::time::timeout(timeout, async {
            let response = forward(self, url, request).await?;
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 64 << 20).await?;
            anyhow::ensure!(status == StatusCode::OK, "{url} answered {status}");
            Ok(serde_json::from_slice(&body)?)
        })
        .await;
        response.map_err(|_| anyhow::anyhow!("{url} did not answer within {timeout:?}"))?
    }
}

/// The middleware: node-affine requests for nodes held elsewhere go there.
pub async fn middleware(
    State(forwarder): State<Forwarder>,
    request: Request,
    next: Next,
) -> Response {
    if request.headers().contains_key(FORWARDED) {
        return next.run(request).await;
    }
    let target = node_of(&forwarder.store, request.uri().path())
        .filter(|node| !forwarder.connected.contains(node))
        .and_then(|node| holder_url(&forwarder.store, &node, &forwarder.replica));
    match target {
        Some(url) => match forward(&forwarder, &url, request).await {
            Ok(response) => response,
            Err(e) => {
                replication::api::remote::ApiReply::error(&replication::api::ApiError::unavailable(
                    format!("the replica holding the node ({url}) cannot be reached: {e}"),
                ))
                .into_response()
            }
        },
        None => next.run(request).await,
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn forward(
    forwarder: &Forwarder,
    url: &str,
    mut request: Request,
) -> anyhow::Result<Response> {
    let (https, authority) = match url.split_once("://") {
        Some(("https", rest)) => (true, rest.trim_end_matches('/')),
        Some(("http", rest)) => (false, rest.trim_end_matches('/')),
        _ => anyhow::bail!("not an http(s) URL: {url}"),
    };
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(authority),
    )
    .await??;
    let io: Box<dyn Io> = if https {
        let tls = forwarder
            .tls
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no TLS client configured"))?;
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
        Box::new(tls.connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let upgrading = request.headers().contains_key(header::UPGRADE);
    let downstream = upgrading.then(|| hyper::upgrade::on(&mut request));
    request
        .headers_mut()
        .insert(FORWARDED, HeaderValue::from_static("1"));
    if let Ok(host) = HeaderValue::from_str(authority) {
        request.headers_mut().insert(header::HOST, host);
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "forwarded connection ended");
        }
    });
    let mut response = sender.send_request(request).await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut response);
        if let Some(downstream) = downstream {
            tokio::spawn(async move {
                let (Ok(upstream), Ok(downstream)) = (upstream.await, downstream.await) else {
                    return;
                };
                let (mut up, mut down) = (TokioIo::new(upstream), TokioIo::new(downstream));
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    }
    Ok(response.map(Body::new))
}
