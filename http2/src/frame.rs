//! HTTP/2 frames (RFC 9113 §4, §6): the frame header, and the frames the server sends.

use bytes::{BufMut, BytesMut};

/// What a client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const HEADER_LEN: usize = 9;

pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

pub mod setting {
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Self = Self(0x0);
    pub const PROTOCOL_ERROR: Self = Self(0x1);
    pub const INTERNAL_ERROR: Self = Self(0x2);
    pub const FLOW_CONTROL_ERROR: Self = Self(0x3);
    pub const STREAM_CLOSED: Self = Self(0x5);
    pub const FRAME_SIZE_ERROR: Self = Self(0x6);
    pub const REFUSED_STREAM: Self = Self(0x7);
    pub const CANCEL: Self = Self(0x8);
    pub const COMPRESSION_ERROR: Self = Self(0x9);
    pub const ENHANCE_YOUR_CALM: Self = Self(0xb);
}

/// The largest window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// Every window's size until SETTINGS or WINDOW_UPDATE say otherwise.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// The smallest SETTINGS_MAX_FRAME_SIZE, and the default.
pub const DEFAULT_MAX_FRAME: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8]) -> Self {
        Self {
            len: (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize,
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt.
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

pub fn put_head(dst: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    dst.put_slice(&(len as u32).to_be_bytes()[1..]);
    dst.put_u8(kind);
    dst.put_u8(flags);
    dst.put_u32(stream);
}

pub fn put_settings(dst: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(dst, settings.len() * 6, kind::SETTINGS, 0, 0);
    for (id, value) in settings {
        dst.put_u16(*id);
        dst.put_u32(*value);
    }
}

pub fn put_settings_ack(dst: &mut BytesMut) {
    put_head(dst, 0, kind::SETTINGS, flag::ACK, 0);
}

pub fn put_ping(dst: &mut BytesMut, payload: [u8; 8], ack: bool) {
    put_head(dst, 8, kind::PING, if ack { flag::ACK } else { 0 }, 0);
    dst.put_slice(&payload);
}

pub fn put_window_update(dst: &mut BytesMut, stream: u32, increment: u32) {
    put_head(dst, 4, kind::WINDOW_UPDATE, 0, stream);
    dst.put_u32(increment);
}

pub fn put_rst_stream(dst: &mut BytesMut, stream: u32, reason: Reason) {
    put_head(dst, 4, kind::RST_STREAM, 0, stream);
    dst.put_u32(reason.0);
}

pub fn put_goaway(dst: &mut BytesMut, last_stream: u32, reason: Reason, debug: &str) {
    put_head(dst, 8 + debug.len(), kind::GOAWAY, 0, 0);
    dst.put_u32(last_stream);
    dst.put_u32(reason.0);
    dst.put_slice(debug.as_bytes());
}

/// A HEADERS frame carrying a whole (small) header block.
pub fn put_headers(dst: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool) {
    let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
    put_head(dst, block.len(), kind::HEADERS, flags, stream);
    dst.put_slice(block);
}

pub fn put_data(dst: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    put_head(dst, data.len(), kind::DATA, if end_stream { flag::END_STREAM } else { 0 }, stream);
    dst.put_slice(data);
}

/// A frame's payload without its padding (`PADDED`: a length byte first, that many bytes
/// last); `None` when the padding is longer than the payload (PROTOCOL_ERROR).
pub fn unpadded(head: &Head, payload: &[u8]) -> Option<std::ops::Range<usize>> {
    if !head.has(flag::PADDED) {
        return Some(0..payload.len());
    }
    let pad = *payload.first()? as usize;
    (pad < payload.len()).then(|| 1..payload.len() - pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_reads_back_as_written() {
        let mut buf = BytesMut::new();
        put_head(&mut buf, 0x01_02_03, kind::HEADERS, flag::END_HEADERS, 0x7fff_fff1);
        assert_eq!(
            Head::parse(&buf),
            Head { len: 0x01_02_03, kind: kind::HEADERS, flags: flag::END_HEADERS, stream: 0x7fff_fff1 }
        );
        // The reserved bit is dropped.
        buf[5] |= 0x80;
        assert_eq!(Head::parse(&buf).stream, 0x7fff_fff1);
    }

    #[test]
    fn padding_is_stripped_or_refused() {
        let padded = Head { len: 6, kind: kind::DATA, flags: flag::PADDED, stream: 1 };
        assert_eq!(unpadded(&padded, &[2, b'h', b'i', b'!', 0, 0]), Some(1..4));
        assert_eq!(unpadded(&padded, &[5, b'h', 0, 0, 0]), None);
        assert_eq!(unpadded(&padded, &[]), None);
        let plain = Head { flags: 0, ..padded };
        assert_eq!(unpadded(&plain, b"hi"), Some(0..2));
    }
}
