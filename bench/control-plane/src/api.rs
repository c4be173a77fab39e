//! The watch path (`control-plane-bench --cluster`): the synthetic cluster written to the API
//! server KUBECONFIG names, object by object with server-side apply, as `kubectl apply
//! --server-side` would; the operator reads it through its watchers. A change is the writes a
//! user or a controller would make: a TrafficRoute applied again, an EndpointSlice with one more
//! endpoint, a pod's endpoint taken out of its slice and then the pod deleted (the order of the
//! EndpointSlice controller, which drops a terminating pod's endpoint before the pod is gone).
//!
//! The pods are bound to a node that does not exist (no kubelet runs them; like the e2e tests'
//! played pods) and the Services have no selector, so no controller of the cluster writes to
//! what the benchmark owns. Every namespace it creates carries [`BENCH_LABEL`]; it refuses to
//! touch one that exists without it, and it deletes what it made when it ends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::Value;

use crate::cluster::{self, Edits, Shape, BENCH_LABEL};
use crate::until;

/// The operator's own namespace (its Lease, its CA Secret).
pub const OPERATOR_NAMESPACE: &str = "skein-cpb-system";

/// The node the synthetic pods are bound to: none by that name runs, so nothing starts them.
pub const NODE: &str = "control-plane-bench-played-node";

const FIELD_MANAGER: &str = "control-plane-bench";

/// Writes in flight while the cluster is first written.
const CONCURRENCY: usize = 16;

/// An object's identity among one namespace's documents.
type DocKey = (String, String);

/// The synthetic cluster on an API server.
pub struct ApiFeed {
    client: kube::Client,
    shape: Shape,
    /// Namespace index → what was last applied there, by (kind, name).
    applied: BTreeMap<usize, BTreeMap<DocKey, Value>>,
}

/// The API resource of `kind` (the kinds the benchmark writes or cleans up).
fn resource(kind: &str) -> anyhow::Result<ApiResource> {
    let (group, version, plural) = match kind {
        "Namespace" => ("", "v1", "namespaces"),
        "Service" => ("", "v1", "services"),
        "ServiceAccount" => ("", "v1", "serviceaccounts"),
        "Pod" => ("", "v1", "pods"),
        "Secret" => ("", "v1", "secrets"),
        "ConfigMap" => ("", "v1", "configmaps"),
        "Event" => ("", "v1", "events"),
        "EndpointSlice" => ("discovery.k8s.io", "v1", "endpointslices"),
        "Lease" => ("coordination.k8s.io", "v1", "leases"),
        "TrafficRoute" => ("skein.dev", "v1alpha1", "trafficroutes"),
        other => bail!("the benchmark writes no {other}"),
    };
    Ok(ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural))
}

/// The kinds whose objects a benchmark namespace may hold when it is cleaned up: what the
/// benchmark writes and what the operator writes (certificates, trust bundles, events, its Lease).
const CLEANED: [&str; 9] = [
    "TrafficRoute",
    "EndpointSlice",
    "Pod",
    "Service",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "Event",
    "Lease",
];

fn key_of(doc: &Value) -> DocKey {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&doc["kind"]), text(&doc["metadata"]["name"]))
}

/// The documents of namespace `ns` as this benchmark writes them, by (kind, name).
fn documents(shape: &Shape, ns: usize, edits: &Edits) -> anyhow::Result<BTreeMap<DocKey, Value>> {
    let mut docs = BTreeMap::new();
    for (file, text) in cluster::namespace_files(shape, ns, edits, Some(NODE)) {
        let parsed: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        for doc in parsed.into_iter().filter(|d| !d.is_null()) {
            docs.insert(key_of(&doc), doc);
        }
    }
    Ok(docs)
}

impl ApiFeed {
    /// Connects with KUBECONFIG (or the in-cluster account), installs the CRDs and removes what
    /// an earlier run may have left.
    pub async fn connect(shape: Shape) -> anyhow::Result<Self> {
        let client =
            kube::Client::try_default().await.context("connecting to the API server (KUBECONFIG)")?;
        let feed = Self { client, shape, applied: BTreeMap::new() };
        feed.install_crds().await?;
        feed.clean().await?;
        Ok(feed)
    }

    async fn install_crds(&self) -> anyhow::Result<()> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for (_, crd) in skein_operator::crdgen::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &Patch::Apply(&crd))
                .await
                .with_context(|| format!("applying CRD {name}"))?;
        }
        // Served once Established.
        for (_, crd) in skein_operator::crdgen::crds() {
            let (api, name) = (&api, &crd.metadata.name.clone().unwrap_or_default());
            until(
                &format!("CRD {name} to be Established"),
                Duration::from_secs(30),
                Duration::from_millis(100),
                move || async move {
                    let established = api.get_opt(name).await?.and_then(|c| c.status).is_some_and(|s| {
                        s.conditions.iter().flatten().any(|c| c.type_ == "Established" && c.status == "True")
                    });
                    Ok(established.then_some(()))
                },
            )
            .await?;
        }
        Ok(())
    }

    fn namespaces(&self) -> Vec<String> {
        (0..self.shape.namespaces)
            .map(|ns| self.shape.namespace(ns))
            .chain([OPERATOR_NAMESPACE.to_string()])
            .collect()
    }

    /// Deletes the benchmark's namespaces and everything in them (an API server without a
    /// namespace controller, such as the test API server, keeps a deleted namespace's objects).
    pub async fn clean(&self) -> anyhow::Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for name in self.namespaces() {
            if let Some(ns) = namespaces.get_opt(&name).await? {
                let (key, value) = BENCH_LABEL;
                let ours = ns.metadata.labels.as_ref().and_then(|l| l.get(key)).is_some_and(|v| v == value);
                if !ours {
                    bail!("namespace {name} exists without the label {key}={value}: the benchmark leaves it alone; delete it or use another cluster");
                }
            }
            for kind in CLEANED {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &name, &resource(kind)?);
                match api.delete_collection(&DeleteParams::default(), &ListParams::default()).await {
                    Ok(_) => {}
                    // CRDs not installed yet, or a kind the server does not serve.
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e).with_context(|| format!("deleting the {kind}s of {name}")),
                }
            }
            match namespaces.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting namespace {name}")),
            }
        }
        // A real cluster finalizes a deleted namespace before its name can be used again.
        for name in &self.namespaces() {
            let namespaces = &namespaces;
            until(
                &format!("namespace {name} to be gone"),
                Duration::from_secs(120),
                Duration::from_millis(200),
                move || async move { Ok(namespaces.get_opt(name).await?.is_none().then_some(())) },
            )
            .await?;
        }
        Ok(())
    }

    async fn apply(client: kube::Client, doc: Value) -> anyhow::Result<()> {
        let (kind, name) = key_of(&doc);
        let resource = resource(&kind)?;
        let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client, ns, &resource),
            None => Api::all_with(client, &resource),
        };
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&doc))
            .await
            .with_context(|| format!("applying {kind} {name}"))?;
        Ok(())
    }

    async fn delete(&self, ns: usize, (kind, name): &DocKey) -> anyhow::Result<()> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.shape.namespace(ns), &resource(kind)?);
        api.delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting {kind} {name}"))?;
        Ok(())
    }

    /// Writes the whole cluster (the operator's namespace too): namespaces first, then their
    /// objects, [`CONCURRENCY`] writes at a time.
    pub async fn write_all(&mut self, edits: &Edits) -> anyhow::Result<()> {
        let (key, value) = BENCH_LABEL;
        let own = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": OPERATOR_NAMESPACE, "labels": {key: value}},
        });
        Self::apply(self.client.clone(), own).await?;
        let mut rest = Vec::new();
        for ns in 0..self.shape.namespaces {
            let docs = documents(&self.shape, ns, edits)?;
            for (key, doc) in &docs {
                if key.0 == "Namespace" {
                    Self::apply(self.client.clone(), doc.clone()).await?;
                } else {
                    rest.push(doc.clone());
                }
            }
            self.applied.insert(ns, docs);
        }
        futures::stream::iter(rest.into_iter().map(|doc| Self::apply(self.client.clone(), doc)))
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Brings the namespace of Service `i` to `edits`: the objects that changed are applied,
    /// then those gone are deleted, one write at a time. Returns when the first write started
    /// (the change's start: the documents are made and compared before it).
    pub async fn change(&mut self, i: usize, edits: &Edits) -> anyhow::Result<Option<Instant>> {
        let ns = i / self.shape.services_per_namespace;
        let docs = documents(&self.shape, ns, edits)?;
        let old = self.applied.remove(&ns).unwrap_or_default();
        let applies: Vec<Value> = docs
            .iter()
            .filter(|(key, doc)| old.get(*key) != Some(*doc))
            .map(|(_, doc)| doc.clone())
            .collect();
        let deletes: Vec<DocKey> = old.keys().filter(|k| !docs.contains_key(*k)).cloned().collect();
        self.applied.insert(ns, docs);
        let first = (!applies.is_empty() || !deletes.is_empty()).then(Instant::now);
        for doc in applies {
            Self::apply(self.client.clone(), doc).await?;
        }
        for key in &deletes {
            self.delete(ns, key).await?;
        }
        Ok(first)
    }

    /// The mesh CA the operator keeps in its namespace, once it has written it.
    pub async fn ca(&self, limit: Duration) -> anyhow::Result<skein_operator::CaFiles> {
        let api = &Api::<Secret>::namespaced(self.client.clone(), OPERATOR_NAMESPACE);
        let what =
            format!("the operator to write Secret {OPERATOR_NAMESPACE}/{}", skein_api::constants::CA_SECRET);
        until(&what, limit, Duration::from_millis(200), move || async move {
            let data =
                api.get_opt(skein_api::constants::CA_SECRET).await?.and_then(|s| s.data).unwrap_or_default();
            Ok(skein_operator::CaFiles::read(|k| {
                data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned())
            }))
        })
        .await
    }

    /// Waits until the operator has issued the certificate of Service `i`'s workload.
    pub async fn wait_certificate(&self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let (ns, sa) = self.shape.service(i);
        let api = &Api::<Secret>::namespaced(self.client.clone(), &ns);
        let name = &format!("skein-identity-{sa}");
        let what = format!("the operator to issue Secret {ns}/{name}");
        until(&what, limit, Duration::from_millis(200), move || async move {
            Ok(api.get_opt(name).await?.map(|_| ()))
        })
        .await
    }
}
