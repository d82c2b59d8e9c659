//! cloudcore: the cluster source (the embedded Kubernetes-compatible API server, or a real
//! cluster), the EdgeController that routes objects to nodes, CloudHub (one QUIC link per node)
//! and the per-node ObjectSync record.
//!
//! KubeEdge's cloud modules, by their names here:
//! - [`hub`]: CloudHub (links, sync sessions, ObjectSync), a sans-IO core and its async shell;
//! - [`edgecontroller`]: EdgeController (what each node holds; node reports judged);
//! - [`routing`]: the EdgeController's routing index (KubeEdge's LocationCache);
//! - [`devicecontroller`]: DeviceController (Devices and DeviceModels to nodes, twins up);
//! - [`lifecycle`]: the node lifecycle (Lease renewal from heartbeats, Ready/NotReady);
//! - [`node_api`]: API calls forwarded by MetaServer, under node authorization ([`authz`]);
//!
//! - [`api_tls`]: the API over HTTPS with a bearer token (off loopback);
//! - [`cluster`]: the cluster source, embedded or a real cluster through kube-rs (mirror and
//!   write-back);
//! - [`embedded`]: the embedded API server's store and its seed objects;
//! - [`policy`]: what the embedded API allows and how it deletes pods bound to nodes;
//! - [`pki`]: the cluster CA, the server certificate and bootstrap tokens;
//! - [`join`]: nodes joining with a bootstrap token (certificate + Node object);
//! - [`credentials`]: which node certificates may connect, renewal, revocation on Node delete;
//! - [`metrics`]: Prometheus metrics;
//! - [`node_api`]: API calls forwarded by a node's MetaServer, under node authorization;
//! - [`scheduler`]: binds pods without `nodeName` to a ready edge node;
//! - [`lifecycle`]: node Ready/NotReady from leases;
//! - [`controllers`]: the Deployment, ReplicaSet, DaemonSet controllers and the garbage
//!   collector;
//! - [`events`]: core/v1 Events from the control plane (aggregated, expired after an hour);
//! - [`servicebus`]: HTTP requests to applications on edge nodes, over their links;
//! - [`cloudstream`]: `kubectl logs` of pods on edge nodes, over their links;
//! - [`server`]: wires it all together ([`server::CloudCore`]).

pub mod api_tls;
pub mod apiserver_identity;
pub mod audit;
pub mod authz;
pub mod cloudstream;
pub mod cluster;
pub mod cluster_secrets;
pub mod controllers;
pub mod credentials;
pub mod devicecontroller;
pub mod edgecontroller;
pub mod embedded;
pub mod etcd;
pub mod events;
pub mod forward;
pub mod hub;
pub mod join;
pub mod kubelet_server;
pub mod leader;
pub mod lifecycle;
pub mod linkclaim;
pub mod metrics;
pub mod node_api;
pub mod openapi;
pub mod pki;
pub mod policy;
pub mod routing;
pub mod scheduler;
pub mod server;
pub mod servicebus;
pub mod shared_pki;
pub mod top;
