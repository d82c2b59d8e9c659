//! MetaServer: the node's local Kubernetes API on loopback, the same code as the cloud's
//! embedded API (`replication::api`) over the node's cache.
//!
//! resourceVersions here are the cache's own revisions (one increasing number space for
//! objects, lists and watch positions, so lists, watches, resumes and 410s behave exactly as
//! against the cloud); they are not the cloud's numbers. Writes: the status of pods and of this
//! node, written by local clients, is applied to the cache at once and queued upward. Other
//! writes are forwarded to the cloud while it is reachable ([`forward_to_cloud`]), where node
//! authorization decides (a node may write its own Node and Lease, events about itself or its
//! pods, the status of its pods), and refused with 503 while it is not.
//!
//! A list or watch of a collection the node does not hold (ConfigMaps of a namespace, a custom
//! resource) subscribes the node to it first ([`crate::collections`]); offline, such a list
//! is a 503, never the partial list the cache happens to hold.
//!
//! A get of an object the cache does not hold goes to the cloud too while online: the cloud
//! answers and routes the object to the node from then on, so it is cached and kept current.
//! Offline, such a get is a 503 (the node cannot know whether the object exists), never a 404;
//! a cloud that does not answer within [`crate::meta::CLOUD_CALL_TIMEOUT`] is a 504.
//! Such an answer, and a forwarded write's, carries the cloud's resourceVersion (a number of
//! the cloud's space, not this cache's): the same object read from the cache afterwards has
//! the cache's revision.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use replication::api::remote::{classify, ApiCall, ApiReply};
use replication::api::{ApiError, ApiPolicy, Resource, Verb};
use replication::{Precondition, Store, Versioned, WriteSet};

use crate::collections::Collection;
use crate::meta::MetaManager;

/// Middleware in front of the API: sends to the cloud what the cache cannot serve.
pub async fn forward_to_cloud(
    State(meta): State<Arc<MetaManager>>,
    request: Request,
    next: Next,
) -> Response {
    if meta.is_online() && cloud_discovery(request.method(), request.uri().path()) {
        // The cloud knows the custom groups this cache has not seen yet (kubectl finds a
        // resource through discovery before it lists it); offline, or if the call fails, the
        // cache's own discovery answers.
        if let Ok(call) = ApiCall::from_request(clone_get(&request)).await {
            if let Ok(reply) = meta.call_cloud(call).await {
                if reply.code == 200 {
                    return reply.into_response();
                }
            }
        }
    }
    if let Some(collection) = Collection::of(request.method(), request.uri().path()) {
        if !collection.is_local() && !meta.collections().covers(&collection) {
            if !meta.is_online() {
                // Serving the part the cache happens to hold would be a silently wrong list.
                return ApiReply::error(&ApiError::unavailable(format!(
                    "node {} is offline and has not subscribed to {}: the cloud cannot be \
                     asked for them; retry when the node is back online (once listed, a \
                     collection is kept and served offline)",
                    meta.node(),
                    request.uri().path()
                )))
                .into_response();
            }
            let subscribed = meta
                .collections()
                .subscribe(meta.store(), &collection, |call| meta.call_cloud(call))
                .await;
            if let Err(e) = subscribed {
                return ApiReply::error(&e).into_response();
            }
        }
        return next.run(request).await;
    }
    let Some(target) = classify(request.method(), request.uri()) else {
        return next.run(request).await;
    };
    if target.verb.is_write() && local_status_write(target.resource, target.verb, target.status) {
        if let Some(key) = target.key() {
            if matches!(meta.store().get(&key), Ok(None)) {
                return ApiReply::error(&not_bound(&meta, &key)).into_response();
            }
        }
    }
    let forward = match target.verb {
        Verb::Get => target
            .key()
            .is_some_and(|key| matches!(meta.store().get(&key), Ok(None))),
        verb if verb.is_write() => !local_status_write(target.resource, verb, target.status),
        _ => false,
    };
    if !forward {
        return next.run(request).await;
    }
    if !meta.is_online() {
        if target.verb == Verb::Get {
            // The cache does not hold it and the cloud cannot be asked: whether it exists is
            // unknown, which is not a 404 (a client would act on "it does not exist").
            let key = target.key().map(|k| k.to_string()).unwrap_or_default();
            return ApiReply::error(&ApiError::unavailable(format!(
                "node {} is offline: it does not hold {key} and cannot ask the cloud whether \
                 it exists; retry when the node is back online",
                meta.node()
            )))
            .into_response();
        }
        // A write: 503 from EdgePolicy::admit.
        return next.run(request).await;
    }
    let outcome = match ApiCall::from_request(request).await {
        Ok(call) => meta.call_cloud(call).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(reply) => reply.into_response(),
        Err(e) => ApiReply::error(&e).into_response(),
    }
}

/// Discovery paths the cloud answers while online: the group list and the documents of
/// groups that are not built in (custom resources' groups).
fn cloud_discovery(method: &axum::http::Method, path: &str) -> bool {
    if method != axum::http::Method::GET {
        return false;
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["apis"] | ["openapi", "v3"] => true,
        ["apis", group] | ["apis", group, _] | ["openapi", "v3", "apis", group, _] => {
            !replication::api::resources::is_builtin_group(group)
                && *group != replication::api::discovery::METRICS_GROUP
        }
        _ => false,
    }
}

/// A bodiless copy of a GET (discovery requests carry no body).
fn clone_get(request: &Request) -> Request {
    let mut copy = Request::new(axum::body::Body::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Every pod bound to this node, and its own Node, is in the cache: a status write of anything
/// else is another node's, which Kubernetes' Node authorizer forbids (403, not 404, online or
/// offline alike).
fn not_bound(meta: &MetaManager, key: &replication::ObjectKey) -> ApiError {
    let node = meta.node();
    ApiError::forbidden(format!(
        "{} \"{}\" is forbidden: User \"system:node:{node}\" cannot write the status of \
         {key}: no relationship found between node '{node}' and this object (a node writes \
         the status of the pods bound to it and of its own Node)",
        key.kind(),
        key.name()
    ))
}

pub struct EdgePolicy {
    pub meta: Arc<MetaManager>,
}

fn local_status_write(resource: &Resource, verb: Verb, status: bool) -> bool {
    status
        && matches!(verb, Verb::Update | Verb::Patch)
        && matches!(resource.plural, "pods" | "nodes")
}

impl ApiPolicy for EdgePolicy {
    fn admit(&self, resource: &Resource, verb: Verb, status: bool) -> Result<(), ApiError> {
        if !verb.is_write() || local_status_write(resource, verb, status) {
            return Ok(());
        }
        if !self.meta.is_online() {
            return Err(ApiError::unavailable(format!(
                "node {} is offline: the cloud is unreachable, so {} of {} cannot be made \
                 (the status of pods and nodes can be written locally)",
                self.meta.node(),
                verb.as_str(),
                resource.plural
            )));
        }
        // Writes are forwarded while online (forward_to_cloud); this one raced a reconnect.
        Err(ApiError::unavailable(format!(
            "node {} is reconnecting to the cloud; retry the {} of {}",
            self.meta.node(),
            verb.as_str(),
            resource.plural
        )))
    }

    fn commit(
        &self,
        store: &Store,
        set: WriteSet,
        resource: &str,
        name: &str,
    ) -> Result<Versioned, ApiError> {
        let Some((key, object, expect)) = set.into_single_put() else {
            return Err(ApiError::internal(
                "only single status writes are made locally",
            ));
        };
        let current = store
            .get(&key)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| not_bound(&self.meta, &key))?;
        if let Precondition::Version(expected) = expect {
            if expected != current.rv {
                return Err(ApiError::conflict(resource, name));
            }
        }
        self.meta
            .report(key.clone(), object)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        store
            .get(&key)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| ApiError::not_found(resource, name))
    }
}
