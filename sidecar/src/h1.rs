//! The HTTP/1.1 fast path: plain request/response forwarding without hyper's per-request
//! machinery (channels, pooled-client bookkeeping, header maps).
//!
//! Each client connection is one task: it parses a request head in place (httparse), decides
//! the destination with the same route table, picks an endpoint with the same balancer, writes
//! the rewritten head and the body to an idle upstream connection of that endpoint, and copies
//! the response back, framing bodies by `Content-Length` or by scanning chunked encoding. Metrics,
//! outlier detection, trace headers and the access log are the same as on the general path.
//!
//! Anything this path does not handle — HTTP/1.0, `CONNECT`, upgrades, `Expect`, chunked request
//! bodies, destinations with retries or timeouts, passthrough hosts, errors — hands the
//! connection, unread bytes included, to hyper ([`crate::listener::serve_hyper`]) for the rest
//! of its life. So the fast path only ever takes the common case, and the general path decides
//! everything else.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::access_log::{rfc3339, Entry};
use crate::balance::{now_ms, now_ns, EndpointState, InFlight};
use crate::metrics::Series;
use crate::outlier::{self, Outcome};
use crate::proxy::{ConnMeta, Direction, ProxyContext};
use crate::routes::RequestView;
use crate::trace;

const MAX_HEAD: usize = 64 * 1024;
/// Room made for every read (a `BytesMut` without spare capacity would read 64 bytes at a time).
const READ_CHUNK: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;
/// Idle upstream connections older than this are not reused (servers close idle keep-alive
/// connections after a few seconds; reusing one that is closing fails the request).
const POOL_TTL: Duration = Duration::from_secs(4);
const POOL_MAX: usize = 64;
/// A keep-alive client connection idle this long is closed.
const CLIENT_IDLE: Duration = Duration::from_secs(120);

/// A parsed request head: positions into the connection's buffer.
#[derive(Default)]
struct Head {
    len: usize,
    method: Range<usize>,
    /// Path and query, origin-form.
    path: Range<usize>,
    /// The authority: from an absolute-form target or the Host header.
    authority: Option<Range<usize>>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    content_length: u64,
    /// Something only the general path handles.
    unusual: bool,
    close: bool,
    has_host: bool,
    has_traceparent: bool,
    has_request_id: bool,
}

/// Header names a proxy never forwards (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

impl Head {
    /// Parses a complete head at the start of `buf`; `Ok(None)` when more bytes are needed.
    fn parse(buf: &[u8], head: &mut Head) -> Result<Option<()>, ()> {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut raw);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(()),
        };
        head.headers.clear();
        head.len = len;
        let (method, target) = (req.method.ok_or(())?, req.path.ok_or(())?);
        head.method = offset(buf, method.as_bytes());
        head.unusual = req.version != Some(1) || method == "CONNECT";
        head.close = false;
        head.content_length = 0;
        head.authority = None;
        head.has_host = false;
        head.has_traceparent = false;
        head.has_request_id = false;
        // Absolute-form (an app using the sidecar as HTTP_PROXY): split off the authority.
        let t = target.as_bytes();
        head.path = offset(buf, t);
        if let Some(rest) = target.strip_prefix("http://") {
            let end = rest.find('/').unwrap_or(rest.len());
            head.authority = Some(offset(buf, &rest.as_bytes()[..end]));
            head.path = offset(buf, if end == rest.len() { b"/" } else { &rest.as_bytes()[end..] });
            if end == rest.len() {
                // "http://host" has no path: not worth a special case.
                head.unusual = true;
            }
        } else if !target.starts_with('/') {
            head.unusual = true; // "*" or an authority-form target
        }
        let mut lengths = 0;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            let value = h.value;
            head.headers.push((offset(buf, name), offset(buf, value)));
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                head.content_length =
                    std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok()).ok_or(())?;
            } else if name.eq_ignore_ascii_case(b"host") {
                head.has_host = true;
                if head.authority.is_none() {
                    head.authority = Some(offset(buf, value));
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        head.unusual = true; // upgrade, or headers named as hop-by-hop
                    }
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(skein_api::constants::INBOUND_PORT_HEADER.as_bytes())
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
            {
                head.unusual = true;
            } else if name.eq_ignore_ascii_case(b"traceparent") {
                head.has_traceparent = trace::is_valid_traceparent(value);
            } else if name.eq_ignore_ascii_case(b"x-request-id") {
                head.has_request_id = true;
            }
        }
        if lengths > 1 {
            head.unusual = true; // let the general path judge conflicting lengths
        }
        Ok(Some(()))
    }
}

/// A head together with its buffer, for route matching.
struct View<'a> {
    head: &'a Head,
    buf: &'a [u8],
}

impl View<'_> {
    fn str(&self, r: &Range<usize>) -> &str {
        std::str::from_utf8(&self.buf[r.clone()]).unwrap_or("")
    }
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        self.str(&self.head.method)
    }
    fn path(&self) -> &str {
        let p = self.str(&self.head.path);
        p.split_once('?').map_or(p, |(path, _)| path)
    }
    fn any_header(&self, name: &HeaderName, f: &mut dyn FnMut(&str) -> bool) -> bool {
        self.head
            .headers
            .iter()
            .filter(|(n, _)| self.buf[n.clone()].eq_ignore_ascii_case(name.as_str().as_bytes()))
            .any(|(_, v)| f(self.str(v)))
    }
}

/// Splits an authority into host and port (`[::1]:80`, `host:80`, `host`).
fn host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse().ok()),
        _ => (authority, None),
    }
}

/// Bytes of an already read request prefix, then the socket: what hyper reads when the fast
/// path hands a connection over.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes that are not valid chunked coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk;

/// Scans chunked transfer coding (RFC 9112 §7.1) as it streams by, to find where the message
/// ends; the bytes themselves are forwarded unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    Size { value: u64, digits: bool, ext: bool },
    SizeLf { value: u64 },
    Data(u64),
    DataCr,
    DataLf,
    LineStart,
    Line,
    LineLf,
    FinalLf,
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Self::Size { value: 0, digits: false, ext: false }
    }
}

impl Chunked {
    /// Feeds bytes; returns how many belong to the message (all of them unless it ended), or
    /// `Err` for bytes that are not chunked coding.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < bytes.len() {
            if *self == Self::Done {
                return Ok(i);
            }
            let b = bytes[i];
            *self = match *self {
                Self::Size { value, digits, ext } => match b {
                    b'\r' if digits => Self::SizeLf { value },
                    _ if ext => Self::Size { value, digits, ext },
                    b';' | b' ' | b'\t' if digits => Self::Size { value, digits, ext: true },
                    _ => {
                        let d = (b as char).to_digit(16).ok_or(BadChunk)?;
                        let value = value
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(u64::from(d)))
                            .ok_or(BadChunk)?;
                        Self::Size { value, digits: true, ext: false }
                    }
                },
                Self::SizeLf { value } if b == b'\n' => {
                    if value == 0 {
                        Self::LineStart
                    } else {
                        Self::Data(value)
                    }
                }
                Self::Data(n) => {
                    let take = (bytes.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 { Self::DataCr } else { Self::Data(left) };
                    continue;
                }
                Self::DataCr if b == b'\r' => Self::DataLf,
                Self::DataLf if b == b'\n' => Self::default(),
                Self::LineStart if b == b'\r' => Self::FinalLf,
                Self::LineStart | Self::Line if b != b'\r' => Self::Line,
                Self::Line => Self::LineLf,
                Self::LineLf if b == b'\n' => Self::LineStart,
                Self::FinalLf if b == b'\n' => {
                    *self = Self::Done;
                    return Ok(i + 1);
                }
                _ => return Err(BadChunk),
            };
            i += 1;
        }
        Ok(i)
    }
}

/// How a response body ends.
enum Framing {
    None,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// Reads until `buf` holds a complete head; `Ok(false)` on a clean end of stream before any byte.
async fn fill_head(stream: &mut TcpStream, buf: &mut BytesMut, head: &mut Head) -> io::Result<bool> {
    loop {
        if !buf.is_empty() {
            match Head::parse(buf, head) {
                Ok(Some(())) => return Ok(true),
                Ok(None) if buf.len() >= MAX_HEAD => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"))
                }
                Ok(None) => {}
                Err(()) => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed head")),
            }
        }
        buf.reserve(READ_CHUNK.saturating_sub(buf.capacity() - buf.len()).min(READ_CHUNK));
        let read = if buf.is_empty() {
            match tokio::time::timeout(CLIENT_IDLE, stream.read_buf(buf)).await {
                Ok(r) => r?,
                Err(_) => return Ok(false),
            }
        } else {
            stream.read_buf(buf).await?
        };
        if read == 0 {
            return if buf.is_empty() { Ok(false) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
    }
}

/// Serves a client connection on the fast path for as long as its requests allow.
pub async fn serve(mut stream: TcpStream, ctx: Arc<ProxyContext>, conn: ConnMeta) {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut head = Head::default();
    let mut scratch = Scratch::default();
    let mut inbound: Option<(u16, Arc<EndpointState>)> = None;
    loop {
        match fill_head(&mut stream, &mut buf, &mut head).await {
            Ok(true) => {}
            Ok(false) => return,
            // Malformed or oversized: hyper gives the proper 400/431 answer.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => break,
            Err(_) => return,
        }
        if head.unusual {
            break;
        }
        let view = View { head: &head, buf: &buf };
        let authority = head.authority.as_ref().map(|r| view.str(r));
        let (host, port) = authority.map(host_port).map_or((None, None), |(h, p)| (Some(h), p));
        let active = ctx.store.current();
        let target = match conn.direction {
            Direction::Inbound => {
                let Some(port) = conn.original.map(|o| o.port()).or(port) else { break };
                let endpoint = match &inbound {
                    Some((p, e)) if *p == port => e.clone(),
                    _ => {
                        let e = ctx.store.shared.endpoint(SocketAddr::new(ctx.inbound_target, port));
                        inbound = Some((port, e.clone()));
                        e
                    }
                };
                Route { endpoint: Some(endpoint), pool: None, series: ctx.inbound.clone() }
            }
            Direction::Outbound => {
                let resolved = active.as_ref().map(|a| a.table.resolve(host, port, conn.original, &view));
                match resolved {
                    Some(Ok(t))
                        if t.timeout.is_none()
                            && !t.pool.meshed
                            && t.protocol == skein_api::config::Protocol::Http
                            && t.retry
                                .as_ref()
                                .is_none_or(|r| r.attempts == 0 || !r.method_allowed_str(view.method())) =>
                    {
                        Route { endpoint: None, pool: Some(t.pool.clone()), series: t.series.clone() }
                    }
                    _ => break,
                }
            }
        };
        match forward(&mut stream, &mut buf, &head, &ctx, conn, target, &mut scratch).await {
            Ok(true) => continue,
            Ok(false) | Err(_) => return,
        }
    }
    crate::listener::serve_hyper(Rewind { prefix: buf.freeze(), inner: stream }, ctx, conn).await;
}

/// Where one request goes: a fixed endpoint (inbound) or a balanced pool.
struct Route {
    endpoint: Option<Arc<EndpointState>>,
    pool: Option<Arc<crate::balance::Pool>>,
    series: Arc<Series>,
}

/// Buffers reused across the requests of a connection.
#[derive(Default)]
struct Scratch {
    out: Vec<u8>,
    resp: BytesMut,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

/// A minimal response the fast path writes itself.
async fn answer(
    stream: &mut TcpStream,
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
    stream.write_all(text.as_bytes()).await
}

fn checkout(endpoint: &EndpointState) -> Option<TcpStream> {
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    while let Some((s, at)) = idle.pop() {
        if at.elapsed() < POOL_TTL {
            return Some(s);
        }
    }
    None
}

fn checkin(endpoint: &EndpointState, stream: TcpStream) {
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < POOL_MAX {
        idle.push((stream, Instant::now()));
    }
}

/// Forwards one request and its response; returns whether the client connection stays open.
async fn forward(
    client: &mut TcpStream,
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
        if is_hop_by_hop(&buf[n.clone()]) {
            continue;
        }
        if !head.has_traceparent && buf[n.clone()].eq_ignore_ascii_case(b"traceparent") {
            continue; // an invalid one is replaced
        }
        out.extend_from_slice(&buf[n.clone()]);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&buf[v.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    if !head.has_host {
        if let Some(a) = &head.authority {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(&buf[a.clone()]);
            out.extend_from_slice(b"\r\n");
        }
    }
    let trace_id;
    if head.has_traceparent {
        let tp = head
            .headers
            .iter()
            .find(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(b"traceparent"))
            .map(|(_, v)| v.clone());
        trace_id = tp.map(|v| buf[v.start + 3..v.start + 35].to_vec()).unwrap_or_default();
    } else {
        let tp = trace::new_traceparent();
        trace_id = tp.as_bytes()[3..35].to_vec();
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(tp.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !head.has_request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(trace::new_request_id().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // As much of the body as is already buffered goes in the same write.
    let buffered_body =
        (buf.len() - head.len).min(usize::try_from(head.content_length).unwrap_or(usize::MAX));
    out.extend_from_slice(&buf[head.len..head.len + buffered_body]);
    let body_left = head.content_length - buffered_body as u64;
    let replayable = body_left == 0;

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
    let outcome = exchange(
        client,
        ctx,
        &endpoint,
        &mut in_flight,
        scratch,
        body_left,
        replayable,
        method_is_head,
        client_close,
    )
    .await;
    drop(in_flight);

    if outcome.is_ok() && route.pool.is_some() {
        // The fast path only serves endpoints without a sidecar: the answer came in plaintext.
        route.series.plaintext.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let (status, keep) = match outcome {
        Ok(x) => x,
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
        if let Some(cfg) = &pool.outlier {
            let o = if status >= 500 { Outcome::Failure } else { Outcome::Success };
            if let Some(ejection) = outlier::record(cfg, &endpoint, &pool.endpoints, o, now_ms()) {
                route.series.ejections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(endpoint = %endpoint.addr, ms = ejection.duration_ms, times = ejection.times, "outlier ejected");
            }
        }
    }
    if status != 0 {
        route.series.record(status, started.elapsed());
    }
    if ctx.access_log.enabled() {
        ctx.access_log.log(&Entry {
            time: rfc3339(SystemTime::now()),
            direction: conn.direction.as_str(),
            method: &log_method,
            authority: &log_authority,
            path: &log_path,
            status,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            upstream: &endpoint.addr.to_string(),
            retries: 0,
            trace_id: std::str::from_utf8(&trace_id).unwrap_or_default(),
        });
    }
    Ok(keep)
}

enum Failed {
    /// No connection could be made: nothing was sent.
    Connect,
    /// The upstream went away before answering.
    BeforeResponse,
    /// Something broke after the response started: both connections are dropped.
    Midway,
}

/// Sends `scratch.out` (and the rest of the body from the client) upstream and copies the
/// response back; returns the status and whether the client connection can be kept.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    client: &mut TcpStream,
    ctx: &ProxyContext,
    endpoint: &EndpointState,
    in_flight: &mut InFlight,
    scratch: &mut Scratch,
    body_left: u64,
    replayable: bool,
    method_is_head: bool,
    client_close: bool,
) -> Result<(u16, bool), Failed> {
    // A pooled connection may have been closed by the server in the meantime: then try once
    // more on a fresh one, if the request can be sent again.
    let mut fresh = false;
    let upstream = loop {
        let (mut up, reused) = match checkout(endpoint) {
            Some(s) => (s, true),
            None => {
                let s = tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(endpoint.addr))
                    .await
                    .map_err(|_| Failed::Connect)?
                    .map_err(|_| Failed::Connect)?;
                let _ = s.set_nodelay(true);
                fresh = true;
                (s, false)
            }
        };
        in_flight.dispatched();
        let sent = up.write_all(&scratch.out).await;
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
        }
        // Read the response head; an empty answer on a reused connection means it was stale.
        scratch.resp.clear();
        scratch.resp.reserve(READ_CHUNK);
        match read_response_head(&mut up, scratch).await {
            Ok(Some(parsed)) => break (up, parsed),
            Ok(None) if reused && replayable => continue,
            Ok(None) | Err(_) => return Err(Failed::BeforeResponse),
        }
    };
    let (mut up, (head_len, status, framing_hint, upstream_close)) = upstream;

    // The downstream head: the upstream's, without hop-by-hop headers except the framing.
    let out = &mut scratch.out;
    out.clear();
    let resp = &scratch.resp;
    let line_end = resp.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    out.extend_from_slice(&resp[..line_end + 2]);
    for (n, v) in &scratch.headers {
        let name = &resp[n.clone()];
        if is_hop_by_hop(name) && !name.eq_ignore_ascii_case(b"transfer-encoding") {
            continue;
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
    let mut reusable = !upstream_close;
    let done = take_body(&mut framing, &mut rest).map_err(|_| Failed::Midway)?;
    out.extend_from_slice(&resp[head_len..resp.len() - rest.len()]);
    if !rest.is_empty() {
        reusable = false; // bytes beyond the response: do not trust this connection again
    }
    client.write_all(out).await.map_err(|_| Failed::Midway)?;
    if !done {
        let mut chunk = std::mem::take(&mut scratch.resp);
        loop {
            chunk.clear();
            chunk.reserve(READ_CHUNK);
            let n = up.read_buf(&mut chunk).await.map_err(|_| Failed::Midway)?;
            if n == 0 {
                if matches!(framing, Framing::UntilClose) {
                    reusable = false;
                    break;
                }
                return Err(Failed::Midway);
            }
            let mut part = &chunk[..];
            let finished = take_body(&mut framing, &mut part).map_err(|_| Failed::Midway)?;
            let used = chunk.len() - part.len();
            client.write_all(&chunk[..used]).await.map_err(|_| Failed::Midway)?;
            if !part.is_empty() {
                reusable = false;
            }
            if finished {
                break;
            }
        }
        scratch.resp = chunk;
    }
    if reusable {
        checkin(endpoint, up);
    }
    Ok((status, keep))
}

/// Consumes body bytes from `rest` according to `framing`; true when the body is complete.
fn take_body(framing: &mut Framing, rest: &mut &[u8]) -> Result<bool, BadChunk> {
    match framing {
        Framing::None => Ok(true),
        Framing::Length(n) => {
            let take = rest.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
            *n -= take as u64;
            *rest = &rest[take..];
            Ok(*n == 0)
        }
        Framing::Chunked(scanner) => {
            let used = scanner.feed(rest)?;
            *rest = &rest[used..];
            Ok(*scanner == Chunked::Done)
        }
        Framing::UntilClose => {
            *rest = &rest[rest.len()..];
            Ok(false)
        }
    }
}

/// Reads a complete response head into `scratch.resp` (skipping interim 1xx responses other
/// than 101); `Ok(None)` when the connection closed before any byte.
async fn read_response_head(
    up: &mut TcpStream,
    scratch: &mut Scratch,
) -> io::Result<Option<(usize, u16, Framing, bool)>> {
    loop {
        let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut raw);
        match res.parse(&scratch.resp) {
            Ok(httparse::Status::Complete(len)) => {
                let status = res.code.unwrap_or(502);
                if (100..200).contains(&status) && status != 101 {
                    scratch.resp.advance(len);
                    continue;
                }
                scratch.headers.clear();
                let mut framing = Framing::UntilClose;
                let mut close = res.version == Some(0);
                for h in res.headers.iter() {
                    let name = h.name.as_bytes();
                    scratch.headers.push((offset(&scratch.resp, name), offset(&scratch.resp, h.value)));
                    if name.eq_ignore_ascii_case(b"content-length") {
                        let n = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
                        if let (Some(n), false) = (n, matches!(framing, Framing::Chunked(_))) {
                            framing = Framing::Length(n);
                        }
                    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                        let chunked = h
                            .value
                            .split(|b| *b == b',')
                            .next_back()
                            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                        framing =
                            if chunked { Framing::Chunked(Chunked::default()) } else { Framing::UntilClose };
                    } else if name.eq_ignore_ascii_case(b"connection") {
                        close |= h
                            .value
                            .split(|b| *b == b',')
                            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                    }
                }
                if status == 101 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected 101"));
                }
                return Ok(Some((len, status, framing, close)));
            }
            Ok(httparse::Status::Partial) if scratch.resp.len() < MAX_HEAD => {}
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed response head")),
        }
        let n = up.read_buf(&mut scratch.resp).await?;
        if n == 0 {
            return if scratch.resp.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_scanner_finds_the_end() {
        let body =
            b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            let mut s = Chunked::default();
            let first = s.feed(&body[..split]).unwrap();
            assert_eq!(first, split, "nothing ends early");
            let second = s.feed(&body[split..]).unwrap();
            assert_eq!(split + second, body.len() - 4, "split at {split}");
            assert_eq!(s, Chunked::Done);
        }
        let mut s = Chunked::default();
        assert!(s.feed(b"zz\r\n").is_err());
    }

    #[test]
    fn heads_parse_in_place() {
        let raw = b"GET http://reviews.shop:9080/api?x=1 HTTP/1.1\r\nX-User-Group: beta\r\nContent-Length: 3\r\n\r\nabc";
        let mut head = Head::default();
        Head::parse(raw, &mut head).unwrap().unwrap();
        let view = View { head: &head, buf: raw };
        assert_eq!(view.method(), "GET");
        assert_eq!(view.path(), "/api");
        assert_eq!(view.str(head.authority.as_ref().unwrap()), "reviews.shop:9080");
        assert_eq!(head.content_length, 3);
        assert!(!head.unusual && !head.has_host);
        assert!(view.any_header(&HeaderName::from_static("x-user-group"), &mut |v| v == "beta"));

        for unusual in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        ] {
            Head::parse(unusual, &mut head).unwrap().unwrap();
            assert!(head.unusual, "{}", String::from_utf8_lossy(unusual));
        }
        assert!(Head::parse(b"GET / HTTP/1.1\r\nHost: a\r\n", &mut head).unwrap().is_none());
        assert!(Head::parse(b"GARBAGE\r\n\r\n", &mut head).is_err());
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(host_port("reviews:9080"), ("reviews", Some(9080)));
        assert_eq!(host_port("reviews"), ("reviews", None));
        assert_eq!(host_port("[::1]:80"), ("::1", Some(80)));
    }
}
