//! The file-backed control plane (`skein-operator --local DIR`): the snapshot comes from a
//! directory of ordinary manifests — the TrafficRoute, OutlierPolicy, RetryPolicy and
//! AccessPolicy YAML users apply to a cluster, plus Services, EndpointSlices, Pods, Namespaces
//! and ServiceAccounts — instead of an API server. The
//! computation, the hub and the config stream are the very same as in a cluster.
//!
//! The directory is looked at every 20 ms; only files whose size or modification time changed
//! are read, and of those only the documents whose text changed are parsed again (`pieces`: a
//! file is cut at its `---` lines; a custom resource that moves in its file is parsed again, as
//! its place is its creation order). An object defined in two files
//! is refused. A set with a bad file is refused whole, with
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

mod pieces;
pub mod schema_check;

use pieces::{ObjectId, Piece, Planned};

/// How often the directories are looked at: a look reads only the metadata of files that did
/// not change, so it is cheap, and a change reaches the proxies within this plus the
/// computation.
const POLL: Duration = Duration::from_millis(20);

use crate::compute::snapshot::{ObjectKey, Snapshot, SnapshotObject};
use crate::compute::{compute, compute_incremental};
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
    /// The same object in two places.
    #[error("{at}: {kind} {name} is defined already, in {first}")]
    Duplicate { at: String, kind: String, name: String, first: String },
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
            Self::Duplicate { .. } => "local-duplicate",
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
    let mut loader = Loader::default();
    match loader.load(dirs) {
        Some(Err(refusals)) => Err(refusals),
        _ => Ok(loader.snapshot),
    }
}

/// The snapshot of manifests given as (file name, text) pairs, validated as the API server
/// would; `errors` are refusals found already (files that could not be read).
pub fn load_texts(texts: &[(String, String)], errors: Vec<Refusal>) -> Result<Snapshot, Vec<Refusal>> {
    let texts = texts.iter().map(|(name, text)| (name.clone(), name.clone(), None, text.clone())).collect();
    let mut loader = Loader::default();
    match loader.apply_texts(texts, Vec::new(), errors) {
        Some(Err(refusals)) => Err(refusals),
        _ => Ok(loader.snapshot),
    }
}

/// A snapshot kept up to date file by file: a file whose size and modification time are
/// unchanged is not read again, one whose text is unchanged is not parsed again, and a changed
/// file's objects replace the ones it held, in place (a refused set is undone by parsing the
/// texts it displaced again, so the common case copies nothing). An object defined in two files
/// is refused (which one would win is not obvious to whoever edits them).
#[derive(Default)]
pub struct Loader {
    snapshot: Snapshot,
    files: BTreeMap<String, FileState>,
    /// Which file (key, and where in it) defines each object.
    owners: BTreeMap<ObjectId, (String, String)>,
    /// The texts of a set that was refused, so it is not refused again at every look.
    refused: Option<BTreeMap<String, [u8; 32]>>,
    /// The mesh last put in force: the next computation reuses what did not change.
    last: Option<Arc<crate::compute::MeshConfig>>,
}

/// What the loader knows of one file.
struct FileState {
    name: String,
    stamp: Option<(u64, std::time::SystemTime)>,
    digest: [u8; 32],
    /// Its text and where its documents stand in creation order, to parse it again when a
    /// refused set is undone.
    text: String,
    order_base: i64,
    /// Its documents, as pieces of text (`pieces::split`), and what each defines.
    pieces: Vec<Piece>,
}

impl FileState {
    fn objects(&self) -> impl Iterator<Item = &ObjectId> {
        self.pieces.iter().flat_map(|p| p.objects.iter().map(|(o, _)| o))
    }
}

/// Where a document is, for messages: `file (document N)`.
fn at(name: &str, doc: usize) -> String {
    format!("{name} (document {})", doc + 1)
}

/// A file read: (key, name, size and modification time, text).
type Read = (String, String, Option<(u64, std::time::SystemTime)>, String);

impl Loader {
    /// A loader whose snapshots carry the mesh's default access policy.
    pub fn with_default_policy(default_policy: skein_api::authz::DefaultPolicy) -> Self {
        let mut loader = Self::default();
        loader.snapshot.default_policy = default_policy;
        loader
    }

    /// Looks at the directories again: `None` when nothing changed since the last look (or the
    /// set is the one refused last time), else the mesh computed from the new snapshot, or every
    /// refusal (the last good snapshot then stays).
    #[allow(clippy::type_complexity)]
    pub fn load(
        &mut self,
        dirs: &[PathBuf],
    ) -> Option<Result<Arc<crate::compute::MeshConfig>, Vec<Refusal>>> {
        let mut paths = Vec::new();
        for dir in dirs {
            match manifest_files(dir) {
                Ok(p) => paths.extend(p),
                Err(e) => return Some(Err(vec![e])),
            }
        }
        let mut errors = Vec::new();
        let mut read = Vec::new();
        let mut unchanged = Vec::new();
        for path in &paths {
            let key = path.display().to_string();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
            let stamp = std::fs::metadata(path).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
            if stamp.is_some() && self.files.get(&key).is_some_and(|f| f.stamp == stamp) {
                unchanged.push(key);
                continue;
            }
            match std::fs::read_to_string(path) {
                Ok(text) => read.push((key, name, stamp, text)),
                Err(e) => errors.push(Refusal::ReadFile { file: name, message: e.to_string() }),
            }
        }
        self.apply_texts(read, unchanged, errors)
    }

    /// Puts `read` (changed or new files) in force beside `unchanged` (keys of files known and
    /// not read again); any other file known before is gone.
    #[allow(clippy::type_complexity)]
    fn apply_texts(
        &mut self,
        read: Vec<Read>,
        unchanged: Vec<String>,
        mut errors: Vec<Refusal>,
    ) -> Option<Result<Arc<crate::compute::MeshConfig>, Vec<Refusal>>> {
        use sha2::{Digest, Sha256};
        let digests: BTreeMap<String, [u8; 32]> = unchanged
            .iter()
            .filter_map(|k| Some((k.clone(), self.files.get(k)?.digest)))
            .chain(read.iter().map(|(k, _, _, text)| (k.clone(), Sha256::digest(text.as_bytes()).into())))
            .collect();
        let same_files = digests.len() == self.files.len()
            && digests.iter().all(|(k, d)| self.files.get(k).is_some_and(|f| f.digest == *d));
        if errors.is_empty() && (same_files || self.refused.as_ref() == Some(&digests)) {
            // Only stamps moved (a file written with the same text): remember them.
            for (key, _, stamp, _) in &read {
                if let Some(f) = self.files.get_mut(key) {
                    f.stamp = *stamp;
                }
            }
            return None;
        }
        let started = std::time::Instant::now();
        let changed: Vec<Read> = read
            .into_iter()
            .filter(|(k, _, _, _)| self.files.get(k).is_none_or(|f| Some(&f.digest) != digests.get(k)))
            .collect();
        // What is gone or about to be replaced is taken out of the files (kept, to undo).
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|k| !digests.contains_key(*k) || changed.iter().any(|(c, _, _, _)| c == *k))
            .cloned()
            .collect();
        let mut displaced = Vec::new();
        for key in gone {
            if let Some(state) = self.files.remove(&key) {
                displaced.push((key, state));
            }
        }
        let held_by = |key: &str| -> &[Piece] {
            displaced.iter().find(|(k, _)| *k == key).map_or(&[], |(_, s): &(String, FileState)| &s.pieces)
        };
        // A changed file's new text against what it held: the pieces whose text is unchanged stay.
        let mut plans = Vec::new();
        for (key, name, stamp, text) in changed {
            let planned = pieces::plan(&text, held_by(&key));
            plans.push((key, name, stamp, text, planned));
        }
        // What does not stay leaves the snapshot before anything is added (an object may move
        // from one file to another).
        for (key, state) in &displaced {
            let kept: std::collections::BTreeSet<usize> = plans
                .iter()
                .filter(|(k, ..)| k == key)
                .flat_map(|(.., planned)| planned.iter())
                .filter_map(|p| match p {
                    Planned::Kept(i) => Some(*i),
                    Planned::New { .. } => None,
                })
                .collect();
            let leaving = state.pieces.iter().enumerate().filter(|(i, _)| !kept.contains(i));
            for (object, _) in leaving.flat_map(|(_, p)| p.objects.iter()) {
                delete(&object.0, &ObjectKey::new(object.1.clone(), object.2.clone()), &mut self.snapshot);
                self.owners.remove(object);
            }
        }
        // Files whose object a new file redefined: parsed again if the set is undone.
        let mut overwritten = std::collections::BTreeSet::new();
        let mut added = Vec::new();
        for (key, name, stamp, text, planned) in plans {
            // Creation order: by the file's place among all files, then the document's.
            let order_base = digests.keys().position(|k| *k == key).unwrap_or(0) as i64 * 100_000;
            let pieces = self.put(
                &key,
                &name,
                &text,
                planned,
                held_by(&key),
                order_base,
                &mut errors,
                Some(&mut overwritten),
            );
            let digest = digests.get(&key).copied().unwrap_or_default();
            self.files.insert(key.clone(), FileState { name, stamp, digest, text, order_base, pieces });
            added.push(key);
        }
        let parsed = started.elapsed();
        // What the schema and the computation refuse in a cluster is refused here too.
        let changes = self.snapshot.take_changes();
        let mesh = match &self.last {
            Some(last) => compute_incremental(&self.snapshot, last, &changes),
            None => compute(&self.snapshot),
        };
        tracing::debug!(parse = ?parsed, compute = ?(started.elapsed() - parsed), "computed the mesh");
        for (resource, status) in &mesh.statuses {
            if !status.accepted.status && status.accepted.reason == "Invalid" {
                let k = (
                    resource.kind.as_str().to_string(),
                    resource.key.namespace.clone(),
                    resource.key.name.clone(),
                );
                errors.push(Refusal::Invalid {
                    at: self.owners.get(&k).map(|(_, at)| at.clone()).unwrap_or_default(),
                    kind: resource.kind.as_str().to_string(),
                    resource: resource.key.to_string(),
                    message: status.accepted.message.clone(),
                });
            }
        }
        if !errors.is_empty() {
            self.undo(added, displaced, overwritten);
            // Back as `last` was computed, but recorded as changed: the undone changes too.
            self.snapshot.changes.merge(changes);
            self.refused = Some(digests);
            return Some(Err(errors));
        }
        self.refused = None;
        let mesh = Arc::new(mesh);
        self.last = Some(mesh.clone());
        Some(Ok(mesh))
    }

    /// Takes a refused set out again: the files it added leave, the ones it displaced come
    /// back, and files whose objects it redefined are parsed again (their texts were good).
    fn undo(
        &mut self,
        added: Vec<String>,
        displaced: Vec<(String, FileState)>,
        overwritten: std::collections::BTreeSet<String>,
    ) {
        for key in added {
            if let Some(state) = self.files.remove(&key) {
                for object in state.objects() {
                    delete(
                        &object.0,
                        &ObjectKey::new(object.1.clone(), object.2.clone()),
                        &mut self.snapshot,
                    );
                    if self.owners.get(object).is_some_and(|(file, _)| *file == key) {
                        self.owners.remove(object);
                    }
                }
            }
        }
        for (key, state) in displaced {
            self.files.insert(key, state);
        }
        let again: Vec<String> =
            self.files.keys().filter(|k| overwritten.contains(*k) || !self.owns_all(k)).cloned().collect();
        for key in again {
            let Some(state) = self.files.get(&key) else { continue };
            let (name, text, order_base) = (state.name.clone(), state.text.clone(), state.order_base);
            let planned = pieces::plan(&text, &[]);
            let mut ignored = Vec::new();
            let pieces = self.put(&key, &name, &text, planned, &[], order_base, &mut ignored, None);
            if let Some(state) = self.files.get_mut(&key) {
                state.pieces = pieces;
            }
        }
    }

    /// Whether every object of file `key` is owned by it (a displaced file coming back is not).
    fn owns_all(&self, key: &str) -> bool {
        self.files[key].objects().all(|o| self.owners.get(o).is_some_and(|(f, _)| f == key))
    }

    /// Puts file `key`'s planned pieces in the snapshot: a kept piece stays as it is (its
    /// objects renumbered where it moved), a new one is parsed and added document by document;
    /// returns the file's pieces (up to one that is not YAML, which refuses the file). With
    /// `overwritten`, an object another file defines already is refused and that file noted;
    /// without (an undo), the file takes it.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        key: &str,
        name: &str,
        text: &str,
        planned: Vec<Planned>,
        held: &[Piece],
        order_base: i64,
        errors: &mut Vec<Refusal>,
        mut overwritten: Option<&mut std::collections::BTreeSet<String>>,
    ) -> Vec<Piece> {
        let mut next_doc = 0;
        let mut pieces = Vec::with_capacity(planned.len());
        for planned in planned {
            match planned {
                Planned::Kept(i) => {
                    let mut piece = held[i].clone();
                    if piece.first_doc != next_doc {
                        for (object, doc) in &mut piece.objects {
                            *doc = *doc - piece.first_doc + next_doc;
                            self.owners.insert(object.clone(), (key.to_string(), at(name, *doc)));
                        }
                        piece.first_doc = next_doc;
                    }
                    next_doc += piece.docs;
                    pieces.push(piece);
                }
                Planned::New { digest, range } => {
                    let docs = match pieces::parse(text, range) {
                        Ok(docs) => docs,
                        Err(message) => {
                            errors.push(Refusal::NotYaml { file: name.to_string(), message });
                            break;
                        }
                    };
                    let (first_doc, count) = (next_doc, docs.len());
                    let mut objects = Vec::new();
                    for doc in docs {
                        let i = next_doc;
                        next_doc += 1;
                        let Some(object) = add_doc(name, i, doc, order_base, &mut self.snapshot, errors)
                        else {
                            continue;
                        };
                        match (self.owners.get(&object), overwritten.as_deref_mut()) {
                            (Some((file, first)), Some(overwritten)) => {
                                errors.push(Refusal::Duplicate {
                                    at: at(name, i),
                                    kind: object.0.clone(),
                                    name: format!("{}/{}", object.1, object.2),
                                    first: first.clone(),
                                });
                                overwritten.insert(file.clone());
                            }
                            _ => {
                                self.owners.insert(object.clone(), (key.to_string(), at(name, i)));
                            }
                        }
                        objects.push((object, i));
                    }
                    pieces.push(Piece { digest, first_doc, docs: count, objects });
                }
            }
        }
        pieces
    }
}

/// Removes the object of `kind` held under `key`.
fn delete(kind: &str, key: &ObjectKey, snapshot: &mut Snapshot) {
    let _held = match kind {
        "TrafficRoute" => TrafficRoute::delete(key, snapshot),
        "OutlierPolicy" => OutlierPolicy::delete(key, snapshot),
        "RetryPolicy" => RetryPolicy::delete(key, snapshot),
        "Service" => Service::delete(key, snapshot),
        "EndpointSlice" => EndpointSlice::delete(key, snapshot),
        "Pod" => Pod::delete(key, snapshot),
        "AccessPolicy" => AccessPolicy::delete(key, snapshot),
        "Namespace" => Namespace::delete(key, snapshot),
        "ServiceAccount" => ServiceAccount::delete(key, snapshot),
        _ => false,
    };
}

/// Adds document `i` of file `name` to `snapshot`, validated as the API server would (the
/// computation's checks come after, over the whole set); returns the object it defines.
fn add_doc(
    name: &str,
    i: usize,
    mut doc: Value,
    order_base: i64,
    snapshot: &mut Snapshot,
    errors: &mut Vec<Refusal>,
) -> Option<ObjectId> {
    if doc.is_null() {
        return None;
    }
    let order = order_base + i as i64 + 1;
    // Defaults a cluster would fill in: namespace, generation, creation order.
    let meta = doc.as_object_mut().and_then(|d| d.get_mut("metadata")).and_then(Value::as_object_mut);
    if let Some(meta) = meta {
        meta.entry("namespace").or_insert_with(|| Value::from("default"));
        meta.entry("generation").or_insert_with(|| Value::from(1));
        if !meta.contains_key("creationTimestamp") {
            let at = Timestamp::from_second(order).unwrap_or(Timestamp::UNIX_EPOCH);
            meta.insert("creationTimestamp".into(), serde_json::to_value(Time(at)).unwrap_or(Value::Null));
        }
    }
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let at = at(name, i);
    let key = |meta: &ObjectMeta| {
        (kind.clone(), meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
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
            return None;
        }
    }
    let result = match kind.as_str() {
        "TrafficRoute" => add::<TrafficRoute>(doc, snapshot, |o| key(&o.metadata)),
        "OutlierPolicy" => add::<OutlierPolicy>(doc, snapshot, |o| key(&o.metadata)),
        "RetryPolicy" => add::<RetryPolicy>(doc, snapshot, |o| key(&o.metadata)),
        "Service" => add::<Service>(doc, snapshot, |o| key(&o.metadata)),
        "EndpointSlice" => add::<EndpointSlice>(doc, snapshot, |o| key(&o.metadata)),
        "Pod" => add::<Pod>(doc, snapshot, |o| key(&o.metadata)),
        "AccessPolicy" => add::<AccessPolicy>(doc, snapshot, |o| key(&o.metadata)),
        "Namespace" => add::<Namespace>(doc, snapshot, |o| key(&o.metadata)),
        "ServiceAccount" => add::<ServiceAccount>(doc, snapshot, |o| key(&o.metadata)),
        other => {
            errors.push(Refusal::UnknownKind { at, kind: other.to_string() });
            return None;
        }
    };
    match result {
        Ok(k) => Some(k),
        Err(message) => {
            errors.push(Refusal::Decode { at, message });
            None
        }
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
    let mut loader = Some(Loader::with_default_policy(default_policy));
    let mut renew_at = tokio::time::Instant::now();
    // The meshed identities of the snapshot in force, and those certificates were last looked
    // at for: a change that keeps them (most) costs no look at the certificates; the look runs
    // every 30 s besides, for renewals.
    let mut identities = std::collections::BTreeSet::new();
    let mut issued_for = std::collections::BTreeSet::new();
    loop {
        // Reading and parsing the files run on the blocking pool, off the runtime's threads.
        let (d, mut l) =
            (dirs.clone(), loader.take().unwrap_or_else(|| Loader::with_default_policy(default_policy)));
        let checked = tokio::task::spawn_blocking(move || {
            let loaded = l.load(&d);
            // Only a snapshot put in force can change them (most looks find nothing new).
            let identities = matches!(loaded, Some(Ok(_))).then(|| meshed_identities(&l.snapshot));
            (l, loaded, identities)
        })
        .await;
        let loaded = match checked {
            Ok((l, loaded, now_meshed)) => {
                loader = Some(l);
                if let Some(now_meshed) = now_meshed {
                    identities = now_meshed;
                }
                loaded
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the manifests failed");
                None
            }
        };
        if let Some(loaded) = loaded {
            match loaded {
                Ok(mesh) => {
                    hub.publish(mesh);
                    hub.metrics().reconciles.inc();
                    tracing::info!(dirs = ?dirs, "loaded the manifests");
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
        let due = tokio::time::Instant::now() >= renew_at || identities != issued_for;
        if let Some(id) = identity.as_ref().filter(|_| due) {
            let (ca, state, domain, lifetime) =
                (id.ca.load_full(), id.state.clone(), id.trust_domain.clone(), id.lifetime);
            let wanted = identities.clone();
            let issued = tokio::task::spawn_blocking(move || {
                issue_identities(&ca, &wanted, &state, &domain, lifetime)
            })
            .await;
            match issued {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(certificates = n, "issued workload certificates"),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot issue workload certificates"),
                Err(e) => tracing::warn!(error = %e, "issuing workload certificates failed"),
            }
            issued_for = identities.clone();
            renew_at = tokio::time::Instant::now() + Duration::from_secs(30);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The identities of the snapshot's meshed pods.
fn meshed_identities(snapshot: &Snapshot) -> std::collections::BTreeSet<skein_api::WorkloadIdentity> {
    snapshot.pods.iter().filter(|(_, p)| p.meshed).map(|(k, p)| p.identity(&k.namespace)).collect()
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
    if let Some(files) =
        crate::identity::ca::CaFiles::read(|name| std::fs::read_to_string(dir.join(name)).ok())
    {
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
    identities: &std::collections::BTreeSet<skein_api::WorkloadIdentity>,
    state: &Path,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<usize, String> {
    let now = time::OffsetDateTime::now_utc();
    let mut issued = 0;
    for id in identities {
        let dir = state.join("identities").join(&id.namespace).join(&id.service_account);
        let current = std::fs::read_to_string(dir.join("tls.crt")).unwrap_or_default();
        let bundle_current =
            std::fs::read_to_string(dir.join("ca.crt")).ok().as_deref() == Some(ca.trust_bundle());
        if bundle_current && !crate::identity::ca::needs_renewal(&current, now) {
            continue;
        }
        let cert = ca.sign_workload(id, trust_domain, lifetime, now).map_err(|e| e.to_string())?;
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

    /// A file edited document by document (the unchanged documents kept, not parsed again)
    /// holds what the same file read afresh holds: the objects, the routes' creation order (a
    /// route that moves takes its new place), and the places refusals name.
    #[test]
    fn an_edited_file_holds_what_the_same_file_read_afresh_holds() {
        let dir = std::env::temp_dir().join(format!("skein-local-pieces-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dirs = [dir.clone()];
        let svc = "kind: Service\napiVersion: v1\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{name: http, port: 9080}], selector: {app: reviews}}\n";
        // Two routes for one host: the older one is in force, so creation order matters.
        let route = |name: &str, weight: u32| {
            format!("---\napiVersion: skein.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  host: reviews\n  port: 9080\n  subsets: [{{name: v1, labels: {{version: v1}}}}]\n  rules:\n    - backends: [{{subset: v1, weight: {weight}}}]\n")
        };
        let pod = |name: &str, version: &str| {
            format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: reviews, version: {version}}}}}\nspec: {{serviceAccountName: reviews, containers: [{{name: app, image: x}}]}}\n")
        };
        let write = |text: &str| {
            let tmp = dir.join(".a.yaml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(tmp, dir.join("a.yaml")).unwrap();
        };
        let held = |s: &Snapshot| format!("{:?}", Snapshot { changes: Default::default(), ..s.clone() });
        let fresh = || {
            let mut loader = Loader::default();
            loader.load(&dirs).unwrap().unwrap();
            (held(&loader.snapshot), loader.owners)
        };
        let edits = [
            [
                svc.to_string(),
                route("first", 100),
                pod("p1", "v1"),
                pod("p2", "v1"),
                route("second", 100),
                pod("p3", "v1"),
            ]
            .concat(),
            // A pod deleted: the pods after it and the second route move.
            [svc.to_string(), route("first", 100), pod("p2", "v1"), route("second", 100), pod("p3", "v1")]
                .concat(),
            // The routes swap places, so the other one is older.
            [svc.to_string(), route("second", 100), pod("p2", "v1"), route("first", 100), pod("p3", "v1")]
                .concat(),
            // A pod edited, one added, a document emptied.
            [
                svc.to_string(),
                route("second", 100),
                pod("p2", "v2"),
                "---\n".into(),
                route("first", 100),
                pod("p3", "v1"),
                pod("p4", "v1"),
            ]
            .concat(),
        ];
        let mut loader = Loader::default();
        for text in &edits {
            write(text);
            let mesh = loader.load(&dirs).unwrap().unwrap();
            assert_eq!(mesh.destinations, compute(&loader.snapshot).destinations);
            let (snapshot, owners) = fresh();
            assert_eq!(held(&loader.snapshot), snapshot, "{text}");
            assert_eq!(loader.owners, owners, "{text}");
        }
        // An object twice in the file: refused, naming both places; the set before stays.
        let before = held(&loader.snapshot);
        write(&format!("{}{}", edits[3], pod("p3", "v1")));
        let refused = loader.load(&dirs).unwrap().unwrap_err();
        assert_eq!(
            refused.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["a.yaml (document 7): Pod shop/p3 is defined already, in a.yaml (document 5)"]
        );
        assert_eq!(held(&loader.snapshot), before, "the refused edit is undone");
        write(&edits[1]);
        loader.load(&dirs).unwrap().unwrap();
        assert_eq!(held(&loader.snapshot), fresh().0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_loader_follows_edits_file_by_file_and_refuses_an_object_defined_twice() {
        let dir = std::env::temp_dir().join(format!("skein-local-loader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str, port: u16| {
            format!("kind: Service\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{ports: [{{name: http, port: {port}}}]}}\n")
        };
        let write = |file: &str, text: &str| {
            let tmp = dir.join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(tmp, dir.join(file)).unwrap();
        };
        let dirs = [dir.clone()];
        let ports =
            |s: &Snapshot, name: &str| s.services.get(&ObjectKey::new("shop", name)).map(|s| s.ports[0].port);
        // The snapshot without its record of changes.
        let held = |s: &Snapshot| format!("{:?}", Snapshot { changes: Default::default(), ..s.clone() });
        // A mesh put in force (computed from the last one and the changes) is the whole computation's.
        let whole = |mesh: Arc<crate::compute::MeshConfig>, s: &Snapshot| {
            assert_eq!(mesh.destinations, compute(s).destinations);
        };
        write("a.yaml", &svc("reviews", 9080));
        write("b.yaml", &svc("ratings", 9090));
        let mut loader = Loader::default();
        whole(loader.load(&dirs).unwrap().unwrap(), &loader.snapshot);
        let first = loader.snapshot.clone();
        assert_eq!((ports(&first, "reviews"), ports(&first, "ratings")), (Some(9080), Some(9090)));
        assert!(loader.load(&dirs).is_none(), "nothing changed");

        // An edit replaces what that file defined; the other file's objects stay.
        write("a.yaml", &svc("details", 9070));
        whole(loader.load(&dirs).unwrap().unwrap(), &loader.snapshot);
        let edited = loader.snapshot.clone();
        assert_eq!(ports(&edited, "reviews"), None);
        assert_eq!((ports(&edited, "details"), ports(&edited, "ratings")), (Some(9070), Some(9090)));
        // The same text written again is no change.
        write("a.yaml", &svc("details", 9070));
        assert!(loader.load(&dirs).is_none());

        // The same object in two files is refused, once; the last good snapshot stays.
        write("c.yaml", &svc("ratings", 9091));
        let refused = loader.load(&dirs).unwrap().unwrap_err();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(
            refused[0].to_string(),
            "c.yaml (document 1): Service shop/ratings is defined already, in b.yaml (document 1)"
        );
        assert!(loader.load(&dirs).is_none(), "the same refused set is not refused again");
        assert_eq!(held(&loader.snapshot), held(&edited), "the refused set is undone");
        // Removing the duplicate (and a file going away) puts the set in force again.
        std::fs::remove_file(dir.join("c.yaml")).unwrap();
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        whole(loader.load(&dirs).unwrap().unwrap(), &loader.snapshot);
        let fixed = loader.snapshot.clone();
        assert_eq!((ports(&fixed, "details"), ports(&fixed, "ratings")), (Some(9070), None));

        // A refused edit of a file in force: what the file defined before comes back as it was.
        write("a.yaml", &format!("{}---\nkind: Deployment\nmetadata: {{name: x}}\n", svc("details", 9071)));
        loader.load(&dirs).unwrap().unwrap_err();
        assert_eq!(held(&loader.snapshot), held(&fixed));
        // Then a good edit: computed from the last mesh in force and every change since, the
        // refused ones (undone) included.
        write("a.yaml", &svc("details", 9072));
        whole(loader.load(&dirs).unwrap().unwrap(), &loader.snapshot);
        assert_eq!(ports(&loader.snapshot, "details"), Some(9072));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
