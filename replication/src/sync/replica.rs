//! A synchronous shell around [`EdgeSync`]: it commits the state machine's batches to the
//! store. edgecore runs it inside its async EdgeHub; the simulation runs it directly.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::key::ObjectKey;
use crate::store::{Store, StoreConfig, StoreError};
use crate::sync::edge::{EdgeError, EdgeSync};
use crate::sync::messages::{Down, Up};
use crate::sync::persist;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Protocol(#[from] EdgeError),
}

pub struct EdgeReplica {
    store: Arc<Store>,
    sync: EdgeSync,
}

impl EdgeReplica {
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self, StoreError> {
        Self::from_store(Store::open(path, config)?)
    }

    pub fn from_store(store: Store) -> Result<Self, StoreError> {
        Self::from_shared(Arc::new(store))
    }

    /// Over a store others read too (the edge's MetaServer and Edged); only this replica
    /// writes it.
    pub fn from_shared(store: Arc<Store>) -> Result<Self, StoreError> {
        let sync = EdgeSync::new(persist::load_edge(&store)?);
        Ok(EdgeReplica { store, sync })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn shared_store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn sync(&self) -> &EdgeSync {
        &self.sync
    }

    pub fn link_up(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        self.sync.link_up();
        Ok(())
    }

    pub fn link_down(&mut self) {
        self.sync.link_down();
    }

    /// See [`EdgeSync::on_connected`]; a new session's hello is sent after a flush, so that
    /// the watermark it carries is durable.
    pub fn on_connected(&mut self, new_session: bool) -> Result<(), StoreError> {
        if new_session {
            self.flush()?;
        }
        self.sync.on_connected(new_session);
        Ok(())
    }

    /// See [`EdgeSync::on_disconnected`].
    pub fn on_disconnected(&mut self) {
        self.sync.on_disconnected();
    }

    /// Takes in one message; its writes wait for [`EdgeReplica::flush`], so that many messages
    /// share one commit (one fsync).
    pub fn receive(&mut self, message: Down) -> Result<(), EdgeError> {
        if matches!(message, Down::HelloRequest) {
            // The hello it asks for carries our watermark: make it durable first. A failed
            // flush already starts a new session from what the store holds.
            let _ = self.flush();
        }
        self.sync.receive(message)
    }

    /// Commits what was received or reported since the last flush; acks and reports become
    /// sendable once it is durable. On a store error the in-memory state is rebuilt from the
    /// store, so it never claims what the store does not hold.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        let Some(batch) = self.sync.take_batch() else {
            return Ok(());
        };
        match self.store.commit(batch.writes) {
            Ok(_) => {
                self.sync.durable(batch.token);
                Ok(())
            }
            Err(error) => {
                let was_connected = self.sync.is_connected();
                let mut sync = EdgeSync::new(persist::load_edge(&self.store)?);
                // The session this state machine was in cannot be trusted any more: a new
                // hello tells the cloud what is really held, now if the link is up (it may
                // stay up for days: waiting for the next connection would leave the node
                // deaf), else at the next connection.
                sync.link_down();
                if was_connected {
                    sync.link_up();
                }
                self.sync = sync;
                Err(error)
            }
        }
    }

    /// The node's own write of an object it holds, committed at once and queued upward.
    pub fn report(&mut self, key: ObjectKey, object: Bytes) -> Result<u64, ReplicaError> {
        let id = self.stage_report(key, object)?;
        self.flush()?;
        Ok(id)
    }

    /// Queues a report for the next flush, with the held bytes as the base of a patch (only
    /// kinds that can go as patches need them).
    fn stage_report(&mut self, key: ObjectKey, object: Bytes) -> Result<u64, ReplicaError> {
        let before = match crate::sync::status_patch::owned_part(key.kind()) {
            Some(_) => self.store.get(&key)?.map(|v| v.object),
            None => None,
        };
        Ok(self.sync.report_on(key, object, before.as_deref())?)
    }

    /// Several reports and the caller's own bookkeeping `extra`, in one commit (one fsync):
    /// either all of them are durable and queued, or none.
    pub fn report_batch(
        &mut self,
        reports: Vec<(ObjectKey, Bytes)>,
        extra: crate::store::WriteSet,
    ) -> Result<(), ReplicaError> {
        for (key, object) in reports {
            self.stage_report(key, object)?;
        }
        self.sync.stage(extra);
        self.flush()?;
        Ok(())
    }

    pub fn poll_transmit(&mut self) -> Option<Up> {
        self.sync.poll_transmit()
    }
}
