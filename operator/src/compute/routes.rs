//! TrafficRoutes: which are accepted (valid, not in conflict: the oldest route for a host and
//! port wins), their conversion to the wire's `Route`, and whether their host and subsets
//! resolve.

use std::collections::BTreeMap;

use skein_api::config::{BackendTarget, HeaderMatch, Route, RouteRule, StringMatch, WeightedBackend};
use skein_api::constants::CLUSTER_DOMAIN;
use skein_api::duration::parse_millis;
use skein_api::TrafficRoute;

use super::endpoints::ready_endpoint_labels;
use super::snapshot::{ObjectKey, Snapshot};
use super::{age_key, Cond, DesiredStatus, ResourceKind, ResourceRef};

/// Resolves a TrafficRoute host (`reviews`, `reviews.shop`, `reviews.shop.svc`,
/// `reviews.shop.svc.cluster.local`) to the Service it names.
pub fn resolve_host(host: &str, route_namespace: &str) -> Result<ObjectKey, String> {
    let parts: Vec<&str> = host.split('.').collect();
    let svc_suffix_ok = match parts.len() {
        1 | 2 => true,
        3 => parts[2] == "svc",
        _ => parts[2] == "svc" && parts[3..].join(".") == CLUSTER_DOMAIN,
    };
    if !svc_suffix_ok {
        return Err(format!(
            "host {host:?} is not a Service: use a Service name or <name>.<namespace>[.svc[.{CLUSTER_DOMAIN}]]"
        ));
    }
    let namespace = parts.get(1).copied().unwrap_or(route_namespace);
    Ok(ObjectKey::new(namespace, parts[0]))
}

/// A TrafficRoute that is valid and not in conflict, converted.
pub(super) struct AcceptedRoute {
    pub(super) key: ObjectKey,
    pub(super) service: ObjectKey,
    pub(super) route: Route,
}

pub(super) fn accept_routes(
    snapshot: &Snapshot,
    statuses: &mut BTreeMap<ResourceRef, DesiredStatus>,
) -> Vec<AcceptedRoute> {
    let mut valid = Vec::new();
    for (key, tr) in &snapshot.routes {
        let generation = tr.metadata.generation.unwrap_or(0);
        let status_ref = ResourceRef { kind: ResourceKind::TrafficRoute, key: key.clone() };
        match resolve_host(&tr.spec.host, &key.namespace).and_then(|svc| Ok((svc, convert_route(key, tr)?))) {
            Ok((service, route)) => valid.push((age_key(tr, key), service, route, tr)),
            Err(message) => {
                statuses.insert(status_ref, DesiredStatus::invalid(generation, message));
            }
        }
    }
    valid.sort_by(|a, b| a.0.cmp(&b.0));

    let mut winners: BTreeMap<(ObjectKey, Option<u16>), ObjectKey> = BTreeMap::new();
    let mut accepted = Vec::new();
    for ((_, key), service, route, tr) in valid {
        let status_ref = ResourceRef { kind: ResourceKind::TrafficRoute, key: key.clone() };
        let generation = tr.metadata.generation.unwrap_or(0);
        let slot = (service.clone(), route.port);
        if let Some(winner) = winners.get(&slot) {
            let port = route.port.map(|p| format!(" port {p}")).unwrap_or_else(|| " (all ports)".into());
            statuses.insert(
                status_ref,
                DesiredStatus::new(
                    generation,
                    Cond::fail(
                        "Conflicted",
                        format!(
                            "host {}{port} is already routed by the older TrafficRoute {winner}; this route is not in force",
                            tr.spec.host
                        ),
                    ),
                    resolve_route_refs(snapshot, &key, &service, tr),
                ),
            );
            continue;
        }
        winners.insert(slot, key.clone());
        statuses.insert(
            status_ref,
            DesiredStatus::new(
                generation,
                Cond::ok("Accepted", format!("routes Service {service}")),
                resolve_route_refs(snapshot, &key, &service, tr),
            )
            .carried_by(service.clone()),
        );
        accepted.push(AcceptedRoute { key, service, route });
    }
    accepted
}

/// Converts a TrafficRoute into its wire form, checking what the schema cannot (regexes compile
/// with the proxy's engine, durations parse).
pub(super) fn convert_route(key: &ObjectKey, tr: &TrafficRoute) -> Result<Route, String> {
    let spec = &tr.spec;
    let subsets: BTreeMap<&str, &BTreeMap<String, String>> =
        spec.subsets.iter().map(|s| (s.name.as_str(), &s.labels)).collect();
    // The CRD's CEL rules, checked again here (and the only check in the local control plane).
    if subsets.len() != spec.subsets.len() {
        return Err("spec.subsets: subset names must be unique".into());
    }
    if let Some((i, _)) = spec.subsets.iter().enumerate().find(|(_, s)| s.labels.is_empty()) {
        return Err(format!("spec.subsets[{i}].labels: labels must name at least one label"));
    }
    let mut rules = Vec::with_capacity(spec.rules.len());
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let matches = rule.matches.clone().unwrap_or_default();
        let headers = matches
            .headers
            .iter()
            .enumerate()
            .map(|(j, h)| {
                Ok(HeaderMatch {
                    name: h.name.to_ascii_lowercase(),
                    value: convert_match(&h.value, &format!("{field}.match.headers[{j}]"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let path = matches
            .path
            .as_ref()
            .map(|p| convert_match(&p.value, &format!("{field}.match.path")))
            .transpose()?;
        if let Some(StringMatch::Exact(p) | StringMatch::Prefix(p)) = &path {
            if !p.starts_with('/') {
                return Err(format!("{field}.match.path: exact and prefix paths must start with '/'"));
            }
        }
        let mut backends = Vec::with_capacity(rule.backends.len());
        for (j, b) in rule.backends.iter().enumerate() {
            let weight = u32::try_from(b.weight)
                .map_err(|_| format!("{field}.backends[{j}].weight must not be negative"))?;
            let target = match (&b.subset, &b.service) {
                (Some(subset), None) => BackendTarget::Subset {
                    name: subset.clone(),
                    labels: subsets.get(subset.as_str()).map(|l| (*l).clone()).ok_or_else(|| {
                        format!("{field}.backends[{j}].subset {subset:?} is not declared in spec.subsets")
                    })?,
                },
                (None, Some(service)) => BackendTarget::Service {
                    namespace: key.namespace.clone(),
                    name: service.clone(),
                    port: b.port.and_then(|p| u16::try_from(p).ok()),
                },
                _ => return Err(format!("{field}.backends[{j}] must name exactly one of subset or service")),
            };
            backends.push(WeightedBackend { weight, target });
        }
        if backends.iter().all(|b| b.weight == 0) {
            return Err(format!("{field}.backends: the weights must add up to more than 0"));
        }
        let timeout_ms = rule
            .timeout
            .as_deref()
            .map(|t| parse_millis(t).map_err(|e| format!("{field}.timeout: {e}")))
            .transpose()?;
        rules.push(RouteRule {
            headers,
            path,
            method: matches.method.map(|m| m.as_str().to_string()),
            backends,
            timeout_ms,
        });
    }
    Ok(Route {
        name: key.to_string(),
        generation: tr.metadata.generation.unwrap_or(0),
        port: spec.port.and_then(|p| u16::try_from(p).ok()),
        rules,
        retry: None,
        outlier: None,
    })
}

pub(super) fn convert_match(m: &skein_api::crd::StringMatch, field: &str) -> Result<StringMatch, String> {
    match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), None, None) => Ok(StringMatch::Exact(v.clone())),
        (None, Some(v), None) => Ok(StringMatch::Prefix(v.clone())),
        (None, None, Some(v)) => {
            regex::Regex::new(v).map_err(|e| format!("{field}.regex: {e}"))?;
            Ok(StringMatch::Regex(v.clone()))
        }
        _ => Err(format!("{field}: exactly one of exact, prefix or regex must be set")),
    }
}

pub(super) fn resolve_route_refs(
    snapshot: &Snapshot,
    key: &ObjectKey,
    service: &ObjectKey,
    tr: &TrafficRoute,
) -> Cond {
    let Some(svc) = snapshot.services.get(service) else {
        return Cond::fail("ServiceNotFound", format!("Service {service} not found"));
    };
    let mut problems: Vec<(&str, String)> = Vec::new();
    if let Some(port) = tr.spec.port {
        if !svc.ports.iter().any(|p| i32::from(p.port) == port) {
            problems.push(("PortNotFound", format!("Service {service} has no port {port}")));
        }
    }
    let ready = ready_endpoint_labels(snapshot, service);
    let mut counts = Vec::new();
    for subset in &tr.spec.subsets {
        let n =
            ready.iter().filter(|labels| subset.labels.iter().all(|(k, v)| labels.get(k) == Some(v))).count();
        if n == 0 {
            let selector: Vec<String> = subset.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            problems.push((
                "SubsetEmpty",
                format!(
                    "subset {} ({}) selects no ready endpoint of Service {service}",
                    subset.name,
                    selector.join(",")
                ),
            ));
        }
        counts.push(format!("{} ({n})", subset.name));
    }
    for rule in &tr.spec.rules {
        for b in &rule.backends {
            if let Some(name) = &b.service {
                let backend = ObjectKey::new(key.namespace.clone(), name.clone());
                if !snapshot.services.contains_key(&backend) {
                    problems.push(("BackendNotFound", format!("backend Service {backend} not found")));
                }
            }
        }
    }
    problems.dedup();
    match problems.first() {
        Some((reason, _)) => {
            Cond::fail(reason, problems.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; "))
        }
        None if counts.is_empty() => {
            Cond::ok("ResolvedRefs", format!("Service {service} has {} ready endpoints", ready.len()))
        }
        None => Cond::ok(
            "ResolvedRefs",
            format!("Service {service} has {} ready endpoints; subsets {}", ready.len(), counts.join(", ")),
        ),
    }
}
