//! EdgeController's routing index: which node needs which object, kept up to date one change
//! at a time (never a scan per event).
//!
//! What a node receives, and why:
//! - pods with `spec.nodeName` = the node;
//! - the ConfigMaps, Secrets and PersistentVolumeClaims its pods reference (volumes, projected
//!   volumes, env `valueFrom`, `envFrom`, imagePullSecrets), reference-counted: the last pod on
//!   the node that references one going away (deleted, or moved) drops it from the node;
//! - its own Node object. Not its Lease: the node renews it with a heartbeat frame and the
//!   cloud writes it, so sending it back would be ~1 KB down per renewal for nothing;
//! - devices (KubeEdge's `devices.kubeedge.io` Device) with `spec.nodeName` = the node, and the
//!   DeviceModels they use (`spec.deviceModelRef`), reference-counted like a pod's ConfigMaps;
//! - Services, Endpoints and EndpointSlices of the namespaces it runs pods in. Scope: a pod
//!   resolves services of its own namespace (and KubeEdge's EdgeMesh needs them for those), so
//!   this serves local discovery while keeping a fleet of thousands of nodes from receiving
//!   every service of the cluster; cross-namespace lookups go to the cloud as queries.
//! - objects the node asked for (a get its MetaServer could not serve from the cache): from
//!   then on they are routed like the rest, so the node's copy follows the cloud's (an
//!   *interest*, kept until the node is removed; persisted beside ObjectSync);
//! - collections the node listed (a kind in a namespace, or in all namespaces, that its
//!   MetaServer did not hold): every object of it, from then on (a *collection interest*,
//!   kept and persisted the same way). Label and field selectors are applied on the node, so
//!   one subscription serves every selector.
//!
//! The index is sans-IO: [`RoutingIndex::observe`] takes one object change and returns the
//! [`HoldingChange`]s it causes (a node now wants, or must drop, a [`Holding`]); the caller
//! (EdgeController) turns them into feed updates. Names: a *holding* is what a node should hold;
//! `transport::Route` is something else (KubeEdge's message route).

use std::collections::HashMap;
use std::sync::Arc;

use replication::api::object::Object;
use replication::ObjectKey;
use serde_json::Value;

/// What a node should hold: one object, or a set of them named by a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holding {
    /// One object (its current state, or its deletion).
    Object(ObjectKey),
    /// Every Service, Endpoints and EndpointSlice of a namespace (expanded by the caller with a
    /// namespace-range read when a node's first pod lands in the namespace).
    NamespaceServices(String),
    /// Every object of a store kind in a namespace (`""`: all namespaces): a collection the
    /// node listed through its MetaServer (expanded by the caller with a range read).
    Collection { kind: String, namespace: String },
}

/// Whether a node gains or loses a [`Holding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// The node should hold its current state (sent again when it changes).
    Want,
    /// The node should no longer hold it.
    Drop,
}

/// One node's [`Holding`] gained or lost, as [`RoutingIndex::observe`] returns them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldingChange {
    /// The node's name.
    pub node: Arc<str>,
    /// What it gains or loses.
    pub holding: Holding,
    /// Gains or loses.
    pub action: Action,
}

/// Kinds whose objects follow the pods (or devices) that reference them.
pub const REFERENCED_KINDS: &[&str] = &[
    "configmaps",
    "secrets",
    "persistentvolumeclaims",
    "devicemodels",
    "devicestatuses",
];
/// Kinds bound to one node by `spec.nodeName`.
pub const BOUND_KINDS: &[&str] = &["pods", "devices"];
/// Kinds routed to nodes with pods in their namespace.
pub const SERVICE_KINDS: &[&str] = &["services", "endpoints", "endpointslices"];

struct PodRoute {
    node: Arc<str>,
    references: Vec<ObjectKey>,
}

#[derive(Default)]
pub struct RoutingIndex {
    nodes: HashMap<String, Arc<str>>,
    pods: HashMap<ObjectKey, PodRoute>,
    /// Referenced object → node → number of that node's pods referencing it.
    references: HashMap<ObjectKey, HashMap<Arc<str>, u32>>,
    /// Namespace → node → number of that node's pods in it.
    namespaces: HashMap<String, HashMap<Arc<str>, u32>>,
    /// Object → the nodes that asked for it.
    interests: HashMap<ObjectKey, Vec<Arc<str>>>,
    /// Store kind → the (namespace, `""` for all, node) collections nodes listed.
    collections: HashMap<String, Vec<(String, Arc<str>)>>,
}

pub(crate) fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut current = value;
    for part in path {
        current = current.get(part)?;
    }
    current.as_str().filter(|s| !s.is_empty())
}

/// The ConfigMaps, Secrets and PVCs a pod references, as keys in the pod's namespace.
pub fn pod_references(namespace: &str, pod: &Object) -> Vec<ObjectKey> {
    let mut out: Vec<ObjectKey> = Vec::new();
    let mut add = |kind: &str, name: Option<&str>| {
        if let Some(key) = name.and_then(|n| ObjectKey::new(kind, namespace, n).ok()) {
            if !out.contains(&key) {
                out.push(key);
            }
        }
    };
    let Some(spec) = pod.get("spec") else {
        return out;
    };
    for volume in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add("configmaps", str_at(volume, &["configMap", "name"]));
        add("secrets", str_at(volume, &["secret", "secretName"]));
        add(
            "persistentvolumeclaims",
            str_at(volume, &["persistentVolumeClaim", "claimName"]),
        );
        let sources = volume
            .get("projected")
            .and_then(|p| p.get("sources"))
            .and_then(Value::as_array);
        for source in sources.into_iter().flatten() {
            add("configmaps", str_at(source, &["configMap", "name"]));
            add("secrets", str_at(source, &["secret", "name"]));
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for container in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for env in container
                .get("env")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                add(
                    "configmaps",
                    str_at(env, &["valueFrom", "configMapKeyRef", "name"]),
                );
                add(
                    "secrets",
                    str_at(env, &["valueFrom", "secretKeyRef", "name"]),
                );
            }
            for from in container
                .get("envFrom")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                add("configmaps", str_at(from, &["configMapRef", "name"]));
                add("secrets", str_at(from, &["secretRef", "name"]));
            }
        }
    }
    for secret in spec
        .get("imagePullSecrets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add("secrets", str_at(secret, &["name"]));
    }
    out
}

fn increment<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K) -> bool {
    let count = counts.entry(key).or_insert(0);
    *count += 1;
    *count == 1
}

/// Decrements; true when the count reached zero (and the entry is removed).
fn decrement(counts: &mut HashMap<Arc<str>, u32>, node: &Arc<str>) -> bool {
    match counts.get_mut(node) {
        Some(count) if *count > 1 => {
            *count -= 1;
            false
        }
        Some(_) => {
            counts.remove(node);
            true
        }
        None => false,
    }
}

impl RoutingIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn intern(&mut self, node: &str) -> Arc<str> {
        if let Some(n) = self.nodes.get(node) {
            return n.clone();
        }
        let n: Arc<str> = node.into();
        self.nodes.insert(node.to_owned(), n.clone());
        n
    }

    /// Records that `node` asked for `key`; true if it is new (the node does not hold it yet).
    pub fn add_interest(&mut self, node: &str, key: &ObjectKey) -> bool {
        let node = self.intern(node);
        let nodes = self.interests.entry(key.clone()).or_default();
        if nodes.contains(&node) {
            return false;
        }
        nodes.push(node);
        true
    }

    /// Whether `node` asked for `key`, by name or by listing its collection (it keeps the
    /// object even when no pod references it).
    pub fn is_interested(&self, node: &str, key: &ObjectKey) -> bool {
        self.interests
            .get(key)
            .is_some_and(|nodes| nodes.iter().any(|n| &**n == node))
            || self.covers(node, key.kind(), key.namespace())
    }

    /// Records that `node` listed `kind` in `namespace` (`""`: all namespaces); true if that
    /// collection is new to the node (not covered by one it already has).
    pub fn add_collection(&mut self, node: &str, kind: &str, namespace: &str) -> bool {
        if self.covers(node, kind, namespace) {
            return false;
        }
        let node = self.intern(node);
        self.collections
            .entry(kind.to_owned())
            .or_default()
            .push((namespace.to_owned(), node));
        true
    }

    /// Whether a collection `node` listed covers `kind` in `namespace` (`""`: only a collection
    /// of all namespaces covers all namespaces).
    pub fn covers(&self, node: &str, kind: &str, namespace: &str) -> bool {
        self.collections.get(kind).is_some_and(|list| {
            list.iter()
                .any(|(ns, n)| &**n == node && (ns.is_empty() || ns == namespace))
        })
    }

    /// Whether `key` is routed to `node` now.
    pub fn holds(&self, node: &str, key: &ObjectKey) -> bool {
        self.nodes_for(key).iter().any(|n| &**n == node)
    }

    /// The nodes that hold `key` now (whose copy must follow its changes).
    pub fn nodes_for(&self, key: &ObjectKey) -> Vec<Arc<str>> {
        let mut nodes = self.routed_nodes(key);
        for node in self.interests.get(key).into_iter().flatten() {
            if !nodes.contains(node) {
                nodes.push(node.clone());
            }
        }
        for (ns, node) in self.collections.get(key.kind()).into_iter().flatten() {
            if (ns.is_empty() || ns == key.namespace()) && !nodes.contains(node) {
                nodes.push(node.clone());
            }
        }
        nodes
    }

    fn routed_nodes(&self, key: &ObjectKey) -> Vec<Arc<str>> {
        match key.kind() {
            kind if BOUND_KINDS.contains(&kind) => self
                .pods
                .get(key)
                .map(|p| vec![p.node.clone()])
                .unwrap_or_default(),
            kind if REFERENCED_KINDS.contains(&kind) => self
                .references
                .get(key)
                .map(|nodes| nodes.keys().cloned().collect())
                .unwrap_or_default(),
            kind if SERVICE_KINDS.contains(&kind) => self
                .namespaces
                .get(key.namespace())
                .map(|nodes| nodes.keys().cloned().collect())
                .unwrap_or_default(),
            "nodes" => vec![key.name().into()],
            _ => Vec::new(),
        }
    }

    /// Folds in one change (`object` is `None` for a delete) and returns the routes it changes:
    /// for the object itself, `Want` for every node that holds it after the change (so the new
    /// state is sent) and `Drop` for nodes that no longer do; for a pod, also the references and
    /// namespaces that its node gained or lost.
    pub fn observe(&mut self, key: &ObjectKey, object: Option<&Object>) -> Vec<HoldingChange> {
        if BOUND_KINDS.contains(&key.kind()) {
            return self.observe_pod(key, object);
        }
        let action = if object.is_some() {
            Action::Want
        } else {
            Action::Drop
        };
        self.nodes_for(key)
            .into_iter()
            .map(|node| HoldingChange {
                node,
                holding: Holding::Object(key.clone()),
                action,
            })
            .collect()
    }

    fn observe_pod(&mut self, key: &ObjectKey, pod: Option<&Object>) -> Vec<HoldingChange> {
        let mut routes = Vec::new();
        let new = pod.and_then(|pod| {
            let node = pod
                .get("spec")?
                .get("nodeName")?
                .as_str()
                .filter(|n| !n.is_empty())?;
            let references = if key.kind() == "pods" {
                pod_references(key.namespace(), pod)
            } else {
                crate::devicecontroller::device_references(key.namespace(), pod)
            };
            Some(PodRoute {
                node: self.intern(node),
                references,
            })
        });
        let old = self.pods.remove(key);
        let namespace = key.namespace().to_owned();
        // A node gets the Services of the namespaces it runs pods in (devices bring none).
        let services = key.kind() == "pods";
        let object = |node: &Arc<str>, action| HoldingChange {
            node: node.clone(),
            holding: Holding::Object(key.clone()),
            action,
        };
        // Gains first, then losses: a reference the pod keeps on the same node never flaps.
        if let Some(new) = &new {
            routes.push(object(&new.node, Action::Want));
            for reference in &new.references {
                let counts = self.references.entry(reference.clone()).or_default();
                if increment(counts, new.node.clone()) {
                    routes.push(HoldingChange {
                        node: new.node.clone(),
                        holding: Holding::Object(reference.clone()),
                        action: Action::Want,
                    });
                }
            }
            if services {
                let counts = self.namespaces.entry(namespace.clone()).or_default();
                if increment(counts, new.node.clone()) {
                    routes.push(HoldingChange {
                        node: new.node.clone(),
                        holding: Holding::NamespaceServices(namespace.clone()),
                        action: Action::Want,
                    });
                }
            }
        }
        if let Some(old) = &old {
            if new.as_ref().is_none_or(|n| n.node != old.node) {
                routes.push(object(&old.node, Action::Drop));
            }
            for reference in &old.references {
                let Some(counts) = self.references.get_mut(reference) else {
                    continue;
                };
                if decrement(counts, &old.node) {
                    routes.push(HoldingChange {
                        node: old.node.clone(),
                        holding: Holding::Object(reference.clone()),
                        action: Action::Drop,
                    });
                }
                if counts.is_empty() {
                    self.references.remove(reference);
                }
            }
            if let Some(counts) = self.namespaces.get_mut(&namespace).filter(|_| services) {
                if decrement(counts, &old.node) {
                    routes.push(HoldingChange {
                        node: old.node.clone(),
                        holding: Holding::NamespaceServices(namespace.clone()),
                        action: Action::Drop,
                    });
                }
                if counts.is_empty() {
                    self.namespaces.remove(&namespace);
                }
            }
        }
        if let Some(new) = new {
            self.pods.insert(key.clone(), new);
        }
        routes
    }

    /// Pods routed, for metrics and tests.
    pub fn pod_count(&self) -> usize {
        self.pods.keys().filter(|k| k.kind() == "pods").count()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    fn pod(node: &str, configmaps: &[&str], secrets: &[&str]) -> Object {
        let env: Vec<Value> = configmaps
            .iter()
            .map(
                |c| json!({"name": "E", "valueFrom": {"configMapKeyRef": {"name": c, "key": "k"}}}),
            )
            .collect();
        let volumes: Vec<Value> = secrets
            .iter()
            .map(|s| json!({"name": s, "secret": {"secretName": s}}))
            .collect();
        serde_json::from_value(json!({"spec": {"nodeName": node, "volumes": volumes,
            "containers": [{"name": "c", "image": "i", "env": env}]}}))
        .unwrap()
    }

    fn route(node: &str, target: &str, action: Action) -> HoldingChange {
        let holding = if let Some(ns) = target.strip_prefix("ns:") {
            Holding::NamespaceServices(ns.to_owned())
        } else {
            Holding::Object(key(target))
        };
        HoldingChange {
            node: node.into(),
            holding,
            action,
        }
    }

    #[test]
    fn references_are_counted_and_follow_moves() {
        let mut index = RoutingIndex::new();
        let p1 = key("pods/default/p1");
        let p2 = key("pods/default/p2");
        let routes = index.observe(&p1, Some(&pod("a", &["cm"], &["s"])));
        assert_eq!(
            routes,
            vec![
                route("a", "pods/default/p1", Action::Want),
                route("a", "secrets/default/s", Action::Want),
                route("a", "configmaps/default/cm", Action::Want),
                route("a", "ns:default", Action::Want),
            ]
        );
        // A second pod sharing the ConfigMap: only the pod itself is new.
        assert_eq!(
            index.observe(&p2, Some(&pod("a", &["cm"], &[]))),
            vec![route("a", "pods/default/p2", Action::Want)]
        );
        // A change to the ConfigMap goes to the one node holding it.
        assert_eq!(
            index.nodes_for(&key("configmaps/default/cm")),
            vec![Arc::<str>::from("a")]
        );
        // p1 moves to b (delete and re-create with another nodeName, as controllers do).
        let routes = index.observe(&p1, Some(&pod("b", &["cm"], &["s"])));
        let routes: BTreeSet<_> = routes.into_iter().collect();
        let expected: BTreeSet<_> = [
            route("b", "pods/default/p1", Action::Want),
            route("b", "configmaps/default/cm", Action::Want),
            route("b", "secrets/default/s", Action::Want),
            route("b", "ns:default", Action::Want),
            route("a", "pods/default/p1", Action::Drop),
            route("a", "secrets/default/s", Action::Drop),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            routes, expected,
            "a keeps cm (p2 still uses it) and the namespace"
        );
        // Deleting p2 drops the last references on a.
        let routes: BTreeSet<_> = index.observe(&p2, None).into_iter().collect();
        let expected: BTreeSet<_> = [
            route("a", "pods/default/p2", Action::Drop),
            route("a", "configmaps/default/cm", Action::Drop),
            route("a", "ns:default", Action::Drop),
        ]
        .into_iter()
        .collect();
        assert_eq!(routes, expected);
        // Services of default go to b only; a node's Lease is not routed back to it.
        assert_eq!(
            index.nodes_for(&key("services/default/web")),
            vec![Arc::<str>::from("b")]
        );
        assert!(index.nodes_for(&key("services/other/web")).is_empty());
        assert!(index
            .observe(&key("leases/kube-node-lease/a"), Some(&Object::new()))
            .is_empty());
    }

    #[test]
    fn devices_follow_their_node_and_bring_their_model_and_status() {
        let mut index = RoutingIndex::new();
        let device = |node: &str| -> Object {
            serde_json::from_value(json!({"metadata": {"name": "d1", "namespace": "ns"},
                "spec": {"nodeName": node, "deviceModelRef": {"name": "thermo"}}}))
            .unwrap()
        };
        let key_d = key("devices/ns/d1");
        let routes = index.observe(&key_d, Some(&device("a")));
        assert_eq!(
            routes,
            vec![
                route("a", "devices/ns/d1", Action::Want),
                route("a", "devicemodels/ns/thermo", Action::Want),
                route("a", "devicestatuses/ns/d1", Action::Want),
            ],
            "a device brings its model and its DeviceStatus, no Services"
        );
        assert_eq!(
            index.nodes_for(&key("devicemodels/ns/thermo")),
            vec![Arc::from("a")]
        );
        // Moved to another node: the model moves with it.
        let routes = index.observe(&key_d, Some(&device("b")));
        assert!(routes.contains(&route("b", "devices/ns/d1", Action::Want)));
        assert!(routes.contains(&route("a", "devices/ns/d1", Action::Drop)));
        assert!(routes.contains(&route("a", "devicemodels/ns/thermo", Action::Drop)));
        assert!(routes.contains(&route("a", "devicestatuses/ns/d1", Action::Drop)));
        assert!(routes.contains(&route("b", "devicestatuses/ns/d1", Action::Want)));
        assert_eq!(index.pod_count(), 0);
        let routes = index.observe(&key_d, None);
        assert!(routes.contains(&route("b", "devicemodels/ns/thermo", Action::Drop)));
        assert!(index.nodes_for(&key("devicemodels/ns/thermo")).is_empty());
    }

    #[test]
    fn every_reference_form_is_found() {
        let p: Object = serde_json::from_value(json!({"spec": {
            "volumes": [
                {"name": "v1", "configMap": {"name": "cm-vol"}},
                {"name": "v2", "secret": {"secretName": "s-vol"}},
                {"name": "v3", "persistentVolumeClaim": {"claimName": "claim"}},
                {"name": "v4", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "s-proj"}}]}}
            ],
            "initContainers": [{"name": "i", "envFrom": [{"configMapRef": {"name": "cm-from"}}, {"secretRef": {"name": "s-from"}}]}],
            "containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}}]}],
            "imagePullSecrets": [{"name": "pull"}]
        }})).unwrap();
        let names: BTreeSet<String> = pod_references("ns", &p)
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        let expected: BTreeSet<String> = [
            "configmaps/ns/cm-vol",
            "secrets/ns/s-vol",
            "persistentvolumeclaims/ns/claim",
            "configmaps/ns/cm-proj",
            "secrets/ns/s-proj",
            "configmaps/ns/cm-from",
            "secrets/ns/s-from",
            "secrets/ns/s-env",
            "secrets/ns/pull",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(names, expected);
    }

    /// What each node should hold, computed from scratch over all pods (the model).
    fn model(pods: &BTreeMap<usize, (usize, Vec<usize>)>) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (p, (node, cms)) in pods {
            let node = format!("n{node}");
            out.insert((node.clone(), format!("pods/default/p{p}")));
            out.insert((node.clone(), "ns:default".to_owned()));
            for c in cms {
                out.insert((node.clone(), format!("configmaps/default/c{c}")));
            }
        }
        out
    }

    proptest! {
        /// Applying the routes the index returns, one change at a time, always gives the same
        /// holdings as recomputing them from scratch.
        #[test]
        fn incremental_routes_match_a_full_recompute(ops in proptest::collection::vec(
            (0usize..6, proptest::option::of((0usize..3, proptest::collection::vec(0usize..4, 0..3)))), 1..60)) {
            let mut index = RoutingIndex::new();
            let mut pods = BTreeMap::new();
            let mut held: BTreeSet<(String, String)> = BTreeSet::new();
            for (p, op) in ops {
                let k = key(&format!("pods/default/p{p}"));
                let routes = match &op {
                    Some((node, cms)) => {
                        let names: Vec<String> = cms.iter().map(|c| format!("c{c}")).collect();
                        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                        pods.insert(p, (*node, cms.clone()));
                        index.observe(&k, Some(&pod(&format!("n{node}"), &refs, &[])))
                    }
                    None => {
                        pods.remove(&p);
                        index.observe(&k, None)
                    }
                };
                for r in routes {
                    let target = match r.holding {
                        Holding::Object(k) => k.as_str().to_owned(),
                        Holding::NamespaceServices(ns) => format!("ns:{ns}"),
                        Holding::Collection { kind, namespace } => format!("c:{kind}/{namespace}"),
                    };
                    match r.action {
                        Action::Want => { held.insert((r.node.to_string(), target)); }
                        Action::Drop => {
                            prop_assert!(held.remove(&(r.node.to_string(), target.clone())), "drop of {target} not held");
                        }
                    }
                }
                prop_assert_eq!(&held, &model(&pods));
            }
        }
    }
}
