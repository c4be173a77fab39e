//! Missing RBAC permissions, said clearly. Every call the operator makes to the API server can
//! be refused (403) when its ClusterRole or Role lacks a rule: a chart trimmed by hand, an
//! upgrade that needs a new verb, a policy engine that strips rules. Such a refusal is never
//! retried in silence. Each one is
//! - logged as an error naming the verb, the resource and the scope
//!   (`missing permission: cannot list trafficroutes.skein.dev at the cluster scope`), once per
//!   permission every [`REPEAT`] while it lasts (one permission missing in many namespaces is
//!   one line, naming the first);
//! - counted in `skein_operator_permission_denied_total{verb, resource}`, every time;
//! - published as a `MissingPermission` Warning event on the operator's own pod, so
//!   `kubectl describe pod` shows it (when events may still be written).
//!
//! Callers that write an object's status add an event on that object too (the status writer).
//! The verb and resource come from the API server's own message, whose form is the same on
//! every Kubernetes release: `User "u" cannot <verb> resource "<resource>[/<sub>]" in API group
//! "<group>" (in the namespace "<ns>" | at the cluster scope)`. One refusal reads otherwise: a
//! write that would create its object (server-side apply) is authorized for `create` afterwards
//! and refused as `<resource> "<name>" is forbidden: <reason>`; that one is reported as `create`
//! of that resource.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::metrics::{Metrics, PermissionLabels};

/// How often one missing permission is logged and published again while it lasts.
pub const REPEAT: Duration = Duration::from_secs(300);

/// One refused request: what the operator may not do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Missing {
    pub verb: String,
    /// The resource, with its subresource (`trafficroutes/status`).
    pub resource: String,
    /// The API group (`""` for the core group).
    pub group: String,
    pub scope: Scope,
}

/// Where a refused request applied.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Namespace(String),
    Cluster,
    /// The API server's message did not say (a write that would have created its object).
    Unknown,
}

impl Missing {
    /// The refusal in `error`, if it is one (HTTP 403).
    pub fn from_error(error: &kube::Error) -> Option<Self> {
        match error {
            kube::Error::Api(response) => Self::from_response(response.code, &response.message),
            _ => None,
        }
    }

    /// The refusal behind a watcher's error, if it is one.
    pub fn from_watch_error(error: &kube::runtime::watcher::Error) -> Option<Self> {
        use kube::runtime::watcher::Error as W;
        match error {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => Self::from_error(e),
            W::WatchError(response) => Self::from_response(response.code, &response.message),
            _ => None,
        }
    }

    /// Parses the API server's refusal message (`code` 403).
    pub fn from_response(code: u16, message: &str) -> Option<Self> {
        if code != 403 {
            return None;
        }
        let Some(at) = message.find(" cannot ") else { return Self::create_refused(message) };
        let rest = &message[at + " cannot ".len()..];
        let (verb, rest) = rest.split_once(" resource \"")?;
        let (resource, rest) = rest.split_once('"')?;
        let rest = rest.strip_prefix(" in API group \"")?;
        let (group, rest) = rest.split_once('"')?;
        let scope = match rest.strip_prefix(" in the namespace \"").and_then(|r| r.split_once('"')) {
            Some((ns, _)) => Scope::Namespace(ns.to_string()),
            None => Scope::Cluster,
        };
        Some(Self { verb: verb.to_string(), resource: resource.to_string(), group: group.to_string(), scope })
    }

    /// `configmaps "x" is forbidden: <reason>`: the `create` a write needed to create `x`.
    fn create_refused(message: &str) -> Option<Self> {
        let (qualified, rest) = message.split_once(' ')?;
        if !rest.starts_with('"') || !rest.contains("\" is forbidden") || qualified.is_empty() {
            return None;
        }
        let (resource, group) = qualified.split_once('.').unwrap_or((qualified, ""));
        Some(Self {
            verb: "create".into(),
            resource: resource.to_string(),
            group: group.to_string(),
            scope: Scope::Unknown,
        })
    }

    /// What repeats of one missing permission share: the namespace left out, so a rule missing
    /// in every meshed namespace is said once.
    fn dedup_key(&self) -> (String, String, String, bool) {
        (self.verb.clone(), self.resource.clone(), self.group.clone(), matches!(self.scope, Scope::Cluster))
    }

    /// `trafficroutes.skein.dev`, `secrets`, `leases.coordination.k8s.io`.
    pub fn qualified_resource(&self) -> String {
        match self.resource.split_once('/') {
            _ if self.group.is_empty() => self.resource.clone(),
            Some((resource, sub)) => format!("{resource}.{}/{sub}", self.group),
            None => format!("{}.{}", self.resource, self.group),
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot {} {}", self.verb, self.qualified_resource())?;
        match &self.scope {
            Scope::Namespace(ns) => write!(f, " in namespace {ns}"),
            Scope::Cluster => write!(f, " at the cluster scope"),
            Scope::Unknown => Ok(()),
        }
    }
}

/// A refused request, as [`Permissions::check`] found it.
#[derive(Debug)]
pub struct Refusal {
    pub missing: Missing,
    /// Whether it was logged (and published) now, rather than within [`REPEAT`] of the last time.
    pub reported: bool,
}

/// Reports refusals (see the module header); one per process, shared by every loop.
pub struct Permissions {
    recorder: Recorder,
    /// The operator's own pod, where its events go; `None` outside a pod.
    pod: Option<ObjectReference>,
    metrics: Metrics,
    last: Mutex<HashMap<(String, String, String, bool), Instant>>,
    /// Other things said at most once every [`REPEAT`] (a `StatusNotWritten` event per object).
    told: Mutex<HashMap<String, Instant>>,
}

impl Permissions {
    pub fn new(recorder: Recorder, pod: Option<ObjectReference>, metrics: Metrics) -> Self {
        Self { recorder, pod, metrics, last: Mutex::default(), told: Mutex::default() }
    }

    /// Reports `error` if the API server refused it for want of a permission, saying what the
    /// operator needed it for (`"watch TrafficRoutes"`); returns the refusal. Anything else is
    /// left to the caller.
    pub async fn check(&self, error: &kube::Error, needed_for: &str) -> Option<Refusal> {
        let missing = Missing::from_error(error)?;
        let reported = self.report(&missing, needed_for).await;
        Some(Refusal { missing, reported })
    }

    /// As [`Self::check`], for a watcher's error.
    pub async fn check_watch(
        &self,
        error: &kube::runtime::watcher::Error,
        needed_for: &str,
    ) -> Option<Refusal> {
        let missing = Missing::from_watch_error(error)?;
        let reported = self.report(&missing, needed_for).await;
        Some(Refusal { missing, reported })
    }

    /// Counts `missing`, and logs and publishes it unless it was within [`REPEAT`]; returns
    /// whether it did.
    pub async fn report(&self, missing: &Missing, needed_for: &str) -> bool {
        self.metrics
            .permission_denied
            .get_or_create(&PermissionLabels {
                verb: missing.verb.clone(),
                resource: missing.qualified_resource(),
            })
            .inc();
        if !self.due(missing, Instant::now()) {
            return false;
        }
        tracing::error!(
            verb = %missing.verb,
            resource = %missing.qualified_resource(),
            namespace = match &missing.scope {
                Scope::Namespace(ns) => ns.as_str(),
                _ => "",
            },
            needed_for,
            "missing permission: {missing} (needed to {needed_for}); the skein-operator ClusterRole or Role must grant it"
        );
        let Some(pod) = &self.pod else { return true };
        let event = Event {
            type_: EventType::Warning,
            reason: "MissingPermission".into(),
            note: Some(format!("{missing} (needed to {needed_for})")),
            // The recorder folds events of one action, reason and object into one series (and
            // keeps the first one's note): one series per missing permission, so each is named.
            action: format!("{} {}", missing.verb, missing.qualified_resource()).chars().take(128).collect(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, pod).await {
            // Events themselves may be what is missing: the log line above stands.
            if Missing::from_error(&e).is_none() {
                tracing::warn!(error = %e, "could not publish the MissingPermission event");
            }
        }
        true
    }

    /// Whether `missing` is to be logged now (first time, or [`REPEAT`] after the last time).
    fn due(&self, missing: &Missing, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(&missing.dedup_key()) {
            Some(at) if now.duration_since(*at) < REPEAT => false,
            _ => {
                last.insert(missing.dedup_key(), now);
                true
            }
        }
    }

    /// Whether `key` (a `StatusNotWritten` event on one object, say) is to be said now: the
    /// first time, and [`REPEAT`] after the last time.
    pub fn due_once(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut told = self.told.lock().unwrap_or_else(|e| e.into_inner());
        match told.get(key) {
            Some(at) if now.duration_since(*at) < REPEAT => false,
            _ => {
                told.insert(key.to_string(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_servers_refusals_name_verb_resource_and_scope() {
        let cluster = Missing::from_response(
            403,
            r#"trafficroutes.skein.dev is forbidden: User "system:serviceaccount:skein-system:skein-operator" cannot list resource "trafficroutes" in API group "skein.dev" at the cluster scope"#,
        )
        .unwrap();
        assert_eq!(cluster.verb, "list");
        assert_eq!(cluster.scope, Scope::Cluster);
        assert_eq!(cluster.to_string(), "cannot list trafficroutes.skein.dev at the cluster scope");

        let status = Missing::from_response(
            403,
            r#"trafficroutes.skein.dev "reviews" is forbidden: User "system:serviceaccount:s:o" cannot patch resource "trafficroutes/status" in API group "skein.dev" in the namespace "shop""#,
        )
        .unwrap();
        assert_eq!(status.to_string(), "cannot patch trafficroutes.skein.dev/status in namespace shop");

        let core = Missing::from_response(
            403,
            r#"secrets "skein-identity-web" is forbidden: User "system:serviceaccount:s:o" cannot create resource "secrets" in API group "" in the namespace "shop": RBAC: no rule"#,
        )
        .unwrap();
        assert_eq!(core.qualified_resource(), "secrets");
        assert_eq!(core.to_string(), "cannot create secrets in namespace shop");

        // Server-side apply of an object that does not exist, without `create`.
        let apply =
            Missing::from_response(403, r#"configmaps "skein-proxies-a" is forbidden: RBAC: no rule"#)
                .unwrap();
        assert_eq!(apply.to_string(), "cannot create configmaps");
        let grouped =
            Missing::from_response(403, r#"leases.coordination.k8s.io "skein-operator" is forbidden: no"#)
                .unwrap();
        assert_eq!(grouped.to_string(), "cannot create leases.coordination.k8s.io");
    }

    #[test]
    fn one_permission_missing_in_many_namespaces_is_one_report() {
        let refused = |ns: &str| {
            Missing::from_response(
                403,
                &format!(r#"x is forbidden: User "u" cannot create resource "secrets" in API group "" in the namespace "{ns}""#),
            )
            .unwrap()
        };
        assert_eq!(refused("a").dedup_key(), refused("b").dedup_key());
        assert_ne!(refused("a"), refused("b"), "each still names its namespace");
    }

    #[test]
    fn other_errors_are_not_refusals() {
        assert_eq!(Missing::from_response(404, r#"User "u" cannot get resource "x" in API group """#), None);
        assert_eq!(Missing::from_response(403, "forbidden by a webhook"), None);
        assert_eq!(Missing::from_response(403, r#"pods "a" is not allowed"#), None);
        assert_eq!(Missing::from_response(403, ""), None);
    }

    #[tokio::test]
    async fn one_permission_is_logged_once_per_repeat_and_counted_every_time() {
        // A recorder needs a client; none is reached since there is no pod to publish on.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let recorder = Recorder::new(client, kube::runtime::events::Reporter::from("test"));
        let metrics = Metrics::default();
        let permissions = Permissions::new(recorder, None, metrics.clone());
        let missing = Missing::from_response(
            403,
            r#"x is forbidden: User "u" cannot watch resource "pods" in API group "" at the cluster scope"#,
        )
        .unwrap();
        let now = Instant::now();
        assert!(permissions.due(&missing, now));
        assert!(!permissions.due(&missing, now + Duration::from_secs(10)));
        assert!(permissions.due(&missing, now + REPEAT));
        permissions.report(&missing, "watch Pods").await;
        permissions.report(&missing, "watch Pods").await;
        let labels = PermissionLabels { verb: "watch".into(), resource: "pods".into() };
        assert_eq!(metrics.permission_denied.get_or_create(&labels).get(), 2);
    }
}
