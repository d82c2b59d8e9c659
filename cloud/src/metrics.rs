//! Prometheus metrics (`/metrics`), text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub resource: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `down` (cloud → node) or `up`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// What happened (see each metric's help).
    pub event: &'static str,
}

/// Every metric cloudcore exports.
pub struct Metrics {
    registry: Registry,
    pub api_requests: Family<RequestLabels, Counter>,
    pub connected_nodes: Gauge,
    /// QUIC connection states held by the endpoint (handshaking, running, draining).
    pub quic_connections: Gauge,
    pub nodes_ready: Gauge,
    /// Changes queued for nodes and not yet acked, summed over nodes.
    pub send_queue_depth: Gauge,
    /// The deepest single node queue.
    pub send_queue_max: Gauge,
    /// Frames and payload bytes each way (the `direction` label's counters, looked up once).
    pub frames_down: Counter,
    pub frames_up: Counter,
    pub bytes_down: Counter,
    pub bytes_up: Counter,
    /// Seconds from sending a change to a node until the node acked it (durable on the node).
    pub ack_latency: Histogram,
    pub reports_applied: Counter,
    pub reports_refused: Counter,
    /// Node heartbeats received (each renews the node's Lease).
    pub heartbeats: Counter,
    /// Store reads that failed (each is retried; none is taken for an absent object).
    pub store_read_errors: Counter,
    /// Node certificate events by `event`: `renewed`, `renewal_refused`, `expired_in_grace`
    /// (a connection with an expired certificate, allowed only to renew), `refused_expired`,
    /// `refused_revoked`, `revoked` (a Node deleted), `connection_replaced`.
    pub node_certificates: Family<EventLabels, Counter>,
    /// Join attempts by `event`: `joined`, `refused`, `rate_limited`.
    pub joins: Family<EventLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kedge");
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by verb, resource and HTTP code",
            api_requests.clone(),
        );
        let connected_nodes = Gauge::default();
        registry.register(
            "connected_nodes",
            "Nodes with a live link",
            connected_nodes.clone(),
        );
        let quic_connections = Gauge::default();
        registry.register(
            "quic_connections",
            "QUIC connection states held by the endpoint: handshaking, running, closing, draining",
            quic_connections.clone(),
        );
        let nodes_ready = Gauge::default();
        registry.register(
            "nodes_ready",
            "Edge nodes whose Ready condition is True",
            nodes_ready.clone(),
        );
        let send_queue_depth = Gauge::default();
        registry.register(
            "send_queue_depth",
            "Changes queued or in flight to nodes, summed over nodes",
            send_queue_depth.clone(),
        );
        let send_queue_max = Gauge::default();
        registry.register(
            "send_queue_max",
            "Changes queued or in flight to the most backlogged node",
            send_queue_max.clone(),
        );
        let frames = Family::<DirectionLabels, Counter>::default();
        registry.register("frames", "Frames exchanged with nodes", frames.clone());
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register("bytes", "Payload bytes exchanged with nodes", bytes.clone());
        let ack_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "ack_latency_seconds",
            "Time from sending a change to a node until it is durable there",
            ack_latency.clone(),
        );
        let reports_applied = Counter::default();
        registry.register(
            "reports_applied",
            "Status reports from nodes written to the cluster",
            reports_applied.clone(),
        );
        let reports_refused = Counter::default();
        registry.register(
            "reports_refused",
            "Writes from nodes refused by node authorization",
            reports_refused.clone(),
        );
        let heartbeats = Counter::default();
        registry.register(
            "heartbeats",
            "Node heartbeats received; each renews the node's Lease",
            heartbeats.clone(),
        );
        let store_read_errors = Counter::default();
        registry.register(
            "store_read_errors",
            "Store reads that failed and were retried",
            store_read_errors.clone(),
        );
        let node_certificates = Family::<EventLabels, Counter>::default();
        registry.register(
            "node_certificates",
            "Node certificate events: renewed, renewal_refused, expired_in_grace (a connection \
             with an expired certificate, allowed only to renew), refused_expired, \
             refused_revoked, revoked (Node deleted), connection_replaced (a node connected \
             while its previous connection was open: a quick restart, or two processes with \
             one certificate)",
            node_certificates.clone(),
        );
        let joins = Family::<EventLabels, Counter>::default();
        registry.register(
            "joins",
            "Join attempts: joined, refused, rate_limited",
            joins.clone(),
        );
        let counter = |family: &Family<DirectionLabels, Counter>, direction| {
            family.get_or_create(&DirectionLabels { direction }).clone()
        };
        let (frames_down, frames_up) = (counter(&frames, "down"), counter(&frames, "up"));
        let (bytes_down, bytes_up) = (counter(&bytes, "down"), counter(&bytes, "up"));
        Metrics {
            registry,
            api_requests,
            connected_nodes,
            quic_connections,
            nodes_ready,
            send_queue_depth,
            send_queue_max,
            frames_down,
            frames_up,
            bytes_down,
            bytes_up,
            ack_latency,
            reports_applied,
            reports_refused,
            heartbeats,
            store_read_errors,
            node_certificates,
            joins,
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
