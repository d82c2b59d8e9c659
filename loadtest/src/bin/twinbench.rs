//! `twinbench`: device twin reports per second and latency, mapper report (MQTT publish or a
//! DMI call) → DeviceStatus in the cloud API, and the bytes each report costs on the link,
//! with real cloudcore and edgecore processes (see `loadtest::twins`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use loadtest::cloud::{default_cloudcore, Cloud};
use loadtest::twins::{default_edgecore, start_edgecore, Phase, TwinBench, Via};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Device twin reports through EventBus to the cloud: throughput and latency")]
struct Args {
    /// Devices on the node.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    /// Updates per second (all devices together) in the paced phase.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Length of the paced phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Updates per device in the burst phase (published as fast as the mapper can).
    #[arg(long, default_value_t = 500)]
    burst: u64,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
    #[arg(long)]
    cloudcore: Option<PathBuf>,
    #[arg(long)]
    edgecore: Option<PathBuf>,
    /// How the mapper reports: `mqtt` (KubeEdge's $hw topics), `dmi` (DMI's
    /// ReportDeviceStatus), or `both`, one after the other, each on a fresh cloudcore and
    /// edgecore.
    #[arg(long, default_value = "mqtt", value_parser = ["mqtt", "dmi", "both"])]
    via: String,
    /// The devices' `reportCycle` (ms): the node sends each device's changes to the cloud at
    /// most once per cycle. 0: every change at once.
    #[arg(long, default_value_t = 0)]
    report_cycle_ms: u64,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summary(name: &str, phase: &Phase, bytes_up: Option<f64>) -> serde_json::Value {
    let secs = phase.elapsed.as_secs_f64().max(1e-9);
    let converged = phase.converged_after.map(|d| d.as_secs_f64());
    println!(
        "{name}: {} updates in {:.2} s ({:.0}/s offered); converged in the cloud after {}",
        phase.published,
        secs,
        phase.published as f64 / secs,
        converged.map_or("NEVER".into(), |c| format!(
            "{c:.2} s ({:.0} updates/s end to end)",
            phase.published as f64 / c
        )),
    );
    println!(
        "  report → the node's answer (baseline):     p50 {:.2} ms  p99 {:.2} ms  (n={})",
        ms(&phase.node_round_trip, 0.5),
        ms(&phase.node_round_trip, 0.99),
        phase.node_round_trip.len()
    );
    println!(
        "  report → DeviceStatus in the cloud API:    p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={}, {} status writes seen)",
        ms(&phase.to_cloud, 0.5),
        ms(&phase.to_cloud, 0.99),
        phase.to_cloud.max() as f64 / 1000.0,
        phase.to_cloud.len(),
        phase.cloud_updates
    );
    let ratio = ms(&phase.to_cloud, 0.99) / ms(&phase.node_round_trip, 0.99).max(1e-6);
    println!("  p99 ratio cloud / node round trip: {ratio:.1}×");
    let per_report = bytes_up.map(|b| b / phase.published.max(1) as f64);
    if let Some(b) = bytes_up {
        println!(
            "  link, node → cloud: {b:.0} bytes, {:.1} bytes per report",
            per_report.unwrap_or_default()
        );
    }
    serde_json::json!({
        "updates": phase.published,
        "offered_per_s": phase.published as f64 / secs,
        "converged_s": converged,
        "end_to_end_per_s": converged.map(|c| phase.published as f64 / c),
        "mqtt_p50_ms": ms(&phase.node_round_trip, 0.5),
        "mqtt_p99_ms": ms(&phase.node_round_trip, 0.99),
        "cloud_p50_ms": ms(&phase.to_cloud, 0.5),
        "cloud_p99_ms": ms(&phase.to_cloud, 0.99),
        "cloud_max_ms": phase.to_cloud.max() as f64 / 1000.0,
        "cloud_status_writes": phase.cloud_updates,
        "link_bytes_up": bytes_up,
        "link_bytes_per_report": per_report,
    })
}

/// One run: a fresh cloudcore and edgecore, the paced phase and the burst, reporting `via`.
async fn run(args: &Args, via: Via) -> anyhow::Result<(serde_json::Value, bool)> {
    let cloud = Cloud::start_child(&args.cloudcore.clone().unwrap_or_else(default_cloudcore))?;
    let edge = start_edgecore(
        &args.edgecore.clone().unwrap_or_else(default_edgecore),
        &cloud,
    )?;
    let devices = args.devices as usize;
    let bench = TwinBench::prepare(&cloud.api, &edge, devices, via, args.report_cycle_ms)
        .await
        .context("preparing the devices")?;
    let bytes_up = || cloud.metric("kedge_bytes_total", "direction=\"up\"");

    let per_device = ((args.rate * args.duration.as_secs_f64()) / devices as f64).ceil() as u64;
    let before = bytes_up();
    let paced = bench
        .run_phase(1, per_device.max(1), Some(args.rate), args.converge_timeout)
        .await?;
    let paced_bytes = bytes_up().zip(before).map(|(a, b)| a - b);
    let before = bytes_up();
    let burst = bench
        .run_phase(1_000_000, args.burst.max(1), None, args.converge_timeout)
        .await?;
    let burst_bytes = bytes_up().zip(before).map(|(a, b)| a - b);
    println!(
        "twinbench via {via:?}: {devices} devices on one edgecore, cloudcore and edgecore on this machine"
    );
    let paced_json = summary(&format!("paced at {:.0}/s", args.rate), &paced, paced_bytes);
    let burst_json = summary("burst", &burst, burst_bytes);
    bench.stop();
    let ok = paced.converged_after.is_some() && burst.converged_after.is_some();
    drop(edge);
    drop(cloud);
    Ok((
        serde_json::json!({"via": format!("{via:?}").to_lowercase(), "devices": devices,
                           "paced": paced_json, "burst": burst_json}),
        ok,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    transport::logging::init(transport::logging::LogFormat::Text, "warn");
    let vias = match args.via.as_str() {
        "mqtt" => vec![Via::Mqtt],
        "dmi" => vec![Via::Dmi],
        _ => vec![Via::Mqtt, Via::Dmi],
    };
    let mut reports = Vec::new();
    let mut ok = true;
    for via in vias {
        let (report, converged) = run(&args, via).await?;
        reports.push(report);
        ok &= converged;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&reports)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !ok {
        anyhow::bail!("the cloud did not show every device's last value in time");
    }
    Ok(())
}
