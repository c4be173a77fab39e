//! The snapshot: everything the config computation reads, as plain data.
//!
//! Watchers (or, in local mode, files) feed it with `apply`/`delete`; the computation reads it
//! under a lock and never touches an API client. Kubernetes objects are reduced to the few fields
//! Skein needs, which keeps memory small at 10,000 endpoints and keeps tests short.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use skein_api::authz::DefaultPolicy;
use skein_api::config::LoadBalancer;
use skein_api::constants::{
    DEFAULT_POLICY_ANNOTATION, DESTINATIONS_ANNOTATION, INJECTED_ANNOTATION, INJECT_LABEL,
    LOAD_BALANCER_ANNOTATION,
};
use skein_api::{AccessPolicy, OutlierPolicy, RetryPolicy, TrafficRoute, WorkloadIdentity};

/// Name of the sidecar container; a pod carrying it is meshed.
pub const SIDECAR_CONTAINER: &str = "skein-proxy";
/// Label the endpoints controller puts on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The key of a namespaced object (an object without a namespace lands in `default`, as the
    /// API server would have put it).
    pub fn of<K: ResourceExt>(obj: &K) -> Self {
        Self::new(obj.namespace().unwrap_or_else(|| "default".into()), obj.name_any())
    }
}

/// A key seen as (namespace, name), so a map keyed by [`ObjectKey`] can be searched with
/// borrowed strings (`&(ns, name) as &dyn KeyRef`) instead of a key built for the lookup. Orders
/// as `ObjectKey` does: namespace, then name.
pub trait KeyRef {
    fn parts(&self) -> (&str, &str);
}

impl KeyRef for ObjectKey {
    fn parts(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl KeyRef for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn KeyRef + 'a> for ObjectKey {
    fn borrow(&self) -> &(dyn KeyRef + 'a) {
        self
    }
}

impl PartialEq for dyn KeyRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyRef + '_ {}

impl PartialOrd for dyn KeyRef + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn KeyRef + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One Service port, reduced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: Option<String>,
    pub port: u16,
    /// `appProtocol` (or the `tcp-`/`http-` port-name prefix convention).
    pub app_protocol: Option<String>,
    /// The pods' port behind it: a number, or the name of a container port.
    pub target_port: TargetPort,
}

/// A Service port's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// A Service, reduced.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    pub ports: Vec<ServicePortInfo>,
    /// `spec.clusterIPs` (or `clusterIP`), without `None`.
    pub cluster_ips: Vec<String>,
    pub load_balancer: LoadBalancer,
    /// `spec.selector`; `None` for a Service without one (its endpoints are managed by hand).
    pub selector: Option<BTreeMap<String, String>>,
}

impl ServiceInfo {
    pub fn from_service(svc: &Service) -> Self {
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        let port = u16::try_from(p.port).ok()?;
                        let target_port = match &p.target_port {
                            Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                            Some(IntOrString::String(name)) => match name.parse() {
                                Ok(n) => TargetPort::Number(n),
                                Err(_) => TargetPort::Name(name.clone()),
                            },
                            None => TargetPort::Number(port),
                        };
                        Some(ServicePortInfo {
                            name: p.name.clone().filter(|n| !n.is_empty()),
                            port,
                            app_protocol: p.app_protocol.clone(),
                            target_port,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let spec = svc.spec.as_ref();
        let cluster_ips = spec
            .and_then(|s| s.cluster_ips.clone().or_else(|| s.cluster_ip.clone().map(|ip| vec![ip])))
            .unwrap_or_default()
            .into_iter()
            .filter(|ip| !ip.is_empty() && ip != "None")
            .collect();
        let load_balancer = match svc.annotations().get(LOAD_BALANCER_ANNOTATION).map(String::as_str) {
            Some("round-robin") => LoadBalancer::RoundRobin,
            _ => LoadBalancer::P2cEwma,
        };
        let selector = spec.and_then(|s| s.selector.clone()).filter(|s| !s.is_empty());
        Self { ports, cluster_ips, load_balancer, selector }
    }

    /// Whether this Service's selector picks a pod with `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.as_ref().is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// One address in an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub address: String,
    pub ready: bool,
    /// Name of the pod behind the address (`targetRef`), in the slice's namespace.
    pub pod: Option<String>,
}

/// An EndpointSlice, reduced.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SliceInfo {
    pub service: String,
    /// Port name (empty when unnamed) → port number.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<SliceEndpoint>,
}

impl SliceInfo {
    /// `None` for a slice no Service owns (no `kubernetes.io/service-name` label).
    pub fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?)))
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .flat_map(|ep| {
                // An absent `ready` condition means ready (discovery.k8s.io/v1 semantics).
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.clone());
                ep.addresses.iter().map(move |a| SliceEndpoint {
                    address: a.clone(),
                    ready,
                    pod: pod.clone(),
                })
            })
            .collect();
        Some(Self { service, ports, endpoints })
    }
}

/// A Pod, reduced to what endpoints, identities and access policies need.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Carries the sidecar (or asks for it), so it has a mesh identity.
    pub meshed: bool,
    /// Injected in explicit capture mode: its app's ports are reachable without the sidecar.
    pub explicit: bool,
    /// Named container ports (a Service's `targetPort` may name one).
    pub named_ports: BTreeMap<String, u16>,
    pub uid: Option<String>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let has_sidecar = spec.is_some_and(|s| {
            s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == SIDECAR_CONTAINER)
        });
        let asks = pod.labels().get(INJECT_LABEL).is_some_and(|v| v == "enabled");
        let explicit =
            pod.annotations().get(INJECTED_ANNOTATION).is_some_and(|v| v.split(',').any(|m| m == "explicit"));
        let named_ports = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
            .collect();
        Self {
            labels: pod.labels().clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            meshed: has_sidecar || asks,
            explicit,
            named_ports,
            uid: pod.metadata.uid.clone(),
        }
    }

    pub fn identity(&self, namespace: &str) -> WorkloadIdentity {
        WorkloadIdentity::new(namespace, self.service_account.clone())
    }
}

/// A Namespace, reduced: its access default, when it sets one.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NamespaceInfo {
    /// The `skein.dev/default-policy` annotation, as written.
    pub default_policy: Option<String>,
    /// The `skein.dev/destinations` annotation, as written.
    pub destinations: Option<String>,
}

impl NamespaceInfo {
    /// The namespace's default, else the mesh's. An annotation that is not one of the four
    /// values is `Err(value)`, and the namespace falls back to `deny` (fail closed).
    pub fn default_policy(&self, mesh: DefaultPolicy) -> Result<DefaultPolicy, String> {
        match self.default_policy.as_deref().map(str::trim) {
            None => Ok(mesh),
            Some(v) => DefaultPolicy::parse(v).ok_or_else(|| v.to_string()),
        }
    }
}

/// Everything the computation reads.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub routes: BTreeMap<ObjectKey, TrafficRoute>,
    pub outlier_policies: BTreeMap<ObjectKey, OutlierPolicy>,
    pub retry_policies: BTreeMap<ObjectKey, RetryPolicy>,
    pub access_policies: BTreeMap<ObjectKey, AccessPolicy>,
    pub services: BTreeMap<ObjectKey, ServiceInfo>,
    pub slices: BTreeMap<ObjectKey, SliceInfo>,
    pub pods: BTreeMap<ObjectKey, PodInfo>,
    /// Namespaces by name (the key's namespace is empty).
    pub namespaces: BTreeMap<ObjectKey, NamespaceInfo>,
    /// Service accounts that exist (to warn of policies naming one that does not), with their
    /// `skein.dev/destinations` annotation.
    pub service_accounts: BTreeMap<ObjectKey, Option<String>>,
    /// The mesh-wide access default (`--default-policy`), for namespaces without their own.
    pub default_policy: DefaultPolicy,
    /// What `apply` and `delete` changed since the last [`Snapshot::take_changes`]. Fields
    /// written directly are not seen here: give such a snapshot to [`super::compute`].
    pub changes: Changes,
}

/// What changed in a snapshot that a Service's destination depends on: an object put in again
/// as it was changes nothing (a pod's status update, a re-list).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose Service object or one of whose EndpointSlices changed.
    pub services: BTreeSet<ObjectKey>,
    /// Pods that changed (the labels and identity of their endpoints).
    pub pods: BTreeSet<ObjectKey>,
}

impl Changes {
    /// Adds `other`'s changes.
    pub fn merge(&mut self, other: Changes) {
        self.services.extend(other.services);
        self.pods.extend(other.pods);
    }

    /// The Services whose destination may differ: those changed, and those with an endpoint of
    /// a changed pod.
    pub fn services_touched<'a>(&'a self, snapshot: &'a Snapshot) -> BTreeSet<(&'a str, &'a str)> {
        let mut touched: BTreeSet<(&str, &str)> =
            self.services.iter().map(|k| (k.namespace.as_str(), k.name.as_str())).collect();
        if !self.pods.is_empty() {
            for (key, slice) in &snapshot.slices {
                let of_changed_pod = slice.endpoints.iter().any(|e| {
                    e.pod
                        .as_deref()
                        .is_some_and(|p| self.pods.contains(&(key.namespace.as_str(), p) as &dyn KeyRef))
                });
                if of_changed_pod {
                    touched.insert((key.namespace.as_str(), slice.service.as_str()));
                }
            }
        }
        touched
    }
}

fn service_changed(changes: &mut Changes, key: &ObjectKey, _: &ServiceInfo) {
    changes.services.insert(key.clone());
}

fn slice_changed(changes: &mut Changes, key: &ObjectKey, slice: &SliceInfo) {
    changes.services.insert(ObjectKey::new(key.namespace.clone(), slice.service.clone()));
}

fn pod_changed(changes: &mut Changes, key: &ObjectKey, _: &PodInfo) {
    changes.pods.insert(key.clone());
}

impl Snapshot {
    /// What changed since the last call, which starts a new record.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// The pod `name` of namespace `namespace`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&(namespace, name) as &dyn KeyRef)
    }

    /// The access default of a namespace's workloads.
    pub fn namespace_default(&self, namespace: &str) -> Result<DefaultPolicy, String> {
        match self.namespaces.get(&ObjectKey::new("", namespace)) {
            Some(ns) => ns.default_policy(self.default_policy),
            None => Ok(self.default_policy),
        }
    }
}

/// An object kind the snapshot holds, with how to put it in and take it out.
pub trait SnapshotObject: Sized {
    /// Puts the object in; whether anything the computation reads changed (a custom resource
    /// whose status alone changed, as when the operator writes it, changes nothing).
    fn apply(self, snapshot: &mut Snapshot) -> bool;
    /// Takes the object out; whether it was there.
    fn delete(key: &ObjectKey, snapshot: &mut Snapshot) -> bool;
    /// Keys of this kind currently held (to prune after a re-list).
    fn keys(snapshot: &Snapshot) -> Vec<ObjectKey>;
    /// The key an object of this kind is held under.
    fn key_of(&self) -> ObjectKey;
}

/// Whether two versions of a custom resource are the same to the computation: the spec (told
/// by the caller) and the metadata it reads, not the status or the resourceVersion.
fn same_resource<K: kube::Resource>(a: &K, b: &K, same_spec: bool) -> bool {
    let (a, b) = (a.meta(), b.meta());
    same_spec
        && a.generation == b.generation
        && a.uid == b.uid
        && a.creation_timestamp == b.creation_timestamp
        && a.deletion_timestamp == b.deletion_timestamp
        && a.labels == b.labels
        && a.annotations == b.annotations
}

/// `same(a, b)` when a comparison is given, else `a == b`.
macro_rules! same_value {
    (|$a:ident, $b:ident| $same:expr; $x:expr, $y:expr) => {{
        let ($a, $b) = ($x, $y);
        $same
    }};
    (; $x:expr, $y:expr) => {
        $x == $y
    };
}

/// Implements [`SnapshotObject`] for a kind held in `snapshot.$field`, converted by
/// `$convert` (`None`: not held). `same = |a, b| …` tells two held values apart (`==` when not
/// given); `$changed(changes, key, value)`, when given, records the old and the new value of an
/// object that changed (in [`Snapshot::changes`]).
macro_rules! snapshot_object {
    ($ty:ty, $field:ident, |$obj:ident| $convert:expr
     $(, same = |$a:ident, $b:ident| $same:expr)? $(, changed = $changed:path)?) => {
        impl SnapshotObject for $ty {
            fn apply(self, snapshot: &mut Snapshot) -> bool {
                let key = self.key_of();
                let $obj = self;
                let value = $convert;
                let old = snapshot.$field.get(&key);
                let same = match (old, value.as_ref()) {
                    (None, None) => true,
                    (Some(a), Some(b)) => same_value!($(|$a, $b| $same)?; a, b),
                    _ => false,
                };
                $(
                    if !same {
                        for v in old.into_iter().chain(value.as_ref()) {
                            $changed(&mut snapshot.changes, &key, v);
                        }
                    }
                )?
                match value {
                    Some(value) => {
                        snapshot.$field.insert(key, value);
                    }
                    None => {
                        snapshot.$field.remove(&key);
                    }
                }
                !same
            }
            fn delete(key: &ObjectKey, snapshot: &mut Snapshot) -> bool {
                let old = snapshot.$field.remove(key);
                $(
                    if let Some(old) = &old {
                        $changed(&mut snapshot.changes, key, old);
                    }
                )?
                old.is_some()
            }
            fn keys(snapshot: &Snapshot) -> Vec<ObjectKey> {
                snapshot.$field.keys().cloned().collect()
            }
            fn key_of(&self) -> ObjectKey {
                ObjectKey::of(self)
            }
        }
    };
}

/// A cluster-scoped kind, keyed by name alone.
macro_rules! cluster_snapshot_object {
    ($ty:ty, $field:ident, |$obj:ident| $convert:expr) => {
        impl SnapshotObject for $ty {
            fn apply(self, snapshot: &mut Snapshot) -> bool {
                let key = self.key_of();
                let $obj = self;
                let value = $convert;
                snapshot.$field.insert(key, value.clone()).as_ref() != Some(&value)
            }
            fn delete(key: &ObjectKey, snapshot: &mut Snapshot) -> bool {
                snapshot.$field.remove(key).is_some()
            }
            fn keys(snapshot: &Snapshot) -> Vec<ObjectKey> {
                snapshot.$field.keys().cloned().collect()
            }
            fn key_of(&self) -> ObjectKey {
                ObjectKey::new("", self.name_any())
            }
        }
    };
}

snapshot_object!(TrafficRoute, routes, |o| Some(o), same = |a, b| same_resource(a, b, a.spec == b.spec));
snapshot_object!(
    OutlierPolicy,
    outlier_policies,
    |o| Some(o),
    same = |a, b| same_resource(a, b, a.spec == b.spec)
);
snapshot_object!(
    RetryPolicy,
    retry_policies,
    |o| Some(o),
    same = |a, b| same_resource(a, b, a.spec == b.spec)
);
snapshot_object!(
    AccessPolicy,
    access_policies,
    |o| Some(o),
    same = |a, b| same_resource(a, b, a.spec == b.spec)
);
snapshot_object!(ServiceAccount, service_accounts, |o| Some(
    o.annotations().get(DESTINATIONS_ANNOTATION).cloned()
));
snapshot_object!(Service, services, |o| Some(ServiceInfo::from_service(&o)), changed = service_changed);
snapshot_object!(EndpointSlice, slices, |o| SliceInfo::from_slice(&o), changed = slice_changed);
snapshot_object!(Pod, pods, |o| Some(PodInfo::from_pod(&o)), changed = pod_changed);
cluster_snapshot_object!(Namespace, namespaces, |o| NamespaceInfo {
    default_policy: o.annotations().get(DEFAULT_POLICY_ANNOTATION).cloned(),
    destinations: o.annotations().get(DESTINATIONS_ANNOTATION).cloned(),
});

impl Snapshot {
    /// Every workload's destination scope, from the annotations (see [`super::scope`]).
    pub fn scopes(&self) -> super::scope::Scopes {
        use super::scope::{Scope, Scopes};
        let mut scopes = Scopes::default();
        let mut read = |object: String, value: &str| match Scope::parse(value) {
            Ok(scope) => Some(scope),
            Err(why) => {
                scopes.problems.insert(object, why);
                None
            }
        };
        let mut by_namespace = BTreeMap::new();
        for (k, ns) in &self.namespaces {
            if let Some(scope) =
                ns.destinations.as_deref().and_then(|v| read(format!("namespace {}", k.name), v))
            {
                by_namespace.insert(k.name.clone(), scope);
            }
        }
        let mut by_service_account = BTreeMap::new();
        for (k, value) in &self.service_accounts {
            if let Some(scope) = value.as_deref().and_then(|v| read(format!("serviceaccount {k}"), v)) {
                by_service_account.insert((k.namespace.clone(), k.name.clone()), scope);
            }
        }
        scopes.by_namespace = by_namespace;
        scopes.by_service_account = by_service_account;
        scopes
    }
}
