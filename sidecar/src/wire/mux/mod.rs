//! The multiplexed hop between sidecars: HTTP/2 framing (RFC 9113) over the mTLS connection,
//! negotiated as ALPN [`ALPN`], one connection per peer and identity carrying every request
//! whose body is whole in hand (`client`), served by the callee in one task per connection
//! with no task per stream (`server`).
//!
//! Why not the HTTP/1.1 hop for these: a connection per request in flight makes every request
//! a write each way, however many are ready together; here what one scheduler round produced
//! for a peer (requests one way, responses the other) goes out in one write. Why not hyper's
//! HTTP/2: a task per stream and the h2 crate's per-frame work cost more than the batching
//! saved (measured; docs/decisions.md, "The multiplexed hop").
//!
//! What it carries is what the caller sends whole: a request body of at most [`MAX_BODY`]
//! bytes, sent with its head. A streamed body, an upgrade and everything a peer of an older
//! release sends go over HTTP/1.1 (or ALPN `h2`, served by hyper) as before, so the hop never
//! needs to stream a request to the app.
//!
//! This module holds what both ends share: the frame reader and the connection-level frames
//! ([`Link`]), header blocks written out, and the limits.

pub(crate) mod client;
pub(crate) mod fuzz;
pub(crate) mod server;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use skein_http2::frame::{
    self, flag, kind, setting, Head, Reason, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_WINDOW,
};
use skein_http2::hpack::{self, Decoder, Fields};
use tokio::io::{AsyncRead, AsyncWrite};

/// The ALPN protocol of the multiplexed hop. A callee that does not offer it (an older release)
/// picks `http/1.1`, and the caller uses that.
pub const ALPN: &[u8] = b"skein-h2";
/// The largest request body the hop carries; it is also each stream's receive window at the
/// callee, so a body never waits for a window update.
pub const MAX_BODY: usize = 64 * 1024;
/// The largest header block taken (HEADERS and its CONTINUATIONs), as the HTTP/1 paths' head.
const MAX_HEADER_BLOCK: usize = super::MAX_HEAD;
/// The largest decoded header list (name + value + 32 per field, as HTTP/2 counts it).
const MAX_HEADER_LIST: usize = super::MAX_HEAD + 32 * super::MAX_HEADERS;
/// The HPACK dynamic table either end may use (the protocol's default). Neither end's encoder
/// uses it (`hpack::put_field`), but a decoder must honour the size it announced.
const HEADER_TABLE: usize = 4096;
/// No more frames are produced while this much waits to be written.
const WRITE_HIGH: usize = 256 * 1024;
/// Read at most this much before answering what it held.
const READ_BUDGET: usize = 256 * 1024;

/// A connection error: the peer is told with GOAWAY and the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnError {
    pub reason: Reason,
    pub what: &'static str,
}

fn conn_error(reason: Reason, what: &'static str) -> ConnError {
    ConnError { reason, what }
}

/// What a peer's frames mean for streams (connection-level frames are handled by [`Link`]).
#[derive(Debug)]
pub(crate) enum Event {
    /// A whole header block (HEADERS and any CONTINUATIONs), decoded.
    Headers {
        stream: u32,
        fields: Fields,
        end_stream: bool,
    },
    /// `flow` is what the frame counts against the receive windows (padding included).
    Data {
        stream: u32,
        data: Bytes,
        end_stream: bool,
        flow: usize,
    },
    Reset {
        stream: u32,
        reason: Reason,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE moved every open stream's send window by this.
    InitialWindow {
        delta: i64,
    },
    GoAway {
        last_stream: u32,
    },
}

/// A header block waiting for its CONTINUATION frames.
struct Pending {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// One end of a connection: the socket, what was read and is to be written, the HPACK
/// decoder, and the connection-level state of RFC 9113 (settings, PING, the connection's
/// windows).
pub(crate) struct Link<S> {
    pub io: S,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    decoder: Decoder,
    pending: Option<Pending>,
    /// The connection's send window: what the peer lets us send.
    pub send_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE (each new stream's send window).
    pub peer_initial: i64,
    pub peer_max_frame: usize,
    pub peer_max_streams: usize,
    /// What the peer may still send on the connection, and what has been consumed since the
    /// last update (given back once it is half the window).
    recv_window: i64,
    recv_target: i64,
    consumed: i64,
    /// The peer closed its side, or the socket failed.
    pub read_closed: bool,
    /// Bytes went out since the owner last cleared it.
    pub wrote: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// A link whose first bytes to write are `preface` (the client's preface, or nothing) and
    /// our SETTINGS; `recv_target` is the connection window we keep open for the peer.
    pub fn new(io: S, preface: &[u8], settings: &[(u16, u32)], recv_target: i64) -> Self {
        let mut wbuf = BytesMut::with_capacity(16 * 1024);
        wbuf.extend_from_slice(preface);
        frame::put_settings(&mut wbuf, settings);
        let default = frame::DEFAULT_WINDOW;
        if recv_target > default {
            frame::put_window_update(&mut wbuf, 0, (recv_target - default) as u32);
        }
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf,
            decoder: Decoder::new(HEADER_TABLE),
            pending: None,
            send_window: default,
            peer_initial: default,
            peer_max_frame: DEFAULT_MAX_FRAME,
            peer_max_streams: usize::MAX,
            recv_window: recv_target,
            recv_target,
            consumed: 0,
            read_closed: false,
            wrote: false,
        }
    }

    /// Whether a frame-sized write can be queued without passing the high-water mark.
    pub fn can_write(&self) -> bool {
        self.wbuf.len() < WRITE_HIGH
    }

    /// Reads what the socket holds (up to [`READ_BUDGET`]); `Ready(true)` when anything was
    /// read or the peer closed.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.read_closed {
            return Poll::Pending;
        }
        let mut read = 0;
        while read < READ_BUDGET {
            self.rbuf.reserve(super::READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    self.read_closed = true;
                    return Poll::Ready(true);
                }
                Poll::Ready(Ok(n)) => read += n,
                Poll::Pending if read == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(true)
    }

    /// Writes what is queued and flushes; `Ready(Err)` when the socket failed.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.wbuf.advance(n);
                    self.wrote = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.wbuf.capacity() > 64 * 1024 {
            // A burst's buffer is not kept by an idle connection.
            self.wbuf = BytesMut::new();
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Up to `n` bytes of what was read and not yet taken.
    pub fn peek(&self, n: usize) -> &[u8] {
        &self.rbuf[..n.min(self.rbuf.len())]
    }

    pub fn skip(&mut self, n: usize) {
        self.rbuf.advance(n);
    }

    /// Gives back `n` bytes of connection window the owner has consumed.
    pub fn consume(&mut self, n: usize) {
        self.consumed += n as i64;
        if self.consumed >= self.recv_target / 2 {
            frame::put_window_update(&mut self.wbuf, 0, self.consumed as u32);
            self.recv_window += self.consumed;
            self.consumed = 0;
        }
    }

    /// The next stream event in what was read (`Ok(None)`: more bytes are needed). Frames
    /// for the connection are answered here.
    pub fn next_event(&mut self) -> Result<Option<Event>, ConnError> {
        loop {
            if self.rbuf.len() < HEADER_LEN {
                return Ok(None);
            }
            let head = Head::parse(&self.rbuf[..HEADER_LEN]);
            if head.len > DEFAULT_MAX_FRAME {
                return Err(conn_error(
                    Reason::FRAME_SIZE_ERROR,
                    "a frame larger than SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.rbuf.len() < HEADER_LEN + head.len {
                return Ok(None);
            }
            self.rbuf.advance(HEADER_LEN);
            let payload = self.rbuf.split_to(head.len).freeze();
            if let Some(event) = self.frame(head, payload)? {
                return Ok(Some(event));
            }
        }
    }

    fn frame(&mut self, head: Head, payload: Bytes) -> Result<Option<Event>, ConnError> {
        let protocol = |what| Err(conn_error(Reason::PROTOCOL_ERROR, what));
        if let Some(p) = &self.pending {
            if head.kind != kind::CONTINUATION || head.stream != p.stream {
                return protocol("a header block was interrupted");
            }
        }
        match head.kind {
            kind::DATA => {
                if head.stream == 0 {
                    return protocol("DATA on stream 0");
                }
                self.recv_window -= head.len as i64;
                if self.recv_window < 0 {
                    return Err(conn_error(
                        Reason::FLOW_CONTROL_ERROR,
                        "DATA beyond the connection's window",
                    ));
                }
                let Some(range) = frame::unpadded(&head, &payload) else {
                    return protocol("padding longer than the frame");
                };
                Ok(Some(Event::Data {
                    stream: head.stream,
                    data: payload.slice(range),
                    end_stream: head.has(flag::END_STREAM),
                    flow: head.len,
                }))
            }
            kind::HEADERS => {
                if head.stream == 0 {
                    return protocol("HEADERS on stream 0");
                }
                let Some(mut range) = frame::unpadded(&head, &payload) else {
                    return protocol("padding longer than the frame");
                };
                if head.has(flag::PRIORITY) {
                    if range.len() < 5 {
                        return protocol("HEADERS too short for its priority");
                    }
                    range.start += 5;
                }
                let pending = Pending {
                    stream: head.stream,
                    end_stream: head.has(flag::END_STREAM),
                    block: payload[range].to_vec(),
                };
                self.continue_block(pending, head.has(flag::END_HEADERS))
            }
            kind::CONTINUATION => {
                let Some(mut pending) = self.pending.take() else {
                    return protocol("CONTINUATION without a header block");
                };
                pending.block.extend_from_slice(&payload);
                self.continue_block(pending, head.has(flag::END_HEADERS))
            }
            kind::PRIORITY => {
                if head.stream == 0 || head.len != 5 {
                    return protocol("a malformed PRIORITY frame");
                }
                Ok(None)
            }
            kind::RST_STREAM => {
                if head.stream == 0 || head.len != 4 {
                    return protocol("a malformed RST_STREAM frame");
                }
                let reason = Reason(u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]));
                Ok(Some(Event::Reset { stream: head.stream, reason }))
            }
            kind::SETTINGS => self.settings(head, &payload),
            kind::PUSH_PROMISE => protocol("PUSH_PROMISE (push is not enabled)"),
            kind::PING => {
                if head.stream != 0 || head.len != 8 {
                    return protocol("a malformed PING frame");
                }
                if !head.has(flag::ACK) {
                    let mut data = [0u8; 8];
                    data.copy_from_slice(&payload);
                    frame::put_ping(&mut self.wbuf, data, true);
                }
                Ok(None)
            }
            kind::GOAWAY => {
                if head.stream != 0 || head.len < 8 {
                    return protocol("a malformed GOAWAY frame");
                }
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                Ok(Some(Event::GoAway { last_stream: last }))
            }
            kind::WINDOW_UPDATE => {
                if head.len != 4 {
                    return Err(conn_error(Reason::FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE frame"));
                }
                let increment =
                    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff;
                if head.stream != 0 {
                    return Ok(Some(Event::WindowUpdate { stream: head.stream, increment }));
                }
                if increment == 0 {
                    return protocol("a WINDOW_UPDATE of 0 for the connection");
                }
                self.send_window += i64::from(increment);
                if self.send_window > MAX_WINDOW {
                    return Err(conn_error(Reason::FLOW_CONTROL_ERROR, "the connection's window overflowed"));
                }
                Ok(None)
            }
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(None),
        }
    }

    fn continue_block(&mut self, pending: Pending, end: bool) -> Result<Option<Event>, ConnError> {
        if pending.block.len() > MAX_HEADER_BLOCK {
            return Err(conn_error(Reason::ENHANCE_YOUR_CALM, "a header block larger than the limit"));
        }
        if !end {
            self.pending = Some(pending);
            return Ok(None);
        }
        // Decoded even for a stream that will be refused: the table must stay in step.
        let fields = self.decoder.decode(&pending.block, MAX_HEADER_LIST).map_err(|e| match e {
            hpack::HpackError::ListTooLarge => {
                conn_error(Reason::ENHANCE_YOUR_CALM, "a header list larger than the limit")
            }
            _ => conn_error(Reason::COMPRESSION_ERROR, "a header block that does not decode"),
        })?;
        Ok(Some(Event::Headers { stream: pending.stream, fields, end_stream: pending.end_stream }))
    }

    fn settings(&mut self, head: Head, payload: &[u8]) -> Result<Option<Event>, ConnError> {
        if head.stream != 0 {
            return Err(conn_error(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            return match head.len {
                0 => Ok(None),
                _ => Err(conn_error(Reason::FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")),
            };
        }
        if !head.len.is_multiple_of(6) {
            return Err(conn_error(
                Reason::FRAME_SIZE_ERROR,
                "a SETTINGS frame of a length not a multiple of 6",
            ));
        }
        let mut delta = 0i64;
        for entry in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match id {
                setting::INITIAL_WINDOW_SIZE => {
                    if i64::from(value) > MAX_WINDOW {
                        return Err(conn_error(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    delta += i64::from(value) - self.peer_initial;
                    self.peer_initial = i64::from(value);
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME as u32..1 << 24).contains(&value) {
                        return Err(conn_error(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    self.peer_max_frame = value as usize;
                }
                setting::MAX_CONCURRENT_STREAMS => self.peer_max_streams = value as usize,
                setting::ENABLE_PUSH if value > 1 => {
                    return Err(conn_error(Reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1"));
                }
                _ => {}
            }
        }
        frame::put_settings_ack(&mut self.wbuf);
        Ok((delta != 0).then_some(Event::InitialWindow { delta }))
    }

    /// Queues a header block as HEADERS and, past the peer's frame size, CONTINUATIONs.
    pub fn put_block(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        let max = self.peer_max_frame;
        if block.len() <= max {
            frame::put_headers(&mut self.wbuf, stream, block, end_stream);
            return;
        }
        let mut chunks = block.chunks(max).peekable();
        let first = chunks.next().unwrap_or_default();
        let end = if end_stream { flag::END_STREAM } else { 0 };
        frame::put_head(&mut self.wbuf, first.len(), kind::HEADERS, end, stream);
        self.wbuf.extend_from_slice(first);
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            frame::put_head(
                &mut self.wbuf,
                chunk.len(),
                kind::CONTINUATION,
                if last { flag::END_HEADERS } else { 0 },
                stream,
            );
            self.wbuf.extend_from_slice(chunk);
        }
    }

    /// Queues as much of `data` as the windows and frame size allow, as DATA frames, the
    /// last with END_STREAM when `end_stream` and all of it went; returns what went.
    pub fn put_data(&mut self, stream: u32, window: &mut i64, data: &[u8], end_stream: bool) -> usize {
        let mut sent = 0;
        loop {
            let room = self.send_window.min(*window).max(0) as usize;
            let n = (data.len() - sent).min(room).min(self.peer_max_frame);
            let last = sent + n == data.len();
            if n == 0 && !(last && end_stream) {
                return sent;
            }
            frame::put_data(&mut self.wbuf, stream, &data[sent..sent + n], last && end_stream);
            self.send_window -= n as i64;
            *window -= n as i64;
            sent += n;
            if last {
                return sent;
            }
        }
    }

    /// Ends the connection for `e`: GOAWAY naming the last stream taken.
    pub fn go_away(&mut self, last_stream: u32, reason: Reason, what: &str) {
        frame::put_goaway(&mut self.wbuf, last_stream, reason, what);
    }
}

/// Appends `name: value` to a header block; `false` when the field may not cross HTTP/2
/// (connection-specific, RFC 9113 §8.2.2), so it was left out.
pub(crate) fn put_header(block: &mut Vec<u8>, name: &http::HeaderName, value: &http::HeaderValue) -> bool {
    if skein_http2::connection_specific(name.as_str().as_bytes(), value.as_bytes()) {
        return false;
    }
    hpack::put_field(block, name.as_str().as_bytes(), value.as_bytes());
    true
}

/// A connection's streams by id.
pub(crate) type Streams<V> = std::collections::HashMap<u32, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Stream ids spread by a multiplication: SipHash's defence against chosen keys buys nothing in
/// a map of at most a connection's concurrent streams (a peer choosing colliding ids slows its
/// own connection's lookups, by at most that many), and costs most of a lookup.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

/// 2^64 / φ, odd.
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The product's middle bits, the best mixed, serve both as the bucket and as the tag.
        self.0.rotate_left(32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(MIX);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(MIX);
    }
}

/// A regular field as received: its name must be lowercase and a token, its value free of
/// CR, LF and NUL, and it must not be connection-specific; `None` makes the message malformed.
/// The value shares the list's buffer.
pub(crate) fn regular_field(
    fields: &Fields,
    name: &[u8],
    value: &[u8],
) -> Option<(http::HeaderName, http::HeaderValue)> {
    if name.iter().any(u8::is_ascii_uppercase) || skein_http2::connection_specific(name, value) {
        return None;
    }
    let name = match crate::headers::ours(name) {
        Some(ours) => ours.clone(),
        None => http::HeaderName::from_bytes(name).ok()?,
    };
    let value = http::HeaderValue::from_maybe_shared(fields.share(value)).ok()?;
    Some((name, value))
}

#[cfg(test)]
mod tests;
