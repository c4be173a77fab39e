//! The callee's end of the multiplexed hop: one task per connection, no task per stream. A
//! stream's request, once whole (head and body), is handed to the handler (the general path,
//! with the caller's verified identity); the handlers' futures, the response bodies and the
//! socket are all polled by the connection's one future, so every response ready in a round
//! goes out in one write.
//!
//! What a peer may do is bounded: [`MAX_STREAMS`] open at once (more are refused with
//! REFUSED_STREAM, which the caller may retry), request bodies within each stream's window of
//! [`super::MAX_BODY`] bytes and the connection's of [`CONN_WINDOW`] (given back only as bodies
//! are handed on, so a peer that never ends its streams stops itself), header blocks as large
//! as an HTTP/1.1 head, and streams reset by the peer faster than it lets them finish end the
//! connection (the rapid-reset attack).
//!
//! Time is looked at every [`SWEEP`], not per request: a connection that had no stream from
//! one sweep to the next is closed (idle), one whose peer read nothing of what we wrote in
//! that time is dropped, and a stream the peer holds up (its request body not arriving, its
//! response waiting for window) with nothing moving on it from one sweep to the next is
//! reset with CANCEL.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{AbortHandle, Abortable, FuturesUnordered};
use futures::StreamExt;
use http::{Request, Response, Uri, Version};
use http_body::Body;
use skein_http2::frame::{self, setting, Reason};
use skein_http2::hpack::{self, Fields};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{put_header, regular_field, ConnError, Event, Link, Streams, MAX_BODY};
use crate::wire::syntax::parse_length;

/// Streams a peer may have open at once.
pub const MAX_STREAMS: usize = 128;
/// The connection's receive window: request bodies held at once.
pub const CONN_WINDOW: i64 = 1024 * 1024;
/// How often streams and the connection are looked at: a connection without streams, or a
/// stream the peer holds up, is ended after one to two of these (the HTTP/1 listener closes
/// an idle keep-alive connection after 120 s).
pub const SWEEP: Duration = Duration::from_secs(60);
/// Resets by the peer tolerated before their share of all streams is looked at.
const RESETS_FREE: u32 = 128;

/// A request's answer on its way: the handler's future (boxed once, by the handler: it is
/// kilobytes, and is not moved again) and its stream.
pub(crate) type Answer<B> = Pin<Box<dyn Future<Output = Result<Response<B>, Infallible>> + Send>>;

struct Tagged<B> {
    stream: u32,
    answer: Answer<B>,
}

impl<B> Future for Tagged<B> {
    type Output = (u32, Response<B>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let stream = self.stream;
        self.answer.as_mut().poll(cx).map(|r| match r {
            Ok(response) => (stream, response),
            Err(never) => match never {},
        })
    }
}

type Handling<B> = Abortable<Tagged<B>>;

struct Stream<B> {
    /// What we may still send on it.
    window: i64,
    state: State<B>,
    /// Something moved on it since the last sweep: a frame from the peer for it, bytes of its
    /// body sent, or its handler or body found waiting on the app.
    moved: bool,
}

// The head is moved into its request once the body is whole; boxing it would cost every
// request an allocation to save a map entry's bytes.
#[allow(clippy::large_enum_variant)]
enum State<B> {
    /// The request's head has arrived; its body is arriving.
    Receiving { head: http::request::Parts, length: Option<u64>, body: BytesMut, window: i64 },
    /// The handler has the request.
    Handling(AbortHandle),
    /// The response's head went out; its body is being sent. `held` is data the windows did
    /// not let through yet.
    Sending { body: B, held: Bytes },
}

/// Serves one connection (the peer's preface not yet read) until the peer closes it, breaks
/// the protocol or leaves it idle. `handler` answers each request.
pub(crate) async fn serve<S, H, B>(io: S, handler: H)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Option<Bytes>>) -> Answer<B>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    let settings = [
        (setting::ENABLE_PUSH, 0),
        (setting::MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32),
        (setting::INITIAL_WINDOW_SIZE, MAX_BODY as u32),
        (setting::MAX_HEADER_LIST_SIZE, super::MAX_HEADER_LIST as u32),
    ];
    let mut conn = Conn {
        link: Link::new(io, &[], &settings, CONN_WINDOW),
        preface: false,
        streams: Streams::default(),
        handling: FuturesUnordered::new(),
        handler,
        last_stream: 0,
        going_away: false,
        resets: 0,
        answered: 0,
        sweep: Box::pin(tokio::time::sleep(SWEEP)),
        opened: false,
    };
    std::future::poll_fn(|cx| conn.poll(cx)).await;
}

struct Conn<S, H, B> {
    link: Link<S>,
    preface: bool,
    streams: Streams<Stream<B>>,
    handling: FuturesUnordered<Handling<B>>,
    handler: H,
    /// The highest stream the peer opened.
    last_stream: u32,
    /// No new streams are taken; the connection ends when the open ones have.
    going_away: bool,
    resets: u32,
    answered: u32,
    sweep: Pin<Box<tokio::time::Sleep>>,
    /// A stream was opened since the last sweep.
    opened: bool,
}

impl<S, H, B> Conn<S, H, B>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Option<Bytes>>) -> Answer<B>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if self.link.can_write() && self.link.poll_read(cx).is_ready() {
                progress = true;
                if let Err(e) = self.read_frames() {
                    tracing::debug!(error = e.what, "a multiplexed connection broke the protocol");
                    self.link.go_away(self.last_stream, e.reason, e.what);
                    self.going_away = true;
                    self.link.read_closed = true;
                    self.abort_all();
                }
            }
            while self.link.can_write() {
                match self.handling.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok((id, response)))) => {
                        progress = true;
                        self.respond(id, response);
                    }
                    // Reset meanwhile: the stream is gone already.
                    Poll::Ready(Some(Err(_))) => progress = true,
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            progress |= self.send_bodies(cx);
            let full = !self.link.can_write();
            match self.link.poll_write(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {
                    // Reading stopped while the buffer was full: read again now.
                    progress |= full;
                    if (self.link.read_closed || self.going_away) && self.streams.is_empty() {
                        return Poll::Ready(());
                    }
                }
                Poll::Pending => {}
            }
            if self.link.read_closed {
                if !self.going_away {
                    // The peer is gone: nobody is left to answer.
                    return Poll::Ready(());
                }
                // It said GOAWAY and closed its side: bodies still arriving never will.
                let before = self.streams.len();
                self.streams.retain(|_, s| !matches!(s.state, State::Receiving { .. }));
                if self.streams.len() < before {
                    progress = true;
                }
            }
            if !progress {
                if self.sweep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if !self.swept() {
                    return Poll::Ready(());
                }
            }
        }
    }

    /// A sweep: ends what the peer left idle or holds up, and sets the next; false when the
    /// connection is to be dropped.
    fn swept(&mut self) -> bool {
        if !self.link.wbuf.is_empty() && !std::mem::take(&mut self.link.wrote) {
            tracing::debug!("a multiplexed connection's peer read nothing for a whole sweep");
            return false;
        }
        self.link.wrote = false;
        let held_up: Vec<u32> = self
            .streams
            .iter_mut()
            .filter_map(|(&id, s)| {
                let waiting = matches!(s.state, State::Receiving { .. } | State::Sending { .. });
                (waiting && !std::mem::replace(&mut s.moved, false)).then_some(id)
            })
            .collect();
        for id in held_up {
            self.reset(id, Reason::CANCEL);
        }
        let opened = std::mem::take(&mut self.opened);
        if self.streams.is_empty() && !opened && !self.going_away {
            self.link.go_away(self.last_stream, Reason::NO_ERROR, "idle");
            self.going_away = true;
        }
        self.sweep.as_mut().reset(tokio::time::Instant::now() + SWEEP);
        true
    }

    fn read_frames(&mut self) -> Result<(), ConnError> {
        if !self.preface {
            let n = frame::PREFACE.len();
            let got = self.link.peek(n);
            if got.len() < n {
                return if frame::PREFACE.starts_with(got) {
                    Ok(())
                } else {
                    Err(super::conn_error(Reason::PROTOCOL_ERROR, "not the HTTP/2 preface"))
                };
            }
            if got != frame::PREFACE {
                return Err(super::conn_error(Reason::PROTOCOL_ERROR, "not the HTTP/2 preface"));
            }
            self.link.skip(n);
            self.preface = true;
        }
        while let Some(event) = self.link.next_event()? {
            self.on_event(event)?;
            // Streams ended by a reset, the peer's or ours (a stream the peer made malformed
            // after its handler started: "MadeYouReset"), outnumbering those answered.
            if self.resets > RESETS_FREE && self.resets > self.answered {
                return Err(super::conn_error(Reason::ENHANCE_YOUR_CALM, "too many streams reset"));
            }
        }
        Ok(())
    }

    fn on_event(&mut self, event: Event) -> Result<(), ConnError> {
        match event {
            Event::Headers { stream, fields, end_stream } => self.on_headers(stream, fields, end_stream)?,
            Event::Data { stream, data, end_stream, flow } => self.on_data(stream, data, end_stream, flow)?,
            Event::Reset { stream, .. } => {
                if stream > self.last_stream {
                    return Err(super::conn_error(Reason::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
                }
                if let Some(s) = self.streams.remove(&stream) {
                    self.give_back(&s);
                    if let State::Handling(abort) = s.state {
                        abort.abort();
                    }
                    self.resets += 1;
                }
            }
            Event::WindowUpdate { stream, increment } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.moved = true;
                    if increment == 0 {
                        self.reset(stream, Reason::PROTOCOL_ERROR);
                    } else {
                        s.window += i64::from(increment);
                        if s.window > frame::MAX_WINDOW {
                            self.reset(stream, Reason::FLOW_CONTROL_ERROR);
                        }
                    }
                }
            }
            Event::InitialWindow { delta } => {
                for s in self.streams.values_mut() {
                    s.window += delta;
                }
            }
            Event::GoAway { .. } => self.going_away = true,
        }
        Ok(())
    }

    fn on_headers(&mut self, id: u32, fields: Fields, end_stream: bool) -> Result<(), ConnError> {
        if let Some(s) = self.streams.get(&id) {
            // Trailers: they end the body (and are not passed on: the app is spoken to in
            // HTTP/1.1 with the body whole).
            if end_stream && matches!(s.state, State::Receiving { .. }) {
                self.finish_request(id);
            } else {
                self.reset(id, Reason::PROTOCOL_ERROR);
            }
            return Ok(());
        }
        if id.is_multiple_of(2) || id <= self.last_stream {
            return Err(super::conn_error(Reason::PROTOCOL_ERROR, "HEADERS on a stream not newly opened"));
        }
        self.last_stream = id;
        if self.going_away {
            return Ok(());
        }
        if self.streams.len() >= MAX_STREAMS {
            frame::put_rst_stream(&mut self.link.wbuf, id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let Some((head, length)) = request_head(&fields) else {
            frame::put_rst_stream(&mut self.link.wbuf, id, Reason::PROTOCOL_ERROR);
            return Ok(());
        };
        if length.is_some_and(|n| n > MAX_BODY as u64) {
            frame::put_rst_stream(&mut self.link.wbuf, id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let state = State::Receiving { head, length, body: BytesMut::new(), window: MAX_BODY as i64 };
        self.streams.insert(id, Stream { window: self.link.peer_initial, state, moved: true });
        self.opened = true;
        if end_stream {
            self.finish_request(id);
        }
        Ok(())
    }

    fn on_data(&mut self, id: u32, data: Bytes, end_stream: bool, flow: usize) -> Result<(), ConnError> {
        if id.is_multiple_of(2) || id > self.last_stream {
            return Err(super::conn_error(Reason::PROTOCOL_ERROR, "DATA on a stream never opened"));
        }
        let Some(Stream { state: State::Receiving { body, window, .. }, moved, .. }) =
            self.streams.get_mut(&id)
        else {
            // A stream that is closed or already answered: its window is given back at once.
            self.link.consume(flow);
            if !self.streams.contains_key(&id) {
                frame::put_rst_stream(&mut self.link.wbuf, id, Reason::STREAM_CLOSED);
            } else {
                self.reset(id, Reason::STREAM_CLOSED);
            }
            return Ok(());
        };
        *moved = true;
        *window -= flow as i64;
        if *window < 0 {
            self.reset(id, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        // Padding is given back now; the body's bytes when it is handed on.
        self.link.consume(flow - data.len());
        body.extend_from_slice(&data);
        if end_stream {
            self.finish_request(id);
        }
        Ok(())
    }

    /// The request is whole: checked against its declared length and handed to the handler.
    fn finish_request(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        let (abort, registration) = AbortHandle::new_pair();
        let State::Receiving { head, length, body, .. } =
            std::mem::replace(&mut s.state, State::Handling(abort))
        else {
            return;
        };
        self.link.consume(body.len());
        if length.is_some_and(|n| n != body.len() as u64) {
            self.reset(id, Reason::PROTOCOL_ERROR);
            return;
        }
        let body = (!body.is_empty()).then(|| body.freeze());
        let answer = (self.handler)(Request::from_parts(head, body));
        self.handling.push(Abortable::new(Tagged { stream: id, answer }, registration));
    }

    fn respond(&mut self, id: u32, response: Response<B>) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        self.answered += 1;
        let (parts, body) = response.into_parts();
        let mut block = Vec::with_capacity(256);
        hpack::put_field(&mut block, b":status", parts.status.as_str().as_bytes());
        for (name, value) in &parts.headers {
            put_header(&mut block, name, value);
        }
        if body.is_end_stream() {
            self.link.put_block(id, &block, true);
            self.streams.remove(&id);
            return;
        }
        self.link.put_block(id, &block, false);
        s.state = State::Sending { body, held: Bytes::new() };
    }

    /// Sends what the response bodies have, as far as the windows allow; whether anything
    /// moved.
    fn send_bodies(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut done: Vec<(u32, Option<Reason>)> = Vec::new();
        for (&id, s) in self.streams.iter_mut() {
            let State::Sending { body, held } = &mut s.state else { continue };
            loop {
                if !held.is_empty() {
                    let end = body.is_end_stream();
                    let sent = self.link.put_data(id, &mut s.window, held, end);
                    s.moved |= sent > 0;
                    let _ = held.split_to(sent);
                    if !held.is_empty() {
                        break; // waits for a window update
                    }
                    progress |= sent > 0 || end;
                    if end {
                        done.push((id, None));
                        break;
                    }
                }
                if !self.link.can_write() {
                    break;
                }
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => {
                        progress = true;
                        match f.into_data() {
                            Ok(data) if data.is_empty() && !body.is_end_stream() => {}
                            Ok(data) => *held = data,
                            Err(f) => {
                                if let Ok(trailers) = f.into_trailers() {
                                    let mut block = Vec::with_capacity(64);
                                    for (name, value) in &trailers {
                                        put_header(&mut block, name, value);
                                    }
                                    self.link.put_block(id, &block, true);
                                    done.push((id, None));
                                    break;
                                }
                            }
                        }
                        if held.is_empty() && body.is_end_stream() {
                            self.link.put_data(id, &mut s.window, &[], true);
                            done.push((id, None));
                            break;
                        }
                    }
                    Poll::Ready(None) => {
                        progress = true;
                        self.link.put_data(id, &mut s.window, &[], true);
                        done.push((id, None));
                        break;
                    }
                    Poll::Ready(Some(Err(_))) => {
                        progress = true;
                        done.push((id, Some(Reason::INTERNAL_ERROR)));
                        break;
                    }
                    Poll::Pending => {
                        // Waiting on the app, not on the peer.
                        s.moved = true;
                        break;
                    }
                }
            }
        }
        for (id, reason) in done {
            self.streams.remove(&id);
            if let Some(reason) = reason {
                // The app's body broke off.
                frame::put_rst_stream(&mut self.link.wbuf, id, reason);
            }
        }
        progress
    }

    /// Resets a stream of ours (a stream error, RFC 9113 §5.4.2).
    fn reset(&mut self, id: u32, reason: Reason) {
        if let Some(s) = self.streams.remove(&id) {
            self.give_back(&s);
            if let State::Handling(abort) = s.state {
                abort.abort();
            }
            self.resets += 1;
        }
        frame::put_rst_stream(&mut self.link.wbuf, id, reason);
    }

    /// A stream that ends while its body was arriving gives its bytes' window back.
    fn give_back(&mut self, s: &Stream<B>) {
        if let State::Receiving { body, .. } = &s.state {
            self.link.consume(body.len());
        }
    }

    fn abort_all(&mut self) {
        for (_, s) in self.streams.drain() {
            if let State::Handling(abort) = s.state {
                abort.abort();
            }
        }
    }
}

/// A request's head from its decoded fields (RFC 9113 §8.3.1): pseudo-header fields first,
/// `:method`, `:scheme` and `:path` once each, `:authority` at most once, regular fields
/// well formed; `None` makes the request malformed. Also returns its declared length.
fn request_head(fields: &Fields) -> Option<(http::request::Parts, Option<u64>)> {
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let mut headers = http::HeaderMap::with_capacity(fields.len());
    let mut length = None;
    let mut regular = false;
    for (name, value) in fields.iter() {
        if let Some(pseudo) = name.strip_prefix(b":") {
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                _ => return None,
            };
            if regular || slot.replace(value).is_some() {
                return None;
            }
            continue;
        }
        regular = true;
        let (name, value) = regular_field(fields, name, value)?;
        if name == http::header::CONTENT_LENGTH {
            // Values that differ make it malformed; one repeated reaches the app once.
            let n = parse_length(value.as_bytes())?;
            if let Some(m) = length.replace(n) {
                if m != n {
                    return None;
                }
                continue;
            }
        }
        headers.append(name, value);
    }
    let method = http::Method::from_bytes(method?).ok()?;
    let (scheme, path) = (scheme?, path?);
    if path.is_empty() {
        return None;
    }
    let mut uri = Uri::builder().path_and_query(path);
    if let Some(authority) = authority {
        uri = uri.scheme(scheme).authority(authority);
    }
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = method;
    head.uri = uri.build().ok()?;
    head.version = Version::HTTP_2;
    head.headers = headers;
    Some((head, length))
}
