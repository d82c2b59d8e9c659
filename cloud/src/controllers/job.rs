//! The Job controller (`batch/v1`): runs a Job's pods until `completions` of them succeed.
//!
//! As upstream's, for `completionMode: NonIndexed`:
//! - up to `parallelism` pods run at a time, never more than the completions still missing;
//!   pods are made from `spec.template` with `generateName: <job>-` and a controller
//!   ownerReference (the API already put the Job's selector labels on the template);
//! - a pod that ends `Succeeded` counts toward `completions`, one that ends `Failed` toward
//!   `backoffLimit`: more failures than that and the Job fails (`BackoffLimitExceeded`);
//! - `activeDeadlineSeconds` after `status.startTime` the Job fails (`DeadlineExceeded`);
//! - `suspend: true` deletes the running pods and creates none;
//! - a finished Job (condition `Complete` or `Failed`) deletes what still runs and is left
//!   alone; `status` carries `active`, `ready`, `succeeded`, `failed`, `startTime`,
//!   `completionTime` and the conditions `kubectl wait --for=condition=complete` reads.
//!
//! Not done (said so in the issue notes): Indexed completion, `podFailurePolicy`,
//! `backoffLimitPerIndex`, the delay between recreations of failed pods (upstream's 10 s
//! doubling), and counting in-place container restarts (`restartPolicy: OnFailure`) toward
//! `backoffLimit`.

use replication::api::object::{self, Object};
use serde_json::{json, Value};

use super::{
    is_controlled_by, is_terminating, pod_active, pod_from_template, pod_ready, rfc3339,
    set_condition, spec_i64, Action, World,
};

/// Most pods one Job creates in a pass (the next pass creates the rest).
const CREATE_BURST: i64 = 100;

/// Every Job's actions.
pub fn reconcile(world: &World, now: i64) -> Vec<Action> {
    world
        .jobs
        .iter()
        .filter(|job| !is_terminating(job))
        .flat_map(|job| {
            let pods: Vec<&Object> = world
                .pods_in(object::namespace(job))
                .filter(|p| is_controlled_by(p, job))
                .collect();
            reconcile_one(job, &pods, now)
        })
        .collect()
}

fn phase(pod: &Object) -> Option<&str> {
    pod.get("status")?.get("phase")?.as_str()
}

/// Whether the Job has condition `kind` set to True.
pub fn has_condition(job: &Object, kind: &str) -> bool {
    job.get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|c| c["type"] == kind && c["status"] == "True")
        })
}

/// Finished: `Complete` or `Failed`.
pub fn is_finished(job: &Object) -> bool {
    has_condition(job, "Complete") || has_condition(job, "Failed")
}

fn delete(pod: &Object) -> Action {
    Action::Delete {
        resource: "pods",
        namespace: object::namespace(pod).to_owned(),
        name: object::name(pod).to_owned(),
        uid: super::uid(pod).to_owned(),
    }
}

/// One Job's actions, given the pods it controls, at `now` (Unix seconds).
pub fn reconcile_one(job: &Object, pods: &[&Object], now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let succeeded = pods
        .iter()
        .filter(|p| phase(p) == Some("Succeeded"))
        .count() as i64;
    let failed = pods.iter().filter(|p| phase(p) == Some("Failed")).count() as i64;
    let active: Vec<&Object> = pods.iter().copied().filter(|p| pod_active(p)).collect();
    let status = job.get("status").and_then(Value::as_object);
    let mut conditions: Vec<Value> = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let suspended = job.get("spec").and_then(|s| s.get("suspend")) == Some(&Value::Bool(true));
    let start_time = status
        .and_then(|s| s.get("startTime"))
        .and_then(Value::as_str)
        .and_then(object::parse_rfc3339);
    let start = match (start_time, suspended) {
        (Some(t), _) => Some(t),
        (None, true) => None,
        (None, false) => Some(now),
    };
    let stamp = rfc3339(now);
    let mut completion_time = status
        .and_then(|s| s.get("completionTime"))
        .and_then(Value::as_str)
        .map(str::to_owned);

    let finished = is_finished(job);
    let mut terminal = None::<(&str, &str, String)>;
    if !finished {
        let backoff_limit = spec_i64(job, "backoffLimit").unwrap_or(6);
        let completions = spec_i64(job, "completions");
        let deadline = spec_i64(job, "activeDeadlineSeconds");
        if failed > backoff_limit {
            terminal = Some((
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit".into(),
            ));
        } else if let (Some(deadline), Some(start)) = (deadline, start) {
            if now - start >= deadline {
                terminal = Some((
                    "Failed",
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline".into(),
                ));
            }
        }
        let complete = match completions {
            Some(n) => succeeded >= n,
            // A work queue: done when one succeeded and none runs.
            None => succeeded > 0 && active.is_empty(),
        };
        if terminal.is_none() && complete {
            terminal = Some(("Complete", "", String::new()));
        }
        match &terminal {
            Some((kind, reason, message)) => {
                let mut condition = json!({"type": kind, "status": "True", "lastProbeTime": stamp});
                if !reason.is_empty() {
                    condition["reason"] = json!(reason);
                    condition["message"] = json!(message);
                }
                set_condition(&mut conditions, condition, &stamp);
                if *kind == "Complete" {
                    completion_time = Some(stamp.clone());
                }
            }
            None if suspended => {}
            None => {
                let parallelism = spec_i64(job, "parallelism").unwrap_or(1).max(0);
                let want = match completions {
                    Some(n) => (n - succeeded).min(parallelism),
                    None => parallelism,
                }
                .max(0);
                let missing = (want - active.len() as i64).clamp(0, CREATE_BURST);
                for _ in 0..missing {
                    actions.push(Action::Create {
                        resource: "pods",
                        namespace: object::namespace(job).to_owned(),
                        object: pod_from_template(job, "batch/v1", "Job"),
                    });
                }
            }
        }
    }
    // A finished or suspended Job runs nothing.
    if finished || terminal.is_some() || suspended {
        actions.extend(active.iter().map(|p| delete(p)));
    }
    let running = if finished || terminal.is_some() || suspended {
        0
    } else {
        active.len() + actions.len()
    };
    let mut new_status = json!({
        "active": running,
        "ready": active.iter().filter(|p| pod_ready(p)).count(),
        "succeeded": succeeded,
        "failed": failed,
    });
    if let Some(start) = start {
        new_status["startTime"] = json!(rfc3339(start));
    }
    if let Some(t) = completion_time {
        new_status["completionTime"] = json!(t);
    }
    if !conditions.is_empty() {
        new_status["conditions"] = json!(conditions);
    }
    // Counts only change with the pods: compare without the times the controller stamps.
    if job.get("status") != Some(&new_status) {
        let mut updated = job.clone();
        updated.insert("status".into(), new_status);
        actions.push(Action::UpdateStatus {
            resource: "jobs",
            object: Value::Object(updated),
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn job(spec: Value) -> Object {
        let mut spec = spec;
        spec["template"] = json!({"metadata": {"labels": {"job-name": "pi"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}});
        obj(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "pi", "namespace": "default", "uid": "job-uid", "resourceVersion": "3"},
            "spec": spec}))
    }

    fn pod(job: &Object, name: &str, phase: &str) -> Object {
        let create = reconcile_one(job, &[], T0)
            .into_iter()
            .find(|a| matches!(a, Action::Create { .. }))
            .expect("a create");
        let mut pod = pod_from(&create, name, Some("edge-1"), None);
        pod["status"]["phase"] = json!(phase);
        pod
    }

    fn creates(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Create { .. }))
            .count()
    }

    fn status(actions: &[Action]) -> Value {
        actions
            .iter()
            .find_map(|a| match a {
                Action::UpdateStatus { object, .. } => Some(object["status"].clone()),
                _ => None,
            })
            .expect("a status update")
    }

    #[test]
    fn runs_parallelism_pods_until_completions_succeed() {
        let j = job(json!({"completions": 3, "parallelism": 2, "backoffLimit": 6}));
        let actions = reconcile_one(&j, &[], T0);
        assert_eq!(creates(&actions), 2, "parallelism 2");
        let Action::Create { object, .. } = &actions[0] else {
            unreachable!()
        };
        assert_eq!(object["metadata"]["generateName"], "pi-");
        assert_eq!(object["metadata"]["ownerReferences"][0]["kind"], "Job");
        assert_eq!(object["metadata"]["labels"]["job-name"], "pi");
        assert_eq!(status(&actions)["startTime"], rfc3339(T0));

        // Two succeeded, none running: one more (the third completion), not two.
        let (a, b) = (pod(&j, "pi-a", "Succeeded"), pod(&j, "pi-b", "Succeeded"));
        let actions = reconcile_one(&j, &[&a, &b], T0 + 5);
        assert_eq!(creates(&actions), 1);

        // Three succeeded: Complete, with a completion time.
        let c = pod(&j, "pi-c", "Succeeded");
        let actions = reconcile_one(&j, &[&a, &b, &c], T0 + 9);
        assert_eq!(creates(&actions), 0);
        let s = status(&actions);
        assert_eq!(s["succeeded"], 3);
        assert_eq!(s["conditions"][0]["type"], "Complete");
        assert_eq!(s["completionTime"], rfc3339(T0 + 9));
    }

    #[test]
    fn too_many_failures_fail_the_job_and_stop_what_runs() {
        let j = job(json!({"completions": 1, "parallelism": 1, "backoffLimit": 1}));
        let (f1, f2) = (pod(&j, "pi-a", "Failed"), pod(&j, "pi-b", "Failed"));
        let running = pod(&j, "pi-c", "Running");
        let actions = reconcile_one(&j, &[&f1, &f2, &running], T0);
        assert_eq!(creates(&actions), 0);
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::Delete { name, .. } if name == "pi-c")));
        let s = status(&actions);
        assert_eq!(s["failed"], 2);
        assert_eq!(s["active"], 0);
        assert_eq!(s["conditions"][0]["type"], "Failed");
        assert_eq!(s["conditions"][0]["reason"], "BackoffLimitExceeded");
        // One failure within the limit: a replacement instead.
        let actions = reconcile_one(&j, &[&f1], T0);
        assert_eq!(creates(&actions), 1);
    }

    #[test]
    fn a_deadline_fails_the_job_and_suspend_runs_nothing() {
        let mut j = job(json!({"completions": 1, "activeDeadlineSeconds": 30}));
        j.insert("status".into(), json!({"startTime": rfc3339(T0)}));
        let running = pod(&j, "pi-a", "Running");
        assert!(reconcile_one(&j, &[&running], T0 + 29)
            .iter()
            .all(|a| !matches!(a, Action::Delete { .. })));
        let actions = reconcile_one(&j, &[&running], T0 + 30);
        assert_eq!(
            status(&actions)["conditions"][0]["reason"],
            "DeadlineExceeded"
        );

        let suspended = job(json!({"completions": 1, "suspend": true}));
        let actions = reconcile_one(&suspended, &[&running], T0);
        assert_eq!(creates(&actions), 0);
        assert!(actions.iter().any(|a| matches!(a, Action::Delete { .. })));
    }
}
