//! The config hub: the latest `ProxyConfig` per workload identity, the connected proxies and the
//! version each last acknowledged.
//!
//! Each identity has one `watch` channel, so a slow proxy never queues configs: it always reads
//! the newest (latest wins), and a config is built only for identities with a connected proxy.
//! The lock is a plain mutex held for map updates only, never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use skein_api::{StreamAck, WorkloadIdentity};
use tokio::sync::watch;

use crate::compute::status::ProxyView;
use crate::compute::{LinePlan, MeshConfig};
use crate::metrics::Metrics;

/// Identifies one stream connection.
pub type ConnectionId = u64;

struct Connected {
    identity: WorkloadIdentity,
    proxy_id: String,
    acked: Option<String>,
    /// The serial of the mesh that first gave the acknowledged version (when it is the version
    /// in force), for `Programmed` across changes that do not touch a resource.
    acked_at: Option<u64>,
    rejected: Option<(String, String)>,
    traffic: crate::stream::topology::TrafficSamples,
}

/// One identity's config at one version, and the delta from the version before it (planned
/// once, on first demand, however many proxies read it).
pub struct Pushed {
    pub version: String,
    identity: WorkloadIdentity,
    mesh: Arc<MeshConfig>,
    /// The config before this one: kept one generation back only, so a proxy that missed more
    /// (or never held it) gets the whole config, and old meshes are not kept alive.
    previous: Mutex<Option<Arc<Pushed>>>,
    delta: OnceLock<LinePlan>,
}

impl std::fmt::Debug for Pushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pushed").field("version", &self.version).field("identity", &self.identity).finish()
    }
}

impl Pushed {
    /// `identity`'s config in `mesh` (nothing is serialized yet).
    pub fn of(mesh: &Arc<MeshConfig>, identity: &WorkloadIdentity) -> Self {
        Self::at(mesh, identity, mesh.version_of(identity))
    }

    fn at(mesh: &Arc<MeshConfig>, identity: &WorkloadIdentity, version: String) -> Self {
        Self {
            version,
            identity: identity.clone(),
            mesh: mesh.clone(),
            previous: Mutex::new(None),
            delta: OnceLock::new(),
        }
    }

    /// This config, following `previous`; `previous`'s own predecessor is let go, and
    /// returned, to be dropped off the caller's path.
    fn after(self, previous: Arc<Pushed>) -> (Self, Option<Arc<Pushed>>) {
        let older = previous.previous.lock().unwrap_or_else(|e| e.into_inner()).take();
        *self.previous.lock().unwrap_or_else(|e| e.into_inner()) = Some(previous);
        (self, older)
    }

    /// The whole config, to be cut into frames as it is sent (built per send: the bytes of its
    /// destinations are shared with the mesh, so no proxy's whole config is held per
    /// connection).
    pub fn plan(&self) -> LinePlan {
        self.mesh.proxy_plan(&self.identity)
    }

    /// The whole config as one JSON line, newline included.
    pub fn line(&self) -> Bytes {
        self.plan().to_bytes()
    }

    /// The delta from version `held` to this one, when `held` is the version just before (built
    /// once, however many proxies of the identity read it).
    pub fn delta_from(&self, held: &str) -> Option<LinePlan> {
        let previous = self.previous.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        if previous.version != held {
            return None;
        }
        Some(self.delta.get_or_init(|| self.mesh.delta_plan(&previous.mesh, held, &self.identity)).clone())
    }
}

struct Channel {
    sender: watch::Sender<Arc<Pushed>>,
    /// When the current version was published, for the push-latency metric.
    published_at: Instant,
}

#[derive(Default)]
struct State {
    mesh: Arc<MeshConfig>,
    channels: HashMap<WorkloadIdentity, Channel>,
    connections: HashMap<ConnectionId, Connected>,
    next_id: ConnectionId,
}

/// Shared between the computation (which publishes), the stream server (which subscribes and
/// records acknowledgements) and the status writer (which reads the proxies).
#[derive(Clone)]
pub struct ConfigHub {
    state: Arc<Mutex<State>>,
    /// Counts every change in the connected proxies (a connection, a disconnection, an
    /// acknowledgement): the status writer and the proxy report wait on it.
    pub proxies_changed: watch::Sender<u64>,
    metrics: Metrics,
    /// Proxies being sent their first config at once (a reconnect storm queues, in order).
    pub admission: Arc<tokio::sync::Semaphore>,
    /// The same, per identity: no one identity holds more than [`IDENTITY_ADMISSION_LIMIT`]
    /// of the slots above.
    identity_admission: Arc<Mutex<IdentitySlots>>,
}

#[derive(Default)]
struct IdentitySlots {
    slots: HashMap<WorkloadIdentity, Arc<tokio::sync::Semaphore>>,
    /// Entries nobody holds are pruned when the map grows past this.
    prune_at: usize,
}

/// How many proxies are sent their first config at once: enough to keep both cores busy
/// serializing and encrypting, few enough that the first in line are served in milliseconds
/// rather than all of them together at the end of a storm.
pub const ADMISSION_LIMIT: usize = 64;

/// How many of those one identity may hold: a holder of one workload certificate that opens
/// streams and never acknowledges keeps at most this many slots busy (each for at most the
/// hold time), so the other identities' proxies are still admitted. Replicas of one workload
/// in a storm are served this many at a time, milliseconds each.
pub const IDENTITY_ADMISSION_LIMIT: usize = 8;

impl ConfigHub {
    /// The operator's metrics, shared with everything that publishes to this hub.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn new(metrics: Metrics) -> Self {
        Self {
            state: Arc::default(),
            proxies_changed: watch::Sender::new(0),
            metrics,
            admission: Arc::new(tokio::sync::Semaphore::new(ADMISSION_LIMIT)),
            identity_admission: Arc::default(),
        }
    }

    /// The admission slots of `identity` (see [`IDENTITY_ADMISSION_LIMIT`]).
    pub fn identity_admission(&self, identity: &WorkloadIdentity) -> Arc<tokio::sync::Semaphore> {
        let mut slots = self.identity_admission.lock().unwrap_or_else(|e| e.into_inner());
        if slots.slots.len() >= slots.prune_at {
            // Only the map holds a slot set nobody waits on or holds.
            slots.slots.retain(|_, s| Arc::strong_count(s) > 1);
            slots.prune_at = (slots.slots.len() * 2).max(64);
        }
        slots
            .slots
            .entry(identity.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(IDENTITY_ADMISSION_LIMIT)))
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain maps behind; keep serving them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a newly computed mesh in force: every identity with a subscriber gets its new config
    /// if its version changed.
    pub fn publish(&self, mesh: Arc<MeshConfig>) {
        let mut state = self.lock();
        // What this lets go of (meshes of generations before) is dropped on the blocking pool:
        // freeing a mesh of 1,000 Services takes milliseconds the proxies should not wait.
        let mut garbage: Vec<Box<dyn Send>> =
            vec![Box::new(std::mem::replace(&mut state.mesh, mesh.clone()))];
        state.channels.retain(|_, c| c.sender.receiver_count() > 0);
        for (identity, channel) in state.channels.iter_mut() {
            // The version first (a hash over hashes): an identity the change does not touch
            // gets nothing, and its config is not even built.
            let version = mesh.version_of(identity);
            let changed = channel.sender.send_if_modified(|current| {
                if current.version == version {
                    return false;
                }
                let (next, older) = Pushed::at(&mesh, identity, version.clone()).after(current.clone());
                if let Some(older) = older {
                    garbage.push(Box::new(older));
                }
                *current = Arc::new(next);
                true
            });
            if changed {
                channel.published_at = Instant::now();
            }
        }
        drop(state);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(garbage))),
            Err(_) => drop(garbage),
        }
    }

    /// The mesh currently in force.
    pub fn mesh(&self) -> Arc<MeshConfig> {
        self.lock().mesh.clone()
    }

    /// Registers a proxy and returns its connection id and the channel of its configs (holding
    /// the current one already).
    pub fn connect(
        &self,
        identity: WorkloadIdentity,
        proxy_id: String,
    ) -> (ConnectionId, watch::Receiver<Arc<Pushed>>) {
        let receiver = {
            let mut state = self.lock();
            let mesh = state.mesh.clone();
            let id = state.next_id;
            state.next_id += 1;
            let receiver = state
                .channels
                .entry(identity.clone())
                .or_insert_with(|| Channel {
                    sender: watch::Sender::new(Arc::new(Pushed::of(&mesh, &identity))),
                    published_at: Instant::now(),
                })
                .sender
                .subscribe();
            state.connections.insert(
                id,
                Connected {
                    identity,
                    proxy_id,
                    acked: None,
                    acked_at: None,
                    rejected: None,
                    traffic: Default::default(),
                },
            );
            self.metrics.connected_proxies.set(state.connections.len() as i64);
            (id, receiver)
        };
        self.proxies_changed.send_modify(|n| *n = n.wrapping_add(1));
        receiver
    }

    /// Records what a proxy said about a version.
    pub fn acknowledge(&self, id: ConnectionId, ack: StreamAck) {
        {
            let mut state = self.lock();
            let Some(conn) = state.connections.get(&id) else { return };
            let identity = conn.identity.clone();
            let published = state.channels.get(&identity).map(|c| {
                let pushed = c.sender.borrow();
                (pushed.version.clone(), pushed.mesh.serial(), c.published_at)
            });
            let conn = state.connections.get_mut(&id).expect("looked up above");
            match ack.error {
                None => {
                    conn.acked_at = None;
                    if let Some((version, serial, at)) = published {
                        if version == ack.version {
                            self.metrics.push_seconds.observe(at.elapsed().as_secs_f64());
                            conn.acked_at = Some(serial);
                        }
                    }
                    conn.acked = Some(ack.version);
                    conn.rejected = None;
                    self.metrics.acks.get_or_create(&crate::metrics::AckLabels { result: "applied" }).inc();
                }
                Some(error) => {
                    tracing::warn!(proxy = %conn.proxy_id, identity = %conn.identity, version = %ack.version, %error, "proxy refused config");
                    conn.rejected = Some((ack.version, error));
                    self.metrics.acks.get_or_create(&crate::metrics::AckLabels { result: "refused" }).inc();
                }
            }
        }
        self.proxies_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a proxy's traffic report (for the topology; nothing waits on it).
    pub fn record_traffic(&self, id: ConnectionId, report: skein_api::TrafficReport) {
        if let Some(conn) = self.lock().connections.get_mut(&id) {
            conn.traffic.record(Instant::now(), report);
        }
    }

    /// The service graph as the connected proxies report it.
    pub fn topology(&self) -> skein_api::topology::Topology {
        let state = self.lock();
        let proxies: Vec<_> = state
            .connections
            .values()
            .map(|c| crate::stream::topology::ProxyTraffic {
                identity: &c.identity,
                proxy_id: &c.proxy_id,
                acked: c.acked.as_deref(),
                desired: state.channels.get(&c.identity).map(|ch| ch.sender.borrow().version.clone()),
                samples: &c.traffic,
            })
            .collect();
        crate::stream::topology::build(&proxies, Instant::now())
    }

    /// Forgets a proxy whose stream ended.
    pub fn disconnect(&self, id: ConnectionId) {
        {
            let mut state = self.lock();
            state.connections.remove(&id);
            self.metrics.connected_proxies.set(state.connections.len() as i64);
        }
        self.proxies_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The connected proxies, and the version each identity should be at.
    pub fn proxies(&self) -> (Vec<ProxyView>, HashMap<WorkloadIdentity, String>) {
        let state = self.lock();
        let views = state
            .connections
            .values()
            .map(|c| ProxyView {
                identity: c.identity.clone(),
                proxy_id: c.proxy_id.clone(),
                acked: c.acked.clone(),
                acked_at: c.acked_at,
                rejected: c.rejected.clone(),
            })
            .collect();
        let current =
            state.channels.iter().map(|(id, c)| (id.clone(), c.sender.borrow().version.clone())).collect();
        (views, current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::compute;
    use crate::compute::snapshot::Snapshot;
    use skein_api::ProxyConfig;

    fn hub() -> ConfigHub {
        ConfigHub::new(Metrics::default())
    }

    #[tokio::test]
    async fn subscribers_get_the_current_config_then_only_changes() {
        let hub = hub();
        let identity = WorkloadIdentity::new("shop", "web");
        let (conn, mut rx) = hub.connect(identity.clone(), "web-0".into());
        let first = rx.borrow_and_update().clone();
        let parsed: ProxyConfig = serde_json::from_slice(&first.line()).unwrap();
        assert_eq!(parsed.identity.as_ref(), Some(&identity));
        assert_eq!(parsed.version, first.version);

        // Same content: no new version, nothing to read.
        hub.publish(Arc::new(compute(&Snapshot::default())));
        assert!(!rx.has_changed().unwrap());

        // New content: a new version arrives.
        let mut snapshot = Snapshot::default();
        snapshot
            .services
            .insert(crate::compute::snapshot::ObjectKey::new("shop", "reviews"), Default::default());
        hub.publish(Arc::new(compute(&snapshot)));
        assert!(rx.has_changed().unwrap());
        let second = rx.borrow_and_update().clone();
        assert_ne!(first.version, second.version);

        hub.acknowledge(conn, StreamAck { version: second.version.clone(), error: None });
        let (views, current) = hub.proxies();
        assert_eq!(views[0].acked.as_deref(), Some(second.version.as_str()));
        assert_eq!(current[&identity], second.version);

        hub.disconnect(conn);
        assert!(hub.proxies().0.is_empty());
    }

    #[tokio::test]
    async fn refusals_are_recorded_until_a_version_is_applied() {
        let hub = hub();
        let (conn, rx) = hub.connect(WorkloadIdentity::new("a", "b"), "p".into());
        let version = rx.borrow().version.clone();
        hub.acknowledge(conn, StreamAck { version: version.clone(), error: Some("bad".into()) });
        assert_eq!(hub.proxies().0[0].rejected, Some((version.clone(), "bad".into())));
        hub.acknowledge(conn, StreamAck { version, error: None });
        assert_eq!(hub.proxies().0[0].rejected, None);
    }

    #[tokio::test]
    async fn a_change_outside_a_workloads_scope_sends_it_nothing() {
        use crate::compute::snapshot::{NamespaceInfo, ObjectKey};
        let hub = hub();
        let mut snapshot = Snapshot::default();
        snapshot.namespaces.insert(
            ObjectKey::new("", "shop"),
            NamespaceInfo { destinations: Some("./*".into()), ..Default::default() },
        );
        snapshot.services.insert(ObjectKey::new("shop", "reviews"), Default::default());
        hub.publish(Arc::new(compute(&snapshot)));
        let (_, mut scoped) = hub.connect(WorkloadIdentity::new("shop", "web"), "web-0".into());
        let (_, mut everything) = hub.connect(WorkloadIdentity::new("books", "web"), "books-0".into());
        scoped.borrow_and_update();
        everything.borrow_and_update();

        snapshot.services.insert(ObjectKey::new("books", "catalog"), Default::default());
        hub.publish(Arc::new(compute(&snapshot)));
        assert!(!scoped.has_changed().unwrap(), "books/catalog is outside shop's ./*");
        assert!(everything.has_changed().unwrap());
        let line = everything.borrow_and_update().line();
        assert_eq!(serde_json::from_slice::<ProxyConfig>(&line).unwrap().destinations.len(), 2);

        snapshot.services.insert(ObjectKey::new("shop", "ratings"), Default::default());
        hub.publish(Arc::new(compute(&snapshot)));
        assert!(scoped.has_changed().unwrap());
        let config: ProxyConfig = serde_json::from_slice(&scoped.borrow_and_update().line()).unwrap();
        let names: Vec<&str> = config.destinations.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["ratings", "reviews"]);
    }
}
