//! A watch of the store that never ends on its own, like kube-rs's `watcher`: when it falls
//! behind the live window it resumes from the store's change history (nothing missed), and
//! only when the history no longer reaches back that far does it start over, telling the
//! caller to re-read the store ([`Event::Restart`]).
//!
//! It replaces the hand-written resubscribe loops of the watch's users (CloudHub, the
//! scheduler, the cluster mirror's write-back, Edged, DeviceTwin).

use std::sync::Arc;

use crate::change::SharedChange;
use crate::key::KeyRange;
use crate::store::Store;
use crate::version::Revision;
use crate::watch::{WatchError, Watcher};

/// What a [`ResumableWatcher`] yields.
#[derive(Debug, Clone)]
pub enum Event {
    /// The watch (re)started at `revision`: every change after it follows. The caller reads
    /// the store now (a re-list); a change it reads that also follows is delivered twice, so
    /// its handling must be idempotent (state, not deltas).
    Restart {
        /// The store's revision when the watch (re)started.
        revision: Revision,
    },
    /// One committed change in the watched range, in revision order.
    Change(SharedChange),
}

/// See the module docs.
pub struct ResumableWatcher {
    store: Arc<Store>,
    range: KeyRange,
    inner: Option<Watcher>,
    /// Every change up to this revision was seen (delivered or outside the range).
    seen: Revision,
}

impl ResumableWatcher {
    /// A watcher of `range`; its first event is [`Event::Restart`].
    pub fn new(store: Arc<Store>, range: KeyRange) -> Self {
        ResumableWatcher {
            store,
            range,
            inner: None,
            seen: Revision::ZERO,
        }
    }

    /// A watcher of the whole store.
    pub fn all(store: Arc<Store>) -> Self {
        Self::new(store, KeyRange::all())
    }

    /// The next event, waiting for one.
    ///
    /// # Errors
    /// [`WatchError::Closed`] once the store is closed; nothing else (falling behind is
    /// handled here).
    pub async fn next(&mut self) -> Result<Event, WatchError> {
        loop {
            let Some(watcher) = self.inner.as_mut() else {
                return self.restart();
            };
            match watcher.next().await {
                Ok(change) => {
                    self.seen = watcher.position();
                    return Ok(Event::Change(change));
                }
                Err(WatchError::Closed) => return Err(WatchError::Closed),
                Err(e) => self.resume(&e),
            }
        }
    }

    /// The next event if one is ready, without waiting.
    ///
    /// # Errors
    /// As [`ResumableWatcher::next`].
    pub fn try_next(&mut self) -> Result<Option<Event>, WatchError> {
        let Some(watcher) = self.inner.as_mut() else {
            return self.restart().map(Some);
        };
        match watcher.try_next() {
            Ok(Some(change)) => {
                self.seen = watcher.position();
                Ok(Some(Event::Change(change)))
            }
            Ok(None) => Ok(None),
            Err(WatchError::Closed) => Err(WatchError::Closed),
            Err(e) => {
                self.resume(&e);
                Ok(None)
            }
        }
    }

    fn restart(&mut self) -> Result<Event, WatchError> {
        let revision = self.store.revision();
        self.inner = Some(
            self.store
                .watch()
                .subscribe(self.range.clone(), Some(revision))?,
        );
        self.seen = revision;
        Ok(Event::Restart { revision })
    }

    /// Resumes from the history after `cause` (the watcher fell behind); if the history does
    /// not reach back far enough, the next call restarts.
    fn resume(&mut self, cause: &WatchError) {
        match self
            .store
            .watch()
            .subscribe(self.range.clone(), Some(self.seen))
        {
            Ok(watcher) => {
                tracing::info!(error = %cause, revision = self.seen.get(), "watch resumed from history");
                self.inner = Some(watcher);
            }
            Err(e) => {
                tracing::warn!(error = %cause, resume = %e, "watch history lost; re-reading the store");
                self.inner = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ObjectKey, Precondition, StoreConfig, WatchConfig, WriteSet};

    fn put(store: &Store, name: &str) {
        let mut set = WriteSet::new();
        set.put(
            ObjectKey::new("configmaps", "ns", name).unwrap(),
            bytes::Bytes::from_static(b"{}"),
            Precondition::None,
        );
        store.commit(set).unwrap();
    }

    fn open(dir: &std::path::Path, history: usize, lag_limit: usize) -> Arc<Store> {
        let mut config = StoreConfig::cloud();
        config.sync_writes = false;
        config.watch = WatchConfig { history, lag_limit };
        Arc::new(Store::open(dir, config).unwrap())
    }

    #[tokio::test]
    async fn starts_with_a_restart_then_delivers_changes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100, 16);
        put(&store, "before");
        let mut watcher = ResumableWatcher::all(store.clone());
        let Event::Restart { revision } = watcher.next().await.unwrap() else {
            panic!("first event is a restart")
        };
        assert_eq!(revision, store.revision());
        put(&store, "a");
        put(&store, "b");
        for name in ["a", "b"] {
            match watcher.next().await.unwrap() {
                Event::Change(c) => assert_eq!(c.key.name(), name),
                other => panic!("expected a change, got {other:?}"),
            }
        }
        assert!(watcher.try_next().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_watcher_left_behind_resumes_from_history_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        // A live window of 4 and a history of 1,000: 50 changes overflow the window only.
        let store = open(dir.path(), 1000, 4);
        let mut watcher = ResumableWatcher::all(store.clone());
        assert!(matches!(
            watcher.next().await.unwrap(),
            Event::Restart { .. }
        ));
        for i in 0..50 {
            put(&store, &format!("c{i}"));
        }
        for i in 0..50 {
            match watcher.next().await.unwrap() {
                Event::Change(c) => assert_eq!(c.key.name(), format!("c{i}")),
                Event::Restart { .. } => panic!("history reaches back: no restart"),
            }
        }
    }

    #[tokio::test]
    async fn a_watcher_behind_the_history_restarts_at_the_current_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 8, 4);
        let mut watcher = ResumableWatcher::all(store.clone());
        assert!(matches!(
            watcher.next().await.unwrap(),
            Event::Restart { .. }
        ));
        for i in 0..50 {
            put(&store, &format!("c{i}"));
        }
        let mut restarted = None;
        for _ in 0..60 {
            if let Event::Restart { revision } = watcher.next().await.unwrap() {
                restarted = Some(revision);
                break;
            }
        }
        assert_eq!(restarted, Some(store.revision()));
        put(&store, "after");
        match watcher.next().await.unwrap() {
            Event::Change(c) => assert_eq!(c.key.name(), "after"),
            other => panic!("expected the next change, got {other:?}"),
        }
    }
}
