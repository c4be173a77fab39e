//! When each request is due: the open-loop schedule.
//!
//! A generator that waits for a slow response before it sends the next request stops measuring
//! exactly while the system is slow ("coordinated omission"). Here request `i` of the whole run is
//! due at `start + i / rate` whatever happened before it, and its latency counts from that due
//! time, so a stall shows in every request that should have left during it — the wrk2 method.
//! The requests are dealt round-robin over the connections: connection `c` of `n` sends the
//! requests `c, c + n, c + 2n, …`.

use std::time::Duration;

/// The share of an open-loop schedule that one connection sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Requests per second over all connections; finite and positive.
    rate: f64,
    /// This connection's index, `< connections`.
    conn: u64,
    connections: u64,
}

impl Schedule {
    /// The schedule of connection `conn` of `connections` at `rate` requests per second in all.
    /// `rate` must be finite and positive and `conn < connections` (the caller validates its flags).
    pub fn new(rate: f64, conn: u64, connections: u64) -> Self {
        debug_assert!(rate.is_finite() && rate > 0.0 && conn < connections);
        Self { rate, conn, connections: connections.max(1) }
    }

    /// The global index of this connection's `k`-th request.
    fn index(&self, k: u64) -> u64 {
        self.conn.saturating_add(k.saturating_mul(self.connections))
    }

    /// When this connection's `k`-th request is due, as an offset from the start of the run.
    pub fn due(&self, k: u64) -> Duration {
        Duration::from_secs_f64(self.index(k) as f64 / self.rate)
    }

    /// How many of this connection's requests are due strictly before `offset`.
    pub fn count_before(&self, offset: Duration) -> u64 {
        // Global requests 0..total are due before `offset`; this connection has every n-th one
        // starting at its own index.
        let total = (offset.as_secs_f64() * self.rate).ceil() as u64;
        if total <= self.conn {
            0
        } else {
            (total - self.conn).div_ceil(self.connections)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    #[test]
    fn requests_are_dealt_round_robin_at_the_total_rate() {
        // 1,000 req/s over 4 connections: connection 1 sends requests 1, 5, 9, … due at 1, 5, 9 ms.
        let s = Schedule::new(1000.0, 1, 4);
        assert!((ms(s.due(0)) - 1.0).abs() < 1e-9);
        assert!((ms(s.due(1)) - 5.0).abs() < 1e-9);
        assert!((ms(s.due(2)) - 9.0).abs() < 1e-9);
    }

    #[test]
    fn counts_add_up_to_rate_times_duration() {
        for (rate, connections, secs) in
            [(1000.0, 16, 10.0), (200.0, 16, 2.5), (5000.0, 3, 1.0), (7.0, 16, 1.0)]
        {
            let offset = Duration::from_secs_f64(secs);
            let sum: u64 =
                (0..connections).map(|c| Schedule::new(rate, c, connections).count_before(offset)).sum();
            assert_eq!(sum, (rate * secs).ceil() as u64, "{rate} req/s, {connections} conns, {secs} s");
        }
    }

    #[test]
    fn count_before_is_strict() {
        // At 10 req/s on one connection the requests are due at 0, 100, 200 ms …: three before
        // 300 ms, four before 300.001 ms.
        let s = Schedule::new(10.0, 0, 1);
        assert_eq!(s.count_before(Duration::ZERO), 0);
        assert_eq!(s.count_before(Duration::from_millis(300)), 3);
        assert_eq!(s.count_before(Duration::from_micros(300_001)), 4);
        // Every request counted before an offset is due before it, and the next one is not.
        let s = Schedule::new(1000.0, 5, 16);
        let end = Duration::from_secs(2);
        let n = s.count_before(end);
        assert!(s.due(n - 1) < end && s.due(n) >= end);
    }
}
