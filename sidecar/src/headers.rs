//! The header names sidecars add to what they pass on, as statics: code that reads a decoded
//! name compares against these before asking `HeaderName::from_bytes`, which allocates every
//! name the `http` crate does not know.

use http::HeaderName;

/// See [`skein_api::constants::INBOUND_PORT_HEADER`].
pub static INBOUND_PORT: HeaderName = HeaderName::from_static(skein_api::constants::INBOUND_PORT_HEADER);
/// Request header telling the upstream which attempt this is (1 = first retry).
pub static ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-skein-attempt");
/// Response header set when the proxy retried: an outer proxy that sees it does not retry
/// again, so retries never multiply across hops.
pub static RETRIED_HEADER: HeaderName = HeaderName::from_static("x-skein-retries");
/// Response header naming why the proxy itself answered with an error.
pub static ERROR_HEADER: HeaderName = HeaderName::from_static("x-skein-error");
/// W3C Trace Context (see `telemetry::trace`).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `name` as one of the statics above, if it is one.
pub fn ours(name: &[u8]) -> Option<&'static HeaderName> {
    [&TRACEPARENT, &REQUEST_ID, &INBOUND_PORT, &ATTEMPT_HEADER, &RETRIED_HEADER, &ERROR_HEADER]
        .into_iter()
        .find(|known| known.as_str().as_bytes() == name)
}
