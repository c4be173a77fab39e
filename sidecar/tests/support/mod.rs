//! Test upstreams, a proxy started in-process, and a client — all on real loopback sockets.
#![allow(dead_code)]

pub mod pki;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use skein_api::config::*;
use skein_api::{ProxyConfig, WorkloadIdentity};
use skein_proxy::AccessLog;
use skein_proxy::{ConfigStore, Source};
use skein_proxy::{Direction, ProxyContext};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a test upstream does.
#[derive(Default)]
pub struct Upstream {
    pub name: String,
    pub addr: Mutex<Option<SocketAddr>>,
    /// Answer this many requests with 503 first.
    pub fail_first: AtomicU32,
    /// Answer every request with this status (0 = 200).
    pub status: AtomicU32,
    /// Wait this long before answering (ms).
    pub delay_ms: AtomicU64,
    pub hits: AtomicU64,
    pub last_headers: Mutex<Option<HeaderMap>>,
    /// The request target of the last request.
    pub last_target: Mutex<Option<String>>,
    /// Headers added to every answer.
    pub answer_headers: Mutex<Vec<(&'static str, &'static str)>>,
}

impl Upstream {
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.lock().unwrap().expect("started")
    }
}

/// Starts an upstream answering with its name.
pub async fn upstream(name: &str) -> Arc<Upstream> {
    let up = Arc::new(Upstream { name: name.into(), ..Default::default() });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    *up.addr.lock().unwrap() = Some(listener.local_addr().unwrap());
    let u = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let u = u.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let u = u.clone();
                    async move {
                        u.hits.fetch_add(1, Ordering::SeqCst);
                        *u.last_headers.lock().unwrap() = Some(req.headers().clone());
                        *u.last_target.lock().unwrap() = Some(req.uri().to_string());
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let delay = u.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let failing = u.fail_first.load(Ordering::SeqCst);
                        let status = if failing > 0 {
                            u.fail_first.fetch_sub(1, Ordering::SeqCst);
                            503
                        } else {
                            match u.status.load(Ordering::SeqCst) {
                                0 => 200,
                                s => s as u16,
                            }
                        };
                        let mut r =
                            Response::new(Full::new(Bytes::from(format!("{}:{}", u.name, body.len()))));
                        *r.status_mut() = StatusCode::from_u16(status).unwrap();
                        for (name, value) in u.answer_headers.lock().unwrap().iter() {
                            r.headers_mut().insert(*name, http::HeaderValue::from_static(value));
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    up
}

pub fn endpoint(up: &Upstream, version: &str) -> Endpoint {
    Endpoint {
        address: "127.0.0.1".into(),
        ports: [("http".to_string(), up.addr().port())].into(),
        labels: [("version".to_string(), version.to_string())].into(),
        identity: None,
    }
}

pub fn subset(name: &str, weight: u32) -> WeightedBackend {
    WeightedBackend {
        weight,
        target: BackendTarget::Subset {
            name: name.into(),
            labels: [("version".to_string(), name.to_string())].into(),
        },
    }
}

/// A config with one destination `reviews.shop` (port 9080) over `endpoints`.
pub fn config(version: &str, endpoints: Vec<Endpoint>, routes: Vec<Route>) -> ProxyConfig {
    ProxyConfig {
        version: version.into(),
        identity: Some(WorkloadIdentity::new("shop", "productpage")),
        destinations: vec![Destination {
            namespace: "shop".into(),
            name: "reviews".into(),
            hosts: vec!["reviews.shop".into(), "reviews.shop.svc".into()],
            addresses: vec![],
            ports: vec![ServicePort { name: Some("http".into()), port: 9080, protocol: Protocol::Http }],
            load_balancer: LoadBalancer::P2cEwma,
            endpoints,
            routes,
            retry: None,
            outlier: None,
        }],
        inbound: vec![],
        authz: Default::default(),
    }
}

/// The canary route: `x-user-group: beta` → v2, else `v1_weight`/`100 - v1_weight`.
pub fn canary_route(v1_weight: u32) -> Route {
    Route {
        name: "shop/reviews".into(),
        generation: 1,
        port: None,
        rules: vec![
            RouteRule {
                headers: vec![HeaderMatch {
                    name: "x-user-group".into(),
                    value: StringMatch::Exact("beta".into()),
                }],
                backends: vec![subset("v2", 100)],
                ..Default::default()
            },
            RouteRule {
                backends: vec![subset("v1", v1_weight), subset("v2", 100 - v1_weight)],
                ..Default::default()
            },
        ],
        retry: None,
        outlier: None,
    }
}

pub fn retry_config(attempts: u32, percent: u32, min_per_second: u32) -> RetryConfig {
    RetryConfig {
        policy: "shop/reviews".into(),
        attempts,
        per_try_timeout_ms: None,
        timeout_ms: None,
        retry_on: vec!["5xx".into(), "reset".into(), "refused".into()],
        retriable_status_codes: vec![],
        backoff_base_ms: 1,
        backoff_max_ms: 5,
        budget_percent: percent,
        budget_min_per_second: min_per_second,
        retry_non_idempotent: false,
    }
}

/// A proxy running in this process.
pub struct TestProxy {
    pub store: Arc<ConfigStore>,
    pub tls: Arc<skein_proxy::TlsStore>,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub client: Client<HttpConnector, Full<Bytes>>,
    stop: CancellationToken,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn proxy(config: ProxyConfig) -> TestProxy {
    proxy_at(config, "127.0.0.1:0").await
}

/// A proxy whose inbound listener is at `inbound` (a peer's `<ip>:15006`).
pub async fn proxy_at(config: ProxyConfig, inbound: &str) -> TestProxy {
    proxy_tls(config, inbound, None).await
}

/// A proxy with an identity: its hops to other sidecars are mTLS, its inbound strict.
pub async fn proxy_tls(
    config: ProxyConfig,
    inbound: &str,
    material: Option<skein_proxy::TlsMaterial>,
) -> TestProxy {
    proxy_full(config, inbound, material, true, AccessLog::off()).await
}

/// A proxy with every knob: identity material, strict or permissive inbound, an access log.
pub async fn proxy_full(
    config: ProxyConfig,
    inbound: &str,
    material: Option<skein_proxy::TlsMaterial>,
    strict: bool,
    access_log: AccessLog,
) -> TestProxy {
    let store = Arc::new(ConfigStore::new(None));
    store.apply(config, Source::File).expect("valid test config");
    let tls = Arc::new(skein_proxy::TlsStore::default());
    if let Some(m) = material {
        tls.set(m);
    }
    let mut ctx = ProxyContext::new(
        store.clone(),
        access_log,
        "127.0.0.1".parse().unwrap(),
        Duration::from_millis(500),
    );
    ctx.tls = tls.clone();
    ctx.inbound_strict = strict;
    let ctx = Arc::new(ctx);
    let stop = CancellationToken::new();
    let out = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inb = TcpListener::bind(inbound).await.unwrap();
    let (outbound, inbound) = (out.local_addr().unwrap(), inb.local_addr().unwrap());
    tokio::spawn(skein_proxy::serve_listener(out, ctx.clone(), Direction::Outbound, stop.clone()));
    tokio::spawn(skein_proxy::serve_listener(inb, ctx, Direction::Inbound, stop.clone()));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).set_host(false).build(connector);
    TestProxy { store, outbound, inbound, client, stop, tls }
}

/// An HTTP/2 client (prior knowledge) over `io`, its connection driven by a task of its own.
pub async fn h2_over<I, B>(io: I) -> hyper::client::conn::http2::SendRequest<B>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    h2
}

/// A response as the test sees it.
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: HeaderMap,
}

impl TestProxy {
    /// Sends a request to the outbound listener with `Host: host`.
    pub async fn send(
        &self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        self.send_to(self.outbound, method, host, path, headers, body).await
    }

    pub async fn send_to(
        &self,
        to: SocketAddr,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let mut req =
            Request::builder().method(method).uri(format!("http://{to}{path}")).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self
            .client
            .request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
            .await
            .expect("proxy answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer { status, body: String::from_utf8_lossy(&body).into_owned(), headers }
    }

    /// Sends a request as an HTTP/2 client (prior knowledge, a connection of its own) to the
    /// outbound listener, for `http://{authority}{path}`.
    pub async fn send_h2(&self, method: &str, authority: &str, path: &str, body: &[u8]) -> Answer {
        let mut h2 = h2_over(tokio::net::TcpStream::connect(self.outbound).await.unwrap()).await;
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{authority}{path}"))
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap();
        let response = h2.send_request(req).await.expect("proxy answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer { status, body: String::from_utf8_lossy(&body).into_owned(), headers }
    }

    pub async fn get(&self, host: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", host, "/", headers, b"").await
    }

    /// A metric line's value from the proxy's own registry.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        self.store.shared.metrics.render(&mut out);
        out
    }
}

/// Counts answers by body prefix (the upstream's name).
pub fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a.body.split(':').next().unwrap_or_default().to_string()).or_default() += 1;
    }
    t
}

/// An upstream that answers one upgrade request by switching to an echo protocol (4 bytes);
/// returns its port on 127.0.0.1.
pub async fn echo_upgrade_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service =
            hyper::service::service_fn(|mut req: http::Request<hyper::body::Incoming>| async move {
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let upgraded = on_upgrade.await.unwrap();
                    let mut io = hyper_util::rt::TokioIo::new(upgraded);
                    let mut buf = [0u8; 4];
                    tokio::io::AsyncReadExt::read_exact(&mut io, &mut buf).await.unwrap();
                    tokio::io::AsyncWriteExt::write_all(&mut io, &buf).await.unwrap();
                });
                let mut r = http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut().insert("upgrade", http::HeaderValue::from_static("echo"));
                r.headers_mut().insert("connection", http::HeaderValue::from_static("upgrade"));
                Ok::<_, std::convert::Infallible>(r)
            });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .with_upgrades()
            .await
            .unwrap();
    });
    port
}

/// Sends an upgrade request for `host` to `proxy`, then `ping` on the switched connection:
/// the response head and the 4 bytes that came back.
pub async fn upgrade_through(proxy: SocketAddr, host: &str) -> (String, [u8; 4]) {
    use std::io::{Read, Write};
    let request = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let mut echo = [0u8; 4];
        if head.starts_with(b"HTTP/1.1 101") {
            s.write_all(b"ping").unwrap();
            s.read_exact(&mut echo).unwrap();
        }
        (String::from_utf8_lossy(&head).into_owned(), echo)
    })
    .await
    .unwrap()
}
