//! The request path, assembled in one place and read top to bottom:
//!
//! 1. trace headers (`traceparent`, `x-request-id`) ensured;
//! 2. destination decided from the route table (header/path/method rules, weighted backends),
//!    or passthrough to where the client sent it;
//! 3. timeouts (rule and retry deadlines) around
//! 4. retries (budget, backoff, idempotency, 64 KiB replay buffer) around
//! 5. balancing (P2C-EWMA or round robin over endpoints not ejected) and outlier recording
//!    around
//! 6. forwarding over pooled upstream connections, hop-by-hop headers removed (RFC 9110 §7.6.1);
//! 7. metrics and one access-log line.
//!
//! Each step is a small function with its own tests; they are plain async functions rather than
//! boxed tower layers so the hot path allocates as little as possible.
//!
//! Here: the context every request reads and the per-connection facts; `serve` (steps 1, 2
//! and 7 for hyper's requests), `forward` (3–6), `peer` (the mTLS HTTP/2 connections to peer
//! sidecars), `observe` (the outcome of an attempt and of a request, which the HTTP/1 fast path
//! records through too) and `body`. Depends on `route`, `balance`, `config` (the store),
//! `telemetry` and `tls`; never on `http1` or `listener`, which call into it.

pub mod authz;
pub mod body;
mod forward;
pub mod observe;
pub(crate) mod peer;
mod serve;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use skein_api::constants::{PROXY_ADMIN_PORT, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT, PROXY_STATS_PORT};

use crate::config::store::ConfigStore;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{Series, SeriesKey};
use body::ProxyBody;

pub use serve::{error, serve};

pub use crate::headers::{ATTEMPT_HEADER, ERROR_HEADER, INBOUND_PORT, RETRIED_HEADER};

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// App → mesh (15001).
    Outbound,
    /// Mesh → local app (15006).
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// How long a client may take to send a request head, by default.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the request path reads.
pub struct ProxyContext {
    pub store: Arc<ConfigStore>,
    pub client: Client<HttpConnector, ProxyBody>,
    pub access_log: AccessLog,
    /// Where inbound requests go (the app, on the same port).
    pub inbound_target: IpAddr,
    pub connect_timeout: Duration,
    /// Serve plain HTTP/1.1 requests on the fast path ([`crate::http1`]).
    pub fast_path: bool,
    pub passthrough: Arc<Series>,
    pub inbound: Arc<Series>,
    /// Identity material; when present, hops between sidecars are mTLS.
    pub tls: Arc<crate::tls::TlsStore>,
    /// Inbound accepts only mTLS from mesh identities (else plaintext is accepted too).
    pub inbound_strict: bool,
    /// The ports the proxy itself listens on: inbound traffic is never delivered to them, or a
    /// peer could reach the outbound listener (and send as this workload) or the admin server.
    pub own_ports: Vec<u16>,
    /// Requests declaring a larger body are refused with 413 (`None`: no limit).
    pub max_request_body: Option<u64>,
    /// A request head must arrive within this long of its first byte (slowloris).
    pub head_timeout: Duration,
    /// Pooled mTLS HTTP/1.1 connections to peer sidecars, by address and expected identity.
    pub(crate) peers: std::sync::Mutex<peer::PeerConnections>,
    /// The multiplexed hop's connections to peer sidecars.
    pub(crate) mux: crate::wire::mux::client::Pool,
}

impl ProxyContext {
    pub fn new(
        store: Arc<ConfigStore>,
        access_log: AccessLog,
        inbound_target: IpAddr,
        connect_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        let series = |direction, destination: &str| {
            store.shared.metrics.series(SeriesKey {
                direction,
                destination: destination.into(),
                subset: String::new(),
                route: String::new(),
            })
        };
        let passthrough = series("outbound", "passthrough");
        let inbound = series("inbound", "local");
        Self {
            store,
            client,
            access_log,
            inbound_target,
            connect_timeout,
            fast_path: true,
            passthrough,
            inbound,
            tls: Arc::default(),
            inbound_strict: true,
            max_request_body: None,
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            own_ports: vec![PROXY_ADMIN_PORT, PROXY_OUTBOUND_PORT, PROXY_INBOUND_PORT, PROXY_STATS_PORT],
            peers: std::sync::Mutex::default(),
            mux: Default::default(),
        }
    }
}

impl ProxyContext {
    /// Whether inbound traffic may be delivered to the app on `port`.
    pub fn inbound_port_allowed(&self, port: u16) -> bool {
        !self.own_ports.contains(&port)
    }
}

/// Per-connection facts.
#[derive(Clone, Copy, Debug)]
pub struct ConnMeta {
    pub direction: Direction,
    /// The listener's own address (to refuse requests that would loop back into it).
    pub local: Option<SocketAddr>,
    /// The original destination of a transparently redirected connection.
    pub original: Option<SocketAddr>,
}
