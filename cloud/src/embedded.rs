//! The embedded API server's state: a RocksDB store that assigns resourceVersions.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use replication::api::object;
use replication::{ObjectKey, Precondition, Store, StoreConfig, StoreError, WriteSet};
use serde_json::json;

/// Namespaces every Kubernetes cluster has.
pub const SEED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Opens (or creates) the store under `data_dir/store` and creates the seed namespaces that
/// are missing.
pub fn open_store(data_dir: &Path, watch_history: usize) -> Result<Arc<Store>, StoreError> {
    let mut config = StoreConfig::cloud();
    config.watch.history = watch_history.max(1);
    let store = Store::open(data_dir.join("store"), config)?;
    let mut set = WriteSet::new();
    for name in SEED_NAMESPACES {
        let key = ObjectKey::new("namespaces", "", name)?;
        if store.get(&key)?.is_none() {
            let namespace = json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "uid": uuid::Uuid::new_v4().to_string(),
                    "creationTimestamp": object::now_rfc3339(),
                    "labels": {"kubernetes.io/metadata.name": name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            });
            let bytes = serde_json::to_vec(&namespace).expect("json");
            set.put(key, Bytes::from(bytes), Precondition::Absent);
        }
    }
    if !set.is_empty() {
        store.commit(set)?;
    }
    Ok(Arc::new(store))
}
