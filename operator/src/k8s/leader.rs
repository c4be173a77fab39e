//! Leader election on a `coordination.k8s.io/v1` Lease: the leader alone writes status and
//! events; every replica computes and serves config. The decision is a pure function of the
//! Lease and the clock; the loop around it does the API calls with optimistic concurrency
//! (`resourceVersion`), so two replicas can never both win the same renewal.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a Lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and others retry).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(2);

/// What to do with the Lease as found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it (a new term).
    Acquire,
    /// Someone else holds a live Lease.
    Follow { holder: String },
}

/// Decides from the Lease's spec, our identity and the time.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    match renewed {
        Some(at) if now < at + duration => Decision::Follow { holder: holder.to_string() },
        _ => Decision::Acquire,
    }
}

fn our_spec(previous: Option<&LeaseSpec>, me: &str, now: Timestamp, decision: &Decision) -> LeaseSpec {
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    let new_term = *decision == Decision::Acquire;
    LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: if new_term {
            Some(MicroTime(now))
        } else {
            previous.and_then(|s| s.acquire_time.clone()).or(Some(MicroTime(now)))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if new_term && previous.is_some() { transitions + 1 } else { transitions }),
        ..Default::default()
    }
}

/// Runs the election until `shutdown`, publishing whether we lead; on shutdown a leader gives
/// the Lease up so another replica takes over at once.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    me: String,
    leader: watch::Sender<bool>,
    permissions: std::sync::Arc<super::permissions::Permissions>,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let leading = match try_once(&api, &name, &me).await {
            Ok(leading) => leading,
            Err(e) => {
                if permissions.check(&e, &format!("hold the leader Lease {namespace}/{name}")).await.is_none()
                {
                    tracing::warn!(error = %e, lease = %name, "leader election round failed");
                }
                // A leader that cannot renew steps down before its Lease can expire elsewhere.
                false
            }
        };
        if set_leading(&leader, leading) {
            tracing::info!(leading, lease = %name, identity = %me, "leadership changed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RENEW_INTERVAL) => {}
        }
    }
    if *leader.borrow() {
        set_leading(&leader, false);
        if let Ok(mut lease) = api.get(&name).await {
            if let Some(spec) =
                lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(me.as_str()))
            {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = api.replace(&name, &PostParams::default(), &lease).await;
            }
        }
    }
}

async fn try_once(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
                spec: Some(our_spec(None, me, now, &Decision::Acquire)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => match decide(lease.spec.as_ref(), me, now) {
            Decision::Follow { .. } => Ok(false),
            decision => {
                lease.spec = Some(our_spec(lease.spec.as_ref(), me, now, &decision));
                // `replace` carries the resourceVersion we read: a concurrent writer makes it 409.
                match api.replace(name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        },
    }
}

/// Tells the loops that follow leadership whether this replica leads; whether that changed. A
/// renewal that keeps it leading wakes none of them (each starts afresh on a change: the
/// identity loop checks every workload's certificate against its record again, the status
/// writer forgets what it wrote).
fn set_leading(leader: &watch::Sender<bool>, leading: bool) -> bool {
    leader.send_if_modified(|current| std::mem::replace(current, leading) != leading)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_that_keeps_leadership_wakes_nobody() {
        let (leader, mut follower) = watch::channel(false);
        assert!(set_leading(&leader, true));
        assert!(follower.has_changed().unwrap());
        follower.mark_unchanged();
        assert!(!set_leading(&leader, true), "still leading");
        assert!(!follower.has_changed().unwrap(), "the loops that follow leadership are not woken");
        assert!(set_leading(&leader, false));
        assert!(follower.has_changed().unwrap());
    }

    fn lease(holder: Option<&str>, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&lease(Some("a"), 999)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&lease(Some("b"), 990)), "a", now), Decision::Follow { holder: "b".into() });
        assert_eq!(decide(Some(&lease(Some("b"), 980)), "a", now), Decision::Acquire, "expired");
        assert_eq!(decide(Some(&lease(None, 999)), "a", now), Decision::Acquire, "released");
    }

    #[test]
    fn a_new_term_counts_a_transition_and_a_renewal_keeps_it() {
        let now = Timestamp::from_second(1_000).unwrap();
        let old = LeaseSpec { lease_transitions: Some(2), ..lease(Some("b"), 900) };
        let taken = our_spec(Some(&old), "a", now, &Decision::Acquire);
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        let renewed = our_spec(Some(&taken), "a", now, &Decision::Renew);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
