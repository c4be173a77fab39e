//! Wiring: the control plane against an API server (watchers, computation, leader election,
//! status, identity, webhook, config stream, metrics) or from a directory of manifests; and the
//! errors that stop the operator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Config};
use prometheus_client::registry::Registry;
use skein_api::constants::LEADER_LEASE;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::admission::{inject, webhook};
use crate::args::Args;
use crate::identity::ca::SharedCa;
use crate::identity::serving;
use crate::k8s::identity as secrets;
use crate::k8s::permissions::Permissions;
use crate::k8s::{controller, leader, proxy_reports, status_writer};
use crate::stream::{hub, server};
use crate::{local, metrics, web};

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
    Identity(#[source] secrets::IdentityError),
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

async fn client(args: &Args) -> Result<Client> {
    let config = match &args.cluster.kubeconfig {
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
    if !args.local.dirs.is_empty() {
        let dirs = args.local.dirs.clone();
        return run_local(args, dirs, shutdown).await;
    }
    let client = client(&args).await?;
    let instance = args.cluster.instance.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        format!("{}-{}", if host.is_empty() { "skein-operator" } else { &host }, std::process::id())
    });
    let stream_listener = bind(args.stream.stream_addr).await?;
    let http_listener = bind(args.cluster.metrics_addr).await?;

    let metrics = metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let hub = hub::ConfigHub::new(metrics.clone());
    let reporter = Reporter { controller: "skein-operator".into(), instance: Some(instance.clone()) };
    let recorder = Recorder::new(client.clone(), reporter);
    // The operator's own pod, where its MissingPermission events go (only in a pod).
    let own_pod = args.cluster.instance.as_ref().map(|name| k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.clone()),
        namespace: Some(args.cluster.namespace.clone()),
        uid: args.cluster.pod_uid.clone(),
        ..Default::default()
    });
    let permissions = Arc::new(Permissions::new(recorder.clone(), own_pod, metrics.clone()));
    let ctx = Arc::new(controller::Context {
        client: client.clone(),
        snapshot: RwLock::new(crate::Snapshot { default_policy: args.default_policy, ..Default::default() }),
        snapshot_changed: Notify::new(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        synced: watch::Sender::new(0),
        recorder,
        peers: Arc::default(),
        instance: instance.clone(),
        permissions: permissions.clone(),
        issued: Arc::default(),
    });
    tokio::spawn(proxy_reports::publish(
        client.clone(),
        hub.clone(),
        args.cluster.namespace.clone(),
        instance.clone(),
        permissions.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(proxy_reports::watch_reports(
        client.clone(),
        metrics.clone(),
        args.cluster.namespace.clone(),
        ctx.peers.clone(),
        permissions.clone(),
        shutdown.clone(),
    ));

    let ca_name =
        args.identity.ca_secret.clone().unwrap_or_else(|| skein_api::constants::CA_SECRET.to_string());
    let ca = secrets::load_or_create_ca(
        &client,
        &args.cluster.namespace,
        &ca_name,
        args.identity.ca_secret.is_none(),
        &args.identity.trust_domain,
    )
    .await;
    let ca = match ca {
        Ok(ca) => ca,
        Err(e) => {
            if let secrets::IdentityError::Kube(k) = &e {
                let needed_for = format!("load the mesh CA from Secret {}/{ca_name}", args.cluster.namespace);
                permissions.check(k, &needed_for).await;
            }
            return Err(Error::Identity(e));
        }
    };
    let ca: SharedCa = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    // Wakes the identity loop: after each computation, and when the CA changes (a rotation
    // publishes the new trust bundle and re-issues certificates at once).
    let identity_wake = Arc::new(Notify::new());
    tokio::spawn(secrets::watch_ca(
        client.clone(),
        args.cluster.namespace.clone(),
        ca_name.clone(),
        ca.clone(),
        identity_wake.clone(),
        metrics.clone(),
        permissions.clone(),
        shutdown.clone(),
    ));

    // The admission webhook: serving certificate from the mesh CA, hot-swapped when renewed.
    let minor = match client.apiserver_version().await {
        Ok(v) if v.major == "1" => v.minor.trim_end_matches('+').parse().unwrap_or(0),
        Ok(_) => 0,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API server version; injecting classic sidecars");
            0
        }
    };
    let native_sidecars = minor >= 29;
    let (dns, ips) = serving::serving_names(
        &args.cluster.service_name,
        &args.cluster.namespace,
        &args.webhook.webhook_san,
    );
    let (serving, not_after) =
        serving::ServingCert::issue(&ca.load(), &dns, &ips).map_err(Error::Certificates)?;
    let serving = Arc::new(serving);
    let webhook_listener = bind(args.webhook.webhook_addr).await?;
    controller::spawn_watchers(&ctx, args.cluster.watch_namespace.as_deref(), &shutdown);
    let computed = Arc::new(Notify::new());
    tokio::spawn(controller::compute_loop(
        ctx.clone(),
        vec![computed.clone(), identity_wake.clone()],
        shutdown.clone(),
    ));

    let (leader_tx, leader_rx) = watch::channel(false);
    let election = tokio::spawn(leader::run(
        client.clone(),
        args.cluster.namespace.clone(),
        LEADER_LEASE.into(),
        instance.clone(),
        leader_tx,
        permissions.clone(),
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
    tokio::spawn(secrets::run(
        ctx.clone(),
        ca.clone(),
        secrets::IdentitySettings {
            trust_domain: args.identity.trust_domain.clone(),
            lifetime: args.identity.cert_lifetime,
        },
        identity_wake,
        leader_rx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(status_writer::status_loop(ctx.clone(), computed, leader_rx, shutdown.clone()));

    let (ready_tx, ready_rx) = watch::channel(false);
    {
        let mut synced = ctx.synced.subscribe();
        tokio::spawn(async move {
            let _ = synced.wait_for(|n| *n >= controller::WATCHERS).await;
            ready_tx.send_replace(true);
            tracing::info!("every watcher has listed: ready");
        });
    }
    let w = &args.webhook;
    let control_plane = w.control_plane_url.clone().unwrap_or_else(|| {
        format!(
            "https://{}.{}.svc:{}",
            args.cluster.service_name,
            args.cluster.namespace,
            args.stream.stream_addr.port()
        )
    });
    let inject = inject::InjectConfig {
        sleep_hooks: minor >= 30,
        capture: w.capture_mode,
        inbound: w.inbound_mode,
        resources: inject::ProxyResources {
            cpu_request: w.proxy_cpu_request.clone(),
            memory_request: w.proxy_memory_request.clone(),
            cpu_limit: Some(w.proxy_cpu_limit.clone()).filter(|l| !l.is_empty()),
            memory_limit: Some(w.proxy_memory_limit.clone()).filter(|l| !l.is_empty()),
        },
        log_level: w.proxy_log_level.clone(),
        log_format: w.proxy_log_format,
        drain_seconds: w.drain_seconds,
        ..inject::InjectConfig::new(&w.proxy_image, &control_plane, &args.cluster.namespace, native_sidecars)
    };
    let webhook_state = Arc::new(
        webhook::WebhookState::new(
            Some(client.clone()),
            ca.clone(),
            inject,
            args.identity.trust_domain.clone(),
            args.identity.cert_lifetime,
            metrics.clone(),
        )
        .with_permissions(permissions.clone()),
    );
    tokio::spawn(webhook::serve(
        webhook_listener,
        webhook::router(webhook_state),
        serving.clone(),
        shutdown.clone(),
    ));
    let stream_tls = server::StreamTls {
        cert: serving.clone(),
        ca: ca.clone(),
        require_client_cert: !args.stream.insecure_plaintext_stream,
    };
    tokio::spawn(webhook::maintain(
        client.clone(),
        args.webhook.webhook_configuration.clone(),
        ca.clone(),
        serving,
        not_after,
        dns,
        ips,
        permissions.clone(),
        shutdown.clone(),
    ));
    let http_state = Arc::new(web::HttpState { registry, ready: ready_rx, hub: hub.clone() });
    tokio::spawn(web::serve(http_listener, http_state, shutdown.clone()));
    tracing::info!(
        stream = %args.stream.stream_addr, metrics = %args.cluster.metrics_addr, %instance,
        watch_namespace = args.cluster.watch_namespace.as_deref().unwrap_or("(all)"),
        "skein-operator started"
    );
    server::serve_with(stream_listener, hub, Some(stream_tls), shutdown.clone()).await;

    // The stream server returns on shutdown; give the Lease back before exiting.
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    Ok(())
}

/// The control plane from a directory of manifests (see [`crate::local`]).
pub async fn run_local(args: Args, dirs: Vec<PathBuf>, shutdown: CancellationToken) -> Result<()> {
    let stream_listener = bind(args.stream.stream_addr).await?;
    let http_listener = bind(args.cluster.metrics_addr).await?;
    let metrics = metrics::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let hub = hub::ConfigHub::new(metrics);
    let state = args.local.local_state.clone().unwrap_or_else(|| dirs[0].join(".skein"));
    let ca = local::ensure_ca(&state, &args.identity.trust_domain).map_err(Error::Certificates)?;
    // The stream serves TLS as in a cluster (a certificate for --webhook-san, 127.0.0.1 and
    // localhost by default); proxies with a workload certificate prove their identity with it.
    let (dns, ips) = serving::serving_names(
        &args.cluster.service_name,
        &args.cluster.namespace,
        &args.webhook.webhook_san,
    );
    let (serving, not_after) = serving::ServingCert::issue(&ca, &dns, &ips).map_err(Error::Certificates)?;
    let serving = Arc::new(serving);
    let ca: SharedCa = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    tokio::spawn(local::renew_serving_cert(
        serving.clone(),
        ca.clone(),
        not_after,
        dns,
        ips,
        shutdown.clone(),
    ));
    let stream_tls = server::StreamTls {
        cert: serving,
        ca: ca.clone(),
        require_client_cert: !args.stream.insecure_plaintext_stream,
    };
    let identity = local::LocalIdentity {
        ca,
        state,
        trust_domain: args.identity.trust_domain.clone(),
        lifetime: args.identity.cert_lifetime,
    };
    tokio::spawn(local::run(
        dirs.clone(),
        hub.clone(),
        Some(identity),
        args.default_policy,
        shutdown.clone(),
    ));
    let (_ready_tx, ready_rx) = watch::channel(true);
    tokio::spawn(web::serve(
        http_listener,
        Arc::new(web::HttpState { registry, ready: ready_rx, hub: hub.clone() }),
        shutdown.clone(),
    ));
    tracing::info!(dirs = ?dirs, stream = %args.stream.stream_addr, metrics = %args.cluster.metrics_addr, "skein-operator started (local)");
    server::serve_with(stream_listener, hub, Some(stream_tls), shutdown).await;
    Ok(())
}
