//! HTTP syntax both request paths judge alike (hyper's in `proxy::serve`, the fast path in
//! `http1`): what a `Content-Length` and an authority may be.

use std::ops::Range;

/// Where `part`, a slice of `base`, sits in it.
pub(crate) fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// The longest `Content-Length` value taken: 19 digits always fit in a u64.
const MAX_LENGTH_DIGITS: usize = 19;

/// A `Content-Length` value as RFC 9110 §8.6 writes it: digits only (no sign, no spaces, no
/// list), and small enough to count.
pub fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > MAX_LENGTH_DIGITS || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Whether an authority is `host[:port]` or `[v6]:port` and nothing else: no userinfo, spaces
/// or path, a host that is not empty, and a port (when there is one) of digits up to 65535.
/// Both paths refuse anything else (the `http` crate alone would take `host:9x` and ignore the
/// port, so a request could be routed to another port than it names).
pub fn valid_authority(a: &[u8]) -> bool {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b);
    let (host, port) = match a.strip_prefix(b"[") {
        Some(rest) => {
            let Some(close) = rest.iter().position(|b| *b == b']') else { return false };
            let (inside, after) = (&rest[..close], &rest[close + 1..]);
            if inside.is_empty() || !inside.iter().all(|b| b.is_ascii_hexdigit() || b":.".contains(b)) {
                return false;
            }
            match after {
                [] => (&b"v6"[..], None),
                [b':', port @ ..] => (&b"v6"[..], Some(port)),
                _ => return false,
            }
        }
        None => match a.iter().rposition(|b| *b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        },
    };
    let port_ok = port.is_none_or(|p| p.len() <= 5 && parse_length(p).is_some_and(|n| n <= 65535));
    !host.is_empty() && host.iter().all(allowed) && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_are_host_and_digits_port() {
        for good in [&b"reviews"[..], b"reviews.shop:9080", b"[::1]:80", b"[fd00::1]", b"10.0.0.1:65535"] {
            assert!(valid_authority(good), "{}", String::from_utf8_lossy(good));
        }
        for bad in [
            &b""[..],
            b":80",
            b"a:",
            b"a:9x",
            b"a:65536",
            b"a:+1",
            b"u@a",
            b"a b",
            b"a/b",
            b"[::1",
            b"[]:1",
            b"[::1]x",
            b"a:1:2",
        ] {
            assert!(!valid_authority(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"0012"), Some(12));
        assert_eq!(parse_length(b"18446744073709551615"), None); // 20 digits
        assert_eq!(parse_length(b"9999999999999999999"), Some(9_999_999_999_999_999_999));
        for bad in [&b""[..], b"+5", b"-1", b" 5", b"5 ", b"5,5", b"0x5", "５".as_bytes()] {
            assert_eq!(parse_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
