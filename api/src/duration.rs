//! Go-style duration strings (`250ms`, `1m30s`), the form Kubernetes users know from every
//! other API. The CRD schema accepts them by [`DURATION_PATTERN`]; CEL compares them with
//! `duration()`; the operator turns them into milliseconds for the wire.

use std::time::Duration;

/// Schema pattern for a Go-style duration: one or more `<number><unit>` terms.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(pub String);

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid duration {:?}: use a Go-style duration such as 250ms, 10s or 1m30s", self.0)
    }
}

impl std::error::Error for DurationError {}

/// Parses a Go-style duration such as `1.5s` or `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_string());
    if text.is_empty() {
        return Err(err());
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
        // As the schema's pattern: digits, optionally a point and more digits ("1.s" and ".5s"
        // are refused there, so here too).
        let number = &rest[..number_len];
        let (whole, fraction) = number.split_once('.').unwrap_or((number, "1"));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(fraction) {
            return Err(err());
        }
        let value: f64 = rest[..number_len].parse().map_err(|_| err())?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    if !total.is_finite() || total > 1e9 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a duration and returns whole milliseconds (the unit on the wire), rounding up so that
/// a positive duration never becomes zero.
pub fn parse_millis(text: &str) -> Result<u64, DurationError> {
    let d = parse_duration(text)?;
    let ms = d.as_millis() as u64;
    Ok(if d > Duration::from_millis(ms) { ms + 1 } else { ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_millis("1us").unwrap(), 1);
        assert_eq!(parse_millis("0s").unwrap(), 0);
    }

    #[test]
    fn refuses_malformed_durations() {
        for bad in ["", "10", "s", "10x", "1.2.3s", "-1s", "10 s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
