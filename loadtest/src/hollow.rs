//! A hollow edge node: the real transport link (one QUIC connection per node), the real sync
//! state machine ([`EdgeSync`], the same sans-IO core edgecore's EdgeHub drives), and a hollow
//! kubelet that reports every pod Running at once and confirms deletions.
//!
//! The cache is in memory: `EdgeSync` keeps each held key's version (what the convergence
//! check compares), and the node keeps the JSON of its pods (to build their status). Nothing
//! is written to disk: a per-node RocksDB would measure the disk, not the fleet, and costs
//! ~2 MB per node. Its durability is edgecore's and is tested there.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::sync::wire::{self, Parts};
use replication::sync::{Down, EdgeRecovered, EdgeSync};
use replication::{ObjectKey, ResourceVersion};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use transport::tls::CertificateDer;
use transport::{ClientConfig, Identity, Link, LinkEvent};

use crate::probe::Probes;

/// The annotation whose value identifies a change for latency probes.
pub const PROBE_ANNOTATION: &str = "loadtest.kedge.io/probe";

/// What the harness asks of a node.
pub enum Command {
    /// Report a status change for every pod (status flood); `round` goes into `status.message`.
    StatusRound(u64),
    /// Drop the link and stay away until `Heal`.
    Partition,
    /// Connect again after a partition.
    Heal,
    /// What the node holds, for the convergence check.
    Snapshot(oneshot::Sender<Snapshot>),
}

/// A node's view, for the convergence check.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub held: BTreeMap<ObjectKey, ResourceVersion>,
    pub outbox: usize,
    /// The last `status.message` reported per pod.
    pub reported: HashMap<ObjectKey, String>,
    /// Bytes (UDP, both ways) on the current connection.
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    pub connected: bool,
    /// Connections this node's current link has made.
    pub connections: u64,
}

/// A node's credentials and where its cloud is.
#[derive(Clone)]
pub struct NodeSetup {
    pub name: String,
    pub identity: Identity,
    pub ca: CertificateDer<'static>,
    pub client: ClientConfig,
    pub endpoint: quinn::Endpoint,
    pub lease_period: Duration,
}

struct PodState {
    object: Object,
    /// `status.message` of the last report, empty before the first.
    reported: String,
}

struct HollowNode {
    setup: NodeSetup,
    sync: EdgeSync,
    pods: HashMap<ObjectKey, PodState>,
    node_status_sent: bool,
    probes: Arc<Probes>,
    status_round: u64,
    /// A connection came up: renew the Lease at once (as edgecore does).
    heartbeat_due: bool,
}

fn parse(bytes: &[u8]) -> Option<Object> {
    serde_json::from_slice(bytes).ok()
}

fn probe_of(object: &Object) -> Option<&str> {
    object::meta(object)?
        .get("annotations")?
        .get(PROBE_ANNOTATION)?
        .as_str()
}

impl HollowNode {
    fn new(setup: NodeSetup, probes: Arc<Probes>) -> Self {
        let recovered = EdgeRecovered {
            store_id: rand::random(),
            ..Default::default()
        };
        HollowNode {
            setup,
            sync: EdgeSync::new(recovered),
            pods: HashMap::new(),
            node_status_sent: false,
            probes,
            status_round: 0,
            heartbeat_due: false,
        }
    }

    fn connect(&self) -> Option<Link> {
        match transport::connect_on(
            &self.setup.endpoint,
            self.setup.client.clone(),
            &self.setup.ca,
            &self.setup.identity,
        ) {
            Ok(link) => Some(link),
            Err(e) => {
                tracing::error!(node = %self.setup.name, error = %e, "cannot start the link");
                None
            }
        }
    }

    /// Applies one event; returns the sequence number to ack once the batch is durable.
    fn on_event(&mut self, event: LinkEvent) -> Option<u64> {
        match event {
            LinkEvent::Connected { .. } => {
                self.sync
                    .on_connected(event.starts_new_session().unwrap_or(true));
                self.heartbeat_due = true;
                None
            }
            LinkEvent::Disconnected { .. } => {
                self.sync.on_disconnected();
                None
            }
            LinkEvent::Message(delivery) => {
                match wire::decode_down(Parts::of(&delivery.message)) {
                    Ok(down) => {
                        self.observe(&down);
                        let _ = self.sync.receive(down);
                    }
                    Err(e) => tracing::warn!(node = %self.setup.name, error = %e, "undecodable"),
                }
                Some(delivery.seq)
            }
            LinkEvent::Request(_) | LinkEvent::Heartbeat { .. } => None,
        }
    }

    /// The hollow kubelet's view of a downward change (before the state machine takes it).
    fn observe(&mut self, down: &Down) {
        match down {
            Down::Upsert(change) if change.key.kind() == "pods" => {
                if self
                    .sync
                    .held(&change.key)
                    .is_some_and(|held| held >= change.rv)
                {
                    return;
                }
                let Some(object) = parse(&change.object) else {
                    return;
                };
                let deleting =
                    object::meta(&object).is_some_and(|m| m.contains_key("deletionTimestamp"));
                if deleting {
                    self.probes.deletion_seen(&change.key);
                } else if let Some(probe) = probe_of(&object) {
                    self.probes.change_seen(&change.key, probe);
                }
                let reported = self
                    .pods
                    .get(&change.key)
                    .map(|p| p.reported.clone())
                    .unwrap_or_default();
                self.pods
                    .insert(change.key.clone(), PodState { object, reported });
            }
            Down::Upsert(change) if change.key.kind() == "nodes" && !self.node_status_sent => {
                if let Some(node) = parse(&change.object) {
                    self.report_node_status(change.key.clone(), node);
                }
            }
            Down::Delete { key, .. } if key.kind() == "pods" => {
                self.pods.remove(key);
            }
            _ => {}
        }
    }

    /// Reports what the pods need: Running for new ones, the confirmation for deleted ones.
    fn run_pods(&mut self) {
        let mut reports = Vec::new();
        for (key, pod) in &mut self.pods {
            let deleting =
                object::meta(&pod.object).is_some_and(|m| m.contains_key("deletionTimestamp"));
            if deleting {
                if pod.reported != "deleted" {
                    pod.reported = "deleted".into();
                    reports.push((key.clone(), Bytes::new(), None));
                }
                continue;
            }
            let wanted = if self.status_round == 0 {
                "running".to_owned()
            } else {
                format!("round-{}", self.status_round)
            };
            if pod.reported == wanted {
                continue;
            }
            // What the node holds before this write: the base of a status patch.
            let before = Bytes::from(object::to_stored(pod.object.clone()));
            let status = hollow_status(&pod.object, &wanted);
            pod.object.insert("status".into(), status);
            pod.reported = wanted;
            let bytes = Bytes::from(object::to_stored(pod.object.clone()));
            if self.status_round > 0 {
                self.probes.status_sent(key, &pod.reported);
            }
            reports.push((key.clone(), bytes, Some(before)));
        }
        for (key, bytes, before) in reports {
            let _ = self.sync.report_on(key, bytes, before.as_deref());
        }
    }

    fn report_node_status(&mut self, key: ObjectKey, mut node: Object) {
        let mut status = edge::node::observed_status(&self.setup.name, "kedge-hollow://0.1");
        edge::node::stamp_conditions(&mut status);
        node.insert("status".into(), status);
        let _ = self.sync.report(key, Bytes::from(object::to_stored(node)));
        self.node_status_sent = true;
    }

    /// "Durable" at once (the cache is memory): hand the batch back and queue the acks.
    fn flush(&mut self) {
        if let Some(batch) = self.sync.take_batch() {
            self.sync.durable(batch.token);
        }
    }

    fn snapshot(&self, link: Option<&Link>) -> Snapshot {
        let stats = link.and_then(|l| l.connection_stats());
        Snapshot {
            held: self.sync.held_entries(),
            outbox: self.sync.outbox_len(),
            reported: self
                .pods
                .iter()
                .map(|(k, p)| (k.clone(), p.reported.clone()))
                .collect(),
            bytes_rx: stats.map_or(0, |s| s.udp_rx.bytes),
            bytes_tx: stats.map_or(0, |s| s.udp_tx.bytes),
            connected: link.is_some_and(|l| l.is_connected()),
            connections: link.map_or(0, |l| l.counters().connections),
        }
    }
}

/// A pod's status as the hollow runtime reports it: Running and Ready, with `message`.
fn hollow_status(pod: &Object, message: &str) -> Value {
    let held = pod.get("status").cloned().unwrap_or(Value::Null);
    let containers: Vec<edge::edged::runtime::ContainerStatus> = pod
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| edge::edged::runtime::ContainerStatus {
            name: c.get("name").and_then(Value::as_str).unwrap_or("").into(),
            image: c.get("image").and_then(Value::as_str).unwrap_or("").into(),
            state: edge::edged::runtime::ContainerState::Running {
                started_at: held
                    .get("startTime")
                    .and_then(Value::as_str)
                    .map_or_else(object::now_rfc3339, str::to_owned),
            },
            last_termination: None,
            restart_count: 0,
        })
        .collect();
    let mut status = edge::edged::pod_status(
        &held,
        edge::edged::runtime::RestartPolicy::Always,
        &containers,
    );
    if let Some(map) = status.as_object_mut() {
        map.insert("message".into(), json!(message));
    }
    status
}

/// Runs one hollow node until the command channel closes.
pub async fn run(setup: NodeSetup, probes: Arc<Probes>, mut commands: mpsc::Receiver<Command>) {
    let lease_period = setup.lease_period;
    let mut node = HollowNode::new(setup, probes);
    let mut link = node.connect();
    // Leases spread over the period, so that a fleet does not renew in lockstep.
    let first = lease_period.mul_f64(rand::random::<f64>());
    let mut lease = tokio::time::interval_at(tokio::time::Instant::now() + first, lease_period);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut last_seq = None;
        tokio::select! {
            event = async { match link.as_mut() { Some(l) => l.next_event().await, None => std::future::pending().await } } => {
                let Some(event) = event else { return };
                last_seq = node.on_event(event).or(last_seq);
                if let Some(l) = link.as_mut() {
                    while let Some(event) = l.try_next_event() {
                        last_seq = node.on_event(event).or(last_seq);
                    }
                }
            }
            command = commands.recv() => match command {
                None => return,
                Some(Command::StatusRound(round)) => node.status_round = round,
                Some(Command::Partition) => {
                    if let Some(l) = link.take() {
                        l.close();
                    }
                    node.sync.link_down();
                }
                Some(Command::Heal) => {
                    if link.is_none() {
                        link = node.connect();
                    }
                }
                Some(Command::Snapshot(reply)) => {
                    let _ = reply.send(node.snapshot(link.as_ref()));
                }
            },
            _ = lease.tick() => node.heartbeat_due = true,
        }
        if let Some(l) = link.as_ref().filter(|_| node.heartbeat_due) {
            // Not connected: the next connection's heartbeat renews it.
            let _ = l.heartbeat(lease_period);
            node.heartbeat_due = false;
        }
        node.run_pods();
        node.flush();
        if let Some(l) = link.as_ref() {
            if let Some(seq) = last_seq {
                l.ack(seq);
            }
            while let Some(up) = node.sync.poll_transmit() {
                if l.send_encoded(wire::encode_up(&up)).await.is_err() {
                    break;
                }
            }
        }
    }
}
