//! The embedded API on its two stores, with raw etcd as the baseline, in one run: starts a
//! one-member etcd (loopback, temporary dir) and two release cloudcores (`--store rocksdb` and
//! `--store etcd`), then drives each with the same kube-rs client work (creates, updates,
//! watch latency), and puts the same values into etcd directly from etcd-client. Prints a
//! table for BENCHMARKS.md ("API on etcd").
//!
//! `cargo build --release --workspace --bins && target/release/apibench --objects 2000 --concurrency 16
//! [--etcd-cpus 0 --cloud-cpus 1]`

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use loadtest::cloud::{free_tcp_port, http_ok, sibling_binary, start_etcd};

#[derive(Parser)]
#[command(about = "API create/update rates and watch latency: RocksDB vs etcd vs raw etcd")]
struct Cli {
    /// Objects created (then updated) per store.
    #[arg(long, default_value_t = 2000)]
    objects: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Bytes of data in each ConfigMap.
    #[arg(long, default_value_t = 1024)]
    value_bytes: usize,
    /// Objects created one at a time to time watch delivery.
    #[arg(long, default_value_t = 200)]
    watch_samples: usize,
    /// Pin etcd to these CPUs (`taskset` list, e.g. `0`): etcd as on machines of its own.
    #[arg(long)]
    etcd_cpus: Option<String>,
    /// Pin this process, its client work and the cloudcores it starts to these CPUs (e.g. `1`).
    #[arg(long)]
    cloud_cpus: Option<String>,
}

/// Pins every thread of process `pid` to `cpus` (util-linux's `taskset`).
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    anyhow::ensure!(status.success(), "taskset -a -p -c {cpus} {pid} failed");
    Ok(())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `GET path` on `url` answers 200.
async fn wait_http(url: &str, path: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let addr = url.trim_start_matches("http://").to_owned();
    while Instant::now() < deadline {
        let (addr, path) = (addr.clone(), path.to_owned());
        if tokio::task::spawn_blocking(move || http_ok(&addr, &path)).await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not answer")
}

fn start_cloudcore(dir: &Path, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
    let api = free_tcp_port()?;
    let child = Command::new(sibling_binary("cloudcore"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--api-listen", &format!("127.0.0.1:{api}")])
        .args(["--quic-listen", &format!("127.0.0.1:{}", free_tcp_port()?)])
        .args([
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_tcp_port()?),
        ])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .context("starting cloudcore (build it: cargo build --release --bins)")?;
    Ok((Proc(child), format!("http://127.0.0.1:{api}")))
}

/// Rate (per second) and latency percentiles of one phase.
struct Phase {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn phase(histogram: &Histogram<u64>, elapsed: Duration) -> Phase {
    Phase {
        rate: histogram.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

/// Runs `n` operations, `concurrency` at once; `op(i)` is one. Latencies in µs.
async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let mut histogram = Histogram::<u64>::new(3)?;
    let results: Vec<anyhow::Result<u64>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let call = op(i);
            async move {
                let t = Instant::now();
                call.await?;
                Ok(t.elapsed().as_micros() as u64)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for r in results {
        histogram.record(r?.max(1))?;
    }
    Ok(phase(&histogram, start.elapsed()))
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {"v": value},
    }))
    .expect("a ConfigMap")
}

struct ApiResult {
    create: Phase,
    update: Phase,
    watch: Phase,
}

async fn bench_api(url: &str, cli: &Cli) -> anyhow::Result<ApiResult> {
    let client = Client::try_from(kube::Config::new(url.parse()?))?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "bench"}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let api: Arc<Api<ConfigMap>> = Arc::new(Api::namespaced(client.clone(), "bench"));
    let value = "x".repeat(cli.value_bytes);
    let create = drive(cli.objects, cli.concurrency, |i| {
        let (api, object) = (api.clone(), config_map(&format!("c{i}"), &value));
        async move {
            api.create(&PostParams::default(), &object).await?;
            Ok(())
        }
    })
    .await?;
    let update = drive(cli.objects, cli.concurrency, |i| {
        let api = api.clone();
        let value = value.clone();
        async move {
            let name = format!("c{i}");
            let mut object = api.get(&name).await?;
            object.data = Some([("v".to_owned(), format!("{value}!"))].into());
            api.replace(&name, &PostParams::default(), &object).await?;
            Ok(())
        }
    })
    .await?;
    // Watch delivery: create one object at a time, time until the watch shows it.
    let watched: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut stream = watched.watch(&WatchParams::default(), "0").await?.boxed();
    let mut histogram = Histogram::<u64>::new(3)?;
    let start = Instant::now();
    for i in 0..cli.watch_samples {
        let name = format!("w{i}");
        let t = Instant::now();
        watched
            .create(&PostParams::default(), &config_map(&name, "w"))
            .await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
                .await
                .context("no watch event within 10 s")??
                .context("the watch ended")?;
            if let WatchEvent::Added(object) = event {
                if object.metadata.name.as_deref() == Some(name.as_str()) {
                    break;
                }
            }
        }
        histogram.record((t.elapsed().as_micros() as u64).max(1))?;
    }
    let watch = phase(&histogram, start.elapsed());
    Ok(ApiResult {
        create,
        update,
        watch,
    })
}

async fn bench_raw_etcd(endpoint: &str, cli: &Cli) -> anyhow::Result<(Phase, Phase)> {
    let client = etcd_client::Client::connect([endpoint], None).await?;
    let value = "x".repeat(cli.value_bytes + 200);
    let puts = drive(cli.objects, cli.concurrency, |i| {
        let (mut client, value) = (client.clone(), value.clone());
        async move {
            client.put(format!("/raw/put/{i}"), value, None).await?;
            Ok(())
        }
    })
    .await?;
    // The write our API makes: a transaction comparing the key's revision, with prev_kv.
    let txns = drive(cli.objects, cli.concurrency, |i| {
        let (mut client, value) = (client.clone(), value.clone());
        async move {
            let key = format!("/raw/txn/{i}");
            let txn = etcd_client::Txn::new()
                .when([etcd_client::Compare::create_revision(
                    key.clone(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd_client::TxnOp::put(
                    key,
                    value,
                    Some(etcd_client::PutOptions::new().with_prev_key()),
                )]);
            client.txn(txn).await?;
            Ok(())
        }
    })
    .await?;
    Ok((puts, txns))
}

fn row(what: &str, p: &Phase) {
    println!(
        "| {what} | {:.0}/s | {:.2} | {:.2} |",
        p.rate, p.p50_ms, p.p99_ms
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = tempfile::tempdir()?;
    if let Some(cpus) = &cli.cloud_cpus {
        pin(std::process::id(), cpus)?;
    }
    let (etcd, endpoint) = start_etcd(dir.path())?;
    if let Some(cpus) = &cli.etcd_cpus {
        pin(etcd.id(), cpus)?;
    }
    let _etcd = Proc(etcd);
    let (raw_put, raw_txn) = bench_raw_etcd(&endpoint, &cli).await?;

    let (rocks, rocks_url) = start_cloudcore(&dir.path().join("rocksdb"), &[])?;
    wait_http(&rocks_url, "/healthz", Duration::from_secs(30)).await?;
    let on_rocksdb = bench_api(&rocks_url, &cli).await?;
    drop(rocks);

    let (etcd_cloud, etcd_url) = start_cloudcore(
        &dir.path().join("etcd-cloud"),
        &["--store", "etcd", "--etcd-endpoints", &endpoint],
    )?;
    wait_http(&etcd_url, "/healthz", Duration::from_secs(30)).await?;
    let on_etcd = bench_api(&etcd_url, &cli).await?;
    drop(etcd_cloud);

    println!(
        "{} objects of {} B, {} in flight; watch: {} sequential creates; etcd on CPUs {}, \
         cloudcores and client on CPUs {}",
        cli.objects,
        cli.value_bytes,
        cli.concurrency,
        cli.watch_samples,
        cli.etcd_cpus.as_deref().unwrap_or("any"),
        cli.cloud_cpus.as_deref().unwrap_or("any")
    );
    println!("| what | rate | p50 ms | p99 ms |\n|---|---|---|---|");
    row("raw etcd put (etcd-client)", &raw_put);
    row("raw etcd txn put, compare + prev_kv", &raw_txn);
    row("API create, RocksDB store", &on_rocksdb.create);
    row("API create, etcd store", &on_etcd.create);
    row("API update (GET + PUT), RocksDB store", &on_rocksdb.update);
    row("API update (GET + PUT), etcd store", &on_etcd.update);
    row("watch delivery, RocksDB store", &on_rocksdb.watch);
    row("watch delivery, etcd store", &on_etcd.watch);
    println!(
        "API create on etcd / raw etcd put: {:.2}×; / raw txn: {:.2}×; etcd store / RocksDB store: {:.2}×",
        on_etcd.create.rate / raw_put.rate,
        on_etcd.create.rate / raw_txn.rate,
        on_etcd.create.rate / on_rocksdb.create.rate
    );
    Ok(())
}
