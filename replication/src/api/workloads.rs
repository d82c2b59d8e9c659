//! The workloads (`apps/v1` Deployment, ReplicaSet, DaemonSet; `batch/v1` Job, CronJob) as the
//! API server handles them: defaults, validation and the `autoscaling/v1` `Scale` subresource.
//!
//! A Job without `manualSelector: true` gets kube-apiserver's generated selector
//! (`batch.kubernetes.io/controller-uid: <uid>`) and those labels on its pod template; its
//! pods must have `restartPolicy` `OnFailure` or `Never`. A CronJob's `schedule` is a 5-field
//! cron expression (minute, hour, day of month, month, day of week, or `@hourly`-style).
//!
//! Defaults and rules follow kube-apiserver's (`pkg/apis/apps/v1/defaults.go` and
//! `pkg/apis/apps/validation`): a Deployment gets `replicas: 1`, a RollingUpdate strategy of
//! 25%/25%, `revisionHistoryLimit: 10`, `progressDeadlineSeconds: 600`; its selector is required,
//! must not be empty, must select the template's labels and may not change after create.

use serde_json::{json, Value};

use super::object::{self, Object};
use super::resources::Resource;
use super::selector::LabelSelector;
use super::status::{ApiError, Cause};

/// Whether `resource` is one of the workloads handled here.
pub fn is_workload(resource: &Resource) -> bool {
    matches!(
        resource.store_kind,
        "deployments" | "replicasets" | "daemonsets" | "statefulsets" | "jobs" | "cronjobs"
    )
}

/// The label kube-apiserver puts on a Job's pods and in its generated selector.
pub const JOB_CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
/// The label naming a Job on its pods.
pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";

/// The first time strictly after `after_unix` (Unix seconds, UTC) that the cron `schedule`
/// fires, or `None` if it never does.
///
/// # Errors
/// The schedule does not parse, with the parser's reason.
pub fn next_schedule(schedule: &str, after_unix: i64) -> Result<Option<i64>, String> {
    let cron: croner::Cron = schedule
        .parse()
        .map_err(|e: croner::errors::CronError| e.to_string())?;
    let Some(after) = chrono::DateTime::from_timestamp(after_unix, 0) else {
        return Ok(None);
    };
    Ok(cron
        .find_next_occurrence(&after, false)
        .ok()
        .map(|t| t.timestamp()))
}

fn spec_mut(object: &mut Object) -> Option<&mut Object> {
    let spec = object.entry("spec").or_insert_with(|| json!({}));
    spec.as_object_mut()
}

/// Fills in the defaults of a workload (on create and on every update, as the apiserver
/// defaults every object it decodes).
pub fn apply_defaults(resource: &Resource, object: &mut Object) {
    let uid = object::meta_str(object, "uid")
        .unwrap_or_default()
        .to_owned();
    let name = object::name(object).to_owned();
    let Some(spec) = spec_mut(object) else {
        return;
    };
    match resource.store_kind {
        "jobs" => default_job_spec(spec, &uid, &name),
        "cronjobs" => {
            spec.entry("concurrencyPolicy").or_insert(json!("Allow"));
            spec.entry("suspend").or_insert(json!(false));
            spec.entry("successfulJobsHistoryLimit").or_insert(json!(3));
            spec.entry("failedJobsHistoryLimit").or_insert(json!(1));
            let job_spec = spec
                .entry("jobTemplate")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|t| t.entry("spec").or_insert_with(|| json!({})))
                .and_then(Value::as_object_mut);
            if let Some(job_spec) = job_spec {
                // The Jobs it makes get their selector when they are created.
                default_job_spec(job_spec, "", "");
            }
            return;
        }
        "deployments" => {
            spec.entry("replicas").or_insert(json!(1));
            spec.entry("revisionHistoryLimit").or_insert(json!(10));
            spec.entry("progressDeadlineSeconds").or_insert(json!(600));
            let strategy = spec.entry("strategy").or_insert_with(|| json!({}));
            if let Some(strategy) = strategy.as_object_mut() {
                strategy.entry("type").or_insert(json!("RollingUpdate"));
                if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                    let rolling = strategy.entry("rollingUpdate").or_insert_with(|| json!({}));
                    if let Some(rolling) = rolling.as_object_mut() {
                        rolling.entry("maxSurge").or_insert(json!("25%"));
                        rolling.entry("maxUnavailable").or_insert(json!("25%"));
                    }
                }
            }
        }
        "replicasets" => {
            spec.entry("replicas").or_insert(json!(1));
        }
        "statefulsets" => {
            spec.entry("replicas").or_insert(json!(1));
            spec.entry("revisionHistoryLimit").or_insert(json!(10));
            spec.entry("podManagementPolicy")
                .or_insert(json!("OrderedReady"));
            spec.entry("persistentVolumeClaimRetentionPolicy")
                .or_insert(json!({"whenDeleted": "Retain", "whenScaled": "Retain"}));
            let strategy = spec.entry("updateStrategy").or_insert_with(|| json!({}));
            if let Some(strategy) = strategy.as_object_mut() {
                strategy.entry("type").or_insert(json!("RollingUpdate"));
                if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                    let rolling = strategy.entry("rollingUpdate").or_insert_with(|| json!({}));
                    if let Some(rolling) = rolling.as_object_mut() {
                        rolling.entry("partition").or_insert(json!(0));
                    }
                }
            }
        }
        "daemonsets" => {
            spec.entry("revisionHistoryLimit").or_insert(json!(10));
            let strategy = spec.entry("updateStrategy").or_insert_with(|| json!({}));
            if let Some(strategy) = strategy.as_object_mut() {
                strategy.entry("type").or_insert(json!("RollingUpdate"));
                if strategy.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                    let rolling = strategy.entry("rollingUpdate").or_insert_with(|| json!({}));
                    if let Some(rolling) = rolling.as_object_mut() {
                        rolling.entry("maxUnavailable").or_insert(json!(1));
                        rolling.entry("maxSurge").or_insert(json!(0));
                    }
                }
            }
        }
        _ => return,
    }
    let template = spec.entry("template").or_insert_with(|| json!({}));
    if let Some(pod_spec) = template
        .as_object_mut()
        .map(|t| t.entry("spec").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    {
        object::default_pod_spec(pod_spec);
    }
}

/// A Job's defaults (kube-apiserver's `pkg/apis/batch/v1/defaults.go`) and, with its `uid`,
/// the generated selector and pod labels; also a CronJob's job template (no uid yet).
fn default_job_spec(spec: &mut Object, uid: &str, name: &str) {
    if !spec.contains_key("completions") && !spec.contains_key("parallelism") {
        spec.insert("completions".into(), json!(1));
    }
    spec.entry("parallelism").or_insert(json!(1));
    spec.entry("backoffLimit").or_insert(json!(6));
    spec.entry("completionMode").or_insert(json!("NonIndexed"));
    spec.entry("suspend").or_insert(json!(false));
    let manual = spec.get("manualSelector").and_then(Value::as_bool) == Some(true);
    if !manual && !uid.is_empty() {
        spec.insert(
            "selector".into(),
            json!({"matchLabels": {JOB_CONTROLLER_UID: uid}}),
        );
        let template = spec.entry("template").or_insert_with(|| json!({}));
        if let Some(meta) = template
            .as_object_mut()
            .map(|t| t.entry("metadata").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
        {
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if let Some(labels) = labels.as_object_mut() {
                for (key, value) in [
                    (JOB_CONTROLLER_UID, uid),
                    (JOB_NAME, name),
                    ("controller-uid", uid),
                    ("job-name", name),
                ] {
                    labels.insert(key.into(), json!(value));
                }
            }
        }
    }
    let pod_spec = spec
        .entry("template")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .map(|t| t.entry("spec").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut);
    if let Some(pod_spec) = pod_spec {
        object::default_pod_spec(pod_spec);
    }
}

/// An int-or-percent (`maxSurge`, `maxUnavailable`) is `n` or `"n%"`.
fn valid_int_or_percent(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.as_i64().is_some_and(|n| n >= 0),
        Value::String(s) => s
            .strip_suffix('%')
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= 100),
        _ => false,
    }
}

/// Field checks of a workload; adds one [`Cause`] per problem.
pub fn validate(resource: &Resource, object: &Object, causes: &mut Vec<Cause>) {
    let mut cause = |field: &str, message: String| causes.push(Cause::new(field, message));
    let spec = object.get("spec").and_then(Value::as_object);
    let get = |field: &str| spec.and_then(|s| s.get(field));
    let restart_policy = |template: Option<&Value>| {
        template
            .and_then(|t| t.pointer("/spec/restartPolicy"))
            .and_then(Value::as_str)
            .unwrap_or("Always")
            .to_owned()
    };
    let job_restart = |policy: &str| -> Option<String> {
        (!matches!(policy, "OnFailure" | "Never")).then(|| {
            format!("Unsupported value: \"{policy}\": supported values: \"OnFailure\", \"Never\"")
        })
    };
    if resource.store_kind == "cronjobs" {
        match get("schedule").and_then(Value::as_str) {
            None | Some("") => cause("spec.schedule", "Required value".into()),
            Some(schedule) => {
                if let Err(e) = next_schedule(schedule, 0) {
                    cause("spec.schedule", format!("Invalid value: {schedule:?}: {e}"));
                }
            }
        }
        let template = get("jobTemplate").and_then(|t| t.pointer("/spec/template"));
        if let Some(message) = job_restart(&restart_policy(template)) {
            cause("spec.jobTemplate.spec.template.spec.restartPolicy", message);
        }
        return;
    }
    if resource.store_kind == "jobs" {
        if let Some(message) = job_restart(&restart_policy(get("template"))) {
            cause("spec.template.spec.restartPolicy", message);
        }
        for field in ["parallelism", "completions", "backoffLimit"] {
            if let Some(v) = get(field).filter(|v| !v.is_null()) {
                if v.as_i64().is_none_or(|n| n < 0) {
                    cause(
                        &format!("spec.{field}"),
                        format!("Invalid value: {v}: must be greater than or equal to 0"),
                    );
                }
            }
        }
    }
    if let Some(replicas) = get("replicas") {
        if replicas.as_i64().is_none_or(|r| r < 0) {
            cause(
                "spec.replicas",
                format!("Invalid value: {replicas}: must be greater than or equal to 0"),
            );
        }
    }
    let template_labels = get("template")
        .and_then(|t| t.get("metadata"))
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object);
    match get("selector") {
        None | Some(Value::Null) => cause("spec.selector", "Required value".into()),
        Some(selector) => match LabelSelector::from_label_selector(selector) {
            Err(e) => cause("spec.selector", format!("Invalid value: {e}")),
            Ok(s) if s.is_empty() => cause(
                "spec.selector",
                format!(
                    "Invalid value: {selector}: empty selector is invalid for {}",
                    resource.singular
                ),
            ),
            Ok(s) if !s.matches_labels(template_labels) => cause(
                "spec.template.metadata.labels",
                format!(
                    "Invalid value: {}: `selector` does not match template `labels`",
                    template_labels
                        .map_or_else(|| "{}".into(), |l| Value::from(l.clone()).to_string())
                ),
            ),
            Ok(_) => {}
        },
    }
    match get("template").and_then(Value::as_object) {
        None => cause("spec.template", "Required value".into()),
        Some(template) => {
            let mut prefixed =
                |field: &str, message: String| cause(&format!("spec.template.{field}"), message);
            object::validate_pod(template, &mut prefixed);
            let restart = template
                .get("spec")
                .and_then(|s| s.get("restartPolicy"))
                .and_then(Value::as_str);
            // A Job's pods end (checked above); an apps/v1 workload's run forever.
            if resource.store_kind != "jobs" && restart.is_some_and(|r| r != "Always") {
                cause(
                    "spec.template.spec.restartPolicy",
                    format!(
                        "Unsupported value: {:?}: supported values: \"Always\"",
                        restart.unwrap_or_default()
                    ),
                );
            }
        }
    }
    let (strategy_field, types): (&str, &[&str]) = match resource.store_kind {
        "deployments" => ("strategy", &["RollingUpdate", "Recreate"]),
        "daemonsets" | "statefulsets" => ("updateStrategy", &["RollingUpdate", "OnDelete"]),
        _ => return,
    };
    if resource.store_kind == "statefulsets" {
        match get("podManagementPolicy").and_then(Value::as_str) {
            None | Some("OrderedReady" | "Parallel") => {}
            Some(other) => cause(
                "spec.podManagementPolicy",
                format!(
                    "Unsupported value: {other:?}: supported values: \"OrderedReady\", \"Parallel\""
                ),
            ),
        }
    }
    if let Some(strategy) = get(strategy_field) {
        let kind = strategy
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !types.contains(&kind) {
            cause(
                &format!("spec.{strategy_field}.type"),
                format!("Unsupported value: {kind:?}: supported values: {types:?}"),
            );
        }
        if let Some(rolling) = strategy.get("rollingUpdate").and_then(Value::as_object) {
            if kind != "RollingUpdate" {
                cause(
                    &format!("spec.{strategy_field}.rollingUpdate"),
                    format!("Forbidden: may not be specified when strategy `type` is '{kind}'"),
                );
            }
            for field in ["maxSurge", "maxUnavailable"] {
                if let Some(v) = rolling.get(field) {
                    if !valid_int_or_percent(v) {
                        cause(
                            &format!("spec.{strategy_field}.rollingUpdate.{field}"),
                            format!("Invalid value: {v}: must be a non-negative integer or a percentage (at most 100%)"),
                        );
                    }
                }
            }
            let zero = |f: &str| {
                rolling
                    .get(f)
                    .is_none_or(|v| v.as_i64() == Some(0) || v.as_str() == Some("0%"))
            };
            if resource.store_kind == "deployments" && zero("maxSurge") && zero("maxUnavailable") {
                cause(
                    &format!("spec.{strategy_field}.rollingUpdate.maxUnavailable"),
                    "Invalid value: 0: may not be 0 when `maxSurge` is 0".into(),
                );
            }
        }
    }
}

/// Update rules: a workload's selector may not change (apps/v1).
///
/// # Errors
/// 422 `Invalid` on `spec.selector` when it differs from the current object's.
pub fn validate_update(
    resource: &Resource,
    current: &Object,
    object: &Object,
) -> Result<(), ApiError> {
    let selector = |o: &Object| o.get("spec").and_then(|s| s.get("selector")).cloned();
    if selector(current) != selector(object) {
        return Err(ApiError::invalid(
            resource.kind,
            object::name(object),
            vec![Cause::new(
                "spec.selector",
                format!(
                    "Invalid value: {}: field is immutable",
                    selector(object).unwrap_or(Value::Null)
                ),
            )],
        ));
    }
    Ok(())
}

/// The `autoscaling/v1` `Scale` of a workload: `spec.replicas`, and in status the observed
/// replicas and the selector in query syntax.
pub fn to_scale(resource: &Resource, object: &Object) -> Value {
    let meta = object::meta(object).cloned().unwrap_or_default();
    let pick = |f: &str| meta.get(f).cloned().unwrap_or(Value::Null);
    let (replicas, observed, selector) = match resource.custom.and_then(|c| c.scale.as_ref()) {
        Some(paths) => super::crd::scale_replicas(&Value::Object(object.clone()), paths),
        None => {
            let spec = object.get("spec");
            let replicas = spec
                .and_then(|s| s.get("replicas"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let selector = spec
                .and_then(|s| s.get("selector"))
                .and_then(|s| LabelSelector::from_label_selector(s).ok())
                .map(|s| s.to_string())
                .unwrap_or_default();
            let observed = object
                .get("status")
                .and_then(|s| s.get("replicas"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            (replicas, observed, selector)
        }
    };
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": pick("name"),
            "namespace": pick("namespace"),
            "uid": pick("uid"),
            "resourceVersion": pick("resourceVersion"),
            "creationTimestamp": pick("creationTimestamp"),
        },
        "spec": {"replicas": replicas},
        "status": {"replicas": observed, "selector": selector},
    })
}

/// `spec.replicas` of a `Scale` written by a client; 0 when absent (the field is `omitempty`
/// in Go).
///
/// # Errors
/// 422 `Invalid` when it is negative, 400 `BadRequest` when it is not an integer.
pub fn replicas_of_scale(kind: &str, name: &str, scale: &Value) -> Result<i64, ApiError> {
    let replicas = scale.get("spec").and_then(|s| s.get("replicas"));
    match replicas.and_then(Value::as_i64) {
        Some(r) if r >= 0 => Ok(r),
        Some(r) => Err(ApiError::invalid(
            kind,
            name,
            vec![Cause::new(
                "spec.replicas",
                format!("Invalid value: {r}: must be greater than or equal to 0"),
            )],
        )),
        // A Scale without replicas means 0 (the field is omitempty in Go).
        None if replicas.is_none() => Ok(0),
        None => Err(ApiError::bad_request(
            "spec.replicas of the Scale is not an integer",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::resources;
    use super::*;

    fn deployment(v: Value) -> Object {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn deployment_defaults_and_selector_rules() {
        let r = resources::find("apps", "v1", "deployments").unwrap();
        let mut d = deployment(json!({"metadata": {"name": "web"}, "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}));
        apply_defaults(r, &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
        let mut causes = Vec::new();
        validate(r, &d, &mut causes);
        assert!(causes.is_empty(), "{causes:?}");

        d["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        validate(r, &d, &mut causes);
        assert_eq!(causes[0].field, "spec.template.metadata.labels");
        causes.clear();
        d["spec"].as_object_mut().unwrap().remove("selector");
        validate(r, &d, &mut causes);
        assert_eq!(causes[0].field, "spec.selector");
    }

    #[test]
    fn scale_round_trip() {
        let d = deployment(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}}},
            "status": {"replicas": 2}}));
        let s = to_scale(resources::find("apps", "v1", "deployments").unwrap(), &d);
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["status"]["selector"], "app=web");
        assert_eq!(replicas_of_scale("Deployment", "web", &s).unwrap(), 3);
        assert!(
            replicas_of_scale("Deployment", "web", &json!({"spec": {"replicas": -1}})).is_err()
        );
    }
}
