//! The multiplexed hop's half of the fuzz targets (`crate::fuzzing::mux_frames`).

use std::convert::Infallible;

use bytes::Bytes;
use http::Response;
use skein_http2::frame::{self, Head, DEFAULT_MAX_FRAME, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = http_body_util::Full<Bytes>;

/// Serves `data` (after the preface) and checks what comes back.
pub async fn serve_bytes(data: &[u8]) {
    let (mut near, far) = tokio::io::duplex(4 * 1024 * 1024);
    let handler = |req: http::Request<Option<Bytes>>| -> super::server::Answer<Body> {
        let len = req.body().as_ref().map_or(0, Bytes::len);
        Box::pin(async move { Ok::<_, Infallible>(Response::new(Body::new(Bytes::from(len.to_string())))) })
    };
    let server = tokio::spawn(super::server::serve(far, handler));
    let mut input = frame::PREFACE.to_vec();
    input.extend_from_slice(data);
    let writer = async move {
        let _ = near.write_all(&input).await;
        let (mut rd, mut wr) = tokio::io::split(near);
        let _ = wr.shutdown().await;
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await.expect("the server ends");
    let _ = server.await;
    let mut rest = &out[..];
    while rest.len() >= HEADER_LEN {
        let head = Head::parse(&rest[..HEADER_LEN]);
        assert!(head.len <= DEFAULT_MAX_FRAME, "a frame of {} bytes", head.len);
        assert!(head.stream == 0 || head.stream % 2 == 1, "a frame on stream {}", head.stream);
        if rest.len() < HEADER_LEN + head.len {
            break;
        }
        rest = &rest[HEADER_LEN + head.len..];
    }
}
