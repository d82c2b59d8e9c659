//! The sync protocol's messages. A transport adapter maps them onto its wire; within one sync
//! session they must arrive in order and each at most once (one QUIC stream per direction).

use bytes::Bytes;

use crate::change::SharedChange;
use crate::key::ObjectKey;
use crate::version::ResourceVersion;

/// Names one sync session: the cloud process instance (`epoch`, random per start) and a
/// counter within it. Object messages are numbered 1, 2, 3… from the session's start, by both
/// sides, without carrying the number: the same encoded change can go to every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    /// The cloud process instance: random, new on every cloudcore start.
    pub epoch: u64,
    /// The session's number within the epoch.
    pub number: u64,
}

/// How far an edge has durably applied: the `count`-th object message of `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    /// The session the count is in.
    pub session: SessionId,
    /// Object messages of the session applied durably (1..=count).
    pub count: u64,
}

/// Cloud → edge.
#[derive(Debug, Clone)]
pub enum Down {
    /// A new session starts; object messages are counted from here.
    Session(SessionId),
    /// Object message: hold this object at this version.
    Upsert(SharedChange),
    /// Object message: stop holding this object (deleted, or no longer routed to the node).
    Delete {
        /// The object.
        key: ObjectKey,
        /// The delete's version: of the delete, of the change that unrouted the object, or (in a
        /// resync's delta) the version the node holds.
        rv: ResourceVersion,
    },
    /// Object message: the object you hold at `base` is now at `rv`, bytes unchanged: the
    /// cloud wrote back your own report (no echo of the content).
    Bump {
        /// The object.
        key: ObjectKey,
        /// The version the node's bytes are at (its report's base).
        base: ResourceVersion,
        /// The version those bytes have now.
        rv: ResourceVersion,
    },
    /// Send me every (key, version) you hold: the cloud cannot trust its record of you.
    DigestRequest,
    /// Start a new session: send a fresh [`Hello`]. The cloud restarted the session on its
    /// own (a protocol error, a feed that lost its state) while the link itself carried on, so
    /// the node would otherwise never say hello again.
    HelloRequest,
    /// Reports up to and including this id were applied (or refused) durably.
    ReportAck {
        /// The highest report id applied or refused; every lower one is done too.
        through: u64,
    },
}

impl Down {
    /// Whether this message is counted within its session.
    pub fn is_object_message(&self) -> bool {
        matches!(
            self,
            Down::Upsert(_) | Down::Delete { .. } | Down::Bump { .. }
        )
    }

    /// Bytes of object content this message carries (for accounting).
    pub fn content_len(&self) -> usize {
        match self {
            Down::Upsert(change) => change.object.len(),
            _ => 0,
        }
    }
}

/// What an edge says when a link comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Random id of the edge's store, made when the store was created: a new id means a new
    /// disk (and a new outbox numbering).
    pub store_id: u64,
    /// The last object message applied durably, if any.
    pub applied: Option<Watermark>,
    /// How many objects the edge holds, and the [`SetDigest`](super::SetDigest) of their
    /// (key, version) pairs: a mismatch with the cloud's record triggers a digest exchange.
    pub objects: u64,
    /// The [`SetDigest`](super::SetDigest) value of the held (key, version) pairs.
    pub digest: u64,
}

/// An upward report: the node's own write of an object it holds (pod status, node status…),
/// made on top of version `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Increasing per edge store; the cloud applies each id at most once.
    pub id: u64,
    /// The object reported on.
    pub key: ObjectKey,
    /// The version of the object the node's write was made on (0: the node does not hold it).
    pub base: ResourceVersion,
    /// The whole object as the node wrote it (empty: a pod's deletion is confirmed).
    pub object: Bytes,
    /// Sent instead of `object` when set: a JSON merge patch of the pod's `status` against the
    /// object the cloud holds (see [`crate::sync::status_patch`]). Not persisted: a report
    /// recovered from the outbox after a restart goes whole.
    pub patch: Option<Bytes>,
}

/// Edge → cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Up {
    /// The session opener, sent when a link comes up or on [`Down::HelloRequest`].
    Hello(Hello),
    /// Object messages 1..=count of `session` are durable.
    Ack {
        /// The session the count is in.
        session: SessionId,
        /// Object messages of the session made durable.
        count: u64,
    },
    /// Every (key, version) held, answering [`Down::DigestRequest`].
    Digest(Vec<(ObjectKey, ResourceVersion)>),
    /// A bump could not be applied (the edge does not hold `base`): send the object.
    Refetch {
        /// The object to send whole.
        key: ObjectKey,
    },
    /// A report from the edge's outbox.
    Report(Report),
}
