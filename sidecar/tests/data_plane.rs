//! The data plane over real loopback sockets: an in-process proxy between a hyper client and
//! small upstream servers.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use skein_api::config::{OutlierConfig, StringMatch};
use skein_proxy::Source;
use support::*;

const HOST: &str = "reviews.shop:9080";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_holds_over_10000_requests_and_beta_always_gets_v2() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let p = proxy(config("c1", vec![endpoint(&v1, "v1"), endpoint(&v2, "v2")], vec![canary_route(90)])).await;

    let n = 10_000;
    let answers: Vec<Answer> =
        futures::stream::iter(0..n).map(|_| p.get(HOST, &[])).buffer_unordered(16).collect().await;
    assert!(answers.iter().all(|a| a.status == 200));
    let t = tally(&answers);
    // v2's count is Binomial(10000, 0.1): mean 1000, sd = sqrt(10000 × 0.1 × 0.9) = 30. A band
    // of ±4.5 sd (865..1135) fails a correct proxy about once in 150,000 runs.
    let got_v2 = t.get("v2").copied().unwrap_or_default();
    assert!((865..=1135).contains(&got_v2), "v2 got {got_v2} of {n}: {t:?}");

    let beta: Vec<Answer> = futures::stream::iter(0..200)
        .map(|_| p.get(HOST, &[("x-user-group", "beta")]))
        .buffer_unordered(8)
        .collect()
        .await;
    assert_eq!(tally(&beta).get("v2"), Some(&200), "beta → v2 always");
    let m = p.metrics();
    assert!(m.contains("skein_requests_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"v2\",route=\"shop/reviews\",status=\"200\"}"), "{m}");
}

#[tokio::test]
async fn a_request_is_retried_until_the_upstream_recovers() {
    let up = upstream("v1").await;
    let mut cfg = config("c1", vec![endpoint(&up, "v1")], vec![]);
    cfg.destinations[0].retry = Some(retry_config(3, 20, 10));
    let p = proxy(cfg).await;
    up.fail_first.store(2, Ordering::SeqCst);

    let a = p.send("PUT", HOST, "/items/1", &[], b"payload").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "v1:7", "the buffered body was replayed");
    assert_eq!(a.headers.get("x-skein-retries").unwrap(), "2");
    assert_eq!(up.hits(), 3);
    let seen = up.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("x-skein-attempt").unwrap(), "2");

    // POST is not idempotent: not retried by default.
    up.fail_first.store(1, Ordering::SeqCst);
    let a = p.send("POST", HOST, "/items", &[], b"x").await;
    assert_eq!(a.status, 503);
    assert_eq!(up.hits(), 4);

    // A body over 64 KiB streams and is not retried.
    up.fail_first.store(1, Ordering::SeqCst);
    let big = vec![b'x'; 70 * 1024];
    let a = p.send("PUT", HOST, "/big", &[], &big).await;
    assert_eq!(a.status, 503);
    assert_eq!(up.hits(), 5);
    let a = p.send("PUT", HOST, "/big", &[], &big).await;
    assert_eq!(a.body, format!("v1:{}", big.len()), "large bodies still arrive whole");
}

#[tokio::test]
async fn an_exhausted_budget_stops_retries() {
    let up = upstream("v1").await;
    up.status.store(503, Ordering::SeqCst);
    let mut cfg = config("c1", vec![endpoint(&up, "v1")], vec![]);
    // No share of traffic, a floor of 1 retry/s: 10 retries per 10 s window.
    cfg.destinations[0].retry = Some(retry_config(3, 0, 1));
    let p = proxy(cfg).await;

    let n = 20;
    for _ in 0..n {
        assert_eq!(p.get(HOST, &[]).await.status, 503);
    }
    assert_eq!(up.hits(), n + 10, "originals plus the 10 retries the budget allows");
    let m = p.metrics();
    assert!(m.contains("skein_retries_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"\",route=\"\"} 10"), "{m}");
    assert!(!m.contains("skein_retries_skipped_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"\",route=\"\"} 0"));
}

fn outlier(consecutive: u32, base_ms: u64, percent: u32) -> OutlierConfig {
    OutlierConfig {
        policy: "shop/reviews".into(),
        consecutive_errors: consecutive,
        interval_ms: 100,
        base_ejection_ms: base_ms,
        max_ejection_ms: 10 * base_ms,
        max_ejection_percent: percent,
    }
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_and_returns_after_its_ejection_time() {
    let (good, bad) = (upstream("good").await, upstream("bad").await);
    bad.status.store(500, Ordering::SeqCst);
    let mut cfg = config("c1", vec![endpoint(&good, "v1"), endpoint(&bad, "v1")], vec![]);
    cfg.destinations[0].outlier = Some(outlier(3, 700, 50));
    // Round robin, so that which endpoint gets traffic depends on ejection alone.
    cfg.destinations[0].load_balancer = skein_api::config::LoadBalancer::RoundRobin;
    let p = proxy(cfg).await;

    for _ in 0..60 {
        p.get(HOST, &[]).await;
    }
    assert_eq!(bad.hits(), 3, "three failures in a row, then ejected");
    let ejected_at = Instant::now();
    assert!(p.metrics().contains("skein_outlier_ejections_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"\",route=\"\"} 1"));

    // It recovers; after its ejection time it is back in rotation.
    bad.status.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(750).saturating_sub(ejected_at.elapsed())).await;
    for _ in 0..60 {
        p.get(HOST, &[]).await;
    }
    assert!(bad.hits() > 3, "the endpoint is back: {} hits", bad.hits());
}

#[tokio::test]
async fn max_ejection_percent_holds_and_all_ejected_fails_open() {
    let ups = [upstream("a").await, upstream("b").await, upstream("c").await];
    for u in &ups[..2] {
        u.status.store(500, Ordering::SeqCst);
    }
    let mut cfg = config("c1", ups.iter().map(|u| endpoint(u, "v1")).collect(), vec![]);
    cfg.destinations[0].outlier = Some(outlier(2, 5_000, 34));
    let p = proxy(cfg).await;
    for _ in 0..100 {
        p.get(HOST, &[]).await;
    }
    let active = p.store.current().unwrap();
    let parts = http::Request::new(()).into_parts().0;
    let target = active.table.resolve(Some("reviews.shop"), Some(9080), None, &parts).unwrap();
    let now = skein_proxy::now_ms();
    let ejected = target.pool.endpoints.iter().filter(|e| e.outlier.is_ejected(now)).count();
    assert_eq!(ejected, 1, "34% of 3 endpoints allows one ejection");

    // A lone endpoint is never ejected: traffic keeps flowing to it.
    let lone = upstream("lone").await;
    lone.status.store(500, Ordering::SeqCst);
    let mut cfg = config("c2", vec![endpoint(&lone, "v1")], vec![]);
    cfg.destinations[0].outlier = Some(outlier(1, 5_000, 100));
    p.store.apply(cfg, Source::File).unwrap();
    for _ in 0..5 {
        assert_eq!(p.get(HOST, &[]).await.status, 500);
    }
    assert_eq!(lone.hits(), 5);
}

#[tokio::test]
async fn rule_timeouts_answer_504() {
    let up = upstream("slow").await;
    up.delay_ms.store(2_000, Ordering::SeqCst);
    let mut route = canary_route(100);
    route.rules[1].timeout_ms = Some(100);
    let p = proxy(config("c1", vec![endpoint(&up, "v1")], vec![route])).await;
    let started = Instant::now();
    let a = p.get(HOST, &[]).await;
    assert_eq!(a.status, 504);
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(a.headers.get("x-skein-error").unwrap(), "timeout");
}

#[tokio::test]
async fn trace_headers_are_generated_or_kept() {
    let up = upstream("v1").await;
    let p = proxy(config("c1", vec![endpoint(&up, "v1")], vec![])).await;
    p.get(HOST, &[("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7")]).await;
    let seen = up.last_headers.lock().unwrap().clone().unwrap();
    let tp = seen.get("traceparent").unwrap().to_str().unwrap();
    assert!(skein_proxy::is_valid_traceparent(tp.as_bytes()), "{tp}");
    assert!(seen.contains_key("x-request-id"));
    assert_eq!(seen.get("x-b3-traceid").unwrap(), "80f198ee56343ba864fe8b2a57d3eff7");

    let mine = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    p.get(HOST, &[("traceparent", mine), ("x-request-id", "req-1")]).await;
    let seen = up.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("traceparent").unwrap(), mine);
    assert_eq!(seen.get("x-request-id").unwrap(), "req-1");

    // Two traceparents, both valid, are as good as none: one new one goes on (the general
    // path's `trace::ensure` decides alike: its unit tests).
    let other = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    p.get(HOST, &[("traceparent", mine), ("traceparent", other)]).await;
    let seen = up.last_headers.lock().unwrap().clone().unwrap();
    let sent: Vec<_> = seen.get_all("traceparent").iter().collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0] != mine && sent[0] != other, "{sent:?}");
    assert!(skein_proxy::is_valid_traceparent(sent[0].as_bytes()));
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let up = upstream("v1").await;
    let p = proxy(config("c1", vec![endpoint(&up, "v1")], vec![])).await;
    p.get(
        HOST,
        &[
            ("connection", "x-private, keep-alive"),
            ("x-private", "secret"),
            ("x-end-to-end", "yes"),
            ("te", "trailers"),
        ],
    )
    .await;
    let seen = up.last_headers.lock().unwrap().clone().unwrap();
    assert!(!seen.contains_key("x-private"), "named by Connection");
    assert!(!seen.contains_key("te"));
    assert_eq!(seen.get("x-end-to-end").unwrap(), "yes");
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let up = upstream("v1").await;
    let p = proxy(config("c1", vec![endpoint(&up, "v1")], vec![])).await;
    let addr = p.outbound;
    let raw = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for garbage in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: \x01bad\r\n\r\n",
            b"GET /\x00 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(garbage).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            answers.push(String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_string());
        }
        answers
    })
    .await
    .unwrap();
    for line in &raw {
        assert!(line.starts_with("HTTP/1.1 400"), "{raw:?}");
    }
    assert_eq!(p.get(HOST, &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reloads_under_load_drop_no_request() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let p = proxy(config("c0", vec![endpoint(&v1, "v1"), endpoint(&v2, "v2")], vec![canary_route(90)])).await;
    let store = p.store.clone();
    let (a, b) = (endpoint(&v1, "v1"), endpoint(&v2, "v2"));
    let reloads = tokio::spawn(async move {
        for i in 0..100u32 {
            let cfg =
                config(&format!("c{i}"), vec![a.clone(), b.clone()], vec![canary_route(10 + (i % 9) * 10)]);
            store.apply(cfg, Source::File).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let answers: Vec<Answer> =
        futures::stream::iter(0..3_000).map(|_| p.get(HOST, &[])).buffer_unordered(16).collect().await;
    reloads.await.unwrap();
    let failed: Vec<u16> = answers.iter().map(|a| a.status).filter(|s| *s != 200).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
}

#[tokio::test]
async fn unknown_hosts_pass_through_and_missing_rules_get_404() {
    let up = upstream("outside").await;
    let mut route = canary_route(100);
    route.rules.truncate(1); // only the beta rule
    route.rules[0].headers[0].value = StringMatch::Prefix("be".into());
    let p = proxy(config("c1", vec![endpoint(&up, "v2")], vec![route])).await;
    let a = p.get(&up.addr().to_string(), &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "outside:0"), "not a mesh host: passthrough");
    let a = p.get(HOST, &[]).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.headers.get("x-skein-error").unwrap(), "no-route");
    assert_eq!(p.get(HOST, &[("x-user-group", "beta-testers")]).await.status, 200);
    let a = p.get("reviews.shop:1234", &[]).await;
    assert_eq!(a.status, 502);
}

#[tokio::test]
async fn inbound_requests_reach_the_local_app_on_their_port() {
    let app = upstream("app").await;
    let p = proxy(config("c1", vec![], vec![])).await;
    let host = format!("reviews.shop:{}", app.addr().port());
    let a = p.send_to(p.inbound, "GET", &host, "/", &[], b"").await;
    assert_eq!((a.status, a.body.as_str()), (200, "app:0"));
    assert!(p.metrics().contains("skein_requests_total{direction=\"inbound\",destination=\"local\",subset=\"\",route=\"\",status=\"200\"} 1"));
}

#[tokio::test]
async fn no_endpoints_answers_503() {
    let p = proxy(config("c1", vec![], vec![])).await;
    let a = p.get(HOST, &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.headers.get("x-skein-error").unwrap(), "no-endpoints");
}

#[tokio::test]
async fn a_request_to_the_proxy_itself_is_refused_not_looped() {
    let p = proxy(config("c1", vec![], vec![])).await;
    let a = p.get(&p.outbound.to_string(), &[]).await;
    assert_eq!(a.status, 508);
}

#[tokio::test]
async fn http2_from_the_app_is_served() {
    let up = upstream("v1").await;
    let p = proxy(config("c1", vec![endpoint(&up, "v1")], vec![])).await;
    let mut h2 = support::h2_over(tokio::net::TcpStream::connect(p.outbound).await.unwrap()).await;
    for _ in 0..3 {
        let req = http::Request::get("http://reviews.shop:9080/h2")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = h2.send_request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        assert_eq!(&body[..], b"v1:0");
    }
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn websocket_style_upgrades_are_passed_through() {
    let port = echo_upgrade_upstream().await;
    let ep = skein_api::config::Endpoint {
        address: "127.0.0.1".into(),
        ports: [("http".to_string(), port)].into(),
        labels: Default::default(),
        identity: None,
    };
    let p = proxy(config("c1", vec![ep], vec![])).await;
    let (head, echo) = upgrade_through(p.outbound, "reviews.shop:9080").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: echo"), "{head}");
    assert_eq!(&echo, b"ping");
}

#[tokio::test]
async fn per_try_timeouts_retry_onto_a_healthy_endpoint() {
    let (slow, fast) = (upstream("slow").await, upstream("fast").await);
    slow.delay_ms.store(2_000, Ordering::SeqCst);
    let mut cfg = config("c1", vec![endpoint(&slow, "v1"), endpoint(&fast, "v1")], vec![]);
    cfg.destinations[0].load_balancer = skein_api::config::LoadBalancer::RoundRobin;
    let mut retry = retry_config(2, 100, 10);
    retry.per_try_timeout_ms = Some(100);
    retry.timeout_ms = Some(1_500);
    cfg.destinations[0].retry = Some(retry);
    let p = proxy(cfg).await;
    for _ in 0..4 {
        let started = Instant::now();
        let a = p.get(HOST, &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "fast:0"));
        assert!(started.elapsed() < Duration::from_millis(1_000), "{:?}", started.elapsed());
    }
    assert!(slow.hits() >= 1, "the slow endpoint was tried and timed out");
}

#[tokio::test]
async fn the_config_file_is_reloaded_and_a_bad_one_is_refused() {
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let dir = std::env::temp_dir().join(format!("skein-file-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let write =
        |cfg: &skein_api::ProxyConfig| std::fs::write(&path, serde_json::to_vec(cfg).unwrap()).unwrap();
    write(&config("f1", vec![endpoint(&v1, "v1")], vec![]));

    let store = std::sync::Arc::new(skein_proxy::ConfigStore::new(None));
    let loaded = skein_proxy::config_file::load(&path, &store).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(skein_proxy::config_file::watch(path.clone(), store.clone(), loaded, stop.clone()));
    let version = || store.current().unwrap().config.version.clone();
    assert_eq!(version(), "f1");

    write(&config("f2", vec![endpoint(&v2, "v2")], vec![]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while version() != "f2" {
        assert!(Instant::now() < deadline, "the changed file was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&path, b"{ this is not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(version(), "f2", "the last good config stays");
    assert_eq!(store.refused.load(Ordering::Relaxed), 1);
    stop.cancel();
    std::fs::remove_dir_all(dir).unwrap();
}

/// An upstream that answers every request on a connection with `response(path)`, raw bytes;
/// `close_after` closes each connection after that many responses.
async fn raw_upstream(response: fn(&str) -> Vec<u8>, close_after: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for _ in 0..close_after {
                    // One request: a head, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 65536];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    buf.drain(..head_end + len);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let mut out = response(&path);
                    if path.starts_with("/echo-length") {
                        out = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{len}",
                            len.to_string().len()
                        )
                        .into_bytes();
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn raw_endpoint(port: u16) -> skein_api::config::Endpoint {
    skein_api::config::Endpoint {
        address: "127.0.0.1".into(),
        ports: [("http".to_string(), port)].into(),
        labels: Default::default(),
        identity: None,
    }
}

fn framed(path: &str) -> Vec<u8> {
    match path {
        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-t: 1\r\n\r\n".to_vec(),
        "/empty" => b"HTTP/1.1 204 No Content\r\nx-a: b\r\n\r\n".to_vec(),
        "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n".to_vec(),
        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\nok".to_vec(),
    }
}

#[tokio::test]
async fn the_http1_fast_path_frames_bodies_and_keeps_connections() {
    let port = raw_upstream(framed, usize::MAX).await;
    let p = proxy(config("c1", vec![raw_endpoint(port)], vec![])).await;
    let a = p.send("GET", HOST, "/chunked", &[], b"").await;
    assert_eq!((a.status, a.body.as_str()), (200, "hello world"));
    let a = p.send("GET", HOST, "/empty", &[], b"").await;
    assert_eq!((a.status, a.headers.get("x-a").unwrap().to_str().unwrap()), (204, "b"));
    let a = p.send("HEAD", HOST, "/head", &[], b"").await;
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    let a = p.send("GET", HOST, "/", &[], b"").await;
    assert_eq!(a.body, "ok");
    assert!(a.headers.get("keep-alive").is_none(), "hop-by-hop response headers are dropped");
    // A large body streams through.
    let big = vec![b'x'; 3 * 1024 * 1024];
    let a = p.send("POST", HOST, "/echo-length", &[], &big).await;
    assert_eq!(a.body, big.len().to_string());

    // Pipelined requests on one raw connection, then `connection: close`.
    let addr = p.outbound;
    let text = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = "GET /chunked HTTP/1.1\r\nHost: reviews.shop:9080\r\n\r\n";
        let last = "GET / HTTP/1.1\r\nHost: reviews.shop:9080\r\nConnection: close\r\n\r\n";
        s.write_all(format!("{req}{req}{last}").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"));
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_replaced() {
    // Every upstream connection serves one response, then closes.
    let port = raw_upstream(framed, 1).await;
    let p = proxy(config("c1", vec![raw_endpoint(port)], vec![])).await;
    for _ in 0..20 {
        let a = p.get(HOST, &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn absolute_form_requests_from_an_http_proxy_client_are_routed() {
    let up = upstream("v1").await;
    let p = proxy(config("c1", vec![endpoint(&up, "v1")], vec![])).await;
    let addr = p.outbound;
    let text = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET http://reviews.shop:9080/x?y=1 HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("v1:0"), "{text}");
    let seen = up.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen.get("host").unwrap(), "reviews.shop:9080");
}

fn meshed_endpoint(ip: &str, port: u16) -> skein_api::config::Endpoint {
    skein_api::config::Endpoint {
        address: ip.into(),
        ports: [("http".to_string(), port)].into(),
        labels: Default::default(),
        identity: Some(skein_api::WorkloadIdentity::new("shop", "reviews")),
    }
}

#[tokio::test]
async fn meshed_endpoints_are_reached_through_their_sidecar_over_http1() {
    // A stand-in peer sidecar on 127.0.0.21:15006 that records what arrives.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.21:15006").await.unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let s = s.clone();
                    async move {
                        let port = req
                            .headers()
                            .get("x-skein-inbound-port")
                            .map(|v| v.to_str().unwrap().to_string());
                        let host = req.headers().get("host").map(|v| v.to_str().unwrap().to_string());
                        s.lock().unwrap().push((req.version(), port, host));
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from("peer"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let p = proxy(config("c1", vec![meshed_endpoint("127.0.0.21", 8123)], vec![])).await;
    for _ in 0..3 {
        let a = p.get(HOST, &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "peer"));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for (version, port, host) in seen {
        assert_eq!(version, http::Version::HTTP_11);
        assert_eq!(port.as_deref(), Some("8123"), "the app port is named for the peer");
        assert_eq!(host.as_deref(), Some(HOST), "the original authority travels along");
    }
}

#[tokio::test]
async fn a_request_crosses_two_sidecars_to_the_app() {
    let app = upstream("app").await;
    // The callee's sidecar: inbound on 127.0.0.22:15006, delivering to the app on 127.0.0.1.
    let callee = proxy_at(config("c1", vec![], vec![]), "127.0.0.22:15006").await;
    let caller = proxy(config("c1", vec![meshed_endpoint("127.0.0.22", app.addr().port())], vec![])).await;
    let a = caller.send("POST", HOST, "/orders", &[("x-user-group", "beta")], b"body").await;
    assert_eq!((a.status, a.body.as_str()), (200, "app:4"));
    let seen = app.last_headers.lock().unwrap().clone().unwrap();
    assert!(seen.get("x-skein-inbound-port").is_none(), "the hop header stops at the callee's sidecar");
    assert_eq!(seen.get("x-user-group").unwrap(), "beta");
    assert!(callee.metrics().contains("skein_requests_total{direction=\"inbound\",destination=\"local\",subset=\"\",route=\"\",status=\"200\"} 1"));
}

/// An app that answers each request on a connection with the next of `answers` (raw HTTP/1.1
/// bytes), closing the connection after the last; returns its port and its count of accepted
/// connections.
async fn scripted_app(
    answers: Vec<Vec<&'static [u8]>>,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        for script in answers {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for answer in script {
                    // One request head (no request here has a body).
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    s.write_all(answer).await.unwrap();
                }
            });
        }
    });
    (port, accepted)
}

/// An HTTP/2 client's request to the outbound listener (served by the general path, which
/// sends it over the fast path's connections): status, body and trailers, or the error.
async fn h2_get(
    h2: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> Result<(u16, Vec<u8>, Option<http::HeaderMap>), String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("http://{HOST}/x")).body(http_body_util::Empty::new()).unwrap();
    let response = h2.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let collected = response.into_body().collect().await.map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned();
    Ok((status, collected.to_bytes().to_vec(), trailers))
}

async fn h2_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    support::h2_over(tokio::net::TcpStream::connect(addr).await.unwrap()).await
}

fn app_endpoint(port: u16) -> skein_api::config::Endpoint {
    skein_api::config::Endpoint {
        address: "127.0.0.1".into(),
        ports: [("http".to_string(), port)].into(),
        labels: Default::default(),
        identity: None,
    }
}

#[tokio::test]
async fn responses_are_decoded_and_their_connection_reused_whatever_their_framing() {
    let chunked: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/grpc\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n";
    let sized: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-app: 1\r\n\r\nabc";
    let empty_chunked: &[u8] = b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    let no_content: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
    let (port, accepted) = scripted_app(vec![vec![chunked, sized, empty_chunked, no_content, sized]]).await;
    let p = proxy(config("c1", vec![app_endpoint(port)], vec![])).await;
    let mut h2 = h2_client(p.outbound).await;

    let (status, body, trailers) = h2_get(&mut h2).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"hello world"[..]));
    let trailers = trailers.expect("the chunked body's trailers reach the HTTP/2 client");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("grpc-message").unwrap(), "fine");

    let (status, body, trailers) = h2_get(&mut h2).await.unwrap();
    assert_eq!((status, &body[..], trailers), (200, &b"abc"[..], None));
    let (status, body, _) = h2_get(&mut h2).await.unwrap();
    assert_eq!((status, body.len()), (201, 0));
    let (status, body, _) = h2_get(&mut h2).await.unwrap();
    assert_eq!((status, body.len()), (204, 0));
    let (status, body, _) = h2_get(&mut h2).await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"abc"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one upstream connection for five requests in turn");
}

#[tokio::test]
async fn a_pooled_connection_the_app_closed_is_replaced_and_a_broken_body_is_not_passed_on() {
    let sized: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    // Bytes that are not chunked coding, after a good head: the client must not see a whole
    // body, and the connection must not be used again.
    let broken: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnope\r\n0\r\n\r\n";
    // First connection: one answer, then closed (no `connection: close`: the proxy finds out
    // when it sends the next request). Second: the broken body. Third: a good answer.
    let (port, accepted) = scripted_app(vec![vec![sized], vec![broken], vec![sized]]).await;
    let p = proxy(config("c1", vec![app_endpoint(port)], vec![])).await;
    let mut h2 = h2_client(p.outbound).await;

    assert_eq!(h2_get(&mut h2).await.unwrap().0, 200);
    tokio::time::sleep(Duration::from_millis(50)).await; // the app's close reaches the proxy
                                                         // The GET meets the closed connection and is sent again on a new one, which answers with
                                                         // the broken body.
    let broken_answer = h2_get(&mut h2).await;
    assert!(broken_answer.is_err(), "a broken body is reset, not ended: {broken_answer:?}");
    assert_eq!(h2_get(&mut h2).await.unwrap(), (200, b"ok".to_vec(), None));
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_http2_client_gets_large_bodies_and_many_streams_whole() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An app that answers `/big` with 3 MiB (past every buffer and window on the way) and
    // anything else with five bytes, on keep-alive connections.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let big = buf.starts_with(b"GET /big ");
                    buf.drain(..end);
                    if big {
                        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3145728\r\n\r\n".to_vec();
                        answer.extend((0..3_145_728u32).map(|i| (i % 251) as u8));
                        s.write_all(&answer).await.unwrap();
                    } else {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsmall").await.unwrap();
                    }
                }
            });
        }
    });
    let p = proxy(config("c1", vec![app_endpoint(port)], vec![])).await;
    let h2 = h2_client(p.outbound).await;
    let get = |path: &'static str| {
        let mut h2 = h2.clone();
        async move {
            let req = http::Request::get(format!("http://{HOST}{path}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let response = h2.send_request(req).await.unwrap();
            let status = response.status().as_u16();
            (status, response.into_body().collect().await.unwrap().to_bytes())
        }
    };
    let big = tokio::spawn(get("/big"));
    let smalls: Vec<_> =
        futures::stream::iter(0..40).map(|_| get("/small")).buffer_unordered(16).collect().await;
    assert!(smalls.iter().all(|(s, b)| *s == 200 && &b[..] == b"small"));
    let (status, body) = big.await.unwrap();
    assert_eq!((status, body.len()), (200, 3_145_728));
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "the body arrives intact");
}
