//! Leader election for the singletons (scheduler, node lifecycle, workload controllers, garbage
//! collector, event expiry) when several cloudcores share one store: a `coordination.k8s.io/v1`
//! Lease, `kube-system/kedge-cloudcore`, taken and renewed as kube-controller-manager's
//! (client-go's `leaderelection`, its flags' names and defaults).
//!
//! - The holder renews `spec.renewTime` every retry period; it stops its singletons when no
//!   renewal succeeded for the renew deadline (before anyone else can take the Lease).
//! - Another replica takes the Lease when it has watched it unchanged for the lease duration,
//!   timed by its own clock (replicas' clocks need not agree), or when the holder released it
//!   (empty `holderIdentity`, written at graceful shutdown, so a hand-over takes one retry).
//! - Every write compares the Lease's resourceVersion: two replicas cannot both take it.
//!
//! [`decide`] is the pure core (tested with a simulated clock); [`run`] is its loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object;
use replication::{ObjectKey, Precondition, ResourceVersion, Store, StoreError, WriteSet};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The Lease's namespace and name.
pub const LEASE_NAMESPACE: &str = "kube-system";
/// The Lease's name.
pub const LEASE_NAME: &str = "kedge-cloudcore";

/// kube-controller-manager's `--leader-elect-*` settings.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// This replica's name in `holderIdentity` (`HOSTNAME_UUID`, as client-go's).
    pub identity: String,
    /// How long a Lease unchanged counts as held (`--leader-elect-lease-duration`, 15 s).
    pub lease_duration: Duration,
    /// The holder gives up when it could not renew for this long (`--leader-elect-renew-deadline`,
    /// 10 s; below the lease duration).
    pub renew_deadline: Duration,
    /// Time between attempts to take or renew (`--leader-elect-retry-period`, 2 s).
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// kube-controller-manager's defaults (15 s, 10 s, 2 s) and identity `HOSTNAME_UUID`.
    pub fn new() -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "cloudcore".to_owned());
        LeaderConfig {
            identity: format!("{host}_{}", uuid::Uuid::new_v4()),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// What this replica last saw of the Lease: its version and when (by its own clock) it saw
/// that version first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The Lease's resourceVersion.
    pub rv: ResourceVersion,
    /// When it was first seen at that version.
    pub since: Instant,
}

/// What to write, from the Lease as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Create the Lease, held by us.
    Create(Value),
    /// Write this Lease (take it over, or renew ours) if still at `rv`.
    Update(Value, ResourceVersion),
    /// Someone else holds it and it has not expired.
    Follow,
}

/// The decision of one round, from the Lease as read (`current`: its JSON and version) and what
/// we observed of it before. `now_wall` is written into the Lease (`acquireTime`, `renewTime`).
pub fn decide(
    config: &LeaderConfig,
    current: Option<(&Value, ResourceVersion)>,
    observed: Option<Observed>,
    now: Instant,
    now_wall: &str,
) -> Decision {
    let seconds = config.lease_duration.as_secs().max(1);
    let Some((lease, rv)) = current else {
        return Decision::Create(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE_NAME, "namespace": LEASE_NAMESPACE,
                         "uid": uuid::Uuid::new_v4().to_string(),
                         "creationTimestamp": object::now_rfc3339()},
            "spec": {"holderIdentity": config.identity, "leaseDurationSeconds": seconds,
                     "acquireTime": now_wall, "renewTime": now_wall, "leaseTransitions": 0},
        }));
    };
    let spec = lease.get("spec");
    let holder = spec
        .and_then(|s| s.get("holderIdentity"))
        .and_then(Value::as_str)
        .unwrap_or("");
    // The Lease as stored is anyone's writing: index into it only once it is an object with an
    // object `spec` (serde_json's `IndexMut` panics on other values).
    let mut next = match lease {
        Value::Object(_) => lease.clone(),
        _ => json!({}),
    };
    if !next.get("spec").is_some_and(Value::is_object) {
        next["spec"] = json!({});
    }
    if holder == config.identity {
        next["spec"]["renewTime"] = json!(now_wall);
        next["spec"]["leaseDurationSeconds"] = json!(seconds);
        return Decision::Update(next, rv);
    }
    // The holder's own duration counts when it says one (as client-go's).
    let duration = spec
        .and_then(|s| s.get("leaseDurationSeconds"))
        .and_then(Value::as_u64)
        .map(Duration::from_secs)
        .unwrap_or(config.lease_duration);
    let expired = holder.is_empty()
        || matches!(observed, Some(o) if o.rv == rv && now.duration_since(o.since) >= duration);
    if !expired {
        return Decision::Follow;
    }
    let transitions = spec
        .and_then(|s| s.get("leaseTransitions"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    next["spec"] = json!({"holderIdentity": config.identity, "leaseDurationSeconds": seconds,
                          "acquireTime": now_wall, "renewTime": now_wall,
                          "leaseTransitions": transitions + 1});
    Decision::Update(next, rv)
}

fn lease_key() -> ObjectKey {
    ObjectKey::new("leases", LEASE_NAMESPACE, LEASE_NAME).expect("a valid key")
}

/// One round: read, decide, write. Whether we hold the Lease after it.
fn round(
    store: &Store,
    config: &LeaderConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, StoreError> {
    let key = lease_key();
    let now = Instant::now();
    let current = store.get(&key)?;
    let parsed = current.as_ref().and_then(|v| {
        serde_json::from_slice::<Value>(&v.object)
            .ok()
            .map(|lease| (lease, v.rv))
    });
    if let Some((_, rv)) = &parsed {
        if observed.is_none_or(|o| o.rv != *rv) {
            *observed = Some(Observed {
                rv: *rv,
                since: now,
            });
        }
    }
    let decision = decide(
        config,
        parsed.as_ref().map(|(lease, rv)| (lease, *rv)),
        *observed,
        now,
        &object::now_micro_rfc3339(),
    );
    let (lease, expect) = match decision {
        Decision::Follow => return Ok(false),
        Decision::Create(lease) => (lease, Precondition::Absent),
        Decision::Update(lease, rv) => (lease, Precondition::Version(rv)),
    };
    let mut set = WriteSet::new();
    let stored = match lease {
        Value::Object(map) => object::to_stored(map),
        _ => unreachable!("a Lease is an object"),
    };
    set.put(key, Bytes::from(stored), expect);
    match store.commit(set) {
        Ok(changes) => {
            if let Some(change) = changes.first() {
                *observed = Some(Observed {
                    rv: change.rv,
                    since: now,
                });
            }
            Ok(true)
        }
        // Someone else wrote it first: theirs, this round.
        Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (empty holder) if we hold it, so another replica takes it at once.
fn release(store: &Store, config: &LeaderConfig) {
    let key = lease_key();
    let Ok(Some(current)) = store.get(&key) else {
        return;
    };
    let Ok(mut lease) = serde_json::from_slice::<Value>(&current.object) else {
        return;
    };
    if lease["spec"]["holderIdentity"] != json!(config.identity) {
        return;
    }
    lease["spec"]["holderIdentity"] = json!("");
    if let Value::Object(map) = lease {
        let mut set = WriteSet::new();
        set.put(
            key,
            Bytes::from(object::to_stored(map)),
            Precondition::Version(current.rv),
        );
        let _ = store.commit(set);
    }
}

/// Runs the singletons `start` makes while this replica holds the Lease, and stops them (abort)
/// when it loses it; campaigns again after. Ends only when a singleton ended on its own (a
/// failure cloudcore reports), or at `shutdown`, releasing the Lease.
pub async fn run(
    store: Arc<Store>,
    config: LeaderConfig,
    mut start: impl FnMut() -> Vec<(&'static str, JoinHandle<()>)> + Send,
    shutdown: CancellationToken,
) {
    let mut observed = None;
    let mut running: Vec<(&'static str, JoinHandle<()>)> = Vec::new();
    let mut last_renewal: Option<Instant> = None;
    loop {
        let result = {
            let store = store.clone();
            let config = config.clone();
            let mut seen = observed;
            tokio::task::spawn_blocking(move || {
                round(&store, &config, &mut seen).map(|r| (r, seen))
            })
            .await
        };
        match result {
            Ok(Ok((held, seen))) => {
                observed = seen;
                if held {
                    last_renewal = Some(Instant::now());
                    if running.is_empty() {
                        tracing::info!(identity = %config.identity, "became the leader: starting the scheduler, lifecycle and controllers");
                        running = start();
                    }
                } else if !running.is_empty() {
                    tracing::warn!(identity = %config.identity, "lost the leader Lease to another replica: stopping the singletons");
                    stop(&mut running);
                    last_renewal = None;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election: cannot read or write the Lease")
            }
            Err(e) => tracing::warn!(error = %e, "leader election round failed"),
        }
        if !running.is_empty() && last_renewal.is_none_or(|t| t.elapsed() >= config.renew_deadline)
        {
            tracing::warn!(identity = %config.identity, "could not renew the leader Lease within the renew deadline: stopping the singletons");
            stop(&mut running);
            last_renewal = None;
        }
        if let Some((name, _)) = running.iter().find(|(_, task)| task.is_finished()) {
            tracing::error!(task = name, "a singleton stopped on its own");
            stop(&mut running);
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                stop(&mut running);
                let store = store.clone();
                let config = config.clone();
                let _ = tokio::task::spawn_blocking(move || release(&store, &config)).await;
                return;
            }
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
}

fn stop(running: &mut Vec<(&'static str, JoinHandle<()>)>) {
    for (_, task) in running.drain(..) {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(identity: &str) -> LeaderConfig {
        LeaderConfig {
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn written(decision: Decision) -> Value {
        match decision {
            Decision::Create(lease) | Decision::Update(lease, _) => lease,
            Decision::Follow => panic!("expected a write"),
        }
    }

    #[test]
    fn a_lease_changes_hands_only_after_it_was_seen_unchanged_for_its_duration() {
        let t0 = Instant::now();
        let a = config("a");
        let b = config("b");
        let lease = written(decide(&a, None, None, t0, "T0"));
        assert_eq!(lease["spec"]["holderIdentity"], "a");
        let rv = ResourceVersion(5);
        // b sees a's Lease for the first time: not expired, whatever its timestamps say.
        let seen = Some(Observed { rv, since: t0 });
        assert_eq!(
            decide(&b, Some((&lease, rv)), seen, t0, "T0"),
            Decision::Follow
        );
        let later = t0 + Duration::from_secs(14);
        assert_eq!(
            decide(&b, Some((&lease, rv)), seen, later, "T14"),
            Decision::Follow
        );
        // a renews: a new version, which b sees first at t14 — the clock starts again.
        let renewed = written(decide(&a, Some((&lease, rv)), None, later, "T14"));
        assert_eq!(renewed["spec"]["renewTime"], "T14");
        let rv2 = ResourceVersion(9);
        let seen = Some(Observed {
            rv: rv2,
            since: later,
        });
        let t20 = t0 + Duration::from_secs(20);
        assert_eq!(
            decide(&b, Some((&renewed, rv2)), seen, t20, "T20"),
            Decision::Follow
        );
        // a is gone: 15 s after b first saw version 9, b takes it, at that version.
        let t29 = t0 + Duration::from_secs(29);
        match decide(&b, Some((&renewed, rv2)), seen, t29, "T29") {
            Decision::Update(taken, at) => {
                assert_eq!(at, rv2);
                assert_eq!(taken["spec"]["holderIdentity"], "b");
                assert_eq!(taken["spec"]["leaseTransitions"], 1);
                assert_eq!(taken["spec"]["acquireTime"], "T29");
            }
            other => panic!("expected a take-over, got {other:?}"),
        }
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let t0 = Instant::now();
        let mut lease = written(decide(&config("a"), None, None, t0, "T0"));
        lease["spec"]["holderIdentity"] = json!("");
        let rv = ResourceVersion(3);
        let seen = Some(Observed { rv, since: t0 });
        let taken = written(decide(&config("b"), Some((&lease, rv)), seen, t0, "T0"));
        assert_eq!(taken["spec"]["holderIdentity"], "b");
    }

    #[test]
    fn only_one_of_two_replicas_holds_the_lease_in_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), replication::StoreConfig::cloud()).unwrap();
        let (a, b) = (config("a"), config("b"));
        let (mut seen_a, mut seen_b) = (None, None);
        assert!(round(&store, &a, &mut seen_a).unwrap());
        assert!(!round(&store, &b, &mut seen_b).unwrap());
        assert!(round(&store, &a, &mut seen_a).unwrap(), "a renews");
        assert!(!round(&store, &b, &mut seen_b).unwrap());
        release(&store, &a);
        assert!(
            round(&store, &b, &mut seen_b).unwrap(),
            "b takes a released Lease"
        );
        assert!(!round(&store, &a, &mut seen_a).unwrap());
    }
}
