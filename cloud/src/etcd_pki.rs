//! The cluster CA of several cloudcores on one etcd, and its rollover.
//!
//! etcd holds the cluster's PKI as the files a data dir's `pki/` holds ([`FILES`], under
//! `PREFIX` + `pki/`): the signing CA, and during a rollover the next or the previous one
//! (see [`crate::pki::ca_add`]). etcd is the truth; each replica copies it into its data dir
//! when it starts ([`share_ca`]), so a rollover step takes effect at each replica's next start,
//! as with one cloudcore: restart the replicas one by one after each step.
//!
//! `cloudcore ca add|switch|finish --store etcd` ([`ca_step`]) runs the same step as on a data
//! dir, on a copy of etcd's files in a temporary directory, and writes the result back in one
//! etcd transaction that compares every file's revision: two steps racing, one fails and says
//! so.
//!
//! The CA's key is in etcd: protect etcd as the cluster's trust root (TLS, client
//! certificates), as K3s does with its bootstrap data.

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

/// etcd's PKI files as read at one revision: name → (contents, mod_revision).
type Snapshot = BTreeMap<&'static str, (Vec<u8>, i64)>;

fn key(prefix: &str, name: &str) -> Vec<u8> {
    format!("{prefix}pki/{name}").into_bytes()
}

/// The PKI files in etcd.
async fn read(client: &Client, prefix: &str) -> anyhow::Result<Snapshot> {
    let got = read_key(
        client,
        &key(prefix, ""),
        Some(GetOptions::new().with_prefix()),
    )
    .await
    .context("reading the cluster CA from etcd")?;
    let mut files = Snapshot::new();
    for kv in got.kvs() {
        let name = kv.key_str().unwrap_or("").rsplit('/').next().unwrap_or("");
        if let Some(name) = FILES.iter().find(|f| **f == name) {
            files.insert(name, (kv.value().to_vec(), kv.mod_revision()));
        }
    }
    Ok(files)
}

/// The PKI files of `data_dir/pki` that exist.
fn read_dir(data_dir: &Path) -> anyhow::Result<BTreeMap<&'static str, Vec<u8>>> {
    let mut files = BTreeMap::new();
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

/// Makes `data_dir/pki`'s files those of `snapshot` (files it lacks are removed). Keys are
/// written before certificates, so an interrupted copy never pairs a new certificate with an
/// old key; the next start copies again.
fn write_dir(data_dir: &Path, snapshot: &Snapshot) -> anyhow::Result<()> {
    let dir = data_dir.join("pki");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let keys_first = FILES.iter().filter(|f| f.ends_with(".key"));
    for name in keys_first.chain(FILES.iter().filter(|f| f.ends_with(".crt"))) {
        let path = dir.join(name);
        match snapshot.get(name) {
            Some((bytes, _)) => {
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

/// The transaction that turns `before` (as read) into `after`, if no file changed meanwhile.
fn transaction(prefix: &str, before: &Snapshot, after: &BTreeMap<&'static str, Vec<u8>>) -> Txn {
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for name in FILES {
        let k = key(prefix, name);
        match before.get(name) {
            Some((_, revision)) => compares.push(Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                *revision,
            )),
            None => compares.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0)),
        }
        match (before.get(name), after.get(name)) {
            (Some((old, _)), Some(new)) if old == new => {}
            (_, Some(new)) => ops.push(TxnOp::put(k, new.clone(), None)),
            (Some(_), None) => ops.push(TxnOp::delete(k, None)),
            (None, None) => {}
        }
    }
    Txn::new().when(compares).and_then(ops)
}

/// Makes this replica's PKI etcd's (see the module's docs). The first replica publishes its
/// CA (created if the data dir has none); a replica whose data dir has no CA takes etcd's;
/// one whose signing CA is none of etcd's CAs (signing, next or previous) refuses to start
/// (kubeedge#5922: two cloudcores with different CAs on one cluster). A replica whose CA is
/// one of them follows etcd: that is a rollover step taken while it was stopped.
///
/// # Errors
/// etcd cannot be reached, a file cannot be read or written, or the CAs differ.
pub async fn share_ca(config: &EtcdConfig, data_dir: &Path) -> anyhow::Result<()> {
    let client = connect_retrying(config).await;
    let cert_path = data_dir.join("pki/ca.crt");
    let had_local = cert_path.exists();
    for _ in 0..3 {
        let shared = read(&client, &config.prefix).await?;
        if let Some((cluster_ca, _)) = shared.get("ca.crt") {
            let local = std::fs::read(&cert_path).ok();
            if let Some(local) = local.filter(|_| had_local) {
                let known = CERTS
                    .iter()
                    .any(|c| shared.get(c).is_some_and(|(ca, _)| *ca == local));
                anyhow::ensure!(
                    known,
                    "this replica's CA ({}, sha256 {}) is not the cluster's CA in etcd (sha256 {}): \
                     replicas with different CAs cannot serve one fleet. Move {} away to take the \
                     cluster's CA",
                    cert_path.display(),
                    crate::pki::sha256_hex(&local),
                    crate::pki::sha256_hex(cluster_ca),
                    data_dir.join("pki").display()
                );
            }
            anyhow::ensure!(
                shared.contains_key("ca.key"),
                "etcd holds the cluster CA's certificate but not its key"
            );
            write_dir(data_dir, &shared)?;
            tracing::info!(sha256 = %crate::pki::sha256_hex(cluster_ca), phase = ?crate::pki::rollover(data_dir), "took the cluster CA from etcd");
            return Ok(());
        }
        crate::pki::load_or_create_ca(data_dir)?;
        let local = read_dir(data_dir)?;
        let txn = transaction(&config.prefix, &shared, &local);
        if send_txn(&client, &txn).await?.succeeded() {
            let cert = &local["ca.crt"];
            tracing::info!(sha256 = %crate::pki::sha256_hex(cert), "published this replica's CA as the cluster CA in etcd");
            return Ok(());
        }
        // Another replica published first: take its CA (ours was only just made) or refuse.
    }
    anyhow::bail!("could not agree on the cluster CA in etcd")
}

/// A rollover step on a data dir ([`crate::pki::ca_add`], ...).
pub type Step = fn(&Path) -> Result<(), PkiError>;

/// `cloudcore ca add|switch|finish|status --store etcd`: runs `step` (one of
/// [`crate::pki::ca_add`], [`crate::pki::ca_switch`], [`crate::pki::ca_finish`], or nothing
/// for status) on a copy of etcd's PKI and writes the result back. Returns the copy after the
/// step, for the caller to show ([`crate::pki::rollover`], [`crate::pki::trust_bundle`]); it
/// is removed when dropped.
///
/// # Errors
/// etcd cannot be reached or holds no CA yet, the step refuses (the phase is wrong), or
/// another change of the CA raced with this one.
pub async fn ca_step(config: &EtcdConfig, step: Option<Step>) -> anyhow::Result<tempfile::TempDir> {
    let client = connect(config).await?;
    let before = read(&client, &config.prefix).await?;
    anyhow::ensure!(
        before.contains_key("ca.crt") && before.contains_key("ca.key"),
        "etcd holds no cluster CA yet: start a cloudcore with --store etcd first"
    );
    let copy = tempfile::tempdir().context("cannot make a temporary directory")?;
    write_dir(copy.path(), &before)?;
    if let Some(step) = step {
        step(copy.path())?;
        let after = read_dir(copy.path())?;
        let txn = transaction(&config.prefix, &before, &after);
        anyhow::ensure!(
            send_txn(&client, &txn).await?.succeeded(),
            "the cluster CA in etcd changed while this step ran: run it again"
        );
    }
    Ok(copy)
}
