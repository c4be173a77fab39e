//! The config in force and where it comes from: the store that validates, compiles, swaps and
//! persists a `ProxyConfig`; the operator's config stream (the proxy's side: receive, apply,
//! acknowledge, reconnect); and `--config FILE`.
//!
//! Depends on `route` (a config is compiled into a route table before it is swapped in) and
//! `tls` (the stream client proves the workload identity).

pub mod file;
pub mod store;
pub mod stream;
