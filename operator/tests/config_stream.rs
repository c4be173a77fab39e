//! The config stream end to end in one process, over real loopback sockets: the operator's
//! stream server and hub on one side, skein-proxy's client and config store on the other.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Service;
use skein_api::constants::{CONFIG_STREAM_PATH, IDENTITY_HEADER};
use skein_api::{TrafficRoute, WorkloadIdentity};
use skein_operator::ConfigHub;
use skein_operator::Metrics;
use skein_operator::{compute, MeshConfig};
use skein_operator::{Snapshot, SnapshotObject};
use skein_proxy::{control, ControlPlane, StreamStatus};
use skein_proxy::{ConfigStore, Source};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn canary_mesh(v1_weight: i32) -> MeshConfig {
    let route_file = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../examples/canary/trafficroute.yaml");
    let text = std::fs::read_to_string(route_file).unwrap();
    let mut route: TrafficRoute = serde_saphyr::from_str(&text).unwrap();
    route.metadata.namespace = Some("shop".into());
    route.spec.rules[1].backends[0].weight = v1_weight;
    let svc: Service = serde_saphyr::from_str(
        "metadata: {name: reviews, namespace: shop}\nspec: {ports: [{name: http, port: 9080}]}",
    )
    .unwrap();
    // A Service the change does not touch, so a delta leaves it out.
    let other: Service = serde_saphyr::from_str(
        "metadata: {name: zeta, namespace: shop}\nspec: {ports: [{name: http, port: 8080}]}",
    )
    .unwrap();
    let mut snapshot = Snapshot::default();
    route.apply(&mut snapshot);
    svc.apply(&mut snapshot);
    other.apply(&mut snapshot);
    compute(&snapshot)
}

async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn temp_dir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("skein-stream-{}-{:08x}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn configs_flow_to_the_proxy_and_acks_flow_back_across_a_restart() {
    let identity = WorkloadIdentity::new("shop", "productpage");
    let hub = ConfigHub::new(Metrics::default());
    hub.publish(Arc::new(canary_mesh(90)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(skein_operator::serve_stream(listener, hub.clone(), server_stop.clone()));

    let state = temp_dir();
    let store = Arc::new(ConfigStore::new(Some(state.clone())));
    let status = Arc::new(StreamStatus::default());
    let proxy_stop = CancellationToken::new();
    let cp = ControlPlane {
        url: format!("http://{addr}").parse().unwrap(),
        identity: identity.clone(),
        proxy_id: "pp-0".into(),
        tls: None,
    };
    tokio::spawn(control::run(cp, store.clone(), status.clone(), proxy_stop.clone()));

    // The full config first, acknowledged.
    let first = hub.mesh().proxy_config(&identity).version;
    until("the first config at the proxy", || store.current().filter(|a| a.config.version == first)).await;
    until("its acknowledgement", || {
        let (proxies, _) = hub.proxies();
        proxies
            .first()
            .filter(|p| p.acked.as_deref() == Some(first.as_str()))
            .map(|p| assert_eq!(p.proxy_id, "pp-0"))
    })
    .await;

    // A change: pushed, applied, acknowledged.
    hub.publish(Arc::new(canary_mesh(50)));
    let second = hub.mesh().proxy_config(&identity).version;
    assert_ne!(first, second);
    let active =
        until("the change at the proxy", || store.current().filter(|a| a.config.version == second)).await;
    assert_eq!(active.source, Source::ControlPlane);
    assert_eq!(active.config.destinations[0].routes[0].rules[1].backends[0].weight, 50);
    until("the change acknowledged", || {
        hub.proxies().0.first().filter(|p| p.acked.as_deref() == Some(second.as_str())).map(drop)
    })
    .await;
    // The change went as a delta: the one Service that changed, smaller than the whole.
    let sent = |kind: &'static str| {
        let labels = skein_operator::SentLabels { kind };
        (
            hub.metrics().configs_sent.get_or_create(&labels).get(),
            hub.metrics().config_bytes_sent.get_or_create(&labels).get(),
        )
    };
    let ((fulls, full_bytes), (deltas, delta_bytes)) = (sent("full"), sent("delta"));
    assert_eq!((fulls, deltas), (1, 1));
    assert!(delta_bytes > 0 && delta_bytes < full_bytes, "{delta_bytes} vs {full_bytes}");

    // The operator goes away: the stream ends, the proxy keeps its config.
    server_stop.cancel();
    server.await.unwrap();
    until("the proxy to notice", || {
        (!status.connected.load(std::sync::atomic::Ordering::Relaxed)).then_some(())
    })
    .await;
    assert_eq!(store.current().unwrap().config.version, second);
    until("the hub to forget the proxy", || hub.proxies().0.is_empty().then_some(())).await;

    // A new operator on the same address: the proxy reconnects by itself (jittered backoff).
    let hub2 = ConfigHub::new(Metrics::default());
    hub2.publish(Arc::new(canary_mesh(50)));
    let listener = TcpListener::bind(addr).await.unwrap();
    let stop2 = CancellationToken::new();
    tokio::spawn(skein_operator::serve_stream(listener, hub2.clone(), stop2.clone()));
    until("the reconnection and its ack", || {
        hub2.proxies().0.first().filter(|p| p.acked.as_deref() == Some(second.as_str())).map(drop)
    })
    .await;

    proxy_stop.cancel();
    stop2.cancel();
    let _ = std::fs::remove_dir_all(state);
}

#[tokio::test]
async fn malformed_stream_requests_get_4xx() {
    let hub = ConfigHub::new(Metrics::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(skein_operator::serve_stream(listener, hub.clone(), stop.clone()));

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let cases = [
        ("POST", CONFIG_STREAM_PATH, None, 400, "missing x-skein-identity"),
        ("POST", CONFIG_STREAM_PATH, Some("not-an-identity"), 400, "must be <namespace>/<service-account>"),
        ("GET", CONFIG_STREAM_PATH, Some("shop/web"), 405, "POST"),
        ("POST", "/elsewhere", Some("shop/web"), 404, "not found"),
    ];
    for (method, path, identity, want, text) in cases {
        let mut req = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
        if let Some(identity) = identity {
            req = req.header(IDENTITY_HEADER, identity);
        }
        let response = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, want, "{method} {path} {identity:?}");
        assert!(String::from_utf8_lossy(&body).contains(text), "{method} {path}: {body:?}");
    }
    assert!(hub.proxies().0.is_empty(), "no malformed request registered a proxy");
    stop.cancel();
}

/// The acknowledgements a raw stream client sends, as its request body.
type AckBody = http_body_util::StreamBody<
    futures::channel::mpsc::UnboundedReceiver<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
>;

/// A connection that sends nothing, not even the first byte that tells TLS from plaintext,
/// is closed at the handshake deadline (10 s): it holds a task no longer.
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    use tokio::io::AsyncReadExt;

    let (_hub, addr, stop) = serving(canary_mesh(90)).await;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed within 30 s, nothing sent: {read:?}");
    assert!(started.elapsed() >= Duration::from_secs(9), "{:?}", started.elapsed());
    stop.cancel();
}

/// An HTTP/2 connection to the stream server at `addr`, for raw stream clients.
async fn raw_connection(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<AckBody> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    sender
}

/// A plaintext stream server (the identity header decides) whose hub holds `mesh`.
async fn serving(mesh: MeshConfig) -> (ConfigHub, std::net::SocketAddr, CancellationToken) {
    let hub = ConfigHub::new(Metrics::default());
    hub.publish(Arc::new(mesh));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(skein_operator::serve_stream(listener, hub.clone(), stop.clone()));
    (hub, addr, stop)
}

/// One config stream read line by line, acknowledged by hand (or never).
struct RawStream {
    body: hyper::body::Incoming,
    lines: skein_api::lines::LineBuffer,
    acks:
        futures::channel::mpsc::UnboundedSender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
}

impl RawStream {
    async fn open(
        sender: &mut hyper::client::conn::http2::SendRequest<AckBody>,
        identity: &str,
        deltas: bool,
    ) -> Self {
        let (acks, ack_body) = futures::channel::mpsc::unbounded();
        let mut request = http::Request::post(format!("http://skein-operator{CONFIG_STREAM_PATH}"))
            .header(IDENTITY_HEADER, identity);
        if deltas {
            request = request.header(skein_api::constants::DELTA_HEADER, "1");
        }
        let request = request.body(http_body_util::StreamBody::new(ack_body)).unwrap();
        let body = sender.send_request(request).await.unwrap().into_body();
        Self { body, lines: skein_api::lines::LineBuffer::new(64 << 20), acks }
    }

    /// The next line, or `None` when none comes within `limit`.
    async fn next_line(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(line) = self.lines.next_line().unwrap() {
                return Some(line.to_vec());
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame()).await.ok()?;
            self.lines.extend(&frame.unwrap().unwrap().into_data().unwrap());
        }
    }

    fn ack(&self, version: &str, error: Option<&str>) {
        let ack = skein_api::StreamAck { version: version.into(), error: error.map(str::to_string) };
        let mut bytes = serde_json::to_vec(&ack).unwrap();
        bytes.push(b'\n');
        self.acks.unbounded_send(Ok(hyper::body::Frame::data(Bytes::from(bytes)))).unwrap();
    }
}

/// A proxy that refuses a delta (it does not hold the version the delta is for) is sent the
/// whole config at once, without waiting for the next change.
#[tokio::test]
async fn a_refused_delta_is_answered_with_the_whole_config() {
    use skein_api::config::DELTA_PREFIX;

    let (hub, addr, stop) = serving(canary_mesh(90)).await;

    let mut sender = raw_connection(addr).await;
    let mut stream = RawStream::open(&mut sender, "shop/productpage", true).await;
    let version = |line: &[u8]| -> String {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        v.get("delta").unwrap_or(&v)["version"].as_str().unwrap().to_string()
    };
    let limit = Duration::from_secs(10);

    let first = stream.next_line(limit).await.unwrap();
    assert!(!first.starts_with(DELTA_PREFIX));
    stream.ack(&version(&first), None);
    hub.publish(Arc::new(canary_mesh(50)));
    let delta = stream.next_line(limit).await.unwrap();
    assert!(delta.starts_with(DELTA_PREFIX), "{}", String::from_utf8_lossy(&delta));
    stream.ack(&version(&delta), Some("the delta is for config x, this proxy holds y"));
    let whole = stream.next_line(limit).await.unwrap();
    assert!(!whole.starts_with(DELTA_PREFIX), "{}", String::from_utf8_lossy(&whole));
    assert_eq!(version(&whole), version(&delta));
    let config: skein_api::ProxyConfig = serde_json::from_slice(&whole).unwrap();
    assert_eq!(config.destinations[0].routes[0].rules[1].backends[0].weight, 50);
    stop.cancel();
}

/// A proxy holds an admission slot from its first config until it acknowledges that config:
/// streams of one identity that never acknowledge it (or acknowledge another version) hold at most that identity's share, so another identity is still served; an
/// acknowledgement of the config sent, or a stream that goes away, hands the slot on at once.
#[tokio::test]
async fn one_identity_cannot_hold_every_admission_slot() {
    use skein_operator::IDENTITY_ADMISSION_LIMIT;

    let (_hub, addr, stop) = serving(canary_mesh(90)).await;
    let limit = Duration::from_secs(10);
    let version_of = |line: &[u8]| serde_json::from_slice::<skein_api::ProxyConfig>(line).unwrap().version;

    // A connection each, as proxies do (the server takes one stream per connection).
    let mut hogs = Vec::new();
    for _ in 0..IDENTITY_ADMISSION_LIMIT {
        let mut sender = raw_connection(addr).await;
        let mut hog = RawStream::open(&mut sender, "shop/intruder", false).await;
        // An acknowledgement sent without reading the config, of a version guessed: no slot
        // is given back.
        hog.ack("a guess", None);
        let first = hog.next_line(limit).await.expect("within the identity's share");
        hogs.push((sender, hog, first));
    }
    let mut waiting = RawStream::open(&mut raw_connection(addr).await, "shop/intruder", false).await;
    let mut other = RawStream::open(&mut raw_connection(addr).await, "shop/web", false).await;
    assert!(other.next_line(limit).await.is_some(), "another identity is admitted");
    assert!(waiting.next_line(Duration::from_millis(300)).await.is_none(), "the identity's share is taken");

    // Well within the 10 s a slot is held for a proxy that does not acknowledge.
    let (_, hog, first) = hogs.last().unwrap();
    hog.ack("another version", None);
    assert!(waiting.next_line(Duration::from_millis(300)).await.is_none(), "not for another version");
    hog.ack(&version_of(first), None);
    assert!(
        waiting.next_line(Duration::from_secs(5)).await.is_some(),
        "an acknowledgement gives the slot back"
    );

    let mut next = RawStream::open(&mut raw_connection(addr).await, "shop/intruder", false).await;
    assert!(next.next_line(Duration::from_millis(300)).await.is_none(), "the share is taken again");
    drop(hogs.remove(0));
    assert!(next.next_line(Duration::from_secs(5)).await.is_some(), "a slot given back is taken");
    stop.cancel();
}

/// With mTLS the client certificate decides the identity (a header claiming another one is
/// refused with 403), and plaintext is refused when client certificates are required.
#[tokio::test]
async fn over_mtls_the_certificate_decides_whose_config_is_served() {
    use skein_operator::StreamTls;
    use skein_operator::{MeshCa, WORKLOAD_LIFETIME};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let now = time::OffsetDateTime::now_utc();
    let (ca, _) = MeshCa::generate("cluster.local", now).unwrap();
    let web = WorkloadIdentity::new("shop", "web");
    let leaf = ca.sign_workload(&web, "cluster.local", WORKLOAD_LIFETIME, now).unwrap();
    let (dns, ips) = skein_operator::serving_names("skein-operator", "skein-system", &["localhost".into()]);
    let (serving, _) = skein_operator::ServingCert::issue(&ca, &dns, &ips).unwrap();
    let ca = Arc::new(arc_swap::ArcSwap::from_pointee(ca));

    let hub = ConfigHub::new(Metrics::default());
    hub.publish(Arc::new(canary_mesh(90)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let tls = StreamTls { cert: Arc::new(serving), ca, require_client_cert: true };
    tokio::spawn(skein_operator::serve_stream_with(listener, hub.clone(), Some(tls), stop.clone()));

    let material = skein_proxy::TlsMaterial::from_pem(
        leaf.chain_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        leaf.bundle_pem.as_bytes(),
    )
    .unwrap();
    let store_tls = Arc::new(skein_proxy::TlsStore::default());
    store_tls.set(material);
    let store = Arc::new(ConfigStore::new(None));
    // The proxy presents the certificate of shop/web; the operator serves that identity.
    let cp = ControlPlane {
        url: format!("https://localhost:{port}").parse().unwrap(),
        identity: WorkloadIdentity::new("shop", "web"),
        proxy_id: "web-0".into(),
        tls: Some(store_tls.clone()),
    };
    let proxy_stop = CancellationToken::new();
    tokio::spawn(control::run(cp, store.clone(), Arc::new(StreamStatus::default()), proxy_stop.clone()));
    let expected = hub.mesh().proxy_config(&web).version;
    until("the config of shop/web over mTLS", || store.current().filter(|a| a.config.version == expected))
        .await;
    let (proxies, _) = hub.proxies();
    assert_eq!(proxies[0].identity, web);

    // The same certificate with a header naming someone else: 403.
    let material = store_tls.current().unwrap();
    assert_eq!(tls_stream_status(port, material.control_plane_client(), "shop/other").await, 403);

    // TLS without a client certificate, naming an identity: 403, nothing served.
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(leaf.bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut anonymous = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    assert_eq!(
        tls_stream_status(port, Arc::new(anonymous), "shop/web").await,
        403,
        "no certificate, no config"
    );

    // A plaintext client is refused when client certificates are required.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let refused = match hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    {
        Err(_) => true,
        Ok((mut sender, conn)) => {
            tokio::spawn(conn);
            let req = http::Request::post(format!("http://127.0.0.1:{port}{CONFIG_STREAM_PATH}"))
                .header(IDENTITY_HEADER, "shop/web")
                .body(Empty::new())
                .unwrap();
            sender.send_request(req).await.is_err()
        }
    };
    assert!(refused, "a plaintext stream is refused");
    assert_eq!(hub.proxies().0.len(), 1);
    proxy_stop.cancel();
    stop.cancel();
}

/// Opens the config stream over TLS with `client` (to `localhost:port`), naming `identity` in
/// the header; the response status.
async fn tls_stream_status(port: u16, client: Arc<rustls::ClientConfig>, identity: &str) -> u16 {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://localhost:{port}{CONFIG_STREAM_PATH}"))
        .header(IDENTITY_HEADER, identity)
        .body(Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}
