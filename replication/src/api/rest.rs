//! get, list, create, update, patch, delete.

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use super::apply;
use super::object::{self, Object};
use super::patch::{self, PatchKind};
use super::resources::Resource;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::table;
use super::{bytes_response, ApiPolicy, ApiServer, Query, RequestInfo, Verb};
use crate::key::{KeyRange, ObjectKey};
use crate::occ::guaranteed_update;
use crate::store::{Precondition, Store, Versioned, WriteSet};
use crate::version::{ResourceVersion, Revision};

pub(crate) struct ApiRequest {
    pub info: RequestInfo,
    pub verb: Verb,
    pub query: Query,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiRequest {
    fn accept(&self) -> &str {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
    }

    /// The body as a JSON object: JSON, or protobuf for the kinds kubectl's generators send.
    fn body_object(&self) -> Result<Object, ApiError> {
        if self
            .content_type()
            .starts_with(super::protobuf::CONTENT_TYPE)
        {
            return match super::protobuf::decode(&self.body)? {
                Value::Object(map) => Ok(map),
                _ => Err(ApiError::bad_request("the protobuf body is not an object")),
            };
        }
        object::parse_object(&self.body)
    }

    fn dry_run(&self) -> bool {
        self.query.contains_key("dryRun")
    }

    fn namespace(&self) -> &str {
        self.info.namespace.as_deref().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.info.name.as_deref().unwrap_or_default()
    }

    fn key(&self) -> Result<ObjectKey, ApiError> {
        ObjectKey::new(self.info.resource.store_kind, self.namespace(), self.name())
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    fn wants_table(&self) -> bool {
        table::wants_table(self.accept())
    }

    fn include_object(&self) -> bool {
        self.query.get("includeObject").map(String::as_str) == Some("Object")
    }

    /// The manager of this write ([`apply::manager_of`]).
    fn manager(&self) -> String {
        apply::manager_of(
            self.query.get("fieldManager").map(String::as_str),
            self.headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// Records this non-apply write in `written`'s `managedFields` (when it has them).
    fn track_update(&self, current: &Object, written: &mut Object) {
        if self.info.status {
            // Status is not tracked; keep the entries as they are.
            if let Some(m) = object::meta(current).and_then(|m| m.get("managedFields")) {
                object::meta_mut(written).insert("managedFields".into(), m.clone());
            }
            return;
        }
        let cleared = object::meta(written)
            .and_then(|m| m.get("managedFields"))
            .and_then(Value::as_array)
            .is_some_and(|list| list.is_empty());
        apply::track_update(
            self.info.resource,
            current,
            written,
            &self.manager(),
            cleared,
        );
    }
}

/// `fieldValidation` for a custom resource's body, as kube-apiserver applies it: `Strict`
/// refuses fields its schema does not declare (400, kube-apiserver's "strict decoding error"
/// wording), `Warn` (the server default) returns them as warnings, `Ignore` says nothing. The
/// fields are pruned in every case. Built-in kinds are not checked (no schemas here).
///
/// # Errors
/// 400 `BadRequest` for unknown fields under `Strict`, or an unknown `fieldValidation` value.
fn field_validation(request: &ApiRequest, object: &Object) -> Result<Vec<String>, ApiError> {
    let mode = request
        .query
        .get("fieldValidation")
        .map_or("Warn", String::as_str);
    if !matches!(mode, "Strict" | "Warn" | "Ignore" | "") {
        return Err(ApiError::bad_request(format!(
            "fieldValidation {mode:?} is not one of Ignore, Warn, Strict"
        )));
    }
    let resource = request.info.resource;
    let Some(custom) = resource.custom else {
        return Ok(Vec::new());
    };
    if mode == "Ignore" {
        return Ok(Vec::new());
    }
    let unknown = super::schema::unknown_fields(&custom.schema, &Value::Object(object.clone()));
    if unknown.is_empty() {
        return Ok(Vec::new());
    }
    let listed: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field \"{f}\""))
        .collect();
    if mode == "Strict" {
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding \
             error: {}",
            listed.join(", "),
            kind = resource.kind,
            version = resource.version,
        )));
    }
    Ok(listed)
}

/// Adds `warnings` to `response` as `Warning: 299 - "..."` headers (RFC 7234, as
/// kube-apiserver sends them; kubectl prints each as `Warning: ...`).
fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

/// Runs store work off the async threads (RocksDB reads and fsyncs block).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
}

pub(crate) async fn serve(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    match request.verb {
        Verb::Get => get(server, request).await,
        Verb::List => list(server, request).await,
        Verb::Create => create(server, request).await,
        Verb::Update => update(server, request).await,
        Verb::Patch => patch(server, request).await,
        Verb::Delete => delete(server, request).await,
        Verb::Watch => Err(ApiError::internal("watch is served by the watch module")),
    }
}

/// The `apiVersion` to serve a stored object of `resource` at, when it differs from the stored
/// one: a custom resource read at a version other than its storage version.
pub(crate) fn served_api_version(resource: &Resource) -> Option<String> {
    resource
        .custom
        .filter(|c| c.storage_version != resource.version)
        .map(|_| resource.api_version())
}

fn render(resource: &Resource, versioned: &Versioned) -> Result<Vec<u8>, ApiError> {
    object::with_resource_version_as(
        &versioned.object,
        versioned.revision,
        served_api_version(resource).as_deref(),
    )
}

/// A stored object decoded for `resource` (at the version it was asked at).
pub(crate) fn decode_for(resource: &Resource, versioned: &Versioned) -> Result<Object, ApiError> {
    let mut object = object::decode_stored(&versioned.object, versioned.revision)?;
    if let Some(version) = served_api_version(resource) {
        object.insert("apiVersion".into(), Value::String(version));
    }
    Ok(object)
}

fn respond_object(
    request: &ApiRequest,
    code: StatusCode,
    versioned: &Versioned,
) -> Result<Response, ApiError> {
    if request.wants_table() {
        let object = decode_for(request.info.resource, versioned)?;
        let t = table::table(
            request.info.resource,
            vec![object],
            json!({"resourceVersion": versioned.revision.to_string()}),
            request.include_object(),
            true,
        );
        return Ok(bytes_response(
            code,
            serde_json::to_vec(&t).unwrap_or_default(),
        ));
    }
    Ok(bytes_response(
        code,
        render(request.info.resource, versioned)?,
    ))
}

fn read(store: &Store, key: &ObjectKey, request: &ApiRequest) -> Result<Versioned, ApiError> {
    store
        .get(key)
        .map_err(|e| ApiError::from_store(e, request.info.resource.store_kind, request.name()))?
        .ok_or_else(|| ApiError::not_found(request.info.resource.store_kind, request.name()))
}

async fn get(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    let store = server.store.clone();
    let key = request.key()?;
    let (request, versioned) = blocking(move || {
        let v = read(&store, &key, &request)?;
        Ok((request, v))
    })
    .await?;
    respond_object(&request, StatusCode::OK, &versioned)
}

/// `continue` tokens: the list's revision and the last key served, hex-encoded.
fn encode_continue(revision: Revision, last: &ObjectKey) -> String {
    let raw = format!("{revision}/{}", last.as_str());
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<(Revision, ObjectKey), ApiError> {
    let bad = || ApiError::bad_request(format!("continue token {token:?} is not valid"));
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (revision, key) = text.split_once('/').ok_or_else(bad)?;
    let revision = revision.parse().map_err(|_| bad())?;
    let key = ObjectKey::parse(key).map_err(|_| bad())?;
    Ok((revision, key))
}

pub(crate) struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn from_query(query: &Query) -> Result<Self, ApiError> {
        Ok(Selectors {
            labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
            fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    pub fn matches(&self, object: &Object) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

pub(crate) fn range_of(target: &RequestInfo) -> Result<KeyRange, ApiError> {
    let plural = target.resource.store_kind;
    let range = match &target.namespace {
        Some(ns) if target.resource.namespaced => KeyRange::namespace(plural, ns),
        _ => KeyRange::kind(plural),
    };
    range.map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn list(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    super::options::validate(&request.query, false)?;
    let selectors = Selectors::from_query(&request.query)?;
    let limit: usize = match request.query.get("limit") {
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit {l:?} is not a number")))?,
        None => 0,
    };
    let resume = match request.query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => Some(decode_continue(token)?),
        None => None,
    };
    let range = range_of(&request.info)?;
    let store = server.store.clone();
    let table = request.wants_table();
    let resource = request.info.resource;
    let include_object = request.include_object();
    blocking(move || {
        // The revision is read before the scan: a watch from it replays anything the scan raced.
        let (revision, after) = match resume {
            Some((revision, after)) => (revision, Some(after)),
            None => (store.revision(), None),
        };
        // Each item with its parsed form when selectors or a Table needed it.
        let mut items: Vec<(ObjectKey, Versioned, Option<Object>)> = Vec::new();
        let mut next = None;
        for item in store.scan_after(&range, after.as_ref()) {
            let (key, versioned) = item.map_err(|e| ApiError::internal(format!("list: {e}")))?;
            let decoded = if table || !selectors.is_empty() {
                let o = decode_for(resource, &versioned)?;
                if !selectors.matches(&o) {
                    continue;
                }
                Some(o)
            } else {
                None
            };
            if limit > 0 && items.len() == limit {
                next = items
                    .last()
                    .map(|(last, _, _)| encode_continue(revision, last));
                break;
            }
            items.push((key, versioned, decoded));
        }
        let mut list_meta = json!({"resourceVersion": revision.to_string()});
        if let Some(next) = next {
            list_meta["continue"] = json!(next);
        }
        if table {
            let objects = items.into_iter().filter_map(|(_, _, o)| o).collect();
            let t = table::table(resource, objects, list_meta, include_object, true);
            return Ok(bytes_response(
                StatusCode::OK,
                serde_json::to_vec(&t).unwrap_or_default(),
            ));
        }
        // Assemble the list from the stored bytes without re-encoding every item.
        let mut body = Vec::with_capacity(
            64 + items
                .iter()
                .map(|(_, v, _)| v.object.len() + 32)
                .sum::<usize>(),
        );
        body.extend_from_slice(b"{\"kind\":");
        serde_json::to_writer(&mut body, resource.list_kind).expect("string");
        body.extend_from_slice(b",\"apiVersion\":");
        serde_json::to_writer(&mut body, &resource.api_version()).expect("string");
        body.extend_from_slice(b",\"metadata\":");
        serde_json::to_writer(&mut body, &list_meta).expect("map");
        body.extend_from_slice(b",\"items\":[");
        for (i, (_, versioned, _)) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&render(resource, versioned)?);
        }
        body.extend_from_slice(b"]}");
        Ok(bytes_response(StatusCode::OK, body))
    })
    .await
}

/// Commits an API write to the store and returns the written object's last state (the
/// default [`ApiPolicy::commit`]).
///
/// # Errors
/// The store's error as [`ApiError::from_store`] maps it for `request_resource`/`name` (404
/// `NotFound`, 409 `AlreadyExists` or `Conflict`, 400 for a bad key, else 500), and 500 when
/// the write changed nothing.
pub fn commit_to_store(
    store: &Store,
    set: WriteSet,
    request_resource: &str,
    name: &str,
) -> Result<Versioned, ApiError> {
    let changes = store
        .commit(set)
        .map_err(|e| ApiError::from_store(e, request_resource, name))?;
    let change = changes
        .last()
        .ok_or_else(|| ApiError::internal("the write changed nothing"))?;
    Ok(Versioned {
        rv: change.rv,
        revision: change.revision,
        object: change.object.clone(),
    })
}

fn check_namespace_exists(store: &Store, namespace: &str) -> Result<(), ApiError> {
    let key = ObjectKey::new("namespaces", "", namespace)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let found = store
        .get(&key)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    match found {
        Some(_) => Ok(()),
        None => Err(ApiError::not_found("namespaces", namespace)),
    }
}

async fn create(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    let resource = request.info.resource;
    if resource.namespaced && request.info.namespace.is_none() {
        return Err(ApiError::method_not_allowed(format!(
            "create {} in a namespace: POST to .../namespaces/{{namespace}}/{}",
            resource.store_kind, resource.plural
        )));
    }
    let mut object = request.body_object()?;
    let warnings = field_validation(&request, &object)?;
    object::prepare_create(resource, request.namespace(), &mut object)?;
    let name = object::name(&object).to_owned();
    let key = ObjectKey::new(resource.store_kind, request.namespace(), &name)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let store = server.store.clone();
    let policy = server.policy.clone();
    let dry_run = request.dry_run();
    let namespace = request.namespace().to_owned();
    let versioned = blocking(move || {
        write_new(
            policy.as_ref(),
            &store,
            resource,
            &namespace,
            key,
            object,
            dry_run,
        )
    })
    .await?;
    let response = respond_object(&request, StatusCode::CREATED, &versioned)?;
    Ok(with_warnings(response, &warnings))
}

/// Commits a prepared new object at `key` (its namespace must exist; it must not): what a
/// create and an apply that creates share. A dry run returns the object unwritten.
fn write_new(
    policy: &dyn ApiPolicy,
    store: &Store,
    resource: &Resource,
    namespace: &str,
    key: ObjectKey,
    object: Object,
    dry_run: bool,
) -> Result<Versioned, ApiError> {
    if resource.namespaced {
        check_namespace_exists(store, namespace)?;
    }
    let name = object::name(&object).to_owned();
    let bytes = Bytes::from(object::to_stored(object));
    if dry_run {
        return Ok(Versioned {
            rv: ResourceVersion::ZERO,
            revision: Revision::ZERO,
            object: bytes,
        });
    }
    let mut set = WriteSet::new();
    set.put(key, bytes, Precondition::Absent);
    policy.commit(store, set, resource.store_kind, &name)
}

/// Writes `object` as the new state of `key` if the store still holds `current` (its
/// version); an object being deleted whose finalizers are all gone is removed instead. An
/// update that changes nothing is not written: as kube-apiserver, it keeps the object's
/// resourceVersion and makes no watch event.
fn write_update(
    policy: &dyn ApiPolicy,
    store: &Store,
    request: &ApiRequest,
    key: ObjectKey,
    object: Object,
    current: &Versioned,
) -> Result<Versioned, ApiError> {
    let expected = current.rv;
    let resource = request.info.resource.store_kind;
    let deleting = object::meta(&object).is_some_and(|m| m.contains_key("deletionTimestamp"));
    let finalizers_left = object::meta(&object)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let mut set = WriteSet::new();
    let removed_by_its_owner = super::strategy::of(request.info.resource).removed_by_its_owner();
    if deleting && !finalizers_left && !removed_by_its_owner {
        set.delete(key, Precondition::Version(expected));
    } else {
        let bytes = Bytes::from(object::to_stored(object));
        // Stored bytes are written by `to_stored` too (sorted keys), so equal objects are
        // equal bytes.
        if bytes == current.object {
            return Ok(current.clone());
        }
        if request.dry_run() {
            return Ok(Versioned {
                rv: expected,
                revision: current.revision,
                object: bytes,
            });
        }
        set.put(key, bytes, Precondition::Version(expected));
    }
    policy.commit(store, set, resource, request.name())
}

async fn update(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    let mut object = request.body_object()?;
    let warnings = field_validation(&request, &object)?;
    let body_rv = object::resource_version(&object)?;
    let key = request.key()?;
    let store = server.store.clone();
    let policy = server.policy.clone();
    let (request, versioned) = blocking(move || {
        let current = read(&store, &key, &request)?;
        let expected = body_rv.unwrap_or(current.revision);
        if expected != current.revision {
            return Err(ApiError::conflict(
                request.info.resource.store_kind,
                request.name(),
            ));
        }
        let current_object = object::decode_stored(&current.object, current.revision)?;
        object::prepare_update(
            request.info.resource,
            request.namespace(),
            request.name(),
            &current_object,
            &mut object,
            request.info.status,
        )?;
        request.track_update(&current_object, &mut object);
        let v = write_update(policy.as_ref(), &store, &request, key, object, &current)?;
        Ok((request, v))
    })
    .await?;
    let response = respond_object(&request, StatusCode::OK, &versioned)?;
    Ok(with_warnings(response, &warnings))
}

/// A write that lost its race to another (409 `Conflict` from its version precondition) as
/// `Ok(None)`, for [`guaranteed_update`] to try again.
fn raced<T>(written: Result<T, ApiError>) -> Result<Option<T>, ApiError> {
    match written {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code == 409 && e.reason == super::StatusReason::Conflict => Ok(None),
        Err(e) => Err(e),
    }
}

async fn patch(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    let kind = PatchKind::from_content_type(request.content_type())?;
    if kind == PatchKind::Apply {
        return server_side_apply(server, request).await;
    }
    // As kube-apiserver for custom resources: no Go types, so no patch strategy to merge lists
    // by; a plain merge would silently replace them.
    if kind == PatchKind::StrategicMerge && !request.info.resource.builtin {
        return Err(ApiError::unsupported_media_type(
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/apply-patch+yaml",
        ));
    }
    let key = request.key()?;
    let store = server.store.clone();
    let policy = server.policy.clone();
    let (request, versioned, warnings) = blocking(move || {
        let (versioned, warnings) = guaranteed_update(
            || {
                let current = read(&store, &key, &request)?;
                let current_object = object::decode_stored(&current.object, current.revision)?;
                let mut patched = Value::Object(current_object.clone());
                patch::apply(kind, &mut patched, &request.body)?;
                let Value::Object(mut patched) = patched else {
                    return Err(ApiError::bad_request("the patch did not leave an object"));
                };
                let warnings = field_validation(&request, &patched)?;
                // A resourceVersion in the patch is a precondition.
                if let Some(rv) = object::resource_version(&patched)? {
                    if rv != current.revision {
                        return Err(ApiError::conflict(
                            request.info.resource.store_kind,
                            request.name(),
                        ));
                    }
                }
                object::prepare_update(
                    request.info.resource,
                    request.namespace(),
                    request.name(),
                    &current_object,
                    &mut patched,
                    request.info.status,
                )?;
                request.track_update(&current_object, &mut patched);
                let written = write_update(
                    policy.as_ref(),
                    &store,
                    &request,
                    key.clone(),
                    patched,
                    &current,
                );
                Ok(raced(written)?.map(|v| (v, warnings)))
            },
            || ApiError::conflict(request.info.resource.store_kind, request.name()),
        )?;
        Ok((request, versioned, warnings))
    })
    .await?;
    let response = respond_object(&request, StatusCode::OK, &versioned)?;
    Ok(with_warnings(response, &warnings))
}

/// Server-side apply: `PATCH` with `application/apply-patch+yaml` ([`apply`]). Creates the
/// object when it does not exist (201), else merges the configuration (200).
///
/// # Errors
/// 400 without `fieldManager` or for a body that is not a JSON object; 409 `Conflict` with
/// `FieldManagerConflict` causes (kubectl prints them with how to resolve); the create and
/// update errors otherwise (422 for an invalid result).
async fn server_side_apply(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    let Some(manager) = request
        .query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .cloned()
    else {
        return Err(ApiError::invalid(
            "PatchOptions.meta.k8s.io",
            "",
            vec![super::status::Cause::new(
                "fieldManager",
                "Required value: is required for apply patch",
            )],
        ));
    };
    let force = request.query.get("force").is_some_and(|f| f == "true");
    let mut applied = object::parse_object(&request.body).map_err(|e| {
        ApiError::bad_request(format!(
            "the apply configuration must be a JSON object (YAML is not parsed here): {}",
            e.message
        ))
    })?;
    let warnings = field_validation(&request, &applied)?;
    let key = request.key()?;
    let store = server.store.clone();
    let policy = server.policy.clone();
    let (request, code, versioned) = blocking(move || {
        let resource = request.info.resource;
        let (code, versioned) = guaranteed_update(
            || {
                let current = store
                    .get(&key)
                    .map_err(|e| ApiError::from_store(e, resource.store_kind, request.name()))?;
                let Some(current) = current else {
                    object::meta_mut(&mut applied)
                        .entry("name")
                        .or_insert_with(|| json!(request.name()));
                    let mut created = apply::apply(resource, None, &applied, &manager, force)?;
                    object::prepare_create(resource, request.namespace(), &mut created)?;
                    let written = write_new(
                        policy.as_ref(),
                        &store,
                        resource,
                        request.namespace(),
                        key.clone(),
                        created,
                        request.dry_run(),
                    );
                    // Created meanwhile (409 AlreadyExists): apply to it.
                    return match written {
                        Ok(v) => Ok(Some((StatusCode::CREATED, v))),
                        Err(e) if e.code == 409 => Ok(None),
                        Err(e) => Err(e),
                    };
                };
                let current_object = object::decode_stored(&current.object, current.revision)?;
                let mut merged =
                    apply::apply(resource, Some(&current_object), &applied, &manager, force)?;
                object::prepare_update(
                    resource,
                    request.namespace(),
                    request.name(),
                    &current_object,
                    &mut merged,
                    false,
                )?;
                let written = write_update(
                    policy.as_ref(),
                    &store,
                    &request,
                    key.clone(),
                    merged,
                    &current,
                );
                Ok(raced(written)?.map(|v| (StatusCode::OK, v)))
            },
            || ApiError::conflict(resource.store_kind, request.name()),
        )?;
        Ok((request, code, versioned))
    })
    .await?;
    let response = respond_object(&request, code, &versioned)?;
    Ok(with_warnings(response, &warnings))
}

/// The `/scale` subresource: GET answers the workload's `autoscaling/v1` `Scale`; PUT and PATCH
/// (any patch type, applied to the `Scale`) set `spec.replicas` and answer the new `Scale`. A
/// `metadata.resourceVersion` in the written `Scale` is a precondition (409 when stale).
pub(crate) async fn serve_scale(
    server: &ApiServer,
    request: ApiRequest,
) -> Result<Response, ApiError> {
    use super::workloads::{replicas_of_scale, to_scale};
    let patch_kind = match request.verb {
        Verb::Get | Verb::Update => None,
        Verb::Patch => Some(PatchKind::from_content_type(request.content_type())?),
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "{} is not supported on the scale subresource",
                request.verb.as_str()
            )))
        }
    };
    let key = request.key()?;
    let store = server.store.clone();
    let policy = server.policy.clone();
    let scale = blocking(move || {
        let resource = request.info.resource;
        guaranteed_update(
            || {
                let current = read(&store, &key, &request)?;
                let current_object = object::decode_stored(&current.object, current.revision)?;
                if request.verb == Verb::Get {
                    return Ok(Some(to_scale(resource, &current_object)));
                }
                let written = match patch_kind {
                    Some(kind) => {
                        let mut scale = to_scale(resource, &current_object);
                        patch::apply(kind, &mut scale, &request.body)?;
                        scale
                    }
                    None => serde_json::from_slice::<Value>(&request.body)
                        .map_err(|e| ApiError::bad_request(format!("Scale: {e}")))?,
                };
                let replicas = replicas_of_scale(resource.kind, request.name(), &written)?;
                let precondition = written
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .filter(|rv| !rv.is_empty());
                if let Some(rv) = precondition {
                    if rv.parse::<Revision>().ok() != Some(current.revision) {
                        return Err(ApiError::conflict(resource.store_kind, request.name()));
                    }
                }
                let mut updated = current_object.clone();
                match resource.custom.and_then(|c| c.scale.as_ref()) {
                    Some(paths) => {
                        let mut value = Value::Object(updated);
                        super::crd::set_path(&mut value, &paths.spec_replicas, json!(replicas));
                        let Value::Object(map) = value else {
                            return Err(ApiError::internal("the object is not a map"));
                        };
                        updated = map;
                    }
                    None => {
                        if let Some(spec) = updated.get_mut("spec").and_then(Value::as_object_mut) {
                            spec.insert("replicas".into(), json!(replicas));
                        }
                    }
                }
                object::prepare_update(
                    resource,
                    request.namespace(),
                    request.name(),
                    &current_object,
                    &mut updated,
                    false,
                )?;
                let written = write_update(
                    policy.as_ref(),
                    &store,
                    &request,
                    key.clone(),
                    updated,
                    &current,
                );
                // With the client's resourceVersion as precondition, a conflict is the answer.
                let written = match precondition {
                    Some(_) => written.map(Some),
                    None => raced(written),
                };
                match written? {
                    Some(v) => {
                        let object = object::decode_stored(&v.object, v.revision)?;
                        Ok(Some(to_scale(resource, &object)))
                    }
                    None => Ok(None),
                }
            },
            || ApiError::conflict(resource.store_kind, request.name()),
        )
    })
    .await?;
    Ok(bytes_response(
        StatusCode::OK,
        serde_json::to_vec(&scale).unwrap_or_default(),
    ))
}

/// The finalizer the API adds for `propagationPolicy: Orphan`: the garbage collector removes
/// the object's dependents' ownerReferences to it, then the finalizer.
pub const ORPHAN_FINALIZER: &str = "orphan";
/// The finalizer the API adds for `propagationPolicy: Foreground`: the garbage collector deletes
/// the dependents first, then removes the finalizer.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

async fn delete(server: &ApiServer, request: ApiRequest) -> Result<Response, ApiError> {
    // kubectl drain sends its DeleteOptions as protobuf.
    let options: Value = if request.body.is_empty() {
        json!({})
    } else {
        request
            .body_object()
            .map(Value::Object)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions: {}", e.message)))?
    };
    let grace: Option<i64> = request
        .query
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse().ok())
        .or_else(|| options.get("gracePeriodSeconds").and_then(Value::as_i64));
    let precondition_rv = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
        .map(|rv| {
            rv.parse::<Revision>()
                .map_err(|_| ApiError::bad_request("preconditions.resourceVersion is not valid"))
        })
        .transpose()?;
    // Where the dependents go (Kubernetes' DeleteOptions.propagationPolicy, also a query
    // parameter); the garbage collector acts on the finalizers added for Orphan and Foreground.
    let propagation = request
        .query
        .get("propagationPolicy")
        .cloned()
        .or_else(|| {
            options
                .get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .or_else(|| {
            (options.get("orphanDependents").and_then(Value::as_bool) == Some(true))
                .then(|| "Orphan".to_owned())
        });
    let propagation_finalizer = match propagation.as_deref() {
        None | Some("Background") => None,
        Some("Orphan") => Some(ORPHAN_FINALIZER),
        Some("Foreground") => Some(FOREGROUND_FINALIZER),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "propagationPolicy {other:?} is not one of Orphan, Foreground, Background"
            )))
        }
    };
    let precondition_uid = options
        .pointer("/preconditions/uid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let resource = request.info.resource;
    let strategy = super::strategy::of(resource);
    strategy.check_delete(request.name())?;
    let key = request.key()?;
    let store = server.store.clone();
    let policy = server.policy.clone();
    let registry = server.registry.clone();
    let (request, versioned) = blocking(move || {
        let current = read(&store, &key, &request)?;
        let mut object = object::decode_stored(&current.object, current.revision)?;
        if precondition_rv.is_some_and(|rv| rv != current.revision)
            || precondition_uid
                .as_deref()
                .is_some_and(|uid| object::meta_str(&object, "uid") != Some(uid))
        {
            return Err(ApiError::conflict(resource.store_kind, request.name()));
        }
        if let Some(finalizer) = propagation_finalizer {
            let list = object::meta_mut(&mut object)
                .entry("finalizers")
                .or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut() {
                if !list.iter().any(|f| f == finalizer) {
                    list.push(json!(finalizer));
                }
            }
        }
        let finalizers = object::meta(&object)
            .and_then(|m| m.get("finalizers"))
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let graceful = grace != Some(0) && policy.graceful_delete(resource, &object);
        if finalizers || graceful {
            if object::meta(&object).is_some_and(|m| m.contains_key("deletionTimestamp")) {
                return Ok((request, current));
            }
            let metadata = object::meta_mut(&mut object);
            metadata.insert("deletionTimestamp".into(), json!(object::now_rfc3339()));
            let seconds = grace.unwrap_or_else(|| {
                object
                    .get("spec")
                    .and_then(|s| s.get("terminationGracePeriodSeconds"))
                    .and_then(Value::as_i64)
                    .unwrap_or(30)
            });
            object::meta_mut(&mut object)
                .insert("deletionGracePeriodSeconds".into(), json!(seconds));
            let mut set = WriteSet::new();
            set.put(
                key,
                Bytes::from(object::to_stored(object)),
                Precondition::Version(current.rv),
            );
            if request.dry_run() {
                return Ok((request, current));
            }
            let v = policy.commit(&store, set, resource.store_kind, request.name())?;
            return Ok((request, v));
        }
        if request.dry_run() {
            return Ok((request, current));
        }
        let mut set = WriteSet::new();
        // What goes with it in the same commit (a Namespace's contents, a CRD's objects).
        let cascade = strategy.cascade(request.name(), &registry.all())?;
        for range in cascade {
            for item in store.scan(&range) {
                let (k, _) = item.map_err(|e| ApiError::internal(e.to_string()))?;
                set.delete(k, Precondition::None);
            }
        }
        set.delete(key, Precondition::Version(current.rv));
        let v = policy.commit(&store, set, resource.store_kind, request.name())?;
        Ok((request, v))
    })
    .await?;
    respond_object(&request, StatusCode::OK, &versioned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let key = ObjectKey::parse("pods/default/web-1").unwrap();
        let token = encode_continue(Revision(42), &key);
        assert_eq!(decode_continue(&token).unwrap(), (Revision(42), key));
        assert!(decode_continue("zz").is_err());
        assert!(decode_continue("abc").is_err());
    }
}
