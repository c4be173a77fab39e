//! The Skein control plane: watches TrafficRoutes, OutlierPolicies, RetryPolicies, Services,
//! EndpointSlices and Pods; computes one `ProxyConfig` per workload identity; pushes it to every
//! connected sidecar over the config stream; and (on the leader) reports status conditions and
//! events on every Skein resource.
#![forbid(unsafe_code)]

pub mod ca;
pub mod compute;
pub mod controller;
pub mod crdgen;
pub mod hub;
pub mod identity;
pub mod inject;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod schema_check;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod stream;
pub mod topology;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Config};
use prometheus_client::registry::Registry;
use skein_api::constants::{DEFAULT_OPERATOR_NAMESPACE, DEFAULT_TRUST_DOMAIN, LEADER_LEASE};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no usable Kubernetes configuration (set KUBECONFIG or run in a cluster)")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("mesh CA")]
    Identity(#[source] identity::IdentityError),
    #[error("certificates: {0}")]
    Certificates(String),
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Command line of `skein-operator`; every flag can also come from the environment.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "skein-operator", version, about = "The Skein service mesh control plane")]
pub struct Args {
    /// Kubeconfig file; without it, KUBECONFIG or the in-cluster service account is used.
    #[arg(long, env = "SKEIN_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The operator's own namespace (its Lease and, later, its CA live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_OPERATOR_NAMESPACE)]
    pub namespace: String,
    /// Watch only this namespace instead of the whole cluster.
    #[arg(long, env = "SKEIN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "SKEIN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of the config stream.
    #[arg(long, env = "SKEIN_STREAM_ADDR", default_value = "0.0.0.0:15012")]
    pub stream_addr: SocketAddr,
    /// This replica's name in the leader Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,
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
    /// Address of the admission webhook (HTTPS).
    #[arg(long, env = "SKEIN_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// Extra names (DNS or IP) of the webhook's serving certificate, besides its Service's DNS names.
    #[arg(long, env = "SKEIN_WEBHOOK_SAN", value_delimiter = ',', default_values_t = ["127.0.0.1".to_string(), "localhost".to_string()])]
    pub webhook_san: Vec<String>,
    /// The MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    #[arg(long, env = "SKEIN_WEBHOOK_CONFIGURATION", default_value = webhook::WEBHOOK_CONFIGURATION)]
    pub webhook_configuration: String,
    /// Name of the operator's Service (the webhook's and the config stream's DNS name).
    #[arg(long, env = "SKEIN_SERVICE_NAME", default_value = "skein-operator")]
    pub service_name: String,
    /// Image of the injected sidecar.
    #[arg(long, env = "SKEIN_PROXY_IMAGE", default_value = concat!("ghcr.io/skein-mesh/skein-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// Config stream URL injected sidecars connect to; by default the operator's Service.
    #[arg(long, env = "SKEIN_CONTROL_PLANE_URL")]
    pub control_plane_url: Option<String>,
    /// Refuse config-stream clients without a mesh client certificate (plaintext streams that
    /// name their identity in a header are for development).
    #[arg(long, env = "SKEIN_STREAM_REQUIRE_MTLS")]
    pub stream_require_mtls: bool,
    /// Run from a directory of manifests instead of an API server (the local mesh): the same
    /// computation and config stream, the snapshot read from files and re-read on change.
    /// Repeat it to read several directories as one (in the environment: separated by `:`).
    #[arg(long, env = "SKEIN_LOCAL_DIR", value_delimiter = ':')]
    pub local: Vec<PathBuf>,
    /// With --local: where the CA and the issued workload certificates are kept
    /// (`ca/`, `identities/<ns>/<sa>/`); `<first DIR>/.skein` by default.
    #[arg(long, env = "SKEIN_LOCAL_STATE")]
    pub local_state: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SKEIN_LOG_JSON")]
    pub log_json: bool,
}

fn parse_lifetime(s: &str) -> std::result::Result<Duration, String> {
    let d = skein_api::duration::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(60) {
        return Err("certificate lifetime must be at least 1m".into());
    }
    Ok(d)
}

async fn client(args: &Args) -> Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?
        }
        None => Config::infer().await.map_err(Error::InferConfig)?,
    };
    Client::try_from(config).map_err(Error::Client)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// Runs the operator until `shutdown` fires.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<()> {
    if !args.local.is_empty() {
        let dirs = args.local.clone();
        return run_local(args, dirs, shutdown).await;
    }
    let client = client(&args).await?;
    let instance = args.instance.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("{}-{}", if host.is_empty() { "skein-operator" } else { &host }, std::process::id())
    });
    let stream_listener = bind(args.stream_addr).await?;
    let http_listener = bind(args.metrics_addr).await?;

    let metrics = metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let hub = hub::ConfigHub::new(metrics.clone());
    let reporter = Reporter { controller: "skein-operator".into(), instance: Some(instance.clone()) };
    let ctx = Arc::new(controller::Context {
        client: client.clone(),
        snapshot: RwLock::default(),
        snapshot_changed: Notify::new(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        synced: watch::Sender::new(0),
        recorder: Recorder::new(client.clone(), reporter),
    });

    let ca_name = args.ca_secret.clone().unwrap_or_else(|| skein_api::constants::CA_SECRET.to_string());
    let ca = identity::load_or_create_ca(
        &client,
        &args.namespace,
        &ca_name,
        args.ca_secret.is_none(),
        &args.trust_domain,
    )
    .await
    .map_err(Error::Identity)?;
    let ca: ca::SharedCa = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    tokio::spawn(identity::watch_ca(
        client.clone(),
        args.namespace.clone(),
        ca_name.clone(),
        ca.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    // The admission webhook: serving certificate from the mesh CA, hot-swapped when renewed.
    let native_sidecars = match client.apiserver_version().await {
        Ok(v) => {
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            v.major == "1" && minor >= 29
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API server version; injecting classic sidecars");
            false
        }
    };
    let (dns, ips) = webhook::serving_names(&args.service_name, &args.namespace, &args.webhook_san);
    let (serving, not_after) =
        webhook::ServingCert::issue(&ca.load(), &dns, &ips).map_err(Error::Certificates)?;
    let serving = Arc::new(serving);
    let webhook_listener = bind(args.webhook_addr).await?;
    controller::spawn_watchers(&ctx, args.watch_namespace.as_deref(), &shutdown);
    let computed = Arc::new(Notify::new());
    let identity_wake = Arc::new(Notify::new());
    tokio::spawn(controller::compute_loop(
        ctx.clone(),
        vec![computed.clone(), identity_wake.clone()],
        shutdown.clone(),
    ));

    let (leader_tx, leader_rx) = watch::channel(false);
    let election = tokio::spawn(leader::run(
        client.clone(),
        args.namespace.clone(),
        LEADER_LEASE.into(),
        instance.clone(),
        leader_tx,
        shutdown.clone(),
    ));
    {
        let metrics = metrics.clone();
        let mut leader_rx = leader_rx.clone();
        tokio::spawn(async move {
            while leader_rx.changed().await.is_ok() {
                metrics.leader.set(i64::from(*leader_rx.borrow()));
            }
        });
    }
    tokio::spawn(identity::run(
        ctx.clone(),
        ca.clone(),
        identity::IdentitySettings { trust_domain: args.trust_domain.clone(), lifetime: args.cert_lifetime },
        identity_wake,
        leader_rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(controller::status_loop(ctx.clone(), computed, leader_rx, shutdown.clone()));

    let (ready_tx, ready_rx) = watch::channel(false);
    {
        let mut synced = ctx.synced.subscribe();
        tokio::spawn(async move {
            let _ = synced.wait_for(|n| *n >= controller::WATCHERS).await;
            ready_tx.send_replace(true);
            tracing::info!("every watcher has listed: ready");
        });
    }
    let inject = inject::InjectConfig {
        proxy_image: args.proxy_image.clone(),
        control_plane: args.control_plane_url.clone().unwrap_or_else(|| {
            format!("https://{}.{}.svc:{}", args.service_name, args.namespace, args.stream_addr.port())
        }),
        operator_namespace: args.namespace.clone(),
        native_sidecars,
    };
    let webhook_state = Arc::new(webhook::WebhookState::new(
        Some(client.clone()),
        ca.clone(),
        inject,
        args.trust_domain.clone(),
        args.cert_lifetime,
        metrics.clone(),
    ));
    tokio::spawn(webhook::serve(
        webhook_listener,
        webhook::router(webhook_state),
        serving.clone(),
        shutdown.clone(),
    ));
    let stream_tls = stream::StreamTls {
        cert: serving.clone(),
        ca: ca.clone(),
        require_client_cert: args.stream_require_mtls,
    };
    tokio::spawn(webhook::maintain(
        client.clone(),
        args.webhook_configuration.clone(),
        ca.clone(),
        serving,
        not_after,
        dns,
        ips,
        shutdown.clone(),
    ));
    let http_state = Arc::new(server::HttpState { registry, ready: ready_rx, hub: hub.clone() });
    tokio::spawn(server::serve(http_listener, http_state, shutdown.clone()));
    tracing::info!(
        stream = %args.stream_addr, metrics = %args.metrics_addr, %instance,
        watch_namespace = args.watch_namespace.as_deref().unwrap_or("(all)"),
        "skein-operator started"
    );
    stream::serve_with(stream_listener, hub, Some(stream_tls), shutdown.clone()).await;

    // The stream server returns on shutdown; give the Lease back before exiting.
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    Ok(())
}

/// The control plane from a directory of manifests (see [`local`]).
pub async fn run_local(args: Args, dirs: Vec<PathBuf>, shutdown: CancellationToken) -> Result<()> {
    let stream_listener = bind(args.stream_addr).await?;
    let http_listener = bind(args.metrics_addr).await?;
    let metrics = metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let hub = hub::ConfigHub::new(metrics);
    let state = args.local_state.clone().unwrap_or_else(|| dirs[0].join(".skein"));
    let ca = local::ensure_ca(&state, &args.trust_domain).map_err(Error::Certificates)?;
    // The stream serves TLS as in a cluster (a certificate for --webhook-san, 127.0.0.1 and
    // localhost by default); proxies with a workload certificate prove their identity with it.
    let (dns, ips) = webhook::serving_names(&args.service_name, &args.namespace, &args.webhook_san);
    let (serving, not_after) = webhook::ServingCert::issue(&ca, &dns, &ips).map_err(Error::Certificates)?;
    let serving = Arc::new(serving);
    let ca: ca::SharedCa = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    tokio::spawn(local::renew_serving_cert(
        serving.clone(),
        ca.clone(),
        not_after,
        dns,
        ips,
        shutdown.clone(),
    ));
    let stream_tls =
        stream::StreamTls { cert: serving, ca: ca.clone(), require_client_cert: args.stream_require_mtls };
    let identity = local::LocalIdentity {
        ca,
        state,
        trust_domain: args.trust_domain.clone(),
        lifetime: args.cert_lifetime,
    };
    tokio::spawn(local::run(dirs.clone(), hub.clone(), Some(identity), shutdown.clone()));
    let (_ready_tx, ready_rx) = watch::channel(true);
    tokio::spawn(server::serve(
        http_listener,
        Arc::new(server::HttpState { registry, ready: ready_rx, hub: hub.clone() }),
        shutdown.clone(),
    ));
    tracing::info!(dirs = ?dirs, stream = %args.stream_addr, metrics = %args.metrics_addr, "skein-operator started (local)");
    stream::serve_with(stream_listener, hub, Some(stream_tls), shutdown).await;
    Ok(())
}
