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

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use skein_api::config::{Destination, InboundPort, Protocol, ProxyConfig, Route, ServicePort};
use skein_api::constants::CLUSTER_DOMAIN;
use skein_api::WorkloadIdentity;

pub mod access;
mod endpoints;
mod policies;
mod routes;
pub mod snapshot;
pub mod status;

use crate::compute::snapshot::{ObjectKey, Snapshot};
use endpoints::{endpoints_by_service, inbound_ports};
use policies::{accept_policies, Target};
use routes::accept_routes;

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

/// Order of precedence among conflicting objects: oldest first, then by namespace/name.
fn age_key<K: ResourceExt>(obj: &K, key: &ObjectKey) -> (Timestamp, ObjectKey) {
    let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::MAX);
    (created, key.clone())
}

#[cfg(test)]
mod tests {
    use super::routes::resolve_host;
    use super::*;
    use crate::compute::snapshot::SnapshotObject;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use skein_api::config::{BackendTarget, HeaderMatch, StringMatch};
    use skein_api::{OutlierPolicy, RetryPolicy, TrafficRoute};

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
