//! `--config FILE`: the sidecar without an operator. The file holds a `ProxyConfig` as JSON; it
//! is checked twice a second and a changed file is reloaded. A file that does not parse or
//! validate is refused with a log line and a metric, and the last good config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use skein_api::ProxyConfig;
use tokio_util::sync::CancellationToken;

use crate::config_store::{ConfigStore, Source};

const POLL: Duration = Duration::from_millis(500);

/// Reads and applies the file once.
pub fn load(path: &Path, store: &ConfigStore) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let config: ProxyConfig =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    store.apply(config, Source::File).map_err(|e| format!("{}: {e}", path.display()))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads the file whenever it changes, until `shutdown`.
pub async fn watch(path: PathBuf, store: Arc<ConfigStore>, shutdown: CancellationToken) {
    let mut last = stamp(&path);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let now = stamp(&path);
        if now.is_none() || now == last {
            continue;
        }
        last = now;
        if let Err(e) = load(&path, &store) {
            tracing::warn!(error = %e, "refusing the changed config file; the last good config stays");
        }
    }
}
