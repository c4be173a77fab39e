//! The authorization benchmark: CPU time per inbound request spent deciding it, through the
//! sidecar's own path (evaluation, the decision counter, the access-log text), with no policy
//! and with 100 rules on the target, single-threaded. `make bench` runs it pinned to one core.
#![forbid(unsafe_code)]

use std::time::Instant;

use clap::Parser;
use skein_api::authz::{
    Action, AuthzPolicy, AuthzRule, DefaultPolicy, Destination, InboundAuthz, Mode, PathMatch, Source,
};
use skein_api::ProxyConfig;
use skein_proxy::bench::Authorizer;
use skein_proxy::{ConfigStore, Source as ConfigSource};

/// Measure the CPU cost of inbound authorization.
#[derive(Parser)]
struct Args {
    /// Decisions per measurement.
    #[arg(long, default_value_t = 200_000)]
    decisions: u32,
    /// Measurements per case; the median is reported.
    #[arg(long, default_value_t = 7)]
    repeats: usize,
}

const PORT: u16 = 9080;
const TD: &str = "cluster.local";

/// An Allow policy of `n` rules; rule `i` lets `shop/client-i` GET under `/api/items/i`.
fn allow_rules(n: usize) -> AuthzPolicy {
    AuthzPolicy {
        name: "shop/reviews-callers".into(),
        action: Action::Allow,
        mode: Mode::Enforce,
        ports: vec![PORT],
        rules: (0..n)
            .map(|i| AuthzRule {
                from: Some(Source {
                    service_accounts: vec![("shop".into(), format!("client-{i}"))],
                    ..Default::default()
                }),
                to: Some(Destination {
                    methods: vec!["GET".into()],
                    paths: vec![PathMatch::Prefix(format!("/api/items/{i}"))],
                    ..Default::default()
                }),
            })
            .collect(),
    }
}

/// A Deny policy of `n` rules, none matching shop's callers.
fn deny_rules(n: usize) -> AuthzPolicy {
    AuthzPolicy {
        name: "shop/blocked".into(),
        action: Action::Deny,
        mode: Mode::Enforce,
        ports: vec![PORT],
        rules: (0..n)
            .map(|i| AuthzRule {
                from: Some(Source { namespaces: vec![format!("blocked-{i}")], ..Default::default() }),
                to: None,
            })
            .collect(),
    }
}

struct Case {
    name: &'static str,
    default: DefaultPolicy,
    policies: Vec<AuthzPolicy>,
    caller: &'static str,
    path: &'static str,
    allowed: bool,
}

fn store(default: DefaultPolicy, policies: Vec<AuthzPolicy>) -> anyhow::Result<ConfigStore> {
    let store = ConfigStore::new(None);
    let config = ProxyConfig {
        version: "bench".into(),
        authz: InboundAuthz { default, namespace: "shop".into(), policies },
        ..Default::default()
    };
    store.apply(config, ConfigSource::File).map_err(anyhow::Error::msg)?;
    Ok(store)
}

/// Median nanoseconds per decision.
fn measure(case: &Case, args: &Args) -> anyhow::Result<f64> {
    let store = store(case.default, case.policies.clone())?;
    let spiffe = format!("spiffe://{TD}/ns/shop/sa/{}", case.caller);
    let authorizer = Authorizer::new(&store, Some(&spiffe));
    anyhow::ensure!(
        authorizer.request(PORT, "GET", case.path) == case.allowed,
        "{}: the decision is not the expected one",
        case.name
    );
    let mut runs = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats {
        let started = Instant::now();
        let mut allowed = 0u32;
        for _ in 0..args.decisions {
            allowed += u32::from(authorizer.request(
                PORT,
                std::hint::black_box("GET"),
                std::hint::black_box(case.path),
            ));
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(args.decisions);
        std::hint::black_box(allowed);
        runs.push(ns);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[runs.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.decisions > 0 && args.repeats > 0, "--decisions and --repeats must be positive");
    let cases = [
        Case {
            name: "no policy (default allow: nothing to decide)",
            default: DefaultPolicy::Allow,
            policies: vec![],
            caller: "client-99",
            path: "/api/items/99/detail",
            allowed: true,
        },
        Case {
            name: "no policy, namespace default deny",
            default: DefaultPolicy::Deny,
            policies: vec![],
            caller: "client-99",
            path: "/api/items/99/detail",
            allowed: false,
        },
        Case {
            name: "100 rules, allowed by the last one",
            default: DefaultPolicy::Allow,
            policies: vec![allow_rules(100)],
            caller: "client-99",
            path: "/api/items/99/detail",
            allowed: true,
        },
        Case {
            name: "100 rules, none matches: denied",
            default: DefaultPolicy::Allow,
            policies: vec![allow_rules(100)],
            caller: "rogue",
            path: "/api/items/99/detail",
            allowed: false,
        },
        Case {
            name: "100 Deny rules, then 100 Allow rules, allowed by the last",
            default: DefaultPolicy::Allow,
            policies: vec![deny_rules(100), allow_rules(100)],
            caller: "client-99",
            path: "/api/items/99/../99/detail",
            allowed: true,
        },
    ];
    println!(
        "Inbound authorization, CPU per decision on one core (median of {} × {} decisions):",
        args.repeats, args.decisions
    );
    println!();
    println!("| case | ns per request | added over no policy |");
    println!("|---|---:|---:|");
    let mut baseline = None;
    for case in &cases {
        let ns = measure(case, &args)?;
        let base = *baseline.get_or_insert(ns);
        println!("| {} | {ns:.0} | {:.0} |", case.name, ns - base);
    }
    Ok(())
}
