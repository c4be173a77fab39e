//! `AccessPolicy` checks that the API server makes with CEL rules, as a plain function: the
//! local control plane refuses what the API server would, and (with the policy translation
//! still to come) the computation marks such a policy `Accepted=False/Invalid`.

use skein_api::crd::access_policy::AccessPolicySpec;

/// What is wrong with `spec`, each naming its field; empty when nothing is.
pub fn validate(spec: &AccessPolicySpec) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        if let Some(from) = &rule.from {
            let named = !from.service_accounts.is_empty()
                || !from.identities.is_empty()
                || !from.namespaces.is_empty();
            let unauthenticated = from.unauthenticated == Some(true);
            if !named && !unauthenticated {
                problems.push(format!(
                    "spec.rules[{i}].from: from must name serviceAccounts, identities, namespaces or unauthenticated: \
                     an empty from would match no caller (omit from to match every caller)"
                ));
            }
            if named && unauthenticated {
                problems.push(format!(
                    "spec.rules[{i}].from.unauthenticated: unauthenticated: true matches callers without a mesh identity \
                     and cannot be combined with serviceAccounts, identities or namespaces in one from; write a second rule"
                ));
            }
        }
        if let Some(to) = &rule.to {
            if to.ports.is_empty() && to.methods.is_empty() && to.paths.is_empty() {
                problems.push(format!(
                    "spec.rules[{i}].to: to must name ports, methods or paths: an empty to would match no request \
                     (omit to to match every request)"
                ));
            }
            for (j, path) in to.paths.iter().enumerate() {
                if path.exact.is_some() == path.prefix.is_some() {
                    problems.push(format!(
                        "spec.rules[{i}].to.paths[{j}]: exactly one of exact or prefix must be set"
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rules: serde_json::Value) -> AccessPolicySpec {
        serde_json::from_value(
            serde_json::json!({"targetRef": {"kind": "Service", "name": "reviews"}, "rules": rules}),
        )
        .unwrap()
    }

    #[test]
    fn the_cel_rules_hold_here_too() {
        assert!(validate(&spec(serde_json::json!([
            {"from": {"serviceAccounts": [{"namespace": "shop", "name": "client"}]}, "to": {"ports": [9080]}},
            {"from": {"unauthenticated": true}},
            {}
        ])))
        .is_empty());
        for (rules, says) in [
            (serde_json::json!([{"from": {}}]), "spec.rules[0].from: from must name"),
            (serde_json::json!([{"from": {"unauthenticated": false}}]), "spec.rules[0].from: from must name"),
            (
                serde_json::json!([{}, {"from": {"namespaces": ["shop"], "unauthenticated": true}}]),
                "spec.rules[1].from.unauthenticated: unauthenticated: true matches",
            ),
            (serde_json::json!([{"to": {}}]), "spec.rules[0].to: to must name"),
            (
                serde_json::json!([{"to": {"paths": [{"exact": "/a", "prefix": "/a"}]}}]),
                "spec.rules[0].to.paths[0]: exactly one of exact or prefix",
            ),
        ] {
            let problems = validate(&spec(rules.clone()));
            assert!(problems.iter().any(|p| p.starts_with(says)), "{rules}: {problems:?}");
        }
    }
}
