//! Both ends of the hop over an in-memory pipe, and the callee against frames written by hand.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use skein_http2::frame::{self, kind, Head, Reason, HEADER_LEN};
use skein_http2::hpack;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::client::{self, Refused};
use super::server;

type Frames = std::pin::Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
type TestBody = StreamBody<Frames>;

/// An app of sorts: `/big/N` answers N bytes, `/trailers` a body and trailers, `/empty`
/// nothing, `/late/S` answers after S seconds, `/drip/S` sends its head at once and its body
/// after S seconds, anything else what it was asked.
fn handler(req: Request<Option<Bytes>>) -> server::Answer<TestBody> {
    Box::pin(async move {
        let path = req.uri().path().to_string();
        if let Some(s) = path.strip_prefix("/late/") {
            tokio::time::sleep(Duration::from_secs(s.parse().unwrap())).await;
        }
        if let Some(s) = path.strip_prefix("/drip/") {
            let wait = Duration::from_secs(s.parse().unwrap());
            let late = futures::stream::once(async move {
                tokio::time::sleep(wait).await;
                Ok(Frame::data(Bytes::from_static(b"drip")))
            });
            return Ok(Response::new(StreamBody::new(Box::pin(late) as Frames)));
        }
        let mut frames = Vec::new();
        if let Some(n) = path.strip_prefix("/big/") {
            frames.push(Ok(Frame::data(Bytes::from(vec![b'x'; n.parse().unwrap()]))));
        } else if let Some(n) = path.strip_prefix("/pieces/") {
            for i in 0..n.parse::<u8>().unwrap() {
                frames.push(Ok(Frame::data(Bytes::from(vec![b'a' + i % 26; 8192]))));
            }
        } else if path == "/trailers" {
            frames.push(Ok(Frame::data(Bytes::from_static(b"ok"))));
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(trailers)));
        } else if path != "/empty" {
            let len = req.body().as_ref().map_or(0, Bytes::len);
            frames.push(Ok(Frame::data(Bytes::from(format!("{} {path} {len}", req.method())))));
        }
        let mut response = Response::new(StreamBody::new(Box::pin(futures::stream::iter(frames)) as Frames));
        let lengths = req.headers().get_all(http::header::CONTENT_LENGTH).iter().count();
        response.headers_mut().insert("x-lengths", HeaderValue::from(lengths));
        let authority = req.uri().authority().map_or("", |a| a.as_str()).to_string();
        response.headers_mut().insert("x-authority", HeaderValue::from_str(&authority).unwrap());
        Ok(response)
    })
}

/// A caller's connection task and a callee over a pipe.
fn pair() -> mpsc::UnboundedSender<client::Open> {
    let (near, far) = tokio::io::duplex(64 * 1024);
    tokio::spawn(server::serve(far, handler));
    let (opens, rx) = mpsc::unbounded_channel();
    tokio::spawn(client::run(near, rx));
    opens
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

async fn call(
    opens: &mpsc::UnboundedSender<client::Open>,
    method: Method,
    path: &str,
    body: Bytes,
) -> Answer {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, HeaderValue::from_static("reviews.shop:9080"));
    let block = client::request_block(&method, path, &headers);
    let response = client::submit(opens, block.into(), body).await.expect("an answer");
    let (parts, body) = response.into_parts();
    let (body, trailers) = match body {
        Some(b) => {
            let collected = b.collect().await.expect("a whole body");
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        None => (Bytes::new(), None),
    };
    Answer { status: parts.status, headers: parts.headers, body, trailers }
}

#[tokio::test]
async fn requests_cross_one_connection_past_the_callees_stream_limit() {
    let opens = pair();
    // More at once than the callee takes (128): the rest wait for streams to end.
    let answers: Vec<Answer> = futures::future::join_all((0..300).map(|i| {
        let opens = opens.clone();
        async move { call(&opens, Method::POST, &format!("/n/{i}"), Bytes::from(vec![b'b'; i])).await }
    }))
    .await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.status, 200);
        assert_eq!(a.body, format!("POST /n/{i} {i}"));
        assert_eq!(a.headers["x-authority"], "reviews.shop:9080");
    }
    let empty = call(&opens, Method::GET, "/empty", Bytes::new()).await;
    assert_eq!((empty.status, empty.body.len()), (StatusCode::OK, 0));
}

#[tokio::test]
async fn a_content_length_repeated_reaches_the_app_once() {
    let opens = pair();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, HeaderValue::from_static("reviews.shop:9080"));
    headers.append(http::header::CONTENT_LENGTH, HeaderValue::from_static("3"));
    headers.append(http::header::CONTENT_LENGTH, HeaderValue::from_static("3"));
    let block = client::request_block(&Method::POST, "/n", &headers);
    let response = client::submit(&opens, block.into(), Bytes::from_static(b"abc")).await.expect("an answer");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-lengths"], "1");
}

#[tokio::test]
async fn large_bodies_cross_within_the_windows_and_trailers_follow() {
    let opens = pair();
    // A response far larger than either window, and a request body exactly as large as the
    // callee's stream window (one byte more than the window before its SETTINGS arrive).
    let (big, asked) = tokio::join!(
        call(&opens, Method::GET, "/big/3000000", Bytes::new()),
        call(&opens, Method::PUT, "/upload", Bytes::from(vec![b'u'; super::MAX_BODY])),
    );
    assert_eq!(big.body.len(), 3_000_000);
    let pieces = call(&opens, Method::GET, "/pieces/64", Bytes::new()).await;
    assert_eq!(pieces.body.len(), 64 * 8192);
    assert!(big.body.iter().all(|b| *b == b'x'));
    assert_eq!(asked.body, format!("PUT /upload {}", super::MAX_BODY));
    let grpc = call(&opens, Method::POST, "/trailers", Bytes::new()).await;
    assert_eq!(grpc.body, "ok");
    assert_eq!(grpc.trailers.expect("trailers")["grpc-status"], "0");
}

// --- The callee against frames written by hand. ---

fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in fields {
        hpack::put_field(&mut block, n.as_bytes(), v.as_bytes());
    }
    block
}

const GET: &[(&str, &str)] =
    &[(":method", "GET"), (":scheme", "http"), (":authority", "a:1"), (":path", "/x")];

/// A connection to a callee, the preface and an empty SETTINGS written.
async fn raw() -> DuplexStream {
    let (mut near, far) = tokio::io::duplex(1024 * 1024);
    tokio::spawn(server::serve(far, handler));
    let mut out = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut out, &[]);
    near.write_all(&out).await.unwrap();
    near
}

/// The next frame the callee writes (`None`: it closed the connection).
async fn next(io: &mut DuplexStream) -> Option<(Head, Bytes)> {
    let mut head = [0u8; HEADER_LEN];
    let read = tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut head)).await.expect("in time");
    read.ok()?;
    let head = Head::parse(&head);
    let mut payload = vec![0u8; head.len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head, payload.into()))
}

/// The next frame of `kind` (others skipped).
async fn next_of(io: &mut DuplexStream, want: u8) -> Option<(Head, Bytes)> {
    loop {
        let (head, payload) = next(io).await?;
        if head.kind == want {
            return Some((head, payload));
        }
    }
}

fn code(payload: &[u8], at: usize) -> Reason {
    Reason(u32::from_be_bytes([payload[at], payload[at + 1], payload[at + 2], payload[at + 3]]))
}

async fn send(io: &mut DuplexStream, out: BytesMut) {
    io.write_all(&out).await.unwrap();
}

#[tokio::test]
async fn malformed_requests_are_reset_and_the_connection_serves_on() {
    let mut io = raw().await;
    let mut out = BytesMut::new();
    let upper = [GET, &[("X-Upper", "1")]].concat();
    frame::put_headers(&mut out, 1, &block(&upper), true);
    frame::put_headers(&mut out, 3, &block(&GET[..3]), true);
    let connection = [GET, &[("connection", "close")]].concat();
    frame::put_headers(&mut out, 5, &block(&connection), true);
    let declared = [GET, &[("content-length", "5")]].concat();
    frame::put_headers(&mut out, 7, &block(&declared), false);
    frame::put_data(&mut out, 7, b"abc", true);
    let pseudo_late = [&[("accept", "*/*")], GET].concat();
    frame::put_headers(&mut out, 9, &block(&pseudo_late), true);
    let two_lengths = [GET, &[("content-length", "3"), ("content-length", "4")]].concat();
    frame::put_headers(&mut out, 11, &block(&two_lengths), false);
    frame::put_data(&mut out, 11, b"abc", true);
    frame::put_headers(&mut out, 13, &block(GET), true);
    send(&mut io, out).await;
    for stream in [1, 3, 5, 7, 9, 11] {
        let (head, payload) = next_of(&mut io, kind::RST_STREAM).await.expect("a reset");
        assert_eq!((head.stream, code(&payload, 0)), (stream, Reason::PROTOCOL_ERROR));
    }
    let (head, _) = next_of(&mut io, kind::HEADERS).await.expect("an answer");
    assert_eq!(head.stream, 13);
}

#[tokio::test]
async fn protocol_errors_end_the_connection_with_their_code() {
    // What a peer sends, after the preface and SETTINGS, and the GOAWAY code it earns.
    let mut garbage = BytesMut::new();
    frame::put_headers(&mut garbage, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], true);
    let mut oversized = BytesMut::new();
    frame::put_head(&mut oversized, frame::DEFAULT_MAX_FRAME + 1, kind::DATA, 0, 1);
    oversized.extend_from_slice(&vec![0u8; frame::DEFAULT_MAX_FRAME + 1]);
    let mut backwards = BytesMut::new();
    frame::put_headers(&mut backwards, 5, &block(GET), true);
    frame::put_headers(&mut backwards, 3, &block(GET), true);
    let mut flood = BytesMut::new();
    frame::put_head(&mut flood, 0, kind::HEADERS, 0, 1);
    for _ in 0..5 {
        frame::put_head(&mut flood, 16_000, kind::CONTINUATION, 0, 1);
        flood.extend_from_slice(&[0u8; 16_000]);
    }
    let mut interrupted = BytesMut::new();
    frame::put_head(&mut interrupted, 0, kind::HEADERS, 0, 1);
    frame::put_ping(&mut interrupted, [0; 8], false);
    let mut idle_data = BytesMut::new();
    frame::put_data(&mut idle_data, 2, b"never opened", true);
    let cases = [
        (idle_data, Reason::PROTOCOL_ERROR),
        (garbage, Reason::COMPRESSION_ERROR),
        (oversized, Reason::FRAME_SIZE_ERROR),
        (backwards, Reason::PROTOCOL_ERROR),
        (flood, Reason::ENHANCE_YOUR_CALM),
        (interrupted, Reason::PROTOCOL_ERROR),
    ];
    for (i, (out, reason)) in cases.into_iter().enumerate() {
        let mut io = raw().await;
        send(&mut io, out).await;
        let (_, payload) = next_of(&mut io, kind::GOAWAY).await.expect("a GOAWAY");
        assert_eq!(code(&payload, 4), reason, "case {i}");
        assert!(next(&mut io).await.is_none(), "case {i}: the connection closes");
    }
    // Not HTTP/2 at all.
    let (mut near, far) = tokio::io::duplex(4096);
    tokio::spawn(server::serve(far, handler));
    near.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let (_, payload) = next_of(&mut near, kind::GOAWAY).await.expect("a GOAWAY");
    assert_eq!(code(&payload, 4), Reason::PROTOCOL_ERROR);
}

#[tokio::test]
async fn streams_past_the_limit_are_refused_and_bodies_past_their_window_reset() {
    let mut io = raw().await;
    let mut out = BytesMut::new();
    // Open streams, their bodies never ended: the one past the limit is refused.
    for i in 0..=server::MAX_STREAMS as u32 {
        frame::put_headers(&mut out, 1 + 2 * i, &block(GET), false);
    }
    send(&mut io, out).await;
    let (head, payload) = next_of(&mut io, kind::RST_STREAM).await.expect("a refusal");
    assert_eq!(
        (head.stream, code(&payload, 0)),
        (1 + 2 * server::MAX_STREAMS as u32, Reason::REFUSED_STREAM)
    );
    // One byte past the stream's window resets it.
    let mut out = BytesMut::new();
    for _ in 0..4 {
        frame::put_data(&mut out, 1, &[b'd'; 16_384], false);
    }
    frame::put_data(&mut out, 1, b"!", false);
    send(&mut io, out).await;
    let (head, payload) = next_of(&mut io, kind::RST_STREAM).await.expect("a reset");
    assert_eq!((head.stream, code(&payload, 0)), (1, Reason::FLOW_CONTROL_ERROR));
}

#[tokio::test]
async fn streams_reset_as_fast_as_they_open_end_the_connection() {
    let mut io = raw().await;
    let mut out = BytesMut::new();
    for i in 0..1000u32 {
        frame::put_headers(&mut out, 1 + 2 * i, &block(GET), true);
        frame::put_rst_stream(&mut out, 1 + 2 * i, Reason::CANCEL);
    }
    send(&mut io, out).await;
    let (_, payload) = next_of(&mut io, kind::GOAWAY).await.expect("a GOAWAY");
    assert_eq!(code(&payload, 4), Reason::ENHANCE_YOUR_CALM);
}

#[tokio::test]
async fn streams_the_callee_resets_as_fast_as_they_open_end_the_connection() {
    // "MadeYouReset": each stream's handler has started (END_STREAM) when the caller makes it
    // malformed (a WINDOW_UPDATE of 0), so the callee resets it; such resets count as the
    // caller's own.
    let mut io = raw().await;
    let mut out = BytesMut::new();
    for i in 0..1000u32 {
        frame::put_headers(&mut out, 1 + 2 * i, &block(GET), true);
        frame::put_window_update(&mut out, 1 + 2 * i, 0);
    }
    send(&mut io, out).await;
    let (_, payload) = next_of(&mut io, kind::GOAWAY).await.expect("a GOAWAY");
    assert_eq!(code(&payload, 4), Reason::ENHANCE_YOUR_CALM);
}

/// The next frame of `kind` within `secs` seconds (of paused time, which runs ahead when
/// nothing else can).
async fn next_within(io: &mut DuplexStream, want: u8, secs: u64) -> Option<(Head, Bytes)> {
    tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            let mut head = [0u8; HEADER_LEN];
            io.read_exact(&mut head).await.ok()?;
            let head = Head::parse(&head);
            let mut payload = vec![0u8; head.len];
            io.read_exact(&mut payload).await.ok()?;
            if head.kind == want {
                return Some((head, Bytes::from(payload)));
            }
        }
    })
    .await
    .expect("in time")
}

#[tokio::test(start_paused = true)]
async fn streams_the_peer_holds_up_are_reset_and_those_waiting_on_the_app_are_not() {
    let mut io = raw().await;
    let started = tokio::time::Instant::now();
    let mut out = BytesMut::new();
    // 1: a body that never comes. 3: an answer the app takes three minutes over. 5: a body
    // the app sends after three minutes.
    frame::put_headers(&mut out, 1, &block(GET), false);
    let late = [&GET[..3], &[(":path", "/late/180")]].concat();
    frame::put_headers(&mut out, 3, &block(&late), true);
    let drip = [&GET[..3], &[(":path", "/drip/180")]].concat();
    frame::put_headers(&mut out, 5, &block(&drip), true);
    send(&mut io, out).await;
    let (head, payload) = next_within(&mut io, kind::RST_STREAM, 300).await.expect("a reset");
    assert_eq!((head.stream, code(&payload, 0)), (1, Reason::CANCEL));
    let waited = started.elapsed();
    assert!(waited >= server::SWEEP && waited <= 2 * server::SWEEP, "{waited:?}");
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let (head, payload) = next_within(&mut io, kind::DATA, 300).await.expect("the answers");
        if !payload.is_empty() {
            answered.push((head.stream, payload));
        }
    }
    answered.sort();
    assert_eq!(answered[0], (3, Bytes::from("GET /late/180 0")));
    assert_eq!(answered[1], (5, Bytes::from("drip")));
}

#[tokio::test(start_paused = true)]
async fn a_response_held_for_want_of_window_is_reset() {
    let (mut io, far) = tokio::io::duplex(1024 * 1024);
    tokio::spawn(server::serve(far, handler));
    let mut out = BytesMut::from(frame::PREFACE);
    // No window for any stream: the body cannot go out until the peer gives some.
    frame::put_settings(&mut out, &[(frame::setting::INITIAL_WINDOW_SIZE, 0)]);
    let big = [&GET[..3], &[(":path", "/big/1000")]].concat();
    frame::put_headers(&mut out, 1, &block(&big), true);
    send(&mut io, out).await;
    let (head, payload) = next_within(&mut io, kind::RST_STREAM, 300).await.expect("a reset");
    assert_eq!((head.stream, code(&payload, 0)), (1, Reason::CANCEL));
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_and_one_whose_peer_reads_nothing_dropped() {
    let mut io = raw().await;
    let started = tokio::time::Instant::now();
    let (_, payload) = next_within(&mut io, kind::GOAWAY, 300).await.expect("a GOAWAY");
    assert_eq!(code(&payload, 4), Reason::NO_ERROR);
    assert!(started.elapsed() <= 2 * server::SWEEP, "{:?}", started.elapsed());
    let mut rest = Vec::new();
    assert_eq!(io.read_to_end(&mut rest).await.unwrap(), 0, "then the connection ends");

    // A pipe of 16 KiB the test never reads from, and answers far larger.
    let (mut io, far) = tokio::io::duplex(16 * 1024);
    let served = tokio::spawn(server::serve(far, handler));
    let mut out = BytesMut::from(frame::PREFACE);
    frame::put_settings(&mut out, &[]);
    for id in (1..40).step_by(2) {
        let big = [&GET[..3], &[(":path", "/big/60000")]].concat();
        frame::put_headers(&mut out, id, &block(&big), true);
    }
    send(&mut io, out).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(300), served).await.expect("dropped in time").unwrap();
    assert!(started.elapsed() <= 2 * server::SWEEP, "{:?}", started.elapsed());
}

// --- The caller against a callee written by hand. ---

/// A caller's connection task over a pipe whose far end the test speaks for; the caller's
/// preface and SETTINGS are read, and an empty SETTINGS sent.
async fn raw_callee() -> (mpsc::UnboundedSender<client::Open>, DuplexStream) {
    let (near, mut far) = tokio::io::duplex(1024 * 1024);
    let (opens, rx) = mpsc::unbounded_channel();
    tokio::spawn(client::run(near, rx));
    let mut preface = [0u8; 24];
    far.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, frame::PREFACE);
    let mut out = BytesMut::new();
    frame::put_settings(&mut out, &[]);
    far.write_all(&out).await.unwrap();
    (opens, far)
}

fn request(
    opens: &mpsc::UnboundedSender<client::Open>,
) -> tokio::task::JoinHandle<Result<Response<Option<client::MuxBody>>, Refused>> {
    let opens = opens.clone();
    tokio::spawn(async move { client::submit(&opens, block(GET).into(), Bytes::new()).await })
}

#[tokio::test]
async fn requests_the_callee_refused_or_never_took_come_back_unsent() {
    let (opens, mut far) = raw_callee().await;
    let first = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_rst_stream(&mut out, head.stream, Reason::REFUSED_STREAM);
    far.write_all(&out).await.unwrap();
    assert!(matches!(first.await.unwrap(), Err(Refused::Unsent)));

    let second = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_goaway(&mut out, head.stream - 2, Reason::NO_ERROR, "");
    far.write_all(&out).await.unwrap();
    assert!(matches!(second.await.unwrap(), Err(Refused::Unsent)));

    // A stream the callee took and then reset failed for good.
    let (opens, mut far) = raw_callee().await;
    let third = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_rst_stream(&mut out, head.stream, Reason::INTERNAL_ERROR);
    far.write_all(&out).await.unwrap();
    assert!(matches!(third.await.unwrap(), Err(Refused::Failed(_))));
}

#[tokio::test]
async fn a_response_with_two_lengths_fails_and_one_repeated_is_kept_once() {
    let (opens, mut far) = raw_callee().await;
    let asked = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    let two = [(":status", "200"), ("content-length", "2"), ("content-length", "3")];
    frame::put_headers(&mut out, head.stream, &block(&two), false);
    frame::put_data(&mut out, head.stream, b"abc", true);
    far.write_all(&out).await.unwrap();
    assert!(matches!(asked.await.unwrap(), Err(Refused::Failed(_))));
    let (reset, payload) = next_of(&mut far, kind::RST_STREAM).await.expect("a reset");
    assert_eq!((reset.stream, code(&payload, 0)), (head.stream, Reason::PROTOCOL_ERROR));

    let asked = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    let same = [(":status", "200"), ("content-length", "3"), ("content-length", "3")];
    frame::put_headers(&mut out, head.stream, &block(&same), false);
    frame::put_data(&mut out, head.stream, b"abc", true);
    far.write_all(&out).await.unwrap();
    let response = asked.await.unwrap().expect("a response");
    let lengths: Vec<_> = response.headers().get_all(http::header::CONTENT_LENGTH).iter().collect();
    assert_eq!(lengths, ["3"]);
    let body = response.into_body().expect("a body").collect().await.unwrap().to_bytes();
    assert_eq!(body, "abc");
}

#[tokio::test]
async fn a_body_the_caller_drops_resets_its_stream() {
    let (opens, mut far) = raw_callee().await;
    let asked = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_headers(&mut out, head.stream, &block(&[(":status", "200")]), false);
    frame::put_data(&mut out, head.stream, b"first", false);
    far.write_all(&out).await.unwrap();
    let response = asked.await.unwrap().expect("a response");
    let mut body = response.into_body().expect("a body");
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");
    drop(body);
    let (reset, payload) = next_of(&mut far, kind::RST_STREAM).await.expect("a reset");
    assert_eq!((reset.stream, code(&payload, 0)), (head.stream, Reason::CANCEL));
    // The connection serves on.
    let again = request(&opens);
    let (next_head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    assert_eq!(next_head.stream, head.stream + 2);
    let mut out = BytesMut::new();
    frame::put_headers(&mut out, next_head.stream, &block(&[(":status", "204")]), true);
    far.write_all(&out).await.unwrap();
    let response = again.await.unwrap().expect("a response");
    assert_eq!(response.status(), 204);
    assert!(response.into_body().is_none());
}

#[tokio::test]
async fn a_window_filled_before_the_caller_had_its_response_is_given_back() {
    let (opens, mut far) = raw_callee().await;
    let asked = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    // The head and a whole stream window of body in one write: all of it reaches the caller
    // with the response, and the window must come back or the stream stalls.
    let mut out = BytesMut::new();
    frame::put_headers(&mut out, head.stream, &block(&[(":status", "200")]), false);
    for _ in 0..16 {
        frame::put_data(&mut out, head.stream, &[b'w'; 16_384], false);
    }
    far.write_all(&out).await.unwrap();
    let update = loop {
        let (h, payload) = next_of(&mut far, kind::WINDOW_UPDATE).await.expect("a window update");
        if h.stream == head.stream {
            break payload;
        }
    };
    assert_eq!(code(&update, 0).0, 16 * 16_384);
    let response = asked.await.unwrap().expect("a response");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_callee_that_sends_past_a_streams_window_has_it_reset() {
    let (opens, mut far) = raw_callee().await;
    let asked = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_headers(&mut out, head.stream, &block(&[(":status", "200")]), false);
    far.write_all(&out).await.unwrap();
    let response = asked.await.unwrap().expect("a response");
    let mut body = response.into_body().expect("a body");
    // The caller does not read: 256 KiB is the stream's window, one more frame overruns it.
    let mut out = BytesMut::new();
    for _ in 0..17 {
        frame::put_data(&mut out, head.stream, &[b'w'; 16_384], false);
    }
    far.write_all(&out).await.unwrap();
    let (reset, payload) = next_of(&mut far, kind::RST_STREAM).await.expect("a reset");
    assert_eq!((reset.stream, code(&payload, 0)), (head.stream, Reason::FLOW_CONTROL_ERROR));
    // What arrived within the window is there, then the body fails.
    let mut got = 0;
    let failed = loop {
        match body.frame().await {
            Some(Ok(f)) => got += f.into_data().map_or(0, |d| d.len()),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(failed, "the body ends in an error, not as if whole");
    assert!(got <= 16 * 16_384, "{got}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_caller_closes_and_one_whose_callee_reads_nothing_is_dropped() {
    let (opens, mut far) = raw_callee().await;
    let asked = request(&opens);
    let (head, _) = next_of(&mut far, kind::HEADERS).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_headers(&mut out, head.stream, &block(&[(":status", "204")]), true);
    far.write_all(&out).await.unwrap();
    assert_eq!(asked.await.unwrap().expect("a response").status(), 204);
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(300), far.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap();
    assert!(started.elapsed() <= 2 * client::SWEEP, "{:?}", started.elapsed());

    // A callee that reads the preface and nothing more, through a pipe of 4 KiB.
    let (near, mut far) = tokio::io::duplex(4096);
    let (opens, rx) = mpsc::unbounded_channel();
    tokio::spawn(client::run(near, rx));
    let mut preface = [0u8; 24];
    far.read_exact(&mut preface).await.unwrap();
    let mut out = BytesMut::new();
    frame::put_settings(&mut out, &[]);
    far.write_all(&out).await.unwrap();
    let started = tokio::time::Instant::now();
    let asked = client::submit(&opens, block(GET).into(), Bytes::from(vec![b'b'; 60_000]));
    let answer = tokio::time::timeout(Duration::from_secs(300), asked).await.expect("failed in time");
    assert!(answer.is_err());
    assert!(started.elapsed() <= 2 * client::SWEEP, "{:?}", started.elapsed());
}

/// A connection's odd (or even) ids, one after another, land in distinct buckets of a table of
/// their number, and their tags (the top seven bits) differ too.
#[test]
fn stream_ids_spread_over_the_table() {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let build = BuildHasherDefault::<super::IdHasher>::default();
    for first in [1u32, 2, 1_000_001] {
        let hashes: Vec<u64> = (0..128).map(|i| build.hash_one(first + 2 * i)).collect();
        let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 255).collect();
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(buckets.len() >= 100, "{} buckets of 256 for 128 ids from {first}", buckets.len());
        assert!(tags.len() >= 64, "{} tags for 128 ids from {first}", tags.len());
    }
}
