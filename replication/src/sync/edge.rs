//! The edge side of the sync protocol: a pure state machine.
//!
//! Inputs: the cloud's messages (`receive`), the node's own reports (`report`), link up/down,
//! and the shell's word that a batch is durable (`durable`). Outputs: store writes, batched
//! (`take_batch`: one `WriteSet` per group of messages, with the watermark and outbox changes
//! inside it) and messages to send (`poll_transmit`). No IO.
//!
//! Guarantees:
//! - Changes apply in order and idempotently by version: an upsert older than or equal to what
//!   is held is skipped, a bump that does not match what is held asks for the object.
//! - Acks are sent only for what is durable: the watermark (session, count) is committed in the
//!   same batch as the changes it covers, and `Ack` is queued by `durable`.
//! - The outbox is in the same store, coalesced by key (one entry per key: the latest report),
//!   sent only once durable, resent after every reconnect until acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

use crate::key::ObjectKey;
use crate::store::{Aux, WriteSet};
use crate::sync::digest::SetDigest;
use crate::sync::messages::{Down, Hello, Report, SessionId, Up, Watermark};
use crate::sync::persist;
use crate::version::ResourceVersion;

/// A message the edge cannot take in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EdgeError {
    /// An object message (upsert, delete, bump) before any [`Down::Session`] since the link
    /// came up: a protocol error (restart the session).
    #[error("object message before the session started")]
    NoSession,
}

/// The edge's durable sync state, as recovered from its store.
#[derive(Debug, Clone, Default)]
pub struct EdgeRecovered {
    /// The random id of the edge's store (made when the store was created).
    pub store_id: u64,
    /// The last object message applied durably, if any.
    pub applied: Option<Watermark>,
    /// Every object held: key → version.
    pub held: BTreeMap<ObjectKey, ResourceVersion>,
    /// Reports not yet acknowledged by the cloud, in id order (whole objects, no patches).
    pub outbox: Vec<Report>,
    /// The last report id used (0: none); the next report gets the one after it.
    pub next_report: u64,
}

/// Store writes for a group of messages, and what becomes true once they are durable.
#[derive(Debug)]
pub struct EdgeBatch {
    /// The writes to commit, watermark and outbox changes included.
    pub writes: WriteSet,
    /// Give it to [`EdgeSync::durable`] once `writes` is committed.
    pub token: DurableToken,
}

/// Hand back to [`EdgeSync::durable`] after committing the batch's writes.
#[derive(Debug, Default)]
pub struct DurableToken {
    watermark: Option<Watermark>,
    reports: Vec<Report>,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeStats {
    /// Object messages that changed the store.
    pub applied: u64,
    /// Object messages skipped (already held at that version or newer, or a delete of an absent
    /// object).
    pub skipped: u64,
    /// Bumps that did not match what was held, answered with a refetch.
    pub refetches: u64,
    /// Reports sent (resends after a reconnect included).
    pub reports_sent: u64,
}

/// The edge's sync state machine; see the module docs. Recover it from the store with
/// [`persist::load_edge`], or run it with [`EdgeReplica`](crate::sync::EdgeReplica).
pub struct EdgeSync {
    store_id: u64,
    applied: Option<Watermark>,
    held: BTreeMap<ObjectKey, ResourceVersion>,
    digest: SetDigest,
    session: Option<SessionId>,
    received: u64,
    connected: bool,
    /// Durable reports not yet acknowledged, by id.
    outbox: BTreeMap<u64, Report>,
    /// The latest report id per key, durable or not.
    latest_report: HashMap<ObjectKey, u64>,
    /// Outbox ids up to this one were sent on the current link.
    sent_through: u64,
    next_report: u64,
    batch: WriteSet,
    token: DurableToken,
    control: VecDeque<Up>,
    ack_due: Option<Watermark>,
    stats: EdgeStats,
}

impl EdgeSync {
    /// A state machine recovered from the store, disconnected and without a session.
    pub fn new(recovered: EdgeRecovered) -> Self {
        let digest = SetDigest::of(recovered.held.iter().map(|(k, v)| (k, *v)));
        let latest_report = recovered
            .outbox
            .iter()
            .map(|r| (r.key.clone(), r.id))
            .collect();
        EdgeSync {
            store_id: recovered.store_id,
            applied: recovered.applied,
            held: recovered.held,
            digest,
            session: None,
            received: 0,
            connected: false,
            outbox: recovered.outbox.into_iter().map(|r| (r.id, r)).collect(),
            latest_report,
            sent_through: 0,
            next_report: recovered.next_report,
            batch: WriteSet::new(),
            token: DurableToken::default(),
            control: VecDeque::new(),
            ack_due: None,
            stats: EdgeStats::default(),
        }
    }

    /// The edge store's id, sent in every hello.
    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    /// Counters since this state machine was made.
    pub fn stats(&self) -> EdgeStats {
        self.stats
    }

    /// The version held for `key`.
    pub fn held(&self, key: &ObjectKey) -> Option<ResourceVersion> {
        self.held.get(key).copied()
    }

    /// Every held key and its version.
    pub fn held_entries(&self) -> BTreeMap<ObjectKey, ResourceVersion> {
        self.held.clone()
    }

    /// How many objects are held.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Whether the link has a connection (messages may be sent).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Reports not yet acknowledged by the cloud.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// A connection is up and a new session must start: queue our hello (the latest watermark,
    /// durable or not yet, and the digest of what is held). Queued messages are dropped; reports
    /// are sent again from the start of the outbox.
    pub fn link_up(&mut self) {
        self.connected = true;
        self.session = None;
        self.control.clear();
        self.ack_due = None;
        self.sent_through = 0;
        self.control.push_back(Up::Hello(Hello {
            store_id: self.store_id,
            applied: self.token.watermark.or(self.applied),
            objects: self.digest.count(),
            digest: self.digest.value(),
        }));
    }

    /// The connection is gone and the session with it: nothing is sent until the next link up.
    pub fn link_down(&mut self) {
        self.connected = false;
        self.session = None;
        self.control.clear();
        self.ack_due = None;
    }

    /// The link has a connection. `new_session`: the transport could not resume its streams
    /// (first contact, or either side restarted), so a new session starts with our hello.
    /// Otherwise the link resumed: the session goes on, and whatever was waiting (acks,
    /// reports, a digest) goes out now. The cloud decides the same from the same event (see
    /// `NodeFeed::on_connected`); if it restarts the session on its own it asks for a hello.
    pub fn on_connected(&mut self, new_session: bool) {
        if new_session {
            self.link_down();
            self.link_up();
        } else {
            self.connected = true;
        }
    }

    /// The link lost its connection: nothing is sent until it has one again, and the session
    /// is kept, since a resumed link carries on with it (see [`EdgeSync::on_connected`]).
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    fn count_object_message(&mut self) -> Result<Watermark, EdgeError> {
        let session = self.session.ok_or(EdgeError::NoSession)?;
        self.received += 1;
        let mark = Watermark {
            session,
            count: self.received,
        };
        self.token.watermark = Some(mark);
        Ok(mark)
    }

    fn forget_report(&mut self, key: &ObjectKey) {
        if let Some(id) = self.latest_report.remove(key) {
            self.outbox.remove(&id);
            self.token.reports.retain(|r| r.id != id);
            self.batch.delete_aux(Aux::OUTBOX, persist::outbox_key(id));
        }
    }

    /// Takes a message from the cloud: object messages go into the next batch (idempotently by
    /// version), control messages queue their answers.
    ///
    /// # Errors
    /// [`EdgeError::NoSession`] for an object message before the session started.
    pub fn receive(&mut self, message: Down) -> Result<(), EdgeError> {
        match message {
            Down::Session(session) => {
                self.session = Some(session);
                self.received = 0;
            }
            Down::Upsert(change) => {
                self.count_object_message()?;
                match self.held.get(&change.key) {
                    Some(&held) if held >= change.rv => self.stats.skipped += 1,
                    held => {
                        match held {
                            Some(&old) => self.digest.replace(&change.key, old, change.rv),
                            None => self.digest.insert(&change.key, change.rv),
                        }
                        self.held.insert(change.key.clone(), change.rv);
                        self.batch
                            .mirror_put(change.key.clone(), change.rv, change.object.clone());
                        self.stats.applied += 1;
                    }
                }
            }
            Down::Delete { key, rv } => {
                self.count_object_message()?;
                if let Some(old) = self.held.remove(&key) {
                    self.digest.remove(&key, old);
                    self.batch.mirror_delete(key.clone(), rv);
                    self.forget_report(&key);
                    self.stats.applied += 1;
                } else {
                    self.stats.skipped += 1;
                }
            }
            Down::Bump { key, base, rv } => {
                self.count_object_message()?;
                match self.held.get(&key).copied() {
                    Some(held) if held == base => {
                        self.digest.replace(&key, base, rv);
                        self.held.insert(key.clone(), rv);
                        self.batch.set_version(key, rv);
                        self.stats.applied += 1;
                    }
                    Some(held) if held >= rv => self.stats.skipped += 1,
                    _ => {
                        self.stats.refetches += 1;
                        self.control.push_back(Up::Refetch { key });
                    }
                }
            }
            Down::HelloRequest => self.link_up(),
            Down::DigestRequest => {
                let pairs = self.held.iter().map(|(k, v)| (k.clone(), *v)).collect();
                self.control.push_back(Up::Digest(pairs));
            }
            Down::ReportAck { through } => {
                let acked: Vec<u64> = self.outbox.range(..=through).map(|(id, _)| *id).collect();
                for id in acked {
                    if let Some(report) = self.outbox.remove(&id) {
                        if self.latest_report.get(&report.key) == Some(&id) {
                            self.latest_report.remove(&report.key);
                        }
                        self.batch.delete_aux(Aux::OUTBOX, persist::outbox_key(id));
                    }
                }
            }
        }
        Ok(())
    }

    /// The node's own write of an object (a pod's status, its Node, Lease, an Event): reported
    /// upward once durable, coalesced with any earlier unacknowledged report on the same key.
    /// An object the node holds is also updated locally at once, keeping its version until the
    /// cloud assigns one; an object it does not hold is reported with base 0 (a create, or a
    /// write to an object not routed here) and not stored locally. An empty `object` confirms a
    /// deletion and leaves the held object as it is. Returns the report id.
    ///
    /// # Errors
    /// Never, at present: every report is accepted.
    pub fn report(&mut self, key: ObjectKey, object: Bytes) -> Result<u64, EdgeError> {
        self.report_on(key, object, None)
    }

    /// [`EdgeSync::report`], given the bytes held for the key before this write (`held_object`):
    /// a change of the part the node owns (a pod's or Node's status, its Lease's renewal) then
    /// goes as a patch of that part (a few dozen bytes instead of the whole object) when the
    /// cloud is known to hold those bytes, i.e. no earlier report on the key is still
    /// unacknowledged (the cloud may or may not have applied it).
    ///
    /// # Errors
    /// As [`report`](Self::report).
    pub fn report_on(
        &mut self,
        key: ObjectKey,
        object: Bytes,
        held_object: Option<&[u8]>,
    ) -> Result<u64, EdgeError> {
        let held = self.held(&key);
        let base = held.unwrap_or_default();
        let part = crate::sync::status_patch::owned_part(key.kind());
        let patch = match (held_object, part) {
            (Some(before), Some(part))
                if held.is_some() && !self.latest_report.contains_key(&key) =>
            {
                crate::sync::status_patch::diff(part, before, &object)
            }
            _ => None,
        };
        self.forget_report(&key);
        self.next_report += 1;
        let report = Report {
            id: self.next_report,
            key: key.clone(),
            base,
            object: object.clone(),
            patch,
        };
        // An empty report is the node's confirmation that it stopped a pod being deleted, not
        // a new state of the object: the cache keeps the object's last state until the cloud's
        // delete removes it, so that delete carries a real object (a watch's DELETED event) and
        // the cache never holds bytes that are not an object.
        if held.is_some() && !object.is_empty() {
            self.batch.local_write(key.clone(), object);
        }
        self.batch.put_aux(
            Aux::OUTBOX,
            persist::outbox_key(report.id),
            persist::encode_report(&report),
        );
        self.batch.put_aux(
            Aux::META,
            persist::EDGE_NEXT_REPORT,
            self.next_report.to_be_bytes(),
        );
        self.latest_report.insert(key, report.id);
        self.token.reports.push(report);
        Ok(self.next_report)
    }

    /// Adds writes of the caller's own (bookkeeping such as the edge's twin records) to the
    /// next batch, so that they commit together with the reports they caused.
    pub fn stage(&mut self, writes: WriteSet) {
        self.batch.append(writes);
    }

    /// The writes accumulated since the last batch, if any. Commit them, then call
    /// [`EdgeSync::durable`] with the token. If the commit fails, this state machine no longer
    /// matches the store: drop it and recover a new one from the store.
    pub fn take_batch(&mut self) -> Option<EdgeBatch> {
        let mut writes = std::mem::take(&mut self.batch);
        let token = std::mem::take(&mut self.token);
        if let Some(mark) = token.watermark {
            writes.put_aux(
                Aux::META,
                persist::EDGE_APPLIED,
                persist::encode_watermark(mark),
            );
        }
        if writes.is_empty() && token.reports.is_empty() {
            return None;
        }
        Some(EdgeBatch { writes, token })
    }

    /// The batch `token` came with is committed: its watermark is acked (when still in the current
    /// session and connected) and its reports may be sent.
    pub fn durable(&mut self, token: DurableToken) {
        if let Some(mark) = token.watermark {
            self.applied = Some(mark);
            if self.connected && self.session == Some(mark.session) {
                self.ack_due = Some(mark);
            }
        }
        for report in token.reports {
            self.outbox.insert(report.id, report);
        }
    }

    /// The next message to send, if any (nothing while disconnected): control messages first, then
    /// the ack, then outbox reports not yet sent on this connection.
    pub fn poll_transmit(&mut self) -> Option<Up> {
        if !self.connected {
            return None;
        }
        if let Some(message) = self.control.pop_front() {
            return Some(message);
        }
        if let Some(mark) = self.ack_due.take() {
            return Some(Up::Ack {
                session: mark.session,
                count: mark.count,
            });
        }
        let (&id, report) = self.outbox.range(self.sent_through + 1..).next()?;
        self.sent_through = id;
        self.stats.reports_sent += 1;
        Some(Up::Report(report.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent_reports(sync: &mut EdgeSync) -> Vec<Report> {
        if let Some(batch) = sync.take_batch() {
            sync.durable(batch.token);
        }
        std::iter::from_fn(|| sync.poll_transmit())
            .filter_map(|up| match up {
                Up::Report(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_pod_status_change_goes_as_a_patch_unless_an_earlier_report_is_unacknowledged() {
        let key = ObjectKey::parse("pods/d/p").unwrap();
        let mut sync = EdgeSync::new(EdgeRecovered {
            held: [(key.clone(), ResourceVersion(3))].into(),
            ..Default::default()
        });
        sync.link_up();
        let pod = |message: &str| {
            Bytes::from(format!(
                r#"{{"metadata":{{"name":"p","namespace":"d"}},"spec":{{"containers":[{{"name":"c","image":"registry.example.com/app:1"}}]}},"status":{{"phase":"Running","message":"{message}"}}}}"#
            ))
        };
        sync.report_on(key.clone(), pod("b"), Some(&pod("a")))
            .unwrap();
        let first = sent_reports(&mut sync);
        assert_eq!(first.len(), 1);
        let patch = first[0].patch.as_ref().expect("a patch");
        assert_eq!(&patch[..], br#"{"status":{"message":"b"}}"#);
        assert_eq!(
            first[0].object,
            pod("b"),
            "the whole object stays in the outbox"
        );

        // Not acknowledged yet: the cloud may hold "a" or "b", so the next report goes whole.
        sync.report_on(key.clone(), pod("c"), Some(&pod("b")))
            .unwrap();
        let second = sent_reports(&mut sync);
        assert_eq!(second.len(), 1);
        assert!(second[0].patch.is_none());
    }
}
