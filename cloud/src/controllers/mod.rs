//! The workload controllers of the embedded mode: ReplicaSet, Deployment, DaemonSet,
//! StatefulSet, Job, CronJob, ServiceAccount, DeviceStatus (DeviceController's) and the garbage collector, as level-triggered reconcilers over the store.
//!
//! Each controller is a pure core, `reconcile(&World, now) -> Vec<Action>`, that reads a
//! snapshot of the objects it cares about ([`World`]) and the time (Unix seconds, so tests use a
//! simulated clock), and says what to write. The shell ([`run`]) loads the snapshot from the
//! store, applies the actions through the in-process API (so defaults, validation, graceful pod
//! deletion and resourceVersion preconditions are the API's own, as for any client), and runs
//! again when an object of a watched kind changes (changes arriving within [`DEBOUNCE`] make
//! one pass), after its own writes, and every [`RESYNC`] (time-based conditions such as
//! `minReadySeconds`, and requeues after a 409).
//!
//! Because each pass waits for its writes to be committed before the next pass reads the
//! store, a controller never acts twice on the same observation (what upstream's
//! "expectations" guard against). The price: every pass reads every object of the watched
//! kinds, fine for an edge fleet's workloads, not for a 100k-pod cluster. A controller's
//! [`Narrowing`] keeps that price where it acts: pods (and nodes) only beside an object of its
//! own kind, and only owned dependents for the garbage collector, so a fleet of plain pods
//! costs the passes next to nothing (BENCHMARKS.md "Fleet: a pod's lifecycle at a steady
//! rate"). The garbage collector's owned dependents come from [`owned::OwnedIndex`], kept by
//! one watch, instead of a scan of every pod each second; the workload controllers' pods (those
//! their objects control, and the orphans their selectors match) come from
//! [`pod_index::PodIndex`], a controller and label index kept by one watch, so a pass beside
//! one Deployment reads its pods, not the fleet's. A watch-fed cache of every kind (kube-rs's
//! reflector) is what would make the DaemonSet controller's nodes cheap as well; not built.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod gc;
pub mod history;
pub mod job;
pub mod owned;
pub mod pod_index;
pub mod replicaset;
pub mod serviceaccount;
pub mod statefulset;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use replication::api::object::{self, Object};
use replication::api::resources;
use replication::api::selector::LabelSelector;
use replication::watcher::{Event, ResumableWatcher};

use crate::events::{EventType, Involved};
use replication::{KeyRange, Revision, Store};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A pass runs at least this often, changes or not.
pub const RESYNC: Duration = Duration::from_secs(1);

/// A change starts a pass this long after it arrives, with every change arrived meanwhile.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The label a Deployment puts on its ReplicaSets and their pods (Kubernetes' name).
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The annotation holding a Deployment's and its ReplicaSets' revision (what `kubectl rollout
/// history` and `undo` read).
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// The label a DaemonSet puts on its pods: the hash of the template they were made from.
pub const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";

/// The objects the controllers read, each with its `metadata.resourceVersion`.
#[derive(Debug, Default, Clone)]
pub struct World {
    /// Every pod, all namespaces.
    pub pods: Vec<Object>,
    /// Every `apps/v1` ReplicaSet.
    pub replicasets: Vec<Object>,
    /// Every `apps/v1` Deployment.
    pub deployments: Vec<Object>,
    /// Every `apps/v1` DaemonSet.
    pub daemonsets: Vec<Object>,
    /// Every `apps/v1` StatefulSet.
    pub statefulsets: Vec<Object>,
    /// Every `apps/v1` ControllerRevision (DaemonSet and StatefulSet history).
    pub controllerrevisions: Vec<Object>,
    /// Every PersistentVolumeClaim (a StatefulSet's claims).
    pub persistentvolumeclaims: Vec<Object>,
    /// Every `batch/v1` Job.
    pub jobs: Vec<Object>,
    /// Every `batch/v1` CronJob.
    pub cronjobs: Vec<Object>,
    /// Every Namespace.
    pub namespaces: Vec<Object>,
    /// Every ServiceAccount.
    pub serviceaccounts: Vec<Object>,
    /// Every Node (edge nodes carry `node-role.kubernetes.io/edge`).
    pub nodes: Vec<Object>,
    /// Every `devices.kubeedge.io` Device.
    pub devices: Vec<Object>,
    /// Every `devices.kubeedge.io` DeviceStatus (dependents of Devices).
    pub devicestatuses: Vec<Object>,
}

/// The kinds in the order [`World::load`] reads them: dependents before their owners, so a
/// dependent seen has its owner in the snapshot unless the owner is really gone (owners are
/// created before their dependents).
const LOAD_ORDER: &[&str] = &[
    "pods",
    "persistentvolumeclaims",
    "controllerrevisions",
    "replicasets",
    "jobs",
    "deployments",
    "daemonsets",
    "statefulsets",
    "cronjobs",
    "serviceaccounts",
    "namespaces",
    "nodes",
    "devicestatuses",
    "devices",
];

impl World {
    /// Reads every kind the controllers watch from the store.
    pub fn load(store: &Store) -> World {
        Self::load_kinds(store, LOAD_ORDER)
    }

    /// Reads only `kinds` (a controller's own: each pass of each controller reads them all,
    /// and a fleet's pods are most of the store), in [`LOAD_ORDER`].
    pub fn load_kinds(store: &Store, kinds: &[&str]) -> World {
        Self::load_narrowed(store, kinds, Narrowing::default())
    }

    /// [`World::load_kinds`], leaving out what `narrowing` says the controller cannot act on.
    pub fn load_narrowed(store: &Store, kinds: &[&str], narrowing: Narrowing) -> World {
        Self::load_with(store, kinds, narrowing, &Indexes::default())
    }

    /// [`World::load_narrowed`], reading from `indexes` (kept by watches) instead of scanning
    /// the store where they have been listed: the kinds `narrowing` keeps to owned objects
    /// from the owned index, and the pods from the pod index, which gives those the workload
    /// objects loaded control or may adopt.
    pub fn load_with(
        store: &Store,
        kinds: &[&str],
        narrowing: Narrowing,
        indexes: &Indexes,
    ) -> World {
        let owned = indexes.owned.as_deref();
        let present = |kind: &str| {
            KeyRange::kind(kind).is_ok_and(|range| store.scan(&range).flatten().next().is_some())
        };
        let gated_out = !narrowing.gates.is_empty() && !narrowing.gates.iter().any(|g| present(g));
        let mut world = World::default();
        // Pods from the pod index are read last, when the workloads that select them are known.
        let pods_indexed = indexes.pods.as_deref().filter(|i| i.progress().listed());
        for kind in LOAD_ORDER.iter().filter(|k| kinds.contains(k)) {
            if (gated_out && narrowing.gated.contains(kind))
                || (*kind == "pods" && pods_indexed.is_some())
            {
                continue;
            }
            let Ok(range) = KeyRange::kind(kind) else {
                continue;
            };
            let owned_only = narrowing.owned_only.contains(kind);
            let indexed = owned
                .filter(|_| owned_only)
                .and_then(|index| index.objects(kind));
            let objects: Vec<Object> = match indexed {
                Some(objects) => objects,
                None => store
                    .scan(&range)
                    .flatten()
                    // A byte search is much cheaper than parsing an object to find it has no
                    // owner (a false match is only parsed for nothing).
                    .filter(|(_, v)| !owned_only || contains(&v.object, OWNER_REFERENCES))
                    .filter_map(|(_, v)| object::decode_stored(&v.object, v.revision).ok())
                    .collect(),
            };
            match *kind {
                "pods" => world.pods = objects,
                "replicasets" => world.replicasets = objects,
                "deployments" => world.deployments = objects,
                "daemonsets" => world.daemonsets = objects,
                "statefulsets" => world.statefulsets = objects,
                "controllerrevisions" => world.controllerrevisions = objects,
                "persistentvolumeclaims" => world.persistentvolumeclaims = objects,
                "jobs" => world.jobs = objects,
                "cronjobs" => world.cronjobs = objects,
                "namespaces" => world.namespaces = objects,
                "serviceaccounts" => world.serviceaccounts = objects,
                "nodes" => world.nodes = objects,
                "devices" => world.devices = objects,
                "devicestatuses" => world.devicestatuses = objects,
                _ => {}
            }
        }
        if let Some(index) = pods_indexed.filter(|_| !gated_out) {
            world.pods = world.selected_pods(store, index);
        }
        world
    }

    /// The pods `index` says this world's workloads control or may adopt, read from `store`.
    fn selected_pods(&self, store: &Store, index: &pod_index::PodIndex) -> Vec<Object> {
        let owners: Vec<pod_index::Owner<'_>> = [
            &self.replicasets,
            &self.daemonsets,
            &self.statefulsets,
            &self.jobs,
        ]
        .into_iter()
        .flatten()
        .map(pod_index::Owner::of)
        .collect();
        let keys = index.select(&owners).unwrap_or_default();
        keys.iter()
            .filter_map(|key| store.get(key).ok().flatten())
            .filter_map(|v| object::decode_stored(&v.object, v.revision).ok())
            .collect()
    }

    /// The pods of `namespace`.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
        self.pods
            .iter()
            .filter(move |p| object::namespace(p) == namespace)
    }
}

/// The watch-kept indexes a controller's passes read instead of scanning the store.
#[derive(Clone, Default)]
pub struct Indexes {
    /// The garbage collector's owned dependents.
    pub owned: Option<Arc<owned::OwnedIndex>>,
    /// The workload controllers' pods.
    pub pods: Option<Arc<pod_index::PodIndex>>,
}

impl Indexes {
    /// These indexes, less those that have not reflected every change up to `revision`
    /// within `limit` (a pass then scans the store for their kinds).
    async fn caught_up(&self, revision: Revision, limit: Duration) -> Indexes {
        let mut ready = Indexes::default();
        if let Some(owned) = &self.owned {
            if owned.progress().wait_for(revision, limit).await {
                ready.owned = Some(owned.clone());
            }
        }
        if let Some(pods) = &self.pods {
            if pods.progress().wait_for(revision, limit).await {
                ready.pods = Some(pods.clone());
            }
        }
        ready
    }
}

/// What a controller's passes can leave out of its [`World`]: a fleet's pods and nodes are
/// most of the store, and a pass runs at least every [`RESYNC`], so reading (and parsing)
/// every one of them each second for each controller costs the cloud most of a core at
/// 10,000 pods even when no workload exists.
#[derive(Debug, Clone, Copy, Default)]
pub struct Narrowing {
    /// Kinds read only while the store holds an object of one of [`Narrowing::gates`] (a
    /// ReplicaSet controller without ReplicaSets has no pod to look at); nothing is gated when
    /// `gates` is empty.
    pub gated: &'static [&'static str],
    /// See [`Narrowing::gated`].
    pub gates: &'static [&'static str],
    /// Kinds of which only objects with `ownerReferences` are read (the garbage collector's
    /// dependents that are never owners).
    pub owned_only: &'static [&'static str],
}

const OWNER_REFERENCES: &[u8] = b"\"ownerReferences\"";

/// Whether `needle` occurs in `haystack`. memchr's SIMD search: every change is searched by
/// every controller for `ownerReferences`, and a comparison per byte offset (as
/// `windows().any()` does) was among the cloud's top symbols in a 5,000-node status flood.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// One write a controller wants. `resource` is the plural (the store kind).
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// POST the object into its namespace.
    Create {
        resource: &'static str,
        namespace: String,
        object: Value,
    },
    /// PUT the object (its `metadata.resourceVersion` is the precondition).
    Update {
        resource: &'static str,
        object: Value,
    },
    /// PUT the object's `/status`.
    UpdateStatus {
        resource: &'static str,
        object: Value,
    },
    /// DELETE, with the uid as a precondition (never deletes a newer object of that name).
    Delete {
        resource: &'static str,
        namespace: String,
        name: String,
        uid: String,
    },
}

impl Action {
    /// The object's name (the generated prefix for a create), for logs and tests.
    pub fn name(&self) -> String {
        match self {
            Action::Create { object, .. } => {
                let o = object.as_object().cloned().unwrap_or_default();
                let name = object::name(&o);
                if name.is_empty() {
                    object::meta_str(&o, "generateName")
                        .unwrap_or_default()
                        .to_owned()
                } else {
                    name.to_owned()
                }
            }
            Action::Update { object, .. } | Action::UpdateStatus { object, .. } => object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            Action::Delete { name, .. } => name.clone(),
        }
    }
}

// ---- object helpers shared by the controllers ----

pub(crate) fn uid(o: &Object) -> &str {
    object::meta_str(o, "uid").unwrap_or_default()
}

pub(crate) fn generation(o: &Object) -> i64 {
    object::meta(o)
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

pub(crate) fn annotation<'a>(o: &'a Object, key: &str) -> Option<&'a str> {
    object::meta(o)?.get("annotations")?.get(key)?.as_str()
}

pub(crate) fn label<'a>(o: &'a Object, key: &str) -> Option<&'a str> {
    object::labels(o)?.get(key)?.as_str()
}

pub(crate) fn is_terminating(o: &Object) -> bool {
    object::meta(o).is_some_and(|m| m.contains_key("deletionTimestamp"))
}

pub(crate) fn owner_references(o: &Object) -> &[Value] {
    object::meta(o)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The uid of the object's controller (its ownerReference with `controller: true`).
pub(crate) fn controller_uid(o: &Object) -> Option<&str> {
    owner_references(o)
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .and_then(|r| r.get("uid")?.as_str())
}

pub(crate) fn is_controlled_by(o: &Object, owner: &Object) -> bool {
    controller_uid(o).is_some_and(|u| u == uid(owner))
}

/// A pod from `owner`'s `spec.template` (its labels, annotations and spec), named
/// `<owner>-<5 random characters>` by the API (`generateName`), controlled by `owner` (of
/// `api_version`/`kind`): what ReplicaSets and Jobs create.
pub(crate) fn pod_from_template(owner: &Object, api_version: &str, kind: &str) -> Value {
    let template = owner.get("spec").and_then(|s| s.get("template"));
    let template_meta = template.and_then(|t| t.get("metadata"));
    let mut metadata = json!({
        "generateName": format!("{}-", object::name(owner)),
        "namespace": object::namespace(owner),
        "ownerReferences": [controller_reference(owner, api_version, kind)],
    });
    for field in ["labels", "annotations"] {
        if let Some(v) = template_meta.and_then(|m| m.get(field)) {
            metadata[field] = v.clone();
        }
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.and_then(|t| t.get("spec")).cloned().unwrap_or_else(|| json!({})),
    })
}

/// The ownerReference a controller puts on what it creates.
pub(crate) fn controller_reference(owner: &Object, api_version: &str, kind: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": object::name(owner),
        "uid": uid(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Adoption and release, as upstream's `ControllerRefManager`: an object of `candidates` (the
/// owner's namespace) that has no controller and matches `owner`'s `spec.selector` is adopted
/// (a controller ownerReference added); one it controls that no longer matches is released
/// (the reference removed). Objects being deleted are left alone, and a deleted owner adopts
/// nothing.
pub(crate) fn claim<'a>(
    owner: &Object,
    api_version: &str,
    kind: &str,
    resource: &'static str,
    candidates: impl Iterator<Item = &'a Object>,
) -> Vec<Action> {
    let Some(selector) = owner
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(|s| LabelSelector::from_label_selector(s).ok())
        .filter(|s| !s.is_empty())
    else {
        return Vec::new();
    };
    let mut actions = Vec::new();
    for candidate in candidates {
        if is_terminating(candidate) || object::namespace(candidate) != object::namespace(owner) {
            continue;
        }
        let matches = selector.matches(candidate);
        let refs = owner_references(candidate);
        let updated_refs = match controller_uid(candidate) {
            None if matches && !is_terminating(owner) => {
                let mut refs = refs.to_vec();
                refs.push(controller_reference(owner, api_version, kind));
                refs
            }
            Some(u) if u == uid(owner) && !matches => refs
                .iter()
                .filter(|r| r.get("uid").and_then(Value::as_str) != Some(u))
                .cloned()
                .collect(),
            _ => continue,
        };
        let mut updated = candidate.clone();
        object::meta_mut(&mut updated).insert("ownerReferences".into(), json!(updated_refs));
        actions.push(Action::Update {
            resource,
            object: Value::Object(updated),
        });
    }
    actions
}

pub(crate) fn spec_i64(o: &Object, field: &str) -> Option<i64> {
    o.get("spec")?.get(field)?.as_i64()
}

pub(crate) fn status_i64(o: &Object, field: &str) -> i64 {
    o.get("status")
        .and_then(|s| s.get(field))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// `spec.replicas` of a Deployment or ReplicaSet (1 when absent, as defaulted).
pub(crate) fn replicas(o: &Object) -> i64 {
    spec_i64(o, "replicas").unwrap_or(1)
}

fn pod_condition<'a>(pod: &'a Object, kind: &str) -> Option<&'a Value> {
    pod.get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

pub(crate) fn pod_ready(pod: &Object) -> bool {
    pod_condition(pod, "Ready").and_then(|c| c.get("status")?.as_str()) == Some("True")
}

/// Ready for at least `min_ready_seconds` at `now` (Kubernetes' "available").
pub(crate) fn pod_available(pod: &Object, min_ready_seconds: i64, now: i64) -> bool {
    if !pod_ready(pod) {
        return false;
    }
    if min_ready_seconds <= 0 {
        return true;
    }
    pod_condition(pod, "Ready")
        .and_then(|c| c.get("lastTransitionTime")?.as_str())
        .and_then(object::parse_rfc3339)
        .is_some_and(|since| since + min_ready_seconds <= now)
}

/// A pod that counts toward its controller's replicas: not being deleted, not finished.
pub(crate) fn pod_active(pod: &Object) -> bool {
    let phase = pod
        .get("status")
        .and_then(|s| s.get("phase"))
        .and_then(Value::as_str);
    !is_terminating(pod) && !matches!(phase, Some("Succeeded" | "Failed"))
}

pub(crate) fn node_name(pod: &Object) -> Option<&str> {
    pod.get("spec")?
        .get("nodeName")?
        .as_str()
        .filter(|n| !n.is_empty())
}

/// An int-or-percent (`maxSurge`, `maxUnavailable`) scaled to `total`: `n`, or `n%` of `total`
/// rounded up or down (Kubernetes' `GetScaledValueFromIntOrPercent`).
pub(crate) fn int_or_percent(
    value: Option<&Value>,
    default: i64,
    total: i64,
    round_up: bool,
) -> i64 {
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(default),
        Some(Value::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
            Some(p) if round_up => (p * total + 99) / 100,
            Some(p) => p * total / 100,
            None => s.parse().unwrap_or(default),
        },
        _ => default,
    }
}

/// `value` without nulls, empty objects and empty arrays, at any depth: the JSON a Go client
/// writes for a typed object (`"creationTimestamp": null`, `"resources": {}`) and the JSON
/// another client writes for the same object then hash alike.
fn pruned(value: &Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Object(map) => {
            let kept: serde_json::Map<String, Value> = map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), pruned(v)?)))
                .collect();
            (!kept.is_empty()).then_some(Value::Object(kept))
        }
        Value::Array(items) => {
            (!items.is_empty()).then(|| Value::Array(items.iter().filter_map(pruned).collect()))
        }
        other => Some(other.clone()),
    }
}

/// A short, name-safe hash of a pod template: FNV-1a (32 bit) of its canonical JSON (keys
/// sorted, empty fields dropped), written with Kubernetes' `SafeEncodeString` alphabet (no
/// vowels, no 0/1/3), as `pod-template-hash` values look (`5d8f7c9b6`).
pub fn template_hash(template: &Value) -> String {
    let canonical = pruned(template).map(|v| v.to_string()).unwrap_or_default();
    let mut hash: u32 = 0x811c_9dc5;
    for b in canonical.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    hash.to_string()
        .bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// `labels` with `key=value` added.
pub(crate) fn with_label(labels: Option<&Value>, key: &str, value: &str) -> Value {
    let mut map = labels
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    map.insert(key.to_owned(), json!(value));
    Value::Object(map)
}

/// A condition list with `condition` set (by `type`); `lastTransitionTime` is kept when the
/// status did not change, `lastUpdateTime` when nothing did.
pub(crate) fn set_condition(conditions: &mut Vec<Value>, mut condition: Value, now: &str) {
    let kind = condition["type"].clone();
    let previous = conditions.iter().position(|c| c["type"] == kind);
    let (transition, update) = match previous.map(|i| &conditions[i]) {
        Some(p) if p["status"] == condition["status"] => {
            let same = p["reason"] == condition["reason"] && p["message"] == condition["message"];
            (
                p["lastTransitionTime"].clone(),
                if same {
                    p["lastUpdateTime"].clone()
                } else {
                    json!(now)
                },
            )
        }
        _ => (json!(now), json!(now)),
    };
    condition["lastTransitionTime"] = transition;
    condition["lastUpdateTime"] = update;
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// An RFC 3339 timestamp of Unix seconds.
pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(object::rfc3339)
        .unwrap_or_default()
}

// ---- the shell ----

/// Calls the API in process, as a client would (the same router, the same policy).
#[derive(Clone)]
pub struct ApiClient {
    router: Router,
}

/// A failed call: the HTTP code and the Status message.
#[derive(Debug)]
pub struct CallError {
    /// The HTTP status code (409 for a stale resourceVersion, 404 for a vanished object...).
    pub code: u16,
    /// The Kubernetes `Status` message.
    pub message: String,
}

/// The User-Agent of the controllers' API calls (kube-controller-manager's, so server-side
/// apply names their fields' manager as Kubernetes does).
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager/v1.32.0 (kedge)";

impl ApiClient {
    /// A client of `router` (an [`replication::api::ApiServer`]'s).
    pub fn new(router: Router) -> Self {
        ApiClient { router }
    }

    async fn call(
        &self,
        method: Method,
        uri: String,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            // Their writes' manager in managedFields, as kube-apiserver names the controllers'.
            .header(header::USER_AGENT, CONTROLLER_MANAGER)
            .body(Body::from(bytes))
            .map_err(|e| CallError {
                code: 400,
                message: e.to_string(),
            })?;
        let response = match self.router.clone().oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let code = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .unwrap_or_default();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if (200..300).contains(&code) {
            Ok(value)
        } else {
            Err(CallError {
                code,
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            })
        }
    }

    /// Applies one action.
    pub async fn apply(&self, action: &Action) -> Result<Value, CallError> {
        let base = |resource: &str, namespace: &str| {
            let r = resources::by_store_kind(resource).expect("a served resource");
            format!(
                "{}/namespaces/{namespace}/{}",
                r.group_version_path(),
                r.plural
            )
        };
        let item = |resource: &str, object: &Value| {
            let ns = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            format!("{}/{name}", base(resource, ns))
        };
        match action {
            Action::Create {
                resource,
                namespace,
                object,
            } => {
                self.call(
                    Method::POST,
                    base(resource, namespace),
                    Some(object.clone()),
                )
                .await
            }
            Action::Update { resource, object } => {
                self.call(Method::PUT, item(resource, object), Some(object.clone()))
                    .await
            }
            Action::UpdateStatus { resource, object } => {
                let uri = format!("{}/status", item(resource, object));
                self.call(Method::PUT, uri, Some(object.clone())).await
            }
            Action::Delete {
                resource,
                namespace,
                name,
                uid,
            } => {
                let uri = format!("{}/{name}", base(resource, namespace));
                let options = json!({"kind": "DeleteOptions", "apiVersion": "v1",
                    "propagationPolicy": "Background", "preconditions": {"uid": uid}});
                self.call(Method::DELETE, uri, Some(options)).await
            }
        }
    }
}

/// A controller's pure core.
pub type Reconcile = fn(&World, i64) -> Vec<Action>;

/// Whether a change of `kind` calls for a pass. Without any workload object, a pod or node
/// change matters only to a pod that has owners (the garbage collector's): a fleet's pod
/// status reports then cost no pass (the resync still comes every [`RESYNC`]).
fn relevant(kinds: &[&str], owners_seen: bool, kind: &str, object: &[u8]) -> bool {
    kinds.contains(&kind)
        && (matches!(
            kind,
            "replicasets"
                | "deployments"
                | "daemonsets"
                | "jobs"
                | "cronjobs"
                | "namespaces"
                | "serviceaccounts"
        ) || owners_seen
            || contains(object, OWNER_REFERENCES))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs one controller until the store's watch closes: a pass whenever an object of `kinds`
/// changes (changes arriving together make one pass), and at least every [`RESYNC`].
pub async fn run(
    name: &'static str,
    store: Arc<Store>,
    client: ApiClient,
    kinds: &'static [&'static str],
    narrowing: Narrowing,
    indexes: Indexes,
    reconcile: Reconcile,
) {
    // Each pass reads the store: a restart of the watch is one more pass, like a change.
    let mut watcher = ResumableWatcher::all(store.clone());
    if watcher.next().await.is_err() {
        return;
    }
    let mut busy_passes: u32 = 0;
    loop {
        let snapshot = store.clone();
        // The index must reflect everything committed before this pass (our own writes
        // among them), as a read of the store would; if it lags that much, scan instead.
        let ready = indexes.caught_up(store.revision(), RESYNC).await;
        let world = match tokio::task::spawn_blocking(move || {
            World::load_with(&snapshot, kinds, narrowing, &ready)
        })
        .await
        {
            Ok(world) => world,
            Err(_) => return,
        };
        let owners_seen = !(world.replicasets.is_empty()
            && world.deployments.is_empty()
            && world.daemonsets.is_empty()
            && world.jobs.is_empty()
            && world.cronjobs.is_empty());
        let actions = reconcile(&world, now_unix());
        let mut failed = 0;
        for action in &actions {
            let before = stored_before(&store, action);
            match client.apply(action).await {
                Ok(response) => {
                    tracing::debug!(controller = name, object = %action.name(), "applied {action:?}");
                    record_event(&store, name, action, before.as_ref(), &response);
                }
                // A conflict or a vanished object: the next pass sees the new state.
                Err(e) if matches!(e.code, 404 | 409) => {
                    failed += 1;
                    tracing::debug!(controller = name, object = %action.name(), code = e.code, "{}", e.message)
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(controller = name, object = %action.name(), code = e.code, "{}", e.message)
                }
            }
        }
        if !actions.is_empty() && failed < actions.len() {
            // Our own writes changed the state: look again (they are in the store already).
            // Drain what the watch queued meanwhile, so it does not trigger a redundant pass.
            // Passes that keep writing back off after 16 in a row (20 ms doubling to 1 s): a
            // rollout takes a few passes, a bug that rewrites forever must not spin.
            while let Ok(Some(_)) = watcher.try_next() {}
            let pause =
                Duration::from_millis(20 << busy_passes.saturating_sub(16).min(6)).min(RESYNC);
            busy_passes += 1;
            tokio::time::sleep(pause).await;
            continue;
        }
        busy_passes = 0;
        let deadline = tokio::time::sleep(RESYNC);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                event = watcher.next() => match event {
                    Ok(Event::Change(change)) => {
                        if relevant(kinds, owners_seen, change.key.kind(), &change.object) {
                            // Let a burst of changes (a fleet's status reports) arrive and make
                            // one pass of it: at most one pass per DEBOUNCE.
                            tokio::time::sleep(DEBOUNCE).await;
                            while let Ok(Some(_)) = watcher.try_next() {}
                            break;
                        }
                    }
                    Ok(Event::Restart { .. }) => break,
                    Err(_) => return,
                },
                _ = &mut deadline => break,
            }
        }
    }
}

/// The object an action replaces or deletes, as stored before it (only where its Event needs
/// it: a pod's owner, a ReplicaSet's previous size).
fn stored_before(store: &Store, action: &Action) -> Option<Value> {
    let key = match action {
        Action::Delete {
            resource: "pods",
            namespace,
            name,
            ..
        } => replication::ObjectKey::new("pods", namespace, name).ok()?,
        Action::Update {
            resource: "replicasets",
            object,
        } => replication::ObjectKey::new(
            "replicasets",
            object.pointer("/metadata/namespace")?.as_str()?,
            object.pointer("/metadata/name")?.as_str()?,
        )
        .ok()?,
        _ => return None,
    };
    serde_json::from_slice(&store.get(&key).ok()??.object).ok()
}

/// The owner (controller reference) of `object`, in `namespace`.
fn controller_of(object: &Value, namespace: &str) -> Option<Involved> {
    object
        .pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r.get("controller") == Some(&Value::Bool(true)))
        .and_then(|r| Involved::owner(r, namespace))
}

/// `spec.replicas` of a JSON value holding a ReplicaSet.
fn replicas_of(object: &Value) -> i64 {
    object.as_object().map_or(0, replicas)
}

/// Records the Event upstream's controllers record for an applied action (on the owner, as
/// `kubectl describe deployment|replicaset|daemonset` shows them): `SuccessfulCreate` /
/// `SuccessfulDelete` of a pod, `ScalingReplicaSet` when a Deployment resizes a ReplicaSet.
fn record_event(
    store: &Store,
    controller: &str,
    action: &Action,
    before: Option<&Value>,
    response: &Value,
) {
    let component = format!("{controller}-controller");
    let name_of = |v: &Value| {
        v.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (owner, reason, message) = match action {
        Action::Create {
            resource: "pods",
            namespace,
            ..
        } => (
            controller_of(response, namespace),
            "SuccessfulCreate",
            format!("Created pod: {}", name_of(response)),
        ),
        Action::Delete {
            resource: "pods",
            namespace,
            name,
            ..
        } => (
            before.and_then(|b| controller_of(b, namespace)),
            "SuccessfulDelete",
            format!("Deleted pod: {name}"),
        ),
        Action::Create {
            resource: "replicasets",
            namespace,
            ..
        } => (
            controller_of(response, namespace),
            "ScalingReplicaSet",
            format!(
                "Scaled up replica set {} from 0 to {}",
                name_of(response),
                replicas_of(response)
            ),
        ),
        Action::Update {
            resource: "replicasets",
            object,
        } => {
            let (from, to) = (before.map_or(0, replicas_of), replicas_of(object));
            if from == to {
                return;
            }
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let direction = if to > from { "up" } else { "down" };
            (
                controller_of(object, namespace),
                "ScalingReplicaSet",
                format!(
                    "Scaled {direction} replica set {} from {from} to {to}",
                    name_of(object)
                ),
            )
        }
        _ => return,
    };
    if let Some(owner) = owner {
        crate::events::emit(
            store,
            &owner,
            EventType::Normal,
            reason,
            &message,
            &component,
        );
    }
}

/// Starts the controllers over `store`, writing through `router` (the embedded API), and the
/// watch that keeps the garbage collector's [`owned::OwnedIndex`].
pub fn start(store: Arc<Store>, router: Router) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ApiClient::new(router);
    let workloads: &'static [&'static str] = &[
        "pods",
        "replicasets",
        "deployments",
        "daemonsets",
        "statefulsets",
        "controllerrevisions",
        "persistentvolumeclaims",
        "jobs",
        "cronjobs",
    ];
    // The garbage collector's dependents that are never owners, kept by one watch.
    let owned_index = Arc::new(owned::OwnedIndex::new(&[
        "pods",
        "persistentvolumeclaims",
        "controllerrevisions",
    ]));
    // The workload controllers' pods: those their objects control or may adopt.
    let pods = Indexes {
        pods: Some(Arc::new(pod_index::PodIndex::default())),
        ..Indexes::default()
    };
    vec![
        tokio::spawn(owned::maintain(owned_index.clone(), store.clone())),
        tokio::spawn(owned::maintain(
            pods.pods.clone().expect("just made"),
            store.clone(),
        )),
        tokio::spawn(run(
            "replicaset",
            store.clone(),
            client.clone(),
            &["pods", "replicasets"],
            Narrowing {
                gated: &["pods"],
                gates: &["replicasets"],
                ..Narrowing::default()
            },
            pods.clone(),
            replicaset::reconcile,
        )),
        tokio::spawn(run(
            "deployment",
            store.clone(),
            client.clone(),
            &["replicasets", "deployments"],
            Narrowing::default(),
            Indexes::default(),
            deployment::reconcile,
        )),
        tokio::spawn(run(
            "daemonset",
            store.clone(),
            client.clone(),
            &["pods", "controllerrevisions", "daemonsets", "nodes"],
            Narrowing {
                gated: &["pods", "controllerrevisions", "nodes"],
                gates: &["daemonsets"],
                ..Narrowing::default()
            },
            pods.clone(),
            daemonset::reconcile,
        )),
        tokio::spawn(run(
            "statefulset",
            store.clone(),
            client.clone(),
            &[
                "pods",
                "persistentvolumeclaims",
                "controllerrevisions",
                "statefulsets",
            ],
            Narrowing {
                gated: &["pods", "persistentvolumeclaims", "controllerrevisions"],
                gates: &["statefulsets"],
                ..Narrowing::default()
            },
            pods.clone(),
            statefulset::reconcile,
        )),
        tokio::spawn(run(
            "job",
            store.clone(),
            client.clone(),
            &["pods", "jobs"],
            Narrowing {
                gated: &["pods"],
                gates: &["jobs"],
                ..Narrowing::default()
            },
            pods.clone(),
            job::reconcile,
        )),
        tokio::spawn(run(
            "cronjob",
            store.clone(),
            client.clone(),
            &["jobs", "cronjobs"],
            Narrowing::default(),
            Indexes::default(),
            cronjob::reconcile,
        )),
        tokio::spawn(run(
            "serviceaccount",
            store.clone(),
            client.clone(),
            &["namespaces", "serviceaccounts"],
            Narrowing::default(),
            Indexes::default(),
            serviceaccount::reconcile,
        )),
        tokio::spawn(run(
            "devicestatus",
            store.clone(),
            client.clone(),
            &["devices", "devicestatuses"],
            Narrowing::default(),
            Indexes::default(),
            crate::devicecontroller::reconcile,
        )),
        tokio::spawn(run(
            "garbagecollector",
            store,
            client,
            workloads,
            // Its dependents that are never owners matter only with an owner reference.
            Narrowing {
                owned_only: &["pods", "persistentvolumeclaims", "controllerrevisions"],
                ..Narrowing::default()
            },
            Indexes {
                owned: Some(owned_index),
                ..Indexes::default()
            },
            gc::reconcile,
        )),
    ]
}

#[cfg(test)]
pub(crate) mod testing {
    //! Builders for the controllers' unit tests.
    use super::*;

    pub const T0: i64 = 1_800_000_000;

    pub fn obj(v: Value) -> Object {
        v.as_object().cloned().expect("an object")
    }

    pub fn node(name: &str, ready: bool, labels: Value) -> Object {
        let status = if ready { "True" } else { "Unknown" };
        obj(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": labels,
                         "resourceVersion": "1"},
            "status": {"conditions": [{"type": "Ready", "status": status}]}}))
    }

    /// A pod created from `create` (a controller's Create action), named and bound.
    pub fn pod_from(
        create: &Action,
        name: &str,
        node: Option<&str>,
        ready_since: Option<i64>,
    ) -> Object {
        let Action::Create { object, .. } = create else {
            panic!("not a create: {create:?}");
        };
        let mut pod = obj(object.clone());
        let meta = object::meta_mut(&mut pod);
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(format!("uid-{name}")));
        meta.insert("resourceVersion".into(), json!("1"));
        meta.insert("creationTimestamp".into(), json!(rfc3339(T0)));
        if let Some(node) = node {
            pod["spec"]["nodeName"] = json!(node);
        }
        pod.insert(
            "status".into(),
            match ready_since {
                Some(t) => json!({"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": rfc3339(t)}]}),
                None => json!({"phase": "Pending"}),
            },
        );
        pod
    }

    /// What an Update/UpdateStatus action writes, as the store would then hold it.
    pub fn applied(action: &Action) -> Object {
        match action {
            Action::Update { object, .. } | Action::UpdateStatus { object, .. } => {
                obj(object.clone())
            }
            other => panic!("not an update: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_name_safe() {
        let a = template_hash(&json!({"spec": {"containers": [{"name": "c", "image": "x"}]}}));
        let b = template_hash(&json!({"spec": {"containers": [{"image": "x", "name": "c"}]}}));
        assert_eq!(a, b);
        assert!(object::is_dns1123_label(&a));
        assert_ne!(
            a,
            template_hash(&json!({"spec": {"containers": [{"name": "c", "image": "y"}]}}))
        );
        // What kubectl sends back from a ReplicaSet's template (`rollout undo`) hashes alike.
        let from_go = json!({"metadata": {"creationTimestamp": null},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": {}}]}});
        assert_eq!(a, template_hash(&from_go));
    }

    #[test]
    fn narrowing_leaves_out_pods_a_controller_cannot_act_on() {
        use replication::{ObjectKey, StoreConfig, WriteSet};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let put = |key: &str, object: Value| {
            let mut set = WriteSet::new();
            set.put(
                ObjectKey::parse(key).unwrap(),
                object.to_string().into(),
                replication::store::Precondition::None,
            );
            store.commit(set).unwrap();
        };
        put(
            "pods/default/plain",
            json!({"metadata": {"name": "plain", "namespace": "default"}}),
        );
        put(
            "pods/default/owned",
            json!({"metadata": {"name": "owned", "namespace": "default",
                "ownerReferences": [{"uid": "u1", "kind": "ReplicaSet", "name": "rs"}]}}),
        );
        let gated = Narrowing {
            gated: &["pods"],
            gates: &["replicasets"],
            ..Narrowing::default()
        };
        let kinds = &["pods", "replicasets"];
        assert!(World::load_narrowed(&store, kinds, gated).pods.is_empty());
        let owned = Narrowing {
            owned_only: &["pods"],
            ..Narrowing::default()
        };
        let world = World::load_narrowed(&store, kinds, owned);
        assert_eq!(world.pods.len(), 1);
        assert_eq!(object::name(&world.pods[0]), "owned");
        put(
            "replicasets/default/rs",
            json!({"metadata": {"name": "rs", "namespace": "default", "uid": "u1"}}),
        );
        let world = World::load_narrowed(&store, kinds, gated);
        assert_eq!((world.pods.len(), world.replicasets.len()), (2, 1));
        assert_eq!(World::load_kinds(&store, kinds).pods.len(), 2);
    }

    #[test]
    fn claim_adopts_matching_orphans_and_releases_non_matching() {
        use testing::obj;
        let owner = obj(
            json!({"metadata": {"name": "rs", "namespace": "default", "uid": "o"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}}}),
        );
        let pod = |name: &str, app: &str, owner_uid: Option<&str>| {
            let refs = owner_uid.map_or(json!([]), |u| json!([{"uid": u, "controller": true}]));
            obj(json!({"metadata": {"name": name, "namespace": "default",
                "labels": {"app": app}, "ownerReferences": refs}}))
        };
        let candidates = [
            pod("orphan", "web", None),
            pod("other-app", "db", None),
            pod("someone-elses", "web", Some("x")),
            pod("relabelled", "debug", Some("o")),
            pod("mine", "web", Some("o")),
        ];
        let actions = claim(&owner, "apps/v1", "ReplicaSet", "pods", candidates.iter());
        let names: Vec<String> = actions.iter().map(Action::name).collect();
        assert_eq!(names, ["orphan", "relabelled"]);
        let adopted = testing::applied(&actions[0]);
        assert_eq!(adopted["metadata"]["ownerReferences"][0]["uid"], "o");
        assert_eq!(
            adopted["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        let released = testing::applied(&actions[1]);
        assert_eq!(released["metadata"]["ownerReferences"], json!([]));
    }

    #[test]
    fn plain_pod_changes_wake_no_controller_without_workloads() {
        let kinds = &["pods", "replicasets"];
        let plain = br#"{"metadata":{"name":"p"},"status":{"phase":"Running"}}"#;
        let owned = br#"{"metadata":{"name":"p","ownerReferences":[{"uid":"u"}]}}"#;
        assert!(!relevant(kinds, false, "pods", plain));
        assert!(relevant(kinds, false, "pods", owned));
        assert!(relevant(kinds, true, "pods", plain));
        assert!(relevant(kinds, false, "replicasets", b"{}"));
        assert!(!relevant(kinds, true, "nodes", b"{}"));
    }

    #[test]
    fn int_or_percent_rounding() {
        assert_eq!(int_or_percent(Some(&json!("25%")), 0, 3, true), 1);
        assert_eq!(int_or_percent(Some(&json!("25%")), 0, 3, false), 0);
        assert_eq!(int_or_percent(Some(&json!(2)), 0, 3, false), 2);
        assert_eq!(int_or_percent(None, 1, 3, false), 1);
    }
}
