//! The app's kubelet probes, sent to the app on loopback for the kubelet.
//!
//! The webhook rewrites an app container's HTTP and TCP probes to `GET /app-health/<container>/
//! <kind>` on the read-only port (15020) and hands the originals over in `SKEIN_APP_PROBES`
//! ([`skein_api::probes`]), so the kubelet's probes work while inbound mTLS is strict: they never
//! reach the app's port from outside. Only the probes the pod spec declares are run, with their
//! own paths and ports; any other `/app-health/` path is 404, so the listener cannot be used to
//! reach anything else in the pod.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use skein_api::probes::{AppProbe, AppProbes, ProbeAction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The outcome of one probe, as the sidecar answers the kubelet.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered 200–399 (or the TCP connection opened).
    Healthy(String),
    /// Anything else, with why.
    Unhealthy(String),
}

/// The rewritten probes of this pod's app containers.
#[derive(Debug, Default)]
pub struct AppProber {
    probes: AppProbes,
    target: Option<IpAddr>,
}

/// Reads `SKEIN_APP_PROBES` (a clap value parser: a bad value stops the proxy at start-up).
pub fn parse_probes(text: &str) -> Result<AppProbes, String> {
    let probes: AppProbes =
        serde_json::from_str(text).map_err(|e| format!("not a map of app probes (JSON): {e}"))?;
    for (path, probe) in &probes {
        if !path.starts_with(skein_api::probes::APP_HEALTH_PREFIX) {
            return Err(format!("probe path {path:?} does not start with /app-health/"));
        }
        if let Some(why) = probe.action.unsendable() {
            return Err(format!("probe {path}: {why}"));
        }
    }
    Ok(probes)
}

impl AppProber {
    /// Probes sent to `target` (the app's address inside the pod, loopback by default).
    pub fn new(probes: AppProbes, target: IpAddr) -> Self {
        Self { probes, target: Some(target) }
    }

    /// Runs the probe at `path`; `None` when the pod declares no such probe.
    pub async fn check(&self, path: &str) -> Option<Outcome> {
        let probe = self.probes.get(path)?;
        let target = self.target?;
        Some(run(probe, target).await)
    }
}

async fn run(probe: &AppProbe, target: IpAddr) -> Outcome {
    let limit = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    match tokio::time::timeout(limit, send(&probe.action, target)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Unhealthy(format!("no answer within {}s", limit.as_secs())),
    }
}

async fn send(action: &ProbeAction, target: IpAddr) -> Outcome {
    let port = match action {
        ProbeAction::HttpGet { port, .. } | ProbeAction::TcpSocket { port } => *port,
    };
    let addr = SocketAddr::new(target, port);
    let mut stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Unhealthy(format!("connecting to {addr}: {e}")),
    };
    let ProbeAction::HttpGet { path, headers, .. } = action else {
        return Outcome::Healthy(format!("{addr} accepts connections"));
    };
    // What the kubelet sends: its User-Agent, Accept, and the probe's own headers, whose Host
    // replaces the default.
    let mut head = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head += &format!("Host: {addr}\r\n");
    }
    head += "User-Agent: kube-probe/skein\r\nAccept: */*\r\nConnection: close\r\n";
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    if let Err(e) = stream.write_all(head.as_bytes()).await {
        return Outcome::Unhealthy(format!("sending the probe to {addr}: {e}"));
    }
    // Only the status line matters; read until it is whole (it is short, or not HTTP).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Outcome::Unhealthy(format!("reading the answer from {addr}: {e}")),
        }
    }
    match status_code(&buf) {
        Some(code) if (200..400).contains(&code) => Outcome::Healthy(format!("the app answered {code}")),
        Some(code) => Outcome::Unhealthy(format!("the app answered {code}")),
        None => Outcome::Unhealthy("the app's answer is not HTTP".into()),
    }
}

/// The status code of an HTTP/1.x status line at the start of `buf`.
fn status_code(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn http(port: u16, path: &str) -> AppProbe {
        AppProbe {
            action: ProbeAction::HttpGet {
                port,
                path: path.into(),
                headers: vec![("x-probe".into(), "yes".into())],
            },
            timeout_seconds: 1,
        }
    }

    /// An app answering every request with `status`, recording the request heads.
    async fn app(status: u16) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_and_fail_otherwise() {
        for (status, healthy) in [(200, true), (302, true), (404, false), (503, false)] {
            let (port, mut heads) = app(status).await;
            let prober = AppProber::new(
                [("/app-health/app/readiness".to_string(), http(port, "/healthz?full=1"))].into(),
                "127.0.0.1".parse().unwrap(),
            );
            let outcome = prober.check("/app-health/app/readiness").await.unwrap();
            assert_eq!(matches!(outcome, Outcome::Healthy(_)), healthy, "{status}: {outcome:?}");
            let head = heads.recv().await.unwrap();
            assert!(head.starts_with("GET /healthz?full=1 HTTP/1.1\r\n"), "{head}");
            assert!(head.contains("x-probe: yes\r\n") && head.contains("User-Agent: kube-probe"), "{head}");
        }
    }

    #[tokio::test]
    async fn tcp_probes_and_unknown_paths() {
        let (port, _heads) = app(200).await;
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let tcp = |port| AppProbe { action: ProbeAction::TcpSocket { port }, timeout_seconds: 1 };
        let prober = AppProber::new(
            [
                ("/app-health/a/liveness".to_string(), tcp(port)),
                ("/app-health/a/startup".to_string(), tcp(closed)),
            ]
            .into(),
            "127.0.0.1".parse().unwrap(),
        );
        assert!(matches!(prober.check("/app-health/a/liveness").await, Some(Outcome::Healthy(_))));
        assert!(matches!(prober.check("/app-health/a/startup").await, Some(Outcome::Unhealthy(_))));
        assert_eq!(prober.check("/app-health/a/other").await, None, "only declared probes run");
    }

    #[tokio::test]
    async fn a_silent_app_fails_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let prober = AppProber::new(
            [("/app-health/a/readiness".to_string(), http(port, "/"))].into(),
            "127.0.0.1".parse().unwrap(),
        );
        let started = std::time::Instant::now();
        let outcome = prober.check("/app-health/a/readiness").await.unwrap();
        assert!(matches!(outcome, Outcome::Unhealthy(ref why) if why.contains("within 1s")), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn bad_probe_lists_are_refused_with_the_probe_named() {
        assert!(parse_probes("{}").unwrap().is_empty());
        for (text, says) in [
            ("[1]", "JSON"),
            (r#"{"/elsewhere":{"action":{"tcpSocket":{"port":1}}}}"#, "/elsewhere"),
            (r#"{"/app-health/a/r":{"action":{"httpGet":{"port":1,"path":"/a b"}}}}"#, "/app-health/a/r"),
            (
                r#"{"/app-health/a/r":{"action":{"httpGet":{"port":1,"path":"/","headers":[["x","a\r\nb: c"]]}}}}"#,
                "header",
            ),
        ] {
            let err = parse_probes(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 500\r\n"), Some(500));
        assert_eq!(status_code(b"SSH-2.0-x\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2x0 OK\r\n"), None);
    }
}
