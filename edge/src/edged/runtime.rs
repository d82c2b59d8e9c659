//! The runtime interface Edged drives, and what it reports back. A runtime runs a pod's
//! containers and keeps their state; Edged turns that state into the pod's status.

use std::path::PathBuf;
use std::time::Duration;

/// A pod as a runtime needs it: everything resolved (env values, file contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRun {
    /// `namespace/name`.
    pub id: String,
    pub uid: String,
    pub restart_policy: RestartPolicy,
    /// The pod's root directory: volumes are written under it at their `mountPath`.
    pub root: PathBuf,
    /// Files to keep under `root` (ConfigMap and Secret volumes), path relative to `root`.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub containers: Vec<ContainerRun>,
    /// `spec.initContainers`, run to completion in order before `containers` (the CRI
    /// runtime; the process runtime does not run them).
    pub init_containers: Vec<ContainerRun>,
    /// The containers' statuses as the node last recorded them (empty for a pod this node has
    /// never reported). A runtime that does not know the pod yet (edgecore restarted) resumes
    /// from them with [`resume`]: restart counts go on from there, and a container that
    /// terminated for good is not run again.
    pub recorded: Vec<ContainerStatus>,
    /// Registry credentials from the pod's `imagePullSecrets`, in their order.
    pub pull_secrets: Vec<RegistryAuth>,
    /// `spec.hostNetwork`: the pod shares the node's network namespace (CRI: a sandbox with
    /// `NamespaceMode::NODE` and no hostname of its own).
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    /// `command` followed by `args` (empty without `command`: the process runtime has no
    /// image to take an entrypoint from).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `stdin: true`: the container's stdin is a pipe kept open for `kubectl attach -i`.
    pub stdin: bool,
    /// `stdinOnce: true`: that pipe closes when the first attach session that used it ends.
    pub stdin_once: bool,
    /// `tty: true`: the container gets a terminal (`kubectl attach -t`).
    pub tty: bool,
    /// `command` alone (CRI: overrides the image's entrypoint when not empty).
    pub command: Vec<String>,
    /// `args` alone (CRI: overrides the image's `Cmd` when not empty).
    pub args: Vec<String>,
    /// `workingDir`, if set (CRI: else the image's).
    pub working_dir: Option<String>,
    /// `imagePullPolicy`, defaulted as the API server does.
    pub pull_policy: PullPolicy,
    /// The container's volume mounts, resolved to directories on the node.
    pub mounts: Vec<MountRun>,
    /// `securityContext.privileged`.
    pub privileged: bool,
    /// `securityContext` (the container's over the pod's): user, group, read-only root.
    pub security: SecurityRun,
    /// `resources` as a CRI runtime applies them.
    pub resources: ResourcesRun,
    /// `ports[]` with a `hostPort`: (protocol `TCP|UDP|SCTP`, containerPort, hostPort, hostIP).
    pub host_ports: Vec<(String, i32, i32, String)>,
}

/// The common `securityContext` fields; the container's value wins over the pod's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityRun {
    /// `runAsUser`.
    pub run_as_user: Option<i64>,
    /// `runAsGroup`.
    pub run_as_group: Option<i64>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
}

/// A container's `resources`, in the units CRI takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourcesRun {
    /// CPU request in millicores (defaults to the limit, as the API server defaults it).
    pub cpu_request_millis: Option<u64>,
    /// CPU limit in millicores.
    pub cpu_limit_millis: Option<u64>,
    /// Memory limit in bytes.
    pub memory_limit_bytes: Option<i64>,
}

/// A Kubernetes quantity (`500m`, `2`, `0.5`, `64Mi`, `1G`, `1e3`) times `scale` (1000 for
/// millicores, 1 for bytes), rounded up; `None` if it does not parse.
pub fn quantity(text: &str, scale: f64) -> Option<u64> {
    let text = text.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    let (number, factor) = suffixes
        .iter()
        .find_map(|(suffix, factor)| Some((text.strip_suffix(suffix)?, *factor)))
        .unwrap_or((text, 1.0));
    let value: f64 = number.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Some((value * factor * scale).ceil() as u64)
}

/// One registry's credentials from a `kubernetes.io/dockerconfigjson` (or `dockercfg`) Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// The registry as the Secret names it, without scheme or path: `HOST[:PORT]`
    /// (`docker.io` for Docker Hub's `https://index.docker.io/v1/`).
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log.
        f.debug_struct("RegistryAuth")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The registry host of an image reference (`HOST[:PORT]`), `docker.io` when the reference
/// names none (as containerd resolves `busybox` and `library/busybox`).
pub fn image_registry(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_owned()
        }
        _ => "docker.io".to_owned(),
    }
}

/// A container's `imagePullPolicy` (Kubernetes' `PullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull at every container start.
    Always,
    /// Pull only when the node does not have the image.
    IfNotPresent,
    /// Never pull: a missing image is `ErrImageNeverPull`.
    Never,
}

impl PullPolicy {
    /// The policy written in a container spec, or the API server's default for `image` when
    /// none is: `Always` for the tag `latest` or no tag (and no digest), else `IfNotPresent`.
    pub fn of(text: Option<&str>, image: &str) -> Self {
        match text {
            Some("Always") => PullPolicy::Always,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            Some("Never") => PullPolicy::Never,
            _ => {
                if image.contains('@') {
                    return PullPolicy::IfNotPresent;
                }
                // The tag is after the last ':' that follows the last '/' (a registry port
                // is not a tag).
                let last = image.rsplit('/').next().unwrap_or(image);
                match last.rsplit_once(':') {
                    Some((_, tag)) if tag != "latest" => PullPolicy::IfNotPresent,
                    _ => PullPolicy::Always,
                }
            }
        }
    }
}

/// A volume mounted into a container: a directory (or file) of the node at `container_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRun {
    /// `volumeMounts[].mountPath`, absolute in the container.
    pub container_path: String,
    /// The node's path: under the pod root for configMap and secret volumes, the pod's
    /// `volumes/<name>` directory for emptyDir, the path itself for hostPath.
    pub host_path: PathBuf,
    /// `readOnly` (always for configMap and secret volumes, as kubelet mounts them).
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        }
    }

    /// Whether a container that exited with `code` is started again.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub started_at: String,
    pub finished_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Waiting { reason: String, message: String },
    Running { started_at: String },
    Terminated(Terminated),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    pub state: ContainerState,
    pub last_termination: Option<Terminated>,
    pub restart_count: u32,
}

/// How a runtime that does not know a pod takes up one of its containers: the status to start
/// from and whether to run the container.
///
/// - nothing recorded: a new container, run it;
/// - terminated with an exit the policy does not restart: it stays terminated, never run again;
/// - terminated with an exit the policy restarts: it was about to be restarted, so it is, one
///   restart more;
/// - running or waiting (edgecore died under it, or it was in back-off): it runs again with
///   the restarts it had.
pub fn resume(
    container: &ContainerRun,
    policy: RestartPolicy,
    recorded: &[ContainerStatus],
) -> (ContainerStatus, bool) {
    let fresh = ContainerStatus {
        name: container.name.clone(),
        image: container.image.clone(),
        state: ContainerState::Waiting {
            reason: "ContainerCreating".into(),
            message: String::new(),
        },
        last_termination: None,
        restart_count: 0,
    };
    let Some(held) = recorded.iter().find(|c| c.name == container.name) else {
        return (fresh, true);
    };
    let mut status = ContainerStatus {
        last_termination: held.last_termination.clone(),
        restart_count: held.restart_count,
        ..fresh
    };
    match &held.state {
        ContainerState::Terminated(t) if !policy.restarts(t.exit_code) => {
            status.state = held.state.clone();
            status.last_termination = Some(t.clone());
            (status, false)
        }
        ContainerState::Terminated(t) => {
            status.last_termination = Some(t.clone());
            status.restart_count += 1;
            (status, true)
        }
        ContainerState::Running { .. } | ContainerState::Waiting { .. } => (status, true),
    }
}

/// Runs pods. Every call returns at once; the work happens in the background.
pub trait Runtime: Send + Sync + 'static {
    /// Makes `pod` run (idempotent). Files are brought up to date on every call.
    fn ensure(&self, pod: &PodRun);
    /// Starts stopping the pod: SIGTERM, then SIGKILL after `grace`.
    fn stop(&self, id: &str, grace: Duration);
    /// The pod's containers, or `None` if the runtime does not know the pod.
    fn status(&self, id: &str) -> Option<Vec<ContainerStatus>>;
    /// Whether the pod has fully stopped (or is unknown); a stopped pod is forgotten.
    fn reap(&self, id: &str) -> bool;
    /// Pods the runtime knows.
    fn pods(&self) -> Vec<String>;
    /// Stops everything (edgecore is exiting) and waits at most `grace`.
    fn shutdown(&self, grace: Duration);
    /// Notified when a container's state changed, so that Edged reports it at once rather
    /// than at its next periodic pass (once a second); `None`: the periodic pass only.
    fn changed(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// The pod's init containers' statuses, in order (empty when it has none, or when the
    /// runtime does not run init containers).
    fn init_status(&self, _id: &str) -> Vec<ContainerStatus> {
        Vec::new()
    }
    /// The pod's IP when the runtime gives the pod a network of its own (CRI with CNI);
    /// `None`: the node's address.
    fn pod_ip(&self, _id: &str) -> Option<String> {
        None
    }
    /// `container`'s log of pod `id` was rotated ([`super::logs::rotate_if_large`]): the
    /// runtime writes a new file at the same path. The process runtime's writers notice by
    /// themselves; a CRI runtime is asked with `ReopenContainerLog`.
    fn reopen_log(&self, _id: &str, _container: &str) {}

    /// Events about the pod the runtime saw and a status cannot tell (kubelet's `Pulling`,
    /// `Pulled`, `Created`), as `(container, type, reason, message)`, taken once each.
    fn take_events(&self, _id: &str) -> Vec<super::events::Transition> {
        Vec::new()
    }

    /// `(container name, containerID, imageID)` of the pod's containers where the runtime
    /// has them, in Kubernetes' forms (`containerd://<id>`, `<repo>@sha256:<digest>`).
    fn container_ids(&self, _id: &str) -> Vec<(String, String, String)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str) -> ContainerRun {
        ContainerRun {
            name: name.into(),
            image: "busybox".into(),
            argv: vec!["true".into()],
            env: Vec::new(),
            command: vec!["true".into()],
            args: Vec::new(),
            working_dir: None,
            pull_policy: PullPolicy::IfNotPresent,
            mounts: Vec::new(),
            privileged: false,
            security: SecurityRun::default(),
            resources: ResourcesRun::default(),
            host_ports: Vec::new(),
            stdin: false,
            stdin_once: false,
            tty: false,
        }
    }

    fn terminated(code: i32) -> Terminated {
        Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at: "2025-01-01T00:00:00Z".into(),
            finished_at: "2025-01-01T00:00:01Z".into(),
        }
    }

    fn held(state: ContainerState, restarts: u32) -> ContainerStatus {
        ContainerStatus {
            name: "main".into(),
            image: "busybox".into(),
            state,
            last_termination: None,
            restart_count: restarts,
        }
    }

    #[test]
    fn image_registries_are_found_as_containerd_resolves_them() {
        assert_eq!(image_registry("busybox"), "docker.io");
        assert_eq!(image_registry("library/busybox:1"), "docker.io");
        assert_eq!(
            image_registry("127.0.0.1:5000/kedge/busybox:1"),
            "127.0.0.1:5000"
        );
        assert_eq!(
            image_registry("registry.example.com/app"),
            "registry.example.com"
        );
        assert_eq!(image_registry("localhost/app"), "localhost");
    }

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(quantity("500m", 1000.0), Some(500));
        assert_eq!(quantity("2", 1000.0), Some(2000));
        assert_eq!(quantity("0.25", 1000.0), Some(250));
        assert_eq!(quantity("64Mi", 1.0), Some(64 << 20));
        assert_eq!(quantity("1G", 1.0), Some(1_000_000_000));
        assert_eq!(quantity("128974848", 1.0), Some(128_974_848));
        assert_eq!(quantity("1e3", 1.0), Some(1000));
        assert_eq!(quantity("lots", 1.0), None);
    }

    #[test]
    fn pull_policy_defaults_as_the_api_server_does() {
        let of = |image| PullPolicy::of(None, image);
        assert_eq!(of("busybox"), PullPolicy::Always);
        assert_eq!(of("busybox:latest"), PullPolicy::Always);
        assert_eq!(of("busybox:1.36"), PullPolicy::IfNotPresent);
        assert_eq!(of("127.0.0.1:5000/kedge/busybox"), PullPolicy::Always);
        assert_eq!(
            of("127.0.0.1:5000/kedge/busybox:1"),
            PullPolicy::IfNotPresent
        );
        assert_eq!(of("busybox@sha256:abc"), PullPolicy::IfNotPresent);
        assert_eq!(PullPolicy::of(Some("Never"), "busybox"), PullPolicy::Never);
        assert_eq!(PullPolicy::of(Some("Always"), "a:1"), PullPolicy::Always);
    }

    #[test]
    fn nothing_recorded_is_a_new_container() {
        let (status, start) = resume(&container("main"), RestartPolicy::Never, &[]);
        assert!(start);
        assert_eq!(status.restart_count, 0);
        assert!(matches!(status.state, ContainerState::Waiting { .. }));
        // Another container's record does not count.
        let other = ContainerStatus {
            name: "side".into(),
            ..held(ContainerState::Terminated(terminated(1)), 4)
        };
        let (status, start) = resume(&container("main"), RestartPolicy::Never, &[other]);
        assert!(start);
        assert_eq!(status.restart_count, 0);
    }

    #[test]
    fn a_container_finished_for_good_is_not_run_again() {
        for (policy, code) in [
            (RestartPolicy::Never, 1),
            (RestartPolicy::Never, 0),
            (RestartPolicy::OnFailure, 0),
        ] {
            let record = held(ContainerState::Terminated(terminated(code)), 2);
            let (status, start) = resume(&container("main"), policy, &[record]);
            assert!(!start, "{policy:?} exit {code}");
            assert_eq!(status.state, ContainerState::Terminated(terminated(code)));
            assert_eq!(status.restart_count, 2);
        }
    }

    #[test]
    fn a_restartable_or_interrupted_container_runs_on_with_its_count() {
        // Terminated and due for a restart: that restart happens and is counted.
        let record = held(ContainerState::Terminated(terminated(1)), 5);
        let (status, start) = resume(&container("main"), RestartPolicy::OnFailure, &[record]);
        assert!(start);
        assert_eq!(status.restart_count, 6);
        assert_eq!(status.last_termination, Some(terminated(1)));
        // In back-off (already counted) or running when edgecore died: same count.
        for state in [
            ContainerState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: String::new(),
            },
            ContainerState::Running {
                started_at: "2025-01-01T00:00:00Z".into(),
            },
        ] {
            let mut record = held(state, 6);
            record.last_termination = Some(terminated(1));
            let (status, start) = resume(&container("main"), RestartPolicy::Always, &[record]);
            assert!(start);
            assert_eq!(status.restart_count, 6);
            assert_eq!(status.last_termination, Some(terminated(1)));
        }
    }
}
