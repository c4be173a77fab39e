//! Endpoints and how a request picks one.
//!
//! Every upstream address has one [`EndpointState`], shared by every destination, route and
//! config version that names it, so latency estimates and outlier state survive config swaps.
//! The default balancer is power of two choices over a peak-EWMA of latency × (in-flight + 1)
//! (as in Finagle and linkerd2-proxy): two random endpoints, the cheaper one wins unless their
//! costs are within [`TIE_RATIO`] of each other, when the (random) first one does. Round robin
//! is the alternative. Both skip ejected endpoints and fail open when all are ejected.
//!
//! A latency sample runs from when the request is dispatched on a ready connection to its
//! response: connecting and the mTLS handshake are not the endpoint's latency (linkerd2-proxy
//! balances over ready endpoints only, so its samples exclude them too). A slower sample at
//! most doubles the estimate, and an unused endpoint's estimate decays within about a second,
//! so one slow answer never benches an equal replica for long. See `docs/decisions.md`,
//! "Balancing equal replicas".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use skein_api::config::{LoadBalancer, OutlierConfig};

use crate::outlier::OutlierState;

/// Decay time of the latency estimate towards faster samples.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Decay time of the estimate towards zero while an endpoint is not used: one passed over for
/// a noisy sample is tried again within about a second.
const IDLE_DECAY: Duration = Duration::from_secs(1);
/// A slower sample raises the estimate at once, but at most by this factor: one slow answer
/// (a pause, a cold first request) does not bench an endpoint, and one that stays slow reaches
/// its real latency in a few samples.
const PEAK_STEP: f64 = 2.0;
/// The least estimate a slower sample is stepped up from (100 µs), so an endpoint idle long
/// enough to have decayed to nothing climbs back in a few samples.
const PEAK_FLOOR_NS: f64 = 100_000.0;
/// Latency assumed for an endpoint never measured (so new endpoints get tried, not flooded).
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Two costs closer than this ratio are a tie. At low concurrency the estimates of equal
/// replicas differ by sampling noise alone, and a peak estimate keeps a noisy high sample for
/// seconds: without the band the cheaper one took nearly all the traffic for long stretches.
/// Below 2, so one request more in flight on equal latencies always decides.
pub const TIE_RATIO: f64 = 1.5;

/// Monotonic milliseconds and nanoseconds since the process started.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Live state of one upstream address.
#[derive(Debug)]
pub struct EndpointState {
    /// The app's address (pod IP and target port).
    pub addr: SocketAddr,
    /// `addr` as a URI authority, built once.
    pub authority: http::uri::Authority,
    /// For a meshed endpoint, its sidecar's inbound listener: requests go there over HTTP/2,
    /// naming the app port in [`skein_api::constants::INBOUND_PORT_HEADER`].
    pub via_proxy: Option<(SocketAddr, http::uri::Authority)>,
    /// The identity a meshed endpoint must prove over mTLS.
    pub peer_identity: Option<skein_api::WorkloadIdentity>,
    in_flight: AtomicU32,
    /// Latency estimate in nanoseconds (an `f64` in its bits).
    ewma_bits: AtomicU64,
    stamp_ns: AtomicU64,
    pub outlier: OutlierState,
    /// Idle upstream connections of the HTTP/1 fast path, with when each was last used.
    pub idle: std::sync::Mutex<Vec<(tokio::net::TcpStream, Instant)>>,
}

impl EndpointState {
    pub fn new(addr: SocketAddr) -> Self {
        Self::with_proxy(addr, None, None)
    }

    /// An endpoint reached through the sidecar listening at `proxy`, when there is one.
    pub fn with_proxy(
        addr: SocketAddr,
        proxy: Option<SocketAddr>,
        identity: Option<skein_api::WorkloadIdentity>,
    ) -> Self {
        let authority = |a: SocketAddr| {
            http::uri::Authority::try_from(a.to_string().as_str()).expect("a socket address is an authority")
        };
        Self {
            addr,
            authority: authority(addr),
            via_proxy: proxy.map(|p| (p, authority(p))),
            peer_identity: identity,
            in_flight: AtomicU32::new(0),
            ewma_bits: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(now_ns()),
            outlier: OutlierState::default(),
            idle: std::sync::Mutex::default(),
        }
    }

    /// Peak-EWMA cost: the estimate times the queue. The estimate decays while the endpoint is
    /// not used (as in linkerd2-proxy, faster here: [`IDLE_DECAY`]), so an idle or recovered
    /// endpoint is tried again.
    pub fn cost(&self, now: u64) -> f64 {
        self.estimate(now) * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// The latency estimate at `now`, decayed for the time since the last sample.
    fn estimate(&self, now: u64) -> f64 {
        let estimate = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let idle = now.saturating_sub(self.stamp_ns.load(Ordering::Relaxed)) as f64;
        estimate * (-idle / IDLE_DECAY.as_nanos() as f64).exp()
    }

    /// Counts a request in flight until the returned guard is dropped; its latency sample runs
    /// from now, or from [`InFlight::dispatched`].
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { endpoint: self.clone(), started_ns: now_ns() }
    }

    fn observe(&self, rtt_ns: u64, now: u64) {
        let rtt = rtt_ns as f64;
        let current = self.estimate(now);
        let elapsed = now.saturating_sub(self.stamp_ns.swap(now, Ordering::Relaxed)) as f64;
        // Peak: a slower sample is taken at once (stepped, see PEAK_STEP); faster ones pull
        // the estimate down gradually.
        let next = if rtt > current {
            rtt.min(current.max(PEAK_FLOOR_NS) * PEAK_STEP)
        } else {
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            current * w + rtt * (1.0 - w)
        };
        self.ewma_bits.store(next.to_bits(), Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request in flight to an endpoint; dropping it ends the count and feeds the latency
/// estimate.
pub struct InFlight {
    endpoint: Arc<EndpointState>,
    started_ns: u64,
}

impl InFlight {
    /// The connection is ready and the request goes out now: connecting and handshakes are not
    /// part of the endpoint's latency.
    pub fn dispatched(&mut self) {
        self.started_ns = now_ns();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = now_ns();
        self.endpoint.observe(now.saturating_sub(self.started_ns), now);
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A set of endpoints a request can go to, with how to choose among them.
#[derive(Debug)]
pub struct Pool {
    pub endpoints: Arc<[Arc<EndpointState>]>,
    /// Some endpoint is reached through its sidecar (so not on the HTTP/1 fast path).
    pub meshed: bool,
    pub lb: LoadBalancer,
    pub outlier: Option<OutlierConfig>,
    next: AtomicUsize,
}

/// What [`Pool::pick`] chose.
pub struct Pick {
    pub endpoint: Arc<EndpointState>,
    /// Every endpoint was ejected and the pick ignored ejection.
    pub failed_open: bool,
}

impl Pool {
    pub fn new(
        endpoints: Arc<[Arc<EndpointState>]>,
        lb: LoadBalancer,
        outlier: Option<OutlierConfig>,
    ) -> Self {
        let meshed = endpoints.iter().any(|e| e.via_proxy.is_some());
        Self { endpoints, meshed, lb, outlier, next: AtomicUsize::new(fastrand::usize(..1 << 16)) }
    }

    /// Chooses an endpoint at `now` ([`now_ns`]), or `None` when the pool is empty.
    pub fn pick(&self, now: u64) -> Option<Pick> {
        self.pick_avoiding(now, &[])
    }

    /// Chooses an endpoint other than those in `avoid` (the ones earlier attempts of a request
    /// failed on) while another healthy one exists, as Envoy's `previous_hosts` retry predicate
    /// does: a retry to an endpoint that just failed would most likely fail again.
    pub fn pick_avoiding(&self, now: u64, avoid: &[Arc<EndpointState>]) -> Option<Pick> {
        let now_ms = now / 1_000_000;
        let all = &self.endpoints[..];
        match all.len() {
            0 => return None,
            1 => return Some(Pick { endpoint: all[0].clone(), failed_open: false }),
            _ => {}
        }
        let healthy = |e: &&Arc<EndpointState>| !e.outlier.is_ejected(now_ms);
        let fresh = |e: &&Arc<EndpointState>| !avoid.iter().any(|a| Arc::ptr_eq(e, a));
        let wanted = |e: &&Arc<EndpointState>| healthy(e) && fresh(e);
        // Fast path: draw among all, redraw a few times if we hit an ejected one.
        for _ in 0..4 {
            let choice = match self.lb {
                LoadBalancer::RoundRobin => &all[self.next.fetch_add(1, Ordering::Relaxed) % all.len()],
                LoadBalancer::P2cEwma => p2c(all, now),
            };
            if wanted(&choice) {
                return Some(Pick { endpoint: choice.clone(), failed_open: false });
            }
        }
        // Slow path: many are ejected (or the draws kept finding the avoided one). Choose among
        // the healthy others, else the healthy, else fail open.
        let mut candidates: Vec<Arc<EndpointState>> = all.iter().filter(wanted).cloned().collect();
        if candidates.is_empty() {
            candidates = all.iter().filter(healthy).cloned().collect();
        }
        if candidates.is_empty() {
            // All ejected: fail open, still preferring an endpoint not tried yet.
            let untried: Vec<Arc<EndpointState>> = all.iter().filter(fresh).cloned().collect();
            let pool = if untried.is_empty() { all } else { &untried[..] };
            return Some(Pick { endpoint: p2c(pool, now).clone(), failed_open: true });
        }
        let choice = match self.lb {
            LoadBalancer::RoundRobin => {
                &candidates[self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()]
            }
            LoadBalancer::P2cEwma => p2c(&candidates, now),
        };
        Some(Pick { endpoint: choice.clone(), failed_open: false })
    }
}

fn p2c(all: &[Arc<EndpointState>], now: u64) -> &Arc<EndpointState> {
    if all.len() == 1 {
        return &all[0];
    }
    let a = fastrand::usize(..all.len());
    let mut b = fastrand::usize(..all.len() - 1);
    if b >= a {
        b += 1;
    }
    // `a` is drawn at random, so a tie goes to either with equal chance.
    if all[b].cost(now) * TIE_RATIO < all[a].cost(now) {
        &all[b]
    } else {
        &all[a]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn endpoints(n: usize) -> Arc<[Arc<EndpointState>]> {
        (0..n)
            .map(|i| Arc::new(EndpointState::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))))
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let pool = Pool::new(endpoints(3), LoadBalancer::RoundRobin, None);
        let picks: Vec<u16> = (0..6).map(|_| pool.pick(0).unwrap().endpoint.addr.port()).collect();
        for w in picks.windows(2) {
            assert_ne!(w[0], w[1]);
        }
        assert_eq!(picks[0], picks[3]);
    }

    #[test]
    fn a_retry_avoids_the_endpoints_already_tried_while_another_is_healthy() {
        for lb in [LoadBalancer::RoundRobin, LoadBalancer::P2cEwma] {
            let eps = endpoints(3);
            let pool = Pool::new(eps.clone(), lb, None);
            let tried = [eps[1].clone(), eps[2].clone()];
            for _ in 0..200 {
                assert_eq!(pool.pick_avoiding(0, &tried).unwrap().endpoint.addr, eps[0].addr);
            }
            // With the others ejected, a tried one is still better than failing open.
            let two = endpoints(2);
            two[0].outlier.eject_until(u64::MAX);
            let pool = Pool::new(two.clone(), lb, None);
            let pick = pool.pick_avoiding(0, &[two[1].clone()]).unwrap();
            assert_eq!((pick.endpoint.addr, pick.failed_open), (two[1].addr, false));
            // All ejected: failing open prefers one not tried yet.
            two[1].outlier.eject_until(u64::MAX);
            for _ in 0..50 {
                let pick = pool.pick_avoiding(0, &[two[1].clone()]).unwrap();
                assert_eq!((pick.endpoint.addr, pick.failed_open), (two[0].addr, true));
            }
        }
    }

    #[test]
    fn p2c_prefers_the_endpoint_with_less_in_flight_work() {
        let eps = endpoints(2);
        let pool = Pool::new(eps.clone(), LoadBalancer::P2cEwma, None);
        let _busy: Vec<InFlight> = (0..10).map(|_| eps[0].start()).collect();
        for _ in 0..50 {
            assert_eq!(pool.pick(0).unwrap().endpoint.addr, eps[1].addr);
        }
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let eps = endpoints(2);
        eps[0].observe(50_000_000, now_ns());
        eps[1].observe(1_000_000, now_ns());
        let pool = Pool::new(eps.clone(), LoadBalancer::P2cEwma, None);
        let slow = (0..200).filter(|_| pool.pick(0).unwrap().endpoint.addr == eps[0].addr).count();
        assert_eq!(slow, 0, "with two endpoints P2C always compares both");
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_all_ejected_fails_open() {
        let eps = endpoints(3);
        let pool = Pool::new(eps.clone(), LoadBalancer::RoundRobin, None);
        eps[0].outlier.eject_until(1_000);
        eps[1].outlier.eject_until(1_000);
        for _ in 0..20 {
            let pick = pool.pick(10 * MS).unwrap();
            assert_eq!(pick.endpoint.addr, eps[2].addr);
            assert!(!pick.failed_open);
        }
        let p2c = Pool::new(eps.clone(), LoadBalancer::P2cEwma, None);
        for _ in 0..20 {
            assert_eq!(p2c.pick(10 * MS).unwrap().endpoint.addr, eps[2].addr, "one healthy endpoint left");
        }
        eps[2].outlier.eject_until(1_000);
        assert!(pool.pick(10 * MS).unwrap().failed_open);
        assert!(!pool.pick(2_000 * MS).unwrap().failed_open, "ejections end");
    }

    #[test]
    fn in_flight_is_counted_until_the_guard_drops() {
        let eps = endpoints(1);
        let guard = eps[0].start();
        assert_eq!(eps[0].in_flight(), 1);
        drop(guard);
        assert_eq!(eps[0].in_flight(), 0);
    }

    /// Simulated requests one at a time (as in the demo) every `gap`; latencies of 0.5 to
    /// 2.5 ms times `slow` for the second endpoint, and one answer in fifty 5 ms slower, one in
    /// two hundred 50 ms slower (a pause). Deterministic: a fixed seed and a simulated clock.
    /// Returns how many of `n` went to the first endpoint.
    fn simulate(n: u32, gap: u64, slow: u64, seed: u64) -> u32 {
        fastrand::seed(seed);
        let eps = endpoints(2);
        let pool = Pool::new(eps.clone(), LoadBalancer::P2cEwma, None);
        let (mut now, mut first) = (0u64, 0u32);
        for _ in 0..n {
            now += gap;
            let pick = pool.pick(now).unwrap().endpoint;
            let mut rtt = 500_000 + fastrand::u64(..2_000_000);
            if pick.addr == eps[1].addr {
                rtt *= slow;
            }
            if fastrand::u32(..50) == 0 {
                rtt += 5 * MS;
            }
            if fastrand::u32(..200) == 0 {
                rtt += 50 * MS;
            }
            pick.observe(rtt, now + rtt);
            first += u32::from(pick.addr == eps[0].addr);
        }
        first
    }

    #[test]
    fn equal_replicas_share_the_load_at_low_concurrency() {
        for seed in 1..=5 {
            // 125 and 19 requests per second (the demo's scenario and its summary's rate to v2).
            for gap in [8 * MS, 52 * MS] {
                let first = simulate(2_000, gap, 1, seed);
                assert!((800..=1_200).contains(&first), "seed {seed}, gap {gap}: {first} of 2000");
            }
        }
    }

    #[test]
    fn a_slower_replica_gets_little_traffic_even_one_request_at_a_time() {
        for seed in 1..=5 {
            let first = simulate(2_000, 8 * MS, 3, seed);
            assert!(first >= 1_300, "seed {seed}: only {first} of 2000 to the faster replica");
        }
    }

    #[test]
    fn one_slow_answer_steps_the_estimate_and_is_soon_forgotten() {
        let eps = endpoints(1);
        eps[0].observe(MS, 0);
        eps[0].observe(50 * MS, MS);
        let after = eps[0].estimate(MS);
        assert!(after <= 2.0 * MS as f64 + 1.0, "one sample at most doubles the estimate: {after}");
        assert!(eps[0].estimate(3_000 * MS) < 0.1 * MS as f64, "idle for 3 s, it is tried again");
        // A replica that stays slow reaches its latency in a few samples.
        for i in 0..6 {
            eps[0].observe(50 * MS, (2 + i) * MS);
        }
        assert!(eps[0].estimate(8 * MS) > 45.0 * MS as f64);
    }

    #[test]
    fn connecting_is_not_part_of_the_latency_sample() {
        let eps = endpoints(1);
        let mut guard = eps[0].start();
        std::thread::sleep(Duration::from_millis(30)); // a slow handshake
        guard.dispatched();
        drop(guard);
        let estimate = eps[0].cost(now_ns());
        assert!(estimate < 20e6, "the handshake was counted: {estimate} ns");
    }
}
