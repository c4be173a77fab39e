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
}

/// Why a body broke off: the client's or upstream's connection failed, or its framing.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    pub fn text(s: impl Into<String>) -> Self {
        Self::Full(Some(Bytes::from(s.into())))
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(data) => data.is_none(),
            Self::Incoming(body) => body.is_end_stream(),
            Self::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Self::Fetched(body) => body.is_end_stream(),
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

/// Reads up to `limit` bytes of `body`; returns it whole if it fits.
pub async fn buffer(mut body: Incoming, limit: usize) -> Buffered {
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
