//! `--config FILE`: the sidecar without an operator. The file holds a `ProxyConfig` as JSON; it
//! is read twice a second and reloaded when its content changed (a Kubernetes ConfigMap mount
//! swaps a symlink, an editor renames a temp file: reading the path catches both). A file that does not parse or
//! validate is refused with a log line and a metric, and the last good config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skein_api::ProxyConfig;
use tokio_util::sync::CancellationToken;

use crate::config::store::{ConfigStore, Source};

const POLL: Duration = Duration::from_millis(500);

/// Reads and applies the file once; returns the fingerprint of what it read, even when the
/// content was refused (so the same bad content is not retried every poll).
pub fn load(path: &Path, store: &ConfigStore) -> Result<u64, (u64, String)> {
    let bytes = std::fs::read(path).map_err(|e| (0, format!("reading {}: {e}", path.display())))?;
    let print = fingerprint(&bytes);
    let config: ProxyConfig = serde_json::from_slice(&bytes).map_err(|e| {
        let e = format!("{}: {e}", path.display());
        store.refuse("", &e);
        (print, e)
    })?;
    store.apply(config, Source::File).map_err(|e| (print, format!("{}: {e}", path.display())))?;
    Ok(print)
}

/// A fingerprint of the file's bytes: modification times are too coarse to see two quick
/// writes of the same length, so the content itself is compared.
fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Reloads the file whenever its content differs from `loaded` (the fingerprint [`load`]
/// returned), until `shutdown`. Reading and parsing run on the blocking pool, never on the
/// runtime's threads that serve requests (a slow or huge file, a hung network mount).
pub async fn watch(path: PathBuf, store: Arc<ConfigStore>, mut loaded: u64, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let (path, store) = (path.clone(), store.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).ok()?;
            if fingerprint(&bytes) == loaded {
                return None;
            }
            Some(load(&path, &store))
        });
        loaded = match checked.await {
            Ok(Some(Ok(print))) => print,
            Ok(Some(Err((print, e)))) => {
                tracing::warn!(error = %e, "refusing the changed config file; the last good config stays");
                print
            }
            Ok(None) | Err(_) => loaded,
        };
    }
}
