//! Latency probes: the harness stamps a change when it makes it, a hollow node or the API
//! watcher finds the stamp when the change arrives, and the difference goes into an HDR
//! histogram (microseconds).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use replication::ObjectKey;

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        // 1 µs to 1 hour, 3 significant digits.
        Latency(Mutex::new(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
        ))
    }
}

impl Latency {
    pub fn record(&self, since: Instant) {
        let micros = since.elapsed().as_micros().clamp(1, 3_600_000_000) as u64;
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = h.record(micros);
    }

    pub fn percentiles(&self) -> Percentiles {
        let h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: h.max() as f64 / 1000.0,
        }
    }

    pub fn reset(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }
}

/// Pending stamps and the histograms they feed.
#[derive(Default)]
pub struct Probes {
    /// Pod key → (probe value, when the harness wrote it).
    changes: Mutex<HashMap<ObjectKey, (String, Instant)>>,
    /// Pod key → when the harness deleted it.
    deletions: Mutex<HashMap<ObjectKey, Instant>>,
    /// Pod key → when it was created (pod startup).
    created: Mutex<HashMap<ObjectKey, Instant>>,
    /// Pod key → (status message, when the node reported it).
    statuses: Mutex<HashMap<ObjectKey, (String, Instant)>>,
    /// Create in the API → the pod arrives at its node.
    pub create_to_node: Latency,
    /// Create in the API → Running visible in the API (pod startup).
    pub startup: Latency,
    /// A change in the API → seen by the node (churn propagation).
    pub propagation: Latency,
    /// A status report on the node → visible in the API.
    pub upward: Latency,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Probes {
    pub fn created(&self, key: ObjectKey, probe: &str) {
        let now = Instant::now();
        lock(&self.created).insert(key.clone(), now);
        lock(&self.changes).insert(key, (probe.to_owned(), now));
    }

    pub fn changed(&self, key: ObjectKey, probe: &str) {
        lock(&self.changes).insert(key, (probe.to_owned(), Instant::now()));
    }

    pub fn deleted(&self, key: ObjectKey) {
        // A change the node had not seen yet is superseded: the link coalesces an object's
        // versions, so the node may go straight to the deletion (no version is lost to it).
        lock(&self.changes).remove(&key);
        lock(&self.deletions).insert(key, Instant::now());
    }

    /// A node saw a pod with this probe value.
    pub fn change_seen(&self, key: &ObjectKey, probe: &str) {
        let mut changes = lock(&self.changes);
        if changes.get(key).is_some_and(|(p, _)| p == probe) {
            if let Some((_, at)) = changes.remove(key) {
                drop(changes);
                self.propagation.record(at);
                if let Some(created) = lock(&self.created).get(key) {
                    if *created == at {
                        self.create_to_node.record(at);
                    }
                }
            }
        }
    }

    pub fn deletion_seen(&self, key: &ObjectKey) {
        if let Some(at) = lock(&self.deletions).remove(key) {
            self.propagation.record(at);
        }
    }

    pub fn status_sent(&self, key: &ObjectKey, message: &str) {
        lock(&self.statuses).insert(key.clone(), (message.to_owned(), Instant::now()));
    }

    /// The API watcher saw a pod's status.
    pub fn api_saw(&self, key: &ObjectKey, phase: &str, message: &str) {
        if phase == "Running" {
            if let Some(at) = lock(&self.created).remove(key) {
                self.startup.record(at);
            }
        }
        let mut statuses = lock(&self.statuses);
        if statuses.get(key).is_some_and(|(m, _)| m == message) {
            if let Some((_, at)) = statuses.remove(key) {
                drop(statuses);
                self.upward.record(at);
            }
        }
    }

    /// Stamps still waiting (for the report: changes that never arrived).
    pub fn pending(&self) -> (usize, usize, usize) {
        (
            lock(&self.changes).len(),
            lock(&self.deletions).len(),
            lock(&self.created).len(),
        )
    }

    pub fn reset(&self) {
        lock(&self.changes).clear();
        lock(&self.deletions).clear();
        lock(&self.created).clear();
        lock(&self.statuses).clear();
        for l in [
            &self.create_to_node,
            &self.startup,
            &self.propagation,
            &self.upward,
        ] {
            l.reset();
        }
    }
}
