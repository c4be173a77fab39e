//! skein-proxy, the Skein sidecar: outbound (15001) and inbound (15006) listeners that route,
//! balance, retry, eject outliers, add trace headers, count and log every request; an admin
//! server (15000); and its config from the operator's stream or from a file, swapped in without
//! dropping a request.
//!
//! The rooms, from the bottom up (each may use only those above it in this list):
//! `telemetry` (metrics, access log, trace headers), `tls` (workload certificate, SPIFFE
//! verifiers), `balance` (endpoint state, balancers, outlier detection), `route` (the route
//! table and retry policies), `config` (the config in force and its sources), `proxy` (the
//! request path), `http1` (the HTTP/1.1 fast path), `listener` (accept, detect, hand to one of
//! the two paths), `probe` (the app's kubelet probes, run for the kubelet), `admin`, `capture` (transparent-capture init), and `args`/`run` (the binary's
//! flags and wiring). See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]

mod admin;
mod args;
mod balance;
#[doc(hidden)]
pub mod bench;
mod capture;
mod coalesce;
mod config;
#[doc(hidden)]
pub mod fuzzing;
mod headers;
mod http1;
mod listener;
mod probe;
mod proxy;
mod route;
mod run;
mod stall;
mod telemetry;
mod tls;
mod wire;

pub use args::{AccessLogMode, Args, InboundMode, Subcommand};
pub use run::{run, Error, Result};

// What other crates (the operator's and the demo's tests, the e2e suite) and the integration
// tests use to embed parts of the proxy.
pub use balance::now_ms;
pub use capture::{install as install_capture, wait_ready};
pub use config::file as config_file;
pub use config::store::{ConfigStore, Source};
pub use config::stream::{self as control, ControlPlane, StreamStatus};
pub use listener::serve as serve_listener;
pub use proxy::{Direction, ProxyContext};
pub use telemetry::access_log::AccessLog;
pub use telemetry::trace::is_valid_traceparent;
pub use tls::{TlsMaterial, TlsStore};
