//! Server-side tables (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): what
//! `kubectl get` prints.

use serde_json::{json, Value};

use super::object::{meta, parse_rfc3339, Object};
use super::resources::Resource;

/// Whether the client asked for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn column(name: &str, kind: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": kind, "format": format, "description": "", "priority": priority})
}

fn columns(resource: &Resource) -> Vec<Value> {
    if let Some(custom) = resource.custom {
        // A CRD's additionalPrinterColumns after the name, as apiextensions' table convertor.
        let mut out = vec![column("Name", "string", 0)];
        for c in &custom.columns {
            out.push(json!({"name": c.name, "type": c.kind, "format": c.format,
                            "description": c.description, "priority": c.priority}));
        }
        return out;
    }
    let s = "string";
    match resource.store_kind {
        "pods" => vec![
            column("Name", s, 0),
            column("Ready", s, 0),
            column("Status", s, 0),
            column("Restarts", s, 0),
            column("Age", s, 0),
            column("IP", s, 1),
            column("Node", s, 1),
        ],
        "nodes" => vec![
            column("Name", s, 0),
            column("Status", s, 0),
            column("Roles", s, 0),
            column("Age", s, 0),
            column("Version", s, 0),
            column("Internal-IP", s, 1),
        ],
        "namespaces" => vec![
            column("Name", s, 0),
            column("Status", s, 0),
            column("Age", s, 0),
        ],
        "configmaps" | "secrets" => vec![
            column("Name", s, 0),
            column("Data", "integer", 0),
            column("Age", s, 0),
        ],
        "services" => vec![
            column("Name", s, 0),
            column("Type", s, 0),
            column("Cluster-IP", s, 0),
            column("Port(s)", s, 0),
            column("Age", s, 0),
        ],
        "devicestatuses" => vec![
            column("Name", s, 0),
            column("State", s, 0),
            column("Last Online", s, 0),
            column("Twins", s, 0),
            column("Age", s, 0),
        ],
        "devices" => vec![
            column("Name", s, 0),
            column("Node", s, 0),
            column("Model", s, 0),
            column("Protocol", s, 0),
            column("Age", s, 0),
        ],
        "leases" => vec![
            column("Name", s, 0),
            column("Holder", s, 0),
            column("Age", s, 0),
        ],
        "deployments" => vec![
            column("Name", s, 0),
            column("Ready", s, 0),
            column("Up-to-date", "integer", 0),
            column("Available", "integer", 0),
            column("Age", s, 0),
            column("Containers", s, 1),
            column("Images", s, 1),
            column("Selector", s, 1),
        ],
        "replicasets" => vec![
            column("Name", s, 0),
            column("Desired", "integer", 0),
            column("Current", "integer", 0),
            column("Ready", "integer", 0),
            column("Age", s, 0),
            column("Containers", s, 1),
            column("Images", s, 1),
            column("Selector", s, 1),
        ],
        "statefulsets" => vec![
            column("Name", s, 0),
            column("Ready", s, 0),
            column("Age", s, 0),
            column("Containers", s, 1),
            column("Images", s, 1),
        ],
        "daemonsets" => vec![
            column("Name", s, 0),
            column("Desired", "integer", 0),
            column("Current", "integer", 0),
            column("Ready", "integer", 0),
            column("Up-to-date", "integer", 0),
            column("Available", "integer", 0),
            column("Node Selector", s, 0),
            column("Age", s, 0),
            column("Containers", s, 1),
            column("Images", s, 1),
            column("Selector", s, 1),
        ],
        "jobs" => vec![
            column("Name", s, 0),
            column("Status", s, 0),
            column("Completions", s, 0),
            column("Duration", s, 0),
            column("Age", s, 0),
            column("Containers", s, 1),
            column("Images", s, 1),
            column("Selector", s, 1),
        ],
        "cronjobs" => vec![
            column("Name", s, 0),
            column("Schedule", s, 0),
            column("Timezone", s, 0),
            column("Suspend", "boolean", 0),
            column("Active", "integer", 0),
            column("Last Schedule", s, 0),
            column("Age", s, 0),
            column("Containers", s, 1),
            column("Images", s, 1),
            column("Selector", s, 1),
        ],
        // kube-apiserver's event columns (`kubectl get events`).
        "events" => vec![
            column("Last Seen", s, 0),
            column("Type", s, 0),
            column("Reason", s, 0),
            column("Object", s, 0),
            column("Message", s, 0),
            column("Source", s, 1),
            column("First Seen", s, 1),
            column("Count", "integer", 1),
            column("Name", s, 1),
        ],
        _ => vec![column("Name", s, 0), column("Age", s, 0)],
    }
}

/// How long ago the RFC 3339 time at `fields` was, as kubectl prints ages.
fn since(object: &Object, fields: &[&str]) -> String {
    match path(object, fields)
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
    {
        Some(t) => human_age(time::OffsetDateTime::now_utc().unix_timestamp() - t),
        None => "<unknown>".into(),
    }
}

fn int(object: &Object, fields: &[&str]) -> i64 {
    path(object, fields).and_then(Value::as_i64).unwrap_or(0)
}

/// The CONTAINERS, IMAGES and SELECTOR cells (`-o wide`) of a workload.
fn workload_wide(object: &Object) -> [Value; 3] {
    let containers = path(object, &["spec", "template", "spec", "containers"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let field = |f: &str| {
        containers
            .iter()
            .filter_map(|c| c.get(f).and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(",")
    };
    let selector = path(object, &["spec", "selector"])
        .and_then(|s| super::selector::LabelSelector::from_label_selector(s).ok())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "<none>".into());
    [json!(field("name")), json!(field("image")), json!(selector)]
}

/// kubectl's short age: `42s`, `7m`, `5h`, `3d`.
pub fn human_age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=10_799 => format!("{}m", s / 60),
        10_800..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn age(object: &Object) -> String {
    let created = meta(object)
        .and_then(|m| m.get("creationTimestamp"))
        .and_then(Value::as_str)
        .and_then(parse_rfc3339);
    match created {
        Some(t) => human_age(time::OffsetDateTime::now_utc().unix_timestamp() - t),
        None => "<unknown>".into(),
    }
}

fn path<'a>(object: &'a Object, fields: &[&str]) -> Option<&'a Value> {
    let mut current = object.get(fields[0])?;
    for field in &fields[1..] {
        current = current.get(field)?;
    }
    Some(current)
}

fn text(object: &Object, fields: &[&str]) -> String {
    path(object, fields)
        .and_then(Value::as_str)
        .unwrap_or("<none>")
        .to_owned()
}

fn condition(object: &Object, kind: &str) -> Option<String> {
    path(object, &["status", "conditions"])?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        .and_then(|c| c.get("status")?.as_str().map(str::to_owned))
}

fn cells(resource: &Resource, object: &Object) -> Vec<Value> {
    let name = json!(super::object::name(object));
    if let Some(custom) = resource.custom {
        let value = Value::Object(object.clone());
        return std::iter::once(name)
            .chain(custom.columns.iter().map(|c| super::crd::cell(c, &value)))
            .collect();
    }
    match resource.store_kind {
        "jobs" => {
            let [containers, images, selector] = workload_wide(object);
            let conditions = path(object, &["status", "conditions"])
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let has = |kind: &str| {
                conditions
                    .iter()
                    .any(|c| c["type"] == kind && c["status"] == "True")
            };
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if path(object, &["spec", "suspend"]) == Some(&Value::Bool(true)) {
                "Suspended"
            } else {
                "Running"
            };
            let completions = path(object, &["spec", "completions"])
                .and_then(Value::as_i64)
                .map_or_else(|| "-".to_owned(), |n| n.to_string());
            let started = path(object, &["status", "startTime"])
                .and_then(Value::as_str)
                .and_then(parse_rfc3339);
            let ended = path(object, &["status", "completionTime"])
                .and_then(Value::as_str)
                .and_then(parse_rfc3339)
                .unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp());
            let duration = started.map_or_else(String::new, |s| human_age(ended - s));
            vec![
                name,
                json!(status),
                json!(format!(
                    "{}/{completions}",
                    int(object, &["status", "succeeded"])
                )),
                json!(duration),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        "cronjobs" => {
            let template = path(object, &["spec", "jobTemplate"])
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let [containers, images, selector] = workload_wide(&template);
            let last = path(object, &["status", "lastScheduleTime"])
                .and_then(Value::as_str)
                .map_or_else(
                    || "<none>".to_owned(),
                    |_| since(object, &["status", "lastScheduleTime"]),
                );
            let active = path(object, &["status", "active"])
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![
                name,
                json!(text(object, &["spec", "schedule"])),
                json!(text(object, &["spec", "timeZone"])),
                json!(path(object, &["spec", "suspend"])
                    .and_then(Value::as_bool)
                    .unwrap_or(false)),
                json!(active),
                json!(last),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        "events" => {
            let kind = text(object, &["involvedObject", "kind"]).to_lowercase();
            let involved = text(object, &["involvedObject", "name"]);
            vec![
                json!(since(object, &["lastTimestamp"])),
                json!(text(object, &["type"])),
                json!(text(object, &["reason"])),
                json!(format!("{kind}/{involved}")),
                json!(text(object, &["message"])),
                json!(text(object, &["source", "component"])),
                json!(since(object, &["firstTimestamp"])),
                json!(int(object, &["count"])),
                name,
            ]
        }
        "pods" => {
            let total = path(object, &["spec", "containers"])
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = path(object, &["status", "containerStatuses"])
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ready = statuses
                .iter()
                .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
                .sum();
            let mut status = text(object, &["status", "phase"]);
            if let Some(reason) = statuses
                .iter()
                .find_map(|s| s.get("state")?.get("waiting")?.get("reason")?.as_str())
            {
                status = reason.to_owned();
            }
            if meta(object).is_some_and(|m| m.contains_key("deletionTimestamp")) {
                status = "Terminating".into();
            }
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                json!(age(object)),
                json!(text(object, &["status", "podIP"])),
                json!(text(object, &["spec", "nodeName"])),
            ]
        }
        "nodes" => {
            let mut status = match condition(object, "Ready").as_deref() {
                Some("True") => "Ready",
                Some(_) => "NotReady",
                None => "Unknown",
            }
            .to_owned();
            // As kubectl prints a cordoned node.
            if object
                .get("spec")
                .and_then(|s| s.get("unschedulable"))
                .and_then(|u| u.as_bool())
                == Some(true)
            {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = super::object::labels(object)
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let internal_ip = path(object, &["status", "addresses"])
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|x| x.get("type").and_then(Value::as_str) == Some("InternalIP"))
                })
                .and_then(|a| a.get("address")?.as_str())
                .unwrap_or("<none>")
                .to_owned();
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".into()
                } else {
                    roles.join(",")
                }),
                json!(age(object)),
                json!(text(object, &["status", "nodeInfo", "kubeletVersion"])),
                json!(internal_ip),
            ]
        }
        "namespaces" => vec![
            name,
            json!(text(object, &["status", "phase"])),
            json!(age(object)),
        ],
        "configmaps" | "secrets" => {
            let count = ["data", "binaryData", "stringData"]
                .iter()
                .filter_map(|f| object.get(*f).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            vec![name, json!(count), json!(age(object))]
        }
        "services" => {
            let ports: Vec<String> = path(object, &["spec", "ports"])
                .and_then(Value::as_array)
                .map(|ports| {
                    ports
                        .iter()
                        .map(|p| {
                            let port = p.get("port").map(Value::to_string).unwrap_or_default();
                            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                            format!("{port}/{proto}")
                        })
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(text(object, &["spec", "type"])),
                json!(text(object, &["spec", "clusterIP"])),
                json!(if ports.is_empty() {
                    "<none>".into()
                } else {
                    ports.join(",")
                }),
                json!(age(object)),
            ]
        }
        "leases" => vec![
            name,
            json!(text(object, &["spec", "holderIdentity"])),
            json!(age(object)),
        ],
        "devicestatuses" => {
            let twins = path(object, &["status", "twins"])
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![
                name,
                json!(text(object, &["status", "state"])),
                json!(text(object, &["status", "lastOnlineTime"])),
                json!(twins),
                json!(age(object)),
            ]
        }
        "devices" => vec![
            name,
            json!(text(object, &["spec", "nodeName"])),
            json!(text(object, &["spec", "deviceModelRef", "name"])),
            json!(text(object, &["spec", "protocol", "protocolName"])),
            json!(age(object)),
        ],
        "deployments" => {
            let [containers, images, selector] = workload_wide(object);
            let desired = path(object, &["spec", "replicas"])
                .and_then(Value::as_i64)
                .unwrap_or(1);
            vec![
                name,
                json!(format!(
                    "{}/{desired}",
                    int(object, &["status", "readyReplicas"])
                )),
                json!(int(object, &["status", "updatedReplicas"])),
                json!(int(object, &["status", "availableReplicas"])),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        "statefulsets" => {
            let [containers, images, _] = workload_wide(object);
            let want = path(object, &["spec", "replicas"])
                .and_then(Value::as_i64)
                .unwrap_or(1);
            vec![
                name,
                json!(format!(
                    "{}/{want}",
                    int(object, &["status", "readyReplicas"])
                )),
                json!(age(object)),
                containers,
                images,
            ]
        }
        "replicasets" => {
            let [containers, images, selector] = workload_wide(object);
            vec![
                name,
                json!(path(object, &["spec", "replicas"])
                    .and_then(Value::as_i64)
                    .unwrap_or(1)),
                json!(int(object, &["status", "replicas"])),
                json!(int(object, &["status", "readyReplicas"])),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        "daemonsets" => {
            let [containers, images, selector] = workload_wide(object);
            let node_selector = path(object, &["spec", "template", "spec", "nodeSelector"])
                .and_then(Value::as_object)
                .filter(|m| !m.is_empty())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(int(object, &["status", "desiredNumberScheduled"])),
                json!(int(object, &["status", "currentNumberScheduled"])),
                json!(int(object, &["status", "numberReady"])),
                json!(int(object, &["status", "updatedNumberScheduled"])),
                json!(int(object, &["status", "numberAvailable"])),
                json!(node_selector),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        _ => vec![name, json!(age(object))],
    }
}

fn row(resource: &Resource, object: Object, include_object: bool) -> Value {
    let cells = cells(resource, &object);
    let object = if include_object {
        Value::Object(object)
    } else {
        json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta(&object).cloned().unwrap_or_default(),
        })
    };
    json!({"cells": cells, "object": object})
}

/// A Table of `objects`. `include_object`: `?includeObject=Object` (default: metadata only).
pub fn table(
    resource: &Resource,
    objects: Vec<Object>,
    list_meta: Value,
    include_object: bool,
    with_columns: bool,
) -> Value {
    let rows: Vec<Value> = objects
        .into_iter()
        .map(|o| row(resource, o, include_object))
        .collect();
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": rows,
    });
    if with_columns {
        table["columnDefinitions"] = Value::Array(columns(resource));
    } else {
        table["columnDefinitions"] = Value::Array(Vec::new());
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(600), "10m");
        assert_eq!(human_age(4 * 3600), "4h");
        assert_eq!(human_age(5 * 86_400), "5d");
    }

    #[test]
    fn workload_rows() {
        let d = json!({"metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "nginx"}]}}},
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}});
        let r = super::super::resources::find("apps", "v1", "deployments").unwrap();
        let c = cells(r, d.as_object().unwrap());
        assert_eq!(columns(r).len(), c.len());
        assert_eq!(&c[1..4], &[json!("2/3"), json!(3), json!(2)]);
        assert_eq!(&c[5..], &[json!("c"), json!("nginx"), json!("app=web")]);
        let ds = json!({"metadata": {"name": "agent"},
            "spec": {"template": {"spec": {"nodeSelector": {"zone": "a"}}}},
            "status": {"desiredNumberScheduled": 2, "numberReady": 1}});
        let r = super::super::resources::find("apps", "v1", "daemonsets").unwrap();
        let c = cells(r, ds.as_object().unwrap());
        assert_eq!(columns(r).len(), c.len());
        assert_eq!(c[1], 2);
        assert_eq!(c[3], 1);
        assert_eq!(c[6], "zone=a");
    }

    #[test]
    fn a_cordoned_node_is_shown_as_kubectl_shows_it() {
        let node = json!({"metadata": {"name": "edge-1"}, "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let r = super::super::resources::find("", "v1", "nodes").unwrap();
        assert_eq!(
            cells(r, node.as_object().unwrap())[1],
            "Ready,SchedulingDisabled"
        );
    }

    #[test]
    fn pod_row() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}], "nodeName": "n"},
            "status": {"phase": "Running", "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let r = super::super::resources::find("", "v1", "pods").unwrap();
        let c = cells(r, pod.as_object().unwrap());
        assert_eq!(c[1], "1/1");
        assert_eq!(c[2], "Running");
        assert_eq!(c[3], "2");
        assert_eq!(c[6], "n");
    }
}
