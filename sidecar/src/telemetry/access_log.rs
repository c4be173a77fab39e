//! One JSON access-log line per request, written by a thread of its own so the request path
//! never waits on stdout: a full pipe (a log shipper that stalls, nobody reading) blocks only
//! that thread. Lines go through a bounded queue and are dropped, and counted in
//! `skein_access_log_dropped_total`, when the writer falls behind.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 4096;

/// One request, as logged.
#[derive(Serialize, Debug)]
pub struct Entry<'a> {
    pub time: String,
    pub direction: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub duration_ms: f64,
    pub upstream: &'a str,
    pub retries: u32,
    pub trace_id: &'a str,
    /// Inbound only: the authorization decision, `allow <policy>` or `deny <policy>` (and
    /// `; dry-run …` what a DryRun policy decided); absent when there was nothing to decide.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub authz: &'a str,
}

/// The access log; cheap to clone.
#[derive(Clone, Default)]
pub struct AccessLog {
    tx: Option<mpsc::SyncSender<String>>,
    /// Lines dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Writes to stdout from a thread of its own.
    pub fn stdout() -> Self {
        Self::to_writer(std::io::stdout())
    }

    /// Writes to `out` from a thread of its own; the thread ends when every clone is dropped.
    pub fn to_writer(out: impl Write + Send + 'static) -> Self {
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut out = std::io::BufWriter::new(out);
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(line.as_bytes());
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(more.as_bytes());
                }
                let _ = out.flush();
            }
        });
        match spawned {
            Ok(_) => Self { tx: Some(tx), dropped: Arc::default() },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the access-log thread; access logs are off");
                Self::off()
            }
        }
    }

    /// Logs nothing.
    pub fn off() -> Self {
        Self::default()
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = serde_json::to_string(entry).expect("plain data serializes");
        line.push('\n');
        if tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// RFC 3339 UTC time with milliseconds, such as `2026-11-25T19:37:07.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that never returns, like stdout into a pipe nobody reads.
    struct Stuck;

    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn entry() -> Entry<'static> {
        Entry {
            time: rfc3339(UNIX_EPOCH),
            direction: "outbound",
            method: "GET",
            authority: "reviews:9080",
            path: "/",
            status: 200,
            duration_ms: 0.25,
            upstream: "10.0.0.1:9080",
            retries: 0,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            authz: "",
        }
    }

    #[test]
    fn a_stuck_writer_drops_and_counts_lines_instead_of_blocking_the_caller() {
        let log = AccessLog::to_writer(Stuck);
        let n = QUEUE as u64 * 3;
        for _ in 0..n {
            log.log(&entry()); // would block forever on a full queue if it waited
        }
        let dropped = log.dropped.load(Ordering::Relaxed);
        // The queue holds QUEUE lines and the writer's 8 KiB buffer a few dozen more (lines are
        // about 250 bytes); the rest are dropped.
        assert!(dropped >= n - QUEUE as u64 - 100, "dropped {dropped} of {n}");
    }

    #[test]
    fn lines_reach_the_writer() {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        struct Collect(mpsc::Sender<Vec<u8>>);
        impl Write for Collect {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.send(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let log = AccessLog::to_writer(Collect(tx));
        log.log(&entry());
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(line["authority"], "reviews:9080");
        assert_eq!(log.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_795_635_427_123)),
            "2026-11-25T19:37:07.123Z"
        );
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn entries_are_json_lines() {
        let e = Entry {
            time: rfc3339(UNIX_EPOCH),
            direction: "outbound",
            method: "GET",
            authority: "reviews:9080",
            path: "/x?\"y\"",
            status: 200,
            duration_ms: 0.25,
            upstream: "10.0.0.1:9080",
            retries: 1,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            authz: "deny shop/callers",
        };
        let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(v["path"], "/x?\"y\"");
        assert_eq!(v["retries"], 1);
        assert_eq!(v["authz"], "deny shop/callers");
        let quiet = serde_json::to_string(&Entry { authz: "", ..e }).unwrap();
        assert!(!quiet.contains("authz"), "no decision, no field: {quiet}");
    }
}
