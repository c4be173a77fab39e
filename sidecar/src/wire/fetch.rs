//! One request sent whole over an endpoint's pooled connections, its response read with the
//! fast path's parser and its body streamed as it arrives ([`FetchedBody`]); the connection
//! goes back to the pool when the body has been read to its end. The general path sends every
//! request whose body is whole in hand (most are: no body, or one buffered for retries) this
//! way, to an app (plain TCP) or to a meshed endpoint's sidecar (mTLS).
//!
//! hyper's client did this before: a task per connection, a channel each way per request and a
//! header map parsed and rebuilt. Requests whose body streams still go through hyper's client,
//! which can send a body while the response arrives.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;

use super::framing::{Chunked, Framing};
use super::pool::{checkin, checkout, Upstream};
use super::response::{read_response_head, ResponseBuf, ResponseHead};
use super::{MAX_HEADERS, READ_CHUNK};
use crate::balance::EndpointState;
use crate::route::retry::Failure;

/// The most bytes of trailer section taken from a chunked response (hyper's limit is alike).
const MAX_TRAILER: usize = 16 * 1024;

/// Sends one request (`path` in origin-form, `headers` already those for the upstream, `body`
/// whole) to `endpoint`, over an idle connection or one `connect` makes, and returns the
/// response once its head has arrived, with its body (`None`: it has none). A pooled
/// connection that turns out closed before answering is replaced by a new one when the request
/// may be sent again (idempotent; the server may have acted on anything else).
pub(crate) async fn fetch<C, F>(
    endpoint: &Arc<EndpointState>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Option<Bytes>,
    mut connect: C,
) -> Result<http::Response<Option<FetchedBody>>, Failure>
where
    C: FnMut() -> F,
    F: std::future::Future<Output = Result<Upstream, Failure>>,
{
    let mut out = Vec::with_capacity(512);
    let _ = write!(out, "{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = body.unwrap_or_default();
    if !headers.contains_key(http::header::CONTENT_LENGTH) && (!body.is_empty() || expects_body(method)) {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    let replayable = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
        || matches!(*method, Method::PUT | Method::DELETE);

    let mut scratch = ResponseBuf::default();
    let mut fresh = false;
    let (up, parsed) = loop {
        let (mut up, reused) = match checkout(endpoint) {
            Some(s) => (s, true),
            None => {
                // Boxed: a handshake's state (most of a kilobyte and a half) is needed by
                // few requests, and would otherwise be part of every request's future.
                let s = Box::pin(connect()).await?;
                fresh = true;
                (s, false)
            }
        };
        let sent = match up.write_all(&out).await {
            Ok(()) => up.flush().await,
            Err(e) => Err(e),
        };
        if sent.is_err() {
            if reused && replayable && !fresh {
                continue;
            }
            return Err(Failure::Reset);
        }
        scratch.resp.reserve(READ_CHUNK);
        match read_response_head(&mut up, &mut scratch).await {
            Ok(Some(parsed)) => break (up, parsed),
            Ok(None) if reused && replayable && !fresh => continue,
            Ok(None) | Err(_) => return Err(Failure::Reset),
        }
    };
    let ResponseHead { len, status, framing, close, chunked_and_length } = parsed;
    let status = StatusCode::from_u16(status).map_err(|_| Failure::Reset)?;

    let mut response = http::Response::new(None);
    *response.status_mut() = status;
    // The values share the head's buffer (one allocation for all of them, not one each).
    let mut rest = scratch.resp;
    let head = rest.split_to(len).freeze();
    let map = response.headers_mut();
    map.reserve(scratch.headers.len().min(MAX_HEADERS));
    for (n, v) in &scratch.headers {
        let name = HeaderName::from_bytes(&head[n.clone()]).map_err(|_| Failure::Reset)?;
        let value = HeaderValue::from_maybe_shared(head.slice(v.clone())).map_err(|_| Failure::Reset)?;
        map.append(name, value);
    }
    // Framed both ways: Transfer-Encoding won (RFC 9112 §6.3), the length is not passed on.
    if chunked_and_length {
        map.remove(http::header::CONTENT_LENGTH);
    }
    let framing = if *method == Method::HEAD || status.as_u16() == 204 || status.as_u16() == 304 {
        Framing::None
    } else {
        framing
    };
    let body = FetchedBody {
        up: Some(up),
        endpoint: endpoint.clone(),
        buf: rest,
        framing,
        reusable: !close && !chunked_and_length,
        ended: false,
        trailer: Vec::new(),
        ranges: Vec::new(),
        pending: VecDeque::new(),
    };
    *response.body_mut() = body.into_body();
    Ok(response)
}

/// Methods whose empty body is still sent as `Content-Length: 0`, as hyper's client does.
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// A response body read from a fast-path connection as it arrives. Read to its end, the
/// connection goes back to the pool; dropped before, the connection is closed.
pub struct FetchedBody {
    up: Option<Upstream>,
    endpoint: Arc<EndpointState>,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    framing: Framing,
    reusable: bool,
    /// The body has been read to its end (or broke off).
    ended: bool,
    /// A chunked body's trailer section, as it arrives.
    trailer: Vec<u8>,
    /// Data ranges of the last decoded piece (reused).
    ranges: Vec<std::ops::Range<usize>>,
    /// Frames decoded and not yet handed on.
    pending: VecDeque<Frame<Bytes>>,
}

impl std::fmt::Debug for FetchedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchedBody").field("endpoint", &self.endpoint.addr).finish_non_exhaustive()
    }
}

/// Why a fetched body ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream connection failed mid-body: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before the body ended")]
    Cut,
    #[error("the upstream's chunked coding is malformed")]
    BadChunk,
    #[error("the upstream's trailers are malformed or too large")]
    BadTrailer,
}

impl FetchedBody {
    fn into_body(mut self) -> Option<Self> {
        if matches!(self.framing, Framing::None | Framing::Length(0)) {
            // Nothing to read: the connection is done with now.
            self.finish();
            return None;
        }
        Some(self)
    }

    /// The body ended: the connection goes back to the pool if nothing followed the response.
    fn finish(&mut self) {
        self.ended = true;
        if let Some(up) = self.up.take() {
            if self.reusable && self.buf.is_empty() {
                checkin(&self.endpoint, up);
            }
        }
    }

    /// The body broke off: the connection is closed.
    fn abort(&mut self) {
        self.ended = true;
        self.up = None;
    }

    /// Takes what `buf` holds of the body; `Some(frame)` when there is one to hand on.
    fn take(&mut self) -> Result<Option<Frame<Bytes>>, BodyError> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(Some(frame));
        }
        if self.ended || self.buf.is_empty() {
            return Ok(None);
        }
        match &mut self.framing {
            Framing::None => Ok(None),
            Framing::Length(n) => {
                let take = self.buf.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                let data = self.buf.split_to(take).freeze();
                if *n == 0 {
                    self.finish();
                }
                Ok(Some(Frame::data(data)))
            }
            Framing::UntilClose => Ok(Some(Frame::data(self.buf.split().freeze()))),
            Framing::Chunked(scanner) => {
                self.ranges.clear();
                let used = scanner
                    .decode(&self.buf, &mut self.ranges, &mut self.trailer)
                    .map_err(|_| BodyError::BadChunk)?;
                if self.trailer.len() > MAX_TRAILER {
                    return Err(BodyError::BadTrailer);
                }
                let done = *scanner == Chunked::Done;
                let piece = self.buf.split_to(used).freeze();
                self.pending.extend(
                    self.ranges.iter().filter(|r| !r.is_empty()).map(|r| Frame::data(piece.slice(r.clone()))),
                );
                if done {
                    let trailers = parse_trailers(&self.trailer)?;
                    if !trailers.is_empty() {
                        self.pending.push_back(Frame::trailers(trailers));
                    }
                    self.finish();
                }
                Ok(self.pending.pop_front())
            }
        }
    }
}

/// A chunked body's trailer section as header fields.
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, BodyError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut map = HeaderMap::new();
    match httparse::parse_headers(section, &mut raw) {
        Ok(httparse::Status::Complete((_, fields))) => {
            for f in fields {
                let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| BodyError::BadTrailer)?;
                let value = HeaderValue::from_bytes(f.value).map_err(|_| BodyError::BadTrailer)?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(BodyError::BadTrailer),
    }
}

impl http_body::Body for FetchedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match this.take() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.abort();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let Some(up) = this.up.as_mut() else { return Poll::Ready(None) };
            this.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(up), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.abort();
                    if matches!(this.framing, Framing::UntilClose) {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(BodyError::Cut)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.abort();
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) if !self.ended => SizeHint::with_exact(n),
            _ if self.is_end_stream() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
