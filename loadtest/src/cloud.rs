//! The cloudcore under test: a child process on a temporary data dir (so that its memory and
//! CPU are its own, read from /proc), or one already running.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the cloud is, and the child process when this run started it.
pub struct Cloud {
    /// The API this run talks to (the last replica's, with several: it outlives
    /// `replica-failover`, which kills the first).
    pub api: String,
    /// The first replica's QUIC address (joins go there).
    pub quic: SocketAddr,
    /// Every replica's QUIC address, in order.
    pub quics: Vec<SocketAddr>,
    pub token: String,
    child: Option<ChildCloud>,
    /// Replicas after the first (`--cloud-replicas`).
    others: Vec<ChildCloud>,
    /// The etcd the replicas share.
    etcd: Option<(Child, tempfile::TempDir)>,
}

struct ChildCloud {
    process: Child,
    binary: PathBuf,
    data_dir: tempfile::TempDir,
    api_port: u16,
    metrics_port: u16,
}

/// CPU time and resident memory of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessSample {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub at: Option<Instant>,
}

pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A workspace binary next to this executable (cargo puts them all together), or `name` on
/// the PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `cloudcore` next to this executable.
pub fn default_cloudcore() -> PathBuf {
    sibling_binary("cloudcore")
}

/// Whether `GET path` on `addr` answers 200.
pub fn http_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

impl Cloud {
    /// Starts cloudcore on a fresh temporary data dir and loopback ports, and makes a token.
    pub fn start_child(binary: &Path) -> anyhow::Result<Cloud> {
        let (child, quic) = ChildCloud::spawn(binary, &[])?;
        let api = format!("http://127.0.0.1:{}", child.api_port);
        let token = make_token(
            binary,
            &[
                "--data-dir".into(),
                child.data_dir.path().display().to_string(),
            ],
        )?;
        Ok(Cloud {
            api,
            quic,
            quics: vec![quic],
            token,
            child: Some(child),
            others: Vec::new(),
            etcd: None,
        })
    }

    /// Starts a one-member etcd ([`start_etcd`]) and `replicas` cloudcores on it (`--store
    /// etcd`), and makes a token in etcd.
    pub fn start_replicas(
        binary: &Path,
        replicas: usize,
        keepalive: Duration,
    ) -> anyhow::Result<Cloud> {
        let dir = tempfile::Builder::new()
            .prefix("kedge-loadtest-etcd")
            .tempdir()
            .context("creating etcd's temporary data dir")?;
        let (etcd, endpoint) = start_etcd(dir.path())?;
        let mut cloud = Cloud {
            api: String::new(),
            quic: "127.0.0.1:1".parse()?,
            quics: Vec::new(),
            token: String::new(),
            child: None,
            others: Vec::new(),
            etcd: Some((etcd, dir)),
        };
        let keepalive = format!("{}ms", keepalive.as_millis());
        let extra: Vec<String> = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoint,
            "--link-keepalive",
            &keepalive,
        ]
        .map(String::from)
        .to_vec();
        for i in 0..replicas.max(1) {
            let (child, quic) = ChildCloud::spawn(binary, &extra)?;
            cloud.api = format!("http://127.0.0.1:{}", child.api_port);
            cloud.quics.push(quic);
            if i == 0 {
                cloud.quic = quic;
                cloud.child = Some(child);
            } else {
                cloud.others.push(child);
            }
        }
        cloud.token = make_token(binary, &extra[..4])?;
        Ok(cloud)
    }

    pub fn external(api: String, quic: SocketAddr, token: String) -> Cloud {
        Cloud {
            api,
            quic,
            quics: vec![quic],
            token,
            child: None,
            others: Vec::new(),
            etcd: None,
        }
    }

    /// Replicas this run started (0 for an external cloud).
    pub fn replicas(&self) -> usize {
        usize::from(self.child.is_some()) + self.others.len()
    }

    /// The first replica's API URL, as its link claims name it (None for an external cloud).
    pub fn first_api_url(&self) -> Option<String> {
        self.child
            .as_ref()
            .map(|c| format!("http://127.0.0.1:{}", c.api_port))
    }

    /// `kill -9` the first replica (which stays down); how long it took.
    pub fn kill9_first(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("no replica of this run's to kill");
        };
        let _ = child.process.kill();
        let _ = child.process.wait();
        Ok(())
    }

    pub fn is_child(&self) -> bool {
        self.child.is_some()
    }

    /// The sum of the samples of the Prometheus metric `name` (e.g. `kedge_bytes_total`) whose
    /// labels contain `labels` (e.g. `direction="up"`), scraped from the child's metrics
    /// endpoint (None for an external cloud, or when it does not answer).
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let mut sum: Option<f64> = None;
        for child in self.child.iter().chain(&self.others) {
            if let Some(v) = scrape(child.metrics_port, name, labels) {
                *sum.get_or_insert(0.0) += v;
            }
        }
        sum
    }

    /// CPU and RSS of the child (None for an external cloud); with several replicas, their sum.
    pub fn sample(&self) -> Option<ProcessSample> {
        let mut total: Option<ProcessSample> = None;
        for child in self.child.iter().chain(&self.others) {
            if let Some(s) = sample_process(child.process.id()) {
                let t = total.get_or_insert(ProcessSample::default());
                t.rss_bytes += s.rss_bytes;
                t.cpu_seconds += s.cpu_seconds;
                t.at = s.at;
            }
        }
        total
    }
}

/// One metric's sum from the metrics endpoint on `port` (see [`Cloud::metric`]).
fn scrape(port: u16, name: &str, labels: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or_default();
        if metric == name && series.contains(labels) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

impl Cloud {
    /// `kill -9` the child and start it again on the same data dir and ports.
    pub fn kill9_and_restart(&mut self) -> anyhow::Result<Duration> {
        let quic = self.quic;
        let Some(child) = self.child.as_mut() else {
            bail!("the cloud-restart scenario needs the cloudcore this run started");
        };
        let _ = child.process.kill();
        let _ = child.process.wait();
        let start = Instant::now();
        child.process = spawn_cloudcore(
            &child.binary,
            child.data_dir.path(),
            child.api_port,
            child.metrics_port,
            quic,
            &[],
        )?;
        Ok(start.elapsed())
    }

    /// Stops the child (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.process.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.process.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.process.kill();
            let _ = child.process.wait();
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        for child in self.child.iter_mut().chain(self.others.iter_mut()) {
            let _ = child.process.kill();
            let _ = child.process.wait();
        }
        if let Some((etcd, _)) = self.etcd.as_mut() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }
}

impl ChildCloud {
    /// cloudcore on a fresh temporary data dir and loopback ports, with `extra` flags; its
    /// QUIC address.
    fn spawn(binary: &Path, extra: &[String]) -> anyhow::Result<(ChildCloud, SocketAddr)> {
        let data_dir = tempfile::Builder::new()
            .prefix("kedge-loadtest-cloud")
            .tempdir()
            .context("creating the cloud's temporary data dir")?;
        let (api_port, metrics_port) = (free_tcp_port()?, free_tcp_port()?);
        let quic: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
        let process =
            spawn_cloudcore(binary, data_dir.path(), api_port, metrics_port, quic, extra)?;
        let child = ChildCloud {
            process,
            binary: binary.to_owned(),
            data_dir,
            api_port,
            metrics_port,
        };
        Ok((child, quic))
    }
}

/// A one-member etcd (Debian's etcd-server) on loopback ports with its data under `dir`, once
/// it answers; the process and its client URL.
///
/// # Errors
/// etcd cannot be started, or does not answer `/health` within 30 s.
pub fn start_etcd(dir: &Path) -> anyhow::Result<(Child, String)> {
    let (client, peer) = (free_tcp_port()?, free_tcp_port()?);
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = Command::new("etcd")
        .args(["--name", "loadtest", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("loadtest={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (Debian's etcd-server)")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_ok(&format!("127.0.0.1:{client}"), "/health") {
        if Instant::now() > deadline {
            let _ = etcd.kill();
            let _ = etcd.wait();
            bail!("etcd did not answer on {endpoint} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((etcd, endpoint))
}

/// Starts cloudcore and waits until its API answers.
fn spawn_cloudcore(
    binary: &Path,
    data_dir: &Path,
    api_port: u16,
    metrics_port: u16,
    quic: SocketAddr,
    extra: &[String],
) -> anyhow::Result<Child> {
    let mut process = Command::new(binary)
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--api-listen")
        .arg(format!("127.0.0.1:{api_port}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--quic-listen")
        .arg(quic.to_string())
        // The whole fleet joins from this one address.
        .args(["--join-rate-limit", "0"])
        .env(
            "RUST_LOG",
            std::env::var("CLOUD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let addr = format!("127.0.0.1:{api_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_ok(&addr, "/healthz") {
        if let Ok(Some(status)) = process.try_wait() {
            bail!("cloudcore exited at start: {status}");
        }
        if Instant::now() > deadline {
            let _ = process.kill();
            bail!("cloudcore did not answer on {addr} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(process)
}

/// A token, from `cloudcore token create` with `place` (`--data-dir DIR` or the etcd flags).
fn make_token(binary: &Path, place: &[String]) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .args(["token", "create", "--ttl", "24h"])
        .args(place)
        .output()
        .context("cloudcore token create")?;
    if !out.status.success() {
        bail!(
            "cloudcore token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .last()
        .map(str::to_owned)
        .context("cloudcore token create printed nothing")
}

/// RSS and CPU time of a process from /proc.
pub fn sample_process(pid: u32) -> Option<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the command name).
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(ProcessSample {
        rss_bytes: rss_kib * 1024,
        cpu_seconds: ticks as f64 / hz,
        at: Some(Instant::now()),
    })
}

/// This process's own sample.
pub fn sample_self() -> Option<ProcessSample> {
    sample_process(std::process::id())
}
