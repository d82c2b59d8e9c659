//! High availability end to end: a three-member etcd cluster (Debian's etcd-server, on
//! loopback ports and temporary dirs of the test's own), two cloudcores on it
//! (`--store etcd`), a real edgecore given both (`--cloud A,B`), real kubectl.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Fast leader hand-over and node grace, so the scenario takes seconds.
const REPLICA_FLAGS: &[&str] = &[
    "--link-keepalive",
    "1s",
    "--node-grace",
    "6s",
    "--leader-elect-lease-duration",
    "3s",
    "--leader-elect-renew-deadline",
    "2s",
    "--leader-elect-retry-period",
    "500ms",
];

/// One etcd member: its process and how to start it again.
struct Member {
    name: String,
    child: Option<Child>,
    client_url: String,
    command: Vec<String>,
    log: PathBuf,
}

impl Member {
    fn start(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new("etcd")
            .args(&self.command)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd is installed (scripts/setup.sh: etcd-server)");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn healthy(&self) -> bool {
        let addr = self.client_url.trim_start_matches("http://");
        common::http_get(addr, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
    }
}

/// A three-member etcd cluster on loopback.
struct Etcd {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Etcd {
        Self::start_n(3, None)
    }

    /// `n` members; the first on `client_port` when given. A cluster that is not healthy
    /// within 30 s (a machine loaded by the other tests) is started again on fresh ports and
    /// dirs, up to three times, with its members' logs printed.
    fn start_n(n: usize, client_port: Option<u16>) -> Etcd {
        for attempt in 1..=3 {
            let etcd = Self::launch(n, client_port);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if etcd.members.iter().all(Member::healthy) {
                    eprintln!("etcd members healthy: {:?}", start.elapsed());
                    return etcd;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("etcd: not healthy after 30 s (attempt {attempt} of 3)");
            etcd.dump_logs();
        }
        panic!("etcd: {n} members not healthy in three attempts (logs above)");
    }

    fn launch(n: usize, client_port: Option<u16>) -> Etcd {
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = tempfile::tempdir().unwrap();
        let mut ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        if let Some(port) = client_port {
            ports[0].0 = port;
        }
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        // One token per cluster: members of two clusters never take each other as peers.
        let serial = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!("kedge-test-{}-{serial}", std::process::id());
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let data = dir.path().join(format!("e{i}"));
                Member {
                    name: format!("e{i}"),
                    child: None,
                    client_url: client_url.clone(),
                    log: dir.path().join(format!("e{i}.log")),
                    command: [
                        "--name",
                        &format!("e{i}"),
                        "--data-dir",
                        data.to_str().unwrap(),
                        "--listen-client-urls",
                        &client_url,
                        "--advertise-client-urls",
                        &client_url,
                        "--listen-peer-urls",
                        &peer_url,
                        "--initial-advertise-peer-urls",
                        &peer_url,
                        "--initial-cluster",
                        &cluster,
                        "--initial-cluster-token",
                        &token,
                        "--initial-cluster-state",
                        "new",
                    ]
                    .map(String::from)
                    .to_vec(),
                }
            })
            .collect();
        for member in &mut members {
            member.start();
        }
        Etcd { members, _dir: dir }
    }

    fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn dump_logs(&self) {
        for member in &self.members {
            let log = std::fs::read_to_string(&member.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            eprintln!("--- {} (last lines) ---\n{}", member.name, tail.join("\n"));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill9();
        }
    }
}

/// A child process killed when the test ends, passing or not.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn replica(dir: &Path, etcd: &Etcd) -> CloudProcess {
    let endpoints = etcd.endpoints();
    let mut flags = vec!["--store", "etcd", "--etcd-endpoints", &endpoints];
    flags.extend_from_slice(REPLICA_FLAGS);
    CloudProcess::start_with(dir, free_port(), free_port(), free_port(), &flags)
}

/// A bootstrap token made in etcd (`cloudcore token create --store etcd`), with `extra` flags.
fn etcd_token(endpoints: &str, extra: &[&str]) -> String {
    let made = Command::new(binary("cloudcore"))
        .args([
            "token",
            "create",
            "--store",
            "etcd",
            "--etcd-endpoints",
            endpoints,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr_of(&made));
    stdout(&made).lines().last().unwrap().to_owned()
}

/// edgecore `node` on `dir`, given the replicas whose QUIC ports are `clouds` (in order), its
/// MetaServer on `metaserver`, and `extra` flags (a token, ...).
fn edgecore(node: &str, dir: &Path, clouds: &[u16], metaserver: u16, extra: &[&str]) -> Command {
    let clouds: Vec<String> = clouds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut command = Command::new(binary("edgecore"));
    command
        .args(["--node-name", node, "--data-dir"])
        .arg(dir)
        .arg("--metaserver-listen")
        .arg(format!("127.0.0.1:{metaserver}"))
        .args(["--cloud", &clouds.join(","), "--mqtt-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

fn ok(cloud: &CloudProcess, args: &[&str]) -> String {
    let out = cloud.kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?} on {}: {}",
        cloud.api,
        stderr_of(&out)
    );
    stdout(&out)
}

fn lease_holder(cloud: &CloudProcess) -> String {
    let out = cloud.kubectl(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        "kedge-cloudcore",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    stdout(&out)
}

fn api_port(cloud: &CloudProcess) -> u16 {
    cloud.api.rsplit(':').next().unwrap().parse().unwrap()
}

fn sorted<const N: usize>(mut ports: [u16; N]) -> Vec<u16> {
    ports.sort_unstable();
    ports.to_vec()
}

/// The ports `default/kubernetes`'s Endpoints name (one subset per port), sorted.
fn endpoint_ports(cloud: &CloudProcess) -> Vec<u16> {
    let out = stdout(&cloud.kubectl(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={range .subsets[*]}{.ports[0].port} {end}",
    ]));
    let mut ports: Vec<u16> = out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    ports.sort_unstable();
    ports
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - {name: main, image: "busybox:1", command: [sleep, "1000"]}
"#;

/// `(name, node, phase)` of the Deployment's pods.
fn web_pods(cloud: &CloudProcess) -> Vec<(String, String, String)> {
    ok(
        cloud,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase}{\"\\n\"}{end}",
        ],
    )
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 3).then(|| (f[0].into(), f[1].into(), f[2].into()))
    })
    .collect()
}

#[test]
fn two_cloudcores_on_etcd_share_the_api_hand_over_leadership_and_nodes_fail_over() {
    let mut etcd = Etcd::start();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = replica(dir_a.path(), &etcd);
    eventually(
        "replica A holds the leader Lease",
        Duration::from_secs(20),
        || !lease_holder(&a).is_empty(),
    );
    let leader_a = lease_holder(&a);
    let b = replica(dir_b.path(), &etcd);

    // One API: a write on A is read on B, at the same resourceVersion; a stale write on B
    // conflicts with A's newer one.
    ok(&a, &["create", "configmap", "shared", "--from-literal=k=1"]);
    let rv_on = |cloud: &CloudProcess| {
        stdout(&cloud.kubectl(&[
            "get",
            "configmap",
            "shared",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ]))
    };
    eventually("B reads A's write", Duration::from_secs(10), || {
        !rv_on(&b).is_empty()
    });
    assert_eq!(rv_on(&a), rv_on(&b));
    let stale = ok(&b, &["get", "configmap", "shared", "-o", "json"]);
    ok(&a, &["label", "configmap", "shared", "step=2"]);
    let out = b.kubectl_stdin(&["replace", "-f", "-"], &stale);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("Conflict"), "{}", stderr_of(&out));
    // The CA is the cluster's: B took A's from etcd.
    assert_eq!(
        std::fs::read(dir_a.path().join("pki/ca.crt")).unwrap(),
        std::fs::read(dir_b.path().join("pki/ca.crt")).unwrap()
    );
    assert_eq!(lease_holder(&b), leader_a, "B does not take a held Lease");
    // The `kubernetes` Service's Endpoints name both replicas (each keeps an identity Lease).
    let (port_a, port_b) = (api_port(&a), api_port(&b));
    eventually(
        "the kubernetes Endpoints name both replicas",
        Duration::from_secs(20),
        || endpoint_ports(&a) == sorted([port_a, port_b]),
    );

    // A one-use token in etcd (no replica's data dir): a node that knows both replicas joins
    // and connects through A, the first; the token is then used up on B too.
    let endpoints = etcd.endpoints();
    let token = etcd_token(&endpoints, &["--once"]);
    let edge_dir = tempfile::tempdir().unwrap();
    let edge_port = free_port();
    let clouds = [a.quic_port, b.quic_port];
    let edge = Guard(
        edgecore(
            "edge-ha",
            edge_dir.path(),
            &clouds,
            edge_port,
            &["--token", &token],
        )
        .spawn()
        .expect("start edgecore"),
    );
    let node_ready = |cloud: &CloudProcess| {
        stdout(&cloud.kubectl(&[
            "get",
            "node",
            "edge-ha",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        ])) == "True"
    };
    eventually("the node is Ready", Duration::from_secs(40), || {
        node_ready(&b)
    });
    // The one-use token is used up, for every replica.
    let listed = Command::new(binary("cloudcore"))
        .args([
            "token",
            "list",
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
        ])
        .output()
        .unwrap();
    assert!(stdout(&listed).contains(" used"), "{}", stdout(&listed));
    let second_dir = tempfile::tempdir().unwrap();
    let second = edgecore(
        "edge-dup",
        second_dir.path(),
        &[b.quic_port],
        free_port(),
        &["--token", &token],
    )
    .stderr(Stdio::piped())
    .output()
    .unwrap();
    assert!(
        !second.status.success(),
        "a used one-use token joined a second node"
    );
    assert!(
        stderr_of(&second).contains("used"),
        "{}",
        stderr_of(&second)
    );
    assert!(b
        .kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)
        .status
        .success());
    eventually("two web pods Running", Duration::from_secs(60), || {
        let pods = web_pods(&b);
        pods.len() == 2 && pods.iter().all(|p| p.1 == "edge-ha" && p.2 == "Running")
    });

    // B does not hold the node's link: it forwards exec (a WebSocket upgrade) and logs to A.
    let pod = web_pods(&b)[0].0.clone();
    let out = b.kubectl(&["exec", &pod, "--", "echo", "through-b"]);
    assert!(
        out.status.success() && stdout(&out).contains("through-b"),
        "exec through B: {}{}",
        stdout(&out),
        stderr_of(&out)
    );
    let out = b.kubectl(&["exec", &pod, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    ok(&b, &["logs", &pod]);
    // `kubectl top` lists through B hold the node A holds: B asks A for its nodes' metrics.
    eventually(
        "kubectl top nodes and pods through B list A's node",
        Duration::from_secs(30),
        || {
            let nodes = b.kubectl(&["top", "nodes"]);
            let pods = b.kubectl(&["top", "pods"]);
            stdout(&nodes).contains("edge-ha") && stdout(&pods).contains(&pod)
        },
    );

    // kill -9 the replica that leads and holds the node's link.
    a.kill9();
    let killed = Instant::now();
    eventually("B takes the leader Lease", Duration::from_secs(20), || {
        let holder = lease_holder(&b);
        !holder.is_empty() && holder != leader_a
    });
    eprintln!("leadership moved in {:?}", killed.elapsed());
    eventually(
        "the killed replica leaves the kubernetes Endpoints",
        Duration::from_secs(20),
        || endpoint_ports(&b) == vec![port_b],
    );
    eprintln!("the Endpoints dropped A in {:?}", killed.elapsed());
    // The node reaches the cloud through B: an object created on B reaches its MetaServer.
    ok(
        &b,
        &[
            "create",
            "configmap",
            "after-failover",
            "--from-literal=k=2",
        ],
    );
    let metaserver = format!("http://127.0.0.1:{edge_port}");
    eventually(
        "B's write reaches the node",
        Duration::from_secs(30),
        || {
            kubectl(&metaserver, &["get", "configmap", "after-failover"], None)
                .status
                .success()
        },
    );
    eprintln!("the node failed over in {:?}", killed.elapsed());
    // B's controllers and scheduler act, once: exactly three pods, each on the node.
    ok(&b, &["scale", "deployment", "web", "--replicas=3"]);
    eventually("three web pods Running", Duration::from_secs(60), || {
        let pods = web_pods(&b);
        pods.len() == 3 && pods.iter().all(|p| p.1 == "edge-ha" && p.2 == "Running")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(web_pods(&b).len(), 3, "no replica created extra pods");
    assert!(node_ready(&b));

    // One etcd member down: the API keeps serving reads and writes.
    etcd.members[0].kill9();
    // (A write during etcd's leader election, if the killed member led, answers 503.)
    eventually(
        "writes with one etcd member down",
        Duration::from_secs(15),
        || {
            b.kubectl(&["create", "configmap", "one-member-down"])
                .status
                .success()
        },
    );
    // Quorum lost: writes answer 503 (not stale success), reads are served from the cache.
    etcd.members[1].kill9();
    let out = b.kubectl(&["create", "configmap", "no-quorum"]);
    assert!(
        !out.status.success(),
        "a write without an etcd quorum succeeded"
    );
    assert!(
        stderr_of(&out).contains("ServiceUnavailable") || stderr_of(&out).contains("unavailable"),
        "{}",
        stderr_of(&out)
    );
    ok(&b, &["get", "configmap", "one-member-down"]);
    // Quorum back: B recovers without a restart.
    etcd.members[0].start();
    etcd.members[1].start();
    let mut recovered = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if b.kubectl(&["create", "configmap", "quorum-back"])
            .status
            .success()
        {
            recovered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !recovered {
        etcd.dump_logs();
        panic!("B did not recover when etcd's quorum came back");
    }

    // A comes back on its data dir: its cache is rebuilt from etcd, nothing lost.
    let endpoints = etcd.endpoints();
    let mut flags = vec!["--store", "etcd", "--etcd-endpoints", &endpoints];
    flags.extend_from_slice(REPLICA_FLAGS);
    a.restart_after_kill9(&flags);
    for name in ["shared", "after-failover", "one-member-down", "quorum-back"] {
        ok(&a, &["get", "configmap", name]);
    }
    assert_eq!(web_pods(&a).len(), 3);

    // The replica holding the node's link says so. (The node is on B since the failover, or
    // on A again: B gave its nodes up while etcd had no quorum.)
    let claim = |cloud: &CloudProcess| {
        stdout(&cloud.kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kedge-link-edge-ha",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]))
    };
    let connected = |cloud: &CloudProcess| common::metric(cloud, "kedge_connected_nodes");
    eventually(
        "the node is connected to a replica",
        Duration::from_secs(60),
        || connected(&a) + connected(&b) == 1.0,
    );
    let (holder, other) = if connected(&b) == 1.0 {
        (&b, &a)
    } else {
        (&a, &b)
    };
    let held_by = claim(holder);
    assert!(
        !held_by.is_empty() && held_by == claim(other),
        "claim: {held_by:?}"
    );
    // ...and across replicas the newer connection wins: a second process with the node's
    // certificate connects to the other replica; the holder closes its (older) connection.
    let clone_dir = tempfile::tempdir().unwrap();
    std::process::Command::new("cp")
        .arg("-a")
        .arg(edge_dir.path().join("pki"))
        .arg(clone_dir.path())
        .status()
        .unwrap();
    for file in std::fs::read_dir(edge_dir.path()).unwrap().flatten() {
        if file.file_type().unwrap().is_file() {
            std::fs::copy(file.path(), clone_dir.path().join(file.file_name())).unwrap();
        }
    }
    let clone = Guard(
        edgecore(
            "edge-ha",
            clone_dir.path(),
            &[other.quic_port],
            free_port(),
            &[],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    eventually(
        "the other replica claims the node's link",
        Duration::from_secs(30),
        || {
            let now = claim(holder);
            !now.is_empty() && now != held_by
        },
    );
    eventually(
        "the holder closed its older connection of the node",
        Duration::from_secs(10),
        || connected(holder) == 0.0,
    );
    drop(clone);
    drop(edge);

    // Everything stops (kill -9) and starts again: nothing is lost.
    drop(b);
    a.kill9();
    for member in &mut etcd.members {
        member.kill9();
    }
    for member in &mut etcd.members {
        member.start();
    }
    eventually("etcd back", Duration::from_secs(30), || {
        etcd.members.iter().all(Member::healthy)
    });
    a.restart_after_kill9(&flags);
    for name in ["shared", "after-failover", "one-member-down", "quorum-back"] {
        ok(&a, &["get", "configmap", name]);
    }
    assert_eq!(web_pods(&a).len(), 3);
    assert!(ok(&a, &["get", "deployment", "web"]).contains("web"));
}

#[test]
fn a_replica_with_another_ca_refuses_to_start() {
    let etcd = Etcd::start();
    let first = tempfile::tempdir().unwrap();
    let _a = replica(first.path(), &etcd);
    // A data dir with a CA of its own (made by `cloudcore token create`).
    let other = tempfile::tempdir().unwrap();
    let made = Command::new(binary("cloudcore"))
        .args(["token", "create", "--data-dir"])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let out = Command::new(binary("cloudcore"))
        .arg("--data-dir")
        .arg(other.path())
        .args(["--store", "etcd", "--etcd-endpoints", &etcd.endpoints()])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--quic-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("is not the cluster's CA in etcd"), "{err}");
}

#[test]
fn etcd_down_at_start_is_a_clear_error_and_cloudcore_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("cloudcore.log");
    let etcd_port = free_port();
    let api = free_port();
    let mut cloud = Guard(
        Command::new(binary("cloudcore"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--store", "etcd", "--etcd-endpoints"])
            .arg(format!("http://127.0.0.1:{etcd_port}"))
            .args(["--api-listen", &format!("127.0.0.1:{api}")])
            .args(["--quic-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    eventually(
        "cloudcore says etcd is unreachable",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("cannot connect to etcd")
        },
    );
    assert!(cloud.0.try_wait().unwrap().is_none(), "cloudcore gave up");
    let _etcd = Etcd::start_n(1, Some(etcd_port));
    eventually(
        "cloudcore serves once etcd is up",
        Duration::from_secs(30),
        || {
            common::http_get(&format!("127.0.0.1:{api}"), "/healthz")
                .is_some_and(|b| b.contains("ok"))
        },
    );
    drop(cloud);
}

#[test]
fn etcd_is_compacted_and_older_watches_get_410() {
    let etcd = Etcd::start_n(1, None);
    let dir = tempfile::tempdir().unwrap();
    let endpoints = etcd.endpoints();
    let cloud = CloudProcess::start_with(
        dir.path(),
        free_port(),
        free_port(),
        free_port(),
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--etcd-compaction-interval",
            "1s",
        ],
    );
    ok(&cloud, &["create", "configmap", "c", "--from-literal=v=0"]);
    let old = stdout(&cloud.kubectl(&[
        "get",
        "configmap",
        "c",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]));
    for i in 1..=3 {
        ok(
            &cloud,
            &["label", "configmap", "c", &format!("v={i}"), "--overwrite"],
        );
    }
    let etcd_revision = old.parse::<u64>().unwrap() / 1000;
    eventually(
        "etcd compacted past the first version",
        Duration::from_secs(20),
        || {
            let out = Command::new("etcdctl")
                .args(["--endpoints", &endpoints, "get", "--rev"])
                .arg(etcd_revision.to_string())
                .arg("/kedge/objects/configmaps/default/c")
                .env("ETCDCTL_API", "3")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stderr).contains("compacted")
        },
    );
    let out = cloud.kubectl(&[
        "get",
        "--raw",
        &format!(
            "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={old}&timeoutSeconds=2"
        ),
    ]);
    let err = format!("{}{}", stdout(&out), stderr_of(&out));
    assert!(
        err.contains("too old") || err.contains("410") || err.contains("Expired"),
        "{err}"
    );
    // The objects themselves are all there.
    assert!(ok(&cloud, &["get", "configmap", "c", "--show-labels"]).contains("v=3"));
}

/// A TCP proxy to etcd for one replica, which the test can cut (as a network partition
/// between that replica and etcd would, for it alone).
struct Cuttable {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cuttable {
    fn start(target: String) -> Cuttable {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, open2) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cut2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut open = open2.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cuttable { port, cut, open }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_replica_cut_off_from_etcd_gives_its_nodes_up_and_recovers() {
    let etcd = Etcd::start_n(1, None);
    let proxy = Cuttable::start(etcd.endpoints().trim_start_matches("http://").to_owned());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica(dir_a.path(), &etcd);
    let via_proxy = proxy.url();
    let mut flags = vec!["--store", "etcd", "--etcd-endpoints", &via_proxy];
    flags.extend_from_slice(REPLICA_FLAGS);
    let b = CloudProcess::start_with(dir_b.path(), free_port(), free_port(), free_port(), &flags);

    // The node knows B first.
    let token = etcd_token(&etcd.endpoints(), &[]);
    let edge_dir = tempfile::tempdir().unwrap();
    let flags = ["--token", &token, "--link-keepalive", "1s"];
    let clouds = [b.quic_port, a.quic_port];
    let _edge = Guard(
        edgecore("edge-cut", edge_dir.path(), &clouds, free_port(), &flags)
            .spawn()
            .unwrap(),
    );
    eventually("the node is on B", Duration::from_secs(40), || {
        common::metric(&b, "kedge_connected_nodes") == 1.0
    });

    // B loses etcd: its writes answer 503, and it gives the node up, which moves to A.
    proxy.cut();
    let cut = Instant::now();
    let out = b.kubectl(&["create", "configmap", "while-cut"]);
    assert!(!out.status.success(), "B wrote without etcd");
    eventually("the node moved to A", Duration::from_secs(30), || {
        common::metric(&a, "kedge_connected_nodes") == 1.0
            && common::metric(&b, "kedge_connected_nodes") == 0.0
    });
    eprintln!("the node left the cut-off replica in {:?}", cut.elapsed());
    ok(&a, &["create", "configmap", "on-a"]);

    // etcd back for B: it serves again without a restart.
    proxy.restore();
    eventually("B writes again", Duration::from_secs(30), || {
        b.kubectl(&["create", "configmap", "b-back"])
            .status
            .success()
    });
    eventually("B reads A's write", Duration::from_secs(10), || {
        b.kubectl(&["get", "configmap", "on-a"]).status.success()
    });
}

/// `cloudcore ca STEP --store etcd`: its stdout.
fn etcd_ca(endpoints: &str, step: &str) -> Output {
    Command::new(binary("cloudcore"))
        .args(["ca", step, "--store", "etcd", "--etcd-endpoints", endpoints])
        .output()
        .unwrap()
}

/// The CAs a data dir's `pki/ca.crt` holds (an edge node's trust bundle).
fn trusted_cas(dir: &Path) -> usize {
    transport::tls::certs_from_pem(&std::fs::read_to_string(dir.join("pki/ca.crt")).unwrap())
        .unwrap()
        .len()
}

/// The issuer of the node certificate in an edge data dir.
fn node_cert_issuer(dir: &Path) -> String {
    let pem = std::fs::read_to_string(dir.join("pki/node.crt")).expect("node.crt");
    let cert = transport::tls::cert_from_pem(&pem).unwrap();
    transport::tls::node_cert_info(&cert).unwrap().issuer
}

#[test]
fn a_ca_rollover_on_etcd_reaches_every_replica_and_the_node() {
    let etcd = Etcd::start_n(1, None);
    let endpoints = etcd.endpoints();
    let mut flags = vec!["--store", "etcd", "--etcd-endpoints", &endpoints];
    flags.extend_from_slice(REPLICA_FLAGS);
    flags.extend_from_slice(&["--node-cert-lifetime", "20s"]);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start =
        |dir: &Path| CloudProcess::start_with(dir, free_port(), free_port(), free_port(), &flags);
    let mut a = start(dir_a.path());
    let mut b = start(dir_b.path());
    let token = etcd_token(&endpoints, &[]);
    let edge_dir = tempfile::tempdir().unwrap();
    let _edge = Guard(
        edgecore(
            "edge-ca",
            edge_dir.path(),
            &[a.quic_port],
            free_port(),
            &["--token", &token, "--link-keepalive", "1s"],
        )
        .spawn()
        .expect("start edgecore"),
    );
    let connected = |cloud: &CloudProcess| common::metric(cloud, "kedge_connected_nodes");
    eventually("the node connected to A", Duration::from_secs(30), || {
        connected(&a) == 1.0
    });
    let old_issuer = node_cert_issuer(edge_dir.path());
    let ca_of = |dir: &Path| std::fs::read(dir.join("pki/ca.crt")).unwrap();
    let old_ca = ca_of(dir_a.path());
    assert_eq!(old_ca, ca_of(dir_b.path()));

    // A step out of order is refused clearly, and changes nothing.
    let out = etcd_ca(&endpoints, "switch");
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("ca add"), "{}", stderr_of(&out));

    // 1. The next CA, in etcd; each replica takes it at its restart, and the node learns it.
    let out = etcd_ca(&endpoints, "add");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout(&out).contains("rollover: Added"), "{}", stdout(&out));
    for cloud in [&mut a, &mut b] {
        cloud.restart_after_kill9(&flags);
    }
    for dir in [dir_a.path(), dir_b.path()] {
        assert!(dir.join("pki/ca-next.crt").exists(), "{}", dir.display());
    }
    eventually(
        "the node learned the next CA",
        Duration::from_secs(30),
        || trusted_cas(edge_dir.path()) == 2,
    );

    // 2. The switch: every replica signs with the new CA (A started on the old one as its
    // signing CA: it follows etcd); the node renews its certificate from it.
    let out = etcd_ca(&endpoints, "switch");
    assert!(out.status.success(), "{}", stderr_of(&out));
    for cloud in [&mut b, &mut a] {
        cloud.restart_after_kill9(&flags);
    }
    let new_ca = ca_of(dir_a.path());
    assert_ne!(new_ca, old_ca);
    assert_eq!(new_ca, ca_of(dir_b.path()));
    assert_eq!(
        std::fs::read(dir_b.path().join("pki/ca-prev.crt")).unwrap(),
        old_ca
    );
    eventually("the node reconnected to A", Duration::from_secs(30), || {
        connected(&a) == 1.0
    });
    eventually(
        "the node renewed its certificate from the new CA",
        Duration::from_secs(40),
        || node_cert_issuer(edge_dir.path()) != old_issuer,
    );

    // 3. The old CA goes from etcd, from every replica and from the node.
    let out = etcd_ca(&endpoints, "finish");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout(&out).contains("rollover: None"), "{}", stdout(&out));
    for cloud in [&mut a, &mut b] {
        cloud.restart_after_kill9(&flags);
    }
    for dir in [dir_a.path(), dir_b.path()] {
        assert!(!dir.join("pki/ca-prev.crt").exists(), "{}", dir.display());
        assert_eq!(ca_of(dir), new_ca);
    }
    eventually("the node reconnected", Duration::from_secs(30), || {
        connected(&a) == 1.0
    });
    eventually(
        "the node dropped the old CA",
        Duration::from_secs(30),
        || trusted_cas(edge_dir.path()) == 1,
    );
    // A token made now pins the new CA, and a new node joins through B with it.
    let token = etcd_token(&endpoints, &[]);
    let second_dir = tempfile::tempdir().unwrap();
    let _second = Guard(
        edgecore(
            "edge-ca-2",
            second_dir.path(),
            &[b.quic_port],
            free_port(),
            &["--token", &token],
        )
        .spawn()
        .unwrap(),
    );
    eventually(
        "a new node joins through B",
        Duration::from_secs(30),
        || connected(&b) == 1.0,
    );
    assert!(node_cert_issuer(second_dir.path()).starts_with("kedge-ca-"));
}

#[test]
fn a_certificate_renewed_on_one_replica_is_accepted_by_another() {
    let etcd = Etcd::start_n(1, None);
    let endpoints = etcd.endpoints();
    let mut flags = vec!["--store", "etcd", "--etcd-endpoints", &endpoints];
    flags.extend_from_slice(REPLICA_FLAGS);
    flags.extend_from_slice(&["--node-cert-lifetime", "15s"]);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start =
        |dir: &Path| CloudProcess::start_with(dir, free_port(), free_port(), free_port(), &flags);
    let mut a = start(dir_a.path());
    let mut b = start(dir_b.path());
    let token = etcd_token(&endpoints, &[]);
    let edge_dir = tempfile::tempdir().unwrap();
    let _edge = Guard(
        edgecore(
            "edge-renew",
            edge_dir.path(),
            &[a.quic_port, b.quic_port],
            free_port(),
            &["--token", &token, "--link-keepalive", "1s"],
        )
        .spawn()
        .expect("start edgecore"),
    );
    let connected = |cloud: &CloudProcess| common::metric(cloud, "kedge_connected_nodes");
    eventually("the node on A", Duration::from_secs(30), || {
        connected(&a) == 1.0
    });
    let joined = std::fs::read(edge_dir.path().join("pki/node.crt")).unwrap();
    // A goes: the node moves to B, and renews its certificate there.
    a.kill9();
    eventually("the node on B", Duration::from_secs(30), || {
        connected(&b) == 1.0
    });
    a.restart_after_kill9(&flags);
    eventually(
        "the node renewed its certificate on B",
        Duration::from_secs(40),
        || std::fs::read(edge_dir.path().join("pki/node.crt")).unwrap() != joined,
    );
    assert_eq!(connected(&b), 1.0, "the renewal was B's");
    // B goes: A, which issued only the first certificate, accepts the one B renewed.
    b.kill9();
    eventually(
        "the node connects to A with the certificate B renewed",
        Duration::from_secs(30),
        || connected(&a) == 1.0,
    );
    assert_eq!(
        common::metric(
            &a,
            "kedge_node_certificates_total{event=\"refused_revoked\"}"
        ),
        0.0
    );
}
