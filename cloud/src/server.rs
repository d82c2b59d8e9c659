//! cloudcore as a whole: opens the state, starts the API server, the metrics endpoint, the
//! scheduler, the node lifecycle and the workload controllers, and stops them on shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use replication::api::ApiServer;
use replication::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::{ClusterSource, Embedded, KubeCluster};
use crate::metrics::Metrics;
use crate::policy::{CloudPolicy, ConnectedNodes};

#[derive(Debug, Clone)]
pub struct CloudConfig {
    pub data_dir: PathBuf,
    pub quic_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub kubeconfig: Option<PathBuf>,
    /// A node without a lease renewal for this long is NotReady.
    pub node_grace: Duration,
    /// Evict pods from unreachable nodes this long after the taint (`None`: never; see
    /// [`crate::lifecycle`]).
    pub pod_eviction: Option<Duration>,
    /// Changes kept for watch resume.
    pub watch_history: usize,
    /// Serve the API over HTTPS (always, off loopback).
    pub api_tls: bool,
    /// A file holding the bearer token every API request must carry (required off loopback).
    pub api_token_file: Option<PathBuf>,
    /// Extra names (DNS or IP) for the API's certificate.
    pub api_names: Vec<String>,
    /// QUIC keepalive of node connections; a connection silent for twice this is dead.
    pub link_keepalive: Duration,
    /// How long a ServiceBus call waits for the node (then 504).
    pub service_bus_timeout: Duration,
    /// Streams (logs, exec, attach, port-forward connections) open at once per node through
    /// the cloud; more are refused with 429 ([`crate::cloudstream`]).
    pub streams_per_node: usize,
    /// Exec, attach and port-forward sessions with no traffic for this long are closed
    /// (kubelet's `--streaming-connection-idle-timeout`).
    pub stream_idle_timeout: Duration,
    /// Validity of the node certificates issued at join and renewal.
    pub node_cert_lifetime: Duration,
    /// How long after expiry a node certificate may still renew itself (and do nothing else).
    pub node_cert_grace: Duration,
    /// Join attempts a minute per source address (0: no limit).
    pub join_rate_limit: u32,
    /// Timeouts, body and connection limits of the API's HTTP server.
    pub http_limits: replication::http_server::HttpLimits,
    /// Also copy each accepted DeviceStatus report into its Device's `status`, for clients
    /// that read it there (before KubeEdge v1.23); see [`crate::devicecontroller`].
    pub device_status_in_device: bool,
    /// Where API writes are recorded ([`crate::audit`]); `None`: nowhere.
    pub audit_log: Option<PathBuf>,
    /// The audit log's size before it is rotated to `FILE.1`.
    pub audit_log_max_bytes: u64,
    /// Keep the objects in etcd, shared with other cloudcores (`--store etcd`); `None`: in
    /// this process's RocksDB store under the data dir.
    pub etcd: Option<crate::etcd::EtcdConfig>,
    /// Run the scheduler, node lifecycle and controllers only while holding the leader Lease
    /// ([`crate::leader`]); `None`: always (one cloudcore on its own store).
    pub leader_election: Option<crate::leader::LeaderConfig>,
    /// This replica's API as other replicas reach it (forwarded streams of the nodes it
    /// holds); default: from `api_listen` (an unspecified address as 127.0.0.1).
    pub api_advertise_url: Option<String>,
    /// With `kubeconfig`: where the kubelet-compatible endpoint listens
    /// ([`crate::kubelet_server`]); `None`: nowhere.
    pub kubelet_listen: Option<SocketAddr>,
    /// The address written as each edge Node's `InternalIP` (how the cluster reaches the
    /// kubelet endpoint); default: from `kubelet_listen`.
    pub kubelet_address: Option<std::net::IpAddr>,
    /// The CA bundle (PEM) of the kubelet endpoint's clients; default: the kubeconfig's CA.
    pub kubelet_client_ca: Option<PathBuf>,
}

impl CloudConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        CloudConfig {
            data_dir,
            quic_listen: "0.0.0.0:10001".parse().expect("address"),
            api_listen: "127.0.0.1:6080".parse().expect("address"),
            metrics_listen: "127.0.0.1:9091".parse().expect("address"),
            kubeconfig: None,
            node_grace: Duration::from_secs(40),
            pod_eviction: None,
            watch_history: 10_000,
            api_tls: false,
            api_token_file: None,
            api_names: Vec::new(),
            link_keepalive: transport::LinkConfig::default().heartbeat,
            service_bus_timeout: crate::servicebus::DEFAULT_TIMEOUT,
            streams_per_node: crate::cloudstream::DEFAULT_STREAMS_PER_NODE,
            stream_idle_timeout: crate::cloudstream::DEFAULT_STREAM_IDLE_TIMEOUT,
            node_cert_lifetime: crate::credentials::DEFAULT_LIFETIME,
            node_cert_grace: crate::credentials::DEFAULT_GRACE,
            join_rate_limit: crate::join::DEFAULT_JOIN_RATE,
            http_limits: api_http_limits(),
            device_status_in_device: false,
            audit_log: None,
            audit_log_max_bytes: crate::audit::DEFAULT_MAX_BYTES,
            etcd: None,
            leader_election: None,
            api_advertise_url: None,
            kubelet_listen: None,
            kubelet_address: None,
            kubelet_client_ca: None,
        }
    }
}

/// The kubelet endpoint's listener, TLS and what edge Nodes say of it; `None` (with a
/// warning) when no CA for its clients is known.
async fn kubelet_endpoint_parts(
    config: &CloudConfig,
    listen: SocketAddr,
    cluster: &KubeCluster,
) -> anyhow::Result<
    Option<(
        TcpListener,
        Arc<rustls::ServerConfig>,
        crate::kubelet_server::NodeEndpoint,
    )>,
> {
    let cas = match &config.kubelet_client_ca {
        Some(path) => crate::kubelet_server::read_cas(path)
            .with_context(|| format!("--kubelet-client-ca {}", path.display()))?,
        None => cluster.cluster_cas(),
    };
    if cas.is_empty() {
        tracing::warn!(
            "no kubelet endpoint: the kubeconfig names no CA for kube-apiserver's client \
             certificates (--kubelet-client-ca FILE); kubectl logs/exec through the cluster \
             will not reach edge pods"
        );
        return Ok(None);
    }
    let listener = bind(listen, "kubelet endpoint").await?;
    let port = listener.local_addr()?.port();
    let address = config
        .kubelet_address
        .unwrap_or_else(|| crate::kubelet_server::default_address(listen));
    let ca = crate::pki::load_or_create_ca(&config.data_dir)?;
    let mut names = vec![address.to_string(), "localhost".to_owned()];
    names.extend(config.api_names.iter().cloned());
    let identity = ca
        .issue_server(&names, Duration::from_secs(365 * 24 * 3600))
        .context("issuing the kubelet endpoint's certificate")?;
    let tls = crate::kubelet_server::tls_config(&identity, &cas)?;
    Ok(Some((
        listener,
        tls,
        crate::kubelet_server::NodeEndpoint { address, port },
    )))
}

/// The API server's default bounds: request bodies up to the larger of the API's and
/// ServiceBus's limits, 30 s for headers and between body frames, 4096 connections.
pub fn api_http_limits() -> replication::http_server::HttpLimits {
    replication::http_server::HttpLimits {
        max_body_bytes: replication::api::MAX_BODY_BYTES.max(crate::servicebus::MAX_REQUEST_BYTES),
        ..Default::default()
    }
}

/// A running cloudcore.
pub struct CloudCore {
    pub store: Arc<Store>,
    /// HTTP requests to applications on the nodes ([`crate::servicebus`]).
    pub bus: Arc<crate::servicebus::ServiceBus>,
    pub metrics: Arc<Metrics>,
    pub connected: Arc<ConnectedNodes>,
    pub api_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    /// Every long-running task, by name. None ends before shutdown: one that does is a
    /// failure ([`CloudCore::failed`]).
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    shutdown: CancellationToken,
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

impl CloudCore {
    pub async fn start(config: CloudConfig) -> anyhow::Result<CloudCore> {
        let off_loopback = !config.api_listen.ip().is_loopback();
        if off_loopback && config.api_token_file.is_none() {
            bail!(
                "--api-listen {}: off loopback the API requires a bearer token \
                 (--api-token-file FILE); it is then served over HTTPS with a certificate from \
                 the cluster CA (DATA_DIR/pki/ca.crt)",
                config.api_listen
            );
        }
        let api_token = match &config.api_token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the API token file {}", path.display()))?
                    .trim()
                    .to_owned();
                if token.len() < 16 {
                    bail!(
                        "the API token in {} is shorter than 16 characters",
                        path.display()
                    );
                }
                Some(token)
            }
            None => None,
        };
        let api_tls = config.api_tls || off_loopback;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
        // The cluster CA exists before anything is served: a `cloudcore token create` run as
        // soon as the API answers pins this CA, not one of its own.
        // With a real cluster, the CA and tokens are shared through its Secrets, so several
        // cloudcores can serve one fleet (as KubeEdge's casecret and tokensecret).
        let kube_cluster = match &config.kubeconfig {
            Some(path) => Some(Arc::new(KubeCluster::connect(path).await?)),
            None => None,
        };
        if let Some(etcd) = &config.etcd {
            let pki = crate::shared_pki::EtcdPki::connect(etcd, true).await?;
            crate::shared_pki::share_ca(&pki, &config.data_dir).await?;
        }
        if let Some(cluster) = &kube_cluster {
            let pki = crate::cluster_secrets::ClusterPki::new(cluster.client());
            crate::shared_pki::share_ca(&pki, &config.data_dir).await?;
        }
        crate::pki::load_or_create_ca(&config.data_dir)?;
        let mut tasks = Vec::new();
        let mut tokens = match &kube_cluster {
            Some(cluster) => crate::pki::Tokens::Cluster {
                files: config.data_dir.clone(),
                cluster: Arc::new(crate::cluster_secrets::ClusterTokens::new(cluster.client())),
            },
            None => crate::pki::Tokens::Files(config.data_dir.clone()),
        };
        let store = match &config.etcd {
            Some(etcd) => {
                let (store, follower, shared_tokens) =
                    crate::etcd::open_store(etcd, &config.data_dir, config.watch_history)
                        .await
                        .with_context(|| {
                            format!(
                                "cannot open the etcd store (cache in {})",
                                config.data_dir.display()
                            )
                        })?;
                crate::embedded::seed_namespaces(&store).context("creating the namespaces")?;
                tasks.push(("etcd watch", follower));
                tokens = crate::pki::Tokens::Etcd(shared_tokens);
                store
            }
            None => crate::embedded::open_store(&config.data_dir, config.watch_history)
                .with_context(|| {
                    format!(
                        "cannot open the store in {} (is another cloudcore using it?)",
                        config.data_dir.display()
                    )
                })?,
        };
        let mut kubelet_endpoint = None;
        let cluster_records = kube_cluster.as_ref().map(|cluster| {
            Arc::new(crate::cluster_secrets::ClusterNodeRecords::new(
                cluster.client(),
            ))
        });
        let source: Arc<dyn ClusterSource> = match kube_cluster {
            Some(cluster) => {
                if let Some(listen) = config.kubelet_listen {
                    kubelet_endpoint = kubelet_endpoint_parts(&config, listen, &cluster).await?;
                    if let Some((_, _, endpoint)) = &kubelet_endpoint {
                        cluster.set_kubelet_endpoint(*endpoint);
                    }
                }
                cluster
            }
            None => Arc::new(Embedded),
        };
        let metrics = Arc::new(Metrics::new());
        let connected = Arc::new(ConnectedNodes::default());
        let policy = Arc::new(CloudPolicy {
            metrics: metrics.clone(),
            connected: connected.clone(),
            mirror_of: (!source.accepts_api_writes()).then(|| source.describe()),
        });

        let api_listener = bind(config.api_listen, "API server").await?;
        let metrics_listener = bind(config.metrics_listen, "metrics endpoint").await?;
        let api_addr = api_listener.local_addr()?;
        let metrics_addr = metrics_listener.local_addr()?;
        // The API's address for the `kubernetes` Endpoints: the advertised URL's, when it names
        // an IP, else the listener's.
        let api_endpoint = config
            .api_advertise_url
            .as_deref()
            .and_then(|url| url.split_once("://"))
            .and_then(|(_, rest)| rest.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| crate::embedded::endpoint_address(api_addr));

        if source.accepts_api_writes() {
            let shared = config.leader_election.is_some();
            crate::embedded::ensure_kubernetes_service(&store, api_endpoint, shared)
                .context("writing the kubernetes Service")?;
        }
        // `kubectl explain` of the built-in kinds (k8s-openapi's schemas, built once).
        replication::api::discovery::set_builtin_schemas(crate::openapi::builtin_schemas());
        let mut api = ApiServer::new(store.clone(), policy.clone());
        // One registry of custom resources for both (it follows the store's CRDs).
        let controllers_api = ApiServer::new(store.clone(), policy)
            .with_registry(api.registry().clone())
            .router();
        let token: Option<Arc<str>> = api_token.map(Into::into);
        if let Some(token) = &token {
            api = api.with_bearer_token(token.clone());
        }
        let bus = Arc::new(crate::servicebus::ServiceBus::new(
            config.service_bus_timeout,
        ));
        let audit = match &config.audit_log {
            Some(path) => Some(Arc::new(
                crate::audit::AuditLog::open(path, config.audit_log_max_bytes)
                    .with_context(|| format!("cannot open the audit log {}", path.display()))?,
            )),
            None => None,
        };
        let streams = crate::cloudstream::StreamState::new(
            store.clone(),
            bus.clone(),
            token.clone(),
            config.streams_per_node,
            config.stream_idle_timeout,
        );
        if let Some((listener, tls, endpoint)) = kubelet_endpoint {
            tracing::info!(listen = ?listener.local_addr().ok(), address = %endpoint.address, "kubelet endpoint for the cluster's kube-apiserver");
            tasks.push((
                "kubelet endpoint",
                tokio::spawn(replication::http_server::serve(
                    listener,
                    crate::kubelet_server::router(streams.clone()),
                    config.http_limits.clone(),
                    Some(tokio_rustls::TlsAcceptor::from(tls)),
                    std::future::pending(),
                )),
            ));
        }
        // Several replicas: streams and calls for nodes held by another go there.
        // Several replicas (on etcd, or on one real cluster): each claims its nodes' links.
        let identity = match (&config.leader_election, &config.kubeconfig) {
            (Some(leader), _) => Some(leader.identity.clone()),
            (None, Some(_)) => Some(crate::leader::LeaderConfig::new().identity),
            (None, None) => None,
        };
        let replica = identity.map(|identity| {
            let scheme = if api_tls { "https" } else { "http" };
            let host = if api_addr.ip().is_unspecified() {
                std::net::SocketAddr::new([127, 0, 0, 1].into(), api_addr.port())
            } else {
                api_addr
            };
            crate::linkclaim::Replica {
                identity,
                api_url: config
                    .api_advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("{scheme}://{host}")),
            }
        });
        let forwarder = match &replica {
            Some(replica) => {
                let ca = crate::pki::load_or_create_ca(&config.data_dir)?;
                Some(crate::forward::Forwarder {
                    store: store.clone(),
                    connected: connected.clone(),
                    replica: replica.identity.clone(),
                    tls: Some(crate::api_tls::replica_connector(ca.cert())?),
                })
            }
            None => None,
        };
        let router = crate::servicebus::router(bus.clone(), token.clone())
            .merge(crate::cloudstream::router(streams.clone()))
            .merge(crate::top::router(
                store.clone(),
                bus.clone(),
                token,
                forwarder.clone(),
            ))
            .merge(api.router());
        let router = match forwarder {
            Some(forwarder) => router.layer(axum::middleware::from_fn_with_state(
                forwarder,
                crate::forward::middleware,
            )),
            None => router,
        };
        let router = match &audit {
            Some(log) => router.layer(axum::middleware::from_fn_with_state(
                crate::audit::Auditor {
                    log: log.clone(),
                    user: replication::api::auth::USERNAME.into(),
                },
                crate::audit::middleware,
            )),
            None => router,
        };
        if api_tls {
            let ca = crate::pki::load_or_create_ca(&config.data_dir)?;
            let mut names = vec![
                crate::pki::SERVER_NAME.to_owned(),
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
            ];
            if !config.api_listen.ip().is_unspecified() {
                names.push(config.api_listen.ip().to_string());
            }
            names.extend(config.api_names.iter().cloned());
            let identity = ca
                .issue_server(&names, Duration::from_secs(365 * 24 * 3600))
                .context("issuing the API's certificate")?;
            let tls = crate::api_tls::server_config(&identity)?;
            tasks.push((
                "API server",
                tokio::spawn(replication::http_server::serve(
                    api_listener,
                    router,
                    config.http_limits.clone(),
                    Some(tokio_rustls::TlsAcceptor::from(tls)),
                    std::future::pending(),
                )),
            ));
        } else {
            tasks.push((
                "API server",
                tokio::spawn(replication::http_server::serve(
                    api_listener,
                    router,
                    config.http_limits.clone(),
                    None,
                    std::future::pending(),
                )),
            ));
        }
        let metrics_router = {
            let metrics = metrics.clone();
            axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics.encode(),
                        )
                    }
                }),
            )
        };
        tasks.push((
            "metrics endpoint",
            tokio::spawn(async move {
                let limits = replication::http_server::HttpLimits {
                    max_connections: 64,
                    max_body_bytes: 0,
                    ..Default::default()
                };
                replication::http_server::serve(
                    metrics_listener,
                    metrics_router,
                    limits,
                    None,
                    std::future::pending(),
                )
                .await;
            }),
        ));
        let ca = crate::pki::load_or_create_ca(&config.data_dir)?;
        let identity = crate::pki::server_identity(&ca)?;
        let mut quic_config = transport::ServerConfig::new(config.quic_listen);
        quic_config.reset_key = Some(crate::pki::load_or_create_reset_key(&config.data_dir)?);
        quic_config.link.heartbeat = config.link_keepalive;
        let trust = crate::pki::trust_bundle(&config.data_dir)?;
        // During a CA rollover node certificates of the other CA are trusted too.
        quic_config.other_client_cas = trust[1..].to_vec();
        if trust.len() > 1 {
            tracing::info!(phase = ?crate::pki::rollover(&config.data_dir), "CA rollover under way: nodes are sent both CAs");
        }
        let ca = Arc::new(ca);
        let mut credentials = crate::credentials::NodeCredentials::new(
            &config.data_dir,
            store.clone(),
            ca.clone(),
            config.node_cert_lifetime,
            config.node_cert_grace,
            metrics.clone(),
        )
        .with_trust(trust);
        if let Some(records) = cluster_records {
            credentials = credentials.with_cluster(records);
        }
        let credentials = Arc::new(credentials);
        let join = Arc::new(crate::join::CloudJoin {
            tokens: tokens.clone(),
            store: store.clone(),
            credentials: credentials.clone(),
            metrics: metrics.clone(),
            rate: std::sync::Mutex::new(crate::join::JoinRateLimit::new(config.join_rate_limit)),
        });
        let quic = transport::Server::bind_with_policy(
            quic_config,
            ca.cert(),
            &identity,
            Some(join),
            Some(credentials.clone()),
        )
        .with_context(|| {
            format!(
                "cannot listen on {} for edge nodes (QUIC)",
                config.quic_listen
            )
        })?;
        let quic_addr = quic.local_addr()?;
        let shutdown = CancellationToken::new();
        let hub = crate::hub::run(
            store.clone(),
            quic,
            metrics.clone(),
            connected.clone(),
            bus.clone(),
            credentials,
            audit,
            config.device_status_in_device,
            replica,
            shutdown.clone(),
        );
        tasks.push((
            "CloudHub",
            tokio::spawn(async move {
                if let Err(e) = hub.await {
                    tracing::error!(error = format!("{e:#}"), "CloudHub stopped");
                }
            }),
        ));
        if source.runs_controllers() {
            let singletons = {
                let store = store.clone();
                let metrics = metrics.clone();
                let (grace, eviction) = (config.node_grace, config.pod_eviction);
                let leader_election = config
                    .leader_election
                    .clone()
                    .filter(|_| source.accepts_api_writes());
                move || {
                    let mut tasks = vec![
                        (
                            "scheduler",
                            tokio::spawn(crate::scheduler::run(store.clone())),
                        ),
                        (
                            "node lifecycle",
                            tokio::spawn(crate::lifecycle::run(
                                store.clone(),
                                grace,
                                eviction,
                                Duration::from_secs(5),
                                metrics.clone(),
                            )),
                        ),
                        (
                            "event expiry",
                            tokio::spawn(crate::events::run_ttl(
                                store.clone(),
                                crate::events::EVENT_TTL,
                            )),
                        ),
                    ];
                    if let Some(leader) = &leader_election {
                        tasks.push((
                            "kubernetes endpoints",
                            tokio::spawn(crate::apiserver_identity::run_endpoints(
                                store.clone(),
                                leader.retry_period,
                            )),
                        ));
                    }
                    for task in crate::controllers::start(store.clone(), controllers_api.clone()) {
                        tasks.push(("controller", task));
                    }
                    tasks
                }
            };
            match &config.leader_election {
                // Several replicas on one store: the singletons run where the Lease is, and each
                // replica keeps its identity Lease for the `kubernetes` Endpoints.
                Some(leader) => tasks.extend([
                    (
                        "apiserver identity",
                        tokio::spawn(crate::apiserver_identity::run_identity(
                            store.clone(),
                            crate::apiserver_identity::Identity {
                                holder: leader.identity.clone(),
                                endpoint: api_endpoint,
                                lease_duration: leader.lease_duration,
                            },
                            shutdown.clone(),
                        )),
                    ),
                    (
                        "leader election",
                        tokio::spawn(crate::leader::run(
                            store.clone(),
                            leader.clone(),
                            singletons,
                            shutdown.clone(),
                        )),
                    ),
                ]),
                None => tasks.extend(singletons()),
            }
        }
        for task in source.clone().start(store.clone()) {
            tasks.push(("cluster source", task));
        }
        tracing::info!(%api_addr, %metrics_addr, %quic_addr, data_dir = %config.data_dir.display(), source = %source.describe(), "cloudcore started");
        Ok(CloudCore {
            store,
            bus,
            metrics,
            connected,
            api_addr,
            metrics_addr,
            quic_addr,
            tasks,
            shutdown,
        })
    }

    /// Waits until one of cloudcore's tasks ends on its own, which none should before
    /// shutdown, and says which and why (it returned, or panicked). The binary exits
    /// non-zero on it rather than run on with a part missing.
    pub async fn failed(&mut self) -> String {
        let handles = self.tasks.iter_mut().map(|(_, handle)| handle);
        let (result, index, _) = futures_util::future::select_all(handles).await;
        let name = self.tasks[index].0;
        match result {
            Ok(()) => format!("{name} stopped"),
            Err(e) if e.is_panic() => format!("{name} panicked"),
            Err(e) => format!("{name} ended: {e}"),
        }
    }

    /// Stops every task and flushes the store.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        // The leader gives its Lease up first, so another replica takes over at once, and the
        // replica's identity Lease goes, so the leader drops it from the Endpoints.
        for name in ["leader election", "apiserver identity"] {
            if let Some(at) = self.tasks.iter().position(|(n, _)| *n == name) {
                let (_, task) = self.tasks.swap_remove(at);
                let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
            }
        }
        for (_, task) in &self.tasks {
            task.abort();
        }
        for (_, task) in self.tasks {
            let _ = task.await;
        }
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "flushing the store at shutdown");
        }
    }
}
