//! Joining with a token: a node with no certificate gets one from a server whose CA matches its
//! pin, then connects with mutual TLS. Wrong pins, refused tokens, a server that does not
//! allow joining, and a `kedge/1` connection without a certificate each fail clearly.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use transport::join::cert_pin;
use transport::{CertificateAuthority, CloseCode, JoinError, JoinHandler, JoinRequest, Server};

/// Grants any node name for the token "good-token".
struct Grant(Arc<CertificateAuthority>);

impl JoinHandler for Grant {
    fn join(&self, request: JoinRequest, _remote: SocketAddr) -> Result<Vec<u8>, String> {
        if request.token != "good-token" {
            return Err("unknown token".into());
        }
        self.0
            .sign_node_csr(&request.csr_der, &request.node_name, DAY)
            .map(|c| c.to_vec())
            .map_err(|e| e.to_string())
    }
}

fn server(ca: &Arc<CertificateAuthority>, join: bool) -> Server {
    let identity = ca.issue_server(&[SERVER_NAME.to_owned()], DAY).unwrap();
    let mut config = transport::ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.link = fast_link_config();
    let handler: Option<Arc<dyn JoinHandler>> = join.then(|| Arc::new(Grant(ca.clone())) as _);
    Server::bind_with_join(config, ca.cert(), &identity, handler).unwrap()
}

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_token_then_connects_with_its_certificate() {
    init_tracing();
    let ca = Arc::new(CertificateAuthority::generate("kedge-test-ca").unwrap());
    let mut server = server(&ca, true);
    let addr = server.local_addr().unwrap();
    let pin = cert_pin(ca.cert());

    let joined = transport::join(addr, SERVER_NAME, pin, "edge-7", "good-token", TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        &joined.ca,
        ca.cert(),
        "the pinned CA is what the node trusts"
    );
    assert_eq!(
        transport::tls::node_name_from_cert(&joined.identity.cert_chain[0]).unwrap(),
        "edge-7"
    );

    // The certificate works for the link, and the server names the node by it.
    let mut config = transport::ClientConfig::new(addr, SERVER_NAME);
    config.link = fast_link_config();
    let mut edge = transport::connect(config, &joined.ca, &joined.identity).unwrap();
    let mut node = within(TIMEOUT, server.accept()).await.unwrap();
    assert_eq!(node.peer(), "edge-7");
    expect_connected(&mut edge).await;
    expect_connected(&mut node).await;

    // A refused token: the node hears why.
    match transport::join(addr, SERVER_NAME, pin, "edge-8", "bad-token", TIMEOUT).await {
        Err(JoinError::Refused(reason)) => assert_eq!(reason, "unknown token"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A pin of another CA: the node refuses the server before sending its token.
    let other = CertificateAuthority::generate("another-ca").unwrap();
    match transport::join(
        addr,
        SERVER_NAME,
        cert_pin(other.cert()),
        "edge-9",
        "good-token",
        TIMEOUT,
    )
    .await
    {
        Err(JoinError::PinMismatch(a)) => assert_eq!(a, addr),
        other => panic!("expected a pin mismatch, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_handler_or_a_certificate_nothing_gets_in() {
    init_tracing();
    let ca = Arc::new(CertificateAuthority::generate("kedge-test-ca").unwrap());
    let server = server(&ca, false);
    let addr = server.local_addr().unwrap();
    match transport::join(
        addr,
        SERVER_NAME,
        cert_pin(ca.cert()),
        "edge-1",
        "good-token",
        TIMEOUT,
    )
    .await
    {
        Err(JoinError::Refused(reason)) => assert_eq!(reason, "joining is not enabled"),
        other => panic!("expected joining to be refused, got {other:?}"),
    }

    // kedge/1 with no client certificate: the TLS handshake may finish (certificates are
    // optional at that level for joining), then the server closes with Unauthorized.
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert().clone()).unwrap();
        roots
    })
    .with_no_client_auth();
    tls.alpn_protocols = vec![transport::tls::ALPN.to_vec()];
    let config = transport::quinn_client_config_from(tls, &fast_link_config()).unwrap();
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    let conn = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    match within(TIMEOUT, conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                CloseCode::from_code(close.error_code.into_inner()),
                Some(CloseCode::Unauthorized)
            );
            assert_eq!(&close.reason[..], b"no client certificate");
        }
        other => panic!("expected Unauthorized, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_join_request_is_refused_and_joining_goes_on() {
    init_tracing();
    let ca = Arc::new(CertificateAuthority::generate("kedge-test-ca").unwrap());
    let joins = server(&ca, true);
    let addr = joins.local_addr().unwrap();

    // A raw join connection (ALPN kedge-join/1, no client certificate) announcing a 1 MiB
    // request: over the join limit of 64 KiB.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![transport::join::JOIN_ALPN.to_vec()];
    let config = transport::quinn_client_config_from(tls, &fast_link_config()).unwrap();
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap(), 0).unwrap();
    let conn = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&(1u32 << 20).to_le_bytes()).await.unwrap();
    // The server may close before all of it is sent.
    let _ = send.write_all(&vec![0u8; 128 << 10]).await;
    match within(TIMEOUT, conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            CloseCode::from_code(close.error_code.into_inner()),
            Some(CloseCode::FrameTooLarge),
            "{close:?}"
        ),
        other => panic!("expected the server to close the join, got {other}"),
    }

    // The server goes on: a good join works.
    let joined = transport::join(
        addr,
        SERVER_NAME,
        cert_pin(ca.cert()),
        "edge-8",
        "good-token",
        TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(
        transport::tls::node_name_from_cert(&joined.identity.cert_chain[0]).unwrap(),
        "edge-8"
    );
}
