//! Sessions open on this device, kept in a small file beside the spool so that an agent
//! killed in the middle of a session (power cut, kill -9, a crash) closes it in the audit
//! log when it starts again: a `session.end` with the reason "agent restarted" and the last
//! time the agent knew of it. Without this, such a session's `session.start` would never get
//! its end.
//!
//! The writer thread feeds every event it spools through [`OpenSessions::observe`]; the file
//! is rewritten (and synced) when a session opens or closes, and at most every
//! [`TOUCH_EVERY`] while any is active, so the last known time stays close to the truth.
//!
//! The file also names the last spool seq it accounts for (`through`), and the writer saves
//! it before it lets go of the spool, so the events after that seq are still in the spool if
//! the agent is killed between the two writes. The next start replays them
//! ([`OpenSessions::replay`]): a `session.start` spooled just before the kill is closed, and a
//! `session.end` spooled just before it is not closed a second time.

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

/// The file: the open sessions as of spool seq `through`.
#[derive(Serialize, Deserialize)]
struct Saved {
    through: u64,
    open: BTreeMap<String, Open>,
}

/// What the file may hold: the current form, or the bare map of earlier versions (whose
/// seq is unknown, so nothing is replayed).
#[derive(Deserialize)]
#[serde(untagged)]
enum OnDisk {
    Saved(Saved),
    Legacy(BTreeMap<String, Open>),
}

pub struct OpenSessions {
    path: PathBuf,
    open: BTreeMap<String, Open>,
    /// The last spool seq `open` accounts for.
    through: u64,
    dirty: bool,
    written: Instant,
}

impl OpenSessions {
    /// The sessions a previous run left open as of the returned spool seq (None: unknown),
    /// and forgets them: the caller replays the spool after that seq and closes what is left.
    pub fn load(dir: &Path) -> (Self, BTreeMap<String, Open>, Option<u64>) {
        let path = dir.join(FILE);
        let (left, through) = match std::fs::read(&path)
            .ok()
            .map(|b| serde_json::from_slice(&b))
        {
            None => (BTreeMap::new(), None),
            Some(Ok(OnDisk::Saved(s))) => (s.open, Some(s.through)),
            Some(Ok(OnDisk::Legacy(m))) => (m, None),
            Some(Err(e)) => {
                tracing::warn!(path = %path.display(), "unreadable list of open sessions ({e}); ignoring it");
                (BTreeMap::new(), None)
            }
        };
        let me = Self {
            path,
            open: BTreeMap::new(),
            through: 0,
            dirty: true,
            written: Instant::now(),
        };
        (me, left, through)
    }

    /// Applies to `left` (from [`Self::load`]) spooled events it does not account for.
    pub fn replay(left: &mut BTreeMap<String, Open>, events: &[AuditEvent]) {
        for ev in events {
            apply(left, ev);
        }
    }

    /// Takes note of one spooled event.
    pub fn observe(&mut self, ev: &AuditEvent) {
        if apply(&mut self.open, ev) {
            self.dirty = true;
        }
    }

    /// Everything up to spool seq `seq` is observed. Call it, and [`Self::save`], before
    /// letting go of the spool, so that nothing after `seq` is shipped and deleted first.
    pub fn set_through(&mut self, seq: u64) {
        self.through = seq;
    }

    pub fn save(&mut self) {
        let touch = !self.open.is_empty() && self.written.elapsed() >= TOUCH_EVERY;
        if !self.dirty && !touch {
            return;
        }
        let saved = Saved {
            through: self.through,
            open: self.open.clone(),
        };
        let data = serde_json::to_vec(&saved).unwrap_or_default();
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

/// Takes note of one spooled event in `open`; true if a session opened or closed.
fn apply(open: &mut BTreeMap<String, Open>, ev: &AuditEvent) -> bool {
    if ev.session_id.is_empty() {
        return false;
    }
    match ev.kind.as_str() {
        "session.start" => {
            let o = open.entry(ev.session_id.clone()).or_insert_with(|| Open {
                user: ev.user.clone(),
                login: ev.login.clone(),
                kind: ev.field("kind").to_string(),
                started_ms: ev.time_ms,
                ..Default::default()
            });
            o.channels += 1;
            o.last_ms = ev.time_ms;
            true
        }
        "session.end" => {
            let Some(o) = open.get_mut(&ev.session_id) else {
                return false;
            };
            o.channels = o.channels.saturating_sub(1);
            // The end a restart writes closes the whole session, whatever its channels.
            if o.channels == 0 || ev.field("reason") == "agent restarted" {
                open.remove(&ev.session_id);
            }
            true
        }
        _ => {
            if let Some(o) = open.get_mut(&ev.session_id) {
                o.last_ms = o.last_ms.max(ev.time_ms);
            }
            false
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

    fn left_b() -> BTreeMap<String, Open> {
        BTreeMap::from([(
            "b".to_string(),
            Open {
                channels: 1,
                ..Default::default()
            },
        )])
    }

    /// Killed after the spool write and before the file's: the spool's tail is replayed.
    #[test]
    fn events_spooled_after_the_last_save_are_replayed() {
        let mut left = BTreeMap::from([(
            "a".to_string(),
            Open {
                channels: 1,
                ..Default::default()
            },
        )]);
        OpenSessions::replay(
            &mut left,
            &[
                ev("session.end", "a", 70),
                ev("session.start", "n", 71),
                ev("exec", "n", 72),
            ],
        );
        assert_eq!(left.keys().collect::<Vec<_>>(), ["n"]);
        assert_eq!(left["n"].last_ms, 72);
        // A restart's own closing end, replayed after a second kill, closes the session
        // whatever its channel count.
        left.get_mut("n").unwrap().channels = 2;
        let end = closing_event("n", &left["n"]);
        OpenSessions::replay(&mut left, &[end]);
        assert!(left.is_empty());
    }

    #[test]
    fn sessions_left_open_are_found_after_a_restart() {
        let d = std::env::temp_dir().join(format!("open-sessions-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (mut s, left, through) = OpenSessions::load(&d);
        assert!(left.is_empty() && through.is_none());
        s.observe(&ev("session.start", "a", 10));
        s.observe(&ev("session.start", "b", 11));
        s.observe(&ev("session.start", "b", 12));
        s.observe(&ev("recording.chunk", "a", 50));
        s.observe(&ev("session.end", "b", 60));
        s.observe(&ev("session.end", "c", 61));
        s.set_through(6);
        s.save();
        // Killed here: a and one channel of b are open.
        let (_, left, through) = OpenSessions::load(&d);
        assert_eq!(through, Some(6));
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
        let (_, left, through) = OpenSessions::load(&d);
        assert!(left.is_empty() && through.is_none());
        // The bare map of earlier versions still loads, with nothing to replay.
        std::fs::write(d.join(FILE), serde_json::to_vec(&left_b()).unwrap()).unwrap();
        let (_, left, through) = OpenSessions::load(&d);
        assert_eq!(left, left_b());
        assert!(through.is_none());
        let _ = std::fs::remove_dir_all(&d);
    }
}
