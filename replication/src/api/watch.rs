//! The watch stream: newline-delimited JSON events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`,
//! `ERROR`), as the apiserver sends them.
//!
//! Without a resourceVersion (or with "0") the stream starts with the current objects as
//! `ADDED`, then follows changes after them. With a resourceVersion it replays the changes after
//! it from the store's watch history; one older than the history gets an in-stream `ERROR` with
//! code 410, which is what makes clients (kube-rs, client-go) re-list.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use super::object;
use super::rest::{range_of, ApiRequest, Selectors};
use super::status::ApiError;
use super::table;
use super::{ApiServer, Resource};
use crate::change::{ChangeKind, SharedChange};
use crate::watch::{WatchError, Watcher};

/// How often a bookmark is sent to a watcher that asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(15);
/// A watch ends after this long unless the client asked for less (the apiserver picks 30–60 min).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// `timeoutSeconds` above this is capped (a client value must not overflow a deadline).
const MAX_TIMEOUT_SECONDS: u64 = 24 * 3600;
/// Encoded events buffered per watch before the stream waits for the client.
const STREAM_BUFFER: usize = 64;

struct Encoder {
    resource: &'static Resource,
    table: bool,
    include_object: bool,
}

impl Encoder {
    fn event(&self, kind: &str, object: Value) -> Bytes {
        let mut line =
            serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    /// The event for a stored object. The object is parsed only when selectors or a Table need
    /// it; otherwise its bytes go into the event as they are (with the version spliced in).
    fn stored_event(
        &self,
        kind: &str,
        stored: &[u8],
        rv: u64,
        selectors: &Selectors,
    ) -> Option<Bytes> {
        if !self.table && selectors.is_empty() {
            let object = object::with_resource_version(stored, rv).ok()?;
            let mut line = Vec::with_capacity(object.len() + 32);
            line.extend_from_slice(b"{\"type\":");
            serde_json::to_writer(&mut line, kind).ok()?;
            line.extend_from_slice(b",\"object\":");
            line.extend_from_slice(&object);
            line.extend_from_slice(b"}\n");
            return Some(Bytes::from(line));
        }
        let o = object::decode_stored(stored, rv).ok()?;
        selectors.matches(&o).then(|| self.object_event(kind, o))
    }

    fn object_event(&self, kind: &str, object: object::Object) -> Bytes {
        if self.table {
            let rv = object::meta_str(&object, "resourceVersion")
                .unwrap_or_default()
                .to_owned();
            let t = table::table(
                self.resource,
                vec![object],
                json!({"resourceVersion": rv}),
                self.include_object,
                true,
            );
            return self.event(kind, t);
        }
        self.event(kind, Value::Object(object))
    }

    fn bookmark(&self, revision: u64) -> Bytes {
        self.event(
            "BOOKMARK",
            json!({
                "kind": self.resource.kind,
                "apiVersion": self.resource.api_version(),
                "metadata": {
                    "resourceVersion": revision.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            }),
        )
    }

    fn error(&self, error: &ApiError) -> Bytes {
        self.event("ERROR", error.to_status())
    }
}

fn watch_error(error: &WatchError) -> ApiError {
    match error {
        WatchError::Gone { requested, oldest } => {
            ApiError::gone(format!("too old resource version: {requested} ({oldest})"))
        }
        WatchError::TooSlow { .. } => ApiError::gone(format!("{error}")),
        WatchError::Future { requested, latest } => ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {requested}, current: {latest}"),
        ),
        WatchError::Closed => ApiError::unavailable("the store is shutting down"),
    }
}

pub(crate) fn serve(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    let mut selectors = Selectors::from_query(&request.query)?;
    // A watch on one object (`.../pods/name?watch=true` or `/watch/.../name`).
    if let Some(name) = &request.target.name {
        let mut fields = request
            .query
            .get("fieldSelector")
            .cloned()
            .unwrap_or_default();
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={name}"));
        selectors.fields = super::selector::FieldSelector::parse(&fields)?;
    }
    let from =
        match request.query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} is not valid"))
            })?),
        };
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_TIMEOUT, |t| {
            Duration::from_secs(t.min(MAX_TIMEOUT_SECONDS))
        });
    let bookmarks = request
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let send_initial_events = request
        .query
        .get("sendInitialEvents")
        .is_some_and(|b| b == "true" || b == "1");
    let encoder = Encoder {
        resource: request.target.resource,
        table: table::wants_table(
            request
                .headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        ),
        include_object: request.query.get("includeObject").map(String::as_str) == Some("Object"),
    };
    let range = range_of(&request.target)?;
    let store = server.store.clone();
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);

    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        let (mut watcher, mut seen) = match from {
            Some(rv) => match store.watch().subscribe(range.clone(), Some(rv)) {
                Ok(w) => (w, HashMap::new()),
                Err(e) => {
                    let _ = tx.send(encoder.error(&watch_error(&e))).await;
                    return;
                }
            },
            None => {
                // Subscribe first, then list: changes racing the list are replayed, and the
                // versions listed are remembered so they are not sent twice.
                let revision = store.revision();
                let watcher = match store.watch().subscribe(range.clone(), Some(revision)) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = tx.send(encoder.error(&watch_error(&e))).await;
                        return;
                    }
                };
                let listed = {
                    let store = store.clone();
                    let range = range.clone();
                    tokio::task::spawn_blocking(move || {
                        store.scan(&range).collect::<Result<Vec<_>, _>>()
                    })
                    .await
                };
                let listed = match listed {
                    Ok(Ok(listed)) => listed,
                    _ => {
                        let _ = tx
                            .send(encoder.error(&ApiError::internal("initial list failed")))
                            .await;
                        return;
                    }
                };
                let mut seen = HashMap::new();
                for (key, versioned) in listed {
                    if versioned.revision > revision {
                        seen.insert(key, versioned.revision);
                    }
                    let event = encoder.stored_event(
                        "ADDED",
                        &versioned.object,
                        versioned.revision,
                        &selectors,
                    );
                    if let Some(event) = event {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                (watcher, seen)
            }
        };
        if bookmarks && send_initial_events {
            // The initial events are complete (the watch-list protocol's marker).
            let _ = tx.send(encoder.bookmark(watcher.position())).await;
        }
        run(
            &mut watcher,
            &mut seen,
            &selectors,
            &encoder,
            &tx,
            deadline,
            bookmarks,
        )
        .await;
    });

    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::io::Error>(chunk), rx))
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn run(
    watcher: &mut Watcher,
    seen: &mut HashMap<crate::key::ObjectKey, u64>,
    selectors: &Selectors,
    encoder: &Encoder,
    tx: &mpsc::Sender<Bytes>,
    deadline: Instant,
    bookmarks: bool,
) {
    let mut next_bookmark = Instant::now() + BOOKMARK_EVERY;
    loop {
        let event = tokio::select! {
            change = watcher.next() => match change {
                Ok(change) => change_event(&change, seen, selectors, encoder),
                Err(e) => {
                    let _ = tx.send(encoder.error(&watch_error(&e))).await;
                    return;
                }
            },
            _ = sleep_until(next_bookmark), if bookmarks => {
                next_bookmark = Instant::now() + BOOKMARK_EVERY;
                Some(encoder.bookmark(watcher.position()))
            }
            _ = sleep_until(deadline) => return,
            _ = tx.closed() => return,
        };
        if let Some(event) = event {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

fn change_event(
    change: &SharedChange,
    seen: &mut HashMap<crate::key::ObjectKey, u64>,
    selectors: &Selectors,
    encoder: &Encoder,
) -> Option<Bytes> {
    if let Some(listed) = seen.get(&change.key) {
        if change.revision <= *listed {
            return None;
        }
        seen.remove(&change.key);
    }
    let kind = match change.kind {
        ChangeKind::Added => "ADDED",
        ChangeKind::Modified => "MODIFIED",
        ChangeKind::Deleted => "DELETED",
    };
    encoder.stored_event(kind, &change.object, change.revision, selectors)
}
