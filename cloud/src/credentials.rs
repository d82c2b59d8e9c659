//! Node credentials on the cloud: which node certificates may connect, their renewal, and
//! their revocation when a Node is deleted.
//!
//! The cloud records, per node, the SHA-256 fingerprints of the certificates it issued that may
//! still be used (`DATA_DIR/pki/nodes/NODE.json`: `{"certs": {"<fingerprint hex>":
//! <notAfter, unix seconds>}}`, written atomically, mode 0600). A join replaces the node's
//! list with its new certificate; a renewal adds the new one (the old one keeps working until
//! it expires); deleting the Node empties the list. A connection is admitted only when
//! - its Node object exists (deleting the Node revokes at once; the hub also closes the live
//!   connection),
//! - its certificate is on the node's list (a certificate from before a re-join is refused),
//! - its certificate has not expired; an expired one within the grace window
//!   (`--node-cert-grace`) may only renew itself ([`transport::renew`]), and beyond it the node
//!   is refused with a reason telling the operator to re-join it with a new bootstrap token.
//!
//! A node without any list (joined before the lists existed) is adopted: its certificate is
//! recorded at its first connection.
//!
//! With several replicas on one store (etcd), the lists live in the store instead, as objects
//! of the kind [`RECORD_KIND`] (`nodecredentials//NODE`, never served by the API nor routed to
//! nodes), so that every replica knows what any issued: a node that renewed its certificate on
//! one replica connects to another with it. Writes are read-modify-write, the last one winning:
//! a node talks to one replica at a time, so two replicas do not edit one node's list at once.
//! In cluster mode (`--kubeconfig`), where each replica's store is its own mirror of the
//! cluster, they live in the cluster as Secrets ([`crate::cluster_secrets::ClusterNodeRecords`]),
//! read from the mirror; a list still in a file (from before) is read until the first write.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use replication::{ObjectKey, Store};
use serde::{Deserialize, Serialize};
use transport::tls::{self, CertificateAuthority, CertificateDer, Expiry};
use transport::{Admission, CredentialPolicy};

use crate::metrics::Metrics;

/// Default lifetime of a node certificate (`cloudcore --node-cert-lifetime`).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default grace window after expiry in which a node may still renew (`--node-cert-grace`).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// What the operator does to bring back a node that the cloud refuses.
const REJOIN_HINT: &str = "re-join it with a new bootstrap token: `cloudcore token create`, \
     then restart edgecore with --rejoin --token TOKEN";

/// The store kind of the certificate lists when the store is shared by several replicas.
pub const RECORD_KIND: &str = "nodecredentials";

#[derive(Debug, Default, Serialize, Deserialize)]
struct NodeRecord {
    /// Fingerprint → notAfter (unix seconds).
    certs: BTreeMap<String, u64>,
}

/// The cloud's [`CredentialPolicy`]; also records joins ([`NodeCredentials::record_join`]) and
/// revokes deleted nodes ([`NodeCredentials::revoke`]).
pub struct NodeCredentials {
    dir: PathBuf,
    store: Arc<Store>,
    ca: Arc<CertificateAuthority>,
    /// Validity of the certificates issued (joins and renewals).
    pub lifetime: Duration,
    /// How long after expiry a certificate may still renew itself.
    pub grace: Duration,
    metrics: Arc<Metrics>,
    /// The CAs nodes should trust (the signing CA first; two during a CA rollover).
    trust: Vec<CertificateDer<'static>>,
    /// One writer of the record files at a time in this process.
    lock: Mutex<()>,
    /// Cluster mode: the lists are Secrets of the cluster.
    cluster: Option<Arc<crate::cluster_secrets::ClusterNodeRecords>>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

impl NodeCredentials {
    /// Credentials over `store`'s Node objects, issuing from `ca`, recording under
    /// `DATA_DIR/pki/nodes/`. Nodes are told to trust `ca` alone (see
    /// [`with_trust`](Self::with_trust)).
    pub fn new(
        data_dir: &Path,
        store: Arc<Store>,
        ca: Arc<CertificateAuthority>,
        lifetime: Duration,
        grace: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        NodeCredentials {
            trust: vec![ca.cert().clone()],
            dir: data_dir.join("pki").join("nodes"),
            store,
            ca,
            lifetime,
            grace,
            metrics,
            lock: Mutex::new(()),
            cluster: None,
        }
    }

    /// Keeps the lists in the cluster's Secrets (cluster mode with several replicas).
    pub fn with_cluster(
        mut self,
        records: Arc<crate::cluster_secrets::ClusterNodeRecords>,
    ) -> Self {
        self.cluster = Some(records);
        self
    }

    /// Nodes are told to trust `bundle` (the signing CA first): during a CA rollover, both.
    pub fn with_trust(mut self, bundle: Vec<CertificateDer<'static>>) -> Self {
        if !bundle.is_empty() {
            self.trust = bundle;
        }
        self
    }

    /// The CAs nodes should trust, signing CA first.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.trust
    }

    /// The CA that signs node certificates.
    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    fn path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.json"))
    }

    /// The node's record; `Ok(None)` when it has none.
    fn load(&self, node: &str) -> Result<Option<NodeRecord>, String> {
        if self.store.is_replicated() {
            let key = ObjectKey::new(RECORD_KIND, "", node).map_err(|e| e.to_string())?;
            return match self.store.get(&key) {
                Ok(Some(held)) => serde_json::from_slice(&held.object)
                    .map(Some)
                    .map_err(|e| format!("{key}: {e}")),
                Ok(None) => Ok(None),
                Err(e) => Err(format!("cannot read the node's certificate list: {e}")),
            };
        }
        if self.cluster.is_some() {
            let key = crate::cluster_secrets::ClusterNodeRecords::key(node)?;
            let held = self
                .store
                .get(&key)
                .map_err(|e| format!("cannot read the node's certificate list: {e}"))?;
            if let Some(certs) =
                held.and_then(|h| crate::cluster_secrets::ClusterNodeRecords::certs_of(&h.object))
            {
                return serde_json::from_slice(&certs)
                    .map(Some)
                    .map_err(|e| format!("{key}: {e}"));
            }
            // Not in the cluster yet: a list from before cluster sharing, if any.
        }
        let path = self.path(node);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn save(&self, node: &str, record: &NodeRecord) -> Result<(), String> {
        if self.store.is_replicated() {
            let key = ObjectKey::new(RECORD_KIND, "", node).map_err(|e| e.to_string())?;
            let object = serde_json::json!({
                "apiVersion": "kedge.io/v1", "kind": "NodeCredentials",
                "metadata": {"name": node}, "certs": record.certs,
            });
            let mut set = replication::WriteSet::new();
            set.put(
                key,
                bytes::Bytes::from(serde_json::to_vec(&object).expect("json")),
                replication::Precondition::None,
            );
            return self
                .store
                .commit(set)
                .map(drop)
                .map_err(|e| format!("cannot write the node's certificate list: {e}"));
        }
        if let Some(cluster) = &self.cluster {
            let certs = serde_json::to_vec(record).expect("json");
            let written = cluster.write(node, certs)?;
            // Into the local mirror at once, so that this replica's next read sees it (the
            // mirror's own copy follows from the cluster's watch).
            let mut set = replication::WriteSet::new();
            set.put(
                crate::cluster_secrets::ClusterNodeRecords::key(node)?,
                bytes::Bytes::from(written),
                replication::Precondition::None,
            );
            return self
                .store
                .commit(set)
                .map(drop)
                .map_err(|e| format!("cannot keep the node's certificate list: {e}"));
        }
        fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let bytes = serde_json::to_vec(record).expect("json");
        crate::pki::write_private(&self.path(node), &bytes).map_err(|e| e.to_string())
    }

    fn count(&self, event: &'static str) {
        self.metrics
            .node_certificates
            .get_or_create(&crate::metrics::EventLabels { event })
            .inc();
    }

    /// Signs `csr_der` for `node` with the configured lifetime (the name is the caller's, see
    /// [`CertificateAuthority::sign_node_csr`]).
    ///
    /// # Errors
    /// The CSR does not parse or its signature does not verify.
    pub fn sign(&self, node: &str, csr_der: &[u8]) -> Result<CertificateDer<'static>, String> {
        self.ca
            .sign_node_csr(csr_der, node, self.lifetime)
            .map_err(|e| format!("certificate signing request: {e}"))
    }

    /// A node joined with `cert`: from now on only it (and its renewals) are accepted for
    /// `node`; any older certificate of that name is revoked.
    ///
    /// # Errors
    /// The record could not be written (the join must fail: the node could not connect).
    pub fn record_join(&self, node: &str, cert: &CertificateDer<'_>) -> Result<(), String> {
        let info = tls::node_cert_info(cert).map_err(|e| e.to_string())?;
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut record = NodeRecord::default();
        record.certs.insert(info.fingerprint, unix(info.not_after));
        self.save(node, &record)
    }

    /// Whether none of `node`'s certificates can be used any more (all expired beyond the
    /// grace window, or revoked): then a join with a bootstrap token may take the name over
    /// although its Node exists. `false` for a node without a record (its certificates are
    /// unknown).
    pub fn identity_is_dead(&self, node: &str) -> bool {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = unix(SystemTime::now());
        let grace = self.grace.as_secs();
        matches!(self.load(node), Ok(Some(record))
            if record.certs.values().all(|not_after| not_after.saturating_add(grace) < now))
    }

    /// The Node `node` was deleted: every certificate issued to it is refused from now on
    /// (the hub closes its live connection).
    pub fn revoke(&self, node: &str) {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.save(node, &NodeRecord::default()) {
            Ok(()) => {
                self.count("revoked");
                tracing::info!(%node, "Node deleted: its certificates are revoked");
            }
            Err(e) => {
                tracing::error!(%node, error = %e, "cannot record the revocation (the node is still refused while its Node object is absent)")
            }
        }
    }

    fn node_exists(&self, node: &str) -> Result<bool, String> {
        let key = ObjectKey::new("nodes", "", node).map_err(|e| e.to_string())?;
        self.store
            .get(&key)
            .map(|v| v.is_some())
            .map_err(|e| format!("cannot read the Node: {e}"))
    }

    fn judge(&self, node: &str, cert: &CertificateDer<'_>) -> Admission {
        let info = match tls::node_cert_info(cert) {
            Ok(info) => info,
            Err(e) => return Admission::Refuse(e.to_string()),
        };
        match self.node_exists(node) {
            Ok(true) => {}
            Ok(false) => {
                self.count("refused_revoked");
                return Admission::Refuse(format!(
                    "node {node}: certificate revoked (its Node object was deleted); to bring \
                     the node back, {REJOIN_HINT}"
                ));
            }
            Err(e) => return Admission::Refuse(e),
        }
        {
            let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            match self.load(node) {
                Ok(Some(record)) if record.certs.contains_key(&info.fingerprint) => {}
                Ok(Some(_)) => {
                    self.count("refused_revoked");
                    return Admission::Refuse(format!(
                        "node {node}: this certificate is revoked (the node was deleted, or \
                         joined again with another certificate); {REJOIN_HINT}"
                    ));
                }
                Ok(None) => {
                    // Joined before records existed: adopt the certificate it presents.
                    let mut record = NodeRecord::default();
                    record
                        .certs
                        .insert(info.fingerprint.clone(), unix(info.not_after));
                    if let Err(e) = self.save(node, &record) {
                        return Admission::Refuse(format!("cannot record the certificate: {e}"));
                    }
                }
                Err(e) => return Admission::Refuse(format!("cannot read the node's record: {e}")),
            }
        }
        match tls::expiry(SystemTime::now(), info.not_after, self.grace) {
            Expiry::Valid => Admission::Link,
            Expiry::InGrace(ago) => {
                self.count("expired_in_grace");
                Admission::RenewOnly(format!(
                    "node {node}: certificate expired {} ago; within the grace window ({}) it \
                     may only be renewed (edgecore does so by itself)",
                    human(ago),
                    human(self.grace)
                ))
            }
            Expiry::Beyond(ago) => {
                self.count("refused_expired");
                Admission::Refuse(format!(
                    "node {node}: certificate expired {} ago, beyond the grace window of {}; \
                     {REJOIN_HINT}",
                    human(ago),
                    human(self.grace)
                ))
            }
        }
    }
}

impl CredentialPolicy for NodeCredentials {
    fn admit(&self, node: &str, cert: &CertificateDer<'_>) -> Admission {
        self.judge(node, cert)
    }

    fn renew(&self, node: &str, csr_der: &[u8]) -> Result<Vec<u8>, String> {
        match self.node_exists(node) {
            Ok(true) => {}
            Ok(false) => {
                self.count("renewal_refused");
                return Err(format!(
                    "node {node} no longer exists (its Node object was deleted); {REJOIN_HINT}"
                ));
            }
            Err(e) => return Err(e),
        }
        let asked = tls::csr_common_name(csr_der).map_err(|e| e.to_string())?;
        if asked != node {
            self.count("renewal_refused");
            return Err(format!(
                "the certificate signing request names {asked:?}, not this node ({node})"
            ));
        }
        let cert = self.sign(node, csr_der)?;
        let info = tls::node_cert_info(&cert).map_err(|e| e.to_string())?;
        {
            let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut record = self.load(node)?.unwrap_or_default();
            // Certificates past expiry and grace can never be used again: forget them.
            let now = unix(SystemTime::now());
            let grace = self.grace.as_secs();
            record
                .certs
                .retain(|_, not_after| not_after.saturating_add(grace) >= now);
            record.certs.insert(info.fingerprint, unix(info.not_after));
            self.save(node, &record)?;
        }
        self.count("renewed");
        tracing::info!(%node, not_after = %humantime::format_rfc3339_seconds(info.not_after), "node certificate renewed");
        Ok(cert.to_vec())
    }

    fn on_replaced(&self, node: &str, old: SocketAddr, new: SocketAddr) {
        self.count("connection_replaced");
        tracing::warn!(%node, %old, %new, "node connected again while its previous connection was open; the newer connection wins (if this repeats, two processes present this node's certificate)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use replication::{Precondition, WriteSet};
    use transport::tls::node_csr;

    fn put_node(store: &Store, name: &str) {
        let mut set = WriteSet::new();
        let node = Bytes::from(replication::api::object::to_stored(crate::join::new_node(
            name,
        )));
        set.put(
            ObjectKey::new("nodes", "", name).unwrap(),
            node,
            Precondition::None,
        );
        store.commit(set).unwrap();
    }

    fn delete_node(store: &Store, name: &str) {
        let mut set = WriteSet::new();
        set.delete(
            ObjectKey::new("nodes", "", name).unwrap(),
            Precondition::Exists,
        );
        store.commit(set).unwrap();
    }

    #[test]
    fn admission_follows_the_node_its_record_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::embedded::open_store(dir.path(), 100).unwrap();
        let ca = Arc::new(CertificateAuthority::generate("kedge-ca").unwrap());
        let creds = NodeCredentials::new(
            dir.path(),
            store.clone(),
            ca.clone(),
            Duration::from_secs(600),
            Duration::from_secs(3600),
            Arc::new(Metrics::new()),
        );
        let now = time::OffsetDateTime::now_utc();
        let issued = |from: time::OffsetDateTime, to: time::OffsetDateTime| {
            ca.issue_node_between("n1", from, to).unwrap().cert_chain[0].clone()
        };
        let valid = issued(
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        // No Node: refused.
        assert!(matches!(creds.admit("n1", &valid), Admission::Refuse(r) if r.contains("revoked")));
        put_node(&store, "n1");
        creds.record_join("n1", &valid).unwrap();
        assert_eq!(creds.admit("n1", &valid), Admission::Link);
        // A certificate the node was not given (e.g. from before a re-join): refused.
        let other = issued(
            now - time::Duration::minutes(1),
            now + time::Duration::hours(1),
        );
        assert!(matches!(creds.admit("n1", &other), Admission::Refuse(_)));

        // Renewal: the CSR must name the node; the new certificate joins the old one.
        let (_, wrong) = node_csr("n2").unwrap();
        assert!(creds
            .renew("n1", &wrong)
            .unwrap_err()
            .contains("names \"n2\""));
        let (_, csr) = node_csr("n1").unwrap();
        let renewed = CertificateDer::from(creds.renew("n1", &csr).unwrap());
        assert_eq!(creds.admit("n1", &renewed), Admission::Link);
        assert_eq!(
            creds.admit("n1", &valid),
            Admission::Link,
            "the old one works on"
        );
        assert!(!creds.identity_is_dead("n1"));

        // Expired within grace: renewal only; beyond: refused with the way back.
        let in_grace = issued(
            now - time::Duration::hours(2),
            now - time::Duration::minutes(5),
        );
        let beyond = issued(
            now - time::Duration::hours(4),
            now - time::Duration::hours(2),
        );
        creds.record_join("n1", &in_grace).unwrap();
        assert!(matches!(
            creds.admit("n1", &in_grace),
            Admission::RenewOnly(_)
        ));
        creds.record_join("n1", &beyond).unwrap();
        assert!(matches!(creds.admit("n1", &beyond), Admission::Refuse(r)
            if r.contains("beyond the grace window") && r.contains("--rejoin")));
        assert!(creds.identity_is_dead("n1"));

        // Deleting the Node revokes everything, also if the name comes back.
        creds.record_join("n1", &valid).unwrap();
        delete_node(&store, "n1");
        creds.revoke("n1");
        assert!(matches!(creds.admit("n1", &valid), Admission::Refuse(_)));
        assert!(creds.renew("n1", &csr).is_err());
        put_node(&store, "n1");
        assert!(matches!(creds.admit("n1", &valid), Admission::Refuse(_)));

        // A node from before the records: its certificate is adopted.
        put_node(&store, "n1x");
        let legacy = ca
            .issue_node("n1x", Duration::from_secs(600))
            .unwrap()
            .cert_chain[0]
            .clone();
        assert_eq!(creds.admit("n1x", &legacy), Admission::Link);
        let stranger = ca
            .issue_node("n1x", Duration::from_secs(600))
            .unwrap()
            .cert_chain[0]
            .clone();
        assert!(matches!(
            creds.admit("n1x", &stranger),
            Admission::Refuse(_)
        ));
    }
}
