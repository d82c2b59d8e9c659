//! kedge's fleet harness: thousands of hollow edge nodes against a real cloudcore, with faults,
//! a convergence check and a report (`loadtest`).
//!
//! - [`cloud`]: the cloudcore under test (a child process measured from /proc, or external);
//! - [`api`]: the cloud's Kubernetes API through kube-rs (workload, churn, expected state);
//! - [`hollow`]: one hollow node (real link, real sync state machine, in-memory cache);
//! - [`fleet`]: joining and running N hollow nodes in this process;
//! - [`probe`]: latency stamps and HDR histograms;
//! - [`converge`]: the convergence check;
//! - [`scenario`]: connect-storm, initial-sync, churn, status-flood, partition, cloud-restart,
//!   idle;
//! - [`report`]: the summary table and JSON.
//!
//! - [`twins`]: device twins end to end (`twinbench`: MQTT → edgecore → cloudcore → API).
//!
//! Also `transport-demo` and `transport-memory`: the transport alone (throughput, memory per
//! connection).

pub mod api;
pub mod cloud;
pub mod converge;
pub mod fleet;
pub mod hollow;
pub mod probe;
pub mod report;
pub mod scenario;
pub mod twins;
