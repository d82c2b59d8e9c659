//! Deterministic simulation of the sync protocol.
//!
//! A seeded harness drives a cloud store and several edges (real RocksDB stores, real
//! `NodeFeed`/`EdgeReplica` state machines) through random object operations (pods created,
//! updated, moved between nodes and deleted; configmaps shared by several nodes), random status
//! reports from the edges, link drops and delays (in order within a session, as a QUIC stream
//! gives), restarts of either side (in-memory state lost, RocksDB kept) and edges losing their
//! disk. At quiescence it checks that every edge's store equals, key by key, version by version
//! and byte by byte, what the cloud says the node should hold; that every outbox drained; and
//! that every report still owed reached the cloud at its latest value.
//!
//! `SIM_SEEDS=N` runs N seeds (default 1000); `SIM_SEED=S` runs only seed S. A failure names the
//! seed that reproduces it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use replication::simulation::{run_seeds, seeds, Pipe};
use replication::sync::{persist, Down, EdgeReplica, FeedConfig, NodeFeed, Report, Up};
use replication::{
    Change, ChangeKind, KeyRange, ObjectKey, Precondition, ResourceVersion, SharedChange, Store,
    StoreConfig, WriteSet,
};

const NAMESPACE: &str = "ns";

/// The objects of the simulated cluster, as their JSON bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pod {
    node: String,
    configmap: String,
    spec: u64,
    status: u64,
}

impl Pod {
    fn encode(&self) -> Bytes {
        Bytes::from(format!(
            r#"{{"node":"{}","configmap":"{}","spec":{},"status":{}}}"#,
            self.node, self.configmap, self.spec, self.status
        ))
    }

    fn decode(bytes: &[u8]) -> Pod {
        let value: serde_json::Value = serde_json::from_slice(bytes).expect("pod JSON");
        Pod {
            node: value["node"].as_str().expect("node").to_owned(),
            configmap: value["configmap"].as_str().expect("configmap").to_owned(),
            spec: value["spec"].as_u64().expect("spec"),
            status: value["status"].as_u64().expect("status"),
        }
    }
}

fn pod_key(name: &str) -> ObjectKey {
    ObjectKey::new("pods", NAMESPACE, name).unwrap()
}

fn configmap_key(name: &str) -> ObjectKey {
    ObjectKey::new("configmaps", NAMESPACE, name).unwrap()
}

/// What node `node` should hold, derived from the cloud's objects (the routing rule of the
/// simulated EdgeController: its pods and the configmaps they reference).
fn desired_keys(objects: &BTreeMap<ObjectKey, SharedChange>, node: &str) -> BTreeSet<ObjectKey> {
    let mut keys = BTreeSet::new();
    for (key, change) in objects.iter().filter(|(k, _)| k.kind() == "pods") {
        let pod = Pod::decode(&change.object);
        if pod.node == node {
            keys.insert(key.clone());
            let configmap = configmap_key(&pod.configmap);
            if objects.contains_key(&configmap) {
                keys.insert(configmap);
            }
        }
    }
    keys
}

struct Link {
    up: bool,
    /// The connection is lost but the transport will resume the link: what is in the pipes
    /// is replayed after the reconnection, and each side decides to keep its session.
    paused: bool,
    down_pipe: Pipe<Down>,
    up_pipe: Pipe<Up>,
}

struct Cloud {
    dir: PathBuf,
    store: Store,
    feeds: BTreeMap<String, NodeFeed>,
    /// The latest change of every existing object.
    objects: BTreeMap<ObjectKey, SharedChange>,
}

impl Cloud {
    fn open(dir: &Path, nodes: &[String], epoch: u64, max_in_flight: usize) -> Cloud {
        let mut config = StoreConfig::cloud();
        config.sync_writes = false;
        config.block_cache_bytes = 1 << 20;
        config.write_buffer_bytes = 1 << 20;
        let store = Store::open(dir, config).expect("open cloud store");
        // What a restarted cloudcore does: re-list its objects, load ObjectSync, route.
        let mut objects = BTreeMap::new();
        for item in store.scan(&KeyRange::all()) {
            let (key, value) = item.expect("scan");
            let change = Change::new(
                value.revision,
                key.clone(),
                value.rv,
                ChangeKind::Added,
                value.object,
            );
            objects.insert(key, Arc::new(change));
        }
        let mut feeds = BTreeMap::new();
        for node in nodes {
            let record = persist::load_feed_record(&store, node).expect("load ObjectSync");
            let mut feed = NodeFeed::new(FeedConfig { max_in_flight }, epoch, record);
            for key in desired_keys(&objects, node) {
                feed.set(&objects[&key]);
            }
            feeds.insert(node.clone(), feed);
        }
        Cloud {
            dir: dir.to_owned(),
            store,
            feeds,
            objects,
        }
    }

    /// Routes committed changes to the feeds: recompute each node's desired set where it may
    /// have changed, and tell the feeds the difference. `echo` marks a change that is exactly
    /// `node`'s report on top of version `base`.
    fn route(&mut self, changes: &[SharedChange], echo: Option<(&str, ResourceVersion)>) {
        let before: BTreeMap<String, BTreeSet<ObjectKey>> = self
            .feeds
            .keys()
            .map(|node| (node.clone(), desired_keys(&self.objects, node)))
            .collect();
        for change in changes {
            if change.is_delete() {
                self.objects.remove(&change.key);
            } else {
                self.objects.insert(change.key.clone(), change.clone());
            }
        }
        for (node, feed) in self.feeds.iter_mut() {
            let after = desired_keys(&self.objects, node);
            for key in before[node].difference(&after) {
                let rv = changes
                    .iter()
                    .find(|c| &c.key == key)
                    .map_or_else(|| self.objects[key].rv, |c| c.rv);
                feed.unset(key, rv);
            }
            for key in &after {
                let change = &self.objects[key];
                let changed_now = changes.iter().any(|c| &c.key == key);
                if changed_now || !before[node].contains(key) {
                    match echo {
                        Some((echo_node, base)) if echo_node == node && changed_now => {
                            feed.set_echo(change, base)
                        }
                        _ => feed.set(change),
                    }
                }
            }
        }
    }

    fn commit_and_route(&mut self, set: WriteSet) {
        let changes = self.store.commit(set).expect("cloud commit");
        self.route(&changes, None);
    }

    fn persist_feed_writes(&mut self) {
        let mut set = WriteSet::new();
        for (node, feed) in self.feeds.iter_mut() {
            persist::add_objectsync_writes(&mut set, node, feed.drain_writes());
        }
        if !set.is_empty() {
            self.store.commit(set).expect("persist ObjectSync");
        }
    }

    /// The cloud/ layer's handling of a report: node authorization, merge of the status into
    /// the current object, at most once per report id.
    fn apply_report(&mut self, node: &str, report: Report) {
        let feed = self.feeds.get_mut(node).expect("feed");
        // As CloudHub does: a report that arrives while the session restarts (after a
        // HelloRequest) is dropped; the node sends it again in the new session.
        let Ok(Some(record)) = feed.accept_report(&report) else {
            return;
        };
        let mut set = WriteSet::new();
        persist::add_report_record(&mut set, node, record);
        let mut echo = None;
        if let Some(current) = self.objects.get(&report.key) {
            let mut pod = Pod::decode(&current.object);
            if pod.node == node {
                pod.status = Pod::decode(&report.object).status;
                let merged = pod.encode();
                if report.base == current.rv && merged == report.object {
                    echo = Some(report.base);
                }
                set.put(
                    report.key.clone(),
                    merged,
                    Precondition::Version(current.rv),
                );
            }
        }
        let changes = self.store.commit(set).expect("commit report");
        self.route(&changes, echo.map(|base| (node, base)));
        self.feeds.get_mut(node).expect("feed").report_done(record);
    }
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

struct Sim {
    rng: SmallRng,
    now: u64,
    nodes: Vec<String>,
    cloud: Cloud,
    edges: BTreeMap<String, Edge>,
    links: BTreeMap<String, Link>,
    max_in_flight: usize,
    /// Reports the cloud still owes: (node, pod) → status. Forgotten when the pod leaves the
    /// node or the node loses its disk (then the report may legitimately never land).
    owed: BTreeMap<(String, ObjectKey), u64>,
    next_name: u64,
    next_value: u64,
    delivered: u64,
}

impl Sim {
    fn new(seed: u64, root: &Path) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let node_count = rng.random_range(2..=4);
        let nodes: Vec<String> = (0..node_count).map(|i| format!("edge-{i}")).collect();
        let max_in_flight = *[2usize, 8, 1024].get(rng.random_range(0..3)).unwrap_or(&8);
        let cloud = Cloud::open(&root.join("cloud"), &nodes, rng.random(), max_in_flight);
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
                    down_pipe: Pipe::default(),
                    up_pipe: Pipe::default(),
                },
            );
        }
        Sim {
            rng,
            now: 0,
            nodes,
            cloud,
            edges,
            links,
            max_in_flight,
            owed: BTreeMap::new(),
            next_name: 0,
            next_value: 0,
            delivered: 0,
        }
    }

    fn value(&mut self) -> u64 {
        self.next_value += 1;
        self.next_value
    }

    fn random_node(&mut self) -> String {
        let i = self.rng.random_range(0..self.nodes.len());
        self.nodes[i].clone()
    }

    fn random_existing(&mut self, kind: &str) -> Option<ObjectKey> {
        let keys: Vec<&ObjectKey> = self
            .cloud
            .objects
            .keys()
            .filter(|k| k.kind() == kind)
            .collect();
        if keys.is_empty() {
            return None;
        }
        Some(keys[self.rng.random_range(0..keys.len())].clone())
    }

    fn forget_owed_for_pod(&mut self, key: &ObjectKey) {
        self.owed.retain(|(_, pod), _| pod != key);
    }

    // ---- cluster operations (what users and controllers do in the cloud) ----

    fn create_pod(&mut self) {
        self.next_name += 1;
        let key = pod_key(&format!("p{}", self.next_name % 12));
        if self.cloud.objects.contains_key(&key) {
            return;
        }
        let pod = Pod {
            node: self.random_node(),
            configmap: format!("c{}", self.rng.random_range(0..4)),
            spec: self.value(),
            status: 0,
        };
        let mut set = WriteSet::new();
        set.put(key, pod.encode(), Precondition::Absent);
        self.cloud.commit_and_route(set);
    }

    fn update_pod(&mut self, move_it: bool) {
        let Some(key) = self.random_existing("pods") else {
            return;
        };
        let current = self.cloud.objects[&key].clone();
        let mut pod = Pod::decode(&current.object);
        if move_it {
            pod.node = self.random_node();
            self.forget_owed_for_pod(&key);
        } else if self.rng.random_bool(0.3) {
            pod.configmap = format!("c{}", self.rng.random_range(0..4));
        } else {
            pod.spec = self.value();
        }
        let mut set = WriteSet::new();
        set.put(key, pod.encode(), Precondition::Version(current.rv));
        self.cloud.commit_and_route(set);
    }

    fn delete_object(&mut self, kind: &str) {
        let Some(key) = self.random_existing(kind) else {
            return;
        };
        self.forget_owed_for_pod(&key);
        let mut set = WriteSet::new();
        set.delete(key, Precondition::Exists);
        self.cloud.commit_and_route(set);
    }

    fn put_configmap(&mut self) {
        let key = configmap_key(&format!("c{}", self.rng.random_range(0..4)));
        let value = self.value();
        let mut set = WriteSet::new();
        set.put(
            key,
            Bytes::from(format!(r#"{{"data":{value}}}"#)),
            Precondition::None,
        );
        self.cloud.commit_and_route(set);
    }

    // ---- the edge's own writes ----

    fn report_status(&mut self) {
        let node = self.random_node();
        let edge = &mut self.edges.get_mut(&node).expect("edge").replica;
        let pods: Vec<ObjectKey> = edge
            .store()
            .scan(&KeyRange::kind("pods").unwrap())
            .map(|item| item.expect("scan").0)
            .collect();
        if pods.is_empty() {
            return;
        }
        let key = pods[self.rng.random_range(0..pods.len())].clone();
        let held = edge.store().get(&key).expect("get").expect("held");
        let mut pod = Pod::decode(&held.object);
        self.next_value += 1;
        pod.status = self.next_value;
        edge.report(key.clone(), pod.encode()).expect("report");
        // A report on a pod the cloud already moved away is refused there: nothing is owed.
        let still_here = self
            .cloud
            .objects
            .get(&key)
            .is_some_and(|c| Pod::decode(&c.object).node == node);
        if still_here {
            self.owed.insert((node, key), pod.status);
        } else {
            self.owed.remove(&(node, key));
        }
    }

    // ---- links, restarts, disks ----

    /// A connection with new streams (what the transport reports after first contact or a
    /// restart of either side), or the resumption of a paused link.
    fn connect(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if link.paused {
            self.resume(node);
            return;
        }
        if link.up {
            return;
        }
        link.up = true;
        // Both sides decide from the same link event, as the shells do.
        self.cloud
            .feeds
            .get_mut(node)
            .expect("feed")
            .on_connected(true);
        self.edges
            .get_mut(node)
            .expect("edge")
            .replica
            .on_connected(true)
            .expect("edge flush on link up");
    }

    /// The connection is lost for longer than the transport's idle timeout, and the link
    /// will resume (neither side restarts): the shells see Disconnected, later Connected with
    /// no new streams. This is the outage that left nodes deaf (field report 1).
    fn pause(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if !link.up || link.paused {
            return;
        }
        link.paused = true;
        // The cloud's shell stops pumping the feed (nothing to call); the edge stops sending.
        self.edges
            .get_mut(node)
            .expect("edge")
            .replica
            .on_disconnected();
    }

    fn resume(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if !link.paused {
            return;
        }
        link.paused = false;
        self.cloud
            .feeds
            .get_mut(node)
            .expect("feed")
            .on_connected(false);
        self.edges
            .get_mut(node)
            .expect("edge")
            .replica
            .on_connected(false)
            .expect("edge resume");
    }

    /// The cloud abandons a node's session on its own (as CloudHub does on a protocol error)
    /// while the link stays up: it must get the node to say hello again.
    fn restart_session(&mut self, node: &str) {
        let link = self.links.get(node).expect("link");
        if !link.up || link.paused {
            return;
        }
        self.cloud
            .feeds
            .get_mut(node)
            .expect("feed")
            .restart_session();
    }

    fn disconnect(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if !link.up {
            return;
        }
        link.up = false;
        link.paused = false;
        // Whatever was in flight is lost with the session.
        link.down_pipe.clear();
        link.up_pipe.clear();
        self.cloud.feeds.get_mut(node).expect("feed").link_down();
        self.edges.get_mut(node).expect("edge").replica.link_down();
    }

    fn restart_cloud(&mut self) {
        for node in self.nodes.clone() {
            self.disconnect(&node);
        }
        // Unpersisted ObjectSync records die with the process, sometimes.
        if self.rng.random_bool(0.5) {
            self.cloud.persist_feed_writes();
        }
        self.restart_cloud_without_persisting();
    }

    fn lose_cloud_objectsync(&mut self) {
        // The cloud's ObjectSync is gone (say, restored from a backup without it).
        self.restart_cloud();
        let mut set = WriteSet::new();
        set.delete_aux_range(replication::Aux::OBJECTSYNC, vec![0u8], vec![0xffu8]);
        self.cloud.store.commit(set).expect("wipe ObjectSync");
        self.restart_cloud_without_persisting();
    }

    fn restart_cloud_without_persisting(&mut self) {
        let dir = self.cloud.dir.clone();
        let epoch = self.rng.random();
        let placeholder = tempfile::tempdir().expect("tempdir");
        drop(std::mem::replace(
            &mut self.cloud,
            Cloud {
                dir: dir.clone(),
                store: Store::open(placeholder.path(), StoreConfig::edge()).expect("placeholder"),
                feeds: BTreeMap::new(),
                objects: BTreeMap::new(),
            },
        ));
        self.cloud = Cloud::open(&dir, &self.nodes, epoch, self.max_in_flight);
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

    // ---- moving messages ----

    /// Moves whatever both sides of `node` want to send into the link.
    fn transmit(&mut self, node: &str) {
        let link = self.links.get_mut(node).expect("link");
        if !link.up || link.paused {
            return;
        }
        let delay_down = self.rng.random_range(0..3);
        let delay_up = self.rng.random_range(0..3);
        let feed = self.cloud.feeds.get_mut(node).expect("feed");
        while let Some(message) = feed.poll_transmit() {
            link.down_pipe.push(self.now, delay_down, message);
        }
        let edge = &mut self.edges.get_mut(node).expect("edge").replica;
        while let Some(message) = edge.poll_transmit() {
            link.up_pipe.push(self.now, delay_up, message);
        }
    }

    /// Delivers what is due on `node`'s link; returns how many messages moved.
    fn deliver(&mut self, node: &str) -> usize {
        let mut moved = 0;
        if self.links.get(node).expect("link").paused {
            return 0;
        }
        loop {
            let link = self.links.get_mut(node).expect("link");
            let Some(message) = link.down_pipe.pop_ready(self.now) else {
                break;
            };
            let edge = &mut self.edges.get_mut(node).expect("edge").replica;
            edge.receive(message).expect("edge receive");
            moved += 1;
            // Group commits of random size.
            if self.rng.random_bool(0.3) {
                edge.flush().expect("edge flush");
            }
        }
        self.edges
            .get_mut(node)
            .expect("edge")
            .replica
            .flush()
            .expect("edge flush");
        loop {
            let link = self.links.get_mut(node).expect("link");
            let Some(message) = link.up_pipe.pop_ready(self.now) else {
                break;
            };
            moved += 1;
            match message {
                Up::Report(report) => self.cloud.apply_report(node, report),
                other => {
                    let feed = self.cloud.feeds.get_mut(node).expect("feed");
                    if feed.handle(other).is_err() {
                        // As CloudHub does: a message out of protocol (a digest that answers
                        // a request from an abandoned session) restarts the session.
                        feed.restart_session();
                    }
                }
            }
        }
        if self.rng.random_bool(0.5) {
            self.cloud.persist_feed_writes();
        }
        self.delivered += moved as u64;
        moved
    }

    fn pump(&mut self) -> usize {
        let mut moved = 0;
        for node in self.nodes.clone() {
            self.transmit(&node);
            moved += self.deliver(&node);
            self.transmit(&node);
        }
        moved
    }

    fn step(&mut self) {
        self.now += 1;
        let roll = self.rng.random_range(0..1000);
        match roll {
            0..200 => self.create_pod(),
            200..350 => self.update_pod(false),
            350..420 => self.update_pod(true),
            420..470 => self.delete_object("pods"),
            470..560 => self.put_configmap(),
            560..580 => self.delete_object("configmaps"),
            580..720 => self.report_status(),
            720..800 => {
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
            876..884 => {
                let node = self.random_node();
                self.restart_session(&node);
            }
            850..862 => {
                let node = self.random_node();
                self.restart_edge(&node, false);
            }
            862..866 => {
                let node = self.random_node();
                self.restart_edge(&node, true);
            }
            866..874 => self.restart_cloud(),
            874..876 => self.lose_cloud_objectsync(),
            _ => {}
        }
        self.pump();
    }

    /// Everything connected, no more faults: run until nothing moves.
    fn quiesce(&mut self) {
        for node in self.nodes.clone() {
            self.connect(&node);
        }
        let mut idle_rounds = 0;
        for _ in 0..100_000 {
            self.now += 1;
            let moved = self.pump();
            let in_pipes: usize = self
                .links
                .values()
                .map(|l| l.down_pipe.len() + l.up_pipe.len())
                .sum();
            if moved == 0 && in_pipes == 0 {
                idle_rounds += 1;
                if idle_rounds > 3 {
                    self.cloud.persist_feed_writes();
                    return;
                }
            } else {
                idle_rounds = 0;
            }
        }
        panic!("no quiescence after 100,000 rounds");
    }

    fn check(&self) {
        for node in &self.nodes {
            let expected: BTreeMap<ObjectKey, (ResourceVersion, Bytes)> =
                desired_keys(&self.cloud.objects, node)
                    .into_iter()
                    .map(|key| {
                        let stored = self.cloud.store.get(&key).expect("get").expect("exists");
                        (key, (stored.rv, stored.object))
                    })
                    .collect();
            let edge = &self.edges[node].replica;
            let held: BTreeMap<ObjectKey, (ResourceVersion, Bytes)> = edge
                .store()
                .scan(&KeyRange::all())
                .map(|item| {
                    let (key, value) = item.expect("scan");
                    (key, (value.rv, value.object))
                })
                .collect();
            for (key, want) in &expected {
                match held.get(key) {
                    None => panic!("{node} is missing {key}"),
                    Some(have) => assert_eq!(
                        have, want,
                        "{node} holds {key} at the wrong version or bytes"
                    ),
                }
            }
            for key in held.keys() {
                assert!(
                    expected.contains_key(key),
                    "{node} holds {key}, which it should not"
                );
            }
            assert_eq!(edge.sync().outbox_len(), 0, "{node}'s outbox did not drain");
            let feed = &self.cloud.feeds[node];
            assert!(feed.is_synced(), "{node}'s feed does not know it is synced");
        }
        for ((node, key), status) in &self.owed {
            let current = self
                .cloud
                .objects
                .get(key)
                .unwrap_or_else(|| panic!("owed report on {key}, which is gone"));
            let pod = Pod::decode(&current.object);
            assert_eq!(
                &pod.node, node,
                "owed report of {node} on {key}, now elsewhere"
            );
            assert_eq!(
                pod.status, *status,
                "{node}'s latest report on {key} did not land"
            );
        }
    }
}

fn run_seed(seed: u64) -> (u64, u64) {
    let root = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::new(seed, root.path());
    let steps = 150 + (seed % 200);
    for _ in 0..steps {
        sim.step();
    }
    sim.quiesce();
    sim.check();
    (steps, sim.delivered)
}

#[test]
fn every_edge_converges_to_its_desired_set() {
    let seeds = seeds();
    let (steps, delivered) = run_seeds(&seeds, run_seed).unwrap_or_else(|failed| {
        panic!(
            "simulation failed for seeds {failed:?}: rerun one with SIM_SEED=<seed> cargo test --workspace --test simulation"
        )
    });
    eprintln!(
        "simulated {} seeds: {steps} steps, {delivered} messages delivered",
        seeds.len()
    );
}

#[test]
fn the_delta_after_a_reconnect_sends_only_what_changed() {
    // A focused scenario with exact numbers: 100 objects held, 5 changed while away.
    let root = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::new(7, root.path());
    let node = sim.nodes[0].clone();
    let mut set = WriteSet::new();
    for i in 0..100 {
        let pod = Pod {
            node: node.clone(),
            configmap: "none".into(),
            spec: i,
            status: 0,
        };
        set.put(
            pod_key(&format!("bulk{i}")),
            pod.encode(),
            Precondition::Absent,
        );
    }
    sim.cloud.commit_and_route(set);
    sim.quiesce();
    sim.check();
    let before = sim.cloud.feeds[&node].stats();
    assert_eq!(before.upserts, 100);

    sim.disconnect(&node);
    for i in 0..5 {
        let key = pod_key(&format!("bulk{i}"));
        let current = sim.cloud.objects[&key].clone();
        let mut pod = Pod::decode(&current.object);
        pod.spec += 1000;
        let mut set = WriteSet::new();
        set.put(key, pod.encode(), Precondition::Version(current.rv));
        sim.cloud.commit_and_route(set);
    }
    sim.restart_edge(&node, false);
    sim.quiesce();
    sim.check();
    let after = sim.cloud.feeds[&node].stats();
    assert_eq!(
        after.upserts - before.upserts,
        5,
        "only the 5 changed objects"
    );
    assert_eq!(after.digest_exchanges, 0, "the record was trusted");

    // A cloud that lost its ObjectSync asks for a digest instead of resending 100 objects.
    sim.lose_cloud_objectsync();
    sim.quiesce();
    sim.check();
    let fresh = sim.cloud.feeds[&node].stats();
    assert_eq!(fresh.digest_exchanges, 1);
    assert_eq!(
        fresh.upserts, 0,
        "nothing resent: the digest matched the objects"
    );
}

#[test]
fn the_nodes_own_report_comes_back_as_a_version_bump() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim::new(11, root.path());
    let node = sim.nodes[0].clone();
    let pod = Pod {
        node: node.clone(),
        configmap: "none".into(),
        spec: 1,
        status: 0,
    };
    let key = pod_key("solo");
    let mut set = WriteSet::new();
    set.put(key.clone(), pod.encode(), Precondition::Absent);
    sim.cloud.commit_and_route(set);
    sim.quiesce();
    let before = sim.cloud.feeds[&node].stats();
    let edge = &mut sim.edges.get_mut(&node).unwrap().replica;
    let reported = Pod { status: 42, ..pod };
    edge.report(key.clone(), reported.encode()).unwrap();
    sim.owed.insert((node.clone(), key.clone()), 42);
    sim.quiesce();
    sim.check();
    let after = sim.cloud.feeds[&node].stats();
    assert_eq!(after.bumps - before.bumps, 1);
    assert_eq!(after.upserts, before.upserts, "no content echoed back");
    assert_eq!(after.content_bytes, before.content_bytes);
}
