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
    other_cas: &[CertificateDer<'static>],
    identity: &Identity,
    link: &LinkConfig,
) -> Result<quinn::ServerConfig, EndpointError> {
    let tls = crate::tls::server_config_trusting(ca, other_cas, identity)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| EndpointError::QuicTls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(link.quic_transport());
    Ok(config)
}

pub(crate) fn quinn_client_config(
    cas: &[CertificateDer<'static>],
    identity: &Identity,
    link: &LinkConfig,
) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = crate::tls::client_config_trusting(cas, identity)?;
    quinn_client_config_from(tls, link)
}

/// A quinn client config from any rustls config (tests use it to present bad credentials).
///
/// # Errors
/// [`EndpointError::QuicTls`] when quinn refuses `tls` (no TLS 1.3, or no cipher suite QUIC
/// can use).
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
///
/// `socket_buffer_bytes` sets SO_RCVBUF and SO_SNDBUF (best effort; 0 keeps the OS default).
///
/// # Errors
/// [`EndpointError::Bind`] when the UDP socket cannot be made or bound, or there is no tokio
/// runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    socket_buffer_bytes: usize,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket = udp_socket(bind, socket_buffer_bytes)?;
    let runtime = client_runtime(bind)?;
    quinn::Endpoint::new(node_endpoint_config(), None, socket, runtime)
        .map_err(|source| EndpointError::Bind { addr: bind, source })
}

/// The endpoint of a single node's link: one connection that mostly idles, so its socket
/// receives datagrams one by one (no GRO). quinn sizes its receive buffer for the socket's GRO:
/// 64 coalesced datagrams × 32 per batch ≈ 3 MB, whose pages a burst (an initial sync) touches
/// and that are never returned; without GRO it is 47 KB. BENCHMARKS.md "edgecore idle memory".
pub(crate) fn node_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, EndpointError> {
    let socket = udp_socket(bind, 0)?;
    let runtime = client_runtime(bind)?;
    let bind_err = |source| EndpointError::Bind { addr: bind, source };
    let socket = single_datagrams(socket, runtime.as_ref()).map_err(bind_err)?;
    quinn::Endpoint::new_with_abstract_socket(node_endpoint_config(), None, socket, runtime)
        .map_err(bind_err)
}

/// Length of the connection ids a node's endpoint issues, in bytes. The cloud puts one in
/// every packet it sends the node (an idle node's heartbeat ACK among them), so each byte is
/// paid per packet; a node's endpoint has one or a few connections (a load test's shared
/// endpoint thousands), and quinn draws again on a collision, so 4 random bytes are plenty.
/// quinn's default is 8; the cloud's own ids stay 8 (they carry its reset-key checksum).
pub(crate) const NODE_CID_LEN: usize = 4;

fn node_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(NODE_CID_LEN)));
    config
}

fn client_runtime(bind: SocketAddr) -> Result<Arc<dyn quinn::Runtime>, EndpointError> {
    quinn::default_runtime().ok_or_else(|| EndpointError::Bind {
        addr: bind,
        source: std::io::Error::other("no async runtime"),
    })
}

/// Wraps `socket` for quinn with GRO turned off, where the OS has it (Linux); as quinn would
/// otherwise.
fn single_datagrams(
    socket: std::net::UdpSocket,
    runtime: &dyn quinn::Runtime,
) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        // quinn-udp turns GRO on while wrapping the socket: turned off again after.
        let inner = runtime.wrap_udp_socket(socket)?;
        let off: libc::c_int = 0;
        // SAFETY: `fd` is the open socket `inner` owns; the value is a `c_int` of that size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            // GRO stays on, and so does quinn's buffer sized for it.
            return Ok(inner);
        }
        Ok(Arc::new(CappedSegments {
            inner,
            transmit: usize::MAX,
            receive: 1,
        }))
    }
    #[cfg(not(target_os = "linux"))]
    {
        runtime.wrap_udp_socket(socket)
    }
}

/// Wraps the cloud's socket for quinn so that each connection sends one datagram per system
/// call (no GSO batches). quinn keeps a transmit buffer per connection, sized for the largest
/// batch the socket allows (up to 10 datagrams, ~14 KB) and never shrunk: with GSO the
/// handshake's flight left ~7 KB in it for every idle node. One datagram at a time keeps it at
/// one MTU; the cost is more `sendmsg` calls during bursts (BENCHMARKS.md "Where an idle
/// node's cloud memory goes"). Receiving keeps GRO: its buffer is one per endpoint.
pub(crate) fn one_datagram_per_send(
    socket: std::net::UdpSocket,
    runtime: &dyn quinn::Runtime,
) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    Ok(Arc::new(CappedSegments {
        inner: runtime.wrap_udp_socket(socket)?,
        transmit: 1,
        receive: usize::MAX,
    }))
}

/// quinn's socket, with fewer datagrams per send (GSO) or per receive buffer (GRO) than the
/// OS allows. Lowering `receive` is only right once the kernel coalesces no more than that.
#[derive(Debug)]
struct CappedSegments {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    transmit: usize,
    receive: usize,
}

impl quinn::AsyncUdpSocket for CappedSegments {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments().min(self.transmit)
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments().min(self.receive)
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
