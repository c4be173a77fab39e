//! The config stream server (port 15012): one long-lived HTTP/2 request per proxy.
//!
//! Protocol: the proxy `POST`s to [`CONFIG_STREAM_PATH`] naming its identity in
//! [`IDENTITY_HEADER`] (mTLS client certificates take this over with the identity work). The
//! response body is a stream of JSON lines, one `ProxyConfig` each: the full config first, then a
//! new one on every change (latest wins: a slow proxy skips versions, it never queues them). The
//! request body, open in the other direction of the same HTTP/2 stream, carries one `StreamAck`
//! line per config received. HTTP/2 keepalive pings find dead peers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use skein_api::constants::{CONFIG_STREAM_PATH, IDENTITY_HEADER, PROXY_ID_HEADER};
use skein_api::{StreamAck, WorkloadIdentity};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::hub::{ConfigHub, ConnectionId, Pushed};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Acknowledgement lines longer than this are refused (they are a few dozen bytes).
const MAX_ACK_LINE: usize = 64 * 1024;

/// Serves the config stream until `shutdown` fires; open streams then end so proxies reconnect
/// to another replica.
pub async fn serve(listener: TcpListener, hub: ConfigHub, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "config stream accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let hub = hub.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc_shutdown = shutdown.clone();
            let service = service_fn(move |req| {
                let response = handle(req, peer, &hub, &svc_shutdown);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(10)))
                .keep_alive_timeout(Duration::from_secs(20));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "config stream connection ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{text}\n"))).boxed_unsync());
    *response.status_mut() = status;
    response
}

fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    hub: &ConfigHub,
    shutdown: &CancellationToken,
) -> Response<Body> {
    if req.uri().path() != CONFIG_STREAM_PATH {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "the config stream is a POST");
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let identity: WorkloadIdentity = match header(IDENTITY_HEADER).map(|v| v.parse()) {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return plain(StatusCode::BAD_REQUEST, &e),
        None => return plain(StatusCode::BAD_REQUEST, &format!("missing {IDENTITY_HEADER} header")),
    };
    let proxy_id = header(PROXY_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 253)
        .unwrap_or_else(|| peer.to_string());
    tracing::info!(%identity, proxy = %proxy_id, %peer, "proxy connected");
    let (conn, receiver) = hub.connect(identity, proxy_id.clone());

    tokio::spawn(read_acks(req.into_body(), conn, hub.clone(), proxy_id));

    let guard = Disconnect { hub: hub.clone(), conn };
    let state = (receiver, guard, true, shutdown.clone());
    let lines = futures::stream::unfold(state, |(mut receiver, guard, first, shutdown)| async move {
        if !first {
            tokio::select! {
                changed = receiver.changed() => changed.ok()?,
                _ = shutdown.cancelled() => return None,
            }
        }
        let pushed: Arc<Pushed> = receiver.borrow_and_update().clone();
        Some((Ok::<_, Infallible>(Frame::data(pushed.line.clone())), (receiver, guard, false, shutdown)))
    });
    let mut response = Response::new(StreamBody::new(lines).boxed_unsync());
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
    response
}

/// Unregisters the proxy when its response stream is dropped (the peer went away or the
/// server is shutting down).
struct Disconnect {
    hub: ConfigHub,
    conn: ConnectionId,
}

impl Drop for Disconnect {
    fn drop(&mut self) {
        self.hub.disconnect(self.conn);
    }
}

async fn read_acks(mut body: Incoming, conn: ConnectionId, hub: ConfigHub, proxy_id: String) {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        let Ok(data) = frame.into_data() else { continue };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line = buffer.split_to(end + 1);
            match serde_json::from_slice::<StreamAck>(&line[..end]) {
                Ok(ack) => hub.acknowledge(conn, ack),
                Err(e) => tracing::warn!(proxy = %proxy_id, error = %e, "ignoring malformed acknowledgement"),
            }
        }
        if buffer.len() > MAX_ACK_LINE {
            tracing::warn!(proxy = %proxy_id, "acknowledgement line too long; closing the ack stream");
            break;
        }
    }
}
