//! `twinbench`: device twin reports per second and latency, MQTT publish → Device status in the
//! cloud API, with real cloudcore and edgecore processes (see `loadtest::twins`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use loadtest::cloud::{default_cloudcore, Cloud};
use loadtest::twins::{default_edgecore, start_edgecore, Phase, TwinBench};

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
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summary(name: &str, phase: &Phase) -> serde_json::Value {
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
        "  publish → twin/update/result (baseline): p50 {:.2} ms  p99 {:.2} ms  (n={})",
        ms(&phase.mqtt_round_trip, 0.5),
        ms(&phase.mqtt_round_trip, 0.99),
        phase.mqtt_round_trip.len()
    );
    println!(
        "  publish → Device status in the cloud API:  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={}, {} status writes seen)",
        ms(&phase.to_cloud, 0.5),
        ms(&phase.to_cloud, 0.99),
        phase.to_cloud.max() as f64 / 1000.0,
        phase.to_cloud.len(),
        phase.cloud_updates
    );
    let ratio = ms(&phase.to_cloud, 0.99) / ms(&phase.mqtt_round_trip, 0.99).max(1e-6);
    println!("  p99 ratio cloud / MQTT round trip: {ratio:.1}×");
    serde_json::json!({
        "updates": phase.published,
        "offered_per_s": phase.published as f64 / secs,
        "converged_s": converged,
        "end_to_end_per_s": converged.map(|c| phase.published as f64 / c),
        "mqtt_p50_ms": ms(&phase.mqtt_round_trip, 0.5),
        "mqtt_p99_ms": ms(&phase.mqtt_round_trip, 0.99),
        "cloud_p50_ms": ms(&phase.to_cloud, 0.5),
        "cloud_p99_ms": ms(&phase.to_cloud, 0.99),
        "cloud_max_ms": phase.to_cloud.max() as f64 / 1000.0,
        "cloud_status_writes": phase.cloud_updates,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    transport::logging::init(transport::logging::LogFormat::Text, "warn");
    let cloud = Cloud::start_child(&args.cloudcore.unwrap_or_else(default_cloudcore))?;
    let edge = start_edgecore(&args.edgecore.unwrap_or_else(default_edgecore), &cloud)?;
    let devices = args.devices as usize;
    let bench = TwinBench::prepare(&cloud.api, edge.mqtt, devices)
        .await
        .context("preparing the devices")?;

    let per_device = ((args.rate * args.duration.as_secs_f64()) / devices as f64).ceil() as u64;
    let paced = bench
        .run_phase(1, per_device.max(1), Some(args.rate), args.converge_timeout)
        .await?;
    let burst = bench
        .run_phase(1_000_000, args.burst.max(1), None, args.converge_timeout)
        .await?;
    println!(
        "twinbench: {devices} devices on one edgecore, cloudcore and edgecore on this machine"
    );
    let paced_json = summary(&format!("paced at {:.0}/s", args.rate), &paced);
    let burst_json = summary("burst", &burst);
    if let Some(path) = args.json {
        let report =
            serde_json::json!({"devices": devices, "paced": paced_json, "burst": burst_json});
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    bench.stop();
    let ok = paced.converged_after.is_some() && burst.converged_after.is_some();
    drop(edge);
    drop(cloud);
    if !ok {
        anyhow::bail!("the cloud did not show every device's last value in time");
    }
    Ok(())
}
