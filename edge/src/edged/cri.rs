//! The CRI runtime (`edgecore --runtime cri`): pods run as containers of a CRI v1 runtime
//! (containerd first), driven over gRPC on its unix socket with the `k8s-cri` crate, as kubelet
//! drives it.
//!
//! - one pod sandbox per pod (`RunPodSandbox`): a `hostNetwork` pod shares the node's network
//!   namespace (`NamespaceMode::NODE`, no hostname of its own, as kubelet leaves it);
//!   otherwise the runtime's CNI network gives it an IP, reported as `status.podIP`;
//! - images pulled per `imagePullPolicy` (`Always`, `IfNotPresent`, `Never`; a missing image
//!   under `Never` waits in `ErrImageNeverPull`, a failed pull in `ErrImagePull` and then
//!   `ImagePullBackOff`) with the pod's `imagePullSecrets` (each matching one in turn, then
//!   none), every call with a deadline ([`PULL_TIMEOUT`] for pulls, since a hung registry
//!   never answers);
//! - init containers run in order to completion first (restarted on failure unless the
//!   restartPolicy is Never);
//! - containers created and started with `command`, `args`, `env`, `workingDir`, the pod's
//!   volumes as bind mounts (configMap and secret read-only, emptyDir, hostPath),
//!   `securityContext` (runAsUser/Group, readOnlyRootFilesystem, privileged), `resources`
//!   (CPU shares and CFS quota, memory limit) and `hostPort`s (CNI portmap), with the restart
//!   policy and back-off of the process runtime (1 s doubling to 60 s); the runtime tells
//!   Edged when a state changes ([`Runtime::changed`]);
//! - `kubectl exec` through `ExecSync` ([`exec_target`]; non-interactive);
//! - container logs written by the runtime in the CRI format at
//!   `DATA_DIR/pods/<namespace>_<name>/<container>.log` (the sandbox's `log_directory` and the
//!   container's `log_path`), which is where [`super::logs`] reads them for `kubectl logs`;
//!   the previous instance's log becomes `<container>.previous.log` at a restart;
//! - state from a relist of the node's containers every [`RELIST`] (containerd 1.6 has no
//!   container events) and `ContainerStatus` for those that changed;
//! - stopping: `StopContainer` with the pod's grace period, then `StopPodSandbox` and
//!   `RemovePodSandbox`;
//! - restarts: sandboxes and containers carry the labels `kedge.io/runtime-id` (the data
//!   dir's id, shared with the process runtime) and kubelet's `io.kubernetes.pod.*`; at start
//!   the runtime lists the sandboxes of its id and takes them up when Edged asks for their pod
//!   (same uid, sandbox ready): running containers are adopted, never started twice; the others
//!   (another uid, not ready, a pod no longer on the node) are stopped and removed;
//! - an exiting edgecore leaves its containers running ([`Runtime::shutdown`] only stops
//!   watching them): the next one adopts them, as kubelet does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use replication::api::object;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::process::{runtime_id, write_files};
use super::runtime::{
    resume, ContainerRun, ContainerState, ContainerStatus, PodRun, PullPolicy, Runtime, Terminated,
};

/// The label holding the data dir's runtime id: the sandboxes and containers of this node.
pub const LABEL_RUNTIME_ID: &str = "kedge.io/runtime-id";
/// kubelet's label for the pod's uid.
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// kubelet's label for the pod's name.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// kubelet's label for the pod's namespace.
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// kubelet's label for the container's name.
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// The deadline of every CRI call but pulls and stops.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of a `PullImage` (a hung registry never answers).
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the node's containers are listed to notice exits.
pub const RELIST: Duration = Duration::from_millis(500);
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Largest CRI response accepted (a listing of many containers); containerd's own limit.
const MAX_MESSAGE: usize = 16 << 20;

/// The socket path of a CRI endpoint: `unix:///path` or a plain absolute path.
///
/// # Errors
/// Any other scheme (CRI runtimes serve on unix sockets).
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = endpoint.strip_prefix("unix://") {
        return Ok(PathBuf::from(path));
    }
    if endpoint.starts_with('/') {
        return Ok(PathBuf::from(endpoint));
    }
    bail!("CRI endpoint {endpoint:?}: only unix:///path/to/socket is supported")
}

fn call<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// A CRI v1 client (runtime and image services) on one unix socket. Cheap to clone; the
/// channel reconnects by itself after the runtime restarts.
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    endpoint: String,
}

impl CriClient {
    /// Connects to `endpoint` (`unix:///run/containerd/containerd.sock`) and checks that it
    /// answers CRI v1 `Version`.
    ///
    /// # Errors
    /// The socket missing, refusing, or not serving CRI v1; the message names the endpoint.
    pub async fn connect(endpoint: &str) -> anyhow::Result<CriClient> {
        let path = socket_path(endpoint)?;
        let channel = crate::grpc::unix_channel(path.clone(), Duration::from_secs(5))
            .await
            .with_context(|| {
                format!(
                    "cannot connect to the CRI runtime at {endpoint} ({}): is containerd \
                     running with its socket there?",
                    path.display()
                )
            })?;
        let client = CriClient {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            images: ImageServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE),
            endpoint: endpoint.to_owned(),
        };
        client.version().await.with_context(|| {
            format!("the runtime at {endpoint} does not answer CRI v1 Version (is its CRI plugin loaded?)")
        })?;
        Ok(client)
    }

    /// The endpoint this client was made for.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The runtime service, for calls this type does not wrap.
    pub fn runtime_service(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The image service, for calls this type does not wrap.
    pub fn image_service(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    /// CRI `Version` (runtime name and version, e.g. `containerd` `1.6.20~ds1`).
    pub async fn version(&self) -> Result<cri::VersionResponse, tonic::Status> {
        let request = cri::VersionRequest {
            version: "v1".into(),
        };
        Ok(self
            .runtime
            .clone()
            .version(call(request, CALL_TIMEOUT))
            .await?
            .into_inner())
    }

    /// The sandboxes carrying all of `labels`.
    pub async fn sandboxes(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<cri::PodSandbox>, tonic::Status> {
        let request = cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(call(request, CALL_TIMEOUT))
            .await?
            .into_inner()
            .items)
    }

    /// The containers carrying all of `labels`, in the sandbox `sandbox` if not empty.
    pub async fn containers(
        &self,
        sandbox: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<cri::Container>, tonic::Status> {
        let request = cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                pod_sandbox_id: sandbox.to_owned(),
                label_selector: labels,
                ..Default::default()
            }),
        };
        Ok(self
            .runtime
            .clone()
            .list_containers(call(request, CALL_TIMEOUT))
            .await?
            .into_inner()
            .containers)
    }

    /// `StopPodSandbox` then `RemovePodSandbox` (which removes its containers too); a sandbox
    /// already gone is no error.
    pub async fn remove_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        let mut runtime = self.runtime.clone();
        let stop = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        match runtime.stop_pod_sandbox(call(stop, CALL_TIMEOUT * 3)).await {
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        let remove = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        match runtime
            .remove_pod_sandbox(call(remove, CALL_TIMEOUT * 3))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
        let request = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        self.runtime
            .clone()
            .container_status(call(request, CALL_TIMEOUT))
            .await?
            .into_inner()
            .status
            .ok_or_else(|| tonic::Status::not_found(format!("container {id}")))
    }

    /// Every container's cumulative CPU time (ns) and memory working set (bytes), by container
    /// id (CRI `ListContainerStats`, as kubelet's summary takes them).
    ///
    /// # Errors
    /// The runtime's.
    pub async fn container_stats(&self) -> Result<HashMap<String, (u64, u64)>, tonic::Status> {
        let request = cri::ListContainerStatsRequest { filter: None };
        let stats = self
            .runtime
            .clone()
            .list_container_stats(call(request, CALL_TIMEOUT))
            .await?
            .into_inner()
            .stats;
        Ok(stats
            .into_iter()
            .filter_map(|s| {
                let id = s.attributes?.id;
                let cpu = s
                    .cpu
                    .and_then(|c| c.usage_core_nano_seconds)
                    .map_or(0, |v| v.value);
                let memory = s
                    .memory
                    .and_then(|m| m.working_set_bytes)
                    .map_or(0, |v| v.value);
                Some((id, (cpu, memory)))
            })
            .collect())
    }

    /// Stops a container, giving it `grace` after SIGTERM (CRI `StopContainer`).
    ///
    /// # Errors
    /// The runtime's.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), tonic::Status> {
        let request = cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: grace.as_secs() as i64,
        };
        self.runtime
            .clone()
            .stop_container(call(request, grace + CALL_TIMEOUT))
            .await
            .map(|_| ())
    }

    /// Runs `argv` in a container and waits for it (CRI `ExecSync`): exit code, stdout and
    /// stderr. `timeout` is the command's; the call's deadline is a little longer.
    ///
    /// # Errors
    /// The runtime's (a command that cannot start, a container not running); a command
    /// past `timeout` is `DEADLINE_EXCEEDED`.
    /// Asks the runtime for a streaming session (CRI `Exec`, or `Attach` when `argv` is
    /// `None`): the URL of its streaming server where the session is served (Kubernetes'
    /// remote-command protocol over SPDY, see [`super::cri_stream`]).
    ///
    /// # Errors
    /// The runtime's (no such container, a terminal with stderr, …).
    pub async fn stream_url(
        &self,
        container_id: &str,
        argv: Option<Vec<String>>,
        streams: super::cri_stream::Streams,
    ) -> Result<String, tonic::Status> {
        let mut runtime = self.runtime.clone();
        let url = match argv {
            Some(cmd) => {
                let request = cri::ExecRequest {
                    container_id: container_id.to_owned(),
                    cmd,
                    tty: streams.tty,
                    stdin: streams.stdin,
                    stdout: streams.stdout,
                    stderr: streams.stderr && !streams.tty,
                };
                runtime
                    .exec(call(request, CALL_TIMEOUT))
                    .await?
                    .into_inner()
                    .url
            }
            None => {
                let request = cri::AttachRequest {
                    container_id: container_id.to_owned(),
                    stdin: streams.stdin,
                    tty: streams.tty,
                    stdout: streams.stdout,
                    stderr: streams.stderr && !streams.tty,
                };
                runtime
                    .attach(call(request, CALL_TIMEOUT))
                    .await?
                    .into_inner()
                    .url
            }
        };
        Ok(url)
    }

    pub async fn exec_sync(
        &self,
        container_id: &str,
        argv: Vec<String>,
        timeout: Duration,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        let request = cri::ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: argv,
            timeout: timeout.as_secs().max(1) as i64,
        };
        Ok(self
            .runtime
            .clone()
            .exec_sync(call(request, timeout + CALL_TIMEOUT))
            .await?
            .into_inner())
    }
}

/// A running CRI container that `kubectl exec` runs commands in (CRI `ExecSync`).
#[derive(Clone)]
pub struct ExecTarget {
    pub client: CriClient,
    /// The runtime's container id (without the `containerd://` scheme).
    pub container_id: String,
}

type ExecTargets = Mutex<HashMap<PathBuf, ExecTarget>>;

fn exec_targets() -> &'static ExecTargets {
    static TARGETS: std::sync::OnceLock<ExecTargets> = std::sync::OnceLock::new();
    TARGETS.get_or_init(Default::default)
}

/// Every running CRI container this edgecore runs: its log file (`<pod dir>/<container>.log`)
/// and how to reach it.
pub fn running_containers() -> Vec<(PathBuf, ExecTarget)> {
    lock(exec_targets())
        .iter()
        .map(|(log, target)| (log.clone(), target.clone()))
        .collect()
}

/// The running CRI container `container` of the pod whose directory is `pod_dir`
/// (`DATA_DIR/pods/<namespace>_<name>`), if this edgecore runs it.
pub fn exec_target(pod_dir: &Path, container: &str) -> Option<ExecTarget> {
    lock(exec_targets())
        .get(&pod_dir.join(format!("{container}.log")))
        .cloned()
}

/// A container's state as Edged reports it, with what the runtime says about it.
struct Slot {
    status: ContainerStatus,
    /// `containerd://<id>` of the current (or last) instance; empty before the first.
    container_id: String,
    /// The image's `repo@sha256:…` as the runtime resolved it.
    image_id: String,
}

struct PodEntry {
    uid: String,
    slots: Vec<Arc<Mutex<Slot>>>,
    init_slots: Vec<Arc<Mutex<Slot>>>,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
    /// Set once the pod's sandbox is stopped and removed.
    done: Arc<AtomicBool>,
    files: Vec<(PathBuf, Vec<u8>)>,
    ip: Arc<Mutex<Option<String>>>,
    /// The pod's imagePullSecrets as of Edged's last pass (a Secret may reach the node after
    /// its pod).
    pull_secrets: Arc<Mutex<Vec<super::runtime::RegistryAuth>>>,
}

/// The containers of this node by id and their CRI state, as of the last relist.
type Listing = Arc<HashMap<String, i32>>;

struct Shared {
    cri: CriClient,
    runtime_id: String,
    /// `containerd` (the `containerID` scheme).
    runtime_name: String,
    pods: Mutex<HashMap<String, PodEntry>>,
    /// Sandboxes of this node found at start, by pod (`namespace/name`), not yet taken up.
    found: Mutex<HashMap<String, Vec<cri::PodSandbox>>>,
    listing: tokio::sync::watch::Sender<Listing>,
    /// Cancelled when edgecore exits: supervisors stop watching, containers keep running.
    detached: CancellationToken,
    /// Notified whenever a container's state changes ([`Runtime::changed`]).
    changed: Arc<tokio::sync::Notify>,
    /// Events by pod (`namespace/name`) not yet taken by Edged ([`Runtime::take_events`]);
    /// at most [`MAX_PENDING_EVENTS`] per pod.
    events: Mutex<HashMap<String, Vec<super::events::Transition>>>,
}

/// Events kept for a pod until Edged takes them (the newest are dropped beyond it: a pod in a
/// pull loop repeats the same ones, which the recorder would aggregate anyway).
const MAX_PENDING_EVENTS: usize = 32;

/// A container's slot locked for a change: Edged is told when the lock is released.
struct Changing<'a> {
    guard: std::sync::MutexGuard<'a, Slot>,
    changed: &'a tokio::sync::Notify,
}

impl std::ops::Deref for Changing<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.guard
    }
}

impl std::ops::DerefMut for Changing<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.guard
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.changed.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs pods as CRI containers (see the module documentation).
pub struct CriRuntime {
    shared: Arc<Shared>,
    version: String,
}

impl CriRuntime {
    /// Connects to the runtime at `endpoint` and lists the sandboxes an earlier edgecore on
    /// the data dir of `pods_dir` left (taken up or removed as Edged asks for their pods).
    ///
    /// # Errors
    /// The runtime not reachable (the message names the endpoint) or not listing sandboxes.
    pub async fn open(endpoint: &str, pods_dir: &Path) -> anyhow::Result<CriRuntime> {
        let cri = CriClient::connect(endpoint).await?;
        let version = cri.version().await?;
        let dir = pods_dir.to_path_buf();
        let runtime_id = tokio::task::spawn_blocking(move || runtime_id(&dir)).await?;
        let sandboxes = cri
            .sandboxes(HashMap::from([(
                LABEL_RUNTIME_ID.to_owned(),
                runtime_id.clone(),
            )]))
            .await
            .with_context(|| format!("listing the pod sandboxes at {endpoint}"))?;
        let mut found: HashMap<String, Vec<cri::PodSandbox>> = HashMap::new();
        for sandbox in sandboxes {
            let Some(meta) = &sandbox.metadata else {
                continue;
            };
            let id = format!("{}/{}", meta.namespace, meta.name);
            found.entry(id).or_default().push(sandbox);
        }
        if !found.is_empty() {
            tracing::info!(
                pods = found.len(),
                "pod sandboxes of an earlier edgecore found"
            );
        }
        let (listing, _) = tokio::sync::watch::channel(Listing::default());
        let shared = Arc::new(Shared {
            cri,
            runtime_id,
            runtime_name: version.runtime_name.clone(),
            pods: Mutex::new(HashMap::new()),
            found: Mutex::new(found),
            listing,
            detached: CancellationToken::new(),
            changed: Arc::new(tokio::sync::Notify::new()),
            events: Mutex::new(HashMap::new()),
        });
        tokio::spawn(relist(Arc::downgrade(&shared)));
        Ok(CriRuntime {
            shared,
            version: format!("{}://{}", version.runtime_name, version.runtime_version),
        })
    }

    /// `nodeInfo.containerRuntimeVersion`: `<runtime>://<version>`, e.g.
    /// `containerd://1.6.20~ds1`.
    pub fn runtime_version(&self) -> &str {
        &self.version
    }

    /// The id of `container` of pod `id` (`namespace/name`) as the runtime knows it, if it
    /// has one, and the client to reach it (for `kubectl exec`).
    pub fn container_id(&self, id: &str, container: &str) -> Option<String> {
        let pods = lock(&self.shared.pods);
        let entry = pods.get(id)?;
        entry.slots.iter().find_map(|slot| {
            let slot = lock(slot);
            (slot.status.name == container && !slot.container_id.is_empty())
                .then(|| slot.container_id.clone())
        })
    }

    /// The client this runtime uses.
    pub fn client(&self) -> &CriClient {
        &self.shared.cri
    }
}

/// Lists the node's containers every [`RELIST`] while the runtime lives (the pods' supervisors
/// look at what changed). A failed listing keeps the last one.
async fn relist(shared: Weak<Shared>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(RELIST).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.detached.is_cancelled() {
            return;
        }
        if lock(&shared.pods).is_empty() {
            continue;
        }
        let labels = HashMap::from([(LABEL_RUNTIME_ID.to_owned(), shared.runtime_id.clone())]);
        match shared.cri.containers("", labels).await {
            Ok(containers) => {
                failing = false;
                let states = containers.into_iter().map(|c| (c.id, c.state)).collect();
                shared.listing.send_replace(Arc::new(states));
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(endpoint = %shared.cri.endpoint, error = %e,
                        "cannot list the containers; pod states are as last seen");
                }
                failing = true;
            }
        }
    }
}

fn nanos_rfc3339(nanos: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .map(object::rfc3339)
        .unwrap_or_else(|_| object::now_rfc3339())
}

/// The termination a CRI container status describes.
fn terminated_of(status: &cri::ContainerStatus) -> Terminated {
    let reason = if !status.reason.is_empty() {
        status.reason.clone()
    } else if status.exit_code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    };
    Terminated {
        exit_code: status.exit_code,
        reason,
        started_at: if status.started_at > 0 {
            nanos_rfc3339(status.started_at)
        } else {
            object::now_rfc3339()
        },
        finished_at: if status.finished_at > 0 {
            nanos_rfc3339(status.finished_at)
        } else {
            object::now_rfc3339()
        },
    }
}

fn namespace_options(host_network: bool) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: if host_network {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        } as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// The pod's name and namespace from its id (`namespace/name`).
fn split_id(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap_or(("default", id))
}

fn sandbox_config(shared: &Shared, pod: &PodRun, attempt: u32) -> cri::PodSandboxConfig {
    let (namespace, name) = split_id(&pod.id);
    let pod_dir = pod.root.parent().unwrap_or(&pod.root);
    let labels = HashMap::from([
        (LABEL_RUNTIME_ID.to_owned(), shared.runtime_id.clone()),
        (LABEL_POD_UID.to_owned(), pod.uid.clone()),
        (LABEL_POD_NAME.to_owned(), name.to_owned()),
        (LABEL_POD_NAMESPACE.to_owned(), namespace.to_owned()),
    ]);
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: pod.uid.clone(),
            namespace: namespace.to_owned(),
            attempt,
        }),
        // runc cannot set a hostname without a UTS namespace of the pod's own.
        hostname: if pod.host_network {
            String::new()
        } else {
            name.chars().take(63).collect()
        },
        log_directory: pod_dir.to_string_lossy().into_owned(),
        port_mappings: pod
            .containers
            .iter()
            .flat_map(|c| &c.host_ports)
            .map(
                |(protocol, container_port, host_port, host_ip)| cri::PortMapping {
                    protocol: match protocol.as_str() {
                        "UDP" => cri::Protocol::Udp,
                        "SCTP" => cri::Protocol::Sctp,
                        _ => cri::Protocol::Tcp,
                    } as i32,
                    container_port: *container_port,
                    host_port: *host_port,
                    host_ip: host_ip.clone(),
                },
            )
            .collect(),
        labels,
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(pod.host_network)),
                // A privileged container needs a privileged sandbox.
                privileged: pod.containers.iter().any(|c| c.privileged),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(
    shared: &Shared,
    pod: &PodRun,
    container: &ContainerRun,
    attempt: u32,
) -> cri::ContainerConfig {
    let (namespace, name) = split_id(&pod.id);
    let labels = HashMap::from([
        (LABEL_RUNTIME_ID.to_owned(), shared.runtime_id.clone()),
        (LABEL_POD_UID.to_owned(), pod.uid.clone()),
        (LABEL_POD_NAME.to_owned(), name.to_owned()),
        (LABEL_POD_NAMESPACE.to_owned(), namespace.to_owned()),
        (LABEL_CONTAINER_NAME.to_owned(), container.name.clone()),
    ]);
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: container.name.clone(),
            attempt,
        }),
        image: Some(cri::ImageSpec {
            image: container.image.clone(),
            ..Default::default()
        }),
        command: container.command.clone(),
        args: container.args.clone(),
        working_dir: container.working_dir.clone().unwrap_or_default(),
        // For `kubectl attach -i` (CRI Attach reaches the container's own stdin).
        stdin: container.stdin,
        stdin_once: container.stdin_once,
        tty: container.tty,
        envs: container
            .env
            .iter()
            .map(|(key, value)| cri::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts: container
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.to_string_lossy().into_owned(),
                readonly: m.read_only,
                ..Default::default()
            })
            .collect(),
        labels,
        // Relative to the sandbox's log_directory: where `super::logs` reads it.
        log_path: format!("{}.log", container.name),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespace_options(pod.host_network)),
                privileged: container.privileged,
                run_as_user: container
                    .security
                    .run_as_user
                    .map(|value| cri::Int64Value { value }),
                run_as_group: container
                    .security
                    .run_as_group
                    .map(|value| cri::Int64Value { value }),
                readonly_rootfs: container.security.read_only_root,
                ..Default::default()
            }),
            resources: Some(linux_resources(&container.resources)),
        }),
        ..Default::default()
    }
}

/// CPU and memory as kubelet maps them: shares from the request (1024 per core, at least 2),
/// a CFS quota from the limit over a 100 ms period, the memory limit in bytes.
fn linux_resources(resources: &super::runtime::ResourcesRun) -> cri::LinuxContainerResources {
    const PERIOD: u64 = 100_000;
    cri::LinuxContainerResources {
        cpu_shares: resources
            .cpu_request_millis
            .map_or(0, |m| (m * 1024 / 1000).max(2) as i64),
        cpu_period: if resources.cpu_limit_millis.is_some() {
            PERIOD as i64
        } else {
            0
        },
        cpu_quota: resources
            .cpu_limit_millis
            .map_or(0, |m| (m * PERIOD / 1000).max(1000) as i64),
        memory_limit_in_bytes: resources.memory_limit_bytes.unwrap_or(0),
        ..Default::default()
    }
}

/// Waits out `delay` unless `stop` or `detached` comes first; returns whether one did.
async fn wait_or_stop(
    delay: Duration,
    stop: &CancellationToken,
    detached: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop.cancelled() => true,
        _ = detached.cancelled() => true,
    }
}

impl Runtime for CriRuntime {
    fn ensure(&self, pod: &PodRun) {
        let mut pods = lock(&self.shared.pods);
        if let Some(entry) = pods.get_mut(&pod.id) {
            if entry.files != pod.files {
                write_files(&pod.root, &pod.files);
                entry.files = pod.files.clone();
            }
            let mut secrets = lock(&entry.pull_secrets);
            if *secrets != pod.pull_secrets {
                *secrets = pod.pull_secrets.clone();
            }
            return;
        }
        let _ = std::fs::create_dir_all(&pod.root);
        write_files(&pod.root, &pod.files);
        let pod_dir = pod.root.parent().unwrap_or(&pod.root);
        // The node's claim volumes live beside the pods' directories (spec::claim_dir).
        let claims = pod_dir
            .parent()
            .and_then(Path::parent)
            .map(|data| data.join("claims"));
        for container in &pod.containers {
            for mount in &container.mounts {
                // Bind mount sources must exist; hostPath ones are the user's.
                let ours = mount.host_path.starts_with(pod_dir)
                    || claims
                        .as_ref()
                        .is_some_and(|c| mount.host_path.starts_with(c));
                if ours {
                    let _ = std::fs::create_dir_all(&mount.host_path);
                }
            }
        }
        let found = lock(&self.shared.found).remove(&pod.id).unwrap_or_default();
        let mut slots = Vec::new();
        let mut starts = Vec::new();
        for container in &pod.containers {
            let (status, start) = resume(container, pod.restart_policy, &pod.recorded);
            // Whether `resume` already counted the restart after a recorded termination.
            let counted = pod.recorded.iter().any(|r| {
                r.name == container.name && matches!(r.state, ContainerState::Terminated(_))
            });
            slots.push(Arc::new(Mutex::new(Slot {
                status,
                container_id: String::new(),
                image_id: String::new(),
            })));
            starts.push((start, counted));
        }
        let init_slots: Vec<_> = pod
            .init_containers
            .iter()
            .map(|c| {
                Arc::new(Mutex::new(Slot {
                    status: ContainerStatus {
                        name: c.name.clone(),
                        image: c.image.clone(),
                        state: ContainerState::Waiting {
                            reason: "PodInitializing".into(),
                            message: String::new(),
                        },
                        last_termination: None,
                        restart_count: 0,
                    },
                    container_id: String::new(),
                    image_id: String::new(),
                }))
            })
            .collect();
        let entry = PodEntry {
            uid: pod.uid.clone(),
            slots: slots.clone(),
            init_slots: init_slots.clone(),
            stop: CancellationToken::new(),
            grace: Arc::new(Mutex::new(Duration::from_secs(30))),
            done: Arc::new(AtomicBool::new(false)),
            files: pod.files.clone(),
            ip: Arc::new(Mutex::new(None)),
            pull_secrets: Arc::new(Mutex::new(pod.pull_secrets.clone())),
        };
        let run = PodTask {
            shared: self.shared.clone(),
            pod: pod.clone(),
            found,
            slots,
            init_slots,
            starts,
            stop: entry.stop.clone(),
            grace: entry.grace.clone(),
            done: entry.done.clone(),
            ip: entry.ip.clone(),
            pull_secrets: entry.pull_secrets.clone(),
        };
        pods.insert(pod.id.clone(), entry);
        tracing::debug!(pod = %pod.id, "starting the pod");
        tokio::spawn(run.run());
    }

    fn stop(&self, id: &str, grace: Duration) {
        let mut pods = lock(&self.shared.pods);
        if let Some(entry) = pods.get(id) {
            if !entry.stop.is_cancelled() {
                *lock(&entry.grace) = grace;
                entry.stop.cancel();
            }
            return;
        }
        // A pod of an earlier edgecore that Edged does not want: its sandboxes go.
        let Some(found) = lock(&self.shared.found).remove(id) else {
            return;
        };
        let done = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        stop.cancel();
        pods.insert(
            id.to_owned(),
            PodEntry {
                uid: String::new(),
                slots: Vec::new(),
                init_slots: Vec::new(),
                stop,
                grace: Arc::new(Mutex::new(grace)),
                done: done.clone(),
                files: Vec::new(),
                ip: Arc::new(Mutex::new(None)),
                pull_secrets: Arc::new(Mutex::new(Vec::new())),
            },
        );
        let cri = self.shared.cri.clone();
        let pod = id.to_owned();
        tokio::spawn(async move {
            for sandbox in found {
                stop_sandbox_containers(&cri, &sandbox.id, grace).await;
                if let Err(e) = cri.remove_sandbox(&sandbox.id).await {
                    tracing::warn!(%pod, sandbox = %sandbox.id, error = %e, "cannot remove a pod sandbox");
                }
            }
            done.store(true, Ordering::Release);
        });
    }

    fn status(&self, id: &str) -> Option<Vec<ContainerStatus>> {
        let pods = lock(&self.shared.pods);
        let entry = pods.get(id)?;
        if entry.uid.is_empty() && entry.slots.is_empty() {
            // Removing what an earlier edgecore left: not a pod Edged runs.
            return None;
        }
        Some(
            entry
                .slots
                .iter()
                .map(|slot| lock(slot).status.clone())
                .collect(),
        )
    }

    fn reap(&self, id: &str) -> bool {
        let mut pods = lock(&self.shared.pods);
        let detached = self.shared.detached.is_cancelled();
        match pods.get(id) {
            None => !lock(&self.shared.found).contains_key(id),
            // Detached: the containers stay for the next edgecore.
            Some(entry)
                if detached
                    || (entry.stop.is_cancelled() && entry.done.load(Ordering::Acquire)) =>
            {
                pods.remove(id);
                true
            }
            Some(_) => false,
        }
    }

    fn pods(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.shared.pods).keys().cloned().collect();
        ids.extend(lock(&self.shared.found).keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// edgecore is exiting: the containers keep running (the next edgecore adopts them, as
    /// kubelet's do); only their supervision ends.
    fn shutdown(&self, _grace: Duration) {
        self.shared.detached.cancel();
    }

    fn changed(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.shared.changed.clone())
    }

    fn init_status(&self, id: &str) -> Vec<ContainerStatus> {
        let pods = lock(&self.shared.pods);
        let Some(entry) = pods.get(id) else {
            return Vec::new();
        };
        entry
            .init_slots
            .iter()
            .map(|slot| lock(slot).status.clone())
            .collect()
    }

    fn pod_ip(&self, id: &str) -> Option<String> {
        let pods = lock(&self.shared.pods);
        let ip = lock(&pods.get(id)?.ip).clone();
        ip
    }

    fn reopen_log(&self, id: &str, container: &str) {
        let Some(container_id) = self.container_id(id, container) else {
            return;
        };
        let cri = self.shared.cri.clone();
        tokio::spawn(async move {
            let request = cri::ReopenContainerLogRequest {
                container_id: container_id.clone(),
            };
            if let Err(e) = cri
                .runtime_service()
                .reopen_container_log(call(request, CALL_TIMEOUT))
                .await
            {
                // An exited container has nothing to reopen; its next instance opens anew.
                tracing::debug!(container = %container_id, error = %e.message(), "ReopenContainerLog");
            }
        });
    }

    fn take_events(&self, id: &str) -> Vec<super::events::Transition> {
        lock(&self.shared.events).remove(id).unwrap_or_default()
    }

    fn container_ids(&self, id: &str) -> Vec<(String, String, String)> {
        let pods = lock(&self.shared.pods);
        let Some(entry) = pods.get(id) else {
            return Vec::new();
        };
        entry
            .slots
            .iter()
            .map(|slot| {
                let slot = lock(slot);
                let container_id = if slot.container_id.is_empty() {
                    String::new()
                } else {
                    format!("{}://{}", self.shared.runtime_name, slot.container_id)
                };
                (
                    slot.status.name.clone(),
                    container_id,
                    slot.image_id.clone(),
                )
            })
            .collect()
    }
}

/// Stops the containers of a sandbox with `grace` (before the sandbox goes: `StopPodSandbox`
/// alone would kill them at once).
async fn stop_sandbox_containers(cri: &CriClient, sandbox: &str, grace: Duration) {
    let Ok(containers) = cri.containers(sandbox, HashMap::new()).await else {
        return;
    };
    let stops = containers
        .into_iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .map(|c| {
            let mut runtime = cri.runtime_service();
            async move {
                let request = cri::StopContainerRequest {
                    container_id: c.id,
                    timeout: grace.as_secs() as i64,
                };
                let _ = runtime
                    .stop_container(call(request, grace + CALL_TIMEOUT))
                    .await;
            }
        });
    futures_util::future::join_all(stops).await;
}

/// One pod's life: its sandbox, a supervisor per container, the teardown.
struct PodTask {
    shared: Arc<Shared>,
    pod: PodRun,
    found: Vec<cri::PodSandbox>,
    slots: Vec<Arc<Mutex<Slot>>>,
    init_slots: Vec<Arc<Mutex<Slot>>>,
    /// Per container: whether to run it, and whether a recorded termination was counted.
    starts: Vec<(bool, bool)>,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
    done: Arc<AtomicBool>,
    ip: Arc<Mutex<Option<String>>>,
    pull_secrets: Arc<Mutex<Vec<super::runtime::RegistryAuth>>>,
}

impl PodTask {
    /// Runs the init containers in order, each to completion (restarted on failure unless
    /// the pod's restartPolicy is Never). Whether all completed: false when one failed for
    /// good, or the pod was stopped first.
    async fn run_init_containers(&self, sandbox: &str) -> bool {
        if self.pod.init_containers.is_empty() {
            return true;
        }
        self.set_waiting_all("PodInitializing", String::new());
        let mut init_pod = self.pod.clone();
        if init_pod.restart_policy == super::runtime::RestartPolicy::Always {
            init_pod.restart_policy = super::runtime::RestartPolicy::OnFailure;
        }
        for (container, slot) in self.pod.init_containers.iter().zip(&self.init_slots) {
            let supervisor = Supervisor {
                shared: self.shared.clone(),
                pod: init_pod.clone(),
                container: container.clone(),
                sandbox: sandbox.to_owned(),
                log: self
                    .pod
                    .root
                    .parent()
                    .unwrap_or(&self.pod.root)
                    .join(format!("{}.log", container.name)),
                slot: slot.clone(),
                start: true,
                counted: false,
                existing: None,
                pull_secrets: self.pull_secrets.clone(),
                stop: self.stop.clone(),
                grace: self.grace.clone(),
            };
            supervisor.run().await;
            let completed = matches!(
                &lock(slot).status.state,
                ContainerState::Terminated(t) if t.exit_code == 0
            );
            if !completed {
                return false;
            }
        }
        true
    }

    fn set_waiting_all(&self, reason: &str, message: String) {
        for slot in &self.slots {
            let mut slot = lock(slot);
            if matches!(slot.status.state, ContainerState::Waiting { .. }) {
                slot.status.state = ContainerState::Waiting {
                    reason: reason.into(),
                    message: message.clone(),
                };
            }
        }
        self.shared.changed.notify_one();
    }

    async fn run(self) {
        let began = Instant::now();
        let detached = self.shared.detached.clone();
        let cri = self.shared.cri.clone();
        // The earlier edgecore's sandboxes of this pod: one of the same pod (uid) still ready
        // is taken up, the others go.
        let mut attempt = 0;
        let mut adopted = None;
        for sandbox in self.found.clone() {
            let meta = sandbox.metadata.clone().unwrap_or_default();
            attempt = attempt.max(meta.attempt + 1);
            let same = sandbox.labels.get(LABEL_POD_UID) == Some(&self.pod.uid);
            let ready = sandbox.state == cri::PodSandboxState::SandboxReady as i32;
            if adopted.is_none() && same && ready {
                tracing::info!(pod = %self.pod.id, sandbox = %sandbox.id, "adopting the pod's sandbox");
                adopted = Some(sandbox.id);
            } else {
                stop_sandbox_containers(&cri, &sandbox.id, Duration::from_secs(2)).await;
                if let Err(e) = cri.remove_sandbox(&sandbox.id).await {
                    tracing::warn!(pod = %self.pod.id, sandbox = %sandbox.id, error = %e,
                        "cannot remove an old pod sandbox");
                }
            }
        }
        let mut existing: HashMap<String, cri::Container> = HashMap::new();
        let was_adopted = adopted.is_some();
        let sandbox = match adopted {
            Some(id) => {
                if let Ok(containers) = cri.containers(&id, HashMap::new()).await {
                    for c in containers {
                        let meta = c.metadata.clone().unwrap_or_default();
                        let newer = existing.get(&meta.name).is_none_or(|held| {
                            held.metadata.as_ref().map_or(0, |m| m.attempt) < meta.attempt
                        });
                        if newer {
                            existing.insert(meta.name, c);
                        }
                    }
                }
                Some(id)
            }
            None => {
                let mut backoff = INITIAL_BACKOFF;
                loop {
                    if self.stop.is_cancelled() || detached.is_cancelled() {
                        break None;
                    }
                    let request = cri::RunPodSandboxRequest {
                        config: Some(sandbox_config(&self.shared, &self.pod, attempt)),
                        runtime_handler: String::new(),
                    };
                    match cri
                        .runtime_service()
                        .run_pod_sandbox(call(request, CALL_TIMEOUT * 6))
                        .await
                    {
                        Ok(response) => {
                            tracing::debug!(pod = %self.pod.id, took = ?began.elapsed(), "sandbox ready");
                            break Some(response.into_inner().pod_sandbox_id);
                        }
                        Err(e) => {
                            tracing::warn!(pod = %self.pod.id, error = %e, "cannot create the pod sandbox");
                            self.set_waiting_all(
                                "ContainerCreating",
                                format!("failed to create the pod sandbox: {}", e.message()),
                            );
                            // A half-made sandbox may hold the name of this attempt.
                            attempt += 1;
                            if wait_or_stop(backoff, &self.stop, &detached).await {
                                break None;
                            }
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
        };
        let Some(sandbox) = sandbox else {
            self.done.store(true, Ordering::Release);
            return;
        };
        if !self.pod.host_network {
            let request = cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            };
            match cri
                .runtime_service()
                .pod_sandbox_status(call(request, CALL_TIMEOUT))
                .await
            {
                Ok(response) => {
                    let ip = response
                        .into_inner()
                        .status
                        .and_then(|s| s.network)
                        .map(|n| n.ip)
                        .filter(|ip| !ip.is_empty());
                    *lock(&self.ip) = ip;
                }
                Err(e) => {
                    tracing::warn!(pod = %self.pod.id, error = %e, "cannot read the pod's IP")
                }
            }
        }
        let initialized = if was_adopted {
            // Its containers ran in this sandbox: the init containers completed before.
            for (container, slot) in self.pod.init_containers.iter().zip(&self.init_slots) {
                let done = existing.remove(&container.name);
                let mut slot = lock(slot);
                slot.status.state = ContainerState::Terminated(Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    started_at: object::now_rfc3339(),
                    finished_at: object::now_rfc3339(),
                });
                if let Some(done) = done {
                    slot.container_id = done.id;
                    slot.image_id = done.image_ref;
                }
            }
            true
        } else {
            self.run_init_containers(&sandbox).await
        };
        let mut supervisors = tokio::task::JoinSet::new();
        for ((container, slot), (start, counted)) in self
            .pod
            .containers
            .iter()
            .zip(&self.slots)
            .zip(&self.starts)
        {
            let supervisor = Supervisor {
                shared: self.shared.clone(),
                pod: self.pod.clone(),
                container: container.clone(),
                sandbox: sandbox.clone(),
                log: self
                    .pod
                    .root
                    .parent()
                    .unwrap_or(&self.pod.root)
                    .join(format!("{}.log", container.name)),
                slot: slot.clone(),
                start: *start,
                counted: *counted,
                existing: existing.remove(&container.name),
                pull_secrets: self.pull_secrets.clone(),
                stop: self.stop.clone(),
                grace: self.grace.clone(),
            };
            if initialized {
                supervisors.spawn(supervisor.run());
            }
        }
        while supervisors.join_next().await.is_some() {}
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = detached.cancelled() => return,
        }
        if detached.is_cancelled() {
            return;
        }
        let mut removed = false;
        for _ in 0..3 {
            match cri.remove_sandbox(&sandbox).await {
                Ok(()) => {
                    removed = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(pod = %self.pod.id, %sandbox, error = %e, "cannot remove the pod sandbox; retrying");
                    tokio::time::sleep(INITIAL_BACKOFF).await;
                }
            }
        }
        if !removed {
            tracing::warn!(pod = %self.pod.id, %sandbox, "the pod sandbox is left behind");
        }
        self.done.store(true, Ordering::Release);
    }
}

/// How watching a running container ended.
enum Watch {
    Exited(Terminated),
    Stopped,
    Detached,
}

/// One container of a pod: image, instances, restarts.
struct Supervisor {
    shared: Arc<Shared>,
    pod: PodRun,
    container: ContainerRun,
    sandbox: String,
    log: PathBuf,
    slot: Arc<Mutex<Slot>>,
    /// Whether to run the container at all (not when it finished for good before).
    start: bool,
    /// Whether the status resumed from already counts the restart after its termination.
    counted: bool,
    /// The newest instance in an adopted sandbox.
    existing: Option<cri::Container>,
    pull_secrets: Arc<Mutex<Vec<super::runtime::RegistryAuth>>>,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
}

impl Supervisor {
    /// Keeps an event about this container for Edged to record.
    fn record(&self, kind: &'static str, reason: &'static str, message: String) {
        let mut events = lock(&self.shared.events);
        let pending = events.entry(self.pod.id.clone()).or_default();
        if pending.len() < MAX_PENDING_EVENTS {
            pending.push((self.container.name.clone(), kind, reason, message));
        }
    }

    fn slot_mut(&self) -> Changing<'_> {
        Changing {
            guard: lock(&self.slot),
            changed: &self.shared.changed,
        }
    }

    fn set_state(&self, state: ContainerState) {
        self.slot_mut().status.state = state;
    }

    fn register_exec(&self, id: &str) {
        lock(exec_targets()).insert(
            self.log.clone(),
            ExecTarget {
                client: self.shared.cri.clone(),
                container_id: id.to_owned(),
            },
        );
    }

    fn stopped(&self) -> bool {
        self.stop.is_cancelled() || self.shared.detached.is_cancelled()
    }

    async fn wait(&self, delay: Duration) -> bool {
        wait_or_stop(delay, &self.stop, &self.shared.detached).await
    }

    async fn run(mut self) {
        let cri = self.shared.cri.clone();
        let mut attempt = self.slot_mut().status.restart_count;
        let mut current: Option<(String, Instant)> = None;
        let mut previous: Option<String> = None;
        // A restart due (the previous instance exited and the policy restarts it).
        let mut restart_due = false;
        if let Some(found) = self.existing.take() {
            attempt = attempt.max(found.metadata.as_ref().map_or(0, |m| m.attempt) + 1);
            let status = cri.container_status(&found.id).await;
            match status {
                Ok(s) if s.state == cri::ContainerState::ContainerRunning as i32 => {
                    tracing::info!(pod = %self.pod.id, container = %self.container.name, "adopting the running container");
                    let mut slot = self.slot_mut();
                    slot.container_id = found.id.clone();
                    slot.image_id = s.image_ref.clone();
                    slot.status.state = ContainerState::Running {
                        started_at: nanos_rfc3339(s.started_at),
                    };
                    drop(slot);
                    self.register_exec(&found.id);
                    current = Some((found.id, Instant::now()));
                }
                Ok(s) if s.state == cri::ContainerState::ContainerExited as i32 => {
                    let t = terminated_of(&s);
                    let restarts = self.pod.restart_policy.restarts(t.exit_code);
                    let mut slot = self.slot_mut();
                    slot.container_id = found.id.clone();
                    slot.image_id = s.image_ref.clone();
                    slot.status.last_termination = Some(t.clone());
                    if !self.start || !restarts {
                        slot.status.state = ContainerState::Terminated(t);
                        return;
                    }
                    if !self.counted {
                        slot.status.restart_count += 1;
                    }
                    drop(slot);
                    previous = Some(found.id);
                }
                _ => {
                    // Created but never started, or unreadable: it goes.
                    remove_container(&cri, &found.id).await;
                    if !self.start {
                        return;
                    }
                }
            }
        } else if !self.start {
            return;
        }
        let mut backoff = INITIAL_BACKOFF;
        let mut pull_failures = 0u32;
        loop {
            if let Some((id, started)) = current.take() {
                let watched = self.watch(&id).await;
                lock(exec_targets()).remove(&self.log);
                match watched {
                    Watch::Detached => return,
                    Watch::Stopped => {
                        self.stop_container(&id).await;
                        return;
                    }
                    Watch::Exited(t) => {
                        {
                            let mut slot = self.slot_mut();
                            slot.status.state = ContainerState::Terminated(t.clone());
                            slot.status.last_termination = Some(t.clone());
                        }
                        if let Some(old) = previous.replace(id) {
                            remove_container(&cri, &old).await;
                        }
                        if !self.pod.restart_policy.restarts(t.exit_code) {
                            return;
                        }
                        if started.elapsed() >= MAX_BACKOFF {
                            backoff = INITIAL_BACKOFF;
                        }
                        restart_due = true;
                    }
                }
            }
            if restart_due {
                restart_due = false;
                {
                    let mut slot = self.slot_mut();
                    slot.status.restart_count += 1;
                    slot.status.state = ContainerState::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: format!(
                            "back-off {backoff:?} restarting failed container={} pod={}",
                            self.container.name, self.pod.id
                        ),
                    };
                }
                if self.wait(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            if self.stopped() {
                return;
            }
            match self.ensure_image().await {
                Ok(()) => pull_failures = 0,
                Err((reason, message)) => {
                    pull_failures += 1;
                    self.set_state(ContainerState::Waiting {
                        reason: reason.clone(),
                        message: message.clone(),
                    });
                    let delay = INITIAL_BACKOFF * 2u32.saturating_pow(pull_failures.min(6));
                    let delay = delay.min(MAX_BACKOFF);
                    if reason == "ErrImagePull" {
                        // kubelet's two steps: the error (for 2 s, so that Edged's report,
                        // once a second, carries it), then the back-off before the next try.
                        if self.wait(INITIAL_BACKOFF * 2).await {
                            return;
                        }
                        self.set_state(ContainerState::Waiting {
                            reason: "ImagePullBackOff".into(),
                            message: format!(
                                "Back-off pulling image \"{}\": {message}",
                                self.container.image
                            ),
                        });
                    }
                    if self.wait(delay).await {
                        return;
                    }
                    continue;
                }
            }
            // The last instance's log stays readable as `kubectl logs --previous`.
            super::logs::rotate(&self.log);
            let config = container_config(&self.shared, &self.pod, &self.container, attempt);
            let request = cri::CreateContainerRequest {
                pod_sandbox_id: self.sandbox.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config(&self.shared, &self.pod, 0)),
            };
            attempt += 1;
            let created = cri
                .runtime_service()
                .create_container(call(request, CALL_TIMEOUT * 3))
                .await;
            let id = match created {
                Ok(response) => response.into_inner().container_id,
                Err(e) => {
                    self.set_state(ContainerState::Waiting {
                        reason: "CreateContainerError".into(),
                        message: e.message().to_owned(),
                    });
                    if self.wait(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            self.record(
                "Normal",
                "Created",
                format!("Created container {}", self.container.name),
            );
            if let Some(old) = previous.take() {
                remove_container(&cri, &old).await;
            }
            self.slot_mut().container_id = id.clone();
            let request = cri::StartContainerRequest {
                container_id: id.clone(),
            };
            match cri
                .runtime_service()
                .start_container(call(request, CALL_TIMEOUT * 3))
                .await
            {
                Ok(_) => {
                    self.set_state(ContainerState::Running {
                        started_at: object::now_rfc3339(),
                    });
                    self.register_exec(&id);
                    tracing::debug!(pod = %self.pod.id, container = %self.container.name, "container started");
                }
                Err(e) => {
                    // The container is EXITED with reason StartError: the watch reads it.
                    tracing::info!(pod = %self.pod.id, container = %self.container.name,
                        error = %e.message(), "the container did not start");
                }
            }
            current = Some((id, Instant::now()));
        }
    }

    /// Pulls the image as the container's policy says. Errors are the waiting reason and
    /// message kubelet gives.
    async fn ensure_image(&self) -> Result<(), (String, String)> {
        let cri = &self.shared.cri;
        let image = &self.container.image;
        let spec = cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        };
        let present = if self.container.pull_policy == PullPolicy::Always {
            false
        } else {
            let request = cri::ImageStatusRequest {
                image: Some(spec.clone()),
                verbose: false,
            };
            match cri
                .image_service()
                .image_status(call(request, CALL_TIMEOUT))
                .await
            {
                Ok(response) => response.into_inner().image.is_some(),
                Err(e) => {
                    return Err((
                        "ImageInspectError".into(),
                        format!("Failed to inspect image \"{image}\": {}", e.message()),
                    ))
                }
            }
        };
        if present {
            self.record(
                "Normal",
                "Pulled",
                format!("Container image \"{image}\" already present on machine"),
            );
            return Ok(());
        }
        if self.container.pull_policy == PullPolicy::Never {
            return Err((
                "ErrImageNeverPull".into(),
                format!("Container image \"{image}\" is not present with pull policy of Never"),
            ));
        }
        // As kubelet: each matching imagePullSecret in turn, then no credentials.
        let registry = super::runtime::image_registry(image);
        let secrets = lock(&self.pull_secrets).clone();
        let mut auths: Vec<Option<cri::AuthConfig>> = secrets
            .iter()
            .filter(|a| a.registry == registry)
            .map(|a| {
                Some(cri::AuthConfig {
                    username: a.username.clone(),
                    password: a.password.clone(),
                    // Left empty: matched above, and containerd would ignore credentials
                    // whose server address is not a URL of the image's host.
                    ..Default::default()
                })
            })
            .collect();
        auths.push(None);
        let mut last = String::new();
        self.record("Normal", "Pulling", format!("Pulling image \"{image}\""));
        let started = Instant::now();
        for auth in auths {
            let request = cri::PullImageRequest {
                image: Some(spec.clone()),
                auth,
                sandbox_config: None,
            };
            match cri
                .image_service()
                .pull_image(call(request, PULL_TIMEOUT))
                .await
            {
                Ok(_) => {
                    self.record(
                        "Normal",
                        "Pulled",
                        format!(
                            "Successfully pulled image \"{image}\" in {:.3}s",
                            started.elapsed().as_secs_f64()
                        ),
                    );
                    return Ok(());
                }
                Err(e) => last = e.message().to_owned(),
            }
        }
        Err((
            "ErrImagePull".into(),
            format!("failed to pull image \"{image}\": {last}"),
        ))
    }

    /// Waits until the container exits, the pod is stopped, or edgecore exits. The runtime is
    /// asked for the container's status right away (it may have failed to start) and whenever
    /// a relist does not show it running.
    async fn watch(&self, id: &str) -> Watch {
        let cri = &self.shared.cri;
        let mut listing = self.shared.listing.subscribe();
        let mut check = true;
        loop {
            if check {
                match cri.container_status(id).await {
                    Ok(s) if s.state == cri::ContainerState::ContainerExited as i32 => {
                        let t = terminated_of(&s);
                        if t.reason == "StartError" {
                            tracing::info!(pod = %self.pod.id, container = %self.container.name, message = %s.message, "start error");
                        }
                        return Watch::Exited(t);
                    }
                    Ok(s) => {
                        let mut slot = self.slot_mut();
                        if slot.image_id.is_empty() {
                            slot.image_id = s.image_ref;
                        }
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        return Watch::Exited(Terminated {
                            exit_code: 137,
                            reason: "ContainerStatusUnknown".into(),
                            started_at: object::now_rfc3339(),
                            finished_at: object::now_rfc3339(),
                        });
                    }
                    // The runtime away: the state stays as last seen until it answers.
                    Err(_) => {}
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Watch::Stopped,
                _ = self.shared.detached.cancelled() => return Watch::Detached,
                changed = listing.changed() => {
                    if changed.is_err() {
                        return Watch::Detached;
                    }
                    let state = listing.borrow_and_update().get(id).copied();
                    check = state != Some(cri::ContainerState::ContainerRunning as i32);
                }
            }
        }
    }

    /// `StopContainer` with the pod's grace period (SIGTERM, SIGKILL after it), then the
    /// termination as the runtime reports it.
    async fn stop_container(&self, id: &str) {
        let cri = &self.shared.cri;
        let grace = *lock(&self.grace);
        let request = cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: grace.as_secs() as i64,
        };
        if let Err(e) = cri
            .runtime_service()
            .stop_container(call(request, grace + CALL_TIMEOUT))
            .await
        {
            tracing::warn!(pod = %self.pod.id, container = %self.container.name, error = %e, "cannot stop the container");
        }
        let t = match cri.container_status(id).await {
            Ok(s) if s.state == cri::ContainerState::ContainerExited as i32 => terminated_of(&s),
            _ => Terminated {
                exit_code: 137,
                reason: "Error".into(),
                started_at: object::now_rfc3339(),
                finished_at: object::now_rfc3339(),
            },
        };
        let mut slot = self.slot_mut();
        slot.status.state = ContainerState::Terminated(t.clone());
        slot.status.last_termination = Some(t);
    }
}

async fn remove_container(cri: &CriClient, id: &str) {
    let request = cri::RemoveContainerRequest {
        container_id: id.to_owned(),
    };
    if let Err(e) = cri
        .runtime_service()
        .remove_container(call(request, CALL_TIMEOUT * 3))
        .await
    {
        if e.code() != tonic::Code::NotFound {
            tracing::warn!(container = %id, error = %e, "cannot remove a dead container");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_sockets() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").unwrap(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
    }

    #[test]
    fn cri_times_become_rfc3339() {
        assert_eq!(
            nanos_rfc3339(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20Z"
        );
        let status = cri::ContainerStatus {
            exit_code: 1,
            started_at: 1_700_000_000_000_000_000,
            finished_at: 1_700_000_001_000_000_000,
            ..Default::default()
        };
        let t = terminated_of(&status);
        assert_eq!(t.reason, "Error");
        assert_eq!(t.finished_at, "2023-11-14T22:13:21Z");
        let start_error = cri::ContainerStatus {
            exit_code: 128,
            reason: "StartError".into(),
            ..Default::default()
        };
        assert_eq!(terminated_of(&start_error).reason, "StartError");
    }
}
