//! Status conditions as plain functions: `Programmed` from the proxies' acknowledgements, and
//! the merge that keeps `lastTransitionTime` when a condition's status did not change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use skein_api::crd::condition::{ACCEPTED, PROGRAMMED, RESOLVED_REFS};
use skein_api::{PolicyStatus, WorkloadIdentity};

use crate::compute::{Cond, DesiredStatus};

/// One connected proxy as the status computation sees it (and as replicas report theirs to the
/// leader, in JSON).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub identity: WorkloadIdentity,
    /// The proxy's own name (its pod name), for messages.
    pub proxy_id: String,
    /// The last version it applied.
    pub acked: Option<String>,
    /// The serial of the mesh that first gave that version, when this replica serves the proxy
    /// and the version is the one in force (not reported to the other replicas: their
    /// meshes have serials of their own).
    #[serde(skip)]
    pub acked_at: Option<u64>,
    /// The last version it refused, with its reason.
    pub rejected: Option<(String, String)>,
}

/// Every replica's proxies as one list: the leader's own first, then what the other replicas
/// reported; a proxy that shows up twice (it moved to another replica, and the old report is
/// not yet renewed) counts once, as the leader sees it or else as its first report says.
pub fn all_proxies(own: Vec<ProxyView>, reported: impl IntoIterator<Item = ProxyView>) -> Vec<ProxyView> {
    let mut seen: std::collections::HashSet<String> = own.iter().map(|p| p.proxy_id.clone()).collect();
    let mut all = own;
    for p in reported {
        if seen.insert(p.proxy_id.clone()) {
            all.push(p);
        }
    }
    all
}

/// `Programmed`: has every connected proxy that needs this resource applied the config that
/// carries its current generation? `current` gives the version each identity should be at; a
/// proxy at another version is programmed all the same when the resource is carried by a
/// destination that last changed at mesh serial `since` and the proxy's version is from that
/// mesh or a later one: a change elsewhere in the mesh leaves this resource Programmed.
pub fn programmed(
    accepted: &Cond,
    proxies: &[ProxyView],
    current: impl Fn(&WorkloadIdentity) -> String,
    since: Option<u64>,
) -> Cond {
    programmed_among(accepted, &Roster::new(proxies, current), since)
}

/// The proxies one pass of the status writer looks at, with what is the same for every resource
/// they all need: the version each should be at, and the message's version list and names.
pub struct Roster<'a> {
    proxies: &'a [ProxyView],
    wants: Vec<String>,
    versions: String,
    names: String,
}

impl<'a> Roster<'a> {
    pub fn new(proxies: &'a [ProxyView], current: impl Fn(&WorkloadIdentity) -> String) -> Self {
        let wants: Vec<String> = proxies.iter().map(|p| current(&p.identity)).collect();
        // By identity, so the message reads the same whichever order the proxies come in.
        let mut versions: std::collections::BTreeMap<&WorkloadIdentity, &str> = Default::default();
        for (p, want) in proxies.iter().zip(&wants) {
            versions.entry(&p.identity).or_insert(want);
        }
        let versions = version_list(&versions);
        Self { proxies, wants, versions, names: named(proxies) }
    }
}

/// [`programmed`] among the proxies of `roster`.
pub fn programmed_among(accepted: &Cond, roster: &Roster<'_>, since: Option<u64>) -> Cond {
    if !accepted.status {
        return Cond::fail(
            "NotAccepted",
            format!("not programmed: the resource is not accepted ({})", accepted.reason),
        );
    }
    let total = roster.proxies.len();
    if total == 0 {
        return Cond::ok("Programmed", "0/0 proxies: no connected proxy needs this yet");
    }
    let mut acked = 0;
    let mut rejected = None;
    let mut waiting = None;
    for (p, want) in roster.proxies.iter().zip(&roster.wants) {
        let carried = since.is_some_and(|s| p.acked_at.is_some_and(|at| at >= s));
        if p.acked.as_deref() == Some(want.as_str()) || carried {
            acked += 1;
        } else if let Some((v, err)) = &p.rejected {
            if v == want {
                rejected.get_or_insert_with(|| format!("proxy {} refused it: {err}", p.proxy_id));
            }
        } else {
            waiting.get_or_insert_with(|| format!("waiting for proxy {}", p.proxy_id));
        }
    }
    let summary = format!("{acked}/{total} proxies at config {}", roster.versions);
    if acked == total {
        Cond::ok("Programmed", format!("{summary}: {}", roster.names))
    } else if let Some(why) = rejected {
        Cond::fail("Rejected", format!("{summary}; {why}"))
    } else {
        Cond::fail("Pending", format!("{summary}; {}", waiting.unwrap_or_default()))
    }
}

/// `abc` for one identity; `abc (shop/client), def (shop/reviews)` for several, the first
/// three of a long list.
fn version_list(versions: &std::collections::BTreeMap<&WorkloadIdentity, &str>) -> String {
    const SHOWN: usize = 3;
    if versions.len() == 1 {
        return versions.values().next().map(|v| v.to_string()).unwrap_or_default();
    }
    let mut out: Vec<String> = versions.iter().take(SHOWN).map(|(id, v)| format!("{v} ({id})")).collect();
    if versions.len() > SHOWN {
        out.push(format!("and {} more", versions.len() - SHOWN));
    }
    out.join(", ")
}

/// The proxies by name (their pods' names in a cluster), the first few of a long list, so
/// `kubectl describe` says which pods are programmed without growing with the mesh.
fn named(proxies: &[ProxyView]) -> String {
    const SHOWN: usize = 5;
    let mut names: Vec<&str> = proxies.iter().map(|p| p.proxy_id.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let more = names.len().saturating_sub(SHOWN);
    names.truncate(SHOWN);
    let mut out = names.join(", ");
    if more > 0 {
        out += &format!(" and {more} more");
    }
    out
}

/// The status to write: desired conditions merged onto the existing ones. A condition keeps its
/// `lastTransitionTime` unless its status changed (Kubernetes API conventions); conditions of
/// other types (written by someone else) are kept.
pub fn merge(
    existing: Option<&PolicyStatus>,
    desired: &DesiredStatus,
    programmed: &Cond,
    now: &Time,
) -> PolicyStatus {
    let old = existing.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let ours = |t: &str| {
        [ACCEPTED, RESOLVED_REFS, PROGRAMMED].contains(&t) || desired.extra.iter().any(|(e, _)| *e == t)
    };
    let mut conditions: Vec<Condition> = old.iter().filter(|c| !ours(&c.type_)).cloned().collect();
    let fixed =
        [(ACCEPTED, &desired.accepted), (RESOLVED_REFS, &desired.resolved_refs), (PROGRAMMED, programmed)];
    for (type_, cond) in fixed.into_iter().chain(desired.extra.iter().map(|(t, c)| (*t, c))) {
        let status = if cond.status { "True" } else { "False" };
        let previous = old.iter().find(|c| c.type_ == type_);
        let last_transition_time = match previous {
            Some(p) if p.status == status => p.last_transition_time.clone(),
            _ => now.clone(),
        };
        conditions.push(Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: cond.reason.clone(),
            message: truncate(&cond.message, 32768),
            observed_generation: Some(desired.generation),
            last_transition_time,
        });
    }
    PolicyStatus { observed_generation: Some(desired.generation), conditions }
}

/// Conditions whose (status, reason) changed from `old` to `new`: these get an Event.
pub fn transitions<'a>(old: Option<&PolicyStatus>, new: &'a PolicyStatus) -> Vec<&'a Condition> {
    let before = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    new.conditions
        .iter()
        .filter(|c| {
            !before.iter().any(|b| b.type_ == c.type_ && b.status == c.status && b.reason == c.reason)
        })
        .collect()
}

/// Whether `new` only moves a message on from `old`: same generation, and no condition changes
/// its status or reason (so no event either). Such a write can wait a little.
pub fn progress_only(old: Option<&PolicyStatus>, new: &PolicyStatus) -> bool {
    old.is_some_and(|o| o.observed_generation == new.observed_generation) && transitions(old, new).is_empty()
}

/// Whether two statuses say the same thing (ignoring `lastTransitionTime` precision).
pub fn same(a: Option<&PolicyStatus>, b: &PolicyStatus) -> bool {
    let Some(a) = a else { return false };
    a.observed_generation == b.observed_generation
        && a.conditions.len() == b.conditions.len()
        && a.conditions.iter().zip(&b.conditions).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn desired(accepted: Cond) -> DesiredStatus {
        DesiredStatus::new(3, accepted, Cond::ok("ResolvedRefs", "ok"))
    }

    fn proxy(id: &str, sa: &str, acked: Option<&str>) -> ProxyView {
        ProxyView {
            identity: WorkloadIdentity::new("shop", sa),
            proxy_id: id.into(),
            acked: acked.map(str::to_string),
            acked_at: None,
            rejected: None,
        }
    }

    #[test]
    fn every_replica_s_proxies_count_once() {
        let own = vec![proxy("a", "x", Some("v1"))];
        let reported = vec![proxy("b", "x", Some("v1")), proxy("a", "x", Some("old")), proxy("c", "y", None)];
        let all = all_proxies(own, reported);
        let names: Vec<(&str, Option<&str>)> =
            all.iter().map(|p| (p.proxy_id.as_str(), p.acked.as_deref())).collect();
        assert_eq!(names, vec![("a", Some("v1")), ("b", Some("v1")), ("c", None)]);
        let text = serde_json::to_string(&all).unwrap();
        assert_eq!(serde_json::from_str::<Vec<ProxyView>>(&text).unwrap(), all);
    }

    /// A change elsewhere in the mesh gives every proxy a new version: a resource whose
    /// destination it did not touch stays Programmed.
    #[test]
    fn a_change_elsewhere_leaves_a_resource_programmed() {
        let accepted = Cond::ok("Accepted", "");
        let now = |_: &WorkloadIdentity| "new".to_string();
        let at = |id: &str, serial: u64| ProxyView { acked_at: Some(serial), ..proxy(id, "x", Some("old")) };
        // The destination carrying it is as it was since serial 5; the proxies' configs are from 7.
        let carried = programmed(&accepted, &[at("a", 7), at("b", 7)], now, Some(5));
        assert_eq!(carried, Cond::ok("Programmed", "2/2 proxies at config new: a, b"));
        // A proxy whose config is from before the destination changed is not.
        let behind = programmed(&accepted, &[at("a", 7), at("b", 4)], now, Some(5));
        assert_eq!((behind.status, behind.reason.as_str()), (false, "Pending"));
        // Another replica's proxy (no serial) is at the version in force or not programmed.
        let theirs = programmed(&accepted, &[at("a", 7), proxy("c", "x", Some("old"))], now, Some(5));
        assert!(!theirs.status);
    }

    #[test]
    fn programmed_counts_proxies_at_their_current_version() {
        let accepted = Cond::ok("Accepted", "");
        let current = |_: &WorkloadIdentity| "abc".to_string();
        let all = programmed(
            &accepted,
            &[proxy("a", "x", Some("abc")), proxy("b", "x", Some("abc"))],
            current,
            None,
        );
        assert_eq!(all, Cond::ok("Programmed", "2/2 proxies at config abc: a, b"));
        let many: Vec<ProxyView> = (0..8).map(|i| proxy(&format!("p{i}"), "x", Some("abc"))).collect();
        assert_eq!(
            programmed(&accepted, &many, current, None).message,
            "8/8 proxies at config abc: p0, p1, p2, p3, p4 and 3 more"
        );

        let some = programmed(
            &accepted,
            &[proxy("a", "x", Some("abc")), proxy("b", "x", Some("old"))],
            current,
            None,
        );
        assert!(!some.status);
        assert_eq!(some.reason, "Pending");
        assert!(some.message.starts_with("1/2 proxies at config abc"), "{}", some.message);

        let mut refusing = proxy("b", "x", Some("old"));
        refusing.rejected = Some(("abc".into(), "bad regex".into()));
        let rejected = programmed(&accepted, &[proxy("a", "x", Some("abc")), refusing], current, None);
        assert_eq!(rejected.reason, "Rejected");
        assert!(rejected.message.contains("proxy b refused it: bad regex"));

        let none = programmed(&accepted, &[], current, None);
        assert!(none.status);
        assert!(none.message.starts_with("0/0"));

        // Several identities: each one's version, named, in a stable order.
        let per_identity = |id: &WorkloadIdentity| format!("v-{}", id.service_account);
        let mixed = [
            proxy("reviews-0", "reviews", Some("v-reviews")),
            proxy("client-0", "client", Some("v-client")),
            proxy("reviews-1", "reviews", Some("v-reviews")),
        ];
        assert_eq!(
            programmed(&accepted, &mixed, per_identity, None).message,
            "3/3 proxies at config v-client (shop/client), v-reviews (shop/reviews): client-0, reviews-0, reviews-1"
        );
        let wide: Vec<ProxyView> =
            (0..5).map(|i| proxy(&format!("p{i}"), &format!("sa{i}"), Some("x"))).collect();
        let message = programmed(&accepted, &wide, per_identity, None).message;
        assert!(
            message.starts_with(
                "0/5 proxies at config v-sa0 (shop/sa0), v-sa1 (shop/sa1), v-sa2 (shop/sa2), and 2 more;"
            ),
            "{message}"
        );
    }

    #[test]
    fn programmed_is_false_when_not_accepted() {
        let c = programmed(&Cond::fail("Conflicted", "x"), &[], |_| "v".into(), None);
        assert_eq!((c.status, c.reason.as_str()), (false, "NotAccepted"));
    }

    #[test]
    fn merge_keeps_transition_time_when_status_is_unchanged() {
        let programmed_now = Cond::ok("Programmed", "1/1 proxies at config abc");
        let first = merge(None, &desired(Cond::ok("Accepted", "fine")), &programmed_now, &t(100));
        assert!(first.conditions.iter().all(|c| c.last_transition_time == t(100)));

        // Same statuses, new message: times stay.
        let second =
            merge(Some(&first), &desired(Cond::ok("Accepted", "still fine")), &programmed_now, &t(200));
        assert!(second.conditions.iter().all(|c| c.last_transition_time == t(100)));
        assert!(transitions(Some(&first), &second).is_empty());

        // Accepted flips: only its time moves, and it is the one transition.
        let third =
            merge(Some(&second), &desired(Cond::fail("Conflicted", "lost")), &programmed_now, &t(300));
        let accepted = third.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!(accepted.last_transition_time, t(300));
        assert_eq!(accepted.observed_generation, Some(3));
        let programmed_c = third.conditions.iter().find(|c| c.type_ == "Programmed").unwrap();
        assert_eq!(programmed_c.last_transition_time, t(100));
        let changed: Vec<&str> =
            transitions(Some(&second), &third).iter().map(|c| c.reason.as_str()).collect();
        assert_eq!(changed, ["Conflicted"]);
        assert!(!same(Some(&second), &third));
        assert!(same(Some(&third), &third.clone()));
    }

    #[test]
    fn merge_keeps_foreign_conditions() {
        let mut existing = PolicyStatus::default();
        existing.conditions.push(Condition {
            type_: "example.com/Audited".into(),
            status: "True".into(),
            reason: "Audited".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: t(1),
        });
        let merged =
            merge(Some(&existing), &desired(Cond::ok("Accepted", "")), &Cond::ok("Programmed", ""), &t(5));
        assert_eq!(merged.conditions.len(), 4);
        assert_eq!(merged.conditions[0].type_, "example.com/Audited");
    }

    #[test]
    fn progress_is_only_a_message_moving_on() {
        let accepted = Cond::ok("Accepted", "ok");
        let pending = |n: &str| Cond::fail("Pending", format!("{n}/5000 proxies at config v; waiting"));
        let a = merge(None, &desired(accepted.clone()), &pending("10"), &t(1));
        let b = merge(Some(&a), &desired(accepted.clone()), &pending("2000"), &t(2));
        assert!(progress_only(Some(&a), &b), "a count moving on");
        let done = merge(Some(&b), &desired(accepted.clone()), &Cond::ok("Programmed", "5000/5000"), &t(3));
        assert!(!progress_only(Some(&b), &done), "Programmed turning True is written at once");
        let mut next = desired(accepted);
        next.generation = 4;
        let regen = merge(Some(&b), &next, &pending("0"), &t(4));
        assert!(!progress_only(Some(&b), &regen), "a new generation is written at once");
        assert!(!progress_only(None, &a));
    }
}
