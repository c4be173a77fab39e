//! A small HTTP/2 server (RFC 9113) for the config stream: one request at a time per
//! connection, answered with a long-lived response whose body the caller streams, the request
//! body handed to the caller as it arrives.
//!
//! Why not hyper's server: the h2 crate under it holds about 28 KiB per connection whatever the
//! traffic (a 16 KiB write buffer, an 8 KiB read buffer, a 4 KiB HPACK buffer) and hyper adds
//! a task per stream; with 5,000 proxies connected that was most of the operator's memory
//! (docs/decisions.md, "The config stream's HTTP/2 server"). Here an idle connection holds no
//! buffer: a read lands on the stack of one poll, the read and write buffers exist only while
//! bytes are in them, and a connection is one task.
//!
//! What a client may do is bounded: one open stream (SETTINGS_MAX_CONCURRENT_STREAMS 1, others
//! refused) and [`MAX_STREAMS`] in the connection's life, header blocks of at most [`MAX_HEADER_BLOCK`] bytes (CONTINUATION included), our
//! receive windows enforced, at most [`OUT_LIMIT`] bytes of answers (SETTINGS and PING
//! acknowledgements, resets) queued for a peer that does not read, no stream open for
//! 10 s (before the first request or after the last) and a PING unanswered for 20 s end the
//! connection ([`Timers`]); a client's GOAWAY lets the open stream finish. A
//! protocol error ends the connection with GOAWAY and the error's code.

pub use skein_http2::{frame, hpack};

use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use frame::{flag, kind, setting, Head, Reason, DEFAULT_MAX_FRAME, DEFAULT_WINDOW, HEADER_LEN, MAX_WINDOW};

/// A response body: the pieces to send, in order; its end ends the stream.
pub type BodyStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// Where a request's body goes, piece by piece, as it arrives.
pub trait RequestSink: Send {
    /// Takes a piece of the body; `false` resets the stream (the piece broke a rule of the
    /// protocol carried inside, e.g. a line too long).
    fn data(&mut self, data: &[u8]) -> bool;

    /// Bytes it holds that are not yet a whole message (an unfinished line): held for longer
    /// than [`Timers::partial_request`], they reset the stream.
    fn held(&self) -> usize {
        0
    }
}

/// The answer to a request.
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: BodyStream,
    /// Takes the request's body; without one it is read and dropped.
    pub sink: Option<Box<dyn RequestSink>>,
}

impl Reply {
    /// A short plain-text answer.
    pub fn text(status: StatusCode, text: &str) -> Self {
        let body = Bytes::from(format!("{text}\n"));
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Box::pin(futures::stream::once(std::future::ready(body))),
            sink: None,
        }
    }
}

/// The largest header block a request may carry (HEADERS and its CONTINUATIONs).
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// The largest decoded header list (SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// SETTINGS_HEADER_TABLE_SIZE: the default, so a client may index from its first request on.
const HEADER_TABLE: usize = 4096;
/// The connection's clocks.
#[derive(Debug, Clone, Copy)]
pub struct Timers {
    /// Without anything read for this long, a PING goes out.
    pub keepalive: Duration,
    /// A PING unanswered for this long ends the connection.
    pub keepalive_timeout: Duration,
    /// A connection with no stream open for this long ends (before its first request, or
    /// after its last).
    pub first_request: Duration,
    /// After shutdown, how long the open stream has to end.
    pub grace: Duration,
    /// How long the request's sink may hold an unfinished message (a proxy writes each line
    /// whole; one that trickles a line in to hold its buffer is reset).
    pub partial_request: Duration,
    /// How often the clocks are looked at.
    pub tick: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            first_request: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            partial_request: Duration::from_secs(10),
            tick: Duration::from_secs(2),
        }
    }
}
/// No more response DATA is queued while this much waits to be written.
const OUT_HIGH: usize = 16 * 1024;
/// More than this queued (the peer makes us answer and does not read) ends the connection.
pub const OUT_LIMIT: usize = 256 * 1024;
/// Receive windows are topped up once this much of them is used.
const WINDOW_UPDATE_AT: i64 = 32 * 1024;
/// Read this much at a time.
const READ_CHUNK: usize = 4096;
/// Frames that move nothing forward (an empty CONTINUATION or DATA, PING, SETTINGS, PRIORITY,
/// WINDOW_UPDATE, RST_STREAM, an unknown type) one connection may send between two looks at
/// the clock ([`Timers::tick`], 2 s): about 5,000 a second, far above what a client needs and
/// far below a flood (one sent 2.6 million empty CONTINUATIONs a second). Past it, GOAWAY
/// `ENHANCE_YOUR_CALM`.
pub const MAX_IDLE_FRAMES: u32 = 10_000;
/// Streams one connection may open in all. A proxy opens one per connection; a client that
/// opens and resets streams in a loop (each a session started and torn down) is cut off.
pub const MAX_STREAMS: u32 = 32;

#[derive(Debug)]
pub enum ConnError {
    Io(std::io::Error),
    /// The peer broke the protocol; it is told with GOAWAY.
    Protocol(Reason, &'static str),
    Timeout(&'static str),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Protocol(reason, what) => write!(f, "{what} (HTTP/2 error {:#x})", reason.0),
            Self::Timeout(what) => f.write_str(what),
        }
    }
}

fn protocol(reason: Reason, what: &'static str) -> ConnError {
    ConnError::Protocol(reason, what)
}

/// Serves one connection until the peer closes it, breaks the protocol, stops answering
/// PINGs, or `shutdown` fires (GOAWAY, then up to [`Timers::grace`] for the open stream to end).
pub async fn serve<IO, H>(io: IO, handler: H, shutdown: CancellationToken) -> Result<(), ConnError>
where
    IO: AsyncRead + AsyncWrite,
    H: FnMut(http::Request<()>) -> Reply,
{
    serve_with(io, handler, shutdown, Timers::default()).await
}

pub async fn serve_with<IO, H>(
    io: IO,
    mut handler: H,
    shutdown: CancellationToken,
    timers: Timers,
) -> Result<(), ConnError>
where
    IO: AsyncRead + AsyncWrite,
    H: FnMut(http::Request<()>) -> Reply,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut conn = Conn::new();
    let mut out = BytesMut::new();
    frame::put_settings(
        &mut out,
        &[(setting::MAX_CONCURRENT_STREAMS, 1), (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32)],
    );
    let mut rbuf: Vec<u8> = Vec::new();
    let mut unflushed = false;
    // Since when no stream has been open (from the start, until the first request).
    let mut idle_since: Option<Instant> = Some(Instant::now());
    let mut grace: Option<Instant> = None;
    let tick = tokio::time::sleep(timers.tick);
    tokio::pin!(tick);
    let result: Result<(), ConnError> = loop {
        conn.fill(&mut out);
        let ending = grace.is_some() || conn.peer_gone;
        if ending && conn.answered() && out.is_empty() && !unflushed {
            break Ok(());
        }
        // A stream whose answer has ended does not keep the connection: its request side may
        // linger, but not past the same clock as a connection without a stream.
        if !conn.answered() {
            idle_since = None;
        } else {
            idle_since.get_or_insert_with(Instant::now);
        }
        let want_body = out.len() < OUT_HIGH && conn.wants_body();
        tokio::select! {
            read = read_some(&mut rd, &mut rbuf) => match read {
                Ok(0) => break Ok(()),
                Ok(_) => {
                    conn.last_read = Instant::now();
                    match conn.process(&rbuf, &mut out, &mut handler) {
                        Ok(used) => {
                            rbuf.drain(..used);
                            if rbuf.is_empty() {
                                // An idle connection holds no read buffer.
                                rbuf = Vec::new();
                            }
                        }
                        Err(stop) => break Err(stop),
                    }
                }
                Err(e) => break Err(ConnError::Io(e)),
            },
            written = write_some(&mut wr, &out), if !out.is_empty() || unflushed => match written {
                Ok(0) if out.is_empty() => unflushed = false,
                Ok(0) => break Err(ConnError::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    out.advance(n);
                    unflushed = true;
                    if out.is_empty() {
                        out = BytesMut::new();
                    }
                }
                Err(e) => break Err(ConnError::Io(e)),
            },
            item = next_item(&mut conn.active), if want_body => conn.body_item(item, &mut out),
            _ = shutdown.cancelled(), if grace.is_none() => {
                conn.draining = true;
                frame::put_goaway(&mut out, conn.last_stream, Reason::NO_ERROR, "");
                grace = Some(Instant::now() + timers.grace);
            }
            _ = &mut tick => {
                let now = Instant::now();
                conn.idle_frames = 0;
                // A message trickled in to hold the sink's buffer: the stream is reset, and
                // with it what the sink held (then the connection has no stream, and ends).
                let stalled = conn.active.as_ref().filter(|s| {
                    s.partial_since.is_some_and(|since| now - since >= timers.partial_request)
                });
                if let Some(id) = stalled.map(|s| s.id) {
                    conn.reset(&mut out, id, Reason::ENHANCE_YOUR_CALM);
                }
                if grace.is_some_and(|g| now >= g) {
                    break Ok(());
                }
                // A connection is for a stream: without one open for as long as a first
                // request may take, it ends (a client that opened one and let it end does
                // not keep the connection for nothing).
                if grace.is_none() && idle_since.is_some_and(|i| now - i >= timers.first_request) {
                    break Err(ConnError::Timeout("no stream open for the first seconds"));
                }
                match conn.ping_sent {
                    Some(sent) if now - sent >= timers.keepalive_timeout => {
                        break Err(ConnError::Timeout("a PING went unanswered"));
                    }
                    None if now - conn.last_read >= timers.keepalive => {
                        frame::put_ping(&mut out, *b"skeinka!", false);
                        conn.ping_sent = Some(now);
                    }
                    _ => {}
                }
                tick.as_mut().reset(now + timers.tick);
            }
        }
    };
    // What is queued still goes, then a protocol error's GOAWAY; a peer that does not take
    // them within a second is not waited for.
    if let Err(ConnError::Protocol(reason, what)) = &result {
        frame::put_goaway(&mut out, conn.last_stream, *reason, what);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        wr.write_all(&out).await?;
        wr.shutdown().await
    })
    .await;
    result
}

/// Reads what is there, up to [`READ_CHUNK`], onto the end of `buf`. The chunk is on the
/// stack of one poll, so a connection waiting to read holds no buffer: one reserved before
/// waiting would be held by every idle connection (20 MiB at 5,000), and one sized for a frame
/// header alone would cost a second read for every frame.
fn read_some<'a, R: AsyncRead + Unpin>(
    rd: &'a mut R,
    buf: &'a mut Vec<u8>,
) -> impl std::future::Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        let mut chunk = [0u8; READ_CHUNK];
        let mut read = tokio::io::ReadBuf::new(&mut chunk);
        std::task::ready!(Pin::new(&mut *rd).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(read.filled().len()))
    })
}

/// Writes some of `out`, or flushes when it is empty.
async fn write_some<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> std::io::Result<usize> {
    if out.is_empty() {
        wr.flush().await?;
        return Ok(0);
    }
    wr.write(out).await
}

async fn next_item(active: &mut Option<Open>) -> Option<Bytes> {
    match active.as_mut().and_then(|s| s.body.as_mut()) {
        Some(body) => body.next().await,
        None => std::future::pending().await,
    }
}

/// The open stream.
struct Open {
    id: u32,
    /// What we may still send on it.
    send_window: i64,
    /// What the peer may still send on it, and what it sent since the last WINDOW_UPDATE.
    recv_window: i64,
    recv_used: i64,
    /// `None` once it has ended (END_STREAM queued).
    body: Option<BodyStream>,
    /// A piece of the body the windows have not let out whole.
    pending: Option<Bytes>,
    sink: Option<Box<dyn RequestSink>>,
    /// The peer's side ended (END_STREAM received).
    remote_closed: bool,
    /// The request's `content-length`, and the DATA received against it (RFC 9113 §8.1.1).
    content_length: Option<u64>,
    received: u64,
    /// Since when its sink has held an unfinished message.
    partial_since: Option<Instant>,
}

/// How a stream the peer opened was closed: what a frame that still arrives on it earns
/// (RFC 9113 §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    /// We reset or refused it (or ended it while the peer was still sending): the peer may
    /// have sent frames before it heard, so they are ignored.
    ByUs,
    /// The peer reset it: a stream error `STREAM_CLOSED`.
    ByPeer,
    /// Both sides ended it: a connection error `STREAM_CLOSED`.
    Ended,
}

/// A header block whose CONTINUATIONs are still to come.
struct Continuation {
    stream: u32,
    end_stream: bool,
    /// Its HEADERS named the stream itself as its dependency (a stream error, §5.3.1).
    self_dependent: bool,
    block: Vec<u8>,
}

struct Conn {
    decoder: hpack::Decoder,
    preface_seen: bool,
    settings_seen: bool,
    /// What we may still send on the connection.
    send_window: i64,
    /// SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE as the peer set them.
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// What the peer may still send on the connection, and what it sent since the last
    /// WINDOW_UPDATE.
    recv_window: i64,
    recv_used: i64,
    /// The highest stream the peer opened, and how many it opened.
    last_stream: u32,
    opened: u32,
    continuation: Option<Continuation>,
    active: Option<Open>,
    /// The streams the peer opened that are closed, and how. A connection opens at most
    /// [`MAX_STREAMS`], so this holds them all; an id at or below `last_stream` that is not
    /// here was never opened (it closed when a higher one opened, §5.1.1).
    closed: Vec<(u32, Closed)>,
    last_read: Instant,
    ping_sent: Option<Instant>,
    /// GOAWAY sent: no new streams.
    draining: bool,
    /// The peer sent GOAWAY: the open stream may finish, then the connection ends.
    peer_gone: bool,
    /// Frames that moved nothing forward since the clock was last looked at.
    idle_frames: u32,
}

impl Conn {
    fn new() -> Self {
        Self {
            decoder: hpack::Decoder::new(HEADER_TABLE),
            preface_seen: false,
            settings_seen: false,
            send_window: DEFAULT_WINDOW,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: DEFAULT_MAX_FRAME,
            recv_window: DEFAULT_WINDOW,
            recv_used: 0,
            last_stream: 0,
            opened: 0,
            continuation: None,
            active: None,
            closed: Vec::new(),
            last_read: Instant::now(),
            ping_sent: None,
            draining: false,
            peer_gone: false,
            idle_frames: 0,
        }
    }

    fn wants_body(&self) -> bool {
        self.active.as_ref().is_some_and(|s| s.body.is_some() && s.pending.is_none())
    }

    /// Queues what the windows let out of the open stream's pending piece.
    fn fill(&mut self, out: &mut BytesMut) {
        let Some(s) = self.active.as_mut() else { return };
        while out.len() < OUT_HIGH {
            let Some(piece) = s.pending.as_mut() else { return };
            let n =
                (piece.len() as i64).min(self.send_window).min(s.send_window).min(self.peer_max_frame as i64);
            if n <= 0 {
                return;
            }
            let n = n as usize;
            frame::put_data(out, s.id, &piece[..n], false);
            piece.advance(n);
            self.send_window -= n as i64;
            s.send_window -= n as i64;
            if piece.is_empty() {
                s.pending = None;
            }
        }
    }

    /// The body's next piece, or its end: END_STREAM. The stream is done if the peer's side
    /// has ended too; otherwise it stays half-closed (local) and the peer's DATA and trailers
    /// are still taken and checked, until it ends its side or resets (a new request on the
    /// connection ends it at once).
    fn body_item(&mut self, item: Option<Bytes>, out: &mut BytesMut) {
        let Some(s) = self.active.as_mut().filter(|s| s.body.is_some()) else { return };
        match item {
            Some(piece) if piece.is_empty() => {}
            Some(piece) => s.pending = Some(piece),
            None => {
                frame::put_data(out, s.id, &[], true);
                s.body = None;
                s.pending = None;
                if s.remote_closed {
                    let id = s.id;
                    self.close(id, Closed::Ended);
                }
            }
        }
    }

    /// Whether the open stream, if any, has sent all it will (its answer ended).
    fn answered(&self) -> bool {
        self.active.as_ref().is_none_or(|s| s.body.is_none() && s.pending.is_none())
    }

    /// Handles the whole frames at the start of `buf`; returns how many bytes they took.
    fn process<H>(&mut self, buf: &[u8], out: &mut BytesMut, handler: &mut H) -> Result<usize, ConnError>
    where
        H: FnMut(http::Request<()>) -> Reply,
    {
        let mut pos = 0;
        if !self.preface_seen {
            let n = buf.len().min(frame::PREFACE.len());
            if buf[..n] != frame::PREFACE[..n] {
                return Err(protocol(Reason::PROTOCOL_ERROR, "not an HTTP/2 connection preface"));
            }
            if n < frame::PREFACE.len() {
                return Ok(0);
            }
            self.preface_seen = true;
            pos = n;
        }
        while buf.len() - pos >= HEADER_LEN {
            let head = Head::parse(&buf[pos..]);
            if head.len > DEFAULT_MAX_FRAME {
                return Err(protocol(Reason::FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE"));
            }
            if buf.len() - pos - HEADER_LEN < head.len {
                break;
            }
            let payload = &buf[pos + HEADER_LEN..pos + HEADER_LEN + head.len];
            pos += HEADER_LEN + head.len;
            self.frame(head, payload, out, handler)?;
        }
        if out.len() > OUT_LIMIT {
            return Err(protocol(Reason::ENHANCE_YOUR_CALM, "the peer does not read what it asks for"));
        }
        Ok(pos)
    }

    fn frame<H>(
        &mut self,
        head: Head,
        payload: &[u8],
        out: &mut BytesMut,
        handler: &mut H,
    ) -> Result<(), ConnError>
    where
        H: FnMut(http::Request<()>) -> Reply,
    {
        if !self.settings_seen && head.kind != kind::SETTINGS {
            return Err(protocol(Reason::PROTOCOL_ERROR, "the first frame must be SETTINGS"));
        }
        if let Some(c) = &self.continuation {
            if head.kind != kind::CONTINUATION || head.stream != c.stream {
                return Err(protocol(Reason::PROTOCOL_ERROR, "expected CONTINUATION"));
            }
        }
        let moves_nothing = match head.kind {
            kind::DATA => payload.is_empty() && !head.has(flag::END_STREAM),
            kind::CONTINUATION => payload.is_empty() && !head.has(flag::END_HEADERS),
            kind::HEADERS | kind::GOAWAY | kind::PUSH_PROMISE => false,
            _ => true,
        };
        if moves_nothing {
            self.idle_frames += 1;
            if self.idle_frames > MAX_IDLE_FRAMES {
                return Err(protocol(Reason::ENHANCE_YOUR_CALM, "too many frames that move nothing forward"));
            }
        }
        match head.kind {
            kind::DATA => self.data(head, payload, out)?,
            kind::HEADERS => {
                if head.stream == 0 || head.stream.is_multiple_of(2) {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "HEADERS on a stream a client cannot open"));
                }
                let range =
                    frame::unpadded(&head, payload).ok_or(protocol(Reason::PROTOCOL_ERROR, "bad padding"))?;
                let mut block = &payload[range];
                let mut self_dependent = false;
                if head.has(flag::PRIORITY) {
                    let dependency =
                        block.get(..4).ok_or(protocol(Reason::FRAME_SIZE_ERROR, "short HEADERS"))?;
                    self_dependent = depends_on(dependency) == head.stream;
                    block = block.get(5..).ok_or(protocol(Reason::FRAME_SIZE_ERROR, "short HEADERS"))?;
                }
                let end_stream = head.has(flag::END_STREAM);
                if head.has(flag::END_HEADERS) {
                    self.headers(head.stream, end_stream, self_dependent, block, out, handler)?;
                } else {
                    self.continuation = Some(Continuation {
                        stream: head.stream,
                        end_stream,
                        self_dependent,
                        block: block.to_vec(),
                    });
                }
            }
            kind::CONTINUATION => {
                let Some(mut c) = self.continuation.take() else {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                if c.block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(protocol(Reason::ENHANCE_YOUR_CALM, "header block too large"));
                }
                c.block.extend_from_slice(payload);
                if head.has(flag::END_HEADERS) {
                    self.headers(c.stream, c.end_stream, c.self_dependent, &c.block, out, handler)?;
                } else {
                    self.continuation = Some(c);
                }
            }
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                let open = self.active.as_ref().is_some_and(|s| s.id == head.stream);
                if head.len != 5 {
                    // A stream error (§6.3), but a reset may not name a stream in the idle
                    // state (§6.4): on any stream but the open one, the connection's error.
                    if !open {
                        return Err(protocol(Reason::FRAME_SIZE_ERROR, "PRIORITY of a wrong size"));
                    }
                    self.reset(out, head.stream, Reason::FRAME_SIZE_ERROR);
                } else if depends_on(payload) == head.stream {
                    // A stream may not depend on itself (§5.3.1): a stream error on an open
                    // stream; on any other, whose state a reset may not touch, the connection's.
                    if open {
                        self.reset(out, head.stream, Reason::PROTOCOL_ERROR);
                    } else {
                        return Err(protocol(Reason::PROTOCOL_ERROR, "a stream depending on itself"));
                    }
                }
            }
            kind::RST_STREAM => {
                if head.stream == 0 || head.stream > self.last_stream {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "RST_STREAM on a stream never opened"));
                }
                if head.len != 4 {
                    return Err(protocol(Reason::FRAME_SIZE_ERROR, "RST_STREAM of a wrong size"));
                }
                if self.active.as_ref().is_some_and(|s| s.id == head.stream) {
                    self.close(head.stream, Closed::ByPeer);
                }
            }
            kind::SETTINGS => self.settings(head, payload, out)?,
            kind::PUSH_PROMISE => return Err(protocol(Reason::PROTOCOL_ERROR, "a client cannot push")),
            kind::PING => {
                if head.stream != 0 {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                let payload: [u8; 8] = payload
                    .try_into()
                    .map_err(|_| protocol(Reason::FRAME_SIZE_ERROR, "PING of a wrong size"))?;
                if head.has(flag::ACK) {
                    self.ping_sent = None;
                } else {
                    frame::put_ping(out, payload, true);
                }
            }
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if head.len < 8 {
                    return Err(protocol(Reason::FRAME_SIZE_ERROR, "GOAWAY of a wrong size"));
                }
                // The peer opens no more streams; the open one (ours to answer) may finish.
                self.peer_gone = true;
                self.draining = true;
            }
            kind::WINDOW_UPDATE => self.window_update(head, payload, out)?,
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => {}
        }
        Ok(())
    }

    fn data(&mut self, head: Head, payload: &[u8], out: &mut BytesMut) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(protocol(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        // The whole frame, padding included, counts against the windows.
        let len = payload.len() as i64;
        if len > self.recv_window {
            return Err(protocol(Reason::FLOW_CONTROL_ERROR, "DATA beyond the connection window"));
        }
        self.recv_window -= len;
        self.recv_used += len;
        if self.recv_used >= WINDOW_UPDATE_AT {
            frame::put_window_update(out, 0, self.recv_used as u32);
            self.recv_window += self.recv_used;
            self.recv_used = 0;
        }
        let range = frame::unpadded(&head, payload).ok_or(protocol(Reason::PROTOCOL_ERROR, "bad padding"))?;
        let Some(s) = self.active.as_mut().filter(|s| s.id == head.stream) else {
            if head.stream > self.last_stream {
                return Err(protocol(Reason::PROTOCOL_ERROR, "DATA on a stream never opened"));
            }
            // Counted on the connection's window above; what else it earns depends on how
            // the stream closed.
            return self.on_closed(head.stream, out, "DATA on a closed stream");
        };
        if s.remote_closed {
            let id = s.id;
            self.reset(out, id, Reason::STREAM_CLOSED);
            return Ok(());
        }
        if len > s.recv_window {
            let id = s.id;
            self.reset(out, id, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        s.recv_window -= len;
        s.recv_used += len;
        s.received += range.len() as u64;
        let length_broken = match s.content_length {
            Some(declared) => s.received > declared || (head.has(flag::END_STREAM) && s.received != declared),
            None => false,
        };
        if length_broken {
            // DATA that does not add up to the declared length makes the request malformed.
            let id = s.id;
            self.reset(out, id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let accepted = match s.sink.as_mut() {
            Some(sink) if !range.is_empty() => sink.data(&payload[range]),
            _ => true,
        };
        if !accepted {
            let id = s.id;
            self.reset(out, id, Reason::ENHANCE_YOUR_CALM);
            return Ok(());
        }
        match s.sink.as_ref().map_or(0, |sink| sink.held()) {
            0 => s.partial_since = None,
            _ => drop(s.partial_since.get_or_insert(self.last_read)),
        }
        if head.has(flag::END_STREAM) {
            s.remote_closed = true;
            if s.body.is_none() {
                let id = s.id;
                self.close(id, Closed::Ended);
            }
        } else if s.recv_used >= WINDOW_UPDATE_AT && s.body.is_some() {
            // Once the answer has ended, the request side gets no more window: what is left
            // of it is taken and checked, never invited.
            frame::put_window_update(out, s.id, s.recv_used as u32);
            s.recv_window += s.recv_used;
            s.recv_used = 0;
        }
        Ok(())
    }

    fn headers<H>(
        &mut self,
        stream: u32,
        end_stream: bool,
        self_dependent: bool,
        block: &[u8],
        out: &mut BytesMut,
        handler: &mut H,
    ) -> Result<(), ConnError>
    where
        H: FnMut(http::Request<()>) -> Reply,
    {
        if block.len() > MAX_HEADER_BLOCK {
            return Err(protocol(Reason::ENHANCE_YOUR_CALM, "header block too large"));
        }
        // Decoded whatever becomes of the stream, so the table stays in step with the peer's.
        let fields = self.decoder.decode(block, MAX_HEADER_LIST).map_err(|e| match e {
            hpack::HpackError::ListTooLarge => protocol(Reason::ENHANCE_YOUR_CALM, "header list too large"),
            _ => protocol(Reason::COMPRESSION_ERROR, "header block does not decode"),
        })?;
        if let Some(s) = self.active.as_mut().filter(|s| s.id == stream) {
            // Trailers: they end the request, carry no pseudo-header (§8.1), and the DATA
            // before them adds up to the declared length.
            let reason = if s.remote_closed {
                Some(Reason::STREAM_CLOSED)
            } else if !end_stream
                || fields.iter().any(|(name, _)| name.starts_with(b":"))
                || s.content_length.is_some_and(|declared| declared != s.received)
            {
                Some(Reason::PROTOCOL_ERROR)
            } else {
                None
            };
            match reason {
                Some(reason) => self.reset(out, stream, reason),
                None if s.body.is_none() => self.close(stream, Closed::Ended),
                None => s.remote_closed = true,
            }
            return Ok(());
        }
        if stream <= self.last_stream {
            // Decoded above so the table stays in step; what else it earns depends on how the
            // stream closed (a lower id never opened is closed too, §5.1.1).
            return self.on_closed(stream, out, "HEADERS on a closed stream");
        }
        self.last_stream = stream;
        self.opened += 1;
        if self.opened > MAX_STREAMS {
            return Err(protocol(Reason::ENHANCE_YOUR_CALM, "too many streams on one connection"));
        }
        // A stream whose answer has ended gives way to a new request: the peer is asked to stop
        // sending on it (RFC 9113 §8.1: RST_STREAM NO_ERROR after a complete response).
        if !self.draining && self.answered() {
            if let Some(old) = self.active.as_ref().map(|s| s.id) {
                self.reset(out, old, Reason::NO_ERROR);
            }
        }
        if self.draining || self.active.is_some() {
            frame::put_rst_stream(out, stream, Reason::REFUSED_STREAM);
            self.closed.push((stream, Closed::ByUs));
            return Ok(());
        }
        let request = match request(&fields) {
            Ok(request) if !self_dependent => request,
            _ => {
                frame::put_rst_stream(out, stream, Reason::PROTOCOL_ERROR);
                self.closed.push((stream, Closed::ByUs));
                return Ok(());
            }
        };
        let content_length = match content_length(request.headers()) {
            // A request that ends with its HEADERS carries no body, whatever it declares.
            Ok(Some(n)) if end_stream && n != 0 => Err(()),
            other => other,
        };
        let Ok(content_length) = content_length else {
            frame::put_rst_stream(out, stream, Reason::PROTOCOL_ERROR);
            self.closed.push((stream, Closed::ByUs));
            return Ok(());
        };
        let reply = handler(request);
        frame::put_headers(
            out,
            stream,
            &hpack::response_head(reply.status.as_u16(), reply.content_type),
            false,
        );
        self.active = Some(Open {
            id: stream,
            send_window: self.peer_initial_window,
            recv_window: DEFAULT_WINDOW,
            recv_used: 0,
            body: Some(reply.body),
            pending: None,
            sink: reply.sink,
            remote_closed: end_stream,
            content_length,
            received: 0,
            partial_since: None,
        });
        Ok(())
    }

    fn settings(&mut self, head: Head, payload: &[u8], out: &mut BytesMut) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(protocol(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            return match head.len {
                0 => Ok(()),
                _ => Err(protocol(Reason::FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")),
            };
        }
        if !head.len.is_multiple_of(6) {
            return Err(protocol(Reason::FRAME_SIZE_ERROR, "SETTINGS of a wrong size"));
        }
        self.settings_seen = true;
        for entry in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match id {
                setting::INITIAL_WINDOW_SIZE => {
                    let value = value as i64;
                    if value > MAX_WINDOW {
                        return Err(protocol(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    let delta = value - self.peer_initial_window;
                    self.peer_initial_window = value;
                    if let Some(s) = self.active.as_mut() {
                        s.send_window += delta;
                        if s.send_window > MAX_WINDOW {
                            return Err(protocol(Reason::FLOW_CONTROL_ERROR, "a stream window overflowed"));
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => {
                    if !(DEFAULT_MAX_FRAME as u32..=(1 << 24) - 1).contains(&value) {
                        return Err(protocol(Reason::PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range"));
                    }
                    self.peer_max_frame = value as usize;
                }
                setting::ENABLE_PUSH if value > 1 => {
                    return Err(protocol(Reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1"));
                }
                // The peer's HPACK table size does not matter: nothing is indexed for it.
                _ => {}
            }
        }
        frame::put_settings_ack(out);
        Ok(())
    }

    fn window_update(&mut self, head: Head, payload: &[u8], out: &mut BytesMut) -> Result<(), ConnError> {
        let bytes: [u8; 4] = payload
            .try_into()
            .map_err(|_| protocol(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE of a wrong size"))?;
        let increment = (u32::from_be_bytes(bytes) & 0x7fff_ffff) as i64;
        if head.stream == 0 {
            if increment == 0 {
                return Err(protocol(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > MAX_WINDOW {
                return Err(protocol(Reason::FLOW_CONTROL_ERROR, "the connection window overflowed"));
            }
            return Ok(());
        }
        if head.stream > self.last_stream {
            return Err(protocol(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE on a stream never opened"));
        }
        if let Some(s) = self.active.as_mut().filter(|s| s.id == head.stream) {
            s.send_window += increment;
            if increment == 0 {
                self.reset(out, head.stream, Reason::PROTOCOL_ERROR);
            } else if s.send_window > MAX_WINDOW {
                self.reset(out, head.stream, Reason::FLOW_CONTROL_ERROR);
            }
        }
        Ok(())
    }

    /// Ends a stream with a stream error.
    fn reset(&mut self, out: &mut BytesMut, stream: u32, reason: Reason) {
        frame::put_rst_stream(out, stream, reason);
        self.close(stream, Closed::ByUs);
    }

    /// Records how `stream` closed (and closes it, if it was the open one). Only streams the
    /// peer opened are recorded, so the record holds at most [`MAX_STREAMS`].
    fn close(&mut self, stream: u32, how: Closed) {
        if self.active.as_ref().is_some_and(|s| s.id == stream) {
            self.active = None;
            self.closed.push((stream, how));
        } else if let Some(entry) = self.closed.iter_mut().find(|(id, _)| *id == stream) {
            entry.1 = how;
        }
    }

    /// A frame other than PRIORITY, WINDOW_UPDATE or RST_STREAM on `stream`, which is closed
    /// (RFC 9113 §5.1): ignored when we closed it, a stream error when the peer reset it, a
    /// connection error when both sides had ended it or it was never opened.
    fn on_closed(&mut self, stream: u32, out: &mut BytesMut, what: &'static str) -> Result<(), ConnError> {
        match self.closed.iter().find(|(id, _)| *id == stream).map(|(_, how)| *how) {
            Some(Closed::ByUs) => Ok(()),
            Some(Closed::ByPeer) => {
                frame::put_rst_stream(out, stream, Reason::STREAM_CLOSED);
                Ok(())
            }
            Some(Closed::Ended) => Err(protocol(Reason::STREAM_CLOSED, what)),
            None => Err(protocol(Reason::PROTOCOL_ERROR, "a frame on a stream never opened")),
        }
    }
}

/// The stream a PRIORITY field (or a HEADERS frame's priority) depends on.
fn depends_on(field: &[u8]) -> u32 {
    match field.get(..4) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff,
        None => 0,
    }
}

/// The request's `content-length`: none, one value, or the same value repeated; anything else
/// makes it malformed.
fn content_length(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let mut found = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        let n: u64 = value.to_str().map_err(drop)?.trim().parse().map_err(drop)?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    Ok(found)
}

/// The request a decoded header list makes, or why it is malformed (RFC 9113 §8.3.1).
fn request(fields: &hpack::Fields) -> Result<http::Request<()>, &'static str> {
    let (mut method, mut path, mut scheme, mut authority) = (None, None, None, None);
    let mut headers = http::HeaderMap::new();
    for (name, value) in fields.iter() {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if !headers.is_empty() {
                return Err("a pseudo-header after a regular one");
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"path" => &mut path,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                _ => return Err("an unknown pseudo-header"),
            };
            if slot.replace(value).is_some() {
                return Err("a repeated pseudo-header");
            }
            continue;
        }
        if name.iter().any(u8::is_ascii_uppercase) {
            return Err("an upper-case header name");
        }
        if skein_http2::connection_specific(name, value) {
            return Err("a connection-specific header");
        }
        let name = HeaderName::from_bytes(name).map_err(|_| "an invalid header name")?;
        let value = HeaderValue::from_bytes(value).map_err(|_| "an invalid header value")?;
        headers.append(name, value);
    }
    let (Some(method), Some(path), Some(_scheme)) = (method, path, scheme) else {
        return Err(":method, :path or :scheme missing");
    };
    let mut request = http::Request::new(());
    *request.method_mut() = Method::from_bytes(method).map_err(|_| "an invalid :method")?;
    // `:path` is an origin form, or `*` for OPTIONS (§8.3.1).
    if !(path.starts_with(b"/") || path == b"*") {
        return Err(":path neither absolute nor *");
    }
    *request.uri_mut() = Uri::try_from(path).map_err(|_| "an invalid :path")?;
    *request.headers_mut() = headers;
    *request.version_mut() = Version::HTTP_2;
    Ok(request)
}

#[cfg(test)]
mod tests;

/// The fuzz target's logic (`skein_operator::fuzzing::http2_frames`): the bytes after the
/// preface, as a client would send them, through the frame and header parsing, however they
/// are cut into reads. Never a panic; what is queued for the peer stays bounded, and the
/// windows within their range.
pub fn fuzz_frames(data: &[u8]) {
    // The first byte says where reads end: every `cut`-th byte.
    let cut = data.first().map_or(1, |b| *b as usize % 64 + 1);
    // Its top bit says whether each answer ends at once, or streams on (so that requests
    // refused, trailers and DATA while an answer streams are reached too).
    let end_answers = data.first().is_some_and(|b| b & 0x80 == 0);
    let mut conn = Conn::new();
    let mut handler = |_: http::Request<()>| Reply::text(StatusCode::NOT_FOUND, "not found");
    let mut out = BytesMut::new();
    let mut buf = frame::PREFACE.to_vec();
    for chunk in data.get(1..).unwrap_or_default().chunks(cut) {
        buf.extend_from_slice(chunk);
        match conn.process(&buf, &mut out, &mut handler) {
            Ok(used) => drop(buf.drain(..used)),
            Err(_) => return,
        }
        assert!(out.len() <= OUT_LIMIT, "the answers queued are bounded");
        assert!(conn.send_window <= MAX_WINDOW && conn.recv_window <= DEFAULT_WINDOW);
        assert!(conn.closed.len() <= MAX_STREAMS as usize, "closed streams are recorded once each");
        if let Some(s) = &conn.active {
            assert!(s.send_window <= MAX_WINDOW && s.recv_window <= DEFAULT_WINDOW);
            // The body is a stream the connection's task polls; here it ends at once, or never.
            if end_answers {
                conn.body_item(None, &mut out);
                assert!(conn.answered());
            }
        }
        if out.len() > OUT_LIMIT / 2 {
            out.clear();
        }
    }
}
