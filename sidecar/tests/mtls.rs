//! Mutual TLS between sidecars on loopback, with certificates minted here: a valid peer is
//! accepted; a wrong trust domain, an unexpected identity, an expired certificate, a foreign CA
//! and a plaintext client are each refused with a reason.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::sync::Arc;

use skein_proxy::TlsMaterial;
use support::pki::{ca, leaf, Ca};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn material(ca: &Ca, bundle: &str, uri: &str, from: OffsetDateTime, until: OffsetDateTime) -> TlsMaterial {
    let (chain, key) = leaf(ca, uri, from, until);
    TlsMaterial::from_pem(chain.as_bytes(), key.as_bytes(), bundle.as_bytes()).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/productpage";

/// Runs one handshake: the server (inbound side) with `server`, the client with `client`
/// expecting `expected`. Returns the negotiated ALPN or the error each side saw.
async fn handshake(server: TlsMaterial, client: TlsMaterial, expected: &str) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server.clone());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
                tls.write_all(&buf).await.map_err(|e| e.to_string())?;
                Ok(())
            }
            Err(e) => Err(format!("server refused: {e}")),
        }
    });
    // Offering h2 as well, as a sidecar of an older release does: the inbound side prefers it.
    let mut config = (*client.client_for(expected)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("peer.skein.invalid").unwrap();
    let client_result = async {
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("client refused: {e}"))?;
        tls.write_all(b"ping").await.map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("client read: {e}"))?;
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        Ok::<_, String>(alpn)
    }
    .await;
    let server_result = server_side.await.unwrap();
    match (client_result, server_result) {
        (Ok(alpn), Ok(())) => Ok(alpn),
        (Err(c), Err(s)) => Err(format!("{c}; {s}")),
        (Err(c), Ok(())) => Err(c),
        (Ok(_), Err(s)) => Err(s),
    }
}

#[tokio::test]
async fn a_mesh_peer_is_accepted_both_ways_and_h2_is_negotiated() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&root, &root.pem, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    assert_eq!(s.identity, SERVER);
    assert_eq!(handshake(s, c, SERVER).await, Ok("h2".to_string()));
}

#[tokio::test]
async fn a_client_from_another_trust_domain_is_refused() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(
        &root,
        &root.pem,
        "spiffe://evil.example/ns/x/sa/y",
        now() - Duration::minutes(5),
        now() + Duration::hours(24),
    );
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.contains("not in trust domain cluster.local"), "{err}");
}

#[tokio::test]
async fn a_client_whose_id_is_no_workload_or_more_than_one_is_refused() {
    let root = ca("root");
    let (from, until) = (now() - Duration::minutes(5), now() + Duration::hours(24));
    let server = || material(&root, &root.pem, SERVER, from, until);
    for (uris, says) in [
        (
            vec!["spiffe://cluster.local/ns/shop"],
            "is not spiffe://cluster.local/ns/<namespace>/sa/<service-account>",
        ),
        (
            vec!["spiffe://cluster.local/admin"],
            "is not spiffe://cluster.local/ns/<namespace>/sa/<service-account>",
        ),
        (vec![CLIENT, "spiffe://cluster.local/ns/kube-system/sa/admin"], "exactly one SPIFFE ID"),
    ] {
        let (chain, key) = support::pki::leaf_with(&root, &uris, from, until);
        let c = TlsMaterial::from_pem(chain.as_bytes(), key.as_bytes(), root.pem.as_bytes()).unwrap();
        let err = handshake(server(), c, SERVER).await.unwrap_err();
        assert!(err.contains(says), "{uris:?}: {err}");
    }
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let root = ca("root");
    let s = material(
        &root,
        &root.pem,
        "spiffe://cluster.local/ns/shop/sa/impostor",
        now() - Duration::minutes(5),
        now() + Duration::hours(24),
    );
    let c = material(&root, &root.pem, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.contains("is not the expected spiffe://cluster.local/ns/shop/sa/reviews"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&root, &root.pem, CLIENT, now() - Duration::hours(48), now() - Duration::hours(24));
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn a_certificate_from_a_foreign_ca_is_refused() {
    let (root, foreign) = (ca("root"), ca("foreign"));
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&foreign, &root.pem, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.to_lowercase().contains("unknown") || err.to_lowercase().contains("issuer"), "{err}");
}

#[tokio::test]
async fn a_bundle_with_two_roots_accepts_both_during_a_rotation() {
    let (old, new) = (ca("old"), ca("new"));
    let bundle = format!("{}{}", old.pem, new.pem);
    let s = material(&old, &bundle, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&new, &bundle, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    assert_eq!(handshake(s, c, SERVER).await, Ok("h2".to_string()));
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&s.server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(drop).map_err(|e| e.to_string())
    });
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let err = server.await.unwrap().unwrap_err();
    assert!(!err.is_empty(), "refused: {err}");
}

#[test]
fn bad_material_is_refused_with_a_reason() {
    let root = ca("root");
    let (chain, key) = leaf(&root, SERVER, now(), now() + Duration::hours(1));
    let (_, other_key) = leaf(&root, SERVER, now(), now() + Duration::hours(1));
    assert!(
        TlsMaterial::from_pem(chain.as_bytes(), other_key.as_bytes(), root.pem.as_bytes()).is_err(),
        "key mismatch"
    );
    assert!(TlsMaterial::from_pem(chain.as_bytes(), key.as_bytes(), b"")
        .unwrap_err()
        .contains("trust bundle"));
    assert!(TlsMaterial::from_pem(b"", key.as_bytes(), root.pem.as_bytes())
        .unwrap_err()
        .contains("no certificate"));
}

use std::sync::atomic::Ordering;

fn meshed(ip: &str, port: u16) -> skein_api::config::Endpoint {
    skein_api::config::Endpoint {
        address: ip.into(),
        ports: [("http".to_string(), port)].into(),
        labels: Default::default(),
        identity: Some(skein_api::WorkloadIdentity::new("shop", "reviews")),
    }
}

fn fresh(root: &Ca, bundle: &str, uri: &str) -> TlsMaterial {
    material(root, bundle, uri, now() - Duration::minutes(5), now() + Duration::hours(24))
}

#[tokio::test]
async fn requests_cross_two_sidecars_over_mtls_and_plaintext_is_refused() {
    let root = ca("root");
    let app = support::upstream("app").await;
    let callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.31:15006",
        Some(fresh(&root, &root.pem, SERVER)),
    )
    .await;
    let cfg = support::config("c1", vec![meshed("127.0.0.31", app.addr().port())], vec![]);
    let caller = support::proxy_tls(cfg.clone(), "127.0.0.1:0", Some(fresh(&root, &root.pem, CLIENT))).await;
    for _ in 0..5 {
        let a = caller.send("GET", "reviews.shop:9080", "/", &[], b"").await;
        assert_eq!((a.status, a.body.as_str()), (200, "app:0"));
    }
    assert_eq!(app.hits(), 5);
    // Plain HTTP/1.1 requests take the fast path, and cross the multiplexed hop: one
    // connection over mTLS.
    assert_eq!(caller.tls.handshakes.load(Ordering::Relaxed), 1, "one connection");
    assert_eq!(callee.tls.handshakes.load(Ordering::Relaxed), 1);
    let seen = app.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("host").unwrap(), "reviews.shop:9080");
    assert!(seen.get("x-skein-inbound-port").is_none(), "the callee consumed it: {seen:?}");
    // A request the fast path leaves to hyper (`Expect`) has its small body read whole, and
    // crosses the same connection.
    for _ in 0..2 {
        let a = caller.send("POST", "reviews.shop:9080", "/", &[("expect", "100-continue")], b"x").await;
        assert_eq!((a.status, a.body.as_str()), (200, "app:1"));
    }
    assert_eq!(app.hits(), 7);
    assert_eq!(caller.tls.handshakes.load(Ordering::Relaxed), 1, "still one connection");
    assert_eq!(callee.tls.handshakes.load(Ordering::Relaxed), 1);
    // Counted as mTLS requests, and reported so in the traffic report for the topology.
    assert!(caller.metrics().contains(
        "skein_mtls_requests_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"\",route=\"\"} 7"
    ));
    let report = caller.store.shared.metrics.traffic_report();
    assert_eq!((report.edges[0].requests, report.edges[0].mtls), (7, 7), "{report:?}");

    // A sidecar without an identity speaks plaintext: the strict callee refuses it.
    let plain = support::proxy(cfg).await;
    let a = plain.send("GET", "reviews.shop:9080", "/", &[], b"").await;
    assert!(a.status >= 500, "{}", a.status);
    assert_eq!(app.hits(), 7);
    assert!(callee.tls.handshake_failures.load(Ordering::Relaxed) >= 1);
}

/// An HTTP/2 client's concurrent streams take hyper's path, and cross the multiplexed hop
/// together: a burst makes one connection.
#[tokio::test]
async fn http2_streams_cross_the_multiplexed_hop_on_one_connection() {
    use futures::StreamExt;
    use http_body_util::{BodyExt, Empty};
    let root = ca("root");
    let app = support::upstream("app").await;
    let callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.36:15006",
        Some(fresh(&root, &root.pem, SERVER)),
    )
    .await;
    let cfg = support::config("c1", vec![meshed("127.0.0.36", app.addr().port())], vec![]);
    let caller = support::proxy_tls(cfg, "127.0.0.1:0", Some(fresh(&root, &root.pem, CLIENT))).await;
    // One HTTP/2 connection to the outbound listener, as a gRPC client keeps.
    let h2 = support::h2_over(tokio::net::TcpStream::connect(caller.outbound).await.unwrap()).await;
    let answers: Vec<(u16, String)> = futures::stream::iter(0..200)
        .map(|_| {
            let mut h2 = h2.clone();
            async move {
                let req = http::Request::get("http://reviews.shop:9080/")
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                let response = h2.send_request(req).await.unwrap();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let failed: Vec<_> =
        answers.iter().filter(|(status, body)| *status != 200 || !body.starts_with("app:")).collect();
    assert!(failed.is_empty(), "{} failed, the first: {:?}", failed.len(), failed.first());
    assert_eq!(app.hits(), 200);
    // A burst of 8 made one connection, and every stream crossed it.
    assert_eq!(caller.tls.handshakes.load(Ordering::Relaxed), 1);
    assert_eq!(callee.tls.handshakes.load(Ordering::Relaxed), 1);
    let seen = app.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("host").unwrap(), "reviews.shop:9080");
    assert!(caller.metrics().contains(
        "skein_mtls_requests_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"\",route=\"\"} 200"
    ));
}

#[tokio::test]
async fn upgrades_cross_two_sidecars_over_mtls_to_a_strict_callee() {
    let root = ca("root");
    let port = support::echo_upgrade_upstream().await;
    let callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.34:15006",
        Some(fresh(&root, &root.pem, SERVER)),
    )
    .await;
    let cfg = support::config("c1", vec![meshed("127.0.0.34", port)], vec![]);
    let caller = support::proxy_tls(cfg, "127.0.0.1:0", Some(fresh(&root, &root.pem, CLIENT))).await;
    let (head, echo) = support::upgrade_through(caller.outbound, "reviews.shop:9080").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(&echo, b"ping");
    assert_eq!(callee.tls.handshakes.load(Ordering::Relaxed), 1, "the upgrade came over mTLS");
    assert_eq!(callee.tls.handshake_failures.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_callee_with_the_wrong_identity_gets_no_request() {
    let root = ca("root");
    let app = support::upstream("app").await;
    let impostor = "spiffe://cluster.local/ns/shop/sa/impostor";
    let _callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.32:15006",
        Some(fresh(&root, &root.pem, impostor)),
    )
    .await;
    let caller = support::proxy_tls(
        support::config("c1", vec![meshed("127.0.0.32", app.addr().port())], vec![]),
        "127.0.0.1:0",
        Some(fresh(&root, &root.pem, CLIENT)),
    )
    .await;
    let a = caller.send("GET", "reviews.shop:9080", "/", &[], b"").await;
    assert_eq!(a.status, 503);
    assert_eq!(app.hits(), 0);
    assert_eq!(caller.tls.handshake_failures.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_roots_rotate_under_load_without_a_failed_request() {
    use futures::StreamExt;
    let (old, new) = (ca("old"), ca("new"));
    let app = support::upstream("app").await;
    let callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.33:15006",
        Some(fresh(&old, &old.pem, SERVER)),
    )
    .await;
    let caller = support::proxy_tls(
        support::config("c1", vec![meshed("127.0.0.33", app.addr().port())], vec![]),
        "127.0.0.1:0",
        Some(fresh(&old, &old.pem, CLIENT)),
    )
    .await;
    let (callee_tls, caller_tls) = (callee.tls.clone(), caller.tls.clone());
    let both = format!("{}{}", old.pem, new.pem);
    let probe_cfg = support::config("c1", vec![meshed("127.0.0.33", app.addr().port())], vec![]);
    let rotation = tokio::spawn(async move {
        // Leaves renewed under the old root; both sides trust both roots; the signer switches
        // to the new root; the old root is dropped.
        for step in 0..40 {
            let (signer, bundle) = match step {
                0..10 => (&old, old.pem.clone()),
                10..20 => (&old, both.clone()),
                20..30 => (&new, both.clone()),
                _ => (&new, new.pem.clone()),
            };
            callee_tls.set(fresh(signer, &bundle, SERVER));
            caller_tls.set(fresh(signer, &bundle, CLIENT));
            // A sidecar starting now makes a new handshake with the material of this phase.
            let probe =
                support::proxy_tls(probe_cfg.clone(), "127.0.0.1:0", Some(fresh(signer, &bundle, CLIENT)))
                    .await;
            let status = probe.send("GET", "reviews.shop:9080", "/", &[], b"").await.status;
            assert_eq!(status, 200, "a new connection at step {step}");
            tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        }
    });
    let answers: Vec<u16> = futures::stream::iter(0..1500)
        .map(|_| async { caller.send("GET", "reviews.shop:9080", "/", &[], b"").await.status })
        .buffer_unordered(8)
        .collect()
        .await;
    rotation.await.unwrap();
    let failed = answers.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{failed} of {} failed", answers.len());
    // Connections made before the rotation were kept (swaps never drop connections): at most
    // one per request in flight. The callee made a new handshake for every probe.
    let kept = caller.tls.handshakes.load(Ordering::Relaxed);
    assert!((1..=8).contains(&kept), "{kept} handshakes");
    assert!(callee.tls.handshakes.load(Ordering::Relaxed) >= 41);
}

/// A mesh peer with a valid certificate still cannot use the inbound listener to reach this
/// proxy's own ports: it would otherwise send through the outbound listener as this workload
/// (15001), or reach the admin server (15000).
#[tokio::test]
async fn a_peer_cannot_reach_the_callees_own_ports_through_inbound() {
    let root = ca("root");
    let callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.35:15006",
        Some(fresh(&root, &root.pem, SERVER)),
    )
    .await;
    for port in [15000, 15001, 15006, 15020] {
        // The caller's destination names the proxy port as the app port: the caller sends it
        // in the inbound-port header, as a hostile peer could.
        let cfg = support::config("c1", vec![meshed("127.0.0.35", port)], vec![]);
        let caller = support::proxy_tls(cfg, "127.0.0.1:0", Some(fresh(&root, &root.pem, CLIENT))).await;
        let a = caller.send("GET", "reviews.shop:9080", "/config_dump", &[], b"").await;
        assert_eq!(a.status, 403, "port {port}: {}", a.body);
        assert_eq!(a.headers.get("x-skein-error").unwrap(), "proxy-port", "port {port}");
        println!("attack | a mesh peer with a valid certificate names port {port} as the app port | 403 proxy-port");
    }
    assert!(callee.tls.handshakes.load(Ordering::Relaxed) >= 4, "the peers were authenticated first");
}

/// A sidecar of an older release speaks HTTP/2 to the inbound listener (ALPN `h2`): its
/// concurrent streams, each naming the app port, all reach the app and come back whole.
#[tokio::test]
async fn an_older_sidecars_http2_streams_reach_the_app() {
    http2_streams_reach_the_app("127.0.0.37", b"h2").await;
}

/// The multiplexed hop is HTTP/2 on the wire: a standard client (hyper's) that asks for it is
/// served, its streams decided for its proven identity and sent to the app.
#[tokio::test]
async fn a_standard_http2_client_is_served_on_the_multiplexed_hop() {
    http2_streams_reach_the_app("127.0.0.38", b"skein-h2").await;
}

/// 100 streams, 16 at a time, from an HTTP/2 client speaking `alpn` straight to a callee at
/// `ip`: all reach the app over one connection.
async fn http2_streams_reach_the_app(ip: &str, alpn: &[u8]) {
    use futures::StreamExt;
    use http_body_util::{BodyExt, Full};
    let root = ca("root");
    let app = support::upstream("app").await;
    let inbound = format!("{ip}:15006");
    let callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        &inbound,
        Some(fresh(&root, &root.pem, SERVER)),
    )
    .await;
    let client = fresh(&root, &root.pem, CLIENT);
    let mut config = (*client.client_for(SERVER)).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(&inbound).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("peer.skein.invalid").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    let h2 = support::h2_over(tls).await;
    let port = app.addr().port().to_string();
    let answers: Vec<(u16, String, &str)> = futures::stream::iter(0..100)
        .map(|i| {
            let mut h2 = h2.clone();
            let port = port.clone();
            async move {
                // Every other one with a body, which reaches the app whole.
                let (method, body, seen) =
                    if i % 2 == 0 { ("GET", "", "app:0") } else { ("POST", "stars=5", "app:7") };
                let req = http::Request::builder()
                    .method(method)
                    .uri("http://reviews.shop:9080/")
                    .header("x-skein-inbound-port", port)
                    .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
                    .unwrap();
                let response = h2.send_request(req).await.unwrap();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned(), seen)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failed: Vec<_> = answers.iter().filter(|(s, b, seen)| *s != 200 || b != seen).collect();
    assert!(failed.is_empty(), "{} failed, the first: {:?}", failed.len(), failed.first());
    assert_eq!(app.hits(), 100);
    assert_eq!(callee.tls.handshakes.load(Ordering::Relaxed), 1);
}

/// A response the app streams (chunked, with trailers, larger than the hop's windows) crosses
/// the multiplexed hop and reaches an HTTP/1.1 client whole, re-chunked by the caller.
#[tokio::test]
async fn a_streamed_response_crosses_the_multiplexed_hop_whole() {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = app.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = app.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let mut out =
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n".to_vec();
                for i in 0..64u8 {
                    out.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
                    out.extend_from_slice(&[b'a' + i % 26; 8192]);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\nx-sum: 64\r\n\r\n");
                let _ = s.write_all(&out).await;
            });
        }
    });
    let root = ca("root");
    let _callee = support::proxy_tls(
        support::config("c1", vec![], vec![]),
        "127.0.0.39:15006",
        Some(fresh(&root, &root.pem, SERVER)),
    )
    .await;
    let cfg = support::config("c1", vec![meshed("127.0.0.39", port)], vec![]);
    let caller = support::proxy_tls(cfg, "127.0.0.1:0", Some(fresh(&root, &root.pem, CLIENT))).await;
    for _ in 0..2 {
        let a = caller.send("GET", "reviews.shop:9080", "/", &[], b"").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body.len(), 64 * 8192);
        let expected: String =
            (0..64u8).map(|i| ((b'a' + i % 26) as char).to_string().repeat(8192)).collect();
        assert!(a.body == expected, "the body crossed intact");
    }
    assert_eq!(caller.tls.handshakes.load(Ordering::Relaxed), 1);
}
