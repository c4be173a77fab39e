//! The snapshot: everything the config computation reads, as plain data.
//!
//! Watchers (or, in local mode, files) feed it with `apply`/`delete`; the computation reads it
//! under a lock and never touches an API client. Kubernetes objects are reduced to the few fields
//! Skein needs, which keeps memory small at 10,000 endpoints and keeps tests short.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use skein_api::config::LoadBalancer;
use skein_api::constants::{INJECT_LABEL, LOAD_BALANCER_ANNOTATION};
use skein_api::{OutlierPolicy, RetryPolicy, TrafficRoute, WorkloadIdentity};

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
}

/// A Service, reduced.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    pub ports: Vec<ServicePortInfo>,
    /// `spec.clusterIPs` (or `clusterIP`), without `None`.
    pub cluster_ips: Vec<String>,
    pub load_balancer: LoadBalancer,
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
                        Some(ServicePortInfo {
                            name: p.name.clone().filter(|n| !n.is_empty()),
                            port: u16::try_from(p.port).ok()?,
                            app_protocol: p.app_protocol.clone(),
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
        Self { ports, cluster_ips, load_balancer }
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

/// A Pod, reduced to what endpoints and identities need.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Carries the sidecar (or asks for it), so it has a mesh identity.
    pub meshed: bool,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let has_sidecar = spec.is_some_and(|s| {
            s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == SIDECAR_CONTAINER)
        });
        let asks = pod.labels().get(INJECT_LABEL).is_some_and(|v| v == "enabled");
        Self {
            labels: pod.labels().clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            meshed: has_sidecar || asks,
        }
    }

    pub fn identity(&self, namespace: &str) -> WorkloadIdentity {
        WorkloadIdentity::new(namespace, self.service_account.clone())
    }
}

/// Everything the computation reads.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub routes: BTreeMap<ObjectKey, TrafficRoute>,
    pub outlier_policies: BTreeMap<ObjectKey, OutlierPolicy>,
    pub retry_policies: BTreeMap<ObjectKey, RetryPolicy>,
    pub services: BTreeMap<ObjectKey, ServiceInfo>,
    pub slices: BTreeMap<ObjectKey, SliceInfo>,
    pub pods: BTreeMap<ObjectKey, PodInfo>,
}

/// An object kind the snapshot holds, with how to put it in and take it out.
pub trait SnapshotObject: Sized {
    fn apply(self, snapshot: &mut Snapshot);
    fn delete(key: &ObjectKey, snapshot: &mut Snapshot);
    /// Keys of this kind currently held (to prune after a re-list).
    fn keys(snapshot: &Snapshot) -> Vec<ObjectKey>;
}

macro_rules! snapshot_object {
    ($ty:ty, $field:ident, |$obj:ident| $convert:expr) => {
        impl SnapshotObject for $ty {
            fn apply(self, snapshot: &mut Snapshot) {
                let key = ObjectKey::of(&self);
                let $obj = self;
                match $convert {
                    Some(value) => {
                        snapshot.$field.insert(key, value);
                    }
                    None => {
                        snapshot.$field.remove(&key);
                    }
                }
            }
            fn delete(key: &ObjectKey, snapshot: &mut Snapshot) {
                snapshot.$field.remove(key);
            }
            fn keys(snapshot: &Snapshot) -> Vec<ObjectKey> {
                snapshot.$field.keys().cloned().collect()
            }
        }
    };
}

snapshot_object!(TrafficRoute, routes, |o| Some(o));
snapshot_object!(OutlierPolicy, outlier_policies, |o| Some(o));
snapshot_object!(RetryPolicy, retry_policies, |o| Some(o));
snapshot_object!(Service, services, |o| Some(ServiceInfo::from_service(&o)));
snapshot_object!(EndpointSlice, slices, |o| SliceInfo::from_slice(&o));
snapshot_object!(Pod, pods, |o| Some(PodInfo::from_pod(&o)));
