//! skein-proxy, the Skein sidecar. For now it holds the config the operator pushes (and the last
//! good one on disk) and exposes it on its admin port; the data plane builds on this.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config_store;
pub mod control;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

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
    #[error("invalid --control-plane URL {0:?}: use http://host:port")]
    ControlPlaneUrl(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Command line of `skein-proxy`; every flag can also come from the environment.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "skein-proxy", version, about = "The Skein sidecar proxy")]
pub struct Args {
    /// The operator's config stream, such as http://skein-operator.skein-system:15012.
    #[arg(long, env = "SKEIN_CONTROL_PLANE")]
    pub control_plane: String,
    /// This workload's identity, `<namespace>/<service-account>`.
    #[arg(long, env = "SKEIN_IDENTITY", value_parser = parse_identity)]
    pub identity: WorkloadIdentity,
    /// This proxy's name in the operator's status (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub proxy_id: Option<String>,
    /// Admin server address.
    #[arg(long, env = "SKEIN_ADMIN_ADDR", default_value = "0.0.0.0:15000")]
    pub admin_addr: SocketAddr,
    /// Directory for the last good config (start-up fallback when the operator is unreachable).
    #[arg(long, env = "SKEIN_STATE_DIR", default_value = "/var/run/skein")]
    pub state_dir: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SKEIN_LOG_JSON")]
    pub log_json: bool,
}

fn parse_identity(s: &str) -> Result<WorkloadIdentity, String> {
    s.parse()
}

/// Runs the proxy until `shutdown` fires (or `POST /shutdown`).
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<()> {
    let url: Uri =
        args.control_plane.parse().map_err(|_| Error::ControlPlaneUrl(args.control_plane.clone()))?;
    if url.scheme_str() != Some("http") || url.host().is_none() {
        return Err(Error::ControlPlaneUrl(args.control_plane.clone()));
    }
    let admin = TcpListener::bind(args.admin_addr)
        .await
        .map_err(|source| Error::Bind { addr: args.admin_addr, source })?;

    let store = Arc::new(config_store::ConfigStore::new(Some(args.state_dir.clone())));
    if store.load_persisted() {
        tracing::info!(dir = %args.state_dir.display(), "started from the last good config");
    }
    let stream = Arc::new(control::StreamStatus::default());
    let proxy_id = args
        .proxy_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", args.identity.service_account, std::process::id()));
    let cp = control::ControlPlane { url, identity: args.identity.clone(), proxy_id };
    tokio::spawn(control::run(cp, store.clone(), stream.clone(), shutdown.clone()));

    let state = Arc::new(admin::AdminState { store, stream, shutdown: shutdown.clone() });
    tracing::info!(admin = %args.admin_addr, identity = %args.identity, "skein-proxy started");
    admin::serve(admin, state).await;
    Ok(())
}
