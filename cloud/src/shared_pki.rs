//! The cluster CA of several cloudcores, shared through a store they all reach, and its
//! rollover: etcd (`--store etcd`, [`EtcdPki`]) or the real cluster (`--kubeconfig`,
//! [`crate::cluster_secrets::ClusterPki`], a Secret as KubeEdge's `casecret`).
//!
//! The shared store holds the cluster's PKI as the files a data dir's `pki/` holds ([`FILES`]):
//! the signing CA, and during a rollover the next or the previous one (see
//! [`crate::pki::ca_add`]). It is the truth; each replica copies it into its data dir when it
//! starts ([`share_ca`]), so a rollover step takes effect at each replica's next start, as with
//! one cloudcore: restart the replicas one by one after each step.
//!
//! `cloudcore ca add|switch|finish --store etcd` (or `--kubeconfig`) ([`ca_step`]) runs the same
//! step as on a data dir, on a copy of the shared files in a temporary directory, and writes the
//! result back if nothing changed meanwhile (one etcd transaction comparing every file's
//! revision; the Secret's resourceVersion): two steps racing, one fails and says so.
//!
//! The CA's key is then in the shared store: protect it as the cluster's trust root (etcd's TLS
//! and client certificates; RBAC on the Secret), as K3s does with its bootstrap data.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::etcd::{connect, connect_retrying, read_key, send_txn, EtcdConfig};
use crate::pki::PkiError;

/// The PKI files shared through etcd (names as in a data dir's `pki/`).
pub const FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "ca-next.crt",
    "ca-next.key",
    "ca-prev.crt",
    "ca-prev.key",
];

/// The certificates among [`FILES`] (one CA each).
const CERTS: [&str; 3] = ["ca.crt", "ca-next.crt", "ca-prev.crt"];

/// The PKI files by name (those of [`FILES`] that exist).
pub type Files = BTreeMap<&'static str, Vec<u8>>;

/// A store the replicas share the PKI through, with compare-and-swap.
pub trait PkiBackend {
    /// What a write compares: the files' version(s) as read.
    type Version: Send;
    /// Where the PKI lives, for messages (`etcd`, `the cluster's Secret kube-system/kedge-ca`).
    fn describe(&self) -> String;
    /// The shared files and their version.
    fn read(
        &self,
    ) -> impl std::future::Future<Output = anyhow::Result<(Files, Self::Version)>> + Send;
    /// Makes the shared files exactly `files` if they are still at `version`; `false` when
    /// another write came first.
    fn write(
        &self,
        version: Self::Version,
        files: &Files,
    ) -> impl std::future::Future<Output = anyhow::Result<bool>> + Send;
}

/// The PKI in etcd: `PREFIX` + `pki/` + each file's name.
pub struct EtcdPki {
    client: Client,
    prefix: String,
}

impl EtcdPki {
    /// Connects to etcd (once, or until it answers with `retrying`).
    ///
    /// # Errors
    /// etcd cannot be reached (without `retrying`).
    pub async fn connect(config: &EtcdConfig, retrying: bool) -> anyhow::Result<EtcdPki> {
        let client = if retrying {
            connect_retrying(config).await
        } else {
            connect(config).await?
        };
        Ok(EtcdPki {
            client,
            prefix: config.prefix.clone(),
        })
    }
}

impl PkiBackend for EtcdPki {
    /// Each file's `mod_revision` (0: absent).
    type Version = BTreeMap<&'static str, i64>;

    fn describe(&self) -> String {
        "etcd".into()
    }

    async fn read(&self) -> anyhow::Result<(Files, Self::Version)> {
        let got = read_key(
            &self.client,
            &key(&self.prefix, ""),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .context("reading the cluster CA from etcd")?;
        let (mut files, mut versions) = (Files::new(), BTreeMap::new());
        for kv in got.kvs() {
            let name = kv.key_str().unwrap_or("").rsplit('/').next().unwrap_or("");
            if let Some(name) = FILES.iter().find(|f| **f == name) {
                files.insert(*name, kv.value().to_vec());
                versions.insert(*name, kv.mod_revision());
            }
        }
        Ok((files, versions))
    }

    async fn write(&self, version: Self::Version, files: &Files) -> anyhow::Result<bool> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for name in FILES {
            let k = key(&self.prefix, name);
            compares.push(match version.get(name) {
                Some(revision) => Compare::mod_revision(k.clone(), CompareOp::Equal, *revision),
                None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            });
            match files.get(name) {
                Some(bytes) => ops.push(TxnOp::put(k, bytes.clone(), None)),
                None if version.contains_key(name) => ops.push(TxnOp::delete(k, None)),
                None => {}
            }
        }
        let txn = Txn::new().when(compares).and_then(ops);
        Ok(send_txn(&self.client, &txn).await?.succeeded())
    }
}

fn key(prefix: &str, name: &str) -> Vec<u8> {
    format!("{prefix}pki/{name}").into_bytes()
}

/// The PKI files of `data_dir/pki` that exist.
fn read_dir(data_dir: &Path) -> anyhow::Result<Files> {
    let mut files = Files::new();
    for name in FILES {
        let path = data_dir.join("pki").join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                files.insert(name, bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    Ok(files)
}

/// Makes `data_dir/pki`'s files `files` (files it lacks are removed). Keys are written before
/// certificates, so an interrupted copy never pairs a new certificate with an old key; the
/// next start copies again.
fn write_dir(data_dir: &Path, files: &Files) -> anyhow::Result<()> {
    let dir = data_dir.join("pki");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let keys_first = FILES.iter().filter(|f| f.ends_with(".key"));
    for name in keys_first.chain(FILES.iter().filter(|f| f.ends_with(".crt"))) {
        let path = dir.join(name);
        match files.get(name) {
            Some(bytes) => {
                if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
                    crate::pki::write_private(&path, bytes)?;
                }
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            },
        }
    }
    Ok(())
}

/// Makes this replica's PKI the shared one (see the module's docs). The first replica
/// publishes its CA (created if the data dir has none); a replica whose data dir has no CA
/// takes the shared one; one whose signing CA is none of the shared CAs (signing, next or
/// previous) refuses to start (kubeedge#5922: two cloudcores with different CAs on one
/// cluster). A replica whose CA is one of them follows the shared files: that is a rollover
/// step taken while it was stopped.
///
/// # Errors
/// The shared store cannot be reached, a file cannot be read or written, or the CAs differ.
pub async fn share_ca(backend: &impl PkiBackend, data_dir: &Path) -> anyhow::Result<()> {
    let cert_path = data_dir.join("pki/ca.crt");
    let had_local = cert_path.exists();
    for _ in 0..3 {
        let (shared, version) = backend.read().await?;
        if let Some(cluster_ca) = shared.get("ca.crt") {
            let local = std::fs::read(&cert_path).ok();
            if let Some(local) = local.filter(|_| had_local) {
                let known = CERTS.iter().any(|c| shared.get(c) == Some(&local));
                anyhow::ensure!(
                    known,
                    "this replica's CA ({}, sha256 {}) is not the cluster's CA in {} (sha256 {}): \
                     replicas with different CAs cannot serve one fleet. Move {} away to take the \
                     cluster's CA",
                    cert_path.display(),
                    crate::pki::sha256_hex(&local),
                    backend.describe(),
                    crate::pki::sha256_hex(cluster_ca),
                    data_dir.join("pki").display()
                );
            }
            anyhow::ensure!(
                shared.contains_key("ca.key"),
                "{} holds the cluster CA's certificate but not its key",
                backend.describe()
            );
            write_dir(data_dir, &shared)?;
            tracing::info!(sha256 = %crate::pki::sha256_hex(cluster_ca), phase = ?crate::pki::rollover(data_dir), from = %backend.describe(), "took the cluster CA");
            return Ok(());
        }
        crate::pki::load_or_create_ca(data_dir)?;
        let local = read_dir(data_dir)?;
        // Never publish a PKI without its CA (the files just made were removed meanwhile).
        let Some(cert) = local.get("ca.crt").filter(|_| local.contains_key("ca.key")) else {
            anyhow::bail!("{} holds no CA to publish", data_dir.join("pki").display());
        };
        if backend.write(version, &local).await? {
            tracing::info!(sha256 = %crate::pki::sha256_hex(cert), to = %backend.describe(), "published this replica's CA as the cluster CA");
            return Ok(());
        }
        // Another replica published first: take its CA (ours was only just made) or refuse.
    }
    anyhow::bail!(
        "could not agree on the cluster CA in {}",
        backend.describe()
    )
}

/// A rollover step on a data dir ([`crate::pki::ca_add`], ...).
pub type Step = fn(&Path) -> Result<(), PkiError>;

/// `cloudcore ca add|switch|finish|status --store etcd` (or `--kubeconfig`): runs `step` (one
/// of [`crate::pki::ca_add`], [`crate::pki::ca_switch`], [`crate::pki::ca_finish`], or nothing
/// for status) on a copy of the shared PKI and writes the result back. Returns the copy after
/// the step, for the caller to show ([`crate::pki::rollover`], [`crate::pki::trust_bundle`]);
/// it is removed when dropped.
///
/// # Errors
/// The shared store cannot be reached or holds no CA yet, the step refuses (the phase is
/// wrong), or another change of the CA raced with this one.
pub async fn ca_step(
    backend: &impl PkiBackend,
    step: Option<Step>,
) -> anyhow::Result<tempfile::TempDir> {
    let (before, version) = backend.read().await?;
    anyhow::ensure!(
        before.contains_key("ca.crt") && before.contains_key("ca.key"),
        "{} holds no cluster CA yet: start a cloudcore on it first",
        backend.describe()
    );
    let copy = tempfile::tempdir().context("cannot make a temporary directory")?;
    write_dir(copy.path(), &before)?;
    if let Some(step) = step {
        step(copy.path())?;
        let after = read_dir(copy.path())?;
        anyhow::ensure!(
            backend.write(version, &after).await?,
            "the cluster CA in {} changed while this step ran: run it again",
            backend.describe()
        );
    }
    Ok(copy)
}
