//! CloudHub: one sync session per node over `transport`, fed by the EdgeController's routing
//! index from the store's watch, with ObjectSync persisted beside the cluster state.
//!
//! [`HubCore`] is synchronous (no IO of its own beyond the store): it folds store changes into
//! routes and node feeds, applies node reports (after node authorization), and says what to
//! send. [`run`] is the async shell: it accepts links, forwards their events, follows the
//! store's watch and pumps the feeds into the links.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::api::remote::{classify, ApiCall, ApiReply};
use replication::api::{ApiError, Verb};
use replication::sync::wire::{self, Parts};
use replication::sync::{persist, FeedConfig, NodeFeed, Report, Up};
use replication::{
    Change, ChangeKind, KeyRange, ObjectKey, Precondition, SharedChange, Store, WriteSet,
};
use tokio::sync::mpsc;
use transport::{EncodedMessage, IncomingRequest, LinkEvent, LinkHandle};

use crate::authz::{self, Decision, Read};
use crate::metrics::Metrics;
use crate::node_api::{self, NodeApiPolicy};
use crate::policy::ConnectedNodes;
use crate::routing::{Action, Route, RoutingIndex, Target, SERVICE_KINDS};

struct NodeSlot {
    feed: NodeFeed,
    link: Option<LinkHandle>,
    /// A message the link had no room for; sent before anything else.
    stalled: Option<EncodedMessage>,
    /// The link has a connection. While it has none, nothing is pumped into it: the feed keeps
    /// (and coalesces) what is due, instead of the link's window filling with messages that a
    /// returning node may not need (a node back with a new session resyncs from its hello).
    connected: bool,
    /// When each unacknowledged object message of this session was sent (its number in the
    /// session, time), for the ack-latency histogram.
    sent_at: VecDeque<(u64, Instant)>,
    /// When this node's Lease was last renewed from a heartbeat.
    renewed_at: Option<Instant>,
}

/// A report this hub wrote, whose watch event should go back to its node as a bump only.
struct Echo {
    node: Arc<str>,
    base: u64,
    rv: u64,
}

/// A report decided and waiting for the batch commit.
struct PendingReport {
    node: Arc<str>,
    report: Report,
    record: replication::sync::ReportRecord,
    judged: Judged,
}

/// A report judged against the current object.
struct Judged {
    /// Its writes alone (committed alone if the batch fails).
    set: WriteSet,
    /// It writes or deletes the object (one change), rather than only being recorded.
    changes_object: bool,
    /// The report's bytes are exactly what is written (the node needs only the new version).
    echo: bool,
}

/// The shortest interval between two renewals of one node's Lease (nodes beat every 10 s).
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

pub struct HubCore {
    store: Arc<Store>,
    routing: RoutingIndex,
    nodes: HashMap<Arc<str>, NodeSlot>,
    feed_config: FeedConfig,
    epoch: u64,
    echoes: HashMap<ObjectKey, Echo>,
    /// Nodes with work to send or records to persist.
    dirty: HashSet<Arc<str>>,
    metrics: Arc<Metrics>,
    /// Reports decided since the last commit: one commit (one fsync) for all of them.
    reports: Vec<PendingReport>,
    report_keys: HashSet<ObjectKey>,
    /// Nodes whose heartbeat arrived since the last commit: their Leases are renewed together.
    heartbeats: HashSet<Arc<str>>,
}

fn parse(bytes: &[u8]) -> Option<Object> {
    serde_json::from_slice(bytes).ok()
}

impl HubCore {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        HubCore {
            store,
            routing: RoutingIndex::new(),
            nodes: HashMap::new(),
            feed_config: FeedConfig::default(),
            epoch: rand::random(),
            echoes: HashMap::new(),
            dirty: HashSet::new(),
            metrics,
            reports: Vec::new(),
            report_keys: HashSet::new(),
            heartbeats: HashSet::new(),
        }
    }

    fn slot(&mut self, node: &Arc<str>) -> &mut NodeSlot {
        if !self.nodes.contains_key(node) {
            let record = persist::load_feed_record(&self.store, node).unwrap_or_else(|e| {
                tracing::warn!(%node, error = %e, "ObjectSync record unreadable; the node will be asked for a digest");
                Default::default()
            });
            let feed = NodeFeed::new(self.feed_config, self.epoch, record);
            self.nodes.insert(
                node.clone(),
                NodeSlot {
                    feed,
                    link: None,
                    stalled: None,
                    connected: false,
                    sent_at: VecDeque::new(),
                    renewed_at: None,
                },
            );
        }
        self.nodes.get_mut(node).expect("inserted")
    }

    /// Routes everything already in the store (at start). Returns the revision it read at.
    pub fn bootstrap(&mut self) -> u64 {
        let revision = self.store.revision();
        match persist::load_interests(&self.store) {
            Ok(interests) => {
                for (node, key) in interests {
                    self.routing.add_interest(&node, &key);
                    if let Some(current) = self.current(&key) {
                        let node: Arc<str> = node.into();
                        self.want(&node, &current);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "interest records unreadable; nodes ask again"),
        }
        for kind in ["nodes", "pods", "devices"] {
            let Ok(range) = KeyRange::kind(kind) else {
                continue;
            };
            let items: Vec<_> = self.store.scan(&range).flatten().collect();
            for (key, versioned) in items {
                let change = Arc::new(Change::new(
                    revision,
                    key,
                    versioned.rv,
                    ChangeKind::Added,
                    versioned.object,
                ));
                self.on_change(&change);
            }
        }
        revision
    }

    fn current(&self, key: &ObjectKey) -> Option<SharedChange> {
        let v = self.store.get(key).ok()??;
        Some(Arc::new(Change::new(
            self.store.revision(),
            key.clone(),
            v.rv,
            ChangeKind::Modified,
            v.object,
        )))
    }

    fn want(&mut self, node: &Arc<str>, change: &SharedChange) {
        let echo = self
            .echoes
            .get(&change.key)
            .filter(|e| &e.node == node && e.rv == change.rv)
            .map(|e| e.base);
        let slot = self.slot(node);
        match echo {
            Some(base) => slot.feed.set_echo(change, base),
            None => slot.feed.set(change),
        }
        self.dirty.insert(node.clone());
    }

    fn drop_key(&mut self, node: &Arc<str>, key: &ObjectKey, rv: u64) {
        self.slot(node).feed.unset(key, rv);
        self.dirty.insert(node.clone());
    }

    fn apply_route(&mut self, route: Route, change: &SharedChange) {
        match (&route.target, route.action) {
            (Target::Object(key), Action::Want) if *key == change.key => {
                if !change.is_delete() {
                    self.want(&route.node, change);
                }
            }
            (Target::Object(key), Action::Drop) if *key == change.key => {
                self.drop_key(&route.node, key, change.rv)
            }
            (Target::Object(key), Action::Want) => {
                if let Some(current) = self.current(key) {
                    self.want(&route.node, &current);
                }
            }
            // A node that asked for the object keeps it when its last pod stops referencing it.
            (Target::Object(key), Action::Drop) if self.routing.is_interested(&route.node, key) => {
            }
            (Target::Object(key), Action::Drop) => {
                let rv = self
                    .store
                    .get(key)
                    .ok()
                    .flatten()
                    .map_or(change.rv, |v| v.rv);
                self.drop_key(&route.node, key, rv);
            }
            (Target::NamespaceServices(ns), action) => {
                for kind in SERVICE_KINDS {
                    let Ok(range) = KeyRange::namespace(kind, ns) else {
                        continue;
                    };
                    let items: Vec<_> = self.store.scan(&range).flatten().collect();
                    for (key, v) in items {
                        match action {
                            Action::Want => {
                                let c = Arc::new(Change::new(
                                    change.revision,
                                    key,
                                    v.rv,
                                    ChangeKind::Modified,
                                    v.object,
                                ));
                                self.want(&route.node, &c);
                            }
                            Action::Drop if self.routing.is_interested(&route.node, &key) => {}
                            Action::Drop => self.drop_key(&route.node, &key, v.rv),
                        }
                    }
                }
            }
        }
    }

    /// One committed change of the cluster state.
    pub fn on_change(&mut self, change: &SharedChange) {
        let object = if change.is_delete() {
            None
        } else {
            parse(&change.object)
        };
        if !change.is_delete() && object.is_none() {
            tracing::warn!(key = %change.key, "unparseable object not routed");
            return;
        }
        let routes = self.routing.observe(&change.key, object.as_ref());
        for route in routes {
            self.apply_route(route, change);
        }
        if let Some(echo) = self.echoes.get(&change.key) {
            if change.rv >= echo.rv {
                self.echoes.remove(&change.key);
            }
        }
    }

    pub fn attach(&mut self, node: &Arc<str>, link: LinkHandle) {
        self.slot(node).link = Some(link);
    }

    pub fn link_event(&mut self, node: &Arc<str>, event: LinkEvent, connected: &ConnectedNodes) {
        match event {
            LinkEvent::Connected {
                peer_stream_new,
                peer_forgot_our_stream,
            } => {
                connected.insert(node);
                let new_session = peer_stream_new || peer_forgot_our_stream;
                let slot = self.slot(node);
                slot.connected = true;
                if new_session {
                    // The link's window was reset with it: nothing stalled belongs to it.
                    slot.stalled = None;
                }
                // A new session (the node's hello decides the delta), or the same session
                // going on over a resumed link: the node decides the same way.
                slot.feed.on_connected(new_session);
                tracing::info!(%node, peer_stream_new, peer_forgot_our_stream, "node connected");
            }
            LinkEvent::Disconnected { reason } => {
                connected.remove(node);
                self.slot(node).connected = false;
                tracing::info!(%node, %reason, "node disconnected");
            }
            LinkEvent::Message(delivery) => {
                self.metrics.frames_up.inc();
                self.metrics
                    .bytes_up
                    .inc_by(delivery.message.content().len() as u64);
                match wire::decode_up(Parts::of(&delivery.message)) {
                    Ok(Up::Report(report)) => self.on_report(node, report),
                    Ok(up) => {
                        if let Err(e) = self.slot(node).feed.handle(up) {
                            tracing::warn!(%node, error = %e, "sync protocol error; restarting the session");
                            self.slot(node).feed.restart_session();
                        }
                        if let Some(slot) = self.nodes.get_mut(node) {
                            let through = slot.feed.credited_in_session();
                            while slot.sent_at.front().is_some_and(|(n, _)| *n <= through) {
                                if let Some((_, at)) = slot.sent_at.pop_front() {
                                    self.metrics.ack_latency.observe(at.elapsed().as_secs_f64());
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "malformed message from node dropped")
                    }
                }
                if let Some(link) = &self.slot(node).link {
                    link.ack(delivery.seq);
                }
            }
            LinkEvent::Request(request) => self.on_request(node, request),
            LinkEvent::Heartbeat => {
                self.metrics.heartbeats.inc();
                self.heartbeats.insert(node.clone());
                return; // nothing to send: the Lease is not routed back to its node
            }
        }
        self.dirty.insert(node.clone());
    }

    /// A call the node's MetaServer forwarded: reads are authorized here (by what is routed
    /// to the node), writes at commit by [`NodeApiPolicy`]; served off this loop.
    fn on_request(&mut self, node: &Arc<str>, request: IncomingRequest) {
        let header = request.message.to_message().header;
        let call = match ApiCall::from_message(&request.message) {
            Ok(call) => call,
            Err(e) => {
                tracing::warn!(%node, error = %e, "malformed request from node");
                let reply = ApiReply::error(&ApiError::bad_request(e.to_string()));
                tokio::spawn(async move {
                    let _ = request
                        .respond(&reply.to_message(&header, "cloudhub"))
                        .await;
                });
                return;
            }
        };
        let uri = call.uri.parse().unwrap_or_default();
        let refused = match classify(&call.method, &uri) {
            Some(target) if target.verb == Verb::Get => match target.key() {
                Some(key) => {
                    let routed = self.routing.holds(node, &key);
                    match authz::authorize_read(node, &key, routed) {
                        Ok(Read::Routed) => None,
                        Ok(Read::Subscribe) => {
                            self.subscribe(node, &key);
                            None
                        }
                        Err(refusal) => {
                            tracing::warn!(%node, %key, reason = %refusal.reason, "node read refused");
                            Some(ApiError::forbidden(refusal.to_string()))
                        }
                    }
                }
                None => Some(ApiError::bad_request("not an object name")),
            },
            // Other verbs are judged by the policy (writes on their result).
            _ => None,
        };
        let store = self.store.clone();
        let policy = Arc::new(NodeApiPolicy {
            node: node.clone(),
            metrics: self.metrics.clone(),
        });
        tokio::spawn(async move {
            let reply = match refused {
                Some(error) => ApiReply::error(&error),
                None => node_api::serve(store, policy, call).await,
            };
            if let Err(e) = request
                .respond(&reply.to_message(&header, "cloudhub"))
                .await
            {
                tracing::debug!(error = %e, "node went away before its reply");
            }
        });
    }

    /// Routes `key` to `node` from now on (it asked for it), and persists that.
    fn subscribe(&mut self, node: &Arc<str>, key: &replication::ObjectKey) {
        if !self.routing.add_interest(node, key) {
            return;
        }
        let mut set = WriteSet::new();
        persist::add_interest(&mut set, node, key);
        if let Err(e) = self.store.commit(set) {
            tracing::warn!(%node, %key, error = %e, "persisting an interest failed");
        }
        if let Some(current) = self.current(key) {
            self.want(node, &current);
        }
    }

    /// Applies a node's report if node authorization allows it; either way it is recorded as
    /// done, so the node stops resending it.
    fn on_report(&mut self, node: &Arc<str>, report: Report) {
        let record = match self.slot(node).feed.accept_report(&report) {
            Ok(Some(record)) => record,
            Ok(None) => return, // already applied
            Err(e) => {
                // Typically the link replaying a report from the node's previous session
                // ahead of its new hello: the node sends it again once the session starts.
                tracing::debug!(%node, error = %e, "report out of protocol; dropped");
                return;
            }
        };
        // A report is judged against the current object: an earlier one on the same key
        // still in the batch must be committed first.
        if self.report_keys.contains(&report.key) {
            self.commit_reports();
        }
        let judged = self.judge_report(node, &report, record);
        self.report_keys.insert(report.key.clone());
        self.reports.push(PendingReport {
            node: node.clone(),
            report,
            record,
            judged,
        });
    }

    /// What applying `report` to the current object means: the writes (with the report's
    /// record), whether the object changes, and whether the node already holds the result.
    fn judge_report(
        &mut self,
        node: &Arc<str>,
        report: &Report,
        record: replication::sync::ReportRecord,
    ) -> Judged {
        let current = self.store.get(&report.key).ok().flatten();
        let current_object = current.as_ref().and_then(|v| parse(&v.object));
        let proposed = match &report.patch {
            // A patch of the part the node owns, on top of the cloud's current object.
            Some(patch) => current_object.clone().and_then(|mut object| {
                let part = replication::sync::status_patch::owned_part(report.key.kind())?;
                match replication::sync::status_patch::apply(part, &mut object, patch) {
                    Ok(()) => Some(object),
                    Err(e) => {
                        tracing::warn!(%node, key = %report.key, error = %e, "bad status patch");
                        None
                    }
                }
            }),
            None if report.object.is_empty() => None,
            None => parse(&report.object),
        };
        let mut set = WriteSet::new();
        if report.patch.is_some() && proposed.is_none() {
            // Nothing to apply (the pod is gone, or the patch was bad): recorded as done.
            self.metrics.reports_refused.inc();
            persist::add_report_record(&mut set, node, record);
            return Judged {
                set,
                changes_object: false,
                echo: false,
            };
        }
        let mut echo_bytes = None;
        let mut changes_object = false;
        match authz::authorize(
            node,
            &report.key,
            current_object.as_ref(),
            proposed.as_ref(),
        ) {
            Ok(Decision::Write(object)) | Ok(Decision::Status(object)) => {
                let bytes = Bytes::from(object::to_stored(object));
                // A report that changes nothing is recorded, not written: no new version, no
                // MODIFIED event without a change (as kube-apiserver skips no-op updates).
                if current.as_ref().is_none_or(|c| c.object != bytes) {
                    let expect = current
                        .as_ref()
                        .map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
                    echo_bytes = Some(bytes.clone());
                    changes_object = true;
                    set.put(report.key.clone(), bytes, expect);
                }
            }
            Ok(Decision::ConfirmDelete) => {
                let expect = current
                    .as_ref()
                    .map_or(Precondition::Exists, |c| Precondition::Version(c.rv));
                changes_object = true;
                set.delete(report.key.clone(), expect);
            }
            Err(refusal) => {
                tracing::warn!(%node, key = %report.key, reason = %refusal.reason, "node write refused");
                self.metrics.reports_refused.inc();
            }
        }
        persist::add_report_record(&mut set, node, record);
        // The node already holds what is written (it needs only the new version): the same
        // bytes for a whole report; for a status patch on the version it was made against,
        // the same status on the same object.
        let echo = match &report.patch {
            Some(_) => {
                echo_bytes.is_some() && current.as_ref().is_some_and(|c| c.rv == report.base)
            }
            None => echo_bytes.as_ref().is_some_and(|b| *b == report.object),
        };
        Judged {
            set,
            changes_object,
            echo,
        }
    }

    /// Commits the pending reports in one write; if that fails (a write through the API raced
    /// one report), one by one, judging a report that lost the race again against the object
    /// as it is now. Acknowledgements are cumulative, so no report may be skipped: each is
    /// applied, or refused for good, before the next.
    pub fn commit_reports(&mut self) {
        let pending = std::mem::take(&mut self.reports);
        self.report_keys.clear();
        if pending.is_empty() {
            return;
        }
        let mut all = WriteSet::new();
        for p in &pending {
            all.append(p.judged.set.clone());
        }
        match self.store.commit(all) {
            Ok(changes) => {
                let mut changes = changes.into_iter();
                for p in pending {
                    let change = if p.judged.changes_object {
                        changes.next()
                    } else {
                        None
                    };
                    self.report_committed(p, change);
                }
            }
            Err(_) => {
                for mut p in pending {
                    let mut attempts = 0;
                    loop {
                        match self.store.commit(p.judged.set.clone()) {
                            Ok(changes) => {
                                let change = changes.into_iter().next();
                                self.report_committed(p, change);
                                break;
                            }
                            Err(e) if attempts < 3 => {
                                attempts += 1;
                                tracing::debug!(node = %p.node, key = %p.report.key, error = %e, "report raced a write; judging it again");
                                p.judged = self.judge_report(&p.node, &p.report, p.record);
                            }
                            Err(e) => {
                                // Only its record, so that the node stops resending it.
                                tracing::warn!(node = %p.node, key = %p.report.key, error = %e, "report lost the race to other writes three times; dropped");
                                self.metrics.reports_refused.inc();
                                let mut set = WriteSet::new();
                                persist::add_report_record(&mut set, &p.node, p.record);
                                if let Err(e) = self.store.commit(set) {
                                    tracing::error!(node = %p.node, error = %e, "cannot record a report");
                                }
                                p.judged.changes_object = false;
                                self.report_committed(p, None);
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Renews the Lease of every node whose heartbeat arrived since the last call, in one
    /// write. The renewal time is the cloud's clock at receipt, so a node's clock skew cannot
    /// make it look alive or dead. A node that beats more often than [`MIN_RENEWAL_INTERVAL`]
    /// renews no more often than that: each renewal is a write, and the link is the node's to
    /// flood.
    pub fn commit_heartbeats(&mut self) {
        if self.heartbeats.is_empty() {
            return;
        }
        let beating: Vec<Arc<str>> = self.heartbeats.drain().collect();
        let now = Instant::now();
        let mut nodes = Vec::with_capacity(beating.len());
        for node in beating {
            let slot = self.slot(&node);
            if slot
                .renewed_at
                .is_some_and(|at| now.duration_since(at) < MIN_RENEWAL_INTERVAL)
            {
                continue;
            }
            slot.renewed_at = Some(now);
            nodes.push(node);
        }
        if nodes.is_empty() {
            return;
        }
        let renew_time = object::now_micro_rfc3339();
        let mut all = WriteSet::new();
        for node in &nodes {
            if let Some(set) = self.lease_renewal(node, &renew_time) {
                all.append(set);
            }
        }
        if self.store.commit(all).is_ok() {
            return;
        }
        // A write through the API raced one of them: each alone, on the Lease as it is now.
        for node in &nodes {
            let Some(set) = self.lease_renewal(node, &renew_time) else {
                continue;
            };
            if let Err(e) = self.store.commit(set) {
                tracing::warn!(%node, error = %e, "cannot renew the lease (the next heartbeat will)");
            }
        }
    }

    fn lease_renewal(&self, node: &str, renew_time: &str) -> Option<WriteSet> {
        let key = ObjectKey::new("leases", "kube-node-lease", node).ok()?;
        let current = self.store.get(&key).ok().flatten();
        let held = current.as_ref().and_then(|v| parse(&v.object));
        let lease = crate::lifecycle::renewed_lease(node, held, renew_time);
        let expect = current.map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
        let mut set = WriteSet::new();
        set.put(key, Bytes::from(object::to_stored(lease)), expect);
        Some(set)
    }

    fn report_committed(&mut self, p: PendingReport, change: Option<SharedChange>) {
        if let Some(change) = change.filter(|c| !c.is_delete()) {
            self.metrics.reports_applied.inc();
            // The node already holds exactly these bytes: it needs only the version.
            if p.judged.echo {
                self.echoes.insert(
                    p.report.key.clone(),
                    Echo {
                        node: p.node.clone(),
                        base: p.report.base,
                        rv: change.rv,
                    },
                );
            }
        }
        self.slot(&p.node).feed.report_done(p.record);
        self.dirty.insert(p.node);
    }

    /// Sends what the node's feed has for its link, and persists its ObjectSync writes.
    pub fn pump(&mut self, node: &Arc<str>) {
        let Some(slot) = self.nodes.get_mut(node) else {
            return;
        };
        if let Some(link) = slot.link.clone().filter(|_| slot.connected) {
            loop {
                let message = match slot.stalled.take() {
                    Some(m) => m,
                    None => match slot.feed.poll_transmit() {
                        Some(down) => {
                            if down.is_object_message() {
                                let number = slot.feed.sent_in_session();
                                // A new session numbers from 1 again.
                                if slot.sent_at.back().is_some_and(|(n, _)| *n >= number) {
                                    slot.sent_at.clear();
                                }
                                slot.sent_at.push_back((number, Instant::now()));
                            }
                            wire::encode_down(&down)
                        }
                        None => break,
                    },
                };
                let len = message.len() as u64;
                match link.try_send_encoded(message) {
                    Ok(Ok(_)) => {
                        self.metrics.frames_down.inc();
                        self.metrics.bytes_down.inc_by(len);
                    }
                    Ok(Err(back)) => {
                        slot.stalled = Some(back);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "link closed");
                        break;
                    }
                }
            }
        }
        let writes: Vec<_> = slot.feed.drain_writes().collect();
        if !writes.is_empty() {
            let mut set = WriteSet::new();
            persist::add_objectsync_writes(&mut set, node, writes);
            if let Err(e) = self.store.commit(set) {
                tracing::warn!(%node, error = %e, "persisting ObjectSync failed (costs resends only)");
            }
        }
    }

    pub fn pump_dirty(&mut self) {
        let dirty: Vec<Arc<str>> = self.dirty.drain().collect();
        for node in dirty {
            self.pump(&node);
        }
        let (mut total, mut max) = (0usize, 0usize);
        for slot in self.nodes.values() {
            let depth = slot.feed.queued() + slot.feed.in_flight();
            total += depth;
            max = max.max(depth);
        }
        self.metrics.send_queue_depth.set(total as i64);
        self.metrics.send_queue_max.set(max as i64);
    }

    /// Nodes whose feeds still have stalled or queued work (retried on a timer).
    pub fn mark_backlogged(&mut self) {
        for (node, slot) in &self.nodes {
            if slot.stalled.is_some() || slot.feed.queued() > 0 {
                self.dirty.insert(node.clone());
            }
        }
    }
}

/// Runs CloudHub until the server stops: accepts node links, follows the store, pumps feeds.
pub async fn run(
    store: Arc<Store>,
    mut server: transport::Server,
    metrics: Arc<Metrics>,
    connected: Arc<ConnectedNodes>,
    bus: Arc<crate::servicebus::ServiceBus>,
) {
    let mut core = HubCore::new(store.clone(), metrics.clone());
    // Subscribe at the revision the bootstrap reads, so no change between them is missed;
    // a change seen both ways is applied twice, which feeds treat as the same desired state.
    let revision = store.revision();
    let mut seen = revision;
    let Ok(mut watcher) = store.watch().subscribe(KeyRange::all(), Some(revision)) else {
        tracing::error!("CloudHub cannot follow the store");
        return;
    };
    core.bootstrap();
    core.pump_dirty();
    let (events_tx, mut events_rx) = mpsc::channel::<(Arc<str>, LinkEvent)>(4096);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            change = watcher.next() => match change {
                Ok(change) => {
                    seen = change.revision;
                    core.on_change(&change);
                    while let Ok(Some(change)) = watcher.try_next() {
                        seen = change.revision;
                        core.on_change(&change);
                    }
                }
                Err(replication::WatchError::Closed) => return,
                Err(e) => {
                    // Fell behind the live window: resume from the store's history where it
                    // can (no change missed); rebuild the routes from the store only if the
                    // history no longer reaches back that far (a full scan).
                    match store.watch().subscribe(KeyRange::all(), Some(seen)) {
                        Ok(w) => {
                            tracing::info!(error = %e, revision = seen, "CloudHub watch resumed from history");
                            watcher = w;
                        }
                        Err(_) => {
                            tracing::warn!(error = %e, "CloudHub watch lost; re-routing from the store");
                            seen = store.revision();
                            match store.watch().subscribe(KeyRange::all(), Some(seen)) {
                                Ok(w) => watcher = w,
                                Err(_) => return,
                            }
                            core.bootstrap();
                        }
                    }
                }
            },
            link = server.accept() => {
                let Some(mut link) = link else { return };
                let node: Arc<str> = link.handle().peer().into();
                core.attach(&node, link.handle().clone());
                bus.attach(&node, link.handle().clone());
                let tx = events_tx.clone();
                let name = node.clone();
                tokio::spawn(async move {
                    while let Some(event) = link.next_event().await {
                        if tx.send((name.clone(), event)).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Some((node, event)) = events_rx.recv() => {
                core.link_event(&node, event, &connected);
                while let Ok((node, event)) = events_rx.try_recv() {
                    core.link_event(&node, event, &connected);
                }
                metrics.connected_nodes.set(connected.len() as i64);
            }
            _ = tick.tick() => core.mark_backlogged(),
        }
        core.commit_reports();
        core.commit_heartbeats();
        core.pump_dirty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::StoreConfig;

    fn lease_rv(store: &Store, node: &str) -> Option<u64> {
        let key = ObjectKey::new("leases", "kube-node-lease", node).ok()?;
        store.get(&key).ok().flatten().map(|v| v.rv)
    }

    #[test]
    fn heartbeats_renew_the_lease_at_most_once_a_second_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreConfig::cloud()).unwrap());
        let mut hub = HubCore::new(store.clone(), Arc::new(Metrics::new()));
        let connected = ConnectedNodes::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());

        hub.link_event(&a, LinkEvent::Heartbeat, &connected);
        hub.commit_heartbeats();
        let first = lease_rv(&store, "a").expect("a's Lease is created by its heartbeat");
        assert_eq!(lease_rv(&store, "b"), None, "b has not beaten");
        let key = ObjectKey::new("leases", "kube-node-lease", "a").unwrap();
        let lease: Object =
            serde_json::from_slice(&store.get(&key).unwrap().unwrap().object).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "a");
        assert!(lease["spec"]["renewTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));

        // A flood right after: no write for a, while b's first heartbeat renews b.
        for _ in 0..100 {
            hub.link_event(&a, LinkEvent::Heartbeat, &connected);
            hub.commit_heartbeats();
        }
        hub.link_event(&b, LinkEvent::Heartbeat, &connected);
        hub.commit_heartbeats();
        assert_eq!(
            lease_rv(&store, "a"),
            Some(first),
            "a flood is one renewal a second"
        );
        assert!(lease_rv(&store, "b").is_some());
        assert_eq!(
            hub.metrics.heartbeats.get(),
            102,
            "every heartbeat is counted"
        );

        // After the interval, a's next heartbeat renews again.
        std::thread::sleep(MIN_RENEWAL_INTERVAL);
        hub.link_event(&a, LinkEvent::Heartbeat, &connected);
        hub.commit_heartbeats();
        assert!(lease_rv(&store, "a") > Some(first));
    }
}
