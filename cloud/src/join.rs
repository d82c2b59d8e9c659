//! Node join: a node with a valid bootstrap token gets a certificate naming it and its Node
//! object (labelled `node-role.kubernetes.io/edge`). Later connections use that certificate.
//!
//! A name that already has a Node object is refused: a token lets a new node in, it does not let
//! anyone take over an existing node's identity. To re-join a node that lost its disk, delete its
//! Node object first (`kubectl delete node NAME`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::{ObjectKey, Precondition, Store, WriteSet};
use serde_json::json;
use transport::tls::CertificateAuthority;
use transport::{JoinHandler, JoinRequest};

use crate::pki::{self, Token};
use crate::scheduler::EDGE_ROLE_LABEL;

/// How long a node certificate is valid.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct CloudJoin {
    pub data_dir: PathBuf,
    pub store: Arc<Store>,
    pub ca: Arc<CertificateAuthority>,
}

/// The Node object a joining node starts with; the node fills in its status once connected.
pub fn new_node(name: &str) -> Object {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": uuid::Uuid::new_v4().hyphenated().to_string(),
            "creationTimestamp": object::now_rfc3339(),
            "labels": {
                EDGE_ROLE_LABEL: "",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            },
        },
        "spec": {},
        "status": {},
    });
    node.as_object_mut().map(std::mem::take).unwrap_or_default()
}

impl CloudJoin {
    fn admit(&self, request: &JoinRequest) -> Result<Vec<u8>, String> {
        let token = Token::parse(&request.token).map_err(|e| e.to_string())?;
        pki::verify_token(&self.data_dir, &token).map_err(|e| format!("bootstrap token: {e}"))?;
        transport::tls::validate_node_name(&request.node_name).map_err(|e| e.to_string())?;
        let key = ObjectKey::new("nodes", "", &request.node_name).map_err(|e| e.to_string())?;
        let cert = self
            .ca
            .sign_node_csr(&request.csr_der, &request.node_name, NODE_CERT_VALIDITY)
            .map_err(|e| format!("certificate signing request: {e}"))?;
        let mut set = WriteSet::new();
        let node = Bytes::from(object::to_stored(new_node(&request.node_name)));
        set.put(key, node, Precondition::Absent);
        self.store.commit(set).map_err(|e| match e {
            replication::StoreError::AlreadyExists(_) => format!(
                "node {} already joined; to join it again (e.g. after losing its disk), \
                 delete it first: kubectl delete node {}",
                request.node_name, request.node_name
            ),
            other => format!("cannot record the node: {other}"),
        })?;
        Ok(cert.to_vec())
    }
}

impl JoinHandler for CloudJoin {
    fn join(&self, request: JoinRequest, _remote: SocketAddr) -> Result<Vec<u8>, String> {
        self.admit(&request)
    }
}
