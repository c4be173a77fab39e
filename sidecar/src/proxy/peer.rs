//! Connections to peer sidecars: one multiplexed HTTP/2 connection over mTLS per peer and
//! expected identity, made on first use and shared by every request to that peer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;

use super::body::ProxyBody;
use super::ProxyContext;
use crate::route::retry::Failure;

/// Connections to peer sidecars, by address and the identity they proved.
pub(crate) type PeerConnections = std::collections::HashMap<
    SocketAddr,
    (skein_api::WorkloadIdentity, hyper::client::conn::http2::SendRequest<ProxyBody>),
>;

/// The multiplexed connection to a peer sidecar, made (TCP, mTLS, HTTP/2) on first use.
pub(super) async fn peer_connection(
    ctx: &ProxyContext,
    peer: SocketAddr,
    identity: &skein_api::WorkloadIdentity,
    material: &crate::tls::TlsMaterial,
) -> Result<hyper::client::conn::http2::SendRequest<ProxyBody>, Failure> {
    // Looked up per request: no allocation, a short lock.
    let live = |ctx: &ProxyContext| {
        let peers = ctx.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&peer).filter(|(id, s)| id == identity && !s.is_closed()).map(|(_, s)| s.clone())
    };
    if let Some(sender) = live(ctx) {
        return Ok(sender);
    }
    // One connection per peer: whoever comes second waits for the first and shares it.
    let _connecting = ctx.peer_connect.lock().await;
    if let Some(sender) = live(ctx) {
        return Ok(sender);
    }
    let tls =
        connect_peer(ctx, peer, identity, material.client_for(&identity.spiffe_id(&material.trust_domain)))
            .await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|_| Failure::ConnectFailure)?;
    tokio::spawn(conn);
    ctx.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, (identity.clone(), sender.clone()));
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
