//! The cloud's Kubernetes API as the harness uses it (kube-rs, like any client): the workload,
//! the churn, a pod watcher feeding the probes, and the state the convergence check expects.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use replication::{ObjectKey, ResourceVersion};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::hollow::PROBE_ANNOTATION;
use crate::probe::Probes;

pub const NAMESPACE: &str = "loadtest";
pub const CONFIG: &str = "fleet-config";

#[derive(Clone)]
pub struct CloudApi {
    client: Client,
    pods: Api<Pod>,
}

/// What the cloud says one node should hold, and the pods' reported statuses.
#[derive(Debug, Default)]
pub struct Expected {
    /// Node name → key → version.
    pub held: HashMap<String, BTreeMap<ObjectKey, ResourceVersion>>,
    /// Pod key → (phase, status.message).
    pub statuses: HashMap<ObjectKey, (String, String)>,
    pub pods: usize,
}

pub fn pod_name(node: &str, j: usize) -> String {
    format!("{node}-p{j}")
}

pub fn pod_key(name: &str) -> ObjectKey {
    ObjectKey::new("pods", NAMESPACE, name).expect("valid pod key")
}

fn rv_of<K: Resource>(object: &K) -> ResourceVersion {
    object
        .resource_version()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_default()
}

impl CloudApi {
    /// The JSON bytes of the test's pods, summed per node (what a full resend would carry).
    pub async fn pod_bytes_by_node(&self) -> anyhow::Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for pod in self.pods.list(&ListParams::default()).await?.items {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            *out.entry(node).or_default() += serde_json::to_vec(&pod)?.len() as u64;
        }
        Ok(out)
    }

    /// Which replica's API holds each node's link: node name → the API URL in its link claim
    /// (`kube-system/kedge-link-NODE`, annotation `kedge.io/api-url`; several cloudcores only).
    pub async fn link_holders(&self) -> anyhow::Result<HashMap<String, String>> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), "kube-system");
        let mut out = HashMap::new();
        for lease in leases.list(&ListParams::default()).await?.items {
            let name = lease.name_any();
            let Some(node) = name.strip_prefix("kedge-link-") else {
                continue;
            };
            if let Some(url) = lease.annotations().get("kedge.io/api-url") {
                out.insert(node.to_owned(), url.clone());
            }
        }
        Ok(out)
    }

    /// A Deployment of `replicas` pods (not bound: the scheduler places them on the fleet).
    pub async fn create_deployment(&self, name: &str, replicas: usize) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"deployment": name}},
                "template": {
                    "metadata": {"labels": {"deployment": name}},
                    "spec": {"containers": [{
                        "name": "app",
                        "image": "registry.example.com/fleet/app:1.4.2",
                        "resources": {"requests": {"cpu": "1m", "memory": "1Mi"}},
                    }]},
                },
            },
        }))?;
        deployments
            .create(&PostParams::default(), &deployment)
            .await?;
        Ok(())
    }

    /// The Deployment's `status.availableReplicas`.
    pub async fn deployment_available(&self, name: &str) -> anyhow::Result<usize> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        let deployment = deployments.get(name).await?;
        Ok(deployment
            .status
            .and_then(|s| s.available_replicas)
            .unwrap_or(0)
            .max(0) as usize)
    }

    /// Deletes the Deployment (its ReplicaSets and pods by garbage collection).
    pub async fn delete_deployment(&self, name: &str) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        deployments
            .delete(name, &DeleteParams::background())
            .await?;
        Ok(())
    }

    /// The pods with `selector` (one list, every page) and how long listing them took.
    pub async fn select_pods(
        &self,
        selector: &str,
    ) -> anyhow::Result<(Vec<Pod>, std::time::Duration)> {
        let start = std::time::Instant::now();
        let mut out = Vec::new();
        let mut params = ListParams::default().labels(selector).limit(5000);
        loop {
            let page = self.pods.list(&params).await?;
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            out.extend(page.items);
            match next {
                Some(token) => params = params.continue_token(&token),
                None => return Ok((out, start.elapsed())),
            }
        }
    }

    pub async fn connect(url: &str) -> anyhow::Result<CloudApi> {
        let config = kube::Config::new(url.parse().context("the cloud API URL")?);
        let client = Client::try_from(config)?;
        let pods = Api::namespaced(client.clone(), NAMESPACE);
        Ok(CloudApi { client, pods })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The namespace and the ConfigMap every pod references.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
        if namespaces.get_opt(NAMESPACE).await?.is_none() {
            namespaces.create(&PostParams::default(), &ns).await?;
        }
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": CONFIG},
            "data": {"mode": "fleet", "level": "info"},
        }))?;
        if configmaps.get_opt(CONFIG).await?.is_none() {
            configmaps.create(&PostParams::default(), &cm).await?;
        }
        Ok(())
    }

    /// A pod bound to `node`, shaped like a small real workload.
    pub async fn create_pod(&self, node: &str, name: &str, probe: &str) -> anyhow::Result<()> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"app": "fleet", "node": node},
                "annotations": {PROBE_ANNOTATION: probe},
            },
            "spec": {
                "nodeName": node,
                "containers": [{
                    "name": "app",
                    "image": "registry.example.com/fleet/app:1.4.2",
                    "command": ["/app", "--serve"],
                    "env": [{"name": "MODE", "valueFrom":
                        {"configMapKeyRef": {"name": CONFIG, "key": "mode"}}}],
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                }],
            },
        }))?;
        self.pods.create(&PostParams::default(), &pod).await?;
        Ok(())
    }

    /// Changes a pod's probe annotation (a spec-side update the node must receive).
    pub async fn touch_pod(&self, name: &str, probe: &str) -> anyhow::Result<()> {
        let patch = json!({"metadata": {"annotations": {PROBE_ANNOTATION: probe}}});
        self.pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    pub async fn delete_pod(&self, name: &str) -> anyhow::Result<()> {
        self.pods.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// Follows the pods and feeds the probes until the task is aborted.
    pub fn watch_pods(&self, probes: Arc<Probes>) -> tokio::task::JoinHandle<()> {
        self.watch_pods_listed(probes).0
    }

    /// [`CloudApi::watch_pods`], and a receiver that fires once the watch's initial list is
    /// through (so that its cost is not counted as what follows).
    pub fn watch_pods_listed(
        &self,
        probes: Arc<Probes>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let pods = self.pods.clone();
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut listed_tx = Some(listed_tx);
            let mut events = std::pin::pin!(watcher(pods, watcher::Config::default()));
            while let Some(event) = events.next().await {
                let pod = match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => pod,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "pod watch interrupted; resuming");
                        continue;
                    }
                };
                let status = pod.status.as_ref();
                let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
                let message = status.and_then(|s| s.message.as_deref()).unwrap_or("");
                probes.api_saw(&pod_key(&pod.name_any()), phase, message);
            }
        });
        (task, listed)
    }

    async fn list_all<K>(&self, api: &Api<K>) -> anyhow::Result<Vec<K>>
    where
        K: Clone + DeserializeOwned + std::fmt::Debug + Resource,
    {
        let mut out = Vec::new();
        let mut params = ListParams::default().limit(5000);
        loop {
            let page = api.list(&params).await?;
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            out.extend(page.items);
            match next {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    /// What each of `nodes` should hold, read from the cloud now.
    pub async fn expected(&self, nodes: &[String]) -> anyhow::Result<Expected> {
        let mut expected = Expected::default();
        for node in nodes {
            expected.held.insert(node.clone(), BTreeMap::new());
        }
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), NAMESPACE);
        let config_rv = configmaps.get_opt(CONFIG).await?.map(|c| rv_of(&c));
        for pod in self.list_all(&self.pods).await? {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let key = pod_key(&pod.name_any());
            let status = pod.status.as_ref();
            expected.statuses.insert(
                key.clone(),
                (
                    status.and_then(|s| s.phase.clone()).unwrap_or_default(),
                    status.and_then(|s| s.message.clone()).unwrap_or_default(),
                ),
            );
            expected.pods += 1;
            if let Some(held) = expected.held.get_mut(&node) {
                held.insert(key, rv_of(&pod));
                if let Some(rv) = config_rv {
                    held.insert(
                        ObjectKey::new("configmaps", NAMESPACE, CONFIG).expect("key"),
                        rv,
                    );
                }
            }
        }
        let node_api: Api<Node> = Api::all(self.client.clone());
        for node in self.list_all(&node_api).await? {
            if let Some(held) = expected.held.get_mut(&node.name_any()) {
                held.insert(
                    ObjectKey::new("nodes", "", &node.name_any()).expect("key"),
                    rv_of(&node),
                );
            }
        }
        Ok(expected)
    }

    /// Nodes whose Ready condition is True.
    pub async fn ready_nodes(&self) -> anyhow::Result<usize> {
        let node_api: Api<Node> = Api::all(self.client.clone());
        let nodes = self.list_all(&node_api).await?;
        Ok(nodes
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count())
    }
}
