//! Endpoints from EndpointSlices and pods: each Service's ready endpoints with their labels and
//! identities, and each meshed workload's inbound ports.

use std::collections::{BTreeMap, BTreeSet};

use skein_api::config::{Endpoint, InboundPort};
use skein_api::WorkloadIdentity;

use super::protocol_of;
use super::snapshot::{KeyRef, ObjectKey, PodInfo, SliceInfo, Snapshot};

/// Labels of the ready endpoints of a Service (an endpoint without a known pod has none).
pub(super) fn ready_endpoint_labels<'a>(
    snapshot: &'a Snapshot,
    service: &ObjectKey,
) -> Vec<&'a BTreeMap<String, String>> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    in_namespace(&snapshot.slices, &service.namespace)
        .filter(|(_, s)| s.service == service.name)
        .flat_map(|(k, s)| s.endpoints.iter().map(move |e| (k, e)))
        .filter(|(_, e)| e.ready && seen.insert(e.address.clone()))
        .map(|(k, e)| {
            e.pod.as_ref().and_then(|p| snapshot.pod(&k.namespace, p)).map(|p| &p.labels).unwrap_or(&EMPTY)
        })
        .collect()
}

pub(super) fn endpoints_by_service(snapshot: &Snapshot) -> BTreeMap<ObjectKey, Vec<Endpoint>> {
    // Slices are sorted by namespace, so one Service's slices are found by (namespace, Service)
    // without building a key per endpoint.
    let mut by_service: BTreeMap<(&str, &str), Vec<Endpoint>> = BTreeMap::new();
    for (key, slice) in &snapshot.slices {
        let endpoints = by_service.entry((key.namespace.as_str(), slice.service.as_str())).or_default();
        push_ready(snapshot, key, slice, endpoints);
    }
    by_service.into_iter().map(|((ns, name), eps)| (ObjectKey::new(ns, name), merged(eps))).collect()
}

/// The objects of namespace `ns` in a map keyed by [`ObjectKey`] (sorted by namespace first).
fn in_namespace<'a, V>(
    map: &'a BTreeMap<ObjectKey, V>,
    ns: &'a str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a V)> {
    use std::ops::Bound;
    let from = (ns, "");
    map.range::<dyn KeyRef, _>((Bound::Included(&from as &dyn KeyRef), Bound::Unbounded))
        .take_while(move |(k, _)| k.namespace == ns)
}

/// The endpoints of one Service, as [`endpoints_by_service`] finds them: its namespace's slices
/// are looked at, not every slice.
pub(super) fn endpoints_of(snapshot: &Snapshot, service: &ObjectKey) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    for (key, slice) in
        in_namespace(&snapshot.slices, &service.namespace).filter(|(_, s)| s.service == service.name)
    {
        push_ready(snapshot, key, slice, &mut endpoints);
    }
    merged(endpoints)
}

/// Adds the ready endpoints of `slice` (held under `key`).
fn push_ready(snapshot: &Snapshot, key: &ObjectKey, slice: &SliceInfo, endpoints: &mut Vec<Endpoint>) {
    for e in slice.endpoints.iter().filter(|e| e.ready) {
        let pod = e.pod.as_ref().and_then(|p| snapshot.pod(&key.namespace, p));
        endpoints.push(Endpoint {
            address: e.address.clone(),
            ports: slice.ports.clone(),
            labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
            identity: pod.filter(|p| p.meshed).map(|p| p.identity(&key.namespace)),
        });
    }
}

/// Sorted by address; an address in two slices of a Service is one endpoint with the ports of
/// both, described by the first slice (by name).
fn merged(mut endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    endpoints.dedup_by(|later, first| {
        let same = later.address == first.address;
        if same {
            first.ports.extend(std::mem::take(&mut later.ports));
        }
        same
    });
    endpoints
}

/// Each meshed identity's inbound ports: the ports of the slices its pods are endpoints in.
pub(super) fn inbound_ports(snapshot: &Snapshot) -> BTreeMap<WorkloadIdentity, Vec<InboundPort>> {
    inbound_ports_of(snapshot, snapshot.pods.iter(), snapshot.slices.iter())
}

/// [`inbound_ports`], computed again only in `namespaces` (those with a changed pod or slice:
/// an identity's ports come from its own namespace alone); the others' are `previous`'s.
pub(super) fn inbound_ports_since(
    snapshot: &Snapshot,
    previous: &BTreeMap<WorkloadIdentity, Vec<InboundPort>>,
    namespaces: &BTreeSet<&str>,
) -> BTreeMap<WorkloadIdentity, Vec<InboundPort>> {
    let mut inbound: BTreeMap<WorkloadIdentity, Vec<InboundPort>> = previous
        .iter()
        .filter(|(id, _)| !namespaces.contains(id.namespace.as_str()))
        .map(|(id, ports)| (id.clone(), ports.clone()))
        .collect();
    for ns in namespaces {
        inbound.extend(inbound_ports_of(
            snapshot,
            in_namespace(&snapshot.pods, ns),
            in_namespace(&snapshot.slices, ns),
        ));
    }
    inbound
}

fn inbound_ports_of<'a>(
    snapshot: &'a Snapshot,
    pods: impl Iterator<Item = (&'a ObjectKey, &'a PodInfo)>,
    slices: impl Iterator<Item = (&'a ObjectKey, &'a SliceInfo)>,
) -> BTreeMap<WorkloadIdentity, Vec<InboundPort>> {
    // Keyed by borrowed (namespace, service account): identities are built once each, at the end.
    let mut inbound: BTreeMap<(&str, &str), BTreeSet<InboundPort>> = BTreeMap::new();
    for (key, pod) in pods.filter(|(_, p)| p.meshed) {
        inbound.entry((key.namespace.as_str(), pod.service_account.as_str())).or_default();
    }
    for (key, slice) in slices {
        for e in &slice.endpoints {
            let Some(pod) = e.pod.as_ref().and_then(|p| snapshot.pod(&key.namespace, p)) else {
                continue;
            };
            if !pod.meshed {
                continue;
            }
            let ports = inbound.entry((key.namespace.as_str(), pod.service_account.as_str())).or_default();
            for (name, port) in &slice.ports {
                ports.insert(InboundPort { port: *port, protocol: protocol_of(Some(name), None) });
            }
        }
    }
    inbound
        .into_iter()
        .map(|((ns, sa), v)| (WorkloadIdentity::new(ns, sa), v.into_iter().collect()))
        .collect()
}
