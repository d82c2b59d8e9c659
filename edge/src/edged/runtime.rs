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
    /// The containers' statuses as the node last recorded them (empty for a pod this node has
    /// never reported). A runtime that does not know the pod yet (edgecore restarted) resumes
    /// from them with [`resume`]: restart counts go on from there, and a container that
    /// terminated for good is not run again.
    pub recorded: Vec<ContainerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRun {
    pub name: String,
    pub image: String,
    /// `command` followed by `args`.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `stdin: true`: the container's stdin is a pipe kept open for `kubectl attach -i`.
    pub stdin: bool,
    /// `stdinOnce: true`: that pipe closes when the first attach session that used it ends.
    pub stdin_once: bool,
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
            stdin: false,
            stdin_once: false,
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
