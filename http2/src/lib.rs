//! HTTP/2's wire format, without a connection: frame heads and the frames a peer writes
//! (`frame`, RFC 9113 §4–6), and HPACK (`hpack`, RFC 7541) — the decoder with its dynamic table
//! and Huffman coding, and literal encodings that touch no table. The operator's config stream
//! serves HTTP/2 with them (`skein_operator::stream::http2`); they hold no I/O and no state
//! beyond a decoder's table, so any server or client of the project can share them.

pub mod frame;
pub mod hpack;
mod huffman;
