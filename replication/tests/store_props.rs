//! Property tests: the store against an in-memory model, and the watch window against the
//! list of everything ever published.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use replication::{
    ChangeKind, KeyRange, ObjectKey, Precondition, ResourceVersion, Revision, Store, StoreConfig,
    StoreError, WatchConfig, WatchError, WriteSet,
};

#[derive(Debug, Clone)]
enum Op {
    Put { name: u8, expect: Expect, value: u8 },
    Delete { name: u8, expect: Expect },
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    None,
    Absent,
    Exists,
    /// The current version, or a stale one.
    Current,
    Stale,
}

fn op() -> impl Strategy<Value = Op> {
    let expect = prop_oneof![
        Just(Expect::None),
        Just(Expect::Absent),
        Just(Expect::Exists),
        Just(Expect::Current),
        Just(Expect::Stale),
    ];
    prop_oneof![
        (0u8..6, expect.clone(), any::<u8>()).prop_map(|(name, expect, value)| Op::Put {
            name,
            expect,
            value
        }),
        (0u8..6, expect).prop_map(|(name, expect)| Op::Delete { name, expect }),
    ]
}

fn key(name: u8) -> ObjectKey {
    ObjectKey::new(
        if name.is_multiple_of(2) {
            "pods"
        } else {
            "configmaps"
        },
        "ns",
        &format!("o{name}"),
    )
    .unwrap()
}

fn precondition(expect: Expect, current: Option<u64>) -> Precondition {
    match expect {
        Expect::None => Precondition::None,
        Expect::Absent => Precondition::Absent,
        Expect::Exists => Precondition::Exists,
        Expect::Current => Precondition::Version(ResourceVersion(current.unwrap_or(1))),
        Expect::Stale => {
            Precondition::Version(ResourceVersion(current.unwrap_or(1).saturating_sub(1)))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model_and_survives_reopen(
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..25),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::cloud();
        config.sync_writes = false;
        config.watch = WatchConfig { history: 1_000, lag_limit: 1_000 };
        let mut model: BTreeMap<ObjectKey, (u64, Bytes)> = BTreeMap::new();
        let mut revision = 0u64;
        {
            let store = Store::open(dir.path(), config.clone()).unwrap();
            let mut watcher = store.watch().subscribe(KeyRange::all(), None).unwrap();
            let mut published = Vec::new();
            for batch in batches {
                // Apply to a scratch copy of the model: all of the batch or none of it.
                let mut next = model.clone();
                let mut next_revision = revision;
                let mut expected_error = false;
                let mut set = WriteSet::new();
                for op in batch {
                    match op {
                        Op::Put { name, expect, value } => {
                            let k = key(name);
                            let current = next.get(&k).map(|(rv, _)| *rv);
                            let pre = precondition(expect, current);
                            let ok = match pre {
                                Precondition::None => true,
                                Precondition::Absent => current.is_none(),
                                Precondition::Exists => current.is_some(),
                                Precondition::Version(v) => current == Some(v.get()),
                            };
                            let bytes = Bytes::from(vec![value; 3]);
                            set.put(k.clone(), bytes.clone(), pre);
                            if ok {
                                next_revision += 1;
                                next.insert(k, (next_revision, bytes));
                            } else {
                                expected_error = true;
                            }
                        }
                        Op::Delete { name, expect } => {
                            let k = key(name);
                            let current = next.get(&k).map(|(rv, _)| *rv);
                            let pre = precondition(expect, current);
                            let ok = current.is_some() && match pre {
                                Precondition::Absent => false,
                                Precondition::Version(v) => current == Some(v.get()),
                                _ => true,
                            };
                            set.delete(k.clone(), pre);
                            if ok {
                                next_revision += 1;
                                next.remove(&k);
                            } else {
                                expected_error = true;
                            }
                        }
                    }
                }
                match store.commit(set) {
                    Ok(changes) => {
                        prop_assert!(!expected_error, "commit should have failed");
                        model = next;
                        revision = next_revision;
                        published.extend(changes.iter().map(|c| (c.revision, c.key.clone(), c.kind)));
                    }
                    Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_) | StoreError::NotFound(_)) => {
                        prop_assert!(expected_error, "commit should have succeeded");
                    }
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                }
                prop_assert_eq!(store.revision().get(), revision);
            }
            // The watcher saw exactly what was committed, in revision order.
            let mut seen = Vec::new();
            while let Some(change) = watcher.try_next().unwrap() {
                seen.push((change.revision, change.key.clone(), change.kind));
            }
            prop_assert_eq!(&seen, &published);
            prop_assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
            prop_assert!(seen.iter().all(|(_, _, kind)| matches!(kind, ChangeKind::Added | ChangeKind::Modified | ChangeKind::Deleted)));
        }
        let store = Store::open(dir.path(), config).unwrap();
        prop_assert_eq!(store.revision().get(), revision);
        let listed: BTreeMap<ObjectKey, (u64, Bytes)> = store
            .scan(&KeyRange::all())
            .map(|item| item.map(|(k, v)| (k, (v.rv.get(), v.object))))
            .collect::<Result<_, _>>()
            .unwrap();
        prop_assert_eq!(listed, model);
    }

    #[test]
    fn watch_resumes_exactly_or_says_gone(
        writes in 1usize..60,
        history in 1usize..20,
        from in 0u64..70,
        kind_filter in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::cloud();
        config.sync_writes = false;
        config.watch = WatchConfig { history, lag_limit: 1_000 };
        let store = Store::open(dir.path(), config).unwrap();
        let mut all = Vec::new();
        for i in 0..writes {
            let mut set = WriteSet::new();
            set.put(key((i % 6) as u8), Bytes::from(vec![i as u8]), Precondition::None);
            all.extend(store.commit(set).unwrap());
        }
        let range = if kind_filter { KeyRange::kind("pods").unwrap() } else { KeyRange::all() };
        let latest = writes as u64;
        let oldest = latest.saturating_sub(history as u64);
        match store.watch().subscribe(range.clone(), Some(Revision(from))) {
            Ok(mut watcher) => {
                prop_assert!(from >= oldest && from <= latest);
                let mut got = Vec::new();
                while let Some(change) = watcher.try_next().unwrap() {
                    got.push(change.revision.get());
                }
                let want: Vec<u64> = all
                    .iter()
                    .filter(|c| c.revision.get() > from && range.contains(&c.key))
                    .map(|c| c.revision.get())
                    .collect();
                prop_assert_eq!(got, want);
            }
            Err(WatchError::Gone { .. }) => prop_assert!(from < oldest),
            Err(WatchError::Future { .. }) => prop_assert!(from > latest),
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }
}
