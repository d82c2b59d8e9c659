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
    seed_namespaces(&store)?;
    Ok(Arc::new(store))
}

/// Creates the [`SEED_NAMESPACES`] that are missing, each on its own: another replica seeding
/// the same shared store at the same time is no error.
///
/// # Errors
/// The store's error, other than [`StoreError::AlreadyExists`].
pub fn seed_namespaces(store: &Store) -> Result<(), StoreError> {
    for name in SEED_NAMESPACES {
        let key = ObjectKey::new("namespaces", "", name)?;
        if store.get(&key)?.is_some() {
            continue;
        }
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
        let mut set = WriteSet::new();
        set.put(key, Bytes::from(bytes), Precondition::Absent);
        match store.commit(set) {
            Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `kubernetes` Service's cluster IP (the first of 10.96.0.0/12, as kube-apiserver's).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// Creates or refreshes the `default/kubernetes` Service and its Endpoints, naming the API's
/// address `api` (kube-apiserver keeps them so, for clients inside the cluster).
///
/// # Errors
/// The store's error.
pub fn ensure_kubernetes_service(
    store: &Store,
    api: std::net::SocketAddr,
) -> Result<(), StoreError> {
    // Another replica of a shared store may write them at the same time: read again and retry.
    let mut attempts = 0;
    loop {
        match write_kubernetes_service(store, api) {
            Err(StoreError::AlreadyExists(_) | StoreError::Conflict { .. }) if attempts < 5 => {
                attempts += 1
            }
            other => return other,
        }
    }
}

fn write_kubernetes_service(store: &Store, api: std::net::SocketAddr) -> Result<(), StoreError> {
    let ip = if api.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        api.ip().to_string()
    };
    let port = api.port();
    let meta = |kind: &str| {
        json!({"name": "kubernetes", "namespace": "default",
               "uid": uuid::Uuid::new_v4().to_string(),
               "creationTimestamp": object::now_rfc3339(),
               "labels": {"component": "apiserver", "provider": "kubernetes"},
               "annotations": {"kedge.io/managed-by": kind}})
    };
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta("cloudcore"),
        "spec": {"type": "ClusterIP", "clusterIP": KUBERNETES_SERVICE_IP,
                 "clusterIPs": [KUBERNETES_SERVICE_IP], "sessionAffinity": "None",
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
    });
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints", "metadata": meta("cloudcore"),
        "subsets": [{"addresses": [{"ip": ip}],
                     "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
    });
    let mut set = WriteSet::new();
    for (kind, object, compare) in [
        ("services", service, "/spec/ports"),
        ("endpoints", endpoints, "/subsets"),
    ] {
        let key = ObjectKey::new(kind, "default", "kubernetes")?;
        let current = store.get(&key)?;
        let held = current
            .as_ref()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v.object).ok());
        // Written once, and again only when the API's address changed (its uid kept).
        let mut object = object;
        match &held {
            Some(held) if held.pointer(compare) == object.pointer(compare) => continue,
            Some(held) => object["metadata"] = held["metadata"].clone(),
            None => {}
        }
        let expect = current.map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
        set.put(
            key,
            Bytes::from(serde_json::to_vec(&object).expect("json")),
            expect,
        );
    }
    if !set.is_empty() {
        store.commit(set)?;
    }
    Ok(())
}
