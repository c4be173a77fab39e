//! skein-proxy, the Skein sidecar: outbound (15001) and inbound (15006) listeners that route,
//! balance, retry, eject outliers, add trace headers, count and log every request; an admin
//! server (15000); and its config from the operator's stream or from a file, swapped in without
//! dropping a request.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod body;
pub mod capture;
pub mod config_store;
pub mod control;
pub mod file_config;
pub mod h1;
pub mod listener;
pub mod metrics;
pub mod outlier;
pub mod proxy;
pub mod retry;
pub mod routes;
pub mod tls;
pub mod trace;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use skein_api::WorkloadIdentity;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid --control-plane URL {0:?}: use https://host:port (or http:// for development)")]
    ControlPlaneUrl(String),
    #[error("--identity is required with --control-plane")]
    MissingIdentity,
    #[error("give --control-plane URL or --config FILE")]
    NoConfigSource,
    #[error("--config: {0}")]
    ConfigFile(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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

/// Command line of `skein-proxy`; every flag can also come from the environment.
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
    /// The operator's config stream, such as http://skein-operator.skein-system:15012.
    #[arg(long, env = "SKEIN_CONTROL_PLANE", conflicts_with = "config")]
    pub control_plane: Option<String>,
    /// Run from a ProxyConfig JSON file instead, reloaded when it changes.
    #[arg(long, env = "SKEIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// This workload's identity, `<namespace>/<service-account>` (required with --control-plane).
    #[arg(long, env = "SKEIN_IDENTITY", value_parser = parse_identity)]
    pub identity: Option<WorkloadIdentity>,
    /// This proxy's name in the operator's status (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub proxy_id: Option<String>,
    /// Outbound listener (app → mesh).
    #[arg(long, env = "SKEIN_OUTBOUND_ADDR", default_value = "0.0.0.0:15001")]
    pub outbound_addr: SocketAddr,
    /// Inbound listener (mesh → app).
    #[arg(long, env = "SKEIN_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    /// Where inbound requests are delivered (the app, on the request's port).
    #[arg(long, env = "SKEIN_INBOUND_TARGET", default_value = "127.0.0.1")]
    pub inbound_target: IpAddr,
    /// Admin server address.
    #[arg(long, env = "SKEIN_ADMIN_ADDR", default_value = "0.0.0.0:15000")]
    pub admin_addr: SocketAddr,
    /// Directory for the last good config (start-up fallback when the operator is unreachable).
    #[arg(long, env = "SKEIN_STATE_DIR", default_value = "/var/run/skein")]
    pub state_dir: PathBuf,
    /// Access log: one JSON line per request on stdout, or off.
    #[arg(long, env = "SKEIN_ACCESS_LOG", value_enum, default_value = "stdout")]
    pub access_log: AccessLogMode,
    /// Worker threads.
    #[arg(long, env = "SKEIN_WORKERS", default_value_t = 1)]
    pub workers: usize,
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
    /// Serve plain HTTP/1.1 requests on the fast path (false: every request through hyper).
    #[arg(long, env = "SKEIN_HTTP1_FAST_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub http1_fast_path: bool,
    /// Upstream connect timeout in milliseconds.
    #[arg(long, env = "SKEIN_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    pub connect_timeout_ms: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SKEIN_LOG_JSON")]
    pub log_json: bool,
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

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// Runs the proxy until `shutdown` fires (or `POST /shutdown`).
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<()> {
    let tls = Arc::new(tls::TlsStore::default());
    if let Some(dir) = &args.cert_dir {
        match tls::TlsMaterial::from_dirs(dir, args.trust_dir.as_deref()) {
            Ok(m) => {
                tracing::info!(identity = %m.identity, "loaded the workload certificate");
                tls.set(m);
            }
            // Not ready until it loads; the watcher picks it up when the Secret appears.
            Err(e) => tracing::warn!(error = %e, "no usable workload certificate yet"),
        }
        tokio::spawn(tls::watch(tls.clone(), dir.clone(), args.trust_dir.clone(), shutdown.clone()));
    }
    let store = Arc::new(config_store::ConfigStore::new(Some(args.state_dir.clone())));
    let stream = Arc::new(control::StreamStatus::default());
    match (&args.control_plane, &args.config) {
        (Some(url), None) => {
            let parsed: Uri = url.parse().map_err(|_| Error::ControlPlaneUrl(url.clone()))?;
            if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
                return Err(Error::ControlPlaneUrl(url.clone()));
            }
            let identity = args.identity.clone().ok_or(Error::MissingIdentity)?;
            if store.load_persisted() {
                tracing::info!(dir = %args.state_dir.display(), "started from the last good config");
            }
            let proxy_id = args
                .proxy_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", identity.service_account, std::process::id()));
            let cp = control::ControlPlane { url: parsed, identity, proxy_id, tls: Some(tls.clone()) };
            tokio::spawn(control::run(cp, store.clone(), stream.clone(), shutdown.clone()));
        }
        (None, Some(path)) => {
            let loaded = file_config::load(path, &store).map_err(|(_, e)| Error::ConfigFile(e))?;
            tokio::spawn(file_config::watch(path.clone(), store.clone(), loaded, shutdown.clone()));
        }
        _ => return Err(Error::NoConfigSource),
    }

    let outbound = bind(args.outbound_addr).await?;
    let inbound = bind(args.inbound_addr).await?;
    let admin = bind(args.admin_addr).await?;
    let access_log = match args.access_log {
        AccessLogMode::Stdout => access_log::AccessLog::stdout(),
        AccessLogMode::Off => access_log::AccessLog::off(),
    };
    let mut ctx = proxy::ProxyContext::new(
        store.clone(),
        access_log,
        args.inbound_target,
        Duration::from_millis(args.connect_timeout_ms),
    );
    ctx.fast_path = args.http1_fast_path;
    ctx.inbound_strict = args.inbound_mode == InboundMode::Strict;
    ctx.tls = tls.clone();
    let ctx = Arc::new(ctx);
    tokio::spawn(listener::serve(outbound, ctx.clone(), proxy::Direction::Outbound, shutdown.clone()));
    tokio::spawn(listener::serve(inbound, ctx, proxy::Direction::Inbound, shutdown.clone()));

    let state = Arc::new(admin::AdminState {
        store,
        stream,
        tls,
        needs_cert: args.cert_dir.is_some(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(
        outbound = %args.outbound_addr, inbound = %args.inbound_addr, admin = %args.admin_addr,
        "skein-proxy started"
    );
    admin::serve(admin, state).await;
    Ok(())
}
