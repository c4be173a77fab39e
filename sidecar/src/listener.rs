//! The outbound (15001) and inbound (15006) listeners.
//!
//! A connection redirected by iptables (transparent mode) carries its original destination,
//! read with `SO_ORIGINAL_DST`; one that arrives directly (explicit mode: the app uses the
//! sidecar as its `HTTP_PROXY`) does not. The first bytes decide the protocol: HTTP/1.x and
//! HTTP/2 (prior knowledge) are served by hyper; anything else on a redirected connection, and
//! every port marked opaque, is spliced through as TCP. Explicit connections always speak HTTP,
//! so hyper answers malformed ones with 400.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use skein_api::config::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::balance::now_ns;
use crate::coalesce::Coalesce;
use crate::proxy::authz::{self, Caller};
use crate::proxy::body::ProxyBody;
use crate::proxy::{self, ConnMeta, Direction, ProxyContext};
use crate::stall::StallGuard;

/// How long to wait for a client's first bytes before treating a redirected connection as
/// opaque TCP (server-first protocols such as MySQL never speak first).
const DETECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Binds a listening socket. An IPv6 one is IPv6-only, so `0.0.0.0:P` and `[::]:P` can both be
/// bound, and `[::1]:P` never answers for IPv4.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(SockProtocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether a bind failed because this host (or pod) has no IPv6 at all.
pub fn no_ipv6_here(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL))
}

/// Accepts connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    direction: Direction,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            // Conntrack knows every connection's destination; only one that differs from the
            // socket's own address was redirected.
            let own = stream.local_addr().ok();
            let original = original_destination(&stream).filter(|o| Some(*o) != own);
            handle(stream, ctx, ConnMeta { direction, local, original }).await;
        });
    }
}

async fn handle(stream: TcpStream, ctx: Arc<ProxyContext>, conn: ConnMeta) {
    // Inbound, with an identity: mTLS from mesh peers (and, when not strict, plaintext too).
    if conn.direction == Direction::Inbound {
        if let Some(material) = ctx.tls.current() {
            let mut first = [0u8; 1];
            let tls =
                matches!(tokio::time::timeout(DETECT_TIMEOUT, stream.peek(&mut first)).await, Ok(Ok(1)))
                    && first[0] == 0x16;
            if tls {
                let acceptor = tokio_rustls::TlsAcceptor::from(material.server.clone());
                let stream = StallGuard::new(stream);
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        ctx.tls.handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // The verifier accepted only a chain to the mesh CA with a SPIFFE ID of
                        // the trust domain: that ID is the caller.
                        let caller = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| crate::tls::spiffe_ids(leaf).into_iter().next())
                            .and_then(|id| Caller::from_spiffe_id(&id))
                            .map(Arc::new);
                        // A peer that asked for HTTP/1.1 is served on the fast path first.
                        let alpn = tls.get_ref().1.alpn_protocol();
                        let http1 = alpn == Some(b"http/1.1");
                        if alpn == Some(crate::wire::mux::ALPN) {
                            serve_mux(tls, ctx, conn, caller).await;
                        } else if ctx.fast_path && http1 {
                            if let Some(handoff) =
                                crate::http1::serve(tls, &ctx, conn, caller.as_deref()).await
                            {
                                serve_hyper(handoff, ctx, conn, caller).await;
                            }
                        } else if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                            serve_hyper(Coalesce::new(tls), ctx, conn, caller).await;
                        } else {
                            serve_hyper(tls, ctx, conn, caller).await;
                        }
                    }
                    Ok(Err(e)) => {
                        ctx.tls.handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(error = %e, "refused an inbound TLS connection");
                    }
                    Err(_) => {
                        ctx.tls.handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                return;
            }
            if ctx.inbound_strict {
                ctx.tls.handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("refused a plaintext inbound connection (strict mTLS)");
                return;
            }
        }
    }
    if let Some(original) = conn.original {
        let opaque_port =
            ctx.store.current().and_then(|a| a.table.protocol_of(original)) == Some(Protocol::Tcp);
        if opaque_port || !speaks_http(&stream).await {
            splice(stream, &ctx, conn, original).await;
            return;
        }
    }
    let stream = StallGuard::new(stream);
    if ctx.fast_path {
        match crate::http1::serve(stream, &ctx, conn, None).await {
            // An HTTP/2 client's streams answered in the same round go out in one write.
            Some(handoff) if handoff.is_http2() => serve_hyper(Coalesce::new(handoff), ctx, conn, None).await,
            Some(handoff) => serve_hyper(handoff, ctx, conn, None).await,
            None => {}
        }
    } else {
        serve_hyper(stream, ctx, conn, None).await;
    }
}

/// Serves the multiplexed hop from a peer sidecar that proved `caller`: each request, whole,
/// goes through [`proxy::serve`] as hyper's do.
async fn serve_mux<I>(io: I, ctx: Arc<ProxyContext>, conn: ConnMeta, caller: Option<Arc<Caller>>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handler = move |req: http::Request<Option<bytes::Bytes>>| {
        let req = req.map(|body| body.map_or(ProxyBody::Empty, |b| ProxyBody::Full(Some(b))));
        let answer: crate::wire::mux::server::Answer<ProxyBody> =
            Box::pin(proxy::serve(ctx.clone(), conn, caller.clone(), req));
        answer
    };
    crate::wire::mux::server::serve(io, handler).await;
}

/// Serves HTTP/1.x or HTTP/2 (prior knowledge) with hyper: every request goes through
/// [`proxy::serve`]. The only place the proxy's listeners call hyper.
async fn serve_hyper<I>(io: I, ctx: Arc<ProxyContext>, conn: ConnMeta, caller: Option<Arc<Caller>>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let head_timeout = ctx.head_timeout;
    // Boxed once here: hyper's HTTP/2 server moves each stream's future into a task of its own,
    // and a request's future is kilobytes (every path it may take).
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        Box::pin(proxy::serve(ctx.clone(), conn, caller.clone(), req.map(ProxyBody::Incoming)))
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(crate::wire::MAX_HEAD)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Peeks at the first bytes: an HTTP/1.x request line or the HTTP/2 preface.
async fn speaks_http(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    let peeked = tokio::time::timeout(DETECT_TIMEOUT, stream.peek(&mut buf)).await;
    let Ok(Ok(n)) = peeked else { return false };
    looks_like_http(&buf[..n])
}

/// Whether the first bytes of a connection are HTTP.
pub fn looks_like_http(first: &[u8]) -> bool {
    const STARTS: [&[u8]; 10] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"HEAD ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
        b"PRI * HTTP/2",
    ];
    STARTS.iter().any(|s| {
        let n = s.len().min(first.len());
        n >= 3 && first[..n] == s[..n]
    })
}

/// Opaque TCP: connect to the destination (balanced over its endpoints when it is a mesh
/// Service) and copy bytes both ways.
async fn splice(mut client: TcpStream, ctx: &ProxyContext, conn: ConnMeta, original: SocketAddr) {
    let upstream = match conn.direction {
        Direction::Inbound if !ctx.inbound_port_allowed(original.port()) => {
            tracing::info!(
                port = original.port(),
                "refused inbound traffic for one of the proxy's own ports"
            );
            return;
        }
        Direction::Inbound => {
            // Opaque TCP arrives in plaintext: the caller has no identity, and HTTP fields of
            // a rule cannot be checked (see `skein_api::authz`).
            let active = ctx.store.current();
            match authz::check(
                active.as_deref(),
                &ctx.store.shared.metrics.authz,
                None,
                original.port(),
                None,
            ) {
                Ok(v) if v.allowed => SocketAddr::new(ctx.inbound_target, original.port()),
                Ok(v) => {
                    tracing::info!(port = original.port(), authz = %v.log, "closed a denied inbound connection");
                    return;
                }
                Err(authz::NoConfig) => {
                    tracing::info!(port = original.port(), "closed an inbound connection: no config yet");
                    return;
                }
            }
        }
        Direction::Outbound => {
            let picked = ctx.store.current().and_then(|a| {
                let parts = http::Request::new(()).into_parts().0;
                a.table
                    .resolve(None, None, Some(original), &parts)
                    .ok()
                    .and_then(|t| t.pool.pick(now_ns()))
                    .map(|p| p.endpoint.addr)
            });
            picked.unwrap_or(original)
        }
    };
    match TcpStream::connect(upstream).await {
        Ok(mut server) => {
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        }
        Err(e) => tracing::debug!(%upstream, error = %e, "opaque connection failed"),
    }
}

/// The original destination of a connection redirected by iptables `REDIRECT`
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6); `None` otherwise.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => {
            let addr = getsockopt(stream, sockopt::OriginalDst).ok()?;
            let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
        }
        SocketAddr::V6(_) => {
            let addr = getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
            let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(addr.sin6_port))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_http_by_its_first_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"PRI * HTTP/2.0\r\n"));
        assert!(looks_like_http(b"DELETE /x"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00")); // a TLS ClientHello
        assert!(!looks_like_http(b"SSH-2.0-OpenSSH"));
        assert!(!looks_like_http(b""));
    }
}
