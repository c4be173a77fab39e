//! The shell around the pure parts: watchers fill the [`Snapshot`], a loop recomputes the mesh
//! and publishes it to the [`ConfigHub`], and (on the leader only) a loop writes status
//! conditions and events.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use skein_api::constants::FIELD_MANAGER;
use skein_api::{OutlierPolicy, PolicyStatus, RetryPolicy, TrafficRoute};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::compute::{compute, ResourceKind, ResourceRef};
use crate::hub::ConfigHub;
use crate::metrics::{ErrorLabels, Metrics};
use crate::snapshot::{ObjectKey, Snapshot, SnapshotObject};
use crate::status;

/// Quiet time after a change before recomputing, so a burst of watch events costs one
/// computation.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Bound on one status write.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// The number of watchers [`spawn_watchers`] starts.
pub const WATCHERS: usize = 6;

/// Starts one watcher per kind (namespaced to `namespace` when given).
pub fn spawn_watchers(ctx: &Arc<Context>, namespace: Option<&str>, shutdown: &CancellationToken) {
    spawn_watcher::<TrafficRoute>(ctx, namespace, shutdown);
    spawn_watcher::<OutlierPolicy>(ctx, namespace, shutdown);
    spawn_watcher::<RetryPolicy>(ctx, namespace, shutdown);
    spawn_watcher::<Service>(ctx, namespace, shutdown);
    spawn_watcher::<EndpointSlice>(ctx, namespace, shutdown);
    spawn_watcher::<Pod>(ctx, namespace, shutdown);
}

fn spawn_watcher<K>(ctx: &Arc<Context>, namespace: Option<&str>, shutdown: &CancellationToken)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + SnapshotObject
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let ctx = ctx.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let kind = K::kind(&());
        let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
        // Keys seen since the last (re)list started; what is not seen again is gone.
        let mut relisted: Option<Vec<ObjectKey>> = None;
        let mut synced_once = false;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => match event {
                    Some(e) => e,
                    None => return,
                },
            };
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    // One bad object or a dropped watch never stops the loop: log, back off, go on.
                    tracing::warn!(%kind, error = %e, "watch error");
                    ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { kind: "watch" }).inc();
                    continue;
                }
            };
            {
                let mut snapshot = ctx.snapshot.write().unwrap_or_else(|e| e.into_inner());
                match event {
                    watcher::Event::Init => relisted = Some(Vec::new()),
                    watcher::Event::InitApply(obj) => {
                        if let Some(seen) = relisted.as_mut() {
                            seen.push(ObjectKey::of(&obj));
                        }
                        obj.apply(&mut snapshot);
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
                    }
                    watcher::Event::Apply(obj) => obj.apply(&mut snapshot),
                    watcher::Event::Delete(obj) => K::delete(&ObjectKey::of(&obj), &mut snapshot),
                }
            }
            ctx.snapshot_changed.notify_one();
        }
    });
}

/// Recomputes the mesh after every snapshot change, publishes it, and wakes every loop in
/// `computed` (status writer, identity).
pub async fn compute_loop(ctx: Arc<Context>, computed: Vec<Arc<Notify>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.snapshot_changed.notified() => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        let started = Instant::now();
        let mesh = {
            let snapshot = ctx.snapshot.read().unwrap_or_else(|e| e.into_inner());
            compute(&snapshot)
        };
        ctx.hub.publish(Arc::new(mesh));
        ctx.metrics.reconciles.inc();
        ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        for wake in &computed {
            wake.notify_one();
        }
    }
}

/// Writes status and events while this replica leads.
pub async fn status_loop(
    ctx: Arc<Context>,
    computed: Arc<Notify>,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    // What this replica last wrote (per object uid, so a deleted and recreated object starts
    // afresh), so an unchanged status is not written again before the watch echoes it back.
    let mut written: HashMap<ResourceRef, Written> = HashMap::new();
    let mut retry_soon = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = computed.notified() => {}
            _ = ctx.hub.proxies_changed.notified() => {}
            changed = leader.changed() => {
                if changed.is_err() { return; }
                written.clear();
            }
            _ = tokio::time::sleep(Duration::from_secs(5)), if retry_soon => {}
        }
        if !*leader.borrow() {
            continue;
        }
        // Let a burst of acknowledgements land before writing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry_soon = !write_statuses(&ctx, &mut written).await;
    }
}

/// A status this replica wrote, for the object with this uid.
struct Written {
    uid: Option<String>,
    status: PolicyStatus,
}

/// One pass over every resource; returns false when a write failed (to retry soon).
async fn write_statuses(ctx: &Context, written: &mut HashMap<ResourceRef, Written>) -> bool {
    let mesh = ctx.hub.mesh();
    let (proxies, current) = ctx.hub.proxies();
    let version_of = |id: &skein_api::WorkloadIdentity| {
        current.get(id).cloned().unwrap_or_else(|| mesh.proxy_config(id).version)
    };
    let now = Time(Timestamp::now());
    let mut ok = true;
    written.retain(|r, _| mesh.statuses.contains_key(r));
    for (resource, desired) in &mesh.statuses {
        let Some((existing, reference)) = current_status(ctx, resource) else { continue };
        let programmed = status::programmed(&desired.accepted, &proxies, version_of);
        let ours = written.get(resource).filter(|w| w.uid == reference.uid).map(|w| &w.status);
        let base = ours.or(existing.as_ref());
        let new = status::merge(base, desired, &programmed, &now);
        if status::same(base, &new) {
            continue;
        }
        match patch_status(ctx, resource, &new).await {
            Ok(()) => {
                ctx.metrics.status_writes.inc();
                for c in status::transitions(base, &new) {
                    let event = Event {
                        type_: if c.status == "True" { EventType::Normal } else { EventType::Warning },
                        reason: c.reason.clone(),
                        note: Some(format!("{}={}: {}", c.type_, c.status, c.message)),
                        action: "Reconcile".into(),
                        secondary: None,
                    };
                    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                        tracing::warn!(%resource.key, error = %e, "could not publish event");
                    }
                }
                written.insert(resource.clone(), Written { uid: reference.uid.clone(), status: new });
            }
            Err(e) => {
                ok = false;
                tracing::warn!(kind = resource.kind.as_str(), key = %resource.key, error = %e, "status write failed");
                ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { kind: "status" }).inc();
            }
        }
    }
    ok
}

fn current_status(ctx: &Context, resource: &ResourceRef) -> Option<(Option<PolicyStatus>, ObjectReference)> {
    let snapshot = ctx.snapshot.read().unwrap_or_else(|e| e.into_inner());
    match resource.kind {
        ResourceKind::TrafficRoute => {
            snapshot.routes.get(&resource.key).map(|o| (o.status.clone(), o.object_ref(&())))
        }
        ResourceKind::OutlierPolicy => {
            snapshot.outlier_policies.get(&resource.key).map(|o| (o.status.clone(), o.object_ref(&())))
        }
        ResourceKind::RetryPolicy => {
            snapshot.retry_policies.get(&resource.key).map(|o| (o.status.clone(), o.object_ref(&())))
        }
    }
}

async fn patch_status(
    ctx: &Context,
    resource: &ResourceRef,
    status: &PolicyStatus,
) -> Result<(), kube::Error> {
    let (ns, name) = (&resource.key.namespace, &resource.key.name);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let body = |api_version: String| {
        serde_json::json!({
            "apiVersion": api_version,
            "kind": resource.kind.as_str(),
            "status": status,
        })
    };
    let write = async {
        match resource.kind {
            ResourceKind::TrafficRoute => {
                let api: Api<TrafficRoute> = Api::namespaced(ctx.client.clone(), ns);
                api.patch_status(name, &params, &Patch::Apply(body(TrafficRoute::api_version(&()).into())))
                    .await
                    .map(drop)
            }
            ResourceKind::OutlierPolicy => {
                let api: Api<OutlierPolicy> = Api::namespaced(ctx.client.clone(), ns);
                api.patch_status(name, &params, &Patch::Apply(body(OutlierPolicy::api_version(&()).into())))
                    .await
                    .map(drop)
            }
            ResourceKind::RetryPolicy => {
                let api: Api<RetryPolicy> = Api::namespaced(ctx.client.clone(), ns);
                api.patch_status(name, &params, &Patch::Apply(body(RetryPolicy::api_version(&()).into())))
                    .await
                    .map(drop)
            }
        }
    };
    match tokio::time::timeout(STATUS_TIMEOUT, write).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service("status write timed out".into())),
    }
}
