//! Steps 3–6: timeouts around retries around balancing around forwarding, for one request to
//! a mesh destination or a fixed address; upgrades and CONNECT tunnels too.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::{buffer, request_body_failed, Buffered, ProxyBody, RETRY_BUFFER_LIMIT};
use super::peer::{self, connect_peer};
use super::{
    authz, error, observe, ProxyContext, ATTEMPT_HEADER, ERROR_HEADER, INBOUND_PORT, RETRIED_HEADER,
};
use crate::balance::{now_ms, now_ns, EndpointState, InFlight};
use crate::route::retry::Failure;
use crate::route::table::Target;
use crate::telemetry::metrics::Series;
use crate::wire::mux::{self, client::MuxError};

/// Where one request is sent.
pub(super) enum Upstream<'t> {
    /// A mesh destination: balanced, retried, ejected.
    Mesh(&'t Target),
    /// A fixed address (passthrough).
    Fixed(Authority, &'t Arc<Series>),
    /// The local app, for an inbound request: a request whose body is whole in hand goes over
    /// the fast path's connections to it (`wire::fetch`), as the fast path's own would.
    App(SocketAddr),
}

/// What forwarding produced.
pub(super) struct Forwarded {
    pub(super) response: Response<ProxyBody>,
    pub(super) retries: u32,
    pub(super) upstream: Option<String>,
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed set and every header the
/// `Connection` header names. `keep_upgrade` keeps `Connection: upgrade` and `Upgrade` for a
/// protocol switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Removed by name whatever the message says. One pass over the names finds those present
    // (most messages carry none, an upstream's responses a `connection: keep-alive`), so only
    // they cost a lookup.
    const FIXED: [&str; 8] = [
        "connection",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authorization",
        "keep-alive",
        "proxy-connection",
        "upgrade",
    ];
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| FIXED.contains(&n.as_str()))
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .cloned()
        .collect();
    if doomed.is_empty() && !keep_upgrade {
        return;
    }
    // And the fields the Connection header names (RFC 9110 §7.6.1).
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The fixed names are in hand already (an upstream's `keep-alive` among them).
            .filter(|t| !FIXED.iter().any(|f| f.eq_ignore_ascii_case(t)))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()),
    );
    for name in doomed {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

pub(super) fn is_upgrade(parts: &Parts) -> bool {
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
    if request_body_failed(e) {
        return Failure::ClientBody;
    }
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
        Failure::ClientBody => {
            let mut r = error(StatusCode::BAD_REQUEST, "bad-request-body", "the request body is malformed");
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// Steps 3–6: timeouts around retries around balancing around forwarding. `upgrade` is the
/// downstream connection's upgrade handle for a protocol switch (WebSocket): such a request is
/// sent once and, on `101`, both connections are spliced.
pub(super) async fn forward(
    ctx: &ProxyContext,
    parts: &mut Parts,
    body: ProxyBody,
    upstream: &Upstream<'_>,
    upgrade: Option<OnUpgrade>,
) -> Forwarded {
    let target = match upstream {
        Upstream::Mesh(t) => *t,
        // Boxed: a passthrough's state would otherwise be part of every request's future.
        Upstream::Fixed(to, _) => return Box::pin(to_fixed(ctx, parts, body, to, upgrade)).await,
        Upstream::App(addr) => {
            let endpoint = ctx.store.shared.endpoint(*addr);
            if upgrade.is_some() || !body.is_whole() {
                let to = endpoint.authority.clone();
                return Box::pin(to_fixed(ctx, parts, body, &to, upgrade)).await;
            }
            let headers = std::mem::take(&mut parts.headers);
            let req = upstream_request(parts, headers, &endpoint.authority, body, 0, false);
            let mut in_flight = endpoint.start();
            let response = match send(ctx, &endpoint, req, &mut in_flight).await {
                Ok(sent) => from_app(sent.response, None),
                Err(f) => failure_response(f),
            };
            return Forwarded { response, retries: 0, upstream: Some(endpoint.authority.to_string()) };
        }
    };
    if upgrade.is_some() {
        let Some(pick) = target.pool.pick(now_ns()) else { return no_endpoints(0) };
        let to = pick.endpoint.via_proxy.as_ref().map_or(&pick.endpoint.authority, |(_, a)| a).clone();
        let headers = std::mem::take(&mut parts.headers);
        let mut req = upstream_request(parts, headers, &to, body, 0, true);
        if pick.endpoint.via_proxy.is_some() {
            req.headers_mut().insert(&INBOUND_PORT, HeaderValue::from(pick.endpoint.addr.port()));
        }
        // Boxed, as below: a rare path's state would otherwise make every request's future
        // (moved into its task) as large as its own.
        let result = Box::pin(send_upgrade(ctx, &pick.endpoint, req)).await;
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
        None => Buffered::OneShot(body),
    };
    if matches!(body, Buffered::Broken) {
        return Forwarded { response: failure_response(Failure::ClientBody), retries: 0, upstream: None };
    }
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
        // A meshed endpoint is reached through its sidecar, which delivers to the app's port.
        let to = endpoint.via_proxy.as_ref().map_or(&endpoint.authority, |(_, a)| a).clone();
        // Headers are copied only while another attempt may need them.
        let headers = if retry.is_some() && body.replayable() {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let mut req = upstream_request(parts, headers, &to, body.take(), attempt, false);
        if endpoint.via_proxy.is_some() {
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
            Err(Failure::ClientBody) => false,
            Err(_) => true,
        };
        observe::attempt(&target.pool, &endpoint, failed, &target.series);

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
        if result.as_ref().is_ok_and(authz::is_denial) {
            target.series.denied.fetch_add(1, Ordering::Relaxed);
        }
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

/// A request to a fixed address through hyper's client: passthrough, or to the app when its
/// body streams or it is an upgrade.
async fn to_fixed(
    ctx: &ProxyContext,
    parts: &mut Parts,
    body: ProxyBody,
    to: &Authority,
    upgrade: Option<OnUpgrade>,
) -> Forwarded {
    let headers = std::mem::take(&mut parts.headers);
    let req = upstream_request(parts, headers, to, body, 0, upgrade.is_some());
    let response = match ctx.client.request(req).await {
        Ok(r) => from_app(r.map(ProxyBody::Incoming), upgrade),
        Err(e) => failure_response(failure_of(&e)),
    };
    Forwarded { response, retries: 0, upstream: Some(to.to_string()) }
}

/// The answer of an app or a passthrough destination, which never speaks for a sidecar: an
/// `x-skein-error: authz-denied` of its own would be counted as a denial.
fn from_app(mut r: Response<ProxyBody>, upgrade: Option<OnUpgrade>) -> Response<ProxyBody> {
    r.headers_mut().remove(&ERROR_HEADER);
    finish_response(r, 0, upgrade)
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
pub(super) struct Sent {
    response: Response<ProxyBody>,
    over_mtls: bool,
}

/// Sends one attempt over HTTP/1.1: to an app endpoint, or to a meshed endpoint's sidecar —
/// over pooled mTLS connections, verifying the peer's SPIFFE ID, when this sidecar has an
/// identity (in plaintext otherwise). A request whose body is whole in hand goes over the fast
/// path's connections (`wire::fetch`); one whose body streams, through hyper's client.
pub(super) async fn send(
    ctx: &ProxyContext,
    endpoint: &Arc<EndpointState>,
    mut req: Request<ProxyBody>,
    in_flight: &mut InFlight,
) -> Result<Sent, Failure> {
    let meshed = endpoint.via_proxy.is_some();
    if meshed && (endpoint.peer_identity.is_none() || ctx.tls.current().is_none()) {
        // Without identities the peer is spoken to in plaintext, through hyper's client.
        let response = ctx.client.request(req).await.map_err(|e| failure_of(&e))?;
        return Ok(Sent { response: response.map(ProxyBody::Incoming), over_mtls: false });
    }
    if meshed && !req.body().is_whole() {
        // What has arrived of a meshed request's body may be all of it (a unary gRPC call).
        let body = std::mem::replace(req.body_mut(), ProxyBody::Empty);
        *req.body_mut() = Box::pin(body.gather_ready(mux::MAX_BODY)).await.ok_or(Failure::ClientBody)?;
    }
    let whole = req.body().is_whole().then(|| req.body_mut().take_whole());
    let path = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Some(body) = whole {
        // hyper's client names the target's authority when the request has no Host; so does
        // this connection of our own.
        if !req.headers().contains_key(header::HOST) {
            if let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        in_flight.dispatched();
        let small = body.as_ref().is_none_or(|b| b.len() <= mux::MAX_BODY);
        if let (Some((peer, _)), Some(identity), Some(material), true) =
            (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current(), small)
        {
            let connect = || async {
                let tls = connect_peer(ctx, *peer, identity, &material, true).await?;
                Ok(Box::new(tls))
            };
            let block = mux::client::request_block(req.method(), path.as_str(), req.headers()).into();
            let sent = mux::client::send(&ctx.mux, *peer, identity, connect, block, body.clone());
            match Box::pin(sent).await {
                Ok(response) => {
                    let response =
                        response.map(|b| b.map_or(ProxyBody::Empty, |b| ProxyBody::Mux(Box::new(b))));
                    return Ok(Sent { response, over_mtls: true });
                }
                Err(MuxError::Failed(f)) => return Err(f),
                // An older peer: HTTP/1.1 over the connection made to ask, if one was.
                Err(MuxError::NotOffered(tls)) => {
                    if let Some(tls) = tls {
                        crate::wire::pool::checkin(endpoint, crate::wire::pool::Upstream::Peer(tls));
                    }
                }
            }
        }
        let connect = || peer::connect_upstream(ctx, endpoint);
        let response =
            crate::wire::fetch::fetch(endpoint, req.method(), path.as_str(), req.headers(), body, connect)
                .await?;
        let response = response.map(|b| b.map_or(ProxyBody::Empty, |b| ProxyBody::Fetched(Box::new(b))));
        return Ok(Sent { response, over_mtls: meshed });
    }
    if let (Some((peer, _)), Some(identity), Some(material)) =
        (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current())
    {
        // A connection of our own speaks origin-form; the Host header names the app.
        *req.uri_mut() = Uri::from(path);
        in_flight.dispatched();
        let response = Box::pin(peer::send(ctx, *peer, identity, &material, req)).await?;
        return Ok(Sent { response: response.map(ProxyBody::Incoming), over_mtls: true });
    }
    let response = ctx.client.request(req).await.map_err(|e| failure_of(&e))?;
    Ok(Sent { response: response.map(ProxyBody::Incoming), over_mtls: false })
}

/// An upgrade (WebSocket and the like) has a connection of its own. To a meshed endpoint it is
/// HTTP/1.1 over mTLS to the peer's sidecar (ALPN `http/1.1`), so a strict peer accepts it;
/// otherwise plain HTTP/1.1.
pub(super) async fn send_upgrade(
    ctx: &ProxyContext,
    endpoint: &EndpointState,
    mut req: Request<ProxyBody>,
) -> Result<Sent, Failure> {
    let (Some((peer, _)), Some(identity), Some(material)) =
        (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current())
    else {
        let response = ctx.client.request(req).await.map_err(|e| failure_of(&e))?;
        return Ok(Sent { response: response.map(ProxyBody::Incoming), over_mtls: false });
    };
    let tls = connect_peer(ctx, *peer, identity, &material, false).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|_| Failure::ConnectFailure)?;
    tokio::spawn(conn.with_upgrades());
    // A connection of our own speaks origin-form; the Host header names the app.
    let path = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    let response = sender.send_request(req).await.map_err(|_| Failure::Reset)?;
    Ok(Sent { response: response.map(ProxyBody::Incoming), over_mtls: true })
}

fn finish_response(
    mut r: Response<ProxyBody>,
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
    // Framed both ways: Transfer-Encoding won (RFC 9112 §6.3) and hyper re-frames the body,
    // so the Content-Length is dropped rather than passed on beside a different framing.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers, switching);
    if retries > 0 {
        parts.headers.insert(&RETRIED_HEADER, HeaderValue::from(retries));
    }
    Response::from_parts(parts, body)
}

/// CONNECT (an app using the sidecar as an HTTPS proxy): answer 200 and splice the bytes.
pub(super) fn tunnel(upgrade: Option<OnUpgrade>, upstream: &Upstream<'_>) -> Forwarded {
    let to = match upstream {
        Upstream::Fixed(a, _) => a.to_string(),
        Upstream::App(a) => a.to_string(),
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
