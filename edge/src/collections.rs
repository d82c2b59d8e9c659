//! MetaServer's collection subscriptions: a list (or watch) of a kind in a namespace that the
//! node does not hold yet is forwarded to the cloud once, as a list. The cloud authorizes it,
//! subscribes the node to that collection (every object of it routed here from then on, and a
//! custom resource's CustomResourceDefinition with it) and answers the list; MetaServer waits
//! until its cache holds every listed object at least at the listed version, records the
//! subscription (in the cache, so it survives restarts) and serves the request from the cache,
//! online or offline, from then on.
//!
//! Kinds the node holds by construction are never subscribed: its pods, its Node, its Lease,
//! Events, and its Devices with their DeviceModels (the MetaServer's answers for those are what
//! the node has, as KubeEdge's MetaServer answers them). Label and field selectors do not narrow a subscription: they are applied by
//! the cache's API, so one subscription serves every selector.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::Method;
use replication::api::remote::ApiCall;
use replication::api::{resources, ApiError};
use replication::{Aux, ObjectKey, ResourceVersion, Store, WriteSet};
use serde_json::Value;

/// A collection a request names: `/api/v1[/namespaces/{ns}]/{plural}` or
/// `/apis/{group}/{version}[/namespaces/{ns}]/{plural}` (the `/watch/` prefix included).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Collection {
    /// API group; empty for the core group.
    pub group: String,
    /// The version it was asked at.
    pub version: String,
    /// The resource (`configmaps`, `widgets`).
    pub plural: String,
    /// The namespace; empty for all namespaces or a cluster-scoped resource.
    pub namespace: String,
}

impl Collection {
    /// The collection a `GET` of `path` lists or watches; `None` for anything else (one object,
    /// a subresource, discovery).
    pub fn of(method: &Method, path: &str) -> Option<Collection> {
        if method != Method::GET {
            return None;
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest): (&str, &str, &[&str]) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let rest = match rest {
            ["watch", rest @ ..] => rest,
            rest => rest,
        };
        let (namespace, plural) = match rest {
            ["namespaces", ns, plural] => (*ns, *plural),
            // `/api/v1/namespaces` lists namespaces, not a namespace's objects.
            [plural] => ("", *plural),
            _ => return None,
        };
        Some(Collection {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            namespace: namespace.to_owned(),
        })
    }

    /// Whether the node holds this kind by construction (no subscription needed or allowed).
    pub fn is_local(&self) -> bool {
        matches!(
            (self.group.as_str(), self.plural.as_str()),
            ("", "pods" | "nodes" | "events")
                | ("coordination.k8s.io", "leases")
                | (
                    "devices.kubeedge.io",
                    "devices" | "devicemodels" | "devicestatuses"
                )
                | ("events.k8s.io", "events")
                | ("metrics.k8s.io", _)
        )
    }

    /// The path of the list that subscribes it.
    fn list_path(&self) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        if self.namespace.is_empty() {
            format!("{base}/{}", self.plural)
        } else {
            format!("{base}/namespaces/{}/{}", self.namespace, self.plural)
        }
    }

    /// The kind part of the cache's keys for its objects (the CRD's name for a custom kind).
    fn store_kind(&self) -> String {
        match resources::find(&self.group, &self.version, &self.plural) {
            Some(r) => r.store_kind.to_owned(),
            None => format!("{}.{}", self.plural, self.group),
        }
    }

    fn record_key(&self) -> Vec<u8> {
        let mut key = b"collection\0".to_vec();
        for part in [&self.group, &self.plural, &self.namespace] {
            key.extend_from_slice(part.as_bytes());
            key.push(0);
        }
        key
    }
}

/// A `GET` of `path` (a list) as a call to forward to the cloud.
async fn list_call(path: String) -> Result<ApiCall, ApiError> {
    let request = axum::http::Request::get(path)
        .header(axum::http::header::ACCEPT, "application/json")
        .body(axum::body::Body::empty())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    ApiCall::from_request(request).await
}

/// How long a subscription waits for the cloud's objects to reach the cache.
const CATCH_UP: Duration = Duration::from_secs(10);

/// The collections this node subscribed to (see the module docs).
pub struct Collections {
    /// (group, plural, namespace) of each subscription (an empty namespace covers all), with
    /// the version it was listed at.
    held: Mutex<HashMap<(String, String, String), String>>,
}

impl Collections {
    /// The subscriptions recorded in `store`.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn load(store: &Store) -> Result<Self, replication::StoreError> {
        let mut held = HashMap::new();
        for item in store.scan_aux(Aux::META, b"collection\0") {
            let (key, version) = item?;
            let parts: Vec<String> = key[b"collection\0".len()..]
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            if let [group, plural, namespace, _] = parts.as_slice() {
                let version = String::from_utf8_lossy(&version).into_owned();
                held.insert((group.clone(), plural.clone(), namespace.clone()), version);
            }
        }
        Ok(Collections {
            held: Mutex::new(held),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a subscription covers `collection`.
    pub fn covers(&self, collection: &Collection) -> bool {
        let held = self.held();
        let entry = |ns: &str| {
            (
                collection.group.clone(),
                collection.plural.clone(),
                ns.to_owned(),
            )
        };
        held.contains_key(&entry("")) || held.contains_key(&entry(&collection.namespace))
    }

    /// How many collections are subscribed.
    pub fn len(&self) -> usize {
        self.held().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every subscribed collection.
    pub fn all(&self) -> Vec<Collection> {
        self.held()
            .iter()
            .map(|((group, plural, namespace), version)| Collection {
                group: group.clone(),
                version: version.clone(),
                plural: plural.clone(),
                namespace: namespace.clone(),
            })
            .collect()
    }

    /// The call that tells the cloud again that the node holds `collection` (at the start of
    /// each new sync session, in case the cloud lost its records): a list with `limit=1`, so the
    /// answer costs one object, not the collection.
    ///
    /// # Errors
    /// 500 if the request cannot be built.
    pub async fn reassert_call(collection: &Collection) -> Result<ApiCall, ApiError> {
        list_call(format!("{}?limit=1", collection.list_path())).await
    }

    /// Subscribes `collection` through `call` (the cloud call), waits for the cache to catch
    /// up with the cloud's answer, and records it.
    ///
    /// # Errors
    /// The cloud's refusal (403 with how to grant the read, 404 for a kind it does not serve),
    /// the call's failure (503, 504), a 504 when the objects do not arrive within
    /// [`CATCH_UP`], and a 500 when the record cannot be written.
    pub async fn subscribe<F, Fut>(
        &self,
        store: &Arc<Store>,
        collection: &Collection,
        call: F,
    ) -> Result<(), ApiError>
    where
        F: FnOnce(ApiCall) -> Fut,
        Fut: std::future::Future<Output = Result<replication::api::remote::ApiReply, ApiError>>,
    {
        let reply = call(list_call(collection.list_path()).await?).await?;
        let body: Value = serde_json::from_slice(&reply.body).map_err(|e| {
            ApiError::new(
                502,
                replication::api::StatusReason::BadGateway,
                format!("the cloud's list is not JSON: {e}"),
            )
        })?;
        if reply.code != 200 {
            let message = body["message"]
                .as_str()
                .unwrap_or("the cloud refused the list");
            let reason =
                replication::api::StatusReason::parse(body["reason"].as_str().unwrap_or(""));
            return Err(ApiError::new(reply.code, reason, message.to_owned()));
        }
        let kind = collection.store_kind();
        // The cloud's resourceVersions, which this node's store mirrors.
        let mut wanted: Vec<(ObjectKey, ResourceVersion)> = Vec::new();
        for item in body["items"].as_array().into_iter().flatten() {
            let meta = &item["metadata"];
            let name = meta["name"].as_str().unwrap_or_default();
            let namespace = meta["namespace"].as_str().unwrap_or_default();
            let rv = meta["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_default();
            if let Ok(key) = ObjectKey::new(&kind, namespace, name) {
                wanted.push((key, rv));
            }
        }
        if resources::find(&collection.group, &collection.version, &collection.plural).is_none() {
            // A custom kind: its definition comes too, and the cache's API serves it from it.
            if let Ok(key) = ObjectKey::new(resources::CRD_STORE_KIND, "", &kind) {
                wanted.push((key, ResourceVersion::ZERO));
            }
        }
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let missing = wanted
                .iter()
                .find(|(key, rv)| !matches!(store.get(key), Ok(Some(v)) if v.rv >= *rv));
            let Some((key, _)) = missing else { break };
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    504,
                    replication::api::StatusReason::Timeout,
                    format!(
                        "subscribed to {}, but {key} did not reach the node within {CATCH_UP:?}; \
                         retry",
                        collection.list_path()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut set = WriteSet::new();
        set.put_aux(
            Aux::META,
            collection.record_key(),
            collection.version.as_bytes().to_vec(),
        );
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.commit(set))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("recording the subscription: {e}")))?;
        self.held().insert(
            (
                collection.group.clone(),
                collection.plural.clone(),
                collection.namespace.clone(),
            ),
            collection.version.clone(),
        );
        tracing::info!(path = %collection.list_path(), "subscribed to a collection");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_of_paths() {
        let c = Collection::of(&Method::GET, "/api/v1/namespaces/apps/configmaps").unwrap();
        assert_eq!(
            (c.plural.as_str(), c.namespace.as_str()),
            ("configmaps", "apps")
        );
        assert_eq!(c.store_kind(), "configmaps");
        let c = Collection::of(&Method::GET, "/apis/example.com/v1/watch/widgets").unwrap();
        assert_eq!(
            (c.group.as_str(), c.namespace.as_str()),
            ("example.com", "")
        );
        assert_eq!(c.store_kind(), "widgets.example.com");
        assert_eq!(c.list_path(), "/apis/example.com/v1/widgets");
        assert!(Collection::of(&Method::GET, "/api/v1/namespaces/apps/configmaps/x").is_none());
        assert!(Collection::of(&Method::POST, "/api/v1/namespaces/apps/configmaps").is_none());
        assert!(Collection::of(&Method::GET, "/api/v1/pods")
            .unwrap()
            .is_local());
        assert!(!Collection::of(&Method::GET, "/api/v1/namespaces")
            .unwrap()
            .is_local());
    }
}
