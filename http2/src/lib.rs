//! HTTP/2's wire format, without a connection: frame heads and the frames a peer writes
//! (`frame`, RFC 9113 §4–6), and HPACK (`hpack`, RFC 7541) — the decoder with its dynamic table
//! and Huffman coding, and literal encodings that touch no table. The operator's config stream
//! serves HTTP/2 with them (`skein_operator::stream::http2`); they hold no I/O and no state
//! beyond a decoder's table, so any server or client of the project can share them.

pub mod frame;
pub mod hpack;
mod huffman;

/// A field HTTP/2 forbids (RFC 9113 §8.2.2): one that belongs to a hop of HTTP/1, and `te`
/// other than `trailers`. A message carrying one is malformed.
pub fn connection_specific(name: &[u8], value: &[u8]) -> bool {
    match name {
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade" => true,
        b"te" => value != b"trailers",
        _ => false,
    }
}
