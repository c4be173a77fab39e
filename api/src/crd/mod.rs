//! The custom resources of `skein.dev/v1alpha1` and the pieces they share.
//!
//! Validation lives in the schema so that `kubectl apply` refuses bad input with a message that
//! names the field: ranges, enums, patterns and lengths come from `#[schemars(...)]`, cross-field
//! rules are CEL (`x-kubernetes-validations`) from `#[x_kube(validation = ...)]`. Every list and
//! string carries a maximum, which the API server needs to bound the cost of CEL rules.

// Several `printcolumn(...)` entries repeat `type_ = "string"`, which clippy mistakes for a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod access_policy;
pub mod outlier_policy;
pub mod retry_policy;
pub mod traffic_route;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// DNS-1123 label (subset names, Service names).
pub(crate) const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// DNS-1123 subdomain (hosts: a Service name or its FQDN).
pub(crate) const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The object a policy attaches to (Gateway API policy-attachment style).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// API group of the target: empty for a core Service, `skein.dev` for a TrafficRoute.
    /// Defaults from the kind when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub group: Option<String>,
    /// Kind of the target: `Service` or `TrafficRoute`.
    pub kind: TargetKind,
    /// Name of the target in the policy's own namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
}

/// Kinds a policy can attach to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// A Service: the policy applies to every call to it.
    Service,
    /// One TrafficRoute: the policy applies to calls routed by it.
    TrafficRoute,
}

/// Status shared by every Skein resource: what the operator made of the latest spec.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (valid and not in conflict), `ResolvedRefs` (every reference resolves) and
    /// `Programmed` (acknowledged by every connected proxy that needs it).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Condition types every Skein resource reports.
pub mod condition {
    /// Spec is valid and not in conflict.
    pub const ACCEPTED: &str = "Accepted";
    /// Every reference resolves to existing endpoints.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The config carrying this generation is acknowledged by every connected proxy needing it.
    pub const PROGRAMMED: &str = "Programmed";
}

/// A string matcher: exactly one of `exact`, `prefix` or `regex` (RE2 syntax).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1")
    .message("exactly one of exact, prefix or regex must be set"))]
pub struct StringMatch {
    /// Matches when the value equals this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub exact: Option<String>,
    /// Matches when the value starts with this string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub prefix: Option<String>,
    /// Matches when the whole value matches this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    // A CEL `matches` with an invalid pattern fails evaluation, so the API server rejects the
    // object and quotes the regex parser's error; a valid pattern makes one side true.
    #[x_kube(validation = Rule::new("''.matches(self) || !''.matches(self)").message("regex must be a valid RE2 regular expression"))]
    pub regex: Option<String>,
}

/// An optional enum is nullable already; a `null` among its values would only show up in the
/// API server's "supported values" message.
pub(crate) fn drop_null_from_enum(schema: &mut schemars::Schema) {
    if let Some(serde_json::Value::Array(values)) = schema.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
}
