//! What one load run measured: counters and a latency histogram per connection, merged into a
//! `Summary` that prints as text for people or as one JSON object for `bench/run.sh`.

use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold, in microseconds (one minute); longer ones saturate.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// An empty latency histogram in microseconds with 3 significant figures.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Request counters of one connection or of the whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Measured responses with a 2xx status.
    pub ok: u64,
    /// Measured responses with any other status.
    pub non_2xx: u64,
    /// Measured requests that failed on the connection (connect, write, read) or were still in
    /// flight at the deadline.
    pub io_errors: u64,
    /// Requests due in the measured window that were never sent because the window closed
    /// first: the target could not keep up with the rate.
    pub missed: u64,
    /// Requests answered during the whole run, warm-up included: what the target's CPU time is
    /// divided by.
    pub answered_total: u64,
}

impl Counts {
    pub fn merge(&mut self, other: &Counts) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.io_errors += other.io_errors;
        self.missed += other.missed;
        self.answered_total += other.answered_total;
    }

    /// Measured responses, whatever their status.
    pub fn responses(&self) -> u64 {
        self.ok + self.non_2xx
    }

    pub fn errors(&self) -> u64 {
        self.non_2xx + self.io_errors
    }
}

/// Latency quantiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// How the load was offered.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Open loop at a fixed rate; latency counts from each request's due time.
    Rate,
    /// Closed loop, each connection back to back; latency counts from the actual send.
    Max,
}

/// The result of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub url: String,
    pub host: String,
    pub mode: Mode,
    /// Requests per second asked for (absent in `max` mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_rps: Option<f64>,
    pub connections: usize,
    pub warmup_s: f64,
    /// Length of the measured window.
    pub duration_s: f64,
    /// Measured responses per second of the window.
    pub achieved_rps: f64,
    /// Measured responses (2xx or not).
    pub requests: u64,
    /// Non-2xx responses plus I/O errors.
    pub errors: u64,
    pub counts: Counts,
    pub latency_us: Latency,
    /// The first I/O error, to tell a refused connection from a reset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        url: String,
        host: String,
        mode: Mode,
        target_rps: Option<f64>,
        connections: usize,
        warmup_s: f64,
        duration_s: f64,
        counts: Counts,
        histogram: &Histogram<u64>,
        first_error: Option<String>,
    ) -> Self {
        let requests = counts.responses();
        let achieved_rps = if duration_s > 0.0 { requests as f64 / duration_s } else { 0.0 };
        Self {
            url,
            host,
            mode,
            target_rps,
            connections,
            warmup_s,
            duration_s,
            achieved_rps,
            requests,
            errors: counts.errors(),
            counts,
            latency_us: Latency::from_histogram(histogram),
            first_error,
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "target    {} (Host: {})", self.url, self.host)?;
        match self.target_rps {
            Some(rate) if self.mode == Mode::Rate => writeln!(
                f,
                "load      open loop at {rate} req/s over {} connections, {} s measured after {} s warm-up",
                self.connections, self.duration_s, self.warmup_s
            )?,
            _ => writeln!(
                f,
                "load      closed loop (max) over {} connections, {} s measured after {} s warm-up",
                self.connections, self.duration_s, self.warmup_s
            )?,
        }
        let c = &self.counts;
        writeln!(
            f,
            "requests  {} ({:.1} req/s); errors {} (non-2xx {}, I/O {}); missed {}",
            self.requests, self.achieved_rps, self.errors, c.non_2xx, c.io_errors, c.missed
        )?;
        let l = &self.latency_us;
        writeln!(
            f,
            "latency   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "first error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_histogram() {
        let mut h = latency_histogram();
        for us in 1..=1000 {
            h.saturating_record(us);
        }
        let l = Latency::from_histogram(&h);
        assert_eq!((l.p50, l.p90, l.p99, l.p999, l.max), (500, 900, 990, 999, 1000));
        assert_eq!(Latency::from_histogram(&latency_histogram()), Latency::default());
    }

    #[test]
    fn summary_serializes_what_run_sh_reads() {
        let mut h = latency_histogram();
        h.saturating_record(170);
        let mut counts = Counts { ok: 999, non_2xx: 1, answered_total: 1200, ..Default::default() };
        counts.merge(&Counts { io_errors: 2, missed: 3, ..Default::default() });
        let s = Summary::new(
            "http://127.0.0.1:1/".into(),
            "upstream.bench:8080".into(),
            Mode::Rate,
            Some(1000.0),
            16,
            1.0,
            1.0,
            counts,
            &h,
            None,
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["mode"], "rate");
        assert_eq!(v["requests"], 1000);
        assert_eq!(v["errors"], 3);
        assert_eq!(v["achieved_rps"], 1000.0);
        assert_eq!(v["counts"]["missed"], 3);
        assert_eq!(v["counts"]["answered_total"], 1200);
        assert_eq!(v["latency_us"]["p50"], 170);
        assert!(v.get("first_error").is_none());
        assert!(s.to_string().contains("p50 0.170 ms"));
    }
}
