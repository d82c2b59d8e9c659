//! MetaManager: the node's RocksDB cache of everything routed to it (replication's mirror store),
//! its sync watermark and its outbox of upward reports. EdgeHub feeds it from the cloud; Edged,
//! the node status loop and MetaServer read it and report through it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use replication::sync::{EdgeReplica, ReplicaError};
use replication::{ObjectKey, Store, StoreConfig};
use tokio::sync::Notify;

pub struct MetaManager {
    node: String,
    store: Arc<Store>,
    replica: Mutex<EdgeReplica>,
    /// Wakes EdgeHub when a report is queued.
    outbox_ready: Notify,
    online: AtomicBool,
}

impl MetaManager {
    /// Opens (or creates) the cache in `dir`.
    pub fn open(dir: &Path, node: &str) -> Result<Arc<Self>, replication::StoreError> {
        let store = Arc::new(Store::open(dir, StoreConfig::edge())?);
        let replica = EdgeReplica::from_shared(store.clone())?;
        Ok(Arc::new(MetaManager {
            node: node.to_owned(),
            store,
            replica: Mutex::new(replica),
            outbox_ready: Notify::new(),
            online: AtomicBool::new(false),
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
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
}
