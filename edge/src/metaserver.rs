//! MetaServer: the node's local Kubernetes API on loopback, the same code as the cloud's
//! embedded API (`replication::api`) over the node's cache.
//!
//! resourceVersions here are the cache's own revisions (one increasing number space for
//! objects, lists and watch positions, so lists, watches, resumes and 410s behave exactly as
//! against the cloud); they are not the cloud's numbers. Writes: the status of pods and of this
//! node, written by local clients, is applied to the cache at once and queued upward. Other
//! writes are refused: with 503 while the cloud is unreachable, and for now with 501 while it is
//! reachable (forwarding them to the cloud is not built yet: write through the cloud's API).

use std::sync::Arc;

use replication::api::{ApiError, ApiPolicy, Resource, Verb};
use replication::{Precondition, Store, Versioned, WriteSet};

use crate::meta::MetaManager;

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
        Err(ApiError::new(
            501,
            "NotImplemented",
            format!(
                "MetaServer does not forward {} of {} to the cloud yet; use the cloud's API \
                 (the status of pods and nodes can be written here)",
                verb.as_str(),
                resource.plural
            ),
        ))
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
            .ok_or_else(|| ApiError::not_found(resource, name))?;
        if let Precondition::Version(expected) = expect {
            if expected != current.revision {
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
