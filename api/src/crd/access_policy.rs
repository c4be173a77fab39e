//! `AccessPolicy`: which identities may call a Service (or every meshed workload of a
//! Namespace), enforced by each target workload's sidecar from the caller's verified SPIFFE
//! identity. The decision itself is [`crate::authz`]; this is what users write.
//!
//! The schema refuses the shapes that silently match nothing or everything in other meshes: an
//! empty `from` or `to` (omit it instead), an empty list (omit it instead), and
//! `unauthenticated: true` mixed with identity fields (write a second rule).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN};

/// A service account name, or `*` for any in the namespace.
const SERVICE_ACCOUNT_PATTERN: &str = r"^(\*|[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$";
/// A namespace, or `*` for any.
const NAMESPACE_PATTERN: &str = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$";
/// A SPIFFE ID of a workload: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
const SPIFFE_PATTERN: &str = r"^spiffe://[a-z0-9.-]+/ns/[a-z0-9-]+/sa/[a-z0-9.-]+$";

/// Who may call a Service (or any meshed workload of a Namespace).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "skein.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ap",
    category = "skein",
    doc = "AccessPolicy says which identities may call a Service, or every workload of a Namespace.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    /// What it protects: a Service in this namespace (its ports are Service ports), or this
    /// Namespace (every meshed workload in it).
    pub target_ref: AccessTargetRef,
    /// `Allow`: a target with at least one Allow policy denies every call no Allow rule matches.
    /// `Deny`: calls a rule matches are denied, whatever any Allow policy says (Deny policies
    /// are evaluated first).
    #[serde(default)]
    pub action: AccessAction,
    /// `Enforce`, or `DryRun`: decide and record (metrics, access log), never deny.
    #[serde(default)]
    pub mode: AccessMode,
    /// The rules; a call matching any one of them (OR) takes the action. No rules match
    /// nothing: an Allow policy without rules allows nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub rules: Vec<AccessRule>,
}

/// The target of an AccessPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct AccessTargetRef {
    /// `Service` or `Namespace`.
    pub kind: AccessTargetKind,
    /// The Service's name, or the Namespace's (the policy's own).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// Kinds an AccessPolicy can target.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessTargetKind {
    /// Calls to this Service's ports.
    Service,
    /// Calls to any meshed workload of the namespace.
    Namespace,
}

/// Allow or Deny.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessAction {
    #[default]
    Allow,
    Deny,
}

/// Enforce or DryRun.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessMode {
    #[default]
    Enforce,
    DryRun,
}

/// One rule: `from` and `to` must both match (AND); an omitted one matches every caller or
/// every request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// Callers. Every field given must match (AND); one entry of each list is enough (OR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AccessSource>,
    /// Requests. Every field given must match (AND); one entry of each list is enough (OR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AccessDestination>,
}

/// Callers of a rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.serviceAccounts) || has(self.identities) || has(self.namespaces) || (has(self.unauthenticated) && self.unauthenticated)")
    .message("from must name serviceAccounts, identities, namespaces or unauthenticated: an empty from would match no caller (omit from to match every caller)"))]
#[x_kube(validation = Rule::new("!has(self.unauthenticated) || !self.unauthenticated || (!has(self.serviceAccounts) && !has(self.identities) && !has(self.namespaces))")
    .message("unauthenticated: true matches callers without a mesh identity and cannot be combined with serviceAccounts, identities or namespaces in one from; write a second rule")
    .field_path(".unauthenticated"))]
pub struct AccessSource {
    /// Callers running as one of these service accounts (`name: "*"`: any in that namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 64))]
    pub service_accounts: Vec<ServiceAccountRef>,
    /// Callers with one of these SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 512), regex(pattern = SPIFFE_PATTERN)))]
    pub identities: Vec<String>,
    /// Callers whose identity is in one of these namespaces (`*`: any namespace). Only callers
    /// with a mesh identity match: plaintext callers match `unauthenticated` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 64), inner(length(max = 63), regex(pattern = NAMESPACE_PATTERN)))]
    pub namespaces: Vec<String>,
    /// Callers without a mesh identity (plaintext, reaching a permissive workload). Alone in
    /// its `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

/// A service account of the mesh.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Its namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub namespace: String,
    /// Its name, or `*` for any service account of the namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = SERVICE_ACCOUNT_PATTERN))]
    pub name: String,
}

/// Requests of a rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.ports) || has(self.methods) || has(self.paths)")
    .message("to must name ports, methods or paths: an empty to would match no request (omit to to match every request)"))]
pub struct AccessDestination {
    /// Ports of the target Service (translated to its pods' ports by the operator); any port of
    /// a Namespace target's workloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 32), inner(range(min = 1, max = 65535)), extend("x-kubernetes-list-type" = "set"))]
    pub ports: Vec<i32>,
    /// HTTP methods. HTTP only: a rule with methods or paths never allows a call that is not
    /// HTTP, and always denies one (it cannot be checked, so a Deny fails closed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 16), inner(length(max = 16), regex(pattern = r"^[A-Z]+$")), extend("x-kubernetes-list-type" = "set"))]
    pub methods: Vec<String>,
    /// HTTP paths, matched after normalisation (dot segments resolved, `//` merged). HTTP only,
    /// as `methods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 32))]
    pub paths: Vec<AccessPathMatch>,
}

/// A path: exactly one of `exact` or `prefix`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.exact) != has(self.prefix)").message("exactly one of exact or prefix must be set"))]
pub struct AccessPathMatch {
    /// The whole path (without the query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub exact: Option<String>,
    /// Whole leading segments: `/api` matches `/api` and `/api/…`, never `/apis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub prefix: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_example_parses_with_defaults() {
        let spec: AccessPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRef": {"kind": "Service", "name": "reviews"},
            "rules": [{
                "from": {"serviceAccounts": [{"namespace": "shop", "name": "productpage"}],
                         "identities": ["spiffe://cluster.local/ns/ops/sa/prober"], "namespaces": ["shop"]},
                "to": {"ports": [9080], "methods": ["GET"], "paths": [{"prefix": "/reviews"}]}
            }]
        }))
        .unwrap();
        assert_eq!((spec.action, spec.mode), (AccessAction::Allow, AccessMode::Enforce));
        assert_eq!(spec.rules[0].to.as_ref().unwrap().paths[0].prefix.as_deref(), Some("/reviews"));
    }
}
