//! Node certificate renewal, and the cloud's say over which certificates may connect.
//!
//! A node renews its certificate before it expires by sending a certificate signing request
//! for a new key as a request on its link ([`renew_over_link`]; route group [`GROUP`],
//! operation `renew`, the CSR's DER as content). The answer is a message with operation
//! `granted` (content: the new certificate's DER) or `refused` (content: the reason, UTF-8).
//!
//! A node whose certificate expired while it was offline cannot open a link (the cloud lets
//! an expired certificate do nothing but rotate). It connects with ALPN [`RENEW_ALPN`] and its
//! expired certificate instead and makes the same exchange on one stream ([`renew_expired`]);
//! the cloud's [`CredentialPolicy`] decides (within a grace window after expiry, or refused
//! with a reason telling the operator to re-join the node with a new bootstrap token).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::CertificateDer;

use crate::config::LinkConfig;
use crate::error::{CloseCode, EndpointError, LinkError};
use crate::frame::{encode_body, Envelope, ReceivedMessage};
use crate::link::LinkHandle;
use crate::message::{Message, Route};
use crate::stream_io::{write_bodies, FrameReader};
use crate::tls::{Identity, TlsError};

/// The ALPN protocol id of a renewal with an expired certificate.
pub const RENEW_ALPN: &[u8] = b"kedge-renew/1";

/// The route group of renewal requests and answers.
pub const GROUP: &str = "pki";

const OP_RENEW: &str = "renew";
const OP_GRANTED: &str = "granted";
const OP_REFUSED: &str = "refused";

/// Largest renewal frame either way (a CSR or a certificate is a few hundred bytes).
const MAX_RENEW_FRAME: usize = 64 * 1024;

/// What the cloud lets a connection with a verified node certificate do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Open the node's link.
    Link,
    /// Only renew the certificate (an expired certificate within the grace window); the
    /// string says why, for a node that tries to open its link with it.
    RenewOnly(String),
    /// Nothing: the connection is closed with [`CloseCode::Unauthorized`] and this reason.
    Refuse(String),
}

/// The cloud's side of node credentials: which certificates may connect, and renewals.
///
/// Its methods are called synchronously from connection tasks: they must not block for long.
pub trait CredentialPolicy: Send + Sync + 'static {
    /// Judges a connection of `node` presenting `cert` (its chain already verified against
    /// the CA; an expired certificate is passed too, see [`crate::tls::expiry`]).
    fn admit(&self, node: &str, cert: &CertificateDer<'_>) -> Admission;

    /// Signs a new certificate for `node` from `csr_der` (a DER PKCS#10 request), or says why
    /// not (sent to the node).
    ///
    /// # Errors
    /// The reason for the node: its Node is gone, the CSR names another node, ...
    fn renew(&self, node: &str, csr_der: &[u8]) -> Result<Vec<u8>, String>;

    /// A new connection of `node` from `new` replaced its connection from `old`, which was
    /// still open: a restart before the old connection timed out, or two processes presenting
    /// one node's certificate. The default logs a warning.
    fn on_replaced(&self, node: &str, old: SocketAddr, new: SocketAddr) {
        tracing::warn!(%node, %old, %new, "a new connection replaces one that was still open; if this repeats, two processes present this node's certificate");
    }
}

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The link (or the renewal connection) failed: try again later.
    #[error("{0}")]
    Link(#[from] LinkError),
    /// No connection to the cloud could be made, or it gave no answer in time.
    #[error("cannot reach the cloud: {0}")]
    Unreachable(String),
    /// The cloud refused; its reason.
    #[error("the cloud refused to renew the certificate: {0}")]
    Refused(String),
    /// The answer broke the renewal protocol.
    #[error("renewal protocol error: {0}")]
    Protocol(String),
    /// The TLS configuration could not be made from the node's credentials.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The client endpoint could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// The renewal request for `node`: `csr_der` as content.
pub fn request(node: &str, csr_der: Vec<u8>) -> Message {
    Message::new(
        Route::new("edgehub", GROUP, OP_RENEW, node),
        Bytes::from(csr_der),
    )
}

/// Whether `message` is a renewal request ([`request`]).
pub fn is_request(message: &ReceivedMessage) -> bool {
    message.route().group == GROUP && message.route().operation == OP_RENEW
}

/// The answer to a renewal request: the certificate's DER, or the reason for refusing.
pub fn answer(node: &str, result: Result<Vec<u8>, String>) -> Message {
    let (operation, content) = match result {
        Ok(cert) => (OP_GRANTED, Bytes::from(cert)),
        Err(reason) => (OP_REFUSED, Bytes::from(reason)),
    };
    Message::new(Route::new("cloudhub", GROUP, operation, node), content)
}

fn read_answer(answer: &ReceivedMessage) -> Result<CertificateDer<'static>, RenewError> {
    match answer.route().operation {
        OP_GRANTED => Ok(CertificateDer::from(answer.content().to_vec())),
        OP_REFUSED => Err(RenewError::Refused(
            String::from_utf8_lossy(&answer.content()).into_owned(),
        )),
        other => Err(RenewError::Protocol(format!("unexpected answer {other:?}"))),
    }
}

const OP_TRUST: &str = "trust";

/// The request for the cloud's trust bundle (the CAs a node should trust: two during a CA
/// rollover).
pub fn trust_request(node: &str) -> Message {
    Message::new(Route::new("edgehub", GROUP, OP_TRUST, node), Bytes::new())
}

/// Whether `message` is a trust bundle request ([`trust_request`]).
pub fn is_trust_request(message: &ReceivedMessage) -> bool {
    message.route().group == GROUP && message.route().operation == OP_TRUST
}

/// The answer to a trust bundle request: the CAs as PEM, in the cloud's order (signing CA
/// first).
pub fn trust_answer(node: &str, cas: &[CertificateDer<'static>]) -> Message {
    let pem: String = cas.iter().map(crate::tls::cert_to_pem).collect();
    Message::new(Route::new("cloudhub", GROUP, OP_GRANTED, node), pem)
}

/// Asks the cloud over the node's live link which CAs to trust.
///
/// # Errors
/// [`RenewError::Link`] when the request fails, [`RenewError::Refused`] when the cloud
/// refuses, [`RenewError::Protocol`] when the answer is no PEM bundle.
pub async fn fetch_trust_bundle(
    link: &LinkHandle,
    node: &str,
    timeout: Duration,
) -> Result<Vec<CertificateDer<'static>>, RenewError> {
    let answer = link.request_within(&trust_request(node), timeout).await?;
    match answer.route().operation {
        OP_GRANTED => {
            let text = String::from_utf8_lossy(&answer.content()).into_owned();
            crate::tls::certs_from_pem(&text).map_err(|e| RenewError::Protocol(e.to_string()))
        }
        OP_REFUSED => Err(RenewError::Refused(
            String::from_utf8_lossy(&answer.content()).into_owned(),
        )),
        other => Err(RenewError::Protocol(format!("unexpected answer {other:?}"))),
    }
}

/// Asks for a certificate for `csr_der` over the node's live link, waiting at most `timeout`.
///
/// # Errors
/// [`RenewError::Link`] when the link has no connection or the request fails,
/// [`RenewError::Refused`] when the cloud refuses, [`RenewError::Protocol`] for an answer that
/// is not a renewal answer.
pub async fn renew_over_link(
    link: &LinkHandle,
    node: &str,
    csr_der: Vec<u8>,
    timeout: Duration,
) -> Result<CertificateDer<'static>, RenewError> {
    let answer = link
        .request_within(&request(node, csr_der), timeout)
        .await?;
    read_answer(&answer)
}

/// Asks for a certificate for `csr_der` on a connection of its own with ALPN [`RENEW_ALPN`],
/// presenting `identity` (an expired certificate is fine: the cloud decides). `cas` are the
/// CAs the node trusts, `server_name` the name the cloud's certificate carries; `timeout` bounds the whole
/// exchange. Must be called within a tokio runtime.
///
/// # Errors
/// [`RenewError::Unreachable`] when no connection is made or nothing is answered in time,
/// [`RenewError::Refused`] when the cloud refuses (the reason it gave, also when it closes the
/// connection with one), [`RenewError::Protocol`] for a broken answer, [`RenewError::Tls`] /
/// [`RenewError::Endpoint`] when the TLS configuration or socket cannot be set up.
pub async fn renew_expired(
    server_addr: SocketAddr,
    server_name: &str,
    cas: &[CertificateDer<'static>],
    identity: &Identity,
    node: &str,
    csr_der: Vec<u8>,
    timeout: Duration,
) -> Result<CertificateDer<'static>, RenewError> {
    let mut tls = crate::tls::client_config_trusting(cas, identity)?;
    tls.alpn_protocols = vec![RENEW_ALPN.to_vec()];
    let quinn_config = crate::endpoint::quinn_client_config_from(tls, &LinkConfig::default())?;
    let bind = if server_addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let endpoint = crate::endpoint::client_endpoint(bind.parse().expect("wildcard address"), 0)?;
    let message = request(node, csr_der);
    let exchange = async {
        let connection = endpoint
            .connect_with(quinn_config, server_addr, server_name)
            .map_err(|e| RenewError::Unreachable(e.to_string()))?
            .await
            .map_err(|e| RenewError::Unreachable(e.to_string()))?;
        let answer = async {
            let (mut send, recv) = connection.open_bi().await?;
            write_bodies(
                &mut send,
                [&encode_body(&Envelope::Message(&message))],
                MAX_RENEW_FRAME,
            )
            .await?;
            send.finish()?;
            let frame = FrameReader::new(recv, MAX_RENEW_FRAME)
                .next()
                .await?
                .ok_or_else(|| LinkError::Protocol("no answer to the renewal request".into()))?;
            frame
                .into_message()
                .map_err(|f| LinkError::Protocol(format!("{} frame as a renewal answer", f.kind())))
        }
        .await
        .map_err(|e| match connection.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                RenewError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
            }
            _ => RenewError::Link(e),
        });
        connection.close(CloseCode::Normal.var_int(), b"renewed");
        read_answer(&answer?)
    };
    let cert = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| RenewError::Unreachable(format!("no answer within {timeout:?}")))??;
    endpoint.wait_idle().await;
    Ok(cert)
}

/// Serves one renewal connection (ALPN [`RENEW_ALPN`], certificate admitted): one request,
/// one answer.
pub(crate) async fn serve(
    connection: quinn::Connection,
    policy: &dyn CredentialPolicy,
    node: &str,
    timeout: Duration,
) {
    let remote = connection.remote_address();
    let exchange = async {
        let (mut send, recv) = connection.accept_bi().await?;
        let frame = FrameReader::new(recv, MAX_RENEW_FRAME)
            .next()
            .await?
            .ok_or_else(|| LinkError::Protocol("renewal stream closed without a request".into()))?;
        let request = frame
            .into_message()
            .map_err(|f| LinkError::Protocol(format!("{} frame as a renewal request", f.kind())))?;
        if !is_request(&request) {
            return Err(LinkError::Protocol("expected a renewal request".into()));
        }
        let result = policy.renew(node, &request.content());
        match &result {
            Ok(_) => {
                tracing::info!(%node, %remote, "node certificate renewed (expired-certificate path)")
            }
            Err(reason) => tracing::warn!(%node, %remote, "renewal refused: {reason}"),
        }
        write_bodies(
            &mut send,
            [&encode_body(&Envelope::Message(&answer(node, result)))],
            MAX_RENEW_FRAME,
        )
        .await?;
        send.finish()?;
        let _ = connection.closed().await;
        Ok::<(), LinkError>(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::info!(%remote, "renewal exchange failed: {e}");
            connection.close(
                e.close_code().unwrap_or(CloseCode::Protocol).var_int(),
                e.to_string().as_bytes(),
            );
        }
        Err(_) => connection.close(CloseCode::Protocol.var_int(), b"renewal timed out"),
    }
}

/// A policy that admits every verified, unexpired certificate and renews nothing (what a
/// server without a policy does).
pub(crate) struct DefaultPolicy;

impl CredentialPolicy for DefaultPolicy {
    fn admit(&self, _node: &str, cert: &CertificateDer<'_>) -> Admission {
        match crate::tls::node_cert_info(cert) {
            Ok(info) => match crate::tls::expiry(
                std::time::SystemTime::now(),
                info.not_after,
                Duration::ZERO,
            ) {
                crate::tls::Expiry::Valid => Admission::Link,
                _ => Admission::Refuse("the node certificate expired".into()),
            },
            Err(e) => Admission::Refuse(e.to_string()),
        }
    }

    fn renew(&self, _node: &str, _csr_der: &[u8]) -> Result<Vec<u8>, String> {
        Err("this server renews no certificates".into())
    }
}

/// The policy of a server, or the default one.
pub(crate) fn or_default(policy: &Option<Arc<dyn CredentialPolicy>>) -> &dyn CredentialPolicy {
    match policy {
        Some(p) => p.as_ref(),
        None => &DefaultPolicy,
    }
}
