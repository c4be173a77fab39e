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
use crate::{admin, config, listener};

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

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
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

    let outbound = bind(args.listeners.outbound_addr).await?;
    let inbound = bind(args.listeners.inbound_addr).await?;
    let admin = bind(args.listeners.admin_addr).await?;
    let access_log = match args.proxy.access_log {
        AccessLogMode::Stdout => AccessLog::stdout(),
        AccessLogMode::Off => AccessLog::off(),
    };
    let mut ctx = ProxyContext::new(
        store.clone(),
        access_log,
        args.listeners.inbound_target,
        Duration::from_millis(args.proxy.connect_timeout_ms),
    );
    ctx.fast_path = args.proxy.http1_fast_path;
    ctx.inbound_strict = args.identity.inbound_mode == InboundMode::Strict;
    ctx.tls = tls.clone();
    let ctx = Arc::new(ctx);
    tokio::spawn(listener::serve(outbound, ctx.clone(), Direction::Outbound, shutdown.clone()));
    tokio::spawn(listener::serve(inbound, ctx, Direction::Inbound, shutdown.clone()));

    let state = Arc::new(admin::AdminState {
        store,
        stream,
        tls,
        needs_cert: args.identity.cert_dir.is_some(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(
        outbound = %args.listeners.outbound_addr, inbound = %args.listeners.inbound_addr, admin = %args.listeners.admin_addr,
        "skein-proxy started"
    );
    admin::serve(admin, state).await;
    Ok(())
}
