//! The file-backed control plane: the canary manifests from `examples/canary/` plus local
//! endpoints, served over the config stream; an edit propagates; a bad file is refused with its
//! name and the field, and the last good state stays.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use skein_api::WorkloadIdentity;
use skein_proxy::ConfigStore;
use skein_proxy::{control, ControlPlane, StreamStatus};
use tokio_util::sync::CancellationToken;

const ENDPOINTS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, labels: {app: reviews, version: v1}}
spec: {serviceAccountName: reviews, containers: [{name: skein-proxy}]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, labels: {app: reviews, version: v2}}
spec: {serviceAccountName: reviews, containers: [{name: skein-proxy}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
  - {addresses: ["127.0.0.1"], targetRef: {kind: Pod, name: reviews-v1}}
  - {addresses: ["127.0.0.2"], targetRef: {kind: Pod, name: reviews-v2}}
"#;

fn dir() -> PathBuf {
    let d =
        std::env::temp_dir().join(format!("skein-local-{}-{:08x}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&d).unwrap();
    let examples = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../examples/canary");
    for f in ["trafficroute.yaml", "policies.yaml", "service.yaml"] {
        std::fs::copy(examples.join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join("endpoints.yaml"), ENDPOINTS).unwrap();
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn weights(store: &ConfigStore) -> Vec<u32> {
    let Some(active) = store.current() else { return vec![] };
    active
        .config
        .destinations
        .iter()
        .find(|d| d.name == "reviews")
        .and_then(|d| d.routes.first())
        .map(|r| r.rules[1].backends.iter().map(|b| b.weight).collect())
        .unwrap_or_default()
}

#[test]
fn a_bad_file_is_refused_naming_the_file_and_the_field() {
    let d = dir();
    assert!(skein_operator::load_dir(&d).is_ok());
    std::fs::write(d.join("zz-bad.yaml"), "apiVersion: skein.dev/v1alpha1\nkind: RetryPolicy\nmetadata: {name: bad}\nspec: {targetRef: {kind: Service, name: reviews}, timeout: soon}\n").unwrap();
    let errors = skein_operator::load_dir(&d).unwrap_err();
    assert!(
        errors
            .iter()
            .map(ToString::to_string)
            .any(|e| e.contains("zz-bad.yaml") && e.contains("spec.timeout")),
        "{errors:?}"
    );
    std::fs::write(d.join("zz-bad.yaml"), "kind: TrafficRoute\nmetadata: {name: x}\nspec: {rules: []}\n")
        .unwrap();
    let errors = skein_operator::load_dir(&d).unwrap_err();
    assert!(
        errors.iter().map(ToString::to_string).any(|e| e.contains("zz-bad.yaml") && e.contains("host")),
        "{errors:?}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[tokio::test]
async fn the_local_control_plane_serves_the_manifests_and_follows_edits() {
    let d = dir();
    let (stream, metrics) = (free_port(), free_port());
    let args = skein_operator::Args::parse_from([
        "skein-operator",
        "--local",
        d.to_str().unwrap(),
        "--stream-addr",
        &format!("127.0.0.1:{stream}"),
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ]);
    let stop = CancellationToken::new();
    tokio::spawn(skein_operator::run(args, stop.clone()));

    // The local CA (files instead of Secrets) issues the meshed workload's certificate.
    let issued = d.join(".skein/identities/default/reviews");
    until("the workload certificate files", || issued.join("tls.crt").exists().then_some(())).await;
    let verify = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(d.join(".skein/ca/ca.crt"))
        .arg(issued.join("tls.crt"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let material = skein_proxy::TlsMaterial::from_dirs(&issued, None).expect("a sidecar can load them");
    assert_eq!(material.identity, "spiffe://cluster.local/ns/default/sa/reviews");

    // The proxy proves that identity with the certificate, as the stream requires by default.
    let tls = Arc::new(skein_proxy::TlsStore::default());
    tls.set(material);
    let store = Arc::new(ConfigStore::new(None));
    let cp = ControlPlane {
        url: format!("https://127.0.0.1:{stream}").parse().unwrap(),
        identity: WorkloadIdentity::new("default", "reviews"),
        proxy_id: "reviews-0".into(),
        tls: Some(tls),
    };
    tokio::spawn(control::run(cp, store.clone(), Arc::new(StreamStatus::default()), stop.clone()));
    until("the canary at the proxy", || (weights(&store) == [90, 10]).then_some(())).await;

    // By default a plaintext stream that merely names an identity gets nothing.
    let plain = Arc::new(ConfigStore::new(None));
    let status = Arc::new(StreamStatus::default());
    let cp = ControlPlane {
        url: format!("http://127.0.0.1:{stream}").parse().unwrap(),
        identity: WorkloadIdentity::new("default", "reviews"),
        proxy_id: "impostor".into(),
        tls: None,
    };
    let impostor = CancellationToken::new();
    tokio::spawn(control::run(cp, plain.clone(), status.clone(), impostor.clone()));
    until("the plaintext stream to fail", || {
        status.failures.lock().unwrap().values().any(|n| *n > 0).then_some(())
    })
    .await;
    assert!(plain.current().is_none(), "a plaintext stream was served a config");
    impostor.cancel();

    // Move to 50/50 by editing the file.
    let route = d.join("trafficroute.yaml");
    let text = std::fs::read_to_string(&route).unwrap();
    std::fs::write(&route, text.replace("weight: 90", "weight: 50").replace("weight: 10}", "weight: 50}"))
        .unwrap();
    until("50/50 at the proxy", || (weights(&store) == [50, 50]).then_some(())).await;

    // A broken edit is refused; the proxy keeps 50/50.
    std::fs::write(&route, "kind: TrafficRoute\nmetadata: {name: reviews}\nspec: {host: reviews, rules: [{backends: [{subset: nope}]}]}\n").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(weights(&store), [50, 50]);
    stop.cancel();
    let _ = std::fs::remove_dir_all(d);
}

/// Everything the API server refuses (the e2e fixtures) is refused locally too, naming the file.
#[test]
fn every_invalid_fixture_is_refused_locally_as_by_the_api_server() {
    let fixtures = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../e2e/fixtures/invalid");
    let mut accepted = Vec::new();
    let mut count = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        count += 1;
        let d = dir();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::copy(&path, d.join(&name)).unwrap();
        match skein_operator::load_dir(&d) {
            Ok(_) => accepted.push(name),
            Err(errors) => assert!(
                errors.iter().map(ToString::to_string).any(|e| e.starts_with(&name)),
                "{name}: {errors:?}"
            ),
        }
        let _ = std::fs::remove_dir_all(d);
    }
    assert!(count >= 20);
    assert!(accepted.is_empty(), "accepted locally but refused by the API server: {accepted:?}");
}
