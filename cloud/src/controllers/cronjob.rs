//! The CronJob controller (`batch/v1`): makes a Job from `spec.jobTemplate` at each time the
//! 5-field cron `schedule` names (UTC; `timeZone` is not supported yet).
//!
//! As upstream's:
//! - the most recent scheduled time since `status.lastScheduleTime` (or the CronJob's
//!   creation) that has passed is run, once: the Job is named `<cronjob>-<minutes since the
//!   epoch>`, so a pass that races another makes no second Job; older missed times are skipped;
//! - a time missed by more than `startingDeadlineSeconds` is skipped;
//! - `concurrencyPolicy`: `Allow` runs Jobs side by side, `Forbid` skips a time while one
//!   runs, `Replace` deletes the running ones first;
//! - `suspend: true` makes no Jobs;
//! - finished Jobs beyond `successfulJobsHistoryLimit` / `failedJobsHistoryLimit` are
//!   deleted, oldest first;
//! - `status.active` lists the running Jobs, `lastScheduleTime` and `lastSuccessfulTime` are
//!   kept.

use replication::api::object::{self, Object};
use replication::api::workloads::next_schedule;
use serde_json::{json, Value};

use super::job::{has_condition, is_finished};
use super::{
    controller_reference, is_controlled_by, is_terminating, rfc3339, spec_i64, Action, World,
};

/// At most this many scheduled times are walked per pass (a CronJob suspended for years
/// resumes at its latest time, not by replaying them).
const MAX_WALK: usize = 1_000;

/// Every CronJob's actions.
pub fn reconcile(world: &World, now: i64) -> Vec<Action> {
    world
        .cronjobs
        .iter()
        .filter(|cj| !is_terminating(cj))
        .flat_map(|cj| {
            let jobs: Vec<&Object> = world
                .jobs
                .iter()
                .filter(|j| object::namespace(j) == object::namespace(cj))
                .filter(|j| is_controlled_by(j, cj))
                .collect();
            reconcile_one(cj, &jobs, now)
        })
        .collect()
}

fn time_at(o: &Object, path: &str) -> Option<i64> {
    Value::Object(o.clone())
        .pointer(path)
        .and_then(Value::as_str)
        .and_then(object::parse_rfc3339)
}

/// The latest scheduled time in (`after`, `now`], if any.
fn latest_due(schedule: &str, after: i64, now: i64) -> Option<i64> {
    let mut latest = None;
    let mut cursor = after;
    for _ in 0..MAX_WALK {
        match next_schedule(schedule, cursor) {
            Ok(Some(t)) if t <= now => {
                latest = Some(t);
                cursor = t;
            }
            _ => break,
        }
    }
    latest
}

/// The Job for the time `scheduled` (Unix seconds).
fn new_job(cj: &Object, scheduled: i64) -> Value {
    let template = cj
        .get("spec")
        .and_then(|s| s.get("jobTemplate"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let mut metadata = json!({
        "name": format!("{}-{}", object::name(cj), scheduled / 60),
        "namespace": object::namespace(cj),
        "ownerReferences": [controller_reference(cj, "batch/v1", "CronJob")],
        "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": rfc3339(scheduled)},
    });
    if let Some(labels) = template.pointer("/metadata/labels") {
        metadata["labels"] = labels.clone();
    }
    if let Some(Value::Object(annotations)) = template.pointer("/metadata/annotations") {
        for (k, v) in annotations {
            metadata["annotations"][k] = v.clone();
        }
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or_else(|| json!({})),
    })
}

fn delete_job(job: &Object) -> Action {
    Action::Delete {
        resource: "jobs",
        namespace: object::namespace(job).to_owned(),
        name: object::name(job).to_owned(),
        uid: super::uid(job).to_owned(),
    }
}

/// One CronJob's actions, given the Jobs it controls, at `now` (Unix seconds).
pub fn reconcile_one(cj: &Object, jobs: &[&Object], now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let spec = cj.get("spec");
    let text = |field: &str| spec.and_then(|s| s.get(field)).and_then(Value::as_str);
    let schedule = text("schedule").unwrap_or_default();
    let policy = text("concurrencyPolicy").unwrap_or("Allow");
    let suspended = spec.and_then(|s| s.get("suspend")) == Some(&Value::Bool(true));
    let active: Vec<&Object> = jobs
        .iter()
        .copied()
        .filter(|j| !is_finished(j) && !is_terminating(j))
        .collect();
    let mut last_schedule = time_at(cj, "/status/lastScheduleTime");
    let since = last_schedule
        .or_else(|| time_at(cj, "/metadata/creationTimestamp"))
        .unwrap_or(now);
    let mut running: Vec<&Object> = active.clone();
    if !suspended {
        if let Some(due) = latest_due(schedule, since, now) {
            let late = spec_i64(cj, "startingDeadlineSeconds").is_some_and(|d| now - due > d);
            let name = format!("{}-{}", object::name(cj), due / 60);
            let exists = jobs.iter().any(|j| object::name(j) == name);
            if late || exists {
                last_schedule = Some(due);
            } else if policy == "Forbid" && !active.is_empty() {
                // Skipped: this time passes while a Job runs.
            } else {
                if policy == "Replace" {
                    actions.extend(active.iter().map(|j| delete_job(j)));
                    running.clear();
                }
                actions.push(Action::Create {
                    resource: "jobs",
                    namespace: object::namespace(cj).to_owned(),
                    object: new_job(cj, due),
                });
                last_schedule = Some(due);
            }
        }
    }
    // History: finished Jobs beyond the limits go, oldest first.
    for (succeeded, field, default) in [
        (true, "successfulJobsHistoryLimit", 3),
        (false, "failedJobsHistoryLimit", 1),
    ] {
        let limit = spec_i64(cj, field).unwrap_or(default).max(0) as usize;
        let mut finished: Vec<&Object> = jobs
            .iter()
            .copied()
            .filter(|j| !is_terminating(j))
            .filter(|j| has_condition(j, if succeeded { "Complete" } else { "Failed" }))
            .collect();
        finished.sort_by_key(|j| {
            (
                time_at(j, "/metadata/creationTimestamp").unwrap_or(0),
                object::name(j).to_owned(),
            )
        });
        let excess = finished.len().saturating_sub(limit);
        actions.extend(finished.iter().take(excess).map(|j| delete_job(j)));
    }
    let last_successful = jobs
        .iter()
        .filter(|j| has_condition(j, "Complete"))
        .filter_map(|j| time_at(j, "/status/completionTime"))
        .max()
        .or_else(|| time_at(cj, "/status/lastSuccessfulTime"));
    let mut status = json!({});
    if !running.is_empty() {
        status["active"] = json!(running
            .iter()
            .map(|j| json!({"apiVersion": "batch/v1", "kind": "Job",
                "namespace": object::namespace(j), "name": object::name(j),
                "uid": super::uid(j)}))
            .collect::<Vec<_>>());
    }
    if let Some(t) = last_schedule {
        status["lastScheduleTime"] = json!(rfc3339(t));
    }
    if let Some(t) = last_successful {
        status["lastSuccessfulTime"] = json!(rfc3339(t));
    }
    if cj.get("status").unwrap_or(&json!({})) != &status {
        let mut updated = cj.clone();
        updated.insert("status".into(), status);
        actions.push(Action::UpdateStatus {
            resource: "cronjobs",
            object: Value::Object(updated),
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    fn cronjob(spec: Value) -> Object {
        let mut spec = spec;
        spec["jobTemplate"] = json!({"metadata": {"labels": {"team": "a"}},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}]}}}});
        obj(json!({"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "tick", "namespace": "default", "uid": "cj-uid",
                         "resourceVersion": "2", "creationTimestamp": rfc3339(T0)},
            "spec": spec}))
    }

    fn made(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Create { object, .. } => Some(object.clone()),
                _ => None,
            })
            .collect()
    }

    fn job_named(name: &str, condition: Option<&str>, created: i64) -> Object {
        let mut j = obj(json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "creationTimestamp": rfc3339(created),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                             "name": "tick", "uid": "cj-uid", "controller": true}]}}));
        if let Some(kind) = condition {
            j.insert(
                "status".into(),
                json!({"conditions": [{"type": kind, "status": "True"}],
                       "completionTime": rfc3339(created + 5)}),
            );
        }
        j
    }

    #[test]
    fn the_latest_due_time_makes_one_job_named_by_its_minute() {
        // T0 is 2027-01-15T08:00:00Z; every 5 minutes; 12 minutes later: 08:10 is due.
        let cj = cronjob(json!({"schedule": "*/5 * * * *"}));
        let now = T0 + 12 * 60;
        let actions = reconcile_one(&cj, &[], now);
        let jobs = made(&actions);
        assert_eq!(jobs.len(), 1, "only the latest missed time runs");
        let due = T0 + 10 * 60;
        assert_eq!(jobs[0]["metadata"]["name"], format!("tick-{}", due / 60));
        assert_eq!(jobs[0]["metadata"]["labels"]["team"], "a");
        assert_eq!(jobs[0]["metadata"]["ownerReferences"][0]["kind"], "CronJob");
        let status = actions
            .iter()
            .find_map(|a| match a {
                Action::UpdateStatus { object, .. } => Some(object["status"].clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(status["lastScheduleTime"], rfc3339(due));

        // Once the Job exists (same name), no second one for the same time.
        let mut after = cj.clone();
        after.insert("status".into(), status);
        let existing = job_named(&format!("tick-{}", due / 60), None, due);
        assert!(made(&reconcile_one(&after, &[&existing], now + 30)).is_empty());
        // Before the next time nothing; at it, the next Job.
        assert!(made(&reconcile_one(&after, &[&existing], T0 + 14 * 60)).is_empty());
        assert_eq!(
            made(&reconcile_one(&after, &[&existing], T0 + 15 * 60)).len(),
            1
        );
    }

    #[test]
    fn concurrency_policies_suspend_deadline_and_history() {
        let now = T0 + 61;
        let running = job_named("tick-old", None, T0 - 60);
        let forbid = cronjob(json!({"schedule": "* * * * *", "concurrencyPolicy": "Forbid"}));
        assert!(made(&reconcile_one(&forbid, &[&running], now)).is_empty());
        let replace = cronjob(json!({"schedule": "* * * * *", "concurrencyPolicy": "Replace"}));
        let actions = reconcile_one(&replace, &[&running], now);
        assert_eq!(made(&actions).len(), 1);
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::Delete { name, .. } if name == "tick-old")));
        let suspended = cronjob(json!({"schedule": "* * * * *", "suspend": true}));
        assert!(made(&reconcile_one(&suspended, &[], now)).is_empty());
        let strict = cronjob(json!({"schedule": "* * * * *", "startingDeadlineSeconds": 10}));
        assert!(
            made(&reconcile_one(&strict, &[], T0 + 60 + 11)).is_empty(),
            "too late"
        );

        // Four succeeded and two failed Jobs: the oldest succeeded one and the oldest failed
        // one go (limits 3 and 1).
        let done: Vec<Object> = (0..4)
            .map(|i| job_named(&format!("ok-{i}"), Some("Complete"), T0 - 600 + i * 60))
            .chain(
                (0..2).map(|i| job_named(&format!("bad-{i}"), Some("Failed"), T0 - 600 + i * 60)),
            )
            .collect();
        let refs: Vec<&Object> = done.iter().collect();
        let suspended_history = reconcile_one(&suspended, &refs, now);
        let deleted: Vec<&str> = suspended_history
            .iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, vec!["ok-0", "bad-0"]);
    }
}
