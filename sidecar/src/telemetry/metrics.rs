//! Request metrics without a lock on the request path: each (direction, destination, subset,
//! route) series is created when a config is compiled and handed to requests as an `Arc`;
//! requests only touch atomics. The registry's lock is taken when compiling and scraping.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latency bucket bounds in seconds: 100 µs to 10 s.
pub const BUCKETS: [f64; 16] = skein_api::config::LATENCY_BUCKETS_SECONDS;

/// Distinct status codes counted per series; rarer ones land in `other`.
const STATUS_SLOTS: usize = 8;

/// Labels of a request series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub direction: &'static str,
    pub destination: String,
    pub subset: String,
    pub route: String,
}

/// Counters and a latency histogram for one series.
#[derive(Debug, Default)]
pub struct Series {
    codes: [(AtomicU16, AtomicU64); STATUS_SLOTS],
    other: AtomicU64,
    /// One count per bound of [`BUCKETS`], then the overflow.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    pub retries: AtomicU64,
    pub retries_skipped: AtomicU64,
    pub ejections: AtomicU64,
    pub fail_open: AtomicU64,
    /// Requests answered 5xx (whatever their status slot).
    errors: AtomicU64,
    /// Requests answered over mTLS by the destination's sidecar.
    pub mtls: AtomicU64,
    /// Requests answered in plaintext by the destination (or its sidecar).
    pub plaintext: AtomicU64,
    /// Requests the destination's sidecar denied (403 `authz-denied`).
    pub denied: AtomicU64,
}

impl Series {
    /// Records one finished request.
    pub fn record(&self, status: u16, elapsed: Duration) {
        let mut counted = false;
        for (code, count) in &self.codes {
            let current = code.load(Ordering::Relaxed);
            if current == status
                || (current == 0
                    && code
                        .compare_exchange(0, status, Ordering::Relaxed, Ordering::Relaxed)
                        .map_or_else(|c| c == status, |_| true))
            {
                count.fetch_add(1, Ordering::Relaxed);
                counted = true;
                break;
            }
        }
        if !counted {
            self.other.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Requests recorded so far (the sum of the latency buckets).
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Requests answered with `status` so far.
    pub fn status_count(&self, status: u16) -> u64 {
        self.codes
            .iter()
            .filter(|(c, _)| c.load(Ordering::Relaxed) == status)
            .map(|(_, n)| n.load(Ordering::Relaxed))
            .sum()
    }
}

/// `skein_authz_decisions_total`: per deciding policy, four counts (deny/allow × enforce/dry-run).
#[derive(Debug, Default)]
pub struct AuthzCounters {
    counts: Mutex<HashMap<String, [u64; 4]>>,
}

impl AuthzCounters {
    fn slot(allowed: bool, dry_run: bool) -> usize {
        usize::from(allowed) * 2 + usize::from(dry_run)
    }

    pub fn count(&self, allowed: bool, by: &str, dry_run: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        // No allocation once the policy has a series.
        match counts.get_mut(by) {
            Some(n) => n[Self::slot(allowed, dry_run)] += 1,
            None => {
                let mut n = [0; 4];
                n[Self::slot(allowed, dry_run)] = 1;
                counts.insert(by.to_string(), n);
            }
        }
    }

    /// How many decisions were made with these labels.
    pub fn get(&self, allowed: bool, by: &str, dry_run: bool) -> u64 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(by).map_or(0, |n| n[Self::slot(allowed, dry_run)])
    }

    /// Prometheus text of every series.
    pub fn render(&self, out: &mut String) {
        let mut counts: Vec<(String, [u64; 4])> = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        counts.sort();
        let _ = writeln!(
            out,
            "# HELP skein_authz_decisions_total Inbound authorization decisions (AccessPolicy), by decision, deciding policy and mode.\n# TYPE skein_authz_decisions_total counter"
        );
        for (by, n) in counts {
            let by = by.replace('\\', "\\\\").replace('"', "\\\"");
            for (allowed, dry_run) in [(true, false), (false, false), (true, true), (false, true)] {
                let count = n[Self::slot(allowed, dry_run)];
                if count == 0 {
                    continue;
                }
                let decision = if allowed { "allow" } else { "deny" };
                let mode = if dry_run { "dry-run" } else { "enforce" };
                let _ = writeln!(
                    out,
                    "skein_authz_decisions_total{{decision=\"{decision}\",policy=\"{by}\",mode=\"{mode}\"}} {count}"
                );
            }
        }
    }
}

/// Every series, for compiling and scraping.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<BTreeMap<SeriesKey, Arc<Series>>>,
    /// Inbound authorization decisions.
    pub authz: AuthzCounters,
}

impl Registry {
    /// The series for `key`, created on first use and kept across config swaps.
    pub fn series(&self, key: SeriesKey) -> Arc<Series> {
        self.series.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone()
    }

    /// The cumulative counters of every outbound series with traffic, summed per destination
    /// and subset (routes apart), for the traffic report on the config stream.
    pub fn traffic_report(&self) -> skein_api::TrafficReport {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut edges: BTreeMap<(String, String), skein_api::EdgeCounters> = BTreeMap::new();
        for (k, s) in series.iter().filter(|(k, s)| k.direction == "outbound" && s.count() > 0) {
            let e = edges.entry((k.destination.clone(), k.subset.clone())).or_insert_with(|| {
                skein_api::EdgeCounters {
                    destination: k.destination.clone(),
                    subset: k.subset.clone(),
                    latency_buckets: vec![0; BUCKETS.len() + 1],
                    ..Default::default()
                }
            });
            let mut requests = 0;
            for (total, n) in e.latency_buckets.iter_mut().zip(&s.buckets) {
                let n = n.load(Ordering::Relaxed);
                *total += n;
                requests += n;
            }
            e.requests += requests;
            e.errors += s.errors.load(Ordering::Relaxed);
            e.mtls += s.mtls.load(Ordering::Relaxed);
            e.plaintext += s.plaintext.load(Ordering::Relaxed);
            e.retries += s.retries.load(Ordering::Relaxed);
            e.ejections += s.ejections.load(Ordering::Relaxed);
            e.denied += s.denied.load(Ordering::Relaxed);
        }
        skein_api::TrafficReport { edges: edges.into_values().collect() }
    }

    /// Prometheus text exposition of every request series.
    pub fn render(&self, out: &mut String) {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let labels = |k: &SeriesKey| {
            format!(
                "direction=\"{}\",destination=\"{}\",subset=\"{}\",route=\"{}\"",
                k.direction,
                escape(&k.destination),
                escape(&k.subset),
                escape(&k.route)
            )
        };
        let _ = writeln!(
            out,
            "# HELP skein_requests_total Requests by direction, destination, subset, route and status code."
        );
        let _ = writeln!(out, "# TYPE skein_requests_total counter");
        for (k, s) in &series {
            let l = labels(k);
            for (code, n) in &s.codes {
                let code = code.load(Ordering::Relaxed);
                if code != 0 {
                    let _ = writeln!(
                        out,
                        "skein_requests_total{{{l},status=\"{code}\"}} {}",
                        n.load(Ordering::Relaxed)
                    );
                }
            }
            let other = s.other.load(Ordering::Relaxed);
            if other > 0 {
                let _ = writeln!(out, "skein_requests_total{{{l},status=\"other\"}} {other}");
            }
        }
        let _ = writeln!(out, "# HELP skein_request_duration_seconds Request latency as seen by the proxy.");
        let _ = writeln!(out, "# TYPE skein_request_duration_seconds histogram");
        for (k, s) in &series {
            let l = labels(k);
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(&s.buckets) {
                cumulative += n.load(Ordering::Relaxed);
                let _ =
                    writeln!(out, "skein_request_duration_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}");
            }
            let count = cumulative + s.buckets[BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(out, "skein_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {count}");
            let sum = s.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "skein_request_duration_seconds_sum{{{l}}} {sum}");
            let _ = writeln!(out, "skein_request_duration_seconds_count{{{l}}} {count}");
        }
        for (name, help, get) in [
            ("skein_retries_total", "Retries sent.", (|s: &Series| &s.retries) as fn(&Series) -> &AtomicU64),
            ("skein_retries_skipped_total", "Retries not sent because the retry budget was spent.", |s| {
                &s.retries_skipped
            }),
            ("skein_outlier_ejections_total", "Endpoints ejected by outlier detection.", |s| &s.ejections),
            ("skein_mtls_requests_total", "Requests answered over mTLS by the destination's sidecar.", |s| {
                &s.mtls
            }),
            ("skein_plaintext_requests_total", "Requests answered in plaintext by the destination.", |s| {
                &s.plaintext
            }),
            (
                "skein_outlier_fail_open_total",
                "Requests sent to an ejected endpoint because all were ejected.",
                |s| &s.fail_open,
            ),
            (
                "skein_denied_requests_total",
                "Requests the destination's sidecar denied (AccessPolicy or its namespace default).",
                |s| &s.denied,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, s) in series.iter().filter(|(k, _)| k.direction == "outbound") {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(k), get(s).load(Ordering::Relaxed));
            }
        }
        self.authz.render(out);
    }
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_one_series_per_label_set() {
        let c = AuthzCounters::default();
        c.count(false, "shop/callers", false);
        c.count(false, "shop/callers", false);
        c.count(true, "default (allow)", true);
        assert_eq!(c.get(false, "shop/callers", false), 2);
        let mut out = String::new();
        c.render(&mut out);
        assert!(
            out.contains(
                "skein_authz_decisions_total{decision=\"deny\",policy=\"shop/callers\",mode=\"enforce\"} 2"
            ),
            "{out}"
        );
        assert!(out.contains("skein_authz_decisions_total{decision=\"allow\",policy=\"default (allow)\",mode=\"dry-run\"} 1"), "{out}");
    }

    #[test]
    fn series_count_codes_and_latency() {
        let r = Registry::default();
        let key = SeriesKey {
            direction: "outbound",
            destination: "reviews.shop".into(),
            subset: "v2".into(),
            route: "shop/reviews".into(),
        };
        let s = r.series(key.clone());
        s.record(200, Duration::from_micros(80));
        s.record(200, Duration::from_millis(3));
        s.record(503, Duration::from_millis(30));
        for code in 400..410 {
            s.record(code, Duration::from_millis(1));
        }
        assert!(Arc::ptr_eq(&s, &r.series(key)), "one series per key");
        assert_eq!(s.status_count(200), 2);
        let mut text = String::new();
        r.render(&mut text);
        let l = "direction=\"outbound\",destination=\"reviews.shop\",subset=\"v2\",route=\"shop/reviews\"";
        assert!(text.contains(&format!("skein_requests_total{{{l},status=\"200\"}} 2")), "{text}");
        assert!(text.contains(&format!("skein_requests_total{{{l},status=\"503\"}} 1")));
        assert!(
            text.contains(&format!("skein_requests_total{{{l},status=\"other\"}} 4")),
            "8 slots: 200, 503 and six 4xx"
        );
        assert!(text.contains(&format!("skein_request_duration_seconds_bucket{{{l},le=\"0.0001\"}} 1")));
        assert!(text.contains(&format!("skein_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 13")));
        assert!(text.contains(&format!("skein_request_duration_seconds_count{{{l}}} 13")));
    }

    #[test]
    fn the_traffic_report_sums_routes_per_destination_and_subset() {
        let r = Registry::default();
        let key = |subset: &str, route: &str| SeriesKey {
            direction: "outbound",
            destination: "reviews.shop".into(),
            subset: subset.into(),
            route: route.into(),
        };
        let a = r.series(key("v1", "shop/a"));
        a.record(200, Duration::from_micros(50));
        a.record(503, Duration::from_secs(20));
        a.mtls.fetch_add(2, Ordering::Relaxed);
        for code in 400..410 {
            a.record(code, Duration::from_millis(1));
        }
        a.record(599, Duration::from_millis(1));
        a.retries.fetch_add(1, Ordering::Relaxed);
        r.series(key("v1", "shop/b")).record(200, Duration::from_millis(3));
        r.series(key("v2", "shop/a"));
        r.series(SeriesKey { direction: "inbound", ..key("v1", "") }).record(200, Duration::from_millis(1));
        let report = r.traffic_report();
        assert_eq!(report.edges.len(), 1, "no traffic to v2 yet, inbound apart: {report:?}");
        let e = &report.edges[0];
        assert_eq!((e.destination.as_str(), e.subset.as_str()), ("reviews.shop", "v1"));
        assert_eq!((e.requests, e.errors, e.mtls, e.retries), (14, 2, 2, 1), "a rare 5xx still counts");
        assert_eq!(e.latency_buckets.len(), BUCKETS.len() + 1);
        assert_eq!(e.latency_buckets[0], 1, "50 µs");
        assert_eq!(e.latency_buckets[5], 1, "3 ms");
        assert_eq!(e.latency_buckets[3], 11, "1 ms");
        assert_eq!(e.latency_buckets[BUCKETS.len()], 1, "20 s overflows");
    }
}
