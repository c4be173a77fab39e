//! The live service graph, derived from the traffic reports proxies send on the config stream:
//! workloads call services, services split into subsets, and every edge carries its request
//! rate, error rate, p99 latency and whether the hop is mTLS over the last [`WINDOW`].
//!
//! A proxy sends its cumulative counters only when they changed, so the counters at a moment are
//! those of the last report before it; rates are the difference between the counters now and at
//! the start of the window, divided by the time between. Served as JSON at `/topology.json` and
//! drawn by the page at `/topology` (both on the operator's 8080 port).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use skein_api::config::LATENCY_BUCKETS_SECONDS;
use skein_api::topology::{Edge, Node, ProxyState, Topology};
use skein_api::{EdgeCounters, TrafficReport, WorkloadIdentity};

/// The span rates are measured over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The page, bundled into the binary: plain HTML and JavaScript, no CDN.
pub const PAGE: &str = include_str!("topology.html");

/// The reports one connected proxy sent within the window (and the last one before it).
#[derive(Debug, Default)]
pub struct TrafficSamples {
    samples: VecDeque<(Instant, TrafficReport)>,
}

impl TrafficSamples {
    /// Records a report received at `at`, forgetting those no longer needed.
    pub fn record(&mut self, at: Instant, report: TrafficReport) {
        self.samples.push_back((at, report));
        self.prune(at);
    }

    fn prune(&mut self, now: Instant) {
        let Some(start) = now.checked_sub(WINDOW) else { return };
        while self.samples.len() >= 2 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
    }

    /// The counters at the start of the window (or of the first report, if later), how long
    /// ago that was, and the counters now.
    fn window(&self, now: Instant) -> Option<(&TrafficReport, Duration, &TrafficReport)> {
        let (_, latest) = self.samples.back()?;
        let start = now.checked_sub(WINDOW);
        let (at, base) = self
            .samples
            .iter()
            .rev()
            .find(|(at, _)| start.is_some_and(|s| *at <= s))
            .or(self.samples.front())?;
        let span = match start {
            Some(s) if *at <= s => WINDOW,
            _ => now.saturating_duration_since(*at),
        };
        Some((base, span, latest))
    }
}

/// What the hub knows of one connected proxy.
#[derive(Debug)]
pub struct ProxyTraffic<'a> {
    pub identity: &'a WorkloadIdentity,
    pub proxy_id: &'a str,
    pub acked: Option<&'a str>,
    /// The version this proxy's identity should be at.
    pub desired: Option<String>,
    pub samples: &'a TrafficSamples,
}

/// Counters summed over proxies: the window's differences, the totals, and the rates (each
/// proxy's difference over its own span, so a proxy that connected a moment ago counts at its
/// real rate).
#[derive(Default)]
struct Sum {
    window: EdgeCounters,
    total: EdgeCounters,
    requests_per_second: f64,
    retries_per_second: f64,
    denied_per_second: f64,
}

impl Sum {
    fn add(&mut self, base: Option<&EdgeCounters>, latest: &EdgeCounters, span: Duration) {
        add_counters(&mut self.total, latest, None);
        let mut delta = EdgeCounters::default();
        add_counters(&mut delta, latest, base);
        let secs = span.as_secs_f64();
        if secs > 0.0 {
            self.requests_per_second += delta.requests as f64 / secs;
            self.retries_per_second += delta.retries as f64 / secs;
            self.denied_per_second += delta.denied as f64 / secs;
        }
        add_counters(&mut self.window, &delta, None);
    }

    fn edge(&self, source: String, target: String) -> Edge {
        let w = &self.window;
        // mTLS when answers came over mTLS and none in plaintext; answers the proxy made itself
        // (timeouts, no endpoints) say nothing either way.
        let secure = |c: &EdgeCounters| c.mtls > 0 && c.plaintext == 0;
        let mtls = if w.mtls + w.plaintext > 0 { secure(w) } else { secure(&self.total) };
        Edge {
            source,
            target,
            requests_per_second: self.requests_per_second,
            error_rate: if w.requests > 0 { w.errors as f64 / w.requests as f64 } else { 0.0 },
            p99_ms: quantile(&w.latency_buckets, 0.99).map(|s| s * 1000.0),
            retries_per_second: self.retries_per_second,
            ejections: w.ejections,
            denied_per_second: self.denied_per_second,
            mtls,
            total_requests: self.total.requests,
        }
    }
}

/// `into += latest - base` (a restarted proxy's counters start over: never below zero).
fn add_counters(into: &mut EdgeCounters, latest: &EdgeCounters, base: Option<&EdgeCounters>) {
    let diff = |l: u64, b: Option<u64>| l.saturating_sub(b.unwrap_or(0));
    into.requests += diff(latest.requests, base.map(|b| b.requests));
    into.errors += diff(latest.errors, base.map(|b| b.errors));
    into.mtls += diff(latest.mtls, base.map(|b| b.mtls));
    into.plaintext += diff(latest.plaintext, base.map(|b| b.plaintext));
    into.retries += diff(latest.retries, base.map(|b| b.retries));
    into.ejections += diff(latest.ejections, base.map(|b| b.ejections));
    into.denied += diff(latest.denied, base.map(|b| b.denied));
    if into.latency_buckets.len() < latest.latency_buckets.len() {
        into.latency_buckets.resize(latest.latency_buckets.len(), 0);
    }
    for (i, n) in latest.latency_buckets.iter().enumerate() {
        into.latency_buckets[i] += diff(*n, base.and_then(|b| b.latency_buckets.get(i).copied()));
    }
}

/// The `q` quantile, in seconds, of requests counted per bucket of [`LATENCY_BUCKETS_SECONDS`]
/// (plus overflow), interpolated linearly within its bucket as Prometheus' `histogram_quantile`
/// does; the overflow bucket answers its lower bound.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n > 0 && (below + n) as f64 >= rank {
            let Some(upper) = LATENCY_BUCKETS_SECONDS.get(i) else {
                return LATENCY_BUCKETS_SECONDS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS_SECONDS[i - 1] };
            return Some(lower + (upper - lower) * ((rank - below as f64) / *n as f64).clamp(0.0, 1.0));
        }
        below += n;
    }
    LATENCY_BUCKETS_SECONDS.last().copied()
}

/// Splits `<name>.<namespace>` (the sidecars' destination label).
fn service_name(destination: &str) -> (String, String) {
    match destination.split_once('.') {
        Some((name, ns)) => (name.to_string(), ns.to_string()),
        None => (destination.to_string(), String::new()),
    }
}

/// Builds the graph from what the connected proxies reported, as of `now`.
pub fn build(proxies: &[ProxyTraffic<'_>], now: Instant) -> Topology {
    let mut to_service: BTreeMap<(String, String), Sum> = BTreeMap::new();
    let mut to_subset: BTreeMap<(String, String), Sum> = BTreeMap::new();
    for p in proxies {
        let Some((base, span, latest)) = p.samples.window(now) else { continue };
        let source = format!("workload:{}", p.identity);
        for e in &latest.edges {
            let before = base.edges.iter().find(|b| b.destination == e.destination && b.subset == e.subset);
            let before = if std::ptr::eq(base, latest) { Some(e) } else { before };
            to_service.entry((source.clone(), e.destination.clone())).or_default().add(before, e, span);
            if !e.subset.is_empty() {
                to_subset.entry((e.destination.clone(), e.subset.clone())).or_default().add(before, e, span);
            }
        }
    }
    let mut nodes = BTreeMap::new();
    let mut edges = Vec::new();
    for ((source, destination), sum) in &to_service {
        let identity = source.trim_start_matches("workload:");
        let (ns, sa) = identity.split_once('/').unwrap_or(("", identity));
        nodes.insert(
            source.clone(),
            Node { id: source.clone(), kind: "workload".into(), name: sa.into(), namespace: ns.into() },
        );
        let (name, namespace) = service_name(destination);
        let target = format!("service:{destination}");
        nodes.insert(target.clone(), Node { id: target.clone(), kind: "service".into(), name, namespace });
        edges.push(sum.edge(source.clone(), target));
    }
    for ((destination, subset), sum) in &to_subset {
        let (name, namespace) = service_name(destination);
        let id = format!("subset:{destination}/{subset}");
        nodes.insert(
            id.clone(),
            Node { id: id.clone(), kind: "subset".into(), name: format!("{name} {subset}"), namespace },
        );
        edges.push(sum.edge(format!("service:{destination}"), id));
    }
    let mut proxies: Vec<ProxyState> = proxies
        .iter()
        .map(|p| ProxyState {
            id: p.proxy_id.to_string(),
            identity: p.identity.to_string(),
            acked: p.acked.map(str::to_string),
            desired: p.desired.clone(),
            in_sync: p.acked.is_some() && p.acked == p.desired.as_deref(),
        })
        .collect();
    proxies.sort_by(|a, b| (&a.identity, &a.id).cmp(&(&b.identity, &b.id)));
    Topology { window_seconds: WINDOW.as_secs_f64(), nodes: nodes.into_values().collect(), edges, proxies }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(subset: &str, requests: u64, errors: u64, mtls: u64, fast: u64) -> EdgeCounters {
        let mut latency_buckets = vec![0; LATENCY_BUCKETS_SECONDS.len() + 1];
        latency_buckets[3] = fast; // ≤ 1 ms
        latency_buckets[6] = requests - fast; // ≤ 10 ms
        EdgeCounters {
            destination: "reviews.shop".into(),
            subset: subset.into(),
            requests,
            errors,
            mtls,
            plaintext: 0,
            retries: errors / 2,
            ejections: 0,
            denied: 0,
            latency_buckets,
        }
    }

    fn report(edges: Vec<EdgeCounters>) -> TrafficReport {
        TrafficReport { edges }
    }

    #[test]
    fn rates_come_from_the_counters_at_both_ends_of_the_window() {
        let t0 = Instant::now();
        let mut samples = TrafficSamples::default();
        samples.record(t0, report(vec![counters("v1", 100, 0, 100, 100)]));
        samples.record(t0 + Duration::from_secs(5), report(vec![counters("v1", 400, 10, 400, 300)]));
        samples.record(
            t0 + Duration::from_secs(12),
            report(vec![counters("v1", 1100, 30, 1100, 900), counters("v2", 100, 0, 100, 100)]),
        );
        let client = WorkloadIdentity::new("shop", "client");
        let proxy = ProxyTraffic {
            identity: &client,
            proxy_id: "client-1",
            acked: Some("abc"),
            desired: Some("abc".into()),
            samples: &samples,
        };
        // At t0+15 the window starts at t0+5: counters 400 then, 1100 (+100 to v2) now.
        let topology = build(&[proxy], t0 + Duration::from_secs(15));
        let ids: Vec<_> = topology.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "service:reviews.shop",
                "subset:reviews.shop/v1",
                "subset:reviews.shop/v2",
                "workload:shop/client"
            ]
        );
        let edge = |target: &str| topology.edges.iter().find(|e| e.target == target).unwrap();
        let to_service = edge("service:reviews.shop");
        assert_eq!(to_service.source, "workload:shop/client");
        assert!((to_service.requests_per_second - 80.0).abs() < 1e-9, "(700 + 100) / 10 s");
        assert!((to_service.error_rate - 20.0 / 800.0).abs() < 1e-9);
        assert!(to_service.mtls);
        assert_eq!(to_service.total_requests, 1200);
        let v1 = edge("subset:reviews.shop/v1");
        assert_eq!(v1.source, "service:reviews.shop");
        assert!((v1.requests_per_second - 70.0).abs() < 1e-9);
        assert!((v1.retries_per_second - 1.0).abs() < 1e-9, "(15 - 5) / 10 s");
        // 600 fast, 100 slow of 700: the 99th percentile is in the 5–10 ms bucket.
        let p99 = v1.p99_ms.unwrap();
        assert!(p99 > 5.0 && p99 <= 10.0, "{p99}");
        assert!(topology.proxies[0].in_sync);
    }

    #[test]
    fn a_quiet_proxy_shows_no_rate_and_a_new_one_counts_from_its_first_report() {
        let t0 = Instant::now();
        let mut samples = TrafficSamples::default();
        samples.record(t0, report(vec![counters("", 50, 0, 0, 50)]));
        let id = WorkloadIdentity::new("shop", "client");
        let proxy = ProxyTraffic {
            identity: &id,
            proxy_id: "p",
            acked: None,
            desired: Some("x".into()),
            samples: &samples,
        };
        let topology = build(&[proxy], t0 + Duration::from_secs(30));
        assert_eq!(topology.edges.len(), 1, "no subset, no subset edge");
        let e = &topology.edges[0];
        assert_eq!((e.requests_per_second, e.p99_ms, e.mtls, e.total_requests), (0.0, None, false, 50));
        assert!(!topology.proxies[0].in_sync);
    }

    #[test]
    fn replicas_add_their_own_rates_and_one_plaintext_answer_clears_mtls() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(20);
        let (mut old, mut new) = (TrafficSamples::default(), TrafficSamples::default());
        old.record(t0, report(vec![counters("", 0, 0, 0, 0)]));
        old.record(now - Duration::from_secs(1), report(vec![counters("", 1000, 0, 1000, 1000)]));
        // Connected 2 s ago: 200 requests since, 100 req/s, one answered in plaintext.
        new.record(now - Duration::from_secs(2), report(vec![counters("", 0, 0, 0, 0)]));
        let mut last = counters("", 200, 0, 199, 200);
        last.plaintext = 1;
        new.record(now, report(vec![last]));
        let id = WorkloadIdentity::new("shop", "client");
        let proxy =
            |samples| ProxyTraffic { identity: &id, proxy_id: "p", acked: None, desired: None, samples };
        let topology = build(&[proxy(&old), proxy(&new)], now);
        let e = &topology.edges[0];
        assert!((e.requests_per_second - 200.0).abs() < 1e-9, "100 + 100: {}", e.requests_per_second);
        assert!(!e.mtls, "one plaintext answer in the window");
    }

    #[test]
    fn samples_older_than_the_window_are_forgotten_but_one() {
        let t0 = Instant::now();
        let mut samples = TrafficSamples::default();
        for s in 0..30 {
            samples.record(t0 + Duration::from_secs(s), report(vec![counters("v1", 10 * (s + 1), 0, 0, 0)]));
        }
        assert_eq!(samples.samples.len(), 11, "t0+19 (the window's start) to t0+29");
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let mut b = vec![0u64; LATENCY_BUCKETS_SECONDS.len() + 1];
        assert_eq!(quantile(&b, 0.99), None);
        b[0] = 100;
        assert!((quantile(&b, 0.5).unwrap() - 0.00005).abs() < 1e-12);
        b[LATENCY_BUCKETS_SECONDS.len()] = 100;
        assert_eq!(quantile(&b, 0.99), Some(10.0), "the overflow answers the last bound");
    }
}
