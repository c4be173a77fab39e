//! The API server itself rejects invalid Skein resources at apply time, with a message that
//! names the field, and accepts the examples.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use skein_e2e::*;

/// Each fixture's first line is `# expect: <text the rejection must contain>`.
#[test]
fn invalid_resources_are_rejected_with_a_message_naming_the_field() {
    if !cluster_available("invalid_resources_are_rejected_with_a_message_naming_the_field") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("invalid");
    let dir = repo_root().join("e2e/fixtures/invalid");
    let mut fixtures: Vec<_> =
        std::fs::read_dir(&dir).expect("fixtures").map(|e| e.unwrap().path()).collect();
    fixtures.sort();
    assert!(fixtures.len() >= 20, "expected the full fixture list, found {}", fixtures.len());
    let mut failures = Vec::new();
    for path in &fixtures {
        let text = std::fs::read_to_string(path).unwrap();
        let expect =
            text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("# expect: line").trim();
        let out = kubectl(&["-n", &ns.name, "apply", "-f", path.to_str().unwrap()], None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{}: was accepted", path.display()));
        } else if !stderr.contains(expect) {
            failures.push(format!("{}: expected {expect:?} in {stderr:?}", path.display()));
        } else if !stderr.contains("is invalid") {
            failures.push(format!("{}: not a validation error: {stderr:?}", path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures misbehaved:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
    // Nothing invalid was stored.
    let stored = kubectl_ok(
        &["-n", &ns.name, "get", "trafficroutes,retrypolicies,outlierpolicies,accesspolicies", "-o", "name"],
        None,
    );
    assert!(stored.trim().is_empty(), "stored: {stored}");
}

#[test]
fn the_examples_are_accepted_with_defaults_applied() {
    if !cluster_available("the_examples_are_accepted_with_defaults_applied") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("examples");
    let dir = repo_root().join("examples/canary");
    kubectl_ok(&["-n", &ns.name, "apply", "-f", dir.to_str().unwrap()], None);
    let route = get_json(&ns.name, "trafficroute/reviews").unwrap();
    assert_eq!(route["spec"]["rules"][1]["backends"][0]["weight"], 90);
    let policy = get_json(&ns.name, "outlierpolicy/reviews").unwrap();
    assert_eq!(policy["spec"]["maxEjectionTime"], "300s", "the schema default is applied");
    let listing = kubectl_ok(&["-n", &ns.name, "get", "tr"], None);
    for column in ["HOST", "PORT", "ACCEPTED", "PROGRAMMED", "AGE"] {
        assert!(listing.contains(column), "printer columns: {listing}");
    }
    let explained = kubectl_ok(&["explain", "trafficroutes.spec.rules.backends.weight"], None);
    assert!(explained.contains("Relative share of the rule's traffic"), "{explained}");
    // The access policy example names the demo's namespace: the server accepts it there.
    let policy = repo_root().join("examples/access-policy");
    let applied = kubectl_ok(&["apply", "--dry-run=server", "-f", policy.to_str().unwrap()], None);
    assert!(applied.contains("accesspolicy.skein.dev/reviews-callers created (server dry run)"), "{applied}");
    let explained = kubectl_ok(&["explain", "accesspolicies.spec.rules.from"], None);
    assert!(explained.contains("Every field given must match (AND)"), "{explained}");
}
