//! The user journey, on a cluster whose node runs pods (the test API server's node in CI, kind
//! elsewhere): the images `make images` built are loaded, `helm install` puts the operator in
//! its own namespace, a labelled namespace gets a client and two versions of a service plus
//! `examples/canary`, and then, with real pods and real traffic: injection, transparent capture,
//! strict mTLS, explicit mode, probes, a Job run to completion, certificate rotation, draining a
//! deleted pod, losing the leader, `helm upgrade`, `Programmed` in `kubectl describe`, an
//! AccessPolicy denying a second identity (403) while the client and the probes get through, and
//! an uninstall that leaves nothing behind.
//!
//! Traffic is sent from inside the pods (a busybox client's `wget`, run with `kubectl exec`) and
//! every check reads what the proxies themselves report (`/metrics`), never what is assumed.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use skein_e2e::node::Node;
use skein_e2e::*;

/// The busybox image of the test's clients (built here from the host's static busybox on the
/// test API server's node; `SKEIN_E2E_BUSYBOX_IMAGE` elsewhere).
const BUSYBOX: &str = "skein-e2e/busybox:1";

fn step(what: &str) {
    eprintln!("[install {:>6.1}s] {what}", START.with(|s| s.elapsed().as_secs_f64()));
}

thread_local! {
    static START: Instant = Instant::now();
}

fn helm(args: &[&str]) -> String {
    let out = Command::new("helm").args(args).output().expect("helm is on PATH");
    assert!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helm_available() -> bool {
    Command::new("helm").arg("version").output().is_ok_and(|o| o.status.success())
}

/// Where `make images` put the archives.
fn images_dir() -> PathBuf {
    std::env::var_os("SKEIN_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().parent().expect("target/<profile> has a parent").join("images"))
}

fn busybox_image(node: &Node) -> String {
    let Some(mkimage) = node.mkimage() else {
        return std::env::var("SKEIN_E2E_BUSYBOX_IMAGE").unwrap_or_else(|_| "busybox:1.36".into());
    };
    let root = temp_dir("busybox-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let busybox = ["/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a static busybox on the host (Debian: busybox-static)");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "wget", "sleep", "seq", "env", "cat", "grep", "usleep", "timeout", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000:user:/:/bin/sh\n")
        .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    let archive = root.with_extension("tar");
    let out = Command::new("python3")
        .arg(mkimage)
        .args(["-t", BUSYBOX, "-u", "1000", "--entrypoint", "[\"/bin/sh\"]"])
        .arg(&root)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkimage: {}", String::from_utf8_lossy(&out.stderr));
    node.load(&archive);
    BUSYBOX.to_string()
}

/// The app namespace's workloads: `reviews` v1 (two replicas) and v2 behind one Service, a
/// plain client that knows nothing of proxies, and a client in explicit capture mode.
fn apps(busybox: &str, version: &str) -> String {
    let reviews = |v: &str, replicas: u32| {
        format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: reviews-{v}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: reviews, version: {v}}}}}
  template:
    metadata: {{labels: {{app: reviews, version: {v}}}}}
    spec:
      serviceAccountName: reviews
      containers:
        - name: app
          image: ghcr.io/skein-mesh/skein-demo-app:{version}
          args: [--name, reviews, --version, {v}, --addr, "0.0.0.0:9080"]
          ports: [{{name: http, containerPort: 9080}}]
          readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 1}}
          livenessProbe: {{tcpSocket: {{port: 9080}}, periodSeconds: 2, failureThreshold: 2}}
          securityContext: {{readOnlyRootFilesystem: true, runAsNonRoot: true, allowPrivilegeEscalation: false}}
"#
        )
    };
    let client = |name: &str, annotations: &str| {
        format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}, annotations: {{{annotations}}}}}
    spec:
      serviceAccountName: client
      containers:
        - name: app
          image: {busybox}
          command: [/bin/sleep, "3600"]
          securityContext: {{readOnlyRootFilesystem: true, runAsUser: 1000}}
"#
        )
    };
    [
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: reviews}\n".to_string(),
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: client}\n".to_string(),
        reviews("v1", 2),
        reviews("v2", 1),
        client("client", ""),
        client("legacy", "skein.dev/capture-mode: explicit"),
    ]
    .join("\n---\n")
}

/// The pods of `namespace` with label `app`, by name, with their JSON.
fn pods(namespace: &str, selector: &str) -> Vec<Value> {
    let out = kubectl_ok(&["-n", namespace, "get", "pods", "-l", selector, "-o", "json"], None);
    let list: Value = serde_json::from_str(&out).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// Waits until `selector` selects exactly `count` ready pods; returns their names.
fn wait_ready(namespace: &str, selector: &str, count: usize) -> Vec<String> {
    eventually(&format!("{count} ready pods {selector} in {namespace}"), Duration::from_secs(120), || {
        let all = pods(namespace, selector);
        let live: Vec<&Value> = all.iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).collect();
        let ok: Vec<String> = live.iter().filter(|p| ready(p)).map(|p| name(p)).collect();
        if ok.len() == count && live.len() == count {
            Ok(ok)
        } else {
            Err(format!(
                "{} of {} ready: {:?}",
                ok.len(),
                live.len(),
                live.iter().map(|p| &p["status"]).collect::<Vec<_>>()
            ))
        }
    })
}

/// What `n` requests from a pod's busybox got: one line per request, the answer's JSON or
/// `FAIL`. `pause_ms` spaces them out (a load loop across a disruption).
fn requests(
    node: &Node,
    ns: &str,
    pod: &str,
    url: &str,
    header: Option<&str>,
    n: u32,
    pause_ms: u32,
) -> Vec<String> {
    let header = header.map(|h| format!("--header '{h}'")).unwrap_or_default();
    let script = format!(
        "for i in $(seq {n}); do timeout 10 wget -qO- {header} '{url}' || echo FAIL; echo; \
         [ {pause_ms} -gt 0 ] && usleep {pause}; done; true",
        pause = pause_ms * 1000
    );
    let out = node.exec(ns, pod, "app", &["/bin/sh", "-c", &script]);
    assert!(out.status.success(), "requests from {pod}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn versions(answers: &[String]) -> (usize, usize, Vec<String>) {
    let mut v1 = 0;
    let mut v2 = 0;
    let mut other = Vec::new();
    for a in answers {
        match serde_json::from_str::<Value>(a).ok().and_then(|v| v["version"].as_str().map(str::to_string)) {
            Some(v) if v == "v1" => v1 += 1,
            Some(v) if v == "v2" => v2 += 1,
            _ => other.push(a.clone()),
        }
    }
    (v1, v2, other)
}

/// Runs a load loop from the client (`n` requests, `pause_ms` apart) while `disrupt` runs;
/// fails on any request that did not get a good answer.
fn no_failures_while(node: &Node, ns: &str, client: &str, n: u32, what: &str, disrupt: impl FnOnce()) {
    thread::scope(|s| {
        let load = s.spawn(|| requests(node, ns, client, "http://reviews:9080/", None, n, 40));
        thread::sleep(Duration::from_millis(500));
        disrupt();
        let answers = load.join().unwrap();
        let (v1, v2, bad) = versions(&answers);
        assert!(
            bad.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            bad.len(),
            answers.len(),
            &bad[..bad.len().min(5)]
        );
        assert_eq!(v1 + v2, n as usize, "{what}: every request answered");
    });
}

/// The sum of a metric's series whose labels contain every one of `labels`, from a pod's
/// read-only proxy port (reached from inside `from`, a busybox pod).
fn metric(node: &Node, ns: &str, from: &str, target: &str, name: &str, labels: &[&str]) -> f64 {
    let out = node.exec(
        ns,
        from,
        "app",
        &["/bin/sh", "-c", &format!("timeout 5 wget -qO- http://{target}:15020/metrics")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn pod_ip(ns: &str, pod: &str) -> String {
    get_json(ns, &format!("pod/{pod}")).unwrap()["status"]["podIP"].as_str().unwrap().to_string()
}

/// Deletes what the test made even when it fails half-way: the release, the apps, their
/// namespaces (the test API server keeps a deleted namespace's objects, so they go first).
struct Cleanup {
    release_ns: String,
    app_namespaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("helm").args(["uninstall", "skein", "-n", &self.release_ns, "--wait"]).output();
        for ns in &self.app_namespaces {
            let _ = kubectl(
                &["-n", ns, "delete", "deployments,jobs,pods,services", "--all", "--wait=false"],
                None,
            );
            let _ = kubectl(&["delete", "namespace", ns, "--wait=false", "--ignore-not-found"], None);
        }
        let _ = kubectl(
            &["delete", "secrets,configmaps", "-A", "-l", "app.kubernetes.io/managed-by=skein"],
            None,
        );
        let _ = kubectl(
            &["-n", &self.release_ns, "delete", "lease", "skein-operator", "--ignore-not-found"],
            None,
        );
        let _ =
            kubectl(&["delete", "namespace", &self.release_ns, "--wait=false", "--ignore-not-found"], None);
    }
}

#[test]
fn install_mesh_a_namespace_and_uninstall() {
    if !cluster_available("install_mesh_a_namespace_and_uninstall") {
        return;
    }
    let required = std::env::var_os("SKEIN_REQUIRE_NODE").is_some();
    if !helm_available() {
        assert!(!required, "helm is not on PATH (.ci/install_helm.py installs it)");
        eprintln!("skipping install_mesh_a_namespace_and_uninstall: helm is not on PATH");
        return;
    }
    let node = match Node::find() {
        Ok(node) => node,
        Err(why) => {
            assert!(!required, "no node to run pods: {why}");
            eprintln!("skipping install_mesh_a_namespace_and_uninstall: {why}");
            return;
        }
    };
    let root = repo_root();
    let chart = root.join("charts/skein");
    let chart = chart.to_str().unwrap();
    let version = helm(&["show", "chart", chart])
        .lines()
        .find_map(|l| l.strip_prefix("appVersion: ").map(|v| v.trim_matches('"').to_string()))
        .unwrap();

    step("loading the images");
    for image in ["skein-operator", "skein-proxy", "skein-demo-app"] {
        let archive = images_dir().join(format!("{image}.tar"));
        assert!(archive.exists(), "{} is missing: run `make images` (make test does)", archive.display());
        node.load(&archive);
    }
    let busybox = busybox_image(&node);

    let suffix = format!("{:06x}", fastrand::u32(..0xff_ffff));
    let release_ns = format!("e2e-skein-{suffix}");
    let shop = format!("e2e-shop-{suffix}");
    let outside = format!("e2e-outside-{suffix}");
    let _cleanup =
        Cleanup { release_ns: release_ns.clone(), app_namespaces: vec![shop.clone(), outside.clone()] };
    // A webhook configuration left by a crashed earlier run would send pods to nobody.
    let _ = kubectl(
        &["delete", "mutatingwebhookconfiguration", "skein-sidecar-injector", "--ignore-not-found"],
        None,
    );

    step("helm install");
    // Short-lived workload certificates, so that one is renewed (and swapped in every running
    // sidecar) while the test runs.
    helm(&[
        "install",
        "skein",
        chart,
        "-n",
        &release_ns,
        "--create-namespace",
        "--wait",
        "--timeout",
        "180s",
        "--set",
        "identity.certLifetime=2m",
    ]);
    let operators = wait_ready(&release_ns, "app.kubernetes.io/name=skein-operator", 2);
    let leader = eventually("a leader", Duration::from_secs(30), || {
        let lease = get_json(&release_ns, "lease/skein-operator")?;
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string();
        if operators.contains(&holder) {
            Ok(holder)
        } else {
            Err(format!("holder {holder:?}"))
        }
    });
    eventually("the CA bundle in the webhook configuration", Duration::from_secs(30), || {
        let c = get_json("default", "mutatingwebhookconfiguration/skein-sidecar-injector")?;
        let all = c["webhooks"].as_array().map(|ws| {
            ws.iter().all(|w| w["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty()))
        });
        if all == Some(true) {
            Ok(())
        } else {
            Err("no caBundle yet".into())
        }
    });
    for op in &operators {
        let log = node.logs(&release_ns, op, "operator");
        assert!(log.contains("skein-operator started"), "{op} runs in the cluster: {log}");
        assert!(!log.contains('\u{1b}'), "{op}: no colour escapes in a log that is not a terminal");
    }

    step("meshing a namespace: apps and examples/canary");
    kubectl_ok(&["create", "namespace", &shop], None);
    kubectl_ok(&["label", "namespace", &shop, "skein.dev/inject=enabled"], None);
    kubectl_ok(&["-n", &shop, "apply", "-f", "-"], Some(&apps(&busybox, &version)));
    kubectl_ok(&["-n", &shop, "apply", "-f", root.join("examples/canary").to_str().unwrap()], None);
    let v1 = wait_ready(&shop, "app=reviews,version=v1", 2);
    let v2 = wait_ready(&shop, "app=reviews,version=v2", 1);
    let client = wait_ready(&shop, "app=client", 1).remove(0);
    let legacy = wait_ready(&shop, "app=legacy", 1).remove(0);

    step("every app pod has its sidecar, identity and capture");
    for pod in pods(&shop, "app") {
        let n = name(&pod);
        let inits: Vec<&str> = pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        let explicit = n.starts_with("legacy");
        assert_eq!(
            inits,
            if explicit { vec!["skein-proxy"] } else { vec!["skein-init", "skein-proxy"] },
            "{n}"
        );
        let sa = pod["spec"]["serviceAccountName"].as_str().unwrap();
        assert!(
            pod["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["secret"]["secretName"] == format!("skein-identity-{sa}")),
            "{n} mounts its identity"
        );
        let statuses = pod["status"]["initContainerStatuses"].as_array().unwrap();
        for s in statuses {
            match s["name"].as_str() {
                Some("skein-init") => {
                    assert_eq!(
                        s["state"]["terminated"]["exitCode"], 0,
                        "{n}: the capture step succeeded: {s}"
                    )
                }
                _ => assert_eq!(s["ready"], true, "{n}: the sidecar is ready: {s}"),
            }
        }
        if !explicit {
            let init = &pod["spec"]["initContainers"][0];
            assert_eq!(
                init["securityContext"]["readOnlyRootFilesystem"], true,
                "{n}: the init step keeps a read-only root"
            );
        }
        // The app started after its sidecar was ready (native sidecar with a startup probe).
        let sidecar_start = statuses.iter().find(|s| s["name"] == "skein-proxy").unwrap()["state"]["running"]
            ["startedAt"]
            .clone();
        let app_start = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].clone();
        assert!(
            app_start.as_str() >= sidecar_start.as_str(),
            "{n}: app {app_start} before sidecar {sidecar_start}"
        );
    }

    step("a plain client reaches reviews through its sidecar, split by the TrafficRoute, over mTLS");
    let beta = requests(&node, &shop, &client, "http://reviews:9080/", Some("x-user-group: beta"), 20, 0);
    assert_eq!(versions(&beta), (0, 20, vec![]), "beta users go to v2: {beta:?}");
    let everyone = requests(&node, &shop, &client, "http://reviews:9080/", None, 60, 0);
    let (to_v1, to_v2, bad) = versions(&everyone);
    assert!(bad.is_empty(), "{bad:?}");
    // 90/10: at least 60% v1 fails by chance with a probability below 1e-9.
    assert!(to_v1 >= 36, "everyone else is split 90/10: v1 {to_v1}, v2 {to_v2}");
    let reviews_dest = format!("destination=\"reviews.{shop}\"");
    let mtls = metric(
        &node,
        &shop,
        &client,
        "127.0.0.1",
        "skein_mtls_requests_total",
        &["direction=\"outbound\"", &reviews_dest],
    );
    let plain = metric(
        &node,
        &shop,
        &client,
        "127.0.0.1",
        "skein_plaintext_requests_total",
        &["direction=\"outbound\"", &reviews_dest],
    );
    assert!(
        mtls >= 80.0 && plain == 0.0,
        "the client's sidecar sent them over mTLS: mtls {mtls}, plaintext {plain}"
    );
    // And the other end: each version's sidecars accepted mTLS handshakes and served inbound.
    for (version, pods) in [("v1", &v1), ("v2", &v2)] {
        let sum = |name: &str, labels: &[&str]| -> f64 {
            pods.iter().map(|p| metric(&node, &shop, &client, &pod_ip(&shop, p), name, labels)).sum()
        };
        let handshakes = sum("skein_tls_handshakes_total", &["result=\"ok\""]);
        let inbound = sum("skein_requests_total", &["direction=\"inbound\""]);
        assert!(
            handshakes >= 1.0 && inbound >= 1.0,
            "{version}: {handshakes} mTLS handshakes, {inbound} inbound"
        );
    }

    step("probes on the app's port go through the sidecar while inbound mTLS is strict");
    let pod = get_json(&shop, &format!("pod/{}", v1[0])).unwrap();
    let app = &pod["spec"]["containers"][0];
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(app["readinessProbe"]["httpGet"]["path"], "/app-health/app/readiness");
    assert_eq!(app["livenessProbe"]["httpGet"]["path"], "/app-health/app/liveness");

    step("a pod outside the mesh cannot reach the app's port");
    kubectl_ok(&["create", "namespace", &outside], None);
    let outsider = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: outsider, labels: {{app: outsider}}}}\nspec:\n  containers:\n    - {{name: app, image: {busybox}, command: [/bin/sleep, \"3600\"], securityContext: {{runAsUser: 1000}}}}\n"
    );
    kubectl_ok(&["-n", &outside, "apply", "-f", "-"], Some(&outsider));
    wait_ready(&outside, "app=outsider", 1);
    let target = pod_ip(&shop, &v1[0]);
    let direct = requests(&node, &outside, "outsider", &format!("http://{target}:9080/"), None, 3, 0);
    assert_eq!(direct, vec!["FAIL"; 3], "plaintext to the app's port is refused under strict mTLS");
    let by_name = requests(&node, &outside, "outsider", &format!("http://reviews.{shop}:9080/"), None, 3, 0);
    assert_eq!(by_name, vec!["FAIL"; 3], "and so is the Service, from outside the mesh");
    // The network itself is fine: the sidecar's read-only port answers.
    let stats = requests(&node, &outside, "outsider", &format!("http://{target}:15020/ready"), None, 1, 0);
    assert_eq!(stats, vec!["ready"], "the pod is reachable; only its app port is closed");
    // And the install opens none of the proxy's other doors: the client's outbound listener
    // and admin server refuse other pods, and its read-only port has no config dump.
    let client_ip = pod_ip(&shop, &client);
    for door in ["15001/", "15000/config_dump", "15020/config_dump", "15020/certs"] {
        let answer = requests(&node, &outside, "outsider", &format!("http://{client_ip}:{door}"), None, 1, 0);
        assert_eq!(answer, vec!["FAIL"], "{door} from another pod");
    }

    step("explicit mode: both proxy variables, NO_PROXY with the pod's address, and wget uses the sidecar");
    let env = node.exec(
        &shop,
        &legacy,
        "app",
        &["/bin/sh", "-c", "echo $HTTP_PROXY $http_proxy $NO_PROXY $no_proxy"],
    );
    let env = String::from_utf8_lossy(&env.stdout).trim().to_string();
    let legacy_ip = pod_ip(&shop, &legacy);
    let no_proxy = format!("localhost,127.0.0.1,::1,{legacy_ip}");
    assert_eq!(
        env,
        format!("http://127.0.0.1:15001 http://127.0.0.1:15001 {no_proxy} {no_proxy}"),
        "the explicit-mode environment"
    );
    let answers = requests(&node, &shop, &legacy, "http://reviews:9080/", Some("x-user-group: beta"), 10, 0);
    assert_eq!(versions(&answers), (0, 10, vec![]), "{answers:?}");
    let through = metric(
        &node,
        &shop,
        &legacy,
        "127.0.0.1",
        "skein_mtls_requests_total",
        &["direction=\"outbound\"", &reviews_dest],
    );
    assert!(through >= 10.0, "wget used the sidecar (http_proxy): {through} mTLS requests");

    step("a Job runs to completion: its injected sidecar does not keep it running");
    let job = format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: once}}\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      serviceAccountName: client\n      containers:\n        - {{name: app, image: {busybox}, command: [/bin/sh, -c, \"timeout 10 wget -qO- http://reviews:9080/\"], securityContext: {{runAsUser: 1000}}}}\n"
    );
    kubectl_ok(&["-n", &shop, "apply", "-f", "-"], Some(&job));
    eventually("the Job to complete", Duration::from_secs(90), || {
        let j = get_json(&shop, "job/once")?;
        let has = |t: &str| {
            j["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
        };
        if has("Failed") {
            let log = kubectl(&["-n", &shop, "logs", "job/once", "-c", "app"], None);
            panic!("the Job failed: {}: {}", j["status"], String::from_utf8_lossy(&log.stdout));
        }
        if has("Complete") {
            Ok(())
        } else {
            Err(format!("{}", j["status"]))
        }
    });
    let job_pods = pods(&shop, "job-name=once");
    assert_eq!(job_pods.len(), 1, "one pod ran the Job");
    let job_pod = &job_pods[0];
    assert_eq!(job_pod["status"]["phase"], "Succeeded", "{}", job_pod["status"]);
    let sidecar = |field: &str| {
        job_pod["spec"][field].as_array().is_some_and(|cs| cs.iter().any(|c| c["name"] == "skein-proxy"))
    };
    assert!(
        sidecar("initContainers") || sidecar("containers"),
        "the Job's pod got the sidecar: {}",
        job_pod["spec"]
    );
    let answer = kubectl_ok(&["-n", &shop, "logs", "job/once", "-c", "app"], None);
    assert!(answer.contains("\"service\":\"reviews\""), "its one request was answered: {answer}");

    step("a renewed certificate is swapped in with no failed request");
    let expiry = || metric(&node, &shop, &client, "127.0.0.1", "skein_certificate_expiry_seconds", &[]);
    let first = expiry();
    assert!(first > 0.0, "the client's sidecar reports its certificate");
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        no_failures_while(&node, &shop, &client, 100, "during certificate renewal", || {});
        if expiry() > first {
            break;
        }
        assert!(Instant::now() < deadline, "the client's certificate was not renewed within 150 s");
    }

    step("deleting a pod drains it: in-flight requests finish, new ones go elsewhere");
    no_failures_while(&node, &shop, &client, 150, "while a v1 pod is deleted", || {
        thread::scope(|s| {
            // Requests in flight on every replica (a second each) when the pod goes.
            let slow =
                s.spawn(|| requests(&node, &shop, &client, "http://reviews:9080/?delay_ms=1000", None, 1, 0));
            let slow2 =
                s.spawn(|| requests(&node, &shop, &client, "http://reviews:9080/?delay_ms=1000", None, 1, 0));
            thread::sleep(Duration::from_millis(300));
            kubectl_ok(&["-n", &shop, "delete", "pod", &v1[0], "--wait=false"], None);
            for s in [slow, slow2] {
                let answer = s.join().unwrap();
                assert_eq!(versions(&answer).2, Vec::<String>::new(), "an in-flight request failed");
            }
        });
    });
    wait_ready(&shop, "app=reviews,version=v1", 2);

    step("losing the leader: the other replica takes over, traffic unaffected");
    no_failures_while(&node, &shop, &client, 150, "while the leader is deleted", || {
        kubectl_ok(&["-n", &release_ns, "delete", "pod", &leader, "--wait=false"], None);
    });
    eventually("another leader", Duration::from_secs(60), || {
        let holder = get_json(&release_ns, "lease/skein-operator")?["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !holder.is_empty() && holder != leader {
            Ok(holder)
        } else {
            Err(format!("holder {holder:?}"))
        }
    });
    let operators = wait_ready(&release_ns, "app.kubernetes.io/name=skein-operator", 2);

    step("helm upgrade with a changed value rolls the operator without failed requests");
    no_failures_while(&node, &shop, &client, 250, "during helm upgrade", || {
        helm(&[
            "upgrade",
            "skein",
            chart,
            "-n",
            &release_ns,
            "--reuse-values",
            "--set",
            "operator.logFormat=json",
            "--wait",
            "--timeout",
            "180s",
        ]);
    });
    let rolled = wait_ready(&release_ns, "app.kubernetes.io/name=skein-operator", 2);
    assert!(
        rolled.iter().all(|p| !operators.contains(p)),
        "new operator pods: {rolled:?} after {operators:?}"
    );
    for op in &rolled {
        let log = node.logs(&release_ns, op, "operator");
        let first = log.lines().next().unwrap_or_default();
        assert!(serde_json::from_str::<Value>(first).is_ok(), "{op} logs JSON after the upgrade: {first}");
    }

    step("kubectl describe shows Programmed with every proxy by name");
    let meshed: Vec<String> = pods(&shop, "app").iter().filter(|p| ready(p)).map(name).collect();
    // The rewritten liveness probes never failed: no app container was restarted.
    for pod in pods(&shop, "app").iter().filter(|p| ready(p)) {
        for c in pod["status"]["containerStatuses"].as_array().unwrap() {
            assert_eq!(c["restartCount"], 0, "{}: {c}", name(pod));
        }
    }
    eventually("Programmed naming every meshed pod", Duration::from_secs(60), || {
        let out = kubectl_ok(&["-n", &shop, "describe", "trafficroute", "reviews"], None);
        let message = out
            .lines()
            .find(|l| l.contains("Message:") && l.contains("proxies at"))
            .unwrap_or_default()
            .to_string();
        let wanted = format!("{n}/{n} proxies at", n = meshed.len());
        if message.contains(&wanted) && meshed.iter().all(|p| message.contains(p.as_str())) {
            Ok(())
        } else {
            Err(format!("{message:?}, want {wanted} naming {meshed:?}"))
        }
    });

    step("an AccessPolicy lets only the client call reviews: another identity gets 403, probes still pass");
    let intruder_app = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: intruder}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: intruder}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: intruder}}}}\n  template:\n    metadata: {{labels: {{app: intruder}}}}\n    spec:\n      serviceAccountName: intruder\n      containers:\n        - {{name: app, image: {busybox}, command: [/bin/sleep, \"3600\"], securityContext: {{readOnlyRootFilesystem: true, runAsUser: 1000}}}}\n"
    );
    kubectl_ok(&["-n", &shop, "apply", "-f", "-"], Some(&intruder_app));
    let policy = std::fs::read_to_string(root.join("examples/access-policy/reviews-callers.yaml"))
        .unwrap()
        .replace("namespace: default", &format!("namespace: {shop}"));
    kubectl_ok(&["apply", "-f", "-"], Some(&policy));
    let intruder = wait_ready(&shop, "app=intruder", 1).remove(0);
    wait_condition(&shop, "accesspolicy/reviews-callers", "Accepted", "True", "Accepted");
    wait_condition(&shop, "accesspolicy/reviews-callers", "Enforced", "True", "Enforced");
    wait_condition(&shop, "accesspolicy/reviews-callers", "Programmed", "True", "Programmed");
    let denied = node.exec(
        &shop,
        &intruder,
        "app",
        &[
            "/bin/sh",
            "-c",
            "for i in 1 2 3 4 5; do timeout 10 wget -qO- http://reviews:9080/ 2>&1; echo; done; true",
        ],
    );
    let denied = String::from_utf8_lossy(&denied.stdout).into_owned();
    assert_eq!(denied.matches("403 Forbidden").count(), 5, "the intruder is denied every time: {denied}");
    let allowed = requests(&node, &shop, &client, "http://reviews:9080/", None, 10, 0);
    assert_eq!(versions(&allowed).2, Vec::<String>::new(), "the client still gets through");
    let policy_label = format!("policy=\"{shop}/reviews-callers\"");
    let decisions = |decision: &str| -> f64 {
        let label = format!("decision=\"{decision}\"");
        wait_ready(&shop, "app=reviews", 3)
            .iter()
            .map(|p| {
                metric(
                    &node,
                    &shop,
                    &client,
                    &pod_ip(&shop, p),
                    "skein_authz_decisions_total",
                    &[&label, &policy_label],
                )
            })
            .sum()
    };
    assert_eq!(decisions("deny"), 5.0, "each denial counted by the reviews sidecar that made it");
    assert!(decisions("allow") >= 10.0, "and the client's requests allowed");
    // The namespace default turns to deny: it reaches the proxies, and the rewritten probes
    // (answered by the sidecar's read-only port, never through inbound) keep every pod ready.
    kubectl_ok(&["annotate", "namespace", &shop, "skein.dev/default-policy=deny", "--overwrite"], None);
    eventually("the namespace default at the client's sidecar", Duration::from_secs(30), || {
        let out = node.exec(
            &shop,
            &client,
            "app",
            &["/bin/sh", "-c", "timeout 5 wget -qO- http://127.0.0.1:15000/config_dump"],
        );
        let dump: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if dump["config"]["authz"]["default"] == "deny" {
            Ok(())
        } else {
            Err(format!("{}", dump["config"]["authz"]))
        }
    });
    thread::sleep(Duration::from_secs(5));
    wait_ready(&shop, "app=reviews", 3);
    wait_ready(&shop, "app=client", 1);
    let allowed = requests(&node, &shop, &client, "http://reviews:9080/", None, 5, 0);
    assert_eq!(versions(&allowed).2, Vec::<String>::new(), "the Allow policy still lets the client in");
    for pod in pods(&shop, "app=reviews").iter().filter(|p| ready(p)) {
        for c in pod["status"]["containerStatuses"].as_array().unwrap() {
            assert_eq!(c["restartCount"], 0, "no probe failed under the deny default: {}: {c}", name(pod));
        }
    }

    step("the operator ran under its own ServiceAccount and lacked no permission all along");
    for op in wait_ready(&release_ns, "app.kubernetes.io/name=skein-operator", 2) {
        let pod = get_json(&release_ns, &format!("pod/{op}")).unwrap();
        assert_eq!(pod["spec"]["serviceAccountName"], "skein-operator", "{op}");
        let log = node.logs(&release_ns, &op, "operator");
        assert!(!log.contains("missing permission"), "{op} lacked a permission: {log}");
    }
    let refused = kubectl_ok(
        &["-n", &release_ns, "get", "events", "--field-selector", "reason=MissingPermission", "-o", "name"],
        None,
    );
    assert!(refused.trim().is_empty(), "MissingPermission events: {refused}");

    step("helm uninstall, CRDs and the mesh's own objects: nothing of Skein is left");
    helm(&["uninstall", "skein", "-n", &release_ns, "--wait", "--timeout", "120s"]);
    kubectl_ok(
        &["delete", "-f", root.join("charts/skein/crds").to_str().unwrap(), "--ignore-not-found"],
        None,
    );
    // What the operator made, which helm does not own (docs/install.md, "Uninstall").
    kubectl_ok(&["delete", "secrets,configmaps", "-A", "-l", "app.kubernetes.io/managed-by=skein"], None);
    kubectl_ok(&["-n", &release_ns, "delete", "lease", "skein-operator", "--ignore-not-found"], None);
    eventually("nothing of Skein left", Duration::from_secs(60), || {
        let mut left = Vec::new();
        let crds = kubectl_ok(&["get", "crd", "-o", "name"], None);
        left.extend(crds.lines().filter(|l| l.contains("skein.dev")).map(str::to_string));
        let hooks = kubectl_ok(&["get", "mutatingwebhookconfigurations", "-o", "name"], None);
        left.extend(hooks.lines().filter(|l| l.contains("skein")).map(str::to_string));
        let objects = kubectl_ok(
            &["get", "secrets,configmaps", "-A", "-l", "app.kubernetes.io/managed-by=skein", "-o", "name"],
            None,
        );
        left.extend(objects.lines().map(str::to_string));
        let own = kubectl_ok(
            &[
                "-n",
                &release_ns,
                "get",
                "deployments,services,serviceaccounts,pods,leases,configmaps,secrets",
                "-o",
                "name",
            ],
            None,
        );
        left.extend(own.lines().filter(|l| l.contains("skein")).map(str::to_string));
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left: {left:?}"))
        }
    });
}
