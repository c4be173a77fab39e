//! Entry points for the fuzz targets (`fuzz/`, `make fuzz`) and their regression tests
//! (`tests/fuzz_regressions.rs`): arbitrary bytes in, never a panic, and what has to hold
//! whatever the input. Not part of the operator's API.

use std::collections::BTreeMap;

use serde_json::Value;
use skein_api::constants::INJECT_LABEL;

use crate::admission::inject::{inject_sidecar, CaptureMode, Decision, InjectConfig};

/// AdmissionReview decoding and patch building: a patch the webhook answers with applies to
/// the pod it was built for, and the patched pod is not injected again.
pub fn admission_review(data: &[u8]) {
    let Ok(review) = serde_json::from_slice::<Value>(data) else { return };
    let request = &review["request"];
    let pod = &request["object"];
    let namespace = request["namespace"].as_str().unwrap_or("shop");
    let labels: BTreeMap<String, String> = [(INJECT_LABEL.to_string(), "enabled".to_string())].into();
    for (native, capture) in [(true, CaptureMode::Transparent), (false, CaptureMode::Explicit)] {
        let mut cfg = InjectConfig::new(
            "skein-proxy:fuzz",
            "https://skein-operator.skein-system.svc:15012",
            "skein-system",
            native,
        );
        cfg.capture = capture;
        if let Decision::Inject { patch, .. } = inject_sidecar(pod, namespace, &labels, &cfg) {
            let mut patched = pod.clone();
            if let Err(e) = json_patch::patch(&mut patched, &patch) {
                panic!("the patch does not apply to its own pod: {e}");
            }
            let again = inject_sidecar(&patched, namespace, &labels, &cfg);
            assert!(matches!(again, Decision::Skip(_)), "a patched pod is injected again: {again:?}");
        }
    }
}

/// The local manifest loader: any text is loaded or refused with reasons, never a panic.
pub fn local_manifests(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = crate::local::load_texts(&[("fuzz.yaml".to_string(), text)], Vec::new());
}

/// Duration parsing agrees with the CRD schema's pattern: what the API server accepts parses
/// (unless absurdly long), and what it refuses does not.
pub fn duration(data: &[u8]) {
    use skein_api::duration::{parse_duration, parse_millis, DURATION_PATTERN};
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| regex::Regex::new(DURATION_PATTERN).expect("a valid pattern"));
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = parse_duration(text);
    let schema_ok = pattern.is_match(text);
    match (&parsed, schema_ok) {
        (Ok(_), false) => panic!("{text:?} parses but the schema refuses it"),
        (Err(_), true) => {
            // Only a duration past the parser's bound (10^9 s) may be refused despite the
            // pattern: add the terms up another way to see.
            static TERM: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
            let term = TERM.get_or_init(|| {
                regex::Regex::new(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)").expect("a valid pattern")
            });
            let seconds: f64 = term
                .captures_iter(text)
                .map(|c| {
                    let unit = match &c[2] {
                        "ns" => 1e-9,
                        "us" | "µs" => 1e-6,
                        "ms" => 1e-3,
                        "s" => 1.0,
                        "m" => 60.0,
                        _ => 3600.0,
                    };
                    c[1].parse::<f64>().unwrap_or(f64::INFINITY) * unit
                })
                .sum();
            assert!(
                seconds.is_nan() || seconds > 1e9,
                "{text:?} ({seconds} s) fits the schema but does not parse"
            );
        }
        _ => {}
    }
    if let Ok(d) = parsed {
        let ms = parse_millis(text).expect("parses as a duration");
        assert!(
            u128::from(ms) >= d.as_millis() && u128::from(ms) <= d.as_millis() + 1,
            "{text:?}: {ms} ms for {d:?}"
        );
    }
}

/// The config stream's HTTP/2 server (port 15012, reachable by every pod): frames and header
/// blocks from a client, cut into reads anywhere.
pub fn http2_frames(data: &[u8]) {
    crate::stream::http2::fuzz_frames(data);
}
