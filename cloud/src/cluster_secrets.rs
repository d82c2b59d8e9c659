//! What several cloudcores on one real cluster (`--kubeconfig`) share through it, as KubeEdge's
//! CloudCore keeps its CA in the Secret `kubeedge/casecret` and its token in
//! `kubeedge/tokensecret`:
//!
//! - the cluster CA ([`ClusterPki`]): the Secret `kube-system/kedge-ca`, one data key per PKI
//!   file ([`crate::shared_pki::FILES`]), written with its resourceVersion as precondition;
//! - bootstrap tokens ([`ClusterTokens`]): one Secret `kube-system/kedge-token-<id>` of type
//!   `kedge.io/bootstrap-token` per token, its record (the secret's SHA-256, expiry, one-use,
//!   used) in data key `record`; a one-use token is used up by a write that compares the
//!   Secret's resourceVersion, so of joins racing on several replicas one wins;
//! - each node's list of usable certificates ([`ClusterNodeRecords`]): the Secret
//!   `kube-system/kedge-node-<node>` of type `kedge.io/node-credentials`, the list (as
//!   [`crate::credentials`] keeps it) in data key `certs`. Replicas read it from their mirror of
//!   the cluster's Secrets, so admitting a connection costs no API call; a join or renewal
//!   writes it (last writer wins: a node talks to one replica at a time).
//!
//! The cloudcore's kubeconfig needs `get`, `create` and `update` of Secrets in `kube-system`
//! (KubeEdge's CloudCore role has the same).

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::pki::{TokenError, TokenInfo, TokenRecord};
use crate::shared_pki::{Files, PkiBackend, FILES};

/// The Secrets' namespace.
pub const NAMESPACE: &str = "kube-system";
/// The CA's Secret.
pub const CA_SECRET: &str = "kedge-ca";
/// A token's Secret is this prefix and the token's id.
pub const TOKEN_PREFIX: &str = "kedge-token-";
/// The tokens' Secret type.
pub const TOKEN_TYPE: &str = "kedge.io/bootstrap-token";
/// A node's certificate list's Secret is this prefix and the node's name.
pub const NODE_PREFIX: &str = "kedge-node-";
/// The certificate lists' Secret type.
pub const NODE_TYPE: &str = "kedge.io/node-credentials";

fn secrets(client: &Client) -> Api<Secret> {
    Api::namespaced(client.clone(), NAMESPACE)
}

/// Whether `error` is the API's answer `code`.
fn is(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == code)
}

/// The cluster CA in the Secret `kube-system/kedge-ca`.
pub struct ClusterPki {
    client: Client,
}

impl ClusterPki {
    /// Over `client` (the kubeconfig's).
    pub fn new(client: Client) -> Self {
        ClusterPki { client }
    }
}

impl PkiBackend for ClusterPki {
    /// The Secret's resourceVersion (`None`: no Secret yet).
    type Version = Option<String>;

    fn describe(&self) -> String {
        format!("the cluster's Secret {NAMESPACE}/{CA_SECRET}")
    }

    async fn read(&self) -> anyhow::Result<(Files, Self::Version)> {
        let secret = secrets(&self.client)
            .get_opt(CA_SECRET)
            .await
            .with_context(|| format!("reading {}", self.describe()))?;
        let Some(secret) = secret else {
            return Ok((Files::new(), None));
        };
        let mut files = Files::new();
        for (name, value) in secret.data.into_iter().flatten() {
            if let Some(name) = FILES.iter().find(|f| **f == name) {
                files.insert(*name, value.0);
            }
        }
        Ok((files, secret.metadata.resource_version))
    }

    async fn write(&self, version: Self::Version, files: &Files) -> anyhow::Result<bool> {
        let data: BTreeMap<String, ByteString> = files
            .iter()
            .map(|(name, bytes)| ((*name).to_owned(), ByteString(bytes.clone())))
            .collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(NAMESPACE.into()),
                resource_version: version.clone(),
                labels: Some([("app.kubernetes.io/managed-by".into(), "cloudcore".into())].into()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Secret::default()
        };
        let api = secrets(&self.client);
        let written = match version {
            None => api.create(&PostParams::default(), &secret).await,
            Some(_) => {
                api.replace(CA_SECRET, &PostParams::default(), &secret)
                    .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(e) if is(&e, 409) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("writing {}", self.describe())),
        }
    }
}

/// Bootstrap tokens as Secrets of the cluster (see the module's docs). The join path is
/// synchronous; each call blocks its worker thread (`block_in_place`) for one API round trip.
pub struct ClusterTokens {
    client: Client,
    runtime: tokio::runtime::Handle,
}

fn token_secret_name(id: &str) -> String {
    format!("{TOKEN_PREFIX}{id}")
}

fn record_of(secret: &Secret) -> Option<TokenRecord> {
    let data = secret.data.as_ref()?.get("record")?;
    serde_json::from_slice(&data.0).ok()
}

fn token_secret(id: &str, record: &TokenRecord, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(id)),
            namespace: Some(NAMESPACE.into()),
            resource_version,
            labels: Some([("app.kubernetes.io/managed-by".into(), "cloudcore".into())].into()),
            ..ObjectMeta::default()
        },
        type_: Some(TOKEN_TYPE.into()),
        data: Some(
            [(
                "record".to_owned(),
                ByteString(serde_json::to_vec(record).expect("json")),
            )]
            .into(),
        ),
        ..Secret::default()
    }
}

impl ClusterTokens {
    /// Over `client`; its calls run on the current runtime, which must be multi-threaded
    /// (cloudcore's is): a join blocks its worker with `block_in_place` for one API call.
    pub fn new(client: Client) -> Self {
        ClusterTokens {
            client,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn block<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        block(&self.runtime, work)
    }
}

/// Runs `work` on `runtime` to its end or for 5 s at most, blocking this thread (the join and
/// admission paths are synchronous); `None` on the timeout.
fn block<T>(
    runtime: &tokio::runtime::Handle,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let timed = tokio::time::timeout(std::time::Duration::from_secs(5), work);
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(|| runtime.block_on(timed)),
        Err(_) => runtime.block_on(timed),
    }
    .ok()
}

impl crate::pki::SharedTokens for ClusterTokens {
    /// The Secret's resourceVersion.
    type Version = Option<String>;

    fn read(&self, id: &str) -> Result<(TokenRecord, Option<String>), TokenError> {
        let api = secrets(&self.client);
        let name = token_secret_name(id);
        let secret = self
            .block(api.get_opt(&name))
            .and_then(Result::ok)
            .flatten()
            .ok_or(TokenError::Unknown)?;
        if secret.type_.as_deref() != Some(TOKEN_TYPE) {
            return Err(TokenError::Unknown);
        }
        let record = record_of(&secret).ok_or(TokenError::Unknown)?;
        Ok((record, secret.metadata.resource_version))
    }

    fn write(&self, id: &str, record: &TokenRecord, resource_version: Option<String>) -> bool {
        let api = secrets(&self.client);
        let secret = token_secret(id, record, resource_version);
        let name = token_secret_name(id);
        self.block(api.replace(&name, &PostParams::default(), &secret))
            .is_some_and(|r| r.is_ok())
    }
}

/// Each node's list of usable certificates as a Secret of the cluster (see the module's docs).
/// Reads go to the local mirror ([`ClusterNodeRecords::key`]); writes block their thread for
/// one API call, as [`ClusterTokens`].
pub struct ClusterNodeRecords {
    client: Client,
    runtime: tokio::runtime::Handle,
}

impl ClusterNodeRecords {
    /// Over `client`, on the current (multi-threaded) runtime.
    pub fn new(client: Client) -> Self {
        ClusterNodeRecords {
            client,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Where the local mirror of the cluster keeps `node`'s Secret.
    ///
    /// # Errors
    /// `node` makes no valid Secret name.
    pub fn key(node: &str) -> Result<replication::ObjectKey, String> {
        replication::ObjectKey::new("secrets", NAMESPACE, &format!("{NODE_PREFIX}{node}"))
            .map_err(|e| e.to_string())
    }

    /// The list (data key `certs`) of a Secret as the local mirror holds it (stored JSON);
    /// `None` when it is not one of ours.
    pub fn certs_of(stored: &[u8]) -> Option<Vec<u8>> {
        let secret: Secret = serde_json::from_slice(stored).ok()?;
        if secret.type_.as_deref() != Some(NODE_TYPE) {
            return None;
        }
        Some(secret.data?.remove("certs")?.0)
    }

    /// Writes `certs` as `node`'s list, creating the Secret or replacing it whatever its
    /// version (server-side apply, forced). Returns the Secret as the cluster now holds it,
    /// as JSON without resourceVersion and managedFields (as the mirror would store it).
    ///
    /// # Errors
    /// The cluster refuses the write, or does not answer within 5 s.
    pub fn write(&self, node: &str, certs: Vec<u8>) -> Result<Vec<u8>, String> {
        let api = secrets(&self.client);
        let name = format!("{NODE_PREFIX}{node}");
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(NAMESPACE.into()),
                labels: Some([("app.kubernetes.io/managed-by".into(), "cloudcore".into())].into()),
                ..ObjectMeta::default()
            },
            type_: Some(NODE_TYPE.into()),
            data: Some([("certs".to_owned(), ByteString(certs))].into()),
            ..Secret::default()
        };
        let params = kube::api::PatchParams::apply("cloudcore").force();
        let written = block(
            &self.runtime,
            api.patch(&name, &params, &kube::api::Patch::Apply(&secret)),
        )
        .ok_or_else(|| format!("the cluster did not answer within 5 s writing {name}"))?
        .map_err(|e| format!("cannot write {NAMESPACE}/{name} to the cluster: {e}"))?;
        let mut value = serde_json::to_value(&written).map_err(|e| e.to_string())?;
        if let Some(meta) = value
            .get_mut("metadata")
            .and_then(serde_json::Value::as_object_mut)
        {
            meta.remove("resourceVersion");
            meta.remove("managedFields");
        }
        serde_json::to_vec(&value).map_err(|e| e.to_string())
    }
}

/// `cloudcore token create --kubeconfig F`: a token in the cluster, pinned to the cluster CA
/// there.
///
/// # Errors
/// The cluster cannot be reached, holds no CA yet, or refuses the write.
pub async fn create_token(
    client: &Client,
    ttl: std::time::Duration,
    once: bool,
) -> anyhow::Result<String> {
    let pki = ClusterPki::new(client.clone());
    let (files, _) = pki.read().await?;
    let (Some(cert), Some(key)) = (files.get("ca.crt"), files.get("ca.key")) else {
        anyhow::bail!(
            "{} holds no cluster CA yet: start a cloudcore with --kubeconfig first",
            pki.describe()
        );
    };
    let ca = transport::tls::CertificateAuthority::from_pem(
        &String::from_utf8_lossy(cert),
        &String::from_utf8_lossy(key),
    )?;
    let (id, secret) = crate::pki::new_token_parts();
    let record = TokenRecord::new(&secret, ttl, once);
    secrets(client)
        .create(&PostParams::default(), &token_secret(&id, &record, None))
        .await
        .with_context(|| format!("creating the token's Secret {NAMESPACE}/{TOKEN_PREFIX}{id}"))?;
    Ok(crate::pki::token_text(
        &crate::pki::ca_pin(&ca),
        &id,
        &secret,
    ))
}

/// `cloudcore token list --kubeconfig F`.
///
/// # Errors
/// The cluster cannot be reached.
pub async fn list_tokens(client: &Client) -> anyhow::Result<Vec<TokenInfo>> {
    let listed = secrets(client)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=cloudcore"))
        .await
        .context("listing the token Secrets")?;
    let mut tokens: Vec<TokenInfo> = listed
        .items
        .iter()
        .filter(|secret| secret.type_.as_deref() == Some(TOKEN_TYPE))
        .filter_map(|secret| {
            let id = secret
                .metadata
                .name
                .as_deref()?
                .strip_prefix(TOKEN_PREFIX)?;
            Some(record_of(secret)?.info(id, false))
        })
        .collect();
    tokens.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(tokens)
}

/// `cloudcore token delete --kubeconfig F`: whether there was such a token.
///
/// # Errors
/// The cluster cannot be reached.
pub async fn delete_token(client: &Client, id: &str) -> anyhow::Result<bool> {
    match secrets(client)
        .delete(&token_secret_name(id), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is(&e, 404) => Ok(false),
        Err(e) => Err(e).context("deleting the token's Secret"),
    }
}
