//! The observe step that both HTTP paths (hyper's and the HTTP/1 fast path) run, once: after
//! each attempt the outlier detector hears how its endpoint did, and after each request its
//! series counts it and the access log gets its line.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use crate::balance::outlier::{self, Outcome};
use crate::balance::{now_ms, EndpointState, Pool};
use crate::telemetry::access_log::{rfc3339, AccessLog, Entry};
use crate::telemetry::metrics::Series;

/// One attempt on `endpoint` of `pool` ended; `failed` is a 5xx or no answer at all. An
/// ejection is counted in `series` and logged.
pub fn attempt(pool: &Pool, endpoint: &EndpointState, failed: bool, series: &Series) {
    let Some(cfg) = &pool.outlier else { return };
    let outcome = if failed { Outcome::Failure } else { Outcome::Success };
    if let Some(ejection) = outlier::record(cfg, endpoint, &pool.endpoints, outcome, now_ms()) {
        series.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(endpoint = %endpoint.addr, ms = ejection.duration_ms, times = ejection.times, "outlier ejected");
    }
}

/// What the access log says of a finished request, besides its time and duration.
pub struct Finished<'a> {
    pub direction: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// 0 when the exchange broke after the response had started (not counted in `series`).
    pub status: u16,
    pub upstream: &'a str,
    pub retries: u32,
    pub trace_id: &'a str,
    /// The inbound authorization decision (see [`super::authz`]); empty when none was made.
    pub authz: &'a str,
}

/// A request that started at `started` is done: counted in `series` and logged.
pub fn request(log: &AccessLog, series: &Series, started: Instant, done: Finished<'_>) {
    let elapsed = started.elapsed();
    if done.status != 0 {
        series.record(done.status, elapsed);
    }
    if log.enabled() {
        log.log(&Entry {
            time: rfc3339(SystemTime::now()),
            direction: done.direction,
            method: done.method,
            authority: done.authority,
            path: done.path,
            status: done.status,
            duration_ms: elapsed.as_secs_f64() * 1e3,
            upstream: done.upstream,
            retries: done.retries,
            trace_id: done.trace_id,
            authz: done.authz,
        });
    }
}
