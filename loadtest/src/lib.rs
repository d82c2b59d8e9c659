//! kedge's fleet harness (issue: "loadtest"): thousands of hollow edge nodes against a real
//! cloudcore, with faults, a convergence check and a report.
//!
//! Until cloudcore and edgecore exist, this crate ships `transport-demo`: a cloud endpoint and a
//! few edge clients exchanging acked messages over the real QUIC link, printing throughput.
