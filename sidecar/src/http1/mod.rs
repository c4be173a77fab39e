//! The HTTP/1.1 fast path: plain request/response forwarding without hyper's per-request
//! machinery (channels, pooled-client bookkeeping, header maps).
//!
//! Each client connection is one task: it parses a request head in place (httparse), decides
//! the destination with the same route table, picks an endpoint with the same balancer, writes
//! the rewritten head and the body to an idle upstream connection of that endpoint, and copies
//! the response back, framing bodies by `Content-Length` or by scanning chunked encoding. Metrics,
//! outlier detection, trace headers and the access log are the same as on the general path.
//!
//! Between sidecars it serves both ends of the hop: a meshed endpoint is reached over pooled
//! HTTP/1.1 connections over mTLS to its sidecar's inbound listener (ALPN `http/1.1`, the
//! peer's SPIFFE ID checked), naming the app port in `x-skein-inbound-port`; that listener
//! serves such a connection here too, deciding access for the caller's verified identity.
//!
//! Anything this path does not handle — HTTP/1.0, `CONNECT`, upgrades, `Expect`, chunked request
//! bodies, destinations with retries or timeouts, passthrough hosts, a meshed endpoint without
//! an identity of our own, inbound denials and paths the app must be sent normalised, errors —
//! is handed back:
//! [`serve`] returns a [`HandOff`] holding the connection and the bytes already read, and the
//! listener gives it to hyper for the rest of its life (the shape of linkerd2-proxy's protocol
//! detection). So the fast path only ever takes the common case, the general path decides
//! everything else, and this module never calls hyper.
//!
//! Here: `head` (request heads parsed in place), `framing` (where bodies end), `pool` (idle
//! upstream connections), `forward` (one request and its response). Depends on `proxy` (the
//! context and the shared observe step), `route`, `balance` and `telemetry`.

mod forward;
pub(crate) mod fuzz;
mod head;
mod mux;
mod outcome;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::balance::EndpointState;
use crate::proxy::authz::{self, Caller};
use crate::proxy::{ConnMeta, Direction, ProxyContext};
use crate::route::table::RequestView;
use forward::{forward, Route, Scratch};
use head::{fill_head, host_port, Head, Idle, View};

/// Serves a client connection on the fast path for as long as its requests allow; returns the
/// connection when the rest of it is for hyper, `None` when it is done. `stream` is a plain
/// TCP connection, or on the inbound side an mTLS one from a peer sidecar that proved
/// `caller`.
pub async fn serve<S>(
    mut stream: S,
    ctx: &ProxyContext,
    conn: ConnMeta,
    caller: Option<&Caller>,
) -> Option<HandOff<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut head = Head::default();
    let mut scratch = Scratch::default();
    let mut inbound: Option<(u16, Arc<EndpointState>)> = None;
    let mut idle = Idle::new();
    loop {
        match fill_head(&mut stream, &mut buf, &mut head, &mut idle, ctx.head_timeout).await {
            Ok(true) => {}
            Ok(false) => return None,
            // Malformed: hyper gives the proper 400 answer.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => break,
            // Larger than hyper would take either: the same answer, without handing over.
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                let _ = forward::answer(
                    &mut stream,
                    431,
                    "request header fields too large",
                    "head-too-large",
                    true,
                )
                .await;
                return None;
            }
            Err(_) => return None,
        }
        if head.unusual || ctx.max_request_body.is_some_and(|limit| head.content_length > limit) {
            break; // hyper's path decides, or answers 413
        }
        let view = View { head: &head, buf: &buf };
        let authority = head.authority.as_ref().map(|r| view.str(r));
        let (host, port) = authority.map(host_port).map_or((None, None), |(h, p)| (Some(h), p));
        let active = ctx.store.current();
        let target = match conn.direction {
            Direction::Inbound => {
                // The app port, as on the general path: the connection's original destination,
                // else what the calling sidecar named, else the authority's port.
                let named = match &head.inbound_port {
                    Some(r) => match view.str(r).parse::<u16>() {
                        Ok(p) => Some(p),
                        Err(_) => break,
                    },
                    None => None,
                };
                if authority.is_none() && conn.original.is_none() {
                    break; // hyper's path answers 400
                }
                let Some(port) = conn.original.map(|o| o.port()).or(named).or(port) else { break };
                if !ctx.inbound_port_allowed(port) {
                    break; // hyper's path answers 403
                }
                // A denial (or no config yet) is hyper's path to answer and count, and so is a
                // path the app must be sent normalised.
                let path = view.str(&head.path);
                if authz::rewritten_path(active.as_deref(), port, path).is_some() {
                    break;
                }
                let http = Some((view.str(&head.method), path));
                let authz = match authz::decide(active.as_deref(), caller, port, http) {
                    Ok(None) => String::new(),
                    Ok(Some(d)) if d.allowed => authz::record(&ctx.store.shared.metrics.authz, &d).log,
                    Ok(Some(_)) | Err(authz::NoConfig) => break,
                };
                let endpoint = match &inbound {
                    Some((p, e)) if *p == port => e.clone(),
                    _ => {
                        let e = ctx.store.shared.endpoint(SocketAddr::new(ctx.inbound_target, port));
                        inbound = Some((port, e.clone()));
                        e
                    }
                };
                Route { endpoint: Some(endpoint), pool: None, series: ctx.inbound.clone(), authz }
            }
            Direction::Outbound => {
                if head.inbound_port.is_some() {
                    break; // a header for sidecars: the general path replaces it
                }
                let resolved = active.as_ref().map(|a| a.table.resolve(host, port, conn.original, &view));
                match resolved {
                    Some(Ok(t))
                        if t.timeout.is_none()
                            && (!t.pool.meshed || ctx.tls.current().is_some())
                            && t.protocol == skein_api::config::Protocol::Http
                            && t.retry
                                .as_ref()
                                .is_none_or(|r| r.attempts == 0 || !r.method_allowed_str(view.method())) =>
                    {
                        Route {
                            endpoint: None,
                            pool: Some(t.pool.clone()),
                            series: t.series.clone(),
                            authz: String::new(),
                        }
                    }
                    _ => break,
                }
            }
        };
        match forward(&mut stream, &mut buf, &head, ctx, conn, target, &mut scratch).await {
            Ok(true) => continue,
            Ok(false) | Err(_) => return None,
        }
    }
    Some(HandOff { prefix: buf.freeze(), inner: stream })
}

/// A connection the fast path hands over: the bytes it already read, then the socket. As I/O
/// it reads the prefix first, so hyper sees the connection from its first byte.
pub struct HandOff<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> HandOff<S> {
    /// Whether the connection opened with HTTP/2's preface (prior knowledge).
    pub fn is_http2(&self) -> bool {
        self.prefix.starts_with(b"PRI * HTTP/2.0\r\n")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HandOff<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for HandOff<S> {
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
