//! Identity against a real API server: the operator creates the mesh CA, publishes the trust
//! bundle into meshed namespaces and issues a SPIFFE certificate per meshed service account,
//! which `openssl verify` (a client nobody here wrote) accepts.

use std::process::Command;
use std::time::Duration;

use skein_e2e::*;

fn decode(b64: &str) -> String {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b64.as_bytes())?;
            c.wait_with_output()
        });
    String::from_utf8(out.expect("base64 runs").stdout).expect("PEM is text")
}

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
