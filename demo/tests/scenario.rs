//! The demo's scenario, end to end with the real binaries: the 90/10 canary splits within
//! tolerance, beta users always reach v2, an edit to the manifests reaches and is acknowledged
//! by every sidecar, a failing v2 replica is ejected while retries keep every answer good, and
//! killing the control plane leaves traffic flowing on the last good config. The example access
//! policy denies the intruder (403, shown per edge in the topology) until an edit lets it in.
//! All hops between sidecars are mTLS. Bounded: about 30 s of traffic at 250 requests per second.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::time::{Duration, Instant};

use skein_demo::load::{self, LoadSpec};
use skein_demo::mesh::SERVICE_HOST;

const RATE: f64 = 250.0;

/// Within ±4.5 standard deviations of the binomial: a correct split fails about once in 150,000.
fn assert_share(what: &str, got: u64, n: u64, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (got as f64 - mean).abs() <= 4.5 * sd,
        "{what}: {got} of {n}, expected {mean:.0} ± {:.0}",
        4.5 * sd
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_splits_retries_ejects_and_survives_its_control_plane() {
    let (mut mesh, manifests) = support::start("scenario").await;
    let proxy = mesh.client_proxy();
    let spec = || LoadSpec::new(proxy, SERVICE_HOST, RATE);

    // 90/10 for everyone.
    let t = load::send(spec().count(1000)).await;
    assert_eq!(t.errors(), 0, "{t:?}");
    assert_share("v2 at 90/10", t.version("v2"), 1000, 0.10);
    println!(
        "90/10: v1 {} v2 {} p50 {:?} p99 {:?}",
        t.version("v1"),
        t.version("v2"),
        t.quantile(0.5),
        t.quantile(0.99)
    );

    // Beta users: always v2.
    let t = load::send(spec().header("x-user-group", "beta").count(200)).await;
    assert_eq!((t.version("v2"), t.errors()), (200, 0), "{t:?}");

    // Every hop from the client to reviews went over mTLS, as the topology shows once the
    // client's sidecar has reported (every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let topology = mesh.topology().await.unwrap();
        let edge = topology.edge("workload:default/client", "service:reviews.default").cloned();
        if let Some(edge) = edge.filter(|e| e.total_requests >= 1200) {
            assert!(edge.mtls && edge.requests_per_second > 0.0, "{edge:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the topology does not show the traffic: {topology:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Only the client may call reviews (examples/access-policy): every request of the
    // intruder is denied at reviews' sidecars, and the topology shows it on the intruder's edge.
    let intruder = || LoadSpec::new(mesh.intruder_proxy(), SERVICE_HOST, 50.0);
    let t = load::send(intruder().count(50)).await;
    assert_eq!((t.denied(), t.requests()), (50, 50), "{t:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let topology = mesh.topology().await.unwrap();
        let edge = topology.edge("workload:default/intruder", "service:reviews.default").cloned();
        if let Some(edge) = edge.filter(|e| e.denied_per_second > 0.0) {
            assert!(edge.mtls, "denied, but over mTLS: {edge:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the topology does not show the denials: {topology:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut denials = 0.0;
    for w in &mesh.workloads[1..4] {
        let metrics = skein_demo::http::get(w.admin(), "/metrics").await.unwrap().1;
        denials += support::counter(
            &metrics,
            "skein_authz_decisions_total{decision=\"deny\",policy=\"default/reviews-callers\",mode=\"enforce\"}",
        );
    }
    assert_eq!(denials, 50.0, "each denial counted once, by the reviews sidecar that made it");
    // Let the intruder in: edited live, like the route.
    let policy = manifests.parent().unwrap().join("policies/reviews-callers.yaml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let edited = text.replace(
        "serviceAccounts: [{namespace: default, name: client}]",
        "serviceAccounts: [{namespace: default, name: client}, {namespace: default, name: intruder}]",
    );
    assert_ne!(text, edited, "the example policy moved; update this test");
    std::fs::write(&policy, edited).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let t = load::send(intruder().count(10)).await;
        if t.by_status.get(&200) == Some(&10) {
            break;
        }
        assert!(Instant::now() < deadline, "the intruder is still denied: {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Edit the manifests to 50/50: every sidecar acknowledges the new config.
    let before = mesh.topology().await.unwrap().acked();
    let route = manifests.join("trafficroute.yaml");
    let text = std::fs::read_to_string(&route).unwrap();
    let edited = text
        .replace("{subset: v1, weight: 90}", "{subset: v1, weight: 50}")
        .replace("{subset: v2, weight: 10}", "{subset: v2, weight: 50}");
    assert_ne!(text, edited, "the example's weights moved; update this test");
    let edited_at = Instant::now();
    std::fs::write(&route, edited).unwrap();
    let deadline = edited_at + Duration::from_secs(15);
    loop {
        let t = mesh.topology().await.unwrap();
        if t.all_in_sync(5) && t.acked()["client"] != before["client"] {
            break;
        }
        assert!(Instant::now() < deadline, "the edit was not acknowledged by every proxy: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "the edit was acknowledged by all 5 proxies {:?} after the file was written",
        edited_at.elapsed()
    );
    let t = load::send(spec().count(1000)).await;
    assert_eq!(t.errors(), 0, "{t:?}");
    assert_share("v2 at 50/50", t.version("v2"), 1000, 0.5);

    // How the two equal v2 replicas shared v2's traffic so far (printed, not asserted: the
    // balancer's unit tests pin that down deterministically).
    let served = |text: &str| support::counter(text, "skein_requests_total");
    let mut replica_served = Vec::new();
    for w in &mesh.workloads[2..4] {
        replica_served.push(served(&skein_demo::http::get(w.admin(), "/metrics").await.unwrap().1));
    }
    println!("v2 replicas served {replica_served:?} requests");

    // One v2 replica fails every request: it is ejected, and retries on the other replica keep
    // every answer good. Traffic runs until the ejection, however the balancer has been sharing
    // v2 so far: every request the failing replica gets fails, and five in a row eject it.
    let failing_admin = mesh.workloads[2].admin();
    let client_admin = mesh.workloads[0].admin();
    let client_metrics = || async { skein_demo::http::get(client_admin, "/metrics").await.unwrap().1 };
    mesh.set_fault("reviews-v2-a", 1.0).unwrap();
    let mut t = load::Tally::default();
    let ejections = loop {
        t.merge(&load::send(spec().count(250)).await);
        let ejections = support::counter(&client_metrics().await, "skein_outlier_ejections_total");
        if ejections >= 1.0 {
            break ejections;
        }
        assert!(t.requests() < 5_000, "the failing replica was never ejected: {}", client_metrics().await);
    };
    assert_eq!(t.errors(), 0, "retries should hide the failing replica: {t:?}");
    let retries = support::counter(&client_metrics().await, "skein_retries_total");
    println!(
        "failing replica: ejected after {} requests, {retries} retries, p99 {:?}",
        t.requests(),
        t.quantile(0.99)
    );
    assert!(retries >= 5.0, "five failures in a row, each retried: {}", client_metrics().await);

    // Ejected for 30 s: the next 1000 requests (4 s) all go to the other v2 replica.
    let served_before = served(&skein_demo::http::get(failing_admin, "/metrics").await.unwrap().1);
    let t = load::send(spec().count(1000)).await;
    assert_eq!(t.errors(), 0, "{t:?}");
    assert_share("v2 with a replica ejected", t.version("v2"), 1000, 0.5);
    let to_failing =
        served(&skein_demo::http::get(failing_admin, "/metrics").await.unwrap().1) - served_before;
    assert_eq!(to_failing, 0.0, "the ejected replica kept getting traffic ({ejections} ejections)");
    mesh.set_fault("reviews-v2-a", 0.0).unwrap();

    // The control plane dies; the sidecars keep the last good config (50/50) and traffic flows.
    mesh.kill("skein-operator").await;
    assert!(mesh.topology().await.is_err(), "the operator should be gone");
    let t = load::send(spec().count(500)).await;
    assert_eq!(t.errors(), 0, "{t:?}");
    assert_share("v2 without a control plane", t.version("v2"), 500, 0.5);

    // Secrets stay secret: no private key in what the sidecars serve (metrics, config dumps)
    // or in any process's log, through the whole run.
    let mut outputs = Vec::new();
    for w in &mesh.workloads {
        for path in ["/metrics", "/config_dump", "/certs"] {
            let (_, body) = skein_demo::http::get(w.admin(), path).await.unwrap();
            outputs.push((format!("{} {path}", w.name), body));
        }
    }
    let ended = mesh.stop().await;
    assert_eq!(ended.len(), 9, "{ended:?}");
    assert!(mesh.running().is_empty());
    let work = mesh.log("skein-operator").parent().and_then(|l| l.parent()).unwrap().to_path_buf();
    let (mut keys, mut logs) = (Vec::new(), Vec::new());
    collect_files(&work, &mut |path, text| {
        if text.contains("PRIVATE KEY") && !path.ends_with(".log") {
            keys.push(text.to_string());
        } else if path.ends_with(".log") {
            logs.push((path.to_string(), text.to_string()));
        }
    });
    assert!(keys.len() >= 3, "the CA and workload keys were not found under {}", work.display());
    assert_eq!(logs.len(), ended.len(), "a log per process: {logs:?}");
    outputs.extend(logs);
    let leaks = skein_e2e::key_leaks(&outputs, &keys);
    assert!(leaks.is_empty(), "private key material leaked: {leaks:?}");
}

/// Calls `f` with the path and text of every UTF-8 file under `dir`.
fn collect_files(dir: &std::path::Path, f: &mut dyn FnMut(&str, &str)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, f);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            f(&path.display().to_string(), &text);
        }
    }
}
