//! EdgeController (KubeEdge's name for it): what each edge node should hold, and what a node's
//! reports may write.
//!
//! - **Downstream**: each committed change of the cluster state goes through the routing
//!   index ([`crate::routing`], KubeEdge's LocationCache) and comes out as [`FeedOp`]s, one per
//!   node whose desired set it changes. CloudHub applies them to the nodes' feeds.
//! - **Upstream**: a node's report (a pod's status, its Node, a device's twins) is judged
//!   against the current object under node authorization ([`crate::authz`]) into the writes
//!   to commit ([`Judged`]).
//! - **Reads forwarded by a node**: allowed if routed to it, or subscribed to (an *interest*:
//!   routed from then on, and persisted).
//!
//! Sans-IO: it reads the store (as raft-rs reads its `Storage`) but never writes it or
//! touches a clock; writes come back to the caller as [`WriteSet`]s. A store read error is
//! never taken for absence: the holding change is kept for [`EdgeController::retry_reads`], counted in
//! `kedge_store_read_errors`, and logged.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::api::resources::CRD_STORE_KIND;
use replication::api::{ApiError, Resource};
use replication::sync::{persist, Report, ReportRecord};
use replication::{
    Change, ChangeKind, KeyRange, ObjectKey, Precondition, ResourceVersion, Revision, SharedChange,
    Store, StoreError, WriteSet,
};

use crate::authz::{self, Decision, Read};
use crate::metrics::Metrics;
use crate::routing::{Action, Holding, HoldingChange, RoutingIndex, SERVICE_KINDS};

/// A change to one node's desired set, for CloudHub to apply to the node's feed.
#[derive(Debug, Clone)]
pub enum FeedOp {
    /// `node` should hold `change`'s object at its version.
    Set {
        node: Arc<str>,
        change: SharedChange,
    },
    /// As `Set`, but the object is exactly what the node itself reported on top of version
    /// `base`: it needs only the new version, not the bytes.
    Echo {
        node: Arc<str>,
        change: SharedChange,
        base: ResourceVersion,
    },
    /// `node` should no longer hold `key` (deleted, or no longer routed to it, at `rv`).
    Unset {
        node: Arc<str>,
        key: ObjectKey,
        rv: ResourceVersion,
    },
    /// `node` should no longer hold what it was sent of `range` (the Services of a namespace
    /// it no longer runs pods in), except what it asked for itself. Decided by what the node
    /// was given, not by what the store holds now: the store may be ahead of the change
    /// being routed (an object deleted since is otherwise never dropped from the node).
    UnsetRange { node: Arc<str>, range: KeyRange },
}

/// A report the hub wrote, whose watch event goes back to its node as a version bump only.
struct Echo {
    node: Arc<str>,
    base: ResourceVersion,
    rv: ResourceVersion,
}

/// A report judged against the current object.
#[derive(Debug, Clone)]
pub struct Judged {
    /// Its writes, including the report's record (committed alone if its batch fails).
    pub set: WriteSet,
    /// It writes or deletes the object (one change), rather than only being recorded.
    pub changes_object: bool,
    /// The report's bytes are exactly what is written (the node needs only the new version).
    pub echo: bool,
}

/// The EdgeController core. See the module docs.
pub struct EdgeController {
    routing: RoutingIndex,
    echoes: HashMap<ObjectKey, Echo>,
    /// Routes whose object could not be read; retried by [`EdgeController::retry_reads`].
    unread: Vec<HoldingChange>,
    ops: VecDeque<FeedOp>,
    metrics: Arc<Metrics>,
    /// Copy accepted DeviceStatus reports into their Device's `status` too
    /// (`cloudcore --device-status-in-device`, for clients that read it there).
    device_status_in_device: bool,
}

fn parse(bytes: &[u8]) -> Option<Object> {
    serde_json::from_slice(bytes).ok()
}

impl EdgeController {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        EdgeController {
            routing: RoutingIndex::new(),
            echoes: HashMap::new(),
            unread: Vec::new(),
            ops: VecDeque::new(),
            metrics,
            device_status_in_device: false,
        }
    }

    /// Whether accepted DeviceStatus reports are also copied into the Device's `status` (off
    /// by default; see [`crate::devicecontroller`]).
    pub fn set_device_status_in_device(&mut self, on: bool) {
        self.device_status_in_device = on;
    }

    /// The routing index (which node holds what).
    pub fn routing(&self) -> &RoutingIndex {
        &self.routing
    }

    /// The next change to a node's desired set, in the order they were decided.
    pub fn poll_feed_op(&mut self) -> Option<FeedOp> {
        self.ops.pop_front()
    }

    /// Routes everything in the store and the persisted interests (at start, or after the
    /// watch lost its history). Returns the revision it read at.
    ///
    /// # Errors
    /// A store read error: nothing is half-routed that matters (holding changes are idempotent); the
    /// caller retries the whole bootstrap.
    pub fn bootstrap(&mut self, store: &Store) -> Result<Revision, StoreError> {
        let revision = store.revision();
        for (node, key) in persist::load_interests(store)? {
            self.routing.add_interest(&node, &key);
            if let Some(current) = current(store, &key)? {
                self.want(&node.into(), &current);
            }
        }
        for (node, kind, namespace) in persist::load_collections(store)? {
            self.routing.add_collection(&node, &kind, &namespace);
            let update = HoldingChange {
                node: node.into(),
                holding: Holding::Collection { kind, namespace },
                action: Action::Want,
            };
            self.apply_holding(store, update, None);
        }
        for kind in ["nodes", "pods", "devices"] {
            let Ok(range) = KeyRange::kind(kind) else {
                continue;
            };
            for item in store.scan(&range) {
                let (key, versioned) = item?;
                let change = Arc::new(Change::new(
                    revision,
                    key,
                    versioned.rv,
                    ChangeKind::Added,
                    versioned.object,
                ));
                self.on_change(store, &change);
            }
        }
        Ok(revision)
    }

    /// One committed change of the cluster state.
    pub fn on_change(&mut self, store: &Store, change: &SharedChange) {
        let object = if change.is_delete() {
            None
        } else {
            parse(&change.object)
        };
        if !change.is_delete() && object.is_none() {
            tracing::warn!(key = %change.key, "unparseable object not routed");
            return;
        }
        for update in self.routing.observe(&change.key, object.as_ref()) {
            self.apply_holding(store, update, Some(change));
        }
        if let Some(echo) = self.echoes.get(&change.key) {
            if change.rv >= echo.rv {
                self.echoes.remove(&change.key);
            }
        }
    }

    /// Reads again what earlier reads failed to (call on a timer). Returns how many holding changes
    /// are still unread.
    pub fn retry_reads(&mut self, store: &Store) -> usize {
        for update in std::mem::take(&mut self.unread) {
            self.apply_holding(store, update, None);
        }
        self.unread.len()
    }

    fn read_failed(&mut self, update: HoldingChange, what: &str, error: &StoreError) {
        self.metrics.store_read_errors.inc();
        tracing::warn!(node = %update.node, what, %error, "store read failed; the holding is retried");
        self.unread.push(update);
    }

    fn want(&mut self, node: &Arc<str>, change: &SharedChange) {
        let echo = self
            .echoes
            .get(&change.key)
            .filter(|e| &e.node == node && e.rv == change.rv)
            .map(|e| e.base);
        self.ops.push_back(match echo {
            Some(base) => FeedOp::Echo {
                node: node.clone(),
                change: change.clone(),
                base,
            },
            None => FeedOp::Set {
                node: node.clone(),
                change: change.clone(),
            },
        });
    }

    fn unset(&mut self, node: &Arc<str>, key: &ObjectKey, rv: ResourceVersion) {
        self.ops.push_back(FeedOp::Unset {
            node: node.clone(),
            key: key.clone(),
            rv,
        });
    }

    /// Turns one holding change into feed ops. `change` is the change that caused it (`None` on a
    /// retry: the object is read as it is now).
    fn apply_holding(
        &mut self,
        store: &Store,
        update: HoldingChange,
        change: Option<&SharedChange>,
    ) {
        let node = update.node.clone();
        match (&update.holding, update.action) {
            (Holding::Object(key), Action::Want) => match change.filter(|c| c.key == *key) {
                Some(change) if change.is_delete() => {}
                Some(change) => self.want(&node, change),
                None => match current(store, key) {
                    Ok(Some(current)) => self.want(&node, &current),
                    Ok(None) => {}
                    Err(e) => self.read_failed(update.clone(), key.as_str(), &e),
                },
            },
            // The object's own change (its deletion, or a pod moving away): dropped, even
            // from a node that asked for it.
            (Holding::Object(key), Action::Drop) if change.is_some_and(|c| c.key == *key) => {
                let rv = change.map_or(ResourceVersion::ZERO, |c| c.rv);
                self.unset(&node, key, rv);
            }
            // A node that asked for the object keeps it when its last pod stops referencing it.
            (Holding::Object(key), Action::Drop) if self.routing.is_interested(&node, key) => {}
            (Holding::Object(key), Action::Drop) => {
                // Dropped because a referencing pod went: the tombstone carries the object's
                // current version (the change's if it is gone).
                let rv = match store.get(key) {
                    Ok(Some(v)) => v.rv,
                    // (The cloud's store assigns versions: its revision is a version.)
                    Ok(None) => change.map_or_else(|| store.revision().into(), |c| c.rv),
                    Err(e) => return self.read_failed(update.clone(), key.as_str(), &e),
                };
                self.unset(&node, key, rv);
            }
            (Holding::Collection { .. }, Action::Drop) => {}
            (Holding::Collection { kind, namespace }, Action::Want) => {
                let range = if namespace.is_empty() {
                    KeyRange::kind(kind)
                } else {
                    KeyRange::namespace(kind, namespace)
                };
                let Ok(range) = range else {
                    return;
                };
                let mut items = Vec::new();
                for item in store.scan(&range) {
                    match item {
                        Ok(item) => items.push(item),
                        Err(e) => {
                            let what = format!("{kind} of namespace {namespace:?}");
                            return self.read_failed(update.clone(), &what, &e);
                        }
                    }
                }
                let revision = store.revision();
                for (key, v) in items {
                    let c = Arc::new(Change::new(
                        revision,
                        key,
                        v.rv,
                        ChangeKind::Modified,
                        v.object,
                    ));
                    self.want(&node, &c);
                }
            }
            (Holding::NamespaceServices(ns), Action::Drop) => {
                for kind in SERVICE_KINDS {
                    if let Ok(range) = KeyRange::namespace(kind, ns) {
                        self.ops.push_back(FeedOp::UnsetRange {
                            node: node.clone(),
                            range,
                        });
                    }
                }
            }
            (Holding::NamespaceServices(ns), Action::Want) => {
                let mut items = Vec::new();
                for kind in SERVICE_KINDS {
                    let Ok(range) = KeyRange::namespace(kind, ns) else {
                        continue;
                    };
                    for item in store.scan(&range) {
                        match item {
                            Ok(item) => items.push(item),
                            Err(e) => {
                                let what = format!("{kind} of namespace {ns}");
                                return self.read_failed(update.clone(), &what, &e);
                            }
                        }
                    }
                }
                let revision = change.map_or_else(|| store.revision(), |c| c.revision);
                for (key, v) in items {
                    let c = Arc::new(Change::new(
                        revision,
                        key,
                        v.rv,
                        ChangeKind::Modified,
                        v.object,
                    ));
                    self.want(&node, &c);
                }
            }
        }
    }

    /// Decides a get forwarded by `node`'s MetaServer. An object the node may read but does
    /// not hold is subscribed: routed to the node from now on; the returned writes persist
    /// that interest (the caller commits them).
    ///
    /// # Errors
    /// 403 Forbidden with node authorization's reason, if the node may not read it.
    pub fn authorize_read(
        &mut self,
        store: &Store,
        node: &Arc<str>,
        key: &ObjectKey,
    ) -> Result<Option<WriteSet>, ApiError> {
        let routed = self.routing.holds(node, key);
        match authz::authorize_read(node, key, routed) {
            Ok(Read::Routed) => Ok(None),
            Ok(Read::Subscribe) => {
                if !self.routing.add_interest(node, key) {
                    return Ok(None);
                }
                let mut set = WriteSet::new();
                persist::add_interest(&mut set, node, key);
                let update = HoldingChange {
                    node: node.clone(),
                    holding: Holding::Object(key.clone()),
                    action: Action::Want,
                };
                self.apply_holding(store, update, None);
                Ok(Some(set))
            }
            Err(refusal) => {
                tracing::warn!(%node, %key, reason = %refusal.reason, "node read refused");
                Err(ApiError::forbidden(refusal.to_string()))
            }
        }
    }

    /// Decides a list (or watch) of `resource` in `namespace` (`None`: all namespaces)
    /// forwarded by `node`'s MetaServer: allowed under [`authz::authorize_collection`], the
    /// collection is subscribed (every object of it routed to the node from now on) and, for a
    /// custom resource, its CustomResourceDefinition too (the node's API serves the kind from
    /// it). The returned writes persist the subscription (the caller commits them).
    ///
    /// # Errors
    /// 403 Forbidden with how to grant the read; 500 when the grants cannot be read.
    pub fn authorize_list(
        &mut self,
        store: &Store,
        node: &Arc<str>,
        resource: &Resource,
        namespace: Option<&str>,
    ) -> Result<Option<WriteSet>, ApiError> {
        let kind = resource.store_kind;
        let namespace = namespace
            .filter(|_| resource.namespaced)
            .unwrap_or_default();
        if self.routing.covers(node, kind, namespace) {
            return Ok(None);
        }
        let read = |kind: &str| -> Result<Vec<Object>, ApiError> {
            let range = KeyRange::kind(kind).map_err(|e| ApiError::internal(e.to_string()))?;
            let mut out = Vec::new();
            for item in store.scan(&range) {
                let (_, v) = item.map_err(|e| ApiError::internal(e.to_string()))?;
                out.extend(parse(&v.object));
            }
            Ok(out)
        };
        let bindings = read("clusterrolebindings")?;
        let roles = read("clusterroles")?;
        let role = |name: &str| roles.iter().find(|r| object::name(r) == name).cloned();
        if let Err(refusal) = authz::authorize_collection(
            node,
            resource.group,
            resource.plural,
            kind,
            &bindings,
            role,
        ) {
            tracing::warn!(%node, kind, namespace, reason = %refusal.reason, "node list refused");
            return Err(ApiError::forbidden(refusal.to_string()));
        }
        let mut set = WriteSet::new();
        if let Some(custom) = resource.custom {
            let crd = ObjectKey::new(CRD_STORE_KIND, "", &custom.crd_name)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            if self.routing.add_interest(node, &crd) {
                persist::add_interest(&mut set, node, &crd);
                let update = HoldingChange {
                    node: node.clone(),
                    holding: Holding::Object(crd),
                    action: Action::Want,
                };
                self.apply_holding(store, update, None);
            }
        }
        self.routing.add_collection(node, kind, namespace);
        persist::add_collection(&mut set, node, kind, namespace);
        tracing::info!(%node, kind, namespace, "node subscribed to a collection");
        let update = HoldingChange {
            node: node.clone(),
            holding: Holding::Collection {
                kind: kind.to_owned(),
                namespace: namespace.to_owned(),
            },
            action: Action::Want,
        };
        self.apply_holding(store, update, None);
        Ok(Some(set))
    }

    /// What applying `report` from `node` to the current object means: the writes (with the
    /// report's `record`, so the node stops resending it), whether the object changes, and
    /// whether the node already holds the result.
    ///
    /// # Errors
    /// A store read error: the report is not judged (the caller keeps it and tries again).
    pub fn judge_report(
        &self,
        store: &Store,
        node: &Arc<str>,
        report: &Report,
        record: ReportRecord,
    ) -> Result<Judged, StoreError> {
        let current = store.get(&report.key).inspect_err(|_| {
            self.metrics.store_read_errors.inc();
        })?;
        let current_object = current.as_ref().and_then(|v| parse(&v.object));
        let proposed = match &report.patch {
            // A patch of the part the node owns, on top of the cloud's current object.
            Some(patch) => current_object.clone().and_then(|mut object| {
                let part = replication::sync::status_patch::owned_part(report.key.kind())?;
                match replication::sync::status_patch::apply(part, &mut object, patch) {
                    Ok(()) => Some(object),
                    Err(e) => {
                        tracing::warn!(%node, key = %report.key, error = %e, "bad status patch");
                        None
                    }
                }
            }),
            None if report.object.is_empty() => None,
            None => parse(&report.object),
        };
        let mut set = WriteSet::new();
        if report.patch.is_some() && proposed.is_none() {
            // Nothing to apply (the object is gone, or the patch was bad): recorded as done.
            self.metrics.reports_refused.inc();
            persist::add_report_record(&mut set, node, record);
            return Ok(Judged {
                set,
                changes_object: false,
                echo: false,
            });
        }
        let mut echo_bytes = None;
        let mut changes_object = false;
        let decision = if report.key.kind() == "devicestatuses" {
            let device_key =
                ObjectKey::new("devices", report.key.namespace(), report.key.name()).ok();
            let device = match &device_key {
                Some(device_key) => store.get(device_key).inspect_err(|_| {
                    self.metrics.store_read_errors.inc();
                })?,
                None => None,
            };
            let device_object = device.as_ref().and_then(|v| parse(&v.object));
            let decision = authz::authorize_device_status(
                node,
                &report.key,
                device_object.as_ref(),
                current_object.as_ref(),
                proposed.as_ref(),
            );
            // Older clients read the Device's status: copied there too, in the same commit.
            if let (
                Ok(Decision::Status(s) | Decision::Write(s)),
                Some(key),
                Some(device),
                Some(object),
            ) = (&decision, device_key, &device, device_object)
            {
                if self.device_status_in_device {
                    let copied = object::with_status_of(&object, s);
                    let bytes = Bytes::from(object::to_stored(copied));
                    if bytes != device.object {
                        set.put(key, bytes, Precondition::Version(device.rv));
                    }
                }
            }
            decision
        } else {
            authz::authorize(
                node,
                &report.key,
                current_object.as_ref(),
                proposed.as_ref(),
            )
        };
        match decision {
            Ok(Decision::Write(object)) | Ok(Decision::Status(object)) => {
                let bytes = Bytes::from(object::to_stored(object));
                // A report that changes nothing is recorded, not written: no new version, no
                // MODIFIED event without a change (as kube-apiserver skips no-op updates).
                if current.as_ref().is_none_or(|c| c.object != bytes) {
                    let expect = current
                        .as_ref()
                        .map_or(Precondition::Absent, |c| Precondition::Version(c.rv));
                    echo_bytes = Some(bytes.clone());
                    changes_object = true;
                    set.put(report.key.clone(), bytes, expect);
                }
            }
            Ok(Decision::ConfirmDelete) => {
                let expect = current
                    .as_ref()
                    .map_or(Precondition::Exists, |c| Precondition::Version(c.rv));
                changes_object = true;
                set.delete(report.key.clone(), expect);
            }
            Err(refusal) => {
                tracing::warn!(%node, key = %report.key, reason = %refusal.reason, "node write refused");
                self.metrics.reports_refused.inc();
            }
        }
        persist::add_report_record(&mut set, node, record);
        // The node already holds what is written (it needs only the new version): the same
        // bytes for a whole report; for a status patch on the version it was made against,
        // the same status on the same object.
        let echo = match &report.patch {
            Some(_) => {
                echo_bytes.is_some() && current.as_ref().is_some_and(|c| c.rv == report.base)
            }
            None => echo_bytes.as_ref().is_some_and(|b| *b == report.object),
        };
        Ok(Judged {
            set,
            changes_object,
            echo,
        })
    }

    /// A judged report was committed as version `rv` of its object (`None`: only recorded,
    /// or deleted). If the node already holds those bytes, the change's watch event will go
    /// back to it as a version bump only.
    pub fn report_committed(
        &mut self,
        node: &Arc<str>,
        report: &Report,
        echo: bool,
        rv: ResourceVersion,
    ) {
        self.metrics.reports_applied.inc();
        if echo {
            self.echoes.insert(
                report.key.clone(),
                Echo {
                    node: node.clone(),
                    base: report.base,
                    rv,
                },
            );
        }
    }
}

/// The object at `key` as it is now, as a change at the store's revision.
fn current(store: &Store, key: &ObjectKey) -> Result<Option<SharedChange>, StoreError> {
    Ok(store.get(key)?.map(|v| {
        Arc::new(Change::new(
            store.revision(),
            key.clone(),
            v.rv,
            ChangeKind::Modified,
            v.object,
        ))
    }))
}
