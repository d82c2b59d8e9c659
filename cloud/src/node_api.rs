//! The API as an edge node may use it: calls its MetaServer forwards over the link (writes it
//! cannot make locally, gets of objects it does not hold) are served by the same API code as
//! the embedded server, under node authorization ([`crate::authz`]).
//!
//! Reads are decided by CloudHub before the call is served (its EdgeController knows what is
//! routed where); writes are decided here, at commit, on the object the write would produce,
//! so a forwarded create, update or any kind of patch is judged by its result, like a report.
//! [`dispatch`] takes a call off CloudHub's loop and answers it on the link.

use std::sync::Arc;

use axum::Router;
use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::api::remote::{classify_with, ApiCall, ApiReply};
use replication::api::{rest, ApiError, ApiPolicy, ApiServer, Registry, Resource, Verb};
use replication::{ObjectKey, Store, Versioned, WriteSet};
use tower::ServiceExt;
use transport::IncomingRequest;

use crate::audit::{AuditLog, Auditor};
use crate::authz::{self, Decision};
use crate::metrics::{Metrics, RequestLabels};

pub struct NodeApiPolicy {
    pub node: Arc<str>,
    pub metrics: Arc<Metrics>,
}

impl ApiPolicy for NodeApiPolicy {
    fn admit(&self, resource: &Resource, verb: Verb, _status: bool) -> Result<(), ApiError> {
        match verb {
            // A list was authorized (and subscribed) by CloudHub before it got here.
            Verb::Watch => Err(ApiError::forbidden(format!(
                "node {} may not watch {} through the cloud: its MetaServer serves watches \
                 from the node's cache (a list subscribes the node to the collection)",
                self.node, resource.plural
            ))),
            Verb::Delete => Err(ApiError::forbidden(format!(
                "node {} may not delete {}: nodes delete nothing in the cluster (a pod being \
                 deleted is confirmed by the node running it)",
                self.node, resource.plural
            ))),
            _ => Ok(()),
        }
    }

    fn observe(&self, verb: &str, resource: &str, code: u16) {
        self.metrics
            .api_requests
            .get_or_create(&RequestLabels {
                verb: format!("node-{verb}"),
                resource: resource.to_owned(),
                code,
            })
            .inc();
    }

    fn commit(
        &self,
        store: &Store,
        set: WriteSet,
        resource: &str,
        name: &str,
    ) -> Result<Versioned, ApiError> {
        let Some((key, bytes, expect)) = set.into_single_put() else {
            return Err(ApiError::forbidden("nodes write one object at a time"));
        };
        let parse = |b: &[u8]| serde_json::from_slice::<Object>(b).ok();
        let current = store
            .get(&key)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let current_object = current.as_ref().and_then(|v| parse(&v.object));
        let proposed =
            parse(&bytes).ok_or_else(|| ApiError::internal("the prepared object is not JSON"))?;
        let object = match authz::authorize(
            &self.node,
            &key,
            current_object.as_ref(),
            Some(&proposed),
        ) {
            Ok(Decision::Write(object)) | Ok(Decision::Status(object)) => object,
            Ok(Decision::ConfirmDelete) => {
                return Err(ApiError::forbidden("not a deletion confirmation"))
            }
            Err(refusal) => {
                tracing::warn!(node = %self.node, %key, reason = %refusal.reason, "node API write refused");
                self.metrics.reports_refused.inc();
                return Err(ApiError::forbidden(refusal.to_string()));
            }
        };
        let mut set = WriteSet::new();
        set.put(key, Bytes::from(object::to_stored(object)), expect);
        rest::commit_to_store(store, set, resource, name)
    }
}

/// Serves one forwarded call for `node` and returns the reply to send back.
pub async fn serve(
    store: Arc<Store>,
    registry: Arc<Registry>,
    policy: Arc<NodeApiPolicy>,
    call: ApiCall,
    audit: Option<Arc<AuditLog>>,
) -> ApiReply {
    let node = policy.node.clone();
    let mut router: Router = ApiServer::new(store, policy)
        .with_registry(registry)
        .router();
    if let Some(log) = audit {
        // Kubernetes' name for a node's identity (the Node authorizer's `system:node:NAME`).
        let user: Arc<str> = format!("system:node:{node}").into();
        router = router.layer(axum::middleware::from_fn_with_state(
            Auditor { log, user },
            crate::audit::middleware,
        ));
    }
    match router.oneshot(call.into_request()).await {
        Ok(response) => ApiReply::from_response(response).await,
        Err(never) => match never {},
    }
}

/// A read a node forwarded, for CloudHub to decide before it is served.
pub enum NodeRead<'a> {
    /// A get of one object.
    Object(&'a ObjectKey),
    /// A list of a resource in a namespace (`None`: all namespaces).
    Collection(&'a Resource, Option<&'a str>),
}

/// Answers a call `node`'s MetaServer forwarded (`request`), off the caller's loop. A get or
/// a list is first put to `authorize` (CloudHub's routing knows what the node holds, and
/// subscribes it to what it may read); other verbs are judged by [`NodeApiPolicy`] on their
/// result. A malformed call is answered 400 Bad Request.
pub fn dispatch(
    store: Arc<Store>,
    registry: &Arc<Registry>,
    node: Arc<str>,
    metrics: Arc<Metrics>,
    audit: Option<Arc<AuditLog>>,
    request: IncomingRequest,
    authorize: impl FnOnce(NodeRead<'_>) -> Result<(), ApiError>,
) {
    let header = request.message.to_message().header;
    let decided = ApiCall::from_message(&request.message)
        .map_err(|e| {
            tracing::warn!(%node, error = %e, "malformed request from node");
            ApiError::bad_request(e.to_string())
        })
        .and_then(|call| {
            let uri = call.uri.parse().unwrap_or_default();
            match classify_with(registry, &call.method, &uri) {
                Some(target) if target.verb == Verb::Get => match target.key() {
                    Some(key) => authorize(NodeRead::Object(&key)).map(|()| call),
                    None => Err(ApiError::bad_request("not an object name")),
                },
                Some(target) if target.verb == Verb::List => authorize(NodeRead::Collection(
                    target.resource,
                    target.namespace.as_deref(),
                ))
                .map(|()| call),
                _ => Ok(call),
            }
        });
    let policy = Arc::new(NodeApiPolicy { node, metrics });
    let registry = registry.clone();
    tokio::spawn(async move {
        let reply = match decided {
            Ok(call) => serve(store, registry, policy, call, audit).await,
            Err(error) => ApiReply::error(&error),
        };
        if let Err(e) = request
            .respond(&reply.to_message(&header, "cloudhub"))
            .await
        {
            tracing::debug!(error = %e, "node went away before its reply");
        }
    });
}
