//! kedge's replication core: how cloud state reaches each edge node's RocksDB cache exactly,
//! cheaply, and through any disconnect or crash.
//!
//! - [`store`]: the RocksDB-backed versioned object store (objects and their bookkeeping commit
//!   in one `WriteBatch`);
//! - [`watch`]: change fan-out with a bounded history window (resume, `410 Gone`, bookmarks);
//! - [`watcher`]: a watch that resumes on its own, re-listing only when the history is gone;
//! - [`sync`]: the sync protocol as pure state machines (no IO, no async): the cloud's per-node
//!   [`sync::NodeFeed`] and the edge's [`sync::EdgeSync`], plus the edge outbox.
//!
//! Only [`sync::wire`] knows `transport` (how the sync messages ride on it); `cloud` and `edge`
//! run the sessions. [`api`] is the Kubernetes-compatible HTTP API over a store.

#![warn(missing_docs)]

pub mod api;
pub mod change;
pub mod http_server;
pub mod key;
pub mod occ;
pub mod simulation;
pub mod store;
pub mod sync;
pub mod version;
pub mod watch;
pub mod watcher;

pub use change::{Change, ChangeKind, SharedChange};
pub use key::{KeyError, KeyRange, ObjectKey};
pub use store::{
    Aux, ListPage, Precondition, ReplicatedChange, SharedBackend, SharedOp, Store, StoreConfig,
    StoreError, Versioned, Versioning, WriteSet,
};
pub use version::{ResourceVersion, Revision};
pub use watch::{WatchConfig, WatchError, WatchEvent, WatchHub, Watcher};
