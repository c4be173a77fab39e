//! `OutlierPolicy`: passive health checking. Endpoints that fail in a row are ejected from load
//! balancing for a while, growing with each ejection, and never more than a share of them.
//! Defaults follow Envoy's outlier detection.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, PolicyTargetRef};
use crate::duration::DURATION_PATTERN;

/// Circuit breaking by outlier ejection for calls to one Service (or one TrafficRoute).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "skein.dev",
    version = "v1alpha1",
    kind = "OutlierPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "olp",
    category = "skein",
    doc = "OutlierPolicy ejects endpoints that fail in a row from load balancing (circuit breaking).",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Errors", type_ = "integer", json_path = ".spec.consecutiveErrors"),
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
#[x_kube(validation = Rule::new("duration(self.baseEjectionTime) <= duration(self.maxEjectionTime)")
    .message("baseEjectionTime must not exceed maxEjectionTime").field_path(".baseEjectionTime"))]
pub struct OutlierPolicySpec {
    /// The Service (or TrafficRoute) whose endpoints this policy watches.
    pub target_ref: PolicyTargetRef,
    /// Failures in a row (5xx responses or connect failures) that eject an endpoint.
    #[serde(default = "default_consecutive_errors")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_errors: i32,
    /// How often ejections are re-evaluated (Go duration).
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10ms')").message("interval must be at least 10ms"))]
    pub interval: String,
    /// Ejection time for the first ejection; each further ejection of the same endpoint lasts
    /// this times the number of ejections, up to `maxEjectionTime`.
    #[serde(default = "default_base_ejection_time")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub base_ejection_time: String,
    /// Upper bound of one ejection.
    #[serde(default = "default_max_ejection_time")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub max_ejection_time: String,
    /// Never eject more than this share of the endpoints (percent). A single failing endpoint
    /// among healthy peers can always be ejected.
    #[serde(default = "default_max_ejection_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: i32,
}

fn default_consecutive_errors() -> i32 {
    5
}
fn default_interval() -> String {
    "10s".into()
}
fn default_base_ejection_time() -> String {
    "30s".into()
}
fn default_max_ejection_time() -> String {
    "300s".into()
}
fn default_max_ejection_percent() -> i32 {
    10
}
