//! The ServiceAccount controller: every namespace has a ServiceAccount named `default` (as
//! kube-controller-manager's `serviceaccount` controller keeps it), so that pods and tools
//! that name it find it. Tokens for it are not issued (kedge has no TokenRequest API yet).

use replication::api::object;
use serde_json::json;

use super::{is_terminating, Action, World};

/// The ServiceAccount every namespace gets.
pub const DEFAULT: &str = "default";

/// A `default` ServiceAccount for every namespace that lacks one (and is not being deleted).
pub fn reconcile(world: &World, _now: i64) -> Vec<Action> {
    world
        .namespaces
        .iter()
        .filter(|ns| !is_terminating(ns))
        .filter(|ns| {
            !world
                .serviceaccounts
                .iter()
                .any(|sa| object::namespace(sa) == object::name(ns) && object::name(sa) == DEFAULT)
        })
        .map(|ns| Action::Create {
            resource: "serviceaccounts",
            namespace: object::name(ns).to_owned(),
            object: json!({"apiVersion": "v1", "kind": "ServiceAccount",
                           "metadata": {"name": DEFAULT, "namespace": object::name(ns)}}),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use replication::api::object::Object;

    #[test]
    fn every_live_namespace_gets_a_default_service_account_once() {
        let ns = |name: &str, terminating: bool| -> Object {
            let mut n = obj(json!({"kind": "Namespace", "metadata": {"name": name}}));
            if terminating {
                object::meta_mut(&mut n)
                    .insert("deletionTimestamp".into(), json!("2027-01-01T00:00:00Z"));
            }
            n
        };
        let world = World {
            namespaces: vec![ns("a", false), ns("b", false), ns("gone", true)],
            serviceaccounts: vec![obj(
                json!({"metadata": {"name": "default", "namespace": "a"}}),
            )],
            ..World::default()
        };
        let actions = reconcile(&world, T0);
        assert_eq!(actions.len(), 1);
        assert!(matches!(&actions[0], Action::Create { namespace, .. } if namespace == "b"));
    }
}
