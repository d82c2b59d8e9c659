//! Events from the control plane (core/v1 `Event`), as client-go's EventRecorder writes them,
//! so that `kubectl describe` shows what happened to an object and `kubectl get events` lists
//! it.
//!
//! - One Event per (involved object, type, reason, message, component): a repeat raises its
//!   `count` and `lastTimestamp` instead of adding an object (client-go's EventCorrelator
//!   aggregates the same way). Its name is the object's name and 16 hex digits of a hash of
//!   the rest, so a repeat finds it without a list.
//! - Events of namespaced objects live in the object's namespace; those of cluster-scoped
//!   objects (Nodes) in `default`, as Kubernetes puts them.
//! - Recording is best effort: an Event that cannot be written is logged and dropped, never
//!   failing the action it reports.
//! - Events older than [`EVENT_TTL`] (kube-apiserver's default `--event-ttl`) are deleted by
//!   [`run_ttl`].

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::{
    KeyRange, ObjectKey, Precondition, ResourceVersion, Store, StoreError, WriteSet,
};
use serde_json::{json, Value};

/// How long an Event is kept after its last occurrence (kube-apiserver's default: 1 h).
pub const EVENT_TTL: Duration = Duration::from_secs(3600);

/// An Event's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Normal operation (`Scheduled`, `SuccessfulCreate`, …).
    Normal,
    /// Something an operator may need to act on (`FailedScheduling`, `NodeNotReady`, …).
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// The object an Event is about: what goes into `involvedObject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Involved {
    /// `v1`, `apps/v1`, …
    pub api_version: String,
    /// `Pod`, `ReplicaSet`, `Node`, …
    pub kind: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Involved {
    /// From a stored object (its `apiVersion`, `kind` and `metadata`).
    pub fn of(object: &Object) -> Involved {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
        Involved {
            api_version: text(object.get("apiVersion")),
            kind: text(object.get("kind")),
            namespace: object::meta_str(object, "namespace")
                .unwrap_or_default()
                .to_owned(),
            name: object::name(object).to_owned(),
            uid: object::meta_str(object, "uid")
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// From an owner reference of a dependent in `namespace`.
    pub fn owner(reference: &Value, namespace: &str) -> Option<Involved> {
        let text = |field: &str| {
            reference
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Some(Involved {
            api_version: text("apiVersion")?,
            kind: text("kind")?,
            namespace: namespace.to_owned(),
            name: text("name")?,
            uid: text("uid").unwrap_or_default(),
        })
    }
}

fn event_key(
    involved: &Involved,
    kind: EventType,
    reason: &str,
    message: &str,
    component: &str,
) -> Option<ObjectKey> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        &involved.uid,
        &involved.kind,
        kind.as_str(),
        reason,
        message,
        component,
    )
        .hash(&mut hasher);
    let namespace = if involved.namespace.is_empty() {
        "default"
    } else {
        &involved.namespace
    };
    let name = format!("{}.{:016x}", involved.name, hasher.finish());
    ObjectKey::new("events", namespace, &name).ok()
}

/// The write that records one occurrence at `now`: a new Event, or the existing one with its
/// `count` raised (with a precondition on its version).
///
/// # Errors
/// The store's read error.
#[allow(clippy::too_many_arguments)]
pub fn record(
    store: &Store,
    involved: &Involved,
    kind: EventType,
    reason: &str,
    message: &str,
    component: &str,
    now: time::OffsetDateTime,
) -> Result<WriteSet, StoreError> {
    let mut set = WriteSet::new();
    let Some(key) = event_key(involved, kind, reason, message, component) else {
        return Ok(set);
    };
    let stamp = object::rfc3339(now);
    let current = store.get(&key)?;
    let (event, expect) = match current
        .as_ref()
        .and_then(|v| serde_json::from_slice::<Value>(&v.object).ok())
    {
        Some(mut event) => {
            let count = event.get("count").and_then(Value::as_u64).unwrap_or(1) + 1;
            event["count"] = json!(count);
            event["lastTimestamp"] = json!(stamp);
            let rv = current.as_ref().map_or(ResourceVersion::ZERO, |v| v.rv);
            (event, Precondition::Version(rv))
        }
        None => {
            let mut involved_object = json!({
                "apiVersion": involved.api_version,
                "kind": involved.kind,
                "name": involved.name,
                "uid": involved.uid,
            });
            if !involved.namespace.is_empty() {
                involved_object["namespace"] = json!(involved.namespace);
            }
            let event = json!({
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": key.name(),
                    "namespace": key.namespace(),
                    "uid": uuid::Uuid::new_v4().hyphenated().to_string(),
                    "creationTimestamp": stamp,
                },
                "involvedObject": involved_object,
                "reason": reason,
                "message": message,
                "source": {"component": component},
                "reportingComponent": component,
                "reportingInstance": "cloudcore",
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
                "type": kind.as_str(),
            });
            (event, Precondition::Absent)
        }
    };
    let Value::Object(event) = event else {
        return Ok(set);
    };
    set.put(key, Bytes::from(object::to_stored(event)), expect);
    Ok(set)
}

/// Records one occurrence now and commits it (once more if a concurrent occurrence raced
/// it); failures are logged, never returned.
pub fn emit(
    store: &Store,
    involved: &Involved,
    kind: EventType,
    reason: &str,
    message: &str,
    component: &str,
) {
    for _ in 0..2 {
        let now = time::OffsetDateTime::now_utc();
        match record(store, involved, kind, reason, message, component, now) {
            Ok(set) if set.is_empty() => return,
            Ok(set) => match store.commit(set) {
                Ok(_) => return,
                Err(e) => tracing::debug!(reason, error = %e, "event raced; once more"),
            },
            Err(e) => {
                tracing::warn!(reason, error = %e, "cannot record an event");
                return;
            }
        }
    }
}

/// Deletes the Events whose `lastTimestamp` is older than `ttl` before `now_unix`. Returns how
/// many it deleted.
///
/// # Errors
/// The store's read error.
pub fn expire(store: &Store, ttl: Duration, now_unix: i64) -> Result<usize, StoreError> {
    let Ok(range) = KeyRange::kind("events") else {
        return Ok(0);
    };
    let mut set = WriteSet::new();
    let mut expired = 0;
    for item in store.scan(&range) {
        let (key, v) = item?;
        let last = serde_json::from_slice::<Value>(&v.object)
            .ok()
            .and_then(|e| {
                e.get("lastTimestamp")
                    .or_else(|| e.pointer("/metadata/creationTimestamp"))
                    .and_then(Value::as_str)
                    .and_then(object::parse_rfc3339)
            });
        if last.is_some_and(|t| now_unix - t > ttl.as_secs() as i64) {
            set.delete(key, Precondition::Version(v.rv));
            expired += 1;
        }
    }
    if expired > 0 {
        store.commit(set)?;
    }
    Ok(expired)
}

/// Expires Events every minute until the task is dropped.
pub async fn run_ttl(store: Arc<Store>, ttl: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let store = store.clone();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match tokio::task::spawn_blocking(move || expire(&store, ttl, now)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(expired = n, "events expired"),
            Ok(Ok(_)) => {}
            // A racing write (a repeat of an old event): the next round.
            Ok(Err(e)) => tracing::debug!(error = %e, "event expiry raced a write"),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::StoreConfig;

    fn pod() -> Involved {
        Involved {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: "apps".into(),
            name: "web-1".into(),
            uid: "u-1".into(),
        }
    }

    fn events(store: &Store) -> Vec<Value> {
        store
            .scan(&KeyRange::kind("events").unwrap())
            .map(|i| serde_json::from_slice(&i.unwrap().1.object).unwrap())
            .collect()
    }

    #[test]
    fn a_repeat_raises_the_count_of_one_event_and_old_events_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let t0 = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        for i in 0..3 {
            let at = t0 + Duration::from_secs(i * 10);
            let set = record(
                &store,
                &pod(),
                EventType::Normal,
                "Scheduled",
                "assigned",
                "default-scheduler",
                at,
            )
            .unwrap();
            store.commit(set).unwrap();
        }
        let set = record(
            &store,
            &pod(),
            EventType::Warning,
            "BackOff",
            "restarting",
            "kubelet",
            t0,
        )
        .unwrap();
        store.commit(set).unwrap();
        let all = events(&store);
        assert_eq!(all.len(), 2, "one per reason: {all:?}");
        let scheduled = all.iter().find(|e| e["reason"] == "Scheduled").unwrap();
        assert_eq!(scheduled["count"], 3);
        assert_eq!(scheduled["involvedObject"]["uid"], "u-1");
        assert_eq!(scheduled["metadata"]["namespace"], "apps");
        assert_eq!(scheduled["firstTimestamp"], object::rfc3339(t0));
        assert_eq!(
            scheduled["lastTimestamp"],
            object::rfc3339(t0 + Duration::from_secs(20))
        );
        assert_eq!(scheduled["type"], "Normal");

        // An hour after the BackOff, before an hour after the last Scheduled: only it goes.
        let now = t0.unix_timestamp() + 3601;
        assert_eq!(expire(&store, EVENT_TTL, now).unwrap(), 1);
        let left = events(&store);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0]["reason"], "Scheduled");
    }

    #[test]
    fn a_nodes_events_live_in_default() {
        let node = Involved {
            api_version: "v1".into(),
            kind: "Node".into(),
            namespace: String::new(),
            name: "edge-1".into(),
            uid: "n-1".into(),
        };
        let key = event_key(
            &node,
            EventType::Normal,
            "NodeReady",
            "ready",
            "node-controller",
        )
        .unwrap();
        assert_eq!(key.namespace(), "default");
        assert!(key.name().starts_with("edge-1."));
    }
}
