//! Outlier detection (OutlierPolicy): an endpoint that fails `consecutiveErrors` times in a row
//! (5xx or connect failure) is ejected for `baseEjectionTime × times ejected`, capped at
//! `maxEjectionTime`, as in Envoy. Never more than `maxEjectionPercent` of a pool's endpoints are
//! ejected at once, except that one failing endpoint among healthy peers can always be ejected.
//! The multiplier decays by one for every `interval` an endpoint stays in rotation.
//!
//! Ejection ends are checked on every pick rather than on an interval sweep, so an endpoint
//! returns as soon as its time is served. All state is atomics on the endpoint: no lock on the
//! request path.

use std::sync::atomic::Ordering;

use skein_api::config::OutlierConfig;

use super::endpoint::EndpointState;

/// What one response or failure said about an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx response or a connect failure.
    Failure,
}

/// An ejection that just happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub duration_ms: u64,
    pub times: u32,
}

/// How many of `n` endpoints may be ejected at once.
pub fn max_ejectable(n: usize, percent: u32) -> usize {
    if percent == 0 || n < 2 {
        return 0;
    }
    (n * percent as usize / 100).max(1)
}

/// Records an outcome for `endpoint`, one of `pool`, and ejects it when the policy says so.
pub fn record(
    config: &OutlierConfig,
    endpoint: &EndpointState,
    pool: &[std::sync::Arc<EndpointState>],
    outcome: Outcome,
    now_ms: u64,
) -> Option<Ejection> {
    let state = &endpoint.outlier;
    if outcome == Outcome::Success {
        state.consecutive.store(0, Ordering::Relaxed);
        return None;
    }
    let failures = state.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
    if failures < config.consecutive_errors || state.is_ejected(now_ms) {
        return None;
    }
    let ejected = pool.iter().filter(|e| e.outlier.is_ejected(now_ms)).count();
    if ejected >= max_ejectable(pool.len(), config.max_ejection_percent) {
        return None;
    }
    // Decay the multiplier by the intervals spent in rotation since the last ejection ended.
    let previous = state.times_ejected.load(Ordering::Relaxed);
    let returned = state.returned_at.load(Ordering::Relaxed).max(state.ejected_until.load(Ordering::Relaxed));
    let healthy_intervals = now_ms.saturating_sub(returned).checked_div(config.interval_ms).unwrap_or(0);
    let times = previous.saturating_sub(u32::try_from(healthy_intervals).unwrap_or(u32::MAX)) + 1;
    let duration_ms = config.base_ejection_ms.saturating_mul(u64::from(times)).min(config.max_ejection_ms);
    let until = now_ms + duration_ms;
    state.times_ejected.store(times, Ordering::Relaxed);
    state.returned_at.store(until, Ordering::Relaxed);
    state.ejected_until.store(until, Ordering::Relaxed);
    state.consecutive.store(0, Ordering::Relaxed);
    Some(Ejection { duration_ms, times })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;

    fn config(percent: u32) -> OutlierConfig {
        OutlierConfig {
            policy: "ns/p".into(),
            consecutive_errors: 3,
            interval_ms: 1_000,
            base_ejection_ms: 30_000,
            max_ejection_ms: 100_000,
            max_ejection_percent: percent,
        }
    }

    fn pool(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n)
            .map(|i| Arc::new(EndpointState::new(SocketAddr::from(([127, 0, 0, 1], 2000 + i as u16)))))
            .collect()
    }

    fn fail(
        cfg: &OutlierConfig,
        pool: &[Arc<EndpointState>],
        i: usize,
        times: u32,
        now: u64,
    ) -> Option<Ejection> {
        let mut last = None;
        for _ in 0..times {
            last = record(cfg, &pool[i], pool, Outcome::Failure, now).or(last);
        }
        last
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let cfg = config(50);
        let p = pool(4);
        assert_eq!(fail(&cfg, &p, 0, 2, 0), None);
        record(&cfg, &p[0], &p, Outcome::Success, 0);
        assert_eq!(fail(&cfg, &p, 0, 2, 0), None, "the count restarted");
        assert_eq!(fail(&cfg, &p, 0, 1, 0), Some(Ejection { duration_ms: 30_000, times: 1 }));
        assert!(p[0].outlier.is_ejected(29_999));
        assert!(!p[0].outlier.is_ejected(30_000), "back after its ejection time");
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_and_is_capped() {
        let cfg = config(50);
        let p = pool(4);
        let mut now = 0;
        let mut durations = Vec::new();
        for _ in 0..5 {
            let e = fail(&cfg, &p, 0, 3, now).expect("ejected");
            durations.push(e.duration_ms);
            now += e.duration_ms; // fails again the moment it returns
        }
        assert_eq!(durations, [30_000, 60_000, 90_000, 100_000, 100_000]);
    }

    #[test]
    fn the_multiplier_decays_while_the_endpoint_stays_healthy() {
        let cfg = config(50);
        let p = pool(4);
        let first = fail(&cfg, &p, 0, 3, 0).unwrap();
        let second = fail(&cfg, &p, 0, 3, first.duration_ms).unwrap();
        assert_eq!(second.times, 2);
        let back = first.duration_ms + second.duration_ms;
        // Two healthy intervals later the multiplier has decayed from 2 to 0: a fresh ejection.
        let third = fail(&cfg, &p, 0, 3, back + 2 * cfg.interval_ms).unwrap();
        assert_eq!(third.times, 1);
    }

    #[test]
    fn max_ejection_percent_holds_but_a_lone_failure_is_always_ejectable() {
        assert_eq!(max_ejectable(10, 50), 5);
        assert_eq!(max_ejectable(3, 10), 1, "one failing endpoint among healthy peers");
        assert_eq!(max_ejectable(1, 100), 0, "a lone endpoint is never ejected");
        assert_eq!(max_ejectable(10, 0), 0);

        let cfg = config(10);
        let p = pool(3);
        assert!(fail(&cfg, &p, 0, 3, 0).is_some());
        assert!(fail(&cfg, &p, 1, 3, 0).is_none(), "10% of 3 allows one ejection at a time");
        assert!(!p[1].outlier.is_ejected(0));
        // Once the first returns, the second can go.
        assert!(fail(&cfg, &p, 1, 1, 30_000).is_some());
    }
}
