//! The kinds the API serves: one table that routing, discovery, OpenAPI and validation read.

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
    /// Has a `/scale` subresource (an `autoscaling/v1` `Scale` over `spec.replicas`).
    pub scale: bool,
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
    }
}

/// KubeEdge's device group (`devices.kubeedge.io`): Device and DeviceModel.
pub const DEVICES_GROUP: &str = "devices.kubeedge.io";

/// The workloads group (`apps/v1`): Deployment, ReplicaSet, DaemonSet.
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
    batch("Job", "JobList", "jobs", "job", &[]),
    batch("CronJob", "CronJobList", "cronjobs", "cronjob", &["cj"]),
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
    },
];

/// Every served resource.
pub fn all() -> &'static [Resource] {
    RESOURCES
}

/// The resource served at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource whose objects are stored under this key kind.
pub fn by_store_kind(kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.plural == kind)
}

/// The group-versions served, in discovery order (core first).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
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
