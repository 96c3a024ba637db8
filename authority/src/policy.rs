//! The policy epoch: a counter that moves whenever a change can turn an allowed dial into a
//! refused one (a lock, a removed user or device, a role change, a user's roles refreshed by
//! single sign-on).
//!
//! Gateways watch it (`WatchPolicy`, a long poll on a connection of its own) and reuse the
//! authority's dial decisions only until it moves. A change waits, briefly, until every
//! watching gateway has acknowledged the new epoch (by asking for the next one), so that when
//! `tctl lock` returns, no gateway will admit the locked user or device on a reused grant.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a change waits for gateways to acknowledge it (a gateway that does not answer in
/// time is dead or cut off; its grants expire on their own).
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// A watch is answered after this long even if nothing changed (well inside the RPC client's
/// timeout), which also tells the gateway the authority is alive.
pub const WATCH_MAX: Duration = Duration::from_secs(10);

pub struct Policy {
    epoch: tokio::sync::watch::Sender<u64>,
    /// Watching connections and the epoch each has acknowledged.
    watchers: Mutex<HashMap<u64, u64>>,
    acked: Condvar,
    /// This authority sees every change (its store is its own).
    pub exclusive: bool,
}

impl Policy {
    pub fn new(exclusive: bool) -> Self {
        Self {
            epoch: tokio::sync::watch::Sender::new(1),
            watchers: Mutex::new(HashMap::new()),
            acked: Condvar::new(),
            exclusive,
        }
    }

    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Moves the epoch and waits (at most [`ACK_WAIT`]) until every watcher has seen it.
    /// Runs on the blocking pool, like every handler.
    pub fn changed(&self) {
        let mut now = 0;
        self.epoch.send_modify(|e| {
            *e += 1;
            now = *e;
        });
        let deadline = Instant::now() + ACK_WAIT;
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        while w.values().any(|&seen| seen < now) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    behind = w.values().filter(|&&s| s < now).count(),
                    "a policy change was not acknowledged by every gateway in time"
                );
                return;
            }
            w = match self.acked.wait_timeout(w, left) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }

    /// Connection `conn` has seen `epoch` (it asks for the next change).
    pub fn seen(&self, conn: u64, epoch: u64) {
        if let Ok(mut w) = self.watchers.lock() {
            w.insert(conn, epoch);
        }
        self.acked.notify_all();
    }

    /// Connection `conn` closed: nobody to wait for there.
    pub fn gone(&self, conn: u64) {
        if let Ok(mut w) = self.watchers.lock() {
            if w.remove(&conn).is_none() {
                return;
            }
        }
        self.acked.notify_all();
    }

    /// The epoch once it differs from `seen`, or the current one after `max`.
    pub async fn wait_change(&self, seen: u64, max: Duration) -> u64 {
        let mut rx = self.epoch.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|e| *e != seen)).await;
        let e = *rx.borrow();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_change_waits_for_every_watcher() {
        let p = Arc::new(Policy::new(true));
        let start = p.epoch();
        // Nobody watching: no wait.
        let t = Instant::now();
        p.changed();
        assert!(t.elapsed() < Duration::from_millis(500));
        assert_eq!(p.epoch(), start + 1);
        // One watcher that acknowledges after 200 ms.
        p.seen(7, p.epoch());
        let q = p.clone();
        let acker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            q.seen(7, start + 2);
        });
        let t = Instant::now();
        p.changed();
        let waited = t.elapsed();
        acker.join().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert!(waited < ACK_WAIT, "{waited:?}");
        // A watcher that goes away is not waited for.
        p.gone(7);
        p.seen(8, p.epoch());
        let q = p.clone();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            q.gone(8);
        });
        let t = Instant::now();
        p.changed();
        closer.join().unwrap();
        assert!(t.elapsed() < ACK_WAIT, "{:?}", t.elapsed());
    }

    #[test]
    fn watches_answer_on_change_or_after_the_limit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = Arc::new(Policy::new(true));
        let e = p.epoch();
        rt.block_on(async {
            let t = Instant::now();
            assert_eq!(p.wait_change(e, Duration::from_millis(100)).await, e);
            assert!(t.elapsed() >= Duration::from_millis(90));
            assert_eq!(p.wait_change(e - 1, Duration::from_secs(5)).await, e);
            let q = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                q.changed();
            });
            assert_eq!(p.wait_change(e, Duration::from_secs(5)).await, e + 1);
        });
    }
}
