//! Mutual TLS for the link: the cloud's certificate authority, node and server certificates,
//! and the rustls configurations both ends use (TLS 1.3 only, ALPN `kedge/1`).
//!
//! A node's identity is the common name of the certificate the CA issued to it. The cloud
//! takes the node name from the verified certificate ([`node_name_from_cert`]), never from
//! anything the node says.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::{CertificateSigningRequestDer, PrivateKeyDer};
use time::OffsetDateTime;

/// The ALPN protocol id of kedge's link.
pub const ALPN: &[u8] = b"kedge/1";

/// Why a certificate, key or TLS configuration could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not generate a key, certificate or CSR, or could not parse a key or CSR.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// PEM text without the expected block, or a block that does not decode.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// rustls refused the certificates or key (a CA certificate it cannot use as a root, a key
    /// that does not match).
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// A node name that is not a DNS-1123 subdomain, or a certificate without one as its common
    /// name.
    #[error("certificate has no usable node name: {0}")]
    NodeName(String),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// DER certificates, the end-entity certificate first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The end-entity certificate's private key (PKCS#8 for keys made here).
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// The chain and key as PEM text: `(certificates, key)`.
    pub fn to_pem(&self) -> (String, String) {
        let certs = self
            .cert_chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_ref()))
            .collect();
        let key = pem_block("PRIVATE KEY", self.key.secret_der());
        (certs, key)
    }

    /// Reads a chain and key from PEM text, as written by [`to_pem`](Self::to_pem): every
    /// `CERTIFICATE` block of `cert_chain_pem`, and the first private key block of `key_pem`
    /// (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// [`TlsError::Pem`] when `cert_chain_pem` has no `CERTIFICATE` block, a block does not
    /// decode, or `key_pem` has no private key.
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let cert_chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        if cert_chain.is_empty() {
            return Err(TlsError::Pem("no CERTIFICATE block".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        Ok(Identity { cert_chain, key })
    }
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

/// A certificate as PEM text.
pub fn cert_to_pem(cert: &CertificateDer<'_>) -> String {
    pem_block("CERTIFICATE", cert.as_ref())
}

/// The first certificate in PEM text.
///
/// # Errors
/// [`TlsError::Pem`] when `text` has no `CERTIFICATE` block or it does not decode.
pub fn cert_from_pem(text: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(text.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

/// The cloud's certificate authority: it signs node and server certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

impl CertificateAuthority {
    /// A new self-signed CA, valid for ten years.
    ///
    /// # Errors
    /// [`TlsError::Generate`] when rcgen cannot make the key or sign the certificate.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`CertificateAuthority::to_pem`].
    ///
    /// # Errors
    /// [`TlsError::Generate`] when the key does not parse or the certificate is not a CA
    /// certificate rcgen can issue from; [`TlsError::Pem`] when `cert_pem` has no certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(CertificateAuthority { issuer, cert })
    }

    /// `(certificate, private key)` as PEM.
    pub fn to_pem(&self) -> (String, String) {
        (
            pem_block("CERTIFICATE", self.cert.as_ref()),
            self.issuer.key().serialize_pem(),
        )
    }

    /// The CA's own certificate (DER): what nodes and the server trust as their only root.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A fresh key and a client certificate for `node_name`, valid for `validity` from now.
    ///
    /// The certificate's common name is `node_name`; it is valid for client authentication only,
    /// from five minutes ago (clock skew; a tenth of `validity` if that is less, so that a node
    /// renewing at two thirds of the lifetime it reads does so near two thirds of `validity`).
    ///
    /// # Errors
    /// [`TlsError::NodeName`] when `node_name` is not a DNS-1123 subdomain;
    /// [`TlsError::Generate`] when the key cannot be made or the certificate signed.
    pub fn issue_node(&self, node_name: &str, validity: Duration) -> Result<Identity, TlsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_node_between(node_name, now - backdate(validity), now + validity)
    }

    /// Like [`issue_node`](Self::issue_node) with explicit validity bounds (tests use it to
    /// make expired certificates).
    ///
    /// # Errors
    /// As [`issue_node`](Self::issue_node).
    pub fn issue_node_between(
        &self,
        node_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let params = node_params(node_name, not_before, not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_chain: vec![cert.der().clone()],
            key: private_key(&key),
        })
    }

    /// Signs a node's certificate signing request. The name comes from the caller (who checked
    /// the node's bootstrap token), not from the request; only the public key is taken from it.
    ///
    /// The certificate is valid from five minutes ago (a tenth of `validity` if that is less) to
    /// `validity` from now.
    ///
    /// # Errors
    /// [`TlsError::Generate`] when `csr_der` is not a DER PKCS#10 request with a valid
    /// signature, or signing fails; [`TlsError::NodeName`] when `node_name` is not a DNS-1123
    /// subdomain.
    pub fn sign_node_csr(
        &self,
        csr_der: &[u8],
        node_name: &str,
        validity: Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
            csr_der,
        ))?;
        let now = OffsetDateTime::now_utc();
        let params = node_params(node_name, now - backdate(validity), now + validity)?;
        Ok(params
            .signed_by(&csr.public_key, &self.issuer)?
            .der()
            .clone())
    }

    /// A fresh key and a server certificate for the given DNS names and IP addresses.
    ///
    /// Its common name is `kedge-cloudcore`; it is valid for server authentication only, from five
    /// minutes ago to `validity` from now. A name that parses as an IP address becomes an IP
    /// subject alternative name, any other a DNS one.
    ///
    /// # Errors
    /// [`TlsError::Generate`] when a name is not a valid subject alternative name, or the key
    /// cannot be made or the certificate signed.
    pub fn issue_server(&self, names: &[String], validity: Duration) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "kedge-cloudcore");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_chain: vec![cert.der().clone()],
            key: private_key(&key),
        })
    }
}

/// A key and a certificate signing request for `node_name`: what a joining node sends.
///
/// `(private key, DER PKCS#10 request)`; the request's subject common name is `node_name`.
///
/// # Errors
/// [`TlsError::NodeName`] when `node_name` is not a DNS-1123 subdomain;
/// [`TlsError::Generate`] when the key or request cannot be made.
pub fn node_csr(node_name: &str) -> Result<(PrivateKeyDer<'static>, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    let params = node_params(
        node_name,
        OffsetDateTime::now_utc(),
        OffsetDateTime::now_utc(),
    )?;
    let csr = params.serialize_request(&key)?;
    Ok((private_key(&key), csr.der().to_vec()))
}

/// How far back a node certificate's validity starts (clock skew between cloud and node):
/// five minutes, or a tenth of its validity if that is less.
fn backdate(validity: Duration) -> time::Duration {
    let skew = (validity / 10).min(Duration::from_secs(300));
    time::Duration::try_from(skew).unwrap_or(time::Duration::minutes(5))
}

fn node_params(
    node_name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, TlsError> {
    validate_node_name(node_name)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, node_name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.serialize_der().into())
}

/// Node names are Kubernetes node names: DNS-1123 subdomains.
///
/// At most 253 characters of dot-separated labels, each 1–63 lowercase letters, digits and
/// `-`, neither starting nor ending with `-` (RFC 1123, as Kubernetes validates names).
///
/// # Errors
/// [`TlsError::NodeName`] when `name` is not such a name.
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let ok_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(ok_label) {
        return Err(TlsError::NodeName(format!(
            "{name:?} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
        )));
    }
    Ok(())
}

/// The node name a verified client certificate carries (its subject common name).
///
/// The certificate is not verified here: call it on certificates TLS has verified.
///
/// # Errors
/// [`TlsError::NodeName`] when the certificate does not parse as X.509, has no common name, or
/// its common name is not a valid node name.
pub fn node_name_from_cert(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::NodeName(format!("unparsable certificate: {e}")))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| TlsError::NodeName("no common name".into()))?
        .as_str()
        .map_err(|e| TlsError::NodeName(format!("common name is not a string: {e}")))?;
    validate_node_name(cn)?;
    Ok(cn.to_owned())
}

/// What kedge reads from a node certificate: its name, validity and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertInfo {
    /// The subject common name (a valid node name).
    pub node: String,
    /// `notBefore`, as a system time (second precision, as X.509 has it).
    pub not_before: SystemTime,
    /// `notAfter`, as a system time.
    pub not_after: SystemTime,
    /// SHA-256 of the certificate's DER, lowercase hex: what the cloud records per node.
    pub fingerprint: String,
    /// The issuer's common name (the CA that signed it; empty if it has none).
    pub issuer: String,
}

/// Reads a node certificate's name, validity and fingerprint. The certificate is not verified.
///
/// # Errors
/// [`TlsError::NodeName`] when it does not parse as X.509 or names no valid node.
pub fn node_cert_info(cert: &CertificateDer<'_>) -> Result<NodeCertInfo, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::NodeName(format!("unparsable certificate: {e}")))?;
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            UNIX_EPOCH
        }
    };
    let issuer = parsed
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok(NodeCertInfo {
        node: node_name_from_cert(cert)?,
        not_before: time(parsed.validity().not_before),
        not_after: time(parsed.validity().not_after),
        fingerprint: fingerprint(cert),
        issuer,
    })
}

/// The subject common name a certificate signing request (DER PKCS#10) asks for. The request's
/// signature is checked too (a request whose key did not sign it is refused).
///
/// # Errors
/// [`TlsError::NodeName`] when the request does not parse, its signature does not verify, or
/// it has no common name.
pub fn csr_common_name(csr_der: &[u8]) -> Result<String, TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|e| TlsError::NodeName(format!("unparsable certificate signing request: {e}")))?;
    // rcgen checks the request's signature.
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
        .map_err(|e| TlsError::NodeName(format!("certificate signing request: {e}")))?;
    let cn = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .ok_or_else(|| TlsError::NodeName("the request has no common name".into()))?
        .as_str()
        .map_err(|e| TlsError::NodeName(format!("common name is not a string: {e}")))?;
    Ok(cn.to_owned())
}

/// SHA-256 of a certificate's DER, lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// When a node renews a certificate valid from `not_before` to `not_after`: at two thirds of
/// its lifetime (like kubelet's rotation at 70–90 %, early enough for a node that is offline
/// for a while to still get its renewal through). A certificate whose bounds are reversed is
/// due at once (`not_before`).
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    not_before + lifetime * 2 / 3
}

/// How the cloud treats a certificate at a given time, by its expiry alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Not expired: every use.
    Valid,
    /// Expired this long ago, within the grace window: only to rotate it.
    InGrace(Duration),
    /// Expired this long ago, beyond the grace window: refused (the node re-joins).
    Beyond(Duration),
}

/// Judges a certificate expiring at `not_after`, `now`, with a grace window of `grace` after
/// expiry (the bound itself is still in grace).
pub fn expiry(now: SystemTime, not_after: SystemTime, grace: Duration) -> Expiry {
    match now.duration_since(not_after) {
        Err(_) => Expiry::Valid,
        Ok(ago) if ago.is_zero() => Expiry::Valid,
        Ok(ago) if ago <= grace => Expiry::InGrace(ago),
        Ok(ago) => Expiry::Beyond(ago),
    }
}

/// A client verifier that also lets expired certificates through the TLS handshake when they
/// are otherwise valid (issued by the CA, signature and chain good at their expiry time), so
/// that the application can tell an expired node what to do instead of a bare TLS alert. The
/// application must judge expiry itself ([`expiry`] on [`node_cert_info`]); the cloud lets an
/// expired certificate only rotate itself.
#[derive(Debug)]
struct ExpiryTolerantVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl rustls::server::danger::ClientCertVerifier for ExpiryTolerantVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        use rustls::CertificateError;
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let info = node_cert_info(end_entity)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                let at = info
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .saturating_sub(Duration::from_secs(1));
                self.inner.verify_client_cert(
                    end_entity,
                    intermediates,
                    rustls::pki_types::UnixTime::since_unix_epoch(at),
                )
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The cloud endpoint's provider: ring's, with ChaCha20-Poly1305 preferred over AES-GCM
/// (RFC 8446 §9.1 suites, all TLS 1.3). A connection keeps four packet keys (this and the
/// next key phase, each way) and two header protection keys for its whole life: with AES-GCM
/// each is an expanded key schedule and GHASH table (~0.5 KB), with ChaCha20 a 32-byte key, so
/// ~2.5 KB less per node held in the cloud (BENCHMARKS.md "Where an idle node's cloud memory
/// goes"). ChaCha20 is also the faster one on edge CPUs without AES instructions; the cloud's
/// link traffic is far below what either does per core. QUIC's Initial packets stay
/// AES-128-GCM, as RFC 9001 §5.2 fixes.
fn link_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    Arc::new(provider)
}

fn roots(cas: &[CertificateDer<'static>]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone())?;
    }
    Ok(Arc::new(roots))
}

/// The cloud's TLS config: its server identity (sent with the CA certificate, which joining
/// nodes check against their pin), and client certificates verified against `ca`. A client
/// certificate is optional at the TLS level so that nodes can join (ALPN `kedge-join/1`); the
/// server refuses a `kedge/1` connection without one. An expired client certificate that is
/// otherwise valid passes the handshake: the server application judges expiry (see
/// [`expiry`]), so that it can answer with a reason instead of a TLS alert.
///
/// # Errors
/// [`TlsError::Config`] when rustls refuses `ca` as a root or `identity`'s key;
/// [`TlsError::Verifier`] when the client verifier cannot be built.
pub fn server_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_trusting(ca, &[], identity)
}

/// Like [`server_config`], and client certificates issued by any of `other_cas` are trusted
/// too (the previous or next CA during a CA rollover). `ca` is the CA that issued `identity`.
///
/// # Errors
/// As [`server_config`].
pub fn server_config_trusting(
    ca: &CertificateDer<'static>,
    other_cas: &[CertificateDer<'static>],
    identity: &Identity,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut trusted = vec![ca.clone()];
    trusted.extend(other_cas.iter().filter(|c| *c != ca).cloned());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&trusted)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(ExpiryTolerantVerifier { inner: verifier });
    let mut chain = identity.cert_chain.clone();
    if !chain.contains(ca) {
        chain.push(ca.clone());
    }
    let mut config = rustls::ServerConfig::builder_with_provider(link_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, identity.key.clone_key())?;
    // The cloud picks the cipher suite (see `link_provider`), whatever the node prefers.
    config.ignore_client_order = true;
    config.alpn_protocols = vec![
        ALPN.to_vec(),
        crate::join::JOIN_ALPN.to_vec(),
        crate::renew::RENEW_ALPN.to_vec(),
    ];
    Ok(config)
}

/// A node's TLS config: trusts only `ca`, presents `identity`.
///
/// # Errors
/// [`TlsError::Config`] when rustls refuses `ca` as a root or `identity`'s key.
pub fn client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_trusting(std::slice::from_ref(ca), identity)
}

/// A node's TLS config trusting any of `cas` (its trust bundle: two CAs during a rollover),
/// presenting `identity`.
///
/// # Errors
/// [`TlsError::Config`] when `cas` is empty, rustls refuses one as a root, or refuses
/// `identity`'s key.
pub fn client_config_trusting(
    cas: &[CertificateDer<'static>],
    identity: &Identity,
) -> Result<rustls::ClientConfig, TlsError> {
    if cas.is_empty() {
        return Err(TlsError::Pem("no CA certificate to trust".into()));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(cas)?)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Every `CERTIFICATE` block of PEM text (a trust bundle), in order.
///
/// # Errors
/// [`TlsError::Pem`] when a block does not decode or there is none.
pub fn certs_from_pem(text: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificate_names_the_node() {
        let ca = CertificateAuthority::generate("kedge-ca").unwrap();
        let id = ca.issue_node("edge-1", Duration::from_secs(3600)).unwrap();
        assert_eq!(node_name_from_cert(&id.cert_chain[0]).unwrap(), "edge-1");
        assert!(ca.issue_node("Bad_Name", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn csr_is_signed_with_the_callers_name_not_the_requesters() {
        let ca = CertificateAuthority::generate("kedge-ca").unwrap();
        let (_key, csr) = node_csr("i-claim-to-be-another-node").unwrap();
        let cert = ca
            .sign_node_csr(&csr, "edge-7", Duration::from_secs(60))
            .unwrap();
        assert_eq!(node_name_from_cert(&cert).unwrap(), "edge-7");
        assert_eq!(csr_common_name(&csr).unwrap(), "i-claim-to-be-another-node");
        assert!(csr_common_name(b"garbage").is_err());
    }

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_lifetime() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let due = renewal_due(start, start + Duration::from_secs(90));
        assert_eq!(due, start + Duration::from_secs(60));
        // Reversed bounds: due at once.
        assert_eq!(renewal_due(start, start - Duration::from_secs(5)), start);
        let year = Duration::from_secs(365 * 24 * 3600);
        let due = renewal_due(start, start + year);
        assert!(due > start + year / 2 && due < start + year * 3 / 4);
    }

    #[test]
    fn expiry_grace_decision() {
        let t = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let grace = Duration::from_secs(30);
        assert_eq!(expiry(t - Duration::from_secs(1), t, grace), Expiry::Valid);
        assert_eq!(expiry(t, t, grace), Expiry::Valid);
        assert_eq!(
            expiry(t + Duration::from_secs(1), t, grace),
            Expiry::InGrace(Duration::from_secs(1))
        );
        assert_eq!(expiry(t + grace, t, grace), Expiry::InGrace(grace));
        assert_eq!(
            expiry(t + grace + Duration::from_secs(1), t, grace),
            Expiry::Beyond(grace + Duration::from_secs(1))
        );
        assert_eq!(
            expiry(t + Duration::from_secs(1), t, Duration::ZERO),
            Expiry::Beyond(Duration::from_secs(1))
        );
    }

    #[test]
    fn cert_info_reads_validity_and_fingerprint() {
        let ca = CertificateAuthority::generate("kedge-ca").unwrap();
        let id = ca.issue_node("edge-3", Duration::from_secs(600)).unwrap();
        let info = node_cert_info(&id.cert_chain[0]).unwrap();
        assert_eq!(info.node, "edge-3");
        let lifetime = info.not_after.duration_since(info.not_before).unwrap();
        // Back-dated a tenth of the validity (at most five minutes) for clock skew.
        assert!(lifetime.as_secs().abs_diff(660) <= 2, "{lifetime:?}");
        let long = ca.issue_node("edge-3", Duration::from_secs(86400)).unwrap();
        let long = node_cert_info(&long.cert_chain[0]).unwrap();
        let lifetime = long.not_after.duration_since(long.not_before).unwrap();
        assert!(lifetime.as_secs().abs_diff(86700) <= 2, "{lifetime:?}");
        assert_eq!(info.fingerprint.len(), 64);
        assert_eq!(info.issuer, "kedge-ca");
        let other = ca.issue_node("edge-3", Duration::from_secs(600)).unwrap();
        assert_ne!(
            node_cert_info(&other.cert_chain[0]).unwrap().fingerprint,
            info.fingerprint
        );
    }

    #[test]
    fn ca_and_identity_survive_pem() {
        let ca = CertificateAuthority::generate("kedge-ca").unwrap();
        let (cert, key) = ca.to_pem();
        let again = CertificateAuthority::from_pem(&cert, &key).unwrap();
        assert_eq!(again.cert(), ca.cert());
        let id = again.issue_node("n1", Duration::from_secs(60)).unwrap();
        let (c, k) = id.to_pem();
        let back = Identity::from_pem(&c, &k).unwrap();
        assert_eq!(back.cert_chain, id.cert_chain);
        assert!(Identity::from_pem("garbage", &k).is_err());
        assert!(server_config(ca.cert(), &id).is_ok());
        // The cloud prefers ChaCha20-Poly1305 (small keys per connection) and keeps
        // AES-128-GCM, which QUIC's Initial packets need.
        let suites: Vec<_> = link_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            suites[0],
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert!(server_config(ca.cert(), &id).unwrap().ignore_client_order);
        assert!(client_config(ca.cert(), &id).is_ok());
    }
}
