//! `AccessPolicy`: its checks (those the API server makes with CEL, and those only the mesh can
//! make: ports the target Service has, HTTP fields on ports that are not HTTP), its translation
//! into each target workload's [`InboundAuthz`], and its conditions.
//!
//! Decisions worth knowing:
//! - Proxy configs are per identity (namespace and service account), so a policy targeting a
//!   Service applies to every workload of the identities behind it, on the Service's target
//!   ports. Workloads that share a service account share their policies.
//! - A Service's pods are found by its selector (every meshed pod it selects, ready or not, so a
//!   starting pod has its policy before it gets traffic); a Service without a selector by its
//!   EndpointSlices.
//! - Service ports become the pods' ports here (`targetPort`, named ports resolved per pod), so
//!   the sidecar only ever sees the ports connections arrive on (istio#49098).
//! - A namespace's default comes from its `skein.dev/default-policy` annotation, else the
//!   mesh's (`--default-policy`); an annotation that is none of the four values means `deny`.

use std::collections::{BTreeMap, BTreeSet};

use skein_api::authz::{
    Action, AuthzPolicy, AuthzRule, DefaultPolicy, Destination, InboundAuthz, Mode, PathMatch, Source,
};
use skein_api::crd::access_policy::{AccessAction, AccessMode, AccessPolicySpec, AccessTargetKind};
use skein_api::{AccessPolicy, WorkloadIdentity};

use super::snapshot::{ObjectKey, PodInfo, ServiceInfo, Snapshot, TargetPort};
use super::{protocol_of, Cond, DesiredStatus, ResourceKind, ResourceRef};
use skein_api::config::Protocol;

/// Condition type of an AccessPolicy: whether every target workload can enforce it.
pub const ENFORCED: &str = "Enforced";

/// One problem with a spec, naming its field, and the rule it is in (`None`: no one rule's).
type Problem = (Option<usize>, String);

/// What is wrong with `spec` that CEL would refuse, or that makes a path rule unable to match,
/// each naming its field and rule; empty when nothing is.
fn rule_problems(spec: &AccessPolicySpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        if let Some(from) = &rule.from {
            let named = !from.service_accounts.is_empty()
                || !from.identities.is_empty()
                || !from.namespaces.is_empty();
            let unauthenticated = from.unauthenticated == Some(true);
            if !named && !unauthenticated {
                problems.push(at(i, format!(
                    "spec.rules[{i}].from: from must name serviceAccounts, identities, namespaces or unauthenticated: \
                     an empty from would match no caller (omit from to match every caller)"
                )));
            }
            if named && unauthenticated {
                problems.push(at(i, format!(
                    "spec.rules[{i}].from.unauthenticated: unauthenticated: true matches callers without a mesh identity \
                     and cannot be combined with serviceAccounts, identities or namespaces in one from; write a second rule"
                )));
            }
        }
        if let Some(to) = &rule.to {
            if to.ports.is_empty() && to.methods.is_empty() && to.paths.is_empty() {
                problems.push(at(i, format!(
                    "spec.rules[{i}].to: to must name ports, methods or paths: an empty to would match no request \
                     (omit to to match every request)"
                )));
            }
            for (j, path) in to.paths.iter().enumerate() {
                if path.exact.is_some() == path.prefix.is_some() {
                    problems.push(at(
                        i,
                        format!("spec.rules[{i}].to.paths[{j}]: exactly one of exact or prefix must be set"),
                    ));
                }
                for (field, value) in [("exact", &path.exact), ("prefix", &path.prefix)] {
                    let Some(problem) = value.as_deref().and_then(skein_api::authz::rule_path_problem) else {
                        continue;
                    };
                    problems.push(at(
                        i,
                        format!("spec.rules[{i}].to.paths[{j}].{field}: {problem}, so it never matches"),
                    ));
                }
            }
        }
    }
    problems
}

fn at(rule: usize, message: String) -> Problem {
    (Some(rule), message)
}

/// What only the mesh can check against the target Service: ports it has, and HTTP fields on
/// ports it declares as something else (a rule that could never allow, or would deny every
/// connection).
fn check_against_service(spec: &AccessPolicySpec, key: &ObjectKey, svc: &ServiceInfo) -> Vec<Problem> {
    let mut problems = Vec::new();
    let service = format!("{}/{}", key.namespace, spec.target_ref.name);
    for (i, rule) in spec.rules.iter().enumerate() {
        let Some(to) = &rule.to else { continue };
        let mut named = Vec::new();
        for (j, port) in to.ports.iter().enumerate() {
            match svc.ports.iter().find(|p| i32::from(p.port) == *port) {
                Some(p) => named.push(p),
                None => problems.push(at(i, format!(
                    "spec.rules[{i}].to.ports[{j}]: Service {service} has no port {port} (ports are the Service's, not the pods')"
                ))),
            }
        }
        let field = if !to.methods.is_empty() {
            "methods"
        } else if !to.paths.is_empty() {
            "paths"
        } else {
            continue;
        };
        let ports: Vec<_> = if to.ports.is_empty() { svc.ports.iter().collect() } else { named };
        let opaque = |p: &&super::snapshot::ServicePortInfo| {
            protocol_of(p.name.as_deref(), p.app_protocol.as_deref()) == Protocol::Tcp
        };
        if !ports.is_empty() && ports.iter().all(opaque) {
            let list: Vec<String> = ports.iter().map(|p| p.port.to_string()).collect();
            problems.push(at(i, format!(
                "spec.rules[{i}].to.{field}: port {} of Service {service} is not HTTP (appProtocol or port name), \
                 so an HTTP field can never match there: an Allow rule would allow nothing, a Deny rule would deny every connection",
                list.join(", ")
            )));
        }
    }
    problems
}

/// One policy's target workloads, with the Service ports each identity's pods serve them on.
struct Targets<'a> {
    /// Meshed pods targeted, by key.
    pods: Vec<(&'a ObjectKey, &'a PodInfo)>,
    /// Pods the target Service selects that carry no sidecar: nothing enforces it there.
    unmeshed: Vec<&'a ObjectKey>,
    /// Per identity: Service port → the pods' ports (none for a Namespace target).
    ports: BTreeMap<WorkloadIdentity, BTreeMap<u16, BTreeSet<u16>>>,
}

fn service_targets<'a>(snapshot: &'a Snapshot, key: &ObjectKey, svc: &ServiceInfo) -> Targets<'a> {
    let in_slices: BTreeSet<&str> = snapshot
        .slices
        .iter()
        .filter(|(k, s)| k.namespace == key.namespace && s.service == key.name)
        .flat_map(|(_, s)| s.endpoints.iter().filter_map(|e| e.pod.as_deref()))
        .collect();
    let (pods, unmeshed): (Vec<(&ObjectKey, &PodInfo)>, Vec<_>) = snapshot
        .pods
        .iter()
        .filter(|(k, _)| k.namespace == key.namespace)
        .filter(|(k, p)| match svc.selector {
            Some(_) => svc.selects(&p.labels),
            None => in_slices.contains(k.name.as_str()),
        })
        .partition(|(_, p)| p.meshed);
    let unmeshed = unmeshed.into_iter().map(|(k, _)| k).collect();
    let mut ports: BTreeMap<WorkloadIdentity, BTreeMap<u16, BTreeSet<u16>>> = BTreeMap::new();
    for (k, pod) in &pods {
        let by_port = ports.entry(pod.identity(&k.namespace)).or_default();
        for p in &svc.ports {
            let target = match &p.target_port {
                TargetPort::Number(n) => Some(*n),
                TargetPort::Name(name) => pod.named_ports.get(name).copied(),
            };
            by_port.entry(p.port).or_default().extend(target);
        }
    }
    Targets { pods, unmeshed, ports }
}

fn namespace_targets<'a>(snapshot: &'a Snapshot, namespace: &str) -> Targets<'a> {
    let pods: Vec<(&ObjectKey, &PodInfo)> =
        snapshot.pods.iter().filter(|(k, p)| k.namespace == namespace && p.meshed).collect();
    let ports = pods.iter().map(|(k, p)| (p.identity(&k.namespace), BTreeMap::new())).collect();
    // A Namespace target is its meshed workloads by definition.
    Targets { pods, unmeshed: Vec::new(), ports }
}

/// The policy as one identity's proxy holds it: Service ports translated with `ports` (`None`:
/// a Namespace target, ports as written).
fn translate(
    name: &str,
    spec: &AccessPolicySpec,
    ports: Option<&BTreeMap<u16, BTreeSet<u16>>>,
) -> AuthzPolicy {
    let translate_ports = |written: &[i32]| -> Vec<u16> {
        let mut out = BTreeSet::new();
        for p in written.iter().filter_map(|p| u16::try_from(*p).ok()) {
            match ports {
                Some(map) => out.extend(map.get(&p).into_iter().flatten().copied()),
                None => {
                    out.insert(p);
                }
            }
        }
        out.into_iter().collect()
    };
    let rules = spec
        .rules
        .iter()
        .map(|r| AuthzRule {
            from: r.from.as_ref().map(|f| Source {
                service_accounts: f
                    .service_accounts
                    .iter()
                    .map(|s| (s.namespace.clone(), s.name.clone()))
                    .collect(),
                identities: f.identities.clone(),
                namespaces: f.namespaces.clone(),
                unauthenticated: f.unauthenticated == Some(true),
            }),
            to: r.to.as_ref().map(|t| Destination {
                // A Service port no pod serves yet translates to nothing: this port then
                // matches no request (`u16` 0 never arrives), rather than every one.
                ports: match translate_ports(&t.ports) {
                    empty if empty.is_empty() && !t.ports.is_empty() => vec![0],
                    some => some,
                },
                methods: t.methods.clone(),
                paths: t
                    .paths
                    .iter()
                    .filter_map(|p| match (&p.exact, &p.prefix) {
                        (Some(e), _) => Some(PathMatch::Exact(e.clone())),
                        (None, Some(pre)) => Some(PathMatch::Prefix(pre.clone())),
                        (None, None) => None,
                    })
                    .collect(),
            }),
        })
        .collect();
    AuthzPolicy {
        name: name.to_string(),
        action: match spec.action {
            AccessAction::Allow => Action::Allow,
            AccessAction::Deny => Action::Deny,
        },
        mode: match spec.mode {
            AccessMode::Enforce => Mode::Enforce,
            AccessMode::DryRun => Mode::DryRun,
        },
        ports: match ports {
            Some(map) => {
                let all: BTreeSet<u16> = map.values().flatten().copied().collect();
                // A Service whose pods serve none of its ports: the policy guards nothing, and
                // must not widen to every port.
                if all.is_empty() {
                    vec![0]
                } else {
                    all.into_iter().collect()
                }
            }
            None => Vec::new(),
        },
        rules,
    }
}

/// Service accounts the policy names that no ServiceAccount object or pod has.
fn missing_service_accounts(snapshot: &Snapshot, spec: &AccessPolicySpec) -> Vec<String> {
    let mut missing = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        for (j, sa) in rule.from.iter().flat_map(|f| f.service_accounts.iter()).enumerate() {
            if sa.name == "*" {
                continue;
            }
            let key = ObjectKey::new(sa.namespace.clone(), sa.name.clone());
            let known = snapshot.service_accounts.contains_key(&key)
                || snapshot
                    .pods
                    .iter()
                    .any(|(k, p)| k.namespace == sa.namespace && p.service_account == sa.name);
            if !known {
                missing.push(format!("{key} (spec.rules[{i}].from.serviceAccounts[{j}])"));
            }
        }
    }
    missing
}

/// What the AccessPolicies come to.
#[derive(Debug, Default)]
pub(super) struct Access {
    /// Every meshed identity's inbound authorization.
    pub authz: BTreeMap<WorkloadIdentity, InboundAuthz>,
    /// Per namespace, its Namespace-targeted policies: what an identity none of whose pods is
    /// seen yet must already hold.
    pub namespace_policies: BTreeMap<String, Vec<AuthzPolicy>>,
}

/// Every meshed identity's inbound authorization, and each AccessPolicy's conditions.
pub(super) fn accept_access(
    snapshot: &Snapshot,
    statuses: &mut BTreeMap<ResourceRef, DesiredStatus>,
) -> Access {
    let mut access = Access::default();
    for (key, pod) in snapshot.pods.iter().filter(|(_, p)| p.meshed) {
        access.authz.entry(pod.identity(&key.namespace)).or_insert_with(|| InboundAuthz {
            default: snapshot.namespace_default(&key.namespace).unwrap_or(DefaultPolicy::Deny),
            namespace: key.namespace.clone(),
            policies: Vec::new(),
        });
    }
    for (key, policy) in &snapshot.access_policies {
        let status_ref = ResourceRef { kind: ResourceKind::AccessPolicy, key: key.clone() };
        let desired = accept_one(snapshot, key, policy, &mut access);
        statuses.insert(status_ref, desired);
    }
    access
}

/// The spec a proxy enforces for a policy with problems, failing closed as Istio does with
/// fields it cannot honour: an Allow policy's broken rules allow nothing (it still makes its
/// ports deny what no other rule allows), a Deny policy's broken rules deny every request on
/// its ports. The rest of the policy stays as written.
fn fail_closed(spec: &AccessPolicySpec, broken: &BTreeSet<usize>) -> AccessPolicySpec {
    let mut spec = spec.clone();
    let rules = std::mem::take(&mut spec.rules);
    spec.rules = rules
        .into_iter()
        .enumerate()
        .filter_map(|(i, rule)| match (broken.contains(&i), spec.action) {
            (false, _) => Some(rule),
            (true, AccessAction::Allow) => None,
            (true, AccessAction::Deny) => Some(skein_api::crd::access_policy::AccessRule::default()),
        })
        .collect();
    spec
}

fn accept_one(
    snapshot: &Snapshot,
    key: &ObjectKey,
    policy: &AccessPolicy,
    access: &mut Access,
) -> DesiredStatus {
    let generation = policy.metadata.generation.unwrap_or(0);
    let spec = &policy.spec;
    let target_name = &spec.target_ref.name;
    let mut problems = rule_problems(spec);
    let (targets, target_cond) = match spec.target_ref.kind {
        AccessTargetKind::Namespace if *target_name != key.namespace => {
            problems.push((
                None,
                format!(
                    "spec.targetRef.name: a Namespace target must be the policy's own namespace ({}), not {target_name}",
                    key.namespace
                ),
            ));
            (None, Cond::fail("Invalid", "a policy can target its own namespace only"))
        }
        AccessTargetKind::Namespace => (
            Some(namespace_targets(snapshot, &key.namespace)),
            Cond::ok("ResolvedRefs", format!("targets every meshed workload of namespace {}", key.namespace)),
        ),
        AccessTargetKind::Service => {
            let svc_key = ObjectKey::new(key.namespace.clone(), target_name.clone());
            match snapshot.services.get(&svc_key) {
                Some(svc) => {
                    problems.extend(check_against_service(spec, key, svc));
                    (
                        Some(service_targets(snapshot, &svc_key, svc)),
                        Cond::ok("ResolvedRefs", format!("targets Service {svc_key}")),
                    )
                }
                None => (
                    None,
                    Cond::fail(
                        "ServiceNotFound",
                        format!("target Service {svc_key} not found: the policy applies to no workload"),
                    ),
                ),
            }
        }
    };
    let broken: BTreeSet<usize> = problems.iter().filter_map(|(rule, _)| *rule).collect();
    let accepted = if problems.is_empty() {
        Cond::ok("Accepted", "policy is valid")
    } else {
        let messages: Vec<&str> = problems.iter().map(|(_, m)| m.as_str()).collect();
        let in_force = match (broken.is_empty(), spec.action) {
            (true, _) => "",
            (false, AccessAction::Allow) => {
                "; until fixed, the rules named allow nothing (its other rules stay in force, and its ports deny what no rule allows)"
            }
            (false, AccessAction::Deny) => {
                "; until fixed, the rules named deny every request on the policy's ports (failing closed)"
            }
        };
        Cond::fail("Invalid", format!("{}{in_force}", messages.join("; ")))
    };
    let effective = if broken.is_empty() { spec.clone() } else { fail_closed(spec, &broken) };
    let name = key.to_string();
    let mut audience = BTreeSet::new();
    let mut explicit = Vec::new();
    let mut unmeshed = Vec::new();
    if let Some(targets) = &targets {
        let service_target = spec.target_ref.kind == AccessTargetKind::Service;
        for (identity, ports) in &targets.ports {
            let Some(entry) = access.authz.get_mut(identity) else { continue };
            entry.policies.push(translate(&name, &effective, service_target.then_some(ports)));
            audience.insert(identity.clone());
        }
        if !service_target {
            access
                .namespace_policies
                .entry(key.namespace.clone())
                .or_default()
                .push(translate(&name, &effective, None));
        }
        explicit = targets
            .pods
            .iter()
            .filter(|(_, p)| p.explicit)
            .map(|(k, p)| (ObjectKey::clone(k), p.uid.clone()))
            .collect();
        unmeshed = targets.unmeshed.iter().map(|k| k.name.clone()).collect();
    }
    let missing = missing_service_accounts(snapshot, spec);
    let resolved_refs = if !target_cond.status || missing.is_empty() {
        target_cond
    } else {
        Cond::fail(
            "ServiceAccountNotFound",
            format!(
                "{}; no ServiceAccount or pod has {}: the rule matches no caller until it exists",
                target_cond.message,
                missing.join(", ")
            ),
        )
    };
    let pods = targets.as_ref().map_or(0, |t| t.pods.len());
    let explicit_names: Vec<String> = explicit.iter().map(|(k, _)| k.name.clone()).collect();
    let enforced = match (unmeshed.is_empty(), explicit.is_empty()) {
        (true, true) => Cond::ok(
            "Enforced",
            format!("enforced by the sidecars of {pods} target pod(s) ({} identities)", audience.len()),
        ),
        (false, _) => Cond::fail(
            "NotMeshed",
            format!(
                "{} pod(s) the target Service selects carry no sidecar, so nothing enforces the policy there and any pod can call them: {}{}",
                unmeshed.len(),
                listed(&unmeshed),
                if explicit.is_empty() {
                    String::new()
                } else {
                    format!("; {} more run in explicit capture mode: {}", explicit.len(), listed(&explicit_names))
                }
            ),
        ),
        (true, false) => Cond::fail(
            "ExplicitCapture",
            format!(
                "{} of {pods} target pod(s) run in explicit capture mode, where the app's ports are reachable without the sidecar, \
                 so nothing is enforced there: {}",
                explicit.len(),
                listed(&explicit_names)
            ),
        ),
    };
    DesiredStatus {
        generation,
        accepted,
        resolved_refs,
        audience: Some(audience),
        extra: vec![(ENFORCED, enforced)],
        explicit_pods: explicit,
        // Carried by its audience's own parts, not by a destination.
        carried_by: None,
    }
}

/// Up to five names, and how many more.
fn listed(names: &[String]) -> String {
    let more = names.len().saturating_sub(5);
    let shown = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if more > 0 {
        format!("{shown} and {more} more")
    } else {
        shown
    }
}

/// Namespaces whose `skein.dev/default-policy` annotation is not one of the four values, with
/// the value (they fall back to `deny`).
pub fn bad_namespace_defaults(snapshot: &Snapshot) -> BTreeMap<String, String> {
    snapshot
        .namespaces
        .iter()
        .filter_map(|(k, ns)| ns.default_policy(snapshot.default_policy).err().map(|v| (k.name.clone(), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(spec: &AccessPolicySpec) -> Vec<String> {
        rule_problems(spec).into_iter().map(|(_, message)| message).collect()
    }

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
            (
                serde_json::json!([{}, {"to": {"paths": [{"prefix": "/api/../admin"}]}}]),
                "spec.rules[1].to.paths[0].prefix: \"/api/../admin\" is not normalised",
            ),
        ] {
            let problems = validate(&spec(rules.clone()));
            assert!(problems.iter().any(|p| p.starts_with(says)), "{rules}: {problems:?}");
        }
    }
}
