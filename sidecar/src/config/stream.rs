//! The proxy's side of the config stream: connect to the operator, put every config received in
//! force, acknowledge each version (or say why it was refused), and reconnect with jittered
//! exponential backoff when the stream breaks. The data plane keeps its last good config all
//! the while; a control plane that is down never stops traffic.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use skein_api::config::{DeltaLine, DELTA_PREFIX};
use skein_api::constants::{
    CONFIG_STREAM_PATH, CONFIG_STREAM_PORT, DELTA_HEADER, IDENTITY_HEADER, PROXY_ID_HEADER,
};
use skein_api::lines::LineBuffer;
use skein_api::{ProxyConfig, ProxyMessage, StreamAck, WorkloadIdentity};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::store::{ConfigStore, Source};

/// Configs larger than this are refused rather than buffered without bound.
const MAX_CONFIG_LINE: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the proxy reports its traffic counters to the operator (for the topology).
const TRAFFIC_REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// Where the operator is and who this proxy is.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    pub url: Uri,
    pub identity: WorkloadIdentity,
    pub proxy_id: String,
    /// With an `https` URL: the workload certificate presented to the operator.
    pub tls: Option<Arc<crate::tls::TlsStore>>,
}

/// A connection the stream runs on: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Stream health, read by the admin server.
#[derive(Default, Debug)]
pub struct StreamStatus {
    pub connected: AtomicBool,
    pub sessions: AtomicU64,
    /// Sessions that failed, by [`SessionError::metric_label`].
    pub failures: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl StreamStatus {
    fn failed(&self, e: &SessionError) {
        *self.failures.lock().unwrap_or_else(|p| p.into_inner()).entry(e.metric_label()).or_default() += 1;
    }
}

/// Why a config stream session ended in failure.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("control-plane URL has no host")]
    NoHost,
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no workload certificate yet for the https control plane")]
    NoCertificate,
    #[error("control-plane host {0:?} is not a TLS server name")]
    ServerName(String),
    #[error("TLS handshake with the operator timed out")]
    TlsTimeout,
    #[error("TLS handshake with the operator")]
    Tls(#[source] std::io::Error),
    #[error("HTTP/2 handshake")]
    Handshake(#[source] hyper::Error),
    #[error("building the stream request")]
    Request(#[source] http::Error),
    #[error("opening the stream")]
    Open(#[source] hyper::Error),
    #[error("operator answered {status}: {body}")]
    Refused { status: StatusCode, body: String },
    #[error("reading the stream")]
    Read(#[source] hyper::Error),
    #[error("a config line exceeds {MAX_CONFIG_LINE} bytes")]
    LineTooLong,
}

impl SessionError {
    /// The `kind` label of `skein_control_plane_stream_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoHost | Self::ServerName(_) => "config",
            Self::ConnectTimeout { .. } | Self::Connect { .. } => "connect",
            Self::NoCertificate => "no-certificate",
            Self::TlsTimeout | Self::Tls(_) => "tls",
            Self::Handshake(_) | Self::Request(_) | Self::Open(_) | Self::Read(_) => "http",
            Self::Refused { .. } => "refused",
            Self::LineTooLong => "line-too-long",
        }
    }
}

/// Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff and
/// Jitter"): the n-th delay is uniform in [0, min(max, base·2ⁿ)], so reconnecting proxies spread
/// out instead of stampeding a restarted operator.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Keeps a stream to the operator open until `shutdown`.
pub async fn run(
    cp: ControlPlane,
    store: Arc<ConfigStore>,
    status: Arc<StreamStatus>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = session(&cp, &store, &status) => outcome,
        };
        status.connected.store(false, Ordering::Relaxed);
        match outcome {
            Ok(received) => {
                if received > 0 {
                    backoff.reset();
                }
                tracing::info!(received, "config stream ended; reconnecting");
            }
            Err(e) => {
                status.failed(&e);
                let error = skein_api::process::error_chain(&e);
                tracing::warn!(url = %cp.url, %error, "config stream failed; the last good config stays in force")
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One stream: returns how many configs it received before it ended.
async fn session(cp: &ControlPlane, store: &ConfigStore, status: &StreamStatus) -> Result<u64, SessionError> {
    let host = cp.url.host().ok_or(SessionError::NoHost)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = cp.url.port_u16().unwrap_or(CONFIG_STREAM_PORT);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| SessionError::ConnectTimeout { addr: format!("{host}:{port}") })?
        .map_err(|source| SessionError::Connect { addr: format!("{host}:{port}"), source })?;
    let _ = tcp.set_nodelay(true);
    let secure = cp.url.scheme_str() == Some("https");
    let io: Box<dyn Io> = if secure {
        let material = cp.tls.as_ref().and_then(|t| t.current()).ok_or(SessionError::NoCertificate)?;
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| SessionError::ServerName(host.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(material.control_plane_client());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| SessionError::TlsTimeout)?
            .map_err(SessionError::Tls)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(SessionError::Handshake)?;
    let driver = tokio::spawn(connection);

    let (acks, ack_body) = mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
    let uri = Uri::builder()
        .scheme(if secure { "https" } else { "http" })
        .authority(format!("{host}:{port}").as_str())
        .path_and_query(CONFIG_STREAM_PATH)
        .build()
        .map_err(SessionError::Request)?;
    let request = Request::post(uri)
        .header(IDENTITY_HEADER, cp.identity.to_string())
        .header(PROXY_ID_HEADER, cp.proxy_id.as_str())
        .header(DELTA_HEADER, "1")
        .body(StreamBody::new(ack_body))
        .map_err(SessionError::Request)?;
    let response = sender.send_request(request).await.map_err(SessionError::Open)?;
    if response.status() != StatusCode::OK {
        let status_code = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        driver.abort();
        return Err(SessionError::Refused {
            status: status_code,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    status.connected.store(true, Ordering::Relaxed);
    status.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::info!(url = %cp.url, identity = %cp.identity, "config stream open");

    let mut body = response.into_body();
    let mut lines = LineBuffer::new(MAX_CONFIG_LINE);
    let mut received = 0u64;
    let mut report_tick = tokio::time::interval(TRAFFIC_REPORT_INTERVAL);
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = None;
    let result = loop {
        let next = tokio::select! {
            frame = body.frame() => frame,
            _ = report_tick.tick() => {
                // Unchanged counters are not sent again: an idle proxy costs the operator nothing.
                let report = store.shared.metrics.traffic_report();
                if last_report.as_ref() != Some(&report) {
                    let mut bytes = serde_json::to_vec(&ProxyMessage::Traffic { traffic: report.clone() })
                        .expect("plain data serializes");
                    bytes.push(b'\n');
                    if acks.unbounded_send(Ok(Frame::data(Bytes::from(bytes)))).is_err() {
                        break Ok(received);
                    }
                    last_report = Some(report);
                }
                continue;
            }
        };
        let frame = match next {
            None => break Ok(received),
            Some(Err(e)) => break Err(SessionError::Read(e)),
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        lines.extend(&data);
        let mut closed = false;
        loop {
            let line = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            };
            received += 1;
            let ack = apply_line(store, line);
            let mut bytes = serde_json::to_vec(&ack).expect("plain data serializes");
            bytes.push(b'\n');
            if acks.unbounded_send(Ok(Frame::data(Bytes::from(bytes)))).is_err() {
                break;
            }
        }
        if closed {
            break Err(SessionError::LineTooLong);
        }
    };
    driver.abort();
    result
}

/// Applies one received line (a whole config, or a delta from the config in force) and says
/// what became of it.
pub fn apply_line(store: &ConfigStore, line: &[u8]) -> StreamAck {
    if line.starts_with(DELTA_PREFIX) {
        return apply_delta(store, line);
    }
    match serde_json::from_slice::<ProxyConfig>(line) {
        Ok(config) => {
            let version = config.version.clone();
            StreamAck { error: store.apply(config, Source::ControlPlane).err(), version }
        }
        Err(e) => {
            // Name the version if the line has one, so the operator can report the refusal.
            let version = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_string))
                .unwrap_or_default();
            let error = format!("cannot decode config: {e}");
            store.refuse(&version, &error);
            StreamAck { version, error: Some(error) }
        }
    }
}

fn apply_delta(store: &ConfigStore, line: &[u8]) -> StreamAck {
    let delta = match serde_json::from_slice::<DeltaLine>(line) {
        Ok(d) => d.delta,
        Err(e) => {
            let error = format!("cannot decode config delta: {e}");
            store.refuse("", &error);
            return StreamAck { version: String::new(), error: Some(error) };
        }
    };
    let version = delta.version.clone();
    let applied = match store.current() {
        Some(active) => delta.apply_to(&active.config),
        None => Err(format!("the delta is for config {}, this proxy holds none", delta.base)),
    };
    let error = match applied {
        Ok(config) => store.apply(config, Source::ControlPlane).err(),
        Err(e) => {
            store.refuse(&version, &e);
            Some(e)
        }
    };
    StreamAck { version, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_below_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let ceiling = b.ceiling();
            let delay = b.next_delay();
            assert!(delay <= ceiling);
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_failed_session_is_counted_by_kind() {
        // A port nobody listens on: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cp = ControlPlane {
            url: format!("http://127.0.0.1:{port}").parse().unwrap(),
            identity: "shop/reviews".parse().unwrap(),
            proxy_id: "p".into(),
            tls: None,
        };
        let (store, status) = (ConfigStore::new(None), StreamStatus::default());
        let e = session(&cp, &store, &status).await.unwrap_err();
        assert!(matches!(e, SessionError::Connect { .. }), "{e:?}");
        status.failed(&e);
        assert_eq!(status.failures.lock().unwrap().get("connect"), Some(&1));
        // An https control plane that accepts the connection, with no workload certificate yet.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let https = ControlPlane { url: format!("https://127.0.0.1:{port}").parse().unwrap(), ..cp };
        let e = session(&https, &store, &status).await.unwrap_err();
        assert_eq!(e.metric_label(), "no-certificate", "{e:?}");
    }

    #[test]
    fn deltas_apply_to_the_version_they_name_only() {
        use skein_api::config::{ConfigDelta, Destination};
        let store = ConfigStore::new(None);
        let dest = |name: &str, ip: &str| Destination {
            namespace: "shop".into(),
            name: name.into(),
            addresses: vec![ip.into()],
            ..Default::default()
        };
        let whole = ProxyConfig {
            version: "v1".into(),
            destinations: vec![dest("a", "10.0.0.1"), dest("b", "10.0.0.2"), dest("c", "10.0.0.3")],
            ..Default::default()
        };
        assert_eq!(apply_line(&store, &serde_json::to_vec(&whole).unwrap()).error, None);
        let line = |base: &str, version: &str| {
            serde_json::to_vec(&DeltaLine {
                delta: ConfigDelta {
                    base: base.into(),
                    version: version.into(),
                    upsert: vec![dest("b", "10.0.0.9"), dest("d", "10.0.0.4")],
                    remove: vec![("shop".into(), "a".into())],
                    ..Default::default()
                },
            })
            .unwrap()
        };
        assert_eq!(apply_line(&store, &line("v1", "v2")), StreamAck { version: "v2".into(), error: None });
        let config = &store.current().unwrap().config;
        let got: Vec<(&str, &str)> =
            config.destinations.iter().map(|d| (d.name.as_str(), d.addresses[0].as_str())).collect();
        assert_eq!(got, [("b", "10.0.0.9"), ("c", "10.0.0.3"), ("d", "10.0.0.4")]);
        // A delta for a version the proxy does not hold is refused, and nothing changes.
        let ack = apply_line(&store, &line("v1", "v3"));
        assert_eq!(ack.version, "v3");
        assert!(ack.error.unwrap().contains("the delta is for config v1, this proxy holds v2"));
        assert_eq!(store.current().unwrap().config.version, "v2");
        assert!(apply_line(&ConfigStore::new(None), &line("v1", "v2")).error.unwrap().contains("holds none"));
    }

    #[test]
    fn lines_are_applied_or_refused_with_a_reason() {
        let store = ConfigStore::new(None);
        let ack = apply_line(&store, br#"{"version":"abc","identity":null}"#);
        assert_eq!(ack, StreamAck { version: "abc".into(), error: None });
        let bad = apply_line(&store, br#"{"version":"def","destinations":"oops"}"#);
        assert_eq!(bad.version, "def");
        assert!(bad.error.unwrap().starts_with("cannot decode config"));
        assert_eq!(store.current().unwrap().config.version, "abc");
    }
}
