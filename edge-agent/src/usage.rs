//! Byte counters per service (issue 23), reported to the gateway with the tunnel's control
//! stream and summed by the authority into `tctl devices usage`.
//!
//! `ssh` and `kube` are counted as their streams cross the tunnel; `control` and `audit` as
//! control frames are read and written; `forward` as port-forwarded connections move bytes;
//! `sftp` (the sftp subsystem and `scp` commands) as the channel data of those programs when
//! they end; `target` as relayed streams to hosts behind the device cross the tunnel. `sftp`
//! and `forward` are part of `ssh`, counted again on their own.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use edgeport_proto::usage::{ServiceBytes, UsageReport, SERVICES};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A counted service, indexing [`SERVICES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Ssh = 0,
    Sftp = 1,
    Forward = 2,
    Kube = 3,
    Control = 4,
    Audit = 5,
    Target = 6,
}

/// How often a changed set of counters is sent while something other than the control
/// stream moves bytes, and at the longest when nothing does (keep-alives alone change
/// `control`, and reporting them more often would cost more than they do).
pub const REPORT_EVERY: Duration = Duration::from_secs(60);
pub const REPORT_IDLE_EVERY: Duration = Duration::from_secs(6 * 3600);

struct Counters {
    up: [AtomicU64; SERVICES.len()],
    down: [AtomicU64; SERVICES.len()],
}

static COUNTERS: Counters = Counters {
    up: [const { AtomicU64::new(0) }; SERVICES.len()],
    down: [const { AtomicU64::new(0) }; SERVICES.len()],
};

/// Why bulk transfers are refused now (the device is past its monthly data budget, as the
/// authority counts it), if they are.
static OVER_BUDGET: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// Sets (or clears, `None`) the data budget refusal.
pub fn set_over_budget(message: Option<String>) {
    if let Ok(mut b) = OVER_BUDGET.write() {
        if *b != message {
            match &message {
                Some(m) => tracing::warn!("bulk transfers refused from now on: {m}"),
                None => tracing::info!("the data budget allows bulk transfers again"),
            }
        }
        *b = message;
    }
}

/// The refusal for a bulk transfer (sftp, scp, rsync, port forwarding, Kubernetes) now,
/// if the device is past its data budget; shells and the audit log are never refused.
pub fn over_budget() -> Option<String> {
    OVER_BUDGET.read().ok().and_then(|b| b.clone())
}

/// When the counters started (Unix seconds): the agent's start.
static SINCE: AtomicU64 = AtomicU64::new(0);

/// Marks the start of counting (call once at agent start).
pub fn start(now_secs: u64) {
    let _ = SINCE.compare_exchange(0, now_secs, Ordering::Relaxed, Ordering::Relaxed);
}

/// Adds bytes that left the device (`up`) and reached it (`down`).
pub fn add(service: Counted, up: u64, down: u64) {
    let i = service as usize;
    if up > 0 {
        COUNTERS.up[i].fetch_add(up, Ordering::Relaxed);
    }
    if down > 0 {
        COUNTERS.down[i].fetch_add(down, Ordering::Relaxed);
    }
}

/// Moves `up` bytes already counted under `from` to `to` (an audit batch on the control
/// stream).
pub fn move_up(from: Counted, to: Counted, up: u64) {
    COUNTERS.up[from as usize].fetch_sub(
        up.min(COUNTERS.up[from as usize].load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    add(to, up, 0);
}

/// The counters now.
pub fn report() -> UsageReport {
    UsageReport {
        since: SINCE.load(Ordering::Relaxed),
        services: SERVICES
            .iter()
            .enumerate()
            .map(|(i, name)| ServiceBytes {
                service: (*name).to_string(),
                up: COUNTERS.up[i].load(Ordering::Relaxed),
                down: COUNTERS.down[i].load(Ordering::Relaxed),
            })
            .filter(|s| s.up > 0 || s.down > 0)
            .collect(),
    }
}

/// Sum of every counter but `control`: what changes when the device does real work.
pub fn busy_bytes(r: &UsageReport) -> u64 {
    r.services
        .iter()
        .filter(|s| s.service != "control")
        .map(|s| s.up.saturating_add(s.down))
        .sum()
}

/// A stream whose bytes are counted for one service. On a tunnel stream, what is written
/// leaves the device (`up`); on a local socket (`local`), what is read does.
pub struct CountedStream<S> {
    inner: S,
    service: Counted,
    local: bool,
}

impl<S> CountedStream<S> {
    pub fn tunnel(inner: S, service: Counted) -> Self {
        Self {
            inner,
            service,
            local: false,
        }
    }

    pub fn local(inner: S, service: Counted) -> Self {
        Self {
            inner,
            service,
            local: true,
        }
    }

    fn count(&self, read: u64, written: u64) {
        if self.local {
            add(self.service, read, written);
        } else {
            add(self.service, written, read);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.count(n, 0);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.count(0, *n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.count(0, *n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// When the next report is due: after [`REPORT_EVERY`] if real work changed the counters
/// since the last report, else after [`REPORT_IDLE_EVERY`].
pub struct Schedule {
    last_busy: u64,
    last_sent: std::time::Instant,
}

impl Schedule {
    pub fn new(now: std::time::Instant) -> Self {
        Self {
            last_busy: u64::MAX,
            last_sent: now,
        }
    }

    /// The report to send at `now`, if one is due.
    pub fn due(&mut self, now: std::time::Instant, every: Duration) -> Option<UsageReport> {
        let r = report();
        let busy = busy_bytes(&r);
        let elapsed = now.saturating_duration_since(self.last_sent);
        let due = (busy != self.last_busy && elapsed >= every) || elapsed >= REPORT_IDLE_EVERY;
        if !due || r.services.is_empty() {
            return None;
        }
        self.last_busy = busy;
        self.last_sent = now;
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_counted_tunnel_stream_counts_writes_up_and_reads_down() {
        let before = report();
        let get = |r: &UsageReport| {
            r.services
                .iter()
                .find(|s| s.service == "kube")
                .map_or((0, 0), |s| (s.up, s.down))
        };
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = CountedStream::tunnel(a, Counted::Kube);
        a.write_all(&[0u8; 100]).await.unwrap();
        b.write_all(&[0u8; 30]).await.unwrap();
        let mut buf = [0u8; 30];
        a.read_exact(&mut buf).await.unwrap();
        let (up0, down0) = get(&before);
        let (up1, down1) = get(&report());
        assert!(up1 - up0 >= 100 && down1 - down0 >= 30);
    }
}
