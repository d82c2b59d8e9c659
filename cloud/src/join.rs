//! Node join: a node with a valid bootstrap token gets a certificate naming it and its Node
//! object (labelled `node-role.kubernetes.io/edge`). Later connections use that certificate.
//!
//! A name that already has a Node object is refused: a token lets a new node in, it does not let
//! anyone take over an existing node's identity. To re-join a node that lost its disk, delete its
//! Node object first (`kubectl delete node NAME`). The exception is a node whose every
//! certificate expired beyond the grace window (`--node-cert-grace`): nothing can use its
//! identity any more, and a join with a new token takes it back, keeping its Node object.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use replication::api::object::{self, Object};
use replication::{ObjectKey, Precondition, Store, WriteSet};
use serde_json::json;
use transport::{JoinHandler, JoinRequest};

use crate::credentials::NodeCredentials;
use crate::metrics::{EventLabels, Metrics};
use crate::pki::{self, Token};
use crate::scheduler::EDGE_ROLE_LABEL;

/// Default of `cloudcore --join-rate-limit`: join attempts a minute per source address.
pub const DEFAULT_JOIN_RATE: u32 = 30;

/// Join attempts per source address: a token bucket of `per_minute` attempts that refills
/// continuously (`per_minute` a minute), so that bootstrap tokens cannot be guessed at speed.
/// Sans-IO: the caller gives the time.
#[derive(Debug)]
pub struct JoinRateLimit {
    per_minute: u32,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl JoinRateLimit {
    /// At most `per_minute` attempts a minute per address (a burst of as many); 0 is no limit.
    pub fn new(per_minute: u32) -> Self {
        JoinRateLimit {
            per_minute,
            buckets: HashMap::new(),
        }
    }

    /// Takes one attempt for `addr` at `now`; `Err(wait)`: refused, the next attempt is
    /// possible after `wait`.
    ///
    /// # Errors
    /// The time until an attempt is allowed again, when `addr` is out of attempts.
    pub fn check(&mut self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        // Addresses whose buckets are full again are forgotten (bounded memory).
        if self.buckets.len() > 4096 {
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second < capacity
            });
        }
        let (tokens, at) = self.buckets.entry(addr).or_insert((capacity, now));
        *tokens =
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / per_second))
        }
    }
}

/// The cloud's [`JoinHandler`].
pub struct CloudJoin {
    /// Where the bootstrap tokens are checked and used up.
    pub tokens: pki::Tokens,
    pub store: Arc<Store>,
    /// Signs the node's certificate and records it as the node's only one.
    pub credentials: Arc<NodeCredentials>,
    pub metrics: Arc<Metrics>,
    /// Attempts per source address.
    pub rate: Mutex<JoinRateLimit>,
}

/// The Node object a joining node starts with; the node fills in its status once connected.
pub fn new_node(name: &str) -> Object {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": uuid::Uuid::new_v4().hyphenated().to_string(),
            "creationTimestamp": object::now_rfc3339(),
            "labels": {
                EDGE_ROLE_LABEL: "",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            },
        },
        "spec": {},
        "status": {},
    });
    node.as_object_mut().map(std::mem::take).unwrap_or_default()
}

impl CloudJoin {
    fn admit(&self, request: &JoinRequest, remote: SocketAddr) -> Result<Vec<u8>, String> {
        let limited = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(remote.ip(), Instant::now());
        if let Err(wait) = limited {
            self.count("rate_limited");
            return Err(format!(
                "429 Too Many Requests: too many join attempts from {}; try again in {} s",
                remote.ip(),
                wait.as_secs().max(1)
            ));
        }
        let result = self.admit_token(request);
        self.count(if result.is_ok() { "joined" } else { "refused" });
        result
    }

    fn count(&self, event: &'static str) {
        self.metrics
            .joins
            .get_or_create(&EventLabels { event })
            .inc();
    }

    fn admit_token(&self, request: &JoinRequest) -> Result<Vec<u8>, String> {
        let token = Token::parse(&request.token).map_err(|e| e.to_string())?;
        let once = self
            .tokens
            .verify(&token)
            .map_err(|e| format!("bootstrap token: {e}"))?;
        transport::tls::validate_node_name(&request.node_name).map_err(|e| e.to_string())?;
        let key = ObjectKey::new("nodes", "", &request.node_name).map_err(|e| e.to_string())?;
        let cert = self
            .credentials
            .sign(&request.node_name, &request.csr_der)?;
        if once {
            self.tokens
                .consume(&token)
                .map_err(|e| format!("bootstrap token: {e}"))?;
        }
        let give_back = |reason: String| {
            if once {
                self.tokens.restore(&token);
            }
            reason
        };
        let mut set = WriteSet::new();
        let node = Bytes::from(object::to_stored(new_node(&request.node_name)));
        set.put(key, node, Precondition::Absent);
        let mut created = true;
        match self.store.commit(set) {
            Ok(_) => {}
            // A node whose every certificate expired beyond the grace window comes back
            // with a new token, keeping its Node (and what is bound to it).
            Err(replication::StoreError::AlreadyExists(_))
                if self.credentials.identity_is_dead(&request.node_name) =>
            {
                tracing::info!(node = %request.node_name, "re-join of a node whose certificates all expired beyond the grace window");
                created = false;
            }
            Err(replication::StoreError::AlreadyExists(_)) => {
                return Err(give_back(format!(
                    "node {} already joined; to join it again (e.g. after losing its disk), \
                     delete it first: kubectl delete node {}",
                    request.node_name, request.node_name
                )))
            }
            Err(other) => return Err(give_back(format!("cannot record the node: {other}"))),
        }
        if let Err(e) = self.credentials.record_join(&request.node_name, &cert) {
            // Without its record the certificate would be refused: undo the Node.
            if let (true, Ok(key)) = (created, ObjectKey::new("nodes", "", &request.node_name)) {
                let mut undo = WriteSet::new();
                undo.delete(key, Precondition::Exists);
                let _ = self.store.commit(undo);
            }
            return Err(give_back(format!("cannot record the certificate: {e}")));
        }
        Ok(cert.to_vec())
    }
}

impl JoinHandler for CloudJoin {
    fn join(&self, request: JoinRequest, remote: SocketAddr) -> Result<Vec<u8>, String> {
        self.admit(&request, remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_attempts_are_limited_per_address_and_refill() {
        let mut limit = JoinRateLimit::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t = Instant::now();
        for _ in 0..3 {
            limit.check(a, t).unwrap();
        }
        let wait = limit.check(a, t).unwrap_err();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        // Another address has its own bucket.
        limit.check(b, t).unwrap();
        // One attempt back every 20 s (3 a minute).
        limit.check(a, t + Duration::from_secs(20)).unwrap();
        assert!(limit.check(a, t + Duration::from_secs(21)).is_err());
        // No limit.
        let mut none = JoinRateLimit::new(0);
        for _ in 0..1000 {
            none.check(a, t).unwrap();
        }
    }
}
