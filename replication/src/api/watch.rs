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
use super::options;
use super::rest::{range_of, ApiRequest, Selectors};
use super::status::StatusReason;
use super::status::{ApiError, Cause};
use super::table;
use super::{ApiServer, Resource};
use crate::change::{ChangeKind, SharedChange};
use crate::version::Revision;
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
        rv: Revision,
        selectors: &Selectors,
    ) -> Option<Bytes> {
        if !self.table && selectors.is_empty() {
            let version = super::rest::served_api_version(self.resource);
            let object = object::with_resource_version_as(stored, rv, version.as_deref()).ok()?;
            let mut line = Vec::with_capacity(object.len() + 32);
            line.extend_from_slice(b"{\"type\":");
            serde_json::to_writer(&mut line, kind).ok()?;
            line.extend_from_slice(b",\"object\":");
            line.extend_from_slice(&object);
            line.extend_from_slice(b"}\n");
            return Some(Bytes::from(line));
        }
        let mut o = object::decode_stored(stored, rv).ok()?;
        if let Some(version) = super::rest::served_api_version(self.resource) {
            o.insert("apiVersion".into(), Value::String(version));
        }
        selectors.matches(&o).then(|| self.object_event(kind, o))
    }

    /// The least a `DELETED` event can carry when the object's last state is not readable:
    /// its kind, name, namespace and the delete's resourceVersion.
    fn placeholder(&self, change: &SharedChange) -> object::Object {
        let mut metadata = json!({
            "name": change.key.name(),
            "resourceVersion": change.revision.to_string(),
        });
        if !change.key.namespace().is_empty() {
            metadata["namespace"] = json!(change.key.namespace());
        }
        let placeholder = json!({
            "kind": self.resource.kind,
            "apiVersion": self.resource.api_version(),
            "metadata": metadata,
        });
        match placeholder {
            Value::Object(map) => map,
            _ => object::Object::new(),
        }
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

    /// A `BOOKMARK` at `revision`: an object of the watched kind with only
    /// `metadata.resourceVersion`; the one that ends a watch-list's initial events carries the
    /// annotation `k8s.io/initial-events-end: "true"` (and only that one, as kube-apiserver).
    fn bookmark(&self, revision: Revision, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.event(
            "BOOKMARK",
            json!({
                "kind": self.resource.kind,
                "apiVersion": self.resource.api_version(),
                "metadata": metadata,
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
            StatusReason::Timeout,
            format!("Too large resource version: {requested}, current: {latest}"),
        ),
        WatchError::Closed => ApiError::unavailable("the store is shutting down"),
    }
}

/// How long a watch-list waits for the store to reach a `resourceVersion` ahead of it before
/// answering 504, as kube-apiserver's watch cache waits (`blockTimeout`, 3 s).
const FRESHNESS_WAIT: Duration = Duration::from_secs(3);

/// Where a watch starts, from its `resourceVersion` and `sendInitialEvents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The current objects as `ADDED`, then changes after them; the state listed is at least
    /// as new as `not_older_than` (the store's revision is waited for if it is behind).
    Initial { not_older_than: Option<Revision> },
    /// Changes after this revision (`None`: from now on), from the watch history.
    After(Option<Revision>),
}

impl Start {
    /// Kubernetes' rules: `sendInitialEvents` defaults to true for `resourceVersion` unset or
    /// "0" (the legacy "current state, then changes" watch) and to false otherwise; with it,
    /// `resourceVersionMatch=NotOlderThan` (checked before) makes the version a lower bound of
    /// the initial state, not a point to replay from.
    fn of(query: &super::Query) -> Result<Start, ApiError> {
        let rv = match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<Revision>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} is not valid"))
            })?),
        };
        let initial = options::send_initial_events(query)?.unwrap_or(rv.is_none());
        Ok(if initial {
            Start::Initial { not_older_than: rv }
        } else {
            Start::After(rv)
        })
    }
}

/// kube-apiserver's answer to a watch-list whose `resourceVersion` the store did not reach in
/// time: `504 Timeout` "Too large resource version" with a `ResourceVersionTooLarge` cause and
/// `retryAfterSeconds` 1 (k8s.io/apiserver/pkg/storage `NewTooLargeResourceVersionError`).
fn too_large(requested: Revision, current: Revision) -> ApiError {
    let mut error = ApiError::new(
        504,
        StatusReason::Timeout,
        format!("Too large resource version: {requested}, current: {current}"),
    );
    error.causes = vec![Cause {
        reason: "ResourceVersionTooLarge",
        field: String::new(),
        message: "Too large resource version".into(),
    }];
    error.more = Some(Box::new(super::status::MoreDetails {
        retry_after_seconds: Some(1),
        ..Default::default()
    }));
    error
}

/// Waits (at most [`FRESHNESS_WAIT`]) until the store's revision is at least `revision`.
async fn wait_for_revision(store: &crate::Store, revision: Revision) -> Result<(), ApiError> {
    if store.revision() >= revision {
        return Ok(());
    }
    let mut watcher = store
        .watch()
        .subscribe(crate::KeyRange::all(), None)
        .map_err(|e| watch_error(&e))?;
    let reached = tokio::time::timeout(FRESHNESS_WAIT, async {
        // Each change moves the revision on; a lagging or closed watcher ends the wait.
        while store.revision() < revision {
            if watcher.next().await.is_err() {
                break;
            }
        }
    })
    .await;
    match reached {
        Ok(()) if store.revision() >= revision => Ok(()),
        _ => Err(too_large(revision, store.revision())),
    }
}

pub(crate) async fn serve(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    options::validate(&request.query, true)?;
    let mut selectors = Selectors::from_query(&request.query)?;
    // A watch on one object (`.../pods/name?watch=true` or `/watch/.../name`).
    if let Some(name) = &request.info.name {
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
    let start = Start::of(&request.query)?;
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
    // The watch-list protocol's end-of-initial-events bookmark is for those who asked for it.
    let initial_events_end = bookmarks
        && options::send_initial_events(&request.query)? == Some(true)
        && matches!(start, Start::Initial { .. });
    let encoder = Encoder {
        resource: request.info.resource,
        table: table::wants_table(
            request
                .headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default(),
        ),
        include_object: request.query.get("includeObject").map(String::as_str) == Some("Object"),
    };
    let range = range_of(&request.info)?;
    let store = server.store.clone();
    if let Start::Initial {
        not_older_than: Some(revision),
    } = start
    {
        // Answered before the stream starts, so a version never reached is an HTTP 504.
        wait_for_revision(&store, revision).await?;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);

    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        let (mut watcher, mut seen) = match start {
            Start::After(from) => match store.watch().subscribe(range.clone(), from) {
                Ok(w) => (w, HashMap::new()),
                Err(e) => {
                    let _ = tx.send(encoder.error(&watch_error(&e))).await;
                    return;
                }
            },
            Start::Initial { .. } => {
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
        if initial_events_end {
            let _ = tx.send(encoder.bookmark(watcher.position(), true)).await;
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
    seen: &mut HashMap<crate::key::ObjectKey, Revision>,
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
                Some(encoder.bookmark(watcher.position(), false))
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

/// The event a change makes for one watcher, as kube-apiserver's watch cache makes it
/// (`cacheWatcher.convertToWatchEvent`): with selectors, an update that makes the object match
/// is `ADDED`, one that makes it stop matching is `DELETED` carrying the object's previous
/// state at the change's resourceVersion, and one it matches neither before nor after is not
/// sent. Without selectors the stored bytes go out as they are.
fn change_event(
    change: &SharedChange,
    seen: &mut HashMap<crate::key::ObjectKey, Revision>,
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
    let decode = |bytes: &[u8]| object::decode_stored(bytes, change.revision).ok();
    if change.kind == ChangeKind::Deleted {
        if selectors.is_empty() {
            if let Some(event) =
                encoder.stored_event(kind, &change.object, change.revision, selectors)
            {
                return Some(event);
            }
        }
        // A client must learn that an object is gone even if its last state is unreadable.
        let last = decode(&change.object).unwrap_or_else(|| encoder.placeholder(change));
        return selectors
            .matches(&last)
            .then(|| encoder.object_event(kind, last));
    }
    if selectors.is_empty() {
        return encoder.stored_event(kind, &change.object, change.revision, selectors);
    }
    let current = decode(&change.object)?;
    let now = selectors.matches(&current);
    let before = match &change.prev {
        Some(prev) => decode(prev).filter(|prev| selectors.matches(prev)),
        // Not known (a change made without its previous state): judged by the current one.
        None if change.kind == ChangeKind::Modified && now => Some(current.clone()),
        None => None,
    };
    match (now, before) {
        (true, Some(_)) => Some(encoder.object_event(kind, current)),
        (true, None) => Some(encoder.object_event("ADDED", current)),
        (false, Some(prev)) => Some(encoder.object_event("DELETED", prev)),
        (false, None) => None,
    }
}
