//! The Skein control plane: watches TrafficRoutes, OutlierPolicies, RetryPolicies, Services,
//! EndpointSlices and Pods; computes one `ProxyConfig` per workload identity; pushes it to every
//! connected sidecar over the config stream; and (on the leader) reports status conditions and
//! events on every Skein resource.
//!
//! The rooms: `compute` (the pure computation from a snapshot: routes, policies, endpoints,
//! status conditions), `k8s` (watchers, leader election, the status writer), `stream` (the
//! config stream server, its hub, the topology), `identity` (the CA, workload and serving
//! certificates), `admission` (the injecting webhook), `local` (the file-backed control plane),
//! `web` (metrics, health and topology on 8080), `crdgen`, and `args`/`run` (the binary's flags
//! and wiring). See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]

mod admission;
mod args;
mod compute;
pub mod crdgen;
#[doc(hidden)]
pub mod fuzzing;
mod identity;
mod k8s;
mod local;
mod metrics;
mod run;
mod stream;
mod web;

pub use args::{Args, ClusterArgs, IdentityArgs, LocalArgs, StreamArgs, WebhookArgs};
pub use run::{run, run_local, Error, Result};

// What the integration tests, the benchmarks and the demo drive in process.
pub use admission::inject::{CaptureMode, InboundMode, InjectConfig, ProxyResources};
pub use admission::webhook::{router as webhook_router, serve as serve_webhook, WebhookState};
pub use compute::snapshot::{Changes, Snapshot, SnapshotObject};
pub use compute::{compute, compute_incremental, MeshConfig};
pub use identity::ca::{CaFiles, MeshCa, WORKLOAD_LIFETIME};
pub use identity::serving::{serving_names, ServingCert};
pub use local::load_dir;
pub use metrics::{AdmissionLabels, Metrics, SentLabels};
pub use stream::hub::{ConfigHub, IDENTITY_ADMISSION_LIMIT};
pub use stream::server::{serve as serve_stream, serve_with as serve_stream_with, StreamTls};
