//! The cluster's CA, cloudcore's server certificate, and bootstrap tokens.
//!
//! Files under `DATA_DIR/pki/`: `ca.crt`, `ca.key` (created on first start, mode 0600 for keys).
//! Tokens live as files under `DATA_DIR/tokens/` so that `cloudcore token create` works while
//! cloudcore runs (the store is locked by the running process). A token file holds the SHA-256
//! of the secret and the expiry, never the secret itself.
//!
//! Token format (printed by `token create`): `kedge1.<ca-sha256-hex>.<id>.<secret>`. The CA hash
//! pins the cluster like kubeadm's discovery hash: a joining node trusts a server only if the
//! server's CA certificate has that hash.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use transport::tls::{CertificateAuthority, CertificateDer, Identity};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] transport::tls::TlsError),
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename), mode 0600.
///
/// # Errors
/// [`PkiError::Io`] when the file cannot be written or renamed.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    // A name of this process's own: two processes writing the same file (cloudcore and
    // `cloudcore token create`) must not rename each other's temporary file away.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(io(&tmp))?;
        file.write_all(contents).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The CA of the data dir, created on first use.
pub fn load_or_create_ca(data_dir: &Path) -> Result<CertificateAuthority, PkiError> {
    let dir = data_dir.join("pki");
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    // One creator at a time (cloudcore starting while `cloudcore token create` runs on the
    // same data dir would otherwise make two CAs, or read one's key with the other's
    // certificate). An advisory lock, released by the kernel if its holder dies.
    let lock_path = dir.join(".ca.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&lock_path)(std::io::Error::last_os_error()));
        }
    }
    let _held = lock;
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if cert_path.exists() {
        let cert = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        return Ok(CertificateAuthority::from_pem(&cert, &key)?);
    }
    let ca = CertificateAuthority::generate("kedge-ca")?;
    let (cert, key) = ca.to_pem();
    write_private(&key_path, key.as_bytes())?;
    write_private(&cert_path, cert.as_bytes())?;
    Ok(ca)
}

/// The CAs nodes and the cloud trust: the signing CA (`pki/ca.crt`) first, then, during a
/// rollover, the other one (`pki/ca-next.crt` after [`ca_add`], `pki/ca-prev.crt` after
/// [`ca_switch`]).
///
/// # Errors
/// [`PkiError::Io`] or [`PkiError::Tls`] when a CA file cannot be read or parsed.
pub fn trust_bundle(data_dir: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let ca = load_or_create_ca(data_dir)?;
    let mut bundle = vec![ca.cert().clone()];
    let dir = data_dir.join("pki");
    for other in ["ca-next.crt", "ca-prev.crt"] {
        let path = dir.join(other);
        match fs::read_to_string(&path) {
            Ok(text) => bundle.push(transport::tls::cert_from_pem(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(bundle)
}

/// Where a CA rollover stands ([`ca_add`], [`ca_switch`], [`ca_finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollover {
    /// One CA.
    None,
    /// A next CA is trusted (and sent to nodes) but does not sign yet.
    Added,
    /// The new CA signs; the previous one is still trusted (nodes' certificates from it).
    Switched,
}

/// The rollover phase of the data dir.
pub fn rollover(data_dir: &Path) -> Rollover {
    let dir = data_dir.join("pki");
    if dir.join("ca-next.crt").exists() {
        Rollover::Added
    } else if dir.join("ca-prev.crt").exists() {
        Rollover::Switched
    } else {
        Rollover::None
    }
}

fn rollover_error(data_dir: &Path, message: &str) -> PkiError {
    PkiError::Corrupt {
        path: data_dir.join("pki"),
        message: message.to_owned(),
    }
}

/// Rollover step 1: makes the next CA (`pki/ca-next.{crt,key}`). From cloudcore's next start it
/// is trusted and sent to nodes over their links; the current CA still signs.
///
/// # Errors
/// A rollover is already under way; a file cannot be written.
pub fn ca_add(data_dir: &Path) -> Result<(), PkiError> {
    load_or_create_ca(data_dir)?;
    if rollover(data_dir) != Rollover::None {
        return Err(rollover_error(
            data_dir,
            "a CA rollover is already under way",
        ));
    }
    let dir = data_dir.join("pki");
    // A name of its own, so that certificates say which CA issued them.
    let next = CertificateAuthority::generate(&format!("kedge-ca-{}", now_unix()))?;
    let (cert, key) = next.to_pem();
    write_private(&dir.join("ca-next.key"), key.as_bytes())?;
    write_private(&dir.join("ca-next.crt"), cert.as_bytes())
}

/// Rollover step 2: the next CA becomes the signing CA (`pki/ca.{crt,key}`), the current one is
/// kept as `pki/ca-prev.crt` and still trusted. From cloudcore's next start the server's
/// certificate and every new node certificate come from the new CA. Run it once every node has
/// learned the new CA (its `pki/ca.crt` holds two certificates). Tokens made before pin the old
/// CA: make new ones. Interrupted, it can be run again.
///
/// # Errors
/// No rollover in step 1; a file cannot be written.
pub fn ca_switch(data_dir: &Path) -> Result<(), PkiError> {
    if rollover(data_dir) != Rollover::Added {
        return Err(rollover_error(
            data_dir,
            "no next CA: run `cloudcore ca add` first",
        ));
    }
    let dir = data_dir.join("pki");
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read(&path).map_err(io(&path))
    };
    let (cert, key, next_cert, next_key) = (
        read("ca.crt")?,
        read("ca.key")?,
        read("ca-next.crt")?,
        read("ca-next.key")?,
    );
    // Run again after an interruption, the first run's copy of the previous CA stands (the
    // current files may already be half the next CA's).
    if !dir.join("ca-prev.crt").exists() {
        write_private(&dir.join("ca-prev.key"), &key)?;
        write_private(&dir.join("ca-prev.crt"), &cert)?;
    }
    write_private(&dir.join("ca.key"), &next_key)?;
    write_private(&dir.join("ca.crt"), &next_cert)?;
    for name in ["ca-next.crt", "ca-next.key"] {
        let path = dir.join(name);
        fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// Rollover step 3: the previous CA is no longer trusted (`pki/ca-prev.*` removed). Run it once
/// every node renewed its certificate from the new CA (a node certificate lifetime after
/// step 2, or when `kedge_node_certificates_total{event="renewed"}` says so).
///
/// # Errors
/// No rollover in step 2; a file cannot be removed.
pub fn ca_finish(data_dir: &Path) -> Result<(), PkiError> {
    if rollover(data_dir) != Rollover::Switched {
        return Err(rollover_error(
            data_dir,
            "no previous CA: run `cloudcore ca add` and `cloudcore ca switch` first",
        ));
    }
    let dir = data_dir.join("pki");
    for name in ["ca-prev.crt", "ca-prev.key"] {
        let path = dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(())
}

/// The QUIC stateless-reset secret of this data dir, created on first use (see
/// `transport::ServerConfig::reset_key`).
pub fn load_or_create_reset_key(data_dir: &Path) -> Result<[u8; 32], PkiError> {
    let dir = data_dir.join("pki");
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join("quic-reset.key");
    if let Ok(bytes) = fs::read(&path) {
        return bytes.try_into().map_err(|_| PkiError::Corrupt {
            path: path.clone(),
            message: "expected 32 bytes".into(),
        });
    }
    let key: [u8; 32] = rand::random();
    write_private(&path, &key)?;
    Ok(key)
}

/// The name nodes expect in cloudcore's certificate.
pub const SERVER_NAME: &str = "cloudcore";

/// A fresh server identity for this process (nodes verify it against the CA, not the key).
pub fn server_identity(ca: &CertificateAuthority) -> Result<Identity, PkiError> {
    let names = vec![SERVER_NAME.to_owned(), "localhost".to_owned()];
    Ok(ca.issue_server(&names, Duration::from_secs(365 * 24 * 3600))?)
}

/// The pin a token carries: SHA-256 of the CA certificate (DER).
pub fn ca_pin(ca: &CertificateAuthority) -> String {
    sha256_hex(ca.cert().as_ref())
}

/// A token as stored: a file `tokens/ID.json` (`ID.used` once used), or a shared record
/// ([`SharedTokens`]: an etcd value, a cluster Secret; with `used`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub(crate) secret_sha256: String,
    pub(crate) expires_unix: u64,
    /// A one-use token: its first successful join consumes it (the file is renamed to
    /// `ID.used`).
    #[serde(default)]
    pub(crate) once: bool,
    /// Used up (etcd only; a file says it by its name).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) used: bool,
}

impl TokenRecord {
    /// A new record of a token with `secret`, valid for `ttl`.
    pub(crate) fn new(secret: &str, ttl: Duration, once: bool) -> Self {
        TokenRecord {
            secret_sha256: sha256_hex(secret.as_bytes()),
            expires_unix: now_unix() + ttl.as_secs(),
            once,
            used: false,
        }
    }

    /// Checks `token` against this record; whether it is a one-use token.
    pub(crate) fn check(&self, token: &Token, used: bool) -> Result<bool, TokenError> {
        let presented = sha256_hex(token.secret.as_bytes());
        let equal =
            subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), self.secret_sha256.as_bytes());
        if !bool::from(equal) {
            return Err(TokenError::Unknown);
        }
        if used || self.used {
            return Err(TokenError::Used);
        }
        if now_unix() >= self.expires_unix {
            return Err(TokenError::Expired);
        }
        Ok(self.once)
    }

    /// What `cloudcore token list` shows of it.
    pub(crate) fn info(&self, id: &str, used: bool) -> TokenInfo {
        TokenInfo {
            id: id.to_owned(),
            expires_unix: self.expires_unix,
            once: self.once,
            used: used || self.used,
        }
    }
}

/// A new token id and secret.
pub(crate) fn new_token_parts() -> (String, String) {
    (random_string(6), random_string(16))
}

/// The printed form of a token.
pub(crate) fn token_text(pin: &str, id: &str, secret: &str) -> String {
    format!("kedge1.{pin}.{id}.{secret}")
}

/// Where the cloud's bootstrap tokens live: files in the data dir (one cloudcore), or etcd
/// (several replicas on one etcd: a token made through any of them joins through any).
#[derive(Clone)]
pub enum Tokens {
    /// `DATA_DIR/tokens/`.
    Files(PathBuf),
    /// `PREFIX/tokens/` in etcd.
    Etcd(Arc<crate::etcd::EtcdTokens>),
    /// Secrets of the real cluster (`--kubeconfig`), and the data dir's tokens made before.
    Cluster {
        /// `DATA_DIR/tokens/`, looked up first.
        files: PathBuf,
        /// The cluster's token Secrets.
        cluster: Arc<crate::cluster_secrets::ClusterTokens>,
    },
}

impl Tokens {
    /// As [`verify_token`].
    ///
    /// # Errors
    /// As [`verify_token`].
    pub fn verify(&self, token: &Token) -> Result<bool, TokenError> {
        match self {
            Tokens::Files(dir) => verify_token(dir, token),
            Tokens::Etcd(etcd) => etcd.verify(token),
            Tokens::Cluster { files, cluster } => match verify_token(files, token) {
                Err(TokenError::Unknown) => cluster.verify(token),
                other => other,
            },
        }
    }

    /// As [`consume_token`].
    ///
    /// # Errors
    /// As [`consume_token`].
    pub fn consume(&self, token: &Token) -> Result<(), TokenError> {
        match self {
            Tokens::Files(dir) => consume_token(dir, token),
            Tokens::Etcd(etcd) => etcd.consume(token),
            Tokens::Cluster { files, cluster } => {
                if has_token_file(files, token) {
                    consume_token(files, token)
                } else {
                    cluster.consume(token)
                }
            }
        }
    }

    /// As [`restore_token`].
    pub fn restore(&self, token: &Token) {
        match self {
            Tokens::Files(dir) => restore_token(dir, token),
            Tokens::Etcd(etcd) => etcd.restore(token),
            Tokens::Cluster { files, cluster } => {
                if has_token_file(files, token) {
                    restore_token(files, token)
                } else {
                    cluster.restore(token)
                }
            }
        }
    }
}

/// Whether the data dir holds `token`'s record (valid or used).
fn has_token_file(data_dir: &Path, token: &Token) -> bool {
    let dir = data_dir.join("tokens");
    ["json", "used"]
        .iter()
        .any(|ext| dir.join(format!("{}.{ext}", token.id)).exists())
}

/// Token records shared by several cloudcores (etcd keys, the cluster's Secrets), each read
/// with a version and written back only if still at it: a one-use token is used up once
/// across replicas. Implementors give `read` and `write`; `verify`, `consume` and `restore`
/// follow [`verify_token`], [`consume_token`] and [`restore_token`].
pub(crate) trait SharedTokens {
    /// What a write compares (a revision, a resourceVersion).
    type Version;
    /// The token's record and its version; [`TokenError::Unknown`] when there is none or the
    /// store cannot be reached.
    fn read(&self, id: &str) -> Result<(TokenRecord, Self::Version), TokenError>;
    /// Writes `record` if the token is still at `version`; whether it was written.
    fn write(&self, id: &str, record: &TokenRecord, version: Self::Version) -> bool;

    /// As [`verify_token`].
    fn verify(&self, token: &Token) -> Result<bool, TokenError> {
        self.read(&token.id)?.0.check(token, false)
    }

    /// As [`consume_token`]: of joins racing on any replicas, one wins; [`TokenError::Used`]
    /// when another join used it first (or it is gone).
    fn consume(&self, token: &Token) -> Result<(), TokenError> {
        let (mut record, version) = self.read(&token.id).map_err(|_| TokenError::Used)?;
        if record.used {
            return Err(TokenError::Used);
        }
        record.used = true;
        if self.write(&token.id, &record, version) {
            Ok(())
        } else {
            Err(TokenError::Used)
        }
    }

    /// As [`restore_token`].
    fn restore(&self, token: &Token) {
        if let Ok((mut record, version)) = self.read(&token.id) {
            record.used = false;
            self.write(&token.id, &record, version);
        }
    }
}

fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Creates a token valid for `ttl` and returns its printed form.
///
/// # Errors
/// As [`create_token_with`].
pub fn create_token(data_dir: &Path, ttl: Duration) -> Result<String, PkiError> {
    create_token_with(data_dir, ttl, false)
}

/// Creates a token valid for `ttl`, for one join only if `once`, and returns its printed form
/// (`kedge1.<ca-sha256-hex>.<id>.<secret>`).
///
/// # Errors
/// [`PkiError::Io`] when the CA or the token file cannot be written.
pub fn create_token_with(data_dir: &Path, ttl: Duration, once: bool) -> Result<String, PkiError> {
    let ca = load_or_create_ca(data_dir)?;
    let dir = data_dir.join("tokens");
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let (id, secret) = new_token_parts();
    let record = TokenRecord::new(&secret, ttl, once);
    let path = dir.join(format!("{id}.json"));
    write_private(&path, &serde_json::to_vec(&record).expect("json"))?;
    Ok(token_text(&ca_pin(&ca), &id, &secret))
}

/// A token as `cloudcore token list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The token's id (the third part of its printed form).
    pub id: String,
    /// When it expires, unix seconds.
    pub expires_unix: u64,
    /// A one-use token.
    pub once: bool,
    /// A one-use token that was used.
    pub used: bool,
}

impl TokenInfo {
    /// `valid`, `expired` or `used`.
    pub fn state(&self) -> &'static str {
        if self.used {
            "used"
        } else if now_unix() >= self.expires_unix {
            "expired"
        } else {
            "valid"
        }
    }
}

/// The tokens of the data dir, by id.
///
/// # Errors
/// [`PkiError::Io`] when the tokens directory cannot be read (an absent one is no tokens).
pub fn list_tokens(data_dir: &Path) -> Result<Vec<TokenInfo>, PkiError> {
    let dir = data_dir.join("tokens");
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut tokens = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(&dir))?.path();
        let (Some(id), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let used = match ext {
            "json" => false,
            "used" => true,
            _ => continue,
        };
        let Ok(bytes) = fs::read(&path) else { continue };
        let Ok(record) = serde_json::from_slice::<TokenRecord>(&bytes) else {
            continue;
        };
        tokens.push(record.info(id, used));
    }
    tokens.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(tokens)
}

/// Deletes the token `id` (unused or used). Returns whether there was one.
///
/// # Errors
/// [`PkiError::Io`] when a token file exists and cannot be removed; [`PkiError::Corrupt`]
/// for an id that is not alphanumeric.
pub fn delete_token(data_dir: &Path, id: &str) -> Result<bool, PkiError> {
    let dir = data_dir.join("tokens");
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(PkiError::Corrupt {
            path: dir,
            message: format!("{id:?} is not a token id"),
        });
    }
    let mut found = false;
    for ext in ["json", "used"] {
        let path = dir.join(format!("{id}.{ext}"));
        match fs::remove_file(&path) {
            Ok(()) => found = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Ok(found)
}

/// A parsed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub ca_pin: String,
    pub id: String,
    pub secret: String,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the printed form.
    #[error("the token is not of the form kedge1.<ca-hash>.<id>.<secret>")]
    Malformed,
    /// No such token, or a wrong secret.
    #[error("unknown token")]
    Unknown,
    /// Past its expiry.
    #[error("the token expired")]
    Expired,
    /// A one-use token that a join used already.
    #[error("the token was for one join only and has been used")]
    Used,
}

impl Token {
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        match parts.as_slice() {
            ["kedge1", pin, id, secret]
                if pin.len() == 64
                    && !id.is_empty()
                    && !secret.is_empty()
                    && id.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Ok(Token {
                    ca_pin: (*pin).to_owned(),
                    id: (*id).to_owned(),
                    secret: (*secret).to_owned(),
                })
            }
            _ => Err(TokenError::Malformed),
        }
    }
}

/// Checks a token presented by a joining node against the token files. Returns whether it is
/// a one-use token (then [`consume_token`] before the join takes effect).
///
/// # Errors
/// [`TokenError::Unknown`] for no such token or a wrong secret, [`TokenError::Expired`],
/// [`TokenError::Used`] for a one-use token used already.
pub fn verify_token(data_dir: &Path, token: &Token) -> Result<bool, TokenError> {
    let dir = data_dir.join("tokens");
    let (bytes, used) = match fs::read(dir.join(format!("{}.json", token.id))) {
        Ok(bytes) => (bytes, false),
        Err(_) => (
            fs::read(dir.join(format!("{}.used", token.id))).map_err(|_| TokenError::Unknown)?,
            true,
        ),
    };
    let record: TokenRecord = serde_json::from_slice(&bytes).map_err(|_| TokenError::Unknown)?;
    record.check(token, used)
}

/// Uses up a one-use token (verified with [`verify_token`]): of joins racing with it, exactly
/// one succeeds (an atomic rename of `ID.json` to `ID.used`).
///
/// # Errors
/// [`TokenError::Used`] when another join used it first (or it was deleted).
pub fn consume_token(data_dir: &Path, token: &Token) -> Result<(), TokenError> {
    let dir = data_dir.join("tokens");
    fs::rename(
        dir.join(format!("{}.json", token.id)),
        dir.join(format!("{}.used", token.id)),
    )
    .map_err(|_| TokenError::Used)
}

/// Gives a consumed one-use token back (the join it was consumed for failed).
pub fn restore_token(data_dir: &Path, token: &Token) {
    let dir = data_dir.join("tokens");
    let _ = fs::rename(
        dir.join(format!("{}.used", token.id)),
        dir.join(format!("{}.json", token.id)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_creators_agree_on_one_ca() {
        // cloudcore starting while `cloudcore token create` runs: one CA, never a mix.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let pins: Vec<String> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..4)
                    .map(|_| scope.spawn(|| ca_pin(&load_or_create_ca(dir.path()).unwrap())))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(pins.windows(2).all(|w| w[0] == w[1]), "{pins:?}");
            assert_eq!(ca_pin(&load_or_create_ca(dir.path()).unwrap()), pins[0]);
        }
    }

    #[test]
    fn tokens_verify_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let printed = create_token(dir.path(), Duration::from_secs(3600)).unwrap();
        let token = Token::parse(&printed).unwrap();
        let ca = load_or_create_ca(dir.path()).unwrap();
        assert_eq!(token.ca_pin, ca_pin(&ca));
        assert_eq!(verify_token(dir.path(), &token), Ok(false));
        let mut wrong = token.clone();
        wrong.secret.push('x');
        assert_eq!(verify_token(dir.path(), &wrong), Err(TokenError::Unknown));
        let expired = Token::parse(&create_token(dir.path(), Duration::ZERO).unwrap()).unwrap();
        assert_eq!(verify_token(dir.path(), &expired), Err(TokenError::Expired));
        assert_eq!(Token::parse("nope"), Err(TokenError::Malformed));
    }

    #[test]
    fn a_ca_rollover_adds_switches_and_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_ca(dir.path()).unwrap().cert().clone();
        assert_eq!(trust_bundle(dir.path()).unwrap(), vec![first.clone()]);
        assert!(ca_switch(dir.path()).is_err());
        assert!(ca_finish(dir.path()).is_err());
        ca_add(dir.path()).unwrap();
        assert!(ca_add(dir.path()).is_err());
        assert_eq!(rollover(dir.path()), Rollover::Added);
        let bundle = trust_bundle(dir.path()).unwrap();
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[0], first, "the current CA signs until the switch");
        let next = bundle[1].clone();
        ca_switch(dir.path()).unwrap();
        assert_eq!(rollover(dir.path()), Rollover::Switched);
        assert_eq!(load_or_create_ca(dir.path()).unwrap().cert(), &next);
        assert_eq!(trust_bundle(dir.path()).unwrap(), vec![next.clone(), first]);
        ca_finish(dir.path()).unwrap();
        assert_eq!(rollover(dir.path()), Rollover::None);
        assert_eq!(trust_bundle(dir.path()).unwrap(), vec![next]);
    }

    #[test]
    fn one_use_tokens_are_consumed_once_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let once =
            Token::parse(&create_token_with(dir.path(), Duration::from_secs(3600), true).unwrap())
                .unwrap();
        let many =
            Token::parse(&create_token(dir.path(), Duration::from_secs(3600)).unwrap()).unwrap();
        assert_eq!(verify_token(dir.path(), &once), Ok(true));
        consume_token(dir.path(), &once).unwrap();
        assert_eq!(consume_token(dir.path(), &once), Err(TokenError::Used));
        assert_eq!(verify_token(dir.path(), &once), Err(TokenError::Used));
        let mut wrong = once.clone();
        wrong.secret.push('x');
        assert_eq!(verify_token(dir.path(), &wrong), Err(TokenError::Unknown));
        let listed = list_tokens(dir.path()).unwrap();
        assert_eq!(listed.len(), 2);
        let used = listed.iter().find(|t| t.id == once.id).unwrap();
        assert!(used.once && used.used && used.state() == "used");
        let other = listed.iter().find(|t| t.id == many.id).unwrap();
        assert!(!other.once && other.state() == "valid");
        restore_token(dir.path(), &once);
        assert_eq!(verify_token(dir.path(), &once), Ok(true));
        assert!(delete_token(dir.path(), &many.id).unwrap());
        assert!(!delete_token(dir.path(), &many.id).unwrap());
        assert_eq!(verify_token(dir.path(), &many), Err(TokenError::Unknown));
        assert!(delete_token(dir.path(), "../x").is_err());
        assert_eq!(list_tokens(dir.path()).unwrap().len(), 1);
    }
}
