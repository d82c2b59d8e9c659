//! Which pods the workload controllers may act on, kept current by one watch of the store (a
//! shared informer's indexers, as client-go's `cache.Indexer`): per pod its controller's uid
//! and its labels, never the whole object. A pass of the ReplicaSet, DaemonSet, StatefulSet or
//! Job controller asks [`PodIndex::select`] for the pods of its objects (those they control,
//! and the orphans in their namespace their selectors match: adoption candidates) and reads
//! and parses only those from the store, instead of every pod of the fleet: at 20,000 nodes ×
//! 10 pods a single Deployment made each pass of each of them parse 200,000 pods.
//!
//! [`PodIndex`] is the sans-IO core (a re-list, then one change at a time);
//! [`super::owned::maintain`] is its shell over a watch.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use replication::api::object::{self, Object};
use replication::api::selector::LabelSelector;
use replication::{KeyRange, ObjectKey, Revision, Store};

use super::owned::{Progress, Reflects};

/// What the index knows of one pod.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    /// The uid of its controller (the owner reference with `controller: true`).
    controller: Option<String>,
    /// Its `metadata.labels`.
    labels: Object,
}

#[derive(Default)]
struct State {
    entries: HashMap<ObjectKey, Entry>,
    /// Controller uid → the pods it controls.
    by_controller: HashMap<String, BTreeSet<ObjectKey>>,
    /// Namespace → its pods without a controller.
    orphans: HashMap<String, BTreeSet<ObjectKey>>,
}

impl State {
    fn remove(&mut self, key: &ObjectKey) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        let (map, at) = match entry.controller {
            Some(uid) => (&mut self.by_controller, uid),
            None => (&mut self.orphans, key.namespace().to_owned()),
        };
        if let Some(set) = map.get_mut(&at) {
            set.remove(key);
            if set.is_empty() {
                map.remove(&at);
            }
        }
    }

    fn insert(&mut self, key: ObjectKey, entry: Entry) {
        self.remove(&key);
        let set = match &entry.controller {
            Some(uid) => self.by_controller.entry(uid.clone()).or_default(),
            None => self.orphans.entry(key.namespace().to_owned()).or_default(),
        };
        set.insert(key.clone());
        self.entries.insert(key, entry);
    }
}

/// One workload object whose pods a pass needs: its namespace, uid and `spec.selector`.
pub struct Owner<'a> {
    /// Its namespace (pods are adopted only from it).
    pub namespace: &'a str,
    /// Its uid (the controller reference its pods carry).
    pub uid: &'a str,
    /// Its selector; `None` (absent or invalid) adopts nothing.
    pub selector: Option<LabelSelector>,
}

impl<'a> Owner<'a> {
    /// The owner as a workload object describes itself.
    pub fn of(workload: &'a Object) -> Self {
        Owner {
            namespace: object::namespace(workload),
            uid: super::uid(workload),
            selector: workload
                .get("spec")
                .and_then(|s| s.get("selector"))
                .and_then(|s| LabelSelector::from_label_selector(s).ok())
                .filter(|s| !s.is_empty()),
        }
    }
}

/// See the module docs.
#[derive(Default)]
pub struct PodIndex {
    state: Mutex<State>,
    progress: Progress,
}

fn entry_of(stored: &[u8], revision: Revision) -> Option<Entry> {
    let pod = object::decode_stored(stored, revision).ok()?;
    Some(Entry {
        controller: super::controller_uid(&pod).map(str::to_owned),
        labels: object::labels(&pod).cloned().unwrap_or_default(),
    })
}

impl PodIndex {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How far the index has reflected the store (see [`Progress`]).
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The keys of the pods `owners` control, and of the orphans in an owner's namespace its
    /// selector matches, in key order; `None` before the first re-list.
    pub fn select(&self, owners: &[Owner<'_>]) -> Option<Vec<ObjectKey>> {
        if !self.progress.listed() {
            return None;
        }
        let state = self.lock();
        let mut keys = BTreeSet::new();
        for owner in owners {
            if let Some(controlled) = state.by_controller.get(owner.uid) {
                keys.extend(controlled.iter().cloned());
            }
            let (Some(selector), Some(orphans)) =
                (&owner.selector, state.orphans.get(owner.namespace))
            else {
                continue;
            };
            for key in orphans {
                if !keys.contains(key)
                    && selector.matches_labels(state.entries.get(key).map(|e| &e.labels))
                {
                    keys.insert(key.clone());
                }
            }
        }
        Some(keys.into_iter().collect())
    }

    /// How many pods the index knows.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the index knows no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Reflects for PodIndex {
    fn relist(&self, store: &Store, revision: Revision) {
        let mut fresh = State::default();
        if let Ok(range) = KeyRange::kind("pods") {
            for (key, v) in store.scan(&range).flatten() {
                if let Some(entry) = entry_of(&v.object, v.revision) {
                    fresh.insert(key, entry);
                }
            }
        }
        *self.lock() = fresh;
        self.progress.listed_at(revision);
    }

    fn apply(&self, change: &replication::Change) {
        if change.key.kind() == "pods" {
            let mut state = self.lock();
            match (
                change.is_delete(),
                entry_of(&change.object, change.revision),
            ) {
                (false, Some(entry)) => {
                    // Most pod changes are status reports: the index entry stays the same.
                    if state.entries.get(&change.key) != Some(&entry) {
                        state.insert(change.key.clone(), entry);
                    }
                }
                _ => state.remove(&change.key),
            }
        }
        self.progress.reached(change.revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::store::Precondition;
    use replication::{StoreConfig, WriteSet};
    use serde_json::{json, Value};

    fn put(store: &Store, name: &str, pod: Value) {
        let mut set = WriteSet::new();
        set.put(
            ObjectKey::new("pods", "default", name).unwrap(),
            serde_json::to_vec(&pod).unwrap().into(),
            Precondition::None,
        );
        store.commit(set).unwrap();
    }

    fn pod(name: &str, app: &str, controller: Option<&str>) -> Value {
        let mut metadata = json!({"name": name, "namespace": "default", "labels": {"app": app}});
        if let Some(uid) = controller {
            metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": uid, "controller": true}]);
        }
        json!({"metadata": metadata})
    }

    fn names(keys: Vec<ObjectKey>) -> Vec<String> {
        keys.iter().map(|k| k.name().to_owned()).collect()
    }

    #[test]
    fn owners_get_their_pods_and_the_orphans_they_match_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        put(&store, "mine", pod("mine", "web", Some("u1")));
        put(&store, "other", pod("other", "web", Some("u2")));
        put(&store, "orphan-web", pod("orphan-web", "web", None));
        put(&store, "orphan-db", pod("orphan-db", "db", None));
        let index = PodIndex::default();
        let selector = json!({"matchLabels": {"app": "web"}});
        let owner = |uid: &'static str| Owner {
            namespace: "default",
            uid,
            selector: LabelSelector::from_label_selector(&selector).ok(),
        };
        assert_eq!(index.select(&[owner("u1")]), None, "not listed yet");
        index.relist(&store, store.revision());
        assert_eq!(index.len(), 4);
        assert_eq!(
            names(index.select(&[owner("u1")]).unwrap()),
            ["mine", "orphan-web"]
        );
        // In another namespace an owner adopts nothing here.
        let elsewhere = Owner {
            namespace: "team-a",
            ..owner("u9")
        };
        assert!(index.select(&[elsewhere]).unwrap().is_empty());

        // Changes: the orphan is adopted by u1, "other" is deleted, a new orphan appears.
        let mut watcher_changes = Vec::new();
        let mut set = WriteSet::new();
        set.put(
            ObjectKey::new("pods", "default", "orphan-web").unwrap(),
            serde_json::to_vec(&pod("orphan-web", "web", Some("u1")))
                .unwrap()
                .into(),
            Precondition::None,
        );
        set.delete(
            ObjectKey::new("pods", "default", "other").unwrap(),
            Precondition::None,
        );
        set.put(
            ObjectKey::new("pods", "default", "late").unwrap(),
            serde_json::to_vec(&pod("late", "web", None))
                .unwrap()
                .into(),
            Precondition::None,
        );
        watcher_changes.extend(store.commit(set).unwrap());
        for change in &watcher_changes {
            index.apply(change);
        }
        assert!(index.progress().has(store.revision()));
        assert_eq!(
            names(index.select(&[owner("u1")]).unwrap()),
            ["late", "mine", "orphan-web"]
        );
        assert_eq!(
            names(index.select(&[owner("u2")]).unwrap()),
            ["late"],
            "u2's pod is gone; the orphan matches its selector too"
        );
        assert_eq!(index.len(), 4);
    }

    /// A pass reading its pods from the index acts exactly as one that scans every pod.
    #[test]
    fn a_replicaset_pass_on_the_index_acts_as_one_on_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let mut set = WriteSet::new();
        set.put(
            ObjectKey::new("replicasets", "default", "rs").unwrap(),
            serde_json::to_vec(&json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": "rs", "namespace": "default", "uid": "u1"},
                "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
            }))
            .unwrap()
            .into(),
            Precondition::None,
        );
        store.commit(set).unwrap();
        put(&store, "mine", pod("mine", "web", Some("u1")));
        put(&store, "other", pod("other", "web", Some("u2")));
        put(&store, "orphan-web", pod("orphan-web", "web", None));
        put(&store, "orphan-db", pod("orphan-db", "db", None));
        let index = std::sync::Arc::new(PodIndex::default());
        index.relist(&store, store.revision());
        let narrowing = super::super::Narrowing {
            gated: &["pods"],
            gates: &["replicasets"],
            ..Default::default()
        };
        let kinds = &["pods", "replicasets"];
        let scanned = super::super::World::load_narrowed(&store, kinds, narrowing);
        let indexes = super::super::Indexes {
            pods: Some(index),
            ..Default::default()
        };
        let indexed = super::super::World::load_with(&store, kinds, narrowing, &indexes);
        assert_eq!(scanned.pods.len(), 4);
        let read: Vec<&str> = indexed.pods.iter().map(object::name).collect();
        assert_eq!(read, ["mine", "orphan-web"]);
        let now = 1_000_000;
        let on_scan = super::super::replicaset::reconcile(&scanned, now);
        assert!(!on_scan.is_empty(), "it adopts and creates");
        assert_eq!(on_scan, super::super::replicaset::reconcile(&indexed, now));
    }
}
