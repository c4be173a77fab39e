//! Outside judges of the config stream's HTTP/2 server, against the operator's plaintext
//! stream port (`--local`, `--insecure-plaintext-stream`):
//! - h2spec (github.com/summerwind/h2spec), the conformance suite for RFC 7540/9113 and RFC 7541
//!   servers: every case, none skipped;
//! - nghttp2's `nghttp` and `h2load`, an independent client and load generator;
//! - python `h2` (with `hyperframe` and `hpack` for raw frames): a proxy's normal use, and the
//!   attacks the server must end with GOAWAY (`h2_clients.py`).
//!
//! `.ci/run` installs them (go install, apt, pip) and sets `SKEIN_REQUIRE_HTTP2_JUDGES`;
//! elsewhere a test whose tool is missing skips, and says so.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The identity the test's pod runs as (`reviews`, in the local manifests' namespace).
const IDENTITY: &str = "default/reviews";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether `tool` runs here; when it does not, the test skips (and fails in CI).
fn have(tool: &str, version_arg: &str, test: &str) -> bool {
    if Command::new(tool).arg(version_arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("SKEIN_REQUIRE_HTTP2_JUDGES").is_none(),
        "{tool} is not on PATH (.ci/run installs it)"
    );
    eprintln!("skipping {test}: {tool} is not on PATH");
    false
}

/// An operator serving the canary and one meshed pod from files, its stream in plaintext.
struct Operator {
    _process: Killed,
    dir: PathBuf,
    stream: u16,
}

impl Operator {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "skein-judges-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let examples =
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../examples/canary");
        for f in ["trafficroute.yaml", "policies.yaml", "service.yaml"] {
            std::fs::copy(examples.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(
            dir.join("pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v1, labels: {app: reviews, version: v1}}\nspec: {serviceAccountName: reviews, containers: [{name: skein-proxy}]}\n",
        )
        .unwrap();
        let (stream, metrics, webhook) = (free_port(), free_port(), free_port());
        let log = dir.join("operator.log");
        let process = Killed(
            Command::new(env!("CARGO_BIN_EXE_skein-operator"))
                .arg("--local")
                .arg(&dir)
                .args(["--insecure-plaintext-stream", "--stream-addr", &format!("127.0.0.1:{stream}")])
                .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
                .args(["--webhook-addr", &format!("127.0.0.1:{webhook}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        // Ready (its CA made, the manifests read) before a judge starts: h2spec's 5 s per case
        // must measure the server, not its start-up.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(metrics) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(Instant::now() < deadline, "the operator did not become ready:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { _process: process, dir, stream }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.stream)
    }

    /// Runs `command` with its output in a file, killed past `limit`.
    fn run(&self, name: &str, command: &mut Command, limit: Duration) -> Output {
        let out_path = self.dir.join(format!("{name}.out"));
        let mut child = Killed(
            command.stdout(std::fs::File::create(&out_path).unwrap()).stderr(Stdio::piped()).spawn().unwrap(),
        );
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{name} ran past {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = Vec::new();
        if let Some(mut e) = child.0.stderr.take() {
            let _ = std::io::Read::read_to_end(&mut e, &mut stderr);
        }
        Output { status, stdout: std::fs::read(&out_path).unwrap(), stderr }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether the operator's `/readyz` answers 200.
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

/// `N tests, N passed, N skipped, N failed`, as numbers.
fn summary(out: &str) -> Option<[u32; 4]> {
    let line = out.lines().rev().find(|l| l.contains(" tests, ") && l.contains(" failed"))?;
    let numbers: Vec<u32> =
        line.split(", ").filter_map(|part| part.split(' ').next()?.trim().parse().ok()).collect();
    numbers.try_into().ok()
}

#[test]
fn h2spec_passes_every_case_against_the_config_stream() {
    if !have("h2spec", "--version", "h2spec_passes_every_case_against_the_config_stream") {
        return;
    }
    let operator = Operator::start();
    // Every case passes in well under a second; one that waits out h2spec's 5 s timeout is a
    // failure, and the whole run is not waited for past 5 minutes.
    let out = operator.run(
        "h2spec",
        Command::new("h2spec").args([
            "-h",
            "127.0.0.1",
            "-p",
            &operator.stream.to_string(),
            "--timeout",
            "5",
        ]),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let [tests, passed, skipped, failed] =
        summary(&text).unwrap_or_else(|| panic!("no h2spec summary line in:\n{text}"));
    eprintln!("h2spec against the config stream: {tests} tests, {passed} passed, {skipped} skipped, {failed} failed");
    assert!(tests >= 145, "h2spec ran its whole suite: {text}");
    assert!(failed == 0 && skipped == 0 && passed == tests, "h2spec:\n{text}");
}

#[test]
fn nghttp_and_h2load_are_answered() {
    let test = "nghttp_and_h2load_are_answered";
    if !have("nghttp", "--version", test) || !have("h2load", "--version", test) {
        return;
    }
    let operator = Operator::start();
    let out = operator.run(
        "nghttp",
        Command::new("nghttp").args(["-nv", &operator.url("/elsewhere")]),
        Duration::from_secs(30),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains(":status: 404"), "nghttp:\n{text}");
    // 100 requests on 4 connections (25 each: a connection may open 32 in its life).
    let out = operator.run(
        "h2load",
        Command::new("h2load").args(["-n", "100", "-c", "4", &operator.url("/elsewhere")]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("100 done"), "h2load: every request done:\n{text}");
    assert!(text.contains("0 2xx, 0 3xx, 100 4xx, 0 5xx"), "h2load: each answered 404:\n{text}");
    assert!(text.contains("0 errored, 0 timeout"), "h2load:\n{text}");
}

#[test]
fn python_h2_is_served_and_its_attacks_are_refused() {
    let test = "python_h2_is_served_and_its_attacks_are_refused";
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2_clients.py");
    let has_h2 = Command::new("python3")
        .args(["-c", "import h2, hyperframe, hpack"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_h2 {
        assert!(std::env::var_os("SKEIN_REQUIRE_HTTP2_JUDGES").is_none(), "python h2 is not installed");
        eprintln!("skipping {test}: python h2 is not installed (pip install h2)");
        return;
    }
    let operator = Operator::start();
    let out = operator.run(
        "python-h2",
        Command::new("python3").arg(&script).args(["127.0.0.1", &operator.stream.to_string(), IDENTITY]),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    assert!(out.status.success(), "python-h2:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("7 passed, 0 failed"), "{text}");
}
