//! The app's own kubelet probes, as the sidecar runs them for the kubelet.
//!
//! Under strict inbound mTLS a probe the kubelet sends to the app's port would be refused: it
//! comes from the node, without a mesh identity. So the webhook rewrites each HTTP or TCP probe
//! of an app container to an `httpGet` on the sidecar's read-only port (15020), path
//! `/app-health/<container>/<kind>`, and hands the original to the sidecar in the environment
//! variable [`APP_PROBES_ENV`]; the sidecar sends it to the app on loopback and answers with its
//! outcome (Istio's approach; `docs/decisions.md`, "Kubelet probes under strict mTLS").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The sidecar's environment variable carrying the rewritten probes (JSON, [`AppProbes`]).
pub const APP_PROBES_ENV: &str = "SKEIN_APP_PROBES";
/// Path prefix of rewritten probes on the sidecar's read-only port.
pub const APP_HEALTH_PREFIX: &str = "/app-health/";

/// Rewritten probes by path (`/app-health/<container>/<kind>`).
pub type AppProbes = BTreeMap<String, AppProbe>;

/// One probe of an app container, with its port resolved to a number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppProbe {
    /// What to send.
    pub action: ProbeAction,
    /// Seconds the app has to answer (the probe's `timeoutSeconds`, 1 by default).
    #[serde(default = "one")]
    pub timeout_seconds: u32,
}

fn one() -> u32 {
    1
}

/// A probe's request to the app, on loopback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProbeAction {
    /// `GET path` over HTTP/1.1; 200–399 is success, as the kubelet counts it.
    HttpGet {
        port: u16,
        path: String,
        /// The probe's `httpHeaders` (a `Host` among them replaces the default).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
    },
    /// A TCP connection that opens is success.
    TcpSocket { port: u16 },
}

impl ProbeAction {
    /// Why this probe cannot be sent as an HTTP/1.1 request, if it cannot: a path that is not
    /// absolute or holds anything but visible ASCII, or a header that would break the head.
    /// The webhook leaves such a probe as it is; the sidecar refuses a list holding one.
    pub fn unsendable(&self) -> Option<String> {
        let Self::HttpGet { path, headers, .. } = self else { return None };
        if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Some(format!("the path {path:?} is not an absolute path of visible characters"));
        }
        let breaks = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
        headers
            .iter()
            .find(|(name, value)| {
                name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') || breaks(value)
            })
            .map(|(name, _)| format!("header {name:?} cannot be sent"))
    }
}

/// The path of a rewritten probe.
pub fn app_health_path(container: &str, kind: &str) -> String {
    format!("{APP_HEALTH_PREFIX}{container}/{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_round_trip_as_json() {
        let probes: AppProbes = [
            (
                app_health_path("app", "readiness"),
                AppProbe {
                    action: ProbeAction::HttpGet {
                        port: 8080,
                        path: "/healthz".into(),
                        headers: vec![("x-probe".into(), "1".into())],
                    },
                    timeout_seconds: 2,
                },
            ),
            (
                app_health_path("app", "liveness"),
                AppProbe { action: ProbeAction::TcpSocket { port: 8080 }, timeout_seconds: 1 },
            ),
        ]
        .into();
        let text = serde_json::to_string(&probes).unwrap();
        assert_eq!(serde_json::from_str::<AppProbes>(&text).unwrap(), probes);
        let minimal: AppProbes =
            serde_json::from_str(r#"{"/app-health/a/readiness":{"action":{"tcpSocket":{"port":1}}}}"#)
                .unwrap();
        assert_eq!(minimal["/app-health/a/readiness"].timeout_seconds, 1);
    }
}
