//! The cloud's endpoint: accepts node connections, names each node by its certificate, and
//! keeps one [`Link`] per node across reconnects. A node's newer connection replaces its
//! older one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::config::ServerConfig;
use crate::endpoint::{one_datagram_per_send, quinn_server_config, udp_socket};
use crate::error::{CloseCode, EndpointError};
use crate::join::{JoinHandler, JOIN_ALPN};
use crate::link::{Link, Role, Shared};
use crate::renew::{Admission, CredentialPolicy, RENEW_ALPN};
use crate::tls::{node_name_from_cert, Identity};

/// Accepts nodes. Dropping it stops accepting; existing links live until they are dropped.
pub struct Server {
    endpoint: quinn::Endpoint,
    new_links: mpsc::Receiver<Link>,
    registry: Arc<Registry>,
    accept_task: tokio::task::JoinHandle<()>,
}

struct Registry {
    config: ServerConfig,
    /// Answers nodes that join (ALPN `kedge-join/1`); `None`: joining is refused.
    join: Option<Arc<dyn JoinHandler>>,
    /// Decides which certificates may connect and renews them; `None`: every verified,
    /// unexpired certificate opens its node's link, and nothing is renewed.
    policy: Option<Arc<dyn CredentialPolicy>>,
    links: Mutex<HashMap<String, Weak<Shared>>>,
    /// Connections being handshaken or running.
    connections: AtomicUsize,
}

impl Server {
    /// Binds the endpoint and starts accepting. Must be called within a tokio runtime.
    ///
    /// # Errors
    /// [`EndpointError::Tls`] or [`EndpointError::QuicTls`] when `ca` and `identity` make no
    /// server TLS configuration, [`EndpointError::Bind`] when the UDP socket cannot be bound or
    /// there is no tokio runtime.
    pub fn bind(
        config: ServerConfig,
        ca: &CertificateDer<'static>,
        identity: &Identity,
    ) -> Result<Server, EndpointError> {
        Self::bind_with_join(config, ca, identity, None)
    }

    /// Like [`Server::bind`], and nodes without a certificate may join through `join`.
    ///
    /// # Errors
    /// As [`Server::bind`].
    pub fn bind_with_join(
        config: ServerConfig,
        ca: &CertificateDer<'static>,
        identity: &Identity,
        join: Option<Arc<dyn JoinHandler>>,
    ) -> Result<Server, EndpointError> {
        Self::bind_with_policy(config, ca, identity, join, None)
    }

    /// Like [`Server::bind_with_join`], and `policy` decides which node certificates may
    /// connect (revoked and expired ones are refused with its reason) and renews them
    /// ([`crate::renew`]).
    ///
    /// # Errors
    /// As [`Server::bind`].
    pub fn bind_with_policy(
        config: ServerConfig,
        ca: &CertificateDer<'static>,
        identity: &Identity,
        join: Option<Arc<dyn JoinHandler>>,
        policy: Option<Arc<dyn CredentialPolicy>>,
    ) -> Result<Server, EndpointError> {
        let quinn_config =
            quinn_server_config(ca, &config.other_client_cas, identity, &config.link)?;
        let socket = udp_socket(config.listen, config.socket_buffer_bytes)?;
        let runtime = quinn::default_runtime().ok_or_else(|| EndpointError::Bind {
            addr: config.listen,
            source: std::io::Error::other("no async runtime"),
        })?;
        let endpoint_config = match config.reset_key {
            Some(key) => {
                let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
                ));
                // Connection ids carry a keyed checksum and packets with ids that fail it are
                // dropped silently. The checksum key must survive a restart too, or the
                // restarted endpoint drops the old connections' packets instead of resetting
                // them (nodes would wait out their idle timeout).
                let cid_key = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
                endpoint_config.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                });
                endpoint_config
            }
            None => quinn::EndpointConfig::default(),
        };
        let bind_err = |source| EndpointError::Bind {
            addr: config.listen,
            source,
        };
        let socket = one_datagram_per_send(socket, runtime.as_ref()).map_err(bind_err)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(quinn_config),
            socket,
            runtime,
        )
        .map_err(bind_err)?;
        let (links_tx, new_links) = mpsc::channel(1024);
        let registry = Arc::new(Registry {
            config,
            join,
            policy,
            links: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), registry.clone(), links_tx));
        Ok(Server {
            endpoint,
            new_links,
            registry,
            accept_task,
        })
    }

    /// The next node seen for the first time (or again after its link was dropped).
    pub async fn accept(&mut self) -> Option<Link> {
        self.new_links.recv().await
    }

    /// The address the endpoint is bound to (the port, when bound to port 0).
    ///
    /// # Errors
    /// The OS error when the socket's address cannot be read.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Connections being handshaken or running.
    pub fn connection_count(&self) -> usize {
        self.registry.connections.load(Ordering::Relaxed)
    }

    /// Connection states quinn holds: handshaking, running, closing and draining (a closed
    /// connection is kept for three probe timeouts to absorb the peer's late packets, RFC 9000
    /// §10.2). Each costs memory whether or not a link uses it.
    pub fn quic_connection_states(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Closes every connection and waits until the peers have been told.
    pub async fn shutdown(self) {
        self.accept_task.abort();
        self.endpoint
            .close(CloseCode::ShuttingDown.var_int(), b"server shutting down");
        self.endpoint.wait_idle().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    links_tx: mpsc::Sender<Link>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let active = registry.connections.fetch_add(1, Ordering::Relaxed);
        if active >= registry.config.max_connections {
            registry.connections.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(remote = %incoming.remote_address(), limit = registry.config.max_connections, "connection refused: at the connection limit");
            incoming.refuse();
            continue;
        }
        let registry = registry.clone();
        let links_tx = links_tx.clone();
        tokio::spawn(async move {
            serve_connection(incoming, &registry, &links_tx).await;
            registry.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    registry: &Registry,
    links_tx: &mpsc::Sender<Link>,
) {
    let remote = incoming.remote_address();
    let timeout = registry.config.link.handshake_timeout;
    let connection = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::info!(%remote, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "handshake timed out after {timeout:?}");
            return;
        }
    };
    if negotiated_alpn(&connection).as_deref() == Some(JOIN_ALPN) {
        match &registry.join {
            Some(handler) => crate::join::serve(connection, handler.as_ref(), timeout).await,
            None => {
                tracing::warn!(%remote, "join attempt refused: joining is not enabled");
                connection.close(CloseCode::Unauthorized.var_int(), b"joining is not enabled");
            }
        }
        return;
    }
    let (node, leaf) = match peer_node(&connection) {
        Ok(peer) => peer,
        Err(reason) => {
            tracing::warn!(%remote, "rejecting connection: {reason}");
            connection.close(CloseCode::Unauthorized.var_int(), reason.as_bytes());
            return;
        }
    };
    let policy = crate::renew::or_default(&registry.policy);
    let admission = policy.admit(&node, &leaf);
    if negotiated_alpn(&connection).as_deref() == Some(RENEW_ALPN) {
        match admission {
            Admission::Refuse(reason) => {
                tracing::warn!(%node, %remote, "renewal refused: {reason}");
                connection.close(CloseCode::Unauthorized.var_int(), reason.as_bytes());
            }
            Admission::Link | Admission::RenewOnly(_) => {
                crate::renew::serve(connection, policy, &node, timeout).await
            }
        }
        return;
    }
    match admission {
        Admission::Link => {}
        Admission::RenewOnly(reason) | Admission::Refuse(reason) => {
            tracing::warn!(%node, %remote, "connection refused: {reason}");
            connection.close(CloseCode::Unauthorized.var_int(), reason.as_bytes());
            return;
        }
    }
    let (shared, new_link) = registry.link_for(&node);
    if let Some(link) = new_link {
        if links_tx.send(link).await.is_err() {
            connection.close(CloseCode::ShuttingDown.var_int(), b"server shutting down");
            return;
        }
    }
    let (generation, replaced) = shared.begin_connection(remote);
    if let Some(old) = replaced {
        policy.on_replaced(&node, old, remote);
    }
    tracing::debug!(%node, %remote, generation, "node connected");
    let reason = shared.drive(connection, Role::Server, generation).await;
    tracing::debug!(%node, %remote, "node connection ended: {reason}");
}

fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

fn peer_node(connection: &quinn::Connection) -> Result<(String, CertificateDer<'static>), String> {
    let identity = connection.peer_identity().ok_or("no client certificate")?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_owned())?;
    let leaf = certs.first().ok_or("empty client certificate chain")?;
    let node = node_name_from_cert(leaf).map_err(|e| e.to_string())?;
    Ok((node, leaf.clone()))
}

impl Registry {
    /// The node's live link, or a new one (returned as a `Link` for the application).
    fn link_for(&self, node: &str) -> (Arc<Shared>, Option<Link>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = links.get(node).and_then(Weak::upgrade) {
            if !shared.is_closed() {
                return (shared, None);
            }
        }
        let (link, shared) = Link::new(node.to_owned(), self.config.link.clone());
        links.insert(node.to_owned(), Arc::downgrade(&shared));
        // Forget links that were dropped, so the map does not grow with departed nodes.
        if links.len() > 1024 && links.len().is_power_of_two() {
            links.retain(|_, weak| weak.strong_count() > 0);
        }
        (shared, Some(link))
    }
}
