//! One upstream address's live state, shared by the balancer and the outlier detector: its
//! latency estimate and in-flight count, its outlier state, and the idle connections of the
//! HTTP/1 fast path. Also the process's monotonic clock that every timestamp here uses.
//! Depends on nothing else in the crate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
    /// For a meshed endpoint, its sidecar's inbound listener: requests go there over HTTP/1.1 (mTLS),
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
    /// Idle mTLS connections of the HTTP/1 fast path to a meshed endpoint's sidecar, each made
    /// for `peer_identity` (an endpoint's state is keyed by it).
    pub idle_tls: std::sync::Mutex<Vec<(PeerStream, Instant)>>,
}

/// An mTLS connection to a peer sidecar.
pub type PeerStream = Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

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
            idle_tls: std::sync::Mutex::default(),
        }
    }

    /// Peak-EWMA cost: the estimate times the queue. The estimate decays while the endpoint is
    /// not used (as in linkerd2-proxy, faster here: [`IDLE_DECAY`]), so an idle or recovered
    /// endpoint is tried again.
    pub fn cost(&self, now: u64) -> f64 {
        self.estimate(now) * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// The latency estimate at `now`, decayed for the time since the last sample.
    pub(super) fn estimate(&self, now: u64) -> f64 {
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

    pub(super) fn observe(&self, rtt_ns: u64, now: u64) {
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

/// Outlier state of one endpoint.
#[derive(Debug, Default)]
pub struct OutlierState {
    pub(super) consecutive: AtomicU32,
    /// Monotonic ms until which the endpoint is ejected; 0 when in rotation.
    pub(super) ejected_until: AtomicU64,
    pub(super) times_ejected: AtomicU32,
    /// When the last ejection ended (for the multiplier's decay).
    pub(super) returned_at: AtomicU64,
}

impl OutlierState {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Ejects until `until_ms` (tests and the detector).
    pub fn eject_until(&self, until_ms: u64) {
        self.ejected_until.store(until_ms, Ordering::Relaxed);
    }

    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }
}
