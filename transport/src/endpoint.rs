//! UDP sockets and quinn endpoint configuration shared by the server and client.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::LinkConfig;
use crate::error::EndpointError;
use crate::tls::Identity;
use rustls::pki_types::CertificateDer;

/// A UDP socket with the requested buffer sizes. The OS may cap them (`net.core.rmem_max`).
pub(crate) fn udp_socket(
    addr: SocketAddr,
    buffer_bytes: usize,
) -> Result<std::net::UdpSocket, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| EndpointError::Bind { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too on a [::] socket; failure only narrows it to IPv6.
        let _ = socket.set_only_v6(false);
    }
    if buffer_bytes > 0 {
        // Best effort: an unprivileged process gets at most the system maximum.
        let _ = socket.set_recv_buffer_size(buffer_bytes);
        let _ = socket.set_send_buffer_size(buffer_bytes);
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

pub(crate) fn quinn_server_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
    link: &LinkConfig,
) -> Result<quinn::ServerConfig, EndpointError> {
    let tls = crate::tls::server_config(ca, identity)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| EndpointError::QuicTls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(link.quic_transport());
    Ok(config)
}

pub(crate) fn quinn_client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
    link: &LinkConfig,
) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = crate::tls::client_config(ca, identity)?;
    quinn_client_config_from(tls, link)
}

/// A quinn client config from any rustls config (tests use it to present bad credentials).
pub fn quinn_client_config_from(
    tls: rustls::ClientConfig,
    link: &LinkConfig,
) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| EndpointError::QuicTls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(link.quic_transport());
    Ok(config)
}

/// A client-side quinn endpoint. Several links may share one (a load test's hollow nodes).
pub fn client_endpoint(
    bind: SocketAddr,
    socket_buffer_bytes: usize,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket = udp_socket(bind, socket_buffer_bytes)?;
    let runtime = quinn::default_runtime().ok_or_else(|| EndpointError::Bind {
        addr: bind,
        source: std::io::Error::other("no async runtime"),
    })?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .map_err(|source| EndpointError::Bind { addr: bind, source })
}
