//! Operator metrics (Prometheus text at `/metrics` on the 8080 port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

/// `kind` of a config line sent: `full` or `delta`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SentLabels {
    pub kind: &'static str,
}

/// A request the API server refused for want of an RBAC permission.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PermissionLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub result: &'static str,
}

/// Every operator metric; cheap to clone (the series are shared).
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_seconds: Histogram,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub connected_proxies: Gauge,
    pub push_seconds: Histogram,
    pub acks: Family<AckLabels, Counter>,
    /// Config lines and their bytes sent on the stream, by kind.
    pub configs_sent: Family<SentLabels, Counter>,
    pub config_bytes_sent: Family<SentLabels, Counter>,
    pub status_writes: Counter,
    pub leader: Gauge,
    pub certificates_signed: Counter,
    /// Admission reviews answered, by result.
    pub admissions: Family<AdmissionLabels, Counter>,
    /// Unix time of the earliest expiry among the workload certificates issued.
    pub certificate_earliest_expiry: Gauge,
    /// Requests refused for want of an RBAC permission (`k8s::permissions`).
    pub permission_denied: Family<PermissionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            reconcile_errors: Family::default(),
            connected_proxies: Gauge::default(),
            push_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            acks: Family::default(),
            configs_sent: Family::default(),
            config_bytes_sent: Family::default(),
            status_writes: Counter::default(),
            leader: Gauge::default(),
            certificates_signed: Counter::default(),
            admissions: Family::default(),
            permission_denied: Family::default(),
            certificate_earliest_expiry: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers every series under the `skein_operator` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("skein_operator");
        r.register("reconciles", "Config computations run", self.reconciles.clone());
        r.register(
            "reconcile_duration_seconds",
            "Time to compute the mesh config",
            self.reconcile_seconds.clone(),
        );
        r.register("reconcile_errors", "Failures while reconciling, by kind", self.reconcile_errors.clone());
        r.register(
            "connected_proxies",
            "Proxies connected to the config stream",
            self.connected_proxies.clone(),
        );
        r.register(
            "configs_sent",
            "Config lines sent to proxies, by kind (full or delta)",
            self.configs_sent.clone(),
        );
        r.register(
            "config_sent_bytes",
            "Bytes of config lines sent to proxies, by kind (full or delta)",
            self.config_bytes_sent.clone(),
        );
        r.register(
            "config_push_duration_seconds",
            "Time from publishing a config to its acknowledgement",
            self.push_seconds.clone(),
        );
        r.register("config_acks", "Acknowledgements received, by result", self.acks.clone());
        r.register("status_writes", "Status subresource writes", self.status_writes.clone());
        r.register("leader", "1 while this replica holds the leader Lease", self.leader.clone());
        r.register("certificates_signed", "Workload certificates signed", self.certificates_signed.clone());
        r.register("admissions", "Admission reviews answered, by result", self.admissions.clone());
        r.register(
            "certificate_earliest_expiry_seconds",
            "Unix time of the earliest expiry among issued workload certificates",
            self.certificate_earliest_expiry.clone(),
        );
        r.register(
            "permission_denied",
            "Requests the API server refused for want of an RBAC permission, by verb and resource",
            self.permission_denied.clone(),
        );
    }
}
