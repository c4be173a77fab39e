//! Identity in the cluster (the Kubernetes shell of [`crate::identity`]): the mesh CA's Secret, the trust bundle ConfigMap in every meshed
//! namespace, and one workload certificate Secret per meshed service account, renewed at
//! half-life. The certificate work itself is [`crate::identity::ca`]; this is the shell around it.
//!
//! Every replica loads the CA (any replica may sign, e.g. for the webhook); only the leader
//! writes bundles and Secrets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use skein_api::constants::FIELD_MANAGER;
use skein_api::WorkloadIdentity;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::controller::Context;
use crate::identity::ca::{self, CaFiles, MeshCa};
use crate::identity::{identity_secret_name, trust_bundle_configmap, MANAGED_BY, TRUST_BUNDLE_CONFIGMAP};

/// Errors of the identity shell.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Secret {namespace}/{name}: {source}")]
    CaSecret {
        namespace: String,
        name: String,
        #[source]
        source: ca::CaError,
    },
    #[error("Secret {namespace}/{name} lacks {key}")]
    MissingKey { namespace: String, name: String, key: &'static str },
    #[error("the CA Secret {namespace}/{name} does not exist (a user-provided CA must be created first)")]
    NoUserCa { namespace: String, name: String },
    #[error("Kubernetes API")]
    Kube(#[from] kube::Error),
    #[error("signing")]
    Sign(#[from] ca::CaError),
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()
}

fn key_of(secret: &Secret, key: &'static str) -> Option<String> {
    secret.data.as_ref()?.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// Loads the CA from its Secret, creating a new root there first when allowed and missing.
pub async fn load_or_create_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    may_create: bool,
    trust_domain: &str,
) -> Result<MeshCa, IdentityError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await? {
            let missing =
                |key| IdentityError::MissingKey { namespace: namespace.into(), name: name.into(), key };
            let files = CaFiles {
                tls_crt: key_of(&secret, "tls.crt").ok_or_else(|| missing("tls.crt"))?,
                tls_key: key_of(&secret, "tls.key").ok_or_else(|| missing("tls.key"))?,
                ca_crt: key_of(&secret, "ca.crt").unwrap_or_default(),
            };
            return MeshCa::load(&files).map_err(|source| IdentityError::CaSecret {
                namespace: namespace.into(),
                name: name.into(),
                source,
            });
        }
        if !may_create {
            return Err(IdentityError::NoUserCa { namespace: namespace.into(), name: name.into() });
        }
        let (ca, files) = MeshCa::generate(trust_domain, OffsetDateTime::now_utc())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data(&[
                ("tls.crt", &files.tls_crt),
                ("tls.key", &files.tls_key),
                ("ca.crt", &files.ca_crt),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(%namespace, %name, "created the mesh root CA");
                return Ok(ca);
            }
            // Another replica was faster: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(IdentityError::NoUserCa { namespace: namespace.into(), name: name.into() })
}

/// Re-reads the CA Secret every few seconds and swaps in a changed CA (a root rotation: add
/// the new root to `ca.crt`, then switch `tls.crt`/`tls.key` to the new signer, then drop the
/// old root). A Secret that does not load is refused and the CA in force stays.
pub async fn watch_ca(
    client: Client,
    namespace: String,
    name: String,
    ca: ca::SharedCa,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut last: Option<BTreeMap<String, ByteString>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CA_POLL) => {}
        }
        let Ok(Some(secret)) = api.get_opt(&name).await else { continue };
        let data = secret.data.clone().unwrap_or_default();
        if last.as_ref() == Some(&data) {
            continue;
        }
        let first = last.is_none();
        last = Some(data);
        let files = CaFiles {
            tls_crt: key_of(&secret, "tls.crt").unwrap_or_default(),
            tls_key: key_of(&secret, "tls.key").unwrap_or_default(),
            ca_crt: key_of(&secret, "ca.crt").unwrap_or_default(),
        };
        match MeshCa::load(&files) {
            Ok(new) => {
                let current = ca.load();
                if !first || new.trust_bundle() != current.trust_bundle() || new.signer() != current.signer()
                {
                    tracing::info!(
                        roots = ca::certificates(new.trust_bundle()).len(),
                        "the mesh CA changed; swapping it in"
                    );
                    ca.store(Arc::new(new));
                }
            }
            Err(e) => {
                metrics.reconcile_errors.get_or_create(&crate::metrics::ErrorLabels { kind: "ca" }).inc();
                tracing::warn!(%namespace, %name, error = %e, "refusing the changed CA Secret; the CA in force stays");
            }
        }
    }
}

/// How often the CA Secret is re-read.
const CA_POLL: Duration = Duration::from_secs(3);

/// Settings of the identity loop.
pub struct IdentitySettings {
    pub trust_domain: String,
    pub lifetime: Duration,
}

/// Keeps bundles and workload certificates current while this replica leads.
pub async fn run(
    ctx: Arc<Context>,
    ca: ca::SharedCa,
    settings: IdentitySettings,
    computed: Arc<Notify>,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut state = Published::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = computed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            changed = leader.changed() => {
                if changed.is_err() { return; }
                state = Published::default();
            }
        }
        if !*leader.borrow() {
            continue;
        }
        let current = ca.load_full();
        if let Err(e) = reconcile(&ctx, &current, &settings, &mut state).await {
            tracing::warn!(error = %e, "identity reconcile failed; retrying");
            ctx.metrics
                .reconcile_errors
                .get_or_create(&crate::metrics::ErrorLabels { kind: "identity" })
                .inc();
        }
    }
}

/// What this replica has written, so unchanged things are not written again.
#[derive(Default)]
struct Published {
    bundles: HashMap<String, String>,
    certificates: HashMap<WorkloadIdentity, OffsetDateTime>,
}

/// The meshed workloads and namespaces in the snapshot.
fn meshed(ctx: &Context) -> (BTreeSet<WorkloadIdentity>, BTreeSet<String>) {
    let snapshot = ctx.snapshot.read().unwrap_or_else(|e| e.into_inner());
    let identities: BTreeSet<WorkloadIdentity> =
        snapshot.pods.iter().filter(|(_, p)| p.meshed).map(|(k, p)| p.identity(&k.namespace)).collect();
    let namespaces = identities.iter().map(|i| i.namespace.clone()).collect();
    (identities, namespaces)
}

async fn reconcile(
    ctx: &Context,
    ca: &MeshCa,
    settings: &IdentitySettings,
    state: &mut Published,
) -> Result<(), IdentityError> {
    let (identities, namespaces) = meshed(ctx);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for ns in &namespaces {
        if state.bundles.get(ns).map(String::as_str) == Some(ca.trust_bundle()) {
            continue;
        }
        let cm = trust_bundle_configmap(ca.trust_bundle());
        let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        api.patch(TRUST_BUNDLE_CONFIGMAP, &params, &Patch::Apply(&cm)).await?;
        state.bundles.insert(ns.clone(), ca.trust_bundle().to_string());
    }

    let now = OffsetDateTime::now_utc();
    for id in &identities {
        let due = |not_after: &OffsetDateTime| {
            *not_after - now < time::Duration::try_from(settings.lifetime / 2).unwrap_or_default()
        };
        if state.certificates.get(id).is_some_and(|t| !due(t)) {
            continue;
        }
        let name = identity_secret_name(&id.service_account);
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &id.namespace);
        // Someone (the webhook, another leader) may have issued one already.
        if let Some(existing) = api.get_opt(&name).await? {
            let current = key_of(&existing, "tls.crt").unwrap_or_default();
            let bundle_current = key_of(&existing, "ca.crt").as_deref() == Some(ca.trust_bundle());
            if bundle_current && !ca::needs_renewal(&current, now) {
                if let Some((_, not_after)) = ca::validity(&current) {
                    state.certificates.insert(id.clone(), not_after);
                    continue;
                }
            }
        }
        let cert = ca.sign_workload(id, &settings.trust_domain, settings.lifetime, now)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                annotations: Some(
                    [("skein.dev/spiffe-id".to_string(), id.spiffe_id(&settings.trust_domain))].into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data(&[
                ("tls.crt", &cert.chain_pem),
                ("tls.key", &cert.key_pem),
                ("ca.crt", &cert.bundle_pem),
            ])),
            ..Default::default()
        };
        api.patch(&name, &params, &Patch::Apply(&secret)).await?;
        ctx.metrics.certificates_signed.inc();
        tracing::info!(identity = %id, not_after = %cert.not_after, "issued a workload certificate");
        state.certificates.insert(id.clone(), cert.not_after);
    }
    let earliest = state.certificates.values().min().map(|t| t.unix_timestamp()).unwrap_or(0);
    ctx.metrics.certificate_earliest_expiry.set(earliest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_follow_the_service_account() {
        assert_eq!(identity_secret_name("reviews"), "skein-identity-reviews");
        let long = "a".repeat(250);
        assert!(identity_secret_name(&long).len() <= 253);
    }
}
