//! The file-backed control plane (`skein-operator --local DIR`): the snapshot comes from a
//! directory of ordinary manifests — the TrafficRoute, OutlierPolicy, RetryPolicy and
//! AccessPolicy YAML users apply to a cluster, plus Services, EndpointSlices, Pods, Namespaces
//! and ServiceAccounts — instead of an API server. The
//! computation, the hub and the config stream are the very same as in a cluster.
//!
//! The directory is re-read when any file changes. A set with a bad file is refused whole, with
//! an error naming the file (and, for a spec the computation rejects, the field), and the last
//! good snapshot stays in force.
//!
//! Here too: `schema_check` (the CRDs' OpenAPI schemas applied to a file's spec, as the API
//! server would). Depends on `compute`, `stream` (the hub), `identity` (the CA kept in files)
//! and `crdgen` (the schemas).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde_json::Value;
use skein_api::{AccessPolicy, OutlierPolicy, RetryPolicy, TrafficRoute};
use tokio_util::sync::CancellationToken;

pub mod schema_check;

use crate::compute::compute;
use crate::compute::snapshot::{Snapshot, SnapshotObject};
use crate::metrics::ErrorLabels;
use crate::stream::hub::ConfigHub;

/// Why a set of manifests is refused. Each names the file (and document) it is about; the text
/// is what the operator logs, the variant what it counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{dir}: {message}")]
    ReadDir { dir: String, message: String },
    #[error("{file}: {message}")]
    ReadFile { file: String, message: String },
    #[error("{file}: not YAML: {message}")]
    NotYaml { file: String, message: String },
    /// The CRD's OpenAPI schema refuses the spec, as the API server would.
    #[error("{at}: {kind} {name}: {problem}")]
    Schema { at: String, kind: String, name: String, problem: String },
    /// The document does not decode as its kind.
    #[error("{at}: {message}")]
    Decode { at: String, message: String },
    #[error("{at}: kind {kind:?} is not one the local control plane reads")]
    UnknownKind { at: String, kind: String },
    /// The computation finds the resource invalid (the CEL rules and cross-field checks).
    #[error("{at}: {kind} {resource}: {message}")]
    Invalid { at: String, kind: String, resource: String, message: String },
}

impl Refusal {
    /// The `kind` label of `skein_operator_reconcile_errors_total` for a refused file.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ReadDir { .. } | Self::ReadFile { .. } => "local-read",
            Self::NotYaml { .. } | Self::Decode { .. } => "local-decode",
            Self::Schema { .. } => "local-schema",
            Self::UnknownKind { .. } => "local-kind",
            Self::Invalid { .. } => "local-invalid",
        }
    }
}

/// Manifest files in `dir` (`*.yaml`, `*.yml`, `*.json`), sorted by name.
fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, Refusal> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Refusal::ReadDir { dir: dir.display().to_string(), message: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest in `dir` into a snapshot; every problem is reported, naming its file.
pub fn load_dir(dir: &Path) -> Result<Snapshot, Vec<Refusal>> {
    load_dirs(&[dir.to_path_buf()])
}

/// Reads the manifests of several directories (in order) into one snapshot.
pub fn load_dirs(dirs: &[PathBuf]) -> Result<Snapshot, Vec<Refusal>> {
    let mut files = Vec::new();
    for dir in dirs {
        files.extend(manifest_files(dir).map_err(|e| vec![e])?);
    }
    let mut errors = Vec::new();
    let mut texts = Vec::new();
    for file in &files {
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        match std::fs::read_to_string(file) {
            Ok(text) => texts.push((name, text)),
            Err(e) => errors.push(Refusal::ReadFile { file: name, message: e.to_string() }),
        }
    }
    load_texts(&texts, errors)
}

/// The snapshot of manifests given as (file name, text) pairs, validated as the API server
/// would; `errors` are refusals found already (files that could not be read).
pub fn load_texts(texts: &[(String, String)], mut errors: Vec<Refusal>) -> Result<Snapshot, Vec<Refusal>> {
    let mut snapshot = Snapshot::default();
    let mut order = 0i64;
    // Where each Skein resource came from, to name the file in a computation error.
    let mut origin: BTreeMap<(String, String, String), String> = BTreeMap::new();
    for (name, text) in texts {
        let name = name.clone();
        let docs: Vec<Value> = match serde_saphyr::from_multiple(text) {
            Ok(d) => d,
            Err(e) => {
                errors.push(Refusal::NotYaml { file: name, message: e.to_string() });
                continue;
            }
        };
        for (i, mut doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            order += 1;
            // Defaults a cluster would fill in: namespace, generation, creation order.
            let meta = doc.as_object_mut().and_then(|d| d.get_mut("metadata")).and_then(Value::as_object_mut);
            if let Some(meta) = meta {
                meta.entry("namespace").or_insert_with(|| Value::from("default"));
                meta.entry("generation").or_insert_with(|| Value::from(1));
                if !meta.contains_key("creationTimestamp") {
                    let at = Timestamp::from_second(order).unwrap_or(Timestamp::UNIX_EPOCH);
                    meta.insert(
                        "creationTimestamp".into(),
                        serde_json::to_value(Time(at)).unwrap_or(Value::Null),
                    );
                }
            }
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
            let at = format!("{name} (document {})", i + 1);
            let key = |meta: &ObjectMeta| {
                (
                    kind.clone(),
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                )
            };
            // The CRD schema, as the API server would apply it.
            if let Some(schema) = spec_schema(&kind) {
                let mut problems = Vec::new();
                crate::local::schema_check::check(
                    doc.get("spec").unwrap_or(&Value::Null),
                    schema,
                    "spec",
                    &mut problems,
                );
                if !problems.is_empty() {
                    let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
                    errors.extend(problems.into_iter().map(|problem| Refusal::Schema {
                        at: at.clone(),
                        kind: kind.clone(),
                        name: name.clone(),
                        problem,
                    }));
                    continue;
                }
            }
            let result = match kind.as_str() {
                "TrafficRoute" => add::<TrafficRoute>(doc, &mut snapshot, |o| key(&o.metadata)),
                "OutlierPolicy" => add::<OutlierPolicy>(doc, &mut snapshot, |o| key(&o.metadata)),
                "RetryPolicy" => add::<RetryPolicy>(doc, &mut snapshot, |o| key(&o.metadata)),
                "Service" => add::<Service>(doc, &mut snapshot, |o| key(&o.metadata)),
                "EndpointSlice" => add::<EndpointSlice>(doc, &mut snapshot, |o| key(&o.metadata)),
                "Pod" => add::<Pod>(doc, &mut snapshot, |o| key(&o.metadata)),
                "AccessPolicy" => add::<AccessPolicy>(doc, &mut snapshot, |o| key(&o.metadata)),
                "Namespace" => add::<Namespace>(doc, &mut snapshot, |o| key(&o.metadata)),
                "ServiceAccount" => add::<ServiceAccount>(doc, &mut snapshot, |o| key(&o.metadata)),
                other => {
                    errors.push(Refusal::UnknownKind { at, kind: other.to_string() });
                    continue;
                }
            };
            match result {
                Ok(k) => {
                    origin.insert(k, at);
                }
                Err(message) => errors.push(Refusal::Decode { at, message }),
            }
        }
    }
    // What the schema and the computation refuse in a cluster is refused here too.
    for (resource, status) in &compute(&snapshot).statuses {
        if !status.accepted.status && status.accepted.reason == "Invalid" {
            let k = (
                resource.kind.as_str().to_string(),
                resource.key.namespace.clone(),
                resource.key.name.clone(),
            );
            let at = origin.get(&k).cloned().unwrap_or_default();
            errors.push(Refusal::Invalid {
                at,
                kind: resource.kind.as_str().to_string(),
                resource: resource.key.to_string(),
                message: status.accepted.message.clone(),
            });
        }
    }
    if errors.is_empty() {
        Ok(snapshot)
    } else {
        Err(errors)
    }
}

/// The OpenAPI schema of `spec` of a Skein kind, from the generated CRDs.
fn spec_schema(kind: &str) -> Option<&'static Value> {
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            crate::crdgen::crds()
                .into_iter()
                .filter_map(|(_, crd)| {
                    let schema = serde_json::to_value(
                        crd.spec.versions[0].schema.as_ref()?.open_api_v3_schema.as_ref()?,
                    )
                    .ok()?;
                    Some((crd.spec.names.kind.clone(), schema["properties"]["spec"].clone()))
                })
                .collect()
        })
        .get(kind)
}

fn add<K: DeserializeOwned + SnapshotObject>(
    doc: Value,
    snapshot: &mut Snapshot,
    key: impl Fn(&K) -> (String, String, String),
) -> Result<(String, String, String), String> {
    let obj: K = serde_json::from_value(doc).map_err(|e| e.to_string())?;
    let k = key(&obj);
    obj.apply(snapshot);
    Ok(k)
}

/// A fingerprint of the directories' manifests.
fn fingerprint(dirs: &[PathBuf]) -> Vec<u8> {
    let mut all = Vec::new();
    for f in dirs.iter().flat_map(|d| manifest_files(d).unwrap_or_default()) {
        all.extend(f.to_string_lossy().as_bytes());
        all.extend(std::fs::read(&f).unwrap_or_default());
    }
    all
}

/// Where the local control plane keeps its CA and the workload certificates it issues.
pub struct LocalIdentity {
    pub ca: crate::identity::ca::SharedCa,
    pub state: PathBuf,
    pub trust_domain: String,
    pub lifetime: Duration,
}

/// Publishes the directory's mesh to `hub` now and after every change, and keeps the workload
/// certificates of its meshed workloads current, until `shutdown`.
pub async fn run(
    dirs: Vec<PathBuf>,
    hub: ConfigHub,
    identity: Option<LocalIdentity>,
    default_policy: skein_api::authz::DefaultPolicy,
    shutdown: CancellationToken,
) {
    let mut last = None;
    let mut current = Snapshot::default();
    let mut renew_at = tokio::time::Instant::now();
    loop {
        // Reading and parsing the files run on the blocking pool, off the runtime's threads.
        let (d, previous) = (dirs.clone(), last.take());
        let checked = tokio::task::spawn_blocking(move || {
            let now = fingerprint(&d);
            let loaded = (previous.as_ref() != Some(&now)).then(|| load_dirs(&d));
            (now, loaded)
        })
        .await;
        let loaded = match checked {
            Ok((now, loaded)) => {
                last = Some(now);
                loaded
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the manifests failed");
                None
            }
        };
        if let Some(loaded) = loaded {
            match loaded {
                Ok(mut snapshot) => {
                    snapshot.default_policy = default_policy;
                    hub.publish(Arc::new(compute(&snapshot)));
                    tracing::info!(dirs = ?dirs, "loaded the manifests");
                    current = snapshot;
                    renew_at = tokio::time::Instant::now();
                }
                Err(errors) => {
                    for e in &errors {
                        tracing::error!("{e}");
                        hub.metrics()
                            .reconcile_errors
                            .get_or_create(&ErrorLabels { kind: e.metric_label() })
                            .inc();
                    }
                    tracing::warn!(
                        count = errors.len(),
                        "refusing the changed manifests; the last good state stays"
                    );
                }
            }
        }
        if let Some(id) = identity.as_ref().filter(|_| tokio::time::Instant::now() >= renew_at) {
            match issue_identities(&id.ca.load(), &current, &id.state, &id.trust_domain, id.lifetime) {
                Ok(0) => {}
                Ok(n) => tracing::info!(certificates = n, "issued workload certificates"),
                Err(e) => tracing::warn!(error = %e, "cannot issue workload certificates"),
            }
            renew_at = tokio::time::Instant::now() + Duration::from_secs(30);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Renews the config stream's serving certificate at half its remaining life, until `shutdown`.
pub async fn renew_serving_cert(
    serving: Arc<crate::identity::serving::ServingCert>,
    ca: crate::identity::ca::SharedCa,
    mut not_after: time::OffsetDateTime,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    shutdown: CancellationToken,
) {
    loop {
        let left = (not_after - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let wait = Duration::try_from(left / 2).unwrap_or_default().max(Duration::from_secs(60));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match serving.renew(&ca.load(), &dns, &ips) {
            Ok(until) => {
                not_after = until;
                tracing::info!(%until, "renewed the config stream's serving certificate");
            }
            Err(e) => tracing::warn!(error = %e, "cannot renew the config stream's serving certificate"),
        }
    }
}

/// The CA in files (`<state>/ca/{tls.crt,tls.key,ca.crt}`), created on first use, as the
/// `skein-ca` Secret is in a cluster.
pub fn ensure_ca(state: &Path, trust_domain: &str) -> Result<crate::identity::ca::MeshCa, String> {
    let dir = state.join("ca");
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    if let (Ok(tls_crt), Ok(tls_key)) = (read("tls.crt"), read("tls.key")) {
        let files =
            crate::identity::ca::CaFiles { tls_crt, tls_key, ca_crt: read("ca.crt").unwrap_or_default() };
        return crate::identity::ca::MeshCa::load(&files).map_err(|e| format!("{}: {e}", dir.display()));
    }
    let (ca, files) = crate::identity::ca::MeshCa::generate(trust_domain, time::OffsetDateTime::now_utc())
        .map_err(|e| e.to_string())?;
    write_files(
        &dir,
        &[("tls.crt", &files.tls_crt), ("tls.key", &files.tls_key), ("ca.crt", &files.ca_crt)],
    )?;
    Ok(ca)
}

/// Issues (or renews at half-life) a certificate for every meshed workload of the snapshot, as
/// `<state>/identities/<ns>/<sa>/{tls.crt,tls.key,ca.crt}` — the files a sidecar's
/// `--cert-dir` reads, like the mounted `skein-identity-<sa>` Secret in a cluster.
pub fn issue_identities(
    ca: &crate::identity::ca::MeshCa,
    snapshot: &Snapshot,
    state: &Path,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<usize, String> {
    let now = time::OffsetDateTime::now_utc();
    let mut issued = 0;
    let identities: std::collections::BTreeSet<_> =
        snapshot.pods.iter().filter(|(_, p)| p.meshed).map(|(k, p)| p.identity(&k.namespace)).collect();
    for id in identities {
        let dir = state.join("identities").join(&id.namespace).join(&id.service_account);
        let current = std::fs::read_to_string(dir.join("tls.crt")).unwrap_or_default();
        let bundle_current =
            std::fs::read_to_string(dir.join("ca.crt")).ok().as_deref() == Some(ca.trust_bundle());
        if bundle_current && !crate::identity::ca::needs_renewal(&current, now) {
            continue;
        }
        let cert = ca.sign_workload(&id, trust_domain, lifetime, now).map_err(|e| e.to_string())?;
        write_files(
            &dir,
            &[("tls.key", &cert.key_pem), ("ca.crt", &cert.bundle_pem), ("tls.crt", &cert.chain_pem)],
        )?;
        issued += 1;
    }
    Ok(issued)
}

/// Writes files atomically (temp file, then rename), so a reader never sees half of one.
fn write_files(dir: &Path, files: &[(&str, &str)]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, text) in files {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, dir.join(name)))
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_their_file_and_count_by_kind() {
        let dir = std::env::temp_dir().join(format!("skein-local-refusals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "kind: Deployment\nmetadata: {name: x}\n").unwrap();
        std::fs::write(dir.join("b.yaml"), "{ not yaml").unwrap();
        let refusals = load_dir(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        let labels: Vec<&str> = refusals.iter().map(Refusal::metric_label).collect();
        assert_eq!(labels, ["local-kind", "local-decode"], "{refusals:?}");
        assert!(refusals[0].to_string().starts_with("a.yaml (document 1): kind \"Deployment\""));
        assert!(refusals[1].to_string().starts_with("b.yaml: not YAML"));
    }
}
