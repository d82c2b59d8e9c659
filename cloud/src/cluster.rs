//! Where the cluster's state comes from: one trait, two implementations.
//!
//! - [`Embedded`]: cloudcore's own store is the cluster (its API server is the one users and
//!   kubectl talk to; the scheduler and the node lifecycle run here).
//! - [`KubeCluster`] (`--kubeconfig`): a real cluster. kube-rs watchers mirror the kinds nodes
//!   need into the local store, so CloudHub, routing and ObjectSync work on it exactly as with
//!   the embedded store; what cloudcore writes locally on behalf of nodes (their Node, Lease,
//!   pod and device status, events, confirmed pod deletions) is written back to the cluster,
//!   status through `/status`. The local API is then a read-only view (writes go to the
//!   cluster), and the cluster's own scheduler and node lifecycle are in charge.
//!
//! Echoes are cut both ways: a change the mirror commits is not written back (the mirror notes
//! the store revisions of its own commits under one lock), and an object coming back from the
//! cluster equal to the local one (apart from resourceVersion and managedFields) is not
//! rewritten, so a node does not get its own report back.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::StreamExt;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use replication::api::object::{self, Object};
use replication::api::resources::{self, Resource};
use replication::watcher::{Event, ResumableWatcher};
use replication::{
    ChangeKind, KeyRange, ObjectKey, Precondition, Revision, SharedChange, Store, WriteSet,
};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// A source of cluster state for cloudcore.
pub trait ClusterSource: Send + Sync + 'static {
    /// For logs: what the source is.
    fn describe(&self) -> String;
    /// Whether the local API accepts writes (it is the cluster), or is a read-only view.
    fn accepts_api_writes(&self) -> bool;
    /// Whether cloudcore's scheduler and node lifecycle run (a real cluster has its own).
    fn runs_controllers(&self) -> bool;
    /// Starts whatever keeps the local store and the cluster in step.
    fn start(self: Arc<Self>, store: Arc<Store>) -> Vec<JoinHandle<()>>;
}

/// cloudcore's own store is the cluster.
pub struct Embedded;

impl ClusterSource for Embedded {
    fn describe(&self) -> String {
        "the embedded API server".into()
    }

    fn accepts_api_writes(&self) -> bool {
        true
    }

    fn runs_controllers(&self) -> bool {
        true
    }

    fn start(self: Arc<Self>, _store: Arc<Store>) -> Vec<JoinHandle<()>> {
        Vec::new()
    }
}

/// The kinds mirrored from a real cluster: what routing can send to nodes, their Nodes and
/// Leases, and the namespaces they live in. Events are written, never read.
const MIRRORED: &[&str] = &[
    "namespaces",
    "nodes",
    "pods",
    "configmaps",
    "secrets",
    "services",
    "endpoints",
    "endpointslices",
    "persistentvolumeclaims",
    "leases",
    "devices",
    "devicemodels",
    "devicestatuses",
];

/// The kinds cloudcore writes back on behalf of nodes.
const WRITTEN_BACK: &[&str] = &[
    "nodes",
    "leases",
    "pods",
    "devices",
    "devicestatuses",
    "events",
];

/// Which objects of a kind one mirror watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every object of the kind.
    All,
    /// The node heartbeats: Leases in `kube-node-lease`.
    NodeLeases,
    /// Which replica holds each node's link ([`crate::linkclaim`]): several cloudcores on one
    /// cluster see each other's claims.
    LinkClaims,
}

impl Scope {
    fn watch_config(self) -> watcher::Config {
        let config = watcher::Config::default();
        match self {
            Scope::All => config,
            Scope::NodeLeases => config.fields("metadata.namespace=kube-node-lease"),
            Scope::LinkClaims => config
                .fields(&format!(
                    "metadata.namespace={}",
                    crate::linkclaim::NAMESPACE
                ))
                .labels(crate::linkclaim::NODE_LABEL),
        }
    }

    /// Whether a local object belongs to this mirror (a relist deletes those the cluster no
    /// longer has).
    fn holds(self, key: &ObjectKey) -> bool {
        match self {
            Scope::All => true,
            Scope::NodeLeases => key.namespace() == "kube-node-lease",
            Scope::LinkClaims => {
                key.namespace() == crate::linkclaim::NAMESPACE
                    && key.name().starts_with(crate::linkclaim::PREFIX)
            }
        }
    }
}

/// A real cluster through kube-rs.
pub struct KubeCluster {
    client: Client,
    server: String,
    /// Store revisions committed by the mirror, not yet seen by the write-back.
    mirrored: Mutex<HashSet<Revision>>,
    /// The cluster's CA certificates from the kubeconfig, if it names any.
    cas: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Where kube-apiserver reaches edge nodes' kubelet API (cloudcore's kubelet endpoint),
    /// written into each edge Node's status on the way back; unset: the node's own status.
    kubelet_endpoint: std::sync::OnceLock<crate::kubelet_server::NodeEndpoint>,
}

fn api_resource(resource: &Resource) -> ApiResource {
    ApiResource {
        group: resource.group.to_owned(),
        version: resource.version.to_owned(),
        api_version: resource.api_version(),
        kind: resource.kind.to_owned(),
        plural: resource.plural.to_owned(),
    }
}

/// The object as the local store keeps it: no resourceVersion (the store's own) and no
/// managedFields (the cluster's bookkeeping).
fn normalized(object: &DynamicObject) -> Option<Object> {
    let mut value = serde_json::to_value(object).ok()?;
    let map = value.as_object_mut()?;
    if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    Some(map.clone())
}

impl KubeCluster {
    /// Connects with the kubeconfig at `path` (its current context).
    pub async fn connect(path: &Path) -> anyhow::Result<KubeCluster> {
        let kubeconfig = Kubeconfig::read_from(path)
            .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {} is not usable", path.display()))?;
        let server = config.cluster_url.to_string();
        let mut cas: Vec<rustls::pki_types::CertificateDer<'static>> = config
            .root_cert
            .iter()
            .flatten()
            .map(|der| der.clone().into())
            .collect();
        if let Some(file) = &config.root_cert_file {
            use rustls::pki_types::pem::PemObject;
            if let Ok(text) = std::fs::read(file) {
                cas.extend(rustls::pki_types::CertificateDer::pem_slice_iter(&text).flatten());
            }
        }
        let client = Client::try_from(config).context("building the cluster client")?;
        client
            .apiserver_version()
            .await
            .with_context(|| format!("the cluster at {server} does not answer"))?;
        Ok(KubeCluster {
            client,
            server,
            mirrored: Mutex::new(HashSet::new()),
            cas,
            kubelet_endpoint: std::sync::OnceLock::new(),
        })
    }

    /// The cluster's client (the kubeconfig's credentials).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The cluster's CA certificates named by the kubeconfig (none for a plain-HTTP server or
    /// one trusted through the system's roots).
    pub fn cluster_cas(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.cas.clone()
    }

    /// Writes `endpoint` into every edge Node's status from now on (see
    /// [`crate::kubelet_server`]); a second call is ignored.
    pub fn set_kubelet_endpoint(&self, endpoint: crate::kubelet_server::NodeEndpoint) {
        let _ = self.kubelet_endpoint.set(endpoint);
    }

    fn mirrored(&self) -> std::sync::MutexGuard<'_, HashSet<Revision>> {
        self.mirrored.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn api(&self, resource: &Resource, namespace: &str) -> Api<DynamicObject> {
        let ar = api_resource(resource);
        if resource.namespaced {
            Api::namespaced_with(self.client.clone(), namespace, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        }
    }

    /// Commits the mirror's writes and notes their revisions, under the lock the write-back
    /// checks, so that it never mistakes them for writes of its own.
    fn commit_mirrored(&self, store: &Store, set: WriteSet) {
        let mut mirrored = self.mirrored();
        match store.commit(set) {
            Ok(changes) => mirrored.extend(changes.iter().map(|c| c.revision)),
            Err(e) => tracing::warn!(error = %e, "cannot mirror a cluster change"),
        }
    }

    /// Mirrors one kind (the objects of `scope`) until the task is aborted.
    async fn mirror(self: Arc<Self>, store: Arc<Store>, resource: &'static Resource, scope: Scope) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &api_resource(resource));
        let config = scope.watch_config();
        let mut events = std::pin::pin!(watcher(api, config).default_backoff());
        let mut listing: Option<HashSet<ObjectKey>> = None;
        let mut failing = false;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => {
                    if failing {
                        tracing::info!(kind = resource.plural, "mirroring from the cluster again");
                        failing = false;
                    }
                    event
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(kind = resource.plural, error = %e, "cannot watch the cluster; retrying");
                        failing = true;
                    }
                    continue;
                }
            };
            match event {
                watcher::Event::Init => listing = Some(HashSet::new()),
                watcher::Event::InitApply(object) => {
                    if let Some(key) = self.upsert(&store, resource, &object) {
                        if let Some(seen) = listing.as_mut() {
                            seen.insert(key);
                        }
                    }
                }
                watcher::Event::InitDone => {
                    // Whatever the local store holds that the cluster no longer has.
                    let Some(seen) = listing.take() else { continue };
                    let Ok(range) = KeyRange::kind(resource.plural) else {
                        continue;
                    };
                    let mut set = WriteSet::new();
                    for (key, _) in store.scan(&range).filter_map(Result::ok) {
                        if !seen.contains(&key) && scope.holds(&key) {
                            set.delete(key, Precondition::Exists);
                        }
                    }
                    if !set.is_empty() {
                        self.commit_mirrored(&store, set);
                    }
                }
                watcher::Event::Apply(object) => {
                    self.upsert(&store, resource, &object);
                }
                watcher::Event::Delete(object) => {
                    let name = object.metadata.name.clone().unwrap_or_default();
                    let namespace = object.metadata.namespace.clone().unwrap_or_default();
                    let Ok(key) = ObjectKey::new(resource.plural, &namespace, &name) else {
                        continue;
                    };
                    if store.get(&key).ok().flatten().is_some() {
                        let mut set = WriteSet::new();
                        set.delete(key, Precondition::Exists);
                        self.commit_mirrored(&store, set);
                    }
                }
            }
        }
    }

    /// Puts the cluster's object into the local store unless it holds the same already.
    fn upsert(
        &self,
        store: &Store,
        resource: &Resource,
        object: &DynamicObject,
    ) -> Option<ObjectKey> {
        let name = object.metadata.name.clone()?;
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let key = ObjectKey::new(resource.plural, &namespace, &name).ok()?;
        let mut fresh = normalized(object)?;
        fresh.insert("apiVersion".into(), json!(resource.api_version()));
        fresh.insert("kind".into(), json!(resource.kind));
        let current = store.get(&key).ok().flatten();
        let same = current
            .as_ref()
            .and_then(|c| serde_json::from_slice::<Object>(&c.object).ok())
            .is_some_and(|c| c == fresh);
        if !same {
            let mut set = WriteSet::new();
            set.put(
                key.clone(),
                Bytes::from(object::to_stored(fresh)),
                Precondition::None,
            );
            self.commit_mirrored(store, set);
        }
        Some(key)
    }

    /// Writes local changes made for nodes back to the cluster until the task is aborted.
    async fn write_back(self: Arc<Self>, store: Arc<Store>) {
        let mut watcher = ResumableWatcher::all(store.clone());
        let mut started = false;
        // The latest local change per key still to be written (coalesced while the cluster
        // is slow or unreachable).
        let mut pending: BTreeMap<ObjectKey, SharedChange> = BTreeMap::new();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = watcher.next() => {
                    let mut event = event;
                    loop {
                        match event {
                            Ok(Event::Change(change)) => {
                                if self.is_ours(&change) {
                                    pending.insert(change.key.clone(), change);
                                }
                            }
                            Ok(Event::Restart { .. }) if !started => started = true,
                            Ok(Event::Restart { .. }) => {
                                tracing::error!("local changes were lost for the write-back (the watch history was gone)");
                            }
                            Err(_) => return,
                        }
                        event = match watcher.try_next() {
                            Ok(Some(next)) => Ok(next),
                            Ok(None) => break,
                            Err(e) => Err(e),
                        };
                    }
                }
                _ = retry.tick(), if !pending.is_empty() => {}
            }
            self.flush(&mut pending).await;
        }
    }

    /// A local change the write-back must carry to the cluster (not one the mirror made).
    fn is_ours(&self, change: &SharedChange) -> bool {
        if self.mirrored().remove(&change.revision) {
            return false;
        }
        WRITTEN_BACK.contains(&change.key.kind())
    }

    /// Writes what is pending, up to 32 calls at a time; failures stay pending.
    async fn flush(&self, pending: &mut BTreeMap<ObjectKey, SharedChange>) {
        let batch: Vec<SharedChange> = pending.values().take(32).cloned().collect();
        let outcomes = futures_util::future::join_all(batch.iter().map(|c| self.write(c))).await;
        for (change, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(()) => {
                    if pending
                        .get(&change.key)
                        .is_some_and(|p| p.revision == change.revision)
                    {
                        pending.remove(&change.key);
                    }
                }
                Err(e) if retryable(&e) => {
                    tracing::warn!(key = %change.key, error = %e, "cannot write to the cluster; will retry")
                }
                Err(e) => {
                    // The cluster refuses it for good (forbidden, invalid…): retrying would
                    // only hold up the writes behind it.
                    tracing::error!(key = %change.key, error = %e, "the cluster refused a write for a node; dropped");
                    pending.remove(&change.key);
                }
            }
        }
    }

    /// One local change, written to the cluster.
    async fn write(&self, change: &SharedChange) -> Result<(), kube::Error> {
        let Some(resource) = resources::by_store_kind(change.key.kind()) else {
            return Ok(());
        };
        let api = self.api(resource, change.key.namespace());
        let name = change.key.name();
        if change.kind == ChangeKind::Deleted {
            // A pod the node confirmed stopped (the kubelet's final delete).
            if change.key.kind() != "pods" {
                return Ok(());
            }
            let uid = serde_json::from_slice::<Object>(&change.object)
                .ok()
                .and_then(|o| object::meta_str(&o, "uid").map(str::to_owned));
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: uid.map(|uid| Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            return ignore(api.delete(name, &params).await.map(|_| ()), &[404, 409]);
        }
        let local: Object = match serde_json::from_slice(&change.object) {
            Ok(object) => object,
            Err(_) => return Ok(()),
        };
        let mut status = json!({"status": local.get("status").cloned().unwrap_or(Value::Null)});
        if let (Some(endpoint), "nodes") = (self.kubelet_endpoint.get(), change.key.kind()) {
            endpoint.rewrite(&mut status["status"]);
        }
        let merge = PatchParams::default();
        match change.key.kind() {
            "pods" | "devices" => ignore(
                api.patch_status(name, &merge, &Patch::Merge(&status))
                    .await
                    .map(|_| ()),
                &[404],
            ),
            // A node's first report of a device makes its DeviceStatus when the cluster has
            // none yet (KubeEdge's DeviceController makes it when the Device appears).
            "devicestatuses" => {
                match api.patch_status(name, &merge, &Patch::Merge(&status)).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        let mut created = local.clone();
                        let metadata = object::meta_mut(&mut created);
                        for field in ["resourceVersion", "uid", "creationTimestamp"] {
                            metadata.remove(field);
                        }
                        let created: DynamicObject =
                            match serde_json::from_value(Value::Object(created)) {
                                Ok(o) => o,
                                Err(_) => return Ok(()),
                            };
                        match api.create(&PostParams::default(), &created).await {
                            // The cluster's DeviceController made it meanwhile: the status
                            // goes onto that one.
                            Err(kube::Error::Api(e)) if e.code == 409 => ignore(
                                api.patch_status(name, &merge, &Patch::Merge(&status))
                                    .await
                                    .map(|_| ()),
                                &[404],
                            ),
                            other => other.map(|_| ()),
                        }
                    }
                    other => ignore(other.map(|_| ()), &[404]),
                }
            }
            "nodes" => {
                // Merged into the cluster's maps (a null would delete them, so absent ones are
                // left out).
                let mut own = serde_json::Map::new();
                for field in ["labels", "annotations"] {
                    if let Some(map) = object::meta(&local).and_then(|m| m.get(field)) {
                        own.insert(field.into(), map.clone());
                    }
                }
                let labels = json!({"metadata": own});
                match api.patch(name, &merge, &Patch::Merge(&labels)).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        self.create(&api, &local).await?;
                    }
                    other => {
                        other?;
                    }
                }
                if local.contains_key("status") {
                    api.patch_status(name, &merge, &Patch::Merge(&status))
                        .await?;
                }
                Ok(())
            }
            "leases" => {
                // The spec, and for a link claim its labels and annotations (the holder's API
                // URL), merged.
                let mut spec = json!({"spec": local.get("spec")});
                if change.key.name().starts_with(crate::linkclaim::PREFIX) {
                    for field in ["labels", "annotations"] {
                        if let Some(map) = object::meta(&local).and_then(|m| m.get(field)) {
                            spec["metadata"][field] = map.clone();
                        }
                    }
                }
                match api.patch(name, &merge, &Patch::Merge(&spec)).await {
                    Err(kube::Error::Api(e)) if e.code == 404 => self.create(&api, &local).await,
                    other => other.map(|_| ()),
                }
            }
            "events" => ignore(self.create(&api, &local).await, &[409]),
            _ => Ok(()),
        }
    }

    async fn create(&self, api: &Api<DynamicObject>, local: &Object) -> Result<(), kube::Error> {
        let mut fresh = local.clone();
        let metadata = object::meta_mut(&mut fresh);
        // The cluster assigns its own identity and bookkeeping.
        for field in ["uid", "resourceVersion", "creationTimestamp", "generation"] {
            metadata.remove(field);
        }
        let object: DynamicObject =
            serde_json::from_value(Value::Object(fresh)).map_err(kube::Error::SerdeError)?;
        api.create(&PostParams::default(), &object)
            .await
            .map(|_| ())
    }
}

/// Worth trying again: the cluster unreachable or overloaded, or a conflict.
fn retryable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(e) => e.code >= 500 || e.code == 409 || e.code == 429,
        _ => true,
    }
}

/// Treats the listed API error codes as done.
fn ignore(outcome: Result<(), kube::Error>, codes: &[u16]) -> Result<(), kube::Error> {
    match outcome {
        Err(kube::Error::Api(e)) if codes.contains(&e.code) => Ok(()),
        other => other,
    }
}

impl ClusterSource for KubeCluster {
    fn describe(&self) -> String {
        format!("the cluster at {}", self.server)
    }

    fn accepts_api_writes(&self) -> bool {
        false
    }

    fn runs_controllers(&self) -> bool {
        false
    }

    fn start(self: Arc<Self>, store: Arc<Store>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for kind in MIRRORED {
            if let Some(resource) = resources::by_store_kind(kind) {
                let scopes = if *kind == "leases" {
                    vec![Scope::NodeLeases, Scope::LinkClaims]
                } else {
                    vec![Scope::All]
                };
                for scope in scopes {
                    tasks.push(tokio::spawn(self.clone().mirror(
                        store.clone(),
                        resource,
                        scope,
                    )));
                }
            }
        }
        tasks.push(tokio::spawn(self.clone().write_back(store)));
        tasks
    }
}
