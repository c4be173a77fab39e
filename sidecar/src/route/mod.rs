//! Where a request goes: the route table compiled from a `ProxyConfig` (hosts, ports, rules,
//! weighted backends, each with its endpoint pool and metric series) and the retry policy
//! attached to each target (which failures are retried, backoff, budget).
//!
//! Depends on `balance` (the pools a target holds) and `telemetry` (the series it counts in).

pub mod retry;
pub mod table;
