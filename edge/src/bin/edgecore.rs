//! `edgecore`: see `edgecore --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edge::{EdgeConfig, EdgeCore, RuntimeKind};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "edgecore",
    version,
    about = "kedge's edge node: joins the cloud, caches its state, runs its pods, serves a local Kubernetes API",
    after_help = "Also: edgecore mqtt-passwd FILE USERNAME (password on standard input) adds a user to the embedded MQTT broker's password file."
)]
struct Cli {
    /// This node's name (a DNS-1123 subdomain).
    #[arg(long)]
    node_name: String,
    /// Log lines as `text` (colour only on a terminal) or `json` (one object per line).
    #[arg(long, default_value = "text")]
    log_format: transport::logging::LogFormat,
    /// cloudcore's QUIC address (HOST:PORT), or several replicas' (A,B,C; or a name with
    /// several addresses): the node connects to one and fails over to the next that answers.
    #[arg(long)]
    cloud: String,
    /// Bootstrap token from `cloudcore token create`; needed only for the first start.
    #[arg(long)]
    token: Option<String>,
    /// Join again with --token although the data dir holds a certificate: for a node whose
    /// Node was deleted (its certificate revoked) or whose certificate expired beyond the
    /// cloud's grace window. The cache and pods' files are kept.
    #[arg(long, requires = "token")]
    rejoin: bool,
    /// Where the cache, the certificate and the pods' files live.
    #[arg(long)]
    data_dir: PathBuf,
    /// MetaServer (local Kubernetes API) address, loopback only.
    #[arg(long, default_value = "127.0.0.1:10550")]
    metaserver_listen: SocketAddr,
    /// How pods run.
    #[arg(long, value_enum, default_value = "process")]
    runtime: RuntimeKind,
    /// The CRI v1 runtime's socket for `--runtime cri` (containerd's by default).
    #[arg(long, default_value = edge::DEFAULT_CRI_ENDPOINT)]
    cri_endpoint: String,
    /// `--runtime cri`: the image filesystem's usage (percent) at which unused images are
    /// removed, least recently used first (kubelet's flag; 100 turns image GC off).
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_high_threshold: u8,
    /// `--runtime cri`: the usage (percent) image GC brings the filesystem down to.
    #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u8).range(0..=100))]
    image_gc_low_threshold: u8,
    /// `--runtime cri`: an image known for less than this is never removed.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    image_minimum_gc_age: std::time::Duration,
    /// `--runtime cri`: how often image usage is checked and the node's image list refreshed
    /// (kubelet: 5 minutes, fixed).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    image_gc_period: std::time::Duration,
    /// A container's log is rotated once larger than this (a Kubernetes quantity: 10Mi, 500Ki;
    /// kubelet's flag, looked at every 10 s).
    #[arg(long, default_value = "10Mi", value_parser = parse_log_size)]
    container_log_max_size: u64,
    /// Log files kept per container, the current one included (kubelet's flag; at least 2).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(2..))]
    container_log_max_files: u16,
    /// An application the cloud may call through ServiceBus: NAME=HOST:PORT (repeatable).
    #[arg(long = "service-bus-app", value_parser = edge::servicebus::parse_app)]
    service_bus_apps: Vec<(String, SocketAddr)>,
    /// How long a ServiceBus call may take on the node.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    service_bus_timeout: std::time::Duration,
    /// Address of the embedded MQTT broker for mappers (loopback unless you mean otherwise;
    /// without --mqtt-password-file it has no authentication).
    #[arg(long, default_value = "127.0.0.1:1883", conflicts_with_all = ["mqtt_url", "no_mqtt"])]
    mqtt_listen: SocketAddr,
    /// Use this external MQTT broker (mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS;
    /// e.g. mosquitto) instead of the embedded one.
    #[arg(long, value_parser = edge::eventbus::parse_mqtt_url, conflicts_with = "no_mqtt")]
    mqtt_url: Option<edge::eventbus::BrokerUrl>,
    /// The username edgecore signs in with on the external broker.
    #[arg(long, requires = "mqtt_url")]
    mqtt_username: Option<String>,
    /// A file whose first line is the password for --mqtt-username on the external broker.
    #[arg(long, requires = "mqtt_username")]
    mqtt_client_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the external broker's certificate (for mqtts://).
    #[arg(long, requires = "mqtt_url")]
    mqtt_ca: Option<PathBuf>,
    /// PEM certificate for edgecore's client on an external broker that requires client
    /// certificates (with --mqtt-client-key).
    #[arg(long, requires_all = ["mqtt_client_key", "mqtt_ca"])]
    mqtt_client_cert: Option<PathBuf>,
    /// PEM private key of --mqtt-client-cert.
    #[arg(long, requires = "mqtt_client_cert")]
    mqtt_client_key: Option<PathBuf>,
    /// The embedded broker requires a username and password listed in this file (lines
    /// `USERNAME:ARGON2-PHC-HASH`; add entries with `edgecore mqtt-passwd FILE USERNAME`).
    #[arg(long, conflicts_with_all = ["mqtt_url", "no_mqtt"])]
    mqtt_password_file: Option<PathBuf>,
    /// Topic ACLs of the embedded broker: lines `USER read|write|readwrite PATTERN` (USER `*`
    /// for everyone, `%u` in PATTERN for the user's name; e.g.
    /// `* readwrite $hw/events/device/%u/#`). What no line allows is refused. Needs
    /// --mqtt-password-file or --mqtt-tls-client-ca.
    #[arg(long, conflicts_with_all = ["mqtt_url", "no_mqtt"])]
    mqtt_acl_file: Option<PathBuf>,
    /// Serve the embedded broker over TLS (only) with this PEM certificate chain.
    #[arg(long, requires = "mqtt_tls_key", conflicts_with_all = ["mqtt_url", "no_mqtt"])]
    mqtt_tls_cert: Option<PathBuf>,
    /// The PEM private key of --mqtt-tls-cert.
    #[arg(long, requires = "mqtt_tls_cert")]
    mqtt_tls_key: Option<PathBuf>,
    /// Require MQTT clients to show a certificate signed by this PEM CA; without
    /// --mqtt-password-file its common name is the client's username (for the ACL's %u).
    #[arg(long, requires = "mqtt_tls_cert")]
    mqtt_tls_client_ca: Option<PathBuf>,
    /// Run no EventBus (no devices over MQTT on this node).
    #[arg(long)]
    no_mqtt: bool,
    /// Serve DMI (KubeEdge's device management interface, for mapper-framework mappers) on
    /// this unix socket (KubeEdge's default: /etc/kubeedge/dmi.sock).
    #[arg(long)]
    dmi_socket: Option<PathBuf>,
    /// How long one DMI call to a mapper may take before it is retried with backoff.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, requires = "dmi_socket")]
    dmi_call_timeout: std::time::Duration,
    /// DMI reports a second each mapper (protocol) may send, with a burst of as many; more
    /// get RESOURCE_EXHAUSTED. 0: no limit.
    #[arg(long, default_value_t = 2000, requires = "dmi_socket")]
    dmi_rate_limit: u32,
    /// Largest device message accepted on MQTT; larger ones get an error on their result topic.
    #[arg(long, default_value_t = 64 << 10)]
    mqtt_max_payload: usize,
    /// How often the node renews its Lease (a ~33-byte heartbeat datagram and its QUIC ACK).
    /// The heartbeat tells the cloud this period: the node's Lease holds four periods
    /// (`leaseDurationSeconds`) and cloudcore never judges it NotReady sooner, whatever its
    /// --node-grace. Longer periods cost less on the wire and notice an outage later. The
    /// default, 12.5 s, gives a 50 s Lease: NotReady after 50 s, Kubernetes' own
    /// node-monitor-grace-period since 1.32, at ~0.05 kbit/s per idle node.
    #[arg(long, default_value = "12s 500ms", value_parser = humantime::parse_duration)]
    lease_period: std::time::Duration,
    /// QUIC keepalive of the link to the cloud: a connection silent for twice this is dead and
    /// the node reconnects (its sync session resumes).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    link_keepalive: std::time::Duration,
}

/// `--container-log-max-size`: a Kubernetes quantity of bytes.
fn parse_log_size(text: &str) -> Result<u64, String> {
    edge::edged::runtime::quantity(text, 1.0)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size (e.g. 10Mi, 500Ki)"))
}

/// mimalloc's `mi_option_purge_delay` (the same position in its v2 and v3 option lists).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// An edge node is mostly idle and small: memory it frees goes back to the OS at once rather
/// than after mimalloc's delay (transparent huge pages are off for the whole workspace, see the
/// `no_thp` feature). Measured on 100 cached pods in BENCHMARKS.md.
fn keep_memory_small() {
    // SAFETY: a plain option setter with constant arguments.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// `edgecore mqtt-passwd FILE USERNAME`: adds or replaces USERNAME's entry in the embedded
/// MQTT broker's password file; the password is read from standard input (its first line).
#[derive(Parser)]
#[command(name = "edgecore mqtt-passwd", bin_name = "edgecore mqtt-passwd")]
struct MqttPasswd {
    /// The password file (created if missing).
    file: PathBuf,
    /// The user (a mapper); with `%u` in the ACL file, name users after their device.
    username: String,
}

fn mqtt_passwd(args: impl Iterator<Item = String>) -> ExitCode {
    let cli = MqttPasswd::parse_from(args);
    let mut password = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut password) {
        eprintln!("error: reading the password from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let password = password.trim_end_matches(['\n', '\r']);
    match edge::eventbus::auth::set_password(&cli.file, &cli.username, password) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    keep_memory_small();
    if std::env::args().nth(1).as_deref() == Some("mqtt-passwd") {
        return mqtt_passwd(std::env::args().skip(1));
    }
    let cli = Cli::parse();
    transport::logging::init(cli.log_format, "info");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut clouds = Vec::new();
        for part in cli
            .cloud
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match tokio::net::lookup_host(part).await {
                Ok(addrs) => {
                    for addr in addrs {
                        if !clouds.contains(&addr) {
                            clouds.push(addr);
                        }
                    }
                }
                Err(_) => {
                    eprintln!("error: --cloud {part}: not a HOST:PORT that resolves");
                    return ExitCode::from(2);
                }
            }
        }
        let Some((&cloud, alternates)) = clouds.split_first() else {
            eprintln!("error: --cloud {}: no address", cli.cloud);
            return ExitCode::from(2);
        };
        let mut config = EdgeConfig::new(&cli.node_name, cloud, cli.data_dir);
        config.cloud_alternates = alternates.to_vec();
        config.token = cli.token;
        config.rejoin = cli.rejoin;
        config.metaserver_listen = cli.metaserver_listen;
        config.runtime = cli.runtime;
        config.cri_endpoint = cli.cri_endpoint;
        config.image_gc = edge::edged::image_gc::ImageGcPolicy {
            high_threshold_percent: cli.image_gc_high_threshold,
            low_threshold_percent: cli.image_gc_low_threshold,
            min_age: cli.image_minimum_gc_age,
            period: cli.image_gc_period,
        };
        config.log_rotation = edge::edged::logs::LogRotation {
            max_size: cli.container_log_max_size,
            max_files: usize::from(cli.container_log_max_files),
        };
        if let Err(e) = config.image_gc.validate() {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        config.service_bus_apps = cli.service_bus_apps;
        config.service_bus_timeout = cli.service_bus_timeout;
        config.eventbus.max_payload = cli.mqtt_max_payload;
        config.dmi = cli.dmi_socket.map(|socket| edge::dmi::DmiConfig {
            socket,
            limits: edge::dmi::mappers::MapperLimits {
                call_timeout: cli.dmi_call_timeout,
                reports_per_second: cli.dmi_rate_limit,
            },
        });
        config.eventbus.password_file = cli.mqtt_password_file;
        config.eventbus.acl_file = cli.mqtt_acl_file;
        config.eventbus.tls = cli.mqtt_tls_cert.zip(cli.mqtt_tls_key).map(|(cert, key)| {
            edge::eventbus::tls::BrokerTls {
                cert,
                key,
                client_ca: cli.mqtt_tls_client_ca,
            }
        });
        config.eventbus.external = edge::eventbus::ExternalClient {
            username: cli.mqtt_username,
            password_file: cli.mqtt_client_password_file,
            ca: cli.mqtt_ca,
            client_cert: cli.mqtt_client_cert.zip(cli.mqtt_client_key),
        };
        config.node_status.lease_period = cli.lease_period;
        config.link_keepalive = cli.link_keepalive;
        config.eventbus.mode = match (cli.no_mqtt, cli.mqtt_url) {
            (true, _) => edge::eventbus::MqttMode::Off,
            (false, Some(url)) => edge::eventbus::MqttMode::External(url),
            (false, None) => edge::eventbus::MqttMode::Embedded(cli.mqtt_listen),
        };
        let mut core = match EdgeCore::start(config).await {
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
                tracing::info!("edgecore stopped");
                ExitCode::SUCCESS
            }
            Some(why) => {
                tracing::error!(%why, "a part of edgecore failed; exiting");
                eprintln!("error: {why}");
                ExitCode::FAILURE
            }
        }
    })
}
