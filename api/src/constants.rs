//! Names, labels and ports fixed by the design: every part of Skein reads them from here.

/// The API group of Skein's custom resources.
pub const GROUP: &str = "skein.dev";
/// The served and stored version of Skein's custom resources.
pub const VERSION: &str = "v1alpha1";

/// Namespace or pod label that opts workloads into the mesh (`enabled`).
pub const INJECT_LABEL: &str = "skein.dev/inject";
/// Pod annotation that opts a pod out of injection (`"false"`).
pub const INJECT_ANNOTATION: &str = "skein.dev/inject";

/// Pod annotation the injector records what it did with (`native-sidecar,transparent`).
pub const INJECTED_ANNOTATION: &str = "skein.dev/injected";
/// Namespace annotation: what its workloads accept where no Allow `AccessPolicy` applies
/// (`allow`, `authenticated`, `same-namespace`, `deny`).
pub const DEFAULT_POLICY_ANNOTATION: &str = "skein.dev/default-policy";

/// ServiceAccount or Namespace annotation: the Services its workloads' proxies receive
/// (`./*, payments/api`); every Service when absent.
pub const DESTINATIONS_ANNOTATION: &str = "skein.dev/destinations";

/// Service annotation choosing the load balancer: `p2c-ewma` (default) or `round-robin`.
pub const LOAD_BALANCER_ANNOTATION: &str = "skein.dev/load-balancer";

/// Default namespace of the operator.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "skein-system";
/// The cluster DNS domain Service FQDNs end in.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Secret holding the mesh CA (in the operator's namespace) unless the user names another.
pub const CA_SECRET: &str = "skein-ca";
/// Field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "skein-operator";
/// Name of the Lease the operator replicas elect a status writer with.
pub const LEADER_LEASE: &str = "skein-operator";

/// Sidecar outbound listener (app → mesh).
pub const PROXY_OUTBOUND_PORT: u16 = 15001;
/// Sidecar inbound listener (mesh → app).
pub const PROXY_INBOUND_PORT: u16 = 15006;
/// Sidecar admin server, on loopback only: everything, including what changes state
/// (`POST /shutdown`) and what tells the mesh's config (`/config_dump`, `/certs`).
pub const PROXY_ADMIN_PORT: u16 = 15000;
/// Sidecar read-only listener on the pod IP: `/metrics`, `/ready`, `/live` (Prometheus and the
/// kubelet's probes).
pub const PROXY_STATS_PORT: u16 = 15020;
/// Operator admission webhook (HTTPS).
pub const WEBHOOK_PORT: u16 = 9443;
/// Operator config stream.
pub const CONFIG_STREAM_PORT: u16 = 15012;
/// Operator metrics and health.
pub const OPERATOR_METRICS_PORT: u16 = 8080;

/// Request header a proxy sends to a peer proxy's inbound listener: the app port the request
/// is for (the peer cannot see it in the connection's destination, which is its own 15006).
pub const INBOUND_PORT_HEADER: &str = "x-skein-inbound-port";

/// Path of the config stream on the operator.
pub const CONFIG_STREAM_PATH: &str = "/v1/config-stream";
/// Request header a proxy names its workload identity with (`<namespace>/<service-account>`)
/// until mTLS client certificates carry it.
pub const IDENTITY_HEADER: &str = "x-skein-identity";
/// Request header with the proxy's own instance name (pod name), shown in status and metrics.
pub const PROXY_ID_HEADER: &str = "x-skein-proxy-id";
/// Sent by a proxy that applies [`crate::config::ConfigDelta`] lines: only then does the
/// operator send changes as deltas.
pub const DELTA_HEADER: &str = "x-skein-config-delta";
