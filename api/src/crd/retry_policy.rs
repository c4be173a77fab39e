//! `RetryPolicy`: how many times a failed call is retried, on which failures, how long each try
//! and the whole call may take, how retries back off, and the budget that caps the extra load
//! retries add (so a struggling Service is not finished off by its own clients).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, PolicyTargetRef};
use crate::duration::DURATION_PATTERN;

/// Retries, timeouts, jittered backoff and a retry budget for calls to one Service (or one
/// TrafficRoute).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "skein.dev",
    version = "v1alpha1",
    kind = "RetryPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "rp",
    category = "skein",
    doc = "RetryPolicy retries failed calls with per-try timeouts, jittered backoff and a retry budget.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
    printcolumn(name = "Attempts", type_ = "integer", json_path = ".spec.attempts"),
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
#[x_kube(validation = Rule::new("!has(self.perTryTimeout) || !has(self.timeout) || duration(self.perTryTimeout) <= duration(self.timeout)")
    .message("perTryTimeout must not exceed timeout").field_path(".perTryTimeout"))]
#[x_kube(validation = Rule::new("!self.retryOn.exists(r, r == 'retriable-status-codes') || (has(self.retriableStatusCodes) && size(self.retriableStatusCodes) > 0)")
    .message("retriableStatusCodes must list at least one code when retryOn contains retriable-status-codes").field_path(".retriableStatusCodes"))]
pub struct RetryPolicySpec {
    /// The Service (or TrafficRoute) whose calls are retried.
    pub target_ref: PolicyTargetRef,
    /// Retries after the first try (0 disables retries but keeps the timeouts).
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: i32,
    /// Timeout of each try (Go duration); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub per_try_timeout: Option<String>,
    /// Overall deadline of the call including every retry and backoff; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
    /// Failures that are retried.
    #[serde(default = "default_retry_on")]
    #[schemars(length(min = 1, max = 6), extend("x-kubernetes-list-type" = "set"))]
    pub retry_on: Vec<RetryOn>,
    /// Status codes retried when `retryOn` contains `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 100, max = 599)), extend("x-kubernetes-list-type" = "set"))]
    pub retriable_status_codes: Vec<i32>,
    /// Exponential backoff with full jitter between tries.
    #[serde(default)]
    pub backoff: Backoff,
    /// Caps retries to a share of the regular traffic, so retries cannot multiply load.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Also retry methods that are not idempotent (POST, PATCH). Off by default: a retried POST
    /// may act twice.
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// Failure classes a retry policy can retry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504 responses.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection was reset or closed before a response arrived.
    #[serde(rename = "reset")]
    Reset,
    /// The endpoint refused the connection.
    #[serde(rename = "refused")]
    Refused,
    /// Connecting failed for any reason (refused, timed out, unreachable).
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The response status is one of `retriableStatusCodes`.
    #[serde(rename = "retriable-status-codes")]
    RetriableStatusCodes,
}

/// Exponential backoff with full jitter: before retry n the proxy waits a random time between 0
/// and min(maxInterval, baseInterval × 2ⁿ).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.baseInterval) <= duration(self.maxInterval)")
    .message("baseInterval must not exceed maxInterval").field_path(".baseInterval"))]
pub struct Backoff {
    /// Backoff before the first retry (upper bound of its jitter).
    #[serde(default = "default_base_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub base_interval: String,
    /// Upper bound of any backoff.
    #[serde(default = "default_max_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub max_interval: String,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base_interval: default_base_interval(), max_interval: default_max_interval() }
    }
}

/// A retry budget (as in Linkerd): retries may add at most `percent` of the regular requests,
/// plus `minRetriesPerSecond` so that low-traffic callers can still retry.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed as a percentage of regular requests.
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
    /// Retries per second allowed regardless of the percentage.
    #[serde(default = "default_min_retries_per_second")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_retries_per_second: i32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self { percent: default_budget_percent(), min_retries_per_second: default_min_retries_per_second() }
    }
}

fn default_attempts() -> i32 {
    2
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::GatewayError, RetryOn::Reset, RetryOn::Refused]
}
fn default_base_interval() -> String {
    "25ms".into()
}
fn default_max_interval() -> String {
    "250ms".into()
}
fn default_budget_percent() -> i32 {
    20
}
fn default_min_retries_per_second() -> i32 {
    10
}
