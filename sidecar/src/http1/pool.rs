//! Idle upstream connections of the fast path, per endpoint (kept on its `EndpointState`), each
//! with when it was last used; a connection idle too long is not reused.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::balance::EndpointState;

/// Idle upstream connections older than this are not reused (servers close idle keep-alive
/// connections after a few seconds; reusing one that is closing fails the request).
const POOL_TTL: Duration = Duration::from_secs(4);
const POOL_MAX: usize = 64;
/// A connection idle at least this long is peeked before reuse; one used moments ago is not
/// worth a syscall (servers close idle connections after seconds, not milliseconds).
const PEEK_AFTER: Duration = Duration::from_millis(250);

pub(super) fn checkout(endpoint: &EndpointState) -> Option<TcpStream> {
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    while let Some((s, at)) = idle.pop() {
        let idle_for = at.elapsed();
        if idle_for < POOL_TTL && (idle_for < PEEK_AFTER || still_open(&s)) {
            return Some(s);
        }
    }
    None
}

/// Whether an idle connection is still open and quiet: the server has neither closed it (a
/// peek reads the end of the stream) nor sent anything unasked. One non-blocking syscall; it
/// catches the common stale connection before a request is written to it, so a request that
/// cannot be re-sent (not idempotent) rarely meets one.
fn still_open(s: &TcpStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    matches!(
        recv(s.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
        Err(nix::errno::Errno::EAGAIN)
    )
}

pub(super) fn checkin(endpoint: &EndpointState, stream: TcpStream) {
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < POOL_MAX {
        idle.push((stream, Instant::now()));
    }
}
