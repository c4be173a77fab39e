//! Helpers for the end-to-end tests: a real API server from `KUBECONFIG` (any cluster: the
//! test API server in CI, kind or a real cluster elsewhere), the real `kubectl`, and the real
//! `skein-operator` and `skein-proxy` binaries started as processes.
//!
//! Every test creates its own namespace with a random suffix and deletes it at the end. The
//! operator under test watches only that namespace and keeps its Lease there, so tests run in
//! parallel without seeing each other.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod node;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .parent()
        .expect("e2e/ sits in the workspace")
        .to_path_buf()
}

/// True when `KUBECONFIG` names a cluster; otherwise the caller skips (and says so).
pub fn cluster_available(test: &str) -> bool {
    match std::env::var_os("KUBECONFIG") {
        Some(v) if !v.is_empty() => true,
        _ => {
            eprintln!("skipping {test}: KUBECONFIG is not set (e2e tests need a cluster)");
            false
        }
    }
}

/// Runs kubectl with `args`, feeding `stdin` when given.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().expect("kubectl is on PATH");
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes()).expect("write to kubectl");
    }
    child.wait_with_output().expect("kubectl runs")
}

/// Runs kubectl and panics with its stderr when it fails; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Installs the generated CRDs once per test binary and waits until they are served.
pub fn install_crds() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = repo_root().join("crds");
        kubectl_ok(
            &["apply", "--server-side", "--force-conflicts", "-f", dir.to_str().expect("utf-8 path")],
            None,
        );
        kubectl_ok(
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/trafficroutes.skein.dev",
                "crd/outlierpolicies.skein.dev",
                "crd/retrypolicies.skein.dev",
                "crd/accesspolicies.skein.dev",
            ],
            None,
        );
    });
}

/// A namespace of one test; deleted when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn create(prefix: &str) -> Self {
        let name = format!("e2e-{prefix}-{:08x}", fastrand::u32(..));
        kubectl_ok(&["create", "namespace", &name], None);
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"], None);
    }
}

/// The directory cargo put the workspace binaries in (`make test` builds them first).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SKEIN_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent().and_then(Path::parent).expect("test binary sits in target/<profile>/deps").to_path_buf()
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --bins` first (make test does)", path.display());
    path
}

/// A free loopback port (bound, then released for the process under test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a loopback port").local_addr().expect("local addr").port()
}

/// Polls `check` every 100 ms until it returns `Ok` or `timeout` passes; panics with the last
/// reason.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A minimal HTTP/1.1 client for the admin and metrics ports: returns status and body.
pub fn http(method: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status line")?;
    let body_start = text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(text.len());
    let head = &text[..body_start];
    let body = &text[body_start..];
    // The admin servers answer small bodies; decode chunked encoding if used.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A child process killed when dropped.
pub struct Process {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &str, args: &[String]) -> Self {
        let log = std::env::temp_dir().join(format!("skein-e2e-{name}-{:08x}.log", fastrand::u32(..)));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary(name))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child, name: name.into(), log }
    }

    /// Sends SIGTERM and waits for a graceful exit (SIGKILL after 10 s).
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("--- {} log ({}) ---\n{}", self.name, self.log.display(), self.log());
        }
    }
}

/// `skein-operator` watching one namespace (and electing its leader there).
pub struct Operator {
    pub process: Process,
    pub metrics_port: u16,
    pub stream_port: u16,
    pub webhook_port: u16,
    /// The MutatingWebhookConfiguration this operator keeps its CA bundle in (one per test).
    pub webhook_configuration: String,
}

/// How [`Operator::start_with`] starts the operator, beyond [`Operator::start`]'s defaults.
#[derive(Default)]
pub struct OperatorOptions<'a> {
    /// A kubeconfig of its own (a ServiceAccount's token, say) instead of `KUBECONFIG`'s admin.
    pub kubeconfig: Option<&'a Path>,
    /// The webhook configuration it keeps current (default `skein-sidecar-injector-<namespace>`).
    pub webhook_configuration: Option<&'a str>,
    /// Return at once instead of waiting for `/readyz`.
    pub no_wait: bool,
}

impl Operator {
    pub fn start(namespace: &str, instance: &str) -> Self {
        Self::start_with(namespace, instance, OperatorOptions::default())
    }

    pub fn start_with(namespace: &str, instance: &str, options: OperatorOptions) -> Self {
        let (metrics_port, stream_port, webhook_port) = (free_port(), free_port(), free_port());
        let webhook_configuration = options
            .webhook_configuration
            .map(str::to_string)
            .unwrap_or_else(|| format!("skein-sidecar-injector-{namespace}"));
        let mut args = vec![
            "--namespace".into(),
            namespace.into(),
            "--watch-namespace".into(),
            namespace.into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--stream-addr".into(),
            format!("127.0.0.1:{stream_port}"),
            "--instance".into(),
            instance.into(),
            "--webhook-addr".into(),
            format!("127.0.0.1:{webhook_port}"),
            "--webhook-configuration".into(),
            webhook_configuration.clone(),
            // The test proxies have no workload certificates: they name their identity on a
            // plaintext stream, which both sides refuse unless told otherwise.
            "--insecure-plaintext-stream".into(),
            // The pods of these tests never run (the tests play kubelet), so they are injected
            // the unprivileged way; the install test runs transparent capture in real pods.
            "--capture-mode".into(),
            "explicit".into(),
        ];
        if let Some(kubeconfig) = options.kubeconfig {
            args.push("--kubeconfig".into());
            args.push(kubeconfig.display().to_string());
        }
        let process = Process::spawn("skein-operator", &args);
        let operator = Self { process, metrics_port, stream_port, webhook_port, webhook_configuration };
        if options.no_wait {
            return operator;
        }
        eventually("the operator to be ready", Duration::from_secs(30), || {
            match http("GET", metrics_port, "/readyz") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}\n{}", operator.process.log())),
            }
        });
        operator
    }

    pub fn stream_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.stream_port)
    }

    pub fn metrics(&self) -> String {
        http("GET", self.metrics_port, "/metrics").map(|(_, b)| b).unwrap_or_default()
    }
}

/// `skein-proxy` connected to an operator.
pub struct Proxy {
    pub process: Process,
    pub admin_port: u16,
}

impl Proxy {
    /// Starts a proxy; it is not waited for (it may legitimately have no config yet).
    pub fn start(stream_url: &str, identity: &str, proxy_id: &str, state_dir: &Path) -> Self {
        let admin_port = free_port();
        let args = [
            "--control-plane".into(),
            stream_url.into(),
            "--identity".into(),
            identity.into(),
            "--proxy-id".into(),
            proxy_id.into(),
            "--insecure-plaintext-stream".into(),
            "--admin-addr".into(),
            format!("127.0.0.1:{admin_port}"),
            "--stats-addr".into(),
            format!("127.0.0.1:{}", free_port()),
            "--outbound-addr".into(),
            format!("127.0.0.1:{}", free_port()),
            "--inbound-addr".into(),
            format!("127.0.0.1:{}", free_port()),
            "--access-log".into(),
            "off".into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ];
        Self { process: Process::spawn("skein-proxy", &args), admin_port }
    }

    /// The admin `/config_dump` (version, source, config).
    pub fn config_dump(&self) -> Result<Value, String> {
        let (status, body) = http("GET", self.admin_port, "/config_dump")?;
        if status != 200 {
            return Err(format!("config_dump answered {status}"));
        }
        serde_json::from_str(&body).map_err(|e| e.to_string())
    }

    /// Waits until the proxy holds a config and returns its dump.
    pub fn wait_for_config(&self) -> Value {
        eventually("the proxy to hold a config", Duration::from_secs(20), || {
            let dump = self.config_dump()?;
            if dump["version"].is_string() {
                Ok(dump)
            } else {
                Err(format!("no config yet\n{}", self.process.log()))
            }
        })
    }
}

/// A fresh scratch directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("skein-e2e-{tag}-{:08x}", fastrand::u32(..)));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// One status condition of a Skein resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub status: String,
    pub reason: String,
    pub message: String,
    pub observed_generation: i64,
}

/// Reads an object as JSON.
pub fn get_json(namespace: &str, resource: &str) -> Result<Value, String> {
    let out = kubectl(&["-n", namespace, "get", resource, "-o", "json"], None);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The condition `type_` of `resource` (such as `trafficroute/reviews`).
pub fn condition(namespace: &str, resource: &str, type_: &str) -> Result<Condition, String> {
    let obj = get_json(namespace, resource)?;
    let c = obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .ok_or_else(|| format!("{resource} has no {type_} condition yet: {}", obj["status"]))?;
    Ok(Condition {
        status: c["status"].as_str().unwrap_or_default().into(),
        reason: c["reason"].as_str().unwrap_or_default().into(),
        message: c["message"].as_str().unwrap_or_default().into(),
        observed_generation: c["observedGeneration"].as_i64().unwrap_or_default(),
    })
}

/// Waits until a condition has the given status and reason, and returns it.
pub fn wait_condition(namespace: &str, resource: &str, type_: &str, status: &str, reason: &str) -> Condition {
    eventually(&format!("{resource} {type_}={status}/{reason}"), Duration::from_secs(20), || {
        let c = condition(namespace, resource, type_)?;
        if c.status == status && c.reason == reason {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
}

/// The node name of pods a test plays kubelet for: no real node (such as the test API server's,
/// while the install test runs it) takes them.
pub const FAKE_NODE: &str = "e2e-played-node";

/// Plays kubelet and the endpoints controller (the test API server runs neither): creates a
/// running, ready pod with `labels` and service account `sa`, and an EndpointSlice of `service`
/// with its address.
pub fn run_pod(
    namespace: &str,
    pod: &str,
    sa: &str,
    labels: &[(&str, &str)],
    ip: &str,
    service: &str,
    port: u16,
) {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  labels: {{{labels}}}
spec:
  serviceAccountName: {sa}
  nodeName: {FAKE_NODE}
  containers:
    - {{name: app, image: example.invalid/app:1}}
    - {{name: skein-proxy, image: example.invalid/skein-proxy:1}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{pod}
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
  - addresses: ["{ip}"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: {pod}, namespace: {namespace}}}
"#,
        labels = labels.join(", ")
    );
    kubectl_ok(&["-n", namespace, "apply", "-f", "-"], Some(&manifest));
    let status = format!(
        r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
    );
    kubectl_ok(
        &["-n", namespace, "patch", "pod", pod, "--subresource=status", "--type=merge", "-p", &status],
        None,
    );
}

/// Decodes base64 text (a Secret's data) with the system's `base64`.
pub fn decode(b64: &str) -> String {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin is piped").write_all(b64.as_bytes())?;
            c.wait_with_output()
        });
    String::from_utf8(out.expect("base64 runs").stdout).expect("PEM is text")
}

/// What of `keys` (PEM private keys) shows in `outputs` (name, text): a PEM private-key block
/// of any key, or any 32-character run of a key's base64 body. Empty when nothing leaked.
pub fn key_leaks(outputs: &[(String, String)], keys: &[String]) -> Vec<String> {
    let mut fragments = Vec::new();
    for pem in keys {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(body.len() >= 32, "not a PEM key: {pem:?}");
        fragments.extend(body.as_bytes().chunks_exact(32).map(|c| String::from_utf8_lossy(c).into_owned()));
    }
    let mut leaks = Vec::new();
    for (name, text) in outputs {
        if text.contains("PRIVATE KEY") {
            leaks.push(format!("{name}: a PEM private key"));
        }
        if let Some(f) = fragments.iter().find(|f| text.contains(f.as_str())) {
            leaks.push(format!("{name}: a fragment of a private key ({f})"));
        }
    }
    leaks
}
