//! Sessions open on this device, kept in a small file beside the spool so that an agent
//! killed in the middle of a session (power cut, kill -9, a crash) closes it in the audit
//! log when it starts again: a `session.end` with the reason "agent restarted" and the last
//! time the agent knew of it. Without this, such a session's `session.start` would never get
//! its end.
//!
//! The writer thread feeds every event it spools through [`OpenSessions::observe`]; the file
//! is rewritten (and synced) when a session opens or closes, and at most every
//! [`TOUCH_EVERY`] while any is active, so the last known time stays close to the truth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeport_proto::audit::AuditEvent;
use serde::{Deserialize, Serialize};

const FILE: &str = "open-sessions.json";
/// How often the file is rewritten only to move the sessions' last known times.
const TOUCH_EVERY: Duration = Duration::from_secs(30);

/// One open session: what its `session.start` said, and how many channels of it are open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub user: String,
    pub login: String,
    pub kind: String,
    pub channels: u32,
    pub started_ms: u64,
    pub last_ms: u64,
}

pub struct OpenSessions {
    path: PathBuf,
    open: BTreeMap<String, Open>,
    dirty: bool,
    written: Instant,
}

impl OpenSessions {
    /// The sessions a previous run left open (and forgets them: the caller closes them).
    pub fn load(dir: &Path) -> (Self, BTreeMap<String, Open>) {
        let path = dir.join(FILE);
        let left = std::fs::read(&path)
            .ok()
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "unreadable list of open sessions ({e}); ignoring it");
                    None
                }
            })
            .unwrap_or_default();
        let me = Self {
            path,
            open: BTreeMap::new(),
            dirty: true,
            written: Instant::now(),
        };
        (me, left)
    }

    /// Takes note of one spooled event.
    pub fn observe(&mut self, ev: &AuditEvent) {
        if ev.session_id.is_empty() {
            return;
        }
        match ev.kind.as_str() {
            "session.start" => {
                let o = self
                    .open
                    .entry(ev.session_id.clone())
                    .or_insert_with(|| Open {
                        user: ev.user.clone(),
                        login: ev.login.clone(),
                        kind: ev.field("kind").to_string(),
                        started_ms: ev.time_ms,
                        ..Default::default()
                    });
                o.channels += 1;
                o.last_ms = ev.time_ms;
                self.dirty = true;
            }
            "session.end" => {
                if let Some(o) = self.open.get_mut(&ev.session_id) {
                    o.channels = o.channels.saturating_sub(1);
                    if o.channels == 0 {
                        self.open.remove(&ev.session_id);
                    }
                    self.dirty = true;
                }
            }
            _ => {
                if let Some(o) = self.open.get_mut(&ev.session_id) {
                    o.last_ms = o.last_ms.max(ev.time_ms);
                }
            }
        }
    }

    /// Rewrites the file if a session opened or closed, or (sessions active) every
    /// [`TOUCH_EVERY`]. Errors are logged: the spool itself is what matters.
    pub fn save(&mut self) {
        let touch = !self.open.is_empty() && self.written.elapsed() >= TOUCH_EVERY;
        if !self.dirty && !touch {
            return;
        }
        let data = serde_json::to_vec(&self.open).unwrap_or_default();
        match edgeport_proto::util::write_private(&self.path, &data) {
            Ok(()) => {
                self.dirty = false;
                self.written = Instant::now();
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot save the list of open sessions: {e}")
            }
        }
    }
}

/// The `session.end` that closes a session a previous run left open.
pub fn closing_event(session_id: &str, o: &Open) -> AuditEvent {
    let mut ev = AuditEvent::new("session.end", o.last_ms.max(o.started_ms));
    ev.session_id = session_id.to_string();
    ev.user = o.user.clone();
    ev.login = o.login.clone();
    ev.fields.insert("kind".into(), o.kind.clone());
    ev.fields.insert("reason".into(), "agent restarted".into());
    ev.fields
        .insert("last_known_ms".into(), o.last_ms.to_string());
    ev
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ev(kind: &str, sid: &str, t: u64) -> AuditEvent {
        let mut e = AuditEvent::new(kind, t);
        e.session_id = sid.into();
        e.user = "alice".into();
        e.fields.insert("kind".into(), "shell".into());
        e
    }

    #[test]
    fn sessions_left_open_are_found_after_a_restart() {
        let d = std::env::temp_dir().join(format!("open-sessions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (mut s, left) = OpenSessions::load(&d);
        assert!(left.is_empty());
        s.observe(&ev("session.start", "a", 10));
        s.observe(&ev("session.start", "b", 11));
        s.observe(&ev("session.start", "b", 12));
        s.observe(&ev("recording.chunk", "a", 50));
        s.observe(&ev("session.end", "b", 60));
        s.observe(&ev("session.end", "c", 61));
        s.save();
        // Killed here: a and one channel of b are open.
        let (_, left) = OpenSessions::load(&d);
        assert_eq!(left.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(left["a"].last_ms, 50);
        assert_eq!(left["b"].channels, 1);
        let end = closing_event("a", &left["a"]);
        assert_eq!(end.kind, "session.end");
        assert_eq!(end.field("reason"), "agent restarted");
        assert_eq!(end.field("last_known_ms"), "50");
        assert_eq!(end.time_ms, 50);
        // Garbage in the file is not fatal.
        std::fs::write(d.join(FILE), b"{not json").unwrap();
        let (_, left) = OpenSessions::load(&d);
        assert!(left.is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
