//! The Kubernetes-compatible HTTP API over a [`Store`]: the cloud's embedded API server and the
//! edge's MetaServer serve this same code.
//!
//! - [`resources`]: the served kinds; [`discovery`]: `/version`, `/api`, `/apis`, OpenAPI;
//! - [`object`]: stored form, defaults, validation; [`selector`], [`patch`], [`table`];
//! - [`rest`]: get/list/create/update/patch/delete; [`watch`]: the watch stream;
//! - [`options`]: the checks of a list's or watch's `resourceVersionMatch`/`sendInitialEvents`;
//! - [`remote`]: API calls carried over a node's link (MetaServer → cloud);
//! - this module: URL parsing and dispatch ([`ApiServer::router`]).
//!
//! What the store keeps is the object without `metadata.resourceVersion`; the version is the
//! store's (in a version-assigning store, a change's resourceVersion is its revision, so a list's
//! resourceVersion, an object's and a watch position are one number space).

pub mod apply;
pub mod auth;
pub mod crd;
pub mod devices;
pub mod discovery;
pub mod object;
pub mod options;
pub mod patch;
pub mod protobuf;
pub mod remote;
pub mod resources;
pub mod rest;
pub mod schema;
pub mod selector;
pub mod status;
pub mod strategy;
pub mod table;
pub mod watch;
pub mod workloads;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;

use crate::store::{Store, Versioned, WriteSet};
use object::Object;
pub use resources::{Registry, Resource};
pub use status::{ApiError, StatusReason};

/// Largest request body accepted (the apiserver's limit is 3 MiB per object).
pub const MAX_BODY_BYTES: usize = 3 << 20;

/// The API verbs, for policy decisions and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `get`: one object.
    Get,
    /// `list`: a collection.
    List,
    /// `watch`: a collection's changes (`?watch=true` or a `/watch/` path).
    Watch,
    /// `create`: `POST` to a collection.
    Create,
    /// `update`: `PUT` of one object.
    Update,
    /// `patch`: `PATCH` of one object.
    Patch,
    /// `delete`: `DELETE` of one object.
    Delete,
}

impl Verb {
    /// The verb as Kubernetes' RBAC and audit name it (`get`, `list`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }

    /// Whether the verb changes state (create, update, patch, delete).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Verb::Create | Verb::Update | Verb::Patch | Verb::Delete
        )
    }
}

/// What differs between the places the API is served (the cloud, an edge node).
pub trait ApiPolicy: Send + Sync + 'static {
    /// Refuses a request before it is served (authorization, an offline edge...).
    ///
    /// `status`: the request is for the `/status` subresource. The default admits everything.
    ///
    /// # Errors
    /// The error to answer with instead (403 `Forbidden`, 503 `ServiceUnavailable`, ...).
    fn admit(&self, _resource: &Resource, _verb: Verb, _status: bool) -> Result<(), ApiError> {
        Ok(())
    }

    /// Whether deleting this object only marks it (deletionTimestamp) and waits for someone (the
    /// node running a pod) to remove it.
    fn graceful_delete(&self, _resource: &Resource, _object: &Object) -> bool {
        false
    }

    /// Called once per request with its outcome (metrics).
    fn observe(&self, _verb: &str, _resource: &str, _code: u16) {}

    /// Commits an admitted write and returns the object's state after it. The default writes
    /// the store; an edge node applies status writes locally and queues them for the cloud.
    ///
    /// # Errors
    /// The error to answer with: the default maps [`StoreError`](crate::StoreError)s as
    /// [`ApiError::from_store`] does, and a commit that changed nothing is a 500.
    fn commit(
        &self,
        store: &Store,
        set: WriteSet,
        resource: &str,
        name: &str,
    ) -> Result<Versioned, ApiError> {
        rest::commit_to_store(store, set, resource, name)
    }
}

/// The default policy: everything allowed, deletes immediate.
pub struct OpenPolicy;

impl ApiPolicy for OpenPolicy {}

/// The API server: a store, a policy and an optional bearer token.
#[derive(Clone)]
pub struct ApiServer {
    pub(crate) store: Arc<Store>,
    pub(crate) policy: Arc<dyn ApiPolicy>,
    /// The served kinds: built-in and the store's CustomResourceDefinitions.
    pub(crate) registry: Arc<Registry>,
    bearer_token: Option<Arc<str>>,
}

/// Where a request points, parsed once from its path (kube-apiserver's `RequestInfo`; the verb
/// comes from the method and query, see `verb_of`).
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    pub resource: &'static Resource,
    /// `None`: all namespaces (or a cluster-scoped resource).
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub status: bool,
    /// The `/scale` subresource (an `autoscaling/v1` `Scale`).
    pub scale: bool,
    /// The legacy `/watch/` path prefix.
    pub watch_path: bool,
}

pub(crate) type Query = HashMap<String, String>;

/// What a request path names: a document served as is, a resource, or nothing.
enum PathMatch {
    Json(Value),
    Resource(RequestInfo),
    NotFound,
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    bytes_response(code, body)
}

pub(crate) fn bytes_response(code: StatusCode, body: Vec<u8>) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn error_response(error: &ApiError) -> Response {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &error.to_status())
}

/// Splits `/api/v1/...` and `/apis/{group}/{version}/...` into a route.
fn route(path: &str, registry: &Registry) -> PathMatch {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segments.as_slice() {
        ["version"] => return PathMatch::Json(discovery::version()),
        ["api"] => return PathMatch::Json(discovery::core_versions()),
        ["apis"] => return PathMatch::Json(discovery::groups(registry)),
        ["apis", group] => {
            return discovery::group(registry, group).map_or(PathMatch::NotFound, PathMatch::Json)
        }
        ["openapi", "v3"] => return PathMatch::Json(discovery::openapi_index(registry)),
        ["openapi", "v3", rest @ ..] => {
            return discovery::openapi_document(registry, &rest.join("/"))
                .map_or(PathMatch::NotFound, PathMatch::Json)
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return PathMatch::NotFound,
    };
    if rest.is_empty() {
        return discovery::resource_list(registry, group, version)
            .map_or(PathMatch::NotFound, PathMatch::Json);
    }
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    let find = |plural: &str| registry.find(group, version, plural);
    let target =
        |resource: &'static Resource, ns: Option<&str>, name: Option<&str>, status| RequestInfo {
            resource,
            namespace: ns.map(str::to_owned),
            name: name.map(str::to_owned),
            status,
            scale: false,
            watch_path,
        };
    let namespaced = |plural: &str| find(plural).filter(|r| r.namespaced);
    let cluster = |plural: &str| find(plural).filter(|r| !r.namespaced);
    let found = match rest {
        // A namespace object itself (core group): /namespaces/{name}[/status].
        ["namespaces", name] if group.is_empty() => {
            cluster("namespaces").map(|r| target(r, None, Some(name), false))
        }
        ["namespaces", name, "status"] if group.is_empty() => {
            cluster("namespaces").map(|r| target(r, None, Some(name), true))
        }
        ["namespaces", ns, plural] => namespaced(plural).map(|r| target(r, Some(ns), None, false)),
        ["namespaces", ns, plural, name] => {
            namespaced(plural).map(|r| target(r, Some(ns), Some(name), false))
        }
        ["namespaces", ns, plural, name, "status"] => namespaced(plural)
            .filter(|r| r.status)
            .map(|r| target(r, Some(ns), Some(name), true)),
        ["namespaces", ns, plural, name, "scale"] => {
            namespaced(plural).filter(|r| r.scale).map(|r| RequestInfo {
                scale: true,
                ..target(r, Some(ns), Some(name), false)
            })
        }
        [plural] => find(plural).map(|r| target(r, None, None, false)),
        [plural, name] => cluster(plural).map(|r| target(r, None, Some(name), false)),
        [plural, name, "status"] => cluster(plural)
            .filter(|r| r.status)
            .map(|r| target(r, None, Some(name), true)),
        _ => None,
    };
    found.map_or(PathMatch::NotFound, PathMatch::Resource)
}

fn verb_of(method: &Method, target: &RequestInfo, query: &Query) -> Option<Verb> {
    let watch = target.watch_path || query.get("watch").is_some_and(|w| w == "true" || w == "1");
    Some(match (method.as_str(), target.name.is_some()) {
        ("GET", _) if watch => Verb::Watch,
        ("GET", true) => Verb::Get,
        ("GET", false) => Verb::List,
        ("POST", false) => Verb::Create,
        ("PUT", true) => Verb::Update,
        ("PATCH", true) => Verb::Patch,
        ("DELETE", true) => Verb::Delete,
        _ => return None,
    })
}

impl ApiServer {
    /// An API over `store`, deciding with `policy`, without authentication.
    pub fn new(store: Arc<Store>, policy: Arc<dyn ApiPolicy>) -> Self {
        ApiServer {
            registry: Arc::new(Registry::with_store(store.clone())),
            store,
            policy,
            bearer_token: None,
        }
    }

    /// Serves the kinds of `registry` (one shared by several servers over the same store).
    pub fn with_registry(mut self, registry: Arc<Registry>) -> Self {
        self.registry = registry;
        self
    }

    /// The kinds it serves (built-in and custom).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Requires `Authorization: Bearer <token>` on every request.
    pub fn with_bearer_token(mut self, token: impl Into<Arc<str>>) -> Self {
        self.bearer_token = Some(token.into());
        self
    }

    /// The store it serves.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// An axum router serving the whole API (`/api`, `/apis`, `/version`, `/openapi/v3`,
    /// `/healthz`, ...) from one fallback handler.
    pub fn router(self) -> Router {
        Router::new().fallback(dispatch).with_state(self)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        self.bearer_token
            .as_deref()
            .is_none_or(|token| bearer_matches(headers, token))
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>`, compared in constant time (the
/// token is a credential).
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|p| {
            bool::from(subtle::ConstantTimeEq::ct_eq(
                p.as_bytes(),
                token.as_bytes(),
            ))
        })
}

async fn dispatch(State(server): State<ApiServer>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    if !server.authorized(&parts.headers) {
        server.policy.observe("unknown", "", 401);
        return error_response(&ApiError::unauthorized());
    }
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => return (StatusCode::OK, "ok").into_response(),
        "/openapi/v2" | "/swagger.json" => return discovery::openapi_v2(&parts.headers),
        _ => {}
    }
    if auth::is_review(&path) {
        if parts.method != Method::POST {
            return error_response(&ApiError::method_not_allowed(
                "reviews are created with POST",
            ));
        }
        let protobuf = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with(protobuf::CONTENT_TYPE));
        let reply = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
            Ok(bytes) => auth::review(
                server.policy.as_ref(),
                &server.registry,
                &path,
                &bytes,
                protobuf,
            ),
            Err(_) => Err(ApiError::too_large(format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes"
            ))),
        };
        let code = reply.as_ref().map_or_else(|e| e.code, |_| 201);
        server.policy.observe("create", "reviews", code);
        return match reply {
            Ok(value) => json_response(StatusCode::CREATED, &value),
            Err(e) => error_response(&e),
        };
    }
    let target = match route(&path, &server.registry) {
        PathMatch::Json(value) => {
            if parts.method != Method::GET {
                return error_response(&ApiError::method_not_allowed("discovery is read-only"));
            }
            return json_response(StatusCode::OK, &value);
        }
        PathMatch::NotFound => {
            server.policy.observe("unknown", "", 404);
            return error_response(&ApiError::new(
                404,
                StatusReason::NotFound,
                format!("the server could not find the requested resource ({path})"),
            ));
        }
        PathMatch::Resource(target) => target,
    };
    let query: Query = axum::extract::Query::<Query>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let Some(verb) = verb_of(&parts.method, &target, &query) else {
        return error_response(&ApiError::method_not_allowed(format!(
            "{} is not supported on {path}",
            parts.method
        )));
    };
    let resource = target.resource.store_kind;
    if let Err(e) = server.policy.admit(target.resource, verb, target.status) {
        server.policy.observe(verb.as_str(), resource, e.code);
        return error_response(&e);
    }
    let body = if verb.is_write() {
        match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
            Ok(bytes) => bytes,
            Err(_) => {
                let e = ApiError::too_large(format!(
                    "the request body is larger than {MAX_BODY_BYTES} bytes"
                ));
                server.policy.observe(verb.as_str(), resource, e.code);
                return error_response(&e);
            }
        }
    } else {
        Bytes::new()
    };
    let request = rest::ApiRequest {
        info: target,
        verb,
        query,
        headers: parts.headers,
        body,
    };
    let response = match verb {
        _ if request.info.scale => rest::serve_scale(&server, request).await,
        Verb::Watch => watch::serve(&server, request).await,
        _ => rest::serve(&server, request).await,
    };
    let response = match response {
        Ok(response) => response,
        Err(e) => error_response(&e),
    };
    server
        .policy
        .observe(verb.as_str(), resource, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> PathMatch {
        super::route(path, &Registry::builtin())
    }

    fn target(path: &str) -> RequestInfo {
        match route(path) {
            PathMatch::Resource(t) => t,
            _ => panic!("{path} is not a resource"),
        }
    }

    #[test]
    fn routes() {
        let t = target("/api/v1/namespaces/default/pods/p/status");
        assert_eq!(
            (
                t.resource.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.status
            ),
            ("pods", Some("default"), Some("p"), true)
        );
        let t = target("/api/v1/namespaces/kube-system");
        assert_eq!(
            (t.resource.plural, t.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let t = target("/api/v1/pods");
        assert_eq!((t.resource.plural, t.namespace.as_deref()), ("pods", None));
        let t = target("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1");
        assert_eq!(t.resource.kind, "Lease");
        let t = target("/api/v1/nodes/n1/status");
        assert!(t.status);
        let t = target("/apis/apps/v1/namespaces/default/deployments/web/scale");
        assert!(t.scale && !t.status);
        assert_eq!(t.resource.kind, "Deployment");
        assert!(matches!(
            route("/apis/apps/v1/namespaces/default/daemonsets/d/scale"),
            PathMatch::NotFound
        ));
        let t = target("/api/v1/watch/namespaces/default/pods");
        assert!(t.watch_path);
        assert!(matches!(
            route("/api/v1/nodes/n1/nope"),
            PathMatch::NotFound
        ));
        assert!(matches!(
            route("/api/v1/namespaces/default/nodes"),
            PathMatch::NotFound
        ));
        assert!(matches!(
            route("/api/v1/configmaps/x/status"),
            PathMatch::NotFound
        ));
        assert!(matches!(route("/api/v1"), PathMatch::Json(_)));
    }
}
