//! Which Services a workload's proxy receives: all of them unless its ServiceAccount, or else
//! its Namespace, carries the annotation `skein.dev/destinations` — a comma-separated list of
//! `<namespace>/<service>` patterns, where the namespace is a name, `.` (the workload's own) or
//! `*`, and the service a name or `*` (`./*, payments/api, shared/*`). A proxy holds only the
//! Services its scope names, plus every Service a TrafficRoute of those sends traffic to, so
//! its memory and every push grow with what it calls, not with the mesh (the anchors' scaling
//! problem; Istio's `Sidecar` egress hosts, without a new kind).
//!
//! A call to a Service outside the scope is not known to the proxy: it leaves as passthrough to
//! the address the app asked for, without mesh features or mTLS (so a strict callee refuses it).
//! An annotation with an entry that does not parse counts as absent (every Service): scoping is
//! an optimisation, never the way to deny a call (that is `AccessPolicy`), so a typo must not
//! cut a workload off; the operator logs it.

use std::collections::{BTreeMap, BTreeSet};

/// A namespace pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Namespace {
    /// `.`: the workload's own.
    Own,
    Any,
    Named(String),
}

/// A parsed `skein.dev/destinations` value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    All,
    Only(BTreeSet<(NamespacePattern, Option<String>)>),
}

/// The namespace side of one entry (public for `Scope`'s ordering only).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacePattern(Namespace);

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Scope {
    /// Reads an annotation value; `Err` names the entry that does not parse.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut entries = BTreeSet::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((ns, name)) = entry.split_once('/') else {
                return Err(format!("{entry:?} is not <namespace>/<service>"));
            };
            let ns = match ns {
                "." => Namespace::Own,
                "*" => Namespace::Any,
                n if is_name(n) => Namespace::Named(n.to_string()),
                _ => return Err(format!("{entry:?}: the namespace must be a name, . or *")),
            };
            let name = match name {
                "*" => None,
                n if is_name(n) => Some(n.to_string()),
                _ => return Err(format!("{entry:?}: the service must be a name or *")),
            };
            if ns == Namespace::Any && name.is_none() {
                return Ok(Self::All);
            }
            entries.insert((NamespacePattern(ns), name));
        }
        if entries.is_empty() {
            return Err("no <namespace>/<service> entry".into());
        }
        Ok(Self::Only(entries))
    }

    /// Whether a workload of `own` namespace receives Service `namespace/name`.
    pub fn includes(&self, own: &str, namespace: &str, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(entries) => entries.iter().any(|(ns, n)| {
                let ns_ok = match &ns.0 {
                    Namespace::Own => namespace == own,
                    Namespace::Any => true,
                    Namespace::Named(x) => x == namespace,
                };
                ns_ok && n.as_deref().is_none_or(|n| n == name)
            }),
        }
    }

    /// Whether the scope depends on the workload's own namespace (`./…` entries).
    pub fn relative(&self) -> bool {
        matches!(self, Self::Only(e) if e.iter().any(|(ns, _)| ns.0 == Namespace::Own))
    }
}

/// The scope of every workload: per ServiceAccount and per Namespace annotation, with the
/// problems found (object → why it counts as absent).
#[derive(Debug, Default)]
pub struct Scopes {
    pub by_service_account: BTreeMap<(String, String), Scope>,
    pub by_namespace: BTreeMap<String, Scope>,
    pub problems: BTreeMap<String, String>,
}

impl Scopes {
    /// The scope of identity `namespace/service_account`.
    pub fn of(&self, namespace: &str, service_account: &str) -> &Scope {
        self.by_service_account
            .get(&(namespace.to_string(), service_account.to_string()))
            .or_else(|| self.by_namespace.get(namespace))
            .unwrap_or(&Scope::All)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_namespaces_and_services() {
        let s = Scope::parse("./*, payments/api ,shared/*").unwrap();
        assert!(s.includes("shop", "shop", "reviews"));
        assert!(s.includes("shop", "payments", "api"));
        assert!(!s.includes("shop", "payments", "ledger"));
        assert!(s.includes("shop", "shared", "anything"));
        assert!(!s.includes("books", "shop", "reviews"), ". is the workload's own namespace");
        assert!(s.relative());
        assert_eq!(Scope::parse("*/*, shop/x").unwrap(), Scope::All);
        assert!(Scope::parse("*/api").unwrap().includes("a", "b", "api"));
        for bad in ["", "shop", "Shop/x", "shop/", "shop/x/y", "-a/x", " , "] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_service_account_overrides_its_namespace() {
        let mut scopes = Scopes::default();
        scopes.by_namespace.insert("shop".into(), Scope::parse("./*").unwrap());
        scopes.by_service_account.insert(("shop".into(), "batch".into()), Scope::All);
        assert_eq!(scopes.of("shop", "batch"), &Scope::All);
        assert!(!scopes.of("shop", "web").includes("shop", "books", "x"));
        assert_eq!(scopes.of("books", "web"), &Scope::All);
    }
}
