//! Request metrics without a lock on the request path: each (direction, destination, subset,
//! route) series is created when a config is compiled and handed to requests as an `Arc`;
//! requests only touch atomics. The registry's lock is taken when compiling and scraping.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latency bucket bounds in seconds: 100 µs to 10 s.
pub const BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

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
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    pub retries: AtomicU64,
    pub retries_skipped: AtomicU64,
    pub ejections: AtomicU64,
    pub fail_open: AtomicU64,
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
        if i < BUCKETS.len() {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
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

/// Every series, for compiling and scraping.
#[derive(Debug, Default)]
pub struct Registry {
    series: Mutex<BTreeMap<SeriesKey, Arc<Series>>>,
}

impl Registry {
    /// The series for `key`, created on first use and kept across config swaps.
    pub fn series(&self, key: SeriesKey) -> Arc<Series> {
        self.series.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone()
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
            let count = s.count.load(Ordering::Relaxed);
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
            (
                "skein_outlier_fail_open_total",
                "Requests sent to an ejected endpoint because all were ejected.",
                |s| &s.fail_open,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, s) in series.iter().filter(|(k, _)| k.direction == "outbound") {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(k), get(s).load(Ordering::Relaxed));
            }
        }
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
}
