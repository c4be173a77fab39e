//! Strict HTTP/1.1, proved on real sockets. Every case is a raw byte string written to the
//! outbound listener of two proxies, one with the HTTP/1.1 fast path and one without (every
//! request through hyper), in front of a raw upstream that frames requests itself and records
//! each one it sees.
//!
//! - The differential suite: valid and hostile requests; both proxies must give the client the
//!   same statuses and the upstream the same requests (request line, header fields compared by
//!   lower-cased name with the generated trace headers aside, and body).
//! - The smuggling suite: CL.TE, TE.CL, TE.TE obfuscations, duplicate lengths, bad chunk sizes
//!   and extensions, requests pipelined after an error; and hostile responses. Each gets 400 (or
//!   502 for a response) and a closed connection, and the upstream never sees a hidden request.
//! - Slow and huge clients: a slowloris head is cut off, an over-long head gets 431, a body over
//!   the limit 413, a large body streams through in bounded memory, and the proxy keeps serving
//!   others all the while.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skein_api::config::Endpoint;
use skein_proxy::{AccessLog, ConfigStore, Direction, ProxyContext, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const HOST: &str = "reviews.shop:9080";
const OK_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// One request as the upstream framed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    line: String,
    /// Lower-cased names with their values, sorted; trace headers left out.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// A raw HTTP/1.1 server: strict framing of its own, every request recorded, and a canned
/// response (the same for every request) written back.
struct RawUpstream {
    addr: SocketAddr,
    seen: Mutex<Vec<Seen>>,
    response: Mutex<Vec<u8>>,
    /// Bytes of request bodies received and thrown away (the large-body test).
    discarded: std::sync::atomic::AtomicU64,
    /// Read the second request of each connection, then close without answering (a server
    /// that went away with the request in hand).
    drop_second: std::sync::atomic::AtomicBool,
}

impl RawUpstream {
    async fn start() -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Arc::new(Self {
            addr: listener.local_addr().unwrap(),
            seen: Mutex::default(),
            response: Mutex::new(OK_RESPONSE.to_vec()),
            discarded: Default::default(),
            drop_second: Default::default(),
        });
        let u = up.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(u.clone().serve(stream));
            }
        });
        up
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn reset(&self) {
        self.seen.lock().unwrap().clear();
        *self.response.lock().unwrap() = OK_RESPONSE.to_vec();
    }

    async fn serve(self: Arc<Self>, mut s: TcpStream) {
        let mut buf = Vec::new();
        for n in 1.. {
            let Some((seen, used)) = self.read_request(&mut s, &mut buf).await else { return };
            buf.drain(..used);
            self.seen.lock().unwrap().push(seen);
            if n == 2 && self.drop_second.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let response = self.response.lock().unwrap().clone();
            if s.write_all(&response).await.is_err() {
                return;
            }
        }
    }

    /// Reads one request from `buf` (and the socket); `None` at the end or on anything it does
    /// not understand.
    async fn read_request(&self, s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Seen, usize)> {
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(s, buf).await {
                return None;
            }
        };
        let text = std::str::from_utf8(&buf[..head_len]).ok()?.to_string();
        let mut lines = text.split("\r\n");
        let line = lines.next()?.to_string();
        let mut headers = Vec::new();
        for l in lines.filter(|l| !l.is_empty()) {
            let (n, v) = l.split_once(':')?;
            headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
        let get = |name: &str| {
            headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect::<Vec<_>>()
        };
        let mut at = head_len;
        let mut body = Vec::new();
        let chunked = get("transfer-encoding").iter().any(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let size_line = loop {
                    if let Some(i) = buf[at..].windows(2).position(|w| w == b"\r\n") {
                        break at + i;
                    }
                    if !read_more(s, buf).await {
                        return None;
                    }
                };
                let size_text = std::str::from_utf8(&buf[at..size_line]).ok()?;
                let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                at = size_line + 2;
                while buf.len() < at + size + 2 {
                    if !read_more(s, buf).await {
                        return None;
                    }
                }
                body.extend_from_slice(&buf[at..at + size]);
                at += size + 2;
                if size == 0 {
                    break; // no trailers in these tests
                }
            }
        } else if let Some(n) = get("content-length").first() {
            let n: usize = n.parse().ok()?;
            let mut left = n;
            // Large bodies are counted, not kept.
            let keep = n <= 1 << 20;
            loop {
                let have = (buf.len() - at).min(left);
                if keep {
                    body.extend_from_slice(&buf[at..at + have]);
                    at += have;
                } else {
                    self.discarded.fetch_add(have as u64, std::sync::atomic::Ordering::Relaxed);
                    buf.drain(at..at + have);
                }
                left -= have;
                if left == 0 {
                    break;
                }
                if !read_more(s, buf).await {
                    return None;
                }
            }
        }
        headers.retain(|(n, _)| n != "traceparent" && n != "x-request-id");
        headers.sort();
        Some((Seen { line, headers, body }, at))
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 64 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

struct Proxy {
    addr: SocketAddr,
    _stop: DropCancel,
}

struct DropCancel(CancellationToken);

impl Drop for DropCancel {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A proxy routing `reviews.shop:9080` to `up`.
async fn proxy(up: &RawUpstream, fast_path: bool, tweak: impl FnOnce(&mut ProxyContext)) -> Proxy {
    let mut cfg = support::config("strict", vec![], vec![]);
    cfg.destinations[0].endpoints = vec![Endpoint {
        address: "127.0.0.1".into(),
        ports: [("http".to_string(), up.addr.port())].into(),
        labels: Default::default(),
        identity: None,
    }];
    let store = Arc::new(ConfigStore::new(None));
    store.apply(cfg, Source::File).unwrap();
    let mut ctx =
        ProxyContext::new(store, AccessLog::off(), "127.0.0.1".parse().unwrap(), Duration::from_millis(500));
    ctx.fast_path = fast_path;
    tweak(&mut ctx);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(skein_proxy::serve_listener(listener, Arc::new(ctx), Direction::Outbound, stop.clone()));
    Proxy { addr, _stop: DropCancel(stop) }
}

/// What the client got: the status of each response, and whether the proxy then closed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    statuses: Vec<u16>,
    closed: bool,
    /// The response heads, lower-cased, for checks on what the client was given.
    heads: Vec<String>,
}

/// Writes `raw`, then reads `expect` responses (each framed by its length or chunked), then,
/// when `expect_close`, waits for the end of the stream. Bounded: a proxy that answers less
/// or keeps the connection open fails by its deadline.
async fn exchange(to: SocketAddr, raw: &[u8], expect: usize, expect_close: bool) -> Got {
    let head_request = raw.starts_with(b"HEAD ");
    let mut s = TcpStream::connect(to).await.unwrap();
    let _ = s.write_all(raw).await; // the proxy may close before it has read everything
    let mut buf = Vec::new();
    let mut got = Got { statuses: vec![], closed: false, heads: vec![] };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Complete responses at the front of the buffer.
        while let Some((status, head, len)) = parse_response(&buf, head_request) {
            got.statuses.push(status);
            got.heads.push(head);
            buf.drain(..len);
        }
        if got.statuses.len() >= expect && !expect_close {
            return got;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                got.closed = true;
                return got;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return got, // neither answered nor closed
        }
    }
}

/// One complete response at the start of `buf`: its status, its head and its length (a
/// response to HEAD has no body, whatever its length says).
fn parse_response(buf: &[u8], to_head: bool) -> Option<(u16, String, usize)> {
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let status: u16 = head.get(9..12)?.parse().ok()?;
    if to_head {
        return Some((status, head, head_len));
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    if head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked")) {
        // Walk the chunks to the end.
        let mut at = head_len;
        loop {
            let line_end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[at..line_end]).ok()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at + 2;
                return Some((status, head, end));
            }
            if buf.len() < at + size + 2 {
                return None;
            }
            at += size + 2;
        }
    }
    let len = head_len + length.unwrap_or(0);
    (buf.len() >= len).then_some((status, head, len))
}

/// A case: its name, the bytes, what the client must get and what the upstream must see.
struct Case {
    name: &'static str,
    raw: Vec<u8>,
    statuses: Vec<u16>,
    closed: bool,
    /// Request lines the upstream must see, in order.
    upstream: Vec<&'static str>,
}

fn case(name: &'static str, raw: &str, statuses: &[u16], closed: bool, upstream: &[&'static str]) -> Case {
    Case {
        name,
        raw: raw.as_bytes().to_vec(),
        statuses: statuses.to_vec(),
        closed,
        upstream: upstream.to_vec(),
    }
}

/// Runs a case through both proxies: each must meet the case's expectations, and the two
/// upstream records must be the same.
async fn run_both(up: &RawUpstream, fast: &Proxy, general: &Proxy, c: &Case) {
    let mut records = Vec::new();
    let mut outcome = String::new();
    for (label, p) in [("fast path", fast), ("hyper path", general)] {
        up.reset();
        let got = exchange(p.addr, &c.raw, c.statuses.len(), c.closed).await;
        outcome = format!("{:?}{}", got.statuses, if got.closed { ", closed" } else { "" });
        assert_eq!(got.statuses, c.statuses, "{}: statuses through the {label}", c.name);
        if c.closed {
            assert!(got.closed, "{}: the {label} must close the connection", c.name);
        }
        let seen = up.seen();
        let lines: Vec<&str> = seen.iter().map(|s| s.line.as_str()).collect();
        assert_eq!(lines, c.upstream, "{}: what the upstream saw through the {label}", c.name);
        records.push(seen);
    }
    assert_eq!(
        records[0], records[1],
        "{}: the upstream saw different requests through the two paths",
        c.name
    );
    let lines: Vec<&str> = records[0].iter().map(|s| s.line.as_str()).collect();
    println!("attack | {} | both paths: {outcome}; upstream saw {lines:?}", c.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_and_hyper_agree_on_valid_and_hostile_requests() {
    let up = RawUpstream::start().await;
    let fast = proxy(&up, true, |_| {}).await;
    let general = proxy(&up, false, |_| {}).await;
    let h = HOST;
    let long_value = "a".repeat(70 * 1024);
    let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases = vec![
        // Valid.
        case(
            "get",
            &format!("GET /a?b=1 HTTP/1.1\r\nHost: {h}\r\nX-Custom: One\r\n\r\n"),
            &[200],
            false,
            &["GET /a?b=1 HTTP/1.1"],
        ),
        case(
            "post with a length",
            &format!("POST /p HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\n\r\nhello"),
            &[200],
            false,
            &["POST /p HTTP/1.1"],
        ),
        case("head", &format!("HEAD /h HTTP/1.1\r\nHost: {h}\r\n\r\n"), &[200], false, &["HEAD /h HTTP/1.1"]),
        case(
            "chunked post",
            &format!(
                "POST /c HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            &[200],
            false,
            &["POST /c HTTP/1.1"],
        ),
        case(
            "pipelined",
            &format!("GET /1 HTTP/1.1\r\nHost: {h}\r\n\r\nGET /2 HTTP/1.1\r\nHost: {h}\r\n\r\n"),
            &[200, 200],
            false,
            &["GET /1 HTTP/1.1", "GET /2 HTTP/1.1"],
        ),
        case(
            "connection close",
            &format!("GET /x HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"),
            &[200],
            true,
            &["GET /x HTTP/1.1"],
        ),
        case(
            "obs-text value",
            &format!("GET /o HTTP/1.1\r\nHost: {h}\r\nX-Name: caf\u{e9}\r\n\r\n"),
            &[200],
            false,
            &["GET /o HTTP/1.1"],
        ),
        // Absolute-form: the target's authority is the Host (RFC 9112 §3.2.2).
        case(
            "absolute-form with another host",
            &format!("GET http://{h}/abs HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"),
            &[200],
            false,
            &["GET /abs HTTP/1.1"],
        ),
        // Hostile or malformed: refused before anything is forwarded.
        case(
            "signed length",
            &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: +5\r\n\r\nhello"),
            &[400],
            true,
            &[],
        ),
        case(
            "length list",
            &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5, 5\r\n\r\nhello"),
            &[400],
            true,
            &[],
        ),
        case(
            "hex length",
            &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0x5\r\n\r\nhello"),
            &[400],
            true,
            &[],
        ),
        case(
            "huge length",
            &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            &[400],
            true,
            &[],
        ),
        case(
            "duplicate host",
            &format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: other.example\r\n\r\n"),
            &[400],
            true,
            &[],
        ),
        case("host with a space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", &[400], true, &[]),
        case(
            "obs-fold",
            &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-A: 1\r\n  folded\r\n\r\n"),
            &[400],
            true,
            &[],
        ),
        case(
            "NUL in a value",
            &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-A: a\0b\r\n\r\n"),
            &[400],
            true,
            &[],
        ),
        case(
            "space before the colon",
            &format!("GET / HTTP/1.1\r\nHost: {h}\r\nContent-Length : 5\r\n\r\nhello"),
            &[400],
            true,
            &[],
        ),
        case("no version", &format!("GET /\r\nHost: {h}\r\n\r\n"), &[400], true, &[]),
        case(
            "over-long head",
            &format!("GET / HTTP/1.1\r\nHost: {h}\r\nX-Long: {long_value}\r\n\r\n"),
            &[431],
            true,
            &[],
        ),
        case("too many headers", &format!("GET / HTTP/1.1\r\nHost: {h}\r\n{many}\r\n"), &[431], true, &[]),
    ];
    for c in &cases {
        run_both(&up, &fast, &general, c).await;
    }
    // What the upstream saw for the absolute-form request: the target's authority as Host.
    up.reset();
    exchange(fast.addr, &cases[7].raw, 1, false).await;
    let seen = up.seen();
    assert!(seen[0].headers.contains(&("host".into(), HOST.into())), "{:?}", seen[0].headers);
    assert!(!seen[0].headers.iter().any(|(_, v)| v == "elsewhere.example"), "{:?}", seen[0].headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_never_reach_the_upstream() {
    let up = RawUpstream::start().await;
    let fast = proxy(&up, true, |_| {}).await;
    let general = proxy(&up, false, |_| {}).await;
    let h = HOST;
    let hidden = format!("GET /hidden HTTP/1.1\r\nHost: {h}\r\n\r\n");
    let cases = vec![
        // CL.TE: a front end that reads the length forwards the hidden request as body. Both
        // framings: Transfer-Encoding wins, Content-Length goes, the connection closes after
        // the answer (RFC 9112 §6.3), so the bytes behind the empty body are never read.
        case("CL.TE", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}", 5 + hidden.len()), &[200], true, &["POST / HTTP/1.1"]),
        // TE.CL: a back end that reads the length would see the chunk as the next request;
        // here the chunk is body, re-framed, and the connection closes.
        case("TE.CL", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len()), &[200], true, &["POST / HTTP/1.1"]),
        // TE.TE: obfuscated codings one side might ignore.
        case("TE.TE unknown coding", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{hidden}"), &[400], true, &[]),
        case("TE.TE chunked then another", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n{hidden}"), &[400], true, &[]),
        case("TE.TE with a length", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nTransfer-encoding: identity\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{hidden}"), &[400], true, &[]),
        case("TE.TE space before the colon", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{hidden}"), &[400], true, &[]),
        case("TE.TE vertical tab", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding:\x0bchunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{hidden}"), &[400], true, &[]),
        case("duplicate lengths that differ", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{hidden}", hidden.len()), &[400], true, &[]),
        // Repeated lengths that agree are one length (RFC 9112 §6.3): every reader frames the
        // body alike, so what follows is an ordinary pipelined request, seen as such.
        case("duplicate lengths that agree", &format!("POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\nGET /next HTTP/1.1\r\nHost: {h}\r\n\r\n"), &[200, 200], false, &["POST / HTTP/1.1", "GET /next HTTP/1.1"]),
        // A request the proxy refuses, with another pipelined behind it: the connection ends.
        case("pipelined after an error", &format!("GET / HTTP/1.1\r\nHost: {h}\r\nHost: x\r\n\r\n{hidden}"), &[400], true, &[]),
        case("pipelined after garbage", &format!("GET /first HTTP/1.1\r\nHost: {h}\r\n\r\nGARBAGE\r\n\r\n{hidden}"), &[200, 400], true, &["GET /first HTTP/1.1"]),
    ];
    for c in &cases {
        run_both(&up, &fast, &general, c).await;
    }
    // Bad chunked bodies: the head was fine, so the request may already be on its way when
    // the body turns out broken; the client gets 400 and a closed connection, and whatever
    // follows the bad chunk never reaches the upstream as a request.
    let bad_bodies = [
        ("chunk size not hex", "zz\r\nhello\r\n0\r\n\r\n"),
        ("bare LF after the size", "5\nhello\r\n0\r\n\r\n"),
        ("bare LF in an extension", "5;a\nb\r\nhello\r\n0\r\n\r\n"),
        ("size past 64 bits", "10000000000000000\r\nhello\r\n0\r\n\r\n"),
        ("data longer than its size", "2\r\nhello\r\n0\r\n\r\n"),
    ];
    for (name, body) in bad_bodies {
        for (label, p) in [("fast path", &fast), ("hyper path", &general)] {
            up.reset();
            let raw =
                format!("POST /b HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n{body}{hidden}");
            let got = exchange(p.addr, raw.as_bytes(), 1, true).await;
            assert_eq!(got.statuses, vec![400], "{name} through the {label}: {got:?}");
            assert!(got.closed, "{name} through the {label}");
            let seen = up.seen();
            assert!(seen.iter().all(|s| !s.line.contains("/hidden")), "{name} through the {label}: {seen:?}");
            println!(
                "attack | bad chunked body: {name} | {label}: {:?}, closed; no hidden request",
                got.statuses
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_responses_are_sanitized_or_refused() {
    let up = RawUpstream::start().await;
    let fast = proxy(&up, true, |_| {}).await;
    let general = proxy(&up, false, |_| {}).await;
    let get = format!("GET /r HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let smuggled = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED";
    for (label, p) in [("fast path", &fast), ("hyper path", &general)] {
        // Both framing headers: Transfer-Encoding wins, Content-Length is not passed on, and
        // the bytes after the chunked body are never read as the next response.
        up.reset();
        *up.response.lock().unwrap() =
            format!("HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n{smuggled}")
                .into_bytes();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(get.as_bytes()).await.unwrap();
        let first = read_one_response(&mut s).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{label}: {first}");
        assert!(!first.to_ascii_lowercase().contains("content-length"), "{label}: {first}");
        assert!(first.ends_with("ok\r\n0\r\n\r\n") || first.ends_with("ok"), "{label}: {first}");
        *up.response.lock().unwrap() = OK_RESPONSE.to_vec();
        s.write_all(get.as_bytes()).await.unwrap();
        let second = read_one_response(&mut s).await;
        assert!(!second.contains("SMUGGLED"), "{label}: the second response was the smuggled one: {second}");
        assert!(second.is_empty() || second.ends_with("ok"), "{label}: {second}");
        println!("attack | response with both framings and a smuggled response behind | {label}: 200 without Content-Length; the next request got a fresh answer");

        // Lengths a strict reader refuses: 502, never a guess.
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        ] {
            up.reset();
            *up.response.lock().unwrap() = bad.as_bytes().to_vec();
            let got = exchange(p.addr, get.as_bytes(), 1, false).await;
            assert_eq!(got.statuses, vec![502], "{label}: {bad:?}");
            println!(
                "attack | response with {} | {label}: 502",
                bad.split("\r\n").skip(1).take_while(|l| !l.is_empty()).collect::<Vec<_>>().join(", ")
            );
        }
        // A broken chunked body: the connection is cut, no second response is invented.
        up.reset();
        *up.response.lock().unwrap() =
            format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n{smuggled}")
                .into_bytes();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(get.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
        assert!(read.is_ok(), "{label}: the connection was not closed");
        assert!(
            !String::from_utf8_lossy(&all).contains("SMUGGLED"),
            "{label}: {}",
            String::from_utf8_lossy(&all)
        );
        println!("attack | response with a bare LF in its chunked body | {label}: connection cut, nothing smuggled");
    }
}

/// Reads one response (head and body) or returns what came before the connection closed.
async fn read_one_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((_, _, len)) = parse_response(&buf, false) {
            return String::from_utf8_lossy(&buf[..len]).into_owned();
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return String::from_utf8_lossy(&buf).into_owned(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_huge_clients_are_cut_off_while_others_are_served() {
    let up = RawUpstream::start().await;
    let head_timeout = Duration::from_millis(800);
    let limit = 1 << 20;
    let tweak = |ctx: &mut ProxyContext| {
        ctx.head_timeout = head_timeout;
        ctx.max_request_body = Some(limit);
    };
    let fast = proxy(&up, true, tweak).await;
    let general = proxy(&up, false, tweak).await;
    for (label, p) in [("fast path", &fast), ("hyper path", &general)] {
        // Twenty slowloris clients: a byte of the head every 100 ms, for up to 6 s.
        let mut slow = Vec::new();
        for _ in 0..20 {
            let addr = p.addr;
            slow.push(tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let started = tokio::time::Instant::now();
                for b in format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: {}", "z".repeat(100)).bytes() {
                    if s.write_all(&[b]).await.is_err() {
                        return started.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut probe = [0u8; 512];
                    if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::ZERO, s.read(&mut probe)).await
                    {
                        return started.elapsed();
                    }
                }
                started.elapsed()
            }));
        }
        // Meanwhile an ordinary client is served.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got =
            exchange(p.addr, format!("GET /ok HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(), 1, false).await;
        assert_eq!(got.statuses, vec![200], "{label}: an ordinary client beside slow ones");
        for s in slow {
            let lasted = s.await.unwrap();
            // Cut off at the head timeout (plus a probe interval), long before the head's 12 s.
            assert!(lasted < Duration::from_secs(5), "{label}: a slow head lasted {lasted:?}");
        }
        println!("attack | 20 slowloris clients (a head byte every 100 ms) | {label}: each cut off within 5 s (head timeout {head_timeout:?}); an ordinary client got 200 meanwhile");

        // A body declared over the limit: 413, and nothing forwarded.
        up.reset();
        let raw = format!("POST /big HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\nxxxx", limit + 1);
        let got = exchange(p.addr, raw.as_bytes(), 1, true).await;
        assert_eq!(got.statuses, vec![413], "{label}");
        assert!(up.seen().is_empty(), "{label}");
        println!("attack | body declared over the {limit}-byte limit | {label}: 413, nothing forwarded");
    }

    // A large body (under no limit) streams through; the process's peak memory grows by far
    // less than the body.
    let open = proxy(&up, true, |_| {}).await;
    let open_general = proxy(&up, false, |_| {}).await;
    for (label, p) in [("fast path", &open), ("hyper path", &open_general)] {
        up.reset();
        up.discarded.store(0, std::sync::atomic::Ordering::Relaxed);
        let size: u64 = 128 << 20;
        let before = peak_rss_kib();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(
            format!("POST /stream HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let chunk = vec![b'x'; 256 * 1024];
        for _ in 0..size / chunk.len() as u64 {
            s.write_all(&chunk).await.unwrap();
        }
        let answer = read_one_response(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{label}: {answer}");
        assert_eq!(up.discarded.load(std::sync::atomic::Ordering::Relaxed), size, "{label}");
        let grew = peak_rss_kib().saturating_sub(before);
        assert!(grew < 48 * 1024, "{label}: peak RSS grew {grew} KiB for a {size}-byte body");
        println!(
            "attack | a {} MiB body | {label}: streamed through, peak RSS of the test process +{} MiB",
            size >> 20,
            grew / 1024
        );
    }
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_are_sent_again_after_a_connection_dies() {
    let up = RawUpstream::start().await;
    up.drop_second.store(true, std::sync::atomic::Ordering::SeqCst);
    for (method, body, expect, upstream_saw) in [
        // A GET on the reused connection dies unanswered: sent again on a new one.
        ("GET", "", 200, vec!["GET /first HTTP/1.1", "GET /again HTTP/1.1", "GET /again HTTP/1.1"]),
        // A POST may have been acted on: never sent twice, 502 instead.
        ("POST", "x", 502, vec!["GET /first HTTP/1.1", "POST /again HTTP/1.1"]),
    ] {
        up.reset();
        let fast = proxy(&up, true, |_| {}).await; // a pool of its own
        let mut s = TcpStream::connect(fast.addr).await.unwrap();
        s.write_all(format!("GET /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes()).await.unwrap();
        assert!(read_one_response(&mut s).await.starts_with("HTTP/1.1 200"));
        // The same client connection, so the proxy reuses its upstream connection.
        let second = format!(
            "{method} /again HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(second.as_bytes()).await.unwrap();
        let answer = read_one_response(&mut s).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {expect}")), "{method}: {answer}");
        let lines: Vec<String> = up.seen().into_iter().map(|r| r.line).collect();
        assert_eq!(lines, upstream_saw, "{method}");
        println!("attack | the upstream dies holding a reused connection's {method} | {expect}; upstream saw {lines:?}");
    }
}
