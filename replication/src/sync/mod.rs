//! The sync protocol: how the cloud's per-node desired set reaches the node's store, and how
//! the node's reports reach the cloud. Pure state machines (sans-IO, like `quinn-proto`):
//! [`NodeFeed`] on the cloud, one per node; [`EdgeSync`] on the edge. [`persist`] says where
//! their durable state lives in a [`Store`](crate::Store); [`EdgeReplica`] is the small
//! synchronous shell that runs an `EdgeSync` over a store. [`wire`] maps the messages onto
//! kedge's transport (the only place this crate touches it).
//!
//! A session, start to end:
//! 1. Link up. The edge sends `Hello` (store id, watermark, object count and digest).
//! 2. The cloud credits what the watermark proves was applied, compares the digest with its
//!    ObjectSync record, and either trusts it or asks for a `Digest` of the edge's pairs.
//! 3. The cloud sends `Session`, then only the delta: upserts of what differs, deletes of what
//!    the node should not hold, bumps where the node already has the bytes.
//! 4. From then on, changes stream as they happen, coalesced by key; the edge acks cumulatively
//!    once durable; reports flow upward from the edge's outbox and are acked once applied.
//!
//! Not guaranteed: anything across a link drop except what acks and watermarks prove. A
//! dropped session's in-flight messages are simply recomputed by the next delta.

pub mod digest;
pub mod edge;
pub mod feed;
pub mod messages;
pub mod persist;
mod replica;
pub mod status_patch;
pub mod wire;

pub use digest::SetDigest;
pub use edge::{EdgeBatch, EdgeError, EdgeRecovered, EdgeStats, EdgeSync};
pub use feed::{
    FeedConfig, FeedError, FeedRecord, FeedState, FeedStats, NodeFeed, ObjectSyncWrite,
    ReportRecord,
};
pub use messages::{Down, Hello, Report, SessionId, Up, Watermark};
pub use replica::{EdgeReplica, ReplicaError};
