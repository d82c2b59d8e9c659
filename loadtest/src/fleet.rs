//! The fleet: N hollow nodes in this process, each joined with the bootstrap token (its own key
//! and certificate from the cloud) and connected over its own QUIC connection. Connections
//! share a few UDP sockets (quinn endpoints) so that 10,000 nodes do not need 10,000 file
//! descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::stream::{self, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use transport::ClientConfig;

use crate::hollow::{self, Command, NodeSetup, Snapshot};
use crate::probe::Probes;

/// Nodes per UDP socket.
const NODES_PER_ENDPOINT: usize = 500;
/// UDP socket buffers asked for (the kernel caps them at net.core.rmem_max / wmem_max).
const SOCKET_BUFFER_BYTES: usize = 8 << 20;

pub struct Fleet {
    pub names: Vec<String>,
    commands: Vec<mpsc::Sender<Command>>,
    tasks: Vec<JoinHandle<()>>,
    pub probes: Arc<Probes>,
}

pub fn node_name(i: usize) -> String {
    format!("hollow-{i:05}")
}

/// Joins `count` nodes (at most `concurrency` joins at once), calling `progress` after each.
pub async fn join_all(
    cloud: SocketAddr,
    token: &str,
    count: usize,
    concurrency: usize,
    progress: impl Fn(),
) -> anyhow::Result<Vec<(String, transport::Joined)>> {
    let pin = edge::identity::parse_pin(token)?;
    let results: Vec<anyhow::Result<(String, transport::Joined)>> = stream::iter(0..count)
        .map(|i| async move {
            let name = node_name(i);
            let joined = transport::join(
                cloud,
                edge::identity::CLOUD_SERVER_NAME,
                pin,
                &name,
                token,
                Duration::from_secs(60),
            )
            .await
            .with_context(|| format!("joining {name}"))?;
            Ok((name, joined))
        })
        .buffer_unordered(concurrency.max(1))
        .inspect(|_| progress())
        .collect()
        .await;
    results.into_iter().collect()
}

impl Fleet {
    /// Starts the joined nodes, their links configured as `link`; each connects at once. With
    /// several cloud replicas, node `i` connects to `clouds[i % n]` first and knows the others
    /// as alternates.
    pub fn start(
        clouds: &[SocketAddr],
        joined: Vec<(String, transport::Joined)>,
        lease_period: Duration,
        link: &transport::LinkConfig,
    ) -> anyhow::Result<Fleet> {
        let probes = Arc::new(Probes::default());
        let mut endpoints = Vec::new();
        let mut fleet = Fleet {
            names: Vec::with_capacity(joined.len()),
            commands: Vec::with_capacity(joined.len()),
            tasks: Vec::with_capacity(joined.len()),
            probes: probes.clone(),
        };
        for (i, (name, joined)) in joined.into_iter().enumerate() {
            if i % NODES_PER_ENDPOINT == 0 {
                let bind: SocketAddr = "127.0.0.1:0".parse().expect("address");
                endpoints.push(
                    transport::client_endpoint(bind, SOCKET_BUFFER_BYTES)
                        .context("binding a UDP socket for the fleet")?,
                );
            }
            let setup = NodeSetup {
                name: name.clone(),
                identity: joined.identity,
                ca: joined.ca,
                client: {
                    let first = i % clouds.len();
                    let mut client =
                        ClientConfig::new(clouds[first], edge::identity::CLOUD_SERVER_NAME);
                    client.link = link.clone();
                    client.alternates = (1..clouds.len())
                        .map(|k| clouds[(first + k) % clouds.len()])
                        .collect();
                    client
                },
                endpoint: endpoints.last().expect("pushed").clone(),
                lease_period,
            };
            let (tx, rx) = mpsc::channel(16);
            fleet
                .tasks
                .push(tokio::spawn(hollow::run(setup, probes.clone(), rx)));
            fleet.commands.push(tx);
            fleet.names.push(name);
        }
        Ok(fleet)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub async fn send(&self, node: usize, command: Command) {
        let _ = self.commands[node].send(command).await;
    }

    pub async fn broadcast(&self, make: impl Fn() -> Command) {
        for tx in &self.commands {
            let _ = tx.send(make()).await;
        }
    }

    /// Every node's snapshot, in node order.
    pub async fn snapshots(&self) -> Vec<Snapshot> {
        let mut out = Vec::with_capacity(self.len());
        for tx in &self.commands {
            let (reply, rx) = oneshot::channel();
            if tx.send(Command::Snapshot(reply)).await.is_err() {
                out.push(Snapshot::default());
                continue;
            }
            out.push(rx.await.unwrap_or_default());
        }
        out
    }

    /// Waits until at least `want` nodes are connected (or `within` passes); returns how many.
    pub async fn wait_connected(
        &self,
        want: usize,
        within: Duration,
        tick: impl Fn(usize),
    ) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let connected = self
                .snapshots()
                .await
                .iter()
                .filter(|s| s.connected)
                .count();
            tick(connected);
            if connected >= want || Instant::now() > deadline {
                return connected;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every node has made a new connection since `before` (or `within` passes);
    /// returns how many have.
    pub async fn wait_reconnected(&self, before: &[Snapshot], within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let now = self.snapshots().await;
            let done = now
                .iter()
                .zip(before)
                .filter(|(a, b)| a.connected && a.connections > b.connections)
                .count();
            if done >= self.len() || Instant::now() > deadline {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) {
        drop(self.commands);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}
