//! Workload identity: the mesh CA and certificate signing (`ca`, pure), the serving certificate
//! of the webhook and the config stream (`serving`), and the names of what identity puts in
//! the cluster (here). The Kubernetes shell that keeps the CA Secret, the trust bundles and the
//! workload certificate Secrets current is `crate::k8s::identity`.
//!
//! Depends on nothing else in the crate.

pub mod ca;
pub mod serving;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

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
