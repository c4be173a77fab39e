//! Sidecar injection as a pure function: from the pod in an AdmissionReview (raw JSON, so no
//! field the types do not know is lost) to the JSON patch (RFC 6902) that adds the sidecar.
//!
//! The pod is mutated as JSON and the patch is the difference (`json_patch::diff`), so paths and
//! escaping are right by construction. Selection follows DESIGN.md: a namespace or pod label
//! `skein.dev/inject=enabled` opts in, a pod annotation `skein.dev/inject: "false"` opts out,
//! and `kube-system`, `kube-public` and the operator's own namespace are never injected. A pod
//! that already has the sidecar is left alone, so re-invocation changes nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Probe,
    ResourceRequirements, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};
use skein_api::constants::{
    INJECT_ANNOTATION, INJECT_LABEL, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT, PROXY_STATS_PORT,
};
use skein_api::probes::{app_health_path, AppProbe, AppProbes, ProbeAction, APP_PROBES_ENV};

use crate::compute::snapshot::SIDECAR_CONTAINER;
use crate::identity::{identity_secret_name, TRUST_BUNDLE_CONFIGMAP};

/// Annotation overrides a pod may carry.
pub mod annotation {
    pub const PROXY_IMAGE: &str = "skein.dev/proxy-image";
    pub const PROXY_CPU: &str = "skein.dev/proxy-cpu";
    pub const PROXY_MEMORY: &str = "skein.dev/proxy-memory";
    pub const LOG_LEVEL: &str = "skein.dev/log-level";
    pub const EXCLUDE_PORTS: &str = "skein.dev/exclude-ports";
    pub const CAPTURE_MODE: &str = "skein.dev/capture-mode";
    /// `strict` (default: only mTLS from mesh identities) or `permissive` (plaintext too).
    pub const INBOUND_MODE: &str = "skein.dev/inbound-mode";
    /// Seconds an app container keeps serving after its pod is deleted, while the mesh takes
    /// its endpoint out of every proxy (a `preStop` sleep); `0` turns it off.
    pub const DRAIN_SECONDS: &str = "skein.dev/drain-seconds";
    /// Set on injected pods: what was injected.
    pub const STATUS: &str = skein_api::constants::INJECTED_ANNOTATION;
}

/// UID the sidecar runs as (excluded from transparent capture by that UID).
pub const PROXY_UID: i64 = 1337;
const INIT_CONTAINER: &str = "skein-init";
const VOLUME_IDENTITY: &str = "skein-identity";
const VOLUME_TRUST: &str = "skein-trust";
const VOLUME_STATE: &str = "skein-state";
const VOLUME_INIT_RUN: &str = "skein-init-run";

/// Injection settings of the cluster.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub proxy_image: String,
    /// URL of the config stream, such as `https://skein-operator.skein-system.svc:15012`.
    pub control_plane: String,
    pub operator_namespace: String,
    /// The API server supports native sidecars (Kubernetes ≥ 1.29).
    pub native_sidecars: bool,
    /// The API server supports `preStop: {sleep: …}` (Kubernetes ≥ 1.30).
    pub sleep_hooks: bool,
    /// Capture mode of pods without the annotation.
    pub capture: CaptureMode,
    /// Inbound mode of pods without the annotation.
    pub inbound: InboundMode,
    /// The sidecar's resources (requests overridable per pod by annotation).
    pub resources: ProxyResources,
    /// The sidecar's log level (`RUST_LOG`) and format.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Default drain time of app containers, in seconds (see [`annotation::DRAIN_SECONDS`]).
    pub drain_seconds: u32,
}

impl InjectConfig {
    /// The defaults of a cluster, as the operator's flags have them.
    pub fn new(
        proxy_image: &str,
        control_plane: &str,
        operator_namespace: &str,
        native_sidecars: bool,
    ) -> Self {
        Self {
            proxy_image: proxy_image.into(),
            control_plane: control_plane.into(),
            operator_namespace: operator_namespace.into(),
            native_sidecars,
            sleep_hooks: native_sidecars,
            capture: CaptureMode::Transparent,
            inbound: InboundMode::Strict,
            resources: ProxyResources::default(),
            log_level: "info".into(),
            log_format: LogFormat::Plain,
            drain_seconds: 5,
        }
    }
}

/// The sidecar's resource requests and limits (Kubernetes quantities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            cpu_limit: None,
            memory_limit: Some("64Mi".into()),
        }
    }
}

/// Whether the sidecar's inbound listener requires mTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundMode {
    /// Only mTLS from mesh identities.
    Strict,
    /// Plaintext too (while a workload's callers join the mesh).
    Permissive,
}

impl InboundMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
        }
    }
}

pub use skein_api::process::LogFormat;

/// How app traffic reaches the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// The apps' HTTP clients use the sidecar as `HTTP_PROXY`; no privileges.
    Explicit,
    /// An init step redirects the pod's TCP with iptables; needs `NET_ADMIN`.
    Transparent,
}

/// What to do with a pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Apply this JSON patch; the pod runs as `service_account`.
    Inject { patch: json_patch::Patch, service_account: String },
    /// Leave the pod alone, for this reason.
    Skip(String),
    /// Refuse the pod: it asks for injection but cannot be served.
    Deny(String),
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

/// Whether the pod already carries the sidecar (in either form).
fn injected(pod: &Value) -> bool {
    ["containers", "initContainers"].iter().any(|list| {
        get(pod, &["spec", list]).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER))
        })
    })
}

/// Decides and builds the patch for `pod` (the AdmissionReview's `object`) in `namespace`.
pub fn inject_sidecar(
    pod: &Value,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> Decision {
    if ["kube-system", "kube-public"].contains(&namespace) || namespace == cfg.operator_namespace {
        return Decision::Skip(format!("namespace {namespace} is never injected"));
    }
    if !pod.is_object() || get(pod, &["spec"]).and_then(Value::as_object).is_none() {
        return Decision::Deny("the object is not a pod with a spec".into());
    }
    let labels = str_map(get(pod, &["metadata", "labels"]));
    let annotations = str_map(get(pod, &["metadata", "annotations"]));
    if annotations.get(INJECT_ANNOTATION).is_some_and(|v| v == "false") {
        return Decision::Skip("the pod opts out (annotation skein.dev/inject: \"false\")".into());
    }
    let wanted = labels.get(INJECT_LABEL).is_some_and(|v| v == "enabled")
        || namespace_labels.get(INJECT_LABEL).is_some_and(|v| v == "enabled");
    if !wanted {
        return Decision::Skip("neither the pod nor its namespace opts in".into());
    }
    if injected(pod) {
        return Decision::Skip("the sidecar is already injected".into());
    }
    if get(pod, &["spec", "hostNetwork"]).and_then(Value::as_bool) == Some(true) {
        return Decision::Deny(
            "pods with hostNetwork cannot get a sidecar: it would capture the node's traffic".into(),
        );
    }
    let mode = match annotations.get(annotation::CAPTURE_MODE).map(String::as_str) {
        None => cfg.capture,
        Some("explicit") => CaptureMode::Explicit,
        Some("transparent") => CaptureMode::Transparent,
        Some(other) => {
            return Decision::Deny(format!(
                "annotation {}: unknown capture mode {other:?} (explicit or transparent)",
                annotation::CAPTURE_MODE
            ))
        }
    };
    let inbound_mode = match annotations.get(annotation::INBOUND_MODE).map(String::as_str) {
        None => cfg.inbound.as_str(),
        Some("strict") => "strict",
        Some("permissive") => "permissive",
        Some(other) => {
            return Decision::Deny(format!(
                "annotation {}: unknown inbound mode {other:?} (strict or permissive)",
                annotation::INBOUND_MODE
            ))
        }
    };
    let excluded: Vec<u16> = match annotations.get(annotation::EXCLUDE_PORTS) {
        None => Vec::new(),
        Some(list) => {
            match list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::parse).collect() {
                Ok(ports) => ports,
                Err(_) => {
                    return Decision::Deny(format!(
                        "annotation {}: {list:?} is not a list of ports",
                        annotation::EXCLUDE_PORTS
                    ))
                }
            }
        }
    };
    let drain_seconds = match annotations.get(annotation::DRAIN_SECONDS) {
        None => cfg.drain_seconds,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if n <= 300 => n,
            _ => {
                return Decision::Deny(format!(
                    "annotation {}: {v:?} is not a number of seconds from 0 to 300",
                    annotation::DRAIN_SECONDS
                ))
            }
        },
    };
    let r = &cfg.resources;
    let limits: BTreeMap<String, Quantity> = [("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), Quantity(v.clone()?))))
        .collect();
    let mut resources = ResourceRequirements {
        requests: Some(
            [
                ("cpu".into(), Quantity(r.cpu_request.clone())),
                ("memory".into(), Quantity(r.memory_request.clone())),
            ]
            .into(),
        ),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    };
    for (key, resource) in [(annotation::PROXY_CPU, "cpu"), (annotation::PROXY_MEMORY, "memory")] {
        if let Some(v) = annotations.get(key) {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                return Decision::Deny(format!("annotation {key}: {v:?} is not a quantity"));
            }
            resources
                .requests
                .get_or_insert_with(Default::default)
                .insert(resource.into(), Quantity(v.clone()));
        }
    }

    let service_account = get(pod, &["spec", "serviceAccountName"])
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    let image = annotations.get(annotation::PROXY_IMAGE).cloned().unwrap_or_else(|| cfg.proxy_image.clone());
    let log_level = annotations.get(annotation::LOG_LEVEL).cloned().unwrap_or_else(|| cfg.log_level.clone());

    let mut sidecar = sidecar_container(&image, &service_account, namespace, &log_level, cfg, resources);
    if let Some(env) = sidecar.env.as_mut() {
        env.push(EnvVar {
            name: "SKEIN_INBOUND_MODE".into(),
            value: Some(inbound_mode.into()),
            ..Default::default()
        });
    }
    let mut mutated = pod.clone();
    let spec = mutated["spec"].as_object_mut().expect("checked above");

    // Transparent capture sends the kubelet's probes of the app's ports into the inbound
    // listener, which refuses them under strict mTLS: they go to the sidecar instead.
    if mode == CaptureMode::Transparent {
        let probes = rewrite_app_probes(spec, &excluded);
        if !probes.is_empty() {
            if let Some(env) = sidecar.env.as_mut() {
                env.push(EnvVar {
                    name: APP_PROBES_ENV.into(),
                    value: Some(serde_json::to_string(&probes).expect("plain data")),
                    ..Default::default()
                });
            }
        }
    }
    if drain_seconds > 0 && cfg.sleep_hooks {
        add_drain_delay(spec, drain_seconds);
    }

    // Volumes: identity Secret, trust bundle, and a scratch directory for the last good config.
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(vs) = volumes.as_array_mut() {
        vs.push(json!({"name": VOLUME_IDENTITY, "secret": {"secretName": identity_secret_name(&service_account)}}));
        vs.push(json!({"name": VOLUME_TRUST, "configMap": {"name": TRUST_BUNDLE_CONFIGMAP}}));
        vs.push(json!({"name": VOLUME_STATE, "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}));
        if mode == CaptureMode::Transparent {
            // iptables takes its lock in /run, which the read-only root filesystem lacks.
            vs.push(json!({"name": VOLUME_INIT_RUN, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}));
        }
    }

    // Explicit mode: the app containers send their HTTP through the sidecar. Both spellings:
    // curl and busybox wget read only the lowercase `http_proxy`, others only the uppercase.
    // Loopback and the pod's own address are never proxied.
    if mode == CaptureMode::Explicit {
        if let Some(cs) = spec.get_mut("containers").and_then(Value::as_array_mut) {
            for c in cs {
                let env = c.as_object_mut().map(|c| c.entry("env").or_insert_with(|| json!([])));
                if let Some(Value::Array(env)) = env {
                    let has = |env: &Vec<Value>, name: &str| {
                        env.iter().any(|e| e.get("name").and_then(Value::as_str) == Some(name))
                    };
                    let proxy = format!("http://127.0.0.1:{PROXY_OUTBOUND_PORT}");
                    for name in ["HTTP_PROXY", "http_proxy"] {
                        if !has(env, name) {
                            env.push(json!({"name": name, "value": proxy}));
                        }
                    }
                    if !has(env, POD_IP_ENV) {
                        env.push(json!({"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}));
                    }
                    for name in ["NO_PROXY", "no_proxy"] {
                        if !has(env, name) {
                            env.push(json!({"name": name, "value": format!("localhost,127.0.0.1,::1,$({POD_IP_ENV})")}));
                        }
                    }
                }
            }
        }
    }

    let mut front = Vec::new();
    if mode == CaptureMode::Transparent {
        front.push(
            serde_json::to_value(init_container(&image, &excluded, &cfg.resources)).expect("plain data"),
        );
    }
    if cfg.native_sidecars {
        // A native sidecar: an init container that keeps running; the startup probe holds the
        // app containers until certificates and the first config are loaded.
        sidecar.restart_policy = Some("Always".into());
        front.push(serde_json::to_value(&sidecar).expect("plain data"));
    } else {
        // Before native sidecars: the first container; kubelet starts containers in order and
        // waits for a postStart hook, which waits until the proxy is ready.
        sidecar.lifecycle = Some(k8s_openapi::api::core::v1::Lifecycle {
            post_start: Some(k8s_openapi::api::core::v1::LifecycleHandler {
                exec: Some(k8s_openapi::api::core::v1::ExecAction {
                    command: Some(vec!["/usr/local/bin/skein-proxy".into(), "wait-ready".into()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        match spec.entry("containers").or_insert_with(|| json!([])).as_array_mut() {
            Some(cs) => cs.insert(0, serde_json::to_value(&sidecar).expect("plain data")),
            None => return Decision::Deny("spec.containers is not a list".into()),
        }
    }
    if !front.is_empty() {
        match spec.entry("initContainers").or_insert_with(|| json!([])).as_array_mut() {
            Some(inits) => {
                inits.splice(0..0, front);
            }
            None => return Decision::Deny("spec.initContainers is not a list".into()),
        }
    }

    let meta = mutated.as_object_mut().expect("checked above").entry("metadata").or_insert_with(|| json!({}));
    if let Some(meta) = meta.as_object_mut() {
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = annotations.as_object_mut() {
            let form = if cfg.native_sidecars { "native-sidecar" } else { "container" };
            let capture = if mode == CaptureMode::Explicit { "explicit" } else { "transparent" };
            a.insert(annotation::STATUS.into(), json!(format!("{form},{capture}")));
        }
    }
    Decision::Inject { patch: json_patch::diff(pod, &mutated), service_account }
}

fn sidecar_container(
    image: &str,
    service_account: &str,
    namespace: &str,
    log_level: &str,
    cfg: &InjectConfig,
    resources: ResourceRequirements,
) -> Container {
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
        ..Default::default()
    };
    let env = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    };
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        ..Default::default()
    };
    let probe = |path: &str, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            // The read-only listener on the pod IP: the kubelet probes from the node, and the
            // admin port answers on loopback only.
            port: IntOrString::Int(i32::from(PROXY_STATS_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(1),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(image.into()),
        args: Some(vec![
            "--control-plane".into(),
            cfg.control_plane.clone(),
            "--state-dir".into(),
            "/var/run/skein/state".into(),
        ]),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(field("metadata.name")),
                ..Default::default()
            },
            env("SKEIN_IDENTITY", &format!("{namespace}/{service_account}")),
            env("SKEIN_CERT_DIR", "/var/run/skein/identity"),
            env("SKEIN_TRUST_DIR", "/var/run/skein/trust"),
            env("RUST_LOG", log_level),
            env("SKEIN_LOG_FORMAT", if cfg.log_format == LogFormat::Json { "json" } else { "plain" }),
        ]),
        ports: Some(vec![
            // Only what other pods and the node reach; 15001 and 15000 are loopback-only.
            port("skein-inbound", PROXY_INBOUND_PORT),
            port("skein-stats", PROXY_STATS_PORT),
        ]),
        startup_probe: Some(probe("/ready", 120)),
        readiness_probe: Some(probe("/ready", 3)),
        liveness_probe: Some(probe("/live", 10)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount(VOLUME_IDENTITY, "/var/run/skein/identity", true),
            mount(VOLUME_TRUST, "/var/run/skein/trust", true),
            mount(VOLUME_STATE, "/var/run/skein/state", false),
        ]),
        ..Default::default()
    }
}

/// The environment variable holding the pod's IP in explicit mode, for `NO_PROXY`.
const POD_IP_ENV: &str = "SKEIN_POD_IP";

/// Rewrites the HTTP and TCP probes of the app containers in `spec` to the sidecar's
/// `/app-health/<container>/<kind>` on its read-only port, and returns the originals for the
/// sidecar. Probes on an excluded port (not captured), with a `host` (not the pod), over HTTPS,
/// or on a port name the container does not declare are left as they are.
fn rewrite_app_probes(spec: &mut serde_json::Map<String, Value>, excluded: &[u16]) -> AppProbes {
    let mut out = AppProbes::new();
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else {
        return out;
    };
    for c in containers {
        let Some(name) = c.get("name").and_then(Value::as_str).map(str::to_string) else { continue };
        let ports = c.get("ports").cloned().unwrap_or(Value::Null);
        let resolve = |port: &Value| -> Option<u16> {
            match port {
                Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                Value::String(s) => s.parse().ok().or_else(|| {
                    ports
                        .as_array()?
                        .iter()
                        .find(|p| p.get("name").and_then(Value::as_str) == Some(s))?
                        .get("containerPort")?
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                }),
                _ => None,
            }
        };
        for (field, kind) in
            [("startupProbe", "startup"), ("readinessProbe", "readiness"), ("livenessProbe", "liveness")]
        {
            let Some(probe) = c.get_mut(field).and_then(Value::as_object_mut) else { continue };
            let timeout_seconds = probe
                .get("timeoutSeconds")
                .and_then(Value::as_u64)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(1);
            let action = if let Some(get) = probe.get("httpGet") {
                let scheme = get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
                let Some(port) = get.get("port").and_then(resolve) else { continue };
                if get.get("host").is_some()
                    || !scheme.eq_ignore_ascii_case("http")
                    || excluded.contains(&port)
                {
                    continue;
                }
                let headers = get
                    .get("httpHeaders")
                    .and_then(Value::as_array)
                    .map(|hs| {
                        hs.iter()
                            .filter_map(|h| {
                                Some((
                                    h.get("name")?.as_str()?.to_string(),
                                    h.get("value")?.as_str()?.to_string(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let path = get.get("path").and_then(Value::as_str).filter(|p| !p.is_empty()).unwrap_or("/");
                ProbeAction::HttpGet { port, path: path.to_string(), headers }
            } else if let Some(tcp) = probe.get("tcpSocket") {
                let Some(port) = tcp.get("port").and_then(resolve) else { continue };
                if tcp.get("host").is_some() || excluded.contains(&port) {
                    continue;
                }
                ProbeAction::TcpSocket { port }
            } else {
                continue;
            };
            // One the sidecar could not send stays with the kubelet (and the sidecar starts).
            if action.unsendable().is_some() {
                continue;
            }
            let path = app_health_path(&name, kind);
            probe.remove("tcpSocket");
            probe.insert("httpGet".into(), json!({"path": path, "port": PROXY_STATS_PORT, "scheme": "HTTP"}));
            out.insert(path, AppProbe { action, timeout_seconds });
        }
    }
    out
}

/// Gives every app container without a `preStop` hook a `preStop` sleep: after the pod is
/// deleted its endpoint leaves every proxy's config within this time, while the app still
/// answers what reaches it, and only then does the app get SIGTERM.
fn add_drain_delay(spec: &mut serde_json::Map<String, Value>, seconds: u32) {
    let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) else { return };
    for c in containers.iter_mut().filter_map(Value::as_object_mut) {
        if c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER) {
            continue;
        }
        let lifecycle = c.entry("lifecycle").or_insert_with(|| json!({}));
        if let Some(l) = lifecycle.as_object_mut() {
            l.entry("preStop").or_insert_with(|| json!({"sleep": {"seconds": seconds}}));
        }
    }
}

/// The transparent-capture init step: `skein-proxy init` installs the iptables redirects.
fn init_container(image: &str, excluded: &[u16], resources: &ProxyResources) -> Container {
    let mut args = vec!["init".to_string(), "--proxy-uid".into(), PROXY_UID.to_string()];
    if !excluded.is_empty() {
        args.push("--exclude-ports".into());
        args.push(excluded.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(image.into()),
        command: Some(vec!["/usr/local/bin/skein-proxy".into()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".into(), Quantity(resources.cpu_request.clone())),
                    ("memory".into(), Quantity(resources.memory_request.clone())),
                ]
                .into(),
            ),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME_INIT_RUN.into(),
            mount_path: "/run".into(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(native: bool) -> InjectConfig {
        let mut cfg = InjectConfig::new(
            "ghcr.io/skein/proxy:0.1.0",
            "https://skein-operator.skein-system.svc:15012",
            "skein-system",
            native,
        );
        cfg.capture = CaptureMode::Explicit;
        cfg
    }

    fn pod(labels: Value, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-0", "labels": labels, "annotations": annotations},
            "spec": {
                "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "example/web:1", "env": [{"name": "A", "value": "1"}]}],
                "x-unknown-field": {"kept": true}
            }
        })
    }

    fn enabled() -> BTreeMap<String, String> {
        [(INJECT_LABEL.to_string(), "enabled".to_string())].into()
    }

    fn apply(pod: &Value, d: &Decision) -> Value {
        let Decision::Inject { patch, .. } = d else { panic!("expected injection, got {d:?}") };
        let mut out = pod.clone();
        json_patch::patch(&mut out, patch).expect("the patch applies");
        out
    }

    #[test]
    fn a_labelled_namespace_gets_a_native_sidecar() {
        let p = pod(json!({}), json!({}));
        let d = inject_sidecar(&p, "shop", &enabled(), &cfg(true));
        let out = apply(&p, &d);
        let sidecar = &out["spec"]["initContainers"][0];
        assert_eq!(sidecar["name"], "skein-proxy");
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
        // Every probe goes to the read-only listener: the admin port is loopback-only.
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(sidecar[probe]["httpGet"]["port"], 15020, "{probe}");
        }
        let ports: Vec<i64> = sidecar["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, vec![15006, 15020]);
        assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
        assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(sidecar["securityContext"]["allowPrivilegeEscalation"], false);
        assert!(sidecar["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "skein-identity" && m["readOnly"] == true));
        assert!(sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "SKEIN_IDENTITY" && e["value"] == "shop/web"));
        let volumes = out["spec"]["volumes"].as_array().unwrap();
        assert!(volumes.iter().any(|v| v["secret"]["secretName"] == "skein-identity-web"));
        assert!(volumes.iter().any(|v| v["configMap"]["name"] == "skein-trust-bundle"));
        // Explicit capture: the app uses the sidecar as its HTTP proxy; its own env is kept.
        let env = out["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "HTTP_PROXY" && e["value"] == "http://127.0.0.1:15001"));
        assert!(env.iter().any(|e| e["name"] == "A"));
        assert_eq!(out["spec"]["x-unknown-field"]["kept"], true, "fields the types do not know survive");
        assert_eq!(out["metadata"]["annotations"]["skein.dev/injected"], "native-sidecar,explicit");
        assert!(matches!(d, Decision::Inject { ref service_account, .. } if service_account == "web"));
    }

    #[test]
    fn older_servers_get_a_first_container_the_app_waits_on() {
        let p = pod(json!({"skein.dev/inject": "enabled"}), json!({}));
        let out = apply(&p, &inject_sidecar(&p, "shop", &BTreeMap::new(), &cfg(false)));
        assert_eq!(out["spec"]["containers"][0]["name"], "skein-proxy");
        assert_eq!(out["spec"]["containers"][1]["name"], "app");
        assert!(out["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"].is_object());
        assert!(out["spec"].get("initContainers").is_none());
    }

    #[test]
    fn opt_out_system_namespaces_and_uninvited_pods_are_left_alone() {
        let p = pod(json!({"skein.dev/inject": "enabled"}), json!({"skein.dev/inject": "false"}));
        assert!(matches!(inject_sidecar(&p, "shop", &enabled(), &cfg(true)), Decision::Skip(_)));
        let p = pod(json!({"skein.dev/inject": "enabled"}), json!({}));
        for ns in ["kube-system", "kube-public", "skein-system"] {
            assert!(matches!(inject_sidecar(&p, ns, &enabled(), &cfg(true)), Decision::Skip(_)), "{ns}");
        }
        let plain = pod(json!({}), json!({}));
        assert!(matches!(inject_sidecar(&plain, "shop", &BTreeMap::new(), &cfg(true)), Decision::Skip(_)));
    }

    #[test]
    fn injection_is_idempotent() {
        let p = pod(json!({}), json!({}));
        let once = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        let again = inject_sidecar(&once, "shop", &enabled(), &cfg(true));
        assert_eq!(again, Decision::Skip("the sidecar is already injected".into()));
    }

    #[test]
    fn transparent_mode_adds_the_capture_init_step_first() {
        let p = pod(
            json!({}),
            json!({"skein.dev/capture-mode": "transparent", "skein.dev/exclude-ports": "3306, 6379"}),
        );
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        let inits = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], "skein-init");
        assert_eq!(inits[1]["name"], "skein-proxy");
        assert!(inits[0]["securityContext"]["capabilities"]["add"]
            .as_array()
            .unwrap()
            .contains(&json!("NET_ADMIN")));
        assert_eq!(inits[0]["args"], json!(["init", "--proxy-uid", "1337", "--exclude-ports", "3306,6379"]));
        let env = out["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(!env.iter().any(|e| e["name"] == "HTTP_PROXY"), "no HTTP_PROXY in transparent mode");
    }

    #[test]
    fn overrides_apply_and_bad_ones_are_denied_with_the_annotation_named() {
        let p = pod(
            json!({}),
            json!({"skein.dev/proxy-image": "my/proxy:dev", "skein.dev/proxy-memory": "32Mi", "skein.dev/log-level": "debug"}),
        );
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        let s = &out["spec"]["initContainers"][0];
        assert_eq!(s["image"], "my/proxy:dev");
        assert_eq!(s["resources"]["requests"]["memory"], "32Mi");
        assert!(s["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug"));
        assert!(s["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "SKEIN_INBOUND_MODE" && e["value"] == "strict"));
        for (key, value) in [
            ("skein.dev/capture-mode", "magic"),
            ("skein.dev/exclude-ports", "http"),
            ("skein.dev/proxy-cpu", "1 core"),
            ("skein.dev/inbound-mode", "open"),
        ] {
            let p = pod(json!({}), json!({key: value}));
            match inject_sidecar(&p, "shop", &enabled(), &cfg(true)) {
                Decision::Deny(why) => assert!(why.contains(key), "{why}"),
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn transparent_is_the_cluster_default_and_explicit_sets_both_proxy_spellings() {
        let p = pod(json!({}), json!({}));
        let mut transparent = cfg(true);
        transparent.capture = CaptureMode::Transparent;
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &transparent));
        assert_eq!(out["spec"]["initContainers"][0]["name"], "skein-init");
        assert_eq!(out["metadata"]["annotations"]["skein.dev/injected"], "native-sidecar,transparent");
        // The init step keeps a read-only root and gets a writable /run for the iptables lock.
        let init = &out["spec"]["initContainers"][0];
        assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(init["volumeMounts"][0]["mountPath"], "/run");

        let p = pod(json!({}), json!({"skein.dev/capture-mode": "explicit"}));
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &transparent));
        let env = out["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
        assert_eq!(value("HTTP_PROXY"), Some(json!("http://127.0.0.1:15001")));
        assert_eq!(value("http_proxy"), Some(json!("http://127.0.0.1:15001")));
        for name in ["NO_PROXY", "no_proxy"] {
            assert_eq!(value(name), Some(json!("localhost,127.0.0.1,::1,$(SKEIN_POD_IP)")), "{name}");
        }
        // The pod IP is defined before the variables that refer to it.
        let pos = |name: &str| env.iter().position(|e| e["name"] == name).unwrap();
        assert!(pos("SKEIN_POD_IP") < pos("NO_PROXY"));
        assert_eq!(env[pos("SKEIN_POD_IP")]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    }

    #[test]
    fn app_probes_go_to_the_sidecar_in_transparent_mode() {
        let mut p = pod(
            json!({}),
            json!({"skein.dev/capture-mode": "transparent", "skein.dev/exclude-ports": "9999"}),
        );
        p["spec"]["containers"][0]["ports"] = json!([{"name": "http", "containerPort": 8080}]);
        p["spec"]["containers"][0]["readinessProbe"] = json!({
            "httpGet": {"path": "/ready", "port": "http", "httpHeaders": [{"name": "x-probe", "value": "1"}]},
            "timeoutSeconds": 3, "periodSeconds": 2
        });
        p["spec"]["containers"][0]["livenessProbe"] = json!({"tcpSocket": {"port": 8080}});
        p["spec"]["containers"][0]["startupProbe"] = json!({"httpGet": {"path": "/", "port": 9999}});
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        let app = &out["spec"]["containers"][0];
        assert_eq!(
            app["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/app/readiness", "port": 15020, "scheme": "HTTP"},
                   "timeoutSeconds": 3, "periodSeconds": 2})
        );
        assert_eq!(app["livenessProbe"]["httpGet"]["path"], "/app-health/app/liveness");
        assert!(app["livenessProbe"].get("tcpSocket").is_none());
        // An excluded port is not captured: its probe reaches the app as it is.
        assert_eq!(app["startupProbe"]["httpGet"]["port"], 9999);
        let sidecar = &out["spec"]["initContainers"][1];
        let probes =
            sidecar["env"].as_array().unwrap().iter().find(|e| e["name"] == "SKEIN_APP_PROBES").unwrap();
        let probes: AppProbes = serde_json::from_str(probes["value"].as_str().unwrap()).unwrap();
        assert_eq!(
            probes["/app-health/app/readiness"],
            AppProbe {
                action: ProbeAction::HttpGet {
                    port: 8080,
                    path: "/ready".into(),
                    headers: vec![("x-probe".into(), "1".into())]
                },
                timeout_seconds: 3
            }
        );
        assert_eq!(probes["/app-health/app/liveness"].action, ProbeAction::TcpSocket { port: 8080 });
        assert_eq!(probes.len(), 2);

        // A probe the sidecar could not send (a header value with a line break) stays as it is.
        let mut odd = p.clone();
        odd["spec"]["containers"][0]["readinessProbe"]["httpGet"]["httpHeaders"] =
            json!([{"name": "x-probe", "value": "a\r\nb: c"}]);
        let out = apply(&odd, &inject_sidecar(&odd, "shop", &enabled(), &cfg(true)));
        assert_eq!(out["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"], "http");

        // Explicit mode leaves probes alone: nothing is captured there.
        p["metadata"]["annotations"]["skein.dev/capture-mode"] = json!("explicit");
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        assert_eq!(out["spec"]["containers"][0]["livenessProbe"], json!({"tcpSocket": {"port": 8080}}));
    }

    #[test]
    fn app_containers_drain_before_they_stop() {
        let mut p = pod(json!({}), json!({}));
        p["spec"]["containers"].as_array_mut().unwrap().push(
            json!({"name": "own", "image": "x", "lifecycle": {"preStop": {"exec": {"command": ["stop"]}}}}),
        );
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        assert_eq!(out["spec"]["containers"][0]["lifecycle"]["preStop"], json!({"sleep": {"seconds": 5}}));
        assert_eq!(
            out["spec"]["containers"][1]["lifecycle"]["preStop"]["exec"]["command"],
            json!(["stop"]),
            "its own hook is kept"
        );
        let p = pod(json!({}), json!({"skein.dev/drain-seconds": "0"}));
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &cfg(true)));
        assert!(out["spec"]["containers"][0].get("lifecycle").is_none());
        let p = pod(json!({}), json!({"skein.dev/drain-seconds": "forever"}));
        assert!(
            matches!(inject_sidecar(&p, "shop", &enabled(), &cfg(true)), Decision::Deny(why) if why.contains("drain-seconds"))
        );
    }

    #[test]
    fn cluster_settings_reach_the_sidecar() {
        let mut c = cfg(true);
        c.inbound = InboundMode::Permissive;
        c.log_level = "debug".into();
        c.log_format = LogFormat::Json;
        c.resources.cpu_limit = Some("500m".into());
        c.resources.memory_limit = None;
        let p = pod(json!({}), json!({}));
        let out = apply(&p, &inject_sidecar(&p, "shop", &enabled(), &c));
        let s = &out["spec"]["initContainers"][0];
        let env = s["env"].as_array().unwrap();
        for (name, value) in
            [("SKEIN_INBOUND_MODE", "permissive"), ("RUST_LOG", "debug"), ("SKEIN_LOG_FORMAT", "json")]
        {
            assert!(env.iter().any(|e| e["name"] == name && e["value"] == value), "{name}");
        }
        assert_eq!(s["resources"]["limits"], json!({"cpu": "500m"}));
        assert_eq!(s["resources"]["requests"], json!({"cpu": "10m", "memory": "16Mi"}));
    }

    #[test]
    fn malformed_objects_are_denied_not_panicked_on() {
        for bad in [
            json!(null),
            json!("pod"),
            json!({"metadata": {}}),
            json!({"spec": {"initContainers": "x"}, "metadata": {"labels": {"skein.dev/inject": "enabled"}}}),
        ] {
            let d = inject_sidecar(&bad, "shop", &enabled(), &cfg(true));
            assert!(matches!(d, Decision::Deny(_) | Decision::Skip(_)), "{d:?}");
        }
    }
}
