//! The chart's RBAC, proven least privilege against the API server's own authorizer.
//!
//! The chart's ServiceAccount, ClusterRole, Role and bindings are rendered by `helm template`
//! into a namespace of this test and applied. Then:
//! 1. every row of docs/install.md's two RBAC tables is asked of the API server with `kubectl
//!    auth can-i --as=system:serviceaccount:<ns>:skein-operator`: what the operator needs is
//!    allowed (what the Role grants, only in its namespace), and what it must not have (reading
//!    Secrets, pods/exec, writing other namespaces' workloads, ...) is denied;
//! 2. the operator runs as that ServiceAccount (a token from `kubectl create token`): with every
//!    rule it becomes ready, leads, writes status, issues a certificate and reports its proxies,
//!    and says nothing of a missing permission;
//! 3. each rule is removed in turn: the operator logs one error naming a verb and resource of
//!    that rule (never a silent retry loop), publishes a `MissingPermission` event, and, for a
//!    status it cannot write, a `StatusNotWritten` event on the resource.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use skein_e2e::*;

/// The ServiceAccount's name in the chart.
const SA: &str = "skein-operator";

fn helm_available() -> bool {
    Command::new("helm").arg("version").output().is_ok_and(|o| o.status.success())
}

/// Deletes the cluster-scoped objects the test applied (its namespace goes with [`TestNamespace`]).
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "clusterrolebinding,clusterrole", &self.0, "--ignore-not-found"], None);
    }
}

/// The chart's ServiceAccount and RBAC for release namespace `ns`, as JSON objects, with the
/// cluster-scoped ClusterRole and its binding named `cluster_name`: the install test's release
/// owns the chart's own names, and a test stopped half-way must not leave them to it.
fn rendered(ns: &str, cluster_name: &str) -> Vec<Value> {
    let out = Command::new("helm")
        .args(["template", "skein"])
        .arg(repo_root().join("charts/skein"))
        .args([
            "-n",
            ns,
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut docs = Vec::new();
    for doc in text.split("\n---").filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.starts_with('#')))
    {
        let mut v: Value = serde_saphyr::from_str(doc.trim_start_matches("---")).unwrap();
        match v["kind"].as_str() {
            Some("ClusterRole") => v["metadata"]["name"] = json!(cluster_name),
            Some("ClusterRoleBinding") => {
                v["metadata"]["name"] = json!(cluster_name);
                v["roleRef"]["name"] = json!(cluster_name);
            }
            _ => {}
        }
        docs.push(v);
    }
    assert_eq!(docs.len(), 5, "ServiceAccount, ClusterRole and Role with their bindings: {docs:?}");
    docs
}

/// Waits until the API server's authorizer answers `allowed` for `verb` on `resource` (its
/// caches follow a role's change within moments, but not at once).
fn wait_can_i(user: &str, verb: &str, resource: &str, ns: &str, allowed: bool) {
    eventually(&format!("can-i {verb} {resource} to be {allowed}"), Duration::from_secs(20), || {
        if can_i(user, verb, resource, Some(ns)) == allowed {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
}

/// One row of a docs table: verbs, resources (as `kubectl auth can-i` names them), scope.
#[derive(Debug)]
struct Row {
    verbs: Vec<String>,
    resources: Vec<String>,
    scope: String,
}

/// The two tables of docs/install.md's "RBAC: what the operator may do": allowed, then denied.
fn documented() -> (Vec<Row>, Vec<Row>) {
    let docs = std::fs::read_to_string(repo_root().join("docs/install.md")).unwrap();
    let section = docs
        .split("### RBAC: what the operator may do")
        .nth(1)
        .expect("docs/install.md has the RBAC section");
    let section = section.split("\n## ").next().unwrap();
    let mut tables: Vec<Vec<Row>> = Vec::new();
    let mut in_table = false;
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if !line.starts_with('|') || cells.len() < 5 {
            in_table = false;
            continue;
        }
        if cells[1] == "verbs" || cells[1].starts_with("---") {
            if !in_table {
                tables.push(Vec::new());
                in_table = true;
            }
            continue;
        }
        let resources = cells[2].split('`').skip(1).step_by(2).map(str::to_string).collect();
        tables.last_mut().unwrap().push(Row {
            verbs: cells[1].split(',').map(|v| v.trim().to_string()).collect(),
            resources,
            scope: cells[3].to_string(),
        });
    }
    assert_eq!(tables.len(), 2, "docs/install.md's RBAC section has an allowed and a denied table");
    let denied = tables.pop().unwrap();
    (tables.pop().unwrap(), denied)
}

/// `kubectl auth can-i` as the operator; `namespace` None means the cluster scope (`-A` for a
/// namespaced resource).
fn can_i(user: &str, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let mut args = vec!["auth".to_string(), "can-i".into(), verb.into()];
    match resource.split_once('/') {
        Some((kind, sub @ ("status" | "exec" | "log" | "token"))) => {
            args.push(kind.into());
            args.push(format!("--subresource={sub}"));
        }
        _ => args.push(resource.into()),
    }
    match namespace {
        Some(ns) => args.extend(["-n".into(), ns.into()]),
        None => args.push("--all-namespaces".into()),
    }
    args.push(format!("--as={user}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kubectl(&args, None);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!("kubectl {}: {answer} {}", args.join(" "), String::from_utf8_lossy(&out.stderr)),
    }
}

/// Walks both tables; returns every answer that differs from the docs.
fn walk(user: &str, release_ns: &str) -> Vec<String> {
    let (allowed, denied) = documented();
    assert!(allowed.len() >= 10 && denied.len() >= 10, "{allowed:?} {denied:?}");
    let mut wrong = Vec::new();
    let scope = |row: &Row| -> Vec<Option<String>> {
        match row.scope.as_str() {
            "all namespaces" | "cluster" => vec![None],
            "release namespace" => vec![Some(release_ns.to_string())],
            other => panic!("docs/install.md: unknown scope {other:?}"),
        }
    };
    for (rows, want) in [(&allowed, true), (&denied, false)] {
        for row in rows {
            for verb in &row.verbs {
                for resource in &row.resources {
                    for ns in scope(row) {
                        if can_i(user, verb, resource, ns.as_deref()) != want {
                            wrong.push(format!("{verb} {resource} in {:?}: want {want}", ns.as_deref()));
                        }
                    }
                    // The Role's rules hold in the release namespace only.
                    if want && row.scope == "release namespace" {
                        for other in ["kube-system", "default"] {
                            if can_i(user, verb, resource, Some(other)) {
                                wrong.push(format!(
                                    "{verb} {resource} in {other}: the Role's rule reaches past it"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    wrong
}

/// A kubeconfig for the API server of `KUBECONFIG` that authenticates with `token`.
fn token_kubeconfig(token: &str, path: &Path) {
    let admin: Value =
        serde_json::from_str(&kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"], None))
            .unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator"}}],
        "current-context": "c",
    });
    std::fs::write(path, config.to_string()).unwrap();
}

/// `kind.group` (or `kind` in the core group), with `/sub` for a subresource: how the
/// operator's error line names a resource.
fn qualified(resource: &str, group: &str) -> String {
    let (kind, sub) = match resource.split_once('/') {
        Some((k, s)) => (k, Some(s)),
        None => (resource, None),
    };
    let base = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
    match sub {
        Some(s) => format!("{base}/{s}"),
        None => base,
    }
}

/// The error lines a rule's removal may cause: `missing permission: cannot <verb> <resource>`.
fn lines_for(rule: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for group in rule["apiGroups"].as_array().unwrap() {
        for resource in rule["resources"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                out.push(format!(
                    "missing permission: cannot {} {}",
                    verb.as_str().unwrap(),
                    qualified(resource.as_str().unwrap(), group.as_str().unwrap())
                ));
            }
        }
    }
    out
}

/// One verb and resource of `rule`, as `kubectl auth can-i` takes them.
fn probe_of(rule: &Value) -> (String, String) {
    let verb = rule["verbs"][0].as_str().unwrap().to_string();
    let group = rule["apiGroups"][0].as_str().unwrap();
    let resource = qualified(rule["resources"][0].as_str().unwrap(), group);
    let resource = match rule["resourceNames"][0].as_str() {
        Some(name) => format!("{resource}/{name}"),
        None => resource,
    };
    (verb, resource)
}

/// The messages of the events with `reason` in `namespace`.
fn events(namespace: &str, reason: &str) -> Vec<(String, String)> {
    let out = kubectl_ok(
        &["-n", namespace, "get", "events", "--field-selector", &format!("reason={reason}"), "-o", "json"],
        None,
    );
    let list: Value = serde_json::from_str(&out).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["involvedObject"]["name"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// What the operator needs to exercise every rule: a meshed pod (certificate, trust bundle) of
/// a Service with a TrafficRoute (status, events).
fn workload(ns: &str) {
    kubectl_ok(
        &["-n", ns, "apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 8080}]\n---\napiVersion: skein.dev/v1alpha1\nkind: TrafficRoute\nmetadata: {name: web}\nspec:\n  host: web\n  rules:\n    - backends: [{service: web, weight: 100}]\n",
        ),
    );
    run_pod(ns, "web-0", "web", &[("app", "web")], "10.244.9.11", "web", 8080);
}

#[test]
fn the_operator_has_least_privilege_and_names_every_missing_rule() {
    if !cluster_available("the_operator_has_least_privilege_and_names_every_missing_rule") {
        return;
    }
    if !helm_available() {
        assert!(
            std::env::var_os("SKEIN_REQUIRE_HELM").is_none(),
            "helm is not on PATH (.ci/install_helm.py)"
        );
        eprintln!(
            "skipping the_operator_has_least_privilege_and_names_every_missing_rule: helm is not on PATH"
        );
        return;
    }
    install_crds();
    let ns = TestNamespace::create("rbac");
    let ns = ns.name.as_str();
    let cluster_name = format!("{SA}-{ns}");
    let _cleanup = Cleanup(cluster_name.clone());
    for object in rendered(ns, &cluster_name) {
        kubectl_ok(&["apply", "-f", "-"], Some(&object.to_string()));
    }
    let user = format!("system:serviceaccount:{ns}:{SA}");

    // 1. The walk, as docs/install.md documents it.
    let wrong = walk(&user, ns);
    assert!(wrong.is_empty(), "kubectl auth can-i --as={user} disagrees with docs/install.md: {wrong:#?}");

    // 2. The operator under its own token, with every rule.
    let dir = temp_dir("rbac");
    let token = kubectl_ok(&["-n", ns, "create", "token", SA, "--duration=2h"], None);
    let kubeconfig = dir.join("kubeconfig");
    token_kubeconfig(token.trim(), &kubeconfig);
    workload(ns);
    let options = |no_wait| OperatorOptions {
        kubeconfig: Some(&kubeconfig),
        webhook_configuration: Some("skein-sidecar-injector"),
        no_wait,
    };
    {
        let mut operator = Operator::start_with(ns, "op-rbac", options(false));
        wait_condition(ns, "trafficroute/web", "Accepted", "True", "Accepted");
        eventually("the certificate and the trust bundle", Duration::from_secs(30), || {
            get_json(ns, "secret/skein-identity-web")?;
            get_json(ns, "configmap/skein-trust-bundle")?;
            get_json(ns, "configmap/skein-proxies-op-rbac")
        });
        let log = operator.process.log();
        assert!(!log.contains("missing permission"), "with every rule, nothing is missing: {log}");
        assert!(log.contains("leadership changed"), "it leads: {log}");
        operator.process.terminate();
    }

    // 3. Each rule removed in turn.
    for (kind, name) in [("clusterrole", cluster_name.as_str()), ("role", SA)] {
        let stored = get_json(ns, &format!("{kind}/{name}")).unwrap();
        let original = json!({
            "apiVersion": stored["apiVersion"],
            "kind": stored["kind"],
            "metadata": {"name": name, "namespace": stored["metadata"]["namespace"], "labels": stored["metadata"]["labels"]},
            "rules": stored["rules"],
        });
        let rules = original["rules"].as_array().unwrap().clone();
        for (i, rule) in rules.iter().enumerate() {
            let mut trimmed = original.clone();
            trimmed["rules"].as_array_mut().unwrap().remove(i);
            kubectl_ok(&["-n", ns, "replace", "-f", "-"], Some(&trimmed.to_string()));
            let probe = probe_of(rule);
            wait_can_i(&user, &probe.0, &probe.1, ns, false);
            // A TrafficRoute without status, so the leader writes one (and its events) again.
            kubectl_ok(&["-n", ns, "delete", "trafficroute", "web"], None);
            workload(ns);
            let expected = lines_for(rule);
            let mut operator = Operator::start_with(ns, "op-rbac", options(true));
            let line = eventually(
                &format!("the operator to name a permission of {rule}"),
                Duration::from_secs(40),
                || {
                    let log = operator.process.log();
                    expected
                        .iter()
                        .find_map(|want| {
                            log.lines()
                                .find(|l| l.contains(want.as_str()))
                                .map(|l| (want.clone(), l.to_string()))
                        })
                        .ok_or_else(|| format!("no line naming one of {expected:?}:\n{log}"))
                },
            );
            let (said, _) = &line;
            let missing = said.trim_start_matches("missing permission: ").to_string();
            // Said once, not at every retry: the watchers and loops retry within seconds.
            std::thread::sleep(Duration::from_secs(3));
            let log = operator.process.log();
            let times = log.lines().filter(|l| l.contains(said.as_str())).count();
            assert_eq!(times, 1, "{missing}: logged once, not at every retry:\n{log}");
            let is_events_rule = rule["resources"].as_array().unwrap().iter().any(|r| r == "events");
            if !is_events_rule {
                eventually(
                    &format!("a MissingPermission event for {missing}"),
                    Duration::from_secs(20),
                    || {
                        let found = events(ns, "MissingPermission")
                            .into_iter()
                            .any(|(on, message)| on == "op-rbac" && message.contains(&missing));
                        if found {
                            Ok(())
                        } else {
                            Err(format!("{:?}", events(ns, "MissingPermission")))
                        }
                    },
                );
            }
            if missing.contains("/status") {
                eventually("a StatusNotWritten event on the TrafficRoute", Duration::from_secs(20), || {
                    let found = events(ns, "StatusNotWritten")
                        .into_iter()
                        .any(|(on, message)| on == "web" && message.contains(&missing));
                    if found {
                        Ok(())
                    } else {
                        Err(format!("{:?}", events(ns, "StatusNotWritten")))
                    }
                });
            }
            eprintln!("{kind} rule {i} removed: {}", line.1.trim());
            operator.process.terminate();
            kubectl_ok(&["-n", ns, "replace", "-f", "-"], Some(&original.to_string()));
            wait_can_i(&user, &probe.0, &probe.1, ns, true);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
