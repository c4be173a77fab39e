//! Idle upstream connections of the fast path, per endpoint (kept on its `EndpointState`), each
//! with when it was last used; a connection idle too long is not reused.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::balance::EndpointState;

/// Idle upstream connections older than this are not reused (servers close idle keep-alive
/// connections after a few seconds; reusing one that is closing fails the request).
const POOL_TTL: Duration = Duration::from_secs(4);
const POOL_MAX: usize = 64;

pub(super) fn checkout(endpoint: &EndpointState) -> Option<TcpStream> {
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    while let Some((s, at)) = idle.pop() {
        if at.elapsed() < POOL_TTL {
            return Some(s);
        }
    }
    None
}

pub(super) fn checkin(endpoint: &EndpointState, stream: TcpStream) {
    let mut idle = endpoint.idle.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < POOL_MAX {
        idle.push((stream, Instant::now()));
    }
}
