//! Request heads parsed in place: positions into the connection's buffer rather than copies,
//! with what the fast path needs to know (authority, framing, whether anything is unusual) and
//! the [`RequestView`] the route table matches on.

use std::io;
use std::ops::Range;
use std::time::Duration;

use bytes::BytesMut;
use http::HeaderName;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::route::table::RequestView;
use crate::telemetry::trace;
pub(super) use crate::wire::syntax::{offset, parse_length, valid_authority};
pub(super) use crate::wire::{MAX_HEAD, MAX_HEADERS, READ_CHUNK};

/// A keep-alive client connection without a request for one to two of these is closed.
const CLIENT_IDLE: Duration = Duration::from_secs(120);

/// A connection's keep-alive clock, set when the connection opens and looked at only when it
/// runs out (not reset per request, which would take a timer out of the runtime's wheel and
/// put one back for every request): a connection that had no request since it was last set
/// is idle, and one that had is given another [`CLIENT_IDLE`].
pub(super) struct Idle {
    clock: std::pin::Pin<Box<tokio::time::Sleep>>,
    served: bool,
}

impl Idle {
    pub(super) fn new() -> Self {
        Self { clock: Box::pin(tokio::time::sleep(CLIENT_IDLE)), served: false }
    }

    /// `Ready` when the connection is idle.
    fn poll_idle(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::future::Future;
        while self.clock.as_mut().poll(cx).is_ready() {
            if !std::mem::take(&mut self.served) {
                return std::task::Poll::Ready(());
            }
            self.clock.as_mut().reset(tokio::time::Instant::now() + CLIENT_IDLE);
        }
        std::task::Poll::Pending
    }
}

/// A parsed request head: positions into the connection's buffer.
#[derive(Default)]
pub(super) struct Head {
    pub(super) len: usize,
    pub(super) method: Range<usize>,
    /// Path and query, origin-form.
    pub(super) path: Range<usize>,
    /// The authority: from an absolute-form target or the Host header.
    pub(super) authority: Option<Range<usize>>,
    /// The target was absolute-form: its authority replaces any `Host` (RFC 9112 §3.2.2).
    pub(super) absolute: bool,
    pub(super) headers: Vec<(Range<usize>, Range<usize>)>,
    pub(super) content_length: u64,
    /// Something only the general path handles.
    pub(super) unusual: bool,
    pub(super) close: bool,
    pub(super) has_host: bool,
    /// The value of the request's one `traceparent`, when it has exactly one and it is valid;
    /// otherwise every `traceparent` is dropped and a new one generated.
    pub(super) traceparent: Option<Range<usize>>,
    pub(super) has_request_id: bool,
    /// The value of the one `x-skein-inbound-port` header: the app port a calling sidecar
    /// names. Only an inbound request may carry it (the general path decides any other).
    pub(super) inbound_port: Option<Range<usize>>,
}

/// Header names a proxy never forwards (RFC 9110 §7.6.1).
pub(super) fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The bytes a path and query may hold (RFC 3986: unreserved, sub-delims, `:@/?%`).
const TARGET_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
                    | b'?'
                    | b'%'
            );
        b += 1;
    }
    table
};

/// Whether every line of a head ends in CRLF: httparse also takes a bare LF, which a peer
/// could read differently.
pub(crate) fn crlf_only(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).all(|i| i > 0 && head[i - 1] == b'\r')
}

impl Head {
    /// Parses a complete head at the start of `buf`; `Ok(None)` when more bytes are needed.
    /// Anything the fast path is not sure of sets `unusual`, and hyper's path, which is
    /// strict about the rest, decides (with a 400 for what it refuses).
    pub(super) fn parse(buf: &[u8], head: &mut Head) -> Result<Option<()>, ()> {
        // Left uninitialised: httparse writes the fields it returns (3 KiB not cleared per head).
        let mut raw = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut raw) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(()),
        };
        head.headers.clear();
        head.len = len;
        let (method, target) = (req.method.ok_or(())?, req.path.ok_or(())?);
        head.method = offset(buf, method.as_bytes());
        head.unusual = req.version != Some(1) || method == "CONNECT" || !crlf_only(&buf[..len]);
        head.close = false;
        head.content_length = 0;
        head.authority = None;
        head.absolute = false;
        head.has_host = false;
        head.traceparent = None;
        let mut traceparents = 0;
        head.has_request_id = false;
        head.inbound_port = None;
        // Absolute-form (an app using the sidecar as HTTP_PROXY): split off the authority.
        let t = target.as_bytes();
        head.path = offset(buf, t);
        if let Some(rest) = target.strip_prefix("http://") {
            let end = rest.find('/').unwrap_or(rest.len());
            let authority = &rest.as_bytes()[..end];
            head.authority = Some(offset(buf, authority));
            head.absolute = true;
            // The path, or an empty range at its place: "http://host" has none.
            head.path = offset(buf, &rest.as_bytes()[end..]);
            if end == rest.len() || !valid_authority(authority) {
                // No path, userinfo ("http://user@host/"), a bad port: for hyper to judge.
                head.unusual = true;
            }
        } else if !target.starts_with('/') {
            head.unusual = true; // "*", an authority-form target or another scheme
        }
        // Path and query of RFC 3986 characters only: a fragment ('#'), which hyper's side
        // strips, or bytes the `http` crate reads otherwise, are for hyper's path.
        if !buf[head.path.clone()].iter().all(|b| TARGET_BYTES[usize::from(*b)]) {
            head.unusual = true;
        }
        let (mut lengths, mut hosts) = (0, 0);
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            let value = h.value;
            head.headers.push((offset(buf, name), offset(buf, value)));
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths += 1;
                match parse_length(value) {
                    Some(n) => head.content_length = n,
                    None => head.unusual = true,
                }
            } else if name.eq_ignore_ascii_case(b"host") {
                hosts += 1;
                head.has_host = true;
                if !valid_authority(value) {
                    head.unusual = true;
                }
                if head.authority.is_none() {
                    head.authority = Some(offset(buf, value));
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        head.unusual = true; // upgrade, or headers named as hop-by-hop
                    }
                }
            } else if name.eq_ignore_ascii_case(skein_api::constants::INBOUND_PORT_HEADER.as_bytes()) {
                if head.inbound_port.is_some() {
                    head.unusual = true;
                }
                head.inbound_port = Some(offset(buf, value));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
            {
                head.unusual = true;
            } else if name.eq_ignore_ascii_case(b"traceparent") {
                traceparents += 1;
                head.traceparent =
                    (traceparents == 1 && trace::is_valid_traceparent(value)).then(|| offset(buf, value));
            } else if name.eq_ignore_ascii_case(b"x-request-id") {
                head.has_request_id = true;
            }
        }
        if lengths > 1 || hosts > 1 {
            head.unusual = true; // hyper's path refuses these with 400
        }
        Ok(Some(()))
    }
}

/// A head together with its buffer, for route matching.
pub(super) struct View<'a> {
    pub(super) head: &'a Head,
    pub(super) buf: &'a [u8],
}

impl View<'_> {
    pub(super) fn str(&self, r: &Range<usize>) -> &str {
        std::str::from_utf8(&self.buf[r.clone()]).unwrap_or("")
    }
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        self.str(&self.head.method)
    }
    fn path(&self) -> &str {
        let p = self.str(&self.head.path);
        p.split_once('?').map_or(p, |(path, _)| path)
    }
    fn any_header(&self, name: &HeaderName, f: &mut dyn FnMut(&str) -> bool) -> bool {
        self.head
            .headers
            .iter()
            .filter(|(n, _)| self.buf[n.clone()].eq_ignore_ascii_case(name.as_str().as_bytes()))
            // As `HeaderValue::to_str` on hyper's path: a value with obs-text matches nothing.
            .filter(|(_, v)| self.buf[v.clone()].iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)))
            .any(|(_, v)| f(self.str(v)))
    }
}

/// Splits an authority into host and port (`[::1]:80`, `host:80`, `host`).
pub(super) fn host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse().ok()),
        _ => (authority, None),
    }
}

/// Reads until `buf` holds a complete head; `Ok(false)` on a clean end of stream before any
/// byte, or an idle connection. Once a head has begun it must be complete within
/// `head_timeout` (a slowloris client gets `TimedOut`).
pub(super) async fn fill_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    head: &mut Head,
    idle: &mut Idle,
    head_timeout: Duration,
) -> io::Result<bool> {
    // Set when a partial head is first waited on: about when its first byte arrived.
    let mut deadline = None;
    loop {
        if !buf.is_empty() {
            match Head::parse(buf, head) {
                Ok(Some(())) if head.len > MAX_HEAD => {
                    return Err(io::Error::new(io::ErrorKind::FileTooLarge, "head too large"))
                }
                Ok(Some(())) => {
                    idle.served = true;
                    return Ok(true);
                }
                Ok(None) if buf.len() >= MAX_HEAD => {
                    return Err(io::Error::new(io::ErrorKind::FileTooLarge, "head too large"))
                }
                Ok(None) => {}
                Err(()) => return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed head")),
            }
        }
        buf.reserve(READ_CHUNK.saturating_sub(buf.capacity() - buf.len()).min(READ_CHUNK));
        let read = if buf.is_empty() {
            let mut read = std::pin::pin!(stream.read_buf(buf));
            let read = std::future::poll_fn(|cx| {
                use std::future::Future;
                match read.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
                    std::task::Poll::Pending => idle.poll_idle(cx).map(|()| None),
                }
            });
            match read.await {
                Some(r) => r?,
                None => return Ok(false),
            }
        } else {
            let at = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + head_timeout);
            match tokio::time::timeout_at(at, stream.read_buf(buf)).await {
                Ok(r) => r?,
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            }
        };
        if read == 0 {
            return if buf.is_empty() { Ok(false) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_is_idle_after_one_to_two_clock_periods() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(4096);
        let (mut buf, mut head, mut idle) = (BytesMut::new(), Head::default(), Idle::new());
        let started = tokio::time::Instant::now();
        // A request every 100 s keeps it open well past the first period.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(100)).await;
            client.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
            let read = fill_head(&mut server, &mut buf, &mut head, &mut idle, Duration::from_secs(10)).await;
            assert!(read.unwrap(), "served at {:?}", started.elapsed());
            buf.clear();
        }
        let last = tokio::time::Instant::now();
        let read = fill_head(&mut server, &mut buf, &mut head, &mut idle, Duration::from_secs(10));
        let read = tokio::time::timeout(Duration::from_secs(600), read).await.expect("closed in time");
        assert!(!read.unwrap(), "idle: no head");
        let waited = last.elapsed();
        assert!(waited > Duration::ZERO && waited <= 2 * CLIENT_IDLE, "{waited:?}");
        drop(client);
    }

    #[test]
    fn heads_parse_in_place() {
        let raw = b"GET http://reviews.shop:9080/api?x=1 HTTP/1.1\r\nX-User-Group: beta\r\nContent-Length: 3\r\n\r\nabc";
        let mut head = Head::default();
        Head::parse(raw, &mut head).unwrap().unwrap();
        let view = View { head: &head, buf: raw };
        assert_eq!(view.method(), "GET");
        assert_eq!(view.path(), "/api");
        assert_eq!(view.str(head.authority.as_ref().unwrap()), "reviews.shop:9080");
        assert_eq!(head.content_length, 3);
        assert!(!head.unusual && !head.has_host);
        assert!(view.any_header(&HeaderName::from_static("x-user-group"), &mut |v| v == "beta"));

        for unusual in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        ] {
            Head::parse(unusual, &mut head).unwrap().unwrap();
            assert!(head.unusual, "{}", String::from_utf8_lossy(unusual));
        }
        assert!(Head::parse(b"GET / HTTP/1.1\r\nHost: a\r\n", &mut head).unwrap().is_none());
        assert!(Head::parse(b"GARBAGE\r\n\r\n", &mut head).is_err());
    }

    #[test]
    fn what_the_fast_path_is_not_sure_of_goes_to_hyper() {
        let mut head = Head::default();
        for odd in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a{b} HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            match Head::parse(odd, &mut head) {
                Ok(Some(())) => assert!(head.unusual, "{}", String::from_utf8_lossy(odd).escape_debug()),
                Ok(None) => panic!("incomplete: {}", String::from_utf8_lossy(odd).escape_debug()),
                Err(()) => {} // malformed: also hyper's
            }
        }
        Head::parse(b"GET http://a:1/x HTTP/1.1\r\nHost: b\r\n\r\n", &mut head).unwrap().unwrap();
        assert!(!head.unusual && head.absolute);
        assert_eq!(&b"GET http://a:1/x HTTP/1.1\r\nHost: b\r\n\r\n"[head.authority.clone().unwrap()], b"a:1");
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(host_port("reviews:9080"), ("reviews", Some(9080)));
        assert_eq!(host_port("reviews"), ("reviews", None));
        assert_eq!(host_port("[::1]:80"), ("::1", Some(80)));
    }
}
