//! Entry points for the fuzz targets (`fuzz/`, `make fuzz`) and for their regression tests
//! (`tests/fuzz_regressions.rs`). Each takes arbitrary bytes, must never panic, and asserts
//! what has to hold whatever the input. Not part of the proxy's API.

use std::sync::{Arc, OnceLock};

use skein_api::config::{
    BackendTarget, Destination, Endpoint, HeaderMatch, LoadBalancer, Protocol, Route, RouteRule, ServicePort,
    StringMatch, WeightedBackend,
};
use skein_api::lines::LineBuffer;
use skein_api::{ProxyConfig, WorkloadIdentity};

use crate::config::store::{ConfigStore, Source};
use crate::http1::fuzz as h1;

/// HTTP/1 request heads: parsing in place stays inside the input, and a head the fast path
/// takes has one digits-only length, CRLF lines and at most one Host.
pub fn http1_request_head(data: &[u8]) {
    h1::request_head(data);
}

/// Chunked framing: the scan finds the same end however the bytes are split.
pub fn http1_chunked(data: &[u8]) {
    h1::chunked(data);
}

/// `ProxyConfig` decoding: a config line split into frames of any size comes out whole, and
/// whatever decodes is either put in force or refused with a reason, never a panic.
pub fn proxy_config(data: &[u8]) {
    let frame = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut lines = LineBuffer::new(1 << 20);
    let mut got = Vec::new();
    for part in data.chunks(frame) {
        lines.extend(part);
        while let Ok(Some(line)) = lines.next_line() {
            got.push(line.to_vec());
        }
    }
    let complete = data.iter().rposition(|b| *b == b'\n').map_or(&data[..0], |i| &data[..i]);
    let expected: Vec<Vec<u8>> = if data.contains(&b'\n') {
        complete.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
    } else {
        vec![]
    };
    assert_eq!(got, expected, "lines differ from a plain split");
    let store = ConfigStore::new(None);
    for line in got {
        if let Ok(config) = serde_json::from_slice::<ProxyConfig>(&line) {
            let _ = store.apply(config, Source::File);
        }
    }
}

/// Route matching: the same request, parsed by the fast path (a view into the raw bytes) and
/// as hyper would (`http::request::Parts`), picks the same target.
pub fn route_match(data: &[u8]) {
    static STORE: OnceLock<Arc<ConfigStore>> = OnceLock::new();
    let store = STORE.get_or_init(|| {
        let store = Arc::new(ConfigStore::new(None));
        store.apply(route_config(), Source::File).expect("the fuzz config is valid");
        store
    });
    let active = store.current().expect("applied");
    h1::route_match(data, &active.table);
}

/// A destination with rules on headers, paths and methods, each with one backend (so the
/// target is a function of the request alone).
fn route_config() -> ProxyConfig {
    let subset = |name: &str| WeightedBackend {
        weight: 100,
        target: BackendTarget::Subset {
            name: name.into(),
            labels: [("version".to_string(), name.to_string())].into(),
        },
    };
    let header = |name: &str, value: StringMatch| HeaderMatch { name: name.into(), value };
    let rule = |headers, path, method: Option<&str>, to: &str| RouteRule {
        headers,
        path,
        method: method.map(str::to_string),
        backends: vec![subset(to)],
        ..Default::default()
    };
    let endpoint = |ip: &str, version: &str| Endpoint {
        address: ip.into(),
        ports: [("http".to_string(), 9080)].into(),
        labels: [("version".to_string(), version.to_string())].into(),
        identity: None,
    };
    ProxyConfig {
        version: "fuzz".into(),
        identity: Some(WorkloadIdentity::new("shop", "fuzz")),
        destinations: vec![Destination {
            namespace: "shop".into(),
            name: "reviews".into(),
            hosts: vec!["reviews.shop".into(), "reviews".into()],
            addresses: vec![],
            ports: vec![
                ServicePort { name: Some("http".into()), port: 9080, protocol: Protocol::Http },
                ServicePort { name: Some("web".into()), port: 80, protocol: Protocol::Http },
            ],
            load_balancer: LoadBalancer::P2cEwma,
            endpoints: vec![
                endpoint("10.0.0.1", "v1"),
                endpoint("10.0.0.2", "v2"),
                endpoint("10.0.0.3", "v3"),
            ],
            routes: vec![Route {
                name: "shop/reviews".into(),
                generation: 1,
                port: Some(9080),
                rules: vec![
                    rule(vec![header("x-user-group", StringMatch::Exact("beta".into()))], None, None, "v2"),
                    rule(vec![], Some(StringMatch::Prefix("/api/".into())), Some("GET"), "v1"),
                    rule(
                        vec![header("x-canary", StringMatch::Regex("[a-z]+-[0-9]+".into()))],
                        None,
                        None,
                        "v3",
                    ),
                    rule(vec![header("x-any", StringMatch::Regex(".*".into()))], None, None, "v2"),
                    rule(vec![], Some(StringMatch::Exact("/health".into())), None, "v3"),
                    rule(
                        vec![header("x-empty", StringMatch::Prefix(String::new()))],
                        Some(StringMatch::Regex("/[a-z]*".into())),
                        Some("POST"),
                        "v1",
                    ),
                ],
                retry: None,
                outlier: None,
            }],
            retry: None,
            outlier: None,
        }],
        inbound: vec![],
        authz: Default::default(),
    }
}

/// Inbound authorization of a request's path, under a Deny rule on `/admin` and an Allow rule
/// on `/public`: a normalised path has no empty, `.` or `..` segment, one under `/admin` is always
/// denied (whatever its escapes and dot segments), nothing outside `/public` is ever allowed, and
/// a path that hides a separator in an escape is denied.
pub fn authz_path(data: &[u8]) {
    use skein_api::authz::{
        evaluate, normalize_path, Action, AuthzPolicy, AuthzRule, Caller, Destination as To, Identity,
        InboundAuthz, PathMatch, Request,
    };
    static AUTHZ: OnceLock<InboundAuthz> = OnceLock::new();
    let authz = AUTHZ.get_or_init(|| {
        let on = |path: &str| AuthzRule {
            from: None,
            to: Some(To { paths: vec![PathMatch::Prefix(path.into())], ..Default::default() }),
        };
        InboundAuthz {
            policies: vec![
                AuthzPolicy {
                    name: "shop/admin".into(),
                    action: Action::Deny,
                    rules: vec![on("/admin")],
                    ..Default::default()
                },
                AuthzPolicy {
                    name: "shop/public".into(),
                    action: Action::Allow,
                    rules: vec![on("/public")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    });
    let Ok(path) = std::str::from_utf8(data) else { return };
    let caller = Caller {
        identity: Some(Identity {
            spiffe_id: "spiffe://cluster.local/ns/shop/sa/a",
            namespace: "shop",
            service_account: "a",
        }),
    };
    let decision = evaluate(authz, &caller, &Request { port: 80, http: Some(("GET", path)) });
    let under = |p: &str, prefix: &str| p == prefix || p.starts_with(&format!("{prefix}/"));
    match normalize_path(path) {
        Ok(normal) => {
            // Absolute, and no empty, `.` or `..` segment is left (decoding is done once, as
            // an app does: `%%361` becomes `%61`, which is not decoded again).
            assert!(normal.starts_with('/'), "{path:?} → {normal:?}");
            let inner = normal.strip_suffix('/').unwrap_or(&normal);
            assert!(
                inner.is_empty() || inner[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."),
                "{path:?} → {normal:?}"
            );
            if under(&normal, "/admin") {
                assert!(!decision.allowed, "{path:?} ({normal}) is under /admin");
            }
            if decision.allowed {
                assert!(under(&normal, "/public"), "{path:?} ({normal}) was allowed outside /public");
            }
        }
        Err(_) => assert!(!decision.allowed, "{path:?} hides a separator"),
    }
}

/// The multiplexed hop's server: whatever a peer sends after the preface, it never panics,
/// ends (the input's end closes the connection), and every frame it writes is well formed:
/// within the default frame size, on a stream the peer opened (or 0 for the connection).
pub fn mux_frames(data: &[u8]) {
    use std::cell::RefCell;
    thread_local! {
        static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
    }
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
        });
        rt.block_on(crate::wire::mux::fuzz::serve_bytes(data));
    });
}
