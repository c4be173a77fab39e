//! The caller's end of the multiplexed hop: one connection per peer sidecar and identity
//! ([`Pool`]), driven by a task of its own. A request is handed to that task as a header block
//! and its whole body; the task opens a stream for it, writes everything a round handed it in
//! one write, and answers each request when its response head has arrived, with the body
//! whole when it arrived in the same read (most small responses) or streamed as it arrives.
//!
//! A connection is replaced when it is [`MAX_AGE`] old (its certificate may have been rotated
//! since), and it closes when a [`SWEEP`] finds it had no stream since the last. A request the
//! peer never took (the
//! connection closed before it was written, GOAWAY named an earlier stream, REFUSED_STREAM) is
//! sent again on a new connection: it was not acted on.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::{Frame, SizeHint};
use skein_api::WorkloadIdentity;
use skein_http2::frame::{self, setting, Reason};
use skein_http2::hpack::{self, Fields};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

use super::{put_header, regular_field, ConnError, Event, Link, Streams, ALPN};
use crate::balance::endpoint::PeerStream;
use crate::route::retry::Failure;

/// A connection is not given new requests once this old: a new one presents the current
/// certificate.
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// How often a connection is looked at, not per request: one that had no stream from one
/// sweep to the next closes (after 30 to 60 s, before the callee's idle close), and one whose
/// callee read nothing of what we wrote in that time is dropped, failing its requests.
pub const SWEEP: Duration = Duration::from_secs(30);
/// After a peer chose HTTP/1.1 over the hop, it is not asked again for this long.
const NOT_OFFERED_FOR: Duration = Duration::from_secs(60);
/// Streams opened before the callee's SETTINGS arrive (RFC 9113 §6.5.2 recommends that a
/// limit be no less than 100; ours is more).
const EARLY_STREAMS: usize = 100;
/// Each stream's receive window (a response body held before the caller reads it).
const STREAM_WINDOW: i64 = 256 * 1024;
/// The connection's receive window; given back as data arrives (each stream's window bounds
/// what is held).
const CONN_WINDOW: i64 = 4 * 1024 * 1024;

/// Why a request did not go over the hop.
pub(crate) enum MuxError {
    /// The peer does not offer the hop; the connection made to ask it (HTTP/1.1, when one was
    /// made) is for the caller to use.
    NotOffered(Option<PeerStream>),
    Failed(Failure),
}

/// Why the connection's task gave a request back.
#[derive(Debug)]
pub(super) enum Refused {
    /// The peer never took it: safe to send again.
    Unsent,
    Failed(Failure),
}

type Reply = oneshot::Sender<Result<Response<Option<MuxBody>>, Refused>>;

pub(super) struct Open {
    block: Bytes,
    body: Bytes,
    reply: Reply,
}

/// What a response body tells its connection.
enum Credit {
    /// The caller took this many bytes of a stream's body.
    Consumed(u32, usize),
    /// The caller dropped the body before its end.
    Cancel(u32),
}

enum Entry {
    Live {
        opens: mpsc::UnboundedSender<Open>,
        born: Instant,
    },
    /// A request is making the connection; the others wait for it (a burst makes one), and
    /// are told its failure.
    Connecting(watch::Receiver<Option<Failure>>),
    NotOffered(Instant),
}

/// A peer's connections: its address and the lane (below).
type Key = (SocketAddr, usize);

/// The hop's connections, by peer address and the identity it proved: one per runtime worker
/// thread (a lane) with `--workers` above 1, so the TLS of each worker's requests is done on
/// its own thread rather than all of it on the one a single connection's task runs on. An
/// address is almost always one identity: those are looked through, so a lookup clones and
/// hashes no identity.
#[derive(Default)]
pub(crate) struct Pool {
    conns: Mutex<HashMap<Key, Vec<(WorkloadIdentity, Entry)>>>,
}

impl Pool {
    fn entry<'m>(
        conns: &'m mut HashMap<Key, Vec<(WorkloadIdentity, Entry)>>,
        key: &Key,
        identity: &WorkloadIdentity,
    ) -> Option<&'m mut Entry> {
        conns.get_mut(key)?.iter_mut().find(|(id, _)| id == identity).map(|(_, e)| e)
    }

    fn remove(
        conns: &mut HashMap<Key, Vec<(WorkloadIdentity, Entry)>>,
        key: &Key,
        identity: &WorkloadIdentity,
    ) {
        if let Some(list) = conns.get_mut(key) {
            list.retain(|(id, _)| id != identity);
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }
}

/// The lane of the calling thread: worker threads are numbered as they first send, modulo the
/// runtime's workers.
fn lane() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        // A thread's lane is fixed: the runtime's worker count does not change.
        static LANE: usize = {
            let workers =
                tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()).max(1);
            NEXT.fetch_add(1, Ordering::Relaxed) % workers
        };
    }
    LANE.with(|l| *l)
}

enum Lookup<'p> {
    Live(mpsc::UnboundedSender<Open>),
    NotOffered,
    Wait(watch::Receiver<Option<Failure>>),
    Connect(Connecting<'p>),
}

/// The right to make a peer's connection; dropped (made or not), the waiting requests look
/// again.
struct Connecting<'p> {
    pool: &'p Pool,
    key: Key,
    identity: WorkloadIdentity,
    result: watch::Sender<Option<Failure>>,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut conns = self.pool.conns.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(Pool::entry(&mut conns, &self.key, &self.identity), Some(Entry::Connecting(_))) {
            Pool::remove(&mut conns, &self.key, &self.identity);
        }
    }
}

impl Pool {
    fn lookup(&self, peer: SocketAddr, identity: &WorkloadIdentity) -> Lookup<'_> {
        let key = (peer, lane());
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        match Pool::entry(&mut conns, &key, identity) {
            Some(Entry::Live { opens, born }) if !opens.is_closed() && born.elapsed() < MAX_AGE => {
                return Lookup::Live(opens.clone())
            }
            Some(Entry::NotOffered(at)) if at.elapsed() < NOT_OFFERED_FOR => return Lookup::NotOffered,
            Some(Entry::Connecting(result)) => return Lookup::Wait(result.clone()),
            _ => {}
        }
        // Connections to peers that are gone are forgotten here, so the map holds live ones.
        conns.retain(|_, list| {
            list.retain(|(_, e)| match e {
                Entry::Live { opens, .. } => !opens.is_closed(),
                Entry::Connecting(_) => true,
                Entry::NotOffered(at) => at.elapsed() < NOT_OFFERED_FOR,
            });
            !list.is_empty()
        });
        let (result, waiting) = watch::channel(None);
        let identity = identity.clone();
        Pool::settle(&mut conns, key, &identity, Entry::Connecting(waiting));
        Lookup::Connect(Connecting { pool: self, key, identity, result })
    }

    /// Puts `entry` in place of what `identity` at `key` had.
    fn settle(
        conns: &mut HashMap<Key, Vec<(WorkloadIdentity, Entry)>>,
        key: Key,
        identity: &WorkloadIdentity,
        entry: Entry,
    ) {
        match Pool::entry(conns, &key, identity) {
            Some(e) => *e = entry,
            None => conns.entry(key).or_default().push((identity.clone(), entry)),
        }
    }
}

impl Connecting<'_> {
    /// Starts the connection's task and keeps it for later requests.
    fn start(self, stream: PeerStream) -> mpsc::UnboundedSender<Open> {
        let (opens, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(stream, rx));
        self.settle(Entry::Live { opens: opens.clone(), born: Instant::now() });
        opens
    }

    fn settle(self, entry: Entry) {
        let mut conns = self.pool.conns.lock().unwrap_or_else(|e| e.into_inner());
        Pool::settle(&mut conns, self.key, &self.identity, entry);
    }

    fn failed(self, failure: Failure) {
        let _ = self.result.send(Some(failure));
    }
}

/// Sends one request (its header block from [`request_block`], its body whole and at most
/// [`super::MAX_BODY`] bytes) to the sidecar at `peer`, proven to be `identity`, over the hop;
/// `connect` makes an mTLS connection offering it. Returns the response once its head has
/// arrived.
pub(crate) async fn send<C, F>(
    pool: &Pool,
    peer: SocketAddr,
    identity: &WorkloadIdentity,
    mut connect: C,
    block: Bytes,
    body: Option<Bytes>,
) -> Result<Response<Option<MuxBody>>, MuxError>
where
    C: FnMut() -> F,
    F: Future<Output = Result<PeerStream, Failure>>,
{
    let body = body.unwrap_or_default();
    // A request the peer did not take is sent again on a new connection, once.
    let mut unsent = 0;
    while unsent < 2 {
        let opens = match pool.lookup(peer, identity) {
            Lookup::Live(opens) => opens,
            Lookup::NotOffered => return Err(MuxError::NotOffered(None)),
            Lookup::Wait(mut result) => {
                // Ends when the connection is made (the sender is dropped) or failed.
                let _ = result.changed().await;
                let failed = *result.borrow();
                match failed {
                    Some(f) => return Err(MuxError::Failed(f)),
                    None => continue,
                }
            }
            Lookup::Connect(connecting) => {
                // Boxed: a handshake's state would otherwise be part of every request's future.
                let stream = match Box::pin(connect()).await {
                    Ok(stream) => stream,
                    Err(f) => {
                        connecting.failed(f);
                        return Err(MuxError::Failed(f));
                    }
                };
                if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
                    connecting.settle(Entry::NotOffered(Instant::now()));
                    return Err(MuxError::NotOffered(Some(stream)));
                }
                connecting.start(stream)
            }
        };
        unsent += 1;
        match submit(&opens, block.clone(), body.clone()).await {
            Ok(response) => return Ok(response),
            Err(Refused::Unsent) => continue,
            Err(Refused::Failed(f)) => return Err(MuxError::Failed(f)),
        }
    }
    Err(MuxError::Failed(Failure::Reset))
}

/// Hands a request to a connection's task and waits for its response's head.
pub(super) async fn submit(
    opens: &mpsc::UnboundedSender<Open>,
    block: Bytes,
    body: Bytes,
) -> Result<Response<Option<MuxBody>>, Refused> {
    let (reply, answer) = oneshot::channel();
    if opens.send(Open { block, body, reply }).is_err() {
        return Err(Refused::Unsent); // closed meanwhile: never sent
    }
    answer.await.unwrap_or(Err(Refused::Failed(Failure::Reset)))
}

/// A request's header block (`path` in origin-form, `headers` those for the upstream with
/// `Host` naming the app): the pseudo-header fields, then every field but `Host` (its value is
/// the `:authority`).
pub(crate) fn request_block(method: &Method, path: &str, headers: &HeaderMap) -> Vec<u8> {
    let mut block = Vec::with_capacity(256);
    hpack::put_field(&mut block, b":method", method.as_str().as_bytes());
    hpack::put_field(&mut block, b":scheme", b"http");
    if let Some(host) = headers.get(http::header::HOST) {
        hpack::put_field(&mut block, b":authority", host.as_bytes());
    }
    hpack::put_field(&mut block, b":path", path.as_bytes());
    for (name, value) in headers {
        if name != http::header::HOST {
            put_header(&mut block, name, value);
        }
    }
    block
}

/// A response body arriving over the hop: frames that came with the head, then (when it had
/// not ended) those the connection's task sends on as they arrive.
pub struct MuxBody {
    whole: VecDeque<Frame<Bytes>>,
    rest: Option<Rest>,
    hint: Option<u64>,
}

struct Rest {
    rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, BodyError>>,
    credits: mpsc::UnboundedSender<Credit>,
    stream: u32,
}

impl std::fmt::Debug for MuxBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxBody")
            .field("stream", &self.rest.as_ref().map(|r| r.stream))
            .finish_non_exhaustive()
    }
}

/// Why a body over the hop ended early.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum BodyError {
    #[error("the peer sidecar reset the stream")]
    Reset,
    #[error("the connection to the peer sidecar closed before the body ended")]
    Closed,
}

impl http_body::Body for MuxBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.whole.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
        match rest.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let _ = rest.credits.send(Credit::Consumed(rest.stream, data.len()));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.rest = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.rest = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_empty() && self.rest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint {
            Some(n) if self.rest.is_some() || !self.whole.is_empty() => SizeHint::with_exact(n),
            _ if self.is_end_stream() => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for MuxBody {
    fn drop(&mut self) {
        if let Some(rest) = self.rest.take() {
            let _ = rest.credits.send(Credit::Cancel(rest.stream));
        }
    }
}

/// One stream of the connection.
struct Stream {
    /// What we may still send on it, and the request body the window held back.
    window: i64,
    out: Bytes,
    reply: Option<Reply>,
    /// The response's head once it arrived, and the frames that came with it.
    head: Option<Response<()>>,
    frames: VecDeque<Frame<Bytes>>,
    /// Where frames go once the caller has the response.
    body: Option<mpsc::UnboundedSender<Result<Frame<Bytes>, BodyError>>>,
    /// The response ended (END_STREAM received).
    ended: bool,
    /// Bytes of its body the caller took since its window was last topped up.
    consumed: i64,
    /// What the peer may still send on it: DATA past it is a FLOW_CONTROL_ERROR, so what a
    /// stream holds is bounded by its window whatever the peer does.
    recv_window: i64,
}

struct Conn<S> {
    link: Link<S>,
    opens: mpsc::UnboundedReceiver<Open>,
    /// No more requests come (every handle dropped, or the connection is closing).
    opens_closed: bool,
    credits: mpsc::UnboundedReceiver<Credit>,
    credits_tx: mpsc::UnboundedSender<Credit>,
    streams: Streams<Stream>,
    /// Requests waiting for the peer's stream limit.
    queued: VecDeque<Open>,
    next_id: u32,
    /// Streams with a response head not yet handed to their caller.
    answered: Vec<u32>,
    sweep: Pin<Box<tokio::time::Sleep>>,
    /// A stream was opened since the last sweep.
    opened: bool,
    /// A stream may have part of its request body held back by the windows.
    holding: bool,
}

/// Drives one connection until it closes or is idle, every handle to it dropped.
pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(stream: S, opens: mpsc::UnboundedReceiver<Open>) {
    let settings = [
        (setting::ENABLE_PUSH, 0),
        (setting::MAX_CONCURRENT_STREAMS, 0),
        (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
        (setting::MAX_HEADER_LIST_SIZE, super::MAX_HEADER_LIST as u32),
    ];
    let (credits_tx, credits) = mpsc::unbounded_channel();
    let mut link = Link::new(stream, frame::PREFACE, &settings, CONN_WINDOW);
    // Until the callee's SETTINGS say otherwise, no more streams than any callee takes.
    link.peer_max_streams = EARLY_STREAMS;
    let mut conn = Conn {
        link,
        opens,
        opens_closed: false,
        credits,
        credits_tx,
        streams: Streams::default(),
        queued: VecDeque::new(),
        next_id: 1,
        answered: Vec::new(),
        sweep: Box::pin(tokio::time::sleep(SWEEP)),
        opened: false,
        holding: false,
    };
    std::future::poll_fn(|cx| conn.poll(cx)).await;
    conn.fail_all();
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            while let Poll::Ready(Some(credit)) = self.credits.poll_recv(cx) {
                progress = true;
                self.on_credit(credit);
            }
            while !self.opens_closed && self.link.can_write() {
                match self.opens.poll_recv(cx) {
                    Poll::Ready(Some(open)) => {
                        progress = true;
                        self.queued.push_back(open);
                    }
                    Poll::Ready(None) => self.opens_closed = true,
                    Poll::Pending => break,
                }
            }
            self.open_queued();
            // A peer that sends and never reads is read no more than it lets us answer.
            if self.link.can_write() && self.link.poll_read(cx).is_ready() {
                progress = true;
                if let Err(e) = self.read_frames() {
                    tracing::debug!(
                        error = e.what,
                        "a peer sidecar broke the protocol of the multiplexed hop"
                    );
                    self.link.go_away(0, e.reason, e.what);
                    let _ = self.link.poll_write(cx);
                    return Poll::Ready(());
                }
                self.answer();
            }
            if self.link.read_closed {
                return Poll::Ready(());
            }
            let full = !self.link.can_write();
            match self.link.poll_write(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                // Reading stopped while the buffer was full: read again now.
                Poll::Ready(Ok(())) => progress |= full,
                Poll::Pending => {}
            }
            let unused = self.streams.is_empty() && self.queued.is_empty();
            if unused && self.opens_closed {
                return Poll::Ready(());
            }
            if !progress {
                if self.sweep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if !self.link.wbuf.is_empty() && !std::mem::take(&mut self.link.wrote) {
                    tracing::debug!("a peer sidecar read nothing of the multiplexed hop for a whole sweep");
                    return Poll::Ready(());
                }
                self.link.wrote = false;
                if !std::mem::take(&mut self.opened) && unused {
                    // New requests go to a new connection; any already handed over are
                    // given back unsent.
                    self.opens.close();
                }
                self.sweep.as_mut().reset(tokio::time::Instant::now() + SWEEP);
            }
        }
    }

    /// Opens streams for queued requests, as far as the peer's limit allows.
    fn open_queued(&mut self) {
        while self.streams.len() < self.link.peer_max_streams && self.link.can_write() {
            let Some(open) = self.queued.pop_front() else { return };
            if open.reply.is_closed() {
                continue; // its caller gave up before it was sent
            }
            let id = self.next_id;
            if id > frame::MAX_WINDOW as u32 {
                // Stream ids ran out: this connection takes no more.
                let _ = open.reply.send(Err(Refused::Unsent));
                self.opens.close();
                continue;
            }
            self.next_id += 2;
            self.opened = true;
            let mut window = self.link.peer_initial;
            self.link.put_block(id, &open.block, open.body.is_empty());
            let mut out = open.body;
            if !out.is_empty() {
                let sent = self.link.put_data(id, &mut window, &out, true);
                let _ = out.split_to(sent);
                self.holding |= !out.is_empty();
            }
            let stream = Stream {
                window,
                out,
                reply: Some(open.reply),
                head: None,
                frames: VecDeque::new(),
                body: None,
                ended: false,
                consumed: 0,
                recv_window: STREAM_WINDOW,
            };
            self.streams.insert(id, stream);
        }
    }

    fn read_frames(&mut self) -> Result<(), ConnError> {
        while let Some(event) = self.link.next_event()? {
            match event {
                Event::Headers { stream, fields, end_stream } => {
                    self.on_headers(stream, fields, end_stream)?
                }
                Event::Data { stream, data, end_stream, flow } => {
                    // The connection's window is given back at once: each stream's bounds
                    // what is held.
                    self.link.consume(flow);
                    self.on_data(stream, data, end_stream, flow)?;
                }
                Event::Reset { stream, reason } => {
                    if let Some(mut s) = self.streams.remove(&stream) {
                        let refused = reason == Reason::REFUSED_STREAM && s.head.is_none();
                        let failure = if refused { Refused::Unsent } else { Refused::Failed(Failure::Reset) };
                        s.fail(failure, BodyError::Reset);
                    }
                }
                Event::WindowUpdate { stream, increment } => {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.window += i64::from(increment);
                    }
                }
                Event::InitialWindow { delta } => {
                    for s in self.streams.values_mut() {
                        s.window += delta;
                    }
                }
                Event::GoAway { last_stream } => {
                    // Streams after the last one the peer took were never acted on.
                    let unsent: Vec<u32> =
                        self.streams.keys().copied().filter(|id| *id > last_stream).collect();
                    for id in unsent {
                        if let Some(mut s) = self.streams.remove(&id) {
                            s.fail(Refused::Unsent, BodyError::Closed);
                        }
                    }
                    self.opens.close();
                }
            }
        }
        // Window updates may have freed room for held bodies.
        self.send_held();
        Ok(())
    }

    fn on_headers(&mut self, id: u32, fields: Fields, end_stream: bool) -> Result<(), ConnError> {
        if id.is_multiple_of(2) || id >= self.next_id {
            return Err(super::conn_error(Reason::PROTOCOL_ERROR, "HEADERS on a stream we did not open"));
        }
        let Some(s) = self.streams.get_mut(&id) else { return Ok(()) };
        if s.head.is_some() || s.body.is_some() {
            // Trailers.
            let trailers =
                fields.iter().map(|(n, v)| regular_field(&fields, n, v)).collect::<Option<HeaderMap>>();
            match (trailers, end_stream) {
                (Some(t), true) => s.push(Frame::trailers(t)),
                _ => return self.reset(id, Reason::PROTOCOL_ERROR),
            }
            s.ended = true;
            return self.settle(id);
        }
        let Some(head) = response_head(&fields) else { return self.reset(id, Reason::PROTOCOL_ERROR) };
        if head.status().is_informational() {
            // An interim response (100, 103): the final one follows.
            return if end_stream { self.reset(id, Reason::PROTOCOL_ERROR) } else { Ok(()) };
        }
        s.head = Some(head);
        s.ended = end_stream;
        self.answered.push(id);
        Ok(())
    }

    fn on_data(&mut self, id: u32, data: Bytes, end_stream: bool, flow: usize) -> Result<(), ConnError> {
        let Some(s) = self.streams.get_mut(&id) else {
            if id.is_multiple_of(2) || id >= self.next_id {
                return Err(super::conn_error(Reason::PROTOCOL_ERROR, "DATA on a stream we did not open"));
            }
            return Ok(()); // reset by us meanwhile
        };
        if s.head.is_none() && s.body.is_none() {
            return self.reset(id, Reason::PROTOCOL_ERROR);
        }
        s.recv_window -= flow as i64;
        if s.recv_window < 0 {
            return self.reset(id, Reason::FLOW_CONTROL_ERROR);
        }
        // Padding is given back to the stream at once.
        s.consumed += (flow - data.len()) as i64;
        if !data.is_empty() {
            s.push(Frame::data(data));
        }
        if end_stream {
            s.ended = true;
            return self.settle(id);
        }
        self.top_up(id);
        Ok(())
    }

    /// Hands each response whose head arrived in this read to its caller: with its body whole
    /// when it ended in the same read.
    fn answer(&mut self) {
        for id in std::mem::take(&mut self.answered) {
            let Some(s) = self.streams.get_mut(&id) else { continue };
            let (Some(head), Some(reply)) = (s.head.take(), s.reply.take()) else { continue };
            let hint = head
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| crate::wire::syntax::parse_length(v.as_bytes()));
            let (parts, ()) = head.into_parts();
            let body = if s.ended && s.frames.is_empty() {
                None
            } else if s.ended {
                Some(MuxBody { whole: std::mem::take(&mut s.frames), rest: None, hint })
            } else {
                let (tx, rx) = mpsc::unbounded_channel();
                s.body = Some(tx);
                let credits = self.credits_tx.clone();
                // What arrived before the caller had the response is the caller's already.
                s.consumed +=
                    s.frames.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as i64).sum::<i64>();
                Some(MuxBody {
                    whole: std::mem::take(&mut s.frames),
                    rest: Some(Rest { rx, credits, stream: id }),
                    hint,
                })
            };
            if reply.send(Ok(Response::from_parts(parts, body))).is_err() && !s.ended {
                // The caller gave up (a timeout): the rest of the body is not wanted.
                let _ = self.reset(id, Reason::CANCEL);
                continue;
            }
            // What came with the head is the caller's now: its window is given back.
            self.top_up(id);
            let _ = self.settle(id);
        }
    }

    fn on_credit(&mut self, credit: Credit) {
        match credit {
            Credit::Consumed(id, n) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.consumed += n as i64;
                    self.top_up(id);
                }
            }
            Credit::Cancel(id) => {
                if self.streams.contains_key(&id) {
                    let _ = self.reset(id, Reason::CANCEL);
                }
            }
        }
    }

    /// Gives a stream's window back once half of it was consumed.
    fn top_up(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.ended && s.consumed >= STREAM_WINDOW / 2 {
                frame::put_window_update(&mut self.link.wbuf, id, s.consumed as u32);
                s.recv_window += s.consumed;
                s.consumed = 0;
            }
        }
    }

    /// Sends request bodies the windows held back, as far as they now allow.
    fn send_held(&mut self) {
        if !self.holding {
            return; // no stream has a body held back: nothing to look through
        }
        self.holding = false;
        for (&id, s) in self.streams.iter_mut() {
            if !s.out.is_empty() && s.window > 0 && self.link.send_window > 0 {
                let sent = self.link.put_data(id, &mut s.window, &s.out, true);
                let _ = s.out.split_to(sent);
            }
            self.holding |= !s.out.is_empty();
        }
    }

    /// Forgets a stream that is done both ways: its response ended and its caller has it.
    fn settle(&mut self, id: u32) -> Result<(), ConnError> {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.ended && s.reply.is_none() && s.head.is_none() {
                // Its sender dropped: the caller's body ends after what it holds.
                s.body = None;
                if s.out.is_empty() {
                    self.streams.remove(&id);
                } else {
                    // The peer answered before taking the whole body: it does not want it.
                    self.streams.remove(&id);
                    frame::put_rst_stream(&mut self.link.wbuf, id, Reason::NO_ERROR);
                }
            }
        }
        Ok(())
    }

    /// Resets a stream (a stream error, or the caller no longer wants it).
    fn reset(&mut self, id: u32, reason: Reason) -> Result<(), ConnError> {
        if let Some(mut s) = self.streams.remove(&id) {
            s.fail(Refused::Failed(Failure::Reset), BodyError::Reset);
        }
        frame::put_rst_stream(&mut self.link.wbuf, id, reason);
        Ok(())
    }

    /// The connection ended: requests not written are given back unsent, the rest fail.
    fn fail_all(&mut self) {
        self.opens.close();
        while let Ok(open) = self.opens.try_recv() {
            self.queued.push_back(open);
        }
        for open in self.queued.drain(..) {
            let _ = open.reply.send(Err(Refused::Unsent));
        }
        for (_, mut s) in self.streams.drain() {
            s.fail(Refused::Failed(Failure::Reset), BodyError::Closed);
        }
    }
}

impl Stream {
    fn push(&mut self, frame: Frame<Bytes>) {
        match &self.body {
            Some(tx) => {
                let _ = tx.send(Ok(frame));
            }
            None => self.frames.push_back(frame),
        }
    }

    fn fail(&mut self, refused: Refused, error: BodyError) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(refused));
        }
        if let Some(body) = self.body.take() {
            let _ = body.send(Err(error));
        }
    }
}

/// A response's head from its decoded fields: `:status` first and only, regular fields well
/// formed, one `content-length` value; `None` makes it malformed.
fn response_head(list: &Fields) -> Option<Response<()>> {
    let mut fields = list.iter();
    let (name, status) = fields.next()?;
    if name != b":status" || status.len() != 3 {
        return None;
    }
    let status = StatusCode::from_bytes(status).ok()?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    let mut length = None;
    for (name, value) in fields {
        let (name, value) = regular_field(list, name, value)?;
        if name == http::header::CONTENT_LENGTH {
            // Several values that differ make the response malformed (RFC 9110 §8.6); the
            // same value repeated is passed on once, so no client is left to choose.
            let n = crate::wire::syntax::parse_length(value.as_bytes())?;
            if let Some(m) = length.replace(n) {
                if m != n {
                    return None;
                }
                continue;
            }
        }
        headers.append(name, value);
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Some(response)
}
