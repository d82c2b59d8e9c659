//! MetaManager: the node's RocksDB cache of everything routed to it (replication's mirror store),
//! its sync watermark and its outbox of upward reports. EdgeHub feeds it from the cloud; Edged,
//! the node status loop and MetaServer read it and report through it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use replication::api::remote::{ApiCall, ApiReply};
use replication::api::ApiError;
use replication::sync::{EdgeReplica, ReplicaError};
use replication::{ObjectKey, Store, StoreConfig};
use tokio::sync::Notify;
use transport::{LinkError, LinkHandle};

/// How long MetaServer waits for the cloud to answer a forwarded call: a client gets a clear
/// 504 in seconds instead of waiting out the link's idle timeout behind a hung cloud.
pub const CLOUD_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct MetaManager {
    node: String,
    store: Arc<Store>,
    replica: Mutex<EdgeReplica>,
    /// Wakes EdgeHub when a report is queued.
    outbox_ready: Notify,
    online: AtomicBool,
    /// The link to the cloud, for API calls MetaServer forwards.
    link: OnceLock<LinkHandle>,
    /// The collections MetaServer subscribed to.
    collections: crate::collections::Collections,
}

impl MetaManager {
    /// Opens (or creates) the cache in `dir`.
    pub fn open(dir: &Path, node: &str) -> Result<Arc<Self>, replication::StoreError> {
        let config = StoreConfig::edge().with_aux(crate::devicetwin::DEVICETWIN);
        let store = Arc::new(Store::open(dir, config)?);
        let replica = EdgeReplica::from_shared(store.clone())?;
        let collections = crate::collections::Collections::load(&store)?;
        Ok(Arc::new(MetaManager {
            collections,
            node: node.to_owned(),
            store,
            replica: Mutex::new(replica),
            outbox_ready: Notify::new(),
            online: AtomicBool::new(false),
            link: OnceLock::new(),
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The collections MetaServer subscribed to.
    pub fn collections(&self) -> &crate::collections::Collections {
        &self.collections
    }

    /// The sync state machine and its store, for EdgeHub.
    pub(crate) fn replica(&self) -> MutexGuard<'_, EdgeReplica> {
        // A panic while holding it leaves the replica as consistent as its last flush.
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's own write of an object (pod status, its Node, Lease, an Event): committed
    /// locally at once and queued upward; delivered when the cloud is reachable.
    pub fn report(&self, key: ObjectKey, object: Bytes) -> Result<(), ReplicaError> {
        self.replica().report(key, object)?;
        self.outbox_ready.notify_one();
        Ok(())
    }

    /// Several reports and bookkeeping of the caller's own (`extra`, e.g. twin records), in one
    /// commit: all durable and queued upward, or none.
    pub fn report_batch(
        &self,
        reports: Vec<(ObjectKey, Bytes)>,
        extra: replication::store::WriteSet,
    ) -> Result<(), ReplicaError> {
        let any = !reports.is_empty();
        self.replica().report_batch(reports, extra)?;
        if any {
            self.outbox_ready.notify_one();
        }
        Ok(())
    }

    /// Tells the cloud a pod being deleted has stopped here, so it can be removed.
    pub fn confirm_deleted(&self, key: ObjectKey) -> Result<(), ReplicaError> {
        self.report(key, Bytes::new())
    }

    /// Reports queued and not yet acknowledged by the cloud.
    pub fn outbox_len(&self) -> usize {
        self.replica().sync().outbox_len()
    }

    pub(crate) async fn outbox_ready(&self) {
        self.outbox_ready.notified().await
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    pub(crate) fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Relaxed);
    }

    pub(crate) fn set_link(&self, link: LinkHandle) {
        let _ = self.link.set(link);
    }

    /// Makes an API call in the cloud (a forwarded write, or a get the cache cannot answer),
    /// waiting at most [`CLOUD_CALL_TIMEOUT`]. Link failures become the `Status` a client
    /// should see: 503 `ServiceUnavailable` when the link is down (or goes down during the
    /// call), 504 `Timeout` when the cloud does not answer in time (a hung cloud looks
    /// connected until the link's idle timeout). Never a 404 for what could not be asked.
    pub async fn call_cloud(&self, call: ApiCall) -> Result<ApiReply, ApiError> {
        let offline = || {
            ApiError::unavailable(format!(
                "node {} is offline: the cloud is unreachable, so {} {} cannot be served",
                self.node, call.method, call.uri
            ))
        };
        let link = self.link.get().ok_or_else(offline)?;
        let message = call.to_message("metaserver");
        let response = match link.request_within(&message, CLOUD_CALL_TIMEOUT).await {
            Ok(response) => response,
            Err(LinkError::NotConnected) => return Err(offline()),
            Err(LinkError::Timeout(after)) => {
                return Err(ApiError::new(
                    504,
                    replication::api::StatusReason::Timeout,
                    format!(
                        "the cloud did not answer {} {} within {after:?} (it may be overloaded or \
                         hung); the node keeps serving what it holds",
                        call.method, call.uri
                    ),
                ))
            }
            Err(e) => {
                return Err(ApiError::unavailable(format!(
                    "node {} lost the cloud during {} {}: {e}",
                    self.node, call.method, call.uri
                )))
            }
        };
        ApiReply::from_message(&response).map_err(|e| {
            ApiError::new(
                502,
                replication::api::StatusReason::BadGateway,
                format!("the cloud's reply is unreadable: {e}"),
            )
        })
    }
}
