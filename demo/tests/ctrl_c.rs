//! `skein-demo` as a user runs it: it comes up, prints its summary, and on Ctrl-C (SIGINT to the
//! demo alone, so it must stop its children itself) stops everything: afterwards nothing
//! listens on the mesh's addresses.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

mod support;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_every_process_of_the_demo() {
    let (manifests, work) = support::dirs("ctrl-c");
    let policies = manifests.parent().unwrap().join("policies");
    support::copy_dir(&support::examples().join("access-policy"), &policies);
    let p = support::ip_prefix();
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_skein-demo"))
        .arg("--manifests")
        .arg(&manifests)
        .arg("--policies")
        .arg(&policies)
        .arg("--work")
        .arg(&work)
        .arg("--ip-prefix")
        .arg(format!("{}.{}.{}", p[0], p[1], p[2]))
        .arg("--bin-dir")
        .arg(support::bin_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("skein-demo starts");
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let summary = tokio::time::timeout(Duration::from_secs(60), async {
        // `ready`, then the first summary line (every 5 s when not on a terminal).
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line.clone());
            if line.starts_with("everyone") {
                return Some(line);
            }
        }
        None
    })
    .await;
    let summary = summary.ok().flatten().unwrap_or_else(|| panic!("no summary; output: {seen:#?}"));
    assert!(seen.iter().any(|l| l.starts_with("ready: 9 processes up")), "{seen:#?}");
    assert!(summary.contains("mTLS") && summary.contains("config acknowledged by 5/5 proxies"), "{summary}");
    // The intruder's row: every request denied.
    assert!(summary.contains("intruder") && summary.contains("100.0%"), "{summary}");

    let pid = nix::unistd::Pid::from_raw(demo.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), demo.wait()).await.expect("exits").unwrap();
    let mut rest = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push(line);
    }
    assert!(status.success(), "{status:?} {rest:#?}");
    assert!(rest.iter().any(|l| l == "stopped 9 processes; nothing left running"), "{rest:#?}");

    // Every address of the mesh is free again.
    let ip = |last| Ipv4Addr::new(p[0], p[1], p[2], last);
    for addr in [
        (ip(1), 8080),
        (ip(1), 15012),
        (ip(2), 15001),
        (ip(3), 15001),
        (ip(11), 9080),
        (ip(11), 15006),
        (ip(13), 15000),
    ] {
        let addr = SocketAddr::from(addr);
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr} still in use after Ctrl-C: {e}"));
    }
}
