//! AccessPolicy against a real API server: the CEL and schema refusals are in
//! `crd_validation.rs` (the `ap-*` fixtures); here, what the operator makes of an applied
//! policy: its conditions (Accepted, ResolvedRefs, Enforced, Programmed counting only the
//! target's proxies), the rules it refuses that the schema cannot see, the namespace default
//! from the annotation, the translated policy at the target's proxy, `kubectl get` columns, and
//! the warning to a pod in explicit capture mode.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::time::Duration;

use skein_e2e::*;

const POLICY: &str = r#"
apiVersion: skein.dev/v1alpha1
kind: AccessPolicy
metadata: {name: reviews-callers}
spec:
  targetRef: {kind: Service, name: reviews}
  rules:
    - from: {serviceAccounts: [{name: productpage, namespace: NS}]}
      to: {ports: [9080], methods: [GET]}
"#;

#[test]
fn an_access_policy_is_translated_programmed_and_explained() {
    if !cluster_available("an_access_policy_is_translated_programmed_and_explained") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("authz");
    let n = &ns.name;
    let operator = Operator::start(n, "op-0");
    let dir = repo_root().join("examples/canary/service.yaml");
    kubectl_ok(&["-n", n, "apply", "-f", dir.to_str().unwrap()], None);
    run_pod(
        n,
        "reviews-v1-0",
        "reviews",
        &[("app", "reviews"), ("version", "v1")],
        "10.244.1.11",
        "reviews",
        9080,
    );
    kubectl_ok(&["-n", n, "create", "serviceaccount", "productpage"], None);
    kubectl_ok(&["-n", n, "apply", "-f", "-"], Some(&POLICY.replace("NS", n)));

    let accepted = wait_condition(n, "accesspolicy/reviews-callers", "Accepted", "True", "Accepted");
    assert_eq!(accepted.observed_generation, 1);
    let refs = wait_condition(n, "accesspolicy/reviews-callers", "ResolvedRefs", "True", "ResolvedRefs");
    assert_eq!(refs.message, format!("targets Service {n}/reviews"));
    let enforced = wait_condition(n, "accesspolicy/reviews-callers", "Enforced", "True", "Enforced");
    assert!(enforced.message.contains("1 target pod(s)"), "{}", enforced.message);

    // The target's proxy holds the policy on the pods' port; the caller's proxy does not, and
    // Programmed counts the target's proxy only.
    let (state_a, state_b) = (temp_dir("authz-target"), temp_dir("authz-caller"));
    let target = Proxy::start(&operator.stream_url(), &format!("{n}/reviews"), "reviews-v1-0", &state_a);
    let caller = Proxy::start(&operator.stream_url(), &format!("{n}/productpage"), "productpage-0", &state_b);
    let dump = eventually("the policy at the target's proxy", Duration::from_secs(20), || {
        let dump = target.config_dump()?;
        if dump["config"]["authz"]["policies"][0]["name"] == format!("{n}/reviews-callers") {
            Ok(dump)
        } else {
            Err(format!("{}", dump["config"]["authz"]))
        }
    });
    let policy = &dump["config"]["authz"]["policies"][0];
    assert_eq!(policy["ports"], serde_json::json!([9080]));
    assert_eq!(policy["rules"][0]["to"]["methods"], serde_json::json!(["GET"]));
    assert_eq!(dump["config"]["authz"]["default"], "allow");
    let caller_dump = caller.wait_for_config();
    assert_eq!(
        caller_dump["config"]["authz"]["policies"],
        serde_json::Value::Null,
        "{}",
        caller_dump["config"]["authz"]
    );
    let version = dump["version"].as_str().unwrap().to_string();
    eventually("Programmed to count the target's proxy only", Duration::from_secs(20), || {
        let c = condition(n, "accesspolicy/reviews-callers", "Programmed")?;
        let want = format!("1/1 proxies at config {version}: reviews-v1-0");
        if c.status == "True" && c.message == want {
            Ok(())
        } else {
            Err(format!("{c:?}, want {want}"))
        }
    });

    // What `kubectl get` shows.
    let table = kubectl_ok(&["-n", n, "get", "accesspolicy"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TARGET", "ACTION", "MODE", "ACCEPTED", "PROGRAMMED", "AGE"], "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("reviews-callers"), "{table}");

    // The namespace's default, from its annotation, reaches the proxies.
    kubectl_ok(&["annotate", "namespace", n, "skein.dev/default-policy=deny", "--overwrite"], None);
    eventually("the namespace default at the caller's proxy", Duration::from_secs(20), || {
        let dump = caller.config_dump()?;
        if dump["config"]["authz"]["default"] == "deny" {
            Ok(())
        } else {
            Err(format!("{}", dump["config"]["authz"]))
        }
    });

    // Rules that could never match are refused, naming the field; a service account that
    // does not exist is a warning.
    let bad = POLICY.replace("NS", n).replace("reviews-callers", "wrong-port").replace("[9080]", "[81]");
    kubectl_ok(&["-n", n, "apply", "-f", "-"], Some(&bad));
    let invalid = wait_condition(n, "accesspolicy/wrong-port", "Accepted", "False", "Invalid");
    assert!(
        invalid
            .message
            .starts_with(&format!("spec.rules[0].to.ports[0]: Service {n}/reviews has no port 81")),
        "{}",
        invalid.message
    );
    assert!(invalid.message.contains("until fixed, the rules named allow nothing"), "{}", invalid.message);
    wait_condition(n, "accesspolicy/wrong-port", "Programmed", "False", "NotAccepted");
    // It fails closed: the target's proxy holds it without the broken rule, so its port still
    // denies what no rule allows, rather than falling back to the namespace default.
    eventually("the invalid policy, failing closed, at the target's proxy", Duration::from_secs(20), || {
        let dump = target.config_dump()?;
        let policies = dump["config"]["authz"]["policies"].as_array().cloned().unwrap_or_default();
        match policies.iter().find(|p| p["name"] == format!("{n}/wrong-port")) {
            Some(p) if p["rules"].is_null() && p["action"] == "Allow" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let typo = POLICY
        .replace("NS", n)
        .replace("reviews-callers", "typo")
        .replace("name: productpage", "name: prodcutpage");
    kubectl_ok(&["-n", n, "apply", "-f", "-"], Some(&typo));
    let missing = wait_condition(n, "accesspolicy/typo", "ResolvedRefs", "False", "ServiceAccountNotFound");
    assert!(missing.message.contains(&format!("{n}/prodcutpage")), "{}", missing.message);

    // A target pod in explicit capture mode: the policy says it is not enforced there, and the
    // pod gets a warning event.
    let explicit = format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: reviews-explicit-0
  labels: {{app: reviews, version: v1}}
  annotations: {{skein.dev/injected: "native-sidecar,explicit"}}
spec:
  serviceAccountName: reviews
  nodeName: {FAKE_NODE}
  containers:
    - {{name: app, image: example.invalid/app:1}}
    - {{name: skein-proxy, image: example.invalid/skein-proxy:1}}
"#
    );
    kubectl_ok(&["-n", n, "apply", "-f", "-"], Some(&explicit));
    let not_enforced =
        wait_condition(n, "accesspolicy/reviews-callers", "Enforced", "False", "ExplicitCapture");
    assert!(not_enforced.message.contains("reviews-explicit-0"), "{}", not_enforced.message);
    eventually("a PolicyNotEnforced event on the pod", Duration::from_secs(20), || {
        let events = kubectl_ok(
            &[
                "-n",
                n,
                "get",
                "events",
                "--field-selector",
                "reason=PolicyNotEnforced,involvedObject.name=reviews-explicit-0",
                "-o",
                "name",
            ],
            None,
        );
        if events.trim().is_empty() {
            Err("no event yet".to_string())
        } else {
            Ok(())
        }
    });
    let described = kubectl_ok(&["-n", n, "describe", "accesspolicy", "reviews-callers"], None);
    assert!(described.contains("ExplicitCapture"), "{described}");
    let _ = std::fs::remove_dir_all(state_a);
    let _ = std::fs::remove_dir_all(state_b);
}
