//! Retries (RetryPolicy): which failures are retried, the backoff between tries, and the budget
//! that caps the extra load retries add.
//!
//! The budget works like Linkerd's: over a sliding 10 s window, retries may add `percent` of
//! the original requests, plus `minRetriesPerSecond × 10` so that quiet callers can still retry.
//! Time is passed in, so the logic is tested without sleeping.

use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use skein_api::config::RetryConfig;

/// Length of the budget window.
const WINDOW_SECS: u64 = 10;

/// Failure classes, as bits.
pub mod on {
    pub const SERVER_ERROR: u8 = 1;
    pub const GATEWAY_ERROR: u8 = 2;
    pub const RESET: u8 = 4;
    pub const REFUSED: u8 = 8;
    pub const CONNECT_FAILURE: u8 = 16;
    pub const STATUS_CODES: u8 = 32;
}

/// A retry policy compiled for the request path.
#[derive(Debug)]
pub struct RetrySettings {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub timeout: Option<Duration>,
    pub on: u8,
    pub status_codes: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub non_idempotent: bool,
    pub budget: std::sync::Arc<RetryBudget>,
}

impl RetrySettings {
    pub fn compile(config: &RetryConfig, budget: std::sync::Arc<RetryBudget>) -> Self {
        let on = config.retry_on.iter().fold(0u8, |bits, name| {
            bits | match name.as_str() {
                "5xx" => on::SERVER_ERROR,
                "gateway-error" => on::GATEWAY_ERROR,
                "reset" => on::RESET,
                "refused" => on::REFUSED,
                "connect-failure" => on::CONNECT_FAILURE,
                "retriable-status-codes" => on::STATUS_CODES,
                _ => 0,
            }
        });
        Self {
            attempts: config.attempts,
            per_try_timeout: config.per_try_timeout_ms.map(Duration::from_millis),
            timeout: config.timeout_ms.map(Duration::from_millis),
            on,
            status_codes: config.retriable_status_codes.clone(),
            backoff_base: Duration::from_millis(config.backoff_base_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms.max(config.backoff_base_ms)),
            non_idempotent: config.retry_non_idempotent,
            budget,
        }
    }

    /// Whether this method may be retried at all (RFC 9110 §9.2.2 idempotent methods).
    pub fn method_allowed(&self, method: &Method) -> bool {
        self.non_idempotent
            || matches!(
                *method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
            )
    }

    /// [`Self::method_allowed`] for a method as text.
    pub fn method_allowed_str(&self, method: &str) -> bool {
        Method::from_bytes(method.as_bytes()).is_ok_and(|m| self.method_allowed(&m))
    }

    /// Whether a response with this status is retried.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        (self.on & on::SERVER_ERROR != 0 && status.is_server_error())
            || (self.on & on::GATEWAY_ERROR != 0 && matches!(code, 502..=504))
            || (self.on & on::STATUS_CODES != 0 && self.status_codes.contains(&code))
    }

    /// Whether a failure without a response is retried.
    pub fn retries_failure(&self, failure: Failure) -> bool {
        match failure {
            Failure::Refused => self.on & (on::REFUSED | on::CONNECT_FAILURE) != 0,
            Failure::ConnectFailure => self.on & on::CONNECT_FAILURE != 0,
            Failure::Reset => self.on & on::RESET != 0,
            Failure::Timeout => self.on & (on::SERVER_ERROR | on::GATEWAY_ERROR) != 0,
            Failure::ClientBody => false,
        }
    }

    /// Backoff before retry `n` (1-based): uniform in [0, min(max, base × 2ⁿ⁻¹)] ("full jitter").
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling =
            self.backoff_base.saturating_mul(1u32 << (n.saturating_sub(1)).min(20)).min(self.backoff_max);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Why an attempt produced no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // `ConnectFailure` is retryOn's `connect-failure`
pub enum Failure {
    /// The endpoint refused the connection.
    Refused,
    /// Connecting failed otherwise (timeout, unreachable).
    ConnectFailure,
    /// The connection broke before a response arrived.
    Reset,
    /// The per-try timeout fired.
    Timeout,
    /// The client's request body was malformed or cut short: the client's fault, never the
    /// endpoint's (not retried, not counted against it).
    ClientBody,
}

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

/// The retry budget of one policy.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    min_per_second: u64,
    buckets: Mutex<[Bucket; WINDOW_SECS as usize]>,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        Self {
            percent: u64::from(percent),
            min_per_second: u64::from(min_per_second),
            buckets: Mutex::new([Bucket::default(); WINDOW_SECS as usize]),
        }
    }

    fn with_bucket<T>(
        &self,
        now_secs: u64,
        f: impl FnOnce(&mut [Bucket; WINDOW_SECS as usize], usize) -> T,
    ) -> T {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let i = (now_secs % WINDOW_SECS) as usize;
        if buckets[i].second != now_secs {
            buckets[i] = Bucket { second: now_secs, requests: 0, retries: 0 };
        }
        f(&mut buckets, i)
    }

    /// Counts an original request.
    pub fn deposit(&self, now_secs: u64) {
        self.with_bucket(now_secs, |b, i| b[i].requests += 1);
    }

    /// Takes one retry from the budget if it allows one.
    pub fn try_withdraw(&self, now_secs: u64) -> bool {
        self.with_bucket(now_secs, |b, i| {
            let live = b.iter().filter(|x| x.second + WINDOW_SECS > now_secs);
            let (requests, retries) = live.fold((0, 0), |(q, r), x| (q + x.requests, r + x.retries));
            let allowed = requests * self.percent / 100 + self.min_per_second * WINDOW_SECS;
            if retries < allowed {
                b[i].retries += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(on: &[&str]) -> RetrySettings {
        RetrySettings::compile(
            &RetryConfig {
                policy: "ns/p".into(),
                attempts: 2,
                per_try_timeout_ms: None,
                timeout_ms: None,
                retry_on: on.iter().map(|s| s.to_string()).collect(),
                retriable_status_codes: vec![409],
                backoff_base_ms: 25,
                backoff_max_ms: 250,
                budget_percent: 20,
                budget_min_per_second: 10,
                retry_non_idempotent: false,
            },
            std::sync::Arc::new(RetryBudget::new(20, 10)),
        )
    }

    #[test]
    fn retry_on_classes() {
        let s = settings(&["gateway-error", "reset"]);
        assert!(s.retries_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!s.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(s.retries_failure(Failure::Reset));
        assert!(!s.retries_failure(Failure::Refused));
        let s = settings(&["5xx", "retriable-status-codes", "connect-failure"]);
        assert!(s.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(s.retries_status(StatusCode::CONFLICT));
        assert!(!s.retries_status(StatusCode::NOT_FOUND));
        assert!(s.retries_failure(Failure::Refused), "a refusal is a connect failure");
        assert!(s.retries_failure(Failure::ConnectFailure));
    }

    #[test]
    fn only_idempotent_methods_unless_allowed() {
        let mut s = settings(&["5xx"]);
        assert!(s.method_allowed(&Method::GET));
        assert!(s.method_allowed(&Method::PUT));
        assert!(!s.method_allowed(&Method::POST));
        s.non_idempotent = true;
        assert!(s.method_allowed(&Method::POST));
    }

    #[test]
    fn backoff_is_jittered_under_an_exponential_ceiling() {
        let s = settings(&["5xx"]);
        for n in 1..8 {
            let ceiling = Duration::from_millis((25u64 << (n - 1)).min(250));
            for _ in 0..50 {
                assert!(s.backoff(n) <= ceiling);
            }
        }
    }

    #[test]
    fn the_budget_caps_retries_at_a_share_of_requests_plus_a_floor() {
        let budget = RetryBudget::new(20, 1);
        // Floor: 1/s over a 10 s window = 10 retries with no traffic at all.
        let floor = (0..100).filter(|_| budget.try_withdraw(0)).count();
        assert_eq!(floor, 10);
        // 100 requests add 20 more.
        for _ in 0..100 {
            budget.deposit(1);
        }
        let more = (0..100).filter(|_| budget.try_withdraw(1)).count();
        assert_eq!(more, 20);
        // Ten seconds later the window has moved on: the old retries no longer count.
        let later = (0..100).filter(|_| budget.try_withdraw(12)).count();
        assert_eq!(later, 10, "only the floor is left once the requests age out");
    }
}
