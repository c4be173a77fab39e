//! The config computation: a pure function from a [`Snapshot`] to every workload's
//! [`ProxyConfig`] and every Skein resource's `Accepted` and `ResolvedRefs` conditions.
//!
//! Decisions worth knowing:
//! - Every meshed workload may call every Service, so destinations are computed once and shared
//!   (`Arc`); only identity and inbound ports differ per workload.
//! - Two TrafficRoutes for the same Service host and port conflict: the older one (creation
//!   time, then namespace/name) wins and the newer one is `Accepted=False/Conflicted`, naming
//!   the winner. A route for one port and an all-ports route for the same host do not conflict:
//!   the port-specific one takes precedence on its port. Policies conflict the same way per
//!   target.
//! - `ResolvedRefs=False` does not take a route out of force (a subset with no endpoints answers
//!   503), as in Gateway API; `Accepted=False` does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use skein_api::config::{
    BackendTarget, Destination, Endpoint, HeaderMatch, InboundPort, OutlierConfig, Protocol, ProxyConfig,
    RetryConfig, Route, RouteRule, ServicePort, StringMatch, WeightedBackend,
};
use skein_api::constants::CLUSTER_DOMAIN;
use skein_api::crd::{PolicyTargetRef, TargetKind};
use skein_api::duration::parse_millis;
use skein_api::{OutlierPolicy, RetryPolicy, TrafficRoute, WorkloadIdentity};

use crate::snapshot::{ObjectKey, Snapshot};

/// The kinds of Skein resources that carry status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    TrafficRoute,
    OutlierPolicy,
    RetryPolicy,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TrafficRoute => "TrafficRoute",
            Self::OutlierPolicy => "OutlierPolicy",
            Self::RetryPolicy => "RetryPolicy",
        }
    }
}

/// One Skein resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    pub kind: ResourceKind,
    pub key: ObjectKey,
}

/// A condition's desired status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn ok(reason: &str, message: impl Into<String>) -> Self {
        Self { status: true, reason: reason.into(), message: message.into() }
    }
    pub fn fail(reason: &str, message: impl Into<String>) -> Self {
        Self { status: false, reason: reason.into(), message: message.into() }
    }
}

/// What the computation concludes about one resource (`Programmed` comes later, from the
/// proxies' acknowledgements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    pub generation: i64,
    pub accepted: Cond,
    pub resolved_refs: Cond,
}

impl DesiredStatus {
    /// A spec that cannot be used: not accepted, references not looked at.
    fn invalid(generation: i64, message: String) -> Self {
        Self {
            generation,
            accepted: Cond::fail("Invalid", message),
            resolved_refs: Cond::fail("Invalid", "references are not checked while the spec is invalid"),
        }
    }
}

/// The computed mesh: shared destinations, per-identity inbound ports, desired statuses.
#[derive(Debug)]
pub struct MeshConfig {
    pub destinations: Arc<Vec<Destination>>,
    destinations_digest: Sha256,
    pub inbound: BTreeMap<WorkloadIdentity, Vec<InboundPort>>,
    pub statuses: BTreeMap<ResourceRef, DesiredStatus>,
}

impl Default for MeshConfig {
    /// The mesh of an empty cluster (what proxies get before the first list completes).
    fn default() -> Self {
        compute(&Snapshot::default())
    }
}

impl MeshConfig {
    /// The config of one workload, with its content hash as version.
    pub fn proxy_config(&self, identity: &WorkloadIdentity) -> ProxyConfig {
        let inbound = self.inbound.get(identity).cloned().unwrap_or_default();
        let mut digest = self.destinations_digest.clone();
        digest.update(serde_json::to_vec(&(identity, &inbound)).expect("plain data serializes"));
        let hash = digest.finalize();
        let version: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
        ProxyConfig {
            version,
            identity: Some(identity.clone()),
            destinations: self.destinations.as_ref().clone(),
            inbound,
        }
    }
}

/// Computes the mesh from a snapshot.
pub fn compute(snapshot: &Snapshot) -> MeshConfig {
    let mut statuses = BTreeMap::new();

    let routes = accept_routes(snapshot, &mut statuses);
    let retry = accept_policies(
        &snapshot.retry_policies,
        ResourceKind::RetryPolicy,
        snapshot,
        &routes,
        &mut statuses,
    );
    let outlier = accept_policies(
        &snapshot.outlier_policies,
        ResourceKind::OutlierPolicy,
        snapshot,
        &routes,
        &mut statuses,
    );

    let endpoints = endpoints_by_service(snapshot);
    let mut destinations = Vec::with_capacity(snapshot.services.len());
    for (key, svc) in &snapshot.services {
        let mut service_routes: Vec<Route> = routes
            .iter()
            .filter(|r| &r.service == key)
            .map(|r| Route {
                retry: retry.get(&Target::Route(r.key.clone())).cloned(),
                outlier: outlier.get(&Target::Route(r.key.clone())).cloned(),
                ..r.route.clone()
            })
            .collect();
        // Port-specific routes first, so the proxy's first hit is the most specific one.
        service_routes
            .sort_by(|a, b| (a.port.is_none(), a.port, &a.name).cmp(&(b.port.is_none(), b.port, &b.name)));
        destinations.push(Destination {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            hosts: hosts_of(key),
            addresses: svc.cluster_ips.clone(),
            load_balancer: svc.load_balancer,
            ports: svc
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: protocol_of(p.name.as_deref(), p.app_protocol.as_deref()),
                })
                .collect(),
            endpoints: endpoints.get(key).cloned().unwrap_or_default(),
            routes: service_routes,
            retry: retry.get(&Target::Service(key.clone())).cloned(),
            outlier: outlier.get(&Target::Service(key.clone())).cloned(),
        });
    }

    let mut destinations_digest = Sha256::new();
    destinations_digest.update(serde_json::to_vec(&destinations).expect("plain data serializes"));
    MeshConfig {
        destinations: Arc::new(destinations),
        destinations_digest,
        inbound: inbound_ports(snapshot),
        statuses,
    }
}

/// Host names that reach a Service from any namespace.
fn hosts_of(key: &ObjectKey) -> Vec<String> {
    let (name, ns) = (&key.name, &key.namespace);
    vec![format!("{name}.{ns}"), format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}")]
}

/// `tcp`/`opaque` app protocols (or a `tcp-` port name) are passed through opaquely.
fn protocol_of(port_name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
    let tcp = matches!(app_protocol, Some("tcp" | "opaque"))
        || port_name.is_some_and(|n| n == "tcp" || n.starts_with("tcp-"));
    if tcp {
        Protocol::Tcp
    } else {
        Protocol::Http
    }
}

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

/// Order of precedence among conflicting objects: oldest first, then by namespace/name.
fn age_key<K: ResourceExt>(obj: &K, key: &ObjectKey) -> (Timestamp, ObjectKey) {
    let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::MAX);
    (created, key.clone())
}

/// A TrafficRoute that is valid and not in conflict, converted.
struct AcceptedRoute {
    key: ObjectKey,
    service: ObjectKey,
    route: Route,
}

fn accept_routes(
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
                DesiredStatus {
                    generation,
                    accepted: Cond::fail(
                        "Conflicted",
                        format!(
                            "host {}{port} is already routed by the older TrafficRoute {winner}; this route is not in force",
                            tr.spec.host
                        ),
                    ),
                    resolved_refs: resolve_route_refs(snapshot, &key, &service, tr),
                },
            );
            continue;
        }
        winners.insert(slot, key.clone());
        statuses.insert(
            status_ref,
            DesiredStatus {
                generation,
                accepted: Cond::ok("Accepted", format!("routes Service {service}")),
                resolved_refs: resolve_route_refs(snapshot, &key, &service, tr),
            },
        );
        accepted.push(AcceptedRoute { key, service, route });
    }
    accepted
}

/// Converts a TrafficRoute into its wire form, checking what the schema cannot (regexes compile
/// with the proxy's engine, durations parse).
fn convert_route(key: &ObjectKey, tr: &TrafficRoute) -> Result<Route, String> {
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

fn convert_match(m: &skein_api::crd::StringMatch, field: &str) -> Result<StringMatch, String> {
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

fn resolve_route_refs(snapshot: &Snapshot, key: &ObjectKey, service: &ObjectKey, tr: &TrafficRoute) -> Cond {
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

/// Labels of the ready endpoints of a Service (an endpoint without a known pod has none).
fn ready_endpoint_labels<'a>(
    snapshot: &'a Snapshot,
    service: &ObjectKey,
) -> Vec<&'a BTreeMap<String, String>> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    snapshot
        .slices
        .iter()
        .filter(|(k, s)| k.namespace == service.namespace && s.service == service.name)
        .flat_map(|(k, s)| s.endpoints.iter().map(move |e| (k, e)))
        .filter(|(_, e)| e.ready && seen.insert(e.address.clone()))
        .map(|(k, e)| {
            e.pod
                .as_ref()
                .and_then(|p| snapshot.pods.get(&ObjectKey::new(k.namespace.clone(), p.clone())))
                .map(|p| &p.labels)
                .unwrap_or(&EMPTY)
        })
        .collect()
}

fn endpoints_by_service(snapshot: &Snapshot) -> BTreeMap<ObjectKey, Vec<Endpoint>> {
    let mut by_service: BTreeMap<ObjectKey, BTreeMap<String, Endpoint>> = BTreeMap::new();
    for (key, slice) in &snapshot.slices {
        let service = ObjectKey::new(key.namespace.clone(), slice.service.clone());
        let endpoints = by_service.entry(service).or_default();
        for e in slice.endpoints.iter().filter(|e| e.ready) {
            let pod = e
                .pod
                .as_ref()
                .and_then(|p| snapshot.pods.get(&ObjectKey::new(key.namespace.clone(), p.clone())));
            let entry = endpoints.entry(e.address.clone()).or_insert_with(|| Endpoint {
                address: e.address.clone(),
                ports: BTreeMap::new(),
                labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                identity: pod.filter(|p| p.meshed).map(|p| p.identity(&key.namespace)),
            });
            entry.ports.extend(slice.ports.iter().map(|(k, v)| (k.clone(), *v)));
        }
    }
    by_service.into_iter().map(|(k, eps)| (k, eps.into_values().collect())).collect()
}

fn inbound_ports(snapshot: &Snapshot) -> BTreeMap<WorkloadIdentity, Vec<InboundPort>> {
    let mut inbound: BTreeMap<WorkloadIdentity, BTreeSet<InboundPort>> = BTreeMap::new();
    for (key, pod) in snapshot.pods.iter().filter(|(_, p)| p.meshed) {
        inbound.entry(pod.identity(&key.namespace)).or_default();
    }
    for (key, slice) in &snapshot.slices {
        for e in &slice.endpoints {
            let Some(pod) = e
                .pod
                .as_ref()
                .and_then(|p| snapshot.pods.get(&ObjectKey::new(key.namespace.clone(), p.clone())))
            else {
                continue;
            };
            if !pod.meshed {
                continue;
            }
            let ports = inbound.entry(pod.identity(&key.namespace)).or_default();
            for (name, port) in &slice.ports {
                ports.insert(InboundPort { port: *port, protocol: protocol_of(Some(name), None) });
            }
        }
    }
    inbound.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
}

/// What a policy attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Target {
    Service(ObjectKey),
    Route(ObjectKey),
}

/// The parts of a policy kind the attachment logic needs.
trait Policy<C>: ResourceExt {
    fn target_ref(&self) -> &PolicyTargetRef;
    fn convert(&self, key: &ObjectKey) -> Result<C, String>;
}

impl Policy<RetryConfig> for RetryPolicy {
    fn target_ref(&self) -> &PolicyTargetRef {
        &self.spec.target_ref
    }
    fn convert(&self, key: &ObjectKey) -> Result<RetryConfig, String> {
        let s = &self.spec;
        let ms = |field: &str, v: &str| parse_millis(v).map_err(|e| format!("spec.{field}: {e}"));
        let per_try_timeout_ms = s.per_try_timeout.as_deref().map(|v| ms("perTryTimeout", v)).transpose()?;
        let timeout_ms = s.timeout.as_deref().map(|v| ms("timeout", v)).transpose()?;
        if let (Some(p), Some(t)) = (per_try_timeout_ms, timeout_ms) {
            if p > t {
                return Err("spec.perTryTimeout must not exceed spec.timeout".into());
            }
        }
        if s.retry_on.contains(&skein_api::crd::retry_policy::RetryOn::RetriableStatusCodes)
            && s.retriable_status_codes.is_empty()
        {
            return Err("spec.retriableStatusCodes: must list at least one code when retryOn contains retriable-status-codes".into());
        }
        let backoff_base_ms = ms("backoff.baseInterval", &s.backoff.base_interval)?;
        let backoff_max_ms = ms("backoff.maxInterval", &s.backoff.max_interval)?;
        if backoff_base_ms > backoff_max_ms {
            return Err("spec.backoff.baseInterval must not exceed spec.backoff.maxInterval".into());
        }
        let retry_on = s
            .retry_on
            .iter()
            .map(|r| {
                serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            })
            .collect();
        Ok(RetryConfig {
            policy: key.to_string(),
            attempts: u32::try_from(s.attempts).map_err(|_| "spec.attempts must not be negative")?,
            per_try_timeout_ms,
            timeout_ms,
            retry_on,
            retriable_status_codes: s
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            backoff_base_ms,
            backoff_max_ms,
            budget_percent: u32::try_from(s.budget.percent).unwrap_or(0),
            budget_min_per_second: u32::try_from(s.budget.min_retries_per_second).unwrap_or(0),
            retry_non_idempotent: s.retry_non_idempotent,
        })
    }
}

impl Policy<OutlierConfig> for OutlierPolicy {
    fn target_ref(&self) -> &PolicyTargetRef {
        &self.spec.target_ref
    }
    fn convert(&self, key: &ObjectKey) -> Result<OutlierConfig, String> {
        let s = &self.spec;
        let ms = |field: &str, v: &str| parse_millis(v).map_err(|e| format!("spec.{field}: {e}"));
        let base_ejection_ms = ms("baseEjectionTime", &s.base_ejection_time)?;
        let max_ejection_ms = ms("maxEjectionTime", &s.max_ejection_time)?;
        if base_ejection_ms > max_ejection_ms {
            return Err("spec.baseEjectionTime must not exceed spec.maxEjectionTime".into());
        }
        let interval_ms = ms("interval", &s.interval)?;
        if interval_ms < 10 {
            return Err("spec.interval: interval must be at least 10ms".into());
        }
        Ok(OutlierConfig {
            policy: key.to_string(),
            consecutive_errors: u32::try_from(s.consecutive_errors).unwrap_or(1).max(1),
            interval_ms,
            base_ejection_ms,
            max_ejection_ms,
            max_ejection_percent: u32::try_from(s.max_ejection_percent).unwrap_or(0).min(100),
        })
    }
}

fn accept_policies<C: Clone, P: Policy<C>>(
    policies: &BTreeMap<ObjectKey, P>,
    kind: ResourceKind,
    snapshot: &Snapshot,
    routes: &[AcceptedRoute],
    statuses: &mut BTreeMap<ResourceRef, DesiredStatus>,
) -> BTreeMap<Target, C> {
    let mut valid = Vec::new();
    for (key, policy) in policies {
        let status_ref = ResourceRef { kind, key: key.clone() };
        let generation = policy.meta().generation.unwrap_or(0);
        let target = target_of(policy.target_ref(), &key.namespace);
        match target.and_then(|t| Ok((t, policy.convert(key)?))) {
            Ok((target, config)) => valid.push((age_key(policy, key), target, config, generation)),
            Err(message) => {
                statuses.insert(status_ref, DesiredStatus::invalid(generation, message));
            }
        }
    }
    valid.sort_by(|a, b| a.0.cmp(&b.0));
    let mut attached: BTreeMap<Target, (ObjectKey, C)> = BTreeMap::new();
    for ((_, key), target, config, generation) in valid {
        let resolved_refs = match &target {
            Target::Service(svc) if snapshot.services.contains_key(svc) => {
                Cond::ok("ResolvedRefs", format!("targets Service {svc}"))
            }
            Target::Service(svc) => Cond::fail("ServiceNotFound", format!("target Service {svc} not found")),
            Target::Route(r) if routes.iter().any(|a| &a.key == r) => {
                Cond::ok("ResolvedRefs", format!("targets TrafficRoute {r}"))
            }
            Target::Route(r) => {
                Cond::fail("RouteNotFound", format!("target TrafficRoute {r} not found or not accepted"))
            }
        };
        let accepted = match attached.get(&target) {
            Some((winner, _)) => Cond::fail(
                "Conflicted",
                format!(
                    "{} {winner} is older and already attached to the same target; this policy is not in force",
                    kind.as_str()
                ),
            ),
            None => {
                attached.insert(target, (key.clone(), config));
                Cond::ok("Accepted", "policy is valid and attached")
            }
        };
        statuses.insert(ResourceRef { kind, key }, DesiredStatus { generation, accepted, resolved_refs });
    }
    attached.into_iter().map(|(t, (_, c))| (t, c)).collect()
}

fn target_of(target: &PolicyTargetRef, namespace: &str) -> Result<Target, String> {
    let group = target.group.as_deref().unwrap_or_default();
    let key = ObjectKey::new(namespace, target.name.clone());
    match target.kind {
        TargetKind::Service if group.is_empty() || group == "core" => Ok(Target::Service(key)),
        TargetKind::TrafficRoute if group.is_empty() || group == skein_api::constants::GROUP => {
            Ok(Target::Route(key))
        }
        kind => Err(format!("spec.targetRef.group {group:?} does not serve kind {kind:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotObject;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    const CANARY: &str = r#"
apiVersion: skein.dev/v1alpha1
kind: TrafficRoute
metadata: {name: reviews, namespace: shop, generation: 2, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  host: reviews
  port: 9080
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
  rules:
    - match:
        headers: [{name: X-User-Group, exact: beta}]
      backends: [{subset: v2, weight: 100}]
    - backends:
        - {subset: v1, weight: 90}
        - {subset: v2, weight: 10}
      timeout: 10s
"#;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_saphyr::from_str(text).unwrap()
    }

    /// The canary's world: Service `shop/reviews` with one v1 and one v2 pod behind it.
    fn shop() -> Snapshot {
        let mut s = Snapshot::default();
        yaml::<TrafficRoute>(CANARY).apply(&mut s);
        yaml::<Service>(
            "metadata: {name: reviews, namespace: shop}\nspec: {ports: [{name: http, port: 9080}]}",
        )
        .apply(&mut s);
        for (pod, version, ip) in [("reviews-v1-0", "v1", "10.0.0.1"), ("reviews-v2-0", "v2", "10.0.0.2")] {
            yaml::<Pod>(&format!(
                "metadata: {{name: {pod}, namespace: shop, labels: {{app: reviews, version: {version}, skein.dev/inject: enabled}}}}\nspec: {{serviceAccountName: reviews, containers: []}}"
            ))
            .apply(&mut s);
            yaml::<EndpointSlice>(&format!(
                r#"
metadata: {{name: reviews-{version}, namespace: shop, labels: {{kubernetes.io/service-name: reviews}}}}
addressType: IPv4
ports: [{{name: http, port: 9080}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}}}}}]
"#
            ))
            .apply(&mut s);
        }
        s
    }

    fn tr(key: &str) -> ResourceRef {
        let (ns, name) = key.split_once('/').unwrap();
        ResourceRef { kind: ResourceKind::TrafficRoute, key: ObjectKey::new(ns, name) }
    }

    #[test]
    fn canary_becomes_header_rule_then_weighted_split() {
        let mesh = compute(&shop());
        let cfg = mesh.proxy_config(&WorkloadIdentity::new("shop", "productpage"));
        let dest = cfg.destination("reviews.shop.svc.cluster.local").expect("destination");
        assert_eq!(dest.endpoints.len(), 2);
        assert_eq!(dest.endpoints[0].identity, Some(WorkloadIdentity::new("shop", "reviews")));
        assert_eq!(dest.endpoints[0].ports.get("http"), Some(&9080));
        let route = &dest.routes[0];
        assert_eq!((route.name.as_str(), route.port, route.generation), ("shop/reviews", Some(9080), 2));

        let beta = &route.rules[0];
        assert_eq!(
            beta.headers,
            vec![HeaderMatch { name: "x-user-group".into(), value: StringMatch::Exact("beta".into()) }]
        );
        assert_eq!(beta.backends.len(), 1);
        assert!(matches!(&beta.backends[0].target, BackendTarget::Subset { name, .. } if name == "v2"));

        let split = &route.rules[1];
        assert!(split.headers.is_empty());
        let weights: Vec<(String, u32)> = split
            .backends
            .iter()
            .map(|b| match &b.target {
                BackendTarget::Subset { name, labels } => {
                    assert_eq!(labels.get("version"), Some(name));
                    (name.clone(), b.weight)
                }
                other => panic!("unexpected backend {other:?}"),
            })
            .collect();
        assert_eq!(weights, [("v1".to_string(), 90), ("v2".to_string(), 10)]);
        assert_eq!(split.timeout_ms, Some(10_000));

        let status = &mesh.statuses[&tr("shop/reviews")];
        assert!(status.accepted.status);
        assert_eq!(
            status.resolved_refs,
            Cond::ok("ResolvedRefs", "Service shop/reviews has 2 ready endpoints; subsets v1 (1), v2 (1)")
        );
    }

    #[test]
    fn version_is_a_content_hash() {
        let id = WorkloadIdentity::new("shop", "productpage");
        let a = compute(&shop()).proxy_config(&id);
        let b = compute(&shop()).proxy_config(&id);
        assert_eq!(a.version, b.version, "same content, same version");
        assert_eq!(a.version.len(), 12);

        let mut changed = shop();
        let route = changed.routes.values_mut().next().unwrap();
        route.spec.rules[1].backends[0].weight = 50;
        assert_ne!(compute(&changed).proxy_config(&id).version, a.version);
        assert_ne!(compute(&shop()).proxy_config(&WorkloadIdentity::new("shop", "other")).version, a.version);
    }

    #[test]
    fn the_older_route_wins_a_conflict_and_the_newer_names_it() {
        let mut s = shop();
        let mut newer: TrafficRoute = yaml(CANARY);
        newer.metadata.name = Some("reviews-b".into());
        newer.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-02-01T00:00:00Z".parse().unwrap(),
        ));
        newer.apply(&mut s);
        let mesh = compute(&s);
        let lost = &mesh.statuses[&tr("shop/reviews-b")].accepted;
        assert_eq!((lost.status, lost.reason.as_str()), (false, "Conflicted"));
        assert!(lost.message.contains("shop/reviews"), "{}", lost.message);
        assert!(mesh.statuses[&tr("shop/reviews")].accepted.status);
        let dest = &mesh.destinations[0];
        assert_eq!(dest.routes.len(), 1);
        assert_eq!(dest.routes[0].name, "shop/reviews");

        // An all-ports route for the same host does not conflict; the port-specific one comes first.
        let mut all_ports: TrafficRoute = yaml(CANARY);
        all_ports.metadata.name = Some("reviews-any".into());
        all_ports.spec.port = None;
        all_ports.apply(&mut s);
        let mesh = compute(&s);
        assert!(mesh.statuses[&tr("shop/reviews-any")].accepted.status);
        let names: Vec<&str> = mesh.destinations[0].routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["shop/reviews", "shop/reviews-any"]);
    }

    #[test]
    fn unresolved_references_are_reported_but_the_route_stays() {
        let mut s = shop();
        s.slices.retain(|k, _| k.name != "reviews-v2");
        let mesh = compute(&s);
        let refs = &mesh.statuses[&tr("shop/reviews")].resolved_refs;
        assert_eq!((refs.status, refs.reason.as_str()), (false, "SubsetEmpty"));
        assert!(refs.message.contains("subset v2 (version=v2)"), "{}", refs.message);
        assert_eq!(mesh.destinations[0].routes.len(), 1);

        s.services.clear();
        let refs = &compute(&s).statuses[&tr("shop/reviews")].resolved_refs;
        assert_eq!(
            (refs.reason.as_str(), refs.message.as_str()),
            ("ServiceNotFound", "Service shop/reviews not found")
        );
    }

    #[test]
    fn hosts_resolve_to_services() {
        assert_eq!(resolve_host("reviews", "shop").unwrap(), ObjectKey::new("shop", "reviews"));
        assert_eq!(resolve_host("reviews.books", "shop").unwrap(), ObjectKey::new("books", "reviews"));
        assert_eq!(
            resolve_host("reviews.books.svc.cluster.local", "shop").unwrap(),
            ObjectKey::new("books", "reviews")
        );
        assert!(resolve_host("www.example.com", "shop").is_err());
    }

    #[test]
    fn invalid_specs_are_not_accepted_and_name_the_field() {
        let mut s = shop();
        let route = s.routes.values_mut().next().unwrap();
        route.spec.rules[0].matches.as_mut().unwrap().headers[0].value =
            skein_api::crd::StringMatch { exact: None, prefix: None, regex: Some("(unclosed".into()) };
        let mesh = compute(&s);
        let accepted = &mesh.statuses[&tr("shop/reviews")].accepted;
        assert_eq!(accepted.reason, "Invalid");
        assert!(accepted.message.starts_with("spec.rules[0].match.headers[0].regex"), "{}", accepted.message);
        assert!(mesh.destinations[0].routes.is_empty(), "an invalid route is not in force");
    }

    #[test]
    fn policies_attach_to_services_and_routes_oldest_first() {
        let mut s = shop();
        yaml::<RetryPolicy>(
            "metadata: {name: a, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}\nspec: {targetRef: {kind: Service, name: reviews}, attempts: 3, perTryTimeout: 2s, timeout: 10s, retryOn: ['5xx']}",
        )
        .apply(&mut s);
        yaml::<RetryPolicy>(
            "metadata: {name: b, namespace: shop, creationTimestamp: '2026-03-01T00:00:00Z'}\nspec: {targetRef: {kind: Service, name: reviews}, attempts: 1, retryOn: ['reset']}",
        )
        .apply(&mut s);
        yaml::<OutlierPolicy>(
            "metadata: {name: o, namespace: shop}\nspec: {targetRef: {kind: TrafficRoute, name: reviews}, consecutiveErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionTime: 5m, maxEjectionPercent: 50}",
        )
        .apply(&mut s);
        yaml::<OutlierPolicy>(
            "metadata: {name: lost, namespace: shop}\nspec: {targetRef: {kind: Service, name: ratings}, consecutiveErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionTime: 5m, maxEjectionPercent: 50}",
        )
        .apply(&mut s);
        let mesh = compute(&s);
        let dest = &mesh.destinations[0];
        let retry = dest.retry.as_ref().expect("service retry policy");
        assert_eq!(
            (retry.policy.as_str(), retry.attempts, retry.per_try_timeout_ms),
            ("shop/a", 3, Some(2000))
        );
        assert_eq!(retry.retry_on, ["5xx"]);
        let outlier = dest.routes[0].outlier.as_ref().expect("route outlier policy");
        assert_eq!(
            (outlier.consecutive_errors, outlier.base_ejection_ms, outlier.max_ejection_ms),
            (3, 30_000, 300_000)
        );

        let rp = |n: &str| {
            &mesh.statuses[&ResourceRef { kind: ResourceKind::RetryPolicy, key: ObjectKey::new("shop", n) }]
        };
        assert!(rp("a").accepted.status);
        assert_eq!(rp("b").accepted.reason, "Conflicted");
        assert!(rp("b").accepted.message.contains("shop/a"));
        let lost = &mesh.statuses
            [&ResourceRef { kind: ResourceKind::OutlierPolicy, key: ObjectKey::new("shop", "lost") }];
        assert_eq!(lost.resolved_refs.reason, "ServiceNotFound");
    }

    #[test]
    fn meshed_workloads_get_their_inbound_ports() {
        let mesh = compute(&shop());
        let cfg = mesh.proxy_config(&WorkloadIdentity::new("shop", "reviews"));
        assert_eq!(cfg.inbound, vec![InboundPort { port: 9080, protocol: Protocol::Http }]);
    }
}
