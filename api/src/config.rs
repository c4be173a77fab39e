//! `ProxyConfig`: everything one sidecar needs, computed by the operator per workload identity
//! and pushed over the config stream; and `StreamAck`, the sidecar's answer.
//!
//! Wire rules: durations are milliseconds, lists are sorted by the operator so that equal
//! content serializes to equal bytes, and `version` is a hash of that content.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A workload identity: the namespace and service account its pods run as.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    pub namespace: String,
    pub service_account: String,
}

impl WorkloadIdentity {
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), service_account: service_account.into() }
    }

    /// The SPIFFE ID of this identity in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

/// Reads `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` into its three parts,
/// the namespace a DNS label and the service account a DNS subdomain, as Kubernetes names
/// them; `None` for any other shape (no workload of the mesh).
pub fn spiffe_parts(id: &str) -> Option<(&str, &str, &str)> {
    let (domain, path) = id.strip_prefix("spiffe://")?.split_once('/')?;
    let mut parts = path.split('/');
    let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (!domain.is_empty() && is_dns_label(ns) && is_dns_subdomain(sa)).then_some((domain, ns, sa))
}

impl std::fmt::Display for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

impl std::str::FromStr for WorkloadIdentity {
    type Err = String;

    /// Parses `<namespace>/<service-account>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, sa)) if is_dns_label(ns) && is_dns_subdomain(sa) => Ok(Self::new(ns, sa)),
            _ => Err(format!("identity {s:?} must be <namespace>/<service-account>")),
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The configuration of one sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Content hash of everything below; equal content, equal version.
    pub version: String,
    /// Whose sidecar this is.
    pub identity: Option<WorkloadIdentity>,
    /// Every Service this workload may call, sorted by namespace and name.
    #[serde(default)]
    pub destinations: Vec<Destination>,
    /// The workload's own ports the inbound listener serves.
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
    /// Who may call this workload (`AccessPolicy`), enforced by its inbound listener.
    #[serde(default)]
    pub authz: crate::authz::InboundAuthz,
}

impl ProxyConfig {
    /// Checks what serde cannot: the invariants a sidecar relies on before putting a config in
    /// force. A config that fails is refused and the last good one stays.
    pub fn validate(&self) -> Result<(), String> {
        if self.version.is_empty() {
            return Err("config has no version".into());
        }
        for d in &self.destinations {
            let name = format!("{}/{}", d.namespace, d.name);
            for r in &d.routes {
                if r.rules.is_empty() {
                    return Err(format!("destination {name}: route {} has no rules", r.name));
                }
                for rule in &r.rules {
                    if rule.backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() == 0 {
                        return Err(format!(
                            "destination {name}: route {} has a rule whose weights sum to 0",
                            r.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Finds the destination a host name (`reviews`, `reviews.shop`, an FQDN) refers to.
    pub fn destination(&self, host: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.hosts.iter().any(|h| h == host))
    }
}

/// A Service the workload may call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub namespace: String,
    pub name: String,
    /// Host names that reach this Service: `name.ns`, `name.ns.svc`, the FQDN, and the bare
    /// name for callers in the same namespace is resolved by the proxy.
    pub hosts: Vec<String>,
    /// The Service's cluster IPs, by which transparently captured traffic is recognised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    /// How requests are spread over the endpoints.
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// Ready endpoints, sorted by address.
    pub endpoints: Vec<Endpoint>,
    /// Routes for this Service, port-specific ones first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierConfig>,
}

/// One Service port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// `http` (the default: HTTP/1.1 or HTTP/2 is detected) or `tcp` (opaque passthrough).
    pub protocol: Protocol,
}

/// Load-balancing algorithm of a destination (Service annotation `skein.dev/load-balancer`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancer {
    /// Power of two choices over a peak-EWMA of latency × in-flight requests.
    #[default]
    P2cEwma,
    /// Every endpoint in turn.
    RoundRobin,
}

/// How a port's traffic is handled.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

/// One endpoint of a Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub address: String,
    /// Target port per Service port name (empty name for an unnamed port).
    pub ports: BTreeMap<String, u16>,
    /// Labels of the pod behind the endpoint (subsets select on them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The endpoint's workload identity, when it is a meshed pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<WorkloadIdentity>,
}

/// A TrafficRoute in force for a destination.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// `<namespace>/<name>` of the TrafficRoute.
    pub name: String,
    /// The generation of the TrafficRoute this was computed from.
    pub generation: i64,
    /// The Service port it applies to; every port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub rules: Vec<RouteRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierConfig>,
}

/// A rule: all matches hold → pick a backend by weight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub backends: Vec<WeightedBackend>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A header condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Lower-cased header name.
    pub name: String,
    pub value: StringMatch,
}

/// How a string must match.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// A backend with its weight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WeightedBackend {
    pub weight: u32,
    pub target: BackendTarget,
}

/// Where a backend sends traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BackendTarget {
    /// The destination's endpoints that carry all these labels (the subset's name is kept for
    /// metrics).
    Subset { name: String, labels: BTreeMap<String, String> },
    /// Another Service, by namespace and name, on `port` or the request's own port.
    Service {
        namespace: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
}

/// Retries, resolved from a RetryPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// `<namespace>/<name>` of the RetryPolicy.
    pub policy: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// As in the RetryPolicy: `5xx`, `gateway-error`, `reset`, `refused`, `connect-failure`,
    /// `retriable-status-codes`.
    pub retry_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub budget_percent: u32,
    pub budget_min_per_second: u32,
    pub retry_non_idempotent: bool,
}

/// Outlier detection, resolved from an OutlierPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierConfig {
    /// `<namespace>/<name>` of the OutlierPolicy.
    pub policy: String,
    pub consecutive_errors: u32,
    pub interval_ms: u64,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

/// A port of the workload itself that the inbound listener serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct InboundPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// A change to the config a proxy holds, sent instead of the whole config to a proxy that asked
/// for deltas ([`crate::constants::DELTA_HEADER`]): the destinations that are new or changed,
/// whole, and those gone; the proxy's own parts (small) always. It applies to the config of
/// version `base` only. On the wire it is one line `{"delta":{…}}` ([`DELTA_PREFIX`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDelta {
    pub base: String,
    pub version: String,
    #[serde(default)]
    pub upsert: Vec<Destination>,
    /// `[namespace, name]` of each destination gone.
    #[serde(default)]
    pub remove: Vec<(String, String)>,
    #[serde(default)]
    pub inbound: Vec<InboundPort>,
    #[serde(default)]
    pub authz: crate::authz::InboundAuthz,
}

/// How a delta line starts (a whole config starts otherwise).
pub const DELTA_PREFIX: &[u8] = b"{\"delta\":";

/// The wire form of a [`ConfigDelta`].
#[derive(Serialize, Deserialize, Debug)]
pub struct DeltaLine {
    pub delta: ConfigDelta,
}

impl ConfigDelta {
    /// The config `base` becomes; an error when `base` is not the version this delta is for.
    pub fn apply_to(self, base: &ProxyConfig) -> Result<ProxyConfig, String> {
        if base.version != self.base {
            return Err(format!("the delta is for config {}, this proxy holds {}", self.base, base.version));
        }
        let replaced: std::collections::HashSet<(&str, &str)> = self
            .remove
            .iter()
            .map(|(ns, name)| (ns.as_str(), name.as_str()))
            .chain(self.upsert.iter().map(|d| (d.namespace.as_str(), d.name.as_str())))
            .collect();
        let mut destinations: Vec<Destination> = base
            .destinations
            .iter()
            .filter(|d| !replaced.contains(&(d.namespace.as_str(), d.name.as_str())))
            .cloned()
            .collect();
        destinations.extend(self.upsert);
        destinations.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(ProxyConfig {
            version: self.version,
            identity: base.identity.clone(),
            destinations,
            inbound: self.inbound,
            authz: self.authz,
        })
    }
}

/// What a sidecar sends back on the config stream for every config it received: one JSON object
/// per line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StreamAck {
    /// The version the sidecar received.
    pub version: String,
    /// Why the sidecar refused it; absent when it was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Upper bounds, in seconds, of the latency buckets sidecars count requests in (the last bucket
/// is everything above), in their metrics and in their traffic reports alike.
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// What a sidecar sends every few seconds on the config stream besides its acknowledgements: the
/// cumulative counters of its outbound requests, one entry per destination service and subset.
/// The operator derives the mesh topology (rates, error rates, latency, mTLS) from the
/// differences between successive reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficReport {
    pub edges: Vec<EdgeCounters>,
}

/// Counters of the requests one sidecar sent to one destination service (and subset) since it
/// started.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeCounters {
    /// `<name>.<namespace>` of the destination Service (`passthrough` for unknown hosts).
    pub destination: String,
    /// The TrafficRoute subset, empty when no route picked one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subset: String,
    pub requests: u64,
    /// Requests answered 5xx (by the destination or by the sidecar on its behalf).
    pub errors: u64,
    /// Requests whose answer came over mTLS from the destination's sidecar.
    pub mtls: u64,
    /// Requests whose answer came in plaintext from the destination (answers the sidecar made
    /// itself, such as timeouts, are neither).
    #[serde(default)]
    pub plaintext: u64,
    pub retries: u64,
    pub ejections: u64,
    /// Requests the destination's sidecar denied (403 by an `AccessPolicy` or its namespace
    /// default).
    #[serde(default)]
    pub denied: u64,
    /// Requests per latency bucket (not cumulative): one count per bound of
    /// [`LATENCY_BUCKETS_SECONDS`] plus one for the overflow.
    pub latency_buckets: Vec<u64>,
}

/// One line a sidecar sends on the config stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum ProxyMessage {
    Traffic { traffic: TrafficReport },
    Ack(StreamAck),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_messages_tell_acks_from_traffic() {
        let ack: ProxyMessage = serde_json::from_str(r#"{"version":"abc"}"#).unwrap();
        assert_eq!(ack, ProxyMessage::Ack(StreamAck { version: "abc".into(), error: None }));
        let traffic = ProxyMessage::Traffic {
            traffic: TrafficReport {
                edges: vec![EdgeCounters {
                    destination: "reviews.shop".into(),
                    requests: 3,
                    ..Default::default()
                }],
            },
        };
        let line = serde_json::to_string(&traffic).unwrap();
        assert!(line.starts_with(r#"{"traffic":{"edges":[{"destination":"reviews.shop","#), "{line}");
        assert_eq!(serde_json::from_str::<ProxyMessage>(&line).unwrap(), traffic);
        assert!(serde_json::from_str::<ProxyMessage>(r#"{"what":1}"#).is_err());
    }

    #[test]
    fn identity_round_trips() {
        let id: WorkloadIdentity = "shop/reviews".parse().unwrap();
        assert_eq!(id, WorkloadIdentity::new("shop", "reviews"));
        assert_eq!(id.to_string(), "shop/reviews");
        assert_eq!(id.spiffe_id("cluster.local"), "spiffe://cluster.local/ns/shop/sa/reviews");
        for bad in ["shop", "/x", "shop/", "Shop/x", "a/b/c"] {
            assert!(bad.parse::<WorkloadIdentity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_refuses_zero_weight_rules() {
        let mut cfg = ProxyConfig { version: "abc".into(), ..Default::default() };
        assert!(cfg.validate().is_ok());
        cfg.destinations.push(Destination {
            namespace: "ns".into(),
            name: "svc".into(),
            routes: vec![Route {
                name: "ns/r".into(),
                rules: vec![RouteRule {
                    backends: vec![WeightedBackend {
                        weight: 0,
                        target: BackendTarget::Service {
                            namespace: "ns".into(),
                            name: "x".into(),
                            port: None,
                        },
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(cfg.validate().unwrap_err().contains("weights sum to 0"));
        cfg.version.clear();
        assert!(cfg.validate().is_err());
    }
}
