//! What a mapper must be told (sans-IO): the Devices and DeviceModels it should hold, against
//! what it was told, as the DMI calls that close the gap, in an order a mapper can follow
//! (a model before the devices that use it; devices removed before their model).

use std::collections::BTreeMap;

use super::api;

/// An object a mapper holds: a device or a model, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Held {
    Model { namespace: String, name: String },
    Device { namespace: String, name: String },
}

impl Held {
    /// Its key in the node's store (`k\0{mapper}\0` prefix added by the caller).
    pub fn encode(&self) -> String {
        match self {
            Held::Model { namespace, name } => format!("m\0{namespace}\0{name}"),
            Held::Device { namespace, name } => format!("d\0{namespace}\0{name}"),
        }
    }

    /// The inverse of [`Held::encode`].
    pub fn decode(text: &str) -> Option<Held> {
        let mut parts = text.splitn(3, '\0');
        let (kind, namespace, name) = (parts.next()?, parts.next()?, parts.next()?);
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        match kind {
            "m" => Some(Held::Model { namespace, name }),
            "d" => Some(Held::Device { namespace, name }),
            _ => None,
        }
    }
}

/// What a mapper should hold: each object with its message.
#[derive(Debug, Default, Clone)]
pub struct Desired {
    pub models: BTreeMap<(String, String), api::DeviceModel>,
    pub devices: BTreeMap<(String, String), api::Device>,
}

/// One call to a mapper's DeviceMapperService.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    CreateDeviceModel(api::DeviceModel),
    UpdateDeviceModel(api::DeviceModel),
    RemoveDeviceModel { namespace: String, name: String },
    RegisterDevice(api::Device),
    UpdateDevice(api::Device),
    RemoveDevice { namespace: String, name: String },
}

impl Call {
    /// What the mapper holds once the call succeeded, and the digest of its content (`None`:
    /// it holds nothing there any more).
    pub fn outcome(&self) -> (Held, Option<u64>) {
        match self {
            Call::CreateDeviceModel(m) | Call::UpdateDeviceModel(m) => (
                Held::Model {
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                },
                Some(digest(m)),
            ),
            Call::RegisterDevice(d) | Call::UpdateDevice(d) => (
                Held::Device {
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                },
                Some(digest(d)),
            ),
            Call::RemoveDeviceModel { namespace, name } => (
                Held::Model {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
                None,
            ),
            Call::RemoveDevice { namespace, name } => (
                Held::Device {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
                None,
            ),
        }
    }

    /// The RPC's name, for logs.
    pub fn method(&self) -> &'static str {
        match self {
            Call::CreateDeviceModel(_) => "CreateDeviceModel",
            Call::UpdateDeviceModel(_) => "UpdateDeviceModel",
            Call::RemoveDeviceModel { .. } => "RemoveDeviceModel",
            Call::RegisterDevice(_) => "RegisterDevice",
            Call::UpdateDevice(_) => "UpdateDevice",
            Call::RemoveDevice { .. } => "RemoveDevice",
        }
    }
}

/// A stable digest of a message's encoding (FNV-1a over the protobuf bytes), to tell whether
/// the mapper holds the current version. Stable because the generated maps are BTreeMaps
/// (`edge/build.rs`): a HashMap's order, and so the bytes, differ per instance.
pub fn digest<M: prost::Message>(message: &M) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in message.encode_to_vec() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The calls that take a mapper from `told` (what it holds, with digests) to `desired`.
pub fn plan(told: &BTreeMap<Held, u64>, desired: &Desired) -> Vec<Call> {
    let mut calls = Vec::new();
    for ((namespace, name), model) in &desired.models {
        let held = Held::Model {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        match told.get(&held) {
            None => calls.push(Call::CreateDeviceModel(model.clone())),
            Some(d) if *d != digest(model) => calls.push(Call::UpdateDeviceModel(model.clone())),
            Some(_) => {}
        }
    }
    for ((namespace, name), device) in &desired.devices {
        let held = Held::Device {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        match told.get(&held) {
            None => calls.push(Call::RegisterDevice(device.clone())),
            Some(d) if *d != digest(device) => calls.push(Call::UpdateDevice(device.clone())),
            Some(_) => {}
        }
    }
    for held in told.keys() {
        if let Held::Device { namespace, name } = held {
            if !desired
                .devices
                .contains_key(&(namespace.clone(), name.clone()))
            {
                calls.push(Call::RemoveDevice {
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
            }
        }
    }
    for held in told.keys() {
        if let Held::Model { namespace, name } = held {
            if !desired
                .models
                .contains_key(&(namespace.clone(), name.clone()))
            {
                calls.push(Call::RemoveDeviceModel {
                    namespace: namespace.clone(),
                    name: name.clone(),
                });
            }
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, unit: &str) -> api::DeviceModel {
        api::DeviceModel {
            name: name.into(),
            namespace: "ns".into(),
            spec: Some(api::DeviceModelSpec {
                properties: vec![api::ModelProperty {
                    name: "t".into(),
                    unit: unit.into(),
                    ..Default::default()
                }],
                commands: Vec::new(),
            }),
        }
    }

    fn device(name: &str, model: &str) -> api::Device {
        api::Device {
            name: name.into(),
            namespace: "ns".into(),
            spec: Some(api::DeviceSpec {
                device_model_reference: model.into(),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn apply(told: &mut BTreeMap<Held, u64>, calls: &[Call]) {
        for call in calls {
            match call.outcome() {
                (held, Some(d)) => told.insert(held, d),
                (held, None) => told.remove(&held),
            };
        }
    }

    #[test]
    fn models_come_before_their_devices_and_go_after_them() {
        let mut desired = Desired::default();
        desired
            .models
            .insert(("ns".into(), "m".into()), model("m", "C"));
        desired
            .devices
            .insert(("ns".into(), "d1".into()), device("d1", "m"));
        let mut told = BTreeMap::new();
        let calls = plan(&told, &desired);
        let methods: Vec<&str> = calls.iter().map(Call::method).collect();
        assert_eq!(methods, ["CreateDeviceModel", "RegisterDevice"]);
        apply(&mut told, &calls);
        assert!(plan(&told, &desired).is_empty(), "nothing twice");

        // A changed model is updated; a changed device too.
        desired
            .models
            .insert(("ns".into(), "m".into()), model("m", "F"));
        desired
            .devices
            .insert(("ns".into(), "d1".into()), device("d1", "m2"));
        let calls = plan(&told, &desired);
        let methods: Vec<&str> = calls.iter().map(Call::method).collect();
        assert_eq!(methods, ["UpdateDeviceModel", "UpdateDevice"]);
        apply(&mut told, &calls);

        // Everything gone: the device is removed before its model.
        let calls = plan(&told, &Desired::default());
        let methods: Vec<&str> = calls.iter().map(Call::method).collect();
        assert_eq!(methods, ["RemoveDevice", "RemoveDeviceModel"]);
        apply(&mut told, &calls);
        assert!(told.is_empty());
        let held = Held::Device {
            namespace: "ns".into(),
            name: "a\0b".into(),
        };
        assert_eq!(Held::decode(&held.encode()), Some(held));
    }
}
