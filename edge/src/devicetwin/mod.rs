//! DeviceTwin: the node's devices and their twins, answering mappers (through EventBus) and
//! reporting to the cloud.
//!
//! Where things live (the seeds' device / deviceAttr / deviceTwin tables):
//! - **device**: the Device object routed to this node, held in the cache (its spec comes from
//!   the cloud), plus a device record `d\0{id}` in the `devicetwin` column family with the state
//!   and last-online time the device reported;
//! - **deviceAttr**: the properties of the Device's spec and of its DeviceModel (held in the
//!   cache too), with the model's value types;
//! - **deviceTwin**: per property, *expected* is the Device's `spec.properties[].desired` (the
//!   cloud's), *actual* is a twin record `t\0{id}\0{property}` (value, timestamp, edge version)
//!   in the `devicetwin` column family.
//!
//! A device's update is committed together with the report of the Device's status it causes
//! (one RocksDB batch, see [`MetaManager::report_batch`]), so a crash loses neither or both. The
//! status is rebuilt from all twin records each time, so however many updates pile up offline,
//! the one report in the outbox carries every property's latest value (coalesced per property).
//!
//! A device's id on MQTT is its name.

pub mod payload;
pub mod typed;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::store::{Aux, WriteSet};
use replication::{ChangeKind, KeyRange, ObjectKey, SharedChange};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::eventbus::topics::{self, Request};

/// DeviceTwin's column family in the node's store: device and twin records, committed
/// atomically with the reports they cause. Registered by [`crate::meta::MetaManager`].
pub const DEVICETWIN: Aux = Aux::named("devicetwin");
use crate::meta::MetaManager;
use payload::{
    BaseMessage, DeviceInfo, DeviceState, ErrorResult, MembershipDetail, MembershipUpdate, MsgTwin,
    StateUpdate, TwinDelta, TwinDoc, TwinDocument, TwinResult, TwinUpdate, TwinValue, TwinVersion,
    TypeMetadata, ValueMetadata,
};

/// A message for MQTT.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Sent at QoS 1: news a mapper must not miss (deltas, documents, membership changes);
    /// answers to requests go at QoS 0 (a mapper that missed one asks again).
    pub notification: bool,
}

/// The reported side of one property (deviceTwin table).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct TwinRecord {
    actual: String,
    /// When the device measured it, in milliseconds.
    timestamp: i64,
    /// Counts the device's updates of this property.
    edge_version: i64,
}

/// What the device reported about itself (device table), and the versions of the expected
/// values this node has seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct DeviceRecord {
    state: String,
    last_online: String,
    /// Per property, how many expected (desired) values the cloud has set that this node saw:
    /// the `cloud` part of the twin's `expected_version` (KubeEdge's `TwinVersion`), so that a
    /// mapper can tell a new desired value from one it already applied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    expected_versions: BTreeMap<String, i64>,
}

/// A Device held in the cache, as DeviceTwin needs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeviceView {
    pub(crate) key: ObjectKey,
    pub(crate) model: Option<ObjectKey>,
    description: String,
    /// Desired value and its timestamp, per property (the expected side).
    desired: BTreeMap<String, (String, i64)>,
    /// Every property a device may report, with its model type (`string` if none).
    pub(crate) properties: BTreeMap<String, typed::PropertyType>,
    /// The properties whose values go to the cloud: those with `reportToCloud: true` if any
    /// property says so, else all (Devices written before the field, and MQTT mappers).
    to_cloud: Option<BTreeSet<String>>,
    /// A property's `reportCycle` (milliseconds): its changes go up at most once per cycle.
    report_cycle_ms: BTreeMap<String, u64>,
    /// `spec.protocol.protocolName`: which DMI mapper serves the device.
    pub(crate) protocol: String,
}

impl DeviceView {
    fn goes_to_cloud(&self, property: &str) -> bool {
        self.to_cloud.as_ref().is_none_or(|p| p.contains(property))
    }

    fn kind_of(&self, property: &str) -> &str {
        self.properties
            .get(property)
            .map_or("string", |p| p.kind.as_str())
    }
}

fn twin_key(device: &str, property: &str) -> Vec<u8> {
    format!("t\0{device}\0{property}").into_bytes()
}

fn twin_prefix(device: &str) -> Vec<u8> {
    format!("t\0{device}\0").into_bytes()
}

fn device_key(device: &str) -> Vec<u8> {
    format!("d\0{device}").into_bytes()
}

/// Marks a device whose report is held back by a `reportCycle` (sent after a restart).
fn pending_key(device: &str) -> Vec<u8> {
    format!("p\0{device}").into_bytes()
}

/// Writes not yet committed in a batch of requests, read before the store.
#[derive(Default)]
struct Staged {
    twins: BTreeMap<(String, String), TwinRecord>,
    devices: BTreeMap<String, DeviceRecord>,
    /// Devices whose status must be reported.
    touched: BTreeSet<String>,
    /// Objects to report as they are (upload events).
    reports: Vec<(ObjectKey, Bytes)>,
}

/// The answers to one request: `ok` once its writes are durable, `failed` if they are not.
struct Answer {
    ok: Vec<Outgoing>,
    failed: Option<Outgoing>,
}

/// An error answered on a result topic.
struct Refusal {
    code: u16,
    reason: String,
}

fn refuse(code: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

fn json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn error_payload(event_id: &str, code: u16, reason: &str) -> Vec<u8> {
    json_bytes(&ErrorResult {
        base: BaseMessage::reply(event_id),
        code,
        reason: reason.to_owned(),
    })
}

/// The event id a payload carries, if it is JSON with one (for error answers).
fn event_id_of(payload: &[u8]) -> String {
    serde_json::from_slice::<BaseMessage>(payload)
        .map(|b| b.event_id)
        .unwrap_or_default()
}

pub struct DeviceTwin {
    meta: Arc<MetaManager>,
    /// Larger request payloads are refused on their result topic.
    max_payload: usize,
    devices: HashMap<String, DeviceView>,
    events_sent: u64,
    /// When each device's status last went up (for `reportCycle`).
    last_report: HashMap<String, std::time::Instant>,
    /// Devices whose report is held back, and when it is due.
    due: HashMap<String, std::time::Instant>,
    reports_held: u64,
}

impl DeviceTwin {
    /// Loads the devices held in the cache.
    pub fn new(meta: Arc<MetaManager>, max_payload: usize) -> Self {
        let mut twin = DeviceTwin {
            meta,
            max_payload,
            devices: HashMap::new(),
            events_sent: 0,
            last_report: HashMap::new(),
            due: HashMap::new(),
            reports_held: 0,
        };
        let held: Vec<(ObjectKey, Bytes)> = match KeyRange::kind("devices") {
            Ok(range) => twin
                .meta
                .store()
                .scan(&range)
                .filter_map(Result::ok)
                .map(|(key, versioned)| (key, versioned.object))
                .collect(),
            Err(_) => Vec::new(),
        };
        for (key, bytes) in held {
            if let Some(view) = twin.view(&key, &bytes) {
                twin.devices.insert(key.name().to_owned(), view);
            }
        }
        // Reports held back when the node stopped go up now.
        let now = std::time::Instant::now();
        let pending: Vec<String> = twin
            .meta
            .store()
            .scan_aux(DEVICETWIN, b"p\0")
            .filter_map(Result::ok)
            .map(|(key, _)| String::from_utf8_lossy(&key[2..]).into_owned())
            .collect();
        for id in pending {
            twin.due.insert(id, now);
        }
        twin
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Ids of the devices bound to this node.
    pub fn device_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.devices.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn view(&self, key: &ObjectKey, bytes: &[u8]) -> Option<DeviceView> {
        let device: Object = serde_json::from_slice(bytes).ok()?;
        let spec = device.get("spec");
        let model = spec
            .and_then(|s| s.get("deviceModelRef"))
            .and_then(|r| r.get("name"))
            .and_then(Value::as_str)
            .and_then(|m| ObjectKey::new("devicemodels", key.namespace(), m).ok());
        let mut properties = BTreeMap::new();
        if let Some(model) = &model {
            let held = self.meta.store().get(model).ok().flatten();
            let model_object: Option<Object> =
                held.and_then(|v| serde_json::from_slice(&v.object).ok());
            let listed = model_object
                .as_ref()
                .and_then(|m| m.get("spec"))
                .and_then(|s| s.get("properties"))
                .and_then(Value::as_array);
            for p in listed.into_iter().flatten() {
                if let Some(name) = p.get("name").and_then(Value::as_str) {
                    properties.insert(name.to_owned(), typed::PropertyType::from_model(p));
                }
            }
        }
        let mut desired = BTreeMap::new();
        let mut to_cloud = BTreeSet::new();
        let mut report_cycle_ms = BTreeMap::new();
        let listed = spec
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_array);
        for p in listed.into_iter().flatten() {
            let Some(name) = p.get("name").and_then(Value::as_str) else {
                continue;
            };
            properties
                .entry(name.to_owned())
                .or_insert_with(typed::PropertyType::string);
            if p.get("reportToCloud").and_then(Value::as_bool) == Some(true) {
                to_cloud.insert(name.to_owned());
            }
            if let Some(cycle) = p
                .get("reportCycle")
                .and_then(Value::as_u64)
                .filter(|c| *c > 0)
            {
                report_cycle_ms.insert(name.to_owned(), cycle);
            }
            let wanted = p.get("desired");
            let value = wanted.and_then(|d| d.get("value")).and_then(Value::as_str);
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                let timestamp = wanted
                    .and_then(|d| d.get("metadata"))
                    .and_then(|m| m.get("timestamp"))
                    .and_then(|t| t.as_str().and_then(|s| s.parse().ok()).or(t.as_i64()))
                    .unwrap_or(0);
                desired.insert(name.to_owned(), (value.to_owned(), timestamp));
            }
        }
        let description = object::meta(&device)
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get("description"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let protocol = spec
            .and_then(|s| s.get("protocol"))
            .and_then(|p| p.get("protocolName"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Some(DeviceView {
            key: key.clone(),
            model,
            description,
            desired,
            properties,
            to_cloud: (!to_cloud.is_empty()).then_some(to_cloud),
            report_cycle_ms,
            protocol,
        })
    }

    fn twin_record(&self, staged: &Staged, device: &str, property: &str) -> Option<TwinRecord> {
        if let Some(record) = staged.twins.get(&(device.to_owned(), property.to_owned())) {
            return Some(record.clone());
        }
        let bytes = self
            .meta
            .store()
            .get_aux(DEVICETWIN, &twin_key(device, property))
            .ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    fn twin_records(&self, staged: &Staged, device: &str) -> BTreeMap<String, TwinRecord> {
        let prefix = twin_prefix(device);
        let mut records = BTreeMap::new();
        for (key, value) in self
            .meta
            .store()
            .scan_aux(DEVICETWIN, &prefix)
            .filter_map(Result::ok)
        {
            let property = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if let Ok(record) = serde_json::from_slice(&value) {
                records.insert(property, record);
            }
        }
        for ((d, property), record) in &staged.twins {
            if d == device {
                records.insert(property.clone(), record.clone());
            }
        }
        records
    }

    fn device_record(&self, staged: &Staged, device: &str) -> DeviceRecord {
        if let Some(record) = staged.devices.get(device) {
            return record.clone();
        }
        self.meta
            .store()
            .get_aux(DEVICETWIN, &device_key(device))
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The twin of one property as mappers see it, with versions: the expected side's `cloud`
    /// version is `expected_cloud` (see [`DeviceRecord`]), the actual side's `edge` version
    /// counts the device's updates.
    fn msg_twin(
        view: &DeviceView,
        property: &str,
        record: Option<&TwinRecord>,
        expected_cloud: i64,
    ) -> MsgTwin {
        let expected = view.desired.get(property).map(|(value, ts)| TwinValue {
            value: Some(value.clone()),
            metadata: Some(ValueMetadata { timestamp: *ts }),
        });
        let actual = record.map(|r| TwinValue {
            value: Some(r.actual.clone()),
            metadata: Some(ValueMetadata {
                timestamp: r.timestamp,
            }),
        });
        MsgTwin {
            expected_version: expected.as_ref().map(|_| TwinVersion {
                cloud: expected_cloud,
                edge: 0,
            }),
            expected,
            actual_version: record.map(|r| TwinVersion {
                cloud: 0,
                edge: r.edge_version,
            }),
            actual,
            optional: Some(true),
            metadata: Some(TypeMetadata {
                kind: view.kind_of(property).to_owned(),
            }),
        }
    }

    fn all_twins(&self, staged: &Staged, id: &str, view: &DeviceView) -> BTreeMap<String, MsgTwin> {
        let records = self.twin_records(staged, id);
        let versions = self.device_record(staged, id).expected_versions;
        view.properties
            .keys()
            .map(|p| {
                let version = versions.get(p).copied().unwrap_or_default();
                (p.clone(), Self::msg_twin(view, p, records.get(p), version))
            })
            .collect()
    }

    fn info(&self, staged: &Staged, id: &str, view: &DeviceView, with_twin: bool) -> DeviceInfo {
        let record = self.device_record(staged, id);
        DeviceInfo {
            id: id.to_owned(),
            name: id.to_owned(),
            description: view.description.clone(),
            state: record.state,
            last_online: record.last_online,
            twin: with_twin.then(|| {
                self.all_twins(staged, id, view)
                    .into_iter()
                    .map(|(k, t)| (k, t.without_versions()))
                    .collect()
            }),
        }
    }

    /// `.../twin/update/delta` when some expected value differs from the actual one.
    fn delta(&self, staged: &Staged, id: &str, view: &DeviceView) -> Option<Outgoing> {
        let twins = self.all_twins(staged, id, view);
        let mut delta = BTreeMap::new();
        let mut shown = BTreeMap::new();
        for (name, twin) in twins {
            let Some(expected) = twin.expected_value() else {
                continue;
            };
            if twin.actual_value() != Some(expected) {
                delta.insert(name.clone(), expected.to_owned());
            }
            shown.insert(name, twin.without_versions());
        }
        (!delta.is_empty()).then(|| Outgoing {
            topic: topics::twin_delta(id),
            payload: json_bytes(&TwinDelta {
                base: BaseMessage::reply(""),
                twin: shown,
                delta,
            }),
            notification: true,
        })
    }

    /// Answers a batch of MQTT requests. Their writes commit together (one fsync); answers of
    /// requests that wrote something are returned only once that is durable.
    pub fn handle(&mut self, batch: Vec<(String, Bytes)>) -> Vec<Outgoing> {
        let node = self.meta.node().to_owned();
        let mut staged = Staged::default();
        let mut answers = Vec::with_capacity(batch.len());
        for (topic, payload) in batch {
            let Some(request) = topics::parse(&node, &topic) else {
                continue;
            };
            let result_topic = topics::result_topic(&node, &request);
            let outcome = if payload.len() > self.max_payload {
                Err(refuse(
                    413,
                    format!(
                        "the message is {} bytes; at most {} are accepted",
                        payload.len(),
                        self.max_payload
                    ),
                ))
            } else {
                self.serve(&request, &topic, &payload, &mut staged)
            };
            match (outcome, result_topic) {
                (Ok(answer), _) => answers.push(answer),
                (Err(refusal), topic_for_error) => {
                    tracing::warn!(%topic, code = refusal.code, reason = %refusal.reason, "MQTT request refused");
                    if let Some(result_topic) = topic_for_error {
                        answers.push(Answer {
                            ok: vec![Outgoing {
                                topic: result_topic,
                                payload: error_payload(
                                    &event_id_of(&payload),
                                    refusal.code,
                                    &refusal.reason,
                                ),
                                notification: false,
                            }],
                            failed: None,
                        });
                    }
                }
            }
        }
        let committed = self.commit(staged);
        answers
            .into_iter()
            .flat_map(|a| match (&committed, a.failed) {
                (Err(_), Some(failed)) => vec![failed],
                _ => a.ok,
            })
            .collect()
    }

    /// Commits the staged records with the DeviceStatus reports and events they cause. A
    /// device whose changed properties have a `reportCycle` is reported at most once per cycle:
    /// its report is held back (a pending mark is committed with the records, so a restart
    /// sends it) and sent by [`DeviceTwin::flush_due`].
    fn commit(&mut self, staged: Staged) -> Result<(), String> {
        if staged.twins.is_empty()
            && staged.devices.is_empty()
            && staged.reports.is_empty()
            && staged.touched.is_empty()
        {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let mut writes = WriteSet::new();
        for ((device, property), record) in &staged.twins {
            writes.put_aux(DEVICETWIN, twin_key(device, property), json_bytes(record));
        }
        for (device, record) in &staged.devices {
            writes.put_aux(DEVICETWIN, device_key(device), json_bytes(record));
        }
        let mut reports = staged.reports.clone();
        let mut reported = Vec::new();
        let mut held = Vec::new();
        for id in &staged.touched {
            let Some(view) = self.devices.get(id) else {
                continue;
            };
            let changed: Vec<&String> = staged
                .twins
                .keys()
                .filter(|(d, _)| d == id)
                .map(|(_, p)| p)
                .collect();
            // Only values of properties kept at the edge changed: nothing for the cloud.
            let state_changed = staged.devices.contains_key(id);
            let twins_only = !changed.is_empty() && !state_changed;
            if twins_only && changed.iter().all(|p| !view.goes_to_cloud(p)) {
                continue;
            }
            let cycle = changed
                .iter()
                .filter(|p| view.goes_to_cloud(p))
                .map(|p| view.report_cycle_ms.get(*p).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let next_allowed = self
                .last_report
                .get(id)
                .map(|last| *last + Duration::from_millis(cycle));
            if twins_only && cycle > 0 && next_allowed.is_some_and(|at| at > now) {
                let at = next_allowed.unwrap_or(now);
                let due = self.due.entry(id.clone()).or_insert(at);
                *due = (*due).min(at);
                writes.put_aux(DEVICETWIN, pending_key(id), Vec::new());
                held.push(id.clone());
                continue;
            }
            if let Some(report) = self.status_report(&staged, id) {
                reports.push(report);
                reported.push(id.clone());
                if self.due.remove(id).is_some() {
                    writes.delete_aux(DEVICETWIN, pending_key(id));
                }
            }
        }
        self.meta.report_batch(reports, writes).map_err(|e| {
            tracing::error!(error = %e, "cannot persist device twin updates");
            e.to_string()
        })?;
        for id in reported {
            self.last_report.insert(id, now);
        }
        self.reports_held += held.len() as u64;
        Ok(())
    }

    /// When the next held-back report is due, if any.
    pub fn next_due(&self) -> Option<std::time::Instant> {
        self.due.values().min().copied()
    }

    /// Sends the held-back reports due by `now` (their devices' latest values).
    pub fn flush_due(&mut self, now: std::time::Instant) {
        let ready: Vec<String> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if ready.is_empty() {
            return;
        }
        let mut reports = Vec::new();
        let mut writes = WriteSet::new();
        let staged = Staged::default();
        for id in &ready {
            self.due.remove(id);
            writes.delete_aux(DEVICETWIN, pending_key(id));
            if let Some(report) = self.status_report(&staged, id) {
                reports.push(report);
            }
        }
        match self.meta.report_batch(reports, writes) {
            Ok(()) => {
                for id in ready {
                    self.last_report.insert(id, now);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot send held-back device reports; retrying");
                for id in ready {
                    self.due.insert(id, now + Duration::from_secs(1));
                }
            }
        }
    }

    /// Reports held back by a `reportCycle` so far (what did not go up the link at once).
    pub fn reports_held(&self) -> u64 {
        self.reports_held
    }

    /// The device's DeviceStatus (`devices.kubeedge.io/v1beta1`, same namespace and name as
    /// the Device) with its `status` rebuilt from the twin and device records: the twins of
    /// the properties that go to the cloud, the state and the last time it was online.
    fn status_report(&self, staged: &Staged, id: &str) -> Option<(ObjectKey, Bytes)> {
        let view = self.devices.get(id)?;
        let key = ObjectKey::new("devicestatuses", view.key.namespace(), view.key.name()).ok()?;
        // Built on the DeviceStatus the node holds (routed with its Device), so that only the
        // status differs and the report goes as a patch; a new one before the cloud's arrives.
        let held = self.meta.store().get(&key).ok().flatten();
        let mut device_status: Object = match held {
            Some(held) => serde_json::from_slice(&held.object).ok()?,
            None => json!({
                "apiVersion": "devices.kubeedge.io/v1beta1",
                "kind": "DeviceStatus",
                "metadata": {"name": view.key.name(), "namespace": view.key.namespace()},
                "spec": {},
            })
            .as_object()
            .cloned()?,
        };
        let records = self.twin_records(staged, id);
        // Every property with a reported value or a desired one (KubeEdge's
        // `status.twins[]`: `reported` from the device, `observedDesired` as this node saw it).
        let properties: BTreeSet<&String> = records
            .keys()
            .chain(view.desired.keys())
            .filter(|p| view.goes_to_cloud(p))
            .collect();
        let twins: Vec<Value> = properties
            .into_iter()
            .map(|property| {
                let kind = view.kind_of(property);
                let mut twin = json!({"propertyName": property});
                if let Some(r) = records.get(property) {
                    twin["reported"] = json!({"value": r.actual, "metadata": {
                        "timestamp": r.timestamp.to_string(), "type": kind}});
                }
                if let Some((value, ts)) = view.desired.get(property) {
                    // The desired value as this node holds it (from the Device's spec, not the
                    // mapper), with the cloud's timestamp if it gave one.
                    twin["observedDesired"] = if *ts > 0 {
                        json!({"value": value, "metadata": {"timestamp": ts.to_string()}})
                    } else {
                        json!({"value": value})
                    };
                }
                twin
            })
            .collect();
        let record = self.device_record(staged, id);
        let mut status = json!({"twins": twins});
        if !record.state.is_empty() {
            status["state"] = json!(record.state);
        }
        if !record.last_online.is_empty() {
            status["lastOnlineTime"] = json!(record.last_online);
        }
        device_status.insert("status".into(), status);
        Some((key, Bytes::from(object::to_stored(device_status))))
    }

    fn serve(
        &mut self,
        request: &Request,
        topic: &str,
        payload: &[u8],
        staged: &mut Staged,
    ) -> Result<Answer, Refusal> {
        let node = self.meta.node().to_owned();
        let known = |id: &str| {
            self.devices
                .get(id)
                .cloned()
                .ok_or_else(|| refuse(404, format!("device {id} is not bound to node {node}")))
        };
        match request {
            Request::TwinUpdate { device } => {
                let view = known(device)?;
                self.twin_update(device, &view, payload, staged)
            }
            Request::TwinGet { device } => {
                let view = known(device)?;
                let base = parse_base(payload)?;
                let twin = self
                    .all_twins(staged, device, &view)
                    .into_iter()
                    .map(|(k, t)| (k, t.without_versions()))
                    .collect();
                Ok(Answer {
                    ok: vec![Outgoing {
                        topic: topics::result_topic(&node, request).unwrap_or_default(),
                        payload: json_bytes(&TwinResult {
                            base: BaseMessage::reply(&base.event_id),
                            twin,
                        }),
                        notification: false,
                    }],
                    failed: None,
                })
            }
            Request::StateUpdate { device } => {
                known(device)?;
                let update: StateUpdate = serde_json::from_slice(payload)
                    .map_err(|e| refuse(400, format!("malformed state update: {e}")))?;
                if !payload::STATES.contains(&update.state.as_str()) {
                    return Err(refuse(
                        400,
                        format!(
                            "state {:?} is not one of {}",
                            update.state,
                            payload::STATES.join(", ")
                        ),
                    ));
                }
                let mut record = self.device_record(staged, device);
                record.state = update.state.clone();
                if payload::is_online(&update.state) {
                    record.last_online = object::now_rfc3339();
                }
                staged.devices.insert(device.clone(), record.clone());
                staged.touched.insert(device.clone());
                let result_topic = topics::result_topic(&node, request).unwrap_or_default();
                Ok(Answer {
                    ok: vec![Outgoing {
                        topic: result_topic.clone(),
                        payload: json_bytes(&DeviceState {
                            base: BaseMessage::reply(&update.base.event_id),
                            device: DeviceInfo {
                                name: device.clone(),
                                state: record.state,
                                last_online: record.last_online,
                                ..DeviceInfo::default()
                            },
                        }),
                        notification: false,
                    }],
                    failed: Some(Outgoing {
                        topic: result_topic,
                        payload: error_payload(
                            &update.base.event_id,
                            500,
                            "the state could not be stored",
                        ),
                        notification: false,
                    }),
                })
            }
            Request::MembershipGet => {
                let base = parse_base(payload)?;
                let mut devices: Vec<DeviceInfo> = self
                    .devices
                    .iter()
                    .map(|(id, view)| self.info(staged, id, view, true))
                    .collect();
                devices.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(Answer {
                    ok: vec![Outgoing {
                        topic: topics::result_topic(&node, request).unwrap_or_default(),
                        payload: json_bytes(&MembershipDetail {
                            base: BaseMessage::reply(&base.event_id),
                            devices,
                        }),
                        notification: false,
                    }],
                    failed: None,
                })
            }
            Request::Upload => {
                staged.reports.push(self.upload_event(topic, payload)?);
                Ok(Answer {
                    ok: Vec::new(),
                    failed: None,
                })
            }
        }
    }

    fn twin_update(
        &self,
        id: &str,
        view: &DeviceView,
        payload: &[u8],
        staged: &mut Staged,
    ) -> Result<Answer, Refusal> {
        let update: TwinUpdate = serde_json::from_slice(payload)
            .map_err(|e| refuse(400, format!("malformed twin update: {e}")))?;
        let Some(twins) = update.twin else {
            return Err(refuse(400, "the update has no \"twin\""));
        };
        // Check everything first: an update applies whole or not at all.
        let mut values = Vec::with_capacity(twins.len());
        for (property, twin) in &twins {
            if !payload::valid_twin_key(property) {
                return Err(refuse(400, format!("property name {property:?} is not valid (letters, digits and -_.,:/@#, at most 128 bytes)")));
            }
            if !view.properties.contains_key(property) {
                return Err(refuse(
                    404,
                    format!("device {id} has no property {property} (neither its spec nor its model lists it)"),
                ));
            }
            let Some(twin) = twin else {
                return Err(refuse(400, format!("{property}: twins are removed in the cloud (the Device's spec), not by the device")));
            };
            if twin.expected_value().is_some() {
                return Err(refuse(400, format!("{property}: expected values are set in the cloud (spec.properties[].desired of the Device); a device reports actual values")));
            }
            let Some(actual) = twin.actual_value() else {
                return Err(refuse(400, format!("{property}: no actual value")));
            };
            if !payload::valid_twin_value(actual) {
                return Err(refuse(400, format!("{property}: the value is not valid (letters, digits, spaces and -_.,:/@#, at most 512 bytes)")));
            }
            if let Some(Err(why)) = view.properties.get(property).map(|t| t.check(actual)) {
                return Err(refuse(400, format!("{property}: {why}")));
            }
            let timestamp = twin
                .actual
                .as_ref()
                .and_then(|a| a.metadata.as_ref())
                .map(|m| m.timestamp)
                .filter(|t| *t > 0)
                .unwrap_or_else(payload::now_millis);
            values.push((property.clone(), actual.to_owned(), timestamp));
        }
        let mut result = BTreeMap::new();
        let mut document = BTreeMap::new();
        for (property, actual, timestamp) in values {
            let before = self.twin_record(staged, id, &property);
            let record = TwinRecord {
                actual,
                timestamp,
                edge_version: before.as_ref().map_or(0, |r| r.edge_version) + 1,
            };
            let version = self
                .device_record(staged, id)
                .expected_versions
                .get(&property)
                .copied()
                .unwrap_or_default();
            let current = Self::msg_twin(view, &property, Some(&record), version);
            document.insert(
                property.clone(),
                TwinDoc {
                    last: before
                        .as_ref()
                        .map(|r| Self::msg_twin(view, &property, Some(r), 0).without_versions()),
                    current: Some(current.clone().without_versions()),
                },
            );
            result.insert(property.clone(), current);
            staged.twins.insert((id.to_owned(), property), record);
        }
        staged.touched.insert(id.to_owned());
        let node = self.meta.node();
        let result_topic = topics::result_topic(
            node,
            &Request::TwinUpdate {
                device: id.to_owned(),
            },
        )
        .unwrap_or_default();
        let event_id = update.base.event_id;
        let mut ok = vec![
            Outgoing {
                topic: result_topic.clone(),
                payload: json_bytes(&TwinResult {
                    base: BaseMessage::reply(&event_id),
                    twin: result,
                }),
                notification: false,
            },
            Outgoing {
                topic: topics::twin_document(id),
                payload: json_bytes(&TwinDocument {
                    base: BaseMessage::reply(&event_id),
                    twin: document,
                }),
                notification: true,
            },
        ];
        ok.extend(self.delta(staged, id, view));
        Ok(Answer {
            ok,
            failed: Some(Outgoing {
                topic: result_topic,
                payload: error_payload(&event_id, 500, "the update could not be stored"),
                notification: false,
            }),
        })
    }

    /// Device data published on an upload topic, as an Event about this node.
    fn upload_event(&mut self, topic: &str, payload: &[u8]) -> Result<(ObjectKey, Bytes), Refusal> {
        const MESSAGE_LIMIT: usize = 4096;
        let node = self.meta.node().to_owned();
        self.events_sent += 1;
        let name = format!(
            "{node}.{:x}{:04x}",
            payload::now_millis(),
            self.events_sent % 0x10000
        );
        let mut message = String::from_utf8_lossy(payload).into_owned();
        if message.len() > MESSAGE_LIMIT {
            let mut end = MESSAGE_LIMIT;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let now = object::now_rfc3339();
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": "default",
                         "annotations": {"kedge.io/mqtt-topic": topic}},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node},
            "reason": "DeviceDataUpload",
            "message": message,
            "type": "Normal",
            "source": {"component": "eventbus", "host": node},
            "reportingComponent": "eventbus",
            "reportingInstance": node,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
        });
        let key = ObjectKey::new("events", "default", &name)
            .map_err(|e| refuse(400, format!("cannot name the event: {e}")))?;
        let object = event.as_object().cloned().unwrap_or_default();
        Ok((key, Bytes::from(object::to_stored(object))))
    }

    /// Follows a change of the cache: devices joining or leaving the node, desired values the
    /// cloud changed, models arriving.
    pub fn on_change(&mut self, change: &SharedChange) -> Vec<Outgoing> {
        match change.key.kind() {
            "devices" => self.device_changed(change),
            "devicemodels" => {
                // Devices of this model may report its properties from now on.
                let users: Vec<(String, ObjectKey)> = self
                    .devices
                    .iter()
                    .filter(|(_, v)| v.model.as_ref() == Some(&change.key))
                    .map(|(id, v)| (id.clone(), v.key.clone()))
                    .collect();
                for (id, key) in users {
                    let held = self.meta.store().get(&key).ok().flatten();
                    if let Some(view) = held.and_then(|v| self.view(&key, &v.object)) {
                        self.devices.insert(id, view);
                    }
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn device_changed(&mut self, change: &SharedChange) -> Vec<Outgoing> {
        let id = change.key.name().to_owned();
        let before = self.devices.get(&id).cloned();
        if change.kind == ChangeKind::Deleted {
            // Another namespace's device of the same name going away is not this one.
            if before.as_ref().is_some_and(|b| b.key == change.key) {
                return self.transition(&id, before, None);
            }
            return Vec::new();
        }
        let Some(after) = self.view(&change.key, &change.object) else {
            tracing::warn!(device = %change.key, "unreadable Device in the cache");
            return Vec::new();
        };
        self.transition(&id, before, Some(after))
    }

    /// Re-reads every device from the cache (after falling behind its changes) and tells
    /// mappers what changed meanwhile.
    pub fn resync(&mut self) -> Vec<Outgoing> {
        let fresh = DeviceTwin::new(self.meta.clone(), self.max_payload).devices;
        let mut ids: BTreeSet<String> = self.devices.keys().cloned().collect();
        ids.extend(fresh.keys().cloned());
        let mut out = Vec::new();
        for id in ids {
            let before = self.devices.get(&id).cloned();
            out.extend(self.transition(&id, before, fresh.get(&id).cloned()));
        }
        out
    }

    /// A device joining the node, leaving it, or changing: what mappers are told.
    fn transition(
        &mut self,
        id: &str,
        before: Option<DeviceView>,
        after: Option<DeviceView>,
    ) -> Vec<Outgoing> {
        let node = self.meta.node().to_owned();
        let staged = Staged::default();
        let mut out = Vec::new();
        match (before, after) {
            (None, None) => {}
            (Some(before), None) => {
                let info = self.info(&staged, id, &before, false);
                self.devices.remove(id);
                // Its records go with it: a device bound here again starts afresh.
                let mut writes = WriteSet::new();
                let prefix = twin_prefix(id);
                let mut end = prefix.clone();
                if let Some(last) = end.last_mut() {
                    *last = 1;
                }
                writes.delete_aux_range(DEVICETWIN, prefix, end);
                writes.delete_aux(DEVICETWIN, device_key(id));
                writes.delete_aux(DEVICETWIN, pending_key(id));
                self.due.remove(id);
                self.last_report.remove(id);
                if let Err(e) = self.meta.report_batch(Vec::new(), writes) {
                    tracing::warn!(device = %id, error = %e, "cannot remove the twin records");
                }
                out.push(membership(&node, Vec::new(), vec![info]));
            }
            (None, Some(view)) => {
                self.devices.insert(id.to_owned(), view.clone());
                // The desired values it arrives with are the cloud's first.
                let mut record = self.device_record(&staged, id);
                let mut first = Staged::default();
                for property in view.desired.keys() {
                    if !record.expected_versions.contains_key(property) {
                        record.expected_versions.insert(property.clone(), 1);
                        first.devices.insert(id.to_owned(), record.clone());
                    }
                }
                if let Err(e) = self.commit(first) {
                    tracing::warn!(device = %id, error = %e, "cannot record the expected versions");
                }
                let info = self.info(&staged, id, &view, true);
                out.push(membership(&node, vec![info], Vec::new()));
                out.extend(self.delta(&staged, id, &view));
            }
            // Our own status report, or a change that does not concern the twins.
            (Some(before), Some(view)) if before == view => {}
            (Some(before), Some(view)) => {
                self.devices.insert(id.to_owned(), view.clone());
                if before.desired != view.desired {
                    let records = self.twin_records(&staged, id);
                    let changed: BTreeSet<&String> = before
                        .desired
                        .keys()
                        .chain(view.desired.keys())
                        .filter(|p| before.desired.get(*p) != view.desired.get(*p))
                        .collect();
                    let twin = changed
                        .into_iter()
                        .map(|p| {
                            let record = records.get(p);
                            let doc = TwinDoc {
                                last: Some(
                                    Self::msg_twin(&before, p, record, 0).without_versions(),
                                ),
                                current: Some(
                                    Self::msg_twin(&view, p, record, 0).without_versions(),
                                ),
                            };
                            (p.clone(), doc)
                        })
                        .collect();
                    out.push(Outgoing {
                        topic: topics::twin_document(id),
                        payload: json_bytes(&TwinDocument {
                            base: BaseMessage::reply(""),
                            twin,
                        }),
                        notification: true,
                    });
                    out.extend(self.delta(&staged, id, &view));
                    // The Device's status carries the desired values this node observed
                    // (`status.twins[].observedDesired`, as KubeEdge reports them): report
                    // the new ones now, not only with the mapper's next value.
                    let mut report = Staged::default();
                    let mut record = self.device_record(&staged, id);
                    let bumped: BTreeSet<&String> = before
                        .desired
                        .keys()
                        .chain(view.desired.keys())
                        .filter(|p| before.desired.get(*p) != view.desired.get(*p))
                        .collect();
                    for p in bumped {
                        *record.expected_versions.entry(p.clone()).or_default() += 1;
                    }
                    report.devices.insert(id.to_owned(), record);
                    report.touched.insert(id.to_owned());
                    if let Err(e) = self.commit(report) {
                        tracing::warn!(device = %id, error = %e, "cannot report the observed desired values");
                    }
                }
            }
        }
        out
    }
}

/// A report from a DMI mapper ([`crate::dmi`]): a device's twins or its state.
#[derive(Debug, Clone, PartialEq)]
pub struct DmiReport {
    /// The device's namespace (empty: whichever namespace its name is bound in).
    pub namespace: String,
    pub name: String,
    pub body: DmiReportBody,
}

/// What a [`DmiReport`] carries.
#[derive(Debug, Clone, PartialEq)]
pub enum DmiReportBody {
    /// `ReportDeviceStatus`: per property, the reported value and its metadata
    /// (`timestamp` in milliseconds, when the device measured it).
    Twins(Vec<(String, String, BTreeMap<String, String>)>),
    /// `ReportDeviceStates`: the device's state.
    State(String),
}

/// Why a DMI report was refused; `code` maps to a gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmiRefusal {
    pub code: DmiCode,
    pub reason: String,
}

/// The gRPC status a refusal is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmiCode {
    InvalidArgument,
    NotFound,
    /// The node could not store it; the mapper may send it again.
    Unavailable,
}

fn dmi_refusal(code: DmiCode, reason: impl Into<String>) -> DmiRefusal {
    DmiRefusal {
        code,
        reason: reason.into(),
    }
}

impl DeviceTwin {
    /// Applies a batch of DMI reports, committed together (one fsync) with the DeviceStatus
    /// reports they cause. Each report applies whole or not at all; the result of each is
    /// returned once its writes are durable.
    pub fn dmi_reports(&mut self, batch: Vec<DmiReport>) -> Vec<Result<(), DmiRefusal>> {
        let mut staged = Staged::default();
        let mut results: Vec<Result<(), DmiRefusal>> = batch
            .into_iter()
            .map(|report| self.stage_dmi(report, &mut staged))
            .collect();
        if results.iter().any(Result::is_ok) {
            if let Err(e) = self.commit(staged) {
                for result in results.iter_mut().filter(|r| r.is_ok()) {
                    *result = Err(dmi_refusal(
                        DmiCode::Unavailable,
                        format!("the node could not store the report: {e}"),
                    ));
                }
            }
        }
        results
    }

    /// The id (name) of a device bound here, checked against the report's namespace.
    fn dmi_device(&self, namespace: &str, name: &str) -> Result<DeviceView, DmiRefusal> {
        let node = self.meta.node();
        self.devices
            .get(name)
            .filter(|v| namespace.is_empty() || v.key.namespace() == namespace)
            .cloned()
            .ok_or_else(|| {
                dmi_refusal(
                    DmiCode::NotFound,
                    format!("device {namespace}/{name} is not bound to node {node}"),
                )
            })
    }

    fn stage_dmi(&self, report: DmiReport, staged: &mut Staged) -> Result<(), DmiRefusal> {
        let view = self.dmi_device(&report.namespace, &report.name)?;
        let id = report.name;
        match report.body {
            DmiReportBody::State(state) => {
                if !payload::STATES.contains(&state.as_str()) {
                    return Err(dmi_refusal(
                        DmiCode::InvalidArgument,
                        format!(
                            "state {state:?} is not one of {}",
                            payload::STATES.join(", ")
                        ),
                    ));
                }
                let mut record = self.device_record(staged, &id);
                if record.state == state && !payload::is_online(&state) {
                    return Ok(());
                }
                if payload::is_online(&state) {
                    record.last_online = object::now_rfc3339();
                }
                record.state = state;
                staged.devices.insert(id.clone(), record);
                staged.touched.insert(id);
                Ok(())
            }
            DmiReportBody::Twins(twins) => {
                // Check everything first: a report applies whole or not at all.
                let mut values = Vec::with_capacity(twins.len());
                for (property, value, metadata) in twins {
                    let Some(kind) = view.properties.get(&property) else {
                        return Err(dmi_refusal(
                            DmiCode::NotFound,
                            format!(
                                "device {}/{id} has no property {property:?} (neither its spec nor its model lists it)",
                                view.key.namespace()
                            ),
                        ));
                    };
                    if !payload::valid_twin_value(&value) {
                        return Err(dmi_refusal(
                            DmiCode::InvalidArgument,
                            format!("{property}: the value is not valid (letters, digits, spaces and -_.,:/@#, at most 512 bytes)"),
                        ));
                    }
                    kind.check(&value).map_err(|why| {
                        dmi_refusal(DmiCode::InvalidArgument, format!("{property}: {why}"))
                    })?;
                    let measured = metadata
                        .get("timestamp")
                        .and_then(|t| t.parse::<i64>().ok())
                        .filter(|t| *t > 0);
                    values.push((property, value, measured));
                }
                for (property, actual, measured) in values {
                    let before = self.twin_record(staged, &id, &property);
                    // The same value again changes nothing the cloud shows but its time: a
                    // chatty mapper's repeats are kept at the edge. A value measured before
                    // the one held (calls that overtook each other) is older news.
                    if before.as_ref().is_some_and(|b| {
                        b.actual == actual || measured.is_some_and(|m| m < b.timestamp)
                    }) {
                        continue;
                    }
                    let timestamp = measured.unwrap_or_else(payload::now_millis);
                    let record = TwinRecord {
                        actual,
                        timestamp,
                        edge_version: before.as_ref().map_or(0, |r| r.edge_version) + 1,
                    };
                    staged.twins.insert((id.clone(), property), record);
                    staged.touched.insert(id.clone());
                }
                Ok(())
            }
        }
    }
}

fn membership(node: &str, added: Vec<DeviceInfo>, removed: Vec<DeviceInfo>) -> Outgoing {
    Outgoing {
        topic: topics::membership_updated(node),
        payload: json_bytes(&MembershipUpdate {
            base: BaseMessage::reply(""),
            added_devices: added,
            removed_devices: removed,
        }),
        notification: true,
    }
}

/// A request with only an event id; an empty payload is accepted too.
fn parse_base(payload: &[u8]) -> Result<BaseMessage, Refusal> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(BaseMessage::default());
    }
    serde_json::from_slice(payload).map_err(|e| refuse(400, format!("malformed request: {e}")))
}
