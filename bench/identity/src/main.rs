//! The identity benchmark: workload certificates signed per second on one core, and webhook
//! admission latency over real HTTPS on loopback at a fixed rate, measured from each request's
//! intended send time (coordinated omission corrected), each admission signing a certificate
//! for a new service account as the webhook does when it injects.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use skein_api::WorkloadIdentity;
use skein_operator::InjectConfig;
use skein_operator::{serving_names, ServingCert, WebhookState};
use skein_operator::{MeshCa, WORKLOAD_LIFETIME};

/// Measure certificate signing and webhook admission.
#[derive(Parser)]
struct Args {
    /// Seconds of signing.
    #[arg(long, default_value_t = 3)]
    sign_seconds: u64,
    /// Admissions per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seconds of admissions.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn review(i: u64) -> String {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("uid-{i}"), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop", "operation": "CREATE", "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("web-{i}"), "labels": {"skein.dev/inject": "enabled"}},
                "spec": {"serviceAccountName": format!("sa-{i}"), "containers": [{"name": "app", "image": "web:1"}]}}
        }
    })
    .to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca, files) = MeshCa::generate("cluster.local", time::OffsetDateTime::now_utc())?;

    // 1. Signing rate on one core.
    let started = Instant::now();
    let mut signed = 0u64;
    while started.elapsed() < Duration::from_secs(args.sign_seconds) {
        let id = WorkloadIdentity::new("shop", format!("sa-{signed}"));
        ca.sign_workload(&id, "cluster.local", WORKLOAD_LIFETIME, time::OffsetDateTime::now_utc())?;
        signed += 1;
    }
    let per_second = signed as f64 / started.elapsed().as_secs_f64();
    println!(
        "signing: {signed} workload certificates in {:.1} s: {per_second:.0}/s on one core",
        started.elapsed().as_secs_f64()
    );

    // 2. Admissions over HTTPS at a fixed rate; each signs a certificate (as an injection of a
    //    service account without one does) besides building the patch.
    let ca = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    let (dns, ips) = serving_names("skein-operator", "skein-system", &["127.0.0.1".into()]);
    let (cert, _) = ServingCert::issue(&ca.load(), &dns, &ips).map_err(anyhow::Error::msg)?;
    let inject = InjectConfig::new(
        "skein/proxy",
        "https://skein-operator.skein-system.svc:15012",
        "skein-system",
        true,
    );
    let state = Arc::new(WebhookState::new(
        None,
        ca.clone(),
        inject,
        "cluster.local".into(),
        WORKLOAD_LIFETIME,
        Default::default(),
    ));
    // The webhook without an API server skips storing the Secret; sign in the same request
    // path instead, so the figure includes the signing the real webhook does.
    let signing_ca = ca.clone();
    let router = skein_operator::webhook_router(state).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let ca = signing_ca.clone();
            async move {
                let id = WorkloadIdentity::new("shop", "bench");
                let _ = ca.load().sign_workload(
                    &id,
                    "cluster.local",
                    WORKLOAD_LIFETIME,
                    time::OffsetDateTime::now_utc(),
                );
                next.run(req).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(skein_operator::serve_webhook(listener, router, Arc::new(cert), stop.clone()));

    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(files.ca_crt.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = tls.connect(rustls::pki_types::ServerName::try_from("127.0.0.1")?, tcp).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let total = args.rate * args.seconds;
    let start = Instant::now();
    let mut failures = 0u64;
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let req = http::Request::post("/inject")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::from(review(i))))?;
        let response = sender.send_request(req).await?;
        let ok = response.status() == 200;
        let body = response.into_body().collect().await?.to_bytes();
        if !ok || !body.windows(9).any(|w| w == b"JSONPatch") {
            failures += 1;
        }
        hist.record(due.elapsed().as_micros().max(1) as u64)?;
    }
    stop.cancel();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "admission at {} req/s over HTTPS, {} admissions, signing included: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms, failures {failures}",
        args.rate,
        total,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    Ok(())
}
