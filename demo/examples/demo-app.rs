//! The demo's application: a tiny HTTP service that answers every request with its name and
//! version, so a canary split is visible in the responses. It fails on purpose when its fault
//! file says so (a number between 0 and 1: the share of requests answered 503), which is how the
//! demo shows retries and outlier ejection at work.
//!
//! `cargo run -p skein-demo --example demo-app -- --name reviews --version v2 --addr 127.0.0.12:9080`
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// A demo service that reports its version.
#[derive(Parser, Clone)]
struct Args {
    /// Service name in the answers.
    #[arg(long, default_value = "reviews")]
    name: String,
    /// Version in the answers (and the `x-version` header).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9080")]
    addr: SocketAddr,
    /// File holding the share of requests to fail (0 to 1); absent or unreadable means none.
    #[arg(long)]
    fault_file: Option<PathBuf>,
}

/// How long to wait before answering: the request's `delay_ms` query parameter (at most 10 s),
/// for tests that need requests in flight.
fn delay(query: Option<&str>) -> std::time::Duration {
    let ms = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("delay_ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    std::time::Duration::from_millis(ms.min(10_000))
}

/// The share of requests to fail, from the fault file's text.
fn failure_share(text: &str) -> f64 {
    text.trim().parse::<f64>().map(|p| p.clamp(0.0, 1.0)).unwrap_or(0.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    eprintln!("demo-app {} {} listening on {}", args.name, args.version, args.addr);
    loop {
        let (stream, _) = listener.accept().await?;
        let args = args.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let args = args.clone();
                async move {
                    let wait = delay(req.uri().query());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let share = args
                        .fault_file
                        .as_ref()
                        .and_then(|f| std::fs::read_to_string(f).ok())
                        .map_or(0.0, |t| failure_share(&t));
                    let failing = fastrand::f64() < share;
                    let body = serde_json::json!({
                        "service": args.name,
                        "version": args.version,
                        "path": req.uri().path(),
                        "status": if failing { 503 } else { 200 },
                    });
                    let mut response = http::Response::new(Full::new(Bytes::from(body.to_string())));
                    if failing {
                        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    response.headers_mut().insert(
                        "x-version",
                        http::HeaderValue::from_str(&args.version)
                            .unwrap_or(http::HeaderValue::from_static("unknown")),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{delay, failure_share};

    #[test]
    fn delays_come_from_the_query() {
        assert_eq!(delay(None).as_millis(), 0);
        assert_eq!(delay(Some("a=1&delay_ms=250")).as_millis(), 250);
        assert_eq!(delay(Some("delay_ms=999999")).as_millis(), 10_000);
        assert_eq!(delay(Some("delay_ms=x")).as_millis(), 0);
    }

    #[test]
    fn the_fault_file_holds_a_share() {
        assert_eq!(failure_share("0.5\n"), 0.5);
        assert_eq!(failure_share("3"), 1.0);
        assert_eq!(failure_share("none"), 0.0);
    }
}
