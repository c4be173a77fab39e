//! The sidecar-injecting admission webhook (HTTPS on 9443, path `/inject`): AdmissionReview v1
//! in, a JSON patch out. The decision is [`crate::admission::inject::inject_sidecar`]; this shell reads the
//! namespace's labels, signs the service account's certificate when it has none (or one past
//! half-life) unless the request is a dry run, and answers. Malformed input is answered
//! `invalid` (or HTTP 400 when not even the request's uid can be read), never with a panic.
//!
//! The serving certificate ([`crate::identity::serving`]) is renewed here without a restart,
//! and the CA bundle is patched into the MutatingWebhookConfiguration `skein-sidecar-injector`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;
use serde_json::{json, Value};
use skein_api::WorkloadIdentity;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::inject::{inject_sidecar, Decision, InjectConfig};
use crate::identity::ca;
use crate::identity::serving::{ServingCert, SERVING_LIFETIME};
use crate::identity::{identity_secret_name, workload_secret, Issued};
use crate::k8s::identity::create_or_replace;
use crate::k8s::permissions::Permissions;
use crate::metrics::{AdmissionLabels, Metrics};

/// Name of the MutatingWebhookConfiguration whose CA bundle the operator keeps current.
pub const WEBHOOK_CONFIGURATION: &str = "skein-sidecar-injector";
/// How long a namespace's labels are trusted from the cache.
const NAMESPACE_TTL: Duration = Duration::from_secs(5);

/// Why the webhook could not give a pod's service account its certificate.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("Kubernetes API")]
    Api(#[from] kube::Error),
    #[error("signing")]
    Sign(#[from] ca::CaError),
}

/// What the webhook answers an AdmissionReview, before it is written as one.
#[derive(Debug)]
pub enum Answer {
    /// Not a pod being created: nothing to do.
    Allowed,
    /// Injected with this JSON patch.
    Injected(json_patch::Patch),
    /// A pod left alone, for this reason.
    Skipped(String),
    /// A pod refused: it asks for injection but cannot be served.
    Denied(String),
    /// The review itself is malformed.
    Invalid(String),
    /// Injection was decided but the certificate could not be issued.
    IssueFailed { identity: WorkloadIdentity, error: IssueError },
}

impl Answer {
    /// The `result` label of `skein_operator_admissions_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Injected(_) => "injected",
            Self::Skipped(_) => "skipped",
            Self::Denied(_) => "denied",
            Self::Invalid(_) => "invalid",
            Self::IssueFailed { .. } => "issue-failed",
        }
    }

    /// The AdmissionReview response for request `uid`.
    fn review(&self, uid: &str) -> Response {
        let response = match self {
            Self::Allowed | Self::Skipped(_) => json!({"allowed": true}),
            Self::Injected(patch) => {
                let patch = serde_json::to_vec(patch).expect("a patch serializes");
                json!({"allowed": true, "patchType": "JSONPatch", "patch": ByteString(patch)})
            }
            Self::Denied(why) => {
                json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": format!("skein sidecar injection: {why}")}})
            }
            Self::Invalid(message) => {
                json!({"allowed": false, "status": {"code": 400, "reason": "BadRequest", "message": message}})
            }
            Self::IssueFailed { identity, error } => {
                json!({"allowed": false, "status": {"code": 500, "message": format!("cannot issue the certificate of {identity}: {}", skein_api::process::error_chain(error))}})
            }
        };
        review(uid, response)
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
    /// Where refusals for want of an RBAC permission are reported (in a cluster).
    permissions: Option<Arc<Permissions>>,
    /// What this replica issued (shared with the leader's identity loop).
    issued: Arc<Issued>,
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
            permissions: None,
            issued: Arc::default(),
        }
    }

    /// Shares the record of issued certificates with the identity loop.
    pub fn with_issued(mut self, issued: Arc<Issued>) -> Self {
        self.issued = issued;
        self
    }

    /// Reports the API server's refusals through `permissions`.
    pub fn with_permissions(mut self, permissions: Arc<Permissions>) -> Self {
        self.permissions = Some(permissions);
        self
    }

    /// Whether `error` was a refusal for want of a permission (then it has been reported).
    async fn refused(&self, error: &kube::Error, needed_for: &str) -> bool {
        match &self.permissions {
            Some(p) => p.check(error, needed_for).await.is_some(),
            None => false,
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
                if !self.refused(&e, "read the labels of a namespace where a pod is created").await {
                    tracing::warn!(%namespace, error = %e, "cannot read the namespace's labels");
                }
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
    async fn ensure_trust_bundle(&self, namespace: &str) -> Result<(), IssueError> {
        let Some(client) = &self.client else { return Ok(()) };
        if self.bundles.lock().unwrap_or_else(|e| e.into_inner()).contains(namespace) {
            return Ok(());
        }
        // Created, never read (the operator may not read ConfigMaps outside its namespace); one
        // that exists is the leader's to keep current, and is kept as it is (a webhook whose CA
        // lags a rotation by a few seconds must not write an older bundle over a newer one).
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let cm = crate::identity::trust_bundle_configmap(self.ca.load().trust_bundle());
        match api.create(&PostParams::default(), &cm).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        self.bundles.lock().unwrap_or_else(|e| e.into_inner()).insert(namespace.to_string());
        Ok(())
    }

    /// Makes sure the service account has a current certificate Secret (not on dry runs). The
    /// Secret is written, never read (the operator may not read Secrets outside its namespace):
    /// unless this replica issued a current one under the CA in force, it signs one and writes
    /// it, replacing what is there. So after a restart the first pod of each service account
    /// gets a fresh certificate, and never an expired one kept from a long idle.
    async fn ensure_identity(&self, identity: &WorkloadIdentity) -> Result<(), IssueError> {
        let Some(client) = &self.client else { return Ok(()) };
        self.ensure_trust_bundle(&identity.namespace).await?;
        let now = OffsetDateTime::now_utc();
        let ca = self.ca.load();
        if self.issued.current(identity, &ca, self.lifetime, now).is_some() {
            return Ok(());
        }
        let cert = ca.sign_workload(identity, &self.trust_domain, self.lifetime, now)?;
        let api: Api<Secret> = Api::namespaced(client.clone(), &identity.namespace);
        let name = identity_secret_name(&identity.service_account);
        create_or_replace(&api, &name, &workload_secret(identity, &self.trust_domain, &cert)).await?;
        self.issued.record(identity, cert.not_after, &ca);
        self.metrics.certificates_signed.inc();
        Ok(())
    }
}

fn review(uid: &str, response: Value) -> Response {
    let mut response = response;
    response["uid"] = json!(uid);
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `POST /inject`. Input that is not even an AdmissionReview with a uid gets HTTP 400;
/// everything else an AdmissionReview answer, counted by its [`Answer::metric_label`].
pub async fn handle(State(state): State<Arc<WebhookState>>, body: Bytes) -> Response {
    let review_in: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {e}\n")).into_response(),
    };
    let request = &review_in["request"];
    let Some(uid) = request["uid"].as_str() else {
        return (StatusCode::BAD_REQUEST, "AdmissionReview without request.uid\n").into_response();
    };
    let answer = answer(&state, &review_in).await;
    state.metrics.admissions.get_or_create(&AdmissionLabels { result: answer.metric_label() }).inc();
    match &answer {
        Answer::Skipped(why) => tracing::debug!(%why, "not injecting"),
        Answer::IssueFailed { identity, error } => {
            let needed_for = format!("issue the certificate of {identity}");
            let refused = match error {
                IssueError::Api(e) => state.refused(e, &needed_for).await,
                IssueError::Sign(_) => false,
            };
            if !refused {
                tracing::warn!(%identity, error = %skein_api::process::error_chain(error), "cannot issue a certificate")
            }
        }
        _ => {}
    }
    answer.review(uid)
}

/// Decides the answer to a review whose request has a uid.
async fn answer(state: &WebhookState, review_in: &Value) -> Answer {
    let request = &review_in["request"];
    if review_in["apiVersion"] != "admission.k8s.io/v1" || review_in["kind"] != "AdmissionReview" {
        return Answer::Invalid("expected an admission.k8s.io/v1 AdmissionReview".into());
    }
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return Answer::Allowed;
    }
    let Some(namespace) =
        request["namespace"].as_str().or_else(|| request["object"]["metadata"]["namespace"].as_str())
    else {
        return Answer::Invalid("request.namespace is missing".into());
    };
    let labels = state.namespace_labels(namespace).await;
    match inject_sidecar(&request["object"], namespace, &labels, &state.inject) {
        Decision::Skip(why) => Answer::Skipped(why),
        Decision::Deny(why) => Answer::Denied(why),
        Decision::Inject { patch, service_account } => {
            let dry_run = request["dryRun"].as_bool().unwrap_or(false);
            if !dry_run {
                let identity = WorkloadIdentity::new(namespace, service_account);
                if let Err(error) = state.ensure_identity(&identity).await {
                    return Answer::IssueFailed { identity, error };
                }
            }
            Answer::Injected(patch)
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
    permissions: Arc<Permissions>,
    shutdown: CancellationToken,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let needed_for = format!("keep the CA bundle of the webhook configuration {configuration} current");
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
                        Err(e) => {
                            if permissions.check(&e, &needed_for).await.is_none() {
                                tracing::warn!(error = %e, "cannot patch the webhook CA bundle")
                            }
                        }
                    }
                }
            }
            Ok(None) => tracing::debug!(%configuration, "no webhook configuration to patch"),
            Err(e) => {
                if permissions.check(&e, &needed_for).await.is_none() {
                    tracing::warn!(%configuration, error = %e, "cannot read the webhook configuration")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
