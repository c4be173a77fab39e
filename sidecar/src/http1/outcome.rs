//! How a fast-path request ended, and writing to its client: shared by the HTTP/1.1 hop
//! (`forward`) and the multiplexed one (`mux`).

use tokio::io::{AsyncWrite, AsyncWriteExt};

pub(super) enum Failed {
    /// No connection could be made: nothing was sent.
    Connect,
    /// The upstream went away before answering.
    BeforeResponse,
    /// Something broke after the response started: both connections are dropped.
    Midway,
}

/// Writes to the client and flushes: over TLS, bytes a full socket did not take wait in the
/// session until flushed, and the next upstream read may be long in coming.
pub(super) async fn write_flushed<C: AsyncWrite + Unpin>(client: &mut C, bytes: &[u8]) -> Result<(), Failed> {
    client.write_all(bytes).await.map_err(|_| Failed::Midway)?;
    client.flush().await.map_err(|_| Failed::Midway)
}
