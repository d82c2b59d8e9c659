//! Every replica in the `kubernetes` Service's Endpoints, when several cloudcores share one
//! store (kube-apiserver's `--endpoint-reconciler-type=lease`, its default).
//!
//! - Each replica keeps a `coordination.k8s.io/v1` Lease `kube-system/kube-apiserver-<id>`
//!   (the name and label `apiserver.kubernetes.io/identity=kube-apiserver` Kubernetes gives
//!   its API servers' identity Leases), renewed every third of its duration, with the
//!   replica's API address in the annotation [`ENDPOINT_ANNOTATION`] (`IP:PORT`). A replica
//!   deletes its own Lease at graceful shutdown.
//! - The leader (a singleton, [`crate::leader`]) writes `default/kubernetes`'s Endpoints with
//!   the addresses of the Leases that are alive, and deletes the dead ones. A Lease is dead
//!   once the leader has seen it unchanged for its `leaseDurationSeconds`, timed by the
//!   leader's own clock (replicas' clocks need not agree, as in [`crate::leader`]).
//!
//! [`judge`] is the pure core (tested with a simulated clock); [`run_identity`] and
//! [`run_endpoints`] are the loops.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object;
use replication::{
    KeyRange, ObjectKey, Precondition, ResourceVersion, Store, StoreError, WriteSet,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::leader::Observed;

/// The Leases' namespace.
pub const NAMESPACE: &str = "kube-system";
/// The Leases' name prefix (Kubernetes' `kube-apiserver-<id>`).
pub const PREFIX: &str = "kube-apiserver-";
/// The label Kubernetes puts on its API servers' identity Leases, and its value.
pub const IDENTITY_LABEL: (&str, &str) = ("apiserver.kubernetes.io/identity", "kube-apiserver");
/// The annotation with the replica's API address, `IP:PORT`.
pub const ENDPOINT_ANNOTATION: &str = "kedge.io/api-endpoint";

/// This replica's identity Lease: where it is and how long a silence means it is gone.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The replica's name (its leader-election identity, `HOSTNAME_UUID`).
    pub holder: String,
    /// The address clients inside the cluster reach its API at.
    pub endpoint: SocketAddr,
    /// The Lease's duration; it is renewed every third of it.
    pub lease_duration: Duration,
}

impl Identity {
    /// The Lease's key: `kube-system/kube-apiserver-<the identity's UUID part>`, lower case
    /// (a DNS subdomain; the hostname part may not be one).
    pub fn key(&self) -> ObjectKey {
        let id: String = self
            .holder
            .rsplit('_')
            .next()
            .unwrap_or(&self.holder)
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(200)
            .collect::<String>()
            .to_ascii_lowercase();
        let id = id.trim_matches('-');
        let id = if id.is_empty() { "cloudcore" } else { id };
        ObjectKey::new("leases", NAMESPACE, &format!("{PREFIX}{id}")).expect("a valid Lease key")
    }

    fn lease(&self, previous: Option<&Value>, now_wall: &str) -> Value {
        let key = self.key();
        let mut metadata = previous
            .and_then(|p| p.get("metadata").cloned())
            .unwrap_or_else(|| {
                json!({"name": key.name(), "namespace": NAMESPACE,
                       "uid": uuid::Uuid::new_v4().to_string(),
                       "creationTimestamp": object::now_rfc3339()})
            });
        metadata["labels"] = json!({IDENTITY_LABEL.0: IDENTITY_LABEL.1});
        metadata["annotations"] = json!({ENDPOINT_ANNOTATION: self.endpoint.to_string()});
        let acquired = previous
            .and_then(|p| p.pointer("/spec/acquireTime").cloned())
            .unwrap_or_else(|| json!(now_wall));
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": self.holder,
                     "leaseDurationSeconds": self.lease_duration.as_secs().max(1),
                     "acquireTime": acquired, "renewTime": now_wall},
        })
    }
}

/// Writes (creates or renews) the replica's identity Lease once.
///
/// # Errors
/// The store's error (a conflict with a concurrent write is retried by the next round).
pub fn renew(store: &Store, identity: &Identity) -> Result<(), StoreError> {
    let key = identity.key();
    let current = store.get(&key)?;
    let previous = current
        .as_ref()
        .and_then(|c| serde_json::from_slice::<Value>(&c.object).ok());
    let lease = identity.lease(previous.as_ref(), &object::now_micro_rfc3339());
    let expect = current.map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
    let Value::Object(map) = lease else {
        unreachable!("a Lease is an object")
    };
    let mut set = WriteSet::new();
    set.put(key, Bytes::from(object::to_stored(map)), expect);
    store.commit(set).map(drop)
}

/// Deletes the replica's identity Lease (at graceful shutdown), so the leader drops its
/// address from the Endpoints at once instead of after the Lease's duration.
pub fn remove(store: &Store, identity: &Identity) {
    let key = identity.key();
    if let Ok(Some(current)) = store.get(&key) {
        let mut set = WriteSet::new();
        set.delete(key, Precondition::Version(current.rv));
        let _ = store.commit(set);
    }
}

/// Renews the replica's identity Lease every third of its duration until `shutdown`, then
/// deletes it.
pub async fn run_identity(store: Arc<Store>, identity: Identity, shutdown: CancellationToken) {
    let period = (identity.lease_duration / 3).max(Duration::from_millis(100));
    loop {
        let (s, i) = (store.clone(), identity.clone());
        match tokio::task::spawn_blocking(move || renew(&s, &i)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "renewing the API server identity Lease"),
            Err(e) => tracing::warn!(error = %e, "renewing the API server identity Lease"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
    }
    let _ = tokio::task::spawn_blocking(move || remove(&store, &identity)).await;
}

/// One identity Lease as read: its name, version, address and duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The Lease's name.
    pub name: String,
    /// Its resourceVersion (changes at every renewal).
    pub rv: ResourceVersion,
    /// The replica's API address, when the annotation holds one.
    pub endpoint: Option<SocketAddr>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
}

/// What the leader makes of the identity Leases it read now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Judgement {
    /// The live replicas' addresses, sorted, without duplicates.
    pub live: Vec<SocketAddr>,
    /// Leases seen unchanged for their duration: `(name, rv)` to delete.
    pub dead: Vec<(String, ResourceVersion)>,
}

/// Judges the Leases `leases` read at `now`, given when each was first seen at its version
/// (`observed`, updated here; Leases no longer listed are forgotten). A Lease seen for the
/// first time counts as alive for its duration.
pub fn judge(leases: &[Seen], observed: &mut HashMap<String, Observed>, now: Instant) -> Judgement {
    observed.retain(|name, _| leases.iter().any(|l| &l.name == name));
    let mut judgement = Judgement::default();
    for lease in leases {
        let seen = observed
            .entry(lease.name.clone())
            .and_modify(|o| {
                if o.rv != lease.rv {
                    *o = Observed {
                        rv: lease.rv,
                        since: now,
                    };
                }
            })
            .or_insert(Observed {
                rv: lease.rv,
                since: now,
            });
        if now.duration_since(seen.since) >= lease.duration {
            judgement.dead.push((lease.name.clone(), lease.rv));
        } else if let Some(endpoint) = lease.endpoint {
            judgement.live.push(endpoint);
        }
    }
    judgement.live.sort();
    judgement.live.dedup();
    judgement
}

/// The identity Leases in the store.
fn read(store: &Store) -> Result<Vec<Seen>, StoreError> {
    let range = KeyRange::namespace("leases", NAMESPACE)?;
    let mut leases = Vec::new();
    for item in store.scan(&range) {
        let (key, held) = item?;
        if !key.name().starts_with(PREFIX) {
            continue;
        }
        let Ok(lease) = serde_json::from_slice::<Value>(&held.object) else {
            continue;
        };
        let labelled = lease
            .pointer("/metadata/labels")
            .and_then(|l| l.get(IDENTITY_LABEL.0))
            == Some(&json!(IDENTITY_LABEL.1));
        if !labelled {
            continue;
        }
        leases.push(Seen {
            name: key.name().to_owned(),
            rv: held.rv,
            endpoint: lease
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(ENDPOINT_ANNOTATION))
                .and_then(Value::as_str)
                .and_then(|a| a.parse().ok()),
            duration: Duration::from_secs(
                lease
                    .pointer("/spec/leaseDurationSeconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(15),
            ),
        });
    }
    Ok(leases)
}

/// One round of the leader's reconciler: judge the Leases, delete the dead, write the
/// Endpoints when their addresses changed. An empty live set leaves the Endpoints alone
/// (the leader itself renews a Lease: no live one means the store is behind).
fn reconcile(store: &Store, observed: &mut HashMap<String, Observed>) -> Result<(), StoreError> {
    let judgement = judge(&read(store)?, observed, Instant::now());
    for (name, rv) in &judgement.dead {
        tracing::info!(lease = %name, "an API server replica stopped renewing its identity Lease: removing it from the kubernetes Endpoints");
        let mut set = WriteSet::new();
        set.delete(
            ObjectKey::new("leases", NAMESPACE, name)?,
            Precondition::Version(*rv),
        );
        match store.commit(set) {
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    if judgement.live.is_empty() {
        return Ok(());
    }
    crate::embedded::write_kubernetes_endpoints(store, &judgement.live)
}

/// The leader's reconciler: every `period` until the task is stopped.
pub async fn run_endpoints(store: Arc<Store>, period: Duration) {
    let mut observed = HashMap::new();
    loop {
        let s = store.clone();
        let mut o = std::mem::take(&mut observed);
        match tokio::task::spawn_blocking(move || (reconcile(&s, &mut o), o)).await {
            Ok((result, o)) => {
                observed = o;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "reconciling the kubernetes Endpoints");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reconciling the kubernetes Endpoints"),
        }
        tokio::time::sleep(period).await;
    }
}

/// The Endpoints' `subsets` for `addresses`: one subset per port, as kube-apiserver groups
/// addresses that share their ports.
pub fn subsets(addresses: &[SocketAddr]) -> Value {
    let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for address in addresses {
        by_port
            .entry(address.port())
            .or_default()
            .push(address.ip().to_string());
    }
    Value::Array(
        by_port
            .into_iter()
            .map(|(port, ips)| {
                json!({"addresses": ips.into_iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                       "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(name: &str, rv: u64, port: u16) -> Seen {
        Seen {
            name: name.into(),
            rv: ResourceVersion(rv),
            endpoint: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn a_replica_leaves_the_endpoints_once_its_lease_was_seen_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let mut observed = HashMap::new();
        let both = [
            seen("kube-apiserver-a", 1, 6443),
            seen("kube-apiserver-b", 2, 6444),
        ];
        let first = judge(&both, &mut observed, t0);
        assert_eq!(first.live.len(), 2);
        assert!(first.dead.is_empty());
        // A renews, B does not: 14 s later both are alive, at 15 s B is dead.
        let renewed = [
            seen("kube-apiserver-a", 3, 6443),
            seen("kube-apiserver-b", 2, 6444),
        ];
        let at14 = judge(&renewed, &mut observed, t0 + Duration::from_secs(14));
        assert_eq!(at14.live.len(), 2);
        let renewed = [
            seen("kube-apiserver-a", 4, 6443),
            seen("kube-apiserver-b", 2, 6444),
        ];
        let at15 = judge(&renewed, &mut observed, t0 + Duration::from_secs(15));
        assert_eq!(at15.live, vec![SocketAddr::from(([127, 0, 0, 1], 6443))]);
        assert_eq!(
            at15.dead,
            vec![("kube-apiserver-b".to_owned(), ResourceVersion(2))]
        );
        // B comes back (a new version): alive again; a deleted Lease is forgotten.
        let back = [seen("kube-apiserver-b", 9, 6444)];
        let later = judge(&back, &mut observed, t0 + Duration::from_secs(16));
        assert_eq!(later.live, vec![SocketAddr::from(([127, 0, 0, 1], 6444))]);
        assert_eq!(observed.len(), 1);
    }

    #[test]
    fn subsets_group_addresses_by_port() {
        let addresses: Vec<SocketAddr> = vec![
            "10.0.0.1:6443".parse().unwrap(),
            "10.0.0.2:6443".parse().unwrap(),
            "127.0.0.1:7000".parse().unwrap(),
        ];
        let subsets = subsets(&addresses);
        assert_eq!(subsets.as_array().unwrap().len(), 2);
        assert_eq!(subsets[0]["addresses"][1]["ip"], "10.0.0.2");
        assert_eq!(subsets[1]["ports"][0]["port"], 7000);
    }

    #[test]
    fn identity_leases_are_renewed_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::embedded::open_store(dir.path(), 100).unwrap();
        let identity = Identity {
            holder: "Host_Name_0A1B-c2".into(),
            endpoint: "127.0.0.1:6443".parse().unwrap(),
            lease_duration: Duration::from_secs(15),
        };
        assert_eq!(identity.key().name(), "kube-apiserver-0a1b-c2");
        renew(&store, &identity).unwrap();
        renew(&store, &identity).unwrap();
        let leases = read(&store).unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].endpoint, Some(identity.endpoint));
        let mut observed = HashMap::new();
        reconcile(&store, &mut observed).unwrap();
        let endpoints = store
            .get(&ObjectKey::new("endpoints", "default", "kubernetes").unwrap())
            .unwrap()
            .expect("the Endpoints are written");
        let endpoints: Value = serde_json::from_slice(&endpoints.object).unwrap();
        assert_eq!(endpoints["subsets"], subsets(&[identity.endpoint]));
        remove(&store, &identity);
        assert!(read(&store).unwrap().is_empty());
    }
}
