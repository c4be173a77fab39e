//! The load generator: `connections` keep-alive HTTP/1.1 connections, each sending its share of
//! an open-loop fixed-rate schedule (or, with `--max`, sending back to back), every latency into
//! an HdrHistogram in microseconds. With `--http2` (cleartext, prior knowledge, as a gRPC client
//! speaks to its sidecar) `connections` is the number of concurrent streams, over
//! `--h2-connections` connections.
//!
//! A run is bounded: no request is sent after `warmup + duration`, and whatever is still in
//! flight `DRAIN` later is cut off and counted as an I/O error.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use skein_api::process::error_chain;
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use crate::report::{latency_histogram, Counts, Mode, Summary, MAX_LATENCY_US};
use crate::schedule::Schedule;
use crate::target::Target;

/// How long requests still in flight when the window closes may take to finish.
const DRAIN: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How late after the window closes a request that was due inside it may still be sent; later
/// ones count as missed (the target fell behind the schedule).
const SEND_GRACE: Duration = Duration::from_millis(50);
/// Pause after a failed request in closed-loop mode, so a refusing target is not hammered.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    version,
    about = "Open-loop fixed-rate HTTP/1.1 and HTTP/2 load generator; latency counts from each request's due time"
)]
pub struct Args {
    /// The URL to load, `http://HOST:PORT/PATH`.
    #[arg(long, env = "LOADGEN_URL")]
    pub url: String,
    /// Host header to send instead of the URL's authority.
    #[arg(long, env = "LOADGEN_HOST")]
    pub host: Option<String>,
    /// Requests per second over all connections (open loop). Ignored with --max.
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds measured, after the warm-up.
    #[arg(long, env = "LOADGEN_DURATION", default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, env = "LOADGEN_WARMUP", default_value_t = 2.0)]
    pub warmup: f64,
    /// Keep-alive connections; the requests are dealt round-robin over them.
    #[arg(long, env = "LOADGEN_CONNECTIONS", default_value_t = 16)]
    pub connections: usize,
    /// HTTP/2 over cleartext (prior knowledge): `--connections` streams at once, multiplexed
    /// over `--h2-connections` connections.
    #[arg(long, env = "LOADGEN_HTTP2")]
    pub http2: bool,
    /// Connections the HTTP/2 streams share.
    #[arg(long, env = "LOADGEN_H2_CONNECTIONS", default_value_t = 1)]
    pub h2_connections: usize,
    /// Request body bytes: 0 sends GET, more sends a POST with that many bytes.
    #[arg(long, env = "LOADGEN_BODY_SIZE", default_value_t = 0)]
    pub body_size: usize,
    /// Closed loop: every connection sends its next request as soon as the previous answer is
    /// read; reports the maximum throughput, latency from the actual send.
    #[arg(long, env = "LOADGEN_MAX")]
    pub max: bool,
    /// Runtime threads; 1 runs everything on the calling thread.
    #[arg(long, env = "LOADGEN_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Microseconds before each due time to stop sleeping and yield-spin instead: tokio's timer
    /// rounds deadlines up to 1 ms ticks, and its lateness would be measured as latency. 0 only
    /// sleeps.
    #[arg(long, env = "LOADGEN_SPIN_US", default_value_t = 2000)]
    pub spin_us: u64,
    /// Print one JSON object instead of text.
    #[arg(long, env = "LOADGEN_JSON")]
    pub json: bool,
}

impl Args {
    /// Checks what clap cannot and resolves the target.
    pub fn validate(&self) -> Result<Target, String> {
        let positive_rate = self.rate.is_finite() && self.rate > 0.0;
        if !self.max && !positive_rate {
            return Err(format!(
                "--rate must be a positive number of requests per second, not {}",
                self.rate
            ));
        }
        if !(self.duration.is_finite() && self.duration > 0.0 && self.duration <= 86_400.0) {
            return Err(format!("--duration must be between 0 and 86400 seconds, not {}", self.duration));
        }
        if !(0.0..=3_600.0).contains(&self.warmup) {
            return Err(format!("--warmup must be between 0 and 3600 seconds, not {}", self.warmup));
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.http2 && !(1..=self.connections).contains(&self.h2_connections) {
            return Err("--h2-connections must be between 1 and --connections".into());
        }
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        Target::parse(&self.url, self.host.as_deref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("request failed")]
    Request(#[source] hyper::Error),
    #[error("a connection task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Runs the load `args` describe against `target` (from `args.validate()`), on a runtime of
/// `args.threads` threads.
pub fn run(args: &Args, target: Target) -> Result<Summary, Error> {
    let mut builder = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(args.threads);
        builder
    };
    let runtime = builder.enable_all().build().map_err(Error::Runtime)?;
    runtime.block_on(load(args, target))
}

/// The timeline of a run; every offset counts from `start`.
#[derive(Clone, Copy, Debug)]
struct Plan {
    start: Instant,
    /// The measured window: requests due (open loop) or sent (closed loop) in it are recorded.
    window_start: Duration,
    window_end: Duration,
    /// Nothing runs past this.
    deadline: Instant,
    spin: Duration,
}

async fn load(args: &Args, target: Target) -> Result<Summary, Error> {
    let target = Arc::new(target);
    let body = Bytes::from(vec![b'x'; args.body_size]);
    // Connect everything first, so neither the handshakes nor a slow accept count as latency.
    let mut clients = Vec::with_capacity(args.connections);
    let mut shared = Vec::new();
    for i in 0..args.connections {
        let sender = match (args.http2, shared.get(i % args.h2_connections.max(1))) {
            (true, Some(h2)) => Sender::H2(http2::SendRequest::clone(h2)),
            _ => match connect(&target.connect, args.http2).await? {
                Sender::H2(h2) => {
                    shared.push(h2.clone());
                    Sender::H2(h2)
                }
                h1 => h1,
            },
        };
        clients.push(Client { target: target.clone(), body: body.clone(), sender: Some(sender) });
    }
    drop(shared);

    let window_start = Duration::from_secs_f64(args.warmup);
    let window_end = window_start + Duration::from_secs_f64(args.duration);
    // A short lead so every task is spawned before the first request is due.
    let start = Instant::now() + Duration::from_millis(10);
    let plan = Plan {
        start,
        window_start,
        window_end,
        deadline: start + window_end + DRAIN,
        spin: Duration::from_micros(args.spin_us),
    };
    let connections = clients.len() as u64;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(conn, client)| {
            if args.max {
                tokio::spawn(closed_loop(client, plan))
            } else {
                tokio::spawn(open_loop(client, Schedule::new(args.rate, conn as u64, connections), plan))
            }
        })
        .collect();

    let mut histogram = latency_histogram();
    let mut counts = Counts::default();
    let mut first_error = None;
    for task in tasks {
        let outcome = task.await.map_err(Error::Task)?;
        histogram.add(&outcome.histogram).expect("histograms share their bounds");
        counts.merge(&outcome.counts);
        first_error = first_error.or(outcome.first_error);
    }
    Ok(Summary::new(
        args.url.clone(),
        target.host.to_str().unwrap_or_default().to_owned(),
        if args.max { Mode::Max } else { Mode::Rate },
        (!args.max).then_some(args.rate),
        args.connections,
        args.warmup,
        args.duration,
        counts,
        &histogram,
        first_error,
    ))
}

/// What one connection measured.
struct Outcome {
    histogram: Histogram<u64>,
    counts: Counts,
    first_error: Option<String>,
}

impl Outcome {
    fn new() -> Self {
        Self { histogram: latency_histogram(), counts: Counts::default(), first_error: None }
    }

    /// Accounts one request; only `measured` ones reach the histogram and the counters.
    fn account(&mut self, result: &Result<StatusCode, Error>, latency: Duration, measured: bool) {
        if result.is_ok() {
            self.counts.answered_total += 1;
        }
        if !measured {
            return;
        }
        match result {
            Ok(status) => {
                if status.is_success() {
                    self.counts.ok += 1;
                } else {
                    self.counts.non_2xx += 1;
                }
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).min(MAX_LATENCY_US);
                self.histogram.saturating_record(us);
            }
            Err(e) => self.io_error(error_chain(e)),
        }
    }

    fn io_error(&mut self, what: String) {
        self.counts.io_errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }
}

/// Sends this connection's share of the schedule; latency counts from each request's due time.
async fn open_loop(mut client: Client, schedule: Schedule, plan: Plan) -> Outcome {
    let mut out = Outcome::new();
    let first_measured = schedule.count_before(plan.window_start);
    let total = schedule.count_before(plan.window_end);
    let last_send = plan.start + plan.window_end + SEND_GRACE;
    let mut k = 0;
    while k < total {
        let due = plan.start + schedule.due(k);
        pace(due, plan.spin).await;
        if Instant::now() >= last_send {
            break;
        }
        let measured = k >= first_measured;
        k += 1;
        match timeout_at(plan.deadline, client.send()).await {
            Ok(result) => {
                let latency = Instant::now().saturating_duration_since(due);
                out.account(&result, latency, measured);
            }
            Err(_) => {
                if measured {
                    out.io_error("no response before the run's deadline".into());
                }
                break;
            }
        }
    }
    // Requests of the window that never left: the target fell behind the schedule.
    out.counts.missed += total.saturating_sub(k.max(first_measured));
    out
}

/// Sends back to back until the window closes; latency counts from the actual send.
async fn closed_loop(mut client: Client, plan: Plan) -> Outcome {
    let mut out = Outcome::new();
    tokio::time::sleep_until(plan.start).await;
    let window_start = plan.start + plan.window_start;
    let window_end = plan.start + plan.window_end;
    loop {
        let sent = Instant::now();
        if sent >= window_end {
            break;
        }
        let measured = sent >= window_start;
        match timeout_at(plan.deadline, client.send()).await {
            Ok(result) => {
                let failed = result.is_err();
                out.account(&result, Instant::now().saturating_duration_since(sent), measured);
                if failed {
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
            Err(_) => {
                if measured {
                    out.io_error("no response before the run's deadline".into());
                }
                break;
            }
        }
    }
    out
}

/// Waits until `due`: the timer for the bulk of the wait, then yields until the instant,
/// because the timer wheel fires on 1 ms ticks and its lateness would count as latency.
pub async fn pace(due: Instant, spin: Duration) {
    if let Some(wake) = due.checked_sub(spin) {
        if wake > Instant::now() {
            tokio::time::sleep_until(wake).await;
        }
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

/// A connection's request side: HTTP/1.1 (one request at a time) or HTTP/2 (a clone per
/// stream, sharing the connection).
enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn http2(&self) -> bool {
        matches!(self, Self::H2(_))
    }

    /// Whether the connection can take a request (waits for HTTP/1.1's previous answer).
    async fn ready(&mut self) -> bool {
        match self {
            Self::H1(s) => s.ready().await.is_ok(),
            Self::H2(s) => s.ready().await.is_ok(),
        }
    }

    /// One request, the whole response body read.
    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<StatusCode, hyper::Error> {
        let response = match self {
            Self::H1(s) => s.send_request(request).await?,
            Self::H2(s) => s.send_request(request).await?,
        };
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let _frame = frame?;
        }
        Ok(status)
    }
}

/// One request loop on a keep-alive connection (HTTP/1.1) or stream slot (HTTP/2) that
/// reconnects when the connection closed or failed.
struct Client {
    target: Arc<Target>,
    body: Bytes,
    sender: Option<Sender>,
}

impl Client {
    /// Sends one request and reads the whole response.
    async fn send(&mut self) -> Result<StatusCode, Error> {
        let http2 = self.sender.as_ref().is_some_and(Sender::http2);
        let mut sender = self.sender.take();
        // A connection the peer closed between requests (keep-alive limit, idle timeout) is not a
        // failed request: reconnect without counting it.
        let open = match &mut sender {
            Some(s) => s.ready().await,
            None => false,
        };
        let mut sender = match sender {
            Some(s) if open => s,
            _ => connect(&self.target.connect, http2).await?,
        };
        let result = sender.exchange(self.request(sender.http2())).await;
        if result.is_ok() {
            self.sender = Some(sender);
        }
        result.map_err(Error::Request)
    }

    fn request(&self, http2: bool) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        if http2 {
            // The authority travels as `:authority`, from the absolute URI.
            *request.uri_mut() = self.target.absolute.clone();
        } else {
            *request.uri_mut() = self.target.path.clone();
            // hyper's connection-level client sends exactly the headers it is given: Host included.
            request.headers_mut().insert(header::HOST, self.target.host.clone());
        }
        if !self.body.is_empty() {
            *request.method_mut() = Method::POST;
            request.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        }
        request
    }
}

async fn connect(addr: &str, http2: bool) -> Result<Sender, Error> {
    let connect_error = |source| Error::Connect { addr: addr.to_owned(), source };
    let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(result) => result.map_err(connect_error)?,
        Err(_) => {
            return Err(connect_error(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))
        }
    };
    stream.set_nodelay(true).map_err(connect_error)?;
    let handshake_error = |source| Error::Handshake { addr: addr.to_owned(), source };
    // The connection future drives the socket; it ends when the senders are dropped or the peer
    // closes, and its error, if any, surfaces on the next request.
    if http2 {
        let (sender, connection) =
            http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(handshake_error)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, connection) =
        http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.map_err(handshake_error)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Sender::H1(sender))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_for(url: &str, extra: &[&str]) -> Args {
        let mut argv = vec!["loadgen", "--url", url];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn args(extra: &[&str]) -> Args {
        args_for("http://127.0.0.1:8080/", extra)
    }

    #[test]
    fn validate_refuses_nonsense() {
        assert!(args(&[]).validate().is_ok());
        assert!(args(&["--rate", "0"]).validate().is_err());
        assert!(args(&["--rate", "0", "--max"]).validate().is_ok());
        assert!(args(&["--duration", "0"]).validate().is_err());
        assert!(args(&["--connections", "0"]).validate().is_err());
        assert!(args(&["--threads", "0"]).validate().is_err());
        assert!(args(&["--http2", "--h2-connections", "0"]).validate().is_err());
        assert!(args(&["--http2", "--h2-connections", "17"]).validate().is_err());
    }

    #[test]
    fn requests_carry_host_and_body() {
        let target = Arc::new(args(&["--host", "upstream.bench:8080"]).validate().unwrap());
        let get = Client { target: target.clone(), body: Bytes::new(), sender: None }.request(false);
        assert_eq!(get.method(), Method::GET);
        assert_eq!(get.headers()[header::HOST], "upstream.bench:8080");
        assert!(get.headers().get(header::CONTENT_LENGTH).is_none());
        let post =
            Client { target: target.clone(), body: Bytes::from_static(b"abc"), sender: None }.request(false);
        assert_eq!(post.method(), Method::POST);
        assert_eq!(post.headers()[header::CONTENT_LENGTH], "3");
        assert_eq!(*post.uri(), "/");
        let h2 = Client { target, body: Bytes::new(), sender: None }.request(true);
        assert_eq!(*h2.uri(), "http://upstream.bench:8080/");
        assert!(h2.headers().get(header::HOST).is_none());
    }

    /// One open-loop run against an in-process HTTP/1.1 server on loopback: every request of
    /// the window is answered and measured.
    #[test]
    fn open_loop_measures_every_request_of_the_window() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let port = runtime.block_on(serve_ok());
        let url = format!("http://127.0.0.1:{port}/x");
        let args =
            args_for(&url, &["--rate", "200", "--duration", "0.5", "--warmup", "0.1", "--connections", "4"]);
        let target = args.validate().unwrap();
        let summary = runtime.block_on(load(&args, target)).unwrap();
        assert_eq!(summary.errors, 0, "{summary}");
        assert_eq!(summary.requests + summary.counts.missed, 100, "{summary}");
        assert_eq!(summary.counts.answered_total, summary.requests + 20, "{summary}");
        assert!(summary.latency_us.max > 0);
    }

    /// The same over HTTP/2: eight streams on two connections.
    #[test]
    fn http2_streams_share_connections_and_are_measured() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let port = runtime.block_on(serve_ok());
        let url = format!("http://127.0.0.1:{port}/x");
        let args = args_for(
            &url,
            &[
                "--http2",
                "--h2-connections",
                "2",
                "--connections",
                "8",
                "--rate",
                "200",
                "--duration",
                "0.5",
                "--warmup",
                "0.1",
            ],
        );
        let target = args.validate().unwrap();
        let summary = runtime.block_on(load(&args, target)).unwrap();
        assert_eq!(summary.errors, 0, "{summary}");
        assert_eq!(summary.requests + summary.counts.missed, 100, "{summary}");
    }

    /// A minimal keep-alive server answering 200 to everything; returns its port.
    async fn serve_ok() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    });
                    // HTTP/1.1, or HTTP/2 with prior knowledge.
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        port
    }
}
