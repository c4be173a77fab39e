//! `TrafficRoute`: how calls to one Service host are routed — header, path and method matches,
//! and weighted splits across subsets of its endpoints or across other Services.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, StringMatch, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN};
use crate::duration::DURATION_PATTERN;

/// Routing for one Service host: rules are tried in order and the first match wins; a rule with
/// no match is the default.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "skein.dev",
    version = "v1alpha1",
    kind = "TrafficRoute",
    namespaced,
    status = "PolicyStatus",
    shortname = "tr",
    category = "skein",
    doc = "TrafficRoute routes calls to one Service host by header, path and method, with weighted canary splits.",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
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
#[x_kube(validation = Rule::new("!has(self.subsets) || self.subsets.all(s, self.subsets.exists_one(t, t.name == s.name))")
    .message("subsets: subset names must be unique").field_path(".subsets"))]
#[x_kube(validation = Rule::new("self.rules.all(r, r.backends.all(b, !has(b.subset) || (has(self.subsets) && self.subsets.exists(s, s.name == b.subset))))")
    .message("rules: every backend subset must be declared in spec.subsets").field_path(".rules"))]
pub struct TrafficRouteSpec {
    /// The Service this route applies to: a Service name in this namespace, or its FQDN such as
    /// `reviews.shop.svc.cluster.local`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub host: String,
    /// The Service port this route applies to; all ports when absent. A route for one port
    /// takes precedence over an all-ports route for the same host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Named groups of the Service's endpoints, chosen by pod labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub subsets: Vec<Subset>,
    /// Rules tried in order; the first that matches routes the request. A rule without `match`
    /// matches every request.
    #[schemars(length(min = 1, max = 32))]
    pub rules: Vec<RouteRule>,
}

/// A named group of endpoints: the pods behind the Service that carry all of these labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Name the rules refer to, such as `v1`.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// Pod labels an endpoint must carry (all of them) to belong to this subset.
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("labels must name at least one label"))]
    pub labels: BTreeMap<String, String>,
}

/// One routing rule: when the request matches, send it to the backends by weight.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.backends.exists(b, b.weight > 0)")
    .message("backends: the weights must add up to more than 0").field_path(".backends"))]
pub struct RouteRule {
    /// Conditions a request must meet (all of them); the rule matches every request when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RouteMatch>,
    /// Where matching requests go, split by weight.
    #[schemars(length(min = 1, max = 16))]
    pub backends: Vec<Backend>,
    /// Request timeout for this rule (Go duration such as `10s`); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<String>,
}

/// Conditions on a request; all given ones must hold.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Header conditions; every one must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
    /// Condition on the request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The HTTP method the request must use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = super::drop_null_from_enum)]
    pub method: Option<HttpMethod>,
}

/// A condition on one request header: exactly one of `exact`, `prefix` or `regex`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name (case-insensitive), such as `x-user-group`.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// How the header value must match.
    #[serde(flatten)]
    pub value: StringMatch,
}

/// A condition on the request path: exactly one of `exact`, `prefix` or `regex`; exact and prefix
/// paths start with `/`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(!has(self.exact) || self.exact.startsWith('/')) && (!has(self.prefix) || self.prefix.startsWith('/'))")
    .message("exact and prefix paths must start with '/'"))]
pub struct PathMatch {
    /// How the path must match.
    #[serde(flatten)]
    pub value: StringMatch,
}

/// HTTP methods a rule can match.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum HttpMethod {
    GET,
    HEAD,
    POST,
    PUT,
    DELETE,
    PATCH,
    OPTIONS,
    CONNECT,
    TRACE,
}

impl HttpMethod {
    /// The method as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GET => "GET",
            Self::HEAD => "HEAD",
            Self::POST => "POST",
            Self::PUT => "PUT",
            Self::DELETE => "DELETE",
            Self::PATCH => "PATCH",
            Self::OPTIONS => "OPTIONS",
            Self::CONNECT => "CONNECT",
            Self::TRACE => "TRACE",
        }
    }
}

/// One destination of a rule: a subset of this route's host, or another Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.subset) != has(self.service)")
    .message("a backend names exactly one of subset or service"))]
pub struct Backend {
    /// A subset declared in `spec.subsets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub subset: Option<String>,
    /// Another Service in this namespace (by name) to send the traffic to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub service: Option<String>,
    /// Port of `service` to call; the request's own port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Relative share of the rule's traffic (0 takes this backend out of rotation).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: i32,
}

fn default_weight() -> i32 {
    1
}
