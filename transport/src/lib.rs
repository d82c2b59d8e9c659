//! kedge's QUIC link between cloudcore and its edge nodes.
//!
//! Layers, bottom up (sans-IO cores first, thin async shells on top, as quinn-proto/quinn):
//! - [`message`]: KubeEdge's message model (header, route, content bytes) and its JSON form.
//! - [`bus`]: ServiceBus messages (an HTTP request to an edge application, and its response).
//! - [`frame`]: `u32` length + rkyv archive framing; validated, zero-copy reads (sans-IO).
//! - [`compact`]: the compact form of sync messages (link protocol 3), without a full header.
//! - [`window`]: per-direction sequence numbers, bounded send window, receive tracking (sans-IO).
//! - [`backoff`]: reconnect delays with full jitter (sans-IO).
//! - [`tls`]: the cloud CA, node and server certificates, rustls configs for mutual TLS.
//! - [`link`]: a reliable, reconnecting link to one peer over successive QUIC connections.
//! - [`logging`]: how kedge's binaries log (text, colour only on a terminal, or JSON lines).
//! - [`join`](mod@join): how a node without a certificate gets one with a bootstrap token (CA pinned).
//! - [`renew`]: how a node renews its certificate, and the cloud's [`CredentialPolicy`] over
//!   which certificates may connect (revoked, expired, in a grace window).
//! - [`server`] / [`client`]: the cloud's endpoint (one link per node, named by its certificate)
//!   and the edge's endpoint (one link to the cloud, reconnecting with backoff).

#![warn(missing_docs)]

pub mod backoff;
pub mod bus;
pub mod client;
pub mod compact;
pub mod config;
mod endpoint;
pub mod error;
pub mod frame;
pub mod join;
pub mod link;
pub mod logging;
pub mod message;
pub mod portforward;
pub mod remotecommand;
pub mod renew;
pub mod server;
pub mod spdy;
pub mod stream;
mod stream_io;
pub mod tls;
pub mod usage;
pub mod window;

pub use client::{connect, connect_on, connect_with, Credentials};
pub use config::{
    ClientConfig, LinkConfig, ServerConfig, COMPACT_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
pub use endpoint::{client_endpoint, quinn_client_config_from};
pub use error::{CloseCode, EndpointError, LinkError};
pub use frame::{EncodedMessage, HeaderRef, ReceivedMessage, RouteRef};
pub use join::{join, JoinError, JoinHandler, JoinRequest, Joined};
pub use link::{
    Delivery, IncomingRequest, Link, LinkCounters, LinkEvent, LinkHandle, StreamReader,
    StreamWriter,
};
pub use message::{Header, Message, Route};
pub use renew::{Admission, CredentialPolicy, RenewError};
pub use server::Server;
pub use tls::{CertificateAuthority, Identity};
