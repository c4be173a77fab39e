//! The mesh topology as the operator serves it at `/topology.json`: workloads call services,
//! services split into subsets, every edge with its rates over the last window, and which
//! config each connected proxy has acknowledged. Derived from the proxies' traffic reports.

use serde::{Deserialize, Serialize};

/// The service graph and the proxies behind it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    pub window_seconds: f64,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub proxies: Vec<ProxyState>,
}

impl Topology {
    /// The edge from `source` to `target` (node ids), if traffic has been reported on it.
    pub fn edge(&self, source: &str, target: &str) -> Option<&Edge> {
        self.edges.iter().find(|e| e.source == source && e.target == target)
    }

    /// Whether `proxies` proxies are connected and each has acknowledged its current config.
    pub fn all_in_sync(&self, proxies: usize) -> bool {
        self.proxies.len() == proxies && self.proxies.iter().all(|p| p.in_sync)
    }

    /// The config version each proxy has acknowledged, by proxy.
    pub fn acked(&self) -> std::collections::BTreeMap<String, Option<String>> {
        self.proxies.iter().map(|p| (p.id.clone(), p.acked.clone())).collect()
    }
}

/// A node: `workload:<ns>/<sa>`, `service:<name>.<ns>` or `subset:<name>.<ns>/<subset>`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub id: String,
    /// `workload` (a source identity), `service`, or `subset` (a TrafficRoute subset of a service).
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

/// Traffic from one node to another over the window.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub source: String,
    pub target: String,
    pub requests_per_second: f64,
    /// Share of the window's requests answered 5xx.
    pub error_rate: f64,
    /// The 99th percentile of the window's latencies, interpolated within its bucket; absent
    /// without requests in the window.
    pub p99_ms: Option<f64>,
    pub retries_per_second: f64,
    pub ejections: u64,
    /// Requests the destination's sidecar denied (AccessPolicy), per second.
    #[serde(default)]
    pub denied_per_second: f64,
    /// Every request of the window (or, without one, every request so far) went over mTLS.
    pub mtls: bool,
    /// Requests since the sources started.
    pub total_requests: u64,
}

/// A connected proxy and the config it runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    pub id: String,
    pub identity: String,
    pub acked: Option<String>,
    pub desired: Option<String>,
    pub in_sync: bool,
}
