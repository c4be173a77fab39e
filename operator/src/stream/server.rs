//! The config stream server (port 15012): one long-lived HTTP/2 request per proxy.
//!
//! Protocol: the proxy `POST`s to [`CONFIG_STREAM_PATH`], proving its identity with its mTLS
//! client certificate (or naming it in [`IDENTITY_HEADER`] on a plaintext development stream). The
//! response body is a stream of JSON lines: the full `ProxyConfig` first, then on every change
//! either the whole new one or, to a proxy that sends [`DELTA_HEADER`], a `ConfigDelta` from
//! the version it holds (latest wins: a slow proxy skips versions, it never queues them, and
//! gets the whole config when it skipped past the last delta). The request body, open in the
//! other direction of the same HTTP/2 stream, carries one `StreamAck` line per config received;
//! a refused delta is answered with the whole config. First configs are sent to a bounded
//! number of proxies at a time ([`ConfigHub::admission`]), at most
//! [`IDENTITY_ADMISSION_LIMIT`](crate::stream::hub::IDENTITY_ADMISSION_LIMIT) of one identity,
//! in arrival order. HTTP/2 keepalive pings find dead peers. The HTTP/2 server is our own
//! ([`http2`]): an idle connection holds no buffers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use skein_api::constants::{CONFIG_STREAM_PATH, DELTA_HEADER, IDENTITY_HEADER, PROXY_ID_HEADER};
use skein_api::lines::LineBuffer;
use skein_api::{ProxyMessage, WorkloadIdentity};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::stream::http2::{self, Reply, RequestSink};
use crate::stream::hub::{ConfigHub, ConnectionId, Pushed};

/// Lines from a proxy longer than this are refused (acknowledgements are a few dozen bytes,
/// traffic reports a few hundred per destination).
const MAX_PROXY_LINE: usize = 4 * 1024 * 1024;

/// Serves the config stream until `shutdown` fires; open streams then end so proxies reconnect
/// to another replica.
/// TLS on the config stream: the operator's serving certificate, and client certificates
/// verified against the mesh trust bundle.
#[derive(Clone)]
pub struct StreamTls {
    pub cert: Arc<crate::identity::serving::ServingCert>,
    pub ca: crate::identity::ca::SharedCa,
    /// Refuse proxies that do not present a client certificate.
    pub require_client_cert: bool,
}

/// The acceptor for the current trust bundle, built once per bundle rather than per
/// connection (parsing the bundle and building the verifier cost more than a handshake).
#[derive(Clone, Default)]
pub struct AcceptorCache(Arc<std::sync::Mutex<Option<(String, tokio_rustls::TlsAcceptor)>>>);

impl StreamTls {
    fn acceptor(&self, cache: &AcceptorCache) -> Option<tokio_rustls::TlsAcceptor> {
        let bundle = self.ca.load().trust_bundle().to_string();
        let mut cached = cache.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((b, acceptor)) = cached.as_ref() {
            if *b == bundle {
                return Some(acceptor.clone());
            }
        }
        let acceptor = self.build_acceptor(&bundle)?;
        *cached = Some((bundle, acceptor.clone()));
        Some(acceptor)
    }

    fn build_acceptor(&self, bundle: &str) -> Option<tokio_rustls::TlsAcceptor> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            roots.add(c.ok()?).ok()?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .ok()?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// The workload identity a client certificate proves (its SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`).
pub fn identity_from_cert(der: &[u8]) -> Option<WorkloadIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => {
            let (_, ns, sa) = skein_api::config::spiffe_parts(u)?;
            Some(WorkloadIdentity::new(ns, sa))
        }
        _ => None,
    })
}

pub async fn serve(listener: TcpListener, hub: ConfigHub, shutdown: CancellationToken) {
    serve_with(listener, hub, None, shutdown).await
}

/// Serves the stream; with `tls`, TLS connections (recognised by their first byte) are
/// accepted and the client certificate, when present, decides the identity.
pub async fn serve_with(
    listener: TcpListener,
    hub: ConfigHub,
    tls: Option<StreamTls>,
    shutdown: CancellationToken,
) {
    let acceptors = AcceptorCache::default();
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
        let svc_shutdown = shutdown.clone();
        let tls = tls.clone();
        let acceptors = acceptors.clone();
        tokio::spawn(async move {
            // The first byte and the TLS handshake share one deadline: a peer that connects
            // and sends nothing, or stalls the handshake, holds a task for at most that long.
            let opened =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, open(stream, peer, tls.as_ref(), &acceptors));
            let (io, proven) = match opened.await {
                Ok(Some(opened)) => opened,
                Ok(None) => return,
                Err(_) => {
                    tracing::info!(%peer, "config stream: nothing usable within the handshake deadline");
                    return;
                }
            };
            let require = tls.as_ref().is_some_and(|t| t.require_client_cert);
            let handler = move |req| handle(req, peer, proven.as_ref(), require, &hub, &shutdown);
            if let Err(e) = http2::serve(io, handler, svc_shutdown).await {
                tracing::debug!(%peer, error = %e, "config stream connection ended");
            }
        });
    }
}

/// How long a new connection has for its first byte and its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection made ready to serve: TLS accepted when it starts with a TLS record (and the
/// identity its client certificate proves), or plain TCP when that is allowed.
async fn open(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<&StreamTls>,
    acceptors: &AcceptorCache,
) -> Option<(Box<dyn Io>, Option<WorkloadIdentity>)> {
    let mut first = [0u8; 1];
    let is_tls = matches!(stream.peek(&mut first).await, Ok(1)) && first[0] == 0x16;
    match (tls, is_tls) {
        (Some(t), true) => {
            let acceptor = t.acceptor(acceptors)?;
            match acceptor.accept(stream).await {
                Ok(s) => {
                    let proven = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| identity_from_cert(c));
                    Some((Box::new(s), proven))
                }
                Err(e) => {
                    tracing::info!(%peer, error = %e, "config stream TLS handshake failed");
                    None
                }
            }
        }
        (Some(t), false) if t.require_client_cert => {
            tracing::info!(%peer, "refused a plaintext config stream (mTLS required)");
            None
        }
        _ => Some((Box::new(stream), None)),
    }
}

fn plain(status: StatusCode, text: &str) -> Reply {
    Reply::text(status, text)
}

/// A connection the stream is served on: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn handle(
    req: Request<()>,
    peer: SocketAddr,
    proven: Option<&WorkloadIdentity>,
    require_client_cert: bool,
    hub: &ConfigHub,
    shutdown: &CancellationToken,
) -> Reply {
    if req.uri().path() != CONFIG_STREAM_PATH {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "the config stream is a POST");
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let claimed = match header(IDENTITY_HEADER).map(|v| v.parse::<WorkloadIdentity>()) {
        Some(Ok(identity)) => Some(identity),
        Some(Err(e)) => return plain(StatusCode::BAD_REQUEST, &e),
        None => None,
    };
    // A client certificate decides; a proxy is served only its own identity's config.
    let identity = match (proven, claimed) {
        (Some(p), Some(c)) if *p != c => {
            return plain(StatusCode::FORBIDDEN, &format!("the certificate proves {p}, not {c}"));
        }
        (Some(p), _) => p.clone(),
        (None, _) if require_client_cert => {
            return plain(StatusCode::FORBIDDEN, "a client certificate is required");
        }
        (None, Some(c)) => c,
        (None, None) => return plain(StatusCode::BAD_REQUEST, &format!("missing {IDENTITY_HEADER} header")),
    };
    let proxy_id = header(PROXY_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 253)
        .unwrap_or_else(|| peer.to_string());
    tracing::info!(%identity, proxy = %proxy_id, %peer, "proxy connected");
    let deltas = req.headers().get(DELTA_HEADER).is_some_and(|v| v.as_bytes() == b"1");
    let admission = Some((hub.identity_admission(&identity), hub.admission.clone()));
    let (conn, receiver) = hub.connect(identity, proxy_id.clone());
    let feedback = Arc::new(Feedback::default());
    let acks = AckReader {
        lines: LineBuffer::new(MAX_PROXY_LINE),
        conn,
        hub: hub.clone(),
        proxy_id,
        feedback: feedback.clone(),
        warned: false,
    };

    let session = Session {
        receiver,
        _guard: Disconnect { hub: hub.clone(), conn },
        shutdown: shutdown.clone(),
        deltas,
        sent: None,
        feedback,
        admission,
        sending: None,
        metrics: hub.metrics().clone(),
    };
    let lines = futures::stream::unfold(session, |mut session| async move {
        let frame = session.next_frame().await?;
        Some((frame, session))
    });
    Reply {
        status: StatusCode::OK,
        content_type: "application/x-ndjson",
        body: Box::pin(lines),
        sink: Some(Box::new(acks)),
    }
}

/// How long a proxy may hold its admission permit before acknowledging its first config.
const ADMISSION_HOLD: Duration = Duration::from_secs(10);

/// One proxy's stream, between lines.
struct Session {
    receiver: watch::Receiver<Arc<Pushed>>,
    _guard: Disconnect,
    shutdown: CancellationToken,
    /// The proxy applies deltas.
    deltas: bool,
    /// The version last sent, and whether it went as a delta.
    sent: Option<(String, bool)>,
    feedback: Arc<Feedback>,
    /// Taken for the first config only: the identity's slots, then the hub's.
    admission: Option<(Arc<Semaphore>, Arc<Semaphore>)>,
    /// The rest of the line being sent.
    sending: Option<crate::compute::Frames>,
    metrics: crate::metrics::Metrics,
}

/// What the acknowledgement reader tells the sender.
#[derive(Default)]
struct Feedback {
    /// The proxy refused a config: the next one goes whole.
    refused: AtomicBool,
    wake: Notify,
    /// Held from the first config until the proxy acknowledges that version (or
    /// [`ADMISSION_HOLD`], or it goes away): its identity's slot and the hub's.
    permit: Mutex<Option<Admitted>>,
}

/// The admission slots a proxy holds, and the version it must acknowledge to give them back.
struct Admitted {
    version: String,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl Feedback {
    fn release(&self) {
        self.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// The proxy acknowledged `version`: the slots go back when it is the first config's (an
    /// acknowledgement sent before the config arrived does not jump the admission queue).
    fn acknowledged(&self, version: &str) {
        let mut permit = self.permit.lock().unwrap_or_else(|e| e.into_inner());
        if permit.as_ref().is_some_and(|p| p.version == version) {
            permit.take();
        }
    }
}

impl Session {
    /// The next line: the whole config first (once admitted), then on every change a
    /// delta from the version sent before when the proxy takes deltas and holds it, else the
    /// whole config. A refused delta is followed at once by the whole config.
    /// The next frame to send: the rest of the line being sent, else the first of the next.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.sending.as_mut().and_then(Iterator::next) {
                return Some(frame);
            }
            // A line sent lets go of its plan (and the mesh bytes it shares) before waiting.
            self.sending = None;
            self.sending = Some(self.next_line().await?.frames());
        }
    }

    async fn next_line(&mut self) -> Option<crate::compute::LinePlan> {
        let mut admitted = None;
        if let Some((own, all)) = self.admission.take() {
            // Admission after authentication: a reconnect storm is served a bounded number of
            // first configs at a time, in arrival order (the semaphores are fair), so nobody
            // starves and the first to come are served first. The identity's slot is taken
            // first, so one identity's waiting proxies never hold the hub's slots.
            admitted = tokio::select! {
                permits = async { Some((own.acquire_owned().await.ok()?, all.acquire_owned().await.ok()?)) } => permits,
                _ = self.shutdown.cancelled() => return None,
            };
            admitted.as_ref()?;
        } else {
            loop {
                tokio::select! {
                    changed = self.receiver.changed() => {
                        changed.ok()?;
                        break;
                    }
                    _ = self.feedback.wake.notified() => {
                        let resend = self.sent.as_ref().is_some_and(|(_, delta)| *delta);
                        if resend && self.feedback.refused.load(Ordering::Acquire) {
                            break;
                        }
                    }
                    _ = self.shutdown.cancelled() => return None,
                }
            }
        }
        let pushed: Arc<Pushed> = self.receiver.borrow_and_update().clone();
        if let Some(permits) = admitted {
            let held = Admitted { version: pushed.version.clone(), _permits: permits };
            *self.feedback.permit.lock().unwrap_or_else(|e| e.into_inner()) = Some(held);
            let feedback = self.feedback.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ADMISSION_HOLD).await;
                feedback.release();
            });
        }
        let whole = self.feedback.refused.swap(false, Ordering::AcqRel);
        let delta = match (&self.sent, self.deltas && !whole) {
            (Some((held, _)), true) => pushed.delta_from(held),
            _ => None,
        };
        self.sent = Some((pushed.version.clone(), delta.is_some()));
        let kind = crate::metrics::SentLabels { kind: if delta.is_some() { "delta" } else { "full" } };
        let line = delta.unwrap_or_else(|| pushed.plan());
        self.metrics.configs_sent.get_or_create(&kind).inc();
        self.metrics.config_bytes_sent.get_or_create(&kind).inc_by(line.len() as u64);
        Some(line)
    }
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

impl Drop for Session {
    /// A proxy that goes away before acknowledging gives its admission slots back at once.
    fn drop(&mut self) {
        self.feedback.release();
    }
}

/// The proxy's side of the stream: acknowledgement and traffic lines.
struct AckReader {
    lines: LineBuffer,
    conn: ConnectionId,
    hub: ConfigHub,
    proxy_id: String,
    feedback: Arc<Feedback>,
    /// A malformed line was warned of.
    warned: bool,
}

impl RequestSink for AckReader {
    fn held(&self) -> usize {
        self.lines.pending()
    }

    fn data(&mut self, data: &[u8]) -> bool {
        self.lines.extend(data);
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) if line.trim_ascii().is_empty() => {}
                Ok(Some(line)) => match serde_json::from_slice::<ProxyMessage>(line) {
                    Ok(ProxyMessage::Ack(ack)) => {
                        self.feedback.acknowledged(&ack.version);
                        if ack.error.is_some() {
                            self.feedback.refused.store(true, Ordering::Release);
                            self.feedback.wake.notify_one();
                        }
                        self.hub.acknowledge(self.conn, ack)
                    }
                    Ok(ProxyMessage::Traffic { traffic }) => self.hub.record_traffic(self.conn, traffic),
                    Err(e) => {
                        // Warned of once per stream, so a proxy cannot flood the log. The line
                        // is not a reason to reset: a proxy of a newer version may send kinds
                        // of line this operator does not know, and a malformed line costs no
                        // more to read than a valid traffic report.
                        if !self.warned {
                            self.warned = true;
                            tracing::warn!(proxy = %self.proxy_id, error = %e, "ignoring a malformed line from the proxy (warned once per stream)");
                        } else {
                            tracing::debug!(proxy = %self.proxy_id, error = %e, "ignoring a malformed line from the proxy");
                        }
                    }
                },
                Ok(None) => return true,
                Err(_) => {
                    tracing::warn!(proxy = %self.proxy_id, "a line from the proxy is too long; resetting its stream");
                    return false;
                }
            }
        }
    }
}
