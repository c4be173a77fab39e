//! The webhook over real HTTPS on loopback, with AdmissionReview bodies as the API server sends
//! them: a pod to inject, malformed input, and pods to leave alone or refuse.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use skein_operator::InjectConfig;
use skein_operator::MeshCa;
use skein_operator::Metrics;
use skein_operator::{serving_names, ServingCert, WebhookState};
use tokio_util::sync::CancellationToken;

struct Webhook {
    addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    stop: CancellationToken,
    metrics: Metrics,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Webhook {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (ca, files) = MeshCa::generate("cluster.local", time::OffsetDateTime::now_utc()).unwrap();
    let ca = Arc::new(arc_swap::ArcSwap::from_pointee(ca));
    let (dns, ips) = serving_names("skein-operator", "skein-system", &["127.0.0.1".into()]);
    let (cert, _) = ServingCert::issue(&ca.load(), &dns, &ips).unwrap();
    let metrics = Metrics::default();
    let inject = InjectConfig::new(
        "skein/proxy:test",
        "https://skein-operator.skein-system.svc:15012",
        "skein-system",
        true,
    );
    let state = Arc::new(WebhookState::new(
        None,
        ca,
        inject,
        "cluster.local".into(),
        Duration::from_secs(3600),
        metrics.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(skein_operator::serve_webhook(
        listener,
        skein_operator::webhook_router(state),
        Arc::new(cert),
        stop.clone(),
    ));

    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(files.ca_crt.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Webhook { addr, tls: tokio_rustls::TlsConnector::from(Arc::new(config)), stop, metrics }
}

impl Webhook {
    async fn post(&self, body: &str) -> (u16, String) {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = self.tls.connect(name, tcp).await.expect("the serving certificate verifies for 127.0.0.1");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/inject")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = sender.send_request(req).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

fn review(object: Value, namespace: &str) -> String {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": object,
            "dryRun": false
        }
    })
    .to_string()
}

fn pod(labels: Value, annotations: Value, extra_spec: Value) -> Value {
    let mut spec = json!({"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]});
    spec.as_object_mut().unwrap().extend(extra_spec.as_object().unwrap().clone());
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0", "labels": labels, "annotations": annotations}, "spec": spec})
}

fn response(text: &str) -> Value {
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    v["response"].clone()
}

fn decode_patch(r: &Value) -> json_patch::Patch {
    use std::io::Write;
    let b64 = r["patch"].as_str().expect("a patch");
    let mut child = std::process::Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b64.as_bytes()).unwrap();
    serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap()
}

#[tokio::test]
async fn an_opted_in_pod_gets_a_patch_that_applies() {
    let w = start().await;
    let p = pod(json!({"skein.dev/inject": "enabled"}), json!({}), json!({}));
    let (status, body) = w.post(&review(p.clone(), "shop")).await;
    assert_eq!(status, 200);
    let r = response(&body);
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let mut patched = p;
    json_patch::patch(&mut patched, &decode_patch(&r)).unwrap();
    // Transparent capture by default: the iptables step first, then the native sidecar.
    assert_eq!(patched["spec"]["initContainers"][0]["name"], "skein-init");
    assert_eq!(patched["spec"]["initContainers"][1]["name"], "skein-proxy");
}

#[tokio::test]
async fn pods_left_alone_or_refused_get_the_right_answer() {
    let w = start().await;
    let opted_out =
        pod(json!({"skein.dev/inject": "enabled"}), json!({"skein.dev/inject": "false"}), json!({}));
    let r = response(&w.post(&review(opted_out, "shop")).await.1);
    assert_eq!((r["allowed"].as_bool(), r.get("patch").is_none()), (Some(true), true));

    let system = pod(json!({"skein.dev/inject": "enabled"}), json!({}), json!({}));
    let r = response(&w.post(&review(system, "kube-system")).await.1);
    assert!(r.get("patch").is_none());

    let host = pod(json!({"skein.dev/inject": "enabled"}), json!({}), json!({"hostNetwork": true}));
    let r = response(&w.post(&review(host, "shop")).await.1);
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    assert!(r["status"]["message"].as_str().unwrap().contains("hostNetwork"));

    // Each answer is counted by what it was.
    let count =
        |result| w.metrics.admissions.get_or_create(&skein_operator::AdmissionLabels { result }).get();
    assert_eq!((count("skipped"), count("denied"), count("injected")), (2, 1, 0));
}

#[tokio::test]
async fn malformed_reviews_are_answered_never_panicked_on() {
    let w = start().await;
    let (status, body) = w.post("{ not json").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) =
        w.post(r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#).await;
    assert_eq!(status, 400, "no uid");
    let wrong = review(json!({}), "shop").replace("admission.k8s.io/v1", "admission.k8s.io/v1beta1");
    let r = response(&w.post(&wrong).await.1);
    assert_eq!((r["allowed"].as_bool(), r["status"]["code"].as_i64()), (Some(false), Some(400)));
    let not_a_pod = pod(json!({"skein.dev/inject": "enabled"}), json!({}), json!({"containers": "nope"}));
    let r = response(&w.post(&review(not_a_pod, "shop")).await.1);
    assert!(r["allowed"].is_boolean(), "answered: {r}");
    // The server still serves.
    let ok = response(&w.post(&review(pod(json!({}), json!({}), json!({})), "shop")).await.1);
    assert_eq!(ok["allowed"], true);
}
