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

/// Why a report could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Reading or committing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sync state machine refused the input.
    #[error(transparent)]
    Protocol(#[from] EdgeError),
}

/// An [`EdgeSync`] over its store: everything received or reported is committed by
/// [`flush`](EdgeReplica::flush) before it is acked or sent.
pub struct EdgeReplica {
    store: Arc<Store>,
    sync: EdgeSync,
}

impl EdgeReplica {
    /// Opens the store at `path` and recovers the sync state from it.
    ///
    /// # Errors
    /// As [`Store::open`], then as [`from_shared`](Self::from_shared).
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Self, StoreError> {
        Self::from_store(Store::open(path, config)?)
    }

    /// Over an open store that only this replica uses.
    ///
    /// # Errors
    /// As [`from_shared`](Self::from_shared).
    pub fn from_store(store: Store) -> Result<Self, StoreError> {
        Self::from_shared(Arc::new(store))
    }

    /// Over a store others read too (the edge's MetaServer and Edged); only this replica
    /// writes it.
    ///
    /// # Errors
    /// [`StoreError::Db`] when the store cannot be read or, for a new store, its store id cannot be
    /// committed; [`StoreError::Corrupt`] or [`StoreError::Key`] for sync records or keys that do
    /// not decode.
    pub fn from_shared(store: Arc<Store>) -> Result<Self, StoreError> {
        let sync = EdgeSync::new(persist::load_edge(&store)?);
        Ok(EdgeReplica { store, sync })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store, to share with its readers.
    pub fn shared_store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The state machine, to read its state.
    pub fn sync(&self) -> &EdgeSync {
        &self.sync
    }

    /// A connection is up and a new session starts: flushes first, so that the hello's watermark
    /// is durable. See [`EdgeSync::link_up`].
    ///
    /// # Errors
    /// As [`flush`](Self::flush); the hello is not queued then (the failed flush already queued
    /// one if connected).
    pub fn link_up(&mut self) -> Result<(), StoreError> {
        self.flush()?;
        self.sync.link_up();
        Ok(())
    }

    /// See [`EdgeSync::link_down`].
    pub fn link_down(&mut self) {
        self.sync.link_down();
    }

    /// See [`EdgeSync::on_connected`]; a new session's hello is sent after a flush, so that
    /// the watermark it carries is durable.
    ///
    /// # Errors
    /// As [`flush`](Self::flush), for a new session.
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
    ///
    /// # Errors
    /// As [`EdgeSync::receive`].
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
    ///
    /// # Errors
    /// The commit's [`StoreError`] (the state machine is then rebuilt from the store), or the
    /// error of reading the store back for that.
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
    ///
    /// Returns the report id.
    ///
    /// # Errors
    /// [`ReplicaError::Store`] when the held object cannot be read (for a kind that may go as a
    /// patch) or the commit fails.
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
    ///
    /// # Errors
    /// As [`report`](Self::report); nothing is committed then.
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

    /// See [`EdgeSync::poll_transmit`].
    pub fn poll_transmit(&mut self) -> Option<Up> {
        self.sync.poll_transmit()
    }
}
