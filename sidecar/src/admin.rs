//! The admin server (port 15000, loopback only): `/ready`, `/live`, `/metrics`, `/config_dump`,
//! `/certs`, `POST /shutdown`; and the read-only stats listener (port 15020, on the pod IP):
//! `/ready`, `/live`, `/metrics` and the app's rewritten probes (`/app-health/…`, see
//! [`crate::probe`]) and nothing else, for Prometheus and the kubelet's probes.
//! `docs/security.md` says who reaches which.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::store::ConfigStore;
use crate::config::stream::StreamStatus;
use crate::probe::{AppProber, Outcome};

/// What the admin server reads.
pub struct AdminState {
    pub store: Arc<ConfigStore>,
    pub stream: Arc<StreamStatus>,
    pub tls: Arc<crate::tls::TlsStore>,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Ready only once a certificate is loaded too.
    pub needs_cert: bool,
    /// The app containers' probes, run for the kubelet.
    pub app_probes: AppProber,
    pub shutdown: CancellationToken,
}

/// What a listener of the admin server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything: for callers inside the pod.
    Full,
    /// `/ready`, `/live`, `/metrics`: for callers outside it.
    ReadOnly,
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, scope: Scope) {
    loop {
        let (stream, _) = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(req, &state, scope).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

async fn respond(req: Request<Incoming>, state: &AdminState, scope: Scope) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() == Method::GET && path.starts_with(skein_api::probes::APP_HEALTH_PREFIX) {
        let text = "text/plain; charset=utf-8";
        return match state.app_probes.check(path).await {
            Some(Outcome::Healthy(why)) => reply(StatusCode::OK, text, why + "\n"),
            Some(Outcome::Unhealthy(why)) => reply(StatusCode::SERVICE_UNAVAILABLE, text, why + "\n"),
            None => reply(StatusCode::NOT_FOUND, text, "no such probe\n"),
        };
    }
    handle(&req, state, scope)
}

fn handle(req: &Request<Incoming>, state: &AdminState, scope: Scope) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let path = req.uri().path();
    if scope == Scope::ReadOnly && !matches!(path, "/live" | "/ready" | "/metrics") {
        return reply(StatusCode::NOT_FOUND, text, "not found\n");
    }
    match (req.method(), path) {
        (&Method::GET, "/live") => reply(StatusCode::OK, text, "live\n"),
        (&Method::GET, "/ready") => {
            match (state.store.current(), state.needs_cert && state.tls.current().is_none()) {
                (Some(_), false) => reply(StatusCode::OK, text, "ready\n"),
                (None, _) => reply(StatusCode::SERVICE_UNAVAILABLE, text, "no config yet\n"),
                (Some(_), true) => {
                    reply(StatusCode::SERVICE_UNAVAILABLE, text, "no workload certificate yet\n")
                }
            }
        }
        (&Method::GET, "/certs") => {
            let body = match state.tls.current() {
                Some(m) => {
                    serde_json::json!({"identity": m.identity, "trustDomain": m.trust_domain, "notAfter": m.not_after})
                }
                None => serde_json::json!({"identity": null}),
            };
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).expect("plain data serializes"),
            )
        }
        (&Method::GET, "/config_dump") => {
            let body = match state.store.current() {
                Some(active) => serde_json::json!({
                    "version": active.config.version,
                    "source": active.source,
                    "config": active.config,
                }),
                None => serde_json::json!({ "version": null, "source": null, "config": null }),
            };
            reply(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec_pretty(&body).expect("plain data serializes"),
            )
        }
        (&Method::GET, "/metrics") => {
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", metrics(state))
        }
        (&Method::POST, "/shutdown") => {
            state.shutdown.cancel();
            reply(StatusCode::OK, text, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/config_dump" | "/certs" | "/metrics" | "/shutdown") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, text, "method not allowed\n")
        }
        _ => reply(StatusCode::NOT_FOUND, text, "not found\n"),
    }
}

fn metrics(state: &AdminState) -> String {
    let mut out = String::with_capacity(16 * 1024);
    state.store.shared.metrics.render(&mut out);
    let version = state.store.current().map(|a| a.config.version.clone()).unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP skein_config_info The config version in force.\n# TYPE skein_config_info gauge"
    );
    let _ = writeln!(out, "skein_config_info{{version=\"{version}\"}} 1");
    let _ = writeln!(out, "# HELP skein_config_updates_total Configs received, by result.\n# TYPE skein_config_updates_total counter");
    let _ = writeln!(
        out,
        "skein_config_updates_total{{result=\"applied\"}} {}",
        state.store.applied.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "skein_config_updates_total{{result=\"refused\"}} {}",
        state.store.refused.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "# HELP skein_control_plane_connected 1 while the config stream is open.\n# TYPE skein_control_plane_connected gauge");
    let _ = writeln!(
        out,
        "skein_control_plane_connected {}",
        u8::from(state.stream.connected.load(Ordering::Relaxed))
    );
    let _ = writeln!(out, "# HELP skein_control_plane_sessions_total Config streams opened.\n# TYPE skein_control_plane_sessions_total counter");
    let _ =
        writeln!(out, "skein_control_plane_sessions_total {}", state.stream.sessions.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP skein_control_plane_stream_failures_total Config stream sessions that failed, by kind.\n# TYPE skein_control_plane_stream_failures_total counter");
    for (kind, n) in state.stream.failures.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "skein_control_plane_stream_failures_total{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP skein_access_log_dropped_total Access-log lines dropped because stdout fell behind.\n# TYPE skein_access_log_dropped_total counter");
    let _ =
        writeln!(out, "skein_access_log_dropped_total {}", state.access_log_dropped.load(Ordering::Relaxed));
    let tls = &state.tls;
    let _ = writeln!(out, "# HELP skein_tls_handshakes_total mTLS handshakes with peer sidecars, by result.\n# TYPE skein_tls_handshakes_total counter");
    let _ = writeln!(
        out,
        "skein_tls_handshakes_total{{result=\"ok\"}} {}",
        tls.handshakes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "skein_tls_handshakes_total{{result=\"failed\"}} {}",
        tls.handshake_failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "# HELP skein_certificate_reloads_total Workload certificate loads, by result.\n# TYPE skein_certificate_reloads_total counter");
    let _ = writeln!(
        out,
        "skein_certificate_reloads_total{{result=\"applied\"}} {}",
        tls.reloads.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "skein_certificate_reloads_total{{result=\"refused\"}} {}",
        tls.reload_failures.load(Ordering::Relaxed)
    );
    if let Some(m) = tls.current() {
        let _ = writeln!(out, "# HELP skein_certificate_expiry_seconds Unix time the workload certificate expires.\n# TYPE skein_certificate_expiry_seconds gauge");
        let _ = writeln!(out, "skein_certificate_expiry_seconds {}", m.not_after);
    }
    out
}
