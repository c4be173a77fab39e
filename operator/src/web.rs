//! The operator's plain HTTP server (port 8080): `/metrics`, `/healthz`, `/readyz`, and the
//! service graph at `/topology` (a page) and `/topology.json`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the server reads.
pub struct HttpState {
    pub registry: Registry,
    /// Ready once every watcher has listed its kind and the stream server is listening.
    pub ready: watch::Receiver<bool>,
    /// The connected proxies and their traffic, for the topology.
    pub hub: crate::stream::hub::ConfigHub,
}

pub async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = handle(&req, &state);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn handle(req: &Request<Incoming>, state: &HttpState) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if *state.ready.borrow() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => {
            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "waiting for the initial lists\n".to_string())
        }
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => {
                    (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
                }
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
            }
        }
        "/topology" => {
            (StatusCode::OK, "text/html; charset=utf-8", crate::stream::topology::PAGE.to_string())
        }
        "/topology.json" => match serde_json::to_string_pretty(&state.hub.topology()) {
            Ok(json) => (StatusCode::OK, "application/json", json),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}
