//! Trace headers: a W3C `traceparent` (Trace Context §3.2) is generated when a request has none
//! (or an invalid one) and kept when it has one; `x-request-id` likewise; B3 headers
//! (`x-b3-*`, `b3`) pass through untouched, like every other end-to-end header.

use http::header::{HeaderMap, HeaderValue};

pub use crate::headers::{REQUEST_ID, TRACEPARENT};

/// The two lowercase hex digits of every byte value.
const HEX2: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    table
};

/// `value` as 16 hex digits into `out[..16]`, a byte at a time.
fn hex_into(out: &mut [u8], value: u64) {
    for (pair, byte) in out[..16].chunks_exact_mut(2).zip(value.to_be_bytes()) {
        pair.copy_from_slice(&HEX2[usize::from(byte)]);
    }
}

/// A random 64-bit value that is not zero.
fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

/// A valid version-00 traceparent: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, with
/// neither id all zeros.
pub fn is_valid_traceparent(v: &[u8]) -> bool {
    let lower_hex = |s: &[u8]| s.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    v.len() >= 55
        && (v.len() == 55 || v[55] == b'-')
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && lower_hex(&v[0..2])
        && &v[0..2] != b"ff"
        && lower_hex(&v[3..35])
        && v[3..35].iter().any(|c| *c != b'0')
        && lower_hex(&v[36..52])
        && v[36..52].iter().any(|c| *c != b'0')
        && lower_hex(&v[53..55])
}

/// A new sampled traceparent with random ids (neither all zeros).
pub fn new_traceparent() -> [u8; 55] {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&mut buf[3..19], fastrand::u64(..));
    hex_into(&mut buf[19..35], nonzero_u64());
    hex_into(&mut buf[36..52], nonzero_u64());
    buf
}

/// A new random request id (UUID v4 layout: 8-4-4-4-12 hex digits, version 4, RFC 4122
/// variant).
pub fn new_request_id() -> [u8; 36] {
    let high = (fastrand::u64(..) & !(0xf << 12)) | (0x4 << 12);
    let low = (fastrand::u64(..) & !(0x3 << 62)) | (0x2 << 62);
    let mut digits = [0u8; 32];
    hex_into(&mut digits[..16], high);
    hex_into(&mut digits[16..], low);
    let mut buf = *b"00000000-0000-0000-0000-000000000000";
    buf[0..8].copy_from_slice(&digits[0..8]);
    buf[9..13].copy_from_slice(&digits[8..12]);
    buf[14..18].copy_from_slice(&digits[12..16]);
    buf[19..23].copy_from_slice(&digits[16..20]);
    buf[24..36].copy_from_slice(&digits[20..32]);
    buf
}

/// A request's trace id, its 32 hex digits (for the access log); empty when it has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceId(Option<[u8; 32]>);

impl TraceId {
    /// The trace id of a traceparent that is valid (or at least long enough to hold one).
    pub fn of(traceparent: &[u8]) -> Self {
        Self(traceparent.get(3..35).and_then(|id| id.try_into().ok()))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref().and_then(|id| std::str::from_utf8(id).ok()).unwrap_or_default()
    }
}

/// Ensures the request carries a valid `traceparent` and an `x-request-id`; returns the trace
/// id (for the access log).
pub fn ensure(headers: &mut HeaderMap) -> TraceId {
    // Exactly one, and valid: several are as good as none (the fast path decides alike).
    let mut all = headers.get_all(&TRACEPARENT).iter();
    if let (Some(tp), None) = (all.next().filter(|v| is_valid_traceparent(v.as_bytes())), all.next()) {
        let id = TraceId::of(tp.as_bytes());
        if !headers.contains_key(&REQUEST_ID) {
            headers.insert(REQUEST_ID.clone(), value(&new_request_id()));
        }
        return id;
    }
    let tp = new_traceparent();
    headers.insert(TRACEPARENT.clone(), value(&tp));
    if !headers.contains_key(&REQUEST_ID) {
        headers.insert(REQUEST_ID.clone(), value(&new_request_id()));
    }
    TraceId::of(&tp)
}

/// A generated header value (hex digits and dashes only).
fn value(generated: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(generated).expect("ascii")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_have_their_layouts_and_differ() {
        for v in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX, fastrand::u64(..)] {
            let mut out = [0u8; 16];
            hex_into(&mut out, v);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{v:016x}"));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let tp = new_traceparent();
            assert!(is_valid_traceparent(&tp), "{}", String::from_utf8_lossy(&tp));
            let id = new_request_id();
            let text = std::str::from_utf8(&id).unwrap();
            for (i, c) in text.char_indices() {
                if [8, 13, 18, 23].contains(&i) {
                    assert_eq!(c, '-', "{text}");
                } else {
                    assert!(c.is_ascii_digit() || ('a'..='f').contains(&c), "{text}");
                }
            }
            assert_eq!(&text[14..15], "4", "{text}");
            assert!("89ab".contains(&text[19..20]), "{text}");
            assert!(seen.insert(tp.to_vec()) && seen.insert(id.to_vec()));
        }
    }

    #[test]
    fn generates_a_valid_traceparent_when_absent() {
        let mut h = HeaderMap::new();
        let trace_id = ensure(&mut h);
        let tp = h.get(&TRACEPARENT).unwrap().to_str().unwrap().to_string();
        assert!(is_valid_traceparent(tp.as_bytes()), "{tp}");
        assert_eq!(&tp[3..35], trace_id.as_str());
        assert!(tp.ends_with("-01"));
        let id = h.get(&REQUEST_ID).unwrap().to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn keeps_a_valid_traceparent_and_request_id_and_b3() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(tp));
        h.insert(&REQUEST_ID, HeaderValue::from_static("abc"));
        h.insert("x-b3-traceid", HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7"));
        assert_eq!(ensure(&mut h).as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h.get(&TRACEPARENT).unwrap(), tp);
        assert_eq!(h.get(&REQUEST_ID).unwrap(), "abc");
        assert_eq!(h.get("x-b3-traceid").unwrap(), "80f198ee56343ba864fe8b2a57d3eff7");
    }

    #[test]
    fn replaces_repeated_traceparents_with_one() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, HeaderValue::from_static(tp));
        h.append(
            &TRACEPARENT,
            HeaderValue::from_static("00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let id = ensure(&mut h);
        assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
        assert_ne!(h.get(&TRACEPARENT).unwrap(), tp);
        assert_eq!(&h.get(&TRACEPARENT).unwrap().as_bytes()[3..35], id.as_str().as_bytes());
    }

    #[test]
    fn replaces_an_invalid_traceparent() {
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(&TRACEPARENT, HeaderValue::from_static(bad));
            ensure(&mut h);
            assert_ne!(h.get(&TRACEPARENT).unwrap(), bad);
        }
    }
}
