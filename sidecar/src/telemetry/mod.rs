//! What the proxy tells about each request: Prometheus metrics, the JSON access log, and trace
//! headers (W3C `traceparent`, `x-request-id`).
//!
//! Depends on nothing else in the crate; everything else may use it.

pub mod access_log;
pub mod metrics;
pub mod trace;
