//! Inbound authorization: every request (or opaque connection) that reaches the inbound
//! listener is decided by [`skein_api::authz::evaluate`] against the `AccessPolicy` rules of the
//! config in force, from the caller's verified SPIFFE ID, before anything reaches the app.
//! Decisions are counted in `skein_authz_decisions_total{decision, policy, mode}` and named in
//! the access log's `authz` field; DryRun decisions the same way, with `mode="dry-run"`.
//!
//! A workload with no policy and the `allow` default has nothing to decide: nothing is
//! evaluated or counted. A sidecar without any config yet refuses inbound traffic (503): it
//! cannot know what the workload's policies are.

use std::fmt::Write as _;

use skein_api::authz::{evaluate, Caller as CallerRef, DecidedBy, DefaultPolicy, Identity, Request};

use crate::config::store::Active;
use crate::telemetry::metrics::AuthzCounters;

/// The verified identity of an inbound caller (from its certificate's SPIFFE ID).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub spiffe_id: String,
    namespace_at: (usize, usize),
    service_account_at: usize,
}

impl Caller {
    /// Reads `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; `None` for any
    /// other shape (such a caller has no mesh identity).
    pub fn from_spiffe_id(id: &str) -> Option<Self> {
        let (domain, ns, _) = skein_api::config::spiffe_parts(id)?;
        let ns_start = "spiffe://".len() + domain.len() + "/ns/".len();
        let sa_start = ns_start + ns.len() + "/sa/".len();
        Some(Self {
            spiffe_id: id.to_string(),
            namespace_at: (ns_start, ns_start + ns.len()),
            service_account_at: sa_start,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.spiffe_id[self.namespace_at.0..self.namespace_at.1]
    }

    pub fn service_account(&self) -> &str {
        &self.spiffe_id[self.service_account_at..]
    }

    fn as_ref(&self) -> Identity<'_> {
        Identity {
            spiffe_id: &self.spiffe_id,
            namespace: self.namespace(),
            service_account: self.service_account(),
        }
    }
}

/// The outcome for the request path: whether it may go on, and what to log and answer.
#[derive(Debug, Default)]
pub struct Verdict {
    pub allowed: bool,
    /// The access log's `authz` field (`allow shop/callers`, `deny default (deny)`), empty when
    /// nothing was decided.
    pub log: String,
    /// The 403 body of a denial.
    pub denial: String,
}

/// Decides (without counting) whether `caller` may make this request of the app's `port`.
pub fn decide(
    active: Option<&Active>,
    caller: Option<&Caller>,
    port: u16,
    http: Option<(&str, &str)>,
) -> Result<Option<skein_api::authz::Decision>, NoConfig> {
    let Some(active) = active else { return Err(NoConfig) };
    let authz = &active.config.authz;
    if authz.policies.is_empty() && authz.default == DefaultPolicy::Allow {
        return Ok(None);
    }
    let caller = CallerRef { identity: caller.map(Caller::as_ref) };
    Ok(Some(evaluate(authz, &caller, &Request { port, http })))
}

/// The path and query to send the app instead of `path_and_query`, when a policy on `port`
/// matched paths and the app might read the raw path otherwise than the rules did
/// (`/public/..;/admin`): the normalised path, the query kept. `None`: send it as it came.
pub fn rewritten_path(active: Option<&Active>, port: u16, path_and_query: &str) -> Option<String> {
    if !active?.config.authz.checks_paths(port) {
        return None;
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    // An escaped separator matched no Allow rule with paths and every Deny rule with paths, so
    // a request allowed with one was allowed whatever its path: it goes on unchanged.
    let normal = skein_api::authz::normalize_path(path).ok()?;
    if normal == path {
        return None;
    }
    Some(match query {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    })
}

/// `x-skein-error` of a denial.
pub const DENIED: &str = "authz-denied";

/// Whether a peer sidecar's answer is a denial.
pub fn is_denial<B>(response: &http::Response<B>) -> bool {
    response.status() == http::StatusCode::FORBIDDEN
        && response.headers().get(&super::ERROR_HEADER).is_some_and(|v| v.as_bytes() == DENIED.as_bytes())
}

/// There is no config yet, so no policy is known.
#[derive(Debug)]
pub struct NoConfig;

fn by(d: &DecidedBy) -> String {
    match d {
        DecidedBy::Policy(p) => p.clone(),
        DecidedBy::Default(d) => format!("default ({})", d.as_str()),
    }
}

/// Decides and counts: the verdict the request path acts on.
pub fn check(
    active: Option<&Active>,
    counters: &AuthzCounters,
    caller: Option<&Caller>,
    port: u16,
    http: Option<(&str, &str)>,
) -> Result<Verdict, NoConfig> {
    let Some(decision) = decide(active, caller, port, http)? else {
        return Ok(Verdict { allowed: true, ..Default::default() });
    };
    Ok(record(counters, &decision))
}

/// Counts a decision and turns it into a verdict.
pub fn record(counters: &AuthzCounters, decision: &skein_api::authz::Decision) -> Verdict {
    let word = |allowed: bool| if allowed { "allow" } else { "deny" };
    let by_enforced = by(&decision.by);
    let mut log = format!("{} {by_enforced}", word(decision.allowed));
    counters.count(decision.allowed, &by_enforced, false);
    if let Some((allowed, dry_by)) = &decision.dry_run {
        let dry_by = by(dry_by);
        let _ = write!(log, "; dry-run {} {dry_by}", word(*allowed));
        counters.count(*allowed, &dry_by, true);
    }
    Verdict {
        allowed: decision.allowed,
        log,
        denial: if decision.allowed { String::new() } else { decision.denial() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_read_from_whole_spiffe_ids_only() {
        let c = Caller::from_spiffe_id("spiffe://cluster.local/ns/shop/sa/client").unwrap();
        assert_eq!((c.namespace(), c.service_account()), ("shop", "client"));
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/client/extra",
            "spiffe://cluster.local/ns//sa/client",
            "spiffe:///ns/shop/sa/client",
            "https://cluster.local/ns/shop/sa/client",
            "spiffe://cluster.local/sa/shop/ns/client",
        ] {
            assert_eq!(Caller::from_spiffe_id(bad), None, "{bad}");
        }
    }
}
