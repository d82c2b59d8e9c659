//! kedge's replication core (issue: "Replication core"): the RocksDB-backed versioned object
//! store, watch fan-out with a bounded history window, and the sans-IO sync protocol that keeps
//! every edge node's cache equal to what the cloud says it should hold.
//!
//! Not built yet: this crate is a placeholder in the workspace so that the dependency direction
//! (`transport` and `replication` independent; `cloud` and `edge` composing them) is fixed from
//! the start. It knows nothing of `transport`.
