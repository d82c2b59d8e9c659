//! `cloudcore`: see `cloudcore --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cloud::server::{CloudConfig, CloudCore};

// `--features system-allocator`: the C library's malloc, which heap profilers (heaptrack,
// valgrind's dhat) see; mimalloc's own segments are invisible to them.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cloudcore",
    version,
    about = "kedge's cloud side: an embedded Kubernetes-compatible API server, EdgeController and CloudHub"
)]
struct Cli {
    /// Where the store, the CA and the tokens live.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log lines as `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, global = true, default_value = "text")]
    log_format: transport::logging::LogFormat,
    /// QUIC address edge nodes connect to.
    #[arg(long, default_value = "0.0.0.0:10001")]
    quic_listen: SocketAddr,
    /// Kubernetes API address. Off loopback it needs --api-token-file and is served over HTTPS.
    #[arg(long, default_value = "127.0.0.1:6080")]
    api_listen: SocketAddr,
    /// Serve the API over HTTPS on loopback too (a certificate from the cluster CA).
    #[arg(long)]
    api_tls: bool,
    /// A file with the bearer token every API request must carry (`Authorization: Bearer`).
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Another DNS name or IP address for the API's certificate (repeatable).
    #[arg(long = "api-name")]
    api_names: Vec<String>,
    /// Prometheus metrics address.
    #[arg(long, default_value = "127.0.0.1:9091")]
    metrics_listen: SocketAddr,
    /// Use a real cluster (this kubeconfig's current context) as the source instead of the
    /// embedded API server: its objects are mirrored for the nodes, node state is written back
    /// to it, and the local API becomes a read-only view. The cluster CA and bootstrap tokens
    /// live in its Secrets (kube-system/kedge-ca, kube-system/kedge-token-ID), so several
    /// cloudcores can serve one fleet; with `token` and `ca` it selects them.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// With --kubeconfig: where the kubelet-compatible endpoint listens (HTTPS): the cluster's
    /// kube-apiserver reaches edge pods there for logs, exec, attach and port-forward. Its
    /// port, and --kubelet-address as InternalIP, are written into each edge Node's status.
    /// "off": none.
    #[arg(long, default_value = "0.0.0.0:10351", value_parser = parse_optional_addr)]
    kubelet_listen: OptionalAddr,
    /// With --kubeconfig: cloudcore's address as the cluster reaches it (each edge Node's
    /// InternalIP); default: the address of --kubelet-listen, or 127.0.0.1 when that is 0.0.0.0.
    #[arg(long)]
    kubelet_address: Option<std::net::IpAddr>,
    /// With --kubeconfig: the CA bundle (PEM) whose client certificates may use the kubelet
    /// endpoint (kube-apiserver's --kubelet-client-certificate); default: the kubeconfig's CA.
    #[arg(long)]
    kubelet_client_ca: Option<PathBuf>,
    /// A node without a lease renewal for this long is NotReady (e.g. 40s); a node whose Lease
    /// holds longer (it beats less often: four of its heartbeat periods) gets its Lease's
    /// duration instead.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    node_grace: Duration,
    /// Evict pods from a node this long after it became unreachable (its
    /// `node.kubernetes.io/unreachable:NoExecute` taint), unless they tolerate the taint (then
    /// after their `tolerationSeconds`). Off by default: an edge node keeps its pods while it is
    /// offline. E.g. `5m` (Kubernetes' default toleration).
    #[arg(long, value_parser = humantime::parse_duration)]
    evict_pods_from_unreachable_nodes_after: Option<Duration>,
    /// QUIC keepalive of node connections: a connection silent for twice this is closed (the
    /// node's link resumes its session when it reconnects).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    link_keepalive: Duration,
    /// How long a ServiceBus call (`/servicebus/NODE/APP/...`) waits for the node: a hung node
    /// is a 504 after this, a node whose link is down a 503 at once.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    service_bus_timeout: Duration,
    /// Streams open at once per node through the cloud (kubectl logs -f, exec, attach, and each
    /// port-forward connection); more are refused with 429 Too Many Requests.
    #[arg(long, default_value_t = cloud::cloudstream::DEFAULT_STREAMS_PER_NODE)]
    streams_per_node: usize,
    /// Exec, attach and port-forward sessions with no traffic either way for this long are
    /// closed (kubelet's --streaming-connection-idle-timeout).
    #[arg(long, default_value = "4h", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// Validity of the node certificates issued at join and renewal (e.g. 90d, 12h). Nodes
    /// renew theirs over the link at two thirds of it.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    node_cert_lifetime: Duration,
    /// How long after its expiry a node certificate may still renew itself (and do nothing
    /// else): a node offline past its expiry comes back by itself within this window; beyond
    /// it, it must re-join with a new bootstrap token.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    node_cert_grace: Duration,
    /// Join attempts a minute per source address (a burst of as many); more are refused with
    /// "429 Too Many Requests". 0: no limit.
    #[arg(long, default_value_t = cloud::join::DEFAULT_JOIN_RATE)]
    join_rate_limit: u32,
    /// Also copy each device report into the Device's status (for clients written before
    /// KubeEdge v1.23 split it into the DeviceStatus resource). Each copy changes the Device,
    /// which then goes down to its node again.
    #[arg(long)]
    device_status_in_device: bool,
    /// Record every API write (clients' and nodes' forwarded ones) in this file, one
    /// Kubernetes audit event (audit.k8s.io/v1, level Metadata) a line.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Size of the audit log before it is renamed to FILE.1 (replacing the previous one) and
    /// a new one started (bytes, or with K, M, G).
    #[arg(long, default_value = "100M", value_parser = cloud::audit::parse_size)]
    audit_log_max_size: u64,
    /// Time an API client has to send a request's headers; a slower one is disconnected.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    http_header_timeout: Duration,
    /// Longest pause within an API request's body before the request fails.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    http_body_timeout: Duration,
    /// API connections served at once; more wait until one closes.
    #[arg(long, default_value_t = 4096)]
    http_max_connections: usize,
    /// Changes kept in memory for watches that resume from a resourceVersion; older ones get 410.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    #[command(flatten)]
    storage: StorageArgs,
    /// With --store etcd: how long the leader Lease (kube-system/kedge-cloudcore) of the
    /// scheduler, node lifecycle and controllers counts as held without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    leader_elect_lease_duration: Duration,
    /// With --store etcd: the leader stops its singletons when it could not renew for this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    leader_elect_renew_deadline: Duration,
    /// With --store etcd: this cloudcore's API URL as the other replicas reach it (they forward
    /// `kubectl logs|exec|port-forward|top node` for the nodes connected here); default: from
    /// --api-listen.
    #[arg(long)]
    api_advertise_url: Option<String>,
    /// With --store etcd: time between attempts to take or renew the leader Lease.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    leader_elect_retry_period: Duration,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where the objects live: this cloudcore's RocksDB store, or etcd shared by several.
#[derive(clap::Args)]
struct StorageArgs {
    /// `rocksdb`: the objects in DATA_DIR/store, one cloudcore. `etcd`: in etcd
    /// (--etcd-endpoints), shared by every cloudcore started on it (high availability).
    #[arg(long, global = true, value_enum, default_value = "rocksdb")]
    store: StoreKind,
    /// etcd client URLs, comma-separated (http://127.0.0.1:2379,...).
    #[arg(long, global = true, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Prefix of kedge's keys in etcd (several clusters can share one etcd).
    #[arg(long, global = true, default_value = "/kedge/")]
    etcd_prefix: String,
    /// PEM CA bundle of the etcd members' certificates.
    #[arg(long, global = true)]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long, global = true, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, global = true, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Compact etcd's history this often, to the revision of one interval before
    /// (kube-apiserver's flag); 0s: never. Watches older than that get 410.
    #[arg(long, global = true, default_value = "5m", value_parser = humantime::parse_duration)]
    etcd_compaction_interval: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Rocksdb,
    Etcd,
}

impl StorageArgs {
    /// The etcd settings, when the store is etcd.
    fn etcd(&self) -> Result<Option<cloud::etcd::EtcdConfig>, String> {
        match self.store {
            StoreKind::Rocksdb if self.etcd_endpoints.is_empty() => Ok(None),
            StoreKind::Rocksdb => Err("--etcd-endpoints needs --store etcd".to_owned()),
            StoreKind::Etcd if self.etcd_endpoints.is_empty() => {
                Err("--store etcd needs --etcd-endpoints URL[,URL...]".to_owned())
            }
            StoreKind::Etcd => {
                let mut config = cloud::etcd::EtcdConfig::new(self.etcd_endpoints.clone());
                config.prefix = self.etcd_prefix.clone();
                config.ca = self.etcd_ca.clone();
                config.cert = self.etcd_cert.clone();
                config.key = self.etcd_key.clone();
                config.compaction_interval = self.etcd_compaction_interval;
                Ok(Some(config))
            }
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Bootstrap tokens for joining edge nodes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The cluster CA's rollover (three steps, each taking effect at cloudcore's next start).
    /// With `--store etcd`: the cluster's CA in etcd, taken by each replica at its next start
    /// (restart them one by one after each step).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Rollover step 1: make the next CA. From cloudcore's next start nodes learn it over
    /// their links (trusted, not signing yet).
    Add,
    /// Rollover step 2, once every node holds both CAs: the next CA signs from cloudcore's
    /// next start; the previous one stays trusted. Make new bootstrap tokens after it.
    Switch,
    /// Rollover step 3, once every node renewed its certificate from the new CA: the
    /// previous CA is no longer trusted (from cloudcore's next start).
    Finish,
    /// Shows the CAs and the rollover step.
    Status,
}

impl CaCommand {
    /// The rollover step on a data dir (none for `status`).
    fn step(&self) -> Option<cloud::shared_pki::Step> {
        match self {
            CaCommand::Add => Some(cloud::pki::ca_add),
            CaCommand::Switch => Some(cloud::pki::ca_switch),
            CaCommand::Finish => Some(cloud::pki::ca_finish),
            CaCommand::Status => None,
        }
    }
}

fn ca_command(data_dir: &std::path::Path, command: CaCommand) -> ExitCode {
    if let Some(Err(e)) = command.step().map(|step| step(data_dir)) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    print_ca(data_dir, "cloudcore (re)starts")
}

/// Where tokens and the CA live when several cloudcores share them: etcd (`--store etcd`) or
/// the real cluster's Secrets (`--kubeconfig`).
enum Shared {
    Etcd(cloud::etcd::EtcdConfig),
    Cluster(PathBuf),
}

/// Runs `work` on a runtime of its own; its error printed.
fn on_runtime(work: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn cluster_client(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    Ok(cloud::cluster::KubeCluster::connect(kubeconfig)
        .await?
        .client())
}

/// The CA subcommands on the shared PKI: the step, shown as on a data dir; each replica takes
/// it at its next start.
fn shared_ca_command(shared: &Shared, command: CaCommand) -> ExitCode {
    on_runtime(async {
        let copy = match shared {
            Shared::Etcd(etcd) => {
                let pki = cloud::shared_pki::EtcdPki::connect(etcd, false).await?;
                cloud::shared_pki::ca_step(&pki, command.step()).await?
            }
            Shared::Cluster(kubeconfig) => {
                let pki =
                    cloud::cluster_secrets::ClusterPki::new(cluster_client(kubeconfig).await?);
                cloud::shared_pki::ca_step(&pki, command.step()).await?
            }
        };
        Ok(print_ca(copy.path(), "each cloudcore replica (re)starts"))
    })
}

/// Prints the rollover phase and the CAs of `data_dir`.
fn print_ca(data_dir: &std::path::Path, effect: &str) -> ExitCode {
    match cloud::pki::trust_bundle(data_dir) {
        Ok(bundle) => {
            println!("rollover: {:?}", cloud::pki::rollover(data_dir));
            for (i, ca) in bundle.iter().enumerate() {
                let role = if i == 0 { "signing" } else { "trusted" };
                println!("{role} CA sha256:{}", cloud::pki::sha256_hex(ca.as_ref()));
            }
            println!("# takes effect when {effect}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Creates a token; its last output line is the token.
    Create {
        /// How long the token is valid (e.g. 24h, 30m).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The token joins one node only: its first successful join uses it up.
        #[arg(long)]
        once: bool,
    },
    /// Lists the tokens: id, expiry, uses, state (never their secrets).
    List,
    /// Deletes a token by its id (the third part of `kedge1.<hash>.<id>.<secret>`).
    Delete {
        /// The token's id.
        id: String,
    },
}

/// The token subcommands on the shared tokens (etcd, or the cluster's Secrets).
fn shared_token_command(shared: &Shared, command: TokenCommand) -> ExitCode {
    on_runtime(async {
        let client = match shared {
            Shared::Cluster(kubeconfig) => Some(cluster_client(kubeconfig).await?),
            Shared::Etcd(_) => None,
        };
        match (command, shared, &client) {
            (TokenCommand::Create { ttl, once }, Shared::Etcd(etcd), _) => print_token(
                &cloud::etcd::create_token(etcd, ttl, once).await?,
                ttl,
                once,
            ),
            (TokenCommand::Create { ttl, once }, _, Some(client)) => print_token(
                &cloud::cluster_secrets::create_token(client, ttl, once).await?,
                ttl,
                once,
            ),
            (TokenCommand::List, Shared::Etcd(etcd), _) => {
                print_tokens(cloud::etcd::list_tokens(etcd).await?)
            }
            (TokenCommand::List, _, Some(client)) => {
                print_tokens(cloud::cluster_secrets::list_tokens(client).await?)
            }
            (TokenCommand::Delete { id }, shared, client) => {
                let deleted = match (shared, client) {
                    (Shared::Etcd(etcd), _) => cloud::etcd::delete_token(etcd, &id).await?,
                    (_, Some(client)) => cloud::cluster_secrets::delete_token(client, &id).await?,
                    _ => unreachable!("a client for the cluster"),
                };
                anyhow::ensure!(deleted, "no token {id}");
                println!("token {id} deleted");
            }
            _ => unreachable!("a client for the cluster"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn print_token(token: &str, ttl: Duration, once: bool) {
    println!("# join an edge node with: edgecore --token <this token> ...");
    println!(
        "# valid for {}{}",
        humantime::format_duration(ttl),
        if once { ", for one join" } else { "" }
    );
    println!("{token}");
}

fn print_tokens(tokens: Vec<cloud::pki::TokenInfo>) {
    println!("{:<8} {:<22} {:<10} STATE", "ID", "EXPIRES", "USES");
    for t in tokens {
        let expires = std::time::UNIX_EPOCH + Duration::from_secs(t.expires_unix);
        println!(
            "{:<8} {:<22} {:<10} {}",
            t.id,
            humantime::format_rfc3339_seconds(expires).to_string(),
            if t.once { "once" } else { "unlimited" },
            t.state()
        );
    }
}

fn token_command(data_dir: &std::path::Path, command: TokenCommand) -> ExitCode {
    let result = match command {
        TokenCommand::Create { ttl, once } => cloud::pki::create_token_with(data_dir, ttl, once)
            .map(|token| print_token(&token, ttl, once)),
        TokenCommand::List => cloud::pki::list_tokens(data_dir).map(print_tokens),
        TokenCommand::Delete { id } => match cloud::pki::delete_token(data_dir, &id) {
            Ok(true) => {
                println!("token {id} deleted");
                Ok(())
            }
            Ok(false) => {
                eprintln!("error: no token {id}");
                return ExitCode::FAILURE;
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An address, or none (`off`).
#[derive(Clone, Copy)]
struct OptionalAddr(Option<SocketAddr>);

fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    match text {
        "off" | "" => Ok(OptionalAddr(None)),
        text => text
            .parse()
            .map(|a| OptionalAddr(Some(a)))
            .map_err(|e| format!("{text:?}: {e} (an address like 0.0.0.0:10351, or off)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    transport::logging::init(cli.log_format, "info");
    let etcd = match cli.storage.etcd() {
        Ok(etcd) => etcd,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Tokens and the CA in etcd or in the cluster need no data dir.
    let mut cli = cli;
    let shared = match (etcd, &cli.kubeconfig) {
        (Some(etcd), _) => Some(Shared::Etcd(etcd)),
        (None, Some(kubeconfig)) => Some(Shared::Cluster(kubeconfig.clone())),
        (None, None) => None,
    };
    if let (Some(shared), Some(Command::Token { .. } | Command::Ca { .. })) =
        (&shared, &cli.command)
    {
        return match cli.command.take() {
            Some(Command::Token { command }) => shared_token_command(shared, command),
            Some(Command::Ca { command }) => shared_ca_command(shared, command),
            _ => unreachable!("matched above"),
        };
    }
    let Some(data_dir) = cli.data_dir.clone() else {
        eprintln!("error: --data-dir DIR is required");
        return ExitCode::from(2);
    };
    match cli.command {
        Some(Command::Token { command }) => token_command(&data_dir, command),
        Some(Command::Ca { command }) => ca_command(&data_dir, command),
        None => run(cli, data_dir),
    }
}

fn run(cli: Cli, data_dir: PathBuf) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let etcd = match cli.storage.etcd() {
        Ok(etcd) => etcd,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let leader_election = etcd.as_ref().map(|_| cloud::leader::LeaderConfig {
        lease_duration: cli.leader_elect_lease_duration,
        renew_deadline: cli.leader_elect_renew_deadline,
        retry_period: cli.leader_elect_retry_period,
        ..cloud::leader::LeaderConfig::new()
    });
    runtime.block_on(async move {
        let config = CloudConfig {
            etcd,
            leader_election,
            api_advertise_url: cli.api_advertise_url.clone(),
            kubelet_listen: cli.kubelet_listen.0,
            kubelet_address: cli.kubelet_address,
            kubelet_client_ca: cli.kubelet_client_ca.clone(),
            data_dir,
            quic_listen: cli.quic_listen,
            api_listen: cli.api_listen,
            api_tls: cli.api_tls,
            api_token_file: cli.api_token_file.clone(),
            api_names: cli.api_names.clone(),
            metrics_listen: cli.metrics_listen,
            kubeconfig: cli.kubeconfig,
            node_grace: cli.node_grace,
            pod_eviction: cli.evict_pods_from_unreachable_nodes_after,
            watch_history: cli.watch_history,
            link_keepalive: cli.link_keepalive,
            service_bus_timeout: cli.service_bus_timeout,
            streams_per_node: cli.streams_per_node,
            stream_idle_timeout: cli.stream_idle_timeout,
            node_cert_lifetime: cli.node_cert_lifetime,
            node_cert_grace: cli.node_cert_grace,
            join_rate_limit: cli.join_rate_limit,
            http_limits: replication::http_server::HttpLimits {
                header_read_timeout: cli.http_header_timeout,
                body_idle_timeout: cli.http_body_timeout,
                max_connections: cli.http_max_connections,
                ..cloud::server::api_http_limits()
            },
            device_status_in_device: cli.device_status_in_device,
            audit_log: cli.audit_log,
            audit_log_max_bytes: cli.audit_log_max_size,
        };
        let mut core = match CloudCore::start(config).await {
            Ok(core) => core,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let mut sigterm =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot handle SIGTERM: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let failure = tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); None }
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted: shutting down"); None }
            why = core.failed() => Some(why),
        };
        core.shutdown().await;
        match failure {
            None => {
                tracing::info!("cloudcore stopped");
                ExitCode::SUCCESS
            }
            Some(why) => {
                tracing::error!(%why, "a part of cloudcore failed; exiting");
                eprintln!("error: {why}");
                ExitCode::FAILURE
            }
        }
    })
}
