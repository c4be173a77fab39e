//! The shell around the pure parts: watchers fill the [`Snapshot`] and a loop recomputes the
//! mesh and publishes it to the [`ConfigHub`]. The status writer (`super::status_writer`) and
//! the identity loop are woken after each computation.

use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::events::Recorder;
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use skein_api::{AccessPolicy, OutlierPolicy, RetryPolicy, TrafficRoute};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::compute::snapshot::{ObjectKey, Snapshot, SnapshotObject};
use crate::compute::{compute, compute_incremental, MeshConfig};
use crate::metrics::{ErrorLabels, Metrics};
use crate::stream::hub::ConfigHub;
use skein_api::constants::DEFAULT_POLICY_ANNOTATION;

/// Quiet time after a change before recomputing, so the events of one write (an object and
/// what the operator's own watchers see of it) cost one computation; events arriving during a
/// computation are taken by the next one. 5 ms, measured against 20 ms at 1,000 proxies
/// through the test API server (docs/decisions.md): p90 42-87 ms against 70-120 ms, at no more
/// operator CPU.
const DEBOUNCE: Duration = Duration::from_millis(5);

/// Shared state of the control loops.
pub struct Context {
    pub client: Client,
    pub snapshot: RwLock<Snapshot>,
    pub snapshot_changed: Notify,
    pub hub: ConfigHub,
    pub metrics: Metrics,
    /// Watchers that have finished their first list; ready when all have.
    pub synced: watch::Sender<usize>,
    pub recorder: Recorder,
    /// The proxies the other operator replicas serve (read by the leader's status writer).
    pub peers: Arc<super::proxy_reports::PeerReports>,
    /// This replica's name (its pod's), as its proxy report names it.
    pub instance: String,
    /// Refusals for want of an RBAC permission, reported once and clearly.
    pub permissions: Arc<super::permissions::Permissions>,
    /// The certificates this replica issued (the identity loop's and the webhook's record).
    pub issued: Arc<crate::identity::Issued>,
}

/// The number of watchers [`spawn_watchers`] starts.
pub const WATCHERS: usize = 9;

/// Starts one watcher per kind (namespaced to `namespace` when given: then only that
/// Namespace object is watched).
pub fn spawn_watchers(ctx: &Arc<Context>, namespace: Option<&str>, shutdown: &CancellationToken) {
    fn api<K>(ctx: &Context, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        }
    }
    let all = watcher::Config::default();
    spawn_watcher(ctx, api::<TrafficRoute>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<OutlierPolicy>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<RetryPolicy>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<AccessPolicy>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<Service>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<EndpointSlice>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<Pod>(ctx, namespace), all.clone(), shutdown);
    spawn_watcher(ctx, api::<ServiceAccount>(ctx, namespace), all.clone(), shutdown);
    let namespaces = match namespace {
        Some(ns) => all.fields(&format!("metadata.name={ns}")),
        None => all,
    };
    spawn_watcher(ctx, Api::<Namespace>::all(ctx.client.clone()), namespaces, shutdown);
}

fn spawn_watcher<K>(ctx: &Arc<Context>, api: Api<K>, config: watcher::Config, shutdown: &CancellationToken)
where
    K: Resource<DynamicType = ()> + SnapshotObject + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let ctx = ctx.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let kind = K::kind(&());
        let mut events = watcher(api, config).default_backoff().boxed();
        // Keys seen since the last (re)list started; what is not seen again is gone.
        let mut relisted: Option<Vec<ObjectKey>> = None;
        let mut synced_once = false;
        loop {
            let Some(Some(event)) = shutdown.run_until_cancelled(events.next()).await else { return };
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    // One bad object or a dropped watch never stops the loop: log, back off, go on.
                    // A missing permission is said once, by name, instead of at every retry.
                    if ctx.permissions.check_watch(&e, &format!("watch {kind}s")).await.is_none() {
                        tracing::warn!(%kind, error = %e, "watch error");
                    }
                    ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { kind: "watch" }).inc();
                    continue;
                }
            };
            // Whether the computation's input changed: the operator's own status writes come back
            // as events that change nothing it reads, and start no computation.
            let changed = {
                let mut snapshot = ctx.snapshot.write().unwrap_or_else(|e| e.into_inner());
                match event {
                    watcher::Event::Init => {
                        relisted = Some(Vec::new());
                        false
                    }
                    watcher::Event::InitApply(obj) => {
                        if let Some(seen) = relisted.as_mut() {
                            seen.push(obj.key_of());
                        }
                        obj.apply(&mut snapshot)
                    }
                    watcher::Event::InitDone => {
                        if let Some(seen) = relisted.take() {
                            let seen: std::collections::HashSet<_> = seen.into_iter().collect();
                            for key in K::keys(&snapshot).into_iter().filter(|k| !seen.contains(k)) {
                                K::delete(&key, &mut snapshot);
                            }
                        }
                        if !synced_once {
                            synced_once = true;
                            ctx.synced.send_modify(|n| *n += 1);
                            tracing::info!(%kind, "initial list done");
                        }
                        true
                    }
                    watcher::Event::Apply(obj) => obj.apply(&mut snapshot),
                    watcher::Event::Delete(obj) => K::delete(&obj.key_of(), &mut snapshot),
                }
            };
            if changed {
                ctx.snapshot_changed.notify_one();
            }
        }
    });
}

/// Recomputes the mesh after every snapshot change, publishes it, and wakes every loop in
/// `computed` (status writer, identity).
pub async fn compute_loop(ctx: Arc<Context>, computed: Vec<Arc<Notify>>, shutdown: CancellationToken) {
    // Warned of once per change, not at every computation.
    let mut bad_defaults = std::collections::BTreeMap::new();
    let mut bad_scopes = std::collections::BTreeMap::new();
    // The last mesh computed: the next reuses what the snapshot's changes did not touch.
    let mut previous: Option<Arc<MeshConfig>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.snapshot_changed.notified() => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        let started = Instant::now();
        let mesh = {
            // Written to by no watcher while computing, so the changes taken are exactly those
            // between `previous` and what is computed.
            let mut snapshot = ctx.snapshot.write().unwrap_or_else(|e| e.into_inner());
            let changes = snapshot.take_changes();
            match &previous {
                Some(previous) => compute_incremental(&snapshot, previous, &changes),
                None => compute(&snapshot),
            }
        };
        if mesh.bad_namespace_defaults != bad_defaults {
            for (ns, value) in &mesh.bad_namespace_defaults {
                tracing::warn!(
                    namespace = %ns,
                    value = %value,
                    "annotation {DEFAULT_POLICY_ANNOTATION} is not allow, authenticated, same-namespace or deny: the namespace denies every call no Allow policy allows"
                );
            }
            bad_defaults = mesh.bad_namespace_defaults.clone();
        }
        if mesh.scope_problems() != &bad_scopes {
            for (object, why) in mesh.scope_problems() {
                tracing::warn!(%object, %why, "annotation skein.dev/destinations does not parse: its workloads receive every Service");
            }
            bad_scopes = mesh.scope_problems().clone();
        }
        let mesh = Arc::new(mesh);
        previous = Some(mesh.clone());
        ctx.hub.publish(mesh);
        ctx.metrics.reconciles.inc();
        ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        for wake in &computed {
            wake.notify_one();
        }
    }
}
