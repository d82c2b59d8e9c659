//! The scenarios, run in order on one fleet. Each ends with the convergence check.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::api::{pod_key, pod_name, CloudApi};
use crate::cloud::{sample_self, Cloud, ProcessSample};
use crate::converge::{self, Convergence};
use crate::fleet::{self, Fleet};
use crate::hollow::Command;

pub const ALL: &[&str] = &[
    "connect-storm",
    "initial-sync",
    "churn",
    "status-flood",
    "pod-lifecycle",
    "partition",
    "cloud-restart",
    "replica-failover",
    "deployment",
    "idle",
];

#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub churn_rate: f64,
    pub duration_s: f64,
    pub idle_window_s: f64,
    pub seed: u64,
    pub converge_timeout_s: f64,
    pub lease_period_s: f64,
    /// cloudcores on one etcd (1: one cloudcore on its RocksDB store).
    pub cloud_replicas: usize,
    /// The links' QUIC keepalive (seconds).
    pub link_keepalive_s: f64,
    /// The highest link protocol version the hollow nodes speak (2: full-form messages, the
    /// baseline for the compact form of version 3).
    pub link_protocol: u32,
    /// Replicas of the `deployment` scenario's Deployment.
    pub deployment_replicas: usize,
    /// Pods the `pod-lifecycle` scenario creates and deletes (spread over the nodes).
    pub lifecycle_pods: usize,
    /// Creates (then deletes) per second in `pod-lifecycle`: a steady rate, not a burst.
    pub create_rate: f64,
}

/// One scenario's outcome: its numbers and its convergence check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub seconds: f64,
    pub metrics: BTreeMap<String, Value>,
    pub convergence: Convergence,
}

/// One API request of a paced run.
type Request = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Keeps a steady request rate: each [`Pacer::push`] returns when the next request is due,
/// collecting finished ones meanwhile (at most 256 in flight, so a slow API slows the rate
/// down rather than piling requests up).
struct Pacer {
    interval: Duration,
    next: Instant,
    inflight: futures_util::stream::FuturesUnordered<Request>,
    failed: u64,
}

impl Pacer {
    /// `rate` requests per second.
    fn new(rate: f64) -> Self {
        Pacer {
            interval: Duration::from_secs_f64(1.0 / rate.max(0.001)),
            next: Instant::now(),
            inflight: Default::default(),
            failed: 0,
        }
    }

    fn settle(&mut self, result: anyhow::Result<()>) {
        if let Err(e) = result {
            self.failed += 1;
            tracing::debug!(error = %e, "paced request failed");
        }
    }

    async fn push(&mut self, request: Request) {
        self.inflight.push(request);
        self.next += self.interval;
        loop {
            let now = Instant::now();
            if now >= self.next && self.inflight.len() < 256 {
                return;
            }
            let wait = self
                .next
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            tokio::select! {
                Some(result) = self.inflight.next() => self.settle(result),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Waits for the requests in flight; returns how many of all failed.
    async fn finish(mut self) -> u64 {
        while let Some(result) = self.inflight.next().await {
            self.settle(result);
        }
        self.failed
    }
}

/// The cloud's CPU time and the fleet's link bytes (both directions) at one moment.
struct Cost {
    at: Instant,
    cpu_seconds: f64,
    link_bytes: u64,
}

impl Cost {
    /// Per-unit figures of what `self` → `later` cost beyond the background rate
    /// (`background`: CPU seconds and bytes per second at rest): (CPU ms, bytes) per unit.
    fn per_unit(&self, later: &Cost, background: (f64, f64), units: usize) -> (f64, f64) {
        let seconds = later.at.duration_since(self.at).as_secs_f64();
        let cpu = (later.cpu_seconds - self.cpu_seconds - background.0 * seconds).max(0.0);
        let bytes = (later.link_bytes.saturating_sub(self.link_bytes) as f64
            - background.1 * seconds)
            .max(0.0);
        let units = units.max(1) as f64;
        (1000.0 * cpu / units, bytes / units)
    }
}

pub struct Harness {
    pub settings: Settings,
    pub cloud: Cloud,
    pub api: CloudApi,
    pub fleet: Option<Fleet>,
    rng: SmallRng,
    /// Pod names per node (the current population).
    pods: Vec<Vec<String>>,
    next_pod: Vec<usize>,
    probe_counter: Arc<AtomicU64>,
    cloud_baseline: Option<ProcessSample>,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:40}] {pos}/{len} {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

fn num(v: f64) -> Value {
    json!((v * 1000.0).round() / 1000.0)
}

impl Harness {
    pub fn new(settings: Settings, cloud: Cloud, api: CloudApi) -> Self {
        let nodes = settings.nodes;
        let seed = settings.seed;
        let cloud_baseline = cloud.sample();
        Harness {
            settings,
            cloud,
            api,
            fleet: None,
            rng: SmallRng::seed_from_u64(seed),
            pods: vec![Vec::new(); nodes],
            next_pod: vec![0; nodes],
            probe_counter: Arc::new(AtomicU64::new(0)),
            cloud_baseline,
        }
    }

    fn fleet(&self) -> &Fleet {
        self.fleet.as_ref().expect("connect-storm runs first")
    }

    fn probe(&self) -> String {
        self.probe_counter
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    async fn converge(&self) -> anyhow::Result<Convergence> {
        let timeout = Duration::from_secs_f64(self.settings.converge_timeout_s);
        converge::check(&self.api, self.fleet(), timeout).await
    }

    pub async fn run(&mut self, scenario: &str) -> anyhow::Result<Outcome> {
        let start = Instant::now();
        let mut metrics = BTreeMap::new();
        match scenario {
            "connect-storm" => self.connect_storm(&mut metrics).await?,
            "initial-sync" => self.initial_sync(&mut metrics).await?,
            "churn" => self.churn(&mut metrics).await?,
            "status-flood" => self.status_flood(&mut metrics).await?,
            "pod-lifecycle" => self.pod_lifecycle(&mut metrics).await?,
            "partition" => self.partition(&mut metrics).await?,
            "cloud-restart" => self.cloud_restart(&mut metrics).await?,
            "replica-failover" => self.replica_failover(&mut metrics).await?,
            "deployment" => self.deployment(&mut metrics).await?,
            "idle" => self.idle(&mut metrics).await?,
            other => anyhow::bail!("unknown scenario {other:?} (known: {})", ALL.join(", ")),
        }
        let convergence = self.converge().await?;
        Ok(Outcome {
            scenario: scenario.to_owned(),
            seconds: start.elapsed().as_secs_f64(),
            metrics,
            convergence,
        })
    }

    async fn connect_storm(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let n = self.settings.nodes;
        self.api.prepare().await?;
        let self_before = sample_self();
        let progress = bar(n as u64, "join");
        let start = Instant::now();
        let joined = fleet::join_all(self.cloud.quic, &self.cloud.token, n, 64, || {
            progress.inc(1)
        })
        .await?;
        progress.finish_and_clear();
        let join_s = start.elapsed().as_secs_f64();
        m.insert("join_seconds".into(), num(join_s));
        m.insert("joins_per_second".into(), num(n as f64 / join_s));

        let start = Instant::now();
        let lease = Duration::from_secs_f64(self.settings.lease_period_s);
        let link = transport::LinkConfig {
            heartbeat: Duration::from_secs_f64(self.settings.link_keepalive_s),
            protocol_version: self.settings.link_protocol,
            ..transport::LinkConfig::default()
        };
        let fleet = Fleet::start(&self.cloud.quics, joined, lease, &link)?;
        let progress = bar(n as u64, "connect");
        let connected = fleet
            .wait_connected(n, Duration::from_secs(120), |c| {
                progress.set_position(c as u64)
            })
            .await;
        progress.finish_and_clear();
        let connect_s = start.elapsed().as_secs_f64();
        self.fleet = Some(fleet);
        m.insert("connected".into(), json!(connected));
        m.insert("connect_seconds".into(), num(connect_s));
        m.insert("handshakes_per_second".into(), num(n as f64 / connect_s));
        anyhow::ensure!(connected == n, "only {connected} of {n} nodes connected");

        let progress = bar(n as u64, "ready");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = self.api.ready_nodes().await?;
            progress.set_position(ready as u64);
            if ready >= n || Instant::now() > deadline {
                m.insert("ready".into(), json!(ready));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress.finish_and_clear();
        m.insert(
            "all_ready_seconds".into(),
            num(start.elapsed().as_secs_f64()),
        );
        if let (Some(before), Some(after)) = (self_before, sample_self()) {
            let per_node = after.rss_bytes.saturating_sub(before.rss_bytes) as f64 / n as f64;
            m.insert("hollow_node_bytes".into(), num(per_node));
        }
        if let (Some(before), Some(after)) = (self.cloud_baseline, self.cloud.sample()) {
            let per_node = after.rss_bytes.saturating_sub(before.rss_bytes) as f64 / n as f64;
            m.insert("cloud_bytes_per_node".into(), num(per_node));
            m.insert("cloud_rss_bytes".into(), json!(after.rss_bytes));
        }
        self.quic_connection_states(m);
        Ok(())
    }

    async fn create_pods(&mut self, per_node: usize) -> anyhow::Result<usize> {
        let mut work = Vec::new();
        for (i, name) in self.fleet().names.clone().into_iter().enumerate() {
            for _ in 0..per_node {
                let pod = pod_name(&name, self.next_pod[i]);
                self.next_pod[i] += 1;
                self.pods[i].push(pod.clone());
                work.push((name.clone(), pod));
            }
        }
        let total = work.len();
        let progress = bar(total as u64, "create pods");
        let api = self.api.clone();
        let probes = self.fleet().probes.clone();
        let counter = self.probe_counter.clone();
        let failures: Vec<anyhow::Error> = stream::iter(work)
            .map(|(node, pod)| {
                let (api, probes, counter, progress) = (
                    api.clone(),
                    probes.clone(),
                    counter.clone(),
                    progress.clone(),
                );
                async move {
                    let probe = counter.fetch_add(1, Ordering::Relaxed).to_string();
                    probes.created(pod_key(&pod), &probe);
                    let result = api.create_pod(&node, &pod, &probe).await;
                    progress.inc(1);
                    result.err()
                }
            })
            .buffer_unordered(32)
            .filter_map(|e| async move { e })
            .collect()
            .await;
        progress.finish_and_clear();
        if let Some(e) = failures.into_iter().next() {
            return Err(e.context("creating pods"));
        }
        Ok(total)
    }

    async fn initial_sync(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let probes = self.fleet().probes.clone();
        probes.reset();
        let watch = self.api.watch_pods(probes.clone());
        let start = Instant::now();
        let total = self.create_pods(self.settings.pods_per_node).await?;
        m.insert("pods".into(), json!(total));
        m.insert(
            "creates_per_second".into(),
            num(total as f64 / start.elapsed().as_secs_f64()),
        );
        let progress = bar(total as u64, "running");
        let deadline = Instant::now() + Duration::from_secs_f64(self.settings.converge_timeout_s);
        while (probes.startup.percentiles().count as usize) < total && Instant::now() < deadline {
            progress.set_position(probes.startup.percentiles().count);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        progress.finish_and_clear();
        watch.abort();
        m.insert(
            "all_running_seconds".into(),
            num(start.elapsed().as_secs_f64()),
        );
        m.insert("pod_startup".into(), json!(probes.startup.percentiles()));
        m.insert(
            "create_to_node".into(),
            json!(probes.create_to_node.percentiles()),
        );
        Ok(())
    }

    /// Creates, updates and deletes at `rate` per second for `duration`, on pods of the nodes
    /// `pick` chooses from.
    async fn churn_for(&mut self, duration: Duration, nodes: &[usize]) -> anyhow::Result<u64> {
        let rate = self.settings.churn_rate.max(1.0);
        let start = Instant::now();
        let mut done = 0u64;
        let mut pacer = Pacer::new(rate);
        let probes = self.fleet().probes.clone();
        let progress = bar((rate * duration.as_secs_f64()) as u64, "churn");
        while start.elapsed() < duration {
            let node = nodes[self.rng.random_range(0..nodes.len())];
            let roll: f64 = self.rng.random();
            let api = self.api.clone();
            let probe = self.probe();
            let fut: Request = if roll < 0.6 && !self.pods[node].is_empty() {
                let pod = self.pods[node][self.rng.random_range(0..self.pods[node].len())].clone();
                probes.changed(pod_key(&pod), &probe);
                Box::pin(async move { api.touch_pod(&pod, &probe).await })
            } else if roll < 0.8 && !self.pods[node].is_empty() {
                let index = self.rng.random_range(0..self.pods[node].len());
                let pod = self.pods[node].swap_remove(index);
                probes.deleted(pod_key(&pod));
                Box::pin(async move { api.delete_pod(&pod).await })
            } else {
                let name = self.fleet().names[node].clone();
                let pod = pod_name(&name, self.next_pod[node]);
                self.next_pod[node] += 1;
                self.pods[node].push(pod.clone());
                probes.changed(pod_key(&pod), &probe);
                Box::pin(async move { api.create_pod(&name, &pod, &probe).await })
            };
            pacer.push(fut).await;
            done += 1;
            progress.inc(1);
        }
        pacer.finish().await;
        progress.finish_and_clear();
        Ok(done)
    }

    async fn churn(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let probes = self.fleet().probes.clone();
        probes.reset();
        let all: Vec<usize> = (0..self.fleet().len()).collect();
        let duration = Duration::from_secs_f64(self.settings.duration_s);
        let start = Instant::now();
        let changes = self.churn_for(duration, &all).await?;
        let seconds = start.elapsed().as_secs_f64();
        m.insert("changes".into(), json!(changes));
        m.insert("changes_per_second".into(), num(changes as f64 / seconds));
        // Let the last changes arrive before reading the histogram.
        let deadline = Instant::now() + Duration::from_secs(30);
        while probes.pending().0 + probes.pending().1 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        m.insert(
            "propagation".into(),
            json!(probes.propagation.percentiles()),
        );
        let (changes_lost, deletes_lost, _) = probes.pending();
        m.insert(
            "changes_not_seen".into(),
            json!(changes_lost + deletes_lost),
        );
        Ok(())
    }

    async fn status_flood(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let probes = self.fleet().probes.clone();
        probes.reset();
        let watch = self.api.watch_pods(probes.clone());
        // Let the watcher's initial list pass before stamping.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pods: usize = self.pods.iter().map(Vec::len).sum();
        let before = self.fleet().snapshots().await;
        let cpu_before = self.cloud.sample();
        let start = Instant::now();
        let round = 1 + self.probe_counter.fetch_add(1, Ordering::Relaxed);
        self.fleet().broadcast(|| Command::StatusRound(round)).await;
        let progress = bar(pods as u64, "status up");
        let deadline = Instant::now() + Duration::from_secs_f64(self.settings.converge_timeout_s);
        while (probes.upward.percentiles().count as usize) < pods && Instant::now() < deadline {
            progress.set_position(probes.upward.percentiles().count);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        progress.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let after = self.fleet().snapshots().await;
        watch.abort();
        let sent: u64 = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.bytes_tx.saturating_sub(b.bytes_tx))
            .sum();
        m.insert("status_updates".into(), json!(pods));
        m.insert("upward".into(), json!(probes.upward.percentiles()));
        m.insert("updates_per_second".into(), num(pods as f64 / seconds));
        m.insert(
            "bytes_up_per_update".into(),
            num(sent as f64 / pods.max(1) as f64),
        );
        m.insert(
            "pod_json_bytes".into(),
            json!(self.sample_pod_size().await?),
        );
        if let (Some(a), Some(b)) = (self.cloud.sample(), cpu_before) {
            m.insert(
                "cloud_cpu_percent".into(),
                num(100.0 * (a.cpu_seconds - b.cpu_seconds) / seconds),
            );
            m.insert(
                "cloud_cpu_ms_per_update".into(),
                num(1000.0 * (a.cpu_seconds - b.cpu_seconds) / pods.max(1) as f64),
            );
        }
        let both: u64 = after
            .iter()
            .zip(&before)
            .map(|(a, b)| (a.bytes_tx + a.bytes_rx).saturating_sub(b.bytes_tx + b.bytes_rx))
            .sum();
        m.insert(
            "link_bytes_per_update_both_ways".into(),
            num(both as f64 / pods.max(1) as f64),
        );
        Ok(())
    }

    /// The cloud's CPU time and the fleet's link bytes now.
    async fn cost(&self) -> Cost {
        let link_bytes = self
            .fleet()
            .snapshots()
            .await
            .iter()
            .map(|s| s.bytes_rx + s.bytes_tx)
            .sum();
        Cost {
            at: Instant::now(),
            cpu_seconds: self.cloud.sample().map_or(0.0, |s| s.cpu_seconds),
            link_bytes,
        }
    }

    /// Creates `lifecycle_pods` pods over the nodes at `create_rate` per second, waits until
    /// they run, deletes them at the same rate and waits until every node saw its deletions:
    /// pod startup at a steady rate, and what one pod's lifecycle costs the cloud (CPU) and the
    /// links (bytes, both directions, QUIC included) beyond the fleet's background, measured
    /// over 5 s just before in the same run.
    async fn pod_lifecycle(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let total = self.settings.lifecycle_pods.max(1);
        let rate = self.settings.create_rate.max(1.0);
        let probes = self.fleet().probes.clone();
        probes.reset();
        // The background: the fleet at rest (heartbeats, the cloud's own timers).
        let rest = self.cost().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rested = self.cost().await;
        let seconds = rested.at.duration_since(rest.at).as_secs_f64();
        let background = (
            (rested.cpu_seconds - rest.cpu_seconds) / seconds,
            rested.link_bytes.saturating_sub(rest.link_bytes) as f64 / seconds,
        );
        // The probes' watch lists every pod first: counted before the start.
        let (watch, listed) = self.api.watch_pods_listed(probes.clone());
        let _ = tokio::time::timeout(
            Duration::from_secs_f64(self.settings.converge_timeout_s),
            listed,
        )
        .await;
        let start = self.cost().await;

        let nodes = self.fleet().len();
        let mut pods = Vec::with_capacity(total);
        let mut pacer = Pacer::new(rate);
        let progress = bar(total as u64, "create (paced)");
        for k in 0..total {
            let i = k % nodes;
            let node = self.fleet().names[i].clone();
            let pod = pod_name(&node, self.next_pod[i]);
            self.next_pod[i] += 1;
            pods.push(pod.clone());
            let (api, probe) = (self.api.clone(), self.probe());
            probes.created(pod_key(&pod), &probe);
            pacer
                .push(Box::pin(async move {
                    api.create_pod(&node, &pod, &probe).await
                }))
                .await;
            progress.inc(1);
        }
        let create_failures = pacer.finish().await;
        progress.finish_and_clear();
        let create_seconds = start.at.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs_f64(self.settings.converge_timeout_s);
        while (probes.startup.percentiles().count as usize) < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let running = self.cost().await;

        let mut pacer = Pacer::new(rate);
        let progress = bar(total as u64, "delete (paced)");
        for pod in &pods {
            probes.deleted(pod_key(pod));
            let (api, pod) = (self.api.clone(), pod.clone());
            pacer
                .push(Box::pin(async move { api.delete_pod(&pod).await }))
                .await;
            progress.inc(1);
        }
        let delete_failures = pacer.finish().await;
        progress.finish_and_clear();
        let deadline = Instant::now() + Duration::from_secs_f64(self.settings.converge_timeout_s);
        while probes.pending().1 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let gone = self.cost().await;
        watch.abort();

        let (create_cpu_ms, create_bytes) = start.per_unit(&running, background, total);
        let (delete_cpu_ms, delete_bytes) = running.per_unit(&gone, background, total);
        m.insert("pods".into(), json!(total));
        m.insert("create_rate_target".into(), num(rate));
        m.insert(
            "create_rate_achieved".into(),
            num(total as f64 / create_seconds),
        );
        m.insert(
            "request_failures".into(),
            json!(create_failures + delete_failures),
        );
        m.insert("pod_startup".into(), json!(probes.startup.percentiles()));
        m.insert(
            "create_to_node".into(),
            json!(probes.create_to_node.percentiles()),
        );
        m.insert("deletes_not_seen".into(), json!(probes.pending().1));
        m.insert(
            "background_cloud_cpu_percent".into(),
            num(100.0 * background.0),
        );
        m.insert("background_link_bytes_per_second".into(), num(background.1));
        m.insert("cloud_cpu_ms_per_create".into(), num(create_cpu_ms));
        m.insert("cloud_cpu_ms_per_delete".into(), num(delete_cpu_ms));
        m.insert(
            "cloud_cpu_ms_per_pod_lifecycle".into(),
            num(create_cpu_ms + delete_cpu_ms),
        );
        m.insert("link_bytes_per_create".into(), num(create_bytes));
        m.insert("link_bytes_per_delete".into(), num(delete_bytes));
        m.insert(
            "link_bytes_per_pod_lifecycle".into(),
            num(create_bytes + delete_bytes),
        );
        Ok(())
    }

    /// The size of one pod's JSON as the API serves it.
    async fn sample_pod_size(&self) -> anyhow::Result<usize> {
        let name = self
            .pods
            .iter()
            .flatten()
            .next()
            .cloned()
            .unwrap_or_default();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.api.client(), crate::api::NAMESPACE);
        let pod = pods.get(&name).await?;
        Ok(serde_json::to_vec(&pod)?.len())
    }

    async fn partition(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let n = self.fleet().len();
        let cut = (n / 10).max(1);
        let mut chosen: Vec<usize> = (0..n).collect();
        for i in 0..cut {
            let j = self.rng.random_range(i..n);
            chosen.swap(i, j);
        }
        chosen.truncate(cut);
        for &i in &chosen {
            self.fleet().send(i, Command::Partition).await;
        }
        m.insert("partitioned_nodes".into(), json!(cut));
        // Changes to the whole fleet while they are away (some of them theirs).
        let duration = Duration::from_secs_f64(self.settings.duration_s.min(10.0));
        let all: Vec<usize> = (0..n).collect();
        let changes = self.churn_for(duration, &all).await?;
        m.insert("changes_during_partition".into(), json!(changes));
        let heal = Instant::now();
        for &i in &chosen {
            self.fleet().send(i, Command::Heal).await;
        }
        let convergence = self.converge().await?;
        m.insert(
            "converge_after_heal_seconds".into(),
            num(heal.elapsed().as_secs_f64()),
        );
        let snapshots = self.fleet().snapshots().await;
        let resync: u64 = chosen.iter().map(|&i| snapshots[i].bytes_rx).sum();
        let held: usize = chosen.iter().map(|&i| snapshots[i].held.len()).sum();
        let pod_bytes = self.sample_pod_size().await? as u64;
        m.insert("resync_bytes".into(), json!(resync));
        m.insert(
            "full_resend_bytes_estimate".into(),
            json!(held as u64 * pod_bytes),
        );
        m.insert(
            "resync_vs_full_resend".into(),
            num(resync as f64 / (held as u64 * pod_bytes).max(1) as f64),
        );
        anyhow::ensure!(
            convergence.converged,
            "partition did not converge: {:?}",
            convergence.differences
        );
        Ok(())
    }

    async fn cloud_restart(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        if !self.cloud.is_child() {
            m.insert(
                "skipped".into(),
                json!("the cloud was not started by this run"),
            );
            return Ok(());
        }
        let all: Vec<usize> = (0..self.fleet().len()).collect();
        let duration = Duration::from_secs_f64(self.settings.duration_s.min(10.0));
        self.churn_for(duration / 2, &all).await?;
        let before = self.fleet().snapshots().await;
        let restart = self.cloud.kill9_and_restart()?;
        m.insert("restart_seconds".into(), num(restart.as_secs_f64()));
        let since = Instant::now();
        let connected = self
            .fleet()
            .wait_reconnected(&before, Duration::from_secs(120))
            .await;
        m.insert("reconnected".into(), json!(connected));
        m.insert(
            "reconnect_seconds".into(),
            num(since.elapsed().as_secs_f64()),
        );
        self.churn_for(duration / 2, &all).await?;
        Ok(())
    }

    /// Several replicas on etcd (`--cloud-replicas N`): churn, `kill -9` the first replica, and
    /// time until each of its nodes is connected to another (p50/p99/max); what a moved node
    /// receives on its new connection (the digest exchange: only what it lacks) against the size
    /// of what it holds (a full resend); then churn again and the convergence check.
    async fn replica_failover(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let replicas = self.cloud.replicas();
        if replicas < 2 {
            m.insert(
                "skipped".into(),
                json!("needs --cloud-replicas 2 or more (started by this run)"),
            );
            return Ok(());
        }
        let all: Vec<usize> = (0..self.fleet().len()).collect();
        let duration = Duration::from_secs_f64(self.settings.duration_s.min(10.0));
        self.churn_for(duration / 2, &all).await?;
        // Quiet, so that what moved nodes receive is the move's own cost.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = self.fleet().snapshots().await;
        // The nodes the first replica holds (its link claims): a node whose first attempt
        // failed in the connect storm is on another replica already.
        let holders = self.api.link_holders().await.unwrap_or_default();
        let first = self.cloud.first_api_url();
        let names = self.fleet().names.clone();
        let moved: Vec<usize> = if holders.is_empty() {
            all.iter().copied().filter(|i| i % replicas == 0).collect()
        } else {
            all.iter()
                .copied()
                .filter(|i| holders.get(&names[*i]) == first.as_ref())
                .collect()
        };
        let held_bytes = self.api.pod_bytes_by_node().await?;
        let killed = Instant::now();
        self.cloud.kill9_first()?;
        let mut seconds: Vec<Option<f64>> = vec![None; moved.len()];
        let deadline = killed + Duration::from_secs(120);
        while seconds.iter().any(Option::is_none) && Instant::now() < deadline {
            let now = self.fleet().snapshots().await;
            for (slot, &i) in seconds.iter_mut().zip(&moved) {
                if slot.is_none() && now[i].connected && now[i].connections > before[i].connections
                {
                    *slot = Some(killed.elapsed().as_secs_f64());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut done: Vec<f64> = seconds.iter().flatten().copied().collect();
        done.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            done.get(((done.len() as f64 * q) as usize).min(done.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        m.insert("replicas".into(), json!(replicas));
        m.insert("moved_nodes".into(), json!(moved.len()));
        m.insert("reconnected".into(), json!(done.len()));
        m.insert("failover_p50_seconds".into(), num(pick(0.5)));
        m.insert("failover_p99_seconds".into(), num(pick(0.99)));
        m.insert(
            "failover_max_seconds".into(),
            num(done.last().copied().unwrap_or(f64::NAN)),
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = self.fleet().snapshots().await;
        let names = &self.fleet().names;
        let (mut received, mut held) = (0u64, 0u64);
        for &i in &moved {
            if after[i].connections > before[i].connections {
                received += after[i].bytes_rx;
                held += held_bytes.get(&names[i]).copied().unwrap_or(0);
            }
        }
        let count = done.len().max(1) as f64;
        m.insert("bytes_to_moved_node".into(), num(received as f64 / count));
        m.insert(
            "held_pod_json_bytes_per_node".into(),
            num(held as f64 / count),
        );
        m.insert(
            "moved_over_full_resend".into(),
            num(received as f64 / held.max(1) as f64),
        );
        self.churn_for(duration / 2, &all).await?;
        Ok(())
    }

    /// A Deployment of `--deployment-replicas` pods placed by the scheduler over the fleet: the
    /// time until all are available and the cloud's CPU seconds for it (controllers, scheduler,
    /// CloudHub); a label-selected list over every pod of the namespace; then the Deployment is
    /// deleted and its pods collected.
    async fn deployment(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        const NAME: &str = "fleet-web";
        let replicas = self.settings.deployment_replicas;
        let timeout = Duration::from_secs_f64(self.settings.converge_timeout_s);
        let before = self.cloud.sample();
        let start = Instant::now();
        self.api.create_deployment(NAME, replicas).await?;
        let progress = bar(replicas as u64, "available");
        let mut available = 0;
        while start.elapsed() < timeout {
            available = self.api.deployment_available(NAME).await?;
            progress.set_position(available as u64);
            if available >= replicas {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress.finish_and_clear();
        let took = start.elapsed();
        m.insert("replicas".into(), json!(replicas));
        m.insert("available".into(), json!(available));
        m.insert("all_available_seconds".into(), num(took.as_secs_f64()));
        if let (Some(before), Some(after)) = (before, self.cloud.sample()) {
            m.insert(
                "cloud_cpu_seconds".into(),
                num(after.cpu_seconds - before.cpu_seconds),
            );
        }
        let (pods, _) = self.api.select_pods(&format!("deployment={NAME}")).await?;
        let nodes: std::collections::BTreeSet<String> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        m.insert("nodes_used".into(), json!(nodes.len()));
        // A label-selected list over the whole namespace (every pod parsed to match).
        let (all, _) = self.api.select_pods("").await?;
        let first = self.fleet().names[0].clone();
        let mut times = Vec::new();
        let mut matched = 0;
        for _ in 0..5 {
            let (found, took) = self.api.select_pods(&format!("node={first}")).await?;
            matched = found.len();
            times.push(took.as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        m.insert("pods_in_namespace".into(), json!(all.len()));
        m.insert("label_list_matched".into(), json!(matched));
        m.insert("label_list_median_ms".into(), num(times[times.len() / 2]));
        let deleting = Instant::now();
        self.api.delete_deployment(NAME).await?;
        let mut left = usize::MAX;
        while deleting.elapsed() < timeout {
            left = self
                .api
                .select_pods(&format!("deployment={NAME}"))
                .await?
                .0
                .len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::ensure!(
            left == 0,
            "{left} pods of the Deployment left after {timeout:?}"
        );
        m.insert(
            "deleted_seconds".into(),
            num(deleting.elapsed().as_secs_f64()),
        );
        Ok(())
    }

    async fn idle(&mut self, m: &mut BTreeMap<String, Value>) -> anyhow::Result<()> {
        let first = self.converge().await?;
        anyhow::ensure!(first.converged, "not quiet before the idle window");
        let window = Duration::from_secs_f64(self.settings.idle_window_s);
        let before = self.fleet().snapshots().await;
        tokio::time::sleep(window).await;
        let after = self.fleet().snapshots().await;
        let mut total = 0u64;
        let mut counted = 0u64;
        for (a, b) in after.iter().zip(&before) {
            // A node that reconnected in the window restarted its counters: leave it out.
            if a.bytes_rx >= b.bytes_rx && a.bytes_tx >= b.bytes_tx {
                total += (a.bytes_rx - b.bytes_rx) + (a.bytes_tx - b.bytes_tx);
                counted += 1;
            }
        }
        let per_node = total as f64 / counted.max(1) as f64;
        let seconds = window.as_secs_f64();
        m.insert("window_seconds".into(), num(seconds));
        m.insert(
            "bytes_per_node_hour".into(),
            num(per_node * 3600.0 / seconds),
        );
        m.insert(
            "kbit_per_second_per_node".into(),
            num(per_node * 8.0 / seconds / 1000.0),
        );
        if let Some(sample) = self.cloud.sample() {
            m.insert("cloud_rss_bytes".into(), json!(sample.rss_bytes));
            if let Some(base) = self.cloud_baseline {
                m.insert(
                    "cloud_bytes_per_node".into(),
                    num(sample.rss_bytes.saturating_sub(base.rss_bytes) as f64
                        / self.fleet().len() as f64),
                );
            }
        }
        self.quic_connection_states(m);
        Ok(())
    }

    /// The cloud's QUIC connection states (handshaking and draining ones included) per
    /// connected node: above 1.0, states that no link uses are costing memory.
    fn quic_connection_states(&self, m: &mut BTreeMap<String, Value>) {
        if let Some(states) = self.cloud.metric("kedge_quic_connections", "") {
            m.insert("cloud_quic_connections".into(), num(states));
            m.insert(
                "cloud_quic_connections_per_node".into(),
                num(states / self.fleet().len().max(1) as f64),
            );
        }
    }

    pub async fn stop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.stop().await;
        }
        self.cloud.stop();
    }
}
