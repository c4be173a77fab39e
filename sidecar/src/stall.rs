//! A client connection whose peer stops reading is let go.
//!
//! A client that sends requests and never reads the answers would hold, for as long as it
//! likes, its connection, what is waiting to be written to it and, while a response is being
//! relayed, a connection to the app. [`StallGuard`] wraps a listener's socket: a write that
//! finds the socket full for [`STALL`] with nothing taken meanwhile fails with `TimedOut`, and
//! the connection ends as any broken one does. The clock is looked at only once the socket
//! is full; a write that goes through costs nothing more.
//!
//! Reading is not guarded here: waiting for the next request is what an idle keep-alive
//! connection does, and the listeners bound that (a head within the head timeout, an idle
//! connection 120 to 240 s).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long a peer may leave a write waiting without reading anything.
pub const STALL: Duration = Duration::from_secs(120);

pub struct StallGuard<T> {
    inner: T,
    /// Set when a write found the socket full; cleared by any write that goes through.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, stalled: None }
    }

    /// The inner socket found full: `Pending` until it has room, an error once it has had
    /// none for [`STALL`].
    fn wait<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(STALL)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer read nothing for 120 s")))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn went<R>(&mut self, done: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match done {
            Poll::Pending => self.wait(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.went(done, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.went(done, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = Pin::new(&mut self.inner).poll_flush(cx);
        self.went(done, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.went(done, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{StallGuard, STALL};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_nothing_is_let_go_and_a_slow_one_is_not() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(near);
        // A slow reader: a few bytes every minute, for five minutes.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 256];
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(60)).await;
                got += far.read(&mut buf).await.unwrap();
            }
            (far, got)
        });
        let started = tokio::time::Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(280) {
            sent += guarded.write(&[b'x'; 512]).await.expect("a slow reader is waited for");
        }
        let (far, got) = reader.await.unwrap();
        assert!(got >= 5 * 256 && sent >= got, "{got} {sent}");

        // The reader stops: the write in progress fails once nothing was taken for STALL.
        let stopped = tokio::time::Instant::now();
        let failed = tokio::time::timeout(Duration::from_secs(600), async {
            loop {
                if let Err(e) = guarded.write(&[b'x'; 512]).await {
                    break e;
                }
            }
        })
        .await
        .expect("let go in time");
        assert_eq!(failed.kind(), std::io::ErrorKind::TimedOut);
        let waited = stopped.elapsed();
        assert!(waited >= STALL && waited <= STALL + Duration::from_secs(1), "{waited:?}");
        drop(far);
    }
}
