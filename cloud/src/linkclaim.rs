//! Which replica holds a node's link, when several cloudcores share one store: the replica that
//! accepts a node's connection records a claim, a `coordination.k8s.io/v1` Lease
//! `kube-system/kedge-link-NODE` (`holderIdentity`: the replica, `acquireTime`: when), and a
//! replica that sees another's newer claim closes its own connection of that node. So across
//! replicas, as within one, the newer connection wins: a node's stale connection on a replica
//! it left ends at once instead of at the link's idle timeout, and of two processes with one
//! node's certificate on two replicas, the older is told it was replaced.
//!
//! "Newer" is the store's order (etcd's revisions), not clocks: a replica ignores the claims
//! committed before its own for the connection it holds.

use bytes::Bytes;
use replication::api::object;
use replication::{ObjectKey, Precondition, Revision, SharedChange, WriteSet};
use serde_json::{json, Value};

/// The claims' namespace.
pub const NAMESPACE: &str = "kube-system";
/// A claim's name is this prefix and the node's name.
pub const PREFIX: &str = "kedge-link-";
/// The label every claim carries (its value: the node's name).
pub const NODE_LABEL: &str = "kedge.io/node";

/// The claim of `node`'s link; `None` when the name would be longer than an object's name
/// may be (253 characters, a DNS subdomain).
pub fn key(node: &str) -> Option<ObjectKey> {
    let name = format!("{PREFIX}{node}");
    if name.len() > 253 {
        return None;
    }
    ObjectKey::new("leases", NAMESPACE, &name).ok()
}

/// This replica, as its claims name it.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Its name (the leader election's identity).
    pub identity: String,
    /// Where other replicas reach its API ([`crate::forward`]).
    pub api_url: String,
}

/// The write that claims `node`'s link for `replica`, now.
pub fn claim(node: &str, replica: &Replica) -> Option<WriteSet> {
    let key = key(node)?;
    let now = object::now_micro_rfc3339();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": key.name(), "namespace": NAMESPACE,
                     "uid": uuid::Uuid::new_v4().to_string(),
                     "creationTimestamp": object::now_rfc3339(),
                     "labels": {NODE_LABEL: node},
                     "annotations": {crate::forward::API_URL_ANNOTATION: replica.api_url}},
        "spec": {"holderIdentity": replica.identity, "acquireTime": now, "renewTime": now},
    });
    let Value::Object(map) = lease else {
        unreachable!("a JSON object")
    };
    let mut set = WriteSet::new();
    set.put(key, Bytes::from(object::to_stored(map)), Precondition::None);
    Some(set)
}

/// The node and revision of a claim by another replica than `replica`, if `change` is one.
pub fn foreign(change: &SharedChange, replica: &str) -> Option<(String, Revision)> {
    let key = &change.key;
    if change.is_delete() || key.kind() != "leases" || key.namespace() != NAMESPACE {
        return None;
    }
    let node = key.name().strip_prefix(PREFIX)?;
    let lease: Value = serde_json::from_slice(&change.object).ok()?;
    let holder = lease.pointer("/spec/holderIdentity")?.as_str()?;
    (holder != replica).then(|| (node.to_owned(), change.revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::{Store, StoreConfig};

    #[test]
    fn a_claim_by_another_replica_is_seen_as_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let replica = |identity: &str| Replica {
            identity: identity.to_owned(),
            api_url: format!("http://{identity}:6080"),
        };
        let mine = store.commit(claim("n1", &replica("a")).unwrap()).unwrap();
        assert_eq!(foreign(&mine[0], "a"), None);
        let theirs = store.commit(claim("n1", &replica("b")).unwrap()).unwrap();
        assert_eq!(
            foreign(&theirs[0], "a"),
            Some(("n1".to_owned(), theirs[0].revision))
        );
        assert!(theirs[0].revision > mine[0].revision);
        assert_eq!(key(&"x".repeat(300)), None);
    }
}
