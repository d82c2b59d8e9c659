//! Deterministic simulation of the production cloud side: the real CloudHub core
//! (`HubCore`), with its real EdgeController, routing index, node feeds, report handling and
//! Lease renewals, fed by the real store's watch (`ResumableWatcher`), against real edge
//! replicas — no QUIC, a simulated clock, links as in-order pipes with random delays.
//!
//! Random operations: pods (Kubernetes JSON, with configMap volumes and secret env
//! references) created, updated, moved between nodes, unscheduled and deleted; ConfigMaps,
//! Secrets and Services written and deleted; reads forwarded by nodes (interests);
//! heartbeats; status reports from the edges (some racing API writes); links that drop,
//! pause and resume; cloud restarts (with and without ObjectSync persisted, and with it lost);
//! edge restarts and lost edge disks. At quiescence every edge must hold exactly, version by
//! version and byte by byte, what an independent model of the routing rules says it should
//! (its Node, its pods, what they reference, the Services of their namespaces, what it asked
//! for), every outbox must be drained and every report still owed must have landed.
//!
//! `SIM_SEEDS=N` runs N seeds (default 1000); `SIM_SEED=S` runs only seed S.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cloud::hub::{HubCore, Now};
use cloud::metrics::Metrics;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use replication::api::object::{self, Object};
use replication::simulation::{run_seeds, seeds, Pipe};
use replication::sync::{Down, EdgeReplica, FeedConfig, Up};
use replication::watcher::{Event, ResumableWatcher};
use replication::{
    KeyRange, ObjectKey, Precondition, ResourceVersion, Store, StoreConfig, WriteSet,
};
use serde_json::{json, Value};

const NAMESPACES: [&str; 2] = ["apps", "tools"];

fn obj(value: Value) -> Object {
    value.as_object().cloned().expect("an object")
}

fn stored(value: Value) -> Bytes {
    Bytes::from(object::to_stored(obj(value)))
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("stored JSON")
}

struct Link {
    up: bool,
    /// Lost for longer than the idle timeout, and will resume (the pipes replay).
    paused: bool,
    down: Pipe<Down>,
    up_pipe: Pipe<Up>,
}

struct Edge {
    dir: PathBuf,
    replica: EdgeReplica,
}

fn open_edge(dir: &Path) -> EdgeReplica {
    let mut config = StoreConfig::edge();
    config.sync_writes = false;
    config.block_cache_bytes = 1 << 20;
    config.write_buffer_bytes = 1 << 20;
    EdgeReplica::open(dir, config).expect("open edge store")
}

fn open_cloud_store(dir: &Path) -> Arc<Store> {
    let mut config = StoreConfig::cloud();
    config.sync_writes = false;
    config.block_cache_bytes = 1 << 20;
    config.write_buffer_bytes = 1 << 20;
    Arc::new(Store::open(dir, config).expect("open cloud store"))
}

/// The cloud process: its store survives restarts, the core and watcher do not.
struct Cloud {
    dir: PathBuf,
    store: Arc<Store>,
    core: HubCore,
    watcher: ResumableWatcher,
}

impl Cloud {
    fn start(dir: &Path, store: Option<Arc<Store>>, epoch: u64, max_in_flight: usize) -> Cloud {
        let store = store.unwrap_or_else(|| open_cloud_store(dir));
        Cloud {
            dir: dir.to_owned(),
            core: HubCore::new(
                Arc::new(Metrics::new()),
                FeedConfig { max_in_flight },
                epoch,
            ),
            watcher: ResumableWatcher::all(store.clone()),
            store,
        }
    }
}

struct Sim {
    rng: SmallRng,
    step: u64,
    clock: Instant,
    wall: time::OffsetDateTime,
    nodes: Vec<String>,
    cloud: Cloud,
    edges: BTreeMap<String, Edge>,
    links: BTreeMap<String, Link>,
    max_in_flight: usize,
    /// (node, object) pairs a node asked for: routed to it from then on.
    interests: BTreeSet<(String, ObjectKey)>,
    /// Reports still owed: (node, pod) → the status value reported last.
    owed: BTreeMap<(String, ObjectKey), u64>,
    next_value: u64,
    delivered: u64,
}

fn key(kind: &str, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(kind, namespace, name).expect("key")
}

impl Sim {
    fn new(seed: u64, root: &Path) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let node_count = rng.random_range(2..=4);
        let nodes: Vec<String> = (0..node_count).map(|i| format!("edge-{i}")).collect();
        let max_in_flight = [2usize, 8, 1024][rng.random_range(0..3)];
        let cloud = Cloud::start(&root.join("cloud"), None, rng.random(), max_in_flight);
        let mut edges = BTreeMap::new();
        let mut links = BTreeMap::new();
        for node in &nodes {
            let dir = root.join(node);
            edges.insert(
                node.clone(),
                Edge {
                    replica: open_edge(&dir),
                    dir,
                },
            );
            links.insert(
                node.clone(),
                Link {
                    up: false,
                    paused: false,
                    down: Pipe::default(),
                    up_pipe: Pipe::default(),
                },
            );
        }
        let mut sim = Sim {
            rng,
            step: 0,
            clock: Instant::now(),
            wall: time::OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time"),
            nodes: nodes.clone(),
            cloud,
            edges,
            links,
            max_in_flight,
            interests: BTreeSet::new(),
            owed: BTreeMap::new(),
            next_value: 0,
            delivered: 0,
        };
        for node in nodes {
            sim.api_put(
                key("nodes", "", &node),
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
            );
        }
        sim
    }

    fn now(&self) -> Now {
        Now {
            instant: self.clock + Duration::from_millis(self.step * 100),
            wall: self.wall + Duration::from_millis(self.step * 100),
        }
    }

    fn value(&mut self) -> u64 {
        self.next_value += 1;
        self.next_value
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())].clone()
    }

    fn random_node(&mut self) -> String {
        let nodes = self.nodes.clone();
        self.pick(&nodes)
    }

    fn existing(&self, kind: &str) -> Vec<ObjectKey> {
        let range = KeyRange::kind(kind).expect("range");
        self.cloud
            .store
            .scan(&range)
            .map(|item| item.expect("scan").0)
            .collect()
    }

    // ---- the API's writes (what users and controllers do) ----

    fn api_commit(&mut self, set: WriteSet) {
        // Preconditions may fail when a report won the race: the user retries later.
        let _ = self.cloud.store.commit(set);
    }

    fn api_put(&mut self, key: ObjectKey, value: Value) {
        let mut set = WriteSet::new();
        set.put(key, stored(value), Precondition::None);
        self.api_commit(set);
    }

    fn pod(&mut self, namespace: &str, name: &str, node: Option<&str>) -> Value {
        let configmap = format!("c{}", self.rng.random_range(0..3));
        let secret = format!("s{}", self.rng.random_range(0..2));
        let spec_value = self.value();
        let mut spec = json!({
            "containers": [{"name": "app", "image": "app:1",
                "env": [{"name": "V", "value": spec_value.to_string()},
                        {"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]}],
            "volumes": [{"name": "config", "configMap": {"name": configmap}}],
        });
        if let Some(node) = node {
            spec["nodeName"] = json!(node);
        }
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace}, "spec": spec})
    }

    fn create_pod(&mut self) {
        let namespace = self.pick(&NAMESPACES);
        let name = format!("p{}", self.rng.random_range(0..10));
        let node = self.random_node();
        let unscheduled = self.rng.random_bool(0.1);
        let pod = self.pod(namespace, &name, (!unscheduled).then_some(node.as_str()));
        let mut set = WriteSet::new();
        set.put(
            key("pods", namespace, &name),
            stored(pod),
            Precondition::Absent,
        );
        self.api_commit(set);
    }

    fn update_pod(&mut self, move_it: bool) {
        let pods = self.existing("pods");
        if pods.is_empty() {
            return;
        }
        let pod_key = self.pick(&pods);
        let current = self.cloud.store.get(&pod_key).expect("get").expect("pod");
        let mut pod = parse(&current.object);
        if move_it {
            let node = self.random_node();
            pod["spec"]["nodeName"] = json!(node);
            self.owed.retain(|(_, k), _| k != &pod_key);
        } else {
            // A new spec (new references), keeping the status the nodes reported.
            let fresh = self.pod(pod_key.namespace(), pod_key.name(), None);
            let node = pod["spec"]["nodeName"].clone();
            pod["spec"] = fresh["spec"].clone();
            if !node.is_null() {
                pod["spec"]["nodeName"] = node;
            }
        }
        let mut set = WriteSet::new();
        set.put(pod_key, stored(pod), Precondition::Version(current.rv));
        self.api_commit(set);
    }

    fn delete_random(&mut self, kind: &str) {
        let keys = self.existing(kind);
        if keys.is_empty() {
            return;
        }
        let doomed = self.pick(&keys);
        self.owed.retain(|(_, k), _| k != &doomed);
        let mut set = WriteSet::new();
        set.delete(doomed, Precondition::Exists);
        self.api_commit(set);
    }

    fn put_referenced(&mut self) {
        let namespace = self.pick(&NAMESPACES);
        let value = self.value();
        let (kind, name) = match self.rng.random_range(0..3) {
            0 => ("configmaps", format!("c{}", self.rng.random_range(0..3))),
            1 => ("secrets", format!("s{}", self.rng.random_range(0..2))),
            _ => ("services", format!("svc{}", self.rng.random_range(0..2))),
        };
        let kind_name = match kind {
            "configmaps" => "ConfigMap",
            "secrets" => "Secret",
            _ => "Service",
        };
        let body = if kind == "services" {
            json!({"ports": [{"port": value % 60000 + 1}]})
        } else {
            json!({"v": value.to_string()})
        };
        let field = if kind == "services" { "spec" } else { "data" };
        let mut object = json!({"apiVersion": "v1", "kind": kind_name,
                                "metadata": {"name": name, "namespace": namespace}});
        object[field] = body;
        self.api_put(key(kind, namespace, &name), object);
    }

    // ---- the nodes' side ----

    fn report_status(&mut self) {
        let node = self.random_node();
        let held: Vec<ObjectKey> = {
            let edge = &self.edges[&node].replica;
            edge.store()
                .scan(&KeyRange::kind("pods").expect("range"))
                .map(|item| item.expect("scan").0)
                .collect()
        };
        if held.is_empty() {
            return;
        }
        let pod_key = self.pick(&held);
        let value = self.value();
        let edge = &mut self.edges.get_mut(&node).expect("edge").replica;
        let current = edge.store().get(&pod_key).expect("get").expect("held");
        let mut pod = parse(&current.object);
        pod["status"] = json!({"phase": "Running", "observed": value});
        edge.report(pod_key.clone(), stored(pod)).expect("report");
        // Owed only if the cloud still binds the pod to this node.
        let bound_here = self
            .cloud
            .store
            .get(&pod_key)
            .expect("get")
            .is_some_and(|v| parse(&v.object)["spec"]["nodeName"] == json!(node));
        if bound_here {
            self.owed.insert((node, pod_key), value);
        } else {
            self.owed.remove(&(node, pod_key));
        }
    }

    /// A get the node's MetaServer forwards for an object it does not hold.
    fn forwarded_read(&mut self) {
        let node = self.random_node();
        let namespace = self.pick(&NAMESPACES);
        let wanted = key(
            "configmaps",
            namespace,
            &format!("c{}", self.rng.random_range(0..3)),
        );
        // Routed to the node already (its pods reference it, or it asked before): answered
        // without a new interest. Decided on the index as it is, so it is brought up to
        // date first for the model to agree.
        self.follow(usize::MAX);
        let routed = self.routed(&node).contains(&wanted);
        let node_name: Arc<str> = node.as_str().into();
        let store = self.cloud.store.clone();
        self.cloud
            .core
            .on_read(&store, &node_name, &wanted)
            .expect("nodes may read ConfigMaps");
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("  {node} reads {wanted}");
        }
        if !routed {
            self.interests.insert((node, wanted));
        }
        // A secret not routed to the node: refused, and no interest.
        let secret = key("secrets", namespace, "s9");
        assert!(self
            .cloud
            .core
            .on_read(&store, &node_name, &secret)
            .is_err());
    }

    fn heartbeat(&mut self) {
        let node: Arc<str> = self.random_node().as_str().into();
        self.cloud.core.on_heartbeat(&node, None);
    }

    // ---- links, restarts, disks ----

    fn connect(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if link.paused {
            link.paused = false;
            self.cloud
                .core
                .on_connected(&self.cloud.store, &node.into(), false);
            let edge = &mut self.edges.get_mut(node).expect("edge").replica;
            edge.on_connected(false).expect("edge resume");
            return;
        }
        if link.up {
            return;
        }
        link.up = true;
        self.cloud
            .core
            .on_connected(&self.cloud.store, &node.into(), true);
        let edge = &mut self.edges.get_mut(node).expect("edge").replica;
        edge.on_connected(true).expect("edge link up");
    }

    fn pause(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if !link.up || link.paused {
            return;
        }
        link.paused = true;
        self.cloud
            .core
            .on_disconnected(&self.cloud.store, &node.into());
        self.edges
            .get_mut(node)
            .expect("edge")
            .replica
            .on_disconnected();
    }

    fn disconnect(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if !link.up {
            return;
        }
        link.up = false;
        link.paused = false;
        link.down.clear();
        link.up_pipe.clear();
        self.cloud
            .core
            .on_disconnected(&self.cloud.store, &node.into());
        self.edges.get_mut(node).expect("edge").replica.link_down();
    }

    fn restart_cloud(&mut self, persist_first: bool, lose_objectsync: bool) {
        for node in self.nodes.clone() {
            self.disconnect(&node);
        }
        if persist_first {
            self.commit();
        }
        if lose_objectsync {
            // ObjectSync is gone (say, the store restored from a backup without it).
            let mut set = WriteSet::new();
            set.delete_aux_range(replication::Aux::OBJECTSYNC, vec![0u8], vec![0xffu8]);
            self.cloud.store.commit(set).expect("wipe ObjectSync");
            // Interests are kept with ObjectSync: they go with it (a node asks again).
            self.interests.clear();
        }
        let dir = self.cloud.dir.clone();
        let epoch = self.rng.random();
        let store = self.cloud.store.clone();
        self.cloud = Cloud::start(&dir, Some(store), epoch, self.max_in_flight);
    }

    fn restart_edge(&mut self, node: &str, lose_disk: bool) {
        self.disconnect(node);
        let edge = self.edges.remove(node).expect("edge");
        let dir = edge.dir.clone();
        drop(edge);
        if lose_disk {
            std::fs::remove_dir_all(&dir).expect("remove edge dir");
            self.owed.retain(|(n, _), _| n != node);
        }
        self.edges.insert(
            node.to_owned(),
            Edge {
                replica: open_edge(&dir),
                dir,
            },
        );
    }

    // ---- the shell's work, done by hand ----

    /// Feeds the core up to `limit` watch events (the watch lags the store).
    fn follow(&mut self, limit: usize) -> usize {
        let mut moved = 0;
        while moved < limit {
            match self.cloud.watcher.try_next().expect("watch") {
                Some(Event::Change(change)) => {
                    if std::env::var("SIM_TRACE").is_ok() {
                        eprintln!(
                            "  watch {} {} rv {} {:?}",
                            change.revision, change.key, change.rv, change.kind
                        );
                    }
                    self.cloud.core.on_change(&self.cloud.store, &change)
                }
                Some(Event::Restart { revision }) => {
                    if std::env::var("SIM_TRACE").is_ok() {
                        eprintln!(
                            "  watch restart at {revision} (store at {})",
                            self.cloud.store.revision()
                        );
                    }
                    self.cloud
                        .core
                        .bootstrap(&self.cloud.store)
                        .expect("bootstrap");
                }
                None => break,
            }
            moved += 1;
        }
        moved
    }

    /// Commits what the core wants written; sometimes an API write races a report batch.
    fn commit(&mut self) -> usize {
        let mut commits = 0;
        let now = self.now();
        while let Some(mut commit) = self.cloud.core.poll_commit(&self.cloud.store, now) {
            if self.rng.random_bool(0.05) {
                self.update_pod(false);
            }
            let set = std::mem::take(&mut commit.set);
            let result = self.cloud.store.commit(set);
            self.cloud.core.on_committed(commit, result);
            commits += 1;
            assert!(commits < 10_000, "the core keeps asking for commits");
        }
        commits
    }

    fn transmit(&mut self) {
        let now = self.now();
        while let Some(node) = self.cloud.core.poll_dirty() {
            let delay = self.rng.random_range(0..3);
            let Some(link) = self.links.get_mut(&*node) else {
                continue;
            };
            while let Some(down) = self.cloud.core.poll_transmit(&node, now) {
                assert!(link.up && !link.paused, "sent to {node} while it is away");
                link.down.push(self.step, delay, down);
            }
        }
        for node in self.nodes.clone() {
            let delay = self.rng.random_range(0..3);
            let link = self.links.get_mut(&node).expect("link");
            if !link.up || link.paused {
                continue;
            }
            let edge = &mut self.edges.get_mut(&node).expect("edge").replica;
            while let Some(up) = edge.poll_transmit() {
                link.up_pipe.push(self.step, delay, up);
            }
        }
    }

    fn deliver(&mut self) -> usize {
        let mut moved = 0;
        let now = self.now();
        for node in self.nodes.clone() {
            let link = self.links.get_mut(&node).expect("link");
            if !link.up || link.paused {
                continue;
            }
            while let Some(down) = link.down.pop_ready(self.step) {
                if std::env::var("SIM_TRACE").is_ok() {
                    eprintln!("  -> {node}: {down:?}");
                }
                let edge = &mut self.edges.get_mut(&node).expect("edge").replica;
                edge.receive(down).expect("edge receive");
                moved += 1;
            }
            self.edges
                .get_mut(&node)
                .expect("edge")
                .replica
                .flush()
                .expect("edge flush");
            let name: Arc<str> = node.as_str().into();
            loop {
                let link = self.links.get_mut(&node).expect("link");
                let Some(up) = link.up_pipe.pop_ready(self.step) else {
                    break;
                };
                self.cloud
                    .core
                    .on_message(&self.cloud.store, &name, up, now);
                moved += 1;
            }
        }
        self.delivered += moved as u64;
        moved
    }

    fn pump(&mut self, watch_limit: usize) -> usize {
        let mut moved = self.follow(watch_limit);
        moved += self.commit();
        self.transmit();
        moved += self.deliver();
        moved += self.commit();
        self.transmit();
        moved
    }

    fn step(&mut self) {
        self.step += 1;
        let roll = self.rng.random_range(0..1000);
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("step {} roll {roll}", self.step);
        }
        match roll {
            0..180 => self.create_pod(),
            180..300 => self.update_pod(false),
            300..360 => self.update_pod(true),
            360..410 => self.delete_random("pods"),
            410..510 => self.put_referenced(),
            510..525 => self.delete_random("configmaps"),
            525..535 => self.delete_random("secrets"),
            535..545 => self.delete_random("services"),
            545..680 => self.report_status(),
            680..700 => self.forwarded_read(),
            700..730 => self.heartbeat(),
            730..800 => {
                let node = self.random_node();
                self.connect(&node);
            }
            800..830 => {
                let node = self.random_node();
                self.disconnect(&node);
            }
            830..850 => {
                let node = self.random_node();
                self.pause(&node);
            }
            850..860 => {
                let node = self.random_node();
                self.restart_edge(&node, false);
            }
            860..864 => {
                let node = self.random_node();
                self.restart_edge(&node, true);
            }
            864..870 => self.restart_cloud(true, false),
            870..874 => self.restart_cloud(false, false),
            874..876 => self.restart_cloud(true, true),
            876..900 => {
                let store = self.cloud.store.clone();
                self.cloud.core.tick(&store);
            }
            _ => {}
        }
        let watch_limit = self.rng.random_range(0..4);
        self.pump(watch_limit);
    }

    fn quiesce(&mut self) {
        for node in self.nodes.clone() {
            self.connect(&node);
        }
        let mut idle = 0;
        for _ in 0..100_000 {
            self.step += 1;
            let store = self.cloud.store.clone();
            self.cloud.core.tick(&store);
            let moved = self.pump(usize::MAX);
            let in_pipes: usize = self
                .links
                .values()
                .map(|l| l.down.len() + l.up_pipe.len())
                .sum();
            if moved == 0 && in_pipes == 0 {
                idle += 1;
                if idle > 3 {
                    return;
                }
            } else {
                idle = 0;
            }
        }
        panic!("no quiescence after 100,000 rounds");
    }

    /// What the node should hold: [`Sim::routed`] that exists.
    fn desired(&self, node: &str) -> BTreeSet<ObjectKey> {
        let mut keys = self.routed(node);
        keys.retain(|k| self.cloud.store.get(k).expect("get").is_some());
        keys
    }

    /// The routing rules, written independently of the routing index: what is routed to
    /// `node`, existing or not.
    fn routed(&self, node: &str) -> BTreeSet<ObjectKey> {
        let store = &self.cloud.store;
        let mut keys = BTreeSet::new();
        keys.insert(key("nodes", "", node));
        let mut namespaces = BTreeSet::new();
        for pod_key in self.existing("pods") {
            let pod = parse(&store.get(&pod_key).expect("get").expect("pod").object);
            if pod["spec"]["nodeName"] != json!(node) {
                continue;
            }
            let ns = pod_key.namespace().to_owned();
            for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
                if let Some(name) = volume["configMap"]["name"].as_str() {
                    keys.insert(key("configmaps", &ns, name));
                }
            }
            for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
                for env in container["env"].as_array().into_iter().flatten() {
                    if let Some(name) = env["valueFrom"]["secretKeyRef"]["name"].as_str() {
                        keys.insert(key("secrets", &ns, name));
                    }
                }
            }
            namespaces.insert(ns);
            keys.insert(pod_key);
        }
        for ns in &namespaces {
            for kind in ["services", "endpoints", "endpointslices"] {
                let range = KeyRange::namespace(kind, ns).expect("range");
                for item in store.scan(&range) {
                    keys.insert(item.expect("scan").0);
                }
            }
        }
        for (n, k) in &self.interests {
            if n == node {
                keys.insert(k.clone());
            }
        }
        keys
    }

    fn check(&self) {
        for node in &self.nodes {
            let expected: BTreeMap<ObjectKey, (ResourceVersion, Bytes)> = self
                .desired(node)
                .into_iter()
                .map(|k| {
                    let v = self.cloud.store.get(&k).expect("get").expect("exists");
                    (k, (v.rv, v.object))
                })
                .collect();
            let edge = &self.edges[node].replica;
            let held: BTreeMap<ObjectKey, (ResourceVersion, Bytes)> = edge
                .store()
                .scan(&KeyRange::all())
                .map(|item| {
                    let (k, v) = item.expect("scan");
                    (k, (v.rv, v.object))
                })
                .collect();
            for (k, want) in &expected {
                match held.get(k) {
                    None => panic!(
                        "{node} is missing {k} (routing: interested {}, holds {})",
                        self.cloud
                            .core
                            .controller()
                            .routing()
                            .is_interested(node, k),
                        self.cloud.core.controller().routing().holds(node, k)
                    ),
                    Some(have) => assert_eq!(have, want, "{node} holds {k} at the wrong version"),
                }
            }
            for k in held.keys() {
                assert!(
                    expected.contains_key(k),
                    "{node} holds {k}, which it should not (interests {:?})",
                    self.interests
                );
            }
            assert_eq!(edge.sync().outbox_len(), 0, "{node}'s outbox did not drain");
            let feed = self.cloud.core.feed(node).expect("a feed per node");
            assert!(feed.is_synced(), "{node}'s feed does not know it is synced");
        }
        for ((node, pod_key), value) in &self.owed {
            let pod = self
                .cloud
                .store
                .get(pod_key)
                .expect("get")
                .unwrap_or_else(|| panic!("owed report on {pod_key}, which is gone"));
            let pod = parse(&pod.object);
            assert_eq!(
                pod["spec"]["nodeName"],
                json!(node),
                "owed report now elsewhere"
            );
            assert_eq!(
                pod["status"]["observed"],
                json!(value),
                "{node}'s latest report on {pod_key} did not land"
            );
        }
        // Heartbeats renewed Leases, which are never routed back to the nodes (checked above
        // by the edge holding nothing else); the renewal is the cloud's clock.
        for lease in self.existing("leases") {
            let lease = parse(
                &self
                    .cloud
                    .store
                    .get(&lease)
                    .expect("get")
                    .expect("lease")
                    .object,
            );
            assert!(lease["spec"]["renewTime"]
                .as_str()
                .is_some_and(|t| t.starts_with("2027-")));
        }
    }
}

fn run_seed(seed: u64) -> (u64, u64) {
    let root = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::new(seed, root.path());
    let steps = 150 + seed % 150;
    for _ in 0..steps {
        sim.step();
    }
    sim.quiesce();
    sim.check();
    (steps, sim.delivered)
}

#[test]
fn the_production_cloud_core_converges_every_edge_to_its_desired_set() {
    let seeds = seeds();
    let (steps, delivered) = run_seeds(&seeds, run_seed).unwrap_or_else(|failed| {
        panic!(
            "simulation failed for seeds {failed:?}: rerun one with SIM_SEED=<seed> cargo test --workspace --test hub_simulation"
        )
    });
    eprintln!(
        "simulated {} seeds: {steps} steps, {delivered} messages delivered",
        seeds.len()
    );
}
