//! The node's endpoint: one [`Link`] to the cloud, reconnecting with jittered backoff for as
//! long as the link lives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::endpoint::{node_endpoint, quinn_client_config};
use crate::error::EndpointError;
use crate::link::{Link, Role, Shared};
use crate::tls::Identity;

/// A connection that lasted this long counts as good: the backoff starts over.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

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
    let bind = if config.server_addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let bind = bind
        .parse()
        .map_err(|_| EndpointError::ServerName(bind.into()))?;
    let endpoint = node_endpoint(bind)?;
    connect_on(&endpoint, config, ca, identity)
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
    let quinn_config = quinn_client_config(ca, identity, &config.link)?;
    rustls::pki_types::ServerName::try_from(config.server_name.as_str())
        .map_err(|_| EndpointError::ServerName(config.server_name.clone()))?;
    let (link, shared) = Link::new(config.server_name.clone(), config.link.clone());
    tokio::spawn(reconnect_loop(
        endpoint.clone(),
        quinn_config,
        config,
        shared,
    ));
    Ok(link)
}

async fn reconnect_loop(
    endpoint: quinn::Endpoint,
    quinn_config: quinn::ClientConfig,
    config: ClientConfig,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(config.backoff);
    let mut last_failure: Option<String> = None;
    while !shared.is_closed() {
        let attempt = async {
            let connecting = endpoint
                .connect_with(
                    quinn_config.clone(),
                    config.server_addr,
                    &config.server_name,
                )
                .map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(config.connect_timeout, attempt) => r,
            _ = shared.cancel.cancelled() => break,
        };
        match outcome {
            Ok(Ok(connection)) => {
                let started = Instant::now();
                let generation = shared.begin_connection();
                tracing::info!(server = %config.server_addr, "connected to the cloud");
                last_failure = None;
                let reason = shared.drive(connection, Role::Client, generation).await;
                if shared.is_closed() {
                    break;
                }
                tracing::info!(server = %config.server_addr, "disconnected from the cloud: {reason}");
                if started.elapsed() >= STABLE_CONNECTION {
                    backoff.reset();
                }
            }
            Ok(Err(e)) => log_failure(&mut last_failure, &config, e),
            Err(_) => log_failure(
                &mut last_failure,
                &config,
                format!("timed out after {:?}", config.connect_timeout),
            ),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.cancel.cancelled() => break,
        }
    }
}

/// Logs a failure once per distinct reason, not on every retry.
fn log_failure(last: &mut Option<String>, config: &ClientConfig, reason: String) {
    if last.as_deref() != Some(reason.as_str()) {
        tracing::warn!(server = %config.server_addr, "cannot reach the cloud: {reason} (retrying with backoff)");
    } else {
        tracing::debug!(server = %config.server_addr, "still cannot reach the cloud: {reason}");
    }
    *last = Some(reason);
}
