//! The user sessions the gateway is splicing right now, so that a lock takes effect at once
//! (DESIGN section 6): agents end a locked user's sessions themselves, but a locked device
//! cannot be trusted to end its own, so the gateway cuts every splice to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

struct Live {
    device: String,
    user: String,
    cancel: CancellationToken,
}

type LiveMap = Arc<Mutex<HashMap<u64, Live>>>;

#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    live: LiveMap,
}

/// Removes its session from the registry when dropped. Owned, so it can travel into the task
/// that serves the session.
pub struct Registered {
    live: LiveMap,
    id: u64,
    pub cancel: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl Sessions {
    pub fn register(&self, device: &str, user: &str) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        if let Ok(mut live) = self.live.lock() {
            live.insert(
                id,
                Live {
                    device: device.to_string(),
                    user: user.to_string(),
                    cancel: cancel.clone(),
                },
            );
        }
        Registered {
            live: self.live.clone(),
            id,
            cancel,
        }
    }

    /// Ends the sessions to any of `devices` or of any of `users`; returns how many.
    pub fn cut(&self, devices: &[String], users: &[String]) -> usize {
        let Ok(live) = self.live.lock() else {
            return 0;
        };
        let mut n = 0;
        for s in live.values() {
            if devices.contains(&s.device) || users.contains(&s.user) {
                s.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn count(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_ends_matching_sessions_and_drop_unregisters() {
        let s = Sessions::default();
        let a = s.register("van-1", "alice");
        let b = s.register("van-2", "bob");
        assert_eq!(s.count(), 2);
        assert_eq!(s.cut(&["van-1".into()], &[]), 1);
        assert!(a.cancel.is_cancelled() && !b.cancel.is_cancelled());
        assert_eq!(s.cut(&[], &["bob".into()]), 1);
        assert!(b.cancel.is_cancelled());
        drop(a);
        drop(b);
        assert_eq!(s.count(), 0);
    }
}
