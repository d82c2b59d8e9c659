//! kedge's fuzz targets: one function per entry point that takes bytes from outside, each fed
//! by a cargo-fuzz binary in `fuzz_targets/` and replayed over its kept corpus (`corpus/NAME/`)
//! by `tests/corpora.rs`.
//!
//! Every function must return for any input without panicking, over-reading or allocating
//! without bound; where a property holds (a selector prints back to itself, a merge patch is
//! idempotent), it is asserted, so the fuzzer finds wrong answers as well as crashes.
//!
//! Run one (README, "Fuzzing"): `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none NAME`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use replication::api::object::{self, Object};
use replication::api::patch::{self, PatchKind};
use replication::api::selector::{FieldSelector, LabelSelector};
use replication::{ObjectKey, ResourceVersion, Store, StoreConfig, WriteSet};
use serde_json::{json, Value};
use transport::frame::{ArchivedEnvelope, FrameDecoder};
use transport::JoinHandler;

/// The names of the targets, as `fuzz_targets/NAME.rs` and `corpus/NAME/` spell them.
pub const TARGETS: [&str; 7] = [
    "frame_decoder",
    "label_selector",
    "field_selector",
    "patch",
    "protobuf_body",
    "mqtt",
    "join",
];

/// Runs the target called `name` (one of [`TARGETS`]) on `data`.
///
/// # Panics
/// For a name not in [`TARGETS`], and wherever the target itself finds a bug.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame_decoder" => frame_decoder(data),
        "label_selector" => label_selector(data),
        "field_selector" => field_selector(data),
        "patch" => patch(data),
        "protobuf_body" => protobuf_body(data),
        "mqtt" => mqtt(data),
        "join" => join(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// The QUIC link's frame decoder (`transport::frame`): the first byte is the chunk size the
/// bytes arrive in, so frame boundaries are explored too; every field of every frame that
/// validates is read.
pub fn frame_decoder(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = FrameDecoder::new(64 * 1024);
    for part in rest.chunks(chunk) {
        let mut input = part;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => match frame.envelope() {
                    ArchivedEnvelope::Message(_) | ArchivedEnvelope::Compact(_) => {
                        let message = frame.into_message().expect("a message frame");
                        let owned = message.to_message();
                        assert_eq!(owned.content, message.content());
                        // A compact message expands to the same message in full form.
                        let full = message.encoded().for_version(2);
                        let back = transport::frame::Frame::validate(full)
                            .expect("the full form is valid")
                            .into_message()
                            .expect("a message");
                        assert!(!back.is_compact());
                        assert_eq!(back.to_message(), owned);
                    }
                    ArchivedEnvelope::Hello(h) => {
                        let _ = (h.protocol_version, h.send_epoch, h.recv_epoch, h.recv_acked);
                    }
                    ArchivedEnvelope::Ack(_)
                    | ArchivedEnvelope::Heartbeat(_)
                    | ArchivedEnvelope::StreamStart(_) => {}
                },
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
}

/// Labels the selector targets match against: a Pod's metadata with a few labels.
fn labelled() -> Object {
    let pod = json!({"metadata": {"name": "web-0", "namespace": "default",
        "labels": {"app": "web", "tier": "front", "example.com/role": "edge", "empty": ""}},
        "spec": {"nodeName": "edge-1"}, "status": {"phase": "Running"}});
    pod.as_object().cloned().unwrap_or_default()
}

/// The `labelSelector` query parameter (API lists and watches, MetaServer). A selector that
/// parses prints back (`Display`, as a Scale's `status.selector` carries it) to text that parses
/// to the same selector, and both match the same objects.
pub fn label_selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(selector) = LabelSelector::parse(text) else {
        return;
    };
    let printed = selector.to_string();
    let again = LabelSelector::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which does not parse: {e:?}"));
    assert_eq!(selector, again, "{text:?} printed as {printed:?}");
    let object = labelled();
    assert_eq!(selector.matches(&object), again.matches(&object));
}

/// The `fieldSelector` query parameter: parses, then matches against a Pod.
pub fn field_selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = FieldSelector::parse(text) {
        let _ = selector.matches(&labelled());
    }
}

/// A Pod as stored, the target every patch is applied to.
fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "default", "labels": {"app": "web"},
            "annotations": {"a": "b"}, "finalizers": ["x"], "resourceVersion": "7"},
        "spec": {"nodeName": "edge-1",
            "containers": [
                {"name": "web", "image": "nginx", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                 "env": [{"name": "A", "value": "1"}], "volumeMounts": [{"name": "data", "mountPath": "/d"}]},
                {"name": "side", "image": "busybox", "args": ["sleep", "1"]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "tolerations": [{"key": "k", "operator": "Exists"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0}]}})
}

/// PATCH bodies (`replication::api::patch`): the first byte picks the format (JSON patch,
/// RFC 6902; JSON merge patch, RFC 7386; Kubernetes' strategic merge patch), the rest is the
/// body, applied to a Pod. A merge patch that applies once applies again to the same result
/// (RFC 7386 merge patches are idempotent).
pub fn patch(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let kind = match which % 3 {
        0 => PatchKind::Json,
        1 => PatchKind::Merge,
        _ => PatchKind::StrategicMerge,
    };
    let mut target = pod();
    if patch::apply(kind, &mut target, body).is_err() {
        return;
    }
    if kind == PatchKind::Merge {
        let once = target.clone();
        patch::apply(kind, &mut target, body).expect("a merge patch that applied applies again");
        assert_eq!(once, target, "merge patch is not idempotent");
    }
    let _ = serde_json::to_vec(&target).expect("a patched object serializes");
}

/// Request bodies in Kubernetes' protobuf encoding (`replication::api::protobuf`): a body that
/// decodes is a JSON object naming its kind.
pub fn protobuf_body(data: &[u8]) {
    if let Ok(value) = replication::api::protobuf::decode(data) {
        assert!(value.is_object(), "decoded to {value}");
        assert!(value.get("kind").is_some_and(Value::is_string));
    }
}

/// A temporary directory that lives as long as the fuzzing process, on tmpfs where there is
/// one (RocksDB's fsyncs are then cheap).
fn scratch(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix(prefix).tempdir_in(shm);
    builder.unwrap_or_else(|_| tempfile::tempdir().expect("a temporary directory"))
}

/// The node the MQTT target plays, and its one device.
const NODE: &str = "edge-1";

struct Twin {
    _dir: tempfile::TempDir,
    twin: edge::devicetwin::DeviceTwin,
}

fn twin() -> &'static Mutex<Twin> {
    static TWIN: OnceLock<Mutex<Twin>> = OnceLock::new();
    TWIN.get_or_init(|| {
        let dir = scratch("kedge-fuzz-mqtt");
        let meta = edge::meta::MetaManager::open(dir.path(), NODE).expect("a MetaManager");
        let model = json!({"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
            "metadata": {"name": "thermometer", "namespace": "demo"},
            "spec": {"properties": [
                {"name": "temperature", "type": "FLOAT", "accessMode": "ReadOnly"},
                {"name": "count", "type": "INT"}, {"name": "on", "type": "BOOLEAN"},
                {"name": "setpoint", "type": "FLOAT", "accessMode": "ReadWrite"}]}});
        let device = json!({"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "thermo-1", "namespace": "demo"},
            "spec": {"nodeName": NODE, "deviceModelRef": {"name": "thermometer"},
                "properties": [{"name": "setpoint", "desired": {"value": "20"},
                    "reportToCloud": true, "reportCycle": 1000}]}});
        let mut set = WriteSet::new();
        // The node's store mirrors the cloud's versions, as EdgeHub writes it.
        for (rv, resource, name, value) in [
            (1, "devicemodels", "thermometer", model),
            (2, "devices", "thermo-1", device),
        ] {
            let key = ObjectKey::new(resource, "demo", name).expect("a key");
            let stored = object::to_stored(value.as_object().cloned().unwrap_or_default());
            set.mirror_put(key, ResourceVersion(rv), Bytes::from(stored));
        }
        meta.store().commit(set).expect("the device is stored");
        let twin = edge::devicetwin::DeviceTwin::new(meta, 64 * 1024);
        Mutex::new(Twin { _dir: dir, twin })
    })
}

/// What reaches edgecore's EventBus broker from a mapper: MQTT 3.1.1 packets (rumqttc's
/// parser, as the broker uses it, at the broker's 1 MiB limit); each PUBLISH goes through topic
/// parsing to DeviceTwin as the broker delivers it (twin updates, gets, state updates,
/// membership), over a real RocksDB store; each SUBSCRIBE's filters are checked and matched.
pub fn mqtt(data: &[u8]) {
    for answer in mqtt_answers(data) {
        assert!(
            edge::eventbus::topics::valid_topic(&answer.topic),
            "answer on {:?}",
            answer.topic
        );
        let _: Value = serde_json::from_slice(&answer.payload).expect("answers are JSON");
    }
}

/// [`mqtt`]'s work: DeviceTwin's answers to the PUBLISHes in `data`.
fn mqtt_answers(data: &[u8]) -> Vec<edge::devicetwin::Outgoing> {
    use rumqttc::mqttbytes::v4::Packet;
    let mut buffer = BytesMut::from(data);
    let mut batch = Vec::new();
    for _ in 0..64 {
        let packet = match Packet::read(&mut buffer, 1 << 20) {
            Ok(packet) => packet,
            Err(_) => break,
        };
        match packet {
            Packet::Publish(publish) if edge::eventbus::topics::valid_topic(&publish.topic) => {
                batch.push((publish.topic, publish.payload));
            }
            Packet::Subscribe(subscribe) => {
                for filter in subscribe.filters {
                    if edge::eventbus::topics::valid_filter(&filter.path) {
                        for topic in edge::eventbus::topics::subscriptions(NODE) {
                            let _ = edge::eventbus::topics::matches(&filter.path, &topic);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if batch.is_empty() {
        return Vec::new();
    }
    let mut twin = twin().lock().unwrap_or_else(|p| p.into_inner());
    twin.twin.handle(batch)
}

struct Joining {
    _dir: tempfile::TempDir,
    join: cloud::join::CloudJoin,
    token: String,
}

fn joining() -> &'static Joining {
    static JOIN: OnceLock<Joining> = OnceLock::new();
    JOIN.get_or_init(|| {
        let dir = scratch("kedge-fuzz-join");
        let data_dir = dir.path().to_path_buf();
        let mut config = StoreConfig::cloud();
        config.sync_writes = false;
        let store = Arc::new(Store::open(data_dir.join("store"), config).expect("a store"));
        let ca = Arc::new(cloud::pki::load_or_create_ca(&data_dir).expect("a CA"));
        let metrics = Arc::new(cloud::metrics::Metrics::new());
        let credentials = Arc::new(cloud::credentials::NodeCredentials::new(
            &data_dir,
            store.clone(),
            ca,
            Duration::from_secs(3600),
            Duration::from_secs(60),
            metrics.clone(),
        ));
        let token = cloud::pki::create_token(&data_dir, Duration::from_secs(86_400 * 365))
            .expect("a token");
        let join = cloud::join::CloudJoin {
            tokens: cloud::pki::Tokens::Files(data_dir),
            store,
            credentials,
            metrics,
            rate: Mutex::new(cloud::join::JoinRateLimit::new(0)),
        };
        Joining {
            _dir: dir,
            join,
            token,
        }
    })
}

/// A join request as cloudcore's join handler takes it after the frame decoder (bootstrap
/// token, node name, CSR; `cloud::join`): the first byte's low bit chooses between the real
/// token and one from the input; then the node name and (when fuzzed) the token, each ended by
/// a NUL; the rest is the CSR (DER). A granted join returns a certificate that parses.
pub fn join(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |&b| b == 0);
    let name = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let state = joining();
    let (token, csr) = if flags & 1 == 1 {
        (
            state.token.clone(),
            [
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            ]
            .concat(),
        )
    } else {
        (
            String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned(),
            parts.next().unwrap_or_default().to_vec(),
        )
    };
    let request = transport::JoinRequest {
        node_name: name,
        token,
        csr_der: csr,
    };
    let remote: SocketAddr = ([127, 0, 0, 1], 9).into();
    if let Ok(cert) = state.join.join(request, remote) {
        assert!(!cert.is_empty(), "an empty certificate was granted");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mqtt_publishes_reach_the_device_twin() {
        // A mapper's PUBLISH as it arrives on the wire (the corpus' files are named by their
        // hash after `cargo fuzz cmin`, so the test makes its own).
        let publish = |topic: &str, payload: &str| {
            let mut wire = bytes::BytesMut::new();
            rumqttc::mqttbytes::v4::Publish::new(
                topic,
                rumqttc::mqttbytes::QoS::AtMostOnce,
                payload.as_bytes().to_vec(),
            )
            .write(&mut wire)
            .expect("a PUBLISH encodes");
            wire.to_vec()
        };
        let answers = super::mqtt_answers(&publish(
            "$hw/events/device/thermo-1/twin/get",
            r#"{"event_id":"get-1","timestamp":1}"#,
        ));
        assert_eq!(answers.len(), 1, "one answer to a twin get");
        assert_eq!(
            answers[0].topic,
            "$hw/events/device/thermo-1/twin/get/result"
        );
        let doc: serde_json::Value = serde_json::from_slice(&answers[0].payload).unwrap();
        assert_eq!(doc["twin"]["setpoint"]["expected"]["value"], "20", "{doc}");
        let answers = super::mqtt_answers(&publish(
            "$hw/events/device/thermo-1/twin/update",
            r#"{"event_id":"up-1","timestamp":2,"twin":{"temperature":{"actual":{"value":"21.5"}}}}"#,
        ));
        assert!(
            answers
                .iter()
                .any(|a| a.topic.ends_with("/twin/update/result")),
            "{:?}",
            answers.iter().map(|a| &a.topic).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_real_csr_joins_once_and_a_bad_one_is_refused() {
        let (_, csr) = transport::tls::node_csr("fuzz-seed").expect("a CSR");
        let request = |csr: Vec<u8>| transport::JoinRequest {
            node_name: "fuzz-seed".into(),
            token: super::joining().token.clone(),
            csr_der: csr,
        };
        let remote = ([127, 0, 0, 1], 9).into();
        use transport::JoinHandler;
        let join = &super::joining().join;
        assert!(join.join(request(b"not a csr".to_vec()), remote).is_err());
        assert!(join.join(request(csr.clone()), remote).is_ok());
        let again = join.join(request(csr), remote).unwrap_err();
        assert!(again.contains("already joined"), "{again}");
    }
}
