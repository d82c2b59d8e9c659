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
/// address `api` (kube-apiserver keeps them so, for clients inside the cluster). With
/// `shared` (several replicas on one store) `api` is added to the addresses the Endpoints
/// hold; the leader's reconciler ([`crate::apiserver_identity`]) later drops replicas that
/// are gone.
///
/// # Errors
/// The store's error.
pub fn ensure_kubernetes_service(
    store: &Store,
    api: std::net::SocketAddr,
    shared: bool,
) -> Result<(), StoreError> {
    let api = endpoint_address(api);
    retried(|| {
        write_kubernetes_service(store, api.port())?;
        let mut addresses = vec![api];
        if shared {
            addresses.extend(endpoint_addresses(store)?);
        }
        addresses.sort();
        addresses.dedup();
        write_kubernetes_endpoints(store, &addresses)
    })
}

/// `api` as clients reach it: an unspecified IP becomes 127.0.0.1.
pub fn endpoint_address(api: std::net::SocketAddr) -> std::net::SocketAddr {
    if api.ip().is_unspecified() {
        std::net::SocketAddr::new([127, 0, 0, 1].into(), api.port())
    } else {
        api
    }
}

/// Another replica of a shared store may write the same objects at the same time: read
/// again and retry a few times.
fn retried(mut write: impl FnMut() -> Result<(), StoreError>) -> Result<(), StoreError> {
    let mut attempts = 0;
    loop {
        match write() {
            Err(StoreError::AlreadyExists(_) | StoreError::Conflict { .. }) if attempts < 5 => {
                attempts += 1
            }
            other => return other,
        }
    }
}

fn kubernetes_meta() -> serde_json::Value {
    json!({"name": "kubernetes", "namespace": "default",
           "uid": uuid::Uuid::new_v4().to_string(),
           "creationTimestamp": object::now_rfc3339(),
           "labels": {"component": "apiserver", "provider": "kubernetes"},
           "annotations": {"kedge.io/managed-by": "cloudcore"}})
}

/// The addresses `default/kubernetes`'s Endpoints hold now.
fn endpoint_addresses(store: &Store) -> Result<Vec<std::net::SocketAddr>, StoreError> {
    let key = ObjectKey::new("endpoints", "default", "kubernetes")?;
    let Some(held) = store.get(&key)? else {
        return Ok(Vec::new());
    };
    let endpoints: serde_json::Value = serde_json::from_slice(&held.object).unwrap_or_default();
    let mut addresses = Vec::new();
    for subset in endpoints["subsets"].as_array().into_iter().flatten() {
        let Some(port) = subset
            .pointer("/ports/0/port")
            .and_then(|p| p.as_u64())
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for address in subset["addresses"].as_array().into_iter().flatten() {
            if let Some(ip) = address["ip"].as_str().and_then(|ip| ip.parse().ok()) {
                addresses.push(std::net::SocketAddr::new(ip, port));
            }
        }
    }
    Ok(addresses)
}

fn write_kubernetes_service(store: &Store, port: u16) -> Result<(), StoreError> {
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": kubernetes_meta(),
        "spec": {"type": "ClusterIP", "clusterIP": KUBERNETES_SERVICE_IP,
                 "clusterIPs": [KUBERNETES_SERVICE_IP], "sessionAffinity": "None",
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]},
    });
    write_kubernetes_object(store, "services", service, "/spec/ports")
}

/// Writes `default/kubernetes`'s Endpoints with `addresses` (sorted by the caller), unless
/// they already hold exactly those.
///
/// # Errors
/// The store's error (a conflict when another replica wrote them meanwhile).
pub fn write_kubernetes_endpoints(
    store: &Store,
    addresses: &[std::net::SocketAddr],
) -> Result<(), StoreError> {
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints", "metadata": kubernetes_meta(),
        "subsets": crate::apiserver_identity::subsets(addresses),
    });
    write_kubernetes_object(store, "endpoints", endpoints, "/subsets")
}

/// Writes `object` as `default/kubernetes` of `kind` when it is missing or differs at
/// `compare` (the held uid and metadata kept).
fn write_kubernetes_object(
    store: &Store,
    kind: &str,
    mut object: serde_json::Value,
    compare: &str,
) -> Result<(), StoreError> {
    let key = ObjectKey::new(kind, "default", "kubernetes")?;
    let current = store.get(&key)?;
    let held = current
        .as_ref()
        .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v.object).ok());
    match &held {
        Some(held) if held.pointer(compare) == object.pointer(compare) => return Ok(()),
        Some(held) => object["metadata"] = held["metadata"].clone(),
        None => {}
    }
    let expect = current.map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
    let mut set = WriteSet::new();
    set.put(
        key,
        Bytes::from(serde_json::to_vec(&object).expect("json")),
        expect,
    );
    store.commit(set).map(drop)
}
