//! Wiring: the certificate watcher, the config source (stream or file), the listeners and the
//! admin server, started in that order; and the errors that stop the proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::{AccessLogMode, Args, InboundMode};
use crate::config::store::ConfigStore;
use crate::config::stream::{ControlPlane, StreamStatus};
use crate::proxy::{Direction, ProxyContext};
use crate::telemetry::access_log::AccessLog;
use crate::{admin, config, listener, probe};

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid --control-plane URL {0:?}: use https://host:port")]
    ControlPlaneUrl(String),
    #[error(
        "refusing the plaintext --control-plane URL {0:?}: the stream needs mTLS (https:// and \
         --cert-dir); --insecure-plaintext-stream allows http:// for development"
    )]
    PlaintextStream(String),
    #[error("--identity is required with --control-plane")]
    MissingIdentity,
    #[error("give --control-plane URL or --config FILE")]
    NoConfigSource,
    #[error("--config: {0}")]
    ConfigFile(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Binds every address of one listener. An IPv6 address this host has no IPv6 for is skipped
/// (a pod without IPv6 still starts); any other failure is an error.
fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        match listener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) if addr.is_ipv6() && listener::no_ipv6_here(&e) => {
                tracing::info!(%addr, error = %e, "no IPv6 here; not listening on this address");
            }
            Err(source) => return Err(Error::Bind { addr, source }),
        }
    }
    Ok(listeners)
}

/// Runs the proxy until `shutdown` fires (or `POST /shutdown`).
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<()> {
    let tls = Arc::new(crate::tls::TlsStore::default());
    if let Some(dir) = &args.identity.cert_dir {
        match crate::tls::TlsMaterial::from_dirs(dir, args.identity.trust_dir.as_deref()) {
            Ok(m) => {
                tracing::info!(identity = %m.identity, "loaded the workload certificate");
                tls.set(m);
            }
            // Not ready until it loads; the watcher picks it up when the Secret appears.
            Err(e) => tracing::warn!(error = %e, "no usable workload certificate yet"),
        }
        tokio::spawn(crate::tls::watch(
            tls.clone(),
            dir.clone(),
            args.identity.trust_dir.clone(),
            shutdown.clone(),
        ));
    }
    let store = Arc::new(ConfigStore::new(Some(args.source.state_dir.clone())));
    let stream = Arc::new(StreamStatus::default());
    match (&args.source.control_plane, &args.source.config) {
        (Some(url), None) => {
            let parsed: Uri = url.parse().map_err(|_| Error::ControlPlaneUrl(url.clone()))?;
            if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
                return Err(Error::ControlPlaneUrl(url.clone()));
            }
            if parsed.scheme_str() == Some("http") && !args.source.insecure_plaintext_stream {
                return Err(Error::PlaintextStream(url.clone()));
            }
            let identity = args.source.workload.clone().ok_or(Error::MissingIdentity)?;
            if store.load_persisted() {
                tracing::info!(dir = %args.source.state_dir.display(), "started from the last good config");
            }
            let proxy_id = args
                .source
                .proxy_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", identity.service_account, std::process::id()));
            let cp = ControlPlane { url: parsed, identity, proxy_id, tls: Some(tls.clone()) };
            tokio::spawn(config::stream::run(cp, store.clone(), stream.clone(), shutdown.clone()));
        }
        (None, Some(path)) => {
            let loaded = config::file::load(path, &store).map_err(|(_, e)| Error::ConfigFile(e))?;
            tokio::spawn(config::file::watch(path.clone(), store.clone(), loaded, shutdown.clone()));
        }
        _ => return Err(Error::NoConfigSource),
    }

    let outbound = bind(&args.listeners.outbound_addr)?;
    let inbound = bind(&args.listeners.inbound_addr)?;
    let admin = bind(&args.listeners.admin_addr)?;
    let stats = bind(&args.listeners.stats_addr)?;
    let access_log = match args.proxy.access_log {
        AccessLogMode::Stdout => AccessLog::stdout(),
        AccessLogMode::Off => AccessLog::off(),
    };
    let access_log_dropped = access_log.dropped.clone();
    let mut ctx = ProxyContext::new(
        store.clone(),
        access_log,
        args.listeners.inbound_target,
        Duration::from_millis(args.proxy.connect_timeout_ms),
    );
    ctx.fast_path = args.proxy.http1_fast_path;
    ctx.inbound_strict = args.identity.inbound_mode == InboundMode::Strict;
    ctx.tls = tls.clone();
    ctx.own_ports = args.listeners.own_ports();
    ctx.head_timeout = Duration::from_millis(args.proxy.header_read_timeout_ms);
    ctx.max_request_body = args.proxy.max_request_body_bytes;
    let ctx = Arc::new(ctx);
    for l in outbound {
        tokio::spawn(listener::serve(l, ctx.clone(), Direction::Outbound, shutdown.clone()));
    }
    for l in inbound {
        tokio::spawn(listener::serve(l, ctx.clone(), Direction::Inbound, shutdown.clone()));
    }

    let state = Arc::new(admin::AdminState {
        store,
        stream,
        tls,
        access_log_dropped,
        needs_cert: args.identity.cert_dir.is_some(),
        app_probes: probe::AppProber::new(
            args.listeners.app_probes.clone().unwrap_or_default(),
            args.listeners.inbound_target,
        ),
        shutdown: shutdown.clone(),
    });
    for l in stats {
        tokio::spawn(admin::serve(l, state.clone(), admin::Scope::ReadOnly));
    }
    let l = &args.listeners;
    tracing::info!(
        outbound = ?l.outbound_addr, inbound = ?l.inbound_addr, admin = ?l.admin_addr, stats = ?l.stats_addr,
        "skein-proxy started"
    );
    let admins: Vec<_> =
        admin.into_iter().map(|l| tokio::spawn(admin::serve(l, state.clone(), admin::Scope::Full))).collect();
    shutdown.cancelled().await;
    for a in admins {
        let _ = a.await;
    }
    Ok(())
}
