//! Watch: in-process fan-out of committed changes with a bounded history window.
//!
//! Writers publish under the hub's lock into a bounded history and a `tokio::sync::broadcast`
//! ring; neither ever blocks a writer or grows past its bound. A watcher subscribes from a
//! revision: the history after that revision is replayed, then live changes follow, with no gap
//! and no duplicate (subscribing and publishing take the same lock). A revision older than the
//! window is [`WatchError::Gone`] (the API answers `410 Gone`, the client re-lists). A watcher
//! that falls further behind than the live ring holds is cut off with [`WatchError::TooSlow`].

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::change::SharedChange;
use crate::key::KeyRange;
use crate::version::Revision;

/// Sizes of the watch buffers.
#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    /// Changes kept for watchers that resume from an older revision.
    pub history: usize,
    /// Changes a live watcher may fall behind before it is cut off.
    pub lag_limit: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            history: 10_000,
            lag_limit: 4_096,
        }
    }
}

/// Why a watch could not start or cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The revision to resume from is older than the history window (HTTP `410 Gone`, reason
    /// `Expired`): re-list, then watch from the list's revision.
    #[error("revision {requested} is too old: history starts after {oldest}; re-list")]
    Gone {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still resumable from.
        oldest: Revision,
    },
    /// The revision to resume from was never published.
    #[error("revision {requested} is in the future: the latest is {latest}")]
    Future {
        /// The revision asked for.
        requested: Revision,
        /// The latest published revision.
        latest: Revision,
    },
    /// The watcher fell more than [`WatchConfig::lag_limit`] changes behind the live ring.
    #[error("watcher fell {missed} changes behind and was cut off; re-list")]
    TooSlow {
        /// Changes it missed.
        missed: u64,
    },
    /// The hub is gone (the store was dropped): no more changes will come.
    #[error("the store was closed")]
    Closed,
}

/// An event as a watcher sees it.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// A committed change in the watched range.
    Change(SharedChange),
    /// Every change up to this revision has been delivered (Kubernetes' BOOKMARK).
    Bookmark(Revision),
}

struct History {
    changes: VecDeque<SharedChange>,
    /// Revisions up to and including this one are no longer in `changes`.
    evicted_through: Revision,
    latest: Revision,
}

/// Fans a store's committed changes out to its [`Watcher`]s, keeping the last
/// [`WatchConfig::history`] for watchers that resume.
pub struct WatchHub {
    config: WatchConfig,
    history: Mutex<History>,
    live: broadcast::Sender<SharedChange>,
}

impl WatchHub {
    /// A hub whose history starts empty at `revision` (the store's revision when opened:
    /// watchers can resume from it, but from nothing older).
    pub fn new(config: WatchConfig, revision: Revision) -> Self {
        let (live, _) = broadcast::channel(config.lag_limit.max(1));
        WatchHub {
            config,
            history: Mutex::new(History {
                changes: VecDeque::with_capacity(config.history.min(1024)),
                evicted_through: revision,
                latest: revision,
            }),
            live,
        }
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // A panic while holding this lock cannot leave History inconsistent (each update is
        // a push then pops), so a poisoned lock is still usable.
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes changes in revision order. Called by the store with its writer lock held.
    pub(crate) fn publish(&self, changes: &[SharedChange]) {
        let mut history = self.lock();
        for change in changes {
            debug_assert!(change.revision > history.latest);
            history.latest = change.revision;
            if self.config.history > 0 {
                history.changes.push_back(change.clone());
            } else {
                history.evicted_through = change.revision;
            }
            while history.changes.len() > self.config.history {
                if let Some(old) = history.changes.pop_front() {
                    history.evicted_through = old.revision;
                }
            }
            // No receivers is not an error: nobody is watching.
            let _ = self.live.send(change.clone());
        }
    }

    /// Forgets the history and starts again at `revision` (a replica's cache reloaded from the
    /// shared store). Live watchers are not told; only a cache nobody watches yet is reset.
    pub(crate) fn restart_at(&self, revision: Revision) {
        let mut history = self.lock();
        history.changes.clear();
        history.evicted_through = revision;
        history.latest = revision;
    }

    /// Forgets the history through `revision` (the shared store compacted it): watches from
    /// older revisions then get [`WatchError::Gone`] (410), as they would from etcd.
    pub fn forget_through(&self, revision: Revision) {
        let mut history = self.lock();
        let revision = revision.min(history.latest);
        while history
            .changes
            .front()
            .is_some_and(|c| c.revision <= revision)
        {
            history.changes.pop_front();
        }
        history.evicted_through = history.evicted_through.max(revision);
    }

    /// The latest published revision.
    pub fn revision(&self) -> Revision {
        self.lock().latest
    }

    /// The oldest revision a watcher can still resume from.
    pub fn oldest_resumable(&self) -> Revision {
        self.lock().evicted_through
    }

    /// Watches changes in `range` after `from` (None: from now on).
    ///
    /// The backlog (changes in `range` after `from` still in the history) comes first, then live
    /// changes, with no gap and no duplicate.
    ///
    /// # Errors
    /// [`WatchError::Gone`] when `from` is older than [`oldest_resumable`](Self::oldest_resumable),
    /// [`WatchError::Future`] when it is past the latest revision.
    pub fn subscribe(
        &self,
        range: KeyRange,
        from: Option<Revision>,
    ) -> Result<Watcher, WatchError> {
        let history = self.lock();
        let from = from.unwrap_or(history.latest);
        if from < history.evicted_through {
            return Err(WatchError::Gone {
                requested: from,
                oldest: history.evicted_through,
            });
        }
        if from > history.latest {
            return Err(WatchError::Future {
                requested: from,
                latest: history.latest,
            });
        }
        let skip = history.changes.partition_point(|c| c.revision <= from);
        let backlog: VecDeque<SharedChange> = history
            .changes
            .range(skip..)
            .filter(|c| range.contains(&c.key))
            .cloned()
            .collect();
        let backlog_empty = backlog.is_empty();
        Ok(Watcher {
            range,
            backlog,
            live: self.live.subscribe(),
            position: if backlog_empty { history.latest } else { from },
            replay_through: history.latest,
        })
    }
}

/// One watcher's stream of events.
pub struct Watcher {
    range: KeyRange,
    backlog: VecDeque<SharedChange>,
    live: broadcast::Receiver<SharedChange>,
    /// Every change up to this revision has been seen (delivered or filtered out).
    position: Revision,
    /// Live changes at or below this revision were already in the backlog.
    replay_through: Revision,
}

impl Watcher {
    fn accept(&mut self, change: SharedChange) -> Option<SharedChange> {
        if change.revision <= self.replay_through {
            return None;
        }
        self.position = change.revision;
        self.range.contains(&change.key).then_some(change)
    }

    fn pop_backlog(&mut self) -> Option<SharedChange> {
        let change = self.backlog.pop_front()?;
        self.position = if self.backlog.is_empty() {
            self.replay_through
        } else {
            change.revision
        };
        Some(change)
    }

    fn lagged(missed: u64) -> WatchError {
        WatchError::TooSlow { missed }
    }

    /// The next change, waiting for one.
    ///
    /// # Errors
    /// [`WatchError::TooSlow`] when the watcher fell behind the live ring (changes were lost to
    /// it: drop it, and resume from [`position`](Self::position) with a new subscription, or
    /// re-list),
    /// [`WatchError::Closed`] when the hub is gone.
    pub async fn next(&mut self) -> Result<SharedChange, WatchError> {
        if let Some(change) = self.pop_backlog() {
            return Ok(change);
        }
        loop {
            match self.live.recv().await {
                Ok(change) => {
                    if let Some(change) = self.accept(change) {
                        return Ok(change);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(Self::lagged(missed))
                }
                Err(broadcast::error::RecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }

    /// The next change if one is ready.
    ///
    /// # Errors
    /// As [`next`](Self::next).
    pub fn try_next(&mut self) -> Result<Option<SharedChange>, WatchError> {
        if let Some(change) = self.pop_backlog() {
            return Ok(Some(change));
        }
        loop {
            match self.live.try_recv() {
                Ok(change) => {
                    if let Some(change) = self.accept(change) {
                        return Ok(Some(change));
                    }
                }
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                    return Err(Self::lagged(missed))
                }
                Err(broadcast::error::TryRecvError::Closed) => return Err(WatchError::Closed),
            }
        }
    }

    /// A bookmark for everything seen so far: the revision a client may resume from.
    pub fn bookmark(&self) -> WatchEvent {
        WatchEvent::Bookmark(self.position)
    }

    /// Every change up to this revision has been delivered or filtered out: the revision to resume
    /// from.
    pub fn position(&self) -> Revision {
        self.position
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, ChangeKind};
    use crate::key::ObjectKey;
    use crate::version::ResourceVersion;
    use bytes::Bytes;
    use std::sync::Arc;

    fn change(revision: u64, key: &str) -> SharedChange {
        Arc::new(Change::new(
            Revision(revision),
            ObjectKey::parse(key).unwrap(),
            ResourceVersion(revision),
            ChangeKind::Modified,
            Bytes::new(),
        ))
    }

    #[test]
    fn resume_replays_history_then_live_without_gap_or_duplicate() {
        let hub = WatchHub::new(WatchConfig::default(), Revision(0));
        hub.publish(&[
            change(1, "pods/a/x"),
            change(2, "cm/a/y"),
            change(3, "pods/a/z"),
        ]);
        let mut watcher = hub
            .subscribe(KeyRange::kind("pods").unwrap(), Some(Revision(1)))
            .unwrap();
        hub.publish(&[change(4, "pods/b/w")]);
        let revisions: Vec<u64> = std::iter::from_fn(|| watcher.try_next().unwrap())
            .map(|c| c.revision.get())
            .collect();
        assert_eq!(revisions, vec![3, 4]);
        assert!(matches!(
            watcher.bookmark(),
            WatchEvent::Bookmark(Revision(4))
        ));
    }

    #[test]
    fn too_old_is_gone_and_future_is_refused() {
        let config = WatchConfig {
            history: 2,
            lag_limit: 8,
        };
        let hub = WatchHub::new(config, Revision(10));
        assert!(matches!(
            hub.subscribe(KeyRange::all(), Some(Revision(9))),
            Err(WatchError::Gone { .. })
        ));
        hub.publish(&[
            change(11, "a/b/c"),
            change(12, "a/b/c"),
            change(13, "a/b/c"),
        ]);
        assert_eq!(hub.oldest_resumable(), Revision(11));
        assert!(matches!(
            hub.subscribe(KeyRange::all(), Some(Revision(10))),
            Err(WatchError::Gone { .. })
        ));
        assert!(hub.subscribe(KeyRange::all(), Some(Revision(11))).is_ok());
        assert!(matches!(
            hub.subscribe(KeyRange::all(), Some(Revision(14))),
            Err(WatchError::Future { .. })
        ));
    }

    #[test]
    fn a_slow_watcher_is_cut_off_and_writers_never_wait() {
        let config = WatchConfig {
            history: 4,
            lag_limit: 4,
        };
        let hub = WatchHub::new(config, Revision(0));
        let mut slow = hub.subscribe(KeyRange::all(), None).unwrap();
        let changes: Vec<_> = (1..=100).map(|r| change(r, "a/b/c")).collect();
        hub.publish(&changes);
        assert!(matches!(slow.try_next(), Err(WatchError::TooSlow { .. })));
    }
}
