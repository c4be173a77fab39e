//! Access policies enforced at the callee's inbound, through two real sidecars on loopback
//! with certificates minted here: the caller's verified SPIFFE ID decides. An allowed identity
//! reaches the app; a denied one gets 403 naming the policy and the app never sees it; a
//! plaintext caller is judged as unauthenticated in permissive mode and refused outright in
//! strict mode; a namespace default of `deny` denies everything until an Allow policy allows
//! someone; a DryRun policy records and never denies.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::sync::{Arc, Mutex};

use skein_api::authz::{
    Action, AuthzPolicy, AuthzRule, DefaultPolicy, Destination, InboundAuthz, Mode, PathMatch, Source,
};
use skein_api::config::Endpoint;
use skein_api::{ProxyConfig, WorkloadIdentity};
use skein_proxy::{AccessLog, TlsMaterial};
use support::pki::{ca, leaf, Ca};
use support::TestProxy;
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CALLEE: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/productpage";
const ROGUE: &str = "spiffe://cluster.local/ns/shop/sa/rogue";
const OUTSIDER: &str = "spiffe://cluster.local/ns/books/sa/reader";

fn cert(root: &Ca, uri: &str) -> TlsMaterial {
    let now = OffsetDateTime::now_utc();
    let (chain, key) = leaf(root, uri, now - Duration::minutes(5), now + Duration::hours(24));
    TlsMaterial::from_pem(chain.as_bytes(), key.as_bytes(), root.pem.as_bytes()).unwrap()
}

/// Only shop/productpage may call the app's `port`.
fn client_only(port: u16, mode: Mode) -> AuthzPolicy {
    AuthzPolicy {
        name: "shop/reviews-callers".into(),
        action: Action::Allow,
        mode,
        ports: vec![port],
        rules: vec![AuthzRule {
            from: Some(Source {
                service_accounts: vec![("shop".into(), "productpage".into())],
                ..Default::default()
            }),
            to: None,
        }],
    }
}

fn authz(default: DefaultPolicy, policies: Vec<AuthzPolicy>) -> InboundAuthz {
    InboundAuthz { default, namespace: "shop".into(), policies }
}

/// A sink for the callee's access log.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..100 {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no access-log line with {needle}: {}", String::from_utf8_lossy(&self.0.lock().unwrap()));
    }
}

/// The callee's sidecar at `ip:15006` in front of `app`, with `authz`, and a caller config that
/// reaches it as the meshed endpoint of `reviews.shop`.
struct Mesh {
    root: Ca,
    app: Arc<support::Upstream>,
    callee: TestProxy,
    callee_log: Lines,
    to_callee: ProxyConfig,
}

async fn mesh(ip: &str, strict: bool, policy: impl FnOnce(u16) -> InboundAuthz) -> Mesh {
    let root = ca("root");
    let app = support::upstream("app").await;
    let port = app.addr().port();
    let mut cfg = support::config("c1", vec![], vec![]);
    cfg.identity = Some(WorkloadIdentity::new("shop", "reviews"));
    cfg.authz = policy(port);
    let callee_log = Lines::default();
    let callee = support::proxy_full(
        cfg,
        &format!("{ip}:15006"),
        Some(cert(&root, CALLEE)),
        strict,
        AccessLog::to_writer(callee_log.clone()),
    )
    .await;
    let endpoint = Endpoint {
        address: ip.into(),
        ports: [("http".to_string(), port)].into(),
        labels: Default::default(),
        identity: Some(WorkloadIdentity::new("shop", "reviews")),
    };
    let to_callee = support::config("c1", vec![endpoint], vec![]);
    Mesh { root, app, callee, callee_log, to_callee }
}

impl Mesh {
    /// A caller sidecar with identity `uri` (plaintext without one).
    async fn caller(&self, uri: Option<&str>) -> TestProxy {
        support::proxy_tls(self.to_callee.clone(), "127.0.0.1:0", uri.map(|u| cert(&self.root, u))).await
    }

    /// A plaintext request straight to the callee's inbound listener, for the app's port.
    async fn plaintext(&self) -> support::Answer {
        let port = self.app.addr().port().to_string();
        self.callee
            .send_to(
                self.callee.inbound,
                "GET",
                &format!("reviews:{port}"),
                "/",
                &[("x-skein-inbound-port", &port)],
                b"",
            )
            .await
    }

    fn decisions(&self, decision: &str, policy: &str, mode: &str) -> u64 {
        let needle = format!(
            "skein_authz_decisions_total{{decision=\"{decision}\",policy=\"{policy}\",mode=\"{mode}\"}} "
        );
        self.callee
            .metrics()
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str()).map(|n| n.parse().unwrap()))
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn the_allowed_identity_reaches_the_app_and_another_gets_403_naming_the_policy() {
    let m =
        mesh("127.0.0.51", true, |port| authz(DefaultPolicy::Allow, vec![client_only(port, Mode::Enforce)]))
            .await;
    let client = m.caller(Some(CLIENT)).await;
    for _ in 0..3 {
        let a = client.get("reviews.shop:9080", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "app:0"));
    }
    assert_eq!(m.app.hits(), 3);

    let rogue = m.caller(Some(ROGUE)).await;
    let a = rogue.send("POST", "reviews.shop:9080", "/reviews/1", &[], b"payload").await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "denied by shop/reviews-callers\n", "the policy and nothing more");
    assert_eq!(a.headers.get("x-skein-error").unwrap(), "authz-denied");
    assert_eq!(m.app.hits(), 3, "the app never saw the denied request");

    assert_eq!(m.decisions("allow", "shop/reviews-callers", "enforce"), 3);
    assert_eq!(m.decisions("deny", "shop/reviews-callers", "enforce"), 1);
    // The caller counts the denial on its edge, for the topology.
    let report = rogue.store.shared.metrics.traffic_report();
    assert_eq!((report.edges[0].requests, report.edges[0].denied), (1, 1), "{report:?}");
    assert!(rogue.metrics().contains("skein_denied_requests_total{direction=\"outbound\",destination=\"reviews.shop\",subset=\"\",route=\"\"} 1"));
    // The callee counts the denial as inbound traffic, never as a call of its own.
    assert!(m.callee.store.shared.metrics.traffic_report().edges.is_empty(), "{}", m.callee.metrics());
    let log = m.callee_log.wait_for("\"authz\":\"deny shop/reviews-callers\"").await;
    assert!(log.contains("\"authz\":\"allow shop/reviews-callers\""), "{log}");
}

#[tokio::test]
async fn rules_match_methods_and_paths_and_other_ports_follow_the_default() {
    let m = mesh("127.0.0.52", true, |port| {
        let mut read_only = client_only(port, Mode::Enforce);
        read_only.rules[0].to = Some(Destination {
            methods: vec!["GET".into()],
            paths: vec![PathMatch::Prefix("/reviews".into())],
            ..Default::default()
        });
        authz(DefaultPolicy::Allow, vec![read_only])
    })
    .await;
    let client = m.caller(Some(CLIENT)).await;
    assert_eq!(client.send("GET", "reviews.shop:9080", "/reviews/1", &[], b"").await.status, 200);
    assert_eq!(client.send("GET", "reviews.shop:9080", "/reviews/../admin", &[], b"").await.status, 403);
    assert_eq!(client.send("GET", "reviews.shop:9080", "/reviews%2F..%2Fadmin", &[], b"").await.status, 403);
    assert_eq!(client.send("GET", "reviews.shop:9080", "/reviewsx", &[], b"").await.status, 403);
    assert_eq!(client.send("DELETE", "reviews.shop:9080", "/reviews/1", &[], b"").await.status, 403);
    assert_eq!(m.app.hits(), 1);
    // The app is sent the path the rules saw, so it cannot read `..;` or `//` otherwise.
    for (sent, seen) in [
        ("/admin/..;/reviews/1?x=1", "/reviews/1?x=1"),
        ("//reviews//2", "/reviews/2"),
        ("/reviews/%33", "/reviews/3"),
        ("/reviews/4", "/reviews/4"),
    ] {
        assert_eq!(client.send("GET", "reviews.shop:9080", sent, &[], b"").await.status, 200, "{sent}");
        assert_eq!(m.app.last_target.lock().unwrap().as_deref(), Some(seen), "{sent}");
    }
    m.callee_log.wait_for("\"path\":\"/admin/..;/reviews/1?x=1\"").await;
}

#[tokio::test]
async fn ports_without_path_rules_pass_the_path_unchanged_and_the_app_cannot_fake_a_denial() {
    let m =
        mesh("127.0.0.59", true, |port| authz(DefaultPolicy::Allow, vec![client_only(port, Mode::Enforce)]))
            .await;
    m.app.answer_headers.lock().unwrap().push(("x-skein-error", "authz-denied"));
    m.app.status.store(403, std::sync::atomic::Ordering::SeqCst);
    let client = m.caller(Some(CLIENT)).await;
    let a = client.get("reviews.shop:9080", &[]).await;
    assert_eq!(a.status, 403);
    assert!(a.headers.get("x-skein-error").is_none(), "{:?}", a.headers);
    let report = client.store.shared.metrics.traffic_report();
    assert_eq!((report.edges[0].requests, report.edges[0].denied), (1, 0), "{report:?}");
    let a = client.send("GET", "reviews.shop:9080", "/a//b/../c;x", &[], b"").await;
    assert_eq!(a.status, 403);
    assert_eq!(m.app.last_target.lock().unwrap().as_deref(), Some("/a//b/../c;x"));
}

/// An HTTP/2 client's requests cross the multiplexed hop (their bodies are whole in hand): the
/// callee decides them, normalises their paths and strips the app's word exactly as it does
/// the HTTP/1.1 hop's.
#[tokio::test]
async fn the_multiplexed_hop_is_decided_as_the_http1_one() {
    let m = mesh("127.0.0.60", true, |port| {
        let mut read_only = client_only(port, Mode::Enforce);
        read_only.rules[0].to = Some(Destination {
            methods: vec!["GET".into(), "POST".into()],
            paths: vec![PathMatch::Prefix("/reviews".into())],
            ..Default::default()
        });
        authz(DefaultPolicy::Allow, vec![read_only])
    })
    .await;
    let client = m.caller(Some(CLIENT)).await;
    let at = "reviews.shop:9080";
    // Four at once share one connection.
    let answers = futures::future::join_all((0..4).map(|i| {
        let client = &client;
        async move { client.send_h2("POST", at, &format!("/reviews/{i}"), b"stars=5").await }
    }))
    .await;
    assert!(answers.iter().all(|a| a.status == 200 && a.body.starts_with("app:")));
    assert_eq!(m.callee.tls.handshakes.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(m.app.hits(), 4);
    let a = client.send_h2("GET", at, "/admin/..;/reviews/1?x=1", b"").await;
    assert_eq!(a.status, 200);
    assert_eq!(m.app.last_target.lock().unwrap().as_deref(), Some("/reviews/1?x=1"));
    let a = client.send_h2("DELETE", at, "/reviews/1", b"").await;
    assert_eq!(a.status, 403);
    assert_eq!(a.headers.get("x-skein-error").unwrap(), "authz-denied");
    let rogue = m.caller(Some(ROGUE)).await;
    let a = rogue.send_h2("GET", at, "/reviews/1", b"").await;
    assert_eq!((a.status, a.body.as_str()), (403, "denied by shop/reviews-callers\n"));
    assert_eq!(m.app.hits(), 5, "the app never saw a denied request");
    assert_eq!(m.decisions("allow", "shop/reviews-callers", "enforce"), 5);
    assert_eq!(m.decisions("deny", "shop/reviews-callers", "enforce"), 2);
    // The app's own `x-skein-error` does not cross as the sidecar's.
    m.app.answer_headers.lock().unwrap().push(("x-skein-error", "authz-denied"));
    let a = client.send_h2("GET", at, "/reviews/2", b"").await;
    assert_eq!(a.status, 200);
    assert!(a.headers.get("x-skein-error").is_none(), "{:?}", a.headers);
    m.callee_log.wait_for("\"path\":\"/admin/..;/reviews/1?x=1\"").await;
}

#[tokio::test]
async fn plaintext_callers_are_unauthenticated_in_permissive_mode_and_refused_in_strict() {
    // Permissive: a plaintext caller is judged without an identity.
    let m =
        mesh("127.0.0.53", false, |port| authz(DefaultPolicy::Allow, vec![client_only(port, Mode::Enforce)]))
            .await;
    let a = m.plaintext().await;
    assert_eq!((a.status, a.body.as_str()), (403, "denied by shop/reviews-callers\n"));
    assert_eq!(m.app.hits(), 0);
    // `unauthenticated: true` lets it in; namespace and service-account wildcards never do.
    let port = m.app.addr().port();
    let mut cfg = m.callee.store.current().unwrap().config.clone();
    cfg.version = "c2".into();
    cfg.authz.policies[0].rules.push(AuthzRule {
        from: Some(Source { namespaces: vec!["*".into()], ..Default::default() }),
        to: None,
    });
    m.callee.store.apply(cfg.clone(), skein_proxy::Source::File).unwrap();
    assert_eq!(m.plaintext().await.status, 403, "namespaces: [*] matches authenticated callers only");
    cfg.version = "c3".into();
    cfg.authz.policies[0].rules.push(AuthzRule {
        from: Some(Source { unauthenticated: true, ..Default::default() }),
        to: Some(Destination { ports: vec![port], ..Default::default() }),
    });
    m.callee.store.apply(cfg, skein_proxy::Source::File).unwrap();
    let a = m.plaintext().await;
    assert_eq!((a.status, a.body.as_str()), (200, "app:0"));

    // Strict: plaintext never gets as far as a decision.
    let strict = mesh("127.0.0.54", true, |_| authz(DefaultPolicy::Allow, vec![])).await;
    let mut tcp = tokio::net::TcpStream::connect(strict.callee.inbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(buf.is_empty(), "closed without an answer: {}", String::from_utf8_lossy(&buf));
    assert_eq!(strict.app.hits(), 0);
}

#[tokio::test]
async fn a_namespace_default_of_deny_denies_until_an_allow_policy_allows() {
    let m = mesh("127.0.0.55", true, |_| authz(DefaultPolicy::Deny, vec![])).await;
    let client = m.caller(Some(CLIENT)).await;
    let a = client.get("reviews.shop:9080", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (403, "denied by the namespace default (deny)\n"));
    assert_eq!(m.decisions("deny", "default (deny)", "enforce"), 1);

    let port = m.app.addr().port();
    let mut cfg = m.callee.store.current().unwrap().config.clone();
    cfg.version = "c2".into();
    cfg.authz.policies = vec![client_only(port, Mode::Enforce)];
    m.callee.store.apply(cfg, skein_proxy::Source::File).unwrap();
    assert_eq!(client.get("reviews.shop:9080", &[]).await.status, 200);
    let rogue = m.caller(Some(ROGUE)).await;
    assert_eq!(rogue.get("reviews.shop:9080", &[]).await.body, "denied by shop/reviews-callers\n");
    assert_eq!(m.app.hits(), 1);
}

#[tokio::test]
async fn same_namespace_and_authenticated_defaults_tell_callers_apart() {
    let m = mesh("127.0.0.56", false, |_| authz(DefaultPolicy::SameNamespace, vec![])).await;
    assert_eq!(m.caller(Some(ROGUE)).await.get("reviews.shop:9080", &[]).await.status, 200);
    let outsider = m.caller(Some(OUTSIDER)).await;
    let a = outsider.get("reviews.shop:9080", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (403, "denied by the namespace default (same-namespace)\n"));

    let mut cfg = m.callee.store.current().unwrap().config.clone();
    cfg.version = "c2".into();
    cfg.authz.default = DefaultPolicy::Authenticated;
    m.callee.store.apply(cfg, skein_proxy::Source::File).unwrap();
    assert_eq!(outsider.get("reviews.shop:9080", &[]).await.status, 200);
    assert_eq!(m.plaintext().await.status, 403, "a plaintext caller is not authenticated");
}

#[tokio::test]
async fn dry_run_records_what_it_would_deny_and_never_denies() {
    let m =
        mesh("127.0.0.57", true, |port| authz(DefaultPolicy::Allow, vec![client_only(port, Mode::DryRun)]))
            .await;
    let rogue = m.caller(Some(ROGUE)).await;
    for _ in 0..2 {
        let a = rogue.get("reviews.shop:9080", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "app:0"));
    }
    assert_eq!(m.decisions("deny", "shop/reviews-callers", "dry-run"), 2);
    assert_eq!(m.decisions("allow", "default (allow)", "enforce"), 2);
    m.callee_log.wait_for("\"authz\":\"allow default (allow); dry-run deny shop/reviews-callers\"").await;
    assert_eq!(m.caller(Some(CLIENT)).await.get("reviews.shop:9080", &[]).await.status, 200);
    assert_eq!(m.decisions("allow", "shop/reviews-callers", "dry-run"), 1);
}

#[tokio::test]
async fn inbound_tunnels_that_would_bypass_the_rules_are_refused() {
    let m = mesh("127.0.0.58", false, |port| {
        let mut get_only = client_only(port, Mode::Enforce);
        get_only.rules[0].from = Some(Source { unauthenticated: true, ..Default::default() });
        get_only.rules[0].to = Some(Destination { methods: vec!["GET".into()], ..Default::default() });
        authz(DefaultPolicy::Allow, vec![get_only])
    })
    .await;
    let port = m.app.addr().port().to_string();
    let host = format!("reviews:{port}");
    let hdr = [("x-skein-inbound-port", port.as_str()), ("upgrade", "h2c"), ("connection", "upgrade")];
    let a = m.callee.send_to(m.callee.inbound, "GET", &host, "/", &hdr, b"").await;
    assert_eq!(a.status, 405, "{}", a.body);
    let mut tcp = tokio::net::TcpStream::connect(m.callee.inbound).await.unwrap();
    tcp.write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(m.app.hits(), 0);
}
