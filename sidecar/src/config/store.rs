//! The config in force. One owner swaps it: a new `ProxyConfig` is validated and compiled into
//! a [`RouteTable`] first, then published as a new `Arc` (requests read it lock-free through
//! `arc-swap` and keep the table they started with), then written to disk so that a restarted
//! proxy starts from it when the operator is unreachable. A config that fails validation or
//! compilation is refused; the last good one stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use skein_api::ProxyConfig;
use tokio::sync::watch;

use crate::route::table::{RouteTable, Shared};

/// File name of the persisted config inside the state directory.
pub const LAST_GOOD_FILE: &str = "last-good-config.json";

/// Where the config in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Received from the operator's stream.
    ControlPlane,
    /// Loaded from the state directory at start-up.
    Disk,
    /// Read from the `--config` file.
    File,
}

/// A config in force, compiled, with its origin.
#[derive(Debug)]
pub struct Active {
    pub config: ProxyConfig,
    pub table: RouteTable,
    pub source: Source,
}

/// Owner of the config in force.
pub struct ConfigStore {
    current: ArcSwapOption<Active>,
    /// Bumped on every swap, for whoever wants to follow them.
    swaps: watch::Sender<u64>,
    state_dir: Option<PathBuf>,
    pub shared: Arc<Shared>,
    pub applied: AtomicU64,
    pub refused: AtomicU64,
}

impl ConfigStore {
    pub fn new(state_dir: Option<PathBuf>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            swaps: watch::Sender::new(0),
            state_dir,
            shared: Arc::default(),
            applied: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The config in force, if any (lock-free).
    pub fn current(&self) -> Option<Arc<Active>> {
        self.current.load_full()
    }

    /// Follows every swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    /// Validates, compiles and puts `config` in force; on error the previous config stays.
    pub fn apply(&self, config: ProxyConfig, source: Source) -> Result<(), String> {
        let compiled = config.validate().and_then(|()| RouteTable::compile(&config, &self.shared));
        let table = match compiled {
            Ok(table) => table,
            Err(e) => {
                self.refuse(&config.version, &e);
                return Err(e);
            }
        };
        let version = config.version.clone();
        if source == Source::ControlPlane {
            self.persist(&config);
        }
        self.current.store(Some(Arc::new(Active { config, table, source })));
        self.applied.fetch_add(1, Ordering::Relaxed);
        self.swaps.send_modify(|n| *n += 1);
        tracing::info!(%version, ?source, "config in force");
        Ok(())
    }

    /// Counts and logs a config that was refused before or during [`ConfigStore::apply`] (one
    /// that did not even decode, for instance).
    pub fn refuse(&self, version: &str, error: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%version, %error, "refusing config; the last good one stays");
    }

    /// Loads the last good config from the state directory, if there is one and it is valid.
    pub fn load_persisted(&self) -> bool {
        let Some(path) = self.state_dir.as_deref().map(|d| d.join(LAST_GOOD_FILE)) else { return false };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the last good config");
                return false;
            }
        };
        match serde_json::from_slice::<ProxyConfig>(&text) {
            Ok(config) => self.apply(config, Source::Disk).is_ok(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a corrupt last good config");
                false
            }
        }
    }

    /// Writes atomically (temp file, then rename) so a crash never leaves half a file.
    fn persist(&self, config: &ProxyConfig) {
        let Some(dir) = self.state_dir.as_deref() else { return };
        let bytes = serde_json::to_vec(config).expect("plain data serializes");
        if let Err(e) = write_atomically(dir, LAST_GOOD_FILE, &bytes) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot persist the config (it is still in force)");
        }
    }
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(version: &str) -> ProxyConfig {
        ProxyConfig { version: version.into(), ..Default::default() }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "skein-store-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn invalid_config_is_refused_and_the_last_good_one_stays() {
        let store = ConfigStore::new(None);
        store.apply(config("v1"), Source::ControlPlane).unwrap();
        assert!(store.apply(config(""), Source::ControlPlane).is_err());
        let mut bad_regex = crate::route::table::tests::canary();
        bad_regex.destinations[0].routes[0].rules[1].path =
            Some(skein_api::config::StringMatch::Regex("(".into()));
        assert!(store.apply(bad_regex, Source::File).is_err(), "a config that does not compile is refused");
        assert_eq!(store.current().unwrap().config.version, "v1");
        assert_eq!(store.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_last_good_config_survives_a_restart() {
        let dir = temp_dir("persist");
        let store = ConfigStore::new(Some(dir.clone()));
        store.apply(config("v7"), Source::ControlPlane).unwrap();

        let restarted = ConfigStore::new(Some(dir.clone()));
        assert!(restarted.load_persisted());
        let active = restarted.current().unwrap();
        assert_eq!((active.config.version.as_str(), active.source), ("v7", Source::Disk));

        std::fs::write(dir.join(LAST_GOOD_FILE), b"{not json").unwrap();
        assert!(!ConfigStore::new(Some(dir.clone())).load_persisted());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
