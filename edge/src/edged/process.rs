//! The process runtime: each container is a local process.
//!
//! - `command` + `args` are the argv (the image is recorded, never pulled: there is no image
//!   to take an entrypoint from, so a container without `command` waits with
//!   `ContainerCannotRun`);
//! - the environment is `PATH`, `HOSTNAME`, `KEDGE_POD_ROOT` and the container's resolved env;
//! - the working directory is the pod root, `DATA_DIR/pods/<namespace>_<name>/root`; a volume
//!   mounted at `/etc/config` is at `$KEDGE_POD_ROOT/etc/config`;
//! - stdout and stderr go to `DATA_DIR/pods/<namespace>_<name>/<container>.log` in the CRI log
//!   format (each line with its time and stream, see [`super::logs`]); at a restart the log
//!   becomes `<container>.previous.log` (`kubectl logs --previous`); with `tty: true` the
//!   container runs on a pseudo-terminal instead (stdin, stdout, stderr and its controlling
//!   terminal), whose output is logged as stdout and reaches `kubectl attach -t` raw;
//! - restartPolicy Always/OnFailure/Never with backoff (1 s doubling to 60 s, reset after a
//!   minute of running);
//! - each container runs in a process group of its own, and everything in it belongs to the
//!   container: stopping sends SIGTERM to the group, then SIGKILL to whatever is left of it
//!   after the grace period; when the container's process exits by itself, what it left in
//!   its group is killed; when a pod is stopped, processes that left the group but still
//!   carry the pod's marker (see [`super::procs`]) are killed too;
//! - the container's process dies with edgecore (`PR_SET_PDEATHSIG`); what it forked is found
//!   and killed by the next edgecore on the same data dir before it starts any pod
//!   ([`ProcessRuntime::open`]), so a restart never runs a pod twice;
//! - a pod the runtime does not know yet resumes from the statuses the node last recorded
//!   ([`super::runtime::resume`]): restart counts go on, a container that finished for good
//!   is not run again.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication::api::object;
use tokio_util::sync::CancellationToken;

use super::procs::{self, GroupRecord};
use super::runtime::{
    resume, ContainerRun, ContainerState, ContainerStatus, PodRun, RestartPolicy, Runtime,
    Terminated,
};

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The file under the pods directory that holds the data dir's runtime id.
const RUNTIME_ID_FILE: &str = "runtime-id";
/// How long [`ProcessRuntime::open`] waits for an earlier run's processes to be gone.
const SWEEP_WAIT: Duration = Duration::from_secs(5);

struct PodEntry {
    uid: String,
    statuses: Vec<Arc<Mutex<ContainerStatus>>>,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
    live: Arc<AtomicUsize>,
    files: Vec<(PathBuf, Vec<u8>)>,
}

/// Runs each container as a local process (see the module documentation).
pub struct ProcessRuntime {
    pods: Mutex<HashMap<String, PodEntry>>,
    /// Marks every process of this data dir's pods (environment `KEDGE_RUNTIME_ID`).
    runtime_id: Arc<str>,
}

/// The runtime id kept in `pods_dir`, made on first use: it outlives edgecore, so the next
/// run recognizes the processes of this one.
pub(super) fn runtime_id(pods_dir: &Path) -> String {
    let path = pods_dir.join(RUNTIME_ID_FILE);
    if let Some(id) = std::fs::read_to_string(&path)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
    {
        return id;
    }
    let id = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let tmp = path.with_extension("tmp");
    let written = std::fs::create_dir_all(pods_dir)
        .and_then(|_| std::fs::write(&tmp, &id))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e,
            "cannot keep the runtime id: processes left by this run will not be found by the next");
    }
    id
}

impl ProcessRuntime {
    /// The runtime for the pods under `pods_dir`. Blocks while it kills what an earlier
    /// edgecore on the same data dir left running (see [`procs::sweep`]), so call it before
    /// any pod is started.
    pub fn open(pods_dir: &Path) -> Self {
        let runtime_id = runtime_id(pods_dir);
        let killed = procs::sweep(pods_dir, &runtime_id, SWEEP_WAIT);
        if killed > 0 {
            tracing::info!(killed, "cleaned up after an earlier edgecore");
        }
        ProcessRuntime {
            pods: Mutex::new(HashMap::new()),
            runtime_id: runtime_id.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodEntry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `path` relative to the pod root, refusing anything that would leave it.
fn inside(root: &Path, relative: &Path) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for part in relative.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

pub(super) fn write_files(root: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (relative, contents) in files {
        let Some(path) = inside(root, relative) else {
            tracing::warn!(path = %relative.display(), "volume path leaves the pod root; skipped");
            continue;
        };
        if std::fs::read(&path).is_ok_and(|c| &c == contents) {
            continue;
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let tmp = path.with_extension("kedge-tmp");
        if let Err(e) = std::fs::write(&tmp, contents).and_then(|_| std::fs::rename(&tmp, &path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write a volume file");
        }
    }
}

impl Runtime for ProcessRuntime {
    fn ensure(&self, pod: &PodRun) {
        let mut pods = self.lock();
        if let Some(entry) = pods.get_mut(&pod.id) {
            if entry.files != pod.files {
                write_files(&pod.root, &pod.files);
                entry.files = pod.files.clone();
            }
            return;
        }
        let _ = std::fs::create_dir_all(&pod.root);
        write_files(&pod.root, &pod.files);
        let stop = CancellationToken::new();
        let grace = Arc::new(Mutex::new(Duration::from_secs(30)));
        let live = Arc::new(AtomicUsize::new(pod.containers.len()));
        let mut statuses = Vec::new();
        let pod_dir = pod.root.parent().unwrap_or(&pod.root);
        for container in &pod.containers {
            let (status, start) = resume(container, pod.restart_policy, &pod.recorded);
            let status = Arc::new(Mutex::new(status));
            statuses.push(status.clone());
            let supervisor = Supervisor {
                container: container.clone(),
                root: pod.root.clone(),
                log: pod_dir.join(format!("{}.log", container.name)),
                record: pod_dir.join(format!("{}{}", container.name, procs::RECORD_SUFFIX)),
                hostname: pod.id.rsplit('/').next().unwrap_or_default().to_owned(),
                runtime_id: self.runtime_id.clone(),
                pod_uid: pod.uid.clone(),
                policy: pod.restart_policy,
                start,
                status,
                stop: stop.clone(),
                grace: grace.clone(),
            };
            let live = live.clone();
            tokio::spawn(async move {
                supervisor.run().await;
                live.fetch_sub(1, Ordering::AcqRel);
            });
        }
        pods.insert(
            pod.id.clone(),
            PodEntry {
                uid: pod.uid.clone(),
                statuses,
                stop,
                grace,
                live,
                files: pod.files.clone(),
            },
        );
    }

    fn stop(&self, id: &str, grace: Duration) {
        if let Some(entry) = self.lock().get(id) {
            if !entry.stop.is_cancelled() {
                *entry.grace.lock().unwrap_or_else(|p| p.into_inner()) = grace;
                entry.stop.cancel();
            }
        }
    }

    fn status(&self, id: &str) -> Option<Vec<ContainerStatus>> {
        self.lock().get(id).map(|entry| {
            entry
                .statuses
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect()
        })
    }

    fn reap(&self, id: &str) -> bool {
        let mut pods = self.lock();
        match pods.get(id) {
            None => true,
            Some(entry) if entry.stop.is_cancelled() && entry.live.load(Ordering::Acquire) == 0 => {
                // Processes that left their container's group (setsid, a double fork) but
                // carry the pod's marker go with the pod.
                if !entry.uid.is_empty() {
                    let left =
                        procs::kill_marked(&procs::markers(&self.runtime_id, Some(&entry.uid)));
                    if !left.is_empty() {
                        tracing::info!(pod = %id, pids = ?left, "killed processes the pod left outside its groups");
                    }
                }
                pods.remove(id);
                true
            }
            Some(_) => false,
        }
    }

    fn pods(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn shutdown(&self, grace: Duration) {
        for id in self.pods() {
            self.stop(&id, grace);
        }
    }
}

/// The stdin of a running container started with `stdin: true`, which `kubectl attach -i`
/// writes to: a pipe, or the container's terminal with `tty: true`. Held by this edgecore
/// only (the container dies with it anyway, see the module documentation).
#[derive(Clone)]
pub struct ContainerStdin {
    pipe: Arc<tokio::sync::Mutex<Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>>>,
    /// `stdinOnce`: closed when the first attach session that used it ends.
    pub once: bool,
    /// The container's terminal: closing sends `^D` (a terminal has no end of file).
    terminal: bool,
}

impl ContainerStdin {
    /// A container's stdin writing to `writer` (`terminal`: the container's terminal).
    fn new(
        writer: impl tokio::io::AsyncWrite + Send + Unpin + 'static,
        once: bool,
        terminal: bool,
    ) -> Self {
        ContainerStdin {
            pipe: Arc::new(tokio::sync::Mutex::new(Some(Box::new(writer)))),
            once,
            terminal,
        }
    }

    /// Writes to the container's stdin; false once it is closed (or the container ended).
    pub async fn write(&self, bytes: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        let mut pipe = self.pipe.lock().await;
        let Some(p) = pipe.as_mut() else {
            return false;
        };
        if p.write_all(bytes).await.is_err() || p.flush().await.is_err() {
            *pipe = None;
            return false;
        }
        true
    }

    /// Closes the container's stdin (it reads end of file).
    pub async fn close(&self) {
        if self.terminal {
            self.write(&[4]).await;
        }
        self.pipe.lock().await.take();
    }
}

/// The terminal of a running container started with `tty: true`: its output as it comes
/// (raw bytes, for `kubectl attach -t`; the log gets it too) and its window size.
#[derive(Clone)]
pub struct ContainerTerminal {
    master: Arc<std::os::fd::OwnedFd>,
    output: tokio::sync::broadcast::Sender<Vec<u8>>,
}

impl ContainerTerminal {
    /// The container's output from now on. A receiver that falls more than 64 reads behind
    /// loses the oldest (`Lagged`): a slow client never holds the container back. Closed when
    /// the container's terminal is.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Vec<u8>> {
        self.output.subscribe()
    }

    /// Sets the window size (columns, rows).
    pub fn resize(&self, width: u16, height: u16) {
        crate::pty::set_window(&*self.master, width, height);
    }
}

/// What an attach session can reach of a running container besides its log.
#[derive(Clone, Default)]
struct Attachable {
    stdin: Option<ContainerStdin>,
    terminal: Option<ContainerTerminal>,
}

type Attachables = Mutex<HashMap<PathBuf, Attachable>>;

fn attachables() -> &'static Attachables {
    static ATTACHABLES: std::sync::OnceLock<Attachables> = std::sync::OnceLock::new();
    ATTACHABLES.get_or_init(Default::default)
}

fn register_attachable(log: &Path, attachable: Attachable) {
    attachables()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(log.to_owned(), attachable);
}

fn unregister_attachable(log: &Path) {
    attachables()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(log);
}

fn attachable(log: &Path) -> Attachable {
    attachables()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(log)
        .cloned()
        .unwrap_or_default()
}

/// The stdin of the running container whose log file is `log` (`<pod dir>/<container>.log`),
/// if it was started with `stdin: true` by this edgecore.
pub fn container_stdin(log: &Path) -> Option<ContainerStdin> {
    attachable(log).stdin
}

/// The terminal of the running container whose log file is `log`, if it was started with
/// `tty: true` by this edgecore.
pub fn container_terminal(log: &Path) -> Option<ContainerTerminal> {
    attachable(log).terminal
}

/// Reads a container's terminal for its log, passing each chunk to attached clients as well.
struct Tee<R> {
    inner: R,
    output: tokio::sync::broadcast::Sender<Vec<u8>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tee<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &poll {
            let new = &buf.filled()[before..];
            // Copied only while someone is attached.
            if !new.is_empty() && this.output.receiver_count() > 0 {
                let _ = this.output.send(new.to_vec());
            }
        }
        poll
    }
}

/// A started container's terminal: the log gets its output (as stdout, as CRI runtimes log a
/// terminal), attach sessions its output, input and window size.
fn attach_terminal(
    log: &Path,
    master: std::os::fd::OwnedFd,
    stdin: bool,
    once: bool,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let (output, _) = tokio::sync::broadcast::channel(64);
    let reader = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
    let stdin = if stdin {
        let writer = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
        Some(ContainerStdin::new(writer, once, true))
    } else {
        None
    };
    let tee = Tee {
        inner: reader,
        output: output.clone(),
    };
    register_attachable(
        log,
        Attachable {
            stdin,
            terminal: Some(ContainerTerminal {
                master: Arc::new(master),
                output,
            }),
        },
    );
    Ok(tokio::spawn(super::logs::copy_to_log(
        tee,
        log.to_owned(),
        "stdout",
    )))
}

struct Supervisor {
    container: ContainerRun,
    root: PathBuf,
    log: PathBuf,
    /// Where the running process group is recorded (for the next edgecore, if this one dies).
    record: PathBuf,
    hostname: String,
    runtime_id: Arc<str>,
    pod_uid: String,
    policy: RestartPolicy,
    /// Whether to run the container at all (not when it finished for good before a restart).
    start: bool,
    status: Arc<Mutex<ContainerStatus>>,
    stop: CancellationToken,
    grace: Arc<Mutex<Duration>>,
}

impl Supervisor {
    fn set_state(&self, state: ContainerState) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).state = state;
    }

    /// The container's command, and with `tty: true` the terminal `(master, slave)` it runs
    /// on (the slave is to be closed once the command is spawned).
    #[allow(clippy::type_complexity)]
    fn command(
        &self,
    ) -> std::io::Result<(
        tokio::process::Command,
        Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    )> {
        let argv = &self.container.argv;
        let mut command = tokio::process::Command::new(&argv[0]);
        command.args(&argv[1..]);
        command.env_clear();
        command.env("PATH", PATH);
        command.env("HOSTNAME", &self.hostname);
        command.env("KEDGE_POD_ROOT", &self.root);
        command.envs(self.container.env.iter().map(|(k, v)| (k, v)));
        // The markers come last: the pod's own env cannot override them.
        command.env(procs::RUNTIME_ID_VAR, &*self.runtime_id);
        command.env(procs::POD_UID_VAR, &self.pod_uid);
        command.current_dir(&self.root);
        if self.container.tty {
            // A terminal as stdin, stdout and stderr, and as the controlling terminal of the
            // session the container leads (its process group: pgid = pid, as below).
            let (master, slave) = crate::pty::open()?;
            let (stdin, stdout, stderr) = crate::pty::stdio(&slave)?;
            command.stdin(stdin).stdout(stdout).stderr(stderr);
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                command.pre_exec(crate::pty::become_session_leader);
            }
            return Ok((command, Some((master, slave))));
        }
        // Through pipes, so that each line gets its time (the CRI log format, see
        // `super::logs`); the container dies with edgecore anyway (PDEATHSIG below).
        command.stdout(std::process::Stdio::piped());
        command.stderr(std::process::Stdio::piped());
        // `stdin: true`: a pipe kept open for `kubectl attach -i` ([`container_stdin`]).
        command.stdin(if self.container.stdin {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
        command.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((command, None))
    }

    /// Waits out `delay` unless stopped first; returns whether it was stopped.
    async fn wait_or_stop(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = self.stop.cancelled() => true,
        }
    }

    async fn run(self) {
        if !self.start {
            return;
        }
        if self.container.argv.is_empty() {
            self.set_state(ContainerState::Waiting {
                reason: "ContainerCannotRun".into(),
                message: "the process runtime runs spec.containers[].command; images are not \
                          pulled, so a container needs a command"
                    .into(),
            });
            self.stop.cancelled().await;
            return;
        }
        let mut backoff = INITIAL_BACKOFF;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            // The last instance's log stays readable as `kubectl logs --previous`.
            super::logs::rotate(&self.log);
            let mut terminal = None;
            let spawned = self.command().and_then(|(mut c, pty)| {
                let child = c.spawn()?;
                // Only the child keeps the slave: the master reads end of input when it ends.
                terminal = pty.map(|(master, _slave)| master);
                Ok(child)
            });
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    self.set_state(ContainerState::Waiting {
                        reason: "RunContainerError".into(),
                        message: format!("{}: {e}", self.container.argv[0]),
                    });
                    if self.wait_or_stop(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if let Some(pipe) = child.stdin.take() {
                let stdin = ContainerStdin::new(pipe, self.container.stdin_once, false);
                register_attachable(
                    &self.log,
                    Attachable {
                        stdin: Some(stdin),
                        terminal: None,
                    },
                );
            }
            let terminal_copy = terminal.and_then(|master| {
                let (stdin, once) = (self.container.stdin, self.container.stdin_once);
                attach_terminal(&self.log, master, stdin, once)
                    .inspect_err(|e| tracing::warn!(error = %e, "the container's terminal"))
                    .ok()
            });
            let copies: Vec<_> =
                [
                    terminal_copy,
                    child.stdout.take().map(|p| {
                        tokio::spawn(super::logs::copy_to_log(p, self.log.clone(), "stdout"))
                    }),
                    child.stderr.take().map(|p| {
                        tokio::spawn(super::logs::copy_to_log(p, self.log.clone(), "stderr"))
                    }),
                ]
                .into_iter()
                .flatten()
                .collect();
            let started = Instant::now();
            let started_at = object::now_rfc3339();
            // The group the child leads (`process_group(0)`); recorded for the next edgecore.
            let pgid = child.id().map_or(0, |p| p as i32);
            self.record_group(pgid);
            self.set_state(ContainerState::Running {
                started_at: started_at.clone(),
            });
            let (exit, stopped) = tokio::select! {
                exit = child.wait() => (exit, false),
                _ = self.stop.cancelled() => (self.terminate(&mut child, pgid).await, true),
            };
            unregister_attachable(&self.log);
            // Whatever the container's process left in its group dies with it.
            procs::signal_group(pgid, libc::SIGKILL);
            // Its last lines are in the log before its end is reported. Bounded: a process
            // that left the group may hold the pipes open.
            for copy in copies {
                let _ = tokio::time::timeout(Duration::from_secs(2), copy).await;
            }
            let _ = std::fs::remove_file(&self.record);
            let code = match exit {
                Ok(status) => status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                Err(_) => 255,
            };
            let terminated = Terminated {
                exit_code: code,
                reason: if code == 0 { "Completed" } else { "Error" }.into(),
                started_at,
                finished_at: object::now_rfc3339(),
            };
            {
                let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
                status.state = ContainerState::Terminated(terminated.clone());
                status.last_termination = Some(terminated);
            }
            if stopped || !self.policy.restarts(code) {
                return;
            }
            if started.elapsed() >= MAX_BACKOFF {
                backoff = INITIAL_BACKOFF;
            }
            {
                let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
                status.restart_count += 1;
                status.state = ContainerState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: format!("back-off {backoff:?} restarting the container"),
                };
            }
            if self.wait_or_stop(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn record_group(&self, pgid: i32) {
        let Some(record) = GroupRecord::of(pgid) else {
            return;
        };
        if let Err(e) = std::fs::write(&self.record, record.encode()) {
            tracing::warn!(path = %self.record.display(), error = %e,
                "cannot record the container's process group");
        }
    }

    /// SIGTERM to the process group, SIGKILL to what is left of it after the grace period
    /// (members that outlive the container's own process get the rest of it too).
    async fn terminate(
        &self,
        child: &mut tokio::process::Child,
        pgid: i32,
    ) -> std::io::Result<std::process::ExitStatus> {
        let grace = *self.grace.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = tokio::time::Instant::now() + grace;
        procs::signal_group(pgid, libc::SIGTERM);
        let exit = match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(exit) => exit,
            Err(_) => {
                procs::signal_group(pgid, libc::SIGKILL);
                child.wait().await
            }
        };
        // Bounded by the deadline: a poll every 50 ms until the group is empty.
        while !procs::group_empty(pgid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        procs::signal_group(pgid, libc::SIGKILL);
        exit
    }
}
