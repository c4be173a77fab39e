//! The command line of `skein-operator`, in groups: the API server and this replica, the
//! webhook, the config stream, identity, and the file-backed (`--local`) mode. Every flag can
//! also come from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use skein_api::constants::{DEFAULT_OPERATOR_NAMESPACE, DEFAULT_TRUST_DOMAIN};

use crate::admission::inject::{CaptureMode, InboundMode, LogFormat};
use crate::admission::webhook;

/// Command line of `skein-operator`.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "skein-operator", version, about = "The Skein service mesh control plane")]
pub struct Args {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub webhook: WebhookArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub local: LocalArgs,
    /// Log lines as `plain` text (colours only on a terminal) or `json`, one object per line.
    #[arg(long, env = "SKEIN_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: skein_api::process::LogFormat,
    /// Who may call a workload that no Allow AccessPolicy covers, unless its namespace's
    /// `skein.dev/default-policy` annotation says otherwise: `allow` (every caller),
    /// `authenticated` (any mesh identity), `same-namespace` or `deny`.
    #[arg(long, env = "SKEIN_DEFAULT_POLICY", default_value = "allow", value_parser = parse_default_policy)]
    pub default_policy: skein_api::authz::DefaultPolicy,
}

fn parse_default_policy(s: &str) -> std::result::Result<skein_api::authz::DefaultPolicy, String> {
    skein_api::authz::DefaultPolicy::parse(s)
        .ok_or_else(|| format!("{s:?} is not allow, authenticated, same-namespace or deny"))
}

/// The API server and this replica.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Kubeconfig file; without it, KUBECONFIG or the in-cluster service account is used.
    #[arg(long, env = "SKEIN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The operator's own namespace (its Lease and, later, its CA live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_OPERATOR_NAMESPACE)]
    pub namespace: String,
    /// Watch only this namespace instead of the whole cluster.
    #[arg(long, env = "SKEIN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// This replica's name in the leader Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
    /// The uid of the operator's own pod, so the events about it (a missing RBAC permission)
    /// show in `kubectl describe pod`.
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// Name of the operator's Service (the webhook's and the config stream's DNS name).
    #[arg(long, env = "SKEIN_SERVICE_NAME", default_value = "skein-operator")]
    pub service_name: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "SKEIN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
}

/// The admission webhook and what it injects.
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Address of the admission webhook (HTTPS).
    #[arg(long, env = "SKEIN_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// Extra names (DNS or IP) of the webhook's serving certificate, besides its Service's DNS names.
    #[arg(long, env = "SKEIN_WEBHOOK_SAN", value_delimiter = ',', default_values_t = ["127.0.0.1".to_string(), "localhost".to_string()])]
    pub webhook_san: Vec<String>,
    /// The MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    #[arg(long, env = "SKEIN_WEBHOOK_CONFIGURATION", default_value = webhook::WEBHOOK_CONFIGURATION)]
    pub webhook_configuration: String,
    /// Image of the injected sidecar.
    #[arg(long, env = "SKEIN_PROXY_IMAGE", default_value = concat!("ghcr.io/skein-mesh/skein-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// Config stream URL injected sidecars connect to; by default the operator's Service.
    #[arg(long, env = "SKEIN_CONTROL_PLANE_URL")]
    pub control_plane_url: Option<String>,
    /// How injected pods' traffic reaches the sidecar unless a pod's `skein.dev/capture-mode`
    /// says otherwise: `transparent` (iptables, an init step with NET_ADMIN) or `explicit`
    /// (HTTP_PROXY, no privileges, nothing enforced on the app's own port).
    #[arg(long, env = "SKEIN_CAPTURE_MODE", value_enum, default_value = "transparent")]
    pub capture_mode: CaptureMode,
    /// Inbound mode of injected sidecars unless a pod's `skein.dev/inbound-mode` says otherwise:
    /// `strict` (mTLS from mesh identities only) or `permissive` (plaintext too).
    #[arg(long, env = "SKEIN_DEFAULT_INBOUND_MODE", value_enum, default_value = "strict")]
    pub inbound_mode: InboundMode,
    /// The sidecar's CPU request (a pod's `skein.dev/proxy-cpu` overrides it).
    #[arg(long, env = "SKEIN_PROXY_CPU_REQUEST", default_value = "10m", value_parser = parse_quantity)]
    pub proxy_cpu_request: String,
    /// The sidecar's memory request (a pod's `skein.dev/proxy-memory` overrides it).
    #[arg(long, env = "SKEIN_PROXY_MEMORY_REQUEST", default_value = "16Mi", value_parser = parse_quantity)]
    pub proxy_memory_request: String,
    /// The sidecar's CPU limit; empty (the default) for none: a throttled proxy slows every
    /// request of its pod.
    #[arg(long, env = "SKEIN_PROXY_CPU_LIMIT", default_value = "", value_parser = parse_limit)]
    pub proxy_cpu_limit: String,
    /// The sidecar's memory limit; empty for none.
    #[arg(long, env = "SKEIN_PROXY_MEMORY_LIMIT", default_value = "64Mi", value_parser = parse_limit)]
    pub proxy_memory_limit: String,
    /// The sidecar's log level (`RUST_LOG` syntax; a pod's `skein.dev/log-level` overrides it).
    #[arg(long, env = "SKEIN_PROXY_LOG_LEVEL", default_value = "info")]
    pub proxy_log_level: String,
    /// The sidecar's log format: `plain` or `json`.
    #[arg(long, env = "SKEIN_PROXY_LOG_FORMAT", value_enum, default_value = "plain")]
    pub proxy_log_format: LogFormat,
    /// Seconds an app container keeps serving after its pod is deleted, while its endpoint
    /// leaves every proxy (a preStop sleep; a pod's `skein.dev/drain-seconds` overrides it).
    #[arg(long, env = "SKEIN_DRAIN_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=300))]
    pub drain_seconds: u32,
}

/// A quantity, or empty for no limit.
fn parse_limit(s: &str) -> std::result::Result<String, String> {
    if s.is_empty() {
        Ok(String::new())
    } else {
        parse_quantity(s)
    }
}

/// A Kubernetes quantity such as `10m`, `1.5`, `64Mi`.
fn parse_quantity(s: &str) -> std::result::Result<String, String> {
    let (number, suffix) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let number_ok = !number.is_empty() && number.parse::<f64>().is_ok_and(|n| n >= 0.0);
    let suffix_ok = ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix);
    if number_ok && suffix_ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a Kubernetes quantity (such as 10m, 0.5, 64Mi)"))
    }
}

/// The config stream.
#[derive(clap::Args, Debug, Clone)]
pub struct StreamArgs {
    /// Address of the config stream.
    #[arg(long, env = "SKEIN_STREAM_ADDR", default_value = "0.0.0.0:15012")]
    pub stream_addr: SocketAddr,
    /// Also serve proxies without a mesh client certificate: plaintext streams (or TLS without a
    /// client certificate) that name their identity in a header. For development only: anyone
    /// who can reach the port could then claim any identity's config. By default every proxy
    /// proves its identity with its mTLS client certificate.
    #[arg(long, env = "SKEIN_INSECURE_PLAINTEXT_STREAM")]
    pub insecure_plaintext_stream: bool,
}

/// The mesh CA and workload certificates.
#[derive(clap::Args, Debug, Clone)]
pub struct IdentityArgs {
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "SKEIN_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Use this Secret (tls.crt, tls.key, optional ca.crt; in --namespace) as the mesh CA instead
    /// of creating `skein-ca`: for example an intermediate issued by cert-manager.
    #[arg(long, env = "SKEIN_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// Lifetime of workload certificates (renewed at half-life), e.g. 24h.
    #[arg(long, env = "SKEIN_CERT_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
    pub cert_lifetime: Duration,
}

/// The file-backed control plane.
#[derive(clap::Args, Debug, Clone)]
pub struct LocalArgs {
    /// Run from a directory of manifests instead of an API server (the local mesh): the same
    /// computation and config stream, the snapshot read from files and re-read on change.
    /// Repeat it to read several directories as one (in the environment: separated by `:`).
    #[arg(long = "local", env = "SKEIN_LOCAL_DIR", value_delimiter = ':')]
    pub dirs: Vec<PathBuf>,
    /// With --local: where the CA and the issued workload certificates are kept
    /// (`ca/`, `identities/<ns>/<sa>/`); `<first DIR>/.skein` by default.
    #[arg(long, env = "SKEIN_LOCAL_STATE")]
    pub local_state: Option<PathBuf>,
}

fn parse_lifetime(s: &str) -> std::result::Result<Duration, String> {
    let d = skein_api::duration::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(60) {
        return Err("certificate lifetime must be at least 1m".into());
    }
    Ok(d)
}
