//! The embedded API off loopback: HTTPS with a server certificate from the cluster CA (so
//! `kubectl --certificate-authority DATA/pki/ca.crt` trusts it), and a bearer token on every
//! request (checked by `replication::api`). Connections are served by
//! `replication::http_server` (with its timeouts and limits), TLS first.

use std::sync::Arc;

use transport::Identity;

/// TLS 1.2/1.3 with `identity`, ALPN for HTTP/1.1 and HTTP/2 (kubectl speaks both).
pub fn server_config(identity: &Identity) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS client for another replica's API: trusts the cluster CA (`ca`), HTTP/1.1 (forwarded
/// upgrades need it).
///
/// # Errors
/// `ca` is not a certificate rustls accepts.
pub fn replica_connector(
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
