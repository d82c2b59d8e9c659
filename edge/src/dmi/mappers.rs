//! The mappers registered on this node and what each has been told: registrations kept in the
//! node's store (re-dialled after an edgecore restart), one worker per mapper that makes the
//! DMI calls [`super::plan`] decides, retried with jittered backoff, each call bounded by a
//! timeout so that a mapper that hangs holds up only itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication::api::object::{self, Object};
use replication::store::WriteSet;
use replication::{KeyRange, ObjectKey};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::api;
use super::api::device_mapper_service_client::DeviceMapperServiceClient;
use super::convert;
use super::plan::{plan, Call, Desired, Held};
use crate::devicetwin::DEVICETWIN;
use crate::meta::MetaManager;

/// A mapper's registration, as `MapperRegister` gave it (kept under `r\0{name}` in
/// DeviceTwin's column family).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapperRecord {
    pub name: String,
    pub version: String,
    pub api_version: String,
    /// The Devices whose `spec.protocol.protocolName` this is are the mapper's.
    pub protocol: String,
    /// The mapper's DeviceMapperService socket (a path; `unix://` stripped).
    pub address: String,
}

fn registration_key(name: &str) -> Vec<u8> {
    format!("r\0{name}").into_bytes()
}

fn told_prefix(mapper: &str) -> Vec<u8> {
    format!("k\0{mapper}\0").into_bytes()
}

/// Bounds of the calls to mappers and of their reports.
#[derive(Debug, Clone)]
pub struct MapperLimits {
    /// One call to a mapper may take this long.
    pub call_timeout: Duration,
    /// Reports a second per protocol (mapper), with a burst of as many; more get
    /// `RESOURCE_EXHAUSTED`. 0: no limit.
    pub reports_per_second: u32,
}

impl Default for MapperLimits {
    fn default() -> Self {
        MapperLimits {
            call_timeout: Duration::from_secs(5),
            reports_per_second: 2_000,
        }
    }
}

struct Worker {
    record: MapperRecord,
    wake: Arc<Notify>,
    stop: CancellationToken,
}

/// A token bucket: `rate` a second, at most `rate` banked.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The node's mappers.
pub struct Mappers {
    meta: Arc<MetaManager>,
    limits: MapperLimits,
    workers: Mutex<HashMap<String, Worker>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    shutdown: CancellationToken,
}

impl Mappers {
    /// The mappers registered before (their workers start at once, with what they were told
    /// then).
    pub fn load(
        meta: Arc<MetaManager>,
        limits: MapperLimits,
        shutdown: CancellationToken,
    ) -> Arc<Mappers> {
        let mappers = Arc::new(Mappers {
            meta,
            limits,
            workers: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            shutdown,
        });
        let records: Vec<MapperRecord> = mappers
            .meta
            .store()
            .scan_aux(DEVICETWIN, b"r\0")
            .filter_map(Result::ok)
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        for record in records {
            tracing::info!(mapper = %record.name, protocol = %record.protocol, address = %record.address, "DMI: dialling a mapper registered before");
            let told = mappers.load_told(&record.name);
            mappers.spawn(record, told);
        }
        mappers
    }

    /// The registered mappers.
    pub fn registered(&self) -> Vec<MapperRecord> {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<MapperRecord> = workers.values().map(|w| w.record.clone()).collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Registers (or re-registers) a mapper. With `with_data`, it gets what it should hold
    /// now in the answer, and is taken to hold it; without, the calls follow.
    ///
    /// # Errors
    /// The registration could not be stored.
    pub fn register(
        self: &Arc<Self>,
        record: MapperRecord,
        with_data: bool,
    ) -> Result<Desired, String> {
        let desired = self.desired(&record.protocol);
        let mut writes = WriteSet::new();
        writes.put_aux(
            DEVICETWIN,
            registration_key(&record.name),
            serde_json::to_vec(&record).unwrap_or_default(),
        );
        let told = if with_data {
            let prefix = told_prefix(&record.name);
            let mut end = prefix.clone();
            if let Some(last) = end.last_mut() {
                *last = 1;
            }
            writes.delete_aux_range(DEVICETWIN, prefix, end);
            let told = told_of(&desired);
            for (held, digest) in &told {
                writes.put_aux(
                    DEVICETWIN,
                    told_key(&record.name, held),
                    digest.to_be_bytes().to_vec(),
                );
            }
            told
        } else {
            self.load_told(&record.name)
        };
        self.meta
            .report_batch(Vec::new(), writes)
            .map_err(|e| format!("cannot store the registration: {e}"))?;
        self.spawn(record, told);
        Ok(if with_data {
            desired
        } else {
            Desired::default()
        })
    }

    /// Wakes every worker: the node's Devices or DeviceModels changed.
    pub fn changed(&self) {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for worker in workers.values() {
            worker.wake.notify_one();
        }
    }

    /// Takes one report of `protocol`'s mapper from its bucket; `false`: over the limit.
    pub fn admit_report(&self, protocol: &str) -> bool {
        let rate = f64::from(self.limits.reports_per_second);
        if rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(protocol.to_owned()).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The protocol of the Device at `namespace`/`name` in the node's cache.
    pub fn protocol_of(&self, namespace: &str, name: &str) -> Option<String> {
        let key = ObjectKey::new("devices", namespace, name).ok()?;
        let held = self.meta.store().get(&key).ok()??;
        let device: Object = serde_json::from_slice(&held.object).ok()?;
        Some(
            device
                .get("spec")?
                .get("protocol")?
                .get("protocolName")?
                .as_str()?
                .to_owned(),
        )
    }

    /// What the mapper of `protocol` should hold: the node's Devices of that protocol and the
    /// DeviceModels they use.
    pub fn desired(&self, protocol: &str) -> Desired {
        let mut desired = Desired::default();
        let node = self.meta.node();
        let Ok(range) = KeyRange::kind("devices") else {
            return desired;
        };
        for (key, versioned) in self.meta.store().scan(&range).filter_map(Result::ok) {
            let Ok(device) = serde_json::from_slice::<Object>(&versioned.object) else {
                continue;
            };
            let spec = device.get("spec");
            let of = |path: &[&str]| {
                let mut at = spec?;
                for step in path {
                    at = at.get(*step)?;
                }
                at.as_str()
            };
            if of(&["protocol", "protocolName"]) != Some(protocol)
                || of(&["nodeName"]).is_some_and(|n| n != node)
            {
                continue;
            }
            if let Some(model) = of(&["deviceModelRef", "name"]) {
                let model_key = ObjectKey::new("devicemodels", key.namespace(), model).ok();
                let held = model_key.and_then(|k| self.meta.store().get(&k).ok().flatten());
                if let Some(m) = held.and_then(|v| serde_json::from_slice::<Object>(&v.object).ok())
                {
                    desired.models.insert(
                        (key.namespace().to_owned(), model.to_owned()),
                        convert::device_model(&m),
                    );
                }
            }
            desired.devices.insert(
                (key.namespace().to_owned(), object::name(&device).to_owned()),
                convert::device(&device),
            );
        }
        desired
    }

    fn load_told(&self, mapper: &str) -> BTreeMap<Held, u64> {
        let prefix = told_prefix(mapper);
        self.meta
            .store()
            .scan_aux(DEVICETWIN, &prefix)
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let held = Held::decode(std::str::from_utf8(&k[prefix.len()..]).ok()?)?;
                let digest = u64::from_be_bytes(v.as_ref().try_into().ok()?);
                Some((held, digest))
            })
            .collect()
    }

    fn spawn(self: &Arc<Self>, record: MapperRecord, told: BTreeMap<Held, u64>) {
        let wake = Arc::new(Notify::new());
        let stop = self.shutdown.child_token();
        let worker = Worker {
            record: record.clone(),
            wake: wake.clone(),
            stop: stop.clone(),
        };
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = workers.insert(record.name.clone(), worker) {
            old.stop.cancel();
        }
        drop(workers);
        // The first pass runs at once.
        wake.notify_one();
        tokio::spawn(self.clone().work(record, told, wake, stop));
    }

    fn remember(&self, mapper: &str, call: &Call) {
        let (held, digest) = call.outcome();
        let mut writes = WriteSet::new();
        match digest {
            Some(d) => writes.put_aux(
                DEVICETWIN,
                told_key(mapper, &held),
                d.to_be_bytes().to_vec(),
            ),
            None => writes.delete_aux(DEVICETWIN, told_key(mapper, &held)),
        }
        if let Err(e) = self.meta.report_batch(Vec::new(), writes) {
            // Lost bookkeeping costs a repeated call after a restart, nothing more.
            tracing::warn!(mapper, error = %e, "DMI: cannot record a call to a mapper");
        }
    }

    /// One mapper's worker: on each wake, the calls that bring it up to date, in order; on a
    /// failure, the rest waits for a jittered backoff (0.5 s doubling to 30 s).
    async fn work(
        self: Arc<Self>,
        record: MapperRecord,
        mut told: BTreeMap<Held, u64>,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) {
        let client = connect(&record.address);
        let mut backoff = BACKOFF_MIN;
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            loop {
                let desired = self.desired(&record.protocol);
                let calls = plan(&told, &desired);
                let mut failure = None;
                for call in calls {
                    let sent = tokio::select! {
                        sent = tokio::time::timeout(self.limits.call_timeout, send(client.clone(), call.clone())) => sent,
                        _ = stop.cancelled() => return,
                    };
                    match sent {
                        Ok(Ok(())) => {
                            self.remember(&record.name, &call);
                            match call.outcome() {
                                (held, Some(d)) => told.insert(held, d),
                                (held, None) => told.remove(&held),
                            };
                        }
                        Ok(Err(status)) => {
                            failure = Some(format!(
                                "{}: {} {}",
                                call.method(),
                                status.code(),
                                status.message()
                            ));
                            break;
                        }
                        Err(_) => {
                            failure = Some(format!(
                                "{}: no answer within {:?}",
                                call.method(),
                                self.limits.call_timeout
                            ));
                            break;
                        }
                    }
                }
                let Some(failure) = failure else {
                    if failing_since.take().is_some() {
                        tracing::info!(mapper = %record.name, "DMI: the mapper answers again");
                    }
                    backoff = BACKOFF_MIN;
                    break;
                };
                if failing_since.is_none() {
                    tracing::warn!(mapper = %record.name, address = %record.address, error = %failure, "DMI: a call to the mapper failed; retrying with backoff");
                    failing_since = Some(Instant::now());
                } else {
                    tracing::debug!(mapper = %record.name, error = %failure, "DMI: the mapper still fails");
                }
                let jitter = 0.5 + rand::random::<f64>();
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn told_key(mapper: &str, held: &Held) -> Vec<u8> {
    let mut key = told_prefix(mapper);
    key.extend_from_slice(held.encode().as_bytes());
    key
}

fn told_of(desired: &Desired) -> BTreeMap<Held, u64> {
    let mut told = BTreeMap::new();
    for call in plan(&BTreeMap::new(), desired) {
        if let (held, Some(digest)) = call.outcome() {
            told.insert(held, digest);
        }
    }
    told
}

/// A channel to the mapper's socket; it dials on first use and again after failures.
fn connect(address: &str) -> DeviceMapperServiceClient<Channel> {
    let path = std::path::PathBuf::from(address.strip_prefix("unix://").unwrap_or(address));
    DeviceMapperServiceClient::new(crate::grpc::unix_channel_lazy(path, Duration::from_secs(2)))
}

/// One call. A mapper that already holds what it is asked to create, or no longer holds what
/// it is asked to remove, has what it should; one asked to update what it does not hold (it
/// lost it) is asked to create it.
async fn send(
    mut client: DeviceMapperServiceClient<Channel>,
    call: Call,
) -> Result<(), tonic::Status> {
    let tolerated = |result: Result<(), tonic::Status>, code: tonic::Code| match result {
        Err(status) if status.code() == code => Ok(()),
        other => other,
    };
    match call {
        Call::CreateDeviceModel(model) => tolerated(
            client
                .create_device_model(api::CreateDeviceModelRequest { model: Some(model) })
                .await
                .map(|_| ()),
            tonic::Code::AlreadyExists,
        ),
        Call::UpdateDeviceModel(model) => {
            let updated = client
                .update_device_model(api::UpdateDeviceModelRequest {
                    model: Some(model.clone()),
                })
                .await;
            match updated {
                Err(status) if status.code() == tonic::Code::NotFound => client
                    .create_device_model(api::CreateDeviceModelRequest { model: Some(model) })
                    .await
                    .map(|_| ()),
                other => other.map(|_| ()),
            }
        }
        Call::RemoveDeviceModel { namespace, name } => tolerated(
            client
                .remove_device_model(api::RemoveDeviceModelRequest {
                    model_name: name,
                    model_namespace: namespace,
                })
                .await
                .map(|_| ()),
            tonic::Code::NotFound,
        ),
        Call::RegisterDevice(device) => tolerated(
            client
                .register_device(api::RegisterDeviceRequest {
                    device: Some(device),
                })
                .await
                .map(|_| ()),
            tonic::Code::AlreadyExists,
        ),
        Call::UpdateDevice(device) => {
            let updated = client
                .update_device(api::UpdateDeviceRequest {
                    device: Some(device.clone()),
                })
                .await;
            match updated {
                Err(status) if status.code() == tonic::Code::NotFound => client
                    .register_device(api::RegisterDeviceRequest {
                        device: Some(device),
                    })
                    .await
                    .map(|_| ()),
                other => other.map(|_| ()),
            }
        }
        Call::RemoveDevice { namespace, name } => tolerated(
            client
                .remove_device(api::RemoveDeviceRequest {
                    device_name: name,
                    device_namespace: namespace,
                })
                .await
                .map(|_| ()),
            tonic::Code::NotFound,
        ),
    }
}
