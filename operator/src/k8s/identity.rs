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
use kube::api::{Api, PostParams};
use kube::Client;
use skein_api::WorkloadIdentity;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::controller::Context;
use crate::identity::ca::{self, CaFiles, MeshCa};
use crate::identity::{
    identity_secret_name, trust_bundle_configmap, workload_secret, MANAGED_BY, TRUST_BUNDLE_CONFIGMAP,
};

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
/// old root). A Secret that does not load is refused and the CA in force stays. `changed` is
/// woken after each swap.
#[allow(clippy::too_many_arguments)]
pub async fn watch_ca(
    client: Client,
    namespace: String,
    name: String,
    ca: ca::SharedCa,
    changed: Arc<Notify>,
    metrics: crate::metrics::Metrics,
    permissions: Arc<super::permissions::Permissions>,
    shutdown: CancellationToken,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let mut last: Option<BTreeMap<String, ByteString>> = None;
    let needed_for = format!("follow the mesh CA in Secret {namespace}/{name}");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CA_POLL) => {}
        }
        let secret = match api.get_opt(&name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => continue,
            Err(e) => {
                if permissions.check(&e, &needed_for).await.is_none() {
                    tracing::debug!(error = %e, "cannot read the CA Secret; trying again");
                }
                continue;
            }
        };
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
                    changed.notify_one();
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

/// Keeps bundles and workload certificates current while this replica leads. Woken by
/// `computed` (after a computation, or a CA swap), it issues what new identities need, and on
/// its timer (at most a minute) renews what is past half-life.
///
/// The operator may not read Secrets outside its own namespace (its RBAC grants `create` and
/// `update` on them, never `get`, `list`, `watch` or `patch`, whose answer is the whole object:
/// docs/install.md), so it renews from the record of what this replica issued
/// ([`crate::identity::Issued`], shared with the webhook). What it finds no current record of
/// (on taking leadership, after a CA swap) it issues afresh, which also replaces a Secret
/// deleted, changed by hand or issued by an older CA.
pub async fn run(
    ctx: Arc<Context>,
    ca: ca::SharedCa,
    settings: IdentitySettings,
    computed: Arc<Notify>,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut state = Published::default();
    let mut wait = Duration::from_secs(60);
    // The CA (signer, trust bundle) the certificates in `state` were checked against.
    let mut checked_with: Option<(String, String)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = computed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            changed = leader.changed() => {
                if changed.is_err() { return; }
                state = Published::default();
            }
        }
        if !*leader.borrow() {
            // Only the leader renews: another replica's figure would go stale.
            ctx.metrics.certificate_earliest_expiry.set(0);
            wait = Duration::from_secs(60);
            continue;
        }
        let current = ca.load_full();
        let ca_now = (current.signer().to_string(), current.trust_bundle().to_string());
        if checked_with.as_ref() != Some(&ca_now) {
            state.certificates.clear();
            checked_with = Some(ca_now);
        }
        let failures = reconcile(&ctx, &current, &settings, &mut state).await;
        wait = next_wake(&state, settings.lifetime, OffsetDateTime::now_utc(), failures > 0);
    }
}

/// How long the loop may sleep: until the first certificate is due for renewal (never more than
/// a minute, so short lifetimes renew on time), or 5 s after a failure.
fn next_wake(state: &Published, lifetime: Duration, now: OffsetDateTime, failed: bool) -> Duration {
    let half = time::Duration::try_from(lifetime / 2).unwrap_or_default();
    let due = state.certificates.values().map(|not_after| *not_after - half - now).min();
    let mut wait = due
        .map(|d| Duration::try_from(d.max(time::Duration::ZERO)).unwrap_or_default())
        .unwrap_or(Duration::from_secs(60));
    if failed {
        wait = wait.min(Duration::from_secs(5));
    }
    wait.clamp(Duration::from_secs(1), Duration::from_secs(60))
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

/// One pass over every meshed namespace and identity; returns how many failed. One that fails
/// (a namespace being deleted, say) is logged, counted and tried again on the next pass, and
/// never keeps the others from their bundle or certificate.
async fn reconcile(ctx: &Context, ca: &MeshCa, settings: &IdentitySettings, state: &mut Published) -> usize {
    let (identities, namespaces) = meshed(ctx);
    let mut failed = Vec::new();
    for ns in &namespaces {
        if let Err(e) = publish_bundle(ctx, ca, ns, state).await {
            failed.push((format!("publish the trust bundle in {ns}"), e));
        }
    }
    let now = OffsetDateTime::now_utc();
    for id in &identities {
        if let Err(e) = renew(ctx, ca, settings, id, now, state).await {
            failed.push((format!("issue the certificate of {id}"), e));
        }
    }
    let failures = failed.len();
    for (what, e) in failed {
        ctx.metrics.reconcile_errors.get_or_create(&crate::metrics::ErrorLabels { kind: "identity" }).inc();
        let refused = match &e {
            IdentityError::Kube(k) => ctx.permissions.check(k, &what).await.is_some(),
            _ => false,
        };
        if !refused {
            tracing::warn!(%what, error = %e, "identity reconcile failed; retrying");
        }
    }
    // Identities that left the mesh no longer count towards the earliest expiry.
    state.certificates.retain(|id, _| identities.contains(id));
    let earliest = state.certificates.values().min().map(|t| t.unix_timestamp()).unwrap_or(0);
    ctx.metrics.certificate_earliest_expiry.set(earliest);
    failures
}

/// Publishes the trust bundle in `ns` unless it holds the current one already.
async fn publish_bundle(
    ctx: &Context,
    ca: &MeshCa,
    ns: &str,
    state: &mut Published,
) -> Result<(), IdentityError> {
    if state.bundles.get(ns).map(String::as_str) == Some(ca.trust_bundle()) {
        return Ok(());
    }
    let cm = trust_bundle_configmap(ca.trust_bundle());
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    create_or_replace(&api, TRUST_BUNDLE_CONFIGMAP, &cm).await?;
    state.bundles.insert(ns.to_string(), ca.trust_bundle().to_string());
    Ok(())
}

/// Issues `id` a certificate unless this replica issued it one under the CA in force that is not
/// yet past half-life.
async fn renew(
    ctx: &Context,
    ca: &MeshCa,
    settings: &IdentitySettings,
    id: &WorkloadIdentity,
    now: OffsetDateTime,
    state: &mut Published,
) -> Result<(), IdentityError> {
    let due = |not_after: &OffsetDateTime| {
        *not_after - now < time::Duration::try_from(settings.lifetime / 2).unwrap_or_default()
    };
    if state.certificates.get(id).is_some_and(|t| !due(t)) {
        return Ok(());
    }
    // The webhook of this replica may have issued it since.
    if let Some(not_after) = ctx.issued.current(id, ca, settings.lifetime, now) {
        state.certificates.insert(id.clone(), not_after);
        return Ok(());
    }
    let name = identity_secret_name(&id.service_account);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &id.namespace);
    let cert = ca.sign_workload(id, &settings.trust_domain, settings.lifetime, now)?;
    create_or_replace(&api, &name, &workload_secret(id, &settings.trust_domain, &cert)).await?;
    ctx.issued.record(id, cert.not_after, ca);
    ctx.metrics.certificates_signed.inc();
    tracing::info!(identity = %id, not_after = %cert.not_after, "issued a workload certificate");
    state.certificates.insert(id.clone(), cert.not_after);
    Ok(())
}

/// Writes `object` without reading what is there: `create`, and on 409 an unconditional
/// `update` (no resourceVersion). Unlike a patch, whose answer is the whole stored object, an
/// update answers with what was sent, so neither call can read another Secret or ConfigMap of the
/// same name (the RBAC grants these two verbs, and no read, outside the operator's namespace).
pub async fn create_or_replace<K>(api: &Api<K>, name: &str, object: &K) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.replace(name, &PostParams::default(), object).await.map(drop)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_wakes_when_the_first_certificate_is_due() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let lifetime = Duration::from_secs(120);
        let mut state = Published::default();
        assert_eq!(next_wake(&state, lifetime, now, false), Duration::from_secs(60), "nothing to renew");
        state.certificates.insert(WorkloadIdentity::new("shop", "a"), now + time::Duration::seconds(100));
        state.certificates.insert(WorkloadIdentity::new("shop", "b"), now + time::Duration::seconds(90));
        assert_eq!(next_wake(&state, lifetime, now, false), Duration::from_secs(30), "b is due at 90 - 60");
        assert_eq!(
            next_wake(&state, lifetime, now, true),
            Duration::from_secs(5),
            "a failure is retried soon"
        );
        state.certificates.insert(WorkloadIdentity::new("shop", "c"), now + time::Duration::seconds(10));
        assert_eq!(
            next_wake(&state, lifetime, now, false),
            Duration::from_secs(1),
            "overdue: at once, not in a loop"
        );
        let day = Duration::from_secs(24 * 3600);
        let mut long = Published::default();
        long.certificates.insert(WorkloadIdentity::new("shop", "a"), now + time::Duration::hours(24));
        assert_eq!(next_wake(&long, day, now, false), Duration::from_secs(60), "at most a minute");
    }

    #[test]
    fn secret_names_follow_the_service_account() {
        assert_eq!(identity_secret_name("reviews"), "skein-identity-reviews");
        let long = "a".repeat(250);
        assert!(identity_secret_name(&long).len() <= 253);
    }
}
