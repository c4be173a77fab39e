//! One request on the fast path: its head rewritten into one buffer (hop-by-hop headers out,
//! trace headers in), sent with its body on an idle or new upstream connection, and the response
//! copied back as it streams; then the shared observe step.

use std::io::{self, Write as _};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::head::{is_hop_by_hop, Head, View, READ_CHUNK};
use super::outcome::{write_flushed, Failed};
use crate::balance::{now_ns, EndpointState, InFlight, Pool};
use crate::proxy::{observe, ConnMeta, ProxyContext};
use crate::route::table::RequestView;
use crate::telemetry::metrics::Series;
use crate::telemetry::trace;
use crate::wire::framing::{take_body, Framing};
use crate::wire::mux::MAX_BODY;
use crate::wire::pool::{checkin, checkout, Upstream};
use crate::wire::response::{read_response_head, ResponseBuf, ResponseHead};

/// Where one request goes: a fixed endpoint (inbound) or a balanced pool.
pub(super) struct Route {
    pub(super) endpoint: Option<Arc<EndpointState>>,
    pub(super) pool: Option<Arc<Pool>>,
    pub(super) series: Arc<Series>,
    /// The inbound authorization decision, for the access log.
    pub(super) authz: String,
}

/// Buffers reused across the requests of a connection.
#[derive(Default)]
pub(super) struct Scratch {
    out: Vec<u8>,
    response: ResponseBuf,
}

/// A minimal response the fast path writes itself.
pub(super) async fn answer<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    code: &str,
    close: bool,
) -> io::Result<()> {
    let body = format!("{reason}\n");
    let conn = if close { "connection: close\r\n" } else { "" };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nx-skein-error: {code}\r\ncontent-length: {}\r\n{conn}\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).await?;
    stream.flush().await
}

/// Forwards one request and its response; returns whether the client connection stays open.
pub(super) async fn forward<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    buf: &mut BytesMut,
    head: &Head,
    ctx: &ProxyContext,
    conn: ConnMeta,
    route: Route,
    scratch: &mut Scratch,
) -> io::Result<bool> {
    let started = Instant::now();
    let view = View { head, buf };
    let endpoint = match (&route.endpoint, &route.pool) {
        (Some(e), _) => e.clone(),
        (None, Some(pool)) => match pool.pick(now_ns()) {
            Some(pick) => {
                if pick.failed_open {
                    route.series.fail_open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                pick.endpoint
            }
            None => {
                // The body is not read: close after answering.
                answer(client, 503, "the destination has no endpoints", "no-endpoints", true).await?;
                route.series.record(503, started.elapsed());
                return Ok(false);
            }
        },
        (None, None) => return Ok(false),
    };

    // The upstream head: the request line in origin-form, end-to-end headers, trace headers.
    let out = &mut scratch.out;
    out.clear();
    out.extend_from_slice(&buf[head.method.clone()]);
    out.push(b' ');
    out.extend_from_slice(&buf[head.path.clone()]);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in &head.headers {
        if is_hop_by_hop(&buf[n.clone()]) || head.inbound_port.as_ref() == Some(v) {
            continue; // the inbound port header was for this sidecar
        }
        if head.absolute && buf[n.clone()].eq_ignore_ascii_case(b"host") {
            continue; // the target's authority replaces it (RFC 9112 §3.2.2)
        }
        if head.traceparent.is_none() && buf[n.clone()].eq_ignore_ascii_case(b"traceparent") {
            continue; // an invalid (or repeated) one is replaced
        }
        out.extend_from_slice(&buf[n.clone()]);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&buf[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if head.absolute || !head.has_host {
        if let Some(a) = &head.authority {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(&buf[a.clone()]);
            out.extend_from_slice(b"\r\n");
        }
    }
    let trace_id;
    if let Some(tp) = &head.traceparent {
        trace_id = trace::TraceId::of(&buf[tp.clone()]);
    } else {
        let tp = trace::new_traceparent();
        trace_id = trace::TraceId::of(&tp);
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(&tp);
        out.extend_from_slice(b"\r\n");
    }
    if !head.has_request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(&trace::new_request_id());
        out.extend_from_slice(b"\r\n");
    }
    if endpoint.via_proxy.is_some() {
        // The peer sidecar delivers to this port of its app.
        let _ = write!(out, "{}: {}\r\n", skein_api::constants::INBOUND_PORT_HEADER, endpoint.addr.port());
    }
    out.extend_from_slice(b"\r\n");
    // As much of the body as is already buffered goes in the same write.
    let buffered_body =
        (buf.len() - head.len).min(usize::try_from(head.content_length).unwrap_or(usize::MAX));
    out.extend_from_slice(&buf[head.len..head.len + buffered_body]);
    let body_left = head.content_length - buffered_body as u64;
    // Sent again on a fresh connection when a pooled one turns out closed: only a request
    // that is whole in hand and idempotent (RFC 9110 §9.2.2), since the server may have acted
    // on it before closing.
    let replayable = body_left == 0 && is_idempotent(view.method());

    let method_is_head = view.method() == "HEAD";
    let log_method = if ctx.access_log.enabled() { view.method().to_string() } else { String::new() };
    let log_path = if ctx.access_log.enabled() { view.str(&head.path).to_string() } else { String::new() };
    let log_authority = if ctx.access_log.enabled() {
        head.authority.as_ref().map(|a| view.str(a).to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    let client_close = head.close;
    buf.advance(head.len + buffered_body);

    let mut in_flight = endpoint.start();
    // To a meshed endpoint, a request whose body is whole goes over the multiplexed hop when
    // the peer offers it.
    let over_mux = if body_left == 0 && buffered_body <= MAX_BODY && endpoint.via_proxy.is_some() {
        in_flight.dispatched();
        super::mux::exchange(
            client,
            ctx,
            &endpoint,
            &mut scratch.out,
            buffered_body,
            method_is_head,
            client_close,
        )
        .await
    } else {
        None
    };
    let outcome = match over_mux {
        Some(outcome) => outcome,
        None => {
            exchange(
                client,
                ctx,
                &endpoint,
                &mut in_flight,
                scratch,
                body_left,
                replayable,
                method_is_head,
                client_close,
                route.endpoint.is_some(),
            )
            .await
        }
    };
    drop(in_flight);

    let meshed = endpoint.via_proxy.is_some();
    if outcome.is_ok() && route.pool.is_some() {
        // How the answer travelled: over mTLS from the endpoint's sidecar, or in plaintext.
        let counter = if meshed { &route.series.mtls } else { &route.series.plaintext };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let (status, keep) = match outcome {
        Ok((status, keep, denied)) => {
            if denied {
                route.series.denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (status, keep)
        }
        Err(Failed::Connect) => {
            answer(
                client,
                503,
                "could not connect upstream",
                "connect-failure",
                body_left > 0 || client_close,
            )
            .await?;
            (503, body_left == 0 && !client_close)
        }
        Err(Failed::BeforeResponse) => {
            answer(client, 502, "upstream closed the connection before responding", "upstream-reset", true)
                .await?;
            (502, false)
        }
        Err(Failed::Midway) => (0, false),
    };
    if let (Some(pool), true) = (&route.pool, status != 0) {
        observe::attempt(pool, &endpoint, status >= 500, &route.series);
    }
    let upstream = match (&endpoint.via_proxy, ctx.access_log.enabled()) {
        (_, false) => String::new(),
        (Some((_, peer)), true) => peer.to_string(),
        (None, true) => endpoint.addr.to_string(),
    };
    observe::request(
        &ctx.access_log,
        &route.series,
        started,
        observe::Finished {
            direction: conn.direction.as_str(),
            method: &log_method,
            authority: &log_authority,
            path: &log_path,
            status,
            upstream: &upstream,
            retries: 0,
            trace_id: trace_id.as_str(),
            authz: &route.authz,
        },
    );
    Ok(keep)
}

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE.
fn is_idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// Sends `scratch.out` (and the rest of the body from the client) upstream and copies the
/// response back (from the app: without `x-skein-error`); returns the status, whether the
/// client connection can be kept, and whether the answer is a peer sidecar's authorization
/// denial.
#[allow(clippy::too_many_arguments)]
async fn exchange<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    ctx: &ProxyContext,
    endpoint: &EndpointState,
    in_flight: &mut InFlight,
    scratch: &mut Scratch,
    body_left: u64,
    replayable: bool,
    method_is_head: bool,
    client_close: bool,
    from_app: bool,
) -> Result<(u16, bool, bool), Failed> {
    // A pooled connection may have been closed by the server in the meantime: then try once
    // more on a fresh one, if the request can be sent again.
    let mut fresh = false;
    let upstream = loop {
        let (mut up, reused) = match checkout(endpoint) {
            Some(s) => (s, true),
            None => {
                let s = connect(ctx, endpoint).await?;
                fresh = true;
                (s, false)
            }
        };
        in_flight.dispatched();
        let mut sent = up.write_all(&scratch.out).await;
        if sent.is_ok() && body_left == 0 {
            sent = up.flush().await;
        }
        if sent.is_err() {
            if reused && replayable && !fresh {
                continue;
            }
            return Err(Failed::BeforeResponse);
        }
        if body_left > 0 {
            let mut body = (&mut *client).take(body_left);
            let copied = tokio::io::copy(&mut body, &mut up).await.map_err(|_| Failed::Midway)?;
            if copied != body_left {
                return Err(Failed::Midway);
            }
            up.flush().await.map_err(|_| Failed::Midway)?;
        }
        // Read the response head; an empty answer on a reused connection means it was stale.
        scratch.response.resp.clear();
        scratch.response.resp.reserve(READ_CHUNK);
        match read_response_head(&mut up, &mut scratch.response).await {
            Ok(Some(parsed)) => break (up, parsed),
            Ok(None) if reused && replayable => continue,
            Ok(None) | Err(_) => return Err(Failed::BeforeResponse),
        }
    };
    let (mut up, parsed) = upstream;
    let ResponseHead {
        len: head_len,
        status,
        framing: framing_hint,
        close: upstream_close,
        chunked_and_length,
    } = parsed;

    // The downstream head: the upstream's, without hop-by-hop headers except the framing, each
    // line rebuilt with CRLF; with both framing headers, Transfer-Encoding wins and
    // Content-Length is dropped (RFC 9112 §6.3).
    let out = &mut scratch.out;
    out.clear();
    let mut denied = false;
    let resp = &scratch.response.resp;
    let line_end = resp.iter().position(|b| *b == b'\n').unwrap_or(0);
    out.extend_from_slice(resp[..line_end].strip_suffix(b"\r").unwrap_or(&resp[..line_end]));
    out.extend_from_slice(b"\r\n");
    for (n, v) in &scratch.response.headers {
        let name = &resp[n.clone()];
        if is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"transfer-encoding") {
            continue;
        }
        if chunked_and_length && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        if name.eq_ignore_ascii_case(crate::proxy::ERROR_HEADER.as_str().as_bytes()) {
            if from_app {
                // The app never speaks for a sidecar: its own `x-skein-error: authz-denied`
                // would be counted as a denial by the caller.
                continue;
            }
            denied |= status == 403
                && endpoint.via_proxy.is_some()
                && resp[v.clone()] == *crate::proxy::authz::DENIED.as_bytes();
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&resp[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    let mut framing =
        if method_is_head || status == 204 || status == 304 { Framing::None } else { framing_hint };
    let keep = !client_close && !matches!(framing, Framing::UntilClose);
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");

    // Body bytes that came with the head.
    let mut rest = &resp[head_len..];
    // An upstream that framed a response both ways is not trusted with another request.
    let mut reusable = !upstream_close && !chunked_and_length;
    let done = take_body(&mut framing, &mut rest).map_err(|_| Failed::Midway)?;
    out.extend_from_slice(&resp[head_len..resp.len() - rest.len()]);
    if !rest.is_empty() {
        reusable = false; // bytes beyond the response: do not trust this connection again
    }
    // The upstream connection goes back to the pool as soon as its response is read whole,
    // before the client is sent the last of it: the client's next request, which that end
    // prompts, then finds it there rather than opening another.
    if done {
        if reusable {
            checkin(endpoint, up);
        }
        write_flushed(client, out).await?;
        return Ok((status, keep, denied));
    }
    write_flushed(client, out).await?;
    let mut chunk = std::mem::take(&mut scratch.response.resp);
    let last = loop {
        chunk.clear();
        chunk.reserve(READ_CHUNK);
        let n = up.read_buf(&mut chunk).await.map_err(|_| Failed::Midway)?;
        if n == 0 {
            if matches!(framing, Framing::UntilClose) {
                reusable = false;
                break 0;
            }
            return Err(Failed::Midway);
        }
        let mut part = &chunk[..];
        let finished = take_body(&mut framing, &mut part).map_err(|_| Failed::Midway)?;
        let used = chunk.len() - part.len();
        if finished {
            if !part.is_empty() {
                reusable = false; // bytes beyond the response
            }
            break used;
        }
        write_flushed(client, &chunk[..used]).await?;
    };
    if reusable {
        checkin(endpoint, up);
    }
    write_flushed(client, &chunk[..last]).await?;
    scratch.response.resp = chunk;
    Ok((status, keep, denied))
}

/// A new upstream connection (see [`crate::proxy::peer::connect_upstream`]).
async fn connect(ctx: &ProxyContext, endpoint: &EndpointState) -> Result<Upstream, Failed> {
    crate::proxy::peer::connect_upstream(ctx, endpoint).await.map_err(|_| Failed::Connect)
}
