//! DeviceController (KubeEdge's name for it): Devices (`devices.kubeedge.io` Device) and the
//! DeviceModels they use, to the nodes that serve them, and the devices' reported state back.
//!
//! - **Downstream**: a Device goes to the node named in its `spec.nodeName`, with the
//!   DeviceModel of its `spec.deviceModelRef` and its DeviceStatus, reference-counted like a
//!   pod's ConfigMaps (the EdgeController's routing index asks [`device_references`]); a Device
//!   that moves or goes away is dropped from the node, and its model with the last device using
//!   it.
//! - **Upstream**: as in KubeEdge v1.23, a device's reported state lives in its own
//!   `DeviceStatus` object (same namespace and name, controller-owned by the Device), not in
//!   `Device.status`. A node reports a DeviceStatus's `status` (twins: reported values and
//!   `observedDesired`; state; lastOnlineTime) as a patch of its [`DEVICE_OWNED_PART`]; node
//!   authorization ([`crate::authz`]) accepts it only from the node the Device is bound to and
//!   creates the DeviceStatus if the report comes first ([`new_device_status`]).
//! - **Older clients** that read `Device.status`: `cloudcore --device-status-in-device` also
//!   copies each accepted DeviceStatus report into the Device's `status`, in the same commit. It
//!   is off by default because every copy changes the Device, which then goes down to its node
//!   again (the bytes the split saves).
//! - **Lifecycle** ([`reconcile`], a controller of the embedded mode): every Device has a
//!   DeviceStatus from its creation (as KubeEdge's downstream controller makes one), and a
//!   DeviceStatus whose Device is gone is deleted (the garbage collector's job upstream; here
//!   the only owner kind of a DeviceStatus).

use replication::api::object::{self, Object};
use replication::api::resources::DEVICES_GROUP;
use replication::ObjectKey;
use serde_json::{json, Value};

use crate::controllers::{uid, Action, World};
use crate::routing::str_at;

/// The part of a Device its node owns and reports (as for pods, KubeEdge's twin reports).
pub const DEVICE_OWNED_PART: &str = "status";

/// What a Device brings to its node besides itself: the DeviceModel it uses (none if it names
/// none) and its DeviceStatus, as keys in the device's namespace.
pub fn device_references(namespace: &str, device: &Object) -> Vec<ObjectKey> {
    let model = device
        .get("spec")
        .and_then(|spec| str_at(spec, &["deviceModelRef", "name"]))
        .and_then(|name| ObjectKey::new("devicemodels", namespace, name).ok());
    let status = ObjectKey::new("devicestatuses", namespace, object::name(device)).ok();
    model.into_iter().chain(status).collect()
}

/// A new DeviceStatus for `device` (same namespace and name), controller-owned by it so that
/// it goes with it; `status` is its `status` (`{}` for none yet).
pub fn new_device_status(device: &Object, status: Value) -> Object {
    let owner = json!({
        "apiVersion": format!("{DEVICES_GROUP}/v1beta1"),
        "kind": "Device",
        "name": object::name(device),
        "uid": uid(device),
        "controller": true,
        "blockOwnerDeletion": true,
    });
    let created = json!({
        "apiVersion": format!("{DEVICES_GROUP}/v1beta1"),
        "kind": "DeviceStatus",
        "metadata": {
            "name": object::name(device),
            "namespace": object::namespace(device),
            "ownerReferences": [owner],
        },
        "spec": {},
        "status": status,
    });
    created.as_object().cloned().unwrap_or_default()
}

/// Whether `status` (a DeviceStatus) is owned by the Device `device` (by uid).
fn owned_by(status: &Object, device: &Object) -> bool {
    crate::controllers::owner_references(status)
        .iter()
        .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid(device)))
}

/// The DeviceStatus lifecycle over a snapshot of Devices and DeviceStatuses: one created for
/// each Device that has none, and one whose owner Device is gone (by uid: a Device deleted and
/// made again gets a fresh one) deleted.
pub fn reconcile(world: &World, _now: i64) -> Vec<Action> {
    let mut actions = Vec::new();
    let devices: std::collections::HashMap<(&str, &str), &Object> = world
        .devices
        .iter()
        .map(|d| ((object::namespace(d), object::name(d)), d))
        .collect();
    let mut covered = std::collections::HashSet::new();
    for status in &world.devicestatuses {
        let at = (object::namespace(status), object::name(status));
        match devices.get(&at) {
            Some(device) if owned_by(status, device) => {
                covered.insert(at);
            }
            // A status someone made without an owner is left alone, and counts as the
            // device's (creating another would only conflict).
            _ if crate::controllers::owner_references(status).is_empty() => {
                covered.insert(at);
            }
            _ if crate::controllers::is_terminating(status) => {}
            _ => actions.push(Action::Delete {
                resource: "devicestatuses",
                namespace: at.0.to_owned(),
                name: at.1.to_owned(),
                uid: uid(status).to_owned(),
            }),
        }
    }
    for (at, device) in &devices {
        if covered.contains(at) || crate::controllers::is_terminating(device) {
            continue;
        }
        // A stale one of a former Device of this name is being deleted above; the next pass
        // creates the new one.
        if world
            .devicestatuses
            .iter()
            .any(|s| (object::namespace(s), object::name(s)) == *at)
        {
            continue;
        }
        actions.push(Action::Create {
            resource: "devicestatuses",
            namespace: at.0.to_owned(),
            object: Value::Object(new_device_status(device, json!({}))),
        });
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_device_references_its_model_in_its_namespace() {
        let device = json!({"metadata": {"name": "t1"}, "spec": {"nodeName": "edge-1", "deviceModelRef": {"name": "thermo"}}});
        let device = device.as_object().unwrap();
        assert_eq!(
            device_references("plant", device),
            vec![
                ObjectKey::new("devicemodels", "plant", "thermo").unwrap(),
                ObjectKey::new("devicestatuses", "plant", "t1").unwrap()
            ]
        );
        let bare = json!({"metadata": {"name": "t2"}, "spec": {"nodeName": "edge-1"}});
        assert_eq!(
            device_references("plant", bare.as_object().unwrap()),
            vec![ObjectKey::new("devicestatuses", "plant", "t2").unwrap()]
        );
        assert_eq!(
            replication::sync::status_patch::owned_part("devices"),
            Some(DEVICE_OWNED_PART)
        );
    }

    fn device(name: &str, uid: &str) -> Object {
        json!({"metadata": {"name": name, "namespace": "plant", "uid": uid}, "spec": {}})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn every_device_gets_one_status_and_a_status_goes_with_its_device() {
        let mut world = World {
            devices: vec![device("t1", "u1"), device("t2", "u2")],
            ..World::default()
        };
        let mut kept = new_device_status(&world.devices[0], json!({}));
        object::meta_mut(&mut kept).insert("uid".into(), json!("s1"));
        // t3's Device is gone; t2's status belongs to a former t2 (another uid).
        let mut orphan = new_device_status(&device("t3", "u3"), json!({}));
        object::meta_mut(&mut orphan).insert("uid".into(), json!("s3"));
        let mut stale = new_device_status(&device("t2", "old"), json!({}));
        object::meta_mut(&mut stale).insert("uid".into(), json!("s2"));
        world.devicestatuses = vec![kept, orphan, stale];
        let actions = reconcile(&world, 0);
        let mut names: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Delete { name, uid, .. } => format!("delete {name} {uid}"),
                Action::Create { object, .. } => format!("create {}", object["metadata"]["name"]),
                _ => "other".into(),
            })
            .collect();
        names.sort();
        assert_eq!(names, ["delete t2 s2", "delete t3 s3"]);
        // Once the stale one is gone, t2 gets its own, owned by the new uid.
        world.devicestatuses.retain(|s| uid(s) == "s1");
        let actions = reconcile(&world, 0);
        assert_eq!(actions.len(), 1);
        let Action::Create { object, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "u2");
        assert_eq!(object["metadata"]["ownerReferences"][0]["controller"], true);
    }
}
