//! Writes coalesced until the end of a scheduler round, for hyper's HTTP/2 server.
//!
//! The h2 crate under hyper writes (and flushes) each response's DATA frame of 256 bytes or
//! more on its own: a frame it does not copy must go out before the next is queued. With many
//! streams answered in the same round of the runtime, that is one system call per response
//! where one would do (measured: 0.94 writes per response to an HTTP/2 client that keeps 16
//! streams open, with about five responses ready per wake-up).
//!
//! [`Coalesce`] takes every write into a buffer and lets the first flush of a round go by: it
//! reports the flush done, wakes the task, and writes everything at the task's next flush,
//! after the tasks already queued (the other streams) have run and added their frames. The
//! h2 connection flushes at the end of every poll that does not end it, and shuts the
//! connection down through [`AsyncWrite::poll_shutdown`], which writes first; nothing waits
//! longer than one round. Only HTTP/2 connections are wrapped: hyper's HTTP/1 server does not
//! flush on every poll.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Past this many buffered bytes a write goes to the socket at once.
const LIMIT: usize = 64 * 1024;

/// An I/O object whose writes wait, at most one scheduler round, to go out together.
pub struct Coalesce<T> {
    inner: T,
    buf: BytesMut,
    /// A flush was let go by: the next one writes.
    deferred: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, buf: BytesMut::new(), deferred: false }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the buffer out; `Pending` (the waker registered) while the socket is full.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.buf.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // A buffer that grew for a burst is not kept for the connection's life.
        if self.buf.capacity() > LIMIT {
            self.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    fn take(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.buf.len() >= LIMIT {
            match self.drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // Still full: the caller waits for the socket.
                Poll::Pending if self.buf.len() >= LIMIT => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        let mut taken = 0;
        for b in bufs {
            self.buf.extend_from_slice(b);
            taken += b.len();
        }
        Poll::Ready(Ok(taken))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().take(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().take(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            this.deferred = false;
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if !this.deferred {
            // Let this round's other tasks add theirs; this task is polled again after them.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        match this.drain(cx) {
            Poll::Ready(Ok(())) => {
                this.deferred = false;
                Pin::new(&mut this.inner).poll_flush(cx)
            }
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.drain(cx) {
            Poll::Ready(Ok(())) => {
                this.deferred = false;
                Pin::new(&mut this.inner).poll_shutdown(cx)
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_the_second_flush_and_shutdown_writes_first() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(client);
        c.write_all(b"one ").await.unwrap();
        // The first flush of a round is let go by (and wakes the task)...
        poll_fn(|cx| Pin::new(&mut c).poll_flush(cx)).await.unwrap();
        c.write_all(b"two ").await.unwrap();
        let mut got = [0u8; 16];
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut got)).await;
        assert!(early.is_err(), "nothing is written before the second flush");
        // ... the next one writes everything at once.
        poll_fn(|cx| Pin::new(&mut c).poll_flush(cx)).await.unwrap();
        let n = server.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"one two ");

        c.write_all(b"last").await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");
    }

    #[tokio::test]
    async fn a_full_buffer_goes_out_without_waiting_for_a_flush() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut c = Coalesce::new(client);
        let big = vec![7u8; LIMIT + 10];
        c.write_all(&big).await.unwrap();
        c.write_all(b"x").await.unwrap(); // over the limit: the buffer is written first
        let mut got = vec![0u8; LIMIT + 10];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, big);
    }
}
