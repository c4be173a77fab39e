//! What `authz-bench` measures, through the request path's own functions: one inbound
//! authorization decision (evaluation, counting, the access-log text), from a caller whose
//! certificate was read once per connection, as the inbound listener does.

use crate::config::store::ConfigStore;
use crate::proxy::authz::{self, Caller};

/// A workload's inbound authorization as the sidecar runs it.
pub struct Authorizer<'a> {
    store: &'a ConfigStore,
    caller: Option<Caller>,
}

impl<'a> Authorizer<'a> {
    /// The config in force in `store`, called by `spiffe_id` (`None`: plaintext).
    pub fn new(store: &'a ConfigStore, spiffe_id: Option<&str>) -> Self {
        Self { store, caller: spiffe_id.and_then(Caller::from_spiffe_id) }
    }

    /// Decides and counts one request, as the inbound path does; true when allowed.
    pub fn request(&self, port: u16, method: &str, path: &str) -> bool {
        let active = self.store.current();
        let verdict = authz::check(
            active.as_deref(),
            &self.store.shared.metrics.authz,
            self.caller.as_ref(),
            port,
            Some((method, path)),
        );
        verdict.is_ok_and(|v| v.allowed)
    }
}
