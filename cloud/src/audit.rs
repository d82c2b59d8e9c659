//! The audit log of API writes (`cloudcore --audit-log FILE`): one JSON line per write
//! (create, update, patch, delete, deletecollection; exec, attach and port-forward into pods)
//! made through the API, by its clients over HTTP and by nodes whose MetaServer forwarded a
//! call over the link.
//!
//! Each line is a Kubernetes audit event (`audit.k8s.io/v1` `Event`, level `Metadata`, stage
//! `ResponseComplete`, as kube-apiserver writes with `--audit-log-path`), so tools that read
//! those read these:
//!
//! ```json
//! {"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"…",
//!  "stage":"ResponseComplete","requestURI":"/api/v1/namespaces/default/configmaps",
//!  "verb":"create","user":{"username":"kedge-admin"},"sourceIPs":["127.0.0.1"],
//!  "userAgent":"kubectl/v1.33","objectRef":{"resource":"configmaps","namespace":"default",
//!  "name":"x","apiGroup":"","apiVersion":"v1"},"responseStatus":{"code":201},
//!  "requestReceivedTimestamp":"…","stageTimestamp":"…"}
//! ```
//!
//! Refused writes are recorded too (their code says so). Reads are not. The file is bounded:
//! when a line would take it over `--audit-log-max-size`, it is renamed to `FILE.1` (replacing
//! the previous one) and a new `FILE` is started, so the log takes at most twice that.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{json, Value};

/// Default of `--audit-log-max-size`: 100 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 100 << 20;

/// Largest create response read back for the created object's name.
const MAX_NAME_PEEK_BYTES: usize = 8 << 20;

/// An append-only JSON-lines file with one rotated predecessor.
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<(File, u64)>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (appends to) `path`; it rotates beyond `max_bytes` (at least 1 KiB).
    ///
    /// # Errors
    /// The file cannot be created or opened for appending.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<AuditLog> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(AuditLog {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1024),
            state: Mutex::new((file, size)),
        })
    }

    /// Appends one event as a line; rotates first when the line would take the file over its
    /// size. A failing write is logged, never an error for the request.
    pub fn record(&self, event: &Value) {
        let mut line = event.to_string();
        line.push('\n');
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.1 > 0 && state.1 + line.len() as u64 > self.max_bytes {
            let rotated = rotated_path(&self.path);
            match std::fs::rename(&self.path, &rotated).and_then(|()| open_append(&self.path)) {
                Ok(file) => *state = (file, 0),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot rotate the audit log")
                }
            }
        }
        match state.0.write_all(line.as_bytes()) {
            Ok(()) => state.1 += line.len() as u64,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit log")
            }
        }
    }
}

/// `FILE.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Parses a size: bytes, or a number with `K`, `M`, `G` (powers of 1024, `Ki`/`KiB` too).
///
/// # Errors
/// Not a number with one of those suffixes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let number: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected a size such as 100M"))?;
    let factor: u64 = match unit.to_ascii_uppercase().trim_end_matches('B') {
        "" => 1,
        "K" | "KI" => 1 << 10,
        "M" | "MI" => 1 << 20,
        "G" | "GI" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// What a request path points at (Kubernetes' `objectRef`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectRef {
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// Parses `/api/v1/...` and `/apis/GROUP/VERSION/...` paths; `None` for anything else.
pub fn object_ref(path: &str) -> Option<ObjectRef> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_group, api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", _, "status" | "finalize"] => (None, rest),
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let owned = |s: &&str| (*s).to_owned();
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(owned(name)), None),
        [resource, name, sub, ..] => (*resource, Some(owned(name)), Some(owned(sub))),
        [] => return None,
    };
    Some(ObjectRef {
        api_group: api_group.to_owned(),
        api_version: api_version.to_owned(),
        resource: resource.to_owned(),
        namespace,
        name,
        subresource,
    })
}

/// Kubernetes' verb of a write: `None` for reads. Exec, attach and port-forward into a pod
/// are `create`s of their subresource whatever the method (kubectl's WebSocket streams are
/// GETs; Kubernetes authorizes them as `create` since 1.30).
pub fn write_verb(method: &Method, object: &ObjectRef) -> Option<&'static str> {
    if object.resource == "pods"
        && matches!(
            object.subresource.as_deref(),
            Some("exec" | "attach" | "portforward")
        )
    {
        return Some("create");
    }
    Some(match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if object.name.is_none() => "deletecollection",
        Method::DELETE => "delete",
        _ => return None,
    })
}

/// Who made a request, for [`middleware`].
#[derive(Debug, Clone)]
pub struct Auditor {
    pub log: Arc<AuditLog>,
    /// The username recorded (the API's one identity, or `system:node:NAME` for a node).
    pub user: Arc<str>,
}

/// axum middleware recording every write that passes through it (see the module).
pub async fn middleware(State(auditor): State<Auditor>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let object = object_ref(&path);
    let verb = object
        .as_ref()
        .and_then(|o| write_verb(request.method(), o));
    let (Some(mut object), Some(verb)) = (object, verb) else {
        return next.run(request).await;
    };
    let received = replication::api::object::now_micro_rfc3339();
    let uri = request.uri().to_string();
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let user_agent = request
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut response = next.run(request).await;
    let code = response.status().as_u16();
    // A create names its object in the body; the answer says which name it got.
    if object.name.is_none() && verb == "create" && response.status().is_success() {
        let json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.contains("json"));
        if json {
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, MAX_NAME_PEEK_BYTES)
                .await
                .unwrap_or_default();
            object.name = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["metadata"]["name"].as_str().map(str::to_owned));
            response = Response::from_parts(parts, Body::from(bytes));
        }
    }
    let mut object_json = json!({
        "resource": object.resource,
        "apiGroup": object.api_group,
        "apiVersion": object.api_version,
    });
    for (key, value) in [
        ("namespace", &object.namespace),
        ("name", &object.name),
        ("subresource", &object.subresource),
    ] {
        if let Some(value) = value {
            object_json[key] = json!(value);
        }
    }
    let mut event = json!({
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": uuid::Uuid::new_v4().to_string(),
        "stage": "ResponseComplete",
        "requestURI": uri,
        "verb": verb,
        "user": {"username": &*auditor.user},
        "sourceIPs": source.into_iter().collect::<Vec<_>>(),
        "objectRef": object_json,
        "responseStatus": {"code": code},
        "requestReceivedTimestamp": received,
        "stageTimestamp": replication::api::object::now_micro_rfc3339(),
    });
    if let Some(agent) = user_agent {
        event["userAgent"] = json!(agent);
    }
    auditor.log.record(&event);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_objects() {
        let r = object_ref("/api/v1/namespaces/default/configmaps/x").expect("ref");
        assert_eq!(
            (
                r.api_group.as_str(),
                r.resource.as_str(),
                r.namespace.as_deref(),
                r.name.as_deref()
            ),
            ("", "configmaps", Some("default"), Some("x"))
        );
        let r = object_ref("/apis/apps/v1/namespaces/a/deployments/d/scale").expect("ref");
        assert_eq!(r.api_group, "apps");
        assert_eq!(r.subresource.as_deref(), Some("scale"));
        let r = object_ref("/api/v1/namespaces/a").expect("ref");
        assert_eq!(
            (
                r.resource.as_str(),
                r.name.as_deref(),
                r.namespace.as_deref()
            ),
            ("namespaces", Some("a"), None)
        );
        let r = object_ref("/api/v1/namespaces/a/status").expect("ref");
        assert_eq!(r.subresource.as_deref(), Some("status"));
        let r = object_ref("/api/v1/nodes").expect("ref");
        assert_eq!((r.resource.as_str(), r.name.as_deref()), ("nodes", None));
        assert!(object_ref("/healthz").is_none());
        assert!(object_ref("/servicebus/n/app/x").is_none());
        assert_eq!(write_verb(&Method::DELETE, &r), Some("deletecollection"));
        let exec = object_ref("/api/v1/namespaces/a/pods/p/exec").expect("ref");
        assert_eq!(write_verb(&Method::GET, &exec), Some("create"));
        let log = object_ref("/api/v1/namespaces/a/pods/p/log").expect("ref");
        assert_eq!(write_verb(&Method::GET, &log), None);
        assert_eq!(write_verb(&Method::GET, &r), None);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn the_log_rotates_into_one_predecessor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, 1024).expect("open");
        for i in 0..100 {
            log.record(&json!({"i": i, "pad": "x".repeat(40)}));
        }
        let current = std::fs::read_to_string(&path).expect("current");
        let previous = std::fs::read_to_string(rotated_path(&path)).expect("rotated");
        assert!(current.len() <= 1024 && previous.len() <= 1024);
        let last: Value =
            serde_json::from_str(current.lines().last().expect("a line")).expect("json");
        assert_eq!(last["i"], 99);
        let first_kept: Value =
            serde_json::from_str(previous.lines().next().expect("a line")).expect("json");
        let lines = current.lines().count() + previous.lines().count();
        assert_eq!(
            first_kept["i"],
            100 - lines as u64,
            "no gap between the two files"
        );
    }
}
