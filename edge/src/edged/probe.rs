//! Container probes (`startupProbe`, `livenessProbe`, `readinessProbe`), as kubelet runs them:
//! `exec` (a command in the container; success is exit code 0), `httpGet` (a status in
//! 200–399), `tcpSocket` (a connection), each with `initialDelaySeconds`, `periodSeconds`
//! (10), `timeoutSeconds` (1), `successThreshold` (1) and `failureThreshold` (3).
//!
//! - Until the startup probe succeeds, the others do not run and the container is not
//!   `started`; once it fails `failureThreshold` times in a row, the container is restarted.
//! - A readiness probe decides the container's `ready` (false until it succeeds), and so the
//!   pod's `Ready` condition (what Services and Deployment rollouts go by).
//! - A liveness probe failing `failureThreshold` times in a row restarts the container: it is
//!   stopped (its grace period) and its restart policy brings it back.
//!
//! Each running container instance with probes gets one task ([`Prober::sync`]); a new
//! instance (restart) starts from scratch. Failures are recorded as kubelet's `Unhealthy`
//! events, restarts as `Killing`. [`ProbeState`] is the sans-IO part: thresholds over results.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replication::api::object::Object;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::events::Recorder;
use crate::meta::MetaManager;

/// What a probe runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    Exec(Vec<String>),
    Http {
        https: bool,
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
}

/// One probe of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub handler: Handler,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// A container's probes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    pub startup: Option<ProbeSpec>,
    pub liveness: Option<ProbeSpec>,
    pub readiness: Option<ProbeSpec>,
}

impl Probes {
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.liveness.is_none() && self.readiness.is_none()
    }
}

/// A port given as a number or as the name of one of the container's ports.
fn port_of(value: Option<&Value>, container: &Value) -> Option<u16> {
    match value? {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok(),
        Value::String(name) => container
            .get("ports")?
            .as_array()?
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| u16::try_from(p.get("containerPort")?.as_u64()?).ok()),
        _ => None,
    }
}

fn probe(spec: &Value, container: &Value) -> Option<ProbeSpec> {
    let seconds = |field: &str, default: u64| {
        Duration::from_secs(spec.get(field).and_then(Value::as_u64).unwrap_or(default))
    };
    let count = |field: &str, default: u32| {
        spec.get(field)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(default)
    };
    let handler = if let Some(exec) = spec.get("exec") {
        let command: Vec<String> = exec
            .get("command")?
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        if command.is_empty() {
            return None;
        }
        Handler::Exec(command)
    } else if let Some(http) = spec.get("httpGet") {
        Handler::Http {
            https: http.get("scheme").and_then(Value::as_str) == Some("HTTPS"),
            host: http.get("host").and_then(Value::as_str).map(str::to_owned),
            port: port_of(http.get("port"), container)?,
            path: http
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/")
                .to_owned(),
            headers: http
                .get("httpHeaders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|h| {
                    Some((
                        h.get("name")?.as_str()?.to_owned(),
                        h.get("value")?.as_str()?.to_owned(),
                    ))
                })
                .collect(),
        }
    } else if let Some(tcp) = spec.get("tcpSocket") {
        Handler::Tcp {
            host: tcp.get("host").and_then(Value::as_str).map(str::to_owned),
            port: port_of(tcp.get("port"), container)?,
        }
    } else {
        return None;
    };
    Some(ProbeSpec {
        handler,
        initial_delay: seconds("initialDelaySeconds", 0),
        period: seconds("periodSeconds", 10).max(Duration::from_secs(1)),
        timeout: seconds("timeoutSeconds", 1).max(Duration::from_secs(1)),
        success_threshold: count("successThreshold", 1),
        failure_threshold: count("failureThreshold", 3),
    })
}

/// The probes of a container spec (`spec.containers[]`).
pub fn probes_of(container: &Value) -> Probes {
    let read = |field: &str| container.get(field).and_then(|p| probe(p, container));
    Probes {
        startup: read("startupProbe"),
        liveness: read("livenessProbe"),
        readiness: read("readinessProbe"),
    }
}

/// Consecutive results against a probe's thresholds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeState {
    successes: u32,
    failures: u32,
}

/// What a result means, once a threshold is crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
}

impl ProbeState {
    /// Records a result; the verdict when its threshold is reached (every time after, too).
    pub fn record(&mut self, spec: &ProbeSpec, ok: bool) -> Option<Verdict> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes >= spec.success_threshold).then_some(Verdict::Success)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures >= spec.failure_threshold).then_some(Verdict::Failure)
        }
    }
}

/// What probing says of a running container: whether it has started (its startup probe
/// passed, or it has none) and whether it is ready (`None`: no readiness probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    pub started: bool,
    pub ready: Option<bool>,
}

/// How a probe reaches its container.
#[derive(Clone)]
pub struct ProbeTarget {
    /// The pod's directory (`DATA_DIR/pods/<ns>_<name>`), where the runtimes keep what
    /// `kubectl exec` uses.
    pub pod_dir: PathBuf,
    pub container: String,
    /// The pod's address from the node (its IP, or loopback when it shares the host's).
    pub address: IpAddr,
    /// How long the container has to stop when a probe restarts it.
    pub grace: Duration,
}

/// Runs one probe once: `Ok(())` or why it failed.
async fn run_once(spec: &ProbeSpec, target: &ProbeTarget) -> Result<(), String> {
    let timeout = spec.timeout;
    let host = |host: &Option<String>| host.clone().unwrap_or_else(|| target.address.to_string());
    let attempt = async {
        match &spec.handler {
            Handler::Exec(command) => exec(command, target, timeout).await,
            Handler::Tcp { host: h, port } => tokio::net::TcpStream::connect((host(h), *port))
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {}:{port}: {e}", host(h))),
            Handler::Http {
                https,
                host: h,
                port,
                path,
                headers,
            } => {
                if *https {
                    return Err("HTTPS probes are not supported on this node yet".into());
                }
                http_get(&host(h), *port, path, headers).await
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timeout: no answer within {timeout:?}")),
    }
}

/// An exec probe: through CRI `ExecSync` for a CRI container, else the command with the
/// process runtime container's environment and working directory.
async fn exec(command: &[String], target: &ProbeTarget, timeout: Duration) -> Result<(), String> {
    let Some(running) = crate::exec::context(&target.pod_dir, &target.container) else {
        return Err("the container is not running".into());
    };
    if let Some(cri) = running.cri {
        let answer = cri
            .client
            .exec_sync(&cri.container_id, command.to_vec(), timeout)
            .await
            .map_err(|e| e.message().to_owned())?;
        return if answer.exit_code == 0 {
            Ok(())
        } else {
            Err(format!(
                "command {command:?} exited with {}: {}",
                answer.exit_code,
                String::from_utf8_lossy(&answer.stdout).trim()
            ))
        };
    }
    let status = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env_clear()
        .envs(running.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&running.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("{}: {e}", command[0]))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("command {command:?} exited with {status}"))
    }
}

/// An HTTP/1.1 GET (hyper); a status in 200–399 is a success, as kubelet's.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("Get \"http://{host}:{port}{path}\": dial tcp: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::USER_AGENT, "kube-probe/1.32");
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(axum::body::Body::empty())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let code = response.status().as_u16();
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// Stops a container so that its restart policy starts it again (a failed liveness or
/// startup probe): `StopContainer` for a CRI container, else SIGTERM to its process group
/// and SIGKILL after the grace period.
async fn restart(target: &ProbeTarget) {
    let Some(running) = crate::exec::context(&target.pod_dir, &target.container) else {
        return;
    };
    if let Some(cri) = running.cri {
        if let Err(e) = cri
            .client
            .stop_container(&cri.container_id, target.grace)
            .await
        {
            tracing::warn!(container = %target.container, error = %e, "cannot stop a container that failed its probe");
        }
        return;
    }
    let pgid = running.group.pgid;
    super::procs::signal_group(pgid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + target.grace;
    while !super::procs::group_empty(pgid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    super::procs::signal_group(pgid, libc::SIGKILL);
}

type Key = (String, String);

/// The probe tasks of this node's containers and what they found.
pub struct Prober {
    meta: Arc<MetaManager>,
    events: Arc<Mutex<Recorder>>,
    /// Per (pod uid, container): the instance probed (its start time) and its task.
    tasks: HashMap<Key, (String, CancellationToken)>,
    results: Arc<Mutex<HashMap<Key, Probed>>>,
    /// Notified when a result changes what the pod's status says.
    changed: Arc<Notify>,
}

impl Prober {
    pub fn new(meta: Arc<MetaManager>, events: Arc<Mutex<Recorder>>) -> Prober {
        Prober {
            meta,
            events,
            tasks: HashMap::new(),
            results: Arc::new(Mutex::new(HashMap::new())),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Notified when a probe result changes.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Probes the running instance (`started_at`) of each container of `pod` that has
    /// probes: a new instance gets a new task, a stopped one loses its own. Returns what the
    /// probes say, by container name.
    pub fn sync(
        &mut self,
        pod: &Object,
        running: &[(String, String)],
        target_of: impl Fn(&str) -> ProbeTarget,
    ) -> HashMap<String, Probed> {
        let uid = replication::api::object::meta_str(pod, "uid")
            .unwrap_or_default()
            .to_owned();
        let specs: HashMap<String, Probes> = pod
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let name = c.get("name")?.as_str()?.to_owned();
                Some((name, probes_of(c)))
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let mut out = HashMap::new();
        for (name, probes) in &specs {
            let key = (uid.clone(), name.clone());
            let instance = running.iter().find(|(n, _)| n == name).map(|(_, s)| s);
            match instance {
                Some(started_at) => {
                    let current = self.tasks.get(&key).map(|(s, _)| s);
                    if current != Some(started_at) {
                        if let Some((_, old)) = self.tasks.remove(&key) {
                            old.cancel();
                        }
                        let initial = Probed {
                            started: probes.startup.is_none(),
                            ready: probes.readiness.as_ref().map(|_| false),
                        };
                        self.lock().insert(key.clone(), initial);
                        let stop = CancellationToken::new();
                        tokio::spawn(self.clone_for_task().work(
                            key.clone(),
                            probes.clone(),
                            target_of(name),
                            pod.clone(),
                            stop.clone(),
                        ));
                        self.tasks.insert(key.clone(), (started_at.clone(), stop));
                    }
                    if let Some(probed) = self.lock().get(&key) {
                        out.insert(name.clone(), *probed);
                    }
                }
                None => {
                    if let Some((_, old)) = self.tasks.remove(&key) {
                        old.cancel();
                    }
                    self.lock().remove(&key);
                }
            }
        }
        out
    }

    /// Stops probing pods other than `live` (by uid).
    pub fn retain(&mut self, live: &std::collections::HashSet<String>) {
        self.tasks.retain(|(uid, _), (_, stop)| {
            let keep = live.contains(uid);
            if !keep {
                stop.cancel();
            }
            keep
        });
        self.lock().retain(|(uid, _), _| live.contains(uid));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Probed>> {
        self.results.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn clone_for_task(&self) -> Worker {
        Worker {
            meta: self.meta.clone(),
            events: self.events.clone(),
            results: self.results.clone(),
            changed: self.changed.clone(),
        }
    }
}

/// What a probe task needs.
struct Worker {
    meta: Arc<MetaManager>,
    events: Arc<Mutex<Recorder>>,
    results: Arc<Mutex<HashMap<Key, Probed>>>,
    changed: Arc<Notify>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

impl Worker {
    fn event(
        &self,
        pod: &Object,
        container: &str,
        kind: &'static str,
        reason: &'static str,
        message: String,
    ) {
        let event = {
            let mut recorder = self.events.lock().unwrap_or_else(|p| p.into_inner());
            recorder.event(pod, &(container.to_owned(), kind, reason, message))
        };
        if let Some(event) = event {
            if let Err(e) = self.meta.report_batch(vec![event], Default::default()) {
                tracing::debug!(error = %e, "cannot queue a probe event");
            }
        }
    }

    fn update(&self, key: &Key, change: impl FnOnce(&mut Probed)) {
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(probed) = results.get_mut(key) {
            let before = *probed;
            change(probed);
            if *probed != before {
                self.changed.notify_one();
            }
        }
    }

    /// Probes one container instance until `stop` (or until a probe restarts it).
    async fn work(
        self,
        key: Key,
        probes: Probes,
        target: ProbeTarget,
        pod: Object,
        stop: CancellationToken,
    ) {
        let start = tokio::time::Instant::now();
        let mut schedule: Vec<(Kind, ProbeSpec, ProbeState, tokio::time::Instant)> = [
            (Kind::Startup, probes.startup),
            (Kind::Liveness, probes.liveness),
            (Kind::Readiness, probes.readiness),
        ]
        .into_iter()
        .filter_map(|(kind, spec)| {
            let spec = spec?;
            let first = start + spec.initial_delay;
            Some((kind, spec, ProbeState::default(), first))
        })
        .collect();
        let mut started = probes_started(&schedule);
        loop {
            // The next probe due (startup first while the container has not started).
            let Some(next) = schedule
                .iter()
                .enumerate()
                .filter(|(_, (kind, ..))| started || *kind == Kind::Startup)
                .min_by_key(|(_, (.., at))| *at)
                .map(|(i, _)| i)
            else {
                // Started and nothing else to probe.
                stop.cancelled().await;
                return;
            };
            let at = schedule[next].3;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = stop.cancelled() => return,
            }
            let (kind, spec) = (schedule[next].0, schedule[next].1.clone());
            let result = tokio::select! {
                result = run_once(&spec, &target) => result,
                _ = stop.cancelled() => return,
            };
            if stop.is_cancelled() {
                return;
            }
            let verdict = schedule[next].2.record(&spec, result.is_ok());
            schedule[next].3 = at + spec.period;
            if let Err(why) = &result {
                self.event(
                    &pod,
                    &target.container,
                    "Warning",
                    "Unhealthy",
                    format!("{} probe failed: {why}", kind.name()),
                );
            }
            match (kind, verdict) {
                (Kind::Startup, Some(Verdict::Success)) => {
                    started = true;
                    schedule.retain(|(k, ..)| *k != Kind::Startup);
                    let now = tokio::time::Instant::now();
                    for entry in &mut schedule {
                        entry.3 = entry.3.max(now);
                    }
                    self.update(&key, |p| p.started = true);
                }
                (Kind::Readiness, Some(v)) => {
                    self.update(&key, |p| p.ready = Some(v == Verdict::Success));
                }
                (Kind::Startup | Kind::Liveness, Some(Verdict::Failure)) => {
                    self.event(
                        &pod,
                        &target.container,
                        "Normal",
                        "Killing",
                        format!(
                            "Container {} failed {} probe, will be restarted",
                            target.container,
                            kind.name().to_ascii_lowercase()
                        ),
                    );
                    self.update(&key, |p| {
                        if p.ready.is_some() {
                            p.ready = Some(false);
                        }
                    });
                    restart(&target).await;
                    // The next instance is probed by a task of its own.
                    stop.cancelled().await;
                    return;
                }
                _ => {}
            }
        }
    }
}

fn probes_started(schedule: &[(Kind, ProbeSpec, ProbeState, tokio::time::Instant)]) -> bool {
    !schedule.iter().any(|(kind, ..)| *kind == Kind::Startup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_are_read_as_kubelet_defaults_them() {
        let container = json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 1},
            "startupProbe": {"exec": {"command": ["cat", "/tmp/up"]}, "initialDelaySeconds": 5},
        });
        let probes = probes_of(&container);
        let readiness = probes.readiness.unwrap();
        assert_eq!(
            readiness.handler,
            Handler::Http {
                https: false,
                host: None,
                port: 8080,
                path: "/healthz".into(),
                headers: vec![]
            }
        );
        assert_eq!(readiness.period, Duration::from_secs(2));
        assert_eq!(readiness.timeout, Duration::from_secs(1));
        assert_eq!(
            (readiness.success_threshold, readiness.failure_threshold),
            (1, 3)
        );
        assert_eq!(probes.liveness.unwrap().failure_threshold, 1);
        let startup = probes.startup.unwrap();
        assert_eq!(startup.initial_delay, Duration::from_secs(5));
        assert_eq!(startup.period, Duration::from_secs(10));
        // A named port nobody declares: no probe (kube-apiserver would refuse the pod).
        let bad = json!({"readinessProbe": {"tcpSocket": {"port": "nope"}}});
        assert!(probes_of(&bad).is_empty());
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let spec = ProbeSpec {
            handler: Handler::Tcp {
                host: None,
                port: 1,
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let mut state = ProbeState::default();
        assert_eq!(state.record(&spec, false), None);
        assert_eq!(state.record(&spec, false), None);
        assert_eq!(
            state.record(&spec, true),
            None,
            "a success resets the failures"
        );
        assert_eq!(state.record(&spec, true), Some(Verdict::Success));
        assert_eq!(state.record(&spec, false), None);
        assert_eq!(state.record(&spec, false), None);
        assert_eq!(state.record(&spec, false), Some(Verdict::Failure));
    }
}
