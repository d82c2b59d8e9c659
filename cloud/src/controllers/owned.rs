//! The objects that have owners, of the kinds whose objects are only ever dependents (pods,
//! PersistentVolumeClaims, ControllerRevisions), kept in memory and current by one watch of the
//! store, as kube-rs's reflector keeps a cache: the garbage collector's passes (at least one a
//! second) read them here instead of scanning every pod of the store for `ownerReferences`,
//! which at 20,000 nodes × 10 pods was a large share of the cloud's CPU at rest
//! (BENCHMARKS.md "Fleet: 20,000 hollow nodes").
//!
//! [`OwnedIndex`] is the sans-IO core (a re-list and one change at a time, any clock);
//! [`maintain`] is its shell over a [`ResumableWatcher`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::watcher::{Event, ResumableWatcher};
use replication::{KeyRange, ObjectKey, Revision, Store};

use super::{contains, OWNER_REFERENCES};

/// See the module docs.
pub struct OwnedIndex {
    kinds: &'static [&'static str],
    /// Key → (stored bytes, revision) of each object of the kinds that has owners.
    objects: Mutex<BTreeMap<ObjectKey, (Bytes, Revision)>>,
    progress: Progress,
}

/// An index kept by a watch of the store ([`maintain`]).
pub trait Reflects: Send + Sync {
    /// Reads what it indexes from the store again (at the start, and when the watch lost its
    /// history), as of `revision` or later.
    fn relist(&self, store: &Store, revision: Revision);
    /// Reflects one committed change (of any kind; others only advance its revision).
    fn apply(&self, change: &replication::Change);
}

/// How far an index has reflected the store: listed or not, and up to which revision; a pass
/// waits on it ([`Progress::wait_for`]) to see its own earlier writes.
#[derive(Default)]
pub struct Progress {
    state: Mutex<(bool, Revision)>,
    /// Woken after every change applied.
    applied: tokio::sync::Notify,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, (bool, Revision)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A re-list as of `revision` is done.
    pub fn listed_at(&self, revision: Revision) {
        let mut state = self.lock();
        *state = (true, state.1.max(revision));
        drop(state);
        self.applied.notify_waiters();
    }

    /// Every change up to `revision` is reflected.
    pub fn reached(&self, revision: Revision) {
        let mut state = self.lock();
        state.1 = state.1.max(revision);
        drop(state);
        self.applied.notify_waiters();
    }

    /// Whether a re-list has happened (before it the index knows nothing).
    pub fn listed(&self) -> bool {
        self.lock().0
    }

    /// Whether every change up to `revision` is reflected.
    pub fn has(&self, revision: Revision) -> bool {
        let (listed, at) = *self.lock();
        listed && at >= revision
    }

    /// Waits (at most `limit`) until every change up to `revision` is reflected; whether it
    /// is. A pass waits for the store's revision at its start, so that it sees its own
    /// earlier writes as a read of the store would.
    pub async fn wait_for(&self, revision: Revision, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let applied = self.applied.notified();
            tokio::pin!(applied);
            applied.as_mut().enable();
            if self.has(revision) {
                return true;
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return self.has(revision);
            }
        }
    }
}

impl OwnedIndex {
    /// An empty index of `kinds` (store kinds: plurals); it knows nothing until
    /// [`Reflects::relist`].
    pub fn new(kinds: &'static [&'static str]) -> Self {
        OwnedIndex {
            kinds,
            objects: Mutex::new(BTreeMap::new()),
            progress: Progress::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ObjectKey, (Bytes, Revision)>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How far the index has reflected the store.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }
}

impl Reflects for OwnedIndex {
    fn relist(&self, store: &Store, revision: Revision) {
        let mut objects = BTreeMap::new();
        for kind in self.kinds {
            let Ok(range) = KeyRange::kind(kind) else {
                continue;
            };
            for (key, v) in store.scan(&range).flatten() {
                if contains(&v.object, OWNER_REFERENCES) {
                    objects.insert(key, (v.object, v.revision));
                }
            }
        }
        *self.lock() = objects;
        self.progress.listed_at(revision);
    }

    fn apply(&self, change: &replication::Change) {
        if self.kinds.contains(&change.key.kind()) {
            let mut objects = self.lock();
            if !change.is_delete() && contains(&change.object, OWNER_REFERENCES) {
                objects.insert(change.key.clone(), (change.object.clone(), change.revision));
            } else {
                objects.remove(&change.key);
            }
        }
        self.progress.reached(change.revision);
    }
}

impl OwnedIndex {
    /// The objects of `kind` that have owners, parsed (with their resourceVersion), in key
    /// order; `None` before the first re-list.
    pub fn objects(&self, kind: &str) -> Option<Vec<Object>> {
        if !self.progress.listed() {
            return None;
        }
        let range = KeyRange::kind(kind).ok()?;
        let objects = self.lock();
        Some(
            objects
                .iter()
                .filter(|(key, _)| range.contains(key))
                .filter_map(|(_, (bytes, revision))| object::decode_stored(bytes, *revision).ok())
                .collect(),
        )
    }

    /// How many objects the index holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps `index` current with `store` until the store closes: a re-list on every
/// [`Event::Restart`], then each change.
pub async fn maintain<I: Reflects + 'static>(index: Arc<I>, store: Arc<Store>) {
    let mut watcher = ResumableWatcher::all(store.clone());
    loop {
        match watcher.next().await {
            Ok(Event::Restart { revision }) => {
                let (index, store) = (index.clone(), store.clone());
                // A scan of every pod: off the async workers.
                if tokio::task::spawn_blocking(move || index.relist(&store, revision))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Change(change)) => index.apply(&change),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::store::Precondition;
    use replication::{StoreConfig, WriteSet};
    use serde_json::json;

    fn put(store: &Store, key: &str, value: serde_json::Value) -> Revision {
        let mut set = WriteSet::new();
        set.put(
            ObjectKey::parse(key).unwrap(),
            serde_json::to_vec(&value).unwrap().into(),
            Precondition::None,
        );
        store.commit(set).unwrap();
        store.revision()
    }

    fn delete(store: &Store, key: &str) -> Revision {
        let mut set = WriteSet::new();
        set.delete(ObjectKey::parse(key).unwrap(), Precondition::None);
        store.commit(set).unwrap();
        store.revision()
    }

    fn owned_pod(name: &str) -> serde_json::Value {
        json!({"metadata": {"name": name, "namespace": "default",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u1"}]}})
    }

    fn names(index: &OwnedIndex, kind: &str) -> Vec<String> {
        index
            .objects(kind)
            .unwrap()
            .iter()
            .map(|o| object::name(o).to_owned())
            .collect()
    }

    #[tokio::test]
    async fn the_index_follows_the_store_and_holds_only_owned_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreConfig::cloud()).unwrap());
        put(&store, "pods/default/a", owned_pod("a"));
        put(
            &store,
            "pods/default/plain",
            json!({"metadata": {"name": "plain", "namespace": "default"}}),
        );
        let index = Arc::new(OwnedIndex::new(&["pods", "persistentvolumeclaims"]));
        assert!(
            index.objects("pods").is_none(),
            "nothing known before the first list"
        );
        let task = tokio::spawn(maintain(index.clone(), store.clone()));

        let at = store.revision();
        assert!(index.progress().wait_for(at, Duration::from_secs(10)).await);
        assert_eq!(names(&index, "pods"), ["a"]);

        // A new owned pod, a claim, an owner removed from a pod, a deletion: each followed.
        put(&store, "pods/default/b", owned_pod("b"));
        put(&store, "persistentvolumeclaims/default/c", owned_pod("c"));
        put(
            &store,
            "pods/default/a",
            json!({"metadata": {"name": "a", "namespace": "default"}}),
        );
        let at = put(&store, "replicasets/default/rs", owned_pod("rs"));
        assert!(index.progress().wait_for(at, Duration::from_secs(10)).await);
        assert_eq!(names(&index, "pods"), ["b"]);
        assert_eq!(names(&index, "persistentvolumeclaims"), ["c"]);
        assert!(
            index.objects("replicasets").unwrap().is_empty(),
            "not an indexed kind"
        );
        let at = delete(&store, "pods/default/b");
        assert!(index.progress().wait_for(at, Duration::from_secs(10)).await);
        assert!(names(&index, "pods").is_empty());
        assert_eq!(index.len(), 1);

        // A revision never committed is not waited for forever.
        assert!(
            !index
                .progress()
                .wait_for(Revision(at.0 + 100), Duration::from_millis(50))
                .await
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_pass_reads_the_index_as_it_would_read_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreConfig::cloud()).unwrap());
        for i in 0..20 {
            put(
                &store,
                &format!("pods/default/p{i}"),
                if i % 4 == 0 {
                    owned_pod(&format!("p{i}"))
                } else {
                    json!({"metadata": {"name": format!("p{i}"), "namespace": "default"}})
                },
            );
        }
        let index = Arc::new(OwnedIndex::new(&["pods"]));
        let task = tokio::spawn(maintain(index.clone(), store.clone()));
        assert!(
            index
                .progress()
                .wait_for(store.revision(), Duration::from_secs(10))
                .await
        );
        let narrowing = super::super::Narrowing {
            owned_only: &["pods"],
            ..Default::default()
        };
        let scanned = super::super::World::load_narrowed(&store, &["pods"], narrowing);
        let indexes = super::super::Indexes {
            owned: Some(index),
            ..Default::default()
        };
        let indexed = super::super::World::load_with(&store, &["pods"], narrowing, &indexes);
        assert_eq!(scanned.pods.len(), 5);
        assert_eq!(scanned.pods, indexed.pods);
        task.abort();
    }
}
