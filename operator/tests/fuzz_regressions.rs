//! Replays every fuzz seed and every finding kept as a regression case
//! (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through the fuzz targets' logic, in
//! an ordinary test run: none may panic. `make fuzz` explores further from the same seeds.
#![allow(clippy::unwrap_used)] // a test that unwraps an error fails, which is the point

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../fuzz");
    let mut count = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!("{target}: {} makes the target panic", path.display());
            }
            count += 1;
        }
    }
    assert!(count > 0, "{target}: no seeds in fuzz/corpus/{target}");
}

#[test]
fn http1_request_head() {
    replay("http1_request_head", skein_proxy::fuzzing::http1_request_head);
}

#[test]
fn http1_chunked() {
    replay("http1_chunked", skein_proxy::fuzzing::http1_chunked);
}

#[test]
fn proxy_config() {
    replay("proxy_config", skein_proxy::fuzzing::proxy_config);
}

#[test]
fn route_match() {
    replay("route_match", skein_proxy::fuzzing::route_match);
}

#[test]
fn admission_review() {
    replay("admission_review", skein_operator::fuzzing::admission_review);
}

#[test]
fn duration() {
    replay("duration", skein_operator::fuzzing::duration);
}

#[test]
fn local_manifests() {
    replay("local_manifests", skein_operator::fuzzing::local_manifests);
}

#[test]
fn authz_path() {
    replay("authz_path", skein_proxy::fuzzing::authz_path);
}

#[test]
fn http2_frames() {
    replay("http2_frames", skein_operator::fuzzing::http2_frames);
}

#[test]
fn mux_frames() {
    replay("mux_frames", skein_proxy::fuzzing::mux_frames);
}
