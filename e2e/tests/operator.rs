//! The operator against a real API server: conditions and events on the canary route,
//! conflicts, unresolved references, config pushed to a proxy and acknowledged, the last good
//! config surviving a control-plane outage, and leader election.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::time::Duration;

use skein_e2e::*;

fn canary(ns: &TestNamespace) {
    let dir = repo_root().join("examples/canary");
    kubectl_ok(&["-n", &ns.name, "apply", "-f", dir.to_str().unwrap()], None);
    run_pod(
        &ns.name,
        "reviews-v1-0",
        "reviews",
        &[("app", "reviews"), ("version", "v1")],
        "10.244.0.11",
        "reviews",
        9080,
    );
    run_pod(
        &ns.name,
        "reviews-v2-0",
        "reviews",
        &[("app", "reviews"), ("version", "v2")],
        "10.244.0.12",
        "reviews",
        9080,
    );
}

#[test]
fn canary_route_reports_conditions_and_events() {
    if !cluster_available("canary_route_reports_conditions_and_events") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("canary");
    let _operator = Operator::start(&ns.name, "op-0");
    canary(&ns);

    let n = &ns.name;
    let accepted = wait_condition(n, "trafficroute/reviews", "Accepted", "True", "Accepted");
    assert_eq!(accepted.observed_generation, 1);
    let refs = wait_condition(n, "trafficroute/reviews", "ResolvedRefs", "True", "ResolvedRefs");
    assert!(refs.message.contains("subsets v1 (1), v2 (1)"), "{}", refs.message);
    wait_condition(n, "trafficroute/reviews", "Programmed", "True", "Programmed");
    wait_condition(n, "retrypolicy/reviews", "Accepted", "True", "Accepted");
    wait_condition(n, "outlierpolicy/reviews", "ResolvedRefs", "True", "ResolvedRefs");

    // What a user sees.
    let described = eventually("describe to show events", Duration::from_secs(10), || {
        let text = kubectl_ok(&["-n", n, "describe", "trafficroute", "reviews"], None);
        if text.contains("Events:") && text.contains("skein-operator") && text.contains("Accepted=True") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    for expected in [
        "Type:                  Accepted",
        "Reason:                ResolvedRefs",
        "Type:                  Programmed",
    ] {
        assert!(described.contains(expected), "missing {expected:?} in:\n{described}");
    }

    // A second route for the same host and port loses to the older one and says so.
    let conflicting = std::fs::read_to_string(repo_root().join("examples/canary/trafficroute.yaml"))
        .unwrap()
        .replace("name: reviews\nspec:", "name: reviews-rival\nspec:");
    kubectl_ok(&["-n", n, "apply", "-f", "-"], Some(&conflicting));
    let lost = wait_condition(n, "trafficroute/reviews-rival", "Accepted", "False", "Conflicted");
    assert!(lost.message.contains(&format!("{n}/reviews")), "the loser names the winner: {}", lost.message);
    wait_condition(n, "trafficroute/reviews-rival", "Programmed", "False", "NotAccepted");
    let still = condition(n, "trafficroute/reviews", "Accepted").unwrap();
    assert_eq!(still.status, "True");

    // A subset without endpoints, and a route for a missing Service.
    kubectl_ok(&["-n", n, "delete", "endpointslice", "reviews-reviews-v2-0"], None);
    let empty = wait_condition(n, "trafficroute/reviews", "ResolvedRefs", "False", "SubsetEmpty");
    assert!(empty.message.contains("subset v2"), "{}", empty.message);
    let missing = r#"
apiVersion: skein.dev/v1alpha1
kind: TrafficRoute
metadata: {name: ghost}
spec:
  host: ghost
  rules: [{backends: [{service: ghost-v2}]}]
"#;
    kubectl_ok(&["-n", n, "apply", "-f", "-"], Some(missing));
    let ghost = wait_condition(n, "trafficroute/ghost", "ResolvedRefs", "False", "ServiceNotFound");
    assert!(ghost.message.contains(&format!("Service {n}/ghost not found")), "{}", ghost.message);
    let events =
        kubectl_ok(&["-n", n, "get", "events", "--field-selector", "reason=SubsetEmpty", "-o", "name"], None);
    assert!(!events.trim().is_empty(), "a SubsetEmpty event was emitted");

    // Deleted and recreated at once: the new object gets its own status, and is now the newer
    // of the two routes, so the rival wins. Creation times have whole seconds, and a tie goes
    // by name (to "reviews"): first let the API server's clock pass the rival's second.
    let rival_created =
        get_json(n, "trafficroute/reviews-rival").unwrap()["metadata"]["creationTimestamp"].clone();
    eventually("a second after the rival's creation", Duration::from_secs(5), || {
        let _ = kubectl(&["-n", n, "delete", "configmap", "clock", "--ignore-not-found"], None);
        kubectl_ok(&["-n", n, "create", "configmap", "clock"], None);
        let now = get_json(n, "configmap/clock")?["metadata"]["creationTimestamp"].clone();
        if now.as_str() > rival_created.as_str() {
            Ok(())
        } else {
            Err(format!("{now} is still {rival_created}"))
        }
    });
    let route = repo_root().join("examples/canary/trafficroute.yaml");
    kubectl_ok(&["-n", n, "replace", "--force", "-f", route.to_str().unwrap()], None);
    let lost = wait_condition(n, "trafficroute/reviews", "Accepted", "False", "Conflicted");
    assert!(lost.message.contains(&format!("{n}/reviews-rival")), "{}", lost.message);
    wait_condition(n, "trafficroute/reviews-rival", "Accepted", "True", "Accepted");
}

#[test]
fn a_route_change_reaches_the_proxy_and_is_acknowledged() {
    if !cluster_available("a_route_change_reaches_the_proxy_and_is_acknowledged") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("push");
    let n = &ns.name;
    let operator = Operator::start(n, "op-0");
    canary(&ns);
    let state = temp_dir("push");
    let proxy = Proxy::start(&operator.stream_url(), &format!("{n}/productpage"), "productpage-0", &state);

    // The proxy holds the canary, and Programmed names its version.
    let weights = |dump: &serde_json::Value| -> Vec<u64> {
        let dest = dump["config"]["destinations"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["name"] == "reviews"));
        dest.and_then(|d| d["routes"][0]["rules"][1]["backends"].as_array())
            .map(|bs| bs.iter().map(|b| b["weight"].as_u64().unwrap_or_default()).collect())
            .unwrap_or_default()
    };
    let first = eventually("the canary at the proxy", Duration::from_secs(20), || {
        let dump = proxy.config_dump()?;
        if weights(&dump) == [90, 10] {
            Ok(dump)
        } else {
            Err(format!("{}", dump["version"]))
        }
    });
    let v1 = first["version"].as_str().unwrap().to_string();
    // Progress alone (the same True condition with a new count) is written within a second.
    eventually("Programmed to name the proxy", Duration::from_secs(10), || {
        let c = condition(n, "trafficroute/reviews", "Programmed")?;
        let want = format!("1/1 proxies at config {v1}: productpage-0");
        if c.status == "True" && c.message == want {
            Ok(())
        } else {
            Err(format!("{c:?}, want {want}"))
        }
    });

    // Move to 50/50: the change arrives, is acknowledged, and Programmed follows the generation.
    kubectl_ok(
        &[
            "-n",
            n,
            "patch",
            "trafficroute",
            "reviews",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/rules/1/backends/0/weight","value":50},{"op":"replace","path":"/spec/rules/1/backends/1/weight","value":50}]"#,
        ],
        None,
    );
    let second = eventually("50/50 at the proxy", Duration::from_secs(10), || {
        let dump = proxy.config_dump()?;
        if weights(&dump) == [50, 50] {
            Ok(dump)
        } else {
            Err(format!("{:?}", weights(&dump)))
        }
    });
    let v2 = second["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    assert_eq!(second["source"], "control-plane");
    let programmed = eventually("Programmed at generation 2", Duration::from_secs(10), || {
        let c = condition(n, "trafficroute/reviews", "Programmed")?;
        if c.observed_generation == 2 && c.status == "True" {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    });
    assert_eq!(programmed.message, format!("1/1 proxies at config {v2}: productpage-0"));
    let metrics = operator.metrics();
    assert!(metrics.contains("skein_operator_connected_proxies 1"), "{metrics}");
    assert!(metrics.contains("skein_operator_config_acks_total{result=\"applied\"}"), "{metrics}");
    // The topology names the proxy and the config it acknowledged.
    let (status, body) = http("GET", operator.metrics_port, "/topology.json").unwrap();
    let topology: skein_api::topology::Topology = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(topology.proxies.len(), 1, "{body}");
    let p = &topology.proxies[0];
    assert_eq!((p.id.as_str(), p.identity.as_str()), ("productpage-0", format!("{n}/productpage").as_str()));
    assert!(p.in_sync && p.acked.as_deref() == Some(v2.as_str()), "{body}");
    let (status, page) = http("GET", operator.metrics_port, "/topology").unwrap();
    assert!(status == 200 && page.contains("Skein service graph"));

    // The proxy leaves: Programmed no longer counts it.
    drop(proxy);
    eventually("Programmed to stop counting the proxy", Duration::from_secs(10), || {
        let c = condition(n, "trafficroute/reviews", "Programmed")?;
        if c.status == "True" && c.message.starts_with("0/0") {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    });
    let _ = std::fs::remove_dir_all(state);
}

#[test]
fn the_proxy_keeps_its_last_good_config_while_the_operator_is_down() {
    if !cluster_available("the_proxy_keeps_its_last_good_config_while_the_operator_is_down") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("outage");
    let n = &ns.name;
    let mut operator = Operator::start(n, "op-0");
    canary(&ns);
    let state = temp_dir("outage");
    let identity = format!("{n}/productpage");
    let proxy = Proxy::start(&operator.stream_url(), &identity, "productpage-0", &state);
    wait_condition(n, "trafficroute/reviews", "Programmed", "True", "Programmed");
    let held = eventually("the canary at the proxy", Duration::from_secs(20), || {
        let dump = proxy.config_dump()?;
        let has_route = dump["config"]["destinations"]
            .as_array()
            .is_some_and(|ds| ds.iter().any(|d| d["routes"].is_array()));
        if has_route {
            Ok(dump)
        } else {
            Err("no route yet".into())
        }
    });

    // The control plane goes away: the running proxy keeps serving its config...
    let url = operator.stream_url();
    operator.process.terminate();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(proxy.config_dump().unwrap()["version"], held["version"]);
    let (status, _) = http("GET", proxy.admin_port, "/ready").unwrap();
    assert_eq!(status, 200);

    // ...and a restarted proxy starts from the config it saved.
    drop(proxy);
    let restarted = Proxy::start(&url, &identity, "productpage-0", &state);
    let dump = restarted.wait_for_config();
    assert_eq!(dump["version"], held["version"]);
    assert_eq!(dump["source"], "disk");
    let _ = std::fs::remove_dir_all(state);
}

#[test]
fn only_the_leader_writes_status_and_leadership_moves_on_shutdown() {
    if !cluster_available("only_the_leader_writes_status_and_leadership_moves_on_shutdown") {
        return;
    }
    install_crds();
    let ns = TestNamespace::create("leader");
    let n = &ns.name;
    let mut first = Operator::start(n, "op-a");
    let holder = || -> Result<String, String> {
        let lease = get_json(n, "lease/skein-operator")?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_string).ok_or_else(|| "no holder".to_string())
    };
    eventually("op-a to lead", Duration::from_secs(15), || match holder()? {
        h if h == "op-a" => Ok(()),
        h => Err(h),
    });
    let second = Operator::start(n, "op-b");
    // The follower computes and serves config too, but does not lead.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holder().unwrap(), "op-a");
    assert!(second.metrics().contains("skein_operator_leader 0"), "{}", second.metrics());
    assert!(first.metrics().contains("skein_operator_leader 1"));

    // The leader stops gracefully and hands over; the new leader writes status.
    first.process.terminate();
    eventually("op-b to lead", Duration::from_secs(20), || match holder()? {
        h if h == "op-b" => Ok(()),
        h => Err(h),
    });
    canary(&ns);
    wait_condition(n, "trafficroute/reviews", "Accepted", "True", "Accepted");
    let managers = kubectl_ok(
        &[
            "-n",
            n,
            "get",
            "trafficroute/reviews",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
        None,
    );
    assert!(
        managers.contains("skein-operator"),
        "status written under the operator's field manager: {managers}"
    );
}
