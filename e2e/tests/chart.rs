//! The Helm chart without a cluster: it lints, renders what the install promises (replicas,
//! probes, security context, webhook settings), refuses bad values at install with the value
//! named, justifies every RBAC rule, and `docs/install.md`'s values table matches the schema and
//! the defaults. Needs `helm` (CI installs it with `.ci/install_helm.py`).
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use skein_e2e::repo_root;

fn chart() -> PathBuf {
    repo_root().join("charts/skein")
}

fn helm(args: &[&str]) -> Option<Output> {
    match Command::new("helm").args(args).output() {
        Ok(out) => Some(out),
        Err(_) => {
            assert!(
                std::env::var_os("SKEIN_REQUIRE_HELM").is_none(),
                "helm is not on PATH (.ci/install_helm.py installs it)"
            );
            eprintln!("skipping: helm is not on PATH");
            None
        }
    }
}

/// `helm template` with `sets`, as JSON documents.
fn render(sets: &[&str]) -> Option<Result<Vec<Value>, String>> {
    let chart = chart();
    let mut args = vec!["template", "skein", chart.to_str().unwrap(), "-n", "skein-system"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = helm(&args)?;
    if !out.status.success() {
        return Some(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = text
        .split("\n---")
        .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .collect();
    Some(Ok(docs))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} is not rendered"))
}

#[test]
fn the_chart_lints_and_renders_the_install() {
    let Some(lint) = helm(&["lint", "--strict", chart().to_str().unwrap()]) else { return };
    assert!(lint.status.success(), "helm lint: {}", String::from_utf8_lossy(&lint.stdout));
    let docs = render(&[]).unwrap().unwrap();

    let deployment = find(&docs, "Deployment", "skein-operator");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    let operator = &pod["containers"][0];
    assert_eq!(operator["image"], "ghcr.io/skein-mesh/skein-operator:0.1.0");
    assert_eq!(operator["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(operator["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(operator["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(operator["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(operator["resources"]["limits"]["memory"].is_string());
    let env: BTreeMap<String, String> = operator["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    assert_eq!(env["SKEIN_CAPTURE_MODE"], "transparent", "transparent capture by default");
    assert_eq!(env["SKEIN_PROXY_IMAGE"], "ghcr.io/skein-mesh/skein-proxy:0.1.0");
    assert_eq!(env["SKEIN_LOG_FORMAT"], "plain");
    assert!(env["SKEIN_WEBHOOK_SAN"].contains("skein-webhook.skein-system.svc"));

    assert_eq!(find(&docs, "PodDisruptionBudget", "skein-operator")["spec"]["minAvailable"], 1);
    find(&docs, "ServiceAccount", "skein-operator");
    find(&docs, "ClusterRole", "skein-operator");
    find(&docs, "Role", "skein-operator");
    assert_eq!(find(&docs, "Service", "skein-webhook")["spec"]["ports"][0]["port"], 443);
    assert_eq!(find(&docs, "Service", "skein-operator")["spec"]["ports"][0]["port"], 15012);

    let hooks = find(&docs, "MutatingWebhookConfiguration", "skein-sidecar-injector");
    let hooks = hooks["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2, "by namespace label and by pod label");
    for w in hooks {
        assert_eq!(w["failurePolicy"], "Fail");
        assert!(w["timeoutSeconds"].as_i64().unwrap() <= 5);
        assert_eq!(w["reinvocationPolicy"], "IfNeeded");
        assert_eq!(w["sideEffects"], "NoneOnDryRun");
        assert_eq!(w["clientConfig"]["service"]["name"], "skein-webhook");
        assert!(w["clientConfig"].get("caBundle").is_none(), "the operator owns caBundle");
        let excluded = &w["namespaceSelector"]["matchExpressions"];
        assert!(excluded.to_string().contains("skein-system"), "never the operator's namespace: {excluded}");
    }

    // Values reach the operator.
    let docs = render(&[
        "proxy.captureMode=explicit",
        "image.tag=9.9.9",
        "operator.replicas=1",
        "identity.caSecret=my-ca",
    ])
    .unwrap()
    .unwrap();
    let d = find(&docs, "Deployment", "skein-operator");
    let env = d["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    assert!(
        env.contains("\"explicit\"") && env.contains("skein-proxy:9.9.9") && env.contains("my-ca"),
        "{env}"
    );
    assert!(docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"), "no budget for one replica");
}

#[test]
fn bad_values_fail_at_install_with_the_value_named() {
    for (set, named) in [
        ("proxy.captureMode=magic", "captureMode"),
        ("webhook.timeoutSeconds=30", "timeoutSeconds"),
        ("webhook.failurePolicy=Maybe", "failurePolicy"),
        ("operator.replicas=0", "replicas"),
        ("identity.certLifetime=soon", "certLifetime"),
        ("proxy.resources.requests.cpu=lots", "cpu"),
        ("operator.logFormat=colour", "logFormat"),
        ("proxy.nope=1", "nope"),
        ("accessPolicy.default=open", "default"),
    ] {
        let Some(result) = render(&[set]) else { return };
        let err = result.expect_err(set);
        assert!(err.contains(named), "{set}: {err}");
    }
}

#[test]
fn every_rbac_rule_says_why() {
    let text = std::fs::read_to_string(chart().join("templates/rbac.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "templates/rbac.yaml line {}: a rule without a comment saying why",
                i + 1
            );
        }
    }
}

/// Every leaf value of the schema, with its path (`proxy.resources.requests.cpu`).
fn leaves(schema: &Value, root: &Value, prefix: &str, out: &mut Vec<String>) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => &root["definitions"][r.trim_start_matches("#/definitions/")],
        None => schema,
    };
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) => {
            for (k, v) in props {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(v, root, &path, out);
            }
        }
        None => out.push(prefix.to_string()),
    }
}

fn lookup<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(values, |v, k| v.get(k))
}

#[test]
fn the_values_reference_matches_the_schema_and_the_defaults() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap()).unwrap();
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    let docs = std::fs::read_to_string(repo_root().join("docs/install.md")).unwrap();
    let rows: BTreeMap<String, String> = docs
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(2)?.to_string()))
        })
        .collect();
    let mut paths = Vec::new();
    leaves(&schema, &schema, "", &mut paths);
    let mut problems = Vec::new();
    for path in &paths {
        let Some(documented) = rows.get(path) else {
            problems.push(format!("{path}: not in docs/install.md's table"));
            continue;
        };
        let default = match lookup(&values, path) {
            None => "(none)".to_string(),
            Some(Value::String(s)) => format!("`{}`", if s.is_empty() { "\"\"" } else { s }),
            Some(v) => format!("`{v}`"),
        };
        if *documented != default {
            problems.push(format!("{path}: documented default {documented}, values.yaml has {default}"));
        }
    }
    for documented in rows.keys().filter(|k| k.contains('.') && !k.contains(' ')) {
        if !paths.contains(documented) && lookup(&values, documented).is_none() {
            problems.push(format!("{documented}: documented but not a value"));
        }
    }
    assert!(problems.is_empty(), "docs/install.md's values table: {problems:#?}");
}
