//! yamux over one TLS byte stream (the TCP fallback of a tunnel), shaped like a QUIC
//! connection: `open` a stream, `accept` the peer's streams, `close`, wait until `closed`.
//!
//! yamux 0.13 has no separate control handle: the `Connection` must be polled for inbound
//! streams to make any progress at all, outbound streams included. One task owns it and
//! serves open requests from a channel. [`crate::tunnel::yamux`] wraps the handles as a
//! [`crate::tunnel::Tunnel`]; nothing else needs them.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::stream::BoxedStream;
use crate::tunnel::CloseReason;

pub use yamux::Mode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum MuxError {
    #[error("the tunnel is closed: {0}")]
    Closed(CloseReason),
}

type OpenReply = oneshot::Sender<Result<BoxedStream, MuxError>>;

/// Limits of one multiplexed connection.
#[derive(Clone, Debug)]
pub struct MuxConfig {
    /// Streams open at once (each way).
    pub max_streams: usize,
    /// Upper bound of all streams' receive windows together, bytes. yamux guarantees each
    /// stream 256 KiB and lets a busy stream's window grow (doubling, while the sender
    /// uses half of it within two round trips) only into what is left above
    /// `max_streams` x 256 KiB.
    pub max_receive_window: usize,
    /// Peer-opened streams queued until someone accepts them; more are reset.
    pub accept_backlog: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            max_streams: 512,
            // 256 KiB per stream, which yamux requires, plus 32 MiB that fast streams grow
            // into. With no room above the guarantee (as before) every stream stayed at
            // 256 KiB: on loopback a 1 GiB upload over the TCP fallback spent a third of
            // its time with both cores idle, waiting for window updates (docs/benchmarks.md).
            max_receive_window: 512 * 256 * 1024 + GROWTH_WINDOW,
            accept_backlog: 256,
        }
    }
}

/// Receive window above the per-stream guarantee that busy streams share.
const GROWTH_WINDOW: usize = 32 * 1024 * 1024;

/// A cloneable handle to open streams on, and close, a multiplexed connection.
#[derive(Clone)]
pub struct MuxHandle {
    open_tx: mpsc::Sender<OpenReply>,
    close: CancellationToken,
    done: watch::Receiver<Option<CloseReason>>,
    accepting: Arc<AtomicBool>,
}

/// The peer-opened streams of a multiplexed connection.
pub struct MuxIncoming {
    rx: mpsc::Receiver<BoxedStream>,
}

impl MuxIncoming {
    /// The next stream the peer opened; `None` once the connection has ended.
    pub async fn accept(&mut self) -> Option<BoxedStream> {
        self.rx.recv().await
    }
}

impl MuxHandle {
    /// Opens a stream to the peer.
    pub async fn open(&self) -> Result<BoxedStream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send(tx)
            .await
            .map_err(|_| MuxError::Closed(self.reason()))?;
        rx.await.map_err(|_| MuxError::Closed(self.reason()))?
    }

    /// Asks the connection to close (open streams are reset).
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Resets the peer's streams from now on instead of queueing them for [`MuxIncoming`].
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Relaxed);
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.done.borrow().clone()
    }

    /// Resolves when the connection has ended, with the reason.
    pub fn closed(&self) -> impl Future<Output = CloseReason> + Send + 'static {
        let mut done = self.done.clone();
        async move {
            loop {
                if let Some(r) = done.borrow_and_update().clone() {
                    return r;
                }
                if done.changed().await.is_err() {
                    return CloseReason::Other("connection task ended".into());
                }
            }
        }
    }

    fn reason(&self) -> CloseReason {
        self.close_reason()
            .unwrap_or_else(|| CloseReason::Other("connection ended".into()))
    }
}

/// The most plaintext one TLS record carries.
const TLS_RECORD: usize = 16 * 1024;
/// yamux's frame header.
const FRAME_HEADER: usize = 12;

/// Starts yamux over `io` on a new task.
pub fn spawn<T>(io: T, mode: Mode, cfg: &MuxConfig) -> (MuxHandle, MuxIncoming)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut ycfg = yamux::Config::default();
    let streams = cfg.max_streams.max(1);
    // Keep the window consistent with yamux's own invariant (>= 256 KiB per stream).
    let window = cfg.max_receive_window.max(streams * 256 * 1024);
    // yamux checks each setter against the other's current value (its default is 512
    // streams), so lift the window limit first, set the streams, then the real window.
    ycfg.set_max_connection_receive_window(None);
    ycfg.set_max_num_streams(streams);
    ycfg.set_max_connection_receive_window(Some(window));
    ycfg.set_split_send_size(TLS_RECORD - FRAME_HEADER);
    // yamux writes each frame's 12-byte header and its body with separate writes, and TLS
    // makes every write a record (with TCP_NODELAY, a segment): a keep-alive exchange was
    // 14 segments, bulk data two records per frame. Buffered, a frame leaves as one record;
    // yamux flushes whenever it has nothing more to send.
    let io = tokio::io::BufWriter::with_capacity(TLS_RECORD, io);
    let conn = yamux::Connection::new(io.compat(), ycfg, mode);
    let (open_tx, open_rx) = mpsc::channel(64);
    let (in_tx, in_rx) = mpsc::channel(cfg.accept_backlog.max(1));
    let (done_tx, done_rx) = watch::channel(None);
    let close = CancellationToken::new();
    let accepting = Arc::new(AtomicBool::new(true));
    tokio::spawn(drive(
        conn,
        open_rx,
        in_tx,
        accepting.clone(),
        close.clone(),
        done_tx,
    ));
    (
        MuxHandle {
            open_tx,
            close,
            done: done_rx,
            accepting,
        },
        MuxIncoming { rx: in_rx },
    )
}

async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    in_tx: mpsc::Sender<BoxedStream>,
    accepting: Arc<AtomicBool>,
    close: CancellationToken,
    done_tx: watch::Sender<Option<CloseReason>>,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    let mut pending: Option<OpenReply> = None;
    let mut handles_gone = false;
    let mut cancelled = pin!(close.cancelled());
    // Ok: closed here (say goodbye first); Err: the connection ended by itself.
    let outcome: Result<(), CloseReason> = std::future::poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        loop {
            if pending.is_none() && !handles_gone {
                match open_rx.poll_recv(cx) {
                    Poll::Ready(Some(tx)) => pending = Some(tx),
                    Poll::Ready(None) => handles_gone = true,
                    Poll::Pending => {}
                }
            }
            if let Some(tx) = pending.take() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(Ok(s)) => {
                        let _ = tx.send(Ok(Box::new(s.compat())));
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        let reason = CloseReason::Other(e.to_string());
                        let _ = tx.send(Err(MuxError::Closed(reason.clone())));
                        return Poll::Ready(Err(reason));
                    }
                    Poll::Pending => pending = Some(tx),
                }
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    // A full backlog or nobody accepting: the stream is dropped (reset).
                    if accepting.load(Ordering::Relaxed) {
                        let _ = in_tx.try_send(Box::new(s.compat()));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(CloseReason::Other(e.to_string())))
                }
                // yamux has no reason field in its GoAway: the peer's words stay there.
                Poll::Ready(None) => {
                    return Poll::Ready(Err(CloseReason::ClosedByPeer(String::new())))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    let reason = match outcome {
        Ok(()) => {
            // Say goodbye (GoAway) but do not wait long for a dead peer.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                std::future::poll_fn(|cx| conn.poll_close(cx)),
            )
            .await;
            CloseReason::LocallyClosed
        }
        Err(e) => e,
    };
    drop(pending);
    let _ = done_tx.send(Some(reason));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn open_accept_echo_and_close() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, _cin) = spawn(a, Mode::Client, &MuxConfig::default());
        let (server, mut sin) = spawn(b, Mode::Server, &MuxConfig::default());
        let echo = tokio::spawn(async move {
            while let Some(mut s) = sin.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = c.open().await.unwrap();
                let data = vec![i; 100_000];
                s.write_all(&data).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, data);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        client.close();
        let _ = client.closed().await;
        assert_eq!(client.close_reason(), Some(CloseReason::LocallyClosed));
        let reason = server.closed().await;
        assert_eq!(reason, CloseReason::ClosedByPeer(String::new()));
        assert!(client.open().await.is_err());
        echo.await.unwrap();
    }
}
