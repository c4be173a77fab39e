//! The operator's `/topology` page in a real headless browser (Debian's Chromium driven by
//! playwright-core, `demo/tests/browser/`): with the demo's traffic flowing, the page draws
//! client → reviews → v1 / v2 with non-zero rates over mTLS. The screenshot is kept as a test
//! artifact in `<target>/test-artifacts/topology.png`.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skein_demo::load::{self, LoadSpec};
use skein_demo::mesh::SERVICE_HOST;
use tokio_util::sync::CancellationToken;

fn browser_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("tests/browser")
}

/// Why the browser test cannot run here, if it cannot (CI installs all three).
fn missing_tools() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} is not installed (apt-get install chromium)"));
    }
    if std::process::Command::new("node").arg("--version").output().is_err() {
        return Some("node is not installed".into());
    }
    if !browser_dir().join("node_modules/playwright-core").is_dir() {
        return Some("playwright-core is not installed (npm ci --prefix demo/tests/browser)".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_page_draws_the_live_graph_in_a_browser() {
    if let Some(why) = missing_tools() {
        // CI installs the tools and sets SKEIN_REQUIRE_BROWSER: there, missing ones are a failure.
        assert!(std::env::var_os("SKEIN_REQUIRE_BROWSER").is_none(), "the browser test cannot run: {why}");
        println!("skipping the topology page test: {why}");
        return;
    }
    let (mut mesh, _) = support::start("topology").await;
    let stop = CancellationToken::new();
    let sink = Arc::default();
    let everyone =
        tokio::spawn(load::run(LoadSpec::new(mesh.client_proxy(), SERVICE_HOST, 50.0), sink, stop.clone()));
    let beta = tokio::spawn(load::run(
        LoadSpec::new(mesh.client_proxy(), SERVICE_HOST, 20.0).header("x-user-group", "beta"),
        Arc::default(),
        stop.clone(),
    ));
    let intruder = tokio::spawn(load::run(
        LoadSpec::new(mesh.intruder_proxy(), SERVICE_HOST, 5.0),
        Arc::default(),
        stop.clone(),
    ));

    let artifacts = support::bin_dir().parent().expect("target dir").join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("topology.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{}/topology", mesh.topology_addr());
    let run = tokio::process::Command::new("node")
        .arg(browser_dir().join("topology.mjs"))
        .arg(&url)
        .arg(&screenshot)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser check finished within 90 s")
        .expect("node runs");
    stop.cancel();
    let _ = (everyone.await, beta.await, intruder.await);
    mesh.stop().await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the page check failed:\n{stdout}\n{stderr}");
    let png = std::fs::read(&screenshot).expect("a screenshot was saved");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the screenshot is a real PNG");
    println!("screenshot saved to {}", screenshot.display());
}
