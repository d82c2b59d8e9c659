//! From a pod object and the node's cache to what a runtime runs: argv, env (literal values,
//! `valueFrom.configMapKeyRef/secretKeyRef/fieldRef`, `envFrom`) and the files of configMap,
//! secret, downwardAPI and projected volumes at each container's `mountPath` under the pod
//! root.
//!
//! A pod whose ConfigMap, Secret or key the node does not hold (and that is not `optional`),
//! or that names a volume type the node does not mount, is not started: [`config_error`] says
//! why in kubelet's words and Edged reports its containers waiting in
//! `CreateContainerConfigError` until the cache has what it needs. Once running, a source that
//! goes away leaves the variable or file out (an optional reference behaves the same).

use std::path::{Path, PathBuf};

use base64::Engine;
use replication::api::object::{self, Object};
use replication::{ObjectKey, Store};
use serde_json::Value;

use super::runtime::{
    quantity, ContainerRun, MountRun, PodRun, PullPolicy, RegistryAuth, ResourcesRun,
    RestartPolicy, SecurityRun,
};

/// The `data` of a ConfigMap (and `binaryData`) or Secret (decoded), as bytes by key; empty
/// when the node holds no such object.
fn source_data(store: &Store, kind: &str, namespace: &str, name: &str) -> Vec<(String, Vec<u8>)> {
    source(store, kind, namespace, name).unwrap_or_default()
}

/// [`source_data`], or `None` when the node holds no such ConfigMap or Secret.
fn source(
    store: &Store,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Option<Vec<(String, Vec<u8>)>> {
    let key = ObjectKey::new(kind, namespace, name).ok()?;
    let object = store
        .get(&key)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice::<Object>(&v.object).ok())?;
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let strings = object.get("data").and_then(Value::as_object);
    for (k, v) in strings.into_iter().flatten() {
        let Some(text) = v.as_str() else { continue };
        let bytes = if kind == "secrets" {
            match base64.decode(text) {
                Ok(b) => b,
                Err(_) => continue,
            }
        } else {
            text.as_bytes().to_vec()
        };
        out.push((k.clone(), bytes));
    }
    if kind == "secrets" {
        let plain = object.get("stringData").and_then(Value::as_object);
        for (k, v) in plain.into_iter().flatten() {
            if let Some(text) = v.as_str() {
                out.push((k.clone(), text.as_bytes().to_vec()));
            }
        }
    } else {
        let binary = object.get("binaryData").and_then(Value::as_object);
        for (k, v) in binary.into_iter().flatten() {
            if let Some(b) = v.as_str().and_then(|t| base64.decode(t).ok()) {
                out.push((k.clone(), b));
            }
        }
    }
    Some(out)
}

fn key_ref(store: &Store, kind: &str, namespace: &str, reference: &Value) -> Option<String> {
    let name = reference.get("name")?.as_str()?;
    let wanted = reference.get("key")?.as_str()?;
    source_data(store, kind, namespace, name)
        .into_iter()
        .find(|(k, _)| k == wanted)
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
}

fn field_ref(pod: &Object, path: &str) -> Option<String> {
    let meta = object::meta(pod)?;
    Some(match path {
        "metadata.name" => object::name(pod).to_owned(),
        "metadata.namespace" => object::namespace(pod).to_owned(),
        "metadata.uid" => meta.get("uid")?.as_str()?.to_owned(),
        "spec.nodeName" => pod.get("spec")?.get("nodeName")?.as_str()?.to_owned(),
        "spec.serviceAccountName" => pod
            .get("spec")?
            .get("serviceAccountName")?
            .as_str()?
            .to_owned(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
        _ => return None,
    })
}

fn env_of(store: &Store, pod: &Object, container: &Value) -> Vec<(String, String)> {
    let namespace = object::namespace(pod);
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    for source in container
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let prefix = source.get("prefix").and_then(Value::as_str).unwrap_or("");
        let (kind, reference) = if let Some(r) = source.get("configMapRef") {
            ("configmaps", r)
        } else if let Some(r) = source.get("secretRef") {
            ("secrets", r)
        } else {
            continue;
        };
        let Some(name) = reference.get("name").and_then(Value::as_str) else {
            continue;
        };
        for (k, v) in source_data(store, kind, namespace, name) {
            set(
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in container
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = var.get("name").and_then(Value::as_str) else {
            continue;
        };
        let value = if let Some(v) = var.get("value").and_then(Value::as_str) {
            Some(v.to_owned())
        } else if let Some(from) = var.get("valueFrom") {
            if let Some(r) = from.get("configMapKeyRef") {
                key_ref(store, "configmaps", namespace, r)
            } else if let Some(r) = from.get("secretKeyRef") {
                key_ref(store, "secrets", namespace, r)
            } else if let Some(path) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
                field_ref(pod, path)
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            set(name.to_owned(), value);
        }
    }
    env
}

/// Whether `path` is a safe relative path inside a volume (what kube-apiserver's validation
/// of `items[].path` allows: not absolute, no `..` element, not empty).
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The files of a ConfigMap or Secret (`kind`) named `name`: every key, or the `items`
/// (`key` → `path`) when given.
fn keyed_files(
    store: &Store,
    kind: &str,
    namespace: &str,
    name: Option<&Value>,
    items: Option<&Value>,
) -> Vec<(PathBuf, Vec<u8>)> {
    let Some(name) = name.and_then(Value::as_str) else {
        return Vec::new();
    };
    let data = source_data(store, kind, namespace, name);
    match items.and_then(Value::as_array) {
        Some(items) => items
            .iter()
            .filter_map(|item| {
                let key = item.get("key")?.as_str()?;
                let path = item.get("path")?.as_str().filter(|p| safe_relative(p))?;
                let (_, value) = data.iter().find(|(k, _)| k == key)?;
                Some((PathBuf::from(path), value.clone()))
            })
            .collect(),
        None => data
            .into_iter()
            .filter(|(k, _)| safe_relative(k))
            .map(|(k, v)| (PathBuf::from(k), v))
            .collect(),
    }
}

/// `metadata.labels` or `metadata.annotations` as the downward API writes them to a file:
/// one `key="value"` line per entry, sorted by key, values quoted as Go's `%q` would.
fn downward_map(map: Option<&Value>) -> String {
    let mut lines: Vec<String> = map
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let quoted = serde_json::to_string(v.as_str().unwrap_or_default()).unwrap_or_default();
            format!("{k}={quoted}")
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// A `resourceFieldRef` (`limits.cpu`, `requests.memory`, …) of `container_name` in units of
/// `divisor` (default 1), rounded up as kubelet does; a limit that is not set is the node's
/// capacity (CPUs, memory), as kubelet answers.
fn resource_field(spec: &Value, reference: &Value, own: Option<&Value>) -> Option<String> {
    let container = match reference.get("containerName").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => spec
            .get("containers")?
            .as_array()?
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(name))?,
        _ => own?,
    };
    let resource = reference.get("resource")?.as_str()?;
    let (section, what) = resource.split_once('.')?;
    let set = container
        .pointer(&format!("/resources/{section}/{what}"))
        .and_then(Value::as_str);
    let divisor = reference
        .get("divisor")
        .and_then(|d| {
            d.as_str()
                .map(str::to_owned)
                .or_else(|| Some(d.to_string()))
        })
        .unwrap_or_else(|| "1".into());
    match what {
        "cpu" => {
            let millis = match set {
                Some(text) => quantity(text, 1000.0)?,
                None => 1000 * std::thread::available_parallelism().map_or(1, |n| n.get()) as u64,
            };
            let per = quantity(&divisor, 1000.0)?.max(1);
            Some(millis.div_ceil(per).to_string())
        }
        "memory" | "ephemeral-storage" => {
            let bytes = match set {
                Some(text) => quantity(text, 1.0)?,
                None if what == "memory" => node_memory_bytes(),
                None => return None,
            };
            let per = quantity(&divisor, 1.0)?.max(1);
            Some(bytes.div_ceil(per).to_string())
        }
        _ => None,
    }
}

fn node_memory_bytes() -> u64 {
    crate::node::meminfo_total_kib() * 1024
}

/// The files of a downward API volume (or projection): each item's `path` holds a `fieldRef`
/// (`metadata.name`, `namespace`, `uid`, `labels`, `annotations`, `labels['k']`,
/// `annotations['k']`, and the fields env `fieldRef` supports) or a `resourceFieldRef`.
fn downward_files(
    pod: &Object,
    spec: &Value,
    items: Option<&Value>,
    own: Option<&Value>,
) -> Vec<(PathBuf, Vec<u8>)> {
    let meta = object::meta(pod);
    let mut files = Vec::new();
    for item in items.and_then(Value::as_array).into_iter().flatten() {
        let Some(path) = item.get("path").and_then(Value::as_str) else {
            continue;
        };
        if !safe_relative(path) {
            continue;
        }
        let value = if let Some(field) = item.pointer("/fieldRef/fieldPath").and_then(Value::as_str)
        {
            let keyed = |map: &str| -> Option<String> {
                let key = field
                    .strip_prefix(&format!("metadata.{map}['"))?
                    .strip_suffix("']")?;
                Some(meta?.get(map)?.get(key)?.as_str()?.to_owned())
            };
            match field {
                "metadata.labels" => Some(downward_map(meta.and_then(|m| m.get("labels")))),
                "metadata.annotations" => {
                    Some(downward_map(meta.and_then(|m| m.get("annotations"))))
                }
                _ => keyed("labels")
                    .or_else(|| keyed("annotations"))
                    .or_else(|| field_ref(pod, field)),
            }
        } else if let Some(reference) = item.get("resourceFieldRef") {
            resource_field(spec, reference, own)
        } else {
            None
        };
        if let Some(value) = value {
            files.push((PathBuf::from(path), value.into_bytes()));
        }
    }
    files
}

/// The files a configMap, secret, downwardAPI or projected volume holds, by their path in the
/// volume; `None` for other volume types. A projected volume's `serviceAccountToken` source
/// writes nothing (kedge mints no service account tokens).
fn volume_contents(
    store: &Store,
    pod: &Object,
    spec: &Value,
    volume: &Value,
    container: &Value,
) -> Option<Vec<(PathBuf, Vec<u8>)>> {
    let namespace = object::namespace(pod);
    if let Some(cm) = volume.get("configMap") {
        return Some(keyed_files(
            store,
            "configmaps",
            namespace,
            cm.get("name"),
            cm.get("items"),
        ));
    }
    if let Some(secret) = volume.get("secret") {
        let name = secret.get("secretName");
        return Some(keyed_files(
            store,
            "secrets",
            namespace,
            name,
            secret.get("items"),
        ));
    }
    if let Some(downward) = volume.get("downwardAPI") {
        return Some(downward_files(
            pod,
            spec,
            downward.get("items"),
            Some(container),
        ));
    }
    let projected = volume.get("projected")?;
    let mut files = Vec::new();
    let sources = projected.get("sources").and_then(Value::as_array);
    for source in sources.into_iter().flatten() {
        if let Some(cm) = source.get("configMap") {
            files.extend(keyed_files(
                store,
                "configmaps",
                namespace,
                cm.get("name"),
                cm.get("items"),
            ));
        } else if let Some(secret) = source.get("secret") {
            // A projection names its Secret `name`, a secret volume `secretName`.
            files.extend(keyed_files(
                store,
                "secrets",
                namespace,
                secret.get("name"),
                secret.get("items"),
            ));
        } else if let Some(downward) = source.get("downwardAPI") {
            files.extend(downward_files(
                pod,
                spec,
                downward.get("items"),
                Some(container),
            ));
        }
    }
    Some(files)
}

/// Whether the volume's files are written under the pod root (see [`volume_contents`]).
fn is_file_volume(volume: &Value) -> bool {
    ["configMap", "secret", "downwardAPI", "projected"]
        .iter()
        .any(|kind| volume.get(*kind).is_some())
}

/// The files of the pod's configMap, secret, downwardAPI and projected volumes, at every
/// container's mount of them.
fn volume_files(store: &Store, pod: &Object, spec: &Value) -> Vec<(PathBuf, Vec<u8>)> {
    let volumes = spec.get("volumes").and_then(Value::as_array);
    let mut files = Vec::new();
    let containers = spec.get("containers").and_then(Value::as_array);
    for container in containers.into_iter().flatten() {
        let mounts = container.get("volumeMounts").and_then(Value::as_array);
        for mount in mounts.into_iter().flatten() {
            let (Some(name), Some(path)) = (
                mount.get("name").and_then(Value::as_str),
                mount.get("mountPath").and_then(Value::as_str),
            ) else {
                continue;
            };
            let Some(volume) = volumes
                .into_iter()
                .flatten()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
            else {
                continue;
            };
            let Some(contents) = volume_contents(store, pod, spec, volume, container) else {
                continue;
            };
            let base = Path::new(path.trim_start_matches('/'));
            files.extend(contents.into_iter().map(|(p, v)| (base.join(p), v)));
        }
    }
    files.sort();
    files.dedup_by(|a, b| a.0 == b.0);
    files
}

/// The node-local directory of a PersistentVolumeClaim: `<data dir>/claims/<namespace>_<claim>`
/// beside `<data dir>/pods/<namespace>_<pod>` (`pod_dir`); `None` for a name that is not a
/// plain path segment.
fn claim_dir(pod_dir: &Path, claim: &str) -> Option<PathBuf> {
    if claim.is_empty() || claim.contains('/') || claim.starts_with('.') {
        return None;
    }
    let namespace = pod_dir.file_name()?.to_str()?.split('_').next()?;
    let data_dir = pod_dir.parent()?.parent()?;
    Some(data_dir.join("claims").join(format!("{namespace}_{claim}")))
}

/// A container's volume mounts resolved to the node's paths (see [`MountRun`]): configMap,
/// secret, downwardAPI and projected volumes at `root/<mountPath>` (where [`volume_files`]
/// writes their files), emptyDir at `<pod dir>/volumes/<name>`, hostPath at its path, a PersistentVolumeClaim at the node's
/// directory for that claim ([`claim_dir`], kept when the pod goes). Other volume types (and
/// mounts of a volume the pod does not declare) are left out.
fn mounts_of(spec: &Value, container: &Value, root: &Path) -> Vec<MountRun> {
    let volumes = spec.get("volumes").and_then(Value::as_array);
    let pod_dir = root.parent().unwrap_or(root);
    let mut out = Vec::new();
    let mounts = container.get("volumeMounts").and_then(Value::as_array);
    for mount in mounts.into_iter().flatten() {
        let (Some(name), Some(path)) = (
            mount.get("name").and_then(Value::as_str),
            mount.get("mountPath").and_then(Value::as_str),
        ) else {
            continue;
        };
        let Some(volume) = volumes
            .into_iter()
            .flatten()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
        else {
            continue;
        };
        let read_only = mount
            .get("readOnly")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let relative = Path::new(path.trim_start_matches('/'));
        let (host_path, read_only) = if is_file_volume(volume) {
            (root.join(relative), true)
        } else if volume.get("emptyDir").is_some() {
            if name.contains('/') || name == ".." {
                continue;
            }
            (pod_dir.join("volumes").join(name), read_only)
        } else if let Some(host) = volume.pointer("/hostPath/path").and_then(Value::as_str) {
            (PathBuf::from(host), read_only)
        } else if let Some(claim) = volume
            .pointer("/persistentVolumeClaim/claimName")
            .and_then(Value::as_str)
        {
            // A node-local volume per claim, outliving its pods: what a StatefulSet's
            // `data-db-0` needs to find its data again when db-0 is made again here.
            match claim_dir(pod_dir, claim) {
                Some(dir) => (dir, read_only),
                None => continue,
            }
        } else {
            continue;
        };
        out.push(MountRun {
            container_path: path.to_owned(),
            host_path,
            read_only,
        });
    }
    out
}

/// The registry credentials of the pod's `imagePullSecrets` (`.dockerconfigjson`'s `auths`,
/// or a legacy `.dockercfg`): `username`/`password`, else the base64 `auth` (`user:pass`).
/// Secrets the node does not hold, or that do not parse, give nothing.
fn pull_secrets_of(store: &Store, pod: &Object, spec: &Value) -> Vec<RegistryAuth> {
    let namespace = object::namespace(pod);
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    let names = spec.get("imagePullSecrets").and_then(Value::as_array);
    for name in names.into_iter().flatten() {
        let Some(name) = name.get("name").and_then(Value::as_str) else {
            continue;
        };
        for (key, bytes) in source_data(store, "secrets", namespace, name) {
            let Ok(config) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            let auths = match key.as_str() {
                ".dockerconfigjson" => config.get("auths").cloned(),
                ".dockercfg" => Some(config),
                _ => None,
            };
            let Some(Value::Object(auths)) = auths else {
                continue;
            };
            for (server, entry) in auths {
                let text = |f: &str| entry.get(f).and_then(Value::as_str).unwrap_or("");
                let (mut username, mut password) = (text("username"), text("password"));
                let decoded = base64.decode(text("auth")).unwrap_or_default();
                let decoded = String::from_utf8_lossy(&decoded).into_owned();
                if username.is_empty() {
                    if let Some((u, p)) = decoded.split_once(':') {
                        (username, password) = (u, p);
                    }
                }
                let host = server
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .split('/')
                    .next()
                    .unwrap_or("");
                let registry = match host {
                    "index.docker.io" | "registry-1.docker.io" => "docker.io",
                    other => other,
                };
                out.push(RegistryAuth {
                    registry: registry.to_owned(),
                    username: username.to_owned(),
                    password: password.to_owned(),
                });
            }
        }
    }
    out
}

/// `securityContext` of a container over the pod's.
fn security_of(spec: &Value, container: &Value) -> SecurityRun {
    let field = |name: &str| {
        container
            .pointer(&format!("/securityContext/{name}"))
            .or_else(|| spec.pointer(&format!("/securityContext/{name}")))
    };
    SecurityRun {
        run_as_user: field("runAsUser").and_then(Value::as_i64),
        run_as_group: field("runAsGroup").and_then(Value::as_i64),
        read_only_root: container
            .pointer("/securityContext/readOnlyRootFilesystem")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    }
}

/// `resources` of a container (unparsable quantities are left out).
fn resources_of(container: &Value) -> ResourcesRun {
    let text = |path: &str| -> Option<String> {
        let v = container.pointer(path)?;
        v.as_str()
            .map(str::to_owned)
            .or_else(|| v.as_f64().map(|n| n.to_string()))
    };
    let cpu_limit = text("/resources/limits/cpu").and_then(|t| quantity(&t, 1000.0));
    ResourcesRun {
        cpu_request_millis: text("/resources/requests/cpu")
            .and_then(|t| quantity(&t, 1000.0))
            .or(cpu_limit),
        cpu_limit_millis: cpu_limit,
        memory_limit_bytes: text("/resources/limits/memory")
            .and_then(|t| quantity(&t, 1.0))
            .and_then(|n| i64::try_from(n).ok()),
    }
}

/// `ports[]` that ask for a `hostPort`.
fn host_ports_of(container: &Value) -> Vec<(String, i32, i32, String)> {
    let ports = container.get("ports").and_then(Value::as_array);
    ports
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let host = i32::try_from(p.get("hostPort")?.as_i64()?).ok()?;
            let port = i32::try_from(p.get("containerPort")?.as_i64()?).ok()?;
            let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            let ip = p.get("hostIP").and_then(Value::as_str).unwrap_or("");
            (host > 0).then(|| (protocol.to_owned(), port, host, ip.to_owned()))
        })
        .collect()
}

/// Volume types a node mounts; a pod naming another is refused ([`config_error`]).
pub const SUPPORTED_VOLUMES: [&str; 7] = [
    "configMap",
    "secret",
    "emptyDir",
    "hostPath",
    "persistentVolumeClaim",
    "downwardAPI",
    "projected",
];

/// Why the pod's containers cannot be created from what the node holds, in kubelet's words
/// (its `CreateContainerConfigError` messages), or `None`: a volume mount naming no volume, a
/// volume of a type the node does not mount, a ConfigMap or Secret (of a volume, `envFrom` or
/// an env key reference) or key that the node does not hold and that is not `optional`.
pub fn config_error(store: &Store, pod: &Object) -> Option<String> {
    let namespace = object::namespace(pod);
    let spec = pod.get("spec")?;
    let volumes: Vec<&Value> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let optional = |r: &Value| r.get("optional").and_then(Value::as_bool).unwrap_or(false);
    let word = |kind: &str| {
        if kind == "secrets" {
            "secret"
        } else {
            "configmap"
        }
    };
    let missing = |kind: &str, name: &str| format!("{} \"{name}\" not found", word(kind));
    // Each source a container needs: (kind, name, keys it needs, optional).
    let mut needs: Vec<(&str, String, Vec<String>, bool)> = Vec::new();
    for volume in &volumes {
        let name = volume.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(kind) = SUPPORTED_VOLUMES.iter().find(|k| volume.get(**k).is_some()) else {
            let types: Vec<&String> = volume
                .as_object()
                .into_iter()
                .flat_map(|o| o.keys())
                .filter(|k| *k != "name")
                .collect();
            return Some(format!(
                "volume \"{name}\": unsupported volume type {types:?} (this node mounts {})",
                SUPPORTED_VOLUMES.join(", ")
            ));
        };
        let keys = |source: &Value| -> Vec<String> {
            source
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("key").and_then(Value::as_str).map(str::to_owned))
                .collect()
        };
        let mut add = |kind: &'static str, source: &Value, name_field: &str| {
            if let Some(name) = source.get(name_field).and_then(Value::as_str) {
                needs.push((kind, name.to_owned(), keys(source), optional(source)));
            }
        };
        match *kind {
            "configMap" => add("configmaps", &volume["configMap"], "name"),
            "secret" => add("secrets", &volume["secret"], "secretName"),
            "projected" => {
                let sources = volume
                    .pointer("/projected/sources")
                    .and_then(Value::as_array);
                for source in sources.into_iter().flatten() {
                    if let Some(cm) = source.get("configMap") {
                        add("configmaps", cm, "name");
                    } else if let Some(secret) = source.get("secret") {
                        add("secrets", secret, "name");
                    }
                }
            }
            _ => {}
        }
    }
    let lists = ["initContainers", "containers"];
    let containers = lists
        .iter()
        .filter_map(|l| spec.get(*l).and_then(Value::as_array))
        .flatten();
    for container in containers {
        let container_name = container.get("name").and_then(Value::as_str).unwrap_or("");
        let mounts = container.get("volumeMounts").and_then(Value::as_array);
        for mount in mounts.into_iter().flatten() {
            let name = mount.get("name").and_then(Value::as_str).unwrap_or("");
            if !volumes
                .iter()
                .any(|v| v.get("name").and_then(Value::as_str) == Some(name))
            {
                return Some(format!(
                    "cannot find volume \"{name}\" to mount into container \"{container_name}\""
                ));
            }
        }
        let env_from = container.get("envFrom").and_then(Value::as_array);
        for source in env_from.into_iter().flatten() {
            for (field, kind) in [("configMapRef", "configmaps"), ("secretRef", "secrets")] {
                if let Some(r) = source.get(field) {
                    let name = r.get("name").and_then(Value::as_str).unwrap_or("");
                    needs.push((kind, name.to_owned(), Vec::new(), optional(r)));
                }
            }
        }
        let env = container.get("env").and_then(Value::as_array);
        for var in env.into_iter().flatten() {
            for (field, kind) in [
                ("configMapKeyRef", "configmaps"),
                ("secretKeyRef", "secrets"),
            ] {
                if let Some(r) = var.get("valueFrom").and_then(|f| f.get(field)) {
                    let name = r.get("name").and_then(Value::as_str).unwrap_or("");
                    let key = r
                        .get("key")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    needs.push((kind, name.to_owned(), vec![key], optional(r)));
                }
            }
        }
    }
    for (kind, name, keys, optional) in needs {
        if optional {
            continue;
        }
        let Some(data) = source(store, kind, namespace, &name) else {
            return Some(missing(kind, &name));
        };
        if let Some(key) = keys.iter().find(|k| !data.iter().any(|(d, _)| d == *k)) {
            let kind = if kind == "secrets" {
                "Secret"
            } else {
                "ConfigMap"
            };
            return Some(format!(
                "couldn't find key {key} in {kind} {namespace}/{name}"
            ));
        }
    }
    None
}

/// What the runtime needs to run `pod`, resolved against the cache now.
pub fn pod_run(store: &Store, pod: &Object, pods_dir: &Path) -> PodRun {
    let namespace = object::namespace(pod);
    let name = object::name(pod);
    let spec = pod.get("spec").cloned().unwrap_or(Value::Null);
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let root = pods_dir.join(format!("{namespace}_{name}")).join("root");
    let to_run = |c: &Value| {
        let command = strings(c.get("command"));
        let args = strings(c.get("args"));
        let mut argv = command.clone();
        if !argv.is_empty() {
            argv.extend(args.iter().cloned());
        }
        let image = c
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        ContainerRun {
            name: c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            pull_policy: PullPolicy::of(c.get("imagePullPolicy").and_then(Value::as_str), &image),
            image,
            argv,
            env: env_of(store, pod, c),
            command,
            args,
            working_dir: c
                .get("workingDir")
                .and_then(Value::as_str)
                .filter(|w| !w.is_empty())
                .map(str::to_owned),
            mounts: mounts_of(&spec, c, &root),
            privileged: c
                .pointer("/securityContext/privileged")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            security: security_of(&spec, c),
            resources: resources_of(c),
            host_ports: host_ports_of(c),
            stdin: c.get("stdin").and_then(Value::as_bool).unwrap_or(false),
            stdin_once: c.get("stdinOnce").and_then(Value::as_bool).unwrap_or(false),
            tty: c.get("tty").and_then(Value::as_bool).unwrap_or(false),
        }
    };
    let list = |field: &str| -> Vec<ContainerRun> {
        spec.get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(to_run)
            .collect()
    };
    let containers = list("containers");
    let init_containers = list("initContainers");
    PodRun {
        id: format!("{namespace}/{name}"),
        uid: object::meta_str(pod, "uid").unwrap_or("").to_owned(),
        restart_policy: RestartPolicy::parse(spec.get("restartPolicy").and_then(Value::as_str)),
        files: volume_files(store, pod, &spec),
        containers,
        init_containers,
        // Edged fills this in when the runtime does not know the pod yet.
        recorded: Vec::new(),
        pull_secrets: pull_secrets_of(store, pod, &spec),
        host_network: spec
            .get("hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        root,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use replication::{Precondition, StoreConfig, WriteSet};
    use serde_json::json;

    fn store_with(objects: &[(&str, Value)]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::edge();
        config.sync_writes = false;
        config.versioning = replication::Versioning::Assign;
        let store = Store::open(dir.path(), config).unwrap();
        let mut set = WriteSet::new();
        for (key, object) in objects {
            set.put(
                ObjectKey::parse(key).unwrap(),
                Bytes::from(serde_json::to_vec(object).unwrap()),
                Precondition::None,
            );
        }
        store.commit(set).unwrap();
        (dir, store)
    }

    #[test]
    fn what_a_pod_needs_and_the_node_lacks_is_said_in_kubelets_words() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "ns"}, "data": {"a": "1"}});
        let (_dir, store) = store_with(&[("configmaps/ns/cfg", cm)]);
        let pod = |volumes: Value, container: Value| -> Object {
            let mut c = json!({"name": "main", "image": "busybox"});
            c.as_object_mut()
                .unwrap()
                .extend(container.as_object().unwrap().clone());
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "ns"},
                "spec": {"volumes": volumes, "containers": [c]}}))
            .unwrap()
        };
        let error = |p: &Object| config_error(&store, p);
        assert_eq!(error(&pod(json!([]), json!({}))), None);
        let fine = pod(
            json!([{"name": "c", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "a"}]}},
                   {"name": "o", "secret": {"secretName": "gone", "optional": true}}]),
            json!({"volumeMounts": [{"name": "c", "mountPath": "/c"}],
                   "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}]}),
        );
        assert_eq!(error(&fine), None);
        let gitrepo = pod(
            json!([{"name": "g", "gitRepo": {"repository": "r"}}]),
            json!({}),
        );
        assert!(error(&gitrepo)
            .unwrap()
            .starts_with("volume \"g\": unsupported volume type [\"gitRepo\"]"));
        let unmounted = pod(
            json!([]),
            json!({"volumeMounts": [{"name": "x", "mountPath": "/x"}]}),
        );
        assert_eq!(
            error(&unmounted).unwrap(),
            "cannot find volume \"x\" to mount into container \"main\""
        );
        let no_cm = pod(
            json!([{"name": "c", "configMap": {"name": "other"}}]),
            json!({}),
        );
        assert_eq!(error(&no_cm).unwrap(), "configmap \"other\" not found");
        let no_secret = pod(
            json!([]),
            json!({"envFrom": [{"secretRef": {"name": "creds"}}]}),
        );
        assert_eq!(error(&no_secret).unwrap(), "secret \"creds\" not found");
        let no_key = pod(
            json!([]),
            json!({"env": [{"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "b"}}}]}),
        );
        assert_eq!(
            error(&no_key).unwrap(),
            "couldn't find key b in ConfigMap ns/cfg"
        );
        let optional_key = pod(
            json!([]),
            json!({"env": [{"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "b", "optional": true}}}]}),
        );
        assert_eq!(error(&optional_key), None);
    }

    #[test]
    fn downward_api_and_projected_volumes_become_files() {
        let base64 = base64::engine::general_purpose::STANDARD;
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "ns"}, "data": {"a": "1", "b": "2"}});
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "ns"}, "data": {"k": base64.encode("v")}});
        let (_dir, store) = store_with(&[("configmaps/ns/cfg", cm), ("secrets/ns/s", secret)]);
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1",
                "labels": {"tier": "edge", "app": "a\"b"}, "annotations": {"note": "x"}},
            "spec": {
                "volumes": [
                    {"name": "info", "downwardAPI": {"items": [
                        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
                        {"path": "tier", "fieldRef": {"fieldPath": "metadata.labels['tier']"}},
                        {"path": "cpu", "resourceFieldRef": {"containerName": "main",
                            "resource": "limits.cpu", "divisor": "1m"}},
                        {"path": "mem", "resourceFieldRef": {"containerName": "main",
                            "resource": "requests.memory", "divisor": "1Mi"}},
                        {"path": "../escape", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    {"name": "all", "projected": {"sources": [
                        {"configMap": {"name": "cfg", "items": [{"key": "b", "path": "conf/b"}]}},
                        {"secret": {"name": "s"}},
                        {"downwardAPI": {"items": [
                            {"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
                        {"serviceAccountToken": {"path": "token"}}]}}],
                "containers": [{
                    "name": "main", "image": "busybox",
                    "resources": {"limits": {"cpu": "250m"}, "requests": {"memory": "3Mi"}},
                    "volumeMounts": [{"name": "info", "mountPath": "/etc/podinfo"},
                                     {"name": "all", "mountPath": "/all"}]}]}});
        let pod: Object = serde_json::from_value(pod).unwrap();
        let run = pod_run(&store, &pod, Path::new("/d/pods"));
        let files: Vec<(String, String)> = run
            .files
            .iter()
            .map(|(p, v)| {
                (
                    p.display().to_string(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let expected = [
            ("all/conf/b", "2"),
            ("all/k", "v"),
            ("all/ns", "ns"),
            ("etc/podinfo/cpu", "250"),
            ("etc/podinfo/labels", "app=\"a\\\"b\"\ntier=\"edge\""),
            ("etc/podinfo/mem", "3"),
            ("etc/podinfo/name", "p"),
            ("etc/podinfo/tier", "edge"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(p, v)| ((*p).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(files, expected);
        let mounts: Vec<_> = run.containers[0]
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.read_only))
            .collect();
        assert_eq!(mounts, [("/etc/podinfo", true), ("/all", true)]);
    }

    #[test]
    fn a_pod_spec_becomes_what_a_container_runtime_needs() {
        let base64 = base64::engine::general_purpose::STANDARD;
        let config = r#"{"auths":{"https://reg.example:5000/v2/":{"auth":"dTpw"},"other.example":{"username":"a","password":"b"}}}"#;
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "pull", "namespace": "ns"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.encode(config)}});
        let (_dir, store) = store_with(&[("secrets/ns/pull", secret)]);
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {
                "hostNetwork": true,
                "imagePullSecrets": [{"name": "pull"}, {"name": "absent"}],
                "securityContext": {"runAsUser": 1000, "runAsGroup": 5},
                "volumes": [{"name": "scratch", "emptyDir": {}},
                            {"name": "host", "hostPath": {"path": "/srv/data"}},
                            {"name": "cfg", "configMap": {"name": "cfg"}},
                            {"name": "weird", "gitRepo": {"repository": "x"}}],
                "containers": [{
                    "name": "main", "image": "reg.example:5000/app",
                    "args": ["--flag"], "workingDir": "/work",
                    "securityContext": {"runAsGroup": 7, "readOnlyRootFilesystem": true},
                    "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                    "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 81}],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/data"},
                                     {"name": "host", "mountPath": "/host", "readOnly": true},
                                     {"name": "cfg", "mountPath": "/etc/cfg"},
                                     {"name": "weird", "mountPath": "/w"}]}]}});
        let pod: Object = serde_json::from_value(pod).unwrap();
        let run = pod_run(&store, &pod, Path::new("/d/pods"));
        assert!(run.host_network);
        let names: Vec<_> = run
            .pull_secrets
            .iter()
            .map(|a| {
                (
                    a.registry.as_str(),
                    a.username.as_str(),
                    a.password.as_str(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [("reg.example:5000", "u", "p"), ("other.example", "a", "b")]
        );
        let c = &run.containers[0];
        assert!(c.command.is_empty() && c.argv.is_empty());
        assert_eq!(c.args, ["--flag"]);
        assert_eq!(c.working_dir.as_deref(), Some("/work"));
        assert_eq!(c.pull_policy, PullPolicy::Always);
        assert_eq!(c.security.run_as_user, Some(1000));
        assert_eq!(c.security.run_as_group, Some(7));
        assert!(c.security.read_only_root);
        assert_eq!(c.resources.cpu_limit_millis, Some(500));
        assert_eq!(c.resources.cpu_request_millis, Some(500));
        assert_eq!(c.resources.memory_limit_bytes, Some(64 << 20));
        assert_eq!(c.host_ports, [("TCP".to_owned(), 80, 8080, String::new())]);
        let mounts: Vec<_> = c
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.clone(), m.read_only))
            .collect();
        assert_eq!(
            mounts,
            [
                (
                    "/data",
                    PathBuf::from("/d/pods/ns_p/volumes/scratch"),
                    false
                ),
                ("/host", PathBuf::from("/srv/data"), true),
                ("/etc/cfg", PathBuf::from("/d/pods/ns_p/root/etc/cfg"), true),
            ]
        );
    }
}
