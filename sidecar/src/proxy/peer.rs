//! Connections to peer sidecars for hyper's path: HTTP/1.1 over mTLS (ALPN `http/1.1`), pooled
//! per peer address and expected identity, a connection per request in flight. The callee
//! serves them on its HTTP/1 fast path (as it does the fast path's own pooled connections).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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

/// One pooled connection to a peer sidecar: the identity it proved, and when it was last
/// given a request (it is busy until that response ends).
pub(crate) struct Pooled {
    identity: skein_api::WorkloadIdentity,
    sender: SendRequest<ProxyBody>,
    used: Instant,
}

/// Connections to peer sidecars, by address.
pub(crate) type PeerConnections = std::collections::HashMap<SocketAddr, Vec<Pooled>>;

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
    loop {
        let (mut pooled, fresh) = match checkout(ctx, peer, identity) {
            Some(p) => (p, false),
            None => (connect(ctx, peer, identity, material).await?, true),
        };
        match pooled.sender.try_send_request(req).await {
            Ok(response) => {
                checkin(ctx, peer, pooled);
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

/// A pooled connection to `peer`, made for `identity`, ready for a request; closed and stale
/// ones are dropped on the way.
fn checkout(ctx: &ProxyContext, peer: SocketAddr, identity: &skein_api::WorkloadIdentity) -> Option<Pooled> {
    let mut peers = ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
    let pool = peers.get_mut(&peer)?;
    let now = Instant::now();
    pool.retain(|p| live(p, now));
    let ready = pool.iter().position(|p| p.identity == *identity && p.sender.is_ready())?;
    Some(pool.swap_remove(ready))
}

/// Open and used recently enough to be used again.
fn live(pooled: &Pooled, now: Instant) -> bool {
    !pooled.sender.is_closed() && now.saturating_duration_since(pooled.used) < IDLE_MAX
}

/// Keeps a connection (busy until its response ends) for later requests.
fn checkin(ctx: &ProxyContext, peer: SocketAddr, mut pooled: Pooled) {
    let mut peers = ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
    let pool = peers.entry(peer).or_default();
    if pool.len() < POOL_MAX {
        pooled.used = Instant::now();
        pool.push(pooled);
    }
}

/// A new HTTP/1.1 connection over mTLS to a peer sidecar. Pools of peers that are gone (every
/// connection closed) are forgotten here, so the map holds live peers only.
async fn connect(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    material: &crate::tls::TlsMaterial,
) -> Result<Pooled, Failure> {
    let now = Instant::now();
    ctx.peers.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, pool| {
        pool.retain(|p| live(p, now));
        !pool.is_empty()
    });
    let tls = connect_peer(ctx, peer, identity, material, false).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|_| Failure::ConnectFailure)?;
    tokio::spawn(conn);
    Ok(Pooled { identity: identity.clone(), sender, used: now })
}

/// A new connection to `endpoint` for the fast path's pool: TCP to an app endpoint, or mTLS to
/// a meshed endpoint's sidecar, its certificate checked for the endpoint's identity. A meshed
/// endpoint is not called without this sidecar's own identity.
pub(crate) async fn connect_upstream(
    ctx: &ProxyContext,
    endpoint: &crate::balance::EndpointState,
) -> Result<crate::wire::pool::Upstream, Failure> {
    use crate::wire::pool::Upstream;
    match (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current()) {
        (Some((peer, _)), Some(identity), Some(material)) => {
            let tls = connect_peer(ctx, *peer, identity, &material, false).await?;
            Ok(Upstream::Peer(Box::new(tls)))
        }
        (Some(_), _, _) => Err(Failure::ConnectFailure),
        (None, _, _) => {
            let s = tokio::time::timeout(ctx.connect_timeout, tokio::net::TcpStream::connect(endpoint.addr))
                .await
                .map_err(|_| Failure::ConnectFailure)?
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => Failure::Refused,
                    _ => Failure::ConnectFailure,
                })?;
            let _ = s.set_nodelay(true);
            Ok(Upstream::Plain(s))
        }
    }
}

/// A TCP connection to a peer sidecar wrapped in mTLS (ALPN `http/1.1`, after the multiplexed
/// hop's when `mux`), the peer's certificate checked for `identity`'s SPIFFE ID.
pub(crate) async fn connect_peer(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    material: &crate::tls::TlsMaterial,
    mux: bool,
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
    let config = material.client_offering(&identity.spiffe_id(&material.trust_domain), mux);
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
