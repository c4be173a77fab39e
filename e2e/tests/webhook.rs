//! The injecting webhook against a real API server: registered by URL on 127.0.0.1, its CA
//! bundle patched in by the operator, pods in a labelled namespace stored with the sidecar,
//! their certificate Secret issued, dry runs without side effects, other namespaces untouched.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::time::Duration;

use skein_e2e::*;

/// Deletes the webhook configuration when the test ends, so no later pod creation depends on
/// an operator that is gone.
struct Registration(String);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "mutatingwebhookconfiguration", &self.0, "--ignore-not-found"], None);
    }
}

fn pod(name: &str, sa: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: web}}}}
spec:
  serviceAccountName: {sa}
  nodeName: {FAKE_NODE}
  containers: [{{name: app, image: example.invalid/web:1}}]
"#
    )
}

#[test]
fn pods_in_a_labelled_namespace_are_injected_with_their_identity() {
    if !cluster_available("pods_in_a_labelled_namespace_are_injected_with_their_identity") {
        return;
    }
    install_crds();
    let control = TestNamespace::create("webhook");
    let operator = Operator::start(&control.name, "op-0");
    let meshed = TestNamespace::create("meshed");
    let plain = TestNamespace::create("plain");
    // The namespaces this test owns carry a marker, so the webhook never sees anyone else's pods.
    let marker = format!("skein.dev/e2e={}", control.name);
    kubectl_ok(&["label", "namespace", &meshed.name, "skein.dev/inject=enabled", &marker], None);
    kubectl_ok(&["label", "namespace", &plain.name, &marker], None);

    let name = operator.webhook_configuration.clone();
    let _registration = Registration(name.clone());
    let config = format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: {name}}}
webhooks:
  - name: inject.skein.dev
    admissionReviewVersions: [v1]
    sideEffects: NoneOnDryRun
    failurePolicy: Fail
    reinvocationPolicy: IfNeeded
    timeoutSeconds: 10
    clientConfig: {{url: "https://127.0.0.1:{port}/inject"}}
    namespaceSelector:
      matchLabels: {{skein.dev/e2e: {ns}}}
    rules:
      - {{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}
"#,
        port = operator.webhook_port,
        ns = control.name
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&config));
    eventually("the operator to patch the CA bundle in", Duration::from_secs(15), || {
        let c = get_json("default", &format!("mutatingwebhookconfiguration/{name}"))?;
        if c["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty()) {
            Ok(())
        } else {
            Err("no caBundle yet".into())
        }
    });

    // A pod in the labelled namespace is stored with the native sidecar and its volumes.
    kubectl_ok(&["-n", &meshed.name, "apply", "-f", "-"], Some(&pod("web-0", "web")));
    let stored = get_json(&meshed.name, "pod/web-0").unwrap();
    let sidecar = &stored["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "skein-proxy", "{stored}");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert!(stored["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["secret"]["secretName"] == "skein-identity-web"));
    assert!(stored["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "HTTP_PROXY"));
    let secret = get_json(&meshed.name, "secret/skein-identity-web")
        .expect("the certificate Secret was issued at injection");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    // The trust bundle the pod mounts exists already: the first meshed pod does not wait for it.
    let bundle = get_json(&meshed.name, "configmap/skein-trust-bundle")
        .expect("the trust bundle was published at injection");
    assert_eq!(
        bundle["data"]["roots.pem"].as_str().unwrap(),
        decode(secret["data"]["ca.crt"].as_str().unwrap())
    );

    // Creating it again (e.g. a re-invocation) does not inject twice.
    let again = kubectl_ok(
        &["-n", &meshed.name, "create", "--dry-run=server", "-o", "json", "-f", "-"],
        Some(&pod("web-1", "dry")),
    );
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    let names: Vec<&str> = again["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["skein-proxy"], "one sidecar");
    // ...and the dry run had no side effect: no Secret for its service account.
    assert!(get_json(&meshed.name, "secret/skein-identity-dry").is_err(), "a dry run issues no certificate");

    // A pod in a namespace without the label is untouched.
    kubectl_ok(&["-n", &plain.name, "apply", "-f", "-"], Some(&pod("web-0", "web")));
    let untouched = get_json(&plain.name, "pod/web-0").unwrap();
    assert!(untouched["spec"].get("initContainers").is_none(), "{untouched}");
    assert_eq!(untouched["spec"]["containers"].as_array().unwrap().len(), 1);

    // A Deployment's pod template is not a pod: stored as written. The pod a ReplicaSet would
    // make from it (generateName, no name yet) is injected.
    let deployment = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      serviceAccountName: api
      nodeName: e2e-played-node
      containers: [{name: app, image: example.invalid/api:1}]
"#;
    kubectl_ok(&["-n", &meshed.name, "apply", "-f", "-"], Some(deployment));
    let stored = get_json(&meshed.name, "deployment/api").unwrap();
    assert_eq!(stored["spec"]["template"]["spec"]["containers"].as_array().unwrap().len(), 1);
    let template = &stored["spec"]["template"];
    let from_template = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "api-7d9f-", "labels": template["metadata"]["labels"]},
        "spec": template["spec"],
    });
    let created = kubectl_ok(
        &["-n", &meshed.name, "create", "-o", "json", "-f", "-"],
        Some(&from_template.to_string()),
    );
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["spec"]["initContainers"][0]["name"], "skein-proxy", "{created}");
    assert!(
        get_json(&meshed.name, "secret/skein-identity-api").is_ok(),
        "its service account got a certificate"
    );

    // An opted-out pod in the labelled namespace is untouched too.
    let opted_out = pod("web-2", "web")
        .replace("labels: {app: web}", "labels: {app: web}, annotations: {skein.dev/inject: \"false\"}");
    kubectl_ok(&["-n", &meshed.name, "apply", "-f", "-"], Some(&opted_out));
    assert!(get_json(&meshed.name, "pod/web-2").unwrap()["spec"].get("initContainers").is_none());
}
