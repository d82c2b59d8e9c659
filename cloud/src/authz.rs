//! Node authorization: what an edge node may write upward. A node may write only
//! - its own Node (created at registration; afterwards its status and labels/annotations),
//! - its own Lease in `kube-node-lease`,
//! - the status of pods bound to it (and confirm the deletion of those being deleted),
//! - the status (twin reports) of devices bound to it, and of their DeviceStatus objects
//!   (created by the report if the DeviceStatus does not exist yet; see
//!   [`authorize_device_status`]),
//! - events about itself or its pods.
//!
//! What a node may read from the cloud (a get its MetaServer could not serve from the cache):
//! - ConfigMaps, Services, Endpoints, EndpointSlices, Namespaces and DeviceModels by name (not
//!   secret; from then on the object is routed to the node);
//! - Secrets, PVCs, pods, devices, its Node and Lease only when they are routed to it already
//!   (a Secret only when one of the node's pods references it, like Kubernetes' node
//!   authorizer);
//! - nothing else, and no lists or watches (the node's MetaServer serves those from its cache).
//!
//! Everything else is refused with a reason the node logs and cloudcore counts. Pure functions:
//! the caller supplies the current object and applies the decision.

use replication::api::object::{self, Object};
use replication::ObjectKey;
use serde_json::Value;

use crate::scheduler::EDGE_ROLE_LABEL;

/// How an allowed report is applied to the cluster's object.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Create or replace the whole object (a new Node, a Lease, an Event).
    Write(Object),
    /// Replace only `status` of the current object.
    Status(Object),
    /// The node finished stopping a pod being deleted: remove it.
    ConfirmDelete,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node} may not {action} {key}: {reason}")]
pub struct Refusal {
    pub node: String,
    /// `read` or `write`.
    pub action: &'static str,
    pub key: String,
    pub reason: String,
}

fn bound_node(object: &Object) -> Option<&str> {
    object.get("spec")?.get("nodeName")?.as_str()
}

/// A write refusal of `node` on `key`, for a reason.
fn write_refusal<'a>(node: &'a str, key: &'a ObjectKey) -> impl Fn(&str) -> Refusal + 'a {
    move |reason: &str| Refusal {
        action: "write",
        node: node.to_owned(),
        key: key.as_str().to_owned(),
        reason: reason.to_owned(),
    }
}

/// Decides whether `node` may write `proposed` (`None`: a deletion confirmation) to `key`,
/// given the cluster's current object.
pub fn authorize(
    node: &str,
    key: &ObjectKey,
    current: Option<&Object>,
    proposed: Option<&Object>,
) -> Result<Decision, Refusal> {
    let refuse = write_refusal(node, key);
    let Some(proposed) = proposed else {
        // Only a pod bound to this node, already marked for deletion, may be confirmed gone.
        let pod = current
            .filter(|_| key.kind() == "pods")
            .ok_or_else(|| refuse("only pods bound to the node can be confirmed deleted"))?;
        if bound_node(pod) != Some(node) {
            return Err(refuse("the pod is not bound to this node"));
        }
        if !object::meta(pod).is_some_and(|m| m.contains_key("deletionTimestamp")) {
            return Err(refuse("the pod is not being deleted"));
        }
        return Ok(Decision::ConfirmDelete);
    };
    if object::name(proposed) != key.name()
        || (!key.namespace().is_empty() && object::namespace(proposed) != key.namespace())
    {
        return Err(refuse(
            "the object's name or namespace does not match its key",
        ));
    }
    match key.kind() {
        "nodes" if key.name() == node => match current {
            None => {
                let labelled =
                    object::labels(proposed).is_some_and(|l| l.contains_key(EDGE_ROLE_LABEL));
                if !labelled {
                    return Err(refuse(
                        "a node registers itself with the label node-role.kubernetes.io/edge",
                    ));
                }
                Ok(Decision::Write(proposed.clone()))
            }
            Some(current) => {
                // Status, plus the node's own labels and annotations (as a kubelet may).
                let mut merged = object::with_status_of(current, proposed);
                let metadata = object::meta_mut(&mut merged);
                for field in ["labels", "annotations"] {
                    if let Some(value) = object::meta(proposed).and_then(|m| m.get(field)) {
                        metadata.insert(field.into(), value.clone());
                    }
                }
                if !object::labels(&merged).is_some_and(|l| l.contains_key(EDGE_ROLE_LABEL)) {
                    return Err(refuse("a node may not remove its edge role label"));
                }
                Ok(Decision::Write(merged))
            }
        },
        "nodes" => Err(refuse("a node may write only its own Node")),
        "leases" if key.namespace() == "kube-node-lease" && key.name() == node => {
            let holder = proposed
                .get("spec")
                .and_then(|s| s.get("holderIdentity"))
                .and_then(Value::as_str);
            if holder.is_some_and(|h| h != node) {
                return Err(refuse("the lease's holderIdentity must be the node"));
            }
            Ok(Decision::Write(proposed.clone()))
        }
        "leases" => Err(refuse(
            "a node may write only its own Lease in kube-node-lease",
        )),
        "pods" | "devices" => {
            let current = current.ok_or_else(|| {
                refuse("it does not exist in the cluster (nodes do not create pods or devices)")
            })?;
            if bound_node(current) != Some(node) {
                return Err(refuse("it is not bound to this node"));
            }
            Ok(Decision::Status(object::with_status_of(current, proposed)))
        }
        "events" => {
            let involved = proposed.get("involvedObject");
            let kind = involved.and_then(|o| o.get("kind")).and_then(Value::as_str);
            let name = involved.and_then(|o| o.get("name")).and_then(Value::as_str);
            let host = proposed
                .get("source")
                .and_then(|s| s.get("host"))
                .and_then(Value::as_str);
            let about_itself = kind == Some("Node") && name == Some(node);
            if about_itself || host == Some(node) {
                Ok(Decision::Write(proposed.clone()))
            } else {
                Err(refuse(
                    "an event must be about the node or come from it (source.host)",
                ))
            }
        }
        other => Err(refuse(&format!("nodes may not write {other}"))),
    }
}

/// Decides whether `node` may report `proposed` as the DeviceStatus at `key`, given the
/// Device of the same namespace and name (`device`) and the current DeviceStatus. The node
/// writes only `status`; if no DeviceStatus exists yet, one owned by the Device is created
/// with that status.
pub fn authorize_device_status(
    node: &str,
    key: &ObjectKey,
    device: Option<&Object>,
    current: Option<&Object>,
    proposed: Option<&Object>,
) -> Result<Decision, Refusal> {
    let refuse = write_refusal(node, key);
    let proposed = proposed.ok_or_else(|| refuse("nodes do not delete DeviceStatuses"))?;
    let device = device.ok_or_else(|| refuse("its Device does not exist in the cluster"))?;
    if bound_node(device) != Some(node) {
        return Err(refuse("its Device is not bound to this node"));
    }
    let status = proposed.get("status").cloned().unwrap_or(Value::Null);
    match current {
        Some(current) => Ok(Decision::Status(object::with_status_of(current, proposed))),
        None => Ok(Decision::Write(crate::devicecontroller::new_device_status(
            device, status,
        ))),
    }
}

/// How an allowed read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Already routed to the node: answer it.
    Routed,
    /// Answer it, and route it to the node from now on.
    Subscribe,
}

/// Kinds any node may read by name.
const OPEN_READ_KINDS: &[&str] = &[
    "configmaps",
    "services",
    "endpoints",
    "endpointslices",
    "namespaces",
    "devicemodels",
];

/// Decides whether `node` may get `key` from the cloud; `routed`: it is routed to the node now.
pub fn authorize_read(node: &str, key: &ObjectKey, routed: bool) -> Result<Read, Refusal> {
    if routed {
        return Ok(Read::Routed);
    }
    if OPEN_READ_KINDS.contains(&key.kind()) {
        return Ok(Read::Subscribe);
    }
    if key.kind() == "leases" && key.namespace() == "kube-node-lease" && key.name() == node {
        return Err(Refusal {
            action: "read",
            node: node.to_owned(),
            key: key.as_str().to_owned(),
            reason: "a node's Lease is written by the cloud from the node's heartbeats and is \
                     not kept on the node; read it from the cloud's API"
                .into(),
        });
    }
    Err(Refusal {
        action: "read",
        node: node.to_owned(),
        key: key.as_str().to_owned(),
        reason: format!(
            "nodes may read {} only when it is routed to them (referenced by their pods, or \
             their own)",
            key.kind()
        ),
    })
}

/// Whether `node` may list (and so subscribe to) the collection of `plural` in API group
/// `group`. Open without a grant: the kinds any node may read by name ([`OPEN_READ_KINDS`]:
/// ConfigMaps, Services, Endpoints, EndpointSlices, Namespaces, DeviceModels; the Node
/// authorizer lets kubelets list Services and Endpoints too). Anything else needs an operator's
/// grant, given the Kubernetes way: a ClusterRoleBinding of the Group `system:nodes` (every
/// node) or the User `system:node:{name}` (one node) to a ClusterRole with a rule allowing
/// `list` or `watch` (or `*`) on that group and resource. `bindings` are the stored
/// ClusterRoleBindings, `role` looks a ClusterRole up by name.
///
/// # Errors
/// A [`Refusal`] that says how to grant the read.
pub fn authorize_collection(
    node: &str,
    group: &str,
    plural: &str,
    store_kind: &str,
    bindings: &[Object],
    role: impl Fn(&str) -> Option<Object>,
) -> Result<(), Refusal> {
    if store_kind == "leases" || store_kind == "pods" {
        // A node's own pods and Lease are already its; other nodes' are not its business.
    } else if OPEN_READ_KINDS.contains(&store_kind) || granted(node, group, plural, bindings, role)
    {
        return Ok(());
    }
    let resource = if group.is_empty() {
        plural.to_owned()
    } else {
        format!("{plural}.{group}")
    };
    Err(Refusal {
        action: "list",
        node: node.to_owned(),
        key: resource.clone(),
        reason: format!(
            "nodes list {resource} only with a grant: bind the Group system:nodes (or the User \
             system:node:{node}) to a ClusterRole allowing list and watch on {resource}, e.g. \
             `kubectl create clusterrole edge-read --verb=list,watch --resource={resource}` and \
             `kubectl create clusterrolebinding edge-read --clusterrole=edge-read \
             --group=system:nodes`"
        ),
    })
}

fn strings(value: Option<&Value>) -> Vec<&str> {
    value
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn granted(
    node: &str,
    group: &str,
    plural: &str,
    bindings: &[Object],
    role: impl Fn(&str) -> Option<Object>,
) -> bool {
    let user = format!("system:node:{node}");
    bindings.iter().any(|binding| {
        let subject_matches = binding
            .get("subjects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|s| match (s["kind"].as_str(), s["name"].as_str()) {
                (Some("Group"), Some(name)) => name == "system:nodes",
                (Some("User"), Some(name)) => name == user,
                _ => false,
            });
        let role_ref = binding.get("roleRef");
        let is_cluster_role = role_ref.and_then(|r| r["kind"].as_str()) == Some("ClusterRole");
        let Some(role) = role_ref
            .and_then(|r| r["name"].as_str())
            .filter(|_| subject_matches && is_cluster_role)
            .and_then(&role)
        else {
            return false;
        };
        role.get("rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|rule| {
                let verbs = strings(rule.get("verbs"));
                let groups = strings(rule.get("apiGroups"));
                let resources = strings(rule.get("resources"));
                verbs.iter().any(|v| matches!(*v, "list" | "watch" | "*"))
                    && groups.iter().any(|g| *g == group || *g == "*")
                    && resources.iter().any(|r| *r == plural || *r == "*")
                    && strings(rule.get("resourceNames")).is_empty()
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        serde_json::from_value(v).unwrap()
    }

    fn key(s: &str) -> ObjectKey {
        ObjectKey::parse(s).unwrap()
    }

    #[test]
    fn collections_need_a_grant_beyond_the_open_kinds() {
        let role = |name: &str| {
            (name == "edge-read").then(|| {
                obj(json!({"metadata": {"name": "edge-read"}, "rules": [
                    {"verbs": ["get", "list", "watch"], "apiGroups": ["example.com"],
                     "resources": ["widgets"]}]}))
            })
        };
        let binding = |subject: Value| {
            obj(json!({"metadata": {"name": "b"}, "subjects": [subject],
                       "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                   "kind": "ClusterRole", "name": "edge-read"}}))
        };
        let widgets = |bindings: &[Object]| {
            authorize_collection(
                "n1",
                "example.com",
                "widgets",
                "widgets.example.com",
                bindings,
                role,
            )
        };
        assert!(authorize_collection("n1", "", "configmaps", "configmaps", &[], role).is_ok());
        let refusal = authorize_collection("n1", "", "secrets", "secrets", &[], role).unwrap_err();
        assert!(
            refusal.reason.contains("clusterrolebinding"),
            "{}",
            refusal.reason
        );
        assert!(widgets(&[]).is_err());
        assert!(widgets(&[binding(json!({"kind": "Group", "name": "system:nodes"}))]).is_ok());
        assert!(widgets(&[binding(json!({"kind": "User", "name": "system:node:n1"}))]).is_ok());
        assert!(widgets(&[binding(json!({"kind": "User", "name": "system:node:n2"}))]).is_err());
        assert!(authorize_collection("n1", "", "pods", "pods", &[], role).is_err());
    }

    #[test]
    fn pods_status_only_and_only_when_bound() {
        let current = obj(
            json!({"metadata": {"name": "p", "namespace": "d", "labels": {"a": "1"}},
            "spec": {"nodeName": "n1"}, "status": {"phase": "Pending"}}),
        );
        let proposed = obj(
            json!({"metadata": {"name": "p", "namespace": "d", "labels": {"hacked": "1"}},
            "spec": {"nodeName": "n1", "containers": []}, "status": {"phase": "Running"}}),
        );
        let k = key("pods/d/p");
        match authorize("n1", &k, Some(&current), Some(&proposed)).unwrap() {
            Decision::Status(merged) => {
                assert_eq!(merged["status"]["phase"], "Running");
                assert_eq!(
                    merged["metadata"]["labels"],
                    json!({"a": "1"}),
                    "only status changes"
                );
            }
            other => panic!("{other:?}"),
        }
        let err = authorize("n2", &k, Some(&current), Some(&proposed)).unwrap_err();
        assert!(err.to_string().contains("not bound to this node"), "{err}");
        assert!(
            authorize("n1", &k, None, Some(&proposed)).is_err(),
            "nodes do not create pods"
        );
        assert!(
            authorize("n1", &k, Some(&current), None).is_err(),
            "not being deleted"
        );
        let mut deleting = current.clone();
        object::meta_mut(&mut deleting)
            .insert("deletionTimestamp".into(), json!("2026-01-01T00:00:00Z"));
        assert_eq!(
            authorize("n1", &k, Some(&deleting), None).unwrap(),
            Decision::ConfirmDelete
        );
        assert!(authorize("n2", &k, Some(&deleting), None).is_err());
    }

    #[test]
    fn own_node_and_lease_only() {
        let node =
            obj(json!({"metadata": {"name": "n1", "labels": {EDGE_ROLE_LABEL: ""}}, "status": {}}));
        assert!(matches!(
            authorize("n1", &key("nodes//n1"), None, Some(&node)),
            Ok(Decision::Write(_))
        ));
        assert!(
            authorize("n2", &key("nodes//n1"), None, Some(&node)).is_err(),
            "impersonation"
        );
        let unlabelled = obj(json!({"metadata": {"name": "n1"}}));
        assert!(authorize("n1", &key("nodes//n1"), None, Some(&unlabelled)).is_err());
        assert!(authorize(
            "n1",
            &key("nodes//n1"),
            Some(&node),
            Some(&obj(json!({"metadata": {"name": "n1", "labels": {}}})))
        )
        .is_err());
        let lease = obj(
            json!({"metadata": {"name": "n1", "namespace": "kube-node-lease"}, "spec": {"holderIdentity": "n1"}}),
        );
        assert!(authorize("n1", &key("leases/kube-node-lease/n1"), None, Some(&lease)).is_ok());
        assert!(authorize("n2", &key("leases/kube-node-lease/n1"), None, Some(&lease)).is_err());
        let mut stolen = lease.clone();
        stolen.insert("spec".into(), json!({"holderIdentity": "n2"}));
        assert!(authorize("n1", &key("leases/kube-node-lease/n1"), None, Some(&stolen)).is_err());
        let cm = obj(json!({"metadata": {"name": "c", "namespace": "d"}}));
        let err = authorize("n1", &key("configmaps/d/c"), None, Some(&cm)).unwrap_err();
        assert!(
            err.to_string().contains("nodes may not write configmaps"),
            "{err}"
        );
        let renamed = obj(json!({"metadata": {"name": "other", "namespace": "kube-node-lease"}}));
        assert!(authorize(
            "n1",
            &key("leases/kube-node-lease/n1"),
            None,
            Some(&renamed)
        )
        .is_err());
    }

    #[test]
    fn events_about_the_node_or_from_it() {
        let ev = |kind: &str, name: &str, host: &str| {
            obj(json!({"metadata": {"name": "e", "namespace": "d"},
            "involvedObject": {"kind": kind, "name": name}, "source": {"host": host}}))
        };
        let k = key("events/d/e");
        assert!(authorize("n1", &k, None, Some(&ev("Node", "n1", ""))).is_ok());
        assert!(authorize("n1", &k, None, Some(&ev("Pod", "p", "n1"))).is_ok());
        assert!(authorize("n1", &k, None, Some(&ev("Pod", "p", "n2"))).is_err());
    }

    #[test]
    fn reads_of_secrets_only_when_routed() {
        assert_eq!(
            authorize_read("n1", &key("configmaps/d/c"), false),
            Ok(Read::Subscribe)
        );
        let err = authorize_read("n1", &key("secrets/d/s"), false).unwrap_err();
        assert!(err.to_string().contains("only when it is routed"), "{err}");
        assert_eq!(
            authorize_read("n1", &key("secrets/d/s"), true),
            Ok(Read::Routed)
        );
        assert!(authorize_read("n1", &key("events/d/e"), false).is_err());
        let own_lease = authorize_read("n1", &key("leases/kube-node-lease/n1"), false);
        assert!(
            own_lease.unwrap_err().to_string().contains("heartbeats"),
            "the refusal says why"
        );
        assert!(authorize_read("n1", &key("nodes//n2"), false).is_err());
    }
}
