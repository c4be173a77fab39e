//! Response heads from an upstream HTTP/1.1 connection, parsed in place.

use std::io;
use std::ops::Range;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;

use super::framing::{Chunked, Framing};
use super::pool::Upstream;
use super::syntax::{offset, parse_length};
use super::{MAX_HEAD, MAX_HEADERS};

/// A response's bytes as read, and where its header fields sit in them (reused across the
/// requests of a connection).
#[derive(Default)]
pub(crate) struct ResponseBuf {
    pub(crate) resp: BytesMut,
    pub(crate) headers: Vec<(Range<usize>, Range<usize>)>,
}

/// A parsed response head.
pub(crate) struct ResponseHead {
    pub(crate) len: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    pub(crate) close: bool,
    /// It had both `Transfer-Encoding` and `Content-Length`.
    pub(crate) chunked_and_length: bool,
}

/// Reads a complete response head into `scratch.resp` (skipping interim 1xx responses other
/// than 101); `Ok(None)` when the connection closed before any byte. A `Content-Length` that is
/// not digits, or two that differ, is an error (502), as in hyper's client.
pub(crate) async fn read_response_head(
    up: &mut Upstream,
    scratch: &mut ResponseBuf,
) -> io::Result<Option<ResponseHead>> {
    loop {
        // Parsed in a function of its own: its array of header slots (3 KiB) stays on the
        // stack of one poll instead of in every request's future.
        if let Some(head) = parse_response_head(scratch)? {
            return Ok(Some(head));
        }
        let n = up.read_buf(&mut scratch.resp).await?;
        if n == 0 {
            return if scratch.resp.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
    }
}

/// Parses the head at the start of `scratch.resp`, skipping interim responses; `Ok(None)` while
/// it is incomplete.
fn parse_response_head(scratch: &mut ResponseBuf) -> io::Result<Option<ResponseHead>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    loop {
        // Left uninitialised: httparse writes the fields it returns (3 KiB not cleared per head).
        let mut raw = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            &scratch.resp,
            &mut raw,
        ) {
            Ok(httparse::Status::Complete(len)) => {
                let status = res.code.unwrap_or(502);
                if (100..200).contains(&status) && status != 101 {
                    scratch.resp.advance(len);
                    continue;
                }
                scratch.headers.clear();
                let (mut length, mut chunked, mut coded) = (None, false, false);
                let mut close = res.version == Some(0);
                for h in res.headers.iter() {
                    let name = h.name.as_bytes();
                    scratch.headers.push((offset(&scratch.resp, name), offset(&scratch.resp, h.value)));
                    if name.eq_ignore_ascii_case(b"content-length") {
                        let n = parse_length(h.value).ok_or_else(|| invalid("bad content-length"))?;
                        if length.is_some_and(|l| l != n) {
                            return Err(invalid("conflicting content-length"));
                        }
                        length = Some(n);
                    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                        // The last coding decides: chunked ends the body, anything else runs to close.
                        coded = true;
                        chunked = h
                            .value
                            .split(|b| *b == b',')
                            .next_back()
                            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                    } else if name.eq_ignore_ascii_case(b"connection") {
                        close |= h
                            .value
                            .split(|b| *b == b',')
                            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                    }
                }
                if status == 101 {
                    return Err(invalid("unexpected 101"));
                }
                let framing = match (coded, chunked, length) {
                    (true, true, _) => Framing::Chunked(Chunked::default()),
                    (true, false, _) => Framing::UntilClose,
                    (false, _, Some(n)) => Framing::Length(n),
                    (false, _, None) => Framing::UntilClose,
                };
                let chunked_and_length = coded && length.is_some();
                return Ok(Some(ResponseHead { len, status, framing, close, chunked_and_length }));
            }
            Ok(httparse::Status::Partial) if scratch.resp.len() < MAX_HEAD => return Ok(None),
            _ => return Err(invalid("malformed response head")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interim_responses_are_skipped_however_many() {
        let mut scratch = ResponseBuf::default();
        for _ in 0..2_000 {
            scratch.resp.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        scratch.resp.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok");
        let head = parse_response_head(&mut scratch).unwrap().unwrap();
        assert_eq!((head.status, head.close, head.chunked_and_length), (200, false, false));
        assert!(matches!(head.framing, Framing::Length(2)));
        assert_eq!(&scratch.resp[head.len..], b"ok");
        assert_eq!(scratch.headers.len(), 2);

        for (bad, what) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n"[..], "conflicting"),
            (b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n", "bad content-length"),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101"),
            (b"NOT HTTP\r\n\r\n", "malformed"),
        ] {
            let mut scratch = ResponseBuf { resp: bytes::BytesMut::from(bad), headers: Vec::new() };
            let e = parse_response_head(&mut scratch).err().unwrap_or_else(|| panic!("{what} accepted"));
            assert!(e.to_string().contains(what), "{e}");
        }
        let mut partial =
            ResponseBuf { resp: bytes::BytesMut::from(&b"HTTP/1.1 200 OK\r\nx"[..]), headers: Vec::new() };
        assert!(parse_response_head(&mut partial).unwrap().is_none());
    }
}
