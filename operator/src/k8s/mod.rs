//! The operator's side of the Kubernetes API: watchers that fill the snapshot and the loop that
//! recomputes the mesh (`controller`), leader election on a Lease (`leader`), the status writer
//! (`status_writer`), the replicas' reports of their proxies to the leader (`proxy_reports`), identity's Secrets and ConfigMaps (`identity`), and refusals for want of an RBAC permission, said
//! clearly (`permissions`). Thin shells: the
//! decisions are in `compute` and `identity`.
//!
//! Depends on `compute`, `identity`, `stream` (the hub a new mesh is published to) and
//! `metrics`.

pub mod controller;
pub mod identity;
pub mod leader;
pub mod permissions;
pub mod proxy_reports;
pub mod status_writer;
