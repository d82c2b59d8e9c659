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

use super::runtime::{ContainerRun, PodRun, RestartPolicy};

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
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| {
            let mut argv = strings(c.get("command"));
            if !argv.is_empty() {
                argv.extend(strings(c.get("args")));
            }
            ContainerRun {
                name: c
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                image: c
                    .get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                argv,
                env: env_of(store, pod, c),
                stdin: c.get("stdin").and_then(Value::as_bool).unwrap_or(false),
                stdin_once: c.get("stdinOnce").and_then(Value::as_bool).unwrap_or(false),
            }
        })
        .collect();
    PodRun {
        id: format!("{namespace}/{name}"),
        uid: object::meta_str(pod, "uid").unwrap_or("").to_owned(),
        restart_policy: RestartPolicy::parse(spec.get("restartPolicy").and_then(Value::as_str)),
        root: pods_dir.join(format!("{namespace}_{name}")).join("root"),
        files: volume_files(store, pod, &spec),
        containers,
        // Edged fills this in when the runtime does not know the pod yet.
        recorded: Vec::new(),
    }
}
