//! The demo's client: requests at a fixed rate through its sidecar, each answer tallied by the
//! version that served it. Latency is measured from when a request was due, not from when it
//! was sent, so a stall shows in the percentiles instead of hiding in fewer requests
//! (coordinated omission, as wrk2 corrects it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use skein_bench::loadgen::pace;
use skein_bench::schedule::Schedule;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long before each due time the generator stops sleeping and yields until the instant:
/// tokio's timer fires on 1 ms ticks, and that lateness would otherwise count as latency.
const SPIN: Duration = Duration::from_micros(1100);

/// What a run of requests came to.
#[derive(Clone, Debug)]
pub struct Tally {
    /// Answers per version (the demo service's `x-version` header; `-` when absent).
    pub by_version: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no answer at all (connection refused or reset).
    pub transport_errors: u64,
    /// Microseconds from when each request was due to its answer.
    pub latency: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            by_version: BTreeMap::new(),
            by_status: BTreeMap::new(),
            transport_errors: 0,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        }
    }
}

impl Tally {
    pub fn requests(&self) -> u64 {
        self.by_status.values().sum::<u64>() + self.transport_errors
    }

    /// Answers 5xx, and requests without an answer.
    pub fn errors(&self) -> u64 {
        self.by_status.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum::<u64>() + self.transport_errors
    }

    /// Answers 403: denied by the callee's access policy.
    pub fn denied(&self) -> u64 {
        self.by_status.get(&403).copied().unwrap_or(0)
    }

    pub fn version(&self, v: &str) -> u64 {
        self.by_version.get(v).copied().unwrap_or(0)
    }

    /// The `q` quantile of latency (zero without requests).
    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    pub fn merge(&mut self, other: &Tally) {
        for (v, n) in &other.by_version {
            *self.by_version.entry(v.clone()).or_default() += n;
        }
        for (s, n) in &other.by_status {
            *self.by_status.entry(*s).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        let _ = self.latency.add(&other.latency);
    }

    fn record(&mut self, answer: Result<(u16, String), ()>, latency: Duration) {
        match answer {
            Ok((status, version)) => {
                *self.by_status.entry(status).or_default() += 1;
                if status < 500 {
                    *self.by_version.entry(version).or_default() += 1;
                }
            }
            Err(()) => self.transport_errors += 1,
        }
        let _ = self.latency.record(latency.as_micros().clamp(1, 60_000_000) as u64);
    }
}

/// Requests to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// The client's sidecar (its outbound listener).
    pub proxy: SocketAddr,
    /// The service called, as `Host` (`reviews:9080`).
    pub host: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// Requests per second.
    pub rate: f64,
    /// Connections to the sidecar; each sends its share of the schedule.
    pub connections: usize,
    /// Stop after this many requests (otherwise at `stop`).
    pub count: Option<u64>,
}

impl LoadSpec {
    pub fn new(proxy: SocketAddr, host: &str, rate: f64) -> Self {
        Self {
            proxy,
            host: host.into(),
            path: "/".into(),
            headers: Vec::new(),
            rate,
            connections: 4,
            count: None,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }
}

/// Sends `spec.count` requests and tallies them.
pub async fn send(spec: LoadSpec) -> Tally {
    let sink = Arc::new(Mutex::new(Tally::default()));
    run(spec, sink.clone(), CancellationToken::new()).await;
    let tally = sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
    tally
}

/// Sends requests on schedule into `sink` until `spec.count` is reached or `stop` fires.
pub async fn run(spec: LoadSpec, sink: Arc<Mutex<Tally>>, stop: CancellationToken) {
    let start = Instant::now();
    let connections = spec.connections.max(1);
    let spec = Arc::new(spec);
    let workers: Vec<_> = (0..connections)
        .map(|w| tokio::spawn(worker(spec.clone(), w, connections, start, sink.clone(), stop.clone())))
        .collect();
    for w in workers {
        let _ = w.await;
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn worker(
    spec: Arc<LoadSpec>,
    conn: usize,
    connections: usize,
    start: Instant,
    sink: Arc<Mutex<Tally>>,
    stop: CancellationToken,
) {
    // The bench's open-loop schedule: this connection sends requests conn, conn + n, …
    let schedule = Schedule::new(spec.rate.max(0.001), conn as u64, connections as u64);
    let mut sender: Option<Sender> = None;
    let mut k = 0u64;
    let index = |k: u64| conn as u64 + k * connections as u64;
    while spec.count.is_none_or(|n| index(k) < n) {
        let due = start + schedule.due(k);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = pace(due, SPIN) => {}
        }
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            answer = exchange(&spec, &mut sender) => answer,
        };
        sink.lock().unwrap_or_else(|e| e.into_inner()).record(answer, due.elapsed());
        k += 1;
    }
}

/// One request on the worker's connection (opened again when it broke): status and version.
async fn exchange(spec: &LoadSpec, sender: &mut Option<Sender>) -> Result<(u16, String), ()> {
    let mut request = http::Request::get(spec.path.as_str())
        .header(http::header::HOST, spec.host.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|_| ())?;
    for (name, value) in &spec.headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| ())?;
        let value = http::HeaderValue::from_str(value).map_err(|_| ())?;
        request.headers_mut().insert(name, value);
    }
    let send = async {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(spec.proxy).await.map_err(|_| ())?;
            let _ = tcp.set_nodelay(true);
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|_| ())?;
            tokio::spawn(conn);
            *sender = Some(s);
        }
        let s = sender.as_mut().ok_or(())?;
        s.ready().await.map_err(|_| ())?;
        let response = s.send_request(request).await.map_err(|_| ())?;
        let status = response.status().as_u16();
        let version =
            response.headers().get("x-version").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        response.into_body().collect().await.map_err(|_| ())?;
        Ok((status, version))
    };
    let answer = match tokio::time::timeout(Duration::from_secs(15), send).await {
        Ok(a) => a,
        Err(_) => Err(()),
    };
    if answer.is_err() {
        *sender = None;
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_versions_errors_and_latency() {
        let mut a = Tally::default();
        a.record(Ok((200, "v1".into())), Duration::from_millis(2));
        a.record(Ok((503, "v2".into())), Duration::from_millis(4));
        a.record(Err(()), Duration::from_millis(8));
        let mut b = Tally::default();
        b.record(Ok((200, "v2".into())), Duration::from_millis(1));
        b.merge(&a);
        assert_eq!((b.requests(), b.errors(), b.version("v1"), b.version("v2")), (4, 2, 1, 1));
        assert!(b.quantile(1.0) >= Duration::from_millis(8));
    }
}
