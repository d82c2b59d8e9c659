//! The hollow runtime: every container is Running at once and nothing is started (for load
//! tests: the whole pod lifecycle and status path, no processes).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use replication::api::object;

use super::runtime::{resume, ContainerState, ContainerStatus, PodRun, Runtime};

#[derive(Default)]
pub struct HollowRuntime {
    pods: Mutex<HashMap<String, Vec<ContainerStatus>>>,
}

impl Runtime for HollowRuntime {
    fn ensure(&self, pod: &PodRun) {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.entry(pod.id.clone()).or_insert_with(|| {
            let now = object::now_rfc3339();
            pod.containers
                .iter()
                .map(|c| {
                    let (mut status, start) = resume(c, pod.restart_policy, &pod.recorded);
                    if start {
                        status.state = ContainerState::Running {
                            started_at: now.clone(),
                        };
                    }
                    status
                })
                .collect()
        });
    }

    fn stop(&self, id: &str, _grace: Duration) {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn status(&self, id: &str) -> Option<Vec<ContainerStatus>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn reap(&self, id: &str) -> bool {
        !self
            .pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    fn pods(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn shutdown(&self, _grace: Duration) {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
