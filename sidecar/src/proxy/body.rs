//! Bodies the proxy sends: nothing, a buffered (replayable) body, a streamed one, or a
//! streamed one whose first bytes were already read while deciding whether it fits the retry
//! buffer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Request bodies up to this size are buffered so the request can be retried (as Linkerd does);
/// larger ones stream and are not retried.
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// A body on its way through the proxy.
#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    Prefixed {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
    /// A response read from a fast-path connection (`wire::fetch`).
    Fetched(Box<crate::wire::fetch::FetchedBody>),
    /// A response over the multiplexed hop (`wire::mux`).
    Mux(Box<crate::wire::mux::client::MuxBody>),
    /// A body read whole, whose trailers came with it.
    Trailed(Option<Bytes>, Option<http::HeaderMap>),
}

/// Why a body broke off: the client's or upstream's connection failed, or its framing.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    pub fn text(s: impl Into<String>) -> Self {
        Self::Full(Some(Bytes::from(s.into())))
    }

    /// Whether the whole body is in hand (none, or buffered), so it can be sent in one piece.
    pub fn is_whole(&self) -> bool {
        match self {
            Self::Empty | Self::Full(_) => true,
            Self::Incoming(body) => body.is_end_stream(),
            _ => false,
        }
    }

    /// Reads a streamed body whole when that costs no wait on its client: when it declared a
    /// length of at most `limit`, or when all of it (at most `limit` bytes) has arrived by the
    /// next scheduler round. Returns the body whole ([`Self::Full`]), or with what was read
    /// put back in front. A unary gRPC call's body (HEADERS and one DATA frame) is whole by
    /// then; a streaming call's is not, and is never waited for (its client may wait for an
    /// answer before sending more). `None`: the body broke off while it was read.
    pub async fn gather_ready(self, limit: usize) -> Option<Self> {
        use futures::FutureExt;
        let Self::Incoming(mut body) = self else { return Some(self) };
        if body.size_hint().upper().is_some_and(|n| n <= limit as u64) {
            return match buffer_incoming(body, limit).await {
                Buffered::Replayable(data) => Some(Self::Full((!data.is_empty()).then_some(data))),
                Buffered::OneShot(body) => Some(body),
                Buffered::Broken => None,
            };
        }
        let mut collected = BytesMut::new();
        let mut yielded = false;
        loop {
            if body.is_end_stream() {
                return Some(Self::Full((!collected.is_empty()).then(|| collected.freeze())));
            }
            match body.frame().now_or_never() {
                Some(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        collected.extend_from_slice(&data);
                        if collected.len() > limit {
                            return Some(Self::Prefixed { prefix: Some(collected.freeze()), rest: body });
                        }
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().ok();
                        return Some(Self::Trailed(
                            (!collected.is_empty()).then(|| collected.freeze()),
                            trailers,
                        ));
                    }
                },
                Some(None) => return Some(Self::Full((!collected.is_empty()).then(|| collected.freeze()))),
                None if !yielded => {
                    // The connection's task may hold the rest, read and not yet handed on.
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                Some(Some(Err(_))) => return None,
                None if collected.is_empty() => return Some(Self::Incoming(body)),
                None => return Some(Self::Prefixed { prefix: Some(collected.freeze()), rest: body }),
            }
        }
    }

    /// Takes a body that [`Self::is_whole`]: its bytes (`None`: there are none).
    pub fn take_whole(&mut self) -> Option<Bytes> {
        match self {
            Self::Full(data) => data.take(),
            _ => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let boxed =
            |p: Poll<Option<Result<Frame<Bytes>, _>>>| p.map(|f| f.map(|r| r.map_err(BodyError::from)));
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Incoming(body) => boxed(Pin::new(body).poll_frame(cx)),
            Self::Prefixed { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => boxed(Pin::new(rest).poll_frame(cx)),
            },
            Self::Fetched(body) => {
                Pin::new(body.as_mut()).poll_frame(cx).map(|f| f.map(|r| r.map_err(BodyError::from)))
            }
            Self::Mux(body) => {
                Pin::new(body.as_mut()).poll_frame(cx).map(|f| f.map(|r| r.map_err(BodyError::from)))
            }
            Self::Trailed(data, trailers) => match data.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(data) => data.is_none(),
            Self::Incoming(body) => body.is_end_stream(),
            Self::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Self::Fetched(body) => body.is_end_stream(),
            Self::Mux(body) => body.is_end_stream(),
            Self::Trailed(data, trailers) => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Incoming(body) => body.size_hint(),
            Self::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + p);
                }
                hint
            }
            Self::Fetched(body) => body.size_hint(),
            Self::Mux(body) => body.size_hint(),
            Self::Trailed(data, _) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// A request body after the retry buffer had its look.
#[derive(Debug)]
pub enum Buffered {
    /// Small enough to send again.
    Replayable(Bytes),
    /// Too large: sent once, never retried.
    OneShot(ProxyBody),
    /// The client's body broke while it was read (malformed chunked coding, cut short): it is
    /// not sent at all, rather than passed on truncated as if complete.
    Broken,
}

impl Buffered {
    /// The body for one attempt: a cheap clone when replayable, else the one-shot body (the
    /// first time only).
    pub fn take(&mut self) -> ProxyBody {
        match self {
            Self::Replayable(b) if b.is_empty() => ProxyBody::Empty,
            Self::Replayable(b) => ProxyBody::Full(Some(b.clone())),
            Self::OneShot(body) => std::mem::replace(body, ProxyBody::Empty),
            Self::Broken => ProxyBody::Empty,
        }
    }

    pub fn replayable(&self) -> bool {
        matches!(self, Self::Replayable(_))
    }
}

/// Reads up to `limit` bytes of `body`; returns it whole if it fits. A body already whole in
/// hand is not read again.
pub async fn buffer(body: ProxyBody, limit: usize) -> Buffered {
    match body {
        ProxyBody::Incoming(body) => buffer_incoming(body, limit).await,
        ProxyBody::Empty => Buffered::Replayable(Bytes::new()),
        ProxyBody::Full(data) if data.as_ref().is_none_or(|d| d.len() <= limit) => {
            Buffered::Replayable(data.unwrap_or_default())
        }
        other => Buffered::OneShot(other),
    }
}

async fn buffer_incoming(mut body: Incoming, limit: usize) -> Buffered {
    if body.is_end_stream() {
        return Buffered::Replayable(Bytes::new());
    }
    if body.size_hint().lower() > limit as u64 {
        return Buffered::OneShot(ProxyBody::Incoming(body));
    }
    let mut collected = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Buffered::Replayable(collected.freeze()),
            Some(Ok(frame)) => {
                // Trailers of a small body are dropped; request trailers are rare outside gRPC
                // streaming, whose bodies are not buffered anyway.
                if let Ok(data) = frame.into_data() {
                    collected.extend_from_slice(&data);
                }
                if collected.len() > limit {
                    return Buffered::OneShot(ProxyBody::Prefixed {
                        prefix: Some(collected.freeze()),
                        rest: body,
                    });
                }
            }
            Some(Err(_)) => return Buffered::Broken,
        }
    }
}

/// Whether a send failed because the request body failed: hyper reports the body's own error
/// (from the client's connection) as a user error with that error as its source.
pub(super) fn request_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_user()
                && std::error::Error::source(h)
                    .is_some_and(|inner| inner.downcast_ref::<hyper::Error>().is_some())
            {
                return true;
            }
        }
        source = s.source();
    }
    false
}
