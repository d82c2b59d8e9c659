//! From a pod object and the node's cache to what a runtime runs: argv, env (literal values,
//! `valueFrom.configMapKeyRef/secretKeyRef/fieldRef`, `envFrom`) and the files of ConfigMap
//! and Secret volumes at each container's `mountPath` under the pod root.
//!
//! A missing ConfigMap, Secret or key leaves the variable or file out (an optional reference
//! behaves the same; kubelet would hold a non-optional one in CreateContainerConfigError).

use std::path::{Path, PathBuf};

use base64::Engine;
use replication::api::object::{self, Object};
use replication::{ObjectKey, Store};
use serde_json::Value;

use super::runtime::{
    quantity, ContainerRun, MountRun, PodRun, PullPolicy, RegistryAuth, ResourcesRun,
    RestartPolicy, SecurityRun,
};

/// The `data` of a ConfigMap (and `binaryData`) or Secret (decoded), as bytes by key.
fn source_data(store: &Store, kind: &str, namespace: &str, name: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(key) = ObjectKey::new(kind, namespace, name) else {
        return Vec::new();
    };
    let Some(object) = store
        .get(&key)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice::<Object>(&v.object).ok())
    else {
        return Vec::new();
    };
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
    out
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

/// The files of the pod's ConfigMap and Secret volumes, at every container's mount of them.
fn volume_files(store: &Store, pod: &Object, spec: &Value) -> Vec<(PathBuf, Vec<u8>)> {
    let namespace = object::namespace(pod);
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
            let (kind, source_name, items) = if let Some(cm) = volume.get("configMap") {
                ("configmaps", cm.get("name"), cm.get("items"))
            } else if let Some(secret) = volume.get("secret") {
                ("secrets", secret.get("secretName"), secret.get("items"))
            } else {
                continue;
            };
            let Some(source_name) = source_name.and_then(Value::as_str) else {
                continue;
            };
            let data = source_data(store, kind, namespace, source_name);
            let base = Path::new(path.trim_start_matches('/'));
            match items.and_then(Value::as_array) {
                Some(items) => {
                    for item in items {
                        let (Some(k), Some(p)) = (
                            item.get("key").and_then(Value::as_str),
                            item.get("path").and_then(Value::as_str),
                        ) else {
                            continue;
                        };
                        if let Some((_, v)) = data.iter().find(|(dk, _)| dk == k) {
                            files.push((base.join(p), v.clone()));
                        }
                    }
                }
                None => files.extend(data.into_iter().map(|(k, v)| (base.join(k), v))),
            }
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

/// A container's volume mounts resolved to the node's paths (see [`MountRun`]): configMap and
/// secret volumes at `root/<mountPath>` (where [`volume_files`] writes their files), emptyDir
/// at `<pod dir>/volumes/<name>`, hostPath at its path, a PersistentVolumeClaim at the node's
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
        let (host_path, read_only) =
            if volume.get("configMap").is_some() || volume.get("secret").is_some() {
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
                            {"name": "weird", "downwardAPI": {}}],
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
