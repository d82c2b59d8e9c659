//! TLS for the embedded MQTT broker (`edgecore --mqtt-tls-cert FILE --mqtt-tls-key FILE
//! [--mqtt-tls-client-ca FILE]`): the listener speaks MQTT over TLS 1.2/1.3 only (rustls with
//! ring, as the rest of kedge). With a client CA, a client must show a certificate it signed;
//! its common name (a DNS-1123 name, as device names are) is the user's name when there is
//! no password file, and ACL rules' `%u` apply to it ([`super::auth`]). A certificate whose
//! common name is not such a name counts as none.
//!
//! edgecore's own client has no client certificate: the TLS layer lets a client without one
//! finish the handshake, and the broker then refuses its CONNECT unless it signs in with
//! edgecore's per-start secret. That client trusts exactly the broker's certificate (pinned
//! by its bytes, whatever CA signed it), not a CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The broker's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerTls {
    /// PEM certificate chain of the broker (its own certificate first).
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificate(s) that sign client certificates; `Some`: they are required.
    pub client_ca: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("a certificate in {}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate", path.display());
    }
    Ok(certs)
}

/// The broker's server configuration, and its own certificate (for [`pinned_client`]).
///
/// # Errors
/// Unreadable or malformed PEM, a key that does not match, an unusable CA.
pub fn server_config(
    tls: &BrokerTls,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, CertificateDer<'static>)> {
    let chain = certificates(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("a private key in {}", tls.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("a CA certificate in {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            // edgecore's own client has none; the broker refuses anyone else without one.
            .allow_unauthenticated()
            .build()
            .context("the client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let own = chain[0].clone();
    let config = builder
        .with_single_cert(chain, key)
        .context("the broker's certificate and key")?;
    Ok((Arc::new(config), own))
}

/// A client configuration that trusts exactly `cert` (edgecore's own client to its broker).
///
/// # Errors
/// Only if rustls refuses its default protocol versions.
pub fn pinned_client(cert: CertificateDer<'static>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { cert, provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts one certificate, byte for byte; signatures are checked as usual.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the embedded broker's certificate".into(),
            ))
        }
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
