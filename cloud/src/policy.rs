//! The embedded API's policy: metrics for every request, and graceful deletion of pods bound to
//! a node that is connected (the node stops the pod, then confirms the delete).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use replication::api::object::Object;
use replication::api::{ApiError, ApiPolicy, Resource, Verb};
use serde_json::Value;

use crate::metrics::{Metrics, RequestLabels};

/// The nodes with a live link; CloudHub keeps it current.
#[derive(Default)]
pub struct ConnectedNodes(RwLock<HashSet<String>>);

impl ConnectedNodes {
    pub fn insert(&self, node: &str) {
        self.0.write().expect("lock").insert(node.to_owned());
    }

    pub fn remove(&self, node: &str) {
        self.0.write().expect("lock").remove(node);
    }

    pub fn contains(&self, node: &str) -> bool {
        self.0.read().expect("lock").contains(node)
    }

    pub fn len(&self) -> usize {
        self.0.read().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct CloudPolicy {
    pub metrics: Arc<Metrics>,
    pub connected: Arc<ConnectedNodes>,
    /// Set when a real cluster is the source (`--kubeconfig`): this API is a read-only view.
    pub mirror_of: Option<String>,
}

impl ApiPolicy for CloudPolicy {
    fn admit(&self, _resource: &Resource, verb: Verb, _status: bool) -> Result<(), ApiError> {
        match (&self.mirror_of, verb) {
            (Some(cluster), Verb::Create | Verb::Update | Verb::Patch | Verb::Delete) => {
                Err(ApiError::new(
                    405,
                    replication::api::StatusReason::MethodNotAllowed,
                    format!("cloudcore mirrors {cluster} and serves it read-only: write to that cluster"),
                ))
            }
            _ => Ok(()),
        }
    }

    fn graceful_delete(&self, resource: &Resource, object: &Object) -> bool {
        if resource.plural != "pods" {
            return false;
        }
        object
            .get("spec")
            .and_then(|s| s.get("nodeName"))
            .and_then(Value::as_str)
            .is_some_and(|node| self.connected.contains(node))
    }

    fn observe(&self, verb: &str, resource: &str, code: u16) {
        self.metrics
            .api_requests
            .get_or_create(&RequestLabels {
                verb: verb.to_owned(),
                resource: resource.to_owned(),
                code,
            })
            .inc();
    }
}
