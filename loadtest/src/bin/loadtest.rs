//! `loadtest`: a fleet of hollow nodes against a real cloudcore, with faults, a convergence
//! check and a report. Exit code 0 only if every scenario converged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use loadtest::api::CloudApi;
use loadtest::cloud::{default_cloudcore, Cloud};
use loadtest::report::Report;
use loadtest::scenario::{Harness, Settings, ALL};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "A fleet of hollow edge nodes against a real cloudcore")]
struct Args {
    /// Hollow nodes (each its own QUIC connection and certificate).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    nodes: u32,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pods_per_node: u32,
    /// Pod changes per second in churn, partition and cloud-restart.
    #[arg(long, default_value_t = 100.0)]
    churn_rate: f64,
    /// How long churn runs (partition and cloud-restart use at most 10 s of it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Measured idle window (include at least one lease period).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle_window: Duration,
    /// A scenario, or `all`. Scenarios after the first always start with connect-storm.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long each convergence check may take.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
    /// How often each hollow node renews its Lease (edgecore's default).
    #[arg(long, default_value = "12s 500ms", value_parser = humantime::parse_duration)]
    lease_period: Duration,
    /// Start this many cloudcores on one etcd (`--store etcd`, a one-member etcd of this
    /// run's); the fleet's nodes are spread over them and know all. `replica-failover` needs 2+.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    cloud_replicas: u32,
    /// QUIC keepalive of the links, for the cloudcore this run starts and for the hollow nodes:
    /// a link silent for twice this is dead (how soon a node notices a killed replica).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    link_keepalive: Duration,
    /// The highest link protocol version the hollow nodes speak: 2 sends every message in full
    /// form, the baseline against which the compact form of version 3 (the default) is measured
    /// in the same run.
    #[arg(long, default_value_t = transport::PROTOCOL_VERSION,
          value_parser = clap::value_parser!(u32).range(i64::from(transport::MIN_PROTOCOL_VERSION)..=i64::from(transport::PROTOCOL_VERSION)))]
    link_protocol: u32,
    /// Replicas of the `deployment` scenario's Deployment (placed by the scheduler).
    #[arg(long, default_value_t = 1000)]
    deployment_replicas: usize,
    /// Pods `pod-lifecycle` creates and deletes, spread over the nodes (default: one per node).
    #[arg(long)]
    lifecycle_pods: Option<usize>,
    /// Creates (then deletes) per second in `pod-lifecycle`, at a steady pace: the rate a
    /// fleet sustains, as opposed to initial-sync's burst.
    #[arg(long, default_value_t = 200.0)]
    create_rate: f64,
    /// The cloudcore binary to start (default: next to this one).
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    /// Target a running cloud instead: its API URL...
    #[arg(long, requires_all = ["cloud_quic", "token"])]
    cloud_api: Option<String>,
    /// ...its QUIC address...
    #[arg(long)]
    cloud_quic: Option<SocketAddr>,
    /// ...and a bootstrap token from `cloudcore token create`.
    #[arg(long)]
    token: Option<String>,
}

/// Raises the open-file limit to its hard maximum; warns about small UDP buffers.
fn raise_limits(nodes: usize) {
    // SAFETY: getrlimit/setrlimit on a stack struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0
            && (limit.rlim_cur as usize) < nodes / 100 + 1024
        {
            eprintln!(
                "warning: the open-file limit is {}; raise it (ulimit -n) for {nodes} nodes",
                limit.rlim_cur
            );
        }
    }
    for name in ["rmem_max", "wmem_max"] {
        let path = format!("/proc/sys/net/core/{name}");
        let value: usize = std::fs::read_to_string(&path)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if value < 8 << 20
            && nodes >= 1000
            && std::fs::write(&path, (8u32 << 20).to_string()).is_err()
        {
            eprintln!(
                "warning: net.core.{name} is {value} bytes; with {nodes} nodes UDP packets \
                 may be dropped: sysctl -w net.core.{name}=8388608"
            );
        }
    }
}

async fn run(args: Args, report: &mut Report) -> anyhow::Result<()> {
    let scenarios: Vec<&str> = if args.scenario == "all" {
        ALL.to_vec()
    } else {
        let wanted = ALL.iter().find(|s| **s == args.scenario).with_context(|| {
            format!(
                "unknown scenario {:?} (known: all, {})",
                args.scenario,
                ALL.join(", ")
            )
        })?;
        if *wanted == "connect-storm" {
            vec!["connect-storm"]
        } else if *wanted == "initial-sync" {
            vec!["connect-storm", "initial-sync"]
        } else {
            vec!["connect-storm", "initial-sync", wanted]
        }
    };
    let cloud = match (&args.cloud_api, args.cloud_quic, &args.token) {
        (Some(api), Some(quic), Some(token)) => Cloud::external(api.clone(), quic, token.clone()),
        _ => {
            let binary = args.cloudcore.clone().unwrap_or_else(default_cloudcore);
            if args.cloud_replicas > 1 {
                Cloud::start_replicas(&binary, args.cloud_replicas as usize, args.link_keepalive)
                    .context("starting etcd and the cloudcore replicas")?
            } else {
                Cloud::start_child(&binary).context("starting cloudcore")?
            }
        }
    };
    let api = CloudApi::connect(&cloud.api).await?;
    let mut harness = Harness::new(report.settings.clone(), cloud, api);
    let outcome = async {
        for scenario in scenarios {
            eprintln!("== {scenario}");
            let outcome = harness.run(scenario).await?;
            let converged = outcome.convergence.converged;
            report.outcomes.push(outcome);
            if !converged {
                anyhow::bail!("{scenario} did not converge");
            }
        }
        Ok(())
    };
    let result = tokio::select! {
        result = outcome => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C)")),
    };
    harness.stop().await;
    result
}

fn main() -> std::process::ExitCode {
    transport::logging::init(transport::logging::LogFormat::Text, "warn");
    let args = Args::parse();
    raise_limits(args.nodes as usize);
    let settings = Settings {
        nodes: args.nodes as usize,
        pods_per_node: args.pods_per_node as usize,
        churn_rate: args.churn_rate,
        duration_s: args.duration.as_secs_f64(),
        idle_window_s: args.idle_window.as_secs_f64(),
        seed: args.seed,
        converge_timeout_s: args.converge_timeout.as_secs_f64(),
        lease_period_s: args.lease_period.as_secs_f64(),
        cloud_replicas: args.cloud_replicas as usize,
        link_keepalive_s: args.link_keepalive.as_secs_f64(),
        link_protocol: args.link_protocol,
        deployment_replicas: args.deployment_replicas,
        lifecycle_pods: args.lifecycle_pods.unwrap_or(args.nodes as usize),
        create_rate: args.create_rate,
    };
    let mut report = Report {
        settings,
        outcomes: Vec::new(),
        passed: false,
        error: None,
    };
    let json = args.json.clone();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args, &mut report));
    runtime.shutdown_timeout(Duration::from_secs(5));
    report.passed = result.is_ok() && report.outcomes.iter().all(|o| o.convergence.converged);
    report.error = result.err().map(|e| format!("{e:#}"));
    print!("{}", report.table());
    if let Some(path) = json {
        match serde_json::to_vec_pretty(&report) {
            Ok(bytes) => {
                if let Err(e) = std::fs::write(&path, bytes) {
                    eprintln!("error: writing {}: {e}", path.display());
                }
            }
            Err(e) => eprintln!("error: encoding the report: {e}"),
        }
    }
    if report.passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
