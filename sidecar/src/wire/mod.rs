//! HTTP/1.1 on the wire, shared by both request paths: what a `Content-Length` and an
//! authority may be (`syntax`), where a body ends (`framing`), response heads (`response`),
//! upstream connections and the idle ones (`pool`), and one request sent whole over them with
//! its response streamed back (`fetch`, for the general path).
//!
//! Depends on `balance` (an endpoint's idle connections) and `route` (failure classes) only:
//! `proxy` and `http1` both use it, and it uses neither.

pub(crate) mod fetch;
pub(crate) mod framing;
pub mod mux;
pub(crate) mod pool;
pub(crate) mod response;
pub mod syntax;

/// The longest head accepted (request or response).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Room made for every read (a `BytesMut` without spare capacity would read 64 bytes at a time).
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// The most header fields a head may hold.
pub(crate) const MAX_HEADERS: usize = 100;
