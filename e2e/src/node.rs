//! Real pods for the install test: images loaded into the cluster's node, and commands run in a
//! pod's container and its logs read with the real `kubectl exec` and `kubectl logs`.
//!
//! On the test API server (`SKEIN_TESTBED` names the `k8s-testbed` folder) the testbed's node
//! runs the pods: `node/up` starts it (and the test stops it again if it started it), and
//! `node/load` loads image archives. On any other cluster (kind, say) `SKEIN_IMAGE_LOAD` is the
//! command that loads an archive (`kind load image-archive`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// How this cluster runs the test's pods.
pub enum Node {
    /// The test API server's node; `started` when this test started it (and stops it).
    Testbed { dir: PathBuf, started: bool },
    /// Any other cluster: images are loaded with this command (the archive appended).
    Cluster { load: Vec<String> },
}

impl Node {
    /// The node of this cluster, or why none can be used (the test then skips).
    pub fn find() -> Result<Self, String> {
        if let Some(dir) = std::env::var_os("SKEIN_TESTBED") {
            let dir = PathBuf::from(dir);
            let up = dir.join("node/up");
            if !up.exists() {
                return Err(format!("SKEIN_TESTBED={} has no node/up", dir.display()));
            }
            let ready = std::env::var_os("TESTBED_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".testbed"))
                .join("node/ready");
            let started = !ready.exists();
            let out = Command::new(&up).stdin(Stdio::null()).output().map_err(|e| format!("node/up: {e}"))?;
            if !out.status.success() {
                return Err(format!("node/up failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            return Ok(Self::Testbed { dir, started });
        }
        match std::env::var("SKEIN_IMAGE_LOAD") {
            Ok(cmd) if !cmd.trim().is_empty() => {
                Ok(Self::Cluster { load: cmd.split_whitespace().map(str::to_string).collect() })
            }
            _ => {
                Err("neither SKEIN_TESTBED (the test API server's k8s-testbed folder) nor SKEIN_IMAGE_LOAD \
                      (such as `kind load image-archive`) says how to run pods"
                    .into())
            }
        }
    }

    /// Makes the image in `archive` runnable on the node.
    pub fn load(&self, archive: &Path) {
        let out = match self {
            Self::Testbed { dir, .. } => Command::new(dir.join("node/load")).arg(archive).output(),
            Self::Cluster { load } => Command::new(&load[0]).args(&load[1..]).arg(archive).output(),
        }
        .expect("the image loader runs");
        assert!(
            out.status.success(),
            "loading {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `command` in container `container` of pod `namespace/pod` (`kubectl exec`).
    pub fn exec(&self, namespace: &str, pod: &str, container: &str, command: &[&str]) -> Output {
        Command::new("kubectl")
            .args(["-n", namespace, "exec", pod, "-c", container, "--"])
            .args(command)
            .stdin(Stdio::null())
            .output()
            .expect("kubectl runs")
    }

    /// The log of container `container` of pod `namespace/pod`, its current run (`kubectl logs`).
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        let out = Command::new("kubectl")
            .args(["-n", namespace, "logs", pod, "-c", container])
            .output()
            .expect("kubectl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether test-only images (a busybox) are built here from the host's busybox, or come
    /// from `SKEIN_E2E_BUSYBOX_IMAGE` elsewhere.
    pub fn is_testbed(&self) -> bool {
        matches!(self, Self::Testbed { .. })
    }

    /// The testbed's image builder (`node/mkimage`), for the test-only busybox image.
    pub fn mkimage(&self) -> Option<PathBuf> {
        match self {
            Self::Testbed { dir, .. } => Some(dir.join("node/mkimage")),
            Self::Cluster { .. } => None,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Self::Testbed { dir, started: true } = self {
            let _ = Command::new(dir.join("node/down")).stdin(Stdio::null()).output();
        }
    }
}
