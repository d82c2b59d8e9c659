//! The node's identity on disk: which node this data dir belongs to, the cloud's CA and the
//! node's certificate. The first start joins with a bootstrap token and writes them; later
//! starts read them and need no token.
//!
//! Files: `DATA_DIR/node-name`, `DATA_DIR/pki/{ca.crt,node.crt,node.key}` (keys mode 0600).
//!
//! The node renews its certificate by itself ([`run_rotation`]) at two thirds of its lifetime:
//! a new key and a CSR, signed by the cloud over the link (or, when the certificate expired
//! while the node was offline, on a renewal connection that the cloud allows within its grace
//! window). The new pair replaces the old one crash-safely: `node.key.new` and then
//! `node.crt.new` are written and fsynced, then renamed over `node.key` and `node.crt`; a
//! start that finds `node.crt.new` completes the renames (the pair was complete), one that
//! finds only `node.key.new` drops it (the old pair is intact).

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use transport::backoff::{Backoff, BackoffConfig};
use transport::renew::RenewError;
use transport::tls::Identity;
use transport::LinkHandle;

/// What the node needs to connect to its cloud.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The CAs the node trusts (`pki/ca.crt`, a PEM bundle: two during a CA rollover).
    pub cas: Vec<transport::tls::CertificateDer<'static>>,
    pub identity: Identity,
}

/// The name cloudcore's certificate carries.
pub const CLOUD_SERVER_NAME: &str = "cloudcore";

fn write_file(path: &Path, contents: &[u8], private: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

struct Paths {
    pki: PathBuf,
    node_name: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cert_new: PathBuf,
    key_new: PathBuf,
}

fn paths(data_dir: &Path) -> Paths {
    let pki = data_dir.join("pki");
    Paths {
        node_name: data_dir.join("node-name"),
        ca: pki.join("ca.crt"),
        cert: pki.join("node.crt"),
        key: pki.join("node.key"),
        cert_new: pki.join("node.crt.new"),
        key_new: pki.join("node.key.new"),
        pki,
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Completes or drops a replacement of the key pair that a crash interrupted (see the module
/// docs).
fn recover_pair(paths: &Paths) -> anyhow::Result<()> {
    if paths.cert_new.exists() {
        if paths.key_new.exists() {
            fs::rename(&paths.key_new, &paths.key)
                .with_context(|| format!("cannot write {}", paths.key.display()))?;
        }
        fs::rename(&paths.cert_new, &paths.cert)
            .with_context(|| format!("cannot write {}", paths.cert.display()))?;
        sync_dir(&paths.pki)?;
        tracing::info!("completed a certificate replacement that a stop interrupted");
    } else if paths.key_new.exists() {
        fs::remove_file(&paths.key_new)
            .with_context(|| format!("cannot remove {}", paths.key_new.display()))?;
    }
    Ok(())
}

/// Replaces the node's key and certificate crash-safely (see the module docs).
fn store_pair(paths: &Paths, identity: &Identity) -> anyhow::Result<()> {
    let (cert, key) = identity.to_pem();
    write_file(&paths.key_new, key.as_bytes(), true)?;
    // The certificate last: its presence means the pair is complete.
    write_file(&paths.cert_new, cert.as_bytes(), false)?;
    sync_dir(&paths.pki)?;
    fs::rename(&paths.key_new, &paths.key)
        .with_context(|| format!("cannot write {}", paths.key.display()))?;
    fs::rename(&paths.cert_new, &paths.cert)
        .with_context(|| format!("cannot write {}", paths.cert.display()))?;
    sync_dir(&paths.pki)
}

/// Stores a renewed identity in `data_dir` (crash-safe; the next start uses it).
///
/// # Errors
/// A file could not be written, synced or renamed.
pub fn store_renewed(data_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    store_pair(&paths(data_dir), identity)
}

/// Reads the stored credentials, or joins with `token` when there are none (or when `rejoin`:
/// the stored certificate is replaced by a new join, for a node the cloud revoked or refuses
/// as expired beyond its grace window).
///
/// # Errors
/// The data dir belongs to another node; there are no credentials and no token (or `rejoin`
/// without a token); the join failed; the files cannot be read or written.
pub async fn load_or_join(
    data_dir: &Path,
    node_name: &str,
    clouds: &[SocketAddr],
    token: Option<&str>,
    rejoin: bool,
) -> anyhow::Result<Credentials> {
    transport::tls::validate_node_name(node_name)
        .map_err(|e| anyhow::anyhow!("--node-name: {e}"))?;
    fs::create_dir_all(data_dir.join("pki"))
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    let paths = paths(data_dir);
    if let Ok(owner) = fs::read_to_string(&paths.node_name) {
        let owner = owner.trim();
        if owner != node_name {
            bail!(
                "the data dir {} belongs to node {owner:?}, not {node_name:?}; use that node's \
                 name or another data dir",
                data_dir.display()
            );
        }
        recover_pair(&paths)?;
        if paths.cert.exists() && !rejoin {
            return load(&paths);
        }
    }
    if rejoin && token.is_none() {
        bail!("--rejoin needs --token (a new bootstrap token from `cloudcore token create`)");
    }
    let Some(token) = token else {
        bail!(
            "node {node_name} has not joined yet: pass --token (from `cloudcore token create`) \
             for the first start"
        );
    };
    let pin = parse_pin(token)?;
    // Any replica of the cloud can take the join; the first that answers does.
    let mut failure = None;
    let mut joined = None;
    for &cloud in clouds {
        match transport::join(
            cloud,
            CLOUD_SERVER_NAME,
            pin,
            node_name,
            token.trim(),
            Duration::from_secs(15),
        )
        .await
        {
            Ok(ok) => {
                joined = Some(ok);
                break;
            }
            Err(e) => {
                tracing::warn!(%cloud, error = %e, "joining through this replica failed");
                failure = Some(e);
            }
        }
    }
    let joined = match (joined, failure) {
        (Some(joined), _) => joined,
        (None, Some(e)) => return Err(anyhow::Error::from(e).context("joining the cloud")),
        (None, None) => bail!("no cloud address to join"),
    };
    write_file(&paths.node_name, node_name.as_bytes(), false)?;
    let ca_pem = transport::tls::cert_to_pem(&joined.ca);
    write_file(&paths.ca, ca_pem.as_bytes(), false)?;
    // The certificate last: its presence means the join completed.
    store_pair(&paths, &joined.identity)?;
    tracing::info!(node = node_name, "joined the cloud; certificate stored");
    Ok(Credentials {
        cas: vec![joined.ca],
        identity: joined.identity,
    })
}

fn load(paths: &Paths) -> anyhow::Result<Credentials> {
    let read =
        |p: &Path| fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let identity = Identity::from_pem(&read(&paths.cert)?, &read(&paths.key)?)
        .with_context(|| format!("{}", paths.cert.display()))?;
    let ca_pem = read(&paths.ca)?;
    let cas = transport::tls::certs_from_pem(&ca_pem)
        .with_context(|| format!("{}", paths.ca.display()))?;
    Ok(Credentials { cas, identity })
}

/// How often the node checks for a new connection to ask the cloud for its trust bundle.
const TRUST_CHECK: Duration = Duration::from_secs(1);

/// Keeps the node's trust bundle (`pki/ca.crt`) what the cloud says it is: asked once per new
/// connection of `link`; a different bundle (a CA rollover's next CA added, or its previous
/// one dropped) is stored (atomically) and put into `credentials` for the next connection.
pub async fn run_trust_sync(
    data_dir: PathBuf,
    node: String,
    credentials: Arc<transport::Credentials>,
    link: LinkHandle,
    shutdown: CancellationToken,
) {
    let mut synced_on: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRUST_CHECK) => {}
            _ = shutdown.cancelled() => return,
        }
        let connection = link.counters().connections;
        if synced_on == Some(connection) || !link.is_connected() {
            continue;
        }
        match transport::renew::fetch_trust_bundle(&link, &node, RENEW_TIMEOUT).await {
            Ok(bundle) => {
                synced_on = Some(connection);
                if bundle == credentials.get().0 {
                    continue;
                }
                let pem: String = bundle.iter().map(transport::tls::cert_to_pem).collect();
                let path = paths(&data_dir).ca;
                match write_file(&path, pem.as_bytes(), false) {
                    Ok(()) => {
                        tracing::info!(cas = bundle.len(), "the cloud's trust bundle changed (CA rollover); stored, used from the next connection");
                        credentials.replace_roots(bundle);
                    }
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "cannot store the trust bundle")
                    }
                }
            }
            // An older cloud answers no such request: nothing to learn from it.
            Err(e) => tracing::debug!(error = %e, "trust bundle not fetched"),
        }
    }
}

/// How long one renewal attempt may take.
const RENEW_TIMEOUT: Duration = Duration::from_secs(15);

/// Delays between renewal attempts: up to a tenth of the certificate's lifetime, between one
/// second and five minutes (a certificate of seconds in a test retries within a second).
fn retry_backoff(lifetime: Duration) -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(500),
        max: (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(300)),
        multiplier: 2.0,
    }
}

/// Renews the node's certificate at two thirds of its lifetime, for as long as edgecore runs:
/// over `link` while it is connected; with the expired certificate on a renewal connection
/// once it has expired (the cloud allows that within its grace window). Each new pair is
/// stored crash-safely in `data_dir` and put into `credentials`, so the link's next
/// connection uses it; the connection that is up keeps its certificate (still valid: the old
/// one works until it expires). Failed attempts are retried with backoff; a node offline
/// waits for its link.
pub async fn run_rotation(
    data_dir: PathBuf,
    node: String,
    cloud: SocketAddr,
    credentials: Arc<transport::Credentials>,
    link: LinkHandle,
    shutdown: CancellationToken,
) {
    let mut backoff: Option<Backoff> = None;
    loop {
        let (cas, identity) = credentials.get();
        let Some(info) = identity
            .cert_chain
            .first()
            .and_then(|c| transport::tls::node_cert_info(c).ok())
        else {
            tracing::error!("the node certificate does not parse; it cannot be renewed");
            shutdown.cancelled().await;
            return;
        };
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        let due = transport::tls::renewal_due(info.not_before, info.not_after);
        // Slept in bounded steps: the wall clock may jump (suspend, NTP) meanwhile.
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(600));
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        }
        let expired = SystemTime::now() > info.not_after;
        let connected = link.is_connected();
        let result = if connected || !expired {
            if !connected {
                // Offline: nothing to try until the link is back (a local check, no backoff).
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            renew(&node, |csr| async {
                transport::renew::renew_over_link(&link, &node, csr, RENEW_TIMEOUT).await
            })
            .await
        } else {
            renew(&node, |csr| {
                let (cas, identity, node) = (&cas, &identity, &node);
                async move {
                    transport::renew::renew_expired(
                        cloud,
                        CLOUD_SERVER_NAME,
                        cas,
                        identity,
                        node,
                        csr,
                        RENEW_TIMEOUT,
                    )
                    .await
                }
            })
            .await
        };
        let failure = match result {
            Ok(renewed) => match store_renewed(&data_dir, &renewed) {
                Ok(()) => {
                    let until = renewed
                        .cert_chain
                        .first()
                        .and_then(|c| transport::tls::node_cert_info(c).ok())
                        .map(|i| humantime::format_rfc3339_seconds(i.not_after).to_string())
                        .unwrap_or_default();
                    credentials.replace(renewed);
                    backoff = None;
                    tracing::info!(%until, expired, "node certificate renewed; used from the next connection");
                    continue;
                }
                Err(e) => format!("cannot store the renewed certificate: {e:#}"),
            },
            Err(RenewError::Refused(reason)) => {
                tracing::error!("the cloud refused to renew this node's certificate: {reason}");
                reason
            }
            Err(e) => e.to_string(),
        };
        let delay = backoff
            .get_or_insert_with(|| Backoff::new(retry_backoff(lifetime)))
            .next_delay();
        tracing::warn!(
            "certificate renewal failed: {failure}; retrying in {} ms",
            delay.as_millis()
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One renewal: a new key and CSR, `ask` the cloud, the new identity.
async fn renew<F, Fut>(node: &str, ask: F) -> Result<Identity, RenewError>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<transport::tls::CertificateDer<'static>, RenewError>>,
{
    let (key, csr) = transport::tls::node_csr(node)?;
    let cert = ask(csr).await?;
    Ok(Identity {
        cert_chain: vec![cert],
        key,
    })
}

/// The CA hash a token pins: `kedge1.<sha256 hex>.<id>.<secret>`.
pub fn parse_pin(token: &str) -> anyhow::Result<[u8; 32]> {
    let malformed =
        || anyhow::anyhow!("the token is not of the form kedge1.<ca-hash>.<id>.<secret>");
    let mut parts = token.trim().split('.');
    if parts.next() != Some("kedge1") {
        return Err(malformed());
    }
    let hex = parts.next().ok_or_else(malformed)?;
    // ASCII first: the byte slicing below must not split a character of a mistyped token.
    if hex.len() != 64 || !hex.is_ascii() || parts.count() != 2 {
        return Err(malformed());
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
    }
    Ok(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(ca: &transport::CertificateAuthority) -> Identity {
        ca.issue_node("edge-1", Duration::from_secs(60)).unwrap()
    }

    #[test]
    fn an_interrupted_replacement_rolls_forward_or_back() {
        let ca = transport::CertificateAuthority::generate("kedge-ca").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        fs::create_dir_all(&paths.pki).unwrap();
        let old = identity(&ca);
        store_pair(&paths, &old).unwrap();
        assert!(!paths.cert_new.exists() && !paths.key_new.exists());
        let read = |paths: &Paths| {
            Identity::from_pem(
                &fs::read_to_string(&paths.cert).unwrap(),
                &fs::read_to_string(&paths.key).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(read(&paths).cert_chain, old.cert_chain);

        // Stopped after the new key only: the old pair stays.
        let new = identity(&ca);
        let (cert, key) = new.to_pem();
        write_file(&paths.key_new, key.as_bytes(), true).unwrap();
        recover_pair(&paths).unwrap();
        assert_eq!(read(&paths).cert_chain, old.cert_chain);
        assert!(!paths.key_new.exists());

        // Stopped after both new files, or after the key's rename: the new pair.
        for renamed_key in [false, true] {
            store_pair(&paths, &old).unwrap();
            write_file(&paths.key_new, key.as_bytes(), true).unwrap();
            write_file(&paths.cert_new, cert.as_bytes(), false).unwrap();
            if renamed_key {
                fs::rename(&paths.key_new, &paths.key).unwrap();
            }
            recover_pair(&paths).unwrap();
            let got = read(&paths);
            assert_eq!(got.cert_chain, new.cert_chain);
            assert_eq!(got.key.secret_der(), new.key.secret_der());
            assert!(!paths.cert_new.exists() && !paths.key_new.exists());
        }
    }

    #[test]
    fn renewal_retries_scale_with_the_lifetime() {
        assert_eq!(
            retry_backoff(Duration::from_secs(6)).max,
            Duration::from_secs(1)
        );
        assert_eq!(
            retry_backoff(Duration::from_secs(600)).max,
            Duration::from_secs(60)
        );
        assert_eq!(
            retry_backoff(Duration::from_secs(90 * 24 * 3600)).max,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn pins_parse_from_tokens() {
        let token = format!("kedge1.{}.abc123.secret", "ab".repeat(32));
        assert_eq!(parse_pin(&token).unwrap(), [0xab; 32]);
        assert!(parse_pin("kedge1.zz.abc.secret").is_err());
        assert!(parse_pin("garbage").is_err());
        let multibyte = format!("kedge1.{}é.abc.secret", "a".repeat(62));
        assert!(parse_pin(&multibyte).is_err());
    }
}
