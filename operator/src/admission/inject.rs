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
    /// Set on injected pods: what was injected.
    pub const STATUS: &str = "skein.dev/injected";
}

/// UID the sidecar runs as (excluded from transparent capture by that UID).
pub const PROXY_UID: i64 = 1337;
const INIT_CONTAINER: &str = "skein-init";
const VOLUME_IDENTITY: &str = "skein-identity";
const VOLUME_TRUST: &str = "skein-trust";
const VOLUME_STATE: &str = "skein-state";

/// Injection settings of the cluster.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub proxy_image: String,
    /// URL of the config stream, such as `http://skein-operator.skein-system.svc:15012`.
    pub control_plane: String,
    pub operator_namespace: String,
    /// The API server supports native sidecars (Kubernetes ≥ 1.29).
    pub native_sidecars: bool,
}

/// How app traffic reaches the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        None | Some("explicit") => CaptureMode::Explicit,
        Some("transparent") => CaptureMode::Transparent,
        Some(other) => {
            return Decision::Deny(format!(
                "annotation {}: unknown capture mode {other:?} (explicit or transparent)",
                annotation::CAPTURE_MODE
            ))
        }
    };
    let inbound_mode = match annotations.get(annotation::INBOUND_MODE).map(String::as_str) {
        None | Some("strict") => "strict",
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
    let mut resources = ResourceRequirements {
        requests: Some(
            [("cpu".into(), Quantity("10m".into())), ("memory".into(), Quantity("16Mi".into()))].into(),
        ),
        limits: Some([("memory".into(), Quantity("64Mi".into()))].into()),
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
    let log_level = annotations.get(annotation::LOG_LEVEL).cloned().unwrap_or_else(|| "info".into());

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

    // Volumes: identity Secret, trust bundle, and a scratch directory for the last good config.
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(vs) = volumes.as_array_mut() {
        vs.push(json!({"name": VOLUME_IDENTITY, "secret": {"secretName": identity_secret_name(&service_account)}}));
        vs.push(json!({"name": VOLUME_TRUST, "configMap": {"name": TRUST_BUNDLE_CONFIGMAP}}));
        vs.push(json!({"name": VOLUME_STATE, "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}));
    }

    // Explicit mode: the app containers send their HTTP through the sidecar.
    if mode == CaptureMode::Explicit {
        if let Some(cs) = spec.get_mut("containers").and_then(Value::as_array_mut) {
            for c in cs {
                let env = c.as_object_mut().map(|c| c.entry("env").or_insert_with(|| json!([])));
                if let Some(Value::Array(env)) = env {
                    let proxy = format!("http://127.0.0.1:{PROXY_OUTBOUND_PORT}");
                    for name in ["HTTP_PROXY", "http_proxy"] {
                        if !env.iter().any(|e| e.get("name").and_then(Value::as_str) == Some(name)) {
                            env.push(json!({"name": name, "value": proxy}));
                        }
                    }
                    for name in ["NO_PROXY", "no_proxy"] {
                        if !env.iter().any(|e| e.get("name").and_then(Value::as_str) == Some(name)) {
                            env.push(json!({"name": name, "value": "localhost,127.0.0.1"}));
                        }
                    }
                }
            }
        }
    }

    let mut front = Vec::new();
    if mode == CaptureMode::Transparent {
        front.push(serde_json::to_value(init_container(&image, &excluded)).expect("plain data"));
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

/// The transparent-capture init step: `skein-proxy init` installs the iptables redirects.
fn init_container(image: &str, excluded: &[u16]) -> Container {
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
        InjectConfig {
            proxy_image: "ghcr.io/skein/proxy:0.1.0".into(),
            control_plane: "http://skein-operator.skein-system.svc:15012".into(),
            operator_namespace: "skein-system".into(),
            native_sidecars: native,
        }
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
