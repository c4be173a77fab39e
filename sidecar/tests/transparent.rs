//! Transparent capture: iptables, in a network namespace the test creates, redirects a client's
//! connections for a Service address to the outbound listener. The proxy reads the original
//! destination (`SO_ORIGINAL_DST`), routes HTTP by it, and splices a port marked opaque as plain
//! TCP; an opaque inbound connection is authorized by port (AccessPolicy) and a denied one is
//! closed without a byte; `skein-proxy init` installs the same capture for IPv4 and IPv6, and a
//! re-run changes nothing. Needs root, `ip` and `iptables`; without them the test says so and skips.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use skein_api::config::{Endpoint, Protocol, ServicePort};
use skein_proxy::AccessLog;
use skein_proxy::{ConfigStore, Source};
use skein_proxy::{Direction, ProxyContext};

struct Netns(String);

impl Netns {
    fn create() -> Option<Self> {
        let name = format!("skein-tp-{:08x}", fastrand::u32(..));
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        ok.then_some(Self(name))
    }

    fn exec(&self, args: &[&str]) {
        let status =
            Command::new("ip").args(["netns", "exec", &self.0]).args(args).status().expect("ip runs");
        assert!(status.success(), "ip netns exec {} {args:?} failed", self.0);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn redirected_connections_are_routed_by_original_destination_and_opaque_ports_spliced() {
    if !have("ip") || !have("iptables") {
        eprintln!("skipping: transparent capture needs `ip` and `iptables`");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipping: cannot create a network namespace (needs root)");
        return;
    };
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    // Everything for the Service address 127.0.0.2 goes to the outbound listener.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.2",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
    let netns_file = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).expect("netns file");

    let result = std::thread::spawn(move || {
        // This thread, and every socket its runtime opens, lives in the namespace.
        nix::sched::setns(&netns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let web = support::upstream("web").await;
            let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let echo_port = echo.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = echo.accept().await {
                    tokio::spawn(async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            });

            let mut cfg = support::config("t1", vec![], vec![]);
            let d = &mut cfg.destinations[0];
            d.addresses = vec!["127.0.0.2".into()];
            d.ports = vec![
                ServicePort { name: Some("http".into()), port: 9080, protocol: Protocol::Http },
                ServicePort { name: Some("tcp-echo".into()), port: 9090, protocol: Protocol::Tcp },
            ];
            d.endpoints = vec![Endpoint {
                address: "127.0.0.1".into(),
                ports: [("http".to_string(), web.addr().port()), ("tcp-echo".to_string(), echo_port)].into(),
                labels: Default::default(),
                identity: None,
            }];
            let store = Arc::new(ConfigStore::new(None));
            store.apply(cfg, Source::File).unwrap();
            let ctx = Arc::new(ProxyContext::new(
                store,
                AccessLog::off(),
                "127.0.0.1".parse().unwrap(),
                Duration::from_millis(500),
            ));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:15001").await.unwrap();
            tokio::spawn(skein_proxy::serve_listener(listener, ctx, Direction::Outbound, Default::default()));

            tokio::task::spawn_blocking(|| {
                // HTTP to the Service address: routed by the original destination.
                let mut s = std::net::TcpStream::connect("127.0.0.2:9080").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"GET /x HTTP/1.1\r\nHost: 127.0.0.2:9080\r\nConnection: close\r\n\r\n").unwrap();
                let mut http = String::new();
                s.read_to_string(&mut http).unwrap();

                // Not HTTP, on the opaque port: spliced through to the echo server.
                let mut s = std::net::TcpStream::connect("127.0.0.2:9090").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"\x16\x03\x01 hello").unwrap();
                let mut echoed = [0u8; 9];
                s.read_exact(&mut echoed).unwrap();
                (http, echoed)
            })
            .await
            .unwrap()
        })
    })
    .join()
    .expect("namespace thread");

    assert!(result.0.starts_with("HTTP/1.1 200"), "{}", result.0);
    assert!(result.0.ends_with("web:0"), "{}", result.0);
    assert_eq!(&result.1, b"\x16\x03\x01 hello");
}

#[test]
fn opaque_inbound_connections_are_authorized_and_denied_ones_closed() {
    use skein_api::authz::{Action, AuthzPolicy, AuthzRule, Destination, InboundAuthz, Source as From};
    if !have("ip") || !have("iptables") {
        eprintln!("skipping: transparent capture needs `ip` and `iptables`");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipping: cannot create a network namespace (needs root)");
        return;
    };
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    // Everything for the pod address 127.0.0.3 goes to the inbound listener, as a peer's would.
    ns.exec(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.3",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15006",
    ]);
    let netns_file = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).expect("netns file");
    let (allowed, denied, counted) = std::thread::spawn(move || {
        nix::sched::setns(&netns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut ports = Vec::new();
            for _ in 0..2 {
                let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ports.push(echo.local_addr().unwrap().port());
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = echo.accept().await {
                        tokio::spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                });
            }
            let (open, closed) = (ports[0], ports[1]);
            // One Allow policy on both ports; its only rule lets plaintext callers reach the
            // first. The second is covered by the policy and allowed by no rule.
            let mut cfg = support::config("t1", vec![], vec![]);
            cfg.authz = InboundAuthz {
                policies: vec![AuthzPolicy {
                    name: "shop/echo".into(),
                    action: Action::Allow,
                    ports: vec![open, closed],
                    rules: vec![AuthzRule {
                        from: Some(From { unauthenticated: true, ..Default::default() }),
                        to: Some(Destination { ports: vec![open], ..Default::default() }),
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            let store = Arc::new(ConfigStore::new(None));
            store.apply(cfg, Source::File).unwrap();
            let ctx = Arc::new(ProxyContext::new(
                store.clone(),
                AccessLog::off(),
                "127.0.0.1".parse().unwrap(),
                Duration::from_millis(500),
            ));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:15006").await.unwrap();
            tokio::spawn(skein_proxy::serve_listener(listener, ctx, Direction::Inbound, Default::default()));
            let (allowed, denied) = tokio::task::spawn_blocking(move || {
                let talk = |port: u16| {
                    let mut s = std::net::TcpStream::connect(("127.0.0.3", port)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    s.write_all(b"\x16\x03\x01 hello").unwrap();
                    // Up to the echo's length (the echo server never closes), or to the close.
                    let mut got = vec![0u8; 9];
                    let mut n = 0;
                    while n < got.len() {
                        match s.read(&mut got[n..]) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                    }
                    got.truncate(n);
                    got
                };
                (talk(open), talk(closed))
            })
            .await
            .unwrap();
            let mut metrics = String::new();
            store.shared.metrics.render(&mut metrics);
            (allowed, denied, metrics)
        })
    })
    .join()
    .expect("namespace thread");
    assert_eq!(allowed, b"\x16\x03\x01 hello", "the allowed port echoes");
    assert!(denied.is_empty(), "the denied connection is closed without a byte: {denied:?}");
    assert!(
        counted.contains(
            "skein_authz_decisions_total{decision=\"allow\",policy=\"shop/echo\",mode=\"enforce\"} 1"
        ),
        "{counted}"
    );
    assert!(
        counted.contains(
            "skein_authz_decisions_total{decision=\"deny\",policy=\"shop/echo\",mode=\"enforce\"} 1"
        ),
        "{counted}"
    );
}

#[test]
fn skein_proxy_init_installs_rules_that_capture_the_apps_but_not_the_proxy() {
    if !have("ip") || !have("iptables") || !have("setpriv") || !have("curl") {
        eprintln!("skipping: needs ip, iptables, setpriv and curl");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipping: cannot create a network namespace (needs root)");
        return;
    };
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    // The proxy runs as root in this test, so root is "the proxy's UID"; the app is `nobody`.
    ns.exec(&[env!("CARGO_BIN_EXE_skein-proxy"), "init", "--proxy-uid", "0", "--exclude-ports", "5432"]);
    let rules =
        Command::new("ip").args(["netns", "exec", &ns.0, "iptables", "-t", "nat", "-S"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
    assert!(rules.contains("-A SKEIN_OUTPUT -m owner --uid-owner 0 -j RETURN"), "{rules}");
    assert!(rules.contains("-A SKEIN_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN"), "{rules}");

    // The app (uid 65534) calls the Service address; iptables sends it to the proxy.
    let body = app_calls_through_capture(
        &ns,
        "web",
        "0.0.0.0:15001",
        "127.0.0.2",
        "http://127.0.0.2:9080/via-capture",
    );
    assert_eq!(body.0, "web:0", "the captured request reached the Service's endpoint");
    assert_eq!(body.1, 1);
}

/// In `ns`: an upstream named `name`, a proxy on `listen` whose destination `reviews.shop` has
/// the Service address `service`, and an app (uid 65534) fetching `url` with curl, captured by
/// the rules already installed. Returns what curl printed and the upstream's hit count.
fn app_calls_through_capture(
    ns: &Netns,
    name: &'static str,
    listen: &'static str,
    service: &'static str,
    url: &'static str,
) -> (String, u64) {
    let netns_file = std::fs::File::open(format!("/var/run/netns/{}", ns.0)).expect("netns file");
    let ns_name = ns.0.clone();
    std::thread::spawn(move || {
        nix::sched::setns(&netns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let web = support::upstream(name).await;
            let mut cfg = support::config("t1", vec![support::endpoint(&web, "v1")], vec![]);
            cfg.destinations[0].addresses = vec![service.into()];
            let store = Arc::new(ConfigStore::new(None));
            store.apply(cfg, Source::File).unwrap();
            let ctx = Arc::new(ProxyContext::new(
                store,
                AccessLog::off(),
                "127.0.0.1".parse().unwrap(),
                Duration::from_millis(500),
            ));
            let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
            tokio::spawn(skein_proxy::serve_listener(listener, ctx, Direction::Outbound, Default::default()));
            let out = tokio::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns_name,
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                ])
                .args(["curl", "-s", "-m", "5", url])
                .output()
                .await
                .unwrap();
            (String::from_utf8_lossy(&out.stdout).into_owned(), web.hits())
        })
    })
    .join()
    .expect("namespace thread")
}

/// Lines of `iptables-save -t nat` (or ip6tables-save) that are rules or chains.
fn nat_rules(ns: &Netns, save: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "exec", &ns.0, save, "-t", "nat"]).output().unwrap();
    assert!(out.status.success(), "{save}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A") || l.starts_with(':'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string()) // drop the packet counters
        .collect()
}

#[test]
fn init_is_idempotent_and_captures_ipv6_too() {
    if !have("ip")
        || !have("iptables-restore")
        || !have("ip6tables-restore")
        || !have("setpriv")
        || !have("curl")
    {
        eprintln!("skipping: needs ip, iptables-restore, ip6tables-restore, setpriv and curl");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipping: cannot create a network namespace (needs root)");
        return;
    };
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    // An IPv6 network for the Service address to be routable.
    ns.exec(&["ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1"]);
    ns.exec(&["ip", "-6", "addr", "add", "fd00:5f::1/64", "dev", "svc0", "nodad"]);
    ns.exec(&["ip", "link", "set", "svc0", "up"]);
    ns.exec(&["ip", "link", "set", "svc1", "up"]);
    let init = [
        env!("CARGO_BIN_EXE_skein-proxy"),
        "init",
        "--proxy-uid",
        "0",
        "--exclude-ports",
        "5432",
        "--ipv6",
        "on",
    ];
    ns.exec(&init);
    let (v4, v6) = (nat_rules(&ns, "iptables-save"), nat_rules(&ns, "ip6tables-save"));
    // Run again, as a restarted init container would: the same rules, not twice as many.
    ns.exec(&init);
    assert_eq!(nat_rules(&ns, "iptables-save"), v4, "a re-run changed the IPv4 rules");
    assert_eq!(nat_rules(&ns, "ip6tables-save"), v6, "a re-run changed the IPv6 rules");
    for (family, rules) in [("IPv4", &v4), ("IPv6", &v6)] {
        let jumps = rules.iter().filter(|r| *r == "-A PREROUTING -p tcp -j SKEIN_INBOUND").count();
        assert_eq!(jumps, 1, "{family}: {rules:?}");
        assert!(
            rules.iter().any(|r| r == "-A SKEIN_OUTPUT -p tcp -j REDIRECT --to-ports 15001"),
            "{family}: {rules:?}"
        );
    }
    assert!(v6.iter().any(|r| r == "-A SKEIN_OUTPUT -d ::1/128 -j RETURN"), "{v6:?}");

    // An app (uid 65534) calls an IPv6 Service address: captured to the proxy on [::1]:15001,
    // which reads the IPv6 original destination and routes by it.
    let body = app_calls_through_capture(
        &ns,
        "web6",
        "[::1]:15001",
        "fd00:5f::99",
        "http://[fd00:5f::99]:9080/via-ipv6-capture",
    );
    assert_eq!(body.0, "web6:0", "the captured IPv6 request reached the Service's endpoint");
    assert_eq!(body.1, 1);
}
