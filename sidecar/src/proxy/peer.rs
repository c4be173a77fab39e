//! Connections to peer sidecars for hyper's path: HTTP/1.1 over mTLS (ALPN `http/1.1`), pooled
//! per peer address and expected identity, a connection per request in flight. The callee
//! serves them on its HTTP/1 fast path (as it does the fast path's own pooled connections).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::body::ProxyBody;
use super::ProxyContext;
use crate::route::retry::Failure;

/// At most this many connections per peer and identity are kept for reuse (busy or idle).
const POOL_MAX: usize = 64;
/// A connection last used longer ago is not used again: well before the peer's inbound
/// listener closes an idle connection (two minutes), so a request never races that close.
const IDLE_MAX: Duration = Duration::from_secs(60);

/// Connections to peer sidecars, by address and the identity they proved: each one busy with
/// a response or ready for the next request, with when it was last given one.
pub(crate) type PeerConnections = std::collections::HashMap<
    (SocketAddr, skein_api::WorkloadIdentity),
    Vec<(SendRequest<ProxyBody>, Instant)>,
>;

/// Sends `req` (origin-form, `Host` naming the app's authority) to the sidecar at `peer`, which
/// must prove `identity`, over a ready pooled connection or a new one. A request a pooled
/// connection could not take (it closed meanwhile) goes on a new one; it was never sent.
pub(super) async fn send(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    material: &crate::tls::TlsMaterial,
    mut req: http::Request<ProxyBody>,
) -> Result<http::Response<Incoming>, Failure> {
    let key = (peer, identity.clone());
    loop {
        let (mut sender, fresh) = match checkout(ctx, &key) {
            Some(s) => (s, false),
            None => (connect(ctx, peer, identity, material).await?, true),
        };
        match sender.try_send_request(req).await {
            Ok(response) => {
                checkin(ctx, key, sender);
                return Ok(response);
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if !fresh => req = unsent,
                _ if super::body::request_body_failed(e.error()) => return Err(Failure::ClientBody),
                _ => return Err(Failure::Reset),
            },
        }
    }
}

/// A pooled connection ready for a request; closed ones are dropped on the way.
fn checkout(
    ctx: &ProxyContext,
    key: &(SocketAddr, skein_api::WorkloadIdentity),
) -> Option<SendRequest<ProxyBody>> {
    let mut peers = ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
    let pool = peers.get_mut(key)?;
    pool.retain(live);
    let ready = pool.iter().position(|(s, _)| s.is_ready())?;
    Some(pool.swap_remove(ready).0)
}

/// Open and used recently enough to be used again.
fn live((sender, used): &(SendRequest<ProxyBody>, Instant)) -> bool {
    !sender.is_closed() && used.elapsed() < IDLE_MAX
}

/// Keeps a connection (busy until its response ends) for later requests.
fn checkin(
    ctx: &ProxyContext,
    key: (SocketAddr, skein_api::WorkloadIdentity),
    sender: SendRequest<ProxyBody>,
) {
    let mut peers = ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
    let pool = peers.entry(key).or_default();
    if pool.len() < POOL_MAX {
        pool.push((sender, Instant::now()));
    }
}

/// A new HTTP/1.1 connection over mTLS to a peer sidecar. Pools of peers that are gone (every
/// connection closed) are forgotten here, so the map holds live peers only.
async fn connect(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    material: &crate::tls::TlsMaterial,
) -> Result<SendRequest<ProxyBody>, Failure> {
    ctx.peers.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, pool| {
        pool.retain(live);
        !pool.is_empty()
    });
    let config = material.client_http1_for(&identity.spiffe_id(&material.trust_domain));
    let tls = connect_peer(ctx, peer, identity, config).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|_| Failure::ConnectFailure)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A TCP connection to a peer sidecar wrapped in mTLS, the peer's certificate checked for
/// `identity`'s SPIFFE ID.
pub(crate) async fn connect_peer(
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
