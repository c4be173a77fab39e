#![allow(dead_code)] // each test binary uses its own part
//! What the demo's tests share: a mesh of the real binaries on loopback addresses of its own,
//! reading copies of `examples/canary/` and `examples/access-policy/` that the test may edit.

use std::path::PathBuf;

use skein_demo::{Mesh, Options};

/// `target/debug` (or the profile the tests were built in): the binaries beside the test's.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").to_path_buf()
}

/// A fresh directory holding a copy of the canary manifests, and a work directory.
pub fn dirs(test: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!(
        "skein-demo-{test}-{}-{:06x}",
        std::process::id(),
        fastrand::u32(..1 << 24)
    ));
    let manifests = root.join("manifests");
    copy_dir(&examples().join("canary"), &manifests);
    (manifests, root.join("work"))
}

/// The project's `examples/`.
pub fn examples() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../examples")
}

/// Copies the files of `from` into a new directory `to`.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Loopback addresses no other test (nor a running demo, on 127.0.10.*) uses.
pub fn ip_prefix() -> [u8; 3] {
    [127, fastrand::u8(100..250), fastrand::u8(1..250)]
}

pub async fn start(test: &str) -> (Mesh, PathBuf) {
    let (manifests, work) = dirs(test);
    let policies = manifests.parent().unwrap().join("policies");
    copy_dir(&examples().join("access-policy"), &policies);
    let options = Options {
        bin_dir: bin_dir(),
        manifests: manifests.clone(),
        policies: Some(policies),
        work,
        ip_prefix: ip_prefix(),
    };
    match Mesh::start(options).await {
        Ok(mesh) => (mesh, manifests),
        Err(e) => panic!("the mesh did not start: {e}"),
    }
}

/// Sum of a counter over all its series in a sidecar's Prometheus text.
pub fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
