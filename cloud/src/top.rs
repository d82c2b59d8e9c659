//! The Metrics API for `kubectl top` (`metrics.k8s.io/v1beta1` `NodeMetrics` and
//! `PodMetrics`, as metrics-server serves them), on the embedded API's address.
//!
//! Usage is measured by each node (`edge::usage`) and asked for when a client asks
//! (`transport::usage`: one request stream per connected node, all nodes at once, answers
//! kept [`FRESH`] so that `kubectl top node` and `kubectl top pod` in a row ask once). A node
//! that is not connected, or does not answer within [`ASK_TIMEOUT`], has no metrics: kubectl
//! shows `<unknown>` for it, as for a node metrics-server could not scrape.
//!
//! Paths: `/apis/metrics.k8s.io/v1beta1/nodes[/{name}]`,
//! `/apis/metrics.k8s.io/v1beta1/pods`, `.../namespaces/{namespace}/pods[/{name}]`; lists take
//! `labelSelector` (pod labels are copied from the pods, as metrics-server does). Errors are
//! Kubernetes `Status` objects (404 for a node or pod without metrics).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use replication::api::remote::ApiReply;
use replication::api::selector::LabelSelector;
use replication::api::ApiError;
use replication::{KeyRange, ObjectKey, Store};
use serde_json::Value;
use transport::usage::{self, UsageReport};

use crate::servicebus::ServiceBus;

/// How long a node's answer serves later queries.
pub const FRESH: Duration = Duration::from_secs(10);
/// How long a node may take to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct TopState {
    store: Arc<Store>,
    bus: Arc<ServiceBus>,
    bearer_token: Option<Arc<str>>,
    answers: Arc<Mutex<HashMap<String, (Instant, UsageReport)>>>,
    /// With several replicas: the other replicas, asked for the nodes they hold.
    peers: Option<crate::forward::Forwarder>,
}

/// The Metrics API's routes (same bearer token as the API, when it has one). With `peers`
/// (several replicas on one store), lists also hold what the other replicas answer for the
/// nodes connected to them.
pub fn router(
    store: Arc<Store>,
    bus: Arc<ServiceBus>,
    bearer_token: Option<Arc<str>>,
    peers: Option<crate::forward::Forwarder>,
) -> Router {
    const BASE: &str = "/apis/metrics.k8s.io/v1beta1";
    Router::new()
        .route(&format!("{BASE}/nodes"), get(nodes))
        .route(&format!("{BASE}/nodes/{{name}}"), get(node))
        .route(&format!("{BASE}/pods"), get(all_pods))
        .route(
            &format!("{BASE}/namespaces/{{namespace}}/pods"),
            get(namespace_pods),
        )
        .route(
            &format!("{BASE}/namespaces/{{namespace}}/pods/{{name}}"),
            get(pod),
        )
        .with_state(TopState {
            store,
            bus,
            bearer_token,
            answers: Arc::default(),
            peers,
        })
}

/// Asks `node` for its usage now: `None` when it is not connected, does not answer within
/// [`ASK_TIMEOUT`], or answers something unreadable.
pub async fn ask(bus: &ServiceBus, node: &str) -> Option<UsageReport> {
    let link = bus.link(node)?;
    let answer = link
        .request_within(&usage::request(), ASK_TIMEOUT)
        .await
        .ok()?;
    serde_json::from_slice(&answer.content()).ok()
}

fn json(value: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    ApiReply::error(&e).into_response()
}

impl TopState {
    /// The refusal of a request without the API's bearer token, if it has one.
    fn refused(&self, headers: &HeaderMap) -> Option<Response> {
        match self.bearer_token.as_deref() {
            Some(token) if !replication::api::bearer_matches(headers, token) => {
                Some(error(ApiError::unauthorized()))
            }
            _ => None,
        }
    }

    /// The node names the API holds.
    fn node_names(&self) -> Vec<String> {
        let Ok(range) = KeyRange::kind("nodes") else {
            return Vec::new();
        };
        self.store
            .scan(&range)
            .filter_map(|item| item.ok())
            .map(|(key, _)| key.name().to_owned())
            .collect()
    }

    /// Each connected node's report (asked for now, or one younger than [`FRESH`]).
    async fn reports(&self, only: Option<&str>) -> Vec<(String, UsageReport)> {
        let names: Vec<String> = match only {
            Some(name) => vec![name.to_owned()],
            None => self.node_names(),
        };
        let asks = names.into_iter().map(|node| async move {
            let fresh = self
                .answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&node)
                .filter(|(at, _)| at.elapsed() < FRESH)
                .map(|(_, report)| report.clone());
            if let Some(report) = fresh {
                return Some((node, report));
            }
            let report = ask(&self.bus, &node).await?;
            self.answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.clone(), (Instant::now(), report.clone()));
            Some((node, report))
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The list items the other replicas answer for `uri` (the same list), for the nodes they
    /// hold; none when this request was itself forwarded or there are no other replicas. A
    /// replica that does not answer within [`ASK_TIMEOUT`] is left out, as a node would be.
    async fn other_replicas_items(&self, headers: &HeaderMap, uri: &Uri) -> Vec<Value> {
        let Some(peers) = &self.peers else {
            return Vec::new();
        };
        if headers.contains_key(crate::forward::FORWARDED) {
            return Vec::new();
        }
        let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
        let asks = peers.other_holders().into_iter().map(|url| async move {
            let authorization = headers.get(header::AUTHORIZATION);
            match peers
                .get_json(&url, path, authorization, ASK_TIMEOUT + Duration::from_secs(1))
                .await
            {
                Ok(mut list) => match list.get_mut("items").map(Value::take) {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                },
                Err(e) => {
                    tracing::warn!(replica = %url, error = format!("{e:#}"), "metrics from another replica");
                    Vec::new()
                }
            }
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    fn pod_labels(&self, namespace: &str, name: &str) -> Option<Value> {
        let key = ObjectKey::new("pods", namespace, name).ok()?;
        let held = self.store.get(&key).ok()??;
        let pod: Value = serde_json::from_slice(&held.object).ok()?;
        pod.get("metadata")?.get("labels").cloned()
    }
}

fn label_selector(query: Option<&str>) -> Result<Option<LabelSelector>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("the query is malformed: {e}")))?;
    pairs
        .into_iter()
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| LabelSelector::parse(&v))
        .transpose()
}

/// Adds the `more` items whose namespace and name `items` does not hold yet (a node that
/// moved between replicas may be answered by both).
fn merge(items: &mut Vec<Value>, more: Vec<Value>) {
    let id = |item: &Value| {
        let meta = item.get("metadata");
        let field = |f: &str| {
            meta.and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        (field("namespace"), field("name"))
    };
    let mut held: std::collections::HashSet<(String, String)> = items.iter().map(id).collect();
    for item in more {
        if held.insert(id(&item)) {
            items.push(item);
        }
    }
}

async fn nodes(State(state): State<TopState>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(refused) = state.refused(&headers) {
        return refused;
    }
    let mut items = state
        .reports(None)
        .await
        .iter()
        .map(|(node, report)| usage::node_metrics(node, report))
        .collect();
    merge(&mut items, state.other_replicas_items(&headers, &uri).await);
    json(usage::list("NodeMetricsList", items))
}

async fn node(
    State(state): State<TopState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = state.refused(&headers) {
        return refused;
    }
    match state.reports(Some(&name)).await.first() {
        Some((node, report)) => json(usage::node_metrics(node, report)),
        None => error(ApiError::not_found("nodes.metrics.k8s.io", &name)),
    }
}

async fn pod_list(
    state: &TopState,
    headers: &HeaderMap,
    uri: &Uri,
    namespace: Option<&str>,
    query: Option<&str>,
) -> Response {
    if let Some(refused) = state.refused(headers) {
        return refused;
    }
    let selector = match label_selector(query) {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let mut items = Vec::new();
    for (_, report) in state.reports(None).await {
        for p in &report.pods {
            if namespace.is_some_and(|ns| p.namespace != ns) {
                continue;
            }
            let labels = state.pod_labels(&p.namespace, &p.name);
            if let Some(selector) = &selector {
                if !selector.matches_labels(labels.as_ref().and_then(Value::as_object)) {
                    continue;
                }
            }
            items.push(usage::pod_metrics(p, &report, labels.as_ref()));
        }
    }
    merge(&mut items, state.other_replicas_items(headers, uri).await);
    json(usage::list("PodMetricsList", items))
}

async fn all_pods(
    State(state): State<TopState>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    pod_list(&state, &headers, &uri, None, query.as_deref()).await
}

async fn namespace_pods(
    State(state): State<TopState>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    pod_list(&state, &headers, &uri, Some(&namespace), query.as_deref()).await
}

async fn pod(
    State(state): State<TopState>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = state.refused(&headers) {
        return refused;
    }
    // The pod's node, if it is bound: only that node is asked.
    let node = ObjectKey::new("pods", &namespace, &name)
        .ok()
        .and_then(|key| state.store.get(&key).ok().flatten())
        .and_then(|held| serde_json::from_slice::<Value>(&held.object).ok())
        .and_then(|pod| {
            pod.get("spec")?
                .get("nodeName")?
                .as_str()
                .map(str::to_owned)
        });
    let Some(node) = node else {
        return error(ApiError::not_found("pods.metrics.k8s.io", &name));
    };
    for (_, report) in state.reports(Some(&node)).await {
        if let Some(p) = report
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
        {
            let labels = state.pod_labels(&namespace, &name);
            return json(usage::pod_metrics(p, &report, labels.as_ref()));
        }
    }
    error(ApiError::not_found("pods.metrics.k8s.io", &name))
}
