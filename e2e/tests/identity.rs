//! Identity against a real API server: the operator creates the mesh CA, publishes the trust
//! bundle into meshed namespaces and issues a SPIFFE certificate per meshed service account,
//! which `openssl verify` (a client nobody here wrote) accepts.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::process::Command;
use std::time::Duration;

use skein_e2e::*;

#[test]
fn meshed_service_accounts_get_spiffe_certificates_openssl_accepts() {
    if !cluster_available("meshed_service_accounts_get_spiffe_certificates_openssl_accepts") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("identity");
    let n = &ns.name;
    let _operator = Operator::start(n, "op-0");

    // The CA Secret exists in the operator's namespace.
    let ca = eventually("the CA Secret", Duration::from_secs(10), || get_json(n, "secret/skein-ca"));
    assert_eq!(ca["type"], "kubernetes.io/tls");

    run_pod(n, "reviews-v1-0", "reviews", &[("app", "reviews")], "10.244.1.11", "reviews", 9080);
    let secret = eventually("the workload certificate", Duration::from_secs(20), || {
        get_json(n, "secret/skein-identity-reviews")
    });
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let bundle = eventually("the trust bundle", Duration::from_secs(20), || {
        get_json(n, "configmap/skein-trust-bundle")
    });
    let roots = bundle["data"]["roots.pem"].as_str().expect("roots.pem").to_string();
    let chain = decode(secret["data"]["tls.crt"].as_str().unwrap());
    assert_eq!(decode(secret["data"]["ca.crt"].as_str().unwrap()), roots, "ca.crt is the trust bundle");
    assert!(decode(secret["data"]["tls.key"].as_str().unwrap()).contains("PRIVATE KEY"));

    let dir = temp_dir("identity");
    std::fs::write(dir.join("roots.pem"), &roots).unwrap();
    std::fs::write(dir.join("chain.pem"), &chain).unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join("roots.pem"))
        .arg(dir.join("chain.pem"))
        .output()
        .expect("openssl runs");
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("chain.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("URI:spiffe://cluster.local/ns/{n}/sa/reviews")), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A PEM bundle's certificates, counted.
fn certs(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

fn replace_ca(namespace: &str, dir: &std::path::Path, crt: &str, key: &str, roots: &str) {
    let manifest = kubectl_ok(
        &[
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            "skein-ca",
            "--type=kubernetes.io/tls",
            &format!("--from-file=tls.crt={}", dir.join(crt).display()),
            &format!("--from-file=tls.key={}", dir.join(key).display()),
            &format!("--from-file=ca.crt={}", dir.join(roots).display()),
            "--dry-run=client",
            "-o",
            "yaml",
        ],
        None,
    );
    kubectl_ok(&["-n", namespace, "replace", "-f", "-"], Some(&manifest));
}

fn verifies(dir: &std::path::Path, roots: &str, chain_pem: &str) -> bool {
    std::fs::write(dir.join("chain-under-test.pem"), chain_pem).unwrap();
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.join(roots))
        .arg(dir.join("chain-under-test.pem"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The documented root rotation, step by step, with the operator running throughout: add the
/// new root, switch the signer, drop the old root. No restart.
#[test]
fn the_mesh_root_rotates_without_a_restart() {
    if !cluster_available("the_mesh_root_rotates_without_a_restart") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("rotate");
    let n = &ns.name;
    let operator = Operator::start(n, "op-0");
    run_pod(n, "web-0", "web", &[("app", "web")], "10.244.2.11", "web", 8080);
    let secret = |name: &str| get_json(n, &format!("secret/{name}"));
    eventually("the first certificate", Duration::from_secs(20), || secret("skein-identity-web"));

    let dir = temp_dir("rotate");
    std::fs::write(
        dir.join("old.crt"),
        decode(secret("skein-ca").unwrap()["data"]["tls.crt"].as_str().unwrap()),
    )
    .unwrap();
    std::fs::write(
        dir.join("old.key"),
        decode(secret("skein-ca").unwrap()["data"]["tls.key"].as_str().unwrap()),
    )
    .unwrap();
    // The new root, made by openssl.
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
        ])
        .args([
            "-subj",
            "/O=skein/CN=new root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .arg("-keyout")
        .arg(dir.join("new.key"))
        .arg("-out")
        .arg(dir.join("new.crt"))
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let both = format!(
        "{}{}",
        std::fs::read_to_string(dir.join("old.crt")).unwrap(),
        std::fs::read_to_string(dir.join("new.crt")).unwrap()
    );
    std::fs::write(dir.join("both.crt"), &both).unwrap();

    // 1. Trust both roots: bundles and workload Secrets carry both.
    replace_ca(n, &dir, "old.crt", "old.key", "both.crt");
    eventually("the bundle to hold both roots", Duration::from_secs(30), || {
        let b = get_json(n, "configmap/skein-trust-bundle")?;
        let s = secret("skein-identity-web")?;
        let ok = certs(b["data"]["roots.pem"].as_str().unwrap_or_default()) == 2
            && certs(&decode(s["data"]["ca.crt"].as_str().unwrap())) == 2;
        if ok {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });

    // 2. Switch the signer: new certificates chain to the new root. The operator has switched
    //    once its webhook serves a certificate from the new root.
    replace_ca(n, &dir, "new.crt", "new.key", "both.crt");
    eventually("the webhook to serve a certificate of the new signer", Duration::from_secs(30), || {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", operator.webhook_port),
                "-verify_return_error",
                "-CAfile",
            ])
            .arg(dir.join("new.crt"))
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("Verify return code: 0 (ok)") {
            Ok(())
        } else {
            Err(text)
        }
    });
    run_pod(n, "api-0", "api", &[("app", "api")], "10.244.2.12", "api", 8080);
    let api = eventually("a certificate from the new signer", Duration::from_secs(30), || {
        secret("skein-identity-api")
    });
    assert!(
        verifies(&dir, "new.crt", &decode(api["data"]["tls.crt"].as_str().unwrap())),
        "signed by the new root"
    );

    // 3. Drop the old root: bundles shrink and every workload certificate is reissued under the
    //    new root.
    replace_ca(n, &dir, "new.crt", "new.key", "new.crt");
    eventually("the old root to be gone everywhere", Duration::from_secs(30), || {
        let b = get_json(n, "configmap/skein-trust-bundle")?;
        let web = secret("skein-identity-web")?;
        let chain = decode(web["data"]["tls.crt"].as_str().unwrap());
        let ok = certs(b["data"]["roots.pem"].as_str().unwrap_or_default()) == 1
            && verifies(&dir, "new.crt", &chain);
        if ok {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// Secrets stay secret: everything the operator and a proxy say about a meshed namespace (logs,
/// events, resource statuses, metrics, the proxy's config dump) holds no private key material
/// of the mesh CA or of the workload certificates it issued.
#[test]
fn no_log_event_status_or_metric_carries_a_private_key() {
    if !cluster_available("no_log_event_status_or_metric_carries_a_private_key") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("secrets");
    let n = &ns.name;
    let operator = Operator::start(n, "op-0");
    kubectl_ok(&["-n", n, "apply", "-f", repo_root().join("examples/canary").to_str().unwrap()], None);
    run_pod(
        n,
        "reviews-v1-0",
        "reviews",
        &[("app", "reviews"), ("version", "v1")],
        "10.244.2.11",
        "reviews",
        9080,
    );
    run_pod(
        n,
        "reviews-v2-0",
        "reviews",
        &[("app", "reviews"), ("version", "v2")],
        "10.244.2.12",
        "reviews",
        9080,
    );
    let state = temp_dir("secrets");
    let proxy = Proxy::start(&operator.stream_url(), &format!("{n}/productpage"), "productpage-0", &state);
    proxy.wait_for_config();
    wait_condition(n, "trafficroute/reviews", "Programmed", "True", "Programmed");
    let key_of = |secret: &str| {
        let s = eventually(secret, Duration::from_secs(20), || get_json(n, secret));
        decode(s["data"]["tls.key"].as_str().expect("tls.key"))
    };
    let keys = [key_of("secret/skein-ca"), key_of("secret/skein-identity-reviews")];

    let get = |what: &str| kubectl_ok(&["-n", n, "get", what, "-o", "json"], None);
    let outputs = vec![
        ("operator log".to_string(), operator.process.log()),
        ("proxy log".to_string(), proxy.process.log()),
        ("events".to_string(), get("events")),
        ("statuses".to_string(), get("trafficroutes,outlierpolicies,retrypolicies")),
        ("operator metrics".to_string(), operator.metrics()),
        ("proxy metrics".to_string(), http("GET", proxy.admin_port, "/metrics").unwrap().1),
        ("proxy config dump".to_string(), proxy.config_dump().unwrap().to_string()),
        ("describe".to_string(), kubectl_ok(&["-n", n, "describe", "trafficroute", "reviews"], None)),
    ];
    assert!(outputs.iter().all(|(_, text)| !text.is_empty()), "an output was empty");
    let leaks = key_leaks(&outputs, &keys);
    assert!(leaks.is_empty(), "private key material leaked: {leaks:?}");
    // The check itself finds a key where there is one.
    assert!(!key_leaks(&[("probe".into(), format!("x{}y", &keys[1][40..120]))], &keys).is_empty());
}
