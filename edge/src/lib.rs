//! edgecore: the edge node. It joins the cloud, keeps its slice of cluster state in RocksDB,
//! runs its pods, serves a local Kubernetes API, and keeps all of that working offline.
//!
//! - [`identity`]: the node's name, the cloud's CA and the node's certificate (join once);
//! - [`meta`]: MetaManager, the cache (replication's mirror store), watermark and outbox;
//! - [`hub`]: EdgeHub, the QUIC link to the cloud (sync down, reports up);
//! - [`metaserver`]: MetaServer's policy over the shared `replication::api` code;
//! - [`edged`]: Edged, a light kubelet over a runtime (`process`, `cri` or `hollow`);
//! - [`node`]: node status and the Lease heartbeat;
//! - [`servicebus`]: HTTP requests from the cloud to local applications;
//! - [`devicetwin`]: the node's devices and their twins (expected/actual), reported upward;
//! - [`eventbus`]: MQTT (embedded broker or external), KubeEdge's topics, to DeviceTwin;
//! - [`dmi`]: DMI, KubeEdge's gRPC device management interface for mapper-framework mappers;
//! - this module: wiring ([`EdgeCore`]).

pub mod attach;
pub mod collections;
pub mod devicetwin;
pub mod dmi;
pub mod edged;
pub mod edgestream;
pub mod eventbus;
pub mod exec;
pub mod grpc;
pub mod hub;
pub mod identity;
pub mod meta;
pub mod metaserver;
pub mod node;
pub mod portforward;
pub mod pty;
pub mod servicebus;
pub mod usage;

/// Request streams the cloud may have open to this node at once (QUIC's stream limit).
pub const STREAMS_FROM_CLOUD: u32 = 512;

/// Connections MetaServer serves at once (every watch of a pod or kubectl is one); more wait
/// until one closes.
pub const METASERVER_MAX_CONNECTIONS: usize = 1024;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use replication::api::ApiServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::meta::MetaManager;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Each container is a local process.
    Process,
    /// Pods are Running at once, nothing is started (load tests).
    Hollow,
    /// Containers of a CRI v1 runtime (containerd) at `--cri-endpoint`.
    Cri,
}

/// containerd's default CRI socket.
pub const DEFAULT_CRI_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub node_name: String,
    pub cloud: SocketAddr,
    /// Other cloudcore replicas, tried in turn after `cloud` (see
    /// [`transport::ClientConfig::alternates`]).
    pub cloud_alternates: Vec<SocketAddr>,
    pub token: Option<String>,
    pub data_dir: PathBuf,
    pub metaserver_listen: SocketAddr,
    pub runtime: RuntimeKind,
    /// The CRI runtime's socket for [`RuntimeKind::Cri`] (`unix:///path`).
    pub cri_endpoint: String,
    pub node_status: node::NodeStatusConfig,
    /// Image garbage collection for [`RuntimeKind::Cri`] (kubelet's thresholds).
    pub image_gc: edged::image_gc::ImageGcPolicy,
    /// Container log rotation by size (kubelet's `--container-log-max-size/-files`).
    pub log_rotation: edged::logs::LogRotation,
    /// Applications the cloud may call through ServiceBus, by name.
    pub service_bus_apps: Vec<(String, SocketAddr)>,
    /// How long a ServiceBus call may take on the node.
    pub service_bus_timeout: Duration,
    /// MQTT for devices (EventBus/DeviceTwin).
    pub eventbus: eventbus::EventBusConfig,
    /// DMI for mapper-framework mappers (`--dmi-socket`); none: off.
    pub dmi: Option<dmi::DmiConfig>,
    /// QUIC keepalive of the link; a connection silent for twice this is dead and the link
    /// reconnects (resuming its session).
    pub link_keepalive: Duration,
    /// Join again with `token` even though the data dir has a certificate (a node the cloud
    /// revoked, or refuses as expired beyond its grace window).
    pub rejoin: bool,
}

impl EdgeConfig {
    pub fn new(node_name: &str, cloud: SocketAddr, data_dir: PathBuf) -> Self {
        EdgeConfig {
            node_name: node_name.to_owned(),
            cloud,
            cloud_alternates: Vec::new(),
            token: None,
            data_dir,
            metaserver_listen: "127.0.0.1:10550".parse().expect("address"),
            runtime: RuntimeKind::Process,
            cri_endpoint: DEFAULT_CRI_ENDPOINT.to_owned(),
            node_status: node::NodeStatusConfig::default(),
            image_gc: edged::image_gc::ImageGcPolicy::default(),
            log_rotation: edged::logs::LogRotation::default(),
            service_bus_apps: Vec::new(),
            service_bus_timeout: Duration::from_secs(10),
            eventbus: eventbus::EventBusConfig::default(),
            dmi: None,
            link_keepalive: transport::LinkConfig::default().heartbeat,
            rejoin: false,
        }
    }
}

/// A running edgecore.
pub struct EdgeCore {
    pub meta: Arc<MetaManager>,
    pub metaserver_addr: SocketAddr,
    /// The embedded MQTT broker's address, when edgecore runs one.
    pub mqtt_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    edged: JoinHandle<()>,
    /// Every long-running task, by name. None ends before shutdown: one that does is a
    /// failure ([`EdgeCore::failed`]).
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl EdgeCore {
    pub async fn start(config: EdgeConfig) -> anyhow::Result<EdgeCore> {
        if !config.metaserver_listen.ip().is_loopback() {
            bail!(
                "--metaserver-listen {}: MetaServer serves the node's cache without \
                 authentication and listens on loopback only",
                config.metaserver_listen
            );
        }
        let credentials = identity::load_or_join(
            &config.data_dir,
            &config.node_name,
            &std::iter::once(config.cloud)
                .chain(config.cloud_alternates.iter().copied())
                .collect::<Vec<_>>(),
            config.token.as_deref(),
            config.rejoin,
        )
        .await?;
        let meta = MetaManager::open(&config.data_dir.join("store"), &config.node_name)
            .with_context(|| {
                format!(
                    "cannot open the cache in {} (is another edgecore using it?)",
                    config.data_dir.display()
                )
            })?;
        let listener = tokio::net::TcpListener::bind(config.metaserver_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for MetaServer",
                    config.metaserver_listen
                )
            })?;
        let metaserver_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();

        let policy = Arc::new(metaserver::EdgePolicy { meta: meta.clone() });
        let edgestream = Arc::new(edgestream::EdgeStream::new(
            meta.clone(),
            config.data_dir.join("pods"),
        ));
        // Container logs and exec are served on the node itself (offline too); everything else
        // by the shared API over the cache.
        let router = axum::Router::new()
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}/log",
                axum::routing::get(edgestream::http_log),
            )
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}/exec",
                axum::routing::get(edgestream::http_exec).post(edgestream::http_exec),
            )
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}/attach",
                axum::routing::get(edgestream::http_attach).post(edgestream::http_attach),
            )
            .merge(usage::routes())
            .route(
                "/api/v1/namespaces/{namespace}/pods/{name}/portforward",
                axum::routing::get(portforward::http_portforward)
                    .post(portforward::http_portforward_spdy),
            )
            .with_state(edgestream.clone())
            .merge(ApiServer::new(meta.store().clone(), policy).router().layer(
                axum::middleware::from_fn_with_state(meta.clone(), metaserver::forward_to_cloud),
            ));
        tasks.push((
            "usage sampler",
            tokio::spawn(edgestream.usage.clone().run(shutdown.clone())),
        ));
        let stop = shutdown.clone();
        tasks.push((
            "MetaServer",
            tokio::spawn(async move {
                // Bounded like the cloud's API: header and body timeouts, 413 beyond the
                // API's body limit, a connection cap (pods' watches are one each).
                let limits = replication::http_server::HttpLimits {
                    max_body_bytes: replication::api::MAX_BODY_BYTES,
                    max_connections: METASERVER_MAX_CONNECTIONS,
                    ..Default::default()
                };
                replication::http_server::serve(listener, router, limits, None, async move {
                    stop.cancelled().await
                })
                .await;
            }),
        ));

        let mut client = transport::ClientConfig::new(config.cloud, identity::CLOUD_SERVER_NAME);
        client.alternates = config.cloud_alternates.clone();
        client.link.heartbeat = config.link_keepalive;
        // The streams the cloud may have open to this node at once: every `kubectl logs -f`,
        // exec or attach session and port-forward connection is one (the cloud caps them per
        // node below this, `cloudcore --streams-per-node`), besides ServiceBus calls. What they
        // buffer is bounded by the connection's receive window, not by their number.
        client.link.max_concurrent_requests = STREAMS_FROM_CLOUD;
        let cell =
            transport::Credentials::trusting(credentials.cas.clone(), credentials.identity.clone());
        let link = transport::connect_with(client, cell.clone())
            .context("starting the link to the cloud")?;
        tasks.push((
            "trust bundle",
            tokio::spawn(identity::run_trust_sync(
                config.data_dir.clone(),
                config.node_name.clone(),
                cell.clone(),
                link.handle().clone(),
                shutdown.clone(),
            )),
        ));
        tasks.push((
            "certificate rotation",
            tokio::spawn(identity::run_rotation(
                config.data_dir.clone(),
                config.node_name.clone(),
                config.cloud,
                cell,
                link.handle().clone(),
                shutdown.clone(),
            )),
        ));
        meta.set_link(link.handle().clone());
        let link_handle = link.handle().clone();
        let bus = Arc::new(servicebus::ServiceBus::new(
            config.service_bus_apps.clone(),
            config.service_bus_timeout,
        ));
        tasks.push((
            "EdgeHub",
            tokio::spawn(hub::run(
                link,
                meta.clone(),
                bus,
                edgestream,
                shutdown.clone(),
            )),
        ));

        let dmi_reports = match &config.dmi {
            Some(dmi) => Some(dmi::start(meta.clone(), dmi.clone(), shutdown.clone()).await?),
            None => None,
        };
        let mqtt_addr = eventbus::start(
            meta.clone(),
            config.eventbus.clone(),
            dmi_reports,
            shutdown.clone(),
        )
        .await?;

        let mut status_config = config.node_status.clone();
        status_config.storage_path = Some(config.data_dir.clone());
        let runtime: Arc<dyn edged::Runtime> = match config.runtime {
            RuntimeKind::Process => {
                // Kills what an earlier edgecore on this data dir left running before any
                // pod starts (it may wait a few seconds for them to die).
                let pods_dir = config.data_dir.join("pods");
                let runtime = tokio::task::spawn_blocking(move || {
                    edged::process::ProcessRuntime::open(&pods_dir)
                })
                .await
                .context("opening the process runtime")?;
                Arc::new(runtime)
            }
            RuntimeKind::Hollow => {
                status_config.runtime = "kedge-hollow://0.1".into();
                Arc::new(edged::hollow::HollowRuntime::default())
            }
            RuntimeKind::Cri => {
                let runtime = edged::cri::CriRuntime::open(
                    &config.cri_endpoint,
                    &config.data_dir.join("pods"),
                )
                .await?;
                status_config.runtime = runtime.runtime_version().to_owned();
                config.image_gc.validate().map_err(anyhow::Error::msg)?;
                let (images, listed) = tokio::sync::watch::channel(serde_json::Value::Null);
                status_config.images = Some(listed);
                tasks.push((
                    "image GC",
                    tokio::spawn(edged::image_gc::run(
                        runtime.client().clone(),
                        config.image_gc,
                        images,
                        shutdown.clone(),
                    )),
                ));
                Arc::new(runtime)
            }
        };
        tasks.push((
            "node status",
            tokio::spawn(node::run(
                meta.clone(),
                link_handle,
                status_config,
                shutdown.clone(),
            )),
        ));
        let edged = edged::Edged::new(meta.clone(), runtime, config.data_dir.join("pods"))
            .with_log_rotation(config.log_rotation);
        let edged = tokio::spawn(edged.run(shutdown.clone(), Duration::from_secs(10)));
        tracing::info!(node = %config.node_name, %metaserver_addr, mqtt = ?mqtt_addr, cloud = %config.cloud, "edgecore started");
        Ok(EdgeCore {
            meta,
            metaserver_addr,
            mqtt_addr,
            shutdown,
            edged,
            tasks,
        })
    }

    /// Waits until one of edgecore's tasks (Edged included) ends on its own, which none
    /// should before shutdown, and says which and why. The binary exits non-zero on it (its
    /// supervisor restarts it; the pods keep running and are adopted again) rather than run on
    /// with a part missing.
    pub async fn failed(&mut self) -> String {
        let handles = std::iter::once(&mut self.edged).chain(self.tasks.iter_mut().map(|(_, h)| h));
        let (result, index, _) = futures_util::future::select_all(handles).await;
        let name = match index {
            0 => "Edged",
            i => self.tasks[i - 1].0,
        };
        match result {
            Ok(()) => format!("{name} stopped"),
            Err(e) if e.is_panic() => format!("{name} panicked"),
            Err(e) => format!("{name} ended: {e}"),
        }
    }

    /// Stops pods (SIGTERM, at most 10 s; the CRI runtime's containers keep running for the
    /// next edgecore, as kubelet's do), the link and MetaServer, and flushes the cache.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if !self.edged.is_finished() {
            let _ = self.edged.await;
        }
        for (_, task) in &self.tasks {
            task.abort();
        }
        for (_, task) in self.tasks {
            let _ = task.await;
        }
        if let Err(e) = self.meta.store().flush() {
            tracing::warn!(error = %e, "flushing the cache at shutdown");
        }
    }
}
