//! The config computation: a pure function from a [`Snapshot`] to every workload's
//! [`ProxyConfig`] and every Skein resource's `Accepted` and `ResolvedRefs` conditions.
//!
//! Decisions worth knowing:
//! - Every meshed workload may call every Service, so destinations are computed once and shared
//!   (`Arc`); only identity and inbound ports differ per workload.
//! - A change is computed from the mesh before it ([`compute_incremental`]): only the
//!   destinations of the Services it touched are built again; the others are shared with the
//!   mesh before, bytes and hash included.
//! - Two TrafficRoutes for the same Service host and port conflict: the older one (creation
//!   time, then namespace/name) wins and the newer one is `Accepted=False/Conflicted`, naming
//!   the winner. A route for one port and an all-ports route for the same host do not conflict:
//!   the port-specific one takes precedence on its port. Policies conflict the same way per
//!   target.
//! - `ResolvedRefs=False` does not take a route out of force (a subset with no endpoints answers
//!   503), as in Gateway API; `Accepted=False` does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use skein_api::authz::{DefaultPolicy, InboundAuthz};
use skein_api::config::{Destination, InboundPort, Protocol, ProxyConfig, Route, ServicePort};
use skein_api::constants::CLUSTER_DOMAIN;
use skein_api::WorkloadIdentity;

pub mod access;
mod endpoints;
mod policies;
mod routes;
pub mod scope;
pub mod snapshot;
pub mod status;

use crate::compute::snapshot::{Changes, ObjectKey, Snapshot};
use endpoints::{endpoints_by_service, inbound_ports};
use policies::{accept_policies, Target};
use routes::accept_routes;

/// The kinds of Skein resources that carry status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    TrafficRoute,
    OutlierPolicy,
    RetryPolicy,
    AccessPolicy,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TrafficRoute => "TrafficRoute",
            Self::OutlierPolicy => "OutlierPolicy",
            Self::RetryPolicy => "RetryPolicy",
            Self::AccessPolicy => "AccessPolicy",
        }
    }
}

/// One Skein resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    pub kind: ResourceKind,
    pub key: ObjectKey,
}

/// A condition's desired status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn ok(reason: &str, message: impl Into<String>) -> Self {
        Self { status: true, reason: reason.into(), message: message.into() }
    }
    pub fn fail(reason: &str, message: impl Into<String>) -> Self {
        Self { status: false, reason: reason.into(), message: message.into() }
    }
}

/// What the computation concludes about one resource (`Programmed` comes later, from the
/// proxies' acknowledgements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    pub generation: i64,
    pub accepted: Cond,
    pub resolved_refs: Cond,
    /// The identities whose proxies must apply it for `Programmed`; `None`: every proxy (every
    /// proxy receives every destination).
    pub audience: Option<BTreeSet<WorkloadIdentity>>,
    /// Conditions of this kind only (AccessPolicy's `Enforced`).
    pub extra: Vec<(&'static str, Cond)>,
    /// Target pods running in explicit capture mode (AccessPolicy), each told by an event.
    pub explicit_pods: Vec<(ObjectKey, Option<String>)>,
    /// The Service whose destination carries it (a route, a policy attached to one), for
    /// `Programmed` across changes elsewhere.
    pub carried_by: Option<ObjectKey>,
}

impl DesiredStatus {
    pub fn new(generation: i64, accepted: Cond, resolved_refs: Cond) -> Self {
        Self {
            generation,
            accepted,
            resolved_refs,
            audience: None,
            extra: Vec::new(),
            explicit_pods: Vec::new(),
            carried_by: None,
        }
    }

    /// Carried by Service `service`'s destination.
    pub(crate) fn carried_by(self, service: ObjectKey) -> Self {
        Self { carried_by: Some(service), ..self }
    }

    /// A spec that cannot be used: not accepted, references not looked at.
    fn invalid(generation: i64, message: String) -> Self {
        Self::new(
            generation,
            Cond::fail("Invalid", message),
            Cond::fail("Invalid", "references are not checked while the spec is invalid"),
        )
    }
}

/// The computed mesh: shared destinations, per-identity inbound ports, desired statuses.
///
/// Each destination is serialized and hashed once per computation; a workload's config is the
/// destinations of its scope (see [`scope`]), so its version is a hash over theirs and its line
/// is assembled from their bytes: identities that share a scope share the work.
#[derive(Debug)]
pub struct MeshConfig {
    /// Sorted by namespace and name; shared with the mesh computed before when unchanged.
    pub destinations: Vec<Arc<Destination>>,
    /// Each destination as JSON, and its hash.
    destination_json: Vec<(bytes::Bytes, [u8; 32])>,
    /// The serial of the mesh since which each destination's bytes are as they are.
    changed_at: Vec<u64>,
    /// (namespace, name) → index in `destinations`.
    index: std::collections::HashMap<(String, String), usize>,
    scopes: scope::Scopes,
    /// The selection and digest of each distinct (scope, own namespace), computed on first use.
    groups: std::sync::Mutex<std::collections::HashMap<GroupKey, Arc<Group>>>,
    /// Tells meshes apart (never reused, unlike an address) for `group_changes`.
    serial: u64,
    /// The destinations changed between a group of an older mesh (its serial) and one of
    /// this, found once however many identities share the two groups.
    group_changes: std::sync::Mutex<std::collections::HashMap<(u64, GroupKey, GroupKey), Arc<GroupChange>>>,
    pub inbound: BTreeMap<WorkloadIdentity, Vec<InboundPort>>,
    /// Per identity: who may call it.
    pub authz: BTreeMap<WorkloadIdentity, InboundAuthz>,
    /// Each namespace's access default, for an identity whose pods are not seen yet.
    namespace_defaults: BTreeMap<String, DefaultPolicy>,
    /// Each namespace's Namespace-targeted policies, for the same.
    namespace_policies: BTreeMap<String, Vec<skein_api::authz::AuthzPolicy>>,
    mesh_default: DefaultPolicy,
    /// Namespaces whose default-policy annotation is not a known value (they deny).
    pub bad_namespace_defaults: BTreeMap<String, String>,
    pub statuses: BTreeMap<ResourceRef, DesiredStatus>,
}

/// A distinct (scope, own namespace): identities that share one share their destinations.
type GroupKey = (scope::Scope, String);

/// The destinations one scope selects, and their digest.
#[derive(Debug)]
struct Group {
    key: GroupKey,
    selected: Vec<usize>,
    digest: Sha256,
}

/// From one group's destinations to another's: those new or whose bytes changed (indexes in
/// the newer mesh), and the names of those gone.
#[derive(Debug, Default)]
struct GroupChange {
    upsert: Vec<usize>,
    remove: Vec<(String, String)>,
}

impl Default for MeshConfig {
    /// The mesh of an empty cluster (what proxies get before the first list completes).
    fn default() -> Self {
        compute(&Snapshot::default())
    }
}

impl MeshConfig {
    /// Tells meshes apart: a later computation has a greater serial.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// The serial of the mesh since which Service `service`'s destination is as it is here.
    pub fn changed_at(&self, service: &ObjectKey) -> Option<u64> {
        let &i = self.index.get(&(service.namespace.clone(), service.name.clone()))?;
        self.changed_at.get(i).copied()
    }

    /// Problems with `skein.dev/destinations` annotations (object → why it counts as absent).
    pub fn scope_problems(&self) -> &BTreeMap<String, String> {
        &self.scopes.problems
    }

    /// The destinations `identity`'s scope selects: the scope's Services plus, transitively,
    /// every Service a route of theirs sends traffic to.
    fn group(&self, identity: &WorkloadIdentity) -> Arc<Group> {
        let scope = self.scopes.of(&identity.namespace, &identity.service_account);
        let own = if scope.relative() { identity.namespace.clone() } else { String::new() };
        let key = (scope.clone(), own);
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = groups.get(&key) {
            return g.clone();
        }
        let mut selected: BTreeSet<usize> = self
            .destinations
            .iter()
            .enumerate()
            .filter(|(_, d)| scope.includes(&identity.namespace, &d.namespace, &d.name))
            .map(|(i, _)| i)
            .collect();
        if !matches!(scope, scope::Scope::All) {
            let mut todo: Vec<usize> = selected.iter().copied().collect();
            while let Some(i) = todo.pop() {
                for rule in self.destinations[i].routes.iter().flat_map(|r| &r.rules) {
                    for b in &rule.backends {
                        if let skein_api::config::BackendTarget::Service { namespace, name, .. } = &b.target {
                            if let Some(&j) = self.index.get(&(namespace.clone(), name.clone())) {
                                if selected.insert(j) {
                                    todo.push(j);
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut digest = Sha256::new();
        for &i in &selected {
            digest.update(self.destination_json[i].1);
        }
        let group = Arc::new(Group { key: key.clone(), selected: selected.into_iter().collect(), digest });
        groups.insert(key, group.clone());
        group
    }

    /// What `identity` gets besides its destinations: inbound ports and authorization. An
    /// identity no pod of which is seen yet (its proxy connected before the pod watch caught
    /// up) gets its namespace's default and Namespace-targeted policies, never `allow` by
    /// omission; Service-targeted policies follow once a pod shows which Services select it.
    fn own_parts(&self, identity: &WorkloadIdentity) -> (Vec<InboundPort>, InboundAuthz) {
        let inbound = self.inbound.get(identity).cloned().unwrap_or_default();
        let authz = self.authz.get(identity).cloned().unwrap_or_else(|| InboundAuthz {
            default: self.namespace_defaults.get(&identity.namespace).copied().unwrap_or(self.mesh_default),
            namespace: identity.namespace.clone(),
            policies: self.namespace_policies.get(&identity.namespace).cloned().unwrap_or_default(),
        });
        (inbound, authz)
    }

    fn version(
        &self,
        group: &Group,
        identity: &WorkloadIdentity,
        own: &(Vec<InboundPort>, InboundAuthz),
    ) -> String {
        let mut digest = group.digest.clone();
        digest.update(serde_json::to_vec(&(identity, &own.0, &own.1)).expect("plain data serializes"));
        let hash = digest.finalize();
        hash[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The config version of `identity` (a content hash), without building the config.
    pub fn version_of(&self, identity: &WorkloadIdentity) -> String {
        self.version(&self.group(identity), identity, &self.own_parts(identity))
    }

    /// The config of one workload, with its content hash as version.
    pub fn proxy_config(&self, identity: &WorkloadIdentity) -> ProxyConfig {
        let group = self.group(identity);
        let own = self.own_parts(identity);
        ProxyConfig {
            version: self.version(&group, identity, &own),
            identity: Some(identity.clone()),
            destinations: group.selected.iter().map(|&i| Destination::clone(&self.destinations[i])).collect(),
            inbound: own.0,
            authz: own.1,
        }
    }

    /// The config of one workload as the JSON line the stream sends, assembled from each
    /// destination's bytes (serialized once per computation), and its version.
    pub fn proxy_line(&self, identity: &WorkloadIdentity) -> (String, bytes::Bytes) {
        let plan = self.proxy_plan(identity);
        (plan.version.clone(), plan.to_bytes())
    }

    /// [`MeshConfig::proxy_line`] as parts that share the destinations' bytes, to be cut into
    /// frames as the stream sends them.
    pub fn proxy_plan(&self, identity: &WorkloadIdentity) -> LinePlan {
        let group = self.group(identity);
        let own = self.own_parts(identity);
        let version = self.version(&group, identity, &own);
        let shell = ProxyConfig {
            version: version.clone(),
            identity: Some(identity.clone()),
            destinations: Vec::new(),
            inbound: own.0,
            authz: own.1,
        };
        let shell = serde_json::to_vec(&shell).expect("plain data serializes");
        let items = group.selected.iter().map(|&i| self.destination_json[i].0.clone()).collect();
        LinePlan::new(version, &shell, b"\"destinations\":[]", items)
    }
}

impl MeshConfig {
    /// The change from `identity`'s config in `old` (at version `base`) to its config here, as
    /// the delta line the stream sends: destinations whose bytes differ or that are new, whole;
    /// those gone, by name; the identity's own parts. Both selections are sorted by namespace
    /// and name, so one merge walk over them finds the difference.
    pub fn delta_line(
        &self,
        old: &MeshConfig,
        base: &str,
        identity: &WorkloadIdentity,
    ) -> (String, bytes::Bytes) {
        let plan = self.delta_plan(old, base, identity);
        (plan.version.clone(), plan.to_bytes())
    }

    /// [`MeshConfig::delta_line`] as parts that share the destinations' bytes.
    pub fn delta_plan(&self, old: &MeshConfig, base: &str, identity: &WorkloadIdentity) -> LinePlan {
        let (before, after) = (old.group(identity), self.group(identity));
        let change = self.group_change(old, &before, &after);
        let own = self.own_parts(identity);
        let version = self.version(&after, identity, &own);
        let shell = skein_api::config::DeltaLine {
            delta: skein_api::config::ConfigDelta {
                base: base.to_string(),
                version: version.clone(),
                upsert: Vec::new(),
                remove: change.remove.clone(),
                inbound: own.0,
                authz: own.1,
            },
        };
        let shell = serde_json::to_vec(&shell).expect("plain data serializes");
        let items = change.upsert.iter().map(|&j| self.destination_json[j].0.clone()).collect();
        LinePlan::new(version, &shell, b"\"upsert\":[]", items)
    }

    /// The change from group `before` of `old` to group `after` of this mesh, memoised. Both
    /// selections are sorted by namespace and name, so one merge walk finds it.
    fn group_change(&self, old: &MeshConfig, before: &Group, after: &Group) -> Arc<GroupChange> {
        let key = (old.serial, before.key.clone(), after.key.clone());
        let mut memo = self.group_changes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(change) = memo.get(&key) {
            return change.clone();
        }
        fn name(mesh: &MeshConfig, i: usize) -> (&str, &str) {
            let d = &mesh.destinations[i];
            (d.namespace.as_str(), d.name.as_str())
        }
        let mut change = GroupChange::default();
        let gone = |change: &mut GroupChange, i| {
            let (ns, n) = name(old, i);
            change.remove.push((ns.into(), n.into()));
        };
        let (mut a, mut b) = (before.selected.iter().peekable(), after.selected.iter().peekable());
        loop {
            match (a.peek().copied(), b.peek().copied()) {
                (None, None) => break,
                (Some(&i), None) => {
                    gone(&mut change, i);
                    a.next();
                }
                (None, Some(&j)) => {
                    change.upsert.push(j);
                    b.next();
                }
                (Some(&i), Some(&j)) => match name(old, i).cmp(&name(self, j)) {
                    std::cmp::Ordering::Less => {
                        gone(&mut change, i);
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        change.upsert.push(j);
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if old.destination_json[i].1 != self.destination_json[j].1 {
                            change.upsert.push(j);
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        let change = Arc::new(change);
        memo.insert(key, change.clone());
        change
    }
}

/// A config line as the stream sends it: the JSON around one list, and the list's items (each
/// a destination's bytes, shared with the mesh, never copied per proxy until a frame is cut).
#[derive(Clone, Debug)]
pub struct LinePlan {
    pub version: String,
    prefix: bytes::Bytes,
    items: Vec<bytes::Bytes>,
    /// What follows the list, newline included.
    suffix: bytes::Bytes,
}

/// Frames are cut up to this size: a proxy's whole config never sits in memory once per
/// connection, only the frame in flight.
pub const FRAME_BYTES: usize = 64 * 1024;

impl LinePlan {
    /// `shell` (serialized with the list `field` empty, `"name":[]`) with `items` in the list.
    fn new(version: String, shell: &[u8], field: &[u8], items: Vec<bytes::Bytes>) -> Self {
        let at = shell.windows(field.len()).position(|w| w == field).expect("the field is serialized")
            + field.len()
            - 1;
        let mut suffix = shell[at..].to_vec();
        suffix.push(b'\n');
        Self { version, prefix: bytes::Bytes::copy_from_slice(&shell[..at]), items, suffix: suffix.into() }
    }

    /// The line's length in bytes.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.items.iter().map(|i| i.len() + 1).sum::<usize>() + self.suffix.len()
            - usize::from(!self.items.is_empty())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole line.
    pub fn to_bytes(&self) -> bytes::Bytes {
        let mut line = bytes::BytesMut::with_capacity(self.len());
        for frame in self.clone().frames() {
            line.extend_from_slice(&frame);
        }
        line.freeze()
    }

    /// The line cut into frames of [`FRAME_BYTES`] (the last one shorter).
    pub fn frames(self) -> Frames {
        Frames { plan: self, segment: 0, offset: 0 }
    }

    /// The line's pieces in order: the prefix, the items with commas between them, the suffix.
    fn segment(&self, n: usize) -> Option<&[u8]> {
        let items = self.items.len();
        let list = if items == 0 { 0 } else { 2 * items - 1 };
        match n {
            0 => Some(&self.prefix),
            n if n <= list => Some(if n % 2 == 1 { &self.items[(n - 1) / 2] } else { b"," }),
            n if n == list + 1 => Some(&self.suffix),
            _ => None,
        }
    }
}

/// The frames of a [`LinePlan`], cut as they are asked for.
#[derive(Debug)]
pub struct Frames {
    plan: LinePlan,
    segment: usize,
    /// How much of the current segment is sent.
    offset: usize,
}

impl Iterator for Frames {
    type Item = bytes::Bytes;

    fn next(&mut self) -> Option<bytes::Bytes> {
        let mut frame = bytes::BytesMut::new();
        while let Some(piece) = self.plan.segment(self.segment) {
            let take = (piece.len() - self.offset).min(FRAME_BYTES - frame.len());
            frame.extend_from_slice(&piece[self.offset..self.offset + take]);
            self.offset += take;
            if self.offset == piece.len() {
                self.segment += 1;
                self.offset = 0;
            }
            if frame.len() == FRAME_BYTES {
                break;
            }
        }
        (!frame.is_empty()).then(|| frame.freeze())
    }
}

/// Computes the mesh from a snapshot.
pub fn compute(snapshot: &Snapshot) -> MeshConfig {
    compute_from(snapshot, None)
}

/// [`compute`], reusing the destinations of `previous` (computed from this snapshot before
/// `changes`) that the changes cannot have touched: a Service whose Service object, slices and
/// endpoints' pods are as they were keeps its destination, and its bytes and hash, unless its
/// routes or policies differ. Routes, policies and access are computed whole (they are few).
pub fn compute_incremental(snapshot: &Snapshot, previous: &MeshConfig, changes: &Changes) -> MeshConfig {
    compute_from(snapshot, Some((previous, changes)))
}

fn compute_from(snapshot: &Snapshot, reuse: Option<(&MeshConfig, &Changes)>) -> MeshConfig {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = BTreeMap::new();

    let routes = accept_routes(snapshot, &mut statuses);
    let retry = accept_policies(
        &snapshot.retry_policies,
        ResourceKind::RetryPolicy,
        snapshot,
        &routes,
        &mut statuses,
    );
    let outlier = accept_policies(
        &snapshot.outlier_policies,
        ResourceKind::OutlierPolicy,
        snapshot,
        &routes,
        &mut statuses,
    );

    let access = access::accept_access(snapshot, &mut statuses);

    let touched = reuse.map(|(_, changes)| changes.services_touched(snapshot));
    let mut endpoints = if reuse.is_none() { endpoints_by_service(snapshot) } else { BTreeMap::new() };
    let mut routes_of: BTreeMap<&ObjectKey, Vec<&routes::AcceptedRoute>> = BTreeMap::new();
    for r in &routes {
        routes_of.entry(&r.service).or_default().push(r);
    }
    // The previous mesh's destinations are sorted as the Services are: one walk finds each.
    let mut earlier = reuse.map(|(previous, _)| {
        previous
            .destinations
            .iter()
            .zip(previous.destination_json.iter().zip(&previous.changed_at))
            .peekable()
    });
    let mut destinations = Vec::with_capacity(snapshot.services.len());
    let mut destination_json = Vec::with_capacity(snapshot.services.len());
    let mut changed_at = Vec::with_capacity(snapshot.services.len());
    for (key, svc) in &snapshot.services {
        let mut service_routes: Vec<Route> = routes_of
            .get(key)
            .into_iter()
            .flatten()
            .map(|r| Route {
                retry: retry.get(&Target::Route(r.key.clone())).cloned(),
                outlier: outlier.get(&Target::Route(r.key.clone())).cloned(),
                ..r.route.clone()
            })
            .collect();
        // Port-specific routes first, so the proxy's first hit is the most specific one.
        service_routes
            .sort_by(|a, b| (a.port.is_none(), a.port, &a.name).cmp(&(b.port.is_none(), b.port, &b.name)));
        let (retry, outlier) = (
            retry.get(&Target::Service(key.clone())).cloned(),
            outlier.get(&Target::Service(key.clone())).cloned(),
        );
        let parts = (key.namespace.as_str(), key.name.as_str());
        let before = earlier.as_mut().and_then(|walk| {
            while walk.next_if(|(d, _)| (d.namespace.as_str(), d.name.as_str()) < parts).is_some() {}
            walk.next_if(|(d, _)| (d.namespace.as_str(), d.name.as_str()) == parts)
        });
        let unchanged = touched.as_ref().is_some_and(|t| !t.contains(&parts));
        // Since when the bytes are as they are: the mesh before's serial if it had the same.
        let since = |json: &(bytes::Bytes, [u8; 32])| match before {
            Some((_, (old, &at))) if old.1 == json.1 => at,
            _ => serial,
        };
        if let Some((d, (json, &at))) = before.filter(|_| unchanged) {
            if d.routes == service_routes && d.retry == retry && d.outlier == outlier {
                destinations.push(d.clone());
                destination_json.push(json.clone());
                changed_at.push(at);
            } else {
                let d = Destination { routes: service_routes, retry, outlier, ..Destination::clone(d) };
                let json = serialized(&d);
                changed_at.push(since(&json));
                destination_json.push(json);
                destinations.push(Arc::new(d));
            }
            continue;
        }
        let endpoints = match reuse {
            Some(_) => endpoints::endpoints_of(snapshot, key),
            None => endpoints.remove(key).unwrap_or_default(),
        };
        let d = Destination {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            hosts: hosts_of(key),
            addresses: svc.cluster_ips.clone(),
            load_balancer: svc.load_balancer,
            ports: svc
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: protocol_of(p.name.as_deref(), p.app_protocol.as_deref()),
                })
                .collect(),
            endpoints,
            routes: service_routes,
            retry,
            outlier,
        };
        let json = serialized(&d);
        changed_at.push(since(&json));
        destination_json.push(json);
        destinations.push(Arc::new(d));
    }

    let index =
        destinations.iter().enumerate().map(|(i, d)| ((d.namespace.clone(), d.name.clone()), i)).collect();
    MeshConfig {
        destinations,
        destination_json,
        changed_at,
        index,
        scopes: snapshot.scopes(),
        groups: Default::default(),
        serial,
        group_changes: Default::default(),
        inbound: match reuse {
            Some((previous, changes)) => {
                let namespaces =
                    changes.services.iter().chain(&changes.pods).map(|k| k.namespace.as_str()).collect();
                endpoints::inbound_ports_since(snapshot, &previous.inbound, &namespaces)
            }
            None => inbound_ports(snapshot),
        },
        authz: access.authz,
        namespace_policies: access.namespace_policies,
        namespace_defaults: snapshot
            .namespaces
            .keys()
            .map(|k| (k.name.clone(), snapshot.namespace_default(&k.name).unwrap_or(DefaultPolicy::Deny)))
            .collect(),
        mesh_default: snapshot.default_policy,
        bad_namespace_defaults: access::bad_namespace_defaults(snapshot),
        statuses,
    }
}

/// A destination as JSON, and its hash.
fn serialized(d: &Destination) -> (bytes::Bytes, [u8; 32]) {
    let json = serde_json::to_vec(d).expect("plain data serializes");
    let hash: [u8; 32] = Sha256::digest(&json).into();
    (bytes::Bytes::from(json), hash)
}

/// Host names that reach a Service from any namespace.
fn hosts_of(key: &ObjectKey) -> Vec<String> {
    let (name, ns) = (&key.name, &key.namespace);
    vec![format!("{name}.{ns}"), format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}")]
}

/// `tcp`/`opaque` app protocols (or a `tcp-` port name) are passed through opaquely.
fn protocol_of(port_name: Option<&str>, app_protocol: Option<&str>) -> Protocol {
    let tcp = matches!(app_protocol, Some("tcp" | "opaque"))
        || port_name.is_some_and(|n| n == "tcp" || n.starts_with("tcp-"));
    if tcp {
        Protocol::Tcp
    } else {
        Protocol::Http
    }
}

/// Order of precedence among conflicting objects: oldest first, then by namespace/name.
fn age_key<K: ResourceExt>(obj: &K, key: &ObjectKey) -> (Timestamp, ObjectKey) {
    let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::MAX);
    (created, key.clone())
}

#[cfg(test)]
mod tests {
    use super::routes::resolve_host;
    use super::*;
    use crate::compute::snapshot::SnapshotObject;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use skein_api::config::{BackendTarget, HeaderMatch, StringMatch};
    use skein_api::{OutlierPolicy, RetryPolicy, TrafficRoute};

    const CANARY: &str = r#"
apiVersion: skein.dev/v1alpha1
kind: TrafficRoute
metadata: {name: reviews, namespace: shop, generation: 2, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  host: reviews
  port: 9080
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
  rules:
    - match:
        headers: [{name: X-User-Group, exact: beta}]
      backends: [{subset: v2, weight: 100}]
    - backends:
        - {subset: v1, weight: 90}
        - {subset: v2, weight: 10}
      timeout: 10s
"#;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_saphyr::from_str(text).unwrap()
    }

    /// The canary's world: Service `shop/reviews` with one v1 and one v2 pod behind it.
    fn shop() -> Snapshot {
        let mut s = Snapshot::default();
        yaml::<TrafficRoute>(CANARY).apply(&mut s);
        yaml::<Service>(
            "metadata: {name: reviews, namespace: shop}\nspec: {ports: [{name: http, port: 9080}]}",
        )
        .apply(&mut s);
        for (pod, version, ip) in [("reviews-v1-0", "v1", "10.0.0.1"), ("reviews-v2-0", "v2", "10.0.0.2")] {
            yaml::<Pod>(&format!(
                "metadata: {{name: {pod}, namespace: shop, labels: {{app: reviews, version: {version}, skein.dev/inject: enabled}}}}\nspec: {{serviceAccountName: reviews, containers: []}}"
            ))
            .apply(&mut s);
            yaml::<EndpointSlice>(&format!(
                r#"
metadata: {{name: reviews-{version}, namespace: shop, labels: {{kubernetes.io/service-name: reviews}}}}
addressType: IPv4
ports: [{{name: http, port: 9080}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {pod}}}}}]
"#
            ))
            .apply(&mut s);
        }
        s
    }

    /// Each kind of change, computed from the mesh before it and the snapshot's changes, gives
    /// what a whole computation gives; what no change touched is shared, not built again.
    #[test]
    fn an_incremental_computation_equals_a_whole_one() {
        let slice = |name: &str, service: &str, endpoints: &[(&str, Option<&str>)]| {
            let endpoints: Vec<String> = endpoints
                .iter()
                .map(|(ip, pod)| match pod {
                    Some(pod) => format!("{{addresses: [\"{ip}\"], targetRef: {{kind: Pod, name: {pod}}}}}"),
                    None => format!("{{addresses: [\"{ip}\"]}}"),
                })
                .collect();
            yaml::<EndpointSlice>(&format!(
                "metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints: [{}]",
                endpoints.join(", ")
            ))
        };
        let pod = |name: &str, version: &str| {
            yaml::<Pod>(&format!(
                "metadata: {{name: {name}, namespace: shop, labels: {{app: reviews, version: {version}, skein.dev/inject: enabled}}}}\nspec: {{serviceAccountName: reviews, containers: []}}"
            ))
        };
        let service = |name: &str| {
            yaml::<Service>(&format!(
                "metadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{name: http, port: 9080}}]}}"
            ))
        };
        let mut s = shop();
        service("ratings").apply(&mut s);
        slice("ratings-1", "ratings", &[("10.0.1.1", None)]).apply(&mut s);
        // Another namespace's workload, which no change touches: its inbound ports are kept.
        yaml::<Pod>("metadata: {name: catalog-0, namespace: books, labels: {skein.dev/inject: enabled}}\nspec: {serviceAccountName: catalog, containers: []}")
            .apply(&mut s);
        yaml::<EndpointSlice>("metadata: {name: catalog-1, namespace: books, labels: {kubernetes.io/service-name: catalog}}\naddressType: IPv4\nports: [{name: grpc, port: 7070}]\nendpoints: [{addresses: [\"10.0.2.1\"], targetRef: {kind: Pod, name: catalog-0}}]")
            .apply(&mut s);
        s.take_changes();
        let mut previous = Arc::new(compute(&s));
        // Computes from `previous`; checks it against the whole computation; returns the names
        // of the destinations shared with `previous`.
        let step = |s: &mut Snapshot, previous: &mut Arc<MeshConfig>, what: &str| -> Vec<String> {
            let changes = s.take_changes();
            let mesh = compute_incremental(s, previous, &changes);
            let whole = compute(s);
            assert_eq!(mesh.destinations, whole.destinations, "{what}");
            assert_eq!(mesh.destination_json, whole.destination_json, "{what}");
            assert_eq!(mesh.inbound, whole.inbound, "{what}");
            let shared = mesh
                .destinations
                .iter()
                .filter(|d| previous.destinations.iter().any(|p| Arc::ptr_eq(p, d)))
                .map(|d| d.name.clone())
                .collect();
            *previous = Arc::new(mesh);
            shared
        };

        let ratings = ObjectKey::new("shop", "ratings");
        let ratings_since = previous.changed_at(&ratings);
        pod("reviews-v1-0", "v3").apply(&mut s);
        assert_eq!(step(&mut s, &mut previous, "a pod's labels"), ["ratings"]);
        assert_eq!(previous.changed_at(&ratings), ratings_since, "ratings is as it was");
        assert_eq!(previous.changed_at(&ObjectKey::new("shop", "reviews")), Some(previous.serial()));
        pod("reviews-v1-0", "v3").apply(&mut s);
        assert_eq!(s.changes, Changes::default(), "a pod put in again as it was changes nothing");
        assert_eq!(step(&mut s, &mut previous, "nothing"), ["ratings", "reviews"]);
        slice("ratings-1", "ratings", &[("10.0.1.1", None), ("10.0.1.2", None)]).apply(&mut s);
        assert_eq!(step(&mut s, &mut previous, "an endpoint added"), ["reviews"]);
        let weights = || {
            yaml::<TrafficRoute>(
                &CANARY.replace("weight: 90", "weight: 80").replace("weight: 10", "weight: 20"),
            )
        };
        assert!(weights().apply(&mut s), "a spec changed");
        assert_eq!(step(&mut s, &mut previous, "a route's weights"), ["ratings"]);
        // The operator's own status write comes back from the watch: nothing to compute.
        let mut written = weights();
        written.status = Some(Default::default());
        written.metadata.resource_version = Some("2".into());
        assert!(!written.apply(&mut s), "a status written changes nothing the computation reads");
        slice("reviews-v2", "ratings", &[("10.0.0.2", Some("reviews-v2-0"))]).apply(&mut s);
        assert!(step(&mut s, &mut previous, "a slice moved to another Service").is_empty());
        Pod::delete(&ObjectKey::new("shop", "reviews-v2-0"), &mut s);
        assert_eq!(step(&mut s, &mut previous, "a pod deleted"), ["reviews"]);
        Service::delete(&ObjectKey::new("shop", "ratings"), &mut s);
        service("details").apply(&mut s);
        assert_eq!(step(&mut s, &mut previous, "a Service gone, another new"), ["reviews"]);
        EndpointSlice::delete(&ObjectKey::new("shop", "reviews-v1"), &mut s);
        assert_eq!(step(&mut s, &mut previous, "a slice deleted"), ["details"]);
        assert_eq!(previous.inbound[&WorkloadIdentity::new("books", "catalog")][0].port, 7070);
    }

    fn tr(key: &str) -> ResourceRef {
        let (ns, name) = key.split_once('/').unwrap();
        ResourceRef { kind: ResourceKind::TrafficRoute, key: ObjectKey::new(ns, name) }
    }

    #[test]
    fn canary_becomes_header_rule_then_weighted_split() {
        let mesh = compute(&shop());
        let cfg = mesh.proxy_config(&WorkloadIdentity::new("shop", "productpage"));
        let dest = cfg.destination("reviews.shop.svc.cluster.local").expect("destination");
        assert_eq!(dest.endpoints.len(), 2);
        assert_eq!(dest.endpoints[0].identity, Some(WorkloadIdentity::new("shop", "reviews")));
        assert_eq!(dest.endpoints[0].ports.get("http"), Some(&9080));
        let route = &dest.routes[0];
        assert_eq!((route.name.as_str(), route.port, route.generation), ("shop/reviews", Some(9080), 2));

        let beta = &route.rules[0];
        assert_eq!(
            beta.headers,
            vec![HeaderMatch { name: "x-user-group".into(), value: StringMatch::Exact("beta".into()) }]
        );
        assert_eq!(beta.backends.len(), 1);
        assert!(matches!(&beta.backends[0].target, BackendTarget::Subset { name, .. } if name == "v2"));

        let split = &route.rules[1];
        assert!(split.headers.is_empty());
        let weights: Vec<(String, u32)> = split
            .backends
            .iter()
            .map(|b| match &b.target {
                BackendTarget::Subset { name, labels } => {
                    assert_eq!(labels.get("version"), Some(name));
                    (name.clone(), b.weight)
                }
                other => panic!("unexpected backend {other:?}"),
            })
            .collect();
        assert_eq!(weights, [("v1".to_string(), 90), ("v2".to_string(), 10)]);
        assert_eq!(split.timeout_ms, Some(10_000));

        let status = &mesh.statuses[&tr("shop/reviews")];
        assert!(status.accepted.status);
        assert_eq!(
            status.resolved_refs,
            Cond::ok("ResolvedRefs", "Service shop/reviews has 2 ready endpoints; subsets v1 (1), v2 (1)")
        );
    }

    #[test]
    fn version_is_a_content_hash() {
        let id = WorkloadIdentity::new("shop", "productpage");
        let a = compute(&shop()).proxy_config(&id);
        let b = compute(&shop()).proxy_config(&id);
        assert_eq!(a.version, b.version, "same content, same version");
        assert_eq!(a.version.len(), 12);

        let mut changed = shop();
        let route = changed.routes.values_mut().next().unwrap();
        route.spec.rules[1].backends[0].weight = 50;
        assert_ne!(compute(&changed).proxy_config(&id).version, a.version);
        assert_ne!(compute(&shop()).proxy_config(&WorkloadIdentity::new("shop", "other")).version, a.version);
    }

    #[test]
    fn the_older_route_wins_a_conflict_and_the_newer_names_it() {
        let mut s = shop();
        let mut newer: TrafficRoute = yaml(CANARY);
        newer.metadata.name = Some("reviews-b".into());
        newer.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-02-01T00:00:00Z".parse().unwrap(),
        ));
        newer.apply(&mut s);
        let mesh = compute(&s);
        let lost = &mesh.statuses[&tr("shop/reviews-b")].accepted;
        assert_eq!((lost.status, lost.reason.as_str()), (false, "Conflicted"));
        assert!(lost.message.contains("shop/reviews"), "{}", lost.message);
        assert!(mesh.statuses[&tr("shop/reviews")].accepted.status);
        let dest = &mesh.destinations[0];
        assert_eq!(dest.routes.len(), 1);
        assert_eq!(dest.routes[0].name, "shop/reviews");

        // An all-ports route for the same host does not conflict; the port-specific one comes first.
        let mut all_ports: TrafficRoute = yaml(CANARY);
        all_ports.metadata.name = Some("reviews-any".into());
        all_ports.spec.port = None;
        all_ports.apply(&mut s);
        let mesh = compute(&s);
        assert!(mesh.statuses[&tr("shop/reviews-any")].accepted.status);
        let names: Vec<&str> = mesh.destinations[0].routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["shop/reviews", "shop/reviews-any"]);
    }

    #[test]
    fn unresolved_references_are_reported_but_the_route_stays() {
        let mut s = shop();
        s.slices.retain(|k, _| k.name != "reviews-v2");
        let mesh = compute(&s);
        let refs = &mesh.statuses[&tr("shop/reviews")].resolved_refs;
        assert_eq!((refs.status, refs.reason.as_str()), (false, "SubsetEmpty"));
        assert!(refs.message.contains("subset v2 (version=v2)"), "{}", refs.message);
        assert_eq!(mesh.destinations[0].routes.len(), 1);

        s.services.clear();
        let refs = &compute(&s).statuses[&tr("shop/reviews")].resolved_refs;
        assert_eq!(
            (refs.reason.as_str(), refs.message.as_str()),
            ("ServiceNotFound", "Service shop/reviews not found")
        );
    }

    #[test]
    fn hosts_resolve_to_services() {
        assert_eq!(resolve_host("reviews", "shop").unwrap(), ObjectKey::new("shop", "reviews"));
        assert_eq!(resolve_host("reviews.books", "shop").unwrap(), ObjectKey::new("books", "reviews"));
        assert_eq!(
            resolve_host("reviews.books.svc.cluster.local", "shop").unwrap(),
            ObjectKey::new("books", "reviews")
        );
        assert!(resolve_host("www.example.com", "shop").is_err());
    }

    #[test]
    fn invalid_specs_are_not_accepted_and_name_the_field() {
        let mut s = shop();
        let route = s.routes.values_mut().next().unwrap();
        route.spec.rules[0].matches.as_mut().unwrap().headers[0].value =
            skein_api::crd::StringMatch { exact: None, prefix: None, regex: Some("(unclosed".into()) };
        let mesh = compute(&s);
        let accepted = &mesh.statuses[&tr("shop/reviews")].accepted;
        assert_eq!(accepted.reason, "Invalid");
        assert!(accepted.message.starts_with("spec.rules[0].match.headers[0].regex"), "{}", accepted.message);
        assert!(mesh.destinations[0].routes.is_empty(), "an invalid route is not in force");
    }

    #[test]
    fn policies_attach_to_services_and_routes_oldest_first() {
        let mut s = shop();
        yaml::<RetryPolicy>(
            "metadata: {name: a, namespace: shop, creationTimestamp: '2026-01-01T00:00:00Z'}\nspec: {targetRef: {kind: Service, name: reviews}, attempts: 3, perTryTimeout: 2s, timeout: 10s, retryOn: ['5xx']}",
        )
        .apply(&mut s);
        yaml::<RetryPolicy>(
            "metadata: {name: b, namespace: shop, creationTimestamp: '2026-03-01T00:00:00Z'}\nspec: {targetRef: {kind: Service, name: reviews}, attempts: 1, retryOn: ['reset']}",
        )
        .apply(&mut s);
        yaml::<OutlierPolicy>(
            "metadata: {name: o, namespace: shop}\nspec: {targetRef: {kind: TrafficRoute, name: reviews}, consecutiveErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionTime: 5m, maxEjectionPercent: 50}",
        )
        .apply(&mut s);
        yaml::<OutlierPolicy>(
            "metadata: {name: lost, namespace: shop}\nspec: {targetRef: {kind: Service, name: ratings}, consecutiveErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionTime: 5m, maxEjectionPercent: 50}",
        )
        .apply(&mut s);
        let mesh = compute(&s);
        let dest = &mesh.destinations[0];
        let retry = dest.retry.as_ref().expect("service retry policy");
        assert_eq!(
            (retry.policy.as_str(), retry.attempts, retry.per_try_timeout_ms),
            ("shop/a", 3, Some(2000))
        );
        assert_eq!(retry.retry_on, ["5xx"]);
        let outlier = dest.routes[0].outlier.as_ref().expect("route outlier policy");
        assert_eq!(
            (outlier.consecutive_errors, outlier.base_ejection_ms, outlier.max_ejection_ms),
            (3, 30_000, 300_000)
        );

        let rp = |n: &str| {
            &mesh.statuses[&ResourceRef { kind: ResourceKind::RetryPolicy, key: ObjectKey::new("shop", n) }]
        };
        assert!(rp("a").accepted.status);
        assert_eq!(rp("b").accepted.reason, "Conflicted");
        assert!(rp("b").accepted.message.contains("shop/a"));
        let lost = &mesh.statuses
            [&ResourceRef { kind: ResourceKind::OutlierPolicy, key: ObjectKey::new("shop", "lost") }];
        assert_eq!(lost.resolved_refs.reason, "ServiceNotFound");
    }

    #[test]
    fn meshed_workloads_get_their_inbound_ports() {
        let mesh = compute(&shop());
        let cfg = mesh.proxy_config(&WorkloadIdentity::new("shop", "reviews"));
        assert_eq!(cfg.inbound, vec![InboundPort { port: 9080, protocol: Protocol::Http }]);
    }

    fn ap(key: &str) -> ResourceRef {
        let (ns, name) = key.split_once('/').unwrap();
        ResourceRef { kind: ResourceKind::AccessPolicy, key: ObjectKey::new(ns, name) }
    }

    /// The shop with a selector Service `ratings` (port 80 → named container port `http`,
    /// 9090) behind two pods of identity shop/ratings, and a client pod.
    fn shop_with_ratings() -> Snapshot {
        let mut s = shop();
        yaml::<Service>(
            "metadata: {name: ratings, namespace: shop}\nspec: {selector: {app: ratings}, ports: [{name: http, port: 80, targetPort: http}, {name: tcp-db, port: 5432}]}",
        )
        .apply(&mut s);
        for pod in ["ratings-0", "ratings-1"] {
            yaml::<Pod>(&format!(
                "metadata: {{name: {pod}, namespace: shop, labels: {{app: ratings, skein.dev/inject: enabled}}}}\nspec: {{serviceAccountName: ratings, containers: [{{name: app, ports: [{{name: http, containerPort: 9090}}]}}]}}"
            ))
            .apply(&mut s);
        }
        yaml::<Pod>(
            "metadata: {name: client-0, namespace: shop, labels: {skein.dev/inject: enabled}}\nspec: {serviceAccountName: client, containers: []}",
        )
        .apply(&mut s);
        s
    }

    #[test]
    fn access_policies_translate_service_ports_to_the_pods_ports() {
        use skein_api::authz::{Action, DefaultPolicy, Destination as To};
        let mut s = shop_with_ratings();
        yaml::<skein_api::AccessPolicy>(
            r#"
metadata: {name: ratings-callers, namespace: shop, generation: 4}
spec:
  targetRef: {kind: Service, name: ratings}
  rules:
    - from: {serviceAccounts: [{namespace: shop, name: client}]}
      to: {ports: [80], methods: [GET]}
"#,
        )
        .apply(&mut s);
        let mesh = compute(&s);
        let ratings = mesh.proxy_config(&WorkloadIdentity::new("shop", "ratings")).authz;
        assert_eq!((ratings.default, ratings.namespace.as_str()), (DefaultPolicy::Allow, "shop"));
        let policy = &ratings.policies[0];
        assert_eq!((policy.name.as_str(), policy.action), ("shop/ratings-callers", Action::Allow));
        // Service ports 80 (targetPort http → 9090) and 5432 become the pods' ports.
        assert_eq!(policy.ports, [5432, 9090]);
        assert_eq!(
            policy.rules[0].to,
            Some(To { ports: vec![9090], methods: vec!["GET".into()], paths: vec![] })
        );
        assert_eq!(
            policy.rules[0].from.as_ref().unwrap().service_accounts,
            [("shop".into(), "client".into())]
        );
        assert!(mesh.proxy_config(&WorkloadIdentity::new("shop", "client")).authz.policies.is_empty());

        let status = &mesh.statuses[&ap("shop/ratings-callers")];
        assert_eq!((status.generation, status.accepted.status), (4, true));
        assert_eq!(status.resolved_refs, Cond::ok("ResolvedRefs", "targets Service shop/ratings"));
        assert_eq!(status.audience, Some([WorkloadIdentity::new("shop", "ratings")].into()));
        let (kind, enforced) = &status.extra[0];
        assert_eq!((*kind, enforced.status), ("Enforced", true));
        assert!(enforced.message.contains("2 target pod(s)"), "{}", enforced.message);
    }

    #[test]
    fn access_policies_that_could_never_match_are_invalid_and_name_the_field() {
        let mut s = shop_with_ratings();
        for (name, rules, says) in [
            (
                "no-port",
                "[{to: {ports: [81]}}]",
                "spec.rules[0].to.ports[0]: Service shop/ratings has no port 81",
            ),
            (
                "tcp",
                "[{to: {ports: [5432], paths: [{prefix: /x}]}}]",
                "spec.rules[0].to.paths: port 5432 of Service shop/ratings is not HTTP",
            ),
            ("empty-from", "[{from: {}}]", "spec.rules[0].from: from must name"),
        ] {
            yaml::<skein_api::AccessPolicy>(&format!(
                "metadata: {{name: {name}, namespace: shop}}\nspec: {{targetRef: {{kind: Service, name: ratings}}, rules: {rules}}}"
            ))
            .apply(&mut s);
            let status = &compute(&s).statuses[&ap(&format!("shop/{name}"))];
            assert_eq!(status.accepted.reason, "Invalid");
            assert!(status.accepted.message.starts_with(says), "{name}: {}", status.accepted.message);
            s.access_policies.clear();
        }
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: other, namespace: shop}\nspec: {targetRef: {kind: Namespace, name: books}}",
        )
        .apply(&mut s);
        let status = &compute(&s).statuses[&ap("shop/other")];
        assert!(
            status.accepted.message.starts_with(
                "spec.targetRef.name: a Namespace target must be the policy's own namespace (shop)"
            ),
            "{}",
            status.accepted.message
        );
        // A policy naming another namespace is in force nowhere.
        assert!(compute(&s).authz.values().all(|a| a.policies.is_empty()));
    }

    #[test]
    fn an_invalid_access_policy_fails_closed_rather_than_falling_back_to_the_default() {
        use skein_api::authz::{Action, AuthzRule};
        let mut s = shop_with_ratings();
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: allow, namespace: shop}\nspec: {targetRef: {kind: Service, name: ratings}, rules: [{to: {ports: [81]}}, {from: {serviceAccounts: [{namespace: shop, name: client}]}}]}",
        )
        .apply(&mut s);
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: deny, namespace: shop}\nspec: {targetRef: {kind: Service, name: ratings}, action: Deny, rules: [{from: {namespaces: [books]}, to: {ports: [5432], paths: [{prefix: /x}]}}]}",
        )
        .apply(&mut s);
        let mesh = compute(&s);
        let allow = &mesh.statuses[&ap("shop/allow")];
        assert_eq!((allow.accepted.status, allow.accepted.reason.as_str()), (false, "Invalid"));
        assert!(
            allow.accepted.message.contains("until fixed, the rules named allow nothing"),
            "{}",
            allow.accepted.message
        );
        let deny = &mesh.statuses[&ap("shop/deny")];
        assert!(
            deny.accepted.message.contains("deny every request on the policy's ports"),
            "{}",
            deny.accepted.message
        );
        assert_eq!(
            deny.audience,
            Some([WorkloadIdentity::new("shop", "ratings")].into()),
            "still programmed"
        );
        let ratings = mesh.proxy_config(&WorkloadIdentity::new("shop", "ratings")).authz;
        let [allow, deny] = &ratings.policies[..] else { panic!("{ratings:?}") };
        // The broken Allow rule is gone and the valid one stays: the port still denies others.
        assert_eq!((allow.action, allow.rules.len()), (Action::Allow, 1));
        assert!(allow.rules[0].from.is_some());
        // The broken Deny rule denies everything on the Service's ports.
        assert_eq!((deny.action, &deny.rules[..]), (Action::Deny, &[AuthzRule::default()][..]));
        assert_eq!(deny.ports, [5432, 9090]);
    }

    #[test]
    fn an_identity_not_seen_yet_holds_its_namespace_policies_and_default() {
        use skein_api::authz::DefaultPolicy;
        let mut s = shop_with_ratings();
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: ns-wide, namespace: shop}\nspec: {targetRef: {kind: Namespace, name: shop}, rules: [{from: {namespaces: [shop]}}]}",
        )
        .apply(&mut s);
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: ratings-only, namespace: shop}\nspec: {targetRef: {kind: Service, name: ratings}, rules: [{from: {namespaces: [shop]}}]}",
        )
        .apply(&mut s);
        let mesh = compute(&s);
        let newcomer = mesh.proxy_config(&WorkloadIdentity::new("shop", "newcomer")).authz;
        assert_eq!(newcomer.default, DefaultPolicy::Allow);
        let names: Vec<&str> = newcomer.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["shop/ns-wide"]);
        assert!(mesh.proxy_config(&WorkloadIdentity::new("books", "newcomer")).authz.policies.is_empty());
    }

    #[test]
    fn target_pods_without_a_sidecar_make_the_policy_not_enforced() {
        let mut s = shop_with_ratings();
        yaml::<Pod>(
            "metadata: {name: ratings-plain, namespace: shop, labels: {app: ratings}}\nspec: {serviceAccountName: ratings, containers: []}",
        )
        .apply(&mut s);
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: callers, namespace: shop}\nspec: {targetRef: {kind: Service, name: ratings}}",
        )
        .apply(&mut s);
        let status = &compute(&s).statuses[&ap("shop/callers")];
        let (_, enforced) = &status.extra[0];
        assert_eq!((enforced.status, enforced.reason.as_str()), (false, "NotMeshed"));
        assert!(
            enforced.message.starts_with("1 pod(s) the target Service selects carry no sidecar"),
            "{}",
            enforced.message
        );
        assert!(enforced.message.contains("ratings-plain"), "{}", enforced.message);
    }

    #[test]
    fn references_and_explicit_workloads_are_reported() {
        let mut s = shop_with_ratings();
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: ns-wide, namespace: shop}\nspec: {targetRef: {kind: Namespace, name: shop}, rules: [{from: {serviceAccounts: [{namespace: shop, name: clinet}, {namespace: shop, name: '*'}]}}]}",
        )
        .apply(&mut s);
        yaml::<skein_api::AccessPolicy>(
            "metadata: {name: gone, namespace: shop}\nspec: {targetRef: {kind: Service, name: nothing}}",
        )
        .apply(&mut s);
        let mut explicit: Pod = yaml(
            "metadata: {name: ratings-x, namespace: shop, labels: {app: ratings, skein.dev/inject: enabled}, annotations: {skein.dev/injected: 'native-sidecar,explicit'}}\nspec: {serviceAccountName: ratings, containers: []}",
        );
        explicit.metadata.uid = Some("u-1".into());
        explicit.apply(&mut s);
        let mesh = compute(&s);
        let ns_wide = &mesh.statuses[&ap("shop/ns-wide")];
        assert_eq!(ns_wide.resolved_refs.reason, "ServiceAccountNotFound");
        assert!(ns_wide
            .resolved_refs
            .message
            .contains("shop/clinet (spec.rules[0].from.serviceAccounts[0])"));
        assert!(!ns_wide.resolved_refs.message.contains("shop/*"));
        let (_, enforced) = &ns_wide.extra[0];
        assert_eq!((enforced.status, enforced.reason.as_str()), (false, "ExplicitCapture"));
        assert!(enforced.message.contains("ratings-x"), "{}", enforced.message);
        assert_eq!(ns_wide.explicit_pods, [(ObjectKey::new("shop", "ratings-x"), Some("u-1".into()))]);
        // Every meshed identity of the namespace holds a Namespace target, with no port limit.
        for id in ["client", "ratings", "reviews"] {
            let authz = mesh.proxy_config(&WorkloadIdentity::new("shop", id)).authz;
            assert_eq!(authz.policies.len(), 1, "{id}");
            assert!(authz.policies[0].ports.is_empty());
        }
        let gone = &mesh.statuses[&ap("shop/gone")];
        assert!(gone.accepted.status);
        assert_eq!(gone.resolved_refs.reason, "ServiceNotFound");
    }

    #[test]
    fn namespace_defaults_come_from_the_annotation_else_the_mesh() {
        use k8s_openapi::api::core::v1::Namespace;
        use skein_api::authz::DefaultPolicy;
        let mut s = shop_with_ratings();
        s.default_policy = DefaultPolicy::Authenticated;
        let of = |mesh: &MeshConfig, ns: &str, sa: &str| {
            mesh.proxy_config(&WorkloadIdentity::new(ns, sa)).authz.default
        };
        let mesh = compute(&s);
        assert_eq!(of(&mesh, "shop", "ratings"), DefaultPolicy::Authenticated);
        yaml::<Namespace>("metadata: {name: shop, annotations: {skein.dev/default-policy: same-namespace}}")
            .apply(&mut s);
        let mesh = compute(&s);
        assert_eq!(of(&mesh, "shop", "ratings"), DefaultPolicy::SameNamespace);
        // An identity none of whose pods is seen yet gets its namespace's default too.
        assert_eq!(of(&mesh, "shop", "newcomer"), DefaultPolicy::SameNamespace);
        assert_eq!(of(&mesh, "books", "newcomer"), DefaultPolicy::Authenticated);
        yaml::<Namespace>("metadata: {name: shop, annotations: {skein.dev/default-policy: authenticted}}")
            .apply(&mut s);
        let mesh = compute(&s);
        assert_eq!(of(&mesh, "shop", "ratings"), DefaultPolicy::Deny, "a typo fails closed");
        assert_eq!(mesh.bad_namespace_defaults.get("shop").map(String::as_str), Some("authenticted"));
    }

    /// The shop plus Services `books/catalog`, `shared/other` and `shop/legacy`, which a rule
    /// of the `shop/reviews` route sends traffic to.
    fn wider_mesh() -> Snapshot {
        let mut s = shop();
        for (ns, name) in [("books", "catalog"), ("shop", "legacy"), ("shared", "other")] {
            yaml::<Service>(&format!(
                "metadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{name: http, port: 80}}]}}"
            ))
            .apply(&mut s);
        }
        let route = s.routes.values_mut().next().unwrap();
        route.spec.rules[1]
            .backends
            .push(serde_json::from_value(serde_json::json!({"service": "legacy", "weight": 1})).unwrap());
        s
    }

    #[test]
    fn a_scoped_workload_receives_its_services_and_what_their_routes_send_to() {
        use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
        let mut s = wider_mesh();
        yaml::<Namespace>("metadata: {name: shop, annotations: {skein.dev/destinations: './*'}}")
            .apply(&mut s);
        yaml::<ServiceAccount>("metadata: {name: batch, namespace: shop, annotations: {skein.dev/destinations: 'books/catalog'}}")
            .apply(&mut s);
        let mesh = compute(&s);
        let names = |id: &WorkloadIdentity| -> Vec<String> {
            mesh.proxy_config(id).destinations.iter().map(|d| format!("{}/{}", d.namespace, d.name)).collect()
        };
        let web = WorkloadIdentity::new("shop", "web");
        assert_eq!(names(&web), ["shop/legacy", "shop/reviews"], "its service, and the route's backend");
        assert_eq!(
            names(&WorkloadIdentity::new("shop", "batch")),
            ["books/catalog"],
            "the service account wins"
        );
        assert_eq!(names(&WorkloadIdentity::new("books", "x")).len(), 4, "no annotation: every Service");

        // The line the stream sends is the config, assembled from shared bytes.
        for id in [&web, &WorkloadIdentity::new("books", "x")] {
            let (version, line) = mesh.proxy_line(id);
            assert!(line.ends_with(b"\n"));
            let parsed: ProxyConfig = serde_json::from_slice(&line).unwrap();
            assert_eq!(parsed, mesh.proxy_config(id));
            assert_eq!(
                (version.as_str(), mesh.version_of(id)),
                (parsed.version.as_str(), parsed.version.clone())
            );
        }

        // A change outside the scope leaves the version alone; one inside moves it.
        let before = mesh.version_of(&web);
        let mut outside = s.clone();
        yaml::<Service>(
            "metadata: {name: catalog, namespace: books}\nspec: {ports: [{name: http, port: 81}]}",
        )
        .apply(&mut outside);
        assert_eq!(compute(&outside).version_of(&web), before);
        assert_ne!(
            compute(&outside).version_of(&WorkloadIdentity::new("shop", "batch")),
            mesh.version_of(&WorkloadIdentity::new("shop", "batch"))
        );
        let mut inside = s.clone();
        yaml::<Service>("metadata: {name: legacy, namespace: shop}\nspec: {ports: [{name: http, port: 81}]}")
            .apply(&mut inside);
        assert_ne!(compute(&inside).version_of(&web), before);

        // A typo counts as no annotation, and is reported.
        yaml::<Namespace>("metadata: {name: shop, annotations: {skein.dev/destinations: 'shop'}}")
            .apply(&mut s);
        let mesh = compute(&s);
        assert_eq!(mesh.proxy_config(&WorkloadIdentity::new("shop", "web")).destinations.len(), 4);
        assert!(mesh.scope_problems()["namespace shop"].contains("<namespace>/<service>"));
    }

    #[test]
    fn a_line_is_cut_into_frames_of_at_most_the_frame_size_that_join_into_it() {
        let big = |c: u8, n: usize| bytes::Bytes::from(vec![c; n]);
        let items = vec![big(b'a', FRAME_BYTES + 10), big(b'b', 3), big(b'c', FRAME_BYTES - 2)];
        let plan = LinePlan::new("v".into(), br#"{"v":"v","list":[],"z":1}"#, br#""list":[]"#, items);
        let frames: Vec<bytes::Bytes> = plan.clone().frames().collect();
        assert!(frames.iter().all(|f| !f.is_empty() && f.len() <= FRAME_BYTES));
        assert_eq!(frames.len(), 3);
        let joined: Vec<u8> = frames.concat();
        assert_eq!(joined.len(), plan.len());
        let mut want = br#"{"v":"v","list":["#.to_vec();
        want.extend(vec![b'a'; FRAME_BYTES + 10]);
        want.push(b',');
        want.extend(vec![b'b'; 3]);
        want.push(b',');
        want.extend(vec![b'c'; FRAME_BYTES - 2]);
        want.extend_from_slice(b"],\"z\":1}\n");
        assert_eq!(joined, want);
        let empty = LinePlan::new("v".into(), br#"{"list":[]}"#, br#""list":[]"#, vec![]);
        assert_eq!((empty.to_bytes(), empty.len()), (bytes::Bytes::from_static(b"{\"list\":[]}\n"), 12));
    }

    #[test]
    fn a_delta_applied_to_the_old_config_gives_the_new_one_and_carries_only_what_changed() {
        let client = WorkloadIdentity::new("shop", "client");
        let mut s = shop_with_ratings();
        let old = compute(&s);
        // One Service changes (an endpoint more), one is added, one is removed.
        yaml::<EndpointSlice>(
            r#"
metadata: {name: reviews-v3, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints: [{addresses: ["10.0.0.3"], conditions: {ready: true}}]
"#,
        )
        .apply(&mut s);
        yaml::<Service>(
            "metadata: {name: details, namespace: shop}\nspec: {ports: [{name: http, port: 9080}]}",
        )
        .apply(&mut s);
        s.services.remove(&ObjectKey::new("shop", "ratings"));
        let new = compute(&s);
        let base = old.proxy_config(&client);
        let (version, line) = new.delta_line(&old, &base.version, &client);
        assert!(line.starts_with(skein_api::config::DELTA_PREFIX) && line.ends_with(b"\n"));
        let delta: skein_api::config::DeltaLine = serde_json::from_slice(&line).unwrap();
        let upserted: Vec<&str> = delta.delta.upsert.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(upserted, ["details", "reviews"]);
        assert_eq!(delta.delta.remove, [("shop".to_string(), "ratings".to_string())]);
        assert_eq!(version, new.version_of(&client));
        assert_eq!(delta.delta.apply_to(&base).unwrap(), new.proxy_config(&client));
        // Another identity of the same scope: the same change (found once), its own parts.
        let web = WorkloadIdentity::new("shop", "web");
        let (_, other) = new.delta_line(&old, &old.version_of(&web), &web);
        let other: skein_api::config::DeltaLine = serde_json::from_slice(&other).unwrap();
        assert_eq!(other.delta.apply_to(&old.proxy_config(&web)).unwrap(), new.proxy_config(&web));
        // Nothing changed (from another mesh, so the change found above is not reused): an
        // empty delta.
        let (_, same) = new.delta_line(&new, &version, &client);
        let same: skein_api::config::DeltaLine = serde_json::from_slice(&same).unwrap();
        assert!(same.delta.upsert.is_empty() && same.delta.remove.is_empty());
    }
}
