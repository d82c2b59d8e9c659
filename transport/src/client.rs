//! The node's endpoint: one [`Link`] to the cloud, reconnecting with jittered backoff for as
//! long as the link lives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::endpoint::{node_endpoint, quinn_client_config};
use crate::error::{CloseCode, EndpointError};
use crate::link::{Link, Role, Shared};
use crate::tls::Identity;

/// A connection that lasted this long counts as good: the backoff starts over.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The longest a node waits after its connection was replaced by another process's.
const MAX_CONFLICT_HOLDOFF: Duration = Duration::from_secs(3600);

/// A node's credentials as its link uses them: each connection attempt takes the newest.
/// A node that renewed its certificate [`replace`](Self::replace)s its identity here, and one
/// that learned a new trust bundle (a CA rollover) [`replace_roots`](Self::replace_roots); the
/// connection that is up keeps what it was made with.
#[derive(Debug)]
pub struct Credentials {
    inner: Mutex<(Vec<CertificateDer<'static>>, Identity, u64)>,
}

impl Credentials {
    /// Credentials trusting the cloud's CA `ca`, presenting the node's `identity`.
    pub fn new(ca: CertificateDer<'static>, identity: Identity) -> Arc<Self> {
        Self::trusting(vec![ca], identity)
    }

    /// Credentials trusting any of `cas` (a trust bundle), presenting `identity`.
    pub fn trusting(cas: Vec<CertificateDer<'static>>, identity: Identity) -> Arc<Self> {
        Arc::new(Credentials {
            inner: Mutex::new((cas, identity, 0)),
        })
    }

    /// The node's identity to use from the next connection on.
    pub fn replace(&self, identity: Identity) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.1 = identity;
        inner.2 += 1;
    }

    /// The CAs to trust from the next connection on (not empty).
    pub fn replace_roots(&self, cas: Vec<CertificateDer<'static>>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0 = cas;
        inner.2 += 1;
    }

    /// `(trusted CAs, identity)` now.
    pub fn get(&self) -> (Vec<CertificateDer<'static>>, Identity) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.0.clone(), inner.1.clone())
    }

    fn version(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).2
    }
}

/// Starts a link to the cloud on an endpoint of its own. Must be called within a tokio runtime.
///
/// The link's peer is `config.server_name`; its first connection attempt starts at once.
///
/// # Errors
/// [`EndpointError::Tls`] or [`EndpointError::QuicTls`] when `ca` and `identity` make no
/// client TLS configuration, [`EndpointError::ServerName`] when `config.server_name` is not a
/// DNS name or IP address, [`EndpointError::Bind`] when no UDP socket can be bound. Failing to
/// reach the cloud is no error: the link keeps trying.
pub fn connect(
    config: ClientConfig,
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<Link, EndpointError> {
    connect_with(config, Credentials::new(ca.clone(), identity.clone()))
}

/// Like [`connect`], with credentials the caller may replace while the link runs (a renewed
/// certificate is used from the next connection).
///
/// # Errors
/// As [`connect`].
pub fn connect_with(
    config: ClientConfig,
    credentials: Arc<Credentials>,
) -> Result<Link, EndpointError> {
    let bind = if config.server_addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let bind = bind
        .parse()
        .map_err(|_| EndpointError::ServerName(bind.into()))?;
    let endpoint = node_endpoint(bind)?;
    start(&endpoint, config, credentials)
}

/// Starts a link to the cloud on a shared endpoint.
///
/// # Errors
/// As [`connect`], except binding (the endpoint exists).
pub fn connect_on(
    endpoint: &quinn::Endpoint,
    config: ClientConfig,
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<Link, EndpointError> {
    start(
        endpoint,
        config,
        Credentials::new(ca.clone(), identity.clone()),
    )
}

fn start(
    endpoint: &quinn::Endpoint,
    config: ClientConfig,
    credentials: Arc<Credentials>,
) -> Result<Link, EndpointError> {
    let (ca, identity) = credentials.get();
    let version = credentials.version();
    let quinn_config = quinn_client_config(&ca, &identity, &config.link)?;
    rustls::pki_types::ServerName::try_from(config.server_name.as_str())
        .map_err(|_| EndpointError::ServerName(config.server_name.clone()))?;
    let (link, shared) = Link::new(config.server_name.clone(), config.link.clone());
    tokio::spawn(reconnect_loop(
        endpoint.clone(),
        (quinn_config, version),
        credentials,
        config,
        shared,
    ));
    Ok(link)
}

/// Whether the peer closed `connection` because a newer connection with the same
/// certificate replaced it.
fn replaced_by_another(connection: &quinn::Connection) -> bool {
    matches!(
        connection.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code.into_inner() == CloseCode::Replaced as u64
    )
}

/// The reason the cloud gave for closing `connection` as unauthorized, if it did.
fn refused(connection: &quinn::Connection) -> Option<String> {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code.into_inner() == CloseCode::Unauthorized as u64 =>
        {
            Some(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => None,
    }
}

async fn reconnect_loop(
    endpoint: quinn::Endpoint,
    (mut quinn_config, mut version): (quinn::ClientConfig, u64),
    credentials: Arc<Credentials>,
    config: ClientConfig,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(config.backoff);
    let mut last_failure: Option<String> = None;
    let mut holdoff = config.conflict_holdoff;
    let servers: Vec<SocketAddr> = std::iter::once(config.server_addr)
        .chain(config.alternates.iter().copied())
        .collect();
    let mut current = 0;
    // Failed attempts since one succeeded: until every replica was tried once, the next is
    // tried soon instead of after the growing backoff.
    let mut failed_in_turn = 0;
    while !shared.is_closed() {
        let server = servers[current];
        if credentials.version() != version {
            let (ca, identity) = credentials.get();
            match quinn_client_config(&ca, &identity, &config.link) {
                Ok(c) => {
                    quinn_config = c;
                    tracing::info!("using the renewed node certificate from this connection on");
                }
                Err(e) => {
                    tracing::error!(error = %e, "the renewed credentials are unusable; keeping the previous ones")
                }
            }
            version = credentials.version();
        }
        let attempt = async {
            let connecting = endpoint
                .connect_with(quinn_config.clone(), server, &config.server_name)
                .map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(config.connect_timeout, attempt) => r,
            _ = shared.cancel.cancelled() => break,
        };
        let mut delay = None;
        let attempt_failed = !matches!(outcome, Ok(Ok(_)));
        match outcome {
            Ok(Ok(connection)) => {
                let started = Instant::now();
                let (generation, _) = shared.begin_connection(server);
                tracing::info!(server = %server, "connected to the cloud");
                let reason = shared
                    .drive(connection.clone(), Role::Client, generation)
                    .await;
                if shared.is_closed() {
                    break;
                }
                tracing::info!(server = %server, "disconnected from the cloud: {reason}");
                if let Some(refusal) = refused(&connection) {
                    // Revoked, expired beyond the grace window, ...: say so loudly, once per
                    // reason (the node keeps trying: the operator may fix it on the cloud).
                    if last_failure.as_deref() != Some(refusal.as_str()) {
                        tracing::error!(server = %server, "the cloud refuses this node: {refusal}");
                    }
                    last_failure = Some(refusal);
                } else if replaced_by_another(&connection) {
                    last_failure = None;
                    // Another process connected with this node's certificate. The newer
                    // connection wins; reconnecting at once would take it back and start a
                    // loop of the two replacing each other. Wait, longer each time.
                    tracing::error!(
                        server = %server,
                        "another process connected to the cloud with this node's certificate \
                         and replaced this connection; not reconnecting for {} (stop one of \
                         the two, or give each node its own name and certificate)",
                        humanize(holdoff)
                    );
                    delay = Some(holdoff);
                    holdoff = (holdoff * 2).min(MAX_CONFLICT_HOLDOFF.max(config.conflict_holdoff));
                } else {
                    last_failure = None;
                    // The link broke: another replica may answer where this one went
                    // silent; try it first (a node that only lost its network loses nothing
                    // by moving: the digest exchange sends it only what it lacks).
                    current = (current + 1) % servers.len();
                    if started.elapsed() >= STABLE_CONNECTION {
                        backoff.reset();
                        holdoff = config.conflict_holdoff;
                    }
                }
            }
            Ok(Err(e)) => log_failure(&mut last_failure, server, e),
            Err(_) => log_failure(
                &mut last_failure,
                server,
                format!("timed out after {:?}", config.connect_timeout),
            ),
        }
        if attempt_failed {
            failed_in_turn += 1;
            current = (current + 1) % servers.len();
        } else {
            failed_in_turn = 0;
        }
        let delay = delay.unwrap_or_else(|| {
            if attempt_failed && servers.len() > 1 && failed_in_turn % servers.len() != 0 {
                // Another replica is next: a short jittered pause, not the backoff.
                Duration::from_millis(rand::random_range(0..=250))
            } else {
                backoff.next_delay()
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.cancel.cancelled() => break,
        }
    }
}

fn humanize(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Logs a failure once per distinct reason, not on every retry.
fn log_failure(last: &mut Option<String>, server: SocketAddr, reason: String) {
    if last.as_deref() != Some(reason.as_str()) {
        tracing::warn!(%server, "cannot reach the cloud: {reason} (retrying with backoff)");
    } else {
        tracing::debug!(%server, "still cannot reach the cloud: {reason}");
    }
    *last = Some(reason);
}
