//! DeviceController (KubeEdge's name for it): Devices (`devices.kubeedge.io` Device) and the
//! DeviceModels they use, to the nodes that serve them, and the devices' reported state back.
//!
//! - **Downstream**: a Device goes to the node named in its `spec.nodeName`, with the
//!   DeviceModel of its `spec.deviceModelRef`, reference-counted like a pod's ConfigMaps (the
//!   EdgeController's routing index asks [`device_references`]); a Device that moves or goes
//!   away is dropped from the node, and its model with the last device using it.
//! - **Upstream**: a node reports a Device's twins (`status.twins`: reported values and
//!   `observedDesired`) as a patch of its [`DEVICE_OWNED_PART`], which node authorization
//!   ([`crate::authz`]) accepts only from the node the Device is bound to, on top of the
//!   cloud's current Device (the spec stays the cloud's).

use replication::api::object::Object;
use replication::ObjectKey;

use crate::routing::str_at;

/// The part of a Device its node owns and reports (as for pods, KubeEdge's twin reports).
pub const DEVICE_OWNED_PART: &str = "status";

/// The DeviceModel a device uses, as a key in the device's namespace (none if it names
/// none).
pub fn device_references(namespace: &str, device: &Object) -> Vec<ObjectKey> {
    device
        .get("spec")
        .and_then(|spec| str_at(spec, &["deviceModelRef", "name"]))
        .and_then(|name| ObjectKey::new("devicemodels", namespace, name).ok())
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_device_references_its_model_in_its_namespace() {
        let device = json!({"spec": {"nodeName": "edge-1", "deviceModelRef": {"name": "thermo"}}});
        let device = device.as_object().unwrap();
        assert_eq!(
            device_references("plant", device),
            vec![ObjectKey::new("devicemodels", "plant", "thermo").unwrap()]
        );
        let bare = json!({"spec": {"nodeName": "edge-1"}});
        assert!(device_references("plant", bare.as_object().unwrap()).is_empty());
        assert_eq!(
            replication::sync::status_patch::owned_part("devices"),
            Some(DEVICE_OWNED_PART)
        );
    }
}
