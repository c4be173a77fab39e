//! A fast-path request to a meshed endpoint over the multiplexed hop (`wire::mux`): the
//! rewritten HTTP/1.1 head becomes the stream's header block, and the peer's response is
//! written back to the client as HTTP/1.1, framed by its `Content-Length` or chunked.

use std::io::Write as _;

use bytes::Bytes;
use futures::FutureExt;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use super::head::is_hop_by_hop;
use super::outcome::{write_flushed, Failed};
use crate::balance::EndpointState;
use crate::proxy::ProxyContext;
use crate::route::retry::Failure;
use crate::wire::mux::client::{MuxBody, MuxError};
use crate::wire::pool::{checkin, Upstream};

/// What is written to the client at most before it is sent (a streamed body's pieces).
const WRITE_AT: usize = 64 * 1024;

/// Sends the request in `out` (its head, then `body_len` bytes of body) over the hop
/// and relays the answer; `None` when `endpoint`'s sidecar does not offer the hop (the
/// request was not sent, and goes over HTTP/1.1).
pub(super) async fn exchange<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
    ctx: &ProxyContext,
    endpoint: &EndpointState,
    out: &mut Vec<u8>,
    body_len: usize,
    method_is_head: bool,
    client_close: bool,
) -> Option<Result<(u16, bool, bool), Failed>> {
    let (Some((peer, _)), Some(identity), Some(material)) =
        (&endpoint.via_proxy, &endpoint.peer_identity, ctx.tls.current())
    else {
        return None;
    };
    let (block, body) = block_of(out, body_len);
    let connect = || async {
        let tls = crate::proxy::peer::connect_peer(ctx, *peer, identity, &material, true).await?;
        Ok(Box::new(tls))
    };
    let sent = crate::wire::mux::client::send(&ctx.mux, *peer, identity, connect, block, body);
    let response = match Box::pin(sent).await {
        Ok(response) => response,
        Err(MuxError::NotOffered(tls)) => {
            if let Some(tls) = tls {
                checkin(endpoint, Upstream::Peer(tls));
            }
            return None;
        }
        Err(MuxError::Failed(Failure::Refused | Failure::ConnectFailure)) => {
            return Some(Err(Failed::Connect))
        }
        Err(MuxError::Failed(_)) => return Some(Err(Failed::BeforeResponse)),
    };
    Some(relay(client, response, out, method_is_head, client_close).await)
}

/// The header block and body of a request head this path wrote (`out`: request line,
/// `name: value` lines, blank line, then `body_len` bytes): names lowercased, `Host` as the
/// `:authority`.
fn block_of(out: &[u8], body_len: usize) -> (Bytes, Option<Bytes>) {
    use skein_http2::hpack::put_field;
    let head_len = out.len() - body_len;
    let mut lines = out[..head_len].split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.splitn(3, |b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let fields: Vec<(&[u8], &[u8])> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let colon = l.iter().position(|b| *b == b':')?;
            Some((&l[..colon], l[colon + 1..].trim_ascii()))
        })
        .collect();
    let mut block = Vec::with_capacity(head_len);
    put_field(&mut block, b":method", method);
    put_field(&mut block, b":scheme", b"http");
    if let Some((_, host)) = fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(b"host")) {
        put_field(&mut block, b":authority", host);
    }
    put_field(&mut block, b":path", path);
    let mut name = Vec::with_capacity(64);
    for (n, v) in fields {
        if n.eq_ignore_ascii_case(b"host") {
            continue;
        }
        name.clear();
        name.extend(n.iter().map(u8::to_ascii_lowercase));
        put_field(&mut block, &name, v);
    }
    let body = (body_len > 0).then(|| Bytes::copy_from_slice(&out[head_len..]));
    (block.into(), body)
}

/// Writes the peer's response to the client as HTTP/1.1; returns the status, whether the
/// client connection stays open, and whether the answer is the peer's authorization denial.
async fn relay<C: AsyncWrite + Unpin>(
    client: &mut C,
    response: http::Response<Option<MuxBody>>,
    out: &mut Vec<u8>,
    method_is_head: bool,
    client_close: bool,
) -> Result<(u16, bool, bool), Failed> {
    let (parts, body) = response.into_parts();
    let status = parts.status.as_u16();
    out.clear();
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status, parts.status.canonical_reason().unwrap_or(""));
    let mut denied = false;
    let mut declared = None;
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name.as_str().as_bytes()) {
            continue;
        }
        if *name == http::header::CONTENT_LENGTH {
            declared = crate::wire::syntax::parse_length(value.as_bytes());
            if declared.is_none() {
                return Err(Failed::BeforeResponse); // a peer's malformed length is not passed on
            }
        }
        if *name == crate::proxy::ERROR_HEADER {
            denied |= status == 403 && value.as_bytes() == crate::proxy::authz::DENIED.as_bytes();
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = method_is_head || status == 204 || status == 304;
    let body = body.filter(|_| !bodiless);
    let chunked = body.is_some() && declared.is_none();
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else if !bodiless && declared.is_none() {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    if client_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let Some(mut body) = body else {
        if declared.is_some_and(|n| n > 0) && !bodiless {
            // Declared a body and sent none: the client must not wait for it.
            write_flushed(client, out).await?;
            return Err(Failed::Midway);
        }
        write_flushed(client, out).await?;
        return Ok((status, !client_close, denied));
    };
    let mut sent = 0u64;
    let mut trailers = None;
    loop {
        // What is ready goes out in one write; the client is sent it before waiting for more.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                write_flushed(client, out).await?;
                out.clear();
                body.frame().await
            }
        };
        match frame {
            None => break,
            Some(Err(_)) => {
                write_flushed(client, out).await?;
                return Err(Failed::Midway);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    sent += data.len() as u64;
                    if declared.is_some_and(|n| sent > n) {
                        // More than it declared: the client gets what was declared, no more.
                        write_flushed(client, out).await?;
                        return Err(Failed::Midway);
                    }
                    if chunked && !data.is_empty() {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else {
                        out.extend_from_slice(&data);
                    }
                    if out.len() >= WRITE_AT {
                        write_flushed(client, out).await?;
                        out.clear();
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    write_flushed(client, out).await?;
    if declared.is_some_and(|n| sent != n) {
        return Err(Failed::Midway); // fewer bytes than declared: the client is told by a close
    }
    Ok((status, !client_close, denied))
}

#[cfg(test)]
mod tests {
    use super::block_of;
    use skein_http2::hpack::Decoder;

    #[test]
    fn a_head_becomes_a_header_block_with_its_authority_and_lowercase_names() {
        let out = b"POST /reviews/1?x=1 HTTP/1.1\r\nUser-Agent: t/1\r\nhost: reviews.shop:9080\r\nX-Two:  a b \r\n\r\nbody";
        let (block, body) = block_of(out, 4);
        assert_eq!(body.as_deref(), Some(&b"body"[..]));
        let fields = Decoder::new(4096).decode(&block, 1 << 16).unwrap();
        let text: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into(), String::from_utf8_lossy(v).into()))
            .collect();
        let want = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "reviews.shop:9080"),
            (":path", "/reviews/1?x=1"),
            ("user-agent", "t/1"),
            ("x-two", "a b"),
        ];
        assert_eq!(text, want.map(|(n, v)| (n.to_string(), v.to_string())));
    }
}
