//! Proxy reports: every operator replica serves the config stream to the proxies that happen to
//! connect to it, but only the leader writes `Programmed`. So each replica publishes the proxies
//! connected to it (identity, name, acknowledged version) in a ConfigMap
//! `skein-proxies-<replica>` in the operator's namespace, and the leader counts the proxies of
//! every fresh report besides its own (`compute::status::all_proxies`).
//!
//! A report is written at most once a second while its proxies change, and renewed every
//! [`HEARTBEAT`] otherwise; a replica removes its own when it stops. A report not renewed for
//! [`STALE`] is left over from a replica that died, and is ignored. Istio's istiod replicas
//! shared their config distribution reports the same way.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;
use skein_api::constants::FIELD_MANAGER;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::permissions::Permissions;
use crate::compute::status::ProxyView;
use crate::identity::MANAGED_BY;
use crate::metrics::{ErrorLabels, Metrics};
use crate::stream::hub::ConfigHub;

/// Name prefix of the report ConfigMaps.
pub const REPORT_PREFIX: &str = "skein-proxies-";
/// The label every report carries (the leader watches by it).
pub const REPORT_LABEL: &str = "skein.dev/proxy-report";
/// How often an unchanged report is renewed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A report older than this is ignored (its replica is gone).
pub const STALE: Duration = Duration::from_secs(30);
/// The least time between two writes of a changing report.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The other replicas' reports, as the leader's watch last saw them.
#[derive(Default)]
pub struct PeerReports {
    reports: RwLock<HashMap<String, Report>>,
    /// Counts every change, for the status writer to wake on.
    pub changed: watch::Sender<u64>,
}

/// One replica's report.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub replica: String,
    pub renewed: OffsetDateTime,
    pub proxies: Vec<ProxyView>,
}

impl Report {
    /// Reads a report ConfigMap; `None` when it is not one (or is damaged).
    pub fn from_config_map(cm: &ConfigMap) -> Option<Self> {
        let data = cm.data.as_ref()?;
        let replica = data.get("replica")?.clone();
        let renewed =
            OffsetDateTime::parse(data.get("renewed")?, &time::format_description::well_known::Rfc3339)
                .ok()?;
        let proxies = serde_json::from_str(data.get("proxies.json")?).ok()?;
        Some(Self { replica, renewed, proxies })
    }

    /// The ConfigMap holding this report.
    pub fn to_config_map(&self) -> serde_json::Value {
        let renewed = self.renewed.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": format!("{REPORT_PREFIX}{}", self.replica),
                "labels": {MANAGED_BY.0: MANAGED_BY.1, REPORT_LABEL: "true"},
            },
            "data": {
                "replica": self.replica,
                "renewed": renewed,
                "proxies.json": serde_json::to_string(&self.proxies).unwrap_or_else(|_| "[]".into()),
            },
        })
    }
}

impl PeerReports {
    /// The proxies of every fresh report except `own`'s, at `now`.
    pub fn fresh_proxies(&self, own: &str, now: OffsetDateTime) -> Vec<ProxyView> {
        let reports = self.reports.read().unwrap_or_else(|e| e.into_inner());
        let mut replicas: Vec<&Report> =
            reports.values().filter(|r| r.replica != own && now - r.renewed < STALE).collect();
        replicas.sort_by_key(|r| std::cmp::Reverse(r.renewed));
        replicas.into_iter().flat_map(|r| r.proxies.iter().cloned()).collect()
    }

    fn set(&self, name: String, report: Option<Report>) {
        {
            let mut reports = self.reports.write().unwrap_or_else(|e| e.into_inner());
            match report {
                Some(r) => reports.insert(name, r),
                None => reports.remove(&name),
            };
        }
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Publishes this replica's proxies until `shutdown`, then removes the report.
pub async fn publish(
    client: kube::Client,
    hub: ConfigHub,
    namespace: String,
    replica: String,
    permissions: Arc<Permissions>,
    shutdown: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let name = format!("{REPORT_PREFIX}{replica}");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut changed = hub.proxies_changed.subscribe();
    let mut last: Option<(Vec<ProxyView>, tokio::time::Instant)> = None;
    loop {
        let (mut proxies, _) = hub.proxies();
        proxies.sort_by(|a, b| a.proxy_id.cmp(&b.proxy_id));
        let due = match &last {
            None => true,
            Some((written, at)) => *written != proxies || at.elapsed() >= HEARTBEAT,
        };
        if due {
            let report = Report {
                replica: replica.clone(),
                renewed: OffsetDateTime::now_utc(),
                proxies: proxies.clone(),
            };
            match api.patch(&name, &params, &Patch::Apply(report.to_config_map())).await {
                Ok(_) => last = Some((proxies, tokio::time::Instant::now())),
                Err(e) => {
                    if permissions.check(&e, "write this replica's proxy report").await.is_none() {
                        tracing::warn!(error = %e, "could not write this replica's proxy report");
                    }
                    hub.metrics().reconcile_errors.get_or_create(&ErrorLabels { kind: "proxy-report" }).inc();
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = changed.changed() => {}
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        // Let a burst of connections and acknowledgements land in one write.
        tokio::time::sleep(MIN_INTERVAL).await;
    }
    match tokio::time::timeout(Duration::from_secs(3), api.delete(&name, &DeleteParams::default())).await {
        Ok(Ok(_)) => tracing::info!(%name, "removed this replica's proxy report"),
        Ok(Err(e)) => {
            if permissions.check(&e, "remove this replica's proxy report").await.is_none() {
                tracing::warn!(%name, error = %e, "could not remove this replica's proxy report")
            }
        }
        Err(_) => tracing::warn!(%name, "removing this replica's proxy report timed out"),
    }
}

/// Keeps `reports` current with the report ConfigMaps in `namespace`.
pub async fn watch_reports(
    client: kube::Client,
    metrics: Metrics,
    namespace: String,
    reports: Arc<PeerReports>,
    permissions: Arc<Permissions>,
    shutdown: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{REPORT_LABEL}=true"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut relisted: Option<Vec<String>> = None;
    loop {
        let Some(Some(event)) = shutdown.run_until_cancelled(events.next()).await else { return };
        match event {
            Ok(watcher::Event::Init) => relisted = Some(Vec::new()),
            Ok(watcher::Event::InitApply(cm)) => {
                relisted.get_or_insert_with(Vec::new).push(cm.name_any());
                reports.set(cm.name_any(), Report::from_config_map(&cm));
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = relisted.take() {
                    let gone: Vec<String> = {
                        let current = reports.reports.read().unwrap_or_else(|e| e.into_inner());
                        current.keys().filter(|k| !seen.contains(k)).cloned().collect()
                    };
                    for name in gone {
                        reports.set(name, None);
                    }
                }
            }
            Ok(watcher::Event::Apply(cm)) => reports.set(cm.name_any(), Report::from_config_map(&cm)),
            Ok(watcher::Event::Delete(cm)) => reports.set(cm.name_any(), None),
            Err(e) => {
                if permissions.check_watch(&e, "watch the other replicas' proxy reports").await.is_none() {
                    tracing::warn!(error = %e, "watching proxy reports");
                }
                metrics.reconcile_errors.get_or_create(&ErrorLabels { kind: "watch" }).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_api::WorkloadIdentity;

    fn view(name: &str) -> ProxyView {
        ProxyView {
            identity: WorkloadIdentity::new("shop", "web"),
            proxy_id: name.into(),
            acked: Some("v1".into()),
            acked_at: None,
            rejected: None,
        }
    }

    #[test]
    fn a_report_round_trips_through_its_config_map() {
        let report = Report {
            replica: "skein-operator-abc".into(),
            renewed: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            proxies: vec![view("web-0"), view("web-1")],
        };
        let cm: ConfigMap = serde_json::from_value(report.to_config_map()).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("skein-proxies-skein-operator-abc"));
        assert_eq!(cm.metadata.labels.as_ref().unwrap()[REPORT_LABEL], "true");
        assert_eq!(Report::from_config_map(&cm), Some(report));
        let mut damaged = cm.clone();
        damaged.data.as_mut().unwrap().insert("proxies.json".into(), "{".into());
        assert_eq!(Report::from_config_map(&damaged), None);
    }

    #[test]
    fn only_fresh_reports_of_other_replicas_count() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_100).unwrap();
        let reports = PeerReports::default();
        let report = |replica: &str, age: i64, proxy: &str| Report {
            replica: replica.into(),
            renewed: now - time::Duration::seconds(age),
            proxies: vec![view(proxy)],
        };
        reports.set("a".into(), Some(report("op-a", 5, "web-0")));
        reports.set("b".into(), Some(report("op-b", 60, "web-1")));
        reports.set("c".into(), Some(report("op-c", 1, "web-2")));
        let names = |v: Vec<ProxyView>| v.into_iter().map(|p| p.proxy_id).collect::<Vec<_>>();
        assert_eq!(
            names(reports.fresh_proxies("op-c", now)),
            vec!["web-0"],
            "own and stale reports are left out"
        );
        assert_eq!(names(reports.fresh_proxies("op-x", now)), vec!["web-2", "web-0"], "freshest first");
        reports.set("a".into(), None);
        assert_eq!(names(reports.fresh_proxies("op-x", now)), vec!["web-2"]);
        assert_eq!(*reports.changed.borrow(), 4);
    }
}
