//! The config stream (port 15012): the server that authenticates each proxy by its client
//! certificate and streams its config (`server`), the hub that keeps every connection's latest
//! config and acknowledged version (`hub`), and the traffic topology built from what proxies
//! report on the stream (`topology`).
//!
//! Depends on `compute` (the mesh it serves), `identity` (the serving certificate and CA) and
//! `metrics`.

pub mod http2;
pub mod hub;
pub mod server;
pub mod topology;
