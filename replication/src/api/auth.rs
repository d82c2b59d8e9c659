//! The review APIs behind `kubectl auth can-i` and `kubectl auth whoami`:
//! `SelfSubjectAccessReview` and `SelfSubjectRulesReview` (`authorization.k8s.io/v1`) and
//! `SelfSubjectReview` (`authentication.k8s.io/v1`), all `POST`-only as in kube-apiserver.
//!
//! The embedded API has one identity, [`USERNAME`]: whoever holds its bearer token (or reaches
//! its loopback address when it has none). What that identity may do is what the server's
//! [`ApiPolicy`] admits, so a review is answered from the policy: a read-only mirror of a real
//! cluster answers `no` to writes, the embedded API `yes` to everything it serves.

use serde_json::{json, Value};

use super::resources::{Registry, Resource};
use super::status::ApiError;
use super::status::StatusReason;
use super::{ApiPolicy, Verb};

/// The user every authorized request is (what `kubectl auth whoami` prints).
pub const USERNAME: &str = "kedge-admin";

/// The groups of [`USERNAME`].
pub const GROUPS: &[&str] = &["system:masters", "system:authenticated"];

/// The paths served here.
pub const ACCESS_REVIEW: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
/// `kubectl auth can-i --list`.
pub const RULES_REVIEW: &str = "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews";
/// `kubectl auth whoami`.
pub const SUBJECT_REVIEW: &str = "/apis/authentication.k8s.io/v1/selfsubjectreviews";

const VERBS: &[(&str, Verb)] = &[
    ("get", Verb::Get),
    ("list", Verb::List),
    ("watch", Verb::Watch),
    ("create", Verb::Create),
    ("update", Verb::Update),
    ("patch", Verb::Patch),
    ("delete", Verb::Delete),
    ("deletecollection", Verb::Delete),
];

/// Whether `path` is one of the review endpoints.
pub fn is_review(path: &str) -> bool {
    matches!(path, ACCESS_REVIEW | RULES_REVIEW | SUBJECT_REVIEW)
}

fn find(registry: &Registry, group: &str, plural: &str) -> Option<&'static Resource> {
    registry
        .all()
        .into_iter()
        .find(|r| r.group == group && r.plural == plural)
}

/// Whether `verb` on `resource` is admitted, with the policy's reason when it is not.
fn decide(policy: &dyn ApiPolicy, registry: &Registry, attributes: &Value) -> (bool, String) {
    let text = |field: &str| {
        attributes
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let (group, plural, verb) = (text("group"), text("resource"), text("verb"));
    let verbs: Vec<Verb> = match verb {
        "*" => VERBS.iter().map(|(_, v)| *v).collect(),
        v => match VERBS.iter().find(|(name, _)| *name == v) {
            Some((_, v)) => vec![*v],
            None => return (false, format!("the verb {v:?} is not served")),
        },
    };
    let candidates: Vec<&Resource> = if plural == "*" {
        registry.all()
    } else {
        match find(registry, group, plural) {
            Some(r) => vec![r],
            None => {
                let name = if group.is_empty() {
                    plural.to_owned()
                } else {
                    format!("{plural}.{group}")
                };
                return (false, format!("the server does not serve {name}"));
            }
        }
    };
    let status = text("subresource") == "status";
    for resource in candidates {
        for verb in &verbs {
            if let Err(e) = policy.admit(resource, *verb, status) {
                return (false, e.message);
            }
        }
    }
    (true, format!("{USERNAME} may do what the API serves"))
}

/// Answers a review `POST`ed to `path` with `body` (JSON, or Kubernetes protobuf when
/// `protobuf`: kubectl's typed clients send that).
///
/// # Errors
/// 400 Bad Request for a body that is not an object; 404 for another path.
pub fn review(
    policy: &dyn ApiPolicy,
    registry: &Registry,
    path: &str,
    body: &[u8],
    protobuf: bool,
) -> Result<Value, ApiError> {
    let request: Value = if body.is_empty() {
        json!({})
    } else if protobuf {
        super::protobuf::decode(body)?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the review is not JSON: {e}")))?
    };
    if !request.is_object() {
        return Err(ApiError::bad_request("the review is not a JSON object"));
    }
    let spec = request.get("spec").cloned().unwrap_or_else(|| json!({}));
    match path {
        ACCESS_REVIEW => {
            let (allowed, reason) = match spec.get("resourceAttributes") {
                Some(attributes) => decide(policy, registry, attributes),
                // Non-resource URLs (/healthz, /version, ...) are open to the one user.
                None => (true, format!("{USERNAME} may read every non-resource URL")),
            };
            let mut status = json!({"allowed": allowed, "reason": reason});
            if !allowed {
                status["denied"] = json!(true);
            }
            Ok(json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "metadata": {"creationTimestamp": null},
                "spec": spec,
                "status": status,
            }))
        }
        RULES_REVIEW => {
            let mut rules = Vec::new();
            for resource in registry.all() {
                let verbs: Vec<&str> = VERBS
                    .iter()
                    .filter(|(_, verb)| policy.admit(resource, *verb, false).is_ok())
                    .map(|(name, _)| *name)
                    .collect();
                if !verbs.is_empty() {
                    rules.push(json!({
                        "verbs": verbs,
                        "apiGroups": [resource.group],
                        "resources": [resource.plural],
                    }));
                }
            }
            Ok(json!({
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectRulesReview",
                "metadata": {"creationTimestamp": null},
                "spec": spec,
                "status": {
                    "resourceRules": rules,
                    "nonResourceRules": [{"verbs": ["get"], "nonResourceURLs": ["*"]}],
                    "incomplete": false,
                },
            }))
        }
        SUBJECT_REVIEW => Ok(json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "SelfSubjectReview",
            "metadata": {"creationTimestamp": super::object::now_rfc3339()},
            "status": {"userInfo": {"username": USERNAME, "groups": GROUPS}},
        })),
        other => Err(ApiError::new(
            404,
            StatusReason::NotFound,
            format!("no review at {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct ReadOnly;
    impl ApiPolicy for ReadOnly {
        fn admit(&self, _: &Resource, verb: Verb, _: bool) -> Result<(), ApiError> {
            if verb.is_write() {
                Err(ApiError::forbidden("a read-only mirror"))
            } else {
                Ok(())
            }
        }
    }
    struct Open;
    impl ApiPolicy for Open {}

    fn can(policy: &dyn ApiPolicy, verb: &str, group: &str, resource: &str) -> Value {
        let body = json!({"spec": {"resourceAttributes":
            {"verb": verb, "group": group, "resource": resource, "namespace": "default"}}});
        review(
            policy,
            &Registry::builtin(),
            ACCESS_REVIEW,
            body.to_string().as_bytes(),
            false,
        )
        .unwrap()["status"]
            .clone()
    }

    #[test]
    fn access_follows_the_policy() {
        assert_eq!(can(&Open, "create", "apps", "deployments")["allowed"], true);
        assert_eq!(can(&ReadOnly, "get", "", "pods")["allowed"], true);
        let denied = can(&ReadOnly, "delete", "", "pods");
        assert_eq!(denied["allowed"], false);
        assert!(denied["reason"].as_str().unwrap().contains("read-only"));
        let unknown = can(&Open, "get", "example.com", "widgets");
        assert_eq!(unknown["allowed"], false);
        assert!(unknown["reason"]
            .as_str()
            .unwrap()
            .contains("widgets.example.com"));
    }

    #[test]
    fn rules_and_whoami() {
        let rules = review(&ReadOnly, &Registry::builtin(), RULES_REVIEW, b"{}", false).unwrap();
        let pods = rules["status"]["resourceRules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resources"][0] == "pods")
            .unwrap()
            .clone();
        assert_eq!(pods["verbs"], json!(["get", "list", "watch"]));
        let me = review(&Open, &Registry::builtin(), SUBJECT_REVIEW, b"", false).unwrap();
        assert_eq!(me["status"]["userInfo"]["username"], USERNAME);
        assert!(review(&Open, &Registry::builtin(), ACCESS_REVIEW, b"[1]", false).is_err());
    }
}
