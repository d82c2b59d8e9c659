//! Node lifecycle: a node's heartbeat (one small frame on its link, see CloudHub) renews its
//! Lease in `kube-node-lease`; an edge node whose Lease has not been renewed for the grace
//! period is marked `Ready=Unknown` (NotReady) and tainted `node.kubernetes.io/unreachable`
//! (`NoSchedule`, and `NoExecute` with its `timeAdded`), as Kubernetes' node lifecycle
//! controller does; when its Lease is renewed again it is marked Ready and the taints go.
//!
//! Pods on a NotReady node are left alone by default: an edge node keeps running its pods
//! while the cloud cannot see it (edge autonomy), and a Deployment does not pile up
//! replacements for a node that is only offline (kubeedge#4659). With an eviction delay
//! (`cloudcore --evict-pods-from-unreachable-nodes-after`), the taint manager of Kubernetes is
//! followed: a pod that does not tolerate the `NoExecute` taint is evicted that long after the
//! taint was added, one that tolerates it with `tolerationSeconds` after those seconds, one that
//! tolerates it without them never; DaemonSet pods and mirror pods are never evicted (Kubernetes
//! gives DaemonSet pods that toleration). Eviction is a graceful deletion with the pod condition
//! `DisruptionTarget` (reason `DeletionByTaintManager`) and a `TaintManagerEviction` event; the
//! pod stays Terminating until its node confirms, and its controller replaces it meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::{KeyRange, ObjectKey, Precondition, Store, StoreError, WriteSet};
use serde_json::{json, Value};

use crate::events::{EventType, Involved};
use crate::metrics::Metrics;
use crate::scheduler::{node_is_ready, ready_condition, EDGE_ROLE_LABEL};

/// Reason written when the lifecycle marks a node NotReady (and the only one it clears).
pub const STALE_REASON: &str = "NodeStatusUnknown";

/// The taint an unreachable node gets (`NoSchedule` and `NoExecute`).
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// How long a renewal holds, written in the Lease, for a node that does not say how often it
/// beats (kubelet's default: four of its 10 s renewals).
pub const LEASE_DURATION_SECONDS: u64 = 40;

/// Heartbeats a Lease outlasts: a node's `leaseDurationSeconds` is this many of its periods,
/// as kubelet's 40 s Lease is four of its 10 s renewals.
pub const HEARTBEATS_PER_LEASE: u32 = 4;

/// The `leaseDurationSeconds` for a node that beats every `period` (`None`: not said):
/// [`HEARTBEATS_PER_LEASE`] periods, rounded up to whole seconds, at least 1.
pub fn lease_duration_seconds(period: Option<Duration>) -> u64 {
    period.map_or(LEASE_DURATION_SECONDS, |p| {
        (p * HEARTBEATS_PER_LEASE).as_secs_f64().ceil().max(1.0) as u64
    })
}

/// The Lease of `node` renewed at `renew_time` (a `MicroTime`) to hold `duration_seconds`, on
/// top of the current one if there is one (its other fields are kept).
pub fn renewed_lease(
    node: &str,
    current: Option<Object>,
    renew_time: &str,
    duration_seconds: u64,
) -> Object {
    let mut lease = current.unwrap_or_else(|| {
        let fresh = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": node,
                "namespace": "kube-node-lease",
                "uid": uuid::Uuid::new_v4().hyphenated().to_string(),
                "creationTimestamp": object::now_rfc3339(),
            },
        });
        fresh.as_object().cloned().unwrap_or_default()
    });
    let spec = lease.entry("spec").or_insert_with(|| json!({}));
    if !spec.is_object() {
        *spec = json!({});
    }
    if let Some(spec) = spec.as_object_mut() {
        spec.insert("holderIdentity".into(), json!(node));
        spec.insert("leaseDurationSeconds".into(), json!(duration_seconds));
        spec.insert("renewTime".into(), json!(renew_time));
    }
    lease
}

/// The shortest interval between two renewals of one node's Lease (nodes beat every 10 s).
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

/// Lease renewal from heartbeats, sans-IO: CloudHub tells it of each heartbeat, and asks
/// which Leases are due for a write at `now`. A node that beats more often than
/// [`MIN_RENEWAL_INTERVAL`] renews no more often than that: each renewal is a write, and the
/// link is the node's to flood.
#[derive(Default)]
pub struct LeaseRenewals {
    beating: HashSet<Arc<str>>,
    renewed_at: HashMap<Arc<str>, Instant>,
    /// Heartbeat periods nodes announced (absent: not said).
    periods: HashMap<Arc<str>, Duration>,
}

impl LeaseRenewals {
    /// A heartbeat arrived from `node`, which beats every `period` (`None`: not said).
    pub fn on_heartbeat(&mut self, node: &Arc<str>, period: Option<Duration>) {
        self.beating.insert(node.clone());
        if let Some(period) = period {
            if self.periods.get(node) != Some(&period) {
                self.periods.insert(node.clone(), period);
            }
        }
    }

    /// The `leaseDurationSeconds` `node`'s Lease gets: [`lease_duration_seconds`] of the period
    /// it announced.
    pub fn duration_seconds(&self, node: &str) -> u64 {
        lease_duration_seconds(self.periods.get(node).copied())
    }

    /// The nodes whose Lease should be written now: they beat since the last call and were
    /// not renewed in the last [`MIN_RENEWAL_INTERVAL`] before `now`. Recorded as renewed.
    pub fn due(&mut self, now: Instant) -> Vec<Arc<str>> {
        let mut due = Vec::new();
        for node in self.beating.drain() {
            let recent = self
                .renewed_at
                .get(&node)
                .is_some_and(|at| now.saturating_duration_since(*at) < MIN_RENEWAL_INTERVAL);
            if !recent {
                self.renewed_at.insert(node.clone(), now);
                due.push(node);
            }
        }
        due.sort();
        due
    }
}

/// The write renewing `node`'s Lease at `renew_time` (a `MicroTime`) on top of the Lease as
/// it is now, with a precondition on its version. The renewal time is the cloud's clock at
/// receipt of the heartbeat, so a node's clock skew cannot make it look alive or dead.
///
/// # Errors
/// The store's read error (never taken for an absent Lease).
pub fn lease_renewal(
    store: &Store,
    node: &str,
    renew_time: &str,
    duration_seconds: u64,
) -> Result<WriteSet, StoreError> {
    let mut set = WriteSet::new();
    let Ok(key) = ObjectKey::new("leases", "kube-node-lease", node) else {
        return Ok(set);
    };
    let current = store.get(&key)?;
    let held = current
        .as_ref()
        .and_then(|v| serde_json::from_slice::<Object>(&v.object).ok());
    let lease = renewed_lease(node, held, renew_time, duration_seconds);
    let expect = current.map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
    set.put(key, Bytes::from(object::to_stored(lease)), expect);
    Ok(set)
}

/// When `node`'s Lease was last renewed (unix seconds), and its `leaseDurationSeconds`.
fn lease_renewed_unix(store: &Store, node: &str) -> (Option<i64>, Option<u64>) {
    let Ok(key) = ObjectKey::new("leases", "kube-node-lease", node) else {
        return (None, None);
    };
    let Some(lease) = store
        .get(&key)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice::<Object>(&v.object).ok())
    else {
        return (None, None);
    };
    let spec = lease.get("spec");
    // MicroTime: RFC 3339 with fractional seconds.
    let renewed = spec
        .and_then(|s| s.get("renewTime")?.as_str())
        .and_then(object::parse_rfc3339);
    let duration = spec.and_then(|s| s.get("leaseDurationSeconds")?.as_u64());
    (renewed, duration)
}

fn set_ready(node: &mut Object, ready: bool, now: &str) {
    let condition = if ready {
        json!({"type": "Ready", "status": "True", "reason": "EdgeLeaseRenewed",
               "message": "the node renews its lease", "lastHeartbeatTime": now,
               "lastTransitionTime": now})
    } else {
        json!({"type": "Ready", "status": "Unknown", "reason": STALE_REASON,
               "message": "the node stopped renewing its lease; its pods keep running (edge autonomy)",
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let status = node.entry("status").or_insert_with(|| json!({}));
    let Some(status) = status.as_object_mut() else {
        return;
    };
    let conditions = status.entry("conditions").or_insert_with(|| json!([]));
    if let Some(list) = conditions.as_array_mut() {
        list.retain(|c| c.get("type").and_then(Value::as_str) != Some("Ready"));
        list.push(condition);
    }
}

/// Puts the unreachable taints on `node` (keeping a `NoExecute` one's `timeAdded`), or takes
/// them off.
fn set_unreachable_taints(node: &mut Object, unreachable: bool, now: &str) {
    let spec = node.entry("spec").or_insert_with(|| json!({}));
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    let taints = spec.entry("taints").or_insert_with(|| json!([]));
    let Some(list) = taints.as_array_mut() else {
        return;
    };
    let ours = |t: &Value| t.get("key").and_then(Value::as_str) == Some(UNREACHABLE_TAINT);
    if !unreachable {
        list.retain(|t| !ours(t));
        if list.is_empty() {
            spec.remove("taints");
        }
        return;
    }
    for effect in ["NoSchedule", "NoExecute"] {
        let present = list
            .iter()
            .any(|t| ours(t) && t.get("effect").and_then(Value::as_str) == Some(effect));
        if !present {
            let mut taint = json!({"key": UNREACHABLE_TAINT, "effect": effect});
            if effect == "NoExecute" {
                taint["timeAdded"] = json!(now);
            }
            list.push(taint);
        }
    }
}

/// When the node's unreachable `NoExecute` taint was added (Unix seconds), if it has one.
fn unreachable_since(node: &Object) -> Option<i64> {
    node.get("spec")?
        .get("taints")?
        .as_array()?
        .iter()
        .find(|t| {
            t.get("key").and_then(Value::as_str) == Some(UNREACHABLE_TAINT)
                && t.get("effect").and_then(Value::as_str) == Some("NoExecute")
        })
        .and_then(|t| object::parse_rfc3339(t.get("timeAdded")?.as_str()?))
}

/// How long `pod` may stay on a node tainted unreachable (`NoExecute`) before it is evicted:
/// its matching toleration's `tolerationSeconds` (`None`: tolerated for ever), or `default`
/// when no toleration matches. DaemonSet and mirror pods are tolerated for ever.
fn tolerated_for(pod: &Object, default: Duration) -> Option<Duration> {
    let meta = object::meta(pod);
    let daemon = meta
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter().any(|r| {
                r.get("kind").and_then(Value::as_str) == Some("DaemonSet")
                    && r.get("controller").and_then(Value::as_bool) == Some(true)
            })
        });
    let mirror = meta
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get("kubernetes.io/config.mirror"))
        .is_some();
    if daemon || mirror {
        return None;
    }
    let taint = json!({"key": UNREACHABLE_TAINT, "effect": "NoExecute"});
    let tolerations = pod
        .get("spec")
        .and_then(|s| s.get("tolerations"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let matching: Vec<&Value> = tolerations
        .iter()
        .filter(|t| crate::scheduler::tolerates(std::slice::from_ref(*t), &taint))
        .collect();
    if matching.is_empty() {
        return Some(default);
    }
    // As the taint manager: the shortest of the matching tolerations; any without seconds
    // tolerates for ever only if all are without.
    matching
        .iter()
        .filter_map(|t| t.get("tolerationSeconds").and_then(Value::as_i64))
        .min()
        .map(|s| Duration::from_secs(s.max(0) as u64))
}

/// The taint manager's pass: evicts the pods bound to unreachable edge nodes whose toleration
/// of the `NoExecute` taint ran out by `now_unix`. Returns how many it evicted.
fn evict(
    store: &Store,
    unreachable: &HashMap<String, i64>,
    default: Duration,
    now_unix: i64,
) -> usize {
    let Ok(range) = KeyRange::kind("pods") else {
        return 0;
    };
    let now = rfc3339_at(now_unix);
    let mut evicted = 0;
    for (key, current) in store.scan(&range).flatten() {
        let Ok(mut pod) = serde_json::from_slice::<Object>(&current.object) else {
            continue;
        };
        let node = pod
            .get("spec")
            .and_then(|s| s.get("nodeName"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let Some(&since) = unreachable.get(&node) else {
            continue;
        };
        if object::meta(&pod).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            continue;
        }
        let Some(allowed) = tolerated_for(&pod, default) else {
            continue;
        };
        if now_unix - since < allowed.as_secs() as i64 {
            continue;
        }
        let grace = pod
            .get("spec")
            .and_then(|s| s.get("terminationGracePeriodSeconds"))
            .and_then(Value::as_i64)
            .unwrap_or(30);
        let metadata = object::meta_mut(&mut pod);
        metadata.insert("deletionTimestamp".into(), json!(now));
        metadata.insert("deletionGracePeriodSeconds".into(), json!(grace));
        let condition = json!({"type": "DisruptionTarget", "status": "True",
            "reason": "DeletionByTaintManager",
            "message": "Taint manager: deleting due to NoExecute taint",
            "lastTransitionTime": now});
        if let Some(status) = pod
            .entry("status")
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            let conditions = status.entry("conditions").or_insert_with(|| json!([]));
            if let Some(list) = conditions.as_array_mut() {
                list.retain(|c| c.get("type").and_then(Value::as_str) != Some("DisruptionTarget"));
                list.push(condition);
            }
        }
        let mut set = WriteSet::new();
        set.put(
            key.clone(),
            Bytes::from(object::to_stored(pod.clone())),
            Precondition::Version(current.rv),
        );
        match store.commit(set) {
            Ok(_) => {
                evicted += 1;
                tracing::warn!(pod = %key, %node, "evicted from an unreachable node");
                let message = format!(
                    "Marking for deletion Pod {}/{}",
                    key.namespace(),
                    key.name()
                );
                crate::events::emit(
                    store,
                    &Involved::of(&pod),
                    EventType::Normal,
                    "TaintManagerEviction",
                    &message,
                    "taint-eviction-controller",
                );
            }
            Err(e) => tracing::debug!(pod = %key, error = %e, "eviction raced; next pass"),
        }
    }
    evicted
}

fn marked_stale(node: &Object) -> bool {
    ready_condition(node).and_then(|c| c.get("reason")?.as_str()) == Some(STALE_REASON)
}

/// One pass over the edge nodes at `now_unix` (seconds); returns how many are Ready afterwards.
///
/// `since_unix` is when this cloudcore started watching: like Kubernetes' node lifecycle
/// controller, which times each node from its own first observation, a node is judged
/// NotReady only after a whole grace period without renewal *observed by this process*, so a
/// restarted cloud does not mark its whole fleet Unknown before the nodes could reconnect.
/// With `eviction` (`None`: off), pods on unreachable nodes are evicted as the module docs say.
pub fn check(
    store: &Store,
    grace: Duration,
    eviction: Option<Duration>,
    since_unix: i64,
    now_unix: i64,
) -> usize {
    let Ok(range) = KeyRange::kind("nodes") else {
        return 0;
    };
    let now = rfc3339_at(now_unix);
    let mut ready_count = 0;
    // Unreachable edge nodes → when their NoExecute taint was added.
    let mut unreachable: HashMap<String, i64> = HashMap::new();
    for (key, current) in store.scan(&range).flatten() {
        let Ok(mut node) = serde_json::from_slice::<Object>(&current.object) else {
            continue;
        };
        if !object::labels(&node).is_some_and(|l| l.contains_key(EDGE_ROLE_LABEL)) {
            continue;
        }
        let (renewed, lease_duration) = lease_renewed_unix(store, key.name());
        // A node that beats slowly is judged by its own Lease: never sooner than the
        // duration it holds (four of its heartbeats), whatever the configured grace.
        let grace_secs =
            i64::try_from(grace.as_secs().max(lease_duration.unwrap_or(0))).unwrap_or(i64::MAX);
        let fresh = renewed.is_some_and(|t| now_unix - t <= grace_secs);
        // Silent since this process started (or since the renewal it last saw).
        let silent_for = now_unix - renewed.map_or(since_unix, |t| t.max(since_unix));
        let ready = node_is_ready(&node);
        let change = if ready && silent_for > grace_secs {
            tracing::warn!(
                node = key.name(),
                "lease not renewed within {grace_secs}s: NotReady (pods keep running)"
            );
            Some(false)
        } else if !ready && fresh && marked_stale(&node) {
            tracing::info!(node = key.name(), "lease renewed: Ready");
            Some(true)
        } else {
            None
        };
        if change.unwrap_or(ready) {
            ready_count += 1;
        }
        // Taints follow the condition (also on a node marked stale before they existed).
        let stale = change.map_or(!ready && marked_stale(&node), |ready| !ready);
        let tainted = unreachable_since(&node).is_some();
        if change.is_none() && stale != tainted {
            let mut set = WriteSet::new();
            set_unreachable_taints(&mut node, stale, &now);
            let bytes = Bytes::from(serde_json::to_vec(&node).expect("json"));
            set.put(key.clone(), bytes, Precondition::Version(current.rv));
            if let Err(e) = store.commit(set) {
                tracing::debug!(node = key.name(), error = %e, "taint write raced; next pass");
            }
        }
        if stale {
            unreachable.insert(
                key.name().to_owned(),
                unreachable_since(&node).unwrap_or(now_unix),
            );
        }
        if let Some(ready) = change {
            set_ready(&mut node, ready, &now);
            set_unreachable_taints(&mut node, !ready, &now);
            let mut set = WriteSet::new();
            let bytes = Bytes::from(serde_json::to_vec(&node).expect("json"));
            set.put(key.clone(), bytes, Precondition::Version(current.rv));
            match store.commit(set) {
                Ok(_) => {
                    let (kind, reason) = if ready {
                        (EventType::Normal, "NodeReady")
                    } else {
                        (EventType::Warning, "NodeNotReady")
                    };
                    let message = format!("Node {} status is now: {reason}", key.name());
                    crate::events::emit(
                        store,
                        &Involved::of(&node),
                        kind,
                        reason,
                        &message,
                        "node-controller",
                    );
                }
                Err(e) => {
                    tracing::debug!(node = key.name(), error = %e, "lifecycle write raced; next pass")
                }
            }
        }
    }
    if let Some(after) = eviction {
        if !unreachable.is_empty() {
            evict(store, &unreachable, after, now_unix);
        }
    }
    ready_count
}

/// Checks every `period` until the task is dropped (`eviction`: see [`check`]).
pub async fn run(
    store: Arc<Store>,
    grace: Duration,
    eviction: Option<Duration>,
    period: Duration,
    metrics: Arc<Metrics>,
) {
    let since = time_now_unix();
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let store = store.clone();
        let now = time_now_unix();
        let ready = tokio::task::spawn_blocking(move || check(&store, grace, eviction, since, now))
            .await
            .unwrap_or(0);
        metrics.nodes_ready.set(ready as i64);
    }
}

/// `unix` seconds as an RFC 3339 timestamp (the pass's clock, so times written and times
/// compared come from one clock).
fn rfc3339_at(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(object::rfc3339)
        .unwrap_or_else(|_| object::now_rfc3339())
}

fn time_now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::StoreConfig;

    fn put(store: &Store, key: &str, value: Value) {
        let key = ObjectKey::parse(key).unwrap();
        let mut set = WriteSet::new();
        set.put(key, Bytes::from(value.to_string()), Precondition::None);
        store.commit(set).unwrap();
    }

    /// `edge-1`, an edge node that is Ready.
    fn put_ready_edge_node(store: &Store) {
        put(
            store,
            "nodes//edge-1",
            json!({"metadata": {"name": "edge-1", "labels": {EDGE_ROLE_LABEL: ""}},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
    }

    /// `edge-1`'s Lease as renewed at `renew_time`, holding the default duration.
    fn put_lease(store: &Store, renew_time: &str) {
        let lease = renewed_lease("edge-1", None, renew_time, LEASE_DURATION_SECONDS);
        put(
            store,
            "leases/kube-node-lease/edge-1",
            serde_json::to_value(lease).unwrap(),
        );
    }

    fn ready_status(store: &Store) -> String {
        let key = ObjectKey::parse("nodes//edge-1").unwrap();
        let node: Object =
            serde_json::from_slice(&store.get(&key).unwrap().unwrap().object).unwrap();
        ready_condition(&node).unwrap()["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn heartbeats_renew_a_lease_at_most_once_per_interval() {
        let mut leases = LeaseRenewals::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let t0 = Instant::now();
        leases.on_heartbeat(&a, None);
        assert_eq!(leases.due(t0), vec![a.clone()]);
        assert!(leases.due(t0).is_empty(), "no heartbeat since");
        // A flood right after: no renewal for a, while b's first heartbeat renews b.
        for ms in 0..100 {
            leases.on_heartbeat(&a, None);
            assert!(leases.due(t0 + Duration::from_millis(ms)).is_empty());
        }
        leases.on_heartbeat(&b, None);
        assert_eq!(leases.due(t0 + Duration::from_millis(100)), vec![b.clone()]);
        // After the interval, a's next heartbeat renews again.
        leases.on_heartbeat(&a, None);
        assert_eq!(leases.due(t0 + MIN_RENEWAL_INTERVAL), vec![a]);
    }

    #[test]
    fn a_renewal_keeps_the_lease_and_checks_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let first = lease_renewal(
            &store,
            "edge-1",
            "2027-01-15T08:00:00.000000Z",
            LEASE_DURATION_SECONDS,
        )
        .unwrap();
        store.commit(first).unwrap();
        let key = ObjectKey::parse("leases/kube-node-lease/edge-1").unwrap();
        let lease: Object =
            serde_json::from_slice(&store.get(&key).unwrap().unwrap().object).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "edge-1");
        let uid = lease["metadata"]["uid"].clone();
        // A stale renewal (prepared before another write) is refused by its precondition.
        let stale = lease_renewal(
            &store,
            "edge-1",
            "2027-01-15T08:00:10.000000Z",
            LEASE_DURATION_SECONDS,
        )
        .unwrap();
        let newer = lease_renewal(
            &store,
            "edge-1",
            "2027-01-15T08:00:11.000000Z",
            LEASE_DURATION_SECONDS,
        )
        .unwrap();
        store.commit(newer).unwrap();
        assert!(store.commit(stale).is_err());
        let lease: Object =
            serde_json::from_slice(&store.get(&key).unwrap().unwrap().object).unwrap();
        assert_eq!(lease["spec"]["renewTime"], "2027-01-15T08:00:11.000000Z");
        assert_eq!(lease["metadata"]["uid"], uid, "the same Lease, renewed");
    }

    #[test]
    fn a_restarted_cloud_gives_every_node_a_whole_grace_period_before_judging_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let t0 = 1_800_000_000;
        put_ready_edge_node(&store);
        let renewed = "2027-01-15T08:00:00.000000Z"; // t0
        put_lease(&store, renewed);
        let grace = Duration::from_secs(40);
        // The cloud was down for two minutes and started at t0 + 120: the node's last renewal
        // is old, but this process has not had a grace period to see a new one.
        let start = t0 + 120;
        assert_eq!(check(&store, grace, None, start, start), 1);
        assert_eq!(check(&store, grace, None, start, start + 40), 1);
        assert_eq!(ready_status(&store), "True");
        // A whole grace period after the start without a renewal: NotReady.
        assert_eq!(check(&store, grace, None, start, start + 41), 0);
        assert_eq!(ready_status(&store), "Unknown");
        // A renewal seen again: Ready.
        let renewed = "2027-01-15T08:02:50.000000Z"; // start + 50
        put_lease(&store, renewed);
        assert_eq!(check(&store, grace, None, start, start + 51), 1);
        assert_eq!(ready_status(&store), "True");
    }

    #[test]
    fn a_node_that_beats_slowly_is_judged_by_its_own_lease_duration() {
        assert_eq!(lease_duration_seconds(None), 40);
        assert_eq!(lease_duration_seconds(Some(Duration::from_secs(10))), 40);
        assert_eq!(lease_duration_seconds(Some(Duration::from_millis(250))), 1);
        assert_eq!(
            lease_duration_seconds(Some(Duration::from_millis(7_600))),
            31
        );
        let mut leases = LeaseRenewals::default();
        let node: Arc<str> = "edge-1".into();
        leases.on_heartbeat(&node, Some(Duration::from_secs(30)));
        assert_eq!(leases.duration_seconds("edge-1"), 120);
        // A heartbeat that does not say keeps what the node said before.
        leases.on_heartbeat(&node, None);
        assert_eq!(leases.duration_seconds("edge-1"), 120);
        assert_eq!(leases.duration_seconds("edge-2"), LEASE_DURATION_SECONDS);

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let t0 = 1_800_000_000; // 2027-01-15T08:00:00Z
        put_ready_edge_node(&store);
        let renewal = lease_renewal(
            &store,
            "edge-1",
            "2027-01-15T08:00:00.000000Z",
            leases.duration_seconds("edge-1"),
        )
        .unwrap();
        store.commit(renewal).unwrap();
        // The configured grace is 40 s; the node's Lease holds 120 s: Ready until then.
        let grace = Duration::from_secs(40);
        assert_eq!(check(&store, grace, None, t0, t0 + 41), 1);
        assert_eq!(check(&store, grace, None, t0, t0 + 120), 1);
        assert_eq!(check(&store, grace, None, t0, t0 + 121), 0);
        assert_eq!(ready_status(&store), "Unknown");
        // A configured grace longer than the Lease still counts.
        let store2_dir = tempfile::tempdir().unwrap();
        let store2 = Store::open(store2_dir.path(), StoreConfig::cloud()).unwrap();
        put_ready_edge_node(&store2);
        let renewal = lease_renewal(&store2, "edge-1", "2027-01-15T08:00:00.000000Z", 4).unwrap();
        store2.commit(renewal).unwrap();
        assert_eq!(check(&store2, grace, None, t0, t0 + 40), 1);
        assert_eq!(check(&store2, grace, None, t0, t0 + 41), 0);
    }

    fn get(store: &Store, key: &str) -> Value {
        let v = store.get(&ObjectKey::parse(key).unwrap()).unwrap().unwrap();
        serde_json::from_slice(&v.object).unwrap()
    }

    fn terminating(store: &Store, key: &str) -> bool {
        get(store, key)["metadata"]
            .get("deletionTimestamp")
            .is_some()
    }

    #[test]
    fn unreachable_nodes_are_tainted_and_evict_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let t0 = 1_800_000_000; // 2027-01-15T08:00:00Z
        put(
            &store,
            "nodes//edge-1",
            json!({"metadata": {"name": "edge-1", "labels": {EDGE_ROLE_LABEL: ""}},
                   "spec": {"taints": [{"key": "site", "value": "a", "effect": "NoSchedule"}]},
                   "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        put_lease(&store, "2027-01-15T08:00:00.000000Z");
        let pod = |name: &str, extra: Value| {
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "i"}]}});
            json_patch_merge(&mut pod, extra);
            put(&store, &format!("pods/default/{name}"), pod);
        };
        pod("plain", json!({}));
        pod(
            "patient",
            json!({"spec": {"tolerations": [{"key": UNREACHABLE_TAINT,
            "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 100}]}}),
        );
        pod(
            "forever",
            json!({"spec": {"tolerations": [{"operator": "Exists"}]}}),
        );
        pod(
            "agent",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1",
            "kind": "DaemonSet", "name": "a", "uid": "u", "controller": true}]}}),
        );
        let grace = Duration::from_secs(40);
        let eviction = Some(Duration::from_secs(30));

        // Unreachable: NotReady and tainted (NoSchedule, NoExecute at this pass's time), the
        // node's own taint kept; nothing evicted yet.
        assert_eq!(check(&store, grace, eviction, t0, t0 + 41), 0);
        let node = get(&store, "nodes//edge-1");
        let taints = node["spec"]["taints"].as_array().unwrap();
        assert_eq!(taints.len(), 3, "{taints:?}");
        assert!(taints.iter().any(|t| t["key"] == UNREACHABLE_TAINT
            && t["effect"] == "NoExecute"
            && t["timeAdded"] == "2027-01-15T08:00:41Z"));
        assert!(!terminating(&store, "pods/default/plain"));

        // 30 s after the taint: the pod without a toleration is evicted, gracefully, with
        // DisruptionTarget; the others stay.
        assert_eq!(check(&store, grace, eviction, t0, t0 + 70), 0);
        assert!(!terminating(&store, "pods/default/plain"), "29 s is not 30");
        check(&store, grace, eviction, t0, t0 + 71);
        let plain = get(&store, "pods/default/plain");
        assert!(plain["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(plain["metadata"]["deletionGracePeriodSeconds"], 30);
        assert_eq!(
            plain["status"]["conditions"][0]["reason"],
            "DeletionByTaintManager"
        );
        assert!(!terminating(&store, "pods/default/patient"));
        // Its own tolerationSeconds (100) for the patient one; never for the others.
        check(&store, grace, eviction, t0, t0 + 141);
        assert!(terminating(&store, "pods/default/patient"));
        check(&store, grace, eviction, t0, t0 + 10_000);
        assert!(!terminating(&store, "pods/default/forever"));
        assert!(
            !terminating(&store, "pods/default/agent"),
            "DaemonSet pods stay"
        );

        // Renewed again: Ready, and only the node's own taint is left.
        put_lease(&store, "2027-01-15T10:46:40.000000Z");
        assert_eq!(check(&store, grace, eviction, t0, t0 + 10_001), 1);
        let node = get(&store, "nodes//edge-1");
        assert_eq!(
            node["spec"]["taints"],
            json!([{"key": "site", "value": "a", "effect": "NoSchedule"}])
        );
    }

    #[test]
    fn without_an_eviction_delay_nothing_is_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::cloud()).unwrap();
        let t0 = 1_800_000_000;
        put_ready_edge_node(&store);
        put(
            &store,
            "pods/default/p",
            json!({"metadata": {"name": "p", "namespace": "default"},
                   "spec": {"nodeName": "edge-1"}}),
        );
        let grace = Duration::from_secs(40);
        assert_eq!(check(&store, grace, None, t0, t0 + 41), 0);
        check(&store, grace, None, t0, t0 + 100_000);
        assert!(!terminating(&store, "pods/default/p"), "edge autonomy");
        let node = get(&store, "nodes//edge-1");
        assert_eq!(node["spec"]["taints"].as_array().map(Vec::len), Some(2));
    }

    /// A JSON merge patch (RFC 7386) of `extra` into `target`.
    fn json_patch_merge(target: &mut Value, extra: Value) {
        match (target, extra) {
            (Value::Object(t), Value::Object(e)) => {
                for (k, v) in e {
                    json_patch_merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
            (t, e) => *t = e,
        }
    }
}
