//! The command line of `skein-proxy`, in groups: where the config comes from, the listeners,
//! the workload identity and mTLS, and how the request path behaves. Every flag can also come
//! from the environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use skein_api::probes::AppProbes;
use skein_api::WorkloadIdentity;

use crate::capture;

/// Command line of `skein-proxy`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "skein-proxy",
    version,
    about = "The Skein sidecar proxy",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Subcommand>,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub listeners: ListenerArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Log lines as `plain` text (colours only on a terminal) or `json`, one object per line.
    #[arg(long, env = "SKEIN_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: skein_api::process::LogFormat,
}

/// Where the config comes from.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// The operator's config stream, such as https://skein-operator.skein-system:15012 (mTLS with
    /// the workload certificate of --cert-dir).
    #[arg(long, env = "SKEIN_CONTROL_PLANE", conflicts_with = "config")]
    pub control_plane: Option<String>,
    /// Run from a ProxyConfig JSON file instead, reloaded when it changes.
    #[arg(long, env = "SKEIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// This workload's identity, `<namespace>/<service-account>` (required with --control-plane).
    #[arg(long = "identity", env = "SKEIN_IDENTITY", value_parser = parse_identity)]
    pub workload: Option<WorkloadIdentity>,
    /// Accept an `http://` (plaintext) --control-plane URL. For development only: without TLS the
    /// operator cannot tell which workload is asking, and anyone on the path reads the config.
    #[arg(long, env = "SKEIN_INSECURE_PLAINTEXT_STREAM")]
    pub insecure_plaintext_stream: bool,
    /// This proxy's name in the operator's status (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub proxy_id: Option<String>,
    /// Directory for the last good config (start-up fallback when the operator is unreachable).
    #[arg(long, env = "SKEIN_STATE_DIR", default_value = "/var/run/skein")]
    pub state_dir: PathBuf,
}

/// The proxy's listeners. Each takes a comma-separated list of addresses; an IPv6 address that
/// this host cannot bind (no IPv6 in the pod) is skipped with a warning, an IPv4 one is an error.
/// The defaults are the doors `docs/security.md` describes: outbound and admin on loopback, the
/// inbound (mTLS) and read-only stats listeners on every address.
#[derive(clap::Args, Debug, Clone)]
pub struct ListenerArgs {
    /// Outbound listener (app → mesh); loopback only, or every pod could use this pod's identity.
    #[arg(
        long,
        env = "SKEIN_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001,[::1]:15001"
    )]
    pub outbound_addr: Vec<SocketAddr>,
    /// Inbound listener (mesh → app).
    #[arg(
        long,
        env = "SKEIN_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006,[::]:15006"
    )]
    pub inbound_addr: Vec<SocketAddr>,
    /// Where inbound requests are delivered (the app, on the request's port).
    #[arg(long, env = "SKEIN_INBOUND_TARGET", default_value = "127.0.0.1")]
    pub inbound_target: IpAddr,
    /// Admin server: `/config_dump`, `/certs`, `POST /shutdown` and the stats endpoints. Keep it
    /// on loopback.
    #[arg(long, env = "SKEIN_ADMIN_ADDR", value_delimiter = ',', default_value = "127.0.0.1:15000")]
    pub admin_addr: Vec<SocketAddr>,
    /// Read-only listener for Prometheus and the kubelet: `/metrics`, `/ready`, `/live`.
    #[arg(long, env = "SKEIN_STATS_ADDR", value_delimiter = ',', default_value = "0.0.0.0:15020,[::]:15020")]
    pub stats_addr: Vec<SocketAddr>,
    /// The app containers' kubelet probes, rewritten by the webhook to `/app-health/…` on the
    /// stats listener (JSON, path → probe); the proxy sends each to the app on --inbound-target.
    #[arg(long, env = skein_api::probes::APP_PROBES_ENV, value_parser = crate::probe::parse_probes)]
    pub app_probes: Option<AppProbes>,
}

impl ListenerArgs {
    /// Every port the proxy listens on: never a destination for inbound traffic, so that a peer
    /// cannot reach the outbound listener or the admin server through the inbound path.
    pub fn own_ports(&self) -> Vec<u16> {
        let all = [&self.outbound_addr, &self.inbound_addr, &self.admin_addr, &self.stats_addr];
        let mut ports: Vec<u16> = all.iter().flat_map(|a| a.iter().map(SocketAddr::port)).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// The workload certificate and what inbound accepts.
#[derive(clap::Args, Debug, Clone)]
pub struct IdentityArgs {
    /// Directory of the workload certificate (the mounted Secret: tls.crt, tls.key, ca.crt).
    /// With it, hops between sidecars are mTLS; it is re-read when it changes.
    #[arg(long, env = "SKEIN_CERT_DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Directory of the trust bundle (roots.pem); ca.crt of --cert-dir otherwise.
    #[arg(long, env = "SKEIN_TRUST_DIR")]
    pub trust_dir: Option<PathBuf>,
    /// Inbound with an identity: `strict` accepts only mTLS from mesh identities, `permissive`
    /// plaintext too.
    #[arg(long, env = "SKEIN_INBOUND_MODE", value_enum, default_value = "strict")]
    pub inbound_mode: InboundMode,
}

/// How the request path behaves.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Access log: one JSON line per request on stdout, or off.
    #[arg(long, env = "SKEIN_ACCESS_LOG", value_enum, default_value = "stdout")]
    pub access_log: AccessLogMode,
    /// Worker threads.
    #[arg(long, env = "SKEIN_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Serve plain HTTP/1.1 requests on the fast path (false: every request through hyper).
    #[arg(long, env = "SKEIN_HTTP1_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub http1_fast_path: bool,
    /// Upstream connect timeout in milliseconds.
    #[arg(long, env = "SKEIN_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    pub connect_timeout_ms: u64,
    /// A client must send a whole request head within this many milliseconds of its first byte
    /// (slow clients holding connections open are closed).
    #[arg(long, env = "SKEIN_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Refuse requests declaring a larger body with 413; no limit when absent (bodies stream
    /// through, they are never buffered whole).
    #[arg(long, env = "SKEIN_MAX_REQUEST_BODY_BYTES")]
    pub max_request_body_bytes: Option<u64>,
}

/// Whether inbound traffic must be mTLS.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMode {
    Strict,
    Permissive,
}

/// How access logs are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLogMode {
    Stdout,
    Off,
}

/// One-shot jobs of the same binary.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Subcommand {
    /// Install the transparent-capture iptables rules (a pod's init step; needs NET_ADMIN).
    Init(capture::InitArgs),
    /// Wait until the sidecar's admin /ready answers 200 (exit 1 after --timeout-secs).
    WaitReady {
        #[arg(long, default_value_t = skein_api::constants::PROXY_ADMIN_PORT)]
        admin_port: u16,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

fn parse_identity(s: &str) -> Result<WorkloadIdentity, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_keep_their_names_across_the_groups() {
        let args = Args::try_parse_from([
            "skein-proxy",
            "--control-plane",
            "https://cp:15012",
            "--identity",
            "shop/reviews",
            "--outbound-addr",
            "127.0.0.1:1,[::1]:1",
            "--inbound-mode",
            "permissive",
            "--http1-fast-path",
            "false",
        ])
        .unwrap();
        assert_eq!(args.source.workload.unwrap().to_string(), "shop/reviews");
        assert_eq!(args.listeners.outbound_addr.len(), 2);
        assert_eq!(args.listeners.own_ports(), vec![1, 15000, 15006, 15020]);
        assert_eq!(args.identity.inbound_mode, InboundMode::Permissive);
        assert!(!args.proxy.http1_fast_path);
        assert!(Args::try_parse_from(["skein-proxy", "--config", "a", "--control-plane", "b"]).is_err());
    }
}
