//! Access decisions (`AccessPolicy`) as a pure function: the policies in force at one
//! workload's inbound, a caller and a request in, a decision out. The sidecar enforces it
//! before a request reaches the app; the operator uses it to explain and check policies.
//!
//! Evaluation (DESIGN.md): Deny policies first, then Allow; a port with at least one Allow
//! policy denies what none allows; a port with none follows the default. `DryRun` policies
//! decide on the side and are recorded, never enforced.
//!
//! The anchors' trip-ups, each pinned by a test below:
//! - an HTTP-only field (methods, paths) can never be checked on a connection that is not HTTP:
//!   an Allow rule with one does not match it, a Deny rule with one does (it fails closed, and
//!   the operator reports such rules on ports it knows are not HTTP);
//! - `namespaces: ["*"]` and service-account wildcards match authenticated callers only; a
//!   caller without an identity matches nothing but `unauthenticated: true`;
//! - entries of one `from` (or `to`) must all match (AND), entries of a list any one (OR);
//! - path rules see the normalised path (dot segments resolved, `//` merged, unreserved escapes
//!   decoded), and a path that hides a `/` or `\` in an escape matches no Allow rule and every
//!   Deny rule with paths, so `/admin%2F..` cannot slip past a prefix.

use serde::{Deserialize, Serialize};

/// What a workload's inbound enforces.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InboundAuthz {
    /// Applies to ports that no Allow policy targets.
    #[serde(default)]
    pub default: DefaultPolicy,
    /// The workload's own namespace (for `SameNamespace`).
    #[serde(default)]
    pub namespace: String,
    /// The policies targeting this workload, ordered by name (`<ns>/<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AuthzPolicy>,
}

impl InboundAuthz {
    /// Whether a policy in force on `port` (enforced or DryRun) matches paths: then the app must
    /// be sent the normalised path the rules saw, never the raw one it might read differently.
    pub fn checks_paths(&self, port: u16) -> bool {
        self.policies.iter().filter(|p| p.ports.is_empty() || p.ports.contains(&port)).any(|p| {
            p.rules
                .iter()
                .filter_map(|r| r.to.as_ref())
                .any(|t| !t.paths.is_empty() && (t.ports.is_empty() || t.ports.contains(&port)))
        })
    }
}

/// What happens where no Allow policy applies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Every caller (the mesh's behaviour without policies).
    #[default]
    Allow,
    /// Any caller with a mesh identity.
    Authenticated,
    /// Mesh identities of the workload's own namespace.
    SameNamespace,
    /// Nobody.
    Deny,
}

impl DefaultPolicy {
    /// Every value, as written.
    pub const ALL: [Self; 4] = [Self::Allow, Self::Authenticated, Self::SameNamespace, Self::Deny];

    /// Reads `allow`, `authenticated`, `same-namespace` or `deny`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Authenticated => "authenticated",
            Self::SameNamespace => "same-namespace",
            Self::Deny => "deny",
        }
    }
}

/// Allow or Deny.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Enforce, or decide and record only.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

/// One policy as a proxy holds it: its Service ports already translated to the workload's
/// container ports by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzPolicy {
    /// `<namespace>/<name>`, as a denial names it.
    pub name: String,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub mode: Mode,
    /// The container ports it applies to; every port when empty (a Namespace target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Any one matching rule applies the action; no rules match nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthzRule>,
}

/// `from` and `to` must both match; an omitted one matches everything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Destination>,
}

/// Callers: every non-empty list must match (AND), one entry of each (OR).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// `(namespace, name)`; name `*` is any service account of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<(String, String)>,
    /// Whole SPIFFE IDs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Namespaces of the caller's identity; `*` is any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Callers without a mesh identity (plaintext, in permissive mode); alone in its `from`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// Requests: every non-empty list must match (AND), one entry of each (OR).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Container ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTP methods (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// HTTP paths (HTTP only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
}

/// A path rule: the whole path, or a prefix of whole segments (`/api` is `/api` and `/api/…`,
/// never `/apis`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// The verified caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller<'a> {
    /// From the peer certificate; `None` for a plaintext caller.
    pub identity: Option<Identity<'a>>,
}

/// A caller's mesh identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity<'a> {
    pub spiffe_id: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
}

/// What is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The app's (container) port.
    pub port: u16,
    /// `(method, path)` for HTTP; `None` for any other protocol.
    pub http: Option<(&'a str, &'a str)>,
}

/// Who decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecidedBy {
    /// A policy (`<ns>/<name>`): the Deny policy that matched, the Allow policy that matched,
    /// or the first Allow policy of a port none of whose Allow policies matched.
    Policy(String),
    /// The default of a port without Allow policies.
    Default(DefaultPolicy),
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub by: DecidedBy,
    /// What the DryRun policies would have decided, when that differs.
    pub dry_run: Option<(bool, DecidedBy)>,
}

impl Decision {
    /// The 403 body of a denial: `denied by <ns>/<policy>` or the namespace default.
    pub fn denial(&self) -> String {
        match &self.by {
            DecidedBy::Policy(p) => format!("denied by {p}"),
            DecidedBy::Default(d) => format!("denied by the namespace default ({})", d.as_str()),
        }
    }
}

/// Decides `request` from `caller` under `authz`.
pub fn evaluate(authz: &InboundAuthz, caller: &Caller<'_>, request: &Request<'_>) -> Decision {
    let path = request.http.map(|(_, p)| normalize_path(p));
    let enforced = decide(authz, caller, request, path.as_ref(), |m| m == Mode::Enforce);
    // Decided a second time only when a DryRun policy could change the outcome.
    let dry_run = authz
        .policies
        .iter()
        .any(|p| p.mode == Mode::DryRun)
        .then(|| decide(authz, caller, request, path.as_ref(), |_| true))
        .filter(|with_dry_run| *with_dry_run != enforced);
    Decision { allowed: enforced.0, by: enforced.1, dry_run }
}

fn decide(
    authz: &InboundAuthz,
    caller: &Caller<'_>,
    request: &Request<'_>,
    path: Option<&Result<String, Hidden>>,
    counts: impl Fn(Mode) -> bool,
) -> (bool, DecidedBy) {
    // No allocation on this path: it runs for every inbound request.
    let applicable = || {
        authz
            .policies
            .iter()
            .filter(|p| counts(p.mode) && (p.ports.is_empty() || p.ports.contains(&request.port)))
    };
    for p in applicable().filter(|p| p.action == Action::Deny) {
        if p.rules.iter().any(|r| rule_matches(r, Action::Deny, caller, request, path)) {
            return (false, DecidedBy::Policy(p.name.clone()));
        }
    }
    let mut allows = applicable().filter(|p| p.action == Action::Allow).peekable();
    if let Some(first) = allows.peek().map(|p| &p.name) {
        return match allows
            .find(|p| p.rules.iter().any(|r| rule_matches(r, Action::Allow, caller, request, path)))
        {
            Some(p) => (true, DecidedBy::Policy(p.name.clone())),
            None => (false, DecidedBy::Policy(first.clone())),
        };
    }
    let allowed = match (authz.default, caller.identity) {
        (DefaultPolicy::Allow, _) => true,
        (DefaultPolicy::Authenticated, id) => id.is_some(),
        (DefaultPolicy::SameNamespace, Some(id)) => id.namespace == authz.namespace,
        (DefaultPolicy::SameNamespace, None) | (DefaultPolicy::Deny, _) => false,
    };
    (allowed, DecidedBy::Default(authz.default))
}

/// A path whose escapes hide a separator: it cannot be matched faithfully.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hidden;

fn rule_matches(
    rule: &AuthzRule,
    action: Action,
    caller: &Caller<'_>,
    request: &Request<'_>,
    path: Option<&Result<String, Hidden>>,
) -> bool {
    // The caller first: most rules of a long list name someone else.
    rule.from.as_ref().is_none_or(|s| source_matches(s, caller))
        && rule.to.as_ref().is_none_or(|d| destination_matches(d, action, request, path))
}

fn source_matches(s: &Source, caller: &Caller<'_>) -> bool {
    let Some(id) = caller.identity else { return s.unauthenticated };
    if s.unauthenticated {
        // Alone in its `from` (the schema says so): callers without an identity only.
        return false;
    }
    if s.service_accounts.is_empty() && s.identities.is_empty() && s.namespaces.is_empty() {
        return false;
    }
    let sa = s.service_accounts.is_empty()
        || s.service_accounts
            .iter()
            .any(|(ns, name)| ns == id.namespace && (name == "*" || name == id.service_account));
    let spiffe = s.identities.is_empty() || s.identities.iter().any(|i| i == id.spiffe_id);
    let ns = s.namespaces.is_empty() || s.namespaces.iter().any(|n| n == "*" || n == id.namespace);
    sa && spiffe && ns
}

fn destination_matches(
    d: &Destination,
    action: Action,
    request: &Request<'_>,
    path: Option<&Result<String, Hidden>>,
) -> bool {
    if !d.ports.is_empty() && !d.ports.contains(&request.port) {
        return false;
    }
    let http_fields = !d.methods.is_empty() || !d.paths.is_empty();
    let Some((method, _)) = request.http else {
        // HTTP fields cannot be checked on this connection: fail closed.
        return !http_fields || action == Action::Deny;
    };
    if !d.methods.is_empty() && !d.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
        return false;
    }
    if d.paths.is_empty() {
        return true;
    }
    match path {
        Some(Ok(path)) => d.paths.iter().any(|m| match m {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty() || path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
            }
        }),
        // An escaped separator: no Allow rule with paths matches it, every Deny rule does.
        _ => action == Action::Deny,
    }
}

/// The path as routing sees it: no query, unreserved escapes decoded, `//` merged, `.` and `..`
/// segments resolved (RFC 3986 §5.2.4). An escaped `/` or `\` (or a stray `\`) is `Hidden`.
pub fn normalize_path(raw: &str) -> Result<String, Hidden> {
    let raw = raw.split(['?', '#']).next().unwrap_or_default();
    let bytes = raw.as_bytes();
    // Bytes, not chars: only ASCII escapes are decoded (to ASCII), so multi-byte UTF-8 passes
    // through whole and the result stays valid UTF-8.
    let mut decoded: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex =
                std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b'/' | b'\\') => return Err(Hidden),
                Some(c) if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        if b == b'\\' {
            return Err(Hidden);
        }
        decoded.push(b);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    // Dot segments are resolved as RFC 3986 §5.2.4 does, empty segments included (so
    // `/admin//../users` is `/admin/users`, as a standard server resolves it, not `/users`);
    // only then are empty segments merged. A segment's `;` parameters are cut off, as servlet
    // containers do (`/admin;x/users` is `/admin/users`).
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        let seg = seg.split(';').next().unwrap_or_default();
        match seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing =
        segments.last().is_some_and(|s| s.is_empty()) || decoded.ends_with("/.") || decoded.ends_with("/..");
    let kept: Vec<&str> = segments.into_iter().filter(|s| !s.is_empty()).collect();
    let mut out = String::from("/");
    out += &kept.join("/");
    if trailing && !kept.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Why a rule's path could never match a request (requests are matched after
/// [`normalize_path`]); `None` when it can. A prefix may end in `/`.
pub fn rule_path_problem(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return Some(format!("{path:?} does not start with /"));
    }
    if path.contains(['?', '#']) {
        return Some(format!("{path:?} has a query or fragment, which paths are matched without"));
    }
    match normalize_path(path) {
        Err(Hidden) => {
            Some(format!("{path:?} has an escaped / or a \\, which no request path is matched with"))
        }
        Ok(n) if n != path => Some(format!(
            "{path:?} is not normalised (requests are matched as {n:?}: dot segments resolved, // merged, \
             unreserved escapes decoded, ;parameters cut)"
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn id<'a>(spiffe: &'a str, ns: &'a str, sa: &'a str) -> Caller<'a> {
        Caller { identity: Some(Identity { spiffe_id: spiffe, namespace: ns, service_account: sa }) }
    }

    fn policy(name: &str, action: Action, rules: Vec<AuthzRule>) -> AuthzPolicy {
        AuthzPolicy { name: name.into(), action, mode: Mode::Enforce, ports: vec![], rules }
    }

    fn from(source: Source) -> AuthzRule {
        AuthzRule { from: Some(source), to: None }
    }

    fn sa(ns: &str, name: &str) -> Source {
        Source { service_accounts: vec![(ns.into(), name.into())], ..Default::default() }
    }

    fn get(path: &str) -> Request<'_> {
        Request { port: 9080, http: Some(("GET", path)) }
    }

    const TCP: Request<'static> = Request { port: 9080, http: None };

    /// The table: policies × callers × requests → (allowed, decided by).
    #[test]
    fn decisions() {
        let client = format!("spiffe://{TD}/ns/shop/sa/client");
        let rogue = format!("spiffe://{TD}/ns/shop/sa/rogue");
        let ops = format!("spiffe://{TD}/ns/ops/sa/prober");
        let client = id(&client, "shop", "client");
        let rogue = id(&rogue, "shop", "rogue");
        let ops = id(&ops, "ops", "prober");
        let plaintext = Caller { identity: None };
        let only_client = policy("shop/reviews-callers", Action::Allow, vec![from(sa("shop", "client"))]);
        let deny_ops_posts = policy(
            "shop/no-ops-writes",
            Action::Deny,
            vec![AuthzRule {
                from: Some(Source { namespaces: vec!["ops".into()], ..Default::default() }),
                to: Some(Destination { methods: vec!["POST".into()], ..Default::default() }),
            }],
        );
        let allow_any_ns = policy(
            "shop/any-namespace",
            Action::Allow,
            vec![from(Source { namespaces: vec!["*".into()], ..Default::default() })],
        );
        let allow_prefix = policy(
            "shop/api-only",
            Action::Allow,
            vec![AuthzRule {
                from: None,
                to: Some(Destination { paths: vec![PathMatch::Prefix("/api".into())], ..Default::default() }),
            }],
        );
        let with = |default: DefaultPolicy, policies: Vec<AuthzPolicy>| InboundAuthz {
            default,
            namespace: "shop".into(),
            policies,
        };
        let p = |s: &str| DecidedBy::Policy(s.into());
        let d = DecidedBy::Default;
        use DefaultPolicy::*;
        #[rustfmt::skip]
        let cases: Vec<(&str, InboundAuthz, Caller, Request, bool, DecidedBy)> = vec![
            ("no policy: today's behaviour", with(Allow, vec![]), rogue, get("/"), true, d(Allow)),
            ("allow-list admits its caller", with(Allow, vec![only_client.clone()]), client, get("/"), true, p("shop/reviews-callers")),
            ("allow-list denies everyone else", with(Allow, vec![only_client.clone()]), rogue, get("/"), false, p("shop/reviews-callers")),
            ("allow-list denies plaintext", with(Allow, vec![only_client.clone()]), plaintext, get("/"), false, p("shop/reviews-callers")),
            ("an allow-list wins over default deny", with(Deny, vec![only_client.clone()]), client, get("/"), true, p("shop/reviews-callers")),
            ("default deny without policies", with(Deny, vec![]), client, get("/"), false, d(Deny)),
            ("default authenticated: any identity", with(Authenticated, vec![]), ops, get("/"), true, d(Authenticated)),
            ("default authenticated: no plaintext", with(Authenticated, vec![]), plaintext, get("/"), false, d(Authenticated)),
            ("default same-namespace", with(SameNamespace, vec![]), ops, get("/"), false, d(SameNamespace)),
            ("default same-namespace admits neighbours", with(SameNamespace, vec![]), rogue, get("/"), true, d(SameNamespace)),
            ("deny first: a matching deny beats an allow", with(Allow, vec![allow_any_ns.clone(), deny_ops_posts.clone()]), ops, Request { port: 9080, http: Some(("POST", "/")) }, false, p("shop/no-ops-writes")),
            ("a deny that does not match leaves the allow", with(Allow, vec![allow_any_ns.clone(), deny_ops_posts.clone()]), ops, get("/"), true, p("shop/any-namespace")),
            ("istio#46056: namespaces * never matches plaintext", with(Allow, vec![allow_any_ns.clone()]), plaintext, get("/"), false, p("shop/any-namespace")),
            ("HTTP fields on TCP: an allow does not match", with(Allow, vec![allow_prefix.clone()]), client, TCP, false, p("shop/api-only")),
            ("HTTP fields on TCP: a deny fails closed", with(Allow, vec![deny_ops_posts.clone()]), ops, TCP, false, p("shop/no-ops-writes")),
            ("prefix /api is whole segments", with(Allow, vec![allow_prefix.clone()]), client, get("/apis"), false, p("shop/api-only")),
            ("prefix /api takes /api/v1", with(Allow, vec![allow_prefix.clone()]), client, get("/api/v1?x=1"), true, p("shop/api-only")),
            ("dot segments cannot climb into /api", with(Allow, vec![allow_prefix.clone()]), client, get("/public/../api/x"), true, p("shop/api-only")),
            ("dot segments cannot climb out of /api", with(Allow, vec![allow_prefix.clone()]), client, get("/api/../admin"), false, p("shop/api-only")),
            ("an escaped slash matches no allow", with(Allow, vec![allow_prefix.clone()]), client, get("/api%2F..%2Fadmin"), false, p("shop/api-only")),
        ];
        for (what, authz, caller, request, allowed, by) in cases {
            let decision = evaluate(&authz, &caller, &request);
            assert_eq!((decision.allowed, decision.by), (allowed, by), "{what}");
        }
    }

    #[test]
    fn and_within_a_from_or_across_rules() {
        let c = format!("spiffe://{TD}/ns/shop/sa/client");
        let client = id(&c, "shop", "client");
        // One `from` with two fields: both must match (a stray `-` would have made two rules).
        let both = policy(
            "shop/both",
            Action::Allow,
            vec![from(Source {
                service_accounts: vec![("shop".into(), "client".into())],
                namespaces: vec!["ops".into()],
                ..Default::default()
            })],
        );
        let authz = InboundAuthz { policies: vec![both], ..Default::default() };
        assert!(!evaluate(&authz, &client, &get("/")).allowed, "AND: the namespace does not match");
        let either = policy(
            "shop/either",
            Action::Allow,
            vec![
                from(sa("shop", "client")),
                from(Source { namespaces: vec!["ops".into()], ..Default::default() }),
            ],
        );
        let authz = InboundAuthz { policies: vec![either], ..Default::default() };
        assert!(evaluate(&authz, &client, &get("/")).allowed, "OR across rules");
        // Name "*" is any service account of that namespace, and only of that namespace.
        let star = policy("shop/star", Action::Allow, vec![from(sa("shop", "*"))]);
        let authz = InboundAuthz { policies: vec![star], ..Default::default() };
        assert!(evaluate(&authz, &client, &get("/")).allowed);
        let o = format!("spiffe://{TD}/ns/other/sa/client");
        assert!(!evaluate(&authz, &id(&o, "other", "client"), &get("/")).allowed);
    }

    #[test]
    fn empty_policies_and_sources_allow_nothing() {
        let c = format!("spiffe://{TD}/ns/shop/sa/client");
        let client = id(&c, "shop", "client");
        // An Allow policy without rules (`spec: {}` in Istio's words) allows nothing.
        let authz = InboundAuthz {
            policies: vec![policy("shop/nothing", Action::Allow, vec![])],
            ..Default::default()
        };
        assert!(!evaluate(&authz, &client, &get("/")).allowed);
        // An empty `from` (the schema refuses it) matches nobody rather than everybody.
        let authz = InboundAuthz {
            policies: vec![policy("shop/empty-from", Action::Allow, vec![from(Source::default())])],
            ..Default::default()
        };
        assert!(!evaluate(&authz, &client, &get("/")).allowed);
        // A plaintext caller matches only `unauthenticated: true`, and that matches no identity.
        let plain = policy(
            "shop/plaintext",
            Action::Allow,
            vec![from(Source { unauthenticated: true, ..Default::default() })],
        );
        let authz = InboundAuthz { policies: vec![plain], ..Default::default() };
        assert!(evaluate(&authz, &Caller { identity: None }, &get("/")).allowed);
        assert!(!evaluate(&authz, &client, &get("/")).allowed);
    }

    #[test]
    fn policies_apply_to_their_ports_only() {
        let c = format!("spiffe://{TD}/ns/shop/sa/rogue");
        let rogue = id(&c, "shop", "rogue");
        let mut on_9080 = policy("shop/reviews", Action::Allow, vec![from(sa("shop", "client"))]);
        on_9080.ports = vec![9080];
        let authz =
            InboundAuthz { default: DefaultPolicy::Allow, policies: vec![on_9080], ..Default::default() };
        assert!(!evaluate(&authz, &rogue, &get("/")).allowed);
        let other_port = Request { port: 8080, http: Some(("GET", "/")) };
        let d = evaluate(&authz, &rogue, &other_port);
        assert_eq!(
            (d.allowed, d.by),
            (true, DecidedBy::Default(DefaultPolicy::Allow)),
            "the default elsewhere"
        );
    }

    #[test]
    fn dry_run_decides_on_the_side_and_never_denies() {
        let c = format!("spiffe://{TD}/ns/shop/sa/rogue");
        let rogue = id(&c, "shop", "rogue");
        let mut trial = policy("shop/trial", Action::Allow, vec![from(sa("shop", "client"))]);
        trial.mode = Mode::DryRun;
        let authz = InboundAuthz { policies: vec![trial.clone()], ..Default::default() };
        let d = evaluate(&authz, &rogue, &get("/"));
        assert!(d.allowed, "never denies");
        assert_eq!(
            d.dry_run,
            Some((false, DecidedBy::Policy("shop/trial".into()))),
            "but records the denial"
        );
        let k = format!("spiffe://{TD}/ns/shop/sa/client");
        assert_eq!(
            evaluate(&authz, &id(&k, "shop", "client"), &get("/")).dry_run,
            Some((true, DecidedBy::Policy("shop/trial".into())))
        );
        assert_eq!(d.denial(), "denied by the namespace default (allow)");
        let mut deny_trial = policy("shop/deny-trial", Action::Deny, vec![AuthzRule::default()]);
        deny_trial.mode = Mode::DryRun;
        let authz = InboundAuthz { policies: vec![deny_trial], ..Default::default() };
        let d = evaluate(&authz, &rogue, &get("/"));
        assert!(d.allowed);
        assert_eq!(d.dry_run.map(|(a, _)| a), Some(false));
    }

    #[test]
    fn denials_name_what_decided() {
        let d = Decision { allowed: false, by: DecidedBy::Policy("shop/reviews".into()), dry_run: None };
        assert_eq!(d.denial(), "denied by shop/reviews");
        let d =
            Decision { allowed: false, by: DecidedBy::Default(DefaultPolicy::SameNamespace), dry_run: None };
        assert_eq!(d.denial(), "denied by the namespace default (same-namespace)");
    }

    #[test]
    fn dot_segments_resolve_before_empty_segments_merge() {
        assert_eq!(normalize_path("/admin//../users").as_deref(), Ok("/admin/users"));
        assert_eq!(normalize_path("/admin;x/users").as_deref(), Ok("/admin/users"));
        assert_eq!(normalize_path("/a/b/../../..").as_deref(), Ok("/"));
        assert_eq!(normalize_path("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(normalize_path("//a//b/").as_deref(), Ok("/a/b/"));
        assert_eq!(normalize_path("/a/./b").as_deref(), Ok("/a/b"));
    }

    #[test]
    fn non_ascii_paths_pass_through_whole() {
        assert_eq!(normalize_path("/caf%C3%A9/ü/../x").as_deref(), Ok("/caf%C3%A9/x"));
        assert_eq!(normalize_path("/ҏblic-%2e%2e.a").as_deref(), Ok("/ҏblic-...a"));
    }

    #[test]
    fn rule_paths_that_no_normalised_request_path_equals_are_named() {
        for ok in ["/", "/api", "/api/", "/caf%C3%A9", "/a-b_c~d.e"] {
            assert_eq!(rule_path_problem(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("api", "does not start with /"),
            ("/api?x=1", "query or fragment"),
            ("/a%2Fb", "escaped /"),
            ("/a//b", "not normalised"),
            ("/a/../b", "not normalised"),
            ("/a;x", "not normalised"),
            ("/%61pi", "not normalised"),
        ] {
            assert!(
                rule_path_problem(bad).is_some_and(|p| p.contains(says)),
                "{bad}: {:?}",
                rule_path_problem(bad)
            );
        }
    }

    #[test]
    fn only_ports_with_path_rules_check_paths() {
        let mut p = policy(
            "shop/p",
            Action::Allow,
            vec![AuthzRule {
                from: None,
                to: Some(Destination {
                    ports: vec![8080],
                    paths: vec![PathMatch::Prefix("/a".into())],
                    ..Default::default()
                }),
            }],
        );
        p.ports = vec![8080, 9090];
        let authz = InboundAuthz { policies: vec![p], ..Default::default() };
        assert!(authz.checks_paths(8080));
        assert!(!authz.checks_paths(9090), "the rule's to names 8080 only");
        assert!(!authz.checks_paths(7070), "the policy is not on 7070");
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        for (raw, want) in [
            ("/", Ok("/".to_string())),
            ("/a/b?x=../y", Ok("/a/b".into())),
            ("//a///b/", Ok("/a/b/".into())),
            ("/a/./b/../c", Ok("/a/c".into())),
            ("/../../etc", Ok("/etc".into())),
            ("/%61pi/%7Euser", Ok("/api/~user".into())),
            ("/a/%2e%2e/b", Ok("/b".into())),
            ("/a%2Fb", Err(Hidden)),
            ("/a%5cb", Err(Hidden)),
            ("/a\\b", Err(Hidden)),
            ("/100%", Ok("/100%".into())),
            ("/%zz", Ok("/%zz".into())),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }
}
