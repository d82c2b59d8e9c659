//! CloudHub (KubeEdge's name for it): one sync session per node over `transport`, with
//! ObjectSync (what each node holds, acknowledged) persisted beside the cluster state.
//!
//! [`HubCore`] is the sans-IO core, in the style of quinn-proto and raft-rs: inputs are the
//! store's committed changes, link events (already decoded) and a clock reading ([`Now`]);
//! outputs are the messages to send to each node ([`HubCore::poll_transmit`]) and the writes
//! to commit ([`HubCore::poll_commit`], with the result handed back to
//! [`HubCore::on_committed`]). It reads the store but never writes it, spawns nothing, and
//! draws no randomness (the session epoch is given). It composes:
//! - the [`EdgeController`] (what each node should hold; reports judged under node
//!   authorization),
//! - one `NodeFeed` per node (sessions, acks, coalescing, ObjectSync records),
//! - [`LeaseRenewals`] (heartbeats → Lease writes).
//!
//! [`run`] is the async shell: it accepts links, decodes their events, follows the store's
//! watch with [`crate::watcher`], commits on the blocking pool (fsyncs never run on a runtime
//! thread), hands forwarded API calls to [`crate::node_api::dispatch`], and pushes the core's
//! messages into the links.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::api::{ApiError, Registry, Resource};

use crate::node_api::NodeRead;
use replication::sync::wire::{self, Parts};
use replication::sync::{persist, Down, FeedConfig, NodeFeed, Report, ReportRecord, Up};
use replication::watcher::{Event as WatcherEvent, ResumableWatcher};
use replication::{
    ObjectKey, ResourceVersion, Revision, SharedChange, Store, StoreError, WriteSet,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use transport::{CredentialPolicy, EncodedMessage, LinkEvent, LinkHandle};

use crate::credentials::NodeCredentials;
use crate::edgecontroller::{EdgeController, FeedOp, Judged};
use crate::lifecycle::LeaseRenewals;
use crate::metrics::Metrics;
use crate::policy::ConnectedNodes;

pub use crate::lifecycle::MIN_RENEWAL_INTERVAL;

/// A clock reading, given to the core by its shell (or a simulation).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For intervals (ack latency, renewal rate).
    pub instant: Instant,
    /// For timestamps written into objects (a Lease's `renewTime`).
    pub wall: time::OffsetDateTime,
}

impl Now {
    /// The real clocks.
    pub fn real() -> Now {
        Now {
            instant: Instant::now(),
            wall: time::OffsetDateTime::now_utc(),
        }
    }
}

/// One node's session state on the cloud side.
struct NodeSession {
    feed: NodeFeed,
    /// The link has a connection. While it has none, nothing is sent: the feed keeps (and
    /// coalesces) what is due, instead of the link's window filling with messages that a
    /// returning node may not need (a node back with a new session resyncs from its hello).
    connected: bool,
    /// When each unacknowledged object message of this session was sent (its number in the
    /// session, time), for the ack-latency histogram.
    sent_at: VecDeque<(u64, Instant)>,
}

/// A report accepted from a node (at most once, by its feed) and not yet committed.
#[derive(Debug, Clone)]
struct PendingReport {
    node: Arc<str>,
    report: Report,
    record: ReportRecord,
}

/// What a [`Commit`] is for, so that its result can be applied.
#[derive(Debug)]
enum Purpose {
    /// Reports on distinct keys, committed together (one fsync for all of them).
    Reports(Vec<(PendingReport, Judged)>),
    /// One report alone, after its batch lost a race with a write through the API.
    Report {
        pending: PendingReport,
        judged: Judged,
        attempts: u32,
    },
    /// Lease renewals; `batch` if several are written together.
    Leases { nodes: Vec<Arc<str>>, batch: bool },
    /// ObjectSync records and interests: losing them costs resends only.
    Records,
}

/// Writes the core wants committed. Commit `set` (off the runtime threads) and hand the
/// result to [`HubCore::on_committed`] before asking for the next one.
#[derive(Debug)]
pub struct Commit {
    pub set: WriteSet,
    purpose: Purpose,
}

/// The CloudHub core. See the module docs.
pub struct HubCore {
    controller: EdgeController,
    nodes: HashMap<Arc<str>, NodeSession>,
    feed_config: FeedConfig,
    epoch: u64,
    /// Nodes that may have something to send (ordered, so that a simulation replays).
    dirty: BTreeSet<Arc<str>>,
    /// Nodes whose feeds may have ObjectSync records to persist (only those are drained: a
    /// walk over every node per commit would cost O(fleet) per event).
    touched: BTreeSet<Arc<str>>,
    leases: LeaseRenewals,
    /// Reports accepted and not yet judged, in arrival order.
    reports: VecDeque<PendingReport>,
    /// Reports of a failed batch, committed one by one before anything else.
    retry: VecDeque<(PendingReport, u32)>,
    /// Lease renewals of a failed batch, written one by one.
    lease_retry: Vec<Arc<str>>,
    /// A report could not be judged (store read error): wait for the next tick.
    reports_blocked: bool,
    /// Interests to persist.
    records: WriteSet,
    metrics: Arc<Metrics>,
}

impl HubCore {
    /// A core whose node sessions are numbered in `epoch` (a random number per process, so
    /// that a node tells a restarted cloud from the one it knew).
    pub fn new(metrics: Arc<Metrics>, feed_config: FeedConfig, epoch: u64) -> Self {
        HubCore {
            controller: EdgeController::new(metrics.clone()),
            nodes: HashMap::new(),
            feed_config,
            epoch,
            dirty: BTreeSet::new(),
            touched: BTreeSet::new(),
            leases: LeaseRenewals::default(),
            reports: VecDeque::new(),
            retry: VecDeque::new(),
            lease_retry: Vec::new(),
            reports_blocked: false,
            records: WriteSet::new(),
            metrics,
        }
    }

    /// The EdgeController inside (its routing index, for inspection).
    pub fn controller(&self) -> &EdgeController {
        &self.controller
    }

    /// `node`'s feed, if the node is known.
    pub fn feed(&self, node: &str) -> Option<&NodeFeed> {
        self.nodes.get(node).map(|s| &s.feed)
    }

    fn session(&mut self, store: &Store, node: &Arc<str>) -> &mut NodeSession {
        self.touched.insert(node.clone());
        if !self.nodes.contains_key(node) {
            let record = persist::load_feed_record(store, node).unwrap_or_else(|e| {
                // Safe to start without it: the node is asked for a digest of what it holds.
                self.metrics.store_read_errors.inc();
                tracing::warn!(%node, error = %e, "ObjectSync record unreadable; the node will be asked for a digest");
                Default::default()
            });
            let feed = NodeFeed::new(self.feed_config, self.epoch, record);
            self.nodes.insert(
                node.clone(),
                NodeSession {
                    feed,
                    connected: false,
                    sent_at: VecDeque::new(),
                },
            );
        }
        self.nodes.get_mut(node).expect("inserted")
    }

    /// Routes everything already in the store (at start, or after the watch lost its
    /// history). Returns the revision it read at.
    ///
    /// # Errors
    /// A store read error; call again (routes are idempotent).
    pub fn bootstrap(&mut self, store: &Store) -> Result<Revision, StoreError> {
        let revision = self.controller.bootstrap(store)?;
        self.apply_feed_ops(store);
        Ok(revision)
    }

    /// One committed change of the cluster state (from the store's watch, in order).
    pub fn on_change(&mut self, store: &Store, change: &SharedChange) {
        self.controller.on_change(store, change);
        self.apply_feed_ops(store);
    }

    fn apply_feed_ops(&mut self, store: &Store) {
        while let Some(op) = self.controller.poll_feed_op() {
            let node = match &op {
                FeedOp::Set { node, .. }
                | FeedOp::Echo { node, .. }
                | FeedOp::Unset { node, .. }
                | FeedOp::UnsetRange { node, .. } => node.clone(),
            };
            let routing = self.controller.routing();
            let session = self.nodes.get(&node);
            // Keys of the range the node was given and did not ask for itself.
            let range_keys: Vec<(ObjectKey, ResourceVersion)> = match (&op, session) {
                (FeedOp::UnsetRange { range, .. }, Some(session)) => session
                    .feed
                    .desired_in(range)
                    .into_iter()
                    .filter(|(key, _)| !routing.is_interested(&node, key))
                    .collect(),
                _ => Vec::new(),
            };
            let feed = &mut self.session(store, &node).feed;
            match &op {
                FeedOp::Set { change, .. } => feed.set(change),
                FeedOp::Echo { change, base, .. } => feed.set_echo(change, *base),
                FeedOp::Unset { key, rv, .. } => feed.unset(key, *rv),
                FeedOp::UnsetRange { .. } => {
                    for (key, rv) in range_keys {
                        feed.unset(&key, rv);
                    }
                }
            }
            self.dirty.insert(node);
        }
    }

    /// The node's link has a connection. `new_session` is
    /// [`LinkEvent::starts_new_session`]: a new session (the node's hello decides the
    /// delta), or the same session going on over a resumed link.
    pub fn on_connected(&mut self, store: &Store, node: &Arc<str>, new_session: bool) {
        let session = self.session(store, node);
        session.connected = true;
        session.feed.on_connected(new_session);
        self.dirty.insert(node.clone());
    }

    /// The node's connection ended (the link may resume it).
    pub fn on_disconnected(&mut self, store: &Store, node: &Arc<str>) {
        self.session(store, node).connected = false;
    }

    /// A sync message from `node`, in order.
    pub fn on_message(&mut self, store: &Store, node: &Arc<str>, message: Up, now: Now) {
        match message {
            Up::Report(report) => self.on_report(store, node, report),
            up => {
                let metrics = self.metrics.clone();
                let session = self.session(store, node);
                if let Err(e) = session.feed.handle(up) {
                    tracing::warn!(%node, error = %e, "sync protocol error; restarting the session");
                    session.feed.restart_session();
                }
                let through = session.feed.credited_in_session();
                while session.sent_at.front().is_some_and(|(n, _)| *n <= through) {
                    if let Some((_, at)) = session.sent_at.pop_front() {
                        let latency = now.instant.saturating_duration_since(at);
                        metrics.ack_latency.observe(latency.as_secs_f64());
                    }
                }
                if session.sent_at.is_empty() {
                    // An initial sync's worth of send times, not kept for an idle node.
                    session.sent_at.shrink_to_fit();
                }
            }
        }
        self.dirty.insert(node.clone());
    }

    /// A heartbeat from `node`: its Lease is renewed at the next [`HubCore::poll_commit`].
    pub fn on_heartbeat(&mut self, node: &Arc<str>, period: Option<Duration>) {
        self.metrics.heartbeats.inc();
        self.leases.on_heartbeat(node, period);
    }

    /// Decides a get that `node`'s MetaServer forwarded (see
    /// [`EdgeController::authorize_read`]).
    ///
    /// # Errors
    /// 403 Forbidden if node authorization refuses it.
    pub fn on_read(
        &mut self,
        store: &Store,
        node: &Arc<str>,
        key: &ObjectKey,
    ) -> Result<(), ApiError> {
        if let Some(set) = self.controller.authorize_read(store, node, key)? {
            self.records.append(set);
        }
        self.apply_feed_ops(store);
        Ok(())
    }

    /// Decides a list that `node`'s MetaServer forwarded (see
    /// [`EdgeController::authorize_list`]).
    ///
    /// # Errors
    /// 403 Forbidden if node authorization refuses it.
    pub fn on_list(
        &mut self,
        store: &Store,
        node: &Arc<str>,
        resource: &Resource,
        namespace: Option<&str>,
    ) -> Result<(), ApiError> {
        if let Some(set) = self
            .controller
            .authorize_list(store, node, resource, namespace)?
        {
            self.records.append(set);
        }
        self.apply_feed_ops(store);
        Ok(())
    }

    /// Accepts a report (at most once per report id); it is judged and committed by the
    /// next [`HubCore::poll_commit`].
    fn on_report(&mut self, store: &Store, node: &Arc<str>, report: Report) {
        let record = match self.session(store, node).feed.accept_report(&report) {
            Ok(Some(record)) => record,
            Ok(None) => return, // already applied
            Err(e) => {
                // Typically the link replaying a report from the node's previous session
                // ahead of its new hello: the node sends it again once the session starts.
                tracing::debug!(%node, error = %e, "report out of protocol; dropped");
                return;
            }
        };
        self.reports.push_back(PendingReport {
            node: node.clone(),
            report,
            record,
        });
    }

    /// The next writes to commit, or `None` when there is nothing (left) to write. Reports
    /// first (a batch of distinct keys, each judged against the object as it is now), then
    /// Lease renewals, then ObjectSync records and interests.
    pub fn poll_commit(&mut self, store: &Store, now: Now) -> Option<Commit> {
        if let Some(commit) = self.poll_report_commit(store) {
            return Some(commit);
        }
        if let Some(node) = self.lease_retry.pop() {
            return self.lease_commit(store, vec![node], now, false);
        }
        let due = self.leases.due(now.instant);
        if !due.is_empty() {
            if let Some(commit) = self.lease_commit(store, due, now, true) {
                return Some(commit);
            }
        }
        let mut set = std::mem::take(&mut self.records);
        for node in std::mem::take(&mut self.touched) {
            if let Some(session) = self.nodes.get_mut(&node) {
                persist::add_objectsync_writes(&mut set, &node, session.feed.drain_writes());
            }
        }
        (!set.is_empty()).then_some(Commit {
            set,
            purpose: Purpose::Records,
        })
    }

    fn poll_report_commit(&mut self, store: &Store) -> Option<Commit> {
        if self.reports_blocked {
            return None;
        }
        if let Some((pending, attempts)) = self.retry.pop_front() {
            return match self.judge(store, &pending) {
                Some(judged) => Some(Commit {
                    set: judged.set.clone(),
                    purpose: Purpose::Report {
                        pending,
                        judged,
                        attempts,
                    },
                }),
                None => {
                    self.retry.push_front((pending, attempts));
                    None
                }
            };
        }
        // A batch of reports on distinct keys: a report is judged against the current
        // object, so a later one on the same key waits for the earlier one's commit.
        let mut batch: Vec<(PendingReport, Judged)> = Vec::new();
        let mut keys = HashSet::new();
        let mut all = WriteSet::new();
        while let Some(pending) = self.reports.pop_front() {
            if !keys.insert(pending.report.key.clone()) {
                self.reports.push_front(pending);
                break;
            }
            let Some(judged) = self.judge(store, &pending) else {
                self.reports.push_front(pending);
                break;
            };
            all.append(judged.set.clone());
            batch.push((pending, judged));
        }
        (!batch.is_empty()).then_some(Commit {
            set: all,
            purpose: Purpose::Reports(batch),
        })
    }

    fn judge(&mut self, store: &Store, pending: &PendingReport) -> Option<Judged> {
        match self
            .controller
            .judge_report(store, &pending.node, &pending.report, pending.record)
        {
            Ok(judged) => Some(judged),
            Err(e) => {
                tracing::warn!(node = %pending.node, key = %pending.report.key, error = %e, "cannot read the reported object; the report waits");
                self.reports_blocked = true;
                None
            }
        }
    }

    fn lease_commit(
        &mut self,
        store: &Store,
        nodes: Vec<Arc<str>>,
        now: Now,
        batch: bool,
    ) -> Option<Commit> {
        let renew_time = replication::api::object::micro_rfc3339(now.wall);
        let mut set = WriteSet::new();
        let mut renewing = Vec::with_capacity(nodes.len());
        for node in nodes {
            let duration = self.leases.duration_seconds(&node);
            match crate::lifecycle::lease_renewal(store, &node, &renew_time, duration) {
                Ok(s) => {
                    set.append(s);
                    renewing.push(node);
                }
                Err(e) => {
                    self.metrics.store_read_errors.inc();
                    tracing::warn!(%node, error = %e, "cannot read the Lease (the next heartbeat renews it)");
                }
            }
        }
        (!set.is_empty()).then_some(Commit {
            set,
            purpose: Purpose::Leases {
                nodes: renewing,
                batch,
            },
        })
    }

    /// The result of committing `commit`: the changes it made (in its writes' order), or the
    /// error. A failed report batch is committed again report by report, each judged again
    /// against the object as it is now (acknowledgements are cumulative, so no report may be
    /// skipped: each is applied, or refused for good, before the next).
    pub fn on_committed(&mut self, commit: Commit, result: Result<Vec<SharedChange>, StoreError>) {
        match (commit.purpose, result) {
            (Purpose::Reports(batch), Ok(changes)) => {
                let mut changes = changes.into_iter();
                for (pending, judged) in batch {
                    let change = if judged.changes_object {
                        changes.next()
                    } else {
                        None
                    };
                    self.report_done(pending, judged.echo, change);
                }
            }
            (Purpose::Reports(batch), Err(e)) => {
                tracing::debug!(error = %e, "a report batch raced a write; committing one by one");
                // Ahead of anything queued since, in their order.
                for (pending, _) in batch.into_iter().rev() {
                    self.retry.push_front((pending, 0));
                }
            }
            (
                Purpose::Report {
                    pending, judged, ..
                },
                Ok(changes),
            ) => {
                let change = if judged.changes_object {
                    changes.into_iter().next()
                } else {
                    None
                };
                self.report_done(pending, judged.echo, change);
            }
            (
                Purpose::Report {
                    pending, attempts, ..
                },
                Err(e),
            ) if replication::occ::may_try_again(attempts as usize + 1) => {
                tracing::debug!(node = %pending.node, key = %pending.report.key, error = %e, "report raced a write; judging it again");
                self.retry.push_front((pending, attempts + 1));
            }
            (Purpose::Report { pending, .. }, Err(e)) => {
                // Only its record from now on, so that the node stops resending it.
                tracing::warn!(node = %pending.node, key = %pending.report.key, error = %e, "report lost the race to other writes repeatedly; dropped");
                self.metrics.reports_refused.inc();
                persist::add_report_record(&mut self.records, &pending.node, pending.record);
                self.report_done(pending, false, None);
            }
            (Purpose::Leases { nodes, batch: true }, Err(_)) => {
                // A write through the API raced one of them: each alone, on the Lease as it
                // is now.
                self.lease_retry.extend(nodes);
            }
            (Purpose::Leases { nodes, .. }, Err(e)) => {
                tracing::warn!(?nodes, error = %e, "cannot renew the lease (the next heartbeat will)");
            }
            (Purpose::Leases { .. }, Ok(_)) => {}
            (Purpose::Records, Err(e)) => {
                tracing::warn!(error = %e, "persisting ObjectSync or interests failed (costs resends only)");
            }
            (Purpose::Records, Ok(_)) => {}
        }
    }

    fn report_done(&mut self, pending: PendingReport, echo: bool, change: Option<SharedChange>) {
        if let Some(change) = change.filter(|c| !c.is_delete()) {
            self.controller
                .report_committed(&pending.node, &pending.report, echo, change.rv);
        }
        if let Some(session) = self.nodes.get_mut(&pending.node) {
            session.feed.report_done(pending.record);
            self.touched.insert(pending.node.clone());
        }
        self.dirty.insert(pending.node);
    }

    /// A node that may have messages to send ([`HubCore::poll_transmit`]), each once.
    pub fn poll_dirty(&mut self) -> Option<Arc<str>> {
        self.dirty.pop_first()
    }

    /// The next message for `node`, if it is connected and its feed has one.
    pub fn poll_transmit(&mut self, node: &Arc<str>, now: Now) -> Option<Down> {
        let session = self.nodes.get_mut(node).filter(|s| s.connected)?;
        let down = session.feed.poll_transmit()?;
        self.touched.insert(node.clone());
        if down.is_object_message() {
            let number = session.feed.sent_in_session();
            // A new session numbers from 1 again.
            if session.sent_at.back().is_some_and(|(n, _)| *n >= number) {
                session.sent_at.clear();
            }
            session.sent_at.push_back((number, now.instant));
        }
        Some(down)
    }

    /// The periodic tick: reads that failed are tried again, and nodes with queued work are
    /// marked to be pumped. Returns (messages queued or in flight over all nodes, the most
    /// for one node), for the queue gauges.
    pub fn tick(&mut self, store: &Store) -> (usize, usize) {
        self.reports_blocked = false;
        if self.controller.retry_reads(store) > 0 {
            tracing::debug!("some routes are still unread");
        }
        self.apply_feed_ops(store);
        let (mut total, mut max) = (0usize, 0usize);
        for (node, session) in &self.nodes {
            if session.feed.queued() > 0 {
                self.dirty.insert(node.clone());
            }
            let depth = session.feed.queued() + session.feed.in_flight();
            total += depth;
            max = max.max(depth);
        }
        (total, max)
    }
}

/// The shell's side of one node's link.
struct LinkSlot {
    link: LinkHandle,
    /// A message the link had no room for; sent before anything else.
    stalled: Option<EncodedMessage>,
}

/// The async shell around [`HubCore`].
struct Shell {
    core: HubCore,
    store: Arc<Store>,
    links: HashMap<Arc<str>, LinkSlot>,
    metrics: Arc<Metrics>,
    connected: Arc<ConnectedNodes>,
    /// Node certificates: renewals over the link, revocation when a Node is deleted.
    credentials: Arc<NodeCredentials>,
    /// The served kinds, custom ones included, for classifying the nodes' forwarded calls.
    registry: Arc<Registry>,
    /// Where the nodes' forwarded writes are recorded ([`crate::audit`]).
    audit: Option<Arc<crate::audit::AuditLog>>,
    /// This replica, when several share the store ([`crate::linkclaim`]).
    replica: Option<crate::linkclaim::Replica>,
    /// The revision of this replica's claim of each node's current connection.
    claims: HashMap<Arc<str>, Revision>,
}

impl Shell {
    fn link_event(&mut self, node: &Arc<str>, event: LinkEvent) {
        let store = self.store.clone();
        match event {
            LinkEvent::Connected { .. } => {
                let new_session = event.starts_new_session().unwrap_or(true);
                self.connected.insert(node);
                if new_session {
                    // The link's window was reset with it: nothing stalled belongs to it.
                    if let Some(slot) = self.links.get_mut(node) {
                        slot.stalled = None;
                    }
                }
                self.core.on_connected(&store, node, new_session);
                self.claim(node);
                tracing::info!(%node, new_session, "node connected");
            }
            LinkEvent::Disconnected { reason } => {
                self.claims.remove(node);
                self.connected.remove(node);
                self.core.on_disconnected(&store, node);
                tracing::info!(%node, %reason, "node disconnected");
            }
            LinkEvent::Message(delivery) => {
                self.metrics.frames_up.inc();
                self.metrics
                    .bytes_up
                    .inc_by(delivery.message.content().len() as u64);
                match wire::decode_up(Parts::of(&delivery.message)) {
                    Ok(up) => self.core.on_message(&store, node, up, Now::real()),
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "malformed message from node dropped")
                    }
                }
                if let Some(slot) = self.links.get(node) {
                    slot.link.ack(delivery.seq);
                }
            }
            LinkEvent::Request(request) if transport::renew::is_request(&request.message) => {
                // Signing is a few milliseconds of CPU and a small file write: off the
                // runtime threads.
                let credentials = self.credentials.clone();
                let node = node.clone();
                tokio::spawn(async move {
                    let csr = request.message.content();
                    let signer = node.clone();
                    let result =
                        tokio::task::spawn_blocking(move || credentials.renew(&signer, &csr))
                            .await
                            .unwrap_or_else(|e| Err(format!("renewal failed: {e}")));
                    if let Err(reason) = &result {
                        tracing::warn!(%node, "renewal refused: {reason}");
                    }
                    let answer = transport::renew::answer(&node, result);
                    if let Err(e) = request.respond(&answer).await {
                        tracing::debug!(%node, error = %e, "node went away before its renewal");
                    }
                });
            }
            LinkEvent::Request(request) if transport::renew::is_trust_request(&request.message) => {
                let answer = transport::renew::trust_answer(node, self.credentials.trust_bundle());
                tokio::spawn(async move {
                    let _ = request.respond(&answer).await;
                });
            }
            LinkEvent::Request(request) => {
                let core = &mut self.core;
                crate::node_api::dispatch(
                    store.clone(),
                    &self.registry,
                    node.clone(),
                    self.metrics.clone(),
                    self.audit.clone(),
                    request,
                    |read| match read {
                        NodeRead::Object(key) => core.on_read(&store, node, key),
                        NodeRead::Collection(resource, namespace) => {
                            core.on_list(&store, node, resource, namespace)
                        }
                    },
                );
            }
            LinkEvent::Heartbeat { period } => self.core.on_heartbeat(node, period),
        }
    }

    /// Commits what the core wants written, one commit at a time, on the blocking pool.
    ///
    /// # Errors
    /// A commit's thread panicked or was cancelled (CloudHub stops: cloudcore exits).
    async fn commit(&mut self) -> anyhow::Result<()> {
        while let Some(mut commit) = self.core.poll_commit(&self.store, Now::real()) {
            let store = self.store.clone();
            let set = std::mem::take(&mut commit.set);
            let result = tokio::task::spawn_blocking(move || store.commit(set)).await?;
            self.core.on_committed(commit, result);
        }
        Ok(())
    }

    /// Sends what the core has for each node with work, as far as each link has room.
    fn pump(&mut self) {
        while let Some(node) = self.core.poll_dirty() {
            let Some(slot) = self.links.get_mut(&node) else {
                continue;
            };
            loop {
                let message = match slot.stalled.take() {
                    Some(m) => m,
                    None => match self.core.poll_transmit(&node, Now::real()) {
                        Some(down) => wire::encode_down(&down),
                        None => break,
                    },
                };
                let len = message.len() as u64;
                match slot.link.try_send_encoded(message) {
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
    }

    /// A committed change: a deleted Node revokes its node's certificates and cuts its link.
    fn on_change(&mut self, change: &SharedChange) {
        if change.is_delete() && change.key.kind() == "nodes" {
            self.cut_off(change.key.name().into());
        }
        if let Some(replica) = &self.replica {
            if let Some((node, revision)) = crate::linkclaim::foreign(change, &replica.identity) {
                let node: Arc<str> = node.into();
                if self.claims.get(&node).is_some_and(|mine| revision > *mine) {
                    self.claims.remove(&node);
                    if let Some(slot) = self.links.remove(&node) {
                        slot.link.close_with(
                            transport::CloseCode::Replaced,
                            "the node connected to another cloudcore replica since",
                        );
                        tracing::info!(%node, "the node's newer connection is on another replica: closing this one");
                    }
                }
            }
        }
        self.core.on_change(&self.store, change);
    }

    /// After the watch lost its history: a node with a link and no Node object was deleted
    /// meanwhile.
    /// Records that this replica holds `node`'s link now (replicated stores only). Synchronous:
    /// a claim by another replica seen after this returns is newer than ours.
    fn claim(&mut self, node: &Arc<str>) {
        let Some(replica) = &self.replica else { return };
        let Some(set) = crate::linkclaim::claim(node, replica) else {
            return;
        };
        match self.store.commit(set) {
            Ok(changes) => {
                if let Some(change) = changes.first() {
                    self.claims.insert(node.clone(), change.revision);
                }
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot record this replica's claim of the node's link")
            }
        }
    }

    fn cut_off_deleted(&mut self) {
        let gone: Vec<Arc<str>> = self
            .links
            .keys()
            .filter(|node| {
                ObjectKey::new("nodes", "", node)
                    .is_ok_and(|key| matches!(self.store.get(&key), Ok(None)))
            })
            .cloned()
            .collect();
        for node in gone {
            self.cut_off(node);
        }
    }

    fn cut_off(&mut self, node: Arc<str>) {
        {
            self.credentials.revoke(&node);
            if let Some(slot) = self.links.remove(&node) {
                slot.link.close_with(
                    transport::CloseCode::Unauthorized,
                    &format!(
                        "node {node}: certificate revoked (its Node object was deleted); to \
                         bring the node back, re-join it with a new bootstrap token"
                    ),
                );
                tracing::info!(%node, "Node deleted: its link is closed");
            }
        }
    }

    /// A replica cut off from the shared store gives its nodes up (they move to a replica
    /// that can serve them, instead of being served stale state here).
    fn give_up_if_unavailable(&mut self) -> bool {
        if self.store.is_available() {
            return false;
        }
        if !self.links.is_empty() {
            tracing::warn!(nodes = self.links.len(), "the shared store does not answer: closing every node's link so that the nodes move to another replica");
        }
        for (node, slot) in self.links.drain() {
            slot.link.close_with(
                transport::CloseCode::ShuttingDown,
                "this cloudcore replica cannot reach its store; connect to another",
            );
            self.connected.remove(&node);
            self.claims.remove(&node);
        }
        true
    }

    fn tick(&mut self) {
        self.give_up_if_unavailable();
        let (total, max) = self.core.tick(&self.store);
        self.metrics.send_queue_depth.set(total as i64);
        self.metrics.send_queue_max.set(max as i64);
        // Links that had no room are tried again.
        let stalled: Vec<Arc<str>> = self
            .links
            .iter()
            .filter(|(_, slot)| slot.stalled.is_some())
            .map(|(node, _)| node.clone())
            .collect();
        for node in stalled {
            self.core.dirty.insert(node);
        }
    }
}

/// How often CloudHub retries what waits (a full link, a failed read) and updates its gauges.
const TICK: Duration = Duration::from_millis(50);

/// Runs CloudHub until `shutdown` is cancelled or the server stops: accepts node links,
/// follows the store, pumps feeds.
///
/// # Errors
/// The store's watch closed, or the store could not be read at start after retries.
// Each is one of cloudcore's shared parts; a struct of them would only be unpacked here.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: Arc<Store>,
    mut server: transport::Server,
    metrics: Arc<Metrics>,
    connected: Arc<ConnectedNodes>,
    bus: Arc<crate::servicebus::ServiceBus>,
    credentials: Arc<NodeCredentials>,
    audit: Option<Arc<crate::audit::AuditLog>>,
    device_status_in_device: bool,
    replica: Option<crate::linkclaim::Replica>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut core = HubCore::new(metrics.clone(), FeedConfig::default(), rand::random());
    core.controller
        .set_device_status_in_device(device_status_in_device);
    let mut shell = Shell {
        core,
        store: store.clone(),
        links: HashMap::new(),
        metrics: metrics.clone(),
        connected,
        credentials,
        registry: Arc::new(Registry::with_store(store.clone())),
        audit,
        replica,
        claims: HashMap::new(),
    };
    let mut changes = ResumableWatcher::all(store.clone());
    let (events_tx, mut events_rx) = mpsc::channel::<(Arc<str>, LinkEvent)>(4096);
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            event = changes.next() => match event? {
                WatcherEvent::Change(change) => {
                    shell.on_change(&change);
                    // Everything already queued before committing and sending.
                    while let Some(WatcherEvent::Change(change)) = changes.try_next()? {
                        shell.on_change(&change);
                    }
                }
                WatcherEvent::Restart { .. } => {
                    // The watch starts (or lost its history): route everything from the
                    // store; a change seen both ways is the same desired state to a feed.
                    while let Err(e) = shell.core.bootstrap(&store) {
                        metrics.store_read_errors.inc();
                        tracing::error!(error = %e, "CloudHub cannot read the store; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    shell.cut_off_deleted();
                }
            },
            link = server.accept() => {
                let Some(mut link) = link else { return Ok(()) };
                if !store.is_available() {
                    link.handle().close_with(
                        transport::CloseCode::ShuttingDown,
                        "this cloudcore replica cannot reach its store; connect to another",
                    );
                    continue;
                }
                let node: Arc<str> = link.handle().peer().into();
                shell.links.insert(node.clone(), LinkSlot { link: link.handle().clone(), stalled: None });
                bus.attach(&node, link.handle().clone());
                let tx = events_tx.clone();
                tokio::spawn(async move {
                    while let Some(event) = link.next_event().await {
                        if tx.send((node.clone(), event)).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Some((node, event)) = events_rx.recv() => {
                shell.link_event(&node, event);
                while let Ok((node, event)) = events_rx.try_recv() {
                    shell.link_event(&node, event);
                }
                metrics.connected_nodes.set(shell.connected.len() as i64);
            }
            _ = tick.tick() => {
                shell.tick();
                metrics.quic_connections.set(server.quic_connection_states() as i64);
            }
        }
        shell.commit().await?;
        shell.pump();
    }
}
