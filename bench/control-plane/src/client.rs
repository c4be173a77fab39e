//! A simulated proxy: one config stream over mTLS with its own client certificate, exactly as
//! skein-proxy opens it (HTTP/2, deltas asked for), acknowledging every line as soon as its
//! last byte arrives. It does not decode or apply the config (that is the proxy's cost, not the
//! control plane's): it keeps the first bytes of each line, enough for the version, so a
//! thousand of them fit in one process.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::mpsc;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use skein_api::config::DELTA_PREFIX;
use skein_api::constants::{CONFIG_STREAM_PATH, DELTA_HEADER, PROXY_ID_HEADER};

/// One line received.
#[derive(Clone, Debug)]
pub struct Received {
    /// When its last byte arrived (and the acknowledgement left).
    pub at: Instant,
    pub version: String,
    pub delta: bool,
}

/// What one simulated proxy has seen.
#[derive(Default, Debug)]
pub struct Record {
    pub lines: Mutex<Vec<Received>>,
    pub error: Mutex<Option<String>>,
}

impl Record {
    pub fn count(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Line `n` (0-based), once it has arrived.
    pub fn line(&self, n: usize) -> Option<Received> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).get(n).cloned()
    }
}

/// A TLS client config presenting `chain`/`key` and trusting `roots`, offering h2.
pub fn tls_config(
    chain_pem: &str,
    key_pem: &str,
    roots_pem: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root?)?;
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Keeps the first bytes of the line being received and finds where it ends.
#[derive(Default)]
struct LineHead {
    head: Vec<u8>,
    len: usize,
}

const HEAD: usize = 256;

impl LineHead {
    /// Feeds bytes; calls `done(head, len)` for each line they complete.
    fn feed(&mut self, mut data: &[u8], mut done: impl FnMut(&[u8], usize)) {
        while !data.is_empty() {
            let end = memchr::memchr(b'\n', data);
            let part = &data[..end.unwrap_or(data.len())];
            let room = HEAD.saturating_sub(self.head.len()).min(part.len());
            self.head.extend_from_slice(&part[..room]);
            self.len += part.len();
            match end {
                Some(at) => {
                    done(&self.head, self.len);
                    self.head.clear();
                    self.len = 0;
                    data = &data[at + 1..];
                }
                None => data = &[],
            }
        }
    }
}

/// The version a line's first bytes name: `{"version":"…"` for a whole config,
/// `{"delta":{"base":"…","version":"…"` for a delta.
fn version_of(head: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"version\":\"";
    let at = memchr::memmem::find(head, KEY)? + KEY.len();
    let end = memchr::memchr(b'"', &head[at..])? + at;
    Some(String::from_utf8_lossy(&head[at..end]).into_owned())
}

/// Runs one simulated proxy until its stream ends or fails; what it saw goes to `record`.
pub async fn run(stream: SocketAddr, proxy_id: String, tls: Arc<rustls::ClientConfig>, record: Arc<Record>) {
    if let Err(e) = session(stream, &proxy_id, tls, &record).await {
        *record.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{e:#}"));
    }
}

async fn session(
    stream: SocketAddr,
    proxy_id: &str,
    tls: Arc<rustls::ClientConfig>,
    record: &Record,
) -> anyhow::Result<()> {
    let tcp = tokio::time::timeout(Duration::from_secs(30), tokio::net::TcpStream::connect(stream)).await??;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = ServerName::IpAddress(stream.ip().into());
    let tls = tokio::time::timeout(Duration::from_secs(60), connector.connect(name, tcp)).await??;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let (acks, ack_body) = mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
    let request = http::Request::post(format!("https://{stream}{CONFIG_STREAM_PATH}"))
        .header(PROXY_ID_HEADER, proxy_id)
        .header(DELTA_HEADER, "1")
        .body(StreamBody::new(ack_body))?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(response.status() == http::StatusCode::OK, "the operator answered {}", response.status());
    let mut body = response.into_body();
    let mut line = LineHead::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        let mut failed = None;
        line.feed(&data, |head, _len| {
            let at = Instant::now();
            let Some(version) = version_of(head) else {
                failed = Some(format!("a line without a version: {}", String::from_utf8_lossy(head)));
                return;
            };
            let ack = format!("{{\"version\":\"{version}\"}}\n");
            let _ = acks.unbounded_send(Ok(Frame::data(Bytes::from(ack))));
            let delta = head.starts_with(DELTA_PREFIX);
            record.lines.lock().unwrap_or_else(|e| e.into_inner()).push(Received { at, version, delta });
        });
        if let Some(f) = failed {
            anyhow::bail!(f);
        }
    }
    anyhow::bail!("the stream ended")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_across_frames_and_their_versions_read() {
        let mut head = LineHead::default();
        let mut seen = Vec::new();
        let whole = br#"{"version":"abc","identity":{"namespace":"a"},"destinations":[]}"#;
        let delta = br#"{"delta":{"base":"abc","version":"def","upsert":[]}}"#;
        let mut stream = whole.to_vec();
        stream.push(b'\n');
        stream.extend_from_slice(delta);
        stream.push(b'\n');
        for chunk in stream.chunks(7) {
            head.feed(chunk, |h, len| seen.push((version_of(h), len, h.starts_with(DELTA_PREFIX))));
        }
        assert_eq!(seen, [(Some("abc".into()), whole.len(), false), (Some("def".into()), delta.len(), true)]);
    }
}
