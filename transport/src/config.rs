//! Tunables of a link and its endpoints, with defaults sized for fleets: many connections ×
//! windows is the cloud's memory budget, so windows and stream limits are deliberately small.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::BackoffConfig;
use crate::frame::DEFAULT_MAX_FRAME;

/// The highest version of the link protocol this build speaks, announced in the hello.
///
/// Negotiated per connection: the node announces the highest version it speaks, the cloud
/// answers with the lower of that and its own, and both speak the answer. Versions:
/// - 2: full-form messages only.
/// - 3: sync messages in their compact form ([`crate::compact`]).
///
/// A cloud of version 2 compared versions strictly, so it refuses nodes of version 3:
/// upgrade cloudcore before edgecore (KubeEdge's version skew rule too).
pub const PROTOCOL_VERSION: u32 = 3;

/// The oldest link protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// The first version with compact messages ([`crate::frame::Envelope::Compact`]).
pub const COMPACT_PROTOCOL_VERSION: u32 = 3;

/// Settings shared by both ends of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Largest frame body accepted or sent.
    pub max_frame: usize,
    /// Send window: unacked messages kept for replay, at most this many...
    pub max_unacked_messages: usize,
    /// ...and at most this many bytes (one larger message still goes alone).
    pub max_unacked_bytes: usize,
    /// QUIC keepalive interval. The idle timeout is twice this: a dead peer is detected within
    /// two heartbeat periods.
    pub heartbeat: Duration,
    /// Per-stream receive window (flow control).
    pub stream_receive_window: u32,
    /// Per-connection receive window (flow control).
    pub connection_receive_window: u32,
    /// Bytes in flight to the peer per connection.
    pub send_window: u64,
    /// Request streams the peer may have open at once (each allowed stream costs memory).
    pub max_concurrent_requests: u32,
    /// How long a request waits for its response.
    pub request_timeout: Duration,
    /// How long a new connection may take for TLS and the hello exchange.
    pub handshake_timeout: Duration,
    /// Events buffered for the application before the link stops reading (backpressure).
    pub event_queue: usize,
    /// How long acks are held to be coalesced into one cumulative ack (like TCP's delayed
    /// ack): fewer frames and packets, at no cost to the sender while its window has room.
    pub ack_delay: Duration,
    /// Accept QUIC datagrams (RFC 9221) for heartbeats, which the peer then sends that way
    /// (~20 bytes less per heartbeat than a control-stream frame). Off, this side behaves as
    /// kedge did before: heartbeats arrive as frames.
    pub datagram_heartbeats: bool,
    /// The highest link protocol version this side announces, between
    /// [`MIN_PROTOCOL_VERSION`] and [`PROTOCOL_VERSION`] (the default): lower it to speak as an
    /// older build does, for instance while a fleet is upgraded.
    pub protocol_version: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_unacked_messages: 4096,
            max_unacked_bytes: 16 * 1024 * 1024,
            heartbeat: Duration::from_secs(15),
            stream_receive_window: 1024 * 1024,
            connection_receive_window: 2 * 1024 * 1024,
            send_window: 2 * 1024 * 1024,
            max_concurrent_requests: 16,
            request_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            event_queue: 1024,
            ack_delay: Duration::from_millis(2),
            datagram_heartbeats: true,
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

impl LinkConfig {
    /// The quinn transport settings these values imply (benchmarks reuse them for raw quinn).
    pub fn quic_transport(&self) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        // The control stream plus request streams; one data stream per direction (two allowed
        // so a replacement stream can open while the old one drains).
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_concurrent_requests + 1));
        t.max_concurrent_uni_streams(quinn::VarInt::from_u32(2));
        t.stream_receive_window(quinn::VarInt::from_u32(self.stream_receive_window));
        t.receive_window(quinn::VarInt::from_u32(self.connection_receive_window));
        t.send_window(self.send_window);
        t.keep_alive_interval(Some(self.heartbeat));
        let idle = self.heartbeat.saturating_mul(2);
        t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
        // Heartbeats go as tiny QUIC datagrams (`frame::heartbeat_datagram`); a peer that does
        // not accept them (an older kedge) gets them on the control stream instead.
        t.datagram_receive_buffer_size(
            self.datagram_heartbeats
                .then_some(crate::frame::MAX_DATAGRAM),
        );
        Arc::new(t)
    }
}

/// The cloud's endpoint.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// Settings of every node's link.
    pub link: LinkConfig,
    /// Connections (including handshakes in progress) beyond this are refused.
    pub max_connections: usize,
    /// SO_RCVBUF / SO_SNDBUF of the UDP socket. Thousands of connections on one socket
    /// overflow the OS default of a few MiB.
    pub socket_buffer_bytes: usize,
    /// Secret for QUIC stateless resets. Kept across restarts (cloudcore stores it in its data
    /// dir), it lets a restarted cloud reset the connections of its previous run at their next
    /// packet instead of nodes waiting for their idle timeout. `None`: random per start.
    /// The connection-id checksum key is derived from it as well (see `Server::bind`).
    pub reset_key: Option<[u8; 32]>,
    /// CAs whose node certificates are trusted besides the server's own CA: the previous (or
    /// next) CA during a CA rollover. Empty normally.
    pub other_client_cas: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl ServerConfig {
    /// Defaults for a fleet: up to 100,000 connections, 32 MiB socket buffers, a random reset key.
    pub fn new(listen: SocketAddr) -> Self {
        ServerConfig {
            listen,
            link: LinkConfig::default(),
            max_connections: 100_000,
            socket_buffer_bytes: 32 * 1024 * 1024,
            reset_key: None,
            other_client_cas: Vec::new(),
        }
    }
}

/// A node's endpoint.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The cloud's UDP address (the first one tried).
    pub server_addr: SocketAddr,
    /// Other replicas of the cloud (several cloudcores on one shared store). After a failed
    /// attempt the next address is tried, so a node fails over to a replica that answers and
    /// stays with it while it works.
    pub alternates: Vec<SocketAddr>,
    /// The name the server certificate must carry.
    pub server_name: String,
    /// Settings of the link to the cloud.
    pub link: LinkConfig,
    /// Delays between connection attempts.
    pub backoff: BackoffConfig,
    /// How long one connection attempt (QUIC + TLS handshake) may take.
    pub connect_timeout: Duration,
    /// How long the node waits before reconnecting after the cloud replaced its open
    /// connection with a newer one presenting the same certificate (another process with
    /// this node's identity); doubled on each repetition, up to an hour. The newer process
    /// keeps the link meanwhile instead of the two replacing each other in a loop.
    pub conflict_holdoff: Duration,
}

impl ClientConfig {
    /// Defaults: link and backoff defaults, 5 s per connection attempt, a conflict hold-off of
    /// ten minutes.
    pub fn new(server_addr: SocketAddr, server_name: impl Into<String>) -> Self {
        ClientConfig {
            server_addr,
            alternates: Vec::new(),
            server_name: server_name.into(),
            link: LinkConfig::default(),
            backoff: BackoffConfig::default(),
            // QUIC retransmits its Initial after ~1 s and ~3 s: an attempt started while the
            // cloud was down completes soon after it returns, and a dead one gives way to the
            // next attempt instead of holding the node for long.
            connect_timeout: Duration::from_secs(5),
            conflict_holdoff: Duration::from_secs(600),
        }
    }
}
