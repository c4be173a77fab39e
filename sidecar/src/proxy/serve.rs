//! Steps 1, 2 and 7 for a request hyper parsed: trace headers, where it goes (the route table,
//! the inbound app port, or passthrough), then its series and its access-log line.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;

use super::authz::{self, Caller};
use super::body::ProxyBody;
use super::forward::{forward, is_upgrade, tunnel, Forwarded, Upstream};
use super::{observe, ConnMeta, Direction, ProxyContext, ERROR_HEADER, INBOUND_PORT};
use crate::route::table::NoTarget;
use crate::telemetry::trace;

/// Serves one request: hyper's (its body [`ProxyBody::Incoming`]) or one of the multiplexed
/// hop's (`crate::mux`, its body whole).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    conn: ConnMeta,
    caller: Option<Arc<Caller>>,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    if let Some(refused) = refusal(&ctx, &req) {
        return Ok(refused);
    }
    let trace_id = trace::ensure(req.headers_mut());
    let authority = authority_of(&req);
    let active = ctx.store.current();

    let (mut parts, body) = req.into_parts();
    let mut authz_log = String::new();
    // The path as the client sent it, when the app is sent the normalised one.
    let mut sent_path: Option<String> = None;
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
            let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            // A tunnel to the app would carry requests no policy ever sees: inbound CONNECT
            // and `Upgrade: h2c` are refused (other upgrades, such as WebSocket, are decided
            // by their request like any other).
            let h2c = parts.headers.get_all(header::UPGRADE).iter().any(|v| {
                v.to_str().is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
            });
            if parts.method == Method::CONNECT || h2c {
                return Ok(error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "inbound-tunnel",
                    "CONNECT and Upgrade: h2c are not accepted for the app",
                ));
            }
            // A proxy port is refused before anything is decided (or counted) for it.
            let verdict = ctx.inbound_port_allowed(port).then(|| {
                authz::check(
                    active.as_deref(),
                    &ctx.store.shared.metrics.authz,
                    caller.as_deref(),
                    port,
                    Some((parts.method.as_str(), path)),
                )
            });
            match verdict {
                None => Err(error(
                    StatusCode::FORBIDDEN,
                    "proxy-port",
                    &format!("port {port} is the proxy's own; inbound traffic is for the app"),
                )),
                Some(Err(authz::NoConfig)) => Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-config",
                    "the sidecar has no config yet, so it cannot tell who may call",
                )),
                Some(Ok(v)) if !v.allowed => {
                    authz_log = v.log;
                    Err(error(StatusCode::FORBIDDEN, authz::DENIED, &v.denial))
                }
                Some(Ok(v)) => {
                    authz_log = v.log;
                    if let Some(normal) = authz::rewritten_path(active.as_deref(), port, path) {
                        match rewrite_path(&mut parts.uri, &normal) {
                            Some(raw) => sent_path = Some(raw),
                            None => {
                                return Ok(error(
                                    StatusCode::BAD_REQUEST,
                                    "bad-path",
                                    "the normalised path is not a valid request target",
                                ))
                            }
                        }
                    }
                    Ok(Upstream::App(SocketAddr::new(ctx.inbound_target, port)))
                }
            }
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
        // The proxy's own answers count where the request was headed: an inbound refusal is
        // inbound traffic, never outbound passthrough (the topology would draw it as a call).
        Err(response) => {
            let series = match conn.direction {
                Direction::Inbound => ctx.inbound.clone(),
                Direction::Outbound => ctx.passthrough.clone(),
            };
            (Forwarded { response, retries: 0, upstream: None }, series)
        }
        Ok(upstream) => {
            let series = match &upstream {
                Upstream::Mesh(t) => t.series.clone(),
                Upstream::Fixed(_, s) => (*s).clone(),
                Upstream::App(_) => ctx.inbound.clone(),
            };
            let upgrade = parts
                .extensions
                .remove::<OnUpgrade>()
                .filter(|_| parts.method == Method::CONNECT || is_upgrade(&parts));
            if parts.method == Method::CONNECT {
                (tunnel(upgrade, &upstream), series)
            } else {
                // Keep the authority the client used: HTTP/2 carries it in the URI only, and an
                // absolute-form target's authority replaces any Host (RFC 9112 §3.2.2).
                let absolute = parts.uri.authority().is_some();
                if absolute || !parts.headers.contains_key(header::HOST) {
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

    observe::request(
        &ctx.access_log,
        &series,
        started,
        observe::Finished {
            direction: conn.direction.as_str(),
            method: parts.method.as_str(),
            authority: authority.as_ref().map_or("", Authority::as_str),
            path: sent_path
                .as_deref()
                .unwrap_or(parts.uri.path_and_query().map_or("/", PathAndQuery::as_str)),
            status: forwarded.response.status().as_u16(),
            upstream: forwarded.upstream.as_deref().unwrap_or(""),
            retries: forwarded.retries,
            trace_id: trace_id.as_str(),
            authz: &authz_log,
        },
    );
    Ok(forwarded.response)
}

/// Refuses, with 400 (or 413) and a closed connection, what a strict HTTP/1.1 server must not
/// pass on: more than one `Host` (RFC 9112 §3.2), a `Content-Length` that is not one value of
/// digits, and a body declared larger than the limit. hyper has already refused malformed
/// heads, differing lengths and codings other than chunked; given both `Content-Length` and
/// `Transfer-Encoding` it keeps only the latter and closes the connection after the response
/// (RFC 9112 §6.3), so bytes smuggled behind the body are never read as a request.
fn refusal<B>(ctx: &ProxyContext, req: &Request<B>) -> Option<Response<ProxyBody>> {
    let h = req.headers();
    let refuse = |status, code, message: &str| {
        tracing::info!(code, "refused a request: {message}");
        let mut response = error(status, code, message);
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        Some(response)
    };
    let mut hosts = h.get_all(header::HOST).iter();
    let target = req.uri().authority().map(|a| a.as_str().as_bytes());
    if hosts
        .next()
        .map(|v| v.as_bytes())
        .into_iter()
        .chain(target)
        .any(|a| !crate::wire::syntax::valid_authority(a))
    {
        return refuse(StatusCode::BAD_REQUEST, "bad-host", "the authority is not a host[:port]");
    }
    if hosts.next().is_some() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "duplicate-host",
            "the request has more than one Host header",
        );
    }
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    let strict_length =
        lengths.next().is_none_or(|v| crate::wire::syntax::parse_length(v.as_bytes()).is_some());
    if !strict_length || lengths.next().is_some() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad-length",
            "Content-Length must be one value of digits only",
        );
    }
    if let Some(limit) = ctx.max_request_body {
        let declared = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                &format!("the request body is larger than {limit} bytes"),
            );
        }
    }
    None
}

/// Replaces the path and query of `uri` with `normal`, returning the old ones; `None` (and
/// `uri` untouched) when the result would not be a valid target.
fn rewrite_path(uri: &mut http::Uri, normal: &str) -> Option<String> {
    let raw = uri.path_and_query().map_or("/", PathAndQuery::as_str).to_string();
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(normal).ok()?);
    *uri = http::Uri::from_parts(parts).ok()?;
    Some(raw)
}

fn authority_of<B>(req: &Request<B>) -> Option<Authority> {
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
#[cfg(test)]
mod tests {
    /// A request's future is moved whole into its task (hyper's HTTP/2 server spawns one per
    /// stream) and through its states, so its size is paid on every request: rare paths (a
    /// handshake, an upgrade, a streamed body) are boxed and parsing scratch stays on the stack.
    /// Sizes of this (unoptimised) build; a release build's are smaller.
    #[test]
    fn a_requests_future_stays_small() {
        fn size4<A, B, C, D, Fut, F: FnOnce(A, B, C, D) -> Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        fn size5<A, B, C, D, E, Fut, F: FnOnce(A, B, C, D, E) -> Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        let (serve, forward, send) =
            (size4(super::serve), size5(super::forward), size4(super::super::forward::send));
        assert!(serve <= 4160, "serve's future is {serve} bytes");
        assert!(forward <= 2560, "forward's future is {forward} bytes");
        assert!(send <= 1536, "send's future is {send} bytes");
    }
}
