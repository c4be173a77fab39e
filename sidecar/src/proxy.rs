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

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;

use crate::access_log::{rfc3339, AccessLog, Entry};
use crate::balance::{now_ms, now_ns, EndpointState, InFlight};
use crate::body::{buffer, Buffered, ProxyBody, RETRY_BUFFER_LIMIT};
use crate::config_store::ConfigStore;
use crate::metrics::{Series, SeriesKey};
use crate::outlier::{self, Outcome};
use crate::retry::Failure;
use crate::routes::{NoTarget, Target};
use crate::trace;

/// See [`skein_api::constants::INBOUND_PORT_HEADER`].
pub static INBOUND_PORT: HeaderName = HeaderName::from_static(skein_api::constants::INBOUND_PORT_HEADER);
/// Request header telling the upstream which attempt this is (1 = first retry).
pub static ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-skein-attempt");
/// Response header set when the proxy retried: an outer proxy that sees it does not retry
/// again, so retries never multiply across hops.
pub static RETRIED_HEADER: HeaderName = HeaderName::from_static("x-skein-retries");
/// Response header naming why the proxy itself answered with an error.
pub static ERROR_HEADER: HeaderName = HeaderName::from_static("x-skein-error");

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

/// Everything the request path reads.
pub struct ProxyContext {
    pub store: Arc<ConfigStore>,
    pub client: Client<HttpConnector, ProxyBody>,
    pub h2_client: Client<HttpConnector, ProxyBody>,
    pub access_log: AccessLog,
    /// Where inbound requests go (the app, on the same port).
    pub inbound_target: IpAddr,
    pub connect_timeout: Duration,
    /// Serve plain HTTP/1.1 requests on the fast path ([`crate::h1`]).
    pub fast_path: bool,
    pub passthrough: Arc<Series>,
    pub inbound: Arc<Series>,
    /// Identity material; when present, hops between sidecars are mTLS.
    pub tls: Arc<crate::tls::TlsStore>,
    /// Inbound accepts only mTLS from mesh identities (else plaintext is accepted too).
    pub inbound_strict: bool,
    /// One multiplexed mTLS HTTP/2 connection per peer sidecar and expected identity.
    peers: std::sync::Mutex<PeerConnections>,
    /// Held while a new peer connection is made, so concurrent first requests share one.
    peer_connect: tokio::sync::Mutex<()>,
}

/// Connections to peer sidecars, by address and the identity they proved.
type PeerConnections = std::collections::HashMap<
    SocketAddr,
    (skein_api::WorkloadIdentity, hyper::client::conn::http2::SendRequest<ProxyBody>),
>;

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
            .build(connector.clone());
        // Proxy to proxy: one multiplexed HTTP/2 connection per peer sidecar.
        let h2_client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(90))
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
            h2_client,
            access_log,
            inbound_target,
            connect_timeout,
            fast_path: true,
            passthrough,
            inbound,
            tls: Arc::default(),
            inbound_strict: true,
            peers: std::sync::Mutex::default(),
            peer_connect: tokio::sync::Mutex::const_new(()),
        }
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

/// Where one request is sent.
enum Upstream<'t> {
    /// A mesh destination: balanced, retried, ejected.
    Mesh(&'t Target),
    /// A fixed address (passthrough, or the local app for inbound).
    Fixed(Authority, &'t Arc<Series>),
}

/// What forwarding produced.
struct Forwarded {
    response: Response<ProxyBody>,
    retries: u32,
    upstream: Option<String>,
}

/// Serves one request (hyper's service function).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    conn: ConnMeta,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let trace_id = trace::ensure(req.headers_mut());
    let authority = authority_of(&req);
    let active = ctx.store.current();

    let (mut parts, body) = req.into_parts();
    let decided = match (&authority, conn.direction) {
        (None, _) if conn.original.is_none() => {
            Err(error(StatusCode::BAD_REQUEST, "missing-host", "the request names no host"))
        }
        (_, Direction::Inbound) => {
            // The app port: the connection's original destination (transparent capture), else
            // what the calling sidecar named, else the authority's port.
            let named = parts
                .headers
                .remove(&INBOUND_PORT)
                .and_then(|v| v.to_str().ok().and_then(|v| v.parse().ok()));
            let port = conn
                .original
                .map(|o| o.port())
                .or(named)
                .or_else(|| authority.as_ref().and_then(Authority::port_u16))
                .unwrap_or(80);
            Ok(Upstream::Fixed(authority_for(SocketAddr::new(ctx.inbound_target, port)), &ctx.inbound))
        }
        (_, Direction::Outbound) => {
            let host = authority.as_ref().map(Authority::host);
            let port = authority.as_ref().and_then(Authority::port_u16);
            let resolved = match &active {
                Some(a) => a.table.resolve(host, port, conn.original, &parts),
                None => Err(NoTarget::Passthrough),
            };
            match resolved {
                Ok(target) => Ok(Upstream::Mesh(target)),
                Err(NoTarget::Passthrough) => match (conn.original, &authority) {
                    (Some(original), _) => Ok(Upstream::Fixed(authority_for(original), &ctx.passthrough)),
                    (None, Some(a)) if addresses_listener(a, conn.local) => Err(error(
                        StatusCode::LOOP_DETECTED,
                        "loop",
                        "the request is addressed to the proxy itself",
                    )),
                    (None, Some(a)) => Ok(Upstream::Fixed(with_default_port(a), &ctx.passthrough)),
                    (None, None) => {
                        Err(error(StatusCode::BAD_REQUEST, "missing-host", "the request names no host"))
                    }
                },
                Err(NoTarget::NoSuchPort { destination, port }) => Err(error(
                    StatusCode::BAD_GATEWAY,
                    "no-such-port",
                    &format!("Service {destination} has no port {port}"),
                )),
                Err(NoTarget::NoRuleMatched { route }) => Err(error(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    &format!("no rule of route {route} matches the request"),
                )),
            }
        }
    };

    let (forwarded, series) = match decided {
        Err(response) => (Forwarded { response, retries: 0, upstream: None }, ctx.passthrough.clone()),
        Ok(upstream) => {
            let series = match &upstream {
                Upstream::Mesh(t) => t.series.clone(),
                Upstream::Fixed(_, s) => (*s).clone(),
            };
            let upgrade = parts
                .extensions
                .remove::<OnUpgrade>()
                .filter(|_| parts.method == Method::CONNECT || is_upgrade(&parts));
            if parts.method == Method::CONNECT {
                (tunnel(upgrade, &upstream), series)
            } else {
                // Keep the authority the client used: HTTP/2 carries it in the URI only.
                if !parts.headers.contains_key(header::HOST) {
                    if let Some(a) = &authority {
                        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                            parts.headers.insert(header::HOST, v);
                        }
                    }
                }
                (forward(&ctx, &mut parts, body, &upstream, upgrade).await, series)
            }
        }
    };

    let status = forwarded.response.status().as_u16();
    series.record(status, started.elapsed());
    if ctx.access_log.enabled() {
        ctx.access_log.log(&Entry {
            time: rfc3339(SystemTime::now()),
            direction: conn.direction.as_str(),
            method: parts.method.as_str(),
            authority: authority.as_ref().map_or("", Authority::as_str),
            path: parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
            status,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            upstream: forwarded.upstream.as_deref().unwrap_or(""),
            retries: forwarded.retries,
            trace_id: trace_id.to_str().unwrap_or_default(),
        });
    }
    Ok(forwarded.response)
}

fn authority_of(req: &Request<Incoming>) -> Option<Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).and_then(|h| h.parse().ok())
}

fn authority_for(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string().as_str()).expect("a socket address is an authority")
}

/// Whether `a` names the listener the request came in on.
fn addresses_listener(a: &Authority, local: Option<SocketAddr>) -> bool {
    let (Some(local), Ok(ip)) = (local, a.host().trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>())
    else {
        return false;
    };
    a.port_u16().unwrap_or(80) == local.port()
        && (ip == local.ip() || ip.is_loopback() || local.ip().is_unspecified())
}

fn with_default_port(a: &Authority) -> Authority {
    if a.port().is_some() {
        a.clone()
    } else {
        Authority::try_from(format!("{}:80", a.host()).as_str()).unwrap_or_else(|_| a.clone())
    }
}

/// A response the proxy makes itself.
pub fn error(status: StatusCode, code: &'static str, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::text(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(&ERROR_HEADER, HeaderValue::from_static(code));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed set and every header the
/// `Connection` header names. `keep_upgrade` keeps `Connection: upgrade` and `Upgrade` for a
/// protocol switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::PROXY_AUTHORIZATION] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade(parts: &Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Builds the request for one attempt.
fn upstream_request(
    parts: &Parts,
    headers: HeaderMap,
    to: &Authority,
    body: ProxyBody,
    attempt: u32,
    upgrade: bool,
) -> Request<ProxyBody> {
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = Uri::builder().scheme(Scheme::HTTP).authority(to.clone()).path_and_query(path);
    if parts.method == Method::OPTIONS && parts.uri.path() == "*" {
        uri = Uri::builder().scheme(Scheme::HTTP).authority(to.clone()).path_and_query("*");
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri.build().expect("valid parts");
    *req.headers_mut() = headers;
    strip_hop_by_hop(req.headers_mut(), upgrade);
    if attempt > 0 {
        req.headers_mut().insert(&ATTEMPT_HEADER, HeaderValue::from(attempt));
    }
    req
}

/// Classifies a client error.
fn failure_of(e: &hyper_util::client::legacy::Error) -> Failure {
    if e.is_connect() {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Failure::Refused;
                }
            }
            source = s.source();
        }
        return Failure::ConnectFailure;
    }
    Failure::Reset
}

fn failure_response(f: Failure) -> Response<ProxyBody> {
    match f {
        Failure::Refused => {
            error(StatusCode::SERVICE_UNAVAILABLE, "connect-refused", "upstream refused the connection")
        }
        Failure::ConnectFailure => {
            error(StatusCode::SERVICE_UNAVAILABLE, "connect-failure", "could not connect upstream")
        }
        Failure::Reset => error(
            StatusCode::BAD_GATEWAY,
            "upstream-reset",
            "upstream closed the connection before responding",
        ),
        Failure::Timeout => error(StatusCode::GATEWAY_TIMEOUT, "timeout", "upstream did not respond in time"),
    }
}

/// Steps 3–6: timeouts around retries around balancing around forwarding. `upgrade` is the
/// downstream connection's upgrade handle for a protocol switch (WebSocket): such a request is
/// sent once and, on `101`, both connections are spliced.
async fn forward(
    ctx: &ProxyContext,
    parts: &mut Parts,
    body: Incoming,
    upstream: &Upstream<'_>,
    upgrade: Option<OnUpgrade>,
) -> Forwarded {
    let target = match upstream {
        Upstream::Fixed(to, _) => {
            let headers = std::mem::take(&mut parts.headers);
            let req = upstream_request(parts, headers, to, ProxyBody::Incoming(body), 0, upgrade.is_some());
            let response = match ctx.client.request(req).await {
                Ok(r) => finish_response(r, 0, upgrade),
                Err(e) => failure_response(failure_of(&e)),
            };
            return Forwarded { response, retries: 0, upstream: Some(to.to_string()) };
        }
        Upstream::Mesh(t) => *t,
    };
    if upgrade.is_some() {
        let Some(pick) = target.pool.pick(now_ns()) else { return no_endpoints(0) };
        let to = pick.endpoint.via_proxy.as_ref().map_or(&pick.endpoint.authority, |(_, a)| a).clone();
        let headers = std::mem::take(&mut parts.headers);
        let mut req = upstream_request(parts, headers, &to, ProxyBody::Incoming(body), 0, true);
        if pick.endpoint.via_proxy.is_some() {
            req.headers_mut().insert(&INBOUND_PORT, HeaderValue::from(pick.endpoint.addr.port()));
        }
        let result = send_upgrade(ctx, &pick.endpoint, req).await;
        count_transport(&target.series, result.as_ref().ok().map(|sent| sent.over_mtls));
        let response = match result {
            Ok(sent) => finish_response(sent.response, 0, upgrade),
            Err(f) => failure_response(f),
        };
        return Forwarded { response, retries: 0, upstream: Some(to.to_string()) };
    }

    let retry = target.retry.as_ref().filter(|r| r.attempts > 0 && r.method_allowed(&parts.method));
    let now_secs = now_ms() / 1000;
    if let Some(r) = retry {
        r.budget.deposit(now_secs);
    }
    let mut body = match retry {
        Some(_) => buffer(body, RETRY_BUFFER_LIMIT).await,
        None => Buffered::OneShot(ProxyBody::Incoming(body)),
    };
    let overall = match (target.timeout, retry.and_then(|r| r.timeout)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let deadline = overall.map(|d| tokio::time::Instant::now() + d);

    let mut attempt = 0u32;
    // Endpoints an attempt failed on: retries go elsewhere while they can.
    let mut tried: Vec<Arc<EndpointState>> = Vec::new();
    loop {
        let Some(pick) = target.pool.pick_avoiding(now_ns(), &tried) else {
            return no_endpoints(attempt);
        };
        if pick.failed_open {
            target.series.fail_open.fetch_add(1, Ordering::Relaxed);
        }
        let endpoint = pick.endpoint;
        // A meshed endpoint is reached through its sidecar, over HTTP/2.
        let to = endpoint.via_proxy.as_ref().map_or(&endpoint.authority, |(_, a)| a).clone();
        // Headers are copied only while another attempt may need them.
        let headers = if retry.is_some() && body.replayable() {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let mut req = upstream_request(parts, headers, &to, body.take(), attempt, false);
        if endpoint.via_proxy.is_some() {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().insert(&INBOUND_PORT, HeaderValue::from(endpoint.addr.port()));
        }
        let per_try = retry.and_then(|r| r.per_try_timeout);
        let limit = match (per_try.map(|p| tokio::time::Instant::now() + p), deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut in_flight = endpoint.start();
        let result = match limit {
            Some(at) => match tokio::time::timeout_at(at, send(ctx, &endpoint, req, &mut in_flight)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout),
            },
            None => send(ctx, &endpoint, req, &mut in_flight).await,
        };
        drop(in_flight);
        let over_mtls = result.as_ref().ok().map(|sent| sent.over_mtls);
        let result = result.map(|sent| sent.response);

        let failed = match &result {
            Ok(r) => r.status().is_server_error(),
            Err(_) => true,
        };
        if let Some(cfg) = &target.pool.outlier {
            let outcome = if failed { Outcome::Failure } else { Outcome::Success };
            if let Some(ejection) = outlier::record(cfg, &endpoint, &target.pool.endpoints, outcome, now_ms())
            {
                target.series.ejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %endpoint.addr, ms = ejection.duration_ms, times = ejection.times, "outlier ejected");
            }
        }

        let retryable = match (&result, retry) {
            (_, None) => false,
            (Ok(r), Some(s)) => s.retries_status(r.status()) && !r.headers().contains_key(&RETRIED_HEADER),
            (Err(f), Some(s)) => s.retries_failure(*f),
        };
        let more = retry.is_some_and(|r| attempt < r.attempts) && body.replayable();
        if retryable && more {
            let settings = retry.expect("retryable implies a policy");
            let backoff = settings.backoff(attempt + 1);
            let fits = deadline.is_none_or(|d| tokio::time::Instant::now() + backoff < d);
            if fits && settings.budget.try_withdraw(now_ms() / 1000) {
                target.series.retries.fetch_add(1, Ordering::Relaxed);
                attempt += 1;
                tried.push(endpoint);
                tokio::time::sleep(backoff).await;
                continue;
            }
            if fits {
                target.series.retries_skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Counted once per request, by the answer that is returned.
        count_transport(&target.series, over_mtls);
        let response = match result {
            Ok(r) => finish_response(r, attempt, None),
            Err(Failure::Timeout) if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                error(StatusCode::GATEWAY_TIMEOUT, "timeout", "the request timed out")
            }
            Err(f) => failure_response(f),
        };
        return Forwarded { response, retries: attempt, upstream: Some(to.to_string()) };
    }
}

fn no_endpoints(retries: u32) -> Forwarded {
    Forwarded {
        response: error(StatusCode::SERVICE_UNAVAILABLE, "no-endpoints", "the destination has no endpoints"),
        retries,
        upstream: None,
    }
}

/// Counts how the answer to a request travelled: over mTLS, in plaintext, or (`None`) not at
/// all, when the proxy answered itself.
fn count_transport(series: &Series, over_mtls: Option<bool>) {
    match over_mtls {
        Some(true) => series.mtls.fetch_add(1, Ordering::Relaxed),
        Some(false) => series.plaintext.fetch_add(1, Ordering::Relaxed),
        None => 0,
    };
}

/// An attempt's answer, and whether it came over mTLS from the destination's sidecar.
struct Sent {
    response: Response<Incoming>,
    over_mtls: bool,
}

/// Sends one attempt: plain HTTP/1.1 to an app endpoint, or HTTP/2 to a meshed endpoint's
/// sidecar — over mTLS, verifying the peer's SPIFFE ID, when this sidecar has an identity.
async fn send(
    ctx: &ProxyContext,
    endpoint: &EndpointState,
    req: Request<ProxyBody>,
    in_flight: &mut InFlight,
) -> Result<Sent, Failure> {
    let client = match (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current()) {
        (Some((peer, _)), Some(identity), Some(material)) => {
            let mut sender = peer_connection(ctx, *peer, identity, &material).await?;
            let mut req = req;
            // HTTP/2 carries the authority in the URI: the original one, for the app's Host.
            if let Some(host) = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok())
            {
                let path =
                    req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
                if let Ok(uri) =
                    Uri::builder().scheme(Scheme::HTTPS).authority(host).path_and_query(path).build()
                {
                    *req.uri_mut() = uri;
                }
            }
            in_flight.dispatched();
            let response = sender.send_request(req).await.map_err(|_| {
                // A broken connection is replaced on the next request.
                ctx.peers.lock().unwrap_or_else(|p| p.into_inner()).remove(peer);
                Failure::Reset
            })?;
            return Ok(Sent { response, over_mtls: true });
        }
        (Some(_), _, _) => &ctx.h2_client,
        (None, _, _) => &ctx.client,
    };
    let response = client.request(req).await.map_err(|e| failure_of(&e))?;
    Ok(Sent { response, over_mtls: false })
}

/// The multiplexed connection to a peer sidecar, made (TCP, mTLS, HTTP/2) on first use.
async fn peer_connection(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    material: &crate::tls::TlsMaterial,
) -> Result<hyper::client::conn::http2::SendRequest<ProxyBody>, Failure> {
    // Looked up per request: no allocation, a short lock.
    let live = |ctx: &ProxyContext| {
        let peers = ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&peer).filter(|(id, s)| id == identity && !s.is_closed()).map(|(_, s)| s.clone())
    };
    if let Some(sender) = live(ctx) {
        return Ok(sender);
    }
    // One connection per peer: whoever comes second waits for the first and shares it.
    let _connecting = ctx.peer_connect.lock().await;
    if let Some(sender) = live(ctx) {
        return Ok(sender);
    }
    let tls =
        connect_peer(ctx, peer, identity, material.client_for(&identity.spiffe_id(&material.trust_domain)))
            .await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|_| Failure::ConnectFailure)?;
    tokio::spawn(conn);
    ctx.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, (identity.clone(), sender.clone()));
    Ok(sender)
}

/// A TCP connection to a peer sidecar wrapped in mTLS, the peer's certificate checked for
/// `identity`'s SPIFFE ID.
async fn connect_peer(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Failure> {
    let tcp = tokio::time::timeout(ctx.connect_timeout, tokio::net::TcpStream::connect(peer))
        .await
        .map_err(|_| Failure::ConnectFailure)?
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Failure::Refused
            } else {
                Failure::ConnectFailure
            }
        })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from("skein-peer.invalid").expect("a valid name");
    match tokio::time::timeout(ctx.connect_timeout, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => {
            ctx.tls.handshakes.fetch_add(1, Ordering::Relaxed);
            Ok(tls)
        }
        Ok(Err(e)) => {
            ctx.tls.handshake_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, expected = %identity, error = %e, "mTLS handshake with a peer sidecar failed");
            Err(Failure::ConnectFailure)
        }
        Err(_) => {
            ctx.tls.handshake_failures.fetch_add(1, Ordering::Relaxed);
            Err(Failure::ConnectFailure)
        }
    }
}

/// An upgrade (WebSocket and the like) has a connection of its own. To a meshed endpoint it is
/// HTTP/1.1 over mTLS to the peer's sidecar (ALPN `http/1.1`), so a strict peer accepts it;
/// otherwise plain HTTP/1.1.
async fn send_upgrade(
    ctx: &ProxyContext,
    endpoint: &EndpointState,
    mut req: Request<ProxyBody>,
) -> Result<Sent, Failure> {
    let (Some((peer, _)), Some(identity), Some(material)) =
        (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current())
    else {
        let response = ctx.client.request(req).await.map_err(|e| failure_of(&e))?;
        return Ok(Sent { response, over_mtls: false });
    };
    let mut config = (*material.client_for(&identity.spiffe_id(&material.trust_domain))).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = connect_peer(ctx, *peer, identity, Arc::new(config)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|_| Failure::ConnectFailure)?;
    tokio::spawn(conn.with_upgrades());
    // A connection of our own speaks origin-form; the Host header names the app.
    let path = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    let response = sender.send_request(req).await.map_err(|_| Failure::Reset)?;
    Ok(Sent { response, over_mtls: true })
}

fn finish_response(
    mut r: Response<Incoming>,
    retries: u32,
    upgrade: Option<OnUpgrade>,
) -> Response<ProxyBody> {
    let switching = upgrade.is_some() && r.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(downstream)) = (switching, upgrade) {
        let upstream = hyper::upgrade::on(&mut r);
        tokio::spawn(async move {
            let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else { return };
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
    }
    let (mut parts, body) = r.into_parts();
    strip_hop_by_hop(&mut parts.headers, switching);
    if retries > 0 {
        parts.headers.insert(&RETRIED_HEADER, HeaderValue::from(retries));
    }
    Response::from_parts(parts, ProxyBody::Incoming(body))
}

/// CONNECT (an app using the sidecar as an HTTPS proxy): answer 200 and splice the bytes.
fn tunnel(upgrade: Option<OnUpgrade>, upstream: &Upstream<'_>) -> Forwarded {
    let to = match upstream {
        Upstream::Fixed(a, _) => a.to_string(),
        Upstream::Mesh(t) => match t.pool.pick(now_ns()) {
            Some(p) => p.endpoint.addr.to_string(),
            None => return no_endpoints(0),
        },
    };
    let Some(on_upgrade) = upgrade else {
        return Forwarded {
            response: error(StatusCode::BAD_REQUEST, "no-upgrade", "CONNECT needs HTTP/1.1"),
            retries: 0,
            upstream: None,
        };
    };
    let target = to.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
        let mut client = TokioIo::new(upgraded);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    Forwarded { response: Response::new(ProxyBody::Empty), retries: 0, upstream: Some(to) }
}
