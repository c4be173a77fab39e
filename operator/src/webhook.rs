//! The sidecar-injecting admission webhook (HTTPS on 9443, path `/inject`): AdmissionReview v1
//! in, a JSON patch out. The decision is [`crate::inject::inject_sidecar`]; this shell reads the
//! namespace's labels, signs the service account's certificate when it has none (or one past
//! half-life) unless the request is a dry run, and answers. Malformed input is answered
//! `invalid` (or HTTP 400 when not even the request's uid can be read), never with a panic.
//!
//! The serving certificate is signed by the mesh CA for the webhook Service's DNS names and the
//! `--webhook-san` values, swapped in without a restart when renewed, and the CA bundle is
//! patched into the MutatingWebhookConfiguration `skein-sidecar-injector`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{json, Value};
use skein_api::WorkloadIdentity;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ca::{self, MeshCa};
use crate::identity::{identity_secret_name, MANAGED_BY};
use crate::inject::{inject_sidecar, Decision, InjectConfig};
use crate::metrics::Metrics;

/// Name of the MutatingWebhookConfiguration whose CA bundle the operator keeps current.
pub const WEBHOOK_CONFIGURATION: &str = "skein-sidecar-injector";
/// Lifetime of the serving certificate (renewed at half-life, without a restart).
const SERVING_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a namespace's labels are trusted from the cache.
const NAMESPACE_TTL: Duration = Duration::from_secs(5);

/// The serving certificate in force, swappable.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert: &ca::WorkloadCert) -> Result<CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(chain, signer))
}

impl ServingCert {
    /// Signs a first serving certificate.
    pub fn issue(ca: &MeshCa, dns: &[String], ips: &[IpAddr]) -> Result<(Self, OffsetDateTime), String> {
        let cert = ca
            .sign_serving(dns, ips, SERVING_LIFETIME, OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        let key = certified_key(&cert)?;
        Ok((Self { current: ArcSwap::from_pointee(key) }, cert.not_after))
    }

    /// Signs a new certificate and swaps it in; connections already open keep theirs.
    pub fn renew(&self, ca: &MeshCa, dns: &[String], ips: &[IpAddr]) -> Result<OffsetDateTime, String> {
        let cert = ca
            .sign_serving(dns, ips, SERVING_LIFETIME, OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        self.current.store(Arc::new(certified_key(&cert)?));
        Ok(cert.not_after)
    }
}

/// A namespace's labels and when they were read.
type CachedLabels = (Instant, BTreeMap<String, String>);

/// What the handler needs.
pub struct WebhookState {
    pub client: Option<Client>,
    pub ca: ca::SharedCa,
    pub inject: InjectConfig,
    pub trust_domain: String,
    pub lifetime: Duration,
    pub metrics: Metrics,
    namespaces: Mutex<HashMap<String, CachedLabels>>,
    /// Namespaces known to hold the trust bundle ConfigMap.
    bundles: Mutex<std::collections::HashSet<String>>,
}

impl WebhookState {
    pub fn new(
        client: Option<Client>,
        ca: ca::SharedCa,
        inject: InjectConfig,
        trust_domain: String,
        lifetime: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            ca,
            inject,
            trust_domain,
            lifetime,
            metrics,
            namespaces: Mutex::default(),
            bundles: Mutex::default(),
        }
    }

    async fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        if let Some((at, labels)) = self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).get(namespace) {
            if at.elapsed() < NAMESPACE_TTL {
                return labels.clone();
            }
        }
        let Some(client) = &self.client else { return BTreeMap::new() };
        let api: Api<Namespace> = Api::all(client.clone());
        let labels = match api.get_opt(namespace).await {
            Ok(Some(ns)) => ns.metadata.labels.unwrap_or_default(),
            Ok(None) => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(%namespace, error = %e, "cannot read the namespace's labels");
                BTreeMap::new()
            }
        };
        self.namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(namespace.to_string(), (Instant::now(), labels.clone()));
        labels
    }

    /// Makes sure the namespace has the trust bundle ConfigMap the injected pod mounts, so the
    /// first meshed pod of a namespace does not wait for the operator's next pass (not on dry
    /// runs). The operator keeps its content current afterwards.
    async fn ensure_trust_bundle(&self, namespace: &str) -> Result<(), String> {
        let Some(client) = &self.client else { return Ok(()) };
        if self.bundles.lock().unwrap_or_else(|e| e.into_inner()).contains(namespace) {
            return Ok(());
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        if api.get_opt(crate::identity::TRUST_BUNDLE_CONFIGMAP).await.map_err(|e| e.to_string())?.is_none() {
            let cm = crate::identity::trust_bundle_configmap(self.ca.load().trust_bundle());
            let params = PatchParams::apply(skein_api::constants::FIELD_MANAGER).force();
            api.patch(crate::identity::TRUST_BUNDLE_CONFIGMAP, &params, &Patch::Apply(&cm))
                .await
                .map_err(|e| e.to_string())?;
        }
        self.bundles.lock().unwrap_or_else(|e| e.into_inner()).insert(namespace.to_string());
        Ok(())
    }

    /// Makes sure the service account has a current certificate Secret (not on dry runs).
    async fn ensure_identity(&self, identity: &WorkloadIdentity) -> Result<(), String> {
        let Some(client) = &self.client else { return Ok(()) };
        self.ensure_trust_bundle(&identity.namespace).await?;
        let api: Api<Secret> = Api::namespaced(client.clone(), &identity.namespace);
        let name = identity_secret_name(&identity.service_account);
        let now = OffsetDateTime::now_utc();
        let existing = api.get_opt(&name).await.map_err(|e| e.to_string())?;
        let current = existing.as_ref().and_then(|s| {
            s.data.as_ref()?.get("tls.crt").map(|b| String::from_utf8_lossy(&b.0).into_owned())
        });
        if current.as_deref().is_some_and(|c| !ca::needs_renewal(c, now)) {
            return Ok(());
        }
        let cert = self
            .ca
            .load()
            .sign_workload(identity, &self.trust_domain, self.lifetime, now)
            .map_err(|e| e.to_string())?;
        let data = [("tls.crt", &cert.chain_pem), ("tls.key", &cert.key_pem), ("ca.crt", &cert.bundle_pem)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                annotations: Some(
                    [("skein.dev/spiffe-id".to_string(), identity.spiffe_id(&self.trust_domain))].into(),
                ),
                resource_version: existing.and_then(|s| s.metadata.resource_version),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        };
        let result = match &secret.metadata.resource_version {
            Some(_) => api.replace(&name, &PostParams::default(), &secret).await.map(drop),
            None => api.create(&PostParams::default(), &secret).await.map(drop),
        };
        match result {
            Ok(()) => {
                self.metrics.certificates_signed.inc();
                Ok(())
            }
            // Another admission (or the operator's loop) wrote it first: theirs is as good.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn review(uid: &str, response: Value) -> Response {
    let mut response = response;
    response["uid"] = json!(uid);
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `POST /inject`.
pub async fn handle(State(state): State<Arc<WebhookState>>, body: Bytes) -> Response {
    let review_in: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {e}\n")).into_response(),
    };
    let request = &review_in["request"];
    let Some(uid) = request["uid"].as_str() else {
        return (StatusCode::BAD_REQUEST, "AdmissionReview without request.uid\n").into_response();
    };
    let invalid = |message: String| {
        review(
            uid,
            json!({"allowed": false, "status": {"code": 400, "reason": "BadRequest", "message": message}}),
        )
    };
    if review_in["apiVersion"] != "admission.k8s.io/v1" || review_in["kind"] != "AdmissionReview" {
        return invalid("expected an admission.k8s.io/v1 AdmissionReview".into());
    }
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return review(uid, json!({"allowed": true}));
    }
    let Some(namespace) =
        request["namespace"].as_str().or_else(|| request["object"]["metadata"]["namespace"].as_str())
    else {
        return invalid("request.namespace is missing".into());
    };
    let labels = state.namespace_labels(namespace).await;
    match inject_sidecar(&request["object"], namespace, &labels, &state.inject) {
        Decision::Skip(why) => {
            tracing::debug!(%namespace, %why, "not injecting");
            review(uid, json!({"allowed": true}))
        }
        Decision::Deny(why) => review(
            uid,
            json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": format!("skein sidecar injection: {why}")}}),
        ),
        Decision::Inject { patch, service_account } => {
            let dry_run = request["dryRun"].as_bool().unwrap_or(false);
            if !dry_run {
                let identity = WorkloadIdentity::new(namespace, service_account);
                if let Err(e) = state.ensure_identity(&identity).await {
                    return review(
                        uid,
                        json!({"allowed": false, "status": {"code": 500, "message": format!("cannot issue the certificate of {identity}: {e}")}}),
                    );
                }
            }
            let patch = serde_json::to_vec(&patch).expect("a patch serializes");
            review(uid, json!({"allowed": true, "patchType": "JSONPatch", "patch": ByteString(patch)}))
        }
    }
}

/// The webhook's routes.
pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new().route("/inject", post(handle)).with_state(state)
}

/// Serves HTTPS until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cert: Arc<ServingCert>,
    shutdown: CancellationToken,
) {
    let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                tracing::debug!(%peer, "webhook TLS handshake failed");
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Keeps the serving certificate fresh and the CA bundle in the webhook configuration current.
#[allow(clippy::too_many_arguments)]
pub async fn maintain(
    client: Client,
    configuration: String,
    ca: ca::SharedCa,
    cert: Arc<ServingCert>,
    mut not_after: OffsetDateTime,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    shutdown: CancellationToken,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut signer = ca.load().signer().to_string();
    loop {
        let now = OffsetDateTime::now_utc();
        let current = ca.load_full();
        // Renew at half-life, and at once when the CA switched signers (a root rotation).
        let rotated = current.signer() != signer;
        if rotated || now + time::Duration::try_from(SERVING_LIFETIME / 2).unwrap_or_default() >= not_after {
            match cert.renew(&current, &dns, &ips) {
                Ok(t) => {
                    not_after = t;
                    signer = current.signer().to_string();
                    tracing::info!(%not_after, rotated, "renewed the webhook serving certificate");
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the webhook serving certificate"),
            }
        }
        let bundle = ByteString(current.trust_bundle().as_bytes().to_vec());
        match api.get_opt(&configuration).await {
            Ok(Some(mut config)) => {
                let webhooks = config.webhooks.iter_mut().flatten();
                let mut changed = false;
                for w in webhooks {
                    if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
                        w.client_config.ca_bundle = Some(bundle.clone());
                        changed = true;
                    }
                }
                if changed {
                    match api.replace(&configuration, &PostParams::default(), &config).await {
                        Ok(_) => {
                            tracing::info!(%configuration, "patched the CA bundle into the webhook configuration")
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot patch the webhook CA bundle"),
                    }
                }
            }
            Ok(None) => tracing::debug!(%configuration, "no webhook configuration to patch"),
            Err(e) => tracing::warn!(%configuration, error = %e, "cannot read the webhook configuration"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Where the webhook listens and the names its certificate covers.
pub fn serving_names(service: &str, namespace: &str, extra: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
    ];
    let mut ips = Vec::new();
    for e in extra {
        match e.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(e.clone()),
        }
    }
    (dns, ips)
}
