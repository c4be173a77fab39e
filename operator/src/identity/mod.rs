//! Workload identity: the mesh CA and certificate signing (`ca`, pure), the serving certificate
//! of the webhook and the config stream (`serving`), and the names and shapes of what identity
//! puts in the cluster and the record of what this replica issued (here). The Kubernetes shell that keeps the CA Secret, the trust bundles and the
//! workload certificate Secrets current is `crate::k8s::identity`.
//!
//! Depends on nothing else in the crate.

pub mod ca;
pub mod serving;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use skein_api::WorkloadIdentity;
use time::OffsetDateTime;

/// Name of the trust bundle ConfigMap in each meshed namespace.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "skein-trust-bundle";
/// Key of the roots in that ConfigMap.
pub const TRUST_BUNDLE_KEY: &str = "roots.pem";
/// Prefix of a workload's certificate Secret (`skein-identity-<service account>`).
pub const IDENTITY_SECRET_PREFIX: &str = "skein-identity-";
/// Label on everything this module writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "skein");

/// The Secret name of a service account's certificate.
pub fn identity_secret_name(service_account: &str) -> String {
    let name = format!("{IDENTITY_SECRET_PREFIX}{service_account}");
    if name.len() <= 253 {
        name
    } else {
        name[..253].trim_end_matches(['-', '.']).to_string()
    }
}

/// The trust bundle ConfigMap of a meshed namespace, holding `bundle` (PEM roots).
pub fn trust_bundle_configmap(bundle: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE_CONFIGMAP.into()),
            labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
            ..Default::default()
        },
        data: Some([(TRUST_BUNDLE_KEY.to_string(), bundle.to_string())].into()),
        ..Default::default()
    }
}

/// The certificate Secret (`kubernetes.io/tls`) of `identity`, holding `cert`.
pub fn workload_secret(identity: &WorkloadIdentity, trust_domain: &str, cert: &ca::WorkloadCert) -> Secret {
    let data = [("tls.crt", &cert.chain_pem), ("tls.key", &cert.key_pem), ("ca.crt", &cert.bundle_pem)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(identity_secret_name(&identity.service_account)),
            labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
            annotations: Some([("skein.dev/spiffe-id".to_string(), identity.spiffe_id(trust_domain))].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// What this replica issued: each identity's certificate expiry, and the CA it was issued under.
/// The operator never reads a workload Secret back (its RBAC has no `get` on Secrets outside its
/// namespace), so this record is how the webhook and the leader know that a certificate is
/// current. It is per process: after a restart, the first injection of each identity issues a
/// fresh certificate.
#[derive(Default)]
pub struct Issued(Mutex<HashMap<WorkloadIdentity, (OffsetDateTime, u64)>>);

impl Issued {
    /// Records that `identity` was issued a certificate valid until `not_after` by `ca`.
    pub fn record(&self, identity: &WorkloadIdentity, not_after: OffsetDateTime, ca: &ca::MeshCa) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(identity.clone(), (not_after, fingerprint(ca)));
    }

    /// The expiry of the certificate this replica issued `identity`, if it was issued by `ca` (as
    /// it is now) and is not yet past half of `lifetime` at `now`.
    pub fn current(
        &self,
        identity: &WorkloadIdentity,
        ca: &ca::MeshCa,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let half = time::Duration::try_from(lifetime / 2).unwrap_or_default();
        let record = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let &(not_after, issued_by) = record.get(identity)?;
        (issued_by == fingerprint(ca) && not_after - now >= half).then_some(not_after)
    }
}

/// The CA a certificate was issued under: its signer and the trust bundle it carries.
fn fingerprint(ca: &ca::MeshCa) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (ca.signer(), ca.trust_bundle()).hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_current_until_half_life_and_only_under_the_same_ca() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let (ca, _) = ca::MeshCa::generate("cluster.local", now).unwrap();
        let (other, _) = ca::MeshCa::generate("cluster.local", now).unwrap();
        let id = WorkloadIdentity::new("shop", "web");
        let lifetime = Duration::from_secs(3600);
        let issued = Issued::default();
        assert_eq!(issued.current(&id, &ca, lifetime, now), None, "nothing issued yet");
        issued.record(&id, now + time::Duration::hours(1), &ca);
        assert!(issued.current(&id, &ca, lifetime, now + time::Duration::minutes(29)).is_some());
        assert_eq!(
            issued.current(&id, &ca, lifetime, now + time::Duration::minutes(31)),
            None,
            "past half-life"
        );
        assert_eq!(issued.current(&id, &other, lifetime, now), None, "issued by another CA");
    }
}
