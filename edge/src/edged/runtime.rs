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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    /// `command` followed by `args`.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
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
}
