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
            e.pod.as_ref().and_then(|p| snapshot.pod(&k.namespace, p)).map(|p| &p.labels).unwrap_or(&EMPTY)
        })
        .collect()
}

pub(super) fn endpoints_by_service(snapshot: &Snapshot) -> BTreeMap<ObjectKey, Vec<Endpoint>> {
    // Slices are sorted by namespace, so one Service's slices are found by (namespace, Service)
    // without building a key per endpoint; an address in two slices of a Service is one
    // endpoint with the ports of both.
    let mut by_service: BTreeMap<(&str, &str), Vec<Endpoint>> = BTreeMap::new();
    for (key, slice) in &snapshot.slices {
        let endpoints = by_service.entry((key.namespace.as_str(), slice.service.as_str())).or_default();
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
    by_service
        .into_iter()
        .map(|((ns, name), mut eps)| {
            // Stable: of two slices naming an address, the first (by slice name) describes it.
            eps.sort_by(|a, b| a.address.cmp(&b.address));
            eps.dedup_by(|later, first| {
                let same = later.address == first.address;
                if same {
                    first.ports.extend(std::mem::take(&mut later.ports));
                }
                same
            });
            (ObjectKey::new(ns, name), eps)
        })
        .collect()
}

pub(super) fn inbound_ports(snapshot: &Snapshot) -> BTreeMap<WorkloadIdentity, Vec<InboundPort>> {
    // Keyed by borrowed (namespace, service account): identities are built once each, at the end.
    let mut inbound: BTreeMap<(&str, &str), BTreeSet<InboundPort>> = BTreeMap::new();
    for (key, pod) in snapshot.pods.iter().filter(|(_, p)| p.meshed) {
        inbound.entry((key.namespace.as_str(), pod.service_account.as_str())).or_default();
    }
    for (key, slice) in &snapshot.slices {
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
