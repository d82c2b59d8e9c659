//! cloudcore (issue: "cloudcore"): the cluster source (embedded Kubernetes-compatible API server
//! or a real cluster through kube-rs), EdgeController, DeviceController, CloudHub, ObjectSync.
//!
//! Not built yet: only the crate exists. It will compose `transport` (the QUIC link, one
//! `transport::Link` per node) and `replication` (store, watch, sync protocol).
