//! RetryPolicy and OutlierPolicy attachment: each policy's target (a Service or a TrafficRoute),
//! its conversion to the wire's config, and conflicts (the oldest policy for a target wins).

use std::collections::BTreeMap;

use kube::ResourceExt;
use skein_api::config::{OutlierConfig, RetryConfig};
use skein_api::crd::{PolicyTargetRef, TargetKind};
use skein_api::duration::parse_millis;
use skein_api::{OutlierPolicy, RetryPolicy};

use super::routes::AcceptedRoute;
use super::snapshot::{ObjectKey, Snapshot};
use super::{age_key, Cond, DesiredStatus, ResourceKind, ResourceRef};

/// What a policy attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Target {
    Service(ObjectKey),
    Route(ObjectKey),
}

/// The parts of a policy kind the attachment logic needs.
pub(super) trait Policy<C>: ResourceExt {
    fn target_ref(&self) -> &PolicyTargetRef;
    fn convert(&self, key: &ObjectKey) -> Result<C, String>;
}

impl Policy<RetryConfig> for RetryPolicy {
    fn target_ref(&self) -> &PolicyTargetRef {
        &self.spec.target_ref
    }
    fn convert(&self, key: &ObjectKey) -> Result<RetryConfig, String> {
        let s = &self.spec;
        let ms = |field: &str, v: &str| parse_millis(v).map_err(|e| format!("spec.{field}: {e}"));
        let per_try_timeout_ms = s.per_try_timeout.as_deref().map(|v| ms("perTryTimeout", v)).transpose()?;
        let timeout_ms = s.timeout.as_deref().map(|v| ms("timeout", v)).transpose()?;
        if let (Some(p), Some(t)) = (per_try_timeout_ms, timeout_ms) {
            if p > t {
                return Err("spec.perTryTimeout must not exceed spec.timeout".into());
            }
        }
        if s.retry_on.contains(&skein_api::crd::retry_policy::RetryOn::RetriableStatusCodes)
            && s.retriable_status_codes.is_empty()
        {
            return Err("spec.retriableStatusCodes: must list at least one code when retryOn contains retriable-status-codes".into());
        }
        let backoff_base_ms = ms("backoff.baseInterval", &s.backoff.base_interval)?;
        let backoff_max_ms = ms("backoff.maxInterval", &s.backoff.max_interval)?;
        if backoff_base_ms > backoff_max_ms {
            return Err("spec.backoff.baseInterval must not exceed spec.backoff.maxInterval".into());
        }
        let retry_on = s
            .retry_on
            .iter()
            .map(|r| {
                serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
            })
            .collect();
        Ok(RetryConfig {
            policy: key.to_string(),
            attempts: u32::try_from(s.attempts).map_err(|_| "spec.attempts must not be negative")?,
            per_try_timeout_ms,
            timeout_ms,
            retry_on,
            retriable_status_codes: s
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            backoff_base_ms,
            backoff_max_ms,
            budget_percent: u32::try_from(s.budget.percent).unwrap_or(0),
            budget_min_per_second: u32::try_from(s.budget.min_retries_per_second).unwrap_or(0),
            retry_non_idempotent: s.retry_non_idempotent,
        })
    }
}

impl Policy<OutlierConfig> for OutlierPolicy {
    fn target_ref(&self) -> &PolicyTargetRef {
        &self.spec.target_ref
    }
    fn convert(&self, key: &ObjectKey) -> Result<OutlierConfig, String> {
        let s = &self.spec;
        let ms = |field: &str, v: &str| parse_millis(v).map_err(|e| format!("spec.{field}: {e}"));
        let base_ejection_ms = ms("baseEjectionTime", &s.base_ejection_time)?;
        let max_ejection_ms = ms("maxEjectionTime", &s.max_ejection_time)?;
        if base_ejection_ms > max_ejection_ms {
            return Err("spec.baseEjectionTime must not exceed spec.maxEjectionTime".into());
        }
        let interval_ms = ms("interval", &s.interval)?;
        if interval_ms < 10 {
            return Err("spec.interval: interval must be at least 10ms".into());
        }
        Ok(OutlierConfig {
            policy: key.to_string(),
            consecutive_errors: u32::try_from(s.consecutive_errors).unwrap_or(1).max(1),
            interval_ms,
            base_ejection_ms,
            max_ejection_ms,
            max_ejection_percent: u32::try_from(s.max_ejection_percent).unwrap_or(0).min(100),
        })
    }
}

pub(super) fn accept_policies<C: Clone, P: Policy<C>>(
    policies: &BTreeMap<ObjectKey, P>,
    kind: ResourceKind,
    snapshot: &Snapshot,
    routes: &[AcceptedRoute],
    statuses: &mut BTreeMap<ResourceRef, DesiredStatus>,
) -> BTreeMap<Target, C> {
    let mut valid = Vec::new();
    for (key, policy) in policies {
        let status_ref = ResourceRef { kind, key: key.clone() };
        let generation = policy.meta().generation.unwrap_or(0);
        let target = target_of(policy.target_ref(), &key.namespace);
        match target.and_then(|t| Ok((t, policy.convert(key)?))) {
            Ok((target, config)) => valid.push((age_key(policy, key), target, config, generation)),
            Err(message) => {
                statuses.insert(status_ref, DesiredStatus::invalid(generation, message));
            }
        }
    }
    valid.sort_by(|a, b| a.0.cmp(&b.0));
    let mut attached: BTreeMap<Target, (ObjectKey, C)> = BTreeMap::new();
    for ((_, key), target, config, generation) in valid {
        let resolved_refs = match &target {
            Target::Service(svc) if snapshot.services.contains_key(svc) => {
                Cond::ok("ResolvedRefs", format!("targets Service {svc}"))
            }
            Target::Service(svc) => Cond::fail("ServiceNotFound", format!("target Service {svc} not found")),
            Target::Route(r) if routes.iter().any(|a| &a.key == r) => {
                Cond::ok("ResolvedRefs", format!("targets TrafficRoute {r}"))
            }
            Target::Route(r) => {
                Cond::fail("RouteNotFound", format!("target TrafficRoute {r} not found or not accepted"))
            }
        };
        let carrier = match &target {
            Target::Service(svc) => Some(svc.clone()),
            Target::Route(r) => routes.iter().find(|a| &a.key == r).map(|a| a.service.clone()),
        };
        let accepted = match attached.get(&target) {
            Some((winner, _)) => Cond::fail(
                "Conflicted",
                format!(
                    "{} {winner} is older and already attached to the same target; this policy is not in force",
                    kind.as_str()
                ),
            ),
            None => {
                attached.insert(target, (key.clone(), config));
                Cond::ok("Accepted", "policy is valid and attached")
            }
        };
        let mut desired = DesiredStatus::new(generation, accepted, resolved_refs);
        desired.carried_by = carrier;
        statuses.insert(ResourceRef { kind, key }, desired);
    }
    attached.into_iter().map(|(t, (_, c))| (t, c)).collect()
}

pub(super) fn target_of(target: &PolicyTargetRef, namespace: &str) -> Result<Target, String> {
    let group = target.group.as_deref().unwrap_or_default();
    let key = ObjectKey::new(namespace, target.name.clone());
    match target.kind {
        TargetKind::Service if group.is_empty() || group == "core" => Ok(Target::Service(key)),
        TargetKind::TrafficRoute if group.is_empty() || group == skein_api::constants::GROUP => {
            Ok(Target::Route(key))
        }
        kind => Err(format!("spec.targetRef.group {group:?} does not serve kind {kind:?}")),
    }
}
