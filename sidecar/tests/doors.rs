//! The proxy's doors, tried from another pod. Two network namespaces joined by a veth pair
//! stand in for two pods, with IPv4 and IPv6 pod IPs. In the first, `skein-proxy init` installs
//! transparent capture and the real `skein-proxy` binary runs with its default listeners, a
//! workload certificate and strict inbound mTLS, in front of an app on port 8080. From the
//! second, a plaintext attacker calls the first pod's IPs on every proxy port and on the app
//! port. Needs root, `ip`, `iptables-restore` and `ip6tables-restore`; without them the test
//! says so and skips.
//!
//! Expected, for IPv4 and IPv6 alike (the table in `docs/security.md`):
//! - 15001 (outbound) and 15000 (admin) refuse the connection: they listen on loopback only;
//! - 15020 answers `/metrics`, `/ready`, `/live`, and 404 to `/config_dump`, `/certs` and
//!   `POST /shutdown`, which leaves the proxy running;
//! - 15006 and the captured app port close a plaintext connection without an answer, and the
//!   app never sees a request;
//! - inside the pod, the admin port still answers `/config_dump`.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POD_V4: &str = "10.200.0.1";
const PEER_V4: &str = "10.200.0.2";
const POD_V6: &str = "fd00:5e::1";
const PEER_V6: &str = "fd00:5e::2";
const APP_PORT: u16 = 8080;

struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Option<Self> {
        let name = format!("skein-{tag}-{:06x}", fastrand::u32(..0xffffff));
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        ok.then_some(Self(name))
    }

    fn exec(&self, args: &[&str]) {
        let out = Command::new("ip").args(["netns", "exec", &self.0]).args(args).output().expect("ip runs");
        assert!(out.status.success(), "in {}: {args:?}: {}", self.0, String::from_utf8_lossy(&out.stderr));
    }

    /// Runs `f` on a thread inside this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(format!("/var/run/netns/{}", self.0)).expect("netns file");
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread")
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

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request; `Err` with the error kind when the connection fails, `Ok(None)` when
/// the server closed it without an answer, else the status and body.
fn http(to: SocketAddr, method: &str, path: &str) -> Result<Option<(u16, String)>, ErrorKind> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s
        .write_all(format!("{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes());
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e.kind()),
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    if text.is_empty() {
        return Ok(None);
    }
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok(Some((status, body)))
}

#[test]
fn another_pod_reaches_only_the_inbound_and_read_only_ports() {
    if !have("ip") || !have("iptables-restore") || !have("ip6tables-restore") {
        eprintln!("skipping: needs ip, iptables-restore and ip6tables-restore");
        return;
    }
    let (Some(pod), Some(peer)) = (Netns::create("pod"), Netns::create("peer")) else {
        eprintln!("skipping: cannot create network namespaces (needs root)");
        return;
    };
    // Two pods on one link, each with an IPv4 and an IPv6 address.
    let suffix = &pod.0[pod.0.len() - 6..];
    let (veth_pod, veth_peer) = (format!("skp{suffix}"), format!("skq{suffix}"));
    let ok = Command::new("ip")
        .args(["link", "add", &veth_pod, "type", "veth", "peer", "name", &veth_peer])
        .status()
        .unwrap();
    assert!(ok.success());
    for (ns, dev, v4, v6) in [(&pod, &veth_pod, POD_V4, POD_V6), (&peer, &veth_peer, PEER_V4, PEER_V6)] {
        let moved = Command::new("ip").args(["link", "set", dev, "netns", &ns.0]).status().unwrap();
        assert!(moved.success());
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{v4}/24"), "dev", dev]);
        ns.exec(&["ip", "-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
        ns.exec(&["ip", "link", "set", dev, "up"]);
    }

    // The pod: capture (the proxy runs as root here, so root is its UID), a certificate, a
    // config, the app, and the proxy with its default listeners.
    pod.exec(&[env!("CARGO_BIN_EXE_skein-proxy"), "init", "--proxy-uid", "0", "--ipv6", "on"]);
    let dir = std::env::temp_dir().join(format!("skein-doors-{}-{suffix}", std::process::id()));
    let certs = dir.join("identity");
    std::fs::create_dir_all(&certs).unwrap();
    let root = support::pki::ca("doors");
    let now = time::OffsetDateTime::now_utc();
    let (chain, key) = support::pki::leaf(
        &root,
        "spiffe://cluster.local/ns/shop/sa/reviews",
        now - time::Duration::minutes(5),
        now + time::Duration::hours(1),
    );
    std::fs::write(certs.join("tls.crt"), chain).unwrap();
    std::fs::write(certs.join("tls.key"), key).unwrap();
    std::fs::write(certs.join("ca.crt"), &root.pem).unwrap();
    let config = support::config("doors-1", vec![], vec![]);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();

    let app_hits = Arc::new(AtomicU64::new(0));
    let hits = app_hits.clone();
    pod.run(move || {
        let app = std::net::TcpListener::bind(("0.0.0.0", APP_PORT)).unwrap();
        std::thread::spawn(move || {
            for s in app.incoming() {
                let Ok(mut s) = s else { continue };
                hits.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\napp");
            }
        });
    });
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let proxy = Killed(
        Command::new("ip")
            .args(["netns", "exec", &pod.0, env!("CARGO_BIN_EXE_skein-proxy")])
            .arg("--config")
            .arg(dir.join("config.json"))
            .arg("--cert-dir")
            .arg(&certs)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--access-log", "off"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let proxy_log = || std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();

    // The kubelet's view: /ready on the pod IP's read-only port.
    let ready = peer.run(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let to: SocketAddr = format!("{POD_V4}:15020").parse().unwrap();
        while Instant::now() < deadline {
            if let Ok(Some((200, _))) = http(to, "GET", "/ready") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    assert!(ready, "the proxy never became ready:\n{}", proxy_log());

    for ip in [POD_V4, POD_V6] {
        let at = move |port: u16| -> SocketAddr {
            match ip.parse::<std::net::IpAddr>().unwrap() {
                std::net::IpAddr::V4(v4) => SocketAddr::from((v4, port)),
                std::net::IpAddr::V6(v6) => SocketAddr::from((v6, port)),
            }
        };
        let results = peer.run(move || {
            let mut r = Vec::new();
            for (port, method, path) in [
                (15001, "GET", "http://reviews.shop:9080/"),
                (15000, "GET", "/config_dump"),
                (15000, "POST", "/shutdown"),
                (15020, "GET", "/metrics"),
                (15020, "GET", "/ready"),
                (15020, "GET", "/live"),
                (15020, "GET", "/config_dump"),
                (15020, "GET", "/certs"),
                (15020, "POST", "/shutdown"),
                (15006, "GET", "/"),
                (APP_PORT, "GET", "/"),
                (15020, "GET", "/live"),
            ] {
                r.push((port, method, path, http(at(port), method, path)));
            }
            r
        });
        for (port, method, path, result) in results {
            let shown = match &result {
                Err(kind) => format!("{kind:?}"),
                Ok(None) => "closed without an answer".to_string(),
                Ok(Some((status, _))) => format!("HTTP {status}"),
            };
            println!("attack | another pod: {method} {path} to [{ip}]:{port} | {shown}");
            let what = format!("{method} [{ip}]:{port}{path}: {result:?}\n{}", proxy_log());
            match (port, path) {
                (15001 | 15000, _) => assert_eq!(result, Err(ErrorKind::ConnectionRefused), "{what}"),
                (15020, "/metrics") => {
                    let (status, body) = result.unwrap().unwrap();
                    assert_eq!(status, 200, "{what}");
                    assert!(body.contains("skein_config_info"), "{what}");
                }
                (15020, "/ready" | "/live") => assert_eq!(result.unwrap().unwrap().0, 200, "{what}"),
                (15020, _) => assert_eq!(result.unwrap().unwrap().0, 404, "{what}"),
                // Plaintext to the strict inbound listener, directly or captured: closed unanswered.
                (_, _) => assert_eq!(result, Ok(None), "{what}"),
            }
        }
    }
    assert_eq!(app_hits.load(Ordering::SeqCst), 0, "the app saw a request from the plaintext peer");

    // Inside the pod, the admin port answers.
    let dump = pod.run(|| http("127.0.0.1:15000".parse().unwrap(), "GET", "/config_dump"));
    let (status, body) = dump.unwrap().unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("doors-1"), "{body}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_plaintext_control_plane_is_refused_unless_asked_for() {
    let out = Command::new(env!("CARGO_BIN_EXE_skein-proxy"))
        .args(["--control-plane", "http://127.0.0.1:1", "--identity", "shop/web"])
        .args(["--outbound-addr", "127.0.0.1:0", "--inbound-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0", "--stats-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-plaintext-stream"), "{stderr}");
    println!("attack | skein-proxy given an http:// control plane | exits: {}", stderr.trim());
}
