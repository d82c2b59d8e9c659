//! The cloud side of the sync protocol for one node: a pure state machine.
//!
//! Inputs: what the node should hold (`set`, `set_echo`, `unset`, from cloud/'s routing),
//! link up/down, and the node's messages (`handle`, `accept_report`). Outputs: messages to send
//! (`poll_transmit`) and ObjectSync records to persist (`drain_writes`). No IO, no clock.
//!
//! What it guarantees, given in-order at-most-once delivery within a session:
//! - Coalescing: while a key waits to be sent, a newer version replaces it, and a removal
//!   replaces both; an object that changed ten times while the node was away is sent once.
//! - Delta resync: on hello the node's acked versions (ObjectSync) are compared with what it
//!   should hold; only differences are sent. Objects the node acknowledged are never resent
//!   while the record is trusted.
//! - Trust check: the node's hello carries a digest of its (key, version) pairs; if it differs
//!   from the record (new disk, lost or stale ObjectSync, restored backup), the feed asks for
//!   the node's pairs and diffs against them, never a blind full resend.
//! - No echo: when the cloud stored the node's own report unchanged, the node gets a bump of
//!   the version, not the bytes it already has.
//! - Bounded memory in flight: at most `max_in_flight` unacknowledged object messages.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::change::SharedChange;
use crate::key::ObjectKey;
use crate::sync::digest::SetDigest;
use crate::sync::messages::{Down, Hello, Report, SessionId, Up};
use crate::version::ResourceVersion;

/// Limits of a [`NodeFeed`].
#[derive(Debug, Clone, Copy)]
pub struct FeedConfig {
    /// Object messages sent and not yet acknowledged, at most.
    pub max_in_flight: usize,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            max_in_flight: 1_024,
        }
    }
}

/// ObjectSync records to persist (in the cloud's store, `objectsync` column family). Losing
/// the latest of them in a crash costs resends, never correctness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectSyncWrite {
    /// The node acknowledged holding `key` at `rv`.
    Acked {
        /// The object.
        key: ObjectKey,
        /// The version the node holds.
        rv: ResourceVersion,
    },
    /// The record no longer says the node holds `key` (it acked a delete, or asked to refetch).
    Forgotten {
        /// The object.
        key: ObjectKey,
    },
    /// The whole record is replaced (after a digest exchange, or for a new disk).
    Reset {
        /// Every (key, version) the node holds.
        acked: Vec<(ObjectKey, ResourceVersion)>,
    },
}

/// Which upward reports of a node's store have been applied: written in the same batch as the
/// report's effect, so each report takes effect at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportRecord {
    /// The node's store ([`Hello::store_id`]) the report ids are of.
    pub store_id: u64,
    /// Every report id up to and including this one is applied (or refused for good).
    pub through: u64,
}

/// A node's ObjectSync state as loaded from disk.
#[derive(Debug, Clone, Default)]
pub struct FeedRecord {
    /// What the node acknowledged holding: key → version.
    pub acked: BTreeMap<ObjectKey, ResourceVersion>,
    /// Which of the node's reports are applied (`None`: none yet).
    pub reports: Option<ReportRecord>,
}

/// A message the feed cannot take in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The node sent a message the feed's state does not allow (a protocol error: restart the
    /// session).
    #[error("unexpected {message} while {state:?}")]
    Unexpected {
        /// What came (`hello`, `digest`, `report`, ...).
        message: &'static str,
        /// The feed's state when it came.
        state: FeedState,
    },
}

/// Where a [`NodeFeed`] is in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedState {
    /// No connection to the node.
    Offline,
    /// Connected; waiting for the node's [`Hello`].
    AwaitHello,
    /// Sent a [`Down::DigestRequest`]; waiting for the node's pairs.
    AwaitDigest,
    /// In a session: sending the delta, then changes as they come.
    Streaming,
}

#[derive(Debug, Clone)]
struct Desired {
    change: SharedChange,
    /// The node holds this object's bytes at this older version (its own report).
    echo_base: Option<ResourceVersion>,
}

#[derive(Debug, Clone)]
enum Pending {
    Upsert(SharedChange),
    Bump {
        base: ResourceVersion,
        rv: ResourceVersion,
    },
    Delete {
        rv: ResourceVersion,
    },
}

#[derive(Debug, Clone, Copy)]
enum Sent {
    Version(ResourceVersion),
    Deleted,
    /// Superseded by a refetch: its ack proves nothing.
    Void,
}

#[derive(Debug)]
struct InFlight {
    count: u64,
    key: ObjectKey,
    sent: Sent,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// Upserts sent (whole objects).
    pub upserts: u64,
    /// Deletes sent.
    pub deletes: u64,
    /// Bumps sent (new version, bytes the node already has).
    pub bumps: u64,
    /// Object bytes sent in upserts.
    pub content_bytes: u64,
    /// Digest requests sent (the record was not trusted).
    pub digest_exchanges: u64,
    /// Sessions started.
    pub sessions: u64,
}

/// The cloud's sync state machine for one node; see the module docs.
pub struct NodeFeed {
    config: FeedConfig,
    epoch: u64,
    state: FeedState,
    session: Option<SessionId>,
    sessions_started: u64,
    sent: u64,
    /// Object messages of this session the node has acknowledged (they are numbered 1, 2, …).
    credited: u64,
    desired: BTreeMap<ObjectKey, Desired>,
    acked: BTreeMap<ObjectKey, ResourceVersion>,
    queue: VecDeque<ObjectKey>,
    pending: HashMap<ObjectKey, Pending>,
    in_flight: VecDeque<InFlight>,
    in_flight_keys: HashMap<ObjectKey, u32>,
    control: VecDeque<Down>,
    writes: Vec<ObjectSyncWrite>,
    store_id: Option<u64>,
    reports: Option<ReportRecord>,
    report_ack: Option<u64>,
    stats: FeedStats,
}

impl NodeFeed {
    /// A feed for one node. `epoch` identifies this cloud process (random per start);
    /// `record` is the node's persisted ObjectSync state.
    pub fn new(config: FeedConfig, epoch: u64, record: FeedRecord) -> Self {
        NodeFeed {
            config,
            epoch,
            state: FeedState::Offline,
            session: None,
            sessions_started: 0,
            credited: 0,
            sent: 0,
            desired: BTreeMap::new(),
            acked: record.acked,
            queue: VecDeque::new(),
            pending: HashMap::new(),
            in_flight: VecDeque::new(),
            in_flight_keys: HashMap::new(),
            control: VecDeque::new(),
            writes: Vec::new(),
            store_id: None,
            reports: record.reports,
            report_ack: None,
            stats: FeedStats::default(),
        }
    }

    /// Where the feed is in its session.
    pub fn state(&self) -> FeedState {
        self.state
    }

    /// Counters since the feed was made.
    pub fn stats(&self) -> FeedStats {
        self.stats
    }

    /// Keys the node should hold.
    pub fn desired_len(&self) -> usize {
        self.desired.len()
    }

    /// Keys waiting to be sent.
    pub fn queued(&self) -> usize {
        self.pending.len()
    }

    /// Object messages sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether everything the node should hold is acknowledged at its version.
    pub fn is_synced(&self) -> bool {
        self.state == FeedState::Streaming
            && self.pending.is_empty()
            && self.in_flight.is_empty()
            && self.desired.len() == self.acked.len()
            && self
                .desired
                .iter()
                .all(|(key, d)| self.acked.get(key) == Some(&d.change.rv))
    }

    fn enqueue(&mut self, key: ObjectKey, pending: Pending) {
        if self.pending.insert(key.clone(), pending).is_none() {
            self.queue.push_back(key);
        }
    }

    fn node_may_hold(&self, key: &ObjectKey) -> bool {
        self.acked.contains_key(key) || self.in_flight_keys.contains_key(key)
    }

    /// The node should hold `change` (an added or modified object).
    pub fn set(&mut self, change: &SharedChange) {
        debug_assert!(!change.is_delete());
        self.desired.insert(
            change.key.clone(),
            Desired {
                change: change.clone(),
                echo_base: None,
            },
        );
        if self.state == FeedState::Streaming {
            self.enqueue(change.key.clone(), Pending::Upsert(change.clone()));
        }
    }

    /// The node should hold `change`, whose bytes are exactly the node's own report made on
    /// top of version `base`: the node needs only the new version.
    pub fn set_echo(&mut self, change: &SharedChange, base: ResourceVersion) {
        self.desired.insert(
            change.key.clone(),
            Desired {
                change: change.clone(),
                echo_base: Some(base),
            },
        );
        if self.state == FeedState::Streaming {
            let bump = Pending::Bump {
                base,
                rv: change.rv,
            };
            self.enqueue(change.key.clone(), bump);
        }
    }

    /// The node should no longer hold `key` (deleted at version `rv`, or no longer routed).
    pub fn unset(&mut self, key: &ObjectKey, rv: ResourceVersion) {
        if self.desired.remove(key).is_none() && !self.node_may_hold(key) {
            return;
        }
        if self.state != FeedState::Streaming {
            return;
        }
        if self.node_may_hold(key) {
            self.enqueue(key.clone(), Pending::Delete { rv });
        } else {
            // Never sent: just forget the queued upsert (its queue slot is skipped).
            self.pending.remove(key);
        }
    }

    /// The keys of the node's desired set inside `range`, with the version desired.
    pub fn desired_in(&self, range: &crate::KeyRange) -> Vec<(ObjectKey, ResourceVersion)> {
        self.desired
            .iter()
            .filter(|(key, _)| range.contains(key))
            .map(|(key, d)| (key.clone(), d.change.rv))
            .collect()
    }

    /// Whether `key` is in the node's desired set.
    pub fn wants(&self, key: &ObjectKey) -> bool {
        self.desired.contains_key(key)
    }

    /// A connection is up and a new session must start: wait for the node's hello. Unsent work is
    /// dropped (the next delta recomputes it).
    pub fn link_up(&mut self) {
        self.reset_link();
        self.state = FeedState::AwaitHello;
    }

    /// The link has a connection. `new_session`: the transport could not resume its streams
    /// (first contact, or either side restarted), so the node says hello by itself. Otherwise
    /// the connection resumes the link where it was and the session goes on: what was in
    /// flight is replayed by the transport and nothing here changes, except for a feed with no
    /// session to resume, which asks the node for a hello (it would never send one unasked).
    ///
    /// Both ends must make the same decision from the same link event, or one waits for the
    /// other forever (see `EdgeSync::on_connected`).
    pub fn on_connected(&mut self, new_session: bool) {
        if new_session {
            self.link_up();
        } else if self.state == FeedState::Offline {
            self.restart_session();
        }
    }

    /// Abandons the current session while the link stays up and asks the node for a new
    /// hello ([`Down::HelloRequest`]): the recovery from a protocol error.
    pub fn restart_session(&mut self) {
        self.link_up();
        self.control.push_back(Down::HelloRequest);
    }

    /// The connection is gone: nothing is sent until the next [`on_connected`](Self::on_connected).
    pub fn link_down(&mut self) {
        self.reset_link();
        self.state = FeedState::Offline;
    }

    fn reset_link(&mut self) {
        // Unsent work is recomputed from desired vs acked at the next hello; in-flight entries
        // stay until then so that the node's watermark can still credit them.
        self.queue.clear();
        self.pending.clear();
        self.control.clear();
        self.report_ack = None;
    }

    fn credit(&mut self, through: u64) {
        self.credited = self.credited.max(through);
        while self.in_flight.front().is_some_and(|f| f.count <= through) {
            let Some(done) = self.in_flight.pop_front() else {
                break;
            };
            self.release_in_flight_key(&done.key);
            match done.sent {
                Sent::Version(rv) => {
                    self.acked.insert(done.key.clone(), rv);
                    self.writes
                        .push(ObjectSyncWrite::Acked { key: done.key, rv });
                }
                Sent::Deleted => {
                    if self.acked.remove(&done.key).is_some() {
                        self.writes
                            .push(ObjectSyncWrite::Forgotten { key: done.key });
                    }
                }
                Sent::Void => {}
            }
        }
        if self.in_flight.is_empty() && self.queue.is_empty() {
            self.release_idle_capacity();
        }
    }

    /// Gives back what a burst (an initial sync of many objects) grew the queues to, once
    /// everything is acked: collections keep their capacity when emptied, and thousands of
    /// idle nodes would each hold their largest burst's worth.
    fn release_idle_capacity(&mut self) {
        if self.pending.is_empty() {
            self.queue.shrink_to_fit();
            self.pending.shrink_to_fit();
        }
        self.in_flight.shrink_to_fit();
        self.in_flight_keys.shrink_to_fit();
        if self.control.is_empty() {
            self.control.shrink_to_fit();
        }
    }

    fn release_in_flight_key(&mut self, key: &ObjectKey) {
        if let Some(n) = self.in_flight_keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.in_flight_keys.remove(key);
            }
        }
    }

    fn drop_in_flight(&mut self) {
        self.in_flight.clear();
        self.in_flight_keys.clear();
    }

    fn unexpected(&self, message: &'static str) -> FeedError {
        FeedError::Unexpected {
            message,
            state: self.state,
        }
    }

    /// Object messages sent in this session so far: the number of the last one sent.
    pub fn sent_in_session(&self) -> u64 {
        self.sent
    }

    /// The number of the last object message of this session the node has acknowledged.
    pub fn credited_in_session(&self) -> u64 {
        self.credited
    }

    /// A message from the node (except reports: see [`NodeFeed::accept_report`]).
    ///
    /// An ack of another session, and a refetch outside a session, are ignored.
    ///
    /// # Errors
    /// [`FeedError::Unexpected`] for a hello while offline, a digest that was not asked for, or a
    /// report (which goes through [`accept_report`](Self::accept_report)).
    pub fn handle(&mut self, message: Up) -> Result<(), FeedError> {
        match message {
            Up::Hello(hello) => self.on_hello(hello),
            Up::Digest(pairs) => {
                if self.state != FeedState::AwaitDigest {
                    return Err(self.unexpected("digest"));
                }
                self.acked = pairs.into_iter().collect();
                self.writes.push(ObjectSyncWrite::Reset {
                    acked: self.acked.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                });
                self.start_session();
                Ok(())
            }
            Up::Ack { session, count } => {
                // An ack of an earlier session (replayed by a resumed link, or sent before the
                // node saw a restart) credits nothing: the next hello carries its watermark.
                if self.state == FeedState::Streaming && Some(session) == self.session {
                    self.credit(count);
                }
                Ok(())
            }
            Up::Refetch { key } => {
                if self.state != FeedState::Streaming {
                    // The coming session's delta is computed from the node's hello anyway.
                    return Ok(());
                }
                for entry in self.in_flight.iter_mut().filter(|f| f.key == key) {
                    entry.sent = Sent::Void;
                }
                if self.acked.remove(&key).is_some() {
                    self.writes
                        .push(ObjectSyncWrite::Forgotten { key: key.clone() });
                }
                if let Some(desired) = self.desired.get_mut(&key) {
                    desired.echo_base = None;
                    let change = desired.change.clone();
                    self.enqueue(key, Pending::Upsert(change));
                }
                Ok(())
            }
            Up::Report(_) => Err(self.unexpected("report outside accept_report")),
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), FeedError> {
        if self.state == FeedState::Offline {
            return Err(self.unexpected("hello"));
        }
        // A hello always starts a new session, whatever this side was doing: the node decided
        // (it restarted its side, or answered a HelloRequest). What was queued is recomputed.
        self.reset_link();
        if let Some(applied) = hello.applied {
            if Some(applied.session) == self.session {
                self.credit(applied.count);
            }
        }
        // Whatever was in flight and not credited is lost with the old session.
        self.drop_in_flight();
        self.store_id = Some(hello.store_id);
        if self.reports.is_some_and(|r| r.store_id != hello.store_id) {
            // A new disk numbers its reports from the start again.
            self.reports = None;
        }
        let record = SetDigest::of(self.acked.iter().map(|(k, v)| (k, *v)));
        if record.value() == hello.digest && record.count() == hello.objects {
            self.start_session();
        } else if hello.objects == 0 {
            self.acked.clear();
            self.writes
                .push(ObjectSyncWrite::Reset { acked: Vec::new() });
            self.start_session();
        } else {
            self.stats.digest_exchanges += 1;
            self.control.push_back(Down::DigestRequest);
            self.state = FeedState::AwaitDigest;
        }
        Ok(())
    }

    fn start_session(&mut self) {
        self.sessions_started += 1;
        self.stats.sessions += 1;
        let session = SessionId {
            epoch: self.epoch,
            number: self.sessions_started,
        };
        self.session = Some(session);
        self.sent = 0;
        self.credited = 0;
        self.control.push_back(Down::Session(session));
        self.state = FeedState::Streaming;
        // The delta: what the node should hold and does not hold at that version...
        let mut delta = Vec::new();
        for (key, desired) in &self.desired {
            let held = self.acked.get(key).copied();
            if held == Some(desired.change.rv) {
                continue;
            }
            let pending = match desired.echo_base {
                Some(base) if held == Some(base) => Pending::Bump {
                    base,
                    rv: desired.change.rv,
                },
                _ => Pending::Upsert(desired.change.clone()),
            };
            delta.push((key.clone(), pending));
        }
        // ...and what it holds but should not.
        for (key, rv) in &self.acked {
            if !self.desired.contains_key(key) {
                delta.push((key.clone(), Pending::Delete { rv: *rv }));
            }
        }
        for (key, pending) in delta {
            self.enqueue(key, pending);
        }
    }

    /// Whether the shell should apply `report` (false: already applied, just acknowledged).
    /// If it should, the shell commits the report's effect together with the returned record
    /// and then calls [`NodeFeed::report_done`].
    ///
    /// # Errors
    /// [`FeedError::Unexpected`] for a report before the node's hello in this session (offline,
    /// or awaiting hello).
    pub fn accept_report(&mut self, report: &Report) -> Result<Option<ReportRecord>, FeedError> {
        let Some(store_id) = self.store_id else {
            return Err(self.unexpected("report before hello"));
        };
        if matches!(self.state, FeedState::Offline | FeedState::AwaitHello) {
            return Err(self.unexpected("report"));
        }
        if self
            .reports
            .is_some_and(|r| r.store_id == store_id && report.id <= r.through)
        {
            self.schedule_report_ack(report.id);
            return Ok(None);
        }
        Ok(Some(ReportRecord {
            store_id,
            through: report.id,
        }))
    }

    /// The report recorded by `record` is durable (applied, or refused for good).
    pub fn report_done(&mut self, record: ReportRecord) {
        self.reports = Some(record);
        self.schedule_report_ack(record.through);
    }

    fn schedule_report_ack(&mut self, id: u64) {
        self.report_ack = Some(self.report_ack.map_or(id, |a| a.max(id)));
    }

    /// ObjectSync records to persist, oldest first. Draining keeps the buffer's capacity, so
    /// the per-ack path allocates nothing once warm.
    pub fn drain_writes(&mut self) -> std::vec::IntoIter<ObjectSyncWrite> {
        std::mem::take(&mut self.writes).into_iter()
    }

    /// The next message to send, if any may be sent now.
    pub fn poll_transmit(&mut self) -> Option<Down> {
        if let Some(control) = self.control.pop_front() {
            return Some(control);
        }
        if self.state == FeedState::Offline || self.state == FeedState::AwaitHello {
            return None;
        }
        if let Some(through) = self.report_ack.take() {
            return Some(Down::ReportAck { through });
        }
        if self.state != FeedState::Streaming || self.in_flight.len() >= self.config.max_in_flight {
            return None;
        }
        while let Some(key) = self.queue.pop_front() {
            let Some(pending) = self.pending.remove(&key) else {
                continue;
            };
            self.sent += 1;
            let (message, sent) = match pending {
                Pending::Upsert(change) => {
                    self.stats.upserts += 1;
                    self.stats.content_bytes += change.object.len() as u64;
                    let rv = change.rv;
                    (Down::Upsert(change), Sent::Version(rv))
                }
                Pending::Bump { base, rv } => {
                    self.stats.bumps += 1;
                    let bump = Down::Bump {
                        key: key.clone(),
                        base,
                        rv,
                    };
                    (bump, Sent::Version(rv))
                }
                Pending::Delete { rv } => {
                    self.stats.deletes += 1;
                    (
                        Down::Delete {
                            key: key.clone(),
                            rv,
                        },
                        Sent::Deleted,
                    )
                }
            };
            *self.in_flight_keys.entry(key.clone()).or_insert(0) += 1;
            self.in_flight.push_back(InFlight {
                count: self.sent,
                key,
                sent,
            });
            return Some(message);
        }
        None
    }
}
