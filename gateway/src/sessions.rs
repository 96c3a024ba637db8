//! The user sessions the gateway is splicing right now, so that a lock takes effect at once
//! (DESIGN section 6): agents end a locked user's sessions themselves, but a locked device
//! cannot be trusted to end its own, so the gateway cuts every splice to it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How many cut sessions the gateway remembers the reason for, and for how long: long
/// enough for tsh to ask right after its stream died, small enough to bound memory.
const ENDED_KEPT: usize = 1024;
const ENDED_TTL: Duration = Duration::from_secs(120);

struct Live {
    device: String,
    user: String,
    session_id: String,
    cancel: CancellationToken,
}

/// A session the gateway cut, and why ("device van-1 is locked: MESSAGE").
struct Ended {
    session_id: String,
    user: String,
    reason: String,
    at: Instant,
}

type LiveMap = Arc<Mutex<HashMap<u64, Live>>>;

#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    live: LiveMap,
    ended: Mutex<VecDeque<Ended>>,
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
        crate::metrics::METRICS.sessions.dec();
        if let Ok(mut live) = self.live.lock() {
            live.remove(&self.id);
        }
    }
}

/// What a cut is aimed at: a device's or a user's sessions, with the reason to give.
pub struct CutTarget<'a> {
    pub name: &'a str,
    pub reason: &'a str,
}

impl Sessions {
    pub fn register(&self, device: &str, user: &str, session_id: &str) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        crate::metrics::METRICS.sessions.inc();
        if let Ok(mut live) = self.live.lock() {
            live.insert(
                id,
                Live {
                    device: device.to_string(),
                    user: user.to_string(),
                    session_id: session_id.to_string(),
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

    /// Ends the sessions to any of `devices` or of any of `users`, remembering each one's
    /// reason for [`Sessions::why_ended`]; returns how many.
    pub fn cut(&self, devices: &[CutTarget<'_>], users: &[CutTarget<'_>]) -> usize {
        let mut ended = Vec::new();
        let mut cancels = Vec::new();
        if let Ok(live) = self.live.lock() {
            // A session already cut keeps its first reason (a lock, say, not the tunnel's
            // end that may follow).
            for s in live.values().filter(|s| !s.cancel.is_cancelled()) {
                let hit = devices
                    .iter()
                    .find(|d| d.name == s.device)
                    .or_else(|| users.iter().find(|u| u.name == s.user));
                if let Some(t) = hit {
                    cancels.push(s.cancel.clone());
                    ended.push(Ended {
                        session_id: s.session_id.clone(),
                        user: s.user.clone(),
                        reason: t.reason.to_string(),
                        at: Instant::now(),
                    });
                }
            }
        }
        let n = ended.len();
        if let Ok(mut kept) = self.ended.lock() {
            let now = Instant::now();
            while kept
                .front()
                .is_some_and(|e| now.duration_since(e.at) > ENDED_TTL)
            {
                kept.pop_front();
            }
            for e in ended {
                if kept.len() >= ENDED_KEPT {
                    kept.pop_front();
                }
                kept.push_back(e);
            }
        }
        // The reasons are kept before the streams end, so a client that asks the moment
        // its stream dies finds them.
        for c in cancels {
            c.cancel();
        }
        n
    }

    /// Why this gateway cut `user`'s session `session_id`, if it did within the last
    /// minutes. Another user's session id answers nothing.
    pub fn why_ended(&self, user: &str, session_id: &str) -> Option<String> {
        let kept = self.ended.lock().ok()?;
        kept.iter()
            .rev()
            .find(|e| e.session_id == session_id && e.user == user && e.at.elapsed() <= ENDED_TTL)
            .map(|e| e.reason.clone())
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
        let a = s.register("van-1", "alice", "s1");
        let b = s.register("van-2", "bob", "s2");
        assert_eq!(s.count(), 2);
        let dev = CutTarget {
            name: "van-1",
            reason: "device van-1 is locked: stolen",
        };
        assert_eq!(s.cut(&[dev], &[]), 1);
        assert!(a.cancel.is_cancelled() && !b.cancel.is_cancelled());
        let user = CutTarget {
            name: "bob",
            reason: "user bob is locked",
        };
        assert_eq!(s.cut(&[], &[user]), 1);
        assert!(b.cancel.is_cancelled());
        drop(a);
        drop(b);
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn why_ended_answers_only_the_session_owner() {
        let s = Sessions::default();
        let _a = s.register("van-1", "alice", "s1");
        let _b = s.register("van-2", "alice", "s2");
        let dev = CutTarget {
            name: "van-1",
            reason: "device van-1 is locked: stolen",
        };
        s.cut(&[dev], &[]);
        assert_eq!(
            s.why_ended("alice", "s1").as_deref(),
            Some("device van-1 is locked: stolen")
        );
        assert_eq!(s.why_ended("mallory", "s1"), None);
        assert_eq!(s.why_ended("alice", "s2"), None, "not cut");
    }

    #[test]
    fn the_memory_of_cut_sessions_is_bounded() {
        let s = Sessions::default();
        let regs: Vec<_> = (0..ENDED_KEPT + 10)
            .map(|i| s.register("van-1", "alice", &format!("s{i}")))
            .collect();
        let dev = CutTarget {
            name: "van-1",
            reason: "locked",
        };
        assert_eq!(s.cut(&[dev], &[]), ENDED_KEPT + 10);
        assert_eq!(s.ended.lock().map(|e| e.len()).unwrap_or(0), ENDED_KEPT);
        drop(regs);
    }
}
