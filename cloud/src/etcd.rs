//! High availability's shared store: etcd v3 behind [`SharedBackend`], with this replica's
//! RocksDB [`Store`] as its cache and watch cache (as kube-apiserver's cacher sits over etcd).
//!
//! - **Layout.** Object `kind/namespace/name` is etcd key `PREFIX` + `objects/` +
//!   `kind/namespace/name`; its value is a 2-byte big-endian index (the write's position in
//!   its transaction) followed by the object's JSON.
//! - **Versions.** One number space derived from etcd's: a write at etcd revision `R`, the
//!   `i`-th of its transaction, has revision and resourceVersion `R × 1000 + i`. Every replica
//!   computes the same number from the watch (events come in transaction order) or from a
//!   list (the stored index), and it keeps one increasing position per change, which a watch
//!   resumed in the middle of a multi-object transaction needs (etcd gives all of a
//!   transaction's keys one revision). A [`WriteSet`](replication::WriteSet) is one etcd
//!   transaction, so at most 999 objects (and etcd's `--max-txn-ops`, 128 by default).
//! - **Writes** are transactions comparing each precondition (`create_revision = 0` for a
//!   create, `> 0` for must-exist, `mod_revision = R` for a resourceVersion); a failed compare
//!   reads the keys back in the same transaction to say which failed (409 or 404). A write
//!   returns once this replica's watch has applied it, so the writer reads it back.
//! - **Reads and watches** are served by the cache, fed by one etcd watch per replica (not one
//!   per client or node feed). At start the cache is rebuilt from a list at one revision.
//!
//! The etcd client ([`etcd_client`], tonic) runs on a runtime of its own: [`Store::commit`] is
//! synchronous and is called from the API's and CloudHub's tasks, which block on the answer.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use replication::{
    Change, ChangeKind, ObjectKey, Precondition, ReplicatedChange, ResourceVersion, Revision,
    SharedBackend, SharedChange, SharedOp, Store, StoreConfig, StoreError,
};
use tokio::task::JoinHandle;
use transport::tls::CertificateAuthority;

use crate::pki::TokenError;

/// Changes one etcd revision can carry: revision = etcd revision × `TXN_SLOTS` + index.
pub const TXN_SLOTS: u64 = 1000;

/// How cloudcore reaches etcd (`--etcd-*` flags).
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://127.0.0.1:2379`, `https://…`).
    pub endpoints: Vec<String>,
    /// Prefix of every key kedge writes (`/kedge/`): several clusters can share one etcd.
    pub prefix: String,
    /// PEM CA bundle that signs the members' certificates (TLS).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key (etcd's `--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    pub key: Option<PathBuf>,
    /// How long a write waits for etcd and for this replica to see it (then 503).
    pub timeout: Duration,
    /// Compact etcd's history this often, to the revision of the interval before
    /// (kube-apiserver's `--etcd-compaction-interval`, 5 min); zero: never.
    pub compaction_interval: Duration,
}

impl EtcdConfig {
    /// `endpoints` with the defaults: prefix `/kedge/`, no TLS, 10 s timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "/kedge/".to_owned(),
            ca: None,
            cert: None,
            key: None,
            timeout: Duration::from_secs(10),
            compaction_interval: Duration::from_secs(300),
        }
    }

    fn objects_prefix(&self) -> Vec<u8> {
        format!("{}objects/", self.prefix).into_bytes()
    }
}

/// Connects to etcd with `config`'s endpoints and TLS files.
///
/// # Errors
/// A TLS file that cannot be read, or no member answering within 5 s.
pub async fn connect(config: &EtcdConfig) -> anyhow::Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        // A member cut off from its quorum ends our watch instead of holding it silent.
        .with_require_leader(true);
    if config.ca.is_some() || config.cert.is_some() {
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &config.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the etcd CA {}", ca.display()))?;
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
            let cert = std::fs::read(cert).with_context(|| {
                format!("cannot read the etcd client certificate {}", cert.display())
            })?;
            let key = std::fs::read(key)
                .with_context(|| format!("cannot read the etcd client key {}", key.display()))?;
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    let client = Client::connect(&config.endpoints, Some(options))
        .await
        .with_context(|| format!("cannot connect to etcd at {}", config.endpoints.join(",")))?;
    // Connecting is lazy: ask for something so a wrong address fails here, clearly.
    tokio::time::timeout(
        Duration::from_secs(5),
        resend(&client, |mut c| async move { c.status().await }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no etcd member answered within 5 s"))
    .and_then(|r| r.map_err(anyhow::Error::from))
    .with_context(|| format!("cannot connect to etcd at {}", config.endpoints.join(",")))?;
    Ok(client)
}

/// [`connect`], again every 2 s until etcd answers, saying why each time it does not (etcd
/// down when cloudcore starts is a wait, not an exit).
pub async fn connect_retrying(config: &EtcdConfig) -> Client {
    loop {
        match connect(config).await {
            Ok(client) => return client,
            Err(e) => {
                tracing::error!("{e:#}; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// `call`, again while it fails before reaching a member ([`never_sent`]; at most 10 times):
/// the client balances over the members, and one that is down refuses the connection, so the
/// request can go to another without being applied twice.
async fn resend<T, F, Fut>(client: &Client, mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempts = 0;
    loop {
        match call(client.clone()).await {
            Err(e) if never_sent(&e) && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempts)).await;
            }
            other => return other,
        }
    }
}

/// A transaction, [`resend`] while refused before reaching a member.
pub(crate) async fn send_txn(
    client: &Client,
    txn: &Txn,
) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
    resend(client, |mut c| {
        let txn = txn.clone();
        async move { c.txn(txn).await }
    })
    .await
}

/// A read of `key` (with `options`), [`resend`] while refused before reaching a member.
pub(crate) async fn read_key(
    client: &Client,
    key: &[u8],
    options: Option<GetOptions>,
) -> Result<etcd_client::GetResponse, etcd_client::Error> {
    resend(client, |mut c| {
        let (key, options) = (key.to_vec(), options.clone());
        async move { c.get(key, options).await }
    })
    .await
}

/// Whether a request failed before it reached any etcd member (a refused connection), so
/// sending it again cannot apply it twice.
fn never_sent(error: &etcd_client::Error) -> bool {
    let text = match error {
        etcd_client::Error::GRpcStatus(status) => {
            if status.code() != tonic::Code::Unavailable {
                return false;
            }
            format!("{} {:?}", status.message(), status)
        }
        etcd_client::Error::TransportError(e) => format!("{e:?}"),
        _ => return false,
    };
    text.contains("tcp connect error") || text.contains("ConnectionRefused")
}

/// The revision (and resourceVersion) of the `index`-th write of etcd revision `etcd`.
pub fn revision_of(etcd: i64, index: u64) -> Revision {
    Revision(etcd.max(0) as u64 * TXN_SLOTS + index)
}

fn encode(index: usize, object: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(2 + object.len());
    value.extend_from_slice(&(index as u16).to_be_bytes());
    value.extend_from_slice(object);
    value
}

/// A stored value's transaction index and JSON.
fn decode(value: &[u8]) -> Option<(u64, Bytes)> {
    let (index, object) = value.split_first_chunk::<2>()?;
    Some((
        u16::from_be_bytes(*index) as u64,
        Bytes::copy_from_slice(object),
    ))
}

fn object_key(prefix: &[u8], key: &[u8]) -> Option<ObjectKey> {
    ObjectKey::parse(std::str::from_utf8(key.strip_prefix(prefix)?).ok()?).ok()
}

/// The smallest key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The version of a stored object.
fn version_of(kv: &KeyValue) -> Option<ResourceVersion> {
    let (index, _) = decode(kv.value())?;
    Some(revision_of(kv.mod_revision(), index).into())
}

/// Every object under `prefix` at one revision: the objects and that etcd revision.
async fn list_all(
    client: Client,
    prefix: Vec<u8>,
) -> anyhow::Result<(Vec<(ObjectKey, Revision, Bytes)>, i64)> {
    const PAGE: i64 = 1000;
    let end = prefix_end(&prefix);
    let mut objects = Vec::new();
    let mut from = prefix.clone();
    let mut at = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if at > 0 {
            options = options.with_revision(at);
        }
        let response = read_key(&client, &from, Some(options)).await?;
        if at == 0 {
            at = response.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in response.kvs() {
            match (object_key(&prefix, kv.key()), decode(kv.value())) {
                (Some(key), Some((index, object))) => {
                    objects.push((key, revision_of(kv.mod_revision(), index), object))
                }
                _ => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping an etcd value that is not a kedge object")
                }
            }
        }
        match (response.more(), response.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((objects, at)),
        }
    }
}

/// Follows etcd from revision `next` into the cache; ends (with why) only when the cache can
/// no longer be kept whole (the watch fell behind compaction) or the store is gone.
async fn follow(mut client: Client, prefix: Vec<u8>, store: Weak<Store>, mut next: i64) -> String {
    let mut backoff = Duration::from_millis(100);
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_progress_notify();
        match client.watch(prefix.clone(), Some(options)).await {
            Ok(mut stream) => loop {
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, next, "the etcd watch broke; resuming");
                        break;
                    }
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        return format!(
                            "this replica's etcd watch fell behind compaction (needed revision \
                             {next}, compacted through {}); restart it to reload",
                            response.compact_revision()
                        );
                    }
                    tracing::warn!(
                        reason = response.cancel_reason(),
                        "etcd canceled the watch; resuming"
                    );
                    break;
                }
                // etcd never splits one revision's events over two responses.
                let mut changes = Vec::with_capacity(response.events().len());
                let mut current = (0, 0);
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let revision = kv.mod_revision();
                    let index = if current.0 == revision {
                        current.1 + 1
                    } else {
                        0
                    };
                    current = (revision, index);
                    let Some(key) = object_key(&prefix, kv.key()) else {
                        continue;
                    };
                    let object = match event.event_type() {
                        etcd_client::EventType::Put => match decode(kv.value()) {
                            Some((_, object)) => Some(object),
                            None => continue,
                        },
                        etcd_client::EventType::Delete => None,
                    };
                    changes.push(ReplicatedChange {
                        revision: revision_of(revision, index),
                        key,
                        object,
                    });
                    next = next.max(revision + 1);
                }
                backoff = Duration::from_millis(100);
                if changes.is_empty() {
                    continue;
                }
                let Some(store) = store.upgrade() else {
                    return "the store is gone".to_owned();
                };
                if let Err(e) = store.apply_replicated(changes) {
                    return format!("cannot apply etcd's changes to the cache: {e}");
                }
            },
            Err(e) => tracing::warn!(error = %e, next, "cannot watch etcd; retrying"),
        }
        if store.strong_count() == 0 {
            return "the store is gone".to_owned();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The [`SharedBackend`] over etcd (see the module docs).
pub struct EtcdBackend {
    /// When etcd last answered a probe (ms since `started`), see [`probe_health`].
    last_answer_ms: Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
    client: Client,
    prefix: Vec<u8>,
    store: Weak<Store>,
    timeout: Duration,
    runtime: EtcdRuntime,
}

/// The etcd client's own runtime, shut down (without waiting) when the backend goes.
struct EtcdRuntime(Option<tokio::runtime::Runtime>);

impl EtcdRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running").handle()
    }
}

impl Drop for EtcdRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn compare(key: Vec<u8>, expect: Precondition) -> Option<Compare> {
    match expect {
        Precondition::None => None,
        Precondition::Absent => Some(Compare::create_revision(key, CompareOp::Equal, 0)),
        Precondition::Exists => Some(Compare::create_revision(key, CompareOp::Greater, 0)),
        Precondition::Version(rv) => Some(Compare::mod_revision(
            key,
            CompareOp::Equal,
            (rv.get() / TXN_SLOTS) as i64,
        )),
    }
}

/// Which precondition a failed transaction broke, from the keys it read back.
fn failure(ops: &[SharedOp], responses: &[TxnOpResponse]) -> StoreError {
    for (op, response) in ops.iter().zip(responses) {
        let current = match response {
            TxnOpResponse::Get(get) => get.kvs().first(),
            _ => None,
        };
        let actual = current.and_then(version_of);
        let key = op.key.clone();
        match (op.expect, current) {
            (Precondition::Absent, Some(_)) => return StoreError::AlreadyExists(key),
            (Precondition::Exists, None) | (Precondition::Version(_), None) => {
                return StoreError::NotFound(key)
            }
            (Precondition::Version(expected), Some(kv))
                if kv.mod_revision() as u64 != expected.get() / TXN_SLOTS =>
            {
                return StoreError::Conflict {
                    key,
                    expected,
                    actual,
                }
            }
            _ => {}
        }
    }
    let first = ops.first().map(|op| op.key.clone());
    StoreError::Unavailable(format!(
        "etcd refused the write of {first:?} and no precondition explains it"
    ))
}

impl EtcdBackend {
    fn txn(&self, ops: &[SharedOp]) -> Txn {
        let mut compares = Vec::new();
        let mut writes = Vec::with_capacity(ops.len());
        let mut reads = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            let key = [self.prefix.as_slice(), op.key.as_bytes()].concat();
            compares.extend(compare(key.clone(), op.expect));
            writes.push(match &op.object {
                // A create has no previous value to read back (its compare says so).
                Some(object) if op.expect == Precondition::Absent => {
                    TxnOp::put(key.clone(), encode(index, object), None)
                }
                Some(object) => TxnOp::put(
                    key.clone(),
                    encode(index, object),
                    Some(PutOptions::new().with_prev_key()),
                ),
                None => TxnOp::delete(key.clone(), Some(DeleteOptions::new().with_prev_key())),
            });
            reads.push(TxnOp::get(key, None));
        }
        Txn::new().when(compares).and_then(writes).or_else(reads)
    }
}

/// How long etcd may go without answering before the replica counts as cut off from it.
pub const UNAVAILABLE_AFTER: Duration = Duration::from_secs(5);

/// Asks etcd every second for a read its leader confirms (`require_leader`), noting when it
/// last answered: a replica cut off from etcd (or from its quorum) knows within
/// [`UNAVAILABLE_AFTER`].
async fn probe_health(
    client: Client,
    key: Vec<u8>,
    started: std::time::Instant,
    last: Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        let mut c = client.clone();
        let probe = c.get(key.clone(), Some(GetOptions::new().with_count_only()));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
            last.store(
                started.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl SharedBackend for EtcdBackend {
    fn available(&self) -> bool {
        let last = self
            .last_answer_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(last) < UNAVAILABLE_AFTER.as_millis() as u64
    }

    fn commit(&self, ops: Vec<SharedOp>) -> Result<Vec<SharedChange>, StoreError> {
        if ops.len() as u64 >= TXN_SLOTS {
            return Err(StoreError::Unavailable(format!(
                "one write of {} objects is more than an etcd transaction of kedge holds ({})",
                ops.len(),
                TXN_SLOTS - 1
            )));
        }
        let txn = self.txn(&ops);
        let (tx, rx) = mpsc::sync_channel(1);
        let client = self.client.clone();
        let timeout = self.timeout;
        self.runtime.handle().spawn(async move {
            // Any failure but a refused connection leaves the outcome unknown: 503.
            let answer = tokio::time::timeout(timeout, send_txn(&client, &txn)).await;
            let _ = tx.send(answer);
        });
        let response = match rx.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(Ok(Ok(response))) => response,
            Ok(Ok(Err(e))) => return Err(StoreError::Unavailable(format!("etcd: {e}"))),
            Ok(Err(_)) | Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd did not answer within {timeout:?}"
                )))
            }
        };
        let responses = response.op_responses();
        if !response.succeeded() {
            return Err(failure(&ops, &responses));
        }
        let etcd_revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let mut changes = Vec::with_capacity(ops.len());
        for (index, (op, answer)) in ops.into_iter().zip(&responses).enumerate() {
            let prev = match answer {
                TxnOpResponse::Put(put) => put.prev_key(),
                TxnOpResponse::Delete(delete) => delete.prev_kvs().first(),
                _ => None,
            }
            .and_then(|kv| decode(kv.value()))
            .map(|(_, object)| object);
            let revision = revision_of(etcd_revision, index as u64);
            let (kind, object) = match op.object {
                Some(object) if prev.is_some() => (ChangeKind::Modified, object),
                Some(object) => (ChangeKind::Added, object),
                None => (ChangeKind::Deleted, prev.clone().unwrap_or_default()),
            };
            changes.push(Arc::new(
                Change::new(revision, op.key, revision.into(), kind, object).with_prev(prev),
            ));
        }
        let last = changes.last().map(|c| c.revision).unwrap_or_default();
        let Some(store) = self.store.upgrade() else {
            return Err(StoreError::Unavailable("the store is closing".to_owned()));
        };
        if !store.wait_for_revision(last, self.timeout) {
            return Err(StoreError::Unavailable(format!(
                "written to etcd at revision {etcd_revision}, but this replica's watch has not \
                 seen it within {:?}",
                self.timeout
            )));
        }
        Ok(changes)
    }
}

/// Compacts etcd every `interval` to the revision it had one interval before, as
/// kube-apiserver's compactor: the replicas agree through one key (`PREFIX` +
/// `compact_rev_key`, whose version counts compactions) so that one of them compacts per
/// interval. Watches of this replica older than the compaction then get 410.
async fn compact_periodically(
    client: Client,
    prefix: String,
    interval: Duration,
    store: Weak<Store>,
) {
    let key = format!("{prefix}compact_rev_key").into_bytes();
    // (The key's version we expect, the etcd revision seen at the last tick.)
    let (mut expected, mut last_revision) = (0i64, 0i64);
    loop {
        tokio::time::sleep(interval).await;
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key.clone(), "", None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let response = match send_txn(&client, &txn).await {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!(error = %e, "etcd compaction: cannot reach etcd");
                continue;
            }
        };
        let now = response.header().map(|h| h.revision()).unwrap_or(0);
        if !response.succeeded() {
            // Another replica compacted this interval: follow its count.
            expected = match response.op_responses().first() {
                Some(TxnOpResponse::Get(get)) => get.kvs().first().map_or(0, |kv| kv.version()),
                _ => expected,
            };
            last_revision = now;
            continue;
        }
        expected += 1;
        let target = last_revision;
        last_revision = now;
        if target == 0 {
            continue;
        }
        match resend(
            &client,
            |mut c| async move { c.compact(target, None).await },
        )
        .await
        {
            Ok(_) => {
                tracing::info!(etcd_revision = target, "compacted etcd");
                if let Some(store) = store.upgrade() {
                    store
                        .watch()
                        .forget_through(revision_of(target, TXN_SLOTS - 1));
                }
            }
            Err(e) => tracing::warn!(error = %e, etcd_revision = target, "etcd compaction failed"),
        }
    }
}

/// Bootstrap tokens in etcd, for the join path of a replica: `PREFIX` + `tokens/ID` holds the
/// token's record (its secret's SHA-256, expiry, one-use, used), so a token made through any
/// replica (or `cloudcore token create --store etcd`) joins through any, and a one-use token
/// is used up once across all of them (a transaction comparing its revision).
pub struct EtcdTokens {
    client: Client,
    prefix: String,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

fn token_key(prefix: &str, id: &str) -> Vec<u8> {
    format!("{prefix}tokens/{id}").into_bytes()
}

impl EtcdTokens {
    /// Runs `work` on the etcd runtime and waits for it (the join path is synchronous).
    fn block<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(work.await);
        });
        rx.recv_timeout(self.timeout).ok()
    }
}

impl crate::pki::SharedTokens for EtcdTokens {
    /// The key's `mod_revision`.
    type Version = i64;

    fn read(&self, id: &str) -> Result<(crate::pki::TokenRecord, i64), TokenError> {
        let (client, key) = (self.client.clone(), token_key(&self.prefix, id));
        let got = self
            .block(async move { read_key(&client, &key, None).await })
            .and_then(Result::ok)
            .ok_or(TokenError::Unknown)?;
        let kv = got.kvs().first().ok_or(TokenError::Unknown)?;
        let record = serde_json::from_slice(kv.value()).map_err(|_| TokenError::Unknown)?;
        Ok((record, kv.mod_revision()))
    }

    fn write(&self, id: &str, record: &crate::pki::TokenRecord, at: i64) -> bool {
        let key = token_key(&self.prefix, id);
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, at)])
            .and_then([TxnOp::put(
                key,
                serde_json::to_vec(record).expect("json"),
                None,
            )]);
        let client = self.client.clone();
        self.block(async move { send_txn(&client, &txn).await })
            .and_then(Result::ok)
            .is_some_and(|r| r.succeeded())
    }
}

/// The cluster CA in etcd (see [`share_ca`]).
async fn cluster_ca(client: &Client, prefix: &str) -> anyhow::Result<CertificateAuthority> {
    let get = |name: &str| {
        let key = format!("{prefix}pki/{name}").into_bytes();
        async move {
            let got = read_key(client, &key, None).await?;
            let text = got
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .context(
                    "etcd holds no cluster CA yet: start a cloudcore with --store etcd first",
                )?;
            anyhow::Ok(text)
        }
    };
    let (cert, key) = (get("ca.crt").await?, get("ca.key").await?);
    Ok(CertificateAuthority::from_pem(&cert, &key)?)
}

/// `cloudcore token create --store etcd`: a token in etcd, pinned to the cluster CA there.
///
/// # Errors
/// etcd cannot be reached, holds no CA yet, or the write fails.
pub async fn create_token(
    config: &EtcdConfig,
    ttl: Duration,
    once: bool,
) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let ca = cluster_ca(&client, &config.prefix).await?;
    let (id, secret) = crate::pki::new_token_parts();
    let record = crate::pki::TokenRecord::new(&secret, ttl, once);
    let key = token_key(&config.prefix, &id);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, serde_json::to_vec(&record)?, None)]);
    let response = send_txn(&client, &txn).await?;
    anyhow::ensure!(
        response.succeeded(),
        "token id {id} exists already; try again"
    );
    Ok(crate::pki::token_text(
        &crate::pki::ca_pin(&ca),
        &id,
        &secret,
    ))
}

/// `cloudcore token list --store etcd`.
///
/// # Errors
/// etcd cannot be reached.
pub async fn list_tokens(config: &EtcdConfig) -> anyhow::Result<Vec<crate::pki::TokenInfo>> {
    let client = connect(config).await?;
    let prefix = token_key(&config.prefix, "");
    let end = prefix_end(&prefix);
    let got = read_key(&client, &prefix, Some(GetOptions::new().with_range(end))).await?;
    let mut tokens = Vec::new();
    for kv in got.kvs() {
        let Some(id) = kv.key().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let id = String::from_utf8_lossy(id).into_owned();
        if let Ok(record) = serde_json::from_slice::<crate::pki::TokenRecord>(kv.value()) {
            tokens.push(record.info(&id, false));
        }
    }
    Ok(tokens)
}

/// `cloudcore token delete --store etcd`: whether there was such a token.
///
/// # Errors
/// etcd cannot be reached.
pub async fn delete_token(config: &EtcdConfig, id: &str) -> anyhow::Result<bool> {
    let client = connect(config).await?;
    let key = token_key(&config.prefix, id);
    let deleted = resend(&client, |mut c| {
        let key = key.clone();
        async move { c.delete(key, None).await }
    })
    .await?;
    Ok(deleted.deleted() > 0)
}

/// Opens a replica's cache in `data_dir/etcd-cache` (rebuilt from etcd at every start: etcd
/// holds the truth) over the etcd of `config`, and starts following etcd into it. Returns the
/// store, whose writes now go to etcd, the follower's task, which ends only when the cache can
/// no longer follow (cloudcore then stops: restarting reloads it), and the bootstrap tokens.
///
/// # Errors
/// The cache cannot be opened, or etcd cannot be reached or listed.
pub async fn open_store(
    config: &EtcdConfig,
    data_dir: &Path,
    watch_history: usize,
) -> anyhow::Result<(Arc<Store>, JoinHandle<()>, Arc<EtcdTokens>)> {
    let dir = data_dir.join("etcd-cache");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the etcd cache {}", dir.display()))?;
    }
    let mut store_config = StoreConfig::cloud();
    store_config.watch.history = watch_history.max(1);
    // The cache is rebuilt from etcd after a crash; its writes need no fsync.
    store_config.sync_writes = false;
    let store = Arc::new(Store::open(&dir, store_config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Transactions, the watch and applying it to the cache run side by side.
        .worker_threads(2)
        .thread_name("etcd")
        .enable_all()
        .build()
        .context("starting the etcd client's runtime")?;
    let runtime = EtcdRuntime(Some(runtime));
    let handle = runtime.handle().clone();
    let connecting = config.clone();
    let client = handle
        .spawn(async move { connect_retrying(&connecting).await })
        .await?;
    let prefix = config.objects_prefix();
    let (objects, at) = handle
        .spawn(list_all(client.clone(), prefix.clone()))
        .await?
        .context("listing kedge's objects in etcd")?;
    tracing::info!(
        objects = objects.len(),
        etcd_revision = at,
        "loaded the cache from etcd"
    );
    store.reset_replicated(objects, revision_of(at, TXN_SLOTS - 1))?;
    let tokens = Arc::new(EtcdTokens {
        client: client.clone(),
        prefix: config.prefix.clone(),
        runtime: handle.clone(),
        timeout: config.timeout,
    });
    let started = std::time::Instant::now();
    let last_answer_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    handle.spawn(probe_health(
        client.clone(),
        format!("{}health", config.prefix).into_bytes(),
        started,
        last_answer_ms.clone(),
    ));
    let backend = Arc::new(EtcdBackend {
        last_answer_ms,
        started,
        client: client.clone(),
        prefix: prefix.clone(),
        store: Arc::downgrade(&store),
        timeout: config.timeout,
        runtime,
    });
    store.set_backend(backend)?;
    if !config.compaction_interval.is_zero() {
        handle.spawn(compact_periodically(
            client.clone(),
            config.prefix.clone(),
            config.compaction_interval,
            Arc::downgrade(&store),
        ));
    }
    let weak = Arc::downgrade(&store);
    let follower = handle.spawn(async move {
        let why = follow(client, prefix, weak, at + 1).await;
        tracing::error!(reason = %why, "the etcd watch stopped");
    });
    Ok((store, follower, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_transaction_index() {
        let value = encode(7, b"{\"a\":1}");
        assert_eq!(decode(&value), Some((7, Bytes::from_static(b"{\"a\":1}"))));
        assert_eq!(decode(b"x"), None);
        assert_eq!(revision_of(42, 7), Revision(42_007));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/kedge/objects/"), b"/kedge/objects0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
