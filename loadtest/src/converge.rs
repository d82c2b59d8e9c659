//! The convergence check: every node's cache holds exactly what the cloud routes to it (key and
//! version), its outbox is empty, and the cloud holds each pod's latest reported status.
//!
//! Leases keep renewing while the check runs, so a node is checked until it matches once
//! (after the scenario's changes stopped, a match proves the changes arrived); a node that never
//! matches within the time allowed is a difference.

use std::time::{Duration, Instant};

use crate::api::{CloudApi, Expected};
use crate::fleet::Fleet;
use crate::hollow::Snapshot;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Convergence {
    pub converged: bool,
    /// From the start of the check until the last node matched.
    pub seconds: f64,
    /// Nodes that never matched, with what differed (the first few per node).
    pub differences: Vec<String>,
}

/// What differs between what `node` holds and what the cloud expects of it.
pub fn compare(node: &str, expected: &Expected, snapshot: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let empty = Default::default();
    let want = expected.held.get(node).unwrap_or(&empty);
    for (key, rv) in want {
        match snapshot.held.get(key) {
            None => out.push(format!("{node}: missing {key} (cloud at {rv})")),
            Some(held) if held != rv => out.push(format!("{node}: {key} at {held}, cloud at {rv}")),
            Some(_) => {}
        }
    }
    for key in snapshot.held.keys() {
        if !want.contains_key(key) {
            out.push(format!(
                "{node}: holds {key}, which the cloud does not route to it"
            ));
        }
    }
    if snapshot.outbox > 0 {
        out.push(format!(
            "{node}: {} reports not acknowledged",
            snapshot.outbox
        ));
    }
    for (key, reported) in &snapshot.reported {
        if reported == "deleted" || reported.is_empty() {
            continue;
        }
        match expected.statuses.get(key) {
            Some((phase, message)) if phase == "Running" && message == reported => {}
            Some((phase, message)) => out.push(format!(
                "{node}: {key} reported {reported:?}, cloud has {phase}/{message:?}"
            )),
            None => {} // deleted meanwhile: the node's copy is checked above
        }
    }
    out
}

/// Checks until every node matched once or `within` passed.
pub async fn check(api: &CloudApi, fleet: &Fleet, within: Duration) -> anyhow::Result<Convergence> {
    let start = Instant::now();
    let mut pending: Vec<usize> = (0..fleet.len()).collect();
    let mut last: Vec<Vec<String>> = vec![Vec::new(); fleet.len()];
    loop {
        let expected = api.expected(&fleet.names).await?;
        let snapshots = fleet.snapshots().await;
        pending.retain(|&i| {
            let diffs = compare(&fleet.names[i], &expected, &snapshots[i]);
            let matched = diffs.is_empty();
            last[i] = diffs;
            !matched
        });
        if pending.is_empty() {
            return Ok(Convergence {
                converged: true,
                seconds: start.elapsed().as_secs_f64(),
                differences: Vec::new(),
            });
        }
        if start.elapsed() > within {
            let differences = pending
                .iter()
                .flat_map(|&i| last[i].iter().take(5).cloned())
                .take(200)
                .collect();
            return Ok(Convergence {
                converged: false,
                seconds: start.elapsed().as_secs_f64(),
                differences,
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replication::{ObjectKey, ResourceVersion};

    fn key(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    #[test]
    fn every_kind_of_difference_is_reported() {
        let mut expected = Expected::default();
        let want = expected.held.entry("n1".into()).or_default();
        want.insert(key("pods/loadtest/a"), ResourceVersion(5));
        want.insert(key("pods/loadtest/b"), ResourceVersion(7));
        want.insert(key("nodes//n1"), ResourceVersion(3));
        expected
            .statuses
            .insert(key("pods/loadtest/a"), ("Running".into(), "round-1".into()));
        expected
            .statuses
            .insert(key("pods/loadtest/b"), ("Running".into(), "running".into()));
        let mut snapshot = Snapshot::default();
        snapshot
            .held
            .insert(key("pods/loadtest/a"), ResourceVersion(5));
        snapshot
            .held
            .insert(key("pods/loadtest/b"), ResourceVersion(7));
        snapshot.held.insert(key("nodes//n1"), ResourceVersion(3));
        snapshot
            .reported
            .insert(key("pods/loadtest/a"), "round-1".into());
        assert!(compare("n1", &expected, &snapshot).is_empty());

        let mut stale = snapshot.clone();
        stale
            .held
            .insert(key("pods/loadtest/b"), ResourceVersion(6));
        stale.held.remove(&key("nodes//n1"));
        stale
            .held
            .insert(key("pods/loadtest/gone"), ResourceVersion(2));
        stale.outbox = 1;
        stale
            .reported
            .insert(key("pods/loadtest/b"), "round-2".into());
        let diffs = compare("n1", &expected, &stale);
        assert_eq!(diffs.len(), 5, "{diffs:#?}");
        assert!(diffs
            .iter()
            .any(|d| d.contains("pods/loadtest/b at 6, cloud at 7")));
        assert!(diffs.iter().any(|d| d.contains("missing nodes//n1")));
        assert!(diffs.iter().any(|d| d.contains("holds pods/loadtest/gone")));
        assert!(diffs
            .iter()
            .any(|d| d.contains("1 reports not acknowledged")));
        assert!(diffs.iter().any(|d| d.contains("reported \"round-2\"")));
    }
}
