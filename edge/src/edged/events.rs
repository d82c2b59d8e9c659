//! Events from the node about its pods, as kubelet records them (`source.component: kubelet`,
//! `source.host: <node>`): what `kubectl describe pod` shows under Events. They are derived
//! from the change between the status the node last reported and the one it reports now
//! ([`transitions`], pure), and sent up as reports (node authorization lets a node write events
//! whose `source.host` is itself):
//!
//! | change | type | reason | message (kubelet's wording) |
//! |---|---|---|---|
//! | a container (re)starts running | Normal | `Started` | `Started container NAME` |
//! | it waits with `CrashLoopBackOff` | Warning | `BackOff` | `Back-off restarting failed container NAME in pod POD` |
//! | it waits with `ErrImagePull` | Warning | `Failed` | the runtime's message |
//! | it waits with `ImagePullBackOff` | Normal | `BackOff` | `Back-off pulling image "IMAGE"` |
//! | it waits with `ErrImageNeverPull`, `CreateContainerError`, `CreateContainerConfigError`, `RunContainerError` | Warning | `Failed` | the runtime's message |
//! | the pod is being deleted | Normal | `Killing` | `Stopping container NAME` |
//!
//! What a status cannot tell comes from the runtime ([`super::Runtime::take_events`]; the CRI
//! runtime): `Pulling` (`Pulling image "IMAGE"`), `Pulled` (`Successfully pulled image "IMAGE"
//! in 1.2s`, or `Container image "IMAGE" already present on machine`), `Created`
//! (`Created container NAME`).
//!
//! A repeat of the same (pod, container, reason) raises `count` and `lastTimestamp` of one
//! Event, as client-go's correlator does, while this edgecore runs (after a restart the count
//! starts again).

use std::collections::HashMap;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::ObjectKey;
use serde_json::{json, Value};

/// One event to record: (container, type, reason, message).
pub type Transition = (String, &'static str, &'static str, String);

fn containers(status: &Value) -> Vec<&Value> {
    status
        .get("containerStatuses")
        .and_then(Value::as_array)
        .map(|list| list.iter().collect())
        .unwrap_or_default()
}

fn waiting(c: &Value) -> Option<(&str, &str)> {
    let w = c.get("state")?.get("waiting")?;
    Some((
        w.get("reason").and_then(Value::as_str).unwrap_or_default(),
        w.get("message").and_then(Value::as_str).unwrap_or_default(),
    ))
}

fn started_at(c: &Value) -> Option<&str> {
    c.get("state")?.get("running")?.get("startedAt")?.as_str()
}

/// The events the change from `held` to `now` (pod statuses) means, for pod `pod`.
pub fn transitions(pod: &str, held: &Value, now: &Value) -> Vec<Transition> {
    let before = containers(held);
    let find = |name: &str| {
        before
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
            .copied()
    };
    let mut out = Vec::new();
    for c in containers(now) {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        let previous = find(name);
        if let Some(at) = started_at(c) {
            if previous.and_then(started_at) != Some(at) {
                out.push((
                    name.to_owned(),
                    "Normal",
                    "Started",
                    format!("Started container {name}"),
                ));
            }
        }
        if let Some((reason, message)) = waiting(c) {
            if previous.and_then(waiting).map(|w| w.0) == Some(reason) {
                continue;
            }
            let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
            let event = match reason {
                "CrashLoopBackOff" => Some((
                    "Warning",
                    "BackOff",
                    format!("Back-off restarting failed container {name} in pod {pod}"),
                )),
                "ImagePullBackOff" => Some((
                    "Normal",
                    "BackOff",
                    format!("Back-off pulling image {image:?}"),
                )),
                "ErrImagePull"
                | "ErrImageNeverPull"
                | "CreateContainerError"
                | "CreateContainerConfigError"
                | "RunContainerError"
                | "ContainerCannotRun" => Some((
                    "Warning",
                    "Failed",
                    if message.is_empty() {
                        format!("Error: {reason}")
                    } else {
                        message.to_owned()
                    },
                )),
                _ => None,
            };
            if let Some((kind, reason, message)) = event {
                out.push((name.to_owned(), kind, reason, message));
            }
        }
    }
    out
}

/// Records events about pods, aggregating repeats.
pub struct Recorder {
    node: String,
    /// Per event name: (count, firstTimestamp).
    seen: HashMap<String, (u64, String)>,
}

impl Recorder {
    pub fn new(node: &str) -> Recorder {
        Recorder {
            node: node.to_owned(),
            seen: HashMap::new(),
        }
    }

    /// The Event for `transition` about `pod`, to report (its store key and object).
    pub fn event(&mut self, pod: &Object, transition: &Transition) -> Option<(ObjectKey, Bytes)> {
        let (container, kind, reason, message) = transition;
        let namespace = object::namespace(pod);
        let pod_name = object::name(pod);
        let uid = object::meta_str(pod, "uid").unwrap_or_default();
        // A stable name per (pod instance, container, reason): repeats are one Event.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in format!("{uid}/{container}/{reason}").bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        let name = format!("{pod_name}.{hash:016x}");
        let now = object::now_rfc3339();
        let entry = self.seen.entry(name.clone()).or_insert((0, now.clone()));
        entry.0 += 1;
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace,
                               "name": pod_name, "uid": uid,
                               "fieldPath": format!("spec.containers{{{container}}}")},
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node,
            "count": entry.0,
            "firstTimestamp": entry.1,
            "lastTimestamp": now,
        });
        let key = ObjectKey::new("events", namespace, &name).ok()?;
        let object = event.as_object().cloned()?;
        Some((key, Bytes::from(object::to_stored(object))))
    }

    /// Forgets the aggregation of a pod that is gone.
    pub fn forget(&mut self, pod_name: &str) {
        let prefix = format!("{pod_name}.");
        self.seen.retain(|name, _| !name.starts_with(&prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_changes_become_kubelets_events() {
        let held = json!({"containerStatuses": [
            {"name": "a", "state": {"waiting": {"reason": "ContainerCreating"}}},
            {"name": "b", "state": {"running": {"startedAt": "t1"}}}]});
        let now = json!({"containerStatuses": [
            {"name": "a", "state": {"running": {"startedAt": "t2"}}},
            {"name": "b", "image": "img", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}}]});
        let events = transitions("web", &held, &now);
        assert_eq!(
            events,
            vec![
                (
                    "a".into(),
                    "Normal",
                    "Started",
                    "Started container a".into()
                ),
                (
                    "b".into(),
                    "Warning",
                    "BackOff",
                    "Back-off restarting failed container b in pod web".into()
                ),
            ]
        );
        // Nothing new: nothing recorded.
        assert!(transitions("web", &now, &now).is_empty());
        // Repeats aggregate into one Event.
        let pod = json!({"metadata": {"name": "web", "namespace": "default", "uid": "u1"}});
        let pod = pod.as_object().unwrap();
        let mut recorder = Recorder::new("edge-1");
        let (k1, _) = recorder.event(pod, &events[1]).unwrap();
        let (k2, second) = recorder.event(pod, &events[1]).unwrap();
        assert_eq!(k1, k2);
        let second: Value = serde_json::from_slice(&second).unwrap();
        assert_eq!(second["count"], 2);
        assert_eq!(second["source"]["host"], "edge-1");
    }
}
