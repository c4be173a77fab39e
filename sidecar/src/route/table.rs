//! The route table: a `ProxyConfig` compiled for the request path. Regexes are compiled once,
//! hosts and cluster IPs are indexed, and every (destination, port, route rule, backend) already
//! holds its endpoint [`Pool`] and metrics [`Series`], so deciding where a request goes takes no
//! lock and allocates nothing. A new config compiles into a new table that is swapped in whole;
//! requests in flight keep the table they started with.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method};
use regex::Regex;
use skein_api::config::{
    self, BackendTarget, Destination, LoadBalancer, OutlierConfig, Protocol, ProxyConfig, Route,
};
use skein_api::constants::{CLUSTER_DOMAIN, PROXY_INBOUND_PORT};
use skein_api::WorkloadIdentity;

use crate::balance::{EndpointState, Pool};
use crate::route::retry::{RetryBudget, RetrySettings};
use crate::telemetry::metrics::{Registry, Series, SeriesKey};

/// An upstream address and, for a meshed endpoint, its sidecar's address.
type EndpointKey = (SocketAddr, Option<(SocketAddr, WorkloadIdentity)>);

/// State that outlives a route table: endpoint state, metric series, retry budgets.
#[derive(Debug, Default)]
pub struct Shared {
    endpoints: Mutex<HashMap<EndpointKey, Arc<EndpointState>>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    pub metrics: Registry,
}

impl Shared {
    /// The state of an upstream address, shared by every table that names it.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        self.endpoint_via(addr, None)
    }

    /// The state of an upstream address reached through the sidecar at `proxy`.
    pub fn endpoint_via(
        &self,
        addr: SocketAddr,
        proxy: Option<(SocketAddr, WorkloadIdentity)>,
    ) -> Arc<EndpointState> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((addr, proxy.clone()))
            .or_insert_with(|| {
                let (via, identity) = proxy.map_or((None, None), |(a, i)| (Some(a), Some(i)));
                Arc::new(EndpointState::with_proxy(addr, via, identity))
            })
            .clone()
    }

    fn retry(&self, config: &config::RetryConfig) -> Arc<RetrySettings> {
        let budget = self
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(config.policy.clone())
            .or_insert_with(|| {
                Arc::new(RetryBudget::new(config.budget_percent, config.budget_min_per_second))
            })
            .clone();
        Arc::new(RetrySettings::compile(config, budget))
    }

    /// Forgets endpoints no table refers to any more.
    fn prune(&self) {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, e| Arc::strong_count(e) > 1);
    }
}

/// Where a request goes.
#[derive(Debug, Clone)]
pub struct Target {
    pub pool: Arc<Pool>,
    pub series: Arc<Series>,
    pub timeout: Option<Duration>,
    pub retry: Option<Arc<RetrySettings>>,
    /// `http` or opaque `tcp`.
    pub protocol: Protocol,
}

/// Why a request has no target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoTarget {
    /// Not a mesh destination: pass it through to where the client sent it.
    Passthrough,
    /// A mesh Service without the requested port.
    NoSuchPort { destination: String, port: u16 },
    /// A route exists for the port but no rule matched.
    NoRuleMatched { route: String },
}

/// What route matching reads of a request: hyper's parsed request, or the HTTP/1 fast path's
/// head parsed in place.
pub trait RequestView {
    fn method(&self) -> &str;
    /// The path without the query.
    fn path(&self) -> &str;
    /// Whether any value of header `name` satisfies `f`.
    fn any_header(&self, name: &HeaderName, f: &mut dyn FnMut(&str) -> bool) -> bool;
}

impl RequestView for Parts {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn any_header(&self, name: &HeaderName, f: &mut dyn FnMut(&str) -> bool) -> bool {
        self.headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(&mut *f))
    }
}

#[derive(Debug)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn compile(m: &config::StringMatch) -> Result<Self, String> {
        Ok(match m {
            config::StringMatch::Exact(v) => Self::Exact(v.clone()),
            config::StringMatch::Prefix(v) => Self::Prefix(v.clone()),
            // Anchored: the whole value must match, as in Envoy and Gateway API.
            config::StringMatch::Regex(v) => {
                Self::Regex(Regex::new(&format!("^(?:{v})$")).map_err(|e| e.to_string())?)
            }
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => value == v,
            Self::Prefix(v) => value.starts_with(v.as_str()),
            Self::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Debug)]
struct Rule {
    headers: Vec<(HeaderName, Matcher)>,
    path: Option<Matcher>,
    method: Option<Method>,
    /// Cumulative weights and their targets; zero-weight backends are dropped.
    backends: Vec<(u32, Target)>,
    total: u32,
}

impl Rule {
    fn matches(&self, req: &impl RequestView) -> bool {
        if self.method.as_ref().is_some_and(|m| m.as_str() != req.method()) {
            return false;
        }
        if let Some(path) = &self.path {
            if !path.matches(req.path()) {
                return false;
            }
        }
        self.headers.iter().all(|(name, m)| req.any_header(name, &mut |v| m.matches(v)))
    }

    fn pick(&self) -> &Target {
        if self.backends.len() == 1 {
            return &self.backends[0].1;
        }
        let n = fastrand::u32(..self.total);
        &self.backends.iter().find(|(cumulative, _)| n < *cumulative).expect("n < total").1
    }
}

#[derive(Debug)]
struct CompiledRoute {
    name: String,
    rules: Vec<Rule>,
}

/// One Service port of a destination.
#[derive(Debug)]
struct PortTable {
    port: u16,
    /// Every endpoint, when no route applies.
    default: Target,
    route: Option<CompiledRoute>,
}

#[derive(Debug)]
struct CompiledDestination {
    label: String,
    ports: Vec<PortTable>,
}

impl CompiledDestination {
    fn port(&self, port: Option<u16>) -> Option<&PortTable> {
        match port {
            Some(p) => self.ports.iter().find(|t| t.port == p),
            None if self.ports.len() == 1 => self.ports.first(),
            None => self.ports.iter().find(|t| t.port == 80),
        }
    }
}

/// A compiled `ProxyConfig`.
#[derive(Debug)]
pub struct RouteTable {
    pub version: String,
    destinations: Vec<CompiledDestination>,
    hosts: HashMap<String, usize>,
    addresses: HashMap<IpAddr, usize>,
}

impl RouteTable {
    /// Compiles a config; fails (and the caller keeps its last good table) on what validation
    /// could not see, such as a regex the proxy's engine refuses.
    pub fn compile(config: &ProxyConfig, shared: &Shared) -> Result<Self, String> {
        let own_namespace = config.identity.as_ref().map(|i| i.namespace.as_str());
        let mut hosts = HashMap::new();
        let mut addresses = HashMap::new();
        let index: HashMap<(&str, &str), &Destination> =
            config.destinations.iter().map(|d| ((d.namespace.as_str(), d.name.as_str()), d)).collect();
        let mut destinations = Vec::with_capacity(config.destinations.len());
        for (i, d) in config.destinations.iter().enumerate() {
            for h in &d.hosts {
                hosts.insert(h.to_ascii_lowercase(), i);
            }
            hosts.insert(format!("{}.{}.svc.{CLUSTER_DOMAIN}", d.name, d.namespace), i);
            if own_namespace == Some(d.namespace.as_str()) {
                hosts.insert(d.name.clone(), i);
            }
            for a in &d.addresses {
                if let Ok(ip) = a.parse() {
                    addresses.insert(ip, i);
                }
            }
            destinations.push(
                compile_destination(d, &index, shared)
                    .map_err(|e| format!("destination {}/{}: {e}", d.namespace, d.name))?,
            );
        }
        shared.prune();
        Ok(Self { version: config.version.clone(), destinations, hosts, addresses })
    }

    /// Finds the destination for a request's authority (`host[:port]`) or, for transparently
    /// captured traffic, its original destination address.
    pub fn resolve(
        &self,
        host: Option<&str>,
        port: Option<u16>,
        original: Option<SocketAddr>,
        req: &impl RequestView,
    ) -> Result<&Target, NoTarget> {
        let by_host = host.and_then(|h| {
            let h = h.trim_end_matches('.');
            // Hosts are almost always lower case already: look up without allocating.
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                self.hosts.get(h.to_ascii_lowercase().as_str())
            } else {
                self.hosts.get(h)
            }
        });
        let by_addr = || original.and_then(|a| self.addresses.get(&a.ip()));
        let Some(&i) = by_host.or_else(by_addr) else { return Err(NoTarget::Passthrough) };
        let d = &self.destinations[i];
        let port = port.or(original.map(|a| a.port()));
        let table = d
            .port(port)
            .ok_or(NoTarget::NoSuchPort { destination: d.label.clone(), port: port.unwrap_or(80) })?;
        let Some(route) = &table.route else { return Ok(&table.default) };
        route
            .rules
            .iter()
            .find(|r| r.matches(req))
            .map(Rule::pick)
            .ok_or_else(|| NoTarget::NoRuleMatched { route: route.name.clone() })
    }

    /// Protocol of a destination port reached by its original address (transparent mode).
    pub fn protocol_of(&self, original: SocketAddr) -> Option<Protocol> {
        let &i = self.addresses.get(&original.ip())?;
        self.destinations[i].port(Some(original.port())).map(|t| t.default.protocol)
    }
}

fn compile_destination(
    d: &Destination,
    index: &HashMap<(&str, &str), &Destination>,
    shared: &Shared,
) -> Result<CompiledDestination, String> {
    let label = format!("{}.{}", d.name, d.namespace);
    let mut ports = Vec::with_capacity(d.ports.len());
    for sp in &d.ports {
        let route = d
            .routes
            .iter()
            .find(|r| r.port == Some(sp.port))
            .or_else(|| d.routes.iter().find(|r| r.port.is_none()));
        let retry = route.and_then(|r| r.retry.as_ref()).or(d.retry.as_ref()).map(|r| shared.retry(r));
        let outlier = route.and_then(|r| r.outlier.clone()).or_else(|| d.outlier.clone());
        let route_label = route.map(|r| r.name.clone()).unwrap_or_default();
        let endpoints = endpoints_for(d, sp, |_| true, shared);
        let default = Target {
            pool: Arc::new(Pool::new(endpoints, d.load_balancer, outlier.clone())),
            series: shared.metrics.series(SeriesKey {
                direction: "outbound",
                destination: label.clone(),
                subset: String::new(),
                route: route_label,
            }),
            timeout: None,
            retry: retry.clone(),
            protocol: sp.protocol,
        };
        let route = route.map(|r| compile_route(r, d, sp, index, retry, outlier, shared)).transpose()?;
        ports.push(PortTable { port: sp.port, default, route });
    }
    Ok(CompiledDestination { label, ports })
}

fn endpoints_for(
    d: &Destination,
    sp: &config::ServicePort,
    keep: impl Fn(&BTreeMap<String, String>) -> bool,
    shared: &Shared,
) -> Arc<[Arc<EndpointState>]> {
    let name = sp.name.clone().unwrap_or_default();
    d.endpoints
        .iter()
        .filter(|e| keep(&e.labels))
        .filter_map(|e| {
            // The endpoint's port for this Service port: by name, else the only one, else the
            // Service port itself.
            let port = e
                .ports
                .get(&name)
                .copied()
                .or_else(|| (e.ports.len() == 1).then(|| *e.ports.values().next().expect("one")));
            let ip: IpAddr = e.address.parse().ok()?;
            // A meshed endpoint is reached through its sidecar's inbound listener.
            let proxy = e.identity.as_ref().map(|id| (SocketAddr::new(ip, PROXY_INBOUND_PORT), id.clone()));
            Some(shared.endpoint_via(SocketAddr::new(ip, port.unwrap_or(sp.port)), proxy))
        })
        .collect()
}

fn compile_route(
    r: &Route,
    d: &Destination,
    sp: &config::ServicePort,
    index: &HashMap<(&str, &str), &Destination>,
    retry: Option<Arc<RetrySettings>>,
    outlier: Option<OutlierConfig>,
    shared: &Shared,
) -> Result<CompiledRoute, String> {
    let mut rules = Vec::with_capacity(r.rules.len());
    for rule in &r.rules {
        let headers = rule
            .headers
            .iter()
            .map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|e| format!("header {:?}: {e}", h.name))?;
                Ok((name, Matcher::compile(&h.value)?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let path = rule.path.as_ref().map(Matcher::compile).transpose()?;
        let method = rule
            .method
            .as_deref()
            .map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string()))
            .transpose()?;
        let timeout = rule.timeout_ms.map(Duration::from_millis);
        let mut backends = Vec::new();
        let mut total = 0u32;
        for b in rule.backends.iter().filter(|b| b.weight > 0) {
            let (endpoints, lb, subset, destination, protocol) = match &b.target {
                BackendTarget::Subset { name, labels } => {
                    let keep = |l: &BTreeMap<String, String>| labels.iter().all(|(k, v)| l.get(k) == Some(v));
                    (
                        endpoints_for(d, sp, keep, shared),
                        d.load_balancer,
                        name.clone(),
                        format!("{}.{}", d.name, d.namespace),
                        sp.protocol,
                    )
                }
                BackendTarget::Service { namespace, name, port } => {
                    let other = index.get(&(namespace.as_str(), name.as_str()));
                    let want = port.unwrap_or(sp.port);
                    let other_port =
                        other.and_then(|o| o.ports.iter().find(|p| p.port == want).or(o.ports.first()));
                    let endpoints = match (other, other_port) {
                        (Some(o), Some(p)) => endpoints_for(o, p, |_| true, shared),
                        _ => Arc::from(Vec::new()),
                    };
                    let lb = other.map(|o| o.load_balancer).unwrap_or(LoadBalancer::P2cEwma);
                    (endpoints, lb, String::new(), format!("{name}.{namespace}"), sp.protocol)
                }
            };
            total = total.checked_add(b.weight).ok_or("weights overflow")?;
            let target = Target {
                pool: Arc::new(Pool::new(endpoints, lb, outlier.clone())),
                series: shared.metrics.series(SeriesKey {
                    direction: "outbound",
                    destination,
                    subset,
                    route: r.name.clone(),
                }),
                timeout,
                retry: retry.clone(),
                protocol,
            };
            backends.push((total, target));
        }
        if total == 0 {
            return Err(format!("route {}: a rule's weights sum to 0", r.name));
        }
        rules.push(Rule { headers, path, method, backends, total });
    }
    Ok(CompiledRoute { name: r.name.clone(), rules })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use skein_api::config::*;
    use skein_api::WorkloadIdentity;

    fn endpoint(ip: &str, version: &str) -> Endpoint {
        Endpoint {
            address: ip.into(),
            ports: [("http".to_string(), 9080)].into(),
            labels: [("version".to_string(), version.to_string())].into(),
            identity: None,
        }
    }

    fn subset(name: &str, weight: u32) -> WeightedBackend {
        WeightedBackend {
            weight,
            target: BackendTarget::Subset {
                name: name.into(),
                labels: [("version".to_string(), name.to_string())].into(),
            },
        }
    }

    /// The canary: `x-user-group: beta` → v2, else 90/10.
    pub(crate) fn canary() -> ProxyConfig {
        ProxyConfig {
            version: "v1".into(),
            identity: Some(WorkloadIdentity::new("shop", "productpage")),
            destinations: vec![Destination {
                namespace: "shop".into(),
                name: "reviews".into(),
                hosts: vec!["reviews.shop".into(), "reviews.shop.svc".into()],
                addresses: vec!["10.96.0.10".into()],
                ports: vec![ServicePort { name: Some("http".into()), port: 9080, protocol: Protocol::Http }],
                load_balancer: LoadBalancer::P2cEwma,
                endpoints: vec![endpoint("10.0.0.1", "v1"), endpoint("10.0.0.2", "v2")],
                routes: vec![Route {
                    name: "shop/reviews".into(),
                    generation: 1,
                    port: None,
                    rules: vec![
                        RouteRule {
                            headers: vec![HeaderMatch {
                                name: "x-user-group".into(),
                                value: StringMatch::Exact("beta".into()),
                            }],
                            backends: vec![subset("v2", 100)],
                            ..Default::default()
                        },
                        RouteRule {
                            path: Some(StringMatch::Regex("/api/v[0-9]+/.*".into())),
                            method: Some("POST".into()),
                            backends: vec![subset("v1", 1)],
                            timeout_ms: Some(500),
                            ..Default::default()
                        },
                        RouteRule {
                            backends: vec![subset("v1", 90), subset("v2", 10)],
                            ..Default::default()
                        },
                    ],
                    retry: None,
                    outlier: None,
                }],
                retry: None,
                outlier: None,
            }],
            inbound: vec![],
            authz: Default::default(),
        }
    }

    fn parts(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn subset_of(t: &Target) -> String {
        let ip = t.pool.endpoints[0].addr.ip().to_string();
        if ip == "10.0.0.1" { "v1" } else { "v2" }.to_string()
    }

    #[test]
    fn header_rule_then_path_and_method_then_split() {
        let shared = Shared::default();
        let table = RouteTable::compile(&canary(), &shared).unwrap();
        let beta = parts("GET", "/", &[("x-user-group", "beta")]);
        for host in ["reviews", "reviews.shop", "reviews.shop.svc.cluster.local", "REVIEWS.shop.svc."] {
            let t = table.resolve(Some(host), Some(9080), None, &beta).unwrap();
            assert_eq!(subset_of(t), "v2", "{host}");
        }
        let api = parts("POST", "/api/v2/items", &[]);
        let t = table.resolve(Some("reviews"), None, None, &api).unwrap();
        assert_eq!((subset_of(t).as_str(), t.timeout), ("v1", Some(Duration::from_millis(500))));
        // Regex is anchored: a longer path prefix does not match.
        let not_api = parts("POST", "/x/api/v2/items", &[]);
        assert!(table.resolve(Some("reviews"), None, None, &not_api).unwrap().timeout.is_none());
    }

    #[test]
    fn weighted_split_follows_the_weights() {
        let shared = Shared::default();
        let table = RouteTable::compile(&canary(), &shared).unwrap();
        let req = parts("GET", "/", &[]);
        let n = 20_000;
        let v2 = (0..n)
            .filter(|_| subset_of(table.resolve(Some("reviews"), None, None, &req).unwrap()) == "v2")
            .count();
        // Binomial(20000, 0.1): sd ≈ 42; ±5 sd.
        assert!((1790..=2210).contains(&v2), "v2 got {v2} of {n}");
    }

    #[test]
    fn unknown_hosts_pass_through_and_cluster_ips_resolve() {
        let shared = Shared::default();
        let table = RouteTable::compile(&canary(), &shared).unwrap();
        let req = parts("GET", "/", &[]);
        assert_eq!(table.resolve(Some("example.com"), None, None, &req).unwrap_err(), NoTarget::Passthrough);
        let original = "10.96.0.10:9080".parse().unwrap();
        assert!(table.resolve(None, None, Some(original), &req).is_ok());
        assert_eq!(table.protocol_of(original), Some(Protocol::Http));
        assert_eq!(
            table.resolve(Some("reviews"), Some(1234), None, &req).unwrap_err(),
            NoTarget::NoSuchPort { destination: "reviews.shop".into(), port: 1234 }
        );
    }

    #[test]
    fn endpoint_state_survives_a_recompile() {
        let shared = Shared::default();
        let a = RouteTable::compile(&canary(), &shared).unwrap();
        let req = parts("GET", "/", &[("x-user-group", "beta")]);
        let before = a.resolve(Some("reviews"), None, None, &req).unwrap().pool.endpoints[0].clone();
        let mut changed = canary();
        changed.version = "v2".into();
        let b = RouteTable::compile(&changed, &shared).unwrap();
        let after = b.resolve(Some("reviews"), None, None, &req).unwrap().pool.endpoints[0].clone();
        assert!(Arc::ptr_eq(&before, &after));
    }

    #[test]
    fn a_bad_regex_fails_compilation() {
        let mut cfg = canary();
        cfg.destinations[0].routes[0].rules[1].path = Some(StringMatch::Regex("(".into()));
        assert!(RouteTable::compile(&cfg, &Shared::default())
            .unwrap_err()
            .contains("destination shop/reviews"));
    }
}
