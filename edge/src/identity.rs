//! The node's identity on disk: which node this data dir belongs to, the cloud's CA and the
//! node's certificate. The first start joins with a bootstrap token and writes them; later
//! starts read them and need no token.
//!
//! Files: `DATA_DIR/node-name`, `DATA_DIR/pki/{ca.crt,node.crt,node.key}` (keys mode 0600).

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use transport::tls::Identity;

/// What the node needs to connect to its cloud.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca: transport::tls::CertificateDer<'static>,
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
    node_name: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn paths(data_dir: &Path) -> Paths {
    let pki = data_dir.join("pki");
    Paths {
        node_name: data_dir.join("node-name"),
        ca: pki.join("ca.crt"),
        cert: pki.join("node.crt"),
        key: pki.join("node.key"),
    }
}

/// Reads the stored credentials, or joins with `token` when there are none.
pub async fn load_or_join(
    data_dir: &Path,
    node_name: &str,
    cloud: SocketAddr,
    token: Option<&str>,
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
        if paths.cert.exists() {
            return load(&paths);
        }
    }
    let Some(token) = token else {
        bail!(
            "node {node_name} has not joined yet: pass --token (from `cloudcore token create`) \
             for the first start"
        );
    };
    let pin = parse_pin(token)?;
    let joined = transport::join(
        cloud,
        CLOUD_SERVER_NAME,
        pin,
        node_name,
        token.trim(),
        Duration::from_secs(15),
    )
    .await
    .context("joining the cloud")?;
    write_file(&paths.node_name, node_name.as_bytes(), false)?;
    let ca_pem = transport::tls::cert_to_pem(&joined.ca);
    let (cert, key) = joined.identity.to_pem();
    write_file(&paths.ca, ca_pem.as_bytes(), false)?;
    write_file(&paths.key, key.as_bytes(), true)?;
    // The certificate last: its presence means the join completed.
    write_file(&paths.cert, cert.as_bytes(), false)?;
    tracing::info!(node = node_name, "joined the cloud; certificate stored");
    Ok(Credentials {
        ca: joined.ca,
        identity: joined.identity,
    })
}

fn load(paths: &Paths) -> anyhow::Result<Credentials> {
    let read =
        |p: &Path| fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
    let identity = Identity::from_pem(&read(&paths.cert)?, &read(&paths.key)?)
        .with_context(|| format!("{}", paths.cert.display()))?;
    let ca_pem = read(&paths.ca)?;
    let ca = transport::tls::cert_from_pem(&ca_pem)
        .with_context(|| format!("{}", paths.ca.display()))?;
    Ok(Credentials { ca, identity })
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
