//! The kinds the API serves: one table that routing, discovery, OpenAPI and validation read,
//! and a [`Registry`] that adds the custom resources of CustomResourceDefinitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::key::KeyRange;
use crate::store::Store;
use crate::watch::Watcher;

/// One served resource (a Kubernetes "kind" and its REST collection).
#[derive(Debug)]
pub struct Resource {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group (`v1`, `v1beta1`).
    pub version: &'static str,
    /// The object kind (`Pod`).
    pub kind: &'static str,
    /// The kind of its lists (`PodList`).
    pub list_kind: &'static str,
    /// The REST collection name; also the kind part of store keys (unique across groups here).
    pub plural: &'static str,
    /// The singular name, as discovery lists it (`pod`).
    pub singular: &'static str,
    /// Namespaced (`true`) or cluster-scoped.
    pub namespaced: bool,
    /// kubectl's short names (`po`).
    pub short_names: &'static [&'static str],
    /// Has a `/status` subresource: a normal update leaves status alone, `/status` only status.
    pub status: bool,
    /// Discovery categories (`all`).
    pub categories: &'static [&'static str],
    /// Built into kubectl's scheme (it sends strategic-merge patches for these).
    pub builtin: bool,
    /// Has a `/scale` subresource (an `autoscaling/v1` `Scale` over `spec.replicas`, or over
    /// the paths a CustomResourceDefinition names).
    pub scale: bool,
    /// The kind part of store keys: the plural for built-in kinds, the CRD's name
    /// (`{plural}.{group}`) for custom resources, so no two resources share a key space.
    pub store_kind: &'static str,
    /// What a CustomResourceDefinition says of a custom resource; `None` for built-in kinds.
    pub custom: Option<&'static super::crd::Custom>,
}

impl Resource {
    /// The objects' `apiVersion`: `v1` for the core group, else `{group}/{version}`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The URL prefix of this resource's group-version: `/api/v1` or `/apis/{group}/{version}`.
    pub fn group_version_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

const fn core(
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
) -> Resource {
    Resource {
        group: "",
        version: "v1",
        kind,
        list_kind: "",
        plural,
        singular,
        namespaced,
        short_names,
        status,
        categories: &[],
        builtin: true,
        scale: false,
        store_kind: plural,
        custom: None,
    }
}

/// KubeEdge's device group (`devices.kubeedge.io`): Device and DeviceModel.
pub const DEVICES_GROUP: &str = "devices.kubeedge.io";

/// The RBAC group (`rbac.authorization.k8s.io/v1`): ClusterRoles and ClusterRoleBindings are
/// stored and served; the cloud consults them for what edge nodes may list beyond the
/// defaults (see `cloud::authz`), not for API clients.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

const fn rbac(
    kind: &'static str,
    list_kind: &'static str,
    plural: &'static str,
    singular: &'static str,
) -> Resource {
    Resource {
        group: RBAC_GROUP,
        namespaced: false,
        status: false,
        categories: &[],
        ..batch(kind, list_kind, plural, singular, &[])
    }
}

/// The group of CustomResourceDefinitions (`apiextensions.k8s.io/v1`).
pub const APIEXTENSIONS_GROUP: &str = "apiextensions.k8s.io";

/// The store kind (and plural) of CustomResourceDefinitions.
pub const CRD_STORE_KIND: &str = "customresourcedefinitions";

/// The workloads group (`apps/v1`): Deployment, ReplicaSet, DaemonSet, StatefulSet.
pub const APPS_GROUP: &str = "apps";

const fn apps(
    kind: &'static str,
    list_kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short_names: &'static [&'static str],
    scale: bool,
) -> Resource {
    Resource {
        group: APPS_GROUP,
        version: "v1",
        kind,
        list_kind,
        plural,
        singular,
        namespaced: true,
        short_names,
        status: true,
        categories: &["all"],
        builtin: true,
        scale,
        store_kind: plural,
        custom: None,
    }
}

/// The batch group (`batch/v1`): Job, CronJob.
pub const BATCH_GROUP: &str = "batch";

const fn batch(
    kind: &'static str,
    list_kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short_names: &'static [&'static str],
) -> Resource {
    Resource {
        group: BATCH_GROUP,
        scale: false,
        ..apps(kind, list_kind, plural, singular, short_names, false)
    }
}

static RESOURCES: &[Resource] = &[
    Resource {
        list_kind: "NamespaceList",
        ..core("Namespace", "namespaces", "namespace", false, &["ns"], true)
    },
    Resource {
        list_kind: "PodList",
        categories: &["all"],
        ..core("Pod", "pods", "pod", true, &["po"], true)
    },
    Resource {
        list_kind: "ConfigMapList",
        ..core("ConfigMap", "configmaps", "configmap", true, &["cm"], false)
    },
    Resource {
        list_kind: "SecretList",
        ..core("Secret", "secrets", "secret", true, &[], false)
    },
    Resource {
        list_kind: "ServiceList",
        categories: &["all"],
        ..core("Service", "services", "service", true, &["svc"], true)
    },
    Resource {
        list_kind: "EndpointsList",
        ..core("Endpoints", "endpoints", "endpoints", true, &["ep"], false)
    },
    Resource {
        list_kind: "NodeList",
        ..core("Node", "nodes", "node", false, &["no"], true)
    },
    Resource {
        list_kind: "ServiceAccountList",
        ..core(
            "ServiceAccount",
            "serviceaccounts",
            "serviceaccount",
            true,
            &["sa"],
            false,
        )
    },
    Resource {
        list_kind: "EventList",
        ..core("Event", "events", "event", true, &["ev"], false)
    },
    Resource {
        list_kind: "PersistentVolumeClaimList",
        ..core(
            "PersistentVolumeClaim",
            "persistentvolumeclaims",
            "persistentvolumeclaim",
            true,
            &["pvc"],
            true,
        )
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        list_kind: "LeaseList",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        short_names: &[],
        status: false,
        categories: &[],
        builtin: true,
        scale: false,
        store_kind: "leases",
        custom: None,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        list_kind: "EndpointSliceList",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        short_names: &[],
        status: false,
        categories: &[],
        builtin: true,
        scale: false,
        store_kind: "endpointslices",
        custom: None,
    },
    apps(
        "Deployment",
        "DeploymentList",
        "deployments",
        "deployment",
        &["deploy"],
        true,
    ),
    apps(
        "ReplicaSet",
        "ReplicaSetList",
        "replicasets",
        "replicaset",
        &["rs"],
        true,
    ),
    apps(
        "DaemonSet",
        "DaemonSetList",
        "daemonsets",
        "daemonset",
        &["ds"],
        false,
    ),
    apps(
        "StatefulSet",
        "StatefulSetList",
        "statefulsets",
        "statefulset",
        &["sts"],
        true,
    ),
    // DaemonSet and StatefulSet history (immutable data, no status, not in `all`).
    Resource {
        group: APPS_GROUP,
        version: "v1",
        kind: "ControllerRevision",
        list_kind: "ControllerRevisionList",
        plural: "controllerrevisions",
        singular: "controllerrevision",
        namespaced: true,
        short_names: &[],
        status: false,
        categories: &[],
        builtin: true,
        scale: false,
        store_kind: "controllerrevisions",
        custom: None,
    },
    batch("Job", "JobList", "jobs", "job", &[]),
    batch("CronJob", "CronJobList", "cronjobs", "cronjob", &["cj"]),
    rbac(
        "ClusterRole",
        "ClusterRoleList",
        "clusterroles",
        "clusterrole",
    ),
    rbac(
        "ClusterRoleBinding",
        "ClusterRoleBindingList",
        "clusterrolebindings",
        "clusterrolebinding",
    ),
    Resource {
        group: APIEXTENSIONS_GROUP,
        version: "v1",
        kind: "CustomResourceDefinition",
        list_kind: "CustomResourceDefinitionList",
        plural: CRD_STORE_KIND,
        singular: "customresourcedefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        status: true,
        categories: &["api-extensions"],
        builtin: true,
        scale: false,
        store_kind: CRD_STORE_KIND,
        custom: None,
    },
    Resource {
        group: DEVICES_GROUP,
        version: "v1beta1",
        kind: "Device",
        list_kind: "DeviceList",
        plural: "devices",
        singular: "device",
        namespaced: true,
        short_names: &[],
        status: true,
        categories: &[],
        builtin: false,
        scale: false,
        store_kind: "devices",
        custom: None,
    },
    // KubeEdge v1.23's split of a Device's reported state into its own object (same name and
    // namespace, owned by the Device): where twin reports land.
    Resource {
        group: DEVICES_GROUP,
        version: "v1beta1",
        kind: "DeviceStatus",
        list_kind: "DeviceStatusList",
        plural: "devicestatuses",
        singular: "devicestatus",
        namespaced: true,
        short_names: &[],
        status: true,
        categories: &[],
        builtin: false,
        scale: false,
        store_kind: "devicestatuses",
        custom: None,
    },
    Resource {
        group: DEVICES_GROUP,
        version: "v1beta1",
        kind: "DeviceModel",
        list_kind: "DeviceModelList",
        plural: "devicemodels",
        singular: "devicemodel",
        namespaced: true,
        short_names: &[],
        status: false,
        categories: &[],
        builtin: false,
        scale: false,
        store_kind: "devicemodels",
        custom: None,
    },
];

/// Every built-in resource (custom resources are in a [`Registry`]).
pub fn all() -> &'static [Resource] {
    RESOURCES
}

/// The built-in resource served at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The built-in resource whose objects are stored under this key kind.
pub fn by_store_kind(kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.store_kind == kind)
}

/// Whether `group` is served by built-in kinds (a CustomResourceDefinition may not claim it).
pub fn is_builtin_group(group: &str) -> bool {
    RESOURCES.iter().any(|r| r.group == group)
}

/// The resources an API serves: the built-in table plus the custom resources of the
/// CustomResourceDefinitions in its store, kept current by following the store's changes to
/// `customresourcedefinitions` (checked on every lookup, so a CRD is served as soon as its
/// write commits, whoever wrote it: this API, replication or a cluster mirror).
///
/// A custom resource is a leaked `&'static Resource` so it can be handed around like the
/// built-in ones; identical definitions are interned, so memory grows only with distinct CRD
/// versions ever served by the process, not with requests or re-reads.
pub struct Registry {
    store: Option<Arc<Store>>,
    state: Mutex<RegistryState>,
}

#[derive(Default)]
struct RegistryState {
    watcher: Option<Watcher>,
    custom: Arc<Vec<&'static Resource>>,
    interned: HashMap<String, &'static Resource>,
}

impl Registry {
    /// The built-in kinds only.
    pub fn builtin() -> Self {
        Registry {
            store: None,
            state: Mutex::new(RegistryState::default()),
        }
    }

    /// The built-in kinds and the custom resources of `store`'s CustomResourceDefinitions.
    pub fn with_store(store: Arc<Store>) -> Self {
        Registry {
            store: Some(store),
            state: Mutex::new(RegistryState::default()),
        }
    }

    /// The custom resources now served, each version of each established CRD once.
    pub fn custom(&self) -> Arc<Vec<&'static Resource>> {
        let Some(store) = &self.store else {
            return Arc::default();
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = state.watcher.is_none();
        if let Some(watcher) = state.watcher.as_mut() {
            loop {
                match watcher.try_next() {
                    Ok(Some(_)) => changed = true,
                    Ok(None) => break,
                    Err(_) => {
                        state.watcher = None;
                        changed = true;
                        break;
                    }
                }
            }
        }
        if changed {
            // Subscribe before reading so no definition committed in between is missed.
            if state.watcher.is_none() {
                let range = KeyRange::kind(CRD_STORE_KIND).expect("a valid kind");
                state.watcher = store.watch().subscribe(range, None).ok();
            }
            let mut custom = Vec::new();
            for item in store.scan(&KeyRange::kind(CRD_STORE_KIND).expect("a valid kind")) {
                let Ok((key, versioned)) = item else {
                    // Read again on the next lookup rather than serve a partial set.
                    tracing::warn!("cannot read the CustomResourceDefinitions; retrying");
                    state.watcher = None;
                    break;
                };
                let Ok(crd) = serde_json::from_slice::<Value>(&versioned.object) else {
                    tracing::warn!(key = key.as_str(), "a stored CRD is not JSON");
                    continue;
                };
                for (fingerprint, resource) in super::crd::compile(&crd) {
                    let interned = state
                        .interned
                        .entry(fingerprint)
                        .or_insert_with(|| Box::leak(Box::new(resource)));
                    custom.push(*interned);
                }
            }
            state.custom = Arc::new(custom);
        }
        state.custom.clone()
    }

    /// Every served resource, built-in first.
    pub fn all(&self) -> Vec<&'static Resource> {
        let custom = self.custom();
        RESOURCES.iter().chain(custom.iter().copied()).collect()
    }

    /// The resource served at `group`/`version`/`plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        find(group, version, plural).or_else(|| {
            self.custom()
                .iter()
                .copied()
                .find(|r| r.group == group && r.version == version && r.plural == plural)
        })
    }

    /// The resource whose objects are stored under `kind` (for a custom resource with several
    /// versions: its storage version).
    pub fn by_store_kind(&self, kind: &str) -> Option<&'static Resource> {
        by_store_kind(kind).or_else(|| {
            let custom = self.custom();
            let mut versions = custom.iter().copied().filter(|r| r.store_kind == kind);
            let first = versions.next()?;
            Some(
                std::iter::once(first)
                    .chain(versions)
                    .find(|r| r.custom.is_some_and(|c| c.storage_version == r.version))
                    .unwrap_or(first),
            )
        })
    }

    /// The group-versions served, in discovery order (core first, custom groups last).
    pub fn group_versions(&self) -> Vec<(&'static str, &'static str)> {
        let mut out: Vec<(&'static str, &'static str)> = Vec::new();
        for r in self.all() {
            if !out.contains(&(r.group, r.version)) {
                out.push((r.group, r.version));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_are_unique_store_kinds() {
        for r in all() {
            assert_eq!(by_store_kind(r.plural).map(|f| f.kind), Some(r.kind));
            assert!(r.list_kind.ends_with("List"), "{}", r.kind);
        }
    }
}
