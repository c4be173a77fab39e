//! Skein's benchmark tools. `loadgen` is the load generator `bench/run.sh` drives against a
//! direct upstream, skein-proxy, Envoy, HAProxy and nginx; the upstream itself is nginx (see
//! `bench/peers/upstream-nginx.conf`), so every proxy forwards to the same, well-known server.
//!
//! The pieces that decide what a number means — the open-loop schedule, the target, the summary —
//! are plain code with unit tests; only `loadgen` touches sockets.
#![forbid(unsafe_code)]

pub mod loadgen;
pub mod report;
pub mod schedule;
pub mod target;
