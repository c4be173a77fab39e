//! Skein's shared vocabulary: the custom resources users apply (`TrafficRoute`, `OutlierPolicy`,
//! `RetryPolicy`), the `ProxyConfig` the operator pushes to every sidecar, access decisions
//! (`authz`, a pure function both sides share), and the labels, ports and names the parts agree
//! on. No I/O lives here, except in `process` (the binaries' start-up and shutdown, behind the
//! `process` feature).
#![forbid(unsafe_code)]

pub mod authz;
pub mod config;
pub mod constants;
pub mod crd;
pub mod duration;
pub mod lines;
pub mod probes;
#[cfg(feature = "process")]
pub mod process;
pub mod topology;

pub use config::{EdgeCounters, ProxyConfig, ProxyMessage, StreamAck, TrafficReport, WorkloadIdentity};
pub use crd::{
    access_policy::{AccessPolicy, AccessPolicySpec},
    outlier_policy::{OutlierPolicy, OutlierPolicySpec},
    retry_policy::{RetryPolicy, RetryPolicySpec},
    traffic_route::{TrafficRoute, TrafficRouteSpec},
    PolicyStatus,
};
