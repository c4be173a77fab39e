//! Status conditions and events, written by the leader only: after every computation and every
//! change in the connected proxies' acknowledgements, each Skein resource's desired status
//! ([`crate::compute::status`]) is merged with what it has and patched when it differs, with an
//! event for each condition that changed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::Resource;
use skein_api::constants::FIELD_MANAGER;
use skein_api::{AccessPolicy, OutlierPolicy, PolicyStatus, RetryPolicy, TrafficRoute};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::controller::Context;
use crate::compute::snapshot::ObjectKey;
use crate::compute::status;
use crate::compute::{ResourceKind, ResourceRef};
use crate::metrics::ErrorLabels;

/// Bound on one status write.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// A status whose only change is progress (`812/5000 proxies at …` becoming `1630/5000 …`, no
/// condition changing status or reason) is written at most this often per resource: a rollout
/// to 5,000 proxies makes a few writes per resource, not one per acknowledgement. A condition
/// that changes (Programmed turning True) is written at once.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

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
    // Explicit-mode pods told about a policy (policy, pod uid, pod), once per leadership.
    let mut told = HashSet::new();
    let mut wake_in: Option<Duration> = None;
    let mut proxies_changed = ctx.hub.proxies_changed.subscribe();
    let mut peers_changed = ctx.peers.changed.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = computed.notified() => {}
            _ = proxies_changed.changed() => {}
            _ = peers_changed.changed() => {}
            changed = leader.changed() => {
                if changed.is_err() { return; }
                written.clear();
                told.clear();
            }
            _ = tokio::time::sleep(wake_in.unwrap_or_default()), if wake_in.is_some() => {}
        }
        if !*leader.borrow() {
            continue;
        }
        // Let a burst of acknowledgements land before writing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pass = write_statuses(&ctx, &mut written, &mut told).await;
        wake_in = if pass.failed {
            Some(Duration::from_secs(5))
        } else if pass.deferred {
            Some(PROGRESS_INTERVAL)
        } else {
            None
        };
    }
}

/// A status this replica wrote, for the object with this uid, and when.
struct Written {
    uid: Option<String>,
    status: PolicyStatus,
    at: std::time::Instant,
}

/// How a pass went: a write failed (retry in a few seconds), or progress was held back (write
/// it within [`PROGRESS_INTERVAL`]).
#[derive(Default)]
struct Pass {
    failed: bool,
    deferred: bool,
}

/// One pass over every resource.
async fn write_statuses(
    ctx: &Context,
    written: &mut HashMap<ResourceRef, Written>,
    told: &mut HashSet<(ResourceRef, Option<String>, ObjectKey)>,
) -> Pass {
    let mesh = ctx.hub.mesh();
    let (own, current) = ctx.hub.proxies();
    // Proxies connected to the other replicas count too: each reports its own.
    let proxies =
        status::all_proxies(own, ctx.peers.fresh_proxies(&ctx.instance, time::OffsetDateTime::now_utc()));
    let version_of =
        |id: &skein_api::WorkloadIdentity| current.get(id).cloned().unwrap_or_else(|| mesh.version_of(id));
    // What is the same for every resource all proxies need, found once per pass.
    let everyone = status::Roster::new(&proxies, version_of);
    let now = Time(Timestamp::now());
    let mut pass = Pass::default();
    written.retain(|r, _| mesh.statuses.contains_key(r));
    for (resource, desired) in &mesh.statuses {
        let Some((existing, reference)) = current_status(ctx, resource) else { continue };
        let programmed = match &desired.audience {
            Some(audience) => {
                let theirs: Vec<status::ProxyView> =
                    proxies.iter().filter(|p| audience.contains(&p.identity)).cloned().collect();
                status::programmed(&desired.accepted, &theirs, version_of, None)
            }
            None => {
                let since = desired.carried_by.as_ref().and_then(|s| mesh.changed_at(s));
                status::programmed_among(&desired.accepted, &everyone, since)
            }
        };
        tell_explicit_pods(ctx, resource, desired, &mut *told).await;
        let ours = written.get(resource).filter(|w| w.uid == reference.uid).map(|w| &w.status);
        let base = ours.or(existing.as_ref());
        let new = status::merge(base, desired, &programmed, &now);
        if status::same(base, &new) {
            continue;
        }
        let recent = written
            .get(resource)
            .filter(|w| w.uid == reference.uid)
            .is_some_and(|w| w.at.elapsed() < PROGRESS_INTERVAL);
        if recent && status::progress_only(base, &new) {
            pass.deferred = true;
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
                        if ctx.permissions.check(&e, "publish events").await.is_none() {
                            tracing::warn!(%resource.key, error = %e, "could not publish event");
                        }
                    }
                }
                written.insert(
                    resource.clone(),
                    Written { uid: reference.uid.clone(), status: new, at: std::time::Instant::now() },
                );
            }
            Err(e) => {
                pass.failed = true;
                let needed_for = format!("write the status of {} {}", resource.kind.as_str(), resource.key);
                match ctx.permissions.check(&e, &needed_for).await {
                    // Said on the object too, where its user looks (`kubectl describe`).
                    Some(refusal)
                        if ctx.permissions.due_once(&format!(
                            "StatusNotWritten {} {}",
                            resource.kind.as_str(),
                            resource.key
                        )) =>
                    {
                        let event = Event {
                            type_: EventType::Warning,
                            reason: "StatusNotWritten".into(),
                            note: Some(format!(
                                "the operator {}: the conditions shown here are stale until its RBAC is fixed",
                                refusal.missing
                            )),
                            action: "Reconcile".into(),
                            secondary: None,
                        };
                        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
                            ctx.permissions.check(&e, "publish events").await;
                        }
                    }
                    Some(_) => {}
                    None => {
                        tracing::warn!(kind = resource.kind.as_str(), key = %resource.key, error = %e, "status write failed")
                    }
                }
                ctx.metrics.reconcile_errors.get_or_create(&ErrorLabels { kind: "status" }).inc();
            }
        }
    }
    pass
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
        ResourceKind::AccessPolicy => {
            snapshot.access_policies.get(&resource.key).map(|o| (o.status.clone(), o.object_ref(&())))
        }
    }
}

/// A Warning event on each target pod of an AccessPolicy that runs in explicit capture mode
/// (nothing can be enforced there), once per pod and policy while this replica leads.
async fn tell_explicit_pods(
    ctx: &Context,
    resource: &ResourceRef,
    desired: &crate::compute::DesiredStatus,
    told: &mut HashSet<(ResourceRef, Option<String>, ObjectKey)>,
) {
    for (pod, uid) in &desired.explicit_pods {
        if !told.insert((resource.clone(), uid.clone(), pod.clone())) {
            continue;
        }
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: uid.clone(),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "PolicyNotEnforced".into(),
            note: Some(format!(
                "AccessPolicy {} targets this pod, but it runs in explicit capture mode: its app's ports are reachable without the sidecar, so the policy is not enforced here",
                resource.key
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            if ctx.permissions.check(&e, "publish events").await.is_none() {
                tracing::warn!(%pod, error = %e, "could not publish event");
            }
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
            ResourceKind::AccessPolicy => {
                let api: Api<AccessPolicy> = Api::namespaced(ctx.client.clone(), ns);
                api.patch_status(name, &params, &Patch::Apply(body(AccessPolicy::api_version(&()).into())))
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
