//! Joining: how a node without a certificate gets one, on the cloud's QUIC port.
//!
//! A joining node connects with ALPN `kedge-join/1` and no client certificate. It cannot know
//! the cloud's CA yet, so it trusts the server only if the chain the server presents contains a
//! CA certificate whose SHA-256 equals the pin it was given (the bootstrap token carries it, like
//! kubeadm's discovery hash), and the server's certificate verifies against that CA. Only then
//! does it send its request: one frame with the node name, the token and a certificate signing
//! request. The server answers with one frame: the signed certificate, or why not. From then on
//! the node connects with ALPN `kedge/1` and its certificate (mutual TLS).
//!
//! The transport carries the exchange; deciding whether a token is good and what name a node
//! gets is the application's [`JoinHandler`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::LinkConfig;
use crate::error::{CloseCode, EndpointError, LinkError};
use crate::frame::{encode_body, Envelope};
use crate::message::{Message, Route};
use crate::stream_io::{write_bodies, FrameReader};
use crate::tls::{node_csr, Identity, TlsError};

/// The ALPN protocol id of the join exchange.
pub const JOIN_ALPN: &[u8] = b"kedge-join/1";

/// Largest join frame either way: a CSR or a certificate is a few hundred bytes.
const MAX_JOIN_FRAME: usize = 64 * 1024;

/// What a joining node asks for.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The name the node asks to be known by (the handler decides what it gets).
    pub node_name: String,
    /// The bootstrap token as the operator typed it; only the application interprets it.
    pub token: String,
    /// A PKCS#10 certificate signing request (DER) for the node's new key.
    pub csr_der: Vec<u8>,
}

/// The cloud's side of joining.
pub trait JoinHandler: Send + Sync + 'static {
    /// Checks the request and returns the node's certificate (DER), or a reason for the node.
    ///
    /// Called synchronously from the connection's async task: it must not block for long.
    ///
    /// # Errors
    /// The reason the join is refused (bad or expired token, name taken, ...): sent to the node,
    /// which returns it as [`JoinError::Refused`].
    fn join(&self, request: JoinRequest, remote: SocketAddr) -> Result<Vec<u8>, String>;
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No QUIC connection to the cloud could be made (including a server certificate that
    /// does not verify against the pinned CA), or it gave no answer in time.
    #[error("cannot reach the cloud at {addr}: {reason}")]
    Unreachable {
        /// The cloud's address.
        addr: SocketAddr,
        /// What failed (the connection error, or the timeout).
        reason: String,
    },
    /// No certificate in the server's chain has the pinned SHA-256.
    #[error(
        "the cloud at {0} does not present the CA the token pins (wrong cloud, or a wrong token)"
    )]
    PinMismatch(SocketAddr),
    /// The cloud answered with a refusal (or closed the connection); its reason.
    #[error("the cloud refused to join this node: {0}")]
    Refused(String),
    /// The cloud's answer broke the join protocol.
    #[error("join protocol error: {0}")]
    Protocol(String),
    /// The key, CSR or TLS configuration could not be made (an invalid node name, ...).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The client endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// What a node gets from a successful join.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The node's identity: its new key and the certificate the cloud signed.
    pub identity: Identity,
    /// The cloud's CA, verified against the pin: trust it from now on.
    pub ca: CertificateDer<'static>,
}

const OP_JOIN: &str = "join";
const OP_GRANTED: &str = "granted";
const OP_REFUSED: &str = "refused";

/// Joins `node_name` to the cloud at `server_addr`, trusting only a CA whose SHA-256 is
/// `ca_pin`. Must be called within a tokio runtime.
///
/// `server_name` is the name the server's certificate must carry; `timeout` bounds the whole
/// exchange (handshake, request and answer). The pin is the SHA-256 of the CA certificate's
/// DER, as in kubeadm's `--discovery-token-ca-cert-hash sha256:…`.
///
/// # Errors
/// [`JoinError::Tls`] for a node name that is not a DNS-1123 subdomain,
/// [`JoinError::Endpoint`] when no UDP socket can be bound, [`JoinError::Unreachable`] when
/// the handshake fails (also when the server's certificate does not verify against the
/// pinned CA) or nothing is answered within `timeout`,
/// [`JoinError::PinMismatch`] when the server does not present the pinned CA,
/// [`JoinError::Refused`] when the cloud's [`JoinHandler`] refuses, [`JoinError::Protocol`]
/// for an answer that is not a join answer.
pub async fn join(
    server_addr: SocketAddr,
    server_name: &str,
    ca_pin: [u8; 32],
    node_name: &str,
    token: &str,
    timeout: Duration,
) -> Result<Joined, JoinError> {
    let (key, csr_der) = node_csr(node_name)?;
    let verifier = Arc::new(PinnedCaVerifier::new(ca_pin));
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::from)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![JOIN_ALPN.to_vec()];
    let quinn_config = crate::endpoint::quinn_client_config_from(tls, &LinkConfig::default())?;
    let bind = if server_addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let endpoint = crate::endpoint::client_endpoint(bind.parse().expect("wildcard address"), 0)?;
    let unreachable = |reason: String| JoinError::Unreachable {
        addr: server_addr,
        reason,
    };
    let request = Message::new(
        Route {
            source: token.to_owned(),
            group: "join".into(),
            operation: OP_JOIN.into(),
            resource: node_name.to_owned(),
        },
        Bytes::from(csr_der),
    );
    let exchange = async {
        let connecting = endpoint
            .connect_with(quinn_config, server_addr, server_name)
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = match connecting.await {
            Ok(connection) => connection,
            Err(_) if verifier.pin_mismatch() => return Err(JoinError::PinMismatch(server_addr)),
            Err(e) => return Err(unreachable(e.to_string())),
        };
        let answer = async {
            let (mut send, recv) = connection.open_bi().await?;
            let body = encode_body(&Envelope::Message(&request));
            write_bodies(&mut send, [&body], MAX_JOIN_FRAME).await?;
            send.finish()?;
            let frame = FrameReader::new(recv, MAX_JOIN_FRAME)
                .next()
                .await?
                .ok_or_else(|| LinkError::Protocol("no answer to the join request".into()))?;
            frame
                .into_message()
                .map_err(|f| LinkError::Protocol(format!("{} frame as a join answer", f.kind())))
        }
        .await
        .map_err(|e| match connection.close_reason() {
            // The server closed the connection instead of answering: say what it said.
            Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                JoinError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
            }
            _ => JoinError::Protocol(e.to_string()),
        });
        connection.close(CloseCode::Normal.var_int(), b"joined");
        let answer = answer?;
        match answer.route().operation {
            OP_GRANTED => Ok(answer.content()),
            OP_REFUSED => Err(JoinError::Refused(
                String::from_utf8_lossy(&answer.content()).into_owned(),
            )),
            other => Err(JoinError::Protocol(format!("unexpected answer {other:?}"))),
        }
    };
    let cert = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))??;
    endpoint.wait_idle().await;
    let ca = verifier
        .verified_ca()
        .ok_or_else(|| JoinError::Protocol("no verified CA after the handshake".into()))?;
    Ok(Joined {
        identity: Identity {
            cert_chain: vec![CertificateDer::from(cert.to_vec())],
            key,
        },
        ca,
    })
}

/// Serves one join connection (the server calls it for connections with [`JOIN_ALPN`]).
pub(crate) async fn serve(
    connection: quinn::Connection,
    handler: &dyn JoinHandler,
    timeout: Duration,
) {
    let remote = connection.remote_address();
    let exchange = async {
        let (mut send, recv) = connection.accept_bi().await?;
        let frame = FrameReader::new(recv, MAX_JOIN_FRAME)
            .next()
            .await?
            .ok_or_else(|| LinkError::Protocol("join stream closed without a request".into()))?;
        let request = frame
            .into_message()
            .map_err(|f| LinkError::Protocol(format!("{} frame as a join request", f.kind())))?;
        let route = request.route();
        if route.operation != OP_JOIN {
            return Err(LinkError::Protocol(format!(
                "expected a join request, got {:?}",
                route.operation
            )));
        }
        let join = JoinRequest {
            node_name: route.resource.to_string(),
            token: route.source.to_string(),
            csr_der: request.content().to_vec(),
        };
        let node = join.node_name.clone();
        let (operation, content) = match handler.join(join, remote) {
            Ok(cert) => {
                tracing::info!(%node, %remote, "node joined");
                (OP_GRANTED, Bytes::from(cert))
            }
            Err(reason) => {
                tracing::warn!(%node, %remote, "join refused: {reason}");
                (OP_REFUSED, Bytes::from(reason))
            }
        };
        let answer = Message::new(
            Route {
                source: "cloudhub".into(),
                group: "join".into(),
                operation: operation.into(),
                resource: node,
            },
            content,
        );
        write_bodies(
            &mut send,
            [&encode_body(&Envelope::Message(&answer))],
            MAX_JOIN_FRAME,
        )
        .await?;
        send.finish()?;
        // Let the node read the answer and close; its close (or the timeout) ends this.
        let _ = connection.closed().await;
        Ok::<(), LinkError>(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::info!(%remote, "join exchange failed: {e}");
            connection.close(
                e.close_code().unwrap_or(CloseCode::Protocol).var_int(),
                e.to_string().as_bytes(),
            );
        }
        Err(_) => connection.close(CloseCode::Protocol.var_int(), b"join timed out"),
    }
}

/// Trusts a server whose chain includes a CA certificate with the pinned SHA-256 and whose
/// certificate verifies against that CA (name, validity, signature: rustls's webpki checks).
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
    verified: std::sync::Mutex<Option<CertificateDer<'static>>>,
    mismatch: std::sync::atomic::AtomicBool,
}

impl PinnedCaVerifier {
    fn new(pin: [u8; 32]) -> Self {
        PinnedCaVerifier {
            pin,
            provider: crate::tls::provider(),
            verified: std::sync::Mutex::new(None),
            mismatch: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn pin_mismatch(&self) -> bool {
        self.mismatch.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn verified_ca(&self) -> Option<CertificateDer<'static>> {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// SHA-256 of a certificate: what a token pins.
pub fn cert_pin(cert: &CertificateDer<'_>) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref())
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| cert_pin(c) == self.pin) else {
            self.mismatch
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(rustls::Error::General(
                "no certificate in the server's chain matches the pinned CA hash".into(),
            ));
        };
        let ca = ca.clone().into_owned();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        *self.verified.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
