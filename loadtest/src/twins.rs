//! Device twin throughput and latency end to end: a mapper publishes twin updates to a real
//! edgecore, over MQTT (a rumqttc client on EventBus's `$hw` topics) or over DMI (a tonic
//! client of `DeviceManagerService.ReportDeviceStatus` on `--dmi-socket`, as mapper-framework
//! mappers report); edgecore commits them and reports the DeviceStatus through the real
//! cloudcore; a kube-rs watcher on the cloud's API sees the values arrive.
//!
//! Each device's values count up, so a status showing value `v` also delivers every earlier
//! value of that device that was coalesced away on the way (the edge's outbox keeps only the
//! latest status per device): the latency of value `u ≤ v` is the time it first became visible.
//! The same-run baseline is the node's round trip alone: MQTT publish → `twin/update/result`
//! back at the mapper, or the DMI call's answer (the update is durable on the node by then).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::Node;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;

use crate::cloud::{free_tcp_port, sibling_binary, Cloud};
use edge::dmi::api;
use edge::dmi::api::device_manager_service_client::DeviceManagerServiceClient;

/// How the mapper reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// KubeEdge's `$hw` MQTT topics on EventBus's broker.
    Mqtt,
    /// DMI's `ReportDeviceStatus` on edgecore's unix socket.
    Dmi,
}

/// The protocol name the DMI devices carry (and the bench's mapper registers).
const DMI_PROTOCOL: &str = "twinbench";

pub const NODE: &str = "twin-node";
const PROPERTY: &str = "temperature";

/// Latencies (µs) and counts of one phase.
pub struct Phase {
    pub published: u64,
    pub elapsed: Duration,
    /// Publish → visible in the cloud API.
    pub to_cloud: Histogram<u64>,
    /// Publish → `twin/update/result` at the mapper (the baseline).
    pub node_round_trip: Histogram<u64>,
    /// Device statuses the cloud API showed (after coalescing).
    pub cloud_updates: u64,
    /// From the first publish until every device's last value was visible in the cloud.
    pub converged_after: Option<Duration>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            published: 0,
            elapsed: Duration::ZERO,
            to_cloud: Histogram::new(3).expect("histogram"),
            node_round_trip: Histogram::new(3).expect("histogram"),
            cloud_updates: 0,
            converged_after: None,
        }
    }
}

/// What the watchers record, per device: when each value was published and when the mapper and
/// the cloud saw it.
#[derive(Default)]
struct Tracker {
    published: HashMap<(usize, u64), Instant>,
    cloud_seen: Vec<u64>,
    result_seen: Vec<u64>,
    phase: Option<Phase>,
}

pub fn device_name(i: usize) -> String {
    format!("sensor-{i}")
}

fn device_index(name: &str) -> Option<usize> {
    name.strip_prefix("sensor-")?.parse().ok()
}

/// An edgecore child process for the benchmark.
pub struct EdgeChild {
    process: Child,
    _data_dir: tempfile::TempDir,
    pub mqtt: SocketAddr,
    /// Its DMI socket.
    pub dmi: PathBuf,
}

impl Drop for EdgeChild {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

pub fn start_edgecore(binary: &Path, cloud: &Cloud) -> anyhow::Result<EdgeChild> {
    let data_dir = tempfile::Builder::new()
        .prefix("kedge-twinbench-edge")
        .tempdir()?;
    let mqtt: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
    let process = Command::new(binary)
        .args([
            "--node-name",
            NODE,
            "--runtime",
            "hollow",
            "--token",
            &cloud.token,
        ])
        .arg("--cloud")
        .arg(cloud.quic.to_string())
        .arg("--data-dir")
        .arg(data_dir.path())
        .arg("--metaserver-listen")
        .arg(format!("127.0.0.1:{}", free_tcp_port()?))
        .arg("--mqtt-listen")
        .arg(mqtt.to_string())
        .arg("--dmi-socket")
        .arg(data_dir.path().join("dmi.sock"))
        .arg("--dmi-rate-limit")
        .arg("0")
        .env(
            "RUST_LOG",
            std::env::var("EDGE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let dmi = data_dir.path().join("dmi.sock");
    Ok(EdgeChild {
        process,
        _data_dir: data_dir,
        mqtt,
        dmi,
    })
}

/// `edgecore` next to this executable.
pub fn default_edgecore() -> PathBuf {
    sibling_binary("edgecore")
}

fn devices_api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("devices.kubeedge.io", "v1beta1", kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
    Api::namespaced_with(client.clone(), "default", &resource)
}

/// The bench: `devices` devices on one node, then the phases.
pub struct TwinBench {
    client: Client,
    mqtt: AsyncClient,
    via: Via,
    /// Per device, the queue of its DMI reports: a mapper reports one device's values in
    /// order, different devices at once.
    dmi: Vec<tokio::sync::mpsc::UnboundedSender<u64>>,
    devices: usize,
    tracker: Arc<Mutex<Tracker>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TwinBench {
    pub async fn prepare(
        api_url: &str,
        edge: &EdgeChild,
        devices: usize,
        via: Via,
        report_cycle_ms: u64,
    ) -> anyhow::Result<Self> {
        let mqtt = edge.mqtt;
        let config = kube::Config::new(api_url.parse().context("the cloud API URL")?);
        let client = Client::try_from(config)?;
        let nodes: Api<Node> = Api::all(client.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = nodes.get_opt(NODE).await?.is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("{NODE} did not become Ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let models = devices_api(&client, "DeviceModel", "devicemodels");
        let model: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
            "metadata": {"name": "bench-sensor"},
            "spec": {"properties": [{"name": PROPERTY, "type": "INT", "accessMode": "ReadOnly"}]},
        }))?;
        models.create(&PostParams::default(), &model).await?;
        let api = devices_api(&client, "Device", "devices");
        // With a reportCycle, the node sends a device's changes at most once per cycle.
        let properties = if report_cycle_ms > 0 {
            json!([{"name": PROPERTY, "reportCycle": report_cycle_ms}])
        } else {
            json!([])
        };
        for i in 0..devices {
            let device: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
                "metadata": {"name": device_name(i)},
                "spec": {"nodeName": NODE, "deviceModelRef": {"name": "bench-sensor"},
                         "protocol": {"protocolName": DMI_PROTOCOL},
                         "properties": properties},
            }))?;
            api.create(&PostParams::default(), &device).await?;
        }

        let tracker = Arc::new(Mutex::new(Tracker {
            cloud_seen: vec![0; devices],
            result_seen: vec![0; devices],
            ..Tracker::default()
        }));
        let mut options =
            MqttOptions::new("kedge-twinbench-mapper", mqtt.ip().to_string(), mqtt.port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(1000)
            .set_request_channel_capacity(10_000)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (mqtt_client, mut eventloop) = AsyncClient::new(options, 10_000);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let mut tasks = vec![tokio::spawn(mapper_loop(
            eventloop,
            mqtt_client.clone(),
            tracker.clone(),
        ))];
        // Reports land in each Device's DeviceStatus (KubeEdge v1.23's split).
        let statuses = devices_api(&client, "DeviceStatus", "devicestatuses");
        tasks.push(tokio::spawn(cloud_watch(statuses, tracker.clone())));
        let mut dmi = Vec::new();
        if via == Via::Dmi {
            let client = dmi_register(&edge.dmi).await?;
            for device in 0..devices {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tasks.push(tokio::spawn(dmi_reporter(
                    client.clone(),
                    device,
                    rx,
                    tracker.clone(),
                )));
                dmi.push(tx);
            }
        }
        let bench = TwinBench {
            client,
            mqtt: mqtt_client,
            via,
            dmi,
            devices,
            tracker,
            tasks,
        };
        bench.wait_for_devices_on_edge().await?;
        Ok(bench)
    }

    /// Until every device answers a twin/get (it is routed to the node and known to DeviceTwin).
    async fn wait_for_devices_on_edge(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..self.devices {
            loop {
                // Value 0 is "nothing yet"; an update with value 0 proves the device is known.
                self.publish(i, 0).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.lock().result_seen[i] == u64::MAX {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "device {} never reached the node's DeviceTwin",
                        device_name(i)
                    );
                }
            }
        }
        let mut tracker = self.lock();
        tracker.result_seen.iter_mut().for_each(|v| *v = 0);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn publish(&self, device: usize, value: u64) -> anyhow::Result<()> {
        if value > 0 {
            self.lock()
                .published
                .insert((device, value), Instant::now());
        }
        if self.via == Via::Dmi {
            self.dmi
                .get(device)
                .context("no such device")?
                .send(value)
                .map_err(|_| anyhow::anyhow!("the DMI reporter of {device} stopped"))?;
            return Ok(());
        }
        let payload = json!({
            "event_id": format!("{device}:{value}"),
            "timestamp": 0,
            "twin": {PROPERTY: {"actual": {"value": value.to_string()}, "metadata": {"type": "Updated"}}},
        });
        self.mqtt
            .publish(
                format!("$hw/events/device/{}/twin/update", device_name(device)),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&payload)?,
            )
            .await?;
        Ok(())
    }

    /// Publishes `count` updates per device round-robin at `rate` per second (`None`: as fast
    /// as the client goes), then waits until the cloud shows every device's last value.
    pub async fn run_phase(
        &self,
        first_value: u64,
        count: u64,
        rate: Option<f64>,
        converge_timeout: Duration,
    ) -> anyhow::Result<Phase> {
        self.lock().phase = Some(Phase::new());
        let start = Instant::now();
        let total = count * self.devices as u64;
        for n in 0..total {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let device = (n % self.devices as u64) as usize;
            let value = first_value + n / self.devices as u64;
            self.publish(device, value).await?;
        }
        let published_in = start.elapsed();
        let last = first_value + count - 1;
        let deadline = Instant::now() + converge_timeout;
        let converged = loop {
            let done = {
                let tracker = self.lock();
                tracker.cloud_seen.iter().all(|v| *v >= last)
                    && tracker.result_seen.iter().all(|v| *v >= last)
            };
            if done {
                break Some(start.elapsed());
            }
            if Instant::now() > deadline {
                let tracker = self.lock();
                for i in 0..self.devices {
                    let (cloud, result) = (tracker.cloud_seen[i], tracker.result_seen[i]);
                    if cloud < last || result < last {
                        eprintln!(
                            "twinbench: {} lags: last value {last}, answered on MQTT {result}, \
                             visible in the cloud {cloud}",
                            device_name(i)
                        );
                    }
                }
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut phase = self.lock().phase.take().expect("phase");
        phase.published = total;
        phase.elapsed = published_in;
        phase.converged_after = converged;
        Ok(phase)
    }

    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
        drop(self.client);
    }
}

/// The mapper's MQTT loop: results of its updates come back here.
async fn mapper_loop(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ =
                    client.try_subscribe("$hw/events/device/+/twin/update/result", QoS::AtMostOnce);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let Ok(result) = serde_json::from_slice::<serde_json::Value>(&publish.payload)
                else {
                    continue;
                };
                let Some((device, value)) = result["event_id"]
                    .as_str()
                    .and_then(|id| id.split_once(':'))
                    .and_then(|(d, v)| Some((d.parse::<usize>().ok()?, v.parse::<u64>().ok()?)))
                else {
                    continue;
                };
                let ok = result.get("code").is_none();
                record_result(&tracker, device, value, ok);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "mapper lost the broker");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The node answered the report of `value` of `device` (`ok`: accepted).
fn record_result(tracker: &Mutex<Tracker>, device: usize, value: u64, ok: bool) {
    let mut tracker = tracker.lock().unwrap_or_else(|p| p.into_inner());
    let tracker = &mut *tracker;
    let Some(seen) = tracker.result_seen.get_mut(device) else {
        return;
    };
    if value == 0 {
        if ok {
            *seen = u64::MAX; // the device is known (see wait_for_devices_on_edge)
        }
        return;
    }
    *seen = (*seen).max(value);
    if let (Some(phase), Some(at)) = (
        tracker.phase.as_mut(),
        tracker.published.get(&(device, value)),
    ) {
        let _ = phase
            .node_round_trip
            .record(at.elapsed().as_micros() as u64);
    }
}

/// Reports one device's values over DMI, in order (calls of different devices overlap on the
/// one HTTP/2 connection, as a mapper's per-device collectors do).
async fn dmi_reporter(
    mut client: DeviceManagerServiceClient<tonic::transport::Channel>,
    device: usize,
    mut values: tokio::sync::mpsc::UnboundedReceiver<u64>,
    tracker: Arc<Mutex<Tracker>>,
) {
    while let Some(value) = values.recv().await {
        let request = api::ReportDeviceStatusRequest {
            device_name: device_name(device),
            device_namespace: "default".into(),
            reported_device: Some(api::DeviceStatus {
                twins: vec![api::Twin {
                    property_name: PROPERTY.into(),
                    observed_desired: None,
                    reported: Some(api::TwinProperty {
                        value: value.to_string(),
                        metadata: Default::default(),
                    }),
                }],
                report_to_cloud: true,
                report_cycle: 0,
            }),
        };
        let ok = client.report_device_status(request).await.is_ok();
        record_result(&tracker, device, value, ok);
    }
}

/// Connects to edgecore's DMI socket and registers as the mapper of the bench's protocol.
async fn dmi_register(
    socket: &Path,
) -> anyhow::Result<DeviceManagerServiceClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("edgecore's DMI socket {} never appeared", socket.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = edge::grpc::unix_channel(socket.to_path_buf(), Duration::from_secs(5))
        .await
        .context("connecting to edgecore's DMI socket")?;
    let mut client = DeviceManagerServiceClient::new(channel);
    client
        .mapper_register(api::MapperRegisterRequest {
            with_data: true,
            mapper: Some(api::MapperInfo {
                name: "twinbench".into(),
                version: "v1".into(),
                api_version: "v1beta1".into(),
                protocol: DMI_PROTOCOL.into(),
                address: socket
                    .with_extension("mapper.sock")
                    .display()
                    .to_string()
                    .into_bytes(),
                state: "running".into(),
            }),
        })
        .await
        .context("MapperRegister")?;
    Ok(client)
}

/// Follows the DeviceStatuses in the cloud and records when values become visible.
async fn cloud_watch(api: Api<DynamicObject>, tracker: Arc<Mutex<Tracker>>) {
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(event) = events.next().await {
        let device = match event {
            Ok(watcher::Event::Apply(d)) | Ok(watcher::Event::InitApply(d)) => d,
            _ => continue,
        };
        let Some(index) = device_index(&device.name_any()) else {
            continue;
        };
        let value = device.data["status"]["twins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["propertyName"] == PROPERTY)
            .and_then(|t| t["reported"]["value"].as_str())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(value) = value else { continue };
        let now = Instant::now();
        let mut tracker = tracker.lock().unwrap_or_else(|p| p.into_inner());
        let tracker = &mut *tracker;
        let Some(seen) = tracker.cloud_seen.get_mut(index) else {
            continue;
        };
        if value <= *seen {
            continue;
        }
        let from = *seen + 1;
        *seen = value;
        if let Some(phase) = tracker.phase.as_mut() {
            phase.cloud_updates += 1;
            for v in from..=value {
                if let Some(at) = tracker.published.get(&(index, v)) {
                    let _ = phase
                        .to_cloud
                        .record(now.duration_since(*at).as_micros() as u64);
                }
            }
        }
    }
}
