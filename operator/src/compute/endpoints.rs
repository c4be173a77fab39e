//! Endpoints from EndpointSlices and pods: each Service's ready endpoints with their labels and
//! identities, and each meshed workload's inbound ports.

use std::collections::{BTreeMap, BTreeSet};

use skein_api::config::{Endpoint, InboundPort};
use skein_api::WorkloadIdentity;

use super::protocol_of;
use super::snapshot::{ObjectKey, Snapshot};

/// Labels of the ready endpoints of a Service (an endpoint without a known pod has none).
pub(super) fn ready_endpoint_labels<'a>(
    snapshot: &'a Snapshot,
    service: &ObjectKey,
) -> Vec<&'a BTreeMap<String, String>> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    snapshot
        .slices
        .iter()
        .filter(|(k, s)| k.namespace == service.namespace && s.service == service.name)
        .flat_map(|(k, s)| s.endpoints.iter().map(move |e| (k, e)))
        .filter(|(_, e)| e.ready && seen.insert(e.address.clone()))
        .map(|(k, e)| {
            e.pod
                .as_ref()
                .and_then(|p| snapshot.pods.get(&ObjectKey::new(k.namespace.clone(), p.clone())))
                .map(|p| &p.labels)
                .unwrap_or(&EMPTY)
        })
        .collect()
}

pub(super) fn endpoints_by_service(snapshot: &Snapshot) -> BTreeMap<ObjectKey, Vec<Endpoint>> {
    let mut by_service: BTreeMap<ObjectKey, BTreeMap<String, Endpoint>> = BTreeMap::new();
    for (key, slice) in &snapshot.slices {
        let service = ObjectKey::new(key.namespace.clone(), slice.service.clone());
        let endpoints = by_service.entry(service).or_default();
        for e in slice.endpoints.iter().filter(|e| e.ready) {
            let pod = e.pod.as_ref().and_then(|p| snapshot.pod(&key.namespace, p));
            let entry = endpoints.entry(e.address.clone()).or_insert_with(|| Endpoint {
                address: e.address.clone(),
                ports: BTreeMap::new(),
                labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                identity: pod.filter(|p| p.meshed).map(|p| p.identity(&key.namespace)),
            });
            entry.ports.extend(slice.ports.iter().map(|(k, v)| (k.clone(), *v)));
        }
    }
    by_service.into_iter().map(|(k, eps)| (k, eps.into_values().collect())).collect()
}

pub(super) fn inbound_ports(snapshot: &Snapshot) -> BTreeMap<WorkloadIdentity, Vec<InboundPort>> {
    let mut inbound: BTreeMap<WorkloadIdentity, BTreeSet<InboundPort>> = BTreeMap::new();
    for (key, pod) in snapshot.pods.iter().filter(|(_, p)| p.meshed) {
        inbound.entry(pod.identity(&key.namespace)).or_default();
    }
    for (key, slice) in &snapshot.slices {
        for e in &slice.endpoints {
            let Some(pod) = e.pod.as_ref().and_then(|p| snapshot.pod(&key.namespace, p)) else {
                continue;
            };
            if !pod.meshed {
                continue;
            }
            let ports = inbound.entry(pod.identity(&key.namespace)).or_default();
            for (name, port) in &slice.ports {
                ports.insert(InboundPort { port: *port, protocol: protocol_of(Some(name), None) });
            }
        }
    }
    inbound.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
}
