//! Upstream connections of the fast path and the idle ones, per endpoint (kept on its
//! `EndpointState`), each with when it was last used; a connection idle too long is not reused.
//! To an app endpoint a connection is plain TCP; to a meshed endpoint it is mTLS to the
//! endpoint's sidecar (ALPN `http/1.1`), the peer's SPIFFE ID checked at the handshake.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::balance::endpoint::PeerStream;
use crate::balance::EndpointState;

/// Idle app connections older than this are not reused (servers close idle keep-alive
/// connections after a few seconds; reusing one that is closing fails the request).
const POOL_TTL: Duration = Duration::from_secs(4);
/// Idle connections to a peer sidecar last longer: its inbound listener keeps an idle client
/// connection for two minutes, and a new one costs a TLS handshake.
const PEER_TTL: Duration = Duration::from_secs(60);
const POOL_MAX: usize = 64;
/// A connection idle at least this long is peeked before reuse; one used moments ago is not
/// worth a syscall (servers close idle connections after seconds, not milliseconds).
const PEEK_AFTER: Duration = Duration::from_millis(250);

/// An upstream connection: to the app, or over mTLS to a meshed endpoint's sidecar.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Peer(PeerStream),
}

impl Upstream {
    fn fd(&self) -> RawFd {
        match self {
            Self::Plain(s) => s.as_raw_fd(),
            Self::Peer(s) => s.get_ref().0.as_raw_fd(),
        }
    }
}

pub(crate) fn checkout(endpoint: &EndpointState) -> Option<Upstream> {
    if endpoint.via_proxy.is_some() {
        let mut idle = endpoint.idle_tls.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((s, at)) = idle.pop() {
            let s = Upstream::Peer(s);
            if reusable(&s, at, PEER_TTL) {
                return Some(s);
            }
        }
        return None;
    }
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    while let Some((s, at)) = idle.pop() {
        let s = Upstream::Plain(s);
        if reusable(&s, at, POOL_TTL) {
            return Some(s);
        }
    }
    None
}

fn reusable(s: &Upstream, at: Instant, ttl: Duration) -> bool {
    let idle_for = at.elapsed();
    idle_for < ttl && (idle_for < PEEK_AFTER || still_open(s.fd()))
}

/// Whether an idle connection is still open and quiet: the server has neither closed it (a
/// peek reads the end of the stream, or a TLS alert) nor sent anything unasked. One
/// non-blocking syscall; it catches the common stale connection before a request is written to
/// it, so a request that cannot be re-sent (not idempotent) rarely meets one.
fn still_open(fd: RawFd) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let mut byte = [0u8; 1];
    matches!(recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Err(nix::errno::Errno::EAGAIN))
}

pub(crate) fn checkin(endpoint: &EndpointState, stream: Upstream) {
    match stream {
        Upstream::Plain(s) => {
            let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < POOL_MAX {
                idle.push((s, Instant::now()));
            }
        }
        Upstream::Peer(s) => {
            let mut idle = endpoint.idle_tls.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < POOL_MAX {
                idle.push((s, Instant::now()));
            }
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Peer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Peer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Peer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Peer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
