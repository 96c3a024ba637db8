//! Small writes first: while a new stream's header or a control message waits for flow-control
//! credit, the bulk streams of the same tunnel hold their writes.
//!
//! QUIC and yamux give credit per connection as well as per stream. When a hundred bulk
//! streams keep the connection's window full, a newly opened stream's 100-byte header
//! competes with every one of them each time the peer frees a little credit, and on a loaded
//! machine it lost for seconds: dials timed out ("did not accept a stream in time") and the
//! agent's control stream missed its write deadline and dropped the whole tunnel (issue 28).
//! With a [`WriteGate`], the writer of something small and urgent holds an [`Urgent`] guard;
//! every [`Gated`] stream of that tunnel returns `Pending` from `poll_write` until no guard is
//! left, so the next credit the peer frees goes to the urgent write. Reads are never held.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One per tunnel: see the module documentation.
#[derive(Default)]
pub struct WriteGate {
    urgent: AtomicUsize,
    waiting: Mutex<Vec<Waker>>,
}

impl WriteGate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Holds the tunnel's bulk writes until the guard is dropped.
    pub fn urgent(self: &Arc<Self>) -> Urgent {
        self.urgent.fetch_add(1, Ordering::AcqRel);
        Urgent(self.clone())
    }

    /// Wraps a bulk stream of this tunnel.
    pub fn gate<S>(self: &Arc<Self>, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: self.clone(),
        }
    }

    /// Whether an urgent write is waiting now.
    pub fn is_held(&self) -> bool {
        self.urgent.load(Ordering::Acquire) > 0
    }

    fn waiting(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_held() {
            return Poll::Ready(());
        }
        let mut waiting = self.waiting();
        // Checked again under the lock: the last guard decrements before it takes the lock
        // to wake, so a writer either sees zero here or is woken.
        if !self.is_held() {
            return Poll::Ready(());
        }
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// An urgent write in progress (see [`WriteGate::urgent`]).
pub struct Urgent(Arc<WriteGate>);

impl Drop for Urgent {
    fn drop(&mut self) {
        if self.0.urgent.fetch_sub(1, Ordering::AcqRel) == 1 {
            let woken = std::mem::take(&mut *self.0.waiting());
            for w in woken {
                w.wake();
            }
        }
    }
}

/// A bulk stream whose writes wait while its tunnel has an urgent write pending.
pub struct Gated<S> {
    inner: S,
    gate: Arc<WriteGate>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bulk_writes_wait_for_the_urgent_one_and_reads_do_not() {
        let gate = WriteGate::new();
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut bulk = gate.gate(a);
        let urgent = gate.urgent();
        let blocked =
            tokio::time::timeout(Duration::from_millis(50), bulk.write_all(b"bulk")).await;
        assert!(
            blocked.is_err(),
            "a bulk write went through past an urgent one"
        );
        b.write_all(b"in").await.unwrap();
        let mut buf = [0u8; 2];
        bulk.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"in", "a read was held");
        let writer = tokio::spawn(async move {
            bulk.write_all(b"bulk").await.unwrap();
            bulk
        });
        tokio::task::yield_now().await;
        assert!(!writer.is_finished());
        drop(urgent);
        let _bulk = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the bulk write went on once the urgent one was done")
            .unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bulk");
    }

    #[tokio::test]
    async fn overlapping_guards_hold_until_the_last_one() {
        let gate = WriteGate::new();
        let first = gate.urgent();
        let second = gate.urgent();
        drop(first);
        assert!(gate.is_held());
        drop(second);
        assert!(!gate.is_held());
        assert!(gate.waiting().is_empty());
    }
}
